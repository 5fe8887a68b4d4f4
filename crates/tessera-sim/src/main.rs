//! `tessera-sim`: replay one seed (`--seed S`, optionally `--trace`) or run a campaign
//! (`--seeds N` starting at `--first-seed`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tessera_sim::{run_seed, Report, SimConfig};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of Tessera's MinBFT replicas on a faulty network")]
struct Arguments {
    /// Run this one seed and print its summary.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run a campaign of this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of the campaign.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Print every processed event of a single-seed run.
    #[arg(long)]
    trace: bool,
    /// Number of replicas (f is derived as (n - 1) / 2).
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Client sessions.
    #[arg(long, default_value_t = 3)]
    clients: u32,
    /// Operations per client.
    #[arg(long, default_value_t = 12)]
    operations: u32,
    /// How long a run continues after the last completion so lagging replicas catch up.
    #[arg(long, default_value_t = 2_000)]
    settle_ms: u64,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let mut config = SimConfig::default();
    config.protocol.n = arguments.replicas;
    config.protocol.f = arguments.replicas.saturating_sub(1) / 2;
    config.clients = arguments.clients;
    config.operations_per_client = arguments.operations;
    config.settle_ms = arguments.settle_ms;
    if let Err(error) = config.validate() {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    match (arguments.seed, arguments.seeds) {
        (Some(seed), _) => {
            config.trace = arguments.trace;
            let report = run_seed(&config, seed);
            print_report(&report, arguments.trace);
            exit_code(report.passed())
        }
        (None, Some(count)) => campaign(&config, arguments.first_seed, count),
        (None, None) => {
            eprintln!("error: pass --seed S to replay one run or --seeds N for a campaign");
            ExitCode::FAILURE
        }
    }
}

fn campaign(config: &SimConfig, first_seed: u64, count: u64) -> ExitCode {
    let started = Instant::now();
    let mut failing = Vec::new();
    for seed in first_seed..first_seed.saturating_add(count) {
        let report = run_seed(config, seed);
        if !report.passed() {
            println!("seed {seed} FAILED:");
            for violation in &report.violations {
                println!("  {violation}");
            }
            failing.push(seed);
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds in {elapsed_s:.1} s ({:.1} runs/s); {} failing{}",
        count as f64 / elapsed_s.max(1e-9),
        failing.len(),
        if failing.is_empty() {
            String::new()
        } else {
            format!(": {failing:?}")
        }
    );
    exit_code(failing.is_empty())
}

fn print_report(report: &Report, trace: bool) {
    if trace {
        for line in &report.trace {
            println!("{line}");
        }
    }
    let stats = &report.stats;
    println!("seed {}  trace hash {}", report.seed, report.trace_hash);
    println!(
        "  time: healed at {} ms, ended at {} ms, last completion {} ms after the heal",
        report.heal_ms, report.end_ms, report.recovery_ms
    );
    println!(
        "  events {}  delivered {}  dropped {}  duplicated {}  cut by partition {}  partition changes {}",
        stats.events, stats.delivered, stats.dropped, stats.duplicated, stats.partitioned,
        stats.partition_changes
    );
    println!(
        "  operations: {} invoked, {} completed, {} client retransmissions",
        stats.invoked, stats.completed, stats.retransmissions
    );
    println!(
        "  timers armed with a deadline already passed: {}",
        stats.past_deadline_timers
    );
    for (index, (view, executed, stable)) in report.replicas.iter().enumerate() {
        println!(
            "  replica {index}: view {view}, last executed {executed}, stable checkpoint {stable}, \
             rejected {:?}",
            report.rejections[index]
        );
    }
    if report.passed() {
        println!("  PASSED: agreement, integrity, convergence, liveness");
    } else {
        for violation in &report.violations {
            println!("  VIOLATION {violation}");
        }
    }
}

fn exit_code(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
