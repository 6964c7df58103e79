//! The PVH `hvm_start_info` structure (Xen's `arch-x86/hvm/start_info.h`,
//! version 1): command line and the memory map. QEMU's PVH loader (its
//! `pvh.bin` option ROM after SeaBIOS, or qboot) fills it.

use alloc::vec::Vec;

const MAGIC: u32 = 0x336e_c578;

/// A RAM region from the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub len: u64,
}

/// What the runtime takes from the boot information.
#[derive(Debug)]
pub struct BootInfo {
    pub cmdline: &'static str,
    pub ram: Vec<MemRegion>,
}

/// Reads `hvm_start_info` at `paddr`. Called before the heap exists, so it
/// returns the raw map into a fixed array first.
pub fn read_raw(paddr: u64) -> Result<(&'static str, [MemRegion; 16], usize), &'static str> {
    if paddr == 0 {
        return Err("no PVH start info (ebx = 0): boot this image with QEMU -kernel (PVH)");
    }
    let p = paddr as *const u32;
    // SAFETY: PVH guarantees `ebx` points at a valid hvm_start_info in RAM,
    // identity-mapped by the boot code; we checked it is non-null.
    let (magic, version) = unsafe { (p.read_volatile(), p.add(1).read_volatile()) };
    if magic != MAGIC {
        return Err("PVH start info has a bad magic number");
    }
    let at = |off: usize| -> u64 {
        // SAFETY: offsets lie inside the 56-byte version-1 structure.
        unsafe { ((paddr as usize + off) as *const u64).read_unaligned() }
    };
    let cmdline_paddr = at(24);
    let cmdline = if cmdline_paddr == 0 {
        ""
    } else {
        let s = cmdline_paddr as *const u8;
        // SAFETY: the loader gives a NUL-terminated string in RAM.
        let len = unsafe { crate::shim::c_strlen(s) };
        // SAFETY: `len` bytes before the terminator are readable and live
        // for the whole boot (the loader's memory is never reused by us:
        // the heap starts above the image).
        let bytes = unsafe { core::slice::from_raw_parts(s, len) };
        core::str::from_utf8(bytes).unwrap_or("")
    };
    let mut regions = [MemRegion { start: 0, len: 0 }; 16];
    let mut n = 0;
    if version >= 1 {
        let map = at(40);
        // SAFETY: `memmap_entries` is a u32 at offset 48 of version 1.
        let entries = unsafe { ((paddr as usize + 48) as *const u32).read_unaligned() };
        for i in 0..entries as usize {
            let e = (map as usize + i * 24) as *const u8;
            // SAFETY: the loader provides `entries` 24-byte entries at `map`.
            let (addr, size, kind) = unsafe {
                (
                    (e as *const u64).read_unaligned(),
                    (e.add(8) as *const u64).read_unaligned(),
                    (e.add(16) as *const u32).read_unaligned(),
                )
            };
            if kind == 1 && n < regions.len() {
                regions[n] = MemRegion { start: addr, len: size };
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err("PVH start info has no RAM in its memory map (version 0 loader?)");
    }
    Ok((cmdline, regions, n))
}
