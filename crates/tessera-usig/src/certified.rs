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

/// Expected epoch per signer, as the verifier currently believes it.
///
/// Starts at 0 for every peer and at the instance's own epoch for itself. Epochs only move
/// forward: going back would make UIs from a retired USIG instance verify again.
#[derive(Clone, Debug)]
pub(crate) struct PeerEpochs {
    epochs: Vec<u64>,
}

impl PeerEpochs {
    pub(crate) fn new(replica_count: usize, own: UsigIdentity) -> PeerEpochs {
        let mut epochs = vec![0; replica_count];
        epochs[own.replica.0 as usize] = own.epoch;
        PeerEpochs { epochs }
    }

    pub(crate) fn get(&self, replica: tessera_types::ReplicaId) -> Option<u64> {
        self.epochs.get(replica.0 as usize).copied()
    }

    pub(crate) fn set(
        &mut self,
        replica: tessera_types::ReplicaId,
        epoch: u64,
    ) -> Result<(), crate::UsigError> {
        let slot = self
            .epochs
            .get_mut(replica.0 as usize)
            .ok_or(crate::UsigError::UnknownSigner(replica))?;
        if epoch < *slot {
            return Err(crate::UsigError::Invalid {
                replica,
                counter: 0,
                reason: "peer epoch may not decrease (that would revive a retired USIG)",
            });
        }
        *slot = epoch;
        Ok(())
    }
}

/// The next counter value after `last`, or `Exhausted`.
pub(crate) fn next_counter(last: u64) -> Result<u64, crate::UsigError> {
    last.checked_add(1).ok_or(crate::UsigError::Exhausted)
}

/// Checks that need no cryptography, in the order a verifier must apply them; returns the
/// epoch the signer's certificate must have been made in.
pub(crate) fn precheck(
    epochs: &PeerEpochs,
    signer: tessera_types::ReplicaId,
    ui: &tessera_types::Ui,
    certificate_len: usize,
) -> Result<u64, crate::UsigError> {
    let epoch = epochs
        .get(signer)
        .ok_or(crate::UsigError::UnknownSigner(signer))?;
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
    Ok(epoch)
}
