//! The TPM 2.0 structures a quote is made of, read from the bytes the TPM
//! marshalled (big-endian, TPM2B = u16 length + bytes): `TPMS_ATTEST`,
//! `TPMT_SIGNATURE` and an ECC `TPMT_PUBLIC`; and the check of a quote's
//! signature against its attestation key.
//!
//! Only what attestation needs is parsed: a quote (`TPM_ST_ATTEST_QUOTE`)
//! signed with ECDSA over P-256 by a restricted signing key that never
//! leaves its TPM. Anything else is refused by name.

use alloc::vec::Vec;
use core::fmt;

use ssc_abi::attest::{ALG_SHA256, ALG_SHA384, PcrValue};

/// `TPM_GENERATED_VALUE`: the first word of everything a TPM signs itself.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
const ALG_ECC: u16 = 0x0023;
const ALG_ECDSA: u16 = 0x0018;
const ALG_NULL: u16 = 0x0010;
const ECC_NIST_P256: u16 = 0x0003;
/// objectAttributes bits: fixedTPM, fixedParent, sensitiveDataOrigin,
/// restricted, sign.
const ATTR_FIXED_TPM: u32 = 1 << 1;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_SIGN: u32 = 1 << 18;

/// A structure that does not parse, or is not what a quote must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TpmError {
    Truncated(&'static str),
    Trailing(&'static str),
    NotTpmGenerated(u32),
    NotAQuote(u16),
    Unsupported(&'static str, u16),
    NotAnAttestationKey(u32),
    BadSignature,
    PcrMismatch,
}

impl fmt::Display for TpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TpmError::Truncated(what) => write!(f, "{what} is truncated"),
            TpmError::Trailing(what) => write!(f, "{what} has bytes after its end"),
            TpmError::NotTpmGenerated(m) => {
                write!(f, "the attestation does not start with TPM_GENERATED_VALUE (got {m:#010x}): not made by a TPM")
            }
            TpmError::NotAQuote(t) => write!(f, "the attestation is of type {t:#06x}, not a quote (0x8018)"),
            TpmError::Unsupported(what, alg) => {
                write!(f, "{what} {alg:#06x} is not supported (ECDSA P-256 SHA-256 only)")
            }
            TpmError::NotAnAttestationKey(a) => write!(
                f,
                "the signing key's attributes {a:#010x} are not those of an attestation key (fixedTPM, restricted, sign)"
            ),
            TpmError::BadSignature => write!(f, "the quote's signature does not verify under its attestation key"),
            TpmError::PcrMismatch => write!(f, "the PCR values sent do not hash to the quote's PCR digest"),
        }
    }
}

/// A big-endian cursor over marshalled TPM bytes.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.b.len() < n {
            return Err(TpmError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, TpmError> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), TpmError> {
        if self.b.is_empty() { Ok(()) } else { Err(TpmError::Trailing(self.what)) }
    }
}

/// One bank's selection in a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrSelection {
    pub bank: u16,
    /// Selected PCR indexes, ascending.
    pub pcrs: Vec<u8>,
}

/// A parsed `TPMS_ATTEST` of a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    /// The qualifying data (`extraData`) the quote was asked with.
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    pub selection: Vec<PcrSelection>,
    /// Digest (the key's hash) of the selected PCR values, in selection order.
    pub pcr_digest: Vec<u8>,
}

impl QuoteInfo {
    pub fn parse(attest: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader { b: attest, what: "the quote's TPMS_ATTEST" };
        let magic = r.u32()?;
        if magic != TPM_GENERATED {
            return Err(TpmError::NotTpmGenerated(magic));
        }
        let kind = r.u16()?;
        if kind != ST_ATTEST_QUOTE {
            return Err(TpmError::NotAQuote(kind));
        }
        let _signer = r.tpm2b()?;
        let extra_data = r.tpm2b()?.to_vec();
        let clock = r.u64()?;
        let reset_count = r.u32()?;
        let restart_count = r.u32()?;
        let _safe = r.u8()?;
        let firmware_version = r.u64()?;
        let count = r.u32()?;
        if count > 16 {
            return Err(TpmError::Truncated("the quote's PCR selection"));
        }
        let mut selection = Vec::new();
        for _ in 0..count {
            let bank = r.u16()?;
            let size = r.u8()? as usize;
            let bits = r.take(size)?;
            let mut pcrs = Vec::new();
            for (byte, b) in bits.iter().enumerate() {
                for bit in 0..8 {
                    if b & (1 << bit) != 0 {
                        pcrs.push((byte * 8 + bit) as u8);
                    }
                }
            }
            selection.push(PcrSelection { bank, pcrs });
        }
        let pcr_digest = r.tpm2b()?.to_vec();
        r.end()?;
        Ok(QuoteInfo { extra_data, clock, reset_count, restart_count, firmware_version, selection, pcr_digest })
    }

