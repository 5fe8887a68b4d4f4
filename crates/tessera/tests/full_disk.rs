//! A full disk during a state transfer (issue 4): a replica that cannot write the snapshot of
//! the state it fetched (the chunks themselves are not logged, so the log stays small) stops
//! with an error naming the file and the OS error, the others keep serving, and the log it
//! leaves behind still holds its old state — a restart from a copy of it on a normal disk cuts
//! the unfinished install off, replays, transfers again and ends with the others' state digest.
//!
//! The small disk is a 4 MiB tmpfs mounted for the test (root with CAP_SYS_ADMIN, as on this
//! machine and CI). Where mounting is not permitted, the replica runs with `RLIMIT_FSIZE` instead
//! (SIGXFSZ ignored, so a write past the limit fails with EFBIG like a full disk fails with
//! ENOSPC); `TESSERA_FULL_DISK_RLIMIT=1` forces that path. The test never skips.

mod support;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use support::{connect, query_status, wait_for_agreement, ClusterDir, RunningCluster, BINARY};
use tessera_client::{Client, KvClient};

/// Replica ports 26000–26002, client ports 26100–26102, metrics 26150–26152 (docs/TESTING.md).
const BASE_PORT: u16 = 26_000;
/// The lagging replica.
const LAGGING: u32 = 2;
/// What the small disk holds: the replica's old log fits many times over, the state it has to
/// fetch (`BULK_KEYS` × `BULK_VALUE_BYTES`, 16 MiB) does not.
const SMALL_DISK_BYTES: u64 = 4 << 20;
/// The old log must leave most of the small disk free, or the test would not be about the
/// transfer.
const OLD_LOG_BYTES_MAX: u64 = 1 << 20;
/// Keys written while all three replicas run: the lagging replica's old state.
const OLD_KEYS: u64 = 24;
/// Keys written while the lagging replica is down.
const BULK_KEYS: u64 = 256;
/// Bytes per bulk value: well within the store's 512 KiB value limit.
const BULK_VALUE_BYTES: usize = 64 << 10;
/// Concurrent sessions writing the bulk keys.
const BULK_SESSIONS: u64 = 4;
/// Checkpoint interval and log size: small, so the bulk writes put the others many checkpoints
/// ahead and garbage-collect what the lagging replica would need to catch up by fetching.
const CHECKPOINT_INTERVAL: u64 = 8;
const LOG_SIZE: u64 = 16;
/// The most messages of one sender any replica keeps for a peer that has not processed them
/// (`STORE_PER_STREAM_MAX` in tessera-core, above the own-message cap of `8 × LOG_SIZE + 1024`),
/// plus a margin for the status being published late.
const STREAM_MESSAGES_KEPT: u64 = 4_096 + 256;
/// Sessions sending small writes to push the bulk writes' messages out; with one request per
/// batch, each write takes a sequence number and so at least one counter value of each.
const FILLER_SESSIONS: u64 = 8;
const FILLER_WRITES_PER_ROUND: u64 = 64;
/// How long the replica on the full disk may take to start, begin the transfer and stop.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the restarted replica may take to replay, transfer and agree.
const AGREEMENT_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_full_disk_during_a_state_transfer_stops_the_replica_clearly_and_keeps_its_old_log() {
    let dir = ClusterDir::create(BASE_PORT, |protocol| {
        protocol.checkpoint_interval = CHECKPOINT_INTERVAL;
        protocol.log_size = LOG_SIZE;
        protocol.window = 8;
        protocol.batch_requests_max = 1;
        // Short timers: if replica 0 is slow to answer after the bulk writes, nothing waits long.
        protocol.request_timeout_ms = 2_000;
        protocol.view_change_timeout_ms = 2_000;
    });
    let mut cluster = RunningCluster::start(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    let client = runtime.block_on(connect(&cluster.dir, 0));
    let mut kv = KvClient::new(client.session());

    // 1. The old state: a few keys every replica executes.
    runtime.block_on(async {
        for index in 0..OLD_KEYS {
            kv.set(old_key(index), old_value(index))
                .await
                .expect("write an old key");
        }
    });
    let agreed = runtime.block_on(wait_for_agreement(
        &cluster.dir,
        &[0, 1, 2],
        Duration::from_secs(30),
    ));
    let old_executed = agreed[LAGGING as usize].last_executed.0;
    let old_digest = agreed[LAGGING as usize].stable_state_digest.clone();
    assert!(
        old_executed >= OLD_KEYS,
        "replica {LAGGING} executed only {old_executed} sequence numbers"
    );
    eprintln!("old state of replica {LAGGING}: executed {old_executed}, digest {old_digest:?}");

    // Stop it gracefully, so its log ends with a complete commit and is byte for byte what it
    // will start from.
    stop_gracefully(&mut cluster, LAGGING);
    let old_log_path = support::local::wal_path(&cluster.dir.path, LAGGING);
    let old_log = std::fs::read(&old_log_path).expect("read the old log");
    assert!(
        (old_log.len() as u64) < OLD_LOG_BYTES_MAX,
        "the old log has {} bytes: too much of the small disk",
        old_log.len()
    );

    // 2. While it is down, the others move many checkpoints ahead.
    runtime.block_on(write_bulk(&client));
    // Then small writes until the bulk writes' messages are gone from every buffer a peer could
    // retransmit them from, and a restart of replicas 0 and 1 from their logs, which empties
    // their queues of messages for replica 2 (kept while it was away, up to 65,536 frames):
    // otherwise replica 2 first receives and logs every PREPARE of the bulk writes, and the
    // disk fills with those before the transfer begins.
    let ahead = runtime.block_on(push_out_bulk_messages(&cluster.dir, &client));
    for id in [0, 1] {
        cluster
            .local
            .restart_replica(id)
            .expect("restart a replica");
        runtime.block_on(wait_answering(&cluster.dir, id));
    }
    runtime.block_on(wait_for_agreement(
        &cluster.dir,
        &[0, 1],
        Duration::from_secs(30),
    ));
    eprintln!("replicas 0 and 1 are at stable checkpoint {ahead}");

    // 3. Restart it with its log on a disk that cannot hold the transfer.
    let small_disk = SmallDisk::create(&cluster.dir.path.join("small-disk"));
    let small_log = small_disk.path.join(format!("replica-{LAGGING}.wal"));
    std::fs::copy(&old_log_path, &small_log).expect("copy the old log to the small disk");
    let full_disk_output = cluster
        .dir
        .path
        .join(format!("logs/replica-{LAGGING}-full-disk.log"));
    let mut on_small_disk = ReplicaChild::spawn(
        &cluster.dir,
        &small_log,
        &full_disk_output,
        small_disk.file_size_limit(),
    );
    let status = on_small_disk.wait_exit(EXIT_TIMEOUT);
    let output = std::fs::read_to_string(&full_disk_output).unwrap_or_default();
    eprintln!(
        "replica {LAGGING} on the small disk ({}) exited with {status}; its output ends:\n{}",
        small_disk.kind(),
        tail(&output)
    );
    assert!(!status.success(), "it exited successfully: {status}");
    assert_eq!(
        status.code(),
        Some(1),
        "it must exit with an error, not a signal"
    );
    assert!(
        output.contains("replayed the write-ahead log"),
        "it did not start from its old log"
    );
    assert!(
        output.contains("fetching state"),
        "it never began fetching partitions: the disk filled with something else"
    );
    // The chunks are not logged: the transfer completed in memory, and the snapshot that makes
    // the installed state durable (docs/STATE.md §4) is what did not fit.
    assert!(
        output.contains("state transfer complete"),
        "the transfer did not finish before the disk filled: the chunks went to the disk"
    );
    // The last line is main's error: it names the log and the OS error.
    let error_line = output
        .lines()
        .rev()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in its output:\n{}", tail(&output)));
    assert!(
        error_line.contains(&small_log.display().to_string()),
        "the error does not name the log {}: {error_line}",
        small_log.display()
    );
    assert!(
        error_line.contains(small_disk.os_error()),
        "the error does not name the OS error {:?}: {error_line}",
        small_disk.os_error()
    );
    assert!(
        error_line.contains("snapshot"),
        "the error does not say the snapshot failed: {error_line}"
    );
    // Its old log is untouched: the failed run only appended to it.
    let failed_log = std::fs::read(&small_log).expect("read the log on the small disk");
    eprintln!(
        "the log grew from {} to {} bytes before the disk was full",
        old_log.len(),
        failed_log.len()
    );
    assert!(
        failed_log.len() > old_log.len(),
        "the restart wrote nothing to the log"
    );
    // A transfer needs the state's size on disk once, in the snapshot: the log did not fill
    // with the 16 MiB of chunks.
    assert!(
        (failed_log.len() as u64) < OLD_LOG_BYTES_MAX,
        "the log holds {} bytes: the chunks were logged",
        failed_log.len()
    );
    assert!(
        failed_log[..old_log.len()] == old_log[..],
        "the old log's bytes changed"
    );

    // The others keep serving.
    assert!(
        cluster.local.poll_exits().is_empty(),
        "another replica exited"
    );
    runtime.block_on(async {
        kv.set(b"after/full-disk".to_vec(), b"still serving".to_vec())
            .await
            .expect("write while replica 2 is down");
        assert_eq!(
            kv.get(b"after/full-disk".to_vec())
                .await
                .expect("read it back"),
            Some(b"still serving".to_vec())
        );
    });

    // 4. The old state is intact: a copy of that log on a normal disk restarts the replica,
    // which replays, finishes the transfer and agrees with the others.
    let recovered_log = cluster
        .dir
        .path
        .join("recovered")
        .join(format!("replica-{LAGGING}.wal"));
    std::fs::create_dir_all(recovered_log.parent().expect("a parent")).expect("create a dir");
    std::fs::copy(&small_log, &recovered_log).expect("copy the log off the small disk");
    drop(small_disk);
    let recovered_output = cluster
        .dir
        .path
        .join(format!("logs/replica-{LAGGING}-recovered.log"));
    let _recovered = ReplicaChild::spawn(&cluster.dir, &recovered_log, &recovered_output, None);
    let statuses = runtime.block_on(async {
        // A log it cannot read stops it at once: fail with its error rather than wait.
        let deadline = Instant::now() + AGREEMENT_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&recovered_output).unwrap_or_default();
            assert!(
                !text.lines().any(|line| line.starts_with("error:")),
                "the restart failed:\n{}",
                tail(&text)
            );
            if query_status(&cluster.dir.client_address(LAGGING))
                .await
                .is_ok()
            {
                break wait_for_agreement(&cluster.dir, &[0, 1, 2], AGREEMENT_TIMEOUT).await;
            }
            assert!(Instant::now() < deadline, "the restart never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let recovered = std::fs::read_to_string(&recovered_output).expect("read its output");
    let replayed = recovered
        .lines()
        .find(|line| line.contains("replayed the write-ahead log"))
        .unwrap_or_else(|| panic!("the restart did not replay its log:\n{}", tail(&recovered)));
    eprintln!("the restart from the copied log: {replayed}");
    // The install whose snapshot never got written is cut off: the log ends before it.
    assert!(
        recovered.contains("restarting from before it"),
        "the restart did not cut the log before the unfinished install:\n{}",
        tail(&recovered)
    );
    if let Some(torn) = recovered.lines().find(|line| line.contains("torn")) {
        eprintln!("{torn}");
    }
    let replayed_executed = field_u64(replayed, "last_executed")
        .unwrap_or_else(|| panic!("no last_executed in {replayed:?}"));
    assert!(
        replayed_executed >= old_executed,
        "replay rebuilt the replica at {replayed_executed}, before its old state at {old_executed}"
    );
    assert!(
        recovered.contains("state transfer complete"),
        "the restarted replica did not complete a state transfer:\n{}",
        tail(&recovered)
    );
    let digest = &statuses[0].stable_state_digest;
    for status in &statuses {
        assert_eq!(&status.stable_state_digest, digest, "{statuses:#?}");
    }
    assert_ne!(digest, &old_digest, "the state moved on");
    assert!(statuses[LAGGING as usize].stable_checkpoint.0 >= ahead);

    // Everything written before and during the outage reads back.
    runtime.block_on(async {
        let keys: Vec<Vec<u8>> = (0..OLD_KEYS).map(old_key).collect();
        let expected: Vec<Option<Vec<u8>>> =
            (0..OLD_KEYS).map(|index| Some(old_value(index))).collect();
        assert_eq!(
            kv.mget(keys).await.expect("read the old keys"),
            expected,
            "old keys"
        );
        for index in 0..BULK_KEYS {
            let value = kv.get(bulk_key(index)).await.expect("read a bulk key");
            assert!(
                value.as_deref() == Some(&bulk_value(index)[..]),
                "bulk key {index} reads back {} bytes, not its value",
                value.map_or(0, |value| value.len())
            );
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

fn old_key(index: u64) -> Vec<u8> {
    format!("old/{index:03}").into_bytes()
}

fn old_value(index: u64) -> Vec<u8> {
    format!("old value {index}").into_bytes()
}

fn bulk_key(index: u64) -> Vec<u8> {
    format!("bulk/{index:04}").into_bytes()
}

/// A value that differs in every byte from key to key (xorshift from the index), so a value
/// read back under the wrong key or with a wrong chunk does not pass.
fn bulk_value(index: u64) -> Vec<u8> {
    let mut state = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BULK_VALUE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes the bulk keys from several sessions at once.
async fn write_bulk(client: &Client) {
    let mut sessions = tokio::task::JoinSet::new();
    for session in 0..BULK_SESSIONS {
        let mut kv = KvClient::new(client.session());
        sessions.spawn(async move {
            for index in (session..BULK_KEYS).step_by(BULK_SESSIONS as usize) {
                kv.set(bulk_key(index), bulk_value(index))
                    .await
                    .unwrap_or_else(|error| panic!("write bulk key {index}: {error}"));
            }
        });
    }
    while let Some(joined) = sessions.join_next().await {
        joined.expect("a bulk session panicked");
    }
}

/// Sends small writes from several sessions until replicas 0 and 1 have each used more than
/// [`STREAM_MESSAGES_KEPT`] further USIG counter values (every certified message takes one), so
/// no replica holds a message of theirs from the bulk writes any more (PROTOCOL.md §5: a
/// replica keeps its own messages up to `8 × log_size + 1024` and another's up to 4,096 per
/// stream for a peer that has not processed them). Returns the lower of their stable
/// checkpoints.
async fn push_out_bulk_messages(dir: &ClusterDir, client: &Client) -> u64 {
    let counters = |statuses: &[tessera_types::wire::ReplicaStatus]| {
        statuses
            .iter()
            .map(|status| status.usig_counter)
            .collect::<Vec<_>>()
    };
    let started = counters(&statuses_of(dir, &[0, 1]).await);
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut round = 0u64;
    loop {
        let statuses = statuses_of(dir, &[0, 1]).await;
        let now = counters(&statuses);
        if now
            .iter()
            .zip(&started)
            .all(|(now, started)| *now > started + STREAM_MESSAGES_KEPT)
        {
            eprintln!("USIG counters of replicas 0 and 1 went from {started:?} to {now:?}");
            return statuses
                .iter()
                .map(|status| status.stable_checkpoint.0)
                .min()
                .expect("two statuses");
        }
        assert!(
            Instant::now() < deadline,
            "replicas 0 and 1 moved their USIG counters only from {started:?} to {now:?}"
        );
        let mut sessions = tokio::task::JoinSet::new();
        for session in 0..FILLER_SESSIONS {
            let mut kv = KvClient::new(client.session());
            sessions.spawn(async move {
                for write in 0..FILLER_WRITES_PER_ROUND {
                    kv.set(
                        format!("filler/{session}").into_bytes(),
                        (round * FILLER_WRITES_PER_ROUND + write)
                            .to_string()
                            .into_bytes(),
                    )
                    .await
                    .unwrap_or_else(|error| panic!("a filler write: {error}"));
                }
            });
        }
        while let Some(joined) = sessions.join_next().await {
            joined.expect("a filler session panicked");
        }
        round += 1;
    }
}

async fn statuses_of(dir: &ClusterDir, ids: &[u32]) -> Vec<tessera_types::wire::ReplicaStatus> {
    let mut statuses = Vec::new();
    for &id in ids {
        statuses.push(
            query_status(&dir.client_address(id))
                .await
                .unwrap_or_else(|error| panic!("status of replica {id}: {error:#}")),
        );
    }
    statuses
}

/// Waits until replica `id` answers a status query.
async fn wait_answering(dir: &ClusterDir, id: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_status(&dir.client_address(id)).await.is_err() {
        assert!(Instant::now() < deadline, "replica {id} did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a replica of the cluster with SIGTERM and waits until it has exited.
fn stop_gracefully(cluster: &mut RunningCluster, id: u32) {
    let pid = cluster.local.pid(id).expect("the replica is running");
    // SAFETY: `kill` has no memory-safety preconditions; the pid is our unreaped child.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM to replica {id}");
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let exited = cluster.local.poll_exits();
        if let Some((_, status)) = exited.iter().find(|(exited, _)| *exited == id) {
            assert!(status.success(), "replica {id} stopped with {status}");
            assert_eq!(exited.len(), 1, "other replicas exited too: {exited:?}");
            return;
        }
        assert!(exited.is_empty(), "other replicas exited: {exited:?}");
        assert!(
            Instant::now() < deadline,
            "replica {id} did not stop within {STOP_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lagging replica run by the test itself (with its log at `--wal`), killed when dropped.
struct ReplicaChild {
    child: Child,
    output: PathBuf,
}

impl ReplicaChild {
    /// Starts replica [`LAGGING`] with its log at `wal` and its output in `output`; with
    /// `file_size_limit`, under that `RLIMIT_FSIZE`.
    fn spawn(
        dir: &ClusterDir,
        wal: &Path,
        output: &Path,
        file_size_limit: Option<u64>,
    ) -> ReplicaChild {
        let log = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(output)
            .expect("open the replica's output file");
        let mut command = Process::new(BINARY);
        command
            .args(["replica", "--id", &LAGGING.to_string(), "--dir"])
            .arg(&dir.path)
            .arg("--wal")
            .arg(wal)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone a file handle"))
            .stderr(log);
        if let Some(limit) = file_size_limit {
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // `setrlimit` and `signal`, both async-signal-safe; it allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Without this the kernel kills the process at the limit; ignored, the
                    // write fails with EFBIG, the way a full disk fails with ENOSPC.
                    if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start the replica");
        ReplicaChild {
            child,
            output: output.to_path_buf(),
        }
    }

    /// Waits until the replica exits; panics (killing it) after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the replica") {
                return status;
            }
            if Instant::now() >= deadline {
                let output = std::fs::read_to_string(&self.output).unwrap_or_default();
                panic!(
                    "replica {LAGGING} kept running for {timeout:?} on the full disk; its output \
                     ends:\n{}",
                    tail(&output)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ReplicaChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let output = std::fs::read_to_string(&self.output).unwrap_or_default();
            eprintln!(
                "----- {} (end) -----\n{}",
                self.output.display(),
                tail(&output)
            );
        }
    }
}

/// A directory that holds at most [`SMALL_DISK_BYTES`]: a tmpfs of that size mounted on it
/// (unmounted when dropped, also on a panic), or, where mounting is not permitted, a plain
/// directory whose writer runs under `RLIMIT_FSIZE`.
struct SmallDisk {
    path: PathBuf,
    mounted: bool,
}

impl SmallDisk {
    fn create(path: &Path) -> SmallDisk {
        std::fs::create_dir_all(path).expect("create the small disk's directory");
        let forced = std::env::var_os("TESSERA_FULL_DISK_RLIMIT").is_some_and(|value| value == "1");
        let mounted = if forced {
            eprintln!("TESSERA_FULL_DISK_RLIMIT=1: using RLIMIT_FSIZE instead of a tmpfs");
            false
        } else {
            match mount_tmpfs(path, SMALL_DISK_BYTES) {
                Ok(()) => true,
                Err(error) => {
                    eprintln!(
                        "cannot mount a tmpfs on {} ({error}); using RLIMIT_FSIZE instead",
                        path.display()
                    );
                    false
                }
            }
        };
        SmallDisk {
            path: path.to_path_buf(),
            mounted,
        }
    }

    fn kind(&self) -> &'static str {
        if self.mounted {
            "a 4 MiB tmpfs"
        } else {
            "RLIMIT_FSIZE 4 MiB"
        }
    }

    /// The limit the replica must run under (none on a real small file system).
    fn file_size_limit(&self) -> Option<u64> {
        (!self.mounted).then_some(SMALL_DISK_BYTES)
    }

    /// How the OS reports a write that does not fit.
    fn os_error(&self) -> &'static str {
        if self.mounted {
            "No space left on device"
        } else {
            "File too large"
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let Ok(path) = CString::new(self.path.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: `path` is a valid NUL-terminated string that outlives the calls.
        unsafe {
            // A process still holding a file there makes a plain unmount fail; detach then, so
            // the mount never outlives the test.
            if libc::umount2(path.as_ptr(), 0) != 0 {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

fn mount_tmpfs(path: &Path, bytes: u64) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let source = CString::new("tmpfs").expect("no NUL");
    let options = CString::new(format!("size={bytes},mode=0700")).expect("no NUL");
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The value of ` name=VALUE` on a log line.
fn field_u64(line: &str, name: &str) -> Option<u64> {
    let pattern = format!(" {name}=");
    let start = line.find(&pattern)? + pattern.len();
    line[start..]
        .split(|character: char| !character.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The last lines of a process's output.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
