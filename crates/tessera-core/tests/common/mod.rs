//! A small deterministic cluster harness for scripted scenarios: n replicas on a message queue,
//! logical time, clients that sign requests and synthesize replies. Links can be cut and messages
//! dropped or rewritten by a filter, so tests can script faults exactly.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tessera_core::{Action, Replica, ReplyCollector, ReplyOutcome, RequestAuthenticator, Timer};
use tessera_crypto::sign::{SigningKey, VerifyingKey};
use tessera_crypto::Digest;
use tessera_kv::{Command, KvStore, Response};
use tessera_types::{
    batch_digest, prepare_certified_digest, ClientId, Prepare, PrepareHeader, ProtocolConfig,
    ReplicaId, ReplicaMessage, Reply, Request, SeqNum, View,
};
use tessera_usig::hmac::HmacUsig;
use tessera_usig::{Usig, UsigIdentity};

/// Checks Ed25519 signatures against one test client key.
pub struct TestAuthenticator {
    pub key: VerifyingKey,
}

impl RequestAuthenticator for TestAuthenticator {
    fn verify_signature(&self, request: &Request) -> bool {
        self.key.verify(&request.digest(), &request.signature)
    }
    fn verify_mac(&self, _request: &Request) -> bool {
        true
    }
}

pub fn client_key() -> SigningKey {
    SigningKey::from_seed(&[7u8; 32])
}

pub fn sign_request(client: ClientId, request_number: u64, operation: Vec<u8>) -> Request {
    let mut request = Request {
        client,
        request_number,
        operation,
        signature: vec![0; 64],
        macs: Vec::new(),
    };
    request.signature = client_key().sign(&request.digest()).to_vec();
    request
}

/// What the network does with one message: deliver, drop, or deliver something else.
pub enum Fate {
    Deliver,
    Drop,
    Replace(ReplicaMessage),
    /// Deliver it `delay_ms` of logical time later (bypassing the filter then).
    Delay(u64),
    /// Deliver something else, `delay_ms` of logical time later.
    ReplaceLater(u64, ReplicaMessage),
}

pub type Filter = Box<dyn FnMut(ReplicaId, ReplicaId, &ReplicaMessage) -> Fate>;

pub struct Cluster {
    pub config: ProtocolConfig,
    pub replicas: Vec<Replica<KvStore>>,
    pub crashed: Vec<bool>,
    pub now_ms: u64,
    queue: VecDeque<(ReplicaId, ReplicaId, ReplicaMessage)>,
    timers: Vec<BTreeMap<Timer, u64>>,
    pub replies: Vec<Reply>,
    pub filter: Option<Filter>,
    pub delivered: u64,
    /// Replicas cut off from every other replica and from clients (a network partition).
    pub isolated: Vec<bool>,
    /// Messages held back by `Fate::Delay`: (due time, from, to, message).
    delayed: Vec<(u64, ReplicaId, ReplicaId, ReplicaMessage)>,
    /// Per replica: the state digest it had right after executing up to each sequence number
    /// (recorded whenever its `last_executed` changed), to compare histories across replicas.
    pub history: Vec<BTreeMap<u64, Digest>>,
    /// Per replica: how far its wall clock is from `WALL_BASE_MS + now_ms` (may be negative).
    pub wall_skew_ms: Vec<i64>,
}

/// The wall clock every test replica reads at logical time 0 (ms since the Unix epoch).
pub const WALL_BASE_MS: u64 = 1_700_000_000_000;

pub fn config(n: u32, f: u32) -> ProtocolConfig {
    ProtocolConfig {
        n,
        f,
        checkpoint_interval: 8,
        log_size: 16,
        window: 4,
        batch_requests_max: 16,
        request_timeout_ms: 500,
        view_change_timeout_ms: 500,
        heartbeat_interval_ms: 100,
        ..ProtocolConfig::default()
    }
}

impl Cluster {
    pub fn new(config: ProtocolConfig) -> Cluster {
        Cluster::with_usig(config, None)
    }

