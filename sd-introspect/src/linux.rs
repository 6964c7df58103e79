//! Reading a Linux kernel's state out of its guest-physical memory, given
//! its [`Profile`]: the kernel's address space (KASLR slide from
//! VMCOREINFO, page tables from `init_top_pgt`), the task list, the
//! process tree, modules, the syscall table, the IDT and the text.
//!
//! Guest memory is attacker-controlled and changes while it is read.
//! Every list walk is bounded, checks each node's back link, and stops at
//! the first address that does not translate: the result is then
//! [`ScanError::Inconsistent`], never a guess.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::GuestMemory;
use crate::paging::{AddressSpace, Fault};
use crate::profile::{Profile, START_KERNEL_MAP};
use crate::vmcoreinfo::VmcoreInfo;

/// At most this many tasks (processes, threads of one process, children of
/// one task) are walked; a longer list is reported inconsistent.
pub const MAX_TASKS: usize = 32768;
/// At most this many modules.
pub const MAX_MODULES: usize = 4096;
/// Entries of the IDT.
pub const IDT_ENTRIES: usize = 256;
const PAGE: u64 = 4096;
/// Direct-mapped translation cache entries (per scan).
const TLB: usize = 256;

/// Why a scan has no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// The guest changed what was being read, or its memory is garbage:
    /// what and where.
    Inconsistent(String),
}

impl core::fmt::Display for ScanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ScanError::Inconsistent(what) => write!(f, "inconsistent read: {what}"),
        }
    }
}

fn inconsistent(what: &str, fault: Fault) -> ScanError {
    ScanError::Inconsistent(alloc::format!("{what}: {fault}"))
}

/// Why the monitor could not attach to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// No VMCOREINFO page in memory (yet): the kernel is still booting, or
    /// it is not Linux with `CONFIG_CRASH_CORE`.
    NoVmcoreInfo,
    /// The running kernel is another build than the profile's.
    WrongBuild { profile: String, running: String },
    /// VMCOREINFO was found but its page tables do not translate.
    Unreadable(Fault),
    /// The first scan was inconsistent (the kernel is busy booting): try
    /// again.
    Busy(String),
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AttachError::NoVmcoreInfo => write!(
                f,
                "no VMCOREINFO in guest memory (the client kernel has not booted far enough, or is not a Linux kernel with CONFIG_CRASH_CORE)"
            ),
            AttachError::WrongBuild { profile, running } => write!(
                f,
                "the profile is for kernel build {profile} but the client runs {running}: build a profile for the client's kernel with `ssc profile build`"
            ),
            AttachError::Unreadable(fault) => write!(f, "the kernel's page tables do not translate: {fault}"),
            AttachError::Busy(why) => write!(f, "the kernel changed under the first scan ({why}); trying again"),
        }
    }
}

/// One process (a thread-group leader on the task list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: i32,
    pub tgid: i32,
    pub ppid: i32,
    pub comm: String,
    /// No user address space (`mm == NULL`).
    pub kernel_thread: bool,
    /// `__state`: 0 running or runnable.
    pub state: u32,
    /// Threads in its group, itself included.
    pub threads: u32,
    /// The syscall number in the user registers at the top of its kernel
    /// stack (`orig_ax`): the syscall it is in when it sleeps, the last
    /// one it entered when it runs. `None` for kernel threads, for an
    /// interrupt frame, or when the stack could not be read.
    pub syscall: Option<u16>,
    /// Run-time address of its `task_struct`.
    pub task: u64,
}

/// A loaded module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub name: String,
    pub base: u64,
    pub size: u64,
}

/// A task found in the process tree but not on the task list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeOnly {
    pub pid: i32,
    pub comm: String,
    pub task: u64,
}

/// One scan's view of the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub processes: Vec<Process>,
    pub tree_only: Vec<TreeOnly>,
    pub modules: Vec<Module>,
    /// Run-time contents of `sys_call_table`.
    pub syscall_table: Vec<u64>,
    /// Target of each present IDT gate (`None`: not present).
    pub idt: Vec<Option<u64>>,
    /// XXH3 of the text pages hashed this scan: first page index, hashes.
    pub text: (usize, Vec<u64>),
}

