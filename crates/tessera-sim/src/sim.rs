//! The event loop: real replicas, simulated clients, an adversary and a seeded faulty network.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use tessera_core::{Action, Replica, ReplyCollector, ReplyOutcome, RequestAuthenticator, Timer};
use tessera_crypto::sign::{SigningKey, VerifyingKey};
use tessera_crypto::{Digest, DigestBuilder};
use tessera_kv::{KvStore, Response};
use tessera_types::wire::ReplicaStatus;
use tessera_types::{ClientId, ReplicaId, ReplicaMessage, Reply, Request};
use tessera_usig::hmac::HmacUsig;
use tessera_usig::UsigIdentity;

use crate::adversary::{draw_round, round_of, Adversary, AdversaryStats, Round, SharedUsig};
use crate::check::{Checker, Violation};
use crate::config::SimConfig;
use crate::rng::{
    SimRng, STREAM_ADVERSARY, STREAM_AMNESIA, STREAM_CLOCK, STREAM_CRASH_STOP, STREAM_DAMAGED_LOG,
    STREAM_FAULTS, STREAM_NETWORK, STREAM_ROGUE, STREAM_WORKLOAD,
};
use crate::workload::{random_command, Client, Operation, CLIENT_CREDENTIAL};

/// Seed of the one client credential's Ed25519 key (fixed: keys are not what is being tested).
const CLIENT_KEY_SEED: [u8; 32] = [7u8; 32];
/// Timer kinds, for per-kind generation counters.
const TIMER_KINDS: usize = 3;
const TIMERS: [Timer; TIMER_KINDS] = [Timer::Request, Timer::ViewChange, Timer::Heartbeat];

/// A driver's timer table: per timer kind, the deadline of the armed timer (`None`: not armed).
type TimerTable = [Option<u64>; TIMER_KINDS];

/// Verifies client signatures against the single simulated credential.
struct SimAuthenticator {
    key: VerifyingKey,
}

impl RequestAuthenticator for SimAuthenticator {
    fn verify_signature(&self, request: &Request) -> bool {
        self.key.verify(&request.digest(), &request.signature)
    }
    fn verify_mac(&self, _request: &Request) -> bool {
        // Simulated clients sign every request; MAC authentication is not simulated.
        false
    }
}

fn timer_index(timer: Timer) -> usize {
    match timer {
        Timer::Request => 0,
        Timer::ViewChange => 1,
        Timer::Heartbeat => 2,
    }
}

/// Updates a driver's timer table with one of its core's actions.
fn follow_timer(timers: &mut TimerTable, action: &Action) {
    match action {
        Action::SetTimer { timer, deadline_ms } => timers[timer_index(*timer)] = Some(*deadline_ms),
        Action::CancelTimer(timer) => timers[timer_index(*timer)] = None,
        _ => {}
    }
}

fn message_kind(message: &ReplicaMessage) -> &'static str {
    match message {
        ReplicaMessage::Request(_) => "REQUEST",
        ReplicaMessage::Prepare(_) => "PREPARE",
        ReplicaMessage::Commit(_) => "COMMIT",
        ReplicaMessage::Checkpoint(_) => "CHECKPOINT",
        ReplicaMessage::ReqViewChange(_) => "REQ-VIEW-CHANGE",
        ReplicaMessage::ViewChange(_) => "VIEW-CHANGE",
        ReplicaMessage::NewView(_) => "NEW-VIEW",
        ReplicaMessage::Fetch(_) => "FETCH",
        ReplicaMessage::Heartbeat(_) => "HEARTBEAT",
        ReplicaMessage::StateRequest(_) => "STATE-REQUEST",
        ReplicaMessage::StateSummary(_) => "STATE-SUMMARY",
        ReplicaMessage::PartitionRequest(_) => "PARTITION-REQUEST",
        ReplicaMessage::PartitionReply(_) => "PARTITION-REPLY",
        ReplicaMessage::FetchNewView { .. } => "FETCH-NEW-VIEW",
        ReplicaMessage::EpochStart(_) => "EPOCH-START",
    }
}

/// Who runs a simulated node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// A correct replica: the checkers hold it to every property.
    Correct,
    /// A replica the adversary controls.
    Byzantine,
    /// The second instance of a Byzantine replica's identity (Twins), sharing its USIG.
    Twin,
}

/// One simulated process: a real core and what the driver keeps for it.
struct Node {
    replica: Replica<KvStore>,
    /// The replica id it speaks as (twins share one).
    id: u32,
    role: Role,
    crashed: bool,
    /// Per timer kind, bumped on every arm and cancel: a firing of an older generation is stale.
    timer_generations: [u64; TIMER_KINDS],
    /// Per timer kind, a firing that came while the node was down (it fires on restart).
    missed_timers: [bool; TIMER_KINDS],
    /// The timers the core has armed and that have not fired, as the driver's table holds them
    /// (a restart from a log keeps what the replayed core armed, `tessera_node::driver`).
    timers: TimerTable,
    /// A correct node's write-ahead log: every input its core handled, in order. A restart
    /// rebuilds the core from it, as the real driver does (`tessera_node::wal`).
    inputs: Vec<LoggedInput>,
    /// The node's latest snapshot (taken only of the node the seed will crash).
    snapshot: Option<Snapshot>,
    /// How far this node's wall clock is from the simulation's (`WALL_BASE_MS + now_ms`):
    /// drawn from the seed within ±`clock_skew_max_ms / 2`, so any two correct clocks differ
    /// by at most the bound the protocol is configured with.
    wall_skew_ms: i64,
}

/// A node's snapshot, with what the node's snapshot file keeps beside the core's bytes.
struct Snapshot {
    /// How many of the node's logged inputs it covers.
    covered: usize,
    bytes: Vec<u8>,
    /// The driver's timer table when it was taken.
    timers: TimerTable,
}

/// A core rebuilt from a prefix of its node's log.
struct Rebuilt {
    replica: Replica<KvStore>,
    /// The timers the replay left armed.
    timers: TimerTable,
}

/// A node that will crash takes a snapshot of itself every this many inputs.
const SNAPSHOT_EVERY_INPUTS: usize = 50;

/// The wall clock of the simulated world at logical time 0 (ms since the Unix epoch).
pub const WALL_BASE_MS: u64 = 1_700_000_000_000;

impl LoggedInput {
    /// Feeds the input to `replica` as a replay does: what the core says is dropped, except
    /// the timers it arms and cancels, which `timers` follows (a timer input is the armed
    /// timer firing, so it is no longer armed unless the core arms it again).
    fn replay_into(&self, replica: &mut Replica<KvStore>, timers: &mut TimerTable) {
        match self {
            LoggedInput::Start(now_ms, wall_ms) => replica.start(*now_ms, *wall_ms),
            LoggedInput::Request(now_ms, wall_ms, request) => {
                replica.handle_request(*now_ms, *wall_ms, request.clone())
            }
            LoggedInput::Message(now_ms, wall_ms, from, message) => {
                replica.handle_message(*now_ms, *wall_ms, ReplicaId(*from), message.clone())
            }
            LoggedInput::Timer(now_ms, wall_ms, timer) => {
                timers[timer_index(*timer)] = None;
                replica.handle_timer(*now_ms, *wall_ms, *timer)
            }
            LoggedInput::StartEpoch(now_ms, wall_ms, at_least) => {
                replica
                    .start_epoch_at_least(*now_ms, *wall_ms, *at_least)
                    .expect("the simulator's USIG starts epochs");
            }
        }
        for action in replica.take_actions() {
            follow_timer(timers, &action);
        }
    }
}

/// One input of a node's log, with the logical time it was handled at and the node's wall
/// clock then (the real driver logs both).
#[derive(Debug)]
enum LoggedInput {
    Start(u64, u64),
    /// The replica moved to a new USIG epoch of at least the third value (after a restart
    /// without its log). The bound is logged because the USIG, rebuilt at epoch 0 by a replay,
    /// remembers no epoch of its own: replay reaches the same epoch only by passing it again.
    StartEpoch(u64, u64, u64),
    Request(u64, u64, Request),
    Message(u64, u64, u32, ReplicaMessage),
    Timer(u64, u64, Timer),
}

/// Something scheduled to happen at a logical time.
#[derive(Debug)]
enum Event {
    /// A replica-to-replica message arrives at node `to`, sent by replica id `from`.
    Message {
        from: u32,
        to: usize,
        message: ReplicaMessage,
    },
    /// A client request arrives at node `to`.
    Request { to: usize, request: Request },
    /// A reply arrives at its client.
    Reply { client: usize, reply: Reply },
    /// A node's timer fires (ignored unless `generation` is still current).
    ReplicaTimer {
        node: usize,
        timer: Timer,
        generation: u64,
    },
    /// A client's retransmission timer fires (ignored unless `generation` is current).
    ClientRetry { client: usize, generation: u64 },
    /// A client invokes its next operation.
    ClientInvoke { client: usize },
    /// The partition changes (fault phase only).
    NetworkChange,
    /// Swizzle: the link between two replicas goes down.
    LinkCut { a: u32, b: u32 },
    /// Swizzle: the link between two replicas comes back.
    LinkHeal { a: u32, b: u32 },
    /// A node crashes: it loses in-flight messages and timers until it restarts.
    Crash { node: usize },
    /// A crashed node restarts with its durable state.
    Restart { node: usize },
    /// A Byzantine node moves its USIG to a new epoch and asks the group to install it, while
    /// the adversary keeps the old epoch's messages to replay.
    ByzantineEpoch { node: usize },
    /// The rogue client does something malformed.
    Rogue,
    /// Faults stop: the network becomes reliable and the adversary behaves.
    Heal,
}

