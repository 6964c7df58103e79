//! The monitor against the fake guest of [`crate::fake`]: attach, scans,
//! the rootkit tricks, and random corruption.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;

use crate::fake::*;
use crate::profile::*;
use crate::{AttachError, Config, Event, GuestMemory, Monitor, Owner};

fn pids(ev: &Event) -> Vec<(i32, String)> {
    match ev {
        Event::Snapshot { processes, .. } => processes.iter().map(|p| (p.pid, p.comm.clone())).collect(),
        other => panic!("not a snapshot: {other:?}"),
    }
}

#[test]
fn attaches_through_vmcoreinfo_and_lists_processes_4_and_5_level() {
    for five in [false, true] {
        let g = booted(five);
        let mut m = g.monitor(1);
        let ev = m.attach(&g.mem).expect("attach");
        assert!(
            matches!(&ev[0], Event::Attached { slide: SLIDE, processes: 5, modules: 0, five_level, .. } if *five_level == five),
            "{ev:?}"
        );
        let snap = m.snapshot(&g.mem).unwrap();
        let want: Vec<(i32, String)> = [(1, "init"), (2, "kthreadd"), (10, "kworker/0:1"), (100, "sh"), (101, "sleep")]
            .iter()
            .map(|(p, c)| (*p, String::from(*c)))
            .collect();
        assert_eq!(pids(&snap), want);
        let Event::Snapshot { processes, .. } = snap else { unreachable!() };
        let sleep = processes.iter().find(|p| p.pid == 101).unwrap();
        assert_eq!((sleep.ppid, sleep.syscall, sleep.kernel_thread), (100, Some(9), false));
        assert!(processes.iter().find(|p| p.pid == 2).unwrap().kernel_thread);
        // Nothing changed: a scan reports nothing but the summary.
        let ev = m.scan(&g.mem);
        assert!(ev.iter().all(|e| matches!(e, Event::Syscalls { .. })), "{ev:?}");
    }
}

#[test]
fn a_profile_of_another_build_is_refused_by_build_id() {
    let mut g = booted(false);
    g.vmcoreinfo(&[1, 2, 3, 4]);
    let err = g.monitor(1).attach(&g.mem).expect_err("refused");
    assert!(matches!(&err, AttachError::WrongBuild { .. }), "{err:?}");
    assert!(err.to_string().contains("ssc profile build"), "{err}");
    let empty = vec![0u8; 1 << 20];
    assert_eq!(g.monitor(1).attach(&empty).err(), Some(AttachError::NoVmcoreInfo));
}

#[test]
fn process_start_and_exit_are_reported() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    g.spawn(200, "worker", 100, true, Some(1));
    g.exit(101);
    let ev = m.scan(&g.mem);
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::ProcessStart { process } if process.pid == 200 && process.comm == "worker"))
    );
    assert!(ev.iter().any(|e| matches!(e, Event::ProcessExit { pid: 101, comm } if comm == "sleep")));
}

#[test]
fn a_process_unlinked_from_the_task_list_is_found_through_the_tree() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    let t = g.task(101) + g.p.task.tasks as u64;
    g.list_del(t);
    // One scan may race a fork or exit: reported at the second.
    assert!(!m.scan(&g.mem).iter().any(|e| matches!(e, Event::HiddenProcess { .. })));
    let ev = m.scan(&g.mem);
    assert!(ev.iter().any(|e| matches!(e, Event::HiddenProcess { pid: 101, comm, .. } if comm == "sleep")), "{ev:?}");
    // Reported once, not on every scan.
    assert!(!m.scan(&g.mem).iter().any(|e| matches!(e, Event::HiddenProcess { .. })));
}

