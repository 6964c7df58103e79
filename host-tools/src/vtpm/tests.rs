//! Real swtpm instances: quotes that tpm2_checkquote accepts, an event
//! log tpm2_eventlog reads, and the attacks the tenant's verifier catches
//! on evidence from real TPMs.

use std::process::Command;

use ssc_abi::attest::{Binding, Evidence};
use udom0::eventlog::Launch;
use udom0::tpm::AttestationKey;
use udom0::verify::{self, AttestError, Expectations, ExpectedLaunch, HostProfile};

use super::*;

fn launch(domain: &str, role: &str, image: &str) -> Launch {
    Launch::kernel(domain, role, image, "0.1.0")
}

fn expected(l: &Launch, bytes: &[u8]) -> ExpectedLaunch {
    let mut sha384 = [0u8; 48];
    sha384.copy_from_slice(ring::digest::digest(&ring::digest::SHA384, bytes).as_ref());
    ExpectedLaunch { launch: l.clone(), sha384 }
}

// Fields drop in order: the TPMs before their directory.
struct World {
    host: HostTpm,
    vtpm: Vtpm,
    profile: HostProfile,
    keys: Vec<String>,
    dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("host-state");
    let keys = vec!["ab".repeat(32)];
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let (profile, _) = host_profile(&base, &run.join("profile"), &keys).unwrap();
    let host = HostTpm::boot(&base, &run, &keys).unwrap();
    let vtpm = Vtpm::create(&base, &run.join("vtpm")).unwrap();
    World { host, vtpm, profile, keys, dir }
}

fn binding(nonce: u8) -> Binding {
    Binding { nonce: [nonce; 32], exporter: [2u8; 32], udom0_spki: udom0::tls::ed25519_spki(&[3u8; 32]) }
}

fn check(
    w: &World,
    ev: &Evidence,
    b: &Binding,
    launches: &[ExpectedLaunch],
    profile: &HostProfile,
) -> Result<verify::Verified, AttestError> {
    let ex = Expectations { nonce: [1u8; 32], exporter: [2u8; 32], udom0_spki: &b.udom0_spki, host: profile, launches };
    let _ = &w.keys;
    verify::verify(ev, b, &ex)
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
}

fn checkquote(dir: &Path, name: &str, q: &Quote, qualifying: &[u8], pcr_list: &str) -> std::process::Output {
    let ak = AttestationKey::parse(&q.ak_public).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), pem(&ak.spki_der())).unwrap();
    std::fs::write(dir.join(format!("{name}.msg")), &q.attest).unwrap();
    std::fs::write(dir.join(format!("{name}.sig")), &q.signature).unwrap();
    let values: Vec<u8> = q.pcrs.iter().flat_map(|p| p.value.clone()).collect();
    std::fs::write(dir.join(format!("{name}.pcrs")), values).unwrap();
    Command::new("tpm2_checkquote")
        .current_dir(dir)
        .args(["-u", &format!("{name}.pem"), "-m", &format!("{name}.msg"), "-s", &format!("{name}.sig")])
        .args(["-f", &format!("{name}.pcrs"), "-l", pcr_list, "-g", "sha256", "-q", &crate::catalog::hex(qualifying)])
        .output()
        .unwrap()
}

