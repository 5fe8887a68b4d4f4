//! `tessera bench compare`: the same workload against Redis, a 3-member etcd cluster, Tessera
//! unreplicated and a Tessera MinBFT cluster, one system after another in one invocation on this
//! machine, so that the ratios between them are measured under the same conditions.
//!
//! - Redis (`redis.rs`): a real `redis-server`, driven by `redis-benchmark`.
//! - etcd (`etcd.rs`): three `etcd` members on loopback, driven by Tessera's own load generator
//!   over etcd's gRPC KV API (etcd's `benchmark` tool is not packaged by Debian).
//! - Tessera: `tessera unreplicated` or a local n=3 MinBFT cluster (HMAC USIG), each behind a
//!   `tessera gateway` process, driven by the same `redis-benchmark` command as Redis.
//!
//! Each workload is one redis-benchmark shape (`-t`, `-c`, `-P`, with `-r` and `-d`). This module
//! owns the workloads, the order of the run, the ratios, the goals of issue 6, and the table,
//! JSON and chart; it never interprets a system's numbers beyond dividing them.

mod etcd;
mod redis;

use crate::bench::Servers;
use crate::chart::{Bar, BarChart, Panel};
use crate::json::{json_number, json_optional, json_string};
use crate::kv::parse_duration;
use crate::process::{find_program, refuse_port_in_use, ChildGuard, Workspace};
use anyhow::{anyhow, bail, Context};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `tessera bench compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Systems to measure, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "redis,etcd,tessera-unreplicated,tessera-minbft"
    )]
    pub systems: Vec<Peer>,
    /// Operations, like redis-benchmark's -t (etcd: SET is a Put, GET a linearizable Range).
    #[arg(long, value_delimiter = ',', default_value = "set")]
    pub tests: Vec<Operation>,
    /// Connections of the concurrent workloads (redis-benchmark -c). A one-client workload
    /// always runs as well, for latency.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub clients: u32,
    /// Pipeline depth of the pipelined workload (redis-benchmark -P; etcd: requests in flight
    /// per client). 1 leaves the pipelined workload out.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub pipeline: u32,
    /// Distinct keys, chosen uniformly at random (redis-benchmark -r).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub keys: u64,
    /// Value size in bytes (redis-benchmark -d; its default is 3). At most Tessera's value
    /// limit, 512 KiB.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=524_288))]
    pub value_size: u32,
    /// Measured time per workload and system (redis-benchmark counts requests, so its runs
    /// are sized from the rate measured during the warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before each measured run, per workload and system.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// First port of everything the comparison starts; it uses BASE..BASE+552 (Redis on BASE,
    /// the gateway on BASE+1, etcd on BASE+10.., Tessera clusters from BASE+100 and BASE+400).
    /// The default lies above Linux's ephemeral range (32768–60999 unless tuned), where a
    /// client connection's local port could take a server's port between check and bind.
    #[arg(long, default_value_t = 61_000, value_parser = clap::value_parser!(u16).range(1_024..=64_900))]
    pub base_port: u16,
    /// Working directory for servers' data and logs (default: a fresh temporary directory,
    /// removed after a successful run).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where to write the SVG bar chart (throughput and p50 latency per workload).
    #[arg(long, default_value = "bench-compare.svg")]
    pub svg: PathBuf,
    /// Seed of the etcd load generator's key choices (redis-benchmark draws its own).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A system `tessera bench compare` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `redis-server` (Debian package), RDB snapshots off, AOF with fsync every second.
    Redis,
    /// A 3-member etcd cluster (Debian package etcd-server).
    Etcd,
    /// `tessera unreplicated` behind `tessera gateway`.
    TesseraUnreplicated,
    /// A local MinBFT cluster (n=3, f=1, HMAC USIG) behind `tessera gateway`.
    TesseraMinbft,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Redis => "redis",
            Peer::Etcd => "etcd",
            Peer::TesseraUnreplicated => "tessera-unreplicated",
            Peer::TesseraMinbft => "tessera-minbft",
        }
    }

    /// Programs this system needs on PATH, with the Debian package of each.
    fn programs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Peer::Redis => &[
                ("redis-server", "redis-server"),
                ("redis-benchmark", "redis-tools"),
            ],
            Peer::Etcd => &[("etcd", "etcd-server")],
            Peer::TesseraUnreplicated | Peer::TesseraMinbft => {
                &[("redis-benchmark", "redis-tools")]
            }
        }
    }
}

/// An operation of a workload (redis-benchmark -t).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Set,
    Get,
}

impl Operation {
    /// The redis-benchmark test name (`-t`), lower case.
    fn test_name(self) -> &'static str {
        match self {
            Operation::Set => "set",
            Operation::Get => "get",
        }
    }
}

/// One load shape, run the same way against every system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub operation: Operation,
    /// Connections (etcd: closed-loop clients).
    pub clients: u32,
    /// Requests per connection sent before waiting for their replies.
    pub pipeline: u32,
}

impl Workload {
    /// How redis-benchmark would be told: `SET -c 50 -P 16`.
    pub fn label(&self) -> String {
        let mut label = format!(
            "{} -c {}",
            self.operation.test_name().to_uppercase(),
            self.clients
        );
        if self.pipeline > 1 {
            let _ = write!(label, " -P {}", self.pipeline);
        }
        label
    }
}

/// The workloads of a run, per operation: `-c clients`, `-c clients -P pipeline`, `-c 1`
/// (duplicates left out).
pub fn workloads(args: &CompareArgs) -> Vec<Workload> {
    let mut workloads = Vec::new();
    for &operation in &args.tests {
        for (clients, pipeline) in [(args.clients, 1), (args.clients, args.pipeline), (1, 1)] {
            let workload = Workload {
                operation,
                clients,
                pipeline,
            };
            if !workloads.contains(&workload) {
                workloads.push(workload);
            }
        }
    }
    workloads
}

/// What one system did in one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests completed in the measured run.
    pub requests: u64,
    /// Failed requests in the measured run (redis-benchmark does not count them: 0).
    pub errors: u64,
}

/// One line of the result: a measurement (or why there is none) and its ratios to the peers
/// in the same workload.
#[derive(Debug, Clone)]
struct Row {
    system: Peer,
    workload: Workload,
    result: Result<Measurement, String>,
    ratio_to_redis: Option<f64>,
    ratio_to_etcd: Option<f64>,
}

/// Adds the throughput ratios to Redis and to etcd in the same workload (none where either
/// side has no result).
fn rows(results: Vec<(Peer, Workload, Result<Measurement, String>)>) -> Vec<Row> {
    let throughput = |peer: Peer, workload: Workload| {
        results
            .iter()
            .find(|(system, shape, _)| *system == peer && *shape == workload)
            .and_then(|(_, _, result)| result.as_ref().ok())
            .map(|measurement| measurement.ops_per_sec)
            .filter(|ops| *ops > 0.0)
    };
    let ratio = |measurement: &Result<Measurement, String>, base: Option<f64>| {
        Some(measurement.as_ref().ok()?.ops_per_sec / base?)
    };
    let mut rows: Vec<Row> = results
        .iter()
        .map(|(system, workload, result)| Row {
            system: *system,
            workload: *workload,
            result: result.clone(),
            ratio_to_redis: ratio(result, throughput(Peer::Redis, *workload)),
            ratio_to_etcd: ratio(result, throughput(Peer::Etcd, *workload)),
        })
        .collect();
    // Grouped by workload in the order they ran, systems in the order given.
    let order: Vec<Workload> = results.iter().fold(Vec::new(), |mut order, row| {
        if !order.contains(&row.1) {
            order.push(row.1);
        }
        order
    });
    rows.sort_by_key(|row| order.iter().position(|workload| *workload == row.workload));
    rows
}

/// One of issue 6's goals for MinBFT through the gateway, checked against this run.
#[derive(Debug, Clone, PartialEq)]
struct Goal {
    description: String,
    /// What was measured (a ratio, or a latency in ms).
    value: f64,
    /// What it had to reach.
    target: f64,
    met: bool,
}

/// Issue 6's goals, for the first operation measured: at `-c clients` ≥ 3× etcd's throughput;
/// pipelined ≥ 5% of Redis's; with one client, p50 no higher than etcd's. A goal whose two
/// systems do not both have a result is left out.
fn goals(rows: &[Row], args: &CompareArgs) -> Vec<Goal> {
    let Some(&operation) = args.tests.first() else {
        return Vec::new();
    };
    let find = |system: Peer, clients: u32, pipeline: u32| {
        rows.iter()
            .find(|row| {
                row.system == system
                    && row.workload
                        == Workload {
                            operation,
                            clients,
                            pipeline,
                        }
            })
            .and_then(|row| row.result.as_ref().ok())
    };
    let name = operation.test_name().to_uppercase();
    let mut goals = Vec::new();
    if let (Some(minbft), Some(etcd)) = (
        find(Peer::TesseraMinbft, args.clients, 1),
        find(Peer::Etcd, args.clients, 1),
    ) {
        let value = minbft.ops_per_sec / etcd.ops_per_sec;
        goals.push(Goal {
            description: format!("{name} -c {}: MinBFT ≥ 3× etcd's ops/s", args.clients),
            value,
            target: 3.0,
            met: value >= 3.0,
        });
    }
    if args.pipeline > 1 {
        if let (Some(minbft), Some(redis)) = (
            find(Peer::TesseraMinbft, args.clients, args.pipeline),
            find(Peer::Redis, args.clients, args.pipeline),
        ) {
            let value = minbft.ops_per_sec / redis.ops_per_sec;
            goals.push(Goal {
                description: format!(
                    "{name} -c {} -P {}: MinBFT ≥ 5% of Redis's ops/s",
                    args.clients, args.pipeline
                ),
                value,
                target: 0.05,
                met: value >= 0.05,
            });
        }
    }
    if let (Some(minbft), Some(etcd)) = (find(Peer::TesseraMinbft, 1, 1), find(Peer::Etcd, 1, 1)) {
        goals.push(Goal {
            description: format!("{name} -c 1: MinBFT p50 ≤ etcd's p50 (ms)"),
            value: minbft.p50_ms,
            target: etcd.p50_ms,
            met: minbft.p50_ms <= etcd.p50_ms,
        });
    }
    goals
}

/// Ports, as offsets from `--base-port`.
const REDIS_PORT_OFFSET: u16 = 0;
const GATEWAY_PORT_OFFSET: u16 = 1;
const ETCD_CLIENT_PORT_OFFSET: u16 = 10;
const ETCD_PEER_PORT_OFFSET: u16 = 20;
/// `tessera init --base-port` of each Tessera system: replicas at +0.., clients at +100..,
/// metrics at +150...
const TESSERA_UNREPLICATED_PORT_OFFSET: u16 = 100;
const TESSERA_MINBFT_PORT_OFFSET: u16 = 400;
/// How long a server may take to open its port.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `tessera bench compare`.
pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    if args.systems.is_empty() || args.tests.is_empty() {
        bail!("--systems and --tests must each name at least one");
    }
    check_programs(&args.systems)?;
    let executable =
        std::env::current_exe().context("cannot find the tessera executable to start servers")?;
    let workspace = Workspace::new(args.dir.clone(), "bench-compare")?;
    let workloads = workloads(&args);
    let mut results = Vec::new();
    let mut interrupted = false;
    for &system in &args.systems {
        if !args.json {
            eprintln!(
                "measuring {}: {} workloads, {:?} warm-up + {:?} each",
                system.name(),
                workloads.len(),
                args.warmup,
                args.duration
            );
        }
        let dir = workspace.path.join(system.name());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // On Ctrl-C the measurement is dropped, and with it the guards that kill its servers.
        let outcome = tokio::select! {
            outcome = measure_system(system, &executable, &dir, &args, &workloads) => outcome,
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                Err(anyhow!("interrupted"))
            }
        };
        let outcomes: Vec<Result<Measurement, String>> = match outcome {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|outcome| outcome.map_err(|error| format!("{error:#}")))
                .collect(),
            Err(error) => {
                let error = format!("{error:#} (logs in {})", dir.display());
                vec![Err(error); workloads.len()]
            }
        };
        for (workload, outcome) in workloads.iter().zip(outcomes) {
            if let Err(error) = &outcome {
                eprintln!("{} {}: {error}", system.name(), workload.label());
            }
            results.push((system, *workload, outcome));
        }
        if interrupted {
            break;
        }
    }
    let rows = rows(results);
    let goals = goals(&rows, &args);
    if args.json {
        println!("{}", json_report(&args, &rows, &goals));
    } else {
        print!("{}", table(&rows, &goals));
    }
    let chart = crate::chart::bar_chart(&chart(&args, &rows, &workloads));
    crate::bench::write_svg(&args.svg, &chart)?;
    let failed = rows.iter().filter(|row| row.result.is_err()).count();
    if failed > 0 {
        if !interrupted {
            workspace.keep();
        }
        bail!("{failed} of {} measurements failed", rows.len());
    }
    Ok(())
}

/// Fails, before anything starts, if a program the chosen systems need is missing, naming
/// each one and the Debian packages that provide them.
fn check_programs(systems: &[Peer]) -> anyhow::Result<()> {
    let mut missing: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for system in systems {
        for &(program, package) in system.programs() {
            if find_program(program).is_some() {
                continue;
            }
            match missing.iter_mut().find(|entry| entry.0 == program) {
                Some(entry) => entry.2.push(system.name()),
                None => missing.push((program, package, vec![system.name()])),
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let programs: Vec<String> = missing
        .iter()
        .map(|(program, package, users)| {
            format!(
                "`{program}` (Debian package {package}; needed by {})",
                users.join(", ")
            )
        })
        .collect();
    let mut packages: Vec<&str> = missing.iter().map(|entry| entry.1).collect();
    packages.sort_unstable();
    packages.dedup();
    bail!(
        "missing on PATH: {}. Install with `sudo apt-get install -y {}` (or as root without \
         sudo), or leave those systems out with --systems",
        programs.join(", "),
        packages.join(" ")
    )
}

/// Starts `system`, runs every workload against it, and stops it. An error here (the system
/// did not start) stands for all its workloads; a workload's own failure is its entry.
async fn measure_system(
    system: Peer,
    executable: &Path,
    dir: &Path,
    args: &CompareArgs,
    workloads: &[Workload],
) -> anyhow::Result<Vec<anyhow::Result<Measurement>>> {
    let port = |offset: u16| args.base_port + offset;
    let mut outcomes = Vec::with_capacity(workloads.len());
    match system {
        Peer::Redis => {
            let redis_port = port(REDIS_PORT_OFFSET);
            let mut server = redis::start_server(dir, redis_port).await?;
            for &workload in workloads {
                let outcome = redis::measure(redis_port, workload, args).await;
                outcomes.push(with_exit_report(outcome, &mut [&mut server]));
            }
        }
        Peer::Etcd => {
            let mut cluster = etcd::EtcdCluster::start(
                dir,
                port(ETCD_CLIENT_PORT_OFFSET),
                port(ETCD_PEER_PORT_OFFSET),
            )
            .await?;
            for &workload in workloads {
                let outcome = etcd::measure(cluster.endpoints(), workload, args).await;
                outcomes.push(with_exit_report(outcome, &mut cluster.members()));
            }
        }
        Peer::TesseraUnreplicated | Peer::TesseraMinbft => {
            let (bench_system, offset) = if system == Peer::TesseraUnreplicated {
                (
                    crate::bench::System::Unreplicated,
                    TESSERA_UNREPLICATED_PORT_OFFSET,
                )
            } else {
                (crate::bench::System::Minbft, TESSERA_MINBFT_PORT_OFFSET)
            };
            let gateway_port = port(GATEWAY_PORT_OFFSET);
            let gateway_address = format!("127.0.0.1:{gateway_port}");
            refuse_port_in_use(&gateway_address, "tessera gateway").await?;
            let mut servers =
                Servers::start(bench_system, executable, dir, port(offset), None).await?;
            let mut arguments = vec!["gateway", "--listen", gateway_address.as_str()];
            if system == Peer::TesseraUnreplicated {
                arguments.push("--unreplicated");
            }
            arguments.push("--dir");
            let mut gateway =
                ChildGuard::spawn_tessera(executable, &arguments, dir, "gateway.log")?;
            gateway
                .wait_listening(&gateway_address, READY_TIMEOUT)
                .await?;
            for &workload in workloads {
                let outcome = redis::measure(gateway_port, workload, args).await;
                let outcome = with_exit_report(outcome, &mut [&mut gateway]);
                outcomes.push(match (outcome, servers.exit_report()?) {
                    (Err(error), Some(report)) => Err(error.context(report)),
                    (outcome, _) => outcome,
                });
            }
            drop(gateway);
            servers.stop().await?;
        }
    }
    Ok(outcomes)
}

/// Adds to a failed measurement why a server it depends on exited, if one did.
fn with_exit_report(
    outcome: anyhow::Result<Measurement>,
    servers: &mut [&mut ChildGuard],
) -> anyhow::Result<Measurement> {
    let Err(error) = outcome else {
        return outcome;
    };
    for server in servers.iter_mut() {
        if let Ok(Some(report)) = server.exit_report() {
            return Err(error.context(report));
        }
    }
    Err(error)
}

/// The table: one line per system and workload, grouped by workload, then the goals.
fn table(rows: &[Row], goals: &[Goal]) -> String {
    let mut text = format!(
        "{:<18} {:<22} {:>11} {:>9} {:>9} {:>9} {:>9}\n",
        "workload", "system", "ops/s", "p50 ms", "p99 ms", "/ redis", "/ etcd"
    );
    let ratio =
        |ratio: Option<f64>| ratio.map_or_else(|| "-".into(), |ratio| format!("{ratio:.3}"));
    let mut previous: Option<Workload> = None;
    for row in rows {
        let workload = if previous == Some(row.workload) {
            String::new()
        } else {
            row.workload.label()
        };
        previous = Some(row.workload);
        match &row.result {
            Ok(measurement) => {
                let _ = writeln!(
                    text,
                    "{:<18} {:<22} {:>11} {:>9.3} {:>9.3} {:>9} {:>9}",
                    workload,
                    row.system.name(),
                    thousands(measurement.ops_per_sec.round() as u64),
                    measurement.p50_ms,
                    measurement.p99_ms,
                    ratio(row.ratio_to_redis),
                    ratio(row.ratio_to_etcd)
                );
            }
            Err(_) => {
                let _ = writeln!(
                    text,
                    "{:<18} {:<22} FAILED (see above)",
                    workload,
                    row.system.name()
                );
            }
        }
    }
    if !goals.is_empty() {
        text.push_str("\nissue 6 goals (MinBFT through the gateway, same run):\n");
        for goal in goals {
            let _ = writeln!(
                text,
                "  {:<8} {}: {:.3} (target {:.3})",
                if goal.met { "met" } else { "NOT met" },
                goal.description,
                goal.value,
                goal.target
            );
        }
    }
    text
}

/// 1234567 → "1,234,567".
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// The `--json` object: `{"config": {...}, "results": [...], "goals": [...]}`.
fn json_report(args: &CompareArgs, rows: &[Row], goals: &[Goal]) -> String {
    let systems: Vec<String> = args
        .systems
        .iter()
        .map(|system| json_string(system.name()))
        .collect();
    let config = format!(
        "{{\"systems\":[{}],\"clients\":{},\"pipeline\":{},\"keys\":{},\"value_size\":{},\
         \"duration_s\":{},\"warmup_s\":{},\"redis\":{{\"save\":\"\",\"appendonly\":\"yes\",\
         \"appendfsync\":\"everysec\"}},\"etcd\":{{\"members\":{},\"pipelined_in_flight_per_client\":{}}},\
         \"tessera\":{{\"n\":3,\"f\":1,\"usig\":\"hmac\",\"through\":\"tessera gateway\"}}}}",
        systems.join(","),
        args.clients,
        args.pipeline,
        args.keys,
        args.value_size,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        etcd::MEMBERS,
        args.pipeline,
    );
    let results: Vec<String> = rows
        .iter()
        .map(|row| {
            let head = format!(
                "\"system\":{},\"workload\":{},\"operation\":\"{}\",\"clients\":{},\"pipeline\":{}",
                json_string(row.system.name()),
                json_string(&row.workload.label()),
                row.workload.operation.test_name(),
                row.workload.clients,
                row.workload.pipeline
            );
            let body = match &row.result {
                Ok(measurement) => format!(
                    "\"ops_per_sec\":{},\"p50_ms\":{},\"p99_ms\":{},\"requests\":{},\"errors\":{},\
                     \"ratio_to_redis\":{},\"ratio_to_etcd\":{}",
                    json_number(measurement.ops_per_sec, 0),
                    json_number(measurement.p50_ms, 3),
                    json_number(measurement.p99_ms, 3),
                    measurement.requests,
                    measurement.errors,
                    json_optional(row.ratio_to_redis, 4),
                    json_optional(row.ratio_to_etcd, 4)
                ),
                Err(error) => format!("\"error\":{}", json_string(error)),
            };
            format!("{{{head},{body}}}")
        })
        .collect();
    let goals: Vec<String> = goals
        .iter()
        .map(|goal| {
            format!(
                "{{\"goal\":{},\"value\":{},\"target\":{},\"met\":{}}}",
                json_string(&goal.description),
                json_number(goal.value, 4),
                json_number(goal.target, 4),
                goal.met
            )
        })
        .collect();
    format!(
        "{{\"config\":{config},\"results\":[{}],\"goals\":[{}]}}",
        results.join(","),
        goals.join(",")
    )
}

/// The chart: a throughput panel per workload, then a p50 latency panel per workload.
fn chart(args: &CompareArgs, rows: &[Row], workloads: &[Workload]) -> BarChart {
    let panel = |workload: &Workload, latency: bool| Panel {
        title: workload.label(),
        unit: if latency { "p50 latency, ms" } else { "ops/s" }.into(),
        bars: args
            .systems
            .iter()
            .map(|&system| Bar {
                label: system.name().into(),
                value: rows
                    .iter()
                    .find(|row| row.system == system && row.workload == *workload)
                    .and_then(|row| row.result.as_ref().ok())
                    .map(|measurement| {
                        if latency {
                            measurement.p50_ms
                        } else {
                            measurement.ops_per_sec
                        }
                    }),
            })
            .collect(),
    };
    let panels = workloads
        .iter()
        .map(|workload| panel(workload, false))
        .chain(workloads.iter().map(|workload| panel(workload, true)))
        .collect();
    BarChart {
        title: "tessera bench compare: the same redis-benchmark workload on each system".into(),
        subtitle: vec![
            format!(
                "redis-benchmark -r {} -d {}; {:?} measured per workload after {:?} of warm-up; \
                 one system at a time on one machine",
                args.keys, args.value_size, args.duration, args.warmup
            ),
            "etcd: 3 members, Tessera's gRPC load; Tessera: unreplicated and MinBFT n=3 (HMAC \
             USIG), both via tessera gateway"
                .into(),
        ],
        columns: workloads.len(),
        panels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        compare: CompareArgs,
    }

    fn parse(arguments: &[&str]) -> CompareArgs {
        Cli::try_parse_from(std::iter::once("compare").chain(arguments.iter().copied()))
            .expect("parses")
            .compare
    }

    fn measured(ops_per_sec: f64, p50_ms: f64) -> Result<Measurement, String> {
        Ok(Measurement {
            ops_per_sec,
            p50_ms,
            p99_ms: p50_ms * 3.0,
            requests: 1_000,
            errors: 0,
        })
    }

    fn workload(clients: u32, pipeline: u32) -> Workload {
        Workload {
            operation: Operation::Set,
            clients,
            pipeline,
        }
    }

    /// A run like the issue's baseline: Redis 77k / 1M / 20k, etcd 5k / 10k / 900 (p50 1 ms).
    fn sample() -> Vec<(Peer, Workload, Result<Measurement, String>)> {
        let c50 = workload(50, 1);
        let p16 = workload(50, 16);
        let c1 = workload(1, 1);
        vec![
            (Peer::Redis, c50, measured(77_000.0, 0.5)),
            (Peer::Redis, p16, measured(1_000_000.0, 0.9)),
            (Peer::Redis, c1, measured(20_000.0, 0.03)),
            (Peer::Etcd, c50, measured(5_000.0, 9.0)),
            (Peer::Etcd, p16, Err("etcd member 2 exited".into())),
            (Peer::Etcd, c1, measured(900.0, 1.0)),
            (Peer::TesseraMinbft, c50, measured(20_000.0, 2.0)),
            (Peer::TesseraMinbft, p16, measured(40_000.0, 3.0)),
            (Peer::TesseraMinbft, c1, measured(1_500.0, 0.6)),
        ]
    }

    #[test]
    fn defaults_are_the_issue_workloads() {
        let args = parse(&[]);
        assert_eq!(
            args.systems,
            vec![
                Peer::Redis,
                Peer::Etcd,
                Peer::TesseraUnreplicated,
                Peer::TesseraMinbft
            ]
        );
        let labels: Vec<String> = workloads(&args).iter().map(Workload::label).collect();
        assert_eq!(labels, ["SET -c 50", "SET -c 50 -P 16", "SET -c 1"]);
        assert_eq!((args.keys, args.value_size), (100_000, 3));
        let args = parse(&["--tests", "set,get", "--clients", "1", "--pipeline", "1"]);
        let labels: Vec<String> = workloads(&args).iter().map(Workload::label).collect();
        assert_eq!(labels, ["SET -c 1", "GET -c 1"]);
        assert!(Cli::try_parse_from(["compare", "--base-port", "65000"]).is_err());
        assert!(Cli::try_parse_from(["compare", "--value-size", "600000"]).is_err());
    }

    #[test]
    fn ratios_divide_by_the_peer_in_the_same_workload() {
        let rows = rows(sample());
        let find = |system: Peer, clients: u32, pipeline: u32| {
            rows.iter()
                .find(|row| row.system == system && row.workload == workload(clients, pipeline))
                .unwrap()
        };
        let minbft = find(Peer::TesseraMinbft, 50, 1);
        assert_eq!(minbft.ratio_to_redis, Some(20_000.0 / 77_000.0));
        assert_eq!(minbft.ratio_to_etcd, Some(4.0));
        let redis = find(Peer::Redis, 50, 1);
        assert_eq!(redis.ratio_to_redis, Some(1.0));
        // etcd failed the pipelined workload: no ratio to it there, and none for it.
        let pipelined = find(Peer::TesseraMinbft, 50, 16);
        assert_eq!(pipelined.ratio_to_redis, Some(0.04));
        assert_eq!(pipelined.ratio_to_etcd, None);
        assert_eq!(find(Peer::Etcd, 50, 16).ratio_to_redis, None);
        // Grouped by workload, systems in their order.
        let order: Vec<(u32, u32, Peer)> = rows
            .iter()
            .map(|row| (row.workload.clients, row.workload.pipeline, row.system))
            .collect();
        assert_eq!(
            order[..3],
            [
                (50, 1, Peer::Redis),
                (50, 1, Peer::Etcd),
                (50, 1, Peer::TesseraMinbft)
            ]
        );
        assert_eq!(order[6], (1, 1, Peer::Redis));
    }

    #[test]
    fn goals_follow_the_issue() {
        let args = parse(&[]);
        let goals = goals(&rows(sample()), &args);
        assert_eq!(goals.len(), 3, "{goals:?}");
        assert_eq!(
            (goals[0].value, goals[0].target, goals[0].met),
            (4.0, 3.0, true)
        );
        assert_eq!(
            (goals[1].value, goals[1].target, goals[1].met),
            (0.04, 0.05, false)
        );
        assert_eq!(
            (goals[2].value, goals[2].target, goals[2].met),
            (0.6, 1.0, true)
        );
        // Without etcd, only the goal against Redis can be judged.
        let without_etcd: Vec<_> = sample()
            .into_iter()
            .filter(|(system, _, _)| *system != Peer::Etcd)
            .collect();
        let goals = super::goals(&rows(without_etcd), &args);
        assert_eq!(goals.len(), 1);
        assert!(goals[0].description.contains("-P 16"), "{goals:?}");
    }

    #[test]
    fn table_and_json_show_every_row_and_goal() {
        let args = parse(&[]);
        let rows = rows(sample());
        let goals = goals(&rows, &args);
        let text = table(&rows, &goals);
        assert_eq!(
            text.lines()
                .filter(|line| line.contains("tessera-minbft"))
                .count(),
            3
        );
        assert!(text.contains("SET -c 50 -P 16"), "{text}");
        assert!(text.contains("1,000,000"), "{text}");
        assert!(text.contains("FAILED"), "{text}");
        assert!(text.contains("NOT met"), "{text}");
        let json = json_report(&args, &rows, &goals);
        assert!(
            json.starts_with("{\"config\":{\"systems\":[\"redis\","),
            "{json}"
        );
        assert_eq!(json.matches("\"system\":").count(), 9);
        assert!(
            json.contains("\"system\":\"tessera-minbft\",\"workload\":\"SET -c 50\",\"operation\":\"set\",\"clients\":50,\"pipeline\":1,\"ops_per_sec\":20000,\"p50_ms\":2.000,\"p99_ms\":6.000,\"requests\":1000,\"errors\":0,\"ratio_to_redis\":0.2597,\"ratio_to_etcd\":4.0000}"),
            "{json}"
        );
        assert!(
            json.contains("\"error\":\"etcd member 2 exited\""),
            "{json}"
        );
        assert!(json.contains("\"met\":false"), "{json}");
        assert_eq!(json.matches('{').count(), json.matches('}').count());
        assert_eq!(json.matches('[').count(), json.matches(']').count());
    }

    #[test]
    fn the_chart_has_a_throughput_and_a_latency_panel_per_workload() {
        let args = parse(&["--systems", "redis,etcd,tessera-minbft"]);
        let rows = rows(sample());
        let chart = chart(&args, &rows, &workloads(&args));
        assert_eq!(chart.panels.len(), 6);
        assert_eq!(chart.panels[0].unit, "ops/s");
        assert_eq!(chart.panels[3].unit, "p50 latency, ms");
        let values: Vec<Option<f64>> = chart.panels[1].bars.iter().map(|bar| bar.value).collect();
        assert_eq!(values, [Some(1_000_000.0), None, Some(40_000.0)]);
        assert_eq!(chart.panels[5].bars[1].value, Some(1.0));
        roxmltree::Document::parse(&crate::chart::bar_chart(&chart)).expect("well-formed");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(77_042), "77,042");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
