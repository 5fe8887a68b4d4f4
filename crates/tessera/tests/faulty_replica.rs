//! A faulty replica that holds real keys: the test plays replica 2 of a 3-replica cluster with
//! replica 2's secret file, while replicas 0 and 1 run as real processes and serve clients.
//!
//! It speaks the real replica transport (`tessera_node::transport`: the dialer side through
//! `spawn_peer_writers`, the acceptor side through `accept_peers`), so its frames pass the
//! channel MAC and reach the protocol core, and it receives the real replicas' PREPAREs,
//! COMMITs and CHECKPOINTs. It sends garbage, bad MACs, undecodable but authentic frames,
//! replays of what it captured, COMMITs certified by replica 2's real USIG and replays of them,
//! forged COMMITs and PREPAREs, REQ-VIEW-CHANGE spam, absurd fetches and a boasting heartbeat — and must change nothing: every client result matches the model, the view stays 0,
//! and replicas 0 and 1 agree.

mod support;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{
    check_histories, connect, run_bounded, run_workload, seed, wait_for_agreement, ClusterDir,
    LogsOnPanic, ReplicaProcesses,
};
use tessera_client::KvClient;
use tessera_node::driver::{core_inbox, CoreEvent};
use tessera_node::transport::{
    accept_peers, spawn_peer_writers, PeerInboundContext, PeerMesh, PeerSender,
};
use tessera_node::{ClientKeys, NodeCounters, VerifiedCache};
use tessera_types::{
    commit_certified_digest, Commit, Fetch, Heartbeat, Prepare, ReplicaId, ReplicaMessage,
    ReqViewChange, SeqNum, StateRequest, Ui, View,
};
use tessera_usig::Usig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The replica the test impersonates.
const FAULTY: ReplicaId = ReplicaId(2);
/// The real replicas.
const CORRECT: [ReplicaId; 2] = [ReplicaId(0), ReplicaId(1)];
/// Captured messages kept for replay, per kind.
const CAPTURED_MAX: usize = 64;
/// Transport handshake constants (crates/tessera-node/src/transport.rs), for the raw attacks
/// that need a connection past the handshake but no valid key.
const PEER_MAGIC: &[u8; 8] = b"TSRPEER1";
const HANDSHAKE_ANSWER_BYTES: usize = 48;

#[derive(Default)]
struct Captured {
    prepares: VecDeque<ReplicaMessage>,
    commits: VecDeque<ReplicaMessage>,
    checkpoints: VecDeque<ReplicaMessage>,
    /// The latest PREPAREs, to forge messages about.
    headers: VecDeque<Prepare>,
}

impl Captured {
    fn drain(&mut self, receiver: &Receiver<CoreEvent>) {
        while let Ok(event) = receiver.try_recv() {
            let CoreEvent::Message { message, .. } = event else {
                continue;
            };
            match &message {
                ReplicaMessage::Prepare(prepare) => {
                    if self.headers.len() == CAPTURED_MAX {
                        self.headers.pop_front();
                    }
                    self.headers.push_back(prepare.clone());
                    push_bounded(&mut self.prepares, message);
                }
                ReplicaMessage::Commit(_) => push_bounded(&mut self.commits, message),
                ReplicaMessage::Checkpoint(_) => push_bounded(&mut self.checkpoints, message),
                _ => {}
            }
        }
    }
}

/// Keeps the latest [`CAPTURED_MAX`] messages, so replays include current ones.
fn push_bounded(list: &mut VecDeque<ReplicaMessage>, message: ReplicaMessage) {
    if list.len() == CAPTURED_MAX {
        list.pop_front();
    }
    list.push_back(message);
}

fn send_to_both(sender: &PeerSender, message: &ReplicaMessage) {
    let frame = Bytes::from(tessera_types::encode(message));
    for replica in CORRECT {
        sender.send(replica, frame.clone());
    }
}

fn random_bytes(rng: &mut StdRng, length: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; length];
    rng.fill_bytes(&mut bytes);
    bytes
}