    /// Like [`Cluster::new`], with replica `index` using `usig` instead of its plain HMAC USIG.
    pub fn with_usig(
        config: ProtocolConfig,
        mut replaced: Option<(u32, Box<dyn tessera_usig::Usig>)>,
    ) -> Cluster {
        let n = config.n;
        let keys: Vec<[u8; 32]> = (0..n).map(|index| [index as u8 + 1; 32]).collect();
        let replicas = (0..n)
            .map(|index| {
                let usig: Box<dyn tessera_usig::Usig> = match replaced.take() {
                    Some((replaced_index, usig)) if replaced_index == index => usig,
                    other => {
                        replaced = other;
                        Box::new(HmacUsig::new(
                            UsigIdentity {
                                replica: ReplicaId(index),
                                epoch: 0,
                            },
                            keys.clone(),
                        ))
                    }
                };
                let authenticator = TestAuthenticator {
                    key: client_key().verifying_key(),
                };
                Replica::new(
                    ReplicaId(index),
                    config.clone(),
                    usig,
                    Box::new(authenticator),
                    KvStore::default(),
                )
                .expect("valid config")
            })
            .collect();
        let mut cluster = Cluster {
            config,
            replicas,
            crashed: vec![false; n as usize],
            now_ms: 0,
            queue: VecDeque::new(),
            timers: vec![BTreeMap::new(); n as usize],
            replies: Vec::new(),
            filter: None,
            delivered: 0,
            isolated: vec![false; n as usize],
            delayed: Vec::new(),
            history: vec![BTreeMap::new(); n as usize],
            wall_skew_ms: vec![0; n as usize],
        };
        for index in 0..n as usize {
            let wall_ms = cluster.wall_ms(index);
            cluster.replicas[index].start(0, wall_ms);
            cluster.collect(index);
        }
        cluster
    }

    /// Replica `index`'s wall clock now.
    pub fn wall_ms(&self, index: usize) -> u64 {
        let skew = self.wall_skew_ms.get(index).copied().unwrap_or(0);
        (WALL_BASE_MS + self.now_ms).saturating_add_signed(skew)
    }

    fn collect(&mut self, index: usize) {
        let from = ReplicaId(index as u32);
        self.record_history(index);
        for action in self.replicas[index].take_actions() {
            if self.crashed[index] {
                continue;
            }
            match action {
                Action::Send { to, message } => self.queue.push_back((from, to, message)),
                Action::Broadcast { message } => {
                    for to in 0..self.config.n {
                        if to != from.0 {
                            self.queue.push_back((from, ReplicaId(to), message.clone()));
                        }
                    }
                }
                Action::Reply(reply) => self.replies.push(reply),
                Action::SetTimer { timer, deadline_ms } => {
                    self.timers[index].insert(timer, deadline_ms);
                }
                Action::CancelTimer(timer) => {
                    self.timers[index].remove(&timer);
                }
                Action::Executed { .. } => {}
            }
        }
    }

    fn record_history(&mut self, index: usize) {
        let replica = &self.replicas[index];
        let seq = replica.last_executed().0;
        let known = self.history[index].keys().next_back().copied().unwrap_or(0);
        if seq != known {
            self.history[index].insert(seq, replica.state_digest());
        }
    }

    /// Sends a client request to the given replicas.
    pub fn submit(&mut self, request: &Request, to: &[u32]) {
        for &index in to {
            if self.crashed[index as usize] || self.isolated[index as usize] {
                continue;
            }
            let wall_ms = self.wall_ms(index as usize);
            self.replicas[index as usize].handle_request(self.now_ms, wall_ms, request.clone());
            self.collect(index as usize);
        }
    }

    /// Delivers queued messages until the queue is empty (or `limit` deliveries).
    pub fn deliver_all(&mut self, limit: usize) {
        for _ in 0..limit {
            let Some((from, to, message)) = self.queue.pop_front() else {
                return;
            };
            if self.crashed[to.0 as usize] || self.crashed[from.0 as usize] {
                continue;
            }
            if self.isolated[to.0 as usize] || self.isolated[from.0 as usize] {
                continue;
            }
            let message = match self
                .filter
                .as_mut()
                .map(|filter| filter(from, to, &message))
            {
                Some(Fate::Drop) => continue,
                Some(Fate::Replace(other)) => other,
                Some(Fate::Delay(delay_ms)) => {
                    self.delayed
                        .push((self.now_ms + delay_ms, from, to, message));
                    continue;
                }
                Some(Fate::ReplaceLater(delay_ms, other)) => {
                    self.delayed.push((self.now_ms + delay_ms, from, to, other));
                    continue;
                }
                _ => message,
            };
            self.deliver_one(from, to, message);
        }
    }

