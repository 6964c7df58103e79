//! The syscall and kernel-integrity monitor on a running chain: the
//! `[introspect]` section of a chain file, the introspection SD beside the
//! client, and what `ssc monitor` reads from `ssc up`.
//!
//! ```toml
//! [introspect]
//! # profile = "build/client/profile.ssc"   # `ssc profile build` (default)
//! # system_map = "build/client/System.map" # names kernel addresses (default if present)
//! # period_ms = 100                        # 10 Hz (10 ms to 60 s)
//! # text_slices = 10                       # kernel text hashed over 10 scans
//! ```
//!
//! The SD gets a read-only window on the client's memory and the profile;
//! it reports what changes as [`Event`]s, which `ssc up` names (kernel
//! addresses through System.map), logs when they matter, and streams to
//! every `ssc monitor` attached to its command socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sd_introspect::{Event, Owner, Profile};
use serde::{Deserialize, Serialize};
use ssc_abi::Body;

use crate::builder::{ControlEvent, MetaDomain, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::profile::SystemMap;
use crate::qemu::Accel;

/// The chain file's `[introspect]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectSection {
    pub profile: Option<PathBuf>,
    pub system_map: Option<PathBuf>,
    pub period_ms: Option<u32>,
    pub text_slices: Option<u32>,
}

/// A checked `[introspect]`.
pub struct IntrospectPlan {
    pub image: VerifiedImage,
    pub profile: Profile,
    pub system_map: Option<PathBuf>,
    pub period_ms: u32,
    pub text_slices: u32,
}

impl IntrospectPlan {
    /// Checks the section; `at` resolves paths against the chain file.
    pub fn check(s: IntrospectSection, image: VerifiedImage, at: impl Fn(&Path) -> PathBuf) -> Result<Self> {
        let profile_path = s.profile.map(|p| at(&p)).unwrap_or_else(|| PathBuf::from("build/client/profile.ssc"));
        let profile = crate::profile::load(&profile_path)?;
        let default_map = PathBuf::from("build/client/System.map");
        let system_map = match s.system_map {
            Some(p) => Some(at(&p)),
            None => default_map.is_file().then_some(default_map),
        };
        let period_ms = s.period_ms.unwrap_or(100);
        if !(10..=60_000).contains(&period_ms) {
            bail!("period_ms = {period_ms}: between 10 (100 Hz) and 60000 (once a minute)");
        }
        let text_slices = s.text_slices.unwrap_or(10);
        if !(1..=10_000).contains(&text_slices) {
            bail!("text_slices = {text_slices}: between 1 (all kernel text every scan) and 10000");
        }
        Ok(IntrospectPlan { image, profile, system_map, period_ms, text_slices })
    }
}

/// One event as `ssc up` reports it: when (ms since the monitor
/// started), the event, and a sentence with kernel addresses named.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Line {
    pub t_ms: u64,
    /// Worth an operator's attention (hooks, hidden tasks, alerts, …).
    pub alert: bool,
    pub text: String,
    pub event: Event,
}

/// The introspection SD of a running chain.
pub struct Session {
    sd_name: String,
    profile: Profile,
    map: Option<SystemMap>,
    slide: Option<u64>,
    started: Instant,
    /// Events that arrived while a snapshot was awaited.
    pending: Vec<Event>,
}

/// Starts the SD with a read-only window on the client's memory and
/// hands it the profile.
pub fn start_sd(
    plan: &IntrospectPlan,
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    memory: &Path,
) -> Result<Session> {
    let map = match &plan.system_map {
        Some(p) => Some(
            SystemMap::parse(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| p.display().to_string())?,
        ),
        None => None,
    };
    let mut spec = plan.image.spec("introspect");
    spec.windows.push(WindowSpec { file: memory.to_path_buf(), writable: false });
    sds.start(&spec, accel, echo, Duration::from_secs(60))?;
    let sd = sds.domain(&spec.name).context("the introspection SD is gone")?;
    let ctl = sd.control_ref().context("the introspection SD has no control link")?;
    let profile = plan.profile.encode();
    let summary_every = (1000 / plan.period_ms).max(1);
    ctl.request(
        Body::IntrospectStart {
            profile: &profile,
            period_ms: plan.period_ms,
            text_slices: plan.text_slices,
            summary_every,
        },
        Duration::from_secs(30),
    )
    .context("the introspection SD refused the profile")?;
    eprintln!(
        "ssc up: introspection SD started with a read-only window on the client; profile {}, scans every {} ms",
        plan.profile.release, plan.period_ms
    );
    Ok(Session {
        sd_name: spec.name,
        profile: plan.profile.clone(),
        map,
        slide: None,
        started: Instant::now(),
        pending: Vec::new(),
    })
}