/// The kernel of one client, attached.
pub struct Kernel {
    pub info: VmcoreInfo,
    space: AddressSpace,
    tlb: Vec<(u64, u64)>,
}

impl Kernel {
    /// Finds VMCOREINFO, checks the build against `profile` and sets up
    /// the kernel's address space.
    pub fn attach(profile: &Profile, mem: &dyn GuestMemory) -> Result<Kernel, AttachError> {
        let info = crate::vmcoreinfo::find(mem).ok_or(AttachError::NoVmcoreInfo)?;
        Kernel::with_info(profile, mem, info)
    }

    /// As [`Kernel::attach`], with VMCOREINFO already found.
    pub fn with_info(profile: &Profile, mem: &dyn GuestMemory, info: VmcoreInfo) -> Result<Kernel, AttachError> {
        if info.build_id != profile.build_id {
            return Err(AttachError::WrongBuild {
                profile: alloc::format!("{} (build id {})", profile.release, hex(&profile.build_id)),
                running: alloc::format!("{} (build id {})", info.release, hex(&info.build_id)),
            });
        }
        let root = info.init_top_pgt.wrapping_sub(START_KERNEL_MAP).wrapping_add(info.phys_base);
        let space = AddressSpace { root, five_level: info.five_level };
        let mut k = Kernel { info, space, tlb: alloc::vec![(u64::MAX, 0); TLB] };
        // The page tables must at least map the kernel's own text.
        let text = k.sym(profile.symbols.text_start);
        k.translate(mem, text).map_err(AttachError::Unreadable)?;
        Ok(k)
    }

    /// The run-time address of a link-time address.
    pub fn sym(&self, link: u64) -> u64 {
        link.wrapping_add(self.info.slide)
    }

    /// Forgets cached translations (the start of every scan).
    pub fn flush(&mut self) {
        self.tlb.iter_mut().for_each(|e| e.0 = u64::MAX);
    }

    pub fn translate(&mut self, mem: &dyn GuestMemory, va: u64) -> Result<u64, Fault> {
        let page = va & !(PAGE - 1);
        let slot = ((page >> 12) as usize) % TLB;
        if self.tlb[slot].0 == page {
            return Ok(self.tlb[slot].1 | (va & (PAGE - 1)));
        }
        let pa = self.space.translate(mem, page)?;
        self.tlb[slot] = (page, pa);
        Ok(pa | (va & (PAGE - 1)))
    }

