//! The abstract state: frozen copies, chunked partition transfer, staging checks.

use super::*;
use proptest::prelude::*;

fn set(store: &mut KvStore, key: &str, value: &str) {
    let response = store.apply(Command::Set {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    });
    assert_eq!(response, Response::Ok);
}

fn filled(count: u32, tag: u8) -> KvStore {
    let mut store = KvStore::default();
    for index in 0..count {
        store.apply(Command::Set {
            key: format!("key:{index:06}").into_bytes(),
            value: vec![tag; 40],
        });
    }
    store
}

/// Fetches every partition of `frozen` whose digest differs from `target`'s, in chunks of
/// about `budget` bytes, stages and installs them; returns how many partitions moved.
fn transfer(frozen: &KvFrozen, target: &mut KvStore, budget: usize) -> usize {
    let mut staged = Vec::new();
    for index in 0..frozen.partition_count() {
        if frozen.partition_digest(index) == target.partition_digest(index) {
            continue;
        }
        let mut partition = target.stage(index);
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let chunk = frozen.chunk(index, cursor.as_deref(), budget);
            partition.append(&chunk.bytes).expect("a correct chunk");
            match chunk.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(partition.digest(), frozen.partition_digest(index));
        staged.push(partition);
    }
    let moved = staged.len();
    target.install(staged).expect("within limits");
    moved
}

fn frozen_root(frozen: &KvFrozen) -> Digest {
    let leaves: Vec<Digest> = (0..frozen.partition_count())
        .map(|index| frozen.partition_digest(index))
        .collect();
    MerkleTree::new(&leaves).unwrap().root()
}

#[test]
fn a_frozen_copy_keeps_its_state_while_the_store_moves_on() {
    let mut store = filled(500, 1);
    let frozen = store.freeze();
    let digest_then = store.digest();
    for index in 0..100u32 {
        set(&mut store, &format!("key:{index:06}"), "changed");
    }
    store.apply(Command::Del {
        keys: vec![b"key:000400".to_vec()],
    });
    assert_ne!(store.digest(), digest_then);
    assert_eq!(frozen_root(&frozen), digest_then);
    let mut copy = KvStore::default();
    transfer(&frozen, &mut copy, 64);
    assert_eq!(copy.digest(), digest_then);
    assert_eq!(copy.get(b"key:000400"), Some(&[1u8; 40][..]));
    copy.check_invariants();
    store.check_invariants();
}

#[test]
fn only_partitions_that_differ_move() {
    let source = filled(2000, 1);
    let mut target = filled(2000, 1);
    set(&mut target, "key:000007", "stale");
    target.apply(Command::Del {
        keys: vec![b"key:000008".to_vec()],
    });
    set(&mut target, "extra", "x");
    let mut source = source;
    let frozen = source.freeze();
    let differing = (0..PARTITIONS as u32)
        .filter(|index| frozen.partition_digest(*index) != target.partition_digest(*index))
        .count();
    assert!(
        (1..=3).contains(&differing),
        "{differing} partitions differ"
    );
    assert_eq!(transfer(&frozen, &mut target, 256), differing);
    assert_eq!(target.digest(), source.digest());
    assert_eq!(target.get(b"extra"), None);
    target.check_invariants();
}

