//! The `tessera` command: write a cluster, run replicas, run a local cluster, inspect it, and
//! talk to it (`kv`, `bench`).

mod bench;
mod chart;
mod compare;
mod gateway;
mod histogram;
mod json;
mod kv;
mod local;
mod process;
mod transfer_bench;
mod usig_bench;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use rand::rngs::OsRng;
use std::fs::{OpenOptions, Permissions};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tessera_node::setup::{generate_cluster, ClusterFiles, ClusterSpec};
use tessera_types::cluster::{
    ClientSecrets, ClusterConfig, ReplicaEndpoint, ReplicaSecrets, UsigKind,
};
use tessera_types::wire::{ClientToReplica, ReplicaStatus, ReplicaToClient};
use tessera_types::{ProtocolConfig, ReplicaId};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use local::LocalCluster;

/// How long `tessera up` waits for every client port.
const UP_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one status query.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest status answer accepted.
const STATUS_FRAME_BYTES_MAX: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: intrusion-tolerant replicated services (MinBFT with a trusted USIG counter)",
    long_about = "Tessera: intrusion-tolerant replicated services (MinBFT with a trusted USIG counter).\n\n\
                  Quick start:\n  tessera up                      # writes .tessera/ and starts 3 replicas\n  \
                  tessera kv set hello world      # in another terminal\n  tessera status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new cluster: cluster.toml plus fresh secret files for every replica and client.
    Init(InitArgs),
    /// Run one replica of a cluster until Ctrl-C or SIGTERM.
    Replica(ReplicaArgs),
    /// Run the unreplicated baseline (same client port and store, no agreement) on replica 0's
    /// client address, until Ctrl-C or SIGTERM.
    Unreplicated(DirArgs),
    /// Start every replica of a local cluster as child processes (creating the cluster first if
    /// needed) and keep them running until Ctrl-C.
    Up(UpArgs),
    /// Show each replica's view, progress and health.
    Status(StatusArgs),
    /// Run one key-value command against the cluster.
    Kv(kv::KvArgs),
    /// Benchmark the cluster against the unreplicated baseline (`bench compare`: against Redis
    /// and etcd too; `bench state-transfer`: state transfer and log replay of a large state).
    Bench(bench::BenchCommand),
    /// Serve Redis clients (RESP2/RESP3) on a TCP port, as one client of the cluster.
    Gateway(gateway::GatewayArgs),
    /// Run the USIG daemon of one replica: it owns the USIG key and counter and serves the
    /// replica over a Unix socket (see docs/OPERATIONS.md, "usigd").
    Usigd(tessera_usigd::cli::UsigdOptions),
    /// USIG hardware setup (TPM 2.0).
    #[command(subcommand)]
    Usig(UsigCommand),
}

#[derive(Subcommand, Debug)]
enum UsigCommand {
    /// Create the TPM USIG's counter index and restricted attestation key (or check existing
    /// ones) and print the public data to enrol in cluster.toml. Safe to re-run.
    Provision(ProvisionArgs),
    /// Measure create_ui and verify_ui latency (p50, p99) of every USIG backend side by side
    /// (starts its own usigd and swtpm).
    Bench(usig_bench::UsigBenchArgs),
}

#[derive(clap::Args, Debug)]
struct ProvisionArgs {
    /// The TPM: `swtpm:127.0.0.1:PORT` or a device such as `/dev/tpmrm0`.
    #[arg(long)]
    tpm: tessera_tpm::TpmTarget,
    /// NV index of the counter (hex accepted with 0x).
    #[arg(long, value_parser = parse_handle, default_value = "0x01500101")]
    nv_index: u32,
    /// Persistent handle of the attestation key (hex accepted with 0x).
    #[arg(long, value_parser = parse_handle, default_value = "0x81010101")]
    ak_handle: u32,
}

fn parse_handle(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|error| format!("`{text}`: {error}"))
}

/// USIG backends `tessera init` can configure.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum UsigChoice {
    /// In-process HMAC-SHA256 (every replica holds every USIG key: testing and measurement).
    Hmac,
    /// In-process Ed25519 (public-key certificates; the key lives in the replica process).
    Ed25519,
    /// Ed25519 from `tessera usigd`, one daemon per replica owning the key and a persisted
    /// counter (`up` starts them; elsewhere run them under their own user).
    Usigd,
    /// TPM 2.0 (`up` starts and enrols one swtpm per replica; elsewhere run
    /// `tessera usig provision`).
    Tpm,
}

