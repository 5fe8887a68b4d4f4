//! Hard size limits on everything that arrives from the network.
//!
//! Decoders check these before allocating; the protocol core asserts them on what it builds.
//! Changing a limit changes the wire contract, so they are constants, not configuration.

/// Largest client operation (command bytes) accepted in a request.
pub const MAX_OPERATION_BYTES: usize = 1 << 20;
/// Largest result a state machine may return in a reply.
pub const MAX_RESULT_BYTES: usize = 4 << 20;
/// Largest USIG certificate (an HMAC is 32 bytes, Ed25519 64, a TPM attestation a few hundred).
pub const MAX_UI_CERTIFICATE_BYTES: usize = 1024;
/// Largest number of requests in one batch.
pub const MAX_BATCH_REQUESTS: usize = 4096;
/// Largest client authenticator: one MAC per replica.
pub const MAX_REPLICAS: usize = 64;
/// Largest frame on any Tessera connection (a VIEW-CHANGE or NEW-VIEW carrying a full log, or a
/// state summary with a large client table, is the biggest legitimate message).
pub const MAX_FRAME_BYTES: usize = 256 << 20;
