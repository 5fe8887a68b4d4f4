//! The TPM commands the USIG and its provisioning need, one method each.

use crate::command::{
    build, parse_response, push_sized, Connection, Reader, SessionEntry, TpmError, TpmTarget,
    ALG_NULL, RH_ENDORSEMENT, RH_NULL,
};
use tessera_usig::tpm::{ALG_SHA256, CC_NV_INCREMENT, CC_NV_READ, RH_OWNER};

const CC_START_AUTH_SESSION: u32 = 0x176;
const CC_GET_SESSION_AUDIT_DIGEST: u32 = 0x14d;
const CC_NV_CERTIFY: u32 = 0x184;
const CC_CREATE_PRIMARY: u32 = 0x131;
const CC_EVICT_CONTROL: u32 = 0x120;
const CC_READ_PUBLIC: u32 = 0x173;
const CC_NV_DEFINE_SPACE: u32 = 0x12a;
const CC_NV_READ_PUBLIC: u32 = 0x169;
const CC_FLUSH_CONTEXT: u32 = 0x165;
const CC_SHUTDOWN: u32 = 0x145;
const CC_GET_RANDOM: u32 = 0x17b;

const ALG_ECC: u16 = 0x0023;
const ALG_ECDSA: u16 = 0x0018;
const ECC_NIST_P256: u16 = 0x0003;
const SE_HMAC: u8 = 0x00;

/// TPMA_SESSION of the audited NV_Increment: continueSession | auditReset | audit.
pub const AUDIT_RESET: u8 = 0x85;
/// TPMA_SESSION of the audited NV_Read: continueSession | auditExclusive | audit.
pub const AUDIT_EXCLUSIVE: u8 = 0x83;

/// TPMA_OBJECT of the attestation key: fixedTPM | fixedParent | sensitiveDataOrigin |
/// userWithAuth | noDA | restricted | sign. Restricted matters: such a key signs only
/// TPM-generated structures, so the host cannot have it sign a forged attestation.
pub const AK_ATTRIBUTES: u32 =
    (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 10) | (1 << 16) | (1 << 18);

/// A signed attestation as the TPM returned it.
#[derive(Clone, Debug)]
pub struct Attestation {
    /// TPMS_ATTEST bytes (what was signed).
    pub attest: Vec<u8>,
    /// ECDSA r, left-padded to 32 bytes.
    pub r: [u8; 32],
    /// ECDSA s, left-padded to 32 bytes.
    pub s: [u8; 32],
}

/// The public part of a P-256 key and the attributes it was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EccPublic {
    /// TPMA_OBJECT.
    pub attributes: u32,
    /// x ‖ y.
    pub point: [u8; 64],
}

/// A connection to a TPM with the USIG's commands.
pub struct Tpm {
    connection: Connection,
    nonce_counter: u64,
}

fn left_pad(value: &[u8], command: &'static str) -> Result<[u8; 32], TpmError> {
    if value.len() > 32 {
        return Err(TpmError::Malformed {
            command,
            what: "P-256 value longer than 32 bytes",
        });
    }
    let mut out = [0u8; 32];
    out[32 - value.len()..].copy_from_slice(value);
    Ok(out)
}

impl Tpm {
    /// Opens `target`.
    pub fn open(target: &TpmTarget) -> Result<Tpm, TpmError> {
        Ok(Tpm {
            connection: Connection::open(target)?,
            nonce_counter: 0,
        })
    }

    fn call(
        &mut self,
        name: &'static str,
        code: u32,
        handles: &[u32],
        sessions: &[SessionEntry],
        parameters: &[u8],
        response_handles: usize,
    ) -> Result<(Vec<u32>, Vec<u8>), TpmError> {
        let response = self
            .connection
            .transact(&build(code, handles, sessions, parameters))?;
        let (handles, parameters) = parse_response(name, &response, response_handles)?;
        Ok((handles, parameters.to_vec()))
    }

