//! Byzantine replicas and clients against correct MinBFT replicas. A faulty replica is played by
//! the test: the real replica is crashed (silenced) and the test injects messages on its
//! channels, certified with its USIG key where the attack needs valid certificates. With a USIG
//! the faulty replica can never give two messages the same counter, so that is the one thing
//! these scripts never do.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use common::{
    broadcast_from, client_key, config, forge_prepare, get, incr, set, sign_request, usig_of,
    value, Cluster, Fate, TestAuthenticator,
};
use tessera_core::Replica;
use tessera_crypto::Digest;
use tessera_kv::{KvStore, Response};
use tessera_types::{
    checkpoint_certified_digest, commit_certified_digest, Checkpoint, ClientId, Commit, Fetch,
    Heartbeat, PartitionReply, Prepare, ReplicaId, ReplicaMessage, ReqViewChange, SeqNum,
    StateRequest, TransferStrategy, Ui, View, ViewChange,
};
use tessera_usig::Usig;

fn client(index: u32) -> ClientId {
    ClientId::new(0, index)
}

/// Replica 2 is Byzantine and sends every kind of garbage it can; replicas 0 and 1 keep
/// ordering requests with the right results and name each rejection.
#[test]
fn garbage_from_a_byzantine_replica_neither_stops_progress_nor_changes_results() {
    let mut cluster = Cluster::new(config(3, 1));
    let captured: Rc<RefCell<Vec<ReplicaMessage>>> = Rc::default();
    let sink = captured.clone();
    cluster.filter = Some(Box::new(move |_, _, message| {
        if matches!(
            message,
            ReplicaMessage::Prepare(_) | ReplicaMessage::Commit(_)
        ) {
            sink.borrow_mut().push(message.clone());
        }
        Fate::Deliver
    }));
    cluster.crash(2);
    for number in 1..=2 {
        assert_eq!(
            cluster.invoke(client(1), number, &incr("counter"), 5_000),
            Some(Response::Integer(number as i64))
        );
    }
    cluster.filter = None;
    let old: Vec<ReplicaMessage> = captured.borrow().clone();
    let real_header = old
        .iter()
        .find_map(|message| match message {
            ReplicaMessage::Prepare(prepare) => Some(prepare.header.clone()),
            _ => None,
        })
        .expect("a PREPARE was captured");
    let mut usig = usig_of(2, 3);

    // A COMMIT with a garbage UI certificate, and one with a counter far ahead.
    let garbage_commit = |counter: u64| {
        ReplicaMessage::Commit(Commit {
            replica: ReplicaId(2),
            prepare: real_header.clone(),
            ui: Ui {
                epoch: 0,
                counter,
                certificate: vec![0xAB; 32],
            },
        })
    };
    broadcast_from(&mut cluster, 2, &garbage_commit(1));
    broadcast_from(&mut cluster, 2, &garbage_commit(1_000_000));
    // Counter 1: a validly certified COMMIT for a PREPARE the primary never certified.
    let mut fake_header = real_header.clone();
    fake_header.batch_digest = Digest([9; 32]);
    let ui = usig
        .create_ui(&commit_certified_digest(ReplicaId(2), &fake_header))
        .unwrap();
    broadcast_from(
        &mut cluster,
        2,
        &ReplicaMessage::Commit(Commit {
            replica: ReplicaId(2),
            prepare: fake_header,
            ui,
        }),
    );
    // Counter 2: a CHECKPOINT for seq 8 with a made-up state digest.
    let bogus_state = Digest([7; 32]);
    let ui = usig
        .create_ui(&checkpoint_certified_digest(
            ReplicaId(2),
            SeqNum(8),
            &bogus_state,
            View(0),
            &[],
        ))
        .unwrap();
    broadcast_from(
        &mut cluster,
        2,
        &ReplicaMessage::Checkpoint(Checkpoint {
            replica: ReplicaId(2),
            seq: SeqNum(8),
            state_digest: bogus_state,
            view: View(0),
            epochs: Vec::new(),
            ui,
        }),
    );
    // Counter 3: a VIEW-CHANGE for view 5 with its log left out.
    let checkpoint = cluster.replicas[0].stable_checkpoint().clone();
    let payload = tessera_types::view_change_payload_digest(&checkpoint, &[]);
    let ui = usig
        .create_ui(&tessera_types::view_change_certified_digest(
            ReplicaId(2),
            View(5),
            &payload,
        ))
        .unwrap();
    broadcast_from(
        &mut cluster,
        2,
        &ReplicaMessage::ViewChange(Arc::new(ViewChange {
            replica: ReplicaId(2),
            to_view: View(5),
            checkpoint,
            log: Vec::new(),
            new_views: Vec::new(),
            ui,
        })),
    );
    // Replays of everything captured, on the original channels and on replica 2's.
    for message in &old {
        let original = match message {
            ReplicaMessage::Prepare(prepare) => prepare.header.primary.0,
            ReplicaMessage::Commit(commit) => commit.replica.0,
            _ => unreachable!(),
        };
        broadcast_from(&mut cluster, original, message);
        broadcast_from(&mut cluster, 2, message);
    }
    // REQ-VIEW-CHANGE spam, one claiming to come from replica 1.
    for to_view in (1..50).chain([u64::MAX - 1]) {
        let request = ReqViewChange {
            replica: ReplicaId(2),
            from_view: View(0),
            to_view: View(to_view),
        };
        broadcast_from(&mut cluster, 2, &ReplicaMessage::ReqViewChange(request));
    }
    let spoofed = ReqViewChange {
        replica: ReplicaId(1),
        from_view: View(0),
        to_view: View(1),
    };
    cluster.inject(2, 0, ReplicaMessage::ReqViewChange(spoofed));
    // Fetches for absurd ranges, a bragging heartbeat, and mislabelled requests.
    let fetches = [
        (0, 0, u64::MAX),
        (1, u64::MAX - 1, u64::MAX),
        (0, 10, 5),
        (99, 1, 2),
    ];
    for (stream, from_counter, to_counter) in fetches {
        let fetch = Fetch {
            replica: ReplicaId(2),
            stream: ReplicaId(stream),
            epoch: 0,
            from_counter,
            to_counter,
        };
        broadcast_from(&mut cluster, 2, &ReplicaMessage::Fetch(fetch));
    }
    let heartbeat = Heartbeat {
        replica: ReplicaId(2),
        view: View(0),
        epoch: 0,
        head_counter: u64::MAX,
        last_executed: SeqNum(u64::MAX),
        stable_checkpoint: SeqNum(u64::MAX),
        processed: Vec::new(),
        epochs: Vec::new(),
    };
    broadcast_from(&mut cluster, 2, &ReplicaMessage::Heartbeat(heartbeat));
    let state_request = StateRequest {
        replica: ReplicaId(0),
        min_seq: SeqNum(0),
    };
    cluster.inject(2, 1, ReplicaMessage::StateRequest(state_request));
    cluster.inject(
        2,
        1,
        ReplicaMessage::FetchNewView {
            replica: ReplicaId(0),
            view: View(1),
        },
    );

    for number in 3..=12 {
        assert_eq!(
            cluster.invoke(client(1), number, &incr("counter"), 5_000),
            Some(Response::Integer(number as i64)),
            "request {number} despite the Byzantine replica"
        );
    }
    cluster.run_for(1_000);
    for replica in cluster.live() {
        assert_eq!(replica.view(), View(0), "no view change was forced");
        assert!(!replica.is_view_changing());
        assert!(
            replica.stable_checkpoint().seq >= SeqNum(8),
            "the bogus CHECKPOINT did not block the real one: {:?}",
            replica.status()
        );
    }
    cluster.assert_all_caught_up();
    for index in 0..2 {
        let reasons = cluster.replicas[index as usize].rejections().clone();
        for reason in [
            "invalid-ui",
            "counter-too-far-ahead",
            "commit-invalid-prepare-ui",
            "view-change-log-missing",
            "fetch-malformed",
        ] {
            assert!(
                cluster.rejections(index, reason) >= 1,
                "replica {index} should reject with `{reason}`: {reasons:?}"
            );
        }
    }
    assert_eq!(cluster.rejections(0, "req-view-change-wrong-channel"), 1);
    assert_eq!(cluster.rejections(1, "state-request-wrong-channel"), 1);
    assert_eq!(cluster.rejections(1, "fetch-new-view-wrong-channel"), 1);
    assert_eq!(
        cluster.rejections(0, "fetch-malformed"),
        2,
        "an inverted range and an unknown stream are malformed; a huge range is only capped"
    );
}

