//! Ed25519 signatures (ed25519-dalek 2) over [`Digest`]s.
//!
//! This module owns signing keys made from caller-supplied seeds and the *strict* verification
//! rule every replica applies. It must never panic on bytes from outside: a signature of the
//! wrong length or a malformed key is a `false` or a [`CryptoError`], never a crash.
//!
//! Replicas must agree on which signatures are valid, or a faulty client can split them. The
//! single rule is [`VerifyingKey::verify`] (dalek's `verify_strict`). [`verify_batch`] uses a
//! randomized batch equation that accepts every batch of strictly valid signatures, but a
//! signer who *crafts* a signature with a small-torsion component can make a batch pass that
//! `verify_strict` would reject (by grinding messages, about one try in eight). Keys are checked
//! at [`VerifyingKey::from_bytes`] so a torsion-carrying *key* cannot get in; read the
//! [`verify_batch`] docs before using it where replicas must decide alike.

use crate::digest::Digest;
use ed25519_dalek::Signer;
use thiserror::Error;

/// Length of a signature, in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// Length of a public key, in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Why key material was refused.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum CryptoError {
    /// The 32 bytes are not a usable Ed25519 public key.
    #[error("invalid Ed25519 public key: {reason}; regenerate it from the replica's seed")]
    InvalidPublicKey {
        /// Which check failed.
        reason: &'static str,
    },
}

/// An Ed25519 signing key. The secret never leaves this value except through [`SigningKey::seed`].
#[derive(Clone)]
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// The key whose secret seed is `seed` (RFC 8032: the seed *is* the private key).
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        SigningKey {
            inner: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            inner: self.inner.verifying_key(),
        }
    }

    /// Signs the digest's 32 bytes. Deterministic: the same key and digest give the same bytes.
    pub fn sign(&self, digest: &Digest) -> [u8; SIGNATURE_LEN] {
        self.inner.sign(digest.as_bytes()).to_bytes()
    }

    /// The seed this key was made from (for writing key files; handle with care).
    pub fn seed(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret: show only the public half.
        formatter
            .debug_struct("SigningKey")
            .field("public", &self.verifying_key())
            .finish()
    }
}

/// An Ed25519 public key that passed the checks in [`VerifyingKey::from_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VerifyingKey {
    inner: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parses a public key, refusing any that an honest key generator cannot produce: points
    /// off the curve, non-canonical encodings, small-order points, and points with a torsion
    /// component. Honest keys are `a·B` for the base point `B`, so none of these rejections
    /// ever hits one; all of them close doors that differ between verification equations.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<VerifyingKey, CryptoError> {
        let inner = ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| {
            CryptoError::InvalidPublicKey {
                reason: "not a point on the curve",
            }
        })?;
        let point = inner.to_edwards();
        if point.compress().to_bytes() != *bytes {
            return Err(CryptoError::InvalidPublicKey {
                reason: "non-canonical encoding",
            });
        }
        if inner.is_weak() {
            return Err(CryptoError::InvalidPublicKey {
                reason: "small-order point",
            });
        }
        if !point.is_torsion_free() {
            return Err(CryptoError::InvalidPublicKey {
                reason: "point has a torsion component",
            });
        }
        Ok(VerifyingKey { inner })
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.inner.to_bytes()
    }

    /// Strict verification of `signature` over `digest`. False for any signature that is not
    /// exactly 64 bytes, has a non-canonical scalar or a small-order `R`, or does not verify.
    pub fn verify(&self, digest: &Digest, signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.inner
            .verify_strict(digest.as_bytes(), &signature)
            .is_ok()
    }
}

