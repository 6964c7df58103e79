//! Memory deduplication SD core: finds identical pages within and across
//! one tenant's client VMs and produces a sharing plan.
//!
//! Sans-IO, `no_std`, no unsafe: it reads guest memory through the
//! [`GuestMemory`] trait (the image's memory windows; buffers in tests and
//! benchmarks) and returns a [`Plan`]. The image crate (`kernels/dedup`)
//! sends the plan on its control link; the builder applies what stock
//! QEMU/KVM allows (punching zero pages out of a client's memory file).
//!
//! ## How a scan works
//! 1. Every allocated page of every client is read once (in batches) and
//!    hashed with XXH3-64 (`xxhash-rust`: `no_std`, the fastest
//!    well-kept non-cryptographic page hash we measured; the checkpoint
//!    core uses its 128-bit sibling). Holes of a memory file (pages the
//!    builder says are not allocated) are known zero and never read:
//!    reading a hole of a shared-memory file would allocate it.
//! 2. A zero page is one whose every byte is zero (the hash only
//!    pre-selects). Runs of allocated zero pages are what the builder can
//!    punch out of a memory file.
//! 3. Non-zero pages are sorted by hash; pages sharing a hash are compared
//!    byte for byte (each against the first page of each class), so a hash
//!    collision splits into separate groups: **no false merges, ever**.
//!    Guest memory may change under the scan (clients keep running); a
//!    page that changed between its hash and its comparison simply fails
//!    the comparison and is left out — a plan is a hint that the builder
//!    re-checks before acting, never a licence to overwrite.
//!
//! Why sort rather than a hash map: one `Vec` of 16-byte entries sorted in
//! place is deterministic, allocation-light and needs no extra crate.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

pub mod wire;

pub use ssc_abi::memory::{GuestMemory, OutOfRange};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// Pages read per batch.
const BATCH: usize = 64;
/// Bytes scanned between two progress calls.
const PROGRESS_STEP: u64 = 64 << 20;

/// The page hash: XXH3-64.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// One client to scan: its memory and, if known, the allocated byte
/// ranges of its memory file (everything else is a hole: zero, unread).
pub struct Client<'a> {
    pub memory: &'a dyn GuestMemory,
    pub extents: Option<Vec<(u64, u64)>>,
}

/// A page of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRef {
    pub client: u32,
    pub page: u64,
}

/// Pages with identical, non-zero content (two or more).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Sorted by client, then page.
    pub members: Vec<PageRef>,
}

/// What a scan found in one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClientStats {
    /// Pages of guest memory.
    pub pages: u64,
    /// Pages read (allocated in the memory file).
    pub pages_read: u64,
    /// Zero pages, holes included.
    pub zero_pages: u64,
    /// Zero pages that are allocated: what punching holes returns.
    pub zero_allocated: u64,
    /// Non-zero pages that duplicate another page of the same client.
    pub dup_within: u64,
    /// Non-zero pages that duplicate a page only other clients hold.
    pub dup_across: u64,
}

/// The result of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub clients: Vec<ClientStats>,
    /// Per client: runs `(first page, count)` of allocated zero pages.
    pub zero_runs: Vec<Vec<(u64, u64)>>,
    pub groups: Vec<Group>,
    /// Pages whose content changed while they were scanned (left out).
    pub changed: u64,
}

impl Plan {
    /// Non-zero pages that sharing one copy per group would free.
    pub fn duplicate_pages(&self) -> u64 {
        self.groups.iter().map(|g| g.members.len() as u64 - 1).sum()
    }

    /// Bytes that sharing would save: every duplicate beyond the first of
    /// its group, and every allocated zero page (all can share the zero
    /// page, or be punched out).
    pub fn bytes_saved(&self) -> u64 {
        (self.duplicate_pages() + self.clients.iter().map(|c| c.zero_allocated).sum::<u64>()) * PAGE as u64
    }
}

/// Why a scan failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DedupError {
    /// A window's size is not a whole number of pages.
    Unaligned {
        client: u32,
        size: u64,
    },
    /// Reading a client's memory failed.
    Read {
        client: u32,
        error: OutOfRange,
    },
    TooManyClients,
}

impl core::fmt::Display for DedupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DedupError::Unaligned { client, size } => {
                write!(f, "client {client}'s memory ({size} bytes) is not a whole number of 4 KiB pages")
            }
            DedupError::Read { client, error } => write!(f, "client {client}: {error}"),
            DedupError::TooManyClients => write!(f, "more clients than a scan can name"),
        }
    }
}

/// Called with (bytes scanned, bytes in all) as the scan goes.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Sorted, in-range allocated extents → which pages are allocated.
struct Allocated {
    extents: Option<Vec<(u64, u64)>>,
    at: usize,
}

impl Allocated {
    fn new(extents: Option<Vec<(u64, u64)>>) -> Self {
        let extents = extents.map(|mut e| {
            e.sort_unstable();
            e
        });
        Allocated { extents, at: 0 }
    }

    /// Whether page `p` is allocated (pages are asked in increasing order).
    fn has(&mut self, p: u64) -> bool {
        let Some(ext) = &self.extents else { return true };
        let (start, end) = (p * PAGE as u64, (p + 1) * PAGE as u64);
        while self.at < ext.len() && ext[self.at].0.saturating_add(ext[self.at].1) <= start {
            self.at += 1;
        }
        self.at < ext.len() && ext[self.at].0 < end
    }
}

