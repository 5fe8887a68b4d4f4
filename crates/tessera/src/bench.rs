//! `tessera bench`: closed-loop key-value load against an unreplicated server and a fresh local
//! MinBFT cluster, in one run, so the two numbers are measured the same way on the same machine.
//!
//! Each system gets its own freshly initialised cluster directory. Every process started here
//! is killed when its guard is dropped, on success, on error and on panic alike.

use crate::kv::{load_cluster, parse_duration};
use anyhow::{anyhow, bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_client::{Client, ClientError, ClientOptions, ClientStats};
use tessera_kv::{Command, Response};
use tokio::time::Instant;

/// `tessera bench`: its own arguments, or a subcommand.
#[derive(clap::Args, Debug)]
#[command(
    about = "Measure throughput and latency: unreplicated baseline vs. a local MinBFT cluster \
             (`tessera bench state-transfer`: how fast a wiped replica fetches the state)",
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
    /// Build a state of --size bytes in a fresh local cluster, wipe one backup and time how long
    /// it takes to fetch and install the state, and how long a backup restarted with its
    /// write-ahead log takes to replay it, next to this machine's disk and hashing limits.
    StateTransfer(crate::transfer_bench::StateTransferArgs),
}

/// Runs `tessera bench` or its subcommand.
pub async fn run_command(command: BenchCommand) -> anyhow::Result<()> {
    match command.subcommand {
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
    fn name(self) -> &'static str {
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
    let workspace = Workspace::new(args.dir.clone())?;
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
    initialise(executable, dir, system.usig(), BENCH_BASE_PORT)?;
    if let Some(window) = args.window {
        set_window(dir, window)?;
    }
    let (cluster, secrets) = load_cluster(dir, None)?;
    let options = ClientOptions {
        unreplicated: system == System::Unreplicated,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    match system {
        System::Unreplicated => {
            let mut server = ChildGuard::spawn(
                executable,
                &["unreplicated", "--dir"],
                dir,
                "unreplicated.log",
            )?;
            server
                .wait_listening(&cluster.replicas[0].client_address, Duration::from_secs(20))
                .await?;
            let measurement = generate_load(cluster, secrets, options, args).await;
            match (measurement, server.exit_report()?) {
                (Err(error), Some(report)) => Err(error.context(report)),
                (measurement, _) => measurement,
            }
        }
        System::Minbft | System::MinbftEd25519 | System::MinbftUsigd | System::MinbftTpm => {
            let mut local = crate::local::LocalCluster::start(dir, executable)?;
            // Waiting and stopping poll with sleeps; keep them off the async threads. Dropping
            // the cluster on any error path kills the replicas.
            let mut local = tokio::task::spawn_blocking(move || {
                local.wait_ready(Duration::from_secs(30)).map(|()| local)
            })
            .await??;
            let measurement = generate_load(cluster, secrets, options, args).await;
            tokio::task::spawn_blocking(move || local.stop()).await??;
            measurement
        }
    }
}

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

/// First port of the benchmark's clusters (replicas, then clients at +100).
const BENCH_BASE_PORT: u16 = 7600;

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
        // Away from `tessera up`'s default ports, so a running local cluster does not collide.
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

/// Runs the load generator on its own runtime (by default single-threaded, so it takes at most
/// one core away from the servers it measures).
async fn generate_load(
    cluster: tessera_types::cluster::ClusterConfig,
    secrets: tessera_types::cluster::ClientSecrets,
    options: ClientOptions,
    args: &BenchArgs,
) -> anyhow::Result<Measurement> {
    let args = args.clone();
    // Dropping this future (Ctrl-C) drops `_stop`, which ends the load runtime at once rather
    // than at the end of the measurement.
    let (_stop, mut stopped) = tokio::sync::watch::channel(());
    tokio::task::spawn_blocking(move || {
        let runtime = if args.load_threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.load_threads as usize)
                .enable_all()
                .build()
        }
        .context("cannot start the load generator's runtime")?;
        runtime.block_on(async move {
            let load = async {
                let client = Client::connect(cluster, secrets, options).await?;
                drive(client, &args).await
            };
            tokio::select! {
                result = load => result,
                // Only fails, when the sender is dropped: nothing is ever sent.
                _ = stopped.changed() => Err(anyhow!("stopped")),
            }
        })
    })
    .await
    .map_err(|error| anyhow!("load generator panicked: {error}"))?
}

