//! Prometheus metrics of a replica, and the small HTTP endpoint that serves them.
//!
//! The metrics use `prometheus-client` (the Prometheus project's Rust client): it only keeps
//! values and encodes them in the OpenMetrics text format, and brings no HTTP stack, runtime or
//! global registry. The endpoint is written here on the node's tokio runtime instead, because an
//! exporter with its own HTTP server would be one more unbounded network surface: this one
//! reads at most [`HTTP_REQUEST_BYTES_MAX`] bytes per request, serves at most
//! [`HTTP_CONNECTIONS_MAX`] connections at once, gives each [`HTTP_CONNECTION_TIME_MAX`], and
//! answers only `GET /metrics`.
//!
//! Values come from three places, none of which changes what the protocol does: the core
//! thread observes the core after each turn through its getters (view, checkpoint, state
//! transfer) and the actions it carries out (executed batches, partition replies);
//! [`MeteredUsig`] times the USIG calls the core makes; and [`NodeCounters`] (drops, frames,
//! queue depths) is read at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_types::wire::ReplicaStatus;
use tessera_types::{Digest, ReplicaId, ReplicaMessage, Ui};
use tessera_usig::{Usig, UsigError, UsigIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::counters::NodeCounters;

/// Largest HTTP request head accepted; a scrape request is a few hundred bytes.
pub const HTTP_REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Scrape connections served at once; more are closed without an answer.
pub const HTTP_CONNECTIONS_MAX: usize = 8;
/// Time one scrape connection may take from accept to the last byte written.
pub const HTTP_CONNECTION_TIME_MAX: Duration = Duration::from_secs(5);
/// The content type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ReasonLabel = [(&'static str, &'static str); 1];
type PeerLabel = [(&'static str, String); 1];

/// Metrics a replica's core thread and USIG update.
pub struct ReplicaMetrics {
    registry: Registry,
    requests_executed: Counter,
    batches_executed: Counter,
    batch_requests: Histogram,
    view: Gauge,
    view_changing: Gauge,
    view_changes_started: Counter,
    view_changes_completed: Counter,
    primary: Gauge,
    last_executed: Gauge,
    stable_checkpoint: Gauge,
    checkpoints_stable: Counter,
    pending_requests: Gauge,
    usig_counter: Gauge,
    usig_create_ui_seconds: Histogram,
    usig_verify_ui_seconds: Histogram,
    usig_failures: Family<ReasonLabel, Counter>,
    state_transfer_active: Gauge,
    state_transfers_started: Counter,
    state_transfers_ended: Counter,
    partition_replies_received: Counter,
    partition_bytes_received: Counter,
    partition_replies_sent: Counter,
    partition_bytes_sent: Counter,
    rejections: Family<ReasonLabel, Counter>,
    peer_queue_frames: Family<PeerLabel, Gauge>,
}

impl ReplicaMetrics {
    /// Metrics of `replica`, with the node's counters read at scrape time.
    pub fn new(replica: ReplicaId, counters: Arc<NodeCounters>) -> ReplicaMetrics {
        let labels = [(
            std::borrow::Cow::Borrowed("replica"),
            std::borrow::Cow::Owned(replica.0.to_string()),
        )];
        let mut metrics = ReplicaMetrics {
            registry: Registry::with_labels(labels.into_iter()),
            requests_executed: Counter::default(),
            batches_executed: Counter::default(),
            // 1, 2, 4, ... 4096 requests: the configured batch limit is at most a few thousand.
            batch_requests: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            view: Gauge::default(),
            view_changing: Gauge::default(),
            view_changes_started: Counter::default(),
            view_changes_completed: Counter::default(),
            primary: Gauge::default(),
            last_executed: Gauge::default(),
            stable_checkpoint: Gauge::default(),
            checkpoints_stable: Counter::default(),
            pending_requests: Gauge::default(),
            usig_counter: Gauge::default(),
            // 1 µs (HMAC in process) to about 0.26 s (a slow TPM), in steps of 4.
            usig_create_ui_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 10)),
            usig_verify_ui_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 10)),
            usig_failures: Family::default(),
            state_transfer_active: Gauge::default(),
            state_transfers_started: Counter::default(),
            state_transfers_ended: Counter::default(),
            partition_replies_received: Counter::default(),
            partition_bytes_received: Counter::default(),
            partition_replies_sent: Counter::default(),
            partition_bytes_sent: Counter::default(),
            rejections: Family::default(),
            peer_queue_frames: Family::default(),
        };
        metrics.register(counters);
        metrics
    }

    fn register(&mut self, counters: Arc<NodeCounters>) {
        let registry = &mut self.registry;
        registry.register(
            "tessera_requests_executed",
            "Client requests executed by this replica (duplicates answered from the cache excluded)",
            self.requests_executed.clone(),
        );
        registry.register(
            "tessera_batches_executed",
            "Batches (PREPAREd sequence numbers) executed",
            self.batches_executed.clone(),
        );
        registry.register(
            "tessera_batch_requests",
            "Requests per executed batch",
            self.batch_requests.clone(),
        );
        registry.register(
            "tessera_view",
            "Current view (the target view during a view change)",
            self.view.clone(),
        );
        registry.register(
            "tessera_view_changing",
            "1 while a view change is in progress, else 0",
            self.view_changing.clone(),
        );
        registry.register(
            "tessera_view_changes_started",
            "View changes this replica entered",
            self.view_changes_started.clone(),
        );
        registry.register(
            "tessera_view_changes_completed",
            "View changes that ended with an accepted NEW-VIEW",
            self.view_changes_completed.clone(),
        );
        registry.register(
            "tessera_primary",
            "Primary of the current view",
            self.primary.clone(),
        );
        registry.register(
            "tessera_last_executed_seq",
            "Last executed sequence number",
            self.last_executed.clone(),
        );
        registry.register(
            "tessera_stable_checkpoint_seq",
            "Sequence number of the latest stable checkpoint",
            self.stable_checkpoint.clone(),
        );
        registry.register(
            "tessera_checkpoints_stable",
            "Times the stable checkpoint advanced",
            self.checkpoints_stable.clone(),
        );
        registry.register(
            "tessera_pending_requests",
            "Requests waiting for a sequence number (primary)",
            self.pending_requests.clone(),
        );
        registry.register(
            "tessera_usig_counter",
            "Highest USIG counter value this replica used",
            self.usig_counter.clone(),
        );
        registry.register(
            "tessera_usig_create_ui_seconds",
            "Time of one USIG create_ui call, as seen by the replica",
            self.usig_create_ui_seconds.clone(),
        );
        registry.register(
            "tessera_usig_verify_ui_seconds",
            "Time of one USIG verify_ui call, as seen by the replica",
            self.usig_verify_ui_seconds.clone(),
        );
        registry.register(
            "tessera_usig_failures",
            "USIG calls that returned an error, by operation",
            self.usig_failures.clone(),
        );
        registry.register(
            "tessera_state_transfer_active",
            "1 while a state transfer is in progress, else 0",
            self.state_transfer_active.clone(),
        );
        registry.register(
            "tessera_state_transfers_started",
            "State transfers this replica started",
            self.state_transfers_started.clone(),
        );
        registry.register(
            "tessera_state_transfers_ended",
            "State transfers that ended: installed, refused, or dropped because the replica caught up by itself",
            self.state_transfers_ended.clone(),
        );
        registry.register(
            "tessera_state_transfer_partition_replies_received",
            "PARTITION-REPLY messages received (chunks of partitions fetched)",
            self.partition_replies_received.clone(),
        );
        registry.register(
            "tessera_state_transfer_received_bytes",
            "Chunk bytes received in PARTITION-REPLY messages",
            self.partition_bytes_received.clone(),
        );
        registry.register(
            "tessera_state_transfer_partition_replies_sent",
            "PARTITION-REPLY messages sent to replicas fetching state",
            self.partition_replies_sent.clone(),
        );
        registry.register(
            "tessera_state_transfer_sent_bytes",
            "Chunk bytes sent in PARTITION-REPLY messages (once per destination)",
            self.partition_bytes_sent.clone(),
        );
        registry.register(
            "tessera_rejected_messages",
            "Messages the protocol core rejected, by reason",
            self.rejections.clone(),
        );
        registry.register(
            "tessera_peer_queue_frames",
            "Frames waiting in the outgoing queue to each peer",
            self.peer_queue_frames.clone(),
        );
        registry.register_collector(Box::new(NodeCountersCollector(counters)));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Wraps `usig` so its calls are timed into these metrics.
    pub fn metered_usig(self: &Arc<Self>, usig: Box<dyn Usig>) -> Box<dyn Usig> {
        Box::new(MeteredUsig {
            inner: usig,
            metrics: self.clone(),
        })
    }

    /// Records one executed batch.
    pub fn batch_executed(&self, batch_requests: usize, executed_requests: usize) {
        self.batches_executed.inc();
        self.batch_requests.observe(batch_requests as f64);
        self.requests_executed.inc_by(executed_requests as u64);
    }

    /// Records an incoming message (only partition replies are counted).
    pub fn message_received(&self, message: &ReplicaMessage) {
        if let ReplicaMessage::PartitionReply(reply) = message {
            self.partition_replies_received.inc();
            let bytes = reply.chunk.as_ref().map_or(0, |chunk| chunk.bytes.len());
            self.partition_bytes_received.inc_by(bytes as u64);
        }
    }

    /// Records an outgoing message sent to `destinations` replicas.
    pub fn message_sent(&self, message: &ReplicaMessage, destinations: u64) {
        if let ReplicaMessage::PartitionReply(reply) = message {
            self.partition_replies_sent.inc_by(destinations);
            let bytes = reply.chunk.as_ref().map_or(0, |chunk| chunk.bytes.len());
            self.partition_bytes_sent
                .inc_by((bytes as u64).saturating_mul(destinations));
        }
    }

    /// Sets the gauges from a published status.
    pub fn status(&self, status: &ReplicaStatus) {
        self.primary.set(i64::from(status.primary.0));
        self.pending_requests
            .set(gauge_value(status.pending_requests));
        self.usig_counter.set(gauge_value(status.usig_counter));
    }

    /// Sets the depth of each peer's outgoing queue.
    pub fn peer_queues(&self, depths: &[(ReplicaId, usize)]) {
        for (peer, frames) in depths {
            self.peer_queue_frames
                .get_or_create(&[("peer", peer.0.to_string())])
                .set(gauge_value(*frames as u64));
        }
    }
}

fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in the metric set.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        warn!(%error, "cannot encode the metrics");
    }
    text
}

/// What the core thread last saw of the core, to turn its state into event counters.
#[derive(Default)]
pub struct CoreObservation {
    started: bool,
    view: u64,
    view_changing: bool,
    stable_checkpoint: u64,
    transferring: bool,
    rejections: BTreeMap<&'static str, u64>,
}

/// The core's state at the end of one turn, read through its getters.
pub struct CoreSnapshot<'a> {
    /// `Replica::view`.
    pub view: u64,
    /// `Replica::is_view_changing`.
    pub view_changing: bool,
    /// `Replica::stable_checkpoint().seq`.
    pub stable_checkpoint: u64,
    /// `Replica::last_executed`.
    pub last_executed: u64,
    /// `Replica::is_transferring_state`.
    pub transferring: bool,
    /// `Replica::rejections`.
    pub rejections: &'a BTreeMap<&'static str, u64>,
}

impl CoreObservation {
    /// Counts what changed since the previous snapshot. A turn handles many events, so a view
    /// change can begin and end within one (VIEW-CHANGEs and the NEW-VIEW drained together):
    /// a higher view counts as started (and, when no longer changing, completed) even if the
    /// changing state was never seen. A state transfer cannot: it waits for PARTITION-REPLYs
    /// that its own requests, sent at the end of the turn, ask for.
    pub fn observe(&mut self, metrics: &ReplicaMetrics, snapshot: CoreSnapshot<'_>) {
        if self.started {
            let higher_view = snapshot.view > self.view;
            let started = if snapshot.view_changing {
                // Entered, or a new attempt (a higher target view) while still changing.
                !self.view_changing || higher_view
            } else {
                // Begun and finished within the turn.
                !self.view_changing && higher_view
            };
            if started {
                metrics.view_changes_started.inc();
            }
            if !snapshot.view_changing && (self.view_changing || higher_view) {
                metrics.view_changes_completed.inc();
            }
            if snapshot.stable_checkpoint > self.stable_checkpoint {
                metrics.checkpoints_stable.inc();
            }
            if snapshot.transferring && !self.transferring {
                metrics.state_transfers_started.inc();
            }
            if !snapshot.transferring && self.transferring {
                metrics.state_transfers_ended.inc();
            }
        }
        metrics.view.set(gauge_value(snapshot.view));
        metrics
            .last_executed
            .set(gauge_value(snapshot.last_executed));
        metrics.view_changing.set(i64::from(snapshot.view_changing));
        metrics
            .stable_checkpoint
            .set(gauge_value(snapshot.stable_checkpoint));
        metrics
            .state_transfer_active
            .set(i64::from(snapshot.transferring));
        for (reason, count) in snapshot.rejections {
            let before = self.rejections.get(reason).copied().unwrap_or(0);
            if *count > before {
                metrics
                    .rejections
                    .get_or_create(&[("reason", reason)])
                    .inc_by(count - before);
            }
        }
        if snapshot.rejections.len() != self.rejections.len()
            || snapshot
                .rejections
                .iter()
                .any(|(reason, count)| self.rejections.get(reason) != Some(count))
        {
            self.rejections = snapshot.rejections.clone();
        }
        self.started = true;
        self.view = snapshot.view;
        self.view_changing = snapshot.view_changing;
        self.stable_checkpoint = snapshot.stable_checkpoint;
        self.transferring = snapshot.transferring;
    }
}