#[test]
fn real_tpm_evidence_verifies_and_interoperates_with_tpm2_tools() {
    let mut w = world();
    let (a, b) = (launch("udom0", "udom0", "udom0"), launch("sd0", "sd", "storage-crypt"));
    w.vtpm.measure(a.clone(), b"udom0 image").unwrap();
    w.vtpm.measure(b.clone(), b"storage image").unwrap();
    let bind = binding(1);
    let qd = verify::qualifying_data(&bind);
    let ev = evidence(&mut w.vtpm, &mut w.host, &qd).unwrap();
    let want = [expected(&a, b"udom0 image"), expected(&b, b"storage image")];
    let v = check(&w, &ev, &bind, &want, &w.profile).unwrap();
    assert_eq!(v.launches.len(), 2);

    // tpm2_checkquote verifies both quotes over the same bytes.
    let d = w.dir.path();
    let out = checkquote(d, "vtpm", &ev.vtpm, &qd, "sha256:9+sha384:9");
    assert!(out.status.success(), "tpm2_checkquote (vTPM): {}", String::from_utf8_lossy(&out.stderr));
    let hq = verify::host_qualifying_data(&ev.vtpm.ak_public, &qd);
    let out = checkquote(d, "host", &ev.host, &hq, "sha256:8,9,10");
    assert!(out.status.success(), "tpm2_checkquote (host): {}", String::from_utf8_lossy(&out.stderr));
    // ... and refuses a wrong nonce.
    let out = checkquote(d, "vtpm", &ev.vtpm, &[0u8; 32], "sha256:9+sha384:9");
    assert!(!out.status.success());

    // tpm2_eventlog reads the log and replays it to the quoted PCR 9.
    std::fs::write(d.join("log.bin"), &ev.event_log).unwrap();
    let out = Command::new("tpm2_eventlog").arg(d.join("log.bin")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tpm2_eventlog: {}{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("EV_IPL") && text.contains("storage-crypt"), "{text}");
    let pcr9 = crate::catalog::hex(&ev.vtpm.pcrs[0].value);
    assert!(text.to_lowercase().contains(&pcr9), "tpm2_eventlog's PCR 9 is not the quoted {pcr9}:\n{text}");
}

#[test]
fn attacks_on_real_tpm_evidence_are_named() {
    let mut w = world();
    let a = launch("udom0", "udom0", "udom0");
    w.vtpm.measure(a.clone(), b"udom0 image").unwrap();
    // VM substitution: the builder launched other bytes than the catalog's.
    w.vtpm.measure(launch("sd0", "sd", "storage-crypt"), b"a backdoored storage image").unwrap();
    let want = [expected(&a, b"udom0 image"), expected(&launch("sd0", "sd", "storage-crypt"), b"storage image")];
    let bind = binding(1);
    let ev = evidence(&mut w.vtpm, &mut w.host, &verify::qualifying_data(&bind)).unwrap();
    let e = check(&w, &ev, &bind, &want, &w.profile).unwrap_err();
    assert!(matches!(e, AttestError::VmSubstitution { index: 2, .. }), "{e}");

    // Replay: evidence for an old nonce.
    let old = binding(9);
    let ev = evidence(&mut w.vtpm, &mut w.host, &verify::qualifying_data(&old)).unwrap();
    assert_eq!(check(&w, &ev, &old, &want, &w.profile).unwrap_err(), AttestError::Replay);

    // Host substitution: a host whose builder differs from the profile.
    let mut profile = w.profile.clone();
    profile.pcrs[0].value[0] ^= 1;
    let ev = evidence(&mut w.vtpm, &mut w.host, &verify::qualifying_data(&bind)).unwrap();
    let e = check(&w, &ev, &bind, &want, &profile).unwrap_err();
    assert!(matches!(&e, AttestError::HostSubstitution(m) if m.contains("PCR 8")), "{e}");
    // ... or another host TPM altogether.
    let other = w.dir.path().join("other-host");
    let (other_profile, _) = host_profile(&other, &w.dir.path().join("other-run"), &w.keys).unwrap();
    assert_ne!(other_profile.ak_public, w.profile.ak_public);
    let e = check(&w, &ev, &bind, &want, &other_profile).unwrap_err();
    assert!(matches!(&e, AttestError::HostSubstitution(m) if m.contains("another TPM")), "{e}");
}

#[test]
fn host_attestation_key_is_stable_across_boots() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("host");
    let a = HostTpm::start(&base, &dir.path().join("a")).unwrap();
    let b = HostTpm::start(&base, &dir.path().join("b")).unwrap();
    assert_eq!(a.ak_public(), b.ak_public());
}

#[test]
fn a_missing_tpm_tool_is_named_with_its_package() {
    let e = need_tool("swtpm_setup-not-installed", "swtpm-tools").unwrap_err().to_string();
    assert!(e.contains("swtpm_setup-not-installed") && e.contains("apt-get install swtpm-tools"), "{e}");
}

