//! Key material and the operations on it.
//!
//! Secrets live in [`zeroize::Zeroizing`] buffers (the raw scalar, seed, AES
//! key or RSA PKCS#8) beside the parsed signer, and never leave this module
//! except sealed by [`wrap`].

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use p256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use pkcs8::der::Decode;
use rand_core::OsRng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, ED25519, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
    RSA_PKCS1_SHA256, RSA_PKCS1_SHA384, RSA_PKCS1_SHA512, RSA_PSS_SHA256, RSA_PSS_SHA384, RSA_PSS_SHA512, RsaKeyPair,
    UnparsedPublicKey,
};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use ssc_abi::hsm::{Hash, HsmError, KeyKind, KeyMaterial, SignMech, Usage};
use zeroize::Zeroizing;

const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// The parsed key, ready to use.
pub enum Secret {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Ed25519(Ed25519KeyPair),
    Rsa(alloc::boxed::Box<rsa::RsaPrivateKey>),
    Aes(alloc::boxed::Box<LessSafeKey>),
}

/// ring's signer for the mechanisms that hash inside (ring cannot sign a
/// caller's digest, but where the hash is ours its assembly is 3-6x faster
/// than the portable RustCrypto arithmetic).
pub enum Fast {
    /// P-256 with SHA-256, or P-384 with SHA-384.
    Ecdsa(alloc::boxed::Box<EcdsaKeyPair>, Hash),
    Rsa(alloc::boxed::Box<RsaKeyPair>),
}

/// One key: the parsed form and the raw bytes it came from (for wrapping).
pub struct KeyMaterialHeld {
    pub kind: KeyKind,
    pub secret: Secret,
    pub fast: Option<Fast>,
    /// EC scalar, Ed25519 seed, AES key, or RSA PKCS#8 DER.
    pub raw: Zeroizing<Vec<u8>>,
    pub public: Vec<u8>,
    pub exponent: Vec<u8>,
    pub bits: u32,
}

fn bad(why: impl Into<String>) -> HsmError {
    HsmError::BadKey { why: why.into() }
}

fn input(why: impl Into<String>) -> HsmError {
    HsmError::BadInput { why: why.into() }
}

/// Random bytes from the system (the image's RDSEED/RDRAND).
pub fn random(len: usize) -> Result<Vec<u8>, HsmError> {
    let mut v = alloc::vec![0u8; len];
    SystemRandom::new().fill(&mut v).map_err(|_| input("the random source failed"))?;
    Ok(v)
}

