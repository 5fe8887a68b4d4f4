//! USIG epochs (docs/PROTOCOL.md §8): a replica that lost its log comes back in a new epoch,
//! the group orders its INSTALL, and only then (and, for view changes, only once the
//! checkpoint after the INSTALL is stable) does it count again.

mod common;

use common::{config, set, Cluster};
use tessera_kv::Response;
use tessera_types::{ClientId, ReplicaId};

fn client(session: u32) -> ClientId {
    ClientId::new(1, session)
}

/// Runs `count` SETs from one session, each to completion.
fn write(cluster: &mut Cluster, session: u32, first: u64, count: u64) {
    for number in first..first + count {
        let key = format!("k{session}-{number}");
        let result = cluster.invoke(client(session), number, &set(&key, "v"), 10_000);
        assert_eq!(result, Some(Response::Ok), "SET {key} completes");
    }
}

#[test]
fn a_replica_that_lost_its_log_rejoins_in_a_new_epoch_and_counts_again() {
    let mut cluster = Cluster::new(config(3, 1));
    write(&mut cluster, 1, 1, 20);
    let epoch = cluster.restart_without_log(2);
    assert_eq!(epoch, 1, "the USIG moved from epoch 0 to 1");
    // The group orders replica 2's INSTALL like a request, then replica 2 fetches the state.
    write(&mut cluster, 1, 21, 30);
    cluster.run_for(3_000);
    for replica in 0..3 {
        let installed = cluster.replicas[replica].installed_epoch(ReplicaId(2));
        assert_eq!(installed.epoch, 1, "replica {replica} installed epoch 1");
        assert!(installed.installed_at.0 > 20, "installed after the restart");
    }
    cluster.assert_all_caught_up();
    cluster.assert_histories_agree();
    // Its new-epoch votes count: with replica 1 down, replicas 0 and 2 are a quorum.
    cluster.crash(1);
    write(&mut cluster, 1, 51, 10);
    // And its VIEW-CHANGE counts once the checkpoint after the INSTALL is stable: with the
    // primary down, replicas 1 and 2 form the next view.
    cluster.crashed[1] = false;
    cluster.run_for(2_000);
    cluster.crash(0);
    write(&mut cluster, 2, 1, 10);
    assert!(cluster.replicas[1].view().0 >= 1, "the view changed");
    cluster.assert_histories_agree();
}

/// A replica restarted from an older snapshot of itself (a salvaged log) lacks what it had
/// acknowledged before: its peers dropped those messages of their own streams on its
/// acknowledgement. The primary must still be able to give it its stream since the checkpoint
/// before the stable one, or, with the third replica down, the group could never finish a
/// request again: the restarted replica's COMMITs are needed, and it cannot process the
/// primary's stream past the gap.
#[test]
fn a_replica_restarted_from_an_older_snapshot_catches_up_from_the_primary_alone() {
    let mut cluster = Cluster::new(config(3, 1));
    write(&mut cluster, 1, 1, 4);
    cluster.run_for(500);
    assert!(cluster.replicas[2].can_snapshot());
    let older = cluster.replicas[2].snapshot();
    let executed_then = cluster.replicas[2].last_executed();
    // Everything after it is processed and acknowledged by every replica.
    write(&mut cluster, 1, 5, 8);
    cluster.run_for(1_000);
    assert!(cluster.replicas[0].stable_checkpoint().seq > executed_then);
    // Replica 1 will not help replica 2 catch up (its store holds the primary's messages too):
    // only the primary can.
    cluster.filter = Some(Box::new(|from, to, message| {
        let helps = from == ReplicaId(1)
            && to == ReplicaId(2)
            && !matches!(
                message,
                tessera_types::ReplicaMessage::Heartbeat(_)
                    | tessera_types::ReplicaMessage::EpochStart(_)
            );
        if helps {
            common::Fate::Drop
        } else {
            common::Fate::Deliver
        }
    }));
    let epoch = cluster.restart_from_snapshot_in_new_epoch(2, &older);
    assert!(epoch >= 1);
    // The group orders the INSTALL (replicas 0 and 1), then replica 1 goes down.
    cluster.run_for(1_000);
    for replica in 0..2 {
        assert_eq!(
            cluster.replicas[replica]
                .installed_epoch(ReplicaId(2))
                .epoch,
            epoch,
            "replica {replica} installed the new epoch"
        );
    }
    cluster.crash(1);
    write(&mut cluster, 1, 13, 6);
    cluster.assert_histories_agree();
}

