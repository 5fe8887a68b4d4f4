//! A cluster of replica processes on this machine, for `tessera up`, benchmarks and tests.
//!
//! Each replica runs as a child process (`<binary> replica --dir D --id I`) whose output goes
//! to `D/logs/replica-<I>.log`. Dropping a [`LocalCluster`] kills every child, so a failing test
//! or an interrupted benchmark never leaves replicas behind.
//!
//! Self-contained on purpose (it uses nothing else from the `tessera` binary), so integration
//! tests can include it with `#[path]`.

#![allow(dead_code)] // Each user (CLI, benchmark, tests) uses a different part.

use anyhow::{bail, Context};
use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tessera_types::cluster::ClusterConfig;

/// How long [`LocalCluster::stop`] waits after SIGTERM before killing.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Poll period while waiting for ports or exits.
const POLL: Duration = Duration::from_millis(50);
/// Timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// Replica processes of one cluster directory.
pub struct LocalCluster {
    dir: PathBuf,
    binary: PathBuf,
    cluster: ClusterConfig,
    children: Vec<Option<Child>>,
}

impl LocalCluster {
    /// Reads `dir/cluster.toml` and starts one `<binary> replica` process per replica.
    pub fn start(dir: &Path, binary: &Path) -> anyhow::Result<LocalCluster> {
        let cluster = read_cluster(dir)?;
        refuse_ports_in_use(&cluster)?;
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.join("logs").display()))?;
        let mut local = LocalCluster {
            dir: dir.to_path_buf(),
            binary: binary.to_path_buf(),
            children: (0..cluster.replicas.len()).map(|_| None).collect(),
            cluster,
        };
        for id in 0..local.children.len() as u32 {
            local.spawn(id)?;
        }
        Ok(local)
    }

    /// The cluster configuration the replicas run.
    pub fn cluster(&self) -> &ClusterConfig {
        &self.cluster
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where replica `id` writes its log.
    pub fn log_path(&self, id: u32) -> PathBuf {
        self.dir.join("logs").join(format!("replica-{id}.log"))
    }

    /// Process id of replica `id`, if it is running.
    pub fn pid(&self, id: u32) -> Option<u32> {
        self.children.get(id as usize)?.as_ref().map(Child::id)
    }

    fn spawn(&mut self, id: u32) -> anyhow::Result<()> {
        let log_path = self.log_path(id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let child = Command::new(&self.binary)
            .arg("replica")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--id")
            .arg(id.to_string())
            .stdin(Stdio::null())
            // Own process group: a terminal's Ctrl-C reaches only the parent, which then stops
            // the replicas in order instead of racing them.
            .process_group(0)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} for replica {id}", self.binary.display()))?;
        self.children[id as usize] = Some(child);
        Ok(())
    }

    /// Waits until every running replica's client port accepts connections.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let addresses = self.client_addresses()?;
        let mut pending: Vec<usize> = (0..addresses.len())
            .filter(|id| self.children[*id].is_some())
            .collect();
        while !pending.is_empty() {
            if let Some((id, status)) = self.poll_exits().into_iter().next() {
                bail!(
                    "replica {id} exited ({status}) before it was ready; see {}",
                    self.log_path(id).display()
                );
            }
            pending
                .retain(|id| TcpStream::connect_timeout(&addresses[*id], PROBE_TIMEOUT).is_err());
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "replicas {pending:?} did not open their client ports within {timeout:?}; see the logs in {}",
                    self.dir.join("logs").display()
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    fn client_addresses(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.cluster
            .replicas
            .iter()
            .map(|replica| {
                replica
                    .client_address
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut addresses| addresses.next())
                    .with_context(|| {
                        format!("cannot resolve client address {}", replica.client_address)
                    })
            })
            .collect()
    }

    /// Replicas that exited since the last call, with their exit status. They are marked as
    /// not running; the others keep running.
    pub fn poll_exits(&mut self) -> Vec<(u32, ExitStatus)> {
        let mut exited = Vec::new();
        for (id, slot) in self.children.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Ok(Some(status)) = child.try_wait() {
                    exited.push((id as u32, status));
                    *slot = None;
                }
            }
        }
        exited
    }

    /// Kills replica `id` at once (SIGKILL, like a crash) and reaps it.
    pub fn kill_replica(&mut self, id: u32) -> anyhow::Result<()> {
        let slot = self.slot(id)?;
        if let Some(mut child) = slot.take() {
            // The child may have exited already; killing a reaped-but-not-waited child fails
            // harmlessly, so only waiting matters.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("cannot reap replica {id}"))?;
        }
        Ok(())
    }

    /// Restarts replica `id` (killing it first if it is running).
    pub fn restart_replica(&mut self, id: u32) -> anyhow::Result<()> {
        self.kill_replica(id)?;
        self.spawn(id)
    }

    fn slot(&mut self, id: u32) -> anyhow::Result<&mut Option<Child>> {
        let count = self.children.len();
        self.children
            .get_mut(id as usize)
            .with_context(|| format!("no replica {id}: the cluster has {count} replicas"))
    }

    /// Stops every replica: SIGTERM, up to 5 s to exit, then SIGKILL.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        for child in self.children.iter().flatten() {
            terminate(child);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            let mut running = false;
            for slot in self.children.iter_mut() {
                if let Some(child) = slot {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => *slot = None,
                        Ok(None) => running = true,
                    }
                }
            }
            if !running || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        for (id, slot) in self.children.iter_mut().enumerate() {
            if let Some(mut child) = slot.take() {
                eprintln!("replica {id} did not stop within {STOP_GRACE:?}; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for slot in self.children.iter_mut() {
            if let Some(mut child) = slot.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Fails if something already answers on a replica's port (typically a cluster started
/// earlier from the same directory), which would otherwise look like a ready replica.
fn refuse_ports_in_use(cluster: &ClusterConfig) -> anyhow::Result<()> {
    for replica in &cluster.replicas {
        for address in [&replica.client_address, &replica.replica_address] {
            let Some(socket) = address
                .to_socket_addrs()
                .ok()
                .and_then(|mut all| all.next())
            else {
                bail!(
                    "cannot resolve {address} (replica {} in cluster.toml)",
                    replica.id
                );
            };
            if TcpStream::connect_timeout(&socket, PROBE_TIMEOUT).is_ok() {
                bail!(
                    "{address} (replica {}) is already in use: is this cluster already running? \
                     Stop it first, or give this cluster other ports with `tessera init --force --base-port`",
                    replica.id
                );
            }
        }
    }
    Ok(())
}

/// Asks a child to shut down gracefully.
fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: `kill` has no memory-safety preconditions; `pid` is our own child, not yet
    // reaped (we hold its `Child`), so the id cannot have been reused by another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Reads and validates `dir/cluster.toml`.
pub fn read_cluster(dir: &Path) -> anyhow::Result<ClusterConfig> {
    let path = dir.join("cluster.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (create a cluster with `tessera init --dir {}`)",
            path.display(),
            dir.display()
        )
    })?;
    ClusterConfig::from_toml(&text).with_context(|| format!("invalid {}", path.display()))
}
