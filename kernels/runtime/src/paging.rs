//! Identity mapping beyond the first 4 GiB. The boot code maps 0–4 GiB with
//! 2 MiB pages; a 64-bit PCI BAR (a large ivshmem window, say) can sit far
//! above that, so device glue asks for it here, on demand, before touching
//! it. Register BARs are mapped uncached (PCD|PWT); memory windows (ivshmem
//! BAR2, which is host RAM) write-back.

use alloc::alloc::{Layout, alloc_zeroed};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const TWO_MIB: u64 = 2 * 1024 * 1024;
/// The boot code maps everything below this.
pub const BOOT_MAPPED: u64 = 4 * 1024 * 1024 * 1024;

static LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Why a range could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// Beyond 48-bit (4-level) physical addressing.
    TooHigh,
    /// No memory left for a page table.
    OutOfMemory,
}

fn new_table() -> Result<u64, MapError> {
    let layout = Layout::from_size_align(4096, 4096).map_err(|_| MapError::OutOfMemory)?;
    // SAFETY: non-zero size layout.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        return Err(MapError::OutOfMemory);
    }
    // Identity mapping: the virtual address is the physical address.
    Ok(p as u64)
}

/// Walks one level: returns the next table's address, creating it if absent.
///
/// # Safety
/// `table` is the physical (= virtual) address of a live page table.
unsafe fn next_level(table: u64, index: u64) -> Result<u64, MapError> {
    let entry = (table + index * 8) as *mut u64;
    // SAFETY: `table` is a live, identity-mapped page table and `index < 512`.
    let value = unsafe { entry.read_volatile() };
    if value & PRESENT != 0 {
        return Ok(value & ADDR_MASK);
    }
    let t = new_table()?;
    // SAFETY: as above; we are the only writer (LOCK held by the caller).
    unsafe { entry.write_volatile(t | PRESENT | WRITABLE) };
    Ok(t)
}

/// Caching of a new mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// Device registers.
    Uncached,
    /// RAM behind a BAR (memory windows).
    WriteBack,
}

/// Ensures `[paddr, paddr + len)` is identity-mapped.
pub fn map_identity(paddr: u64, len: u64, caching: Caching) -> Result<(), MapError> {
    let end = paddr.checked_add(len).ok_or(MapError::TooHigh)?;
    if end <= BOOT_MAPPED {
        return Ok(());
    }
    if end > (1u64 << 48) {
        return Err(MapError::TooHigh);
    }
    let _guard = LOCK.lock();
    let mut addr = paddr.max(BOOT_MAPPED) & !(TWO_MIB - 1);
    let pml4 = crate::cpu::cr3() & ADDR_MASK;
    while addr < end {
        // SAFETY: CR3 holds the live PML4; each level returns a live table.
        unsafe {
            let pdpt = next_level(pml4, (addr >> 39) & 511)?;
            let pd = next_level(pdpt, (addr >> 30) & 511)?;
            let entry = (pd + ((addr >> 21) & 511) * 8) as *mut u64;
            if entry.read_volatile() & PRESENT == 0 {
                let attrs = match caching {
                    Caching::Uncached => PCD | PWT,
                    Caching::WriteBack => 0,
                };
                entry.write_volatile(addr | PRESENT | WRITABLE | HUGE | attrs);
            }
        }
        addr += TWO_MIB;
    }
    crate::cpu::flush_tlb();
    Ok(())
}
