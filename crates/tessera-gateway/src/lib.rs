//! The RESP gateway: unmodified Redis clients (`redis-cli`, `redis-benchmark`, client
//! libraries) use a Tessera key-value cluster through one TCP port.
//!
//! The gateway is one client of the cluster (`tessera_client`): every command that touches keys
//! — reads included — is ordered by the replicas, and its reply goes back only once f+1
//! replicas returned matching authenticated results (reply synthesis, papers 003 and 004).
//! Commands pipelined on one connection, and commands of many connections, share signed
//! requests (envelopes, [`dispatch`]); each connection still gets its replies in order.
//!
//! - [`resp`]: RESP2/RESP3 decoding and encoding, bounded and panic-free (fuzzed).
//! - [`commands`]: what each Redis command means for Tessera (pure).
//! - [`dispatch`]: groups of commands into envelopes.
//! - [`server`]: the tokio TCP server.
//!
//! The gateway holds a client credential, so it must run where that secret may live; it trusts
//! nothing its connections send, and no single replica's answer.

#![forbid(unsafe_code)]

pub mod commands;
pub mod dispatch;
pub mod resp;
pub mod server;

pub use commands::ClusterInfo;
pub use resp::{Protocol, Reply, RequestDecoder, RespError, RespLimits};
pub use server::{CloseReason, Gateway, GatewayMetrics, GatewayOptions};
