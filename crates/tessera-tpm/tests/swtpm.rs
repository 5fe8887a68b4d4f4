//! The TPM backend against swtpm processes started here: the shared conformance suite, the
//! two ways to get a second valid UI for one counter value (both must fail to verify), and
//! the counter across a graceful swtpm restart, and epochs across an swtpm kill -9.
//!
//! Needs `swtpm` and `swtpm_ioctl` on PATH (.ci/run installs them).

use std::sync::{Arc, Mutex};
use tempfile::TempDir;
use tessera_tpm::{provision, Swtpm, TpmLocation, TpmUsig, DEFAULT_AK_HANDLE, DEFAULT_NV_INDEX};
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::conformance::{self, CLUSTER_SIZE};
use tessera_usig::{TpmEnrollment, TpmVerifier, Usig, UsigError, UsigIdentity};

fn identity(replica: u32) -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(replica),
        epoch: 0,
    }
}

/// One swtpm per replica, provisioned, with the cluster's current enrolments.
struct Cluster {
    tpms: Vec<Swtpm>,
    _directory: TempDir,
    /// A TPM counter never resets, so a "fresh instance" (what the conformance suite asks the
    /// factory for) is the replica re-enrolled at its current counter value; every verifier
    /// sees the cluster's current enrolments, as a re-enrolled cluster's replicas would.
    registry: Arc<Mutex<Registry>>,
}

/// What the test cluster knows, shared by all its instances.
struct Registry {
    enrollments: Vec<TpmEnrollment>,
    /// Highest raw counter value issued per replica so far.
    highest_raw: Vec<u64>,
}

impl Cluster {
    fn start() -> Cluster {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut tpms = Vec::new();
        let mut enrollments = Vec::new();
        for replica in 0..CLUSTER_SIZE {
            let port = tessera_tpm::swtpm::free_port_pair().expect("ports");
            let swtpm = Swtpm::start(&directory.path().join(format!("tpm{replica}")), port)
                .expect("swtpm starts (apt-get install swtpm swtpm-tools)");
            let enrollment =
                provision(&swtpm.target(), DEFAULT_NV_INDEX, DEFAULT_AK_HANDLE).expect("provision");
            tpms.push(swtpm);
            enrollments.push(enrollment);
        }
        let highest_raw = enrollments
            .iter()
            .map(|enrolled| enrolled.counter_base)
            .collect();
        Cluster {
            tpms,
            _directory: directory,
            registry: Arc::new(Mutex::new(Registry {
                enrollments,
                highest_raw,
            })),
        }
    }

    fn location(&self, replica: u32) -> TpmLocation {
        TpmLocation {
            target: self.tpms[replica as usize].target(),
            ak_handle: DEFAULT_AK_HANDLE,
        }
    }

    fn fresh(&self, replica: ReplicaId) -> Box<dyn Usig> {
        let snapshot = {
            let mut registry = self.registry.lock().expect("lock");
            let index = replica.0 as usize;
            registry.enrollments[index].counter_base = registry.highest_raw[index];
            registry.enrollments.clone()
        };
        let usig = TpmUsig::new(identity(replica.0), self.location(replica.0), snapshot)
            .expect("valid enrolments");
        Box::new(Fresh {
            usig,
            registry: Arc::clone(&self.registry),
        })
    }
}

/// A TpmUsig that records where its counter got to, so the next fresh instance of the same
/// replica is enrolled from there, and verifies against the cluster's current enrolments.
struct Fresh {
    usig: TpmUsig,
    registry: Arc<Mutex<Registry>>,
}

impl Usig for Fresh {
    fn identity(&self) -> UsigIdentity {
        self.usig.identity()
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let ui = self.usig.create_ui(message)?;
        let replica = self.usig.identity().replica.0 as usize;
        let mut registry = self.registry.lock().expect("lock");
        registry.highest_raw[replica] =
            registry.highest_raw[replica].max(self.usig.last_raw_counter());
        Ok(ui)
    }

    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        let epoch = self.usig.start_epoch()?;
        let replica = self.usig.identity().replica.0 as usize;
        let mut registry = self.registry.lock().expect("lock");
        registry.highest_raw[replica] =
            registry.highest_raw[replica].max(self.usig.last_raw_counter());
        Ok(epoch)
    }

    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        let current = self.registry.lock().expect("lock").enrollments.clone();
        TpmVerifier::new(self.usig.identity(), current)?.verify_ui(signer, message, ui)
    }
}

