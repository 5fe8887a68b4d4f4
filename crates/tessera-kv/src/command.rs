//! Commands, responses and errors, and their canonical encoding.
//!
//! Owns the wire format between clients and the store. Decoding is bounded and never panics;
//! error texts are produced here, not by the codec, so every replica (whatever its library
//! versions) returns byte-identical results for the same malformed input.

use serde::{Deserialize, Serialize};
use tessera_types::limits::{MAX_OPERATION_BYTES, MAX_RESULT_BYTES};
use tessera_types::DecodeError;
use thiserror::Error;

/// One operation on the store. Encoded with [`Command::encode`] into a client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Reads one key. Answers [`Response::Value`].
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Writes one key. Answers [`Response::Ok`].
    Set {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Deletes keys. Answers [`Response::Count`]: how many existed (a repeated key counts once).
    Del { keys: Vec<Vec<u8>> },
    /// Answers [`Response::Count`]: how many of `keys` exist (a repeated key counts each time).
    Exists { keys: Vec<Vec<u8>> },
    /// Adds `delta` to a value holding a canonical ASCII decimal `i64` (a missing key is 0).
    /// Answers [`Response::Integer`] with the new value.
    Incr {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        delta: i64,
    },
    /// Reads keys. Answers [`Response::Values`], one entry per key in order.
    MGet { keys: Vec<Vec<u8>> },
    /// Writes every pair or none (a repeated key takes its last value). Answers [`Response::Ok`].
    MSet { pairs: Vec<(Vec<u8>, Vec<u8>)> },
    /// Replaces the value of `key` by `new` if it currently equals `expected`. `None` expected
    /// means "the key must be absent"; `None` new means "delete the key".
    /// Answers [`Response::CompareAndSet`].
    CompareAndSet {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    // Variants below were added after the first release; new ones go at the end so the
    // encoding of every earlier command stays the same.
    /// Writes one key if `condition` holds (Redis `SET` with `NX`/`XX`/`GET`, and `GETSET`).
    /// Answers [`Response::Value`] with the previous value when `get` is set; otherwise
    /// [`Response::Ok`] if the key was written and `Value(None)` if the condition failed.
    SetIf {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        condition: SetCondition,
        get: bool,
    },
    /// Appends `value` to the value of `key` (a missing key is empty). Answers
    /// [`Response::Count`] with the new length.
    Append {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Answers [`Response::Count`]: the length of the value of `key` (0 if absent).
    Strlen {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Deletes `key` and answers [`Response::Value`] with the value it had.
    GetDel {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Answers [`Response::Count`]: the number of keys.
    DbSize,
    /// Deletes every key. Answers [`Response::Count`]: how many keys were deleted.
    FlushDb,
    // Expiry (docs/GATEWAY.md, *Expiry*). Every time below is resolved against the agreed time
    // of the batch the command executes in, never a clock: a relative time becomes absolute in
    // the store, on every replica alike.
    /// Writes one key if `condition` holds, and sets its expiry as `expiry` says (Redis `SET`
    /// with `EX`/`PX`/`EXAT`/`PXAT`/`KEEPTTL`, `SETEX`, `PSETEX`). Answers like [`Command::SetIf`].
    /// An expiry already past (an absolute time at or before the agreed time, or a relative one
    /// of 0 ms or less) writes the key expired: it is gone at once.
    SetWithExpiry {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        condition: SetCondition,
        get: bool,
        expiry: Expiry,
    },
    /// Changes the expiry of an existing key if `condition` holds (Redis `EXPIRE`, `PEXPIRE`,
    /// `EXPIREAT`, `PEXPIREAT` with `NX`/`XX`/`GT`/`LT`). Answers [`Response::Integer`]: 1 if
    /// the expiry was set (an expiry already past deletes the key), 0 if the key does not exist
    /// or the condition failed. `expiry` is `InMs` or `AtMs`; `Keep` and `Persist` answer 0.
    Expire {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expiry: Expiry,
        condition: ExpireCondition,
    },
    /// Answers [`Response::Integer`]: the milliseconds left before `key` expires, -1 if it has
    /// no expiry, -2 if it does not exist (Redis `PTTL`; `TTL` rounds it to seconds).
    Ttl {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Removes the expiry of `key`. Answers [`Response::Integer`]: 1 if it had one, else 0.
    Persist {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Reads `key` and changes its expiry as `expiry` says (Redis `GETEX`; `Keep` leaves it).
    /// Answers [`Response::Value`]. An expiry already past deletes the key after reading it.
    GetEx {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expiry: Expiry,
    },
    /// Answers [`Response::Integer`]: the absolute expiry of `key` in ms since the Unix epoch,
    /// -1 if it has none, -2 if it does not exist (Redis `PEXPIRETIME`).
    ExpireTime {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// What a write does to a key's expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    /// The key keeps the expiry it has (`KEEPTTL`; `GETEX` without an option).
    Keep,
    /// The key has no expiry afterwards (a plain `SET`; `PERSIST`).
    Persist,
    /// The key expires this many milliseconds after the agreed time of the command's batch
    /// (`EX`, `PX`); 0 or less means at once.
    InMs(i64),
    /// The key expires at this absolute time, in ms since the Unix epoch (`EXAT`, `PXAT`).
    AtMs(i64),
}

/// When [`Command::Expire`] changes the expiry (Redis 7's options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireCondition {
    /// Always.
    Always,
    /// Only if the key has no expiry (`NX`).
    IfNone,
    /// Only if the key has an expiry (`XX`).
    IfSome,
    /// Only if the new expiry is later than the current one; a key without one never (`GT`).
    IfLater,
    /// Only if the new expiry is earlier than the current one; a key without one always (`LT`).
    IfEarlier,
    /// Only if the key has an expiry and the new one is earlier (`XX` with `LT`).
    IfEarlierWithExpiry,
}

/// When [`Command::SetIf`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetCondition {
    /// Always (plain `SET`, `GETSET`).
    Always,
    /// Only if the key is absent (`NX`).
    IfAbsent,
    /// Only if the key is present (`XX`).
    IfPresent,
}

impl Command {
    /// The keys the command names, in order, repeats included (none for DBSIZE and FLUSHDB,
    /// which concern every key).
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Command::Get { key }
            | Command::Set { key, .. }
            | Command::Incr { key, .. }
            | Command::CompareAndSet { key, .. }
            | Command::SetIf { key, .. }
            | Command::Append { key, .. }
            | Command::Strlen { key }
            | Command::GetDel { key }
            | Command::SetWithExpiry { key, .. }
            | Command::Expire { key, .. }
            | Command::Ttl { key }
            | Command::Persist { key }
            | Command::GetEx { key, .. }
            | Command::ExpireTime { key } => vec![key],
            Command::Del { keys } | Command::Exists { keys } | Command::MGet { keys } => {
                keys.iter().map(Vec::as_slice).collect()
            }
            Command::MSet { pairs } => pairs.iter().map(|(key, _)| key.as_slice()).collect(),
            Command::DbSize | Command::FlushDb => Vec::new(),
        }
    }

    /// The canonical encoding, used as the operation of a client request.
    pub fn encode(&self) -> Vec<u8> {
        tessera_types::encode(self)
    }

    /// Decodes an operation; anything but a canonical encoding is [`KvError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Command, KvError> {
        tessera_types::decode(bytes, MAX_OPERATION_BYTES)
            .map_err(|error| malformed("operation", &error))
    }

    /// True for commands that never change the store (`Get`, `Exists`, `MGet`, `Strlen`,
    /// `DbSize`), which a client may send as read-only requests.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Get { .. }
                | Command::Exists { .. }
                | Command::MGet { .. }
                | Command::Strlen { .. }
                | Command::DbSize
                | Command::Ttl { .. }
                | Command::ExpireTime { .. }
        )
    }
}

