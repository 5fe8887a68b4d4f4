//! What a replica restarts from when its write-ahead log is damaged: paper 001 §IV-C's
//! fallbacks — an older checkpoint, or a full state transfer when nothing local is valid —
//! chosen by the replica itself instead of stopping it.
//!
//! **Why this is safe.** A replica must never send a message that contradicts one it sent. A
//! damaged log cannot rebuild everything the replica said (the part after the damage is lost,
//! and with it the USIG counter values it used), so whatever is kept, the salvaged log ends with
//! a [`Record::StartEpoch`](crate::wal::Record::StartEpoch): the USIG moves to an epoch above
//! every one this replica spoke in, and the group takes the replica's new stream up only through
//! an ordered INSTALL (docs/PROTOCOL.md §8) — exactly as for a replica that lost its log. The
//! record is in the file before the file takes the log's place, so a crash at any moment of a
//! salvage leaves either the damaged log (salvaged again at the next start) or the salvaged one
//! (which replays into the new epoch); never a log that resumes the old counter.
//!
//! **What is kept only decides how much is fetched.** Any prefix of a log that ends at a commit
//! is a state the replica really went through, and replay re-verifies every message and
//! certificate in it; so is the previous log a snapshot replaced. The kept state is then
//! compared with `f + 1` CHECKPOINTs at the next stable checkpoint, and the partitions that
//! differ are fetched (docs/STATE.md §2).
//!
//! The damaged file is never destroyed: it stays beside the log, as `<log>.damaged-<ms>`, for
//! the operator to look at (and delete).

use crate::wal::{
    self, frame_record, io_error, previous_path, suffixed, Record, RecordRef, WalError, WalOwner,
};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Which part of a log cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The records from this index on (0 is the first record after the snapshot).
    RecordsFrom(u64),
    /// The snapshot at the head of the log (and so every record, which continues it).
    Snapshot,
    /// Everything local.
    Everything,
}

/// What a salvaged log holds before its `StartEpoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// The damaged log's snapshot (its generation, if it has one) and its first `records`
    /// records, up to its last commit before the damage.
    Prefix {
        /// The snapshot's generation, if the log has one.
        snapshot: Option<u64>,
        /// Records kept.
        records: u64,
    },
    /// The previous log (see [`wal::Wal::keep_previous`]): its snapshot of that generation and
    /// its first `records` records.
    Previous {
        /// Its snapshot's generation.
        generation: u64,
        /// Records kept.
        records: u64,
    },
    /// Nothing: the replica starts empty and fetches the whole state.
    Nothing,
}

/// A finished salvage.
#[derive(Clone, Debug)]
pub struct Salvaged {
    /// What the new log starts from.
    pub kept: Kept,
    /// Where the damaged log now is.
    pub damaged_copy: PathBuf,
    /// The lower bound the new USIG epoch is chosen with.
    pub epoch_at_least: u64,
}

/// The usable part of a log: its header's fields, and the bytes after the header to copy.
struct Usable {
    path: PathBuf,
    generation: u64,
    /// The snapshot's length (0: none).
    snapshot_len: u64,
    /// Bytes up to here are kept: the snapshot and whole commits.
    end: u64,
    records: u64,
    /// The core time of the last input kept (the snapshot's clock if none), so the core's clock
    /// does not go back at the `StartEpoch`.
    last_ms: u64,
}

impl Usable {
    fn is_empty(&self) -> bool {
        self.snapshot_len == 0 && self.records == 0
    }
}

