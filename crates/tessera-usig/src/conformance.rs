//! The conformance suite every USIG backend must pass (compiled always, so other crates' tests
//! can run it against their backends, e.g. `usigd` or the TPM).
//!
//! The suite drives a 3-replica cluster through a [`Factory`]: each call returns a *fresh*
//! instance (nothing issued yet, epoch 0) for the given replica, and all instances from one
//! factory share verification material. The wrong-key check also needs a *foreign* factory:
//! the same cluster shape with different key material.
//!
//! The epoch checks call [`Usig::start_epoch`] on a factory's instance; a backend whose factory
//! shares a counter between instances (a TPM) must give each call its own store or TPM, so one
//! check's epoch switch does not leak into the next one.
//!
//! Each check is a function returning the first violation it finds; [`run_all`] runs them all
//! and [`assert_conforms`] panics with every violation listed. A backend that panics instead of
//! returning an error on bad input fails the check that fed it that input.

use crate::{Usig, UsigError};
use std::collections::HashSet;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tessera_crypto::DigestBuilder;
use tessera_types::{Digest, ReplicaId, Ui};

/// Builds a fresh USIG instance for a replica of the 3-replica test cluster.
pub type Factory<'a> = &'a dyn Fn(ReplicaId) -> Box<dyn Usig>;

/// Replicas in the test cluster.
pub const CLUSTER_SIZE: u32 = 3;

/// How many UIs [`check_uniqueness`] creates.
pub const UNIQUENESS_CALLS: u64 = 1_000;

/// A violation of the USIG contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConformanceError {
    /// Which check found it.
    pub check: &'static str,
    /// What was observed, with the values involved.
    pub detail: String,
}

impl fmt::Display for ConformanceError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.check, self.detail)
    }
}

type Outcome = Result<(), ConformanceError>;

fn fail(check: &'static str, detail: String) -> Outcome {
    Err(ConformanceError { check, detail })
}

fn replicas() -> impl Iterator<Item = ReplicaId> {
    (0..CLUSTER_SIZE).map(ReplicaId)
}

/// A distinct message per (label, index), so no check confuses one UI's message with another's.
pub fn message(label: &str, index: u64) -> Digest {
    let mut builder = DigestBuilder::new("tessera.usig.conformance.v1");
    builder.bytes(label.as_bytes()).u64(index);
    builder.finish()
}

fn start_epoch(check: &'static str, usig: &mut dyn Usig) -> Result<u64, ConformanceError> {
    usig.start_epoch().map_err(|error| ConformanceError {
        check,
        detail: format!(
            "start_epoch by {:?} failed: {error}",
            usig.identity().replica
        ),
    })
}

fn create(
    check: &'static str,
    usig: &mut dyn Usig,
    message: &Digest,
) -> Result<Ui, ConformanceError> {
    usig.create_ui(message).map_err(|error| ConformanceError {
        check,
        detail: format!("create_ui by {:?} failed: {error}", usig.identity().replica),
    })
}

/// Runs `verify_ui`, turning a panic into a violation.
fn verify(
    check: &'static str,
    verifier: &dyn Usig,
    signer: ReplicaId,
    message: &Digest,
    ui: &Ui,
) -> Result<Result<(), UsigError>, ConformanceError> {
    catch_unwind(AssertUnwindSafe(|| verifier.verify_ui(signer, message, ui))).map_err(|_| {
        ConformanceError {
            check,
            detail: format!(
                "verify_ui panicked at {:?} (signer {signer:?}, epoch {}, counter {}, \
                 certificate {} bytes)",
                verifier.identity().replica,
                ui.epoch,
                ui.counter,
                ui.certificate.len()
            ),
        }
    })
}

fn expect_accept(
    check: &'static str,
    verifier: &dyn Usig,
    signer: ReplicaId,
    message: &Digest,
    ui: &Ui,
) -> Outcome {
    match verify(check, verifier, signer, message, ui)? {
        Ok(()) => Ok(()),
        Err(error) => fail(
            check,
            format!(
                "{:?} rejected a genuine UI from {signer:?} (epoch {}, counter {}): {error}",
                verifier.identity().replica,
                ui.epoch,
                ui.counter
            ),
        ),
    }
}

fn expect_reject(
    check: &'static str,
    what: &str,
    verifier: &dyn Usig,
    signer: ReplicaId,
    message: &Digest,
    ui: &Ui,
) -> Outcome {
    match verify(check, verifier, signer, message, ui)? {
        Err(_) => Ok(()),
        Ok(()) => fail(
            check,
            format!(
                "{:?} accepted {what} (claimed signer {signer:?}, epoch {}, counter {})",
                verifier.identity().replica,
                ui.epoch,
                ui.counter
            ),
        ),
    }
}

