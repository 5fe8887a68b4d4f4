//! State transfer: a replica behind the group's stable checkpoint fetches the state there,
//! partition by partition, from every replica that offers it (`docs/STATE.md`).
//!
//! 1. It broadcasts a STATE-REQUEST. Each replica whose stable checkpoint is recent enough
//!    answers with a STATE-SUMMARY: the checkpoint certificate (f+1 CHECKPOINTs), the digest of
//!    every partition and the client table. The receiver checks that the Merkle root of the
//!    partition digests and the client table's digest give the certified state digest, so a
//!    summary is either exactly the agreed one or refused, whoever sent it.
//! 2. It fetches only the partitions whose local digest differs from the agreed one, in chunks,
//!    spread over every replica that may hold the state (the least loaded first, at most
//!    [`IN_FLIGHT_PER_SOURCE`] copies each), and checks each completed copy against its agreed
//!    digest. A replica that sends bytes that do not check is faulty: it is blacklisted and its
//!    partitions go to others. One that does not answer in time loses its partitions too. How
//!    many copies of a partition are asked for, whether other replicas are asked for its digest,
//!    and who gets it after a copy fails is the [`TransferStrategy`]: paper 001's Merkle-proof
//!    strategy (the whole leaf level proven at once), its latency-first strategy, and its
//!    bandwidth-first strategy in both variants.
//! 3. If the checkpoint it fetches is garbage-collected meanwhile, a summary of a newer one
//!    continues the transfer: checked partitions whose digest is unchanged are kept, only the
//!    rest is fetched again (the cascade paper 001 §VII-B warns about).
//! 4. When every partition is in, they replace the local ones at once; the service refuses them
//!    (and nothing changes) if the new state exceeds its limits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tessera_crypto::Digest;
use tessera_types::merkle::MerkleTree;
use tessera_types::{
    CheckpointCertificate, ChunkBytes, ClientId, FrozenState, LogEntry, PartitionReply,
    PartitionRequest, ReplicaId, ReplicaMessage, SeqNum, StagedPartition, StateMachine,
    StateRequest, StateSummary, TransferStrategy,
};

use super::{state_digest_of, Action, ClientSnapshot, ClientTable, Freshness, Replica};
#[cfg(feature = "planted-bugs")]
use crate::planted::PlantedBug;

/// Bytes of partition data one chunk carries (about; a chunk always holds at least one entry).
pub const CHUNK_BUDGET_BYTES: usize = 1 << 20;
/// Largest chunk accepted: the budget plus one largest entry, with room to spare.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// Largest cursor accepted (a key-value cursor is one key, and a key fits in one operation).
pub const MAX_CURSOR_BYTES: usize = tessera_types::limits::MAX_OPERATION_BYTES;
/// Partition copies fetched from one replica at a time.
pub const IN_FLIGHT_PER_SOURCE: usize = 4;
/// Heartbeat intervals a source may take to answer before its partitions go to others.
const SOURCE_PATIENCE_HEARTBEATS: u64 = 10;

/// The replicated state at one checkpoint, kept to serve replicas that fetch it.
pub(super) struct CheckpointState<F> {
    /// The state digest (the application's Merkle root and the client table's digest).
    pub digest: Digest,
    pub frozen: F,
    /// The client table, encoded.
    pub clients: Arc<Vec<u8>>,
    /// The epoch table at this checkpoint (CHECKPOINT messages carry it).
    pub epochs: Vec<tessera_types::EpochInstall>,
}

impl<F: Clone> Clone for CheckpointState<F> {
    fn clone(&self) -> Self {
        CheckpointState {
            digest: self.digest,
            frozen: self.frozen.clone(),
            clients: self.clients.clone(),
            epochs: self.epochs.clone(),
        }
    }
}

/// One copy of a partition being fetched from one source.
struct Fetching<P> {
    staged: P,
    /// The cursor of the chunk asked for.
    cursor: Option<Vec<u8>>,
    /// When the source loses the partition: [`SOURCE_PATIENCE_HEARTBEATS`] after it was
    /// assigned, plus one heartbeat interval per full chunk received ([`CHUNK_BUDGET_BYTES`];
    /// a smaller chunk buys its share). A source answering quickly never reaches it; one that
    /// sends chunks more slowly than one per interval, or drips tiny ones, does.
    deadline_ms: u64,
}

