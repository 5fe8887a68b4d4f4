//! The daemon's durable counter: the last value it may have issued, fsynced before any UI with
//! that value is signed.
//!
//! The file is two fixed 16-byte slots, `[counter u64 BE][check 8 bytes]`; value `c` goes to
//! slot `c % 2`, and `check` is a SHA-256 prefix over (domain, replica, epoch, slot, counter).
//! A torn or lost write can only damage the slot being written, whose value was not yet used
//! (persisting comes first), while the other slot still holds the previous value; loading takes
//! the highest valid slot. The check also binds the file to one replica and epoch, so a counter
//! file copied from another replica is refused rather than trusted.
//!
//! The store never goes backwards: [`CounterStore::persist`] refuses a value not above the
//! last persisted one.

use sha2::{Digest as _, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tessera_usig::UsigIdentity;
use thiserror::Error;

const SLOT_LEN: usize = 16;
const FILE_LEN: usize = 2 * SLOT_LEN;
const DOMAIN: &[u8] = b"tessera.usigd.counter.v1";

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
    /// The file has the wrong size or no valid slot (damaged, or another replica's or epoch's).
    #[error(
        "counter file {path} is not a valid counter file for replica {replica} epoch {epoch} \
         ({problem}); refusing to start, since guessing a value could reissue a counter. \
         Restore it, or give this replica a new USIG epoch and key"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Replica the daemon serves.
        replica: u32,
        /// Epoch the daemon serves.
        epoch: u64,
        /// What was wrong.
        problem: String,
    },
    /// A value not above the last persisted one was asked to be persisted.
    #[error("counter may only move forward: asked to persist {asked} after {last}")]
    Backwards {
        /// Last persisted value.
        last: u64,
        /// Value asked for.
        asked: u64,
    },
}

/// The open counter file and the last value persisted in it.
#[derive(Debug)]
pub struct CounterStore {
    path: PathBuf,
    file: File,
    identity: UsigIdentity,
    last: u64,
}

fn check(identity: UsigIdentity, slot: usize, counter: u64) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update((DOMAIN.len() as u64).to_be_bytes());
    hasher.update(DOMAIN);
    hasher.update(u64::from(identity.replica.0).to_be_bytes());
    hasher.update(identity.epoch.to_be_bytes());
    hasher.update((slot as u64).to_be_bytes());
    hasher.update(counter.to_be_bytes());
    let digest = hasher.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn slot_bytes(identity: UsigIdentity, counter: u64) -> [u8; SLOT_LEN] {
    let slot = (counter % 2) as usize;
    let mut bytes = [0u8; SLOT_LEN];
    bytes[..8].copy_from_slice(&counter.to_be_bytes());
    bytes[8..].copy_from_slice(&check(identity, slot, counter));
    bytes
}

impl CounterStore {
    /// Opens `path`, creating it at counter 0 (and syncing its directory) if it does not exist.
    pub fn open(path: &Path, identity: UsigIdentity) -> Result<CounterStore, StoreError> {
        let io_error = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                let last = Self::load(path, &file, identity)?;
                Ok(CounterStore {
                    path: path.to_path_buf(),
                    file,
                    identity,
                    last,
                })
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Self::create(path, identity).map_err(io_error)
            }
            Err(error) => Err(io_error(error)),
        }
    }

    fn create(path: &Path, identity: UsigIdentity) -> io::Result<CounterStore> {
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
        let mut initial = [0u8; FILE_LEN];
        // Slot 0 holds counter 0; slot 1 stays zeroed, which fails its check (a valid slot 1
        // would claim an odd counter had been reserved).
        initial[..SLOT_LEN].copy_from_slice(&slot_bytes(identity, 0));
        file.write_all_at(&initial, 0)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        sync_parent(path)?;
        Ok(CounterStore {
            path: path.to_path_buf(),
            file,
            identity,
            last: 0,
        })
    }

    fn load(path: &Path, file: &File, identity: UsigIdentity) -> Result<u64, StoreError> {
        let corrupt = |problem: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            replica: identity.replica.0,
            epoch: identity.epoch,
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
        let mut best: Option<u64> = None;
        for slot in 0..2 {
            let record = &bytes[slot * SLOT_LEN..(slot + 1) * SLOT_LEN];
            let mut counter_bytes = [0u8; 8];
            counter_bytes.copy_from_slice(&record[..8]);
            let counter = u64::from_be_bytes(counter_bytes);
            let valid = counter % 2 == slot as u64 && record[8..] == check(identity, slot, counter);
            if valid {
                best = Some(best.map_or(counter, |other| other.max(counter)));
            }
        }
        best.ok_or_else(|| corrupt("no slot passes its check".into()))
    }

    /// The last value persisted: no UI with a higher counter was ever signed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Makes `counter` durable (written and fdatasynced); only then may a UI with it be signed.
    pub fn persist(&mut self, counter: u64) -> Result<(), StoreError> {
        if counter <= self.last {
            return Err(StoreError::Backwards {
                last: self.last,
                asked: counter,
            });
        }
        let offset = (counter % 2) * SLOT_LEN as u64;
        let write = self
            .file
            .write_all_at(&slot_bytes(self.identity, counter), offset)
            .and_then(|()| self.file.sync_data());
        write.map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.last = counter;
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
    use tessera_types::ReplicaId;

    fn identity(replica: u32) -> UsigIdentity {
        UsigIdentity {
            replica: ReplicaId(replica),
            epoch: 0,
        }
    }

    #[test]
    fn persists_and_reloads_the_highest_value() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = CounterStore::open(&path, identity(0)).expect("create");
        assert_eq!(store.last(), 0);
        for counter in 1..=5 {
            store.persist(counter).expect("persist");
        }
        drop(store);
        let store = CounterStore::open(&path, identity(0)).expect("reopen");
        assert_eq!(store.last(), 5);
    }

    #[test]
    fn refuses_going_backwards() {
        let directory = tempfile::tempdir().expect("temp dir");
        let mut store =
            CounterStore::open(&directory.path().join("counter"), identity(0)).expect("create");
        store.persist(3).expect("forward");
        assert!(matches!(
            store.persist(3),
            Err(StoreError::Backwards { last: 3, asked: 3 })
        ));
        assert_eq!(store.last(), 3);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_value() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = CounterStore::open(&path, identity(0)).expect("create");
        store.persist(1).expect("persist");
        store.persist(2).expect("persist");
        drop(store);
        // Damage slot 0 (value 2), as a torn write of 2 would.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&[0xAA; 4], 4).expect("damage");
        drop(file);
        let store = CounterStore::open(&path, identity(0)).expect("reopen");
        assert_eq!(store.last(), 1);
    }

    #[test]
    fn refuses_another_replicas_file_and_wrong_sizes() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("counter");
        let mut store = CounterStore::open(&path, identity(0)).expect("create");
        store.persist(1).expect("persist");
        drop(store);
        assert!(matches!(
            CounterStore::open(&path, identity(1)),
            Err(StoreError::Corrupt { replica: 1, .. })
        ));
        std::fs::write(&path, [0u8; 7]).expect("truncate");
        assert!(matches!(
            CounterStore::open(&path, identity(0)),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
