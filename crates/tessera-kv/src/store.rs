//! The store: a sorted map with a running byte total, and the [`StateMachine`] around it.
//!
//! The digest is that of the *abstract state* (`docs/STATE.md`): every key belongs to one of
//! [`PARTITIONS`] partitions by a hash of the key, each partition's digest covers the set of its
//! `(key, value)` pairs through a homomorphic sum ([`LtHash`], updated on every write in time
//! independent of the store size), and the state digest is the root of a Merkle tree over the
//! partition digests, brought up to date lazily for the partitions written since the last
//! digest. So a checkpoint costs time proportional to what changed since the previous one.
//!
//! The parent method [`KvStore::apply`] validates a command against the limits, then dispatches
//! it to one `on_*` handler. Handlers check the byte total before their first change, so a
//! refused command never leaves a partial effect. Nothing here reads the clock, randomness or
//! any other input than the command and the agreed time it executes at.
//!
//! # Expiry
//!
//! A key may carry an absolute expiry (ms since the Unix epoch). A key whose expiry is at or
//! before the agreed time of the command is absent to that command, whatever the command. It
//! stays *stored* until it is removed, deterministically: every command first removes the
//! expired keys it names (lazy expiry), then up to [`SWEEP_PER_COMMAND`] expired keys in order
//! of expiry and key (a bounded sweep, so keys nobody touches again do not stay forever), and
//! `DbSize`/`FlushDb` remove every expired key before counting. Removal depends only on the
//! commands and the agreed times, so every replica holds the same stored keys after the same
//! command, and the digest covers exactly what is stored: each key's element in the partition's
//! sum includes its expiry, so replicas that disagree on an expiry disagree on the digest. (The
//! alternative, leaving expired keys out of the digest, would make the digest a function of the
//! time it is computed at, and a checkpoint taken between two batches has no agreed time.)

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tessera_crypto::{Digest, DigestBuilder, ElementHasher, LtHash};
use tessera_types::limits::MAX_RESULT_BYTES;
use tessera_types::merkle::MerkleTree;
use tessera_types::{Chunk, FrozenState, RestoreError, StagedPartition, StateMachine};

use crate::command::{Command, ExpireCondition, Expiry, KvError, Response, SetCondition};
use crate::limits::KvLimits;

/// Domain of the element hashes summed into a partition's [`LtHash`].
pub const ENTRY_DOMAIN: &str = "tessera.kv.entry.v1";
/// Domain of a partition digest.
pub const PARTITION_DIGEST_DOMAIN: &str = "tessera.kv.partition.v1";
/// Domain of the hash that assigns a key to its partition.
pub const PARTITION_OF_DOMAIN: &str = "tessera.kv.partition-of.v1";

/// Expired keys each command removes beyond those it names (the bounded sweep; see the module
/// docs). Small, so a command's cost stays bounded; enough that keys expire faster than a
/// workload of one write per command can create them.
pub const SWEEP_PER_COMMAND: usize = 16;

/// Partitions of the abstract state: a power of two, part of the digest definition (changing it
/// changes every digest). 256 keeps the per-store overhead small (256 sums of 2 KiB) while a
/// 1 GiB state still splits into 4 MiB partitions, the unit a state transfer fetches and checks.
pub const PARTITIONS: usize = 256;

/// A key or a value as stored: shared, so a frozen copy of a partition (a checkpoint) and the
/// live one share every entry they have in common.
type Shared = Arc<[u8]>;
/// A stored value and its expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    value: Shared,
    /// Absolute expiry in ms since the Unix epoch; `None`: never.
    expires_at_ms: Option<u64>,
}

/// One partition's entries, in key order. A persistent map: cloning it (freezing a checkpoint)
/// costs nothing, and a later write copies only the path to the entry it changes.
type Entries = imbl::OrdMap<Shared, Item>;

/// One partition of the abstract state.
#[derive(Clone, Debug, Default)]
struct Partition {
    entries: Entries,
    /// The homomorphic sum of `(key, value[, expiry])` over `entries` ([`add_element`]).
    sum: LtHash,
    /// Sum of the lengths of every key and value in `entries`.
    bytes: u64,
}

impl Partition {
    fn digest(&self, index: usize) -> Digest {
        partition_digest(index, self.entries.len() as u64, &self.sum)
    }
}

/// Partition digests and the Merkle tree over them, brought up to date lazily.
#[derive(Clone, Debug)]
struct DigestCache {
    digests: Vec<Digest>,
    tree: MerkleTree,
    /// Partitions written since their digest was last computed.
    stale: BTreeSet<usize>,
}

/// The replicated key-value store. See the crate docs for the command semantics.
#[derive(Clone, Debug)]
pub struct KvStore {
    partitions: Vec<Partition>,
    /// Number of keys, over all partitions.
    len: usize,
    /// Sum of the lengths of every key and value, over all partitions.
    stored_bytes: u64,
    limits: KvLimits,
    /// Every stored key with an expiry, by expiry then key: what the sweep removes first.
    /// Derived from the entries (not part of the state).
    expiries: BTreeSet<(u64, Shared)>,
    /// The agreed time of the command being applied (the latest one given): keys expiring at
    /// or before it are absent. Not part of the state: the core passes every command its time,
    /// and agreed times never decrease.
    time_ms: u64,
    /// Behind a `RefCell` because [`StateMachine::digest`] takes `&self`: bringing the cache up
    /// to date does not change the state it describes.
    cache: RefCell<DigestCache>,
}

impl Default for KvStore {
    fn default() -> KvStore {
        KvStore::new(KvLimits::default())
    }
}

