//! Booting images through the builder library.

use std::time::Duration;

use qemu_tests::ssc::builder::{Domain, DomainSpec, LinkSpec, LogEcho, RunDir};
use qemu_tests::ssc::catalog;
use qemu_tests::ssc::qemu::ImageExit;
use qemu_tests::*;

#[test]
fn selftest_passes_every_check_with_disk_control_and_a_slow_echo_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = selftest_disk(tmp.path());
    let sock = tmp.path().join("echo.sock");
    let data = noise(3 << 20, 42);
    let peer = echo_peer(sock.clone(), data.clone(), Duration::from_millis(2));
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("selftest", &selftest_image());
    spec.disks.push(disk.clone());
    spec.links.push(LinkSpec {
        name: "echo".into(),
        socket: sock.clone(),
    });
    let mut d = Domain::launch(
        &spec,
        accel(),
        &run_dir,
        LogEcho::Stdout("[selftest] ".into()),
    )
    .unwrap();
    let ready = d.wait_ready(Duration::from_secs(60)).unwrap();
    assert!(
        ready.guest_boot_us > 0,
        "the ready line carries the guest boot time"
    );
    let exit = d.wait_exit(Some(Duration::from_secs(240))).unwrap();
    assert_eq!(
        exit,
        ImageExit::Success,
        "{:#}",
        d.failure(exit.to_string())
    );
    let log = d.log().join("\n");
    assert!(
        log.contains("selftest: PASS checks=8 skipped=0"),
        "not every check ran:\n{log}"
    );
    assert!(
        d.control_verified.is_some(),
        "the builder's Ping on the control link was not answered"
    );
    let back = peer.join().unwrap().unwrap();
    assert!(
        back == data,
        "echo lost or changed data: sent {} bytes, got {}",
        data.len(),
        back.len()
    );
    assert!(
        disk_has_selftest_pattern(&disk),
        "the pattern written by the guest is not in the disk file"
    );
    drop(d);
    assert!(!sock.exists(), "the link socket outlived its domain");
}

#[test]
fn every_catalog_image_verifies_boots_and_becomes_ready() {
    let (dir, key) = catalog();
    let trusted = catalog::load_trusted(&[key]).unwrap();
    let images = catalog::verify(&dir, &trusted).unwrap();
    assert!(!images.is_empty());
    let run_dir = RunDir::create().unwrap();
    for img in images {
        let name = img.manifest.image.name.clone();
        let spec = DomainSpec::new(&name, &img.path);
        let mut d = Domain::launch(
            &spec,
            accel(),
            &run_dir,
            LogEcho::Stdout(format!("[{name}] ")),
        )
        .unwrap();
        d.wait_ready(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let exit = d.wait_exit(Some(Duration::from_secs(240))).unwrap();
        assert_eq!(
            exit,
            ImageExit::Success,
            "{name}: {:#}",
            d.failure(exit.to_string())
        );
        assert!(
            !d.log().iter().any(|l| l.contains(" ERROR ")),
            "{name} logged an error"
        );
    }
}

#[test]
fn a_failed_self_check_is_reported_with_its_reason_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("blank.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("selftest", &selftest_image());
    spec.disks.push(disk);
    let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
    let exit = d.wait_exit(Some(Duration::from_secs(240))).unwrap();
    assert_eq!(exit, ImageExit::Failure { reason: 2 });
    let err = format!("{:#}", d.failure(exit.to_string()));
    assert!(err.contains("a self-check failed"), "{err}");
    assert!(
        err.contains("does not start with the host's marker"),
        "the console tail names the failed check: {err}"
    );
}

#[test]
fn probe_mode_reports_memset_speed_and_exits_cleanly() {
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("probe", &selftest_image());
    spec.append = "ssc.probe=1".into();
    let mut d = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
    assert_eq!(
        d.wait_exit(Some(Duration::from_secs(60))).unwrap(),
        ImageExit::Success
    );
    assert!(
        d.log().iter().any(|l| l.contains("probe ok memset_mib_s=")),
        "{:?}",
        d.log()
    );
}

#[test]
fn a_cpu_without_rdrand_is_refused_with_the_fix() {
    let run_dir = RunDir::create().unwrap();
    let spec = DomainSpec::new("nordrand", &selftest_image());
    // Same command line as the builder's, with a CPU model lacking RDRAND/RDSEED.
    let mut args = qemu_tests::ssc::builder::qemu_args(
        &spec,
        qemu_tests::ssc::qemu::Accel::Tcg,
        run_dir.path(),
    );
    let cpu = args.iter().position(|a| a == "max").expect("-cpu max");
    args[cpu] = "qemu64".into();
    let out = std::process::Command::new(qemu_tests::ssc::qemu::QEMU)
        .args(&args)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        ImageExit::from_status(out.status),
        ImageExit::Failure { reason: 3 },
        "{log}"
    );
    assert!(
        log.contains("neither RDSEED nor RDRAND") && log.contains("-cpu max"),
        "{log}"
    );
}