/// The primary (played by the test) sends batch A for seq 1 to backup 1 and batch B for seq 1
/// to backup 2. The USIG forces different counters, so backup 2 fetches the primary's earlier
/// message (A), accepts it, and refuses B as out of sequence. Both execute A; the primary is
/// replaced once requests stall.
#[test]
fn equivocating_primary_cannot_make_backups_execute_different_batches() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let mut usig = usig_of(0, 3);
    let batch_a = vec![sign_request(client(1), 1, set("x", "A").encode())];
    let batch_b = vec![sign_request(client(2), 1, set("x", "B").encode())];
    let prepare_a = forge_prepare(&mut usig, View(0), SeqNum(1), batch_a);
    let prepare_b = forge_prepare(&mut usig, View(0), SeqNum(1), batch_b);
    cluster.inject(0, 2, ReplicaMessage::Prepare(prepare_b));
    cluster.inject(0, 1, ReplicaMessage::Prepare(prepare_a));
    cluster.run_for(500);
    for index in 1..3 {
        assert_eq!(cluster.replicas[index].last_executed(), SeqNum(1));
    }
    assert_eq!(cluster.rejections(2, "prepare-out-of-sequence"), 1);
    cluster.assert_histories_agree();
    assert_eq!(
        cluster.invoke(client(3), 1, &get("x"), 20_000),
        value("A"),
        "batch A is the one executed at seq 1 everywhere"
    );
    // Client 2's request was never ordered; it completes in the new view.
    assert_eq!(
        cluster.invoke(client(2), 1, &set("x", "B"), 20_000),
        Some(Response::Ok)
    );
    assert_eq!(cluster.invoke(client(3), 2, &get("x"), 20_000), value("B"));
    for replica in cluster.live() {
        assert!(replica.view() >= View(1));
    }
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
}

