//! Privileged x86-64 instructions the runtime needs, each in one small
//! function. Port I/O, CPUID, TSC, control registers.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the images run
    // in ring 0 and only touch the legacy ports this runtime owns (COM1, PIT,
    // PCI config, isa-debug-exit).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects; we run in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads CR3 (the physical address of the top-level page table).
pub fn cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects; we run in ring 0.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Flushes the whole TLB by reloading CR3 with its own value.
pub fn flush_tlb() {
    // SAFETY: writing back the current CR3 keeps the same page tables; it only
    // drops cached translations, which is what the caller wants after editing
    // the tables.
    unsafe { asm!("mov cr3, {}", in(reg) cr3(), options(nostack, preserves_flags)) }
}

/// Stops the CPU for good (interrupts are off, so `hlt` never returns).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts disabled, HLT parks the CPU; nothing follows.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Reads a 64-bit value from a hardware RNG instruction; `seed` picks RDSEED
/// over RDRAND. Returns `None` when the instruction reports no entropy (CF=0).
pub fn hw_random(seed: bool) -> Option<u64> {
    let value: u64;
    let ok: u8;
    // SAFETY: the caller has checked CPUID for RDRAND/RDSEED support (see
    // `rng::init`); the instructions only write the named registers and flags.
    unsafe {
        if seed {
            asm!("rdseed {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack));
        } else {
            asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack));
        }
    }
    (ok == 1).then_some(value)
}
