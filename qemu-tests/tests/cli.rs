//! The `ssc` command line, as a user runs it.

use std::time::Duration;

use qemu_tests::*;

const T: Duration = Duration::from_secs(300);

fn catalog_args() -> (String, String) {
    let (dir, key) = catalog();
    (dir.display().to_string(), key.display().to_string())
}

#[test]
fn ssc_run_boots_a_catalog_image_by_name_and_reports_success() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = selftest_disk(tmp.path());
    let sock = tmp.path().join("echo.sock");
    let data = noise(256 << 10, 7);
    let peer = echo_peer(sock.clone(), data.clone(), Duration::ZERO);
    let window = window_file(tmp.path(), "w.mem", 16 << 20);
    let (dir, key) = catalog_args();
    let r = run_ssc(
        &[
            "run",
            "selftest",
            "--catalog",
            &dir,
            "--trust",
            &key,
            "--disk",
            disk.to_str().unwrap(),
            "--link",
            &format!("echo={}", sock.display()),
            "--window",
            &format!("{}:rw", window.display()),
            "--timeout",
            "240",
        ],
        T,
    );
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let err = r.stderr();
    for want in ["selftest 0.1.0 verified", "accelerator ", "ready:", "control link verified", "image reported success"]
    {
        assert!(err.contains(want), "missing `{want}`:\n{}", r.all());
    }
    for want in
        ["PASS crypto", "PASS virtio-blk", "PASS virtio-serial echo", "selftest: PASS checks=9 skipped=0", "MiB/s"]
    {
        assert!(r.stdout().contains(want), "missing `{want}`:\n{}", r.all());
    }
    assert_eq!(peer.join().unwrap().unwrap(), data);
    assert!(window_was_written(&window), "the :rw window did not carry the write");
}

#[test]
fn ssc_run_refuses_a_truncated_image_before_starting_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(selftest_image()).unwrap();
    let cut = tmp.path().join("cut.elf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let r = run_ssc(&["run", cut.to_str().unwrap(), "--accel", "tcg"], T);
    assert_eq!(r.code(), Some(1), "{}", r.all());
    assert!(r.stderr().contains("truncated") && r.stderr().contains("make images"), "{}", r.all());
}