/// A USIG that times every call of the one it wraps; answers are passed through unchanged.
struct MeteredUsig {
    inner: Box<dyn Usig>,
    metrics: Arc<ReplicaMetrics>,
}

impl Usig for MeteredUsig {
    fn identity(&self) -> UsigIdentity {
        self.inner.identity()
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let started = Instant::now();
        let result = self.inner.create_ui(message);
        self.metrics
            .usig_create_ui_seconds
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics
                .usig_failures
                .get_or_create(&[("operation", "create_ui")])
                .inc();
        }
        result
    }

    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        self.start_epoch_at_least(0)
    }

    fn start_epoch_at_least(&mut self, at_least: u64) -> Result<u64, UsigError> {
        let result = self.inner.start_epoch_at_least(at_least);
        if result.is_err() {
            self.metrics
                .usig_failures
                .get_or_create(&[("operation", "start_epoch")])
                .inc();
        }
        result
    }

    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        let started = Instant::now();
        let result = self.inner.verify_ui(signer, message, ui);
        self.metrics
            .usig_verify_ui_seconds
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics
                .usig_failures
                .get_or_create(&[("operation", "verify_ui")])
                .inc();
        }
        result
    }
}

/// Reads [`NodeCounters`] at scrape time (they are plain atomics updated by the network tasks).
#[derive(Debug)]
struct NodeCountersCollector(Arc<NodeCounters>);

