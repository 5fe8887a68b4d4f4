//! The adversary: what Byzantine replicas do to the messages their (real, honest) cores produce.
//!
//! A Byzantine replica in the simulator runs the same core as every other replica; the adversary
//! sits between that core and the network and decides, message by message and receiver by
//! receiver, what actually leaves. It owns the machine but not the USIG: it may call the
//! replica's USIG to certify whatever it likes (each call consumes a fresh counter value), and it
//! may forge a message under an old certificate, which correct replicas must reject.
//!
//! Following ByzzFuzz (Winter et al., OOPSLA 2023), misbehaviour is confined to a few protocol
//! *rounds* drawn from the seed (see [`Round`]): in a mutation round every copy of the Byzantine
//! replica's message of that round, to each receiver separately, is passed, withheld, replaced
//! by a replay of an older message, forged (mutated, old certificate) or re-certified (mutated,
//! fresh certificate). Different receivers therefore get different stories: equivocation.
//! Mutations are small-scope: one field moved by one step (view, sequence number, counter), a
//! digest replaced, a batch with a request dropped, duplicated or swapped for an older batch, a
//! VIEW-CHANGE log cut short, a NEW-VIEW missing a VIEW-CHANGE, a state snapshot replaced by a
//! stale one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tessera_core::minbft::ClientSnapshot;
use tessera_crypto::{Digest, DigestBuilder};
use tessera_kv::Response;
use tessera_types::{
    batch_digest, new_view_certified_digest, view_change_certified_digest, ReplicaId,
    ReplicaMessage, Reply, Request, SeqNum, Ui, View,
};
use tessera_usig::hmac::HmacUsig;
use tessera_usig::{Usig, UsigError, UsigIdentity};

use crate::rng::SimRng;

/// One USIG instance shared by several holders: a Byzantine replica's core and the adversary
/// (which certifies tampered messages with it), or the two cores of a pair of Twins. The counter
/// is shared, so no holder can obtain two certificates for one counter value.
#[derive(Clone)]
pub struct SharedUsig(Arc<Mutex<HmacUsig>>);

impl SharedUsig {
    /// Wraps `usig` for sharing.
    pub fn new(usig: HmacUsig) -> SharedUsig {
        SharedUsig(Arc::new(Mutex::new(usig)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HmacUsig> {
        // The simulator is single-threaded: a poisoned lock means a panic already happened.
        self.0.lock().expect("simulator USIG lock poisoned")
    }
}

impl Usig for SharedUsig {
    fn identity(&self) -> UsigIdentity {
        self.lock().identity()
    }
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        self.lock().create_ui(message)
    }
    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        self.lock().start_epoch()
    }
    fn start_epoch_at_least(&mut self, at_least: u64) -> Result<u64, UsigError> {
        self.lock().start_epoch_at_least(at_least)
    }
    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        self.lock().verify_ui(signer, message, ui)
    }
}

/// A ByzzFuzz protocol round: the sequence number an ordering, checkpoint or state message is
/// about, or the view a view-change message is about.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Round {
    /// Sequence number `s` (PREPARE, COMMIT, CHECKPOINT, STATE-SUMMARY, PARTITION-REPLY).
    Seq(u64),
    /// View `v` (REQ-VIEW-CHANGE, VIEW-CHANGE, NEW-VIEW).
    View(u64),
}

/// The round of `message`, if it belongs to one (heartbeats, fetches and state requests do not).
pub fn round_of(message: &ReplicaMessage) -> Option<Round> {
    match message {
        ReplicaMessage::Prepare(prepare) => Some(Round::Seq(prepare.header.seq.0)),
        ReplicaMessage::Commit(commit) => Some(Round::Seq(commit.prepare.seq.0)),
        ReplicaMessage::Checkpoint(checkpoint) => Some(Round::Seq(checkpoint.seq.0)),
        ReplicaMessage::StateSummary(summary) => Some(Round::Seq(summary.certificate.seq.0)),
        ReplicaMessage::PartitionReply(reply) => Some(Round::Seq(reply.seq.0)),
        ReplicaMessage::ReqViewChange(request) => Some(Round::View(request.to_view.0)),
        ReplicaMessage::ViewChange(view_change) => Some(Round::View(view_change.to_view.0)),
        ReplicaMessage::NewView(new_view) => Some(Round::View(new_view.view.0)),
        _ => None,
    }
}