impl KvStore {
    /// An empty store.
    ///
    /// # Panics
    /// If `limits` fails [`KvLimits::validate`]; check configuration with it first.
    pub fn new(limits: KvLimits) -> KvStore {
        if let Err(error) = limits.validate() {
            panic!("{error}");
        }
        let partitions = vec![Partition::default(); PARTITIONS];
        let digests: Vec<Digest> = (0..PARTITIONS)
            .map(|index| partitions[index].digest(index))
            .collect();
        let tree = MerkleTree::new(&digests).expect("PARTITIONS is a power of two");
        KvStore {
            partitions,
            len: 0,
            stored_bytes: 0,
            limits,
            expiries: BTreeSet::new(),
            time_ms: 0,
            cache: RefCell::new(DigestCache {
                digests,
                tree,
                stale: BTreeSet::new(),
            }),
        }
    }

    /// Number of keys stored, including expired keys not removed yet (`DbSize` counts only
    /// live ones).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`, if present and not expired at the latest agreed time.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.live(key).map(|item| &*item.value)
    }

    /// The absolute expiry of `key` (ms since the Unix epoch), if it is live and has one.
    pub fn expiry_of(&self, key: &[u8]) -> Option<u64> {
        self.live(key).and_then(|item| item.expires_at_ms)
    }

    /// The latest agreed time this store executed at.
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }

    fn stored(&self, key: &[u8]) -> Option<&Item> {
        self.partitions[partition_of(key)].entries.get(key)
    }

    fn live(&self, key: &[u8]) -> Option<&Item> {
        self.stored(key)
            .filter(|item| !is_expired(item.expires_at_ms, self.time_ms))
    }

    /// Sum of the lengths of every key and value, the quantity bounded by `total_bytes_max`.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// Applies one decoded command at the latest agreed time (see [`KvStore::apply_at`]).
    pub fn apply(&mut self, command: Command) -> Response {
        self.apply_at(command, self.time_ms)
    }

    /// Applies one decoded command at agreed time `time_ms`. [`StateMachine::execute`] is this
    /// plus the encoding. A time before the latest one given counts as the latest (agreed times
    /// never decrease; this keeps a key that expired from coming back for a careless caller).
    pub fn apply_at(&mut self, command: Command, time_ms: u64) -> Response {
        self.time_ms = self.time_ms.max(time_ms);
        if let Err(error) = self.check_sizes(&command) {
            return Response::Error(error);
        }
        self.remove_expired_named(&command);
        self.sweep(SWEEP_PER_COMMAND);
        // Expired keys still stored take room: a write refused for want of it is retried once
        // they are all gone (handlers change nothing before their capacity check, and the
        // retry depends only on the state and the agreed time, so every replica retries alike).
        let retry = self.has_expired().then(|| command.clone());
        let result = match (self.dispatch(command), retry) {
            (Err(KvError::StoreFull { .. }), Some(command)) => {
                self.sweep(usize::MAX);
                self.dispatch(command)
            }
            (result, _) => result,
        };
        debug_assert!(self.stored_bytes <= self.limits.total_bytes_max);
        result.unwrap_or_else(Response::Error)
    }

    /// True if some stored key has expired.
    fn has_expired(&self) -> bool {
        self.expiries
            .first()
            .is_some_and(|(at, _)| is_expired(Some(*at), self.time_ms))
    }

    /// Runs the command's handler.
    fn dispatch(&mut self, command: Command) -> Result<Response, KvError> {
        match command {
            Command::Get { key } => Ok(self.on_get(&key)),
            Command::Set { key, value } => self.on_set(key, value),
            Command::Del { keys } => Ok(self.on_del(&keys)),
            Command::Exists { keys } => Ok(self.on_exists(&keys)),
            Command::Incr { key, delta } => self.on_incr(key, delta),
            Command::MGet { keys } => self.on_mget(&keys),
            Command::MSet { pairs } => self.on_mset(pairs),
            Command::CompareAndSet { key, expected, new } => {
                self.on_compare_and_set(key, expected, new)
            }
            Command::SetIf {
                key,
                value,
                condition,
                get,
            } => self.on_set_if(key, value, condition, get),
            Command::Append { key, value } => self.on_append(key, &value),
            Command::Strlen { key } => Ok(self.on_strlen(&key)),
            Command::GetDel { key } => Ok(self.on_get_del(&key)),
            Command::DbSize => Ok(self.on_db_size()),
            Command::FlushDb => Ok(self.on_flush_db()),
            Command::SetWithExpiry {
                key,
                value,
                condition,
                get,
                expiry,
            } => self.on_set_with_expiry(key, value, condition, get, expiry),
            Command::Expire {
                key,
                expiry,
                condition,
            } => self.on_expire(&key, expiry, condition),
            Command::Ttl { key } => Ok(self.on_ttl(&key)),
            Command::Persist { key } => Ok(self.on_persist(&key)),
            Command::GetEx { key, expiry } => self.on_get_ex(&key, expiry),
            Command::ExpireTime { key } => Ok(self.on_expire_time(&key)),
        }
    }

    /// Checks key counts, key sizes and value sizes, in command order.
    fn check_sizes(&self, command: &Command) -> Result<(), KvError> {
        match command {
            Command::Get { key }
            | Command::Incr { key, .. }
            | Command::Strlen { key }
            | Command::GetDel { key }
            | Command::Expire { key, .. }
            | Command::Ttl { key }
            | Command::Persist { key }
            | Command::GetEx { key, .. }
            | Command::ExpireTime { key } => self.check_key(key),
            Command::DbSize | Command::FlushDb => Ok(()),
            Command::Set { key, value }
            | Command::SetIf { key, value, .. }
            | Command::SetWithExpiry { key, value, .. }
            | Command::Append { key, value } => {
                self.check_key(key)?;
                self.check_value(value)
            }
            Command::Del { keys } | Command::Exists { keys } | Command::MGet { keys } => {
                self.check_key_count(keys.len())?;
                keys.iter().try_for_each(|key| self.check_key(key))
            }
            Command::MSet { pairs } => {
                self.check_key_count(pairs.len())?;
                pairs.iter().try_for_each(|(key, value)| {
                    self.check_key(key)?;
                    self.check_value(value)
                })
            }
            Command::CompareAndSet { key, expected, new } => {
                self.check_key(key)?;
                expected
                    .iter()
                    .chain(new)
                    .try_for_each(|value| self.check_value(value))
            }
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        check_key(&self.limits, key)
    }

    fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        check_value(&self.limits, value)
    }

    fn check_key_count(&self, count: usize) -> Result<(), KvError> {
        let limit = self.limits.keys_per_command_max;
        if count == 0 {
            return Err(KvError::EmptyKeyList);
        }
        if count > limit {
            return Err(KvError::TooManyKeys { count, limit });
        }
        Ok(())
    }

    /// Checks that the store may hold `needed` bytes.
    fn check_capacity(&self, needed: u64) -> Result<(), KvError> {
        check_capacity(&self.limits, needed)
    }

    /// Bytes stored after `key` is set to `value` (`None`: removed), all else unchanged.
    fn bytes_after_write(&self, key: &[u8], value: Option<&[u8]>) -> u64 {
        let existing = self.get(key).map_or(0, |old| entry_bytes(key, old));
        let written = value.map_or(0, |value| entry_bytes(key, value));
        (self.stored_bytes - existing).saturating_add(written)
    }

    fn on_get(&self, key: &[u8]) -> Response {
        Response::Value(self.get(key).map(<[u8]>::to_vec))
    }

    fn on_set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<Response, KvError> {
        self.check_capacity(self.bytes_after_write(&key, Some(&value)))?;
        self.insert(key, value);
        Ok(Response::Ok)
    }

    fn on_del(&mut self, keys: &[Vec<u8>]) -> Response {
        let deleted = keys.iter().filter(|key| self.remove(key)).count();
        Response::Count(deleted as u64)
    }

    fn on_exists(&self, keys: &[Vec<u8>]) -> Response {
        let existing = keys.iter().filter(|key| self.get(key).is_some()).count();
        Response::Count(existing as u64)
    }

    /// Removes the expired keys `command` names, so the handlers below see stored keys as live.
    fn remove_expired_named(&mut self, command: &Command) {
        for key in command.keys() {
            self.remove_if_expired(key);
        }
    }

    fn remove_if_expired(&mut self, key: &[u8]) {
        let expired = self
            .stored(key)
            .is_some_and(|item| is_expired(item.expires_at_ms, self.time_ms));
        if expired {
            self.remove(key);
        }
    }

    /// Removes up to `budget` expired keys, earliest expiry first (then key order).
    fn sweep(&mut self, budget: usize) {
        for _ in 0..budget {
            let Some((expires_at_ms, key)) = self.expiries.first().cloned() else {
                return;
            };
            if !is_expired(Some(expires_at_ms), self.time_ms) {
                return;
            }
            let removed = self.remove(&key);
            debug_assert!(removed, "the expiry index names only stored keys");
        }
    }

    /// The absolute expiry `expiry` gives a key whose current expiry is `current`: `Ok(None)`
    /// for none, `Ok(Some(t))` for `t` ms since the Unix epoch (possibly already past; a time
    /// before the epoch counts as 0, which is past).
    fn resolve_expiry(&self, expiry: Expiry, current: Option<u64>) -> Result<Option<u64>, KvError> {
        let absolute = |ms: i128| -> Result<Option<u64>, KvError> {
            if ms > i64::MAX as i128 {
                return Err(KvError::InvalidExpireTime);
            }
            Ok(Some(ms.max(0) as u64))
        };
        match expiry {
            Expiry::Keep => Ok(current),
            Expiry::Persist => Ok(None),
            Expiry::InMs(ms) => absolute(self.time_ms as i128 + ms as i128),
            Expiry::AtMs(ms) => absolute(ms as i128),
        }
    }

    fn on_set_with_expiry(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        condition: SetCondition,
        get: bool,
        expiry: Expiry,
    ) -> Result<Response, KvError> {
        let current = self.stored(&key).cloned();
        let expires_at_ms =
            self.resolve_expiry(expiry, current.as_ref().and_then(|item| item.expires_at_ms))?;
        let write = match condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => current.is_none(),
            SetCondition::IfPresent => current.is_some(),
        };
        if write {
            if is_expired(expires_at_ms, self.time_ms) {
                // Written and expired at once: what Redis does with a past EXAT/PXAT.
                self.remove(&key);
            } else {
                self.check_capacity(self.bytes_after_write(&key, Some(&value)))?;
                self.insert_item(key, value, expires_at_ms);
            }
        }
        let previous = current.map(|item| item.value.to_vec());
        Ok(match (get, write) {
            (true, _) => Response::Value(previous),
            (false, true) => Response::Ok,
            (false, false) => Response::Value(None),
        })
    }

    fn on_expire(
        &mut self,
        key: &[u8],
        expiry: Expiry,
        condition: ExpireCondition,
    ) -> Result<Response, KvError> {
        // The time is checked before the key, as Redis does: an invalid one is an error even
        // for a missing key.
        let Some(new) = self.resolve_expiry(expiry, None)? else {
            return Ok(Response::Integer(0)); // Keep and Persist set nothing
        };
        let Some(current) = self.stored(key).map(|item| item.expires_at_ms) else {
            return Ok(Response::Integer(0));
        };
        let applies = match (condition, current) {
            (ExpireCondition::Always, _) => true,
            (ExpireCondition::IfNone, current) => current.is_none(),
            (ExpireCondition::IfSome, current) => current.is_some(),
            // A key without an expiry counts as expiring never: later than any time.
            (ExpireCondition::IfLater, current) => current.is_some_and(|current| new > current),
            (ExpireCondition::IfEarlier, current) => current.is_none_or(|current| new < current),
            (ExpireCondition::IfEarlierWithExpiry, current) => {
                current.is_some_and(|current| new < current)
            }
        };
        if !applies {
            return Ok(Response::Integer(0));
        }
        if is_expired(Some(new), self.time_ms) {
            self.remove(key);
        } else {
            self.set_expiry(key, Some(new));
        }
        Ok(Response::Integer(1))
    }

    fn on_ttl(&self, key: &[u8]) -> Response {
        Response::Integer(match self.stored(key) {
            None => -2,
            Some(Item {
                expires_at_ms: None,
                ..
            }) => -1,
            Some(Item {
                expires_at_ms: Some(at),
                ..
            }) => i64::try_from(at - self.time_ms).unwrap_or(i64::MAX),
        })
    }

    fn on_expire_time(&self, key: &[u8]) -> Response {
        Response::Integer(match self.stored(key) {
            None => -2,
            Some(item) => item
                .expires_at_ms
                .map_or(-1, |at| i64::try_from(at).unwrap_or(i64::MAX)),
        })
    }

    fn on_persist(&mut self, key: &[u8]) -> Response {
        let has_expiry = self
            .stored(key)
            .is_some_and(|item| item.expires_at_ms.is_some());
        if has_expiry {
            self.set_expiry(key, None);
        }
        Response::Integer(i64::from(has_expiry))
    }

    fn on_get_ex(&mut self, key: &[u8], expiry: Expiry) -> Result<Response, KvError> {
        // The time is checked before the key, as Redis does.
        self.resolve_expiry(expiry, None)?;
        let Some(current) = self.stored(key).cloned() else {
            return Ok(Response::Value(None));
        };
        let expires_at_ms = self.resolve_expiry(expiry, current.expires_at_ms)?;
        if is_expired(expires_at_ms, self.time_ms) {
            self.remove(key);
        } else if expires_at_ms != current.expires_at_ms {
            self.set_expiry(key, expires_at_ms);
        }
        Ok(Response::Value(Some(current.value.to_vec())))
    }

    fn on_incr(&mut self, key: Vec<u8>, delta: i64) -> Result<Response, KvError> {
        let current = match self.get(&key) {
            None => 0,
            Some(text) => parse_integer(text).ok_or(KvError::NotAnInteger)?,
        };
        let updated = current.checked_add(delta).ok_or(KvError::Overflow)?;
        let text = updated.to_string().into_bytes();
        // `KvLimits::validate` guarantees room for any i64 in decimal.
        debug_assert!(text.len() <= self.limits.value_bytes_max);
        self.check_capacity(self.bytes_after_write(&key, Some(&text)))?;
        // Like Redis, changing a value in place keeps its expiry.
        self.insert_keeping_expiry(key, text);
        Ok(Response::Integer(updated))
    }

    fn on_mget(&self, keys: &[Vec<u8>]) -> Result<Response, KvError> {
        let values: Vec<Option<&[u8]>> = keys.iter().map(|key| self.get(key)).collect();
        // Sized before copying any value: values may total `keys_per_command_max` times
        // `value_bytes_max`, far more than a reply may carry.
        let size = values_response_bytes(&values);
        if size > MAX_RESULT_BYTES {
            return Err(KvError::ResultTooLarge {
                size,
                limit: MAX_RESULT_BYTES,
            });
        }
        Ok(Response::Values(
            values
                .into_iter()
                .map(|value| value.map(<[u8]>::to_vec))
                .collect(),
        ))
    }

    fn on_mset(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Response, KvError> {
        // Last write wins for a repeated key, as the sequential inserts below do.
        let mut written: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
        for (key, value) in &pairs {
            written.insert(key, value);
        }
        let needed = written
            .iter()
            .fold(self.stored_bytes, |total, (key, value)| {
                let existing = self.get(key).map_or(0, |old| entry_bytes(key, old));
                (total - existing).saturating_add(entry_bytes(key, value))
            });
        self.check_capacity(needed)?;
        for (key, value) in pairs {
            self.insert(key, value);
        }
        debug_assert_eq!(self.stored_bytes, needed);
        Ok(Response::Ok)
    }

    fn on_compare_and_set(
        &mut self,
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<Response, KvError> {
        let current = self.get(&key);
        if current != expected.as_deref() {
            return Ok(Response::CompareAndSet {
                swapped: false,
                current: current.map(<[u8]>::to_vec),
            });
        }
        match &new {
            None => {
                self.remove(&key);
            }
            Some(value) => {
                self.check_capacity(self.bytes_after_write(&key, Some(value)))?;
                self.insert(key, value.clone());
            }
        }
        Ok(Response::CompareAndSet {
            swapped: true,
            current: new,
        })
    }

    // The handlers below are built only on `get`, `insert`, `remove`, `len` and the capacity
    // checks, so they keep working whatever layout the entries take underneath.

    fn on_set_if(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        condition: SetCondition,
        get: bool,
    ) -> Result<Response, KvError> {
        let previous = self.get(&key);
        let write = match condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => previous.is_none(),
            SetCondition::IfPresent => previous.is_some(),
        };
        // Copied only when asked for: a plain conditional SET should not pay for it.
        let previous = if get {
            previous.map(<[u8]>::to_vec)
        } else {
            None
        };
        if write {
            self.check_capacity(self.bytes_after_write(&key, Some(&value)))?;
            self.insert(key, value);
        }
        Ok(match (get, write) {
            (true, _) => Response::Value(previous),
            (false, true) => Response::Ok,
            (false, false) => Response::Value(None),
        })
    }

    fn on_append(&mut self, key: Vec<u8>, suffix: &[u8]) -> Result<Response, KvError> {
        let current = self.get(&key).unwrap_or_default();
        // Sized before copying: the joined value must itself respect `value_bytes_max`.
        let size = current.len().saturating_add(suffix.len());
        let limit = self.limits().value_bytes_max;
        if size > limit {
            return Err(KvError::ValueTooLarge { size, limit });
        }
        let mut joined = Vec::with_capacity(size);
        joined.extend_from_slice(current);
        joined.extend_from_slice(suffix);
        self.check_capacity(self.bytes_after_write(&key, Some(&joined)))?;
        self.insert_keeping_expiry(key, joined);
        Ok(Response::Count(size as u64))
    }

    fn on_strlen(&self, key: &[u8]) -> Response {
        Response::Count(self.get(key).map_or(0, |value| value.len() as u64))
    }

    fn on_get_del(&mut self, key: &[u8]) -> Response {
        let previous = self.get(key).map(<[u8]>::to_vec);
        if previous.is_some() {
            self.remove(key);
        }
        Response::Value(previous)
    }

    fn on_db_size(&mut self) -> Response {
        // Every expired key goes first, so the count is of live keys. Each key is removed once,
        // so the cost is paid once per expiring key, whoever pays it.
        self.sweep(usize::MAX);
        Response::Count(self.len() as u64)
    }

    fn on_flush_db(&mut self) -> Response {
        self.sweep(usize::MAX);
        let deleted = self.len();
        // A fresh store under the same limits: nothing of the old layout survives, whatever it is.
        *self = KvStore::new(*self.limits());
        Response::Count(deleted as u64)
    }

    /// Inserts or replaces, without an expiry (a plain write clears it, as in Redis); the
    /// caller has checked the capacity.
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.insert_item(key, value, None);
    }

    /// Replaces the value and keeps the key's expiry (`Incr`, `Append`).
    fn insert_keeping_expiry(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let expires_at_ms = self.stored(&key).and_then(|item| item.expires_at_ms);
        self.insert_item(key, value, expires_at_ms);
    }

    /// Changes the expiry of a stored key.
    fn set_expiry(&mut self, key: &[u8], expires_at_ms: Option<u64>) {
        let Some(item) = self.stored(key) else {
            debug_assert!(false, "set_expiry on a missing key");
            return;
        };
        let value = item.value.to_vec();
        self.insert_item(key.to_vec(), value, expires_at_ms);
    }

    /// Inserts or replaces a key with its expiry; the caller has checked the capacity.
    fn insert_item(&mut self, key: Vec<u8>, value: Vec<u8>, expires_at_ms: Option<u64>) {
        let index = partition_of(&key);
        let partition = &mut self.partitions[index];
        let key: Shared = Arc::from(key);
        let item = Item {
            value: Arc::from(value),
            expires_at_ms,
        };
        let added = entry_bytes(&key, &item.value);
        add_element(&mut partition.sum, &key, &item);
        if let Some(at) = expires_at_ms {
            self.expiries.insert((at, key.clone()));
        }
        let removed = match partition.entries.insert(key.clone(), item) {
            Some(old) => {
                remove_element(&mut partition.sum, &key, &old);
                if let Some(at) = old.expires_at_ms {
                    if Some(at) != expires_at_ms {
                        self.expiries.remove(&(at, key.clone()));
                    }
                }
                entry_bytes(&key, &old.value)
            }
            None => {
                self.len += 1;
                0
            }
        };
        partition.bytes = partition.bytes - removed + added;
        self.cache.get_mut().stale.insert(index);
        // May pass the total midway through an `MSet` with a repeated key; `apply` asserts
        // the bound once the command is complete.
        self.stored_bytes = self.stored_bytes - removed + added;
    }

    /// Removes `key`; true if it was present.
    fn remove(&mut self, key: &[u8]) -> bool {
        let index = partition_of(key);
        let partition = &mut self.partitions[index];
        match partition.entries.remove_with_key(key) {
            Some((key, item)) => {
                let bytes = entry_bytes(&key, &item.value);
                remove_element(&mut partition.sum, &key, &item);
                if let Some(at) = item.expires_at_ms {
                    self.expiries.remove(&(at, key.clone()));
                }
                partition.bytes -= bytes;
                self.stored_bytes -= bytes;
                self.len -= 1;
                self.cache.get_mut().stale.insert(index);
                true
            }
            None => false,
        }
    }

    /// Brings the cached partition digests and Merkle tree up to date.
    fn refresh_digests(&self) {
        let mut cache = self.cache.borrow_mut();
        let cache = &mut *cache;
        for index in std::mem::take(&mut cache.stale) {
            let digest = self.partitions[index].digest(index);
            cache.digests[index] = digest;
            cache
                .tree
                .update(index as u64, &digest)
                .expect("partition indexes are below PARTITIONS");
        }
    }

    /// Every stored entry in key order (tests and snapshots: linear in the store size).
    fn sorted_entries(&self) -> Vec<EntryRef<'_>> {
        let mut entries: Vec<EntryRef<'_>> = self
            .partitions
            .iter()
            .flat_map(|partition| partition.entries.iter())
            .map(|(key, item)| (&**key, &*item.value, item.expires_at_ms))
            .collect();
        entries.sort_unstable();
        entries
    }

    /// A canonical serialization of the whole state: every stored `(key, value, expiry)` in key
    /// order (expired keys not removed yet included: they are part of the state).
    /// Replicas exchange partitions, not snapshots; this is for tests and tools.
    pub fn snapshot(&self) -> Vec<u8> {
        let entries = self.sorted_entries();
        tessera_types::encode(&EntrySeq(&entries))
    }

    /// Replaces the state with a [`KvStore::snapshot`], checked against this store's limits:
    /// strictly increasing keys, every key, value and the total within bounds, no trailing
    /// bytes. On error the store is untouched.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        *self = KvStore::from_snapshot(self.limits, snapshot).map_err(RestoreError)?;
        Ok(())
    }

    /// Builds a store from snapshot bytes, checking every entry against `limits`.
    fn from_snapshot(limits: KvLimits, snapshot: &[u8]) -> Result<KvStore, String> {
        // The snapshot is already in memory and bounded by the transport; decoding never
        // pre-allocates more than its input justifies, so no tighter bound is needed here.
        let entries: Vec<(ByteBuf, ByteBuf, Option<u64>)> =
            tessera_types::decode(snapshot, usize::MAX)
                .map_err(|_| "bytes are not a valid key-value snapshot".to_string())?;
        let entries: Vec<(Vec<u8>, Vec<u8>, Option<u64>)> = entries
            .into_iter()
            .map(|(key, value, expiry)| (key.0, value.0, expiry))
            .collect();
        let mut store = KvStore::new(limits);
        let mut total = 0u64;
        let mut previous: Option<&[u8]> = None;
        for (index, (key, value, _)) in entries.iter().enumerate() {
            let entry_error = |error: KvError| format!("entry {index}: {error}");
            store.check_key(key).map_err(entry_error)?;
            store.check_value(value).map_err(entry_error)?;
            if previous.is_some_and(|previous| previous >= key.as_slice()) {
                return Err(format!(
                    "entry {index}: keys are not in strictly increasing order"
                ));
            }
            previous = Some(key);
            total = total.saturating_add(entry_bytes(key, value));
            store.check_capacity(total).map_err(entry_error)?;
        }
        for (key, value, expiry) in entries {
            store.insert_item(key, value, expiry);
        }
        Ok(store)
    }

    /// Recomputes the invariants from scratch (tests only: linear in the store size).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut total = 0;
        let mut len = 0;
        let mut leaves = Vec::with_capacity(PARTITIONS);
        for (index, partition) in self.partitions.iter().enumerate() {
            let mut sum = LtHash::new();
            let mut bytes = 0;
            for (key, item) in partition.entries.iter() {
                assert_eq!(partition_of(key), index, "key in its partition");
                assert!(key.len() <= self.limits.key_bytes_max);
                assert!(item.value.len() <= self.limits.value_bytes_max);
                add_element(&mut sum, key, item);
                bytes += entry_bytes(key, &item.value);
                if let Some(at) = item.expires_at_ms {
                    assert!(self.expiries.contains(&(at, key.clone())), "expiry indexed");
                }
            }
            assert_eq!(partition.sum, sum, "incremental sum of partition {index}");
            assert_eq!(partition.bytes, bytes, "bytes of partition {index}");
            total += bytes;
            len += partition.entries.len();
            leaves.push(partition_digest(
                index,
                partition.entries.len() as u64,
                &sum,
            ));
        }
        assert_eq!(self.stored_bytes, total);
        assert_eq!(self.len, len);
        for (at, key) in &self.expiries {
            assert_eq!(
                self.stored(key).and_then(|item| item.expires_at_ms),
                Some(*at)
            );
        }
        assert!(self.stored_bytes <= self.limits.total_bytes_max);
        let mut fresh = MerkleTree::new(&leaves).expect("PARTITIONS is a power of two");
        assert_eq!(self.digest(), fresh.root(), "incremental root");
        for (index, leaf) in leaves.iter().enumerate() {
            assert_eq!(self.partition_digest(index as u32), *leaf);
        }
    }
}

