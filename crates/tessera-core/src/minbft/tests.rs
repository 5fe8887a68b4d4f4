//! Unit tests of rules that are hard to reach through whole replicas.

use super::*;
use crate::minbft::view_change::AnchorCheck;
use tessera_types::{epoch_start_certified_digest, CheckpointCertificate};
use tessera_usig::{HmacUsig, UsigIdentity};

struct NoClients;

impl RequestAuthenticator for NoClients {
    fn verify_signature(&self, _request: &Request) -> bool {
        false
    }
    fn verify_mac(&self, _request: &Request) -> bool {
        false
    }
}

struct AllAnchorsValid;

impl AnchorOracle for AllAnchorsValid {
    fn check_anchor(&self, _sender: ReplicaId, _epoch: u64, _counter: u64) -> AnchorCheck {
        AnchorCheck::Valid
    }
}

fn keys() -> Vec<[u8; 32]> {
    (0..3u8).map(|index| [index + 1; 32]).collect()
}

fn usig(replica: u32) -> HmacUsig {
    HmacUsig::new(
        UsigIdentity {
            replica: ReplicaId(replica),
            epoch: 0,
        },
        keys(),
    )
}

fn verifier<'a>(
    usig: &'a HmacUsig,
    authenticator: &'a NoClients,
    anchors: &'a AllAnchorsValid,
) -> Verifier<'a> {
    Verifier {
        n: 3,
        f: 1,
        quorum: 2,
        usig,
        authenticator,
        genesis_digest: Digest([0; 32]),
        batch_requests_max: 16,
        log_size: 16,
        checkpoint_interval: 8,
        anchors,
        #[cfg(feature = "planted-bugs")]
        planted: PlantedBugs::default(),
    }
}

/// Only the sender and the UI's epoch matter to the epoch rule.
fn view_change(replica: u32, epoch: u64) -> ViewChange {
    ViewChange {
        replica: ReplicaId(replica),
        to_view: View(1),
        checkpoint: CheckpointCertificate {
            seq: SeqNum(0),
            state_digest: Digest([0; 32]),
            checkpoints: Vec::new(),
        },
        log: Vec::new(),
        new_views: Vec::new(),
        ui: Ui {
            epoch,
            counter: 1,
            certificate: Vec::new(),
        },
    }
}

/// A plan starting from a checkpoint at `seq` whose table is `epochs`, re-proposing `entries`.
fn plan(seq: u64, epochs: Vec<EpochInstall>, entries: Vec<PlanEntry>) -> NewViewPlan {
    let checkpoint = Checkpoint {
        replica: ReplicaId(0),
        seq: SeqNum(seq),
        state_digest: Digest([1; 32]),
        view: View(0),
        epochs,
        ui: Ui {
            epoch: 0,
            counter: 1,
            certificate: Vec::new(),
        },
    };
    NewViewPlan {
        checkpoint: CheckpointCertificate {
            seq: SeqNum(seq),
            state_digest: Digest([1; 32]),
            checkpoints: vec![checkpoint],
        },
        entries,
    }
}

fn install(replica: u32, epoch: u64, installed_at: u64) -> EpochInstall {
    EpochInstall {
        replica: ReplicaId(replica),
        epoch,
        installed_at: SeqNum(installed_at),
    }
}

/// Replica 2's USIG moves to its next epoch and certifies the EPOCH-START of it.
fn epoch_start(replica_2: &mut HmacUsig) -> EpochStart {
    let epoch = replica_2.start_epoch().expect("next epoch");
    let ui = replica_2
        .create_ui(&epoch_start_certified_digest(ReplicaId(2), epoch))
        .expect("certifies");
    EpochStart {
        replica: ReplicaId(2),
        epoch,
        ui,
    }
}

