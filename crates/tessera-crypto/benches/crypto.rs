//! Costs of the primitives on a 100-byte message's digest (compare `shared/notes/crypto-costs.md`).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tessera_crypto::{mac16, verify_batch, Digest, DigestBuilder, SigningKey, VerifyingKey};

const BATCH_SIZE: usize = 64;

fn message(index: u64) -> Digest {
    let mut builder = DigestBuilder::new("tessera.bench.v1");
    builder.u64(index).bytes(&[0x5a; 100]);
    builder.finish()
}

fn signatures(criterion: &mut Criterion) {
    let signer = SigningKey::from_seed(&[1; 32]);
    let public = signer.verifying_key();
    let digest = message(0);
    let signature = signer.sign(&digest);

    criterion.bench_function("ed25519_sign", |bencher| {
        bencher.iter(|| signer.sign(black_box(&digest)))
    });
    criterion.bench_function("ed25519_verify", |bencher| {
        bencher.iter(|| public.verify(black_box(&digest), black_box(&signature)))
    });

    let signers: Vec<SigningKey> = (0..BATCH_SIZE)
        .map(|index| SigningKey::from_seed(&[index as u8; 32]))
        .collect();
    let publics: Vec<VerifyingKey> = signers.iter().map(SigningKey::verifying_key).collect();
    let digests: Vec<Digest> = (0..BATCH_SIZE as u64).map(message).collect();
    let signed: Vec<[u8; 64]> = signers
        .iter()
        .zip(&digests)
        .map(|(signer, digest)| signer.sign(digest))
        .collect();
    let items: Vec<(&Digest, &[u8], &VerifyingKey)> = (0..BATCH_SIZE)
        .map(|index| (&digests[index], &signed[index][..], &publics[index]))
        .collect();
    assert!(verify_batch(&items));
    criterion.bench_function("ed25519_verify_batch_64", |bencher| {
        bencher.iter(|| verify_batch(black_box(&items)))
    });
}

fn macs(criterion: &mut Criterion) {
    let key = [7u8; 32];
    let digest = message(0);
    criterion.bench_function("blake3_mac16", |bencher| {
        bencher.iter(|| mac16(black_box(&key), black_box(&digest)))
    });
}

/// One element added to a homomorphic partition sum (a key-value write pays two: the old pair
/// out, the new one in).
fn lthash(criterion: &mut Criterion) {
    let mut sum = tessera_crypto::LtHash::new();
    let hasher = tessera_crypto::ElementHasher::new("tessera.bench");
    let key = b"key:000000012345".to_vec();
    let value = vec![7u8; 64];
    criterion.bench_function("lthash_add_80_byte_pair", |bencher| {
        bencher.iter(|| sum.add(&hasher, &[black_box(&key), black_box(&value)]))
    });
}

criterion_group!(benches, signatures, macs, lthash);
criterion_main!(benches);