impl StateMachine for KvStore {
    type Frozen = KvFrozen;
    type Staged = KvStaged;

    fn execute(&mut self, operation: &[u8], time_ms: u64) -> Vec<u8> {
        let response = match Command::decode(operation) {
            Ok(command) => self.apply_at(command, time_ms),
            Err(error) => Response::Error(error),
        };
        response.encode()
    }

    fn partition_count(&self) -> u32 {
        PARTITIONS as u32
    }

    /// BLAKE3 under [`PARTITION_DIGEST_DOMAIN`] of the partition index, its entry count and
    /// the [`LtHash`] sum of its entries under [`ENTRY_DOMAIN`]: `(key, value)` for a key
    /// without expiry, `(key, value, expiry as 8 bytes little-endian)` for one with. A key's partition
    /// is the first eight bytes (little-endian) of BLAKE3 under [`PARTITION_OF_DOMAIN`] of the
    /// key, modulo [`PARTITIONS`]. Indexes past the last partition get the empty partition's
    /// digest for that index (no panic on a faulty peer's request).
    fn partition_digest(&self, index: u32) -> Digest {
        let index = index as usize;
        if index >= PARTITIONS {
            return Partition::default().digest(index);
        }
        self.refresh_digests();
        self.cache.borrow().digests[index]
    }