/// What happened to one partition in this transfer so far.
#[derive(Default)]
struct History {
    /// Every replica asked about it, for a copy or for its digest.
    asked: BTreeSet<ReplicaId>,
    /// Copies that failed: bytes that did not check, `gone`, or a source that timed out.
    failed_copies: u32,
}

/// A state transfer in progress.
pub(super) struct Transfer<P> {
    certificate: CheckpointCertificate,
    /// The agreed digest of every partition at the checkpoint.
    leaves: Vec<Digest>,
    clients: ClientTable,
    anchors: Vec<tessera_types::Checkpoint>,
    /// Replicas asked for partitions: every other replica at first (any that kept this
    /// checkpoint's state can serve it, not only those that sent a summary), minus those that
    /// answered `gone`, sent bytes that do not check, or let a deadline pass.
    sources: BTreeSet<ReplicaId>,
    /// Sources that let a deadline pass: not asked again in this transfer unless no one else
    /// is left.
    timed_out: BTreeSet<ReplicaId>,
    /// Partitions not yet received and checked (some copies in flight, or none yet).
    missing: BTreeSet<u32>,
    /// Copies in flight, by partition and source.
    fetching: BTreeMap<(u32, ReplicaId), Fetching<P>>,
    /// Digest-only requests not answered yet.
    digest_requests: BTreeSet<(u32, ReplicaId)>,
    history: BTreeMap<u32, History>,
    /// Partitions received and checked against their agreed digest.
    done: BTreeMap<u32, P>,
    /// Partition bytes received, every copy counted (what the strategy costs in bandwidth).
    received_bytes: u64,
}

impl<P> Transfer<P> {
    pub fn seq(&self) -> SeqNum {
        self.certificate.seq
    }

    /// Partitions still missing (in flight or waiting for a source).
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// Stops asking `source`: it leaves the sources, and every copy it was serving is dropped
    /// (counted as failed, so the strategy may ask more sources for those partitions).
    fn drop_source(&mut self, source: ReplicaId) {
        self.sources.remove(&source);
        let released: Vec<u32> = self
            .fetching
            .keys()
            .filter(|(_, from)| *from == source)
            .map(|(index, _)| *index)
            .collect();
        for index in released {
            self.fetching.remove(&(index, source));
            self.history.entry(index).or_default().failed_copies += 1;
        }
        self.digest_requests.retain(|(_, from)| *from != source);
    }
}

/// Copies of one partition a strategy keeps in flight at once, after `failed` of them failed.
fn copies_wanted(strategy: TransferStrategy, f: u32, failed: u32) -> usize {
    let f = f.max(1) as usize;
    match strategy {
        TransferStrategy::Merkle | TransferStrategy::BandwidthFirst1 => 1,
        // f+1 copies hold at least one correct one, so a copy that fails is not replaced
        // while others are in flight; after f failures the last one is kept alive (a correct
        // source that timed out is replaced).
        TransferStrategy::LatencyFirst => (f + 1).saturating_sub(failed as usize).max(1),
        TransferStrategy::BandwidthFirst2 if failed == 0 => 1,
        TransferStrategy::BandwidthFirst2 => f,
    }
}

/// Replicas a strategy asks for a partition's digest alone when it first asks for the partition.
fn digest_votes(strategy: TransferStrategy, f: u32) -> usize {
    match strategy {
        TransferStrategy::Merkle => 0,
        _ => f as usize,
    }
}

impl<S: StateMachine> Replica<S> {
    pub(super) fn request_state(&mut self, min_seq: SeqNum) {
        if self
            .state_request_ms
            .is_some_and(|last| self.now_ms < last + self.config.heartbeat_interval_ms * 5)
        {
            return;
        }
        self.state_request_ms = Some(self.now_ms);
        tracing::info!(
            replica = self.id.0,
            min_seq = min_seq.0,
            "requesting state transfer"
        );
        self.broadcast(ReplicaMessage::StateRequest(StateRequest {
            replica: self.id,
            min_seq,
        }));
    }