fn bogus_ui(rng: &mut StdRng, counter: u64) -> Ui {
    Ui {
        epoch: 0,
        counter,
        certificate: random_bytes(rng, 32),
    }
}

/// Raw TCP attacks that need no key: random bytes instead of a handshake, and a handshake
/// followed by a frame with a wrong MAC or an oversized length.
async fn raw_attacks(rng: &mut StdRng, address: &str, target: ReplicaId) {
    let length = rng.gen_range(1..4_096);
    let garbage = random_bytes(rng, length);
    if let Ok(mut stream) = TcpStream::connect(address).await {
        let _ = stream.write_all(&garbage).await;
    }
    for oversized in [false, true] {
        let Ok(mut stream) = TcpStream::connect(address).await else {
            continue;
        };
        let mut hello = PEER_MAGIC.to_vec();
        hello.extend_from_slice(&FAULTY.0.to_be_bytes());
        hello.extend_from_slice(&target.0.to_be_bytes());
        hello.extend_from_slice(&random_bytes(rng, 32));
        let mut answer = [0u8; HANDSHAKE_ANSWER_BYTES];
        let handshake = async {
            stream.write_all(&hello).await?;
            stream.read_exact(&mut answer).await
        };
        if tokio::time::timeout(Duration::from_secs(2), handshake)
            .await
            .is_err()
        {
            continue;
        }
        let mut frame = Vec::new();
        if oversized {
            frame.extend_from_slice(&u32::MAX.to_be_bytes());
            frame.extend_from_slice(&random_bytes(rng, 1_024));
        } else {
            let payload = random_bytes(rng, 200);
            frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frame.extend_from_slice(&payload);
            frame.extend_from_slice(&random_bytes(rng, 16)); // not the MAC
        }
        let _ = stream.write_all(&frame).await;
    }
}

/// Garbage on a client port: random bytes, an oversized frame, and a frame that is not a
/// client message.
async fn client_port_attacks(rng: &mut StdRng, address: &str) {
    let length = rng.gen_range(1..2_048);
    let mut attacks = vec![random_bytes(rng, length)];
    let mut oversized = u32::MAX.to_be_bytes().to_vec();
    oversized.extend_from_slice(&random_bytes(rng, 64));
    attacks.push(oversized);
    let payload = random_bytes(rng, 100);
    let mut undecodable = (payload.len() as u32).to_be_bytes().to_vec();
    undecodable.extend_from_slice(&payload);
    attacks.push(undecodable);
    for bytes in attacks {
        if let Ok(mut stream) = TcpStream::connect(address).await {
            let _ = stream.write_all(&bytes).await;
        }
    }
}

/// COMMITs certified by the faulty replica's real USIG for the latest PREPARE: one is new
/// (legitimate participation), the others replay every valid COMMIT sent before, whose UI
/// counters the replicas have already consumed.
fn certified_replays(
    usig: &mut dyn Usig,
    sender: &PeerSender,
    captured: &Captured,
    sent: &mut Vec<ReplicaMessage>,
) {
    for message in sent.iter() {
        send_to_both(sender, message);
    }
    let Some(prepare) = captured.headers.back() else {
        return;
    };
    let certified = commit_certified_digest(FAULTY, &prepare.header);
    let ui = usig
        .create_ui(&certified)
        .expect("replica 2's USIG certifies");
    let commit = ReplicaMessage::Commit(Commit {
        replica: FAULTY,
        prepare: prepare.header.clone(),
        ui,
    });
    send_to_both(sender, &commit);
    if sent.len() < CAPTURED_MAX {
        sent.push(commit);
    }
}

