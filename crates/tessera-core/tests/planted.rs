//! Each planted bug, scripted: the same scenario runs once with the bug planted and once without,
//! and only the planted run breaks the rule the bug targets. These tests prove the bugs are live
//! (a planted bug that changes nothing would make the simulator's checker tests vacuous) and that
//! planting nothing changes nothing.

#![cfg(feature = "planted-bugs")]

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use common::{
    broadcast_from, config, forge_prepare, forge_prepare_at, get, incr, set, sign_request, usig_of,
    value, Cluster, Fate,
};
use tessera_core::PlantedBug;
use tessera_kv::Response;
use tessera_types::{
    batch_digest, checkpoint_certified_digest, new_view_certified_digest, new_view_payload_digest,
    view_change_certified_digest, view_change_payload_digest, Checkpoint, ClientId, NewView,
    ReplicaId, ReplicaMessage, ReqViewChange, Request, SeqNum, View, ViewChange,
};
use tessera_usig::Usig;

fn client(index: u32) -> ClientId {
    ClientId::new(0, index)
}

fn plant(cluster: &mut Cluster, bug: PlantedBug, replicas: &[usize]) {
    for &index in replicas {
        cluster.replicas[index].plant_bug(bug);
    }
}

/// No two replicas had different states after executing up to the same sequence number (the
/// agreement the simulator checks; `Cluster::assert_histories_agree` as a predicate).
fn histories_agree(cluster: &Cluster) -> bool {
    let mut seen: BTreeMap<u64, _> = BTreeMap::new();
    cluster.history.iter().flatten().all(|(seq, digest)| {
        let first = *seen.entry(*seq).or_insert(*digest);
        first == *digest
    })
}

fn requests_executed(cluster: &Cluster, replica: usize) -> u64 {
    cluster.replicas[replica].status().requests_executed
}

// ---------------------------------------------------------------------- skip-ui-verification

/// A Byzantine primary (played by the test) certifies PREPARE A for seq 1 and sends it to
/// backup 1; backup 2 gets PREPARE B for seq 1 carrying A's UI, which no USIG ever bound to B.
fn one_ui_for_two_prepares(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    if planted {
        plant(&mut cluster, PlantedBug::SkipUiVerification, &[1, 2]);
    }
    let mut usig = usig_of(0, 3);
    let batch_a = vec![sign_request(client(1), 1, set("x", "A").encode())];
    let prepare_a = forge_prepare(&mut usig, View(0), SeqNum(1), batch_a);
    let mut prepare_b = prepare_a.clone();
    prepare_b.batch = Arc::new(vec![sign_request(client(2), 1, set("x", "B").encode())]);
    prepare_b.header.batch_digest = batch_digest(&prepare_b.batch);
    cluster.inject(0, 2, ReplicaMessage::Prepare(prepare_b));
    cluster.inject(0, 1, ReplicaMessage::Prepare(prepare_a));
    cluster.run_for(300);
    cluster
}

#[test]
fn skip_ui_verification_lets_one_ui_vouch_for_two_batches() {
    let honest = one_ui_for_two_prepares(false);
    assert_eq!(honest.rejections(2, "invalid-ui"), 1);
    assert!(histories_agree(&honest));
    let planted = one_ui_for_two_prepares(true);
    assert_eq!(planted.rejections(2, "invalid-ui"), 0);
    for index in 1..3 {
        assert_eq!(planted.replicas[index].last_executed(), SeqNum(1));
    }
    assert!(
        !histories_agree(&planted),
        "backups 1 and 2 executed different batches at seq 1"
    );
}

// ---------------------------------------------------------------------- execute-without-quorum

struct LonePrepare {
    cluster: Cluster,
    /// What the primary had executed before any backup saw its PREPARE.
    executed_alone: SeqNum,
    /// Whether the primary replied to the client then.
    replied_alone: bool,
}

