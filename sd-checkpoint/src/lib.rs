//! Checkpoint SD core: a client VM's memory (read through a
//! [`GuestMemory`] window) and QEMU's device state become an encrypted,
//! authenticated stream; a stream (or a full checkpoint and its deltas)
//! becomes memory again, verified completely before the first page is
//! written.
//!
//! Sans-IO and `no_std`: the caller moves stream bytes ([`Saver`] hands out
//! records, [`Restorer`] reads through a [`Source`]); the image crate under
//! `kernels/` wires them to the window and its disk.
//!
//! ## Stream format (little-endian)
//!
//! A 96-byte [`Header`]: magic `SSCCKPT1`, version, flags (bit 0: lz4),
//! client id, memory size, generation, base generation (0 = full
//! checkpoint, else the generation this delta applies to), key id, a random
//! salt, page size (4096), pages per chunk. Then records, each
//! `kind: u8 ‖ seq: u32 ‖ len: u32 ‖ sealed payload (len bytes)`:
//!
//! * `PAGES`: `first page: u64 ‖ count: u32 ‖ present bitmap ‖ data`, data
//!   being the present pages (lz4 block, length-prefixed, when compressed).
//!   In a full checkpoint an absent page is zero; in a delta, unchanged.
//! * `DEVICE`: QEMU's device/CPU state (opaque).
//! * `END`: the number of records before it and of pages stored.
//!
//! Each payload is sealed with AES-256-GCM (`ring`) under a key derived
//! from the tenant key and the stream's salt, client id and generation
//! (HMAC-SHA256), with nonce = seq and AAD = SHA-256(header) ‖ kind ‖ seq.
//! So a flipped byte, a reordered, dropped or duplicated record, a record
//! from another checkpoint and a truncated stream (no `END`, or a count
//! that disagrees) all fail verification; a wrong key is named by the key
//! id before any decryption.
//!
//! ## Deltas
//! [`Saver`] keeps a 128-bit XXH3 hash per page of the last checkpoint it
//! wrote or restored; a delta stores only pages whose hash changed. XXH3 is
//! not collision-resistant: a client crafting a page to collide with its
//! own previous contents could make a delta miss that change — it can only
//! corrupt its own checkpoint, and a full checkpoint is always exact.
//!
//! Chosen crates: `ring` (AES-256-GCM at OpenSSL's speed, `no_std`), `lz4_flex`
//! (safe-only features, `no_std`), `xxhash-rust` (XXH3-128, `no_std`).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod format;
mod restore;
mod save;

pub use format::{CheckpointError, Header, Kind, PAGE};
pub use restore::{Restored, Restorer, Source};
pub use save::{PageHashes, SaveOptions, SaveStats, Saver};
pub use ssc_abi::memory::{GuestMemory, OutOfRange};

#[cfg(test)]
mod tests;
