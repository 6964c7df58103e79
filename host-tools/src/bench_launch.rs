//! `ssc bench launch`: the time from `ssc up` to the client being ready,
//! with and without attestation, in one invocation, median of N runs.
//!
//! Both chains are the same storage chain (one storage SD on a native
//! volume, one Linux client); the anchor is the plain chain, where `ssc
//! up` keys the SD itself. The attested chain adds `[udom0]`: the host
//! TPM and the meta-domain's vTPM come up, Udom0 boots first, every launch
//! is measured, and a tenant (a thread here, running exactly what `ssc
//! attest --provision` runs) attests over TLS, verifies, provisions the
//! key through Udom0, grants and launches. The attestation steps are
//! broken down: TPM setup (host TPM boot and vTPM manufacture), TLS
//! handshake, quote round trip (and the builder's TPM work in it),
//! verification, provisioning (keys, grants, launch request).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::qemu::Accel;

/// One variant's medians, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Row {
    pub variant: String,
    pub runs: usize,
    /// `ssc up` until the client is ready.
    pub launch_ms: f64,
    pub tpm_setup_ms: f64,
    pub tls_handshake_ms: f64,
    pub quote_ms: f64,
    /// The builder's TPM work inside the quote round trip.
    pub quote_host_ms: f64,
    pub verification_ms: f64,
    pub provisioning_ms: f64,
    /// The tenant's whole `ssc attest --provision` (plan, measuring its own
    /// client files, TLS, quote, verify, provisioning).
    pub tenant_ms: f64,
    pub accel: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn chain_text(catalog: &Path, trust: &[PathBuf], vol: &Path, key: &Path, attested: bool) -> String {
    let trust: Vec<String> = trust.iter().map(|t| format!("\"{}\"", t.display())).collect();
    format!(
        "[catalog]\npath = \"{}\"\ntrust = [{}]\n{}\n[[disk]]\nvolume = \"{}\"\nkey = \"{}\"\nchain = [\"storage-crypt\"]\n",
        catalog.display(),
        trust.join(", "),
        if attested { "[udom0]\n" } else { "" },
        vol.display(),
        key.display()
    )
}

/// One launch: `ssc up` to client ready (then the client is stopped).
fn launch_once(chain: &Path, profile: &Path, job: &Path, accel: Accel) -> Result<(f64, Row)> {
    let plan = crate::chain::plan(chain)?;
    let scratch = crate::builder::RunDir::create()?;
    let initrd = crate::chain::job_initrd(&plan, Some(job), scratch.path())?;
    let attested = plan.udom0.is_some();
    // The tenant, as `ssc attest --provision`, once `ssc up` waits for it.
    let tenant = attested.then(|| {
        let (chain, profile, job) = (chain.to_path_buf(), profile.to_path_buf(), job.to_path_buf());
        std::thread::spawn(move || -> Result<(crate::chain_udom0::Report, f64)> {
            let start = Instant::now();
            while crate::chain_checkpoint::request(&chain, "udom0 relay", &mut |_, _| {}).is_err() {
                anyhow::ensure!(start.elapsed() < Duration::from_secs(300), "ssc up never offered the relay");
                std::thread::sleep(Duration::from_millis(20));
            }
            let t = Instant::now();
            let r = crate::chain_udom0::attest(&chain, &profile, Some(&job), true)?;
            anyhow::ensure!(r.verified && r.provisioned.is_some(), "attestation failed: {:?}", r.error);
            Ok((r, t.elapsed().as_secs_f64() * 1e3))
        })
    });
    let t = Instant::now();
    let running = crate::chain::up(&plan, accel, false, initrd.as_deref(), None)?;
    let launch = t.elapsed().as_secs_f64() * 1e3;
    let mut row = Row::default();
    if let Some((setup, host_quote)) = running.udom0_timings() {
        row.tpm_setup_ms = setup.as_secs_f64() * 1e3;
        row.quote_host_ms = host_quote.as_secs_f64() * 1e3;
    }
    let _ = running.wait(Some(Duration::from_secs(120)));
    if let Some(t) = tenant {
        let (r, tenant_ms) = t.join().map_err(|_| anyhow::anyhow!("the tenant thread panicked"))??;
        row.tenant_ms = tenant_ms;
        row.tls_handshake_ms = r.timings_ms.tls_handshake;
        row.quote_ms = r.timings_ms.quote;
        row.verification_ms = r.timings_ms.verification;
        row.provisioning_ms = r.timings_ms.provisioning;
    }
    Ok((launch, row))
}

