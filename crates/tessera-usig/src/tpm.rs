//! Verification of TPM 2.0 USIG certificates, in pure Rust (no TPM, no IO).
//!
//! A TPM UI is made by an exclusive audit session over `[NV_Increment, NV_Read]` on an NV
//! counter index, followed by `GetSessionAuditDigest` signed by a restricted P-256 attestation
//! key (AK) with qualifying data bound to the message (shared/notes/tpm-usig.md). This module
//! owns what a verifier checks, in this order:
//!
//! 1. the certificate parses (bounded, no trailing bytes);
//! 2. the ECDSA P-256/SHA-256 signature over the attestation verifies with the signer's
//!    enrolled AK;
//! 3. the attestation is a TPMS_ATTEST with magic `TPM_GENERATED` and type
//!    `TPM_ST_ATTEST_SESSION_AUDIT` (an `NV_Certify` attestation has another type: it only
//!    *reads* the counter, so the host could certify one value for two messages);
//! 4. `extraData` equals [`qualifying_data`] of (signer, `ui.epoch`, message);
//! 5. `exclusiveSession` is YES (re-signing the same chain yields NO);
//! 6. `sessionDigest` equals the digest of exactly `[NV_Increment, NV_Read → c]` on the
//!    enrolled index, recomputed here from the index's Name, which the verifier derives from
//!    the enrolled index and attributes (so it also proves the index is a counter).
//!
//! The raw TPM counter `c` is `counter_base + ui.epoch + ui.counter` ([`raw_counter`]): a TPM
//! counter never resets (a new index starts at the highest value any counter on that TPM ever
//! had), so each replica enrols the value its counter had when provisioned, and UIs count from
//! 1 above it. Epoch 0 is the enrolled sequence itself (`counter_base + counter`).
//!
//! Epochs: the qualifying data binds the epoch, and the raw value binds epoch + counter. The
//! signing side (`tessera-tpm`) starts epoch `e` only at a raw value `counter_base + e` the TPM
//! counter has already passed, so every UI of epoch `e` uses a raw value above that point and
//! every raw value is certified at most once (one increment, one exclusive audit chain). So no
//! (epoch, counter) pair can carry two valid certificates: both would need the same raw value.
//! The verifier accepts any epoch the certificate proves; which epochs are acceptable from
//! whom is the protocol core's policy.

use crate::{UsigError, UsigIdentity};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::sec1::FromEncodedPoint;
use p256::elliptic_curve::{Field, PrimeField};
use p256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar, U256};
use sha2::{Digest as _, Sha256};
use tessera_types::{Digest, ReplicaId, Ui};

/// `TPM_GENERATED_VALUE`: the magic every TPM-made attestation starts with.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_SESSION_AUDIT`.
pub const ST_ATTEST_SESSION_AUDIT: u16 = 0x8016;
/// `TPM_ST_ATTEST_NV` (what `NV_Certify` produces; never accepted).
pub const ST_ATTEST_NV: u16 = 0x8014;
/// `TPM_ALG_SHA256`.
pub const ALG_SHA256: u16 = 0x000b;
/// `TPM_CC_NV_Increment`.
pub const CC_NV_INCREMENT: u32 = 0x0000_0134;
/// `TPM_CC_NV_Read`.
pub const CC_NV_READ: u32 = 0x0000_014e;
/// `TPM_RH_OWNER`, the authorisation handle of both audited commands; its Name is its handle.
pub const RH_OWNER: u32 = 0x4000_0001;

