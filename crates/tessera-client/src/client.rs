//! [`Client`]: connections to every replica, shared by many [`Session`]s.

use crate::connection::{self, Frame};
use crate::error::ClientError;
use crate::options::ClientOptions;
use crate::pending::PendingTable;
use crate::request::{frame, Credential, REPLY_FRAME_BYTES_MAX};
use crate::shared::{ClientStats, ConnectionState, Shared};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tessera_core::envelope::{decode_results, encode_operations, ENVELOPE_OPERATIONS_MAX};
use tessera_types::cluster::{ClientSecrets, ClusterConfig};
use tessera_types::wire::ClientToReplica;
use tessera_types::{ClientId, ReplicaId, View};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often [`Client::connect`] looks whether enough connections are up.
const CONNECT_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How long [`Client::connect`] waits, once connected, for f+1 replicas to report their view.
const VIEW_REPORT_WAIT: Duration = Duration::from_millis(200);

/// A connection to a Tessera cluster: one TCP connection per replica, each with a reader and a
/// coalescing writer, shared by any number of [`Session`]s. Cheap to clone; the connections
/// close when the last clone and the last session are dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    options: ClientOptions,
    /// Send queues, one per entry of `shared.connections`.
    queues: Vec<mpsc::Sender<Frame>>,
    tasks: Vec<JoinHandle<()>>,
    /// Cluster size (the primary of view v is v mod n).
    replica_count: u32,
    /// Matching replies a result needs: f+1, or 1 without replication.
    needed: usize,
    /// Session numbers are `session_base + k`; the random base keeps two processes using the
    /// same credential from sharing a session (and thus a request-number sequence).
    session_base: u32,
    next_session: AtomicU32,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Client {
    /// Connects to the cluster and waits (up to `options.connect_timeout`) until enough
    /// replicas to answer a request — f+1, or replica 0 alone when `options.unreplicated` —
    /// accept a connection. Connections that fail later are re-established in the background.
    pub async fn connect(
        cluster: ClusterConfig,
        secrets: ClientSecrets,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        options.validate()?;
        cluster
            .validate()
            .map_err(|error| ClientError::Config(error.to_string()))?;
        let credential = Credential::new(&cluster, &secrets)?;
        let replica_count = cluster.protocol.n;
        let (needed, targets): (usize, Vec<ReplicaId>) = if options.unreplicated {
            (1, vec![ReplicaId(0)])
        } else {
            let f = cluster.protocol.f as usize;
            (f + 1, (0..replica_count).map(ReplicaId).collect())
        };
        let connections = targets
            .iter()
            .map(|&replica| {
                ConnectionState::new(replica, cluster.replica(replica).client_address.clone())
            })
            .collect();
        let shared = Arc::new(Shared::new(
            credential,
            PendingTable::new(options.pending_requests_max),
            connections,
            needed,
        ));
        let mut queues = Vec::with_capacity(targets.len());
        let mut tasks = Vec::with_capacity(targets.len());
        for slot in 0..targets.len() {
            let (sender, receiver) = mpsc::channel(options.send_queue_frames_max);
            queues.push(sender);
            tasks.push(tokio::spawn(connection::run(
                Arc::clone(&shared),
                slot,
                receiver,
                options.connect_timeout,
            )));
        }
        let client = Client {
            inner: Arc::new(Inner {
                shared,
                options,
                queues,
                tasks,
                replica_count,
                needed,
                session_base: rand::random(),
                next_session: AtomicU32::new(0),
            }),
        };
        client.wait_connected().await?;
        Ok(client)
    }

    async fn wait_connected(&self) -> Result<(), ClientError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.options.connect_timeout;
        let mut connected_at = None;
        loop {
            let reachable = inner
                .shared
                .connections
                .iter()
                .filter(|state| state.connected.load(Ordering::Acquire))
                .count();
            if reachable >= inner.needed {
                // Give the replicas a moment to report their view, so the first request goes
                // to the current primary; a slow answer only costs one retransmission.
                let since = *connected_at.get_or_insert_with(Instant::now);
                if inner.options.unreplicated
                    || inner.shared.views_reported() >= inner.needed
                    || since.elapsed() >= VIEW_REPORT_WAIT
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let details = inner
                    .shared
                    .connections
                    .iter()
                    .filter(|state| !state.connected.load(Ordering::Acquire))
                    .map(|state| {
                        let error = state.last_error().unwrap_or_else(|| "no answer yet".into());
                        format!("replica {}: {error}", state.replica)
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(ClientError::Unreachable {
                    reachable,
                    needed: inner.needed,
                    details,
                });
            }
            tokio::time::sleep(CONNECT_POLL_INTERVAL).await;
        }
    }

    /// A new session: its own `ClientId` and request numbering, sharing this client's
    /// connections. Cheap; use one per concurrent caller (a session has one request in flight).
    pub fn session(&self) -> Session {
        let inner = &self.inner;
        let number = inner
            .session_base
            .wrapping_add(inner.next_session.fetch_add(1, Ordering::Relaxed));
        let id = ClientId::new(inner.shared.credential.id(), number);
        inner.shared.add_session(id);
        for slot in 0..inner.queues.len() {
            inner.send_hello(slot, id);
        }
        Session {
            inner: Arc::clone(inner),
            id,
            request_number: initial_request_number(),
        }
    }

    /// The view the client believes current: learned from f+1 replicas' status when a
    /// connection opens, and from the replies to every request.
    pub fn view(&self) -> View {
        self.inner.shared.view()
    }

    /// Counters of what the client received, dropped and retransmitted.
    pub fn stats(&self) -> ClientStats {
        self.inner.shared.stats()
    }

    /// Replicas whose connection is up now.
    pub fn connected_replicas(&self) -> Vec<ReplicaId> {
        self.inner
            .shared
            .connections
            .iter()
            .filter(|state| state.connected.load(Ordering::Acquire))
            .map(|state| state.replica)
            .collect()
    }
}

impl Inner {
    /// Queues a frame for one connection without waiting: a full queue (a slow or dead replica)
    /// drops the frame, and retransmission makes up for it.
    fn send(&self, slot: usize, framed: Frame) {
        match self.queues[slot].try_send(framed) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.shared
                    .counters
                    .frames_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            // The connection task is gone only when the client is being dropped.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    fn send_hello(&self, slot: usize, client: ClientId) {
        let replica = self.shared.connections[slot].replica;
        self.send(
            slot,
            Arc::from(frame(&self.shared.credential.hello(client, replica))),
        );
    }

    /// The send-queue slot of the replica believed to be primary.
    fn primary_slot(&self) -> usize {
        if self.options.unreplicated {
            return 0;
        }
        self.shared.view().primary(self.replica_count).0 as usize
    }
}

/// Request numbers start at the wall-clock microsecond the session was created, so a process
/// that restarts and happens to reuse a session id still sends numbers above any it sent before
/// (replicas execute a client's request only if its number is higher than the last one).
fn initial_request_number() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// One logical client: a `ClientId` with its own increasing request numbers and at most one
/// request in flight. Many sessions share one [`Client`].
pub struct Session {
    inner: Arc<Inner>,
    id: ClientId,
    request_number: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.inner.shared.remove_session(self.id);
    }
}

