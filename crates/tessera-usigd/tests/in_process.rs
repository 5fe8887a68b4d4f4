//! usigd served on a thread over a temporary socket: the shared conformance suite, restarts,
//! peer-credential refusal, hostile bytes and key-file checks.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use tempfile::TempDir;
use tessera_crypto::SigningKey;
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::conformance::{self, CLUSTER_SIZE};
use tessera_usig::{Usig, UsigError, UsigIdentity};
use tessera_usigd::wire::{self, ErrorCode, Request, Response};
use tessera_usigd::{DaemonConfig, DaemonError, DaemonHandle, UsigdClient};

fn seed(family: u8, replica: u32) -> [u8; 32] {
    [family.wrapping_mul(16).wrapping_add(replica as u8 + 1); 32]
}

fn public_keys(family: u8) -> Vec<[u8; 32]> {
    (0..CLUSTER_SIZE)
        .map(|replica| {
            SigningKey::from_seed(&seed(family, replica))
                .verifying_key()
                .to_bytes()
        })
        .collect()
}

fn identity(replica: u32) -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(replica),
        epoch: 0,
    }
}

/// The test's own uid: the one a same-user deployment allows.
fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn write_key(path: &Path, seed: [u8; 32]) {
    std::fs::write(path, hex::encode(seed)).expect("write key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn config(directory: &Path, family: u8, replica: u32, allowed_uid: u32) -> DaemonConfig {
    let key_file = directory.join(format!("usigd-{replica}.key"));
    if !key_file.exists() {
        write_key(&key_file, seed(family, replica));
    }
    DaemonConfig {
        socket_path: directory.join(format!("usigd-{replica}.sock")),
        key_file,
        counter_file: directory.join(format!("usigd-{replica}.counter")),
        identity: identity(replica),
        public_keys: public_keys(family),
        allowed_uid,
        reserve_ahead: 1,
    }
}

/// A client together with the daemon and directory it needs alive.
struct Hosted {
    client: UsigdClient,
    _daemon: DaemonHandle,
    _directory: TempDir,
}

impl Usig for Hosted {
    fn identity(&self) -> UsigIdentity {
        self.client.identity()
    }
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        self.client.create_ui(message)
    }
    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        self.client.start_epoch()
    }
    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        self.client.verify_ui(signer, message, ui)
    }
}

fn hosted(family: u8, replica: ReplicaId) -> Box<dyn Usig> {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), family, replica.0, my_uid());
    let daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let client = UsigdClient::connect(&config.socket_path, config.identity, public_keys(family))
        .expect("client connects");
    Box::new(Hosted {
        client,
        _daemon: daemon,
        _directory: directory,
    })
}

#[test]
fn conformance_suite_passes() {
    conformance::assert_conforms(&|replica| hosted(1, replica), &|replica| hosted(2, replica));
}

#[test]
fn counter_continues_exactly_across_a_graceful_restart() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    let message = Digest([7; 32]);
    let mut last = 0;
    for _restart in 0..3 {
        let daemon = DaemonHandle::spawn(&config).expect("daemon starts");
        let mut client = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
            .expect("connects");
        assert_eq!(client.last_counter().expect("identity"), last);
        for _ in 0..10 {
            let ui = client.create_ui(&message).expect("create");
            assert_eq!(ui.counter, last + 1);
            last = ui.counter;
        }
        drop(client);
        drop(daemon);
    }
    assert_eq!(last, 30);
}

#[test]
fn reserving_ahead_skips_at_most_the_reserve_after_a_restart() {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut config = config(directory.path(), 1, 0, my_uid());
    config.reserve_ahead = 10;
    let message = Digest([7; 32]);
    let daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let mut client = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect("connects");
    for expected in 1..=13 {
        assert_eq!(
            client.create_ui(&message).expect("create").counter,
            expected
        );
    }
    drop(client);
    drop(daemon);
    // 13 was issued from the reservation 11..=20: the restart continues above 20.
    let _daemon = DaemonHandle::spawn(&config).expect("daemon restarts");
    let mut client = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect("connects");
    assert_eq!(client.last_counter().expect("identity"), 20);
    assert_eq!(client.create_ui(&message).expect("create").counter, 21);
    config.reserve_ahead = 0;
    assert!(DaemonHandle::spawn(&config).is_err());
}