impl Collector for NodeCountersCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = &self.0;
        let totals = [
            (
                "tessera_peer_frames_received",
                "Authenticated frames received from peers",
                counters.peer_frames_received_total(),
            ),
            (
                "tessera_peer_frames_sent",
                "Frames written to peers",
                counters.peer_frames_sent_total(),
            ),
            (
                "tessera_client_requests_received",
                "Requests received on the client port",
                counters.client_requests_received_total(),
            ),
            (
                "tessera_replies_sent",
                "Replies written to clients",
                counters.replies_sent_total(),
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
        let depth = ConstGauge::new(gauge_value(counters.core_inbox_events()));
        depth.encode(encoder.encode_descriptor(
            "tessera_core_inbox_events",
            "Events waiting in the core thread's inbox",
            None,
            depth.metric_type(),
        )?)?;
        let mut drops = encoder.encode_descriptor(
            "tessera_dropped",
            "Frames, messages and requests the node dropped or refused, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, count) in counters.drop_snapshot() {
            let labels = [("reason", reason)];
            ConstCounter::new(count).encode(drops.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Something that renders metrics text for the endpoint.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `address` for the metrics endpoint.
pub async fn bind_metrics(address: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `GET /metrics` on `listener` forever (until the task is aborted).
pub async fn serve_metrics(listener: TcpListener, render: RenderMetrics) {
    let permits = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors and the like: the listener itself is fine.
                debug!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Refused by closing: a scraper retries at its next interval.
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(HTTP_CONNECTION_TIME_MAX, answer(stream, render)).await;
        });
    }
}

/// The response to one request head, or `None` while the head is incomplete.
fn respond(head: &[u8], render: &RenderMetrics) -> Option<(&'static str, &'static str, String)> {
    let end = head.windows(4).position(|window| window == b"\r\n\r\n")?;
    let request_line = head[..end].split(|byte| *byte == b'\r').next()?;
    let text = std::str::from_utf8(request_line).unwrap_or("");
    let mut parts = text.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let answer = match (method, target, version, parts.next()) {
        (Some("GET"), Some("/metrics"), Some(version), None) if version.starts_with("HTTP/1.") => {
            ("200 OK", CONTENT_TYPE, render())
        }
        (Some(_), Some(_), Some(version), None) if version.starts_with("HTTP/1.") => {
            if method == Some("GET") {
                (
                    "404 Not Found",
                    "text/plain",
                    "metrics are at /metrics\n".into(),
                )
            } else {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET is served\n".into(),
                )
            }
        }
        _ => (
            "400 Bad Request",
            "text/plain",
            "not an HTTP/1 request\n".into(),
        ),
    };
    Some(answer)
}

async fn answer(mut stream: TcpStream, render: RenderMetrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let (status, content_type, body) = loop {
        if let Some(response) = respond(&head, &render) {
            break response;
        }
        if head.len() >= HTTP_REQUEST_BYTES_MAX {
            break (
                "431 Request Header Fields Too Large",
                "text/plain",
                format!("requests are limited to {HTTP_REQUEST_BYTES_MAX} bytes\n"),
            );
        }
        let room = (HTTP_REQUEST_BYTES_MAX - head.len()).min(buffer.len());
        let read = stream.read(&mut buffer[..room]).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> RenderMetrics {
        Arc::new(|| "body\n".to_string())
    }

    #[test]
    fn only_get_metrics_is_served() {
        let render = fixed();
        assert!(respond(b"GET /metrics HTTP/1.1\r\nHost: x", &render).is_none());
        let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &render).unwrap();
        assert_eq!((ok.0, ok.2.as_str()), ("200 OK", "body\n"));
        let missing = respond(b"GET / HTTP/1.0\r\n\r\n", &render).unwrap();
        assert_eq!(missing.0, "404 Not Found");
        let post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", &render).unwrap();
        assert_eq!(post.0, "405 Method Not Allowed");
        let junk = respond(b"\x16\x03\x01 hello\r\n\r\n", &render).unwrap();
        assert_eq!(junk.0, "400 Bad Request");
    }

    #[tokio::test]
    async fn oversized_requests_and_extra_connections_are_bounded() {
        let listener = bind_metrics("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(listener, fixed()));
        // A request head that never ends is cut at the limit and answered 431.
        let mut stream = TcpStream::connect(address).await.unwrap();
        let junk = vec![b'a'; HTTP_REQUEST_BYTES_MAX * 2];
        let _ = stream.write_all(&junk).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        // Connections beyond the limit are closed at once; a normal scrape still works after.
        let mut idle = Vec::new();
        for _ in 0..HTTP_CONNECTIONS_MAX {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut extra = TcpStream::connect(address).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut byte))
            .await
            .expect("the extra connection is closed, not left waiting");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut scrape = TcpStream::connect(address).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        scrape.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nbody\n"), "{answer}");
        server.abort();
    }

    #[test]
    fn observation_turns_core_state_into_events() {
        let metrics = ReplicaMetrics::new(ReplicaId(1), Arc::new(NodeCounters::default()));
        let mut observation = CoreObservation::default();
        let mut rejections = BTreeMap::new();
        let mut step = |view, changing, stable, transferring, rejections: &BTreeMap<_, _>| {
            observation.observe(
                &metrics,
                CoreSnapshot {
                    view,
                    view_changing: changing,
                    stable_checkpoint: stable,
                    last_executed: stable,
                    transferring,
                    rejections,
                },
            )
        };
        step(0, false, 0, false, &rejections);
        step(1, true, 0, false, &rejections);
        rejections.insert("bad-ui", 2);
        step(1, false, 8, true, &rejections);
        rejections.insert("bad-ui", 5);
        step(1, false, 16, false, &rejections);
        // Into view 3 through 2 while changing (two starts), then view 4 begun and finished
        // within one turn (one start, one completion).
        step(2, true, 16, false, &rejections);
        step(3, true, 16, false, &rejections);
        step(3, false, 16, false, &rejections);
        step(4, false, 16, false, &rejections);
        metrics.batch_executed(4, 3);
        let text = metrics.render();
        for line in [
            "tessera_view_changes_started_total{replica=\"1\"} 4",
            "tessera_view_changes_completed_total{replica=\"1\"} 3",
            "tessera_checkpoints_stable_total{replica=\"1\"} 2",
            "tessera_state_transfers_started_total{replica=\"1\"} 1",
            "tessera_state_transfers_ended_total{replica=\"1\"} 1",
            "tessera_rejected_messages_total{replica=\"1\",reason=\"bad-ui\"} 5",
            "tessera_requests_executed_total{replica=\"1\"} 3",
            "tessera_view{replica=\"1\"} 4",
            "tessera_dropped_total{replica=\"1\",reason=\"peer_queue_full\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
