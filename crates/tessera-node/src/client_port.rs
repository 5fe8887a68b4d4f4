//! The client port: accepts client connections, admits their requests and writes replies.
//!
//! Frames are `u32 BE length ‖ canonical encoding` of [`ClientToReplica`] (at most
//! [`MAX_CLIENT_FRAME_BYTES`]) one way and of [`ReplicaToClient`] the other. Each connection has
//! a reader task (this module's `serve_client`) and a writer task that drains a bounded queue,
//! MACs replies with the client–replica key and flushes once per batch of queued items.
//!
//! Admission happens here, in parallel across connections, so the core thread stays lean:
//! shape checks, credential checks and — where the core will need it — the Ed25519 signature
//! check, whose verdict is cached for the core (see [`crate::auth`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tessera_crypto::mac::{mac16, verify_mac16};
use tessera_types::wire::{hello_digest, reply_digest, ClientToReplica, ReplicaToClient};
use tessera_types::{ClientId, ReplicaId, Request};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::auth::{NodeAuthenticator, VerifiedCache};
use crate::counters::{DropReason, NodeCounters};
use crate::driver::{CoreEvent, CoreInbox, InboxError};
use crate::frame::{read_client_frame, write_client_frame, FrameError, MAX_CLIENT_FRAME_BYTES};
use crate::keys::ClientKeys;
use crate::routes::{ConnectionId, Outbound, ReplyRoutes, StatusBoard};

/// Capacity of each connection's outgoing queue, in messages.
const CONNECTION_QUEUE_MESSAGES: usize = 8192;
/// Most client connections open at once.
const CLIENT_CONNECTIONS_MAX: usize = 8192;
/// Client ids one connection may register (a load generator multiplexes many sessions).
const CLIENTS_PER_CONNECTION_MAX: usize = 65_536;
/// Most messages written between two flushes.
const COALESCE_MESSAGES_MAX: usize = 4096;
/// Buffer sizes of the per-connection reader and writer.
const CONNECTION_BUFFER_BYTES: usize = 64 << 10;
/// How long a closing connection's writer may take to flush what is queued.
const WRITER_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How requests are admitted before they reach the executor.
#[derive(Clone)]
pub enum Admission {
    /// Replicated: the signature is checked here whenever the core will need it.
    Replicated {
        /// Where verdicts are remembered for the core.
        cache: Arc<VerifiedCache>,
    },
    /// The unreplicated baseline: only the MAC addressed to replica 0 is checked.
    Unreplicated,
}

/// Everything client connections share.
pub struct ClientPort {
    /// The replica this port belongs to (replica 0 for the unreplicated baseline).
    pub replica: ReplicaId,
    /// Admission policy.
    pub admission: Admission,
    /// Client keys.
    pub clients: Arc<ClientKeys>,
    /// Reply routes.
    pub routes: Arc<ReplyRoutes>,
    /// Latest status.
    pub status: Arc<StatusBoard>,
    /// Where admitted requests go.
    pub inbox: CoreInbox,
    /// Counters.
    pub counters: Arc<NodeCounters>,
}

/// Accepts client connections until the task is aborted.
pub async fn accept_clients(listener: TcpListener, port: Arc<ClientPort>) {
    let mut connections = JoinSet::new();
    let mut next_connection: ConnectionId = 0;
    loop {
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting a client connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Reap finished connection tasks so the set counts only open connections.
        while connections.try_join_next().is_some() {}
        if connections.len() >= CLIENT_CONNECTIONS_MAX {
            port.counters.dropped(DropReason::ClientConnectionLimit);
            debug!(%address, "refusing a client connection: {CLIENT_CONNECTIONS_MAX} already open");
            drop(stream);
            continue;
        }
        next_connection += 1;
        let span = tracing::debug_span!("client", %address);
        connections.spawn(serve_client(stream, next_connection, port.clone()).instrument(span));
    }
}

/// What to do with a connection after a message.
enum Next {
    Continue,
    Close,
}

