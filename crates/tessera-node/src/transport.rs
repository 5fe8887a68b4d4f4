//! Replica-to-replica transport over TCP.
//!
//! Every replica dials every peer for its *outgoing* traffic and accepts connections for its
//! *incoming* traffic, so each ordered pair has its own connection and no connection carries
//! frames both ways. Handshake on each connection:
//!
//! 1. dialer → acceptor: `MAGIC ‖ dialer id (u32 BE) ‖ acceptor id (u32 BE) ‖ 32-byte nonce`;
//! 2. acceptor → dialer: `32-byte nonce ‖ 16-byte key confirmation`.
//!
//! Both sides derive the session key from their pairwise key and both nonces, so a recorded
//! session cannot be replayed into a new one; frames are then authenticated and numbered by
//! [`crate::frame`]. The confirmation only lets a misconfigured dialer say so clearly: the
//! acceptor authenticates the dialer by checking every frame.
//!
//! The transport owns connections, queues and reconnection; it never interprets messages beyond
//! decoding them, and never blocks the core thread (the core pushes into bounded queues).

use bytes::Bytes;
use rand::RngCore;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tessera_crypto::mac::{constant_time_eq, derive_key, keyed_hash};
use tessera_types::{ReplicaId, ReplicaMessage};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::auth::NodeAuthenticator;
use crate::counters::{DropReason, NodeCounters};
use crate::driver::{CoreEvent, CoreInbox};
use crate::frame::{FrameError, FrameOpener, FrameSealer};
use crate::keys::ClientKeys;
use crate::VerifiedCache;

/// Identifies the protocol and its version at the start of every replica connection.
const MAGIC: [u8; 8] = *b"TSRPEER1";
const NONCE_LEN: usize = 32;
const CONFIRM_LEN: usize = 16;
const HELLO_LEN: usize = MAGIC.len() + 4 + 4 + NONCE_LEN;
const ANSWER_LEN: usize = NONCE_LEN + CONFIRM_LEN;

/// Default capacity of each peer's outgoing queue, in frames.
pub const PEER_QUEUE_FRAMES_DEFAULT: usize = 65_536;
/// Most bytes waiting in one peer's outgoing queue; a frame that would pass it is dropped (the
/// protocol retransmits what a peer still needs), unless the queue is empty, so a frame larger
/// than this still leaves. It bounds the memory a down peer costs, and what a returning replica
/// receives (and logs) from each peer before it learns that it needs a state transfer.
pub const PEER_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Most inbound replica connections open at once (each peer normally holds one; the rest of
/// the room absorbs reconnections and strangers still in their handshake).
const PEER_CONNECTIONS_MAX: usize = 1024;
/// Most frames written between two flushes.
const COALESCE_FRAMES_MAX: usize = 4096;
/// Socket buffer sizes of the buffered reader and writer.
const SOCKET_BUFFER_BYTES: usize = 256 << 10;
/// A handshake must complete within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection attempt must complete within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First and largest wait between connection attempts.
const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a handshake failed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The connection failed.
    #[error("connection error during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    Timeout,
    /// The other side does not speak this protocol version.
    #[error("bad magic: not a Tessera replica connection of this version")]
    BadMagic,
    /// The dialer named a replica id that is not a peer of this replica.
    #[error("dialer claims to be replica {0}, which is not a peer")]
    UnknownPeer(u32),
    /// The dialer meant another replica (wrong address in its cluster.toml).
    #[error("dialer wanted replica {wanted} but this is replica {actual}")]
    WrongAcceptor {
        /// Who the dialer meant.
        wanted: u32,
        /// Who answered.
        actual: u32,
    },
    /// The acceptor's key confirmation did not verify: the pairwise keys differ.
    #[error("key confirmation failed: the pairwise channel keys of the two replicas differ")]
    KeyMismatch,
}

/// The keys of one dialer→acceptor session.
struct SessionKeys {
    frames: [u8; 32],
    confirmation: [u8; CONFIRM_LEN],
}

