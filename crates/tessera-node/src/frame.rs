//! Length-prefixed frames: authenticated replica frames and plain client frames.
//!
//! Replica frame: `u32 BE payload length ‖ payload ‖ 16-byte tag`, where the tag is a keyed
//! BLAKE3 hash, under the connection's session key, of `u64 BE frame sequence number ‖ payload`.
//! Each direction of each connection numbers its frames from 0, so a replayed, dropped or
//! reordered frame fails its tag. Client frame: `u32 BE payload length ‖ payload`.
//!
//! Readers never trust a length before checking it against the limit, and grow their buffer as
//! bytes actually arrive, so a peer that announces a huge frame and sends nothing costs nothing.
//! This module must never panic on input bytes.

use std::io;
use tessera_crypto::mac::constant_time_eq;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of a replica frame's tag.
pub const FRAME_TAG_LEN: usize = 16;

/// Largest client frame (a request carries at most a 1 MiB operation plus its authenticator).
pub const MAX_CLIENT_FRAME_BYTES: usize = 2 << 20;

/// Buffer growth step while reading a frame body.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The connection closed cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The connection failed or closed in the middle of a frame.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The announced length is over the limit.
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Announced length.
        length: usize,
        /// The limit that applies.
        limit: usize,
    },
    /// The tag does not match: forged, corrupted, replayed or reordered.
    #[error("frame {sequence} failed authentication")]
    BadTag {
        /// The sequence number the receiver expected.
        sequence: u64,
    },
}

/// The tag of frame `sequence` carrying `payload`.
fn frame_tag(key: &[u8; 32], sequence: u64, payload: &[u8]) -> [u8; FRAME_TAG_LEN] {
    // Incremental keyed BLAKE3 (the same primitive as `tessera_crypto::mac::keyed_hash`) so the
    // sequence number is bound without copying a payload that may be megabytes long.
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&sequence.to_be_bytes());
    hasher.update(payload);
    let full = hasher.finalize();
    let mut tag = [0u8; FRAME_TAG_LEN];
    tag.copy_from_slice(&full.as_bytes()[..FRAME_TAG_LEN]);
    tag
}

/// The sending half of an authenticated direction: numbers and tags frames.
pub struct FrameSealer {
    key: [u8; 32],
    next_sequence: u64,
}

impl FrameSealer {
    /// Starts a direction at sequence 0 under `key`.
    pub fn new(key: [u8; 32]) -> FrameSealer {
        FrameSealer {
            key,
            next_sequence: 0,
        }
    }

    /// Tags the next frame and advances the sequence number.
    pub fn seal(&mut self, payload: &[u8]) -> [u8; FRAME_TAG_LEN] {
        let tag = frame_tag(&self.key, self.next_sequence, payload);
        self.next_sequence += 1;
        tag
    }

    /// Writes one frame (into a buffered writer; the caller flushes).
    pub async fn write_frame<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        payload: &[u8],
    ) -> io::Result<()> {
        let length = frame_length(payload.len(), tessera_types::limits::MAX_FRAME_BYTES)?;
        let tag = self.seal(payload);
        writer.write_all(&length.to_be_bytes()).await?;
        writer.write_all(payload).await?;
        writer.write_all(&tag).await
    }
}

/// The receiving half of an authenticated direction: checks tags in sequence.
pub struct FrameOpener {
    key: [u8; 32],
    next_sequence: u64,
}

impl FrameOpener {
    /// Expects frames from sequence 0 under `key`.
    pub fn new(key: [u8; 32]) -> FrameOpener {
        FrameOpener {
            key,
            next_sequence: 0,
        }
    }

    /// Checks the tag of the next frame; advances only on success.
    pub fn open(&mut self, payload: &[u8], tag: &[u8; FRAME_TAG_LEN]) -> Result<(), FrameError> {
        let expected = frame_tag(&self.key, self.next_sequence, payload);
        if !constant_time_eq(&expected, tag) {
            return Err(FrameError::BadTag {
                sequence: self.next_sequence,
            });
        }
        self.next_sequence += 1;
        Ok(())
    }

    /// Reads and authenticates one frame; returns its payload.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Vec<u8>, FrameError> {
        let payload = read_body(reader, tessera_types::limits::MAX_FRAME_BYTES).await?;
        let mut tag = [0u8; FRAME_TAG_LEN];
        reader.read_exact(&mut tag).await?;
        self.open(&payload, &tag)?;
        Ok(payload)
    }
}

/// Reads one client frame of at most `limit` bytes.
pub async fn read_client_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    read_body(reader, limit).await
}

/// Appends one client frame to `buffer`.
pub fn push_client_frame(buffer: &mut Vec<u8>, payload: &[u8]) -> io::Result<()> {
    let length = frame_length(payload.len(), usize::MAX)?;
    buffer.extend_from_slice(&length.to_be_bytes());
    buffer.extend_from_slice(payload);
    Ok(())
}

/// Writes one client frame (into a buffered writer; the caller flushes).
pub async fn write_client_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
) -> io::Result<()> {
    let length = frame_length(payload.len(), usize::MAX)?;
    writer.write_all(&length.to_be_bytes()).await?;
    writer.write_all(payload).await
}

fn frame_length(length: usize, limit: usize) -> io::Result<u32> {
    match u32::try_from(length) {
        Ok(value) if length <= limit => Ok(value),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to send a frame of {length} bytes (limit {limit})"),
        )),
    }
}

