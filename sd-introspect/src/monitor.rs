//! The monitor: scans on every tick, compares with what it saw before and
//! with the profile, and turns differences into [`Event`]s.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::GuestMemory;
use crate::linux::{AttachError, Kernel, Module, Process, ScanError, Snapshot};
use crate::profile::Profile;

/// Syscalls that raise an alert by default when a task is seen in one.
pub const DEFAULT_ALERTS: &[&str] = &["init_module", "finit_module", "ptrace", "kexec_load", "kexec_file_load"];
/// Consecutive scans a task must be in the tree and off the task list
/// before it is reported hidden (one scan may race a fork or an exit).
const HIDDEN_CONFIRM: u32 = 2;
const PAGE: usize = 4096;
/// The kernel's 5- and 2-byte NOPs (x86-64 `BYTES_NOP5`, `BYTES_NOP2`).
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const NOP2: [u8; 2] = [0x66, 0x90];
/// A static call's `ret` form.
const RET5: [u8; 5] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];

/// What a changed text page is.
#[derive(Debug, PartialEq, Eq)]
enum Patch {
    /// Every change is a kernel patch site: how many.
    Explained(u32),
    /// A site is mid-patch (`int3` first byte): look again next pass.
    InProgress,
    /// Not a patch the kernel makes: the first changed byte's offset.
    Unexplained(usize),
}

/// Whether `w` (5 bytes at `at`) is a form the kernel patches in: a NOP,
/// the static-call `ret`, or a jump or call into kernel text. A jump into
/// a module or the heap (an inline hook) is not.
fn patch_form5(w: &[u8], at: u64, text: &core::ops::Range<u64>) -> bool {
    if w == NOP5 || w == RET5 {
        return true;
    }
    if w[0] == 0xe8 || w[0] == 0xe9 {
        let rel = i32::from_le_bytes([w[1], w[2], w[3], w[4]]) as i64;
        return text.contains(&at.wrapping_add(5).wrapping_add(rel as u64));
    }
    false
}

/// Classifies the differences between `old` and `now` (one page at `va`).
fn classify(old: &[u8], now: &[u8], va: u64, text: &core::ops::Range<u64>) -> Patch {
    let mut sites = 0;
    let mut i = 0;
    while i < old.len() {
        if old[i] == now[i] {
            i += 1;
            continue;
        }
        // A run of changes no longer than a site, separated by equal bytes.
        let mut j = i + 1;
        while j < old.len() && j - i < 5 && old[j] != now[j] {
            j += 1;
        }
        let explained = [5usize, 2].iter().find_map(|&len| {
            (j.saturating_sub(len)..=i).filter(|s| s + len <= old.len()).find_map(|s| {
                let (o, n) = (&old[s..s + len], &now[s..s + len]);
                let at = va + s as u64;
                let ok = |w: &[u8]| match len {
                    5 => patch_form5(w, at, text),
                    _ => w == NOP2 || w[0] == 0xeb,
                };
                if n[0] == 0xcc && ok(o) {
                    Some(None)
                } else if ok(o) && ok(n) {
                    Some(Some(s + len))
                } else {
                    None
                }
            })
        });
        match explained {
            Some(None) => return Patch::InProgress,
            Some(Some(end)) => {
                sites += 1;
                i = end.max(j);
            }
            None => return Patch::Unexplained(i),
        }
    }
    Patch::Explained(sites)
}

/// What left `known` and what arrived in `now` (items keyed by `key`);
/// `known` becomes `now`.
fn turnover<T: Clone>(known: &mut BTreeMap<u64, T>, now: &[T], key: impl Fn(&T) -> u64) -> (Vec<T>, Vec<T>) {
    let mut next: BTreeMap<u64, T> = now.iter().map(|x| (key(x), x.clone())).collect();
    let gone = known.iter().filter(|(k, _)| !next.contains_key(k)).map(|(_, x)| x.clone()).collect();
    let new = now.iter().filter(|x| !known.contains_key(&key(x))).cloned().collect();
    core::mem::swap(known, &mut next);
    (gone, new)
}

