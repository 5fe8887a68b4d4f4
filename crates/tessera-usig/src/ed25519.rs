//! In-process Ed25519 USIG, for tests and for measuring the protocol without isolation cost.
//!
//! Each replica holds only its own signing seed and everyone's public keys, so UIs are
//! transferable and unforgeable by other replicas; but the key and the counter live in the
//! replica's own memory, so a compromised replica process can still equivocate. That is the
//! paper's non-isolated ("NS") version: real deployments put the key in `usigd` or a TPM. The
//! counter and the epoch live in memory only: [`Usig::start_epoch`] moves to epoch + 1 with the
//! counter back at 0, and the caller must persist the epochs it used so that a restarted
//! replica never speaks again in one of them (usigd does exactly that around this type).

use crate::certified;
use crate::{Usig, UsigError, UsigIdentity};
use tessera_crypto::{DigestBuilder, SigningKey, VerifyingKey, SIGNATURE_LEN};
use tessera_types::{Digest, ReplicaId, Ui};

/// Length of an Ed25519 certificate, in bytes.
pub const ED25519_CERTIFICATE_LEN: usize = SIGNATURE_LEN;

/// Domain string of the digest every certificate signs.
const DOMAIN: &str = "tessera.usig.ed25519.v1";

/// An in-process USIG whose certificates are Ed25519 signatures. See the module docs.
pub struct Ed25519Usig {
    identity: UsigIdentity,
    signing_key: SigningKey,
    public_keys: Vec<VerifyingKey>,
    last_counter: u64,
}

impl Ed25519Usig {
    /// A fresh instance (last counter 0) for `identity`, signing with `seed`;
    /// `public_keys[r]` verifies replica `r`.
    ///
    /// Fails with `UnknownSigner` if `identity.replica` has no public key, and with
    /// `Unavailable` (naming the replica) if a public key is malformed or if `seed` does not
    /// produce `public_keys[identity.replica]`.
    pub fn new(
        identity: UsigIdentity,
        seed: [u8; 32],
        public_keys: Vec<[u8; 32]>,
    ) -> Result<Ed25519Usig, UsigError> {
        let own = identity.replica.0 as usize;
        if own >= public_keys.len() {
            return Err(UsigError::UnknownSigner(identity.replica));
        }
        let mut parsed = Vec::with_capacity(public_keys.len());
        for (index, bytes) in public_keys.iter().enumerate() {
            let key = VerifyingKey::from_bytes(bytes).map_err(|error| {
                UsigError::Unavailable(format!("USIG public key of replica {index}: {error}"))
            })?;
            parsed.push(key);
        }
        let signing_key = SigningKey::from_seed(&seed);
        if signing_key.verifying_key() != parsed[own] {
            return Err(UsigError::Unavailable(format!(
                "USIG seed does not match the public key configured for replica {own}; \
                 check that the secrets file belongs to this replica"
            )));
        }
        Ok(Ed25519Usig {
            identity,
            signing_key,
            public_keys: parsed,
            last_counter: 0,
        })
    }

    /// Like [`Ed25519Usig::new`], but continuing after `last_counter` values were already
    /// issued in `identity.epoch`: for a holder that persists the epoch and the counter (usigd),
    /// so a restart never reissues one.
    pub fn resume(
        identity: UsigIdentity,
        seed: [u8; 32],
        public_keys: Vec<[u8; 32]>,
        last_counter: u64,
    ) -> Result<Ed25519Usig, UsigError> {
        let mut usig = Ed25519Usig::new(identity, seed, public_keys)?;
        usig.last_counter = last_counter;
        Ok(usig)
    }

    /// The last counter value issued in the current epoch (0 before its first `create_ui`).
    pub fn last_counter(&self) -> u64 {
        self.last_counter
    }

    /// Test hook: pretends `last_counter` values were already issued, to reach exhaustion.
    #[cfg(test)]
    pub(crate) fn with_last_counter(mut self, last_counter: u64) -> Ed25519Usig {
        self.last_counter = last_counter;
        self
    }

    fn signed_digest(identity: UsigIdentity, counter: u64, message: &Digest) -> Digest {
        let mut builder = DigestBuilder::new(DOMAIN);
        builder.bytes(&certified::fields(identity, counter, message));
        builder.finish()
    }
}

impl std::fmt::Debug for Ed25519Usig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Ed25519Usig")
            .field("identity", &self.identity)
            .field("last_counter", &self.last_counter)
            .field("replica_count", &self.public_keys.len())
            .finish()
    }
}

impl Usig for Ed25519Usig {
    fn identity(&self) -> UsigIdentity {
        self.identity
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let counter = certified::next_counter(self.last_counter)?;
        let digest = Ed25519Usig::signed_digest(self.identity, counter, message);
        let certificate = self.signing_key.sign(&digest);
        self.last_counter = counter;
        Ok(Ui {
            epoch: self.identity.epoch,
            counter,
            certificate: certificate.to_vec(),
        })
    }

    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        self.start_epoch_at_least(0)
    }

    fn start_epoch_at_least(&mut self, at_least: u64) -> Result<u64, UsigError> {
        let epoch = certified::next_epoch(self.identity.epoch)?.max(at_least);
        self.identity.epoch = epoch;
        self.last_counter = 0;
        Ok(epoch)
    }

    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        verify_with(&self.public_keys, signer, message, ui)
    }
}

/// Checks Ed25519 UIs with public keys only: for replicas whose signing key lives outside the
/// process (usigd), so verification stays pure and identical to the in-process backend's.
#[derive(Clone, Debug)]
pub struct Ed25519Verifier {
    public_keys: Vec<VerifyingKey>,
}