/// Verifies many `(digest, signature, key)` triples at once; true only if all verify.
///
/// About twice as fast per signature as [`VerifyingKey::verify`] for batches of 64
/// (`shared/notes/crypto-costs.md`). On `false`, verify the items one by one to find the bad
/// ones. An empty batch is `true`.
///
/// Agreement caveat: every set of signatures that passes `verify` passes here, but not
/// conversely. A signer that crafts a signature whose `R` carries a torsion component can make
/// it pass a batch (roughly one batch composition in eight) while `verify` rejects it. So
/// where all replicas must reach the same verdict on a signer that may be faulty, either all
/// of them use `verify`, or the verdict is taken once (e.g. by the primary) and is not what
/// the others' safety depends on. Cheap pre-checks here reject the deterministic differences
/// (wrong lengths, non-canonical `R` encodings).
pub fn verify_batch(items: &[(&Digest, &[u8], &VerifyingKey)]) -> bool {
    if items.is_empty() {
        return true;
    }
    let mut messages: Vec<&[u8]> = Vec::with_capacity(items.len());
    let mut signatures = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    for (digest, signature, key) in items {
        let Ok(parsed) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        if !is_canonical_field_element(parsed.r_bytes()) {
            return false;
        }
        messages.push(digest.as_bytes());
        signatures.push(parsed);
        keys.push(key.inner);
    }
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
}