#[test]
fn conformance_suite_passes_on_swtpm() {
    let cluster = Cluster::start();
    let foreign = Cluster::start();
    conformance::assert_conforms(&|replica| cluster.fresh(replica), &|replica| {
        foreign.fresh(replica)
    });
}

fn one_replica() -> (TempDir, Swtpm, TpmEnrollment) {
    let directory = tempfile::tempdir().expect("temp dir");
    let port = tessera_tpm::swtpm::free_port_pair().expect("ports");
    let swtpm = Swtpm::start(&directory.path().join("tpm"), port).expect("swtpm starts");
    let enrollment =
        provision(&swtpm.target(), DEFAULT_NV_INDEX, DEFAULT_AK_HANDLE).expect("provision");
    (directory, swtpm, enrollment)
}

fn solo(swtpm: &Swtpm, enrollment: TpmEnrollment) -> TpmUsig {
    let location = TpmLocation {
        target: swtpm.target(),
        ak_handle: DEFAULT_AK_HANDLE,
    };
    let mut usig = TpmUsig::new(identity(0), location, vec![enrollment]).expect("enrolment");
    usig.connect().expect("AK and index match the enrolment");
    usig
}

fn ak_signature_verifies(enrollment: &TpmEnrollment, ui: &Ui) -> bool {
    use p256::ecdsa::signature::Verifier as _;
    let certificate = &ui.certificate;
    let length = usize::from(u16::from_be_bytes([certificate[0], certificate[1]]));
    let attestation = &certificate[2..2 + length];
    let signature = p256::ecdsa::Signature::from_slice(&certificate[2 + length..]).expect("r, s");
    let mut sec1 = vec![0x04];
    sec1.extend_from_slice(&enrollment.ak_public);
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .expect("AK")
        .verify(attestation, &signature)
        .is_ok()
}

#[test]
fn re_signing_the_same_audit_chain_does_not_verify() {
    let (_directory, swtpm, enrollment) = one_replica();
    let mut usig = solo(&swtpm, enrollment);
    let first = Digest([1; 32]);
    let second = Digest([2; 32]);
    let ui = usig.create_ui(&first).expect("create");
    assert_eq!(usig.verify_ui(ReplicaId(0), &first, &ui), Ok(()));
    // 136-byte TPMS_ATTEST, its u16 length, r and s (docs/OPERATIONS.md quotes this size).
    assert_eq!(ui.certificate.len(), 202);
    let cheat = usig
        .resign_current_chain(&second)
        .expect("the TPM signs it");
    assert_eq!(cheat.counter, ui.counter);
    // A genuine AK signature over a genuine chain for this counter value...
    assert!(ak_signature_verifies(&enrollment, &cheat));
    // ...that the verifier refuses, because the TPM reported exclusiveSession = NO.
    match usig.verify_ui(ReplicaId(0), &second, &cheat) {
        Err(UsigError::Invalid { reason, .. }) => assert!(reason.contains("exclusive"), "{reason}"),
        other => panic!("re-signed chain gave {other:?}"),
    }
}

#[test]
fn nv_certify_of_a_counter_value_does_not_verify() {
    let (_directory, swtpm, enrollment) = one_replica();
    let mut usig = solo(&swtpm, enrollment);
    let ui = usig.create_ui(&Digest([1; 32])).expect("create");
    // The broken construction: certify the current value for two different messages.
    let one = usig
        .certify_current_value(&Digest([3; 32]))
        .expect("certify");
    let two = usig
        .certify_current_value(&Digest([4; 32]))
        .expect("certify");
    assert_eq!((one.counter, two.counter), (ui.counter, ui.counter));
    assert!(ak_signature_verifies(&enrollment, &one) && ak_signature_verifies(&enrollment, &two));
    for (cheat, message) in [(one, Digest([3; 32])), (two, Digest([4; 32]))] {
        match usig.verify_ui(ReplicaId(0), &message, &cheat) {
            Err(UsigError::Invalid { reason, .. }) => {
                assert!(reason.contains("NV certification"), "{reason}")
            }
            other => panic!("NV_Certify attestation gave {other:?}"),
        }
    }
    // The session survives the foreign commands: the next UI still verifies.
    let next = usig.create_ui(&Digest([5; 32])).expect("create");
    assert_eq!(next.counter, ui.counter + 1);
    assert_eq!(
        usig.verify_ui(ReplicaId(0), &Digest([5; 32]), &next),
        Ok(())
    );
}

