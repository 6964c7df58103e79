//! A fake Linux guest built in a buffer: page tables (4- or 5-level),
//! VMCOREINFO, `init_task` and a task list and tree, modules, a syscall
//! table, an IDT and text, all where a [`Profile`] says they are.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;

use crate::profile::*;
use crate::{AttachError, Config, Event, GuestMemory, Monitor, Owner};

const MEM: usize = 16 << 20;
const SLIDE: u64 = 0x1e00_0000;
/// Kernel image: link-time 0xffffffff81000000.. maps to PA 4 MiB.. (2 MiB pages).
const KERNEL_PA: u64 = 4 << 20;
/// "Direct map": VA 0xffff888000000000.. maps PA 0.. (a 1 GiB page).
const DIRECT: u64 = 0xffff_8880_0000_0000;
const TASK_SIZE: u64 = 256;
const NSYSCALLS: usize = 16;

fn profile() -> Profile {
    let link = LINK_BASE;
    Profile {
        format: FORMAT,
        release: "6.1.0-test".into(),
        build_id: vec![0xab, 0xcd, 0xef, 0x01],
        symbols: Symbols {
            text_start: link,
            text_end: link + 0x8000,
            init_text_start: link + 0x9000,
            init_text_end: link + 0xa000,
            init_task: link + 0x10_0000,
            sys_call_table: link + 0x11_0000,
            idt_table: link + 0x12_0000,
            modules: link + 0x13_0000,
            entry_syscall_64: link + 0x100,
        },
        task: TaskLayout {
            tasks: 0,
            pid: 16,
            tgid: 20,
            comm: 24,
            mm: 40,
            state: 48,
            stack: 56,
            children: 64,
            sibling: 80,
            real_parent: 96,
            thread_group: 104,
        },
        module: ModuleLayout { list: 8, name: 24, name_len: 56, base: 80, size: 88 },
        pt_regs_size: 168,
        pt_regs_orig_ax: 120,
        thread_size: 16384,
        syscalls: (0..NSYSCALLS)
            .map(|i| Syscall {
                name: match i {
                    3 => "finit_module".into(),
                    5 => "getppid".into(),
                    _ => alloc::format!("sys{i}"),
                },
                target: link + 0x1000 + i as u64 * 0x40,
            })
            .collect(),
    }
}

struct Guest {
    mem: Vec<u8>,
    p: Profile,
    five: bool,
    next_heap: u64,
    tasks: Vec<(i32, u64)>,
}

impl Guest {
    fn new(five: bool) -> Guest {
        let mut g = Guest { mem: vec![0; MEM], p: profile(), five, next_heap: 8 << 20, tasks: vec![] };
        g.page_tables();
        g.vmcoreinfo(&[0xab, 0xcd, 0xef, 0x01]);
        // init_task: pid 0, lists empty (pointing at themselves).
        let init = g.sym(g.p.symbols.init_task);
        g.task_at(init, 0, "swapper/0", init, false, None);
        // modules head, syscall table, IDT, text.
        let m = g.sym(g.p.symbols.modules);
        g.w64(m, m);
        g.w64(m + 8, m);
        for i in 0..NSYSCALLS {
            let t = g.sym(g.p.syscalls[i].target);
            g.w64(g.sym(g.p.symbols.sys_call_table) + i as u64 * 8, t);
        }
        for v in 0..256u64 {
            g.gate(v as usize, g.sym(LINK_BASE + 0x2000 + v * 16));
        }
        for i in 0..0x8000u64 {
            let va = g.sym(LINK_BASE) + i;
            g.w(va, &[(i * 7 % 251) as u8]);
        }
        g
    }

    fn sym(&self, link: u64) -> u64 {
        link + SLIDE
    }

    fn pa(&self, va: u64) -> usize {
        if va >= LINK_BASE { (va - LINK_BASE - SLIDE + KERNEL_PA) as usize } else { (va - DIRECT) as usize }
    }

    fn w(&mut self, va: u64, b: &[u8]) {
        let pa = self.pa(va);
        self.mem[pa..pa + b.len()].copy_from_slice(b);
    }

    fn w64(&mut self, va: u64, v: u64) {
        self.w(va, &v.to_le_bytes());
    }

    fn r64(&self, va: u64) -> u64 {
        let pa = self.pa(va);
        u64::from_le_bytes(self.mem[pa..pa + 8].try_into().unwrap())
    }

