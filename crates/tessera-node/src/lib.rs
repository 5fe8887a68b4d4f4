//! Tessera's tokio driver: runs a replica (or the unreplicated baseline) on real sockets.
//!
//! This crate owns everything with IO and time: replica-to-replica TCP channels with
//! authenticated frames ([`transport`], [`frame`]), the client port ([`client_port`]), the
//! thread that owns and drives the sans-IO protocol core with a monotonic clock and a timer
//! table ([`driver`]), and request authentication with signature checks done in parallel on
//! connection tasks ([`auth`]). It never makes protocol decisions: what to send, when to time
//! out and what to execute are the core's; the driver only carries them out.
//!
//! Threads: one tokio runtime for the network, plus one dedicated OS thread for the core, so
//! the core's latency never depends on how busy the network tasks are. Every queue between
//! them is bounded; overflow is dropped and counted in [`NodeCounters`].

#![forbid(unsafe_code)]

pub mod auth;
pub mod client_port;
pub mod counters;
pub mod driver;
pub mod frame;
pub mod keys;
pub mod metrics;
mod restore;
pub mod routes;
pub mod salvage;
pub mod setup;
pub mod transport;
pub mod unreplicated;
pub mod wal;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tessera_core::Envelope;
use tessera_kv::{KvLimits, KvStore};
use tessera_types::cluster::{
    parse_key, ClusterConfig, ClusterFileError, ReplicaSecrets, StoreConfig, UsigKind,
};
use tessera_types::{ConfigError, ReplicaId};
use tessera_usig::{Ed25519Usig, HmacUsig, Usig, UsigError, UsigIdentity};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

pub use auth::{NodeAuthenticator, VerifiedCache};
pub use counters::{DropReason, NodeCounters};
pub use keys::ClientKeys;

use client_port::{accept_clients, Admission, ClientPort};
use driver::{core_inbox, spawn_core_thread, CoreEvent, CoreInbox, CoreOutputs};
use routes::{ReplyRoutes, StatusBoard};
use transport::{accept_peers, spawn_peer_writers, PeerInboundContext, PeerMesh};