    fn deliver_one(&mut self, from: ReplicaId, to: ReplicaId, message: ReplicaMessage) {
        if self.crashed[to.0 as usize] || self.crashed[from.0 as usize] {
            return;
        }
        if self.isolated[to.0 as usize] || self.isolated[from.0 as usize] {
            return;
        }
        self.delivered += 1;
        let wall_ms = self.wall_ms(to.0 as usize);
        self.replicas[to.0 as usize].handle_message(self.now_ms, wall_ms, from, message);
        self.collect(to.0 as usize);
    }

    fn deliver_delayed(&mut self) {
        let now_ms = self.now_ms;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|(due_ms, ..)| *due_ms <= now_ms);
        self.delayed = later;
        for (_, from, to, message) in due {
            self.deliver_one(from, to, message);
        }
    }

    /// Injects a message as if `from` had sent it to `to`.
    pub fn inject(&mut self, from: u32, to: u32, message: ReplicaMessage) {
        let wall_ms = self.wall_ms(to as usize);
        self.replicas[to as usize].handle_message(self.now_ms, wall_ms, ReplicaId(from), message);
        self.collect(to as usize);
    }

    /// Advances logical time by `step_ms`, firing due timers, then delivers everything.
    pub fn tick(&mut self, step_ms: u64) {
        self.now_ms += step_ms;
        for index in 0..self.replicas.len() {
            if self.crashed[index] {
                continue;
            }
            let due: Vec<Timer> = self.timers[index]
                .iter()
                .filter(|(_, deadline)| **deadline <= self.now_ms)
                .map(|(timer, _)| *timer)
                .collect();
            for timer in due {
                self.timers[index].remove(&timer);
                let wall_ms = self.wall_ms(index);
                self.replicas[index].handle_timer(self.now_ms, wall_ms, timer);
                self.collect(index);
            }
        }
        self.deliver_delayed();
        self.deliver_all(1_000_000);
    }

    pub fn crash(&mut self, index: u32) {
        self.crashed[index as usize] = true;
    }

    /// Replica `index` restarts without its log: a new, empty core whose USIG moves on to the
    /// next epoch (docs/PROTOCOL.md §8). Returns the new epoch.
    pub fn restart_without_log(&mut self, index: u32) -> u64 {
        let i = index as usize;
        let n = self.config.n;
        let keys: Vec<[u8; 32]> = (0..n).map(|index| [index as u8 + 1; 32]).collect();
        let usig = HmacUsig::new(
            UsigIdentity {
                replica: ReplicaId(index),
                epoch: self.replicas[i].epoch(),
            },
            keys,
        );
        let authenticator = TestAuthenticator {
            key: client_key().verifying_key(),
        };
        self.replicas[i] = Replica::new(
            ReplicaId(index),
            self.config.clone(),
            Box::new(usig),
            Box::new(authenticator),
            KvStore::default(),
        )
        .expect("valid config");
        self.crashed[i] = false;
        self.timers[i].clear();
        self.history[i].clear();
        let wall_ms = self.wall_ms(i);
        self.replicas[i].start(self.now_ms, wall_ms);
        self.collect(i);
        let epoch = self.replicas[i]
            .start_epoch(self.now_ms, wall_ms)
            .expect("the in-process USIG starts epochs");
        self.collect(i);
        epoch
    }

    /// Replica `index` restarts from `snapshot`, an earlier snapshot of itself (what a node
    /// keeps when it salvages a damaged log: an older checkpoint, or the log up to the damage),
    /// and moves its USIG to a new epoch, since it forgot what it certified after the snapshot
    /// (docs/STATE.md §5). Returns the new epoch.
    pub fn restart_from_snapshot_in_new_epoch(&mut self, index: u32, snapshot: &[u8]) -> u64 {
        let i = index as usize;
        let n = self.config.n;
        let keys: Vec<[u8; 32]> = (0..n).map(|index| [index as u8 + 1; 32]).collect();
        let identity = UsigIdentity {
            replica: ReplicaId(index),
            epoch: tessera_core::minbft::saved_usig_epoch(snapshot).expect("a snapshot"),
        };
        let counter = tessera_core::minbft::saved_usig_counter(snapshot).expect("a snapshot");
        let usig = HmacUsig::resume(identity, keys, counter).expect("a known replica");
        let authenticator = TestAuthenticator {
            key: client_key().verifying_key(),
        };
        self.replicas[i] = Replica::restore(
            ReplicaId(index),
            self.config.clone(),
            Box::new(usig),
            Box::new(authenticator),
            KvStore::default(),
            snapshot,
        )
        .expect("the snapshot restores");
        self.crashed[i] = false;
        self.timers[i].clear();
        let wall_ms = self.wall_ms(i);
        let above = self.replicas[i].epoch() + 1;
        let epoch = self.replicas[i]
            .start_epoch_at_least(self.now_ms, wall_ms, above)
            .expect("the in-process USIG starts epochs");
        self.collect(i);
        epoch
    }

    pub fn live(&self) -> impl Iterator<Item = &Replica<KvStore>> {
        self.replicas
            .iter()
            .zip(&self.crashed)
            .filter(|(_, crashed)| !**crashed)
            .map(|(replica, _)| replica)
    }

    /// Runs one request to completion (f+1 matching replies), retransmitting to all replicas
    /// every 300 ms like a client would. Returns the result or None after `deadline_ms`.
    pub fn invoke(
        &mut self,
        client: ClientId,
        request_number: u64,
        command: &Command,
        deadline_ms: u64,
    ) -> Option<Response> {
        self.invoke_many(&[(client, request_number, command.clone())], deadline_ms)
            .pop()
            .expect("one result per request")
    }

    /// Runs several requests concurrently (all submitted to the believed primary at once, then
    /// retransmitted to every replica every 300 ms until each has f+1 matching replies).
    /// Returns one result per request, in order; None for those unfinished after `deadline_ms`.
    pub fn invoke_many(
        &mut self,
        requests: &[(ClientId, u64, Command)],
        deadline_ms: u64,
    ) -> Vec<Option<Response>> {
        let signed: Vec<Request> = requests
            .iter()
            .map(|(client, number, command)| sign_request(*client, *number, command.encode()))
            .collect();
        let start = self.now_ms;
        let primary = self.believed_primary();
        for request in &signed {
            self.submit(request, &[primary]);
        }
        self.deliver_all(1_000_000);
        let needed = self.config.f as usize + 1;
        let mut collectors: Vec<ReplyCollector> = requests
            .iter()
            .map(|(_, number, _)| ReplyCollector::new(*number, needed))
            .collect();
        let mut results: Vec<Option<Response>> = vec![None; requests.len()];
        let mut last_send = self.now_ms;
        loop {
            let replies = std::mem::take(&mut self.replies);
            for reply in replies {
                let Some(index) = requests.iter().position(|(client, number, _)| {
                    *client == reply.client && *number == reply.request_number
                }) else {
                    self.replies.push(reply);
                    continue;
                };
                if results[index].is_some() {
                    continue;
                }
                if let ReplyOutcome::Complete { result, .. } = collectors[index].add(reply) {
                    results[index] = Some(Response::decode(&result).expect("kv response"));
                }
            }
            if results.iter().all(Option::is_some) || self.now_ms > start + deadline_ms {
                return results;
            }
            if self.now_ms >= last_send + 300 {
                let all: Vec<u32> = (0..self.config.n).collect();
                for (index, request) in signed.iter().enumerate() {
                    if results[index].is_none() {
                        self.submit(request, &all);
                    }
                }
                last_send = self.now_ms;
            }
            self.tick(10);
        }
    }

    /// Advances logical time by `duration_ms` in 10 ms steps.
    pub fn run_for(&mut self, duration_ms: u64) {
        for _ in 0..duration_ms.div_ceil(10) {
            self.tick(10);
        }
    }

    /// No two replicas ever had different states after executing up to the same sequence number.
    pub fn assert_histories_agree(&self) {
        let mut seen: BTreeMap<u64, (usize, Digest)> = BTreeMap::new();
        for (index, history) in self.history.iter().enumerate() {
            for (seq, digest) in history {
                match seen.get(seq) {
                    Some((other, expected)) => assert_eq!(
                        expected, digest,
                        "replicas {other} and {index} had different states after seq {seq}"
                    ),
                    None => {
                        seen.insert(*seq, (index, *digest));
                    }
                }
            }
        }
    }

    /// Every live replica executed exactly up to the same sequence number with the same state.
    pub fn assert_all_caught_up(&self) {
        let live: Vec<&Replica<KvStore>> = self.live().collect();
        for replica in &live[1..] {
            assert_eq!(
                (replica.last_executed(), replica.state_digest()),
                (live[0].last_executed(), live[0].state_digest()),
                "replica {:?} differs from replica {:?}: {:?} vs {:?}",
                replica.id(),
                live[0].id(),
                replica.status(),
                live[0].status()
            );
        }
    }

    /// Total rejections with `reason` at `replica`.
    pub fn rejections(&self, replica: u32, reason: &str) -> u64 {
        self.replicas[replica as usize]
            .rejections()
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    pub fn believed_primary(&self) -> u32 {
        let view = self
            .live()
            .map(|replica| replica.view())
            .max()
            .unwrap_or(View(0));
        view.primary(self.config.n).0
    }

    /// All live replicas executed the same prefix: equal digests where their progress is equal.
    pub fn assert_consistent(&self) {
        let live: Vec<&Replica<KvStore>> = self.live().collect();
        let top = live
            .iter()
            .map(|replica| replica.last_executed())
            .max()
            .unwrap();
        let leaders: Vec<_> = live
            .iter()
            .filter(|replica| replica.last_executed() == top)
            .collect();
        for pair in leaders.windows(2) {
            assert_eq!(
                pair[0].state_digest(),
                pair[1].state_digest(),
                "replicas {:?} and {:?} executed up to {:?} but differ",
                pair[0].id(),
                pair[1].id(),
                top
            );
        }
    }
}

