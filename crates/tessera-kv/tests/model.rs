//! Property tests: the store against a simple model, canonical snapshots, and arbitrary input.

use std::collections::HashMap;

use proptest::prelude::*;
use tessera_kv::{Command, KvError, KvLimits, KvStore, Response, SetCondition, StateMachine};

/// Small limits so that random commands hit every limit often.
const LIMITS: KvLimits = KvLimits {
    key_bytes_max: 4,
    value_bytes_max: 24,
    keys_per_command_max: 4,
    total_bytes_max: 96,
};

/// The obvious implementation: a hash map, totals recomputed from scratch, writes tried on a
/// copy and kept only if the copy fits.
#[derive(Default)]
struct Model {
    map: HashMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    fn apply(&mut self, command: &Command) -> Response {
        match self.try_apply(command) {
            Ok(response) => response,
            Err(error) => Response::Error(error),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<Response, KvError> {
        check(command)?;
        let mut next = self.map.clone();
        let response = match command {
            Command::Get { key } => Response::Value(next.get(key).cloned()),
            Command::Set { key, value } => {
                next.insert(key.clone(), value.clone());
                Response::Ok
            }
            Command::Del { keys } => Response::Count(
                keys.iter()
                    .filter(|key| next.remove(*key).is_some())
                    .count() as u64,
            ),
            Command::Exists { keys } => {
                Response::Count(keys.iter().filter(|key| next.contains_key(*key)).count() as u64)
            }
            Command::Incr { key, delta } => {
                let current = match next.get(key) {
                    None => 0,
                    Some(text) => model_integer(text).ok_or(KvError::NotAnInteger)?,
                };
                let updated = current.checked_add(*delta).ok_or(KvError::Overflow)?;
                next.insert(key.clone(), updated.to_string().into_bytes());
                Response::Integer(updated)
            }
            Command::MGet { keys } => {
                Response::Values(keys.iter().map(|key| next.get(key).cloned()).collect())
            }
            Command::MSet { pairs } => {
                next.extend(pairs.iter().cloned());
                Response::Ok
            }
            Command::CompareAndSet { key, expected, new } => {
                if next.get(key) != expected.as_ref() {
                    Response::CompareAndSet {
                        swapped: false,
                        current: next.get(key).cloned(),
                    }
                } else {
                    match new {
                        Some(value) => next.insert(key.clone(), value.clone()),
                        None => next.remove(key),
                    };
                    Response::CompareAndSet {
                        swapped: true,
                        current: new.clone(),
                    }
                }
            }
            Command::SetIf {
                key,
                value,
                condition,
                get,
            } => {
                let previous = next.get(key).cloned();
                let write = match condition {
                    SetCondition::Always => true,
                    SetCondition::IfAbsent => previous.is_none(),
                    SetCondition::IfPresent => previous.is_some(),
                };
                if write {
                    next.insert(key.clone(), value.clone());
                }
                match (get, write) {
                    (true, _) => Response::Value(previous),
                    (false, true) => Response::Ok,
                    (false, false) => Response::Value(None),
                }
            }
            Command::Append { key, value } => {
                let mut joined = next.get(key).cloned().unwrap_or_default();
                joined.extend_from_slice(value);
                if joined.len() > LIMITS.value_bytes_max {
                    return Err(KvError::ValueTooLarge {
                        size: joined.len(),
                        limit: LIMITS.value_bytes_max,
                    });
                }
                let length = joined.len() as u64;
                next.insert(key.clone(), joined);
                Response::Count(length)
            }
            Command::Strlen { key } => Response::Count(next.get(key).map_or(0, Vec::len) as u64),
            Command::GetDel { key } => Response::Value(next.remove(key)),
            Command::DbSize => Response::Count(next.len() as u64),
            Command::FlushDb => {
                let deleted = next.len() as u64;
                next.clear();
                Response::Count(deleted)
            }
        };
        let needed: u64 = next
            .iter()
            .map(|(key, value)| (key.len() + value.len()) as u64)
            .sum();
        if needed > LIMITS.total_bytes_max {
            return Err(KvError::StoreFull {
                needed,
                limit: LIMITS.total_bytes_max,
            });
        }
        self.map = next;
        Ok(response)
    }
}

fn check(command: &Command) -> Result<(), KvError> {
    let key = |key: &Vec<u8>| match key.len() > LIMITS.key_bytes_max {
        true => Err(KvError::KeyTooLarge {
            size: key.len(),
            limit: LIMITS.key_bytes_max,
        }),
        false => Ok(()),
    };
    let value = |value: &Vec<u8>| match value.len() > LIMITS.value_bytes_max {
        true => Err(KvError::ValueTooLarge {
            size: value.len(),
            limit: LIMITS.value_bytes_max,
        }),
        false => Ok(()),
    };
    let count = |count: usize| match count {
        0 => Err(KvError::EmptyKeyList),
        count if count > LIMITS.keys_per_command_max => Err(KvError::TooManyKeys {
            count,
            limit: LIMITS.keys_per_command_max,
        }),
        _ => Ok(()),
    };
    match command {
        Command::Get { key: name }
        | Command::Incr { key: name, .. }
        | Command::Strlen { key: name }
        | Command::GetDel { key: name } => key(name),
        Command::DbSize | Command::FlushDb => Ok(()),
        Command::Set {
            key: name,
            value: content,
        }
        | Command::SetIf {
            key: name,
            value: content,
            ..
        }
        | Command::Append {
            key: name,
            value: content,
        } => key(name).and(value(content)),
        Command::Del { keys } | Command::Exists { keys } | Command::MGet { keys } => {
            count(keys.len())?;
            keys.iter().try_for_each(key)
        }
        Command::MSet { pairs } => {
            count(pairs.len())?;
            pairs
                .iter()
                .try_for_each(|(name, content)| key(name).and(value(content)))
        }
        Command::CompareAndSet {
            key: name,
            expected,
            new,
        } => {
            key(name)?;
            expected.iter().chain(new).try_for_each(value)
        }
    }
}

/// Canonical decimal, checked character by character rather than by round trip.
fn model_integer(text: &[u8]) -> Option<i64> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    let canonical = match digits {
        [] => false,
        [b'0'] => digits.len() == text.len(),
        [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b"ab".to_vec()), 0..=5)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<i64>().prop_map(|number| number.to_string().into_bytes()),
        (-3i64..3).prop_map(|number| number.to_string().into_bytes()),
        prop::collection::vec(prop::sample::select(b"0123456789-+ x".to_vec()), 0..4),
        prop::collection::vec(any::<u8>(), 0..=26),
    ]
}

fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(key(), 0..=5)
}

fn delta() -> impl Strategy<Value = i64> {
    prop_oneof![-3i64..3, any::<i64>(), Just(i64::MAX), Just(i64::MIN)]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        key().prop_map(|key| Command::Get { key }),
        (key(), value()).prop_map(|(key, value)| Command::Set { key, value }),
        keys().prop_map(|keys| Command::Del { keys }),
        keys().prop_map(|keys| Command::Exists { keys }),
        (key(), delta()).prop_map(|(key, delta)| Command::Incr { key, delta }),
        keys().prop_map(|keys| Command::MGet { keys }),
        prop::collection::vec((key(), value()), 0..=5).prop_map(|pairs| Command::MSet { pairs }),
        (key(), prop::option::of(value()), prop::option::of(value()))
            .prop_map(|(key, expected, new)| Command::CompareAndSet { key, expected, new }),
        (key(), value(), condition(), any::<bool>()).prop_map(|(key, value, condition, get)| {
            Command::SetIf {
                key,
                value,
                condition,
                get,
            }
        }),
        (key(), value()).prop_map(|(key, value)| Command::Append { key, value }),
        key().prop_map(|key| Command::Strlen { key }),
        key().prop_map(|key| Command::GetDel { key }),
        Just(Command::DbSize),
        // Rare, so histories still grow large enough to reach the total limit.
        prop::sample::select(vec![
            Command::FlushDb,
            Command::DbSize,
            Command::DbSize,
            Command::DbSize
        ]),
    ]
}

