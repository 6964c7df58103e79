//! Reading checkpoints back: verify every record of every stream first,
//! then write pages. A refused checkpoint has written nothing.

use alloc::vec;
use alloc::vec::Vec;

use xxhash_rust::xxh3::xxh3_128;

use crate::GuestMemory;
use crate::format::{CheckpointError, HEADER_LEN, Header, Kind, MAX_RECORD, PAGE, RECORD_HEAD, Sealer, TAG, key_id};
use crate::save::PageHashes;

/// Where a stream is read from (the SD's disk, a file, a buffer).
pub trait Source {
    /// Bytes in the stream (reads beyond are a truncated stream).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CheckpointError>;
}

impl Source for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
        let o = offset as usize;
        let src = self.get(o..o + buf.len()).ok_or(CheckpointError::Truncated { at: <[u8]>::len(self) as u64 })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// What a restore produced.
#[derive(Debug)]
pub struct Restored {
    /// Generation of the last stream applied.
    pub generation: u64,
    /// Device state of the last stream that carried one.
    pub device_state: Vec<u8>,
    pub pages_written: u64,
    /// Hashes of the restored memory: the base for the next delta.
    pub hashes: PageHashes,
}

/// Restores a client's memory from a full checkpoint and its deltas.
pub struct Restorer<'k> {
    key: &'k [u8],
    client_id: [u8; 16],
    memory_size: u64,
    /// The generation each stream must be, when the caller says.
    expected: Option<&'k [u64]>,
}

/// One pass over a stream: `apply` None verifies only.
struct Walk<'m> {
    apply: Option<&'m mut dyn GuestMemory>,
    /// Write zeroes for absent pages of a full checkpoint (the target is not
    /// known to be zero).
    zero_absent: bool,
    pages_written: u64,
    device_state: Option<Vec<u8>>,
    /// Page hashes, kept by the verify pass only (`apply` None).
    hashes: Vec<u128>,
    zero: u128,
}

impl<'k> Restorer<'k> {
    /// For the client `client_id` whose memory is `memory_size` bytes.
    pub fn new(key: &'k [u8], client_id: [u8; 16], memory_size: u64) -> Self {
        Restorer { key, client_id, memory_size, expected: None }
    }

    /// Requires stream `i` to be generation `generations[i]` (and exactly
    /// that many streams), checked from each header before anything is
    /// verified further or written.
    pub fn expecting(self, generations: &'k [u64]) -> Self {
        Restorer { expected: Some(generations), ..self }
    }

    /// Reads and checks a stream's header against this client, the key and
    /// the generation chain (`expected_base`: None for the first stream).
    fn header(&self, src: &mut dyn Source, expected_base: Option<u64>) -> Result<Header, CheckpointError> {
        if src.len() < HEADER_LEN as u64 {
            return Err(if src.is_empty() {
                CheckpointError::NotACheckpoint
            } else {
                CheckpointError::Truncated { at: src.len() }
            });
        }
        let mut b = [0u8; HEADER_LEN];
        src.read_at(0, &mut b)?;
        let h = Header::decode(&b)?;
        if h.key_id != key_id(self.key) {
            return Err(CheckpointError::WrongKey);
        }
        if h.client_id != self.client_id {
            return Err(CheckpointError::Mismatch("it is another client's checkpoint"));
        }
        if h.memory_size != self.memory_size {
            return Err(CheckpointError::Mismatch("its memory size differs from the client's"));
        }
        match expected_base {
            None if h.base_generation != 0 => {
                Err(CheckpointError::BrokenChain { expected: 0, found: h.base_generation })
            }
            Some(g) if h.base_generation != g => {
                Err(CheckpointError::BrokenChain { expected: g, found: h.base_generation })
            }
            _ => Ok(h),
        }
    }

    /// Checks every record of `streams` (a full checkpoint, then deltas in
    /// order); returns their headers and the page hashes of the memory they
    /// describe (the base for a next delta). Writes nothing.
    pub fn verify(&self, streams: &mut [&mut dyn Source]) -> Result<(Vec<Header>, PageHashes), CheckpointError> {
        let mut headers = vec![];
        let mut walk = Walk::new(None, false, self.memory_size);
        if let Some(want) = self.expected
            && want.len() != streams.len()
        {
            return Err(CheckpointError::Mismatch("the number of streams differs from the generations asked for"));
        }
        for (i, src) in streams.iter_mut().enumerate() {
            let h = self.header(&mut **src, headers.last().map(|h: &Header| h.generation))?;
            if let Some(&asked) = self.expected.and_then(|w| w.get(i))
                && h.generation != asked
            {
                return Err(CheckpointError::WrongGeneration { asked, found: h.generation });
            }
            self.walk(&mut **src, &h, &mut walk)?;
            headers.push(h);
        }
        let Some(last) = headers.last() else { return Err(CheckpointError::NotACheckpoint) };
        let hashes = PageHashes { client_id: self.client_id, generation: last.generation, hashes: walk.hashes };
        Ok((headers, hashes))
    }

    /// Verifies everything, then writes the pages into `mem`. With
    /// `target_is_zero` (a fresh client's memory file), pages absent from
    /// the full checkpoint are not written.
    pub fn restore(
        &self,
        streams: &mut [&mut dyn Source],
        mem: &mut dyn GuestMemory,
        target_is_zero: bool,
    ) -> Result<Restored, CheckpointError> {
        if mem.size() != self.memory_size {
            return Err(CheckpointError::Mismatch("the memory window's size differs from the client's"));
        }
        // The verify pass already hashed every page; the write pass only writes.
        let (headers, hashes) = self.verify(streams)?;
        let mut walk = Walk::new(Some(mem), !target_is_zero, self.memory_size);
        for (src, h) in streams.iter_mut().zip(&headers) {
            self.walk(&mut **src, h, &mut walk)?;
        }
        let last = headers.last().expect("verify returns at least one");
        Ok(Restored {
            generation: last.generation,
            device_state: walk.device_state.unwrap_or_default(),
            pages_written: walk.pages_written,
            hashes,
        })
    }