struct Connection {
    id: ConnectionId,
    port: Arc<ClientPort>,
    queue: mpsc::Sender<Outbound>,
    registered: HashSet<ClientId>,
}

async fn serve_client(stream: TcpStream, id: ConnectionId, port: Arc<ClientPort>) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    let (read_half, write_half) = stream.into_split();
    let (queue, outgoing) = mpsc::channel(CONNECTION_QUEUE_MESSAGES);
    let writer = tokio::spawn(
        write_client_messages(
            write_half,
            outgoing,
            port.clients.clone(),
            port.counters.clone(),
        )
        .in_current_span(),
    );
    let mut connection = Connection {
        id,
        port,
        queue,
        registered: HashSet::new(),
    };
    let mut reader = BufReader::with_capacity(CONNECTION_BUFFER_BYTES, read_half);
    loop {
        let next = match read_client_frame(&mut reader, MAX_CLIENT_FRAME_BYTES).await {
            Ok(payload) => connection.on_frame(&payload),
            Err(FrameError::Oversized { length, limit }) => {
                connection
                    .port
                    .counters
                    .dropped(DropReason::ClientFrameOversized);
                connection.refuse(format!(
                    "frame of {length} bytes exceeds the client frame limit of {limit} bytes; closing"
                ));
                Next::Close
            }
            Err(error) => {
                debug!(%error, "client connection ended");
                Next::Close
            }
        };
        if let Next::Close = next {
            break;
        }
    }
    let Connection {
        id,
        port,
        queue,
        registered,
    } = connection;
    port.routes.unregister(id, registered);
    drop(queue);
    // The writer ends once every queue sender is gone; give it a moment to flush.
    let abort = writer.abort_handle();
    if tokio::time::timeout(WRITER_DRAIN_TIMEOUT, writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}

impl Connection {
    fn on_frame(&mut self, payload: &[u8]) -> Next {
        let message: ClientToReplica = match tessera_types::decode(payload, MAX_CLIENT_FRAME_BYTES)
        {
            Ok(message) => message,
            Err(error) => {
                self.port.counters.dropped(DropReason::ClientFrameMalformed);
                self.refuse(format!("malformed frame ({error}); closing"));
                return Next::Close;
            }
        };
        match message {
            ClientToReplica::Hello { client, mac } => self.on_hello(client, &mac),
            ClientToReplica::Request(request) => self.on_request(request),
            ClientToReplica::Status => {
                let status = ReplicaToClient::Status(self.port.status.latest());
                self.send(Outbound::Message(status));
                Next::Continue
            }
        }
    }

    fn on_hello(&mut self, client: ClientId, mac: &[u8; 16]) -> Next {
        let valid = match self.port.clients.mac_key(client.credential()) {
            Some(key) => verify_mac16(key, &hello_digest(client, self.port.replica), mac),
            None => false,
        };
        if !valid {
            self.port.counters.dropped(DropReason::ClientHelloRejected);
            self.refuse(format!(
                "hello for client {client} rejected: unknown credential {} or bad MAC; closing",
                client.credential()
            ));
            return Next::Close;
        }
        self.register(client);
        Next::Continue
    }

    fn on_request(&mut self, request: Request) -> Next {
        self.port.counters.client_request_received();
        if let Err(error) = request.check_shape() {
            self.port
                .counters
                .dropped(DropReason::ClientRequestBadShape);
            self.refuse(format!("request refused: {error}"));
            return Next::Continue;
        }
        let credential = request.client.credential();
        if !self.port.clients.knows(credential) {
            self.port
                .counters
                .dropped(DropReason::ClientUnknownCredential);
            self.refuse(format!(
                "request refused: unknown client credential {credential}"
            ));
            return Next::Continue;
        }
        if !self.authentic(&request) {
            self.port
                .counters
                .dropped(DropReason::ClientRequestBadSignature);
            self.refuse(format!(
                "request {} of client {} refused: authenticator does not verify",
                request.request_number, request.client
            ));
            return Next::Continue;
        }
        self.register(request.client);
        match self.port.inbox.try_submit(CoreEvent::Request(request)) {
            Ok(()) => Next::Continue,
            Err(InboxError::Full) => {
                self.refuse("replica overloaded: request dropped, retry later".into());
                Next::Continue
            }
            Err(InboxError::Closed) => {
                self.refuse("replica shutting down".into());
                Next::Close
            }
        }
    }

