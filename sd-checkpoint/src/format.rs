//! The stream's header, records and keys.

use alloc::vec::Vec;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hmac};

pub const MAGIC: &[u8; 8] = b"SSCCKPT1";
pub const VERSION: u32 = 1;
/// Page size of every checkpoint.
pub const PAGE: usize = 4096;
pub const HEADER_LEN: usize = 96;
pub const RECORD_HEAD: usize = 9;
pub const TAG: usize = 16;
pub const FLAG_LZ4: u32 = 1;
/// Largest sealed payload accepted when reading (a chunk of 1024 pages plus
/// its bitmap, or a device state of up to 64 MiB).
pub const MAX_RECORD: usize = 64 << 20;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pages = 1,
    Device = 2,
    End = 3,
}

impl Kind {
    pub fn from_u8(k: u8) -> Option<Kind> {
        match k {
            1 => Some(Kind::Pages),
            2 => Some(Kind::Device),
            3 => Some(Kind::End),
            _ => None,
        }
    }
}

/// Why a checkpoint was refused. Nothing has been written to guest memory
/// when any of these is returned by verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointError {
    /// Not a checkpoint stream (magic) or an unsupported version.
    NotACheckpoint,
    /// The header is inconsistent (page size, chunk size, flags).
    BadHeader(&'static str),
    /// The key does not match the checkpoint's key id.
    WrongKey,
    /// The stream ends before its `END` record.
    Truncated { at: u64 },
    /// A record fails authentication: flipped bytes, reordering, or a
    /// record spliced from another checkpoint.
    Tampered { seq: u32 },
    /// A record decrypts but its contents are malformed.
    Malformed { seq: u32, what: &'static str },
    /// The checkpoint is for a different client or memory size.
    Mismatch(&'static str),
    /// Deltas do not chain: a delta's base is not the previous generation.
    BrokenChain { expected: u64, found: u64 },
    /// A stream is another generation than the one asked for (a record
    /// pointing a generation's name at another checkpoint).
    WrongGeneration { asked: u64, found: u64 },
    /// The stream source or the guest memory failed.
    Io(&'static str),
}

impl core::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CheckpointError::NotACheckpoint => write!(f, "not a checkpoint stream (bad magic or version)"),
            CheckpointError::BadHeader(w) => write!(f, "checkpoint header is invalid: {w}"),
            CheckpointError::WrongKey => write!(f, "wrong key: this checkpoint was sealed with another key"),
            CheckpointError::Truncated { at } => write!(f, "checkpoint is truncated (stream ends at byte {at})"),
            CheckpointError::Tampered { seq } => write!(
                f,
                "checkpoint record {seq} fails authentication (tampered, reordered, or from another checkpoint)"
            ),
            CheckpointError::Malformed { seq, what } => write!(f, "checkpoint record {seq} is malformed: {what}"),
            CheckpointError::Mismatch(what) => write!(f, "checkpoint does not fit this client: {what}"),
            CheckpointError::BrokenChain { expected, found } => {
                write!(f, "delta applies to generation {found}, but the chain is at generation {expected}")
            }
            CheckpointError::WrongGeneration { asked, found } => write!(
                f,
                "the stream given for generation {asked} is generation {found}: the record points at another checkpoint"
            ),
            CheckpointError::Io(what) => write!(f, "I/O error: {what}"),
        }
    }
}

impl core::error::Error for CheckpointError {}

