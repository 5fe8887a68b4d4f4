//! The interface a replicated service implements.
//!
//! Besides executing operations, a service exposes its state as an *abstract state* (paper 000
//! §2.2.2; `docs/STATE.md`): a fixed number of partitions that every correct replica computes
//! identically however it stores its data. The state digest is the root of a Merkle tree
//! (`crate::merkle`) over the partition digests, so replicas agree on checkpoints without
//! comparing data, a lagging replica fetches only the partitions whose digest differs from the
//! agreed one, and it checks each against that digest before using it.

use tessera_crypto::Digest;
use thiserror::Error;

/// A deterministic service replicated by Tessera.
///
/// Determinism is the contract: given the same sequence of `execute` calls, every replica must
/// return the same results and reach a state with the same partition digests, whatever its
/// platform, allocator or storage engine. No method may panic on any input: a malformed
/// operation produces an error *result*, which is replicated like any other result, and
/// malformed partition bytes produce a [`RestoreError`].
pub trait StateMachine: Send + 'static {
    /// A read-only copy of the whole state as of one moment (a checkpoint). Taking it must be
    /// cheap (copy-on-write): a replica takes one at every checkpoint and keeps it until a
    /// later checkpoint is stable, to serve it to replicas that fetch it.
    type Frozen: FrozenState;
    /// A partition being received, chunk by chunk, and checked as it arrives.
    type Staged: StagedPartition;

    /// Applies one operation and returns its result. `time_ms` is the agreed time of the batch
    /// the operation belongs to (milliseconds since the Unix epoch): the same on every replica,
    /// never smaller than the time of an earlier batch, and the only notion of time a service
    /// may use (docs/PROTOCOL.md §4, *Agreed time*). A service must not read a clock.
    fn execute(&mut self, operation: &[u8], time_ms: u64) -> Vec<u8>;

    /// The number of partitions: a power of two, the same on every replica for the life of the
    /// service.
    fn partition_count(&self) -> u32;

    /// The current digest of partition `index` (`index < partition_count()`).
    fn partition_digest(&self, index: u32) -> Digest;

    /// The digest of the whole state: the root of the Merkle tree (`crate::merkle::MerkleTree`)
    /// over the partition digests in index order. Called at every checkpoint, so it should
    /// cost time proportional to what changed since the previous call, not to the state.
    fn digest(&self) -> Digest;

    /// A frozen copy of the current state.
    fn freeze(&mut self) -> Self::Frozen;

    /// An empty partition `index` to receive chunks into (checked against this service's own
    /// limits as they arrive).
    fn stage(&self, index: u32) -> Self::Staged;

    /// Replaces the given partitions, each completely received, at once. On error nothing
    /// changes (for example when the new state would exceed this replica's size limit).
    fn install(&mut self, partitions: Vec<Self::Staged>) -> Result<(), RestoreError>;
}

/// A read-only copy of a service's state, served in chunks to replicas that fetch it.
pub trait FrozenState: Clone + Send + 'static {
    /// The number of partitions.
    fn partition_count(&self) -> u32;

    /// The digest of partition `index` in this copy.
    fn partition_digest(&self, index: u32) -> Digest;

    /// The chunk of partition `index` that starts at `cursor` (`None`: at the beginning), about
    /// `budget` bytes long but always holding progress if any is left, and the cursor of the
    /// next chunk (`None` after the last). Cursors are opaque to the caller; an invalid one (a
    /// faulty requester's) yields an empty last chunk, never a panic.
    fn chunk(&self, index: u32, cursor: Option<&[u8]>, budget: usize) -> Chunk;
}

/// One piece of a partition on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The service's encoding of part of the partition.
    pub bytes: Vec<u8>,
    /// Where the next chunk starts; `None` if this was the last.
    pub next: Option<Vec<u8>>,
}

/// A partition being received: chunks are appended in order and checked as they arrive (bytes
/// from the network are untrusted), and the digest of what was received is known at the end.
pub trait StagedPartition: Send + 'static {
    /// The partition index.
    fn index(&self) -> u32;

    /// Appends the next chunk and returns how many items (entries) it held. An error means the
    /// sender is faulty (or its bytes are not this service's encoding); the staged partition
    /// must then be discarded. A chunk of no items that is not the last is a faulty sender's
    /// way to stall the transfer; the caller refuses it.
    fn append(&mut self, chunk: &[u8]) -> Result<u64, RestoreError>;

    /// The digest of everything appended, as [`StateMachine::partition_digest`] would compute
    /// it once installed.
    fn digest(&self) -> Digest;

    /// Bytes held (to bound what a transfer keeps in memory).
    fn bytes(&self) -> u64;
}

/// Partition bytes that could not be accepted.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot restore state: {0}")]
pub struct RestoreError(pub String);
