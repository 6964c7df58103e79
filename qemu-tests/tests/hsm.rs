//! DomC, the tenant's HSM service domain, used from inside a real Linux
//! client through `libssc_pkcs11.so`: OpenSC's pkcs11-tool generates and
//! signs, the client's own OpenSSL verifies every signature (another
//! implementation than DomC's), an `openssl s_server` whose RSA key lives
//! in DomC completes a TLS handshake with `openssl s_client`; wrong PINs,
//! keys their policy forbids and garbage on the port get PKCS#11 errors and
//! DomC keeps serving. Meanwhile the tenant imports a key, lists keys and
//! verifies the audit log, and the client's memory is searched for the
//! tenant's private keys: they are not there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tests::*;

const PIN: &str = "123456";

fn testdata(name: &str) -> PathBuf {
    repo().join("sd-hsm/testdata").join(name)
}

fn chain(dir: &Path) -> PathBuf {
    let (catalog_dir, trust) = catalog();
    std::fs::write(dir.join("pin"), format!("{PIN}\n")).unwrap();
    let chain = dir.join("chain.toml");
    std::fs::write(
        &chain,
        format!(
            r#"[catalog]
path = "{}"
trust = ["{}"]
[hsm]
pin_file = "pin"
label = "tenant-hsm"
[[hsm.key]]
file = "{}"
label = "tls"
id = "52"
usage = "sign,verify"
[[hsm.key]]
file = "{}"
label = "verify-only"
id = "53"
usage = "verify"
"#,
            catalog_dir.display(),
            trust.display(),
            testdata("rsa2048.pk8").display(),
            testdata("p256.pk8").display(),
        ),
    )
    .unwrap();
    chain
}

