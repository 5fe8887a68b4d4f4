//! The agreed time of batches (docs/PROTOCOL.md §4, *Agreed time*): the primary proposes it from
//! its wall clock, backups bound it by theirs, every replica executes a batch at the same time
//! whatever its own clock says, and time never goes back, across view changes included.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::{
    broadcast_from, config, forge_prepare_at, get, incr, set, sign_request, usig_of, Cluster, Fate,
    WALL_BASE_MS,
};
use tessera_kv::{Command, Expiry, Response, SetCondition};
use tessera_types::{ClientId, ReplicaMessage, SeqNum, View};

fn client(index: u32) -> ClientId {
    ClientId::new(0, index)
}

/// Records the `(view, seq, time)` of every PREPARE sent.
fn record_prepares(cluster: &mut Cluster) -> Rc<RefCell<Vec<(View, SeqNum, u64)>>> {
    let seen: Rc<RefCell<Vec<(View, SeqNum, u64)>>> = Rc::default();
    let sink = seen.clone();
    cluster.filter = Some(Box::new(move |_, _, message| {
        if let ReplicaMessage::Prepare(prepare) = message {
            let header = &prepare.header;
            let entry = (header.view, header.seq, header.time_ms);
            if !sink.borrow().contains(&entry) {
                sink.borrow_mut().push(entry);
            }
        }
        Fate::Deliver
    }));
    seen
}

#[test]
fn backups_with_different_clocks_within_the_bound_execute_at_the_same_time() {
    let mut cluster = Cluster::new(config(3, 1));
    // The bound is 2000 ms; the primary runs 900 ms ahead, one backup 900 ms behind.
    cluster.wall_skew_ms = vec![900, -900, 300];
    let prepares = record_prepares(&mut cluster);
    for number in 1..=5 {
        assert_eq!(
            cluster.invoke(client(1), number, &incr("counter"), 5_000),
            Some(Response::Integer(number as i64))
        );
        cluster.run_for(100);
    }
    cluster.run_for(500);
    cluster.assert_histories_agree();
    cluster.assert_all_caught_up();
    let times: Vec<u64> = cluster
        .replicas
        .iter()
        .map(|replica| replica.agreed_time_ms())
        .collect();
    assert!(
        times.iter().all(|time| *time == times[0]),
        "agreed clocks differ: {times:?}"
    );
    // The agreed time is the primary's clock, not a backup's.
    let last = prepares
        .borrow()
        .last()
        .copied()
        .expect("PREPAREs were sent");
    assert_eq!(times[0], last.2);
    assert!(times[0] >= WALL_BASE_MS + 900, "{}", times[0]);
    for replica in 0..3 {
        assert_eq!(
            cluster.rejections(replica, "prepare-time-ahead-of-clock"),
            0
        );
        assert_eq!(
            cluster.rejections(replica, "prepare-time-before-previous"),
            0
        );
    }
    let recorded = prepares.borrow();
    assert!(
        recorded.windows(2).all(|pair| pair[0].2 <= pair[1].2),
        "PREPARE times went back: {recorded:?}"
    );
}

#[test]
fn a_prepare_beyond_the_clock_bound_is_refused_and_a_view_change_follows() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let request = sign_request(client(1), 1, set("k", "v").encode());
    cluster.submit(&request, &[1, 2]);
    cluster.deliver_all(1_000);
    let mut usig = usig_of(0, 3);
    // 2000 ms is the bound: 2500 ms ahead of both backups' clocks is too far.
    let ahead = forge_prepare_at(
        &mut usig,
        View(0),
        SeqNum(1),
        vec![request.clone()],
        cluster.wall_ms(1) + 2_500,
    );
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(ahead));
    cluster.deliver_all(1_000);
    for replica in [1, 2] {
        assert_eq!(
            cluster.rejections(replica, "prepare-time-ahead-of-clock"),
            1
        );
        assert_eq!(
            cluster.replicas[replica as usize].last_executed(),
            SeqNum(0)
        );
    }
    // The request timer moves the group to view 1, whose primary orders the request at a time
    // within every correct clock's bound.
    let prepares = record_prepares(&mut cluster);
    let mut executed = false;
    for step in 0..500 {
        if step % 30 == 29 {
            // The client retransmits to everyone, as clients do.
            cluster.submit(&request, &[1, 2]);
        }
        cluster.tick(10);
        if cluster.replicas[1].last_executed() >= SeqNum(1)
            && cluster.replicas[2].last_executed() >= SeqNum(1)
        {
            executed = true;
            break;
        }
    }
    assert!(executed, "the request was never executed after the refusal");
    assert_eq!(cluster.replicas[1].view(), View(1));
    let agreed = cluster.replicas[1].agreed_time_ms();
    assert_eq!(agreed, cluster.replicas[2].agreed_time_ms());
    assert!(agreed <= cluster.wall_ms(1), "{agreed}");
    assert!(prepares
        .borrow()
        .iter()
        .all(|(view, _, _)| *view == View(1)));
    cluster.assert_histories_agree();
}

#[test]
fn a_prepare_whose_time_goes_back_is_refused() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let first = sign_request(client(1), 1, set("a", "1").encode());
    let second = sign_request(client(1), 2, set("a", "2").encode());
    let mut usig = usig_of(0, 3);
    let now = cluster.wall_ms(1);
    let good = forge_prepare_at(&mut usig, View(0), SeqNum(1), vec![first], now);
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(good));
    cluster.deliver_all(1_000);
    let back = forge_prepare_at(&mut usig, View(0), SeqNum(2), vec![second], now - 1);
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(back));
    cluster.deliver_all(1_000);
    for replica in [1, 2] {
        assert_eq!(
            cluster.rejections(replica, "prepare-time-before-previous"),
            1
        );
        assert_eq!(
            cluster.rejections(replica, "prepare-time-ahead-of-clock"),
            0
        );
    }
    // The first batch (two COMMITs and the PREPARE) executed at its own time.
    assert_eq!(cluster.replicas[1].last_executed(), SeqNum(1));
    assert_eq!(cluster.replicas[1].agreed_time_ms(), now);
    assert_eq!(cluster.replicas[2].agreed_time_ms(), now);
}

