//! Tessera's shared vocabulary: identifiers, protocol messages, their canonical encoding,
//! cluster configuration and the [`StateMachine`] trait replicated services implement.
//!
//! Pure crate: no IO, no clock, no randomness. Everything here is data plus the checks that
//! decide whether data is well-formed; protocol *rules* live in `tessera-core`.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod encoding;
pub mod ids;
pub mod limits;
pub mod merkle;
pub mod messages;
pub mod state_machine;
pub mod wire;

pub use config::{ConfigError, ProtocolConfig, TransferStrategy};
pub use encoding::{decode, decode_prefix, encode, encode_with_capacity, DecodeError};
pub use ids::{ClientId, ReplicaId, SeqNum, View};
pub use messages::*;
pub use state_machine::{Chunk, FrozenState, RestoreError, StagedPartition, StateMachine};
pub use tessera_crypto::Digest;
