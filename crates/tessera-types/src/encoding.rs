//! Canonical encoding: `postcard` (serde) with a size bound and no trailing bytes.
//!
//! The encoding is deterministic for a given value, so encoded bytes can be hashed and compared.
//! Every decode is bounded by the caller's frame limit and returns a typed error, never panics.

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

/// Why bytes from the network did not decode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The input is longer than the limit for this kind of message.
    #[error("message of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes received.
        length: usize,
        /// The limit that applies.
        limit: usize,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid value was followed by extra bytes (a canonical encoding has none).
    #[error("{0} trailing bytes after a complete message")]
    TrailingBytes(usize),
}

/// Encodes a value canonically.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("encoding into a Vec cannot fail for Tessera's types")
}

/// Encodes a value canonically into a vector allocated for `capacity` bytes up front: for large
/// values (snapshots), growing the vector by doubling would copy the bytes several times.
pub fn encode_with_capacity<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    postcard::to_extend(value, Vec::with_capacity(capacity))
        .expect("encoding into a Vec cannot fail for Tessera's types")
}

/// Decodes a value from the start of `bytes`, ignoring what follows it: for reading a leading
/// field (a format version) before deciding how to read the rest.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    postcard::take_from_bytes(bytes)
        .map(|(value, _)| value)
        .map_err(|error| DecodeError::Malformed(error.to_string()))
}

/// Decodes a value, refusing inputs longer than `limit` and any trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            length: bytes.len(),
            limit,
        });
    }
    let (value, rest) = postcard::take_from_bytes(bytes)
        .map_err(|error| DecodeError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}
