//! Memory windows: another domain's guest-physical memory, attached by the
//! builder as an `ivshmem-plain` PCI device (1af4:1110) whose BAR2 is the
//! shared memory file. The builder attaches one only when a grant says so,
//! read-only unless the grant includes write. A read-only window is mapped
//! by QEMU copy-on-write: the image can still write to it and read its own
//! writes back, but they never reach the file or the other domain.
//!
//! A window is exposed as bounds-checked `read`/`write` by offset (=
//! guest-physical address of the other domain); nothing outside the BAR is
//! reachable through it.

use virtio_drivers::transport::pci::bus::{BarInfo, PciRoot};

use crate::paging::{Caching, map_identity};
use crate::pci::{PciFunction, PortCam};

/// PCI vendor and device of QEMU's `ivshmem-plain`.
pub const IVSHMEM: (u16, u16) = (0x1af4, 0x1110);

/// One memory window.
#[derive(Debug)]
pub struct MemoryWindow {
    base: u64,
    len: u64,
}

/// An access outside the window (the ABI's type, shared with the cores).
pub use ssc_abi::memory::OutOfRange as OutOfWindow;

impl MemoryWindow {
    /// Maps BAR2 of an ivshmem function.
    pub(crate) fn new(root: &mut PciRoot<PortCam>, f: &PciFunction) -> Result<Self, &'static str> {
        let Ok(Some(BarInfo::Memory { address, size, .. })) = root.bar_info(f.address, 2) else {
            return Err("ivshmem device without a memory BAR2");
        };
        if address == 0 || size == 0 {
            return Err("ivshmem BAR2 is not assigned");
        }
        crate::pci::enable(root, f.address);
        map_identity(address, size, Caching::WriteBack).map_err(|_| "cannot map the ivshmem BAR")?;
        Ok(MemoryWindow { base: address, len: size })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<*mut u8, OutOfWindow> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok((self.base + offset) as *mut u8),
            _ => Err(OutOfWindow { gpa: offset, len, size: self.len }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the window.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OutOfWindow> {
        let src = self.check(offset, buf.len())?;
        // The other domain may change the bytes concurrently, which a byte
        // copy tolerates (callers treat window contents as untrusted).
        // SAFETY: `check` keeps the range inside the BAR, which `new` mapped.
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` into the window at `offset` (kept private to this
    /// domain when the window is read-only).
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), OutOfWindow> {
        let dst = self.check(offset, buf.len())?;
        // SAFETY: as for `read`; `&mut self` keeps our own accesses ordered.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        Ok(())
    }
}

/// What service cores see: the window as the other domain's
/// guest-physical memory.
impl ssc_abi::memory::GuestMemory for MemoryWindow {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfWindow> {
        MemoryWindow::read(self, gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        MemoryWindow::write(self, gpa, data)
    }
}
