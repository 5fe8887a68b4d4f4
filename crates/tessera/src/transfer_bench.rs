//! `tessera bench state-transfer`: how fast a wiped replica fetches a large state from the
//! others, and how fast a replica restarted with its write-ahead log replays back to the same
//! state, next to what this machine's disk and hashing allow for the same bytes, measured in the
//! same run.
//!
//! One run, in order:
//! 1. machine limits for `--size` bytes: write + fdatasync to a file in the workspace (the disk
//!    the replicas' logs are on), BLAKE3, and the LtHash element hashing the store does per entry;
//! 2. a fresh local MinBFT cluster (n = 3, HMAC USIG, ports from `--base-port`) whose store
//!    limit fits the state;
//! 3. a state of `--size` bytes (keys plus values, as the store counts them) written through the
//!    client library with `--in-flight` SETs in flight, then small writes until a stable
//!    checkpoint covers it on every replica;
//! 4. validation: one backup is killed with SIGKILL and restarted with its log; timed until its
//!    status shows the others' stable checkpoint, digest and last executed sequence number;
//! 5. for each strategy: the other backup is killed, its log deleted, and it is restarted empty;
//!    timed from the restart until its status shows the others' stable checkpoint and stable
//!    state digest (the full state fetched, checked and installed).
//!
//! The run fails, printing no numbers, unless the wiped replica ends with the others' stable
//! state digest at their stable checkpoint after receiving at least `--size` bytes of partition
//! chunks. It owns its cluster for its whole life: every process it starts is killed when the
//! [`LocalCluster`] drops, on success, error, panic and Ctrl-C alike.

use crate::bench::initialise;
use crate::kv::load_cluster;
use crate::local::{self, LocalCluster};
use crate::process::Workspace;
use anyhow::{anyhow, bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tessera_client::{Client, ClientOptions, KvClient};
use tessera_crypto::{DigestBuilder, ElementHasher, LtHash};
use tessera_types::cluster::ClusterConfig;
use tessera_types::wire::ReplicaStatus;
use tessera_types::{ReplicaId, TransferStrategy};

/// Smallest state: below this the run measures start-up, not transfer.
const SIZE_MIN_BYTES: u64 = 1 << 10;
/// Largest state: every replica holds the whole state in memory and the wiped one stages a
/// second copy while it arrives, so three replicas need about four times this in RAM.
const SIZE_MAX_BYTES: u64 = 16 << 30;
/// Room in the store beyond the state for the small writes that complete a checkpoint.
const STORE_HEADROOM_BYTES: u64 = 1 << 20;
/// Largest value: the store's default `value_bytes_max`.
const VALUE_BYTES_MAX: u32 = 512 << 10;
/// Largest buffer of pseudo-random bytes the values and the limit measurements are cut from;
/// larger than any cache, so hashing it measures memory-speed hashing, as a transfer does.
const PATTERN_BYTES_MAX: u64 = 256 << 20;
/// Size of each write in the disk measurement.
const DISK_CHUNK_BYTES: usize = 4 << 20;
/// How often status and metrics are polled while waiting.
const POLL: Duration = Duration::from_millis(20);
/// How long the cluster may take to open its ports.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a checkpoint to become stable after the state is written.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);
/// Fixed part of the time a restarted replica may take to catch up.
const CATCH_UP_TIMEOUT_BASE: Duration = Duration::from_secs(60);
/// Variable part: one second per this many bytes of state (a floor of 4 MiB/s, far below any
/// machine this runs on, so only a stuck transfer times out).
const CATCH_UP_BYTES_PER_SECOND_FLOOR: u64 = 4 << 20;
/// Longer than the period at which replicas publish their status (100 ms).
const STATUS_SETTLE: Duration = Duration::from_millis(250);
/// How long idle replicas may take to show the same status.
const AGREEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most small writes sent to complete a stable checkpoint (a few checkpoint intervals).
const FILLER_WRITES_MAX: u64 = 4096;
/// Key prefix of the state's entries; the index follows, zero-padded to ten digits.
const KEY_PREFIX: &str = "xfer:";
/// Key of the small writes that complete a checkpoint.
const FILLER_KEY: &[u8] = b"xfer-filler";
/// Largest metrics page accepted.
const METRICS_BYTES_MAX: usize = 1 << 20;
/// Lines of the replica log that mark the phases of a transfer (`tessera-core`'s and
/// `tessera-node`'s messages).
const LOG_RUNNING: &str = "replica running";
const LOG_REQUESTING: &str = "requesting state transfer";
const LOG_FETCHING: &str = "fetching state";
const LOG_COMPLETE: &str = "state transfer complete";
const LOG_REPLAYED: &str = "replayed the write-ahead log";
/// The writer's line once the install snapshot replaced the log and held outputs left.
const LOG_RELEASED: &str = "released the outputs held since a state transfer";

/// Arguments of `tessera bench state-transfer`.
#[derive(clap::Args, Debug, Clone)]
pub struct StateTransferArgs {
    /// State to build, in bytes of keys plus values (as the store counts them), with an
    /// optional unit: 100MiB, 1GiB, 500MB, 65536. From 1KiB to 16GiB.
    #[arg(long, value_parser = parse_size_bounded)]
    pub size: u64,
    /// Bytes per value (the last value is shorter, so the state has --size bytes, or at most
    /// one 15-byte key more).
    #[arg(long, default_value_t = 256 << 10,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(VALUE_BYTES_MAX)))]
    pub value_size: u32,
    /// SET requests in flight while the state is built.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub in_flight: u32,
    /// Transfer strategies to measure, one wipe each, in this order: merkle, latency-first,
    /// bandwidth-first-1, bandwidth-first-2 (docs/STATE.md §2), comma-separated, or all.
    #[arg(long, default_value = "all", value_parser = Strategies::parse)]
    pub strategies: Strategies,
    /// First port of the cluster: replicas on BASE+i, clients on BASE+100+i, metrics on
    /// BASE+150+i.
    #[arg(long, default_value_t = 47_000,
          value_parser = clap::value_parser!(u16).range(1024..=65_000))]
    pub base_port: u16,
    /// Working directory (default: a fresh temporary directory, removed afterwards unless the
    /// run fails).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The strategies one run measures, in order: `all` or comma-separated names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Strategies(pub Vec<TransferStrategy>);

