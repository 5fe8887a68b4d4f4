use super::*;
use crate::command::{ExpireCondition, Expiry};

fn key(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

fn small_limits() -> KvLimits {
    KvLimits {
        key_bytes_max: 8,
        value_bytes_max: 32,
        keys_per_command_max: 3,
        total_bytes_max: 64,
    }
}

/// Applies through `execute`, so every test also covers the encoding, and checks invariants.
fn run(store: &mut KvStore, command: Command) -> Response {
    let response =
        Response::decode(&store.execute(&command.encode(), 0)).expect("a valid response");
    store.check_invariants();
    response
}

/// Runs a command that must be refused and checks that it changed nothing.
fn refused(store: &mut KvStore, command: Command) -> KvError {
    let before = store.snapshot();
    let Response::Error(error) = run(store, command) else {
        panic!("command was not refused")
    };
    assert_eq!(store.snapshot(), before);
    error
}

fn set(store: &mut KvStore, name: &str, value: &str) {
    assert_eq!(
        run(
            store,
            Command::Set {
                key: key(name),
                value: key(value)
            }
        ),
        Response::Ok
    );
}

#[test]
fn get_returns_value_or_none() {
    let mut store = KvStore::default();
    assert_eq!(
        run(&mut store, Command::Get { key: key("a") }),
        Response::Value(None)
    );
    set(&mut store, "a", "1");
    assert_eq!(
        run(&mut store, Command::Get { key: key("a") }),
        Response::Value(Some(key("1")))
    );
    assert_eq!(store.get(b"a"), Some(&b"1"[..]));
}

#[test]
fn set_replaces_and_tracks_bytes() {
    let mut store = KvStore::default();
    set(&mut store, "key", "value");
    assert_eq!(store.stored_bytes(), 8);
    set(&mut store, "key", "v");
    assert_eq!(store.stored_bytes(), 4);
    assert_eq!(store.len(), 1);
    set(&mut store, "", "");
    assert_eq!(store.len(), 2);
}

#[test]
fn del_counts_deleted_keys_once() {
    let mut store = KvStore::default();
    set(&mut store, "a", "1");
    set(&mut store, "b", "2");
    let command = Command::Del {
        keys: vec![key("a"), key("a"), key("missing")],
    };
    assert_eq!(run(&mut store, command), Response::Count(1));
    assert_eq!(store.len(), 1);
    assert_eq!(store.stored_bytes(), 2);
}

#[test]
fn exists_counts_every_occurrence() {
    let mut store = KvStore::default();
    set(&mut store, "a", "1");
    let command = Command::Exists {
        keys: vec![key("a"), key("a"), key("b")],
    };
    assert_eq!(run(&mut store, command), Response::Count(2));
}

#[test]
fn incr_treats_missing_as_zero_and_stores_decimal() {
    let mut store = KvStore::default();
    assert_eq!(
        run(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: 5
            }
        ),
        Response::Integer(5)
    );
    assert_eq!(
        run(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: -12
            }
        ),
        Response::Integer(-7)
    );
    assert_eq!(store.get(b"n"), Some(&b"-7"[..]));
    set(&mut store, "max", &i64::MAX.to_string());
    assert_eq!(
        run(
            &mut store,
            Command::Incr {
                key: key("max"),
                delta: 0
            }
        ),
        Response::Integer(i64::MAX)
    );
}

#[test]
fn incr_refuses_non_canonical_integers() {
    let mut store = KvStore::default();
    for text in [
        "",
        "abc",
        "+1",
        "01",
        "-0",
        " 1",
        "1 ",
        "1.5",
        "9223372036854775808",
        "\u{661}",
    ] {
        set(&mut store, "n", text);
        let error = refused(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: 1,
            },
        );
        assert_eq!(error, KvError::NotAnInteger, "{text:?}");
    }
    store.insert(key("bin"), vec![0xff, 0x31]);
    assert_eq!(
        refused(
            &mut store,
            Command::Incr {
                key: key("bin"),
                delta: 1
            }
        ),
        KvError::NotAnInteger
    );
    for text in ["0", "-1", "10", "-9223372036854775808"] {
        assert_eq!(parse_integer(text.as_bytes()), Some(text.parse().unwrap()));
    }
}

#[test]
fn incr_refuses_overflow() {
    let mut store = KvStore::default();
    set(&mut store, "n", &i64::MAX.to_string());
    assert_eq!(
        refused(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: 1
            }
        ),
        KvError::Overflow
    );
    set(&mut store, "n", &i64::MIN.to_string());
    assert_eq!(
        refused(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: -1
            }
        ),
        KvError::Overflow
    );
}

