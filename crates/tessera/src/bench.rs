//! `tessera bench`: closed-loop key-value load against an unreplicated server and a fresh local
//! MinBFT cluster, in one run, so the two numbers are measured the same way on the same machine.
//!
//! Each system gets its own freshly initialised cluster directory. Every process started here
//! is killed when its guard is dropped, on success, on error and on panic alike.
//!
//! With `--svg`, it also draws throughput over time (per 100 ms) with the events it saw by
//! polling the replicas' status: view changes, and replicas that stopped answering or came
//! back with a lower executed count (a restart).
//!
//! `tessera bench compare` (module `compare`) reuses the server start-up and the load runtime
//! from here.

use crate::histogram::Outcomes;
use crate::json::json_string;
use crate::kv::{load_cluster, parse_duration};
use crate::process::{ChildGuard, Workspace};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_client::{Client, ClientError, ClientOptions, ClientStats};
use tessera_kv::{Command, Response};
use tessera_types::wire::ReplicaStatus;
use tokio::time::Instant;

/// `tessera bench`: its own arguments, or a subcommand.
#[derive(clap::Args, Debug)]
#[command(
    about = "Measure throughput and latency: unreplicated baseline vs. a local MinBFT cluster \
             (`tessera bench compare`: against Redis and etcd; `tessera bench state-transfer`: \
             how fast a wiped replica fetches the state)",
    args_conflicts_with_subcommands = true
)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub subcommand: Option<BenchSubcommand>,
    #[command(flatten)]
    pub args: BenchArgs,
}

/// Subcommands of `tessera bench`.
#[derive(clap::Subcommand, Debug)]
pub enum BenchSubcommand {
    /// Run one redis-benchmark workload against Redis, a 3-member etcd cluster (through
    /// Tessera's own gRPC load generator), Tessera unreplicated and a MinBFT cluster (both
    /// through `tessera gateway`), one after another; print one table and write an SVG chart.
    Compare(crate::compare::CompareArgs),
    /// Build a state of --size bytes in a fresh local cluster, wipe one backup and time how long
    /// it takes to fetch and install the state, and how long a backup restarted with its
    /// write-ahead log takes to replay it, next to this machine's disk and hashing limits.
    StateTransfer(crate::transfer_bench::StateTransferArgs),
}

/// Runs `tessera bench` or its subcommand.
pub async fn run_command(command: BenchCommand) -> anyhow::Result<()> {
    match command.subcommand {
        Some(BenchSubcommand::Compare(args)) => crate::compare::run(args).await,
        Some(BenchSubcommand::StateTransfer(args)) => crate::transfer_bench::run(args).await,
        None => run(command.args).await,
    }
}

/// Arguments of `tessera bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Concurrent sessions, each with one request in flight (closed loop).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub clients: u32,
    /// Measured time per system (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measuring starts, per system.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Fraction of requests that are SETs; the rest are GETs.
    #[arg(long, default_value_t = 0.5)]
    pub writes: f64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub key_size: u32,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub value_size: u32,
    /// Number of distinct keys, chosen uniformly at random.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Working directory for the clusters (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Systems to measure, in order: unreplicated, minbft (HMAC USIG), minbft-ed25519,
    /// minbft-usigd, minbft-tpm.
    #[arg(long, value_delimiter = ',', default_value = "unreplicated,minbft")]
    pub systems: Vec<System>,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads of the load generator (1: a single-threaded runtime, leanest on 2 cores).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub load_threads: u32,
    /// Envelopes in flight when sessions share a batcher (0: every session signs each request
    /// itself). With N > 0 the load generator behaves like the gateway: operations waiting at the
    /// same moment travel in one signed envelope (`tessera_core::envelope`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub envelope_lanes: u32,
    /// Override the clusters' `[protocol] window` (sequence numbers the primary keeps in
    /// agreement at once). A small window makes requests wait and travel in larger batches,
    /// which hides a slow USIG's create_ui (one per batch per replica).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub window: Option<u64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// First port of the clusters it starts (`tessera init --base-port`: replicas from here,
    /// clients from +100, metrics from +150); away from `tessera up`'s 7000 by default.
    #[arg(long, default_value_t = 7600, value_parser = clap::value_parser!(u16).range(1_024..=65_000))]
    pub base_port: u16,
    /// Also write throughput over time (per 100 ms, warm-up included) as an SVG chart to this
    /// file, with view changes and replica restarts marked.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// How a load session reaches the cluster.
enum Invoker {
    Session(tessera_client::Session),
    Batcher(tessera_client::Batcher),
}

impl Invoker {
    async fn invoke(&mut self, operation: Vec<u8>) -> Result<Vec<u8>, tessera_client::ClientError> {
        match self {
            Invoker::Session(session) => session.invoke(operation).await,
            Invoker::Batcher(batcher) => batcher.invoke(operation).await,
        }
    }
}

