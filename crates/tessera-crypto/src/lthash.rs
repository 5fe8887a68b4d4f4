//! A homomorphic set hash: the digest of a set is the lane-wise sum of its elements' hashes, so
//! adding or removing one element costs one element hash, whatever the size of the set.
//!
//! This is LtHash (Bellare and Micciancio, "A New Paradigm for Collision-free Hashing:
//! Incrementality at Reduced Cost", EUROCRYPT 1997) with the parameters Lewi et al. recommend
//! ("Securing Update Propagation with Homomorphic Hashing", IACR ePrint 2019/227): 1024 lanes of
//! 16 bits, each element expanded to 2048 bytes by an extendable-output hash (here BLAKE3's), sums
//! modulo 2^16 per lane. Finding two different sets with equal sums reduces to the short integer
//! solution problem on that lattice; the paper estimates at least 200 bits of security.
//!
//! Tessera uses it for partition digests of the abstract state (`docs/STATE.md`): a checkpoint
//! then costs time proportional to what changed, not to the state. Two caveats shape its use:
//! - It hashes *sets*: the same element added 2^16 times cancels out. Callers hash elements that
//!   are unique by construction (a key-value pair, keyed by its key, appears at most once).
//! - The sum is not itself a digest to publish: [`LtHash::digest`] hashes it down to 32 bytes
//!   under a caller-chosen domain, so digests of different kinds never collide.
//!
//! It is written here (some 60 lines over `blake3`) because the crates that offer it are either
//! single-release projects or pull a whole cryptography framework; nothing else is hand-made.

use crate::{Digest, DigestBuilder};

/// Lanes of the sum.
pub const LANES: usize = 1024;
/// Bytes an element hash expands to (two per lane).
pub const ELEMENT_BYTES: usize = 2 * LANES;

/// The running sum of a set's element hashes.
#[derive(Clone, PartialEq, Eq)]
pub struct LtHash {
    lanes: Box<[u16; LANES]>,
}

impl Default for LtHash {
    fn default() -> Self {
        LtHash::new()
    }
}

impl std::fmt::Debug for LtHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "LtHash({})", self.digest("tessera.lthash.debug"))
    }
}

impl LtHash {
    /// The hash of the empty set.
    pub fn new() -> LtHash {
        LtHash {
            lanes: Box::new([0; LANES]),
        }
    }

    /// Adds an element: the hasher's domain separates element kinds, `parts` are
    /// length-prefixed so that `("ab", "c")` and `("a", "bc")` are different elements.
    pub fn add(&mut self, hasher: &ElementHasher, parts: &[&[u8]]) {
        let expanded = hasher.expand(parts);
        for (lane, chunk) in self.lanes.iter_mut().zip(expanded.chunks_exact(2)) {
            *lane = lane.wrapping_add(u16::from_le_bytes([chunk[0], chunk[1]]));
        }
    }

    /// Removes an element added before with the same hasher and `parts`.
    pub fn remove(&mut self, hasher: &ElementHasher, parts: &[&[u8]]) {
        let expanded = hasher.expand(parts);
        for (lane, chunk) in self.lanes.iter_mut().zip(expanded.chunks_exact(2)) {
            *lane = lane.wrapping_sub(u16::from_le_bytes([chunk[0], chunk[1]]));
        }
    }

    /// True for the empty set's sum (or a set whose sum wrapped to zero, which finding is as
    /// hard as finding a collision).
    pub fn is_zero(&self) -> bool {
        self.lanes.iter().all(|lane| *lane == 0)
    }

    /// The sum as bytes (little-endian lanes).
    pub fn to_bytes(&self) -> [u8; ELEMENT_BYTES] {
        let mut bytes = [0u8; ELEMENT_BYTES];
        for (pair, lane) in bytes.chunks_exact_mut(2).zip(self.lanes.iter()) {
            pair.copy_from_slice(&lane.to_le_bytes());
        }
        bytes
    }

