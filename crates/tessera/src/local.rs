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
use tessera_types::cluster::{ClusterConfig, ReplicaSecrets, UsigKind};

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
    /// Extra arguments for every `tessera replica` (tests and benchmarks).
    replica_arguments: Vec<String>,
    cluster: ClusterConfig,
    children: Vec<Option<Child>>,
    usigs: UsigProcesses,
}

impl LocalCluster {
    /// Reads `dir/cluster.toml` and starts one `<binary> replica` process per replica.
    pub fn start(dir: &Path, binary: &Path) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_with(dir, binary, Vec::new())
    }

    /// Like [`LocalCluster::start`], passing `replica_arguments` to every replica (also when
    /// one is restarted).
    pub fn start_with(
        dir: &Path,
        binary: &Path,
        replica_arguments: Vec<String>,
    ) -> anyhow::Result<LocalCluster> {
        let mut cluster = read_cluster(dir)?;
        refuse_ports_in_use(&cluster)?;
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.join("logs").display()))?;
        // usigd daemons or swtpms first: the replicas connect to them at start.
        let usigs = UsigProcesses::start(dir, binary, &mut cluster)?;
        let mut local = LocalCluster {
            dir: dir.to_path_buf(),
            binary: binary.to_path_buf(),
            replica_arguments,
            children: (0..cluster.replicas.len()).map(|_| None).collect(),
            cluster,
            usigs,
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

    /// Restarts replica `id` (killing it first if it is running) with `extra` arguments after
    /// the cluster's own, for this start only.
    pub fn restart_replica_with(&mut self, id: u32, extra: &[String]) -> anyhow::Result<()> {
        self.kill_replica(id)?;
        self.spawn_with(id, extra)
    }

    fn spawn(&mut self, id: u32) -> anyhow::Result<()> {
        self.spawn_with(id, &[])
    }

    fn spawn_with(&mut self, id: u32, extra: &[String]) -> anyhow::Result<()> {
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
            .args(&self.replica_arguments)
            .args(extra)
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
        self.usigs.stop();
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
        let metrics = Some(&replica.metrics_address).filter(|address| !address.is_empty());
        let addresses = [&replica.client_address, &replica.replica_address]
            .into_iter()
            .chain(metrics);
        for address in addresses {
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

/// Where replica `id` of the cluster in `dir` keeps its write-ahead log by default.
pub fn wal_path(dir: &Path, id: u32) -> PathBuf {
    dir.join("data").join(format!("replica-{id}.wal"))
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

// ---------------------------------------------------------------------------------------------
// USIGs outside the replica process: one usigd daemon or one swtpm per replica.

/// swtpm of replica `id` serves on this port (and the next for control).
pub fn tpm_port(base_port: u16, id: u32) -> anyhow::Result<u16> {
    let port = u32::from(base_port) + 200 + 2 * id;
    u16::try_from(port)
        .ok()
        .filter(|port| *port < u16::MAX)
        .with_context(|| {
            format!("swtpm port {port} of replica {id} is out of range; lower --base-port")
        })
}

fn usigd_key_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("usigd-{id}.key"))
}

fn usigd_counter_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("usigd-{id}.counter"))
}

/// Writes a fresh usigd seed for replica `id` (mode 0600 before any byte) and returns its hex
/// public key.
fn write_usigd_key(dir: &Path, id: u32) -> anyhow::Result<String> {
    use rand::RngCore;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let path = usigd_key_path(dir, id);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(hex::encode(seed).as_bytes())?;
    file.sync_all()?;
    Ok(hex::encode(
        tessera_crypto::SigningKey::from_seed(&seed)
            .verifying_key()
            .to_bytes(),
    ))
}

/// At `init`: says where each replica reaches a usigd or TPM USIG, and writes usigd keys.
pub fn place_external_usigs(
    dir: &Path,
    base_port: u16,
    files: &mut tessera_node::setup::ClusterFiles,
) -> anyhow::Result<()> {
    for (id, secrets) in files.replicas.iter_mut().enumerate() {
        let id = id as u32;
        match files.cluster.usig {
            UsigKind::Hmac | UsigKind::Ed25519 => {}
            UsigKind::Usigd => {
                secrets.usig_endpoint = dir.join(format!("usigd-{id}.sock")).display().to_string();
                files.cluster.replicas[id as usize].usig_public_key = write_usigd_key(dir, id)?;
                let _ = std::fs::remove_file(usigd_counter_path(dir, id));
            }
            UsigKind::Tpm => {
                secrets.usig_endpoint = format!("swtpm:127.0.0.1:{}", tpm_port(base_port, id)?);
            }
        }
    }
    Ok(())
}

/// The usigd or swtpm processes of a local cluster.
#[derive(Default)]
struct UsigProcesses {
    daemons: Vec<Child>,
    tpms: Vec<tessera_tpm::Swtpm>,
}