/// Each instance reports the identity it was built for, at epoch 0.
pub fn check_identity(factory: Factory) -> Outcome {
    for replica in replicas() {
        let identity = factory(replica).identity();
        if identity.replica != replica || identity.epoch != 0 {
            return fail(
                "identity",
                format!("factory({replica:?}) reports {identity:?}"),
            );
        }
    }
    Ok(())
}

/// [`UNIQUENESS_CALLS`] `create_ui` calls (half of them over one repeated message) never
/// return the same counter twice.
pub fn check_uniqueness(factory: Factory) -> Outcome {
    const CHECK: &str = "uniqueness";
    let mut usig = factory(ReplicaId(0));
    let repeated = message(CHECK, 0);
    let mut seen = HashSet::new();
    for index in 0..UNIQUENESS_CALLS {
        let distinct = message(CHECK, index);
        let target = if index % 2 == 0 { &repeated } else { &distinct };
        let ui = create(CHECK, usig.as_mut(), target)?;
        if !seen.insert(ui.counter) {
            return fail(
                CHECK,
                format!("counter {} returned twice (call {index})", ui.counter),
            );
        }
    }
    Ok(())
}

/// Counters start at 1 and each is exactly the previous plus one, for every replica.
pub fn check_sequential(factory: Factory) -> Outcome {
    const CHECK: &str = "sequential";
    for replica in replicas() {
        let mut usig = factory(replica);
        for expected in 1..=100u64 {
            let ui = create(CHECK, usig.as_mut(), &message(CHECK, expected))?;
            if ui.counter != expected {
                return fail(
                    CHECK,
                    format!(
                        "{replica:?} call {expected} returned counter {}",
                        ui.counter
                    ),
                );
            }
        }
    }
    Ok(())
}

/// A UI verifies for its own message and signer at every instance, the creator included,
/// and keeps verifying after the creator has issued more.
pub fn check_verifies_everywhere(factory: Factory) -> Outcome {
    const CHECK: &str = "verifies everywhere";
    let mut cluster: Vec<Box<dyn Usig>> = replicas().map(factory).collect();
    let mut issued = Vec::new();
    for round in 0..3u64 {
        for replica in replicas() {
            let content = message(CHECK, round * 10 + u64::from(replica.0));
            let ui = create(CHECK, cluster[replica.0 as usize].as_mut(), &content)?;
            issued.push((replica, content, ui));
        }
    }
    for (signer, content, ui) in &issued {
        for verifier in &cluster {
            expect_accept(CHECK, verifier.as_ref(), *signer, content, ui)?;
        }
    }
    Ok(())
}

/// A UI does not verify for any other message.
pub fn check_rejects_wrong_message(factory: Factory) -> Outcome {
    const CHECK: &str = "rejects wrong message";
    let mut signer = factory(ReplicaId(0));
    let verifier = factory(ReplicaId(1));
    let ui = create(CHECK, signer.as_mut(), &message(CHECK, 1))?;
    for other in [message(CHECK, 2), Digest::ZERO, message("other", 1)] {
        expect_reject(
            CHECK,
            "a UI for another message",
            verifier.as_ref(),
            ReplicaId(0),
            &other,
            &ui,
        )?;
    }
    Ok(())
}

/// The same certificate with counter ± 1 (or 0, or u64::MAX) does not verify.
pub fn check_rejects_wrong_counter(factory: Factory) -> Outcome {
    const CHECK: &str = "rejects wrong counter";
    let mut signer = factory(ReplicaId(0));
    let verifier = factory(ReplicaId(1));
    let content = message(CHECK, 0);
    create(CHECK, signer.as_mut(), &message(CHECK, 99))?;
    let ui = create(CHECK, signer.as_mut(), &content)?;
    for counter in [
        ui.counter.wrapping_sub(1),
        ui.counter.wrapping_add(1),
        0,
        u64::MAX,
    ] {
        let moved = Ui {
            epoch: ui.epoch,
            counter,
            certificate: ui.certificate.clone(),
        };
        expect_reject(
            CHECK,
            "a certificate moved to another counter",
            verifier.as_ref(),
            ReplicaId(0),
            &content,
            &moved,
        )?;
    }
    Ok(())
}