/// Consecutive inconsistent scans before one is reported.
const INCONSISTENT_REPORT: u32 = 3;

/// Where an address points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// Kernel text, at this offset from `_stext` (the host names the
    /// symbol from System.map).
    KernelText { offset: u64 },
    /// Boot-only kernel text (freed after boot), at this offset from
    /// `_sinittext`.
    InitText { offset: u64 },
    /// A loaded module's core text.
    Module { name: String, offset: u64 },
    /// Neither: heap, user memory, garbage.
    Unknown,
}

/// One task's syscall in a sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSyscall {
    pub pid: i32,
    pub comm: String,
    pub nr: u16,
    /// Runnable (the syscall is the last it entered) rather than asleep in it.
    pub running: bool,
}

/// What the monitor reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Attached to the client kernel.
    Attached {
        release: String,
        slide: u64,
        five_level: bool,
        processes: u32,
        modules: u32,
    },
    /// The profile does not fit the running kernel (or it cannot be read).
    AttachFailed {
        reason: String,
    },
    ProcessStart {
        process: Process,
    },
    ProcessExit {
        pid: i32,
        comm: String,
    },
    /// A task in the process tree that the task list does not show.
    HiddenProcess {
        pid: i32,
        comm: String,
        task: u64,
    },
    /// A `sys_call_table` entry differs from the profile.
    SyscallHook {
        nr: u16,
        name: String,
        expected: u64,
        found: u64,
        owner: Owner,
    },
    /// A hooked entry holds its original value again.
    SyscallRestored {
        nr: u16,
        name: String,
    },
    /// An IDT gate points outside kernel text or changed since attach.
    IdtHook {
        vector: u8,
        found: u64,
        baseline: Option<u64>,
        owner: Owner,
    },
    /// Kernel text changed since attach in a way the kernel's own
    /// patching (jump labels, static calls, ftrace) does not explain: the
    /// first changed byte and its offset from `_stext`.
    TextChanged {
        at: u64,
        offset: u64,
    },
    /// Kernel text the kernel patched itself (jump labels, static calls,
    /// ftrace: 2- or 5-byte NOPs, jumps and calls into kernel text).
    TextPatched {
        page: u64,
        sites: u32,
    },
    ModuleLoaded {
        module: Module,
    },
    ModuleUnloaded {
        name: String,
    },
    /// A task is in a syscall an alert rule names.
    SyscallAlert {
        pid: i32,
        comm: String,
        nr: u16,
        name: String,
    },
    /// Every `summary_every` scans: the sampled syscalls per number, and
    /// the latest sample of user tasks.
    Syscalls {
        samples: u32,
        counts: Vec<(u16, u32)>,
        tasks: Vec<TaskSyscall>,
        scan_us_max: u64,
    },
    /// Several scans in a row could not be read consistently.
    Inconsistent {
        reason: String,
        streak: u32,
    },
    /// Reply to an on-demand snapshot request.
    Snapshot {
        processes: Vec<Process>,
        modules: Vec<Module>,
    },
}

/// How the monitor scans.
#[derive(Clone, Debug)]
pub struct Config {
    /// Scans per full pass over kernel text (1: all of it every scan).
    pub text_slices: u32,
    /// Scans between two [`Event::Syscalls`] summaries (0: none).
    pub summary_every: u32,
    /// Syscall numbers that raise [`Event::SyscallAlert`].
    pub alerts: Vec<u16>,
}

impl Config {
    /// Text in `text_slices` slices, a summary every `summary_every`
    /// scans, the [`DEFAULT_ALERTS`].
    pub fn new(profile: &Profile, text_slices: u32, summary_every: u32) -> Config {
        let alerts = DEFAULT_ALERTS.iter().filter_map(|n| profile.syscall_nr(n)).collect();
        Config { text_slices: text_slices.max(1), summary_every, alerts }
    }
}

