//! A real cluster over each USIG that lives outside the replica process: `tessera init --usig
//! usigd|tpm`, then the replicas (with the usigd daemons or swtpms `LocalCluster` starts and
//! enrols) order and execute client commands, and a second start of the same directory works.
//!
//! The TPM case needs swtpm on PATH (.ci/run installs it).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{tessera_kv, LocalCluster, BINARY};

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

fn print_logs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("logs")) {
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(3000)..];
            eprintln!("--- {}\n{tail}", entry.path().display());
        }
    }
}

fn cluster_serves(usig: &str, base_port: u16) {
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = temp.path().join("cluster");
    let port = base_port.to_string();
    let written = Command::new(BINARY)
        .args(["init", "--usig", usig, "--base-port", &port, "--dir"])
        .arg(&dir)
        .output()
        .expect("run tessera init");
    assert!(
        written.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&written.stderr)
    );
    for round in 0..2 {
        let mut local = LocalCluster::start(&dir, Path::new(BINARY)).expect("start");
        if let Err(error) = local.wait_ready(Duration::from_secs(30)) {
            print_logs(&dir);
            panic!("{usig} cluster not ready in round {round}: {error:#}");
        }
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
