//! virtio-blk through `virtio-drivers`' driver (queue of 16 entries; its
//! constructor checks QueueNumMax). Byte-addressed access in whole sectors.

use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;

use crate::hal::SscHal;

/// Sector size of every virtio-blk device here.
pub const SECTOR: usize = SECTOR_SIZE;

/// A virtio-blk disk.
pub struct BlockDevice {
    inner: VirtIOBlk<SscHal, PciTransport>,
}

/// An error from the disk.
#[derive(Debug)]
pub enum BlockError {
    /// Offset or length not a multiple of the sector size.
    Misaligned { offset: u64, len: usize },
    /// Beyond the end of the disk.
    OutOfRange { offset: u64, len: usize, capacity: u64 },
    /// The device reported an error.
    Device(virtio_drivers::Error),
}

impl core::fmt::Display for BlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BlockError::Misaligned { offset, len } => {
                write!(f, "disk access at {offset}+{len} is not sector-aligned ({SECTOR} bytes)")
            }
            BlockError::OutOfRange { offset, len, capacity } => {
                write!(f, "disk access at {offset}+{len} is beyond the end ({capacity} bytes)")
            }
            BlockError::Device(e) => write!(f, "virtio-blk: {e}"),
        }
    }
}

impl BlockDevice {
    pub fn new(transport: PciTransport) -> Result<Self, BlockError> {
        Ok(BlockDevice { inner: VirtIOBlk::new(transport).map_err(BlockError::Device)? })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity() * SECTOR as u64
    }

    /// Whether the device is read-only.
    pub fn readonly(&self) -> bool {
        self.inner.readonly()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, BlockError> {
        if !offset.is_multiple_of(SECTOR as u64) || !len.is_multiple_of(SECTOR) {
            return Err(BlockError::Misaligned { offset, len });
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > self.capacity()) {
            return Err(BlockError::OutOfRange { offset, len, capacity: self.capacity() });
        }
        Ok((offset / SECTOR as u64) as usize)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut sector = self.check(offset, buf.len())?;
        // One request per 64 KiB keeps each descriptor chain small.
        for chunk in buf.chunks_mut(64 * 1024) {
            self.inner.read_blocks(sector, chunk).map_err(BlockError::Device)?;
            sector += chunk.len() / SECTOR;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut sector = self.check(offset, buf.len())?;
        for chunk in buf.chunks(64 * 1024) {
            self.inner.write_blocks(sector, chunk).map_err(BlockError::Device)?;
            sector += chunk.len() / SECTOR;
        }
        Ok(())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), BlockError> {
        self.inner.flush().map_err(BlockError::Device)
    }
}