/// A system the benchmark can measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// `tessera unreplicated`: the same store and client protocol, no replication.
    Unreplicated,
    /// A local MinBFT cluster: n=3, f=1, HMAC USIG.
    Minbft,
    /// The same cluster with the in-process Ed25519 USIG.
    MinbftEd25519,
    /// The same cluster with one `tessera usigd` per replica.
    MinbftUsigd,
    /// The same cluster with one swtpm per replica (needs swtpm installed).
    MinbftTpm,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Unreplicated => "unreplicated",
            System::Minbft => "minbft",
            System::MinbftEd25519 => "minbft-ed25519",
            System::MinbftUsigd => "minbft-usigd",
            System::MinbftTpm => "minbft-tpm",
        }
    }

    /// The `tessera init --usig` value of a MinBFT system.
    fn usig(self) -> &'static str {
        match self {
            System::Unreplicated | System::Minbft => "hmac",
            System::MinbftEd25519 => "ed25519",
            System::MinbftUsigd => "usigd",
            System::MinbftTpm => "tpm",
        }
    }
}

/// What one system achieved.
#[derive(Debug, Clone)]
struct Measurement {
    operations: u64,
    errors: u64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    last_error: Option<String>,
    stats: ClientStats,
    /// Completed requests per 100 ms since the load started, warm-up included.
    series: Vec<u64>,
    /// When the measured window began, in seconds since the load started.
    measure_from_s: f64,
    /// What the status poller saw (only with `--svg`).
    events: Vec<Event>,
}

/// Runs `tessera bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.writes) {
        bail!(
            "--writes is {}; give a fraction between 0 and 1",
            args.writes
        );
    }
    if args.systems.is_empty() {
        bail!("--systems is empty; name unreplicated, minbft or both");
    }
    let executable =
        std::env::current_exe().context("cannot find the tessera executable to start servers")?;
    let workspace = Workspace::new(args.dir.clone(), "bench")?;
    let mut results: Vec<(System, anyhow::Result<Measurement>)> = Vec::new();
    let mut interrupted_any = false;
    for &system in &args.systems {
        if !args.json {
            eprintln!(
                "measuring {}: {} sessions, {:?} warmup + {:?}",
                system.name(),
                args.clients,
                args.warmup,
                args.duration
            );
        }
        let dir = workspace.path.join(system.name());
        // On Ctrl-C the measurement is dropped, and with it the guards that kill its servers.
        let (result, interrupted) = tokio::select! {
            result = measure_system(system, &executable, &dir, &args) => (result, false),
            _ = tokio::signal::ctrl_c() => (Err(anyhow!("interrupted")), true),
        };
        let result = result.with_context(|| {
            format!(
                "benchmark of {} failed (logs in {})",
                system.name(),
                dir.display()
            )
        });
        if let Err(error) = &result {
            eprintln!("{error:#}");
        }
        results.push((system, result));
        if interrupted {
            interrupted_any = true;
            break;
        }
    }
    report(&args, &results);
    if let Some(path) = &args.svg {
        write_svg(
            path,
            &crate::chart::line_chart(&throughput_chart(&args, &results)),
        )?;
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, result)| result.is_err())
        .map(|(system, _)| system.name())
        .collect();
    if !failed.is_empty() {
        // Keep the logs of a failed run (an interrupted one is not worth them).
        if !interrupted_any {
            workspace.keep();
        }
        bail!("benchmark failed for: {}", failed.join(", "));
    }
    Ok(())
}