impl KeyMaterialHeld {
    /// Builds a key of `kind` from its raw form.
    pub fn from_raw(kind: KeyKind, raw: Zeroizing<Vec<u8>>) -> Result<Self, HsmError> {
        let (secret, public, exponent, bits) = match kind {
            KeyKind::EcP256 => {
                let k = p256::ecdsa::SigningKey::from_slice(&raw).map_err(|_| bad("not a P-256 scalar"))?;
                let p = k.verifying_key().to_encoded_point(false).as_bytes().to_vec();
                (Secret::P256(k), p, Vec::new(), 256)
            }
            KeyKind::EcP384 => {
                let k = p384::ecdsa::SigningKey::from_slice(&raw).map_err(|_| bad("not a P-384 scalar"))?;
                let p = k.verifying_key().to_encoded_point(false).as_bytes().to_vec();
                (Secret::P384(k), p, Vec::new(), 384)
            }
            KeyKind::Ed25519 => {
                let k = Ed25519KeyPair::from_seed_unchecked(&raw).map_err(|_| bad("not a 32-byte Ed25519 seed"))?;
                let p = k.public_key().as_ref().to_vec();
                (Secret::Ed25519(k), p, Vec::new(), 256)
            }
            KeyKind::Rsa => {
                use pkcs8::DecodePrivateKey;
                let k = rsa::RsaPrivateKey::from_pkcs8_der(&raw).map_err(|e| bad(alloc::format!("RSA PKCS#8: {e}")))?;
                let bits = k.size() as u32 * 8;
                if !(2048..=4096).contains(&bits) {
                    return Err(bad(alloc::format!("RSA-{bits}: DomC takes 2048 to 4096 bits")));
                }
                k.validate().map_err(|e| bad(alloc::format!("RSA key does not validate: {e}")))?;
                let (n, e) = (k.n().to_bytes_be(), k.e().to_bytes_be());
                (Secret::Rsa(alloc::boxed::Box::new(k)), n, e, bits)
            }
            KeyKind::Aes256 => {
                if raw.len() != 32 {
                    return Err(bad(alloc::format!("an AES-256 key is 32 bytes, not {}", raw.len())));
                }
                let k = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| bad("AES key"))?;
                (Secret::Aes(alloc::boxed::Box::new(LessSafeKey::new(k))), Vec::new(), Vec::new(), 256)
            }
        };
        let rng = SystemRandom::new();
        let fast = match kind {
            KeyKind::EcP256 => {
                EcdsaKeyPair::from_private_key_and_public_key(&ECDSA_P256_SHA256_FIXED_SIGNING, &raw, &public, &rng)
                    .ok()
                    .map(|k| Fast::Ecdsa(alloc::boxed::Box::new(k), Hash::Sha256))
            }
            KeyKind::EcP384 => {
                EcdsaKeyPair::from_private_key_and_public_key(&ECDSA_P384_SHA384_FIXED_SIGNING, &raw, &public, &rng)
                    .ok()
                    .map(|k| Fast::Ecdsa(alloc::boxed::Box::new(k), Hash::Sha384))
            }
            // ring takes e = 65537 and 2048-4096 bits; others go the slow way.
            KeyKind::Rsa => RsaKeyPair::from_pkcs8(&raw).ok().map(|k| Fast::Rsa(alloc::boxed::Box::new(k))),
            _ => None,
        };
        Ok(KeyMaterialHeld { kind, secret, fast, raw, public, exponent, bits })
    }

    /// A fresh key generated inside DomC (RSA is import only).
    pub fn generate(kind: KeyKind) -> Result<Self, HsmError> {
        let len = match kind {
            KeyKind::EcP256 | KeyKind::Ed25519 | KeyKind::Aes256 => 32,
            KeyKind::EcP384 => 48,
            KeyKind::Rsa => return Err(input("RSA keys are imported by the tenant (`ssc hsm import`), not generated")),
        };
        // A scalar out of range (probability ~2^-32 for P-256) is redrawn.
        for _ in 0..8 {
            let raw = Zeroizing::new(random(len)?);
            if let Ok(k) = Self::from_raw(kind, raw) {
                return Ok(k);
            }
        }
        Err(input("the random source gave no valid scalar"))
    }

    /// A tenant's key: PKCS#8 (EC, Ed25519, RSA) or raw AES.
    pub fn import(material: &KeyMaterial) -> Result<Self, HsmError> {
        match material {
            KeyMaterial::Aes256(b) => Self::from_raw(KeyKind::Aes256, Zeroizing::new(b.clone())),
            KeyMaterial::Pkcs8(der) => {
                let info = pkcs8::PrivateKeyInfo::from_der(der).map_err(|e| bad(alloc::format!("PKCS#8: {e}")))?;
                let oid = info.algorithm.oid.to_string();
                let param = info.algorithm.parameters_oid().ok().map(|o| o.to_string());
                match (oid.as_str(), param.as_deref()) {
                    (OID_EC, Some(OID_P256)) => {
                        use pkcs8::DecodePrivateKey;
                        let k = p256::SecretKey::from_pkcs8_der(der).map_err(|e| bad(alloc::format!("P-256: {e}")))?;
                        Self::from_raw(KeyKind::EcP256, Zeroizing::new(k.to_bytes().to_vec()))
                    }
                    (OID_EC, Some(OID_P384)) => {
                        use pkcs8::DecodePrivateKey;
                        let k = p384::SecretKey::from_pkcs8_der(der).map_err(|e| bad(alloc::format!("P-384: {e}")))?;
                        Self::from_raw(KeyKind::EcP384, Zeroizing::new(k.to_bytes().to_vec()))
                    }
                    (OID_EC, other) => Err(bad(alloc::format!("EC curve {other:?} is not supported (P-256 or P-384)"))),
                    (OID_ED25519, _) => {
                        // The private key is an OCTET STRING holding the seed.
                        let seed = info.private_key;
                        match seed {
                            [0x04, 32, rest @ ..] if rest.len() == 32 => {
                                Self::from_raw(KeyKind::Ed25519, Zeroizing::new(rest.to_vec()))
                            }
                            _ => Err(bad("Ed25519 PKCS#8 without a 32-byte seed")),
                        }
                    }
                    (OID_RSA, _) => Self::from_raw(KeyKind::Rsa, Zeroizing::new(der.clone())),
                    (other, _) => Err(bad(alloc::format!(
                        "key algorithm {other} is not supported (EC P-256/P-384, Ed25519, RSA)"
                    ))),
                }
            }
        }
    }

    /// The signature by ring, if this mechanism has a fast path.
    fn sign_fast(&self, mech: SignMech, data: &[u8]) -> Option<Result<Vec<u8>, HsmError>> {
        let rng = SystemRandom::new();
        let failed = |_| input("ring refused to sign");
        match (self.fast.as_ref()?, mech) {
            (Fast::Ecdsa(k, h), SignMech::Ecdsa { hash: Some(m) }) if *h == m => {
                Some(k.sign(&rng, data).map(|s| s.as_ref().to_vec()).map_err(failed))
            }
            (Fast::Rsa(k), SignMech::RsaPkcs1 { hash: Some(h) }) => {
                let pad = match h {
                    Hash::Sha256 => &RSA_PKCS1_SHA256,
                    Hash::Sha384 => &RSA_PKCS1_SHA384,
                    Hash::Sha512 => &RSA_PKCS1_SHA512,
                };
                let mut sig = alloc::vec![0u8; k.public().modulus_len()];
                Some(k.sign(pad, &rng, data, &mut sig).map(|()| sig).map_err(failed))
            }
            // ring's PSS salt is as long as the hash.
            (Fast::Rsa(k), SignMech::RsaPss { hash, prehashed: false, salt_len })
                if salt_len as usize == hash_len(hash) =>
            {
                let pad = match hash {
                    Hash::Sha256 => &RSA_PSS_SHA256,
                    Hash::Sha384 => &RSA_PSS_SHA384,
                    Hash::Sha512 => &RSA_PSS_SHA512,
                };
                let mut sig = alloc::vec![0u8; k.public().modulus_len()];
                Some(k.sign(pad, &rng, data, &mut sig).map(|()| sig).map_err(failed))
            }
            _ => None,
        }
    }

    pub fn sign(&self, mech: SignMech, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        if let Some(r) = self.sign_fast(mech, data) {
            return r;
        }
        let kind = self.kind;
        match (&self.secret, mech) {
            (Secret::P256(k), SignMech::Ecdsa { hash }) => {
                let d = prehash(hash, data, 16)?;
                let s: p256::ecdsa::Signature = k.sign_prehash(&d).map_err(|_| input("digest not signable"))?;
                Ok(s.to_bytes().to_vec())
            }
            (Secret::P384(k), SignMech::Ecdsa { hash }) => {
                let d = prehash(hash, data, 24)?;
                let s: p384::ecdsa::Signature = k.sign_prehash(&d).map_err(|_| input("digest not signable"))?;
                Ok(s.to_bytes().to_vec())
            }
            (Secret::Ed25519(k), SignMech::EdDsa) => Ok(k.sign(data).as_ref().to_vec()),
            (Secret::Rsa(k), SignMech::RsaPkcs1 { hash }) => {
                let scheme = pkcs1_scheme(hash);
                let d = match hash {
                    None => data.to_vec(),
                    Some(h) => digest(h, data),
                };
                k.sign_with_rng(&mut OsRng, scheme, &d).map_err(|e| input(alloc::format!("RSA PKCS#1: {e}")))
            }
            (Secret::Rsa(k), SignMech::RsaPss { hash, prehashed, salt_len }) => {
                let d = if prehashed { checked_digest(hash, data)? } else { digest(hash, data) };
                let scheme = pss_scheme(hash, salt_len as usize);
                k.sign_with_rng(&mut OsRng, scheme, &d).map_err(|e| input(alloc::format!("RSA-PSS: {e}")))
            }
            _ => Err(HsmError::WrongMechanism { kind }),
        }
    }

    pub fn verify(&self, mech: SignMech, data: &[u8], sig: &[u8]) -> Result<(), HsmError> {
        fn bad_sig<E>(_: E) -> HsmError {
            HsmError::SignatureInvalid
        }
        match (&self.secret, mech) {
            (Secret::P256(k), SignMech::Ecdsa { hash }) => {
                let d = prehash(hash, data, 16)?;
                let s = p256::ecdsa::Signature::from_slice(sig).map_err(bad_sig)?;
                k.verifying_key().verify_prehash(&d, &s).map_err(bad_sig)
            }
            (Secret::P384(k), SignMech::Ecdsa { hash }) => {
                let d = prehash(hash, data, 24)?;
                let s = p384::ecdsa::Signature::from_slice(sig).map_err(bad_sig)?;
                k.verifying_key().verify_prehash(&d, &s).map_err(bad_sig)
            }
            (Secret::Ed25519(k), SignMech::EdDsa) => UnparsedPublicKey::new(&ED25519, k.public_key().as_ref())
                .verify(data, sig)
                .map_err(|_| HsmError::SignatureInvalid),
            (Secret::Rsa(k), SignMech::RsaPkcs1 { hash }) => {
                let d = match hash {
                    None => data.to_vec(),
                    Some(h) => digest(h, data),
                };
                k.to_public_key().verify(pkcs1_scheme(hash), &d, sig).map_err(bad_sig)
            }
            (Secret::Rsa(k), SignMech::RsaPss { hash, prehashed, salt_len }) => {
                let d = if prehashed { checked_digest(hash, data)? } else { digest(hash, data) };
                k.to_public_key().verify(pss_scheme(hash, salt_len as usize), &d, sig).map_err(bad_sig)
            }
            _ => Err(HsmError::WrongMechanism { kind: self.kind }),
        }
    }

    fn aes(&self) -> Result<&LessSafeKey, HsmError> {
        match &self.secret {
            Secret::Aes(k) => Ok(k),
            _ => Err(HsmError::WrongMechanism { kind: self.kind }),
        }
    }

    /// AES-256-GCM: ciphertext ‖ 16-byte tag.
    pub fn encrypt(&self, iv: &[u8], aad: &[u8], data: &[u8]) -> Result<Vec<u8>, HsmError> {
        let k = self.aes()?;
        let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| input("AES-GCM takes a 12-byte IV"))?;
        let mut out = data.to_vec();
        k.seal_in_place_append_tag(nonce, Aad::from(aad), &mut out).map_err(|_| input("data too long"))?;
        Ok(out)
    }

    pub fn decrypt(&self, iv: &[u8], aad: &[u8], data: &[u8]) -> Result<Vec<u8>, HsmError> {
        let k = self.aes()?;
        let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| input("AES-GCM takes a 12-byte IV"))?;
        if data.len() < 16 {
            return Err(input("AES-GCM ciphertext shorter than its 16-byte tag"));
        }
        let mut buf = data.to_vec();
        let plain = k.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| HsmError::DecryptFailed)?;
        Ok(plain.to_vec())
    }
}

