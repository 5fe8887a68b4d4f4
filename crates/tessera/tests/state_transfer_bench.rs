//! `tessera bench state-transfer` end to end on a small state: the real binary builds 8 MiB in a
//! local cluster, restarts a backup with its log, wipes the other backup and times its state
//! transfer with each strategy. Checks what the numbers stand on, never the numbers themselves: the wiped replica
//! ended at the others' stable checkpoint with their stable state digest, after receiving at
//! least the state's bytes.

use std::process::Command;
use std::time::Instant;

/// Ports 27300.. (replicas), 27400.. (clients), 27450.. (metrics): clear of the other tests and
/// below Linux's ephemeral ports (see docs/TESTING.md).
const BASE_PORT: &str = "27300";
const SIZE_BYTES: u64 = 8 << 20;

#[test]
fn a_wiped_replica_fetches_the_whole_state_and_ends_with_the_agreed_digest() {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "bench",
            "state-transfer",
            "--size",
            "8MiB",
            "--json",
            "--base-port",
            BASE_PORT,
        ])
        .output()
        .expect("run tessera bench state-transfer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the benchmark failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("not one JSON object ({error}):\n{stdout}"));
    eprintln!("{report:#}\n(took {:?})", started.elapsed());

    assert_eq!(report["size"], SIZE_BYTES);
    assert_eq!(report["state"]["bytes"], SIZE_BYTES);
    let bytes = report["bytes"].as_u64().expect("bytes");
    assert!(bytes >= SIZE_BYTES, "only {bytes} bytes moved");
    for field in ["seconds", "limit_bytes_per_sec", "validation_seconds"] {
        let value = report[field].as_f64().unwrap_or(-1.0);
        assert!(value > 0.0, "{field} is {}", report[field]);
    }

    // Every strategy by default, in order, each wiping the same backup.
    let strategies = report["strategies"].as_array().expect("strategies");
    let names: Vec<&str> = strategies
        .iter()
        .map(|transfer| transfer["strategy"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        [
            "merkle",
            "latency-first",
            "bandwidth-first-1",
            "bandwidth-first-2"
        ]
    );
    assert_eq!(strategies[0]["bytes"], bytes);
    let validated = report["validation"]["replica"].as_u64().expect("validated");
    let stable = report["state"]["stable_checkpoint"]
        .as_u64()
        .expect("stable");
    for transfer in strategies {
        let name = &transfer["strategy"];
        let wiped = transfer["replica"].as_u64().expect("the wiped replica");
        assert_ne!(wiped, validated, "two different backups");
        let replicas = transfer["final"].as_array().expect("final statuses");
        assert_eq!(replicas.len(), 3);
        let wiped_digest = replicas
            .iter()
            .find(|replica| replica["replica"] == wiped)
            .map(|replica| replica["stable_state_digest"].clone())
            .expect("the wiped replica's status");
        assert_eq!(
            wiped_digest.as_str().map(str::len),
            Some(64),
            "{name}: {wiped_digest}"
        );
        for replica in replicas {
            assert_eq!(replica["stable_checkpoint"], stable, "{name}: {replica}");
            assert_eq!(
                replica["stable_state_digest"], wiped_digest,
                "{name}: {replica}"
            );
        }
        // The transfer installed the whole state: at least the state's key and value bytes.
        let installed = transfer["state_bytes"].as_u64().expect("installed bytes");
        assert!(installed >= SIZE_BYTES, "{name}: installed {installed}");
        // What arrived: latency-first asks both other replicas (f+1 = 2) for every partition;
        // with every replica correct the others take one copy of each.
        let received = transfer["bytes"].as_u64().expect("bytes");
        if name == "latency-first" {
            assert!(received >= 2 * SIZE_BYTES, "{name}: received {received}");
        } else {
            assert!(
                (SIZE_BYTES..SIZE_BYTES * 3 / 2).contains(&received),
                "{name}: received {received}"
            );
        }
        // The phases come from the wiped replica's log: each was found.
        for (phase, value) in transfer["phases"].as_object().expect("phases") {
            assert!(value.as_f64().is_some(), "{name}: {phase} is {value}");
        }
    }
}