impl Strategies {
    fn parse(text: &str) -> Result<Strategies, String> {
        if text == "all" {
            return Ok(Strategies(TransferStrategy::ALL.to_vec()));
        }
        text.split(',')
            .map(|name| {
                name.parse()
                    .map_err(|error: String| format!("{error}, or all"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Strategies)
    }
}

/// Parses a byte count: digits and an optional unit, `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of
/// 1024) or `kB`, `MB`, `GB`, `TB` (powers of 1000). Letter case is ignored (`1gib` is `1GiB`).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let not_a_size = || format!("`{text}` is not a size; write e.g. 100MiB, 1GiB or 65536");
    let number: u64 = number.parse().map_err(|_| not_a_size())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(not_a_size()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
}

/// [`parse_size`] within [`SIZE_MIN_BYTES`, `SIZE_MAX_BYTES`].
fn parse_size_bounded(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !(SIZE_MIN_BYTES..=SIZE_MAX_BYTES).contains(&size) {
        return Err(format!(
            "{size} bytes is outside 1KiB..16GiB (every replica holds the whole state in memory)"
        ));
    }
    Ok(size)
}

// ---------------------------------------------------------------------------------------------
// The state

/// Which entries make up a state of a given size.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StateLayout {
    keys: u64,
    value_bytes: u64,
    /// The last entry's value, shortened so the state has exactly the asked size, or empty
    /// when what is left is no longer than a key (the state is then up to a key larger).
    last_value_bytes: u64,
}

impl StateLayout {
    fn new(size: u64, value_bytes: u64) -> StateLayout {
        let entry_bytes = KEY_BYTES + value_bytes;
        let keys = size.div_ceil(entry_bytes).max(1);
        let before_last = (keys - 1) * entry_bytes;
        let last_value_bytes = (size - before_last).saturating_sub(KEY_BYTES);
        StateLayout {
            keys,
            value_bytes,
            last_value_bytes,
        }
    }

    /// Keys plus values, as the store counts them.
    fn bytes(&self) -> u64 {
        (self.keys - 1) * (KEY_BYTES + self.value_bytes) + KEY_BYTES + self.last_value_bytes
    }

    fn value_bytes_of(&self, index: u64) -> u64 {
        if index + 1 == self.keys {
            self.last_value_bytes
        } else {
            self.value_bytes
        }
    }
}

/// Length of every state key: the prefix and ten digits.
const KEY_BYTES: u64 = KEY_PREFIX.len() as u64 + 10;

fn key_of(index: u64) -> Vec<u8> {
    format!("{KEY_PREFIX}{index:010}").into_bytes()
}

/// Pseudo-random bytes the values and the measurements are cut from, so no layer can
/// shortcut runs of equal bytes.
struct Pattern(Vec<u8>);

impl Pattern {
    fn new(bytes: usize) -> Pattern {
        let mut state = 0x5eed_u64;
        let mut pattern = Vec::with_capacity(bytes + 8);
        while pattern.len() < bytes {
            // SplitMix64.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut mixed = state;
            mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            pattern.extend_from_slice(&(mixed ^ (mixed >> 31)).to_le_bytes());
        }
        pattern.truncate(bytes);
        Pattern(pattern)
    }

    /// Value `index` of `length` bytes: a slice at an offset that differs from one index to the
    /// next, so consecutive values differ.
    fn value(&self, index: u64, length: u64) -> &[u8] {
        let length = length as usize;
        let room = (self.0.len() - length) as u64 + 1;
        let offset = (index.wrapping_mul(4_099).wrapping_mul(64) % room) as usize;
        &self.0[offset..offset + length]
    }
}

// ---------------------------------------------------------------------------------------------
// Machine limits

/// What this machine does with the state's bytes without any replica involved, each on one core.
#[derive(Clone, Debug, PartialEq)]
struct MachineLimits {
    /// Writing the bytes in 4 MiB pieces to a file in the workspace, then one fdatasync.
    disk_write_fsync_bytes_per_sec: f64,
    /// BLAKE3 over the bytes.
    blake3_bytes_per_sec: f64,
    /// The store's LtHash element hash (BLAKE3 extended to 2 KiB, added lane-wise) of every
    /// (key, value) entry of the state.
    lthash_bytes_per_sec: f64,
}

impl MachineLimits {
    /// What a transfer cannot beat here: it must hash every byte it receives (the entry hash is
    /// how a partition is checked) and write every byte to the disk (the receiving replica
    /// logs every message before acting on it); loopback TCP is faster than both.
    fn limit_bytes_per_sec(&self) -> f64 {
        self.disk_write_fsync_bytes_per_sec
            .min(self.blake3_bytes_per_sec)
            .min(self.lthash_bytes_per_sec)
    }
}

fn measure_limits(
    directory: &Path,
    layout: &StateLayout,
    pattern: &Pattern,
) -> anyhow::Result<MachineLimits> {
    let bytes = layout.bytes();
    let disk_seconds = time_disk_write(directory, bytes, pattern)?;
    let blake3_seconds = time_blake3(bytes, pattern);
    let lthash_seconds = time_lthash(layout, pattern);
    Ok(MachineLimits {
        disk_write_fsync_bytes_per_sec: rate(bytes, disk_seconds),
        blake3_bytes_per_sec: rate(bytes, blake3_seconds),
        lthash_bytes_per_sec: rate(bytes, lthash_seconds),
    })
}

fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9)
}

