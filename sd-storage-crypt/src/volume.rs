//! A byte-addressed encrypted volume over a sector device.
//!
//! Layout, as dm-crypt and LUKS use it: the ciphertext of the volume's
//! byte `0` starts at `data_offset` bytes into the device; sector `n` of the
//! volume (in units of `sector_size`) is encrypted with IV `n + iv_offset`
//! (in units of `sector_size` when `large_iv`, else in 512-byte units, which
//! is dm-crypt's default and what LUKS1 uses).

use alloc::vec;
use alloc::vec::Vec;

use crate::xts::Xts;

/// The provider's volume: a device of whole sectors.
pub trait BlockDevice {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Writes `data` at `offset` (both multiples of 512).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError>;
    /// Makes every acknowledged write durable.
    fn flush(&mut self) -> Result<(), IoError>;
}

/// Why an I/O failed; each maps to an NBD error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The device failed (EIO).
    Io,
    /// Beyond the end of the volume (EINVAL for reads, ENOSPC for writes).
    OutOfRange,
    /// The volume is read-only (EPERM).
    ReadOnly,
    /// A sector failed authentication (authenticated mode): tampered with,
    /// or written but never committed before a crash (EIO).
    Integrity,
}

/// The cipher of a volume.
#[derive(Clone, Debug)]
pub enum Cipher {
    /// Pass-through: the baseline the benchmarks compare against. Never for
    /// tenant data.
    Null,
    /// `aes-xts-plain64` with a 512-bit key (boxed: the expanded AES keys
    /// are large).
    XtsPlain64(alloc::boxed::Box<Xts>),
}

/// Where and how the encrypted data sits on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 512 or 4096.
    pub sector_size: u32,
    /// Bytes before the data segment (a LUKS header).
    pub data_offset: u64,
    /// Added to the sector number to form the IV.
    pub iv_offset: u64,
    /// IVs count `sector_size` units instead of 512-byte units (dm-crypt's
    /// `iv_large_sectors`, cryptsetup plain mode's `--iv-large-sectors`).
    /// LUKS1 and LUKS2 — even with 4096-byte sectors — count 512-byte units:
    /// measured against the kernel's dm-crypt in `qemu-tests`.
    pub large_iv: bool,
}

impl Layout {
    /// Checks the layout against a device of `device` bytes; returns the
    /// volume size (whole sectors after the data offset).
    pub fn check(&self, device: u64) -> Result<u64, LayoutError> {
        let ss = u64::from(self.sector_size);
        if ss != 512 && ss != 4096 {
            return Err(LayoutError::SectorSize(self.sector_size));
        }
        if !self.data_offset.is_multiple_of(ss) {
            return Err(LayoutError::DataOffset(self.data_offset));
        }
        match device.checked_sub(self.data_offset).filter(|&a| a >= ss) {
            Some(avail) => Ok(avail - avail % ss),
            None => Err(LayoutError::TooSmall { device, data_offset: self.data_offset }),
        }
    }

    /// A plain data segment at offset 0 with 512-byte sectors.
    pub const PLAIN_512: Layout = Layout { sector_size: 512, data_offset: 0, iv_offset: 0, large_iv: false };
}

/// A bad layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    SectorSize(u32),
    DataOffset(u64),
    TooSmall { device: u64, data_offset: u64 },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::SectorSize(s) => write!(f, "sector size {s} is not 512 or 4096"),
            LayoutError::DataOffset(o) => {
                write!(f, "data offset {o} is not a multiple of the sector size")
            }
            LayoutError::TooSmall { device, data_offset } => {
                write!(f, "device of {device} bytes has no room after a data offset of {data_offset}")
            }
        }
    }
}

/// An encrypted volume.
pub struct CryptVolume<D: BlockDevice> {
    dev: D,
    cipher: Cipher,
    layout: Layout,
    size: u64,
    read_only: bool,
    scratch: Vec<u8>,
}

impl<D: BlockDevice> CryptVolume<D> {
    pub fn new(dev: D, cipher: Cipher, layout: Layout, read_only: bool) -> Result<Self, LayoutError> {
        let size = layout.check(dev.size())?;
        Ok(CryptVolume { size, dev, cipher, layout, read_only, scratch: Vec::new() })
    }

