//! Attested launch on real QEMU and real swtpm: `ssc up` with `[udom0]`
//! boots Udom0 first and measures every launch into the meta-domain's
//! vTPM; `ssc attest` opens TLS 1.3 to Udom0 through the builder's relay
//! and verifies the host and vTPM quotes, the binding to its own session
//! and nonce, and the event log against its chain file, while a Linux
//! client writes through the storage SD, keyed by Udom0 (the builder never
//! reads the key). Then the attacks: a host profile that does not match
//! this host (host substitution), a launch the tenant did not ask for (VM
//! substitution), a man in the middle relaying the real evidence into its
//! own TLS session (diversion), a grant over another tenant's client
//! (domain violation) and a grant beyond the SD's manifest are each
//! refused by name.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu_tests::*;
use ssc_abi::attest::{GrantRequest, TenantMsg, Udom0Msg, encode_frame, take_frame};
use udom0::verify::Expectations;

fn chain(dir: &Path, extra: &str) -> PathBuf {
    let (catalog_dir, trust) = catalog();
    let (kernel, initrd) = client_kernel();
    let chain = dir.join("chain.toml");
    // Absolute client paths: the tenant side of this test plans the chain
    // in the test's own directory.
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n[udom0]\n{extra}\n[[disk]]\nvolume = \"vol.img\"\nkey = \"vol.key\"\nchain = [\"storage-crypt\"]\n",
            catalog_dir.display(),
            trust.display(),
            kernel.display(),
            initrd.display()
        ),
    )
    .unwrap();
    chain
}

