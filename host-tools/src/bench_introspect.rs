//! The introspection SD's benchmarks, in two layers.
//!
//! * `ssc bench introspect-core` — natively, over the memory of a real
//!   client captured by `ssc bench introspect --capture`: attach (find
//!   VMCOREINFO, first scan, copy of kernel text), a full scan (processes,
//!   process tree, modules, syscall table, IDT, all kernel text hashed), a
//!   10 Hz tick (a tenth of the text), and the process list alone; beside
//!   the anchors a reader of the same bytes cannot beat (a copy of kernel
//!   text, XXH3 over it).
//! * `ssc bench introspect` — end to end: the slowdown of a syscall- and
//!   CPU-heavy workload in the client with the SD scanning at 10 Hz
//!   against no SD, in one run (no SD, SD booted but idle, SD scanning,
//!   no SD again).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_introspect::{Config, Kernel, Monitor, Profile};
use serde::Serialize;
use ssc_abi::Body;

use crate::builder::{Domain, DomainSpec, LogEcho, RunDir, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::qemu::Accel;

/// One row of a table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub what: String,
    /// Median time, milliseconds.
    pub ms: f64,
    pub note: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = vec![];
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (median(times), last.expect("runs > 0"))
}

/// The native layer over a captured memory file.
pub fn core(memory: &Path, profile: &Profile, runs: usize) -> Result<Vec<Row>> {
    let mem = std::fs::read(memory).with_context(|| format!("reading {}", memory.display()))?;
    let mut rows = vec![];
    let (ms, attached) = time_ms(runs.min(10), || {
        let mut m = Monitor::new(profile.clone(), Config::new(profile, 10, 10));
        m.attach(&mem).map(|_| m)
    });
    let mut monitor = attached.map_err(|e| anyhow::anyhow!("{}: {e}", memory.display()))?;
    rows.push(Row { what: "attach (VMCOREINFO search, first scan, text copy)".into(), ms, note: String::new() });
    let mut k = Kernel::attach(profile, &mem).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pages = k.text_pages(profile);
    let (ms, snap) = time_ms(runs, || k.scan(profile, &mem, 0..pages));
    let snap = snap.map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = snap.processes.len();
    rows.push(Row {
        what: "full scan: processes, tree, modules, syscall table, IDT, all text".into(),
        ms,
        note: format!("{n} processes, {} modules, {} text pages", snap.modules.len(), pages),
    });
    let (ms, _) = time_ms(runs, || monitor.scan(&mem));
    rows.push(Row { what: "10 Hz tick (monitor scan, a tenth of the text)".into(), ms, note: String::new() });
    let (ms, _) = time_ms(runs, || {
        k.flush();
        k.processes(profile, &mem)
    });
    rows.push(Row { what: "process list alone".into(), ms, note: format!("{n} processes") });
    let text = k.sym(profile.symbols.text_start & !0xfff);
    let mut copy = vec![0u8; pages * 4096];
    let (ms, _) = time_ms(runs, || k.read(&mem, text, &mut copy));
    rows.push(Row { what: "anchor: copy all kernel text out of guest memory".into(), ms, note: String::new() });
    let (ms, _) = time_ms(runs, || xxhash_rust::xxh3::xxh3_64(&copy));
    rows.push(Row { what: "anchor: XXH3 over kernel text (already copied)".into(), ms, note: String::new() });
    Ok(rows)
}

/// What the end-to-end benchmark boots.
pub struct Setup<'a> {
    pub image: &'a VerifiedImage,
    pub profile: &'a Profile,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub accel: Accel,
    pub mib: u32,
    /// Workload rounds measured per phase.
    pub rounds: usize,
    /// Also copy the client's memory (paused) here, with ~100 processes.
    pub capture: Option<PathBuf>,
}

/// The client's workload: 90 idle processes (a client "with ~100
/// processes"), then rounds of 2M tiny read/write syscalls (dd) and
/// SHA-256 over 4 × 32 MiB in tmpfs (CPU), each timed in centiseconds.
const WORKLOAD: &str = r#"
for i in $(seq 90); do sleep 100000 & done
dd if=/dev/urandom of=/tmp/blob bs=1M count=32 2>/dev/null
cs() { t=$(cut -d' ' -f1 /proc/uptime); echo "${t%.*}${t#*.}"; }
r=0
while true; do
  r=$((r+1))
  a=$(cs); dd if=/dev/zero of=/dev/null bs=64 count=1000000 2>/dev/null
  b=$(cs); sha256sum /tmp/blob /tmp/blob /tmp/blob /tmp/blob >/dev/null
  c=$(cs); echo "round $r sys=$((b-a)) cpu=$((c-b))"
done
"#;

/// Rounds (syscall cs, cpu cs) the client printed after `from` rounds.
fn rounds(client: &Domain) -> Vec<(u64, u64)> {
    client
        .log()
        .iter()
        .filter_map(|l| {
            let l = l.strip_prefix("round ")?;
            let mut f = l.split(' ').skip(1).map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()));
            Some((f.next()??, f.next()??))
        })
        .collect()
}

