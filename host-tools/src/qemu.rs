//! QEMU: the binary, accelerators, machine/firmware, and exit statuses.
//!
//! **Accelerators.** KVM is used only when a probe proves it works: the
//! image itself is booted with `ssc.probe=1` under KVM, a short timeout, and
//! must report success (SSE copies and a memset in guest ring 0 — exactly
//! what a nested software KVM such as PVM cannot emulate; there QEMU prints
//! "KVM internal error" and pauses, which the builder detects at once; a
//! timeout covers any other hang). The
//! verdict is cached per (host kernel, QEMU version) in
//! `~/.cache/ssc/kvm-probe`. Otherwise TCG runs (`-cpu max`, which has
//! RDRAND and AES-NI). `SSC_ACCEL=kvm|tcg|auto` overrides the choice.
//! `-cpu host,-arch-capabilities` avoids an MSR abort seen on PVM hosts and
//! is harmless elsewhere.
//!
//! **Exit statuses.** The runtime writes to `isa-debug-exit` (port 0xf4):
//! 0x10 → QEMU exits 33 (success), 0x20 + reason → 65 + 2 × reason
//! (see `kernels/runtime/src/exit.rs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The QEMU system emulator we drive.
pub const QEMU: &str = "qemu-system-x86_64";
/// Debian's qboot, a minimal firmware that boots PVH ~50 ms sooner than
/// SeaBIOS under TCG (it leaves 64-bit BARs to the runtime).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// An accelerator that will run a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// QEMU arguments that select this accelerator and its CPU model.
    pub fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// Machine type. Both keep PCI (memory windows are PCI devices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    Q35,
    Pc,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// Firmware that runs before the PVH entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// qboot if installed, else SeaBIOS.
    Auto,
    Qboot,
    Seabios,
}

impl Firmware {
    /// Resolves `Auto` and returns the `-bios` argument, if any.
    pub fn resolve(self) -> (Firmware, Option<PathBuf>) {
        match self {
            Firmware::Seabios => (Firmware::Seabios, None),
            Firmware::Qboot => (Firmware::Qboot, Some(PathBuf::from(QBOOT))),
            Firmware::Auto if Path::new(QBOOT).exists() => (Firmware::Qboot, Some(PathBuf::from(QBOOT))),
            Firmware::Auto => (Firmware::Seabios, None),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Firmware::Auto => "auto",
            Firmware::Qboot => "qboot",
            Firmware::Seabios => "seabios",
        }
    }
}

/// Why an image stopped, decoded from QEMU's exit status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageExit {
    /// The image reported success (QEMU status 33).
    Success,
    /// The image reported a failure with this runtime reason code.
    Failure { reason: u8 },
    /// QEMU exited on its own (its error is on its stderr).
    Qemu { status: i32 },
    /// QEMU was killed by a signal.
    Signal,
}

impl ImageExit {
    pub fn from_status(status: std::process::ExitStatus) -> ImageExit {
        match status.code() {
            Some(33) => ImageExit::Success,
            Some(c) if c >= 65 && c % 2 == 1 => ImageExit::Failure { reason: ((c - 65) / 2) as u8 },
            Some(c) => ImageExit::Qemu { status: c },
            None => ImageExit::Signal,
        }
    }

    /// The runtime's name for a failure reason (kernels/runtime/src/exit.rs).
    pub fn reason_name(reason: u8) -> &'static str {
        match reason {
            1 => "panic",
            2 => "a self-check failed",
            3 => "no hardware entropy (RDSEED/RDRAND)",
            4 => "CPU exception",
            5 => "bad boot information",
            6 => "device setup failed",
            _ => "unknown reason",
        }
    }
}

impl fmt::Display for ImageExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageExit::Success => f.write_str("image reported success"),
            ImageExit::Failure { reason } => write!(f, "image reported failure: {}", ImageExit::reason_name(*reason)),
            ImageExit::Qemu { status } => write!(f, "QEMU exited with status {status} without an image verdict"),
            ImageExit::Signal => f.write_str("QEMU was killed by a signal"),
        }
    }
}

