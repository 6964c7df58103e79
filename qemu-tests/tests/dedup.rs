//! The dedup SD with real Linux clients: two clients booted from the same
//! image, scanned through read-only memory windows; the plan is checked
//! against an independent byte-for-byte scan of the same (paused) memory
//! files, and applying it frees a client's zero pages without harming it —
//! and never punches a page written after the scan.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::ssc::builder::{Domain, DomainSpec, LogEcho, RunDir, WindowSpec};
use qemu_tests::ssc::checkpoint::allocated_extents;
use qemu_tests::ssc::dedup;
use qemu_tests::*;
use sd_dedup::{PAGE, PageRef};

const MEM_MIB: u32 = 256;

/// A checksum workload over the client's own memory: a file in tmpfs
/// checked every round, and a fresh one written and checked each round.
const JOB: &str = "mkdir -p /w; mount -t tmpfs -o size=64m tmpfs /w; cd /w
dd if=/dev/urandom of=a bs=1M count=8 2>/dev/null; sha256sum a > a.sum
i=0
while true; do
  i=$((i+1))
  if sha256sum -c a.sum >/dev/null 2>&1; then echo \"check ok $i\"; else echo \"check BAD $i\"; fi
  dd if=/dev/urandom of=b bs=64k count=32 2>/dev/null; sha256sum b > b.sum
  sha256sum -c b.sum >/dev/null 2>&1 || echo \"check BAD b $i\"
  sleep 0.2
done";

fn client(dir: &Path, run: &RunDir, name: &str, mem: &Path) -> Domain {
    let (kernel, _) = client_kernel();
    let mut spec = DomainSpec::new(name, &kernel);
    spec.initrd = Some(client_initrd(dir, JOB));
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = MEM_MIB;
    spec.memory_file = Some(mem.to_path_buf());
    let mut d = Domain::launch(&spec, accel(), run, LogEcho::Quiet).unwrap();
    d.wait_ready(Duration::from_secs(120)).unwrap();
    d
}

fn checks(d: &Domain) -> (usize, usize) {
    let log = d.log();
    (log.iter().filter(|l| l.starts_with("check ok")).count(), log.iter().filter(|l| l.contains("check BAD")).count())
}

fn wait_checks(d: &Domain, n: usize) {
    let start = Instant::now();
    while checks(d).0 < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} never passed {n} checks:\n{}",
            d.name,
            d.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The memory file's allocated pages as they are; holes read as zero
/// without being touched (reading them could allocate them).
fn read_allocated(file: &Path) -> Vec<u8> {
    let f = std::fs::File::open(file).unwrap();
    let mut m = vec![0u8; f.metadata().unwrap().len() as usize];
    for (off, len) in allocated_extents(file).unwrap() {
        f.read_exact_at(&mut m[off as usize..(off + len) as usize], off).unwrap();
    }
    m
}

