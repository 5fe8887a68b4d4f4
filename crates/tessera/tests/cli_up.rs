//! `tessera up` as a user runs it: it writes a cluster, prints its endpoints, serves `tessera kv`,
//! restarts a replica that is killed (from its write-ahead log), on Ctrl-C stops every replica
//! and exits cleanly, and a second `up` in the same directory still has the data.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::{read_up_until_ready, tessera_kv, BINARY};

/// How long `up` may take to print its endpoints.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `up` may take to exit after SIGINT.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `up` process and the replica processes it reported; all are killed if the test fails.
struct UpGuard {
    up: Child,
    replica_pids: Vec<i32>,
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        if matches!(self.up.try_wait(), Ok(None)) {
            let _ = self.up.kill();
            let _ = self.up.wait();
        }
        // The replicas run in their own process group, so killing `up` does not reach them.
        for &pid in &self.replica_pids {
            if process_is_running(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: `kill` has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// True if `pid` exists and is not a zombie.
fn process_is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Starts `tessera up` on `dir` and waits until it is ready; returns the guard and its output.
fn start_up(dir: &std::path::Path) -> (UpGuard, mpsc::Receiver<String>, String) {
    let up = Command::new(BINARY)
        .args(["up", "--base-port", "21600", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tessera up");
    let mut guard = UpGuard {
        up,
        replica_pids: Vec::new(),
    };
    let stdout = guard.up.stdout.take().expect("piped stdout");
    let (lines_sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                return;
            }
        }
    });
    let printed = read_up_until_ready(&lines, READY_TIMEOUT, &mut guard.replica_pids);
    (guard, lines, printed.join("\n"))
}

/// Sends SIGINT to `up` and checks that it stops every replica and exits cleanly.
fn stop_up(mut guard: UpGuard, lines: mpsc::Receiver<String>) {
    signal(guard.up.id() as i32, libc::SIGINT);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = guard.up.try_wait().expect("wait for up") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "`up` did not exit within {EXIT_TIMEOUT:?} of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "`up` exited with {status}");
    for &pid in &guard.replica_pids {
        assert!(!process_is_running(pid), "replica process {pid} still runs");
    }
    // The reader thread ends when `up`'s stdout closes, which it has by now.
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|line| line.contains("Stopped")),
        "`up` reports that it stopped: {rest:?}"
    );
}

#[test]
fn up_prints_endpoints_restarts_a_killed_replica_and_keeps_data_across_runs() {
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let dir = temp.path().join("cluster");
    let (mut guard, lines, text) = start_up(&dir);
    assert_eq!(guard.replica_pids.len(), 3, "three replica pids in {text}");
    for id in 0..3 {
        assert!(
            text.contains(&format!("127.0.0.1:{}", 21_700 + id)),
            "client endpoint of replica {id} in {text}"
        );
    }
    assert!(text.contains("tessera kv --dir"), "usage hints in {text}");

    assert_eq!(tessera_kv(&dir, &["set", "a", "b"]), "OK");
    assert_eq!(tessera_kv(&dir, &["get", "a"]), "\"b\"");

    // A crash: `up` restarts the replica, which replays its log and serves again.
    signal(guard.replica_pids[1], libc::SIGKILL);
    let deadline = Instant::now() + READY_TIMEOUT;
    let restarted = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("`up` never said it restarted replica 1");
        if line.starts_with("replica 1 restarted, pid ") {
            break line;
        }
    };
    let pid: i32 = restarted
        .rsplit(' ')
        .next()
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {restarted:?}"));
    guard.replica_pids.push(pid);
    assert!(process_is_running(pid), "the restarted replica runs");
    assert_eq!(tessera_kv(&dir, &["set", "c", "d"]), "OK");
    let log_path = dir.join("logs").join("replica-1.log");
    let deadline = Instant::now() + READY_TIMEOUT;
    while !std::fs::read_to_string(&log_path)
        .expect("read the replica's log")
        .contains("replayed the write-ahead log")
    {
        assert!(
            Instant::now() < deadline,
            "replica 1 did not come back through its write-ahead log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_up(guard, lines);

    // Every replica replays its log: the data written in the first run is there.
    let (guard, lines, _) = start_up(&dir);
    assert_eq!(tessera_kv(&dir, &["get", "a"]), "\"b\"");
    assert_eq!(tessera_kv(&dir, &["get", "c"]), "\"d\"");
    stop_up(guard, lines);
}
