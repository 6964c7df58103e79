//! Authenticated mode (`aes-256-gcm`): what dm-crypt cannot do. Every
//! 4096-byte sector is sealed with AES-256-GCM; its tag and nonce counter
//! live in a metadata area; a Merkle tree over that area has its root in a
//! MACed header, so a tampered, spliced or partly rolled-back volume is
//! refused at open, a tampered sector fails its read, and a whole-volume
//! rollback is caught by the generation number the tenant keeps.
//!
//! ## Why AES-256-GCM
//! AES-NI and carry-less multiply make it the fastest AEAD on the x86 hosts
//! we target, RustCrypto's `aes-gcm` is `no_std` and uses both with run-time
//! detection, and OpenSSL's `aes-256-gcm` is the anchor a tenant compares
//! against. Its weakness — a repeated nonce is fatal — is handled by
//! construction (below), not by chance: nonces are never random.
//!
//! ## Layout (device offsets)
//!
//! | where | what |
//! |---|---|
//! | 0, 4096 | header slots A and B (512 bytes used each) |
//! | 8192 | metadata copy 0: one 32-byte record per data sector |
//! | 8192 + M | metadata copy 1 (M = records rounded up to 4096) |
//! | data offset (MiB-aligned) | data sectors, 4096 bytes each |
//!
//! A record is `counter: u64 LE ‖ tag: [u8; 16] ‖ open salt: u64 LE`;
//! counter 0 means "never written, reads as zeroes" (a fresh volume needs
//! no initialisation, and TRIM/WRITE_ZEROES only clear records).
//!
//! Header (big-endian): magic `SSCVOL01`, version 3, cipher `aes-256-gcm`,
//! sector size, data offset, salt, key check (as in [`crate::header`]),
//! volume id, sectors, M, **generation**, **counter reservation**, the
//! metadata copy it describes, the **Merkle root** of that copy, an
//! HMAC-SHA256 over all of it (key derived from the tenant key), and a
//! SHA-256 checksum that tells damage from a wrong key.
//!
//! ## Nonces never repeat under one key
//! Nonce = sector (u32 BE) ‖ counter (u64 BE), AAD = volume id ‖ sector
//! (u64 BE). The counter is volume-wide and strictly increasing; the header
//! records a reservation R and counters are only used below a reservation
//! that is already durable. At open the SD resumes from R (skipping what the
//! last session may have used before a crash) and writes a new reservation
//! before its first write. So a crash can waste counters, never reuse them.
//!
//! That holds as long as the volume only moves forward. A provider who
//! rolls the volume back *together with* the tenant's generation record
//! (or a newer header slot lost after a kill) makes the SD resume at
//! counters it already used, and the same (sector, counter) would seal
//! different plaintexts: GCM then leaks their XOR and its hash key. So
//! each writable open draws a fresh random 64-bit **open salt**
//! ([`Access::ReadWrite`]) and seals under its own sub-key,
//! `HMAC-SHA256(data key, "ssc-auth-open-v1" ‖ salt)`; every record names
//! the salt it was sealed under (authenticated with the rest of the
//! metadata by the Merkle root). A rolled-back volume reopened writes under
//! a new sub-key, so no (key, nonce) pair ever seals twice (up to a 2^-64
//! chance per pair of opens that two salts collide). Salt 0 means the data
//! key itself: version-2 volumes (whose records carry zeroes there) open
//! and read as before, and their next commit writes a version-3 header.
//!
//! ## Crash consistency
//! Writes go to data sectors at once; their records change in memory. A
//! commit (NBD FLUSH, a client leaving, Shutdown) writes the changed
//! metadata blocks into the copy the current header does *not* describe,
//! flushes, writes the next header (generation + 1, that copy, its root)
//! into the other slot, and flushes again. At open the valid header with
//! the highest generation wins and its copy must hash to its root. So:
//! * a power cut before the header is durable leaves the previous header
//!   and its untouched copy: the volume opens at the last commit;
//! * a torn header fails its checksum/MAC: the other slot opens;
//! * data sectors overwritten after the last commit no longer match their
//!   committed tags: reading them fails with EIO (`IoError::Integrity`);
//!   a sector first written after the last commit reads as the zeroes it
//!   held at that commit. Never garbage, never another sector's data.
//!   Everything flushed reads back.
//!
//! The tests inject a crash after every single device write of a workload
//! and check these three statements on the device that remains.
//!
//! Memory: the SD holds the metadata (8 MiB per GiB of volume) and the
//! tree's leaves; a read checks its tag against memory, not the disk.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hmac::Mac;
use sha2::{Digest, Sha256};

