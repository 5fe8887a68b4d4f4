//! The USIG (Unique Sequential Identifier Generator, paper 004 §2): the trusted component that
//! makes 2f+1 replicas enough. `create_ui(m)` binds the next value of a monotonic counter to `m`;
//! `verify_ui` checks such a binding. A correct USIG never binds one counter value to two
//! messages, so a faulty replica cannot tell different stories to different peers.
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

/// Who a USIG instance speaks for. A replica that restarts with a fresh USIG gets a new `epoch`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct UsigIdentity {
    /// The replica the instance belongs to.
    pub replica: ReplicaId,
    /// The instance number of that replica's USIG.
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
    /// The counter cannot advance any more.
    #[error("USIG counter exhausted")]
    Exhausted,
    /// The backend is unavailable (daemon down, TPM busy past the retry budget).
    #[error("USIG backend unavailable: {0}")]
    Unavailable(String),
}

/// The trusted counter interface. Narrow on purpose: the protocol core needs nothing else.
pub trait Usig: Send {
    /// Who this instance speaks for.
    fn identity(&self) -> UsigIdentity;

    /// Binds the next counter value to `message` (a digest of the certified content). Counter
    /// values start at 1 and increase by exactly one per call; no value is ever returned twice.
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError>;

    /// Checks that `ui` was created by `signer`'s USIG for `message`.
    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError>;
}
