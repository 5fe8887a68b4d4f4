//! The TCP server: accepts Redis connections and runs each one's read–execute–reply loop.
//!
//! A connection decodes every complete request it has received, up to one envelope's worth,
//! answers connection commands itself, sends the key-value commands as one group through the
//! [`Dispatcher`], and writes all the replies in request order before reading on. While a group
//! is in flight the connection does not read, so a fast pipelining client is held back by TCP
//! flow control, not by gateway memory.
//!
//! Three clocks bound what one connection can hold ([`GatewayOptions`]): the idle timeout
//! (waiting for a request), the frame timeout (waiting for the rest of a begun request) and the
//! write timeout (replies making no progress into the socket). Every connection that ends is
//! counted by its [`CloseReason`].

use crate::commands::{self, ClusterInfo, ConnectionState, Live, Shape, Step};
use crate::dispatch::{self, Dispatcher};
use crate::resp::{Protocol, Reply, RequestDecoder, RespLimits};
use bytes::{Buf, BytesMut};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tessera_client::Client;
use tessera_kv::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Bytes a connection asks the socket for at once.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Input read and dropped after a connection's last reply, at most (see `close_gracefully`).
const CLOSE_DRAIN_BYTES_MAX: usize = 1 << 20;
const CLOSE_DRAIN_TIME_MAX: Duration = Duration::from_secs(1);
/// Output capacity a connection keeps between rounds; a larger buffer (one round of large
/// values) is given back, so an idle connection does not pin its busiest moment's memory.
const OUTPUT_RETAINED_BYTES_MAX: usize = 64 * 1024;
/// Input capacity a connection keeps while it holds no unread input, for the same reason.
const INPUT_RETAINED_BYTES_MAX: usize = 64 * 1024;
/// Refused connections (over `connections_max`) that may be closed gracefully at once, each
/// for up to `CLOSE_DRAIN_TIME_MAX`. Refusals come exactly when the gateway is full, so past
/// this a refused connection is dropped right after its error, at the risk of a reset
/// destroying it.
const REFUSALS_DRAINING_MAX: usize = 64;

/// Gateway tunables. Each has a default and a bound checked by [`GatewayOptions::validate`].
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Most connections open at once; more are answered with an error and closed. Default 1024.
    pub connections_max: usize,
    /// Envelopes in flight at once (client sessions). Default 2: fewer lanes make larger
    /// envelopes, and on 2 cores 1–3 lanes measured alike (redis-benchmark SET, -c 50 and -P 16)
    /// while 8 and 16 lost 20–50% (docs/BENCHMARKS.md); two keep a slow envelope from stalling
    /// every connection.
    pub lanes: usize,
    /// Groups waiting for a free lane; connections beyond wait their turn. Default 4096.
    pub queued_groups_max: usize,
    /// Most commands of one connection executed as one group. Default 256.
    pub pipeline_commands_max: usize,
    /// Most bytes the results of one connection's group may reach, counted at the largest each
    /// command can return (512 KiB per value read): the gateway holds a group's replies until
    /// all have arrived. A single command is always accepted. Default 16 MiB, so a pipeline of
    /// 16 GETs is one group; longer ones are split into several, in order. This is also what
    /// bounds a connection's unwritten replies: a connection reads nothing more until its
    /// group's replies are written.
    pub group_result_bytes_max: usize,
    /// A connection waiting for a request this long after its last reply (or after it opened)
    /// is closed; 0 never closes one. Default 300 s: slots (`connections_max`) held by clients
    /// that vanished without a FIN, or forgot a pooled connection, come back within minutes,
    /// while a pooled connection used every few minutes survives. Redis's `timeout` defaults to
    /// 0, but a Redis server usually faces trusted clients; this gateway may not.
    pub idle_timeout_ms: u64,
    /// A request begun but not complete this long after the gateway started waiting for its
    /// rest gets an error and its connection is closed (slowloris); 0 disables. Default 30 s:
    /// the largest request the decoder holds (2 MiB) arrives within it at about 0.6 Mbit/s.
    pub frame_timeout_ms: u64,
    /// A connection whose replies make no progress into the socket for this long is reset; 0
    /// disables. Default 30 s: a client reading at any rate resets the clock with every write
    /// the kernel accepts, so only a client that stopped reading (or vanished with a full
    /// window, which TCP alone would keep for about 15 minutes) is cut off.
    pub write_timeout_ms: u64,
    /// Bounds of the RESP decoder.
    pub limits: RespLimits,
}