/// Removes a request from the pending table if its `invoke` ends early (timeout or the future
/// being dropped), so late replies are ignored and the table never leaks.
struct PendingGuard<'a> {
    shared: &'a Shared,
    client: ClientId,
    request_number: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.remove(self.client, self.request_number);
    }
}

impl Session {
    /// This session's client id.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The number of the last request this session sent.
    pub fn last_request_number(&self) -> u64 {
        self.request_number
    }

    /// Orders and executes `operation`; returns the result f+1 replicas agree on (one reply
    /// when unreplicated).
    ///
    /// Sends to the replica believed to be primary; if no quorum of matching authenticated
    /// replies arrives within the retransmission timeout, sends again to every replica, doubling
    /// the timeout up to its cap, and fails with [`ClientError::Timeout`] (or
    /// [`ClientError::Rejected`] if a replica refused it) after `request_timeout`.
    pub async fn invoke(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let mut results = self.invoke_many(vec![operation]).await?;
        Ok(results
            .pop()
            .expect("invoke_many returns one result per operation"))
    }

    /// Orders and executes several operations as one request (one envelope, one signature:
    /// `tessera_core::envelope`), in order; returns one result per operation.
    pub async fn invoke_many(
        &mut self,
        operations: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let expected = operations.len();
        let results = self.invoke_many_partial(&operations).await?;
        if results.len() != expected {
            return Err(ClientError::ResultTooLarge {
                length: results.iter().map(Vec::len).sum(),
                limit: tessera_types::limits::MAX_RESULT_BYTES,
            });
        }
        Ok(results)
    }

    /// Like [`Session::invoke_many`], but when the results passed the reply limit it returns
    /// what the replicas agreed on instead of an error: the results of the operations up to
    /// the one whose result was cut (replaced by the envelope's marker; that operation did
    /// execute), and none for the operations after it, which no replica executed.
    pub async fn invoke_many_partial(
        &mut self,
        operations: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let expected = operations.len();
        if expected == 0 || expected > ENVELOPE_OPERATIONS_MAX {
            return Err(ClientError::Config(format!(
                "an envelope holds 1 to {ENVELOPE_OPERATIONS_MAX} operations, not {expected}"
            )));
        }
        let result = self.invoke_envelope(encode_operations(operations)).await?;
        match decode_results(&result) {
            Ok(Ok(results)) if (1..=expected).contains(&results.len()) => Ok(results),
            Ok(Ok(results)) => Err(ClientError::UnexpectedResult {
                command: "envelope",
                detail: format!("{} results for {expected} operations", results.len()),
            }),
            Ok(Err(reason)) => Err(ClientError::Rejected(reason)),
            Err(error) => Err(ClientError::UnexpectedResult {
                command: "envelope",
                detail: error.to_string(),
            }),
        }
    }