/// The monitor's memory between scans.
pub struct Monitor {
    pub profile: Profile,
    config: Config,
    kernel: Option<Kernel>,
    processes: BTreeMap<u64, Process>,
    modules: BTreeMap<u64, Module>,
    hidden: BTreeMap<u64, u32>,
    hooks: BTreeMap<u16, u64>,
    idt_base: Vec<Option<u64>>,
    idt_reported: BTreeMap<u8, u64>,
    /// XXH3 of each text page as of `text_copy`.
    text_base: Vec<u64>,
    /// The text as of attach (updated with every explained patch).
    text_copy: Vec<u8>,
    text_next: usize,
    counts: BTreeMap<u16, u32>,
    samples: u32,
    alerted: BTreeSet<(u64, u16)>,
    streak: u32,
    scan_us_max: u64,
}

impl Monitor {
    pub fn new(profile: Profile, config: Config) -> Monitor {
        Monitor {
            profile,
            config,
            kernel: None,
            processes: BTreeMap::new(),
            modules: BTreeMap::new(),
            hidden: BTreeMap::new(),
            hooks: BTreeMap::new(),
            idt_base: Vec::new(),
            idt_reported: BTreeMap::new(),
            text_base: Vec::new(),
            text_copy: Vec::new(),
            text_next: 0,
            counts: BTreeMap::new(),
            samples: 0,
            alerted: BTreeSet::new(),
            streak: 0,
            scan_us_max: 0,
        }
    }

    pub fn attached(&self) -> bool {
        self.kernel.is_some()
    }

    /// The kernel, once attached.
    pub fn kernel(&self) -> Option<&Kernel> {
        self.kernel.as_ref()
    }

    /// Records how long the image's last scan took (for the summary).
    pub fn note_scan_micros(&mut self, us: u64) {
        self.scan_us_max = self.scan_us_max.max(us);
    }

    /// Tries to attach (called until it works). `Err(NoVmcoreInfo)` and
    /// `Err(Busy)` mean try again later; other errors are final for this
    /// profile.
    pub fn attach(&mut self, mem: &dyn GuestMemory) -> Result<Vec<Event>, AttachError> {
        let mut k = Kernel::attach(&self.profile, mem)?;
        let pages = k.text_pages(&self.profile);
        // The baseline: everything the first consistent scan sees.
        let snap = k.scan(&self.profile, mem, 0..0).map_err(|ScanError::Inconsistent(why)| AttachError::Busy(why))?;
        let text = k.sym(self.profile.symbols.text_start & !0xfff);
        let mut copy = alloc::vec![0u8; pages * PAGE];
        k.read(mem, text, &mut copy).map_err(AttachError::Unreadable)?;
        let mut events = alloc::vec![Event::Attached {
            release: k.info.release.clone(),
            slide: k.info.slide,
            five_level: k.info.five_level,
            processes: snap.processes.len() as u32,
            modules: snap.modules.len() as u32,
        }];
        self.kernel = Some(k);
        turnover(&mut self.processes, &snap.processes, |p| p.task);
        turnover(&mut self.modules, &snap.modules, |m| m.base);
        self.text_base = copy.chunks(PAGE).map(xxhash_rust::xxh3::xxh3_64).collect();
        self.text_copy = copy;
        self.idt_base = snap.idt.clone();
        // The profile, not the baseline, says what the syscall table and
        // the IDT must hold: a client hooked before the monitor attached
        // is still caught.
        self.check_tables(&snap, &mut events);
        Ok(events)
    }

