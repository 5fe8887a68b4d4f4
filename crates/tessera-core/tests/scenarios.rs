//! Scripted MinBFT scenarios on the deterministic in-memory cluster.

mod common;

use common::{config, Cluster};
use tessera_kv::{Command, Response};
use tessera_types::{ClientId, View};

fn set(key: &str, value: &str) -> Command {
    Command::Set {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

fn get(key: &str) -> Command {
    Command::Get {
        key: key.as_bytes().to_vec(),
    }
}

#[test]
fn normal_case_executes_in_order_and_checkpoints() {
    let mut cluster = Cluster::new(config(3, 1));
    for number in 1..=60u64 {
        let client = ClientId::new(0, (number % 3) as u32);
        let response = cluster.invoke(
            client,
            number,
            &set(&format!("k{}", number % 7), &number.to_string()),
            5_000,
        );
        assert_eq!(response, Some(Response::Ok), "request {number}");
    }
    let response = cluster.invoke(ClientId::new(0, 9), 1, &get("k4"), 5_000);
    assert_eq!(response, Some(Response::Value(Some(b"60".to_vec()))));
    cluster.tick(500);
    cluster.assert_consistent();
    for replica in cluster.live() {
        assert!(
            replica.stable_checkpoint().seq.0 >= 8,
            "checkpoints became stable: {:?}",
            replica.status()
        );
        assert_eq!(replica.view(), View(0));
    }
}

#[test]
fn dead_primary_is_replaced_and_requests_complete() {
    let mut cluster = Cluster::new(config(3, 1));
    for number in 1..=10u64 {
        assert_eq!(
            cluster.invoke(
                ClientId::new(0, 1),
                number,
                &set("a", &number.to_string()),
                5_000
            ),
            Some(Response::Ok)
        );
    }
    cluster.crash(0);
    for number in 11..=20u64 {
        assert_eq!(
            cluster.invoke(
                ClientId::new(0, 1),
                number,
                &set("a", &number.to_string()),
                20_000
            ),
            Some(Response::Ok),
            "request {number} after the primary died"
        );
    }
    let response = cluster.invoke(ClientId::new(0, 2), 1, &get("a"), 20_000);
    assert_eq!(response, Some(Response::Value(Some(b"20".to_vec()))));
    cluster.tick(500);
    cluster.assert_consistent();
    for replica in cluster.live() {
        assert!(replica.view() >= View(1));
        assert!(!replica.is_view_changing());
    }
}
