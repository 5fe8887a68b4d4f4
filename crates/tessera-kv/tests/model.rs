//! Property tests: the store against a simple model, canonical snapshots, and arbitrary input.

use std::collections::HashMap;

use proptest::prelude::*;
use tessera_kv::{
    Command, ExpireCondition, Expiry, KvError, KvLimits, KvStore, Response, SetCondition,
    StateMachine,
};

/// Small limits so that random commands hit every limit often.
const LIMITS: KvLimits = KvLimits {
    key_bytes_max: 4,
    value_bytes_max: 24,
    keys_per_command_max: 4,
    total_bytes_max: 96,
};

/// The obvious implementation: a hash map, totals recomputed from scratch, writes tried on a
/// copy and kept only if the copy fits; expired keys simply vanish before every command.
#[derive(Default)]
struct Model {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Expiry of the keys in `map` that have one.
    expiries: HashMap<Vec<u8>, u64>,
    time_ms: u64,
}

/// The absolute time `expiry` gives, or `None` for Keep/Persist (model's own arithmetic).
fn model_expiry(expiry: Expiry, time_ms: u64) -> Result<Option<i128>, KvError> {
    let at = match expiry {
        Expiry::Keep | Expiry::Persist => return Ok(None),
        Expiry::InMs(ms) => time_ms as i128 + ms as i128,
        Expiry::AtMs(ms) => ms as i128,
    };
    if at > i64::MAX as i128 {
        return Err(KvError::InvalidExpireTime);
    }
    Ok(Some(at))
}

