//! Throughput of `execute` for Set and Get, of snapshot and restore on a 100k-key store, and what
//! a checkpoint digest costs after 1% of the keys changed (incremental) against rehashing every
//! entry (what `restore` does).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use tessera_kv::{Command, KvStore, StateMachine};

const KEYS: u64 = 100_000;
const VALUE_BYTES: usize = 64;

fn key(index: u64) -> Vec<u8> {
    format!("key:{index:012}").into_bytes()
}

fn filled_store() -> KvStore {
    let mut store = KvStore::default();
    for index in 0..KEYS {
        store.apply(Command::Set {
            key: key(index),
            value: vec![index as u8; VALUE_BYTES],
        });
    }
    store
}

fn execute(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("execute");
    group.throughput(Throughput::Elements(1));
    let mut store = filled_store();
    let mut index = 0u64;
    group.bench_function("set", |bencher| {
        bencher.iter(|| {
            index = (index + 7919) % KEYS;
            let operation = Command::Set {
                key: key(index),
                value: vec![1; VALUE_BYTES],
            }
            .encode();
            black_box(store.execute(&operation, 0))
        })
    });
    let operation = Command::Get { key: key(KEYS / 2) }.encode();
    group.bench_function("get", |bencher| {
        bencher.iter(|| black_box(store.execute(&operation, 0)))
    });
    group.finish();
}

fn snapshot_and_digest(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("state_100k_keys");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS));
    let store = filled_store();
    group.bench_function("snapshot", |bencher| {
        bencher.iter(|| black_box(store.snapshot()))
    });
    // A checkpoint after 1% of the keys were rewritten: the writes (each updates its
    // partition's sum) and the digest (rehashes the changed partitions' paths), then the
    // writes alone, so the digest's share is the difference.
    let mut checkpointed = store.clone();
    checkpointed.digest();
    group.bench_function("freeze", |bencher| {
        bencher.iter(|| black_box(checkpointed.freeze()))
    });
    let rewrite = |target: &mut KvStore| {
        for index in (0..KEYS).step_by(100) {
            target.apply(Command::Set {
                key: key(index),
                value: vec![7; VALUE_BYTES],
            });
        }
    };
    group.bench_function("rewrite_1pct_then_digest", |bencher| {
        bencher.iter_batched(
            || checkpointed.clone(),
            |mut target| {
                rewrite(&mut target);
                black_box(target.digest());
                target
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("rewrite_1pct_only", |bencher| {
        bencher.iter_batched(
            || checkpointed.clone(),
            |mut target| {
                rewrite(&mut target);
                target
            },
            BatchSize::LargeInput,
        )
    });
    let snapshot = store.snapshot();
    group.bench_function("restore", |bencher| {
        bencher.iter_batched(
            KvStore::default,
            |mut target| {
                target.restore(&snapshot).expect("a valid snapshot");
                target
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, execute, snapshot_and_digest);
criterion_main!(benches);
