//! The replica's write-ahead log: every input the core handled, made durable before any output
//! the core produced from it leaves the process.
//!
//! The protocol core is deterministic: the same inputs (client requests, peer messages, timer
//! firings, each with the time it was handled) produce the same state, the same USIG certificates
//! and the same messages. So a replica that logs its inputs and, on restart, feeds them to a fresh
//! core rebuilds exactly the replica it was — including every message it sent, which is what
//! makes a restart safe: it can never send a message that contradicts one sent before the crash,
//! because the restarted core *is* the old one, counter for counter.
//!
//! The one rule the driver must keep ([`crate::driver`]): outputs are carried out only after
//! [`Wal::write_and_sync`] has made the inputs that produced them durable (group commit: one
//! `fdatasync` for every turn queued by then, however many inputs they held). A crash before the
//! sync
//! loses inputs whose outputs nobody saw — indistinguishable from network loss, which the
//! protocol already recovers from — and any prefix of the log is a state the replica really
//! went through.
//!
//! After each commit the log records a [`Mark`] (view, last executed, stable checkpoint, USIG
//! counter). Replay checks every mark, so a log that does not rebuild the replica it was written
//! by (an executable that is not deterministic, a bug, corruption a checksum missed) stops the
//! replica with an error instead of letting it speak from a different history.
//!
//! # Format
//!
//! A header (magic, format version, replica id, cluster fingerprint), then records, each
//! `[length: u32 LE][check: 8 bytes][payload]`, where `check` is the first 8 bytes of
//! BLAKE3(length ‖ payload) and the payload is the canonical encoding of a [`Record`]. A crash
//! can leave the last write torn: a record cut short, or zero-filled, at the end of the file is
//! discarded (its commit never returned, so nothing it led to was sent). A bad record anywhere
//! else is corruption ([`WalError::Corrupt`]): the log cannot be replayed as it is, and
//! [`crate::salvage`] decides what of it the replica keeps. Bytes that pass their check but do
//! not decode are not damage ([`WalError::Unreadable`]) and are never salvaged.
//!
//! # Why a plain file and not redb
//!
//! The log is append-only and read once, front to back, at start: a B-tree store adds a second
//! write path (pages and a commit record) for no lookup we need. A file with checksummed records
//! and `fdatasync` is the smallest thing that is durable and verifiable.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tessera_crypto::Digest;
use tessera_types::wire::ReplicaStatus;
use tessera_types::{ReplicaId, ReplicaMessage, Request};
use thiserror::Error;

/// The file's first bytes.
const MAGIC: &[u8; 12] = b"TESSERA-WAL\0";
/// Bumped whenever the record encoding changes. Version 3: every input record carries the
/// wall clock (`wall_ms`) the core was given with it, which the agreed time of batches depends
/// on, and the header a generation and the length of the snapshot that may head the log.
/// Version 5: every UI in a logged message carries its USIG epoch.
const FORMAT_VERSION: u32 = 5;
/// Magic, version, replica id, fingerprint, generation, snapshot length.
pub(crate) const HEADER_LEN: usize = 12 + 4 + 4 + 32 + 8 + 8;
/// The digest in front of a snapshot.
pub(crate) const SNAPSHOT_DIGEST_LEN: usize = 32;
/// Length and check of a record.
const RECORD_PREFIX_LEN: usize = 4 + 8;
/// The largest record: a replica message of the largest frame plus the record's own fields.
pub const RECORD_BYTES_MAX: usize = tessera_types::limits::MAX_FRAME_BYTES + 1024;

/// One input the core handled, with the time (core milliseconds) it was handled at and the
/// host's wall clock (ms since the Unix epoch) the core was given with it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Record {
    /// The core was started (the first record of a log).
    Start {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
    },
    /// A client request.
    Request {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// The request.
        request: Request,
    },
    /// A message from a peer.
    Message {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// Sender.
        from: ReplicaId,
        /// The message.
        message: ReplicaMessage,
    },
    /// A timer fired.
    Timer {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// Which timer ([`crate::driver`] maps the core's timers to these codes).
        timer: u8,
    },
    /// What the core reported after the inputs before it: replay must reach the same.
    Mark(Mark),
    /// The core installed a state fetched by state transfer, at this sequence number. The
    /// partition chunks it received are not logged (so a transfer needs the state's size on
    /// disk once, not twice), so replay cannot rebuild this state: the driver holds back every
    /// output from this turn on until a snapshot taken after it replaces the log. Found while
    /// reading, this record means that never happened: nothing from it on was ever sent, and
    /// the log ends before it (see `WalReader::cut_before_last`).
    Installed {
        /// The checkpoint installed.
        seq: u64,
    },
    /// The core moved its USIG to a new epoch, at least `at_least` (a replica that lost its log
    /// and came back empty, docs/PROTOCOL.md §8): replay calls the same.
    StartEpoch {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// The lower bound the new epoch was chosen with.
        at_least: u64,
    },
}

/// The same layout as [`Record`], borrowing the payload, so logging a request or message does
/// not clone it. A unit test checks both encode identically.
#[derive(Serialize, Debug)]
pub enum RecordRef<'a> {
    /// See [`Record::Start`].
    Start {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
    },
    /// See [`Record::Request`].
    Request {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// The request.
        request: &'a Request,
    },
    /// See [`Record::Message`].
    Message {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// Sender.
        from: ReplicaId,
        /// The message.
        message: &'a ReplicaMessage,
    },
    /// See [`Record::Timer`].
    Timer {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// Which timer.
        timer: u8,
    },
    /// See [`Record::Mark`].
    Mark(Mark),
    /// See [`Record::Installed`].
    Installed {
        /// The checkpoint installed.
        seq: u64,
    },
    /// See [`Record::StartEpoch`].
    StartEpoch {
        /// Time.
        now_ms: u64,
        /// Wall clock.
        wall_ms: u64,
        /// The lower bound the new epoch was chosen with.
        at_least: u64,
    },
}