/// Shortest timeout accepted when enabled: shorter ones would close healthy connections on a
/// scheduling hiccup, and 0 is there to mean "never".
pub const TIMEOUT_MS_MIN: u64 = 100;
/// Longest idle timeout accepted: beyond a week, 0 (never) says what is meant.
pub const IDLE_TIMEOUT_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Longest frame and write timeouts accepted.
pub const STALL_TIMEOUT_MS_MAX: u64 = 3600 * 1000;

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            connections_max: 1024,
            lanes: 2,
            queued_groups_max: 4096,
            pipeline_commands_max: 256,
            group_result_bytes_max: 16 << 20,
            idle_timeout_ms: 300_000,
            frame_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            limits: RespLimits::default(),
        }
    }
}

impl GatewayOptions {
    /// Checks every bound; the error names the option, its command-line flag where it has one,
    /// and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        let bounds = [
            (
                "connections_max",
                "--connections-max",
                self.connections_max,
                1,
                1 << 20,
            ),
            ("lanes", "--lanes", self.lanes, 1, 1024),
            ("queued_groups_max", "", self.queued_groups_max, 1, 1 << 20),
            (
                "pipeline_commands_max",
                "",
                self.pipeline_commands_max,
                1,
                tessera_core::envelope::ENVELOPE_OPERATIONS_MAX,
            ),
            (
                "group_result_bytes_max",
                "",
                self.group_result_bytes_max,
                1 << 20,
                1 << 30,
            ),
        ];
        for (name, flag, value, minimum, maximum) in bounds {
            if !(minimum..=maximum).contains(&value) {
                return Err(format!(
                    "gateway option {name}{} is {value}; set it between {minimum} and {maximum}",
                    flag_note(flag)
                ));
            }
        }
        let timeouts = [
            (
                "idle_timeout_ms",
                "--idle-timeout",
                self.idle_timeout_ms,
                IDLE_TIMEOUT_MS_MAX,
            ),
            (
                "frame_timeout_ms",
                "--frame-timeout",
                self.frame_timeout_ms,
                STALL_TIMEOUT_MS_MAX,
            ),
            (
                "write_timeout_ms",
                "--write-timeout",
                self.write_timeout_ms,
                STALL_TIMEOUT_MS_MAX,
            ),
        ];
        for (name, flag, value, maximum) in timeouts {
            if value != 0 && !(TIMEOUT_MS_MIN..=maximum).contains(&value) {
                return Err(format!(
                    "gateway option {name}{} is {value} ms; set it between {TIMEOUT_MS_MIN} ms \
                     and {maximum} ms, or to 0 to disable it",
                    flag_note(flag)
                ));
            }
        }
        Ok(())
    }

    fn idle_timeout(&self) -> Option<Duration> {
        enabled(self.idle_timeout_ms)
    }

    fn frame_timeout(&self) -> Option<Duration> {
        enabled(self.frame_timeout_ms)
    }

    fn write_timeout(&self) -> Option<Duration> {
        enabled(self.write_timeout_ms)
    }
}

fn flag_note(flag: &str) -> String {
    if flag.is_empty() {
        String::new()
    } else {
        format!(" ({flag})")
    }
}

/// A timeout in milliseconds, 0 meaning none.
fn enabled(timeout_ms: u64) -> Option<Duration> {
    (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms))
}

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    dispatcher: Dispatcher,
    info: ClusterInfo,
    options: GatewayOptions,
    connections: Arc<Semaphore>,
    refusals_draining: Semaphore,
    next_connection_id: AtomicU64,
    counters: GatewayCounters,
}