    /// The root of the Merkle tree (`tessera_types::merkle`) over the [`PARTITIONS`] partition
    /// digests. Only the partitions written since the previous call are rehashed.
    fn digest(&self) -> Digest {
        self.refresh_digests();
        self.cache.borrow_mut().tree.root()
    }

    fn freeze(&mut self) -> KvFrozen {
        self.refresh_digests();
        let digests = &self.cache.get_mut().digests;
        KvFrozen {
            partitions: Arc::new(
                self.partitions
                    .iter()
                    .zip(digests)
                    .map(|(partition, digest)| (partition.entries.clone(), *digest))
                    .collect(),
            ),
        }
    }

    fn stage(&self, index: u32) -> KvStaged {
        KvStaged {
            index,
            limits: self.limits,
            entries: Vec::new(),
            sum: LtHash::new(),
            bytes: 0,
        }
    }

    /// Checks the new total against `total_bytes_max` before changing anything.
    fn install(&mut self, staged: Vec<KvStaged>) -> Result<(), RestoreError> {
        let mut replaced = BTreeSet::new();
        let mut total = self.stored_bytes;
        for partition in &staged {
            let index = partition.index as usize;
            if index >= PARTITIONS || !replaced.insert(index) {
                return Err(RestoreError(format!(
                    "partition {index} is out of range or given twice"
                )));
            }
            total = total - self.partitions[index].bytes + partition.bytes;
        }
        if total > self.limits.total_bytes_max {
            return Err(RestoreError(format!(
                "the transferred state needs {total} bytes but this store holds at most \
                 total_bytes_max = {}; raise it",
                self.limits.total_bytes_max
            )));
        }
        for partition in staged {
            let index = partition.index as usize;
            let old = &self.partitions[index];
            self.len = self.len - old.entries.len() + partition.entries.len();
            for (key, item) in old.entries.iter() {
                if let Some(at) = item.expires_at_ms {
                    self.expiries.remove(&(at, key.clone()));
                }
            }
            for (key, item) in &partition.entries {
                if let Some(at) = item.expires_at_ms {
                    self.expiries.insert((at, key.clone()));
                }
            }
            self.partitions[index] = Partition {
                entries: partition.entries.into_iter().collect(),
                sum: partition.sum,
                bytes: partition.bytes,
            };
            self.cache.get_mut().stale.insert(index);
        }
        self.stored_bytes = total;
        Ok(())
    }
}