/// What replay must reproduce at each commit point.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Current view.
    pub view: u64,
    /// True while a view change is in progress.
    pub view_changing: bool,
    /// Last executed sequence number.
    pub last_executed: u64,
    /// Latest stable checkpoint.
    pub stable_checkpoint: u64,
    /// Highest own USIG counter used: replay must have certified exactly as many messages.
    pub usig_counter: u64,
}

impl Mark {
    /// The mark of a replica's status.
    pub fn of(status: &ReplicaStatus) -> Mark {
        Mark {
            view: status.view.0,
            view_changing: status.view_changing,
            last_executed: status.last_executed.0,
            stable_checkpoint: status.stable_checkpoint.0,
            usig_counter: status.usig_counter,
        }
    }
}

/// Who may use a log: a log is only ever replayed by the replica of the cluster that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalOwner {
    /// The replica.
    pub replica: ReplicaId,
    /// A digest of the cluster configuration and the replica's USIG identity.
    pub fingerprint: Digest,
}

/// Why the log cannot be used.
#[derive(Debug, Error)]
pub enum WalError {
    /// An IO error on the log file.
    #[error("write-ahead log {path}: {action}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error: in the message, not a separate cause, so an error chain prints it
        /// once.
        error: std::io::Error,
    },
    /// The file is not a log, or not this replica's.
    #[error("write-ahead log {path} {problem}; {fix}")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },
    /// A record in the middle of the log is damaged.
    #[error(
        "write-ahead log {path} is corrupt at byte {offset}: {problem}; the replica must not \
         restart from a log it cannot read in full (it could contradict messages it sent); \
         a replica salvages such a log by default (it keeps what is valid and rejoins in a new \
         USIG epoch); with `--no-salvage`, restore the file from a backup, or move it away and \
         start the replica with `--new-epoch`"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// Bytes that passed their checksum or digest do not make sense to this executable: not
    /// damage (the disk gave back what was written) but a bug, or another executable's format.
    /// Never salvaged ([`crate::salvage`]): salvaging would throw away acknowledged history on
    /// every replica that runs this executable.
    #[error(
        "write-ahead log {path}: the bytes at {offset} passed their check but {problem}; they \
         were written as they are, so this executable cannot read what another wrote (or a \
         bug); run the executable that wrote the log"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Where the bytes start.
        offset: u64,
        /// What is wrong with them.
        problem: String,
    },
    /// Replay did not rebuild the replica that wrote the log.
    #[error(
        "replaying write-ahead log {path}: after record {record} the replica reports {actual:?} \
         but the log recorded {expected:?}; the log and this executable or cluster do not match"
    )]
    Diverged {
        /// The file.
        path: PathBuf,
        /// Index of the mark that failed.
        record: u64,
        /// What the log recorded.
        expected: Mark,
        /// What replay produced.
        actual: Mark,
    },
}

/// An open log, ready to append to.
pub struct Wal {
    file: File,
    path: PathBuf,
    owner: WalOwner,
    /// Which snapshot the log continues (0: none, the log starts at the beginning).
    generation: u64,
    /// Framed records not yet written (the tests' synchronous `append`/`commit`; the driver
    /// frames records itself and hands them to `write_and_sync`).
    #[cfg(test)]
    buffer: Vec<u8>,
    /// Bytes in the file (committed).
    committed_bytes: u64,
    /// See [`Wal::keep_previous`].
    keep_previous: bool,
}

/// A log being read back at start; [`WalReader::into_wal`] turns it into the log to append to.
pub struct WalReader {
    reader: BufReader<File>,
    path: PathBuf,
    owner: WalOwner,
    generation: u64,
    file_len: u64,
    /// Where the next record starts.
    offset: u64,
    /// Records read so far.
    records: u64,
    /// Where a torn tail starts, once found.
    torn_at: Option<u64>,
    /// Where the last record read starts.
    last_start: u64,
}

/// What a replica restarts from: the snapshot its log starts with, if any, and the log's
/// records after it.
pub struct Recovery {
    /// The snapshot (see [`Snapshot`]).
    pub snapshot: Option<Snapshot>,
    /// The log, positioned at its first record.
    pub log: WalReader,
}

/// A snapshot of a replica, as the driver keeps it: at the start of a log, whose records are the
/// inputs after it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Snapshot {
    /// Counts snapshots; the log that starts with this one carries the same number.
    pub generation: u64,
    /// The core's clock when it was taken.
    pub clock_ms: u64,
    /// The driver's armed timers (code, deadline), which the core does not hold.
    pub timers: Vec<(u8, u64)>,
    /// [`tessera_core::Replica::snapshot`].
    #[serde(with = "serde_bytes")]
    pub core: Vec<u8>,
}

/// Where a log's replacement is written before it is renamed into place.
pub fn temporary_path(path: &Path) -> PathBuf {
    suffixed(path, ".new")
}

/// Where the log a snapshot replaced is kept (see [`Wal::keep_previous`]): the older checkpoint
/// a restart falls back to when the current log's snapshot is damaged
/// ([`crate::salvage`]).
pub fn previous_path(path: &Path) -> PathBuf {
    suffixed(path, ".prev")
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub(crate) fn io_error(
    path: &Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io {
        path,
        action,
        error: source,
    }
}

pub(crate) fn sync_directory_of(path: &Path) -> Result<(), WalError> {
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error(path, "sync its directory"))
}

/// Opens what replica `owner` restarts from: the log at `path` (created empty if missing) and
/// the snapshot it starts with. A replacement log left half-written by a crash
/// ([`Wal::finish_rotation`] had not renamed it yet) is removed: the log in place holds
/// everything.
pub fn recover(path: &Path, owner: WalOwner) -> Result<Recovery, WalError> {
    let leftover = temporary_path(path);
    if leftover.exists() {
        std::fs::remove_file(&leftover).map_err(io_error(&leftover, "remove"))?;
    }
    if !path.exists() {
        create(path, owner)?;
    }
    open(path, owner)
}

