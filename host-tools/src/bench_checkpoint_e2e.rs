//! `ssc bench checkpoint`: checkpoints of an idle Linux client, end to
//! end, one invocation per client size: the checkpoint SD's full save, a
//! delta save a moment later, and the restore of both into a fresh QEMU;
//! beside QEMU's own `stop` + migrate-to-file of the same client (RAM
//! included, bandwidth cap lifted) and a raw copy of its memory file. The
//! SD's crypto runs emulated under TCG; the core table (`ssc bench
//! checkpoint-core`) is the figure that carries to a KVM host.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::builder::{Domain, DomainSpec, LogEcho, RunDir, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::checkpoint::{self, SaveRequest};
use crate::qemu::Accel;

/// One measured cell.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub client_mib: u32,
    pub what: &'static str,
    pub seconds: f64,
    /// Bytes of output (stream, migration file, copy).
    pub bytes: u64,
}

const KEY: [u8; 32] = [0x6b; 32];
const CLIENT: [u8; 16] = *b"bench-client-id!";

/// What every domain of the benchmark is made of.
struct Parts<'a> {
    image: &'a VerifiedImage,
    kernel: &'a Path,
    initrd: &'a Path,
    accel: Accel,
}

impl Parts<'_> {
    /// An idle client of `mib` MiB with its RAM in `mem`; `incoming`: paused,
    /// waiting for a restore.
    fn client(&self, dir: &Path, run: &RunDir, mem: &Path, mib: u32, incoming: bool) -> Result<Domain> {
        let job = dir.join("initrd-idle");
        let script = "i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 1; done";
        crate::chain::initrd_with_job(self.initrd, script, &job)?;
        let mut spec = DomainSpec::new("client", self.kernel);
        spec.initrd = Some(job);
        spec.append = "console=ttyS0 quiet".into();
        spec.mem_mib = mib;
        spec.memory_file = Some(mem.to_path_buf());
        if incoming {
            spec.extra_args.extend(["-incoming".into(), "defer".into()]);
        }
        let mut d = Domain::launch(&spec, self.accel, run, LogEcho::Quiet)?;
        if !incoming {
            d.wait_ready(Duration::from_secs(180))?;
        }
        Ok(d)
    }

    /// The checkpoint SD on `disk` with a window on `mem`, keyed.
    fn sd(&self, run: &RunDir, mem: &Path, disk: &Path, writable: bool) -> Result<Domain> {
        let mut spec = DomainSpec::new("checkpoint", &self.image.path);
        spec.disks.push(disk.to_path_buf());
        spec.windows.push(WindowSpec { file: mem.to_path_buf(), writable });
        let mut d = Domain::launch(&spec, self.accel, run, LogEcho::Quiet)?;
        d.wait_ready(Duration::from_secs(60))?;
        checkpoint::configure(&mut d, CLIENT, &KEY)?;
        Ok(d)
    }
}

