//! Real replica processes on loopback serve concurrent clients; every result is checked against
//! a sequential model, and the replicas must end with the same state — with every replica up,
//! and after the primary is killed in the middle of the load.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{
    check_histories, connect, run_bounded, run_workload, seed, wait_for_agreement, ClusterDir,
    RunningCluster,
};
use tessera_client::KvClient;

/// Small checkpoint intervals so a few hundred requests take several checkpoints.
fn small_checkpoints(protocol: &mut tessera_types::ProtocolConfig) {
    protocol.checkpoint_interval = 8;
    protocol.log_size = 16;
    protocol.window = 8;
}

#[test]
fn thousand_mixed_operations_match_a_model() {
    const SESSIONS: usize = 8;
    const OPERATIONS_PER_SESSION: usize = 125;
    let dir = ClusterDir::create(21_000, small_checkpoints);
    let cluster = RunningCluster::start(dir);
    let seed = seed();
    run_bounded(Duration::from_secs(50), async {
        let started = Instant::now();
        let clients = [
            connect(&cluster.dir, 0).await,
            connect(&cluster.dir, 1).await,
        ];
        let progress = Arc::new(AtomicUsize::new(0));
        let histories = run_workload(
            &clients,
            SESSIONS,
            OPERATIONS_PER_SESSION,
            seed,
            progress.clone(),
        )
        .await;
        let mut reader = KvClient::new(clients[0].session());
        let checked = check_histories(&histories, &mut reader).await;
        assert!(
            checked >= SESSIONS * OPERATIONS_PER_SESSION,
            "{checked} operations"
        );
        eprintln!("{checked} operations checked in {:?}", started.elapsed());

        // Statuses are published about every 100 ms, so an agreement can be seen in copies
        // taken before the last requests executed (CI saw 923 of 1,050): wait for the count.
        let deadline = Instant::now() + Duration::from_secs(15);
        let statuses = loop {
            let statuses =
                wait_for_agreement(&cluster.dir, &[0, 1, 2], Duration::from_secs(15)).await;
            if statuses
                .iter()
                .all(|status| status.requests_executed as usize >= checked)
                || Instant::now() >= deadline
            {
                break statuses;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let first = &statuses[0];
        assert_eq!(first.view.0, 0, "no view change without faults");
        assert!(
            statuses
                .iter()
                .all(|status| status.requests_executed == first.requests_executed),
            "every replica executed the same requests: {statuses:#?}"
        );
        // Every operation above plus the final reads is one request.
        assert!(first.requests_executed as usize >= checked, "{first:?}");
    });
}

#[test]
fn killing_the_primary_mid_load_changes_view_and_everything_completes() {
    const SESSIONS: usize = 6;
    const OPERATIONS_PER_SESSION: usize = 80;
    let dir = ClusterDir::create(21_200, |protocol| {
        small_checkpoints(protocol);
        protocol.request_timeout_ms = 1_000;
        protocol.view_change_timeout_ms = 1_000;
    });
    let mut cluster = RunningCluster::start(dir);
    let seed = seed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    // The load runs on the runtime while this thread kills the primary.
    let (clients, load) =
        runtime.block_on(async {
            let clients = vec![
                connect(&cluster.dir, 0).await,
                connect(&cluster.dir, 1).await,
            ];
            let progress = Arc::new(AtomicUsize::new(0));
            let load = tokio::spawn({
                let clients = clients.clone();
                let progress = progress.clone();
                async move {
                    run_workload(&clients, SESSIONS, OPERATIONS_PER_SESSION, seed, progress).await
                }
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            while progress.load(Ordering::Relaxed) < SESSIONS * OPERATIONS_PER_SESSION / 3 {
                assert!(Instant::now() < deadline, "the load made no progress");
                assert!(!load.is_finished(), "the load ended before the kill");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (clients, load)
        });
    let killed_at = Instant::now();
    cluster.local.kill_replica(0).expect("kill the primary");
    run_bounded_on(&runtime, Duration::from_secs(50), async {
        let histories = match load.await {
            Ok(histories) => histories,
            Err(error) => panic!("the load failed after the primary was killed: {error}"),
        };
        eprintln!(
            "load completed {:?} after the primary was killed",
            killed_at.elapsed()
        );
        let mut reader = KvClient::new(clients[1].session());
        let checked = check_histories(&histories, &mut reader).await;
        assert!(
            checked >= SESSIONS * OPERATIONS_PER_SESSION,
            "{checked} operations"
        );

        let statuses = wait_for_agreement(&cluster.dir, &[1, 2], Duration::from_secs(15)).await;
        for status in &statuses {
            assert!(status.view.0 >= 1, "survivors left view 0: {status:?}");
            assert_ne!(status.primary.0, 0, "the dead replica is not primary");
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Like [`run_bounded`], on an existing runtime.
fn run_bounded_on<F: std::future::Future<Output = ()>>(
    runtime: &tokio::runtime::Runtime,
    limit: Duration,
    body: F,
) {
    runtime.block_on(async {
        if tokio::time::timeout(limit, body).await.is_err() {
            panic!("the test did not finish within {limit:?}");
        }
    });
}
