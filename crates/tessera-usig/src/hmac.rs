//! In-process HMAC-SHA256 USIG, for tests and for measuring the protocol without isolation cost.
//!
//! Every replica holds every replica's key (paper 004's non-isolated HMAC version), so any
//! replica — or anyone who reads its memory — can forge any other replica's UIs. This backend
//! therefore gives **no** Byzantine safety; it exists to test the protocol logic and to measure
//! it without the cost of isolation or public-key signatures. The counter and the epoch live in
//! memory only: [`Usig::start_epoch`] moves to epoch + 1 with the counter back at 0, and it is
//! the caller's job to persist the epochs it used, so that a restarted replica never comes back
//! in an epoch it already spoke in (this is a test and measurement backend, not a durable one).

use crate::certified;
use crate::{Usig, UsigError, UsigIdentity};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tessera_types::{Digest, ReplicaId, Ui};

/// Length of an HMAC certificate, in bytes.
pub const HMAC_CERTIFICATE_LEN: usize = 32;

/// Domain string bound into every HMAC certificate.
const DOMAIN: &[u8] = b"tessera.usig.hmac-sha256.v1";

type HmacSha256 = Hmac<Sha256>;

/// An in-process USIG whose certificates are HMAC-SHA256 tags. See the module docs: no
/// isolation, tests and measurement only.
pub struct HmacUsig {
    identity: UsigIdentity,
    keys: Vec<[u8; 32]>,
    last_counter: u64,
}

impl HmacUsig {
    /// A fresh instance (last counter 0) for `identity`; `keys[r]` is replica `r`'s key.
    ///
    /// # Panics
    /// If `identity.replica` does not index `keys`: a configuration bug that the cluster
    /// config loader already rejects. Use [`HmacUsig::try_new`] to get an error instead.
    pub fn new(identity: UsigIdentity, keys: Vec<[u8; 32]>) -> HmacUsig {
        match HmacUsig::try_new(identity, keys) {
            Ok(usig) => usig,
            Err(error) => panic!("HmacUsig::new: {error}"),
        }
    }

    /// Like [`HmacUsig::new`], but returns `UnknownSigner` if `identity.replica` has no key.
    pub fn try_new(identity: UsigIdentity, keys: Vec<[u8; 32]>) -> Result<HmacUsig, UsigError> {
        if identity.replica.0 as usize >= keys.len() {
            return Err(UsigError::UnknownSigner(identity.replica));
        }
        Ok(HmacUsig {
            identity,
            keys,
            last_counter: 0,
        })
    }

    /// Like [`HmacUsig::try_new`], but continuing after `last_counter` values were already
    /// issued: for a replica restored from a snapshot of itself, whose earlier certificates were
    /// all made by this same key (so continuing, never reissuing, is what keeps it a USIG).
    pub fn resume(
        identity: UsigIdentity,
        keys: Vec<[u8; 32]>,
        last_counter: u64,
    ) -> Result<HmacUsig, UsigError> {
        let mut usig = HmacUsig::try_new(identity, keys)?;
        usig.last_counter = last_counter;
        Ok(usig)
    }

    /// The last counter value issued in the current epoch (0 before its first `create_ui`).
    pub fn last_counter(&self) -> u64 {
        self.last_counter
    }

    /// Test hook: pretends `last_counter` values were already issued, to reach exhaustion.
    #[cfg(test)]
    pub(crate) fn with_last_counter(mut self, last_counter: u64) -> HmacUsig {
        self.last_counter = last_counter;
        self
    }

    fn tag(key: &[u8; 32], identity: UsigIdentity, counter: u64, message: &Digest) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(&(DOMAIN.len() as u64).to_le_bytes());
        mac.update(DOMAIN);
        mac.update(&certified::fields(identity, counter, message));
        mac
    }
}

impl std::fmt::Debug for HmacUsig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are deliberately left out.
        formatter
            .debug_struct("HmacUsig")
            .field("identity", &self.identity)
            .field("last_counter", &self.last_counter)
            .field("replica_count", &self.keys.len())
            .finish()
    }
}