async fn measure_system(
    system: System,
    executable: &Path,
    dir: &Path,
    args: &BenchArgs,
) -> anyhow::Result<Measurement> {
    let mut servers = Servers::start(system, executable, dir, args.base_port, args.window).await?;
    let (cluster, secrets) = load_cluster(dir, None)?;
    let options = ClientOptions {
        unreplicated: system == System::Unreplicated,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let origin = Instant::now();
    // Events are only drawn on the chart, so only a run that writes one polls for them.
    let watcher = (args.svg.is_some() && system != System::Unreplicated).then(|| {
        let addresses = cluster
            .replicas
            .iter()
            .map(|replica| replica.client_address.clone())
            .collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        (stop, tokio::spawn(watch_events(addresses, origin, stopped)))
    });
    let measurement = generate_load(cluster, secrets, options, args, origin).await;
    let events = match watcher {
        Some((stop, task)) => {
            drop(stop);
            task.await
                .map_err(|error| anyhow!("the status poller panicked: {error}"))?
        }
        None => Vec::new(),
    };
    let measurement = match (measurement, servers.exit_report()?) {
        (Err(error), Some(report)) => Err(error.context(report)),
        (measurement, _) => measurement,
    };
    servers.stop().await?;
    measurement.map(|measurement| Measurement {
        events,
        ..measurement
    })
}

/// The running servers of one Tessera system; dropping this kills them.
pub(crate) enum Servers {
    /// `tessera unreplicated`.
    Unreplicated(ChildGuard),
    /// A local MinBFT cluster (`tessera up`'s machinery).
    Cluster(Box<crate::local::LocalCluster>),
}

impl Servers {
    /// Writes a fresh cluster for `system` into `dir` (ports from `base_port`, see
    /// `tessera init --base-port`), starts it, and waits until every client port accepts
    /// connections.
    pub(crate) async fn start(
        system: System,
        executable: &Path,
        dir: &Path,
        base_port: u16,
        window: Option<u64>,
    ) -> anyhow::Result<Servers> {
        initialise(executable, dir, system.usig(), base_port)?;
        if let Some(window) = window {
            set_window(dir, window)?;
        }
        if system == System::Unreplicated {
            let cluster = crate::local::read_cluster(dir)?;
            let mut server = ChildGuard::spawn_tessera(
                executable,
                &["unreplicated", "--dir"],
                dir,
                "unreplicated.log",
            )?;
            server
                .wait_listening(&cluster.replicas[0].client_address, READY_TIMEOUT)
                .await?;
            return Ok(Servers::Unreplicated(server));
        }
        let local = crate::local::LocalCluster::start(dir, executable)?;
        // Waiting and stopping poll with sleeps; keep them off the async threads. Dropping the
        // cluster on any error path kills the replicas.
        let local =
            tokio::task::spawn_blocking(move || local_ready(local, READY_TIMEOUT)).await??;
        Ok(Servers::Cluster(Box::new(local)))
    }

    /// If a server has exited: what it said last.
    pub(crate) fn exit_report(&mut self) -> anyhow::Result<Option<String>> {
        match self {
            Servers::Unreplicated(server) => server.exit_report(),
            Servers::Cluster(local) => {
                Ok(local.poll_exits().into_iter().next().map(|(id, status)| {
                    format!(
                        "replica {id} exited ({status}); see {}",
                        local.log_path(id).display()
                    )
                }))
            }
        }
    }

    /// Stops the servers: replicas gracefully (SIGTERM, then SIGKILL after a grace period),
    /// the unreplicated server at once.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        match self {
            Servers::Unreplicated(server) => {
                drop(server);
                Ok(())
            }
            Servers::Cluster(mut local) => {
                tokio::task::spawn_blocking(move || local.stop()).await?
            }
        }
    }
}

fn local_ready(
    mut local: crate::local::LocalCluster,
    timeout: Duration,
) -> anyhow::Result<crate::local::LocalCluster> {
    local.wait_ready(timeout)?;
    Ok(local)
}

