//! The event loop: real replicas, simulated clients and a seeded faulty network.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use tessera_core::{Action, Replica, ReplyCollector, ReplyOutcome, RequestAuthenticator, Timer};
use tessera_crypto::sign::{SigningKey, VerifyingKey};
use tessera_crypto::{Digest, DigestBuilder};
use tessera_kv::{KvStore, Response};
use tessera_types::{ReplicaId, ReplicaMessage, Reply, Request};
use tessera_usig::hmac::HmacUsig;
use tessera_usig::UsigIdentity;

use crate::check::{Checker, Violation};
use crate::config::SimConfig;
use crate::rng::{SimRng, STREAM_NETWORK, STREAM_WORKLOAD};
use crate::workload::{random_command, Client, Operation};

/// Seed of the one client credential's Ed25519 key (fixed: keys are not what is being tested).
const CLIENT_KEY_SEED: [u8; 32] = [7u8; 32];
/// Timer kinds, for per-kind generation counters.
const TIMER_KINDS: usize = 3;

/// Verifies client signatures against the single simulated credential.
struct SimAuthenticator {
    key: VerifyingKey,
}

impl RequestAuthenticator for SimAuthenticator {
    fn verify_signature(&self, request: &Request) -> bool {
        self.key.verify(&request.digest(), &request.signature)
    }
    fn verify_mac(&self, _request: &Request) -> bool {
        // v0 clients sign every request; MAC authentication is not simulated.
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
        ReplicaMessage::StateReply(_) => "STATE-REPLY",
        ReplicaMessage::FetchNewView { .. } => "FETCH-NEW-VIEW",
    }
}

