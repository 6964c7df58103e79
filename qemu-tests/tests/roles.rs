//! Roles enforced by the kernel (issue 17): with an attested meta-domain
//! running (Udom0, a storage SD keyed through it, a Linux client writing),
//! the provider's admin — another uid, `ssc-admin`, in group
//! `ssc-provider` — lists and stops it with `ssc provider`, and can open
//! none of its run directories, QMP sockets, key links, memory files or
//! swtpm sockets. A uid outside the group is refused by the kernel (the
//! socket's mode) and, if the modes were loosened, by the builder
//! (`SO_PEERCRED`), each by name.
//!
//! Before this, provider verbs worked only under the builder's own uid, so
//! whoever could run them could also `pmemsave` Udom0 through its QMP
//! socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_tests::*;

const ADMIN: &str = "ssc-admin";

/// `ssc` as `user` (with its groups), from a copy any uid can run.
fn ssc_as(user: &str, group: &str, bin: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([&format!("--reuid={user}"), &format!("--regid={group}"), "--init-groups", "--"])
        .arg(bin)
        .args(args)
        .current_dir("/")
        .env("SSC_ACCEL", accel().to_string())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Everything under `dir`, `dir` included.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() { walk(&p, out) } else { out.push(p) }
    }
}

/// What `user` can open of `paths`: sockets are connected to, directories
/// listed, files read. Returns the ones that opened.
fn opened_as(user: &str, paths: &[PathBuf]) -> Vec<String> {
    let probe = r#"
import os, socket, stat, sys
for p in sys.argv[1:]:
    try:
        st = os.lstat(p)
    except OSError:
        continue
    try:
        if stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(p); s.close()
        elif stat.S_ISDIR(st.st_mode):
            os.listdir(p)
        else:
            with open(p, 'rb') as f: f.read(1)
        print("OPENED", p)
    except OSError:
        pass
"#;
    let out = Command::new("setpriv")
        .args([&format!("--reuid={user}"), "--init-groups", "--", "/usr/bin/python3", "-c", probe])
        .args(paths)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(out.status.success(), "the probe failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn the_roles_exist() {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(euid, 0, "the roles test switches users: run it as root");
    let id = Command::new("id").arg("-nG").arg(ADMIN).output().unwrap();
    assert!(
        id.status.success() && String::from_utf8_lossy(&id.stdout).split_whitespace().any(|g| g == "ssc-provider"),
        "user {ADMIN} in group ssc-provider is missing: run `make deps` (scripts/users.sh)"
    );
}

#[test]
fn the_provider_admin_stops_a_meta_domain_but_cannot_open_any_of_its_files() {
    the_roles_exist();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A copy of ssc that the other uids may run (the build tree may sit
    // under a private directory).
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("ssc");
    std::fs::copy(ssc_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let (catalog_dir, trust) = catalog();
    let (kernel, initrd) = client_kernel();
    let (vol, key) = (d.join("vol.img"), d.join("vol.key"));
    let r = run_ssc(
        &["volume", "create", vol.to_str().unwrap(), "--size", "16M", "--key-out", key.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "{}", r.all());
    let chain = d.join("chain.toml");
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\n[udom0]\n\
             [[disk]]\nvolume = \"vol.img\"\nkey = \"vol.key\"\nchain = [\"storage-crypt\"]\n",
            catalog_dir.display(),
            trust.display(),
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    let job = d.join("job.sh");
    std::fs::write(
        &job,
        "echo ROLES-X > /tmp/m\ndd if=/tmp/m of=/dev/vda conv=sync 2>/dev/null\nsync\necho ROLES-JOB-UP\nsleep 600\n",
    )
    .unwrap();
    let profile = d.join("profile.json");
    let r = run_ssc(
        &["provider", "profile", "--trust", trust.to_str().unwrap(), "--out", profile.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "{}", r.all());
    let (cs, js) = (chain.to_str().unwrap(), job.to_str().unwrap());
    let up = Up::start(d, &["up", cs, "--job", js], "up");
    let start = Instant::now();
    while !up.stderr().contains("waiting for the tenant to attest") {
        assert!(start.elapsed() < Duration::from_secs(240), "Udom0 did not come up:\n{}", up.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = run_ssc(
        &["attest", cs, "--host-profile", profile.to_str().unwrap(), "--job", js, "--provision"],
        Duration::from_secs(120),
    );
    assert!(r.output.status.success(), "ssc attest --provision: {}\n{}", r.all(), up.stderr());
    up.wait_until("the client's write", |o| o.contains("ROLES-JOB-UP"));

    // Every file of the meta-domain, as its builder made them.
    let base = ssc::builder::RunDir::base();
    let mut paths = vec![base.clone()];
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&format!("{}-", up.pid())) {
            walk(&e.path(), &mut paths);
        }
    }
    let kinds = |pred: &dyn Fn(&Path) -> bool| paths.iter().filter(|p| pred(p)).count();
    let is_sock = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    let named = |suffix: &'static str| move |p: &Path| p.to_string_lossy().ends_with(suffix);
    assert!(kinds(&named(".qmp")) >= 3, "QMP sockets of Udom0, the SD and the client: {paths:?}");
    assert!(kinds(&|p| p.to_string_lossy().contains("udom0-key-")) >= 1, "Udom0's key link: {paths:?}");
    assert!(kinds(&|p| p.to_string_lossy().contains("swtpm") && is_sock(p)) >= 4, "swtpm sockets: {paths:?}");
    paths.push(PathBuf::from(format!("{cs}.sock")));
    paths.push(key.clone());

    let opened = opened_as(ADMIN, &paths);
    assert!(opened.is_empty(), "the provider's admin opened: {opened:#?}");
    let opened = opened_as("nobody", &paths);
    assert!(opened.is_empty(), "nobody opened: {opened:#?}");

    // What the admin may do: list, and stop.
    let id = format!("chain-{}", up.pid());
    let (ok, text) = ssc_as(ADMIN, ADMIN, &bin, &["provider", "list", "--json"]);
    assert!(ok, "ssc provider list as {ADMIN}: {text}");
    let all: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let m = all.as_array().unwrap().iter().find(|m| m["id"] == id.as_str()).unwrap_or_else(|| panic!("{id}: {all}"));
    assert_eq!(m["attested"], true, "{m}");

    // Another uid is refused by the kernel, by name ...
    let (ok, text) = ssc_as("nobody", "nogroup", &bin, &["provider", "list"]);
    assert!(!ok && text.contains("permission denied") && text.contains("ssc-provider"), "{text}");
    let (ok, text) = ssc_as("nobody", "nogroup", &bin, &["provider", "stop", &id]);
    assert!(!ok && text.contains("permission denied") && text.contains("ssc-provider"), "{text}");
    // ... and by the builder when the modes were loosened.
    let sock = ssc::provider::dir().join(format!("{id}.sock"));
    let pdir = ssc::provider::dir();
    let (dir_mode, sock_mode) = (
        std::fs::metadata(&pdir).unwrap().permissions().mode() & 0o7777,
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777,
    );
    assert_eq!((dir_mode, sock_mode), (0o750, 0o660), "provider directory and socket");
    std::fs::set_permissions(&pdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, text) = ssc_as("nobody", "nogroup", &bin, &["provider", "stop", &id]);
    std::fs::set_permissions(&pdir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(sock_mode)).unwrap();
    assert!(!ok && text.contains("uid 65534 is not in group `ssc-provider`"), "{text}");

    let (ok, text) = ssc_as(ADMIN, ADMIN, &bin, &["provider", "stop", &id]);
    assert!(ok && text.contains("stopping"), "{text}");
    assert_eq!(up.wait_exit(Duration::from_secs(120)), Some(1));
    let err = std::fs::read_to_string(d.join("up.err")).unwrap();
    assert!(err.contains("stopped by the provider") && err.contains("storage-crypt-0 stopped cleanly"), "{err}");
}