/// Reads a length prefix and that many bytes, growing the buffer as bytes arrive.
async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    let first = reader.read(&mut prefix).await?;
    if first == 0 {
        return Err(FrameError::Closed);
    }
    reader.read_exact(&mut prefix[first..]).await?;
    let length = u32::from_be_bytes(prefix) as usize;
    if length > limit {
        return Err(FrameError::Oversized { length, limit });
    }
    let mut payload = Vec::with_capacity(length.min(READ_CHUNK_BYTES));
    while payload.len() < length {
        let start = payload.len();
        // Double the buffer, capped at the announced length; exact reservations keep the
        // allocation within `limit`.
        let end = start
            .saturating_add(start.max(READ_CHUNK_BYTES))
            .min(length);
        payload.reserve_exact(end - start);
        payload.resize(end, 0);
        reader.read_exact(&mut payload[start..end]).await?;
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [3u8; 32];

    async fn sealed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut sealer = FrameSealer::new(KEY);
        let mut bytes = Vec::new();
        for payload in payloads {
            sealer.write_frame(&mut bytes, payload).await.unwrap();
        }
        bytes
    }

    #[tokio::test]
    async fn peer_frames_round_trip_in_order() {
        let bytes = sealed(&[b"first", b"", &[9u8; 100_000]]).await;
        let mut reader = &bytes[..];
        let mut opener = FrameOpener::new(KEY);
        assert_eq!(opener.read_frame(&mut reader).await.unwrap(), b"first");
        assert_eq!(opener.read_frame(&mut reader).await.unwrap(), b"");
        assert_eq!(
            opener.read_frame(&mut reader).await.unwrap(),
            vec![9u8; 100_000]
        );
        assert!(matches!(
            opener.read_frame(&mut reader).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn flipped_bits_fail_authentication() {
        let bytes = sealed(&[b"payload"]).await;
        for index in 4..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[index] ^= 0x10;
            let mut opener = FrameOpener::new(KEY);
            let result = opener.read_frame(&mut &tampered[..]).await;
            assert!(
                matches!(result, Err(FrameError::BadTag { sequence: 0 })),
                "byte {index}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_key_fails_authentication() {
        let bytes = sealed(&[b"payload"]).await;
        let mut opener = FrameOpener::new([4u8; 32]);
        assert!(matches!(
            opener.read_frame(&mut &bytes[..]).await,
            Err(FrameError::BadTag { .. })
        ));
    }

    #[tokio::test]
    async fn replayed_and_reordered_frames_are_rejected() {
        let bytes = sealed(&[b"one", b"two"]).await;
        let first_length = 4 + 3 + FRAME_TAG_LEN;
        let (first, second) = bytes.split_at(first_length);

        let mut replayed = bytes.clone();
        replayed.extend_from_slice(first);
        let mut reader = &replayed[..];
        let mut opener = FrameOpener::new(KEY);
        opener.read_frame(&mut reader).await.unwrap();
        opener.read_frame(&mut reader).await.unwrap();
        assert!(matches!(
            opener.read_frame(&mut reader).await,
            Err(FrameError::BadTag { sequence: 2 })
        ));

        let mut opener = FrameOpener::new(KEY);
        assert!(matches!(
            opener.read_frame(&mut &second[..]).await,
            Err(FrameError::BadTag { sequence: 0 })
        ));
    }

    #[tokio::test]
    async fn oversized_announcements_are_refused_before_allocating() {
        let announced = (tessera_types::limits::MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        let mut opener = FrameOpener::new(KEY);
        assert!(matches!(
            opener.read_frame(&mut &announced[..]).await,
            Err(FrameError::Oversized { .. })
        ));
        let announced = ((MAX_CLIENT_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_client_frame(&mut &announced[..], MAX_CLIENT_FRAME_BYTES).await,
            Err(FrameError::Oversized { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_and_garbage_input_errors_without_panicking() {
        let bytes = sealed(&[b"payload"]).await;
        for cut in 1..bytes.len() {
            let mut opener = FrameOpener::new(KEY);
            let result = opener.read_frame(&mut &bytes[..cut]).await;
            assert!(matches!(result, Err(FrameError::Io(_))), "cut at {cut}");
        }
        // A large announced length with few bytes behind it: an error, and the buffer only grew
        // with what arrived.
        let mut garbage = vec![0x0f, 0xff, 0xff, 0xff];
        garbage.extend_from_slice(&[0xab; 1000]);
        let mut opener = FrameOpener::new(KEY);
        assert!(matches!(
            opener.read_frame(&mut &garbage[..]).await,
            Err(FrameError::Io(_))
        ));
    }

    #[tokio::test]
    async fn client_frames_round_trip() {
        let mut bytes = Vec::new();
        push_client_frame(&mut bytes, b"hello").unwrap();
        write_client_frame(&mut bytes, b"world").await.unwrap();
        let mut reader = &bytes[..];
        assert_eq!(read_client_frame(&mut reader, 16).await.unwrap(), b"hello");
        assert_eq!(read_client_frame(&mut reader, 16).await.unwrap(), b"world");
        assert!(matches!(
            read_client_frame(&mut reader, 16).await,
            Err(FrameError::Closed)
        ));
    }
}