/// A primary that orders a request whose client signature is forged is refused by every correct
/// backup, which together (f+1) replace it; the forged request never executes.
#[test]
fn forged_client_request_in_a_prepare_is_refused_and_replaces_the_primary() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let mut usig = usig_of(0, 3);
    let mut forged = sign_request(client(1), 1, set("stolen", "yes").encode());
    forged.signature[0] ^= 0xFF;
    let prepare = forge_prepare(&mut usig, View(0), SeqNum(1), vec![forged]);
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(prepare));
    cluster.run_for(2_000);
    for index in 1..3 {
        assert_eq!(cluster.rejections(index, "prepare-forged-request"), 1);
        assert_eq!(cluster.replicas[index as usize].last_executed(), SeqNum(0));
    }
    for replica in cluster.live() {
        assert_eq!(replica.view(), View(1));
        assert!(!replica.is_view_changing());
    }
    assert_eq!(
        cluster.invoke(client(2), 1, &get("stolen"), 10_000),
        Some(Response::Value(None))
    );
    cluster.assert_all_caught_up();
}

/// A request sent again (after execution, or twice before it) executes once; the client gets
/// the cached reply, and an older request number is refused as stale.
#[test]
fn duplicate_client_requests_execute_once() {
    let mut cluster = Cluster::new(config(3, 1));
    assert_eq!(
        cluster.invoke(client(1), 1, &incr("k"), 5_000),
        Some(Response::Integer(1))
    );
    let executed = |cluster: &Cluster| -> Vec<u64> {
        cluster
            .live()
            .map(|replica| replica.status().requests_executed)
            .collect()
    };
    let before = executed(&cluster);
    // The same request again, to everyone: cached replies only.
    assert_eq!(
        cluster.invoke(client(1), 1, &incr("k"), 5_000),
        Some(Response::Integer(1))
    );
    assert_eq!(executed(&cluster), before);
    // Request 2 sent three times to the primary and once to each backup before it executes.
    let second = sign_request(client(1), 2, incr("k").encode());
    cluster.submit(&second, &[0, 0, 0, 1, 2]);
    cluster.run_for(200);
    assert_eq!(
        cluster.invoke(client(1), 2, &incr("k"), 5_000),
        Some(Response::Integer(2))
    );
    // The old request 1 is now stale.
    let stale = sign_request(client(1), 1, incr("k").encode());
    cluster.submit(&stale, &[0, 1, 2]);
    cluster.run_for(200);
    for index in 0..3 {
        assert_eq!(cluster.rejections(index, "request-stale"), 1);
    }
    assert_eq!(cluster.invoke(client(2), 1, &get("k"), 5_000), value("2"));
    cluster.assert_all_caught_up();
}

/// A faulty primary (played by the test) puts the same request twice in one batch and again in
/// the next batch: it executes once.
#[test]
fn request_ordered_twice_by_a_faulty_primary_executes_once() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let mut usig = usig_of(0, 3);
    let request = sign_request(client(1), 1, incr("k").encode());
    let first = forge_prepare(
        &mut usig,
        View(0),
        SeqNum(1),
        vec![request.clone(), request.clone()],
    );
    let second = forge_prepare(&mut usig, View(0), SeqNum(2), vec![request]);
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(first));
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(second));
    cluster.run_for(100);
    for index in 1..3 {
        assert_eq!(cluster.replicas[index].last_executed(), SeqNum(2));
        assert_eq!(cluster.replicas[index].status().requests_executed, 1);
    }
    assert_eq!(cluster.invoke(client(2), 1, &get("k"), 20_000), value("1"));
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
}

#[test]
fn replica_refuses_fewer_than_two_f_plus_one_replicas() {
    let bad = config(4, 2);
    let error = Replica::new(
        ReplicaId(0),
        bad,
        Box::new(usig_of(0, 4)),
        Box::new(TestAuthenticator {
            key: client_key().verifying_key(),
        }),
        KvStore::default(),
    )
    .err()
    .expect("n = 4 cannot tolerate f = 2");
    assert_eq!(error.field, "n");
    let text = error.to_string();
    assert!(text.contains("is 4"), "names n: {text}");
    assert!(text.contains("2f+1 = 5"), "names the bound: {text}");
    // The smallest valid size is accepted.
    assert!(Replica::new(
        ReplicaId(0),
        config(5, 2),
        Box::new(usig_of(0, 5)),
        Box::new(TestAuthenticator {
            key: client_key().verifying_key(),
        }),
        KvStore::default(),
    )
    .is_ok());
}

