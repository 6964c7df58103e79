//! The checkpoint SD with a real Linux client: save a running client's
//! memory and device state, destroy it, restore it into a fresh QEMU, and
//! watch it carry on — then the same with a delta checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::ssc::builder::{Domain, DomainSpec, LogEcho, RunDir, WindowSpec};
use qemu_tests::ssc::checkpoint::{self, SaveRequest, Stream};
use qemu_tests::*;

const MEM_MIB: u32 = 256;
const KEY: [u8; 32] = [0x3c; 32];
const CLIENT: [u8; 16] = *b"client-under-tst";
const MARKER: &str = "TMPFS-SECRET-5e21";

/// A client with its RAM in `mem` that counts forever, printing the file it
/// keeps in tmpfs with each count. `incoming`: start paused, waiting for a
/// restore.
fn client(dir: &Path, run: &RunDir, mem: &Path, incoming: bool) -> Domain {
    let (kernel, _) = client_kernel();
    let mut spec = DomainSpec::new("client", &kernel);
    spec.initrd = Some(client_initrd(
        dir,
        &format!(
            "echo {MARKER} > /tmp/f\ni=0\nwhile true; do i=$((i+1)); echo \"count $i $(cat /tmp/f)\"; sleep 0.1; done"
        ),
    ));
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = MEM_MIB;
    spec.memory_file = Some(mem.to_path_buf());
    if incoming {
        spec.extra_args.extend(["-incoming".into(), "defer".into()]);
    }
    let mut d = Domain::launch(&spec, accel(), run, LogEcho::Quiet).unwrap();
    if !incoming {
        d.wait_ready(Duration::from_secs(120)).unwrap();
    }
    d
}

/// The checkpoint SD on `disk` with a window on `mem`.
fn checkpoint_sd(run: &RunDir, mem: &Path, disk: &Path, writable: bool) -> Domain {
    let mut spec = DomainSpec::new("checkpoint", &image("checkpoint"));
    spec.disks.push(disk.to_path_buf());
    spec.windows.push(WindowSpec { file: mem.to_path_buf(), writable });
    let mut d = Domain::launch(&spec, accel(), run, LogEcho::Stdout("[checkpoint] ".into())).unwrap();
    d.wait_ready(Duration::from_secs(60)).unwrap();
    checkpoint::configure(&mut d, CLIENT, &KEY).unwrap();
    d
}

/// The highest count the client printed with its tmpfs file intact.
fn last_count(d: &Domain) -> Option<u64> {
    d.log()
        .iter()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|r| r.split_once(' '))
        .filter(|(_, f)| *f == MARKER)
        .filter_map(|(n, _)| n.parse().ok())
        .max()
}

