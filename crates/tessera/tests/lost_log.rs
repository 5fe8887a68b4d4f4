//! A replica of an `hmac` cluster whose write-ahead log is lost (docs/STATE.md §5): started
//! with `--new-epoch` it comes back empty in a new USIG epoch, the group installs it, it fetches
//! the state, and its votes count again; killed afterwards, it replays its new log (which
//! records the epoch) and comes back the same. `--new-epoch` is refused while the log exists.
//! Ports 28400–28552.

mod support;

use std::time::Duration;
use support::local::wal_path;
use support::{init_cluster, kv_eventually, start_ready, tessera_kv, wait_for_exit, LocalCluster};

fn replica_log(local: &LocalCluster, id: u32) -> String {
    std::fs::read_to_string(local.log_path(id)).unwrap_or_default()
}

#[test]
fn a_replica_whose_log_is_lost_rejoins_in_a_new_epoch() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    init_cluster(&dir, "hmac", 28400);
    let mut local = start_ready(&dir);
    for number in 0..20 {
        let key = format!("before-{number}");
        assert_eq!(tessera_kv(&dir, &["set", &key, &number.to_string()]), "OK");
    }

    // The disk of replica 2 is lost.
    local.kill_replica(2).expect("kill -9 replica 2");
    std::fs::remove_file(wal_path(&dir, 2)).expect("delete replica 2's log");
    local
        .restart_replica_with(2, &["--new-epoch".to_string()])
        .expect("restart replica 2 with --new-epoch");
    for number in 0..10 {
        let key = format!("during-{number}");
        let set = ["set", key.as_str(), "x"];
        assert_eq!(kv_eventually(&dir, &set, Duration::from_secs(60)), "OK");
    }
    assert!(
        replica_log(&local, 2).contains("started empty in a new USIG epoch"),
        "replica 2 did not start a new epoch:\n{}",
        replica_log(&local, 2)
    );

    // Replica 1 goes: every quorum now needs replica 2 in its new epoch.
    local.kill_replica(1).expect("kill replica 1");
    for number in 0..10 {
        let key = format!("after-{number}");
        let set = ["set", key.as_str(), "y"];
        assert_eq!(kv_eventually(&dir, &set, Duration::from_secs(90)), "OK");
    }

    // Replica 2 now has a log again: --new-epoch is refused, a plain restart replays it.
    local
        .restart_replica_with(2, &["--new-epoch".to_string()])
        .expect("start replica 2 with --new-epoch again");
    let refused = wait_for_exit(&mut local, 2, "--new-epoch");
    assert!(!refused.success(), "--new-epoch with a log must fail");
    assert!(
        replica_log(&local, 2).contains("--new-epoch says its log was lost"),
        "the refusal names the flag:\n{}",
        replica_log(&local, 2)
    );
    local
        .restart_replica(2)
        .expect("restart replica 2 from its log");
    for number in 0..5 {
        let key = format!("replayed-{number}");
        let set = ["set", key.as_str(), "z"];
        assert_eq!(kv_eventually(&dir, &set, Duration::from_secs(90)), "OK");
    }
    assert!(
        replica_log(&local, 2).contains("replayed the write-ahead log"),
        "replica 2 did not replay its new log"
    );
    for number in 0..20 {
        let key = format!("before-{number}");
        let get = ["get", key.as_str()];
        assert_eq!(
            kv_eventually(&dir, &get, Duration::from_secs(30)),
            format!("\"{number}\"")
        );
    }
    local.stop().expect("stop");
}