/// Regression (found by the real-process faulty-replica test): one replica's heartbeat claiming a
/// huge stable checkpoint made correct replicas ask for a state nobody has, forever. A height is
/// believed only when f+1 replicas claim it.
#[test]
fn one_replica_claiming_a_far_checkpoint_does_not_trigger_state_transfer() {
    let mut cluster = Cluster::new(config(3, 1));
    let state_requests = Rc::new(RefCell::new(0u32));
    let counter = state_requests.clone();
    cluster.filter = Some(Box::new(move |_, _, message| {
        if matches!(message, ReplicaMessage::StateRequest(_)) {
            *counter.borrow_mut() += 1;
        }
        Fate::Deliver
    }));
    let boast = ReplicaMessage::Heartbeat(tessera_types::Heartbeat {
        replica: ReplicaId(2),
        view: View(0),
        epoch: 0,
        head_counter: 0,
        last_executed: SeqNum(1 << 40),
        stable_checkpoint: SeqNum(1 << 40),
        processed: Vec::new(),
        epochs: Vec::new(),
    });
    for _ in 0..20 {
        cluster.inject(2, 0, boast.clone());
        cluster.inject(2, 1, boast.clone());
        cluster.tick(100);
    }
    assert_eq!(
        cluster.invoke(client(1), 1, &set("k", "v"), 5_000),
        Some(Response::Ok)
    );
    assert_eq!(
        *state_requests.borrow(),
        0,
        "no state transfer for a checkpoint only one replica claims"
    );
}

/// A VIEW-CHANGE quoting an entry far beyond the sender's high water mark is refused: otherwise
/// the new primary's plan would cover every sequence number up to it (memory exhaustion).
#[test]
fn view_change_quoting_a_sequence_number_beyond_the_high_water_mark_is_refused() {
    let mut cluster = Cluster::new(config(3, 1));
    let mut primary_usig = usig_of(0, 3);
    let mut sender_usig = usig_of(2, 3);
    let far = forge_prepare(&mut primary_usig, View(0), SeqNum(1 << 40), Vec::new());
    let commit_ui = sender_usig
        .create_ui(&commit_certified_digest(ReplicaId(2), &far.header))
        .unwrap();
    let commit = Commit {
        replica: ReplicaId(2),
        prepare: far.header.clone(),
        ui: commit_ui,
    };
    // The COMMIT comes first in replica 2's stream (the VIEW-CHANGE would wait for it).
    cluster.inject(2, 1, ReplicaMessage::Commit(commit.clone()));
    let checkpoint = cluster.replicas[1].stable_checkpoint().clone();
    let log = vec![tessera_types::LogEntry::Commit {
        commit,
        batch: far.batch.clone(),
    }];
    let payload = tessera_types::view_change_payload_digest(&checkpoint, &log);
    let ui = sender_usig
        .create_ui(&tessera_types::view_change_certified_digest(
            ReplicaId(2),
            View(1),
            &payload,
        ))
        .unwrap();
    let view_change = ReplicaMessage::ViewChange(Arc::new(ViewChange {
        replica: ReplicaId(2),
        to_view: View(1),
        checkpoint,
        log,
        new_views: Vec::new(),
        ui,
    }));
    cluster.inject(2, 1, view_change);
    assert_eq!(
        cluster.rejections(1, "view-change-entry-beyond-high-water-mark"),
        1
    );
}

/// Regression (found in review): a Byzantine replica helps a batch get accepted with its COMMIT,
/// then certifies a stale CHECKPOINT and anchors its VIEW-CHANGE log there, leaving the COMMIT
/// out. Anchors must be in-order CHECKPOINTs as seen in the sender's stream, so the VIEW-CHANGE
/// is refused and the accepted batch cannot be replaced in the next view.
#[test]
fn view_change_anchored_at_a_stale_checkpoint_cannot_hide_a_commit() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let mut cluster = Cluster::new(config(3, 1));
    let captured: Rc<RefCell<Option<Prepare>>> = Rc::default();
    let sink = captured.clone();
    // Replica 1 never hears from replica 0; replica 2 is played by the test.
    cluster.filter = Some(Box::new(move |from, to, message| {
        if from.0 == 0 && to.0 == 1 {
            if let ReplicaMessage::Prepare(prepare) = message {
                *sink.borrow_mut() = Some(prepare.clone());
            }
            return Fate::Drop;
        }
        Fate::Deliver
    }));
    cluster.crash(2);
    let genesis = cluster.replicas[1].stable_checkpoint().clone();
    let mut byzantine = usig_of(2, 3);
    let request = sign_request(client(1), 1, set("x", "a").encode());
    cluster.submit(&request, &[0]);
    cluster.deliver_all(1000);
    let prepare = captured.borrow().clone().expect("the primary's PREPARE");
    // Counter 1: a COMMIT that, with the primary's PREPARE, makes a quorum at replica 0.
    let commit_ui = byzantine
        .create_ui(&commit_certified_digest(ReplicaId(2), &prepare.header))
        .unwrap();
    let commit = ReplicaMessage::Commit(Commit {
        replica: ReplicaId(2),
        prepare: prepare.header.clone(),
        ui: commit_ui,
    });
    cluster.inject(2, 0, commit.clone());
    cluster.deliver_all(1000);
    assert_eq!(
        cluster.replicas[0].last_executed(),
        SeqNum(1),
        "replica 0 executed s1"
    );
    // Counter 2: a stale CHECKPOINT(0); counter 3: a VIEW-CHANGE anchored at it.
    let stale_ui = byzantine
        .create_ui(&checkpoint_certified_digest(
            ReplicaId(2),
            SeqNum(0),
            &genesis.state_digest,
            View(0),
            &[],
        ))
        .unwrap();
    let stale = Checkpoint {
        replica: ReplicaId(2),
        seq: SeqNum(0),
        state_digest: genesis.state_digest,
        view: View(0),
        epochs: Vec::new(),
        ui: stale_ui,
    };
    let log = vec![tessera_types::LogEntry::Checkpoint(stale.clone())];
    let payload = tessera_types::view_change_payload_digest(&genesis, &log);
    let view_change_ui = byzantine
        .create_ui(&tessera_types::view_change_certified_digest(
            ReplicaId(2),
            View(1),
            &payload,
        ))
        .unwrap();
    let view_change = ViewChange {
        replica: ReplicaId(2),
        to_view: View(1),
        checkpoint: genesis.clone(),
        log,
        new_views: Vec::new(),
        ui: view_change_ui,
    };
    cluster.inject(2, 1, commit);
    cluster.inject(2, 1, ReplicaMessage::Checkpoint(stale));
    cluster.inject(2, 1, ReplicaMessage::ViewChange(Arc::new(view_change)));
    assert_eq!(cluster.rejections(1, "view-change-anchor-out-of-order"), 1);
    // Replica 1 suspects the primary, but without a valid second VIEW-CHANGE it cannot start
    // view 1 on its own, so nothing can overwrite what replica 0 executed.
    cluster.submit(&request, &[1]);
    cluster.run_for(3000);
    assert!(
        cluster.replicas[1].view() == View(0) || cluster.replicas[1].is_view_changing(),
        "replica 1 must not start a view built on the hidden commit: {:?}",
        cluster.replicas[1].status()
    );
    cluster.assert_histories_agree();
}