/// A key-value store's state at a checkpoint: each partition's entries (shared with the live
/// store until it writes them) and digest.
#[derive(Clone, Debug)]
pub struct KvFrozen {
    partitions: Arc<Vec<(Entries, Digest)>>,
}

impl FrozenState for KvFrozen {
    fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    fn partition_digest(&self, index: u32) -> Digest {
        match self.partitions.get(index as usize) {
            Some((_, digest)) => *digest,
            None => Partition::default().digest(index as usize),
        }
    }

    /// Entries in key order, encoded like a snapshot; the cursor is the last key sent, and
    /// the next chunk starts after it.
    fn chunk(&self, index: u32, cursor: Option<&[u8]>, budget: usize) -> Chunk {
        let Some((entries, _)) = self.partitions.get(index as usize) else {
            return Chunk {
                bytes: tessera_types::encode(&EntrySeq(&[])),
                next: None,
            };
        };
        let start = match cursor {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let mut taken: Vec<EntryRef<'_>> = Vec::new();
        let mut bytes = 0usize;
        let mut range = entries
            .range::<_, [u8]>((start, Bound::Unbounded))
            .peekable();
        for (key, item) in range.by_ref() {
            taken.push((key, &item.value, item.expires_at_ms));
            bytes += key.len() + item.value.len();
            if bytes >= budget {
                break;
            }
        }
        let next = match (range.peek(), taken.last()) {
            (Some(_), Some((last, _, _))) => Some(last.to_vec()),
            _ => None,
        };
        Chunk {
            bytes: tessera_types::encode(&EntrySeq(&taken)),
            next,
        }
    }
}

/// A partition being received: every entry is checked against this store's limits and its
/// partition, keys must increase strictly across chunks, and the sum is built as they come.
pub struct KvStaged {
    index: u32,
    limits: KvLimits,
    entries: Vec<(Shared, Item)>,
    sum: LtHash,
    bytes: u64,
}

impl StagedPartition for KvStaged {
    fn index(&self) -> u32 {
        self.index
    }