/// A replacement log being written: header and snapshot, to which [`Wal::finish_rotation`]
/// appends the records logged meanwhile before renaming it into place.
pub struct PreparedLog {
    file: File,
    path: PathBuf,
    bytes: u64,
    generation: u64,
}

/// Writes the start of a replacement log for the log at `log_path`: header and `snapshot`,
/// synced. Runs on any thread. With `drop_previous`, the previous log kept beside it goes
/// first: a snapshot after a state transfer must fit on a disk that holds the old state once,
/// not twice (issue 4's bound), and the log it replaces becomes the previous one anyway.
pub fn prepare_log(
    log_path: &Path,
    owner: WalOwner,
    snapshot: &Snapshot,
    drop_previous: bool,
) -> Result<PreparedLog, WalError> {
    if drop_previous {
        let previous = previous_path(log_path);
        match std::fs::remove_file(&previous) {
            Err(error) if error.kind() != ErrorKind::NotFound => {
                return Err(io_error(&previous, "remove")(error))
            }
            _ => {}
        }
    }
    let path = temporary_path(log_path);
    // The payload is `encode(snapshot)`, written in two parts so the core's bytes (nearly all
    // of it, up to the whole state) are neither copied into a second buffer nor read twice:
    // the encoding of the fields before `core` with `core`'s length, then `core` itself. Its
    // digest goes before it, so it is written last, into the room left for it.
    let head = snapshot_head(snapshot);
    let payload_len = (head.len() + snapshot.core.len()) as u64;
    let (mut file, header_bytes) = write_header(&path, owner, snapshot.generation, payload_len)?;
    let mut hasher = blake3::Hasher::new();
    let written = (|| {
        file.write_all(&[0u8; SNAPSHOT_DIGEST_LEN])?;
        hasher.update(&head);
        file.write_all(&head)?;
        for part in snapshot.core.chunks(SNAPSHOT_WRITE_BYTES) {
            hasher.update(part);
            file.write_all(part)?;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, hasher.finalize().as_bytes(), header_bytes)
    })();
    written.map_err(io_error(&path, "write the snapshot (is the disk full?)"))?;
    // Synced here, on the snapshot's own thread: the rotation then syncs only the few records
    // copied behind it, and the writer does not hold every output back while a large state
    // reaches the disk.
    file.sync_data()
        .map_err(io_error(&path, "sync the snapshot"))?;
    Ok(PreparedLog {
        file,
        path,
        bytes: header_bytes + SNAPSHOT_DIGEST_LEN as u64 + payload_len,
        generation: snapshot.generation,
    })
}

/// Bytes of the snapshot hashed and written at a time.
const SNAPSHOT_WRITE_BYTES: usize = 8 << 20;

/// `encode(snapshot)` up to the start of `core`'s bytes: the fields before it and its length
/// (postcard encodes a struct as its fields in order, and bytes as a varint length and the
/// bytes; a unit test checks the two parts against the whole).
fn snapshot_head(snapshot: &Snapshot) -> Vec<u8> {
    let mut head =
        tessera_types::encode(&(snapshot.generation, snapshot.clock_ms, &snapshot.timers));
    let mut length = snapshot.core.len() as u64;
    loop {
        let byte = (length & 0x7f) as u8;
        length >>= 7;
        if length == 0 {
            head.push(byte);
            break;
        }
        head.push(byte | 0x80);
    }
    head
}

/// Refuses the log at `path` unless its header is `owner`'s and of this format; reads only
/// the header (for a salvage, which must never touch another owner's log).
pub(crate) fn check_owner(path: &Path, owner: WalOwner) -> Result<(), WalError> {
    let mut file = File::open(path).map_err(io_error(path, "open"))?;
    let file_len = file.metadata().map_err(io_error(path, "stat"))?.len();
    read_header(&mut file, path, owner, file_len).map(|_| ())
}

/// Reads and checks a log's header from the start of `file`; returns the generation and the
/// snapshot's length it records.
fn read_header(
    file: &mut File,
    path: &Path,
    owner: WalOwner,
    file_len: u64,
) -> Result<(u64, u64), WalError> {
    let mut header = [0u8; HEADER_LEN];
    let foreign = |problem: String, fix: &'static str| WalError::Foreign {
        path: path.to_path_buf(),
        problem,
        fix,
    };
    if file.read_exact(&mut header).is_err() {
        return Err(foreign(
            format!("is {file_len} bytes, shorter than a log header"),
            "it was not written by Tessera: move it away",
        ));
    }
    if &header[..12] != MAGIC {
        return Err(foreign(
            "does not start with Tessera's log header".into(),
            "it is not a Tessera write-ahead log: move it away",
        ));
    }
    let version = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(foreign(
            format!("has format version {version}, this executable reads {FORMAT_VERSION}"),
            "run the executable that wrote it",
        ));
    }
    let replica = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if replica != owner.replica.0 {
        return Err(foreign(
            format!("belongs to replica {replica}, not {}", owner.replica),
            "give each replica its own log path",
        ));
    }
    if header[20..52] != owner.fingerprint.0 {
        return Err(foreign(
            "was written for another cluster configuration or USIG key".into(),
            "a log only replays under the cluster.toml and secret file that wrote it; \
             remove it only together with a fresh `tessera init` of the whole cluster",
        ));
    }
    let generation = u64::from_le_bytes(header[52..60].try_into().expect("8 bytes"));
    let snapshot_len = u64::from_le_bytes(header[60..68].try_into().expect("8 bytes"));
    Ok((generation, snapshot_len))
}

