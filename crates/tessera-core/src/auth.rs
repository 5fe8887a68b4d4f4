//! How the core checks client requests, supplied by the driver.
//!
//! The split is the design of `docs/PROTOCOL.md` ("request authentication"): the primary checks
//! the Ed25519 signature before it proposes a request, backups check the cheap MAC addressed to
//! them and fall back to the signature only when that MAC is wrong. The driver may cache results
//! or verify in parallel ahead of the core; the core only asks.

use tessera_types::Request;

/// Request authentication for one replica.
pub trait RequestAuthenticator: Send {
    /// True if the request's Ed25519 signature is valid for its client's registered key.
    fn verify_signature(&self, request: &Request) -> bool;

    /// True if the MAC addressed to this replica is valid.
    fn verify_mac(&self, request: &Request) -> bool;
}