    pub(super) fn on_state_request(&mut self, from: ReplicaId, request: StateRequest) {
        if request.replica != from {
            self.reject("state-request-wrong-channel");
            return;
        }
        if self.stable.seq == SeqNum(0)
            || self.stable.seq < request.min_seq
            || !self.serves_stable_state()
        {
            return;
        }
        let state = &self.stable_state;
        let partitions = (0..state.frozen.partition_count())
            .map(|index| state.frozen.partition_digest(index))
            .collect();
        let clients = (*state.clients).clone();
        let mut anchors: Vec<tessera_types::Checkpoint> = self
            .streams
            .iter()
            .filter_map(|stream| stream.latest_checkpoint_message.clone())
            .collect();
        if let Some(LogEntry::Checkpoint(own)) = self
            .own_log
            .iter()
            .rev()
            .find(|entry| matches!(entry, LogEntry::Checkpoint(_)))
        {
            anchors.push(own.clone());
        }
        self.actions.push(Action::Send {
            to: from,
            message: ReplicaMessage::StateSummary(StateSummary {
                replica: self.id,
                certificate: self.stable.clone(),
                partitions,
                clients,
                anchors,
            }),
        });
    }

    pub(super) fn on_state_summary(&mut self, from: ReplicaId, summary: StateSummary) {
        if summary.replica != from || from == self.id {
            self.reject("state-summary-wrong-channel");
            return;
        }
        let seq = summary.certificate.seq;
        // Not refused for a blacklisted sender: a summary is exactly the agreed one or refused,
        // whoever sent it, and the blacklist is built from chunks, which the log does not keep
        // (replay must accept the same summaries; found in review). The blacklist only decides
        // whom to ask for partitions.
        if seq <= self.last_executed {
            return;
        }
        if let Some(transfer) = &mut self.transfer {
            if transfer.seq() == seq {
                // Same checkpoint, same agreed digest: the sender has the state (or says so).
                let trusted = !self.transfer_blacklist.contains(&from);
                if trusted && (!transfer.timed_out.contains(&from) || transfer.sources.is_empty()) {
                    transfer.sources.insert(from);
                }
                self.pump_transfer();
                return;
            }
            if transfer.seq() > seq {
                return;
            }
        }
        if let Err(reason) = self
            .verifier()
            .check_checkpoint_certificate(&summary.certificate)
        {
            self.reject(reason);
            return;
        }
        let Some((leaves, clients)) = self.check_summary(&summary) else {
            // The certificate is valid, so the sender had the right digest and sent other
            // data: faulty. (Logged, so replay blacklists it too.)
            self.transfer_blacklist.insert(from);
            return;
        };
        // A newer checkpoint: keep what was fetched and still matches (the cascade).
        let mut kept = BTreeMap::new();
        if let Some(old) = self.transfer.take() {
            for (index, staged) in old.done {
                if leaves.get(index as usize) == Some(&staged.digest()) {
                    kept.insert(index, staged);
                }
            }
        }
        let missing: BTreeSet<u32> = (0..leaves.len() as u32)
            .filter(|index| {
                !kept.contains_key(index)
                    && self.state_machine.partition_digest(*index) != leaves[*index as usize]
            })
            .collect();
        tracing::info!(
            replica = self.id.0,
            seq = seq.0,
            partitions = missing.len(),
            kept = kept.len(),
            strategy = %self.config.state_transfer,
            "fetching state"
        );
        let sources = (0..self.config.n)
            .map(ReplicaId)
            .filter(|replica| *replica != self.id && !self.transfer_blacklist.contains(replica))
            .collect();
        self.transfer = Some(Transfer {
            certificate: summary.certificate,
            leaves,
            clients,
            anchors: summary.anchors,
            sources,
            timed_out: BTreeSet::new(),
            missing,
            fetching: BTreeMap::new(),
            digest_requests: BTreeSet::new(),
            history: BTreeMap::new(),
            done: kept,
            received_bytes: 0,
        });
        self.pump_transfer();
    }

    /// True if `stable_state` is the state at the stable checkpoint (not when the group made a
    /// checkpoint stable that this replica has not reached, or reached with another state).
    fn serves_stable_state(&self) -> bool {
        self.last_executed >= self.stable.seq
            && self.stable_state.digest == self.stable.state_digest
    }

