//! The guest controls every byte the monitor reads. Starting from a booted
//! fake guest (page tables, VMCOREINFO, task list and tree, modules,
//! syscall table, IDT, text), the fuzz input overwrites 8-byte words —
//! aimed at the page tables, VMCOREINFO, the kernel image or the heap of
//! tasks and modules — between an attach and the scans that follow, and
//! before a fresh attach. Never a panic, never a hang (libFuzzer's
//! timeout), whatever the guest wrote.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sd_introspect::fake::{Guest, MEM, booted};

/// Where the interesting words are: page tables, VMCOREINFO, the kernel
/// image, the heap (tasks, stacks, modules), anywhere.
const REGIONS: [(usize, usize); 5] =
    [(0x10000, 0x5000), (0x30_0000, 0x1000), (4 << 20, 4 << 20), (8 << 20, 1 << 20), (0, MEM)];

fn template(five: bool) -> &'static Guest {
    static G4: OnceLock<Guest> = OnceLock::new();
    static G5: OnceLock<Guest> = OnceLock::new();
    // The untouched guest must attach, or the target would only ever fuzz
    // the error paths.
    let boot = |five| {
        let g = booted(five);
        assert!(g.monitor(1).attach(&g.mem).is_ok(), "the fake guest no longer attaches");
        g
    };
    if five { G5.get_or_init(|| boot(true)) } else { G4.get_or_init(|| boot(false)) }
}

fn guest(five: bool) -> Guest {
    let t = template(five);
    Guest { mem: t.mem.clone(), p: t.p.clone(), five, next_heap: t.next_heap, tasks: t.tasks.clone() }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let mut g = guest(first & 1 == 1);
    let mut m = g.monitor(2);
    let _ = m.attach(&g.mem);
    for w in rest.chunks_exact(13) {
        let (base, len) = REGIONS[w[0] as usize % REGIONS.len()];
        let at = base + (u32::from_le_bytes(w[1..5].try_into().unwrap()) as usize % (len / 8)) * 8;
        g.mem[at..at + 8].copy_from_slice(&w[5..13]);
    }
    let _ = m.scan(&g.mem);
    let _ = m.snapshot(&g.mem);
    let mut fresh = g.monitor(1);
    if fresh.attach(&g.mem).is_ok() {
        let _ = fresh.scan(&g.mem);
        let _ = fresh.snapshot(&g.mem);
    }
});
