//! `ssc bench storage`: fio in the Linux client over five disks, one
//! invocation, same client, same fio jobs:
//!
//! * `raw`: the volume file attached directly (virtio-blk on the file);
//! * `sd-null`: through storage-crypt with the null cipher (pass-through);
//! * `sd-xts`: through storage-crypt with aes-xts-plain64;
//! * `sd-auth`: through storage-crypt in the authenticated mode
//!   (aes-256-gcm, Merkle-rooted metadata; fio's direct I/O sends no FLUSH,
//!   so commits happen when the client leaves);
//! * `qemu-luks`: QEMU's own LUKS driver on a LUKS1 file (aes-256-xts).
//!
//! Jobs (after one sequential pass fills the region): 4 KiB random read and
//! write at iodepth 32, 1 MiB sequential read and write at iodepth 4;
//! libaio, direct I/O, time-based. The client prints
//! fio's JSON between markers; this module parses it. The accelerator is
//! named in the table: under TCG every guest instruction (the SD's AES
//! included) is emulated.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use ssc_abi::{Body, VolumeConfig};

use crate::builder::{Domain, DomainSpec, LinkSpec, LogEcho, NbdDisk, RunDir};
use crate::catalog::VerifiedImage;
use crate::qemu::Accel;

/// One measured cell.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub path: String,
    pub job: String,
    pub iops: f64,
    pub mib_s: f64,
}

const JOBS: [(&str, &str, &str, u32); 4] = [
    ("4k-randread", "randread", "4k", 32),
    ("4k-randwrite", "randwrite", "4k", 32),
    ("1m-read", "read", "1M", 4),
    ("1m-write", "write", "1M", 4),
];

fn fio_job(runtime: u32, size_mib: u64) -> String {
    // Fill the region first on every path: reads must hit written data (an
    // authenticated volume serves never-written sectors as zeroes without
    // any crypto; a sparse raw file would be as unfair).
    let mut s = format!(
        "fio --name=fill --filename=/dev/vda --direct=1 --ioengine=libaio --rw=write --bs=1M --iodepth=4 \
         --size={size_mib}M >/dev/null\necho FIO-BEGIN\n"
    );
    for (name, rw, bs, depth) in JOBS {
        s.push_str(&format!(
            "fio --name={name} --filename=/dev/vda --direct=1 --ioengine=libaio --rw={rw} --bs={bs} --iodepth={depth} \
             --size={size_mib}M --runtime={runtime} --time_based --output-format=json | tr -d '\\n'; echo\n"
        ));
    }
    s.push_str("echo FIO-END\n");
    s
}

fn parse(path: &str, log: &[String]) -> Result<Vec<Cell>> {
    let start = log.iter().position(|l| l == "FIO-BEGIN").ok_or_else(|| anyhow!("{path}: fio did not start"))?;
    let mut cells = vec![];
    for line in log[start + 1..].iter().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{path}: fio JSON"))?;
        let job = &v["jobs"][0];
        let name = job["jobname"].as_str().unwrap_or("?").to_string();
        let dir = if name.contains("write") { "write" } else { "read" };
        cells.push(Cell {
            path: path.into(),
            job: name,
            iops: job[dir]["iops"].as_f64().unwrap_or(0.0),
            mib_s: job[dir]["bw"].as_f64().unwrap_or(0.0) / 1024.0,
        });
    }
    if cells.len() != JOBS.len() {
        bail!("{path}: expected {} fio results, got {}", JOBS.len(), cells.len());
    }
    Ok(cells)
}

/// Runs the client's fio jobs on a disk that `attach` adds.
fn client_fio(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    accel: Accel,
    job: &str,
    attach: impl FnOnce(&mut DomainSpec),
) -> Result<Vec<String>> {
    let run_dir = RunDir::create()?;
    let with_job = dir.join("initrd-bench");
    crate::chain::initrd_with_job(initrd, job, &with_job)?;
    let mut spec = DomainSpec::new("client", kernel);
    spec.initrd = Some(with_job);
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = 512;
    attach(&mut spec);
    let mut client = Domain::launch(&spec, accel, &run_dir, LogEcho::Quiet)?;
    client.wait_ready(Duration::from_secs(180))?;
    client.wait_exit(Some(Duration::from_secs(900)))?;
    let log = client.log();
    if !log.iter().any(|l| l == "client: job passed") {
        return Err(client.failure("the benchmark job failed".into()));
    }
    Ok(log)
}