/// TPMA_NV bits of the counter index.
pub mod nv_attributes {
    /// TPMA_NV_OWNERWRITE.
    pub const OWNERWRITE: u32 = 1 << 1;
    /// TPMA_NV_AUTHWRITE.
    pub const AUTHWRITE: u32 = 1 << 2;
    /// TPM_NT_COUNTER in the TPM_NT field (bits 4..=7).
    pub const NT_COUNTER: u32 = 1 << 4;
    /// Mask of the TPM_NT field.
    pub const NT_MASK: u32 = 0xf << 4;
    /// TPMA_NV_OWNERREAD.
    pub const OWNERREAD: u32 = 1 << 17;
    /// TPMA_NV_AUTHREAD.
    pub const AUTHREAD: u32 = 1 << 18;
    /// TPMA_NV_NO_DA.
    pub const NO_DA: u32 = 1 << 25;
    /// TPMA_NV_ORDERLY.
    pub const ORDERLY: u32 = 1 << 26;
    /// TPMA_NV_WRITTEN (set by the first increment; part of the Name).
    pub const WRITTEN: u32 = 1 << 29;
    /// What provisioning defines: counter, owner/auth read and write, no dictionary-attack
    /// lockout (the auth is empty; TPM_RH_OWNER authorises).
    pub const COUNTER_DEFINED: u32 =
        OWNERWRITE | AUTHWRITE | NT_COUNTER | OWNERREAD | AUTHREAD | NO_DA;
}

/// Largest certificate accepted (a real one is 202 bytes: a 136-byte attestation, its length and r, s).
pub const TPM_CERTIFICATE_LEN_MAX: usize = 512;

const QUALIFYING_DOMAIN: &[u8] = b"tessera.usig.tpm.v1";

/// What the cluster knows about one replica's TPM USIG (printed by `tessera usig provision`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpmEnrollment {
    /// Uncompressed P-256 point of the AK: x then y, 32 bytes each.
    pub ak_public: [u8; 64],
    /// NV index of the counter.
    pub nv_index: u32,
    /// TPMA_NV attributes of the index as defined (WRITTEN is implied).
    pub nv_attributes: u32,
    /// Raw counter value at enrolment; UI `(epoch, counter)` is raw value
    /// `counter_base + epoch + counter`.
    pub counter_base: u64,
}

const ENROLLMENT_TAG: &str = "tpm-v1";

impl TpmEnrollment {
    /// The one-line form kept in cluster.toml's `usig_public_key`:
    /// `tpm-v1 ak=<128 hex> nv=0x<8 hex> attributes=0x<8 hex> base=<decimal>`.
    pub fn to_text(&self) -> String {
        format!(
            "{ENROLLMENT_TAG} ak={} nv=0x{:08x} attributes=0x{:08x} base={}",
            hex_lower(&self.ak_public),
            self.nv_index,
            self.nv_attributes,
            self.counter_base
        )
    }

    /// Parses [`TpmEnrollment::to_text`]'s form; the error says which part is wrong.
    pub fn parse_text(text: &str) -> Result<TpmEnrollment, String> {
        let mut parts = text.split_whitespace();
        if parts.next() != Some(ENROLLMENT_TAG) {
            return Err(format!("does not start with `{ENROLLMENT_TAG}`"));
        }
        let mut field = |name: &str| -> Result<&str, String> {
            parts
                .next()
                .and_then(|part| part.strip_prefix(name))
                .and_then(|part| part.strip_prefix('='))
                .ok_or_else(|| format!("missing `{name}=`"))
        };
        let ak_text = field("ak")?;
        let hex32 = |text: &str, name: &str| {
            text.strip_prefix("0x")
                .and_then(|digits| u32::from_str_radix(digits, 16).ok())
                .ok_or_else(|| format!("`{name}` is not 0x followed by hex digits"))
        };
        let nv_index = hex32(field("nv")?, "nv")?;
        let nv_attributes = hex32(field("attributes")?, "attributes")?;
        let counter_base = field("base")?
            .parse()
            .map_err(|_| "`base` is not a decimal number".to_string())?;
        if parts.next().is_some() {
            return Err("unexpected text after `base=`".into());
        }
        let mut ak_public = [0u8; 64];
        if ak_text.len() != 128 || !ak_text.is_ascii() {
            return Err("`ak` must be 128 hex digits (x and y of the P-256 key)".into());
        }
        for (index, byte) in ak_public.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&ak_text[2 * index..2 * index + 2], 16)
                .map_err(|_| "`ak` is not hex".to_string())?;
        }
        Ok(TpmEnrollment {
            ak_public,
            nv_index,
            nv_attributes,
            counter_base,
        })
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Why an enrolment cannot be used.
fn check_enrollment(replica: usize, enrollment: &TpmEnrollment) -> Result<AffinePoint, UsigError> {
    let unavailable = |what: String| {
        UsigError::Unavailable(format!("TPM enrolment of replica {replica}: {what}"))
    };
    if enrollment.nv_attributes & nv_attributes::NT_MASK != nv_attributes::NT_COUNTER {
        return Err(unavailable(format!(
            "NV attributes 0x{:08x} are not of type counter; re-run `tessera usig provision`",
            enrollment.nv_attributes
        )));
    }
    let encoded = EncodedPoint::from_untagged_bytes(&enrollment.ak_public.into());
    let point = Option::<AffinePoint>::from(AffinePoint::from_encoded_point(&encoded))
        .filter(|point| *point != AffinePoint::IDENTITY);
    point.ok_or_else(|| unavailable("AK public key is not a P-256 point".into()))
}

