//! The replica's side: a [`Usig`] whose `create_ui` asks usigd and whose `verify_ui` runs the
//! pure Ed25519 check locally (verification needs only public keys, and doing it here saves a
//! round trip per message and keeps verifying when the daemon is down).
//!
//! The client follows the daemon's epoch: it takes the daemon's current epoch at connect time
//! (refusing a daemon in an epoch below the one asked for), moves to the epoch the daemon names
//! after `start_epoch`, and refuses any UI or reconnection that names another epoch than the
//! one it is in, so [`Usig::identity`] always reports the epoch its UIs carry.

use crate::wire::{self, ErrorCode, Request, Response, CERTIFICATE_LEN_MAX};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tessera_types::{Digest, ReplicaId, Ui};
use tessera_usig::{Ed25519Verifier, Usig, UsigError, UsigIdentity, ED25519_CERTIFICATE_LEN};

/// How long the client waits for the daemon's answer before reporting it unavailable.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to usigd, checked at connect time to serve the expected identity and key.
pub struct UsigdClient {
    socket_path: PathBuf,
    identity: UsigIdentity,
    own_public_key: [u8; 32],
    stream: Option<UnixStream>,
    verifier: Ed25519Verifier,
}

impl std::fmt::Debug for UsigdClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("UsigdClient")
            .field("socket_path", &self.socket_path)
            .field("identity", &self.identity)
            .field("connected", &self.stream.is_some())
            .finish()
    }
}

fn unavailable(socket_path: &Path, what: impl std::fmt::Display) -> UsigError {
    UsigError::Unavailable(format!("usigd at {}: {what}", socket_path.display()))
}

impl UsigdClient {
    /// Connects to the daemon at `socket_path` and checks that it serves `identity.replica`
    /// with the key `public_keys[identity.replica]`, in `identity.epoch` or a later epoch (a
    /// daemon keeps the epoch it reached across restarts). The client then speaks in the
    /// daemon's epoch, which [`Usig::identity`] reports.
    pub fn connect(
        socket_path: &Path,
        identity: UsigIdentity,
        public_keys: Vec<[u8; 32]>,
    ) -> Result<UsigdClient, UsigError> {
        let own_public_key = *public_keys
            .get(identity.replica.0 as usize)
            .ok_or(UsigError::UnknownSigner(identity.replica))?;
        let verifier = Ed25519Verifier::new(identity, public_keys)?;
        let mut client = UsigdClient {
            socket_path: socket_path.to_path_buf(),
            identity,
            own_public_key,
            stream: None,
            verifier,
        };
        client.ensure_connected(EpochCheck::AtLeast)?;
        Ok(client)
    }

    /// The last counter value the daemon has issued.
    pub fn last_counter(&mut self) -> Result<u64, UsigError> {
        match self.call(&Request::Identity)? {
            Response::Identity { last_counter, .. } => Ok(last_counter),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Asks the daemon (rather than the local verifier) to check a UI.
    pub fn verify_remotely(
        &mut self,
        signer: ReplicaId,
        message: &Digest,
        ui: &Ui,
    ) -> Result<(), UsigError> {
        if ui.certificate.len() > CERTIFICATE_LEN_MAX {
            return Err(UsigError::Invalid {
                replica: signer,
                counter: ui.counter,
                reason: "certificate longer than any usigd certificate",
            });
        }
        let request = Request::VerifyUi {
            signer: signer.0,
            message: *message,
            ui: ui.clone(),
        };
        match self.call(&request)? {
            Response::Verified => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    fn ensure_connected(&mut self, epoch_check: EpochCheck) -> Result<(), UsigError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let stream = UnixStream::connect(&self.socket_path)
            .map_err(|error| unavailable(&self.socket_path, format!("cannot connect: {error}")))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|error| unavailable(&self.socket_path, error))?;
        self.stream = Some(stream);
        match self.call(&Request::Identity)? {
            Response::Identity {
                replica,
                epoch,
                public_key,
                ..
            } => {
                if replica != self.identity.replica.0 || public_key != self.own_public_key {
                    self.stream = None;
                    return Err(unavailable(
                        &self.socket_path,
                        format!(
                            "serves replica {replica} with key {}, but this is replica {} with \
                             key {} in cluster.toml; point the replica at its own usigd",
                            hex::encode(public_key),
                            self.identity.replica.0,
                            hex::encode(self.own_public_key)
                        ),
                    ));
                }
                let acceptable = match epoch_check {
                    EpochCheck::AtLeast => epoch >= self.identity.epoch,
                    EpochCheck::Exactly => epoch == self.identity.epoch,
                };
                if !acceptable {
                    self.stream = None;
                    return Err(unavailable(
                        &self.socket_path,
                        format!(
                            "serves USIG epoch {epoch}, but this client is in epoch {} ({}); \
                             if a start_epoch answer was lost, call start_epoch again, \
                             otherwise check that this is the replica's own counter file",
                            self.identity.epoch,
                            match epoch_check {
                                EpochCheck::AtLeast => "and never goes back",
                                EpochCheck::Exactly => "and does not follow silent changes",
                            }
                        ),
                    ));
                }
                self.identity.epoch = epoch;
                Ok(())
            }
            other => {
                self.stream = None;
                Err(self.unexpected(&other))
            }
        }
    }

    /// One request, one response. Any transport or decoding failure drops the connection (the
    /// stream may be out of step) so the next call reconnects.
    fn call(&mut self, request: &Request) -> Result<Response, UsigError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(unavailable(&self.socket_path, "not connected"));
        };
        // A daemon that refuses the peer answers first and closes, so the write may fail while
        // its answer already waits to be read: read anyway, and report the write error only if
        // there is no answer.
        let written = wire::write_frame(stream, &request.encode());
        let outcome = match (written, wire::read_frame(stream)) {
            (_, Ok(body)) => Response::decode(&body).map_err(|error| error.to_string()),
            (Err(error), Err(_)) => Err(error.to_string()),
            (Ok(()), Err(error)) => Err(error.to_string()),
        };
        match outcome {
            Ok(response) => Ok(response),
            Err(error) => {
                self.stream = None;
                Err(unavailable(&self.socket_path, error))
            }
        }
    }