#[test]
fn an_old_epoch_message_is_not_processed_after_the_install() {
    let mut cluster = Cluster::new(config(3, 1));
    write(&mut cluster, 1, 1, 5);
    cluster.restart_without_log(2);
    write(&mut cluster, 1, 6, 20);
    cluster.run_for(2_000);
    assert_eq!(cluster.replicas[0].installed_epoch(ReplicaId(2)).epoch, 1);
    // Replica 2's epoch-0 USIG certifies a CHECKPOINT: peers drop it as retired.
    let mut old = common::usig_of(2, 3);
    let checkpoint = cluster.replicas[0].stable_checkpoint().clone();
    let digest = tessera_types::checkpoint_certified_digest(
        ReplicaId(2),
        checkpoint.seq,
        &checkpoint.state_digest,
        tessera_types::View(0),
        &[],
    );
    let ui = tessera_usig::Usig::create_ui(&mut old, &digest).expect("certifies");
    let before = cluster.rejections(0, "message-from-retired-epoch");
    cluster.inject(
        2,
        0,
        tessera_types::ReplicaMessage::Checkpoint(tessera_types::Checkpoint {
            replica: ReplicaId(2),
            seq: checkpoint.seq,
            state_digest: checkpoint.state_digest,
            view: tessera_types::View(0),
            epochs: Vec::new(),
            ui,
        }),
    );
    cluster.deliver_all(1_000);
    assert_eq!(
        cluster.rejections(0, "message-from-retired-epoch"),
        before + 1
    );
}

#[test]
fn a_view_change_waits_for_the_checkpoint_after_the_install() {
    let mut cluster = Cluster::new(config(3, 1));
    write(&mut cluster, 1, 1, 9);
    cluster.restart_without_log(2);
    // One write orders the INSTALL (at 10 or 11); the checkpoint after it (16) is not reached.
    write(&mut cluster, 1, 10, 1);
    cluster.run_for(500);
    let installed = cluster.replicas[1].installed_epoch(ReplicaId(2));
    assert_eq!(installed.epoch, 1);
    assert!(cluster.replicas[1].stable_checkpoint().seq.0 < 16);
    // The primary dies: replica 2's VIEW-CHANGE cannot count yet, so replicas 1 and 2 cannot
    // form view 1 (n = 2f + 1 with one replica down and one restarting: over the bound).
    cluster.crash(0);
    let stalled = cluster.invoke(client(2), 1, &set("x", "1"), 3_000);
    assert_eq!(
        stalled, None,
        "no view can start without replica 2's history"
    );
    assert!(
        cluster.rejections(1, "new-view-epoch-too-recent") > 0,
        "the new primary left replica 2's VIEW-CHANGE out"
    );
    // The old primary comes back: the group goes on and the request completes.
    cluster.crashed[0] = false;
    let done = cluster.invoke(client(2), 1, &set("x", "1"), 20_000);
    assert_eq!(done, Some(Response::Ok));
    cluster.assert_histories_agree();
}

/// A USIG that burns one counter value when told to, as a `usigd` daemon or a TPM may after
/// its own restart (a durable counter can jump forward).
struct SkippingUsig {
    inner: tessera_usig::HmacUsig,
    burn: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tessera_usig::Usig for SkippingUsig {
    fn identity(&self) -> tessera_usig::UsigIdentity {
        self.inner.identity()
    }
    fn create_ui(
        &mut self,
        message: &tessera_types::Digest,
    ) -> Result<tessera_types::Ui, tessera_usig::UsigError> {
        if self.burn.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.inner.create_ui(message)?; // issued, never sent
        }
        self.inner.create_ui(message)
    }
    fn start_epoch(&mut self) -> Result<u64, tessera_usig::UsigError> {
        self.inner.start_epoch()
    }
    fn start_epoch_at_least(&mut self, at_least: u64) -> Result<u64, tessera_usig::UsigError> {
        self.inner.start_epoch_at_least(at_least)
    }
    fn verify_ui(
        &self,
        signer: ReplicaId,
        message: &tessera_types::Digest,
        ui: &tessera_types::Ui,
    ) -> Result<(), tessera_usig::UsigError> {
        self.inner.verify_ui(signer, message, ui)
    }
}

#[test]
fn a_usig_that_skips_values_moves_its_replica_to_a_new_epoch() {
    let burn = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let usig = SkippingUsig {
        inner: common::usig_of(2, 3),
        burn: burn.clone(),
    };
    let mut cluster = Cluster::with_usig(config(3, 1), Some((2, Box::new(usig))));
    write(&mut cluster, 1, 1, 10);
    burn.store(true, std::sync::atomic::Ordering::SeqCst);
    write(&mut cluster, 1, 11, 20);
    cluster.run_for(2_000);
    assert!(
        cluster.rejections(2, "own-usig-counter-gap") > 0,
        "the skip was seen"
    );
    assert_eq!(cluster.replicas[2].epoch(), 1, "replica 2 moved to epoch 1");
    for replica in 0..3 {
        let installed = cluster.replicas[replica].installed_epoch(ReplicaId(2));
        assert_eq!(installed.epoch, 1, "replica {replica} installed it");
    }
    // Without a new epoch peers would wait for the burned value for ever; now replica 2's
    // votes count: with replica 1 down, replicas 0 and 2 are a quorum.
    cluster.crash(1);
    write(&mut cluster, 1, 31, 10);
    cluster.assert_histories_agree();
}