/// Everything inside the client. Each step prints `HSM-STEP …`.
fn job() -> String {
    format!(
        r#"
ip link set lo up
M=/usr/lib/ssc/libssc_pkcs11.so
P="pkcs11-tool --module $M"
step() {{ echo "HSM-STEP $*"; }}
$P -L > /tmp/l; cat /tmp/l; grep -q 'tenant-hsm' /tmp/l; step token listed
$P --login --pin {PIN} --keypairgen --key-type EC:prime256v1 --id 01 --label client-ec
$P --login --pin {PIN} --keypairgen --key-type EC:edwards25519 --id 02 --label client-ed
echo "data signed inside DomC" > /tmp/data
$P --login --pin {PIN} --sign --id 01 -m ECDSA-SHA256 --signature-format openssl -i /tmp/data -o /tmp/ec.sig
$P --read-object --type pubkey --id 01 -o /tmp/ec.der
openssl dgst -sha256 -verify /tmp/ec.der -keyform DER -signature /tmp/ec.sig /tmp/data
step ecdsa verified by openssl
$P --login --pin {PIN} --sign --id 02 -m EDDSA -i /tmp/data -o /tmp/ed.sig
$P --read-object --type pubkey --id 02 -o /tmp/ed.pem
openssl pkeyutl -verify -pubin -inkey /tmp/ed.pem -rawin -in /tmp/data -sigfile /tmp/ed.sig
step ed25519 verified by openssl
$P --login --pin {PIN} --sign --id 52 -m SHA256-RSA-PKCS -i /tmp/data -o /tmp/rsa.sig
$P --read-object --type pubkey --id 52 -o /tmp/rsa.der
openssl dgst -sha256 -verify /tmp/rsa.der -keyform DER -signature /tmp/rsa.sig /tmp/data
step rsa verified by openssl
if $P --login --pin 000000 -O 2>/tmp/err; then exit 1; fi; grep -q CKR_PIN_INCORRECT /tmp/err; step wrong pin refused
if $P --login --pin {PIN} --sign --id 53 -m ECDSA-SHA256 -i /tmp/data -o /tmp/x 2>/tmp/err; then exit 1; fi
grep -q CKR_KEY_FUNCTION_NOT_PERMITTED /tmp/err; step policy refused
PORT=""
for d in /sys/class/virtio-ports/*; do [ "$(cat $d/name)" = ssc-hsm ] && PORT=/dev/$(basename $d); done
head -c 3000 /dev/urandom > $PORT
printf 'SSCH\004\000\000\000\377\377\377\377' > $PORT
$P -L > /dev/null; step still serving after garbage
# libp11 0.4.12 (Debian 12) stops listing keys at an Ed25519 key.
$P --login --pin {PIN} --delete-object --type privkey --id 02
export PKCS11_MODULE_PATH=$M
KEY="pkcs11:id=%52;type=private;pin-value={PIN}"
openssl req -new -x509 -engine pkcs11 -keyform engine -key "$KEY" -subj /CN=domc-tls -days 1 -out /tmp/cert.pem
openssl x509 -in /tmp/cert.pem -noout -pubkey > /tmp/cert.pub
openssl pkey -pubin -in /tmp/rsa.der -inform DER > /tmp/rsa.pub
cmp /tmp/cert.pub /tmp/rsa.pub; step certificate signed by DomC
openssl s_server -engine pkcs11 -keyform engine -key "$KEY" -cert /tmp/cert.pem -accept 4433 -naccept 1 -www > /tmp/server.log 2>&1 &
for i in $(seq 1 60); do grep -q ACCEPT /tmp/server.log && break; sleep 1; done
echo Q | openssl s_client -connect 127.0.0.1:4433 -CAfile /tmp/cert.pem -verify_return_error > /tmp/client.log 2>&1 || true
cat /tmp/client.log | grep -E 'Verify return|Protocol|Cipher is' || true
grep -q 'Verify return code: 0' /tmp/client.log; step tls handshake with the key in DomC
wait
echo HSM-DUMP-NOW
sleep 90
"#
    )
}

/// The client's RAM through its QMP socket (`pmemsave`).
fn dump_client_memory(up: &Up, out: &Path, mib: u64) {
    let base = ssc::builder::RunDir::base();
    let prefix = format!("{}-", up.pid());
    let qmp = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("client.qmp"))
        .find(|p| p.exists())
        .expect("the client's QMP socket");
    let mut q = ssc::qmp::Qmp::connect(&qmp, Duration::from_secs(10)).unwrap();
    q.execute(
        "pmemsave",
        Some(serde_json::json!({"val": 0, "size": mib << 20, "filename": out.display().to_string()})),
    )
    .unwrap();
}

/// The secret parts of the tenant's imported keys, as they would sit in
/// memory: the PKCS#8 bodies, the RSA primes, the P-256 scalar.
fn secrets() -> Vec<(String, Vec<u8>)> {
    let rsa = std::fs::read(testdata("rsa2048.pk8")).unwrap();
    let p256 = std::fs::read(testdata("p256.pk8")).unwrap();
    let mut v = vec![
        ("RSA PKCS#8 (middle)".to_string(), rsa[600..664].to_vec()),
        ("P-256 PKCS#8 scalar".to_string(), p256[36..68].to_vec()),
    ];
    // The primes, from openssl's text dump.
    let (ok, text) = peer(
        "openssl",
        &["pkey", "-inform", "DER", "-in", testdata("rsa2048.pk8").to_str().unwrap(), "-noout", "-text"],
        Duration::from_secs(10),
    );
    assert!(ok, "{text}");
    for name in ["prime1:", "prime2:", "privateExponent:"] {
        let hex: String = text
            .split(name)
            .nth(1)
            .unwrap()
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .collect::<String>()
            .replace([':', ' '], "");
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let bytes = if bytes.first() == Some(&0) { bytes[1..].to_vec() } else { bytes };
        v.push((format!("RSA {name}"), bytes[..32].to_vec()));
    }
    v
}

#[test]
fn domc_serves_pkcs11_tool_openssl_and_tls_inside_a_real_client() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let chain = chain(dir);
    let c = chain.to_str().unwrap();
    let jobf = dir.join("job.sh");
    std::fs::write(&jobf, job()).unwrap();
    let up = Up::start(dir, &["up", c, "--job", jobf.to_str().unwrap()], "up");
    up.wait_until("the client", |o| o.contains("client: ssc: ready"));
    let err = up.stderr();
    assert!(err.contains("imported #1 rsa `tls` id 52 (sign,verify, imported)"), "{err}");

    // The tenant side while the client works: import, list.
    let aes = dir.join("aes.key");
    std::fs::write(&aes, "11".repeat(32)).unwrap();
    let r = run_ssc(
        &["hsm", "import", c, aes.to_str().unwrap(), "--label", "backup", "--id", "aa"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.all());
    assert!(r.stdout().contains("aes-256 `backup` id aa"), "{}", r.all());
    let bad = run_ssc(&["hsm", "import", c, chain.to_str().unwrap(), "--label", "x"], Duration::from_secs(60));
    assert_ne!(bad.code(), Some(0));
    assert!(bad.stderr().contains("neither a PKCS#8"), "{}", bad.all());

    for step in [
        "token listed",
        "ecdsa verified by openssl",
        "ed25519 verified by openssl",
        "rsa verified by openssl",
        "wrong pin refused",
        "policy refused",
        "still serving after garbage",
        "certificate signed by DomC",
        "tls handshake with the key in DomC",
    ] {
        up.wait_until(step, |o| o.contains(&format!("HSM-STEP {step}")) || o.contains("client: job failed"));
        assert!(!up.stdout().contains("client: job failed"), "the job failed before `{step}`:\n{}", up.stdout());
    }
    up.wait_until("the memory dump point", |o| o.contains("HSM-DUMP-NOW"));

    // No private key of the tenant's in the client's memory.
    let mem = dir.join("client.ram");
    dump_client_memory(&up, &mem, 256);
    // The tenant's requests while the client still sleeps; the memory is
    // searched afterwards (slow in a debug build, and the chain need not wait).

    let list = run_ssc(&["hsm", "list", c], Duration::from_secs(60));
    assert_eq!(list.code(), Some(0), "{}", list.all());
    for want in [
        "rsa `tls`",
        "ec-p256 `verify-only` id 53 (verify, imported)",
        "ec-p256 `client-ec` id 01",
        "generated in DomC",
    ] {
        assert!(list.stdout().contains(want), "{want}:\n{}", list.all());
    }
    let audit =
        run_ssc(&["hsm", "audit", c, "--out", dir.join("audit.jsonl").to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(audit.code(), Some(0), "{}", audit.all());
    assert!(audit.stderr().contains("hash chain verified"), "{}", audit.all());
    let text = audit.stdout();
    assert!(text.contains("tenant: import key #1: ok"), "{text}");
    assert!(text.contains("sign key #1: ok"), "{text}");
    assert!(text.contains("login: wrong PIN"), "{text}");
    assert!(text.contains("sign key #2: key 2's usage policy does not allow sign"), "{text}");
    assert!(text.contains("malformed-frame"), "{text}");

    let ram = std::fs::read(&mem).unwrap();
    assert_eq!(ram.len(), 256 << 20);
    // The PIN is in the client (the client typed it); the keys are not.
    assert!(ram.windows(PIN.len()).any(|w| w == PIN.as_bytes()), "the scan sees client data at all");
    for (what, needle) in secrets() {
        assert!(!ram.windows(needle.len()).any(|w| w == needle.as_slice()), "{what} found in the client's memory");
    }
    drop(ram);
    let _ = std::fs::remove_file(&mem);
    assert_eq!(up.wait_exit(Duration::from_secs(180)), Some(0));

    // Every entry streamed to the tenant's file as it happened, from the
    // first, in one unbroken chain.
    let stream = std::fs::read_to_string(dir.join("chain.toml.hsm-audit.jsonl")).unwrap();
    assert!(stream.lines().next().is_some_and(|l| l.starts_with("{\"session\"")), "{stream}");
    let entries: Vec<ssc_abi::hsm::AuditEntry> =
        stream.lines().skip(1).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(entries.first().map(|e| e.seq), Some(0));
    sd_hsm::audit::verify(&entries, None).unwrap();
    for (op, outcome) in [("import", "ok"), ("sign", "ok"), ("login", "wrong PIN"), ("malformed-frame", "refused")] {
        assert!(
            entries.iter().any(|e| e.op == op && e.outcome.contains(outcome)),
            "no `{op}: {outcome}` in the stream:\n{stream}"
        );
    }
}

#[test]
fn hsm_chain_mistakes_are_named_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (catalog_dir, trust) = catalog();
    let head = format!("[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n", catalog_dir.display(), trust.display());
    let check = |body: &str| {
        let chain = dir.join("c.toml");
        std::fs::write(&chain, format!("{head}{body}")).unwrap();
        let r = run_ssc(&["up", chain.to_str().unwrap(), "--check"], Duration::from_secs(60));
        assert_ne!(r.code(), Some(0), "{body}: {}", r.all());
        r.stderr()
    };
    let e = check("[hsm]\npin_file = \"nope\"\n");
    assert!(e.contains("[hsm]") && e.contains("reading PIN file") && e.contains("nope"), "{e}");
    std::fs::write(dir.join("short"), "12\n").unwrap();
    let e = check("[hsm]\npin_file = \"short\"\n");
    assert!(e.contains("4 to 64 bytes"), "{e}");
    std::fs::write(dir.join("pin"), "123456\n").unwrap();
    std::fs::write(dir.join("ec.pem"), "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n")
        .unwrap();
    let e = check("[hsm]\npin_file = \"pin\"\n[[hsm.key]]\nfile = \"ec.pem\"\nlabel = \"k\"\n");
    assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
    let e = check("[hsm]\npin_file = \"pin\"\n[[hsm.key]]\nfile = \"ec.pem\"\nlabel = \"k\"\nusage = \"sign,fly\"\n");
    assert!(e.contains("openssl pkcs8") || e.contains("fly"), "{e}");
    let e = check("[hsm]\npin_file = \"pin\"\nlabel = \"two words\"\n");
    assert!(e.contains("no spaces"), "{e}");
    // No `ssc up` running: the tenant verbs say so.
    let chain = dir.join("c.toml");
    std::fs::write(&chain, format!("{head}[hsm]\npin_file = \"pin\"\n")).unwrap();
    let r = run_ssc(&["hsm", "list", chain.to_str().unwrap()], Duration::from_secs(30));
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("no `ssc up"), "{}", r.all());
}
