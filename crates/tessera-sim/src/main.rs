//! `tessera-sim`: replay one seed (`--seed S`, optionally `--trace`) or run a campaign
//! (`--seeds N` starting at `--first-seed`). Without `--setting`, seed `s` runs in
//! `Setting::for_seed(s)`: campaigns cycle through the chaos setting and the nine ByzzFuzz cells.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tessera_sim::{run_seed, Report, Setting, SimConfig};

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
    /// Run every seed in this setting (`chaos` or `cXdY` with X, Y in 0..=2) instead of
    /// cycling through all ten.
    #[arg(long, value_parser = parse_setting)]
    setting: Option<Setting>,
    /// Stop a run after this many events (a runaway run is reported, not waited for).
    #[arg(long)]
    events_max: Option<u64>,
    /// Every replica fetches state with this strategy (merkle, latency-first,
    /// bandwidth-first-1, bandwidth-first-2) instead of the one the seed picks.
    #[arg(long)]
    transfer_strategy: Option<tessera_types::TransferStrategy>,
    /// Chance, per mille, that a crashed correct replica restarts without its log, in a new
    /// USIG epoch (drawn only while fewer than f replicas are Byzantine; default 500).
    #[arg(long)]
    amnesia_per_mille: Option<u32>,
    /// Chance, per mille, that such a restart keeps the inputs before a damage in its log
    /// instead of none (default 500).
    #[arg(long)]
    damaged_log_per_mille: Option<u32>,
    /// Plant this bug of the core's catalogue in every correct replica (builds with
    /// `--features planted-bugs` only).
    #[cfg(feature = "planted-bugs")]
    #[arg(long)]
    plant: Option<String>,
}