/// Runs the measurements for each client size (MiB, a power of two).
pub fn run(image: &VerifiedImage, kernel: &Path, initrd: &Path, accel: Accel, sizes: &[u32]) -> Result<Vec<Cell>> {
    let parts = Parts { image, kernel, initrd, accel };
    let mut cells = vec![];
    for &mib in sizes {
        eprintln!("bench checkpoint: {mib} MiB client");
        let tmp = RunDir::create()?;
        let dir = tmp.path();
        let run = RunDir::create()?;
        let mem = dir.join("client.mem");
        let disk = dir.join("checkpoints.img");
        std::fs::File::create(&disk)?.set_len((u64::from(mib) * 3 + 64) << 20)?;
        let c = parts.client(dir, &run, &mem, mib, false)?;
        std::thread::sleep(Duration::from_secs(2));
        let mut s = parts.sd(&run, &mem, &disk, false)?;
        let req = SaveRequest { generation: 1, at: 0, base: &[], compress: false, leave_paused: false };
        let full = checkpoint::save(&c, &mem, &mut s, dir, req, &mut checkpoint::quiet)?;
        cells.push(Cell {
            client_mib: mib,
            what: "SD full save",
            seconds: full.paused.as_secs_f64(),
            bytes: full.stream.length,
        });
        std::thread::sleep(Duration::from_secs(2));
        let req = SaveRequest {
            generation: 2,
            at: full.stream.end(),
            base: &[full.stream],
            compress: false,
            leave_paused: false,
        };
        let delta = checkpoint::save(&c, &mem, &mut s, dir, req, &mut checkpoint::quiet)?;
        cells.push(Cell {
            client_mib: mib,
            what: "SD delta save",
            seconds: delta.paused.as_secs_f64(),
            bytes: delta.stream.length,
        });
        // The copy-only baseline: the same allocated extents, no hash, no seal.
        let (copied, took) = checkpoint::copy_only(&c, &mem, &mut s, delta.stream.end())?;
        cells.push(Cell {
            client_mib: mib,
            what: "SD copy only (no hash, no seal)",
            seconds: took.as_secs_f64(),
            bytes: copied,
        });
        s.shutdown(Duration::from_secs(10))?;

        // QEMU's own: stop + migrate everything (RAM included) to a file.
        let file = dir.join("qemu-migration.bin");
        let mut q = c.qmp(Duration::from_secs(10))?;
        q.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": false }] })),
        )?;
        q.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": 64u64 << 30 })))?;
        let t = Instant::now();
        q.execute("stop", None)?;
        q.execute("migrate", Some(json!({ "uri": format!("exec:cat > '{}'", file.display()) })))?;
        loop {
            let r = q.execute("query-migrate", None)?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => anyhow::bail!("QEMU's migration failed: {r}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let qemu_time = t.elapsed();
        q.execute("cont", None)?;
        let qemu_bytes = std::fs::metadata(&file)?.len();
        cells.push(Cell {
            client_mib: mib,
            what: "QEMU stop + migrate to file",
            seconds: qemu_time.as_secs_f64(),
            bytes: qemu_bytes,
        });
        let _ = std::fs::remove_file(&file);

        // A raw copy of the memory file (no encryption, no format).
        let copy = dir.join("raw-copy.mem");
        let t = Instant::now();
        let n = std::fs::copy(&mem, &copy).context("copying the memory file")?;
        cells.push(Cell {
            client_mib: mib,
            what: "raw copy of the memory file",
            seconds: t.elapsed().as_secs_f64(),
            bytes: n,
        });
        let _ = std::fs::remove_file(&copy);
        drop(c);

        // Restore full + delta into a fresh QEMU.
        let run2 = RunDir::create()?;
        let mem2 = dir.join("restored.mem");
        let c2 = parts.client(dir, &run2, &mem2, mib, true)?;
        let mut s2 = parts.sd(&run2, &mem2, &disk, true)?;
        let took = checkpoint::restore(&c2, &mut s2, dir, &[full.stream, delta.stream], &mut checkpoint::quiet)?;
        cells.push(Cell {
            client_mib: mib,
            what: "SD restore (full + delta)",
            seconds: took.as_secs_f64(),
            bytes: full.stream.length + delta.stream.length,
        });
        s2.shutdown(Duration::from_secs(10))?;
    }
    Ok(cells)
}

/// The table: one row per measurement, client memory in MB/s.
pub fn render(cells: &[Cell], accel: Accel) -> String {
    let mut s = format!(
        "Accelerator: {accel}.\n\n| client | measurement | time | client memory / s | output |\n|---|---|---|---|---|\n"
    );
    for c in cells {
        s.push_str(&format!(
            "| {} MiB | {} | {:.2} s | {:.0} MB/s | {:.1} MiB |\n",
            c.client_mib,
            c.what,
            c.seconds,
            (u64::from(c.client_mib) << 20) as f64 / c.seconds / 1e6,
            c.bytes as f64 / (1 << 20) as f64
        ));
    }
    s.push_str(
        "\nAnchors (published): the SSC paper's checkpoint SD 6.9 s (512 MB) and 15.8 s (1 GB); \
         Firecracker's full snapshot of 256 MB ~180 ms. QEMU's row migrates through `exec:cat`, which every \
         version has; `file:` migration (QEMU >= 8.2) and `mapped-ram` + `multifd` (>= 9.0) are not on Debian 12's 7.2.\n",
    );
    s
}