/// Authentic frames carrying replays, forgeries and spam.
fn authentic_attacks(rng: &mut StdRng, sender: &PeerSender, captured: &Captured, round: u64) {
    // Replays of real messages (some are old by now, some may still be current).
    for list in [&captured.prepares, &captured.commits, &captured.checkpoints] {
        for message in list.iter().rev().take(4).chain(list.iter().take(2)) {
            send_to_both(sender, message);
        }
    }
    // COMMITs for real PREPAREs with UIs the faulty replica's USIG never made, also claiming
    // to come from a correct replica.
    for prepare in captured.headers.iter().rev().take(3) {
        let header = &prepare.header;
        for (replica, counter) in [
            (FAULTY, round + 1),
            (FAULTY, 1),
            (FAULTY, u64::MAX),
            (CORRECT[1], round + 1),
        ] {
            let commit = Commit {
                replica,
                prepare: header.clone(),
                ui: bogus_ui(rng, counter),
            };
            send_to_both(sender, &ReplicaMessage::Commit(commit));
        }
        // A PREPARE for view 2 (whose primary would be replica 2) with a forged UI, and one
        // for view 0 claiming the real primary's identity with a reordered batch.
        let mut forged = prepare.clone();
        forged.header.primary = FAULTY;
        forged.header.view = View(2);
        forged.header.ui = bogus_ui(rng, round + 1);
        send_to_both(sender, &ReplicaMessage::Prepare(forged));
        let mut reordered = prepare.clone();
        let mut batch = (*reordered.batch).clone();
        batch.reverse();
        reordered.batch = Arc::new(batch);
        reordered.header.seq = SeqNum(header.seq.0 + 1);
        send_to_both(sender, &ReplicaMessage::Prepare(reordered));
    }
    // REQ-VIEW-CHANGE spam: one faulty replica alone must never move the cluster.
    for to_view in [1, 2, 3, 1_000, 1 << 40, u64::MAX - 1, u64::MAX] {
        let request = ReqViewChange {
            replica: FAULTY,
            from_view: View(0),
            to_view: View(to_view),
        };
        send_to_both(sender, &ReplicaMessage::ReqViewChange(request));
    }
    // Retransmission and state requests for absurd ranges.
    for (stream, from_counter, to_counter) in [
        (0, 0, u64::MAX),
        (1, 1, 1 << 40),
        (0, u64::MAX, 0),
        (2, 0, u64::MAX),
        (77, 0, 10),
    ] {
        let fetch = Fetch {
            replica: FAULTY,
            stream: ReplicaId(stream),
            epoch: 0,
            from_counter,
            to_counter,
        };
        send_to_both(sender, &ReplicaMessage::Fetch(fetch));
    }
    send_to_both(
        sender,
        &ReplicaMessage::StateRequest(StateRequest {
            replica: FAULTY,
            min_seq: SeqNum(u64::MAX),
        }),
    );
    send_to_both(
        sender,
        &ReplicaMessage::FetchNewView {
            replica: FAULTY,
            view: View(u64::MAX),
        },
    );
    // A heartbeat that boasts progress nobody made.
    send_to_both(
        sender,
        &ReplicaMessage::Heartbeat(Heartbeat {
            replica: FAULTY,
            view: View(0),
            epoch: 0,
            head_counter: 1 << 40,
            last_executed: SeqNum(1 << 40),
            stable_checkpoint: SeqNum(1 << 40),
            processed: Vec::new(),
            epochs: Vec::new(),
        }),
    );
}

