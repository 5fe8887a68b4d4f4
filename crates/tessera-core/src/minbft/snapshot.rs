//! A replica's whole state as bytes, so a driver can keep a snapshot instead of every input
//! since the beginning (its write-ahead log then only holds the inputs after the snapshot).
//!
//! A snapshot must be *exact*: a replica restored from it and fed the same later inputs must
//! say and do exactly what the original says and does, or a restart could contradict messages
//! sent before it. Two things make that checkable rather than hoped for:
//! - [`Replica::snapshot`] destructures the replica without `..`, so a field added later does
//!   not compile until someone decides how it is saved;
//! - the simulator restores replicas from snapshots in the middle of runs and compares them with
//!   the originals (`tessera-sim`), and a unit test runs a restored replica beside its original
//!   and compares every action.
//!
//! The application states (the live one and the frozen ones kept for checkpoints) are saved
//! through the [`StateMachine`]'s partition interface, the same one state transfer uses: each
//! partition as the chunks its frozen copy serves, stored once per distinct partition digest
//! (checkpoints a few thousand requests apart share most partitions). Restoring stages and
//! checks every partition against its digest and installs only the partitions that differ from
//! what the state machine already holds, so the frozen copies share what they have in common.
//!
//! What a snapshot does not hold: the USIG and the request authenticator (the driver supplies
//! them; the USIG must resume after [`Replica::snapshot_usig_counter`]), the rejection counters
//! (metrics), and a state transfer in progress ([`Replica::can_snapshot`] is false during one).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use tessera_crypto::Digest;
use tessera_types::{
    Checkpoint, CheckpointCertificate, ClientId, ConfigError, FrozenState, LogEntry, NewView,
    ProtocolConfig, ReplicaId, ReplicaMessage, Request, SeqNum, StagedPartition, StateMachine,
    View, ViewChange,
};
use tessera_usig::Usig;
use thiserror::Error;

use super::transfer::CheckpointState;
use super::view_change::NewViewPlan;
use super::{ClientTable, PeerStream, Replica, Slot};
use crate::auth::RequestAuthenticator;

/// Bytes per chunk when a partition is saved.
const CHUNK_BYTES: usize = 1 << 20;
/// Bumped when the layout changes.
const SNAPSHOT_VERSION: u32 = 2;

