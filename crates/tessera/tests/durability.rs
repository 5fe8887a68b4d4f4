//! Durability: real replica processes are killed with SIGKILL at random moments while clients
//! run, and restarted at once. Each restart replays the replica's write-ahead log; the client
//! history must be linearizable, no executed request may be lost (the per-session models, the
//! shared counter and the compare-and-set chain all check the final state), and every replica
//! must end with the same state digest. The replicas replace their logs with snapshots every
//! 64 KiB of log, so kills also land during snapshots and restarts begin from them.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{
    check_histories, check_linearizable, connect, query_status, run_workload, seed,
    wait_for_agreement, ClusterDir, RunningCluster,
};
use tessera_client::KvClient;

/// How long a restarted replica may take to answer and catch up.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn replicas_killed_at_random_moments_restart_from_their_logs_and_lose_nothing() {
    const SESSIONS: usize = 6;
    const OPERATIONS_PER_SESSION: usize = 800;
    const KILLS_MIN: usize = 6;
    let dir = ClusterDir::create(24_800, |protocol| {
        // Small checkpoints and windows: the kills land before, during and after checkpoints
        // and garbage collection, and a restarted replica may have to fetch state.
        protocol.checkpoint_interval = 8;
        protocol.log_size = 16;
        protocol.window = 8;
        protocol.request_timeout_ms = 1_000;
        protocol.view_change_timeout_ms = 1_000;
    });
    // Tiny snapshots: every replica replaces its log with a snapshot many times during the run,
    // so kills also land in the middle of a snapshot and restarts begin from one.
    let mut cluster = RunningCluster::start_with(dir, &["--snapshot-after", "64KiB"]);
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    let progress = Arc::new(AtomicUsize::new(0));
    let (clients, load) =
        runtime.block_on(async {
            let clients = vec![
                connect(&cluster.dir, 0).await,
                connect(&cluster.dir, 1).await,
            ];
            let load = tokio::spawn({
                let clients = clients.clone();
                let progress = progress.clone();
                async move {
                    run_workload(&clients, SESSIONS, OPERATIONS_PER_SESSION, seed, progress).await
                }
            });
            (clients, load)
        });

    // One replica down at a time (f = 1): kill one, restart it after a random pause, wait
    // until it has caught up with where the others were, then pick the next.
    let mut kills = Vec::new();
    let started = Instant::now();
    while !load.is_finished() {
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..250)));
        if load.is_finished() {
            break;
        }
        let victim = rng.gen_range(0..3u32);
        let done_before = progress.load(Ordering::Relaxed);
        cluster.local.kill_replica(victim).expect("kill a replica");
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
        cluster
            .local
            .restart_replica(victim)
            .expect("restart the replica");
        kills.push((victim, done_before));
        runtime.block_on(wait_rejoined(&cluster, victim));
    }
    eprintln!(
        "seed {seed}: {} kills in {:?}: {kills:?}",
        kills.len(),
        started.elapsed()
    );
    assert!(
        kills.len() >= KILLS_MIN,
        "the load finished after only {} kills: the test needs a longer load",
        kills.len()
    );

    runtime.block_on(async {
        let histories = match tokio::time::timeout(Duration::from_secs(60), load).await {
            Ok(Ok(histories)) => histories,
            Ok(Err(error)) => panic!("the load failed: {error}"),
            Err(_) => panic!("the load did not finish within 60 s of the last restart"),
        };
        let mut reader = KvClient::new(clients[1].session());
        let checked = check_histories(&histories, &mut reader).await;
        assert!(checked >= SESSIONS * OPERATIONS_PER_SESSION, "{checked}");
        let placed = check_linearizable(&histories);
        assert_eq!(placed, checked, "every operation is in the timeline");
        // Generous: after a storm of kills a view change may be in its backoff (up to 16x the
        // 1 s timeout) on a loaded machine.
        let statuses = wait_for_agreement(&cluster.dir, &[0, 1, 2], Duration::from_secs(60)).await;
        eprintln!("agreement after the kills: {statuses:#?}");
    });

    // Every killed replica came back through its log, not as an empty replica, and restarts
    // began from snapshots.
    let mut restored_from_snapshots = 0;
    for (victim, _) in &kills {
        let log = std::fs::read_to_string(cluster.dir.log_path(*victim)).expect("read a log");
        assert!(
            log.contains("replayed the write-ahead log"),
            "replica {victim} restarted without replaying its log"
        );
        // A crash leaves at most a torn last write, which is cut off: never damage to salvage
        // (a salvage here would hide a replay that diverged).
        assert!(
            !log.contains("salvaging it"),
            "replica {victim} found its log damaged after a crash"
        );
        restored_from_snapshots += log.matches("restored from a snapshot").count();
    }
    assert!(
        restored_from_snapshots > 0,
        "no restart began from a snapshot"
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Waits until replica `id` answers status queries again and has executed at least what the
/// slowest other replica had executed when it came back.
async fn wait_rejoined(cluster: &RunningCluster, id: u32) {
    let deadline = Instant::now() + REJOIN_TIMEOUT;
    let mut target = None;
    loop {
        if target.is_none() {
            let mut others = Vec::new();
            for other in (0..3).filter(|other| *other != id) {
                if let Ok(status) = query_status(&cluster.dir.client_address(other)).await {
                    others.push(status.last_executed.0);
                }
            }
            if others.len() == 2 {
                target = others.into_iter().min();
            }
        }
        if let (Some(target), Ok(status)) =
            (target, query_status(&cluster.dir.client_address(id)).await)
        {
            if status.last_executed.0 >= target {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "replica {id} did not rejoin within {REJOIN_TIMEOUT:?} (target {target:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