impl From<UsigChoice> for UsigKind {
    fn from(choice: UsigChoice) -> UsigKind {
        match choice {
            UsigChoice::Hmac => UsigKind::Hmac,
            UsigChoice::Ed25519 => UsigKind::Ed25519,
            UsigChoice::Usigd => UsigKind::Usigd,
            UsigChoice::Tpm => UsigKind::Tpm,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct InitArgs {
    /// Directory to write the cluster into (created if missing).
    #[arg(long, default_value = ".tessera")]
    dir: PathBuf,
    /// Number of replicas.
    #[arg(long, default_value_t = 3)]
    n: u32,
    /// Number of Byzantine replicas to tolerate (MinBFT needs n ≥ 2f+1).
    #[arg(long, default_value_t = 1)]
    f: u32,
    /// USIG backend.
    #[arg(long, value_enum, default_value_t = UsigChoice::Hmac)]
    usig: UsigChoice,
    /// Replica i listens for replicas on 127.0.0.1:BASE+i, for clients on 127.0.0.1:BASE+100+i
    /// and for metrics scrapes on 127.0.0.1:BASE+150+i.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// Number of client credentials to create (client-<id>.secret.toml, ids from 0).
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Replace an existing cluster in --dir (its keys are lost).
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct ReplicaArgs {
    /// Cluster directory written by `tessera init`.
    #[arg(long, default_value = ".tessera")]
    dir: PathBuf,
    /// Which replica to run (reads replica-<ID>.secret.toml).
    #[arg(long)]
    id: u32,
    /// The replica's write-ahead log [default: <DIR>/data/replica-<ID>.wal]. The replica logs
    /// every input there before acting on it and replays it on start, so it survives kill -9.
    /// Clusters with the usigd or tpm USIG run without one (their counters cannot replay).
    #[arg(long, conflicts_with = "no_wal")]
    wal: Option<PathBuf>,
    /// Run without a write-ahead log: the replica starts empty each time. Only safe when its
    /// USIG starts afresh too.
    #[arg(long)]
    no_wal: bool,
    /// Replace the log with one that starts with a snapshot of the replica once the log
    /// holds this many bytes and at least as many as the last snapshot; 0: never (the log
    /// grows for ever). Suffixes: KiB, MiB, GiB.
    #[arg(long, default_value = "64MiB", value_parser = transfer_bench::parse_size)]
    snapshot_after: u64,
    /// Fetch state with this strategy instead of cluster.toml's `[protocol] state_transfer`:
    /// merkle, latency-first, bandwidth-first-1 or bandwidth-first-2 (docs/STATE.md §2). A
    /// local choice; the write-ahead log records it, so a restart must keep it.
    #[arg(long)]
    transfer_strategy: Option<tessera_types::TransferStrategy>,
    /// The replica's log was lost (or must not be trusted and was moved away): start empty in a
    /// new USIG epoch, which the group installs before it counts, and fetch the state
    /// (docs/PROTOCOL.md §8). Refused if the log exists: a replica with a log restarts from it.
    /// Only for hmac and ed25519 clusters; usigd and tpm replicas do this by themselves.
    #[arg(long, conflicts_with = "no_wal")]
    new_epoch: bool,
    /// Keep only the current log: a snapshot deletes the log it replaces instead of keeping it
    /// as <WAL>.prev, the older checkpoint a restart falls back to when the newest snapshot is
    /// damaged. Halves the disk the replica's state takes.
    #[arg(long, conflicts_with = "no_wal")]
    no_previous_log: bool,
    /// Refuse to start from a damaged log instead of salvaging it. By default the replica keeps
    /// what is valid (the log up to the damage, the previous log, or nothing), keeps the damaged
    /// file as <WAL>.damaged-<ms>, and rejoins in a new USIG epoch, fetching what it lacks
    /// (docs/STATE.md §5).
    #[arg(long, conflicts_with = "no_wal")]
    no_salvage: bool,
}

#[derive(clap::Args, Debug)]
struct DirArgs {
    /// Cluster directory written by `tessera init`.
    #[arg(long, default_value = ".tessera")]
    dir: PathBuf,
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Cluster directory; a new cluster is written there if it has no cluster.toml.
    #[arg(long, default_value = ".tessera")]
    dir: PathBuf,
    /// Number of replicas (only when creating the cluster).
    #[arg(long)]
    n: Option<u32>,
    /// Byzantine replicas tolerated (only when creating the cluster).
    #[arg(long)]
    f: Option<u32>,
    /// USIG backend (only when creating the cluster).
    #[arg(long, value_enum)]
    usig: Option<UsigChoice>,
    /// First port (only when creating the cluster; see `tessera init --help`).
    #[arg(long)]
    base_port: Option<u16>,
    /// Where the Redis gateway listens.
    #[arg(long, default_value = gateway::DEFAULT_LISTEN)]
    gateway_listen: String,
    /// Do not start the Redis gateway.
    #[arg(long)]
    no_gateway: bool,
    /// Where the gateway serves Prometheus metrics (`GET /metrics`).
    #[arg(long, default_value = gateway::DEFAULT_METRICS_LISTEN)]
    gateway_metrics_listen: String,
    /// Leave a replica that exits unexpectedly stopped. By default a replica of an hmac or
    /// ed25519 cluster is restarted from its write-ahead log (at most 5 times a minute).
    #[arg(long)]
    no_restart: bool,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// Cluster directory written by `tessera init`.
    #[arg(long, default_value = ".tessera")]
    dir: PathBuf,
    /// Redraw the table in place until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Time between redraws with --watch: seconds (`2`, `2s`) or milliseconds (`500ms`),
    /// from 100ms to 1h.
    #[arg(long, default_value = "1s", value_parser = parse_interval, requires = "watch")]
    interval: Duration,
}

/// Parses a watch interval (`2`, `2s`, `500ms`) within [100 ms, 1 h].
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = kv::parse_duration(text)?;
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&interval) {
        return Err(format!("`{}` is outside 100ms..1h", text.trim()));
    }
    Ok(interval)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log_level = match cli.command {
        Command::Replica(_)
        | Command::Unreplicated(_)
        | Command::Up(_)
        | Command::Gateway(_)
        | Command::Usigd(_) => "info",
        _ => "warn",
    };
    init_logging(default_log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => {
            init(&args)?;
            println!("Start it with: tessera up --dir {}", args.dir.display());
            Ok(())
        }
        Command::Replica(args) => run_replica(args).await,
        Command::Unreplicated(args) => run_unreplicated(args).await,
        Command::Up(args) => up(args).await,
        Command::Status(args) => status(args).await,
        Command::Kv(args) => kv::run(args).await,
        Command::Bench(command) => bench::run_command(command).await,
        Command::Gateway(args) => gateway::run(args).await,
        // The daemon is synchronous (one thread per connection); keep it off the async workers.
        Command::Usigd(options) => tokio::task::spawn_blocking(move || options.run())
            .await
            .context("usigd thread failed")?
            .context("usigd"),
        Command::Usig(UsigCommand::Provision(args)) => {
            let enrollment = tokio::task::spawn_blocking(move || {
                tessera_tpm::provision(&args.tpm, args.nv_index, args.ak_handle)
            })
            .await
            .context("provisioning thread failed")?
            .context("TPM provisioning")?;
            println!("# TPM USIG enrolment: put this line in this replica's [[replicas]] entry of cluster.toml");
            print!("{}", tessera_tpm::provision::enrollment_toml(&enrollment));
            Ok(())
        }
        Command::Usig(UsigCommand::Bench(args)) => {
            tokio::task::spawn_blocking(move || usig_bench::run(args))
                .await
                .context("benchmark thread failed")?
        }
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                None
            }
        };
    let sigterm = async {
        match terminate.as_mut() {
            Some(stream) => {
                stream.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sigterm => {}
    }
}

// ---------------------------------------------------------------------------------------------
// init

fn replica_secret_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("replica-{id}.secret.toml"))
}

fn client_secret_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("client-{id}.secret.toml"))
}