    /// Size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The underlying device.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    fn iv(&self, sector: u64) -> u64 {
        let per = if self.layout.large_iv { 1 } else { u64::from(self.layout.sector_size) / 512 };
        sector * per + self.layout.iv_offset
    }

    fn crypt(&self, first_sector: u64, data: &mut [u8], encrypt: bool) {
        let Cipher::XtsPlain64(x) = &self.cipher else {
            return;
        };
        let ss = self.layout.sector_size as usize;
        for (i, s) in data.chunks_mut(ss).enumerate() {
            let iv = self.iv(first_sector + i as u64);
            if encrypt { x.encrypt_sector(iv, s) } else { x.decrypt_sector(iv, s) }
        }
    }

    /// Reads `buf.len()` plaintext bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        read_bytes(self, offset, buf)
    }

    /// Writes `data` at `offset`, reading back partial sectors at the edges.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        write_bytes(self, offset, data)
    }

    /// Writes zeroes (encrypted zeroes: the ciphertext is not zero).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        write_zero_bytes(self, offset, len)
    }

    pub fn flush(&mut self) -> Result<(), IoError> {
        self.dev.flush()
    }
}

impl<D: BlockDevice> Sectors for CryptVolume<D> {
    fn sector_size(&self) -> u64 {
        u64::from(self.layout.sector_size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn byte_size(&self) -> u64 {
        self.size
    }

    fn scratch(&mut self) -> &mut Vec<u8> {
        &mut self.scratch
    }

    fn read_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let ss = u64::from(self.layout.sector_size);
        self.dev.read_at(self.layout.data_offset + first * ss, buf)?;
        self.crypt(first, buf, false);
        Ok(())
    }

    fn write_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let ss = u64::from(self.layout.sector_size);
        self.crypt(first, buf, true);
        self.dev.write_at(self.layout.data_offset + first * ss, buf)
    }
}

/// Whole-sector storage under a byte-addressed volume: what the edge logic
/// below ([`read_bytes`], [`write_bytes`]) needs from a cipher mode.
pub(crate) trait Sectors {
    fn sector_size(&self) -> u64;
    /// Writes are refused with [`IoError::ReadOnly`].
    fn read_only(&self) -> bool;
    /// Volume size in bytes (whole sectors).
    fn byte_size(&self) -> u64;
    /// A reusable buffer for partial sectors.
    fn scratch(&mut self) -> &mut Vec<u8>;
    /// Reads and decrypts sectors `[first, first + buf.len() / sector_size)`.
    fn read_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// Encrypts `buf` (in place, it is scratch) and writes it as sectors.
    fn write_sectors(&mut self, first: u64, buf: &mut [u8]) -> Result<(), IoError>;
}

pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> Result<(), IoError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::OutOfRange),
    }
}

/// The most bytes a partial-sector read or any write stages in scratch at
/// once: a 32 MiB request goes through in pieces, so the scratch buffer
/// (kept between requests) never grows past this.
const STAGING: u64 = 1 << 20;

/// Splits `len` bytes at `offset` into pieces that each stay within
/// [`STAGING`] bytes of whole sectors; calls `f(piece offset, index into the
/// caller's buffer, piece length)`.
fn staged(
    offset: u64,
    len: usize,
    ss: u64,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let limit = at / ss * ss + STAGING;
        let n = (limit - at).min((len - done) as u64) as usize;
        f(at, done, n)?;
        done += n;
    }
    Ok(())
}

/// Reads `buf.len()` plaintext bytes at `offset`; whole sectors are read in
/// place, partial sectors at the edges go through scratch.
pub(crate) fn read_bytes<S: Sectors>(s: &mut S, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
    check_range(s.byte_size(), offset, buf.len() as u64)?;
    let ss = s.sector_size();
    staged(offset, buf.len(), ss, |at, i, n| {
        let piece = &mut buf[i..i + n];
        if at.is_multiple_of(ss) && (n as u64).is_multiple_of(ss) {
            return s.read_sectors(at / ss, piece);
        }
        let first = at / ss;
        let last = (at + n as u64 - 1) / ss;
        let skip = (at % ss) as usize;
        let mut tmp = core::mem::take(s.scratch());
        tmp.resize(((last - first + 1) * ss) as usize, 0);
        let r = s.read_sectors(first, &mut tmp);
        if r.is_ok() {
            piece.copy_from_slice(&tmp[skip..skip + n]);
        }
        *s.scratch() = tmp;
        r
    })
}