#[test]
fn mget_answers_in_request_order() {
    let mut store = KvStore::default();
    set(&mut store, "a", "1");
    let command = Command::MGet {
        keys: vec![key("b"), key("a"), key("a")],
    };
    assert_eq!(
        run(&mut store, command),
        Response::Values(vec![None, Some(key("1")), Some(key("1"))])
    );
}

#[test]
fn mget_refuses_results_over_the_reply_limit() {
    let limits = KvLimits {
        value_bytes_max: 1 << 20,
        keys_per_command_max: 8,
        ..KvLimits::default()
    };
    let mut store = KvStore::new(limits);
    store.apply(Command::Set {
        key: key("big"),
        value: vec![7; 1 << 20],
    });
    let four = Command::MGet {
        keys: vec![key("big"); 4],
    };
    let KvError::ResultTooLarge { size, limit } = refused(&mut store, four) else {
        panic!()
    };
    assert_eq!(limit, MAX_RESULT_BYTES);
    assert!(size > limit);
    let three = Command::MGet {
        keys: vec![key("big"); 3],
    };
    assert!(matches!(run(&mut store, three), Response::Values(values) if values.len() == 3));
}

#[test]
fn values_response_size_is_exact() {
    let long = vec![1u8; 300];
    let short = vec![2u8; 3];
    let empty = Vec::new();
    let cases: Vec<Vec<Option<&[u8]>>> = vec![
        vec![None],
        vec![Some(&long), None, Some(&short), Some(&empty)],
        vec![Some(&short); 200],
    ];
    for values in cases {
        let response = Response::Values(
            values
                .iter()
                .map(|value| value.map(<[u8]>::to_vec))
                .collect(),
        );
        assert_eq!(values_response_bytes(&values), response.encode().len());
    }
    assert_eq!(varint_bytes(0), 1);
    assert_eq!(varint_bytes(127), 1);
    assert_eq!(varint_bytes(128), 2);
}

#[test]
fn mset_writes_all_and_last_value_wins() {
    let mut store = KvStore::default();
    set(&mut store, "a", "old");
    let pairs = vec![
        (key("a"), key("1")),
        (key("b"), key("2")),
        (key("a"), key("3")),
    ];
    assert_eq!(run(&mut store, Command::MSet { pairs }), Response::Ok);
    assert_eq!(store.get(b"a"), Some(&b"3"[..]));
    assert_eq!(store.get(b"b"), Some(&b"2"[..]));
    assert_eq!(store.stored_bytes(), 4);
}

#[test]
fn mset_is_all_or_nothing() {
    let mut store = KvStore::new(small_limits());
    let pairs = vec![(key("a"), key("1")), (key("toolongkey"), key("2"))];
    assert_eq!(
        refused(&mut store, Command::MSet { pairs }),
        KvError::KeyTooLarge { size: 10, limit: 8 }
    );
    let pairs = vec![(key("a"), vec![0; 31]), (key("b"), vec![0; 32])];
    assert_eq!(
        refused(&mut store, Command::MSet { pairs }),
        KvError::StoreFull {
            needed: 65,
            limit: 64
        }
    );
    assert!(store.is_empty());
}

#[test]
fn mset_checks_the_final_total_not_intermediate_ones() {
    let mut store = KvStore::new(small_limits());
    store.apply(Command::Set {
        key: key("c"),
        value: vec![0; 31],
    });
    // Written in order, the pairs would pass 64 bytes midway; the final state holds 34.
    let pairs = vec![(key("a"), vec![0; 32]), (key("a"), key("1"))];
    assert_eq!(run(&mut store, Command::MSet { pairs }), Response::Ok);
    assert_eq!(store.stored_bytes(), 34);
}