struct Scheduled {
    at_ms: u64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.order) == (other.at_ms, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so the max-heap pops the earliest time first, then the earliest scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_ms, other.order).cmp(&(self.at_ms, self.order))
    }
}

/// Counts for the summary.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Events processed.
    pub events: u64,
    /// Messages (replica, request and reply) handed to their destination.
    pub delivered: u64,
    /// Bytes of replica messages delivered (their encoding).
    pub message_bytes: u64,
    /// Messages dropped by the network.
    pub dropped: u64,
    /// Messages the network delivered twice.
    pub duplicated: u64,
    /// Replica-to-replica messages cut by a partition or a swizzled link.
    pub partitioned: u64,
    /// Replica-to-replica messages cut because their round was a network-fault round.
    pub round_cut: u64,
    /// Partition changes during the fault phase.
    pub partition_changes: u64,
    /// Swizzles started.
    pub swizzles: u64,
    /// Messages that arrived at a crashed node.
    pub lost_to_crash: u64,
    /// Crashes (each followed by a restart).
    pub crashes: u64,
    /// Inputs replayed to rebuild correct replicas after crashes.
    pub replayed_inputs: u64,
    /// Restarts that began from a snapshot rather than the whole log.
    pub snapshot_restores: u64,
    /// Restarts without the log: empty, in a new USIG epoch.
    pub amnesia_restarts: u64,
    /// Restarts from a damaged log: from the inputs before the damage, in a new USIG epoch.
    pub damaged_log_restarts: u64,
    /// Inputs those restarts kept (summed over them).
    pub damaged_log_inputs_kept: u64,
    /// Inputs those restarts lost (summed over them).
    pub damaged_log_inputs_lost: u64,
    /// The sequence numbers the kept inputs had executed up to (summed over those restarts).
    pub damaged_log_executed_kept: u64,
    /// New USIG epochs started by Byzantine nodes.
    pub byzantine_epochs: u64,
    /// INSTALL entries (new USIG epochs) executed by correct nodes.
    pub installs_executed: u64,
    /// Malformed, forged or duplicate requests the rogue client sent.
    pub rogue_requests: u64,
    /// Client retransmissions.
    pub retransmissions: u64,
    /// Operations completed.
    pub completed: u64,
    /// Operations invoked.
    pub invoked: u64,
    /// Timers the cores armed with a deadline not in the future (each fires 1 ms later).
    pub past_deadline_timers: u64,
}

/// What the seed decided about faults, for the report.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Replica ids the adversary controls.
    pub byzantine: Vec<u32>,
    /// The Byzantine replica that runs as Twins, if any.
    pub twins: Option<u32>,
    /// The Byzantine replica that is slow during the fault phase, if any.
    pub slow: Option<u32>,
    /// ByzzFuzz mutation rounds.
    pub mutation_rounds: Vec<Round>,
    /// ByzzFuzz network-fault rounds and the partition block of each replica id in them.
    pub network_rounds: Vec<(Round, Vec<u8>)>,
    /// Node crashed, crash time, restart time.
    pub crash: Option<(usize, u64, u64)>,
    /// The crashed node never restarts (drawn only when no replica is Byzantine).
    pub crash_stop: bool,
    /// The crashed node restarts without its log (only a correct one).
    pub amnesia: bool,
    /// That restart keeps the part of its log before a damage instead (a prefix drawn at the
    /// restart, from none of the log to all of it).
    pub damaged_log: bool,
    /// When a Byzantine node starts a new USIG epoch (grid settings only).
    pub byzantine_epoch: Option<(usize, u64)>,
}