#[test]
fn syscall_hooks_name_the_module_and_are_reported_restored() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    let base = g.load_module("rootkit", 0x2000);
    let table = g.sym(g.p.symbols.sys_call_table);
    let original = g.r64(table + 5 * 8);
    g.w64(table + 5 * 8, base + 0x40);
    let ev = m.scan(&g.mem);
    assert!(ev.iter().any(|e| matches!(e, Event::ModuleLoaded { module } if module.name == "rootkit")), "{ev:?}");
    let hook = ev.iter().find(|e| matches!(e, Event::SyscallHook { .. })).expect("hook reported");
    let Event::SyscallHook { nr, name, expected, found, owner } = hook else { unreachable!() };
    assert_eq!((*nr, name.as_str(), *expected, *found), (5, "getppid", original, base + 0x40));
    assert_eq!(owner, &Owner::Module { name: "rootkit".into(), offset: 0x40 });
    assert!(!m.scan(&g.mem).iter().any(|e| matches!(e, Event::SyscallHook { .. })), "reported once");
    g.w64(table + 5 * 8, original);
    assert!(m.scan(&g.mem).iter().any(|e| matches!(e, Event::SyscallRestored { nr: 5, .. })));
}

#[test]
fn a_table_hooked_before_attach_is_caught_at_attach() {
    let mut g = booted(false);
    let table = g.sym(g.p.symbols.sys_call_table);
    g.w64(table, 0xffff_8880_0012_3456);
    let ev = g.monitor(1).attach(&g.mem).unwrap();
    assert!(ev.iter().any(|e| matches!(e, Event::SyscallHook { nr: 0, owner: Owner::Unknown, .. })), "{ev:?}");
}

#[test]
fn idt_gates_outside_text_or_changed_are_reported() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    let inside = g.sym(LINK_BASE + 0x3000);
    g.gate(14, inside);
    g.gate(128, 0xffff_8880_0040_0000);
    let ev = m.scan(&g.mem);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::IdtHook { vector: 14, baseline: Some(_), owner: Owner::KernelText { offset: 0x3000 }, .. }
        )),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(e, Event::IdtHook { vector: 128, owner: Owner::Unknown, .. })), "{ev:?}");
}

#[test]
fn text_changes_are_found_slice_by_slice() {
    let mut g = booted(false);
    let mut m = g.monitor(4); // 8 text pages, 2 per scan
    m.attach(&g.mem).unwrap();
    let at = g.sym(LINK_BASE) + 5 * 4096 + 17;
    g.w(at, &[0x90]);
    let mut found = vec![];
    for _ in 0..4 {
        found.extend(m.scan(&g.mem).into_iter().filter(|e| matches!(e, Event::TextChanged { .. })));
    }
    assert_eq!(found, vec![Event::TextChanged { at, offset: 5 * 4096 + 17 }]);
}

#[test]
fn the_kernels_own_text_patching_is_told_from_an_inline_hook() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    let text = g.sym(LINK_BASE);
    let site = text + 0x1100;
    g.w(site, &[0x0f, 0x1f, 0x44, 0x00, 0x00]); // a NOP5 jump-label site, as the kernel left it
    let hook = text + 0x3200;
    g.w(hook, &[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    // A static key flips: the NOP becomes a jump further into text.
    let rel = 0x80i32.to_le_bytes();
    g.w(site, &[0xe9, rel[0], rel[1], rel[2], rel[3]]);
    // Mid-patch (text_poke_bp's int3) is neither.
    let base = g.load_module("rootkit", 0x1000);
    g.w(hook, &[0xcc, 0x1f, 0x44, 0x00, 0x00]);
    let ev = m.scan(&g.mem);
    assert!(ev.iter().any(|e| matches!(e, Event::TextPatched { sites: 1, .. })), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::TextChanged { .. })), "{ev:?}");
    // An inline hook: a jump into a module.
    let rel = (base.wrapping_sub(hook + 5) as i64 as i32).to_le_bytes();
    g.w(hook, &[0xe9, rel[0], rel[1], rel[2], rel[3]]);
    let ev = m.scan(&g.mem);
    assert!(ev.contains(&Event::TextChanged { at: hook, offset: 0x3200 }), "{ev:?}");
}