/// Opens the log at `path` for `owner` (it must exist; see [`recover`]).
pub(crate) fn open(path: &Path, owner: WalOwner) -> Result<Recovery, WalError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| WalError::Io {
            path,
            action,
            error: source,
        }
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io("open"))?;
    let file_len = file.metadata().map_err(io("stat"))?.len();
    let (generation, snapshot_len) = read_header(&mut file, path, owner, file_len)?;
    let corrupt = |problem: String| WalError::Corrupt {
        path: path.to_path_buf(),
        offset: HEADER_LEN as u64,
        problem,
    };
    let mut offset = HEADER_LEN as u64;
    let snapshot = if snapshot_len == 0 {
        None
    } else {
        let end = offset + SNAPSHOT_DIGEST_LEN as u64 + snapshot_len;
        if end > file_len {
            return Err(corrupt(format!(
                "the log is {file_len} bytes but its snapshot claims {snapshot_len}"
            )));
        }
        let mut digest = [0u8; SNAPSHOT_DIGEST_LEN];
        let mut payload = vec![0u8; snapshot_len as usize];
        file.read_exact(&mut digest)
            .and_then(|()| file.read_exact(&mut payload))
            .map_err(io("read the snapshot"))?;
        if blake3::hash(&payload).as_bytes() != &digest {
            return Err(corrupt("the snapshot does not match its digest".into()));
        }
        let unreadable = |problem: String| WalError::Unreadable {
            path: path.to_path_buf(),
            offset: HEADER_LEN as u64,
            problem,
        };
        let snapshot = tessera_types::decode::<Snapshot>(&payload, usize::MAX)
            .map_err(|error| unreadable(format!("the snapshot does not decode: {error}")))?;
        if snapshot.generation != generation {
            return Err(unreadable(format!(
                "the log is number {generation} but its snapshot number {}",
                snapshot.generation
            )));
        }
        offset = end;
        Some(snapshot)
    };
    Ok(Recovery {
        snapshot,
        log: WalReader {
            reader: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            owner,
            generation,
            file_len,
            offset,
            records: 0,
            torn_at: None,
            last_start: 0,
        },
    })
}

/// Creates an empty log at `path`, atomically (a crash never leaves a log without its header).
fn create(path: &Path, owner: WalOwner) -> Result<(), WalError> {
    if let Some(directory) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(directory).map_err(io_error(path, "create its directory"))?;
    }
    let temporary = temporary_path(path);
    let (file, _) = write_header(&temporary, owner, 0, 0)?;
    file.sync_all().map_err(io_error(path, "sync the header"))?;
    std::fs::rename(&temporary, path).map_err(io_error(path, "rename into place"))?;
    sync_directory_of(path)
}

/// Creates `path` with a log header; returns the file and the header's length.
pub(crate) fn write_header(
    path: &Path,
    owner: WalOwner,
    generation: u64,
    snapshot_len: u64,
) -> Result<(File, u64), WalError> {
    let mut file = File::create(path).map_err(io_error(path, "create"))?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&owner.replica.0.to_le_bytes());
    header.extend_from_slice(&owner.fingerprint.0);
    header.extend_from_slice(&generation.to_le_bytes());
    header.extend_from_slice(&snapshot_len.to_le_bytes());
    file.write_all(&header)
        .map_err(io_error(path, "write the header"))?;
    Ok((file, HEADER_LEN as u64))
}

impl WalReader {
    /// The next record, or `None` at the end of the log (a torn last write counts as the end).
    pub fn next_record(&mut self) -> Result<Option<Record>, WalError> {
        if self.torn_at.is_some() || self.offset == self.file_len {
            return Ok(None);
        }
        let start = self.offset;
        let mut prefix = [0u8; RECORD_PREFIX_LEN];
        if !self.read_fully(&mut prefix)? {
            return self.torn(start);
        }
        let length = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
        let end = start + (RECORD_PREFIX_LEN + length) as u64;
        if length > RECORD_BYTES_MAX {
            return self.bad(start, format!("a record claims {length} bytes"));
        }
        if end > self.file_len {
            // A record running past the end is the torn last write — unless its length field is
            // what is damaged, in which case intact records follow it.
            if self.intact_record_after(start)? {
                return Err(WalError::Corrupt {
                    path: self.path.clone(),
                    offset: start,
                    problem: format!(
                        "a record claims {length} bytes, past the end of the file, yet intact \
                         records follow it"
                    ),
                });
            }
            return self.torn(start);
        }
        let mut payload = vec![0u8; length];
        if !self.read_fully(&mut payload)? {
            return self.torn(start);
        }
        if prefix[4..] != check(&prefix[..4], &payload) {
            // A full-length record that fails its check at the very end is a torn write.
            if end == self.file_len {
                return self.torn(start);
            }
            return self.bad(start, "checksum mismatch".into());
        }
        // The check passed, so these are the bytes that were written: a record that does not
        // decode is not a torn write.
        let record =
            tessera_types::decode::<Record>(&payload, RECORD_BYTES_MAX).map_err(|error| {
                WalError::Unreadable {
                    path: self.path.clone(),
                    offset: start,
                    problem: format!("the record does not decode: {error}"),
                }
            })?;
        self.offset = end;
        self.records += 1;
        self.last_start = start;
        Ok(Some(record))
    }

    /// Ends the log before the record just read: it and everything after it are cut off when
    /// the log is opened for appending, like a torn tail. For a [`Record::Installed`] whose
    /// snapshot never replaced the log: nothing from it on left the replica.
    pub fn cut_before_last(&mut self) {
        self.torn_at = Some(self.last_start);
    }

    /// The snapshot this log continues (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Where the next record starts (the end of the records read so far).
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Where the torn tail began, if the log had one.
    pub fn torn_at(&self) -> Option<u64> {
        self.torn_at
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finishes reading: cuts off a torn tail and returns the log positioned for appending.
    /// Refuses if records remain unread.
    pub fn into_wal(mut self) -> Result<Wal, WalError> {
        while self.next_record()?.is_some() {}
        let end = self.torn_at.unwrap_or(self.offset);
        let path = self.path.clone();
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| WalError::Io {
                path,
                action,
                error: source,
            }
        };
        let mut file = self.reader.into_inner();
        if end < self.file_len {
            file.set_len(end)
                .map_err(io("cut off the torn last write"))?;
            file.sync_all()
                .map_err(io("sync after cutting the torn tail"))?;
        }
        file.seek(SeekFrom::Start(end)).map_err(io("seek"))?;
        Ok(Wal {
            file,
            path: self.path,
            owner: self.owner,
            generation: self.generation,
            #[cfg(test)]
            buffer: Vec::new(),
            committed_bytes: end,
            keep_previous: false,
        })
    }