/// The result of one command. Encoded with [`Response::encode`] into the reply result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// `Get`: the value, or `None` if the key is absent.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// `Set` and `MSet` succeeded.
    Ok,
    /// `Del`: keys deleted; `Exists`: keys existing.
    Count(u64),
    /// `Incr`: the new value.
    Integer(i64),
    /// `MGet`: one entry per requested key, in request order.
    Values(Vec<Option<Vec<u8>>>),
    /// `CompareAndSet`: whether the swap happened, and the value of the key after the command.
    CompareAndSet {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    /// The command was refused and changed nothing.
    Error(KvError),
}

impl Response {
    /// The canonical encoding, returned as the result of the operation.
    pub fn encode(&self) -> Vec<u8> {
        tessera_types::encode(self)
    }

    /// Decodes a result; anything but a canonical encoding is [`KvError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Response, KvError> {
        tessera_types::decode(bytes, MAX_RESULT_BYTES).map_err(|error| malformed("result", &error))
    }
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Clone, Debug, Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvError {
    /// The bytes are not an encoded command (or result).
    #[error("malformed {0}")]
    Malformed(String),
    /// A key is longer than `key_bytes_max`.
    #[error("key of {size} bytes exceeds the limit of {limit} bytes (key_bytes_max)")]
    KeyTooLarge { size: usize, limit: usize },
    /// A value is longer than `value_bytes_max`.
    #[error("value of {size} bytes exceeds the limit of {limit} bytes (value_bytes_max)")]
    ValueTooLarge { size: usize, limit: usize },
    /// More keys in one command than `keys_per_command_max`.
    #[error(
        "command names {count} keys but at most {limit} are allowed (keys_per_command_max); \
         split it into several commands"
    )]
    TooManyKeys { count: usize, limit: usize },
    /// `Del`, `Exists`, `MGet` or `MSet` with no key.
    #[error("command names no keys; give at least one")]
    EmptyKeyList,
    /// `Incr` on a value that is not a canonical decimal `i64`.
    #[error("value is not a decimal integer in the 64-bit signed range")]
    NotAnInteger,
    /// `Incr` whose result does not fit in an `i64`.
    #[error("increment would overflow a 64-bit signed integer")]
    Overflow,
    /// The store would hold more than `total_bytes_max` bytes of keys and values.
    #[error(
        "store would hold {needed} bytes of keys and values, over the limit of {limit} bytes \
         (total_bytes_max); delete keys first"
    )]
    StoreFull { needed: u64, limit: u64 },
    /// An `MGet` result would exceed the reply limit (`tessera_types::limits::MAX_RESULT_BYTES`).
    #[error(
        "result of {size} bytes exceeds the reply limit of {limit} bytes; read fewer keys at once"
    )]
    ResultTooLarge { size: usize, limit: usize },
    /// An expiry that, made absolute, falls outside what a 64-bit signed count of
    /// milliseconds since the Unix epoch can hold (Redis: "invalid expire time").
    #[error("invalid expire time: it does not fit a 64-bit count of milliseconds")]
    InvalidExpireTime,
}