/// What the gateway counts for its metrics endpoint (plain relaxed atomics: read by humans and
/// scrapers, never used to decide anything).
#[derive(Default)]
struct GatewayCounters {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    requests: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
    /// Bytes of replies encoded and not yet taken by a socket, all connections together.
    reply_backlog_bytes: AtomicU64,
}

/// Errors the gateway answered, by kind.
#[derive(Clone, Copy)]
enum ErrorKind {
    /// Input that is not RESP, or breaks a decoder limit (the connection is closed).
    Protocol,
    /// A command larger than one signed request can carry.
    TooLarge,
    /// A replicated command without f+1 matching replies (outcome unknown to the client).
    Unconfirmed,
    /// A result from the cluster that did not decode, or was cut at the reply limit.
    BadResult,
    /// A request begun and not completed in time (the connection is closed).
    Timeout,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::Protocol,
        ErrorKind::TooLarge,
        ErrorKind::Unconfirmed,
        ErrorKind::BadResult,
        ErrorKind::Timeout,
    ];

    fn name(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unconfirmed => "unconfirmed",
            ErrorKind::BadResult => "bad_result",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side.
    ClientClosed,
    /// `QUIT`.
    Quit,
    /// Input that is not RESP or breaks a decoder limit, answered with an error.
    ProtocolError,
    /// No request within the idle timeout.
    IdleTimeout,
    /// A begun request not completed within the frame timeout.
    FrameTimeout,
    /// Replies made no progress into the socket within the write timeout.
    WriteTimeout,
    /// The socket failed (a reset, a broken pipe).
    SocketError,
}

impl CloseReason {
    const ALL: [CloseReason; 7] = [
        CloseReason::ClientClosed,
        CloseReason::Quit,
        CloseReason::ProtocolError,
        CloseReason::IdleTimeout,
        CloseReason::FrameTimeout,
        CloseReason::WriteTimeout,
        CloseReason::SocketError,
    ];

    /// The `reason` label of `tessera_gateway_connections_closed_total`.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Quit => "quit",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::FrameTimeout => "frame_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::SocketError => "socket_error",
        }
    }
}

impl GatewayCounters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, kind: ErrorKind) {
        Self::add(&self.errors[kind as usize]);
    }

    fn closed(&self, reason: CloseReason) {
        Self::add(&self.closed[reason as usize]);
    }
}

/// One connection's replies encoded and not yet written, counted in the shared gauge for as
/// long as they exist (whichever way the write ends).
struct Backlog<'a> {
    gauge: &'a AtomicU64,
    bytes: u64,
}