/// ECDSA verification (SEC 1 v2 §4.1.4) of the P-256/SHA-256 signature `(r, s)` over
/// `message` by `key`. Written on the curve arithmetic because the `ecdsa` crate would bring
/// OS randomness into this pure crate (see Cargo.toml).
fn ecdsa_p256_verifies(key: &AffinePoint, message: &[u8], r: &[u8; 32], s: &[u8; 32]) -> bool {
    // from_repr refuses values ≥ n; zero is refused below: r, s must lie in [1, n-1].
    let scalar = |bytes: &[u8; 32]| {
        Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(*bytes)))
            .filter(|value| !bool::from(value.is_zero()))
    };
    let (Some(r), Some(s)) = (scalar(r), scalar(s)) else {
        return false;
    };
    let Some(s_inverse) = Option::<Scalar>::from(s.invert()) else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(message).into();
    let z = <Scalar as Reduce<U256>>::reduce_bytes(&FieldBytes::from(digest));
    let point = (ProjectivePoint::GENERATOR * (z * s_inverse)
        + ProjectivePoint::from(*key) * (r * s_inverse))
        .to_affine();
    if point == AffinePoint::IDENTITY {
        return false;
    }
    <Scalar as Reduce<U256>>::reduce_bytes(&point.x()) == r
}

/// The Name of the counter index after its first write: nameAlg ‖ SHA-256(TPMS_NV_PUBLIC).
pub fn nv_name(nv_index: u32, attributes: u32) -> [u8; 34] {
    let mut public = Vec::with_capacity(14);
    public.extend_from_slice(&nv_index.to_be_bytes());
    public.extend_from_slice(&ALG_SHA256.to_be_bytes());
    public.extend_from_slice(&(attributes | nv_attributes::WRITTEN).to_be_bytes());
    public.extend_from_slice(&0u16.to_be_bytes()); // authPolicy: empty
    public.extend_from_slice(&8u16.to_be_bytes()); // dataSize
    let mut name = [0u8; 34];
    name[..2].copy_from_slice(&ALG_SHA256.to_be_bytes());
    name[2..].copy_from_slice(&Sha256::digest(&public));
    name
}

/// The audit digest of exactly `[NV_Increment, NV_Read → raw_counter]` on the index named
/// `name`, starting from a reset (all-zero) digest.
pub fn expected_session_digest(name: &[u8; 34], raw_counter: u64) -> [u8; 32] {
    let hash = |parts: &[&[u8]]| -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize().into()
    };
    let success = 0u32.to_be_bytes();
    let increment = CC_NV_INCREMENT.to_be_bytes();
    let read = CC_NV_READ.to_be_bytes();
    let owner = RH_OWNER.to_be_bytes();
    let command_increment = hash(&[&increment, &owner, name]);
    let response_increment = hash(&[&success, &increment]);
    let command_read = hash(&[
        &read,
        &owner,
        name,
        &8u16.to_be_bytes(),
        &0u16.to_be_bytes(),
    ]);
    let response_read = hash(&[
        &success,
        &read,
        &8u16.to_be_bytes(),
        &raw_counter.to_be_bytes(),
    ]);
    let after_increment = hash(&[&[0u8; 32], &command_increment, &response_increment]);
    hash(&[&after_increment, &command_read, &response_read])
}

