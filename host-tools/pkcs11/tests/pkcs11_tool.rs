//! The module under OpenSC's `pkcs11-tool` and checked by `openssl`, with
//! DomC's core served on a unix socket on the host (the QEMU tests run the
//! same tools inside a client VM against the real DomC image).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use sd_hsm::Hsm;
use ssc_abi::hsm::{AdminOp, AdminReply, HsmDecoder, KeyMaterial, MAGIC, Usage};

const PIN: &str = "4321";

fn module() -> PathBuf {
    // target/debug/deps/pkcs11_tool-… → target/debug/libssc_pkcs11.so
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("libssc_pkcs11.so")
}

/// DomC's core on a unix socket, one connection at a time.
fn serve(dir: &Path) -> (String, Arc<Mutex<Hsm>>) {
    let sock = dir.join("hsm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut hsm = Hsm::new("DomC-test", "0123456789abcdef");
    assert_eq!(hsm.admin(AdminOp::SetPin { pin: PIN.into() }, 0), AdminReply::Ok);
    // Nobody streams this DomC's audit log (`ssc up` does for a real one):
    // a benchmark's worth of entries must not block it.
    assert_eq!(hsm.admin(AdminOp::AuditWhenFull { block: false }, 0), AdminReply::Ok);
    let rsa = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sd-hsm/testdata/rsa2048.pk8")).unwrap();
    let op = AdminOp::Import {
        label: "rsa".into(),
        id: vec![0x52],
        usage: Usage::GENERAL,
        material: KeyMaterial::Pkcs8(rsa),
    };
    assert!(matches!(hsm.admin(op, 0), AdminReply::Key(_)));
    let hsm = Arc::new(Mutex::new(hsm));
    let h = hsm.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut d = HsmDecoder::new();
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                d.feed(&buf[..n]);
                while let Some(p) = d.next_payload() {
                    let reply = h.lock().unwrap().client_frame(&p, 0);
                    let mut out = MAGIC.to_vec();
                    out.extend_from_slice(&(reply.len() as u32).to_le_bytes());
                    out.extend_from_slice(&reply);
                    let _ = conn.write_all(&out);
                }
            }
        }
    });
    (format!("unix:{}", sock.display()), hsm)
}