    /// A 32-byte digest of the sum under `domain`.
    pub fn digest(&self, domain: &str) -> Digest {
        let mut builder = DigestBuilder::new(domain);
        builder.bytes(&self.to_bytes());
        builder.finish()
    }
}

/// Expands elements of one kind (one domain) to their [`ELEMENT_BYTES`]-byte hashes. Built once
/// per domain: deriving the domain's key costs as much as hashing a small element.
#[derive(Clone)]
pub struct ElementHasher {
    keyed: blake3::Hasher,
}

impl ElementHasher {
    /// Elements of the kind `domain` (BLAKE3's key derivation from the domain string).
    pub fn new(domain: &str) -> ElementHasher {
        ElementHasher {
            keyed: blake3::Hasher::new_derive_key(domain),
        }
    }

    fn expand(&self, parts: &[&[u8]]) -> [u8; ELEMENT_BYTES] {
        let mut hasher = self.keyed.clone();
        hasher.update(&(parts.len() as u64).to_le_bytes());
        for part in parts {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let mut expanded = [0u8; ELEMENT_BYTES];
        hasher.finalize_xof().fill(&mut expanded);
        expanded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "tessera.lthash.test";

    fn hasher() -> ElementHasher {
        ElementHasher::new(DOMAIN)
    }

    fn of(elements: &[(&[u8], &[u8])]) -> LtHash {
        let mut hash = LtHash::new();
        for (key, value) in elements {
            hash.add(&hasher(), &[key, value]);
        }
        hash
    }

    #[test]
    fn order_does_not_matter_and_removal_undoes_addition() {
        let forward = of(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]);
        let backward = of(&[(b"c", b"3"), (b"b", b"2"), (b"a", b"1")]);
        assert_eq!(forward, backward);
        let mut shrunk = forward.clone();
        shrunk.remove(&hasher(), &[b"b", b"2"]);
        assert_eq!(shrunk, of(&[(b"a", b"1"), (b"c", b"3")]));
        shrunk.remove(&hasher(), &[b"a", b"1"]);
        shrunk.remove(&hasher(), &[b"c", b"3"]);
        assert!(shrunk.is_zero());
        assert_eq!(shrunk, LtHash::new());
    }

    #[test]
    fn elements_are_length_prefixed_and_domain_separated() {
        assert_ne!(of(&[(b"ab", b"c")]), of(&[(b"a", b"bc")]));
        let mut other_domain = LtHash::new();
        other_domain.add(&ElementHasher::new("tessera.lthash.other"), &[b"ab", b"c"]);
        assert_ne!(other_domain, of(&[(b"ab", b"c")]));
        assert_ne!(of(&[(b"k", b"v")]), of(&[(b"k", b"w")]));
    }

    #[test]
    fn digests_depend_on_the_sum_and_the_domain() {
        let one = of(&[(b"k", b"v")]);
        assert_eq!(one.digest("d1"), of(&[(b"k", b"v")]).digest("d1"));
        assert_ne!(one.digest("d1"), one.digest("d2"));
        assert_ne!(one.digest("d1"), LtHash::new().digest("d1"));
    }

    proptest::proptest! {
        /// Any sequence of insertions and removals ends at the sum of the final set, however
        /// it got there.
        #[test]
        fn incremental_sum_equals_the_final_set(
            operations in proptest::collection::vec((0u8..16, 0u8..4, proptest::bool::ANY), 0..64)
        ) {
            let mut map = std::collections::BTreeMap::new();
            let mut incremental = LtHash::new();
            for (key, value, insert) in operations {
                if let Some(old) = map.remove(&key) {
                    incremental.remove(&hasher(), &[&[key], &[old]]);
                }
                if insert {
                    map.insert(key, value);
                    incremental.add(&hasher(), &[&[key], &[value]]);
                }
            }
            let mut fresh = LtHash::new();
            for (key, value) in map.iter().rev() {
                fresh.add(&hasher(), &[&[*key], &[*value]]);
            }
            proptest::prop_assert_eq!(incremental, fresh);
        }
    }
}
