//! Command-line options of the daemon, shared by `tessera usigd` and the `tessera-usigd` binary.

use crate::daemon::{Daemon, DaemonConfig, DaemonError};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use tessera_types::ReplicaId;
use tessera_usig::UsigIdentity;

/// Options of `tessera usigd`.
#[derive(Args, Debug, Clone)]
pub struct UsigdOptions {
    /// Unix socket to listen on (a stale socket file there is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// Hex Ed25519 seed of this replica's USIG (mode 0600, owned by the daemon's user).
    #[arg(long)]
    pub key_file: PathBuf,
    /// Durable epoch and counter file (created in epoch `--epoch` at counter 0 if missing; keep
    /// it with the key).
    #[arg(long)]
    pub counter_file: PathBuf,
    /// Replica id served.
    #[arg(long)]
    pub replica: u32,
    /// Lowest USIG epoch served: a new counter file starts in it, and a file in a lower epoch
    /// is moved up to it at start (counter 1 next). A file already in a higher epoch (reached
    /// through StartEpoch) keeps its own, since an epoch never goes back.
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Hex Ed25519 USIG public key of each replica, in replica order (from cluster.toml's
    /// `usig_public_key`); repeat once per replica.
    #[arg(long = "public-key", required = true)]
    pub public_keys: Vec<String>,
    /// The only uid allowed to connect (the replica's); defaults to the daemon's own uid.
    #[arg(long)]
    pub allowed_uid: Option<u32>,
    /// Counter values reserved per fdatasync of the counter file (1..=65536). 1: every value is
    /// made durable before its UI is signed. N: one sync per N UIs, and a restart after a crash
    /// skips up to N-1 values (a gap, never a reuse).
    #[arg(long, default_value_t = 1)]
    pub reserve_ahead: u64,
}

/// Why the options cannot start a daemon.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A public key is not 64 hex digits.
    #[error("--public-key number {index}: {problem}")]
    PublicKey {
        /// Position among the `--public-key` options (= replica id).
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl UsigdOptions {
    /// The daemon configuration these options describe.
    pub fn config(&self) -> Result<DaemonConfig, CliError> {
        let public_keys = self
            .public_keys
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let bytes = hex::decode(text.trim()).map_err(|error| CliError::PublicKey {
                    index,
                    problem: error.to_string(),
                })?;
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| CliError::PublicKey {
                    index,
                    problem: format!("{} bytes, expected 32", bytes.len()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DaemonConfig {
            socket_path: self.socket.clone(),
            key_file: self.key_file.clone(),
            counter_file: self.counter_file.clone(),
            identity: UsigIdentity {
                replica: ReplicaId(self.replica),
                epoch: self.epoch,
            },
            public_keys,
            allowed_uid: self
                .allowed_uid
                .unwrap_or_else(|| rustix::process::getuid().as_raw()),
            reserve_ahead: self.reserve_ahead,
        })
    }

    /// Binds and serves until the process is killed.
    pub fn run(&self) -> Result<(), CliError> {
        let daemon = Daemon::bind(&self.config()?)?;
        let never = AtomicBool::new(false);
        daemon.serve(&never)?;
        Ok(())
    }
}