impl Usig for HmacUsig {
    fn identity(&self) -> UsigIdentity {
        self.identity
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let counter = certified::next_counter(self.last_counter)?;
        let key = &self.keys[self.identity.replica.0 as usize];
        let certificate = HmacUsig::tag(key, self.identity, counter, message)
            .finalize()
            .into_bytes();
        debug_assert_eq!(certificate.len(), HMAC_CERTIFICATE_LEN);
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
        certified::precheck(self.keys.len(), signer, ui, HMAC_CERTIFICATE_LEN)?;
        let key = &self.keys[signer.0 as usize];
        let claimed = UsigIdentity {
            replica: signer,
            epoch: ui.epoch,
        };
        // `verify_slice` compares in constant time.
        HmacUsig::tag(key, claimed, ui.counter, message)
            .verify_slice(&ui.certificate)
            .map_err(|_| UsigError::Invalid {
                replica: signer,
                counter: ui.counter,
                reason: "certificate does not match (wrong message, counter, signer, epoch or key)",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<[u8; 32]> {
        vec![[1; 32], [2; 32], [3; 32]]
    }

    fn usig(replica: u32, epoch: u64) -> HmacUsig {
        HmacUsig::new(
            UsigIdentity {
                replica: ReplicaId(replica),
                epoch,
            },
            keys(),
        )
    }

    fn message() -> Digest {
        Digest::of("tessera.test.v1", b"m")
    }

    #[test]
    fn try_new_rejects_replica_without_key() {
        let identity = UsigIdentity {
            replica: ReplicaId(3),
            epoch: 0,
        };
        assert_eq!(
            HmacUsig::try_new(identity, keys()).err(),
            Some(UsigError::UnknownSigner(ReplicaId(3)))
        );
    }

    #[test]
    fn counter_exhausts_at_u64_max() {
        let mut usig = usig(0, 0).with_last_counter(u64::MAX - 1);
        let last = usig
            .create_ui(&message())
            .expect("u64::MAX is still issuable");
        assert_eq!(last.counter, u64::MAX);
        assert_eq!(usig.create_ui(&message()), Err(UsigError::Exhausted));
        assert_eq!(usig.create_ui(&message()), Err(UsigError::Exhausted));
        assert_eq!(usig.last_counter(), u64::MAX);
        assert_eq!(
            usig_at(1).verify_ui(ReplicaId(0), &message(), &last),
            Ok(())
        );
    }

    fn usig_at(replica: u32) -> HmacUsig {
        usig(replica, 0)
    }

    #[test]
    fn epoch_is_certified() {
        let mut restarted = usig(0, 1);
        let ui = restarted.create_ui(&message()).expect("fresh counter");
        assert_eq!((ui.epoch, ui.counter), (1, 1));
        let peer = usig(1, 0);
        assert_eq!(peer.verify_ui(ReplicaId(0), &message(), &ui), Ok(()));
        for epoch in [0, 2, u64::MAX] {
            let moved = Ui {
                epoch,
                ..ui.clone()
            };
            assert!(matches!(
                peer.verify_ui(ReplicaId(0), &message(), &moved),
                Err(UsigError::Invalid { .. })
            ));
        }
    }

    #[test]
    fn start_epoch_restarts_the_counter_in_a_greater_epoch() {
        let mut usig = usig(0, 0);
        let old = usig.create_ui(&message()).expect("fresh counter");
        usig.create_ui(&message()).expect("second");
        assert_eq!(usig.start_epoch(), Ok(1));
        assert_eq!(usig.identity().epoch, 1);
        assert_eq!(usig.last_counter(), 0);
        let new = usig.create_ui(&message()).expect("new epoch");
        assert_eq!((new.epoch, new.counter), (1, 1));
        let peer = usig_at(2);
        assert_eq!(peer.verify_ui(ReplicaId(0), &message(), &old), Ok(()));
        assert_eq!(peer.verify_ui(ReplicaId(0), &message(), &new), Ok(()));
    }

    #[test]
    fn the_last_epoch_cannot_be_left() {
        let mut usig = usig(0, u64::MAX);
        usig.create_ui(&message()).expect("fresh counter");
        assert_eq!(usig.start_epoch(), Err(UsigError::Exhausted));
        assert_eq!(usig.identity().epoch, u64::MAX);
        assert_eq!(usig.last_counter(), 1, "a refused switch changes nothing");
    }

    #[test]
    fn counter_zero_rejected() {
        let ui = usig(0, 0).create_ui(&message()).expect("fresh counter");
        let forged = Ui {
            epoch: ui.epoch,
            counter: 0,
            certificate: ui.certificate,
        };
        assert!(usig(1, 0)
            .verify_ui(ReplicaId(0), &message(), &forged)
            .is_err());
    }

    #[test]
    fn debug_hides_keys() {
        let printed = format!("{:?}", usig(0, 0));
        assert!(printed.contains("HmacUsig") && !printed.contains("[1, 1"));
    }
}
