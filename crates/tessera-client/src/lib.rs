//! Tessera's Rust client.
//!
//! A [`Client`] holds one TCP connection per replica (re-established with backoff when one
//! drops) and is shared by many [`Session`]s. A session is one logical client of the replicated
//! service — its own `ClientId` and request numbering, one request in flight — so a process
//! runs as many concurrent requests as it opens sessions.
//!
//! For each request the session signs it (Ed25519) and adds one MAC per replica, sends it to the
//! replica it believes is primary, and waits until f+1 replicas return matching authenticated
//! replies (paper 004 §4; [`tessera_core::ReplyCollector`]). A reply whose MAC fails is dropped
//! and counted ([`ClientStats`]). Without a quorum within the retransmission timeout, the request
//! goes to every replica, so a dead primary or a view change costs one timeout, not the request.
//!
//! ```no_run
//! # async fn example(cluster: tessera_types::cluster::ClusterConfig,
//! #                  secrets: tessera_types::cluster::ClientSecrets) -> Result<(), tessera_client::ClientError> {
//! use tessera_client::{Client, ClientOptions, KvClient};
//! let client = Client::connect(cluster, secrets, ClientOptions::default()).await?;
//! let mut kv = KvClient::new(client.session());
//! kv.set("greeting", "hello").await?;
//! assert_eq!(kv.get("greeting").await?, Some(b"hello".to_vec()));
//! # Ok(()) }
//! ```
//!
//! This crate owns the client side of the client port protocol (`tessera_types::wire`). It must
//! never trust a reply it cannot authenticate, never accept a result fewer than f+1 replicas
//! vouch for, and never block a session on a slow or dead replica.

#![forbid(unsafe_code)]

mod client;
mod connection;
mod error;
mod kv;
mod options;
mod pending;
pub mod request;
mod shared;

pub use client::{Batcher, Client, Session};
pub use error::ClientError;
pub use kv::{CasOutcome, KvClient};
pub use options::ClientOptions;
pub use shared::ClientStats;