#[test]
fn ssc_run_names_missing_disks_existing_sockets_and_unknown_images() {
    let tmp = tempfile::tempdir().unwrap();
    let img = selftest_image();
    let r = run_ssc(&["run", img.to_str().unwrap(), "--disk", "/nonexistent/disk.img"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("/nonexistent/disk.img does not exist"), "{}", r.all());
    let taken = tmp.path().join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let r = run_ssc(&["run", img.to_str().unwrap(), "--link", &format!("up={}", taken.display())], T);
    assert!(r.code() == Some(1) && r.stderr().contains("already exists"), "{}", r.all());
    let r = run_ssc(&["run", "no-such-image"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("--catalog"), "{}", r.all());
    let (dir, key) = catalog_args();
    let r = run_ssc(&["run", "no-such-image", "--catalog", &dir, "--trust", &key], T);
    assert!(r.code() == Some(1) && r.stderr().contains("no image `no-such-image`"), "{}", r.all());
}

/// A private copy of the catalog to tamper with.
fn catalog_copy(tmp: &std::path::Path) -> std::path::PathBuf {
    let (dir, _) = catalog();
    let copy = tmp.join("catalog");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    copy
}

#[test]
fn catalog_tampering_is_refused_naming_the_image_and_the_check() {
    let (_, key) = catalog_args();
    // A flipped byte in the image.
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog_copy(tmp.path());
    let elf = std::fs::read_dir(&cat)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("selftest-"))
        .unwrap();
    let mut b = std::fs::read(&elf).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x01;
    std::fs::write(&elf, b).unwrap();
    let r = run_ssc(&["catalog", "verify", cat.to_str().unwrap(), "--trust", &key], T);
    assert!(
        r.code() == Some(1) && r.stderr().contains("image `selftest`") && r.stderr().contains("digest mismatch"),
        "{}",
        r.all()
    );
    let r = run_ssc(&["run", "selftest", "--catalog", cat.to_str().unwrap(), "--trust", &key], T);
    assert!(
        r.code() == Some(1) && r.stderr().contains("digest mismatch"),
        "a tampered image must not boot:\n{}",
        r.all()
    );
    assert!(!r.stdout().contains("PVH boot"), "QEMU was started for a tampered image:\n{}", r.all());

    // A manifest edited after signing: grant it a permission.
    let tmp = tempfile::tempdir().unwrap();
    let cat = catalog_copy(tmp.path());
    let m = cat.join("selftest.toml");
    let text = std::fs::read_to_string(&m).unwrap().replace("permissions = []", "permissions = [\"mem-write\"]");
    std::fs::write(&m, text).unwrap();
    let r = run_ssc(&["catalog", "verify", cat.to_str().unwrap(), "--trust", &key], T);
    assert!(
        r.code() == Some(1) && r.stderr().contains("image `selftest`") && r.stderr().contains("signature check failed"),
        "{}",
        r.all()
    );

    // An unknown publisher key.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other.pub");
    let r = run_ssc(
        &[
            "catalog",
            "keygen",
            "--private",
            tmp.path().join("o.pk8").to_str().unwrap(),
            "--public",
            other.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let (dir, _) = catalog_args();
    let r = run_ssc(&["catalog", "verify", &dir, "--trust", other.to_str().unwrap()], T);
    assert!(r.code() == Some(1) && r.stderr().contains("image `") && r.stderr().contains("not trusted"), "{}", r.all());
    let r = run_ssc(&["catalog", "list", &dir, "--trust", other.to_str().unwrap()], T);
    assert!(r.code() == Some(0) && r.stdout().contains("REFUSED"), "{}", r.all());
}

#[test]
fn ssc_doctor_names_the_accelerator_and_the_tools() {
    let r = run_ssc(&["doctor"], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["qemu", "swtpm", "swtpm_setup", "tpm2-tools", "host TPM", "/dev/kvm", "accelerator"] {
        assert!(r.stdout().contains(want), "missing `{want}`:\n{}", r.all());
    }
    let r = run_ssc(&["doctor", "--json"], T);
    assert!(r.stdout().trim_start().starts_with('['), "{}", r.all());
}

#[test]
fn ctrl_c_and_a_killed_builder_leave_no_qemu_and_no_sockets() {
    use std::process::{Command, Stdio};
    for signal in ["INT", "KILL"] {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join(format!("held-{signal}.sock"));
        // The echo link waits for a peer that never comes: the domain stays up.
        let mut child = Command::new(ssc_bin())
            .args(["run", selftest_image().to_str().unwrap(), "--link", &format!("echo={}", sock.display()), "--quiet"])
            .env("SSC_ACCEL", accel().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !process_with_arg_exists(&sock.display().to_string()) || !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "QEMU never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        let _ = child.wait();
        let start = std::time::Instant::now();
        while process_with_arg_exists(&sock.display().to_string()) {
            assert!(start.elapsed() < Duration::from_secs(10), "QEMU outlived the builder after SIG{signal}");
            std::thread::sleep(Duration::from_millis(50));
        }
        if signal == "INT" {
            assert!(!sock.exists(), "the link socket survived Ctrl-C");
        }
    }
}

#[test]
fn bench_boot_measures_every_image_and_prints_the_table() {
    let (dir, key) = catalog_args();
    let r = run_ssc(&["bench", "boot", "--catalog", &dir, "--trust", &key, "--runs", "1"], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let out = r.stdout();
    assert!(out.contains("| selftest |") && out.contains("Firecracker") && out.contains("| tcg |"), "{}", r.all());
}

#[test]
fn forcing_kvm_either_works_or_fails_fast_naming_the_fix() {
    let img = selftest_image();
    let r = run_ssc(&["run", img.to_str().unwrap(), "--accel", "kvm", "--timeout", "120", "--quiet"], T);
    match qemu_tests::ssc::qemu::kvm_device() {
        Err(_) => assert!(
            r.code() == Some(1) && r.stderr().contains("--accel tcg"),
            "no usable /dev/kvm must be refused with the fix:\n{}",
            r.all()
        ),
        Ok(()) if r.code() == Some(0) => {
            assert!(r.stderr().contains("image reported success"), "{}", r.all())
        }
        Ok(()) => assert!(
            r.stderr().contains("KVM internal error") && r.stderr().contains("use --accel tcg"),
            "a KVM that cannot run the image must fail naming the fix, not hang:\n{}",
            r.all()
        ),
    }
}

/// `ssc volume create DIR/vol.img` with `DIR/vol.key` (extra flags appended).
fn create_volume(dir: &std::path::Path, size: &str, extra: &[&str]) {
    let (vol, key) = (dir.join("vol.img"), dir.join("vol.key"));
    let mut args = vec!["volume", "create", vol.to_str().unwrap(), "--size", size, "--key-out", key.to_str().unwrap()];
    args.extend(extra);
    let r = run_ssc(&args, T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
}

/// Writes `dir/chain.toml` for `vol.img` with the catalog, the client, the
/// given `key = ...` value and chain list; returns its path. Line 11 is
/// `key`, line 12 `chain`.
fn write_chain(dir: &std::path::Path, keys: &str, chain: &str) -> std::path::PathBuf {
    let (catalog_dir, trust) = catalog_args();
    let (kernel, initrd) = client_kernel();
    let path = dir.join("chain.toml");
    std::fs::write(
        &path,
        format!(
            "[catalog]\npath = \"{catalog_dir}\"\ntrust = [\"{trust}\"]\n\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n\
             [[disk]]\nvolume = \"vol.img\"\nkey = {keys}\nchain = [{chain}]\n",
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn ssc_up_composes_a_chain_from_the_catalog_and_runs_a_client_job() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol.img");
    let keyfile = tmp.path().join("vol.key");
    create_volume(tmp.path(), "32M", &[]);
    let write = |chain: &str| write_chain(tmp.path(), "\"vol.key\"", chain);
    let chain = write("\"storage-crypt\"");
    let job = tmp.path().join("job.sh");
    std::fs::write(&job, "printf 'TENANT-MARKER-41c2' > /tmp/m\ndd if=/tmp/m of=/dev/vda bs=512 conv=sync\nsync\ndd if=/dev/vda bs=512 count=1 | grep -q TENANT-MARKER-41c2\n").unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["storage-crypt 0.1.0 (verified)", "keyed", "client ready", "job passed", "stopped cleanly"] {
        assert!(r.stderr().contains(want), "missing `{want}`:\n{}", r.all());
    }
    let file = std::fs::read(&vol).unwrap();
    assert!(!file.windows(18).any(|w| w == b"TENANT-MARKER-41c2"), "plaintext reached the provider's volume");

    // The wrong key is refused by the SD at open; nothing is read or written.
    let right_key = std::fs::read(&keyfile).unwrap();
    let before = std::fs::read(&vol).unwrap();
    std::fs::write(&keyfile, format!("{}\n", "ab".repeat(64))).unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert!(r.code() == Some(1) && r.stderr().contains("wrong key"), "{}", r.all());
    assert!(!r.stdout().contains("client: ssc: ready"), "the client started on a wrongly keyed volume:\n{}", r.all());
    assert!(std::fs::read(&vol).unwrap() == before, "a refused open changed the volume");
    std::fs::write(&keyfile, right_key).unwrap();

    // A failing job fails `ssc up`.
    std::fs::write(&job, "false\n").unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(1), "{}", r.all());

    // Unknown images and misfits are refused before anything starts, naming the line.
    write("\"storage-crypt-typo\"");
    let r = run_ssc(&["up", chain.to_str().unwrap()], T);
    assert!(
        r.code() == Some(1) && r.stderr().contains("chain.toml:12") && r.stderr().contains("no image"),
        "{}",
        r.all()
    );
    write("\"selftest\"");
    let r = run_ssc(&["up", chain.to_str().unwrap()], T);
    assert!(
        r.code() == Some(1)
            && r.stderr().contains("chain.toml:12")
            && r.stderr().contains("does not offer a block device"),
        "{}",
        r.all()
    );
    assert!(!r.stdout().contains("PVH boot"), "something booted for a refused chain");
}

#[test]
fn a_sequential_1_mib_read_at_depth_16_through_ssc_up_does_not_kill_the_sd() {
    // As a tenant first tried it: a 128 MiB volume, fio reading it whole.
    // The SD used to run out of memory at 24 MiB; the client got EIO.
    let tmp = tempfile::tempdir().unwrap();
    create_volume(tmp.path(), "128M", &[]);
    let chain = write_chain(tmp.path(), "\"vol.key\"", "\"storage-crypt\"");
    let job = tmp.path().join("job.sh");
    std::fs::write(
        &job,
        "fio --name=seqread --filename=/dev/vda --rw=read --bs=1M --iodepth=16 --direct=1 --ioengine=libaio \
         --output-format=terse > /tmp/fio.out\n\
         size=$(blockdev --getsize64 /dev/vda); kb=$(cut -d';' -f6 /tmp/fio.out)\n\
         echo \"fio read $kb KiB of $((size / 1024))\"\n[ \"$kb\" -eq $((size / 1024)) ]\n",
    )
    .unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["job passed", "storage-crypt-0 stopped cleanly", "fio read 130048 KiB of 130048"] {
        assert!(r.all().contains(want), "missing `{want}`:\n{}", r.all());
    }
    assert!(!r.all().contains("memory allocation") && !r.all().contains("panic"), "{}", r.all());
}

#[test]
fn an_sd_that_dies_fails_ssc_up_by_name_and_stops_its_client() {
    // The SD is killed from outside while the client uses its disk (as an
    // out-of-memory panic ended it): `ssc up` must not report success.
    let tmp = tempfile::tempdir().unwrap();
    create_volume(tmp.path(), "32M", &[]);
    let chain = write_chain(tmp.path(), "\"vol.key\"", "\"storage-crypt\"");
    let job = tmp.path().join("job.sh");
    std::fs::write(&job, "echo JOB-WAITING\nwhile true; do dd if=/dev/vda of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null || true; sleep 1; done\n").unwrap();
    let up = Up::start(tmp.path(), &["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], "up");
    up.wait_until("the client's job", |out| out.contains("JOB-WAITING"));
    let run = format!("/{}-", up.pid());
    let sd = pids_with_args(&[&run, "storage-crypt-0.qmp"]);
    assert_eq!(sd.len(), 1, "the SD's QEMU: {sd:?}");
    std::process::Command::new("kill").args(["-KILL", &sd[0].to_string()]).status().unwrap();
    let stderr_before = up.stderr();
    let code = up.wait_exit(Duration::from_secs(60));
    assert!(code.is_some_and(|c| c != 0), "ssc up exited {code:?} after its SD died:\n{stderr_before}");
    let stderr = std::fs::read_to_string(tmp.path().join("up.err")).unwrap();
    assert!(
        stderr.contains("storage-crypt-0 died") && stderr.contains("stopping the client"),
        "the death is not named:\n{stderr}"
    );
    assert!(pids_with_args(&[&run]).is_empty(), "QEMUs left running after the SD died");
}

#[test]
fn bench_storage_measures_all_five_paths_in_one_invocation() {
    let (dir, key) = catalog_args();
    let r = run_ssc(&["bench", "storage", "--catalog", &dir, "--trust", &key, "--size-mib", "64", "--runtime", "1"], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let out = r.stdout();
    for want in ["Accelerator:", "| 4k-randread |", "| 1m-write |", "IOPS", "MiB/s"] {
        assert!(out.contains(want), "missing `{want}`:\n{}", r.all());
    }
    assert!(!out.contains("| - |"), "a path produced no figure:\n{out}");
}

#[test]
fn ssc_up_keeps_an_authenticated_volume_honest_across_restarts_tampering_and_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol.img");
    let genfile = tmp.path().join("vol.key.generation");
    create_volume(tmp.path(), "32M", &["--format", "auth"]);
    let generation = || std::fs::read_to_string(&genfile).unwrap().trim().parse::<u64>().unwrap();
    assert_eq!(generation(), 1);
    let chain = write_chain(tmp.path(), "\"vol.key\"", "\"storage-crypt\"");
    let job = tmp.path().join("job.sh");
    let up = |script: &str| {
        std::fs::write(&job, script).unwrap();
        run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T)
    };
    let fio = "fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --bs=4k --size=4M \
               --verify=crc32c --verify_fatal=1 --rw=randwrite";

    // 1. Write (fio verify and a marker); the tenant's record follows the commits.
    let r = up(&format!(
        "{fio} --do_verify=1 --end_fsync=1\nprintf 'AUTH-MARKER-5d1e' > /tmp/m\n\
         dd if=/tmp/m of=/dev/vda bs=4096 seek=2000 conv=sync,fsync\n"
    ));
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stderr().contains("authenticated volume opened at generation"), "{}", r.all());
    let g1 = generation();
    assert!(g1 > 1, "the generation record did not follow the commits: {g1}");
    let file = std::fs::read(&vol).unwrap();
    assert!(!file.windows(16).any(|w| w == b"AUTH-MARKER-5d1e"), "plaintext reached the provider's volume");
    let snapshot = tmp.path().join("vol.snapshot");
    std::fs::copy(&vol, &snapshot).unwrap();

    // 2. A restarted chain verifies what the first wrote, and writes more.
    let r = up(&format!(
        "{fio} --verify_only\ndd if=/dev/vda bs=4096 skip=2000 count=1 | grep -q AUTH-MARKER-5d1e\n\
         {fio} --offset=8M --do_verify=1 --end_fsync=1\n"
    ));
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let g2 = generation();
    assert!(g2 > g1, "{g2} after {g1}");

    // 3. The provider rolls the volume back to the snapshot: refused at
    // open, nothing starts, the record is unchanged.
    let current = std::fs::read(&vol).unwrap();
    std::fs::copy(&snapshot, &vol).unwrap();
    let r = up("true\n");
    assert!(
        r.code() == Some(1) && r.stderr().contains("rolled back") && r.stderr().contains(&format!("{g2}")),
        "{}",
        r.all()
    );
    assert!(!r.stdout().contains("client: ssc: ready"), "the client started on a rolled-back volume:\n{}", r.all());
    assert_eq!(generation(), g2);
    std::fs::write(&vol, &current).unwrap();

    // 4. The provider flips one bit of data sector 100: that read fails with
    // EIO inside the client, its neighbours still read, the SD reports it.
    let geometry = sd_storage_crypt::auth::Geometry::for_device(current.len() as u64).unwrap();
    let mut tampered = current.clone();
    tampered[(geometry.data_offset + 100 * 4096 + 7) as usize] ^= 0x20;
    std::fs::write(&vol, &tampered).unwrap();
    let r = up(
        "if dd if=/dev/vda of=/dev/null bs=4096 skip=100 count=1 iflag=direct; then echo 'TAMPERED READ SUCCEEDED'; exit 1; fi\n\
         echo 'tampered sector: I/O error'\n\
         dd if=/dev/vda of=/dev/null bs=4096 skip=101 count=1 iflag=direct\n",
    );
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["tampered sector: I/O error", "integrity: sector 100 failed authentication"] {
        assert!(r.stdout().contains(want), "missing `{want}`:\n{}", r.all());
    }
    assert!(r.stderr().contains("failed authentication") && r.stderr().contains("[100"), "{}", r.all());

    // 5. The provider downgrades the volume to XTS: a version-1 header with
    // the authenticated header's salt and key check (same offsets, same
    // HMAC label, an unkeyed checksum it recomputes) opened with the
    // tenant's key and served without integrity. The tenant's record says
    // "authenticated": refused by name, nothing starts.
    let mut downgraded = current.clone();
    let v1 = sd_storage_crypt::header::VolumeHeader {
        sector_size: 4096,
        data_offset: geometry.data_offset,
        salt: current[56..88].try_into().unwrap(),
        key_check: current[88..120].try_into().unwrap(),
        id: current[120..136].try_into().unwrap(),
    };
    downgraded[..512].copy_from_slice(&v1.encode());
    std::fs::write(&vol, &downgraded).unwrap();
    let r = up("true\n");
    assert!(r.code() == Some(1) && r.stderr().contains("downgrade refused"), "{}", r.all());
    assert!(!r.stdout().contains("client: ssc: ready"), "the client started on a downgraded volume:\n{}", r.all());
}

#[test]
fn ssc_up_chains_two_storage_sds_and_the_volume_holds_both_layers() {
    use sd_storage_crypt::xts::Xts;
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol.img");
    let (inner, outer) = (tmp.path().join("vol.key"), tmp.path().join("outer.key"));
    create_volume(tmp.path(), "48M", &[]);
    let outer_key = noise(64, 4242);
    std::fs::write(&outer, outer_key.iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
    let write = |keys: &str| write_chain(tmp.path(), keys, "\"storage-crypt\", \"storage-crypt\"");
    // One key for two SDs is refused at its line before anything starts.
    let chain = write("\"vol.key\"");
    let r = run_ssc(&["up", chain.to_str().unwrap()], T);
    assert!(
        r.code() == Some(1) && r.stderr().contains("chain.toml:11") && r.stderr().contains("one key file per SD"),
        "{}",
        r.all()
    );

    write("[\"outer.key\", \"vol.key\"]");
    let job = tmp.path().join("job.sh");
    let fio = "fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --bs=4k --size=4M \
               --verify=crc32c --verify_fatal=1 --rw=randwrite";
    std::fs::write(
        &job,
        format!("{fio} --do_verify=1\nprintf 'CHAIN-MARKER-88a1' > /tmp/m\ndd if=/tmp/m of=/dev/vda bs=512 seek=40000 conv=sync,fsync\n"),
    )
    .unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["storage-crypt-0-1 keyed", "storage-crypt-0-0 keyed (raw aes-xts-plain64", "job passed"] {
        assert!(r.stderr().contains(want), "missing `{want}`:\n{}", r.all());
    }
    assert!(r.stdout().contains("the next SD's NBD export"), "{}", r.all());

    // The volume holds the inner layer's ciphertext of the outer layer's
    // ciphertext: peel both with the tenant's keys.
    let file = std::fs::read(&vol).unwrap();
    assert!(!file.windows(17).any(|w| w == b"CHAIN-MARKER-88a1"), "plaintext reached the provider's volume");
    let at = (1 << 20) + 40000 * 512;
    let mut sector = file[at..at + 512].to_vec();
    Xts::new(&sd_storage_crypt_key(&inner)).unwrap().decrypt_sector(40000, &mut sector);
    assert!(!sector.starts_with(b"CHAIN-MARKER-88a1"), "the outer SD did not encrypt");
    Xts::new(&outer_key).unwrap().decrypt_sector(40000, &mut sector);
    assert!(sector.starts_with(b"CHAIN-MARKER-88a1"), "the two layers do not peel to the client's data");

    // A restarted chain verifies what the first one wrote.
    std::fs::write(&job, format!("{fio} --verify_only\n")).unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
}

fn sd_storage_crypt_key(path: &std::path::Path) -> Vec<u8> {
    qemu_tests::ssc::chain::read_key(path).unwrap()
}

#[test]
fn ssc_up_unlocks_a_luks2_volume_made_by_ssc_volume_create_on_the_tenant_side() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol.img");
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "luks2 passphrase\n").unwrap();
    let (v, p) = (vol.to_str().unwrap(), pass.to_str().unwrap());
    let args =
        ["volume", "create", v, "--size", "48M", "--format", "luks2", "--passphrase-file", p, "--iter-time", "100"];
    let r = run_ssc(&args, T);
    assert!(r.code() == Some(0) && r.stdout().contains("LUKS2, aes-xts-plain64, 4096-byte sectors"), "{}", r.all());
    // cryptsetup, the reference, opens it with the same passphrase (no trailing newline).
    std::fs::write(tmp.path().join("pass.raw"), "luks2 passphrase").unwrap();
    let raw = tmp.path().join("pass.raw");
    let (ok, out) = peer("cryptsetup", &["open", "--test-passphrase", "--key-file", raw.to_str().unwrap(), v], T);
    assert!(ok, "cryptsetup does not open it: {out}");
    // Refusals: an existing volume, a missing passphrase file.
    let r = run_ssc(&args, T);
    assert!(r.code() == Some(1) && r.stderr().contains("must not exist yet"), "{}", r.all());
    let r = run_ssc(&["volume", "create", "x.img", "--size", "8M", "--format", "luks2"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("--passphrase-file"), "{}", r.all());
    let r = run_ssc(&["volume", "create", "x.img", "--size", "8M"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("--key-out"), "{}", r.all());
    assert!(!std::path::Path::new("x.img").exists());
    let chain = write_chain(tmp.path(), "\"unused\"", "\"storage-crypt\"");
    let text = std::fs::read_to_string(&chain).unwrap().replace("key = \"unused\"", "luks_passphrase = \"pass\"");
    std::fs::write(&chain, text).unwrap();
    let job = tmp.path().join("job.sh");
    std::fs::write(
        &job,
        "printf 'LUKS2-MARKER-17b9' > /tmp/m\ndd if=/tmp/m of=/dev/vda bs=4096 seek=100 conv=sync,fsync\n",
    )
    .unwrap();
    let r = run_ssc(&["up", chain.to_str().unwrap(), "--job", job.to_str().unwrap()], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stderr().contains("LUKS2 keyslot 0 unlocked on the tenant side (4096-byte sectors"), "{}", r.all());
    // The marker sits encrypted in the data segment, as dm-crypt would put it.
    let u = qemu_tests::ssc::luks::unlock(&vol, b"luks2 passphrase").unwrap();
    let file = std::fs::read(&vol).unwrap();
    assert!(!file.windows(17).any(|w| w == b"LUKS2-MARKER-17b9"), "plaintext reached the provider's volume");
    let at = (u.data_offset + 100 * 4096) as usize;
    let mut sector = file[at..at + 4096].to_vec();
    sd_storage_crypt::xts::Xts::new(&u.key).unwrap().decrypt_sector(100 * 8, &mut sector);
    assert!(sector.starts_with(b"LUKS2-MARKER-17b9"), "the marker is not where dm-crypt would read it");
}

#[test]
fn bench_checkpoint_measures_the_sd_beside_qemus_migration_in_one_invocation() {
    let (dir, key) = catalog_args();
    let r = run_ssc(&["bench", "checkpoint", "--catalog", &dir, "--trust", &key, "--sizes", "256"], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    let out = r.stdout();
    for want in [
        "Accelerator:",
        "SD full save",
        "SD delta save",
        "SD restore (full + delta)",
        "SD copy only",
        "QEMU stop + migrate",
        "raw copy",
    ] {
        assert!(out.contains(want), "missing `{want}`:\n{}", r.all());
    }
    let r = run_ssc(&["bench", "checkpoint", "--catalog", &dir, "--trust", &key, "--sizes", "300"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("power of two"), "{}", r.all());
}

#[test]
fn bench_dedup_measures_the_sd_beside_balloon_and_ksm_in_one_invocation() {
    let (dir, key) = catalog_args();
    let args =
        ["bench", "dedup", "--catalog", &dir, "--trust", &key, "--mib", "256", "--settle", "2", "--ksm-seconds", "3"];
    let r = run_ssc(&args, T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["Accelerator:", "dedup SD scan", "dedup SD apply", "virtio-balloon free page reporting", "KSM"] {
        assert!(r.stdout().contains(want), "missing `{want}`:\n{}", r.all());
    }
    let r = run_ssc(&["bench", "dedup", "--catalog", &dir, "--trust", &key, "--mib", "300"], T);
    assert!(r.code() == Some(1) && r.stderr().contains("power of two"), "{}", r.all());
}

#[test]
fn bench_introspect_measures_the_client_with_and_without_the_sd_and_the_core_over_its_capture() {
    let (dir, key) = catalog_args();
    let tmp = tempfile::tempdir().unwrap();
    let cap = tmp.path().to_str().unwrap();
    let args =
        ["bench", "introspect", "--catalog", &dir, "--trust", &key, "--mib", "256", "--rounds", "1", "--capture", cap];
    let r = run_ssc(&args, T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    for want in ["accelerator:", "no introspection SD", "SD booted, not scanning", "scanning at 10 Hz", "vs no SD"] {
        assert!(r.stdout().contains(want), "missing `{want}`:\n{}", r.all());
    }
    let mem = tmp.path().join("client-256M.mem");
    let r = run_ssc(&["bench", "introspect-core", "--from", mem.to_str().unwrap(), "--runs", "3"], T);
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stdout().contains("full scan") && r.stdout().contains("anchor: XXH3"), "{}", r.all());
    // ~100 processes: the workload's 90 sleeps and the rest.
    let out = r.stdout();
    let words: Vec<&str> = out.split_whitespace().collect();
    let n: u32 = words.windows(2).filter(|w| w[1] == "processes,").find_map(|w| w[0].parse().ok()).unwrap();
    assert!(n >= 100, "{}", r.all());
}