/// Something scheduled to happen at a logical time.
#[derive(Debug)]
enum Event {
    /// A replica-to-replica message arrives.
    Message {
        from: u32,
        to: u32,
        message: ReplicaMessage,
    },
    /// A client request arrives at a replica.
    Request { to: u32, request: Request },
    /// A reply arrives at its client.
    Reply { client: usize, reply: Reply },
    /// A replica's timer fires (ignored unless `generation` is still current).
    ReplicaTimer {
        replica: u32,
        timer: Timer,
        generation: u64,
    },
    /// A client's retransmission timer fires (ignored unless `generation` is current).
    ClientRetry { client: usize, generation: u64 },
    /// A client invokes its next operation.
    ClientInvoke { client: usize },
    /// The partition changes (fault phase only).
    NetworkChange,
    /// Faults stop: the network becomes reliable.
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
    /// Messages dropped by the network.
    pub dropped: u64,
    /// Messages the network delivered twice.
    pub duplicated: u64,
    /// Replica-to-replica messages cut by a partition.
    pub partitioned: u64,
    /// Partition changes during the fault phase.
    pub partition_changes: u64,
    /// Client retransmissions.
    pub retransmissions: u64,
    /// Operations completed.
    pub completed: u64,
    /// Operations invoked.
    pub invoked: u64,
    /// Timers the cores armed with a deadline not in the future (each fires 1 ms later).
    pub past_deadline_timers: u64,
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
    /// Logical time at the end of the run.
    pub end_ms: u64,
    /// When the network healed.
    pub heal_ms: u64,
    /// Latest completion time minus the heal time (0 if everything finished before the heal).
    pub recovery_ms: u64,
    /// Per replica at the end: (view, last executed, stable checkpoint seq).
    pub replicas: Vec<(u64, u64, u64)>,
    /// Per replica at the end: messages it rejected, by reason.
    pub rejections: Vec<Vec<(&'static str, u64)>>,
    /// The client history.
    pub history: Vec<Operation>,
    /// One line per processed event, if `SimConfig::trace` was set.
    pub trace: Vec<String>,
}

impl Report {
    /// True if no checker fired.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// One seeded run of real MinBFT replicas on a simulated network.
pub struct Simulation {
    config: SimConfig,
    seed: u64,
    now_ms: u64,
    queue: BinaryHeap<Scheduled>,
    next_order: u64,
    replicas: Vec<Replica<KvStore>>,
    timer_generations: Vec<[u64; TIMER_KINDS]>,
    clients: Vec<Client>,
    history: Vec<Operation>,
    network_rng: SimRng,
    workload_rng: SimRng,
    client_key: SigningKey,
    /// Partition group of each replica; replicas in different groups cannot talk.
    groups: Vec<u8>,
    healed: bool,
    checker: Checker,
    trace_hash: DigestBuilder,
    trace: Vec<String>,
    stats: Stats,
}

impl Simulation {
    /// Builds the cluster and the clients, and schedules the first events.
    ///
    /// # Panics
    /// If `config` is invalid (see [`SimConfig::validate`]).
    pub fn new(config: SimConfig, seed: u64) -> Simulation {
        if let Err(error) = config.validate() {
            panic!("invalid simulation config: {error}");
        }
        let n = config.protocol.n;
        let client_key = SigningKey::from_seed(&CLIENT_KEY_SEED);
        let usig_keys: Vec<[u8; 32]> = (0..n).map(|index| [index as u8 + 1; 32]).collect();
        let replicas = (0..n)
            .map(|index| {
                let usig = HmacUsig::new(
                    UsigIdentity {
                        replica: ReplicaId(index),
                        epoch: 0,
                    },
                    usig_keys.clone(),
                );
                let authenticator = SimAuthenticator {
                    key: client_key.verifying_key(),
                };
                Replica::new(
                    ReplicaId(index),
                    config.protocol.clone(),
                    Box::new(usig),
                    Box::new(authenticator),
                    KvStore::default(),
                )
                .expect("config validated above")
            })
            .collect();
        let clients = (0..config.clients)
            .map(|session| Client::new(session, config.operations_per_client))
            .collect();
        let mut simulation = Simulation {
            seed,
            now_ms: 0,
            queue: BinaryHeap::new(),
            next_order: 0,
            replicas,
            timer_generations: vec![[0; TIMER_KINDS]; n as usize],
            clients,
            history: Vec::new(),
            network_rng: SimRng::new(seed, STREAM_NETWORK),
            workload_rng: SimRng::new(seed, STREAM_WORKLOAD),
            client_key,
            groups: vec![0; n as usize],
            healed: false,
            checker: Checker::default(),
            trace_hash: DigestBuilder::new("tessera-sim trace v0"),
            trace: Vec::new(),
            stats: Stats::default(),
            config,
        };
        for index in 0..n {
            simulation.replicas[index as usize].start(0);
            simulation.after_replica_step(index);
        }
        for client in 0..simulation.clients.len() {
            let think_ms = simulation
                .workload_rng
                .below(simulation.config.think_ms_max + 1);
            simulation.schedule(think_ms, Event::ClientInvoke { client });
        }
        let first_change = simulation.partition_change_delay();
        simulation.schedule(first_change, Event::NetworkChange);
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
            if self.stats.events >= self.config.events_max {
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
            .replicas
            .iter()
            .map(|replica| {
                (
                    replica.id().0,
                    replica.last_executed().0,
                    replica.state_digest(),
                )
            })
            .collect();
        self.checker.check_convergence(progress);
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
            end_ms: self.now_ms,
            heal_ms,
            recovery_ms,
            replicas: self
                .replicas
                .iter()
                .map(|replica| {
                    (
                        replica.view().0,
                        replica.last_executed().0,
                        replica.stable_checkpoint().seq.0,
                    )
                })
                .collect(),
            rejections: self
                .replicas
                .iter()
                .map(|replica| {
                    let rejections = replica.rejections();
                    rejections
                        .iter()
                        .map(|(reason, count)| (*reason, *count))
                        .collect()
                })
                .collect(),
            history: self.history,
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
                self.stats.delivered += 1;
                self.replicas[to as usize].handle_message(self.now_ms, ReplicaId(from), message);
                self.after_replica_step(to);
            }
            Event::Request { to, request } => {
                self.stats.delivered += 1;
                self.replicas[to as usize].handle_request(self.now_ms, request);
                self.after_replica_step(to);
            }
            Event::Reply { client, reply } => {
                self.stats.delivered += 1;
                self.on_client_reply(client, reply);
            }
            Event::ReplicaTimer {
                replica,
                timer,
                generation,
            } => {
                if self.timer_generations[replica as usize][timer_index(timer)] == generation {
                    self.replicas[replica as usize].handle_timer(self.now_ms, timer);
                    self.after_replica_step(replica);
                }
            }
            Event::ClientRetry { client, generation } => {
                if self.clients[client].retry_generation == generation {
                    self.retransmit(client);
                }
            }
            Event::ClientInvoke { client } => self.invoke(client),
            Event::NetworkChange => self.change_partition(),
            Event::Heal => {
                self.healed = true;
                self.groups.iter_mut().for_each(|group| *group = 0);
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
                hash.u64(0)
                    .u64(u64::from(*from))
                    .u64(u64::from(*to))
                    .bytes(&bytes);
            }
            Event::Request { to, request } => {
                hash.u64(1).u64(u64::from(*to)).digest(&request.digest());
            }
            Event::Reply { client, reply } => {
                hash.u64(2)
                    .u64(*client as u64)
                    .u64(u64::from(reply.replica.0))
                    .u64(reply.request_number)
                    .bytes(&reply.result);
            }
            Event::ReplicaTimer {
                replica,
                timer,
                generation,
            } => {
                hash.u64(3)
                    .u64(u64::from(*replica))
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
        }
    }

