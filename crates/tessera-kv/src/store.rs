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
//! any other input than the command.

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

use crate::command::{Command, KvError, Response, SetCondition};
use crate::limits::KvLimits;

/// Domain of the element hashes summed into a partition's [`LtHash`].
pub const ENTRY_DOMAIN: &str = "tessera.kv.entry.v1";
/// Domain of a partition digest.
pub const PARTITION_DIGEST_DOMAIN: &str = "tessera.kv.partition.v1";
/// Domain of the hash that assigns a key to its partition.
pub const PARTITION_OF_DOMAIN: &str = "tessera.kv.partition-of.v1";

/// Partitions of the abstract state: a power of two, part of the digest definition (changing it
/// changes every digest). 256 keeps the per-store overhead small (256 sums of 2 KiB) while a
/// 1 GiB state still splits into 4 MiB partitions, the unit a state transfer fetches and checks.
pub const PARTITIONS: usize = 256;

/// A key or a value as stored: shared, so a frozen copy of a partition (a checkpoint) and the
/// live one share every entry they have in common.
type Shared = Arc<[u8]>;
/// One partition's entries, in key order. A persistent map: cloning it (freezing a checkpoint)
/// costs nothing, and a later write copies only the path to the entry it changes.
type Entries = imbl::OrdMap<Shared, Shared>;

/// One partition of the abstract state.
#[derive(Clone, Debug, Default)]
struct Partition {
    entries: Entries,
    /// The homomorphic sum of `(key, value)` over `entries`.
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
            cache: RefCell::new(DigestCache {
                digests,
                tree,
                stale: BTreeSet::new(),
            }),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.partitions[partition_of(key)]
            .entries
            .get(key)
            .map(|value| &**value)
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
        self.insert(key, text);
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
        let index = partition_of(&key);
        let partition = &mut self.partitions[index];
        let key: Shared = Arc::from(key);
        let value: Shared = Arc::from(value);
        let added = entry_bytes(&key, &value);
        partition.sum.add(entry_hasher(), &[&key, &value]);
        let removed = match partition.entries.insert(key.clone(), value) {
            Some(old) => {
                partition.sum.remove(entry_hasher(), &[&key, &old]);
                entry_bytes(&key, &old)
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
            Some((key, value)) => {
                let bytes = entry_bytes(&key, &value);
                partition.sum.remove(entry_hasher(), &[&key, &value]);
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

    /// Every entry in key order (tests and snapshots: linear in the store size).
    fn sorted_entries(&self) -> Vec<(&[u8], &[u8])> {
        let mut entries: Vec<(&[u8], &[u8])> = self
            .partitions
            .iter()
            .flat_map(|partition| partition.entries.iter())
            .map(|(key, value)| (&**key, &**value))
            .collect();
        entries.sort_unstable();
        entries
    }

    /// A canonical serialization of the whole state: every `(key, value)` pair in key order.
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
        let entries: Vec<(ByteBuf, ByteBuf)> = tessera_types::decode(snapshot, usize::MAX)
            .map_err(|_| "bytes are not a valid key-value snapshot".to_string())?;
        let entries: Vec<(Vec<u8>, Vec<u8>)> = entries
            .into_iter()
            .map(|(key, value)| (key.0, value.0))
            .collect();
        let mut store = KvStore::new(limits);
        let mut total = 0u64;
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
            total = total.saturating_add(entry_bytes(key, value));
            store.check_capacity(total).map_err(entry_error)?;
        }
        for (key, value) in entries {
            store.insert(key, value);
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
            for (key, value) in partition.entries.iter() {
                assert_eq!(partition_of(key), index, "key in its partition");
                assert!(key.len() <= self.limits.key_bytes_max);
                assert!(value.len() <= self.limits.value_bytes_max);
                sum.add(entry_hasher(), &[key, value]);
                bytes += entry_bytes(key, value);
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

    fn execute(&mut self, operation: &[u8], _time_ms: u64) -> Vec<u8> {
        let response = match Command::decode(operation) {
            Ok(command) => self.apply(command),
            Err(error) => Response::Error(error),
        };
        response.encode()
    }

    fn partition_count(&self) -> u32 {
        PARTITIONS as u32
    }

    /// BLAKE3 under [`PARTITION_DIGEST_DOMAIN`] of the partition index, its entry count and
    /// the [`LtHash`] sum of its `(key, value)` pairs under [`ENTRY_DOMAIN`]. A key's partition
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
        let mut taken: Vec<(&[u8], &[u8])> = Vec::new();
        let mut bytes = 0usize;
        let mut range = entries
            .range::<_, [u8]>((start, Bound::Unbounded))
            .peekable();
        for (key, value) in range.by_ref() {
            taken.push((key, value));
            bytes += key.len() + value.len();
            if bytes >= budget {
                break;
            }
        }
        let next = match (range.peek(), taken.last()) {
            (Some(_), Some((last, _))) => Some(last.to_vec()),
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
    entries: Vec<(Shared, Shared)>,
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
        let entries: Vec<(ByteBuf, ByteBuf)> = tessera_types::decode(chunk, usize::MAX)
            .map_err(|_| RestoreError("bytes are not a valid key-value chunk".into()))?;
        let added = entries.len() as u64;
        for (key, value) in entries {
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
            self.sum.add(entry_hasher(), &[&key, &value]);
            self.entries.push((Arc::from(key), Arc::from(value)));
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

/// Serializes entries as a sequence of pairs without copying them (the snapshot and chunk
/// format).
struct EntrySeq<'a>(&'a [(&'a [u8], &'a [u8])]);

impl Serialize for EntrySeq<'_> {
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