/// Replaces the damaged log at `path` of `owner` with one that holds the most that can be used
/// and then a `StartEpoch` of at least `wall_ms` (the in-process USIGs choose epochs from the
/// wall clock, docs/STATE.md §5). Refuses — never touching the file — a log that is not this
/// replica's or cannot be read at all: that is a configuration or disk problem, not damage.
pub fn salvage(
    path: &Path,
    owner: WalOwner,
    damage: Damage,
    wall_ms: u64,
) -> Result<Salvaged, WalError> {
    let current = match damage {
        Damage::RecordsFrom(records) => usable_part(path, owner, records)?,
        Damage::Snapshot | Damage::Everything => {
            // Still read the header: a log of another replica or cluster is never salvaged.
            wal::check_owner(path, owner)?;
            None
        }
    };
    let previous = previous_path(path);
    let (usable, kept) = match current {
        Some(usable) => {
            let kept = Kept::Prefix {
                snapshot: (usable.snapshot_len > 0).then_some(usable.generation),
                records: usable.records,
            };
            (Some(usable), kept)
        }
        None if damage != Damage::Everything && previous.exists() => {
            match usable_part(&previous, owner, u64::MAX) {
                Ok(Some(usable)) if !usable.is_empty() => {
                    let kept = Kept::Previous {
                        generation: usable.generation,
                        records: usable.records,
                    };
                    (Some(usable), kept)
                }
                // A previous log that is empty, damaged at its head or unreadable is no
                // fallback; the replica starts from nothing.
                _ => (None, Kept::Nothing),
            }
        }
        None => (None, Kept::Nothing),
    };
    // Above every epoch an earlier salvage chose (each is in its damaged copy's name), even if
    // the clock was set back since: a salvage may keep a log from before that one (`.prev`),
    // whose replay reaches only an older epoch.
    let epoch_at_least = damaged_copies(path)
        .iter()
        .filter_map(|copy| salvage_time(path, copy))
        .map(|earlier| earlier.saturating_add(1))
        .fold(wall_ms, u64::max);
    let damaged_copy = write_salvaged(path, owner, usable.as_ref(), wall_ms, epoch_at_least)?;
    Ok(Salvaged {
        kept,
        damaged_copy,
        epoch_at_least,
    })
}

/// The damaged copies earlier salvages left beside the log at `path`.
pub fn damaged_copies(path: &Path) -> Vec<PathBuf> {
    let Some(directory) = path.parent() else {
        return Vec::new();
    };
    let directory = if directory.as_os_str().is_empty() {
        Path::new(".")
    } else {
        directory
    };
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Vec::new();
    };
    let mut copies: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|candidate| salvage_time(path, candidate).is_some())
        .collect();
    copies.sort();
    copies
}

/// The epoch bound of the salvage that made `copy` (`<log>.damaged-<ms>` or
/// `<log>.damaged-<ms>-<k>`), if it is one of the log at `path`.
fn salvage_time(path: &Path, copy: &Path) -> Option<u64> {
    let prefix = format!("{}.damaged-", path.file_name()?.to_string_lossy());
    let name = copy.file_name()?.to_string_lossy().into_owned();
    let rest = name.strip_prefix(&prefix)?;
    rest.split('-').next()?.parse().ok()
}