    /// A fresh nonceCaller (32 bytes, as the session hash): nonces only need to differ, since
    /// the audit digest does not cover them and no HMAC is computed.
    fn nonce(&mut self) -> Vec<u8> {
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        let mut nonce = vec![0u8; 32];
        nonce[24..].copy_from_slice(&self.nonce_counter.to_be_bytes());
        nonce
    }

    fn audit_entry(&mut self, session: u32, attributes: u8) -> SessionEntry {
        SessionEntry {
            handle: session,
            nonce: self.nonce(),
            attributes,
            hmac: Vec::new(),
        }
    }

    /// Starts an unbound, unsalted HMAC session with SHA-256, used for audit only.
    pub fn start_audit_session(&mut self) -> Result<u32, TpmError> {
        let mut parameters = Vec::new();
        let nonce = self.nonce();
        push_sized(&mut parameters, &nonce);
        push_sized(&mut parameters, &[]); // encryptedSalt
        parameters.push(SE_HMAC);
        parameters.extend_from_slice(&ALG_NULL.to_be_bytes()); // symmetric
        parameters.extend_from_slice(&ALG_SHA256.to_be_bytes());
        let (handles, _) = self.call(
            "StartAuthSession",
            CC_START_AUTH_SESSION,
            &[RH_NULL, RH_NULL],
            &[],
            &parameters,
            1,
        )?;
        Ok(handles[0])
    }

    /// NV_Increment on `index`, optionally audited by `audit` with `attributes`.
    pub fn nv_increment(&mut self, index: u32, audit: Option<(u32, u8)>) -> Result<(), TpmError> {
        let mut sessions = vec![SessionEntry::password()];
        if let Some((session, attributes)) = audit {
            let entry = self.audit_entry(session, attributes);
            sessions.push(entry);
        }
        self.call(
            "NV_Increment",
            CC_NV_INCREMENT,
            &[RH_OWNER, index],
            &sessions,
            &[],
            0,
        )?;
        Ok(())
    }