/// Several connections asking at once (a compromised replica trying to get two UIs for one
/// value by racing) still get every counter value exactly once.
#[test]
fn concurrent_connections_never_share_a_counter_value() {
    const THREADS: u64 = 4;
    const CALLS: u64 = 150;
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    let _daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let socket = config.socket_path.clone();
            std::thread::spawn(move || {
                let mut client =
                    UsigdClient::connect(&socket, identity(0), public_keys(1)).expect("connects");
                (0..CALLS)
                    .map(|call| {
                        let message = Digest([(thread * CALLS + call) as u8; 32]);
                        client.create_ui(&message).expect("create").counter
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut counters: Vec<u64> = workers
        .into_iter()
        .flat_map(|worker| worker.join().expect("worker"))
        .collect();
    counters.sort_unstable();
    let expected: Vec<u64> = (1..=THREADS * CALLS).collect();
    assert_eq!(counters, expected);
}

#[test]
fn another_uid_is_refused() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid().wrapping_add(1));
    let _daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let error = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect_err("must be refused");
    assert!(
        matches!(&error, UsigError::Unavailable(text) if text.contains("PermissionDenied")),
        "{error}"
    );
}

#[test]
fn a_daemon_for_another_replica_is_refused_by_the_client() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 1, my_uid());
    let _daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let error = UsigdClient::connect(&config.socket_path, identity(0), public_keys(1))
        .expect_err("wrong replica");
    assert!(matches!(&error, UsigError::Unavailable(text) if text.contains("replica 1")));
}