fn misfits(plan: &NewViewPlan, view_changes: &[ViewChange]) -> Vec<(u32, &'static str)> {
    let usig = usig(0);
    let anchors = AllAnchorsValid;
    let verifier = verifier(&usig, &NoClients, &anchors);
    let refs: Vec<&ViewChange> = view_changes.iter().collect();
    verifier
        .epoch_misfits(plan, &refs)
        .into_iter()
        .map(|(replica, reason)| (replica.0, reason))
        .collect()
}

#[test]
fn a_view_change_must_be_in_the_epoch_the_new_view_starts_from() {
    // Replica 2 moved to epoch 1 at 5; the plan starts from the checkpoint at 8, after it.
    let plan = plan(8, vec![install(2, 1, 5)], Vec::new());
    let old = [view_change(0, 0), view_change(2, 0)];
    assert_eq!(misfits(&plan, &old), [(2, "new-view-epoch-mismatch")]);
    let new = [view_change(0, 0), view_change(2, 1)];
    assert_eq!(misfits(&plan, &new), []);
}

#[test]
fn a_new_epoch_counts_only_from_the_checkpoint_after_its_install() {
    // Installed at 9: whatever its old epoch touched may reach up to 16.
    let plan = plan(8, vec![install(2, 1, 9)], Vec::new());
    let view_changes = [view_change(0, 0), view_change(2, 1)];
    assert_eq!(
        misfits(&plan, &view_changes),
        [(2, "new-view-epoch-too-recent")]
    );
}

#[test]
fn an_install_in_the_plan_retires_a_kept_back_view_change() {
    // The attack a review found: replica 2 certifies a VIEW-CHANGE in epoch 0, keeps it back,
    // starts epoch 1 and has it installed. Once the INSTALL is in the plan (above the
    // checkpoint), the kept-back VIEW-CHANGE no longer fits, and neither does one of the new
    // epoch (too recent).
    let mut replica_2 = usig(2);
    let start = epoch_start(&mut replica_2);
    let batch = Arc::new(vec![start.to_install_request()]);
    let entry = PlanEntry {
        seq: SeqNum(10),
        digest: batch_digest(&batch),
        batch,
        time_ms: 0,
    };
    let plan = plan(8, Vec::new(), vec![entry]);
    let usig = usig(0);
    let anchors = AllAnchorsValid;
    let table = verifier(&usig, &NoClients, &anchors).plan_epochs(&plan);
    assert_eq!(table.get(&ReplicaId(2)), Some(&install(2, 1, 10)));
    let kept_back = [view_change(0, 0), view_change(2, 0)];
    assert_eq!(misfits(&plan, &kept_back), [(2, "new-view-epoch-mismatch")]);
    let young = [view_change(0, 0), view_change(2, 1)];
    assert_eq!(misfits(&plan, &young), [(2, "new-view-epoch-too-recent")]);
}

#[test]
fn an_install_entry_is_valid_only_as_its_epoch_start_certifies_it() {
    let mut replica_2 = usig(2);
    let start = epoch_start(&mut replica_2);
    let verifier = usig(0);
    let request = start.to_install_request();
    assert!(install_entry(&request, 3, &verifier).is_some());
    // Another epoch than certified, another replica's reserved id, a client's signature.
    let mut wrong_epoch = request.clone();
    wrong_epoch.request_number = 2;
    assert!(install_entry(&wrong_epoch, 3, &verifier).is_none());
    let mut wrong_replica = request.clone();
    wrong_replica.client = tessera_types::install_client(ReplicaId(1));
    assert!(install_entry(&wrong_replica, 3, &verifier).is_none());
    let mut signed = request.clone();
    signed.signature[0] = 1;
    assert!(install_entry(&signed, 3, &verifier).is_none());
    // A UI that is not counter 1 of the epoch it names.
    let later = replica_2
        .create_ui(&epoch_start_certified_digest(ReplicaId(2), start.epoch))
        .expect("certifies");
    let not_first = EpochStart { ui: later, ..start };
    assert!(install_entry(&not_first.to_install_request(), 3, &verifier).is_none());
}
