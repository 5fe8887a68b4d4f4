//! Both in-process backends pass the shared USIG conformance suite.

use tessera_crypto::SigningKey;
use tessera_types::ReplicaId;
use tessera_usig::conformance::{self, CLUSTER_SIZE};
use tessera_usig::{Ed25519Usig, HmacUsig, Usig, UsigIdentity};

fn identity(replica: ReplicaId) -> UsigIdentity {
    UsigIdentity { replica, epoch: 0 }
}

/// Per-replica 32-byte secrets; `family` picks an independent key set.
fn secrets(family: u8) -> Vec<[u8; 32]> {
    (0..CLUSTER_SIZE)
        .map(|replica| {
            tessera_crypto::derive_key(
                "tessera usig conformance test keys v1",
                &[family, replica as u8],
            )
        })
        .collect()
}

fn hmac_factory(family: u8) -> impl Fn(ReplicaId) -> Box<dyn Usig> {
    move |replica| Box::new(HmacUsig::new(identity(replica), secrets(family))) as Box<dyn Usig>
}

fn ed25519_factory(family: u8) -> impl Fn(ReplicaId) -> Box<dyn Usig> {
    move |replica| {
        let seeds = secrets(family);
        let public_keys = seeds
            .iter()
            .map(|seed| SigningKey::from_seed(seed).verifying_key().to_bytes())
            .collect();
        let usig = Ed25519Usig::new(identity(replica), seeds[replica.0 as usize], public_keys)
            .expect("seeds and public keys come from the same family");
        Box::new(usig) as Box<dyn Usig>
    }
}

#[test]
fn hmac_backend_conforms() {
    conformance::assert_conforms(&hmac_factory(1), &hmac_factory(2));
}

#[test]
fn ed25519_backend_conforms() {
    conformance::assert_conforms(&ed25519_factory(1), &ed25519_factory(2));
}

#[test]
fn backends_reject_each_other() {
    let outcome = conformance::check_rejects_wrong_key(&hmac_factory(1), &ed25519_factory(1));
    assert_eq!(outcome, Ok(()));
}

/// The suite itself must catch a broken backend: one that reuses counters and accepts anything.
struct Broken {
    replica: ReplicaId,
}

impl Usig for Broken {
    fn identity(&self) -> UsigIdentity {
        identity(self.replica)
    }

    fn create_ui(
        &mut self,
        _message: &tessera_types::Digest,
    ) -> Result<tessera_types::Ui, tessera_usig::UsigError> {
        Ok(tessera_types::Ui {
            epoch: 0,
            counter: 1,
            certificate: vec![0; 8],
        })
    }

    fn start_epoch(&mut self) -> Result<u64, tessera_usig::UsigError> {
        Ok(0)
    }

    fn verify_ui(
        &self,
        _signer: ReplicaId,
        _message: &tessera_types::Digest,
        ui: &tessera_types::Ui,
    ) -> Result<(), tessera_usig::UsigError> {
        assert!(ui.certificate.len() < 1000, "panics on large input");
        Ok(())
    }
}

#[test]
fn suite_catches_a_broken_backend() {
    let factory = |replica| Box::new(Broken { replica }) as Box<dyn Usig>;
    let failures = conformance::run_all(&factory, &factory).expect_err("broken backend must fail");
    let checks: Vec<&str> = failures.iter().map(|failure| failure.check).collect();
    for expected in [
        "uniqueness",
        "sequential",
        "rejects wrong message",
        "rejects wrong counter",
        "rejects wrong identity",
        "rejects wrong key",
        "rejects malformed certificate",
        "rejects wrong epoch",
        "start epoch",
        "epochs increase",
    ] {
        assert!(
            checks.contains(&expected),
            "suite missed {expected}: {checks:?}"
        );
    }
}