/// Regression (found in review): a primary that never orders one client's request while others
/// progress must still be replaced; the request timer runs per request, not per progress.
#[test]
fn a_primary_censoring_one_client_is_replaced_even_while_others_progress() {
    let mut cluster = Cluster::new(config(3, 1));
    let victim = ClientId::new(0, 9);
    cluster.filter = Some(Box::new(move |_, to, message| match message {
        ReplicaMessage::Request(request) if to.0 == 0 && request.client == victim => Fate::Drop,
        _ => Fate::Deliver,
    }));
    let censored = sign_request(victim, 1, incr("victim").encode());
    for number in 1..=20 {
        cluster.submit(&censored, &[1, 2]);
        assert!(cluster
            .invoke(client(1), number, &incr("k"), 5_000)
            .is_some());
        cluster.run_for(100);
    }
    assert!(
        cluster.live().all(|replica| replica.view() >= View(1)),
        "the censoring primary was replaced"
    );
}

/// Regression (found in review): a CHECKPOINT near u64::MAX must not make later arithmetic on
/// the sender's limits overflow.
#[test]
fn a_checkpoint_near_the_end_of_the_sequence_space_does_not_overflow() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(2);
    let mut byzantine = usig_of(2, 3);
    let seq = SeqNum(u64::MAX / 8 * 8);
    let digest = cluster.replicas[0].state_digest();
    let ui = byzantine
        .create_ui(&checkpoint_certified_digest(
            ReplicaId(2),
            seq,
            &digest,
            View(0),
            &[],
        ))
        .unwrap();
    cluster.inject(
        2,
        0,
        ReplicaMessage::Checkpoint(Checkpoint {
            replica: ReplicaId(2),
            seq,
            state_digest: digest,
            view: View(0),
            epochs: Vec::new(),
            ui,
        }),
    );
    let mut primary = usig_of(0, 3);
    let prepare = forge_prepare(&mut primary, View(0), SeqNum(1), Vec::new());
    let ui = byzantine
        .create_ui(&commit_certified_digest(ReplicaId(2), &prepare.header))
        .unwrap();
    cluster.inject(
        2,
        0,
        ReplicaMessage::Commit(Commit {
            replica: ReplicaId(2),
            prepare: prepare.header,
            ui,
        }),
    );
    assert_eq!(
        cluster.invoke(client(1), 1, &set("a", "b"), 5_000),
        Some(Response::Ok)
    );
}

/// Replica 2 hears only heartbeats and state-transfer messages (`twist` decides first about
/// those sent to it by replica `from`) while the others execute 40 requests and move on by
/// several checkpoints; returns the cluster and the stable checkpoint replica 2 must reach.
fn replica_2_fetching_state(
    twist: impl Fn(u32, &ReplicaMessage) -> Option<Fate> + 'static,
) -> (Cluster, SeqNum) {
    last_replica_fetching_state(config(3, 1), twist)
}