use crate::header::{HeaderError, MAGIC, key_check, key_check_labelled};
use crate::volume::{BlockDevice, IoError, Sectors, check_range, read_bytes, write_bytes, write_zero_bytes};

/// The cipher name in headers and `ConfigureVolume`.
pub const CIPHER: &str = "aes-256-gcm";
/// Header version of authenticated volumes this code writes.
pub const VERSION: u32 = 3;
/// The version before per-open salts (records hold zeroes where the salt
/// now is); opened, read and upgraded at the first header write.
pub const LEGACY_VERSION: u32 = 2;

/// Whether a header version is an authenticated volume's.
pub fn is_auth_version(v: u32) -> bool {
    v == VERSION || v == LEGACY_VERSION
}

/// Sub-keys of earlier opens kept ready for reads.
const SEALER_CACHE: usize = 256;

/// How a volume is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    /// Writable: sectors this open writes are sealed under the sub-key of
    /// `salt`, which must be fresh random bytes (see the module docs).
    ReadWrite(OpenSalt),
}

/// A writable open's salt: random, never 0 (0 names the legacy key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenSalt(u64);

impl OpenSalt {
    /// The salt of 8 fresh random bytes.
    pub fn from_random(bytes: [u8; 8]) -> OpenSalt {
        OpenSalt(u64::from_le_bytes(bytes).max(1))
    }
}
/// Data sector size (fixed in this mode).
pub const SECTOR: u64 = 4096;
const RECORD: usize = 32;
const BLOCK: u64 = 4096;
const RECORDS_PER_BLOCK: u64 = BLOCK / RECORD as u64;
/// Offset of header slot B (slot A is at 0).
const SLOT: u64 = 4096;
const META: u64 = 2 * SLOT;
/// Counters reserved per header write.
const RESERVE: u64 = 1 << 20;
/// Integrity failures remembered until [`AuthVolume::take_failures`].
const MAX_FAILURES: usize = 64;

/// Where things sit on an authenticated volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Data sectors.
    pub sectors: u64,
    /// Bytes of one metadata copy.
    pub meta_len: u64,
    /// Device offset of data sector 0.
    pub data_offset: u64,
}

impl Geometry {
    fn with_sectors(sectors: u64) -> Geometry {
        let meta_len = (sectors * RECORD as u64).next_multiple_of(BLOCK);
        let data_offset = (META + 2 * meta_len).next_multiple_of(1 << 20);
        Geometry { sectors, meta_len, data_offset }
    }

    fn end(&self) -> u64 {
        self.data_offset + self.sectors * SECTOR
    }

    /// The largest geometry that fits a device of `size` bytes (sector
    /// numbers must fit the nonce's 32 bits: 16 TiB).
    pub fn for_device(size: u64) -> Option<Geometry> {
        let (mut lo, mut hi) = (0u64, (size / SECTOR).min(u64::from(u32::MAX)));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if Geometry::with_sectors(mid).end() <= size { lo = mid } else { hi = mid - 1 }
        }
        (lo > 0).then(|| Geometry::with_sectors(lo))
    }

    fn blocks(&self) -> usize {
        (self.meta_len / BLOCK) as usize
    }

    fn copy_offset(&self, copy: u8) -> u64 {
        META + u64::from(copy) * self.meta_len
    }
}

/// The header of an authenticated volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeader {
    /// [`VERSION`], or [`LEGACY_VERSION`] until the first header write.
    pub version: u32,
    pub salt: [u8; 32],
    pub key_check: [u8; 32],
    pub id: [u8; 16],
    pub geometry: Geometry,
    /// Bumped by every header write; the tenant keeps the latest it saw.
    pub generation: u64,
    /// Counters below this may have been used.
    pub reserved: u64,
    /// Which metadata copy (0 or 1) this header describes.
    pub copy: u8,
    /// Merkle root of that copy.
    pub root: [u8; 32],
}

const MAC_AT: usize = 208;
const SUM_AT: usize = 240;

impl AuthHeader {
    fn encode(&self, mac_key: &[u8; 32]) -> [u8; 512] {
        self.encode_as(mac_key, self.version)
    }