    fn trace_line(&mut self, event: &Event) {
        let line = match event {
            Event::Message { from, to, message } => {
                format!("r{from} -> r{to} {}", message_kind(message))
            }
            Event::Request { to, request } => format!(
                "client {} -> r{to} REQUEST #{}",
                request.client.session(),
                request.request_number
            ),
            Event::Reply { client, reply } => format!(
                "r{} -> client {client} REPLY #{} view {}",
                reply.replica.0, reply.request_number, reply.view.0
            ),
            Event::ReplicaTimer { replica, timer, .. } => format!("r{replica} timer {timer:?}"),
            Event::ClientRetry { client, .. } => format!("client {client} retransmits"),
            Event::ClientInvoke { client } => format!("client {client} invokes"),
            Event::NetworkChange => format!("network change, groups now {:?}", self.groups),
            Event::Heal => "heal: network reliable from now on".to_string(),
        };
        self.trace.push(format!("{:>8} ms  {line}", self.now_ms));
    }

    // ------------------------------------------------------------------ replicas

    /// Carries out a replica's actions and shows its progress to the checker.
    fn after_replica_step(&mut self, index: u32) {
        let replica = &mut self.replicas[index as usize];
        let actions = replica.take_actions();
        let stable = replica.stable_checkpoint();
        let checkpoint = (stable.seq.0, stable.state_digest);
        let (last_executed, state) = (replica.last_executed().0, replica.state_digest());
        self.checker
            .observe_progress(index, last_executed, state, checkpoint);
        for action in actions {
            match action {
                Action::Send { to, message } => self.send_to_replica(index, to.0, message),
                Action::Broadcast { message } => {
                    for to in 0..self.config.protocol.n {
                        if to != index {
                            self.send_to_replica(index, to, message.clone());
                        }
                    }
                }
                Action::Reply(reply) => self.send_reply(reply),
                Action::SetTimer { timer, deadline_ms } => {
                    let generation = self.bump_timer(index, timer);
                    if deadline_ms <= self.now_ms {
                        self.stats.past_deadline_timers += 1;
                    }
                    // A deadline at or before now fires one logical millisecond later, as a real
                    // driver serves it on its next turn. Without this, the core's habit of
                    // re-arming `Timer::Request` at an already-passed deadline while its
                    // REQ-VIEW-CHANGE is outstanding would loop forever at one instant.
                    let delay_ms = deadline_ms.saturating_sub(self.now_ms).max(1);
                    self.schedule(
                        delay_ms,
                        Event::ReplicaTimer {
                            replica: index,
                            timer,
                            generation,
                        },
                    );
                }
                Action::CancelTimer(timer) => {
                    self.bump_timer(index, timer);
                }                Action::Executed { .. } => {}

            }
        }
    }

    fn bump_timer(&mut self, replica: u32, timer: Timer) -> u64 {
        let generation = &mut self.timer_generations[replica as usize][timer_index(timer)];
        *generation += 1;
        *generation
    }

    // ------------------------------------------------------------------ network

    /// Decides how many copies of a message arrive and after which delays (0, 1 or 2 copies).
    fn fates(&mut self) -> Vec<u64> {
        if self.healed {
            let delay_ms = self.network_rng.between(1, self.config.healed_delay_ms_max);
            return vec![delay_ms];
        }
        if self.network_rng.chance(self.config.drop_per_mille) {
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

    fn send_to_replica(&mut self, from: u32, to: u32, message: ReplicaMessage) {
        if self.groups[from as usize] != self.groups[to as usize] {
            self.stats.partitioned += 1;
            return;
        }
        for delay_ms in self.fates() {
            let event = Event::Message {
                from,
                to,
                message: message.clone(),
            };
            self.schedule(delay_ms, event);
        }
    }

    fn send_request(&mut self, to: u32, request: &Request) {
        for delay_ms in self.fates() {
            let event = Event::Request {
                to,
                request: request.clone(),
            };
            self.schedule(delay_ms, event);
        }
    }

    fn send_reply(&mut self, reply: Reply) {
        let client = self
            .clients
            .iter()
            .position(|client| client.id == reply.client);
        self.checker
            .observe_reply(&reply, client.map(|index| &self.clients[index]));
        let Some(client) = client else {
            return;
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

    /// Either heals the partition or draws a new one: each replica joins group 0 or 1.
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
        let delay_ms = self.partition_change_delay();
        self.schedule(delay_ms, Event::NetworkChange);
    }

    // ------------------------------------------------------------------ clients

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
        request.signature = self.client_key.sign(&request.digest()).to_vec();
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
}
