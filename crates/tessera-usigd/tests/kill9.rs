//! The real daemon process, killed with SIGKILL while a client is creating UIs: after each
//! restart the counter is at or above every value a client received, so no value is reissued.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_crypto::SigningKey;
use tessera_types::{Digest, ReplicaId};
use tessera_usig::{Usig, UsigIdentity};
use tessera_usigd::UsigdClient;

const SEED: [u8; 32] = [0x42; 32];

fn public_keys() -> Vec<[u8; 32]> {
    let own = SigningKey::from_seed(&SEED).verifying_key().to_bytes();
    let other = SigningKey::from_seed(&[0x43; 32])
        .verifying_key()
        .to_bytes();
    vec![own, other, other]
}

fn identity() -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(0),
        epoch: 0,
    }
}

fn start(directory: &Path) -> Child {
    let socket = directory.join("usigd.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-usigd"));
    command
        .arg("--socket")
        .arg(&socket)
        .arg("--key-file")
        .arg(directory.join("usigd.key"))
        .arg("--counter-file")
        .arg(directory.join("usigd.counter"))
        .args(["--replica", "0"]);
    for key in public_keys() {
        command.arg("--public-key").arg(hex::encode(key));
    }
    command.env("RUST_LOG", "warn");
    command.spawn().expect("daemon binary starts")
}

fn connect(directory: &Path) -> UsigdClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UsigdClient::connect(&directory.join("usigd.sock"), identity(), public_keys()) {
            Ok(client) => return client,
            Err(error) if Instant::now() > deadline => panic!("daemon never came up: {error}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn the_counter_never_goes_back_after_kill_9() {
    let directory = tempfile::tempdir().expect("temp dir");
    let key_file = directory.path().join("usigd.key");
    std::fs::write(&key_file, hex::encode(SEED)).expect("write key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut highest_received = 0u64;
    let mut kills = 0;
    for round in 0..6u64 {
        let mut daemon = start(directory.path());
        let mut client = connect(directory.path());
        let resumed = client.last_counter().expect("identity");
        assert!(
            resumed >= highest_received,
            "round {round}: daemon resumed at {resumed} but a client already holds {highest_received}"
        );
        let received = Arc::new(AtomicU64::new(0));
        let worker_received = Arc::clone(&received);
        let worker = std::thread::spawn(move || {
            let message = Digest([9; 32]);
            // Runs until the kill breaks the connection.
            while let Ok(ui) = client.create_ui(&message) {
                worker_received.fetch_max(ui.counter, Ordering::SeqCst);
            }
        });
        // Kill mid-traffic: once UIs are flowing (a loaded machine may take a while to get
        // there), at a different point of the stream each round.
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.load(Ordering::SeqCst) <= resumed {
            assert!(
                Instant::now() < deadline,
                "round {round}: no UI within 20 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(3 + 7 * round));
        daemon.kill().expect("SIGKILL");
        daemon.wait().expect("reaped");
        kills += 1;
        worker.join().expect("worker ends");
        let got = received.load(Ordering::SeqCst);
        assert!(
            got > resumed,
            "round {round}: no UI was created before the kill"
        );
        highest_received = highest_received.max(got);
    }
    let mut daemon = start(directory.path());
    let mut client = connect(directory.path());
    let next = client.create_ui(&Digest([1; 32])).expect("create");
    assert!(next.counter > highest_received);
    daemon.kill().expect("stop");
    daemon.wait().expect("reaped");
    assert_eq!(kills, 6);
}