    fn encode_as(&self, mac_key: &[u8; 32], version: u32) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&version.to_be_bytes());
        b[12..12 + CIPHER.len()].copy_from_slice(CIPHER.as_bytes());
        b[44..48].copy_from_slice(&(SECTOR as u32).to_be_bytes());
        b[48..56].copy_from_slice(&self.geometry.data_offset.to_be_bytes());
        b[56..88].copy_from_slice(&self.salt);
        b[88..120].copy_from_slice(&self.key_check);
        b[120..136].copy_from_slice(&self.id);
        b[136..144].copy_from_slice(&self.geometry.sectors.to_be_bytes());
        b[144..152].copy_from_slice(&self.geometry.meta_len.to_be_bytes());
        b[152..160].copy_from_slice(&self.generation.to_be_bytes());
        b[160..168].copy_from_slice(&self.reserved.to_be_bytes());
        b[168] = self.copy;
        b[176..208].copy_from_slice(&self.root);
        let mac = header_mac(mac_key, &b[..MAC_AT]).finalize().into_bytes();
        b[MAC_AT..SUM_AT].copy_from_slice(&mac);
        let sum = Sha256::digest(&b[..SUM_AT]);
        b[SUM_AT..SUM_AT + 32].copy_from_slice(&sum);
        b
    }

    /// Parses a header slot without the key (its MAC is checked by
    /// [`AuthVolume::open`]).
    fn decode(b: &[u8]) -> Result<AuthHeader, HeaderError> {
        if b.len() < 512 || &b[0..8] != MAGIC {
            return Err(HeaderError::NotNative);
        }
        if Sha256::digest(&b[..SUM_AT])[..] != b[SUM_AT..SUM_AT + 32] {
            return Err(HeaderError::Corrupted);
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let cipher = &b[12..44];
        if !is_auth_version(u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")))
            || !cipher.starts_with(CIPHER.as_bytes())
            || cipher[CIPHER.len()..].iter().any(|&c| c != 0)
            || b[44..48] != (SECTOR as u32).to_be_bytes()
            || b[168] > 1
        {
            return Err(HeaderError::Unsupported);
        }
        let geometry = Geometry::with_sectors(u64_at(136));
        if geometry.meta_len != u64_at(144) || geometry.data_offset != u64_at(48) || geometry.sectors > u32::MAX.into()
        {
            return Err(HeaderError::Corrupted);
        }
        Ok(AuthHeader {
            version: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            salt: b[56..88].try_into().expect("32 bytes"),
            key_check: b[88..120].try_into().expect("32 bytes"),
            id: b[120..136].try_into().expect("16 bytes"),
            geometry,
            generation: u64_at(152),
            reserved: u64_at(160),
            copy: b[168],
            root: b[176..208].try_into().expect("32 bytes"),
        })
    }
}

fn header_mac(mac_key: &[u8; 32], bytes: &[u8]) -> hmac::Hmac<Sha256> {
    let mut mac = <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(mac_key).expect("any key length");
    mac.update(bytes);
    mac
}

/// The key check of an authenticated header of `version`: version 3 has a
/// label of its own, so its check cannot be copied into an XTS header
/// (version 1) to serve the volume without integrity; version 2 shared
/// the XTS label (and an upgraded volume keeps its salt, so a saved
/// version-2 header of it still could be: the tenant's record refuses that
/// downgrade).
fn auth_key_check(key: &[u8], version: u32, salt: &[u8; 32]) -> hmac::Hmac<Sha256> {
    if version == LEGACY_VERSION {
        key_check(key, salt)
    } else {
        key_check_labelled(key, b"ssc-auth-keycheck-v3", salt)
    }
}

/// Keys derived from the tenant's 64-byte volume key.
struct Keys {
    /// The version-3 key check of this volume's salt (what every header
    /// written from now on carries).
    check: [u8; 32],
    /// Salt 0: the data key itself (version-2 records).
    legacy: Sealer,
    data: [u8; 32],
    mac: [u8; 32],
}

fn derive(key: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

impl Keys {
    /// `id` is only known once a header is read; `format` has no data.
    fn new(key: &[u8], id: [u8; 16]) -> Keys {
        let data = derive(key, DATA_LABEL);
        Keys { check: [0; 32], legacy: Sealer::from_key(&data, id), data, mac: derive(key, b"ssc-auth-header-v1") }
    }

    /// The sealer of open salt `salt` (not 0).
    fn for_salt(&self, salt: u64) -> Sealer {
        let mut label = [0u8; 24];
        label[..16].copy_from_slice(b"ssc-auth-open-v1");
        label[16..].copy_from_slice(&salt.to_le_bytes());
        Sealer::from_key(&derive(&self.data, &label), self.legacy.id)
    }
}

/// The per-sector AEAD of one volume: AES-256-GCM with the nonce and AAD
/// described in the module docs. Public so the benchmark can measure it in
/// place, like the XTS core.
pub struct Sealer {
    aead: Aes256Gcm,
    id: [u8; 16],
    /// Names the key in the tests' log of every seal.
    #[cfg(test)]
    fingerprint: [u8; 8],
}

const DATA_LABEL: &[u8] = b"ssc-auth-data-v1";

/// Every seal the tests made: (key, sector, counter, SHA-256 of the
/// plaintext), to check that no (key, nonce) seals two plaintexts.
#[cfg(test)]
pub(crate) static SEALS: std::sync::Mutex<Vec<Seal>> = std::sync::Mutex::new(Vec::new());

/// (key fingerprint, sector, counter, SHA-256 of the plaintext).
#[cfg(test)]
pub(crate) type Seal = ([u8; 8], u64, u64, [u8; 32]);

impl Sealer {
    /// The sealer of volume `id` under the tenant's `key` (salt 0).
    pub fn new(key: &[u8], id: [u8; 16]) -> Sealer {
        Sealer::from_key(&derive(key, DATA_LABEL), id)
    }

    fn from_key(key: &[u8; 32], id: [u8; 16]) -> Sealer {
        Sealer {
            aead: Aes256Gcm::new(key.into()),
            id,
            #[cfg(test)]
            fingerprint: key[..8].try_into().expect("8 bytes"),
        }
    }

    fn nonce_aad(&self, sector: u64, counter: u64) -> (Nonce<aes_gcm::aead::consts::U12>, [u8; 24]) {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&(sector as u32).to_be_bytes());
        n[4..].copy_from_slice(&counter.to_be_bytes());
        let mut aad = [0u8; 24];
        aad[..16].copy_from_slice(&self.id);
        aad[16..].copy_from_slice(&sector.to_be_bytes());
        (n.into(), aad)
    }

    /// Encrypts `data` (one sector) in place; returns its tag. `counter`
    /// must never repeat under this key.
    pub fn seal(&self, sector: u64, counter: u64, data: &mut [u8]) -> [u8; 16] {
        #[cfg(test)]
        SEALS.lock().unwrap().push((self.fingerprint, sector, counter, Sha256::digest(&*data).into()));
        let (nonce, aad) = self.nonce_aad(sector, counter);
        self.aead.encrypt_inout_detached(&nonce, &aad, data.into()).expect("a sector is within GCM's limit").into()
    }

    /// Checks and decrypts `data` in place; `false` (and `data` unspecified)
    /// when the tag does not match.
    pub fn open(&self, sector: u64, counter: u64, data: &mut [u8], tag: &[u8; 16]) -> bool {
        let (nonce, aad) = self.nonce_aad(sector, counter);
        let tag: Tag = (*tag).into();
        self.aead.decrypt_inout_detached(&nonce, &aad, data.into(), &tag).is_ok()
    }
}

/// Leaf hash of one metadata block.
fn leaf(block: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update([0u8]).chain_update(block).finalize().into()
}

/// Merkle root over the leaves (an odd node moves up unchanged).
fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| match p {
                [l, r] => Sha256::new().chain_update([1u8]).chain_update(l).chain_update(r).finalize().into(),
                [one] => *one,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    level.first().copied().unwrap_or([0; 32])
}

/// The first header of a fresh authenticated volume on a device of
/// `device_size` bytes (all-zero metadata: nothing written yet). Write the
/// 512 bytes at offset 0; the rest of the device may stay sparse.
pub fn format(key: &[u8], device_size: u64, salt: [u8; 32], id: [u8; 16]) -> Result<[u8; 512], OpenError> {
    let geometry = Geometry::for_device(device_size).ok_or(OpenError::TooSmall(device_size))?;
    let leaves = vec![leaf(&[0u8; BLOCK as usize]); geometry.blocks()];
    let header = AuthHeader {
        version: VERSION,
        salt,
        key_check: auth_key_check(key, VERSION, &salt).finalize().into_bytes().into(),
        id,
        geometry,
        generation: 1,
        reserved: 1,
        copy: 0,
        root: merkle_root(&leaves),
    };
    Ok(header.encode(&derive(key, b"ssc-auth-header-v1")))
}

/// Why an authenticated volume does not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    Header(HeaderError),
    /// The device cannot hold the volume (truncated, or too small to format).
    TooSmall(u64),
    /// The device failed.
    Io,
    /// The header's MAC fails under this key although the key check passes.
    HeaderForged,
    /// The metadata does not hash to the committed root.
    MetadataTampered,
    /// An older state than the tenant last saw.
    RolledBack {
        found: u64,
        expected: u64,
    },
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OpenError::Header(e) => write!(f, "{e}"),
            OpenError::TooSmall(n) => {
                write!(f, "a device of {n} bytes cannot hold this authenticated volume (truncated?)")
            }
            OpenError::Io => write!(f, "the device failed while opening the volume"),
            OpenError::HeaderForged => write!(f, "the volume header fails its MAC: it was forged or tampered with"),
            OpenError::MetadataTampered => write!(
                f,
                "the volume's integrity metadata does not match its committed Merkle root: tampered, spliced or partly rolled back"
            ),
            OpenError::RolledBack { found, expected } => write!(
                f,
                "rolled back: the volume is at generation {found} but the tenant last saw {expected}; \
                 refusing an old copy of the volume"
            ),
        }
    }
}

