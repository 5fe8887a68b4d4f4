//! The envelope coalescer: many connections' commands, few signed requests.
//!
//! A connection hands over a *group* — the commands it has pipelined, in order — and waits for
//! their results. Each of a fixed number of lanes (one client session each, one request in
//! flight) takes every group waiting when it becomes free and sends them as one envelope
//! (`tessera_core::envelope`): one signature and one reply vote for many commands. A group's
//! commands run in order within one envelope — or, if the replicas cut the envelope, the rest
//! runs in the lane's next envelope before the lane takes anything else — so one connection's
//! commands execute in the order it sent them; a connection sends its next group only after
//! the previous one's replies, so its order holds across groups too. The client library's `Batcher` coalesces single operations; it cannot keep one
//! connection's pipeline together, hence this variant of it.
//!
//! Envelopes are bounded by operation count and request bytes, not by the size their results
//! could reach (the worst case, 512 KiB per value read, cost about 90% of pipelined GET
//! throughput). When the replicas cut an envelope at the reply limit, the commands after the
//! cut go in the next envelope (`send`; docs/GATEWAY.md, "Results larger than one reply").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tessera_client::{Client, Session};
use tessera_core::envelope::ENVELOPE_OPERATIONS_MAX;
use tessera_kv::Command;
use tessera_types::limits::MAX_OPERATION_BYTES;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Bytes an envelope may spend on framing around its operations: the operation count and a
/// length prefix per operation (postcard varints: at most 5 bytes for a `u32`-sized length).
const ENVELOPE_FRAMING_BYTES: usize = 5;
const OPERATION_FRAMING_BYTES: usize = 5;

/// Encoded size an envelope's operations may reach.
pub const ENVELOPE_BYTES_MAX: usize = MAX_OPERATION_BYTES;

/// Bytes one operation takes in an envelope.
pub fn operation_cost(operation: &[u8]) -> usize {
    operation.len() + OPERATION_FRAMING_BYTES
}

/// True if a group of `operations` operations costing `bytes` fits one envelope.
pub fn group_fits(operations: usize, bytes: usize) -> bool {
    operations <= ENVELOPE_OPERATIONS_MAX && bytes + ENVELOPE_FRAMING_BYTES <= ENVELOPE_BYTES_MAX
}

/// The results of a group, one per operation, or why the envelope carrying it failed (the
/// operations may or may not have executed).
pub type GroupResult = Result<Vec<Vec<u8>>, String>;

struct Group {
    operations: Vec<Vec<u8>>,
    bytes: usize,
    reply: oneshot::Sender<GroupResult>,
}

/// The queue the lanes share, and a group taken from it that did not fit the envelope being
/// filled (it starts the next one).
struct Queue {
    receiver: mpsc::Receiver<Group>,
    carried: Option<Group>,
}

/// Hands groups to the lanes. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    sender: mpsc::Sender<Group>,
    counters: Arc<Counters>,
}

/// What the lanes sent, for `INFO`.
#[derive(Default)]
struct Counters {
    envelopes: AtomicU64,
    commands: AtomicU64,
}

impl Dispatcher {
    /// Starts `lanes` lanes on `client`, with at most `queued_groups_max` groups waiting
    /// (more make [`Dispatcher::execute`] wait: backpressure, not memory). Needs a tokio runtime.
    pub fn start(client: &Client, lanes: usize, queued_groups_max: usize) -> Dispatcher {
        let (sender, receiver) = mpsc::channel(queued_groups_max.max(1));
        let queue = Arc::new(Mutex::new(Queue {
            receiver,
            carried: None,
        }));
        let counters = Arc::new(Counters::default());
        for _ in 0..lanes.max(1) {
            tokio::spawn(run_lane(
                client.clone(),
                Arc::clone(&queue),
                Arc::clone(&counters),
            ));
        }
        Dispatcher { sender, counters }
    }

