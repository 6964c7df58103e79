//! Another domain's guest-physical memory, as service cores see it: a
//! window granted by the builder (an `ivshmem` BAR in the image, a buffer in
//! tests and benchmarks). Every access is bounds-checked; nothing outside
//! the window is reachable through it. Guest memory is attacker-controlled
//! and may change under the reader while the guest runs.

/// An access outside the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub gpa: u64,
    pub len: usize,
    pub size: u64,
}

impl core::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "guest access at {:#x}+{} is outside the {}-byte memory window", self.gpa, self.len, self.size)
    }
}

/// Bounds-checked access by guest-physical address.
pub trait GuestMemory {
    /// Bytes of guest-physical memory the window covers (from address 0).
    fn size(&self) -> u64;
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange>;
    /// Fails on a read-only window as well as out of range.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange>;
}

/// Guest memory in a buffer (tests, benchmarks, host-side tools).
impl GuestMemory for alloc::vec::Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let src = usize::try_from(gpa).ok().and_then(|o| self.get(o..o.checked_add(buf.len())?));
        let src = src.ok_or(OutOfRange { gpa, len: buf.len(), size: self.size() })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let size = self.size();
        let dst = usize::try_from(gpa).ok().and_then(|o| self.get_mut(o..o.checked_add(data.len())?));
        let dst = dst.ok_or(OutOfRange { gpa, len: data.len(), size })?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