#[test]
fn compare_and_set_swaps_only_on_match() {
    let mut store = KvStore::default();
    let create = Command::CompareAndSet {
        key: key("k"),
        expected: None,
        new: Some(key("1")),
    };
    assert_eq!(
        run(&mut store, create.clone()),
        Response::CompareAndSet {
            swapped: true,
            current: Some(key("1"))
        }
    );
    assert_eq!(
        run(&mut store, create),
        Response::CompareAndSet {
            swapped: false,
            current: Some(key("1"))
        }
    );
    let wrong = Command::CompareAndSet {
        key: key("k"),
        expected: Some(key("2")),
        new: Some(key("3")),
    };
    assert_eq!(
        run(&mut store, wrong),
        Response::CompareAndSet {
            swapped: false,
            current: Some(key("1"))
        }
    );
    let update = Command::CompareAndSet {
        key: key("k"),
        expected: Some(key("1")),
        new: Some(key("22")),
    };
    assert_eq!(
        run(&mut store, update),
        Response::CompareAndSet {
            swapped: true,
            current: Some(key("22"))
        }
    );
    assert_eq!(store.stored_bytes(), 3);
    let delete = Command::CompareAndSet {
        key: key("k"),
        expected: Some(key("22")),
        new: None,
    };
    assert_eq!(
        run(&mut store, delete),
        Response::CompareAndSet {
            swapped: true,
            current: None
        }
    );
    assert!(store.is_empty());
    let absent = Command::CompareAndSet {
        key: key("k"),
        expected: Some(key("22")),
        new: None,
    };
    assert_eq!(
        run(&mut store, absent),
        Response::CompareAndSet {
            swapped: false,
            current: None
        }
    );
    let delete_absent = Command::CompareAndSet {
        key: key("k"),
        expected: None,
        new: None,
    };
    assert_eq!(
        run(&mut store, delete_absent),
        Response::CompareAndSet {
            swapped: true,
            current: None
        }
    );
}

#[test]
fn every_key_is_size_checked() {
    let mut store = KvStore::new(small_limits());
    let long = key("ninebytes");
    let expected = KvError::KeyTooLarge { size: 9, limit: 8 };
    let commands = [
        Command::Get { key: long.clone() },
        Command::Set {
            key: long.clone(),
            value: key("v"),
        },
        Command::Del {
            keys: vec![key("a"), long.clone()],
        },
        Command::Exists {
            keys: vec![long.clone()],
        },
        Command::Incr {
            key: long.clone(),
            delta: 1,
        },
        Command::MGet {
            keys: vec![long.clone()],
        },
        Command::MSet {
            pairs: vec![(long.clone(), key("v"))],
        },
        Command::CompareAndSet {
            key: long,
            expected: None,
            new: None,
        },
    ];
    for command in commands {
        assert_eq!(refused(&mut store, command), expected);
    }
}

#[test]
fn every_value_is_size_checked() {
    let mut store = KvStore::new(small_limits());
    let long = vec![0; 33];
    let expected = KvError::ValueTooLarge {
        size: 33,
        limit: 32,
    };
    let commands = [
        Command::Set {
            key: key("k"),
            value: long.clone(),
        },
        Command::MSet {
            pairs: vec![(key("a"), key("1")), (key("k"), long.clone())],
        },
        Command::CompareAndSet {
            key: key("k"),
            expected: Some(long.clone()),
            new: None,
        },
        Command::CompareAndSet {
            key: key("k"),
            expected: None,
            new: Some(long),
        },
    ];
    for command in commands {
        assert_eq!(refused(&mut store, command), expected);
    }
}

#[test]
fn key_lists_must_be_non_empty_and_bounded() {
    let mut store = KvStore::new(small_limits());
    let four = vec![key("a"), key("b"), key("c"), key("d")];
    let commands = |keys: Vec<Vec<u8>>| {
        let pairs = keys.iter().map(|key| (key.clone(), key.clone())).collect();
        [
            Command::Del { keys: keys.clone() },
            Command::Exists { keys: keys.clone() },
            Command::MGet { keys },
            Command::MSet { pairs },
        ]
    };
    for command in commands(Vec::new()) {
        assert_eq!(refused(&mut store, command), KvError::EmptyKeyList);
    }
    for command in commands(four) {
        assert_eq!(
            refused(&mut store, command),
            KvError::TooManyKeys { count: 4, limit: 3 }
        );
    }
}

#[test]
fn writes_past_the_total_are_refused() {
    let mut store = KvStore::new(small_limits());
    store.apply(Command::Set {
        key: key("a"),
        value: vec![0; 31],
    });
    store.apply(Command::Set {
        key: key("b"),
        value: vec![0; 30],
    });
    assert_eq!(store.stored_bytes(), 63);
    let full = KvError::StoreFull {
        needed: 65,
        limit: 64,
    };
    assert_eq!(
        refused(
            &mut store,
            Command::Set {
                key: key("c"),
                value: key("1")
            }
        ),
        full
    );
    let grow = Command::CompareAndSet {
        key: key("b"),
        expected: Some(vec![0; 30]),
        new: Some(vec![0; 32]),
    };
    assert_eq!(refused(&mut store, grow), full);
    assert_eq!(
        refused(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: 1
            }
        ),
        KvError::StoreFull {
            needed: 65,
            limit: 64
        }
    );
    // Replacing by something no larger always fits.
    set(&mut store, "b", "");
    assert_eq!(
        run(
            &mut store,
            Command::Incr {
                key: key("n"),
                delta: 1
            }
        ),
        Response::Integer(1)
    );
}