/// The raw TPM counter value of UI `(epoch, counter)` under `enrollment`, or `None` past the
/// counter's range.
pub fn raw_counter(enrollment: &TpmEnrollment, epoch: u64, counter: u64) -> Option<u64> {
    enrollment
        .counter_base
        .checked_add(epoch)?
        .checked_add(counter)
}

/// The qualifying data a UI of `identity` over `message` must carry.
pub fn qualifying_data(identity: UsigIdentity, message: &Digest) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((QUALIFYING_DOMAIN.len() as u64).to_be_bytes());
    hasher.update(QUALIFYING_DOMAIN);
    hasher.update(u64::from(identity.replica.0).to_be_bytes());
    hasher.update(identity.epoch.to_be_bytes());
    hasher.update(message.as_bytes());
    hasher.finalize().into()
}

/// The certificate: `[attestation length u16 BE][TPMS_ATTEST bytes][r 32][s 32]`.
pub fn encode_certificate(attestation: &[u8], r: &[u8; 32], s: &[u8; 32]) -> Vec<u8> {
    let mut certificate = Vec::with_capacity(2 + attestation.len() + 64);
    certificate.extend_from_slice(&(attestation.len() as u16).to_be_bytes());
    certificate.extend_from_slice(attestation);
    certificate.extend_from_slice(r);
    certificate.extend_from_slice(s);
    certificate
}

/// The fields of a session-audit TPMS_ATTEST a verifier looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionAudit {
    /// `extraData`.
    pub extra_data: Vec<u8>,
    /// `exclusiveSession`.
    pub exclusive: bool,
    /// `sessionDigest`.
    pub session_digest: Vec<u8>,
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < length {
            return Err("attestation truncated");
        }
        let (head, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
    fn sized(&mut self) -> Result<&'a [u8], &'static str> {
        let length = usize::from(self.u16()?);
        self.take(length)
    }
}

/// Parses a TPMS_ATTEST, requiring magic TPM_GENERATED, type SESSION_AUDIT and no trailing
/// bytes.
pub fn parse_session_audit(attestation: &[u8]) -> Result<SessionAudit, &'static str> {
    let mut cursor = Cursor(attestation);
    if cursor.u32()? != TPM_GENERATED {
        return Err("attestation is not TPM-generated (magic)");
    }
    match cursor.u16()? {
        ST_ATTEST_SESSION_AUDIT => {}
        ST_ATTEST_NV => return Err("an NV certification only reads the counter; it is not a UI"),
        _ => return Err("attestation is not a session audit"),
    }
    cursor.sized()?; // qualifiedSigner: the signature already names the AK
    let extra_data = cursor.sized()?.to_vec();
    cursor.take(8 + 4 + 4 + 1)?; // clockInfo: not used (obfuscated outside the endorsement hierarchy)
    cursor.take(8)?; // firmwareVersion
    let exclusive = match cursor.take(1)?[0] {
        0 => false,
        1 => true,
        _ => return Err("exclusiveSession is neither YES nor NO"),
    };
    let session_digest = cursor.sized()?.to_vec();
    if !cursor.0.is_empty() {
        return Err("trailing bytes after the attestation");
    }
    Ok(SessionAudit {
        extra_data,
        exclusive,
        session_digest,
    })
}

/// Checks TPM UIs against the cluster's enrolments. See the module docs for the checks.
#[derive(Clone, Debug)]
pub struct TpmVerifier {
    keys: Vec<AffinePoint>,
    enrollments: Vec<TpmEnrollment>,
}