/// How often new drops are logged.
const DROP_REPORT_PERIOD: Duration = Duration::from_secs(10);
/// How long peer writers may flush after the core stops.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// Why a node could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum NodeError {
    /// A cluster or secret file is unusable.
    #[error(transparent)]
    ClusterFile(#[from] ClusterFileError),
    /// An inconsistency between the files, with the fix.
    #[error("{0}")]
    Config(String),
    /// The protocol configuration is invalid.
    #[error(transparent)]
    Protocol(#[from] ConfigError),
    /// The USIG could not be set up.
    #[error("cannot set up the USIG: {0}")]
    Usig(#[from] UsigError),
    /// A listening socket could not be opened.
    #[error(
        "cannot listen on {address} for {purpose}: {source} (is another process using the port?)"
    )]
    Listen {
        /// The configured address.
        address: String,
        /// What the socket is for.
        purpose: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The executor thread could not be started.
    #[error("cannot start the executor thread: {0}")]
    Thread(std::io::Error),
    /// The write-ahead log cannot be read back, replayed or written.
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    /// The replica's snapshot cannot be restored.
    #[error("cannot restore the replica's snapshot: {0}")]
    Snapshot(#[from] tessera_core::minbft::SnapshotError),
    /// The executor thread panicked.
    #[error("the executor thread stopped unexpectedly (panic); see the log above")]
    ExecutorPanicked,
}

/// Log bytes after which a durable replica replaces its log with a snapshot, by default.
pub const SNAPSHOT_AFTER_LOG_BYTES_DEFAULT: u64 = 64 << 20;

/// Where and how a replica keeps itself durable.
#[derive(Clone, Debug)]
pub struct Durability {
    /// The write-ahead log (a snapshot, once taken, heads it).
    pub log: std::path::PathBuf,
    /// The replica takes a snapshot and starts an empty log once its log holds this many bytes
    /// and at least as many as its last snapshot (so snapshots cost at most as much writing as
    /// the log they replace); 0 never.
    pub snapshot_after_log_bytes: u64,
    /// The replica lost its log and starts empty in a new USIG epoch (docs/PROTOCOL.md §8).
    /// Refused if the log is not empty: a replica with a log restarts from it.
    pub new_epoch: bool,
    /// A snapshot keeps the log it replaces beside the new one (`<log>.prev`): the older
    /// checkpoint a restart falls back to when the new snapshot is damaged. Costs the disk a
    /// second copy of the state.
    pub keep_previous_log: bool,
    /// A damaged log is salvaged at start ([`salvage`]): the replica keeps what is valid and
    /// rejoins in a new USIG epoch. Off, it refuses to start instead.
    pub salvage: bool,
}

/// Runs replica `secrets.replica` of `cluster` until `shutdown` completes.
///
/// With `durability`, the replica is durable: it logs every input there before acting on it, and on
/// start replays what the log holds (see [`wal`]). Without, it starts empty every time — which
/// is only safe for a replica whose USIG also starts afresh (a new key or a new counter), never
/// for a restart under an in-process USIG whose key stays the same.
///
/// On shutdown it stops accepting connections, stops the core thread, and gives the peer
/// writers a moment to flush what the core queued last.
pub async fn run_replica(
    cluster: ClusterConfig,
    secrets: ReplicaSecrets,
    durability: Option<Durability>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    cluster.validate()?;
    let me = ReplicaId(secrets.replica);
    if me.0 as usize >= cluster.replicas.len() {
        return Err(NodeError::Config(format!(
            "the secret file is for replica {me} but cluster.toml lists only {} replicas; use a secret file of this cluster",
            cluster.replicas.len()
        )));
    }
    let span = tracing::info_span!("replica", replica = %me);
    async move {
        let counters = Arc::new(NodeCounters::default());
        let clients = Arc::new(ClientKeys::load(&cluster, &secrets)?);
        let cache = Arc::new(VerifiedCache::new(auth::VERIFIED_CACHE_ENTRIES_DEFAULT));
        let metrics = Arc::new(metrics::ReplicaMetrics::new(me, counters.clone()));
        let endpoint = cluster.replica(me);
        let peer_listener = bind(&endpoint.replica_address, "replica traffic").await?;
        let client_listener = bind(&endpoint.client_address, "clients").await?;
        let metrics_listener = if endpoint.metrics_address.is_empty() {
            None
        } else {
            Some(bind(&endpoint.metrics_address, "Prometheus metrics").await?)
        };
        // Rebuilding from the log can take a while (replay re-verifies every message): off
        // the runtime's threads, after the ports are bound (so `tessera up` sees them open;
        // connections wait in the backlog until the replica is rebuilt and serves them).
        let builder = restore::Builder {
            cluster: cluster.clone(),
            secrets: secrets.clone(),
            me,
            metrics: metrics.clone(),
            clients: clients.clone(),
            cache: cache.clone(),
        };
        let build_for = durability.clone();
        // The closure runs on another thread: it enters the replica's span itself, so the
        // replay's and a salvage's log lines name the replica.
        let span = tracing::Span::current();
        let (replica, wal) = tokio::task::spawn_blocking(move || {
            span.in_scope(|| builder.build(build_for.as_ref()))
        })
        .await
        .map_err(|_| NodeError::ExecutorPanicked)??;

        let (inbox, inbox_receiver) =
            core_inbox(driver::CORE_INBOX_EVENTS_DEFAULT, counters.clone());
        let routes = Arc::new(ReplyRoutes::new(
            routes::ROUTES_MAX_DEFAULT,
            counters.clone(),
        ));
        let status = Arc::new(StatusBoard::new(me));
        let mesh = PeerMesh {
            me,
            addresses: cluster
                .replicas
                .iter()
                .map(|replica| replica.replica_address.clone())
                .collect(),
            pairwise_keys: Arc::new(keys::peer_keys(&secrets)?),
        };
        let mut writers = JoinSet::new();
        let peers = spawn_peer_writers(
            &mesh,
            transport::PEER_QUEUE_FRAMES_DEFAULT,
            counters.clone(),
            &mut writers,
        );
        let outputs = CoreOutputs {
            peers,
            replies: routes.clone(),
            status: status.clone(),
            counters: counters.clone(),
            metrics: metrics.clone(),
        };
        let core =
            spawn_core_thread(replica, inbox_receiver, outputs, wal).map_err(NodeError::Thread)?;

        let mut servers = JoinSet::new();
        servers.spawn(report_drops(counters.clone()).in_current_span());
        if let Some(listener) = metrics_listener {
            let render: metrics::RenderMetrics = Arc::new(move || metrics.render());
            servers.spawn(metrics::serve_metrics(listener, render).in_current_span());
        }
        servers.spawn(
            accept_peers(
                peer_listener,
                PeerInboundContext {
                    mesh,
                    inbox: inbox.clone(),
                    counters: counters.clone(),
                    clients: clients.clone(),
                    cache: cache.clone(),
                },
            )
            .in_current_span(),
        );
        servers.spawn(
            accept_clients(
                client_listener,
                Arc::new(ClientPort {
                    replica: me,
                    admission: Admission::Replicated { cache },
                    clients,
                    routes,
                    status,
                    inbox: inbox.clone(),
                    counters: counters.clone(),
                }),
            )
            .in_current_span(),
        );
        info!(
            replica_address = %endpoint.replica_address,
            client_address = %endpoint.client_address,
            metrics_address = %endpoint.metrics_address,
            usig = usig_name(cluster.usig),
            n = cluster.protocol.n,
            f = cluster.protocol.f,
            "replica running"
        );

        let result = serve_until(
            shutdown,
            core,
            |returned| returned.map_err(NodeError::Wal),
            servers,
            inbox,
        )
        .await;
        // The core thread owned the peer queues' senders: its exit closes them, so writers
        // drain what is queued and return. Writers still reconnecting are cut off.
        let flushed = tokio::time::timeout(SHUTDOWN_FLUSH, async {
            while writers.join_next().await.is_some() {}
        })
        .await;
        if flushed.is_err() {
            writers.abort_all();
        }
        log_counters(&counters);
        result
    }
    .instrument(span)
    .await
}

/// Runs the unreplicated baseline on replica 0's client address until `shutdown` completes.
/// `secrets` must be replica 0's: the baseline answers as replica 0.
pub async fn run_unreplicated(
    cluster: ClusterConfig,
    secrets: ReplicaSecrets,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    cluster.validate()?;
    if secrets.replica != 0 {
        return Err(NodeError::Config(format!(
            "the unreplicated baseline answers as replica 0 but was given replica {}'s secrets; pass replica-0.secret.toml",
            secrets.replica
        )));
    }
    let span = tracing::info_span!("unreplicated");
    async move {
        let me = ReplicaId(0);
        let counters = Arc::new(NodeCounters::default());
        let clients = Arc::new(ClientKeys::load(&cluster, &secrets)?);
        let endpoint = cluster.replica(me);
        let client_listener = bind(&endpoint.client_address, "clients").await?;
        let (inbox, inbox_receiver) =
            core_inbox(driver::CORE_INBOX_EVENTS_DEFAULT, counters.clone());
        let routes = Arc::new(ReplyRoutes::new(
            routes::ROUTES_MAX_DEFAULT,
            counters.clone(),
        ));
        let status = Arc::new(StatusBoard::new(me));
        let executor = unreplicated::spawn_unreplicated_executor(
            Envelope::new(key_value_store(&cluster.store)),
            inbox_receiver,
            routes.clone(),
            status.clone(),
            cluster.protocol.client_table_max,
        )
        .map_err(NodeError::Thread)?;
        let mut servers = JoinSet::new();
        servers.spawn(report_drops(counters.clone()).in_current_span());
        servers.spawn(
            accept_clients(
                client_listener,
                Arc::new(ClientPort {
                    replica: me,
                    admission: Admission::Unreplicated,
                    clients,
                    routes,
                    status,
                    inbox: inbox.clone(),
                    counters: counters.clone(),
                }),
            )
            .in_current_span(),
        );
        info!(client_address = %endpoint.client_address, "unreplicated baseline running");
        let result = serve_until(shutdown, executor, Ok, servers, inbox).await;
        log_counters(&counters);
        result
    }
    .instrument(span)
    .await
}

/// Who may use the log at `path`: this replica, under this cluster's keys and parameters.
fn wal_owner(
    path: &std::path::Path,
    cluster: &ClusterConfig,
    secrets: &ReplicaSecrets,
    me: ReplicaId,
) -> Result<wal::WalOwner, NodeError> {
    if !matches!(cluster.usig, UsigKind::Hmac | UsigKind::Ed25519) {
        // Replay re-creates every USIG certificate the replica made, which only an in-process
        // USIG whose counter restarts with the replica can do. A usigd or TPM counter never
        // goes back, so the replayed replica would certify under new counter values.
        return Err(NodeError::Config(format!(
            "a write-ahead log ({}) needs the hmac or ed25519 USIG; this cluster uses {}, whose \
             counter survives restarts and cannot re-certify the log's messages; run the replica \
             without a log",
            path.display(),
            usig_name(cluster.usig)
        )));
    }
    // What replay depends on: the protocol parameters (timeouts and windows steer the core),
    // the USIG and client keys (every certificate and signature is verified again). Addresses
    // are left out, so a replica can move to another host and keep its log.
    let mut fingerprint = tessera_crypto::DigestBuilder::new("tessera.node.wal-owner.v1");
    fingerprint
        .bytes(&tessera_types::encode(&cluster.protocol))
        .bytes(usig_name(cluster.usig).as_bytes())
        .bytes(secrets.usig_secret.as_bytes());
    for replica in &cluster.replicas {
        fingerprint.bytes(replica.usig_public_key.as_bytes());
    }
    for client in &cluster.clients {
        fingerprint.bytes(client.public_key.as_bytes());
    }
    for key in &secrets.usig_hmac_keys {
        fingerprint.bytes(key.as_bytes());
    }
    for client in &secrets.client_keys {
        fingerprint.bytes(client.key.as_bytes());
    }
    Ok(wal::WalOwner {
        replica: me,
        fingerprint: fingerprint.finish(),
    })
}

/// Serves until `shutdown` or until the executor thread ends; `outcome` turns what the thread
/// returned into the node's result.
async fn serve_until<T: Send + 'static>(
    shutdown: impl Future<Output = ()>,
    executor: std::thread::JoinHandle<T>,
    outcome: fn(T) -> Result<(), NodeError>,
    mut servers: JoinSet<()>,
    inbox: CoreInbox,
) -> Result<(), NodeError> {
    let mut executor = tokio::task::spawn_blocking(move || executor.join());
    tokio::pin!(shutdown);
    let result = tokio::select! {
        () = &mut shutdown => {
            info!("shutting down");
            servers.abort_all();
            // The executor drains the events queued before `Stop`, then exits.
            let _ = inbox.submit(CoreEvent::Stop).await;
            drop(inbox);
            executor_result((&mut executor).await, outcome)
        }
        joined = &mut executor => {
            servers.abort_all();
            executor_result(joined, outcome)
        }
    };
    // Connection tasks live inside the accept tasks' sets, so aborting the accept tasks ends
    // them too; wait for that to finish.
    while servers.join_next().await.is_some() {}
    result
}

fn executor_result<T>(
    joined: Result<std::thread::Result<T>, tokio::task::JoinError>,
    outcome: fn(T) -> Result<(), NodeError>,
) -> Result<(), NodeError> {
    match joined {
        Ok(Ok(returned)) => outcome(returned),
        _ => Err(NodeError::ExecutorPanicked),
    }
}

async fn bind(address: &str, purpose: &'static str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| NodeError::Listen {
            address: address.to_string(),
            purpose,
            source,
        })
}

