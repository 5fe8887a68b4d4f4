//! Envelopes: many operations under one signed request.
//!
//! Request authentication dominates the cost of a replicated operation (one Ed25519 signature
//! by the client and one verification per replica, `docs/PROTOCOL.md` §3). A client process that
//! serves many concurrent users — the client library's batcher, the RESP gateway — can put the
//! operations that are waiting at one moment into a single request, so the signature and the
//! verifications are paid once per envelope instead of once per operation.
//!
//! This is an application-level adapter, not a protocol change: [`Envelope`] wraps any
//! [`StateMachine`]; an envelope operation is the canonical encoding of a list of inner
//! operations, executed in order, and its result is the list of their results. Exactly-once
//! holds per envelope (it is one request), hence per inner operation.

use tessera_crypto::Digest;
use tessera_types::limits::{MAX_OPERATION_BYTES, MAX_RESULT_BYTES};
use tessera_types::state_machine::RestoreError;
use tessera_types::StateMachine;

/// Most inner operations in one envelope.
pub const ENVELOPE_OPERATIONS_MAX: usize = 1024;

/// The result of an envelope: one result per inner operation, or why the envelope was refused.
pub type EnvelopeResult = Result<Vec<Vec<u8>>, String>;

/// Encodes inner operations into one envelope operation.
pub fn encode_operations(operations: &[Vec<u8>]) -> Vec<u8> {
    let operations: Vec<&serde_bytes::Bytes> = operations
        .iter()
        .map(|operation| serde_bytes::Bytes::new(operation))
        .collect();
    tessera_types::encode(&operations)
}

/// Decodes an envelope's result.
pub fn decode_results(bytes: &[u8]) -> Result<EnvelopeResult, tessera_types::DecodeError> {
    let results: Result<Vec<serde_bytes::ByteBuf>, String> =
        tessera_types::decode(bytes, MAX_RESULT_BYTES + 64)?;
    Ok(results.map(|results| {
        results
            .into_iter()
            .map(serde_bytes::ByteBuf::into_vec)
            .collect()
    }))
}

/// A state machine whose operations are envelopes of the inner machine's operations.
#[derive(Default, Debug)]
pub struct Envelope<S> {
    inner: S,
}

impl<S: StateMachine> Envelope<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Envelope<S> {
        Envelope { inner }
    }

    /// The wrapped state machine.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn execute_envelope(&mut self, operation: &[u8], time_ms: u64) -> EnvelopeResult {
        let operations: Vec<serde_bytes::ByteBuf> =
            tessera_types::decode(operation, MAX_OPERATION_BYTES)
                .map_err(|error| format!("malformed envelope: {error}"))?;
        if operations.is_empty() || operations.len() > ENVELOPE_OPERATIONS_MAX {
            return Err(format!(
                "an envelope holds 1 to {ENVELOPE_OPERATIONS_MAX} operations, not {}",
                operations.len()
            ));
        }
        let mut results = Vec::with_capacity(operations.len());
        let mut result_bytes = 0usize;
        for operation in &operations {
            // Every operation of an envelope runs at its batch's agreed time.
            let result = self.inner.execute(operation, time_ms);
            result_bytes += result.len() + 8;
            if result_bytes > MAX_RESULT_BYTES {
                // Deterministic on every replica; the operations before this one did execute.
                results.push(b"result too large for one envelope".to_vec());
                break;
            }
            results.push(result);
        }
        Ok(results)
    }
}

impl<S: StateMachine> StateMachine for Envelope<S> {
    type Frozen = S::Frozen;
    type Staged = S::Staged;

    fn execute(&mut self, operation: &[u8], time_ms: u64) -> Vec<u8> {
        let results = self.execute_envelope(operation, time_ms);
        let results = results.map(|results| {
            results
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect::<Vec<_>>()
        });
        tessera_types::encode(&results)
    }

    fn partition_count(&self) -> u32 {
        self.inner.partition_count()
    }

    fn partition_digest(&self, index: u32) -> Digest {
        self.inner.partition_digest(index)
    }

    fn digest(&self) -> Digest {
        self.inner.digest()
    }

    fn freeze(&mut self) -> S::Frozen {
        self.inner.freeze()
    }

    fn stage(&self, index: u32) -> S::Staged {
        self.inner.stage(index)
    }

    fn install(&mut self, partitions: Vec<S::Staged>) -> Result<(), RestoreError> {
        self.inner.install(partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kv::{Command, KvStore, Response};

    fn set(key: &str, value: &str) -> Vec<u8> {
        Command::Set {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
        .encode()
    }

    fn get(key: &str) -> Vec<u8> {
        Command::Get {
            key: key.as_bytes().to_vec(),
        }
        .encode()
    }

    #[test]
    fn executes_inner_operations_in_order() {
        let mut machine = Envelope::new(KvStore::default());
        let result = machine.execute(
            &encode_operations(&[set("a", "1"), get("a"), set("a", "2")]),
            0,
        );
        let results = decode_results(&result).unwrap().unwrap();
        assert_eq!(results[0], Response::Ok.encode());
        assert_eq!(results[1], Response::Value(Some(b"1".to_vec())).encode());
        assert_eq!(machine.inner().get(b"a"), Some(&b"2"[..]));
        assert_eq!(machine.digest(), machine.inner().digest());
    }

    #[test]
    fn refuses_malformed_and_empty_envelopes_without_executing() {
        let mut machine = Envelope::new(KvStore::default());
        let empty = machine.digest();
        assert!(decode_results(&machine.execute(b"\xff\xff\xff", 0))
            .unwrap()
            .is_err());
        assert!(decode_results(&machine.execute(&encode_operations(&[]), 0))
            .unwrap()
            .is_err());
        assert!(machine.inner().is_empty());
        assert_eq!(machine.digest(), empty);
    }
}