/// A USIG holding replica `index`'s key, as a Byzantine replica (or the test playing one) would
/// use it: it certifies with the same counter sequence the real replica starts from (1, 2, ...).
pub fn usig_of(index: u32, n: u32) -> HmacUsig {
    let keys: Vec<[u8; 32]> = (0..n).map(|index| [index as u8 + 1; 32]).collect();
    HmacUsig::new(
        UsigIdentity {
            replica: ReplicaId(index),
            epoch: 0,
        },
        keys,
    )
}

pub fn set(key: &str, value: &str) -> Command {
    Command::Set {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

pub fn get(key: &str) -> Command {
    Command::Get {
        key: key.as_bytes().to_vec(),
    }
}

pub fn incr(key: &str) -> Command {
    Command::Incr {
        key: key.as_bytes().to_vec(),
        delta: 1,
    }
}

pub fn value(text: &str) -> Option<Response> {
    Some(Response::Value(Some(text.as_bytes().to_vec())))
}

/// A PREPARE certified by `usig` (the next counter of the replica it belongs to), with the
/// agreed time `WALL_BASE_MS` (logical time 0).
pub fn forge_prepare(usig: &mut HmacUsig, view: View, seq: SeqNum, batch: Vec<Request>) -> Prepare {
    forge_prepare_at(usig, view, seq, batch, WALL_BASE_MS)
}

/// A PREPARE certified by `usig` with the agreed time `time_ms`.
pub fn forge_prepare_at(
    usig: &mut HmacUsig,
    view: View,
    seq: SeqNum,
    batch: Vec<Request>,
    time_ms: u64,
) -> Prepare {
    let primary = usig.identity().replica;
    let digest = batch_digest(&batch);
    let ui = usig
        .create_ui(&prepare_certified_digest(
            primary, view, seq, &digest, time_ms,
        ))
        .expect("test USIG");
    Prepare {
        header: PrepareHeader {
            primary,
            view,
            seq,
            batch_digest: digest,
            time_ms,
            ui,
        },
        batch: Arc::new(batch),
    }
}

/// Injects `message` from replica `from` to every other replica.
pub fn broadcast_from(cluster: &mut Cluster, from: u32, message: &ReplicaMessage) {
    for to in 0..cluster.config.n {
        if to != from {
            cluster.inject(from, to, message.clone());
        }
    }
}
