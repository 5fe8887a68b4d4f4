//! The TPM 2.0 USIG backend's IO half: raw TPM 2.0 commands over one kept-open connection to
//! swtpm (TCP) or `/dev/tpmrm0`, the [`TpmUsig`] that issues UIs, provisioning, and an swtpm
//! process helper. Verification is pure and lives in `tessera_usig::tpm`.
//!
//! Hand-built commands need no C library (Debian 12's tpm2-tss is too old for the newest
//! wrappers) and avoid a connection per command: about 1 ms per `create_ui` on swtpm
//! (shared/notes/tpm-usig.md).
//!
//! The TPM counter can jump (a retried, interrupted audit chain; swtpm killed -9; an orderly
//! counter after an unclean stop on a real chip). [`TpmUsig::pending_gap`] reports such a jump
//! before it shows up as skipped UI counters, and `start_epoch` moves to a new epoch that counts
//! from 1 again (module [`usig`] argues why that never certifies one (epoch, counter) twice).
//! Which epoch a peer accepts from whom is the protocol core's to decide.

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