    /// One periodic scan; what changed since the last one.
    pub fn scan(&mut self, mem: &dyn GuestMemory) -> Vec<Event> {
        let Some(k) = self.kernel.as_mut() else { return Vec::new() };
        let pages = self.text_base.len();
        let slice = pages.div_ceil(self.config.text_slices as usize).max(1);
        let range = self.text_next..(self.text_next + slice).min(pages);
        let snap = match k.scan(&self.profile, mem, range.clone()) {
            Ok(s) => s,
            Err(ScanError::Inconsistent(reason)) => {
                self.streak += 1;
                return match self.streak == INCONSISTENT_REPORT {
                    true => alloc::vec![Event::Inconsistent { reason, streak: self.streak }],
                    false => Vec::new(),
                };
            }
        };
        self.streak = 0;
        self.text_next = if range.end >= pages { 0 } else { range.end };
        let mut events = Vec::new();
        self.diff_processes(&snap, &mut events);
        self.diff_modules(&snap, &mut events);
        self.check_hidden(&snap, &mut events);
        self.check_tables(&snap, &mut events);
        self.check_text(mem, &snap, &mut events);
        self.sample(&snap, &mut events);
        events
    }

    /// The current processes and modules, for an on-demand request.
    pub fn snapshot(&mut self, mem: &dyn GuestMemory) -> Result<Event, ScanError> {
        let Some(k) = self.kernel.as_mut() else {
            return Err(ScanError::Inconsistent("not attached to the client kernel yet".into()));
        };
        let mut last = None;
        for _ in 0..5 {
            k.flush();
            let r = k.processes(&self.profile, mem).and_then(|p| Ok((p, k.modules(&self.profile, mem)?)));
            match r {
                Ok((processes, modules)) => return Ok(Event::Snapshot { processes, modules }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("five attempts"))
    }

    fn diff_processes(&mut self, snap: &Snapshot, events: &mut Vec<Event>) {
        let (gone, new) = turnover(&mut self.processes, &snap.processes, |p| p.task);
        events.extend(gone.into_iter().map(|p| Event::ProcessExit { pid: p.pid, comm: p.comm }));
        events.extend(new.into_iter().map(|process| Event::ProcessStart { process }));
    }

    fn diff_modules(&mut self, snap: &Snapshot, events: &mut Vec<Event>) {
        let (gone, new) = turnover(&mut self.modules, &snap.modules, |m| m.base);
        events.extend(gone.into_iter().map(|m| Event::ModuleUnloaded { name: m.name }));
        events.extend(new.into_iter().map(|module| Event::ModuleLoaded { module }));
    }

    fn check_hidden(&mut self, snap: &Snapshot, events: &mut Vec<Event>) {
        let mut next = BTreeMap::new();
        for t in &snap.tree_only {
            let n = self.hidden.get(&t.task).copied().unwrap_or(0) + 1;
            if n == HIDDEN_CONFIRM {
                events.push(Event::HiddenProcess { pid: t.pid, comm: t.comm.clone(), task: t.task });
            }
            next.insert(t.task, n);
        }
        self.hidden = next;
    }

    /// Where `addr` points: kernel text, a module, or neither.
    pub fn owner(&self, addr: u64, modules: &[Module]) -> Owner {
        let Some(k) = self.kernel.as_ref() else { return Owner::Unknown };
        let s = &self.profile.symbols;
        let (start, end) = (k.sym(s.text_start), k.sym(s.text_end));
        if (start..end).contains(&addr) {
            return Owner::KernelText { offset: addr - start };
        }
        let init = k.sym(s.init_text_start)..k.sym(s.init_text_end);
        if init.contains(&addr) {
            return Owner::InitText { offset: addr - init.start };
        }
        match modules.iter().find(|m| addr >= m.base && addr - m.base < m.size) {
            Some(m) => Owner::Module { name: m.name.clone(), offset: addr - m.base },
            None => Owner::Unknown,
        }
    }

    fn check_tables(&mut self, snap: &Snapshot, events: &mut Vec<Event>) {
        let Some(k) = self.kernel.as_ref() else { return };
        for (nr, (&found, sc)) in snap.syscall_table.iter().zip(&self.profile.syscalls).enumerate() {
            let (nr, want) = (nr as u16, k.sym(sc.target));
            if found != want {
                if self.hooks.get(&nr) != Some(&found) {
                    let owner = self.owner(found, &snap.modules);
                    events.push(Event::SyscallHook { nr, name: sc.name.clone(), expected: want, found, owner });
                    self.hooks.insert(nr, found);
                }
            } else if self.hooks.remove(&nr).is_some() {
                events.push(Event::SyscallRestored { nr, name: sc.name.clone() });
            }
        }
        let sy = &self.profile.symbols;
        let text = k.sym(sy.text_start)..k.sym(sy.text_end);
        let init = k.sym(sy.init_text_start)..k.sym(sy.init_text_end);
        for (v, found) in snap.idt.iter().enumerate() {
            let Some(found) = *found else { continue };
            let baseline = self.idt_base.get(v).copied().flatten();
            // Unused exception gates keep their boot-time handlers in init
            // text: benign as found at attach, not as a change.
            let benign = text.contains(&found) || (init.contains(&found) && baseline == Some(found));
            let outside = !benign;
            let changed = baseline.is_some_and(|b| b != found);
            if (outside || changed) && self.idt_reported.get(&(v as u8)) != Some(&found) {
                let owner = self.owner(found, &snap.modules);
                events.push(Event::IdtHook { vector: v as u8, found, baseline, owner });
                self.idt_reported.insert(v as u8, found);
            }
        }
    }

    fn check_text(&mut self, mem: &dyn GuestMemory, snap: &Snapshot, events: &mut Vec<Event>) {
        let Some(k) = self.kernel.as_mut() else { return };
        let base = k.sym(self.profile.symbols.text_start & !0xfff);
        let stext = k.sym(self.profile.symbols.text_start);
        let (first, hashes) = &snap.text;
        let text = k.sym(self.profile.symbols.text_start)..k.sym(self.profile.symbols.text_end);
        for (i, h) in hashes.iter().enumerate() {
            let idx = first + i;
            if self.text_base.get(idx).is_none_or(|b| b == h) {
                continue;
            }
            let page = base + idx as u64 * PAGE as u64;
            let mut now = alloc::vec![0u8; PAGE];
            if k.read(mem, page, &mut now).is_err() {
                continue; // unreadable now: the next pass looks again
            }
            let old = &self.text_copy[idx * PAGE..(idx + 1) * PAGE];
            match classify(old, &now, page, &text) {
                Patch::InProgress => continue,
                Patch::Explained(sites) => events.push(Event::TextPatched { page, sites }),
                Patch::Unexplained(at) => {
                    let va = page + at as u64;
                    events.push(Event::TextChanged { at: va, offset: va.saturating_sub(stext) });
                }
            }
            // Either way this is the new normal: a further change is news.
            self.text_copy[idx * PAGE..(idx + 1) * PAGE].copy_from_slice(&now);
            self.text_base[idx] = xxhash_rust::xxh3::xxh3_64(&now);
        }
    }

    fn sample(&mut self, snap: &Snapshot, events: &mut Vec<Event>) {
        let mut in_alert = BTreeSet::new();
        for p in &snap.processes {
            let Some(nr) = p.syscall else { continue };
            *self.counts.entry(nr).or_default() += 1;
            if self.config.alerts.contains(&nr) {
                in_alert.insert((p.task, nr));
                if !self.alerted.contains(&(p.task, nr)) {
                    let name = self.profile.syscall_name(nr as u64).into();
                    events.push(Event::SyscallAlert { pid: p.pid, comm: p.comm.clone(), nr, name });
                }
            }
        }
        self.alerted = in_alert;
        self.samples += 1;
        if self.config.summary_every > 0 && self.samples >= self.config.summary_every {
            let tasks = snap
                .processes
                .iter()
                .filter_map(|p| {
                    Some(TaskSyscall { pid: p.pid, comm: p.comm.clone(), nr: p.syscall?, running: p.state == 0 })
                })
                .collect();
            events.push(Event::Syscalls {
                samples: self.samples,
                counts: core::mem::take(&mut self.counts).into_iter().collect(),
                tasks,
                scan_us_max: core::mem::take(&mut self.scan_us_max),
            });
            self.samples = 0;
        }
    }
}

impl Event {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an event always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Option<Event> {
        postcard::from_bytes(bytes).ok()
    }
}
