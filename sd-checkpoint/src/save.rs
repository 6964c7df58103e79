//! Writing a checkpoint: memory pages in chunks, the device state, the end.

use alloc::vec;
use alloc::vec::Vec;

use xxhash_rust::xxh3::xxh3_128;

use crate::GuestMemory;
use crate::format::{CheckpointError, FLAG_LZ4, HEADER_LEN, Header, Kind, PAGE, Sealer, key_id};

/// How to write a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct SaveOptions {
    /// lz4-compress each chunk's pages.
    pub compress: bool,
    /// Pages per `PAGES` record (1..=1024; 256 = 1 MiB).
    pub pages_per_chunk: u32,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { compress: false, pages_per_chunk: 256 }
    }
}

/// What a save did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveStats {
    pub pages: u64,
    /// Pages read through the window (holes are known zero and skipped).
    pub pages_read: u64,
    pub pages_stored: u64,
    pub zero_pages: u64,
    /// Delta: pages whose hash did not change.
    pub unchanged_pages: u64,
    pub bytes_out: u64,
}

/// The per-page hashes of a client's memory at one generation: the base
/// a delta is computed against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageHashes {
    pub client_id: [u8; 16],
    pub generation: u64,
    pub hashes: Vec<u128>,
}

/// A hole of the memory file reads as this.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

fn zero_hash() -> u128 {
    xxh3_128(&ZERO_PAGE)
}

/// Writes one checkpoint stream.
pub struct Saver<'a> {
    header: Header,
    sealer: Sealer,
    base: Option<&'a PageHashes>,
    hashes: Vec<u128>,
    /// Allocated extents of the memory file (sorted, merged); pages outside
    /// them are holes, known zero. `None`: everything is allocated.
    extents: Option<Vec<(u64, u64)>>,
    extent_at: usize,
    next_page: u64,
    seq: u32,
    stats: SaveStats,
    zero: u128,
    chunk: Vec<u8>,
}