#[test]
fn undecodable_operations_are_malformed_and_change_nothing() {
    let mut store = KvStore::default();
    set(&mut store, "a", "1");
    let before = store.snapshot();
    for operation in [&[][..], &[0xff][..], &[8, 0][..], &[0, 5, 1][..]] {
        let response = Response::decode(&store.execute(operation, 0)).unwrap();
        assert!(
            matches!(response, Response::Error(KvError::Malformed(_))),
            "{operation:?}"
        );
    }
    assert_eq!(store.snapshot(), before);
}

#[test]
fn snapshot_restores_into_an_equal_store() {
    let mut store = KvStore::default();
    for index in 0..100u32 {
        store.apply(Command::Set {
            key: index.to_be_bytes().to_vec(),
            value: vec![index as u8; index as usize],
        });
    }
    let mut restored = KvStore::default();
    restored.restore(&store.snapshot()).unwrap();
    restored.check_invariants();
    assert_eq!(restored.snapshot(), store.snapshot());
    assert_eq!(restored.digest(), store.digest());
    assert_eq!(restored.stored_bytes(), store.stored_bytes());
    assert_ne!(restored.digest(), KvStore::default().digest());
    restored.restore(&KvStore::default().snapshot()).unwrap();
    assert!(restored.is_empty());
    assert_eq!(restored.stored_bytes(), 0);
}

fn encoded_entries(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let owned: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> = entries
        .iter()
        .map(|(key, value)| (key.to_vec(), value.to_vec(), None))
        .collect();
    tessera_types::encode(&owned)
}

#[test]
fn snapshot_format_is_a_plain_sequence_of_triples() {
    let mut store = KvStore::default();
    set(&mut store, "b", "2");
    set(&mut store, "a", &"x".repeat(300));
    let long = "x".repeat(300);
    assert_eq!(
        store.snapshot(),
        encoded_entries(&[(b"a", long.as_bytes()), (b"b", b"2")])
    );
    store.apply_at(
        Command::Expire {
            key: b"b".to_vec(),
            expiry: Expiry::AtMs(5_000),
            condition: ExpireCondition::Always,
        },
        1_000,
    );
    let expected: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> = vec![
        (b"a".to_vec(), long.into_bytes(), None),
        (b"b".to_vec(), b"2".to_vec(), Some(5_000)),
    ];
    assert_eq!(store.snapshot(), tessera_types::encode(&expected));
}

#[test]
fn restore_refuses_invalid_snapshots_and_keeps_state() {
    let mut store = KvStore::new(small_limits());
    set(&mut store, "keep", "me");
    let before = store.snapshot();
    let mut trailing = encoded_entries(&[(b"a", b"1")]);
    trailing.push(0);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xff, 0xff], "not a valid key-value snapshot"),
        (trailing, "not a valid key-value snapshot"),
        (
            encoded_entries(&[(b"b", b"1"), (b"a", b"1")]),
            "entry 1: keys are not in strictly increasing order",
        ),
        (
            encoded_entries(&[(b"a", b"1"), (b"a", b"2")]),
            "entry 1: keys are not in strictly increasing order",
        ),
        (
            encoded_entries(&[(b"ninebytes", b"1")]),
            "entry 0: key of 9 bytes",
        ),
        (
            encoded_entries(&[(b"a", &[0; 33])]),
            "entry 0: value of 33 bytes",
        ),
        (
            encoded_entries(&[(b"a", &[0; 32]), (b"b", &[0; 31])]),
            "entry 1: store would hold 65 bytes",
        ),
    ];
    for (snapshot, reason) in cases {
        let error = store.restore(&snapshot).unwrap_err();
        assert!(
            error.0.contains(reason),
            "{error} does not contain {reason:?}"
        );
        assert_eq!(store.snapshot(), before);
    }
}