    /// Envelopes sent so far, and the commands they carried.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.counters.envelopes.load(Ordering::Relaxed),
            self.counters.commands.load(Ordering::Relaxed),
        )
    }

    /// Orders and executes `operations` as one unit of one envelope, in order. The caller keeps
    /// the group within [`group_fits`].
    pub async fn execute(&self, operations: Vec<Vec<u8>>) -> GroupResult {
        let bytes = operations
            .iter()
            .map(|operation| operation_cost(operation))
            .sum();
        if !group_fits(operations.len(), bytes) {
            return Err(format!(
                "{} commands of {bytes} bytes do not fit one request ({ENVELOPE_OPERATIONS_MAX} \
                 commands, {ENVELOPE_BYTES_MAX} bytes)",
                operations.len()
            ));
        }
        let (reply, result) = oneshot::channel();
        let group = Group {
            operations,
            bytes,
            reply,
        };
        self.sender
            .send(group)
            .await
            .map_err(|_| "the gateway is shutting down".to_string())?;
        result
            .await
            .map_err(|_| "the gateway is shutting down".to_string())?
    }
}

async fn run_lane(client: Client, queue: Arc<Mutex<Queue>>, counters: Arc<Counters>) {
    let mut session = client.session();
    loop {
        let groups = {
            let mut queue = queue.lock().await;
            let first = match queue.carried.take() {
                Some(group) => group,
                None => match queue.receiver.recv().await {
                    Some(group) => group,
                    None => return, // every Dispatcher clone is gone
                },
            };
            let (mut operations, mut bytes) = (first.operations.len(), first.bytes);
            let mut groups = vec![first];
            while let Ok(group) = queue.receiver.try_recv() {
                if !group_fits(operations + group.operations.len(), bytes + group.bytes) {
                    queue.carried = Some(group);
                    break;
                }
                operations += group.operations.len();
                bytes += group.bytes;
                groups.push(group);
            }
            groups
        };
        send(&mut session, groups, &counters).await;
    }
}

/// What the envelope state machine (`tessera_core::envelope`) returns in place of the result
/// that passed the reply limit; that operation executed, and none after it did. Never a valid
/// key-value result (its first byte is no `Response` variant).
pub const ENVELOPE_CUT_RESULT: &[u8] = b"result too large for one envelope";

/// Sends the groups' operations, in order, as envelopes, until every one has executed, and
/// answers each group. An envelope is cut where its results pass the reply limit: the results
/// before the cut are kept, and the operations after it — which no replica executed — go in the
/// next envelope, so one connection's large reads cost the other connections nothing but time.
async fn send(session: &mut Session, groups: Vec<Group>, counters: &Counters) {
    let mut operations = Vec::new();
    let mut owners = Vec::new();
    let mut results: Vec<Vec<Vec<u8>>> = Vec::with_capacity(groups.len());
    let mut replies = Vec::with_capacity(groups.len());
    let mut sizes = Vec::with_capacity(groups.len());
    for (index, group) in groups.into_iter().enumerate() {
        owners.extend(std::iter::repeat_n(index, group.operations.len()));
        sizes.push(group.operations.len());
        results.push(Vec::with_capacity(group.operations.len()));
        operations.extend(group.operations);
        replies.push(group.reply);
    }
    let mut start = 0;
    let mut failure = None;
    while start < operations.len() {
        counters.envelopes.fetch_add(1, Ordering::Relaxed);
        counters
            .commands
            .fetch_add((operations.len() - start) as u64, Ordering::Relaxed);
        let executed = match session.invoke_many_partial(&operations[start..]).await {
            Ok(executed) => executed,
            Err(error) => {
                failure = Some(error.to_string());
                break;
            }
        };
        let cut = start + executed.len() - 1;
        let mut next = start + executed.len();
        for (index, result) in (start..).zip(executed) {
            // A read whose result was cut is run again at the head of the next envelope, where
            // it has the whole reply limit to itself; at the head already, it keeps the marker
            // (the server answers that its result was dropped). Writes ran: never again.
            if index == cut
                && index > start
                && result == ENVELOPE_CUT_RESULT
                && is_read(&operations[index])
            {
                next = index;
                break;
            }
            results[owners[index]].push(result);
        }
        start = next;
    }
    for ((reply, results), expected) in replies.into_iter().zip(results).zip(sizes) {
        let answer = match &failure {
            Some(reason) if results.len() < expected => Err(reason.clone()),
            _ => Ok(results),
        };
        // A connection that went away dropped its receiver; nothing to do.
        let _ = reply.send(answer);
    }
}

/// True for a command that changes nothing, so running it twice is harmless.
fn is_read(operation: &[u8]) -> bool {
    Command::decode(operation).is_ok_and(|command| command.is_read_only())
}
