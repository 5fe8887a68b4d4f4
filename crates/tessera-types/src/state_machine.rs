//! The interface a replicated service implements.

use tessera_crypto::Digest;
use thiserror::Error;

/// A deterministic service replicated by Tessera.
///
/// Determinism is the contract: given the same sequence of `execute` calls, every replica must
/// return the same results and reach a state with the same `digest`, whatever its platform,
/// allocator or storage engine. `execute` must not panic on any input: a malformed operation
/// produces an error *result*, which is replicated like any other result.
pub trait StateMachine: Send + 'static {
    /// Applies one operation and returns its result.
    fn execute(&mut self, operation: &[u8]) -> Vec<u8>;

    /// A canonical serialization of the whole state (equal states give equal bytes).
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with a snapshot produced by [`StateMachine::snapshot`].
    /// On error the previous state must be left untouched.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError>;

    /// Digest of the state; equal states give equal digests on every replica.
    fn digest(&self) -> Digest;
}

/// A snapshot that could not be restored.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot restore snapshot: {0}")]
pub struct RestoreError(pub String);
