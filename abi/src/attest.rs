//! Attestation: what Udom0 asks the builder for on its control link, and
//! what the tenant and Udom0 say to each other inside their TLS session.
//!
//! The trust flow (docs/architecture.md, "Attested launch"):
//! 1. the tenant opens TLS 1.3 to Udom0 through the builder's relay (the
//!    builder sees only ciphertext) and sends [`TenantMsg::Attest`] with a
//!    fresh nonce;
//! 2. Udom0 computes the binding ([`binding`]: the nonce, this session's TLS
//!    exporter value and Udom0's own public key) and sends it to the builder
//!    as `Body::QuoteRequest`;
//! 3. the builder quotes the meta-domain's vTPM with the binding as
//!    qualifying data, quotes the host TPM with qualifying data that binds
//!    the vTPM's attestation key to the same binding ([`host_binding`]),
//!    and answers with `Body::QuoteEvidence` ([`Evidence`], `postcard`);
//! 4. Udom0 passes the evidence to the tenant ([`Udom0Msg::Evidence`]),
//!    which verifies it before it sends anything secret.
//!
//! TPM structures travel marshalled exactly as the TPM produced them, so
//! `tpm2_checkquote` verifies the same bytes the tenant does.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Length of the tenant's nonce, in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of the TLS exporter value the binding uses, in bytes.
pub const EXPORTER_LEN: usize = 32;
/// Label of the TLS exporter (RFC 8446 §7.5) both ends compute.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-ssc-attestation";
/// The PCR every launch of a meta-domain is measured into, in both banks.
pub const LAUNCH_PCR: u8 = 9;
/// The host TPM's PCRs the provider's profile fixes: 8 holds the builder
/// (the `ssc` binary), 9 QEMU, 10 the firmware QEMU loads.
pub const HOST_PCRS: [u8; 3] = [8, 9, 10];
/// Largest frame of the tenant protocol inside TLS, in bytes.
pub const MAX_TENANT_FRAME: usize = 256 * 1024;

/// One TPM's quote, as the TPM marshalled it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// `TPMS_ATTEST` (the signed message; `tpm2_checkquote -m`).
    pub attest: Vec<u8>,
    /// `TPMT_SIGNATURE` (`tpm2_checkquote -s`).
    pub signature: Vec<u8>,
    /// `TPMT_PUBLIC` of the attestation key that signed.
    pub ak_public: Vec<u8>,
    /// The quoted PCR values, in the order of the quote's selection (bank
    /// by bank, PCRs ascending): concatenated, they are the file
    /// `tpm2_checkquote -f` reads.
    pub pcrs: Vec<PcrValue>,
}

/// One PCR of one bank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrValue {
    /// TPM algorithm id of the bank: [`ALG_SHA256`] or [`ALG_SHA384`].
    pub bank: u16,
    pub index: u8,
    pub value: Vec<u8>,
}

/// TPM_ALG_SHA256.
pub const ALG_SHA256: u16 = 0x000b;
/// TPM_ALG_SHA384.
pub const ALG_SHA384: u16 = 0x000c;

/// Everything the tenant checks, as the builder produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The meta-domain's vTPM, over [`LAUNCH_PCR`], qualifying data =
    /// [`binding`].
    pub vtpm: Quote,
    /// The TCG event log of every launch into the vTPM (crypto-agile
    /// format, as `tpm2_eventlog` reads it).
    pub event_log: Vec<u8>,
    /// The host TPM, over [`HOST_PCRS`], qualifying data =
    /// [`host_binding`] of the vTPM's attestation key.
    pub host: Quote,
}

/// What Udom0 says it bound into the vTPM quote; the tenant checks that
/// these hash to the quote's qualifying data, then compares each with its
/// own view of the session, so a mismatch names the attack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub nonce: [u8; NONCE_LEN],
    pub exporter: [u8; EXPORTER_LEN],
    /// Udom0's TLS public key, SubjectPublicKeyInfo DER.
    pub udom0_spki: Vec<u8>,
}

/// Tenant → Udom0, inside TLS (frames of [`encode_frame`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TenantMsg {
    /// Quote this session: a fresh nonce.
    Attest { nonce: [u8; NONCE_LEN] },
    /// After a verified attestation: keys for SDs, by domain name. Udom0
    /// keys each SD over the link the builder wired between them, and
    /// answers once every SD has taken (or refused) its key.
    Provision { keys: Vec<ProvisionKey> },
    /// The chain policy: which SD may do what to which client. Udom0 asks
    /// the builder for each grant and answers once all are decided.
    Grant { grants: Vec<GrantRequest> },
    /// Start the client VMs now, with the grants given.
    Launch,
    /// What Udom0 holds now (no secrets).
    Status,
}

/// A key the tenant hands Udom0 for one service domain.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionKey {
    pub domain: String,
    pub purpose: String,
    pub key: Vec<u8>,
    /// For purpose `volume`: the volume's layout, as the tenant's chain
    /// file and volume records give it (the key goes in beside it).
    pub volume: Option<VolumeParams>,
}

