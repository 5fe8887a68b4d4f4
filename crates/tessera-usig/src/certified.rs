//! The exact content a UI certifies, shared by the in-process backends.
//!
//! Fixed-width fields after a length-prefixed, per-backend domain string: no two different
//! (backend, replica, epoch, counter, message) tuples encode to the same bytes, so a
//! certificate can never be reinterpreted for another counter, epoch, signer or backend.

use crate::UsigIdentity;
use tessera_types::Digest;

/// Length of [`fields`]: replica, epoch and counter as u64 little-endian, then the message.
pub(crate) const FIELDS_LEN: usize = 8 + 8 + 8 + 32;

/// The certified fields for `identity`'s UI number `counter` over `message`.
pub(crate) fn fields(identity: UsigIdentity, counter: u64, message: &Digest) -> [u8; FIELDS_LEN] {
    let mut encoded = [0u8; FIELDS_LEN];
    encoded[0..8].copy_from_slice(&u64::from(identity.replica.0).to_le_bytes());
    encoded[8..16].copy_from_slice(&identity.epoch.to_le_bytes());
    encoded[16..24].copy_from_slice(&counter.to_le_bytes());
    encoded[24..].copy_from_slice(message.as_bytes());
    encoded
}

/// The next counter value after `last`, or `Exhausted`.
pub(crate) fn next_counter(last: u64) -> Result<u64, crate::UsigError> {
    last.checked_add(1).ok_or(crate::UsigError::Exhausted)
}

/// The epoch after `epoch`, or `Exhausted`.
pub(crate) fn next_epoch(epoch: u64) -> Result<u64, crate::UsigError> {
    epoch.checked_add(1).ok_or(crate::UsigError::Exhausted)
}

/// Checks that need no cryptography, in the order a verifier must apply them. Any epoch is
/// checked as what it claims to be: whether the signer may still speak in it is the protocol
/// core's policy, not the USIG's.
pub(crate) fn precheck(
    replica_count: usize,
    signer: tessera_types::ReplicaId,
    ui: &tessera_types::Ui,
    certificate_len: usize,
) -> Result<(), crate::UsigError> {
    if signer.0 as usize >= replica_count {
        return Err(crate::UsigError::UnknownSigner(signer));
    }
    let invalid = |reason| crate::UsigError::Invalid {
        replica: signer,
        counter: ui.counter,
        reason,
    };
    if ui.counter == 0 {
        return Err(invalid("counter 0 is never issued (counters start at 1)"));
    }
    if ui.certificate.len() != certificate_len {
        return Err(invalid(
            "certificate has the wrong length for this USIG backend",
        ));
    }
    Ok(())
}
