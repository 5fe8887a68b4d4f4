//! The core thread: one dedicated OS thread owns the [`Replica`] and drives it.
//!
//! It takes events from a bounded inbox, feeds them to the core with the time in milliseconds
//! since the node started (a monotonic clock), keeps the timer table (one deadline per
//! [`Timer`] kind) and carries out the core's actions: each replica message is encoded once and
//! the same bytes are queued for every destination; replies go to [`ReplyRoutes`]. It never
//! waits on a socket or a full queue: whatever cannot be queued is dropped and counted, and the
//! protocol's retransmission recovers it. Signature checks happen before events get here.
//!
//! With a write-ahead log ([`crate::wal`]) every input is logged as it is handled, and each
//! turn's messages and replies leave only after the turn's inputs are durable. The core thread
//! does not wait for the disk: it hands each turn (its framed records and its outbound
//! messages) to a writer thread, which writes and syncs turns in order — several per
//! `fdatasync` when they queue up — and only then sends their messages. Timers stay on the core
//! thread: they are not outputs anyone can see. On start the loop first replays the log into the
//! fresh core, discarding what the replayed core says except its timers, and continues the
//! logged clock from where it stopped.

use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_core::{Action, Replica, Timer};
use tessera_types::{ReplicaId, ReplicaMessage, Request, StateMachine};
use tracing::{debug, info, warn};

use crate::counters::{DropReason, NodeCounters};
use crate::metrics::{CoreObservation, CoreSnapshot, ReplicaMetrics};
use crate::routes::{ReplyRoutes, StatusBoard};
use crate::salvage::Damage;
use crate::transport::PeerSender;
use crate::wal::{
    frame_record, prepare_log, Mark, PreparedLog, Record, RecordRef, Snapshot, Wal, WalError,
    WalReader,
};

/// Default capacity of the core's inbox, in events.
pub const CORE_INBOX_EVENTS_DEFAULT: usize = 65_536;
/// Most events handled before the core's actions are carried out.
const EVENTS_PER_TURN_MAX: usize = 1024;
/// How often the core publishes its status.
const STATUS_PERIOD: Duration = Duration::from_millis(100);
/// How long an event source waits before retrying a full inbox.
const INBOX_RETRY: Duration = Duration::from_millis(1);
/// Turns waiting for the writer thread before the core thread waits for it (backpressure).
const TURNS_QUEUED_MAX: usize = 64;

/// An input for the core thread.
#[derive(Debug)]
pub enum CoreEvent {
    /// A request straight from a client (shape already checked).
    Request(Request),
    /// A message from a replica, authenticated by its channel.
    Message {
        /// The sender.
        from: ReplicaId,
        /// The message.
        message: ReplicaMessage,
    },
    /// Stop the thread.
    Stop,
}

/// Why an event was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum InboxError {
    /// The inbox is full (counted as a drop).
    Full,
    /// The core thread has stopped.
    Closed,
}

/// The sending side of the core's bounded inbox.
#[derive(Clone)]
pub struct CoreInbox {
    sender: SyncSender<CoreEvent>,
    counters: Arc<NodeCounters>,
}

/// Creates the core's inbox.
pub fn core_inbox(
    capacity: usize,
    counters: Arc<NodeCounters>,
) -> (CoreInbox, Receiver<CoreEvent>) {
    let (sender, receiver) = std::sync::mpsc::sync_channel(capacity.max(1));
    (CoreInbox { sender, counters }, receiver)
}

impl CoreInbox {
    /// Queues an event if there is room; a full inbox drops and counts it.
    pub fn try_submit(&self, event: CoreEvent) -> Result<(), InboxError> {
        match self.sender.try_send(event) {
            Ok(()) => {
                self.counters.core_event_queued();
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.counters.dropped(DropReason::CoreQueueFull);
                Err(InboxError::Full)
            }
            Err(TrySendError::Disconnected(_)) => Err(InboxError::Closed),
        }
    }

    /// Queues an event, waiting while the inbox is full. Used for replica traffic, where
    /// waiting pushes back on the sender through TCP instead of losing protocol messages.
    pub async fn submit(&self, mut event: CoreEvent) -> Result<(), InboxError> {
        loop {
            match self.sender.try_send(event) {
                Ok(()) => {
                    self.counters.core_event_queued();
                    return Ok(());
                }
                Err(TrySendError::Full(returned)) => {
                    event = returned;
                    tokio::time::sleep(INBOX_RETRY).await;
                }
                Err(TrySendError::Disconnected(_)) => return Err(InboxError::Closed),
            }
        }
    }
}

/// Where the core thread's outputs go.
pub struct CoreOutputs {
    /// Outgoing peer queues.
    pub peers: PeerSender,
    /// Reply routing.
    pub replies: Arc<ReplyRoutes>,
    /// Status snapshot for the client port.
    pub status: Arc<StatusBoard>,
    /// Counts the events taken from the inbox (its depth is a metric).
    pub counters: Arc<NodeCounters>,
    /// Prometheus metrics.
    pub metrics: Arc<ReplicaMetrics>,
}

/// What a durable replica's core thread starts from: a replica already rebuilt from its log
/// ([`replay_log`]), and the log to go on with.
pub struct WalStart {
    /// The log, read to its end, to append to.
    pub log: WalReader,
    /// The snapshot the replica was restored from.
    pub restored: Option<Restored>,
    /// The timers the restored and replayed replica has armed.
    pub timers: BTreeMap<Timer, u64>,
    /// What replay did.
    pub replayed: Replayed,
    /// See [`crate::Durability::snapshot_after_log_bytes`].
    pub snapshot_after_log_bytes: u64,
    /// See [`crate::Durability::new_epoch`].
    pub new_epoch: bool,
    /// See [`crate::Durability::keep_previous_log`].
    pub keep_previous: bool,
}

/// What the driver needs of the snapshot a replica was restored from.
pub struct Restored {
    /// Its number.
    pub generation: u64,
    /// Its size.
    pub bytes: u64,
}