/// What a wrapped key's clear header holds: authenticated (the AAD), not
/// secret.
#[derive(Serialize, Deserialize)]
struct WrappedHeader {
    kind: KeyKind,
    usage: Usage,
}

/// First bytes of a wrapped key of format 2. Format 1 (before ABI 8) was a
/// bare nonce ‖ ciphertext under a constant AAD, with the policy inside:
/// whoever could decrypt with the wrapping key could rewrite the policy.
const WRAP_MAGIC: &[u8; 5] = b"SSCW\x02";
const WRAP_AAD_LABEL: &[u8] = b"ssc-hsm wrapped key v2";

fn wrap_aad(header: &[u8]) -> Vec<u8> {
    let mut aad = WRAP_AAD_LABEL.to_vec();
    aad.extend_from_slice(header);
    aad
}

/// `key` sealed under the AES key `wrapping`: magic ‖ header length (u16
/// LE) ‖ header (kind, usage) ‖ 12-byte nonce ‖ AES-256-GCM of the secret,
/// with the label and the header as AAD: the policy travels with the key
/// and cannot be changed without the tag failing.
pub fn wrap(wrapping: &KeyMaterialHeld, key: &KeyMaterialHeld, usage: Usage) -> Result<Vec<u8>, HsmError> {
    let header = postcard::to_allocvec(&WrappedHeader { kind: key.kind, usage }).map_err(|_| input("encode"))?;
    let iv = random(12)?;
    let mut out = WRAP_MAGIC.to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&iv);
    out.extend(wrapping.encrypt(&iv, &wrap_aad(&header), &key.raw)?);
    Ok(out)
}