/// Seconds to write `bytes` to a new file in `directory` and fdatasync it; the file is removed.
fn time_disk_write(directory: &Path, bytes: u64, pattern: &Pattern) -> anyhow::Result<f64> {
    let path = directory.join("disk-probe.bin");
    let chunk = &pattern.0[..DISK_CHUNK_BYTES.min(pattern.0.len())];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let piece = &chunk[..(chunk.len() as u64).min(left) as usize];
        file.write_all(piece)
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= piece.len() as u64;
    }
    file.sync_data()
        .with_context(|| format!("cannot fdatasync {}", path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(seconds)
}

/// Seconds to BLAKE3 `bytes` bytes of the pattern (cycling through it in 4 MiB pieces).
fn time_blake3(bytes: u64, pattern: &Pattern) -> f64 {
    let started = Instant::now();
    let mut hasher = DigestBuilder::new("tessera.bench.blake3");
    let mut offset = 0usize;
    let mut left = bytes;
    while left > 0 {
        if offset >= pattern.0.len() {
            offset = 0;
        }
        let end = pattern.0.len().min(offset + DISK_CHUNK_BYTES);
        let piece = &pattern.0[offset..end];
        let piece = &piece[..(piece.len() as u64).min(left) as usize];
        hasher.bytes(piece);
        left -= piece.len() as u64;
        offset += piece.len();
    }
    std::hint::black_box(hasher.finish());
    started.elapsed().as_secs_f64()
}

/// Seconds to add every entry of the state to an LtHash, as the store does per entry.
fn time_lthash(layout: &StateLayout, pattern: &Pattern) -> f64 {
    let hasher = ElementHasher::new(tessera_kv::ENTRY_DOMAIN);
    let started = Instant::now();
    let mut sum = LtHash::new();
    for index in 0..layout.keys {
        let key = key_of(index);
        let value = pattern.value(index, layout.value_bytes_of(index));
        sum.add(&hasher, &[&key, value]);
    }
    std::hint::black_box(sum.is_zero());
    started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Results

/// How the state was built.
#[derive(Clone, Debug, PartialEq)]
struct Build {
    seconds: f64,
    /// Sequence number of the stable checkpoint that covers the state on every replica.
    stable_checkpoint: u64,
    /// Small writes sent after the state to complete that checkpoint.
    filler_writes: u64,
}

/// A replica restarted with its write-ahead log.
#[derive(Clone, Debug, PartialEq)]
struct Validation {
    replica: u32,
    /// From the restart until its status shows the others' stable checkpoint, digest and last
    /// executed sequence number.
    seconds: f64,
    /// The replica's own figure for the replay (its log line), if found.
    replay_seconds: Option<f64>,
    /// Size of the log it replayed.
    wal_bytes: u64,
}

/// Times from the restart (seconds) to each milestone in the wiped replica's log.
#[derive(Clone, Debug, Default, PartialEq)]
struct Milestones {
    running: Option<f64>,
    requesting: Option<f64>,
    fetching: Option<f64>,
    complete: Option<f64>,
    /// The snapshot of the installed state replaced the log: the state is durable and the
    /// replica's held outputs leave (docs/STATE.md §4).
    durable: Option<f64>,
}

/// One strategy's transfer to a wiped replica.
#[derive(Clone, Debug, PartialEq)]
struct Transfer {
    strategy: TransferStrategy,
    replica: u32,
    /// Partition chunk bytes the wiped replica received (its metrics).
    bytes: u64,
    /// Key and value bytes it installed (its log line), if found.
    state_bytes: Option<u64>,
    /// From the restart until its status showed the agreed stable checkpoint and digest.
    seconds: f64,
    milestones: Milestones,
    /// Every replica's status at the end: (id, stable checkpoint, stable state digest).
    final_status: Vec<(u32, u64, String)>,
}

/// Everything one run measured.
#[derive(Clone, Debug, PartialEq)]
struct Report {
    size: u64,
    layout: StateLayout,
    limits: MachineLimits,
    build: Build,
    validation: Validation,
    transfers: Vec<Transfer>,
}

// ---------------------------------------------------------------------------------------------
// The run

/// Runs `tessera bench state-transfer`.
pub async fn run(args: StateTransferArgs) -> anyhow::Result<()> {
    if args.strategies.0.is_empty() {
        bail!("--strategies is empty; name at least one (merkle)");
    }
    let executable =
        std::env::current_exe().context("cannot find the tessera executable to start replicas")?;
    let workspace = Workspace::new(args.dir.clone(), "bench-state-transfer")?;
    let dir = workspace.path.join("cluster");
    let (result, interrupted) = tokio::select! {
        result = measure(&args, &executable, &workspace.path, &dir) => (result, false),
        _ = tokio::signal::ctrl_c() => (Err(anyhow!("interrupted")), true),
    };
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", json_report(&report));
            } else {
                print!("{}", table_report(&report));
            }
            Ok(())
        }
        Err(error) => {
            if !interrupted {
                workspace.keep();
            }
            Err(error.context(format!(
                "the state-transfer benchmark failed (replica logs in {})",
                dir.join("logs").display()
            )))
        }
    }
}

fn progress(args: &StateTransferArgs, message: &str) {
    if !args.json {
        eprintln!("{message}");
    }
}

async fn measure(
    args: &StateTransferArgs,
    executable: &Path,
    workspace: &Path,
    dir: &Path,
) -> anyhow::Result<Report> {
    let layout = StateLayout::new(args.size, u64::from(args.value_size));
    let pattern_bytes = args
        .size
        .min(PATTERN_BYTES_MAX)
        .max(u64::from(args.value_size));
    progress(
        args,
        &format!(
            "measuring this machine's limits for {} bytes",
            layout.bytes()
        ),
    );
    let (limits, pattern) = {
        let layout = layout.clone();
        let workspace = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let pattern = Pattern::new(pattern_bytes as usize);
            measure_limits(&workspace, &layout, &pattern).map(|limits| (limits, pattern))
        })
        .await
        .map_err(|error| anyhow!("the limit measurement panicked: {error}"))??
    };
    let pattern = Arc::new(pattern);

    initialise(executable, dir, "hmac", args.base_port)?;
    let cluster = fit_store(dir, layout.bytes())?;
    let mut local = start_cluster(dir, executable).await?;

    progress(
        args,
        &format!(
            "building the state: {} keys, {} bytes",
            layout.keys,
            layout.bytes()
        ),
    );
    let build = build_state(dir, &cluster, &layout, &pattern, args.in_flight).await?;
    let agreed = agreed_status(&cluster, None).await?;
    let backups: Vec<u32> = (0..cluster.replicas.len() as u32)
        .filter(|id| *id != agreed.primary.0)
        .collect();
    let [wiped, validated] = backups[..] else {
        bail!("expected two backups, found {backups:?}");
    };

    progress(
        args,
        &format!("validation: restarting replica {validated} with its log"),
    );
    let validation = measure_validation(&mut local, &cluster, validated, &agreed).await?;
    let mut transfers = Vec::new();
    for &strategy in &args.strategies.0 {
        progress(
            args,
            &format!(
                "state transfer ({}): wiping replica {wiped}",
                strategy.name()
            ),
        );
        transfers.push(
            measure_transfer(&mut local, &cluster, wiped, &agreed, strategy, args.size).await?,
        );
    }
    tokio::task::spawn_blocking(move || local.stop()).await??;
    Ok(Report {
        size: args.size,
        layout,
        limits,
        build,
        validation,
        transfers,
    })
}

/// Writes the state through the client library and completes a stable checkpoint covering it.
async fn build_state(
    dir: &Path,
    cluster: &ClusterConfig,
    layout: &StateLayout,
    pattern: &Arc<Pattern>,
    in_flight: u32,
) -> anyhow::Result<Build> {
    let started = Instant::now();
    let (client_cluster, secrets) = load_cluster(dir, None)?;
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let client = Client::connect(client_cluster, secrets, options)
        .await
        .context("cannot connect to the benchmark cluster")?;
    write_state(&client, layout, pattern, in_flight).await?;
    let (stable_checkpoint, filler_writes) = complete_checkpoint(&client, cluster).await?;
    Ok(Build {
        seconds: started.elapsed().as_secs_f64(),
        stable_checkpoint,
        filler_writes,
    })
}

