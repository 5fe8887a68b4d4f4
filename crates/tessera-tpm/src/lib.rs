//! The TPM 2.0 USIG backend's IO half: raw TPM 2.0 commands over one kept-open connection to
//! swtpm (TCP) or `/dev/tpmrm0`, the [`TpmUsig`] that issues UIs, provisioning, and an swtpm
//! process helper. Verification is pure and lives in `tessera_usig::tpm`.
//!
//! Hand-built commands need no C library (Debian 12's tpm2-tss is too old for the newest
//! wrappers) and avoid a connection per command: about 1 ms per `create_ui` on swtpm
//! (shared/notes/tpm-usig.md).
//!
//! Known limitation: the TPM counter can jump (a retried, interrupted audit chain; an orderly
//! counter after an unclean stop on a real chip). The protocol core does not yet accept such
//! gaps, nor restarted replicas; both are the core's to handle.

#![forbid(unsafe_code)]

pub mod command;
pub mod ops;
pub mod provision;
pub mod swtpm;
pub mod usig;

pub use command::{TpmError, TpmTarget};
pub use provision::{provision, DEFAULT_AK_HANDLE, DEFAULT_NV_INDEX};
pub use swtpm::Swtpm;
pub use usig::{TpmLocation, TpmUsig};