/// What [`replay_log`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Replayed {
    /// Records fed to the core.
    pub records: u64,
    /// Marks checked.
    pub marks: u64,
    /// The core time of the last record (the snapshot's clock if none): the core's clock
    /// continues from there, so it never goes back across a restart.
    pub last_ms: u64,
    /// The log ended with a state transfer whose snapshot was never written.
    pub cut_at_install: bool,
}

/// Why a log could not be replayed.
#[derive(Debug)]
pub struct ReplayFailure {
    /// What went wrong (boxed: the error is large and the happy path should not pay for it).
    pub error: Box<WalError>,
    /// Which part of the log is damaged — a record that fails its checksum —; `None` when the
    /// failure is not damage (a read error of the disk, a record that passed its check but does
    /// not replay): nothing may be salvaged then.
    pub damage: Option<Damage>,
}

/// Feeds the records of `reader` to `replica` (fresh, or restored from the snapshot the log
/// starts with, whose clock is `clock_ms` and whose armed timers are in `timers`). What the
/// replayed core asks for is dropped — its messages went out before the crash or never: peers
/// fetch what they miss, clients retry — except its timers, which the core thread must keep.
/// Every mark must match the replica's status after the records before it.
pub fn replay_log<S: StateMachine>(
    replica: &mut Replica<S>,
    timers: &mut BTreeMap<Timer, u64>,
    reader: &mut WalReader,
    clock_ms: u64,
) -> Result<Replayed, ReplayFailure> {
    let started = Instant::now();
    let mut replayed = Replayed {
        last_ms: clock_ms,
        ..Replayed::default()
    };
    // The record just read passed its check but cannot be carried out: not damage.
    let bad_record = |reader: &WalReader, problem: String| ReplayFailure {
        error: Box::new(WalError::Unreadable {
            path: reader.path().to_path_buf(),
            offset: reader.offset(),
            problem,
        }),
        damage: None,
    };
    loop {
        let record = match reader.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(error) => {
                let damage = matches!(error, WalError::Corrupt { .. })
                    .then(|| Damage::RecordsFrom(reader.records()));
                return Err(ReplayFailure {
                    error: Box::new(error),
                    damage,
                });
            }
        };
        match record {
            Record::Start { now_ms, wall_ms } => {
                replayed.last_ms = now_ms;
                replica.start(now_ms, wall_ms);
            }
            Record::Request {
                now_ms,
                wall_ms,
                request,
            } => {
                replayed.last_ms = now_ms;
                replica.handle_request(now_ms, wall_ms, request);
            }
            Record::Message {
                now_ms,
                wall_ms,
                from,
                message,
            } => {
                replayed.last_ms = now_ms;
                replica.handle_message(now_ms, wall_ms, from, message);
            }
            Record::Timer {
                now_ms,
                wall_ms,
                timer,
            } => {
                replayed.last_ms = now_ms;
                let Some(timer) = timer_of_code(timer) else {
                    return Err(bad_record(reader, format!("unknown timer code {timer}")));
                };
                replica.handle_timer(now_ms, wall_ms, timer);
            }
            Record::StartEpoch {
                now_ms,
                wall_ms,
                at_least,
            } => {
                replayed.last_ms = now_ms;
                if let Err(error) = replica.start_epoch_at_least(now_ms, wall_ms, at_least) {
                    return Err(bad_record(
                        reader,
                        format!("the USIG cannot start the logged epoch: {error}"),
                    ));
                }
            }
            Record::Installed { seq } => {
                // Its snapshot never replaced the log, so nothing from here on left the
                // replica: the log ends here, and the transfer starts again when peers are
                // reached.
                warn!(
                    seq,
                    "the log ends with a state transfer whose snapshot was never written; \
                     restarting from before it"
                );
                reader.cut_before_last();
                replayed.cut_at_install = true;
                break;
            }
            Record::Mark(expected) => {
                replayed.marks += 1;
                let actual = Mark::of(&replica.status());
                if actual != expected {
                    return Err(ReplayFailure {
                        error: Box::new(WalError::Diverged {
                            path: reader.path().to_path_buf(),
                            record: reader.records(),
                            expected,
                            actual,
                        }),
                        // Every record passed its check: the disk gave back what was written,
                        // so this is non-determinism, a bug, or a changed configuration, and a
                        // salvage would throw away acknowledged history on every replica
                        // running this executable. The replica stops and says so.
                        damage: None,
                    });
                }
            }
        }
        for action in replica.take_actions() {
            match action {
                Action::SetTimer { timer, deadline_ms } => {
                    timers.insert(timer, deadline_ms);
                }
                Action::CancelTimer(timer) => {
                    timers.remove(&timer);
                }
                _ => {}
            }
        }
    }
    replayed.records = reader.records();
    if replayed.records > 0 {
        info!(
            records = replayed.records,
            marks = replayed.marks,
            last_executed = replica.last_executed().0,
            view = replica.view().0,
            seconds = started.elapsed().as_secs_f64(),
            "replayed the write-ahead log"
        );
    }
    Ok(replayed)
}

/// The driver's timers as a snapshot saved them (codes the log format fixes).
pub fn timers_of_codes(saved: &[(u8, u64)]) -> BTreeMap<Timer, u64> {
    saved
        .iter()
        .filter_map(|(code, deadline_ms)| Some((timer_of_code(*code)?, *deadline_ms)))
        .collect()
}