/// Raises `[store] total_bytes_max` in `dir/cluster.toml` if the state would not fit the
/// default, and returns the cluster.
fn fit_store(dir: &Path, state_bytes: u64) -> anyhow::Result<ClusterConfig> {
    let mut cluster = local::read_cluster(dir)?;
    let needed = state_bytes + STORE_HEADROOM_BYTES;
    cluster.store.total_bytes_max = cluster.store.total_bytes_max.max(needed);
    cluster
        .validate()
        .context("the state does not fit any store limit the cluster accepts")?;
    let path = dir.join("cluster.toml");
    std::fs::write(&path, cluster.to_toml())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(cluster)
}

async fn start_cluster(dir: &Path, executable: &Path) -> anyhow::Result<LocalCluster> {
    let mut local = LocalCluster::start(dir, executable)?;
    // Waiting polls with sleeps: keep it off the async threads. Dropping the cluster on any
    // error path kills the replicas.
    tokio::task::spawn_blocking(move || local.wait_ready(READY_TIMEOUT).map(|()| local))
        .await
        .map_err(|error| anyhow!("waiting for the cluster panicked: {error}"))?
}

/// Writes every entry of `layout` with `in_flight` sessions, each one SET at a time.
async fn write_state(
    client: &Client,
    layout: &StateLayout,
    pattern: &Arc<Pattern>,
    in_flight: u32,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut sessions: tokio::task::JoinSet<anyhow::Result<()>> = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let mut kv = KvClient::new(client.session());
        let (next, pattern, layout) = (next.clone(), pattern.clone(), layout.clone());
        sessions.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= layout.keys {
                    return Ok(());
                }
                let value = pattern.value(index, layout.value_bytes_of(index)).to_vec();
                kv.set(key_of(index), value)
                    .await
                    .with_context(|| format!("SET of state entry {index} failed"))?;
            }
        });
    }
    while let Some(joined) = sessions.join_next().await {
        joined.map_err(|error| anyhow!("a load session panicked: {error}"))??;
    }
    Ok(())
}

/// Sends small writes, one at a time so each takes a sequence number of its own, until every
/// replica has a stable checkpoint covering everything executed so far — and at least two
/// checkpoint intervals in, since a wiped replica asks for state only when the group is more
/// than one interval ahead of it. Returns that checkpoint and the writes sent.
async fn complete_checkpoint(
    client: &Client,
    cluster: &ClusterConfig,
) -> anyhow::Result<(u64, u64)> {
    let interval = cluster.protocol.checkpoint_interval;
    // Replicas publish their status periodically: wait until what they publish includes the
    // last write (f+1 of them executed it before the client got its replies).
    tokio::time::sleep(STATUS_SETTLE).await;
    let statuses = all_statuses(cluster).await?;
    let executed = statuses
        .iter()
        .map(|status| status.last_executed.0)
        .max()
        .unwrap_or(0);
    let target = executed.div_ceil(interval).max(2) * interval;
    let mut kv = KvClient::new(client.session());
    let deadline = Instant::now() + CHECKPOINT_TIMEOUT;
    let mut writes = 0u64;
    loop {
        let statuses = all_statuses(cluster).await?;
        let stable = statuses.iter().map(|status| status.stable_checkpoint.0);
        if stable.clone().min().unwrap_or(0) >= target {
            return Ok((target, writes));
        }
        let behind = statuses
            .iter()
            .map(|status| status.last_executed.0)
            .max()
            .unwrap_or(0)
            < target;
        if behind {
            if writes >= FILLER_WRITES_MAX {
                bail!("{writes} small writes did not complete the checkpoint at {target}");
            }
            kv.set(FILLER_KEY, writes.to_le_bytes().to_vec())
                .await
                .context("a write completing the checkpoint failed")?;
            writes += 1;
        } else {
            tokio::time::sleep(POLL).await;
        }
        if Instant::now() >= deadline {
            bail!(
                "no stable checkpoint at {target} within {CHECKPOINT_TIMEOUT:?}: {}",
                describe(&statuses)
            );
        }
    }
}

/// Asks every replica for its status; fails if one does not answer.
async fn all_statuses(cluster: &ClusterConfig) -> anyhow::Result<Vec<ReplicaStatus>> {
    all_statuses_except(cluster, None).await
}