/// One node as it stood at the end of a run.
#[derive(Clone, Debug)]
pub struct NodeSummary {
    /// The replica identity the node speaks as (twins share one).
    pub id: u32,
    pub role: Role,
    pub status: ReplicaStatus,
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct Report {
    /// The run's seed.
    pub seed: u64,
    /// Hash of every processed event in order: equal seeds must give equal hashes.
    pub trace_hash: Digest,
    /// Everything the checkers found; empty means the run passed.
    pub violations: Vec<Violation>,
    /// Counters.
    pub stats: Stats,
    /// What the adversary did.
    pub adversary: AdversaryStats,
    /// What the seed decided about faults.
    pub faults: FaultPlan,
    /// How the replicas fetched state in this run.
    pub transfer_strategy: tessera_types::TransferStrategy,
    /// Logical time at the end of the run.
    pub end_ms: u64,
    /// When the network healed.
    pub heal_ms: u64,
    /// Latest completion time minus the heal time (0 if everything finished before the heal).
    pub recovery_ms: u64,
    /// Per node at the end: its replica id, role and the core's own status summary.
    pub replicas: Vec<NodeSummary>,
    /// Per node at the end: messages it rejected, by reason.
    pub rejections: Vec<Vec<(&'static str, u64)>>,
    /// The client history.
    pub history: Vec<Operation>,
    /// States the linearizability search explored (0 if it found a violation).
    pub linearizability_states: u64,
    /// One line per processed event, if `SimConfig::trace` was set.
    pub trace: Vec<String>,
}

impl Report {
    /// True if no checker fired.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The rogue client: a session that sends malformed, forged and duplicate requests.
struct Rogue {
    id: ClientId,
    issued: u64,
    sent: Vec<Request>,
}

/// One seeded run of real MinBFT replicas on a simulated network.
pub struct Simulation {
    config: SimConfig,
    seed: u64,
    now_ms: u64,
    queue: BinaryHeap<Scheduled>,
    next_order: u64,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    rogue: Rogue,
    history: Vec<Operation>,
    network_rng: SimRng,
    workload_rng: SimRng,
    adversary_rng: SimRng,
    rogue_rng: SimRng,
    /// Where a damaged log is cut (drawn at the restart, when the log's length is known).
    damaged_log_rng: SimRng,
    client_key: SigningKey,
    /// Partition group of each replica id; replicas in different groups cannot talk.
    groups: Vec<u8>,
    /// Swizzled links, by unordered pair of replica ids.
    cut_links: BTreeSet<(u32, u32)>,
    /// Twins: the node index of the second instance, and which instance each replica id's
    /// messages reach (0: the original, 1: the twin).
    twin: Option<(usize, Vec<u8>)>,
    mutation_rounds: BTreeSet<Round>,
    network_rounds: BTreeMap<Round, Vec<u8>>,
    adversary: Adversary,
    faults: FaultPlan,
    healed: bool,
    checker: Checker,
    trace_hash: DigestBuilder,
    trace: Vec<String>,
    stats: Stats,
}

impl Simulation {
    /// Builds the cluster and the clients, draws the fault plan, and schedules the first events.
    ///
    /// # Panics
    /// If `config` is invalid (see [`SimConfig::validate`]).
    pub fn new(mut config: SimConfig, seed: u64) -> Simulation {
        if let Err(error) = config.validate() {
            panic!("invalid simulation config: {error}");
        }
        if config.transfer_strategy_from_seed {
            let strategies = tessera_types::TransferStrategy::ALL;
            config.protocol.state_transfer =
                strategies[(seed / 10 % strategies.len() as u64) as usize];
        }
        let n = config.protocol.n;
        let client_key = SigningKey::from_seed(&CLIENT_KEY_SEED);
        let mut fault_rng = SimRng::new(seed, STREAM_FAULTS);
        let mut faults = draw_faults(&config, &mut fault_rng);
        faults.crash_stop = faults.crash.is_some()
            && faults.byzantine.is_empty()
            && SimRng::new(seed, STREAM_CRASH_STOP).chance(config.crash_stop_per_mille);
        // A replica restarting without its log is out of view changes until the checkpoint
        // after its INSTALL: the group stays live only if the other faulty replicas leave a
        // quorum of correct, settled ones (n ≥ 2f + 2k + 1 with k = 1, docs/PROTOCOL.md §2, §8).
        // Drawn from their own stream, so that adding them changed no other draw.
        let mut amnesia_rng = SimRng::new(seed, STREAM_AMNESIA);
        let within_budget = faults.byzantine.len() < config.protocol.f as usize;
        if within_budget && amnesia_rng.chance(config.amnesia_per_mille) {
            if faults.crash.is_none() {
                let node = amnesia_rng.below(u64::from(n)) as usize;
                let latest_restart_ms = config.fault_phase_ms.saturating_sub(1).max(2);
                let crash_ms = amnesia_rng.between(1, latest_restart_ms * 7 / 10 + 1);
                let restart_ms = (crash_ms + amnesia_rng.between(200, 1_500))
                    .min(latest_restart_ms)
                    .max(crash_ms + 1);
                faults.crash = Some((node, crash_ms, restart_ms));
            }
            faults.amnesia = !faults.crash_stop;
        }
        // Half of those restarts (by default) keep a prefix of a damaged log instead, which
        // the same budget covers: the replica is out of view changes until the checkpoint after
        // its INSTALL either way. Its own stream, so that adding it changed no other draw.
        let mut damaged_log_rng = SimRng::new(seed, STREAM_DAMAGED_LOG);
        faults.damaged_log = faults.amnesia && damaged_log_rng.chance(config.damaged_log_per_mille);
        if let Some(&byzantine) = faults.byzantine.first() {
            if amnesia_rng.chance(config.byzantine_epoch_per_mille) {
                let at_ms = amnesia_rng.between(1, config.fault_phase_ms.max(2));
                faults.byzantine_epoch = Some((byzantine as usize, at_ms));
            }
        }

        let usig_keys = usig_keys(n);
        let mut shared_usigs = BTreeMap::new();
        let mut nodes = Vec::new();
        for id in 0..n {
            let usig = HmacUsig::new(first_identity(id), usig_keys.clone());
            let byzantine = faults.byzantine.contains(&id);
            let role = if byzantine {
                Role::Byzantine
            } else {
                Role::Correct
            };
            let usig: Box<dyn tessera_usig::Usig> = if byzantine {
                let shared = SharedUsig::new(usig);
                shared_usigs.insert(id, shared.clone());
                Box::new(shared)
            } else {
                Box::new(usig)
            };
            nodes.push(new_node(&config, &client_key, id, role, usig));
            if byzantine {
                nodes
                    .last_mut()
                    .expect("pushed")
                    .replica
                    .set_restart_on_usig_gap(false);
            }
        }
        let mut clock_rng = SimRng::new(seed, STREAM_CLOCK);
        let twin = faults.twins.map(|id| {
            let usig = Box::new(shared_usigs[&id].clone());
            nodes.push(new_node(&config, &client_key, id, Role::Twin, usig));
            nodes
                .last_mut()
                .expect("pushed")
                .replica
                .set_restart_on_usig_gap(false);
            let routing = (0..n).map(|_| fault_rng.below(2) as u8).collect();
            (nodes.len() - 1, routing)
        });
        #[cfg(feature = "planted-bugs")]
        if let Some(bug) = config.planted_bug {
            for node in nodes.iter_mut().filter(|node| node.role == Role::Correct) {
                node.replica.plant_bug(bug);
            }
        }

        let clients: Vec<Client> = (0..config.clients)
            .map(|session| Client::new(session, config.operations_per_client))
            .collect();
        let rogue = Rogue {
            id: ClientId::new(CLIENT_CREDENTIAL, config.clients),
            issued: 0,
            sent: Vec::new(),
        };
        let checkpoint_interval = config.protocol.checkpoint_interval;
        let mut simulation = Simulation {
            seed,
            now_ms: 0,
            queue: BinaryHeap::new(),
            next_order: 0,
            nodes,
            clients,
            rogue,
            history: Vec::new(),
            network_rng: SimRng::new(seed, STREAM_NETWORK),
            workload_rng: SimRng::new(seed, STREAM_WORKLOAD),
            adversary_rng: SimRng::new(seed, STREAM_ADVERSARY),
            rogue_rng: SimRng::new(seed, STREAM_ROGUE),
            damaged_log_rng,
            client_key,
            groups: vec![0; n as usize],
            cut_links: BTreeSet::new(),
            twin,
            mutation_rounds: faults.mutation_rounds.iter().copied().collect(),
            network_rounds: faults.network_rounds.iter().cloned().collect(),
            adversary: Adversary::new(shared_usigs, checkpoint_interval),
            faults,
            healed: false,
            checker: Checker::default(),
            trace_hash: DigestBuilder::new("tessera-sim trace v1"),
            trace: Vec::new(),
            stats: Stats::default(),
            config,
        };
        let half_skew = simulation.config.protocol.clock_skew_max_ms / 2;
        for node in simulation.nodes.iter_mut() {
            let drawn = clock_rng.between(0, 2 * half_skew) as i64;
            node.wall_skew_ms = drawn - half_skew as i64;
        }
        for node in 0..simulation.nodes.len() {
            let wall_ms = simulation.wall_ms(node);
            if simulation.nodes[node].role == Role::Correct {
                simulation.nodes[node]
                    .inputs
                    .push(LoggedInput::Start(0, wall_ms));
            }
            simulation.nodes[node].replica.start(0, wall_ms);
            simulation.after_replica_step(node);
        }
        for client in 0..simulation.clients.len() {
            let think_ms = simulation
                .workload_rng
                .below(simulation.config.think_ms_max + 1);
            simulation.schedule(think_ms, Event::ClientInvoke { client });
        }
        if simulation.config.random_network_faults {
            let first_change = simulation.partition_change_delay();
            simulation.schedule(first_change, Event::NetworkChange);
        }
        if let Some((node, at_ms)) = simulation.faults.byzantine_epoch {
            simulation.schedule(at_ms, Event::ByzantineEpoch { node });
        }
        if let Some((node, crash_ms, restart_ms)) = simulation.faults.crash {
            simulation.schedule(crash_ms, Event::Crash { node });
            if !simulation.faults.crash_stop {
                simulation.schedule(restart_ms, Event::Restart { node });
            }
        }
        if simulation.config.rogue_client {
            let first = simulation.rogue_rng.between(10, 300);
            simulation.schedule(first, Event::Rogue);
        }
        simulation.schedule(simulation.config.fault_phase_ms, Event::Heal);
        simulation
    }

    /// Runs to the end and returns the report with every violation found.
    pub fn run(mut self) -> Report {
        let hard_stop_ms =
            self.config.fault_phase_ms + self.config.liveness_bound_ms + self.config.settle_ms;
        let mut quiet_since_ms: Option<u64> = None;
        while let Some(scheduled) = self.queue.pop() {
            if scheduled.at_ms > hard_stop_ms {
                break;
            }
            if self.stats.events >= self.config.events_max
                || self.stats.message_bytes >= self.config.message_bytes_max
            {
                self.checker.violations.push(Violation::EventLimit {
                    events: self.stats.events,
                    now_ms: self.now_ms,
                });
                break;
            }
            assert!(scheduled.at_ms >= self.now_ms, "time went backwards");
            self.now_ms = scheduled.at_ms;
            self.stats.events += 1;
            self.process(scheduled.event);
            let all_done = self.healed && self.clients.iter().all(Client::done);
            match (all_done, quiet_since_ms) {
                (true, None) => quiet_since_ms = Some(self.now_ms),
                (true, Some(since)) if self.now_ms >= since + self.config.settle_ms => break,
                _ => {}
            }
        }
        self.finish()
    }

    fn finish(mut self) -> Report {
        let heal_ms = self.config.fault_phase_ms;
        self.checker
            .check_liveness(&self.history, heal_ms, self.config.liveness_bound_ms);
        let progress = self
            .nodes
            .iter()
            // A replica that crashed for good is the run's faulty one: it owes nothing.
            .filter(|node| node.role == Role::Correct && !node.crashed)
            .map(|node| {
                (
                    node.id,
                    node.replica.last_executed().0,
                    node.replica.state_digest(),
                )
            })
            .collect();
        // Convergence at quiescence is only owed when every replica is correct: a Byzantine
        // replica can burn USIG counters so that a gap in its stream is fillable by no one, and
        // a correct replica that needed its messages then catches up only at the next
        // checkpoint, which a finished workload never produces. Agreement and liveness still
        // hold there and are checked.
        if self.faults.byzantine.is_empty() {
            self.checker.check_convergence(progress);
        }
        let linearizability_states = self.checker.check_linearizability(&self.history);
        let recovery_ms = self
            .history
            .iter()
            .filter_map(|operation| operation.completion.as_ref().map(|(at, _)| *at))
            .max()
            .unwrap_or(0)
            .saturating_sub(heal_ms);
        Report {
            seed: self.seed,
            trace_hash: self.trace_hash.finish(),
            violations: self.checker.violations,
            stats: self.stats,
            adversary: self.adversary.stats.clone(),
            faults: self.faults,
            transfer_strategy: self.config.protocol.state_transfer,
            end_ms: self.now_ms,
            heal_ms,
            recovery_ms,
            replicas: self
                .nodes
                .iter()
                .map(|node| NodeSummary {
                    id: node.id,
                    role: node.role,
                    status: node.replica.status(),
                })
                .collect(),
            rejections: self
                .nodes
                .iter()
                .map(|node| {
                    let rejections = node.replica.rejections();
                    rejections
                        .iter()
                        .map(|(reason, count)| (*reason, *count))
                        .collect()
                })
                .collect(),
            history: self.history,
            linearizability_states,
            trace: self.trace,
        }
    }

    // ------------------------------------------------------------------ events

    fn schedule(&mut self, delay_ms: u64, event: Event) {
        let order = self.next_order;
        self.next_order += 1;
        self.queue.push(Scheduled {
            at_ms: self.now_ms + delay_ms,
            order,
            event,
        });
    }

    fn process(&mut self, event: Event) {
        self.hash_event(&event);
        if self.config.trace {
            self.trace_line(&event);
        }
        match event {
            Event::Message { from, to, message } => {
                if self.nodes[to].crashed {
                    self.stats.lost_to_crash += 1;
                    return;
                }
                self.stats.delivered += 1;
                let now_ms = self.now_ms;
                let wall_ms = self.wall_ms(to);
                if self.nodes[to].role == Role::Correct {
                    let input = LoggedInput::Message(now_ms, wall_ms, from, message.clone());
                    self.nodes[to].inputs.push(input);
                }
                self.nodes[to]
                    .replica
                    .handle_message(now_ms, wall_ms, ReplicaId(from), message);
                self.after_replica_step(to);
            }
            Event::Request { to, request } => {
                if self.nodes[to].crashed {
                    self.stats.lost_to_crash += 1;
                    return;
                }
                self.stats.delivered += 1;
                let now_ms = self.now_ms;
                let wall_ms = self.wall_ms(to);
                if self.nodes[to].role == Role::Correct {
                    let input = LoggedInput::Request(now_ms, wall_ms, request.clone());
                    self.nodes[to].inputs.push(input);
                }
                self.nodes[to]
                    .replica
                    .handle_request(now_ms, wall_ms, request);
                self.after_replica_step(to);
            }
            Event::Reply { client, reply } => {
                self.stats.delivered += 1;
                self.on_client_reply(client, reply);
            }
            Event::ReplicaTimer {
                node,
                timer,
                generation,
            } => {
                let kind = timer_index(timer);
                if self.nodes[node].timer_generations[kind] != generation {
                    return;
                }
                if self.nodes[node].crashed {
                    self.nodes[node].missed_timers[kind] = true;
                    return;
                }
                let now_ms = self.now_ms;
                self.handle_timer(node, now_ms, timer);
            }
            Event::ClientRetry { client, generation } => {
                if self.clients[client].retry_generation == generation {
                    self.retransmit(client);
                }
            }
            Event::ClientInvoke { client } => self.invoke(client),
            Event::NetworkChange => self.change_partition(),
            Event::LinkCut { a, b } => {
                if !self.healed {
                    self.cut_links.insert((a, b));
                }
            }
            Event::LinkHeal { a, b } => {
                self.cut_links.remove(&(a, b));
            }
            Event::Crash { node } => {
                self.stats.crashes += 1;
                self.nodes[node].crashed = true;
            }
            Event::Restart { node } => self.restart(node),
            Event::ByzantineEpoch { node } => {
                let wall_ms = self.wall_ms(node);
                if self.nodes[node]
                    .replica
                    .start_epoch(self.now_ms, wall_ms)
                    .is_ok()
                {
                    self.stats.byzantine_epochs += 1;
                }
                self.after_replica_step(node);
            }
            Event::Rogue => self.rogue_act(),
            Event::Heal => {
                self.healed = true;
                self.groups.iter_mut().for_each(|group| *group = 0);
                self.cut_links.clear();
            }
        }
    }

    /// Folds the event into the trace hash: kind, time, endpoints and full message bytes.
    fn hash_event(&mut self, event: &Event) {
        let hash = &mut self.trace_hash;
        hash.u64(self.now_ms);
        match event {
            Event::Message { from, to, message } => {
                let bytes = postcard::to_allocvec(message).expect("messages serialize");
                self.stats.message_bytes += bytes.len() as u64;
                hash.u64(0)
                    .u64(u64::from(*from))
                    .u64(*to as u64)
                    .bytes(&bytes);
            }
            Event::Request { to, request } => {
                hash.u64(1)
                    .u64(*to as u64)
                    .digest(&request.digest())
                    .bytes(&request.signature);
            }
            Event::Reply { client, reply } => {
                hash.u64(2)
                    .u64(*client as u64)
                    .u64(u64::from(reply.replica.0))
                    .u64(reply.request_number)
                    .bytes(&reply.result);
            }
            Event::ReplicaTimer {
                node,
                timer,
                generation,
            } => {
                hash.u64(3)
                    .u64(*node as u64)
                    .u64(timer_index(*timer) as u64)
                    .u64(*generation);
            }
            Event::ClientRetry { client, generation } => {
                hash.u64(4).u64(*client as u64).u64(*generation);
            }
            Event::ClientInvoke { client } => {
                hash.u64(5).u64(*client as u64);
            }
            Event::NetworkChange => {
                hash.u64(6);
            }
            Event::Heal => {
                hash.u64(7);
            }
            Event::LinkCut { a, b } => {
                hash.u64(8).u64(u64::from(*a)).u64(u64::from(*b));
            }
            Event::LinkHeal { a, b } => {
                hash.u64(9).u64(u64::from(*a)).u64(u64::from(*b));
            }
            Event::Crash { node } => {
                hash.u64(10).u64(*node as u64);
            }
            Event::Restart { node } => {
                hash.u64(11).u64(*node as u64);
            }
            Event::Rogue => {
                hash.u64(12);
            }
            Event::ByzantineEpoch { node } => {
                hash.u64(13).u64(*node as u64);
            }
        }
    }

    fn node_name(&self, node: usize) -> String {
        let id = self.nodes[node].id;
        match self.nodes[node].role {
            Role::Correct => format!("r{id}"),
            Role::Byzantine => format!("r{id}(byz)"),
            Role::Twin => format!("r{id}(twin)"),
        }
    }

    fn trace_line(&mut self, event: &Event) {
        let line = match event {
            Event::Message { from, to, message } => {
                format!(
                    "r{from} -> {} {}",
                    self.node_name(*to),
                    describe_message(message)
                )
            }
            Event::Request { to, request } => format!(
                "client {} -> {} REQUEST #{}",
                request.client.session(),
                self.node_name(*to),
                request.request_number
            ),
            Event::Reply { client, reply } => format!(
                "r{} -> client {client} REPLY #{} view {}",
                reply.replica.0, reply.request_number, reply.view.0
            ),
            Event::ReplicaTimer { node, timer, .. } => {
                format!("{} timer {timer:?}", self.node_name(*node))
            }
            Event::ClientRetry { client, .. } => format!("client {client} retransmits"),
            Event::ClientInvoke { client } => format!("client {client} invokes"),
            Event::NetworkChange => format!("network change, groups now {:?}", self.groups),
            Event::LinkCut { a, b } => format!("swizzle: link r{a}-r{b} cut"),
            Event::LinkHeal { a, b } => format!("swizzle: link r{a}-r{b} healed"),
            Event::Crash { node } => format!("{} crashes", self.node_name(*node)),
            Event::Restart { node } => format!("{} restarts", self.node_name(*node)),
            Event::ByzantineEpoch { node } => {
                format!("{} starts a new USIG epoch", self.node_name(*node))
            }
            Event::Rogue => "rogue client acts".to_string(),
            Event::Heal => "heal: network reliable, adversary quiet from now on".to_string(),
        };
        self.trace.push(format!("{:>8} ms  {line}", self.now_ms));
    }

    // ------------------------------------------------------------------ replicas

    /// Carries out a node's actions and shows a correct node's progress to the checker.
    fn after_replica_step(&mut self, node: usize) {
        let role = self.nodes[node].role;
        let id = self.nodes[node].id;
        let actions = self.nodes[node].replica.take_actions();
        for action in &actions {
            follow_timer(&mut self.nodes[node].timers, action);
        }
        let crashes_later = self.faults.crash.is_some_and(|(crash, _, _)| crash == node);
        let logged = self.nodes[node].inputs.len();
        if role == Role::Correct
            && crashes_later
            && !self.nodes[node].crashed
            && logged.is_multiple_of(SNAPSHOT_EVERY_INPUTS)
            && self.nodes[node].replica.can_snapshot()
        {
            let bytes = self.nodes[node].replica.snapshot();
            self.nodes[node].snapshot = Some(Snapshot {
                covered: logged,
                bytes,
                timers: self.nodes[node].timers,
            });
        }
        if role == Role::Correct {
            let replica = &self.nodes[node].replica;
            let stable = replica.stable_checkpoint();
            let checkpoint = (stable.seq.0, stable.state_digest);
            let (last_executed, state) = (replica.last_executed().0, replica.state_digest());
            self.checker
                .observe_progress(id, last_executed, state, checkpoint);
        }
        for action in actions {
            match action {
                Action::Send { to, message } => self.send_to_replica(node, to.0, message),
                Action::Broadcast { message } => {
                    if let ReplicaMessage::EpochStart(start) = &message {
                        // The one request no client issues: a replica's INSTALL entry.
                        self.checker.observe_issued(&start.to_install_request());
                    }
                    for to in 0..self.config.protocol.n {
                        if to != id {
                            self.send_to_replica(node, to, message.clone());
                        }
                    }
                }
                Action::Reply(reply) => self.send_reply(node, reply),
                Action::SetTimer { timer, deadline_ms } => {
                    if deadline_ms <= self.now_ms {
                        self.stats.past_deadline_timers += 1;
                    }
                    self.schedule_timer(node, timer, deadline_ms);
                }
                Action::CancelTimer(timer) => {
                    self.bump_timer(node, timer);
                    self.nodes[node].missed_timers[timer_index(timer)] = false;
                }
                Action::Executed {
                    seq,
                    batch_digest,
                    batch,
                    executed,
                } => {
                    if role == Role::Correct {
                        self.stats.installs_executed += batch
                            .iter()
                            .filter(|request| request.install_replica().is_some())
                            .count() as u64;
                        self.checker
                            .observe_executed(id, seq.0, batch_digest, &batch, &executed);
                    }
                }
            }
        }
    }

    /// Schedules `node`'s `timer` to fire at `deadline_ms`; an earlier firing of it is stale.
    fn schedule_timer(&mut self, node: usize, timer: Timer, deadline_ms: u64) {
        let generation = self.bump_timer(node, timer);
        // A deadline at or before now fires one logical millisecond later, as a real driver
        // serves it on its next turn.
        let delay_ms = deadline_ms.saturating_sub(self.now_ms).max(1);
        self.schedule(
            delay_ms,
            Event::ReplicaTimer {
                node,
                timer,
                generation,
            },
        );
    }

    fn bump_timer(&mut self, node: usize, timer: Timer) -> u64 {
        let generation = &mut self.nodes[node].timer_generations[timer_index(timer)];
        *generation += 1;
        *generation
    }

    /// Node `node`'s wall clock now.
    fn wall_ms(&self, node: usize) -> u64 {
        (WALL_BASE_MS + self.now_ms).saturating_add_signed(self.nodes[node].wall_skew_ms)
    }

    fn handle_timer(&mut self, node: usize, now_ms: u64, timer: Timer) {
        let wall_ms = self.wall_ms(node);
        self.nodes[node].timers[timer_index(timer)] = None;
        if self.nodes[node].role == Role::Correct {
            self.nodes[node]
                .inputs
                .push(LoggedInput::Timer(now_ms, wall_ms, timer));
        }
        self.nodes[node]
            .replica
            .handle_timer(now_ms, wall_ms, timer);
        self.after_replica_step(node);
    }

    /// A crashed node comes back. A correct one is rebuilt the way the real driver rebuilds it:
    /// a fresh core (fresh USIG instance with the same key) is fed the node's logged inputs, and
    /// what it says while replaying is dropped. Every input was logged before its outputs left
    /// (each simulated step is atomic), so the rebuilt core must be the crashed one exactly;
    /// a difference is a violation. Its driver re-arms its timers; the ones that expired while
    /// it was down fire now.
    fn restart(&mut self, node: usize) {
        self.nodes[node].crashed = false;
        if self.nodes[node].role == Role::Correct && self.faults.amnesia {
            if self.faults.damaged_log {
                self.restart_from_damaged_log(node);
            } else {
                self.stats.amnesia_restarts += 1;
                self.restart_in_new_epoch(node, 0);
            }
            return;
        }
        if self.nodes[node].role == Role::Correct {
            self.rebuild_from_log(node);
        }
        let now_ms = self.now_ms;
        for timer in TIMERS {
            let kind = timer_index(timer);
            if std::mem::take(&mut self.nodes[node].missed_timers[kind]) {
                self.handle_timer(node, now_ms, timer);
            }
        }
    }

    /// A correct replica whose log is damaged keeps its longest valid prefix, ending at a turn
    /// boundary (the node's fallback keeps that, or its previous snapshot's log, or nothing).
    /// Each simulated input is one turn, so the cut is any input index, drawn uniformly from
    /// nothing kept to everything kept. The simulator keeps only the latest snapshot, so a cut
    /// below it replays from the first input: the kept state is one the node passed through,
    /// however its files held it.
    fn restart_from_damaged_log(&mut self, node: usize) {
        let logged = self.nodes[node].inputs.len();
        let kept = self.damaged_log_rng.below(logged as u64 + 1) as usize;
        let kept_seq = self.restart_in_new_epoch(node, kept);
        self.stats.damaged_log_restarts += 1;
        self.stats.damaged_log_inputs_kept += kept as u64;
        self.stats.damaged_log_inputs_lost += (logged - kept) as u64;
        self.stats.damaged_log_executed_kept += kept_seq;
    }

    /// A correct replica that comes back with only the first `kept` inputs of its log (none:
    /// its log is lost). It may have said more than it now remembers, under USIG counter
    /// values it would certify again, so its USIG moves to an epoch above every epoch it spoke
    /// in (docs/PROTOCOL.md §8); the group installs it, and the replica fetches the state it
    /// lacks. Its log becomes the kept inputs, then the `StartEpoch`, so that a later replay
    /// rebuilds it. Returns the sequence number the kept inputs had executed up to.
    fn restart_in_new_epoch(&mut self, node: usize, kept: usize) -> u64 {
        let id = self.nodes[node].id;
        let logged = self.nodes[node].inputs.len();
        // What the node takes the wall clock for: the rebuilt USIG remembers no epoch beyond
        // the kept inputs, and the lost ones may have moved it on.
        let at_least = self.nodes[node].replica.epoch() + 1;
        let rebuilt = self.rebuild(node, kept);
        let kept_seq = rebuilt.replica.last_executed().0;
        // A new incarnation, still answering for what its kept state executed (see there).
        self.checker.restart_replica(id, kept_seq);
        let restarted = &mut self.nodes[node];
        restarted.replica = rebuilt.replica;
        restarted.inputs.truncate(kept);
        if restarted
            .snapshot
            .as_ref()
            .is_some_and(|snapshot| snapshot.covered > kept)
        {
            restarted.snapshot = None;
        }
        // The crashed core's timers went with it: the driver arms what the replay left armed.
        restarted.timers = rebuilt.timers;
        restarted.missed_timers = [false; TIMER_KINDS];
        for timer in TIMERS {
            match rebuilt.timers[timer_index(timer)] {
                Some(deadline_ms) => self.schedule_timer(node, timer, deadline_ms),
                None => {
                    self.bump_timer(node, timer);
                }
            }
        }
        if self.config.trace {
            self.trace.push(format!(
                "{:>8} ms  r{id} kept {kept} of {logged} logged inputs (executed up to seq \
                 {kept_seq}); new USIG epoch of at least {at_least}",
                self.now_ms
            ));
        }
        let now_ms = self.now_ms;
        let wall_ms = self.wall_ms(node);
        if kept == 0 {
            // A log that keeps nothing starts as a new one, as the node's driver starts it.
            self.nodes[node]
                .inputs
                .push(LoggedInput::Start(now_ms, wall_ms));
            self.nodes[node].replica.start(now_ms, wall_ms);
            self.after_replica_step(node);
        }
        self.nodes[node]
            .inputs
            .push(LoggedInput::StartEpoch(now_ms, wall_ms, at_least));
        self.nodes[node]
            .replica
            .start_epoch_at_least(now_ms, wall_ms, at_least)
            .expect("the simulator's USIG starts epochs");
        self.after_replica_step(node);
        kept_seq
    }

    fn rebuild_from_log(&mut self, node: usize) {
        let id = self.nodes[node].id;
        let logged = self.nodes[node].inputs.len();
        let mut rebuilt = self.rebuild(node, logged);
        let crashed_node = &mut self.nodes[node];
        let mut crashed = node_fingerprint(&crashed_node.replica, &crashed_node.timers);
        let mut replayed = node_fingerprint(&rebuilt.replica, &rebuilt.timers);
        // Stronger where possible: the two must also save to the same bytes (every message
        // they sent, every vote, every buffered message).
        if crashed == replayed
            && crashed_node.replica.can_snapshot()
            && rebuilt.replica.can_snapshot()
        {
            let crashed_bytes = crashed_node.replica.snapshot();
            let replayed_bytes = rebuilt.replica.snapshot();
            if crashed_bytes != replayed_bytes {
                crashed = format!("{crashed} (snapshot {} bytes)", crashed_bytes.len());
                replayed = format!(
                    "{replayed} (snapshot {} bytes, differing)",
                    replayed_bytes.len()
                );
            }
        }
        if crashed != replayed {
            self.checker.violations.push(Violation::ReplayDiverged {
                replica: id,
                crashed,
                replayed,
            });
        }
        // Timers armed before the crash keep their generations: the rebuilt core armed the
        // same ones.
        self.nodes[node].replica = rebuilt.replica;
    }

    /// A core rebuilt from the first `kept` inputs of `node`'s log the way the node's driver
    /// rebuilds one: odd seeds from the latest snapshot within them plus the inputs after it,
    /// even seeds from the inputs alone (both ways a real replica can come back). What the
    /// replayed core says went out before the crash (or is fetched again), so it is dropped,
    /// except its timers.
    fn rebuild(&mut self, node: usize, kept: usize) -> Rebuilt {
        let id = self.nodes[node].id;
        let keys = usig_keys(self.config.protocol.n);
        let snapshot = self.nodes[node]
            .snapshot
            .as_ref()
            .filter(|snapshot| self.seed % 2 == 1 && snapshot.covered <= kept);
        let (mut replica, mut timers, replay_from) = match snapshot {
            Some(snapshot) => {
                let bytes = &snapshot.bytes;
                let counter = tessera_core::minbft::saved_usig_counter(bytes)
                    .expect("the simulator's own snapshot decodes");
                let identity = UsigIdentity {
                    epoch: tessera_core::minbft::saved_usig_epoch(bytes)
                        .expect("the simulator's own snapshot decodes"),
                    ..first_identity(id)
                };
                let usig = HmacUsig::resume(identity, keys, counter).expect("known replica");
                let authenticator = SimAuthenticator {
                    key: self.client_key.verifying_key(),
                };
                let replica = Replica::restore(
                    ReplicaId(id),
                    self.config.protocol.clone(),
                    Box::new(usig),
                    Box::new(authenticator),
                    KvStore::default(),
                    bytes,
                )
                .expect("the simulator's own snapshot restores");
                self.stats.snapshot_restores += 1;
                (replica, snapshot.timers, snapshot.covered)
            }
            None => {
                let usig = Box::new(HmacUsig::new(first_identity(id), keys));
                let replica = new_replica(&self.config, &self.client_key, id, usig);
                (replica, [None; TIMER_KINDS], 0)
            }
        };
        #[cfg(feature = "planted-bugs")]
        if let Some(bug) = self.config.planted_bug {
            replica.plant_bug(bug);
        }
        for input in &self.nodes[node].inputs[replay_from..kept] {
            input.replay_into(&mut replica, &mut timers);
        }
        self.stats.replayed_inputs += (kept - replay_from) as u64;
        Rebuilt { replica, timers }
    }

    // ------------------------------------------------------------------ network

    /// Decides how many copies of a message arrive and after which delays (0, 1 or 2 copies).
    fn fates(&mut self) -> Vec<u64> {
        if self.healed {
            let delay_ms = self.network_rng.between(1, self.config.healed_delay_ms_max);
            return vec![delay_ms];
        }
        if self.config.random_network_faults && self.network_rng.chance(self.config.drop_per_mille)
        {
            self.stats.dropped += 1;
            return Vec::new();
        }
        let (low, high) = (self.config.delay_ms_min, self.config.delay_ms_max);
        let mut delays = vec![self.network_rng.between(low, high)];
        if self.network_rng.chance(self.config.duplicate_per_mille) {
            self.stats.duplicated += 1;
            delays.push(self.network_rng.between(low, high));
        }
        delays
    }

    /// True if replicas `a` and `b` cannot talk right now (partition or swizzled link).
    fn link_down(&self, a: u32, b: u32) -> bool {
        self.groups[a as usize] != self.groups[b as usize]
            || self.cut_links.contains(&(a.min(b), a.max(b)))
    }

    /// The nodes a message addressed to replica id `to` reaches: one, or one of two Twins chosen
    /// by the sender (`None`: a client, which reaches both).
    fn route(&self, from: Option<u32>, to: u32) -> Vec<usize> {
        match &self.twin {
            Some((twin_node, routing)) if self.nodes[*twin_node].id == to => match from {
                Some(from) if routing[from as usize] == 1 => vec![*twin_node],
                Some(_) => vec![to as usize],
                None => vec![to as usize, *twin_node],
            },
            _ => vec![to as usize],
        }
    }

    fn send_to_replica(&mut self, from_node: usize, to: u32, message: ReplicaMessage) {
        let from = self.nodes[from_node].id;
        if !self.healed {
            if self.link_down(from, to) {
                self.stats.partitioned += 1;
                return;
            }
            let round = round_of(&message);
            if let Some(blocks) = round.and_then(|round| self.network_rounds.get(&round)) {
                if blocks[from as usize] != blocks[to as usize] {
                    self.stats.round_cut += 1;
                    return;
                }
            }
        }
        let mut extra_delay_ms = 0;
        let mut message = Some(message);
        if self.nodes[from_node].role != Role::Correct && !self.healed {
            let original = message.take().expect("set above");
            // Per receiver, so a broadcast is remembered n-1 times and weighs more in replays.
            // Observing once per message reshuffles schedules and exposes another instance of
            // the open stream-gap liveness bug (seed 438, c2d1; docs/TESTING.md).
            self.adversary.observe(from, &original);
            // Heartbeats belong to no round; with any mutation round planned, one in twenty
            // lies about progress.
            let tampering = match round_of(&original) {
                // State transfer is a prize: a faulty replica serving state lies in every
                // partition it serves whenever it is given any mutation rounds at all. (Its
                // summary is tampered with only in its round: a wrong summary is refused at
                // once and its sender never asked for a partition.)
                Some(_) if matches!(original, ReplicaMessage::PartitionReply(_)) => {
                    !self.mutation_rounds.is_empty()
                }
                Some(round) => self.mutation_rounds.contains(&round),
                None => {
                    matches!(original, ReplicaMessage::Heartbeat(_))
                        && !self.mutation_rounds.is_empty()
                        && self.adversary_rng.chance(50)
                }
            };
            message = if tampering {
                self.adversary
                    .tamper(&mut self.adversary_rng, from, &original)
                    .1
            } else {
                Some(original)
            };
            if self.faults.slow == Some(from) {
                let timeout = self.config.protocol.request_timeout_ms;
                extra_delay_ms = self
                    .adversary_rng
                    .between(timeout * 4 / 10, timeout * 9 / 10);
            }
        }
        let Some(message) = message else {
            return;
        };
        for node in self.route(Some(from), to) {
            for delay_ms in self.fates() {
                let event = Event::Message {
                    from,
                    to: node,
                    message: message.clone(),
                };
                self.schedule(delay_ms + extra_delay_ms, event);
            }
        }
    }

    fn send_request(&mut self, to: u32, request: &Request) {
        for node in self.route(None, to) {
            for delay_ms in self.fates() {
                let event = Event::Request {
                    to: node,
                    request: request.clone(),
                };
                self.schedule(delay_ms, event);
            }
        }
    }

    fn send_reply(&mut self, from_node: usize, mut reply: Reply) {
        let role = self.nodes[from_node].role;
        if role == Role::Correct {
            self.checker.observe_reply(&reply);
        } else if self.config.corrupt_replies {
            reply = self.adversary.corrupt_reply(&reply);
        }
        let Some(client) = self
            .clients
            .iter()
            .position(|client| client.id == reply.client)
        else {
            return; // the rogue client does not read its replies
        };
        for delay_ms in self.fates() {
            let event = Event::Reply {
                client,
                reply: reply.clone(),
            };
            self.schedule(delay_ms, event);
        }
    }

    fn partition_change_delay(&mut self) -> u64 {
        let (low, high) = (
            self.config.partition_change_ms_min,
            self.config.partition_change_ms_max,
        );
        self.network_rng.between(low, high)
    }

    /// Heals the partition, draws a new one (each replica joins group 0 or 1), or starts a
    /// swizzle: links cut one by one, then healed one by one in another random order.
    fn change_partition(&mut self) {
        if self.healed {
            return;
        }
        self.stats.partition_changes += 1;
        let partitioned = self.network_rng.chance(self.config.partition_per_mille);
        for group in 0..self.groups.len() {
            self.groups[group] = if partitioned {
                self.network_rng.below(2) as u8
            } else {
                0
            };
        }
        let mut next_change_ms = self.partition_change_delay();
        if !partitioned && self.network_rng.chance(self.config.swizzle_per_mille) {
            self.stats.swizzles += 1;
            let n = self.config.protocol.n;
            let mut links: Vec<(u32, u32)> = (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .collect();
            shuffle(&mut self.network_rng, &mut links);
            let step_ms = self.network_rng.between(20, 150);
            let mut at_ms = step_ms;
            for &(a, b) in &links {
                self.schedule(at_ms, Event::LinkCut { a, b });
                at_ms += step_ms;
            }
            shuffle(&mut self.network_rng, &mut links);
            for &(a, b) in &links {
                self.schedule(at_ms, Event::LinkHeal { a, b });
                at_ms += step_ms;
            }
            next_change_ms = next_change_ms.max(at_ms);
        }
        self.schedule(next_change_ms, Event::NetworkChange);
    }

    // ------------------------------------------------------------------ clients

    fn sign(&self, request: &mut Request) {
        request.signature = self.client_key.sign(&request.digest()).to_vec();
    }

    fn invoke(&mut self, index: usize) {
        let client = &self.clients[index];
        if client.remaining == 0 || client.outstanding.is_some() {
            return;
        }
        let command = random_command(&mut self.workload_rng, self.config.keys);
        let client = &mut self.clients[index];
        client.remaining -= 1;
        client.issued += 1;
        let mut request = Request {
            client: client.id,
            request_number: client.issued,
            operation: command.encode(),
            signature: Vec::new(),
            macs: Vec::new(),
        };
        self.sign(&mut request);
        self.checker.observe_issued(&request);
        let client = &mut self.clients[index];
        self.history.push(Operation {
            client: client.id,
            request_number: client.issued,
            command,
            invoke_ms: self.now_ms,
            completion: None,
        });
        self.stats.invoked += 1;
        let needed = self.config.protocol.f as usize + 1;
        let collector = ReplyCollector::new(client.issued, needed);
        client.outstanding = Some((request.clone(), collector, self.history.len() - 1));
        let primary = (client.view % u64::from(self.config.protocol.n)) as u32;
        self.send_request(primary, &request);
        self.arm_retry(index);
    }

    fn arm_retry(&mut self, index: usize) {
        let client = &mut self.clients[index];
        client.retry_generation += 1;
        let generation = client.retry_generation;
        self.schedule(
            self.config.client_retry_ms,
            Event::ClientRetry {
                client: index,
                generation,
            },
        );
    }

    fn retransmit(&mut self, index: usize) {
        let Some((request, ..)) = &self.clients[index].outstanding else {
            return;
        };
        let request = request.clone();
        self.stats.retransmissions += 1;
        for to in 0..self.config.protocol.n {
            self.send_request(to, &request);
        }
        self.arm_retry(index);
    }

    fn on_client_reply(&mut self, index: usize, reply: Reply) {
        let client = &mut self.clients[index];
        let Some((_, collector, history_index)) = &mut client.outstanding else {
            return;
        };
        let ReplyOutcome::Complete { result, view } = collector.add(reply.clone()) else {
            return;
        };
        let history_index = *history_index;
        client.outstanding = None;
        client.view = client.view.max(view.0);
        client.retry_generation += 1;
        match Response::decode(&result) {
            Ok(response) => {
                self.history[history_index].completion = Some((self.now_ms, response));
                self.stats.completed += 1;
            }
            Err(_) => self.checker.violations.push(Violation::UndecodableResult {
                client: reply.client,
                request_number: reply.request_number,
            }),
        }
        let think_ms = self.workload_rng.below(self.config.think_ms_max + 1);
        self.schedule(think_ms, Event::ClientInvoke { client: index });
    }

    /// The rogue client's next move, during the fault phase: a request forged in an honest
    /// session's name, a badly signed one, a validly signed one carrying garbage, a far-future
    /// request number, or a replay of one of its own requests.
    fn rogue_act(&mut self) {
        if self.healed {
            return;
        }
        self.stats.rogue_requests += 1;
        let rng = &mut self.rogue_rng;
        let choice = rng.below(5);
        let request = match choice {
            0 => {
                // Forged: an honest session's identity, the next request numbers, no valid
                // signature. Executing it would be a validity violation.
                let session = rng.below(self.clients.len() as u64) as usize;
                let victim = &self.clients[session];
                let command = random_command(rng, self.config.keys);
                Request {
                    client: victim.id,
                    request_number: victim.issued + 1 + rng.below(3),
                    operation: command.encode(),
                    signature: (0..64).map(|_| rng.below(256) as u8).collect(),
                    macs: Vec::new(),
                }
            }
            1 => Request {
                client: self.rogue.id,
                request_number: self.rogue.issued + 1,
                operation: random_command(rng, self.config.keys).encode(),
                signature: vec![0u8; rng.below(80) as usize],
                macs: Vec::new(),
            },
            2 | 3 => {
                let number = if choice == 2 {
                    self.rogue.issued + 1
                } else {
                    self.rogue.issued + 1 + rng.below(1_000)
                };
                // Signed garbage that never decodes as a command: its effects would be real
                // but missing from the history the linearizability checker reads (since FLUSHDB
                // exists, a one-byte operation can empty the store: seed 1120). A first byte of
                // 0xff starts a command tag of at least 127, beyond every variant.
                let length = rng.below(48) as usize;
                let operation = std::iter::once(0xff)
                    .chain((0..length).map(|_| rng.below(256) as u8))
                    .collect();
                let mut request = Request {
                    client: self.rogue.id,
                    request_number: number,
                    operation,
                    signature: Vec::new(),
                    macs: Vec::new(),
                };
                self.rogue.issued = number;
                self.sign(&mut request);
                self.checker.observe_issued(&request);
                self.rogue.sent.push(request.clone());
                request
            }
            _ => match self.rogue.sent.as_slice() {
                [] => return self.schedule_rogue(),
                sent => sent[rng.below(sent.len() as u64) as usize].clone(),
            },
        };
        if self.rogue_rng.chance(500) {
            for to in 0..self.config.protocol.n {
                self.send_request(to, &request);
            }
        } else {
            let to = self.rogue_rng.below(u64::from(self.config.protocol.n)) as u32;
            self.send_request(to, &request);
        }
        self.schedule_rogue();
    }

    fn schedule_rogue(&mut self) {
        let delay_ms = self.rogue_rng.between(50, 300);
        self.schedule(delay_ms, Event::Rogue);
    }
}

/// The replicas' USIG keys (the simulator's HMAC USIG shares one key set).
/// The USIG identity every log of replica `id` starts in: a replay builds the USIG there, as the
/// node does, and a logged `StartEpoch` moves it on.
fn first_identity(id: u32) -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(id),
        epoch: 0,
    }
}

fn usig_keys(n: u32) -> Vec<[u8; 32]> {
    (0..n).map(|index| [index as u8 + 1; 32]).collect()
}

/// What a replay must reproduce: everything the core reports about itself.
fn replica_fingerprint(replica: &Replica<KvStore>) -> String {
    let stable = replica.stable_checkpoint();
    format!(
        "{:?} state {} stable {}@{} transferring {} view-changing {}",
        replica.status(),
        replica.state_digest(),
        stable.state_digest,
        stable.seq.0,
        replica.is_transferring_state(),
        replica.is_view_changing()
    )
}

/// [`replica_fingerprint`] and the timers its driver holds armed for it.
fn node_fingerprint(replica: &Replica<KvStore>, timers: &TimerTable) -> String {
    format!("{} timers {timers:?}", replica_fingerprint(replica))
}

fn new_replica(
    config: &SimConfig,
    client_key: &SigningKey,
    id: u32,
    usig: Box<dyn tessera_usig::Usig>,
) -> Replica<KvStore> {
    let authenticator = SimAuthenticator {
        key: client_key.verifying_key(),
    };
    Replica::new(
        ReplicaId(id),
        config.protocol.clone(),
        usig,
        Box::new(authenticator),
        KvStore::default(),
    )
    .expect("config validated above")
}

fn new_node(
    config: &SimConfig,
    client_key: &SigningKey,
    id: u32,
    role: Role,
    usig: Box<dyn tessera_usig::Usig>,
) -> Node {
    let replica = new_replica(config, client_key, id, usig);
    Node {
        replica,
        id,
        role,
        crashed: false,
        timer_generations: [0; TIMER_KINDS],
        missed_timers: [false; TIMER_KINDS],
        timers: [None; TIMER_KINDS],
        inputs: Vec::new(),
        snapshot: None,
        wall_skew_ms: 0,
    }
}

/// Draws who is Byzantine, Twins, slow, which rounds are tampered with or cut, and the crash.
fn draw_faults(config: &SimConfig, rng: &mut SimRng) -> FaultPlan {
    let n = config.protocol.n;
    let mut ids: Vec<u32> = (0..n).collect();
    shuffle(rng, &mut ids);
    let byzantine: Vec<u32> = ids[..config.byzantine_replicas as usize].to_vec();
    let first = byzantine.first().copied();
    let twins = first.filter(|_| rng.chance(config.twins_per_mille));
    let slow = first.filter(|_| rng.chance(config.slow_per_mille));
    let mut mutation_rounds = BTreeSet::new();
    while mutation_rounds.len() < config.mutation_rounds as usize {
        mutation_rounds.insert(draw_round(rng, config.seq_rounds, config.view_rounds));
    }
    let mut network_rounds = BTreeMap::new();
    while network_rounds.len() < config.network_fault_rounds as usize {
        let round = draw_round(rng, config.seq_rounds, config.view_rounds);
        let mut blocks: Vec<u8> = (0..n).map(|_| rng.below(2) as u8).collect();
        if blocks.iter().all(|block| *block == blocks[0]) {
            let isolated = rng.below(u64::from(n)) as usize;
            blocks[isolated] = 1 - blocks[isolated];
        }
        network_rounds.insert(round, blocks);
    }
    let crash = rng.chance(config.crash_per_mille).then(|| {
        let node = rng.below(u64::from(n)) as usize;
        let latest_restart_ms = config.fault_phase_ms.saturating_sub(1).max(2);
        let crash_ms = rng.between(1, latest_restart_ms * 7 / 10 + 1);
        let restart_ms = (crash_ms + rng.between(200, 1_500)).min(latest_restart_ms);
        (node, crash_ms, restart_ms.max(crash_ms + 1))
    });
    FaultPlan {
        byzantine,
        twins,
        slow,
        mutation_rounds: mutation_rounds.into_iter().collect(),
        network_rounds: network_rounds.into_iter().collect(),
        crash,
        crash_stop: false,
        amnesia: false,
        damaged_log: false,
        byzantine_epoch: None,
    }
}

/// Fisher–Yates with the simulator's seeded stream.
fn shuffle<T>(rng: &mut SimRng, items: &mut [T]) {
    for index in (1..items.len()).rev() {
        let other = rng.below(index as u64 + 1) as usize;
        items.swap(index, other);
    }
}

/// A message kind with the fields a reader of a trace needs.
fn describe_message(message: &ReplicaMessage) -> String {
    let kind = message_kind(message);
    match message {
        ReplicaMessage::Prepare(prepare) => format!(
            "{kind} v{} s{} c{} ({} requests)",
            prepare.header.view.0,
            prepare.header.seq.0,
            prepare.header.ui.counter,
            prepare.batch.len()
        ),
        ReplicaMessage::Commit(commit) => format!(
            "{kind} v{} s{} c{}",
            commit.prepare.view.0, commit.prepare.seq.0, commit.ui.counter
        ),
        ReplicaMessage::Checkpoint(checkpoint) => {
            format!("{kind} s{} c{}", checkpoint.seq.0, checkpoint.ui.counter)
        }
        ReplicaMessage::ViewChange(view_change) => format!(
            "{kind} to v{} c{} ({} log entries)",
            view_change.to_view.0,
            view_change.ui.counter,
            view_change.log.len()
        ),
        ReplicaMessage::NewView(new_view) => format!(
            "{kind} v{} c{} ({} view changes)",
            new_view.view.0,
            new_view.ui.counter,
            new_view.view_changes.len()
        ),
        ReplicaMessage::ReqViewChange(request) => format!("{kind} to v{}", request.to_view.0),
        ReplicaMessage::StateSummary(summary) => {
            format!("{kind} s{}", summary.certificate.seq.0)
        }
        ReplicaMessage::PartitionRequest(request) => format!(
            "{kind} s{} partition {} cursor {}",
            request.seq.0,
            request.partition,
            request.cursor.as_ref().map_or(0, Vec::len)
        ),
        ReplicaMessage::PartitionReply(reply) => format!(
            "{kind} s{} partition {} {}",
            reply.seq.0,
            reply.partition,
            match &reply.chunk {
                Some(chunk) =>
                    format!("{} bytes, last {}", chunk.bytes.len(), chunk.next.is_none()),
                None => "gone".to_string(),
            }
        ),
        ReplicaMessage::Fetch(fetch) => format!(
            "{kind} stream r{} counters {}..={}",
            fetch.stream.0, fetch.from_counter, fetch.to_counter
        ),
        ReplicaMessage::Heartbeat(heartbeat) => format!(
            "{kind} v{} head c{} executed s{} stable s{} processed {:?}",
            heartbeat.view.0,
            heartbeat.head_counter,
            heartbeat.last_executed.0,
            heartbeat.stable_checkpoint.0,
            heartbeat.processed
        ),
        ReplicaMessage::StateRequest(request) => format!("{kind} min s{}", request.min_seq.0),
        _ => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `simulation` until node `node` has handled `inputs` inputs.
    fn run_until_inputs(simulation: &mut Simulation, node: usize, inputs: usize) {
        while simulation.nodes[node].inputs.len() < inputs {
            let scheduled = simulation.queue.pop().expect("the run ended too early");
            simulation.now_ms = scheduled.at_ms;
            simulation.process(scheduled.event);
        }
    }

    #[test]
    fn a_replica_rebuilt_from_its_full_log_is_the_replica_that_crashed() {
        let mut simulation = Simulation::new(SimConfig::default(), 7);
        run_until_inputs(&mut simulation, 1, 400);
        simulation.process(Event::Crash { node: 1 });
        simulation.process(Event::Restart { node: 1 });
        assert!(
            simulation.checker.violations.is_empty(),
            "{:?}",
            simulation.checker.violations
        );
        assert!(simulation.stats.replayed_inputs >= 400);
        assert!(simulation.nodes[1].replica.last_executed().0 > 0);
    }

    /// A replica restored from a snapshot and fed the inputs the original got afterwards is the
    /// original: its own snapshot is the same bytes (every message it sent, every vote and
    /// buffered message, its state), at several points of runs with faults.
    #[test]
    fn a_restored_replica_fed_the_same_inputs_stays_the_original() {
        let mut compared = 0;
        for seed in [3, 11, 42] {
            let config = crate::Setting::for_seed(seed).apply(&SimConfig::default());
            let mut simulation = Simulation::new(config, seed);
            let node = (0..simulation.nodes.len())
                .find(|&node| simulation.nodes[node].role == Role::Correct)
                .expect("a correct node");
            let id = simulation.nodes[node].id;
            for checkpoint in [200, 700, 1500] {
                run_until_inputs(&mut simulation, node, checkpoint);
                if !simulation.nodes[node].replica.can_snapshot() {
                    continue;
                }
                let bytes = simulation.nodes[node].replica.snapshot();
                let taken_at = simulation.nodes[node].inputs.len();
                run_until_inputs(&mut simulation, node, checkpoint + 300);
                let identity = UsigIdentity {
                    replica: ReplicaId(id),
                    epoch: 0,
                };
                let counter = tessera_core::minbft::saved_usig_counter(&bytes).unwrap();
                let usig =
                    HmacUsig::resume(identity, usig_keys(simulation.config.protocol.n), counter)
                        .unwrap();
                let mut restored = Replica::restore(
                    ReplicaId(id),
                    simulation.config.protocol.clone(),
                    Box::new(usig),
                    Box::new(SimAuthenticator {
                        key: simulation.client_key.verifying_key(),
                    }),
                    KvStore::default(),
                    &bytes,
                )
                .unwrap();
                let mut timers = [None; TIMER_KINDS];
                for input in &simulation.nodes[node].inputs[taken_at..] {
                    input.replay_into(&mut restored, &mut timers);
                }
                let original = &mut simulation.nodes[node].replica;
                if original.can_snapshot() && restored.can_snapshot() {
                    assert!(
                        original.snapshot() == restored.snapshot(),
                        "seed {seed}: restored at input {taken_at}, diverged by input {}",
                        simulation.nodes[node].inputs.len()
                    );
                    compared += 1;
                }
                assert_eq!(
                    replica_fingerprint(&simulation.nodes[node].replica),
                    replica_fingerprint(&restored),
                    "seed {seed}"
                );
            }
        }
        assert!(compared >= 6, "only {compared} comparisons");
    }

    /// Crashes `node` and restarts it from its log twice: from its latest snapshot and the
    /// inputs after it (on odd seeds), then from the whole log. Each rebuilt core is compared
    /// with the one that crashed.
    fn crash_and_rebuild_both_ways(simulation: &mut Simulation, node: usize) {
        simulation.process(Event::Crash { node });
        simulation.process(Event::Restart { node });
        simulation.nodes[node].snapshot = None;
        simulation.process(Event::Crash { node });
        simulation.process(Event::Restart { node });
    }

    /// Crashes `node` and restarts it from the first `kept` inputs of its log.
    fn crash_and_damage_log(simulation: &mut Simulation, node: usize, kept: usize) -> u64 {
        simulation.process(Event::Crash { node });
        simulation.nodes[node].crashed = false;
        simulation.restart_in_new_epoch(node, kept)
    }

    /// A replica restarted from the first `kept` inputs of its log (a damaged one, or none)
    /// moves to the epoch above the crashed core's; its new log is those inputs and the
    /// `StartEpoch`, its snapshot is one of them, and later crashes rebuild it exactly, from
    /// its snapshot and from its whole log, also after a second damage that cuts the log
    /// before its first new epoch.
    #[test]
    fn a_replica_restarted_from_a_damaged_log_is_rebuilt_exactly_after_a_later_crash() {
        // The latest snapshot is taken at input 400: a cut before it replays from the start.
        for kept in [0, 1, 230, 410, 420] {
            let config = SimConfig {
                crash_per_mille: 0,
                amnesia_per_mille: 0,
                ..SimConfig::default()
            };
            // An odd seed: restarts begin from the latest snapshot they may use.
            let mut simulation = Simulation::new(config, 7);
            // Node 1 takes snapshots, as the node a seed will crash does.
            simulation.faults.crash = Some((1, u64::MAX, u64::MAX));
            run_until_inputs(&mut simulation, 1, 420);
            let snapshot_usable = simulation.nodes[1]
                .snapshot
                .as_ref()
                .is_some_and(|snapshot| snapshot.covered <= kept);
            assert_eq!(snapshot_usable, kept >= 400, "kept {kept}");
            let at_least = simulation.nodes[1].replica.epoch() + 1;
            let kept_seq = crash_and_damage_log(&mut simulation, 1, kept);
            let node = &simulation.nodes[1];
            assert_eq!(node.replica.epoch(), at_least, "kept {kept}");
            // Nothing kept: the new log starts with its own `Start`.
            let epoch_input = kept.max(1);
            assert_eq!(node.inputs.len(), epoch_input + 1, "kept {kept}");
            assert!(
                matches!(node.inputs[epoch_input], LoggedInput::StartEpoch(_, _, logged) if logged == at_least),
                "kept {kept}: {:?}",
                node.inputs[epoch_input]
            );
            assert!(node
                .snapshot
                .as_ref()
                .is_none_or(|snapshot| snapshot.covered <= kept));
            assert_eq!(
                simulation.stats.snapshot_restores,
                u64::from(snapshot_usable)
            );
            assert!(kept < 230 || kept_seq > 0, "kept {kept}: nothing executed");
            run_until_inputs(&mut simulation, 1, epoch_input + 300);
            crash_and_rebuild_both_ways(&mut simulation, 1);
            assert_eq!(simulation.nodes[1].replica.epoch(), at_least);
            // The kept inputs end in epoch 0, yet the replica must move above `at_least`, and
            // replay must get there too.
            crash_and_damage_log(&mut simulation, 1, kept / 2);
            assert_eq!(simulation.nodes[1].replica.epoch(), at_least + 1);
            let logged = simulation.nodes[1].inputs.len();
            run_until_inputs(&mut simulation, 1, logged + 100);
            crash_and_rebuild_both_ways(&mut simulation, 1);
            assert!(
                simulation.checker.violations.is_empty(),
                "kept {kept}: {:?}",
                simulation.checker.violations
            );
            assert_eq!(simulation.nodes[1].replica.epoch(), at_least + 1);
        }
    }

    #[test]
    fn a_replay_that_misses_inputs_is_caught() {
        let mut simulation = Simulation::new(SimConfig::default(), 7);
        run_until_inputs(&mut simulation, 1, 400);
        // Lose every client request and PREPARE the log holds after its first 100 inputs: the
        // replica that comes back has executed less than the one that crashed.
        let kept: Vec<LoggedInput> = std::mem::take(&mut simulation.nodes[1].inputs)
            .into_iter()
            .enumerate()
            .filter(|(index, input)| {
                *index < 100
                    || !matches!(
                        input,
                        LoggedInput::Request(..)
                            | LoggedInput::Message(_, _, _, ReplicaMessage::Prepare(_))
                    )
            })
            .map(|(_, input)| input)
            .collect();
        simulation.nodes[1].inputs = kept;
        simulation.process(Event::Crash { node: 1 });
        simulation.process(Event::Restart { node: 1 });
        assert!(
            matches!(
                simulation.checker.violations.as_slice(),
                [Violation::ReplayDiverged { replica: 1, .. }]
            ),
            "{:?}",
            simulation.checker.violations
        );
    }
}
