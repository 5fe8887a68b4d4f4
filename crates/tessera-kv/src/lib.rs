//! Tessera's replicated key-value store: a [`StateMachine`] mapping byte-string keys to
//! byte-string values.
//!
//! Pure crate: no IO, no clock, no threads, no randomness. The same commands in the same order
//! give the same responses and the same [`StateMachine::digest`] on every replica.
//! [`StateMachine::execute`] never panics: an operation that does not decode is answered with
//! [`KvError::Malformed`], and a command that breaks a limit changes nothing and is answered
//! with the error naming the limit and the size found.
//!
//! # Commands
//!
//! | Command | Response | Semantics |
//! |---|---|---|
//! | `Get { key }` | `Value(Option<value>)` | |
//! | `Set { key, value }` | `Ok` | inserts or replaces |
//! | `Del { keys }` | `Count(deleted)` | a repeated key counts once |
//! | `Exists { keys }` | `Count(existing)` | a repeated key counts each time (as Redis) |
//! | `Incr { key, delta }` | `Integer(new)` | value must be a canonical ASCII decimal `i64` (no `+`, no leading zero, no `-0`); a missing key counts as 0; overflow is [`KvError::Overflow`] |
//! | `MGet { keys }` | `Values(..)` | one entry per key, in request order |
//! | `MSet { pairs }` | `Ok` | all pairs or none; a repeated key takes its last value |
//! | `CompareAndSet { key, expected, new }` | `CompareAndSet { swapped, current }` | swaps if the value equals `expected` (`None`: key absent); `new == None` deletes; `current` is the value after the command |
//! | `SetIf { key, value, condition, get }` | `get`: `Value(previous)`; else `Ok` if written, `Value(None)` if not | writes if `condition` holds (`Always`, `IfAbsent`, `IfPresent`: Redis `SET` `NX`/`XX`/`GET`, `GETSET`) |
//! | `Append { key, value }` | `Count(new length)` | a missing key counts as empty; the result must fit `value_bytes_max` |
//! | `Strlen { key }` | `Count(length)` | 0 for a missing key |
//! | `GetDel { key }` | `Value(Option<value>)` | the value before the deletion |
//! | `DbSize` | `Count(keys)` | live keys only |
//! | `FlushDb` | `Count(deleted)` | deletes every key |
//! | `SetWithExpiry { key, value, condition, get, expiry }` | as `SetIf` | and sets the expiry ([`Expiry`]: keep, none, relative or absolute ms); a past expiry leaves no key |
//! | `Expire { key, expiry, condition }` | `Integer(1 or 0)` | [`ExpireCondition`]: Redis's NX/XX/GT/LT; a past time deletes the key |
//! | `Ttl { key }` | `Integer(ms left, -1, -2)` | |
//! | `Persist { key }` | `Integer(1 or 0)` | removes the expiry |
//! | `GetEx { key, expiry }` | `Value(Option<value>)` | and changes the expiry |
//! | `ExpireTime { key }` | `Integer(absolute ms, -1, -2)` | |
//!
//! # Expiry
//!
//! Every command executes at the agreed time of its batch ([`StateMachine::execute`]'s
//! `time_ms`); a key whose expiry is at or before it is absent to the command. Relative times
//! become absolute here, never in a client. Writes that replace a value (`Set`, `SetIf`,
//! `MSet`, `CompareAndSet`) remove its expiry; `Incr` and `Append` keep it.
//!
//! `Get`, `Exists`, `MGet`, `Strlen`, `DbSize`, `Ttl` and `ExpireTime` are read-only
//! ([`Command::is_read_only`]): running one twice answers alike (it may remove expired keys,
//! which no command can see). Keys and values are arbitrary bytes; the empty key is a valid key.
//!
//! # Limits
//!
//! Set per store with [`KvLimits`] (checked by [`KvLimits::validate`]); every replica of a
//! cluster must use the same limits, since they decide which commands succeed.
//!
//! | Limit | Default | Bound | Error |
//! |---|---|---|---|
//! | `key_bytes_max`: largest key | 1 KiB (1024 bytes) | 1 ..= 1 MiB | [`KvError::KeyTooLarge`] |
//! | `value_bytes_max`: largest value (also `expected`/`new` of `CompareAndSet`) | 512 KiB | 20 ..= 1 MiB | [`KvError::ValueTooLarge`] |
//! | `keys_per_command_max`: keys in one `Del`, `Exists`, `MGet`, pairs in one `MSet` | 1024 | 1 ..= 1 Mi | [`KvError::TooManyKeys`] (none at all: [`KvError::EmptyKeyList`]) |
//! | `total_bytes_max`: sum of the lengths of all stored keys and values | 1 GiB | any | [`KvError::StoreFull`] |
//!
//! Two limits come from the replication protocol and are not configurable: an operation is at
//! most `tessera_types::limits::MAX_OPERATION_BYTES` (1 MiB) encoded, so large `MSet`s must be
//! split, and an `MGet` result is at most `tessera_types::limits::MAX_RESULT_BYTES` (4 MiB),
//! else [`KvError::ResultTooLarge`].
//!
//! # Snapshot and digest
//!
//! [`StateMachine::snapshot`] is the canonical encoding of the stored entries in key order as a
//! sequence of `(key, value, expiry)` triples: equal contents give equal bytes whatever the
//! history.
//! [`StateMachine::restore`] accepts exactly such bytes within the store's limits and leaves
//! the store untouched otherwise. [`StateMachine::digest`] is the digest of the abstract state:
//! the root of a Merkle tree over [`PARTITIONS`] partition digests, each a homomorphic sum of its
//! entries, kept up to date as entries change (see [`KvStore`]'s implementation for the exact
//! definition), without building the snapshot; verify a received snapshot by restoring it into a
//! scratch store and comparing digests.

#![forbid(unsafe_code)]

mod command;
mod limits;
mod store;

pub use command::{Command, ExpireCondition, Expiry, KvError, Response, SetCondition};
pub use limits::{InvalidKvLimits, KvLimits};
pub use store::{KvStore, ENTRY_DOMAIN, PARTITIONS, PARTITION_DIGEST_DOMAIN, PARTITION_OF_DOMAIN};
pub use tessera_types::StateMachine;