fn describe(statuses: &[ReplicaStatus]) -> String {
    statuses
        .iter()
        .map(|status| {
            format!(
                "replica {}: executed {} stable {} digest {}",
                status.replica.0,
                status.last_executed.0,
                status.stable_checkpoint.0,
                short(&status.stable_state_digest)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// The status every replica except `except` agrees on once the cluster is idle: the same
/// stable checkpoint, stable state digest and last executed sequence number. Waits for the last
/// writes to reach every replica's published status; fails if they still differ after that.
async fn agreed_status(
    cluster: &ClusterConfig,
    except: Option<u32>,
) -> anyhow::Result<ReplicaStatus> {
    let deadline = Instant::now() + AGREEMENT_TIMEOUT;
    loop {
        let statuses: Vec<ReplicaStatus> = all_statuses_except(cluster, except).await?;
        let first = &statuses[0];
        let agree = statuses.iter().all(|status| {
            (
                status.stable_checkpoint,
                &status.stable_state_digest,
                status.last_executed,
            ) == (
                first.stable_checkpoint,
                &first.stable_state_digest,
                first.last_executed,
            )
        });
        if agree && !first.stable_state_digest.is_empty() {
            return Ok(first.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "the replicas still disagree after {AGREEMENT_TIMEOUT:?} idle: {}",
                describe(&statuses)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Asks every replica but `except` for its status; fails if one does not answer.
async fn all_statuses_except(
    cluster: &ClusterConfig,
    except: Option<u32>,
) -> anyhow::Result<Vec<ReplicaStatus>> {
    let mut statuses = Vec::new();
    for replica in &cluster.replicas {
        if Some(replica.id) == except {
            continue;
        }
        statuses.push(
            crate::query_status(&replica.client_address)
                .await
                .with_context(|| format!("replica {} did not answer a status query", replica.id))?,
        );
    }
    Ok(statuses)
}

/// How long a replica may take to catch up with a state of `size` bytes.
fn catch_up_timeout(size: u64) -> Duration {
    CATCH_UP_TIMEOUT_BASE + Duration::from_secs(size / CATCH_UP_BYTES_PER_SECOND_FLOOR)
}

/// Polls replica `id` until its status has `agreed`'s stable checkpoint and digest (and, with
/// `executed`, its last executed sequence number); returns the seconds since `since`.
async fn wait_caught_up(
    local: &mut LocalCluster,
    cluster: &ClusterConfig,
    id: u32,
    agreed: &ReplicaStatus,
    executed: bool,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<(f64, ReplicaStatus)> {
    let address = &cluster.replica(ReplicaId(id)).client_address;
    let mut last_seen = None;
    loop {
        if let Ok(status) = crate::query_status(address).await {
            let stable_matches = status.stable_checkpoint == agreed.stable_checkpoint
                && status.stable_state_digest == agreed.stable_state_digest;
            let executed_matches = !executed || status.last_executed >= agreed.last_executed;
            if stable_matches && executed_matches {
                return Ok((since.elapsed().as_secs_f64(), status));
            }
            last_seen = Some(status);
        }
        if let Some((exited, status)) = local.poll_exits().into_iter().next() {
            bail!("replica {exited} exited ({status}) while catching up");
        }
        if since.elapsed() >= timeout {
            bail!(
                "replica {id} did not reach stable checkpoint {} with digest {} within {timeout:?}; last seen: {}",
                agreed.stable_checkpoint.0,
                short(&agreed.stable_state_digest),
                last_seen.map_or_else(|| "no answer".into(), |status| describe(&[status]))
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Kills backup `id` with SIGKILL, restarts it with its log and times it back to the others'
/// state.
async fn measure_validation(
    local: &mut LocalCluster,
    cluster: &ClusterConfig,
    id: u32,
    agreed: &ReplicaStatus,
) -> anyhow::Result<Validation> {
    let wal = local::wal_path(local.dir(), id);
    let log_offset = log_length(local, id);
    local.kill_replica(id)?;
    let wal_bytes = std::fs::metadata(&wal)
        .with_context(|| format!("replica {id} has no write-ahead log at {}", wal.display()))?
        .len();
    let started = Instant::now();
    local.restart_replica(id)?;
    let timeout = catch_up_timeout(wal_bytes);
    let (seconds, _) = wait_caught_up(local, cluster, id, agreed, true, started, timeout).await?;
    let log = read_log_since(local, id, log_offset);
    let replay_seconds = log
        .lines()
        .filter(|line| line.contains(LOG_REPLAYED))
        .filter_map(|line| field_f64(line, "seconds"))
        .next_back();
    Ok(Validation {
        replica: id,
        seconds,
        replay_seconds,
        wal_bytes,
    })
}

/// Wipes backup `id` (SIGKILL, its log deleted, restarted empty with `--new-epoch`) and times
/// the state transfer until its status shows the others' stable checkpoint and digest; checks
/// what it received.
async fn measure_transfer(
    local: &mut LocalCluster,
    cluster: &ClusterConfig,
    id: u32,
    agreed: &ReplicaStatus,
    strategy: TransferStrategy,
    size: u64,
) -> anyhow::Result<Transfer> {
    let wal = local::wal_path(local.dir(), id);
    let log_offset = log_length(local, id);
    local.kill_replica(id)?;
    std::fs::remove_file(&wal).with_context(|| {
        format!(
            "cannot delete replica {id}'s write-ahead log {}",
            wal.display()
        )
    })?;
    let started_wall = SystemTime::now();
    let started = Instant::now();
    // Its log is gone, so it comes back in a new USIG epoch (docs/STATE.md §5): restarting it
    // empty in its old epoch would certify counter values its peers have already seen.
    local.restart_replica_with(
        id,
        &[
            "--transfer-strategy".to_string(),
            strategy.name().to_string(),
            "--new-epoch".to_string(),
        ],
    )?;
    let (seconds, status) = wait_caught_up(
        local,
        cluster,
        id,
        agreed,
        false,
        started,
        catch_up_timeout(size),
    )
    .await?;
    // The installed state counts once its snapshot has replaced the log: until then the
    // replica holds its outputs back (docs/STATE.md §4).
    let seconds = wait_durable(local, id, log_offset, started, catch_up_timeout(size))
        .await?
        .max(seconds);
    let metrics_address = &cluster.replica(ReplicaId(id)).metrics_address;
    let metrics = scrape(metrics_address).await?;
    let bytes = metric(&metrics, "tessera_state_transfer_received_bytes_total")
        .context("the wiped replica's metrics have no received-bytes counter")?;
    let started_transfers = metric(&metrics, "tessera_state_transfers_started_total").unwrap_or(0);
    let log = read_log_since(local, id, log_offset);
    let milestones = milestones(&log, started_wall);
    let state_bytes = log
        .lines()
        .filter(|line| line.contains(LOG_COMPLETE))
        .filter_map(|line| field_u64(line, "bytes"))
        .next_back();
    // The others, to show they did not move while the wiped replica caught up.
    let others = agreed_status(cluster, Some(id)).await?;
    let transfer = Transfer {
        strategy,
        replica: id,
        bytes,
        state_bytes,
        seconds,
        milestones,
        final_status: final_status(cluster, id, &status, &others),
    };
    check_transfer(&transfer, agreed, started_transfers, size)?;
    Ok(transfer)
}

/// Polls replica `id`'s log (after `offset`) until a snapshot follows its transfer's install;
/// returns the seconds since `since`.
async fn wait_durable(
    local: &mut LocalCluster,
    id: u32,
    offset: u64,
    since: Instant,
    timeout: Duration,
) -> anyhow::Result<f64> {
    loop {
        let log = read_log_since(local, id, offset);
        let installed = log.find(LOG_COMPLETE);
        if installed.is_some_and(|at| log[at..].contains(LOG_RELEASED)) {
            return Ok(since.elapsed().as_secs_f64());
        }
        if let Some((exited, status)) = local.poll_exits().into_iter().next() {
            bail!("replica {exited} exited ({status}) while writing its snapshot");
        }
        if since.elapsed() >= timeout {
            bail!("replica {id} logged no snapshot after its state transfer within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn final_status(
    cluster: &ClusterConfig,
    wiped: u32,
    wiped_status: &ReplicaStatus,
    others: &ReplicaStatus,
) -> Vec<(u32, u64, String)> {
    // `others` is what every other replica reported (they agree, or `agreed_status` failed).
    (0..cluster.replicas.len() as u32)
        .map(|id| {
            let status = if id == wiped { wiped_status } else { others };
            (
                id,
                status.stable_checkpoint.0,
                status.stable_state_digest.clone(),
            )
        })
        .collect()
}

/// The checks that make the numbers mean something: the wiped replica really holds the agreed
/// state, fetched by a state transfer that moved at least the state's bytes.
fn check_transfer(
    transfer: &Transfer,
    agreed: &ReplicaStatus,
    started_transfers: u64,
    size: u64,
) -> anyhow::Result<()> {
    for (id, stable, digest) in &transfer.final_status {
        if *stable != agreed.stable_checkpoint.0 || *digest != agreed.stable_state_digest {
            bail!(
                "replica {id} ended at stable checkpoint {stable} with digest {} instead of {} with {}",
                short(digest),
                agreed.stable_checkpoint.0,
                short(&agreed.stable_state_digest)
            );
        }
    }
    if started_transfers == 0 {
        bail!(
            "replica {} reached the agreed state without a state transfer",
            transfer.replica
        );
    }
    if transfer.bytes < size {
        bail!(
            "replica {} received {} bytes of partition chunks, less than the state's {size}",
            transfer.replica,
            transfer.bytes
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Replica logs and metrics

fn log_length(local: &LocalCluster, id: u32) -> u64 {
    std::fs::metadata(local.log_path(id))
        .map(|metadata| metadata.len())
        .unwrap_or(0)
}

/// What replica `id` logged after `offset` (its log is appended to across restarts).
fn read_log_since(local: &LocalCluster, id: u32, offset: u64) -> String {
    let bytes = std::fs::read(local.log_path(id)).unwrap_or_default();
    let start = (offset as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The value of ` name=VALUE` on a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pattern = format!(" {name}=");
    let start = line.find(&pattern)? + pattern.len();
    line[start..].split_whitespace().next()
}

fn field_f64(line: &str, name: &str) -> Option<f64> {
    field(line, name)?.parse().ok()
}

fn field_u64(line: &str, name: &str) -> Option<u64> {
    field(line, name)?.parse().ok()
}

/// Seconds since `since` at which the log first shows each milestone of a transfer.
fn milestones(log: &str, since: SystemTime) -> Milestones {
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0);
    let first = |message: &str| {
        log.lines()
            .filter(|line| line.contains(message))
            .find_map(line_time)
            .map(|time| time - since)
    };
    let complete = first(LOG_COMPLETE);
    // Held outputs leaving after the install: its snapshot made it durable.
    let durable = log
        .lines()
        .filter(|line| line.contains(LOG_RELEASED))
        .filter_map(line_time)
        .map(|time| time - since)
        .find(|time| complete.is_some_and(|complete| *time >= complete));
    Milestones {
        running: first(LOG_RUNNING),
        requesting: first(LOG_REQUESTING),
        fetching: first(LOG_FETCHING),
        complete,
        durable,
    }
}

/// Unix time of a log line that starts with an RFC 3339 UTC timestamp
/// (`2026-11-27T17:31:14.123456Z`, tracing-subscriber's format).
fn line_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date_parts = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
    );
    let mut time_parts = time.splitn(3, ':');
    let hours: i64 = time_parts.next()?.parse().ok()?;
    let minutes: i64 = time_parts.next()?.parse().ok()?;
    let seconds: f64 = time_parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hours * 3_600 + minutes * 60) as f64 + seconds)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the standard era-based conversion).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// One `GET /metrics` from a replica's metrics endpoint.
async fn scrape(address: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n")
            .await?;
        let mut page = Vec::new();
        (&mut stream)
            .take(METRICS_BYTES_MAX as u64)
            .read_to_end(&mut page)
            .await?;
        anyhow::Ok(String::from_utf8_lossy(&page).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("no metrics from {address} within 5 s"))?
        .with_context(|| format!("cannot scrape {address}"))
}

/// The value of counter `name` (one series) on a metrics page.
fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map(|value| value as u64)
}

// ---------------------------------------------------------------------------------------------
// Output

const MIB: f64 = (1 << 20) as f64;

impl Transfer {
    /// The state's bytes over the time: what the replica got, not what the strategy spent
    /// (latency-first receives f+1 copies; `bytes` counts them all).
    fn bytes_per_sec(&self) -> f64 {
        rate(self.state_bytes.unwrap_or(self.bytes), self.seconds)
    }

    /// Phase durations from the milestones: start-up (process start until it listens),
    /// detection (until it asks for state: it waits for a heartbeat showing it behind), summary
    /// (until a summary was checked and fetching starts), fetch and install, the snapshot that
    /// makes the installed state durable, and observation (until both the status poll saw the
    /// installed state and the snapshot was logged; status is published every 100 ms).
    fn phases(&self) -> [(&'static str, Option<f64>); 6] {
        let milestones = &self.milestones;
        let between = |from: Option<f64>, to: Option<f64>| Some(to? - from?);
        [
            ("start_seconds", milestones.running),
            (
                "detect_seconds",
                between(milestones.running, milestones.requesting),
            ),
            (
                "summary_seconds",
                between(milestones.requesting, milestones.fetching),
            ),
            (
                "fetch_install_seconds",
                between(milestones.fetching, milestones.complete),
            ),
            (
                "snapshot_seconds",
                between(milestones.complete, milestones.durable),
            ),
            (
                "observe_seconds",
                between(milestones.durable, Some(self.seconds)),
            ),
        ]
    }
}

fn json_number(value: Option<f64>) -> String {
    match value {
        Some(value) if value.is_finite() => format!("{value:.6}"),
        _ => "null".into(),
    }
}

/// The `--json` object. The top-level `bytes`, `seconds`, `bytes_per_sec`,
/// `fraction_of_limit` and `strategy` are the first strategy's; `strategies` has them all.
fn json_report(report: &Report) -> String {
    let limit = report.limits.limit_bytes_per_sec();
    let strategies: Vec<String> = report
        .transfers
        .iter()
        .map(|transfer| json_transfer(transfer, limit))
        .collect();
    let first = &report.transfers[0];
    let limits = &report.limits;
    let validation = &report.validation;
    format!(
        "{{\"size\":{},\"bytes\":{},\"seconds\":{},\"bytes_per_sec\":{},\
         \"limit_bytes_per_sec\":{},\"fraction_of_limit\":{},\"strategy\":\"{}\",\
         \"validation_seconds\":{},\
         \"state\":{{\"bytes\":{},\"keys\":{},\"value_size\":{},\"build_seconds\":{},\
         \"stable_checkpoint\":{},\"filler_writes\":{}}},\
         \"limits\":{{\"disk_write_fsync_bytes_per_sec\":{},\"blake3_bytes_per_sec\":{},\
         \"lthash_bytes_per_sec\":{},\"limit_bytes_per_sec\":{},\
         \"limit\":\"min(disk_write_fsync, blake3, lthash)\"}},\
         \"validation\":{{\"replica\":{},\"seconds\":{},\"replay_seconds\":{},\"wal_bytes\":{}}},\
         \"strategies\":[{}]}}",
        report.size,
        first.bytes,
        json_number(Some(first.seconds)),
        json_number(Some(first.bytes_per_sec())),
        json_number(Some(limit)),
        json_number(Some(first.bytes_per_sec() / limit)),
        first.strategy.name(),
        json_number(Some(validation.seconds)),
        report.layout.bytes(),
        report.layout.keys,
        report.layout.value_bytes,
        json_number(Some(report.build.seconds)),
        report.build.stable_checkpoint,
        report.build.filler_writes,
        json_number(Some(limits.disk_write_fsync_bytes_per_sec)),
        json_number(Some(limits.blake3_bytes_per_sec)),
        json_number(Some(limits.lthash_bytes_per_sec)),
        json_number(Some(limit)),
        validation.replica,
        json_number(Some(validation.seconds)),
        json_number(validation.replay_seconds),
        validation.wal_bytes,
        strategies.join(",")
    )
}

fn json_transfer(transfer: &Transfer, limit: f64) -> String {
    let phases: Vec<String> = transfer
        .phases()
        .iter()
        .map(|(name, value)| format!("\"{name}\":{}", json_number(*value)))
        .collect();
    let replicas: Vec<String> = transfer
        .final_status
        .iter()
        .map(|(id, stable, digest)| {
            // Digests are hex from the replicas' status: no character needs escaping, but
            // anything else is refused rather than risk broken JSON.
            let digest = if digest.chars().all(|character| character.is_ascii_hexdigit()) {
                digest.as_str()
            } else {
                "invalid"
            };
            format!(
                "{{\"replica\":{id},\"stable_checkpoint\":{stable},\"stable_state_digest\":\"{digest}\"}}"
            )
        })
        .collect();
    format!(
        "{{\"strategy\":\"{}\",\"replica\":{},\"bytes\":{},\"state_bytes\":{},\"seconds\":{},\
         \"bytes_per_sec\":{},\"fraction_of_limit\":{},\"phases\":{{{}}},\"final\":[{}]}}",
        transfer.strategy.name(),
        transfer.replica,
        transfer.bytes,
        transfer
            .state_bytes
            .map_or_else(|| "null".into(), |bytes| bytes.to_string()),
        json_number(Some(transfer.seconds)),
        json_number(Some(transfer.bytes_per_sec())),
        json_number(Some(transfer.bytes_per_sec() / limit)),
        phases.join(","),
        replicas.join(",")
    )
}

fn seconds_text(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |value| format!("{value:.2}"))
}

fn table_report(report: &Report) -> String {
    let limits = &report.limits;
    let limit = limits.limit_bytes_per_sec();
    let validation = &report.validation;
    let mut text = format!(
        "state: {} bytes in {} keys ({}-byte values), built in {:.1} s; stable checkpoint {}\n\
         machine limits for the same bytes (one core each):\n\
         \x20 disk write + fdatasync  {:>9.1} MiB/s\n\
         \x20 BLAKE3                  {:>9.1} MiB/s\n\
         \x20 LtHash entry hashing    {:>9.1} MiB/s\n\
         \x20 limit (the minimum)     {:>9.1} MiB/s\n\
         validation: replica {} restarted with its {:.1} MiB log was back at the agreed state after {:.2} s (replay logged: {} s)\n",
        report.layout.bytes(),
        report.layout.keys,
        report.layout.value_bytes,
        report.build.seconds,
        report.build.stable_checkpoint,
        limits.disk_write_fsync_bytes_per_sec / MIB,
        limits.blake3_bytes_per_sec / MIB,
        limits.lthash_bytes_per_sec / MIB,
        limit / MIB,
        validation.replica,
        validation.wal_bytes as f64 / MIB,
        validation.seconds,
        seconds_text(validation.replay_seconds),
    );
    text.push_str(&format!(
        "{:<17} {:>7} {:>12} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>13} {:>8} {:>8}\n",
        "strategy",
        "replica",
        "bytes",
        "seconds",
        "MiB/s",
        "of limit",
        "start",
        "detect",
        "summary",
        "fetch+install",
        "snapshot",
        "observe"
    ));
    for transfer in &report.transfers {
        let phases = transfer.phases();
        text.push_str(&format!(
            "{:<17} {:>7} {:>12} {:>8.2} {:>9.1} {:>9.3} {:>7} {:>7} {:>8} {:>13} {:>8} {:>8}\n",
            transfer.strategy.name(),
            transfer.replica,
            transfer.bytes,
            transfer.seconds,
            transfer.bytes_per_sec() / MIB,
            transfer.bytes_per_sec() / limit,
            seconds_text(phases[0].1),
            seconds_text(phases[1].1),
            seconds_text(phases[2].1),
            seconds_text(phases[3].1),
            seconds_text(phases[4].1),
            seconds_text(phases[5].1),
        ));
    }
    text.push_str(
        "seconds: from the wiped replica's restart until its status showed the agreed stable \
         checkpoint and digest and the snapshot of that state replaced its log (durable; its \
         outputs held until then); bytes: partition bytes received, every copy counted; MiB/s: \
         the state's bytes over seconds\n",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_are_all_or_named_in_order() {
        let names = |text: &str| -> Result<Vec<&'static str>, String> {
            Strategies::parse(text).map(|list| list.0.iter().map(|s| s.name()).collect())
        };
        assert_eq!(
            names("all").unwrap(),
            [
                "merkle",
                "latency-first",
                "bandwidth-first-1",
                "bandwidth-first-2"
            ]
        );
        assert_eq!(
            names("bandwidth-first-2,merkle").unwrap(),
            ["bandwidth-first-2", "merkle"]
        );
        let error = names("merkle,fastest").unwrap_err();
        assert!(
            error.contains("\"fastest\"") && error.contains("latency-first"),
            "{error}"
        );
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("8mib"), Ok(8 << 20));
        assert_eq!(parse_size(" 3 KiB "), Ok(3 << 10));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("7B"), Ok(7));
        for bad in ["", "MiB", "1.5GiB", "-1GiB", "1 GiBs", "1XB", "ten"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("64 bits"));
        assert!(parse_size_bounded("1023").is_err());
        assert_eq!(parse_size_bounded("1KiB"), Ok(1024));
        assert_eq!(parse_size_bounded("16GiB"), Ok(16 << 30));
        assert!(parse_size_bounded("17GiB").unwrap_err().contains("memory"));
    }

    #[test]
    fn a_layout_has_exactly_the_asked_bytes() {
        for (size, value) in [
            (8u64 << 20, 256u64 << 10),
            (1 << 30, 256 << 10),
            (100 << 20, 100_000),
            (1024, 256 << 10),
        ] {
            let layout = StateLayout::new(size, value);
            assert_eq!(layout.bytes(), size, "{size} {value}: {layout:?}");
            assert!(layout.last_value_bytes <= value);
            assert!(layout.last_value_bytes > 0, "{layout:?}");
        }
        // 1000 = 62 entries of 16 bytes + 8: no room for a 15-byte key, so one key more.
        let over = StateLayout::new(1000, 1);
        assert_eq!(
            (over.keys, over.last_value_bytes, over.bytes()),
            (63, 0, 1007)
        );
        // Nine bytes cannot hold one fifteen-byte key: the state is one key with no value.
        let tiny = StateLayout::new(9, 4);
        assert_eq!((tiny.keys, tiny.last_value_bytes, tiny.bytes()), (1, 0, 15));
        assert_eq!(key_of(42), b"xfer:0000000042");
        assert_eq!(key_of(42).len() as u64, KEY_BYTES);
    }

    #[test]
    fn values_come_from_the_pattern_and_differ() {
        let pattern = Pattern::new(1 << 20);
        assert_eq!(pattern.0.len(), 1 << 20);
        let first = pattern.value(0, 4096);
        let second = pattern.value(1, 4096);
        assert_eq!(first.len(), 4096);
        assert_ne!(first, second);
        assert_eq!(pattern.value(7, 1 << 20).len(), 1 << 20);
        assert_eq!(pattern.value(3, 0), b"");
    }

    #[test]
    fn log_lines_give_times_and_fields() {
        let line =
            "2026-11-27T17:31:14.250000Z  INFO core{replica=1}: tessera_core::minbft::transfer: \
                    state transfer complete replica=1 seq=256 bytes=8388608";
        let time = line_time(line).unwrap();
        // 2026-11-27 is day 20,784 since 1970-01-01.
        assert_eq!(days_from_civil(2026, 11, 27), 20_784);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert!((time - (20_784.0 * 86_400.0 + 17.0 * 3_600.0 + 31.0 * 60.0 + 14.25)).abs() < 1e-6);
        assert_eq!(field_u64(line, "bytes"), Some(8_388_608));
        assert_eq!(field_u64(line, "seq"), Some(256));
        assert_eq!(field_u64(line, "missing"), None);
        assert_eq!(line_time("not a log line"), None);
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(time - 1.5);
        let milestones = milestones(line, since);
        assert!((milestones.complete.unwrap() - 1.5).abs() < 1e-3);
        assert_eq!(milestones.fetching, None);
    }

    #[test]
    fn metrics_are_read_by_exact_name() {
        let page = "# HELP tessera_state_transfer_received_bytes Chunk bytes\n\
                    tessera_state_transfer_received_bytes_total{replica=\"1\"} 8392000\n\
                    tessera_state_transfers_started_total{replica=\"1\"} 1\n";
        assert_eq!(
            metric(page, "tessera_state_transfer_received_bytes_total"),
            Some(8_392_000)
        );
        assert_eq!(
            metric(page, "tessera_state_transfers_started_total"),
            Some(1)
        );
        assert_eq!(metric(page, "tessera_state_transfers"), None);
    }

    fn sample_report() -> Report {
        let layout = StateLayout::new(8 << 20, 256 << 10);
        let digest = "ab".repeat(32);
        Report {
            size: 8 << 20,
            layout,
            limits: MachineLimits {
                disk_write_fsync_bytes_per_sec: 400.0 * MIB,
                blake3_bytes_per_sec: 1000.0 * MIB,
                lthash_bytes_per_sec: 900.0 * MIB,
            },
            build: Build {
                seconds: 1.5,
                stable_checkpoint: 256,
                filler_writes: 220,
            },
            validation: Validation {
                replica: 2,
                seconds: 0.75,
                replay_seconds: None,
                wal_bytes: 17_000_000,
            },
            transfers: vec![Transfer {
                strategy: TransferStrategy::Merkle,
                replica: 1,
                bytes: 8_400_000,
                state_bytes: Some(8 << 20),
                seconds: 0.5,
                milestones: Milestones {
                    running: Some(0.05),
                    requesting: Some(0.25),
                    fetching: Some(0.26),
                    complete: Some(0.45),
                    durable: Some(0.48),
                },
                final_status: (0..3).map(|id| (id, 256, digest.clone())).collect(),
            }],
        }
    }

    #[test]
    fn the_json_report_has_the_documented_fields() {
        let report = sample_report();
        let text = json_report(&report);
        let value: serde_json::Value = serde_json::from_str(&text).expect(&text);
        assert_eq!(value["size"], 8 << 20);
        assert_eq!(value["bytes"], 8_400_000);
        assert_eq!(value["seconds"], 0.5);
        assert_eq!(value["strategy"], "merkle");
        assert_eq!(value["limit_bytes_per_sec"], 400.0 * MIB);
        assert_eq!(value["limits"]["limit_bytes_per_sec"], 400.0 * MIB);
        // The rate is the state's bytes (8 MiB), not every byte received.
        let expected_rate = f64::from(8 << 20) / 0.5;
        assert_eq!(value["bytes_per_sec"], expected_rate);
        let fraction = value["fraction_of_limit"].as_f64().unwrap();
        assert!((fraction - expected_rate / (400.0 * MIB)).abs() < 1e-6);
        assert_eq!(value["validation_seconds"], 0.75);
        assert_eq!(
            value["validation"]["replay_seconds"],
            serde_json::Value::Null
        );
        assert_eq!(value["state"]["bytes"], 8 << 20);
        assert_eq!(value["state"]["keys"], 32);
        let strategy = &value["strategies"][0];
        assert_eq!(strategy["strategy"], "merkle");
        assert_eq!(strategy["phases"]["start_seconds"], 0.05);
        let fetch = strategy["phases"]["fetch_install_seconds"]
            .as_f64()
            .unwrap();
        assert!((fetch - 0.19).abs() < 1e-6);
        let snapshot = strategy["phases"]["snapshot_seconds"].as_f64().unwrap();
        assert!((snapshot - 0.03).abs() < 1e-6);
        assert_eq!(strategy["final"].as_array().unwrap().len(), 3);
        assert_eq!(strategy["final"][1]["stable_state_digest"], "ab".repeat(32));
        let table = table_report(&report);
        assert!(table.contains("merkle"), "{table}");
        assert!(table.contains("400.0 MiB/s"), "{table}");
    }

    #[test]
    fn a_transfer_that_missed_the_agreed_state_or_moved_too_little_fails() {
        let report = sample_report();
        let transfer = &report.transfers[0];
        let agreed = ReplicaStatus {
            stable_checkpoint: tessera_types::SeqNum(256),
            stable_state_digest: "ab".repeat(32),
            ..ReplicaStatus::default()
        };
        check_transfer(transfer, &agreed, 1, 8 << 20).expect("a good transfer passes");
        let error = check_transfer(transfer, &agreed, 0, 8 << 20).unwrap_err();
        assert!(error.to_string().contains("without a state transfer"));
        let error = check_transfer(transfer, &agreed, 1, 9 << 20).unwrap_err();
        assert!(error.to_string().contains("less than the state"));
        let mut diverged = transfer.clone();
        diverged.final_status[1].2 = "cd".repeat(32);
        let error = check_transfer(&diverged, &agreed, 1, 8 << 20).unwrap_err();
        assert!(error.to_string().contains("replica 1 ended"), "{error}");
    }
}
