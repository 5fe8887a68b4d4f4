//! The client table (paper 004's `V_req` plus cached replies): exactly-once execution.
//!
//! Part of the replicated state: it is included in checkpoints and state transfer, and every
//! correct replica holds the same table after the same sequence number. Its size is bounded;
//! when full, the client served longest ago is evicted — deterministically, since it depends only
//! on the agreed execution order.
//!
//! It also holds the *agreed clock*: the largest batch time executed so far (docs/PROTOCOL.md
//! §4, *Agreed time*). It is replicated state for the same reason as the table: a replica that
//! fetched the state must execute the next batch at the same time as the others. And it holds
//! the *epoch table*: each replica's installed USIG epoch and the sequence number of its INSTALL
//! entry (docs/PROTOCOL.md §8), which decides whose messages count in which epoch.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tessera_types::{ClientId, Digest, EpochInstall, ReplicaId, SeqNum, View};

/// What the table remembers about one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// Highest request number executed.
    pub request_number: u64,
    /// Its result (resent if the client asks again).
    pub result: Vec<u8>,
    /// The view it was executed in. Only a hint for the client (who the primary is): replicas
    /// may execute one batch in different views (normally, or as a re-proposal after a view
    /// change), so it is *not* part of the replicated state's digest.
    pub view: View,
    /// The sequence number it was executed at (orders eviction).
    pub seq: SeqNum,
}

/// How a request relates to what the table knows.
#[derive(Debug, PartialEq, Eq)]
pub enum Freshness<'a> {
    /// Never executed: execute it.
    New,
    /// The latest executed request of this client: resend the cached reply.
    Latest(&'a ClientEntry),
    /// Older than the latest executed: drop it.
    Stale,
}

/// The table as snapshots carry it: the agreed clock, the entries in client order and the
/// epoch table in replica order.
pub type ClientSnapshot = (u64, Vec<(ClientId, ClientEntry)>, Vec<EpochInstall>);

/// Bounded map from client to its latest executed request, and the agreed clock.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientTable {
    entries: BTreeMap<ClientId, ClientEntry>,
    by_age: BTreeSet<(SeqNum, ClientId)>,
    capacity: usize,
    /// The largest batch time executed (ms since the Unix epoch); 0 before any.
    clock_ms: u64,
    /// Every replica whose installed USIG epoch is above 0 (the others are at epoch 0).
    epochs: BTreeMap<ReplicaId, EpochInstall>,
}

impl ClientTable {
    /// An empty table holding at most `capacity` clients.
    pub fn new(capacity: usize) -> ClientTable {
        assert!(
            capacity > 0,
            "the client table needs room for at least one client"
        );
        ClientTable {
            entries: BTreeMap::new(),
            by_age: BTreeSet::new(),
            capacity,
            clock_ms: 0,
            epochs: BTreeMap::new(),
        }
    }

    /// `replica`'s installed USIG epoch (epoch 0, installed at 0, until an INSTALL moved it).
    pub fn epoch_of(&self, replica: ReplicaId) -> EpochInstall {
        self.epochs.get(&replica).copied().unwrap_or(EpochInstall {
            replica,
            epoch: 0,
            installed_at: SeqNum(0),
        })
    }

    /// The epoch table in replica order (replicas at epoch 0 left out), as CHECKPOINTs carry it.
    pub fn epochs(&self) -> Vec<EpochInstall> {
        self.epochs.values().copied().collect()
    }

    /// Executes an INSTALL entry at `seq`: `replica` moves to `epoch` if that is above its
    /// current one. Returns whether it moved (a stale entry is a no-op on every replica alike).
    pub fn install_epoch(&mut self, replica: ReplicaId, epoch: u64, seq: SeqNum) -> bool {
        if epoch <= self.epoch_of(replica).epoch {
            return false;
        }
        self.epochs.insert(
            replica,
            EpochInstall {
                replica,
                epoch,
                installed_at: seq,
            },
        );
        true
    }

    /// The agreed clock: the largest batch time executed so far.
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Moves the agreed clock to a batch's time unless it is already later, and returns the
    /// time the batch executes at.
    pub fn advance_clock(&mut self, batch_time_ms: u64) -> u64 {
        self.clock_ms = self.clock_ms.max(batch_time_ms);
        self.clock_ms
    }