#[test]
fn staging_refuses_what_a_faulty_sender_could_send() {
    let mut source = filled(300, 1);
    let frozen = source.freeze();
    let target = KvStore::default();
    let entries_of = |index: u32| {
        let chunk = frozen.chunk(index, None, 1 << 20).bytes;
        let entries: Vec<(ByteBuf, ByteBuf, Option<u64>)> =
            tessera_types::decode(&chunk, usize::MAX).unwrap();
        (chunk, entries.len())
    };
    let index = (0..PARTITIONS as u32)
        .find(|index| entries_of(*index).1 >= 2)
        .expect("a partition with two entries");
    let good = entries_of(index).0;

    // Garbage, and a chunk of another partition.
    assert!(target.stage(index).append(b"\xff\xff\xff\xff").is_err());
    let other = (0..PARTITIONS as u32)
        .find(|other| *other != index && entries_of(*other).1 >= 1)
        .expect("another non-empty partition");
    assert!(target.stage(index).append(&entries_of(other).0).is_err());
    // The same chunk twice: keys stop increasing.
    let mut twice = target.stage(index);
    twice.append(&good).unwrap();
    assert!(twice.append(&good).is_err());
    // Entries over this store's limits.
    let small = KvStore::new(KvLimits {
        value_bytes_max: 20,
        ..KvLimits::default()
    });
    assert!(small.stage(index).append(&good).is_err());
    // A partition bigger than the whole store may hold is refused while it arrives.
    let tiny = KvStore::new(KvLimits {
        total_bytes_max: 60,
        ..KvLimits::default()
    });
    assert!(tiny.stage(index).append(&good).is_err());
    // Partitions that fit alone but not with what the store keeps elsewhere: `install`
    // refuses them and changes nothing.
    let single = (0..PARTITIONS as u32)
        .find(|index| entries_of(*index).1 == 1)
        .expect("a partition with one entry");
    let mut full = KvStore::new(KvLimits {
        total_bytes_max: 100,
        ..KvLimits::default()
    });
    let mut filler = 0u32;
    loop {
        let key = format!("filler{filler}");
        if partition_of(key.as_bytes()) != single as usize {
            set(&mut full, &key, &"v".repeat(80));
            break;
        }
        filler += 1;
    }
    let before = full.digest();
    let mut staged = full.stage(single);
    staged.append(&entries_of(single).0).unwrap();
    let error = full.install(vec![staged]).unwrap_err();
    assert!(error.0.contains("total_bytes_max"), "{error}");
    assert_eq!(full.digest(), before);
    full.check_invariants();
}

#[test]
fn nonsense_cursors_and_indexes_give_empty_last_chunks() {
    let mut store = filled(50, 1);
    let frozen = store.freeze();
    let past = frozen.chunk(PARTITIONS as u32 + 5, None, 100);
    assert_eq!(past.next, None);
    let mut staged = store.stage(0);
    staged.append(&past.bytes).unwrap();
    assert_eq!(staged.bytes(), 0);
    let beyond = frozen.chunk(0, Some(&[0xff; 2000]), 100);
    assert_eq!(beyond.next, None);
    assert!(store.install(vec![store.stage(3), store.stage(3)]).is_err());
    assert!(store.install(vec![store.stage(PARTITIONS as u32)]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever happened before and after the freeze, fetching the differing partitions of
    /// the frozen copy, in chunks of any size, reproduces its state exactly.
    #[test]
    fn transfer_reproduces_the_frozen_state(
        before in proptest::collection::vec((0u16..300, 0u8..4, proptest::bool::ANY), 0..200),
        after in proptest::collection::vec((0u16..300, 0u8..4, proptest::bool::ANY), 0..100),
        target_ops in proptest::collection::vec((0u16..300, 0u8..4, proptest::bool::ANY), 0..100),
        budget in 1usize..400,
    ) {
        let apply = |store: &mut KvStore, ops: &[(u16, u8, bool)]| {
            for (key, value, write) in ops {
                let key = format!("k{key}").into_bytes();
                if *write {
                    store.apply(Command::Set { key, value: vec![*value; 10] });
                } else {
                    store.apply(Command::Del { keys: vec![key] });
                }
            }
        };
        let mut source = KvStore::default();
        apply(&mut source, &before);
        let expected = source.digest();
        let expected_snapshot = source.snapshot();
        let frozen = source.freeze();
        apply(&mut source, &after);
        let mut target = KvStore::default();
        apply(&mut target, &target_ops);
        transfer(&frozen, &mut target, budget);
        prop_assert_eq!(target.digest(), expected);
        prop_assert_eq!(target.snapshot(), expected_snapshot);
        target.check_invariants();
    }
}