    /// NV_Read of the 8-byte counter at `index`, optionally audited.
    pub fn nv_read_counter(
        &mut self,
        index: u32,
        audit: Option<(u32, u8)>,
    ) -> Result<u64, TpmError> {
        let mut sessions = vec![SessionEntry::password()];
        if let Some((session, attributes)) = audit {
            let entry = self.audit_entry(session, attributes);
            sessions.push(entry);
        }
        let mut parameters = Vec::new();
        parameters.extend_from_slice(&8u16.to_be_bytes());
        parameters.extend_from_slice(&0u16.to_be_bytes());
        let (_, response) = self.call(
            "NV_Read",
            CC_NV_READ,
            &[RH_OWNER, index],
            &sessions,
            &parameters,
            0,
        )?;
        let mut reader = Reader::new("NV_Read", &response);
        let data = reader.sized("data")?;
        let bytes: [u8; 8] = data.try_into().map_err(|_| TpmError::Malformed {
            command: "NV_Read",
            what: "counter is not 8 bytes",
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn read_signed(name: &'static str, response: &[u8]) -> Result<Attestation, TpmError> {
        let mut reader = Reader::new(name, response);
        let attest = reader.sized("attestation")?.to_vec();
        if reader.u16("signature algorithm")? != ALG_ECDSA {
            return Err(TpmError::Malformed {
                command: name,
                what: "signature is not ECDSA",
            });
        }
        if reader.u16("signature hash")? != ALG_SHA256 {
            return Err(TpmError::Malformed {
                command: name,
                what: "signature hash is not SHA-256",
            });
        }
        let r = left_pad(reader.sized("signature r")?, name)?;
        let s = left_pad(reader.sized("signature s")?, name)?;
        Ok(Attestation { attest, r, s })
    }

    /// GetSessionAuditDigest of `session`, signed by the AK at `ak`, over `qualifying`.
    pub fn get_session_audit_digest(
        &mut self,
        ak: u32,
        session: u32,
        qualifying: &[u8],
    ) -> Result<Attestation, TpmError> {
        let mut parameters = Vec::new();
        push_sized(&mut parameters, qualifying);
        parameters.extend_from_slice(&ALG_NULL.to_be_bytes()); // the AK's own scheme
        let (_, response) = self.call(
            "GetSessionAuditDigest",
            CC_GET_SESSION_AUDIT_DIGEST,
            &[RH_ENDORSEMENT, ak, session],
            &[SessionEntry::password(), SessionEntry::password()],
            &parameters,
            0,
        )?;
        Self::read_signed("GetSessionAuditDigest", &response)
    }

    /// NV_Certify of the counter at `index`, signed by the AK (only to show that it is not a
    /// USIG: it reads the counter without advancing it).
    pub fn nv_certify(
        &mut self,
        ak: u32,
        index: u32,
        qualifying: &[u8],
    ) -> Result<Attestation, TpmError> {
        let mut parameters = Vec::new();
        push_sized(&mut parameters, qualifying);
        parameters.extend_from_slice(&ALG_NULL.to_be_bytes());
        parameters.extend_from_slice(&8u16.to_be_bytes());
        parameters.extend_from_slice(&0u16.to_be_bytes());
        let (_, response) = self.call(
            "NV_Certify",
            CC_NV_CERTIFY,
            &[ak, RH_OWNER, index],
            &[SessionEntry::password(), SessionEntry::password()],
            &parameters,
            0,
        )?;
        Self::read_signed("NV_Certify", &response)
    }

    fn ak_template() -> Vec<u8> {
        let mut public = Vec::new();
        public.extend_from_slice(&ALG_ECC.to_be_bytes());
        public.extend_from_slice(&ALG_SHA256.to_be_bytes());
        public.extend_from_slice(&AK_ATTRIBUTES.to_be_bytes());
        push_sized(&mut public, &[]); // authPolicy
        public.extend_from_slice(&ALG_NULL.to_be_bytes()); // symmetric: none (a signing key)
        public.extend_from_slice(&ALG_ECDSA.to_be_bytes());
        public.extend_from_slice(&ALG_SHA256.to_be_bytes());
        public.extend_from_slice(&ECC_NIST_P256.to_be_bytes());
        public.extend_from_slice(&ALG_NULL.to_be_bytes()); // kdf
        push_sized(&mut public, &[]); // unique.x
        push_sized(&mut public, &[]); // unique.y
        public
    }

    fn parse_ecc_public(name: &'static str, reader: &mut Reader) -> Result<EccPublic, TpmError> {
        let public = reader.sized("public area")?;
        let mut inner = Reader::new(name, public);
        let malformed = |what| TpmError::Malformed {
            command: name,
            what,
        };
        if inner.u16("type")? != ALG_ECC {
            return Err(malformed("key is not ECC"));
        }
        if inner.u16("nameAlg")? != ALG_SHA256 {
            return Err(malformed("key nameAlg is not SHA-256"));
        }
        let attributes = inner.u32("attributes")?;
        inner.sized("authPolicy")?;
        if inner.u16("symmetric")? != ALG_NULL {
            return Err(malformed("signing key has a symmetric algorithm"));
        }
        if inner.u16("scheme")? != ALG_ECDSA || inner.u16("scheme hash")? != ALG_SHA256 {
            return Err(malformed("key scheme is not ECDSA-SHA256"));
        }
        if inner.u16("curve")? != ECC_NIST_P256 {
            return Err(malformed("key curve is not P-256"));
        }
        if inner.u16("kdf")? != ALG_NULL {
            return Err(malformed("key has a KDF"));
        }
        let x = left_pad(inner.sized("x")?, name)?;
        let y = left_pad(inner.sized("y")?, name)?;
        let mut point = [0u8; 64];
        point[..32].copy_from_slice(&x);
        point[32..].copy_from_slice(&y);
        Ok(EccPublic { attributes, point })
    }

    /// CreatePrimary of the AK under the owner hierarchy (deterministic from the owner seed);
    /// returns its transient handle and public part.
    pub fn create_primary_ak(&mut self) -> Result<(u32, EccPublic), TpmError> {
        let mut parameters = Vec::new();
        push_sized(&mut parameters, &[0, 0, 0, 0]); // inSensitive: empty userAuth and data
        push_sized(&mut parameters, &Self::ak_template());
        push_sized(&mut parameters, &[]); // outsideInfo
        parameters.extend_from_slice(&0u32.to_be_bytes()); // creationPCR: none
        let (handles, response) = self.call(
            "CreatePrimary",
            CC_CREATE_PRIMARY,
            &[RH_OWNER],
            &[SessionEntry::password()],
            &parameters,
            1,
        )?;
        let mut reader = Reader::new("CreatePrimary", &response);
        let public = Self::parse_ecc_public("CreatePrimary", &mut reader)?;
        Ok((handles[0], public))
    }

    /// ReadPublic of an ECC key.
    pub fn read_public(&mut self, handle: u32) -> Result<EccPublic, TpmError> {
        let (_, response) = self.call("ReadPublic", CC_READ_PUBLIC, &[handle], &[], &[], 0)?;
        let mut reader = Reader::new("ReadPublic", &response);
        Self::parse_ecc_public("ReadPublic", &mut reader)
    }

    /// EvictControl: makes the transient `object` persistent at `persistent`.
    pub fn evict_control(&mut self, object: u32, persistent: u32) -> Result<(), TpmError> {
        self.call(
            "EvictControl",
            CC_EVICT_CONTROL,
            &[RH_OWNER, object],
            &[SessionEntry::password()],
            &persistent.to_be_bytes(),
            0,
        )?;
        Ok(())
    }

    /// NV_DefineSpace of an 8-byte index with empty auth and policy.
    pub fn nv_define_space(&mut self, index: u32, attributes: u32) -> Result<(), TpmError> {
        let mut nv_public = Vec::new();
        nv_public.extend_from_slice(&index.to_be_bytes());
        nv_public.extend_from_slice(&ALG_SHA256.to_be_bytes());
        nv_public.extend_from_slice(&attributes.to_be_bytes());
        push_sized(&mut nv_public, &[]);
        nv_public.extend_from_slice(&8u16.to_be_bytes());
        let mut parameters = Vec::new();
        push_sized(&mut parameters, &[]); // auth
        push_sized(&mut parameters, &nv_public);
        self.call(
            "NV_DefineSpace",
            CC_NV_DEFINE_SPACE,
            &[RH_OWNER],
            &[SessionEntry::password()],
            &parameters,
            0,
        )?;
        Ok(())
    }

    /// NV_ReadPublic: the index's attributes and data size.
    pub fn nv_read_public(&mut self, index: u32) -> Result<(u32, u16), TpmError> {
        let (_, response) = self.call("NV_ReadPublic", CC_NV_READ_PUBLIC, &[index], &[], &[], 0)?;
        let mut reader = Reader::new("NV_ReadPublic", &response);
        let public = reader.sized("nvPublic")?;
        let mut inner = Reader::new("NV_ReadPublic", public);
        if inner.u32("nvIndex")? != index {
            return Err(TpmError::Malformed {
                command: "NV_ReadPublic",
                what: "public area names another index",
            });
        }
        inner.u16("nameAlg")?;
        let attributes = inner.u32("attributes")?;
        inner.sized("authPolicy")?;
        let size = inner.u16("dataSize")?;
        Ok((attributes, size))
    }

    /// FlushContext of a transient object or session.
    pub fn flush(&mut self, handle: u32) -> Result<(), TpmError> {
        self.call(
            "FlushContext",
            CC_FLUSH_CONTEXT,
            &[],
            &[],
            &handle.to_be_bytes(),
            0,
        )?;
        Ok(())
    }

    /// Shutdown(STATE): what an orderly stop sends so the TPM saves its state.
    pub fn shutdown_state(&mut self) -> Result<(), TpmError> {
        self.call("Shutdown", CC_SHUTDOWN, &[], &[], &1u16.to_be_bytes(), 0)?;
        Ok(())
    }

    /// GetRandom of 8 bytes: a cheap liveness probe.
    pub fn ping(&mut self) -> Result<(), TpmError> {
        self.call("GetRandom", CC_GET_RANDOM, &[], &[], &8u16.to_be_bytes(), 0)?;
        Ok(())
    }
}