    /// Classifies a request. An INSTALL entry (a reserved client id) is new while its epoch is
    /// above the one installed, stale after.
    pub fn freshness(&self, client: ClientId, request_number: u64) -> Freshness<'_> {
        if client.0 >= tessera_types::INSTALL_CLIENT_BASE {
            let replica = ReplicaId((client.0 - tessera_types::INSTALL_CLIENT_BASE) as u32);
            return if request_number > self.epoch_of(replica).epoch {
                Freshness::New
            } else {
                Freshness::Stale
            };
        }
        match self.entries.get(&client) {
            None => Freshness::New,
            Some(entry) if request_number > entry.request_number => Freshness::New,
            Some(entry) if request_number == entry.request_number => Freshness::Latest(entry),
            Some(_) => Freshness::Stale,
        }
    }

    /// Records an executed request, evicting the oldest client if the table is full.
    pub fn record(&mut self, client: ClientId, entry: ClientEntry) {
        if let Some(previous) = self.entries.remove(&client) {
            self.by_age.remove(&(previous.seq, client));
        } else if self.entries.len() >= self.capacity {
            let oldest = *self
                .by_age
                .iter()
                .next()
                .expect("a full table is not empty");
            self.by_age.remove(&oldest);
            self.entries.remove(&oldest.1);
        }
        self.by_age.insert((entry.seq, client));
        self.entries.insert(client, entry);
        debug_assert_eq!(self.entries.len(), self.by_age.len());
    }

    /// Number of clients remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no client is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The agreed clock and the canonical entries in client order (for snapshots).
    pub fn to_snapshot(&self) -> ClientSnapshot {
        let entries = self
            .entries
            .iter()
            .map(|(client, entry)| (*client, entry.clone()))
            .collect();
        (self.clock_ms, entries, self.epochs())
    }

    /// Rebuilds a table from a snapshot; refuses duplicates, disorder or overflow.
    pub fn from_snapshot(snapshot: ClientSnapshot, capacity: usize) -> Result<ClientTable, String> {
        let (clock_ms, entries, epochs) = snapshot;
        if entries.len() > capacity {
            return Err(format!(
                "{} clients exceed the table capacity {capacity}",
                entries.len()
            ));
        }
        let mut table = ClientTable::new(capacity);
        let mut previous: Option<ClientId> = None;
        for (client, entry) in entries {
            if previous.is_some_and(|previous| previous >= client) {
                return Err("client entries are not strictly ordered".into());
            }
            previous = Some(client);
            table.record(client, entry);
        }
        table.clock_ms = clock_ms;
        let mut previous: Option<ReplicaId> = None;
        for install in epochs {
            if previous.is_some_and(|previous| previous >= install.replica) || install.epoch == 0 {
                return Err("epoch entries are not strictly ordered, or name epoch 0".into());
            }
            previous = Some(install.replica);
            table.epochs.insert(install.replica, install);
        }
        Ok(table)
    }

    /// Digest of the table's replicated content (everything but the view hint).
    pub fn digest(&self) -> Digest {
        let mut builder = tessera_crypto::DigestBuilder::new("tessera.client-table.v3");
        builder.u64(self.clock_ms).u64(self.entries.len() as u64);
        for (client, entry) in &self.entries {
            builder
                .u64(client.0)
                .u64(entry.request_number)
                .bytes(&entry.result)
                .u64(entry.seq.0);
        }
        builder.u64(self.epochs.len() as u64);
        for install in self.epochs.values() {
            builder
                .u64(u64::from(install.replica.0))
                .u64(install.epoch)
                .u64(install.installed_at.0);
        }
        builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(request_number: u64, seq: u64) -> ClientEntry {
        ClientEntry {
            request_number,
            result: vec![request_number as u8],
            view: View(0),
            seq: SeqNum(seq),
        }
    }

    #[test]
    fn classifies_new_latest_and_stale() {
        let mut table = ClientTable::new(4);
        assert_eq!(table.freshness(ClientId(1), 5), Freshness::New);
        table.record(ClientId(1), entry(5, 1));
        assert!(matches!(
            table.freshness(ClientId(1), 5),
            Freshness::Latest(_)
        ));
        assert_eq!(table.freshness(ClientId(1), 4), Freshness::Stale);
        assert_eq!(table.freshness(ClientId(1), 6), Freshness::New);
    }

    #[test]
    fn evicts_the_client_served_longest_ago() {
        let mut table = ClientTable::new(2);
        table.record(ClientId(1), entry(1, 1));
        table.record(ClientId(2), entry(1, 2));
        table.record(ClientId(1), entry(2, 3));
        table.record(ClientId(3), entry(1, 4));
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.freshness(ClientId(2), 1),
            Freshness::New,
            "client 2 was evicted"
        );
        assert!(matches!(
            table.freshness(ClientId(1), 2),
            Freshness::Latest(_)
        ));
    }

    #[test]
    fn digest_ignores_the_view_hint() {
        let mut executed_in_view_zero = ClientTable::new(4);
        executed_in_view_zero.record(ClientId(1), entry(1, 1));
        let mut executed_in_view_one = ClientTable::new(4);
        executed_in_view_one.record(
            ClientId(1),
            ClientEntry {
                view: View(1),
                ..entry(1, 1)
            },
        );
        assert_eq!(
            executed_in_view_zero.digest(),
            executed_in_view_one.digest()
        );
    }

    #[test]
    fn round_trips_through_entries_with_equal_digest() {
        let mut table = ClientTable::new(8);
        table.record(ClientId(3), entry(1, 1));
        table.record(ClientId(1), entry(7, 2));
        table.advance_clock(1_700_000_000_000);
        let rebuilt = ClientTable::from_snapshot(table.to_snapshot(), 8).unwrap();
        assert_eq!(rebuilt.digest(), table.digest());
        assert_eq!(rebuilt.clock_ms(), 1_700_000_000_000);
        assert!(ClientTable::from_snapshot(table.to_snapshot(), 1).is_err());
    }

    #[test]
    fn the_agreed_clock_never_goes_back_and_is_in_the_digest() {
        let mut table = ClientTable::new(8);
        let empty = table.digest();
        assert_eq!(table.advance_clock(500), 500);
        assert_eq!(
            table.advance_clock(300),
            500,
            "an earlier batch time does not move it"
        );
        assert_eq!(table.clock_ms(), 500);
        assert_ne!(table.digest(), empty);
    }
}