    /// Checks what the executor will rely on.
    fn authentic(&self, request: &Request) -> bool {
        let clients = &self.port.clients;
        match &self.port.admission {
            Admission::Unreplicated => clients.verify_mac(request, &request.digest(), ReplicaId(0)),
            Admission::Replicated { cache } => {
                // The primary checks every signature before proposing; a backup checks the
                // MAC addressed to it and needs the signature only when that MAC is wrong
                // (docs/PROTOCOL.md). Verifying only then keeps backups' CPU for the protocol.
                // A stale view of who is primary only costs an extra or a deferred check.
                let must_check_signature = self.port.status.primary() == self.port.replica
                    || !clients.verify_mac(request, &request.digest(), self.port.replica);
                !must_check_signature
                    || NodeAuthenticator::verify_and_remember(clients, cache, request)
            }
        }
    }

    fn register(&mut self, client: ClientId) {
        // Registered once per connection; a later connection of the same client takes over.
        if self.registered.contains(&client) {
            return;
        }
        if self.registered.len() >= CLIENTS_PER_CONNECTION_MAX {
            self.port.counters.dropped(DropReason::ClientRegistryFull);
            return;
        }
        if self.port.routes.register(client, self.id, &self.queue) {
            self.registered.insert(client);
        }
    }

    fn refuse(&self, message: String) {
        debug!(%message, "refusing client input");
        self.send(Outbound::Message(ReplicaToClient::Error(message)));
    }

    fn send(&self, outbound: Outbound) {
        if self.queue.try_send(outbound).is_err() {
            self.port.counters.dropped(DropReason::ReplyQueueFull);
        }
    }
}

/// Writes queued messages, MACing replies, with one flush per batch.
async fn write_client_messages(
    write_half: OwnedWriteHalf,
    mut outgoing: mpsc::Receiver<Outbound>,
    clients: Arc<ClientKeys>,
    counters: Arc<NodeCounters>,
) {
    let mut writer = BufWriter::with_capacity(CONNECTION_BUFFER_BYTES, write_half);
    while let Some(first) = outgoing.recv().await {
        let mut next = Some(first);
        let mut taken = 0;
        let mut replies = 0;
        while let Some(outbound) = next.take() {
            taken += 1;
            if let Some(message) = seal(outbound, &clients, &mut replies) {
                let bytes = tessera_types::encode(&message);
                if let Err(error) = write_client_frame(&mut writer, &bytes).await {
                    debug!(%error, "client connection write failed");
                    return;
                }
            }
            // Coalesce: whatever is already queued goes out with the same flush.
            if taken < COALESCE_MESSAGES_MAX {
                next = outgoing.try_recv().ok();
            }
        }
        if let Err(error) = writer.flush().await {
            debug!(%error, "client connection flush failed");
            return;
        }
        counters.replies_sent(replies);
    }
}

/// Turns a queued item into the message to write, MACing replies.
fn seal(outbound: Outbound, clients: &ClientKeys, replies: &mut u64) -> Option<ReplicaToClient> {
    match outbound {
        Outbound::Reply(reply) => {
            // Registration required a known credential, so a missing key means a reply for a
            // client that never authenticated here: not worth writing.
            let key = clients.mac_key(reply.client.credential())?;
            let mac = mac16(key, &reply_digest(&reply));
            *replies += 1;
            Some(ReplicaToClient::Reply { reply, mac })
        }
        Outbound::Message(message) => Some(message),
    }
}