impl Session {
    /// Everything the SD reported since the last call, named.
    pub fn drain(&mut self, sds: &mut MetaDomain) -> Vec<Line> {
        let mut events = std::mem::take(&mut self.pending);
        if let Some(ctl) = sds.domain(&self.sd_name).and_then(|d| d.control_ref()) {
            while let Some(ev) = ctl.recv(Duration::ZERO) {
                if let ControlEvent::Monitor { request_id: 0, event } = ev {
                    match Event::decode(&event) {
                        Some(e) => events.push(e),
                        None => {
                            eprintln!("ssc up: introspect: an event this ssc cannot decode ({} bytes)", event.len())
                        }
                    }
                }
            }
        }
        events.into_iter().map(|e| self.line(e)).collect()
    }

    /// The processes and modules now (`ssc monitor --ps`).
    pub fn snapshot(&mut self, sds: &mut MetaDomain) -> Result<Line> {
        let ctl = sds.domain(&self.sd_name).and_then(|d| d.control_ref()).context("the introspection SD is gone")?;
        let id = ctl.send(Body::IntrospectSnapshot)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match ctl.recv(left) {
                Some(ControlEvent::Monitor { request_id, event }) if request_id == id => {
                    let ev = Event::decode(&event).context("the SD sent a snapshot this ssc cannot decode")?;
                    return Ok(self.line(ev));
                }
                Some(ControlEvent::Monitor { request_id: 0, event }) => self.pending.extend(Event::decode(&event)),
                Some(ControlEvent::Error { request_id, message, .. }) if request_id == id => bail!("{message}"),
                Some(ControlEvent::Broken(why)) => bail!("the introspection SD's control link broke: {why}"),
                Some(_) => {}
                None => break,
            }
        }
        bail!("the introspection SD did not answer a snapshot request within 30 s")
    }

    fn line(&mut self, event: Event) -> Line {
        if let Event::Attached { slide, .. } = &event {
            self.slide = Some(*slide);
        }
        let alert = matches!(
            event,
            Event::AttachFailed { .. }
                | Event::HiddenProcess { .. }
                | Event::SyscallHook { .. }
                | Event::IdtHook { .. }
                | Event::TextChanged { .. }
                | Event::SyscallAlert { .. }
                | Event::ModuleLoaded { .. }
                | Event::Inconsistent { .. }
        );
        Line { t_ms: self.started.elapsed().as_millis() as u64, alert, text: self.describe(&event), event }
    }

    /// A kernel address by symbol (`__x64_sys_getppid+0x0`) when System.map
    /// is at hand.
    fn symbol(&self, runtime: u64) -> String {
        match (&self.map, self.slide) {
            (Some(map), Some(slide)) => match map.symbolize(runtime.wrapping_sub(slide)) {
                Some((name, off)) => format!("{name}+{off:#x}"),
                None => format!("{runtime:#x}"),
            },
            _ => format!("{runtime:#x}"),
        }
    }

    fn owner(&self, addr: u64, owner: &Owner) -> String {
        match owner {
            Owner::KernelText { .. } => format!("kernel text {}", self.symbol(addr)),
            Owner::InitText { .. } => format!("boot-only kernel text {}", self.symbol(addr)),
            Owner::Module { name, offset } => format!("module {name}+{offset:#x}"),
            Owner::Unknown => "memory outside kernel text and every module".into(),
        }
    }

    /// The sentence for one event.
    pub fn describe(&self, ev: &Event) -> String {
        let p = &self.profile;
        match ev {
            Event::Attached { release, slide, five_level, processes, modules } => format!(
                "attached to {release}: KASLR slide {slide:#x}, {}-level paging, {processes} processes, {modules} modules",
                if *five_level { 5 } else { 4 }
            ),
            Event::AttachFailed { reason } => format!("cannot monitor the client: {reason}"),
            Event::ProcessStart { process: q } => format!(
                "process start: pid {} ({}) parent {}{}",
                q.pid,
                q.comm,
                q.ppid,
                if q.kernel_thread { ", kernel thread" } else { "" }
            ),
            Event::ProcessExit { pid, comm } => format!("process exit: pid {pid} ({comm})"),
            Event::HiddenProcess { pid, comm, task } => format!(
                "hidden process: pid {pid} ({comm}) is in the process tree but not on the task list (task_struct {task:#x})"
            ),
            Event::SyscallHook { nr, name, expected, found, owner } => format!(
                "syscall hook: sys_call_table[{nr}] ({name}) points to {found:#x} in {}, expected {}",
                self.owner(*found, owner),
                self.symbol(*expected)
            ),
            Event::SyscallRestored { nr, name } => {
                format!("syscall table entry {nr} ({name}) holds its original again")
            }
            Event::IdtHook { vector, found, baseline, owner } => format!(
                "IDT hook: vector {vector} points to {found:#x} in {}{}",
                self.owner(*found, owner),
                baseline.map(|b| format!(" (was {})", self.symbol(b))).unwrap_or_default()
            ),
            Event::TextChanged { at, offset } => format!(
                "kernel text changed at {at:#x} (_stext+{offset:#x}, {}), not by the kernel's own patching",
                self.symbol(*at)
            ),
            Event::TextPatched { page, sites } => {
                format!("kernel text patched by the kernel: {sites} site(s) in page {}", self.symbol(*page))
            }
            Event::ModuleLoaded { module } => {
                format!("module loaded: {} at {:#x} ({} bytes)", module.name, module.base, module.size)
            }
            Event::ModuleUnloaded { name } => format!("module unloaded: {name}"),
            Event::SyscallAlert { pid, comm, nr, name } => {
                format!("syscall alert: pid {pid} ({comm}) is in {name} (syscall {nr})")
            }
            Event::Syscalls { samples, counts, tasks, scan_us_max } => {
                let mut top: Vec<&(u16, u32)> = counts.iter().collect();
                top.sort_by_key(|c| std::cmp::Reverse(c.1));
                let top: Vec<String> =
                    top.iter().take(8).map(|(nr, n)| format!("{} {n}", p.syscall_name(*nr as u64))).collect();
                let busy: Vec<String> = tasks
                    .iter()
                    .filter(|t| t.running)
                    .take(6)
                    .map(|t| format!("{}({}) {}", t.comm, t.pid, p.syscall_name(t.nr as u64)))
                    .collect();
                format!(
                    "syscalls over {samples} samples: {}; runnable: {}; slowest scan {:.1} ms",
                    if top.is_empty() { "none".into() } else { top.join(", ") },
                    if busy.is_empty() { "none".into() } else { busy.join(", ") },
                    *scan_us_max as f64 / 1000.0
                )
            }
            Event::Inconsistent { reason, streak } => {
                format!("{streak} scans in a row could not be read consistently: {reason}")
            }
            Event::Snapshot { processes, modules } => {
                format!("{} processes, {} modules", processes.len(), modules.len())
            }
        }
    }
}