    /// This replica's own frozen state at `seq` if its digest is `digest`: the stable one, one
    /// taken since (not yet stable here), or the previous stable one (kept one more interval so
    /// a transfer under way when the group moves on can finish).
    fn state_at(&self, seq: SeqNum, digest: &Digest) -> Option<&S::Frozen> {
        let matches = |state: &&CheckpointState<S::Frozen>| state.digest == *digest;
        if seq == self.stable.seq && self.serves_stable_state() {
            return Some(&self.stable_state.frozen).filter(|_| self.stable_state.digest == *digest);
        }
        self.own_checkpoints
            .get(&seq)
            .filter(matches)
            .or(self
                .retired_state
                .as_ref()
                .filter(|(retired, _)| *retired == seq)
                .map(|(_, state)| state)
                .filter(matches))
            .map(|state| &state.frozen)
    }

    /// The summary's partition digests and client table if they give its certified digest.
    fn check_summary(&mut self, summary: &StateSummary) -> Option<(Vec<Digest>, ClientTable)> {
        if summary.partitions.len() != self.state_machine.partition_count() as usize {
            self.reject("state-summary-partitions");
            return None;
        }
        let Ok(snapshot) = tessera_types::decode::<ClientSnapshot>(
            &summary.clients,
            tessera_types::limits::MAX_FRAME_BYTES,
        ) else {
            self.reject("state-summary-clients");
            return None;
        };
        let Ok(clients) = ClientTable::from_snapshot(snapshot, self.config.client_table_max) else {
            self.reject("state-summary-clients");
            return None;
        };
        let Ok(mut tree) = MerkleTree::new(&summary.partitions) else {
            self.reject("state-summary-partitions");
            return None;
        };
        if state_digest_of(&tree.root(), &clients) != summary.certificate.state_digest {
            self.reject("state-summary-digest");
            return None;
        }
        Some((summary.partitions.clone(), clients))
    }

    pub(super) fn on_partition_request(&mut self, from: ReplicaId, request: PartitionRequest) {
        if request.replica != from
            || request.partition >= self.state_machine.partition_count()
            || request
                .cursor
                .as_ref()
                .is_some_and(|cursor| cursor.len() > MAX_CURSOR_BYTES)
        {
            self.reject("partition-request-malformed");
            return;
        }
        let state = self.state_at(request.seq, &request.state_digest);
        let (chunk, digest) = match state {
            None => (None, None),
            Some(frozen) if request.digest_only => {
                (None, Some(frozen.partition_digest(request.partition)))
            }
            Some(frozen) => {
                let chunk = frozen.chunk(
                    request.partition,
                    request.cursor.as_deref(),
                    CHUNK_BUDGET_BYTES,
                );
                let bytes = ChunkBytes {
                    bytes: chunk.bytes,
                    next: chunk.next,
                };
                (Some(bytes), None)
            }
        };
        self.actions.push(Action::Send {
            to: from,
            message: ReplicaMessage::PartitionReply(PartitionReply {
                replica: self.id,
                seq: request.seq,
                partition: request.partition,
                cursor: request.cursor,
                chunk,
                digest,
            }),
        });
    }

