//! A backup that lost messages catches up: by retransmission (Fetch) when the messages are
//! still kept, by state transfer when they were garbage-collected.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::{config, get, incr, value, Cluster, Fate};
use tessera_kv::Response;
use tessera_types::{ClientId, ReplicaId, SeqNum, View};

#[test]
fn lossy_link_to_a_backup_is_repaired_by_retransmission_without_a_view_change() {
    let mut cluster = Cluster::new(config(3, 1));
    let seen = Rc::new(Cell::new(0u64));
    let counter = seen.clone();
    cluster.filter = Some(Box::new(move |_, to, _| {
        if to != ReplicaId(2) {
            return Fate::Deliver;
        }
        counter.set(counter.get() + 1);
        if counter.get().is_multiple_of(3) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }));
    for number in 1..=12 {
        assert_eq!(
            cluster.invoke(ClientId::new(0, 1), number, &incr("counter"), 5_000),
            Some(Response::Integer(number as i64))
        );
    }
    assert!(seen.get() >= 30, "the filter saw the traffic to replica 2");
    cluster.filter = None;
    cluster.run_for(1_000);
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
    for replica in cluster.live() {
        assert_eq!(replica.view(), View(0), "no view change was needed");
        assert_eq!(replica.last_executed(), SeqNum(12));
    }
}

/// Backup 2 is cut off while more than three checkpoint intervals (interval 8, log size 16)
/// execute, so the messages it missed are garbage-collected; after healing it must catch up by
/// state transfer and keep executing with the others.
#[test]
fn partitioned_backup_catches_up_by_state_transfer() {
    let mut cluster = Cluster::new(config(3, 1));
    assert_eq!(
        cluster.invoke(ClientId::new(0, 1), 1, &incr("counter"), 5_000),
        Some(Response::Integer(1))
    );
    cluster.isolated[2] = true;
    for number in 2..=30 {
        assert_eq!(
            cluster.invoke(ClientId::new(0, 1), number, &incr("counter"), 5_000),
            Some(Response::Integer(number as i64))
        );
    }
    assert!(cluster.replicas[0].stable_checkpoint().seq >= SeqNum(24));
    assert_eq!(cluster.replicas[2].last_executed(), SeqNum(1));
    cluster.isolated[2] = false;
    cluster.run_for(2_000);
    assert!(
        cluster.replicas[2].last_executed() >= SeqNum(24),
        "state transfer brought replica 2 forward: {:?}",
        cluster.replicas[2].status()
    );
    // It now takes part in agreement again: with replica 0 crashed, 1 and 2 must finish requests.
    assert_eq!(
        cluster.invoke(ClientId::new(0, 1), 31, &incr("counter"), 10_000),
        Some(Response::Integer(31))
    );
    cluster.run_for(1_000);
    assert_eq!(
        cluster.rejections(2, "prepare-out-of-sequence"),
        0,
        "after state transfer replica 2 refused the correct primary's next PREPARE: {:?}",
        cluster.replicas[2].rejections()
    );
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
    cluster.crash(0);
    assert_eq!(
        cluster.invoke(ClientId::new(0, 2), 1, &get("counter"), 20_000),
        value("31")
    );
    cluster.assert_all_caught_up();
}