/// How long servers may take to open their client ports.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Rewrites `dir/cluster.toml` with `[protocol] window = window`.
fn set_window(dir: &Path, window: u64) -> anyhow::Result<()> {
    let mut cluster = crate::local::read_cluster(dir)?;
    cluster.protocol.window = window;
    cluster
        .protocol
        .validate()
        .context("--window makes an invalid protocol config")?;
    let path = dir.join("cluster.toml");
    std::fs::write(&path, cluster.to_toml())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a fresh cluster (n=3, f=1: `tessera init`'s defaults) with the `usig` backend into
/// `dir`, its ports from `base_port`.
pub(crate) fn initialise(
    executable: &Path,
    dir: &Path,
    usig: &str,
    base_port: u16,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let output = Process::new(executable)
        .arg("init")
        .arg("--dir")
        .arg(dir)
        .arg("--force")
        .arg("--base-port")
        .arg(base_port.to_string())
        .args(["--usig", usig])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `tessera init`")?;
    if !output.status.success() {
        bail!(
            "`tessera init --dir {} --force` failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a load generator on its own runtime with `threads` worker threads (1: a
/// single-threaded runtime, so it takes at most one core away from the servers it measures).
/// `load` builds the generator's future on that runtime.
pub(crate) async fn on_load_runtime<T, Load, Generator>(
    threads: u32,
    load: Load,
) -> anyhow::Result<T>
where
    T: Send + 'static,
    Load: FnOnce() -> Generator + Send + 'static,
    Generator: std::future::Future<Output = anyhow::Result<T>>,
{
    // Dropping this future (Ctrl-C) drops `_stop`, which ends the load runtime at once rather
    // than at the end of the measurement.
    let (_stop, mut stopped) = tokio::sync::watch::channel(());
    tokio::task::spawn_blocking(move || {
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads as usize)
                .enable_all()
                .build()
        }
        .context("cannot start the load generator's runtime")?;
        runtime.block_on(async move {
            tokio::select! {
                result = load() => result,
                // Only fails, when the sender is dropped: nothing is ever sent.
                _ = stopped.changed() => Err(anyhow!("stopped")),
            }
        })
    })
    .await
    .map_err(|error| anyhow!("load generator panicked: {error}"))?
}

/// Runs the load generator of `tessera bench` against one system; `origin` is time zero of
/// its throughput series.
async fn generate_load(
    cluster: tessera_types::cluster::ClusterConfig,
    secrets: tessera_types::cluster::ClientSecrets,
    options: ClientOptions,
    args: &BenchArgs,
    origin: Instant,
) -> anyhow::Result<Measurement> {
    let args = args.clone();
    on_load_runtime(args.load_threads, move || async move {
        let client = Client::connect(cluster, secrets, options).await?;
        drive(client, &args, origin).await
    })
    .await
}

/// Width of one bucket of the throughput series.
const SERIES_BUCKET: Duration = Duration::from_millis(100);
/// Buckets kept beyond warm-up plus duration (connecting, slow last replies); later
/// completions all count in the last one.
const SERIES_SLACK_BUCKETS: usize = 600;

/// Results of all sessions of one run.
struct Tally {
    outcomes: Outcomes,
    /// Completed requests per [`SERIES_BUCKET`] since the origin, warm-up included.
    series: Vec<u64>,
}

impl Tally {
    fn count_completion(&mut self, since_origin: Duration) {
        let bucket = (since_origin.as_millis() / SERIES_BUCKET.as_millis()) as usize;
        let last = self.series.len() - 1;
        self.series[bucket.min(last)] += 1;
    }
}

async fn drive(client: Client, args: &BenchArgs, origin: Instant) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let end = measure_from + args.duration;
    let buckets =
        ((end - origin).as_millis() / SERIES_BUCKET.as_millis()) as usize + SERIES_SLACK_BUCKETS;
    // One tally for all sessions: a lock taken once per request, uncontended on the default
    // single-threaded load runtime, and memory that does not grow with the session count.
    let tally = Arc::new(Mutex::new(Tally {
        outcomes: Outcomes::new(),
        series: vec![0; buckets],
    }));
    let mut tasks = Vec::with_capacity(args.clients as usize);
    let batcher = (args.envelope_lanes > 0).then(|| {
        client.batcher(
            args.envelope_lanes as usize,
            tessera_core::envelope::ENVELOPE_OPERATIONS_MAX,
        )
    });
    for index in 0..args.clients {
        let session = match &batcher {
            Some(batcher) => Invoker::Batcher(batcher.clone()),
            None => Invoker::Session(client.session()),
        };
        let workload = Workload::new(args, index);
        let window = Window {
            origin,
            measure_from,
            end,
        };
        tasks.push(tokio::spawn(run_session(
            session,
            workload,
            window,
            Arc::clone(&tally),
        )));
    }
    for task in tasks {
        task.await
            .map_err(|error| anyhow!("a load session panicked: {error}"))?;
    }
    let tally = tally
        .lock()
        .map_err(|_| anyhow!("a load session panicked"))?;
    let outcomes = &tally.outcomes;
    let operations = outcomes.successes(&format!("{:?}", args.warmup + args.duration))?;
    let mut series = tally.series.clone();
    // Drop the unused slack, keeping the series up to its last completion.
    let used = series
        .iter()
        .rposition(|&count| count > 0)
        .map_or(0, |last| last + 1);
    series.truncate(used);
    Ok(Measurement {
        operations,
        errors: outcomes.errors,
        ops_per_sec: operations as f64 / args.duration.as_secs_f64(),
        p50_us: outcomes.latency.quantile(0.5),
        p99_us: outcomes.latency.quantile(0.99),
        p999_us: outcomes.latency.quantile(0.999),
        last_error: outcomes.last_error.clone(),
        stats: client.stats(),
        series,
        measure_from_s: (measure_from - origin).as_secs_f64(),
        events: Vec::new(),
    })
}

/// When a session's requests count.
#[derive(Clone, Copy)]
struct Window {
    /// Time zero of the throughput series.
    origin: Instant,
    /// Completions before this are warm-up: in the series, not in the measurement.
    measure_from: Instant,
    /// No request starts after this.
    end: Instant,
}

/// One session's closed loop: a request, its reply, the next request. Requests that complete
/// inside the measured window are counted.
async fn run_session(
    mut session: Invoker,
    mut workload: Workload,
    window: Window,
    tally: Arc<Mutex<Tally>>,
) {
    while Instant::now() < window.end {
        let (command, is_write) = workload.next_command();
        let sent = Instant::now();
        let outcome = session.invoke(command.encode()).await;
        let done = Instant::now();
        let measured = window.measure_from <= done && done <= window.end;
        let outcome = outcome.and_then(|bytes| check_response(&bytes, is_write));
        let Ok(mut tally) = tally.lock() else { return };
        if outcome.is_ok() {
            tally.count_completion(done - window.origin);
        }
        let outcome = outcome
            .map(|()| (done - sent).as_micros() as u64)
            .map_err(|error| error.to_string());
        tally.outcomes.record(outcome, measured);
    }
}

fn check_response(bytes: &[u8], is_write: bool) -> Result<(), ClientError> {
    match Response::decode(bytes) {
        Ok(Response::Ok) if is_write => Ok(()),
        Ok(Response::Value(_)) if !is_write => Ok(()),
        Ok(Response::Error(error)) => Err(ClientError::Kv(error)),
        Ok(other) => Err(ClientError::UnexpectedResult {
            command: if is_write { "SET" } else { "GET" },
            detail: format!("{other:?}"),
        }),
        Err(error) => Err(ClientError::UnexpectedResult {
            command: if is_write { "SET" } else { "GET" },
            detail: error.to_string(),
        }),
    }
}

/// The operation mix of one session, from a seeded generator.
struct Workload {
    random: SplitMix64,
    keys: u64,
    key_size: usize,
    value: Vec<u8>,
    write_threshold: u64,
}

impl Workload {
    fn new(args: &BenchArgs, session_index: u32) -> Workload {
        Workload {
            random: SplitMix64::for_session(args.seed, session_index),
            keys: args.keys,
            key_size: args.key_size as usize,
            value: vec![b'v'; args.value_size as usize],
            // `writes` is checked to lie in [0, 1]; 1.0 maps to u64::MAX, i.e. always a write.
            write_threshold: (args.writes * u64::MAX as f64) as u64,
        }
    }

    fn next_command(&mut self) -> (Command, bool) {
        let key = key_bytes(self.random.next() % self.keys, self.key_size);
        let is_write = self.write_threshold > 0 && self.random.next() <= self.write_threshold;
        if is_write {
            (
                Command::Set {
                    key,
                    value: self.value.clone(),
                },
                true,
            )
        } else {
            (Command::Get { key }, false)
        }
    }
}

/// `key:<index>` zero-padded (or cut) to exactly `size` bytes; distinct indexes stay distinct
/// whenever `size` leaves room for their digits.
pub(crate) fn key_bytes(index: u64, size: usize) -> Vec<u8> {
    let digits = index.to_string();
    let mut key = Vec::with_capacity(size.max(digits.len()));
    if size > digits.len() + 4 {
        key.extend_from_slice(b"key:");
    }
    let padding = size.saturating_sub(key.len() + digits.len());
    key.resize(key.len() + padding, b'0');
    key.extend_from_slice(digits.as_bytes());
    // Keep the low-order digits when the key is too short for all of them.
    let excess = key.len().saturating_sub(size);
    key.drain(..excess);
    key
}

/// SplitMix64: tiny, fast and good enough to choose keys; seeded, so runs repeat.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator of session `index` of a run seeded with `seed`: sessions draw different
    /// sequences, and the same seed repeats them.
    pub(crate) fn for_session(seed: u64, index: u32) -> SplitMix64 {
        SplitMix64(seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }
}

/// Something that happened to the cluster during a run, `at_s` seconds after the load started.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    at_s: f64,
    label: String,
}

/// How often the status poller asks every replica.
const STATUS_POLL: Duration = Duration::from_millis(200);
/// Events kept per run; a flapping cluster would otherwise grow the list without bound.
const EVENTS_MAX: usize = 200;

/// Polls every replica's status until `stop` fires (or its sender is dropped) and returns what
/// [`EventDetector`] made of the answers.
async fn watch_events(
    addresses: Vec<String>,
    origin: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Event> {
    let mut detector = EventDetector::new(addresses.len());
    let mut events = Vec::new();
    let mut ticker = tokio::time::interval(STATUS_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return events,
            _ = ticker.tick() => {}
        }
        let at_s = origin.elapsed().as_secs_f64();
        let queries: Vec<_> = addresses
            .iter()
            .map(|address| {
                let address = address.clone();
                tokio::spawn(async move { crate::query_status(&address).await.ok() })
            })
            .collect();
        for (replica, query) in queries.into_iter().enumerate() {
            let status = query.await.ok().flatten();
            for label in detector.observe(replica, status.as_ref()) {
                if events.len() < EVENTS_MAX {
                    events.push(Event { at_s, label });
                }
            }
        }
    }
}

/// What the poller last knew of one replica.
#[derive(Debug, Clone, Copy)]
enum ReplicaSeen {
    Unknown,
    Answering { executed: u64 },
    Silent { executed_before: Option<u64> },
}

/// Turns successive status answers into events. A view change shows as a higher view than any
/// replica reported before. A restart shows as a replica answering again with a lower
/// `requests_executed` (it counts from the process start); a replica that stops answering is
/// reported at once, since a status query is cheap and answered even under load.
struct EventDetector {
    view: Option<u64>,
    replicas: Vec<ReplicaSeen>,
}

impl EventDetector {
    fn new(replicas: usize) -> EventDetector {
        EventDetector {
            view: None,
            replicas: vec![ReplicaSeen::Unknown; replicas],
        }
    }

    /// The events `status` (`None`: no answer) of `replica` reveals.
    fn observe(&mut self, replica: usize, status: Option<&ReplicaStatus>) -> Vec<String> {
        let mut events = Vec::new();
        let Some(seen) = self.replicas.get_mut(replica) else {
            return events;
        };
        let Some(status) = status else {
            if let ReplicaSeen::Answering { executed } = *seen {
                events.push(format!("replica {replica} not answering"));
                *seen = ReplicaSeen::Silent {
                    executed_before: Some(executed),
                };
            } else if let ReplicaSeen::Unknown = *seen {
                *seen = ReplicaSeen::Silent {
                    executed_before: None,
                };
            }
            return events;
        };
        let executed = status.requests_executed;
        match *seen {
            ReplicaSeen::Answering { executed: before } if executed < before => {
                events.push(format!("replica {replica} restarted"));
            }
            ReplicaSeen::Silent {
                executed_before: Some(before),
            } => events.push(if executed < before {
                format!("replica {replica} restarted")
            } else {
                format!("replica {replica} answering again")
            }),
            _ => {}
        }
        *seen = ReplicaSeen::Answering { executed };
        let view = status.view.0;
        match self.view {
            Some(known) if view > known => {
                events.push(format!("view {view} (primary {})", status.primary.0));
                self.view = Some(view);
            }
            None => self.view = Some(view),
            Some(_) => {}
        }
        events
    }
}

/// Throughput over time of every system that produced a series, with its events and the end of
/// the warm-up marked.
fn throughput_chart(
    args: &BenchArgs,
    results: &[(System, anyhow::Result<Measurement>)],
) -> crate::chart::LineChart {
    use crate::chart::{LineChart, Marker, Series};
    let bucket_s = SERIES_BUCKET.as_secs_f64();
    let mut series = Vec::new();
    let mut markers = Vec::new();
    for (system, result) in results {
        let Ok(measurement) = result else { continue };
        let index = series.len();
        series.push(Series {
            name: system.name().to_string(),
            points: measurement
                .series
                .iter()
                .enumerate()
                .map(|(bucket, &count)| ((bucket as f64 + 0.5) * bucket_s, count as f64 / bucket_s))
                .collect(),
        });
        if index == 0 {
            markers.push(Marker {
                x: measurement.measure_from_s,
                label: "warm-up ends".into(),
                series: None,
            });
        }
        markers.extend(measurement.events.iter().map(|event| Marker {
            x: event.at_s,
            label: format!("{}: {}", system.name(), event.label),
            series: Some(index),
        }));
    }
    let sessions = if args.envelope_lanes > 0 {
        format!(
            "{} sessions, {} envelope lanes",
            args.clients, args.envelope_lanes
        )
    } else {
        format!("{} sessions", args.clients)
    };
    LineChart {
        title: format!(
            "tessera bench: throughput per 100 ms ({sessions}, {:.0}% writes)",
            args.writes * 100.0
        ),
        x_label: "seconds since the load started".into(),
        y_label: "completed operations per second".into(),
        series,
        markers,
    }
}

/// Writes `svg` to `path` and says so on stderr.
pub(crate) fn write_svg(path: &Path, svg: &str) -> anyhow::Result<()> {
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn report(args: &BenchArgs, results: &[(System, anyhow::Result<Measurement>)]) {
    let throughput = |wanted: System| {
        results
            .iter()
            .find(|(system, _)| *system == wanted)
            .and_then(|(_, result)| result.as_ref().ok())
            .map(|measurement| measurement.ops_per_sec)
    };
    let ratio = match (throughput(System::Minbft), throughput(System::Unreplicated)) {
        (Some(minbft), Some(unreplicated)) if unreplicated > 0.0 => Some(minbft / unreplicated),
        _ => None,
    };
    if args.json {
        println!("{}", json_report(args, results, ratio));
        return;
    }
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "system", "ops/s", "p50 µs", "p99 µs", "p999 µs", "errors"
    );
    for (system, result) in results {
        match result {
            Ok(measurement) => {
                println!(
                    "{:<14} {:>10.0} {:>9} {:>9} {:>9} {:>8}",
                    system.name(),
                    measurement.ops_per_sec,
                    measurement.p50_us,
                    measurement.p99_us,
                    measurement.p999_us,
                    measurement.errors
                );
                if let Some(error) = &measurement.last_error {
                    println!("{:<14} last error: {error}", "");
                }
            }
            Err(_) => println!("{:<14} FAILED (see above)", system.name()),
        }
    }
    if let Some(ratio) = ratio {
        println!("minbft/unreplicated throughput ratio: {ratio:.3}");
    }
}

/// The `--json` object: `{"config": {...}, "systems": {name: {...}}, "ratio": r|null}`.
fn json_report(
    args: &BenchArgs,
    results: &[(System, anyhow::Result<Measurement>)],
    ratio: Option<f64>,
) -> String {
    let systems = results
        .iter()
        .map(|(system, result)| {
            let body = match result {
                Ok(measurement) => format!(
                    "{{\"ops_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\
                     \"operations\":{},\"retransmissions\":{},\"replies_bad_mac\":{}}}",
                    measurement.ops_per_sec,
                    measurement.p50_us,
                    measurement.p99_us,
                    measurement.p999_us,
                    measurement.errors,
                    measurement.operations,
                    measurement.stats.retransmissions,
                    measurement.stats.replies_bad_mac
                ),
                Err(error) => format!("{{\"error\":{}}}", json_string(&format!("{error:#}"))),
            };
            format!("{}:{body}", json_string(system.name()))
        })
        .collect::<Vec<_>>()
        .join(",");
    let config = format!(
        "{{\"clients\":{},\"duration_s\":{},\"warmup_s\":{},\"writes\":{},\"key_size\":{},\
         \"value_size\":{},\"keys\":{},\"seed\":{},\"load_threads\":{},\"envelope_lanes\":{},\
         \"minbft\":{{\"n\":3,\"f\":1,\"usig\":\"hmac\"}}}}",
        args.clients,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.writes,
        args.key_size,
        args.value_size,
        args.keys,
        args.seed,
        args.load_threads,
        args.envelope_lanes,
    );
    let ratio = match ratio {
        Some(ratio) if ratio.is_finite() => format!("{ratio:.4}"),
        _ => "null".into(),
    };
    format!("{{\"config\":{config},\"systems\":{{{systems}}},\"ratio\":{ratio}}}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(arguments: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(arguments.iter().copied()))
            .expect("parses")
            .bench
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let args = parse(&[]);
        assert_eq!(args.clients, 16);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(2));
        assert_eq!(args.systems, vec![System::Unreplicated, System::Minbft]);
        assert_eq!(
            (args.key_size, args.value_size, args.keys),
            (16, 64, 100_000)
        );
        let args = parse(&["--systems", "minbft", "--duration", "500ms", "--json"]);
        assert_eq!(args.systems, vec![System::Minbft]);
        assert_eq!(args.duration, Duration::from_millis(500));
        assert!(args.json);
        assert_eq!(args.svg, None);
    }

    #[test]
    fn keys_have_the_requested_size_and_stay_distinct() {
        assert_eq!(key_bytes(42, 16), b"key:000000000042");
        assert_eq!(key_bytes(99_999, 5), b"99999");
        assert_eq!(key_bytes(7, 3), b"007");
        assert_eq!(key_bytes(123, 2), b"23");
        assert_ne!(key_bytes(1, 16), key_bytes(10, 16));
    }

    #[test]
    fn the_operation_mix_follows_the_write_fraction() {
        let mut args = parse(&["--writes", "0.25", "--keys", "10"]);
        let mut workload = Workload::new(&args, 0);
        let writes = (0..10_000).filter(|_| workload.next_command().1).count();
        assert!((2_200..2_800).contains(&writes), "{writes} writes");
        args.writes = 0.0;
        let mut reads_only = Workload::new(&args, 0);
        assert!((0..1_000).all(|_| !reads_only.next_command().1));
        args.writes = 1.0;
        let mut writes_only = Workload::new(&args, 0);
        assert!((0..1_000).all(|_| writes_only.next_command().1));
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let args = parse(&[]);
        let mut first = Workload::new(&args, 3);
        let mut second = Workload::new(&args, 3);
        for _ in 0..100 {
            assert_eq!(first.next_command(), second.next_command());
        }
        let mut other_session = Workload::new(&args, 4);
        assert_ne!(
            (0..10).map(|_| first.next_command()).collect::<Vec<_>>(),
            (0..10)
                .map(|_| other_session.next_command())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn json_report_has_the_documented_shape() {
        let args = parse(&[]);
        let measurement = Measurement {
            operations: 1000,
            errors: 2,
            ops_per_sec: 100.4,
            p50_us: 10,
            p99_us: 20,
            p999_us: 30,
            last_error: None,
            stats: ClientStats::default(),
            series: vec![1, 2],
            measure_from_s: 2.0,
            events: Vec::new(),
        };
        let results = vec![
            (System::Unreplicated, Ok(measurement)),
            (System::Minbft, Err(anyhow!("replica 1 said \"no\"\n"))),
        ];
        let text = json_report(&args, &results, None);
        assert!(
            text.starts_with("{\"config\":{\"clients\":16,\"duration_s\":10,"),
            "{text}"
        );
        assert!(text.contains("\"unreplicated\":{\"ops_per_sec\":100,\"p50_us\":10,\"p99_us\":20,\"p999_us\":30,\"errors\":2"), "{text}");
        assert!(
            text.contains("\"minbft\":{\"error\":\"replica 1 said \\\"no\\\"\\n\"}"),
            "{text}"
        );
        assert!(text.ends_with("\"ratio\":null}"), "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    fn status(view: u64, executed: u64) -> ReplicaStatus {
        ReplicaStatus {
            view: tessera_types::View(view),
            primary: tessera_types::ReplicaId((view % 3) as u32),
            requests_executed: executed,
            ..ReplicaStatus::default()
        }
    }

    #[test]
    fn the_detector_reports_view_changes_once_and_restarts() {
        let mut detector = EventDetector::new(3);
        // First answers set the baseline: nothing happened yet.
        assert!(detector.observe(0, Some(&status(0, 10))).is_empty());
        assert!(detector.observe(1, Some(&status(0, 10))).is_empty());
        assert!(detector.observe(2, None).is_empty());
        // The first replica in a new view reports it; the others' later answers do not.
        assert_eq!(
            detector.observe(1, Some(&status(1, 20))),
            ["view 1 (primary 1)"]
        );
        assert!(detector.observe(0, Some(&status(1, 21))).is_empty());
        // Replica 0 stops answering, then comes back having executed less: a restart.
        assert_eq!(detector.observe(0, None), ["replica 0 not answering"]);
        assert!(detector.observe(0, None).is_empty());
        assert_eq!(
            detector.observe(0, Some(&status(1, 3))),
            ["replica 0 restarted"]
        );
        // Restarted between two polls: only the lower count shows it.
        assert_eq!(
            detector.observe(1, Some(&status(1, 2))),
            ["replica 1 restarted"]
        );
        // A pause without a restart.
        assert!(detector.observe(1, Some(&status(1, 40))).is_empty());
        assert_eq!(detector.observe(1, None), ["replica 1 not answering"]);
        assert_eq!(
            detector.observe(1, Some(&status(2, 41))),
            ["replica 1 answering again", "view 2 (primary 2)"]
        );
        // A replica that was never seen answering is not "back".
        assert!(detector.observe(2, Some(&status(2, 0))).is_empty());
        assert!(detector.observe(7, None).is_empty());
    }

    #[test]
    fn the_throughput_chart_has_a_line_per_system_and_marks_events() {
        let args = parse(&["--svg", "x.svg"]);
        let measurement = |series: Vec<u64>, events: Vec<Event>| Measurement {
            operations: 10,
            errors: 0,
            ops_per_sec: 1.0,
            p50_us: 1,
            p99_us: 1,
            p999_us: 1,
            last_error: None,
            stats: ClientStats::default(),
            series,
            measure_from_s: 2.0,
            events,
        };
        let results = vec![
            (
                System::Unreplicated,
                Ok(measurement(vec![5, 10, 10], Vec::new())),
            ),
            (System::MinbftTpm, Err(anyhow!("no swtpm"))),
            (
                System::Minbft,
                Ok(measurement(
                    vec![1, 2],
                    vec![Event {
                        at_s: 1.5,
                        label: "view 1 (primary 1)".into(),
                    }],
                )),
            ),
        ];
        let chart = throughput_chart(&args, &results);
        assert_eq!(chart.series.len(), 2);
        let expected = [(0.05, 50.0), (0.15, 100.0), (0.25, 100.0)];
        assert_eq!(chart.series[0].points.len(), expected.len());
        for (point, wanted) in chart.series[0].points.iter().zip(expected) {
            assert!(
                (point.0 - wanted.0).abs() < 1e-9 && (point.1 - wanted.1).abs() < 1e-6,
                "{point:?} is not {wanted:?}"
            );
        }
        assert_eq!(chart.series[1].name, "minbft");
        let labels: Vec<(&str, Option<usize>)> = chart
            .markers
            .iter()
            .map(|marker| (marker.label.as_str(), marker.series))
            .collect();
        assert_eq!(
            labels,
            [
                ("warm-up ends", None),
                ("minbft: view 1 (primary 1)", Some(1))
            ]
        );
        roxmltree::Document::parse(&crate::chart::line_chart(&chart)).expect("well-formed");
    }
}
