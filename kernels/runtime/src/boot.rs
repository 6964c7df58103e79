//! PVH entry: 32-bit protected mode → long mode → `rust_start`.
//!
//! QEMU (and Firecracker, Cloud Hypervisor) load an ELF whose `.note.Xen`
//! note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`) names a 32-bit entry point.
//! We arrive there with paging off, flat 32-bit segments, no stack, `ebx` =
//! physical address of `hvm_start_info` and CR0 = PE|ET (0x11).
//!
//! The entry code:
//! 1. keeps `ebx` and the TSC (boot timestamp) in `.data`, before `cpuid`
//!    or anything else can clobber them;
//! 2. zeroes `.bss` (page tables and the boot stack live there);
//! 3. identity-maps the first 4 GiB with 2 MiB pages (RAM, the 32-bit PCI
//!    hole, LAPIC/IOAPIC); 64-bit BARs above 4 GiB are mapped on demand by
//!    [`crate::paging`];
//! 4. enables PAE, long mode, paging, sets CR0 explicitly (MP|NE|WP, EM off);
//! 5. in 64-bit mode enables SSE (OSFXSR|OSXMMEXCPT) and, where the CPU has
//!    XSAVE, OSXSAVE with XCR0 = x87|SSE(|AVX): the prebuilt `core` and the
//!    crypto crates are compiled for a hard-float target and use SSE freely;
//! 6. calls `rust_start(start_info_paddr)` on a 256 KiB boot stack.
//!
//! Interrupts stay disabled for the whole life of an image (we poll devices),
//! so the red zone that the prebuilt `core` uses is never clobbered by an
//! interrupt. Exceptions are fatal: see [`crate::idt`].

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4                 /* namesz */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long pvh_start32
    .p2align 2

    .section .data
    .p2align 3
    .global SSC_BOOT_TSC
SSC_BOOT_TSC:
    .quad 0
    .global SSC_START_INFO
SSC_START_INFO:
    .quad 0

    .p2align 3
boot_gdt:
    .quad 0x0000000000000000    /* null */
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code, DPL0 */
    .quad 0x00cf92000000ffff    /* 0x10: data, flat */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss
    .p2align 12
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 262144
boot_stack_top:

    .section .text.pvh, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi
    rdtsc
    mov %eax, SSC_BOOT_TSC
    mov %edx, SSC_BOOT_TSC + 4
    mov %esi, SSC_START_INFO

    /* zero .bss */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    /* PML4[0] -> PDPT, PDPT[0..4] -> PD[0..4] */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt
    add $0x1000, %eax
    mov %eax, boot_pdpt + 8
    add $0x1000, %eax
    mov %eax, boot_pdpt + 16
    add $0x1000, %eax
    mov %eax, boot_pdpt + 24

    /* 2048 x 2 MiB identity pages: present | writable | page size */
    mov $boot_pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
1:
    mov %eax, (%edi)
    movl $0, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 1b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov $0x80010033, %eax       /* PG | WP | NE | ET | MP | PE; EM clear */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp

    /* SSE: CR4.OSFXSR | CR4.OSXMMEXCPT */
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4

    /* XSAVE present? then OSXSAVE and XCR0 = x87 | SSE (| AVX) */
    mov $1, %eax
    cpuid
    mov %ecx, %esi
    test $(1 << 26), %esi
    jz 2f
    mov %cr4, %rax
    or $(1 << 18), %rax
    mov %rax, %cr4
    mov $3, %eax
    test $(1 << 28), %esi
    jz 3f
    or $4, %eax
3:
    xor %edx, %edx
    xor %ecx, %ecx
    xsetbv
2:
    fninit
    xor %ebp, %ebp
    mov SSC_START_INFO, %edi
    call rust_start
4:
    cli
    hlt
    jmp 4b
"#,
    options(att_syntax)
);