fn wait_count(d: &Domain, above: u64) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(n) = last_count(d).filter(|&n| n > above) {
            return n;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no count above {above}:\n{}", d.log().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restores `streams` into a fresh client on `mem` and checks it counts on
/// from `saved` (the last count printed before the save).
fn restore_and_check(dir: &Path, disk: &Path, mem: &Path, streams: &[Stream], saved: u64) -> (RunDir, Domain) {
    let run = RunDir::create().unwrap();
    let client = client(dir, &run, mem, true);
    let mut sd = checkpoint_sd(&run, mem, disk, true);
    let mut reports = vec![];
    let took = checkpoint::restore(&client, &mut sd, dir, streams, &mut |d, t| reports.push((d, t))).unwrap();
    eprintln!("restore of {} stream(s) took {took:?}", streams.len());
    let read_twice: u64 = streams.iter().map(|s| 2 * s.length).sum();
    assert_progress(&reports, read_twice);
    let n = wait_count(&client, saved);
    // It continued, it did not start over: the first count after the restore
    // is the saved one plus one (the client was paused right after it).
    let first = client
        .log()
        .iter()
        .filter_map(|l| l.strip_prefix("count "))
        .find_map(|r| r.split_once(' '))
        .map(|(n, _)| n.parse::<u64>().unwrap());
    assert!(first.is_some_and(|f| f > saved && f <= saved + 2), "restored client began at {first:?}, saved at {saved}");
    assert!(n > saved);
    sd.shutdown(Duration::from_secs(10)).unwrap();
    (run, client)
}

/// The SD reported progress, growing, toward `total`.
fn assert_progress(reports: &[(u64, u64)], total: u64) {
    assert!(!reports.is_empty(), "no progress reported");
    assert!(reports.iter().all(|&(d, t)| t == total && d <= t), "{reports:?} (total {total})");
    assert!(reports.windows(2).all(|w| w[0].0 < w[1].0), "progress went backwards: {reports:?}");
}

/// Allocated KiB of a file (`du -k`).
fn allocated_kib(f: &Path) -> u64 {
    let out = std::process::Command::new("du").args(["-k", f.to_str().unwrap()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
}

fn mem_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn a_linux_client_is_saved_destroyed_and_restored_and_carries_on_also_from_a_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disk = dir.join("checkpoints.img");
    std::fs::File::create(&disk).unwrap().set_len((2 * u64::from(MEM_MIB)) << 20).unwrap();

    // 1. A running client, a full checkpoint, the client destroyed.
    let run = RunDir::create().unwrap();
    let mem1 = mem_file(dir, "client1.mem");
    let mut c1 = client(dir, &run, &mem1, false);
    wait_count(&c1, 5);
    let mut sd = checkpoint_sd(&run, &mem1, &disk, false);
    let req = SaveRequest { generation: 1, at: 0, base: &[], compress: true, leave_paused: true };
    let before = allocated_kib(&mem1);
    let mut reports = vec![];
    let full = checkpoint::save(&c1, &mem1, &mut sd, dir, req, &mut |d, t| reports.push((d, t))).unwrap();
    assert_progress(&reports, u64::from(MEM_MIB) << 20);
    assert_eq!(reports.last().map(|r| r.0), Some(u64::from(MEM_MIB) << 20), "the scan did not reach the end");
    // Holes were skipped, not read: the client's memory file did not grow.
    let after = allocated_kib(&mem1);
    assert!(after <= before + 64, "saving allocated the memory file's holes: {before} KiB -> {after} KiB");
    assert!(full.pages_read < 65536, "{full:?}");
    let saved = last_count(&c1).unwrap();
    eprintln!("full save: {full:?}");
    assert!(full.pages_stored > 1000 && full.device_state_bytes > 10_000, "{full:?}");
    sd.shutdown(Duration::from_secs(10)).unwrap();
    c1.kill();
    let file = std::fs::read(&disk).unwrap();
    assert!(!file.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "client plaintext in the checkpoint disk");
    assert!(
        std::fs::read(&mem1).unwrap().windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the marker was never in client memory: the test proves nothing"
    );

    // 2. Restored into a fresh QEMU on a fresh memory file: it carries on.
    let mem2 = mem_file(dir, "client2.mem");
    let (_run2, c2) = restore_and_check(dir, &disk, &mem2, &[full.stream], saved);

    // 3. A delta of the restored client (base re-verified by the SD), then
    //    full + delta restored into a third QEMU.
    wait_count(&c2, saved + 5);
    let run3 = RunDir::create().unwrap();
    let mut sd = checkpoint_sd(&run3, &mem2, &disk, false);
    let req =
        SaveRequest { generation: 2, at: full.stream.end(), base: &[full.stream], compress: true, leave_paused: true };
    let delta = checkpoint::save(&c2, &mem2, &mut sd, dir, req, &mut checkpoint::quiet).unwrap();
    let saved2 = last_count(&c2).unwrap();
    eprintln!("delta save: {delta:?}");
    assert!(delta.pages_stored < full.pages_stored / 2, "delta stored {} of {}", delta.pages_stored, full.pages_stored);
    sd.shutdown(Duration::from_secs(10)).unwrap();
    drop(c2);
    let mem3 = mem_file(dir, "client3.mem");
    restore_and_check(dir, &disk, &mem3, &[full.stream, delta.stream], saved2);

    // 4. A flipped byte in the delta: the restore is refused before any page
    //    is written, and the client never starts half-restored.
    let mut bytes = std::fs::read(&disk).unwrap();
    let at = (delta.stream.at + delta.stream.length / 2) as usize;
    bytes[at] ^= 0x10;
    std::fs::write(&disk, &bytes).unwrap();
    let run4 = RunDir::create().unwrap();
    let mem4 = mem_file(dir, "client4.mem");
    let c4 = client(dir, &run4, &mem4, true);
    let mut sd = checkpoint_sd(&run4, &mem4, &disk, true);
    let e = checkpoint::restore(&c4, &mut sd, dir, &[full.stream, delta.stream], &mut checkpoint::quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fails authentication"), "{e}");
    assert_eq!(c4.qmp(Duration::from_secs(5)).unwrap().status().unwrap(), "inmigrate");
    let kib = allocated_kib(&mem4);
    assert!(kib < 1024, "a refused restore wrote {kib} KiB into the client's memory");
    // The wrong key is named.
    sd.shutdown(Duration::from_secs(10)).unwrap();
    let mut sd2 = checkpoint_sd(&run4, &mem4, &disk, true);
    let ctl = sd2.control().unwrap();
    ctl.request(ssc_abi::Body::CheckpointKey { client: &CLIENT, key: &[9; 32] }, Duration::from_secs(10)).unwrap();
    let e = checkpoint::restore(&c4, &mut sd2, dir, &[full.stream], &mut checkpoint::quiet).unwrap_err().to_string();
    assert!(e.contains("wrong key"), "{e}");
    // 5. A stale checkpoint under a newer generation's name: the record says
    //    the delta's generation is at the full checkpoint's place. Authentic
    //    and consistent in itself, it is refused by name, nothing written.
    sd2.shutdown(Duration::from_secs(10)).unwrap();
    let mut sd3 = checkpoint_sd(&run4, &mem4, &disk, true);
    let stale = checkpoint::Stream { generation: delta.stream.generation, ..full.stream };
    let e = checkpoint::restore(&c4, &mut sd3, dir, &[stale], &mut checkpoint::quiet).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "given for generation {} is generation {}",
            delta.stream.generation, full.stream.generation
        )),
        "{e}"
    );
    assert_eq!(c4.qmp(Duration::from_secs(5)).unwrap().status().unwrap(), "inmigrate");
    assert!(allocated_kib(&mem4) < 1024, "a refused restore wrote into the client's memory");
}

