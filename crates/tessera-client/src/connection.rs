//! One replica connection: a task that connects (with backoff), sends the sessions' `Hello`s,
//! then runs a coalescing writer and a reader until the connection drops, and starts over.
//!
//! The writer drains everything queued and writes it with one `write_all`, so many sessions
//! cost one syscall per wake-up rather than one per request. The reader authenticates each
//! reply and hands it to the pending table; it never blocks on a session.

use crate::request::{frame, FRAME_PREFIX_BYTES, REPLY_FRAME_BYTES_MAX};
use crate::shared::Shared;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tessera_types::wire::{ClientToReplica, ReplicaToClient};
use tessera_types::{decode, ReplicaId};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// An encoded, length-prefixed frame, shared between the queues of every replica it goes to.
pub(crate) type Frame = Arc<[u8]>;

/// First wait before reconnecting; doubles per failed attempt up to [`RECONNECT_BACKOFF_MAX`].
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Cap on the reconnect backoff.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bytes the writer gathers before writing; one burst of small requests fits many times over.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Read buffer: many replies arrive per read syscall.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How a connection ended.
enum Ended {
    /// The client was dropped: stop for good.
    ClientGone,
    /// The connection failed; reconnect.
    Failed(String),
}

/// Runs the connection to the replica at `slot` of `shared.connections` until the client goes.
pub(crate) async fn run(
    shared: Arc<Shared>,
    slot: usize,
    mut queue: mpsc::Receiver<Frame>,
    connect_timeout: Duration,
) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        let state = &shared.connections[slot];
        let connected =
            tokio::time::timeout(connect_timeout, TcpStream::connect(&state.address)).await;
        let stream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                state.record_error(format!("{}: {error}", state.address));
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
            Err(_elapsed) => {
                state.record_error(format!(
                    "{}: connect timed out after {connect_timeout:?}",
                    state.address
                ));
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = RECONNECT_BACKOFF_MIN;
        match serve(&shared, slot, stream, &mut queue).await {
            Ended::ClientGone => return,
            Ended::Failed(reason) => {
                let state = &shared.connections[slot];
                state.connected.store(false, Ordering::Release);
                state.record_error(format!("{}: {reason}", state.address));
                shared.counters.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(replica = %state.replica, %reason, "client connection dropped; reconnecting");
                tokio::time::sleep(RECONNECT_BACKOFF_MIN).await;
            }
        }
    }
}

async fn serve(
    shared: &Arc<Shared>,
    slot: usize,
    stream: TcpStream,
    queue: &mut mpsc::Receiver<Frame>,
) -> Ended {
    // We coalesce writes ourselves; Nagle would only add latency.
    if let Err(error) = stream.set_nodelay(true) {
        return Ended::Failed(format!("cannot set TCP_NODELAY: {error}"));
    }
    let state = &shared.connections[slot];
    let replica = state.replica;
    let (read_half, mut write_half) = stream.into_split();
    // Register every live session on this connection before any request goes out on it.
    let mut hellos = Vec::new();
    for client in shared.live_sessions() {
        hellos.extend_from_slice(&frame(&shared.credential.hello(client, replica)));
    }
    // Ask for the replica's view, so a new client finds the current primary without first
    // waiting out a retransmission timeout after a view change.
    hellos.extend_from_slice(&frame(&ClientToReplica::Status));
    if let Err(error) = write_half.write_all(&hellos).await {
        return Ended::Failed(format!("cannot send hello: {error}"));
    }
    state.connected.store(true, Ordering::Release);
    let mut reader = tokio::spawn(read_loop(Arc::clone(shared), replica, read_half));
    let ended = tokio::select! {
        ended = write_loop(&mut write_half, queue) => ended,
        joined = &mut reader => match joined {
            Ok(reason) => Ended::Failed(reason),
            Err(error) => Ended::Failed(format!("reader task failed: {error}")),
        },
    };
    reader.abort();
    ended
}

async fn write_loop(write_half: &mut OwnedWriteHalf, queue: &mut mpsc::Receiver<Frame>) -> Ended {
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES_MAX);
    loop {
        let Some(first) = queue.recv().await else {
            return Ended::ClientGone;
        };
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            match queue.try_recv() {
                Ok(next) => batch.extend_from_slice(&next),
                Err(_) => break,
            }
        }
        if let Err(error) = write_half.write_all(&batch).await {
            return Ended::Failed(format!("write failed: {error}"));
        }
        batch.clear();
        if batch.capacity() > 4 * WRITE_BATCH_BYTES_MAX {
            // One huge operation should not pin a huge buffer for the connection's lifetime.
            batch = Vec::with_capacity(WRITE_BATCH_BYTES_MAX);
        }
    }
}

/// Reads frames until the connection fails; returns why.
async fn read_loop(shared: Arc<Shared>, replica: ReplicaId, read_half: OwnedReadHalf) -> String {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read_half);
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; FRAME_PREFIX_BYTES];
        if let Err(error) = reader.read_exact(&mut prefix).await {
            return format!("read failed: {error}");
        }
        let length = u32::from_be_bytes(prefix) as usize;
        if length > REPLY_FRAME_BYTES_MAX {
            let counters = &shared.counters;
            counters.frames_oversized.fetch_add(1, Ordering::Relaxed);
            counters
                .last_oversized_bytes
                .store(length as u64, Ordering::Relaxed);
            return format!("replica {replica} sent a frame of {length} bytes, over the limit of {REPLY_FRAME_BYTES_MAX}");
        }
        body.resize(length, 0);
        if let Err(error) = reader.read_exact(&mut body).await {
            return format!("read failed: {error}");
        }
        match decode::<ReplicaToClient>(&body, REPLY_FRAME_BYTES_MAX) {
            Ok(message) => shared.on_message(replica, message),
            Err(error) => {
                shared
                    .counters
                    .frames_malformed
                    .fetch_add(1, Ordering::Relaxed);
                return format!("replica {replica} sent a malformed frame: {error}");
            }
        }
        if body.capacity() > 4 * READ_BUFFER_BYTES {
            body = Vec::new();
        }
    }
}
