//! x86-64 page-table walks (4- and 5-level) over guest-physical memory.
//! Every entry is read from attacker-controlled memory: a walk is at most
//! five reads, every address it computes is checked against the window,
//! and a malformed entry is a [`Fault`], never a panic.

use crate::GuestMemory;

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
/// Bits 12..51 of an entry: the next table or the page frame.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why a virtual address has no physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Not canonical for the paging mode.
    NonCanonical(u64),
    /// An entry on the way is not present.
    NotMapped(u64),
    /// A table or the page lies outside guest RAM.
    OutsideRam(u64),
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Fault::NonCanonical(va) => write!(f, "{va:#x} is not a canonical address"),
            Fault::NotMapped(va) => write!(f, "{va:#x} is not mapped"),
            Fault::OutsideRam(pa) => write!(f, "physical {pa:#x} is outside guest RAM"),
        }
    }
}

/// One address space: the physical address of its top-level table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressSpace {
    pub root: u64,
    pub five_level: bool,
}

impl AddressSpace {
    /// The guest-physical address of `va`.
    pub fn translate(&self, mem: &dyn GuestMemory, va: u64) -> Result<u64, Fault> {
        let levels: u32 = if self.five_level { 5 } else { 4 };
        let bits = 12 + 9 * levels; // 48 or 57
        let top = va >> (bits - 1);
        if top != 0 && top != (u64::MAX >> (bits - 1)) {
            return Err(Fault::NonCanonical(va));
        }
        let mut table = self.root & ADDR;
        for level in (0..levels).rev() {
            let shift = 12 + 9 * level;
            let index = (va >> shift) & 0x1ff;
            let mut e = [0u8; 8];
            mem.read(table + index * 8, &mut e).map_err(|_| Fault::OutsideRam(table))?;
            let entry = u64::from_le_bytes(e);
            if entry & PRESENT == 0 {
                return Err(Fault::NotMapped(va));
            }
            // A large page at the 1 GiB (level 2) or 2 MiB (level 1) level.
            if (level == 1 || level == 2) && entry & HUGE != 0 {
                let size = 1u64 << shift;
                let pa = (entry & ADDR & !(size - 1)) | (va & (size - 1));
                return check(mem, pa);
            }
            table = entry & ADDR;
        }
        check(mem, table | (va & 0xfff))
    }
}

fn check(mem: &dyn GuestMemory, pa: u64) -> Result<u64, Fault> {
    if pa < mem.size() { Ok(pa) } else { Err(Fault::OutsideRam(pa)) }
}