#[test]
fn garbage_and_replays_from_a_faulty_replica_change_nothing() {
    const SESSIONS: usize = 6;
    const OPERATIONS_PER_SESSION: usize = 150;
    const ROUNDS_MIN: u64 = 10;
    let dir = ClusterDir::create(21_400, |protocol| {
        protocol.checkpoint_interval = 8;
        protocol.log_size = 16;
        protocol.window = 8;
        // Long enough that a slow, busy test machine never makes a correct replica suspect the
        // primary: the view may change only if the faulty replica could force it.
        protocol.request_timeout_ms = 10_000;
    });
    let _logs = LogsOnPanic(&dir);
    let seed = seed();
    let secrets = dir.replica_secrets(FAULTY.0);
    let mesh = PeerMesh {
        me: FAULTY,
        addresses: dir
            .config
            .replicas
            .iter()
            .map(|replica| replica.replica_address.clone())
            .collect(),
        pairwise_keys: Arc::new(
            tessera_node::keys::peer_keys(&secrets).expect("replica 2's pairwise keys"),
        ),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    let mut tasks = JoinSet::new();
    let counters = Arc::new(NodeCounters::default());
    // Listen as replica 2 before the real replicas start, so their first dial succeeds.
    let (sender, receiver) = runtime.block_on(async {
        let listener = TcpListener::bind(dir.replica_address(FAULTY.0))
            .await
            .expect("listen on replica 2's address");
        let (inbox, receiver) = core_inbox(1 << 16, counters.clone());
        let context = PeerInboundContext {
            mesh: mesh.clone(),
            inbox,
            counters: counters.clone(),
            clients: Arc::new(
                ClientKeys::load(&dir.config, &secrets).expect("replica 2's client keys"),
            ),
            cache: Arc::new(VerifiedCache::new(1_024)),
        };
        tasks.spawn(accept_peers(listener, context));
        let sender = spawn_peer_writers(&mesh, 4_096, counters.clone(), &mut tasks);
        (sender, receiver)
    });
    let mut replicas = ReplicaProcesses::start(&dir, &[0, 1]);

    run_bounded(Duration::from_secs(50), async {
        let clients = [connect(&dir, 0).await, connect(&dir, 1).await];
        let progress = Arc::new(AtomicUsize::new(0));
        let load = tokio::spawn({
            let clients = clients.clone();
            async move { run_workload(&clients, SESSIONS, OPERATIONS_PER_SESSION, seed, progress).await }
        });

        let mut rng = StdRng::seed_from_u64(seed);
        let mut captured = Captured::default();
        let mut usig =
            tessera_node::build_usig(&dir.config, &secrets, FAULTY).expect("replica 2's USIG");
        let mut own_commits = Vec::new();
        let mut round = 0;
        let started = Instant::now();
        while round < ROUNDS_MIN || !load.is_finished() {
            captured.drain(&receiver);
            certified_replays(&mut *usig, &sender, &captured, &mut own_commits);
            authentic_attacks(&mut rng, &sender, &captured, round);
            for replica in CORRECT {
                raw_attacks(&mut rng, &dir.replica_address(replica.0), replica).await;
            }
            client_port_attacks(&mut rng, &dir.client_address(CORRECT[0].0)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Last in the round, because it makes both replicas close the channel (the writers
            // reconnect): a frame with a valid MAC whose payload is not a message.
            let undecodable = Bytes::from(random_bytes(&mut rng, 300));
            for replica in CORRECT {
                sender.send(replica, undecodable.clone());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            round += 1;
        }
        let histories = match load.await {
            Ok(histories) => histories,
            Err(error) => panic!("the load failed: {error}"),
        };
        eprintln!(
            "{round} attack rounds in {:?}; captured {} prepares, {} commits, {} checkpoints",
            started.elapsed(),
            captured.prepares.len(),
            captured.commits.len(),
            captured.checkpoints.len()
        );
        assert!(
            !captured.prepares.is_empty()
                && !captured.commits.is_empty()
                && !captured.checkpoints.is_empty(),
            "the faulty replica received real protocol messages to replay"
        );

        let mut reader = KvClient::new(clients[0].session());
        let checked = check_histories(&histories, &mut reader).await;
        assert!(checked >= SESSIONS * OPERATIONS_PER_SESSION);
        let statuses = wait_for_agreement(&dir, &[0, 1], Duration::from_secs(15)).await;
        for status in &statuses {
            assert_eq!(status.view, View(0), "the view stayed 0: {status:?}");
        }
    });
    assert!(replicas.exited().is_empty(), "a correct replica exited");
    runtime.block_on(async { tasks.abort_all() });
    runtime.shutdown_timeout(Duration::from_secs(1));
}