/// Draws a round: three times in four a sequence number in `1..=seq_rounds`, otherwise a view in
/// `1..=view_rounds`.
pub fn draw_round(rng: &mut SimRng, seq_rounds: u64, view_rounds: u64) -> Round {
    if rng.below(4) < 3 {
        Round::Seq(rng.between(1, seq_rounds.max(1)))
    } else {
        Round::View(rng.between(1, view_rounds.max(1)))
    }
}

/// What happened to one copy of a Byzantine replica's message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tamper {
    /// Sent unchanged.
    Pass,
    /// Not sent to this receiver.
    Withhold,
    /// An older message of the same replica sent instead.
    Replay,
    /// Mutated, under the original certificate (correct replicas must reject it).
    Forge,
    /// Mutated and certified afresh by the replica's USIG (a valid UI on a new counter value).
    Recertify,
}

/// Counts of what the adversary did, for the report.
#[derive(Clone, Debug, Default)]
pub struct AdversaryStats {
    /// Copies withheld.
    pub withheld: u64,
    /// Copies replaced by replays.
    pub replayed: u64,
    /// Copies forged under an old certificate.
    pub forged: u64,
    /// Copies mutated and certified afresh.
    pub recertified: u64,
    /// Client replies replaced by a forged result.
    pub corrupted_replies: u64,
}

/// The layout of a key-value chunk: `(key, value, expiry)` triples in key order (postcard
/// encodes a byte string and a sequence of bytes alike). It must follow the store's format:
/// a chunk that does not decode is left alone, and the tampering silently stops (when the
/// format gained the expiry, the planted bug trust-state-snapshot went uncaught until this
/// was updated).
type KvChunk = Vec<(Vec<u8>, Vec<u8>, Option<u64>)>;

/// How many of its own messages a Byzantine replica remembers for replays.
const REPLAY_MEMORY: usize = 64;
/// How many batches and partition chunks it remembers for substitutions.
const SUBSTITUTE_MEMORY: usize = 8;

/// The adversary controlling every Byzantine replica of one run.
pub struct Adversary {
    /// The USIG of each Byzantine replica, by replica id.
    usigs: BTreeMap<u32, SharedUsig>,
    /// Each Byzantine replica's recent messages, for replays.
    sent: BTreeMap<u32, VecDeque<ReplicaMessage>>,
    /// Recent batches seen in Byzantine replicas' messages, to swap into PREPAREs.
    batches: VecDeque<Arc<Vec<Request>>>,
    /// Recent chunks (partition, bytes) Byzantine replicas served, to serve stale state.
    chunks: VecDeque<(u32, Vec<u8>)>,
    /// The checkpoint interval, to move checkpoint sequence numbers by one interval.
    checkpoint_interval: u64,
    /// What it did.
    pub stats: AdversaryStats,
}

impl Adversary {
    /// An adversary holding `usigs` (replica id → that replica's shared USIG).
    pub fn new(usigs: BTreeMap<u32, SharedUsig>, checkpoint_interval: u64) -> Adversary {
        Adversary {
            usigs,
            sent: BTreeMap::new(),
            batches: VecDeque::new(),
            chunks: VecDeque::new(),
            checkpoint_interval,
            stats: AdversaryStats::default(),
        }
    }

