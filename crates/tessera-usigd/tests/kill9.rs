//! The real daemon process, killed with SIGKILL while a client is creating UIs (and starting
//! epochs): after each restart the daemon's (epoch, counter) is at or above every UI and every
//! epoch a client received, so no (epoch, counter) pair is reissued and no old epoch returns.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

fn start(directory: &Path) -> Child {
    start_with_epoch(directory, 0)
}

fn start_with_epoch(directory: &Path, epoch: u64) -> Child {
    let socket = directory.join("usigd.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-usigd"));
    command
        .arg("--socket")
        .arg(&socket)
        .arg("--key-file")
        .arg(directory.join("usigd.key"))
        .arg("--counter-file")
        .arg(directory.join("usigd.counter"))
        .args(["--replica", "0"])
        .arg("--epoch")
        .arg(epoch.to_string());
    for key in public_keys() {
        command.arg("--public-key").arg(hex::encode(key));
    }
    command.env("RUST_LOG", "warn");
    command.spawn().expect("daemon binary starts")
}

fn connect(directory: &Path) -> UsigdClient {
    connect_at_least(directory, 0)
}

fn connect_at_least(directory: &Path, epoch: u64) -> UsigdClient {
    let identity = UsigIdentity {
        replica: ReplicaId(0),
        epoch,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UsigdClient::connect(&directory.join("usigd.sock"), identity, public_keys()) {
            Ok(client) => return client,
            Err(error) if Instant::now() > deadline => panic!("daemon never came up: {error}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn write_key(directory: &Path) {
    let key_file = directory.join("usigd.key");
    std::fs::write(&key_file, hex::encode(SEED)).expect("write key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[test]
fn the_counter_never_goes_back_after_kill_9() {
    let directory = tempfile::tempdir().expect("temp dir");
    write_key(directory.path());
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

/// What a client saw before a kill: every (epoch, counter) it received, and the highest epoch
/// the daemon confirmed with EpochStarted.
#[derive(Default)]
struct Seen {
    uis: HashSet<(u64, u64)>,
    epoch_confirmed: u64,
}

impl Seen {
    /// The highest (epoch, counter) received or confirmed: the daemon may never resume below it.
    fn high_water(&self) -> (u64, u64) {
        let received = self.uis.iter().copied().max().unwrap_or((0, 0));
        received.max((self.epoch_confirmed, 0))
    }
}

#[test]
fn a_started_epoch_survives_kill_9_and_no_pair_is_issued_twice() {
    let directory = tempfile::tempdir().expect("temp dir");
    write_key(directory.path());
    let seen = Arc::new(Mutex::new(Seen::default()));
    for round in 0..6u64 {
        let mut daemon = start(directory.path());
        let mut client = connect(directory.path());
        let resumed = (
            client.identity().epoch,
            client.last_counter().expect("identity"),
        );
        let high_water = seen.lock().expect("lock").high_water();
        assert!(
            resumed >= high_water,
            "round {round}: daemon resumed at {resumed:?} but a client already holds {high_water:?}"
        );
        let operations = Arc::new(AtomicU64::new(0));
        let worker_operations = Arc::clone(&operations);
        let worker_seen = Arc::clone(&seen);
        let worker = std::thread::spawn(move || {
            let message = Digest([5; 32]);
            // Every fourth operation starts an epoch, so kills land around both kinds of
            // durable write; runs until the kill breaks the connection.
            for step in 0u64.. {
                if step % 4 == 3 {
                    let Ok(epoch) = client.start_epoch() else {
                        return;
                    };
                    let mut seen = worker_seen.lock().expect("lock");
                    assert!(epoch > seen.epoch_confirmed, "epoch {epoch} repeated");
                    seen.epoch_confirmed = epoch;
                } else {
                    let Ok(ui) = client.create_ui(&message) else {
                        return;
                    };
                    let mut seen = worker_seen.lock().expect("lock");
                    assert!(ui.epoch >= seen.epoch_confirmed, "UI of a closed epoch");
                    assert!(
                        seen.uis.insert((ui.epoch, ui.counter)),
                        "(epoch {}, counter {}) issued twice",
                        ui.epoch,
                        ui.counter
                    );
                }
                worker_operations.fetch_add(1, Ordering::SeqCst);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while operations.load(Ordering::SeqCst) < 8 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no progress within 20 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(2 + 5 * round));
        daemon.kill().expect("SIGKILL");
        daemon.wait().expect("reaped");
        worker.join().expect("worker ends");
    }
    // A daemon restarted with a lower configured epoch keeps the one it reached; a client
    // asking for the highest epoch it saw connects, and the next UI is above everything seen.
    let high_water = seen.lock().expect("lock").high_water();
    let mut daemon = start_with_epoch(directory.path(), 0);
    let mut client = connect_at_least(directory.path(), high_water.0);
    let next = client.create_ui(&Digest([1; 32])).expect("create");
    assert!((next.epoch, next.counter) > high_water);
    let started = client.start_epoch().expect("start epoch");
    assert!(started > next.epoch);
    daemon.kill().expect("stop");
    daemon.wait().expect("reaped");
    let mut daemon = start(directory.path());
    let mut client = connect(directory.path());
    assert_eq!(client.identity().epoch, started);
    assert_eq!(
        client.create_ui(&Digest([2; 32])).expect("create").counter,
        1
    );
    daemon.kill().expect("stop");
    daemon.wait().expect("reaped");
    assert!(
        seen.lock().expect("lock").epoch_confirmed >= 6,
        "epochs were started"
    );
}
