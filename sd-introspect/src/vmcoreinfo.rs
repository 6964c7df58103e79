//! Finding the KASLR slide deterministically: the kernel keeps its
//! VMCOREINFO text (`OSRELEASE=…`, `BUILD-ID=…`, `KERNELOFFSET=…`,
//! `NUMBER(phys_base)=…`, `SYMBOL(init_top_pgt)=…`) in a page it allocates
//! at boot (`vmcoreinfo_data`, page aligned, the text starts at offset 0).
//! The scanner reads the first bytes of every page until it finds one.

use alloc::string::String;
use alloc::vec::Vec;

use crate::GuestMemory;

const MAGIC: &[u8] = b"OSRELEASE=";
/// The VMCOREINFO text is at most one page (`VMCOREINFO_BYTES`).
const PAGE: usize = 4096;

/// What VMCOREINFO says about the running kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmcoreInfo {
    /// Where the text was found.
    pub gpa: u64,
    pub release: String,
    /// Raw bytes of the build id (the text has it in hex).
    pub build_id: Vec<u8>,
    /// `KERNELOFFSET`: the KASLR slide of kernel text.
    pub slide: u64,
    pub phys_base: u64,
    /// Run-time virtual address of the top-level kernel page table.
    pub init_top_pgt: u64,
    /// 5-level paging in use.
    pub five_level: bool,
}

/// Scans page starts for the VMCOREINFO text; `None` if no page has it
/// yet (the kernel has not got that far in its boot) or none parses.
pub fn find(mem: &dyn GuestMemory) -> Option<VmcoreInfo> {
    let mut head = [0u8; 10];
    let mut page = alloc::vec![0u8; PAGE];
    let mut gpa = 0u64;
    while gpa + PAGE as u64 <= mem.size() {
        if mem.read(gpa, &mut head).is_ok()
            && head == MAGIC
            && mem.read(gpa, &mut page).is_ok()
            && let Some(mut info) = parse(&page)
        {
            info.gpa = gpa;
            return Some(info);
        }
        gpa += PAGE as u64;
    }
    None
}

/// Parses the text (up to its first NUL); `None` if a needed key is
/// missing or malformed.
pub fn parse(text: &[u8]) -> Option<VmcoreInfo> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = core::str::from_utf8(&text[..end]).ok()?;
    let (mut release, mut build_id, mut slide, mut phys_base, mut pgt, mut l5) = (None, None, None, None, None, false);
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        match key {
            "OSRELEASE" => release = Some(String::from(value)),
            "BUILD-ID" => build_id = hex(value),
            "KERNELOFFSET" => slide = u64::from_str_radix(value, 16).ok(),
            "NUMBER(phys_base)" => phys_base = value.parse::<i64>().ok().map(|v| v as u64),
            "SYMBOL(init_top_pgt)" => pgt = u64::from_str_radix(value, 16).ok(),
            "NUMBER(pgtable_l5_enabled)" => l5 = value == "1",
            _ => {}
        }
    }
    Some(VmcoreInfo {
        gpa: 0,
        release: release?,
        build_id: build_id?,
        slide: slide?,
        phys_base: phys_base?,
        init_top_pgt: pgt?,
        five_level: l5,
    })
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