    /// Remembers what Byzantine replica `from` produced, for later replays and substitutions.
    pub fn observe(&mut self, from: u32, message: &ReplicaMessage) {
        match message {
            ReplicaMessage::Prepare(prepare) => remember(&mut self.batches, prepare.batch.clone()),
            ReplicaMessage::PartitionReply(reply) => {
                if let Some(chunk) = &reply.chunk {
                    remember(&mut self.chunks, (reply.partition, chunk.bytes.clone()));
                }
            }
            _ => {}
        }
        if round_of(message).is_some() {
            let sent = self.sent.entry(from).or_default();
            sent.push_back(message.clone());
            if sent.len() > REPLAY_MEMORY {
                sent.pop_front();
            }
        }
    }

    /// Decides the fate of one copy of `message` from Byzantine replica `from` in a mutation
    /// round, and returns what to send instead (`None`: nothing).
    pub fn tamper(
        &mut self,
        rng: &mut SimRng,
        from: u32,
        message: &ReplicaMessage,
    ) -> (Tamper, Option<ReplicaMessage>) {
        let choice = match rng.below(5) {
            0 => Tamper::Pass,
            1 => Tamper::Withhold,
            2 => Tamper::Replay,
            3 => Tamper::Forge,
            _ => Tamper::Recertify,
        };
        match choice {
            Tamper::Pass => (Tamper::Pass, Some(message.clone())),
            Tamper::Withhold => {
                self.stats.withheld += 1;
                (Tamper::Withhold, None)
            }
            Tamper::Replay => {
                let Some(sent) = self.sent.get(&from).filter(|sent| !sent.is_empty()) else {
                    return (Tamper::Pass, Some(message.clone()));
                };
                let old = sent[rng.below(sent.len() as u64) as usize].clone();
                self.stats.replayed += 1;
                (Tamper::Replay, Some(old))
            }
            Tamper::Forge => match self.mutate(rng, message, true) {
                Some(forged) => {
                    self.stats.forged += 1;
                    (Tamper::Forge, Some(forged))
                }
                None => (Tamper::Pass, Some(message.clone())),
            },
            Tamper::Recertify => {
                let Some(mut mutated) = self.mutate(rng, message, false) else {
                    return (Tamper::Pass, Some(message.clone()));
                };
                self.recertify(from, &mut mutated);
                self.stats.recertified += 1;
                (Tamper::Recertify, Some(mutated))
            }
        }
    }

    /// The reply a colluding Byzantine replica sends instead of `reply`: every colluder forges
    /// the same result, so f+1 of them can make a client accept it.
    pub fn corrupt_reply(&mut self, reply: &Reply) -> Reply {
        self.stats.corrupted_replies += 1;
        Reply {
            result: Response::Value(Some(b"forged-by-colluders".to_vec())).encode(),
            ..reply.clone()
        }
    }

