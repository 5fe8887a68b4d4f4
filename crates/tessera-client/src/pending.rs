//! Reply routing: the table of requests waiting for replies, keyed by session.
//!
//! Connection reader tasks hand every authenticated reply to [`PendingTable::deliver`], which
//! feeds the waiting request's [`ReplyCollector`] under a short per-shard lock and wakes the
//! session only once f+1 matching replies agree. Replies for unknown or finished requests are
//! ignored. The table is bounded: a session has at most one request in flight, and the whole
//! table at most `pending_requests_max`.

use crate::error::ClientError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tessera_core::{ReplyCollector, ReplyOutcome};
use tessera_types::{ClientId, Reply, View};
use tokio::sync::oneshot;

/// Shards of the table; sessions are numbered consecutively, so `session % SHARDS` spreads them.
const SHARDS: usize = 16;

/// The agreed answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Completed {
    /// The result f+1 replicas agree on.
    pub(crate) result: Vec<u8>,
    /// The highest view among the matching replies.
    pub(crate) view: View,
}

struct Pending {
    request_number: u64,
    collector: ReplyCollector,
    done: oneshot::Sender<Completed>,
}

/// What [`PendingTable::deliver`] did with a reply.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Delivery {
    /// The reply completed its request; the session was woken.
    Completed,
    /// Counted towards its request; more replies are needed.
    Counted,
    /// No request of that session is waiting, or the reply is for another request number,
    /// or the replica already voted.
    Ignored,
}

/// Requests waiting for replies.
pub(crate) struct PendingTable {
    shards: Vec<Mutex<HashMap<ClientId, Pending>>>,
    count: AtomicUsize,
    limit: usize,
}