    fn append(&mut self, chunk: &[u8]) -> Result<u64, RestoreError> {
        // The chunk is already in memory and bounded by the transport; decoding never
        // pre-allocates more than its input justifies.
        let entries: Vec<(ByteBuf, ByteBuf, Option<u64>)> =
            tessera_types::decode(chunk, usize::MAX)
                .map_err(|_| RestoreError("bytes are not a valid key-value chunk".into()))?;
        let added = entries.len() as u64;
        for (key, value, expires_at_ms) in entries {
            let (key, value) = (key.0, value.0);
            let fail = |reason: String| {
                Err(RestoreError(format!(
                    "partition {} entry {}: {reason}",
                    self.index,
                    self.entries.len()
                )))
            };
            if let Err(error) = check_key(&self.limits, &key).and(check_value(&self.limits, &value))
            {
                return fail(error.to_string());
            }
            if partition_of(&key) != self.index as usize {
                return fail("key belongs to another partition".into());
            }
            if self.entries.last().is_some_and(|(last, _)| **last >= *key) {
                return fail("keys are not in strictly increasing order".into());
            }
            self.bytes = self.bytes.saturating_add(entry_bytes(&key, &value));
            if let Err(error) = check_capacity(&self.limits, self.bytes) {
                return fail(error.to_string());
            }
            let item = Item {
                value: Arc::from(value),
                expires_at_ms,
            };
            add_element(&mut self.sum, &key, &item);
            self.entries.push((Arc::from(key), item));
        }
        Ok(added)
    }