/// An encrypted volume's parameters, without the key (see
/// [`crate::VolumeConfig`], which Udom0 builds from these and the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeParams {
    pub export: String,
    pub cipher: String,
    pub sector_size: u32,
    pub data_offset: u64,
    pub iv_offset: u64,
    pub large_iv: bool,
    pub read_only: bool,
    pub native_header: bool,
    pub min_generation: u64,
}

impl VolumeParams {
    /// Everything of `cfg` but its key.
    pub fn of(cfg: &crate::VolumeConfig<'_>) -> Self {
        VolumeParams {
            export: cfg.export.into(),
            cipher: cfg.cipher.into(),
            sector_size: cfg.sector_size,
            data_offset: cfg.data_offset,
            iv_offset: cfg.iv_offset,
            large_iv: cfg.large_iv,
            read_only: cfg.read_only,
            native_header: cfg.native_header,
            min_generation: cfg.min_generation,
        }
    }

    /// The `ConfigureVolume` of these parameters with `key`.
    pub fn config<'a>(&'a self, key: &'a [u8]) -> crate::VolumeConfig<'a> {
        crate::VolumeConfig {
            export: &self.export,
            cipher: &self.cipher,
            key,
            sector_size: self.sector_size,
            data_offset: self.data_offset,
            iv_offset: self.iv_offset,
            large_iv: self.large_iv,
            read_only: self.read_only,
            native_header: self.native_header,
            min_generation: self.min_generation,
        }
    }
}

/// One grant of the tenant's chain policy (see `Body::Grant`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    pub sd: String,
    pub client: String,
    pub permission: String,
}

impl core::fmt::Debug for ProvisionKey {
    /// Everything but the key.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ProvisionKey {{ domain: {:?}, purpose: {:?}, key: <{} bytes>, volume: {:?} }}",
            self.domain,
            self.purpose,
            self.key.len(),
            self.volume
        )
    }
}

/// Udom0 → tenant, inside TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Udom0Msg {
    /// The builder's evidence for the tenant's nonce.
    Evidence { binding: Binding, evidence: Box<Evidence> },
    /// Keys taken: how many (each SD acknowledged its key).
    Provisioned { keys: u32 },
    /// Grants given by the builder: how many.
    Granted { grants: u32 },
    /// The builder is starting the client VMs.
    Launched,
    /// State, no secrets: attestations served, keys held per domain.
    Status { attestations: u64, keys: Vec<(String, String)> },
    /// The request failed; the message names why.
    Error { message: String },
}

/// Qualifying data of the vTPM quote: SHA-256 over a label, the tenant's
/// nonce, the TLS exporter value of this session and Udom0's public key
/// (SubjectPublicKeyInfo DER). Hashing is the caller's: this returns the
/// bytes to hash.
pub fn binding_input(nonce: &[u8; NONCE_LEN], exporter: &[u8; EXPORTER_LEN], udom0_spki: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + NONCE_LEN + EXPORTER_LEN + udom0_spki.len());
    v.extend_from_slice(b"ssc-attest-v1\0");
    v.extend_from_slice(nonce);
    v.extend_from_slice(exporter);
    v.extend_from_slice(&(udom0_spki.len() as u32).to_le_bytes());
    v.extend_from_slice(udom0_spki);
    v
}

/// Bytes whose SHA-256 is the host quote's qualifying data: a label, the
/// vTPM attestation key's `TPMT_PUBLIC` and the vTPM quote's qualifying
/// data. The host TPM thereby vouches for this vTPM key, for this session.
pub fn host_binding_input(vtpm_ak_public: &[u8], vtpm_qualifying: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + vtpm_ak_public.len() + vtpm_qualifying.len());
    v.extend_from_slice(b"ssc-host-vouches-vtpm-v1\0");
    v.extend_from_slice(&(vtpm_ak_public.len() as u32).to_le_bytes());
    v.extend_from_slice(vtpm_ak_public);
    v.extend_from_slice(vtpm_qualifying);
    v
}

/// A tenant-protocol frame: 4-byte little-endian length, then `postcard`.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_allocvec(msg)?;
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// Takes one complete frame off the front of `buf`: `Ok(None)` until one
/// is there, an error for a length over [`MAX_TENANT_FRAME`].
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, FrameTooLarge> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_TENANT_FRAME {
        return Err(FrameTooLarge { len });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = buf[4..4 + len].to_vec();
    buf.drain(..4 + len);
    Ok(Some(body))
}

/// A tenant-protocol frame announced more than [`MAX_TENANT_FRAME`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameTooLarge {
    pub len: usize,
}

impl core::fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "a tenant frame of {} bytes exceeds the {MAX_TENANT_FRAME}-byte limit", self.len)
    }
}