fn session_keys(
    pairwise_key: &[u8; 32],
    dialer: ReplicaId,
    acceptor: ReplicaId,
    dialer_nonce: &[u8; NONCE_LEN],
    acceptor_nonce: &[u8; NONCE_LEN],
) -> SessionKeys {
    let mut material = Vec::with_capacity(8 + 2 * NONCE_LEN);
    material.extend_from_slice(&dialer.0.to_be_bytes());
    material.extend_from_slice(&acceptor.0.to_be_bytes());
    material.extend_from_slice(dialer_nonce);
    material.extend_from_slice(acceptor_nonce);
    let base = keyed_hash(pairwise_key, &material);
    let frames = derive_key(
        "tessera 2026 replica channel dialer-to-acceptor frames v1",
        &base,
    );
    let confirmation_key = derive_key(
        "tessera 2026 replica channel acceptor confirmation v1",
        &base,
    );
    let mut confirmation = [0u8; CONFIRM_LEN];
    confirmation.copy_from_slice(&confirmation_key[..CONFIRM_LEN]);
    SessionKeys {
        frames,
        confirmation,
    }
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// Runs the dialer side of the handshake; returns the sealer for the outgoing frames.
pub(crate) async fn dial_handshake(
    stream: &mut TcpStream,
    me: ReplicaId,
    peer: ReplicaId,
    pairwise_key: &[u8; 32],
) -> Result<FrameSealer, HandshakeError> {
    let exchange = async {
        let dialer_nonce = fresh_nonce();
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&me.0.to_be_bytes());
        hello.extend_from_slice(&peer.0.to_be_bytes());
        hello.extend_from_slice(&dialer_nonce);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; ANSWER_LEN];
        stream.read_exact(&mut answer).await?;
        let mut acceptor_nonce = [0u8; NONCE_LEN];
        acceptor_nonce.copy_from_slice(&answer[..NONCE_LEN]);
        let keys = session_keys(pairwise_key, me, peer, &dialer_nonce, &acceptor_nonce);
        if !constant_time_eq(&keys.confirmation, &answer[NONCE_LEN..]) {
            return Err(HandshakeError::KeyMismatch);
        }
        Ok(FrameSealer::new(keys.frames))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

/// Runs the acceptor side of the handshake; returns the dialer's id and the frame opener.
pub(crate) async fn accept_handshake(
    stream: &mut TcpStream,
    me: ReplicaId,
    pairwise_keys: &[[u8; 32]],
) -> Result<(ReplicaId, FrameOpener), HandshakeError> {
    let exchange = async {
        let mut hello = [0u8; HELLO_LEN];
        stream.read_exact(&mut hello).await?;
        if hello[..MAGIC.len()] != MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        let field = |offset: usize| {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&hello[offset..offset + 4]);
            u32::from_be_bytes(bytes)
        };
        let dialer = field(MAGIC.len());
        let wanted = field(MAGIC.len() + 4);
        if wanted != me.0 {
            return Err(HandshakeError::WrongAcceptor {
                wanted,
                actual: me.0,
            });
        }
        if dialer == me.0 || dialer as usize >= pairwise_keys.len() {
            return Err(HandshakeError::UnknownPeer(dialer));
        }
        let dialer = ReplicaId(dialer);
        let mut dialer_nonce = [0u8; NONCE_LEN];
        dialer_nonce.copy_from_slice(&hello[MAGIC.len() + 8..]);
        let acceptor_nonce = fresh_nonce();
        let keys = session_keys(
            &pairwise_keys[dialer.0 as usize],
            dialer,
            me,
            &dialer_nonce,
            &acceptor_nonce,
        );
        let mut answer = Vec::with_capacity(ANSWER_LEN);
        answer.extend_from_slice(&acceptor_nonce);
        answer.extend_from_slice(&keys.confirmation);
        stream.write_all(&answer).await?;
        Ok((dialer, FrameOpener::new(keys.frames)))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout)?
}

/// The core's handle on the outgoing queues: one bounded queue per peer.
#[derive(Clone)]
pub struct PeerSender {
    me: ReplicaId,
    queues: Vec<Option<PeerQueue>>,
    counters: Arc<NodeCounters>,
}

/// One peer's outgoing queue and the bytes waiting in it.
#[derive(Clone)]
struct PeerQueue {
    frames: mpsc::Sender<Bytes>,
    bytes: Arc<AtomicUsize>,
}

impl PeerSender {
    /// Queues an encoded message for `to`; drops and counts it if the queue is full.
    pub fn send(&self, to: ReplicaId, frame: Bytes) {
        let Some(Some(queue)) = self.queues.get(to.0 as usize) else {
            debug!(peer = %to, "dropping a message for an unknown or own replica id");
            return;
        };
        let length = frame.len();
        let waiting = queue.bytes.fetch_add(length, Ordering::Relaxed);
        if (waiting > 0 && waiting + length > PEER_QUEUE_BYTES_MAX)
            || queue.frames.try_send(frame).is_err()
        {
            // Full (peer slow or down) or closed (shutting down): the protocol retransmits.
            queue.bytes.fetch_sub(length, Ordering::Relaxed);
            self.counters.dropped(DropReason::PeerQueueFull);
        }
    }

