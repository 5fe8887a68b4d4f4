//! Tessera's protocol cores, sans IO.
//!
//! A core is a deterministic state machine: inputs are `handle_*` calls carrying the current
//! logical time in milliseconds; outputs are [`Action`]s the driver drains with
//! [`minbft::Replica::take_actions`] and carries out in order (send, reply, arm or cancel timers).
//! Cores never read the clock, touch sockets or files, or draw randomness, so the same core runs
//! under the tokio driver (`tessera-node`) and under the deterministic simulator.

#![forbid(unsafe_code)]

pub mod auth;
pub mod envelope;
pub mod minbft;
#[cfg(feature = "planted-bugs")]
pub mod planted;
pub mod reply;

pub use auth::RequestAuthenticator;
pub use envelope::Envelope;
pub use minbft::{Action, Replica, Timer};
#[cfg(feature = "planted-bugs")]
pub use planted::PlantedBug;
pub use reply::{ReplyCollector, ReplyOutcome};