/// Whether the running checkpoint SD of `up` has a writable memory window
/// (None: no checkpoint SD found), read off its QEMU command line.
fn checkpoint_window(up: &Up) -> Option<bool> {
    let run = format!("/{}-", up.pid());
    let pid = *pids_with_args(&[&run, "checkpoint.qmp"]).first()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let window = args.iter().find(|a| a.starts_with("memory-backend-file") && a.contains("id=win"))?;
    Some(!window.contains("readonly=on"))
}

/// Counts the client printed with its tmpfs file intact.
fn counts(up: &Up) -> Vec<u64> {
    up.stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("[client] count "))
        .filter_map(|r| r.split_once(' '))
        .filter(|(_, f)| *f == MARKER)
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

fn wait_counts(up: &Up, n: usize) {
    let what = format!("the client counting to {n} (ssc up said:\n{})", up.stderr());
    up.wait_until(&what, |_| counts(up).len() >= n || up.stderr().contains("ssc: error"));
    assert!(counts(up).len() >= n, "ssc up failed:\n{}", up.stderr());
}

/// A chain file in `dir` whose client counts with its tmpfs file, and the
/// job that makes it count; `checkpoint` is the `[checkpoint]` section body.
fn counting_chain(dir: &Path, checkpoint: &str) -> (PathBuf, PathBuf) {
    let (catalog_dir, trust) = catalog();
    let (kernel, initrd) = client_kernel();
    std::fs::write(dir.join("ck.key"), noise(64, 99).iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
    let chain = dir.join("chain.toml");
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory = {MEM_MIB}\n\
             [checkpoint]\n{checkpoint}",
            catalog_dir.display(),
            trust.display(),
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    let job = dir.join("job.sh");
    std::fs::write(
        &job,
        format!(
            "echo {MARKER} > /tmp/f\ni=0\nwhile true; do i=$((i+1)); echo \"count $i $(cat /tmp/f)\"; sleep 0.1; done\n"
        ),
    )
    .unwrap();
    (chain, job)
}

#[test]
fn ssc_checkpoint_save_and_ssc_up_restore_work_on_a_running_chain_and_refuse_a_second_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (chain, job) = counting_chain(dir, "disk = \"ckpt.img\"\nkey = \"ck.key\"\n");
    let c = chain.to_str().unwrap();
    let r = run_ssc(&["checkpoint", "save", c], Duration::from_secs(30));
    assert!(r.code() == Some(1) && r.stderr().contains("is running"), "{}", r.all());

    // Boot, save (full), stop. A save-only session's checkpoint SD gets a
    // read-only window: it cannot write the client's memory.
    let up = Up::start(dir, &["up", c, "--job", job.to_str().unwrap()], "up1");
    wait_counts(&up, 10);
    assert_eq!(checkpoint_window(&up), Some(false), "a save-only checkpoint SD got a writable window");
    let r = run_ssc(&["checkpoint", "save", c], Duration::from_secs(300));
    assert!(r.code() == Some(0) && r.stdout().contains("saved generation 1 (full)"), "{}", r.all());
    assert!(r.stderr().contains("memory scanned: 100%"), "no progress shown: {}", r.all());
    let saved = *counts(&up).iter().max().unwrap();
    up.stop();

    // Restore it: the client counts on from where it was saved (a session
    // that restores is the one that gets a writable window).
    let up = Up::start(dir, &["up", c, "--restore", "latest"], "up2");
    wait_counts(&up, 3);
    assert_eq!(checkpoint_window(&up), Some(true), "the restoring checkpoint SD could not write");
    let first = counts(&up)[0];
    assert!(first > 10 && first <= saved + 2, "restored client began at {first}, saved around {saved}");
    let r = run_ssc(&["checkpoint", "save", c], Duration::from_secs(300));
    assert!(r.code() == Some(0) && r.stdout().contains("saved generation 2 (delta of 1)"), "{}", r.all());
    up.stop();

    // Generation 1 again: refused; the list shows both.
    let r = run_ssc(&["up", c, "--restore", "1"], Duration::from_secs(60));
    assert!(r.code() == Some(1) && r.stderr().contains("--allow-rollback"), "{}", r.all());
    // A client of another memory size: refused before a page is written.
    let text = std::fs::read_to_string(&chain).unwrap().replace(&format!("memory = {MEM_MIB}"), "memory = 512");
    std::fs::write(&chain, text).unwrap();
    let r = run_ssc(&["up", c, "--restore", "2"], Duration::from_secs(120));
    assert!(r.code() == Some(1) && r.stderr().contains("memory size differs"), "{}", r.all());
    let r = run_ssc(&["checkpoint", "list", c], Duration::from_secs(30));
    assert!(
        r.stdout().contains("generation 1: full") && r.stdout().contains("generation 2: delta of [1]"),
        "{}",
        r.all()
    );
    let refused_recorded = r.stdout().lines().any(|l| l.starts_with("generation 2") && l.ends_with("restored"));
    assert!(!refused_recorded, "a refused restore was recorded:\n{}", r.stdout());
    assert!(!chain.with_extension("toml.sock").exists(), "the command socket outlived ssc up");
}