    /// Frames waiting in each peer's outgoing queue.
    pub fn queue_depths(&self) -> Vec<(ReplicaId, usize)> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(index, queue)| {
                let queue = &queue.as_ref()?.frames;
                Some((
                    ReplicaId(index as u32),
                    queue.max_capacity() - queue.capacity(),
                ))
            })
            .collect()
    }

    /// Queues an encoded message for every peer.
    pub fn broadcast(&self, frame: Bytes) {
        for index in 0..self.queues.len() {
            if index != self.me.0 as usize {
                self.send(ReplicaId(index as u32), frame.clone());
            }
        }
    }
}

/// Static description of this replica's place in the mesh.
#[derive(Clone)]
pub struct PeerMesh {
    /// This replica.
    pub me: ReplicaId,
    /// `replica_address` of every replica, by id.
    pub addresses: Vec<String>,
    /// Pairwise channel keys, by peer id (own entry unused).
    pub pairwise_keys: Arc<Vec<[u8; 32]>>,
}

/// Creates one outgoing queue per peer and spawns its writer task into `tasks`.
pub fn spawn_peer_writers(
    mesh: &PeerMesh,
    queue_frames: usize,
    counters: Arc<NodeCounters>,
    tasks: &mut JoinSet<()>,
) -> PeerSender {
    let mut queues = Vec::with_capacity(mesh.addresses.len());
    for (index, address) in mesh.addresses.iter().enumerate() {
        if index == mesh.me.0 as usize {
            queues.push(None);
            continue;
        }
        let (sender, receiver) = mpsc::channel(queue_frames.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        queues.push(Some(PeerQueue {
            frames: sender,
            bytes: bytes.clone(),
        }));
        let peer = ReplicaId(index as u32);
        let writer = PeerWriter {
            me: mesh.me,
            peer,
            address: address.clone(),
            pairwise_key: mesh.pairwise_keys[index],
            counters: counters.clone(),
            queued_bytes: bytes,
        };
        let span = tracing::info_span!("peer_writer", %peer);
        tasks.spawn(writer.run(receiver).instrument(span));
    }
    PeerSender {
        me: mesh.me,
        queues,
        counters,
    }
}

struct PeerWriter {
    me: ReplicaId,
    peer: ReplicaId,
    address: String,
    pairwise_key: [u8; 32],
    counters: Arc<NodeCounters>,
    /// Bytes waiting in the queue (shared with [`PeerSender`], which adds what it queues).
    queued_bytes: Arc<AtomicUsize>,
}

impl PeerWriter {
    async fn run(self, mut queue: mpsc::Receiver<Bytes>) {
        let mut backoff = BACKOFF_INITIAL;
        let mut failures: u64 = 0;
        loop {
            match self.connect().await {
                Ok((stream, sealer)) => {
                    info!(address = %self.address, "connected to peer");
                    backoff = BACKOFF_INITIAL;
                    failures = 0;
                    match self.pump(stream, sealer, &mut queue).await {
                        Ok(()) => return, // queue closed: shutting down
                        Err(error) => info!(%error, "peer connection lost; reconnecting"),
                    }
                }
                Err(error) => {
                    failures += 1;
                    // A peer that is down is normal during start-up and recovery: say so
                    // once, then quietly keep trying.
                    if failures == 1 || failures.is_power_of_two() {
                        debug!(address = %self.address, %error, failures, "cannot reach peer");
                    }
                    if matches!(error, ConnectError::Handshake(HandshakeError::KeyMismatch)) {
                        warn!(address = %self.address, %error, "peer refused our key");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<(TcpStream, FrameSealer), ConnectError> {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        stream.set_nodelay(true)?;
        let sealer = dial_handshake(&mut stream, self.me, self.peer, &self.pairwise_key).await?;
        Ok((stream, sealer))
    }

    /// Writes queued frames until the connection fails (error) or the queue closes (Ok).
    async fn pump(
        &self,
        stream: TcpStream,
        mut sealer: FrameSealer,
        queue: &mut mpsc::Receiver<Bytes>,
    ) -> std::io::Result<()> {
        let (_read_half, write_half) = stream.into_split();
        let mut writer = BufWriter::with_capacity(SOCKET_BUFFER_BYTES, write_half);
        loop {
            let Some(first) = queue.recv().await else {
                writer.flush().await?;
                return Ok(());
            };
            self.queued_bytes.fetch_sub(first.len(), Ordering::Relaxed);
            sealer.write_frame(&mut writer, &first).await?;
            let mut written: u64 = 1;
            // Coalesce: everything already queued goes out with one flush.
            while (written as usize) < COALESCE_FRAMES_MAX {
                match queue.try_recv() {
                    Ok(frame) => {
                        self.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
                        sealer.write_frame(&mut writer, &frame).await?;
                        written += 1;
                    }
                    Err(_) => break,
                }
            }
            writer.flush().await?;
            self.counters.peer_frames_sent(written);
        }
    }
}

#[derive(Debug, Error)]
enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

/// What inbound peer connections need: where to deliver, and how to pre-verify forwarded
/// client requests off the core thread.
#[derive(Clone)]
pub struct PeerInboundContext {
    /// The mesh description.
    pub mesh: PeerMesh,
    /// The core's inbox.
    pub inbox: CoreInbox,
    /// Counters.
    pub counters: Arc<NodeCounters>,
    /// Client keys, to pre-verify forwarded requests.
    pub clients: Arc<ClientKeys>,
    /// Where pre-verified signatures are remembered.
    pub cache: Arc<VerifiedCache>,
}

/// Accepts inbound replica connections until the task is aborted.
pub async fn accept_peers(listener: TcpListener, context: PeerInboundContext) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting a replica connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Reap finished connection tasks so the set counts only open connections.
        while connections.try_join_next().is_some() {}
        if connections.len() >= PEER_CONNECTIONS_MAX {
            context.counters.dropped(DropReason::PeerConnectionLimit);
            warn!(%address, "refusing a replica connection: {PEER_CONNECTIONS_MAX} already open");
            drop(stream);
            continue;
        }
        let context = context.clone();
        let span = tracing::info_span!("peer_reader", %address);
        connections.spawn(serve_peer(stream, context).instrument(span));
    }
}

async fn serve_peer(mut stream: TcpStream, context: PeerInboundContext) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    let (peer, mut opener) =
        match accept_handshake(&mut stream, context.mesh.me, &context.mesh.pairwise_keys).await {
            Ok(accepted) => accepted,
            Err(error) => {
                context.counters.dropped(DropReason::PeerHandshakeFailed);
                warn!(%error, "rejected a replica connection");
                return;
            }
        };
    debug!(%peer, "peer connected");
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER_BYTES, stream);
    loop {
        let payload = match opener.read_frame(&mut reader).await {
            Ok(payload) => payload,
            Err(FrameError::Closed) => {
                debug!(%peer, "peer closed its connection");
                return;
            }
            Err(FrameError::Io(error)) => {
                debug!(%peer, %error, "peer connection failed");
                return;
            }
            Err(error @ FrameError::Oversized { .. }) => {
                context.counters.dropped(DropReason::PeerFrameOversized);
                warn!(%peer, %error, "closing peer connection");
                return;
            }
            Err(error @ FrameError::BadTag { .. }) => {
                context.counters.dropped(DropReason::PeerFrameBadMac);
                warn!(%peer, %error, "closing peer connection");
                return;
            }
        };
        let message: ReplicaMessage =
            match tessera_types::decode(&payload, tessera_types::limits::MAX_FRAME_BYTES) {
                Ok(message) => message,
                Err(error) => {
                    context.counters.dropped(DropReason::PeerFrameMalformed);
                    warn!(%peer, %error, "closing peer connection after an undecodable frame");
                    return;
                }
            };
        context.counters.peer_frame_received();
        // Every request a replica commits must carry a valid signature (docs/PROTOCOL.md §3).
        // Check forwarded requests and the requests inside PREPAREs here, on the IO threads and
        // in parallel with the core, so the core thread finds the verdicts cached.
        let requests: &[tessera_types::Request] = match &message {
            ReplicaMessage::Request(request) => std::slice::from_ref(request),
            ReplicaMessage::Prepare(prepare) => &prepare.batch,
            _ => &[],
        };
        for request in requests {
            if request.check_shape().is_ok() {
                NodeAuthenticator::verify_and_remember(&context.clients, &context.cache, request);
            }
        }
        if context
            .inbox
            .submit(CoreEvent::Message {
                from: peer,
                message,
            })
            .await
            .is_err()
        {
            return; // the core has stopped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::core_inbox;
    use std::collections::HashMap;
    use std::sync::mpsc::Receiver;
    use tessera_types::{ReqViewChange, View};

    const KEY_01: [u8; 32] = [1u8; 32];

    fn mesh(me: u32, acceptor_address: &str) -> PeerMesh {
        // Replica 0 dials; replica 1 accepts. The pairwise key is the same in both tables.
        PeerMesh {
            me: ReplicaId(me),
            addresses: vec!["127.0.0.1:9".into(), acceptor_address.into()],
            pairwise_keys: Arc::new(vec![KEY_01, KEY_01]),
        }
    }

    fn message(index: u64) -> ReplicaMessage {
        ReplicaMessage::ReqViewChange(ReqViewChange {
            replica: ReplicaId(0),
            from_view: View(index),
            to_view: View(index + 1),
        })
    }

    /// Starts replica 1's acceptor; returns its address, inbox receiver and counters.
    async fn acceptor(tasks: &mut JoinSet<()>) -> (String, Receiver<CoreEvent>, Arc<NodeCounters>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let counters = Arc::new(NodeCounters::default());
        let (inbox, receiver) = core_inbox(1024, counters.clone());
        let context = PeerInboundContext {
            mesh: mesh(1, &address),
            inbox,
            counters: counters.clone(),
            clients: Arc::new(ClientKeys::from_parts(HashMap::new(), HashMap::new())),
            cache: Arc::new(VerifiedCache::new(16)),
        };
        tasks.spawn(accept_peers(listener, context));
        (address, receiver, counters)
    }

    async fn receive(receiver: &Receiver<CoreEvent>) -> Option<(ReplicaId, ReplicaMessage)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match receiver.try_recv() {
                Ok(CoreEvent::Message { from, message }) => return Some((from, message)),
                Ok(other) => panic!("unexpected event {other:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        None
    }

    async fn eventually(condition: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    async fn is_closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// A peer that is down costs at most PEER_QUEUE_BYTES_MAX of queued frames (plus one
    /// frame): the rest is dropped and counted, however many frames the queue could hold.
    #[tokio::test]
    async fn a_down_peers_queue_is_bounded_in_bytes() {
        let mut tasks = JoinSet::new();
        let counters = Arc::new(NodeCounters::default());
        // Port 9 (discard) on loopback: nothing listens, so every connection attempt fails and
        // frames stay queued.
        let sender = spawn_peer_writers(
            &mesh(0, "127.0.0.1:9"),
            PEER_QUEUE_FRAMES_DEFAULT,
            counters.clone(),
            &mut tasks,
        );
        let frame = Bytes::from(vec![0u8; 1 << 20]);
        let frames = PEER_QUEUE_BYTES_MAX / frame.len() * 2;
        for _ in 0..frames {
            sender.send(ReplicaId(1), frame.clone());
        }
        let queued = PEER_QUEUE_BYTES_MAX / frame.len();
        assert_eq!(sender.queue_depths(), vec![(ReplicaId(1), queued)]);
        assert_eq!(
            counters.drops(DropReason::PeerQueueFull),
            (frames - queued) as u64
        );
        // A frame larger than the whole budget still leaves when nothing waits before it.
        let sender = spawn_peer_writers(
            &mesh(0, "127.0.0.1:9"),
            PEER_QUEUE_FRAMES_DEFAULT,
            counters.clone(),
            &mut tasks,
        );
        sender.send(
            ReplicaId(1),
            Bytes::from(vec![0u8; PEER_QUEUE_BYTES_MAX + 1]),
        );
        assert_eq!(sender.queue_depths(), vec![(ReplicaId(1), 1)]);
        tasks.abort_all();
    }

    #[tokio::test]
    async fn messages_flow_in_order_over_an_authenticated_connection() {
        let mut tasks = JoinSet::new();
        let (address, receiver, counters) = acceptor(&mut tasks).await;
        let sender_counters = Arc::new(NodeCounters::default());
        let sender =
            spawn_peer_writers(&mesh(0, &address), 64, sender_counters.clone(), &mut tasks);
        for index in 0..50 {
            sender.send(
                ReplicaId(1),
                Bytes::from(tessera_types::encode(&message(index))),
            );
        }
        sender.send(ReplicaId(0), Bytes::from_static(b"to myself")); // ignored
        for index in 0..50 {
            let (from, received) = receive(&receiver).await.expect("message arrives");
            assert_eq!(from, ReplicaId(0));
            assert_eq!(received, message(index));
        }
        assert_eq!(counters.peer_frames_received_total(), 50);
        assert!(counters
            .drop_snapshot()
            .iter()
            .all(|(_, count)| *count == 0));
        tasks.abort_all();
    }

    #[tokio::test]
    async fn a_replayed_frame_is_rejected_and_closes_the_connection() {
        let mut tasks = JoinSet::new();
        let (address, receiver, counters) = acceptor(&mut tasks).await;
        let mut stream = TcpStream::connect(&address).await.unwrap();
        let mut sealer = dial_handshake(&mut stream, ReplicaId(0), ReplicaId(1), &KEY_01)
            .await
            .unwrap();
        let mut frame = Vec::new();
        let payload = tessera_types::encode(&message(7));
        sealer.write_frame(&mut frame, &payload).await.unwrap();
        stream.write_all(&frame).await.unwrap();
        stream.write_all(&frame).await.unwrap(); // the same bytes again: sequence 0 replayed
        assert_eq!(receive(&receiver).await, Some((ReplicaId(0), message(7))));
        assert!(eventually(|| counters.drops(DropReason::PeerFrameBadMac) == 1).await);
        assert!(is_closed(&mut stream).await);
        assert!(receiver.try_recv().is_err(), "the replay was not delivered");
        tasks.abort_all();
    }

    #[tokio::test]
    async fn a_replayed_session_is_rejected() {
        let mut tasks = JoinSet::new();
        let (address, receiver, counters) = acceptor(&mut tasks).await;
        // Record a whole session's bytes, then replay them on a new connection: the acceptor's
        // fresh nonce gives the new session another key.
        let mut first = TcpStream::connect(&address).await.unwrap();
        let mut sealer = dial_handshake(&mut first, ReplicaId(0), ReplicaId(1), &KEY_01)
            .await
            .unwrap();
        let mut frame = Vec::new();
        sealer
            .write_frame(&mut frame, &tessera_types::encode(&message(1)))
            .await
            .unwrap();
        first.write_all(&frame).await.unwrap();
        assert!(receive(&receiver).await.is_some());

        let mut second = TcpStream::connect(&address).await.unwrap();
        let _ = dial_handshake(&mut second, ReplicaId(0), ReplicaId(1), &KEY_01)
            .await
            .unwrap();
        second.write_all(&frame).await.unwrap();
        assert!(eventually(|| counters.drops(DropReason::PeerFrameBadMac) == 1).await);
        assert!(is_closed(&mut second).await);
        tasks.abort_all();
    }

    #[tokio::test]
    async fn wrong_keys_and_bad_handshakes_are_refused() {
        let mut tasks = JoinSet::new();
        let (address, _receiver, counters) = acceptor(&mut tasks).await;

        let mut stream = TcpStream::connect(&address).await.unwrap();
        let result = dial_handshake(&mut stream, ReplicaId(0), ReplicaId(1), &[2u8; 32]).await;
        assert!(matches!(result, Err(HandshakeError::KeyMismatch)));

        // A dialer that is not a peer, one that wants someone else, and one that is not Tessera.
        for (dialer, acceptor_id, magic) in
            [(5u32, 1u32, MAGIC), (0, 2, MAGIC), (0, 1, *b"GET / HT")]
        {
            let mut stream = TcpStream::connect(&address).await.unwrap();
            let mut hello = Vec::new();
            hello.extend_from_slice(&magic);
            hello.extend_from_slice(&dialer.to_be_bytes());
            hello.extend_from_slice(&acceptor_id.to_be_bytes());
            hello.extend_from_slice(&[0u8; NONCE_LEN]);
            stream.write_all(&hello).await.unwrap();
            assert!(is_closed(&mut stream).await);
        }
        assert!(eventually(|| counters.drops(DropReason::PeerHandshakeFailed) == 3).await);
        tasks.abort_all();
    }

    #[tokio::test]
    async fn an_authentic_but_undecodable_frame_closes_the_connection() {
        let mut tasks = JoinSet::new();
        let (address, receiver, counters) = acceptor(&mut tasks).await;
        let mut stream = TcpStream::connect(&address).await.unwrap();
        let mut sealer = dial_handshake(&mut stream, ReplicaId(0), ReplicaId(1), &KEY_01)
            .await
            .unwrap();
        let mut frame = Vec::new();
        sealer.write_frame(&mut frame, &[0xff; 40]).await.unwrap();
        stream.write_all(&frame).await.unwrap();
        assert!(eventually(|| counters.drops(DropReason::PeerFrameMalformed) == 1).await);
        assert!(is_closed(&mut stream).await);
        assert!(receiver.try_recv().is_err());
        tasks.abort_all();
    }
}