/// Writes `contents` to `path` with permissions `mode`, set before any byte is written.
fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to a new file; an overwritten one keeps its old permissions otherwise.
    file.set_permissions(Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn to_toml<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    toml::to_string_pretty(value).context("cannot serialize a cluster file")
}

/// `tessera init`: writes a cluster and checks it by reading it back.
fn init(args: &InitArgs) -> anyhow::Result<ClusterConfig> {
    let cluster_path = args.dir.join("cluster.toml");
    if cluster_path.exists() && !args.force {
        bail!(
            "{} already exists: refusing to overwrite a cluster. Pass --force to replace it \
             (its keys are lost), or choose another --dir",
            cluster_path.display()
        );
    }
    let spec = ClusterSpec {
        protocol: ProtocolConfig {
            n: args.n,
            f: args.f,
            ..ProtocolConfig::default()
        },
        usig: args.usig.into(),
        host: "127.0.0.1".into(),
        base_port: args.base_port,
        clients: args.clients,
    };
    let mut files = generate_cluster(&spec, &mut OsRng).context("cannot create this cluster")?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    if args.force {
        remove_old_secret_files(&args.dir)?;
        // The old replicas' logs belong to the old keys: a new cluster starts empty.
        let data = args.dir.join("data");
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("cannot remove the old cluster's {}", data.display()))?;
        }
    }
    local::place_external_usigs(&args.dir, args.base_port, &mut files)?;
    write_file(&cluster_path, &files.cluster.to_toml(), 0o644)?;
    for secrets in &files.replicas {
        write_file(
            &replica_secret_path(&args.dir, secrets.replica),
            &to_toml(secrets)?,
            0o600,
        )?;
    }
    for secrets in &files.clients {
        write_file(
            &client_secret_path(&args.dir, secrets.id),
            &to_toml(secrets)?,
            0o600,
        )?;
    }
    let cluster = verify_written(&args.dir, &files)?;
    println!(
        "Wrote a cluster of {} replicas (f = {}, {} USIG) and {} client credentials to {}",
        args.n,
        args.f,
        tessera_node::usig_name(cluster.usig),
        args.clients,
        args.dir.display()
    );
    Ok(cluster)
}