impl<'a> Backlog<'a> {
    fn new(gauge: &'a AtomicU64, bytes: usize) -> Backlog<'a> {
        let bytes = bytes as u64;
        gauge.fetch_add(bytes, Ordering::Relaxed);
        Backlog { gauge, bytes }
    }

    fn written(&mut self, bytes: usize) {
        let bytes = (bytes as u64).min(self.bytes);
        self.bytes -= bytes;
        self.gauge.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Drop for Backlog<'_> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Renders the gateway's Prometheus metrics; usable after [`Gateway::run`] took the gateway.
#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Arc<Registry>,
}

impl GatewayMetrics {
    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Reads the gateway's counters at scrape time.
struct GatewayCollector(Arc<Shared>);

impl std::fmt::Debug for GatewayCollector {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("GatewayCollector")
    }
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let live = shared.live();
        let counters = &shared.counters;
        let gauges = [
            (
                "tessera_gateway_connections",
                "Redis connections open now",
                live.connections,
            ),
            (
                "tessera_gateway_view",
                "The view the gateway's client believes current",
                live.view,
            ),
            (
                "tessera_gateway_reply_backlog_bytes",
                "Bytes of replies encoded and not yet taken by the sockets, all connections",
                counters.reply_backlog_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let totals = [
            (
                "tessera_gateway_connections_accepted",
                "Redis connections accepted",
                counters.connections_accepted.load(Ordering::Relaxed),
            ),
            (
                "tessera_gateway_connections_refused",
                "Redis connections refused because connections_max were open",
                counters.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "tessera_gateway_requests",
                "Redis commands read from connections (connection commands included)",
                counters.requests.load(Ordering::Relaxed),
            ),
            (
                "tessera_gateway_commands",
                "Replicated commands sent to the cluster inside envelopes",
                live.commands,
            ),
            (
                "tessera_gateway_envelopes",
                "Signed requests (envelopes) sent to the cluster",
                live.envelopes,
            ),
        ];
        for (name, help, value) in totals {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "tessera_gateway_errors",
            "Error replies the gateway sent, by kind",
            None,
            MetricType::Counter,
        )?;
        for kind in ErrorKind::ALL {
            let count = counters.errors[kind as usize].load(Ordering::Relaxed);
            ConstCounter::new(count).encode(errors.encode_family(&[("kind", kind.name())])?)?;
        }
        let mut closed = encoder.encode_descriptor(
            "tessera_gateway_connections_closed",
            "Accepted Redis connections that ended, by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in CloseReason::ALL {
            let count = counters.closed[reason as usize].load(Ordering::Relaxed);
            ConstCounter::new(count).encode(closed.encode_family(&[("reason", reason.name())])?)?;
        }
        Ok(())
    }
}

impl Shared {
    fn live(&self) -> Live {
        let (envelopes, commands) = self.dispatcher.sent();
        let connections_max = self.options.connections_max;
        Live {
            view: self.client.view().0,
            connections: connections_max.saturating_sub(self.connections.available_permits())
                as u64,
            envelopes,
            commands,
        }
    }
}

impl Gateway {
    /// Binds `listen` and starts the dispatcher's lanes on `client`.
    pub async fn bind(
        listen: &str,
        client: Client,
        info: ClusterInfo,
        options: GatewayOptions,
    ) -> std::io::Result<Gateway> {
        options
            .validate()
            .map_err(|reason| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason))?;
        let listener = TcpListener::bind(listen).await?;
        let dispatcher = Dispatcher::start(&client, options.lanes, options.queued_groups_max);
        let shared = Arc::new(Shared {
            client,
            dispatcher,
            info,
            connections: Arc::new(Semaphore::new(options.connections_max)),
            refusals_draining: Semaphore::new(REFUSALS_DRAINING_MAX),
            options,
            next_connection_id: AtomicU64::new(1),
            counters: GatewayCounters::default(),
        });
        Ok(Gateway { listener, shared })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that renders this gateway's Prometheus metrics.
    pub fn metrics(&self) -> GatewayMetrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(GatewayCollector(Arc::clone(&self.shared))));
        GatewayMetrics {
            registry: Arc::new(registry),
        }
    }

    /// Serves connections until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    // Out of file descriptors and the like: the listener itself is fine.
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let shared = Arc::clone(&self.shared);
            tokio::spawn(accept(stream, peer, shared));
        }
    }
}

async fn accept(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Ok(_permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
        GatewayCounters::add(&shared.counters.connections_refused);
        refuse(stream, &shared).await;
        return;
    };
    GatewayCounters::add(&shared.counters.connections_accepted);
    let reason = match stream.set_nodelay(true) {
        Err(_) => CloseReason::SocketError,
        Ok(()) => {
            let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
            Connection {
                stream,
                shared: &shared,
                state: ConnectionState::new(id, peer.to_string()),
                decoder: RequestDecoder::new(shared.options.limits),
                input: BytesMut::with_capacity(READ_CHUNK_BYTES),
                carried: None,
            }
            .serve()
            .await
        }
    };
    shared.counters.closed(reason);
    tracing::debug!(%peer, reason = reason.name(), "connection closed");
}

