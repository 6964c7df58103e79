//! The native volume header: what lets the SD refuse a wrong key at open
//! instead of serving garbage (raw XTS has no way to tell).
//!
//! Sector 0 of a native volume (512 bytes, big-endian integers):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SSCVOL01` |
//! | 8..12 | version (1) |
//! | 12..44 | cipher, NUL-padded (`aes-xts-plain64`) |
//! | 44..48 | sector size (512 or 4096) |
//! | 48..56 | data offset in bytes (1 MiB by default) |
//! | 56..88 | salt (random) |
//! | 88..120 | key check: HMAC-SHA256(key, "ssc-volume-key-check-v1" ‖ salt) |
//! | 120..136 | volume id (random) |
//! | 136..168 | SHA-256 of bytes 0..136 (tells corruption from a wrong key) |
//!
//! The key check reveals nothing useful about the key (HMAC, random salt)
//! and is compared in constant time.

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

/// First bytes of a native volume.
pub const MAGIC: &[u8; 8] = b"SSCVOL01";
/// Bytes the header occupies.
pub const HEADER_LEN: usize = 512;
/// Default data offset (1 MiB: room for the header, aligned like LUKS).
pub const DEFAULT_DATA_OFFSET: u64 = 1 << 20;
const CHECK_LABEL: &[u8] = b"ssc-volume-key-check-v1";

/// The header version in sector 0 (1: [`VolumeHeader`], 2: an
/// authenticated volume, see [`crate::auth`]), if it has our magic.
pub fn version(sector0: &[u8]) -> Option<u32> {
    (sector0.len() >= 12 && &sector0[0..8] == MAGIC)
        .then(|| u32::from_be_bytes(sector0[8..12].try_into().expect("4 bytes")))
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHeader {
    pub sector_size: u32,
    pub data_offset: u64,
    pub salt: [u8; 32],
    pub key_check: [u8; 32],
    pub id: [u8; 16],
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// No native header (a raw or LUKS volume, or not formatted).
    NotNative,
    /// A header whose checksum fails: the volume was damaged or tampered.
    Corrupted,
    /// A version or cipher this SD does not serve.
    Unsupported,
    /// The key does not open this volume.
    WrongKey,
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            HeaderError::NotNative => "no native volume header (create volumes with `ssc volume create`)",
            HeaderError::Corrupted => "the volume header is corrupted (checksum mismatch)",
            HeaderError::Unsupported => "the volume header has an unsupported version or cipher",
            HeaderError::WrongKey => "wrong key: it does not open this volume",
        })
    }
}

pub(crate) fn key_check(key: &[u8], salt: &[u8; 32]) -> hmac::Hmac<Sha256> {
    key_check_labelled(key, CHECK_LABEL, salt)
}

/// A key check under a format's own label, so that one format's check
/// cannot be copied into another's header.
pub(crate) fn key_check_labelled(key: &[u8], label: &[u8], salt: &[u8; 32]) -> hmac::Hmac<Sha256> {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(salt);
    mac
}

impl VolumeHeader {
    /// A header for `key` with the given randomness (salt and id).
    pub fn new(key: &[u8], sector_size: u32, data_offset: u64, salt: [u8; 32], id: [u8; 16]) -> Self {
        let key_check = key_check(key, &salt).finalize().into_bytes().into();
        VolumeHeader { sector_size, data_offset, salt, key_check, id }
    }

    /// The 512 bytes of sector 0.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        b[12..12 + 15].copy_from_slice(b"aes-xts-plain64");
        b[44..48].copy_from_slice(&self.sector_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.data_offset.to_be_bytes());
        b[56..88].copy_from_slice(&self.salt);
        b[88..120].copy_from_slice(&self.key_check);
        b[120..136].copy_from_slice(&self.id);
        let sum = Sha256::digest(&b[..136]);
        b[136..168].copy_from_slice(&sum);
        b
    }

    /// Parses sector 0.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
            return Err(HeaderError::NotNative);
        }
        if Sha256::digest(&b[..136])[..] != b[136..168] {
            return Err(HeaderError::Corrupted);
        }
        let cipher = &b[12..44];
        if b[8..12] != 1u32.to_be_bytes()
            || !cipher.starts_with(b"aes-xts-plain64")
            || cipher[15..].iter().any(|&c| c != 0)
        {
            return Err(HeaderError::Unsupported);
        }
        let sector_size = u32::from_be_bytes(b[44..48].try_into().expect("4 bytes"));
        let data_offset = u64::from_be_bytes(b[48..56].try_into().expect("8 bytes"));
        Ok(VolumeHeader {
            sector_size,
            data_offset,
            salt: b[56..88].try_into().expect("32 bytes"),
            key_check: b[88..120].try_into().expect("32 bytes"),
            id: b[120..136].try_into().expect("16 bytes"),
        })
    }

    /// Checks `key` against the header, in constant time.
    pub fn verify_key(&self, key: &[u8]) -> Result<(), HeaderError> {
        key_check(key, &self.salt).verify_slice(&self.key_check).map_err(|_| HeaderError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> VolumeHeader {
        VolumeHeader::new(&[7; 64], 4096, DEFAULT_DATA_OFFSET, [1; 32], [2; 16])
    }

    #[test]
    fn round_trips_and_opens_with_its_key_only() {
        let h = header();
        let d = VolumeHeader::decode(&h.encode()).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.verify_key(&[7; 64]), Ok(()));
        assert_eq!(d.verify_key(&[8; 64]), Err(HeaderError::WrongKey));
        assert!(std::format!("{}", HeaderError::WrongKey).contains("wrong key"));
    }

    #[test]
    fn foreign_damaged_and_unsupported_headers_are_told_apart() {
        assert_eq!(VolumeHeader::decode(&[0; 512]), Err(HeaderError::NotNative));
        assert_eq!(VolumeHeader::decode(b"SSCVOL01"), Err(HeaderError::NotNative));
        let mut b = header().encode();
        b[50] ^= 1;
        assert_eq!(VolumeHeader::decode(&b), Err(HeaderError::Corrupted));
        let mut b = header().encode();
        b[11] = 2;
        let sum = Sha256::digest(&b[..136]);
        b[136..168].copy_from_slice(&sum);
        assert_eq!(VolumeHeader::decode(&b), Err(HeaderError::Unsupported));
    }
}