/// The primary's PREPARE for request A is lost on the way to both backups. Then the primary is
/// cut off, the backups move to view 1 and order request B at seq 1, and the network heals.
fn lone_prepare(planted: bool) -> LonePrepare {
    let mut cluster = Cluster::new(config(3, 1));
    if planted {
        plant(&mut cluster, PlantedBug::ExecuteWithoutQuorum, &[0]);
    }
    cluster.filter = Some(Box::new(|from, _, message| match message {
        ReplicaMessage::Prepare(_) if from == ReplicaId(0) => Fate::Drop,
        _ => Fate::Deliver,
    }));
    let request = sign_request(client(1), 1, set("x", "A").encode());
    cluster.submit(&request, &[0]);
    cluster.deliver_all(1_000);
    let executed_alone = cluster.replicas[0].last_executed();
    let replied_alone = cluster
        .replies
        .iter()
        .any(|reply| reply.replica == ReplicaId(0) && reply.client == client(1));
    cluster.filter = None;
    cluster.isolated[0] = true;
    assert_eq!(
        cluster.invoke(client(2), 1, &set("x", "B"), 20_000),
        Some(Response::Ok)
    );
    assert!(cluster.replicas[1].view() >= View(1));
    cluster.isolated[0] = false;
    cluster.run_for(3_000);
    LonePrepare {
        cluster,
        executed_alone,
        replied_alone,
    }
}

#[test]
fn execute_without_quorum_executes_and_replies_before_any_backup_committed() {
    let honest = lone_prepare(false);
    assert_eq!(honest.executed_alone, SeqNum(0));
    assert!(!honest.replied_alone);
    assert!(histories_agree(&honest.cluster));
    honest.cluster.assert_all_caught_up();

    let planted = lone_prepare(true);
    assert_eq!(planted.executed_alone, SeqNum(1));
    assert!(
        planted.replied_alone,
        "the client heard a result nobody agreed on"
    );
    assert!(
        !histories_agree(&planted.cluster),
        "the primary executed A at seq 1, the new view ordered B there"
    );
}

// ---------------------------------------------------------------------- new-view-drops-last-entry

/// The primary's view-0 PREPARE for seq 3 never reaches backup 2 (not even retransmitted);
/// backup 1 commits and executes it, then the primary crashes and backups 1 and 2 move to view 1:
/// the batch can reach backup 2 only through the new view's plan S.
fn batch_carried_by_the_plan(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    if planted {
        plant(&mut cluster, PlantedBug::NewViewDropsLastEntry, &[0, 1, 2]);
    }
    for number in 1..=2 {
        assert!(cluster
            .invoke(client(1), number, &incr("counter"), 5_000)
            .is_some());
    }
    cluster.filter = Some(Box::new(|_, to, message| match message {
        ReplicaMessage::Prepare(prepare)
            if to == ReplicaId(2)
                && prepare.header.view == View(0)
                && prepare.header.seq == SeqNum(3) =>
        {
            Fate::Drop
        }
        _ => Fate::Deliver,
    }));
    let request = sign_request(client(1), 3, incr("counter").encode());
    cluster.submit(&request, &[0]);
    for _ in 0..100 {
        if cluster.replicas[1].last_executed() == SeqNum(3) {
            break;
        }
        cluster.deliver_all(1);
    }
    assert_eq!(cluster.replicas[1].last_executed(), SeqNum(3));
    cluster.crash(0);
    cluster.invoke(client(2), 1, &incr("counter"), 10_000);
    cluster.run_for(1_000);
    cluster
}

#[test]
fn new_view_drops_last_entry_loses_a_batch_accepted_in_the_old_view() {
    let honest = batch_carried_by_the_plan(false);
    assert!(histories_agree(&honest));
    honest.assert_all_caught_up();
    let planted = batch_carried_by_the_plan(true);
    assert!(planted.rejections(1, "divergence") >= 1);
    assert!(
        !histories_agree(&planted),
        "backup 2 executed another batch at seq 3, where backup 1 had executed the old one"
    );
}

