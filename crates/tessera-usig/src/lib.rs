//! The USIG (Unique Sequential Identifier Generator, paper 004 §2): the trusted component that
//! makes 2f+1 replicas enough. `create_ui(m)` binds the next value of a monotonic counter to `m`;
//! `verify_ui` checks such a binding. A correct USIG never binds one counter value to two
//! messages, so a faulty replica cannot tell different stories to different peers.
//!
//! Epochs: a replica that cannot continue its counter (its log is lost, a crash burned a value
//! it may have shown to some peers, a TPM counter jumped) calls [`Usig::start_epoch`] and
//! speaks in a new epoch, counting from 1 again. A UI names its epoch and the certificate binds
//! it, so `(replica, epoch, counter)` names at most one message. This crate only proves what a
//! UI says; which epoch is acceptable from which replica, and from when, is the protocol core's
//! decision (DESIGN §3, §6).
//!
//! This crate holds the trait, the in-process backends (HMAC and Ed25519: for tests and for
//! measuring the protocol without isolation cost, paper 004's "NS" versions), the pure
//! verification of TPM 2.0 UIs ([`tpm`]; the TPM commands live in `tessera-tpm`) and the
//! conformance suite every backend must pass.

#![forbid(unsafe_code)]

mod certified;
pub mod conformance;
pub mod ed25519;
pub mod hmac;
pub mod tpm;

pub use ed25519::{Ed25519Usig, Ed25519Verifier, ED25519_CERTIFICATE_LEN};
pub use hmac::{HmacUsig, HMAC_CERTIFICATE_LEN};
pub use tpm::{TpmEnrollment, TpmVerifier};

use tessera_types::{Digest, ReplicaId, Ui};
use thiserror::Error;

/// Who a USIG instance speaks for, and in which epoch it issues UIs now.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UsigIdentity {
    /// The replica the instance belongs to.
    pub replica: ReplicaId,
    /// The epoch of the UIs this instance issues now (see [`Usig::start_epoch`]).
    pub epoch: u64,
}

/// Why a USIG operation failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UsigError {
    /// The certificate does not prove that this counter value was bound to this message by this
    /// replica's USIG.
    #[error("invalid UI from {replica:?} with counter {counter}: {reason}")]
    Invalid {
        /// Claimed signer.
        replica: ReplicaId,
        /// Claimed counter.
        counter: u64,
        /// What check failed.
        reason: &'static str,
    },
    /// The signer is not a replica this USIG knows.
    #[error("unknown USIG signer {0:?}")]
    UnknownSigner(ReplicaId),
    /// The counter (or the epoch number) cannot advance any more.
    #[error("USIG counter or epoch exhausted")]
    Exhausted,
    /// The backend is unavailable (daemon down, TPM busy past the retry budget).
    #[error("USIG backend unavailable: {0}")]
    Unavailable(String),
}

/// The trusted counter interface. Narrow on purpose: the protocol core needs nothing else.
pub trait Usig: Send {
    /// Who this instance speaks for.
    fn identity(&self) -> UsigIdentity;

    /// Binds the next counter value of the current epoch to `message` (a digest of the certified
    /// content). Within an epoch counter values start at 1 and increase by one per call (a
    /// backend whose counter can skip, the TPM, says so); no (epoch, counter) pair is ever
    /// returned twice.
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError>;

    /// Starts the next epoch, strictly greater than the current one, and returns it. Afterwards
    /// this instance issues UIs only in the new epoch, counting from 1, and never again in an
    /// older one; [`Usig::identity`] reports the new epoch. UIs of older epochs keep verifying
    /// as what they are. `Exhausted` if no greater epoch exists.
    fn start_epoch(&mut self) -> Result<u64, UsigError>;

    /// Like [`Usig::start_epoch`], with the new epoch at least `at_least` where the caller must
    /// choose it: an in-process USIG has no durable memory of its epochs, so a replica that lost
    /// its log passes a value above every epoch it can have used (the node uses the wall clock in
    /// milliseconds) and logs it, so that replay reaches the same epoch. A backend that keeps its
    /// own epochs durably (`usigd`, TPM) chooses by itself and ignores `at_least`.
    fn start_epoch_at_least(&mut self, at_least: u64) -> Result<u64, UsigError> {
        let _ = at_least;
        self.start_epoch()
    }

    /// Checks that `ui` was created by `signer`'s USIG for `message`, in the epoch and with the
    /// counter `ui` names. Any epoch is accepted if the certificate proves it: epoch policy is
    /// the caller's.
    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError>;
}
