//! `ssc bench boot`: boot time of every catalog image, per accelerator,
//! machine type and firmware. For each combination: the median over N boots
//! of QEMU spawn → first console line, QEMU spawn → `ssc: ready`, and the
//! guest's own PVH-entry → ready time; plus the image size.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::builder::{Domain, LogEcho, RunDir};
use crate::catalog::VerifiedImage;
use crate::qemu::{Accel, Firmware, Machine};

/// One row of the boot table.
#[derive(Debug, Serialize)]
pub struct BootRow {
    pub image: String,
    pub size_kib: u64,
    pub accel: Accel,
    pub machine: Machine,
    pub firmware: Firmware,
    pub runs: usize,
    pub first_line_ms: f64,
    pub ready_ms: f64,
    pub guest_boot_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] }
}

/// Boots each image `runs` times per combination.
pub fn boot(images: &[VerifiedImage], accels: &[Accel], runs: usize) -> Result<Vec<BootRow>> {
    let combos: Vec<(Machine, Firmware)> = if Path::new(crate::qemu::QBOOT).exists() {
        vec![
            (Machine::Q35, Firmware::Qboot),
            (Machine::Pc, Firmware::Qboot),
            (Machine::Q35, Firmware::Seabios),
            (Machine::Pc, Firmware::Seabios),
        ]
    } else {
        vec![(Machine::Q35, Firmware::Seabios), (Machine::Pc, Firmware::Seabios)]
    };
    let total = (images.len() * accels.len() * combos.len() * runs) as u64;
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} boots")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let run_dir = RunDir::create()?;
    let mut rows = vec![];
    for img in images {
        for &accel in accels {
            for &(machine, firmware) in &combos {
                bar.set_message(format!("{} {accel} {} {}", img.manifest.image.name, machine.name(), firmware.name()));
                let (mut first, mut ready, mut guest) = (vec![], vec![], vec![]);
                for _ in 0..runs {
                    if crate::interrupted() {
                        anyhow::bail!("interrupted");
                    }
                    let mut spec = img.standalone_spec(run_dir.path())?;
                    spec.machine = machine;
                    spec.firmware = firmware;
                    spec.mem_mib = 64;
                    let mut d = Domain::launch(&spec, accel, &run_dir, LogEcho::Quiet)?;
                    let r = d.wait_ready(Duration::from_secs(60))?;
                    d.kill();
                    first.push(r.first_line.as_secs_f64() * 1e3);
                    ready.push(r.ready.as_secs_f64() * 1e3);
                    guest.push(r.guest_boot_us as f64 / 1e3);
                    bar.inc(1);
                }
                rows.push(BootRow {
                    image: img.manifest.image.name.clone(),
                    size_kib: std::fs::metadata(&img.path)?.len() / 1024,
                    accel,
                    machine,
                    firmware,
                    runs,
                    first_line_ms: median(first),
                    ready_ms: median(ready),
                    guest_boot_ms: median(guest),
                });
            }
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// The table as Markdown, with the anchors beside it.
pub fn render(rows: &[BootRow]) -> String {
    let mut s = String::from(
        "| image | size KiB | accel | machine | firmware | runs | spawn → first line ms | spawn → ready ms | guest PVH → ready ms |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} |\n",
            r.image,
            r.size_kib,
            r.accel,
            r.machine.name(),
            r.firmware.name(),
            r.runs,
            r.first_line_ms,
            r.ready_ms,
            r.guest_boot_ms
        ));
    }
    s.push_str(
        "\nAnchors (published, not measured here): Firecracker ≤ 125 ms from VMM start to guest init; Unikraft ~1 ms guest boot on top of its VMM.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(super::median(vec![]), 0.0);
    }
}