    async fn invoke_envelope(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let inner = Arc::clone(&self.inner);
        let shared = &*inner.shared;
        let request_number = self.request_number.checked_add(1).ok_or_else(|| {
            ClientError::Config("this session used every request number; open a new session".into())
        })?;
        // Signing (~21 µs) runs here, on the caller's task, outside every shared lock.
        let request = shared
            .credential
            .build_request(self.id, request_number, operation)?;
        self.request_number = request_number;
        let framed: Frame = Arc::from(frame(&ClientToReplica::Request(request)));
        let mut receiver = shared
            .pending
            .insert(self.id, request_number, inner.needed)?;
        let _guard = PendingGuard {
            shared,
            client: self.id,
            request_number,
        };
        let rejections_before = shared.counters.rejections.load(Ordering::Relaxed);
        let oversized_before = shared.counters.frames_oversized.load(Ordering::Relaxed);
        let started = Instant::now();
        let deadline = started + inner.options.request_timeout;
        inner.send(inner.primary_slot(), Arc::clone(&framed));
        let mut wait = inner.options.retransmit_timeout;
        loop {
            let tick = (Instant::now() + wait).min(deadline);
            match tokio::time::timeout_at(tick, &mut receiver).await {
                Ok(Ok(completed)) => {
                    shared.learn_view(completed.view);
                    return Ok(completed.result);
                }
                // The table dropped the sender: only when the client is shutting down.
                Ok(Err(_)) => return Err(ClientError::Closed),
                Err(_elapsed) => {}
            }
            if Instant::now() >= deadline {
                break;
            }
            // Maybe the primary is faulty or gone, or a view change is under way: every
            // replica gets the request (and this session's Hello, in case a queue dropped it).
            shared
                .counters
                .retransmissions
                .fetch_add(1, Ordering::Relaxed);
            for slot in 0..inner.queues.len() {
                inner.send_hello(slot, self.id);
                inner.send(slot, Arc::clone(&framed));
            }
            wait = (wait * 2).min(inner.options.retransmit_timeout_max);
        }
        if shared.counters.frames_oversized.load(Ordering::Relaxed) != oversized_before {
            return Err(ClientError::ResultTooLarge {
                length: shared.counters.last_oversized_bytes.load(Ordering::Relaxed) as usize,
                limit: REPLY_FRAME_BYTES_MAX,
            });
        }
        if shared.counters.rejections.load(Ordering::Relaxed) != rejections_before {
            if let Some(reason) = shared.last_rejection() {
                return Err(ClientError::Rejected(reason));
            }
        }
        Err(ClientError::Timeout {
            request_number,
            needed: inner.needed,
            elapsed: started.elapsed(),
        })
    }
}

/// Coalesces operations from many concurrent callers into envelopes: each of `lanes` sessions
/// takes every operation waiting when it becomes free and sends them as one signed request. With
/// light load an operation travels alone (no added latency); under load, envelopes grow and the
/// per-operation cost of signing and verifying shrinks. Cloning is cheap; all clones share lanes.
#[derive(Clone)]
pub struct Batcher {
    sender: mpsc::Sender<BatcherItem>,
}

type BatcherItem = (Vec<u8>, oneshot::Sender<Result<Vec<u8>, ClientError>>);

/// Operations that may wait for a free lane; more make `invoke` wait (backpressure).
const BATCHER_QUEUE_MAX: usize = 65_536;

impl Client {
    /// A [`Batcher`] with `lanes` sessions (envelopes in flight at once), each envelope holding
    /// at most `operations_max` operations. Must be called inside a tokio runtime.
    pub fn batcher(&self, lanes: usize, operations_max: usize) -> Batcher {
        let lanes = lanes.max(1);
        let operations_max = operations_max.clamp(1, ENVELOPE_OPERATIONS_MAX);
        let (sender, receiver) = mpsc::channel::<BatcherItem>(BATCHER_QUEUE_MAX);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..lanes {
            let mut session = self.session();
            let receiver = Arc::clone(&receiver);
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    {
                        let mut receiver = receiver.lock().await;
                        match receiver.recv().await {
                            Some(item) => batch.push(item),
                            None => return, // every Batcher clone is gone
                        }
                        while batch.len() < operations_max {
                            match receiver.try_recv() {
                                Ok(item) => batch.push(item),
                                Err(_) => break,
                            }
                        }
                    }
                    let (operations, replies): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().unzip();
                    match session.invoke_many(operations).await {
                        Ok(results) => {
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(result));
                            }
                        }
                        Err(error) => {
                            let reason = error.to_string();
                            for reply in replies {
                                let _ = reply.send(Err(ClientError::Rejected(reason.clone())));
                            }
                        }
                    }
                }
            });
        }
        Batcher { sender }
    }
}

impl Batcher {
    /// Orders and executes one operation, possibly in an envelope with others.
    pub async fn invoke(&self, operation: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let (reply, result) = oneshot::channel();
        self.sender
            .send((operation, reply))
            .await
            .map_err(|_| ClientError::Closed)?;
        result.await.map_err(|_| ClientError::Closed)?
    }
}