/// Runs the matrix. `size_mib` is the volume size, `runtime` seconds per job.
pub fn run(
    sd: &VerifiedImage,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    size_mib: u64,
    runtime: u32,
) -> Result<Vec<Cell>> {
    let tmp = RunDir::create()?;
    let dir = tmp.path();
    let job = fio_job(runtime, size_mib.min(1024) / 2);
    let mut cells = vec![];
    let fresh = |name: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::File::create(&p)?.set_len(size_mib << 20)?;
        Ok(p)
    };

    eprintln!("bench storage: raw file");
    let raw = fresh("raw.img")?;
    cells.extend(parse("raw", &client_fio(kernel, initrd, dir, accel, &job, |s| s.disks.push(raw.clone()))?)?);

    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29).wrapping_add(5)).collect();
    for (label, cipher) in [("sd-null", "null"), ("sd-xts", "aes-xts-plain64"), ("sd-auth", "aes-256-gcm")] {
        eprintln!("bench storage: {label}");
        let vol = fresh(&format!("{label}.img"))?;
        if cipher == "aes-256-gcm" {
            let header = sd_storage_crypt::auth::format(&key, size_mib << 20, [7; 32], [8; 16])
                .map_err(|e| anyhow!("authenticated volume: {e}"))?;
            std::os::unix::fs::FileExt::write_all_at(&std::fs::File::options().write(true).open(&vol)?, &header, 0)?;
        }
        let socket = dir.join(format!("{label}.nbd"));
        let mut spec = DomainSpec::new(label, &sd.path);
        spec.disks.push(vol);
        spec.links.push(LinkSpec::listen("nbd", &socket));
        let mut sd_dom = Domain::launch(&spec, accel, &tmp, LogEcho::Quiet)?;
        sd_dom.wait_ready(Duration::from_secs(60))?;
        let cfg = match cipher {
            "null" => VolumeConfig { cipher, ..VolumeConfig::xts_plain64("vol", &[]) },
            "aes-256-gcm" => VolumeConfig::authenticated("vol", &key, 1),
            _ => VolumeConfig::xts_plain64("vol", &key),
        };
        sd_dom
            .control()
            .ok_or_else(|| anyhow!("no control link"))?
            .request(Body::ConfigureVolume(cfg), Duration::from_secs(30))?;
        let log = client_fio(kernel, initrd, dir, accel, &job, |s| {
            s.nbd_disks.push(NbdDisk { socket: socket.clone(), export: "vol".into() })
        })?;
        cells.extend(parse(label, &log)?);
        sd_dom.shutdown(Duration::from_secs(30))?;
    }

    eprintln!("bench storage: qemu-luks");
    let luks = dir.join("qemu.luks");
    crate::luks::qemu_img_create(&luks, &format!("{size_mib}M"), "bench", 10)?;
    let log = client_fio(kernel, initrd, dir, accel, &job, |s| {
        s.extra_args.extend([
            "-object".into(),
            "secret,id=s0,data=bench".into(),
            "-blockdev".into(),
            format!("driver=luks,key-secret=s0,file.driver=file,file.filename={},node-name=luks0", luks.display()),
            "-device".into(),
            "virtio-blk-pci,drive=luks0".into(),
        ])
    })?;
    cells.extend(parse("qemu-luks", &log)?);
    Ok(cells)
}

/// The table: one row per job, one column per path, ratios against raw.
pub fn render(cells: &[Cell], accel: Accel) -> String {
    let paths = ["raw", "sd-null", "sd-xts", "sd-auth", "qemu-luks"];
    let ratios = [("sd-null", "raw"), ("sd-xts", "sd-null"), ("sd-auth", "sd-null"), ("sd-xts", "qemu-luks")];
    let mut s = format!(
        "Accelerator: {accel}.\n\n| job | {} | {} |\n|---|{}\n",
        paths.join(" | "),
        ratios.iter().map(|(a, b)| format!("{a} / {b}")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(paths.len() + ratios.len())
    );
    for (job, ..) in JOBS {
        let get = |p: &str| cells.iter().find(|c| c.path == p && c.job == job);
        let show = |c: Option<&Cell>| match c {
            Some(c) if job.starts_with("4k") => format!("{:.0} IOPS", c.iops),
            Some(c) => format!("{:.1} MiB/s", c.mib_s),
            None => "-".into(),
        };
        let val = |p: &str| get(p).map(|c| if job.starts_with("4k") { c.iops } else { c.mib_s }).unwrap_or(0.0);
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "-".into() };
        let mut row = format!("| {job} |");
        for p in paths {
            row.push_str(&format!(" {} |", show(get(p))));
        }
        for (a, b) in ratios {
            row.push_str(&format!(" {} |", ratio(val(a), val(b))));
        }
        s.push_str(&row);
        s.push('\n');
    }
    s.push_str("\nAnchor (published): the DBSP paper's ~1% I/O overhead with AES-NI (1.18% read, 0.95% write).\n");
    s
}