fn parse_setting(text: &str) -> Result<Setting, String> {
    Setting::parse(text)
        .ok_or_else(|| format!("unknown setting {text:?}: use chaos or cXdY with X, Y in 0..=2"))
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let mut config = SimConfig::default();
    config.protocol.n = arguments.replicas;
    config.protocol.f = arguments.replicas.saturating_sub(1) / 2;
    config.clients = arguments.clients;
    config.operations_per_client = arguments.operations;
    config.settle_ms = arguments.settle_ms;
    if let Some(events_max) = arguments.events_max {
        config.events_max = events_max;
    }
    if let Some(per_mille) = arguments.amnesia_per_mille {
        config.amnesia_per_mille = per_mille;
    }
    if let Some(per_mille) = arguments.damaged_log_per_mille {
        config.damaged_log_per_mille = per_mille;
    }
    if let Some(strategy) = arguments.transfer_strategy {
        config.protocol.state_transfer = strategy;
        config.transfer_strategy_from_seed = false;
    }
    #[cfg(feature = "planted-bugs")]
    if let Some(name) = &arguments.plant {
        let bug = tessera_core::PlantedBug::ALL
            .into_iter()
            .find(|bug| bug.name() == name);
        let Some(bug) = bug else {
            let names: Vec<&str> = tessera_core::PlantedBug::ALL
                .iter()
                .map(|bug| bug.name())
                .collect();
            eprintln!(
                "error: unknown planted bug {name:?}; known: {}",
                names.join(", ")
            );
            return ExitCode::FAILURE;
        };
        config.planted_bug = Some(bug);
    }
    if let Err(error) = config.validate() {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let setting = arguments.setting;
    match (arguments.seed, arguments.seeds) {
        (Some(seed), _) => {
            config.trace = arguments.trace;
            let setting = setting.unwrap_or(Setting::for_seed(seed));
            let report = run_seed(&setting.apply(&config), seed);
            println!("setting {setting}");
            print_report(&report, arguments.trace);
            exit_code(report.passed())
        }
        (None, Some(count)) => campaign(&config, setting, arguments.first_seed, count),
        (None, None) => {
            eprintln!("error: pass --seed S to replay one run or --seeds N for a campaign");
            ExitCode::FAILURE
        }
    }
}

fn campaign(config: &SimConfig, setting: Option<Setting>, first_seed: u64, count: u64) -> ExitCode {
    let started = Instant::now();
    let mut failing = Vec::new();
    let mut epochs = EpochChanges::default();
    for seed in first_seed..first_seed.saturating_add(count) {
        let setting = setting.unwrap_or(Setting::for_seed(seed));
        let report = run_seed(&setting.apply(config), seed);
        epochs.add(&report);
        if !report.passed() {
            println!("seed {seed} ({setting}) FAILED:");
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
    println!(
        "USIG epochs: {} restarts without a log; {} from a damaged log ({} of them kept \
         executed requests); {} started by Byzantine nodes; {} INSTALL executions",
        epochs.without_log,
        epochs.from_damaged_log,
        epochs.damaged_kept_executed,
        epochs.byzantine,
        epochs.installs
    );
    exit_code(failing.is_empty())
}

/// A campaign's count of the ways replicas moved to new USIG epochs, so that a campaign shows
/// that they happened.
#[derive(Default)]
struct EpochChanges {
    without_log: u64,
    from_damaged_log: u64,
    /// Restarts from a damaged log whose kept part had executed something (a run has at most
    /// one restart, so its stats tell).
    damaged_kept_executed: u64,
    byzantine: u64,
    installs: u64,
}

impl EpochChanges {
    fn add(&mut self, report: &Report) {
        let stats = &report.stats;
        self.without_log += stats.amnesia_restarts;
        self.from_damaged_log += stats.damaged_log_restarts;
        self.damaged_kept_executed += u64::from(stats.damaged_log_executed_kept > 0);
        self.byzantine += stats.byzantine_epochs;
        self.installs += stats.installs_executed;
    }
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
        "  timers armed with a deadline already passed: {}; round-cut messages {}; swizzles {}; \
         crashes {} (messages lost to them {}); rogue requests {}",
        stats.past_deadline_timers,
        stats.round_cut,
        stats.swizzles,
        stats.crashes,
        stats.lost_to_crash,
        stats.rogue_requests
    );
    let faults = &report.faults;
    // What the restart was (a Byzantine node restarts with its state whatever the plan says).
    let restart = if faults.crash_stop {
        " for good".to_string()
    } else if stats.damaged_log_restarts > 0 {
        format!(
            " from a damaged log: kept {} inputs, lost {}, executed up to seq {} (new USIG \
             epoch)",
            stats.damaged_log_inputs_kept,
            stats.damaged_log_inputs_lost,
            stats.damaged_log_executed_kept
        )
    } else if stats.amnesia_restarts > 0 {
        " without its log (new USIG epoch)".to_string()
    } else {
        String::new()
    };
    println!(
        "  faults: byzantine {:?}, twins {:?}, slow {:?}, mutation rounds {:?}, network rounds \
         {:?}, crash {:?}{restart}",
        faults.byzantine,
        faults.twins,
        faults.slow,
        faults.mutation_rounds,
        faults.network_rounds,
        faults.crash,
    );
    if let Some((node, at_ms)) = faults.byzantine_epoch {
        println!(
            "  node {node} (Byzantine) starts a new USIG epoch at {at_ms} ms ({} started)",
            stats.byzantine_epochs
        );
    }
    println!("  state transfer: {}", report.transfer_strategy);
    println!("  adversary: {:?}", report.adversary);
    for (index, node) in report.replicas.iter().enumerate() {
        let status = &node.status;
        println!(
            "  node {index} (replica {}, {:?}): view {}{}, last executed {}, \
             stable checkpoint {}, USIG counter {}, pending {}, rejected {:?}",
            node.id,
            node.role,
            status.view.0,
            if status.view_changing {
                " (changing)"
            } else {
                ""
            },
            status.last_executed.0,
            status.stable_checkpoint.0,
            status.usig_counter,
            status.pending_requests,
            report.rejections[index]
        );
    }
    println!(
        "  linearizability search explored {} states",
        report.linearizability_states
    );
    if report.passed() {
        println!(
            "  PASSED: agreement, validity, integrity, checkpoints, linearizability, \
             convergence, liveness"
        );
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
