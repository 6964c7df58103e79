//! Provider verbs on real meta-domains: `ssc provider list` sees two
//! running chains (ids, domains, memory), a provider request for a memory
//! window, a data link or a console is refused by name, `stop` ends one
//! meta-domain cleanly and `destroy` kills the other; the builder's files
//! are private to it; quotas refuse a meta-domain over them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tests::*;

fn chain(dir: &Path, name: &str) -> PathBuf {
    let (catalog_dir, trust) = catalog();
    let vol = dir.join(format!("{name}.img"));
    let key = dir.join(format!("{name}.key"));
    let r = run_ssc(
        &["volume", "create", vol.to_str().unwrap(), "--size", "8M", "--key-out", key.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(r.output.status.success(), "{}", r.all());
    let chain = dir.join(format!("{name}.toml"));
    std::fs::write(
        &chain,
        format!(
            "[catalog]\npath = \"{}\"\ntrust = [\"{}\"]\n[[disk]]\nvolume = \"{}\"\nkey = \"{}\"\nchain = [\"storage-crypt\"]\n",
            catalog_dir.display(),
            trust.display(),
            vol.display(),
            key.display()
        ),
    )
    .unwrap();
    chain
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn provider_verbs_list_stop_destroy_and_cannot_reach_into_a_meta_domain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let job = d.join("job.sh");
    std::fs::write(&job, "echo PROVIDER-JOB-UP\nsleep 600\n").unwrap();
    let (a, b) = (chain(d, "tenant-a"), chain(d, "tenant-b"));
    let up_a = Up::start(d, &["up", a.to_str().unwrap(), "--job", job.to_str().unwrap()], "a");
    let up_b = Up::start(d, &["up", b.to_str().unwrap(), "--job", job.to_str().unwrap()], "b");
    up_a.wait_until("tenant A's client", |o| o.contains("PROVIDER-JOB-UP"));
    up_b.wait_until("tenant B's client", |o| o.contains("PROVIDER-JOB-UP"));
    let (id_a, id_b) = (format!("tenant-a-{}", up_a.pid()), format!("tenant-b-{}", up_b.pid()));

    let r = run_ssc(&["provider", "list", "--json"], Duration::from_secs(60));
    assert!(r.output.status.success(), "{}", r.all());
    let all: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    for id in [&id_a, &id_b] {
        let m = all.as_array().unwrap().iter().find(|m| m["id"] == **id).unwrap_or_else(|| panic!("{id}: {all}"));
        let names: Vec<&str> = m["domains"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["storage-crypt-0", "client"], "{m}");
        assert_eq!(m["memory_mib"], 128 + 512, "{m}");
    }
    let r = run_ssc(&["provider", "list"], Duration::from_secs(60));
    assert!(r.stdout().contains(&id_a) && r.stdout().contains("storage-crypt-0, client"), "{}", r.all());

    // The provider's API has no way into the meta-domain.
    for (line, want) in [
        ("window client", "cannot open memory windows"),
        ("link storage-crypt-0 nbd", "cannot open or read a tenant's data links"),
        ("console client", "cannot open a tenant's consoles"),
        ("grant storage-crypt-0 client mem-read", "the provider verbs are status, stop and destroy"),
    ] {
        let e = ssc::provider::request(&id_a, line).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
    // Private to the builder: the provider socket, the run directory and
    // everything QEMU made in it.
    // The provider socket is the builder's, shared only with the provider's
    // group (tests/roles.rs plays the other uids).
    assert_eq!(mode(&ssc::provider::dir().join(format!("{id_a}.sock"))) & 0o007, 0);
    let base = ssc::builder::RunDir::base();
    let runs: Vec<PathBuf> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{}-", up_a.pid())))
        .collect();
    assert!(!runs.is_empty(), "no run directory of ssc up in {}", base.display());
    for run in runs {
        assert_eq!(mode(&run), 0o700, "{}", run.display());
        for f in std::fs::read_dir(&run).unwrap().flatten() {
            assert_eq!(mode(&f.path()) & 0o077, 0, "{} is open to others", f.path().display());
        }
    }

    // stop: clean (the SD flushes and stops); destroy: immediate.
    let r = run_ssc(&["provider", "stop", &id_a], Duration::from_secs(60));
    assert!(r.output.status.success() && r.stdout().contains("stopping"), "{}", r.all());
    let r = run_ssc(&["provider", "destroy", &id_b], Duration::from_secs(60));
    assert!(r.output.status.success() && r.stdout().contains("destroying"), "{}", r.all());
    let (err_a, err_b) = (d.join("a.err"), d.join("b.err"));
    assert_eq!(up_a.wait_exit(Duration::from_secs(120)), Some(1));
    assert_eq!(up_b.wait_exit(Duration::from_secs(120)), Some(1));
    let (err_a, err_b) = (std::fs::read_to_string(err_a).unwrap(), std::fs::read_to_string(err_b).unwrap());
    assert!(err_a.contains("stopped by the provider") && err_a.contains("storage-crypt-0 stopped cleanly"), "{err_a}");
    assert!(err_b.contains("destroyed by the provider"), "{err_b}");
    let r = run_ssc(&["provider", "stop", &id_a], Duration::from_secs(60));
    assert!(!r.output.status.success() && r.all().contains("no meta-domain"), "{}", r.all());
}

#[test]
fn quotas_refuse_a_meta_domain_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = d.join("quotas.json");
    let qs = q.to_str().unwrap();
    let env = [("SSC_QUOTAS", qs)];
    let r = run_ssc_env(&["provider", "quotas", "--max-memory-mib", "256"], &env, Duration::from_secs(30));
    assert!(r.output.status.success() && r.stdout().contains("256 MiB"), "{}", r.all());
    let c = chain(d, "big");
    let r = run_ssc_env(&["up", c.to_str().unwrap()], &env, Duration::from_secs(60));
    assert!(!r.output.status.success(), "{}", r.all());
    assert!(
        r.all().contains("over the provider's quota: this meta-domain needs 640 MiB, the limit is 256 MiB"),
        "{}",
        r.all()
    );
    let r = run_ssc_env(&["provider", "quotas", "--clear"], &env, Duration::from_secs(30));
    assert!(r.output.status.success() && r.stdout().contains("unlimited"), "{}", r.all());
    std::fs::write(&q, "not json").unwrap();
    let r = run_ssc_env(&["up", c.to_str().unwrap()], &env, Duration::from_secs(60));
    assert!(!r.output.status.success() && r.all().contains("not a quota file"), "{}", r.all());
}