/// Builds the USIG the cluster configures, from this replica's secrets.
pub fn build_usig(
    cluster: &ClusterConfig,
    secrets: &ReplicaSecrets,
    me: ReplicaId,
) -> Result<Box<dyn Usig>, NodeError> {
    build_usig_at(cluster, secrets, me, 0, 0)
}

/// The USIG for a replica that starts empty, and whether it already certified messages: a
/// `usigd` daemon whose counter is past 0 in its epoch, or a TPM whose counter moved past its
/// enrolment. The in-process USIGs cannot tell (a fresh instance of a key knows nothing of
/// earlier ones), so for them this is always false: such a replica must start from its log.
pub fn build_fresh_usig(
    cluster: &ClusterConfig,
    secrets: &ReplicaSecrets,
    me: ReplicaId,
) -> Result<(Box<dyn Usig>, bool), NodeError> {
    match cluster.usig {
        UsigKind::Usigd => {
            let public_keys = usig_public_keys(cluster)?;
            let socket = std::path::Path::new(&secrets.usig_endpoint);
            let identity = UsigIdentity {
                replica: me,
                epoch: 0,
            };
            let mut client = tessera_usigd::UsigdClient::connect(socket, identity, public_keys)?;
            let spoke = client.last_counter()? > 0;
            Ok((Box::new(client), spoke))
        }
        UsigKind::Tpm => {
            let mut usig = build_tpm_usig(cluster, secrets, me)?;
            let spoke = usig.pending_gap()? > 0;
            Ok((Box::new(usig), spoke))
        }
        UsigKind::Hmac | UsigKind::Ed25519 => Ok((build_usig(cluster, secrets, me)?, false)),
    }
}