    /// Reads exactly `buffer.len()` bytes; false if the file ends first.
    fn read_fully(&mut self, buffer: &mut [u8]) -> Result<bool, WalError> {
        match self.reader.read_exact(buffer) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == ErrorKind::UnexpectedEof => Ok(false),
            Err(source) => Err(WalError::Io {
                path: self.path.clone(),
                action: "read",
                error: source,
            }),
        }
    }

    /// True if a well-framed record with a matching check starts anywhere after `start`: then
    /// the bytes at `start` are damaged, not the unfinished end of the last write. Runs only
    /// when a record looks torn, over at most the rest of the file.
    fn intact_record_after(&mut self, start: u64) -> Result<bool, WalError> {
        let mut file = self.reader.get_ref();
        file.seek(SeekFrom::Start(start))
            .map_err(io_error(&self.path, "read"))?;
        let mut rest = Vec::new();
        file.read_to_end(&mut rest)
            .map_err(io_error(&self.path, "read"))?;
        for offset in 1..rest.len() {
            let Some(prefix) = rest.get(offset..offset + RECORD_PREFIX_LEN) else {
                break;
            };
            let length = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
            let payload_start = offset + RECORD_PREFIX_LEN;
            let Some(payload) = rest.get(payload_start..payload_start + length) else {
                continue;
            };
            if length > 0 && prefix[4..] == check(&prefix[..4], payload) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn torn(&mut self, start: u64) -> Result<Option<Record>, WalError> {
        self.torn_at = Some(start);
        Ok(None)
    }

    /// A bad record: the torn tail of a crash if only zeros follow (a file system can extend a
    /// file with zero-filled blocks whose data never reached the disk), corruption otherwise.
    fn bad<T>(&mut self, start: u64, problem: String) -> Result<Option<T>, WalError> {
        let mut file = self.reader.get_ref();
        file.seek(SeekFrom::Start(start))
            .map_err(io_error(&self.path, "read"))?;
        let mut zeros = true;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let read = file
                .read(&mut chunk)
                .map_err(io_error(&self.path, "read"))?;
            if read == 0 {
                break;
            }
            if chunk[..read].iter().any(|byte| *byte != 0) {
                zeros = false;
                break;
            }
        }
        if zeros {
            self.torn_at = Some(start);
            return Ok(None);
        }
        Err(WalError::Corrupt {
            path: self.path.clone(),
            offset: start,
            problem,
        })
    }
}

fn check(length: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(length).update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    out
}

/// Appends one framed record to `buffer` (what [`Wal::write_and_sync`] later writes).
pub fn frame_record(buffer: &mut Vec<u8>, record: &RecordRef<'_>) {
    let payload = tessera_types::encode(record);
    assert!(
        payload.len() <= RECORD_BYTES_MAX,
        "a core input of {} bytes exceeds the largest frame",
        payload.len()
    );
    let length = (payload.len() as u32).to_le_bytes();
    buffer.extend_from_slice(&length);
    buffer.extend_from_slice(&check(&length, &payload));
    buffer.extend_from_slice(&payload);
}

impl Wal {
    /// Queues a record; it is durable after the next [`Wal::commit`].
    #[cfg(test)]
    pub fn append(&mut self, record: &RecordRef<'_>) {
        frame_record(&mut self.buffer, record);
    }