/// Writes `data` at `offset`, reading back partial sectors at the edges;
/// staged through scratch (encryption is in place) a MiB at a time.
pub(crate) fn write_bytes<S: Sectors>(s: &mut S, offset: u64, data: &[u8]) -> Result<(), IoError> {
    if s.read_only() {
        return Err(IoError::ReadOnly);
    }
    check_range(s.byte_size(), offset, data.len() as u64)?;
    let ss = s.sector_size();
    staged(offset, data.len(), ss, |at, i, n| write_piece(s, at, &data[i..i + n]))
}

/// One [`write_bytes`] piece, at most [`STAGING`] bytes of whole sectors.
fn write_piece<S: Sectors>(s: &mut S, offset: u64, data: &[u8]) -> Result<(), IoError> {
    let ss = s.sector_size();
    let first = offset / ss;
    let last = (offset + data.len() as u64 - 1) / ss;
    let skip = (offset % ss) as usize;
    let mut tmp = core::mem::take(s.scratch());
    tmp.clear();
    tmp.resize(((last - first + 1) * ss) as usize, 0);
    let ssz = ss as usize;
    let mut r = Ok(());
    if skip != 0 {
        r = s.read_sectors(first, &mut tmp[..ssz]);
    }
    let end = skip + data.len();
    if r.is_ok() && !end.is_multiple_of(ssz) && (last > first || skip == 0) {
        let at = tmp.len() - ssz;
        r = s.read_sectors(last, &mut tmp[at..]);
    }
    if r.is_ok() {
        tmp[skip..end].copy_from_slice(data);
        r = s.write_sectors(first, &mut tmp);
    }
    *s.scratch() = tmp;
    r
}