/// Answers a connection over `connections_max` with Redis's error, then closes it.
async fn refuse(mut stream: TcpStream, shared: &Shared) {
    let mut out = Vec::new();
    Reply::error("max number of clients reached").encode(Protocol::Resp2, &mut out);
    // A new socket's empty send buffer takes these few bytes at once; the bound is for the
    // kernel that would not.
    let written = tokio::time::timeout(CLOSE_DRAIN_TIME_MAX, stream.write_all(&out)).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    // A client that sent its first command at once (redis-cli does) left unread input, and
    // closing on it would reset the connection and could destroy the error: drain, as every
    // close does, while few refusals are draining.
    if let Ok(_draining) = shared.refusals_draining.try_acquire() {
        close_gracefully(&mut stream).await;
    }
}

/// Ends a connection after its last reply. Closing a socket that still has unread input
/// makes the kernel send a reset, which can destroy the replies still in flight (the error
/// that explains the close, or QUIT's OK); so the write side is shut first and what the
/// client still sends is read and dropped, for a bounded time and number of bytes.
async fn close_gracefully(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let drain = async {
        while drained < CLOSE_DRAIN_BYTES_MAX {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIME_MAX, drain).await;
}

/// One reply to come, in request order.
enum Pending {
    /// Known already; encoded in the protocol in force when the request was read.
    Ready(Reply, Protocol),
    /// The result of the group's operation at this index.
    Replicated(usize, Shape, Protocol),
}

/// The requests of one round: their replies to come and the operations to order.
#[derive(Default)]
struct Round {
    pending: Vec<Pending>,
    operations: Vec<Vec<u8>>,
    bytes: usize,
    /// The most bytes the operations' results can reach.
    result_bytes: usize,
    /// Close the connection after these replies, for this reason.
    close: Option<CloseReason>,
}

/// An encoded operation, the most bytes its result can take, and how to shape its reply.
type Carried = (Vec<u8>, usize, Shape);

struct Connection<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    state: ConnectionState,
    decoder: RequestDecoder,
    input: BytesMut,
    /// A replicated step that did not fit the previous round; it opens the next one.
    carried: Option<Carried>,
}

/// Why a connection stopped waiting for input.
enum ReadStop {
    /// The client closed, or the socket failed.
    Closed(CloseReason),
    /// A deadline passed: `IdleTimeout` or `FrameTimeout`.
    TimedOut(CloseReason),
}

