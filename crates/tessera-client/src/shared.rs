//! State shared by a client's sessions and its connection tasks.

use crate::pending::{Delivery, PendingTable};
use crate::request::{Credential, ReplyRejection};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tessera_types::wire::ReplicaToClient;
use tessera_types::{ClientId, ReplicaId, View};

/// What one connection task reports about its replica.
pub(crate) struct ConnectionState {
    pub(crate) replica: ReplicaId,
    pub(crate) address: String,
    pub(crate) connected: AtomicBool,
    /// The view this replica last reported in a `Status` ([`NO_VIEW`]: none yet).
    reported_view: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Marks a connection whose replica has not reported a view.
const NO_VIEW: u64 = u64::MAX;

impl ConnectionState {
    pub(crate) fn new(replica: ReplicaId, address: String) -> ConnectionState {
        ConnectionState {
            replica,
            address,
            connected: AtomicBool::new(false),
            reported_view: AtomicU64::new(NO_VIEW),
            last_error: Mutex::new(None),
        }
    }

    pub(crate) fn record_error(&self, error: String) {
        *lock(&self.last_error) = Some(error);
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

/// Event counters; relaxed atomics, read by humans and benchmarks only.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) replies_accepted: AtomicU64,
    pub(crate) replies_bad_mac: AtomicU64,
    pub(crate) replies_wrong_sender: AtomicU64,
    pub(crate) replies_ignored: AtomicU64,
    pub(crate) retransmissions: AtomicU64,
    pub(crate) frames_dropped: AtomicU64,
    pub(crate) frames_oversized: AtomicU64,
    /// Announced length of the last oversized frame.
    pub(crate) last_oversized_bytes: AtomicU64,
    pub(crate) frames_malformed: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) rejections: AtomicU64,
}

/// A snapshot of a client's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Authenticated replies handed to a waiting request.
    pub replies_accepted: u64,
    /// Replies dropped because their MAC did not verify.
    pub replies_bad_mac: u64,
    /// Replies dropped because they named another replica or credential than the connection's.
    pub replies_wrong_sender: u64,
    /// Authenticated replies for no waiting request (late, duplicate, or already answered).
    pub replies_ignored: u64,
    /// Times a request was sent again to every replica.
    pub retransmissions: u64,
    /// Frames dropped because a replica's send queue was full.
    pub frames_dropped: u64,
    /// Reply frames over the size limit (their connection was reset).
    pub frames_oversized: u64,
    /// Reply frames that did not decode (their connection was reset).
    pub frames_malformed: u64,
    /// Connections that dropped after being established.
    pub disconnects: u64,
    /// `Error` messages received from replicas.
    pub rejections: u64,
    /// Requests waiting for replies now.
    pub pending_requests: usize,
}

