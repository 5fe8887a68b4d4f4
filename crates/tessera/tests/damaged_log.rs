//! A replica of an `hmac` cluster whose write-ahead log is damaged salvages it by itself
//! (docs/STATE.md §5, `tessera_node::salvage`): a byte flipped in the middle of its records, it
//! keeps the log up to the damage; a byte flipped in its snapshot, it falls back to the previous
//! log. Each time it keeps the damaged file, rejoins in a new USIG epoch, and is then needed
//! for every quorum; no write acknowledged before is lost. With `--no-salvage` a damaged log is
//! refused and left untouched; `--no-previous-log` deletes the previous log. Ports 28700–28852.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::local::wal_path;
use support::{init_cluster, kv_eventually, start_ready, wait_for_exit, LocalCluster};

/// Replica 2 snapshots often, so that its log starts with a snapshot and keeps a previous log.
fn snapshot_often() -> Vec<String> {
    vec!["--snapshot-after".into(), "48KiB".into()]
}

fn replica_log(local: &LocalCluster, id: u32) -> String {
    std::fs::read_to_string(local.log_path(id)).unwrap_or_default()
}

/// The log's header: snapshot length at bytes 60..68; the snapshot (after a 32-byte digest)
/// and then the records follow the 68-byte header.
fn snapshot_len(log: &Path) -> u64 {
    let bytes = std::fs::read(log).unwrap_or_default();
    bytes
        .get(60..68)
        .map_or(0, |field| u64::from_le_bytes(field.try_into().unwrap()))
}

fn records_start(log: &Path) -> u64 {
    match snapshot_len(log) {
        0 => 68,
        length => 68 + 32 + length,
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).expect("read the log");
    bytes[offset as usize] ^= 0x5a;
    std::fs::write(path, bytes).expect("write the log");
}

