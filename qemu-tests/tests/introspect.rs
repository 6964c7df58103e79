//! The introspection SD against a real Linux client (Debian's cloud
//! kernel): its process list matches what the client's /proc says while
//! processes start and stop; two test rootkits built against Debian's
//! linux-headers for the same kernel (a sys_call_table hook, a task hidden
//! from the task list) are each named within a second, as is the module
//! load; a process looping on write(2) shows up in the syscall sample; a
//! profile of another build is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::*;

/// Builds the test modules against the client kernel's headers; their
/// stripped `.ko` bytes by name.
fn modules(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let kver =
        std::fs::read_to_string(repo().join("build/client/KERNEL")).expect("build/client/KERNEL: run `make client`");
    let headers = PathBuf::from(format!("/usr/src/linux-headers-{}", kver.trim()));
    assert!(headers.is_dir(), "{} is missing: run `make deps` (linux-headers-cloud-amd64)", headers.display());
    let src = dir.join("modules");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["Kbuild", "ssc_hook.c", "ssc_hide.c"] {
        std::fs::copy(repo().join("qemu-tests/modules").join(f), src.join(f)).unwrap();
    }
    let (ok, out) = peer(
        "make",
        &["-s", "-C", headers.to_str().unwrap(), &format!("M={}", src.display()), "modules"],
        Duration::from_secs(300),
    );
    assert!(ok, "building the test modules failed:\n{out}");
    ["ssc_hook", "ssc_hide"]
        .iter()
        .map(|m| {
            let ko = src.join(format!("{m}.ko"));
            let stripped = src.join(format!("{m}.stripped.ko"));
            let (ok, out) = peer(
                "strip",
                &["--strip-debug", "-o", stripped.to_str().unwrap(), ko.to_str().unwrap()],
                Duration::from_secs(30),
            );
            assert!(ok, "{out}");
            (m.to_string(), std::fs::read(&stripped).unwrap())
        })
        .collect()
}

/// Base64 in 76-character lines, as `base64 -d` in the client reads it.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(data);
    b.as_bytes().chunks(76).map(|l| std::str::from_utf8(l).expect("ascii")).collect::<Vec<_>>().join("\n")
}

/// The chain file: one client with the introspection SD.
fn chain(dir: &Path, profile: &Path) -> PathBuf {
    let (catalog_dir, trust) = catalog();
    let chain = dir.join("chain.toml");
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[client]\nmemory = 256\n[introspect]\nprofile = \"{}\"\n",
            catalog_dir.display(),
            trust.display(),
            profile.display()
        ),
    )
    .unwrap();
    chain
}

/// The job: processes that come and go, with /proc listed twice while
/// nothing changes; then each rootkit; then a write(2) loop.
fn job(mods: &BTreeMap<String, Vec<u8>>) -> String {
    let mut s = String::new();
    for (name, ko) in mods {
        s += &format!("base64 -d > /tmp/{name}.ko <<'EOF'\n{}\nEOF\n", base64(ko));
    }
    s += r#"
listing() {
  sleep 10 & W=$!
  for p in /proc/[0-9]*; do if read -r l < $p/stat; then echo "ps $l"; fi; done 2>/dev/null
  echo "PS-END $1"
  wait $W
}
sleep 1000 & A=$!
sleep 1000 & B=$!
sleep 4
listing 1
kill $A
sleep 1000 & C=$!
echo "SWAPPED $A $C"
sleep 2
listing 2
T=$(grep ' sys_call_table$' /proc/kallsyms | cut -d' ' -f1)
insmod /tmp/ssc_hook.ko table=0x$T nr=110
echo HOOKED
sleep 3
rmmod ssc_hook
echo UNHOOKED
sleep 1000 & H=$!
insmod /tmp/ssc_hide.ko pid=$H
echo "HIDDEN $H"
sleep 3
rmmod ssc_hide
kill $H $B $C
yes > /dev/null & Y=$!
echo "LOOP $Y"
sleep 10
kill $Y
echo "JOB-END"
"#;
    s
}