/// Why a snapshot could not be restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The bytes are not a snapshot this code wrote.
    #[error("the snapshot does not decode: {0}")]
    Malformed(String),
    /// The snapshot was written by code of another snapshot version (not damage: run the
    /// executable that wrote it).
    #[error("the snapshot has version {found}; this code reads version {reads}")]
    Version {
        /// The snapshot's version.
        found: u32,
        /// The version this code reads.
        reads: u32,
    },
    /// The snapshot is of another replica or another protocol configuration.
    #[error("the snapshot is of {what}, not of this replica")]
    Mismatch {
        /// What differs.
        what: String,
    },
    /// A partition does not match its recorded digest, or the state machine refused it.
    #[error("the snapshot's application state does not restore: {0}")]
    State(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A frozen checkpoint state, with its application state replaced by an index into the
/// snapshot's states.
#[derive(Serialize, Deserialize)]
struct SavedCheckpointState {
    digest: Digest,
    state: usize,
    #[serde(with = "serde_bytes")]
    clients: Vec<u8>,
    epochs: Vec<tessera_types::EpochInstall>,
}

/// The application states of a snapshot.
#[derive(Serialize, Deserialize, Default)]
struct SavedStates {
    /// Partition contents by partition digest: the chunks a frozen copy served.
    partitions: BTreeMap<Digest, Vec<serde_bytes::ByteBuf>>,
    /// Per state, the digest of each partition in index order.
    states: Vec<Vec<Digest>>,
}

impl SavedStates {
    fn save<F: FrozenState>(&mut self, frozen: &F) -> usize {
        let mut digests = Vec::with_capacity(frozen.partition_count() as usize);
        for index in 0..frozen.partition_count() {
            let digest = frozen.partition_digest(index);
            self.partitions.entry(digest).or_insert_with(|| {
                let mut chunks = Vec::new();
                let mut cursor: Option<Vec<u8>> = None;
                loop {
                    let chunk = frozen.chunk(index, cursor.as_deref(), CHUNK_BYTES);
                    chunks.push(serde_bytes::ByteBuf::from(chunk.bytes));
                    match chunk.next {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                chunks
            });
            digests.push(digest);
        }
        self.states.push(digests);
        self.states.len() - 1
    }

    /// Turns `state_machine` into saved state `index` (installing only the partitions that
    /// differ) and returns a frozen copy of it.
    fn restore<S: StateMachine>(
        &self,
        state_machine: &mut S,
        index: usize,
    ) -> Result<S::Frozen, SnapshotError> {
        let digests = self
            .states
            .get(index)
            .ok_or_else(|| SnapshotError::Malformed(format!("no saved state {index}")))?;
        if digests.len() != state_machine.partition_count() as usize {
            return Err(SnapshotError::State(format!(
                "{} partitions saved, the state machine has {}",
                digests.len(),
                state_machine.partition_count()
            )));
        }
        let mut staged = Vec::new();
        for (partition, digest) in digests.iter().enumerate() {
            let partition = partition as u32;
            if state_machine.partition_digest(partition) == *digest {
                continue;
            }
            let chunks = self.partitions.get(digest).ok_or_else(|| {
                SnapshotError::Malformed(format!("partition {partition} is missing"))
            })?;
            let mut receiving = state_machine.stage(partition);
            for chunk in chunks {
                receiving
                    .append(chunk)
                    .map_err(|error| SnapshotError::State(error.to_string()))?;
            }
            if receiving.digest() != *digest {
                return Err(SnapshotError::State(format!(
                    "partition {partition} does not match its digest"
                )));
            }
            staged.push(receiving);
        }
        state_machine
            .install(staged)
            .map_err(|error| SnapshotError::State(error.to_string()))?;
        Ok(state_machine.freeze())
    }
}

/// Everything of a [`Replica`] but its USIG, authenticator, actions and metrics.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    id: ReplicaId,
    config: ProtocolConfig,
    usig_epoch: u64,
    usig_counter: u64,
    now_ms: u64,
    wall_ms: u64,
    time_floor_ms: u64,
    live_state: usize,
    states: SavedStates,

    view: View,
    view_active: bool,
    view_change_attempts: u32,
    suspicions: Vec<View>,
    view_change_pool: BTreeMap<View, BTreeMap<ReplicaId, Arc<ViewChange>>>,
    new_views: BTreeMap<View, Arc<NewView>>,
    view_plan: Option<Arc<NewViewPlan>>,
    view_start: (u64, u64),
    last_fetch_new_view_ms: Option<u64>,
    next_prepare_seq: SeqNum,
    primary_faulty: bool,

    slots: BTreeMap<SeqNum, Slot>,
    early_votes: BTreeMap<(View, SeqNum), BTreeMap<ReplicaId, Digest>>,

    last_executed: SeqNum,
    executed_digests: BTreeMap<SeqNum, (Digest, u64)>,
    clients: ClientTable,
    requests_executed: u64,
    last_progress_ms: u64,
    suspected_at_ms: u64,

    genesis_digest: Digest,
    stable: CheckpointCertificate,
    stable_state: SavedCheckpointState,
    retired_state: Option<(SeqNum, SavedCheckpointState)>,
    stable_state_seq: SeqNum,
    own_checkpoints: BTreeMap<SeqNum, SavedCheckpointState>,
    checkpoint_votes: BTreeMap<SeqNum, BTreeMap<ReplicaId, Checkpoint>>,

    own_log: VecDeque<LogEntry>,
    retransmit: BTreeMap<u64, ReplicaMessage>,
    peer_acknowledged: Vec<u64>,
    peer_processed: Vec<Vec<u64>>,
    own_max_seq: SeqNum,
    announced_epoch: Option<tessera_types::EpochStart>,

    streams: Vec<PeerStream>,
    store: BTreeMap<(ReplicaId, u64), ReplicaMessage>,
    state_request_ms: Option<u64>,
    transfer_blacklist: BTreeSet<ReplicaId>,
    claimed_checkpoints: Vec<SeqNum>,

    pending: VecDeque<Request>,
    pending_keys: BTreeSet<(ClientId, u64)>,
    waiting: BTreeMap<ClientId, (u64, u64)>,
}

/// A replica captured for a snapshot but not yet encoded: the protocol state copied and the
/// application states frozen (copy-on-write, cheap to take). Encoding — the part proportional to
/// the state — can then run on another thread ([`Capture::encode`]).
pub struct Capture<F> {
    saved: Saved,
    /// The frozen application states; `saved` refers to them by index.
    frozen: Vec<F>,
}

impl<F: FrozenState> Capture<F> {
    /// The snapshot's bytes (what [`Replica::restore`] reads).
    pub fn encode(self) -> Vec<u8> {
        let Capture { mut saved, frozen } = self;
        for (index, state) in frozen.iter().enumerate() {
            let saved_index = saved.states.save(state);
            debug_assert_eq!(saved_index, index);
        }
        // Sized up front: the partitions are nearly all of it, and a 1 GiB state grown by
        // doubling would be copied several times over.
        let partition_bytes: usize = saved
            .states
            .partitions
            .values()
            .flatten()
            .map(|chunk| chunk.len() + 10)
            .sum();
        tessera_types::encode_with_capacity(&saved, partition_bytes + (1 << 20))
    }
}

fn capture_checkpoint<F: FrozenState>(
    frozen: &mut Vec<F>,
    checkpoint: &CheckpointState<F>,
) -> SavedCheckpointState {
    frozen.push(checkpoint.frozen.clone());
    SavedCheckpointState {
        digest: checkpoint.digest,
        state: frozen.len() - 1,
        clients: checkpoint.clients.as_ref().clone(),
        epochs: checkpoint.epochs.clone(),
    }
}

impl<S: StateMachine> Replica<S> {
    /// False while the replica holds something a snapshot cannot (a state transfer in
    /// progress, or actions not yet taken); the driver then tries again later.
    pub fn can_snapshot(&self) -> bool {
        self.transfer.is_none() && self.actions.is_empty()
    }

    /// The USIG counter a snapshot taken now would resume after.
    pub fn snapshot_usig_counter(&self) -> u64 {
        self.head_counter()
    }

    /// The replica as bytes (see the module documentation). Panics unless
    /// [`Replica::can_snapshot`].
    pub fn snapshot(&mut self) -> Vec<u8> {
        self.capture().encode()
    }

    /// The replica captured for a snapshot, to be encoded later, possibly on another thread.
    /// Panics unless [`Replica::can_snapshot`].
    pub fn capture(&mut self) -> Capture<S::Frozen> {
        assert!(
            self.can_snapshot(),
            "snapshot while a transfer or actions are pending"
        );
        let usig_counter = self.head_counter();
        let usig_epoch = self.epoch();
        let mut frozen = vec![self.state_machine.freeze()];
        // Every field is named, so a new one does not compile until it is saved here (or
        // consciously left out, like the ones bound to `_`).
        let Replica {
            id,
            config,
            quorum: _,
            usig: _,
            authenticator: _,
            state_machine: _,
            actions: _,
            now_ms,
            wall_ms,
            time_floor_ms,
            rejections: _,
            restart_on_usig_gap: _,
            transfer_bytes_received: _,
            transfers_installed: _,
            view,
            view_active,
            view_change_attempts,
            suspicions,
            view_change_pool,
            new_views,
            view_plan,
            view_start,
            last_fetch_new_view_ms,
            next_prepare_seq,
            primary_faulty,
            slots,
            early_votes,
            last_executed,
            executed_digests,
            clients,
            requests_executed,
            last_progress_ms,
            suspected_at_ms,
            genesis_digest,
            stable,
            stable_state,
            retired_state,
            stable_state_seq,
            own_checkpoints,
            checkpoint_votes,
            own_log,
            retransmit,
            peer_acknowledged,
            peer_processed,
            own_max_seq,
            announced_epoch,
            streams,
            store,
            state_request_ms,
            transfer: _,
            transfer_blacklist,
            claimed_checkpoints,
            pending,
            pending_keys,
            waiting,
            #[cfg(feature = "planted-bugs")]
                planted: _,
        } = self;
        let live_state = 0;
        let saved = Saved {
            version: SNAPSHOT_VERSION,
            id: *id,
            config: config.clone(),
            usig_epoch,
            usig_counter,
            now_ms: *now_ms,
            wall_ms: *wall_ms,
            time_floor_ms: *time_floor_ms,
            live_state,
            view: *view,
            view_active: *view_active,
            view_change_attempts: *view_change_attempts,
            suspicions: suspicions.clone(),
            view_change_pool: view_change_pool.clone(),
            new_views: new_views.clone(),
            view_plan: view_plan.clone(),
            view_start: *view_start,
            last_fetch_new_view_ms: *last_fetch_new_view_ms,
            next_prepare_seq: *next_prepare_seq,
            primary_faulty: *primary_faulty,
            slots: slots.clone(),
            early_votes: early_votes.clone(),
            last_executed: *last_executed,
            executed_digests: executed_digests.clone(),
            clients: clients.clone(),
            requests_executed: *requests_executed,
            last_progress_ms: *last_progress_ms,
            suspected_at_ms: *suspected_at_ms,
            genesis_digest: *genesis_digest,
            stable: stable.clone(),
            stable_state: capture_checkpoint(&mut frozen, stable_state),
            retired_state: retired_state
                .as_ref()
                .map(|(seq, state)| (*seq, capture_checkpoint(&mut frozen, state))),
            stable_state_seq: *stable_state_seq,
            own_checkpoints: own_checkpoints
                .iter()
                .map(|(seq, state)| (*seq, capture_checkpoint(&mut frozen, state)))
                .collect(),
            checkpoint_votes: checkpoint_votes.clone(),
            own_log: own_log.clone(),
            retransmit: retransmit.clone(),
            peer_acknowledged: peer_acknowledged.clone(),
            peer_processed: peer_processed.clone(),
            own_max_seq: *own_max_seq,
            announced_epoch: announced_epoch.clone(),
            streams: streams.clone(),
            store: store.clone(),
            state_request_ms: *state_request_ms,
            transfer_blacklist: transfer_blacklist.clone(),
            claimed_checkpoints: claimed_checkpoints.clone(),
            pending: pending.clone(),
            // Sorted, so the bytes do not depend on a hash seed.
            pending_keys: pending_keys.iter().copied().collect(),
            waiting: waiting.clone(),
            states: SavedStates::default(),
        };
        Capture { saved, frozen }
    }

    /// Rebuilds a replica from [`Replica::snapshot`]'s bytes. `usig` must continue after
    /// `usig_counter` (see [`saved_usig_counter`]), and `state_machine` must be empty and
    /// configured like the original's.
    pub fn restore(
        id: ReplicaId,
        config: ProtocolConfig,
        usig: Box<dyn Usig>,
        authenticator: Box<dyn RequestAuthenticator>,
        mut state_machine: S,
        bytes: &[u8],
    ) -> Result<Replica<S>, SnapshotError> {
        config.validate()?;
        let saved: Saved = decode_saved(bytes)?;
        let Saved {
            version: _,
            id: saved_id,
            config: saved_config,
            usig_epoch,
            usig_counter: _,
            now_ms,
            wall_ms,
            time_floor_ms,
            live_state,
            states,
            view,
            view_active,
            view_change_attempts,
            suspicions,
            view_change_pool,
            new_views,
            view_plan,
            view_start,
            last_fetch_new_view_ms,
            next_prepare_seq,
            primary_faulty,
            slots,
            early_votes,
            last_executed,
            executed_digests,
            clients,
            requests_executed,
            last_progress_ms,
            suspected_at_ms,
            genesis_digest,
            stable,
            stable_state,
            retired_state,
            stable_state_seq,
            own_checkpoints,
            checkpoint_votes,
            own_log,
            retransmit,
            peer_acknowledged,
            peer_processed,
            own_max_seq,
            announced_epoch,
            streams,
            store,
            state_request_ms,
            transfer_blacklist,
            claimed_checkpoints,
            pending,
            pending_keys,
            waiting,
        } = saved;
        if saved_id != id {
            return Err(SnapshotError::Mismatch {
                what: format!("replica {saved_id}"),
            });
        }
        if saved_config != config {
            return Err(SnapshotError::Mismatch {
                what: "another protocol configuration".into(),
            });
        }
        if usig.identity().epoch != usig_epoch {
            return Err(SnapshotError::Mismatch {
                what: format!("USIG epoch {usig_epoch}"),
            });
        }
        let n = config.n as usize;
        if suspicions.len() != n
            || streams.len() != n
            || peer_acknowledged.len() != n
            || peer_processed.len() != n
            || claimed_checkpoints.len() != n
        {
            return Err(SnapshotError::Malformed(
                "per-replica tables do not have n entries".into(),
            ));
        }
        let mut restore_checkpoint =
            |saved: SavedCheckpointState| -> Result<CheckpointState<S::Frozen>, SnapshotError> {
                Ok(CheckpointState {
                    digest: saved.digest,
                    frozen: states.restore(&mut state_machine, saved.state)?,
                    clients: Arc::new(saved.clients),
                    epochs: saved.epochs,
                })
            };
        let stable_state = restore_checkpoint(stable_state)?;
        let retired_state = match retired_state {
            Some((seq, saved)) => Some((seq, restore_checkpoint(saved)?)),
            None => None,
        };
        let own_checkpoints = own_checkpoints
            .into_iter()
            .map(|(seq, saved)| Ok((seq, restore_checkpoint(saved)?)))
            .collect::<Result<BTreeMap<_, _>, SnapshotError>>()?;
        // The live state last: the state machine stays in it.
        states.restore(&mut state_machine, live_state)?;
        Ok(Replica {
            id,
            quorum: config.quorum(),
            config,
            usig,
            authenticator,
            state_machine,
            actions: Vec::new(),
            now_ms,
            wall_ms,
            time_floor_ms,
            rejections: BTreeMap::new(),
            restart_on_usig_gap: true,
            transfer_bytes_received: 0,
            transfers_installed: 0,
            view,
            view_active,
            view_change_attempts,
            suspicions,
            view_change_pool,
            new_views,
            view_plan,
            view_start,
            last_fetch_new_view_ms,
            next_prepare_seq,
            primary_faulty,
            slots,
            early_votes,
            last_executed,
            executed_digests,
            clients,
            requests_executed,
            last_progress_ms,
            suspected_at_ms,
            genesis_digest,
            stable,
            stable_state,
            retired_state,
            stable_state_seq,
            own_checkpoints,
            checkpoint_votes,
            own_log,
            retransmit,
            peer_acknowledged,
            peer_processed,
            own_max_seq,
            announced_epoch,
            streams,
            store,
            state_request_ms,
            transfer: None,
            transfer_blacklist,
            claimed_checkpoints,
            pending,
            pending_keys: pending_keys.into_iter().collect::<HashSet<_>>(),
            waiting,
            #[cfg(feature = "planted-bugs")]
            planted: Default::default(),
        })
    }
}

fn decode_saved(bytes: &[u8]) -> Result<Saved, SnapshotError> {
    // The version leads, so a snapshot of another layout is told apart from a damaged one.
    let version: u32 = tessera_types::decode_prefix(bytes)
        .map_err(|error| SnapshotError::Malformed(error.to_string()))?;
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            reads: SNAPSHOT_VERSION,
        });
    }
    tessera_types::decode(bytes, usize::MAX)
        .map_err(|error| SnapshotError::Malformed(error.to_string()))
}

/// The USIG counter a snapshot was taken at: the driver resumes the USIG after it.
pub fn saved_usig_counter(bytes: &[u8]) -> Result<u64, SnapshotError> {
    Ok(decode_saved(bytes)?.usig_counter)
}

/// The USIG epoch a snapshot's replica spoke in (its USIG must be restored in it).
pub fn saved_usig_epoch(bytes: &[u8]) -> Result<u64, SnapshotError> {
    Ok(decode_saved(bytes)?.usig_epoch)
}