/// The key and its usage from a [`wrap`] blob.
pub fn unwrap(wrapping: &KeyMaterialHeld, blob: &[u8]) -> Result<(KeyMaterialHeld, Usage), HsmError> {
    let Some(rest) = blob.strip_prefix(WRAP_MAGIC.as_slice()) else {
        return Err(bad(
            "not a wrapped key of format 2 (format-1 blobs, from DomC before ABI 8, are refused: their policy \
             was not authenticated)",
        ));
    };
    let n =
        rest.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(|| bad("wrapped key too short"))?;
    let header = rest.get(2..2 + n).ok_or_else(|| bad("wrapped key too short"))?;
    let sealed = &rest[2 + n..];
    if sealed.len() < 12 + 16 {
        return Err(bad("wrapped key too short"));
    }
    let raw = Zeroizing::new(wrapping.decrypt(&sealed[..12], &wrap_aad(header), &sealed[12..])?);
    let h: WrappedHeader =
        ssc_abi::hsm::decode_payload(header).ok_or_else(|| bad("wrapped key header does not decode"))?;
    let key = KeyMaterialHeld::from_raw(h.kind, raw)?;
    Ok((key, h.usage))
}

pub fn digest(h: Hash, data: &[u8]) -> Vec<u8> {
    let alg = match h {
        Hash::Sha256 => &ring::digest::SHA256,
        Hash::Sha384 => &ring::digest::SHA384,
        Hash::Sha512 => &ring::digest::SHA512,
    };
    ring::digest::digest(alg, data).as_ref().to_vec()
}