    pub(super) fn on_partition_reply(&mut self, from: ReplicaId, reply: PartitionReply) {
        if reply.replica != from {
            self.reject("partition-reply-wrong-channel");
            return;
        }
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        let partition = reply.partition;
        if reply.seq != transfer.seq() {
            return; // stale
        }
        // Bandwidth is spent whether or not the copy is still wanted: count every chunk.
        if let Some(chunk) = &reply.chunk {
            transfer.received_bytes += chunk.bytes.len() as u64;
        }
        let key = (partition, from);
        // A digest answer carries a digest (or, as `gone`, nothing) and never a chunk, so a
        // chunk of a copy asked of the same replica is never taken for a vote.
        let copy_asked = transfer.fetching.contains_key(&key);
        if reply.chunk.is_none()
            && (reply.digest.is_some() || !copy_asked)
            && transfer.digest_requests.remove(&key)
        {
            self.on_partition_digest(from, partition, reply);
            return;
        }
        let expected = transfer
            .fetching
            .get(&key)
            .is_some_and(|fetching| fetching.cursor == reply.cursor);
        if !expected {
            return; // duplicate, unasked, or a copy no longer needed
        }
        let Some(chunk) = reply.chunk else {
            // The source moved on to a newer stable checkpoint and dropped this one.
            transfer.drop_source(from);
            self.pump_transfer();
            return;
        };
        let oversized = chunk.bytes.len() > MAX_CHUNK_BYTES
            || chunk
                .next
                .as_ref()
                .is_some_and(|next| next.len() > MAX_CURSOR_BYTES);
        let fetching = transfer.fetching.get_mut(&key).expect("checked above");
        let added = if oversized {
            Err(tessera_types::RestoreError("oversized".into()))
        } else {
            fetching.staged.append(&chunk.bytes)
        };
        // A chunk with nothing in it must be the last: otherwise a faulty source could hold
        // the partition for ever with empty chunks.
        if added.is_err() || (added == Ok(0) && chunk.next.is_some()) {
            self.reject("partition-chunk-invalid");
            self.distrust_source(from);
            return;
        }
        match chunk.next {
            Some(next) => {
                fetching.cursor = Some(next.clone());
                // A full chunk buys the source one more heartbeat interval, a smaller one a
                // share of it: a source dripping tiny chunks to hold the copy gains next to
                // nothing and loses it at the base patience (found in review; a correct
                // source's chunks are full but for the last).
                let share = chunk.bytes.len().min(CHUNK_BUDGET_BYTES) as u64;
                fetching.deadline_ms +=
                    self.config.heartbeat_interval_ms * share / CHUNK_BUDGET_BYTES as u64;
                self.actions.push(Action::Send {
                    to: from,
                    message: ReplicaMessage::PartitionRequest(PartitionRequest {
                        replica: self.id,
                        seq: transfer.certificate.seq,
                        state_digest: transfer.certificate.state_digest,
                        partition,
                        cursor: Some(next),
                        digest_only: false,
                    }),
                });
            }
            None => {
                let fetching = transfer.fetching.remove(&key).expect("checked above");
                let agreed = transfer.leaves[partition as usize];
                let matches = fetching.staged.digest() == agreed;
                #[cfg(feature = "planted-bugs")]
                // PLANTED BUG (trust-state-snapshot): a partition is accepted whatever its
                // digest; the certificate vouches for a state, not for these bytes.
                let matches = matches || self.planted.contains(PlantedBug::TrustStateSnapshot);
                if !matches {
                    transfer.history.entry(partition).or_default().failed_copies += 1;
                    self.reject("partition-digest");
                    self.distrust_source(from);
                    return;
                }
                // The first copy that checks wins; the others still in flight (latency-first,
                // or bandwidth-first after a failure) are no longer needed, and their later
                // chunks are ignored as unasked.
                transfer
                    .fetching
                    .retain(|(index, _), _| *index != partition);
                transfer.missing.remove(&partition);
                transfer.done.insert(partition, fetching.staged);
                self.pump_transfer();
            }
        }
    }

    /// A digest vote: a correct replica that holds the checkpoint's state has exactly the
    /// agreed digest for every partition (the certificate proves which digest is agreed), so
    /// one that answers another digest is faulty and is not asked for a copy.
    fn on_partition_digest(&mut self, from: ReplicaId, partition: u32, reply: PartitionReply) {
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        match reply.digest {
            None => {
                // It no longer keeps the checkpoint's state (or sent bytes unasked): it cannot
                // serve this transfer.
                transfer.drop_source(from);
                self.pump_transfer();
            }
            Some(digest) if transfer.leaves.get(partition as usize) == Some(&digest) => {}
            Some(_) => {
                self.reject("partition-digest-vote");
                self.distrust_source(from);
            }
        }
    }

    /// A source sent bytes that do not check: it is faulty. Its partitions go back to the
    /// others, and it is not asked again until a transfer completes.
    fn distrust_source(&mut self, source: ReplicaId) {
        self.transfer_blacklist.insert(source);
        if let Some(transfer) = &mut self.transfer {
            transfer.drop_source(source);
        }
        self.pump_transfer();
    }

    /// At every heartbeat: sources too slow to answer lose their partitions; a transfer the
    /// replica caught up past on its own is dropped.
    pub(super) fn tick_transfer(&mut self) {
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        if transfer.seq() <= self.last_executed {
            self.drop_transfer();
            return;
        }
        let now_ms = self.now_ms;
        // A source that lets one deadline pass loses every partition it holds.
        let late: BTreeSet<ReplicaId> = transfer
            .fetching
            .iter()
            .filter(|(_, fetching)| now_ms > fetching.deadline_ms)
            .map(|((_, source), _)| *source)
            .collect();
        for source in late {
            transfer.drop_source(source);
            transfer.timed_out.insert(source);
        }
        self.pump_transfer();
    }