// ---------------------------------------------------------------------- ignore-client-table

#[test]
fn ignore_client_table_executes_a_retransmitted_request_again() {
    for planted in [false, true] {
        let mut cluster = Cluster::new(config(3, 1));
        if planted {
            plant(&mut cluster, PlantedBug::IgnoreClientTable, &[0, 1, 2]);
        }
        assert_eq!(
            cluster.invoke(client(1), 1, &incr("k"), 5_000),
            Some(Response::Integer(1))
        );
        // The client did not hear back in time and sends request 1 again.
        let again = cluster.invoke(client(1), 1, &incr("k"), 5_000);
        let expected = if planted { 2 } else { 1 };
        assert_eq!(
            again,
            Some(Response::Integer(expected)),
            "planted: {planted}"
        );
        for index in 0..3 {
            assert_eq!(requests_executed(&cluster, index), expected as u64);
        }
        assert_eq!(
            cluster.invoke(client(2), 1, &get("k"), 5_000),
            value(&expected.to_string())
        );
    }
}

/// Planted in the primary only: it re-proposes the executed request and runs it again, while the
/// correct backups commit the batch but execute the request once. No panic, a split state.
#[test]
fn ignore_client_table_in_the_primary_alone_splits_its_state_from_the_backups() {
    let mut cluster = Cluster::new(config(3, 1));
    plant(&mut cluster, PlantedBug::IgnoreClientTable, &[0]);
    assert_eq!(
        cluster.invoke(client(1), 1, &incr("k"), 5_000),
        Some(Response::Integer(1))
    );
    let request = sign_request(client(1), 1, incr("k").encode());
    cluster.submit(&request, &[0]);
    cluster.run_for(100);
    for index in 0..3 {
        assert_eq!(cluster.replicas[index].last_executed(), SeqNum(2));
    }
    assert_eq!(requests_executed(&cluster, 0), 2);
    assert_eq!(requests_executed(&cluster, 1), 1);
    assert_eq!(requests_executed(&cluster, 2), 1);
    assert!(!histories_agree(&cluster));
}

// ---------------------------------------------------------------------- skip-request-signature

fn forged_request() -> Request {
    let mut forged = sign_request(client(1), 1, set("stolen", "yes").encode());
    forged.signature[0] ^= 0xFF;
    forged
}

#[test]
fn skip_request_signature_lets_the_primary_order_a_forged_request() {
    for planted in [false, true] {
        let mut cluster = Cluster::new(config(3, 1));
        if planted {
            plant(&mut cluster, PlantedBug::SkipRequestSignature, &[0, 1, 2]);
        }
        cluster.submit(&forged_request(), &[0]);
        cluster.run_for(100);
        let rejected = cluster.rejections(0, "request-signature");
        let stolen = cluster.invoke(client(2), 1, &get("stolen"), 5_000);
        if planted {
            assert_eq!(rejected, 0);
            assert_eq!(stolen, value("yes"), "a request nobody signed executed");
        } else {
            assert_eq!(rejected, 1);
            assert_eq!(stolen, Some(Response::Value(None)));
        }
    }
}

#[test]
fn skip_request_signature_lets_backups_commit_a_forged_request() {
    for planted in [false, true] {
        let mut cluster = Cluster::new(config(3, 1));
        cluster.crash(0);
        if planted {
            plant(&mut cluster, PlantedBug::SkipRequestSignature, &[1, 2]);
        }
        let mut usig = usig_of(0, 3);
        let prepare = forge_prepare(&mut usig, View(0), SeqNum(1), vec![forged_request()]);
        broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(prepare));
        cluster.run_for(100);
        for index in 1..3 {
            let forged_refused = cluster.rejections(index, "prepare-forged-request");
            let executed = cluster.replicas[index as usize].last_executed();
            if planted {
                assert_eq!((forged_refused, executed), (0, SeqNum(1)));
            } else {
                assert_eq!((forged_refused, executed), (1, SeqNum(0)));
            }
        }
    }
}

