//! create_ui and verify_ui per in-process backend.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tessera_crypto::SigningKey;
use tessera_types::{Digest, ReplicaId};
use tessera_usig::{Ed25519Usig, HmacUsig, Usig, UsigIdentity};

const REPLICAS: u32 = 3;

fn seeds() -> Vec<[u8; 32]> {
    (0..REPLICAS)
        .map(|replica| [replica as u8 + 1; 32])
        .collect()
}

fn identity(replica: u32) -> UsigIdentity {
    UsigIdentity {
        replica: ReplicaId(replica),
        epoch: 0,
    }
}

fn bench_backend(
    criterion: &mut Criterion,
    name: &str,
    signer: &mut dyn Usig,
    verifier: &dyn Usig,
) {
    let message = Digest::of("tessera.bench.v1", &[0x5a; 100]);
    // 10^9 UIs per second would take centuries to exhaust the u64 counter.
    criterion.bench_function(&format!("{name}_create_ui"), |bencher| {
        bencher.iter(|| {
            signer
                .create_ui(black_box(&message))
                .expect("counter not exhausted")
        })
    });
    let ui = signer.create_ui(&message).expect("counter not exhausted");
    criterion.bench_function(&format!("{name}_verify_ui"), |bencher| {
        bencher.iter(|| verifier.verify_ui(ReplicaId(0), black_box(&message), black_box(&ui)))
    });
}

fn hmac(criterion: &mut Criterion) {
    let mut signer = HmacUsig::new(identity(0), seeds());
    let verifier = HmacUsig::new(identity(1), seeds());
    bench_backend(criterion, "hmac", &mut signer, &verifier);
}

fn ed25519(criterion: &mut Criterion) {
    let public_keys: Vec<[u8; 32]> = seeds()
        .iter()
        .map(|seed| SigningKey::from_seed(seed).verifying_key().to_bytes())
        .collect();
    let build = |replica: u32| {
        Ed25519Usig::new(
            identity(replica),
            seeds()[replica as usize],
            public_keys.clone(),
        )
        .expect("matching keys")
    };
    let mut signer = build(0);
    let verifier = build(1);
    bench_backend(criterion, "ed25519", &mut signer, &verifier);
}

criterion_group!(benches, hmac, ed25519);
criterion_main!(benches);