/// `qemu-system-x86_64 --version`, first line.
pub fn version() -> Result<String> {
    let out = Command::new(QEMU).arg("--version").output().with_context(|| {
        format!("{QEMU} not found: install it with `sudo apt-get install -y qemu-system-x86` (or run `make deps`)")
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string())
}

/// Whether `/dev/kvm` exists and can be opened read-write.
pub fn kvm_device() -> Result<(), String> {
    let p = Path::new("/dev/kvm");
    if !p.exists() {
        return Err("no /dev/kvm (KVM module not loaded, or no hardware virtualization)".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable by this user ({e}); add the user to group `kvm`"))
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

fn cache_file() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("ssc").join("kvm-probe")
}

/// The outcome of the KVM probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmVerdict {
    pub usable: bool,
    pub reason: String,
}

fn probe_key() -> String {
    format!("{} | {}", host_kernel(), version().unwrap_or_default())
}

/// The cached probe verdict for this host kernel and QEMU, if any.
pub fn cached_verdict() -> Option<KvmVerdict> {
    let cached = std::fs::read_to_string(cache_file()).ok()?;
    let mut lines = cached.lines();
    if lines.next() != Some(probe_key().as_str()) {
        return None;
    }
    let usable = lines.next() == Some("usable");
    let reason = lines.next().unwrap_or("").to_string();
    Some(KvmVerdict { usable, reason: format!("{reason} (cached probe)") })
}

/// Boots `image` under KVM with `ssc.probe=1` and judges the result.
pub fn probe_kvm(image: &Path, timeout: Duration) -> KvmVerdict {
    if let Err(reason) = kvm_device() {
        return KvmVerdict { usable: false, reason };
    }
    let key = probe_key();
    if let Some(v) = cached_verdict() {
        return v;
    }
    let verdict = run_probe(image, timeout);
    if let Some(dir) = cache_file().parent() {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(
            cache_file(),
            format!("{key}\n{}\n{}\n", if verdict.usable { "usable" } else { "unusable" }, verdict.reason),
        );
    }
    verdict
}

fn run_probe(image: &Path, timeout: Duration) -> KvmVerdict {
    use crate::builder::{Domain, DomainSpec, LogEcho, RunDir};
    let unusable = |reason: String| KvmVerdict { usable: false, reason };
    let run_dir = match RunDir::create() {
        Ok(d) => d,
        Err(e) => return unusable(format!("KVM probe: {e:#}")),
    };
    let mut spec = DomainSpec::new("kvm-probe", image);
    spec.mem_mib = 64;
    spec.append = "ssc.probe=1".into();
    let mut d = match Domain::launch(&spec, Accel::Kvm, &run_dir, LogEcho::Quiet) {
        Ok(d) => d,
        Err(e) => {
            return unusable(format!("KVM probe could not start QEMU: {}", first_line(&e)));
        }
    };
    let rate = |d: &Domain| {
        d.log().iter().find_map(|l| l.split("memset_mib_s=").nth(1)).and_then(|r| r.trim().parse::<f64>().ok())
    };
    match d.wait_exit(Some(timeout)) {
        Ok(ImageExit::Success) => match rate(&d) {
            Some(r) if r >= 200.0 => {
                KvmVerdict { usable: true, reason: format!("KVM probe passed (guest memset {r:.0} MiB/s)") }
            }
            r => unusable(format!(
                "KVM runs guest kernel code emulated (guest memset {:.0} MiB/s): nested software KVM",
                r.unwrap_or(0.0)
            )),
        },
        Ok(exit) => unusable(format!("KVM probe failed: {exit}")),
        Err(e) if format!("{e:#}").contains("KVM internal error") => {
            unusable("QEMU stopped on a KVM emulation failure in guest ring 0: nested software KVM".into())
        }
        Err(e) => unusable(format!("KVM probe: {}", first_line(&e))),
    }
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_string()
}

/// Picks the accelerator: `SSC_ACCEL` beats `choice`; `auto` probes KVM
/// with `probe_image` and falls back to TCG. Returns it with the reason.
pub fn resolve_accel(choice: AccelChoice, probe_image: Option<&Path>) -> Result<(Accel, String)> {
    resolve_accel_with(choice, std::env::var("SSC_ACCEL").ok().as_deref(), probe_image)
}

fn resolve_accel_with(choice: AccelChoice, env: Option<&str>, probe_image: Option<&Path>) -> Result<(Accel, String)> {
    let choice = match env {
        Some("kvm") => AccelChoice::Kvm,
        Some("tcg") => AccelChoice::Tcg,
        Some("auto") | Some("") | None => choice,
        Some(other) => bail!("SSC_ACCEL={other} is not one of kvm, tcg, auto"),
    };
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, "TCG requested".into())),
        AccelChoice::Kvm => match kvm_device() {
            Ok(()) => match cached_verdict() {
                Some(v) if !v.usable => Ok((
                    Accel::Kvm,
                    format!(
                        "KVM requested, but an earlier probe found it unusable ({}); expect a hang, or use --accel tcg",
                        v.reason
                    ),
                )),
                _ => Ok((Accel::Kvm, "KVM requested".into())),
            },
            Err(e) => bail!("KVM requested but {e}; use --accel tcg"),
        },
        AccelChoice::Auto => {
            let Some(image) = probe_image else {
                return Ok((Accel::Tcg, "no image to probe KVM with; TCG".into()));
            };
            let v = probe_kvm(image, Duration::from_secs(8));
            if v.usable {
                Ok((Accel::Kvm, v.reason))
            } else {
                Ok((Accel::Tcg, format!("{}; falling back to TCG", v.reason)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_statuses_decode_to_the_runtime_reasons() {
        let s = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(ImageExit::from_status(s(33)), ImageExit::Success);
        assert_eq!(ImageExit::from_status(s(67)), ImageExit::Failure { reason: 1 });
        assert_eq!(ImageExit::from_status(s(69)), ImageExit::Failure { reason: 2 });
        assert_eq!(ImageExit::from_status(s(1)), ImageExit::Qemu { status: 1 });
        assert_eq!(ImageExit::from_status(std::process::ExitStatus::from_raw(9)), ImageExit::Signal);
        assert!(ImageExit::Failure { reason: 3 }.to_string().contains("entropy"));
    }

    #[test]
    fn accel_override_beats_the_flag_and_bad_values_are_named() {
        let err = resolve_accel_with(AccelChoice::Auto, Some("xen"), None).unwrap_err();
        assert!(err.to_string().contains("SSC_ACCEL=xen"));
        let (a, _) = resolve_accel_with(AccelChoice::Kvm, Some("tcg"), None).unwrap();
        assert_eq!(a, Accel::Tcg);
        let (a, why) = resolve_accel_with(AccelChoice::Auto, None, None).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("no image"));
    }
}