/// Starts the core thread. It runs until it receives [`CoreEvent::Stop`] or every inbox
/// sender is gone; with a log (`wal`, already replayed: [`replay_log`]), it first takes it
/// over. It stops with an error if the log cannot be written: without a durable log it must not
/// say anything more.
pub fn spawn_core_thread<S: StateMachine>(
    replica: Replica<S>,
    inbox: Receiver<CoreEvent>,
    outputs: CoreOutputs,
    wal: Option<WalStart>,
) -> std::io::Result<std::thread::JoinHandle<Result<(), WalError>>> {
    let id = replica.id();
    let dispatcher = Dispatcher {
        peers: outputs.peers.clone(),
        replies: outputs.replies.clone(),
        metrics: outputs.metrics.clone(),
        others: u64::from(replica.config().n.saturating_sub(1)),
    };
    std::thread::Builder::new()
        .name(format!("tessera-core-{id}"))
        .spawn(move || {
            let span = tracing::info_span!("core", replica = %id);
            let _entered = span.enter();
            CoreLoop {
                replica,
                outputs,
                dispatcher,
                clock: Instant::now(),
                clock_base_ms: 0,
                timers: BTreeMap::new(),
                observation: CoreObservation::default(),
                pending: None,
                writer: None,
                snapshots: SnapshotPolicy::default(),
                installed_seen: 0,
            }
            .run(inbox, wal)
        })
}

/// An output that must wait until the inputs it came from are durable.
enum Outbound {
    Send(ReplicaId, ReplicaMessage),
    Broadcast(ReplicaMessage),
    Reply(tessera_types::Reply),
}

impl Outbound {
    /// True for messages that may leave before the inputs that led to them are durable: if the
    /// replica crashes and forgets those inputs, nothing it sent contradicts what it says after
    /// the restart, nothing a peer relies on is lost, and no client saw a result. That holds
    /// for requests (FETCH, FETCH-NEW-VIEW, STATE-REQUEST, PARTITION-REQUEST) and for
    /// PARTITION-REPLY, which carries only partition bytes of a checkpoint state the asker
    /// checks against an `f + 1` certificate. Everything that carries one of this replica's
    /// USIG certificates waits — every certified message, a retransmission, and also a
    /// STATE-SUMMARY, whose anchors and certificate may hold this replica's newest CHECKPOINT
    /// (sent early and then forgotten in a crash, its counter value could certify something
    /// else after the restart). So does every HEARTBEAT (its acknowledgements let peers drop
    /// messages this replica might need again) and every client reply. State transfer is what
    /// this speeds up: the next PARTITION-REQUESTs need not wait for the disk (the chunks
    /// themselves are not logged; see `Record::Installed`).
    fn may_precede_durability(&self) -> bool {
        let message = match self {
            Outbound::Send(_, message) | Outbound::Broadcast(message) => message,
            Outbound::Reply(_) => return false,
        };
        matches!(
            message,
            ReplicaMessage::Fetch(_)
                | ReplicaMessage::FetchNewView { .. }
                | ReplicaMessage::StateRequest(_)
                | ReplicaMessage::PartitionRequest(_)
                | ReplicaMessage::PartitionReply(_)
        )
    }
}

/// Carries out outbound actions (on the core thread without a log, on the writer thread with).
#[derive(Clone)]
struct Dispatcher {
    peers: PeerSender,
    replies: Arc<ReplyRoutes>,
    metrics: Arc<ReplicaMetrics>,
    /// Number of other replicas (destinations of a broadcast).
    others: u64,
}

impl Dispatcher {
    fn carry_out(&self, outbound: Vec<Outbound>) {
        for item in outbound {
            match item {
                Outbound::Send(to, message) => {
                    self.metrics.message_sent(&message, 1);
                    self.peers
                        .send(to, Bytes::from(tessera_types::encode(&message)));
                }
                Outbound::Broadcast(message) => {
                    self.metrics.message_sent(&message, self.others);
                    self.peers
                        .broadcast(Bytes::from(tessera_types::encode(&message)));
                }
                Outbound::Reply(reply) => self.replies.deliver(reply),
            }
        }
    }
}

/// One turn of the core thread on its way to the disk: its framed records (ending with the
/// turn's mark) and what it may send once they are durable.
struct Turn {
    records: Vec<u8>,
    outbound: Vec<Outbound>,
    /// This turn installed a transferred state: its outputs, and those of every turn after it,
    /// wait until a snapshot taken after it has replaced the log (the log alone cannot rebuild
    /// that state; `Record::Installed`).
    holds: bool,
}

/// What the writer thread takes, in order.
enum Written {
    Turn(Turn),
    /// A snapshot covering every turn before it: written on its own thread while turns go on,
    /// then the log is replaced (see [`Wal::finish_rotation`]).
    Snapshot(PendingSnapshot),
}

/// A snapshot captured by the core thread, still to be encoded.
struct PendingSnapshot {
    /// Taken after a state transfer: it must be written (a failure stops the replica), and
    /// held outputs go out once it replaces the log.
    install: bool,
    generation: u64,
    clock_ms: u64,
    timers: Vec<(u8, u64)>,
    encode: Box<dyn FnOnce() -> Vec<u8> + Send>,
}

/// A snapshot being encoded and written on its own thread.
struct SnapshotInFlight {
    /// See [`PendingSnapshot::install`].
    install: bool,
    /// The log's length when it was taken: what it covers.
    cut: u64,
    generation: u64,
    started: Instant,
    done: Receiver<Result<(PreparedLog, usize), WalError>>,
}

/// How often the writer looks at a snapshot in flight while no turn arrives.
const SNAPSHOT_POLL: Duration = Duration::from_millis(20);

/// When the core thread takes a snapshot.
#[derive(Default)]
struct SnapshotPolicy {
    /// Log bytes after which to take one (0: never).
    after_log_bytes: u64,
    /// Bytes logged since the last one.
    logged: u64,
    /// Size of the last one, set by the writer once it is written.
    last_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Number of the last one (0: none yet).
    generation: u64,
    /// A state transfer was installed since the last one: take one as soon as the core can.
    install_due: bool,
}

