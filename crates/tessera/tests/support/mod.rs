//! Shared pieces of the process-level tests: clusters of real `tessera` processes in a temporary
//! directory, status queries, and a sequential model of the key-value store that client
//! histories are checked against.
//!
//! Every helper bounds its own waiting, and every process a test starts is killed when the
//! value owning it is dropped, so a failing test never leaves replicas behind.

#![allow(dead_code)] // Each test binary uses a different part.

#[path = "../../src/local.rs"]
pub mod local;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};
use tessera_client::{Client, ClientError, ClientOptions, KvClient};
use tessera_kv::{Command, Response};
use tessera_types::cluster::{ClientSecrets, ClusterConfig, ReplicaSecrets};
use tessera_types::wire::{ClientToReplica, ReplicaStatus, ReplicaToClient};
use tessera_types::ProtocolConfig;
use tokio::io::{AsyncWriteExt, BufReader};

pub use local::LocalCluster;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tessera");
/// Timeout of one status query.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest status answer accepted.
const STATUS_FRAME_BYTES_MAX: usize = 1 << 20;
/// Bytes of each replica log shown when a test fails.
const LOG_TAIL_BYTES: usize = 6_000;

/// A cluster directory written by `tessera init` inside a temporary directory.
pub struct ClusterDir {
    pub path: PathBuf,
    pub config: ClusterConfig,
    // Dropped last: the files outlive every process using them.
    _temp: tempfile::TempDir,
}

impl ClusterDir {
    /// Runs `tessera init --base-port base_port` and applies `tune` to the protocol section.
    pub fn create(base_port: u16, tune: impl FnOnce(&mut ProtocolConfig)) -> ClusterDir {
        let temp = tempfile::tempdir().expect("create a temporary directory");
        let path = temp.path().join("cluster");
        let output = Process::new(BINARY)
            .args([
                "init",
                "--force",
                "--base-port",
                &base_port.to_string(),
                "--dir",
            ])
            .arg(&path)
            .output()
            .expect("run tessera init");
        assert!(
            output.status.success(),
            "tessera init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut config = local::read_cluster(&path).expect("read cluster.toml");
        tune(&mut config.protocol);
        config.validate().expect("tuned cluster.toml is valid");
        std::fs::write(path.join("cluster.toml"), config.to_toml()).expect("write cluster.toml");
        ClusterDir {
            path,
            config,
            _temp: temp,
        }
    }

    pub fn client_secrets(&self, id: u32) -> ClientSecrets {
        let file = self.path.join(format!("client-{id}.secret.toml"));
        let text = std::fs::read_to_string(&file).expect("read a client secret file");
        ClientSecrets::from_toml(&text, &self.config).expect("parse a client secret file")
    }

    pub fn replica_secrets(&self, id: u32) -> ReplicaSecrets {
        let file = self.path.join(format!("replica-{id}.secret.toml"));
        let text = std::fs::read_to_string(&file).expect("read a replica secret file");
        ReplicaSecrets::from_toml(&text, &self.config).expect("parse a replica secret file")
    }

    pub fn client_address(&self, id: u32) -> String {
        self.config.replicas[id as usize].client_address.clone()
    }

    pub fn replica_address(&self, id: u32) -> String {
        self.config.replicas[id as usize].replica_address.clone()
    }

    pub fn log_path(&self, id: u32) -> PathBuf {
        self.path.join("logs").join(format!("replica-{id}.log"))
    }

    /// Prints the end of every replica log (for a failing test's output).
    pub fn print_log_tails(&self) {
        for id in 0..self.config.replicas.len() as u32 {
            let Ok(bytes) = std::fs::read(self.log_path(id)) else {
                continue;
            };
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            eprintln!(
                "----- replica {id} log (last {} bytes) -----\n{}",
                bytes.len() - start,
                String::from_utf8_lossy(&bytes[start..])
            );
        }
    }
}

/// A cluster of real replica processes; prints the replica logs if the test panics.
pub struct RunningCluster {
    // Declared first so the processes die before the directory is removed.
    pub local: LocalCluster,
    pub dir: ClusterDir,
}

impl RunningCluster {
    pub fn start(dir: ClusterDir) -> RunningCluster {
        RunningCluster::start_with(dir, &[])
    }

