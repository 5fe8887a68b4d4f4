//! Redis for `tessera bench compare`: a real `redis-server`, and `redis-benchmark` runs
//! against any RESP endpoint (Redis itself or `tessera gateway`).
//!
//! redis-benchmark counts requests (`-n`) and has no time limit, so each workload is a short
//! probe that measures the rate, a warm-up sized from it, and a measured run sized from the
//! warm-up's rate to last about `--duration`. Its `--csv` line gives rps, p50 and p99.

use super::{CompareArgs, Measurement, Workload};
use crate::process::{refuse_port_in_use, remove_old_data, ChildGuard};
use anyhow::{bail, Context};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Fewest requests of any redis-benchmark run (the probe), per connection and pipeline slot:
/// enough for every connection to fill its pipeline a few times.
const PROBE_REQUESTS_PER_SLOT: u64 = 4;
/// Fewest requests of any run.
const REQUESTS_MIN: u64 = 1_000;
/// Most requests of one run (about 3 minutes at Redis's pipelined rate on this machine).
const REQUESTS_MAX: u64 = 200_000_000;
/// A run may take this many times its planned duration, plus [`RUN_SLACK`], before it is
/// stopped as hung.
const RUN_TIMEOUT_FACTOR: u32 = 5;
const RUN_SLACK: Duration = Duration::from_secs(30);

/// The `redis-server` command: RDB snapshots off (`--save ""`), append-only file on with an
/// fsync every second (`--appendonly yes --appendfsync everysec`). Issue 6 asks for
/// "persistence off and appendfsync everysec"; taken literally the two contradict each other
/// (appendfsync only matters with the AOF on), so this keeps Redis's usual durable setting:
/// no snapshots, every write logged, at most one second of writes lost in a crash. The AOF
/// lives in `dir`.
pub fn server_command(dir: &Path, port: u16) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .args(["--appendonly", "yes"])
        .args(["--appendfsync", "everysec"])
        .args(["--daemonize", "no"]);
    command
}

/// Starts `redis-server` on 127.0.0.1:`port` with its data and log in `dir`, and waits until
/// it accepts connections.
pub async fn start_server(dir: &Path, port: u16) -> anyhow::Result<ChildGuard> {
    let address = format!("127.0.0.1:{port}");
    refuse_port_in_use(&address, "redis-server").await?;
    remove_old_data(&dir.join("appendonlydir"))?;
    let mut server = ChildGuard::spawn(
        &mut server_command(dir, port),
        "redis-server",
        &dir.join("redis-server.log"),
    )?;
    server
        .wait_listening(&address, super::READY_TIMEOUT)
        .await?;
    Ok(server)
}

/// The arguments of one redis-benchmark run of `requests` requests.
pub fn benchmark_arguments(
    port: u16,
    workload: Workload,
    keys: u64,
    value_size: u32,
    requests: u64,
) -> Vec<String> {
    let mut arguments: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        workload.operation.test_name(),
        "-c",
        &workload.clients.to_string(),
        "-r",
        &keys.to_string(),
        "-d",
        &value_size.to_string(),
        "-n",
        &requests.to_string(),
        "--csv",
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    if workload.pipeline > 1 {
        arguments.extend(["-P".to_string(), workload.pipeline.to_string()]);
    }
    arguments
}

