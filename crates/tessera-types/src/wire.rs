//! Client-port wire messages (length-prefixed frames of canonical encoding; see `tessera-node`).

use crate::ids::{ClientId, ReplicaId, SeqNum, View};
use crate::messages::{Reply, Request};
use serde::{Deserialize, Serialize};
use tessera_crypto::{Digest, DigestBuilder};

/// Length of a reply MAC.
pub const REPLY_MAC_LEN: usize = 16;

/// What a client sends on a replica's client port.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum ClientToReplica {
    /// Registers this connection as the reply path for `client`. `mac` is the MAC of
    /// [`hello_digest`] under the client–replica key, so nobody else can divert the replies.
    Hello {
        /// The client.
        client: ClientId,
        /// MAC over `hello_digest(client, replica)`.
        mac: [u8; REPLY_MAC_LEN],
    },
    /// A request to order and execute.
    Request(Request),
    /// Asks for the replica's status (unauthenticated, read-only).
    Status,
}

/// What a replica sends on a client connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum ReplicaToClient {
    /// A reply, MACed with the client–replica key over [`reply_digest`].
    Reply {
        /// The reply.
        reply: Reply,
        /// MAC over `reply_digest(&reply)`.
        mac: [u8; REPLY_MAC_LEN],
    },
    /// Answer to [`ClientToReplica::Status`].
    Status(ReplicaStatus),
    /// The replica refused something the client sent (bad frame, unknown credential, overload).
    Error(String),
}

/// A replica's view of itself, for `tessera status`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug, Default)]
pub struct ReplicaStatus {
    /// Replica id.
    pub replica: ReplicaId,
    /// Current view.
    pub view: View,
    /// Primary of the current view.
    pub primary: ReplicaId,
    /// True while a view change is in progress.
    pub view_changing: bool,
    /// Last executed sequence number.
    pub last_executed: SeqNum,
    /// Latest stable checkpoint.
    pub stable_checkpoint: SeqNum,
    /// Highest USIG counter this replica used.
    pub usig_counter: u64,
    /// Requests waiting for a sequence number.
    pub pending_requests: u64,
    /// Requests executed since start.
    pub requests_executed: u64,
    /// Digest of the state at the latest stable checkpoint, hex.
    pub stable_state_digest: String,
}

/// Digest a `Hello` MAC covers.
pub fn hello_digest(client: ClientId, replica: ReplicaId) -> Digest {
    let mut builder = DigestBuilder::new("tessera.client-hello.v1");
    builder.u64(client.0).u64(replica.0 as u64);
    builder.finish()
}

/// Digest a reply MAC covers.
pub fn reply_digest(reply: &Reply) -> Digest {
    let mut builder = DigestBuilder::new("tessera.reply.v1");
    builder
        .u64(reply.replica.0 as u64)
        .u64(reply.client.0)
        .u64(reply.request_number)
        .u64(reply.view.0)
        .bytes(&reply.result);
    builder.finish()
}