impl From<HeaderError> for OpenError {
    fn from(e: HeaderError) -> Self {
        OpenError::Header(e)
    }
}

/// Per metadata block: which copies are behind memory, and whether its
/// leaf hash is stale.
const STALE_COPY0: u8 = 1;
const STALE_COPY1: u8 = 2;
const LEAF_STALE: u8 = 4;

/// An open authenticated volume.
pub struct AuthVolume<D: BlockDevice> {
    dev: D,
    keys: Box<Keys>,
    /// The durable header (the one the device opens at now).
    header: AuthHeader,
    meta: Vec<u8>,
    leaves: Vec<[u8; 32]>,
    flags: Vec<u8>,
    /// Next counter to use, and the end of the durable reservation.
    next: u64,
    limit: u64,
    dirty: bool,
    read_only: bool,
    /// This open's salt and sub-key (writable opens only).
    writer: Option<(u64, Sealer)>,
    /// Sub-keys of the earlier opens whose sectors were read lately.
    readers: alloc::collections::BTreeMap<u64, Sealer>,
    scratch: Vec<u8>,
    failures: Vec<u64>,
}

fn read_header_slot<D: BlockDevice>(dev: &mut D, at: u64) -> Result<(AuthHeader, [u8; 512]), OpenError> {
    let mut b = [0u8; 512];
    dev.read_at(at, &mut b).map_err(|_| OpenError::Io)?;
    Ok((AuthHeader::decode(&b)?, b))
}