impl TpmVerifier {
    /// A verifier held by `identity`, for the cluster whose enrolments are `enrollments`
    /// (index = replica).
    pub fn new(
        identity: UsigIdentity,
        enrollments: Vec<TpmEnrollment>,
    ) -> Result<TpmVerifier, UsigError> {
        if identity.replica.0 as usize >= enrollments.len() {
            return Err(UsigError::UnknownSigner(identity.replica));
        }
        let keys = enrollments
            .iter()
            .enumerate()
            .map(|(replica, enrollment)| check_enrollment(replica, enrollment))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TpmVerifier { keys, enrollments })
    }

    /// The enrolment of `replica`.
    pub fn enrollment(&self, replica: ReplicaId) -> Option<&TpmEnrollment> {
        self.enrollments.get(replica.0 as usize)
    }

    /// Checks that `ui` was created by `signer`'s TPM USIG for `message`, in `ui.epoch`.
    pub fn verify_ui(&self, signer: ReplicaId, message: &Digest, ui: &Ui) -> Result<(), UsigError> {
        if signer.0 as usize >= self.enrollments.len() {
            return Err(UsigError::UnknownSigner(signer));
        }
        let invalid = |reason| UsigError::Invalid {
            replica: signer,
            counter: ui.counter,
            reason,
        };
        if ui.counter == 0 {
            return Err(invalid("counter 0 is never issued (counters start at 1)"));
        }
        if ui.certificate.len() > TPM_CERTIFICATE_LEN_MAX || ui.certificate.len() < 2 + 64 {
            return Err(invalid("certificate has a length no TPM certificate has"));
        }
        let attestation_len =
            usize::from(u16::from_be_bytes([ui.certificate[0], ui.certificate[1]]));
        if ui.certificate.len() != 2 + attestation_len + 64 {
            return Err(invalid(
                "certificate length does not match its attestation length",
            ));
        }
        let attestation = &ui.certificate[2..2 + attestation_len];
        let signature_bytes = &ui.certificate[2 + attestation_len..];
        let index = signer.0 as usize;
        let mut r = [0u8; 32];
        let mut s = [0u8; 32];
        r.copy_from_slice(&signature_bytes[..32]);
        s.copy_from_slice(&signature_bytes[32..]);
        if !ecdsa_p256_verifies(&self.keys[index], attestation, &r, &s) {
            return Err(invalid(
                "AK signature does not verify (wrong key or altered attestation)",
            ));
        }
        let audit = parse_session_audit(attestation).map_err(invalid)?;
        let claimed = UsigIdentity {
            replica: signer,
            epoch: ui.epoch,
        };
        if audit.extra_data != qualifying_data(claimed, message) {
            return Err(invalid(
                "qualifying data is not this message's (wrong message, signer or epoch)",
            ));
        }
        if !audit.exclusive {
            return Err(invalid(
                "audit session was not exclusive (a re-signed or interleaved chain)",
            ));
        }
        let enrollment = &self.enrollments[index];
        let raw = raw_counter(enrollment, ui.epoch, ui.counter)
            .ok_or_else(|| invalid("epoch and counter beyond the TPM counter's range"))?;
        let name = nv_name(enrollment.nv_index, enrollment.nv_attributes);
        if audit.session_digest != expected_session_digest(&name, raw) {
            return Err(invalid(
                "session digest is not [NV_Increment, NV_Read] of this counter value on the enrolled index",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};

    fn identity(replica: u32) -> UsigIdentity {
        UsigIdentity {
            replica: ReplicaId(replica),
            epoch: 0,
        }
    }

    fn key(replica: u32) -> SigningKey {
        SigningKey::from_slice(&[replica as u8 + 1; 32]).expect("valid scalar")
    }

    fn enrollment(replica: u32) -> TpmEnrollment {
        let point = key(replica).verifying_key().to_encoded_point(false);
        let mut ak_public = [0u8; 64];
        ak_public.copy_from_slice(&point.as_bytes()[1..]);
        TpmEnrollment {
            ak_public,
            nv_index: 0x0150_0100,
            nv_attributes: nv_attributes::COUNTER_DEFINED,
            counter_base: 1000,
        }
    }

    /// A TPMS_ATTEST as a TPM lays it out, built here so the parser and the checks can be
    /// tested without a TPM (the TPM tests in tessera-tpm cover real attestations).
    fn attestation(kind: u16, extra: &[u8], exclusive: u8, digest: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&TPM_GENERATED.to_be_bytes());
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&34u16.to_be_bytes());
        bytes.extend_from_slice(&[0x0b; 34]);
        bytes.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        bytes.extend_from_slice(extra);
        bytes.extend_from_slice(&[0; 17]);
        bytes.extend_from_slice(&[0; 8]);
        bytes.push(exclusive);
        bytes.extend_from_slice(&(digest.len() as u16).to_be_bytes());
        bytes.extend_from_slice(digest);
        bytes
    }

    fn sign(replica: u32, attestation: &[u8]) -> Vec<u8> {
        let signature: Signature = key(replica).sign(attestation);
        let bytes = signature.to_bytes();
        let mut r = [0u8; 32];
        let mut s = [0u8; 32];
        r.copy_from_slice(&bytes[..32]);
        s.copy_from_slice(&bytes[32..]);
        encode_certificate(attestation, &r, &s)
    }

    fn genuine(replica: u32, counter: u64, message: &Digest) -> Ui {
        genuine_in(replica, 0, counter, message)
    }

    fn genuine_in(replica: u32, epoch: u64, counter: u64, message: &Digest) -> Ui {
        let enrolled = enrollment(replica);
        let name = nv_name(enrolled.nv_index, enrolled.nv_attributes);
        let digest = expected_session_digest(&name, enrolled.counter_base + epoch + counter);
        let signer = UsigIdentity {
            replica: ReplicaId(replica),
            epoch,
        };
        let attest = attestation(
            ST_ATTEST_SESSION_AUDIT,
            &qualifying_data(signer, message),
            1,
            &digest,
        );
        Ui {
            epoch,
            counter,
            certificate: sign(replica, &attest),
        }
    }

    #[test]
    fn the_epoch_is_bound_by_the_qualifying_data_and_the_raw_counter() {
        let message = Digest([6; 32]);
        let verifier = verifier();
        let ui = genuine_in(0, 5, 2, &message);
        assert_eq!(verifier.verify_ui(ReplicaId(0), &message, &ui), Ok(()));
        // Same raw value (base + 7) under another (epoch, counter) split: the qualifying data
        // names epoch 5, so the split cannot be moved.
        for (epoch, counter) in [(4, 3), (6, 1), (0, 7), (u64::MAX, 2)] {
            let moved = Ui {
                epoch,
                counter,
                ..ui.clone()
            };
            assert!(
                verifier.verify_ui(ReplicaId(0), &message, &moved).is_err(),
                "epoch {epoch} counter {counter} accepted"
            );
        }
        assert_eq!(raw_counter(&enrollment(0), u64::MAX, 1), None);
        assert_eq!(raw_counter(&enrollment(0), 5, 2), Some(1007));
    }

    fn verifier() -> TpmVerifier {
        TpmVerifier::new(identity(1), (0..3).map(enrollment).collect()).expect("valid enrolments")
    }

    #[test]
    fn accepts_a_well_formed_ui_and_rejects_each_broken_field() {
        let message = Digest([5; 32]);
        let verifier = verifier();
        let ui = genuine(0, 7, &message);
        assert_eq!(verifier.verify_ui(ReplicaId(0), &message, &ui), Ok(()));
        let enrolled = enrollment(0);
        let name = nv_name(enrolled.nv_index, enrolled.nv_attributes);
        let right_digest = expected_session_digest(&name, enrolled.counter_base + 7);
        let right_extra = qualifying_data(identity(0), &message);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "not exclusive",
                attestation(ST_ATTEST_SESSION_AUDIT, &right_extra, 0, &right_digest),
            ),
            (
                "NV certification",
                attestation(ST_ATTEST_NV, &right_extra, 1, &right_digest),
            ),
            (
                "other message",
                attestation(ST_ATTEST_SESSION_AUDIT, &[0; 32], 1, &right_digest),
            ),
            (
                "digest of a read only",
                attestation(ST_ATTEST_SESSION_AUDIT, &right_extra, 1, &[0; 32]),
            ),
        ];
        for (what, attest) in cases {
            let forged = Ui {
                epoch: 0,
                counter: 7,
                certificate: sign(0, &attest),
            };
            assert!(
                verifier.verify_ui(ReplicaId(0), &message, &forged).is_err(),
                "{what} accepted"
            );
        }
        let wrong_key = Ui {
            epoch: 0,
            counter: 7,
            certificate: sign(
                2,
                &attestation(ST_ATTEST_SESSION_AUDIT, &right_extra, 1, &right_digest),
            ),
        };
        assert!(verifier
            .verify_ui(ReplicaId(0), &message, &wrong_key)
            .is_err());
    }

    #[test]
    fn ecdsa_agrees_with_the_reference_signer_and_refuses_out_of_range_scalars() {
        let key = check_enrollment(0, &enrollment(0)).expect("valid key");
        let message = b"attestation bytes";
        let signature: Signature = self::key(0).sign(message);
        let bytes = signature.to_bytes();
        let mut r = [0u8; 32];
        let mut s = [0u8; 32];
        r.copy_from_slice(&bytes[..32]);
        s.copy_from_slice(&bytes[32..]);
        assert!(ecdsa_p256_verifies(&key, message, &r, &s));
        assert!(!ecdsa_p256_verifies(&key, b"another message", &r, &s));
        assert!(!ecdsa_p256_verifies(&key, message, &s, &r));
        // The group order n: not a valid scalar.
        let order: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        for (bad_r, bad_s) in [
            ([0; 32], s),
            (r, [0; 32]),
            (order, s),
            (r, order),
            ([0xff; 32], s),
        ] {
            assert!(!ecdsa_p256_verifies(&key, message, &bad_r, &bad_s));
        }
    }

    /// Arbitrary and mutated certificates (a cheap deterministic stand-in for fuzzing) are
    /// rejected without panicking.
    #[test]
    fn hostile_certificates_never_panic_or_verify() {
        let verifier = verifier();
        let message = Digest([5; 32]);
        let genuine = genuine(0, 3, &message).certificate;
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..5_000u64 {
            let mut certificate = if round % 2 == 0 {
                genuine.clone()
            } else {
                (0..(next() % 300) as usize).map(|_| next() as u8).collect()
            };
            if !certificate.is_empty() {
                for _ in 0..1 + next() % 4 {
                    let position = (next() as usize) % certificate.len();
                    certificate[position] ^= 1 << (next() % 8);
                }
            }
            if round % 7 == 0 {
                certificate.truncate((next() as usize) % (certificate.len() + 1));
            }
            let ui = Ui {
                epoch: 0,
                counter: 3,
                certificate,
            };
            if ui.certificate != genuine {
                assert!(verifier.verify_ui(ReplicaId(0), &message, &ui).is_err());
            }
            let _ = parse_session_audit(&ui.certificate);
        }
    }

    #[test]
    fn the_index_must_be_a_counter() {
        let mut enrolled = enrollment(0);
        enrolled.nv_attributes &= !nv_attributes::NT_MASK;
        let result = TpmVerifier::new(identity(0), vec![enrolled]);
        assert!(matches!(result, Err(UsigError::Unavailable(text)) if text.contains("counter")));
    }

    #[test]
    fn enrollment_text_round_trips_and_names_bad_parts() {
        let enrolled = enrollment(2);
        assert_eq!(TpmEnrollment::parse_text(&enrolled.to_text()), Ok(enrolled));
        let text = enrolled.to_text();
        for (broken, expected) in [
            (text.replace("tpm-v1", "tpm-v2"), "tpm-v1"),
            (text.replace("nv=0x", "nv="), "nv"),
            (text.replace("base=1000", "base=x"), "base"),
            (format!("{text} extra"), "unexpected"),
            (text.replace("ak=", "ak=00"), "128 hex"),
        ] {
            let error = TpmEnrollment::parse_text(&broken).expect_err("broken text");
            assert!(error.contains(expected), "{broken}: {error}");
        }
    }

    #[test]
    fn name_changes_with_the_attributes() {
        let counter = nv_name(0x0150_0100, nv_attributes::COUNTER_DEFINED);
        let ordinary = nv_name(
            0x0150_0100,
            nv_attributes::COUNTER_DEFINED & !nv_attributes::NT_MASK,
        );
        assert_ne!(counter, ordinary);
        assert_eq!(&counter[..2], &ALG_SHA256.to_be_bytes());
    }
}