/// Removes the secret files of a cluster being replaced, so none of its keys linger.
fn remove_old_secret_files(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_secret = (name.ends_with(".secret.toml")
            && (name.starts_with("replica-") || name.starts_with("client-")))
            || (name.starts_with("usigd-")
                && (name.ends_with(".key") || name.ends_with(".counter")));
        if is_secret {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Reads the written files back through the same parsers the replicas and clients use.
fn verify_written(dir: &Path, files: &ClusterFiles) -> anyhow::Result<ClusterConfig> {
    let cluster = local::read_cluster(dir)?;
    if cluster != files.cluster {
        bail!("cluster.toml does not read back as written");
    }
    for id in 0..cluster.replicas.len() as u32 {
        let secrets = read_replica_secrets(dir, id, &cluster)?;
        tessera_node::ClientKeys::load(&cluster, &secrets)
            .context("replica secrets do not match cluster.toml")?;
        // usigd and TPM USIGs live in processes that are not running yet (`up` starts them).
        if matches!(cluster.usig, UsigKind::Hmac | UsigKind::Ed25519) {
            tessera_node::build_usig(&cluster, &secrets, ReplicaId(id))
                .context("USIG keys do not match cluster.toml")?;
        }
    }
    for secrets in &files.clients {
        let path = client_secret_path(dir, secrets.id);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let parsed = ClientSecrets::from_toml(&text, &cluster)
            .with_context(|| format!("invalid {}", path.display()))?;
        if &parsed != secrets {
            bail!("{} does not read back as written", path.display());
        }
    }
    Ok(cluster)
}

fn read_replica_secrets(
    dir: &Path,
    id: u32,
    cluster: &ClusterConfig,
) -> anyhow::Result<ReplicaSecrets> {
    let path = replica_secret_path(dir, id);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is --id right? the cluster has {} replicas)",
            path.display(),
            cluster.replicas.len()
        )
    })?;
    let secrets = ReplicaSecrets::from_toml(&text, cluster)
        .with_context(|| format!("invalid {}", path.display()))?;
    if secrets.replica != id {
        bail!(
            "{} belongs to replica {}, not {id}",
            path.display(),
            secrets.replica
        );
    }
    Ok(secrets)
}

// ---------------------------------------------------------------------------------------------
// replica, unreplicated

async fn run_replica(args: ReplicaArgs) -> anyhow::Result<()> {
    let mut cluster = local::read_cluster(&args.dir)?;
    if let Some(strategy) = args.transfer_strategy {
        cluster.protocol.state_transfer = strategy;
    }
    if args.id as usize >= cluster.replicas.len() {
        bail!(
            "--id {} is not a replica of this cluster (ids 0..{})",
            args.id,
            cluster.replicas.len()
        );
    }
    let secrets = read_replica_secrets(&args.dir, args.id, &cluster)?;
    let wal = match (&args.wal, cluster.usig) {
        _ if args.no_wal => None,
        (Some(path), _) => Some(path.clone()),
        (None, UsigKind::Hmac | UsigKind::Ed25519) => Some(local::wal_path(&args.dir, args.id)),
        (None, UsigKind::Usigd | UsigKind::Tpm) => None,
    };
    if args.new_epoch && wal.is_none() {
        bail!(
            "--new-epoch is for replicas with a write-ahead log (hmac and ed25519 clusters): a \
             usigd or tpm replica starts a new epoch by itself when its USIG spoke before"
        );
    }
    let durability = wal.map(|log| tessera_node::Durability {
        log,
        snapshot_after_log_bytes: args.snapshot_after,
        new_epoch: args.new_epoch,
        keep_previous_log: !args.no_previous_log,
        salvage: !args.no_salvage,
    });
    tessera_node::run_replica(cluster, secrets, durability, shutdown_signal())
        .await
        .with_context(|| format!("replica {} failed", args.id))
}

async fn run_unreplicated(args: DirArgs) -> anyhow::Result<()> {
    let cluster = local::read_cluster(&args.dir)?;
    let secrets = read_replica_secrets(&args.dir, 0, &cluster)?;
    tessera_node::run_unreplicated(cluster, secrets, shutdown_signal())
        .await
        .context("the unreplicated server failed")
}