fn hash_len(h: Hash) -> usize {
    match h {
        Hash::Sha256 => 32,
        Hash::Sha384 => 48,
        Hash::Sha512 => 64,
    }
}

fn checked_digest(h: Hash, data: &[u8]) -> Result<Vec<u8>, HsmError> {
    if data.len() != hash_len(h) {
        return Err(input(alloc::format!("a {h:?} digest is {} bytes, not {}", hash_len(h), data.len())));
    }
    Ok(data.to_vec())
}

/// The digest an ECDSA signature covers: the caller's (at least `min`
/// bytes, as FIPS 186 truncation needs) or one computed here.
fn prehash(hash: Option<Hash>, data: &[u8], min: usize) -> Result<Vec<u8>, HsmError> {
    match hash {
        Some(h) => Ok(digest(h, data)),
        None if data.len() < min || data.len() > 64 => {
            Err(input(alloc::format!("CKM_ECDSA signs a digest of {min} to 64 bytes, not {} bytes", data.len())))
        }
        None => Ok(data.to_vec()),
    }
}

fn pkcs1_scheme(hash: Option<Hash>) -> rsa::Pkcs1v15Sign {
    match hash {
        None => rsa::Pkcs1v15Sign::new_unprefixed(),
        Some(Hash::Sha256) => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
        Some(Hash::Sha384) => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
        Some(Hash::Sha512) => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
    }
}

fn pss_scheme(hash: Hash, salt: usize) -> rsa::Pss {
    match hash {
        Hash::Sha256 => rsa::Pss::new_with_salt::<sha2::Sha256>(salt),
        Hash::Sha384 => rsa::Pss::new_with_salt::<sha2::Sha384>(salt),
        Hash::Sha512 => rsa::Pss::new_with_salt::<sha2::Sha512>(salt),
    }
}
