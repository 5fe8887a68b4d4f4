//! A Merkle tree over a fixed number of partition digests: the digest of the abstract state
//! (DESIGN §5, paper 000 §2.2.2). It is kept incrementally: after `k` partitions change, the next
//! root costs about `k · log2(P)` hashes however large the state is, and a single partition can
//! be proven against an agreed root with `log2(P)` sibling digests (the Merkle-proof state
//! transfer strategy of issue 4).
//!
//! Leaves are bound to their position (the leaf hash covers the index), and leaves and inner
//! nodes hash under different domains, so no proof can pass one off as the other.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tessera_crypto::{Digest, DigestBuilder};
use thiserror::Error;

const LEAF_DOMAIN: &str = "tessera.merkle.leaf.v1";
const NODE_DOMAIN: &str = "tessera.merkle.node.v1";

/// The most partitions a tree may have: 2^24 leaves (a 1 TiB state in 64 KiB partitions), so a
/// proof never has more than 24 siblings and the tree never more than 2^25 digests.
pub const MAX_LEAVES: u64 = 1 << 24;

/// Why a tree cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MerkleError {
    /// The partition count must be a power of two between 1 and [`MAX_LEAVES`].
    #[error("partition count {0} must be a power of two between 1 and {MAX_LEAVES}")]
    BadLeafCount(u64),
    /// A leaf index beyond the tree.
    #[error("partition {index} is outside a tree of {leaves} partitions")]
    NoSuchLeaf {
        /// The index asked for.
        index: u64,
        /// The tree's partition count.
        leaves: u64,
    },
}

/// A Merkle tree over `leaves` partition digests (a power of two).
#[derive(Clone, Debug)]
pub struct MerkleTree {
    leaves: usize,
    /// A 1-based heap: `nodes[1]` is the root, the leaf hashes are `nodes[leaves..2 * leaves]`;
    /// `nodes[0]` is unused.
    nodes: Vec<Digest>,
    /// Heap positions of leaves changed since the root was last brought up to date.
    dirty: BTreeSet<usize>,
    /// Hashes computed by the last [`MerkleTree::root`] (how tests see the incremental cost).
    last_root_hashes: u64,
}

impl MerkleTree {
    /// A tree over `partitions` (their digests, in partition order).
    pub fn new(partitions: &[Digest]) -> Result<MerkleTree, MerkleError> {
        let count = partitions.len() as u64;
        if count == 0 || count > MAX_LEAVES || !count.is_power_of_two() {
            return Err(MerkleError::BadLeafCount(count));
        }
        let leaves = partitions.len();
        let mut nodes = vec![Digest([0; 32]); 2 * leaves];
        for (index, partition) in partitions.iter().enumerate() {
            nodes[leaves + index] = leaf_hash(index as u64, partition);
        }
        for position in (1..leaves).rev() {
            nodes[position] = node_hash(&nodes[2 * position], &nodes[2 * position + 1]);
        }
        Ok(MerkleTree {
            leaves,
            nodes,
            dirty: BTreeSet::new(),
            last_root_hashes: (2 * leaves - 1) as u64,
        })
    }

    /// The number of partitions.
    pub fn leaves(&self) -> u64 {
        self.leaves as u64
    }

    /// Records partition `index`'s new digest; the root is brought up to date lazily.
    pub fn update(&mut self, index: u64, partition: &Digest) -> Result<(), MerkleError> {
        let position = self.leaf_position(index)?;
        self.nodes[position] = leaf_hash(index, partition);
        self.dirty.insert(position);
        Ok(())
    }

    /// The root over the current partition digests, rehashing only the paths above partitions
    /// changed since the last call.
    pub fn root(&mut self) -> Digest {
        let mut hashes = 0;
        let mut level: BTreeSet<usize> = std::mem::take(&mut self.dirty);
        while !level.is_empty() && !level.contains(&1) {
            let parents: BTreeSet<usize> = level.iter().map(|position| position / 2).collect();
            for &parent in &parents {
                self.nodes[parent] =
                    node_hash(&self.nodes[2 * parent], &self.nodes[2 * parent + 1]);
                hashes += 1;
            }
            level = parents;
        }
        self.last_root_hashes = hashes;
        self.nodes[1]
    }

    /// Inner-node hashes the last [`MerkleTree::root`] computed.
    pub fn last_root_hashes(&self) -> u64 {
        self.last_root_hashes
    }

    /// The proof that partition `index` is a leaf of the current root.
    pub fn proof(&mut self, index: u64) -> Result<MerkleProof, MerkleError> {
        let mut position = self.leaf_position(index)?;
        self.root();
        let mut siblings = Vec::with_capacity(self.leaves.trailing_zeros() as usize);
        while position > 1 {
            siblings.push(self.nodes[position ^ 1]);
            position /= 2;
        }
        Ok(MerkleProof { index, siblings })
    }

    fn leaf_position(&self, index: u64) -> Result<usize, MerkleError> {
        if index >= self.leaves as u64 {
            return Err(MerkleError::NoSuchLeaf {
                index,
                leaves: self.leaves as u64,
            });
        }
        Ok(self.leaves + index as usize)
    }
}

/// The siblings on the path from one partition to the root, lowest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleProof {
    /// The partition proven.
    pub index: u64,
    /// Sibling digests from the leaf level up.
    pub siblings: Vec<Digest>,
}