/// Runs both variants `runs` times, interleaved (so drift on a shared
/// machine hits both alike).
pub fn run(catalog: &Path, trust: &[PathBuf], accel: Accel, runs: usize) -> Result<Vec<Row>> {
    // The chain files live elsewhere: absolute paths.
    let abs = |p: &Path| std::fs::canonicalize(p).with_context(|| format!("{} is missing", p.display()));
    let catalog = &abs(catalog)?;
    let trust = &trust.iter().map(|t| abs(t)).collect::<Result<Vec<_>>>()?;
    let dir = crate::builder::RunDir::create()?;
    let (vol, key) = (dir.path().join("vol.img"), dir.path().join("vol.key"));
    crate::chain::create_volume(&vol, 16 << 20, &key, crate::chain::VolumeFormat::Native)?;
    let job = dir.path().join("job.sh");
    // The client is ready when its job runs; it then powers off.
    std::fs::write(&job, "echo BENCH-LAUNCH-READY\n")?;
    let profile = dir.path().join("host.json");
    let p = crate::chain_udom0::provider_profile(trust)?;
    std::fs::write(&profile, serde_json::to_string_pretty(&p)?)?;
    let variants = [("plain", false), ("attested", true)];
    let mut chains = vec![];
    for (name, attested) in variants {
        let c = dir.path().join(format!("{name}.toml"));
        std::fs::write(&c, chain_text(catalog, trust, &vol, &key, attested))?;
        chains.push(c);
    }
    let mut samples: Vec<Vec<(f64, Row)>> = vec![vec![], vec![]];
    for i in 0..runs {
        for (k, (name, _)) in variants.iter().enumerate() {
            let s =
                launch_once(&chains[k], &profile, &job, accel).with_context(|| format!("{name} launch {}", i + 1))?;
            eprintln!("ssc bench launch: run {}/{runs}: {name}: {:.0} ms", i + 1, s.0);
            samples[k].push(s);
        }
    }
    let mut rows = vec![];
    for ((name, _), s) in variants.iter().zip(samples) {
        let m = |f: fn(&(f64, Row)) -> f64| median(s.iter().map(f).collect());
        rows.push(Row {
            variant: name.to_string(),
            runs,
            launch_ms: m(|x| x.0),
            tpm_setup_ms: m(|x| x.1.tpm_setup_ms),
            tls_handshake_ms: m(|x| x.1.tls_handshake_ms),
            quote_ms: m(|x| x.1.quote_ms),
            quote_host_ms: m(|x| x.1.quote_host_ms),
            verification_ms: m(|x| x.1.verification_ms),
            provisioning_ms: m(|x| x.1.provisioning_ms),
            tenant_ms: m(|x| x.1.tenant_ms),
            accel: accel.to_string(),
        });
    }
    Ok(rows)
}

/// The table, with the overhead against the plain launch.
pub fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<9} {:>4} {:>10} {:>8} {:>7} {:>7} {:>9} {:>7} {:>8} {:>8} {:>9}\n",
        "variant",
        "runs",
        "launch ms",
        "vs plain",
        "TPMs ms",
        "TLS ms",
        "quote ms",
        "(host)",
        "verify",
        "provis.",
        "tenant ms"
    ));
    let base = rows.first().map(|r| r.launch_ms).unwrap_or(0.0);
    for r in rows {
        let vs = if base > 0.0 { format!("{:+.1}%", (r.launch_ms / base - 1.0) * 100.0) } else { "-".into() };
        s.push_str(&format!(
            "{:<9} {:>4} {:>10.0} {:>8} {:>7.0} {:>7.1} {:>9.1} {:>7.1} {:>8.2} {:>8.1} {:>9.0}\n",
            r.variant,
            r.runs,
            r.launch_ms,
            vs,
            r.tpm_setup_ms,
            r.tls_handshake_ms,
            r.quote_ms,
            r.quote_host_ms,
            r.verification_ms,
            r.provisioning_ms,
            r.tenant_ms
        ));
    }
    if let Some(r) = rows.first() {
        s.push_str(&format!(
            "accelerator: {} (medians; `launch` is ssc up until the client's job runs; the attested launch includes \
             the tenant's attest, verify and provisioning)\n",
            r.accel
        ));
    }
    s.push_str("anchors: trusted launch paper +28% VM launch; DBSP unlock 2.7 s. Aim: < 10% and < 100 ms host-side.\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn table_names_the_overhead_and_the_accelerator() {
        let rows = [
            Row { variant: "plain".into(), runs: 3, launch_ms: 1000.0, accel: "tcg".into(), ..Row::default() },
            Row { variant: "attested".into(), runs: 3, launch_ms: 1100.0, accel: "tcg".into(), ..Row::default() },
        ];
        let t = render(&rows);
        assert!(t.contains("+10.0%") && t.contains("accelerator: tcg"), "{t}");
    }
}