    fn digest(&self) -> Digest {
        partition_digest(self.index as usize, self.entries.len() as u64, &self.sum)
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn check_key(limits: &KvLimits, key: &[u8]) -> Result<(), KvError> {
    let limit = limits.key_bytes_max;
    if key.len() > limit {
        return Err(KvError::KeyTooLarge {
            size: key.len(),
            limit,
        });
    }
    Ok(())
}

fn check_value(limits: &KvLimits, value: &[u8]) -> Result<(), KvError> {
    let limit = limits.value_bytes_max;
    if value.len() > limit {
        return Err(KvError::ValueTooLarge {
            size: value.len(),
            limit,
        });
    }
    Ok(())
}

fn check_capacity(limits: &KvLimits, needed: u64) -> Result<(), KvError> {
    let limit = limits.total_bytes_max;
    if needed > limit {
        return Err(KvError::StoreFull { needed, limit });
    }
    Ok(())
}

/// The element hasher of [`ENTRY_DOMAIN`], built once (deriving a domain key costs as much as
/// hashing a small entry).
fn entry_hasher() -> &'static ElementHasher {
    static HASHER: OnceLock<ElementHasher> = OnceLock::new();
    HASHER.get_or_init(|| ElementHasher::new(ENTRY_DOMAIN))
}

/// True if an expiry is at or before `time_ms` (Redis: a key is gone once its time has come).
fn is_expired(expires_at_ms: Option<u64>, time_ms: u64) -> bool {
    expires_at_ms.is_some_and(|at| at <= time_ms)
}

/// Adds an entry's element to a partition sum: `(key, value)` without expiry, `(key, value,
/// expiry)` with one. The parts are length-prefixed, so the two forms never collide, and a
/// key without expiry hashes as it did before expiry existed.
fn add_element(sum: &mut LtHash, key: &[u8], item: &Item) {
    match item.expires_at_ms {
        None => sum.add(entry_hasher(), &[key, &item.value]),
        Some(at) => sum.add(entry_hasher(), &[key, &item.value, &at.to_le_bytes()]),
    }
}

fn remove_element(sum: &mut LtHash, key: &[u8], item: &Item) {
    match item.expires_at_ms {
        None => sum.remove(entry_hasher(), &[key, &item.value]),
        Some(at) => sum.remove(entry_hasher(), &[key, &item.value, &at.to_le_bytes()]),
    }
}

/// The partition `key` belongs to.
fn partition_of(key: &[u8]) -> usize {
    let digest = Digest::of(PARTITION_OF_DOMAIN, key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    (u64::from_le_bytes(first) % PARTITIONS as u64) as usize
}

fn partition_digest(index: usize, count: u64, sum: &LtHash) -> Digest {
    let mut builder = DigestBuilder::new(PARTITION_DIGEST_DOMAIN);
    builder.u64(index as u64).u64(count).bytes(&sum.to_bytes());
    builder.finish()
}

/// A stored entry by reference: key, value, expiry.
type EntryRef<'a> = (&'a [u8], &'a [u8], Option<u64>);

/// Serializes entries as a sequence of `(key, value, expiry)` triples without copying them
/// (the snapshot and chunk format).
struct EntrySeq<'a>(&'a [EntryRef<'a>]);

impl Serialize for EntrySeq<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter()
                .map(|(key, value, expiry)| (Bytes(key), Bytes(value), *expiry)),
        )
    }
}

/// A byte string written in one piece. Postcard encodes a byte string exactly as a sequence
/// of `u8` (length, then the bytes), so this changes the speed, not the format.
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// The owned counterpart of [`Bytes`], read in one piece.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteBuf, D::Error> {
        deserializer.deserialize_byte_buf(ByteBufVisitor)
    }
}