/// `ssc monitor --ps`: the process table.
pub fn process_table(ev: &Event, profile_names: Option<&Profile>) -> Result<String> {
    let Event::Snapshot { processes, modules } = ev else { bail!("not a snapshot") };
    let mut s = format!("{:>7} {:>7} {:<16} {:>7} {:<9} {}\n", "PID", "PPID", "COMM", "THREADS", "KIND", "SYSCALL");
    for p in processes {
        let sc = match (p.syscall, profile_names) {
            (Some(nr), Some(prof)) => prof.syscall_name(nr as u64).to_string(),
            (Some(nr), None) => nr.to_string(),
            (None, _) => "-".into(),
        };
        let kind = if p.kernel_thread { "kernel" } else { "user" };
        s += &format!("{:>7} {:>7} {:<16} {:>7} {:<9} {sc}\n", p.pid, p.ppid, p.comm, p.threads, kind);
    }
    s += &format!("{} processes; modules: ", processes.len());
    s += &modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" ");
    s += "\n";
    Ok(s)
}

/// Serves `introspect ps` for `ssc up`: the snapshot as one JSON line.
pub fn serve(cmd: &str, session: &mut Session, sds: &mut MetaDomain) -> Result<String> {
    match cmd {
        "introspect ps" => Ok(serde_json::to_string(&session.snapshot(sds)?)?),
        other => Err(anyhow!("unknown command `{other}` (introspect ps)")),
    }
}

/// `ssc monitor`: subscribes to the `ssc up` running `chain` and calls `f`
/// with every event line until `until` (or until `ssc up` stops).
pub fn watch(chain: &Path, until: Option<Instant>, mut f: impl FnMut(&Line)) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let path = crate::chain_checkpoint::socket_path(chain);
    let stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!("no `ssc up {}` is running (nothing listens on {})", chain.display(), path.display())
    })?;
    (&stream).write_all(b"monitor\n")?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(&stream);
    let mut buf = String::new();
    loop {
        if until.is_some_and(|u| Instant::now() >= u) || crate::interrupted() {
            return Ok(());
        }
        match reader.read_line(&mut buf) {
            Ok(0) => bail!("`ssc up` stopped"),
            Ok(_) if buf.ends_with('\n') => {
                let text = std::mem::take(&mut buf);
                match text.trim_end().split_once(' ') {
                    Some(("ok", _)) => {}
                    Some(("error", msg)) => bail!("{msg}"),
                    Some(("event", json)) => match serde_json::from_str::<Line>(json) {
                        Ok(line) => f(&line),
                        Err(e) => bail!("`ssc up` sent an event this ssc cannot read: {e}"),
                    },
                    _ => bail!("unexpected line from `ssc up`: {text}"),
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