// ---------------------------------------------------------------------------------------------
// up

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let cluster_path = args.dir.join("cluster.toml");
    if cluster_path.exists() {
        let cluster = local::read_cluster(&args.dir)?;
        let mismatched = args.n.is_some_and(|n| n != cluster.protocol.n)
            || args.f.is_some_and(|f| f != cluster.protocol.f)
            || args
                .usig
                .is_some_and(|usig| UsigKind::from(usig) != cluster.usig)
            || args.base_port.is_some();
        if mismatched {
            eprintln!(
                "note: {} already exists, so --n/--f/--usig/--base-port are ignored; \
                 run `tessera init --force --dir {}` with them to replace the cluster",
                cluster_path.display(),
                args.dir.display()
            );
        }
    } else {
        let defaults = InitArgs {
            dir: args.dir.clone(),
            n: args.n.unwrap_or(3),
            f: args.f.unwrap_or(1),
            usig: args.usig.unwrap_or(UsigChoice::Hmac),
            base_port: args.base_port.unwrap_or(7000),
            clients: 4,
            force: false,
        };
        init(&defaults)?;
    }
    let binary = std::env::current_exe().context("cannot find the tessera executable")?;
    let mut cluster = LocalCluster::start(&args.dir, &binary)?;
    if let Err(error) = cluster.wait_ready(UP_READY_TIMEOUT) {
        let _ = cluster.stop();
        return Err(error);
    }
    let gateway = if args.no_gateway {
        None
    } else {
        start_up_gateway(&args).await
    };
    print_endpoints(&cluster, gateway);

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut running = cluster.cluster().replicas.len();
    // A replica comes back without contradicting itself: from its write-ahead log (hmac,
    // ed25519), or empty in a new USIG epoch when its daemon or TPM spoke before (usigd, tpm;
    // docs/PROTOCOL.md §8).
    let disabled = if args.no_restart {
        Some(" (--no-restart)")
    } else {
        None
    };
    let mut supervisor = Supervisor::new(running, disabled);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                for (id, status) in cluster.poll_exits() {
                    running -= 1;
                    let log = cluster.log_path(id);
                    match supervisor.exited(id, Instant::now()) {
                        Some(delay) => eprintln!(
                            "replica {id} exited unexpectedly ({status}); restarting it from its \
                             write-ahead log in {delay:?}. Log: {}",
                            log.display()
                        ),
                        None => eprintln!(
                            "replica {id} exited unexpectedly ({status}); the others keep running{}. \
                             Log: {}",
                            supervisor.why_not(id),
                            log.display()
                        ),
                    }
                }
                for id in supervisor.due(Instant::now()) {
                    cluster.restart_replica(id)?;
                    running += 1;
                    println!(
                        "replica {id} restarted, pid {}",
                        cluster.pid(id).map_or_else(|| "-".into(), |pid| pid.to_string())
                    );
                }
                if running == 0 && !supervisor.any_pending() {
                    bail!("every replica has exited; see the logs in {}", args.dir.join("logs").display());
                }
            }
        }
    }
    println!("Stopping the replicas...");
    cluster.stop()?;
    println!("Stopped.");
    Ok(())
}

/// How `tessera up` restarts replicas that exit: after 1 s, doubling with each restart in the
/// last minute, and not at all after [`Supervisor::RESTARTS_PER_MINUTE_MAX`] of them (a replica
/// that keeps failing — a corrupt log, a taken port — needs a person, not a loop).
struct Supervisor {
    /// Why replicas are not restarted at all, if they are not.
    disabled: Option<&'static str>,
    /// Per replica, when it was restarted in the last minute.
    recent: Vec<Vec<Instant>>,
    /// Per replica, when a scheduled restart is due.
    pending: Vec<Option<Instant>>,
}

impl Supervisor {
    const RESTARTS_PER_MINUTE_MAX: usize = 5;
    const WINDOW: Duration = Duration::from_secs(60);
    const FIRST_DELAY: Duration = Duration::from_secs(1);

    fn new(replicas: usize, disabled: Option<&'static str>) -> Supervisor {
        Supervisor {
            disabled,
            recent: vec![Vec::new(); replicas],
            pending: vec![None; replicas],
        }
    }

    /// Replica `id` exited at `now`: the delay before its restart, or `None` if it stays down.
    fn exited(&mut self, id: u32, now: Instant) -> Option<Duration> {
        if self.disabled.is_some() {
            return None;
        }
        let recent = &mut self.recent[id as usize];
        recent.retain(|at| now.duration_since(*at) < Self::WINDOW);
        if recent.len() >= Self::RESTARTS_PER_MINUTE_MAX {
            return None;
        }
        let delay = Self::FIRST_DELAY * 2u32.pow(recent.len() as u32);
        recent.push(now + delay);
        self.pending[id as usize] = Some(now + delay);
        Some(delay)
    }

    fn why_not(&self, id: u32) -> String {
        match self.disabled {
            Some(reason) => reason.to_string(),
            None => format!(
                " (not restarted again: {} restarts within a minute)",
                self.recent[id as usize].len()
            ),
        }
    }

    /// Replicas whose restart is due at `now` (each returned once).
    fn due(&mut self, now: Instant) -> Vec<u32> {
        let mut due = Vec::new();
        for (id, pending) in self.pending.iter_mut().enumerate() {
            if pending.is_some_and(|at| at <= now) {
                *pending = None;
                due.push(id as u32);
            }
        }
        due
    }

