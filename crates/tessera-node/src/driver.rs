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
//! turn's actions are carried out only after the turn's inputs are durable (group commit). On
//! start the loop first replays the log into the fresh core, discarding what the replayed core
//! says except its timers, and continues the logged clock from where it stopped.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_core::{Action, Replica, Timer};
use tessera_types::{ReplicaId, ReplicaMessage, Request, StateMachine};
use tracing::{debug, info, warn};

use crate::counters::{DropReason, NodeCounters};
use crate::metrics::{CoreObservation, CoreSnapshot, ReplicaMetrics};
use crate::routes::{ReplyRoutes, StatusBoard};
use crate::transport::PeerSender;
use crate::wal::{Mark, Record, RecordRef, Wal, WalError, WalReader};

/// Default capacity of the core's inbox, in events.
pub const CORE_INBOX_EVENTS_DEFAULT: usize = 65_536;
/// Most events handled before the core's actions are carried out.
const EVENTS_PER_TURN_MAX: usize = 1024;
/// How often the core publishes its status.
const STATUS_PERIOD: Duration = Duration::from_millis(100);
/// How long an event source waits before retrying a full inbox.
const INBOX_RETRY: Duration = Duration::from_millis(1);

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

/// Starts the core thread. It runs until it receives [`CoreEvent::Stop`] or every inbox
/// sender is gone; with a log (`wal`), it first replays it. It stops with an error if the log
/// cannot be replayed or written: without a durable log it must not say anything more.
pub fn spawn_core_thread<S: StateMachine>(
    replica: Replica<S>,
    inbox: Receiver<CoreEvent>,
    outputs: CoreOutputs,
    wal: Option<WalReader>,
) -> std::io::Result<std::thread::JoinHandle<Result<(), WalError>>> {
    let id = replica.id();
    std::thread::Builder::new()
        .name(format!("tessera-core-{id}"))
        .spawn(move || {
            let span = tracing::info_span!("core", replica = %id);
            let _entered = span.enter();
            CoreLoop {
                replica,
                outputs,
                clock: Instant::now(),
                clock_base_ms: 0,
                timers: BTreeMap::new(),
                observation: CoreObservation::default(),
                wal: None,
            }
            .run(inbox, wal)
        })
}

struct CoreLoop<S: StateMachine> {
    replica: Replica<S>,
    outputs: CoreOutputs,
    clock: Instant,
    /// Core time when `clock` started: the last logged time after a replay, so the core's
    /// clock never goes back across a restart.
    clock_base_ms: u64,
    timers: BTreeMap<Timer, u64>,
    observation: CoreObservation,
    wal: Option<Wal>,
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

    fn run(mut self, inbox: Receiver<CoreEvent>, wal: Option<WalReader>) -> Result<(), WalError> {
        info!("core thread started");
        let replayed = match wal {
            Some(reader) => self.replay(reader)?,
            None => 0,
        };
        if replayed == 0 {
            let now_ms = self.now_ms();
            let wall_ms = wall_clock_ms();
            self.log(|| RecordRef::Start { now_ms, wall_ms });
            self.replica.start(now_ms, wall_ms);
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
        self.publish_status();
        info!(rejections = ?self.replica.rejections(), "core thread stopped");
        Ok(())
    }

    /// Feeds the log's records to the fresh core and returns how many there were. What the
    /// replayed core asks for is dropped (its messages went out before the crash or never: peers
    /// fetch what they miss, clients retry), except its timers, which the loop must keep.
    fn replay(&mut self, mut reader: WalReader) -> Result<u64, WalError> {
        let started = Instant::now();
        let mut last_ms = 0;
        let mut marks = 0u64;
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Start { now_ms, wall_ms } => {
                    last_ms = now_ms;
                    self.replica.start(now_ms, wall_ms);
                }
                Record::Request {
                    now_ms,
                    wall_ms,
                    request,
                } => {
                    last_ms = now_ms;
                    self.replica.handle_request(now_ms, wall_ms, request);
                }
                Record::Message {
                    now_ms,
                    wall_ms,
                    from,
                    message,
                } => {
                    last_ms = now_ms;
                    self.replica.handle_message(now_ms, wall_ms, from, message);
                }
                Record::Timer {
                    now_ms,
                    wall_ms,
                    timer,
                } => {
                    last_ms = now_ms;
                    let Some(timer) = timer_of_code(timer) else {
                        return Err(WalError::Corrupt {
                            path: reader.path().to_path_buf(),
                            offset: 0,
                            problem: format!("unknown timer code {timer}"),
                        });
                    };
                    self.replica.handle_timer(now_ms, wall_ms, timer);
                }
                Record::Mark(expected) => {
                    marks += 1;
                    let actual = Mark::of(&self.replica.status());
                    if actual != expected {
                        return Err(WalError::Diverged {
                            path: reader.path().to_path_buf(),
                            record: reader.records(),
                            expected,
                            actual,
                        });
                    }
                }
            }
            for action in self.replica.take_actions() {
                match action {
                    Action::SetTimer { timer, deadline_ms } => {
                        self.timers.insert(timer, deadline_ms);
                    }
                    Action::CancelTimer(timer) => {
                        self.timers.remove(&timer);
                    }
                    _ => {}
                }
            }
        }
        let records = reader.records();
        if let Some(offset) = reader.torn_at() {
            warn!(offset, "the log's last write was torn by a crash; cut off");
        }
        self.wal = Some(reader.into_wal()?);
        self.clock_base_ms = last_ms;
        self.clock = Instant::now();
        if records > 0 {
            info!(
                records,
                marks,
                last_executed = self.replica.last_executed().0,
                view = self.replica.view().0,
                seconds = started.elapsed().as_secs_f64(),
                "replayed the write-ahead log"
            );
        }
        Ok(records)
    }

    /// Logs an input about to be handled (built lazily: nothing is encoded without a log).
    fn log<'a>(&mut self, record: impl FnOnce() -> RecordRef<'a>) {
        if let Some(wal) = self.wal.as_mut() {
            wal.append(&record());
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
                self.log(|| RecordRef::Message {
                    now_ms,
                    wall_ms,
                    from,
                    message: &message,
                });
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

    /// Carries out the core's actions — after making the inputs that led to them durable.
    fn execute_actions(&mut self) -> Result<(), WalError> {
        if let Some(wal) = self.wal.as_mut() {
            if wal.has_pending() {
                wal.commit(Mark::of(&self.replica.status()))?;
            }
        }
        let peers = u64::from(self.replica.config().n.saturating_sub(1));
        for action in self.replica.take_actions() {
            match action {
                Action::Send { to, message } => {
                    self.outputs.metrics.message_sent(&message, 1);
                    let frame = Bytes::from(tessera_types::encode(&message));
                    self.outputs.peers.send(to, frame);
                }
                Action::Broadcast { message } => {
                    self.outputs.metrics.message_sent(&message, peers);
                    let frame = Bytes::from(tessera_types::encode(&message));
                    self.outputs.peers.broadcast(frame);
                }
                Action::Reply(reply) => self.outputs.replies.deliver(reply),
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
