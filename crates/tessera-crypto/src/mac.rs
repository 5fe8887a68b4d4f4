//! Keyed hashes (BLAKE3 in keyed mode) and key derivation.
//!
//! This module owns the cheap authenticators: the 16-byte per-replica MACs in client requests
//! and the keyed hashes other crates build on. It must never compare tags with `==`: a
//! timing-dependent comparison lets an attacker guess a tag byte by byte.

use crate::digest::Digest;
use subtle::ConstantTimeEq;

/// Length of a truncated MAC tag, in bytes. 128 bits is ample against forgery online, where
/// every guess costs the attacker a message the replica rejects.
pub const MAC16_LEN: usize = 16;

/// BLAKE3 keyed hash of `digest`'s bytes, truncated to [`MAC16_LEN`] bytes.
pub fn mac16(key: &[u8; 32], digest: &Digest) -> [u8; MAC16_LEN] {
    let full = keyed_hash(key, digest.as_bytes());
    let mut tag = [0u8; MAC16_LEN];
    tag.copy_from_slice(&full[..MAC16_LEN]);
    tag
}

/// Checks `tag` against [`mac16`] of `digest` in constant time.
pub fn verify_mac16(key: &[u8; 32], digest: &Digest, tag: &[u8; MAC16_LEN]) -> bool {
    constant_time_eq(&mac16(key, digest), tag)
}

/// BLAKE3 keyed hash of arbitrary bytes (full 32-byte output).
pub fn keyed_hash(key: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(key, bytes).as_bytes()
}

/// Derives a 32-byte key from `key_material` for the purpose named by `context`.
///
/// `context` must be a hard-coded, globally unique string (e.g. `"tessera 2026 client mac v1"`),
/// never data from outside: distinct contexts give independent keys from the same material.
pub fn derive_key(context: &str, key_material: &[u8]) -> [u8; 32] {
    blake3::derive_key(context, key_material)
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    // `subtle` returns false for unequal lengths without looking at the contents; lengths are
    // public here (fixed-size tags), so that early exit leaks nothing.
    left.ct_eq(right).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const OTHER_KEY: [u8; 32] = [8u8; 32];

    fn message() -> Digest {
        Digest::of("tessera.test.v1", b"hello")
    }

    #[test]
    fn mac16_round_trips() {
        let tag = mac16(&KEY, &message());
        assert!(verify_mac16(&KEY, &message(), &tag));
    }

    #[test]
    fn mac16_is_deterministic_and_a_prefix_of_the_keyed_hash() {
        let tag = mac16(&KEY, &message());
        assert_eq!(tag, mac16(&KEY, &message()));
        assert_eq!(
            &tag[..],
            &keyed_hash(&KEY, message().as_bytes())[..MAC16_LEN]
        );
    }

    #[test]
    fn mac16_rejects_wrong_key() {
        let tag = mac16(&KEY, &message());
        assert!(!verify_mac16(&OTHER_KEY, &message(), &tag));
    }

    #[test]
    fn mac16_rejects_wrong_message() {
        let tag = mac16(&KEY, &message());
        assert!(!verify_mac16(
            &KEY,
            &Digest::of("tessera.test.v1", b"hellp"),
            &tag
        ));
    }

    #[test]
    fn mac16_rejects_every_single_bit_flip() {
        let tag = mac16(&KEY, &message());
        for byte in 0..MAC16_LEN {
            for bit in 0..8 {
                let mut tampered = tag;
                tampered[byte] ^= 1 << bit;
                assert!(
                    !verify_mac16(&KEY, &message(), &tampered),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn keyed_hash_depends_on_key_and_bytes() {
        assert_ne!(keyed_hash(&KEY, b"a"), keyed_hash(&OTHER_KEY, b"a"));
        assert_ne!(keyed_hash(&KEY, b"a"), keyed_hash(&KEY, b"b"));
        assert_eq!(keyed_hash(&KEY, b"a"), keyed_hash(&KEY, b"a"));
    }

    #[test]
    fn derive_key_separates_contexts() {
        let first = derive_key("tessera test context one", b"material");
        let second = derive_key("tessera test context two", b"material");
        assert_ne!(first, second);
        assert_eq!(first, derive_key("tessera test context one", b"material"));
        assert_ne!(first, derive_key("tessera test context one", b"materiaL"));
    }

    #[test]
    fn constant_time_eq_handles_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