/// Writes `len` zero bytes at `offset` as ordinary (encrypted) data, a MiB
/// at a time.
pub(crate) fn write_zero_bytes<S: Sectors>(s: &mut S, offset: u64, len: u64) -> Result<(), IoError> {
    const CHUNK: u64 = 1 << 20;
    check_range(s.byte_size(), offset, len)?;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        write_bytes(s, offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// A device in memory, for tests and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct MemDevice {
    pub bytes: Vec<u8>,
    pub flushes: u64,
}

impl MemDevice {
    pub fn new(size: usize) -> Self {
        MemDevice { bytes: vec![0; size], flushes: 0 }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let o = offset as usize;
        let src = self.bytes.get(o..o + buf.len()).ok_or(IoError::OutOfRange)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let o = offset as usize;
        let dst = self.bytes.get_mut(o..o + data.len()).ok_or(IoError::OutOfRange)?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.flushes += 1;
        Ok(())
    }
}

/// A device of any size that stores only the 4 KiB pages written to it
/// (unwritten pages read as zeroes): large volumes in tests, fuzz targets
/// and benchmarks without the memory.
#[derive(Clone, Debug, Default)]
pub struct SparseDevice {
    size: u64,
    pages: alloc::collections::BTreeMap<u64, alloc::boxed::Box<[u8; 4096]>>,
}

impl SparseDevice {
    pub fn new(size: u64) -> Self {
        SparseDevice { size, pages: Default::default() }
    }

    /// Pages written so far.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Calls `f(page, offset in page, byte range of the caller's buffer)`
    /// for each page `len` bytes at `offset` touch.
    fn each_page(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, core::ops::Range<usize>),
    ) -> Result<(), IoError> {
        check_range(self.size, offset, len as u64)?;
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            let (page, within) = (at / 4096, (at % 4096) as usize);
            let n = (4096 - within).min(len - done);
            f(page, within, done..done + n);
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for SparseDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let pages = &self.pages;
        self.each_page(offset, buf.len(), |page, within, r| match pages.get(&page) {
            Some(p) => buf[r.clone()].copy_from_slice(&p[within..within + r.len()]),
            None => buf[r].fill(0),
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        let mut touched = Vec::new();
        self.each_page(offset, data.len(), |page, within, r| touched.push((page, within, r)))?;
        for (page, within, r) in touched {
            let p = self.pages.entry(page).or_insert_with(|| alloc::boxed::Box::new([0; 4096]));
            p[within..within + r.len()].copy_from_slice(&data[r]);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol(layout: Layout) -> CryptVolume<MemDevice> {
        let x = Xts::new(&[0x42; 64]).unwrap();
        CryptVolume::new(MemDevice::new(1 << 20), Cipher::XtsPlain64(x.into()), layout, false).unwrap()
    }

    proptest! {
        #[test]
        fn unaligned_writes_read_back_like_a_plain_buffer(ops in proptest::collection::vec((0u64..60_000, proptest::collection::vec(any::<u8>(), 1..9000)), 1..12), big in any::<bool>()) {
            let layout = Layout { sector_size: if big { 4096 } else { 512 }, data_offset: 8192, iv_offset: 3, large_iv: big };
            let mut v = vol(layout);
            let mut model = vec![0u8; v.size() as usize];
            // Start from what an all-zero ciphertext decrypts to.
            v.read(0, &mut model).unwrap();
            for (off, data) in ops {
                v.write(off, &data).unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            let mut back = vec![0u8; v.size() as usize];
            v.read(0, &mut back).unwrap();
            prop_assert!(back == model);
        }
    }

    #[test]
    fn a_32_mib_request_stages_at_most_a_mib_in_scratch() {
        // Scratch stays allocated between requests: a 32 MiB write or an
        // unaligned 32 MiB read used to grow it to 32 MiB, in a 128 MiB SD.
        let x = Xts::new(&[7; 64]).unwrap();
        let mut v =
            CryptVolume::new(SparseDevice::new(64 << 20), Cipher::XtsPlain64(x.into()), Layout::PLAIN_512, false)
                .unwrap();
        let data: Vec<u8> = (0..(32usize << 20) + 700).map(|i| (i * 31 % 251) as u8).collect();
        v.write(1000, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        v.read(1000, &mut back).unwrap();
        assert!(back == data, "a staged write or read lost bytes");
        assert!(v.scratch.capacity() <= (STAGING + 512) as usize, "scratch grew to {}", v.scratch.capacity());
    }

    #[test]
    fn ciphertext_matches_whole_sector_xts_with_the_layout_ivs() {
        let layout = Layout { sector_size: 4096, data_offset: 4096, iv_offset: 10, large_iv: false };
        let mut v = vol(layout);
        let plain = vec![0xabu8; 8192];
        v.write(4096, &plain).unwrap();
        let dev = &v.device().bytes;
        // Volume sector 1 sits at device byte 4096 + 4096; its IV counts
        // 512-byte units: 1 * 8 + 10.
        let mut expect = plain[..4096].to_vec();
        Xts::new(&[0x42; 64]).unwrap().encrypt_sector(18, &mut expect);
        assert_eq!(&dev[8192..12288], &expect[..]);
        assert!(!dev.windows(16).any(|w| w == [0xab; 16]), "plaintext on the device");
    }

    #[test]
    fn bounds_read_only_and_bad_layouts_are_errors() {
        let mut v = vol(Layout::PLAIN_512);
        let size = v.size();
        assert_eq!(v.read(size - 1, &mut [0; 2]), Err(IoError::OutOfRange));
        assert_eq!(v.write(u64::MAX, &[0]), Err(IoError::OutOfRange));
        let x = Xts::new(&[1; 64]).unwrap();
        let mut ro =
            CryptVolume::new(MemDevice::new(4096), Cipher::XtsPlain64(x.clone().into()), Layout::PLAIN_512, true)
                .unwrap();
        assert_eq!(ro.write(0, &[1]), Err(IoError::ReadOnly));
        let bad =
            |l: Layout| CryptVolume::new(MemDevice::new(4096), Cipher::XtsPlain64(x.clone().into()), l, false).err();
        assert_eq!(bad(Layout { sector_size: 1024, ..Layout::PLAIN_512 }), Some(LayoutError::SectorSize(1024)));
        assert_eq!(bad(Layout { data_offset: 100, ..Layout::PLAIN_512 }), Some(LayoutError::DataOffset(100)));
        assert!(matches!(bad(Layout { data_offset: 4096, ..Layout::PLAIN_512 }), Some(LayoutError::TooSmall { .. })));
    }

    #[test]
    fn write_zeroes_reads_back_zero_but_stores_no_zeroes() {
        let mut v = vol(Layout::PLAIN_512);
        v.write(0, &[9; 5000]).unwrap();
        v.write_zeroes(100, 4000).unwrap();
        let mut b = vec![1u8; 5000];
        v.read(0, &mut b).unwrap();
        assert!(
            b[..100].iter().all(|&x| x == 9)
                && b[100..4100].iter().all(|&x| x == 0)
                && b[4100..].iter().all(|&x| x == 9)
        );
        assert_ne!(&v.device().bytes[512..1024], &[0u8; 512][..]);
    }
}
