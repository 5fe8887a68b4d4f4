//! usigd: the USIG in a process of its own (DESIGN §4, paper 004's isolated version).
//!
//! The daemon owns the Ed25519 signing seed and the counter; the replica reaches it over a Unix
//! socket and never holds the key, so a compromised replica process can ask for UIs in order
//! but cannot sign two messages with one counter value. Run under a different user, the key
//! file is out of the replica's reach too (docs/OPERATIONS.md).
//!
//! - [`wire`]: the versioned, length-bounded frame format; decoding untrusted bytes never panics.
//! - [`store`]: the durable epoch and counter, persisted before each UI is signed and before
//!   a new epoch is announced.
//! - [`daemon`]: the server, with the SO_PEERCRED uid check.
//! - [`client`]: [`UsigdClient`], the replica's [`tessera_usig::Usig`] over the socket.
//!
//! Certificates are the in-process Ed25519 backend's, so peers verify them with the same pure
//! code ([`tessera_usig::Ed25519Verifier`]).

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod daemon;
pub mod store;
pub mod wire;

pub use client::UsigdClient;
pub use daemon::{Daemon, DaemonConfig, DaemonError, DaemonHandle};