/// Everything the connection tasks need; sessions reach it through the client.
pub(crate) struct Shared {
    pub(crate) credential: Credential,
    pub(crate) pending: PendingTable,
    pub(crate) counters: Counters,
    /// One entry per replica the client talks to, in the order of the client's send queues.
    pub(crate) connections: Vec<ConnectionState>,
    /// Sessions alive now: each connection registers them with a `Hello` when it (re)connects.
    sessions: Mutex<BTreeSet<ClientId>>,
    last_rejection: Mutex<Option<String>>,
    /// Replies a result needs (f+1); also how many replicas must report a view to believe it.
    needed: usize,
    /// The view the client believes current; only ever grows.
    view: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        credential: Credential,
        pending: PendingTable,
        connections: Vec<ConnectionState>,
        needed: usize,
    ) -> Shared {
        assert!(
            needed >= 1 && needed <= connections.len().max(1),
            "needed replies within the cluster"
        );
        Shared {
            credential,
            pending,
            counters: Counters::default(),
            connections,
            sessions: Mutex::new(BTreeSet::new()),
            last_rejection: Mutex::new(None),
            needed,
            view: AtomicU64::new(0),
        }
    }

    /// Replicas that have reported their view since the client started.
    pub(crate) fn views_reported(&self) -> usize {
        self.connections
            .iter()
            .filter(|state| state.reported_view.load(Ordering::Relaxed) != NO_VIEW)
            .count()
    }

    /// The view the client believes current.
    pub(crate) fn view(&self) -> View {
        View(self.view.load(Ordering::Relaxed))
    }

    /// Adopts `view` if it is newer (views never go back).
    pub(crate) fn learn_view(&self, view: View) {
        self.view.fetch_max(view.0, Ordering::Relaxed);
    }

    /// Records the view a replica reported and adopts the highest view that `needed` (f+1)
    /// replicas have reached, so one faulty replica cannot send the client after a wrong primary.
    fn on_reported_view(&self, replica: ReplicaId, view: View) {
        let Some(state) = self
            .connections
            .iter()
            .find(|state| state.replica == replica)
        else {
            return;
        };
        state
            .reported_view
            .store(view.0.min(NO_VIEW - 1), Ordering::Relaxed);
        let mut views: Vec<u64> = self
            .connections
            .iter()
            .map(|state| state.reported_view.load(Ordering::Relaxed))
            .filter(|&view| view != NO_VIEW)
            .collect();
        if views.len() < self.needed {
            return;
        }
        views.sort_unstable_by(|left, right| right.cmp(left));
        self.learn_view(View(views[self.needed - 1]));
    }

    pub(crate) fn add_session(&self, client: ClientId) {
        lock(&self.sessions).insert(client);
    }

    pub(crate) fn remove_session(&self, client: ClientId) {
        lock(&self.sessions).remove(&client);
    }

    pub(crate) fn live_sessions(&self) -> Vec<ClientId> {
        lock(&self.sessions).iter().copied().collect()
    }

    pub(crate) fn last_rejection(&self) -> Option<String> {
        lock(&self.last_rejection).clone()
    }

    /// Handles one decoded message from `replica` (called by its reader task).
    pub(crate) fn on_message(&self, replica: ReplicaId, message: ReplicaToClient) {
        match message {
            ReplicaToClient::Reply { reply, mac } => {
                match self.credential.check_reply(replica, &reply, &mac) {
                    Ok(()) => {}
                    Err(ReplyRejection::BadMac) => {
                        self.counters
                            .replies_bad_mac
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(ReplyRejection::WrongReplica | ReplyRejection::WrongCredential) => {
                        self.counters
                            .replies_wrong_sender
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                let counter = match self.pending.deliver(reply) {
                    Delivery::Completed | Delivery::Counted => &self.counters.replies_accepted,
                    Delivery::Ignored => &self.counters.replies_ignored,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            ReplicaToClient::Error(reason) => {
                tracing::debug!(%replica, %reason, "replica refused a client message");
                self.counters.rejections.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_rejection) = Some(format!("replica {replica}: {reason}"));
            }
            // Asked for when the connection opens, to find the primary without a timeout.
            ReplicaToClient::Status(status) => self.on_reported_view(replica, status.view),
        }
    }

    pub(crate) fn stats(&self) -> ClientStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        ClientStats {
            replies_accepted: load(&counters.replies_accepted),
            replies_bad_mac: load(&counters.replies_bad_mac),
            replies_wrong_sender: load(&counters.replies_wrong_sender),
            replies_ignored: load(&counters.replies_ignored),
            retransmissions: load(&counters.retransmissions),
            frames_dropped: load(&counters.frames_dropped),
            frames_oversized: load(&counters.frames_oversized),
            frames_malformed: load(&counters.frames_malformed),
            disconnects: load(&counters.disconnects),
            rejections: load(&counters.rejections),
            pending_requests: self.pending.len(),
        }
    }
}

/// Locks a mutex that guards plain data; a panic elsewhere cannot leave it inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