/// Cuts replica `lagging` off from everything but heartbeats and state transfer (`twist`
/// decides first about messages sent to it by replica `from`).
fn transfer_only(
    lagging: u32,
    twist: impl Fn(u32, &ReplicaMessage) -> Option<Fate> + 'static,
) -> common::Filter {
    Box::new(move |from, to, message| {
        if from.0 != lagging && to.0 != lagging {
            return Fate::Deliver;
        }
        if to.0 == lagging {
            if let Some(fate) = twist(from.0, message) {
                return fate;
            }
        }
        match message {
            ReplicaMessage::Heartbeat(_)
            | ReplicaMessage::StateRequest(_)
            | ReplicaMessage::StateSummary(_)
            | ReplicaMessage::PartitionRequest(_)
            | ReplicaMessage::PartitionReply(_) => Fate::Deliver,
            _ => Fate::Drop,
        }
    })
}

/// Like [`replica_2_fetching_state`], for any cluster: the last replica is the lagging one.
fn last_replica_fetching_state(
    protocol: tessera_types::ProtocolConfig,
    twist: impl Fn(u32, &ReplicaMessage) -> Option<Fate> + 'static,
) -> (Cluster, SeqNum) {
    let lagging = protocol.n - 1;
    let mut cluster = Cluster::new(protocol);
    cluster.filter = Some(transfer_only(lagging, twist));
    for number in 1..=40u64 {
        let key = format!("key{}", number % 13);
        assert!(cluster
            .invoke(ClientId::new(0, 1), number, &set(&key, "v"), 5_000)
            .is_some());
    }
    let target = cluster.replicas[1].stable_checkpoint().seq;
    assert!(target.0 >= 32, "the others moved on: {target:?}");
    (cluster, target)
}

/// Replica 2 reached `target` with the state the correct replica 1 holds.
fn assert_replica_2_caught_up(cluster: &Cluster, target: SeqNum) {
    assert_caught_up(cluster, 2, target);
}

/// Replica `lagging` reached `target` with the state the correct replica 1 holds.
fn assert_caught_up(cluster: &Cluster, lagging: usize, target: SeqNum) {
    let lagging = &cluster.replicas[lagging];
    assert!(lagging.last_executed() >= target, "{:?}", lagging.status());
    assert_eq!(
        lagging.status().stable_state_digest,
        cluster.replicas[1].status().stable_state_digest
    );
}

/// A faulty replica serving state holds its partitions with chunks that carry nothing but
/// always promise more (found in review: each such chunk used to restart the source's timer, so
/// the transfer never finished). An empty chunk that is not the last now marks its sender
/// faulty; its partitions go to the correct replica, and the lagging replica ends with the
/// agreed state.
#[test]
fn a_source_stalling_a_state_transfer_with_empty_chunks_is_routed_around() {
    use tessera_types::ChunkBytes;

    let (mut cluster, target) = replica_2_fetching_state(|from, message| match (from, message) {
        (0, ReplicaMessage::PartitionReply(reply)) => {
            let mut reply = reply.clone();
            if reply.chunk.is_some() {
                reply.chunk = Some(ChunkBytes {
                    bytes: tessera_types::encode(&Vec::<(Vec<u8>, Vec<u8>)>::new()),
                    next: Some(b"more soon".to_vec()),
                });
            }
            Some(Fate::Replace(ReplicaMessage::PartitionReply(reply)))
        }
        _ => None,
    });
    cluster.run_for(5_000);
    assert!(cluster.rejections(2, "partition-chunk-invalid") >= 1);
    assert_replica_2_caught_up(&cluster, target);
}

/// The only summary a lagging replica gets is a faulty replica's (correct, so it passes), and
/// that replica then never serves a chunk. Found in review: sources used to be only the
/// replicas that sent a summary, so the transfer waited on the faulty one for good. Every other
/// replica is a source now; the faulty one's partitions pass their deadline and go to the
/// correct replica, which never sent a summary at all.
#[test]
fn a_transfer_completes_from_a_replica_that_sent_no_summary() {
    let (mut cluster, target) = replica_2_fetching_state(|from, message| match (from, message) {
        (0, ReplicaMessage::PartitionReply(_)) | (1, ReplicaMessage::StateSummary(_)) => {
            Some(Fate::Drop)
        }
        _ => None,
    });
    cluster.run_for(10_000);
    assert_replica_2_caught_up(&cluster, target);
}

fn with_strategy(n: u32, f: u32, strategy: TransferStrategy) -> tessera_types::ProtocolConfig {
    tessera_types::ProtocolConfig {
        state_transfer: strategy,
        ..config(n, f)
    }
}

/// A copy of a partition whose first value is changed: well-formed, so only the partition's
/// digest gives it away.
fn tampered(reply: &PartitionReply) -> PartitionReply {
    let mut reply = reply.clone();
    if let Some(chunk) = &mut reply.chunk {
        let limit = tessera_types::limits::MAX_FRAME_BYTES;
        let mut entries: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> =
            tessera_types::decode(&chunk.bytes, limit).unwrap();
        if let Some((_, value, _)) = entries.first_mut() {
            value.push(b'!');
        }
        chunk.bytes = tessera_types::encode(&entries);
    }
    reply
}

/// (partition, source) of every copy a replica asked for, in order.
type CopyLog = Rc<RefCell<Vec<(u32, u32)>>>;

