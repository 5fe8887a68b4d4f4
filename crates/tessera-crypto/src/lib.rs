//! Tessera's cryptographic primitives: digests, keyed MACs and Ed25519 signatures.
//!
//! This crate is *pure*: it never reads files, sockets, the clock or unseeded randomness.
//! Keys are created from caller-supplied seed bytes; the IO crates own where those come from.

#![forbid(unsafe_code)]

pub mod digest;
pub mod lthash;
pub mod mac;
pub mod sign;

pub use digest::{Digest, DigestBuilder, DIGEST_LEN};
pub use lthash::{ElementHasher, LtHash};
pub use mac::{constant_time_eq, derive_key, keyed_hash, mac16, verify_mac16, MAC16_LEN};
pub use sign::{
    verify_batch, CryptoError, SigningKey, VerifyingKey, PUBLIC_KEY_LEN, SIGNATURE_LEN,
};