#[test]
fn counter_survives_a_graceful_swtpm_restart_exactly() {
    let (directory, swtpm, enrollment) = one_replica();
    let port = swtpm.port();
    let mut usig = solo(&swtpm, enrollment);
    let mut last = 0;
    for _ in 0..5 {
        last = usig.create_ui(&Digest([1; 32])).expect("create").counter;
    }
    usig.disconnect();
    swtpm.stop().expect("graceful stop");
    let swtpm = Swtpm::start(&directory.path().join("tpm"), port).expect("restart");
    // Re-provisioning is idempotent: same AK, same index, base = the value reached.
    let again =
        provision(&swtpm.target(), DEFAULT_NV_INDEX, DEFAULT_AK_HANDLE).expect("reprovision");
    assert_eq!(again.ak_public, enrollment.ak_public);
    assert_eq!(again.counter_base, enrollment.counter_base + last);
    let ui = usig
        .create_ui(&Digest([2; 32]))
        .expect("create after restart");
    assert_eq!(
        ui.counter,
        last + 1,
        "graceful restart must keep the counter exactly"
    );
    assert_eq!(usig.verify_ui(ReplicaId(0), &Digest([2; 32]), &ui), Ok(()));
}

#[test]
fn counter_never_goes_back_after_swtpm_is_killed() {
    let (directory, swtpm, enrollment) = one_replica();
    let port = swtpm.port();
    let mut usig = solo(&swtpm, enrollment);
    let mut last = 0;
    for _ in 0..20 {
        last = usig.create_ui(&Digest([1; 32])).expect("create").counter;
    }
    usig.disconnect();
    drop(swtpm); // SIGKILL
    let swtpm = Swtpm::start(&directory.path().join("tpm"), port).expect("restart");
    let ui = usig.create_ui(&Digest([2; 32])).expect("create after kill");
    assert!(
        ui.counter > last,
        "counter went back from {last} to {}",
        ui.counter
    );
    assert_eq!(usig.verify_ui(ReplicaId(0), &Digest([2; 32]), &ui), Ok(()));
    drop(swtpm);
}

#[test]
fn a_tpm_that_is_not_the_enrolled_one_is_refused() {
    let (_directory, swtpm, enrollment) = one_replica();
    let (_other_directory, other, _) = one_replica();
    let location = TpmLocation {
        target: other.target(),
        ak_handle: DEFAULT_AK_HANDLE,
    };
    let mut usig = TpmUsig::new(identity(0), location, vec![enrollment]).expect("enrolment");
    match usig.connect() {
        Err(UsigError::Unavailable(text)) => {
            assert!(text.contains("not the one enrolled"), "{text}")
        }
        other => panic!("foreign TPM gave {other:?}"),
    }
    drop(swtpm);
}

#[test]
fn interrupted_chains_are_retried_a_bounded_number_of_times() {
    let (_directory, swtpm, enrollment) = one_replica();
    let mut usig = solo(&swtpm, enrollment);
    let first = usig.create_ui(&Digest([1; 32])).expect("create");
    usig.interfere_with_next_attempts(3);
    let ui = usig
        .create_ui(&Digest([2; 32]))
        .expect("succeeds on the fourth attempt");
    // Each interrupted attempt burnt one counter value: the gap the protocol must accept.
    assert_eq!(ui.counter, first.counter + 4);
    assert_eq!(usig.verify_ui(ReplicaId(0), &Digest([2; 32]), &ui), Ok(()));
    usig.interfere_with_next_attempts(tessera_tpm::usig::ATTEMPTS_MAX);
    match usig.create_ui(&Digest([3; 32])) {
        Err(UsigError::Unavailable(text)) => assert!(text.contains("attempts in a row"), "{text}"),
        other => panic!("endless interference gave {other:?}"),
    }
    let after = usig
        .create_ui(&Digest([4; 32]))
        .expect("works again once left alone");
    assert_eq!(
        after.counter,
        ui.counter + u64::from(tessera_tpm::usig::ATTEMPTS_MAX) + 1
    );
}