/// Records (partition, source) of every copy (a PARTITION-REQUEST for a partition's first chunk,
/// not a digest) that replica `lagging` asks for, in order, keeping the cluster's filter.
fn record_copy_requests(cluster: &mut Cluster, lagging: u32) -> CopyLog {
    let asked: CopyLog = Rc::default();
    let log = asked.clone();
    let mut previous = cluster.filter.take().expect("a filter is set");
    cluster.filter = Some(Box::new(move |from, to, message| {
        if let ReplicaMessage::PartitionRequest(request) = message {
            if from.0 == lagging && request.cursor.is_none() && !request.digest_only {
                log.borrow_mut().push((request.partition, to.0));
            }
        }
        previous(from, to, message)
    }));
    asked
}

/// n = 5, f = 2: replica 4 fetches state with `strategy` while replica 0 serves every partition
/// tampered; returns the cluster, the checkpoint to reach, and the copies replica 4 asks for.
fn fetching_from_a_tampering_replica(strategy: TransferStrategy) -> (Cluster, SeqNum, CopyLog) {
    let (mut cluster, target) =
        last_replica_fetching_state(with_strategy(5, 2, strategy), move |from, message| {
            match (from, message) {
                (0, ReplicaMessage::PartitionReply(reply)) if reply.chunk.is_some() => Some(
                    Fate::Replace(ReplicaMessage::PartitionReply(tampered(reply))),
                ),
                _ => None,
            }
        });
    let asked = record_copy_requests(&mut cluster, 4);
    (cluster, target, asked)
}

/// Every strategy brings a lagging replica to the agreed state when all serve correctly, and
/// latency-first pays for its speed in bytes: f+1 copies of each partition arrive where the
/// others take one.
#[test]
fn every_transfer_strategy_fetches_the_agreed_state() {
    let mut received = BTreeMap::new();
    for strategy in TransferStrategy::ALL {
        let (mut cluster, target) =
            last_replica_fetching_state(with_strategy(3, 1, strategy), |_, _| None);
        cluster.run_for(5_000);
        assert_caught_up(&cluster, 2, target);
        let bytes = cluster.replicas[2].transfer_bytes_received();
        assert!(bytes > 0, "{strategy}: nothing received");
        received.insert(strategy.name(), bytes);
    }
    let one_copy = received["merkle"];
    for name in ["bandwidth-first-1", "bandwidth-first-2"] {
        assert_eq!(received[name], one_copy, "{received:?}");
    }
    // The second copy of the last partition may arrive after the transfer ended, uncounted.
    let latency_first = received["latency-first"];
    assert!(
        latency_first > one_copy * 3 / 2 && latency_first <= 2 * one_copy,
        "{received:?}"
    );
}

/// Digest votes expose a liar before it is asked for a single copy: replica 0 answers every
/// digest-only request with a wrong digest, is blacklisted, and the correct replica serves the
/// whole state.
#[test]
fn a_replica_lying_in_digest_votes_is_blacklisted() {
    // Latency-first at n = 3 asks both other replicas for copies and leaves no one to vote, so
    // it runs at n = 5: f+1 = 3 copies and one digest vote per partition.
    for (strategy, n, f) in [
        (TransferStrategy::LatencyFirst, 5, 2),
        (TransferStrategy::BandwidthFirst1, 3, 1),
        (TransferStrategy::BandwidthFirst2, 3, 1),
    ] {
        let lagging = n - 1;
        let (mut cluster, target) =
            last_replica_fetching_state(with_strategy(n, f, strategy), |from, message| {
                match (from, message) {
                    (0, ReplicaMessage::PartitionReply(reply)) if reply.digest.is_some() => {
                        let mut reply = reply.clone();
                        reply.digest = Some(Digest([7; 32]));
                        Some(Fate::Replace(ReplicaMessage::PartitionReply(reply)))
                    }
                    _ => None,
                }
            });
        cluster.run_for(5_000);
        assert!(
            cluster.rejections(lagging, "partition-digest-vote") >= 1,
            "{strategy}: the lie went unnoticed"
        );
        assert_caught_up(&cluster, lagging as usize, target);
    }
}

/// Copies that fail their digest are replaced as each strategy says. With n = 5 and f = 2,
/// replica 0 serves every partition with one value changed: after its copy fails, variant 1
/// asks one more replica, variant 2 asks f = 2 more at once, latency-first had f+1 = 3 copies
/// in flight from the start; all end with the agreed state.
#[test]
fn failed_copies_are_replaced_as_the_strategy_says() {
    for (strategy, copies_after_failure) in [
        (TransferStrategy::BandwidthFirst1, 1),
        (TransferStrategy::BandwidthFirst2, 2),
        (TransferStrategy::Merkle, 1),
    ] {
        let (mut cluster, target, asked) = fetching_from_a_tampering_replica(strategy);
        cluster.run_for(10_000);
        assert!(cluster.rejections(4, "partition-digest") >= 1, "{strategy}");
        assert_caught_up(&cluster, 4, target);
        let asked = asked.borrow();
        // Partitions whose first copy came from the liar: the replacements that followed.
        let mut first: BTreeMap<u32, u32> = BTreeMap::new();
        let mut copies: BTreeMap<u32, usize> = BTreeMap::new();
        for (partition, source) in asked.iter() {
            first.entry(*partition).or_insert(*source);
            *copies.entry(*partition).or_default() += 1;
        }
        let failed: Vec<u32> = first
            .iter()
            .filter(|(_, source)| **source == 0)
            .map(|(partition, _)| *partition)
            .collect();
        assert!(!failed.is_empty(), "{strategy}: the liar served nothing");
        for partition in failed {
            assert_eq!(
                copies[&partition],
                1 + copies_after_failure,
                "{strategy}: partition {partition}: {asked:?}"
            );
        }
    }
}