// ---------------------------------------------------------------------- trust-state-snapshot

/// Replica 2 hears nothing but heartbeats while the others reach the stable checkpoint at seq 16,
/// so it fetches the state there; replica 1 stays silent to it and a faulty replica 0 serves
/// the one partition that differs with the counter's value changed.
fn forged_state_transfer(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.filter = Some(Box::new(|from, to, message| {
        if from.0 != 2 && to.0 != 2 {
            return Fate::Deliver;
        }
        match (from.0, to.0, message) {
            (0 | 1, 2, ReplicaMessage::Heartbeat(_))
            | (2, 0, ReplicaMessage::StateRequest(_))
            | (0, 2, ReplicaMessage::StateSummary(_))
            | (2, 0, ReplicaMessage::PartitionRequest(_)) => Fate::Deliver,
            (0, 2, ReplicaMessage::PartitionReply(reply)) => {
                let mut reply = reply.clone();
                if let Some(chunk) = &mut reply.chunk {
                    let mut entries: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> =
                        tessera_types::decode(&chunk.bytes, 1 << 20).expect("a key-value chunk");
                    for (_, value, _) in &mut entries {
                        *value = b"1000000".to_vec();
                    }
                    chunk.bytes = tessera_types::encode(&entries);
                }
                Fate::Replace(ReplicaMessage::PartitionReply(reply))
            }
            _ => Fate::Drop,
        }
    }));
    if planted {
        plant(&mut cluster, PlantedBug::TrustStateSnapshot, &[2]);
    }
    for number in 1..=16 {
        assert!(cluster
            .invoke(client(1), number, &incr("counter"), 5_000)
            .is_some());
    }
    assert_eq!(cluster.replicas[0].stable_checkpoint().seq, SeqNum(16));
    cluster.run_for(3_000);
    cluster
}

#[test]
fn trust_state_snapshot_installs_a_state_the_certificate_does_not_vouch_for() {
    let honest = forged_state_transfer(false);
    assert!(honest.rejections(2, "partition-digest") >= 1);
    assert_eq!(honest.replicas[2].last_executed(), SeqNum(0));
    let planted = forged_state_transfer(true);
    assert_eq!(planted.rejections(2, "partition-digest"), 0);
    assert_eq!(planted.replicas[2].last_executed(), SeqNum(16));
    assert_ne!(
        planted.replicas[2].state_digest(),
        planted.replicas[0].state_digest(),
        "replica 2 claims seq 16 with a state no correct replica had"
    );
}

// ---------------------------------------------------------------------- new-view-from-one-view-change

/// Primary 0 and backup 2 accept and execute batch A at seq 1 while backup 1 hears nothing from
/// anyone. Backup 2 asks for view 1 and backup 1's own request times out, so backup 1 (the
/// primary of view 1) starts view 1 knowing nothing of A. The client then retransmits B to it.
fn view_change_seen_by_the_next_primary_alone(planted_in: &[usize]) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    plant(
        &mut cluster,
        PlantedBug::NewViewFromOneViewChange,
        planted_in,
    );
    cluster.filter = Some(Box::new(|from, to, message| {
        let request_from_1 = from == ReplicaId(1) && matches!(message, ReplicaMessage::Request(_));
        if to == ReplicaId(1) || request_from_1 {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }));
    let request_a = sign_request(client(1), 1, set("x", "A").encode());
    cluster.submit(&request_a, &[0]);
    cluster.deliver_all(1_000);
    assert_eq!(cluster.replicas[0].last_executed(), SeqNum(1));
    assert_eq!(cluster.replicas[2].last_executed(), SeqNum(1));
    assert_eq!(cluster.replicas[1].last_executed(), SeqNum(0));
    let ask = ReqViewChange {
        replica: ReplicaId(2),
        from_view: View(0),
        to_view: View(1),
    };
    cluster.inject(2, 1, ReplicaMessage::ReqViewChange(ask));
    let request_b = sign_request(client(2), 1, set("x", "B").encode());
    cluster.submit(&request_b, &[1]);
    cluster.run_for(600);
    assert_eq!(cluster.replicas[1].view(), View(1));
    cluster.submit(&request_b, &[1]);
    cluster.run_for(100);
    cluster
}