    /// A small-scope mutation of `message`, or `None` if this kind is left alone. `forging`
    /// adds mutations that only make sense under an old certificate (a moved counter).
    fn mutate(
        &mut self,
        rng: &mut SimRng,
        message: &ReplicaMessage,
        forging: bool,
    ) -> Option<ReplicaMessage> {
        let mut message = message.clone();
        let choices = 5 + u64::from(forging);
        let choice = rng.below(choices);
        match &mut message {
            ReplicaMessage::Prepare(prepare) => {
                let header = &mut prepare.header;
                match choice {
                    0 => header.view = step_view(rng, header.view),
                    1 => header.seq = step_seq(rng, header.seq),
                    2 => header.batch_digest = random_digest(rng),
                    3 | 4 => {
                        let mut batch = (*prepare.batch).clone();
                        self.mutate_batch(rng, &mut batch);
                        prepare.header.batch_digest = batch_digest(&batch);
                        prepare.batch = Arc::new(batch);
                    }
                    _ => header.ui.counter = step_counter(rng, header.ui.counter),
                }
            }
            ReplicaMessage::Commit(commit) => match choice {
                0 => commit.prepare.view = step_view(rng, commit.prepare.view),
                1 | 3 => commit.prepare.seq = step_seq(rng, commit.prepare.seq),
                2 | 4 => commit.prepare.batch_digest = random_digest(rng),
                _ => commit.ui.counter = step_counter(rng, commit.ui.counter),
            },
            ReplicaMessage::Checkpoint(checkpoint) => match choice {
                0 | 3 => checkpoint.state_digest = random_digest(rng),
                1 => {
                    let interval = self.checkpoint_interval;
                    checkpoint.seq = SeqNum(checkpoint.seq.0.saturating_add(interval));
                }
                2 | 4 => checkpoint.view = step_view(rng, checkpoint.view),
                _ => checkpoint.ui.counter = step_counter(rng, checkpoint.ui.counter),
            },
            ReplicaMessage::ViewChange(view_change) => {
                let mut changed = (**view_change).clone();
                match choice {
                    0 => changed.to_view = step_view(rng, changed.to_view),
                    1 | 3 => {
                        changed.log.pop();
                    }
                    2 => changed.log.clear(),
                    4 => changed.new_views.clear(),
                    _ => changed.ui.counter = step_counter(rng, changed.ui.counter),
                }
                *view_change = Arc::new(changed);
            }
            ReplicaMessage::NewView(new_view) => {
                let mut changed = (**new_view).clone();
                match choice {
                    0 | 3 => changed.view = step_view(rng, changed.view),
                    1 | 2 | 4 => {
                        changed.view_changes.pop();
                    }
                    _ => changed.ui.counter = step_counter(rng, changed.ui.counter),
                }
                *new_view = Arc::new(changed);
            }
            ReplicaMessage::ReqViewChange(request) => {
                request.to_view = View(request.to_view.0 + 1 + rng.below(3));
            }
            ReplicaMessage::StateSummary(summary) => {
                // Either change is refused at once: the partition digests and the client
                // table must give the certified digest.
                if choice.is_multiple_of(2) && !summary.partitions.is_empty() {
                    let index = rng.below(summary.partitions.len() as u64) as usize;
                    summary.partitions[index] = random_digest(rng);
                } else {
                    let limit = tessera_types::limits::MAX_FRAME_BYTES;
                    let Ok((clock_ms, mut clients, epochs)) =
                        tessera_types::decode::<ClientSnapshot>(&summary.clients, limit)
                    else {
                        return None;
                    };
                    let newest = clients
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, (_, entry))| entry.seq)
                        .map(|(index, _)| index)?;
                    clients.remove(newest);
                    summary.clients = tessera_types::encoding::encode(&(clock_ms, clients, epochs));
                }
            }
            ReplicaMessage::PartitionReply(reply) => {
                if let Some(digest) = &mut reply.digest {
                    // A digest vote: a wrong digest, or word that the state is gone.
                    if choice.is_multiple_of(2) {
                        digest.0[0] ^= 1;
                    } else {
                        reply.digest = None;
                    }
                    return Some(message);
                }
                let Some(chunk) = &mut reply.chunk else {
                    return None;
                };
                let stale = self
                    .chunks
                    .iter()
                    .find(|(partition, bytes)| {
                        *partition == reply.partition && *bytes != chunk.bytes
                    })
                    .map(|(_, bytes)| bytes.clone());
                match (choice, stale) {
                    (0, Some(stale)) => chunk.bytes = stale,
                    (1, _) => {
                        chunk.bytes.pop();
                    }
                    (2, _) => reply.chunk = None,
                    _ => {
                        // Well-formed but wrong: the chunk loses its last entry, or its first
                        // value changes, so only the partition digest can tell.
                        let limit = tessera_types::limits::MAX_FRAME_BYTES;
                        let Ok(mut entries) = tessera_types::decode::<KvChunk>(&chunk.bytes, limit)
                        else {
                            return None;
                        };
                        if choice == 3 {
                            entries.pop()?;
                        } else {
                            let (_, value, _) = entries.first_mut()?;
                            value.push(b'!');
                        }
                        chunk.bytes = tessera_types::encoding::encode(&entries);
                    }
                }
            }
            ReplicaMessage::Heartbeat(heartbeat) => {
                heartbeat.last_executed = SeqNum(heartbeat.last_executed.0 + 100);
                heartbeat.stable_checkpoint =
                    SeqNum(heartbeat.stable_checkpoint.0 + 10 * self.checkpoint_interval);
            }
            _ => return None,
        }
        Some(message)
    }

    /// Drops, duplicates or reorders a request, or swaps in an older batch.
    fn mutate_batch(&self, rng: &mut SimRng, batch: &mut Vec<Request>) {
        match rng.below(4) {
            0 if !batch.is_empty() => {
                batch.remove(rng.below(batch.len() as u64) as usize);
            }
            1 if !batch.is_empty() => {
                let copy = batch[rng.below(batch.len() as u64) as usize].clone();
                batch.push(copy);
            }
            2 if batch.len() > 1 => batch.reverse(),
            _ => {
                if let Some(older) = self.batches.iter().find(|older| ***older != *batch) {
                    *batch = (**older).clone();
                } else {
                    batch.clear();
                }
            }
        }
    }

    /// Gives `message` a fresh, valid certificate from `from`'s USIG.
    fn recertify(&mut self, from: u32, message: &mut ReplicaMessage) {
        let Some(usig) = self.usigs.get_mut(&from) else {
            return;
        };
        let mut certify = |digest: Digest| -> Option<Ui> { usig.create_ui(&digest).ok() };
        match message {
            ReplicaMessage::Prepare(prepare) => {
                if let Some(ui) = certify(prepare.header.certified_digest()) {
                    prepare.header.ui = ui;
                }
            }
            ReplicaMessage::Commit(commit) => {
                if let Some(ui) = certify(commit.certified_digest()) {
                    commit.ui = ui;
                }
            }
            ReplicaMessage::Checkpoint(checkpoint) => {
                if let Some(ui) = certify(checkpoint.certified_digest()) {
                    checkpoint.ui = ui;
                }
            }
            ReplicaMessage::ViewChange(view_change) => {
                let mut changed = (**view_change).clone();
                let digest = view_change_certified_digest(
                    changed.replica,
                    changed.to_view,
                    &changed.payload_digest(),
                );
                if let Some(ui) = certify(digest) {
                    changed.ui = ui;
                }
                *view_change = Arc::new(changed);
            }
            ReplicaMessage::NewView(new_view) => {
                let mut changed = (**new_view).clone();
                let digest = new_view_certified_digest(
                    changed.primary,
                    changed.view,
                    &changed.payload_digest(),
                );
                if let Some(ui) = certify(digest) {
                    changed.ui = ui;
                }
                *new_view = Arc::new(changed);
            }
            _ => {}
        }
    }
}

fn remember<T>(memory: &mut VecDeque<T>, item: T) {
    memory.push_back(item);
    if memory.len() > SUBSTITUTE_MEMORY {
        memory.pop_front();
    }
}

fn step_view(rng: &mut SimRng, view: View) -> View {
    if view.0 == 0 || rng.chance(500) {
        View(view.0 + 1)
    } else {
        View(view.0 - 1)
    }
}

fn step_seq(rng: &mut SimRng, seq: SeqNum) -> SeqNum {
    if seq.0 <= 1 || rng.chance(500) {
        SeqNum(seq.0 + 1)
    } else {
        SeqNum(seq.0 - 1)
    }
}

fn step_counter(rng: &mut SimRng, counter: u64) -> u64 {
    if counter <= 1 || rng.chance(500) {
        counter + 1
    } else {
        counter - 1
    }
}

fn random_digest(rng: &mut SimRng) -> Digest {
    let mut builder = DigestBuilder::new("tessera-sim.adversary.random-digest");
    builder.u64(rng.below(u64::MAX));
    builder.finish()
}
