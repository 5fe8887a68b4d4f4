//! The TCP server: accepts Redis connections and runs each one's read–execute–reply loop.
//!
//! A connection decodes every complete request it has received, up to one envelope's worth,
//! answers connection commands itself, sends the key-value commands as one group through the
//! [`Dispatcher`], and writes all the replies in request order before reading on. While a group
//! is in flight the connection does not read, so a fast pipelining client is held back by TCP
//! flow control, not by gateway memory.

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
use tessera_client::Client;
use tessera_kv::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Bytes a connection asks the socket for at once.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Input read and dropped after a connection's last reply, at most (see `Connection::close`).
const CLOSE_DRAIN_BYTES_MAX: usize = 1 << 20;
const CLOSE_DRAIN_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// 16 GETs is one group; longer ones are split into several, in order.
    pub group_result_bytes_max: usize,
    /// Bounds of the RESP decoder.
    pub limits: RespLimits,
}

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            connections_max: 1024,
            lanes: 2,
            queued_groups_max: 4096,
            pipeline_commands_max: 256,
            group_result_bytes_max: 16 << 20,
            limits: RespLimits::default(),
        }
    }
}

impl GatewayOptions {
    /// Checks every bound; the error names the option and its range.
    pub fn validate(&self) -> Result<(), String> {
        let bounds = [
            ("connections_max", self.connections_max, 1, 1 << 20),
            ("lanes", self.lanes, 1, 1024),
            ("queued_groups_max", self.queued_groups_max, 1, 1 << 20),
            (
                "pipeline_commands_max",
                self.pipeline_commands_max,
                1,
                tessera_core::envelope::ENVELOPE_OPERATIONS_MAX,
            ),
            (
                "group_result_bytes_max",
                self.group_result_bytes_max,
                1 << 20,
                1 << 30,
            ),
        ];
        for (name, value, minimum, maximum) in bounds {
            if !(minimum..=maximum).contains(&value) {
                return Err(format!(
                    "gateway option {name} is {value}; it must be between {minimum} and {maximum}"
                ));
            }
        }
        Ok(())
    }
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
}

impl ErrorKind {
    const ALL: [ErrorKind; 4] = [
        ErrorKind::Protocol,
        ErrorKind::TooLarge,
        ErrorKind::Unconfirmed,
        ErrorKind::BadResult,
    ];

    fn name(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unconfirmed => "unconfirmed",
            ErrorKind::BadResult => "bad_result",
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
            tokio::spawn(async move {
                if let Err(error) = accept(stream, peer, shared).await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }
    }
}

async fn accept(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let Ok(_permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
        GatewayCounters::add(&shared.counters.connections_refused);
        let mut out = Vec::new();
        Reply::error("max number of clients reached").encode(Protocol::Resp2, &mut out);
        stream.write_all(&out).await?;
        return Ok(());
    };
    GatewayCounters::add(&shared.counters.connections_accepted);
    stream.set_nodelay(true)?;
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
    close: bool,
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

impl Connection<'_> {
    async fn serve(mut self) -> std::io::Result<()> {
        let mut output = Vec::new();
        loop {
            let round = self.collect();
            if round.pending.is_empty() {
                self.input.reserve(READ_CHUNK_BYTES);
                if self.stream.read_buf(&mut self.input).await? == 0 {
                    return Ok(());
                }
                continue;
            }
            output.clear();
            self.execute(round.operations, &round.pending, &mut output)
                .await;
            self.stream.write_all(&output).await?;
            if round.close {
                return self.close().await;
            }
        }
    }

    /// Ends the connection after its last reply. Closing a socket that still has unread input
    /// makes the kernel send a reset, which can destroy the replies still in flight (the error
    /// that explains the close, or QUIT's OK); so the write side is shut first and what the
    /// client still sends is read and dropped, for a bounded time and number of bytes.
    async fn close(mut self) -> std::io::Result<()> {
        self.stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        let drain = async {
            while drained < CLOSE_DRAIN_BYTES_MAX {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => drained += read,
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_DRAIN_TIME_MAX, drain).await;
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
                    round.close = true;
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
                    round.close = true;
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
