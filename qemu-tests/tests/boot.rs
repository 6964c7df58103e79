//! Booting images through the builder library.

use std::time::Duration;

use qemu_tests::ssc::builder::{Domain, DomainSpec, LinkSpec, LogEcho, MetaDomain, RunDir, WindowSpec};
use qemu_tests::ssc::catalog;
use qemu_tests::ssc::qemu::ImageExit;
use qemu_tests::*;

#[test]
fn selftest_passes_every_check_with_disk_control_window_and_a_slow_echo_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = selftest_disk(tmp.path());
    let sock = tmp.path().join("echo.sock");
    let data = noise(3 << 20, 42);
    let peer = echo_peer(sock.clone(), data.clone(), Duration::from_millis(2));
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("selftest", &selftest_image());
    spec.disks.push(disk.clone());
    spec.links.push(LinkSpec::listen("echo", &sock));
    // 256 MiB: a 64-bit BAR the runtime maps above 4 GiB on demand.
    let window = window_file(tmp.path(), "client.mem", 256 << 20);
    spec.windows.push(WindowSpec { file: window.clone(), writable: false });
    let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Stdout("[selftest] ".into())).unwrap();
    let ready = d.wait_ready(Duration::from_secs(60)).unwrap();
    assert!(ready.guest_boot_us > 0, "the ready line carries the guest boot time");
    let exit = d.wait_exit(Some(Duration::from_secs(240))).unwrap();
    assert_eq!(exit, ImageExit::Success, "{:#}", d.failure(exit.to_string()));
    let log = d.log().join("\n");
    assert!(log.contains("selftest: PASS checks=9 skipped=0"), "not every check ran:\n{log}");
    assert!(!window_was_written(&window), "a read-only window was written through");
    assert!(d.control_verified().is_some(), "the builder's Ping on the control link was not answered");
    let back = peer.join().unwrap().unwrap();
    assert!(back == data, "echo lost or changed data: sent {} bytes, got {}", data.len(), back.len());
    assert!(disk_has_selftest_pattern(&disk), "the pattern written by the guest is not in the disk file");
    drop(d);
    assert!(!sock.exists(), "the link socket outlived its domain");
}

#[test]
fn every_catalog_image_verifies_boots_becomes_ready_and_stops_cleanly() {
    let (dir, key) = catalog();
    let trusted = catalog::load_trusted(&[key]).unwrap();
    let images = catalog::verify(&dir, &trusted).unwrap();
    assert!(images.len() >= 2, "selftest and storage-crypt are in the catalog");
    let run_dir = RunDir::create().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for img in images {
        let m = &img.manifest.image;
        let spec = img.standalone_spec(tmp.path()).unwrap();
        let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Stdout(format!("[{}] ", m.name))).unwrap();
        d.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{}: {e:#}", m.name));
        let exit = d.shutdown(Duration::from_secs(120)).unwrap();
        assert_eq!(exit, ImageExit::Success, "{}: {:#}", m.name, d.failure(exit.to_string()));
        assert!(!d.log().iter().any(|l| l.contains(" ERROR ")), "{} logged an error", m.name);
    }
}

#[test]
fn a_failed_self_check_is_reported_with_its_reason_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("blank.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("selftest", &selftest_image());
    spec.disks.push(disk);
    let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
    let exit = d.wait_exit(Some(Duration::from_secs(240))).unwrap();
    assert_eq!(exit, ImageExit::Failure { reason: 2 });
    let err = format!("{:#}", d.failure(exit.to_string()));
    assert!(err.contains("a self-check failed"), "{err}");
    assert!(err.contains("does not start with the host's marker"), "the console tail names the failed check: {err}");
}

#[test]
fn probe_mode_reports_memset_speed_and_exits_cleanly() {
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("probe", &selftest_image());
    spec.append = "ssc.probe=1".into();
    let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
    assert_eq!(d.wait_exit(Some(Duration::from_secs(60))).unwrap(), ImageExit::Success);
    assert!(d.log().iter().any(|l| l.contains("probe ok memset_mib_s=")), "{:?}", d.log());
}

#[test]
fn a_cpu_without_rdrand_is_refused_with_the_fix() {
    let run_dir = RunDir::create().unwrap();
    let spec = DomainSpec::new("nordrand", &selftest_image());
    // Same command line as the builder's, with a CPU model lacking RDRAND/RDSEED.
    let mut args = qemu_tests::ssc::builder::qemu_args(&spec, qemu_tests::ssc::qemu::Accel::Tcg, run_dir.path());
    let cpu = args.iter().position(|a| a == "max").expect("-cpu max");
    args[cpu] = "qemu64".into();
    let out = std::process::Command::new(qemu_tests::ssc::qemu::QEMU).args(&args).output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(ImageExit::from_status(out.status), ImageExit::Failure { reason: 3 }, "{log}");
    assert!(log.contains("neither RDSEED nor RDRAND") && log.contains("-cpu max"), "{log}");
}

