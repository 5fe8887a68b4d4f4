//! Where replies go, and the status snapshot clients can ask for.
//!
//! The core thread hands each reply to [`ReplyRoutes::deliver`], which finds the client's
//! registered connection and pushes the reply into that connection's bounded queue without
//! blocking; the connection's writer task MACs, encodes and writes it. Nothing here ever blocks
//! the core thread for longer than a short, uncontended lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tessera_types::wire::{ReplicaStatus, ReplicaToClient};
use tessera_types::{ClientId, ReplicaId, Reply};
use tokio::sync::mpsc;

use crate::auth::lock;
use crate::counters::{DropReason, NodeCounters};

/// Default bound on registered client ids (across all connections).
pub const ROUTES_MAX_DEFAULT: usize = 262_144;

/// Something to write on a client connection.
#[derive(Debug)]
pub enum Outbound {
    /// A reply, still to be MACed by the writer.
    Reply(Reply),
    /// A ready message (status, error).
    Message(ReplicaToClient),
}

/// Identifies one accepted client connection.
pub type ConnectionId = u64;

struct Route {
    connection: ConnectionId,
    queue: mpsc::Sender<Outbound>,
}

/// Maps each client id to the connection its replies go to.
pub struct ReplyRoutes {
    routes: Mutex<HashMap<ClientId, Route>>,
    routes_max: usize,
    counters: Arc<NodeCounters>,
}

impl ReplyRoutes {
    /// An empty table holding at most `routes_max` client ids.
    pub fn new(routes_max: usize, counters: Arc<NodeCounters>) -> ReplyRoutes {
        ReplyRoutes {
            routes: Mutex::new(HashMap::new()),
            routes_max,
            counters,
        }
    }

    /// Sends `client`'s replies to `connection` from now on. False if the table is full.
    pub fn register(
        &self,
        client: ClientId,
        connection: ConnectionId,
        queue: &mpsc::Sender<Outbound>,
    ) -> bool {
        let mut routes = lock(&self.routes);
        if routes.len() >= self.routes_max && !routes.contains_key(&client) {
            self.counters.dropped(DropReason::ClientRegistryFull);
            return false;
        }
        routes.insert(
            client,
            Route {
                connection,
                queue: queue.clone(),
            },
        );
        true
    }

    /// Forgets the routes of `clients` that still point at `connection` (it closed).
    pub fn unregister(
        &self,
        connection: ConnectionId,
        clients: impl IntoIterator<Item = ClientId>,
    ) {
        let mut routes = lock(&self.routes);
        for client in clients {
            if routes
                .get(&client)
                .is_some_and(|route| route.connection == connection)
            {
                routes.remove(&client);
            }
        }
    }

    /// Pushes a reply to its client's connection; drops and counts it if there is none or its
    /// queue is full (the client retransmits).
    pub fn deliver(&self, reply: Reply) {
        let routes = lock(&self.routes);
        let Some(route) = routes.get(&reply.client) else {
            self.counters.dropped(DropReason::ReplyClientUnknown);
            return;
        };
        if route.queue.try_send(Outbound::Reply(reply)).is_err() {
            self.counters.dropped(DropReason::ReplyQueueFull);
        }
    }

    /// Number of registered client ids.
    pub fn len(&self) -> usize {
        lock(&self.routes).len()
    }

    /// True if no client is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The latest status the core published.
pub struct StatusBoard {
    latest: Mutex<ReplicaStatus>,
    primary: AtomicU32,
}

impl StatusBoard {
    /// A board showing the initial status of `replica` (view 0, primary 0).
    pub fn new(replica: ReplicaId) -> StatusBoard {
        StatusBoard {
            latest: Mutex::new(ReplicaStatus {
                replica,
                ..ReplicaStatus::default()
            }),
            primary: AtomicU32::new(0),
        }
    }

    /// Replaces the published status.
    pub fn publish(&self, status: ReplicaStatus) {
        self.primary.store(status.primary.0, Ordering::Relaxed);
        *lock(&self.latest) = status;
    }

    /// The latest published status.
    pub fn latest(&self) -> ReplicaStatus {
        lock(&self.latest).clone()
    }

    /// The primary as of the latest published status (may lag a view change briefly).
    pub fn primary(&self) -> ReplicaId {
        ReplicaId(self.primary.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_types::View;

    fn reply(client: ClientId) -> Reply {
        Reply {
            replica: ReplicaId(0),
            client,
            request_number: 1,
            view: View(0),
            result: vec![1],
        }
    }

    #[test]
    fn routes_follow_the_latest_registration_and_are_bounded() {
        let counters = Arc::new(NodeCounters::default());
        let routes = ReplyRoutes::new(1, counters.clone());
        let (first, mut first_queue) = mpsc::channel(4);
        let (second, mut second_queue) = mpsc::channel(4);
        let client = ClientId::new(1, 1);
        assert!(routes.register(client, 1, &first));
        assert!(
            routes.register(client, 2, &second),
            "re-registering an id needs no room"
        );
        assert!(
            !routes.register(ClientId::new(1, 2), 1, &first),
            "table full"
        );
        routes.deliver(reply(client));
        assert!(first_queue.try_recv().is_err());
        assert!(matches!(second_queue.try_recv(), Ok(Outbound::Reply(_))));

        routes.unregister(1, [client]);
        assert_eq!(routes.len(), 1, "connection 1 no longer owns the route");
        routes.unregister(2, [client]);
        routes.deliver(reply(client));
        assert_eq!(counters.drops(DropReason::ReplyClientUnknown), 1);
        assert_eq!(counters.drops(DropReason::ClientRegistryFull), 1);
    }
}