    /// Starts the cluster with `replica_arguments` added to every `tessera replica`.
    pub fn start_with(dir: ClusterDir, replica_arguments: &[&str]) -> RunningCluster {
        let arguments = replica_arguments
            .iter()
            .map(|text| text.to_string())
            .collect();
        let mut local = LocalCluster::start_with(&dir.path, Path::new(BINARY), arguments)
            .expect("start the replicas");
        if let Err(error) = local.wait_ready(Duration::from_secs(20)) {
            dir.print_log_tails();
            panic!("replicas not ready: {error:#}");
        }
        RunningCluster { local, dir }
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.print_log_tails();
        }
    }
}

/// Prints the replica logs of a cluster directory if the test panics while it is alive.
pub struct LogsOnPanic<'a>(pub &'a ClusterDir);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.print_log_tails();
        }
    }
}

/// Some replicas of a cluster, started one by one (for tests that play the others themselves).
pub struct ReplicaProcesses {
    children: Vec<(u32, Child)>,
}

impl ReplicaProcesses {
    pub fn start(dir: &ClusterDir, ids: &[u32]) -> ReplicaProcesses {
        std::fs::create_dir_all(dir.path.join("logs")).expect("create the log directory");
        let mut processes = ReplicaProcesses {
            children: Vec::new(),
        };
        for &id in ids {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.log_path(id))
                .expect("open a replica log");
            let child = Process::new(BINARY)
                .args(["replica", "--id", &id.to_string(), "--dir"])
                .arg(&dir.path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone a log handle"))
                .stderr(log)
                .spawn()
                .expect("start a replica");
            processes.children.push((id, child));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for &id in ids {
            let address = dir.client_address(id);
            while StdTcpStream::connect(&address).is_err() {
                assert!(processes.exited().is_empty(), "a replica exited at start");
                assert!(
                    Instant::now() < deadline,
                    "replica {id} did not open {address}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        processes
    }

    /// Replicas that have exited, with their status.
    pub fn exited(&mut self) -> Vec<(u32, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .filter_map(|(id, child)| child.try_wait().ok().flatten().map(|status| (*id, status)))
            .collect()
    }
}

impl Drop for ReplicaProcesses {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects a client with generous timeouts (tests must not fail on a slow machine).
pub async fn connect(dir: &ClusterDir, credential: u32) -> Client {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect(dir.config.clone(), dir.client_secrets(credential), options)
        .await
        .expect("connect a client")
}

/// Asks one replica for its status over its client port.
pub async fn query_status(address: &str) -> anyhow::Result<ReplicaStatus> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .context("cannot connect")?;
        let (read_half, mut write_half) = stream.into_split();
        let request = tessera_types::encode(&ClientToReplica::Status);
        tessera_node::frame::write_client_frame(&mut write_half, &request).await?;
        write_half.flush().await?;
        let mut reader = BufReader::new(read_half);
        let answer =
            tessera_node::frame::read_client_frame(&mut reader, STATUS_FRAME_BYTES_MAX).await?;
        match tessera_types::decode::<ReplicaToClient>(&answer, STATUS_FRAME_BYTES_MAX)? {
            ReplicaToClient::Status(status) => Ok(status),
            other => bail!("unexpected answer to a status query: {other:?}"),
        }
    };
    tokio::time::timeout(STATUS_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| bail!("no answer within {STATUS_TIMEOUT:?}"))
}

/// Waits until the replicas `ids` are quiescent and agree: same view, no view change under way,
/// nothing pending, same last executed sequence number, and the same stable checkpoint (past
/// genesis) with the same state digest. Returns their statuses.
pub async fn wait_for_agreement(
    dir: &ClusterDir,
    ids: &[u32],
    timeout: Duration,
) -> Vec<ReplicaStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut statuses = Vec::new();
        for &id in ids {
            match query_status(&dir.client_address(id)).await {
                Ok(status) => statuses.push(status),
                Err(error) => panic!("status of replica {id}: {error:#}"),
            }
        }
        let first = &statuses[0];
        let agree = statuses.iter().all(|status| {
            status.view == first.view
                && !status.view_changing
                && status.pending_requests == 0
                && status.last_executed == first.last_executed
                && status.stable_checkpoint == first.stable_checkpoint
                && status.stable_state_digest == first.stable_state_digest
        });
        if agree && first.stable_checkpoint.0 > 0 {
            return statuses;
        }
        if Instant::now() >= deadline {
            panic!("replicas {ids:?} did not agree within {timeout:?}: {statuses:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// The key-value store as a plain sequential map: what every replica must compute.
#[derive(Default, Debug, Clone)]
pub struct Model {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    pub fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.entries.get(key).cloned()
    }

    /// Applies a command the way the store documents it. Commands that would make the store
    /// refuse (non-integers, overflow, limits) are never generated, so they are not modelled.
    pub fn apply(&mut self, command: &Command) -> Response {
        match command {
            Command::Get { key } => Response::Value(self.value(key)),
            Command::Set { key, value } => {
                self.entries.insert(key.clone(), value.clone());
                Response::Ok
            }
            Command::Del { keys } => {
                let distinct: BTreeSet<&Vec<u8>> = keys.iter().collect();
                let removed = distinct
                    .into_iter()
                    .filter(|key| self.entries.remove(*key).is_some())
                    .count();
                Response::Count(removed as u64)
            }
            Command::Exists { keys } => Response::Count(
                keys.iter()
                    .filter(|key| self.entries.contains_key(*key))
                    .count() as u64,
            ),
            Command::Incr { key, delta } => {
                let old: i64 = match self.entries.get(key) {
                    None => 0,
                    Some(bytes) => std::str::from_utf8(bytes)
                        .ok()
                        .and_then(|text| text.parse().ok())
                        .expect("the workload INCRs only integer keys"),
                };
                let new = old
                    .checked_add(*delta)
                    .expect("the workload never overflows");
                self.entries
                    .insert(key.clone(), new.to_string().into_bytes());
                Response::Integer(new)
            }
            Command::MGet { keys } => {
                Response::Values(keys.iter().map(|key| self.value(key)).collect())
            }
            Command::MSet { pairs } => {
                for (key, value) in pairs {
                    self.entries.insert(key.clone(), value.clone());
                }
                Response::Ok
            }
            Command::CompareAndSet { key, expected, new } => {
                let current = self.value(key);
                if current == *expected {
                    match new {
                        Some(value) => self.entries.insert(key.clone(), value.clone()),
                        None => self.entries.remove(key),
                    };
                    Response::CompareAndSet {
                        swapped: true,
                        current: new.clone(),
                    }
                } else {
                    Response::CompareAndSet {
                        swapped: false,
                        current,
                    }
                }
            }
            // The Redis-gateway commands are checked by the store's own model test
            // (tessera-kv/tests/model.rs) and by tests/gateway.rs, not generated here.
            other => panic!("the workload never generates {other:?}"),
        }
    }
}

/// Runs one command; a store refusal comes back as [`Response::Error`] so the model sees it.
pub async fn execute(kv: &mut KvClient, command: &Command) -> Result<Response, ClientError> {
    match kv.execute(command).await {
        Ok(response) => Ok(response),
        Err(ClientError::Kv(error)) => Ok(Response::Error(error)),
        Err(error) => Err(error),
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// The key shared by every session's INCRs.
pub const COUNTER_KEY: &[u8] = b"shared/counter";
/// The key shared by every session's compare-and-set chain.
pub const CHAIN_KEY: &[u8] = b"shared/chain";

/// What one session did.
#[derive(Default, Debug)]
pub struct SessionHistory {
    pub session: usize,
    /// Commands on the session's own keys, with the results, in order.
    pub private: Vec<(Command, Response)>,
    /// Values returned by INCR of [`COUNTER_KEY`] (each by 1).
    pub counter_values: Vec<i64>,
    /// Compare-and-set attempts on [`CHAIN_KEY`]: (expected, new, outcome).
    pub chain: Vec<(Option<Vec<u8>>, Vec<u8>, Response)>,
    /// Values GET returned for [`CHAIN_KEY`].
    pub chain_reads: Vec<Option<Vec<u8>>>,
    /// Every operation with when it was invoked and completed, for a linearizability check.
    pub timeline: Vec<Timed>,
}

/// One operation as its client saw it. Times are microseconds since the test process started
/// (one clock for every session).
#[derive(Debug, Clone)]
pub struct Timed {
    pub command: Command,
    pub invoked_us: u64,
    pub completed_us: u64,
    pub response: Response,
}

fn now_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Runs `command` and records it in `timeline`.
async fn timed(
    kv: &mut KvClient,
    command: Command,
    timeline: &mut Vec<Timed>,
) -> Result<Response, ClientError> {
    let invoked_us = now_us();
    let response = execute(kv, &command).await?;
    timeline.push(Timed {
        command,
        invoked_us,
        completed_us: now_us(),
        response: response.clone(),
    });
    Ok(response)
}

impl SessionHistory {
    pub fn operations(&self) -> usize {
        self.private.len() + self.counter_values.len() + self.chain.len() + self.chain_reads.len()
    }
}

fn string_key(session: usize, index: usize) -> Vec<u8> {
    format!("s{session}/k{index}").into_bytes()
}

fn number_key(session: usize, index: usize) -> Vec<u8> {
    format!("s{session}/n{index}").into_bytes()
}

/// Keys a session writes (disjoint from every other session's).
pub fn session_keys(session: usize) -> Vec<Vec<u8>> {
    (0..4)
        .map(|index| string_key(session, index))
        .chain((0..2).map(|index| number_key(session, index)))
        .collect()
}

fn random_value(rng: &mut StdRng, session: usize, serial: usize) -> Vec<u8> {
    let mut value = format!("v{session}.{serial}").into_bytes();
    if rng.gen_ratio(1, 10) {
        // Now and then a larger value, so batches and snapshots are not all tiny.
        value.extend(std::iter::repeat_n(b'x', rng.gen_range(500..3_000)));
    }
    value
}

/// A random command on the session's own keys, biased so compare-and-set often succeeds.
fn private_command(rng: &mut StdRng, model: &Model, session: usize, serial: usize) -> Command {
    let key = |rng: &mut StdRng| string_key(session, rng.gen_range(0..4));
    let keys =
        |rng: &mut StdRng| -> Vec<Vec<u8>> { (0..rng.gen_range(1..4)).map(|_| key(rng)).collect() };
    match rng.gen_range(0..100) {
        0..=17 => Command::Set {
            key: key(rng),
            value: random_value(rng, session, serial),
        },
        18..=29 => Command::Get { key: key(rng) },
        30..=34 => Command::Get {
            key: number_key(session, rng.gen_range(0..2)),
        },
        35..=42 => Command::Del { keys: keys(rng) },
        43..=57 => Command::Incr {
            key: number_key(session, rng.gen_range(0..2)),
            delta: rng.gen_range(-5..50),
        },
        58..=65 => {
            let mut keys = keys(rng);
            keys.push(number_key(session, 0));
            Command::MGet { keys }
        }
        66..=74 => Command::MSet {
            pairs: (0..rng.gen_range(1..4))
                .map(|offset| (key(rng), random_value(rng, session, serial * 10 + offset)))
                .collect(),
        },
        75..=94 => {
            let key = key(rng);
            let current = model.value(&key);
            let expected = match rng.gen_range(0..10) {
                0..=5 => current,
                6..=7 => None,
                _ => Some(b"never stored".to_vec()),
            };
            let new = if rng.gen_ratio(1, 8) {
                None
            } else {
                Some(random_value(rng, session, serial))
            };
            Command::CompareAndSet { key, expected, new }
        }
        _ => Command::Exists { keys: keys(rng) },
    }
}

/// Runs `operations` operations from one session: mostly commands on its own keys, checked
/// later against a model, plus INCRs of the shared counter and compare-and-set attempts on the
/// shared chain, which conflict with every other session. `progress` counts completed
/// operations across sessions.
pub async fn run_session(
    client: Client,
    session: usize,
    seed: u64,
    operations: usize,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<SessionHistory, String> {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed ^ (session as u64).wrapping_mul(0x9e37_79b9));
    let mut kv = KvClient::new(client.session());
    let mut model = Model::default();
    let mut history = SessionHistory {
        session,
        ..SessionHistory::default()
    };
    let failed =
        |what: &str, error: ClientError| format!("session {session}: {what} failed: {error}");
    for serial in 0..operations {
        match rng.gen_range(0..100) {
            0..=14 => {
                let increment = Command::Incr {
                    key: COUNTER_KEY.to_vec(),
                    delta: 1,
                };
                let value = match timed(&mut kv, increment, &mut history.timeline)
                    .await
                    .map_err(|error| failed("INCR counter", error))?
                {
                    Response::Integer(value) => value,
                    other => return Err(format!("session {session}: INCR answered {other:?}")),
                };
                history.counter_values.push(value);
            }
            15..=19 => {
                let read = Command::Get {
                    key: CHAIN_KEY.to_vec(),
                };
                let current = match timed(&mut kv, read, &mut history.timeline)
                    .await
                    .map_err(|error| failed("GET chain", error))?
                {
                    Response::Value(value) => value,
                    other => return Err(format!("session {session}: GET answered {other:?}")),
                };
                history.chain_reads.push(current.clone());
                let new = format!("link s{session} #{serial}").into_bytes();
                let command = Command::CompareAndSet {
                    key: CHAIN_KEY.to_vec(),
                    expected: current.clone(),
                    new: Some(new.clone()),
                };
                let outcome = timed(&mut kv, command, &mut history.timeline)
                    .await
                    .map_err(|error| failed("CAS chain", error))?;
                history.chain.push((current, new, outcome));
            }
            _ => {
                let command = private_command(&mut rng, &model, session, serial);
                // The model only steers the workload here (which compare-and-sets should
                // succeed); `check_histories` compares every result afterwards.
                model.apply(&command);
                let response = timed(&mut kv, command.clone(), &mut history.timeline)
                    .await
                    .map_err(|error| failed(&format!("{command:?}"), error))?;
                history.private.push((command, response));
            }
        }
        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(history)
}

/// Checks every session's private history against a fresh sequential model, the shared
/// counter and chain against their invariants, and the final state of every key (read with
/// `reader`) against the models. Returns the total number of operations checked.
pub async fn check_histories(histories: &[SessionHistory], reader: &mut KvClient) -> usize {
    let mut total = 0;
    for history in histories {
        total += history.operations();
        let mut model = Model::default();
        for (index, (command, response)) in history.private.iter().enumerate() {
            let expected = model.apply(command);
            assert_eq!(
                response, &expected,
                "session {} operation {index} ({command:?}) returned {response:?}, the model says {expected:?}",
                history.session
            );
        }
        let keys = session_keys(history.session);
        let stored = reader
            .mget(keys.clone())
            .await
            .expect("read the final state");
        let modelled: Vec<Option<Vec<u8>>> = keys.iter().map(|key| model.value(key)).collect();
        assert_eq!(
            stored, modelled,
            "final state of session {}'s keys",
            history.session
        );
    }
    check_counter(histories, reader).await;
    check_chain(histories, reader).await;
    total
}

async fn check_counter(histories: &[SessionHistory], reader: &mut KvClient) {
    let mut values: Vec<i64> = histories
        .iter()
        .flat_map(|history| history.counter_values.iter().copied())
        .collect();
    values.sort_unstable();
    let count = values.len() as i64;
    // INCRs by 1 from 0 that each executed exactly once return exactly 1..=count.
    assert!(
        values.iter().copied().eq(1..=count),
        "shared counter values are not 1..={count}: {values:?}"
    );
    let stored = reader
        .get(COUNTER_KEY.to_vec())
        .await
        .expect("read counter");
    let expected = (count > 0).then(|| count.to_string().into_bytes());
    assert_eq!(stored, expected, "final counter after {count} INCRs");
}

/// Every successful compare-and-set on the chain must extend the previous one: the successes
/// form one path from "absent" to the final value, and every value anyone read is on it.
async fn check_chain(histories: &[SessionHistory], reader: &mut KvClient) {
    let mut next: BTreeMap<Option<Vec<u8>>, Vec<u8>> = BTreeMap::new();
    let mut written = BTreeSet::new();
    for history in histories {
        for (expected, new, outcome) in &history.chain {
            match outcome {
                Response::CompareAndSet {
                    swapped: true,
                    current,
                } => {
                    assert_eq!(current.as_ref(), Some(new), "a swap reports the new value");
                    if let Some(other) = next.insert(expected.clone(), new.clone()) {
                        panic!(
                            "two compare-and-sets both swapped from {expected:?}: to {other:?} and {new:?}"
                        );
                    }
                    written.insert(new.clone());
                }
                Response::CompareAndSet {
                    swapped: false,
                    current,
                } => assert_ne!(current, expected, "a failed swap saw a different value"),
                other => panic!("compare-and-set answered {other:?}"),
            }
        }
    }
    let mut position = None;
    let mut steps = 0;
    while let Some(following) = next.get(&position) {
        position = Some(following.clone());
        steps += 1;
        assert!(steps <= next.len(), "the chain has a cycle");
    }
    assert_eq!(steps, next.len(), "successful swaps do not form one chain");
    let stored = reader.get(CHAIN_KEY.to_vec()).await.expect("read chain");
    assert_eq!(stored, position, "the chain ends at the stored value");
    for history in histories {
        let seen = history
            .chain_reads
            .iter()
            .chain(
                history
                    .chain
                    .iter()
                    .filter_map(|(_, _, outcome)| match outcome {
                        Response::CompareAndSet { current, .. } => Some(current),
                        _ => None,
                    }),
            );
        for value in seen.flatten() {
            assert!(
                written.contains(value),
                "session {} saw {value:?}, which no successful swap wrote",
                history.session
            );
        }
    }
}

/// Checks the sessions' operations, together, for linearizability with the simulator's
/// checker (Wing–Gong search per key partition); panics with the violation it proves. Returns
/// how many operations it placed. An inconclusive search (budget exhausted) is reported but
/// does not fail: it is not evidence of a bug.
pub fn check_linearizable(histories: &[SessionHistory]) -> usize {
    use tessera_sim::linearizability::{check_history, Outcome};
    use tessera_sim::workload::Operation;
    let operations: Vec<Operation> = histories
        .iter()
        .flat_map(|history| {
            history
                .timeline
                .iter()
                .enumerate()
                .map(|(index, timed)| Operation {
                    client: tessera_types::ClientId::new(0, history.session as u32),
                    request_number: index as u64 + 1,
                    command: timed.command.clone(),
                    invoke_ms: timed.invoked_us,
                    completion: Some((timed.completed_us, timed.response.clone())),
                })
        })
        .collect();
    match check_history(&operations) {
        Ok(Outcome::Linearizable(_)) => {}
        Ok(Outcome::Inconclusive { undecided_keys, .. }) => {
            eprintln!("linearizability: inconclusive for {undecided_keys:?}")
        }
        Err(violation) => panic!("the client history is not linearizable:\n{violation}"),
    }
    operations.len()
}

/// Runs `sessions` concurrent sessions (spread over `clients`) of `operations` each; returns
/// their histories, or the first failure.
pub async fn run_workload(
    clients: &[Client],
    sessions: usize,
    operations: usize,
    seed: u64,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<SessionHistory> {
    let tasks: Vec<_> = (0..sessions)
        .map(|session| {
            let client = clients[session % clients.len()].clone();
            tokio::spawn(run_session(
                client,
                session,
                seed,
                operations,
                progress.clone(),
            ))
        })
        .collect();
    let mut histories = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(history)) => histories.push(history),
            Ok(Err(message)) => panic!("{message}"),
            Err(error) => panic!("a session task failed: {error}"),
        }
    }
    histories
}

/// A seed for this run: `TESSERA_TEST_SEED` if set, otherwise from the clock. Printed so a
/// failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("TESSERA_TEST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("workload seed {seed} (set TESSERA_TEST_SEED to replay)");
    seed
}

/// Runs `body` on a fresh multi-threaded runtime, failing if it takes longer than `limit`.
pub fn run_bounded<F: std::future::Future<Output = ()>>(limit: Duration, body: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a runtime");
    runtime.block_on(async {
        if tokio::time::timeout(limit, body).await.is_err() {
            panic!("the test did not finish within {limit:?}");
        }
    });
    // Connection tasks of dropped clients must not keep the test alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------------
// The CLI as a user runs it

/// Runs `tessera kv --dir DIR ARGUMENTS...` and returns what it printed, trimmed; panics with
/// its stderr if it failed.
/// Prints the tail of every log under `dir/logs` (for a failing test's output).
pub fn print_logs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("logs")) {
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(3000)..];
            eprintln!("--- {}\n{tail}", entry.path().display());
        }
    }
}

/// Starts the cluster in `dir` and waits until every replica serves; prints every log and
/// panics if that takes more than 30 s.
pub fn start_ready(dir: &Path) -> LocalCluster {
    let mut local = LocalCluster::start(dir, Path::new(BINARY)).expect("start");
    if let Err(error) = local.wait_ready(Duration::from_secs(30)) {
        print_logs(dir);
        panic!("cluster in {} not ready: {error:#}", dir.display());
    }
    local
}

/// Waits up to 30 s for replica `id` to exit (a start it must refuse); returns its status, or
/// panics saying that it did not `refuse`.
pub fn wait_for_exit(local: &mut LocalCluster, id: u32, refuse: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((_, status)) = local
            .poll_exits()
            .into_iter()
            .find(|(exited, _)| *exited == id)
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "replica {id} did not refuse {refuse}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes a cluster with `tessera init --usig <usig> --base-port <port>` into `dir`.
pub fn init_cluster(dir: &Path, usig: &str, port: u16) {
    let written = std::process::Command::new(BINARY)
        .args([
            "init",
            "--usig",
            usig,
            "--base-port",
            &port.to_string(),
            "--dir",
        ])
        .arg(dir)
        .output()
        .expect("run tessera init");
    assert!(
        written.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&written.stderr)
    );
}

/// Runs `tessera kv` until it succeeds or `timeout` passes (a request may need a view change or
/// a replica's catch-up first); returns its output, or prints every log and panics.
pub fn kv_eventually(dir: &Path, arguments: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let output = std::process::Command::new(BINARY)
            .args(["kv", "--timeout", "5s", "--dir"])
            .arg(dir)
            .args(arguments)
            .output()
            .expect("run tessera kv");
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        if Instant::now() > deadline {
            print_logs(dir);
            panic!(
                "tessera kv {arguments:?} did not succeed within {timeout:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn tessera_kv(dir: &Path, arguments: &[&str]) -> String {
    let output = std::process::Command::new(BINARY)
        .args(["kv", "--dir"])
        .arg(dir)
        .args(arguments)
        .output()
        .expect("run tessera kv");
    assert!(
        output.status.success(),
        "tessera kv {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Reads `tessera up`'s output lines until it says it is ready ("Press Ctrl-C"), collecting the
/// replica pids it prints into `pids`; panics with what it printed after `timeout`.
pub fn read_up_until_ready(
    lines: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
    pids: &mut Vec<i32>,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut printed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("`up` never said it was ready; output: {printed:#?}"));
        if let Some(pid) = line
            .split_once(" pid ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
        {
            pids.push(pid);
        }
        let ready = line.contains("Press Ctrl-C");
        printed.push(line);
        if ready {
            return printed;
        }
    }
}