#[test]
fn restore_keeps_this_stores_limits() {
    let mut large = KvStore::default();
    large.apply(Command::Set {
        key: key("a"),
        value: vec![0; 100],
    });
    let mut small = KvStore::new(small_limits());
    assert!(small.restore(&large.snapshot()).is_err());
    let mut other = KvStore::default();
    other.restore(&large.snapshot()).unwrap();
    assert_eq!(other.limits(), &KvLimits::default());
}

#[test]
#[should_panic(expected = "invalid key-value limit keys_per_command_max")]
fn new_refuses_invalid_limits() {
    KvStore::new(KvLimits {
        keys_per_command_max: 0,
        ..KvLimits::default()
    });
}

#[test]
fn digest_follows_its_definition() {
    let partition_of = |key: &[u8]| {
        let digest = tessera_crypto::Digest::of(PARTITION_OF_DOMAIN, key);
        (u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap()) % PARTITIONS as u64)
            as usize
    };
    let leaves = |entries: &[(&[u8], &[u8])]| -> Vec<tessera_crypto::Digest> {
        (0..PARTITIONS)
            .map(|index| {
                let mut sum = LtHash::new();
                let mut count = 0;
                for (key, value) in entries {
                    if partition_of(key) == index {
                        sum.add(
                            &tessera_crypto::ElementHasher::new(ENTRY_DOMAIN),
                            &[key, value],
                        );
                        count += 1;
                    }
                }
                let mut builder = DigestBuilder::new(PARTITION_DIGEST_DOMAIN);
                builder.u64(index as u64).u64(count).bytes(&sum.to_bytes());
                builder.finish()
            })
            .collect()
    };
    let root = |entries: &[(&[u8], &[u8])]| MerkleTree::new(&leaves(entries)).unwrap().root();
    assert_eq!(KvStore::default().digest(), root(&[]));

    let mut store = KvStore::default();
    set(&mut store, "a", "bc");
    set(&mut store, "d", "e");
    assert_eq!(store.digest(), root(&[(b"a", b"bc"), (b"d", b"e")]));
    set(&mut store, "a", "x");
    store.apply(Command::Del {
        keys: vec![key("d")],
    });
    assert_eq!(store.digest(), root(&[(b"a", b"x")]));
}

/// The point of partition sums: after a checkpoint, the next digest rehashes the Merkle paths
/// above the partitions written since, not the whole state.
#[test]
fn digest_after_a_few_writes_rehashes_only_their_paths() {
    let mut store = KvStore::default();
    for index in 0..5000u32 {
        store.apply(Command::Set {
            key: index.to_be_bytes().to_vec(),
            value: vec![1; 16],
        });
    }
    store.digest();
    // Not `set`: it checks the invariants, which brings the tree up to date itself.
    store.apply(Command::Set {
        key: key("one"),
        value: key("write"),
    });
    store.digest();
    let hashes = store.cache.borrow().tree.last_root_hashes();
    assert_eq!(
        hashes,
        PARTITIONS.trailing_zeros() as u64,
        "one path to the root"
    );
    store.check_invariants();
}

#[test]
fn digest_spanning_many_pieces_depends_only_on_contents() {
    let entry = |index: u32| (index.to_be_bytes().to_vec(), vec![index as u8; 100]);
    let mut forward = KvStore::default();
    let mut backward = KvStore::default();
    for index in 0..3000 {
        let (key, value) = entry(index);
        forward.apply(Command::Set { key, value });
        let (key, value) = entry(2999 - index);
        backward.apply(Command::Set { key, value });
    }
    assert!(forward.stored_bytes() > 256 * 1024);
    assert_eq!(forward.digest(), backward.digest());
    backward.apply(Command::Set {
        key: entry(1500).0,
        value: vec![0; 100],
    });
    assert_ne!(forward.digest(), backward.digest());
}

fn set_if(name: &str, value: &str, condition: SetCondition, get: bool) -> Command {
    Command::SetIf {
        key: key(name),
        value: key(value),
        condition,
        get,
    }
}

#[test]
fn set_if_writes_only_when_its_condition_holds() {
    let mut store = KvStore::default();
    let absent_only = set_if("k", "1", SetCondition::IfAbsent, false);
    assert_eq!(run(&mut store, absent_only.clone()), Response::Ok);
    assert_eq!(run(&mut store, absent_only), Response::Value(None));
    assert_eq!(store.get(b"k"), Some(&b"1"[..]));
    let present_only = set_if("k", "2", SetCondition::IfPresent, false);
    assert_eq!(run(&mut store, present_only), Response::Ok);
    assert_eq!(store.get(b"k"), Some(&b"2"[..]));
    let missing = set_if("other", "x", SetCondition::IfPresent, false);
    assert_eq!(run(&mut store, missing), Response::Value(None));
    assert_eq!(store.get(b"other"), None);
}