    fn walk(&self, src: &mut dyn Source, h: &Header, w: &mut Walk<'_>) -> Result<(), CheckpointError> {
        let sealer = Sealer::new(self.key, h);
        let full = h.base_generation == 0;
        let mut at = HEADER_LEN as u64;
        let mut seq = 0u32;
        let mut pages_stored = 0u64;
        let mut next_page = 0u64;
        let mut buf = Vec::new();
        loop {
            if at + RECORD_HEAD as u64 > src.len() {
                return Err(CheckpointError::Truncated { at: src.len() });
            }
            let mut head = [0u8; RECORD_HEAD];
            src.read_at(at, &mut head)?;
            let got_seq = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
            let kind = Kind::from_u8(head[0]).ok_or(CheckpointError::Tampered { seq })?;
            if got_seq != seq || !(TAG..=MAX_RECORD).contains(&len) {
                return Err(CheckpointError::Tampered { seq });
            }
            at += RECORD_HEAD as u64;
            if at + len as u64 > src.len() {
                return Err(CheckpointError::Truncated { at: src.len() });
            }
            buf.resize(len, 0);
            src.read_at(at, &mut buf)?;
            at += len as u64;
            let plain = sealer.open(kind, seq, &mut buf)?;
            match kind {
                Kind::Pages => {
                    let (first, n) = w.pages(h, seq, plain, full, next_page)?;
                    next_page = first + n.0;
                    pages_stored += n.1;
                }
                Kind::Device => w.device_state = Some(plain.to_vec()),
                Kind::End => {
                    let bad = |what| CheckpointError::Malformed { seq, what };
                    if plain.len() != 12 {
                        return Err(bad("END record of the wrong length"));
                    }
                    let records = u32::from_le_bytes(plain[..4].try_into().expect("4 bytes"));
                    let stored = u64::from_le_bytes(plain[4..].try_into().expect("8 bytes"));
                    if records != seq || stored != pages_stored || next_page != h.pages() {
                        return Err(bad("END does not match the records before it"));
                    }
                    if at != src.len() {
                        return Err(bad("bytes after the END record"));
                    }
                    return Ok(());
                }
            }
            seq = seq.checked_add(1).ok_or(CheckpointError::Malformed { seq, what: "too many records" })?;
        }
    }
}

impl<'m> Walk<'m> {
    fn new(apply: Option<&'m mut dyn GuestMemory>, zero_absent: bool, memory_size: u64) -> Self {
        let zero = xxh3_128(&[0u8; PAGE]);
        let pages = if apply.is_none() { (memory_size / PAGE as u64) as usize } else { 0 };
        Walk { apply, zero_absent, pages_written: 0, device_state: None, hashes: vec![zero; pages], zero }
    }

    /// Checks (and with `apply`, writes) one `PAGES` record; returns its
    /// first page and (pages covered, pages stored).
    fn pages(
        &mut self,
        h: &Header,
        seq: u32,
        plain: &[u8],
        full: bool,
        expected_first: u64,
    ) -> Result<(u64, (u64, u64)), CheckpointError> {
        let bad = |what| CheckpointError::Malformed { seq, what };
        if plain.len() < 12 {
            return Err(bad("short PAGES record"));
        }
        let first = u64::from_le_bytes(plain[..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(plain[8..12].try_into().expect("4 bytes")) as usize;
        if first != expected_first
            || count == 0
            || count > h.pages_per_chunk as usize
            || first + count as u64 > h.pages()
        {
            return Err(bad("page range out of order or out of memory"));
        }
        let bitmap_len = count.div_ceil(8);
        let Some(bitmap) = plain.get(12..12 + bitmap_len) else { return Err(bad("short bitmap")) };
        let present = (0..count).filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0).count();
        let rest = &plain[12 + bitmap_len..];
        let decompressed;
        let data: &[u8] = if h.compressed() {
            if rest.len() < 4 {
                return Err(bad("missing compressed length"));
            }
            let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if n != rest.len() - 4 {
                return Err(bad("compressed length mismatch"));
            }
            let mut out = vec![0u8; present * PAGE];
            let got = lz4_flex::block::decompress_into(&rest[4..], &mut out).map_err(|_| bad("lz4 data is corrupt"))?;
            if got != out.len() {
                return Err(bad("lz4 data decompresses to the wrong size"));
            }
            decompressed = out;
            &decompressed
        } else {
            rest
        };
        if data.len() != present * PAGE {
            return Err(bad("page data does not match the bitmap"));
        }
        let zero = [0u8; PAGE];
        let mut pages = data.chunks(PAGE);
        for i in 0..count {
            let p = first + i as u64;
            let gpa = p * PAGE as u64;
            let content = if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                pages.next().expect("counted")
            } else if full {
                &zero[..]
            } else {
                continue;
            };
            let absent = core::ptr::eq(content, &zero[..]);
            if self.apply.is_none() {
                self.hashes[p as usize] = if absent { self.zero } else { xxh3_128(content) };
            }
            if let Some(mem) = self.apply.as_deref_mut()
                && (!absent || self.zero_absent)
            {
                mem.write(gpa, content).map_err(|_| CheckpointError::Io("writing guest memory"))?;
                self.pages_written += 1;
            }
        }
        Ok((first, (count as u64, present as u64)))
    }
}