    /// The replica caught up on its own: installing the transfer's older state would execute
    /// requests again. A blacklist belongs to one transfer and its cascade.
    fn drop_transfer(&mut self) {
        self.transfer = None;
        self.transfer_blacklist.clear();
    }

    /// Asks for missing partitions as the strategy says, least-loaded source first; finishes
    /// when all are in.
    fn pump_transfer(&mut self) {
        let strategy = self.config.state_transfer;
        let f = self.config.f;
        let Some(transfer) = &mut self.transfer else {
            return;
        };
        if transfer.seq() <= self.last_executed {
            // Caught up on its own meanwhile (installing now would execute requests again:
            // the simulator's integrity checker caught exactly that).
            self.drop_transfer();
            return;
        }
        if transfer.sources.is_empty() && transfer.missing() > 0 {
            // Everyone failed or moved on: look for any stable checkpoint at least this recent
            // (a summary of this one brings its sender back, a newer one continues the
            // transfer).
            let seq = transfer.seq();
            self.request_state(seq);
            return;
        }
        let mut load: BTreeMap<ReplicaId, usize> =
            transfer.sources.iter().map(|source| (*source, 0)).collect();
        for (_, source) in transfer.fetching.keys() {
            if let Some(count) = load.get_mut(source) {
                *count += 1;
            }
        }
        let patience = SOURCE_PATIENCE_HEARTBEATS * self.config.heartbeat_interval_ms;
        let seq = transfer.certificate.seq;
        let state_digest = transfer.certificate.state_digest;
        let request = |partition, digest_only| {
            ReplicaMessage::PartitionRequest(PartitionRequest {
                replica: self.id,
                seq,
                state_digest,
                partition,
                cursor: None,
                digest_only,
            })
        };
        let mut sends = Vec::new();
        for &index in &transfer.missing {
            if load.values().all(|count| *count >= IN_FLIGHT_PER_SOURCE) {
                break;
            }
            let history = transfer.history.entry(index).or_default();
            let first_ask = history.asked.is_empty();
            let wanted = copies_wanted(strategy, f, history.failed_copies);
            let in_flight: BTreeSet<ReplicaId> = transfer
                .fetching
                .range((index, ReplicaId(0))..=(index, ReplicaId(u32::MAX)))
                .map(|((_, source), _)| *source)
                .collect();
            let mut copies = in_flight.len();
            while copies < wanted {
                // Distinct sources for one partition; after a failure, the bandwidth-first
                // variants prefer a replica not asked about it yet (paper 001 §IV-D2).
                let candidate = load
                    .iter()
                    .filter(|(source, count)| {
                        **count < IN_FLIGHT_PER_SOURCE && !in_flight.contains(source)
                    })
                    .filter(|(source, _)| !transfer.fetching.contains_key(&(index, **source)))
                    .min_by_key(|(source, count)| {
                        // Sorts replicas already asked about this partition last.
                        let asked_before = matches!(
                            strategy,
                            TransferStrategy::BandwidthFirst1 | TransferStrategy::BandwidthFirst2
                        ) && history.asked.contains(*source);
                        (asked_before, **count, **source)
                    })
                    .map(|(source, _)| *source);
                let Some(source) = candidate else {
                    break;
                };
                *load.get_mut(&source).expect("a source") += 1;
                history.asked.insert(source);
                transfer.fetching.insert(
                    (index, source),
                    Fetching {
                        staged: self.state_machine.stage(index),
                        cursor: None,
                        deadline_ms: self.now_ms + patience,
                    },
                );
                sends.push((source, request(index, false)));
                copies += 1;
            }
            if first_ask && copies > 0 {
                // Digest votes from replicas not fetching a copy, spread by partition index.
                let others: Vec<ReplicaId> = transfer
                    .sources
                    .iter()
                    .copied()
                    .filter(|source| !history.asked.contains(source))
                    .collect();
                let votes = digest_votes(strategy, f).min(others.len());
                for offset in 0..votes {
                    let source = others[(index as usize + offset) % others.len()];
                    history.asked.insert(source);
                    transfer.digest_requests.insert((index, source));
                    sends.push((source, request(index, true)));
                }
            }
        }
        for (to, message) in sends {
            self.actions.push(Action::Send { to, message });
        }
        if transfer.missing() == 0 {
            self.finish_transfer();
        }
    }