/// The raw NV counter value a UI proves, recomputed from the enrolment (the verifier checks the
/// session digest against exactly this value).
fn raw(enrollment: &TpmEnrollment, ui: &Ui) -> u64 {
    tessera_usig::tpm::raw_counter(enrollment, ui.epoch, ui.counter).expect("in range")
}

#[test]
fn start_epoch_after_swtpm_kill_9_counts_from_1_above_every_earlier_raw_value() {
    let (directory, swtpm, enrollment) = one_replica();
    let port = swtpm.port();
    let mut usig = solo(&swtpm, enrollment);
    let mut earlier = Vec::new();
    for index in 0..10u8 {
        let message = Digest([index; 32]);
        earlier.push((message, usig.create_ui(&message).expect("create")));
    }
    // An epoch switch before the kill too: epoch 0 to e1, a few UIs in e1.
    let first_epoch = usig.start_epoch().expect("start epoch");
    assert!(first_epoch > 0);
    for index in 10..13u8 {
        let message = Digest([index; 32]);
        let ui = usig.create_ui(&message).expect("create");
        assert_eq!(ui.epoch, first_epoch);
        earlier.push((message, ui));
    }
    usig.disconnect();
    drop(usig);
    drop(swtpm); // SIGKILL
    let swtpm = Swtpm::start(&directory.path().join("tpm"), port).expect("restart");
    // The replica restarts too: a new instance in the last epoch it knows of.
    let location = TpmLocation {
        target: swtpm.target(),
        ak_handle: DEFAULT_AK_HANDLE,
    };
    let restarted = UsigIdentity {
        replica: ReplicaId(0),
        epoch: first_epoch,
    };
    let mut usig = TpmUsig::new(restarted, location, vec![enrollment]).expect("enrolment");
    usig.connect().expect("same TPM");
    let gap = usig.pending_gap().expect("read the counter");
    assert!(
        gap >= 3,
        "the TPM kept counting past the new instance's start ({gap})"
    );
    let epoch = usig.start_epoch().expect("start epoch after the kill");
    assert!(
        epoch > first_epoch,
        "epoch went from {first_epoch} to {epoch}"
    );
    assert_eq!(usig.identity().epoch, epoch);
    assert_eq!(usig.pending_gap().expect("read"), 0);
    let highest_earlier = earlier
        .iter()
        .map(|(_, ui)| raw(&enrollment, ui))
        .max()
        .expect("some UIs");
    let verifier = TpmVerifier::new(identity(1), vec![enrollment, enrollment]).expect("verifier");
    let mut raws: std::collections::HashSet<u64> =
        earlier.iter().map(|(_, ui)| raw(&enrollment, ui)).collect();
    for (index, expected) in (20..25u8).zip(1u64..) {
        let message = Digest([index; 32]);
        let ui = usig.create_ui(&message).expect("create in the new epoch");
        assert_eq!((ui.epoch, ui.counter), (epoch, expected));
        let value = raw(&enrollment, &ui);
        assert!(
            value > highest_earlier,
            "raw {value} not above {highest_earlier}"
        );
        assert!(raws.insert(value), "raw value {value} used twice");
        assert_eq!(verifier.verify_ui(ReplicaId(0), &message, &ui), Ok(()));
        // Moved back to the old epoch, the same certificate does not verify.
        let moved = Ui {
            epoch: first_epoch,
            ..ui.clone()
        };
        assert!(verifier.verify_ui(ReplicaId(0), &message, &moved).is_err());
    }
    // The old epochs' UIs still verify as what they are.
    for (message, ui) in &earlier {
        assert_eq!(verifier.verify_ui(ReplicaId(0), message, ui), Ok(()));
    }
    drop(swtpm);
}