impl<'a> Saver<'a> {
    /// A full checkpoint (`base` None) or a delta against `base`, of a
    /// client with `memory_size` bytes at `generation`. `salt` must be
    /// fresh randomness: it makes the stream key unique.
    pub fn new(
        tenant_key: &[u8],
        client_id: [u8; 16],
        memory_size: u64,
        generation: u64,
        base: Option<&'a PageHashes>,
        salt: [u8; 16],
        options: SaveOptions,
    ) -> Result<Saver<'a>, CheckpointError> {
        if let Some(b) = base {
            if b.client_id != client_id {
                return Err(CheckpointError::Mismatch("the delta base is another client's"));
            }
            if b.hashes.len() as u64 * PAGE as u64 != memory_size {
                return Err(CheckpointError::Mismatch("the delta base has another memory size"));
            }
        }
        let header = Header {
            flags: if options.compress { FLAG_LZ4 } else { 0 },
            client_id,
            memory_size,
            generation,
            base_generation: base.map_or(0, |b| b.generation),
            key_id: key_id(tenant_key),
            salt,
            pages_per_chunk: options.pages_per_chunk,
        };
        let encoded = header.encode();
        Header::decode(&encoded)?;
        let sealer = Sealer::new(tenant_key, &header);
        let pages = header.pages();
        Ok(Saver {
            header,
            sealer,
            base,
            hashes: vec![0; pages as usize],
            extents: None,
            extent_at: 0,
            next_page: 0,
            seq: 0,
            stats: SaveStats { pages, bytes_out: HEADER_LEN as u64, ..SaveStats::default() },
            zero: zero_hash(),
            chunk: Vec::new(),
        })
    }

    /// Only these byte ranges of memory are allocated; the rest is known
    /// zero and is not read (reading a hole of a memory file allocates it).
    pub fn set_extents(&mut self, mut extents: Vec<(u64, u64)>) {
        extents.sort_unstable();
        self.extents = Some(extents);
        self.extent_at = 0;
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes of guest memory scanned so far (for progress reports).
    pub fn scanned(&self) -> u64 {
        self.next_page * PAGE as u64
    }

    /// The stream's first bytes.
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header.encode()
    }

    /// Whether page `p` lies in an allocated extent (pages are visited in
    /// increasing order).
    fn allocated(&mut self, p: u64) -> bool {
        let Some(ext) = &self.extents else { return true };
        let (start, end) = (p * PAGE as u64, (p + 1) * PAGE as u64);
        while self.extent_at < ext.len() && ext[self.extent_at].0 + ext[self.extent_at].1 <= start {
            self.extent_at += 1;
        }
        self.extent_at < ext.len() && ext[self.extent_at].0 < end
    }

    /// Appends the next `PAGES` record to `out`; `false` once all memory
    /// has been scanned.
    pub fn next_pages(&mut self, mem: &dyn GuestMemory, out: &mut Vec<u8>) -> Result<bool, CheckpointError> {
        let pages = self.header.pages();
        if self.next_page >= pages {
            return Ok(false);
        }
        if mem.size() != self.header.memory_size {
            return Err(CheckpointError::Mismatch("the memory window's size differs from the checkpoint's"));
        }
        let first = self.next_page;
        let count = (pages - first).min(u64::from(self.header.pages_per_chunk)) as usize;
        let bitmap_len = count.div_ceil(8);
        let compressed = self.header.compressed();
        // The record is built in `out` itself: pages are read straight into
        // it (or into the lz4 staging buffer) and sealed in place.
        let before = out.len();
        let start = Sealer::begin_record(out);
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&(count as u32).to_le_bytes());
        let bitmap_at = out.len();
        out.resize(bitmap_at + bitmap_len, 0);
        let mut staging = core::mem::take(&mut self.chunk);
        staging.clear();
        let buf: &mut Vec<u8> = if compressed { &mut staging } else { out };
        let mut stored = 0;
        let mut bitmap = vec![0u8; bitmap_len];
        let mut page = [0u8; PAGE];
        for i in 0..count {
            let p = first + i as u64;
            // One copy out of the window; a kept page is copied once more,
            // into the record (or the lz4 staging buffer).
            let (content, hash, is_zero) = if self.allocated(p) {
                mem.read(p * PAGE as u64, &mut page).map_err(|_| CheckpointError::Io("reading guest memory"))?;
                self.stats.pages_read += 1;
                let hash = xxh3_128(&page);
                (&page, hash, hash == self.zero && page.iter().all(|&x| x == 0))
            } else {
                (&ZERO_PAGE, self.zero, true)
            };
            self.hashes[p as usize] = hash;
            let keep = match self.base {
                Some(b) if b.hashes[p as usize] == hash => {
                    self.stats.unchanged_pages += 1;
                    false
                }
                Some(_) => true,
                None => !is_zero,
            };
            if is_zero {
                self.stats.zero_pages += 1;
            }
            if keep {
                bitmap[i / 8] |= 1 << (i % 8);
                buf.extend_from_slice(content);
                stored += 1;
            }
        }
        out[bitmap_at..bitmap_at + bitmap_len].copy_from_slice(&bitmap);
        self.stats.pages_stored += stored;
        if compressed {
            let at = out.len();
            out.resize(at + 4 + lz4_flex::block::get_maximum_output_size(staging.len()), 0);
            let n =
                lz4_flex::block::compress_into(&staging, &mut out[at + 4..]).expect("sized by get_maximum_output_size");
            out[at..at + 4].copy_from_slice(&(n as u32).to_le_bytes());
            out.truncate(at + 4 + n);
        }
        self.chunk = staging;
        self.next_page += count as u64;
        self.sealer.seal_record(Kind::Pages, self.seq, out, start);
        self.seq += 1;
        self.stats.bytes_out += (out.len() - before) as u64;
        Ok(true)
    }

    /// Appends QEMU's device state.
    pub fn device_state(&mut self, state: &[u8], out: &mut Vec<u8>) {
        self.push(Kind::Device, state.to_vec(), out);
    }

    fn push(&mut self, kind: Kind, payload: Vec<u8>, out: &mut Vec<u8>) {
        let before = out.len();
        let start = Sealer::begin_record(out);
        out.extend_from_slice(&payload);
        self.sealer.seal_record(kind, self.seq, out, start);
        self.seq += 1;
        self.stats.bytes_out += (out.len() - before) as u64;
    }

    /// Appends the `END` record; returns the statistics and the page hashes
    /// (the base of the next delta). Call after every page is written.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(SaveStats, PageHashes), CheckpointError> {
        if self.next_page < self.header.pages() {
            return Err(CheckpointError::Io("finish before every page was scanned"));
        }
        let mut end = Vec::with_capacity(12);
        end.extend_from_slice(&self.seq.to_le_bytes());
        end.extend_from_slice(&self.stats.pages_stored.to_le_bytes());
        self.push(Kind::End, end, out);
        let hashes =
            PageHashes { client_id: self.header.client_id, generation: self.header.generation, hashes: self.hashes };
        Ok((self.stats, hashes))
    }
}
