//! `ssc doctor`: what this machine has, what is missing and the command that
//! installs it, and which accelerator `ssc run` will use and why.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::qemu;

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Whether the project works without it (with less speed or features).
    pub optional: bool,
    pub detail: String,
    /// The command that fixes it, when not ok.
    pub fix: Option<String>,
}

fn tool_version(bin: &str, arg: &str) -> Option<String> {
    let out = Command::new(bin).arg(arg).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    Some(String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string())
}

fn tool(name: &'static str, bin: &str, arg: &str, package: &str, optional: bool, why: &str) -> Check {
    match tool_version(bin, arg) {
        Some(v) => Check { name, ok: true, optional, detail: v, fix: None },
        None => Check {
            name,
            ok: false,
            optional,
            detail: format!("{bin} not found ({why})"),
            fix: Some(format!("sudo apt-get install -y {package}")),
        },
    }
}

/// Runs every check. `probe_image` lets the KVM probe boot a real image.
pub fn run(probe_image: Option<&Path>) -> Vec<Check> {
    let mut checks = vec![
        tool("qemu", qemu::QEMU, "--version", "qemu-system-x86", false, "boots every domain"),
        tool("qemu-img", "qemu-img", "--version", "qemu-utils", false, "volumes and interop tests"),
        tool("setpriv", "setpriv", "--version", "util-linux", true, "kills QEMU if the builder dies"),
        tool("swtpm", "swtpm", "--version", "swtpm swtpm-tools", true, "per-tenant vTPMs (attestation)"),
        tool("swtpm_setup", "swtpm_setup", "--version", "swtpm-tools", true, "manufactures the TPMs (EK certificates)"),
        tool("tpm2-tools", "tpm2_checkquote", "--version", "tpm2-tools", true, "quote and event-log interop checks"),
    ];
    let host_tpm = crate::vtpm::host_state_dir();
    let made = host_tpm.join("tpm").join("tpm2-00.permall").exists();
    checks.push(Check {
        name: "host TPM",
        ok: true,
        optional: true,
        detail: match made {
            true => format!("{} (manufactured; `ssc provider profile` publishes it)", host_tpm.display()),
            false => format!("{} not made yet: the first `ssc up` with [udom0] makes it", host_tpm.display()),
        },
        fix: None,
    });
    let qboot = Path::new(qemu::QBOOT).exists();
    checks.push(Check {
        name: "qboot",
        ok: qboot,
        optional: true,
        detail: if qboot {
            format!("{} (fast PVH firmware)", qemu::QBOOT)
        } else {
            "absent: SeaBIOS boots ~50 ms slower".into()
        },
        fix: (!qboot).then(|| "sudo apt-get install -y qemu-system-data".into()),
    });
    let kvm = qemu::kvm_device();
    checks.push(Check {
        name: "/dev/kvm",
        ok: kvm.is_ok(),
        optional: true,
        detail: kvm.clone().err().unwrap_or_else(|| "present and accessible".into()),
        fix: None,
    });
    let (accel, why) = match (kvm, probe_image) {
        (Err(e), _) => ("tcg".to_string(), e),
        (Ok(()), None) => {
            ("tcg".to_string(), "no built image to probe KVM with (run `make images`, or pass --image)".into())
        }
        (Ok(()), Some(img)) => {
            let v = qemu::probe_kvm(img, std::time::Duration::from_secs(8));
            (if v.usable { "kvm" } else { "tcg" }.to_string(), v.reason)
        }
    };
    checks.push(Check { name: "accelerator", ok: true, optional: false, detail: format!("{accel}: {why}"), fix: None });
    checks
}

/// Human-readable report.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let mark = if c.ok {
            "ok  "
        } else if c.optional {
            "warn"
        } else {
            "MISS"
        };
        s.push_str(&format!("{mark}  {:<12} {}\n", c.name, c.detail));
        if let Some(f) = &c.fix {
            s.push_str(&format!("      {:<12} fix: {f}\n", ""));
        }
    }
    s
}
