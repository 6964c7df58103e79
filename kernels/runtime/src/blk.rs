//! virtio-blk through `virtio-drivers`' driver (queue of 16 entries; its
//! constructor checks QueueNumMax). Byte-addressed access in whole sectors.
//! Large reads and writes are split into 64 KiB requests of which up to
//! [`IN_FLIGHT`] are queued at once, so the host works on several while the
//! guest waits (one at a time, 1 MiB took sixteen round trips).

use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;

use crate::hal::SscHal;

/// Sector size of every virtio-blk device here.
pub const SECTOR: usize = SECTOR_SIZE;
/// Bytes per request.
const PIECE: usize = 64 * 1024;
/// Requests queued at once (without indirect descriptors each takes three
/// of the queue's 16 descriptors; a full queue just waits for one to end).
pub const IN_FLIGHT: usize = 8;

/// What [`BlockDevice::pipeline`] asks of a read or a write.
enum Step {
    /// Queue piece `i` at `sector`; returns its token.
    Submit { i: usize, sector: usize },
    /// Piece `i` finished under `token`: reclaim its buffers.
    Complete { token: u16, i: usize },
}

/// One queued request's device-visible parts and its piece of the buffer.
#[derive(Default)]
struct Slot {
    req: BlkReq,
    resp: BlkResp,
    /// (token, piece index) while queued.
    busy: Option<(u16, usize)>,
}

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
        let first = self.check(offset, buf.len())?;
        let mut pieces: alloc::vec::Vec<&mut [u8]> = buf.chunks_mut(PIECE).collect();
        self.pipeline(first, pieces.len(), |blk, slot, step| match step {
            Step::Submit { i, sector } => {
                // SAFETY: `slot.req`, `slot.resp` and `pieces[i]` stay untouched
                // (and alive: they outlive `pipeline`) until `Complete` passes
                // the same three back for this request's token.
                unsafe { blk.read_blocks_nb(sector, &mut slot.req, pieces[i], &mut slot.resp) }
            }
            Step::Complete { token, i } => {
                // SAFETY: the same buffers that `read_blocks_nb` queued under `token`.
                unsafe { blk.complete_read_blocks(token, &slot.req, pieces[i], &mut slot.resp).map(|()| token) }
            }
        })
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let first = self.check(offset, buf.len())?;
        let pieces: alloc::vec::Vec<&[u8]> = buf.chunks(PIECE).collect();
        self.pipeline(first, pieces.len(), |blk, slot, step| match step {
            Step::Submit { i, sector } => {
                // SAFETY: as in `read_at`; the device only reads `pieces[i]`.
                unsafe { blk.write_blocks_nb(sector, &mut slot.req, pieces[i], &mut slot.resp) }
            }
            Step::Complete { token, i } => {
                // SAFETY: the same buffers that `write_blocks_nb` queued under `token`.
                unsafe { blk.complete_write_blocks(token, &slot.req, pieces[i], &mut slot.resp).map(|()| token) }
            }
        })
    }

    /// Runs `count` piece requests starting at sector `first`, up to
    /// [`IN_FLIGHT`] at a time. Every queued request is completed before
    /// this returns, even after an error: the device holds the buffers
    /// until then. The first error wins.
    fn pipeline(
        &mut self,
        first: usize,
        count: usize,
        mut op: impl FnMut(&mut VirtIOBlk<SscHal, PciTransport>, &mut Slot, Step) -> virtio_drivers::Result<u16>,
    ) -> Result<(), BlockError> {
        let mut slots: [Slot; IN_FLIGHT] = Default::default();
        let (mut next, mut done, mut failed) = (0, 0, None);
        while done < count {
            // Queue what fits.
            while next < count && failed.is_none() {
                let Some(slot) = slots.iter_mut().find(|s| s.busy.is_none()) else { break };
                match op(&mut self.inner, slot, Step::Submit { i: next, sector: first + next * (PIECE / SECTOR) }) {
                    Ok(token) => {
                        slot.busy = Some((token, next));
                        next += 1;
                    }
                    Err(virtio_drivers::Error::QueueFull) if slots.iter().any(|s| s.busy.is_some()) => break,
                    Err(e) => failed = Some(BlockError::Device(e)),
                }
            }
            if failed.is_some() && !slots.iter().any(|s| s.busy.is_some()) {
                break;
            }
            // Reap one completion.
            let Some(token) = self.inner.peek_used() else {
                core::hint::spin_loop();
                continue;
            };
            let Some(slot) = slots.iter_mut().find(|s| s.busy.is_some_and(|(t, _)| t == token)) else {
                return Err(BlockError::Device(virtio_drivers::Error::WrongToken));
            };
            let (_, i) = slot.busy.take().expect("busy");
            if let Err(e) = op(&mut self.inner, slot, Step::Complete { token, i }) {
                failed.get_or_insert(BlockError::Device(e));
            }
            done += 1;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), BlockError> {
        self.inner.flush().map_err(BlockError::Device)
    }
}