#[test]
fn checkpoints_land_through_a_storage_sd_on_an_authenticated_volume_and_tampering_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vol = dir.join("ckpt-vol.img");
    let r = run_ssc(
        &["volume", "create", vol.to_str().unwrap(), "--size", "700M", "--format", "auth", "--key-out"]
            .into_iter()
            .chain([dir.join("ckvol.key").to_str().unwrap()])
            .collect::<Vec<_>>(),
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let (chain, job) = counting_chain(dir, "disk = \"ckpt-vol.img\"\nkey = \"ck.key\"\nvolume_key = \"ckvol.key\"\n");
    let c = chain.to_str().unwrap();

    let up = Up::start(dir, &["up", c, "--job", job.to_str().unwrap()], "up1");
    wait_counts(&up, 10);
    let r = run_ssc(&["checkpoint", "save", c], Duration::from_secs(300));
    assert!(r.code() == Some(0) && r.stdout().contains("saved generation 1 (full)"), "{}", r.all());
    let saved = *counts(&up).iter().max().unwrap();
    up.stop();
    let err = std::fs::read_to_string(dir.join("up1.err")).unwrap();
    assert!(err.contains("storage-crypt-checkpoint keyed"), "{err}");
    // The storage SD committed the checkpoint volume; the tenant recorded it.
    let generation = std::fs::read_to_string(dir.join("ckvol.key.generation")).unwrap();
    assert!(generation.trim().parse::<u64>().unwrap() >= 1, "{generation}");
    // The provider's file holds neither the client's plaintext nor even the
    // sealed stream's header: the storage SD encrypted it again.
    let file = std::fs::read(&vol).unwrap();
    for needle in [MARKER.as_bytes(), b"SSCCKPT1"] {
        assert!(!file.windows(needle.len()).any(|w| w == needle), "{} on the volume", String::from_utf8_lossy(needle));
    }

    let up = Up::start(dir, &["up", c, "--restore", "latest"], "up2");
    wait_counts(&up, 3);
    let first = counts(&up)[0];
    assert!(first > 10 && first <= saved + 2, "restored client began at {first}, saved around {saved}");
    up.stop();
    let err = std::fs::read_to_string(dir.join("up2.err")).unwrap();
    assert!(err.contains("ssc up: restore (verify, then write): 100%"), "{err}");

    // A flipped byte in the stream's sectors on the volume: the storage SD
    // refuses the sector, the restore fails before the client runs.
    let mut file = std::fs::read(&vol).unwrap();
    let data = sd_storage_crypt::auth::Geometry::for_device(file.len() as u64).unwrap().data_offset;
    let at = data as usize + 4096 * 40 + 17;
    file[at] ^= 0x40;
    std::fs::write(&vol, &file).unwrap();
    let r = run_ssc(&["checkpoint", "restore", c, "1", "--allow-rollback"], Duration::from_secs(180));
    assert!(r.code() == Some(1) && r.stderr().contains("reading the checkpoint disk"), "{}", r.all());
    assert!(r.stdout().contains("failed authentication"), "{}", r.all());
}
