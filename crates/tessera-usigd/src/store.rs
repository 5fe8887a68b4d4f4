//! The daemon's durable USIG state: the current epoch and the last counter value it may have
//! issued in it, fsynced before any UI with that value is signed and before a new epoch is
//! announced.
//!
//! The file is two fixed 24-byte slots, `[epoch u64 BE][counter u64 BE][check 8 bytes]`, where
//! `check` is a SHA-256 prefix over (domain, replica, slot, epoch, counter). Each write goes to
//! the slot that does *not* hold the current state, so a torn or lost write can only damage a
//! value not yet used (persisting comes first) while the other slot still holds the previous
//! one; loading takes the valid slot with the highest (epoch, counter). The check also binds
//! the file to one replica, so a counter file copied from another replica is refused rather
//! than trusted.
//!
//! The store never goes backwards: [`CounterStore::persist`] refuses a counter not above the
//! last persisted one, and [`CounterStore::start_epoch`] an epoch not above the current one, so
//! no (epoch, counter) pair is made durable twice and an old epoch never comes back.

use sha2::{Digest as _, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tessera_types::ReplicaId;
use thiserror::Error;

const SLOT_LEN: usize = 24;
const FILE_LEN: usize = 2 * SLOT_LEN;
/// v2: slots carry their epoch (v1 files were 32 bytes and bound one epoch in the check).
const DOMAIN: &[u8] = b"tessera.usigd.counter.v2";

/// The counter file cannot be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Reading, writing or syncing failed.
    #[error("counter file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file has the wrong size or no valid slot (damaged, an older format, or another
    /// replica's).
    #[error(
        "counter file {path} is not a valid counter file for replica {replica} ({problem}); \
         refusing to start, since guessing a value could reissue a counter. Restore it, or give \
         this replica a new key and USIG enrolment"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Replica the daemon serves.
        replica: u32,
        /// What was wrong.
        problem: String,
    },
    /// A counter value not above the last persisted one was asked to be persisted.
    #[error(
        "counter may only move forward: asked to persist {asked} after {last} in epoch {epoch}"
    )]
    Backwards {
        /// The current epoch.
        epoch: u64,
        /// Last persisted value.
        last: u64,
        /// Value asked for.
        asked: u64,
    },
    /// An epoch not above the current one was asked to be started.
    #[error("epochs may only move forward: asked to start epoch {asked} in epoch {current}")]
    EpochBackwards {
        /// The current epoch.
        current: u64,
        /// Epoch asked for.
        asked: u64,
    },
}

/// The durable state: the current epoch and the last counter value persisted in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The epoch UIs are issued in.
    pub epoch: u64,
    /// No UI of `epoch` with a higher counter was ever signed.
    pub counter: u64,
}

/// The open counter file and the position last persisted in it.
#[derive(Debug)]
pub struct CounterStore {
    path: PathBuf,
    file: File,
    replica: ReplicaId,
    position: Position,
    /// The slot holding `position`; the next write goes to the other one.
    slot: usize,
}

fn check(replica: ReplicaId, slot: usize, position: Position) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update((DOMAIN.len() as u64).to_be_bytes());
    hasher.update(DOMAIN);
    hasher.update(u64::from(replica.0).to_be_bytes());
    hasher.update((slot as u64).to_be_bytes());
    hasher.update(position.epoch.to_be_bytes());
    hasher.update(position.counter.to_be_bytes());
    let digest = hasher.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn slot_bytes(replica: ReplicaId, slot: usize, position: Position) -> [u8; SLOT_LEN] {
    let mut bytes = [0u8; SLOT_LEN];
    bytes[..8].copy_from_slice(&position.epoch.to_be_bytes());
    bytes[8..16].copy_from_slice(&position.counter.to_be_bytes());
    bytes[16..].copy_from_slice(&check(replica, slot, position));
    bytes
}

fn parse_slot(replica: ReplicaId, slot: usize, bytes: &[u8]) -> Option<Position> {
    let mut epoch = [0u8; 8];
    let mut counter = [0u8; 8];
    epoch.copy_from_slice(&bytes[..8]);
    counter.copy_from_slice(&bytes[8..16]);
    let position = Position {
        epoch: u64::from_be_bytes(epoch),
        counter: u64::from_be_bytes(counter),
    };
    (bytes[16..] == check(replica, slot, position)).then_some(position)
}