#[test]
fn new_view_from_one_view_change_starts_a_view_that_lost_an_accepted_batch() {
    let honest = view_change_seen_by_the_next_primary_alone(&[]);
    assert!(
        honest.replicas[1].is_view_changing(),
        "one VIEW-CHANGE is not a quorum"
    );
    for index in [0, 2] {
        assert_eq!(honest.replicas[index].view(), View(0));
    }

    // Planted in the new primary: it starts view 1 on its own VIEW-CHANGE; correct replicas
    // refuse that NEW-VIEW.
    let builder = view_change_seen_by_the_next_primary_alone(&[1]);
    assert_eq!(builder.replicas[1].view(), View(1));
    assert!(!builder.replicas[1].is_view_changing());
    for index in [0, 2] {
        assert_eq!(
            builder.rejections(index, "new-view-certificate-too-small"),
            1
        );
        assert_eq!(builder.replicas[index as usize].view(), View(0));
    }

    // Planted everywhere: the others accept it too, and the new view re-proposes seq 1 with B
    // where A was accepted.
    let everywhere = view_change_seen_by_the_next_primary_alone(&[0, 1, 2]);
    for index in [0, 2] {
        let replica = &everywhere.replicas[index];
        assert_eq!(
            everywhere.rejections(index as u32, "new-view-certificate-too-small"),
            0
        );
        assert_eq!(
            (replica.view(), replica.is_view_changing()),
            (View(1), false)
        );
        assert_eq!(
            everywhere.rejections(index as u32, "divergence"),
            1,
            "replica {index} was asked to commit B at seq 1"
        );
    }
}

// ---------------------------------------------------------------------- skip-fifo-order

/// A Byzantine primary (played by the test) certifies A for seq 1 (counter 1), then B for seq 1
/// (counter 2); backup 1 gets A, backup 2 gets only B.
fn two_prepares_in_one_stream(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    if planted {
        plant(&mut cluster, PlantedBug::SkipFifoOrder, &[1, 2]);
    }
    let mut usig = usig_of(0, 3);
    let batch_a = vec![sign_request(client(1), 1, set("x", "A").encode())];
    let batch_b = vec![sign_request(client(2), 1, set("x", "B").encode())];
    let prepare_a = forge_prepare(&mut usig, View(0), SeqNum(1), batch_a);
    let prepare_b = forge_prepare(&mut usig, View(0), SeqNum(1), batch_b);
    cluster.inject(0, 2, ReplicaMessage::Prepare(prepare_b));
    cluster.inject(0, 1, ReplicaMessage::Prepare(prepare_a));
    cluster.run_for(400);
    cluster
}

#[test]
fn skip_fifo_order_lets_a_primary_hide_its_first_prepare_from_one_backup() {
    let honest = two_prepares_in_one_stream(false);
    assert_eq!(honest.rejections(2, "prepare-out-of-sequence"), 1);
    assert!(histories_agree(&honest));
    let planted = two_prepares_in_one_stream(true);
    assert_eq!(planted.rejections(2, "prepare-out-of-sequence"), 0);
    for index in 1..3 {
        assert_eq!(planted.replicas[index].last_executed(), SeqNum(1));
    }
    assert!(
        !histories_agree(&planted),
        "backup 1 executed A and backup 2 executed B at seq 1"
    );
}

// ---------------------------------------------------------------------- skip-plan-match

