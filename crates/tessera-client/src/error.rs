//! The errors a client call can end with. Each says what went wrong and, where there is one,
//! what to do about it.

use std::time::Duration;
use tessera_kv::KvError;
use thiserror::Error;

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The cluster file, the client secret file or the options cannot be used.
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// Fewer replicas than a reply needs accepted a connection within the connect timeout.
    #[error(
        "cannot reach the cluster: {reachable} of the {needed} replicas needed accepted a \
         connection ({details}); is it running? start it with `tessera up`"
    )]
    Unreachable {
        /// Replicas that accepted a connection.
        reachable: usize,
        /// Replicas a reply needs (f+1, or 1 without replication).
        needed: usize,
        /// Per-replica connection errors.
        details: String,
    },

    /// A socket operation failed in a way the client does not retry.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// No f+1 matching authenticated replies arrived before the request timeout.
    #[error(
        "request {request_number} got no {needed} matching replies within {} ms; \
         the cluster may be down, partitioned or changing view",
        elapsed.as_millis()
    )]
    Timeout {
        /// The request number that timed out.
        request_number: u64,
        /// Matching replies needed.
        needed: usize,
        /// How long the client waited.
        elapsed: Duration,
    },

    /// A replica refused what the client sent (unknown credential, malformed frame, overload),
    /// and no quorum answered before the request timeout.
    #[error("the cluster refused the request: {0}")]
    Rejected(String),

    /// The operation is larger than any replica accepts.
    #[error("operation of {length} bytes exceeds the limit of {limit} bytes")]
    OperationTooLarge {
        /// Operation bytes.
        length: usize,
        /// The wire limit.
        limit: usize,
    },

    /// No quorum answered before the request timeout, and meanwhile a reply frame larger than
    /// the largest legitimate result arrived (the replica that sent it is faulty or runs an
    /// incompatible version; its connection was reset).
    #[error("a reply of {length} bytes exceeds the limit of {limit} bytes")]
    ResultTooLarge {
        /// Frame bytes announced.
        length: usize,
        /// The limit.
        limit: usize,
    },

    /// More requests are waiting for replies than `ClientOptions::pending_requests_max` allows.
    #[error("{limit} requests are already waiting for replies; use fewer sessions or raise pending_requests_max")]
    Overloaded {
        /// The limit in force.
        limit: usize,
    },

    /// The key-value service executed the command and answered with an error.
    #[error("{0}")]
    Kv(KvError),

    /// The agreed result is not what the command expects (a bug or a version mismatch).
    #[error("unexpected result for {command}: {detail}")]
    UnexpectedResult {
        /// The command sent.
        command: &'static str,
        /// What came back instead.
        detail: String,
    },

    /// The client was shut down while the request was in flight.
    #[error("the client was shut down")]
    Closed,
}