#[test]
fn a_faulty_primary_may_keep_time_where_it_is_even_if_it_ran_ahead_of_a_backup() {
    // Staying at the previous time is always allowed: otherwise a backup whose clock is behind
    // the previous batch's time by more than the bound could never accept a next batch.
    let mut cluster = Cluster::new(config(3, 1));
    cluster.crash(0);
    let mut usig = usig_of(0, 3);
    let ahead = cluster.wall_ms(1) + 1_500;
    let requests: Vec<_> = (1..=2)
        .map(|number| sign_request(client(1), number, incr("n").encode()))
        .collect();
    let first = forge_prepare_at(
        &mut usig,
        View(0),
        SeqNum(1),
        vec![requests[0].clone()],
        ahead,
    );
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(first));
    cluster.deliver_all(1_000);
    // Replica 2's clock is set back 1 s: `ahead` is now 2.5 s past it, yet equal to the floor.
    cluster.wall_skew_ms[2] = -1_000;
    let second = forge_prepare_at(
        &mut usig,
        View(0),
        SeqNum(2),
        vec![requests[1].clone()],
        ahead,
    );
    broadcast_from(&mut cluster, 0, &ReplicaMessage::Prepare(second));
    cluster.deliver_all(1_000);
    assert_eq!(cluster.rejections(2, "prepare-time-ahead-of-clock"), 0);
    assert_eq!(cluster.replicas[2].last_executed(), SeqNum(2));
    assert_eq!(cluster.replicas[2].agreed_time_ms(), ahead);
}

#[test]
fn after_a_view_change_time_keeps_increasing() {
    let mut cluster = Cluster::new(config(3, 1));
    // The old primary runs 900 ms ahead; the next one 900 ms behind, so its own clock is
    // earlier than the times already agreed when it takes over.
    cluster.wall_skew_ms = vec![900, -900, 0];
    let prepares = record_prepares(&mut cluster);
    // Eight batches: a checkpoint (interval 8) covers them all, so the NEW-VIEW plan is empty
    // and only what the new primary executed tells it where time stands.
    for number in 1..=8 {
        assert!(cluster
            .invoke(client(1), number, &incr("n"), 5_000)
            .is_some());
    }
    cluster.run_for(300);
    let before = cluster.replicas[1].agreed_time_ms();
    assert!(
        before > cluster.wall_ms(1),
        "the old primary's clock is ahead"
    );
    cluster.crash(0);
    for number in 9..=11 {
        assert_eq!(
            cluster.invoke(client(1), number, &incr("n"), 20_000),
            Some(Response::Integer(number as i64))
        );
    }
    assert_eq!(cluster.replicas[1].view(), View(1));
    let recorded = prepares.borrow().clone();
    let old_max = recorded
        .iter()
        .filter(|(view, _, _)| *view == View(0))
        .map(|(_, _, time)| *time)
        .max()
        .unwrap();
    let new_times: Vec<u64> = recorded
        .iter()
        .filter(|(view, _, _)| *view == View(1))
        .map(|(_, _, time)| *time)
        .collect();
    assert!(!new_times.is_empty());
    assert!(
        new_times.iter().all(|time| *time >= old_max),
        "view 1 went back in time: {old_max} then {new_times:?}"
    );
    let after = cluster.replicas[1].agreed_time_ms();
    assert!(after >= before);
    assert_eq!(after, cluster.replicas[2].agreed_time_ms());
    cluster.assert_histories_agree();
}

#[test]
fn state_transfer_carries_the_agreed_clock_and_keys_expire_alike_everywhere() {
    let mut cluster = Cluster::new(config(3, 1));
    cluster.wall_skew_ms = vec![700, 0, -700];
    let expiring = Command::SetWithExpiry {
        key: b"session".to_vec(),
        value: b"open".to_vec(),
        condition: SetCondition::Always,
        get: false,
        expiry: Expiry::InMs(500),
    };
    assert_eq!(
        cluster.invoke(client(1), 1, &expiring, 5_000),
        Some(Response::Ok)
    );
    cluster.isolated[2] = true;
    for number in 2..=30 {
        assert!(cluster
            .invoke(client(1), number, &incr("n"), 5_000)
            .is_some());
    }
    assert_eq!(cluster.replicas[2].last_executed(), SeqNum(1));
    cluster.isolated[2] = false;
    cluster.run_for(2_000);
    assert!(cluster.replicas[2].last_executed() >= SeqNum(24));
    // The fetched state brought the agreed clock with it (it is in the checkpoint digest).
    assert_eq!(
        cluster.invoke(client(1), 31, &get("session"), 10_000),
        Some(Response::Value(None)),
        "expired 500 ms after the agreed time of its SET"
    );
    cluster.run_for(500);
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
    let clocks: Vec<u64> = cluster
        .replicas
        .iter()
        .map(|replica| replica.agreed_time_ms())
        .collect();
    assert!(clocks.iter().all(|clock| *clock == clocks[0]), "{clocks:?}");
    for replica in &cluster.replicas {
        assert_eq!(replica.state_machine().get(b"session"), None);
    }
    for replica in 0..3 {
        assert_eq!(
            cluster.rejections(replica, "prepare-time-ahead-of-clock"),
            0
        );
    }
}