fn tool(port: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module())
        .args(args)
        .env("SSC_HSM_PORT", port)
        .output()
        .expect("pkcs11-tool (apt install opensc; `make deps`)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn ok(port: &str, args: &[&str]) -> String {
    let (good, text) = tool(port, args);
    assert!(good, "pkcs11-tool {args:?} failed:\n{text}");
    text
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn pkcs11_tool_generates_signs_and_openssl_verifies() {
    let dir = tempdir();
    let (port, hsm) = serve(&dir);
    let d = |f: &str| dir.join(f).display().to_string();
    let list = ok(&port, &["-L"]);
    assert!(list.contains("DomC-test"), "{list}");
    assert!(ok(&port, &["-M"]).contains("ECDSA-SHA256"));
    // Objects need the PIN; a wrong one is refused.
    let (good, text) = tool(&port, &["--login", "--pin", "9999", "-O"]);
    assert!(!good && text.contains("CKR_PIN_INCORRECT"), "{text}");
    ok(
        &port,
        &["--login", "--pin", PIN, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "web"],
    );
    ok(
        &port,
        &["--login", "--pin", PIN, "--keypairgen", "--key-type", "EC:edwards25519", "--id", "02", "--label", "ed"],
    );
    let objects = ok(&port, &["--login", "--pin", PIN, "-O"]);
    assert!(objects.contains("label:      web") && objects.contains("EC_POINT"), "{objects}");
    std::fs::write(d("data"), b"sign me, DomC").unwrap();
    // ECDSA P-256 with SHA-256, DER signature, verified by openssl with the
    // public key read back through the module.
    ok(&port, &["--read-object", "--type", "pubkey", "--id", "01", "-o", &d("ec.der")]);
    ok(
        &port,
        &[
            "--login",
            "--pin",
            PIN,
            "--sign",
            "--id",
            "01",
            "-m",
            "ECDSA-SHA256",
            "--signature-format",
            "openssl",
            "-i",
            &d("data"),
            "-o",
            &d("ec.sig"),
        ],
    );
    let (good, text) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &d("ec.der"),
        "-keyform",
        "DER",
        "-signature",
        &d("ec.sig"),
        &d("data"),
    ]);
    assert!(good && text.contains("Verified OK"), "{text}");
    // RSA (imported by the tenant): PKCS#1 v1.5 and PSS.
    ok(&port, &["--read-object", "--type", "pubkey", "--id", "52", "-o", &d("rsa.der")]);
    ok(
        &port,
        &[
            "--login",
            "--pin",
            PIN,
            "--sign",
            "--id",
            "52",
            "-m",
            "SHA256-RSA-PKCS",
            "-i",
            &d("data"),
            "-o",
            &d("rsa.sig"),
        ],
    );
    let (good, text) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &d("rsa.der"),
        "-keyform",
        "DER",
        "-signature",
        &d("rsa.sig"),
        &d("data"),
    ]);
    assert!(good && text.contains("Verified OK"), "{text}");
    ok(
        &port,
        &[
            "--login",
            "--pin",
            PIN,
            "--sign",
            "--id",
            "52",
            "-m",
            "SHA256-RSA-PKCS-PSS",
            "--salt-len",
            "32",
            "-i",
            &d("data"),
            "-o",
            &d("pss.sig"),
        ],
    );
    let (good, text) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        &d("rsa.der"),
        "-keyform",
        "DER",
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:32",
        "-signature",
        &d("pss.sig"),
        &d("data"),
    ]);
    assert!(good && text.contains("Verified OK"), "{text}");
    // Ed25519.
    ok(&port, &["--login", "--pin", PIN, "--sign", "--id", "02", "-m", "EDDSA", "-i", &d("data"), "-o", &d("ed.sig")]);
    ok(&port, &["--read-object", "--type", "pubkey", "--id", "02", "-o", &d("ed.pem")]);
    let (good, text) = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        &d("ed.pem"),
        "-rawin",
        "-in",
        &d("data"),
        "-sigfile",
        &d("ed.sig"),
    ]);
    assert!(good && text.contains("Signature Verified Successfully"), "{text}");
    // OpenSSL through libp11's engine: a certificate signed with the RSA
    // key that lives in DomC. libp11 0.4.12 (Debian 12) gives up listing
    // keys at the first Ed25519 key, so that one goes first (and
    // C_DestroyObject is exercised).
    ok(&port, &["--login", "--pin", PIN, "--delete-object", "--type", "privkey", "--id", "02"]);
    assert!(!ok(&port, &["--login", "--pin", PIN, "-O"]).contains("EC_EDWARDS"));
    let key = format!("pkcs11:id=%52;type=private;pin-value={PIN}");
    let out = Command::new("openssl")
        .args(["req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine", "-key", &key])
        .args(["-subj", "/CN=domc", "-days", "1", "-out", &d("cert.pem")])
        .env("PKCS11_MODULE_PATH", std::env::var("SPY_MODULE").map(PathBuf::from).unwrap_or_else(|_| module()))
        .env("PKCS11SPY", module())
        .env("SSC_HSM_PORT", &port)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (good, text) = openssl(&["verify", "-CAfile", &d("cert.pem"), &d("cert.pem")]);
    assert!(good, "{text}");
    // Random bytes and the mechanism test suite of pkcs11-tool.
    ok(&port, &["--generate-random", "64", "-o", &d("rnd")]);
    assert_eq!(std::fs::metadata(d("rnd")).unwrap().len(), 64);
    // Everything above is in the audit log, and the chain verifies.
    let h = hsm.lock().unwrap();
    let page = h.audit.page(0, 256);
    sd_hsm::audit::verify(&page.entries, Some(page.head)).unwrap();
    assert!(page.entries.iter().any(|e| e.op == "sign" && e.outcome == "ok"));
    assert!(page.entries.iter().any(|e| e.op == "login" && e.outcome.contains("wrong PIN")));
}

