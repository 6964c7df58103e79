//! `ssc bench dedup`: memory deduplication of idle Linux clients booted
//! from the same image, end to end, in one invocation:
//!
//! * the dedup SD's scan (time, duplicate and zero pages found, what
//!   sharing would save) and its apply (zero pages punched out of the
//!   paused clients' memory files: memory actually returned);
//! * beside QEMU's virtio-balloon free page reporting on equivalent
//!   clients (shared memory files too: QEMU punches the reported free
//!   pages out of them), allocated memory after the same settle time;
//! * beside Linux KSM on equivalent clients with private anonymous RAM
//!   (QEMU marks it mergeable), pages sharing after a fixed time — where
//!   the host lets us switch KSM on (root); its `run` is restored after.
//!
//! The SD's hashing runs emulated under TCG; `ssc bench dedup-core` is the
//! figure that carries to a KVM host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::builder::{Domain, DomainSpec, LogEcho, RunDir, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::qemu::Accel;

/// One row of the table.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub what: String,
    /// Seconds the measured step took (scan, apply) or waited (anchors).
    pub seconds: f64,
    /// Pages found (duplicates + allocated zero pages) or sharing (KSM).
    pub pages: u64,
    /// MiB actually returned to the host (or, for the scan, what sharing
    /// would save).
    pub mib: f64,
}

/// What the benchmark boots.
pub struct Setup<'a> {
    pub image: &'a VerifiedImage,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub accel: Accel,
    pub clients: usize,
    pub mib: u32,
    /// How long the anchors (and the SD's clients) settle before measuring.
    pub settle: Duration,
    /// How long KSM runs over the private-RAM clients (after they settle).
    pub ksm_wait: Duration,
    /// Copy the SD's clients' memory (sparse, taken with them paused) here,
    /// for `ssc bench dedup-core --from`.
    pub capture: Option<PathBuf>,
}