    fn any_pending(&self) -> bool {
        self.pending.iter().any(Option::is_some)
    }
}

/// Starts the gateway in this process; a gateway that cannot start (its port is taken, say)
/// is reported, and the cluster keeps running without it.
async fn start_up_gateway(args: &UpArgs) -> Option<UpGateway> {
    let options = tessera_gateway::GatewayOptions::default();
    let started = gateway::start(&args.dir, &args.gateway_listen, None, options, false).await;
    match started.and_then(|gateway| Ok((gateway.local_addr()?, gateway))) {
        Ok((address, gateway)) => {
            // Metrics are an extra: a taken port costs the endpoint, not the gateway.
            let metrics = match gateway::serve_metrics(&gateway, &args.gateway_metrics_listen).await
            {
                Ok(metrics) => Some(metrics),
                Err(error) => {
                    eprintln!(
                        "warning: no gateway metrics: {error:#}; use --gateway-metrics-listen ADDRESS"
                    );
                    None
                }
            };
            tokio::spawn(async move {
                if let Err(error) = gateway.run(std::future::pending()).await {
                    eprintln!("the Redis gateway stopped: {error}");
                }
            });
            Some(UpGateway { address, metrics })
        }
        Err(error) => {
            eprintln!(
                "warning: no Redis gateway: {error:#}; use --gateway-listen ADDRESS, or --no-gateway"
            );
            None
        }
    }
}

/// Where the gateway `tessera up` started listens.
struct UpGateway {
    address: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
}

fn print_endpoints(local: &LocalCluster, gateway: Option<UpGateway>) {
    let cluster = local.cluster();
    let dir = local.dir();
    println!(
        "Tessera is running: {} replicas, f = {}, MinBFT with the {} USIG",
        cluster.replicas.len(),
        cluster.protocol.f,
        tessera_node::usig_name(cluster.usig)
    );
    for replica in &cluster.replicas {
        println!(
            "  replica {}  clients {}  replicas {}  pid {}  log {}",
            replica.id,
            replica.client_address,
            replica.replica_address,
            local
                .pid(replica.id)
                .map_or_else(|| "-".into(), |pid| pid.to_string()),
            local.log_path(replica.id).display()
        );
    }
    let metrics: Vec<String> = cluster
        .replicas
        .iter()
        .filter(|replica| !replica.metrics_address.is_empty())
        .map(|replica| format!("http://{}/metrics", replica.metrics_address))
        .collect();
    if !metrics.is_empty() {
        println!("Metrics: {}", metrics.join("  "));
    }
    let shown_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    println!("Cluster directory: {}", shown_dir.display());
    println!("Try:   tessera kv --dir {} set hello world", dir.display());
    println!("       tessera kv --dir {} get hello", dir.display());
    println!("       tessera status --dir {}", dir.display());
    if let Some(UpGateway { address, metrics }) = gateway {
        println!(
            "Redis: {}   (gateway on {address})",
            gateway::redis_cli_line(address)
        );
        if let Some(metrics) = metrics {
            println!("Gateway metrics: http://{metrics}/metrics");
        }
    }
    println!("Press Ctrl-C to stop.");
}

// ---------------------------------------------------------------------------------------------
// status

/// Asks one replica for its status.
pub(crate) async fn query_status(address: &str) -> anyhow::Result<ReplicaStatus> {
    let exchange = async {
        let stream = TcpStream::connect(address)
            .await
            .context("cannot connect")?;
        let (read_half, mut write_half) = stream.into_split();
        let request = tessera_types::encode(&ClientToReplica::Status);
        tessera_node::frame::write_client_frame(&mut write_half, &request).await?;
        write_half.flush().await?;
        let mut reader = BufReader::new(read_half);
        let answer =
            tessera_node::frame::read_client_frame(&mut reader, STATUS_FRAME_BYTES_MAX).await?;
        match tessera_types::decode::<ReplicaToClient>(&answer, STATUS_FRAME_BYTES_MAX)? {
            ReplicaToClient::Status(status) => Ok(status),
            ReplicaToClient::Error(message) => bail!("replica refused: {message}"),
            ReplicaToClient::Reply { .. } => bail!("unexpected reply to a status query"),
        }
    };
    tokio::time::timeout(STATUS_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| bail!("no answer within {STATUS_TIMEOUT:?}"))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let cluster = local::read_cluster(&args.dir)?;
    if !args.watch {
        print!("{}", status_table(&cluster).await);
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(args.interval);
    // A slow round of queries delays the next redraw instead of bunching redraws up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            () = &mut shutdown => {
                if terminal {
                    // Show the cursor again and leave the prompt below the table.
                    writeln!(stdout, "\x1b[?25h")?;
                    stdout.flush()?;
                }
                return Ok(());
            }
            _ = ticker.tick() => {
                let table = status_table(&cluster).await;
                let footer = format!(
                    "(refreshing every {:?}; Ctrl-C to stop)\n",
                    args.interval
                );
                if terminal {
                    // Home the cursor and hide it, redraw over the old table, then clear
                    // whatever the previous (longer) table left below: no flicker from a
                    // full clear.
                    write!(stdout, "\x1b[?25l\x1b[H{}{footer}\x1b[J", table.replace('\n', "\x1b[K\n"))?;
                } else {
                    // Not a terminal (a pipe or a file): one table after another.
                    writeln!(stdout, "{table}")?;
                }
                stdout.flush()?;
            }
        }
    }
}