/// A checkpoint's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub client_id: [u8; 16],
    pub memory_size: u64,
    pub generation: u64,
    /// 0 for a full checkpoint.
    pub base_generation: u64,
    pub key_id: [u8; 8],
    pub salt: [u8; 16],
    pub pages_per_chunk: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.client_id);
        b[32..40].copy_from_slice(&self.memory_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.generation.to_le_bytes());
        b[48..56].copy_from_slice(&self.base_generation.to_le_bytes());
        b[56..64].copy_from_slice(&self.key_id);
        b[64..80].copy_from_slice(&self.salt);
        b[80..84].copy_from_slice(&(PAGE as u32).to_le_bytes());
        b[84..88].copy_from_slice(&self.pages_per_chunk.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, CheckpointError> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC || b[8..12] != VERSION.to_le_bytes() {
            return Err(CheckpointError::NotACheckpoint);
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Header {
            flags: u32_at(12),
            client_id: b[16..32].try_into().expect("16 bytes"),
            memory_size: u64_at(32),
            generation: u64_at(40),
            base_generation: u64_at(48),
            key_id: b[56..64].try_into().expect("8 bytes"),
            salt: b[64..80].try_into().expect("16 bytes"),
            pages_per_chunk: u32_at(84),
        };
        if u32_at(80) != PAGE as u32 {
            return Err(CheckpointError::BadHeader("page size is not 4096"));
        }
        if h.pages_per_chunk == 0 || h.pages_per_chunk > 1024 {
            return Err(CheckpointError::BadHeader("pages per chunk is not 1..=1024"));
        }
        if h.flags & !FLAG_LZ4 != 0 {
            return Err(CheckpointError::BadHeader("unknown flags"));
        }
        if !h.memory_size.is_multiple_of(PAGE as u64) || h.memory_size == 0 {
            return Err(CheckpointError::BadHeader("memory size is not a whole number of pages"));
        }
        if h.generation == 0 || h.base_generation >= h.generation {
            return Err(CheckpointError::BadHeader("generation numbers are inconsistent"));
        }
        if b[88..96].iter().any(|&x| x != 0) {
            return Err(CheckpointError::BadHeader("reserved bytes are not zero"));
        }
        Ok(h)
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_LZ4 != 0
    }

    pub fn pages(&self) -> u64 {
        self.memory_size / PAGE as u64
    }
}

/// The key id of a tenant key: lets a restore say "wrong key" up front.
pub fn key_id(key: &[u8]) -> [u8; 8] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), b"ssc-checkpoint-key-id-v1");
    tag.as_ref()[..8].try_into().expect("8 bytes")
}

/// The sealing context of one stream.
pub struct Sealer {
    key: LessSafeKey,
    header_hash: [u8; 32],
}

impl Sealer {
    pub fn new(tenant_key: &[u8], header: &Header) -> Sealer {
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(b"ssc-checkpoint-stream-v1");
        info.extend_from_slice(&header.salt);
        info.extend_from_slice(&header.client_id);
        info.extend_from_slice(&header.generation.to_le_bytes());
        let k = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, tenant_key), &info);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_ref()).expect("32-byte key"));
        let header_hash = digest::digest(&digest::SHA256, &header.encode()).as_ref().try_into().expect("32 bytes");
        Sealer { key, header_hash }
    }

    fn nonce_aad(&self, kind: Kind, seq: u32) -> (Nonce, [u8; 37]) {
        let mut n = [0u8; 12];
        n[8..].copy_from_slice(&seq.to_le_bytes());
        let mut aad = [0u8; 37];
        aad[..32].copy_from_slice(&self.header_hash);
        aad[32] = kind as u8;
        aad[33..].copy_from_slice(&seq.to_le_bytes());
        (Nonce::assume_unique_for_key(n), aad)
    }

    /// Starts a record in `out`: a head whose length [`Sealer::seal_record`]
    /// fills in; the payload is then appended to `out` directly (no copy).
    pub fn begin_record(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0u8; RECORD_HEAD]);
        start
    }

    /// Seals the payload written after the head at `start` (in place, tag
    /// appended) and completes the head.
    pub fn seal_record(&self, kind: Kind, seq: u32, out: &mut Vec<u8>, start: usize) {
        let (nonce, aad) = self.nonce_aad(kind, seq);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[start + RECORD_HEAD..])
            .expect("record within GCM's limit");
        out.extend_from_slice(tag.as_ref());
        let len = (out.len() - start - RECORD_HEAD) as u32;
        out[start] = kind as u8;
        out[start + 1..start + 5].copy_from_slice(&seq.to_le_bytes());
        out[start + 5..start + 9].copy_from_slice(&len.to_le_bytes());
    }

    /// Opens a sealed payload in place; returns the plaintext part.
    pub fn open<'a>(&self, kind: Kind, seq: u32, sealed: &'a mut [u8]) -> Result<&'a mut [u8], CheckpointError> {
        let (nonce, aad) = self.nonce_aad(kind, seq);
        self.key.open_in_place(nonce, Aad::from(aad), sealed).map_err(|_| CheckpointError::Tampered { seq })
    }
}