/// Starts encoding and writing `pending` on its own thread; it covers the log as it is now.
fn start_snapshot(wal: &Wal, pending: PendingSnapshot) -> Result<SnapshotInFlight, WalError> {
    let (log_path, owner) = wal.target();
    let (sender, done) = std::sync::mpsc::channel();
    let generation = pending.generation;
    let install = pending.install;
    std::thread::Builder::new()
        .name("tessera-snapshot".into())
        .spawn(move || {
            let core = (pending.encode)();
            let bytes = core.len();
            let snapshot = Snapshot {
                generation: pending.generation,
                clock_ms: pending.clock_ms,
                timers: pending.timers,
                core,
            };
            let prepared =
                prepare_log(&log_path, owner, &snapshot, install).map(|log| (log, bytes));
            let _ = sender.send(prepared);
        })
        .map_err(|source| WalError::Io {
            path: wal.target().0,
            action: "start the snapshot thread",
            error: source,
        })?;
    Ok(SnapshotInFlight {
        install,
        cut: wal.committed_bytes(),
        generation,
        started: Instant::now(),
        done,
    })
}

/// Replaces the log if the snapshot in flight is written (waiting for it if `wait`); returns it
/// if it is still being written.
fn finish_snapshot(
    wal: &mut Wal,
    snapshot: SnapshotInFlight,
    wait: bool,
    last_snapshot_bytes: &std::sync::atomic::AtomicU64,
) -> Result<Option<SnapshotInFlight>, WalError> {
    let result = if wait {
        snapshot.done.recv().ok()
    } else {
        match snapshot.done.try_recv() {
            Ok(result) => Some(result),
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(Some(snapshot)),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        }
    };
    let Some(result) = result else {
        if snapshot.install {
            return Err(WalError::Io {
                path: wal.target().0,
                action: "write the snapshot after a state transfer",
                error: std::io::Error::other("the snapshot thread stopped without a result"),
            });
        }
        warn!("the snapshot thread stopped without a result; the log keeps growing");
        return Ok(None);
    };
    // The old log is intact and holds everything: a snapshot that could not be written (a full
    // disk, say) costs the compaction, not the replica. Errors of the rotation itself stay
    // fatal: after its rename the writer must not go on appending to the old file. So is a
    // snapshot after a state transfer that cannot be written: only it can make that state
    // durable, so the outputs held for it can never leave. The replica stops; on restart the
    // log ends before the transfer (`Record::Installed`), its old state intact.
    let (prepared, bytes) = match result {
        Ok(prepared) => prepared,
        Err(error) if snapshot.install => return Err(error),
        Err(error) => {
            warn!(%error, "could not write a snapshot; the log keeps growing");
            let (log_path, _) = wal.target();
            let _ = std::fs::remove_file(crate::wal::temporary_path(&log_path));
            return Ok(None);
        }
    };
    wal.finish_rotation(prepared, snapshot.cut)?;
    // The next snapshot waits until the log is at least this large again, so rewriting the
    // state costs at most what writing the log does.
    last_snapshot_bytes.store(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    info!(
        generation = snapshot.generation,
        bytes,
        seconds = snapshot.started.elapsed().as_secs_f64(),
        "took a snapshot; the log starts over"
    );
    Ok(None)
}

/// After a snapshot replaced the log: if it was an install snapshot and no turn installed
/// another state after it was started, the log now starts with a snapshot of every installed
/// state, so the outputs held since the install may leave.
fn release(
    install: bool,
    hold_after_snapshot: bool,
    held: &mut Option<VecDeque<Outbound>>,
    dispatcher: &Dispatcher,
) {
    if install && !hold_after_snapshot {
        if let Some(outbound) = held.take() {
            info!(
                outputs = outbound.len(),
                "released the outputs held since a state transfer"
            );
            dispatcher.carry_out(Vec::from(outbound));
        }
    }
}

/// Most outputs held while an installed state is not yet durable. Past it the oldest are
/// dropped: an output never sent is message loss, which the protocol repairs (peers fetch,
/// clients retry), so this bounds memory when another transfer keeps the snapshot waiting.
const HELD_OUTPUTS_MAX: usize = 65_536;

fn hold(held: &mut VecDeque<Outbound>, outbound: Vec<Outbound>) {
    held.extend(outbound);
    if held.len() > HELD_OUTPUTS_MAX {
        let excess = held.len() - HELD_OUTPUTS_MAX;
        held.drain(..excess);
        debug!(dropped = excess, "dropped the oldest held outputs");
    }
}

/// The writer thread and the queue to it.
struct WalWriter {
    turns: SyncSender<Written>,
    thread: std::thread::JoinHandle<Result<(), WalError>>,
}

impl WalWriter {
    fn spawn(
        mut wal: Wal,
        dispatcher: Dispatcher,
        id: ReplicaId,
        last_snapshot_bytes: Arc<std::sync::atomic::AtomicU64>,
    ) -> std::io::Result<WalWriter> {
        let (turns, queue) = std::sync::mpsc::sync_channel::<Written>(TURNS_QUEUED_MAX);
        let thread = std::thread::Builder::new()
            .name(format!("tessera-wal-{id}"))
            .spawn(move || {
                let mut in_flight: Option<SnapshotInFlight> = None;
                let mut next: Option<Written> = None;
                // Outputs held since a turn installed a transferred state, and whether a turn
                // installed one after the last install snapshot was started (then that snapshot
                // does not cover it, and the outputs wait for the next one).
                let mut held: Option<VecDeque<Outbound>> = None;
                let mut hold_after_snapshot = false;
                // Ends when the core thread drops its sender, after writing what it queued.
                loop {
                    let item = match next.take() {
                        Some(item) => Some(item),
                        None => match queue.recv_timeout(SNAPSHOT_POLL) {
                            Ok(item) => Some(item),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => break,
                        },
                    };
                    match item {
                        None => {}
                        Some(Written::Snapshot(pending)) if pending.install => {
                            // Never skipped: wait for one still being written, then start it.
                            if let Some(snapshot) = in_flight.take() {
                                let install = snapshot.install;
                                finish_snapshot(&mut wal, snapshot, true, &last_snapshot_bytes)?;
                                release(install, hold_after_snapshot, &mut held, &dispatcher);
                            }
                            hold_after_snapshot = false;
                            in_flight = Some(start_snapshot(&wal, pending)?);
                        }
                        Some(Written::Snapshot(pending)) => {
                            if in_flight.is_some() {
                                debug!("a snapshot is still being written; skipping this one");
                            } else {
                                in_flight = Some(start_snapshot(&wal, pending)?);
                            }
                        }
                        Some(Written::Turn(first)) => {
                            // Turns queued behind each other share one sync.
                            let mut batch = vec![first];
                            while batch.len() < TURNS_QUEUED_MAX {
                                match queue.try_recv() {
                                    Ok(Written::Turn(turn)) => batch.push(turn),
                                    Ok(snapshot) => {
                                        next = Some(snapshot);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            let parts: Vec<&[u8]> =
                                batch.iter().map(|turn| turn.records.as_slice()).collect();
                            // On an error nothing of these turns is sent, and the thread stops:
                            // the core thread sees the queue close and stops the replica.
                            wal.write_and_sync(&parts)?;
                            for turn in batch {
                                if turn.holds {
                                    held.get_or_insert_with(VecDeque::new);
                                    hold_after_snapshot = true;
                                }
                                match held.as_mut() {
                                    Some(held) => hold(held, turn.outbound),
                                    None => dispatcher.carry_out(turn.outbound),
                                }
                            }
                        }
                    }
                    if let Some(snapshot) = in_flight.take() {
                        let install = snapshot.install;
                        in_flight =
                            finish_snapshot(&mut wal, snapshot, false, &last_snapshot_bytes)?;
                        if in_flight.is_none() {
                            release(install, hold_after_snapshot, &mut held, &dispatcher);
                        }
                    }
                }
                if let Some(snapshot) = in_flight.take() {
                    let install = snapshot.install;
                    finish_snapshot(&mut wal, snapshot, true, &last_snapshot_bytes)?;
                    release(install, hold_after_snapshot, &mut held, &dispatcher);
                }
                // Anything still held was never made durable with its state: it is dropped,
                // and the next start cuts the log before the transfer.
                Ok(())
            })?;
        Ok(WalWriter { turns, thread })
    }

    /// Queues a turn or snapshot; if the writer has stopped, returns its error.
    fn submit(slot: &mut Option<WalWriter>, item: Written) -> Result<(), WalError> {
        let writer = slot.as_ref().expect("a replica with a log has a writer");
        if writer.turns.send(item).is_ok() {
            return Ok(());
        }
        Self::finish(slot.take())
    }

    /// Waits for the writer to write and send everything queued.
    fn finish(writer: Option<WalWriter>) -> Result<(), WalError> {
        let Some(WalWriter { turns, thread }) = writer else {
            return Ok(());
        };
        drop(turns);
        match thread.join() {
            Ok(result) => result,
            Err(_) => panic!("the write-ahead log's writer thread panicked"),
        }
    }
}

struct CoreLoop<S: StateMachine> {
    replica: Replica<S>,
    outputs: CoreOutputs,
    dispatcher: Dispatcher,
    clock: Instant,
    /// Core time when `clock` started: the last logged time after a replay, so the core's
    /// clock never goes back across a restart.
    clock_base_ms: u64,
    timers: BTreeMap<Timer, u64>,
    observation: CoreObservation,
    /// Records of the current turn, framed (`Some` when the replica keeps a log).
    pending: Option<Vec<u8>>,
    /// The thread that makes turns durable and then sends their outputs.
    writer: Option<WalWriter>,
    snapshots: SnapshotPolicy,
    /// `Replica::transfers_installed` as of the last turn: a rise means this turn installed a
    /// transferred state, which the log cannot rebuild (its chunks are not logged).
    installed_seen: u64,
}

/// The log's code for each timer (part of the log format: never renumber).
fn timer_code(timer: Timer) -> u8 {
    match timer {
        Timer::Request => 0,
        Timer::ViewChange => 1,
        Timer::Heartbeat => 2,
    }
}

fn timer_of_code(code: u8) -> Option<Timer> {
    match code {
        0 => Some(Timer::Request),
        1 => Some(Timer::ViewChange),
        2 => Some(Timer::Heartbeat),
        _ => None,
    }
}

/// The host's wall clock in milliseconds since the Unix epoch (0 if the clock is set before
/// it). The core never reads it: the driver passes it in with every input and logs it, so a
/// replay feeds the core the very same values.
pub(crate) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl<S: StateMachine> CoreLoop<S> {
    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.clock_base_ms.saturating_add(elapsed)
    }

    fn run(mut self, inbox: Receiver<CoreEvent>, wal: Option<WalStart>) -> Result<(), WalError> {
        info!("core thread started");
        let mut started = false;
        let mut new_epoch = false;
        let mut log_path = None;
        if let Some(start) = wal {
            new_epoch = start.new_epoch;
            log_path = Some(start.log.path().to_path_buf());
            started = start.replayed.records > 0 || start.restored.is_some();
            self.snapshots.after_log_bytes = start.snapshot_after_log_bytes;
            if let Some(restored) = &start.restored {
                self.snapshots
                    .last_bytes
                    .store(restored.bytes, std::sync::atomic::Ordering::Relaxed);
                self.snapshots.generation = restored.generation;
            }
            self.resume_log(start)?;
        }
        if new_epoch && started {
            return Err(WalError::Foreign {
                path: log_path.unwrap_or_default(),
                problem: "holds this replica's history, but --new-epoch says its log was lost"
                    .into(),
                fix: "start the replica without --new-epoch: it restarts from its log",
            });
        }
        if !started {
            let now_ms = self.now_ms();
            let wall_ms = wall_clock_ms();
            self.log(|| RecordRef::Start { now_ms, wall_ms });
            self.replica.start(now_ms, wall_ms);
            if new_epoch {
                // An in-process USIG keeps no memory of its epochs: the wall clock in ms is above
                // every epoch this replica can have used (each was chosen the same way, earlier),
                // and the log keeps it so that replay reaches the same epoch.
                let at_least = wall_ms;
                self.log(|| RecordRef::StartEpoch {
                    now_ms,
                    wall_ms,
                    at_least,
                });
                let epoch = self
                    .replica
                    .start_epoch_at_least(now_ms, wall_ms, at_least)
                    .map_err(|error| WalError::Foreign {
                        path: log_path.clone().unwrap_or_default(),
                        problem: format!("cannot start a new USIG epoch: {error}"),
                        fix: "re-key the cluster (`tessera init --force`)",
                    })?;
                info!(epoch, "started empty in a new USIG epoch (--new-epoch)");
            }
        }
        self.execute_actions()?;
        let mut next_status = Instant::now();
        loop {
            self.fire_due_timers()?;
            if Instant::now() >= next_status {
                self.publish_status();
                next_status = Instant::now() + STATUS_PERIOD;
            }
            let wait = self.time_until_next_deadline().min(STATUS_PERIOD);
            let first = match inbox.recv_timeout(wait) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if !self.handle(first) {
                break;
            }
            // Drain what is already there, then act once for the whole turn.
            let mut handled = 1;
            let mut stop = false;
            while handled < EVENTS_PER_TURN_MAX {
                let Ok(event) = inbox.try_recv() else { break };
                handled += 1;
                if !self.handle(event) {
                    stop = true;
                    break;
                }
            }
            self.execute_actions()?;
            if stop {
                break;
            }
        }
        self.execute_actions()?;
        WalWriter::finish(self.writer.take())?;
        self.publish_status();
        info!(rejections = ?self.replica.rejections(), "core thread stopped");
        Ok(())
    }

    /// Takes over the log the replica was rebuilt from ([`replay_log`]): cuts off a torn tail,
    /// starts the writer thread on it, and continues the core's clock and timers from where
    /// replay left them.
    fn resume_log(&mut self, start: WalStart) -> Result<(), WalError> {
        let WalStart {
            log,
            timers,
            replayed,
            keep_previous,
            ..
        } = start;
        if let Some(offset) = log.torn_at().filter(|_| !replayed.cut_at_install) {
            warn!(offset, "the log's last write was torn by a crash; cut off");
        }
        let mut wal = log.into_wal()?;
        wal.keep_previous(keep_previous);
        if replayed.records > 0 {
            // A mark at once, so that the log never ends with a record a salvage wrote: a
            // damaged last record counts as a torn write and is cut off, and a salvage's
            // `StartEpoch` cut off would resume the old epoch. (The mark matches on replay: no
            // input comes between.)
            let mut frame = Vec::new();
            frame_record(
                &mut frame,
                &RecordRef::Mark(Mark::of(&self.replica.status())),
            );
            wal.write_and_sync(&[&frame])?;
        }
        self.writer = Some(
            WalWriter::spawn(
                wal,
                self.dispatcher.clone(),
                self.replica.id(),
                self.snapshots.last_bytes.clone(),
            )
            .map_err(|source| WalError::Io {
                path: PathBuf::from("(writer thread)"),
                action: "start the log's writer thread",
                error: source,
            })?,
        );
        self.pending = Some(Vec::new());
        self.installed_seen = self.replica.transfers_installed();
        self.timers = timers;
        self.clock_base_ms = replayed.last_ms;
        self.clock = Instant::now();
        Ok(())
    }

    /// Replaces the log with a snapshot once it has grown past the policy's bound and past the
    /// last snapshot's size (so rewriting the state costs no more than the log it replaces).
    fn snapshot_if_due(&mut self) -> Result<(), WalError> {
        let policy = &self.snapshots;
        let last_bytes = policy.last_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let install = policy.install_due;
        let due = install
            || (policy.after_log_bytes > 0
                && policy.logged >= policy.after_log_bytes.max(last_bytes));
        if !due || !self.replica.can_snapshot() {
            return Ok(());
        }
        // Only the capture happens here (copy-on-write freezes and a copy of the protocol
        // state); encoding and writing, proportional to the state, happen on another thread.
        let capture = self.replica.capture();
        let pending = PendingSnapshot {
            install,
            generation: self.snapshots.generation + 1,
            clock_ms: self.now_ms(),
            timers: self
                .timers
                .iter()
                .map(|(timer, deadline_ms)| (timer_code(*timer), *deadline_ms))
                .collect(),
            encode: Box::new(move || capture.encode()),
        };
        self.snapshots.generation = pending.generation;
        self.snapshots.logged = 0;
        self.snapshots.install_due = false;
        WalWriter::submit(&mut self.writer, Written::Snapshot(pending))
    }

    /// Logs an input about to be handled (built lazily: nothing is encoded without a log).
    fn log<'a>(&mut self, record: impl FnOnce() -> RecordRef<'a>) {
        if let Some(pending) = self.pending.as_mut() {
            frame_record(pending, &record());
        }
    }

    fn publish_status(&mut self) {
        let status = self.replica.status();
        self.outputs.metrics.status(&status);
        self.outputs
            .metrics
            .peer_queues(&self.outputs.peers.queue_depths());
        self.outputs.status.publish(status);
    }

    /// Feeds one event to the core; false on `Stop`.
    fn handle(&mut self, event: CoreEvent) -> bool {
        self.outputs.counters.core_event_taken();
        let now_ms = self.now_ms();
        let wall_ms = wall_clock_ms();
        match event {
            CoreEvent::Request(request) => {
                self.log(|| RecordRef::Request {
                    now_ms,
                    wall_ms,
                    request: &request,
                });
                self.replica.handle_request(now_ms, wall_ms, request)
            }
            CoreEvent::Message { from, message } => {
                self.outputs.metrics.message_received(&message);
                // Partition chunks are not logged: a transfer would need its state's size on
                // disk twice (in the log, then in the snapshot that compacts it). The state
                // they build becomes durable through the snapshot taken once it is installed
                // (`Record::Installed`); a replay without them leaves the transfer unfinished,
                // and it resumes from the peers.
                let chunk = matches!(
                    &message,
                    ReplicaMessage::PartitionReply(reply) if reply.chunk.is_some()
                );
                if !chunk {
                    self.log(|| RecordRef::Message {
                        now_ms,
                        wall_ms,
                        from,
                        message: &message,
                    });
                }
                self.replica.handle_message(now_ms, wall_ms, from, message)
            }
            CoreEvent::Stop => return false,
        }
        true
    }

    fn time_until_next_deadline(&self) -> Duration {
        let now_ms = self.now_ms();
        match self.timers.values().min() {
            Some(deadline_ms) => Duration::from_millis(deadline_ms.saturating_sub(now_ms)),
            None => STATUS_PERIOD,
        }
    }

    fn fire_due_timers(&mut self) -> Result<(), WalError> {
        // Bounded: each pass removes a timer before firing it; a handler that re-arms with a
        // past deadline waits for the next turn rather than looping here.
        let now_ms = self.now_ms();
        let wall_ms = wall_clock_ms();
        let due: Vec<Timer> = self
            .timers
            .iter()
            .filter(|(_, deadline_ms)| **deadline_ms <= now_ms)
            .map(|(timer, _)| *timer)
            .collect();
        for timer in due {
            self.timers.remove(&timer);
            debug!(?timer, "timer fired");
            let code = timer_code(timer);
            self.log(|| RecordRef::Timer {
                now_ms,
                wall_ms,
                timer: code,
            });
            self.replica.handle_timer(now_ms, wall_ms, timer);
        }
        self.execute_actions()
    }

    /// Carries out the core's actions: timers at once; messages and replies at once without a
    /// log, or through the writer thread once the turn's inputs are durable.
    fn execute_actions(&mut self) -> Result<(), WalError> {
        let mut outbound = Vec::new();
        for action in self.replica.take_actions() {
            match action {
                Action::Send { to, message } => outbound.push(Outbound::Send(to, message)),
                Action::Broadcast { message } => outbound.push(Outbound::Broadcast(message)),
                Action::Reply(reply) => outbound.push(Outbound::Reply(reply)),
                Action::SetTimer { timer, deadline_ms } => {
                    self.timers.insert(timer, deadline_ms);
                }
                Action::CancelTimer(timer) => {
                    self.timers.remove(&timer);
                }
                Action::Executed {
                    batch, executed, ..
                } => self
                    .outputs
                    .metrics
                    .batch_executed(batch.len(), executed.len()),
            }
        }
        match self.pending.as_mut() {
            None => self.dispatcher.carry_out(outbound),
            Some(pending) => {
                // Requests for data and answers that carry only certified state commit the
                // replica to nothing: they leave now, without waiting for the disk.
                let (early, outbound): (Vec<Outbound>, Vec<Outbound>) = outbound
                    .into_iter()
                    .partition(Outbound::may_precede_durability);
                if !early.is_empty() {
                    self.dispatcher.carry_out(early);
                }
                let installed = self.replica.transfers_installed();
                let holds = installed > self.installed_seen;
                if holds {
                    self.installed_seen = installed;
                    self.snapshots.install_due = true;
                    let seq = self.replica.last_executed().0;
                    frame_record(pending, &RecordRef::Installed { seq });
                }
                // Every output comes from a logged input, but a turn with outputs and no new
                // records still goes through the writer, behind the turns before it.
                if !pending.is_empty() {
                    frame_record(pending, &RecordRef::Mark(Mark::of(&self.replica.status())));
                }
                if !pending.is_empty() || !outbound.is_empty() {
                    let records = std::mem::take(pending);
                    self.snapshots.logged += records.len() as u64;
                    let turn = Turn {
                        records,
                        outbound,
                        holds,
                    };
                    WalWriter::submit(&mut self.writer, Written::Turn(turn))?;
                }
                self.snapshot_if_due()?;
            }
        }
        // Getters only: cheap enough for every turn, so no view change or checkpoint is missed.
        self.observation.observe(
            &self.outputs.metrics,
            CoreSnapshot {
                view: self.replica.view().0,
                view_changing: self.replica.is_view_changing(),
                stable_checkpoint: self.replica.stable_checkpoint().seq.0,
                last_executed: self.replica.last_executed().0,
                transferring: self.replica.is_transferring_state(),
                rejections: self.replica.rejections(),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crypto::Digest;
    use tessera_types::{
        Checkpoint, CheckpointCertificate, Heartbeat, PartitionReply, PartitionRequest, SeqNum,
        StateRequest, StateSummary, Ui, View,
    };

    fn early(message: ReplicaMessage) -> bool {
        Outbound::Broadcast(message).may_precede_durability()
    }

    /// Only messages that carry none of this replica's USIG certificates and no
    /// acknowledgement may overtake the disk.
    #[test]
    fn only_requests_and_partition_bytes_leave_before_the_log_is_synced() {
        assert!(early(ReplicaMessage::StateRequest(StateRequest {
            replica: ReplicaId(1),
            min_seq: SeqNum(4),
        })));
        assert!(early(ReplicaMessage::PartitionRequest(PartitionRequest {
            replica: ReplicaId(1),
            seq: SeqNum(4),
            state_digest: Digest([1; 32]),
            partition: 3,
            cursor: None,
            digest_only: true,
        })));
        // A digest answer, like a chunk, is a function of a certified state alone.
        assert!(early(ReplicaMessage::PartitionReply(PartitionReply {
            replica: ReplicaId(1),
            seq: SeqNum(4),
            partition: 3,
            cursor: None,
            chunk: None,
            digest: Some(Digest([2; 32])),
        })));
        let checkpoint = Checkpoint {
            replica: ReplicaId(1),
            seq: SeqNum(4),
            state_digest: Digest([1; 32]),
            view: View(0),
            epochs: Vec::new(),
            ui: Ui {
                epoch: 0,
                counter: 7,
                certificate: vec![0; 32],
            },
        };
        // A summary's anchors and certificate can hold this replica's newest CHECKPOINT.
        assert!(!early(ReplicaMessage::StateSummary(StateSummary {
            replica: ReplicaId(1),
            certificate: CheckpointCertificate {
                seq: SeqNum(4),
                state_digest: Digest([1; 32]),
                checkpoints: vec![checkpoint.clone()],
            },
            partitions: Vec::new(),
            clients: Vec::new(),
            anchors: vec![checkpoint.clone()],
        })));
        assert!(!early(ReplicaMessage::Checkpoint(checkpoint)));
        assert!(!early(ReplicaMessage::Heartbeat(Heartbeat {
            replica: ReplicaId(1),
            view: View(0),
            epoch: 0,
            head_counter: 9,
            last_executed: SeqNum(4),
            stable_checkpoint: SeqNum(0),
            processed: vec![1, 1, 1],
            epochs: Vec::new(),
        })));
    }
}

/// The writer thread's hold on outputs after a state transfer's install (STATE.md §4).
#[cfg(test)]
mod hold_tests {
    use super::*;
    use crate::transport::{spawn_peer_writers, PeerMesh, PEER_QUEUE_FRAMES_DEFAULT};
    use crate::wal::{recover, Record, WalOwner};
    use tessera_crypto::Digest;
    use tessera_types::{Heartbeat, SeqNum, View};
    use tokio::task::JoinSet;

    fn owner() -> WalOwner {
        WalOwner {
            replica: ReplicaId(0),
            fingerprint: Digest([3; 32]),
        }
    }

    /// A turn with one timer input (and, if `installed`, the install record), its mark, and a
    /// HEARTBEAT for replica 1 (an output that waits for the disk).
    fn turn(now_ms: u64, installed: bool) -> Written {
        let mut records = Vec::new();
        frame_record(
            &mut records,
            &RecordRef::Timer {
                now_ms,
                wall_ms: 1_700_000_000_000 + now_ms,
                timer: 2,
            },
        );
        if installed {
            frame_record(&mut records, &RecordRef::Installed { seq: 64 });
        }
        let mark = Mark {
            view: 0,
            view_changing: false,
            last_executed: now_ms,
            stable_checkpoint: 0,
            usig_counter: now_ms,
        };
        frame_record(&mut records, &RecordRef::Mark(mark));
        let heartbeat = ReplicaMessage::Heartbeat(Heartbeat {
            replica: ReplicaId(0),
            view: View(0),
            epoch: 0,
            head_counter: now_ms,
            last_executed: SeqNum(now_ms),
            stable_checkpoint: SeqNum(0),
            processed: Vec::new(),
            epochs: Vec::new(),
        });
        Written::Turn(Turn {
            records,
            outbound: vec![Outbound::Send(ReplicaId(1), heartbeat)],
            holds: installed,
        })
    }

    /// Frames queued for replica 1 (down, so they stay queued) once `wanted` are there, or
    /// after `patience`.
    fn queued(peers: &PeerSender, wanted: usize, patience: Duration) -> usize {
        let deadline = Instant::now() + patience;
        loop {
            let depth = peers.queue_depths()[0].1;
            if depth >= wanted || Instant::now() > deadline {
                return depth;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A turn before the install goes out once synced; the install turn's output and a later
    /// turn's wait — also after a normal snapshot — until the install snapshot has replaced the
    /// log, and then go out; the new log starts with that snapshot and holds no install record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn outputs_after_an_install_wait_until_its_snapshot_replaces_the_log() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-0.wal");
        let wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        let counters = Arc::new(NodeCounters::default());
        let mut tasks = JoinSet::new();
        // Replica 1 listens nowhere (port 9 on loopback): its frames stay in the queue, where
        // the test counts them.
        let mesh = PeerMesh {
            me: ReplicaId(0),
            addresses: vec!["127.0.0.1:9".into(), "127.0.0.1:9".into()],
            pairwise_keys: Arc::new(vec![[1; 32], [1; 32]]),
        };
        let peers = spawn_peer_writers(
            &mesh,
            PEER_QUEUE_FRAMES_DEFAULT,
            counters.clone(),
            &mut tasks,
        );
        let dispatcher = Dispatcher {
            peers: peers.clone(),
            replies: Arc::new(ReplyRoutes::new(16, counters.clone())),
            metrics: Arc::new(ReplicaMetrics::new(ReplicaId(0), counters.clone())),
            others: 1,
        };
        let last_snapshot_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writer =
            Some(WalWriter::spawn(wal, dispatcher, ReplicaId(0), last_snapshot_bytes).unwrap());
        let snapshot = |install: bool, generation: u64| {
            Written::Snapshot(PendingSnapshot {
                install,
                generation,
                clock_ms: 10 * generation,
                timers: Vec::new(),
                encode: Box::new(move || vec![generation as u8; 100]),
            })
        };

        WalWriter::submit(&mut writer, turn(1, false)).unwrap();
        let long = Duration::from_secs(5);
        assert_eq!(
            queued(&peers, 1, long),
            1,
            "a turn before the install goes out"
        );
        WalWriter::submit(&mut writer, turn(2, true)).unwrap();
        WalWriter::submit(&mut writer, turn(3, false)).unwrap();
        // A normal snapshot does not release them.
        WalWriter::submit(&mut writer, snapshot(false, 1)).unwrap();
        WalWriter::submit(&mut writer, turn(4, false)).unwrap();
        let short = Duration::from_millis(300);
        assert_eq!(
            queued(&peers, 2, short),
            1,
            "outputs after the install are held"
        );
        WalWriter::submit(&mut writer, snapshot(true, 2)).unwrap();
        assert_eq!(
            queued(&peers, 4, long),
            4,
            "the install snapshot releases them"
        );
        WalWriter::finish(writer.take()).unwrap();
        tasks.abort_all();

        let recovery = recover(&path, owner()).unwrap();
        assert_eq!(
            recovery
                .snapshot
                .as_ref()
                .map(|snapshot| snapshot.generation),
            Some(2)
        );
        let mut log = recovery.log;
        while let Some(record) = log.next_record().unwrap() {
            assert!(
                !matches!(record, Record::Installed { .. }),
                "the install record is covered by the snapshot"
            );
        }
    }
}