fn malformed(what: &str, error: &DecodeError) -> KvError {
    // The codec's own message text is deliberately dropped: it may differ between library
    // versions, and the error is part of the replicated result.
    let reason = match error {
        DecodeError::TooLarge { length, limit } => {
            format!("{what}: {length} bytes exceed the limit of {limit} bytes")
        }
        DecodeError::Malformed(_) => format!("{what}: bytes are not a valid encoding"),
        DecodeError::TrailingBytes(count) => {
            format!("{what}: {count} trailing bytes after a complete encoding")
        }
    };
    KvError::Malformed(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_command() -> Vec<Command> {
        vec![
            Command::Get { key: b"k".to_vec() },
            Command::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            Command::Del {
                keys: vec![b"a".to_vec(), b"b".to_vec()],
            },
            Command::Exists {
                keys: vec![b"a".to_vec()],
            },
            Command::Incr {
                key: b"n".to_vec(),
                delta: -7,
            },
            Command::MGet {
                keys: vec![b"a".to_vec()],
            },
            Command::MSet {
                pairs: vec![(b"a".to_vec(), b"1".to_vec())],
            },
            Command::CompareAndSet {
                key: b"k".to_vec(),
                expected: None,
                new: Some(b"v".to_vec()),
            },
            Command::SetIf {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                condition: SetCondition::IfAbsent,
                get: true,
            },
            Command::Append {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            Command::Strlen { key: b"k".to_vec() },
            Command::GetDel { key: b"k".to_vec() },
            Command::DbSize,
            Command::FlushDb,
            Command::SetWithExpiry {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                condition: SetCondition::Always,
                get: false,
                expiry: Expiry::InMs(300),
            },
            Command::Expire {
                key: b"k".to_vec(),
                expiry: Expiry::AtMs(1_700_000_000_000),
                condition: ExpireCondition::IfLater,
            },
            Command::Ttl { key: b"k".to_vec() },
            Command::Persist { key: b"k".to_vec() },
            Command::GetEx {
                key: b"k".to_vec(),
                expiry: Expiry::Keep,
            },
            Command::ExpireTime { key: b"k".to_vec() },
        ]
    }

    /// The first commands' encodings are fixed: replicas and clients of different versions must
    /// agree on them, so new variants may only be appended.
    #[test]
    fn earlier_encodings_are_stable() {
        let tags: Vec<u8> = every_command()
            .iter()
            .map(|command| command.encode()[0])
            .collect();
        assert_eq!(tags, (0..20).collect::<Vec<u8>>());
        assert_eq!(
            Command::Get { key: b"k".to_vec() }.encode(),
            [0, 1, b'k'],
            "Get is tag 0, then the key with its length"
        );
    }

    #[test]
    fn commands_round_trip() {
        for command in every_command() {
            assert_eq!(Command::decode(&command.encode()), Ok(command));
        }
    }

    #[test]
    fn responses_round_trip() {
        let responses = [
            Response::Value(Some(b"v".to_vec())),
            Response::Value(None),
            Response::Ok,
            Response::Count(3),
            Response::Integer(i64::MIN),
            Response::Values(vec![None, Some(vec![])]),
            Response::CompareAndSet {
                swapped: true,
                current: None,
            },
            Response::Error(KvError::StoreFull {
                needed: 10,
                limit: 9,
            }),
        ];
        for response in responses {
            assert_eq!(Response::decode(&response.encode()), Ok(response));
        }
    }

    #[test]
    fn read_only_commands_never_write() {
        let read_only: Vec<bool> = every_command().iter().map(Command::is_read_only).collect();
        assert_eq!(
            read_only,
            [
                true, false, false, true, false, true, false, false, false, false, true, false,
                true, false, false, false, true, false, false, true
            ]
        );
    }

    #[test]
    fn malformed_operations_name_the_problem() {
        let garbage = Command::decode(&[0xff, 0xff]).unwrap_err();
        assert_eq!(
            garbage,
            KvError::Malformed("operation: bytes are not a valid encoding".into())
        );
        let mut trailing = Command::Get { key: vec![] }.encode();
        trailing.extend_from_slice(&[0, 0]);
        assert_eq!(
            Command::decode(&trailing),
            Err(KvError::Malformed(
                "operation: 2 trailing bytes after a complete encoding".into()
            ))
        );
        let oversized = vec![0u8; MAX_OPERATION_BYTES + 1];
        let message = Command::decode(&oversized).unwrap_err().to_string();
        assert!(message.contains(&format!("exceed the limit of {MAX_OPERATION_BYTES} bytes")));
    }

    #[test]
    fn error_messages_name_limit_and_size() {
        let message = KvError::KeyTooLarge {
            size: 2000,
            limit: 1024,
        }
        .to_string();
        assert!(
            message.contains("2000")
                && message.contains("1024")
                && message.contains("key_bytes_max")
        );
        let message = KvError::ValueTooLarge { size: 9, limit: 8 }.to_string();
        assert!(message.contains("value_bytes_max"));
        let message = KvError::TooManyKeys { count: 5, limit: 4 }.to_string();
        assert!(message.contains("5 keys") && message.contains("at most 4"));
        let message = KvError::StoreFull {
            needed: 11,
            limit: 10,
        }
        .to_string();
        assert!(message.contains("11 bytes") && message.contains("10 bytes"));
    }
}
