//! A fake Linux guest built in a buffer: page tables (4- or 5-level),
//! VMCOREINFO, `init_task` and a task list and tree, modules, a syscall
//! table, an IDT and text, all where a [`Profile`] says they are. For the
//! tests and the `guest_memory` fuzz target (feature `fake-guest`); not
//! part of the image.

use alloc::vec;
use alloc::vec::Vec;

use crate::profile::*;
use crate::{Config, Monitor};

pub const MEM: usize = 16 << 20;
pub const SLIDE: u64 = 0x1e00_0000;
/// Kernel image: link-time 0xffffffff81000000.. maps to PA 4 MiB.. (2 MiB pages).
pub const KERNEL_PA: u64 = 4 << 20;
/// "Direct map": VA 0xffff888000000000.. maps PA 0.. (a 1 GiB page).
pub const DIRECT: u64 = 0xffff_8880_0000_0000;
pub const TASK_SIZE: u64 = 256;
pub const NSYSCALLS: usize = 16;

pub fn profile() -> Profile {
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

pub struct Guest {
    pub mem: Vec<u8>,
    pub p: Profile,
    pub five: bool,
    pub next_heap: u64,
    pub tasks: Vec<(i32, u64)>,
}

impl Guest {
    pub fn new(five: bool) -> Guest {
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

    pub fn sym(&self, link: u64) -> u64 {
        link + SLIDE
    }

    pub fn pa(&self, va: u64) -> usize {
        if va >= LINK_BASE { (va - LINK_BASE - SLIDE + KERNEL_PA) as usize } else { (va - DIRECT) as usize }
    }

    pub fn w(&mut self, va: u64, b: &[u8]) {
        let pa = self.pa(va);
        self.mem[pa..pa + b.len()].copy_from_slice(b);
    }

    pub fn w64(&mut self, va: u64, v: u64) {
        self.w(va, &v.to_le_bytes());
    }

    pub fn r64(&self, va: u64) -> u64 {
        let pa = self.pa(va);
        u64::from_le_bytes(self.mem[pa..pa + 8].try_into().unwrap())
    }

    pub fn pte(&mut self, table: u64, index: u64, value: u64) {
        let at = (table + index * 8) as usize;
        self.mem[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    pub fn page_tables(&mut self) {
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

    pub fn vmcoreinfo(&mut self, build_id: &[u8]) {
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

    pub fn alloc(&mut self, size: u64) -> u64 {
        let va = DIRECT + self.next_heap;
        self.next_heap += size.div_ceil(64) * 64;
        va
    }

    pub fn list_init(&mut self, head: u64) {
        self.w64(head, head);
        self.w64(head + 8, head);
    }

    pub fn list_add_tail(&mut self, head: u64, node: u64) {
        let last = self.r64(head + 8);
        self.w64(node, head);
        self.w64(node + 8, last);
        self.w64(last, node);
        self.w64(head + 8, node);
    }

    pub fn list_del(&mut self, node: u64) {
        let (next, prev) = (self.r64(node), self.r64(node + 8));
        self.w64(prev, next);
        self.w64(next + 8, prev);
        self.list_init(node);
    }

    pub fn task_at(&mut self, task: u64, pid: i32, comm: &str, parent: u64, user: bool, syscall: Option<u64>) {
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

    pub fn spawn(&mut self, pid: i32, comm: &str, ppid: i32, user: bool, syscall: Option<u64>) -> u64 {
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

    pub fn task(&self, pid: i32) -> u64 {
        self.tasks.iter().find(|(p, _)| *p == pid).unwrap().1
    }

    pub fn exit(&mut self, pid: i32) {
        let task = self.task(pid);
        let t = self.p.task.clone();
        self.list_del(task + t.tasks as u64);
        self.list_del(task + t.sibling as u64);
    }

    pub fn set_syscall(&mut self, pid: i32, nr: u64) {
        let task = self.task(pid);
        let stack = self.r64(task + self.p.task.stack as u64);
        self.w64(stack + 16384 - 168 + 120, nr);
    }

    pub fn load_module(&mut self, name: &str, size: u64) -> u64 {
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

    pub fn gate(&mut self, v: usize, target: u64) {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        let at = self.sym(self.p.symbols.idt_table) + v as u64 * 16;
        self.w(at, &g);
    }

    pub fn monitor(&self, slices: u32) -> Monitor {
        Monitor::new(self.p.clone(), Config::new(&self.p, slices, 1))
    }
}

pub fn booted(five: bool) -> Guest {
    let mut g = Guest::new(five);
    g.spawn(1, "init", 0, true, Some(7));
    g.spawn(2, "kthreadd", 0, false, None);
    g.spawn(10, "kworker/0:1", 2, false, None);
    g.spawn(100, "sh", 1, true, Some(0));
    g.spawn(101, "sleep", 100, true, Some(9));
    g
}