    /// Reads kernel-virtual bytes (across pages).
    pub fn read(&mut self, mem: &dyn GuestMemory, va: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let n = ((PAGE - (at & (PAGE - 1))) as usize).min(buf.len() - done);
            let pa = self.translate(mem, at)?;
            mem.read(pa, &mut buf[done..done + n]).map_err(|_| Fault::OutsideRam(pa))?;
            done += n;
        }
        Ok(())
    }

    pub fn u64(&mut self, mem: &dyn GuestMemory, va: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(mem, va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&mut self, mem: &dyn GuestMemory, va: u64) -> Result<u32, Fault> {
        let mut b = [0u8; 4];
        self.read(mem, va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes, non-printable bytes
    /// as `?`.
    pub fn cstr(&mut self, mem: &dyn GuestMemory, va: u64, max: usize) -> Result<String, Fault> {
        let mut b = alloc::vec![0u8; max];
        self.read(mem, va, &mut b)?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(max);
        Ok(b[..end].iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' }).collect())
    }

    /// The nodes of a circular `list_head` list (the addresses of the
    /// `list_head`s, head excluded). Bounded, and every node's `prev` must
    /// point back: a list changing under the walk is inconsistent.
    pub fn list(&mut self, mem: &dyn GuestMemory, head: u64, limit: usize, what: &str) -> Result<Vec<u64>, ScanError> {
        let mut nodes = Vec::new();
        let mut prev = head;
        let mut cur = self.u64(mem, head).map_err(|f| inconsistent(what, f))?;
        while cur != head {
            if nodes.len() >= limit {
                return Err(ScanError::Inconsistent(alloc::format!("{what}: more than {limit} entries (a cycle?)")));
            }
            let back = self.u64(mem, cur.wrapping_add(8)).map_err(|f| inconsistent(what, f))?;
            if back != prev {
                return Err(ScanError::Inconsistent(alloc::format!(
                    "{what}: entry {cur:#x} does not link back to {prev:#x} (changed under the scan)"
                )));
            }
            nodes.push(cur);
            prev = cur;
            cur = self.u64(mem, cur).map_err(|f| inconsistent(what, f))?;
        }
        Ok(nodes)
    }

    /// A whole scan; `text`: which text pages to hash (`start..end` page
    /// indexes from `_stext`, clamped).
    pub fn scan(
        &mut self,
        profile: &Profile,
        mem: &dyn GuestMemory,
        text: core::ops::Range<usize>,
    ) -> Result<Snapshot, ScanError> {
        self.flush();
        let processes = self.processes(profile, mem)?;
        let listed: BTreeSet<u64> = processes.iter().map(|p| p.task).collect();
        let tree_only = self.tree(profile, mem)?.into_iter().filter(|t| !listed.contains(&t.task)).collect();
        let modules = self.modules(profile, mem)?;
        let syscall_table = self.syscall_table(profile, mem)?;
        let idt = self.idt(profile, mem)?;
        let text = self.text_hashes(profile, mem, text)?;
        Ok(Snapshot { processes, tree_only, modules, syscall_table, idt, text })
    }

    /// The task list from `init_task` (the swapper itself excluded).
    pub fn processes(&mut self, profile: &Profile, mem: &dyn GuestMemory) -> Result<Vec<Process>, ScanError> {
        let t = &profile.task;
        let head = self.sym(profile.symbols.init_task) + t.tasks as u64;
        let nodes = self.list(mem, head, MAX_TASKS, "task list")?;
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let task = node.wrapping_sub(t.tasks as u64);
            out.push(self.process(profile, mem, task)?);
        }
        Ok(out)
    }

    fn process(&mut self, profile: &Profile, mem: &dyn GuestMemory, task: u64) -> Result<Process, ScanError> {
        let t = &profile.task;
        let f = |e| inconsistent("task_struct", e);
        let pid = self.u32(mem, task + t.pid as u64).map_err(f)? as i32;
        let tgid = self.u32(mem, task + t.tgid as u64).map_err(f)? as i32;
        let comm = self.cstr(mem, task + t.comm as u64, 16).map_err(f)?;
        let mm = self.u64(mem, task + t.mm as u64).map_err(f)?;
        let state = self.u32(mem, task + t.state as u64).map_err(f)?;
        let parent = self.u64(mem, task + t.real_parent as u64).map_err(f)?;
        let ppid = self.u32(mem, parent + t.pid as u64).map_err(|e| inconsistent("parent task", e))? as i32;
        let threads = 1 + self.list(mem, task + t.thread_group as u64, MAX_TASKS, "thread group")?.len() as u32;
        // The user registers: a stack being freed (an exiting task) is
        // just no sample, not an inconsistent scan.
        let syscall = match mm {
            0 => None,
            _ => self.orig_ax(profile, mem, task).ok().flatten(),
        };
        Ok(Process { pid, tgid, ppid, comm, kernel_thread: mm == 0, state, threads, syscall, task })
    }

    fn orig_ax(&mut self, profile: &Profile, mem: &dyn GuestMemory, task: u64) -> Result<Option<u16>, Fault> {
        let stack = self.u64(mem, task + profile.task.stack as u64)?;
        let regs = stack.wrapping_add(profile.thread_size as u64).wrapping_sub(profile.pt_regs_size as u64);
        let nr = self.u64(mem, regs + profile.pt_regs_orig_ax as u64)?;
        Ok((nr < profile.syscalls.len() as u64).then_some(nr as u16))
    }

    /// Every task reachable from `init_task` through `children`/`sibling`
    /// (thread-group leaders, as the task list; a different structure that
    /// a rootkit unlinking a task from the task list leaves alone).
    pub fn tree(&mut self, profile: &Profile, mem: &dyn GuestMemory) -> Result<Vec<TreeOnly>, ScanError> {
        let t = &profile.task;
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut todo = alloc::vec![self.sym(profile.symbols.init_task)];
        while let Some(task) = todo.pop() {
            let children = self.list(mem, task + t.children as u64, MAX_TASKS, "children list")?;
            for node in children {
                let child = node.wrapping_sub(t.sibling as u64);
                if !seen.insert(child) {
                    return Err(ScanError::Inconsistent(alloc::format!(
                        "task {child:#x} appears twice in the process tree"
                    )));
                }
                if seen.len() > MAX_TASKS {
                    return Err(ScanError::Inconsistent(alloc::format!("process tree larger than {MAX_TASKS}")));
                }
                let f = |e| inconsistent("task_struct (tree)", e);
                let pid = self.u32(mem, child + t.pid as u64).map_err(f)? as i32;
                let comm = self.cstr(mem, child + t.comm as u64, 16).map_err(f)?;
                out.push(TreeOnly { pid, comm, task: child });
                todo.push(child);
            }
        }
        Ok(out)
    }

    pub fn modules(&mut self, profile: &Profile, mem: &dyn GuestMemory) -> Result<Vec<Module>, ScanError> {
        let m = &profile.module;
        let nodes = self.list(mem, self.sym(profile.symbols.modules), MAX_MODULES, "module list")?;
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let module = node.wrapping_sub(m.list as u64);
            let f = |e| inconsistent("struct module", e);
            let name = self.cstr(mem, module + m.name as u64, m.name_len as usize).map_err(f)?;
            let base = self.u64(mem, module + m.base as u64).map_err(f)?;
            let size = self.u32(mem, module + m.size as u64).map_err(f)? as u64;
            out.push(Module { name, base, size });
        }
        Ok(out)
    }

    pub fn syscall_table(&mut self, profile: &Profile, mem: &dyn GuestMemory) -> Result<Vec<u64>, ScanError> {
        let mut raw = alloc::vec![0u8; profile.syscalls.len() * 8];
        self.read(mem, self.sym(profile.symbols.sys_call_table), &mut raw)
            .map_err(|e| inconsistent("sys_call_table", e))?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }

    pub fn idt(&mut self, profile: &Profile, mem: &dyn GuestMemory) -> Result<Vec<Option<u64>>, ScanError> {
        let mut raw = alloc::vec![0u8; IDT_ENTRIES * 16];
        self.read(mem, self.sym(profile.symbols.idt_table), &mut raw).map_err(|e| inconsistent("idt_table", e))?;
        Ok(raw
            .chunks_exact(16)
            .map(|g| {
                let present = g[5] & 0x80 != 0;
                let target = u16::from_le_bytes([g[0], g[1]]) as u64
                    | (u16::from_le_bytes([g[6], g[7]]) as u64) << 16
                    | (u32::from_le_bytes([g[8], g[9], g[10], g[11]]) as u64) << 32;
                present.then_some(target)
            })
            .collect())
    }

    /// Pages of kernel text (from `_stext`, rounded down to a page).
    pub fn text_pages(&self, profile: &Profile) -> usize {
        let s = &profile.symbols;
        let start = s.text_start & !(PAGE - 1);
        (s.text_end - start).div_ceil(PAGE) as usize
    }

    fn text_hashes(
        &mut self,
        profile: &Profile,
        mem: &dyn GuestMemory,
        pages: core::ops::Range<usize>,
    ) -> Result<(usize, Vec<u64>), ScanError> {
        let total = self.text_pages(profile);
        let (start, end) = (pages.start.min(total), pages.end.min(total));
        let base = self.sym(profile.symbols.text_start & !(PAGE - 1));
        let mut page = alloc::vec![0u8; PAGE as usize];
        let mut out = Vec::with_capacity(end - start);
        for i in start..end {
            self.read(mem, base + i as u64 * PAGE, &mut page).map_err(|e| inconsistent("kernel text", e))?;
            out.push(xxhash_rust::xxh3::xxh3_64(&page));
        }
        Ok((start, out))
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| alloc::format!("{x:02x}")).collect()
}