impl Connection<'_> {
    async fn serve(mut self) -> CloseReason {
        let mut output = Vec::new();
        // The idle clock runs from the last reply written (or the connection's opening).
        let mut idle_since = Instant::now();
        // The frame clock runs from when the gateway began waiting for the rest of a request.
        let mut frame_since: Option<Instant> = None;
        loop {
            let round = self.collect();
            if round.pending.is_empty() {
                if self.is_mid_request() {
                    frame_since.get_or_insert_with(Instant::now);
                } else {
                    frame_since = None;
                }
                match self.read(idle_since, frame_since).await {
                    Ok(()) => continue,
                    Err(ReadStop::Closed(reason)) => return reason,
                    Err(ReadStop::TimedOut(reason)) => return self.time_out(reason).await,
                }
            }
            frame_since = None;
            output.clear();
            self.execute(round.operations, &round.pending, &mut output)
                .await;
            if let Err(reason) = self.write_replies(&output).await {
                return reason;
            }
            if let Some(reason) = round.close {
                close_gracefully(&mut self.stream).await;
                return reason;
            }
            if output.capacity() > OUTPUT_RETAINED_BYTES_MAX {
                output = Vec::new();
            }
            if self.input.is_empty() && self.input.capacity() > INPUT_RETAINED_BYTES_MAX {
                self.input = BytesMut::with_capacity(READ_CHUNK_BYTES);
            }
            idle_since = Instant::now();
        }
    }

    /// True while part of a request has arrived: in the decoder, or unread in the input.
    fn is_mid_request(&self) -> bool {
        !self.input.is_empty() || self.decoder.is_mid_request()
    }

    /// Reads more input, until the earlier of the idle and frame deadlines.
    async fn read(
        &mut self,
        idle_since: Instant,
        frame_since: Option<Instant>,
    ) -> Result<(), ReadStop> {
        let options = &self.shared.options;
        let idle_deadline = options.idle_timeout().map(|timeout| idle_since + timeout);
        let frame_deadline = frame_since
            .zip(options.frame_timeout())
            .map(|(since, timeout)| since + timeout);
        let deadline = idle_deadline.into_iter().chain(frame_deadline).min();
        self.input.reserve(READ_CHUNK_BYTES);
        let read = self.stream.read_buf(&mut self.input);
        let read = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, read).await,
            None => Ok(read.await),
        };
        match read {
            Ok(Ok(0)) => Err(ReadStop::Closed(CloseReason::ClientClosed)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ReadStop::Closed(CloseReason::SocketError)),
            Err(_elapsed) if frame_deadline.is_some() && frame_deadline == deadline => {
                Err(ReadStop::TimedOut(CloseReason::FrameTimeout))
            }
            Err(_elapsed) => Err(ReadStop::TimedOut(CloseReason::IdleTimeout)),
        }
    }

    /// Closes a connection whose idle or frame deadline passed. A client between requests is
    /// closed silently, as Redis does: it asked nothing, and an unsolicited error would be
    /// read by a pooled client as the reply to its next command. A client in the middle of a
    /// request is told why, since that request gets no other answer.
    async fn time_out(mut self, reason: CloseReason) -> CloseReason {
        if !self.is_mid_request() {
            return reason;
        }
        self.shared.counters.error(ErrorKind::Timeout);
        let options = &self.shared.options;
        let text = if reason == CloseReason::FrameTimeout {
            format!(
                "request not complete within the gateway's frame timeout of {} ms; closing the \
                 connection",
                options.frame_timeout_ms
            )
        } else {
            format!(
                "no complete request within the gateway's idle timeout of {} ms; closing the \
                 connection",
                options.idle_timeout_ms
            )
        };
        let mut output = Vec::new();
        Reply::error(text).encode(self.state.protocol, &mut output);
        if self.write_replies(&output).await.is_ok() {
            close_gracefully(&mut self.stream).await;
        }
        reason
    }

    /// Writes `output` entirely. Each write the kernel accepts restarts the write timeout, so
    /// a slow reader is served at its pace; a connection that takes nothing for the whole
    /// timeout is reset, which also frees the replies the kernel still holds for it.
    async fn write_replies(&mut self, output: &[u8]) -> Result<(), CloseReason> {
        let mut backlog = Backlog::new(&self.shared.counters.reply_backlog_bytes, output.len());
        let write_timeout = self.shared.options.write_timeout();
        let mut written = 0;
        while written < output.len() {
            let write = self.stream.write(&output[written..]);
            let result = match write_timeout {
                Some(timeout) => tokio::time::timeout(timeout, write).await,
                None => Ok(write.await),
            };
            match result {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(CloseReason::SocketError),
                Ok(Ok(count)) => {
                    written += count;
                    backlog.written(count);
                }
                Err(_elapsed) => {
                    // A zero linger makes the close a reset: no FIN queued behind replies the
                    // client will never read, and the kernel drops them at once.
                    let _ = self.stream.set_zero_linger();
                    return Err(CloseReason::WriteTimeout);
                }
            }
        }
        Ok(())
    }

    /// Takes every complete request from the input, up to one group.
    fn collect(&mut self) -> Round {
        let mut round = Round::default();
        if let Some((operation, result_bytes, shape)) = self.carried.take() {
            self.add_operation(&mut round, operation, result_bytes, shape);
        }
        while round.pending.len() < self.shared.options.pipeline_commands_max {
            let arguments = match self.decoder.decode(&self.input) {
                Ok((consumed, arguments)) => {
                    self.input.advance(consumed);
                    match arguments {
                        Some(arguments) => arguments,
                        None => break,
                    }
                }
                Err(error) => {
                    self.shared.counters.error(ErrorKind::Protocol);
                    round
                        .pending
                        .push(Pending::Ready(Reply::error(error), self.state.protocol));
                    round.close = Some(CloseReason::ProtocolError);
                    break;
                }
            };
            if arguments.is_empty() {
                continue;
            }
            GatewayCounters::add(&self.shared.counters.requests);
            let live = self.shared.live();
            match commands::plan(&arguments, &mut self.state, &self.shared.info, &live) {
                Step::Reply(reply) => round
                    .pending
                    .push(Pending::Ready(reply, self.state.protocol)),
                Step::Close(reply) => {
                    round
                        .pending
                        .push(Pending::Ready(reply, self.state.protocol));
                    round.close = Some(CloseReason::Quit);
                    break;
                }
                Step::Replicated { command, shape } => {
                    let operation = command.encode();
                    let cost = dispatch::operation_cost(&operation);
                    let result_bytes = commands::response_bytes_max(&command);
                    let results_fit = round.operations.is_empty()
                        || round.result_bytes.saturating_add(result_bytes)
                            <= self.shared.options.group_result_bytes_max;
                    if !dispatch::group_fits(1, cost) {
                        self.shared.counters.error(ErrorKind::TooLarge);
                        let reply = Reply::error(format!(
                            "command of {} bytes exceeds the request limit of {} bytes",
                            operation.len(),
                            dispatch::ENVELOPE_BYTES_MAX
                        ));
                        round
                            .pending
                            .push(Pending::Ready(reply, self.state.protocol));
                    } else if !results_fit
                        || !dispatch::group_fits(round.operations.len() + 1, round.bytes + cost)
                    {
                        // The rest of the pipeline waits for the next round, after these replies.
                        self.carried = Some((operation, result_bytes, shape));
                        break;
                    } else {
                        self.add_operation(&mut round, operation, result_bytes, shape);
                    }
                }
            }
        }
        round
    }

    fn add_operation(
        &self,
        round: &mut Round,
        operation: Vec<u8>,
        result_bytes: usize,
        shape: Shape,
    ) {
        round.bytes += dispatch::operation_cost(&operation);
        round.result_bytes = round.result_bytes.saturating_add(result_bytes);
        round.pending.push(Pending::Replicated(
            round.operations.len(),
            shape,
            self.state.protocol,
        ));
        round.operations.push(operation);
    }

    /// Orders the round's operations and encodes every reply, in request order.
    async fn execute(&self, operations: Vec<Vec<u8>>, pending: &[Pending], output: &mut Vec<u8>) {
        let expected = operations.len();
        let results = if operations.is_empty() {
            Ok(Vec::new())
        } else {
            self.shared.dispatcher.execute(operations).await
        };
        let results = match results {
            Ok(results) if results.len() == expected => Ok(results),
            Ok(results) => Err(format!(
                "the cluster answered {} results for {expected} commands",
                results.len()
            )),
            Err(reason) => Err(reason),
        };
        for item in pending {
            match item {
                Pending::Ready(reply, protocol) => reply.encode(*protocol, output),
                Pending::Replicated(index, shape, protocol) => {
                    let reply = match &results {
                        Ok(results) if results[*index] == dispatch::ENVELOPE_CUT_RESULT => {
                            self.shared.counters.error(ErrorKind::BadResult);
                            Reply::error(
                                "this command executed, but the results of the commands sent with \
                             it passed the reply limit, so its result was dropped",
                            )
                        }
                        Ok(results) => match Response::decode(&results[*index]) {
                            Ok(response) => commands::shape_reply(*shape, response),
                            Err(error) => {
                                self.shared.counters.error(ErrorKind::BadResult);
                                Reply::error(format!("malformed result from the cluster: {error}"))
                            }
                        },
                        // Without f+1 matching replies the outcome is unknown, and the client
                        // must be told so rather than assume either.
                        Err(reason) => {
                            self.shared.counters.error(ErrorKind::Unconfirmed);
                            Reply::error(format!(
                                "not confirmed by f+1 replicas (the command may or may not have \
                             executed): {reason}"
                            ))
                        }
                    };
                    reply.encode(*protocol, output);
                }
            }
        }
    }
}