struct ByteBufVisitor;

impl Visitor<'_> for ByteBufVisitor {
    type Value = ByteBuf;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<ByteBuf, E> {
        Ok(ByteBuf(bytes.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<ByteBuf, E> {
        Ok(ByteBuf(bytes))
    }
}

fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// Parses a canonical decimal `i64`: an optional `-`, no `+`, no leading zero, no `-0`,
/// the text `i64::to_string` produces (Redis accepts the same set).
fn parse_integer(text: &[u8]) -> Option<i64> {
    if text.len() > 20 {
        return None;
    }
    let value: i64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    (value.to_string().as_bytes() == text).then_some(value)
}

/// Exact encoded length of `Response::Values(values)` (postcard: varint lengths and tags).
fn values_response_bytes(values: &[Option<&[u8]>]) -> usize {
    let items: usize = values
        .iter()
        .map(|value| 1 + value.map_or(0, |value| varint_bytes(value.len()) + value.len()))
        .sum();
    varint_bytes(RESPONSE_VALUES_TAG) + varint_bytes(values.len()) + items
}

/// Variant index of `Response::Values`, encoded as a varint tag.
const RESPONSE_VALUES_TAG: usize = 4;

fn varint_bytes(value: usize) -> usize {
    let bits = usize::BITS - value.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

#[cfg(test)]
mod partition_tests;
#[cfg(test)]
mod tests;