/// Like [`build_usig`], continuing after `last_counter` values (for a replica restored from a
/// snapshot of itself). Only the in-process USIGs can be told where to continue; an external
/// one continues from its own durable counter, so `last_counter` must then be 0.
pub fn build_usig_at(
    cluster: &ClusterConfig,
    secrets: &ReplicaSecrets,
    me: ReplicaId,
    epoch: u64,
    last_counter: u64,
) -> Result<Box<dyn Usig>, NodeError> {
    const FILE: &str = "replica secret file";
    // Built at epoch 0: an in-process USIG is rebuilt to replay the log exactly; a usigd
    // client takes its daemon's epoch; a replica whose external USIG already spoke moves to a
    // new epoch once built (`build_fresh_usig`, docs/PROTOCOL.md §8).
    let identity = UsigIdentity { replica: me, epoch };
    match cluster.usig {
        UsigKind::Hmac => {
            let secret = parse_key(FILE, "usig_secret", &secrets.usig_secret)?;
            let keys = secrets
                .usig_hmac_keys
                .iter()
                .enumerate()
                .map(|(index, text)| parse_key(FILE, &format!("usig_hmac_keys[{index}]"), text))
                .collect::<Result<Vec<_>, _>>()?;
            if keys.get(me.0 as usize) != Some(&secret) {
                return Err(NodeError::Config(format!(
                    "{FILE}: `usig_secret` differs from `usig_hmac_keys[{me}]`; regenerate with `tessera init --force`"
                )));
            }
            Ok(Box::new(HmacUsig::resume(identity, keys, last_counter)?))
        }
        UsigKind::Ed25519 => {
            let secret = parse_key(FILE, "usig_secret", &secrets.usig_secret)?;
            let public_keys = usig_public_keys(cluster)?;
            Ok(Box::new(Ed25519Usig::resume(
                identity,
                secret,
                public_keys,
                last_counter,
            )?))
        }
        UsigKind::Usigd | UsigKind::Tpm if last_counter != 0 || epoch != 0 => {
            Err(NodeError::Config(
                "an external USIG continues from its own counter and cannot be resumed from a \
             snapshot"
                    .into(),
            ))
        }
        UsigKind::Usigd => {
            let public_keys = usig_public_keys(cluster)?;
            let socket = std::path::Path::new(&secrets.usig_endpoint);
            Ok(Box::new(tessera_usigd::UsigdClient::connect(
                socket,
                identity,
                public_keys,
            )?))
        }
        UsigKind::Tpm => Ok(Box::new(build_tpm_usig(cluster, secrets, me)?)),
    }
}