/// Eight threads, a session each, requests in flight together through one
/// link: every algorithm, and AES-GCM (C_GenerateKey, C_Encrypt,
/// C_Decrypt, a tampered ciphertext refused) through `cryptoki`.
#[test]
fn threads_with_their_own_sessions_share_the_link() {
    let dir = tempdir();
    let (port, hsm) = serve(&dir);
    let bench = env!("CARGO_BIN_EXE_ssc-p11bench");
    let out = Command::new(bench)
        .args([
            module().to_str().unwrap(),
            PIN,
            "0.3",
            "1,8",
            "ecdsa-p256",
            "ecdsa-p256-sha256",
            "ed25519",
            "rsa2048",
            "aes-gcm",
        ])
        .env("SSC_HSM_PORT", &port)
        .output()
        .expect("ssc-p11bench (cargo build -p ssc-pkcs11 --bins)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("p11bench ")).collect();
    assert_eq!(lines.len(), 10, "{text}");
    for l in lines {
        let ops: u64 = l.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert!(ops > 0, "{l}");
    }
    let h = hsm.lock().unwrap();
    // The only refusals: each AES thread's deliberately tampered ciphertext.
    assert_eq!(h.stats.refused, 1 + 8, "{:?}", h.stats);
}

#[test]
fn a_second_process_on_the_port_after_a_logged_in_one_died_is_not_logged_in() {
    use ssc_abi::hsm::{HsmError, Op, Request, Response, SignMech, decode_payload, encode_frame};
    let dir = tempdir();
    let (port, hsm) = serve(&dir);
    // The application logs in, then waits on its input (stdin, a pipe we
    // never close) and is killed there: it never logs out.
    let mut app = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module())
        .args(["--login", "--pin", PIN, "--sign", "--id", "52", "-m", "SHA256-RSA-PKCS"])
        .env("SSC_HSM_PORT", &port)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    app.kill().unwrap();
    app.wait().unwrap();
    let page = hsm.lock().unwrap().audit.page(0, 1000);
    let ops: Vec<(&str, &str)> = page.entries.iter().map(|e| (e.op.as_str(), e.outcome.as_str())).collect();
    assert!(ops.contains(&("login", "ok")), "the application did not log in before it died: {ops:?}");
    assert!(!ops.iter().any(|(op, _)| *op == "logout"), "the application logged out: {ops:?}");
    // A second process opens the port and, without a Hello, asks DomC to
    // sign with the tenant's RSA key (handle 1): a raw frame, no token.
    let sock = port.strip_prefix("unix:").unwrap();
    let mut conn = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let op =
        Op::Sign { key: 1, mech: SignMech::RsaPkcs1 { hash: Some(ssc_abi::hsm::Hash::Sha256) }, data: b"x".to_vec() };
    conn.write_all(&encode_frame(&Request { id: 77, session: 1, token: [0; 16], op }).unwrap()).unwrap();
    let mut d = HsmDecoder::new();
    let mut buf = vec![0u8; 65536];
    let resp: Response = loop {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "DomC closed the link");
        d.feed(&buf[..n]);
        if let Some(p) = d.next_payload() {
            break decode_payload(&p).unwrap();
        }
    };
    assert_eq!(resp.result, Err(HsmError::NotLoggedIn), "the second process signed with the tenant's key");
}

#[test]
fn a_session_object_template_is_refused_not_turned_into_a_token_object() {
    // CKA_TOKEN=false used to come back as a token object that outlived its
    // session and piled up in DomC. The application is cryptoki (the Rust
    // PKCS#11 wrapper) in a child process: this test binary again, running
    // `session_object_application` with the port in its environment.
    let dir = tempdir();
    let (port, hsm) = serve(&dir);
    let text = application("session_object_application", &port);
    // Only the token-object key pair was made.
    assert_eq!(hsm.lock().unwrap().key_count(), 1 + 1, "{text}");
}

/// The application of the test above; does nothing unless run by it.
#[test]
fn session_object_application() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    if std::env::var_os("SSC_P11_APPLICATION").is_none() {
        return;
    }
    fn refused<T>(r: &cryptoki::error::Result<T>) -> bool {
        matches!(r, Err(Error::Pkcs11(RvError::TemplateInconsistent, _)))
    }
    let p11 = Pkcs11::new(module()).unwrap();
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = p11.get_slots_with_token().unwrap()[0];
    let session = p11.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&AuthPin::new(PIN.into()))).unwrap();
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let public = [Attribute::Token(false), Attribute::EcParams(p256.clone()), Attribute::Verify(true)];
    let private = [Attribute::Token(false), Attribute::Sign(true)];
    let r = session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private);
    assert!(refused(&r), "EC session key pair: {:?}", r.map(|_| ()));
    let aes = [
        Attribute::Token(false),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
    ];
    let r = session.generate_key(&Mechanism::AesKeyGen, &aes);
    assert!(refused(&r), "AES session key: {:?}", r.map(|_| ()));
    // The same key pair as token objects works.
    let public = [Attribute::Token(true), Attribute::EcParams(p256), Attribute::Verify(true)];
    session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &[Attribute::Token(true), Attribute::Sign(true)])
        .unwrap();
    println!("application: done");
}

#[test]
fn the_tenants_private_key_cannot_be_wrapped_out_through_the_module() {
    // The export of issue 19, item 1, tried through PKCS#11 itself: the
    // application (cryptoki, in a child process as above) wraps what it
    // may and is refused what it may not.
    let dir = tempdir();
    let (port, _hsm) = serve(&dir);
    application("wrap_application", &port);
}