#[test]
fn a_broken_host_tpm_state_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("host");
    std::fs::create_dir_all(base.join("tpm")).unwrap();
    std::fs::write(base.join("tpm/tpm2-00.permall"), b"not a TPM state").unwrap();
    let e = HostTpm::start(&base, &dir.path().join("run")).err().expect("a corrupt state must not start");
    let e = format!("{e:#}");
    assert!(e.contains("swtpm"), "{e}");
}

/// Runs `args` as `nobody`, another local user than the builder's.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(args)
        .output()
        .unwrap()
}

/// TCP sockets that process `pid` listens on (IPv4 and IPv6).
fn tcp_listeners_of(pid: u32) -> Vec<String> {
    let ours: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let mut found = vec![];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for l in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| ours.iter().any(|o| o == i)) {
                found.push(format!("{table} {}", f[1]));
            }
        }
    }
    found
}

#[test]
fn another_local_user_cannot_save_or_reset_the_host_tpm() {
    use std::os::unix::fs::PermissionsExt;
    assert!(rustix::process::geteuid().is_root(), "this attack test switches to `nobody`: run it as root");
    let dir = tempfile::tempdir().unwrap();
    // Only the builder's own directories may keep the attacker out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let base = dir.path().join("host-state");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o711)).unwrap();
    let keys = vec!["ab".repeat(32)];
    let mut host = HostTpm::boot(&base, &run, &keys).unwrap();
    let before = host.quote(&[7u8; 32]).unwrap().pcrs;

    // swtpm itself listens on no TCP port at all.
    let swtpm = &host.tpm.swtpm;
    assert_eq!(tcp_listeners_of(swtpm.child.id()), Vec::<String>::new(), "swtpm listens on TCP");

    let port = swtpm.gate.port();
    let ctrl_port = format!("127.0.0.1:{}", port + 1);
    let stolen = std::env::temp_dir().join(format!("ssc-stolen-tpm-{}", std::process::id()));
    let _ = std::fs::remove_file(&stolen);
    let state = run.join("host-tpm");
    let (stolen_s, tcti) = (stolen.display().to_string(), format!("swtpm:host=127.0.0.1,port={port}"));
    let path = |p: PathBuf| p.display().to_string();
    let attacks: Vec<(&str, Vec<String>)> = [
        (
            "save the permanent state through the control port",
            vec!["swtpm_ioctl", "--tcp", &ctrl_port, "--save", "permanent", &stolen_s],
        ),
        ("reset the TPM (and its PCRs) through the control port", vec!["swtpm_ioctl", "--tcp", &ctrl_port, "-i"]),
        ("read PCRs through the TPM port", vec!["tpm2_pcrread", "-T", &tcti, "sha256:8"]),
        (
            "save the permanent state through the unix control socket",
            vec!["swtpm_ioctl", "--unix", &path(state.join("swtpm-ctrl.sock")), "--save", "permanent", &stolen_s],
        ),
        ("copy the persistent state", vec!["cat", &path(base.join("tpm/tpm2-00.permall"))]),
        ("copy the run's state", vec!["cat", &path(state.join("tpm2-00.permall"))]),
        ("read the local CA's key", vec!["cat", &path(base.join("localca/signkey.pem"))]),
    ]
    .into_iter()
    .map(|(what, args)| (what, args.into_iter().map(String::from).collect()))
    .collect();
    for (what, args) in &attacks {
        let out = as_nobody(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            !out.status.success() && out.stdout.len() < 64,
            "`nobody` could {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(std::fs::metadata(&stolen).map(|m| m.len() == 0).unwrap_or(true), "the TPM state reached {stolen:?}");
    let _ = std::fs::remove_file(&stolen);
    assert!(host.tpm.swtpm.gate.refused() >= 3, "the gate saw the TCP attempts");

    // The builder's own TPM is untouched and still serves it.
    assert_eq!(host.quote(&[7u8; 32]).unwrap().pcrs, before, "the host PCRs changed under the attack");
}