/// Latency-first asks f+1 distinct replicas for every partition at once, so a faulty copy
/// never costs a second round: with n = 5 and f = 2, every partition is asked of exactly three
/// replicas, once each, although replica 0 serves only tampered copies.
#[test]
fn latency_first_asks_f_plus_one_replicas_at_once() {
    let (mut cluster, target, asked) =
        fetching_from_a_tampering_replica(TransferStrategy::LatencyFirst);
    cluster.run_for(10_000);
    assert_caught_up(&cluster, 4, target);
    let asked = asked.borrow();
    let mut per_partition: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for (partition, source) in asked.iter() {
        assert!(
            per_partition.entry(*partition).or_default().insert(*source),
            "partition {partition} asked twice of replica {source}"
        );
    }
    assert!(!per_partition.is_empty());
    for (partition, sources) in &per_partition {
        assert_eq!(sources.len(), 3, "partition {partition}: {sources:?}");
    }
}

/// Found in review: after a transfer, the state the replica held before stayed as its retired
/// state, so the snapshot that makes the installed state durable carried the old state too (up
/// to twice the disk a transfer may need). Replica 2 executes 64 KiB of values, is cut off while
/// the others overwrite them with one byte each and move on, fetches the new state, and its
/// snapshot holds nothing of the old values.
#[test]
fn the_snapshot_after_a_transfer_leaves_the_old_state_out() {
    let mut cluster = Cluster::new(config(3, 1));
    let big = "v".repeat(4096);
    for number in 1..=16u64 {
        let key = format!("old{number}");
        assert!(cluster
            .invoke(ClientId::new(0, 1), number, &set(&key, &big), 5_000)
            .is_some());
    }
    cluster.run_for(1_000);
    assert!(cluster.replicas[2].last_executed() >= SeqNum(16));
    cluster.filter = Some(transfer_only(2, |_, _| None));
    for number in 17..=56u64 {
        let key = format!("old{}", (number - 17) % 16 + 1);
        assert!(cluster
            .invoke(ClientId::new(0, 1), number, &set(&key, "x"), 5_000)
            .is_some());
    }
    let target = cluster.replicas[1].stable_checkpoint().seq;
    cluster.run_for(5_000);
    assert_caught_up(&cluster, 2, target);
    let snapshot = cluster.replicas[2].snapshot();
    assert!(
        snapshot.len() < 16 * 4096,
        "the snapshot after the transfer holds {} bytes: the old values are still in it",
        snapshot.len()
    );
}

/// Found in review: a faulty source could hold a partition for ever by answering every request
/// at once with one fabricated entry (a valid key of that partition, above the cursor) and a
/// promise of more, since every chunk bought it one more heartbeat interval. A chunk now buys
/// its share of an interval by size, so the dripping source loses the partition at the base
/// patience, and the correct replica serves it.
#[test]
fn a_source_dripping_tiny_chunks_loses_its_partitions() {
    use std::cell::Cell;
    use tessera_types::ChunkBytes;

    let drips = Rc::new(Cell::new(0u64));
    let counter = drips.clone();
    let (mut cluster, target) = replica_2_fetching_state(move |from, message| match message {
        ReplicaMessage::PartitionReply(reply) if from == 0 && reply.chunk.is_some() => {
            // The next key, in increasing order, that falls in the asked partition.
            let key = loop {
                let number = counter.get();
                counter.set(number + 1);
                let key = format!("zz-drip-{number:012}").into_bytes();
                let digest = Digest::of(tessera_kv::PARTITION_OF_DOMAIN, &key);
                let mut first = [0u8; 8];
                first.copy_from_slice(&digest.as_bytes()[..8]);
                let partition = u64::from_le_bytes(first) % tessera_kv::PARTITIONS as u64;
                if partition == u64::from(reply.partition) {
                    break key;
                }
            };
            let entries: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> =
                vec![(key.clone(), b"drip".to_vec(), None)];
            let mut reply = reply.clone();
            reply.chunk = Some(ChunkBytes {
                bytes: tessera_types::encode(&entries),
                next: Some(key),
            });
            // Five drips per heartbeat interval: each used to buy a whole interval.
            Some(Fate::ReplaceLater(
                20,
                ReplicaMessage::PartitionReply(reply),
            ))
        }
        _ => None,
    });
    cluster.run_for(10_000);
    assert!(drips.get() > 0, "the source never dripped");
    assert_replica_2_caught_up(&cluster, target);
}