impl<D: BlockDevice> AuthVolume<D> {
    /// Opens the volume: the key must pass the key check, the newest header
    /// with a valid MAC is chosen, its metadata copy must hash to its root,
    /// and its generation must be at least `min_generation` (what the
    /// tenant last saw).
    pub fn open(dev: D, key: &[u8], min_generation: u64, access: Access) -> Result<Self, OpenError> {
        Self::open_or_return(dev, key, min_generation, access).map_err(|(e, _)| e)
    }

    /// [`AuthVolume::open`] that hands the device back when it fails.
    pub fn open_or_return(mut dev: D, key: &[u8], min_generation: u64, access: Access) -> Result<Self, (OpenError, D)> {
        match Self::verify(&mut dev, key, min_generation) {
            Ok((keys, header, meta, leaves)) => {
                let writer = match access {
                    Access::ReadOnly => None,
                    Access::ReadWrite(OpenSalt(salt)) => Some((salt, keys.for_salt(salt))),
                };
                // The other copy is behind wherever its blocks differ;
                // without reading it, treat it as behind everywhere.
                let other = if header.copy == 0 { STALE_COPY1 } else { STALE_COPY0 };
                Ok(AuthVolume {
                    next: header.reserved,
                    limit: header.reserved,
                    flags: vec![other; header.geometry.blocks()],
                    dev,
                    keys,
                    header,
                    meta,
                    leaves,
                    dirty: false,
                    read_only: writer.is_none(),
                    writer,
                    readers: alloc::collections::BTreeMap::new(),
                    scratch: Vec::new(),
                    failures: Vec::new(),
                })
            }
            Err(e) => Err((e, dev)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn verify(
        dev: &mut D,
        key: &[u8],
        min_generation: u64,
    ) -> Result<(Box<Keys>, AuthHeader, Vec<u8>, Vec<[u8; 32]>), OpenError> {
        let slots = [read_header_slot(dev, 0), read_header_slot(dev, SLOT)];
        let decoded: Vec<&(AuthHeader, [u8; 512])> = slots.iter().filter_map(|s| s.as_ref().ok()).collect();
        let Some((first, _)) = decoded.first() else {
            return Err(slots[0].clone().expect_err("no slot decoded"));
        };
        auth_key_check(key, first.version, &first.salt)
            .verify_slice(&first.key_check)
            .map_err(|_| HeaderError::WrongKey)?;
        let mut keys = Box::new(Keys::new(key, first.id));
        keys.check = auth_key_check(key, VERSION, &first.salt).finalize().into_bytes().into();
        let header = decoded
            .iter()
            .filter(|(h, raw)| {
                h.id == first.id && header_mac(&keys.mac, &raw[..MAC_AT]).verify_slice(&raw[MAC_AT..SUM_AT]).is_ok()
            })
            .map(|(h, _)| h)
            .max_by_key(|h| h.generation)
            .cloned();
        let Some(header) = header else { return Err(OpenError::HeaderForged) };
        let g = header.geometry;
        if dev.size() < g.end() {
            return Err(OpenError::TooSmall(dev.size()));
        }
        let mut meta = vec![0u8; g.meta_len as usize];
        dev.read_at(g.copy_offset(header.copy), &mut meta).map_err(|_| OpenError::Io)?;
        let leaves: Vec<[u8; 32]> = meta.chunks(BLOCK as usize).map(leaf).collect();
        if merkle_root(&leaves) != header.root {
            return Err(OpenError::MetadataTampered);
        }
        if header.generation < min_generation {
            return Err(OpenError::RolledBack { found: header.generation, expected: min_generation });
        }
        Ok((keys, header, meta, leaves))
    }

    pub fn size(&self) -> u64 {
        self.header.geometry.sectors * SECTOR
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Generation of the durable header (report it to the tenant).
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// Sectors that failed authentication since the last call.
    pub fn take_failures(&mut self) -> Vec<u64> {
        core::mem::take(&mut self.failures)
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The sealer of open salt `salt`: this open's, the legacy key's (0),
    /// or an earlier open's sub-key (derived once, then cached).
    fn sealer(&mut self, salt: u64) -> &Sealer {
        if salt == 0 {
            return &self.keys.legacy;
        }
        if self.writer.as_ref().is_some_and(|(s, _)| *s == salt) {
            return &self.writer.as_ref().expect("just checked").1;
        }
        if !self.readers.contains_key(&salt) {
            if self.readers.len() >= SEALER_CACHE {
                self.readers.pop_first();
            }
            let sealer = self.keys.for_salt(salt);
            self.readers.insert(salt, sealer);
        }
        &self.readers[&salt]
    }

    /// A sector's (counter, tag, open salt).
    fn record(&self, sector: u64) -> (u64, [u8; 16], u64) {
        let r = &self.meta[sector as usize * RECORD..][..RECORD];
        (
            u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
            r[8..24].try_into().expect("16 bytes"),
            u64::from_le_bytes(r[24..32].try_into().expect("8 bytes")),
        )
    }

    fn set_record(&mut self, sector: u64, counter: u64, tag: &[u8; 16], salt: u64) {
        let r = &mut self.meta[sector as usize * RECORD..][..RECORD];
        r[..8].copy_from_slice(&counter.to_le_bytes());
        r[8..24].copy_from_slice(tag);
        r[24..32].copy_from_slice(&salt.to_le_bytes());
        self.flags[(sector / RECORDS_PER_BLOCK) as usize] = STALE_COPY0 | STALE_COPY1 | LEAF_STALE;
        self.dirty = true;
    }

    /// Writes `next` into the other header slot and flushes: the new
    /// durable state.
    fn write_header(&mut self, next: AuthHeader) -> Result<(), IoError> {
        // Every header written is version 3 (a version-2 volume upgrades).
        let next = AuthHeader { version: VERSION, key_check: self.keys.check, ..next };
        let at = if next.generation % 2 == 1 { 0 } else { SLOT };
        self.dev.write_at(at, &next.encode(&self.keys.mac))?;
        self.dev.flush()?;
        self.limit = next.reserved;
        self.header = next;
        Ok(())
    }

    /// Makes `n` more counters usable (a durable reservation first).
    fn reserve(&mut self, n: u64) -> Result<(), IoError> {
        if self.next + n <= self.limit {
            return Ok(());
        }
        let next = AuthHeader {
            generation: self.header.generation + 1,
            reserved: self.next + n.max(RESERVE),
            ..self.header.clone()
        };
        self.write_header(next)
    }

    /// Writes changed metadata into the spare copy, then a header that
    /// points at it (see the module docs).
    pub fn commit(&mut self) -> Result<(), IoError> {
        if !self.dirty {
            return self.dev.flush();
        }
        let copy = 1 - self.header.copy;
        let bit = if copy == 0 { STALE_COPY0 } else { STALE_COPY1 };
        let base = self.header.geometry.copy_offset(copy);
        let mut b = 0;
        while b < self.flags.len() {
            if self.flags[b] & bit == 0 {
                b += 1;
                continue;
            }
            let run = self.flags[b..].iter().take_while(|f| *f & bit != 0).count();
            let bytes = &self.meta[b * BLOCK as usize..(b + run) * BLOCK as usize];
            self.dev.write_at(base + b as u64 * BLOCK, bytes)?;
            for f in &mut self.flags[b..b + run] {
                *f &= !bit;
            }
            b += run;
        }
        for (i, f) in self.flags.iter_mut().enumerate() {
            if *f & LEAF_STALE != 0 {
                self.leaves[i] = leaf(&self.meta[i * BLOCK as usize..][..BLOCK as usize]);
                *f &= !LEAF_STALE;
            }
        }
        self.dev.flush()?;
        let next = AuthHeader {
            generation: self.header.generation + 1,
            copy,
            root: merkle_root(&self.leaves),
            reserved: self.limit,
            ..self.header.clone()
        };
        self.write_header(next)?;
        self.dirty = false;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_bytes(self, offset, buf)
    }

    /// Writes `data` at `offset` (read-modify-write at partial sectors).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        write_bytes(self, offset, data)
    }

    /// Zeroes a range: whole sectors only lose their record (they read as
    /// zeroes, nothing is written to the data area); partial ones are
    /// written as encrypted zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        check_range(self.size(), offset, len)?;
        let first = offset.div_ceil(SECTOR);
        let end = (offset + len) / SECTOR;
        if first >= end {
            return write_zero_bytes(self, offset, len);
        }
        write_zero_bytes(self, offset, first * SECTOR - offset)?;
        for s in first..end {
            if self.record(s).0 != 0 {
                self.set_record(s, 0, &[0; 16], 0);
            }
        }
        write_zero_bytes(self, end * SECTOR, offset + len - end * SECTOR)
    }
}

impl<D: BlockDevice> Sectors for AuthVolume<D> {
    fn sector_size(&self) -> u64 {
        SECTOR
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn byte_size(&self) -> u64 {
        self.size()
    }

    fn scratch(&mut self) -> &mut Vec<u8> {
        &mut self.scratch
    }

    fn read_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.dev.read_at(self.header.geometry.data_offset + first * SECTOR, buf)?;
        for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let sector = first + i as u64;
            let (counter, tag, salt) = self.record(sector);
            if counter == 0 {
                s.fill(0);
                continue;
            }
            if !self.sealer(salt).open(sector, counter, s, &tag) {
                s.fill(0);
                if self.failures.len() < MAX_FAILURES {
                    self.failures.push(sector);
                }
                return Err(IoError::Integrity);
            }
        }
        Ok(())
    }

    fn write_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let n = buf.len() as u64 / SECTOR;
        let Some((salt, _)) = self.writer else { return Err(IoError::ReadOnly) };
        self.reserve(n)?;
        for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let sector = first + i as u64;
            let counter = self.next;
            self.next += 1;
            let tag = self.writer.as_ref().expect("checked above").1.seal(sector, counter, s);
            self.set_record(sector, counter, &tag, salt);
        }
        self.dev.write_at(self.header.geometry.data_offset + first * SECTOR, buf)
    }
}

#[cfg(test)]
mod tests;
