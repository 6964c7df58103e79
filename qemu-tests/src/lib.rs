//! The harness for tests that boot real images in QEMU.
//!
//! * images and the catalog come from `make images catalog` (`make test`
//!   builds them first); a missing one fails with the command to run;
//! * the accelerator is KVM when the probe says it works, TCG otherwise;
//!   `SSC_ACCEL=tcg|kvm` forces one; the choice is printed once;
//! * every boot has a timeout; on failure the builder's error carries the
//!   last console lines and QEMU's stderr;
//! * cleanup is guaranteed by drop guards: [`ssc::builder::Domain`] stops
//!   QEMU and removes its sockets, [`ssc::builder::RunDir`] and
//!   [`tempfile::TempDir`] remove their directories, [`Cli`] kills `ssc`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ssc::qemu::{Accel, AccelChoice};

pub use ssc;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A built image.
pub fn image(name: &str) -> PathBuf {
    let p = repo().join("kernels/target/x86_64-unknown-linux-gnu/release").join(name);
    assert!(p.is_file(), "{} is missing: run `make images` (or `make test`, which builds it)", p.display());
    p
}

/// The built selftest image.
pub fn selftest_image() -> PathBuf {
    image("selftest")
}

/// Runs a host tool (a real peer: qemu-io, nbdinfo, …), killed after
/// `timeout`; returns (success, stdout + stderr).
pub fn peer(program: &str, args: &[&str], timeout: Duration) -> (bool, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let (out, _) = run_with_timeout(cmd, timeout, &format!("{program} not found: run `make deps`"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `cmd` with piped output, killed after `timeout`; returns its output
/// and whether it was killed. The pipes are drained while it runs, so a
/// chatty child never blocks on a full pipe.
fn run_with_timeout(mut cmd: Command, timeout: Duration, spawn_error: &str) -> (Output, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{spawn_error} ({e})"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !killed && start.elapsed() > timeout {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() };
    (out, killed)
}

/// The catalog folder and the trusted publisher key file.
pub fn catalog() -> (PathBuf, PathBuf) {
    let dir = repo().join("build/catalog");
    let key = repo().join("build/publisher.pub");
    assert!(dir.is_dir() && key.is_file(), "no catalog at {}: run `make catalog` (or `make test`)", dir.display());
    (dir, key)
}

/// The accelerator for this test run, probed once.
pub fn accel() -> Accel {
    static ACCEL: OnceLock<Accel> = OnceLock::new();
    *ACCEL.get_or_init(|| {
        let (a, why) = ssc::qemu::resolve_accel(AccelChoice::Auto, Some(&selftest_image())).expect("accelerator");
        eprintln!("qemu-tests: accelerator {a} ({why})");
        a
    })
}

/// The `ssc` binary (and `libssc_pkcs11.so` beside it), built on first use
/// if `cargo test` did not build them.
pub fn ssc_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
        let bin = target.join("debug/ssc");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "host-tools",
                "-p",
                "ssc-pkcs11",
                "--lib",
                "--bin",
                "ssc",
                "--bin",
                "ssc-p11bench",
            ])
            .current_dir(repo())
            .status()
            .expect("running cargo build for ssc");
        assert!(status.success() && bin.is_file(), "could not build {}", bin.display());
        bin
    })
    .clone()
}

/// The client VM built by `make client` (scripts/build-client.sh).
pub fn client_kernel() -> (PathBuf, PathBuf) {
    let dir = repo().join("build/client");
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
    assert!(k.is_file() && i.is_file(), "no client VM in {}: run `make client` (or `make test`)", dir.display());
    (k, i)
}

/// The client's initramfs with `/job.sh` appended (see
/// `ssc::chain::initrd_with_job`).
pub fn client_initrd(dir: &Path, job: &str) -> PathBuf {
    let (_, base) = client_kernel();
    let p = dir.join("initrd-job");
    ssc::chain::initrd_with_job(&base, job, &p).unwrap();
    p
}

/// First bytes of sector 0 that the selftest image expects on its disk.
pub const DISK_MARKER: &[u8] = b"SSC-SELFTEST-DISK\n";

/// A 16 MiB raw disk with the selftest marker at sector 0.
pub fn selftest_disk(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(DISK_MARKER).unwrap();
    p
}

/// A memory-window file of `size` bytes with the selftest's markers at the
/// start and the end.
pub fn window_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    use std::io::{Seek, SeekFrom};
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    f.write_all(b"SSC-SELFTEST-WINDOW\n").unwrap();
    f.seek(SeekFrom::Start(size - 8)).unwrap();
    f.write_all(b"WINDOWEN").unwrap();
    p
}