#[test]
fn two_linux_clients_match_a_reference_scan_and_apply_frees_zero_pages_but_never_written_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = RunDir::create().unwrap();
    let mems: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("client{i}.mem"))).collect();
    let clients: Vec<Domain> =
        mems.iter().enumerate().map(|(i, m)| client(dir, &run, &format!("client-{i}"), m)).collect();
    for c in &clients {
        wait_checks(c, 3);
    }
    let mut spec = DomainSpec::new("dedup", &image("dedup"));
    for m in &mems {
        spec.windows.push(WindowSpec { file: m.clone(), writable: false });
    }
    let mut sd = Domain::launch(&spec, accel(), &run, LogEcho::Stdout("[dedup] ".into())).unwrap();
    sd.wait_ready(Duration::from_secs(60)).unwrap();

    // 1. Both clients paused: the SD's plan equals the reference, exactly.
    let mut qmps: Vec<_> = clients.iter().map(|c| c.qmp(Duration::from_secs(10)).unwrap()).collect();
    for q in &mut qmps {
        q.execute("stop", None).unwrap();
    }
    // The files' data extents (SEEK_DATA/SEEK_HOLE), not st_blocks: ext4
    // counts its extent-tree blocks there too and allocates them at
    // writeback, so st_blocks can move by a block under load (a CI run saw
    // it) while no hole was touched.
    let data_bytes =
        || mems.iter().map(|m| allocated_extents(m).unwrap().iter().map(|(_, len)| len).sum()).collect::<Vec<u64>>();
    let allocated = data_bytes();
    let paths: Vec<&Path> = mems.iter().map(PathBuf::as_path).collect();
    let mut reports = vec![];
    let scanned = dedup::scan(&mut sd, &paths, &mut |d, t| reports.push((d, t))).unwrap();
    let plan = &scanned.plan;
    eprintln!(
        "scan in {:?}: {} duplicate pages in {} groups, zero allocated {:?}, stats {:?}",
        scanned.sd_time,
        plan.duplicate_pages(),
        plan.groups.len(),
        plan.clients.iter().map(|c| c.zero_allocated).collect::<Vec<_>>(),
        plan.clients
    );
    assert_eq!(reports.last(), Some(&(2 * (u64::from(MEM_MIB) << 20), 2 * (u64::from(MEM_MIB) << 20))));
    let images: Vec<Vec<u8>> = mems.iter().map(|m| read_allocated(m)).collect();
    // Independent of the core: SHA-256 per page, grouped in a map.
    let (groups, zeros) = qemu_tests::ssc::bench_dedup::reference(&images);
    let mut got: Vec<Vec<PageRef>> = plan.groups.iter().map(|g| g.members.clone()).collect();
    got.sort();
    assert_eq!(got.len(), groups.len(), "group count differs from the reference");
    assert!(got == groups, "the SD's groups differ from the byte-for-byte reference");
    assert_eq!(plan.clients.iter().map(|c| c.zero_pages).collect::<Vec<_>>(), zeros);
    assert_eq!(plan.changed, 0, "nothing can change while the clients are paused");
    assert!(plan.duplicate_pages() > 1000, "two clients of one image share pages: {}", plan.duplicate_pages());
    assert!(plan.clients[1].dup_across > 1000, "{:?}", plan.clients[1]);
    // Reading the files did not allocate their holes.
    assert_eq!(allocated, data_bytes(), "scanning allocated holes of the memory files");
    drop(images);
    for q in &mut qmps {
        q.execute("cont", None).unwrap();
    }
    drop(qmps);

    // 2. Client 1's zero pages written after the scan (as a guest would):
    //    apply punches the rest and never those.
    let f1 = std::fs::OpenOptions::new().read(true).write(true).open(&mems[1]).unwrap();
    let runs1 = &plan.zero_runs[1];
    let victims: Vec<u64> = runs1.iter().rev().take(3).map(|&(first, _)| first).collect();
    assert_eq!(victims.len(), 3, "client 1 has too few zero runs: {runs1:?}");
    for &p in &victims {
        f1.write_all_at(b"written after the scan", p * PAGE as u64).unwrap();
    }
    let a1 = dedup::apply(&clients[1], &mems[1], runs1).unwrap();
    eprintln!("client 1: {a1:?}");
    assert!(a1.skipped >= 3, "{a1:?}");
    for &p in &victims {
        let mut b = [0u8; 22];
        f1.read_exact_at(&mut b, p * PAGE as u64).unwrap();
        assert_eq!(&b, b"written after the scan", "page {p} was punched although written after the scan");
    }

    // 3. Client 0: its allocated memory drops by what was punched, and its
    //    checksum workload carries on without a single bad check.
    let a0 = dedup::apply(&clients[0], &mems[0], &plan.zero_runs[0]).unwrap();
    eprintln!("client 0: {a0:?}");
    assert!(a0.punched > 100, "{a0:?}");
    assert!(a0.allocated_before - a0.allocated_after >= a0.punched * PAGE as u64, "{a0:?}");
    let (ok, _) = checks(&clients[0]);
    wait_checks(&clients[0], ok + 10);
    assert_eq!(checks(&clients[0]).1, 0, "client 0 failed a check:\n{}", clients[0].log().join("\n"));
    sd.shutdown(Duration::from_secs(10)).unwrap();
}