/// `pid → comm` from the client's `ps` lines before marker `PS-END n`.
fn client_ps(stdout: &str, n: u32) -> BTreeMap<i32, String> {
    let end = stdout.find(&format!("[client] PS-END {n}")).expect("marker");
    let start = if n == 1 { 0 } else { stdout.find(&format!("[client] PS-END {}", n - 1)).unwrap() };
    stdout[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("[client] ps "))
        .filter_map(|l| {
            let pid = l.split(' ').next()?.parse().ok()?;
            let comm = &l[l.find('(')? + 1..l.rfind(')')?];
            Some((pid, comm.to_string()))
        })
        .collect()
}

/// Workqueue workers come and go and /proc decorates their names: left out.
fn without_kworkers(m: BTreeMap<i32, String>) -> BTreeMap<i32, String> {
    m.into_iter().filter(|(_, c)| !c.starts_with("kworker")).collect()
}

/// Seconds from the first time `stdout` shows `marker` to the first time
/// `stderr` shows `alert` (polled every 20 ms; negative: the alert came
/// first).
fn detection(up: &Up, marker: &str, alert: &str) -> f64 {
    let start = Instant::now();
    let (mut seen_marker, mut seen_alert) = (None, None);
    while seen_marker.is_none() || seen_alert.is_none() {
        assert!(start.elapsed() < Duration::from_secs(240), "no `{alert}` after `{marker}`:\n{}", up.stderr());
        if seen_marker.is_none() && up.stdout().contains(marker) {
            seen_marker = Some(Instant::now());
        }
        if seen_alert.is_none() && up.stderr().contains(alert) {
            seen_alert = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (m, a) = (seen_marker.unwrap(), seen_alert.unwrap());
    if a >= m { a.duration_since(m).as_secs_f64() } else { -m.duration_since(a).as_secs_f64() }
}

fn marker_pid(stdout: &str, marker: &str) -> i32 {
    let l = stdout.lines().find_map(|l| l.strip_prefix(&format!("[client] {marker} "))).expect(marker);
    l.split(' ').next().unwrap().trim().parse().unwrap()
}

#[test]
fn a_linux_clients_processes_rootkits_and_syscalls_are_seen_from_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mods = modules(dir);
    let profile = dir.join("profile.ssc");
    let r = run_ssc(&["profile", "build", "--out", profile.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stdout().contains("451 entries"), "{}", r.all());
    let chain = chain(dir, &profile);
    let c = chain.to_str().unwrap();
    let jobf = dir.join("job.sh");
    std::fs::write(&jobf, job(&mods)).unwrap();

    let up = Up::start(dir, &["up", c, "--job", jobf.to_str().unwrap()], "up");
    up.wait_until("the client", |o| o.contains("client: ssc: ready"));
    let monitor = Up::start(dir, &["monitor", c, "--json", "--for", "240"], "monitor");

    // 1. The process list, twice, with processes started and stopped between.
    for n in 1..=2 {
        up.wait_until("a listing", |o| o.contains(&format!("[client] PS-END {n}")));
        let r = run_ssc(&["monitor", c, "--ps", "--json"], Duration::from_secs(30));
        assert_eq!(r.code(), Some(0), "{}", r.all());
        let snap: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
        let sd: BTreeMap<i32, String> = snap["Snapshot"]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["pid"].as_i64().unwrap() as i32, p["comm"].as_str().unwrap().to_string()))
            .collect();
        let client = client_ps(&up.stdout(), n);
        assert!(client.len() > 20, "{client:?}");
        let (sd, client) = (without_kworkers(sd), without_kworkers(client));
        assert_eq!(sd.keys().collect::<Vec<_>>(), client.keys().collect::<Vec<_>>(), "listing {n}: pids");
        for (pid, comm) in &sd {
            // task_struct.comm holds 15 bytes; /proc names kernel threads in full.
            let full = &client[pid];
            assert!(
                comm == full || (comm.len() == 15 && full.starts_with(comm.as_str())),
                "pid {pid}: {comm} / {full}"
            );
        }
    }
    let swapped: Vec<i32> = up
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("[client] SWAPPED "))
        .unwrap()
        .split(' ')
        .map(|p| p.trim().parse().unwrap())
        .collect();

    // 2. The syscall hook and its module, within a second, named.
    let hook = detection(&up, "[client] HOOKED", "syscall hook: sys_call_table[110] (getppid)");
    let module = detection(&up, "[client] HOOKED", "module loaded: ssc_hook");
    let err = up.stderr();
    assert!(err.contains("in module ssc_hook+0x"), "{err}");
    assert!(err.contains("expected __x64_sys_getppid+0x0"), "{err}");
    // 3. The hidden process.
    up.wait_until("hiding", |o| o.contains("[client] HIDDEN "));
    let hidden = marker_pid(&up.stdout(), "HIDDEN");
    let hid = detection(&up, "[client] HIDDEN", &format!("hidden process: pid {hidden} (sleep)"));
    eprintln!("detected after the client said so: hook {hook:.2} s, module {module:.2} s, hidden task {hid:.2} s");
    for (what, t) in [("hook", hook), ("module", module), ("hidden task", hid)] {
        assert!(t < 1.0, "{what} detected {t:.2} s after the client reported it");
    }

    // 4. The write(2) loop in the samples; process start/exit events.
    up.wait_until("the job", |o| o.contains("[client] JOB-END"));
    let looping = marker_pid(&up.stdout(), "LOOP");
    assert_eq!(up.wait_exit(Duration::from_secs(120)), Some(0));
    std::thread::sleep(Duration::from_millis(500));
    let events: Vec<serde_json::Value> =
        monitor.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    monitor.stop();
    let in_write = events.iter().any(|e| {
        e["event"]["Syscalls"]["tasks"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["pid"] == looping && t["nr"] == 1 && t["comm"] == "yes"))
    });
    assert!(in_write, "`yes` (pid {looping}) never sampled in write:\n{}", monitor_text(&events));
    let exited = |pid: i32| events.iter().any(|e| e["event"]["ProcessExit"]["pid"] == pid);
    let started = |pid: i32| events.iter().any(|e| e["event"]["ProcessStart"]["process"]["pid"] == pid);
    assert!(exited(swapped[0]) && started(swapped[1]), "{swapped:?}:\n{}", monitor_text(&events));
    assert!(events.iter().any(|e| e["event"]["SyscallRestored"]["nr"] == 110), "{}", monitor_text(&events));
    assert!(
        !events.iter().any(|e| e["event"].get("TextChanged").is_some() || e["event"].get("IdtHook").is_some()),
        "false alarms:\n{}",
        monitor_text(&events)
    );
}