impl Ed25519Verifier {
    /// A verifier for the cluster whose USIG public keys are `public_keys` (index = replica),
    /// held by `identity` (which must be one of the cluster's replicas).
    pub fn new(
        identity: UsigIdentity,
        public_keys: Vec<[u8; 32]>,
    ) -> Result<Ed25519Verifier, UsigError> {
        if identity.replica.0 as usize >= public_keys.len() {
            return Err(UsigError::UnknownSigner(identity.replica));
        }
        let mut parsed = Vec::with_capacity(public_keys.len());
        for (index, bytes) in public_keys.iter().enumerate() {
            let key = VerifyingKey::from_bytes(bytes).map_err(|error| {
                UsigError::Unavailable(format!("USIG public key of replica {index}: {error}"))
            })?;
            parsed.push(key);
        }
        Ok(Ed25519Verifier {
            public_keys: parsed,
        })
    }

    /// Checks that `ui` was created by `signer`'s USIG for `message`, in `ui.epoch`.
    pub fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        verify_with(&self.public_keys, signer, message, ui)
    }
}

fn verify_with(
    public_keys: &[VerifyingKey],
    signer: ReplicaId,
    message: &Digest,
    ui: &Ui,
) -> Result<(), UsigError> {
    certified::precheck(public_keys.len(), signer, ui, ED25519_CERTIFICATE_LEN)?;
    let claimed = UsigIdentity {
        replica: signer,
        epoch: ui.epoch,
    };
    let digest = Ed25519Usig::signed_digest(claimed, ui.counter, message);
    if public_keys[signer.0 as usize].verify(&digest, &ui.certificate) {
        Ok(())
    } else {
        Err(UsigError::Invalid {
            replica: signer,
            counter: ui.counter,
            reason: "signature does not verify (wrong message, counter, signer, epoch or key)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(replica: u32) -> [u8; 32] {
        [replica as u8 + 1; 32]
    }

    fn public_keys() -> Vec<[u8; 32]> {
        (0..3)
            .map(|replica| {
                SigningKey::from_seed(&seed(replica))
                    .verifying_key()
                    .to_bytes()
            })
            .collect()
    }

    fn usig(replica: u32, epoch: u64) -> Ed25519Usig {
        let identity = UsigIdentity {
            replica: ReplicaId(replica),
            epoch,
        };
        Ed25519Usig::new(identity, seed(replica), public_keys()).expect("matching keys")
    }

    fn message() -> Digest {
        Digest::of("tessera.test.v1", b"m")
    }

    #[test]
    fn new_rejects_seed_of_another_replica() {
        let identity = UsigIdentity {
            replica: ReplicaId(0),
            epoch: 0,
        };
        let error = Ed25519Usig::new(identity, seed(1), public_keys()).expect_err("mismatch");
        assert!(matches!(error, UsigError::Unavailable(text) if text.contains("replica 0")));
    }

    #[test]
    fn new_rejects_unknown_replica_and_bad_key() {
        let identity = UsigIdentity {
            replica: ReplicaId(3),
            epoch: 0,
        };
        assert_eq!(
            Ed25519Usig::new(identity, seed(3), public_keys()).err(),
            Some(UsigError::UnknownSigner(ReplicaId(3)))
        );
        let mut keys = public_keys();
        keys[2] = [0; 32];
        let identity = UsigIdentity {
            replica: ReplicaId(0),
            epoch: 0,
        };
        let error = Ed25519Usig::new(identity, seed(0), keys).expect_err("bad key");
        assert!(matches!(error, UsigError::Unavailable(text) if text.contains("replica 2")));
    }

    #[test]
    fn counter_exhausts_at_u64_max() {
        let mut usig = usig(0, 0).with_last_counter(u64::MAX - 1);
        let last = usig
            .create_ui(&message())
            .expect("u64::MAX is still issuable");
        assert_eq!(last.counter, u64::MAX);
        assert_eq!(usig.create_ui(&message()), Err(UsigError::Exhausted));
        assert_eq!(usig.last_counter(), u64::MAX);
    }

    #[test]
    fn epoch_is_certified() {
        let ui = usig(0, 1).create_ui(&message()).expect("fresh counter");
        let peer = usig(2, 0);
        assert_eq!(peer.verify_ui(ReplicaId(0), &message(), &ui), Ok(()));
        let moved = Ui {
            epoch: 0,
            ..ui.clone()
        };
        assert!(peer.verify_ui(ReplicaId(0), &message(), &moved).is_err());
        let verifier = Ed25519Verifier::new(peer.identity(), public_keys()).expect("keys");
        assert_eq!(verifier.verify_ui(ReplicaId(0), &message(), &ui), Ok(()));
        assert!(verifier
            .verify_ui(ReplicaId(0), &message(), &moved)
            .is_err());
    }

    #[test]
    fn start_epoch_restarts_the_counter_and_stops_at_the_last_epoch() {
        let mut usig = usig(0, 0).with_last_counter(41);
        assert_eq!(usig.start_epoch(), Ok(1));
        let ui = usig.create_ui(&message()).expect("new epoch");
        assert_eq!((ui.epoch, ui.counter), (1, 1));
        let mut last = self::usig(1, u64::MAX);
        assert_eq!(last.start_epoch(), Err(UsigError::Exhausted));
        assert_eq!(last.identity().epoch, u64::MAX);
    }

    #[test]
    fn hmac_certificate_is_rejected() {
        let keys = vec![[1; 32], [2; 32], [3; 32]];
        let identity = UsigIdentity {
            replica: ReplicaId(0),
            epoch: 0,
        };
        let ui = crate::hmac::HmacUsig::new(identity, keys)
            .create_ui(&message())
            .expect("fresh");
        assert!(usig(1, 0).verify_ui(ReplicaId(0), &message(), &ui).is_err());
    }
}