/// True if the low 255 bits of `encoding` (the y coordinate) are below p = 2^255 - 19.
///
/// `verify_strict` compares `R`'s bytes with a freshly compressed point, so it rejects a
/// non-canonical `R` outright; the batch equation decompresses `R` and would accept it.
fn is_canonical_field_element(encoding: &[u8; 32]) -> bool {
    // p in little-endian is ED FF .. FF 7F. y >= p only if bytes 1..31 are all FF, the top byte
    // (sign bit cleared) is 7F, and byte 0 is at least ED.
    let top = encoding[31] & 0x7f;
    let middle_all_ones = encoding[1..31].iter().all(|&byte| byte == 0xff);
    !(top == 0x7f && middle_all_ones && encoding[0] >= 0xed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u8) -> SigningKey {
        SigningKey::from_seed(&[index; 32])
    }

    fn message(index: u64) -> Digest {
        let mut builder = crate::DigestBuilder::new("tessera.test.sign.v1");
        builder.u64(index);
        builder.finish()
    }

    #[test]
    fn sign_then_verify() {
        let signer = key(1);
        let signature = signer.sign(&message(0));
        assert!(signer.verifying_key().verify(&message(0), &signature));
    }

    #[test]
    fn signing_is_deterministic_and_seed_round_trips() {
        let signer = key(1);
        assert_eq!(signer.sign(&message(0)), signer.sign(&message(0)));
        assert_eq!(signer.seed(), [1u8; 32]);
        let again = SigningKey::from_seed(&signer.seed());
        assert_eq!(again.verifying_key(), signer.verifying_key());
    }

    #[test]
    fn verify_rejects_wrong_key() {
        let signature = key(1).sign(&message(0));
        assert!(!key(2).verifying_key().verify(&message(0), &signature));
    }

    #[test]
    fn verify_rejects_wrong_message() {
        let signature = key(1).sign(&message(0));
        assert!(!key(1).verifying_key().verify(&message(1), &signature));
    }

    #[test]
    fn verify_rejects_wrong_lengths_without_panicking() {
        let signer = key(1);
        let signature = signer.sign(&message(0));
        let public = signer.verifying_key();
        assert!(!public.verify(&message(0), &signature[..63]));
        assert!(!public.verify(&message(0), &[]));
        let mut longer = signature.to_vec();
        longer.push(0);
        assert!(!public.verify(&message(0), &longer));
    }

    #[test]
    fn verify_rejects_tampered_signature() {
        let signer = key(1);
        let signature = signer.sign(&message(0));
        for byte in [0, 31, 32, 63] {
            let mut tampered = signature;
            tampered[byte] ^= 0x01;
            assert!(
                !signer.verifying_key().verify(&message(0), &tampered),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn verify_rejects_malleated_scalar() {
        // s + l is the classic malleation; strict verification requires s < l.
        const ORDER: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let signer = key(1);
        let mut signature = signer.sign(&message(0));
        let mut carry = 0u16;
        for index in 0..32 {
            let sum = signature[32 + index] as u16 + ORDER[index] as u16 + carry;
            signature[32 + index] = sum as u8;
            carry = sum >> 8;
        }
        assert!(!signer.verifying_key().verify(&message(0), &signature));
        assert!(!verify_batch(&[(
            &message(0),
            &signature,
            &signer.verifying_key()
        )]));
    }

    #[test]
    fn verifying_key_round_trips_bytes() {
        let public = key(3).verifying_key();
        assert_eq!(VerifyingKey::from_bytes(&public.to_bytes()), Ok(public));
    }

    #[test]
    fn verifying_key_rejects_bad_points() {
        // The identity (0, 1) is small order; y = 2 is not on the curve; y = p is non-canonical.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(VerifyingKey::from_bytes(&identity).is_err());
        let mut not_on_curve = [0u8; 32];
        not_on_curve[0] = 2;
        assert!(VerifyingKey::from_bytes(&not_on_curve).is_err());
        let mut y_is_p = [0xffu8; 32];
        y_is_p[0] = 0xed;
        y_is_p[31] = 0x7f;
        assert!(VerifyingKey::from_bytes(&y_is_p).is_err());
    }

    #[test]
    fn verifying_key_rejects_mixed_order_point() {
        // An honest key plus a point of order 2 (0, -1): on the curve, not small order, but
        // carrying torsion. Build it by adding through the dalek point types.
        let honest = key(4).verifying_key().inner.to_edwards();
        let mut minus_one = [0xffu8; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        let order_two = ed25519_dalek::VerifyingKey::from_bytes(&minus_one)
            .expect("(0, -1) is on the curve")
            .to_edwards();
        let mixed = (honest + order_two).compress().to_bytes();
        assert_eq!(
            VerifyingKey::from_bytes(&mixed),
            Err(CryptoError::InvalidPublicKey {
                reason: "point has a torsion component"
            })
        );
    }

    #[test]
    fn debug_does_not_print_the_seed() {
        let printed = format!("{:?}", key(9));
        assert!(printed.contains("SigningKey"));
        assert!(!printed.contains("9, 9, 9"));
    }

    #[test]
    fn batch_accepts_valid_and_empty() {
        let signers: Vec<SigningKey> = (0..8).map(key).collect();
        let messages: Vec<Digest> = (0..8).map(message).collect();
        let signatures: Vec<[u8; 64]> = signers
            .iter()
            .zip(&messages)
            .map(|(signer, digest)| signer.sign(digest))
            .collect();
        let publics: Vec<VerifyingKey> = signers.iter().map(SigningKey::verifying_key).collect();
        let items: Vec<(&Digest, &[u8], &VerifyingKey)> = (0..8)
            .map(|index| (&messages[index], &signatures[index][..], &publics[index]))
            .collect();
        assert!(verify_batch(&items));
        assert!(verify_batch(&[]));
    }

    #[test]
    fn batch_rejects_one_bad_item() {
        let signers: Vec<SigningKey> = (0..4).map(key).collect();
        let messages: Vec<Digest> = (0..4).map(message).collect();
        let signatures: Vec<[u8; 64]> = signers
            .iter()
            .zip(&messages)
            .map(|(signer, digest)| signer.sign(digest))
            .collect();
        let publics: Vec<VerifyingKey> = signers.iter().map(SigningKey::verifying_key).collect();
        let items = |swap_key: bool, message_index: usize, length: usize| {
            let mut items: Vec<(&Digest, &[u8], &VerifyingKey)> = (0..4)
                .map(|index| (&messages[index], &signatures[index][..], &publics[index]))
                .collect();
            let key_index = if swap_key { 3 } else { 2 };
            items[2] = (
                &messages[message_index],
                &signatures[2][..length],
                &publics[key_index],
            );
            verify_batch(&items)
        };
        assert!(items(false, 2, 64));
        assert!(!items(true, 2, 64), "wrong key");
        assert!(!items(false, 1, 64), "wrong message");
        assert!(!items(false, 2, 63), "truncated signature");
    }

    #[test]
    fn canonical_field_element_boundary() {
        let mut below_p = [0xffu8; 32];
        below_p[0] = 0xec;
        below_p[31] = 0x7f;
        assert!(is_canonical_field_element(&below_p));
        below_p[0] = 0xed;
        assert!(!is_canonical_field_element(&below_p));
        below_p[31] = 0xff; // sign bit set does not change y
        assert!(!is_canonical_field_element(&below_p));
        assert!(is_canonical_field_element(&[0u8; 32]));
    }
}
