//! DomC's benchmarks, in two layers.
//!
//! * `ssc bench hsm-core` — natively: the `sd-hsm` core's signatures per
//!   second (ECDSA P-256 over a caller's SHA-256 digest and with SHA-256
//!   inside, Ed25519 over 64 bytes, RSA-2048 PKCS#1 v1.5 with SHA-256), one core instance per thread (a
//!   request decoded, policy checked, signed, audited, encoded), beside
//!   SoftHSM2 on the host driven through PKCS#11 by `ssc-p11bench` in the
//!   same run.
//! * `ssc bench hsm` — end to end: `ssc-p11bench` inside a client VM
//!   through `libssc_pkcs11.so` to the DomC image, beside SoftHSM2 inside
//!   the same client, at 1 and 8 threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_hsm::Hsm;
use ssc_abi::hsm::{AdminOp, AdminReply, Hash, KeyKind, KeyMaterial, Op, Reply, Request, SignMech, Usage};

use crate::bench_storage::Row;
use crate::qemu::Accel;

/// Published anchors and the aims, printed under the tables.
pub const ANCHORS: &str = "Anchor (published): CaaS measured < 3 % overhead for DomC against an in-VM SoftHSM. \
Aims: native core >= 1.0x SoftHSM2 for every algorithm; end to end, DomC >= 0.9x in-client SoftHSM2 at 8 threads.";

/// The algorithms, as `ssc-p11bench` names them.
pub const ALGS: [&str; 4] = ["ecdsa-p256", "ecdsa-p256-sha256", "ed25519", "rsa2048"];

const RSA_2048: &[u8] = include_bytes!("../../sd-hsm/testdata/rsa2048.pk8");

/// A core with a logged-in client (its login token) and one key of `alg`.
#[allow(clippy::type_complexity)]
fn core_with_key(alg: &str) -> Result<(Hsm, [u8; 16], u64, SignMech, Vec<u8>)> {
    let mut h = Hsm::new("bench", "0");
    h.admin(AdminOp::SetPin { pin: b"1234".to_vec() }, 0);
    // Nobody streams this core's audit log; in a chain `ssc up` does, and
    // the log never fills. Without this the core would block after 65 536
    // operations and the benchmark would time refusals.
    h.admin(AdminOp::AuditWhenFull { block: false }, 0);
    let login = Request { id: 1, session: 1, token: [0; 16], op: Op::Login { pin: b"1234".to_vec() } };
    let Ok(Reply::LoggedIn { token }) = h.client(login, 0).result else { bail!("logging in") };
    let call = |h: &mut Hsm, op| h.client(Request { id: 1, session: 1, token, op }, 0).result;
    let (key, mech, data) = match alg {
        "ecdsa-p256" | "ecdsa-p256-sha256" | "ed25519" => {
            let kind = if alg == "ed25519" { KeyKind::Ed25519 } else { KeyKind::EcP256 };
            let op = Op::Generate { kind, label: alg.into(), id: vec![], usage: Usage::GENERAL };
            let Ok(Reply::Key(k)) = call(&mut h, op) else { bail!("generating a {alg} key") };
            if alg == "ed25519" {
                (k.handle, SignMech::EdDsa, vec![9u8; 64])
            } else if alg == "ecdsa-p256-sha256" {
                (k.handle, SignMech::Ecdsa { hash: Some(Hash::Sha256) }, vec![9u8; 64])
            } else {
                (k.handle, SignMech::Ecdsa { hash: None }, vec![7u8; 32])
            }
        }
        _ => {
            let op = AdminOp::Import {
                label: alg.into(),
                id: vec![],
                usage: Usage::GENERAL,
                material: KeyMaterial::Pkcs8(RSA_2048.to_vec()),
            };
            let AdminReply::Key(k) = h.admin(op, 0) else { bail!("importing the RSA key") };
            (k.handle, SignMech::RsaPkcs1 { hash: Some(Hash::Sha256) }, vec![9u8; 64])
        }
    };
    Ok((h, token, key, mech, data))
}

/// The core's signatures per second with `threads` instances signing for
/// `secs` seconds.
pub fn core_rate(alg: &str, threads: usize, secs: f64) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let total: Result<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || -> Result<u64> {
                    let (mut h, token, key, mech, data) = core_with_key(alg)?;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let req = Request { id: n, session: 1, token, op: Op::Sign { key, mech, data: data.clone() } };
                        let frame = postcard::to_allocvec(&req)?;
                        let reply = h.client_frame(&frame, n);
                        if reply.len() < 8 {
                            bail!("the core refused to sign");
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| bail!("a worker panicked"))).sum()
    });
    Ok(total? as f64 / start.elapsed().as_secs_f64())
}

/// `ssc-p11bench` beside the running `ssc`.
pub fn p11bench_binary() -> Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("ssc-p11bench");
    if !p.is_file() {
        bail!("{} is missing: build it with `make ssc` (cargo build -p ssc-pkcs11 --bins)", p.display());
    }
    Ok(p)
}

/// Parses `p11bench ALG THREADS OPS SECONDS RATE` lines.
pub fn parse_p11bench(text: &str) -> Vec<(String, usize, f64)> {
    text.lines()
        .filter_map(|l| {
            let l = &l[l.find("p11bench ")?..];
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(1)?.to_string(), f.get(2)?.parse().ok()?, f.get(5)?.parse().ok()?))
        })
        .collect()
}