/// Replica 1, the primary of view 1, is Byzantine (played by the test). Backup 2 alone executes
/// A at seq 1 (its COMMIT never reaches primary 0). In view 1 the faulty primary sends a valid
/// NEW-VIEW, whose plan fixes A at seq 1, and then proposes B at seq 1 to replica 0.
fn reproposal_against_the_plan(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(1);
    if planted {
        plant(&mut cluster, PlantedBug::SkipPlanMatch, &[0, 2]);
    }
    let captured: Rc<RefCell<Option<Arc<ViewChange>>>> = Rc::default();
    let sink = captured.clone();
    cluster.filter = Some(Box::new(move |from, to, message| match message {
        ReplicaMessage::Commit(_) if from == ReplicaId(2) && to == ReplicaId(0) => Fate::Drop,
        ReplicaMessage::Request(_) if from == ReplicaId(2) => Fate::Drop,
        ReplicaMessage::ViewChange(view_change) if from == ReplicaId(2) => {
            *sink.borrow_mut() = Some(view_change.clone());
            Fate::Deliver
        }
        _ => Fate::Deliver,
    }));
    let request_a = sign_request(client(1), 1, set("x", "A").encode());
    cluster.submit(&request_a, &[0]);
    cluster.deliver_all(1_000);
    assert_eq!(cluster.replicas[0].last_executed(), SeqNum(0));
    assert_eq!(cluster.replicas[2].last_executed(), SeqNum(1));

    // The faulty replica 1 asks for view 1; backup 2's own request times out; both 0 and 2 move.
    let ask = ReqViewChange {
        replica: ReplicaId(1),
        from_view: View(0),
        to_view: View(1),
    };
    broadcast_from(&mut cluster, 1, &ReplicaMessage::ReqViewChange(ask));
    let request_c = sign_request(client(3), 1, set("y", "C").encode());
    cluster.submit(&request_c, &[2]);
    cluster.run_for(550);
    let from_2 = captured
        .borrow()
        .clone()
        .expect("backup 2 sent its VIEW-CHANGE");

    // Replica 1: counter 1 its VIEW-CHANGE (nothing before it), 2 the NEW-VIEW, 3 the PREPARE.
    let mut byzantine = usig_of(1, 3);
    let genesis = cluster.replicas[0].stable_checkpoint().clone();
    let payload = view_change_payload_digest(&genesis, &[]);
    let ui = byzantine
        .create_ui(&view_change_certified_digest(
            ReplicaId(1),
            View(1),
            &payload,
        ))
        .unwrap();
    let own = Arc::new(ViewChange {
        replica: ReplicaId(1),
        to_view: View(1),
        checkpoint: genesis,
        log: Vec::new(),
        new_views: Vec::new(),
        ui,
    });
    let view_changes = vec![own.clone(), from_2];
    let payload = new_view_payload_digest(&view_changes);
    let ui = byzantine
        .create_ui(&new_view_certified_digest(ReplicaId(1), View(1), &payload))
        .unwrap();
    let new_view = Arc::new(NewView {
        primary: ReplicaId(1),
        view: View(1),
        view_changes,
        ui,
    });
    let batch_b = vec![sign_request(client(2), 1, set("x", "B").encode())];
    let prepare_b = forge_prepare(&mut byzantine, View(1), SeqNum(1), batch_b);
    cluster.inject(1, 0, ReplicaMessage::ViewChange(own));
    cluster.inject(1, 0, ReplicaMessage::NewView(new_view));
    assert_eq!(
        (
            cluster.replicas[0].view(),
            cluster.replicas[0].is_view_changing()
        ),
        (View(1), false),
        "replica 0 accepted the NEW-VIEW"
    );
    cluster.inject(1, 0, ReplicaMessage::Prepare(prepare_b));
    cluster
}