#[test]
fn syscall_samples_count_and_alert() {
    let mut g = booted(false);
    let mut m = Monitor::new(g.p.clone(), Config::new(&g.p, 1, 3));
    m.attach(&g.mem).unwrap();
    g.set_syscall(100, 5);
    let mut all = vec![];
    for _ in 0..3 {
        all.extend(m.scan(&g.mem));
    }
    let summary = all.iter().find(|e| matches!(e, Event::Syscalls { .. })).expect("summary after 3 scans");
    let Event::Syscalls { samples, counts, tasks, .. } = summary else { unreachable!() };
    assert_eq!(*samples, 3);
    assert!(counts.contains(&(5, 3)), "{counts:?}");
    assert!(tasks.iter().any(|t| t.pid == 100 && t.nr == 5));
    g.set_syscall(101, 3); // finit_module
    let ev = m.scan(&g.mem);
    assert!(
        ev.iter().any(|e| matches!(e, Event::SyscallAlert { pid: 101, nr: 3, name, .. } if name == "finit_module"))
    );
    assert!(!m.scan(&g.mem).iter().any(|e| matches!(e, Event::SyscallAlert { .. })), "once per stay");
}

#[test]
fn a_cycle_in_the_task_list_is_inconsistent_not_a_hang() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    // sh's next points back at init's child: a cycle that skips the head.
    let (sh, init) = (g.task(100), g.task(1));
    g.w64(sh, init);
    let mut reported = vec![];
    for _ in 0..4 {
        reported.extend(m.scan(&g.mem));
    }
    assert!(
        matches!(reported.as_slice(), [Event::Inconsistent { streak: 3, .. }]),
        "an inconsistent scan reports nothing else, and the streak once: {reported:?}"
    );
    assert!(m.snapshot(&g.mem).is_err());
}

#[test]
fn pointers_outside_ram_are_inconsistent() {
    let mut g = booted(false);
    let mut m = g.monitor(1);
    m.attach(&g.mem).unwrap();
    let sh = g.task(100);
    g.w64(sh, 0xffff_8880_2000_0000); // mapped, but beyond the 16 MiB of RAM
    let e = m.snapshot(&g.mem).unwrap_err();
    assert!(e.to_string().contains("outside guest RAM"), "{e}");
}

#[test]
fn profiles_round_trip_and_bad_ones_are_refused() {
    let p = profile();
    assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
    assert!(Profile::decode(b"garbage").is_err());
    let mut q = p.clone();
    q.format = 99;
    assert!(Profile::decode(&q.encode()).unwrap_err().to_string().contains("format 99"));
    q = p.clone();
    q.symbols.text_end = q.symbols.text_start;
    assert!(Profile::decode(&q.encode()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random bytes written over a booted guest (page tables, lists,
    /// tasks, VMCOREINFO included): never a panic, a hang or an error
    /// other than the typed ones.
    #[test]
    fn random_corruption_never_panics(writes in proptest::collection::vec((0usize..MEM / 8, any::<u64>()), 1..400), five in any::<bool>()) {
        let mut g = booted(five);
        let mut m = g.monitor(2);
        let _ = m.attach(&g.mem);
        // Aim half the writes at the interesting megabytes.
        for (i, (at, v)) in writes.iter().enumerate() {
            let at = if i % 2 == 0 { (at % (1 << 17)) * 8 + (8 << 20) } else { at * 8 };
            g.mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let _ = m.scan(&g.mem);
        let _ = m.snapshot(&g.mem);
        let mut fresh = g.monitor(1);
        if fresh.attach(&g.mem).is_ok() {
            let _ = fresh.scan(&g.mem);
        }
    }

    #[test]
    fn random_memory_never_panics(seed in any::<u64>(), vmci in any::<bool>()) {
        let mut mem = vec![0u8; 2 << 20];
        let mut x = seed | 1;
        for c in mem.chunks_mut(8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        if vmci {
            let text = alloc::format!("OSRELEASE=6.1.0-test\nBUILD-ID=abcdef01\nSYMBOL(init_top_pgt)={:x}\nNUMBER(phys_base)={}\nKERNELOFFSET={:x}\n",
                seed | 0xffff_ffff_8000_0000, (seed % 1000) as i64 - 500, seed >> 40);
            mem[4096..4096 + text.len()].copy_from_slice(text.as_bytes());
            mem[4096 + text.len()] = 0;
        }
        let p = profile();
        let mut m = Monitor::new(p.clone(), Config::new(&p, 1, 1));
        if m.attach(&mem).is_ok() {
            let _ = m.scan(&mem);
        }
        let _ = mem.size();
    }
}