/// One line of redis-benchmark's `--csv` output (7.0: test, rps, avg, min, p50, p95, p99, max;
/// latencies in ms).
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    pub test: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Parses redis-benchmark's `--csv` output and returns the row of `test` (e.g. "SET").
/// Columns are found by their header names, so a version that adds columns still parses.
pub fn parse_csv(text: &str, test: &str) -> anyhow::Result<CsvRow> {
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let header = lines
        .next()
        .context("redis-benchmark printed nothing (expected a CSV header)")?;
    let columns = csv_fields(header);
    let column = |name: &str| {
        columns
            .iter()
            .position(|column| column == name)
            .with_context(|| {
                format!(
                    "redis-benchmark's CSV header has no `{name}` column (redis-benchmark 7.0 or \
                 newer prints p50 and p99): {header}"
                )
            })
    };
    let (test_column, rps, p50, p99) = (
        column("test")?,
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    for line in lines {
        let fields = csv_fields(line);
        if fields.get(test_column).map(String::as_str) != Some(test) {
            continue;
        }
        let number = |index: usize, name: &str| -> anyhow::Result<f64> {
            let field = fields
                .get(index)
                .with_context(|| format!("redis-benchmark's {test} row has no {name}: {line}"))?;
            let value: f64 = field
                .parse()
                .with_context(|| format!("redis-benchmark's {name} `{field}` is not a number"))?;
            if !(value.is_finite() && value >= 0.0) {
                bail!("redis-benchmark's {name} is {value}");
            }
            Ok(value)
        };
        return Ok(CsvRow {
            test: test.to_string(),
            rps: number(rps, "rps")?,
            p50_ms: number(p50, "p50_latency_ms")?,
            p99_ms: number(p99, "p99_latency_ms")?,
        });
    }
    bail!("redis-benchmark's output has no {test} row:\n{text}")
}

/// The fields of one CSV line as redis-benchmark writes them: comma-separated, each in double
/// quotes (which its values never contain).
fn csv_fields(line: &str) -> Vec<String> {
    line.trim()
        .split(',')
        .map(|field| field.trim().trim_matches('"').to_string())
        .collect()
}

/// Requests that take about `duration` at `rate` per second, within the run bounds.
fn requests_for(rate: f64, duration: Duration, floor: u64) -> u64 {
    let wanted = rate * duration.as_secs_f64();
    if !wanted.is_finite() {
        return floor;
    }
    (wanted.round() as u64).clamp(floor.max(REQUESTS_MIN), REQUESTS_MAX)
}

/// Runs redis-benchmark once and returns its row. `planned` is how long the run should take,
/// for its timeout. Killed if dropped (Ctrl-C) or hung.
async fn run_benchmark(
    port: u16,
    workload: Workload,
    args: &CompareArgs,
    requests: u64,
    planned: Duration,
) -> anyhow::Result<CsvRow> {
    let arguments = benchmark_arguments(port, workload, args.keys, args.value_size, requests);
    let timeout = planned * RUN_TIMEOUT_FACTOR + RUN_SLACK;
    let run = tokio::process::Command::new("redis-benchmark")
        .args(&arguments)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, run)
        .await
        .with_context(|| {
            format!(
                "`redis-benchmark {}` did not finish within {timeout:?}",
                arguments.join(" ")
            )
        })?
        .context("cannot run redis-benchmark (Debian package redis-tools)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "`redis-benchmark {}` failed ({}): {}",
            arguments.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_csv(&stdout, &workload.operation.test_name().to_uppercase()).with_context(|| {
        format!(
            "`redis-benchmark {}` (stderr: {})",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

/// Measures `workload` against the RESP server on 127.0.0.1:`port`.
pub async fn measure(
    port: u16,
    workload: Workload,
    args: &CompareArgs,
) -> anyhow::Result<Measurement> {
    let slots = u64::from(workload.clients) * u64::from(workload.pipeline);
    let floor = (slots * PROBE_REQUESTS_PER_SLOT).max(REQUESTS_MIN);
    let probe = run_benchmark(port, workload, args, floor, Duration::from_secs(1)).await?;
    let mut rate = probe.rps;
    if !args.warmup.is_zero() {
        let requests = requests_for(rate, args.warmup, floor);
        rate = run_benchmark(port, workload, args, requests, args.warmup)
            .await?
            .rps;
    }
    let requests = requests_for(rate, args.duration, floor);
    let measured = run_benchmark(port, workload, args, requests, args.duration).await?;
    if measured.rps <= 0.0 {
        bail!("redis-benchmark measured 0 requests per second");
    }
    Ok(Measurement {
        ops_per_sec: measured.rps,
        p50_ms: measured.p50_ms,
        p99_ms: measured.p99_ms,
        requests,
        errors: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Operation;

    /// Exactly what redis-benchmark 7.0.15 printed for `-t set,get -P 16 --csv` on this machine.
    const CSV_7_0: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
        \"SET\",\"152555.30\",\"4.977\",\"0.296\",\"2.263\",\"16.783\",\"23.679\",\"24.943\"\n\
        \"GET\",\"263157.91\",\"2.600\",\"0.296\",\"1.463\",\"8.407\",\"13.583\",\"32.927\"\n";

    #[test]
    fn csv_rows_are_found_by_test_and_column_name() {
        let set = parse_csv(CSV_7_0, "SET").unwrap();
        assert_eq!(
            set,
            CsvRow {
                test: "SET".into(),
                rps: 152_555.30,
                p50_ms: 2.263,
                p99_ms: 23.679
            }
        );
        let get = parse_csv(CSV_7_0, "GET").unwrap();
        assert_eq!(
            (get.rps, get.p50_ms, get.p99_ms),
            (263_157.91, 1.463, 13.583)
        );
        // Columns in another order (a future version) still parse by name.
        let reordered = "\"p99_latency_ms\",\"test\",\"p50_latency_ms\",\"rps\"\r\n\"1.5\",\"SET\",\"0.5\",\"1000\"\r\n";
        let row = parse_csv(reordered, "SET").unwrap();
        assert_eq!((row.rps, row.p50_ms, row.p99_ms), (1000.0, 0.5, 1.5));
    }

    #[test]
    fn csv_without_the_needed_parts_is_refused_with_a_reason() {
        let error = parse_csv("", "SET").unwrap_err().to_string();
        assert!(error.contains("printed nothing"), "{error}");
        // redis-benchmark 6 printed only test and rps.
        let old = "\"test\",\"rps\"\n\"SET\",\"1000.00\"\n";
        let error = parse_csv(old, "SET").unwrap_err().to_string();
        assert!(error.contains("p50_latency_ms"), "{error}");
        let error = parse_csv(CSV_7_0, "INCR").unwrap_err().to_string();
        assert!(error.contains("no INCR row"), "{error}");
        let broken = CSV_7_0.replace("152555.30", "fast");
        let error = format!("{:#}", parse_csv(&broken, "SET").unwrap_err());
        assert!(error.contains("`fast` is not a number"), "{error}");
    }

    #[test]
    fn benchmark_arguments_carry_the_workload() {
        let workload = Workload {
            operation: Operation::Set,
            clients: 50,
            pipeline: 16,
        };
        let arguments = benchmark_arguments(40_001, workload, 100_000, 3, 20_000).join(" ");
        assert_eq!(
            arguments,
            "-h 127.0.0.1 -p 40001 -t set -c 50 -r 100000 -d 3 -n 20000 --csv -P 16"
        );
        let one = Workload {
            pipeline: 1,
            clients: 1,
            ..workload
        };
        assert!(!benchmark_arguments(1, one, 1, 1, 1).contains(&"-P".to_string()));
    }

    #[test]
    fn runs_are_sized_from_the_rate_within_bounds() {
        assert_eq!(
            requests_for(20_000.0, Duration::from_secs(10), 1_000),
            200_000
        );
        assert_eq!(requests_for(10.0, Duration::from_secs(1), 3_200), 3_200);
        assert_eq!(
            requests_for(1e12, Duration::from_secs(10), 1_000),
            REQUESTS_MAX
        );
        assert_eq!(requests_for(f64::NAN, Duration::from_secs(1), 5_000), 5_000);
    }

    #[test]
    fn redis_runs_without_snapshots_and_with_an_everysec_append_only_file() {
        let command = server_command(Path::new("/tmp/x"), 40_000);
        let arguments: Vec<String> = command
            .get_args()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect();
        let joined = arguments.join(" ");
        assert!(
            joined.contains("--port 40000 --bind 127.0.0.1 --dir /tmp/x"),
            "{joined}"
        );
        assert!(
            joined.contains("--save  --appendonly yes --appendfsync everysec"),
            "{joined}"
        );
    }
}