/// SoftHSM2 on the host: a fresh token in a temporary directory.
fn softhsm_host(secs: f64, threads: &[usize]) -> Result<Vec<(String, usize, f64)>> {
    let dir = crate::builder::RunDir::create()?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::create_dir(dir.path().join("tokens"))?;
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().display()
        ),
    )?;
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "bench", "--pin", "1234", "--so-pin", "1234"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .context("running softhsm2-util (apt install softhsm2; `make deps`)")?;
    if !init.status.success() {
        bail!("softhsm2-util --init-token: {}", String::from_utf8_lossy(&init.stderr));
    }
    let t: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let out = Command::new(p11bench_binary()?)
        .args([SOFTHSM_MODULE, "1234", &secs.to_string(), &t.join(",")])
        .args(ALGS)
        .env("SOFTHSM2_CONF", &conf)
        .output()?;
    if !out.status.success() {
        bail!("ssc-p11bench on SoftHSM2: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(parse_p11bench(&String::from_utf8_lossy(&out.stdout)))
}

/// Debian's SoftHSM2 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The native layer.
pub fn core(secs: f64, threads: &[usize]) -> Result<Vec<Row>> {
    let soft = softhsm_host(secs, threads)?;
    let mut rows = vec![];
    for alg in ALGS {
        for &t in threads {
            let ours = core_rate(alg, t, secs)?;
            let anchor = soft.iter().find(|(a, n, _)| a == alg && *n == t).map(|(_, _, r)| *r);
            rows.push(Row {
                what: format!("{alg}, {t} thread(s): sd-hsm core"),
                value: ours,
                unit: "sig/s",
                anchor: anchor.map(|r| ("SoftHSM2 via PKCS#11".to_string(), r)),
            });
        }
    }
    Ok(rows)
}

/// What the end-to-end run needs.
pub struct E2e<'a> {
    pub catalog: &'a Path,
    pub trust: &'a [PathBuf],
    pub accel: Accel,
    pub secs: f64,
    pub threads: &'a [usize],
}

/// The end-to-end layer: one client with DomC; inside it, `ssc-p11bench`
/// against DomC's module and against SoftHSM2.
pub fn e2e(s: &E2e) -> Result<Vec<Row>> {
    let dir = crate::builder::RunDir::create()?;
    let d = dir.path();
    std::fs::write(d.join("pin"), "1234\n")?;
    std::fs::write(d.join("rsa.p8"), RSA_2048)?;
    let trust: Vec<String> =
        s.trust.iter().map(|t| format!("\"{}\"", std::fs::canonicalize(t).unwrap_or(t.clone()).display())).collect();
    let chain = d.join("chain.toml");
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [{}]\n[hsm]\npin_file = \"pin\"\n[[hsm.key]]\nfile = \"rsa.p8\"\nlabel = \"rsa\"\nusage = \"sign\"\n",
            std::fs::canonicalize(s.catalog)?.display(),
            trust.join(", ")
        ),
    )?;
    let plan = crate::chain::plan(&chain)?;
    let t: Vec<String> = s.threads.iter().map(|t| t.to_string()).collect();
    let (t, secs) = (t.join(","), s.secs);
    let algs = ALGS.join(" ");
    let job = format!(
        "#!/bin/sh\nset -e -o pipefail\n\
         echo BENCH domc\n\
         /usr/bin/ssc-p11bench /usr/lib/ssc/libssc_pkcs11.so 1234 {secs} {t} {algs} | sed 's/^/domc /'\n\
         mkdir -p /tmp/softhsm\n\
         softhsm2-util --module {SOFTHSM_MODULE} --init-token --free --label bench --pin 1234 --so-pin 1234 >/dev/null\n\
         /usr/bin/ssc-p11bench {SOFTHSM_MODULE} 1234 {secs} {t} {algs} | sed 's/^/softhsm /'\n"
    );
    let bench = std::fs::read(p11bench_binary()?)?;
    let initrd = d.join("initrd-bench");
    crate::chain::append_to_initrd(
        &[&plan.initrd],
        &[("job.sh", 0o100755, job.as_bytes()), ("usr/bin/ssc-p11bench", 0o100755, &bench)],
        &initrd,
    )?;
    eprintln!("ssc bench hsm: booting DomC and a client ({}); {} s per run", s.accel, s.secs);
    let running = crate::chain::up(&plan, s.accel, false, Some(&initrd), None)?;
    let per_run = s.secs + 30.0;
    let timeout = Duration::from_secs_f64(120.0 + per_run * (s.threads.len() * ALGS.len() * 2) as f64);
    let (_exit, log) = running.wait(Some(timeout))?;
    let text = log.join("\n");
    if !text.contains("job passed") {
        bail!(
            "the benchmark job failed in the client:\n{}",
            log.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n")
        );
    }
    let pick = |who: &str| -> Vec<(String, usize, f64)> {
        parse_p11bench(&text.lines().filter(|l| l.contains(&format!("{who} p11bench"))).collect::<Vec<_>>().join("\n"))
    };
    let (domc, soft) = (pick("domc"), pick("softhsm"));
    let mut rows = vec![];
    for (alg, n, r) in &domc {
        let anchor = soft.iter().find(|(a, m, _)| a == alg && m == n).map(|(_, _, x)| *x);
        rows.push(Row {
            what: format!("{alg}, {n} thread(s): client → DomC ({})", s.accel),
            value: *r,
            unit: "sig/s",
            anchor: anchor.map(|x| ("SoftHSM2 in the client".to_string(), x)),
        });
    }
    if rows.is_empty() {
        bail!("no results in the client's log");
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn p11bench_lines_parse_with_prefixes() {
        let v = super::parse_p11bench("[client] domc p11bench ecdsa-p256 8 100 2.000 50.0\nnoise\n");
        assert_eq!(v, vec![("ecdsa-p256".to_string(), 8, 50.0)]);
    }
}