#[test]
fn set_if_with_get_answers_the_previous_value() {
    let mut store = KvStore::default();
    let get_set = |value| set_if("k", value, SetCondition::Always, true);
    assert_eq!(run(&mut store, get_set("1")), Response::Value(None));
    assert_eq!(
        run(&mut store, get_set("2")),
        Response::Value(Some(key("1")))
    );
    // NX GET on a present key: the old value comes back and nothing is written (Redis 7).
    let refused_write = set_if("k", "3", SetCondition::IfAbsent, true);
    assert_eq!(
        run(&mut store, refused_write),
        Response::Value(Some(key("2")))
    );
    assert_eq!(store.get(b"k"), Some(&b"2"[..]));
}

#[test]
fn append_grows_the_value_within_the_value_limit() {
    let mut store = KvStore::new(small_limits());
    let append = |value: &str| Command::Append {
        key: key("k"),
        value: key(value),
    };
    assert_eq!(run(&mut store, append("ab")), Response::Count(2));
    assert_eq!(run(&mut store, append("cd")), Response::Count(4));
    assert_eq!(store.get(b"k"), Some(&b"abcd"[..]));
    let error = refused(&mut store, append(&"x".repeat(29)));
    assert_eq!(
        error,
        KvError::ValueTooLarge {
            size: 33,
            limit: 32
        }
    );
}

#[test]
fn append_respects_the_store_total() {
    let mut store = KvStore::new(small_limits());
    set(&mut store, "a", &"x".repeat(30));
    set(&mut store, "b", &"y".repeat(30));
    set(&mut store, "c", "1");
    assert_eq!(store.stored_bytes(), 64);
    let error = refused(
        &mut store,
        Command::Append {
            key: key("c"),
            value: key("z"),
        },
    );
    assert_eq!(
        error,
        KvError::StoreFull {
            needed: 65,
            limit: 64
        }
    );
}

#[test]
fn strlen_get_del_and_db_size() {
    let mut store = KvStore::default();
    set(&mut store, "a", "hello");
    set(&mut store, "b", "");
    assert_eq!(
        run(&mut store, Command::Strlen { key: key("a") }),
        Response::Count(5)
    );
    assert_eq!(
        run(&mut store, Command::Strlen { key: key("zz") }),
        Response::Count(0)
    );
    assert_eq!(run(&mut store, Command::DbSize), Response::Count(2));
    assert_eq!(
        run(&mut store, Command::GetDel { key: key("a") }),
        Response::Value(Some(key("hello")))
    );
    assert_eq!(
        run(&mut store, Command::GetDel { key: key("a") }),
        Response::Value(None)
    );
    assert_eq!(run(&mut store, Command::DbSize), Response::Count(1));
    assert_eq!(store.stored_bytes(), 1);
}

#[test]
fn flush_db_empties_the_store_and_keeps_its_limits() {
    let mut store = KvStore::new(small_limits());
    set(&mut store, "a", "1");
    set(&mut store, "b", "2");
    assert_eq!(run(&mut store, Command::FlushDb), Response::Count(2));
    assert_eq!(store.len(), 0);
    assert_eq!(store.stored_bytes(), 0);
    assert_eq!(store.limits(), &small_limits());
    assert_eq!(store.digest(), KvStore::new(small_limits()).digest());
    assert_eq!(run(&mut store, Command::FlushDb), Response::Count(0));
}

#[test]
fn new_commands_check_key_sizes() {
    let mut store = KvStore::new(small_limits());
    let long = key("123456789");
    let commands = [
        Command::Strlen { key: long.clone() },
        Command::GetDel { key: long.clone() },
        Command::Append {
            key: long.clone(),
            value: key("v"),
        },
        Command::SetIf {
            key: long,
            value: key("v"),
            condition: SetCondition::Always,
            get: false,
        },
    ];
    for command in commands {
        assert_eq!(
            refused(&mut store, command),
            KvError::KeyTooLarge { size: 9, limit: 8 }
        );
    }
}

// ------------------------------------------------------------------ expiry

/// Applies at agreed time `time_ms` through `execute` and checks invariants.
fn run_at(store: &mut KvStore, time_ms: u64, command: Command) -> Response {
    let response =
        Response::decode(&store.execute(&command.encode(), time_ms)).expect("a valid response");
    store.check_invariants();
    response
}