impl PendingTable {
    pub(crate) fn new(limit: usize) -> PendingTable {
        assert!(limit > 0, "the pending table holds at least one request");
        PendingTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            limit,
        }
    }

    fn shard(&self, client: ClientId) -> std::sync::MutexGuard<'_, HashMap<ClientId, Pending>> {
        let index = client.session() as usize % SHARDS;
        // A panic while holding a shard lock leaves only plain data behind; keep going.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `request_number` of `client` as waiting for `needed` matching replies,
    /// replacing whatever that session had waiting before.
    pub(crate) fn insert(
        &self,
        client: ClientId,
        request_number: u64,
        needed: usize,
    ) -> Result<oneshot::Receiver<Completed>, ClientError> {
        let (done, receiver) = oneshot::channel();
        let pending = Pending {
            request_number,
            collector: ReplyCollector::new(request_number, needed),
            done,
        };
        let mut shard = self.shard(client);
        if !shard.contains_key(&client) && self.count.fetch_add(1, Ordering::Relaxed) >= self.limit
        {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(ClientError::Overloaded { limit: self.limit });
        }
        shard.insert(client, pending);
        Ok(receiver)
    }

    /// Forgets `request_number` of `client` if it is still waiting (timeout or cancellation).
    pub(crate) fn remove(&self, client: ClientId, request_number: u64) {
        let mut shard = self.shard(client);
        if shard
            .get(&client)
            .is_some_and(|pending| pending.request_number == request_number)
        {
            shard.remove(&client);
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Feeds an authenticated reply to the request it answers.
    pub(crate) fn deliver(&self, reply: Reply) -> Delivery {
        let client = reply.client;
        let mut shard = self.shard(client);
        let Some(pending) = shard.get_mut(&client) else {
            return Delivery::Ignored;
        };
        if pending.request_number != reply.request_number {
            return Delivery::Ignored;
        }
        match pending.collector.add(reply) {
            ReplyOutcome::Pending => Delivery::Counted,
            ReplyOutcome::Ignored => Delivery::Ignored,
            ReplyOutcome::Complete { result, view } => {
                let pending = shard.remove(&client).expect("entry was just read");
                drop(shard);
                self.count.fetch_sub(1, Ordering::Relaxed);
                // The session may have given up in the meantime; then nobody needs the result.
                let _ = pending.done.send(Completed { result, view });
                Delivery::Completed
            }
        }
    }

    /// Requests currently waiting.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_types::ReplicaId;

    fn reply(
        replica: u32,
        client: ClientId,
        request_number: u64,
        result: &[u8],
        view: u64,
    ) -> Reply {
        Reply {
            replica: ReplicaId(replica),
            client,
            request_number,
            view: View(view),
            result: result.to_vec(),
        }
    }

    #[test]
    fn wakes_the_session_only_on_f_plus_one_matching_replies() {
        let table = PendingTable::new(8);
        let client = ClientId::new(1, 3);
        let mut receiver = table.insert(client, 10, 2).expect("room");
        assert_eq!(
            table.deliver(reply(0, client, 10, b"a", 1)),
            Delivery::Counted
        );
        assert_eq!(
            table.deliver(reply(1, client, 10, b"b", 1)),
            Delivery::Counted
        );
        assert!(receiver.try_recv().is_err(), "no quorum yet");
        assert_eq!(
            table.deliver(reply(2, client, 10, b"b", 2)),
            Delivery::Completed
        );
        assert_eq!(
            receiver.try_recv().expect("completed"),
            Completed {
                result: b"b".to_vec(),
                view: View(2)
            }
        );
        assert_eq!(table.len(), 0);
        // A late reply for the finished request is ignored.
        assert_eq!(
            table.deliver(reply(0, client, 10, b"b", 2)),
            Delivery::Ignored
        );
    }

    #[test]
    fn routes_by_session_and_request_number() {
        let table = PendingTable::new(8);
        let first = ClientId::new(1, 0);
        let second = ClientId::new(1, SHARDS as u32); // same shard as `first`
        let mut first_receiver = table.insert(first, 5, 1).expect("room");
        let mut second_receiver = table.insert(second, 9, 1).expect("room");
        assert_eq!(
            table.deliver(reply(0, first, 4, b"old", 0)),
            Delivery::Ignored
        );
        assert_eq!(
            table.deliver(reply(0, ClientId::new(1, 77), 5, b"x", 0)),
            Delivery::Ignored
        );
        assert_eq!(
            table.deliver(reply(0, second, 9, b"two", 0)),
            Delivery::Completed
        );
        assert_eq!(second_receiver.try_recv().expect("done").result, b"two");
        assert!(first_receiver.try_recv().is_err());
        assert_eq!(
            table.deliver(reply(0, first, 5, b"one", 0)),
            Delivery::Completed
        );
        assert_eq!(first_receiver.try_recv().expect("done").result, b"one");
    }

    #[test]
    fn a_replica_cannot_complete_a_request_alone() {
        let table = PendingTable::new(8);
        let client = ClientId::new(1, 1);
        let mut receiver = table.insert(client, 1, 2).expect("room");
        assert_eq!(
            table.deliver(reply(2, client, 1, b"evil", 0)),
            Delivery::Counted
        );
        assert_eq!(
            table.deliver(reply(2, client, 1, b"evil", 0)),
            Delivery::Ignored
        );
        assert!(receiver.try_recv().is_err());
    }

    #[test]
    fn is_bounded_and_removal_frees_room() {
        let table = PendingTable::new(2);
        let _a = table.insert(ClientId::new(1, 0), 1, 1).expect("room");
        let _b = table.insert(ClientId::new(1, 1), 1, 1).expect("room");
        assert!(matches!(
            table.insert(ClientId::new(1, 2), 1, 1),
            Err(ClientError::Overloaded { limit: 2 })
        ));
        // Replacing a session's own entry needs no extra room.
        let _b2 = table
            .insert(ClientId::new(1, 1), 2, 1)
            .expect("replacement");
        table.remove(ClientId::new(1, 0), 99); // wrong number: stays
        assert_eq!(table.len(), 2);
        table.remove(ClientId::new(1, 0), 1);
        assert_eq!(table.len(), 1);
        let _c = table.insert(ClientId::new(1, 2), 1, 1).expect("room again");
    }
}
