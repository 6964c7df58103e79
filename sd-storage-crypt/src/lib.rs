//! Storage encryption SD core: the tenant's disk is served over NBD and
//! encrypted sector by sector before it reaches the provider's volume.
//!
//! * [`xts`]: `aes-xts-plain64` sector encryption, byte-compatible with
//!   dm-crypt and LUKS data segments (512-bit key = AES-256-XTS, tweak = the
//!   64-bit little-endian sector number), on the `aes` crate's parallel block
//!   API (AES-NI when the CPU has it, detected at run time);
//! * [`volume`]: a [`volume::CryptVolume`] over any [`volume::BlockDevice`]:
//!   byte-addressed reads and writes (read-modify-write at the edges),
//!   sector size 512 or 4096, IV offset and data offset as LUKS uses them;
//! * [`auth`]: the authenticated mode (`aes-256-gcm` per 4 KiB sector,
//!   tags and nonce counters in a metadata area, a Merkle root in a MACed
//!   header, crash-consistent commits, rollback caught by generation);
//! * [`nbd`]: a sans-IO NBD server (fixed newstyle handshake; options
//!   EXPORT_NAME, GO, INFO, LIST, ABORT; commands READ, WRITE, FLUSH, TRIM,
//!   WRITE_ZEROES, DISC) over any [`nbd::Backend`].
//!
//! Chosen crates: RustCrypto `aes` (no_std, constant-time, AES-NI with run-
//! time detection) and `aes-gcm` (the same `aes`, CLMUL GHASH). XTS itself is written here (40 lines) because the
//! `xts-mode` crate encrypts one block at a time, which leaves most of
//! AES-NI's pipeline idle; `xts-mode` stays as the reference in the tests.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod auth;
pub mod header;
pub mod nbd;
pub mod volume;
pub mod xts;