    fn finish_transfer(&mut self) {
        let Some(mut transfer) = self.transfer.take() else {
            return;
        };
        // The replica may have executed meanwhile: partitions that matched at the start may
        // not any more.
        let changed: BTreeSet<u32> = (0..transfer.leaves.len() as u32)
            .filter(|index| {
                !transfer.done.contains_key(index)
                    && self.state_machine.partition_digest(*index)
                        != transfer.leaves[*index as usize]
            })
            .collect();
        if !changed.is_empty() {
            transfer.missing = changed;
            self.transfer = Some(transfer);
            self.pump_transfer();
            return;
        }
        let clients = transfer.clients;
        let partitions: Vec<S::Staged> = std::mem::take(&mut transfer.done).into_values().collect();
        let moved: u64 = partitions.iter().map(|partition| partition.bytes()).sum();
        if let Err(error) = self.state_machine.install(partitions) {
            tracing::error!(
                replica = self.id.0,
                seq = transfer.certificate.seq.0,
                %error,
                "cannot install the transferred state; keeping the old one"
            );
            self.reject("state-transfer-refused");
            return;
        }
        let certificate = transfer.certificate;
        let seq = certificate.seq;
        let digest = state_digest_of(&self.state_machine.digest(), &clients);
        #[cfg(feature = "planted-bugs")]
        let digest = if self.planted.contains(PlantedBug::TrustStateSnapshot) {
            certificate.state_digest
        } else {
            digest
        };
        // Every installed partition matched its agreed digest and every other one was checked
        // equal, so only a service that breaks the digest contract (`partition_digest` and
        // `StagedPartition::digest` disagreeing, or `digest` not being the Merkle root of the
        // partition digests) gets here. Going on would execute requests on a state that
        // already holds some of their effects.
        assert_eq!(
            digest, certificate.state_digest,
            "the service's digests break the StateMachine contract after installing checked \
             partitions at seq {}",
            seq.0
        );
        tracing::info!(
            replica = self.id.0,
            seq = seq.0,
            bytes = moved,
            received_bytes = transfer.received_bytes,
            strategy = %self.config.state_transfer,
            "state transfer complete"
        );
        self.transfer_bytes_received += transfer.received_bytes;
        self.transfers_installed += 1;
        self.transfer_blacklist.clear();
        self.clients = clients;
        self.forget_executed_requests();
        self.last_executed = seq;
        self.next_prepare_seq = self.next_prepare_seq.max(seq.next());
        self.slots.retain(|slot_seq, _| *slot_seq > seq);
        self.last_progress_ms = self.now_ms;
        self.executed_digests.clear();
        let state = self.freeze_state();
        self.own_checkpoints.insert(seq, state.clone());
        self.set_stable_state(seq, state);
        // The state this replica held before is far behind the group: no one will fetch it, and
        // keeping it as the retired state would put it in the snapshot that makes the installed
        // state durable, doubling the disk a transfer needs (found in review).
        self.retired_state = None;
        // The installed state's epoch table first: the resume points are in those epochs.
        self.apply_epoch_table();
        self.resume_streams(&transfer.anchors, seq);
        if seq > self.stable.seq {
            self.adopt_stable(certificate.clone());
        }
        // Anchor the own log at the new state, unless this replica already spoke about later
        // sequence numbers (then an older anchor stays valid).
        if self.own_max_seq <= seq {
            let epochs = self.clients.epochs();
            self.send_checkpoint(seq, certificate.state_digest, epochs);
        }
    }

    /// After a state transfer: requests the new state already executed no longer wait (their
    /// timers would blame a primary that did its job).
    fn forget_executed_requests(&mut self) {
        let clients = &self.clients;
        let fresh = |client: ClientId, number: u64| {
            matches!(clients.freshness(client, number), Freshness::New)
        };
        self.waiting
            .retain(|client, (number, _)| fresh(*client, *number));
        self.pending
            .retain(|request| fresh(request.client, request.request_number));
        self.pending_keys
            .retain(|(client, number)| fresh(*client, *number));
    }
}