/// Runs the `name` test of this binary as a PKCS#11 application in a
/// child process on DomC's `port`; it must print `application: done`.
fn application(name: &str, port: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env("SSC_HSM_PORT", port)
        .env("SSC_P11_APPLICATION", "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("application: done"), "{text}");
    text
}

/// The application of the test above; does nothing unless run by it.
#[test]
fn wrap_application() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    if std::env::var_os("SSC_P11_APPLICATION").is_none() {
        return;
    }
    let refused =
        |r: &cryptoki::error::Result<Vec<u8>>, want: RvError| matches!(r, Err(Error::Pkcs11(rv, _)) if *rv == want);
    let p11 = Pkcs11::new(module()).unwrap();
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = p11.get_slots_with_token().unwrap()[0];
    let ssc_wrap = MechanismType::new_vendor_defined(cryptoki_sys::CKM_VENDOR_DEFINED | 0x5353_4357).unwrap();
    let info = p11.get_mechanism_info(slot, ssc_wrap).unwrap();
    assert!(info.wrap() && info.unwrap(), "CKM_SSC_WRAP wraps and unwraps");
    let wrap = Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(ssc_wrap, None));
    let session = p11.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&AuthPin::new(PIN.into()))).unwrap();
    let aes = |extra: &[Attribute]| {
        let mut t = vec![
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
        ];
        t.extend_from_slice(extra);
        session.generate_key(&Mechanism::AesKeyGen, &t).unwrap()
    };
    let kek = aes(&[Attribute::Wrap(true), Attribute::Unwrap(true), Attribute::Label(b"kek".to_vec())]);
    let general = aes(&[Attribute::Encrypt(true), Attribute::Decrypt(true)]);
    let movable = aes(&[Attribute::Encrypt(true), Attribute::Decrypt(true), Attribute::Extractable(true)]);
    // The tenant's imported RSA key (not extractable), found by its id.
    let rsa =
        session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Id(vec![0x52])]).unwrap()[0];

    // Refused: the tenant's key; a key not made extractable; wrapping with
    // a key that also decrypts (the wrap-then-decrypt export).
    let r = session.wrap_key(&wrap, kek, rsa);
    assert!(refused(&r, RvError::KeyUnextractable), "the tenant's RSA key: {:?}", r.map(|b| b.len()));
    let r = session.wrap_key(&wrap, kek, general);
    assert!(refused(&r, RvError::KeyUnextractable), "a non-extractable key: {:?}", r.map(|b| b.len()));
    let r = session.wrap_key(&wrap, general, movable);
    assert!(
        refused(&r, RvError::WrappingKeyTypeInconsistent) || refused(&r, RvError::KeyFunctionNotPermitted),
        "{:?}",
        r.map(|b| b.len())
    );

    // Allowed: an extractable key, by a wrap-only key; the copy decrypts
    // what the original encrypted and keeps the policy it was wrapped with.
    let blob = session.wrap_key(&wrap, kek, movable).unwrap();
    let copy = session.unwrap_key(&wrap, kek, &blob, &[Attribute::Label(b"copy".to_vec())]).unwrap();
    let (mut iv1, mut iv2) = ([7u8; 12], [7u8; 12]);
    let gcm = cryptoki::mechanism::aead::GcmParams::new(&mut iv1, &[], 128.into()).unwrap();
    let sealed = session.encrypt(&Mechanism::AesGcm(gcm), movable, b"moved inside DomC").unwrap();
    let gcm = cryptoki::mechanism::aead::GcmParams::new(&mut iv2, &[], 128.into()).unwrap();
    assert_eq!(session.decrypt(&Mechanism::AesGcm(gcm), copy, &sealed).unwrap(), b"moved inside DomC");
    let attrs = session.get_attributes(copy, &[AttributeType::Extractable, AttributeType::Wrap]).unwrap();
    assert!(attrs.contains(&Attribute::Extractable(true)) && attrs.contains(&Attribute::Wrap(false)), "{attrs:?}");
    // A template cannot make the copy anything but what was wrapped.
    let r = session.unwrap_key(&wrap, kek, &blob, &[Attribute::Extractable(false)]);
    assert!(matches!(r, Err(Error::Pkcs11(RvError::TemplateInconsistent, _))), "{r:?}");
    let r = session.unwrap_key(&wrap, kek, &blob, &[Attribute::Sign(true)]);
    assert!(matches!(r, Err(Error::Pkcs11(RvError::TemplateInconsistent, _))), "{r:?}");
    // A blob edited in transit does not unwrap.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(session.unwrap_key(&wrap, kek, &bad, &[]).is_err());
    println!("application: done");
}

#[test]
fn no_port_is_a_clear_error() {
    let (good, text) = tool("/nonexistent/ssc-hsm", &["-L"]);
    assert!(!good && text.contains("opening /nonexistent/ssc-hsm"), "{text}");
}

fn tempdir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "ssc-pkcs11-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}