fn previous_log(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

fn damaged_copies(log: &Path) -> usize {
    let name = log.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(log.parent().unwrap())
        .unwrap()
        .filter(|entry| {
            let entry = entry.as_ref().unwrap().file_name();
            entry
                .to_string_lossy()
                .starts_with(&format!("{name}.damaged-"))
        })
        .count()
}

fn set(dir: &Path, key: &str, value: &str) {
    assert_eq!(
        kv_eventually(dir, &["set", key, value], Duration::from_secs(90)),
        "OK"
    );
}

/// Waits until replica 2's log says it salvaged its log `times` times, the last keeping `kept`.
fn wait_for_salvage(local: &LocalCluster, times: usize, kept: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = replica_log(local, 2);
        let salvages: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("salvaged the write-ahead log"))
            .collect();
        if salvages.len() >= times {
            let last = salvages[times - 1];
            assert!(last.contains(kept), "expected kept={kept}: {last}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica 2 did not salvage its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replica 2's lag behind the most advanced replica, as `tessera status` shows it (`None`
/// while it does not answer or is changing views).
fn lag_of_replica_2(dir: &Path) -> Option<u64> {
    let output = std::process::Command::new(support::BINARY)
        .args(["status", "--dir"])
        .arg(dir)
        .output()
        .expect("run tessera status");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let row: Vec<&str> = table
        .lines()
        .find(|line| line.split_whitespace().next() == Some("2"))?
        .split_whitespace()
        .collect();
    // replica, address, health, view, primary, last executed, stable, lag, ...
    if row.get(2) != Some(&"ok") {
        return None;
    }
    row.get(7)?.parse().ok()
}

/// Writes with all three up until replica 2 has caught up: the group installs its new epoch and
/// it fetches what it lacks. What its salvaged log lacks may be garbage-collected at the others
/// (it had acknowledged it before the crash); then it catches up by state transfer once the
/// group's checkpoints are far enough ahead, which takes the group's progress (docs/STATE.md
/// §5), and with n = 2f + 1 the group cannot progress without it meanwhile. Then replica 1 goes
/// down for a while: every quorum needs replica 2, in its new epoch.
fn writes_need_replica_2(
    local: &mut LocalCluster,
    dir: &Path,
    round: &str,
    written: &mut Vec<String>,
) {
    let mut number = 0;
    while lag_of_replica_2(dir) != Some(0) || number < 5 {
        assert!(number < 800, "replica 2 did not catch up");
        let key = format!("{round}-during-{number}");
        set(dir, &key, round);
        written.push(key);
        number += 1;
    }
    eprintln!("{round}: replica 2 caught up after {number} writes");
    local.kill_replica(1).expect("kill replica 1");
    for number in 0..8 {
        let key = format!("{round}-{number}");
        set(dir, &key, round);
        written.push(key);
    }
    local.restart_replica(1).expect("restart replica 1");
}

#[test]
fn a_replica_salvages_a_damaged_log_and_rejoins_in_a_new_epoch() {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    init_cluster(&dir, "hmac", 28700);
    let mut local = start_ready(&dir);
    local
        .restart_replica_with(2, &snapshot_often())
        .expect("restart replica 2");
    let log = wal_path(&dir, 2);
    let mut written = Vec::new();

    // Until replica 2's log starts with a snapshot and keeps the one before, plus some records.
    let mut number = 0;
    while !(previous_log(&log).exists() && snapshot_len(&log) > 0) {
        assert!(number < 1500, "replica 2 took no two snapshots");
        let key = format!("before-{number}");
        set(&dir, &key, &number.to_string());
        written.push(key);
        number += 1;
    }
    for extra in 0..30 {
        let key = format!("records-{extra}");
        set(&dir, &key, "r");
        written.push(key);
    }

    // A byte in the middle of the records after the snapshot.
    local.kill_replica(2).expect("kill -9 replica 2");
    let start = records_start(&log);
    let length = std::fs::metadata(&log).unwrap().len();
    assert!(length > start + 1000, "too few records after the snapshot");
    flip_byte(&log, start + (length - start) / 2);
    local
        .restart_replica_with(2, &snapshot_often())
        .expect("restart replica 2");
    wait_for_salvage(&local, 1, "kept=Prefix");
    assert_eq!(damaged_copies(&log), 1);
    writes_need_replica_2(&mut local, &dir, "after-records", &mut written);

    // A byte inside the snapshot: the previous log is the fallback.
    local.kill_replica(2).expect("kill -9 replica 2");
    assert!(previous_log(&log).exists(), "the previous log is gone");
    let snapshot = snapshot_len(&log);
    assert!(snapshot > 0, "the log has no snapshot to damage");
    flip_byte(&log, 68 + 32 + snapshot / 2);
    local
        .restart_replica_with(2, &snapshot_often())
        .expect("restart replica 2");
    wait_for_salvage(&local, 2, "kept=Previous");
    assert_eq!(damaged_copies(&log), 2);
    writes_need_replica_2(&mut local, &dir, "after-snapshot", &mut written);

    // With --no-salvage a damaged log is refused and left as it is; --no-previous-log deletes
    // the previous log at start.
    local.kill_replica(2).expect("kill -9 replica 2");
    let start = records_start(&log);
    let length = std::fs::metadata(&log).unwrap().len();
    flip_byte(&log, start + (length - start) / 2);
    let damaged = std::fs::read(&log).unwrap();
    let mut refusing = snapshot_often();
    refusing.push("--no-salvage".into());
    local
        .restart_replica_with(2, &refusing)
        .expect("start replica 2 with --no-salvage");
    let refused = wait_for_exit(&mut local, 2, "its damaged log");
    assert!(!refused.success());
    assert!(replica_log(&local, 2).contains("is corrupt at byte"));
    assert_eq!(
        std::fs::read(&log).unwrap(),
        damaged,
        "the refused log was changed"
    );
    assert_eq!(damaged_copies(&log), 2);
    let mut without_previous = snapshot_often();
    without_previous.push("--no-previous-log".into());
    local
        .restart_replica_with(2, &without_previous)
        .expect("restart replica 2 with --no-previous-log");
    wait_for_salvage(&local, 3, "kept=Prefix");
    assert!(!previous_log(&log).exists(), "--no-previous-log kept .prev");
    writes_need_replica_2(&mut local, &dir, "after-refusal", &mut written);

    let text = replica_log(&local, 2);
    assert!(
        text.matches("started a new USIG epoch").count() >= 3,
        "replica 2 did not start three epochs:\n{text}"
    );
    // Nothing acknowledged was lost.
    for key in &written {
        let value = kv_eventually(&dir, &["get", key], Duration::from_secs(30));
        assert_ne!(value, "(nil)", "{key} was lost");
    }
    local.stop().expect("stop");
}