/// `ssc dedup scan|apply|stats` on a chain of two clients.
#[test]
fn ssc_dedup_scans_and_applies_on_a_running_chain_of_two_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (catalog_dir, trust) = catalog();
    let (kernel, initrd) = client_kernel();
    let chain = dir.join("chain.toml");
    let head = format!(
        "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory = {MEM_MIB}\n",
        catalog_dir.display(),
        trust.display(),
        kernel.display(),
        initrd.display()
    );
    let c = chain.to_str().unwrap();
    // Plans that cannot work are refused before anything starts.
    std::fs::write(&chain, format!("{head}count = 0\n[dedup]\n")).unwrap();
    let r = run_ssc(&["up", c, "--check"], Duration::from_secs(30));
    assert!(r.code() == Some(1) && r.stderr().contains("1 to 16 clients"), "{}", r.all());
    std::fs::write(&chain, format!("{head}count = 2\n[dedup]\n[checkpoint]\ndisk = \"c.img\"\nkey = \"k\"\n")).unwrap();
    std::fs::write(dir.join("k"), "00".repeat(64)).unwrap();
    let r = run_ssc(&["up", c, "--check"], Duration::from_secs(30));
    assert!(r.code() == Some(1) && r.stderr().contains("several clients work without"), "{}", r.all());

    std::fs::write(&chain, format!("{head}count = 2\n[dedup]\n")).unwrap();
    let job = dir.join("job.sh");
    std::fs::write(&job, JOB).unwrap();
    let up = Up::start(dir, &["up", c, "--job", job.to_str().unwrap()], "up");
    let oks = |out: &str, name: &str| out.lines().filter(|l| l.starts_with(&format!("[{name}] check ok"))).count();
    up.wait_until("both clients checking", |o| oks(o, "client-0") >= 3 && oks(o, "client-1") >= 3);
    let r = run_ssc(&["dedup", "stats", c], Duration::from_secs(30));
    assert!(r.code() == Some(1) && r.stderr().contains("no scan yet"), "{}", r.all());

    let r = run_ssc(&["dedup", "scan", c, "--json"], Duration::from_secs(300));
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let scan: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(scan["clients"].as_array().unwrap().len(), 2, "{scan}");
    assert!(scan["duplicate_pages"].as_u64().unwrap() > 1000, "{scan}");
    assert!(scan["clients"][1]["dup_across"].as_u64().unwrap() > 1000, "{scan}");
    assert!(r.stderr().contains("memory scanned: 100%"), "no progress: {}", r.all());

    let r = run_ssc(&["dedup", "apply", c], Duration::from_secs(300));
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stdout().contains("client-0") && r.stdout().contains("punched"), "{}", r.all());
    let r = run_ssc(&["dedup", "stats", c, "--json"], Duration::from_secs(30));
    let stats: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    for i in 0..2 {
        let a = &stats["clients"][i]["applied"];
        assert!(a["punched"].as_u64().unwrap() > 100, "{stats}");
        assert!(a["allocated_after"].as_u64().unwrap() < a["allocated_before"].as_u64().unwrap(), "{stats}");
    }
    // Both clients carry on, every check good.
    let now = up.stdout();
    let (n0, n1) = (oks(&now, "client-0"), oks(&now, "client-1"));
    up.wait_until("more checks after apply", |o| oks(o, "client-0") >= n0 + 5 && oks(o, "client-1") >= n1 + 5);
    assert!(!up.stdout().contains("check BAD"), "{}", up.stdout());
    up.stop();
}