fn raw_call(socket: &PathBuf, frame: &[u8]) -> Option<Response> {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.write_all(frame).expect("write");
    wire::read_frame(&mut stream)
        .ok()
        .map(|body| Response::decode(&body).expect("daemon answers well-formed frames"))
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn hostile_bytes_get_typed_errors_and_the_daemon_keeps_serving() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    let _daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let socket = config.socket_path.clone();
    let bad_request = |response: Option<Response>| {
        matches!(
            response,
            Some(Response::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        )
    };
    assert!(bad_request(raw_call(&socket, &framed(&[9, 1]))), "version");
    assert!(
        bad_request(raw_call(&socket, &framed(&[1, 1]))),
        "version 1 (UIs without an epoch)"
    );
    assert!(
        bad_request(raw_call(&socket, &framed(&[wire::VERSION, 0x55]))),
        "kind"
    );
    assert!(
        bad_request(raw_call(&socket, &framed(&[wire::VERSION, 2, 0]))),
        "short"
    );
    let mut start_with_payload = Request::StartEpoch.encode();
    start_with_payload.push(0);
    assert!(
        bad_request(raw_call(&socket, &framed(&start_with_payload))),
        "StartEpoch with trailing bytes must not start an epoch"
    );
    assert!(
        bad_request(raw_call(&socket, &[0x7f, 0xff, 0xff, 0xff])),
        "oversized frame"
    );
    // A create with trailing bytes must not burn a counter value.
    let mut trailing = Request::CreateUi {
        message: Digest([1; 32]),
    }
    .encode();
    trailing.push(0);
    assert!(bad_request(raw_call(&socket, &framed(&trailing))));
    // A peer that hangs up mid-frame costs nothing either.
    let mut half = UnixStream::connect(&socket).expect("connect");
    half.write_all(&[0, 0, 0, 40, 1, 2]).expect("write");
    drop(half);
    let mut client =
        UsigdClient::connect(&socket, config.identity, public_keys(1)).expect("still serving");
    assert_eq!(client.last_counter().expect("identity"), 0);
    let ui = client.create_ui(&Digest([2; 32])).expect("create");
    assert_eq!(ui.counter, 1);
    let mut remote =
        UsigdClient::connect(&socket, config.identity, public_keys(1)).expect("connect");
    assert_eq!(
        remote.verify_remotely(ReplicaId(0), &Digest([2; 32]), &ui),
        Ok(())
    );
    assert!(remote
        .verify_remotely(ReplicaId(0), &Digest([3; 32]), &ui)
        .is_err());
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    std::fs::set_permissions(&config.key_file, std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let error = DaemonHandle::spawn(&config).expect_err("too open");
    assert!(
        matches!(&error, DaemonError::KeyFile { problem, .. } if problem.contains("chmod 600")),
        "{error}"
    );
}

#[test]
fn a_key_that_does_not_match_the_public_key_is_refused() {
    let directory = tempfile::tempdir().expect("temp dir");
    let mut config = config(directory.path(), 1, 0, my_uid());
    config.public_keys = public_keys(2);
    assert!(matches!(
        DaemonHandle::spawn(&config),
        Err(DaemonError::Usig(UsigError::Unavailable(_)))
    ));
}

#[test]
fn a_started_epoch_survives_a_restart_and_the_client_follows_it() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    let message = Digest([7; 32]);
    let daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let mut client = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect("connects");
    let old = client.create_ui(&message).expect("create");
    assert_eq!((old.epoch, old.counter), (0, 1));
    assert_eq!(client.start_epoch(), Ok(1));
    assert_eq!(client.identity().epoch, 1);
    let new = client.create_ui(&message).expect("create");
    assert_eq!((new.epoch, new.counter), (1, 1));
    drop(client);
    drop(daemon);

    // Configured with the fresh-store epoch 0, the daemon keeps the epoch it reached.
    let daemon = DaemonHandle::spawn(&config).expect("daemon restarts");
    let mut client = UsigdClient::connect(&config.socket_path, identity(0), public_keys(1))
        .expect("a client asking for epoch 0 or later connects");
    assert_eq!(client.identity().epoch, 1);
    assert_eq!(client.last_counter().expect("identity"), 1);
    let next = client.create_ui(&message).expect("create");
    assert_eq!((next.epoch, next.counter), (1, 2));
    assert_eq!(client.verify_ui(ReplicaId(0), &message, &old), Ok(()));
    // A client that needs a later epoch than the daemon's is refused.
    let later = UsigIdentity {
        replica: ReplicaId(0),
        epoch: 2,
    };
    let error = UsigdClient::connect(&config.socket_path, later, public_keys(1))
        .expect_err("daemon is behind");
    assert!(matches!(&error, UsigError::Unavailable(text) if text.contains("epoch 1")));
    drop(client);
    drop(daemon);

    // A configured lowest epoch above the stored one moves the store up, counter at 0.
    let mut raised = config.clone();
    raised.identity.epoch = 5;
    let _daemon = DaemonHandle::spawn(&raised).expect("daemon restarts");
    let mut client =
        UsigdClient::connect(&raised.socket_path, identity(0), public_keys(1)).expect("connects");
    assert_eq!(client.identity().epoch, 5);
    let first = client.create_ui(&message).expect("create");
    assert_eq!((first.epoch, first.counter), (5, 1));
}

/// A client never issues in an epoch other than the one it reports: when another client moved
/// the daemon on, its next create_ui is refused until it starts an epoch itself.
#[test]
fn a_client_does_not_follow_an_epoch_change_behind_its_back() {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = config(directory.path(), 1, 0, my_uid());
    let _daemon = DaemonHandle::spawn(&config).expect("daemon starts");
    let message = Digest([8; 32]);
    let mut stale = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect("connects");
    let mut other = UsigdClient::connect(&config.socket_path, config.identity, public_keys(1))
        .expect("connects");
    stale.create_ui(&message).expect("create");
    assert_eq!(other.start_epoch(), Ok(1));
    let error = stale.create_ui(&message).expect_err("epoch moved");
    assert!(matches!(&error, UsigError::Unavailable(text) if text.contains("epoch 1")));
    assert_eq!(stale.identity().epoch, 0);
    // Starting an epoch moves strictly past the daemon's epoch, whatever the client knew.
    assert_eq!(stale.start_epoch(), Ok(2));
    let ui = stale.create_ui(&message).expect("create");
    assert_eq!((ui.epoch, ui.counter), (2, 1));
}