/// The part of the log at `path` that can be used, reading at most `records_max` records:
/// `None` if its snapshot is damaged; an error if it is not `owner`'s or cannot be read.
fn usable_part(path: &Path, owner: WalOwner, records_max: u64) -> Result<Option<Usable>, WalError> {
    let recovery = match wal::open(path, owner) {
        Ok(recovery) => recovery,
        Err(WalError::Corrupt { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut reader = recovery.log;
    let start = reader.offset();
    let snapshot_ms = recovery
        .snapshot
        .as_ref()
        .map_or(0, |snapshot| snapshot.clock_ms);
    let mut usable = Usable {
        path: path.to_path_buf(),
        generation: reader.generation(),
        snapshot_len: match recovery.snapshot {
            Some(_) => start - (wal::HEADER_LEN + wal::SNAPSHOT_DIGEST_LEN) as u64,
            None => 0,
        },
        end: start,
        records: 0,
        last_ms: snapshot_ms,
    };
    let mut last_ms = snapshot_ms;
    while reader.records() < records_max {
        let record = match reader.next_record() {
            Ok(Some(record)) => record,
            Ok(None) | Err(WalError::Corrupt { .. }) => break,
            Err(error) => return Err(error),
        };
        match record {
            // A commit ends here: everything up to it is a state the replica went through.
            Record::Mark(_) => {
                usable.end = reader.offset();
                usable.records = reader.records();
                usable.last_ms = last_ms;
            }
            // A transfer whose snapshot was never written: nothing from here on left the
            // replica (replay would cut here too).
            Record::Installed { .. } => break,
            Record::Start { now_ms, .. }
            | Record::Request { now_ms, .. }
            | Record::Message { now_ms, .. }
            | Record::Timer { now_ms, .. }
            | Record::StartEpoch { now_ms, .. } => last_ms = now_ms,
        }
    }
    Ok(Some(usable))
}

/// Writes the salvaged log beside `path` — header, the usable bytes, a `Start` if nothing
/// starts the core, and the `StartEpoch` — syncs it, keeps the damaged log under a second
/// name and renames the new one into place. Returns the damaged log's new name.
fn write_salvaged(
    path: &Path,
    owner: WalOwner,
    usable: Option<&Usable>,
    wall_ms: u64,
    at_least: u64,
) -> Result<PathBuf, WalError> {
    let temporary = wal::temporary_path(path);
    let (generation, snapshot_len) = usable
        .filter(|usable| usable.snapshot_len > 0)
        .map_or((0, 0), |usable| (usable.generation, usable.snapshot_len));
    let (mut file, header_len) = wal::write_header(&temporary, owner, generation, snapshot_len)?;
    let mut now_ms = 0;
    let mut started = false;
    if let Some(usable) = usable {
        let mut source = File::open(&usable.path).map_err(io_error(&usable.path, "open"))?;
        source
            .seek(SeekFrom::Start(header_len))
            .map_err(io_error(&usable.path, "seek"))?;
        let length = usable.end - header_len;
        let copied = std::io::copy(&mut source.take(length), &mut file).map_err(io_error(
            &temporary,
            "copy the usable records (is the disk full?)",
        ))?;
        if copied != length {
            return Err(WalError::Io {
                path: usable.path.clone(),
                action: "copy the usable records",
                error: std::io::Error::other(format!("{copied} of {length} bytes were there")),
            });
        }
        now_ms = usable.last_ms;
        started = !usable.is_empty();
    }
    let mut tail = Vec::new();
    if !started {
        frame_record(&mut tail, &RecordRef::Start { now_ms, wall_ms });
    }
    frame_record(
        &mut tail,
        &RecordRef::StartEpoch {
            now_ms,
            wall_ms,
            at_least,
        },
    );
    file.write_all(&tail)
        .map_err(io_error(&temporary, "write (is the disk full?)"))?;
    file.sync_all().map_err(io_error(&temporary, "sync"))?;
    drop(file);
    // A second name for the damaged log before the rename takes the first: there is a log at
    // `path` at every moment.
    // Named after the epoch bound, which the next salvage reads back (`salvage_time`).
    let mut damaged_copy = suffixed(path, &format!(".damaged-{at_least}"));
    let mut attempt = 1;
    while damaged_copy.exists() {
        attempt += 1;
        damaged_copy = suffixed(path, &format!(".damaged-{at_least}-{attempt}"));
    }
    std::fs::hard_link(path, &damaged_copy)
        .map_err(io_error(&damaged_copy, "keep the damaged log"))?;
    std::fs::rename(&temporary, path).map_err(io_error(path, "rename into place"))?;
    wal::sync_directory_of(path)?;
    Ok(damaged_copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::testing::{owner, read_all, request};
    use crate::wal::{recover, Mark, Snapshot, WalReader};
    use tessera_crypto::Digest;

    fn mark(commit: u64) -> Mark {
        Mark {
            view: 0,
            view_changing: false,
            last_executed: commit,
            stable_checkpoint: 0,
            usig_counter: commit,
        }
    }

    /// Appends `commits` commits of one request each (request numbers from `first`), the
    /// request handled at core time `10 * number`.
    fn append_commits(wal: &mut wal::Wal, first: u64, commits: u64) {
        for number in first..first + commits {
            wal.append(&RecordRef::Request {
                now_ms: 10 * number,
                wall_ms: 1_700_000_000_000 + number,
                request: &request(number),
            });
            wal.commit(mark(number)).unwrap();
        }
    }

    /// A log with a `Start` and `commits` commits.
    fn write_log(path: &Path, commits: u64) -> wal::Wal {
        let mut wal = recover(path, owner()).unwrap().log.into_wal().unwrap();
        wal.keep_previous(true);
        wal.append(&RecordRef::Start {
            now_ms: 0,
            wall_ms: 1_700_000_000_000,
        });
        append_commits(&mut wal, 0, commits);
        wal
    }

    fn snapshot(generation: u64) -> Snapshot {
        Snapshot {
            generation,
            clock_ms: 1_000 * generation,
            timers: vec![(2, 5)],
            core: vec![generation as u8; 4000],
        }
    }

    fn records(mut reader: WalReader) -> Vec<Record> {
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        records
    }

    fn request_numbers(records: &[Record]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|record| match record {
                Record::Request { request, .. } => Some(request.request_number),
                _ => None,
            })
            .collect()
    }

    /// Where record `index` (after the snapshot) starts.
    fn record_offset(path: &Path, index: u64) -> u64 {
        let mut reader = recover(path, owner()).unwrap().log;
        while reader.records() < index {
            reader.next_record().unwrap().unwrap();
        }
        reader.offset()
    }

    fn flip(path: &Path, offset: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    }

    fn assert_ends_with_new_epoch(records: &[Record], wall_ms: u64, now_ms: u64) {
        match records.last() {
            Some(Record::StartEpoch {
                now_ms: at,
                wall_ms: wall,
                at_least,
            }) => {
                assert_eq!((*at, *wall, *at_least), (now_ms, wall_ms, wall_ms));
            }
            other => panic!("the salvaged log must end with a StartEpoch, not {other:?}"),
        }
    }

    #[test]
    fn a_log_damaged_in_the_middle_keeps_every_commit_before_the_damage() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        drop(write_log(&path, 6));
        let damaged_bytes = {
            // Record 7 is the fourth commit's request (Start, then request and mark per commit).
            flip(&path, record_offset(&path, 7) + 20);
            std::fs::read(&path).unwrap()
        };
        assert!(matches!(read_all(&path), Err(WalError::Corrupt { .. })));

        let salvaged = salvage(&path, owner(), Damage::RecordsFrom(7), 1_800_000_000_000).unwrap();
        assert_eq!(
            salvaged.kept,
            Kept::Prefix {
                snapshot: None,
                records: 7
            }
        );
        assert_eq!(
            std::fs::read(&salvaged.damaged_copy).unwrap(),
            damaged_bytes
        );
        let recovery = recover(&path, owner()).unwrap();
        assert!(recovery.snapshot.is_none());
        let kept = records(recovery.log);
        assert!(matches!(kept[0], Record::Start { .. }));
        assert_eq!(request_numbers(&kept), vec![0, 1, 2]);
        assert_ends_with_new_epoch(&kept, 1_800_000_000_000, 20);
        // The salvaged log is an ordinary log: appending continues it.
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        append_commits(&mut wal, 3, 1);
        drop(wal);
        let reread = records(recover(&path, owner()).unwrap().log);
        assert_eq!(request_numbers(&reread), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_damaged_mark_drops_the_commit_it_ends() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        drop(write_log(&path, 4));
        // The mark at index 6 (the third commit's) is damaged: records from 6 on are unusable,
        // and so is the request before it, which belongs to the same commit.
        let salvaged = salvage(&path, owner(), Damage::RecordsFrom(6), 1_800_000_000_000).unwrap();
        assert_eq!(
            salvaged.kept,
            Kept::Prefix {
                snapshot: None,
                records: 5
            }
        );
        let kept = records(recover(&path, owner()).unwrap().log);
        assert_eq!(request_numbers(&kept), vec![0, 1]);
        assert_ends_with_new_epoch(&kept, 1_800_000_000_000, 10);
    }

    #[test]
    fn a_damaged_snapshot_falls_back_to_the_previous_log() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        let mut wal = write_log(&path, 3);
        wal.rotate(&snapshot(1)).unwrap();
        append_commits(&mut wal, 3, 2);
        wal.rotate(&snapshot(2)).unwrap();
        append_commits(&mut wal, 5, 1);
        drop(wal);
        // The previous log is the one the second snapshot replaced: snapshot 1 and commits 3, 4.
        let previous = recover(&previous_path(&path), owner()).unwrap();
        assert_eq!(previous.snapshot.as_ref().unwrap().generation, 1);
        assert_eq!(request_numbers(&records(previous.log)), vec![3, 4]);

        flip(
            &path,
            (wal::HEADER_LEN + wal::SNAPSHOT_DIGEST_LEN + 100) as u64,
        );
        assert!(recover(&path, owner()).is_err());
        let salvaged = salvage(&path, owner(), Damage::Snapshot, 1_800_000_000_000).unwrap();
        assert_eq!(
            salvaged.kept,
            Kept::Previous {
                generation: 1,
                records: 4
            }
        );
        let recovery = recover(&path, owner()).unwrap();
        assert_eq!(recovery.snapshot.unwrap().core, snapshot(1).core);
        assert_eq!(recovery.log.generation(), 1);
        let kept = records(recovery.log);
        assert_eq!(request_numbers(&kept), vec![3, 4]);
        assert_ends_with_new_epoch(&kept, 1_800_000_000_000, 40);
    }

    #[test]
    fn with_nothing_valid_the_log_starts_over_in_a_new_epoch() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        let mut wal = write_log(&path, 2);
        wal.keep_previous(false);
        wal.rotate(&snapshot(1)).unwrap();
        drop(wal);
        assert!(!previous_path(&path).exists());
        flip(
            &path,
            (wal::HEADER_LEN + wal::SNAPSHOT_DIGEST_LEN + 100) as u64,
        );
        // Both salvages at the same wall clock (or the clock set back): the second epoch is still
        // above the first, read back from the first's damaged copy.
        for (damage, at_least) in [
            (Damage::Snapshot, 1_800_000_000_000),
            (Damage::Everything, 1_800_000_000_001),
        ] {
            let salvaged = salvage(&path, owner(), damage, 1_800_000_000_000).unwrap();
            assert_eq!(salvaged.kept, Kept::Nothing);
            assert_eq!(salvaged.epoch_at_least, at_least);
            let recovery = recover(&path, owner()).unwrap();
            assert!(recovery.snapshot.is_none());
            assert_eq!(recovery.log.generation(), 0);
            let kept = records(recovery.log);
            assert_eq!(kept.len(), 2, "{kept:?}");
            assert!(matches!(
                kept[0],
                Record::Start {
                    now_ms: 0,
                    wall_ms: 1_800_000_000_000
                }
            ));
            match kept.last() {
                Some(Record::StartEpoch {
                    now_ms: 0,
                    wall_ms: 1_800_000_000_000,
                    at_least: logged,
                }) => assert_eq!(*logged, at_least),
                other => panic!("the salvaged log must end with a StartEpoch, not {other:?}"),
            }
        }
        assert_eq!(damaged_copies(&path).len(), 2);
        // Each salvage kept what it replaced, under its own name.
        let copies = std::fs::read_dir(directory.path())
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert_eq!(copies, 2);
    }

    #[test]
    fn another_owners_log_is_never_salvaged() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        drop(write_log(&path, 2));
        let before = std::fs::read(&path).unwrap();
        let other = WalOwner {
            fingerprint: Digest([9; 32]),
            ..owner()
        };
        for damage in [Damage::RecordsFrom(1), Damage::Snapshot, Damage::Everything] {
            let error = salvage(&path, other, damage, 1_800_000_000_000).unwrap_err();
            assert!(error.to_string().contains("another cluster"), "{error}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_snapshot_after_a_transfer_drops_the_previous_log_first() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("replica-1.wal");
        let mut wal = write_log(&path, 1);
        wal.rotate(&snapshot(1)).unwrap();
        wal.rotate(&snapshot(2)).unwrap();
        assert!(previous_path(&path).exists());
        let prepared = wal::prepare_log(&path, owner(), &snapshot(3), true).unwrap();
        assert!(!previous_path(&path).exists());
        let cut = wal.committed_bytes();
        wal.finish_rotation(prepared, cut).unwrap();
        // The log it replaced is the previous one again.
        let previous = recover(&previous_path(&path), owner()).unwrap();
        assert_eq!(previous.snapshot.unwrap().generation, 2);
    }
}