impl Model {
    fn apply(&mut self, command: &Command, time_ms: u64) -> Response {
        self.time_ms = time_ms;
        let expired: Vec<Vec<u8>> = self
            .expiries
            .iter()
            .filter(|(_, at)| **at <= time_ms)
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            self.map.remove(&key);
            self.expiries.remove(&key);
        }
        match self.try_apply(command) {
            Ok(response) => response,
            Err(error) => Response::Error(error),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<Response, KvError> {
        check(command)?;
        let mut next = self.map.clone();
        let mut expiries = self.expiries.clone();
        let now = self.time_ms as i128;
        // Writes that replace a value clear its expiry; Incr and Append keep it.
        let cleared: Vec<Vec<u8>> = match command {
            Command::Set { key, .. } | Command::GetDel { key } => vec![key.clone()],
            Command::CompareAndSet { key, expected, .. } if next.get(key) == expected.as_ref() => {
                vec![key.clone()]
            }
            Command::SetIf { key, condition, .. } => match (condition, next.contains_key(key)) {
                (SetCondition::Always, _)
                | (SetCondition::IfAbsent, false)
                | (SetCondition::IfPresent, true) => vec![key.clone()],
                _ => vec![],
            },
            Command::Del { keys } => keys.clone(),
            Command::MSet { pairs } => pairs.iter().map(|(key, _)| key.clone()).collect(),
            Command::FlushDb => next.keys().cloned().collect(),
            _ => vec![],
        };
        for key in cleared {
            expiries.remove(&key);
        }
        let response = match command {
            Command::SetWithExpiry {
                key,
                value,
                condition,
                get,
                expiry,
            } => {
                let at = model_expiry(*expiry, self.time_ms)?;
                let previous = next.get(key).cloned();
                let write = match condition {
                    SetCondition::Always => true,
                    SetCondition::IfAbsent => previous.is_none(),
                    SetCondition::IfPresent => previous.is_some(),
                };
                if write {
                    match (expiry, at) {
                        (Expiry::Keep, _) => {}
                        (_, None) => {
                            expiries.remove(key);
                        }
                        (_, Some(at)) => {
                            expiries.insert(key.clone(), at.max(0) as u64);
                        }
                    }
                    if at.is_some_and(|at| at <= now) {
                        next.remove(key);
                        expiries.remove(key);
                    } else {
                        next.insert(key.clone(), value.clone());
                    }
                }
                match (get, write) {
                    (true, _) => Response::Value(previous),
                    (false, true) => Response::Ok,
                    (false, false) => Response::Value(None),
                }
            }
            Command::Expire {
                key,
                expiry,
                condition,
            } => {
                let Some(at) = model_expiry(*expiry, self.time_ms)? else {
                    return Ok(Response::Integer(0));
                };
                if !next.contains_key(key) {
                    Response::Integer(0)
                } else {
                    let current = expiries.get(key).map(|at| *at as i128);
                    let applies = match condition {
                        ExpireCondition::Always => true,
                        ExpireCondition::IfNone => current.is_none(),
                        ExpireCondition::IfSome => current.is_some(),
                        ExpireCondition::IfLater => {
                            current.is_some_and(|current| at.max(0) > current)
                        }
                        ExpireCondition::IfEarlier => {
                            current.is_none_or(|current| at.max(0) < current)
                        }
                        ExpireCondition::IfEarlierWithExpiry => {
                            current.is_some_and(|current| at.max(0) < current)
                        }
                    };
                    if applies && at <= now {
                        next.remove(key);
                        expiries.remove(key);
                    } else if applies {
                        expiries.insert(key.clone(), at as u64);
                    }
                    Response::Integer(i64::from(applies))
                }
            }
            Command::Ttl { key } => {
                Response::Integer(match (next.contains_key(key), expiries.get(key)) {
                    (false, _) => -2,
                    (true, None) => -1,
                    (true, Some(at)) => (*at as i128 - now) as i64,
                })
            }
            Command::ExpireTime { key } => {
                Response::Integer(match (next.contains_key(key), expiries.get(key)) {
                    (false, _) => -2,
                    (true, None) => -1,
                    (true, Some(at)) => *at as i64,
                })
            }
            Command::Persist { key } => Response::Integer(i64::from(
                next.contains_key(key) && expiries.remove(key).is_some(),
            )),
            Command::GetEx { key, expiry } => {
                let at = model_expiry(*expiry, self.time_ms)?;
                let value = next.get(key).cloned();
                if value.is_some() {
                    match (expiry, at) {
                        (Expiry::Keep, _) => {}
                        (_, None) => {
                            expiries.remove(key);
                        }
                        (_, Some(at)) if at <= now => {
                            next.remove(key);
                            expiries.remove(key);
                        }
                        (_, Some(at)) => {
                            expiries.insert(key.clone(), at as u64);
                        }
                    }
                }
                Response::Value(value)
            }
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
        self.expiries = expiries;
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
        | Command::GetDel { key: name }
        | Command::Expire { key: name, .. }
        | Command::Ttl { key: name }
        | Command::Persist { key: name }
        | Command::GetEx { key: name, .. }
        | Command::ExpireTime { key: name } => key(name),
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
        | Command::SetWithExpiry {
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
        (key(), value(), condition(), any::<bool>(), expiry()).prop_map(
            |(key, value, condition, get, expiry)| Command::SetWithExpiry {
                key,
                value,
                condition,
                get,
                expiry,
            }
        ),
        (key(), expiry(), expire_condition()).prop_map(|(key, expiry, condition)| {
            Command::Expire {
                key,
                expiry,
                condition,
            }
        }),
        key().prop_map(|key| Command::Ttl { key }),
        key().prop_map(|key| Command::Persist { key }),
        (key(), expiry()).prop_map(|(key, expiry)| Command::GetEx { key, expiry }),
        key().prop_map(|key| Command::ExpireTime { key }),
        // Rare, so histories still grow large enough to reach the total limit.
        prop::sample::select(vec![
            Command::FlushDb,
            Command::DbSize,
            Command::DbSize,
            Command::DbSize
        ]),
    ]
}

/// Expiries around the model's times (which start at 1000 and grow by up to 40 ms a command),
/// and the extremes.
fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![
        Just(Expiry::Keep),
        Just(Expiry::Persist),
        (-20i64..200).prop_map(Expiry::InMs),
        (900i64..2_500).prop_map(Expiry::AtMs),
        prop::sample::select(vec![i64::MIN, -1, 0, i64::MAX]).prop_map(Expiry::InMs),
        prop::sample::select(vec![i64::MIN, 0, i64::MAX]).prop_map(Expiry::AtMs),
    ]
}

fn expire_condition() -> impl Strategy<Value = ExpireCondition> {
    prop::sample::select(vec![
        ExpireCondition::Always,
        ExpireCondition::IfNone,
        ExpireCondition::IfSome,
        ExpireCondition::IfLater,
        ExpireCondition::IfEarlier,
        ExpireCondition::IfEarlierWithExpiry,
    ])
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
    fn store_matches_model(
        commands in prop::collection::vec((command(), 0u64..40), 1..60),
    ) {
        let mut store = KvStore::new(LIMITS);
        let mut model = Model::default();
        let mut time_ms = 1_000;
        for (command, step_ms) in &commands {
            time_ms += step_ms;
            let result = store.execute(&command.encode(), time_ms);
            let response = Response::decode(&result).expect("results always decode");
            prop_assert_eq!(&response, &model.apply(command, time_ms), "after {:?} at {}", command, time_ms);
            // The store may still hold expired keys (removed lazily); what it answers for is
            // the live ones.
            for (key, value) in &model.map {
                prop_assert_eq!(store.get(key), Some(value.as_slice()));
                prop_assert_eq!(store.expiry_of(key), model.expiries.get(key).copied());
            }
            prop_assert!(store.len() >= model.map.len());
        }
        let dbsize = Response::decode(&store.execute(&Command::DbSize.encode(), time_ms)).unwrap();
        prop_assert_eq!(dbsize, Response::Count(model.map.len() as u64));
        prop_assert_eq!(store.len(), model.map.len(), "DbSize removed every expired key");
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
