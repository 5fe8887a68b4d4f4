//! The unreplicated baseline: the same client port and state machine with no agreement.
//!
//! One executor thread takes admitted requests (MAC to replica 0 already checked by the
//! connection task), executes each at most once per client and request number, and replies
//! as replica 0 in view 0. `tessera bench` compares the replicated service against it.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_types::wire::ReplicaStatus;
use tessera_types::{ClientId, ReplicaId, Reply, Request, SeqNum, StateMachine, View};
use tracing::info;

use crate::driver::CoreEvent;
use crate::routes::{ReplyRoutes, StatusBoard};

const STATUS_PERIOD: Duration = Duration::from_millis(100);

/// Per-client exactly-once memory: the last request number executed and its result.
struct ClientTable {
    last: HashMap<ClientId, (u64, Vec<u8>)>,
    /// First-seen order, for eviction when the table is full.
    order: VecDeque<ClientId>,
    clients_max: usize,
}

/// What to do with a request, given the client table.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Execute,
    /// A retransmission of the last executed request: resend its result.
    Resend(Vec<u8>),
    /// Older than the last executed request: the client has moved on.
    Ignore,
}

impl ClientTable {
    fn new(clients_max: usize) -> ClientTable {
        ClientTable {
            last: HashMap::new(),
            order: VecDeque::new(),
            clients_max: clients_max.max(1),
        }
    }

    fn verdict(&self, request: &Request) -> Verdict {
        match self.last.get(&request.client) {
            Some((number, result)) if *number == request.request_number => {
                Verdict::Resend(result.clone())
            }
            Some((number, _)) if *number > request.request_number => Verdict::Ignore,
            _ => Verdict::Execute,
        }
    }

    fn record(&mut self, client: ClientId, request_number: u64, result: Vec<u8>) {
        if self.last.insert(client, (request_number, result)).is_none() {
            self.order.push_back(client);
            // Evicting the oldest client loses its exactly-once memory, as the replicated
            // client table does past `client_table_max`.
            while self.order.len() > self.clients_max {
                if let Some(evicted) = self.order.pop_front() {
                    self.last.remove(&evicted);
                }
            }
        }
    }
}

/// Starts the executor thread; it runs until [`CoreEvent::Stop`] or until every sender is gone.
pub fn spawn_unreplicated_executor<S: StateMachine>(
    state_machine: S,
    inbox: Receiver<CoreEvent>,
    routes: Arc<ReplyRoutes>,
    status: Arc<StatusBoard>,
    clients_max: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tessera-unreplicated".into())
        .spawn(move || {
            let span = tracing::info_span!("unreplicated");
            let _entered = span.enter();
            run(
                state_machine,
                inbox,
                &routes,
                &status,
                ClientTable::new(clients_max),
            );
        })
}

fn run<S: StateMachine>(
    mut state_machine: S,
    inbox: Receiver<CoreEvent>,
    routes: &ReplyRoutes,
    status: &StatusBoard,
    mut table: ClientTable,
) {
    info!("unreplicated executor started");
    let mut executed: u64 = 0;
    // One process decides alone, so its own clock is the agreed time; kept from going back so
    // the service never sees time run backwards (a wall clock may be set back).
    let mut clock_ms = 0u64;
    let mut next_status = Instant::now();
    loop {
        if Instant::now() >= next_status {
            status.publish(snapshot(executed));
            next_status = Instant::now() + STATUS_PERIOD;
        }
        let request = match inbox.recv_timeout(STATUS_PERIOD) {
            Ok(CoreEvent::Request(request)) => request,
            Ok(CoreEvent::Message { .. }) => continue,
            Ok(CoreEvent::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => continue,
        };
        let result = match table.verdict(&request) {
            Verdict::Ignore => continue,
            Verdict::Resend(result) => result,
            Verdict::Execute => {
                clock_ms = clock_ms.max(crate::driver::wall_clock_ms());
                let result = state_machine.execute(&request.operation, clock_ms);
                executed += 1;
                table.record(request.client, request.request_number, result.clone());
                result
            }
        };
        routes.deliver(Reply {
            replica: ReplicaId(0),
            client: request.client,
            request_number: request.request_number,
            view: View(0),
            result,
        });
    }
    status.publish(snapshot(executed));
    info!(executed, "unreplicated executor stopped");
}

fn snapshot(executed: u64) -> ReplicaStatus {
    ReplicaStatus {
        last_executed: SeqNum(executed),
        requests_executed: executed,
        ..ReplicaStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client: ClientId, request_number: u64) -> Request {
        Request {
            client,
            request_number,
            operation: Vec::new(),
            signature: vec![0; 64],
            macs: Vec::new(),
        }
    }

    #[test]
    fn executes_each_request_once_and_resends_the_last_result() {
        let mut table = ClientTable::new(2);
        let client = ClientId::new(1, 1);
        assert_eq!(table.verdict(&request(client, 1)), Verdict::Execute);
        table.record(client, 1, b"one".to_vec());
        assert_eq!(
            table.verdict(&request(client, 1)),
            Verdict::Resend(b"one".to_vec())
        );
        assert_eq!(table.verdict(&request(client, 0)), Verdict::Ignore);
        assert_eq!(table.verdict(&request(client, 2)), Verdict::Execute);
    }

    #[test]
    fn table_is_bounded() {
        let mut table = ClientTable::new(2);
        for session in 0..5 {
            table.record(ClientId::new(1, session), 1, Vec::new());
        }
        assert_eq!(table.last.len(), 2);
        assert_eq!(table.order.len(), 2);
        assert_eq!(
            table.verdict(&request(ClientId::new(1, 0), 1)),
            Verdict::Execute
        );
    }
}