/// Waits for `n` more rounds (one extra is dropped: it straddles the
/// change); their median syscall and cpu seconds.
fn phase(client: &Domain, n: usize) -> Result<(f64, f64)> {
    let start = rounds(client).len() + 1;
    let t = Instant::now();
    while rounds(client).len() < start + n {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the client's workload stalled:\n{}", client.log().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = &rounds(client)[start..start + n];
    Ok((median(r.iter().map(|x| x.0 as f64 / 100.0).collect()), median(r.iter().map(|x| x.1 as f64 / 100.0).collect())))
}

/// The end-to-end table rows: (configuration, syscall s, cpu s).
pub fn e2e(s: &Setup<'_>) -> Result<Vec<(String, f64, f64)>> {
    let tmp = RunDir::create()?;
    let dir = tmp.path();
    let job = dir.join("initrd-workload");
    crate::chain::initrd_with_job(s.initrd, WORKLOAD, &job)?;
    let mut spec = DomainSpec::new("client", s.kernel);
    spec.initrd = Some(job);
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = s.mib;
    let memory = dir.join("client.mem");
    spec.memory_file = Some(memory.clone());
    let mut client = Domain::launch(&spec, s.accel, &tmp, LogEcho::Quiet)?;
    client.wait_ready(Duration::from_secs(180))?;
    eprintln!("bench introspect: client up; workload rounds: 2M read/write syscalls, SHA-256 of 4 x 32 MiB");
    let mut out = vec![];
    let (a, b) = phase(&client, s.rounds)?;
    out.push(("no introspection SD".to_string(), a, b));
    eprintln!("bench introspect: {:?}", out.last());
    if let Some(dir) = &s.capture {
        std::fs::create_dir_all(dir)?;
        let to = dir.join(format!("client-{}M.mem", s.mib));
        crate::bench_dedup_e2e::capture_paused(&client, &memory, &to)?;
        eprintln!("bench introspect: captured {} (for `ssc bench introspect-core --from`)", to.display());
    }
    let mut sd_spec = DomainSpec::new("introspect", &s.image.path);
    sd_spec.windows.push(WindowSpec { file: memory.clone(), writable: false });
    let mut sd = Domain::launch(&sd_spec, s.accel, &tmp, LogEcho::Quiet)?;
    sd.wait_ready(Duration::from_secs(60))?;
    let (a, b) = phase(&client, s.rounds)?;
    out.push(("introspection SD booted, not scanning".to_string(), a, b));
    eprintln!("bench introspect: {:?}", out.last());
    let ctl = sd.control_ref().context("the SD has no control link")?;
    let profile = s.profile.encode();
    ctl.request(
        Body::IntrospectStart { profile: &profile, period_ms: 100, text_slices: 10, summary_every: 10 },
        Duration::from_secs(30),
    )?;
    // Wait for the attach before measuring.
    let t = Instant::now();
    loop {
        match ctl.recv(Duration::from_secs(1)) {
            Some(crate::builder::ControlEvent::Monitor { event, .. }) => match sd_introspect::Event::decode(&event) {
                Some(sd_introspect::Event::Attached { .. }) => break,
                Some(sd_introspect::Event::AttachFailed { reason }) => bail!("the SD could not attach: {reason}"),
                _ => {}
            },
            _ if t.elapsed() > Duration::from_secs(60) => bail!("the SD did not attach within 60 s"),
            _ => {}
        }
    }
    let (a, b) = phase(&client, s.rounds)?;
    out.push(("introspection SD scanning at 10 Hz".to_string(), a, b));
    eprintln!("bench introspect: {:?}", out.last());
    sd.shutdown(Duration::from_secs(10))?;
    let (a, b) = phase(&client, s.rounds)?;
    out.push(("no introspection SD (again)".to_string(), a, b));
    client.kill();
    Ok(out)
}

/// The end-to-end table.
pub fn render_e2e(rows: &[(String, f64, f64)], accel: Accel, rounds: usize) -> String {
    let base_sys = (rows[0].1 + rows[3].1) / 2.0;
    let base_cpu = (rows[0].2 + rows[3].2) / 2.0;
    let mut s = format!(
        "accelerator: {accel}; median of {rounds} workload rounds per configuration, one client, one run\n\
         {:<40} {:>16} {:>10} {:>16} {:>10}\n",
        "configuration", "2M syscalls s", "vs no SD", "SHA-256 128M s", "vs no SD"
    );
    for (what, sys, cpu) in rows {
        s += &format!(
            "{what:<40} {sys:>16.2} {:>+9.1}% {cpu:>16.2} {:>+9.1}%\n",
            (sys / base_sys - 1.0) * 100.0,
            (cpu / base_cpu - 1.0) * 100.0
        );
    }
    s += "(baseline: the mean of the two no-SD rows; /proc/uptime has 10 ms resolution)\n";
    s
}

/// The native table.
pub fn render_core(rows: &[Row]) -> String {
    let mut s = format!("{:<66} {:>10}  {}\n", "measurement (median)", "ms", "");
    for r in rows {
        s += &format!("{:<66} {:>10.3}  {}\n", r.what, r.ms, r.note);
    }
    s
}