fn monitor_text(events: &[serde_json::Value]) -> String {
    events.iter().map(|e| e["text"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_profile_of_another_kernel_build_is_refused_by_the_sd() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // No profile at all: refused before anything starts, with the fix.
    let chain = chain(dir, &dir.join("missing.ssc"));
    let c = chain.to_str().unwrap();
    let r = run_ssc(&["up", c, "--check"], Duration::from_secs(30));
    assert!(r.code() == Some(1) && r.stderr().contains("ssc profile build"), "{}", r.all());
    // A profile whose build id is another build's.
    let good = std::fs::read(repo().join("build/client/profile.ssc"))
        .expect("build/client/profile.ssc: run `make client` (or `ssc profile build`)");
    let mut p = sd_introspect::Profile::decode(&good).unwrap();
    p.build_id.iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(dir.join("missing.ssc"), p.encode()).unwrap();
    let jobf = dir.join("job.sh");
    std::fs::write(&jobf, "sleep 6\n").unwrap();
    let up = Up::start(dir, &["up", c, "--job", jobf.to_str().unwrap()], "up");
    assert_eq!(up.wait_exit(Duration::from_secs(240)), Some(0));
    let err = std::fs::read_to_string(dir.join("up.err")).unwrap();
    assert!(
        err.contains("cannot monitor the client: the profile is for kernel build")
            && err.contains("build a profile for the client's kernel with `ssc profile build`"),
        "{err}"
    );
}