/// Scans `clients` with XXH3-64 as the pre-selecting hash.
pub fn scan(clients: &[Client<'_>], progress: Progress<'_>) -> Result<Plan, DedupError> {
    scan_with(clients, page_hash, progress)
}

/// Scans with `hash` (tests pass a weak one to force collisions).
pub fn scan_with(clients: &[Client<'_>], hash: fn(&[u8]) -> u64, progress: Progress<'_>) -> Result<Plan, DedupError> {
    let n = u32::try_from(clients.len()).map_err(|_| DedupError::TooManyClients)?;
    let total: u64 = clients.iter().map(|c| c.memory.size()).sum();
    let zero_hash = hash(&[0u8; PAGE]);
    let mut plan = Plan {
        clients: vec![ClientStats::default(); n as usize],
        zero_runs: vec![vec![]; n as usize],
        ..Plan::default()
    };
    // (hash, client, page) of every non-zero page read.
    let mut entries: Vec<(u64, u32, u64)> = Vec::new();
    let mut buf = vec![0u8; BATCH * PAGE];
    let mut done = 0u64;
    let mut next_report = PROGRESS_STEP;
    for (ci, c) in (0..n).zip(clients) {
        let size = c.memory.size();
        if !size.is_multiple_of(PAGE as u64) {
            return Err(DedupError::Unaligned { client: ci, size });
        }
        let pages = size / PAGE as u64;
        let stats = &mut plan.clients[ci as usize];
        stats.pages = pages;
        let runs = &mut plan.zero_runs[ci as usize];
        let mut alloc = Allocated::new(c.extents.clone());
        let mut p = 0u64;
        while p < pages {
            // A batch: the allocated pages from p on, contiguous.
            if !alloc.has(p) {
                stats.zero_pages += 1;
                p += 1;
                continue;
            }
            let mut count = 1usize;
            while count < BATCH && p + (count as u64) < pages && alloc.has(p + count as u64) {
                count += 1;
            }
            let bytes = &mut buf[..count * PAGE];
            c.memory.read(p * PAGE as u64, bytes).map_err(|error| DedupError::Read { client: ci, error })?;
            for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
                let q = p + i as u64;
                let h = hash(page);
                if h == zero_hash && page.iter().all(|&b| b == 0) {
                    stats.zero_pages += 1;
                    stats.zero_allocated += 1;
                    match runs.last_mut() {
                        Some((first, len)) if *first + *len == q => *len += 1,
                        _ => runs.push((q, 1)),
                    }
                } else {
                    entries.push((h, ci, q));
                }
            }
            stats.pages_read += count as u64;
            p += count as u64;
            if done + p * PAGE as u64 >= next_report {
                next_report += PROGRESS_STEP;
                progress(done + p * PAGE as u64, total);
            }
        }
        done += size;
    }
    progress(total, total);
    entries.sort_unstable();
    group(clients, &entries, hash, &mut plan)?;
    Ok(plan)
}

/// Splits runs of equal hashes into groups of byte-identical pages.
fn group(
    clients: &[Client<'_>],
    entries: &[(u64, u32, u64)],
    hash: fn(&[u8]) -> u64,
    plan: &mut Plan,
) -> Result<(), DedupError> {
    let read = |r: PageRef, buf: &mut [u8]| {
        clients[r.client as usize]
            .memory
            .read(r.page * PAGE as u64, buf)
            .map_err(|error| DedupError::Read { client: r.client, error })
    };
    let mut page = vec![0u8; PAGE];
    let mut i = 0;
    while i < entries.len() {
        let mut j = i + 1;
        while j < entries.len() && entries[j].0 == entries[i].0 {
            j += 1;
        }
        if j - i >= 2 {
            // Classes of identical content: (content, members).
            let mut classes: Vec<(Vec<u8>, Vec<PageRef>)> = vec![];
            for &(h, client, p) in &entries[i..j] {
                let r = PageRef { client, page: p };
                read(r, &mut page)?;
                // Re-hashed: a page that changed since its first read is
                // left out (equality itself is decided on the bytes).
                if hash(&page) == h {
                    match classes.iter_mut().find(|(c, _)| *c == page) {
                        Some((_, members)) => members.push(r),
                        None => classes.push((page.clone(), vec![r])),
                    }
                } else {
                    plan.changed += 1;
                }
            }
            for (_, members) in classes {
                if members.len() >= 2 {
                    count_duplicates(&members, &mut plan.clients);
                    plan.groups.push(Group { members });
                }
            }
        }
        i = j;
    }
    Ok(())
}

/// Members are sorted by (client, page): the first page of each client in
/// the group is its own copy; the rest duplicate within the client; a
/// client's first page duplicates across if another client came first.
fn count_duplicates(members: &[PageRef], stats: &mut [ClientStats]) {
    let mut prev: Option<u32> = None;
    for (k, m) in members.iter().enumerate() {
        let s = &mut stats[m.client as usize];
        if prev == Some(m.client) {
            s.dup_within += 1;
        } else if k > 0 {
            s.dup_across += 1;
        }
        prev = Some(m.client);
    }
}

#[cfg(test)]
mod tests;