#[test]
fn skip_plan_match_lets_a_new_primary_replace_an_accepted_batch() {
    let honest = reproposal_against_the_plan(false);
    assert_eq!(honest.rejections(0, "prepare-contradicts-new-view"), 1);
    assert_eq!(honest.replicas[0].last_executed(), SeqNum(0));
    assert!(histories_agree(&honest));
    let planted = reproposal_against_the_plan(true);
    assert_eq!(planted.rejections(0, "prepare-contradicts-new-view"), 0);
    assert_eq!(planted.replicas[0].last_executed(), SeqNum(1));
    assert!(
        !histories_agree(&planted),
        "replica 0 executed B at seq 1 where replica 2 had executed A"
    );
}

// ---------------------------------------------------------------------- accept-old-view-prepare

/// Primary 0 is cut off; backups 1 and 2 replace it and execute a request at seq 1 in view 1.
/// Then the old primary, still in view 0, sends a PREPARE for seq 2 of view 0 to backup 2.
fn prepare_from_the_replaced_primary(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    assert_eq!(
        cluster.invoke(client(1), 1, &set("x", "new"), 20_000),
        Some(Response::Ok)
    );
    for index in 1..3 {
        assert_eq!(cluster.replicas[index].view(), View(1));
        assert_eq!(cluster.replicas[index].last_executed(), SeqNum(1));
    }
    if planted {
        plant(&mut cluster, PlantedBug::AcceptOldViewPrepare, &[2]);
    }
    let mut old_primary = usig_of(0, 3);
    let batch = vec![sign_request(client(2), 1, set("x", "old").encode())];
    // Timed now, so only the view rule can refuse it (an older time would be refused as
    // going back in time, which would hide the planted bug).
    let now = cluster.wall_ms(2);
    let prepare = forge_prepare_at(&mut old_primary, View(0), SeqNum(2), batch, now);
    cluster.inject(0, 2, ReplicaMessage::Prepare(prepare));
    cluster
}

#[test]
fn accept_old_view_prepare_lets_the_replaced_primary_keep_ordering() {
    let honest = prepare_from_the_replaced_primary(false);
    assert_eq!(honest.rejections(2, "prepare-not-for-active-view"), 1);
    assert_eq!(honest.replicas[2].last_executed(), SeqNum(1));
    let planted = prepare_from_the_replaced_primary(true);
    assert_eq!(planted.rejections(2, "prepare-not-for-active-view"), 0);
    assert_eq!(
        planted.replicas[2].last_executed(),
        SeqNum(2),
        "backup 2 executed a view-0 batch in view 1, with the old primary's vote and its own"
    );
    assert_eq!(planted.replicas[1].last_executed(), SeqNum(1));
}

// ---------------------------------------------------------------------- stable-checkpoint-on-f

/// A Byzantine replica 2 sends backup 1 a CHECKPOINT for seq 8 with a made-up state digest.
fn lone_bogus_checkpoint(planted: bool) -> Cluster {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(2);
    if planted {
        plant(&mut cluster, PlantedBug::StableCheckpointOnF, &[1]);
    }
    let mut byzantine = usig_of(2, 3);
    let bogus = tessera_crypto::Digest([7; 32]);
    let ui = byzantine
        .create_ui(&checkpoint_certified_digest(
            ReplicaId(2),
            SeqNum(8),
            &bogus,
            View(0),
            &[],
        ))
        .unwrap();
    let checkpoint = Checkpoint {
        replica: ReplicaId(2),
        seq: SeqNum(8),
        state_digest: bogus,
        view: View(0),
        epochs: Vec::new(),
        ui,
    };
    cluster.inject(2, 1, ReplicaMessage::Checkpoint(checkpoint));
    cluster
}

#[test]
fn stable_checkpoint_on_f_lets_one_faulty_replica_certify_a_state() {
    let honest = lone_bogus_checkpoint(false);
    assert_eq!(honest.replicas[1].stable_checkpoint().seq, SeqNum(0));
    let planted = lone_bogus_checkpoint(true);
    let stable = planted.replicas[1].stable_checkpoint();
    assert_eq!(stable.seq, SeqNum(8));
    assert_eq!(stable.state_digest, tessera_crypto::Digest([7; 32]));
}