/// A UI created by one replica does not verify as any other replica's, nor as an unknown
/// replica's (which must be `UnknownSigner`).
pub fn check_rejects_wrong_identity(factory: Factory) -> Outcome {
    const CHECK: &str = "rejects wrong identity";
    let mut creator = factory(ReplicaId(1));
    let content = message(CHECK, 0);
    let ui = create(CHECK, creator.as_mut(), &content)?;
    let cluster: Vec<Box<dyn Usig>> = replicas().map(factory).collect();
    for verifier in &cluster {
        for claimed in [ReplicaId(0), ReplicaId(2)] {
            expect_reject(
                CHECK,
                "replica 1's UI",
                verifier.as_ref(),
                claimed,
                &content,
                &ui,
            )?;
        }
        for unknown in [ReplicaId(CLUSTER_SIZE), ReplicaId(u32::MAX)] {
            match verify(CHECK, verifier.as_ref(), unknown, &content, &ui)? {
                Err(UsigError::UnknownSigner(reported)) if reported == unknown => {}
                other => {
                    return fail(
                        CHECK,
                        format!("claimed signer {unknown:?} gave {other:?}, want UnknownSigner"),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Instances built with different key material reject each other's UIs, both ways.
pub fn check_rejects_wrong_key(factory: Factory, foreign: Factory) -> Outcome {
    const CHECK: &str = "rejects wrong key";
    let content = message(CHECK, 0);
    for signer in replicas() {
        let ours = create(CHECK, factory(signer).as_mut(), &content)?;
        let theirs = create(CHECK, foreign(signer).as_mut(), &content)?;
        for verifier in replicas() {
            expect_reject(
                CHECK,
                "a UI made with foreign keys",
                factory(verifier).as_ref(),
                signer,
                &content,
                &theirs,
            )?;
            expect_reject(
                CHECK,
                "a UI made with other keys",
                foreign(verifier).as_ref(),
                signer,
                &content,
                &ours,
            )?;
        }
    }
    Ok(())
}

/// Malformed certificates (empty, truncated, extended, bit-flipped, oversized) are rejected
/// without panicking.
pub fn check_rejects_malformed_certificate(factory: Factory) -> Outcome {
    const CHECK: &str = "rejects malformed certificate";
    let mut signer = factory(ReplicaId(0));
    let verifier = factory(ReplicaId(2));
    let content = message(CHECK, 0);
    let ui = create(CHECK, signer.as_mut(), &content)?;
    let genuine = &ui.certificate;
    let mut candidates: Vec<(&str, Vec<u8>)> = vec![
        ("an empty certificate", Vec::new()),
        ("a one-byte certificate", vec![0]),
        ("an oversized (1 MiB) certificate", vec![0xAB; 1 << 20]),
    ];
    if !genuine.is_empty() {
        candidates.push((
            "a truncated certificate",
            genuine[..genuine.len() - 1].to_vec(),
        ));
        let mut extended = genuine.clone();
        extended.push(0);
        candidates.push(("an extended certificate", extended));
        for position in [0, genuine.len() / 2, genuine.len() - 1] {
            let mut flipped = genuine.clone();
            flipped[position] ^= 0x01;
            candidates.push(("a bit-flipped certificate", flipped));
        }
        candidates.push(("an all-zero certificate", vec![0; genuine.len()]));
    }
    for (what, certificate) in candidates {
        let forged = Ui {
            epoch: ui.epoch,
            counter: ui.counter,
            certificate,
        };
        expect_reject(
            CHECK,
            what,
            verifier.as_ref(),
            ReplicaId(0),
            &content,
            &forged,
        )?;
    }
    expect_accept(CHECK, verifier.as_ref(), ReplicaId(0), &content, &ui)
}

/// The same certificate with its epoch changed (± 1, 0 after a switch, u64::MAX) does not
/// verify: the certificate binds the epoch, so a UI cannot be moved to another epoch.
pub fn check_rejects_wrong_epoch(factory: Factory) -> Outcome {
    const CHECK: &str = "rejects wrong epoch";
    let verifier = factory(ReplicaId(1));
    let mut signer = factory(ReplicaId(0));
    let content = message(CHECK, 0);
    let first = create(CHECK, signer.as_mut(), &content)?;
    start_epoch(CHECK, signer.as_mut())?;
    let second = create(CHECK, signer.as_mut(), &content)?;
    for ui in [&first, &second] {
        expect_accept(CHECK, verifier.as_ref(), ReplicaId(0), &content, ui)?;
        let mut epochs = vec![ui.epoch.wrapping_add(1), u64::MAX, 0];
        if ui.epoch > 0 {
            epochs.push(ui.epoch - 1);
        }
        for epoch in epochs.into_iter().filter(|epoch| *epoch != ui.epoch) {
            let moved = Ui {
                epoch,
                counter: ui.counter,
                certificate: ui.certificate.clone(),
            };
            expect_reject(
                CHECK,
                "a certificate moved to another epoch",
                verifier.as_ref(),
                ReplicaId(0),
                &content,
                &moved,
            )?;
        }
    }
    Ok(())
}

/// After `start_epoch` the instance reports the new, greater epoch and issues UIs only in it,
/// from counter 1 on; they verify everywhere, the old epoch's UIs still verify as what they
/// are, and no (epoch, counter) pair is issued twice across the switch.
pub fn check_start_epoch(factory: Factory) -> Outcome {
    const CHECK: &str = "start epoch";
    let mut signer = factory(ReplicaId(2));
    let cluster: Vec<Box<dyn Usig>> = replicas().map(factory).collect();
    let old_epoch = signer.identity().epoch;
    let mut issued = Vec::new();
    for index in 0..5u64 {
        let content = message(CHECK, index);
        let ui = create(CHECK, signer.as_mut(), &content)?;
        issued.push((content, ui));
    }
    let new_epoch = start_epoch(CHECK, signer.as_mut())?;
    if new_epoch <= old_epoch || signer.identity().epoch != new_epoch {
        return fail(
            CHECK,
            format!(
                "start_epoch from {old_epoch} returned {new_epoch}, identity reports {:?}",
                signer.identity()
            ),
        );
    }
    for index in 0..5u64 {
        let content = message(CHECK, 100 + index);
        let ui = create(CHECK, signer.as_mut(), &content)?;
        if ui.epoch != new_epoch || ui.counter != index + 1 {
            return fail(
                CHECK,
                format!(
                    "call {index} after switching to epoch {new_epoch} returned epoch {} \
                     counter {}",
                    ui.epoch, ui.counter
                ),
            );
        }
        issued.push((content, ui));
    }
    let mut seen = HashSet::new();
    for (content, ui) in &issued {
        if !seen.insert((ui.epoch, ui.counter)) {
            return fail(
                CHECK,
                format!("(epoch {}, counter {}) issued twice", ui.epoch, ui.counter),
            );
        }
        for verifier in &cluster {
            expect_accept(CHECK, verifier.as_ref(), ReplicaId(2), content, ui)?;
        }
        expect_accept(CHECK, signer.as_ref(), ReplicaId(2), content, ui)?;
    }
    Ok(())
}

/// Repeated `start_epoch` calls, with and without UIs in between, return strictly increasing
/// epochs, and each epoch's first UI has counter 1 and verifies.
pub fn check_epochs_increase(factory: Factory) -> Outcome {
    const CHECK: &str = "epochs increase";
    let mut signer = factory(ReplicaId(0));
    let verifier = factory(ReplicaId(1));
    let mut previous = signer.identity().epoch;
    for round in 0..6u64 {
        let epoch = start_epoch(CHECK, signer.as_mut())?;
        if epoch <= previous || signer.identity().epoch != epoch {
            return fail(
                CHECK,
                format!(
                    "round {round}: start_epoch after {previous} returned {epoch}, identity \
                     reports epoch {}",
                    signer.identity().epoch
                ),
            );
        }
        previous = epoch;
        // Every other round leaves the epoch unused: an empty epoch must still be left behind.
        if round % 2 == 1 {
            let content = message(CHECK, round);
            let ui = create(CHECK, signer.as_mut(), &content)?;
            if ui.epoch != epoch || ui.counter != 1 {
                return fail(
                    CHECK,
                    format!(
                        "round {round}: first UI of epoch {epoch} is epoch {} counter {}",
                        ui.epoch, ui.counter
                    ),
                );
            }
            expect_accept(CHECK, verifier.as_ref(), ReplicaId(0), &content, &ui)?;
        }
    }
    Ok(())
}

/// Runs every check; returns all violations found.
pub fn run_all(factory: Factory, foreign: Factory) -> Result<(), Vec<ConformanceError>> {
    let outcomes = [
        check_identity(factory),
        check_uniqueness(factory),
        check_sequential(factory),
        check_verifies_everywhere(factory),
        check_rejects_wrong_message(factory),
        check_rejects_wrong_counter(factory),
        check_rejects_wrong_identity(factory),
        check_rejects_wrong_key(factory, foreign),
        check_rejects_malformed_certificate(factory),
        check_rejects_wrong_epoch(factory),
        check_start_epoch(factory),
        check_epochs_increase(factory),
    ];
    let failures: Vec<ConformanceError> = outcomes.into_iter().filter_map(Result::err).collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// [`run_all`], panicking with every violation listed (for use in `#[test]` functions).
pub fn assert_conforms(factory: Factory, foreign: Factory) {
    if let Err(failures) = run_all(factory, foreign) {
        let listed: Vec<String> = failures.iter().map(ToString::to_string).collect();
        panic!(
            "USIG backend violates {} check(s):\n{}",
            failures.len(),
            listed.join("\n")
        );
    }
}
