//! Collision-resistant digests with domain separation.
//!
//! Every digest in Tessera is BLAKE3 over a domain string followed by length-prefixed parts,
//! so two different structures can never hash the same bytes by accident (no ambiguity between
//! `("ab", "c")` and `("a", "bc")`, nor between a PREPARE and a COMMIT).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Length of every digest, in bytes.
pub const DIGEST_LEN: usize = 32;

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// The all-zero digest, used only as an explicit "nothing" marker (e.g. an empty batch slot).
    pub const ZERO: Digest = Digest([0u8; DIGEST_LEN]);

    /// Digest of a single byte string under `domain`.
    pub fn of(domain: &str, bytes: &[u8]) -> Digest {
        let mut builder = DigestBuilder::new(domain);
        builder.bytes(bytes);
        builder.finish()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// Lower-case hex, for logs and status output.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits identify a digest in logs and test failures without flooding them.
        write!(formatter, "Digest({}…)", &self.to_hex()[..8])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

/// Incremental builder: a domain string, then any number of length-prefixed parts.
pub struct DigestBuilder {
    hasher: blake3::Hasher,
}

impl DigestBuilder {
    /// Starts a digest in `domain` (e.g. `"tessera.prepare.v1"`).
    pub fn new(domain: &str) -> DigestBuilder {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(domain.len() as u64).to_le_bytes());
        hasher.update(domain.as_bytes());
        DigestBuilder { hasher }
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
        self
    }

    /// Appends a fixed-width integer.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.hasher.update(&value.to_le_bytes());
        self
    }

    /// Appends another digest.
    pub fn digest(&mut self, digest: &Digest) -> &mut Self {
        self.hasher.update(&digest.0);
        self
    }

    /// Finishes the digest.
    pub fn finish(&self) -> Digest {
        Digest(*self.hasher.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefix_prevents_concatenation_ambiguity() {
        let mut left = DigestBuilder::new("test");
        left.bytes(b"ab").bytes(b"c");
        let mut right = DigestBuilder::new("test");
        right.bytes(b"a").bytes(b"bc");
        assert_ne!(left.finish(), right.finish());
    }

    #[test]
    fn domains_separate_identical_payloads() {
        assert_ne!(Digest::of("one", b"x"), Digest::of("two", b"x"));
        assert_eq!(Digest::of("one", b"x"), Digest::of("one", b"x"));
    }
}