    fn unexpected(&self, response: &Response) -> UsigError {
        match response {
            Response::Error {
                code: ErrorCode::Exhausted,
                ..
            } => UsigError::Exhausted,
            Response::Error { code, text } => {
                unavailable(&self.socket_path, format!("{code:?}: {text}"))
            }
            other => unavailable(&self.socket_path, format!("unexpected answer {other:?}")),
        }
    }
}

impl Usig for UsigdClient {
    fn identity(&self) -> UsigIdentity {
        self.identity
    }

    fn create_ui(&mut self, message: &Digest) -> Result<Ui, UsigError> {
        self.ensure_connected(EpochCheck::Exactly)?;
        match self.call(&Request::CreateUi { message: *message })? {
            Response::Ui(ui) => {
                // A daemon bug or a swapped daemon must not slip a UI past its own replica.
                if ui.certificate.len() != ED25519_CERTIFICATE_LEN {
                    return Err(unavailable(&self.socket_path, "returned a malformed UI"));
                }
                if ui.epoch != self.identity.epoch {
                    return Err(unavailable(
                        &self.socket_path,
                        format!(
                            "returned a UI of epoch {} while this client is in epoch {}",
                            ui.epoch, self.identity.epoch
                        ),
                    ));
                }
                self.verifier
                    .verify_ui(self.identity.replica, message, &ui)
                    .map_err(|error| unavailable(&self.socket_path, error))?;
                Ok(ui)
            }
            other => Err(self.unexpected(&other)),
        }
    }

    fn start_epoch(&mut self) -> Result<u64, UsigError> {
        // At least, not exactly: if an earlier StartEpoch was persisted but its answer lost,
        // the daemon is already ahead, and asking again moves it further, never back.
        self.ensure_connected(EpochCheck::AtLeast)?;
        match self.call(&Request::StartEpoch)? {
            Response::EpochStarted { epoch } if epoch > self.identity.epoch => {
                self.identity.epoch = epoch;
                Ok(epoch)
            }
            Response::EpochStarted { epoch } => {
                // Never follow a daemon backwards; reconnecting re-reads where it really is.
                self.stream = None;
                Err(unavailable(
                    &self.socket_path,
                    format!(
                        "answered start_epoch with epoch {epoch}, not above this client's epoch \
                         {}",
                        self.identity.epoch
                    ),
                ))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        self.verifier.verify_ui(signer, message, ui)
    }
}

/// What epoch a (re)connection accepts from the daemon.
#[derive(Clone, Copy, Debug)]
enum EpochCheck {
    /// The client's epoch or a later one, which the client adopts: at connect time, and before
    /// starting a new epoch.
    AtLeast,
    /// Exactly the client's epoch: before issuing a UI, so the caller's view of its epoch is
    /// never changed behind its back.
    Exactly,
}
