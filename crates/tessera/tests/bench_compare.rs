//! `tessera bench compare` end to end, with short runs: a real `redis-server` driven by
//! `redis-benchmark`, a real 3-member etcd cluster driven by Tessera's gRPC load generator,
//! and Tessera unreplicated and MinBFT behind `tessera gateway`. It checks that every system
//! measured every workload and that the chart is a well-formed SVG with a bar for each; it
//! asserts nothing about speed.
//!
//! Needs `redis-server`, `redis-benchmark` and `etcd` (Debian: redis-server, redis-tools,
//! etcd-server); CI installs them (`.ci/run`). Ports 62000–62552: above Linux's ephemeral range
//! and away from `bench compare`'s default 61000.

use std::path::Path;
use std::process::{Command, Output, Stdio};

const BINARY: &str = env!("CARGO_BIN_EXE_tessera");

const SYSTEMS: [&str; 4] = ["redis", "etcd", "tessera-unreplicated", "tessera-minbft"];
const WORKLOADS: [&str; 3] = ["SET -c 50", "SET -c 50 -P 16", "SET -c 1"];

fn compare(arguments: &[&str], svg: &Path, path_variable: Option<&str>) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(["bench", "compare"])
        .args(arguments)
        .arg("--svg")
        .arg(svg)
        .stdin(Stdio::null());
    if let Some(path) = path_variable {
        command.env("PATH", path);
    }
    command.output().expect("run tessera bench compare")
}

#[test]
fn compare_measures_every_system_and_workload_and_draws_them() {
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let svg = temp.path().join("compare.svg");
    let work = temp.path().join("work");
    let output = compare(
        &[
            "--duration",
            "1s",
            "--warmup",
            "500ms",
            "--base-port",
            "62000",
            "--json",
            "--dir",
            work.to_str().expect("a UTF-8 temporary path"),
        ],
        &svg,
        None,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tessera bench compare failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("--json printed no JSON ({error}): {stdout}"));
    let results = report["results"].as_array().expect("a results array");
    assert_eq!(results.len(), SYSTEMS.len() * WORKLOADS.len(), "{stdout}");
    for system in SYSTEMS {
        for workload in WORKLOADS {
            let row = results
                .iter()
                .find(|row| row["system"] == system && row["workload"] == workload)
                .unwrap_or_else(|| panic!("no {system} {workload} row: {stdout}"));
            let ops = row["ops_per_sec"].as_f64().unwrap_or(0.0);
            assert!(ops > 0.0, "{system} {workload}: {row}");
            let p50 = row["p50_ms"].as_f64().expect("a p50");
            let p99 = row["p99_ms"].as_f64().expect("a p99");
            assert!(p50 > 0.0 && p50 <= p99, "{system} {workload}: {row}");
            // Ratios are this row's ops/s over the peer's in the same workload.
            let redis = results
                .iter()
                .find(|other| other["system"] == "redis" && other["workload"] == workload)
                .and_then(|other| other["ops_per_sec"].as_f64())
                .expect("redis measured");
            let ratio = row["ratio_to_redis"].as_f64().expect("a ratio to redis");
            assert!((ratio - ops / redis).abs() < 1e-3 * ratio.max(1.0), "{row}");
        }
    }
    assert_eq!(
        report["goals"].as_array().map(Vec::len),
        Some(3),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&svg).expect("the SVG was written");
    let document = roxmltree::Document::parse(&text).expect("the SVG is well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    let bars: Vec<f64> = document
        .descendants()
        .filter(|node| node.has_tag_name("rect") && node.attribute("class") == Some("bar"))
        .map(|node| {
            node.attribute("height")
                .and_then(|height| height.parse().ok())
                .expect("a bar height")
        })
        .collect();
    // A throughput and a latency bar per system and workload.
    assert_eq!(bars.len(), 2 * SYSTEMS.len() * WORKLOADS.len(), "{text}");
    assert!(bars.iter().all(|height| *height > 0.0), "{bars:?}");
}

#[test]
fn compare_names_missing_programs_and_their_packages_before_starting_anything() {
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let svg = temp.path().join("compare.svg");
    let output = compare(&["--systems", "redis,etcd"], &svg, Some("/nonexistent"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`etcd` (Debian package etcd-server; needed by etcd)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`redis-server` (Debian package redis-server; needed by redis)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`sudo apt-get install -y etcd-server redis-server redis-tools`"),
        "{stderr}"
    );
    assert!(!svg.exists(), "nothing ran, so no chart");
}