    fn pte(&mut self, table: u64, index: u64, value: u64) {
        let at = (table + index * 8) as usize;
        self.mem[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn page_tables(&mut self) {
        // Tables at 64 KiB..: top (PML5 or PML4), then the rest.
        let (top, pml4, pdpt_k, pd_k, pdpt_d) = (0x10000u64, 0x11000, 0x12000, 0x13000, 0x14000);
        let kva = LINK_BASE + SLIDE;
        let pml4_of = |va: u64| (va >> 39) & 0x1ff;
        let root_pml4 = if self.five {
            self.pte(top, (kva >> 48) & 0x1ff, pml4 | 3);
            self.pte(top, (DIRECT >> 48) & 0x1ff, pml4 | 3);
            pml4
        } else {
            top
        };
        self.pte(root_pml4, pml4_of(kva), pdpt_k | 3);
        self.pte(root_pml4, pml4_of(DIRECT), pdpt_d | 3);
        self.pte(pdpt_k, (kva >> 30) & 0x1ff, pd_k | 3);
        for i in 0..4u64 {
            // 2 MiB pages: 8 MiB of kernel image.
            self.pte(pd_k, ((kva >> 21) & 0x1ff) + i, (KERNEL_PA + (i << 21)) | 0x83);
        }
        self.pte(pdpt_d, (DIRECT >> 30) & 0x1ff, 0x83); // 1 GiB page at PA 0
    }

    fn vmcoreinfo(&mut self, build_id: &[u8]) {
        let pgt_link = LINK_BASE + 0x50_0000; // init_top_pgt's link address
        // phys_base such that pgt - START_KERNEL_MAP + phys_base = 0x10000
        let phys_base = 0x10000i64 - (pgt_link + SLIDE - START_KERNEL_MAP) as i64;
        let text = alloc::format!(
            "OSRELEASE=6.1.0-test\nBUILD-ID={}\nPAGESIZE=4096\nSYMBOL(init_top_pgt)={:x}\nNUMBER(pgtable_l5_enabled)={}\nNUMBER(phys_base)={}\nKERNELOFFSET={:x}\n",
            crate::linux::hex(build_id),
            pgt_link + SLIDE,
            self.five as u8,
            phys_base,
            SLIDE
        );
        let at = 0x30_0000;
        self.mem[at..at + 4096].fill(0);
        self.mem[at..at + text.len()].copy_from_slice(text.as_bytes());
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let va = DIRECT + self.next_heap;
        self.next_heap += size.div_ceil(64) * 64;
        va
    }

    fn list_init(&mut self, head: u64) {
        self.w64(head, head);
        self.w64(head + 8, head);
    }

    fn list_add_tail(&mut self, head: u64, node: u64) {
        let last = self.r64(head + 8);
        self.w64(node, head);
        self.w64(node + 8, last);
        self.w64(last, node);
        self.w64(head + 8, node);
    }

    fn list_del(&mut self, node: u64) {
        let (next, prev) = (self.r64(node), self.r64(node + 8));
        self.w64(prev, next);
        self.w64(next + 8, prev);
        self.list_init(node);
    }

    fn task_at(&mut self, task: u64, pid: i32, comm: &str, parent: u64, user: bool, syscall: Option<u64>) {
        let t = self.p.task.clone();
        for off in [t.tasks, t.children, t.sibling, t.thread_group] {
            self.list_init(task + off as u64);
        }
        self.w(task + t.pid as u64, &pid.to_le_bytes());
        self.w(task + t.tgid as u64, &pid.to_le_bytes());
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        self.w(task + t.comm as u64, &c);
        self.w64(task + t.real_parent as u64, parent);
        self.w64(task + t.mm as u64, if user { 0xffff_8880_dead_0000 } else { 0 });
        self.w(task + t.state as u64, &1u32.to_le_bytes());
        let stack = self.alloc(16384);
        self.w64(task + t.stack as u64, stack);
        let regs = stack + 16384 - 168;
        self.w64(regs + 120, syscall.unwrap_or(u64::MAX));
    }

    fn spawn(&mut self, pid: i32, comm: &str, ppid: i32, user: bool, syscall: Option<u64>) -> u64 {
        let t = self.p.task.clone();
        let init = self.sym(self.p.symbols.init_task);
        let parent = self.tasks.iter().find(|(p, _)| *p == ppid).map(|(_, a)| *a).unwrap_or(init);
        let task = self.alloc(TASK_SIZE);
        self.task_at(task, pid, comm, parent, user, syscall);
        self.list_add_tail(init + t.tasks as u64, task + t.tasks as u64);
        self.list_add_tail(parent + t.children as u64, task + t.sibling as u64);
        self.tasks.push((pid, task));
        task
    }

    fn task(&self, pid: i32) -> u64 {
        self.tasks.iter().find(|(p, _)| *p == pid).unwrap().1
    }

    fn exit(&mut self, pid: i32) {
        let task = self.task(pid);
        let t = self.p.task.clone();
        self.list_del(task + t.tasks as u64);
        self.list_del(task + t.sibling as u64);
    }

    fn set_syscall(&mut self, pid: i32, nr: u64) {
        let task = self.task(pid);
        let stack = self.r64(task + self.p.task.stack as u64);
        self.w64(stack + 16384 - 168 + 120, nr);
    }

    fn load_module(&mut self, name: &str, size: u64) -> u64 {
        let m = self.alloc(256);
        let base = self.alloc(size);
        let mut n = [0u8; 56];
        n[..name.len()].copy_from_slice(name.as_bytes());
        self.w(m + 24, &n);
        self.w64(m + 80, base);
        self.w(m + 88, &(size as u32).to_le_bytes());
        let head = self.sym(self.p.symbols.modules);
        self.list_add_tail(head, m + 8);
        base
    }

    fn gate(&mut self, v: usize, target: u64) {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        let at = self.sym(self.p.symbols.idt_table) + v as u64 * 16;
        self.w(at, &g);
    }

    fn monitor(&self, slices: u32) -> Monitor {
        Monitor::new(self.p.clone(), Config::new(&self.p, slices, 1))
    }
}

fn booted(five: bool) -> Guest {
    let mut g = Guest::new(five);
    g.spawn(1, "init", 0, true, Some(7));
    g.spawn(2, "kthreadd", 0, false, None);
    g.spawn(10, "kworker/0:1", 2, false, None);
    g.spawn(100, "sh", 1, true, Some(0));
    g.spawn(101, "sleep", 100, true, Some(9));
    g
}

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