impl MerkleProof {
    /// True if `partition` is the digest of partition `self.index` in a tree of `leaves`
    /// partitions whose root is `root`. Rejects proofs of the wrong length, so a proof for a
    /// smaller or larger tree never passes.
    pub fn verify(&self, root: &Digest, leaves: u64, partition: &Digest) -> bool {
        if leaves == 0 || leaves > MAX_LEAVES || !leaves.is_power_of_two() || self.index >= leaves {
            return false;
        }
        if self.siblings.len() != leaves.trailing_zeros() as usize {
            return false;
        }
        let mut position = leaves + self.index;
        let mut digest = leaf_hash(self.index, partition);
        for sibling in &self.siblings {
            digest = if position.is_multiple_of(2) {
                node_hash(&digest, sibling)
            } else {
                node_hash(sibling, &digest)
            };
            position /= 2;
        }
        digest == *root
    }
}

fn leaf_hash(index: u64, partition: &Digest) -> Digest {
    DigestBuilder::new(LEAF_DOMAIN)
        .u64(index)
        .digest(partition)
        .finish()
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    DigestBuilder::new(NODE_DOMAIN)
        .digest(left)
        .digest(right)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn partition(value: u64) -> Digest {
        Digest::of("test.partition", &value.to_le_bytes())
    }

    fn partitions(count: usize, salt: u64) -> Vec<Digest> {
        (0..count as u64)
            .map(|index| partition(index ^ salt))
            .collect()
    }

    #[test]
    fn rejects_counts_that_are_not_powers_of_two() {
        assert_eq!(
            MerkleTree::new(&[]).unwrap_err(),
            MerkleError::BadLeafCount(0)
        );
        assert_eq!(
            MerkleTree::new(&partitions(3, 0)).unwrap_err(),
            MerkleError::BadLeafCount(3)
        );
        assert!(MerkleTree::new(&partitions(1, 0)).is_ok());
        let mut tree = MerkleTree::new(&partitions(4, 0)).unwrap();
        assert_eq!(
            tree.update(4, &partition(9)).unwrap_err(),
            MerkleError::NoSuchLeaf {
                index: 4,
                leaves: 4
            }
        );
    }

    #[test]
    fn one_change_in_a_large_tree_rehashes_one_path() {
        let leaves = 1 << 16;
        let mut tree = MerkleTree::new(&partitions(leaves, 0)).unwrap();
        let before = tree.root();
        assert_eq!(
            tree.last_root_hashes(),
            0,
            "nothing changed since construction"
        );
        tree.update(12_345, &partition(u64::MAX)).unwrap();
        let after = tree.root();
        assert_ne!(before, after);
        assert_eq!(
            tree.last_root_hashes(),
            16,
            "one hash per level above the leaf"
        );
        tree.update(12_345, &partition(12_345)).unwrap();
        assert_eq!(
            tree.root(),
            before,
            "restoring the partition restores the root"
        );
    }

    #[test]
    fn the_root_depends_on_position() {
        let mut digests = partitions(8, 0);
        let straight = MerkleTree::new(&digests).unwrap().root();
        digests.swap(2, 5);
        let swapped = MerkleTree::new(&digests).unwrap().root();
        assert_ne!(straight, swapped);
    }

    #[test]
    fn proofs_fail_for_anything_else() {
        let mut tree = MerkleTree::new(&partitions(16, 7)).unwrap();
        let root = tree.root();
        let proof = tree.proof(5).unwrap();
        let right = partition(5 ^ 7);
        assert!(proof.verify(&root, 16, &right));
        assert!(!proof.verify(&root, 16, &partition(99)), "wrong partition");
        assert!(!proof.verify(&partition(1), 16, &right), "wrong root");
        assert!(!proof.verify(&root, 32, &right), "wrong tree size");
        assert!(!proof.verify(&root, 12, &right), "not a power of two");
        let moved = MerkleProof {
            index: 4,
            ..proof.clone()
        };
        assert!(!moved.verify(&root, 16, &right), "wrong position");
        let mut tampered = proof.clone();
        tampered.siblings[2] = partition(1);
        assert!(!tampered.verify(&root, 16, &right), "tampered sibling");
        let mut short = proof;
        short.siblings.pop();
        assert!(!short.verify(&root, 16, &right), "proof too short");
    }

    proptest! {
        /// Any sequence of updates leaves the same root as building the tree from scratch, and
        /// every partition's proof verifies against it.
        #[test]
        fn incremental_root_equals_a_full_rebuild(
            log_leaves in 0u32..8,
            updates in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
            roots_between in any::<bool>(),
        ) {
            let leaves = 1usize << log_leaves;
            let mut current = partitions(leaves, 1);
            let mut tree = MerkleTree::new(&current).unwrap();
            for (index, value) in updates {
                let index = index % leaves as u64;
                current[index as usize] = partition(value);
                tree.update(index, &current[index as usize]).unwrap();
                if roots_between {
                    tree.root();
                }
            }
            let root = tree.root();
            prop_assert_eq!(root, MerkleTree::new(&current).unwrap().root());
            for (index, digest) in current.iter().enumerate() {
                let proof = tree.proof(index as u64).unwrap();
                prop_assert!(proof.verify(&root, leaves as u64, digest));
            }
        }
    }
}