    /// Whether `values` are exactly the selected PCRs, in order, and hash
    /// (SHA-256, the attestation key's scheme) to the quoted digest.
    pub fn matches(&self, values: &[PcrValue]) -> bool {
        let mut expected = self.selection.iter().flat_map(|s| s.pcrs.iter().map(move |&i| (s.bank, i)));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for v in values {
            if expected.next() != Some((v.bank, v.index)) || v.value.len() != bank_len(v.bank).unwrap_or(0) {
                return false;
            }
            ctx.update(&v.value);
        }
        expected.next().is_none() && ctx.finish().as_ref() == self.pcr_digest.as_slice()
    }
}

/// Digest length of a PCR bank.
pub fn bank_len(bank: u16) -> Option<usize> {
    match bank {
        ALG_SHA256 => Some(32),
        ALG_SHA384 => Some(48),
        _ => None,
    }
}

/// Name of a PCR bank, as tpm2-tools spells it.
pub fn bank_name(bank: u16) -> &'static str {
    match bank {
        ALG_SHA256 => "sha256",
        ALG_SHA384 => "sha384",
        _ => "unknown",
    }
}

/// An ECC P-256 attestation key, from its `TPMT_PUBLIC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttestationKey {
    /// Uncompressed SEC1 point (0x04 ‖ x ‖ y).
    pub point: [u8; 65],
}

impl AttestationKey {
    pub fn parse(public: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader { b: public, what: "the attestation key's TPMT_PUBLIC" };
        let kind = r.u16()?;
        if kind != ALG_ECC {
            return Err(TpmError::Unsupported("key type", kind));
        }
        let _name_alg = r.u16()?;
        let attrs = r.u32()?;
        if attrs & (ATTR_FIXED_TPM | ATTR_RESTRICTED | ATTR_SIGN) != ATTR_FIXED_TPM | ATTR_RESTRICTED | ATTR_SIGN {
            return Err(TpmError::NotAnAttestationKey(attrs));
        }
        let _policy = r.tpm2b()?;
        let sym = r.u16()?;
        if sym != ALG_NULL {
            return Err(TpmError::Unsupported("a signing key with symmetric algorithm", sym));
        }
        let scheme = r.u16()?;
        if scheme != ALG_ECDSA {
            return Err(TpmError::Unsupported("signature scheme", scheme));
        }
        let hash = r.u16()?;
        if hash != ALG_SHA256 {
            return Err(TpmError::Unsupported("scheme hash", hash));
        }
        let curve = r.u16()?;
        if curve != ECC_NIST_P256 {
            return Err(TpmError::Unsupported("curve", curve));
        }
        let kdf = r.u16()?;
        if kdf != ALG_NULL {
            r.u16()?;
        }
        let x = r.tpm2b()?;
        let y = r.tpm2b()?;
        r.end()?;
        if x.len() > 32 || y.len() > 32 {
            return Err(TpmError::Truncated("the attestation key's point"));
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[33 - x.len()..33].copy_from_slice(x);
        point[65 - y.len()..].copy_from_slice(y);
        Ok(AttestationKey { point })
    }

    /// Checks `signature` (`TPMT_SIGNATURE`) over `attest`.
    pub fn verify(&self, attest: &[u8], signature: &[u8]) -> Result<(), TpmError> {
        let mut r = Reader { b: signature, what: "the quote's TPMT_SIGNATURE" };
        let alg = r.u16()?;
        if alg != ALG_ECDSA {
            return Err(TpmError::Unsupported("signature algorithm", alg));
        }
        let hash = r.u16()?;
        if hash != ALG_SHA256 {
            return Err(TpmError::Unsupported("signature hash", hash));
        }
        let sr = r.tpm2b()?;
        let ss = r.tpm2b()?;
        r.end()?;
        if sr.len() > 32 || ss.len() > 32 {
            return Err(TpmError::BadSignature);
        }
        let mut fixed = [0u8; 64];
        fixed[32 - sr.len()..32].copy_from_slice(sr);
        fixed[64 - ss.len()..].copy_from_slice(ss);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &self.point[..])
            .verify(attest, &fixed)
            .map_err(|_| TpmError::BadSignature)
    }

    /// The key as SubjectPublicKeyInfo DER (what `tpm2_checkquote -u`
    /// takes as PEM).
    pub fn spki_der(&self) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING }
        const PREFIX: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let mut v = PREFIX.to_vec();
        v.extend_from_slice(&self.point);
        v
    }
}