fn condition() -> impl Strategy<Value = SetCondition> {
    prop::sample::select(vec![
        SetCondition::Always,
        SetCondition::IfAbsent,
        SetCondition::IfPresent,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn store_matches_model(commands in prop::collection::vec(command(), 1..60)) {
        let mut store = KvStore::new(LIMITS);
        let mut model = Model::default();
        for command in &commands {
            let result = store.execute(&command.encode(), 0);
            let response = Response::decode(&result).expect("results always decode");
            prop_assert_eq!(&response, &model.apply(command), "after {:?}", command);
            prop_assert_eq!(store.len(), model.map.len());
            for (key, value) in &model.map {
                prop_assert_eq!(store.get(key), Some(value.as_slice()));
            }
        }
        let expected: u64 = model.map.iter().map(|(key, value)| (key.len() + value.len()) as u64).sum();
        prop_assert_eq!(store.stored_bytes(), expected);
    }

    #[test]
    fn equal_contents_give_equal_snapshots(
        contents in prop::collection::btree_map(key(), value(), 0..12),
        noise in prop::collection::vec((key(), value()), 0..12),
    ) {
        let mut forward = KvStore::default();
        for (key, value) in &contents {
            forward.apply(Command::Set { key: key.clone(), value: value.clone() });
        }
        // Same contents by another route: noise written first, then overwritten or deleted,
        // final values written in reverse order.
        let mut backward = KvStore::default();
        for (key, value) in &noise {
            backward.apply(Command::Set { key: key.clone(), value: value.clone() });
            backward.apply(Command::Incr { key: key.clone(), delta: 1 });
        }
        for (key, value) in contents.iter().rev() {
            backward.apply(Command::MSet { pairs: vec![(key.clone(), b"tmp".to_vec()), (key.clone(), value.clone())] });
        }
        for (key, _) in &noise {
            if !contents.contains_key(key) {
                backward.apply(Command::Del { keys: vec![key.clone()] });
            }
        }
        prop_assert_eq!(forward.snapshot(), backward.snapshot());
        prop_assert_eq!(forward.digest(), backward.digest());
        prop_assert_eq!(forward.stored_bytes(), backward.stored_bytes());
    }

    #[test]
    fn restore_round_trips(contents in prop::collection::btree_map(key(), value(), 0..20)) {
        let mut store = KvStore::default();
        for (key, value) in &contents {
            store.apply(Command::Set { key: key.clone(), value: value.clone() });
        }
        let mut restored = KvStore::default();
        restored.restore(&store.snapshot()).expect("own snapshots restore");
        prop_assert_eq!(restored.snapshot(), store.snapshot());
        prop_assert_eq!(restored.digest(), store.digest());
        prop_assert_eq!(restored.stored_bytes(), store.stored_bytes());
        prop_assert_eq!(restored.len(), contents.len());
    }

    #[test]
    fn arbitrary_operations_never_panic(
        setup in prop::collection::vec(command(), 0..10),
        operation in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (command(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(command, index, byte)| {
                let mut bytes = command.encode();
                let position = index.index(bytes.len());
                bytes[position] = byte;
                bytes
            }),
            (command(), any::<prop::sample::Index>()).prop_map(|(command, index)| {
                let bytes = command.encode();
                bytes[..index.index(bytes.len())].to_vec()
            }),
        ],
    ) {
        let mut store = KvStore::new(LIMITS);
        for command in setup {
            store.apply(command);
        }
        let before = store.snapshot();
        let response = Response::decode(&store.execute(&operation, 0)).expect("results always decode");
        if let Response::Error(_) = response {
            prop_assert_eq!(store.snapshot(), before);
        }
    }

    #[test]
    fn arbitrary_snapshots_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut store = KvStore::new(LIMITS);
        store.apply(Command::Set { key: b"a".to_vec(), value: b"1".to_vec() });
        let before = store.snapshot();
        match store.restore(&bytes) {
            Ok(()) => prop_assert_eq!(store.snapshot(), bytes),
            Err(_) => prop_assert_eq!(store.snapshot(), before),
        }
    }
}
