//! Provisioning: the counter index and the attestation key, and the public data to enrol.
//!
//! Idempotent: an existing AK or index is checked (restricted P-256 signing key; 8-byte
//! counter with the expected attributes) and reused, never replaced, so re-running it on a
//! provisioned TPM only reports the current enrolment. The counter is incremented once if it
//! was never written, because its Name (which verifiers derive) changes at the first write.

use crate::command::{rc, TpmError, TpmTarget};
use crate::ops::{Tpm, AK_ATTRIBUTES};
use tessera_usig::tpm::nv_attributes;
use tessera_usig::TpmEnrollment;

/// Default NV index of the counter (owner range 0x01xxxxxx).
pub const DEFAULT_NV_INDEX: u32 = 0x0150_0101;
/// Default persistent handle of the AK (owner range 0x81000000-0x817fffff).
pub const DEFAULT_AK_HANDLE: u32 = 0x8101_0101;

/// Provisions (or re-reads) the USIG on the TPM at `target`.
pub fn provision(
    target: &TpmTarget,
    nv_index: u32,
    ak_handle: u32,
) -> Result<TpmEnrollment, TpmError> {
    let mut tpm = Tpm::open(target)?;
    let ak_public = ensure_ak(&mut tpm, ak_handle)?;
    ensure_counter(&mut tpm, nv_index)?;
    let counter_base = tpm.nv_read_counter(nv_index, None)?;
    Ok(TpmEnrollment {
        ak_public,
        nv_index,
        nv_attributes: nv_attributes::COUNTER_DEFINED,
        counter_base,
    })
}

fn ensure_ak(tpm: &mut Tpm, ak_handle: u32) -> Result<[u8; 64], TpmError> {
    match tpm.read_public(ak_handle) {
        Ok(existing) => {
            if existing.attributes != AK_ATTRIBUTES {
                return Err(TpmError::Setup(format!(
                    "the key at 0x{ak_handle:08x} has attributes 0x{:08x}, not a restricted \
                     signing AK (0x{AK_ATTRIBUTES:08x}); an unrestricted key could sign forged \
                     attestations. Choose another --ak-handle or evict it",
                    existing.attributes
                )));
            }
            Ok(existing.point)
        }
        Err(error) if error.code().is_some_and(rc::is_handle) => {
            let (transient, public) = tpm.create_primary_ak()?;
            let persisted = tpm.evict_control(transient, ak_handle);
            // swtpm has three transient slots and no resource manager: always flush.
            let flushed = tpm.flush(transient);
            persisted?;
            flushed?;
            Ok(public.point)
        }
        Err(error) => Err(error),
    }
}

fn ensure_counter(tpm: &mut Tpm, nv_index: u32) -> Result<(), TpmError> {
    let attributes = match tpm.nv_read_public(nv_index) {
        Ok((attributes, size)) => {
            if attributes & !nv_attributes::WRITTEN != nv_attributes::COUNTER_DEFINED || size != 8 {
                return Err(TpmError::Setup(format!(
                    "NV index 0x{nv_index:08x} exists with attributes 0x{attributes:08x} and \
                     size {size}, not the USIG counter (0x{:08x}, 8 bytes); choose another \
                     --nv-index",
                    nv_attributes::COUNTER_DEFINED
                )));
            }
            attributes
        }
        Err(error) if error.code().is_some_and(rc::is_handle) => {
            tpm.nv_define_space(nv_index, nv_attributes::COUNTER_DEFINED)?;
            nv_attributes::COUNTER_DEFINED
        }
        Err(error) => return Err(error),
    };
    if attributes & nv_attributes::WRITTEN == 0 {
        tpm.nv_increment(nv_index, None)?;
    }
    Ok(())
}

/// The enrolment as the cluster.toml line for this replica's entry.
pub fn enrollment_toml(enrollment: &TpmEnrollment) -> String {
    format!("usig_public_key = \"{}\"\n", enrollment.to_text())
}
