//! A real cluster over each USIG that lives outside the replica process: `tessera init --usig
//! usigd|tpm`, then the replicas (with the usigd daemons or swtpms `LocalCluster` starts and
//! enrols) order and execute client commands, and a second start of the same directory works.
//!
//! The TPM case needs swtpm on PATH (.ci/run installs it).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{init_cluster, kv_eventually, start_ready, tessera_kv, BINARY};

fn run(arguments: &[&str], dir: &Path) -> String {
    let output = Command::new(BINARY)
        .args(arguments)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run tessera");
    assert!(
        output.status.success(),
        "tessera {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn cluster_serves(usig: &str, base_port: u16) {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    init_cluster(&dir, usig, base_port);
    for round in 0..2 {
        let mut local = start_ready(&dir);
        let key = format!("key-{round}");
        assert_eq!(tessera_kv(&dir, &["set", &key, usig]), "OK");
        assert_eq!(tessera_kv(&dir, &["get", &key]), format!("\"{usig}\""));
        for _ in 0..10 {
            tessera_kv(&dir, &["incr", "counter"]);
        }
        assert_eq!(tessera_kv(&dir, &["get", "counter"]), "\"10\"");
        let status = run(&["status"], &dir);
        let healthy = status
            .lines()
            .filter(|line| line.split_whitespace().nth(2) == Some("ok"))
            .count();
        assert_eq!(healthy, 3, "{status}");
        local.stop().expect("stop");
    }
}

#[test]
fn a_cluster_runs_over_usigd() {
    cluster_serves("usigd", 21900);
}

#[test]
fn a_cluster_runs_over_swtpm() {
    cluster_serves("tpm", 22100);
}

/// A replica of an external-USIG cluster keeps no log, while its `usigd` daemon or swtpm keeps
/// counting. Killed with -9 and restarted, it is empty but its USIG has spoken, so it rejoins
/// in a new USIG epoch (docs/PROTOCOL.md §8): the group orders its INSTALL, it catches up, and
/// its votes count again — shown by stopping another replica afterwards, so that the restarted
/// one is needed for every quorum.
fn restarted_replica_rejoins_in_a_new_epoch(usig: &str, base_port: u16) {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    init_cluster(&dir, usig, base_port);
    let mut local = start_ready(&dir);
    for number in 0..20 {
        let key = format!("before-{number}");
        assert_eq!(tessera_kv(&dir, &["set", &key, &number.to_string()]), "OK");
    }
    local.kill_replica(2).expect("kill -9 replica 2");
    local.restart_replica(2).expect("restart replica 2");
    for number in 0..10 {
        let key = format!("during-{number}");
        let set = ["set", key.as_str(), "x"];
        assert_eq!(kv_eventually(&dir, &set, Duration::from_secs(60)), "OK");
    }
    let log = std::fs::read_to_string(local.log_path(2)).unwrap_or_default();
    assert!(
        log.contains("rejoining in a new epoch"),
        "replica 2 did not start a new epoch:\n{log}"
    );
    // Replica 1 goes: every quorum now needs replica 2, in its new epoch.
    local.kill_replica(1).expect("kill replica 1");
    for number in 0..10 {
        let key = format!("after-{number}");
        let set = ["set", key.as_str(), "y"];
        assert_eq!(kv_eventually(&dir, &set, Duration::from_secs(90)), "OK");
    }
    for number in 0..20 {
        let key = format!("before-{number}");
        let get = ["get", key.as_str()];
        assert_eq!(
            kv_eventually(&dir, &get, Duration::from_secs(30)),
            format!("\"{number}\"")
        );
    }
    let log = std::fs::read_to_string(local.log_path(0)).unwrap_or_default();
    assert!(
        log.contains("USIG epoch installed"),
        "replica 0 never installed the epoch"
    );
    local.stop().expect("stop");
}

#[test]
fn a_usigd_replica_restarted_without_a_log_rejoins_in_a_new_epoch() {
    restarted_replica_rejoins_in_a_new_epoch("usigd", 27600);
}

#[test]
fn a_tpm_replica_restarted_without_a_log_rejoins_in_a_new_epoch() {
    restarted_replica_rejoins_in_a_new_epoch("tpm", 28000);
}