/// The TPM USIG of replica `me`, connected.
fn build_tpm_usig(
    cluster: &ClusterConfig,
    secrets: &ReplicaSecrets,
    me: ReplicaId,
) -> Result<tessera_tpm::TpmUsig, NodeError> {
    const FILE: &str = "replica secret file";
    let identity = UsigIdentity {
        replica: me,
        epoch: 0,
    };
    let enrollments = cluster
        .replicas
        .iter()
        .enumerate()
        .map(|(index, replica)| {
            tessera_usig::TpmEnrollment::parse_text(&replica.usig_public_key).map_err(|problem| {
                NodeError::Config(format!(
                    "cluster.toml: replicas[{index}].usig_public_key is not a TPM enrolment \
                     ({problem}); run `tessera usig provision` on that replica's host and paste \
                     the line it prints"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let location: tessera_tpm::TpmLocation = secrets
        .usig_endpoint
        .parse()
        .map_err(|problem| NodeError::Config(format!("{FILE}: `usig_endpoint`: {problem}")))?;
    let mut usig = tessera_tpm::TpmUsig::new(identity, location, enrollments)?;
    usig.connect()?;
    Ok(usig)
}

fn usig_public_keys(cluster: &ClusterConfig) -> Result<Vec<[u8; 32]>, NodeError> {
    cluster
        .replicas
        .iter()
        .enumerate()
        .map(|(index, replica)| {
            parse_key(
                "cluster.toml",
                &format!("replicas[{index}].usig_public_key"),
                &replica.usig_public_key,
            )
            .map_err(NodeError::from)
        })
        .collect()
}

/// The name `cluster.toml` uses for a USIG backend.
pub fn usig_name(kind: UsigKind) -> &'static str {
    match kind {
        UsigKind::Hmac => "hmac",
        UsigKind::Ed25519 => "ed25519",
        UsigKind::Usigd => "usigd",
        UsigKind::Tpm => "tpm",
    }
}

/// Logs, every [`DROP_REPORT_PERIOD`], what was dropped since the previous report (if anything),
/// so overload and attacks show up in the log while they happen.
async fn report_drops(counters: Arc<NodeCounters>) {
    let mut previous = counters.drop_snapshot();
    let mut ticker = tokio::time::interval(DROP_REPORT_PERIOD);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let current = counters.drop_snapshot();
        let increases: Vec<String> = current
            .iter()
            .zip(&previous)
            .filter(|((_, now), (_, before))| now > before)
            .map(|((name, now), (_, before))| format!("{name}=+{}", now - before))
            .collect();
        if !increases.is_empty() {
            warn!(drops = %increases.join(" "), "dropped in the last {DROP_REPORT_PERIOD:?}");
        }
        previous = current;
    }
}

fn log_counters(counters: &NodeCounters) {
    let drops: Vec<String> = counters
        .drop_snapshot()
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(name, count)| format!("{name}={count}"))
        .collect();
    if drops.is_empty() {
        info!(
            peer_frames_received = counters.peer_frames_received_total(),
            peer_frames_sent = counters.peer_frames_sent_total(),
            client_requests = counters.client_requests_received_total(),
            replies = counters.replies_sent_total(),
            "stopped; nothing was dropped"
        );
    } else {
        warn!(
            peer_frames_received = counters.peer_frames_received_total(),
            peer_frames_sent = counters.peer_frames_sent_total(),
            client_requests = counters.client_requests_received_total(),
            replies = counters.replies_sent_total(),
            drops = %drops.join(" "),
            "stopped"
        );
    }
}
/// Total bytes the replicated store may hold by default: 1 GiB (`[store] total_bytes_max` in
/// cluster.toml changes it). State transfer moves the store partition by partition in chunks of
/// about 1 MiB (`docs/STATE.md`), so no message grows with the store; the limit bounds memory
/// (every replica holds the whole state).
pub const STORE_TOTAL_BYTES_DEFAULT: u64 = tessera_types::cluster::STORE_TOTAL_BYTES_DEFAULT;

/// The key-value store every replica (and the unreplicated baseline) serves, behind envelopes so
/// a client can put many operations under one signature (`tessera_core::envelope`). Its limits
/// come from the cluster file, so every replica refuses exactly the same writes.
fn key_value_store(store: &StoreConfig) -> KvStore {
    KvStore::new(KvLimits {
        total_bytes_max: store.total_bytes_max,
        ..KvLimits::default()
    })
}