#[test]
fn a_meta_domain_starts_in_order_and_stops_gracefully_in_reverse() {
    let tmp = tempfile::tempdir().unwrap();
    let window = window_file(tmp.path(), "shared.mem", 1 << 20);
    let mut first = DomainSpec::new("first", &selftest_image());
    first.append = "selftest.hold=1".into();
    first.windows.push(WindowSpec { file: window.clone(), writable: true });
    let mut second = DomainSpec::new("second", &selftest_image());
    second.append = "selftest.hold=1".into();
    let meta = MetaDomain::launch(&[first, second], accel(), true, Duration::from_secs(60)).unwrap();
    let run_dir = meta.run_dir().to_path_buf();
    let [a, b] = meta.domains() else { panic!("two domains") };
    assert!(a.started() < b.started(), "start order");
    let a_ready_line = a.log().iter().position(|l| l.contains(" ssc: ready ")).expect("first was ready");
    assert!(a_ready_line < a.log().len(), "first became ready before second was spawned");
    // Wait until both finished their checks and answered the builder's Ping.
    let start = std::time::Instant::now();
    let mut meta = meta;
    while !(meta.domains().iter().all(|d| d.control_verified().is_some())
        && meta.domains().iter().all(|d| d.log().iter().any(|l| l.contains("holding"))))
    {
        for name in ["first", "second"] {
            let d = meta.domain(name).unwrap();
            assert!(d.running(), "{name} stopped early: {:#}", d.failure("exited".into()));
            let _ = d.wait_exit(Some(Duration::from_millis(200)));
        }
        assert!(start.elapsed() < Duration::from_secs(240), "domains never reached their hold loop");
    }
    let verdicts = meta.shutdown(Duration::from_secs(30));
    let names: Vec<&str> = verdicts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["second", "first"], "reverse order");
    for (name, exit) in &verdicts {
        assert_eq!(exit.as_ref().unwrap(), &ImageExit::Success, "{name} did not stop gracefully on Shutdown");
    }
    assert!(window_was_written(&window), "a writable window did not carry the guest's write to the file");
    assert!(!run_dir.exists(), "the meta-domain's run directory outlived it");
}

#[test]
fn a_panic_and_a_cpu_exception_exit_with_their_reasons_and_say_where() {
    let run_dir = RunDir::create().unwrap();
    for (mode, reason, words) in
        [("panic", 1, "panic: panicked at selftest/src/main.rs"), ("fault", 4, "CPU exception 13 (general protection)")]
    {
        let mut spec = DomainSpec::new(mode, &selftest_image());
        spec.append = format!("selftest.fail={mode}");
        let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
        let exit = d.wait_exit(Some(Duration::from_secs(60))).unwrap();
        assert_eq!(exit, ImageExit::Failure { reason }, "{mode}: {:?}", d.log());
        assert!(d.log().iter().any(|l| l.contains(words)), "{mode}: the console does not say `{words}`: {:?}", d.log());
    }
}

#[test]
fn an_image_swapped_between_measurement_and_launch_still_boots_what_was_measured() {
    // The provider swaps the image file right after the builder measured
    // it, before QEMU opens it (the builder used to hand QEMU the path).
    // QEMU must run the measured bytes, whatever the file holds by then.
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("udom0-look-alike.elf");
    std::fs::copy(image_path_for_swap(), &image).unwrap();
    let measured = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, swap) = (measured.clone(), image.clone());
    let mut meta = MetaDomain::new().unwrap();
    meta.measure_with(move |_spec, bytes| {
        seen.lock().unwrap().extend_from_slice(bytes);
        // The swap: a different file under the same name (not a PVH image).
        std::fs::write(&swap, b"\x7fELF but not the image that was measured").unwrap();
        Ok(())
    });
    let mut spec = DomainSpec::new("storage-crypt", &image);
    spec.sha384 = None;
    let d = meta.start(&spec, accel(), true, Duration::from_secs(60));
    let d = d.unwrap_or_else(|e| panic!("QEMU did not run the measured image: {e:#}"));
    assert!(d.log().iter().any(|l| l.contains("ssc: ready image=selftest")), "another image ran: {:?}", d.log());
    assert_eq!(*measured.lock().unwrap(), std::fs::read(image_path_for_swap()).unwrap(), "the measured bytes");
    assert!(std::fs::read(&image).unwrap().starts_with(b"\x7fELF but not"), "the swap did not happen");
}

/// The image the swap test measures (selftest: it needs no devices to
/// become ready).
fn image_path_for_swap() -> std::path::PathBuf {
    selftest_image()
}