impl UsigProcesses {
    /// Starts what `cluster.usig` needs, and enrols it in `dir/cluster.toml`: each usigd gets a
    /// fresh key and counter (replicas start with empty state, so their USIGs start fresh too,
    /// and a new key means no counter value is ever reused under one key); each swtpm is
    /// provisioned (idempotent) and enrolled at its current counter value.
    fn start(
        dir: &Path,
        binary: &Path,
        cluster: &mut ClusterConfig,
    ) -> anyhow::Result<UsigProcesses> {
        let mut processes = UsigProcesses::default();
        if matches!(cluster.usig, UsigKind::Hmac | UsigKind::Ed25519) {
            return Ok(processes);
        }
        let endpoints = (0..cluster.replicas.len() as u32)
            .map(|id| read_usig_endpoint(dir, id, cluster))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (id, endpoint) in endpoints.iter().enumerate() {
            let id = id as u32;
            match cluster.usig {
                UsigKind::Usigd => {
                    std::fs::remove_file(usigd_counter_path(dir, id)).or_else(|error| {
                        if error.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(error)
                        }
                    })?;
                    cluster.replicas[id as usize].usig_public_key = write_usigd_key(dir, id)?;
                }
                UsigKind::Tpm => {
                    let location: tessera_tpm::TpmLocation =
                        endpoint.parse().map_err(anyhow::Error::msg)?;
                    let tessera_tpm::TpmTarget::Swtpm(address) = location.target else {
                        bail!("replica {id}: `tessera up` starts swtpm only; usig_endpoint is {endpoint}");
                    };
                    let swtpm =
                        tessera_tpm::Swtpm::start(&dir.join(format!("tpm-{id}")), address.port())
                            .with_context(|| format!("cannot start swtpm for replica {id}"))?;
                    let enrollment = tessera_tpm::provision(
                        &swtpm.target(),
                        tessera_tpm::DEFAULT_NV_INDEX,
                        location.ak_handle,
                    )
                    .with_context(|| format!("cannot provision the swtpm of replica {id}"))?;
                    cluster.replicas[id as usize].usig_public_key = enrollment.to_text();
                    processes.tpms.push(swtpm);
                }
                UsigKind::Hmac | UsigKind::Ed25519 => {}
            }
        }
        let path = dir.join("cluster.toml");
        std::fs::write(&path, cluster.to_toml())
            .with_context(|| format!("cannot write {}", path.display()))?;
        if cluster.usig == UsigKind::Usigd {
            for (id, socket) in endpoints.iter().enumerate() {
                let child =
                    processes.spawn_usigd(dir, binary, cluster, id as u32, Path::new(socket))?;
                processes.daemons.push(child);
            }
            for (id, socket) in endpoints.iter().enumerate() {
                wait_for_socket(Path::new(socket), id as u32)?;
            }
        }
        Ok(processes)
    }

    fn spawn_usigd(
        &self,
        dir: &Path,
        binary: &Path,
        cluster: &ClusterConfig,
        id: u32,
        socket: &Path,
    ) -> anyhow::Result<Child> {
        let log_path = dir.join("logs").join(format!("usigd-{id}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("usigd")
            .arg("--socket")
            .arg(socket)
            .arg("--key-file")
            .arg(usigd_key_path(dir, id))
            .arg("--counter-file")
            .arg(usigd_counter_path(dir, id))
            .arg("--replica")
            .arg(id.to_string());
        for replica in &cluster.replicas {
            command.arg("--public-key").arg(&replica.usig_public_key);
        }
        command
            .stdin(Stdio::null())
            .process_group(0)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start usigd for replica {id}"))
    }

    /// Stops the daemons (their counters are already durable) and shuts each swtpm down
    /// gracefully, which keeps its counter exactly.
    fn stop(&mut self) {
        for mut daemon in self.daemons.drain(..) {
            terminate(&daemon);
            let _ = daemon.wait();
        }
        for (id, swtpm) in self.tpms.drain(..).enumerate() {
            if let Err(error) = swtpm.stop() {
                eprintln!("swtpm of replica {id} did not stop gracefully: {error}");
            }
        }
    }
}

impl Drop for UsigProcesses {
    fn drop(&mut self) {
        for mut daemon in self.daemons.drain(..) {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // Dropping each Swtpm kills it.
    }
}

fn read_usig_endpoint(dir: &Path, id: u32, cluster: &ClusterConfig) -> anyhow::Result<String> {
    let path = dir.join(format!("replica-{id}.secret.toml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let secrets = ReplicaSecrets::from_toml(&text, cluster)
        .with_context(|| format!("invalid {}", path.display()))?;
    Ok(secrets.usig_endpoint)
}

fn wait_for_socket(socket: &Path, id: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() >= deadline {
            bail!(
                "usigd of replica {id} did not open {} within 10 s",
                socket.display()
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}