async fn status_table(cluster: &ClusterConfig) -> String {
    let queries = cluster.replicas.iter().map(|replica| {
        let address = replica.client_address.clone();
        tokio::spawn(async move { query_status(&address).await })
    });
    let mut rows = Vec::new();
    for (replica, query) in cluster.replicas.iter().zip(queries.collect::<Vec<_>>()) {
        let answer = match query.await {
            Ok(answer) => answer,
            Err(error) => Err(anyhow::anyhow!("status query failed: {error}")),
        };
        rows.push((replica, answer));
    }
    format_status_table(&rows)
}

/// A replica's health as the status table shows it.
fn health(answer: &anyhow::Result<ReplicaStatus>) -> &'static str {
    match answer {
        Err(_) => "down",
        Ok(status) if status.view_changing => "view-changing",
        Ok(_) => "ok",
    }
}

/// Renders the status table: one row per replica, with its lag behind the most advanced
/// replica that answered (in executed sequence numbers).
fn format_status_table(rows: &[(&ReplicaEndpoint, anyhow::Result<ReplicaStatus>)]) -> String {
    let most_advanced = rows
        .iter()
        .filter_map(|(_, answer)| answer.as_ref().ok())
        .map(|status| status.last_executed.0)
        .max()
        .unwrap_or(0);
    let mut table = format!(
        "{:<7} {:<21} {:<13} {:>5} {:>7} {:>13} {:>10} {:>6} {:>8} {:>10} {:>10}\n",
        "replica",
        "address",
        "health",
        "view",
        "primary",
        "last executed",
        "stable",
        "lag",
        "pending",
        "usig",
        "executed"
    );
    for (endpoint, answer) in rows {
        match answer {
            Ok(status) => table.push_str(&format!(
                "{:<7} {:<21} {:<13} {:>5} {:>7} {:>13} {:>10} {:>6} {:>8} {:>10} {:>10}\n",
                endpoint.id,
                endpoint.client_address,
                health(answer),
                status.view.0,
                status.primary.0,
                status.last_executed.0,
                status.stable_checkpoint.0,
                most_advanced.saturating_sub(status.last_executed.0),
                status.pending_requests,
                status.usig_counter,
                status.requests_executed
            )),
            Err(error) => table.push_str(&format!(
                "{:<7} {:<21} {:<13} ({error:#})\n",
                endpoint.id,
                endpoint.client_address,
                health(answer)
            )),
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_backs_off_and_gives_up_on_a_replica_that_keeps_failing() {
        let start = Instant::now();
        let mut supervisor = Supervisor::new(3, None);
        let mut now = start;
        let mut delays = Vec::new();
        while let Some(delay) = supervisor.exited(1, now) {
            assert!(supervisor.due(now).is_empty(), "not due before its delay");
            now += delay;
            assert_eq!(
                supervisor.due(now),
                vec![1],
                "due once its delay has passed"
            );
            assert!(supervisor.due(now).is_empty(), "returned once");
            delays.push(delay.as_secs());
        }
        assert_eq!(delays, vec![1, 2, 4, 8, 16]);
        assert!(supervisor.why_not(1).contains("5 restarts"));
        // Another replica is not affected, and a minute later replica 1 may restart again.
        assert_eq!(supervisor.exited(2, now), Some(Duration::from_secs(1)));
        assert!(supervisor
            .exited(1, now + Duration::from_secs(61))
            .is_some());
    }

    #[test]
    fn a_disabled_supervisor_restarts_nothing_and_says_why() {
        let mut supervisor = Supervisor::new(3, Some(" (--no-restart)"));
        assert_eq!(supervisor.exited(0, Instant::now()), None);
        assert!(!supervisor.any_pending());
        assert_eq!(supervisor.why_not(0), " (--no-restart)");
    }
    use clap::CommandFactory;

    fn init_args(dir: &Path) -> InitArgs {
        InitArgs {
            dir: dir.to_path_buf(),
            n: 3,
            f: 1,
            usig: UsigChoice::Hmac,
            base_port: 7000,
            clients: 2,
            force: false,
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn init_writes_a_cluster_that_reads_back_with_private_secrets() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("cluster");
        for usig in [UsigChoice::Hmac, UsigChoice::Ed25519] {
            let args = InitArgs {
                usig,
                force: true,
                ..init_args(&dir)
            };
            let cluster = init(&args).unwrap();
            assert_eq!(cluster.usig, UsigKind::from(usig));
            assert_eq!(cluster.replicas[2].client_address, "127.0.0.1:7102");
            assert_eq!(cluster.replicas[2].metrics_address, "127.0.0.1:7152");
            for path in [replica_secret_path(&dir, 0), client_secret_path(&dir, 1)] {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
        // Keys shared by two parties are equal in both files.
        let cluster = local::read_cluster(&dir).unwrap();
        let replica_1 = read_replica_secrets(&dir, 1, &cluster).unwrap();
        let replica_2 = read_replica_secrets(&dir, 2, &cluster).unwrap();
        assert_eq!(replica_1.peer_keys[2], replica_2.peer_keys[1]);
        assert_ne!(replica_1.peer_keys[2], replica_1.peer_keys[0]);
        let client_text = std::fs::read_to_string(client_secret_path(&dir, 1)).unwrap();
        let client = ClientSecrets::from_toml(&client_text, &cluster).unwrap();
        assert_eq!(client.replica_keys[2], replica_2.client_keys[1].key);
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let temp = tempfile::tempdir().unwrap();
        init(&init_args(temp.path())).unwrap();
        let error = init(&init_args(temp.path())).unwrap_err().to_string();
        assert!(error.contains("--force"), "{error}");
        let stale = client_secret_path(temp.path(), 1);
        let args = InitArgs {
            clients: 1,
            force: true,
            ..init_args(temp.path())
        };
        init(&args).unwrap();
        assert!(
            !stale.exists(),
            "secrets of the replaced cluster are removed"
        );
    }

    #[test]
    fn init_refuses_too_few_replicas_and_names_the_bound() {
        let temp = tempfile::tempdir().unwrap();
        let args = InitArgs {
            n: 2,
            ..init_args(temp.path())
        };
        let error = format!("{:#}", init(&args).unwrap_err());
        assert!(error.contains("2f+1"), "{error}");
        assert!(!temp.path().join("cluster.toml").exists());
    }

    fn endpoint(id: u32) -> ReplicaEndpoint {
        ReplicaEndpoint {
            id,
            replica_address: format!("127.0.0.1:{}", 7000 + id),
            client_address: format!("127.0.0.1:{}", 7100 + id),
            metrics_address: format!("127.0.0.1:{}", 7150 + id),
            usig_public_key: String::new(),
        }
    }

    fn status(id: u32, view: u64, changing: bool, last_executed: u64) -> ReplicaStatus {
        ReplicaStatus {
            replica: ReplicaId(id),
            view: tessera_types::View(view),
            primary: ReplicaId((view % 3) as u32),
            view_changing: changing,
            last_executed: tessera_types::SeqNum(last_executed),
            stable_checkpoint: tessera_types::SeqNum(last_executed / 10 * 10),
            pending_requests: 2,
            ..ReplicaStatus::default()
        }
    }

    #[test]
    fn status_table_shows_health_and_lag_behind_the_most_advanced_replica() {
        let endpoints: Vec<ReplicaEndpoint> = (0..4).map(endpoint).collect();
        let rows = vec![
            (&endpoints[0], Ok(status(0, 1, false, 57))),
            (&endpoints[1], Ok(status(1, 1, false, 50))),
            (&endpoints[2], Ok(status(2, 2, true, 44))),
            (&endpoints[3], Err(anyhow::anyhow!("connection refused"))),
        ];
        let table = format_status_table(&rows);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert_eq!(lines[0][..3], ["replica", "address", "health"], "{table}");
        // replica address health view primary last stable lag pending usig executed
        assert_eq!(
            lines[1],
            [
                "0",
                "127.0.0.1:7100",
                "ok",
                "1",
                "1",
                "57",
                "50",
                "0",
                "2",
                "0",
                "0"
            ]
        );
        assert_eq!(lines[2][2..8], ["ok", "1", "1", "50", "50", "7"], "{table}");
        assert_eq!(
            lines[3][2..8],
            ["view-changing", "2", "2", "44", "40", "13"],
            "{table}"
        );
        assert_eq!(lines[4][..3], ["3", "127.0.0.1:7103", "down"], "{table}");
        assert!(table.contains("connection refused"), "{table}");
    }

    #[test]
    fn status_table_with_every_replica_down_has_no_lag_to_show() {
        let endpoints: Vec<ReplicaEndpoint> = (0..2).map(endpoint).collect();
        let rows: Vec<_> = endpoints
            .iter()
            .map(|endpoint| (endpoint, Err(anyhow::anyhow!("timed out"))))
            .collect();
        let table = format_status_table(&rows);
        assert_eq!(table.matches("down").count(), 2, "{table}");
    }

    #[test]
    fn watch_intervals_parse_with_units_and_bounds() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "fast", "10ms", "2h", "5000s", "-1s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
