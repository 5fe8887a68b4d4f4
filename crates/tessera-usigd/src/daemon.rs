//! The daemon: owns the Ed25519 signing seed and the counter, serves one allowed uid.
//!
//! Each connection gets a thread (at most [`CONNECTIONS_MAX`] at once); the signing state sits
//! behind one mutex, so `create_ui` and `start_epoch` calls are serialised; each `create_ui`
//! persists its counter value (write + fdatasync) before signing, and each `start_epoch`
//! persists the new epoch before answering, so a kill -9 at any moment never lets an old
//! epoch's UI be signed again nor an (epoch, counter) pair be reused. Certificates use the in-process Ed25519 backend's format,
//! so peers verify them with the same pure code.
//!
//! Access control is the peer's uid from SO_PEERCRED, which the kernel fills in and the peer
//! cannot forge; the socket file is left connectable by anyone (0666) so the daemon and the
//! replica can run under different users without sharing a group, and the uid check decides.

use crate::store::{CounterStore, StoreError};
use crate::wire::{self, ErrorCode, FrameError, Request, Response};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::{Ed25519Usig, Usig, UsigError, UsigIdentity};
use thiserror::Error;

/// Connections served at once; more are refused, so a caller cannot exhaust threads.
pub const CONNECTIONS_MAX: usize = 16;

/// A connection idle this long mid-frame or between frames is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What the daemon needs to start.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where to listen.
    pub socket_path: PathBuf,
    /// Hex Ed25519 seed of this replica's USIG; must not be readable by group or others.
    pub key_file: PathBuf,
    /// The durable epoch and counter (created at `identity.epoch`, counter 0, if missing).
    pub counter_file: PathBuf,
    /// The replica served, and the lowest epoch served: a new counter file starts in
    /// `identity.epoch`, a file in a lower epoch is moved up to it (durably, counter 0) at
    /// start, and a file already in a higher epoch keeps its own.
    pub identity: UsigIdentity,
    /// Ed25519 USIG public keys of every replica (index = replica id), for VerifyUi.
    pub public_keys: Vec<[u8; 32]>,
    /// The only uid allowed to connect (the replica's).
    pub allowed_uid: u32,
    /// Counter values reserved per write of the counter file (1: every value is written and
    /// synced before its UI is signed). With N > 1 the file holds an upper bound N values
    /// ahead, so one fdatasync covers N UIs, and a restart after a crash skips up to N-1 values.
    pub reserve_ahead: u64,
}

/// Largest `reserve_ahead` accepted: the gap a crash may leave stays small.
pub const RESERVE_AHEAD_MAX: u64 = 1 << 16;

