//! The store: a sorted map with a running byte total, and the [`StateMachine`] around it.
//!
//! The parent method [`KvStore::apply`] validates a command against the limits, then dispatches
//! it to one `on_*` handler. Handlers check the byte total before their first change, so a
//! refused command never leaves a partial effect. Nothing here reads the clock, randomness or
//! any other input than the command.

use std::collections::BTreeMap;

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tessera_crypto::{Digest, DigestBuilder};
use tessera_types::limits::MAX_RESULT_BYTES;
use tessera_types::state_machine::RestoreError;
use tessera_types::StateMachine;

use crate::command::{Command, KvError, Response, SetCondition};
use crate::limits::KvLimits;

/// Domain of [`KvStore::digest`].
pub const STATE_DIGEST_DOMAIN: &str = "tessera.kv.state.v1";

/// Size after which [`KvStore::digest`] hashes the entries gathered so far. Part of the
/// digest definition: changing it changes every digest.
pub const DIGEST_PIECE_BYTES: usize = 64 * 1024;

/// The replicated key-value store. See the crate docs for the command semantics.
#[derive(Clone, Debug)]
pub struct KvStore {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Sum of the lengths of every key and value in `entries`.
    stored_bytes: u64,
    limits: KvLimits,
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
        KvStore {
            entries: BTreeMap::new(),
            stored_bytes: 0,
            limits,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Sum of the lengths of every key and value, the quantity bounded by `total_bytes_max`.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// Applies one decoded command. [`StateMachine::execute`] is this plus the encoding.
    pub fn apply(&mut self, command: Command) -> Response {
        if let Err(error) = self.check_sizes(&command) {
            return Response::Error(error);
        }
        let result = match command {
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
        };
        debug_assert!(self.stored_bytes <= self.limits.total_bytes_max);
        result.unwrap_or_else(Response::Error)
    }

    /// Checks key counts, key sizes and value sizes, in command order.
    fn check_sizes(&self, command: &Command) -> Result<(), KvError> {
        match command {
            Command::Get { key }
            | Command::Incr { key, .. }
            | Command::Strlen { key }
            | Command::GetDel { key } => self.check_key(key),
            Command::DbSize | Command::FlushDb => Ok(()),
            Command::Set { key, value }
            | Command::SetIf { key, value, .. }
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
        let limit = self.limits.key_bytes_max;
        if key.len() > limit {
            return Err(KvError::KeyTooLarge {
                size: key.len(),
                limit,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        let limit = self.limits.value_bytes_max;
        if value.len() > limit {
            return Err(KvError::ValueTooLarge {
                size: value.len(),
                limit,
            });
        }
        Ok(())
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
        let limit = self.limits.total_bytes_max;
        if needed > limit {
            return Err(KvError::StoreFull { needed, limit });
        }
        Ok(())
    }

    /// Bytes stored after `key` is set to `value` (`None`: removed), all else unchanged.
    fn bytes_after_write(&self, key: &[u8], value: Option<&[u8]>) -> u64 {
        let existing = self.entries.get(key).map_or(0, |old| entry_bytes(key, old));
        let written = value.map_or(0, |value| entry_bytes(key, value));
        (self.stored_bytes - existing).saturating_add(written)
    }

    fn on_get(&self, key: &[u8]) -> Response {
        Response::Value(self.entries.get(key).cloned())
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
        let existing = keys
            .iter()
            .filter(|key| self.entries.contains_key(*key))
            .count();
        Response::Count(existing as u64)
    }

    fn on_incr(&mut self, key: Vec<u8>, delta: i64) -> Result<Response, KvError> {
        let current = match self.entries.get(&key) {
            None => 0,
            Some(text) => parse_integer(text).ok_or(KvError::NotAnInteger)?,
        };
        let updated = current.checked_add(delta).ok_or(KvError::Overflow)?;
        let text = updated.to_string().into_bytes();
        // `KvLimits::validate` guarantees room for any i64 in decimal.
        debug_assert!(text.len() <= self.limits.value_bytes_max);
        self.check_capacity(self.bytes_after_write(&key, Some(&text)))?;
        self.insert(key, text);
        Ok(Response::Integer(updated))
    }

    fn on_mget(&self, keys: &[Vec<u8>]) -> Result<Response, KvError> {
        let values: Vec<Option<&Vec<u8>>> = keys.iter().map(|key| self.entries.get(key)).collect();
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
            values.into_iter().map(|value| value.cloned()).collect(),
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
                let existing = self
                    .entries
                    .get(*key)
                    .map_or(0, |old| entry_bytes(key, old));
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
        let current = self.entries.get(&key);
        if current.map(Vec::as_slice) != expected.as_deref() {
            return Ok(Response::CompareAndSet {
                swapped: false,
                current: current.cloned(),
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
        self.insert(key, joined);
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

    fn on_db_size(&self) -> Response {
        Response::Count(self.len() as u64)
    }

    fn on_flush_db(&mut self) -> Response {
        let deleted = self.len();
        // A fresh store under the same limits: nothing of the old layout survives, whatever it is.
        *self = KvStore::new(*self.limits());
        Response::Count(deleted as u64)
    }

    /// Inserts or replaces; the caller has checked the capacity.
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let added = entry_bytes(&key, &value);
        let removed = match self.entries.get_mut(&key) {
            Some(slot) => entry_bytes(&key, &std::mem::replace(slot, value)),
            None => {
                self.entries.insert(key, value);
                0
            }
        };
        // May pass the total midway through an `MSet` with a repeated key; `apply` asserts
        // the bound once the command is complete.
        self.stored_bytes = self.stored_bytes - removed + added;
    }

    /// Removes `key`; true if it was present.
    fn remove(&mut self, key: &[u8]) -> bool {
        match self.entries.remove_entry(key) {
            Some((key, value)) => {
                self.stored_bytes -= entry_bytes(&key, &value);
                true
            }
            None => false,
        }
    }

    /// Builds a store from snapshot bytes, checking every entry against `limits`.
    fn from_snapshot(limits: KvLimits, snapshot: &[u8]) -> Result<KvStore, String> {
        // The snapshot is already in memory and bounded by the transport; decoding never
        // pre-allocates more than its input justifies, so no tighter bound is needed here.
        let entries: Vec<(ByteBuf, ByteBuf)> = tessera_types::decode(snapshot, usize::MAX)
            .map_err(|_| "bytes are not a valid key-value snapshot".to_string())?;
        let entries: Vec<(Vec<u8>, Vec<u8>)> = entries
            .into_iter()
            .map(|(key, value)| (key.0, value.0))
            .collect();
        let mut store = KvStore::new(limits);
        let mut previous: Option<&[u8]> = None;
        for (index, (key, value)) in entries.iter().enumerate() {
            let entry_error = |error: KvError| format!("entry {index}: {error}");
            store.check_key(key).map_err(entry_error)?;
            store.check_value(value).map_err(entry_error)?;
            if previous.is_some_and(|previous| previous >= key.as_slice()) {
                return Err(format!(
                    "entry {index}: keys are not in strictly increasing order"
                ));
            }
            previous = Some(key);
            store.stored_bytes = store.stored_bytes.saturating_add(entry_bytes(key, value));
            store
                .check_capacity(store.stored_bytes)
                .map_err(entry_error)?;
        }
        // Sorted input: the map is built in bulk, in linear time.
        store.entries = entries.into_iter().collect();
        Ok(store)
    }

    /// Recomputes the invariants from scratch (tests only: linear in the store size).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let total: u64 = self
            .entries
            .iter()
            .map(|(key, value)| entry_bytes(key, value))
            .sum();
        assert_eq!(self.stored_bytes, total);
        assert!(self.stored_bytes <= self.limits.total_bytes_max);
        for (key, value) in &self.entries {
            assert!(key.len() <= self.limits.key_bytes_max);
            assert!(value.len() <= self.limits.value_bytes_max);
        }
    }
}

impl StateMachine for KvStore {
    fn execute(&mut self, operation: &[u8]) -> Vec<u8> {
        let response = match Command::decode(operation) {
            Ok(command) => self.apply(command),
            Err(error) => Response::Error(error),
        };
        response.encode()
    }

    /// The entries in key order, encoded as a sequence of `(key, value)` pairs.
    fn snapshot(&self) -> Vec<u8> {
        tessera_types::encode(&SortedEntries(&self.entries))
    }

    /// Accepts only what [`KvStore::snapshot`] produces under this store's limits: strictly
    /// increasing keys, every key, value and the total within bounds, no trailing bytes.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        *self = KvStore::from_snapshot(self.limits, snapshot).map_err(RestoreError)?;
        Ok(())
    }

    /// BLAKE3 under [`STATE_DIGEST_DOMAIN`] of the number of entries, then of every key and
    /// value in key order, each preceded by its length as a little-endian `u64`. The entries
    /// are hashed in pieces of at least [`DIGEST_PIECE_BYTES`] cut after an entry, so memory
    /// stays bounded and the hasher sees few, large inputs (many small ones are slower).
    fn digest(&self) -> Digest {
        let mut builder = DigestBuilder::new(STATE_DIGEST_DOMAIN);
        builder.u64(self.entries.len() as u64);
        let mut piece = Vec::with_capacity(2 * DIGEST_PIECE_BYTES);
        for (key, value) in &self.entries {
            for part in [key, value] {
                piece.extend_from_slice(&(part.len() as u64).to_le_bytes());
                piece.extend_from_slice(part);
            }
            if piece.len() >= DIGEST_PIECE_BYTES {
                builder.bytes(&piece);
                piece.clear();
            }
        }
        builder.bytes(&piece);
        builder.finish()
    }
}

/// Serializes the map as a sequence of pairs without copying it.
struct SortedEntries<'a>(&'a BTreeMap<Vec<u8>, Vec<u8>>);

impl Serialize for SortedEntries<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(key, value)| (Bytes(key), Bytes(value))))
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
fn values_response_bytes(values: &[Option<&Vec<u8>>]) -> usize {
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
mod tests;