/// Copies the allocated extents of `from` into a sparse file `to`.
fn capture(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    dst.set_len(src.metadata()?.len())?;
    let mut buf = vec![0u8; 1 << 20];
    for (off, len) in crate::checkpoint::allocated_extents(from)? {
        let mut at = off;
        while at < off + len {
            let n = ((off + len - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Pauses `client`, copies its memory file `from` to `to`, resumes it.
pub fn capture_paused(client: &Domain, from: &Path, to: &Path) -> Result<()> {
    let mut q = client.qmp(Duration::from_secs(10))?;
    q.execute("stop", None)?;
    let r = capture(from, to);
    q.execute("cont", None)?;
    r
}

/// How a client's RAM is backed.
#[derive(Clone, Copy, PartialEq)]
enum Ram {
    /// A shared memory file (the SD's window).
    Shared,
    /// A shared memory file and a virtio-balloon with free page reporting.
    SharedBalloon,
    /// Private anonymous memory (what KSM can merge).
    Private,
}

const MIB: f64 = 1048576.0;

impl Setup<'_> {
    fn boot(&self, dir: &Path, run: &RunDir, ram: Ram) -> Result<Vec<(Domain, Option<PathBuf>)>> {
        let job = dir.join("initrd-idle");
        let script = "i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 1; done";
        crate::chain::initrd_with_job(self.initrd, script, &job)?;
        let mut out = vec![];
        for i in 0..self.clients {
            let mut spec = DomainSpec::new(&format!("client-{i}"), self.kernel);
            spec.initrd = Some(job.clone());
            spec.append = "console=ttyS0 quiet".into();
            spec.mem_mib = self.mib;
            if ram != Ram::Private {
                spec.memory_file = Some(dir.join(format!("client-{i}.mem")));
            }
            if ram == Ram::SharedBalloon {
                spec.extra_args.extend(["-device".into(), "virtio-balloon-pci,free-page-reporting=on".into()]);
            }
            let d = Domain::launch(&spec, self.accel, run, LogEcho::Quiet)?;
            out.push((d, spec.memory_file));
        }
        for (d, _) in &mut out {
            d.wait_ready(Duration::from_secs(180))?;
        }
        std::thread::sleep(self.settle);
        Ok(out)
    }
}

fn allocated(files: &[PathBuf]) -> Result<u64> {
    files.iter().map(|f| crate::dedup::allocated_bytes(f)).sum()
}

/// Reads a KSM counter.
fn ksm(name: &str) -> Result<u64> {
    let p = format!("/sys/kernel/mm/ksm/{name}");
    std::fs::read_to_string(&p)?.trim().parse().with_context(|| format!("reading {p}"))
}

fn set_ksm(name: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/sys/kernel/mm/ksm/{name}"), value)
}

/// Runs every measurement.
pub fn run(s: &Setup<'_>) -> Result<Vec<Cell>> {
    let mut cells = vec![];
    let tmp = RunDir::create()?;
    let dir = tmp.path();

    // 1. The dedup SD over shared-memory clients; what their files hold
    //    before apply is also the balloon's baseline.
    let plain_alloc;
    eprintln!("bench dedup: {} clients of {} MiB with shared memory files, the dedup SD beside them", s.clients, s.mib);
    {
        let run = RunDir::create()?;
        let clients = s.boot(dir, &run, Ram::Shared)?;
        let mems: Vec<PathBuf> = clients.iter().filter_map(|(_, m)| m.clone()).collect();
        let mut spec = DomainSpec::new("dedup", &s.image.path);
        for m in &mems {
            spec.windows.push(WindowSpec { file: m.clone(), writable: false });
        }
        let mut sd = Domain::launch(&spec, s.accel, &run, LogEcho::Quiet)?;
        sd.wait_ready(Duration::from_secs(60))?;
        if let Some(out) = &s.capture {
            std::fs::create_dir_all(out)?;
            for (i, (c, m)) in clients.iter().enumerate() {
                let to = out.join(format!("client-{i}-{}M.mem", s.mib));
                capture_paused(c, m.as_ref().expect("shared"), &to)?;
                eprintln!("bench dedup: captured {}", to.display());
            }
        }
        let paths: Vec<&Path> = mems.iter().map(PathBuf::as_path).collect();
        let t = Instant::now();
        let scanned = crate::dedup::scan(&mut sd, &paths, &mut crate::checkpoint::quiet)?;
        let scan_time = t.elapsed();
        let plan = &scanned.plan;
        let zero: u64 = plan.clients.iter().map(|c| c.zero_allocated).sum();
        cells.push(Cell {
            what: format!(
                "dedup SD scan ({} duplicate + {zero} allocated zero pages; MiB = what sharing would save)",
                plan.duplicate_pages()
            ),
            seconds: scan_time.as_secs_f64(),
            pages: plan.duplicate_pages() + zero,
            mib: plan.bytes_saved() as f64 / MIB,
        });
        let before = allocated(&mems)?;
        plain_alloc = before;
        let t = Instant::now();
        let mut punched = 0;
        for (i, (c, m)) in clients.iter().enumerate() {
            let a = crate::dedup::apply(c, m.as_ref().expect("shared"), &plan.zero_runs[i])?;
            punched += a.punched;
        }
        let apply_time = t.elapsed();
        let after = allocated(&mems)?;
        cells.push(Cell {
            what: format!(
                "dedup SD apply: zero pages punched (allocated {:.0} → {:.0} MiB)",
                before as f64 / MIB,
                after as f64 / MIB
            ),
            seconds: apply_time.as_secs_f64(),
            pages: punched,
            mib: before.saturating_sub(after) as f64 / MIB,
        });
        sd.shutdown(Duration::from_secs(10))?;
    }

    // 2. virtio-balloon free page reporting on equivalent clients: what
    //    their memory files hold after the same settle time, against the
    //    SD's clients before apply (same image, same idle job).
    eprintln!("bench dedup: the same clients with virtio-balloon free page reporting");
    {
        let run = RunDir::create()?;
        let t = Instant::now();
        let ballooned = s.boot(&subdir(dir, "balloon")?, &run, Ram::SharedBalloon)?;
        let waited = t.elapsed();
        let b_alloc = allocated(&ballooned.iter().filter_map(|(_, m)| m.clone()).collect::<Vec<_>>())?;
        cells.push(Cell {
            what: format!(
                "virtio-balloon free page reporting (allocated {:.0} MiB vs {:.0} MiB without it)",
                b_alloc as f64 / MIB,
                plain_alloc as f64 / MIB
            ),
            seconds: waited.as_secs_f64(),
            pages: plain_alloc.saturating_sub(b_alloc) / 4096,
            mib: plain_alloc.saturating_sub(b_alloc) as f64 / MIB,
        });
    }

    // 3. KSM on private-memory clients, if the host lets us switch it on.
    let old_run = std::fs::read_to_string("/sys/kernel/mm/ksm/run").ok();
    match old_run.as_deref().map(str::trim) {
        Some(old) if set_ksm("run", "1").is_ok() => {
            eprintln!("bench dedup: the same clients with private RAM under KSM for {} s", s.ksm_wait.as_secs());
            let result = (|| -> Result<Cell> {
                let run = RunDir::create()?;
                let before = ksm("pages_sharing")?;
                let t = Instant::now();
                let clients = s.boot(&subdir(dir, "ksm")?, &run, Ram::Private)?;
                std::thread::sleep(s.ksm_wait);
                let sharing = ksm("pages_sharing")?.saturating_sub(before);
                drop(clients);
                Ok(Cell {
                    what: "Linux KSM on private-RAM clients (pages sharing after the wait; default scan rate)".into(),
                    seconds: t.elapsed().as_secs_f64(),
                    pages: sharing,
                    mib: sharing as f64 * 4096.0 / MIB,
                })
            })();
            // Put KSM back as it was (2 would unmerge; 0 stops it).
            let _ = set_ksm("run", old);
            cells.push(result?);
        }
        _ => cells.push(Cell {
            what: "Linux KSM: not measured (cannot switch /sys/kernel/mm/ksm/run on: needs root)".into(),
            seconds: 0.0,
            pages: 0,
            mib: 0.0,
        }),
    }
    Ok(cells)
}

/// `dir/name`, created.
fn subdir(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

/// The table.
pub fn render(cells: &[Cell], s: &Setup<'_>) -> String {
    let mut out = format!(
        "Accelerator: {}. {} idle clients of {} MiB from one image; settle time {} s, KSM wait {} s.\n\n\
         | measurement | time | pages | MiB |\n|---|---|---|---|\n",
        s.accel,
        s.clients,
        s.mib,
        s.settle.as_secs(),
        s.ksm_wait.as_secs()
    );
    for c in cells {
        out += &format!("| {} | {:.2} s | {} | {:.1} |\n", c.what, c.seconds, c.pages, c.mib);
    }
    out += "\nAnchors (published): the SSC paper's dedup SD took 6.9 s for a pair of 512 MB VMs and 15.8 s for 1 GB. \
            Only zero pages can be returned on stock QEMU/KVM with shared memory files; non-zero duplicates are \
            what sharing would save on a hypervisor with copy-on-write page sharing.\n";
    out
}