impl CounterStore {
    /// Opens `path`, creating it at `fresh_epoch` with counter 0 (and syncing its directory) if
    /// it does not exist. An existing file keeps the epoch it holds.
    pub fn open(
        path: &Path,
        replica: ReplicaId,
        fresh_epoch: u64,
    ) -> Result<CounterStore, StoreError> {
        let io_error = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                let (position, slot) = Self::load(path, &file, replica)?;
                Ok(CounterStore {
                    path: path.to_path_buf(),
                    file,
                    replica,
                    position,
                    slot,
                })
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Self::create(path, replica, fresh_epoch).map_err(io_error)
            }
            Err(error) => Err(io_error(error)),
        }
    }

    fn create(path: &Path, replica: ReplicaId, epoch: u64) -> io::Result<CounterStore> {
        // Written under a temporary name and renamed, so a crash never leaves a short file
        // that the next start would refuse as corrupt.
        let temporary = path.with_extension("creating");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        let position = Position { epoch, counter: 0 };
        let mut initial = [0u8; FILE_LEN];
        // Slot 1 stays zeroed, which fails its check.
        initial[..SLOT_LEN].copy_from_slice(&slot_bytes(replica, 0, position));
        file.write_all_at(&initial, 0)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        sync_parent(path)?;
        Ok(CounterStore {
            path: path.to_path_buf(),
            file,
            replica,
            position,
            slot: 0,
        })
    }

    fn load(path: &Path, file: &File, replica: ReplicaId) -> Result<(Position, usize), StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            replica: replica.0,
            problem,
        };
        let length = file
            .metadata()
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if length != FILE_LEN as u64 {
            return Err(corrupt(format!("{length} bytes, want {FILE_LEN}")));
        }
        let mut bytes = [0u8; FILE_LEN];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let slots = [
            parse_slot(replica, 0, &bytes[..SLOT_LEN]),
            parse_slot(replica, 1, &bytes[SLOT_LEN..]),
        ];
        match slots {
            [None, None] => Err(corrupt("no slot passes its check".into())),
            [Some(position), None] => Ok((position, 0)),
            [None, Some(position)] => Ok((position, 1)),
            // Writes strictly increase and alternate slots, so two equal valid slots were not
            // written by this store.
            [Some(first), Some(second)] if first == second => Err(corrupt(format!(
                "both slots hold epoch {} counter {}",
                first.epoch, first.counter
            ))),
            [Some(first), Some(second)] if first > second => Ok((first, 0)),
            [Some(_), Some(second)] => Ok((second, 1)),
        }
    }

    /// The last position persisted.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.position.epoch
    }

    /// The last counter value persisted in the current epoch: no UI of this epoch with a
    /// higher counter was ever signed.
    pub fn last(&self) -> u64 {
        self.position.counter
    }

    /// Makes `counter` of the current epoch durable (written and fdatasynced); only then may a
    /// UI with it be signed.
    pub fn persist(&mut self, counter: u64) -> Result<(), StoreError> {
        if counter <= self.position.counter {
            return Err(StoreError::Backwards {
                epoch: self.position.epoch,
                last: self.position.counter,
                asked: counter,
            });
        }
        self.write(Position {
            epoch: self.position.epoch,
            counter,
        })
    }

    /// Makes epoch `epoch` with counter 0 durable; only then may the daemon say the epoch has
    /// started. After a crash the daemon resumes in `epoch` (or, if the write did not reach
    /// the disk, in the old epoch at its last persisted value: nothing was issued in between).
    pub fn start_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        if epoch <= self.position.epoch {
            return Err(StoreError::EpochBackwards {
                current: self.position.epoch,
                asked: epoch,
            });
        }
        self.write(Position { epoch, counter: 0 })
    }

    fn write(&mut self, position: Position) -> Result<(), StoreError> {
        debug_assert!(position > self.position, "the store only moves forward");
        let slot = 1 - self.slot;
        let offset = (slot * SLOT_LEN) as u64;
        let write = self
            .file
            .write_all_at(&slot_bytes(self.replica, slot, position), offset)
            .and_then(|()| self.file.sync_data());
        write.map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.position = position;
        self.slot = slot;
        Ok(())
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLICA: ReplicaId = ReplicaId(0);

    fn open(path: &Path) -> CounterStore {
        CounterStore::open(path, REPLICA, 0).expect("open")
    }

    #[test]
    fn persists_and_reloads_the_highest_value() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        assert_eq!(
            store.position(),
            Position {
                epoch: 0,
                counter: 0
            }
        );
        for counter in 1..=5 {
            store.persist(counter).expect("persist");
        }
        drop(store);
        let store = open(&path);
        assert_eq!(store.last(), 5);
        assert_eq!(store.epoch(), 0);
    }

    #[test]
    fn a_fresh_store_starts_in_the_given_epoch_and_an_existing_one_keeps_its_own() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = CounterStore::open(&path, REPLICA, 7).expect("create");
        assert_eq!(
            store.position(),
            Position {
                epoch: 7,
                counter: 0
            }
        );
        store.persist(2).expect("persist");
        drop(store);
        let store = CounterStore::open(&path, REPLICA, 3).expect("reopen");
        assert_eq!(
            store.position(),
            Position {
                epoch: 7,
                counter: 2
            }
        );
    }

    #[test]
    fn refuses_going_backwards() {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut store = open(&directory.path().join("counter"));
        store.persist(3).expect("forward");
        assert!(matches!(
            store.persist(3),
            Err(StoreError::Backwards {
                epoch: 0,
                last: 3,
                asked: 3
            })
        ));
        assert_eq!(store.last(), 3);
    }

    #[test]
    fn epochs_start_at_counter_zero_and_never_go_back() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        store.persist(9).expect("persist");
        store.start_epoch(1).expect("next epoch");
        assert_eq!(
            store.position(),
            Position {
                epoch: 1,
                counter: 0
            }
        );
        for asked in [0, 1] {
            assert!(matches!(
                store.start_epoch(asked),
                Err(StoreError::EpochBackwards { current: 1, .. })
            ));
        }
        store.persist(1).expect("counts from 1 again");
        store.start_epoch(5).expect("epochs may skip");
        drop(store);
        let store = open(&path);
        assert_eq!(
            store.position(),
            Position {
                epoch: 5,
                counter: 0
            }
        );
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_value() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        store.persist(1).expect("persist");
        store.persist(2).expect("persist");
        drop(store);
        // Writes alternate from slot 0 (the creation): 1 went to slot 1, 2 to slot 0. Damage
        // slot 0, as a torn write of 2 would.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&[0xAA; 4], 12).expect("damage");
        drop(file);
        let mut store = open(&path);
        assert_eq!(store.last(), 1);
        // The next write goes to the damaged slot, never over the only good one.
        store.persist(2).expect("persist");
        drop(store);
        assert_eq!(open(&path).last(), 2);
    }

    #[test]
    fn a_torn_epoch_start_falls_back_to_the_old_epoch() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        store.persist(4).expect("persist");
        store.start_epoch(1).expect("next epoch");
        drop(store);
        // 4 went to slot 1, epoch 1 to slot 0: damage slot 0's epoch field.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&[0x55; 2], 6).expect("damage");
        drop(file);
        assert_eq!(
            open(&path).position(),
            Position {
                epoch: 0,
                counter: 4
            }
        );
    }

    /// Reserving ahead persists bounds of any parity; alternating slots (rather than choosing
    /// one by the value's parity) keeps the previous bound intact while the next is written.
    #[test]
    fn same_parity_bounds_never_overwrite_the_only_good_slot() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        store.persist(2).expect("persist");
        store.persist(4).expect("persist");
        drop(store);
        // 4 is in slot 0; tear it: the store must still know 2 (slot 1), not fall to nothing.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&[0xAA; 4], 12).expect("damage");
        drop(file);
        assert_eq!(open(&path).last(), 2);
    }

    #[test]
    fn refuses_another_replicas_file_wrong_sizes_and_duplicate_slots() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = open(&path);
        store.persist(1).expect("persist");
        drop(store);
        assert!(matches!(
            CounterStore::open(&path, ReplicaId(1), 0),
            Err(StoreError::Corrupt { replica: 1, .. })
        ));
        let position = Position {
            epoch: 2,
            counter: 3,
        };
        let mut twice = slot_bytes(REPLICA, 0, position).to_vec();
        twice.extend_from_slice(&slot_bytes(REPLICA, 1, position));
        std::fs::write(&path, &twice).expect("write");
        assert!(
            matches!(CounterStore::open(&path, REPLICA, 0), Err(StoreError::Corrupt { problem, .. }) if problem.contains("both slots"))
        );
        // A version-1 file (32 bytes) is refused, not misread.
        for length in [7, 32, FILE_LEN + 1] {
            std::fs::write(&path, vec![0u8; length]).expect("resize");
            assert!(matches!(
                CounterStore::open(&path, REPLICA, 0),
                Err(StoreError::Corrupt { .. })
            ));
        }
    }
}