fn set_px(store: &mut KvStore, time_ms: u64, name: &str, value: &str, ms: i64) -> Response {
    run_at(
        store,
        time_ms,
        Command::SetWithExpiry {
            key: key(name),
            value: key(value),
            condition: SetCondition::Always,
            get: false,
            expiry: Expiry::InMs(ms),
        },
    )
}

fn ttl(store: &mut KvStore, time_ms: u64, name: &str) -> Response {
    run_at(store, time_ms, Command::Ttl { key: key(name) })
}

#[test]
fn a_key_expires_at_its_agreed_time_for_every_command() {
    let mut store = KvStore::default();
    assert_eq!(set_px(&mut store, 1_000, "k", "v", 300), Response::Ok);
    assert_eq!(ttl(&mut store, 1_100, "k"), Response::Integer(200));
    assert_eq!(
        run_at(&mut store, 1_299, Command::Get { key: key("k") }),
        Response::Value(Some(key("v")))
    );
    // At exactly 1300 it is gone (Redis: expired once its time has come).
    assert_eq!(
        run_at(
            &mut store,
            1_300,
            Command::Exists {
                keys: vec![key("k")]
            }
        ),
        Response::Count(0)
    );
    assert_eq!(ttl(&mut store, 1_300, "k"), Response::Integer(-2));
    assert_eq!(
        run_at(&mut store, 1_300, Command::DbSize),
        Response::Count(0)
    );
    assert!(store.is_empty(), "named and counted keys are removed");
}

#[test]
fn plain_set_clears_the_expiry_and_keepttl_incr_append_keep_it() {
    let mut store = KvStore::default();
    set_px(&mut store, 0, "a", "1", 1_000);
    run_at(
        &mut store,
        10,
        Command::Incr {
            key: key("a"),
            delta: 1,
        },
    );
    run_at(
        &mut store,
        10,
        Command::Append {
            key: key("a"),
            value: key("0"),
        },
    );
    assert_eq!(ttl(&mut store, 10, "a"), Response::Integer(990));
    run_at(
        &mut store,
        20,
        Command::SetWithExpiry {
            key: key("a"),
            value: key("x"),
            condition: SetCondition::Always,
            get: false,
            expiry: Expiry::Keep,
        },
    );
    assert_eq!(ttl(&mut store, 20, "a"), Response::Integer(980));
    run_at(
        &mut store,
        30,
        Command::Set {
            key: key("a"),
            value: key("y"),
        },
    );
    assert_eq!(ttl(&mut store, 30, "a"), Response::Integer(-1));
    assert_eq!(ttl(&mut store, 30, "missing"), Response::Integer(-2));
}

#[test]
fn expire_options_and_a_past_time_deletes() {
    let mut store = KvStore::default();
    set(&mut store, "k", "v");
    let expire = |store: &mut KvStore, expiry, condition| {
        run_at(
            store,
            100,
            Command::Expire {
                key: key("k"),
                expiry,
                condition,
            },
        )
    };
    use ExpireCondition::*;
    // GT on a key without expiry never applies (infinite TTL); XX neither; LT does.
    assert_eq!(
        expire(&mut store, Expiry::InMs(50), IfLater),
        Response::Integer(0)
    );
    assert_eq!(
        expire(&mut store, Expiry::InMs(50), IfSome),
        Response::Integer(0)
    );
    assert_eq!(
        expire(&mut store, Expiry::InMs(500), IfEarlier),
        Response::Integer(1)
    );
    assert_eq!(store.expiry_of(b"k"), Some(600));
    assert_eq!(
        expire(&mut store, Expiry::InMs(50), IfNone),
        Response::Integer(0)
    );
    assert_eq!(
        expire(&mut store, Expiry::AtMs(700), IfLater),
        Response::Integer(1)
    );
    assert_eq!(
        expire(&mut store, Expiry::AtMs(650), IfLater),
        Response::Integer(0)
    );
    assert_eq!(
        run_at(&mut store, 100, Command::Persist { key: key("k") }),
        Response::Integer(1)
    );
    assert_eq!(
        run_at(&mut store, 100, Command::Persist { key: key("k") }),
        Response::Integer(0)
    );
    // A non-positive relative time deletes the key (and answers 1).
    assert_eq!(
        expire(&mut store, Expiry::InMs(0), Always),
        Response::Integer(1)
    );
    assert_eq!(store.get(b"k"), None);
    assert_eq!(
        expire(&mut store, Expiry::InMs(10), Always),
        Response::Integer(0)
    );
    // An expiry past what a signed 64-bit count of ms holds is refused and changes nothing.
    set(&mut store, "k", "v");
    assert_eq!(
        expire(&mut store, Expiry::InMs(i64::MAX), Always),
        Response::Error(KvError::InvalidExpireTime)
    );
    assert_eq!(store.expiry_of(b"k"), None);
}