/// The daemon cannot start or serve.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The key file is missing, malformed or too open.
    #[error("key file {path}: {problem}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The counter file cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key does not match the configured public key, or another USIG setup problem.
    #[error("USIG setup: {0}")]
    Usig(#[from] UsigError),
    /// Binding or accepting failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Reads a hex 32-byte seed from `path`, refusing a file group or others may read.
pub fn read_key_file(path: &Path) -> Result<[u8; 32], DaemonError> {
    let problem = |problem: String| DaemonError::KeyFile {
        path: path.to_path_buf(),
        problem,
    };
    let metadata = std::fs::metadata(path).map_err(|error| problem(error.to_string()))?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(problem(format!(
            "mode {:o} lets group or others read the USIG key; run `chmod 600` on it and make \
             it owned by the usigd user",
            mode & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|error| problem(error.to_string()))?;
    let bytes = hex::decode(text.trim())
        .map_err(|error| problem(format!("not hex ({error}); expected 64 hex digits")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| problem(format!("{} bytes, expected 32", bytes.len())))
}

/// The signing state: the only place UIs are made.
struct Signer {
    usig: Ed25519Usig,
    store: CounterStore,
    public_key: [u8; 32],
    reserve_ahead: u64,
}

impl Signer {
    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        let next = self
            .usig
            .last_counter()
            .checked_add(1)
            .ok_or(UsigError::Exhausted)?;
        // Persist first: if we crash after this, `next` (and any value reserved with it) is
        // burnt (a gap), never reissued.
        if next > self.store.last() {
            let bound = next.saturating_add(self.reserve_ahead - 1);
            self.store
                .persist(bound)
                .map_err(|error| UsigError::Unavailable(error.to_string()))?;
        }
        debug_assert!(
            next <= self.store.last(),
            "signing beyond the persisted bound"
        );
        let ui = self.usig.create_ui(message)?;
        assert_eq!(ui.counter, next, "signer and store disagree on the counter");
        assert_eq!(
            ui.epoch,
            self.store.epoch(),
            "signer and store disagree on the epoch"
        );
        Ok(ui)
    }

    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        let epoch = self
            .store
            .epoch()
            .checked_add(1)
            .ok_or(UsigError::Exhausted)?;
        // Persist first: once the new epoch is on disk the old one is closed for good, even if
        // we crash before answering (the client then finds the new epoch on reconnect).
        self.store
            .start_epoch(epoch)
            .map_err(|error| UsigError::Unavailable(error.to_string()))?;
        let started = self.usig.start_epoch()?;
        assert_eq!(started, epoch, "signer and store disagree on the epoch");
        tracing::info!(epoch, "usigd started a new USIG epoch");
        Ok(epoch)
    }

    fn answer(&mut self, request: Request) -> Response {
        match request {
            Request::Identity => {
                let identity = self.usig.identity();
                Response::Identity {
                    replica: identity.replica.0,
                    epoch: identity.epoch,
                    last_counter: self.usig.last_counter(),
                    public_key: self.public_key,
                }
            }
            Request::CreateUi { message } => match self.create_ui(&message) {
                Ok(ui) => Response::Ui(ui),
                Err(error) => error_response(&error),
            },
            Request::StartEpoch => match self.start_epoch() {
                Ok(epoch) => Response::EpochStarted { epoch },
                Err(error) => error_response(&error),
            },
            Request::VerifyUi {
                signer,
                message,
                ui,
            } => match self.usig.verify_ui(ReplicaId(signer), &message, &ui) {
                Ok(()) => Response::Verified,
                Err(error) => error_response(&error),
            },
        }
    }
}

fn error_response(error: &UsigError) -> Response {
    let code = match error {
        UsigError::Invalid { .. } => ErrorCode::Invalid,
        UsigError::UnknownSigner(_) => ErrorCode::UnknownSigner,
        UsigError::Exhausted => ErrorCode::Exhausted,
        UsigError::Unavailable(_) => ErrorCode::Unavailable,
    };
    Response::error(code, &error.to_string())
}

/// A bound daemon, ready to serve.
pub struct Daemon {
    listener: UnixListener,
    socket_path: PathBuf,
    signer: Arc<Mutex<Signer>>,
    allowed_uid: u32,
    connections: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Daemon")
            .field("socket_path", &self.socket_path)
            .field("allowed_uid", &self.allowed_uid)
            .finish()
    }
}

impl Daemon {
    /// Loads the key and counter and binds the socket (replacing a stale socket file, but never
    /// another kind of file).
    pub fn bind(config: &DaemonConfig) -> Result<Daemon, DaemonError> {
        if !(1..=RESERVE_AHEAD_MAX).contains(&config.reserve_ahead) {
            return Err(DaemonError::Usig(UsigError::Unavailable(format!(
                "reserve_ahead is {} but must be between 1 and {RESERVE_AHEAD_MAX}",
                config.reserve_ahead
            ))));
        }
        let seed = read_key_file(&config.key_file)?;
        let mut store = CounterStore::open(
            &config.counter_file,
            config.identity.replica,
            config.identity.epoch,
        )?;
        if store.epoch() < config.identity.epoch {
            tracing::info!(
                from = store.epoch(),
                to = config.identity.epoch,
                "usigd moves the counter file up to the configured lowest epoch"
            );
            store.start_epoch(config.identity.epoch)?;
        }
        let served = UsigIdentity {
            replica: config.identity.replica,
            epoch: store.epoch(),
        };
        let usig = Ed25519Usig::resume(served, seed, config.public_keys.clone(), store.last())?;
        let public_key = config.public_keys[config.identity.replica.0 as usize];
        let socket_error = |source| DaemonError::Socket {
            path: config.socket_path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&config.socket_path) {
            Ok(metadata) if metadata.file_type().is_socket() => {
                std::fs::remove_file(&config.socket_path).map_err(socket_error)?;
            }
            Ok(_) => {
                return Err(socket_error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; refusing to replace it",
                )))
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(socket_error(error)),
        }
        let listener = UnixListener::bind(&config.socket_path).map_err(socket_error)?;
        std::fs::set_permissions(&config.socket_path, std::fs::Permissions::from_mode(0o666))
            .map_err(socket_error)?;
        tracing::info!(
            socket = %config.socket_path.display(),
            replica = config.identity.replica.0,
            epoch = store.epoch(),
            last_counter = store.last(),
            allowed_uid = config.allowed_uid,
            "usigd listening"
        );
        Ok(Daemon {
            listener,
            socket_path: config.socket_path.clone(),
            signer: Arc::new(Mutex::new(Signer {
                usig,
                store,
                public_key,
                reserve_ahead: config.reserve_ahead,
            })),
            allowed_uid: config.allowed_uid,
            connections: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Serves until `stop` is set (checked after each accepted connection; [`DaemonHandle`]
    /// wakes the accept loop by connecting once).
    pub fn serve(self, stop: &AtomicBool) -> Result<(), DaemonError> {
        for stream in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "usigd accept failed");
                    continue;
                }
            };
            self.admit(stream);
        }
        Ok(())
    }

    fn admit(&self, mut stream: UnixStream) {
        let uid = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(credentials) => credentials.uid.as_raw(),
            Err(error) => {
                tracing::warn!(%error, "usigd cannot read peer credentials; closing");
                return;
            }
        };
        if uid != self.allowed_uid {
            tracing::warn!(uid, allowed = self.allowed_uid, "usigd refused a peer");
            let text = format!(
                "uid {uid} may not use this usigd (only uid {} may)",
                self.allowed_uid
            );
            let _ = wire::write_frame(
                &mut stream,
                &Response::error(ErrorCode::PermissionDenied, &text).encode(),
            );
            return;
        }
        if self.connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            let text = format!("usigd serves at most {CONNECTIONS_MAX} connections");
            let _ = wire::write_frame(
                &mut stream,
                &Response::error(ErrorCode::Unavailable, &text).encode(),
            );
            return;
        }
        let signer = Arc::clone(&self.signer);
        let connections = Arc::clone(&self.connections);
        thread::spawn(move || {
            serve_connection(stream, &signer);
            connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn serve_connection(mut stream: UnixStream, signer: &Mutex<Signer>) {
    if let Err(error) = stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IDLE_TIMEOUT)))
    {
        tracing::warn!(%error, "usigd cannot set socket timeouts; closing");
        return;
    }
    loop {
        let response = match wire::read_frame(&mut stream) {
            Ok(body) => match Request::decode(&body) {
                Ok(request) => match signer.lock() {
                    Ok(mut signer) => signer.answer(request),
                    // A panic while signing must not let later calls reuse its state.
                    Err(_) => Response::error(ErrorCode::Unavailable, "usigd state poisoned"),
                },
                Err(error) => Response::error(ErrorCode::BadRequest, &error.to_string()),
            },
            Err(FrameError::Closed) => return,
            Err(FrameError::Wire(error)) => {
                // The stream is out of step (we did not read the announced body): answer, close.
                let _ = wire::write_frame(
                    &mut stream,
                    &Response::error(ErrorCode::BadRequest, &error.to_string()).encode(),
                );
                return;
            }
            Err(FrameError::Io(error)) => {
                tracing::debug!(%error, "usigd connection ended");
                return;
            }
        };
        if wire::write_frame(&mut stream, &response.encode()).is_err() {
            return;
        }
    }
}

/// A daemon serving on its own thread (tests, benchmarks, `tessera up`); dropping the handle
/// stops it.
pub struct DaemonHandle {
    socket_path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl std::fmt::Debug for DaemonHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DaemonHandle")
            .field("socket_path", &self.socket_path)
            .finish()
    }
}

impl DaemonHandle {
    /// Binds and starts serving on a new thread.
    pub fn spawn(config: &DaemonConfig) -> Result<DaemonHandle, DaemonError> {
        let daemon = Daemon::bind(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_for_thread = Arc::clone(&stop);
        let thread = thread::spawn(move || daemon.serve(&stop_for_thread));
        Ok(DaemonHandle {
            socket_path: config.socket_path.clone(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; if the connect fails the listener is already gone.
        if let Ok(mut stream) = UnixStream::connect(&self.socket_path) {
            let _ = stream.flush();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}