    /// True if records wait for a commit.
    #[cfg(test)]
    pub fn has_pending(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Appends `mark` and makes every queued record durable (one write, one `fdatasync`).
    #[cfg(test)]
    pub fn commit(&mut self, mark: Mark) -> Result<(), WalError> {
        self.append(&RecordRef::Mark(mark));
        let buffer = std::mem::take(&mut self.buffer);
        self.write_and_sync(&[&buffer])
    }

    /// Writes framed records (from [`frame_record`]) in order and makes them durable with one
    /// `fdatasync`.
    pub fn write_and_sync(&mut self, parts: &[&[u8]]) -> Result<(), WalError> {
        let io = |action: &'static str| {
            let path = self.path.clone();
            move |source| WalError::Io {
                path,
                action,
                error: source,
            }
        };
        for part in parts {
            self.file
                .write_all(part)
                .map_err(io("append (is the disk full?)"))?;
        }
        self.file.sync_data().map_err(io("sync"))?;
        self.committed_bytes += parts.iter().map(|part| part.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Bytes in the file, committed.
    pub fn committed_bytes(&self) -> u64 {
        self.committed_bytes
    }

    /// The snapshot this log continues (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a rotation keeps the log it replaces at [`previous_path`] (one generation: the
    /// one before is dropped). It costs the disk a second copy of the state, and buys a restart
    /// an older checkpoint when the snapshot at the head of the log is damaged.
    pub fn keep_previous(&mut self, keep: bool) {
        self.keep_previous = keep;
    }

    /// The log's path and owner, for [`prepare_log`] on another thread.
    pub fn target(&self) -> (PathBuf, WalOwner) {
        (self.path.clone(), self.owner)
    }

    /// Replaces the log with `prepared`, whose snapshot covers every record up to byte `cut` of
    /// this log: the records after `cut` (logged while the snapshot was being written) are
    /// copied behind it, the file is synced and renamed over the log. The rename is the one
    /// moment of change: a crash before it leaves the old log, which holds everything; after
    /// it, the new one, which holds everything that matters.
    pub fn finish_rotation(&mut self, mut prepared: PreparedLog, cut: u64) -> Result<(), WalError> {
        #[cfg(test)]
        assert!(self.buffer.is_empty(), "records queued during a rotation");
        assert!(
            prepared.generation > self.generation,
            "snapshots are numbered upwards"
        );
        assert!(cut <= self.committed_bytes, "the cut is inside the log");
        let mut old = File::open(&self.path).map_err(io_error(&self.path, "open"))?;
        old.seek(SeekFrom::Start(cut))
            .map_err(io_error(&self.path, "seek"))?;
        let suffix = self.committed_bytes - cut;
        let copied =
            std::io::copy(&mut Read::take(old, suffix), &mut prepared.file).map_err(io_error(
                &prepared.path,
                "copy the latest records (is the disk full?)",
            ))?;
        if copied != suffix {
            return Err(WalError::Corrupt {
                path: self.path.clone(),
                offset: cut,
                problem: format!("{copied} of the {suffix} bytes after the snapshot were there"),
            });
        }
        prepared
            .file
            .sync_all()
            .map_err(io_error(&prepared.path, "sync"))?;
        if self.keep_previous {
            // A second name for the old log, made before the rename takes the first: at no
            // moment is there no log at `self.path`, and the old one is never copied. Keeping
            // it is a fallback, not a duty: where it fails (a file system without hard links)
            // the rotation goes on, and `.prev` stays what it was, an older state.
            let previous = previous_path(&self.path);
            let linking = suffixed(&previous, ".new");
            let _ = std::fs::remove_file(&linking);
            let kept = std::fs::hard_link(&self.path, &linking)
                .and_then(|()| std::fs::rename(&linking, &previous));
            if let Err(error) = kept {
                tracing::warn!(
                    path = %previous.display(),
                    %error,
                    "could not keep the previous log; the rotation goes on without it"
                );
                let _ = std::fs::remove_file(&linking);
            }
        }
        std::fs::rename(&prepared.path, &self.path)
            .map_err(io_error(&self.path, "rename into place"))?;
        sync_directory_of(&self.path)?;
        self.file = prepared.file;
        self.generation = prepared.generation;
        self.committed_bytes = prepared.bytes + suffix;
        Ok(())
    }

    /// Replaces the log with one that starts with `snapshot`, which must cover every record
    /// logged so far (the synchronous form of [`prepare_log`] and [`Wal::finish_rotation`]).
    #[cfg(test)]
    pub fn rotate(&mut self, snapshot: &Snapshot) -> Result<(), WalError> {
        let prepared = prepare_log(&self.path, self.owner, snapshot, false)?;
        let cut = self.committed_bytes;
        self.finish_rotation(prepared, cut)
    }
}

/// Helpers shared by the tests of the log and of the salvage.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use tessera_types::ClientId;

    /// The owner of every test log.
    pub(crate) fn owner() -> WalOwner {
        WalOwner {
            replica: ReplicaId(1),
            fingerprint: Digest([7; 32]),
        }
    }

    /// Every record of the log at `path` (of [`owner`]), or the first error reading it.
    pub(crate) fn read_all(path: &Path) -> Result<Vec<Record>, WalError> {
        let mut reader = recover(path, owner())?.log;
        let mut records = Vec::new();
        while let Some(record) = reader.next_record()? {
            records.push(record);
        }
        Ok(records)
    }

    /// A request of client 3 numbered `number`.
    pub(crate) fn request(number: u64) -> Request {
        Request {
            client: ClientId(3),
            request_number: number,
            operation: vec![1, 2, 3],
            signature: vec![9; 64],
            macs: vec![[5; tessera_types::REQUEST_MAC_LEN]; 3],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{owner, read_all, request};
    use super::*;
    use tessera_types::{Heartbeat, SeqNum, View};

    fn mark(last_executed: u64) -> Mark {
        Mark {
            view: 0,
            view_changing: false,
            last_executed,
            stable_checkpoint: 0,
            usig_counter: last_executed * 2,
        }
    }

    /// Writes `groups` commits of two requests each and returns the path.
    fn write_log(directory: &Path, groups: u64) -> PathBuf {
        let path = directory.join("replica-1.wal");
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.append(&RecordRef::Start {
            now_ms: 0,
            wall_ms: 1_700_000_000_000,
        });
        for group in 0..groups {
            for number in [2 * group, 2 * group + 1] {
                wal.append(&RecordRef::Request {
                    now_ms: group,
                    wall_ms: 1_700_000_000_000 + group,
                    request: &request(number),
                });
            }
            wal.commit(mark(group)).unwrap();
        }
        path
    }

    #[test]
    fn a_snapshot_is_written_as_its_encoding_in_two_parts() {
        for core_len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let snapshot = Snapshot {
                generation: 7,
                clock_ms: 1_234_567,
                timers: vec![(0, 5), (2, 900_000)],
                core: (0..core_len).map(|index| index as u8).collect(),
            };
            let mut parts = snapshot_head(&snapshot);
            parts.extend_from_slice(&snapshot.core);
            assert_eq!(
                parts,
                tessera_types::encode(&snapshot),
                "core of {core_len} bytes"
            );
        }
    }

    #[test]
    fn borrowed_and_owned_records_encode_identically() {
        let request = request(5);
        let message = ReplicaMessage::Heartbeat(Heartbeat {
            replica: ReplicaId(2),
            view: View(1),
            epoch: 0,
            head_counter: 7,
            last_executed: SeqNum(3),
            stable_checkpoint: SeqNum(0),
            processed: vec![1, 2, 3],
            epochs: Vec::new(),
        });
        let pairs = [
            (
                tessera_types::encode(&RecordRef::Request {
                    now_ms: 9,
                    wall_ms: 1_700_000_000_009,
                    request: &request,
                }),
                tessera_types::encode(&Record::Request {
                    now_ms: 9,
                    wall_ms: 1_700_000_000_009,
                    request: request.clone(),
                }),
            ),
            (
                tessera_types::encode(&RecordRef::Message {
                    now_ms: 4,
                    wall_ms: 1_700_000_000_004,
                    from: ReplicaId(2),
                    message: &message,
                }),
                tessera_types::encode(&Record::Message {
                    now_ms: 4,
                    wall_ms: 1_700_000_000_004,
                    from: ReplicaId(2),
                    message: message.clone(),
                }),
            ),
            (
                tessera_types::encode(&RecordRef::Timer {
                    now_ms: 1,
                    wall_ms: 1_700_000_000_001,
                    timer: 2,
                }),
                tessera_types::encode(&Record::Timer {
                    now_ms: 1,
                    wall_ms: 1_700_000_000_001,
                    timer: 2,
                }),
            ),
            (
                tessera_types::encode(&RecordRef::Mark(mark(3))),
                tessera_types::encode(&Record::Mark(mark(3))),
            ),
            (
                tessera_types::encode(&RecordRef::Start {
                    now_ms: 8,
                    wall_ms: 1_700_000_000_008,
                }),
                tessera_types::encode(&Record::Start {
                    now_ms: 8,
                    wall_ms: 1_700_000_000_008,
                }),
            ),
            (
                tessera_types::encode(&RecordRef::StartEpoch {
                    now_ms: 9,
                    wall_ms: 1_700_000_000_009,
                    at_least: 1_700_000_000_009,
                }),
                tessera_types::encode(&Record::StartEpoch {
                    now_ms: 9,
                    wall_ms: 1_700_000_000_009,
                    at_least: 1_700_000_000_009,
                }),
            ),
            (
                tessera_types::encode(&RecordRef::Installed { seq: 16 }),
                tessera_types::encode(&Record::Installed { seq: 16 }),
            ),
        ];
        for (borrowed, owned) in pairs {
            assert_eq!(borrowed, owned);
        }
    }

    #[test]
    fn records_read_back_in_order_and_appending_continues_the_log() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 3);
        let records = read_all(&path).unwrap();
        // Start, then per group two requests and a mark.
        assert_eq!(records.len(), 1 + 3 * 3);
        assert!(matches!(
            records[0],
            Record::Start {
                now_ms: 0,
                wall_ms: 1_700_000_000_000
            }
        ));
        let numbers: Vec<u64> = records
            .iter()
            .filter_map(|record| match record {
                Record::Request { request, .. } => Some(request.request_number),
                _ => None,
            })
            .collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4, 5]);
        assert!(matches!(records[9], Record::Mark(m) if m == mark(2)));

        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.append(&RecordRef::Timer {
            now_ms: 50,
            wall_ms: 1_700_000_000_050,
            timer: 1,
        });
        wal.commit(mark(9)).unwrap();
        let records = read_all(&path).unwrap();
        assert_eq!(records.len(), 12);
        assert!(matches!(
            records[10],
            Record::Timer {
                now_ms: 50,
                wall_ms: 1_700_000_000_050,
                timer: 1
            }
        ));
    }

    #[test]
    fn uncommitted_records_are_not_in_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 1);
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.append(&RecordRef::Start {
            now_ms: 1,
            wall_ms: 1_700_000_000_001,
        });
        assert!(wal.has_pending());
        drop(wal);
        assert_eq!(read_all(&path).unwrap().len(), 4);
    }

    /// A state transfer's install whose snapshot never replaced the log: reading stops at its
    /// record, and reopening the log cuts it and everything after it off (nothing from there
    /// on was sent), keeping every record before it.
    #[test]
    fn a_log_is_cut_before_an_install_whose_snapshot_was_never_written() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let before = read_all(&path).unwrap().len();
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.append(&RecordRef::Timer {
            now_ms: 90,
            wall_ms: 1_700_000_000_090,
            timer: 2,
        });
        wal.append(&RecordRef::Installed { seq: 64 });
        wal.commit(mark(64)).unwrap();
        wal.append(&RecordRef::Timer {
            now_ms: 95,
            wall_ms: 1_700_000_000_095,
            timer: 2,
        });
        wal.commit(mark(64)).unwrap();
        drop(wal);
        assert_eq!(read_all(&path).unwrap().len(), before + 5);

        // What the driver's replay does on reading the record.
        let mut reader = recover(&path, owner()).unwrap().log;
        let mut read = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            if matches!(record, Record::Installed { seq: 64 }) {
                reader.cut_before_last();
                break;
            }
            read.push(record);
        }
        assert_eq!(
            read.len(),
            before + 1,
            "the timer before the install is kept"
        );
        let mut wal = reader.into_wal().unwrap();
        let records = read_all(&path).unwrap();
        assert_eq!(records.len(), before + 1);
        assert!(matches!(
            records.last(),
            Some(Record::Timer { now_ms: 90, .. })
        ));
        // And the log goes on from there.
        wal.commit(mark(5)).unwrap();
        assert_eq!(read_all(&path).unwrap().len(), before + 2);
    }

    #[test]
    fn a_torn_last_write_is_cut_off_at_every_length() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let full = std::fs::read(&path).unwrap();
        let one_group = {
            let shorter = write_log(&directory.path().join("one"), 1);
            std::fs::read(shorter).unwrap().len()
        };
        // Every cut inside the second group's bytes reads back as a prefix of the log; after
        // reopening, the file ends at a record boundary and appends work.
        for cut in one_group..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let records = read_all(&path).unwrap();
            assert!(records.len() >= 4 && records.len() < 7, "cut at {cut}");
            let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
            wal.commit(mark(42)).unwrap();
            let again = read_all(&path).unwrap();
            assert_eq!(again.len(), records.len() + 1, "cut at {cut}");
        }
    }

    #[test]
    fn a_zero_filled_tail_is_a_torn_write() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let mut bytes = std::fs::read(&path).unwrap();
        let records = read_all(&path).unwrap().len();
        bytes.extend(std::iter::repeat_n(0, 8192));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_all(&path).unwrap().len(), records);
        recover(&path, owner()).unwrap().log.into_wal().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            bytes.len() as u64 - 8192
        );
    }

    #[test]
    fn a_damaged_record_before_the_end_is_corruption() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 3);
        let mut bytes = std::fs::read(&path).unwrap();
        // A byte inside the first request's payload.
        let target = HEADER_LEN + RECORD_PREFIX_LEN + 3 + RECORD_PREFIX_LEN + 5;
        bytes[target] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        match read_all(&path) {
            Err(WalError::Corrupt { offset, .. }) => {
                assert!(offset > HEADER_LEN as u64 && offset < target as u64)
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        // The file is left as it was: nothing is cut off a corrupt log.
        assert!(recover(&path, owner()).unwrap().log.into_wal().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn another_replicas_or_clusters_log_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 1);
        let other_replica = WalOwner {
            replica: ReplicaId(2),
            ..owner()
        };
        let other_cluster = WalOwner {
            fingerprint: Digest([8; 32]),
            ..owner()
        };
        for (who, expected) in [(other_replica, "replica 1"), (other_cluster, "another")] {
            let error = recover(&path, who).err().expect("refused").to_string();
            assert!(error.contains(expected), "{error}");
        }
        std::fs::write(&path, b"not a log at all, but long enough for a header....").unwrap();
        let error = recover(&path, owner()).err().expect("refused").to_string();
        assert!(error.contains("header"), "{error}");
    }

    fn snapshot(generation: u64) -> Snapshot {
        Snapshot {
            generation,
            clock_ms: 77 * generation,
            timers: vec![(2, 100 * generation)],
            core: vec![generation as u8; 1000],
        }
    }

    #[test]
    fn a_snapshot_replaces_the_log_and_restarts_begin_from_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.rotate(&snapshot(1)).unwrap();
        wal.append(&RecordRef::Timer {
            now_ms: 90,
            wall_ms: 1_700_000_000_090,
            timer: 2,
        });
        wal.commit(mark(5)).unwrap();
        drop(wal);

        let recovery = recover(&path, owner()).unwrap();
        let restored = recovery.snapshot.expect("the snapshot");
        assert_eq!(restored.generation, 1);
        assert_eq!(restored.core, snapshot(1).core);
        assert_eq!(restored.timers, snapshot(1).timers);
        assert_eq!(recovery.log.generation(), 1);
        // Only what was logged after the snapshot is left to replay.
        let mut reader = recovery.log;
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        assert!(matches!(
            records.as_slice(),
            [Record::Timer { now_ms: 90, .. }, Record::Mark(_)]
        ));
    }

    #[test]
    fn records_logged_while_a_snapshot_is_written_follow_it_into_the_new_log() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        // The snapshot covers the log up to here...
        let cut = wal.committed_bytes();
        let prepared = prepare_log(&path, owner(), &snapshot(1), false).unwrap();
        // ...and these records arrive while it is being written.
        wal.append(&RecordRef::Timer {
            now_ms: 500,
            wall_ms: 1_700_000_000_500,
            timer: 1,
        });
        wal.commit(mark(8)).unwrap();
        // A crash now would leave the old log, with everything, and a half-made replacement
        // that the restart removes (the next test).
        assert!(temporary_path(&path).exists());
        let before = std::fs::metadata(&path).unwrap().len();
        wal.finish_rotation(prepared, cut).unwrap();
        assert!(!temporary_path(&path).exists());
        drop(wal);
        let recovery = recover(&path, owner()).unwrap();
        assert_eq!(recovery.snapshot.unwrap().generation, 1);
        let mut reader = recovery.log;
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        assert!(
            matches!(
                records.as_slice(),
                [Record::Timer { now_ms: 500, .. }, Record::Mark(_)]
            ),
            "{records:?}"
        );
        assert!(before > cut);
    }

    #[test]
    fn a_half_written_replacement_is_removed_and_the_old_log_stands() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 2);
        let logged = read_all(&path).unwrap().len();
        std::fs::write(temporary_path(&path), b"half a new log").unwrap();
        let recovery = recover(&path, owner()).unwrap();
        assert!(recovery.snapshot.is_none());
        assert!(!temporary_path(&path).exists());
        assert_eq!(read_all(&path).unwrap().len(), logged);
    }

    #[test]
    fn a_damaged_snapshot_or_another_owners_log_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 1);
        let mut wal = recover(&path, owner()).unwrap().log.into_wal().unwrap();
        wal.rotate(&snapshot(1)).unwrap();
        drop(wal);
        let good = std::fs::read(&path).unwrap();
        let other = WalOwner {
            fingerprint: Digest([9; 32]),
            ..owner()
        };
        assert!(recover(&path, other).is_err());

        let mut damaged = good.clone();
        damaged[HEADER_LEN + SNAPSHOT_DIGEST_LEN + 10] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let error = recover(&path, owner()).err().expect("refused").to_string();
        assert!(error.contains("does not match its digest"), "{error}");

        std::fs::write(&path, &good[..HEADER_LEN + 40]).unwrap();
        let error = recover(&path, owner()).err().expect("refused").to_string();
        assert!(error.contains("its snapshot claims"), "{error}");
    }

    #[test]
    fn a_damaged_length_in_the_middle_is_corruption_not_a_torn_tail() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_log(directory.path(), 3);
        let mut bytes = std::fs::read(&path).unwrap();
        // The first record's length field now claims more than the rest of the file.
        let length_at = HEADER_LEN + 2;
        bytes[length_at] = 0x7f;
        std::fs::write(&path, &bytes).unwrap();
        match read_all(&path) {
            Err(WalError::Corrupt { problem, .. }) => {
                assert!(problem.contains("intact records follow"), "{problem}")
            }
            other => panic!("expected corruption, got {other:?}"),
        }
        // Nothing was cut off.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }
}