#[test]
fn getex_and_set_with_past_time() {
    let mut store = KvStore::default();
    set(&mut store, "k", "v");
    assert_eq!(
        run_at(
            &mut store,
            100,
            Command::GetEx {
                key: key("k"),
                expiry: Expiry::InMs(100)
            }
        ),
        Response::Value(Some(key("v")))
    );
    assert_eq!(store.expiry_of(b"k"), Some(200));
    // PXAT in the past: written and gone at once; GET answers the value before.
    assert_eq!(
        run_at(
            &mut store,
            150,
            Command::SetWithExpiry {
                key: key("k"),
                value: key("w"),
                condition: SetCondition::Always,
                get: true,
                expiry: Expiry::AtMs(10),
            }
        ),
        Response::Value(Some(key("v")))
    );
    assert_eq!(store.get(b"k"), None);
    assert!(store.is_empty());
}

#[test]
fn the_digest_covers_expiries_and_the_sweep_removes_untouched_keys() {
    let mut with = KvStore::default();
    let mut without = KvStore::default();
    set_px(&mut with, 0, "k", "v", 1_000);
    set(&mut without, "k", "v");
    assert_ne!(
        with.digest(),
        without.digest(),
        "the expiry is in the digest"
    );
    let mut later = KvStore::default();
    set_px(&mut later, 0, "k", "v", 2_000);
    assert_ne!(with.digest(), later.digest(), "so is its value");
    run_at(&mut with, 0, Command::Persist { key: key("k") });
    assert_eq!(with.digest(), without.digest(), "and nothing else");

    // Keys nobody names again are swept, a bounded number per command, earliest first.
    let mut store = KvStore::default();
    for index in 0..(SWEEP_PER_COMMAND + 4) {
        set_px(&mut store, 0, &format!("k{index}"), "v", 10 + index as i64);
    }
    run_at(&mut store, 1_000, Command::Get { key: key("other") });
    assert_eq!(store.len(), 4);
    run_at(&mut store, 1_000, Command::Get { key: key("other") });
    assert!(store.is_empty());
}

#[test]
fn transfer_carries_expiries() {
    let mut source = KvStore::default();
    set_px(&mut source, 0, "a", "1", 5_000);
    set(&mut source, "b", "2");
    let frozen = source.freeze();
    let mut target = KvStore::default();
    let staged: Vec<KvStaged> = (0..PARTITIONS as u32)
        .filter(|index| frozen.partition_digest(*index) != target.partition_digest(*index))
        .map(|index| {
            let mut staged = target.stage(index);
            let chunk = frozen.chunk(index, None, 1 << 20);
            staged.append(&chunk.bytes).unwrap();
            assert_eq!(staged.digest(), frozen.partition_digest(index));
            staged
        })
        .collect();
    target.install(staged).unwrap();
    target.check_invariants();
    assert_eq!(target.digest(), source.digest());
    assert_eq!(ttl(&mut target, 1_000, "a"), Response::Integer(4_000));
    assert_eq!(ttl(&mut target, 1_000, "b"), Response::Integer(-1));
    // The installed expiry is indexed: the sweep finds it.
    run_at(&mut target, 6_000, Command::Get { key: key("zz") });
    assert_eq!(target.len(), 1);
}

#[test]
fn a_full_store_makes_room_by_removing_expired_keys() {
    let mut store = KvStore::new(small_limits());
    // 64 bytes in all: two entries of 32 fill it.
    for name in ["a", "b"] {
        set_px(&mut store, 0, name, &"x".repeat(31), 10);
    }
    let fill = |store: &mut KvStore, name: &str| {
        run_at(
            store,
            20,
            Command::Set {
                key: key(name),
                value: "y".repeat(31).into_bytes(),
            },
        )
    };
    assert_eq!(fill(&mut store, "c"), Response::Ok);
    assert_eq!(run_at(&mut store, 20, Command::DbSize), Response::Count(1));
}
