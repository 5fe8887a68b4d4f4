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

    fn execute_envelope(&mut self, operation: &[u8]) -> EnvelopeResult {
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
            let result = self.inner.execute(operation);
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
    fn execute(&mut self, operation: &[u8]) -> Vec<u8> {
        let results = self.execute_envelope(operation);
        let results = results.map(|results| {
            results
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect::<Vec<_>>()
        });
        tessera_types::encode(&results)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        self.inner.restore(snapshot)
    }

    fn digest(&self) -> Digest {
        self.inner.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crypto::DigestBuilder;

    /// Appends each operation to a log and returns the log length.
    #[derive(Default)]
    struct Log(Vec<Vec<u8>>);

    impl StateMachine for Log {
        fn execute(&mut self, operation: &[u8]) -> Vec<u8> {
            self.0.push(operation.to_vec());
            vec![self.0.len() as u8]
        }
        fn snapshot(&self) -> Vec<u8> {
            tessera_types::encode(&self.0)
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
            self.0 = tessera_types::decode(snapshot, 1 << 20)
                .map_err(|error| RestoreError(error.to_string()))?;
            Ok(())
        }
        fn digest(&self) -> Digest {
            let mut builder = DigestBuilder::new("test.log");
            builder.bytes(&self.snapshot());
            builder.finish()
        }
    }

    #[test]
    fn executes_inner_operations_in_order() {
        let mut machine = Envelope::new(Log::default());
        let result = machine.execute(&encode_operations(&[b"a".to_vec(), b"b".to_vec()]));
        assert_eq!(decode_results(&result).unwrap(), Ok(vec![vec![1], vec![2]]));
        assert_eq!(machine.inner().0, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn refuses_malformed_and_empty_envelopes_without_executing() {
        let mut machine = Envelope::new(Log::default());
        assert!(decode_results(&machine.execute(b"\xff\xff\xff"))
            .unwrap()
            .is_err());
        assert!(decode_results(&machine.execute(&encode_operations(&[])))
            .unwrap()
            .is_err());
        assert!(machine.inner().0.is_empty());
    }
}