fn profile(dir: &Path) -> PathBuf {
    let (_, trust) = catalog();
    let out = dir.join("profile.json");
    let r = run_ssc(
        &["provider", "profile", "--trust", trust.to_str().unwrap(), "--out", out.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "ssc provider profile: {}", r.all());
    out
}

fn wait_stderr(up: &Up, what: &str) {
    let start = Instant::now();
    while !up.stderr().contains(what) {
        assert!(start.elapsed() < Duration::from_secs(240), "timed out waiting for `{what}`:\n{}", up.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tenant's session to Udom0, opened by hand (as a tenant that does
/// not follow the rules would): attests (with no check), then sends `msg`.
fn tenant_says(chain: &Path, msg: &TenantMsg) -> Udom0Msg {
    let relay = ssc::chain_checkpoint::request(chain, "udom0 relay", &mut |_, _| {}).unwrap();
    let mut s = ssc::chain_udom0::TenantSession::connect(relay.parse().unwrap()).unwrap();
    s.send(msg).unwrap();
    s.recv().unwrap()
}

/// Diversion: a man in the middle with Udom0's own TLS code and its own
/// key faces the tenant, opens a session of its own to the real Udom0
/// through the relay, and passes the tenant's nonce in and the real
/// evidence back. The tenant cannot tell from the handshake (raw keys);
/// the binding must give it away. Returns the tenant's verdict.
fn diversion(chain: &Path, job: &Path, profile: &Path) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let real_chain = chain.to_path_buf();
    let mitm = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mut tls = udom0::tls::TlsEndpoint::generate(now).unwrap().accept().unwrap();
        let (mut inbox, mut buf) = (vec![], vec![0u8; 65536]);
        loop {
            let n = tcp.read(&mut buf).unwrap();
            assert!(n > 0, "the tenant left before asking");
            tls.feed(&buf[..n]).unwrap();
            tcp.write_all(&tls.take_outgoing()).unwrap();
            inbox.extend(tls.take_plaintext());
            if let Some(frame) = take_frame(&mut inbox).unwrap() {
                let TenantMsg::Attest { nonce } = postcard::from_bytes(&frame).unwrap() else { panic!("not Attest") };
                let relay = ssc::chain_checkpoint::request(&real_chain, "udom0 relay", &mut |_, _| {}).unwrap();
                let mut real = ssc::chain_udom0::TenantSession::connect(relay.parse().unwrap()).unwrap();
                real.send(&TenantMsg::Attest { nonce }).unwrap();
                let evidence = real.recv().unwrap();
                tls.send(&encode_frame(&evidence).unwrap()).unwrap();
                tcp.write_all(&tls.take_outgoing()).unwrap();
                return;
            }
        }
    });
    let mut s = ssc::chain_udom0::TenantSession::connect(addr).unwrap();
    let nonce = [0x42u8; 32];
    s.send(&TenantMsg::Attest { nonce }).unwrap();
    let Udom0Msg::Evidence { binding, evidence } = s.recv().unwrap() else { panic!("no evidence through the MITM") };
    mitm.join().unwrap();
    let plan = ssc::chain::plan(chain).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let with_job = ssc::chain::job_initrd(&plan, Some(job), scratch.path()).unwrap();
    let initrd = ssc::chain::client_initrd(&plan, with_job.as_deref(), scratch.path()).unwrap();
    let launches = ssc::chain_udom0::expected_launches(&plan, &initrd).unwrap();
    let host = ssc::chain_udom0::ProfileFile::read(profile).unwrap();
    let spki = s.udom0_spki();
    let ex =
        Expectations { nonce, exporter: s.exporter().unwrap(), udom0_spki: &spki, host: &host, launches: &launches };
    udom0::verify::verify(&evidence, &binding, &ex).unwrap_err().to_string()
}

fn grant(sd: &str, client: &str, permission: &str) -> TenantMsg {
    TenantMsg::Grant {
        grants: vec![GrantRequest { sd: sd.into(), client: client.into(), permission: permission.into() }],
    }
}

#[test]
fn attested_launch_provisions_through_udom0_and_attacks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vol = d.join("vol.img");
    let key = d.join("vol.key");
    let r = run_ssc(
        &["volume", "create", vol.to_str().unwrap(), "--size", "16M", "--key-out", key.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "{}", r.all());
    let c = chain(d, "");
    let cs = c.to_str().unwrap();
    let job = d.join("job.sh");
    std::fs::write(
        &job,
        "printf 'ATTESTED-WRITE' > /tmp/m\ndd if=/tmp/m of=/dev/vda bs=512 seek=100 conv=sync 2>/dev/null\nsync\n\
         dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 14; echo\necho ATTEST-JOB-WROTE\nsleep 600\n",
    )
    .unwrap();
    let js = job.to_str().unwrap();
    let prof = profile(d);
    let ps = prof.to_str().unwrap();
    // The key file is not there while `ssc up` starts: the builder never
    // reads it. Only the tenant's `ssc attest --provision` does.
    let hidden = d.join("tenant-only.key");
    std::fs::rename(&key, &hidden).unwrap();
    let up = Up::start(d, &["up", cs, "--job", js], "up");
    wait_stderr(&up, "waiting for the tenant to attest");
    std::fs::rename(&hidden, &key).unwrap();

    // Host substitution: nothing is provisioned to a host that is not the
    // published one, and the clients stay unlaunched.
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    p["pcrs"][1]["sha256"] = serde_json::Value::String("00".repeat(32));
    let bad = d.join("other-host.json");
    std::fs::write(&bad, p.to_string()).unwrap();
    let r = run_ssc(
        &["attest", cs, "--host-profile", bad.to_str().unwrap(), "--job", js, "--provision"],
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), Some(1), "{}", r.all());
    assert!(r.stdout().contains("host substitution") && r.stdout().contains("PCR 9"), "{}", r.all());
    assert!(!r.stdout().contains("provisioned through Udom0"), "{}", r.all());

    // The builder's least privilege, asked through the real Udom0: a
    // window on another tenant's client (domain violation), a permission
    // the SD's signed manifest does not declare, and a launch before the
    // SD has its key.
    let m = tenant_says(&c, &grant("storage-crypt-0", "tenant-b/client", "mem-read"));
    assert!(
        matches!(&m, Udom0Msg::Error { message } if message.contains("domain violation: `tenant-b/client`")),
        "{m:?}"
    );
    let m = tenant_says(&c, &grant("storage-crypt-0", "client", "mem-read"));
    assert!(
        matches!(&m, Udom0Msg::Error { message } if message.contains("grant beyond manifest") && message.contains("[blk-interpose]")),
        "{m:?}"
    );
    let m = tenant_says(&c, &TenantMsg::Launch);
    assert!(matches!(&m, Udom0Msg::Error { message } if message.contains("no key yet")), "{m:?}");
    assert!(!up.stderr().contains("ready with"), "the client started without the tenant:\n{}", up.stderr());

    // The happy path: verify, then the key goes tenant → Udom0 → SD, the
    // grant is checked, the client launches and writes through the SD.
    let r =
        run_ssc(&["attest", cs, "--host-profile", ps, "--job", js, "--provision", "--json"], Duration::from_secs(120));
    assert!(
        r.output.status.success(),
        "ssc attest --provision: {}\n--- ssc up ---\n{}\n{}",
        r.all(),
        up.stderr(),
        up.stdout()
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["provisioned"]["keys"], serde_json::json!(["storage-crypt-0: volume"]), "{v}");
    assert_eq!(v["provisioned"]["grants"], serde_json::json!(["storage-crypt-0 blk-interpose client"]), "{v}");
    assert_eq!(v["provisioned"]["launched"], true, "{v}");
    up.wait_until("the client's write", |o| o.contains("ATTEST-JOB-WROTE"));
    assert!(up.stdout().contains("ATTESTED-WRITE"), "the client did not read its write back:\n{}", up.stdout());
    let err = up.stderr();
    assert!(err.contains("storage-crypt-0: keyed by udom0"), "{err}");
    assert!(err.contains("granted `storage-crypt-0` blk-interpose over `client`"), "{err}");

    // Attestation at any time after: a fresh nonce and TLS session each.
    for _ in 0..2 {
        let r = run_ssc(&["attest", cs, "--host-profile", ps, "--job", js, "--json"], Duration::from_secs(120));
        assert!(r.output.status.success(), "ssc attest: {}", r.all());
        let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
        assert_eq!(v["verified"], true, "{v}");
        let parts: Vec<String> = v["launches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{}/{}/{}",
                    l["role"].as_str().unwrap(),
                    l["image"].as_str().unwrap(),
                    l["part"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            parts,
            [
                "udom0/udom0/kernel",
                "sd/storage-crypt/kernel",
                "client/client/kernel",
                "client/client/initrd",
                "client/client/cmdline"
            ]
        );
    }
    // The plain-words report.
    let r = run_ssc(&["attest", cs, "--host-profile", ps, "--job", js], Duration::from_secs(120));
    assert!(r.output.status.success() && r.stdout().contains("attestation VERIFIED"), "{}", r.all());
    assert!(r.stdout().contains("storage-crypt"), "{}", r.stdout());

    // VM substitution: the builder launched a client initramfs other than
    // the one this tenant asked for (here: another job).
    let other = d.join("other-job.sh");
    std::fs::write(&other, "echo something else\n").unwrap();
    let r = run_ssc(&["attest", cs, "--host-profile", ps, "--job", other.to_str().unwrap()], Duration::from_secs(120));
    assert_eq!(r.code(), Some(1), "{}", r.all());
    assert!(r.stdout().contains("VM substitution") && r.stdout().contains("initrd"), "{}", r.all());
    // Diversion: the real Udom0's evidence, relayed into another session.
    let verdict = diversion(&c, &job, &prof);
    assert!(verdict.contains("diversion") && verdict.contains("exporter"), "{verdict}");
    // Grants are fixed once the clients run.
    let m = tenant_says(&c, &grant("storage-crypt-0", "client", "blk-interpose"));
    assert!(matches!(&m, Udom0Msg::Error { message } if message.contains("fixed at launch")), "{m:?}");

    // The builder saw only ciphertext and served one quote per attestation.
    let err = up.stderr();
    assert_eq!(err.matches("ssc up: udom0: quote").count(), 7, "{err}");
    up.stop();
    let vol_bytes = std::fs::read(&vol).unwrap();
    assert!(!vol_bytes.windows(14).any(|w| w == b"ATTESTED-WRITE"), "plaintext reached the provider's volume");
}

#[test]
fn attestation_mistakes_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("vol.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("vol.key"), "07".repeat(64)).unwrap();
    // The relay stays on loopback.
    let c = chain(d, "listen = \"10.1.2.3:7443\"\n");
    let r = run_ssc(&["up", c.to_str().unwrap(), "--check"], Duration::from_secs(60));
    assert!(!r.output.status.success() && r.all().contains("[udom0]") && r.all().contains("loopback"), "{}", r.all());
    // No `ssc up` runs this chain.
    let c = chain(d, "");
    let prof = profile(d);
    let r =
        run_ssc(&["attest", c.to_str().unwrap(), "--host-profile", prof.to_str().unwrap()], Duration::from_secs(60));
    assert!(!r.output.status.success() && r.all().contains("no `ssc up"), "{}", r.all());
    // Not a profile.
    let r = run_ssc(&["attest", c.to_str().unwrap(), "--host-profile", c.to_str().unwrap()], Duration::from_secs(60));
    assert!(!r.output.status.success() && r.all().contains("not a host profile"), "{}", r.all());
    // A chain without [udom0] has nothing to attest.
    let (catalog_dir, trust) = catalog();
    let plain = d.join("plain.toml");
    std::fs::write(
        &plain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[[disk]]\nvolume = \"vol.img\"\nkey = \"vol.key\"\nchain = [\"storage-crypt\"]\n",
            catalog_dir.display(),
            trust.display()
        ),
    )
    .unwrap();
    let r = run_ssc(
        &["attest", plain.to_str().unwrap(), "--host-profile", prof.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(!r.output.status.success() && r.all().contains("no [udom0] section"), "{}", r.all());
}

/// A copy of the test catalog in which `checkpoint` is another validly
/// signed build (version 0.0.9, other bytes): what a provider could run in
/// place of the image the tenant chose.
fn catalog_with_another_checkpoint(dir: &Path) -> PathBuf {
    let (catalog_dir, _) = catalog();
    let out = dir.join("provider-catalog");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&catalog_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("checkpoint") {
            std::fs::copy(e.path(), out.join(&name)).unwrap();
        }
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut elf = std::fs::read(catalog_dir.join("checkpoint-0.1.0.elf")).unwrap();
    elf.extend_from_slice(b"an older build with a known hole");
    std::fs::write(bin.join("checkpoint"), elf).unwrap();
    let images = dir.join("images.toml");
    std::fs::write(
        &images,
        "[[image]]\nname = \"checkpoint\"\nbinary = \"checkpoint\"\ndescription = \"checkpoint SD\"\n\
         permissions = [\"mem-read\", \"mem-write\"]\ndisks = 1\nwindows = 1\nlinks = []\n",
    )
    .unwrap();
    ssc::catalog::build(&images, &bin, "0.0.9", &repo().join("build/publisher.pk8"), &out).unwrap();
    out
}

/// A chain with `[udom0]`, a storage SD and a checkpoint SD over `catalog`.
fn memory_chain(catalog: &Path) -> String {
    let (_, trust) = qemu_tests::catalog();
    let (kernel, initrd) = client_kernel();
    format!(
        "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[client]\nkernel = \"{}\"\ninitrd = \"{}\"\n[udom0]\n\
         [[disk]]\nvolume = \"vol.img\"\nkey = \"vol.key\"\nchain = [\"storage-crypt\"]\n\
         [checkpoint]\ndisk = \"ck.img\"\nkey = \"ck.key\"\n",
        catalog.display(),
        trust.display(),
        kernel.display(),
        initrd.display()
    )
}

#[test]
fn a_memory_sd_the_tenant_did_not_choose_is_caught_before_any_secret_goes_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (vol, key) = (d.join("vol.img"), d.join("vol.key"));
    let r = run_ssc(
        &["volume", "create", vol.to_str().unwrap(), "--size", "16M", "--key-out", key.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "{}", r.all());
    std::fs::write(d.join("ck.key"), "3c".repeat(64)).unwrap();
    let job = d.join("job.sh");
    std::fs::write(&job, "echo MEMORY-SD-JOB-RAN\nsleep 600\n").unwrap();
    let (js, prof) = (job.to_str().unwrap(), profile(d));
    let ps = prof.to_str().unwrap();
    let (catalog_dir, _) = catalog();
    // `ssc attest CHAIN` reaches the `ssc up` that runs CHAIN (its socket
    // sits beside it), so both sides use one path; what it holds is each
    // side's own chain file.
    let chain = d.join("chain.toml");
    let cs = chain.to_str().unwrap();
    let attest = || {
        run_ssc(&["attest", cs, "--host-profile", ps, "--job", js, "--provision", "--json"], Duration::from_secs(120))
    };

    // The honest builder: the checkpoint SD is in the evidence the tenant
    // checks before it provisions, and the client runs.
    std::fs::write(&chain, memory_chain(&catalog_dir)).unwrap();
    let up = Up::start(d, &["up", cs, "--job", js], "up");
    wait_stderr(&up, "waiting for the tenant to attest");
    let r = attest();
    assert!(r.output.status.success(), "ssc attest --provision: {}\n{}", r.all(), up.stderr());
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    let images: Vec<&str> = v["launches"].as_array().unwrap().iter().filter_map(|l| l["image"].as_str()).collect();
    assert!(images.contains(&"checkpoint"), "the checkpoint SD is not in the evidence: {images:?}");
    up.wait_until("the client's job", |o| o.contains("MEMORY-SD-JOB-RAN"));
    up.stop();

    // The provider runs the chain with another (older, validly signed)
    // checkpoint image. The tenant's first attestation sees it: no key is
    // provisioned and the client never starts.
    std::fs::write(&chain, memory_chain(&catalog_with_another_checkpoint(d))).unwrap();
    let up = Up::start(d, &["up", cs, "--job", js], "up2");
    wait_stderr(&up, "waiting for the tenant to attest");
    std::fs::write(&chain, memory_chain(&catalog_dir)).unwrap();
    let r = attest();
    assert_eq!(r.code(), Some(1), "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("VM substitution") && error.contains("checkpoint"), "{}", r.all());
    assert!(v["provisioned"].is_null(), "{}", r.all());
    std::thread::sleep(Duration::from_secs(2));
    assert!(!up.stdout().contains("MEMORY-SD-JOB-RAN"), "the client ran:\n{}", up.stdout());
    assert!(!up.stderr().contains("keyed by"), "a key went out:\n{}", up.stderr());
    up.stop();
}