/// Results of all sessions of one run.
struct Tally {
    latency: LatencyHistogram,
    errors: u64,
    last_error: Option<String>,
}

async fn drive(client: Client, args: &BenchArgs) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let end = measure_from + args.duration;
    // One tally for all sessions: a lock taken once per request, uncontended on the default
    // single-threaded load runtime, and memory that does not grow with the session count.
    let tally = Arc::new(Mutex::new(Tally {
        latency: LatencyHistogram::new(),
        errors: 0,
        last_error: None,
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
        tasks.push(tokio::spawn(run_session(
            session,
            workload,
            measure_from,
            end,
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
    let operations = tally.latency.count();
    if operations == 0 {
        bail!(
            "no request completed in {:?}{}",
            args.warmup + args.duration,
            tally
                .last_error
                .as_ref()
                .map(|error| format!(" (last error: {error})"))
                .unwrap_or_default()
        );
    }
    Ok(Measurement {
        operations,
        errors: tally.errors,
        ops_per_sec: operations as f64 / args.duration.as_secs_f64(),
        p50_us: tally.latency.quantile(0.5),
        p99_us: tally.latency.quantile(0.99),
        p999_us: tally.latency.quantile(0.999),
        last_error: tally.last_error.clone(),
        stats: client.stats(),
    })
}

/// One session's closed loop: a request, its reply, the next request. Requests that complete
/// inside the measured window are counted.
async fn run_session(
    mut session: Invoker,
    mut workload: Workload,
    measure_from: Instant,
    end: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    while Instant::now() < end {
        let (command, is_write) = workload.next_command();
        let sent = Instant::now();
        let outcome = session.invoke(command.encode()).await;
        let done = Instant::now();
        let measured = measure_from <= done && done <= end;
        let outcome = outcome.and_then(|bytes| check_response(&bytes, is_write));
        match outcome {
            Ok(()) if measured => {
                let Ok(mut tally) = tally.lock() else { return };
                tally.latency.record((done - sent).as_micros() as u64);
            }
            Ok(()) => {}
            Err(error) => {
                let Ok(mut tally) = tally.lock() else { return };
                tally.errors += u64::from(measured);
                tally.last_error = Some(error.to_string());
            }
        }
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
            random: SplitMix64(
                args.seed ^ (u64::from(session_index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
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
fn key_bytes(index: u64, size: usize) -> Vec<u8> {
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
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }
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

/// A JSON string literal.
fn json_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            control if (control as u32) < 0x20 => {
                quoted.push_str(&format!("\\u{:04x}", control as u32))
            }
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

/// Latency histogram in microseconds, log-linear like HDR histograms: exact below 128 µs,
/// then 64 buckets per power of two (relative error under 1.6%), up to 2^32 µs.
struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

/// Values below this are counted exactly.
const EXACT_BELOW: u64 = 128;
/// Buckets per power of two above [`EXACT_BELOW`].
const BUCKETS_PER_OCTAVE: u64 = 64;
/// Largest recordable value; larger ones count as this.
const LATENCY_MAX_US: u64 = (1 << 32) - 1;

impl LatencyHistogram {
    fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: vec![0; Self::index(LATENCY_MAX_US) + 1],
            total: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < EXACT_BELOW {
            return value as usize;
        }
        let magnitude = 63 - u64::from(value.leading_zeros()); // floor(log2 value) >= 7
        let shift = magnitude - 6;
        let top = value >> shift; // in [64, 128)
        (EXACT_BELOW + (magnitude - 7) * BUCKETS_PER_OCTAVE + (top - BUCKETS_PER_OCTAVE)) as usize
    }

    /// The highest value that falls in bucket `index`.
    fn highest_in(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT_BELOW {
            return index;
        }
        let octave = (index - EXACT_BELOW) / BUCKETS_PER_OCTAVE;
        let top = BUCKETS_PER_OCTAVE + (index - EXACT_BELOW) % BUCKETS_PER_OCTAVE;
        let shift = octave + 1;
        ((top + 1) << shift) - 1
    }

    fn record(&mut self, value_us: u64) {
        self.counts[Self::index(value_us.min(LATENCY_MAX_US))] += 1;
        self.total += 1;
    }

    fn count(&self) -> u64 {
        self.total
    }

    /// The smallest bucket bound at or below which `quantile` of the values lie.
    fn quantile(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::highest_in(index);
            }
        }
        LATENCY_MAX_US
    }
}

/// The benchmark's working directory: a given one, or a temporary one removed at the end.
pub(crate) struct Workspace {
    pub(crate) path: PathBuf,
    remove: std::cell::Cell<bool>,
}

impl Workspace {
    pub(crate) fn new(dir: Option<PathBuf>) -> anyhow::Result<Workspace> {
        let (path, remove) = match dir {
            Some(path) => (path, false),
            None => {
                let unique = format!(
                    "tessera-bench-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|elapsed| elapsed.as_nanos())
                        .unwrap_or(0)
                );
                (std::env::temp_dir().join(unique), true)
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Workspace {
            path,
            remove: std::cell::Cell::new(remove),
        })
    }

    pub(crate) fn keep(&self) {
        if self.remove.replace(false) {
            eprintln!("keeping {} for its logs", self.path.display());
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.remove.get() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed (and reaped) when dropped.
struct ChildGuard {
    child: Child,
    log_path: PathBuf,
}

impl ChildGuard {
    /// Starts `executable <arguments> <dir>` with its output in `dir/<log>`.
    fn spawn(
        executable: &Path,
        arguments: &[&str],
        dir: &Path,
        log: &str,
    ) -> anyhow::Result<ChildGuard> {
        let log_path = dir.join(log);
        let log_file = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Process::new(executable)
            .args(arguments)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start `tessera {}`", arguments.join(" ")))?;
        Ok(ChildGuard { child, log_path })
    }

    /// If the process has exited: its status and the end of its log.
    fn exit_report(&mut self) -> anyhow::Result<Option<String>> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(5).collect();
        tail.reverse();
        Ok(Some(format!(
            "the server exited ({status}): {}",
            tail.join(" | ")
        )))
    }

    /// Waits until `address` accepts connections, failing early (with the end of the log) if
    /// the process exits first — e.g. because another process holds its port.
    async fn wait_listening(&mut self, address: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(report) = self.exit_report()? {
                bail!("{report} before listening on {address}");
            }
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the server did not listen on {address} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    fn the_histogram_is_exact_when_small_and_within_two_percent_above() {
        let mut histogram = LatencyHistogram::new();
        assert_eq!(histogram.quantile(0.5), 0);
        for value in 1..=100 {
            histogram.record(value);
        }
        assert_eq!(histogram.count(), 100);
        assert_eq!(histogram.quantile(0.5), 50);
        assert_eq!(histogram.quantile(0.99), 99);
        assert_eq!(histogram.quantile(1.0), 100);
        for value in [128, 1_000, 12_345, 999_999, 60_000_000, LATENCY_MAX_US] {
            let bound = LatencyHistogram::highest_in(LatencyHistogram::index(value));
            assert!(
                bound >= value && (bound - value) as f64 <= value as f64 * 0.016,
                "{value} -> {bound}"
            );
        }
        // Bucket bounds increase strictly, so quantiles are monotonic.
        let bounds: Vec<u64> = (0..histogram.counts.len())
            .map(LatencyHistogram::highest_in)
            .collect();
        assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(*bounds.last().unwrap(), LATENCY_MAX_US);
        histogram.record(u64::MAX);
        assert_eq!(histogram.quantile(1.0), LATENCY_MAX_US);
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
}
