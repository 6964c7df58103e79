//! Exceptions are fatal. An IDT with one stub per CPU exception (0–31) logs
//! the vector, error code, RIP and CR2 and exits with
//! [`Failure::CpuException`](crate::exit::Failure) instead of letting the
//! CPU triple-fault into a silent reset. Handlers never return, so running
//! them on the interrupted stack (red zone included) is harmless.

use core::fmt::Write;

core::arch::global_asm!(
    r#"
    .section .text
    .altmacro
    .macro SSC_ISR n
    ssc_isr_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        push $\n
    .else
        push $0
        push $\n
    .endif
        jmp ssc_isr_common
    .endm

    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    SSC_ISR \n
    .endr

ssc_isr_common:
    mov %rsp, %rdi
    and $-16, %rsp
    call ssc_exception
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .p2align 3
    .global SSC_ISR_TABLE
SSC_ISR_TABLE:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad ssc_isr_\n
    .endr
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static SSC_ISR_TABLE: [u64; 32];
}

#[repr(C, align(16))]
struct Idt([u64; 64]);

static mut IDT: Idt = Idt([0; 64]);

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Builds and loads the IDT.
pub fn init() {
    // SAFETY: called once at boot on the only CPU, before anything reads
    // IDT; the table symbol is defined in the assembly above.
    unsafe {
        let idt = &raw mut IDT;
        for (i, &handler) in SSC_ISR_TABLE.iter().enumerate() {
            // 64-bit interrupt gate: selector 0x08, present, DPL 0, type 0xE.
            let low = (handler & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((handler >> 16) & 0xffff) << 48;
            (*idt).0[2 * i] = low;
            (*idt).0[2 * i + 1] = handler >> 32;
        }
        let ptr = IdtPointer { limit: (core::mem::size_of::<Idt>() - 1) as u16, base: idt as u64 };
        core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags));
    }
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating point",
    "alignment check",
    "machine check",
    "SIMD floating point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Called by the common stub with a pointer to
/// `[vector, error code, rip, cs, rflags, rsp, ss]`.
#[unsafe(no_mangle)]
extern "C" fn ssc_exception(frame: *const u64) -> ! {
    // SAFETY: the stub passes the stack pointer right after pushing vector
    // and error code on top of the CPU's 5-word exception frame.
    let f = unsafe { core::slice::from_raw_parts(frame, 7) };
    let vector = f[0] as usize;
    let mut msg = crate::FixedString::<160>::new();
    let _ = write!(
        msg,
        "CPU exception {} ({}) error={:#x} rip={:#x} rsp={:#x} cr2={:#x}",
        vector,
        NAMES.get(vector).copied().unwrap_or("?"),
        f[1],
        f[2],
        f[5],
        crate::cpu::cr2()
    );
    crate::exit::fail(crate::exit::Failure::CpuException, msg.as_str())
}