/// What the selftest writes at offset 4096 of a window.
pub const WINDOW_WRITE: &[u8] = b"GUEST-WROTE-THIS";

/// Whether the guest's write reached the window file.
pub fn window_was_written(file: &Path) -> bool {
    std::fs::read(file).unwrap()[4096..4096 + WINDOW_WRITE.len()] == *WINDOW_WRITE
}

/// The selftest's disk pattern word at `offset` (same as the image's).
pub fn pattern_word(offset: u64) -> u64 {
    let mut z = offset ^ 0x5353_4353_0000_0000;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks the 8 MiB pattern the selftest writes at 1 MiB.
pub fn disk_has_selftest_pattern(disk: &Path) -> bool {
    let data = std::fs::read(disk).unwrap();
    data[1 << 20..9 << 20]
        .chunks_exact(8)
        .enumerate()
        .all(|(i, w)| u64::from_le_bytes(w.try_into().unwrap()) == pattern_word((1 << 20) + 8 * i as u64))
}

/// Connects to an echo link as the host peer: sends an 8-byte length and
/// `data`, reads everything back, sleeping `read_pause` before each read
/// (a slow host reader). Returns what came back.
pub fn echo_peer(
    socket: PathBuf,
    data: Vec<u8>,
    read_pause: Duration,
) -> std::thread::JoinHandle<std::io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut s = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut w = s.try_clone()?;
        let payload = data.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&(payload.len() as u64).to_le_bytes())?;
            w.write_all(&payload)
        });
        let mut back = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 16 * 1024];
        while back.len() < data.len() {
            std::thread::sleep(read_pause);
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        writer.join().expect("writer thread")?;
        Ok(back)
    })
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    (0..len.div_ceil(8)).flat_map(|i| pattern_word(seed.wrapping_add(i as u64 * 8)).to_le_bytes()).take(len).collect()
}

/// A finished `ssc` invocation.
pub struct CliResult {
    pub output: Output,
}

impl CliResult {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    /// Everything it printed, for assertion messages.
    pub fn all(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.stdout(), self.stderr())
    }
}

/// Runs `ssc ARGS` with `SSC_ACCEL` set to the harness's accelerator (unless
/// ARGS choose one with `--accel`), killed after `timeout`.
pub fn run_ssc(args: &[&str], timeout: Duration) -> CliResult {
    run_ssc_env(args, &[], timeout)
}

/// [`run_ssc`] with environment variables set.
pub fn run_ssc_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> CliResult {
    let mut cmd = Command::new(ssc_bin());
    cmd.args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .env("SSC_ACCEL", if args.contains(&"--accel") { "auto".to_string() } else { accel().to_string() });
    let (output, killed) = run_with_timeout(cmd, timeout, "spawning ssc");
    let result = CliResult { output };
    assert!(!killed, "ssc {args:?} still running after {timeout:?}; killed\n{}", result.all());
    result
}

/// Whether any process's command line contains `needle`.
pub fn process_with_arg_exists(needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).map(|c| String::from_utf8_lossy(&c).contains(needle)).unwrap_or(false)
    })
}

/// The ids of processes whose command line contains every one of `needles`.
pub fn pids_with_args(needles: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            needles.iter().all(|n| cmdline.contains(n)).then_some(pid)
        })
        .collect()
}

/// `ssc ARGS` in the background (e.g. `ssc up`), its stdout and stderr in
/// files `NAME.out` / `NAME.err` in `dir`.
pub struct Up {
    child: std::process::Child,
    out: PathBuf,
    err: PathBuf,
}

impl Up {
    pub fn start(dir: &Path, args: &[&str], name: &str) -> Up {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = std::process::Command::new(ssc_bin())
            .args(args)
            .current_dir(repo())
            .env("SSC_ACCEL", accel().to_string())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Up { child, out, err }
    }

    /// The `ssc up` process id (its run directory is named after it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its exit status once it exits by itself (up to `timeout`).
    pub fn wait_exit(mut self, timeout: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        None
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits (up to 180 s) until `f(stdout)` holds; `what` names it.
    pub fn wait_until(&self, what: &str, f: impl Fn(&str) -> bool) {
        let start = std::time::Instant::now();
        while !f(&self.stdout()) {
            assert!(start.elapsed() < Duration::from_secs(180), "timed out waiting for {what}:\n{}", self.stdout());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ctrl-C, then waits for it to exit.
    pub fn stop(mut self) {
        std::process::Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Up {
    /// A test that panics must not leave its `ssc up` (and its QEMUs)
    /// running: Ctrl-C, a few seconds' grace, then kill.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
