//! Every refusal of [`plan`], each naming the chain-file line at fault.
//! The catalog is signed for real (`catalog::build` over the images that
//! `kernels/images.toml` lists), from stand-in image files.

use super::*;

const HEAD: &str = "[catalog]\npath = \"catalog\"\ntrust = [\"pub.hex\"]\n";

/// A directory with a signed catalog, a volume, keys and client files.
struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Fx {
        Fx::with_images(|t| t)
    }

    /// A catalog whose images.toml is the repository's, edited by `edit`.
    fn with_images(edit: impl FnOnce(String) -> String) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let toml = edit(
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels/images.toml")).unwrap(),
        );
        std::fs::write(d.join("images.toml"), &toml).unwrap();
        let bins = d.join("bin");
        std::fs::create_dir(&bins).unwrap();
        let spec: catalog::ImagesFile = toml::from_str(&toml).unwrap();
        for img in &spec.image {
            // What `check_image` takes for a bootable image: a bzImage header.
            let mut bytes = vec![0u8; 0x400];
            bytes[0x202..0x206].copy_from_slice(b"HdrS");
            bytes[0x300..0x300 + img.name.len()].copy_from_slice(img.name.as_bytes());
            std::fs::write(bins.join(&img.binary), bytes).unwrap();
        }
        catalog::keygen(&d.join("pub.pk8"), &d.join("pub.hex")).unwrap();
        catalog::build(&d.join("images.toml"), &bins, "0.1.0", &d.join("pub.pk8"), &d.join("catalog")).unwrap();
        std::fs::write(d.join("vol.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(d.join("good.key"), "ab".repeat(64)).unwrap();
        std::fs::write(d.join("bad.key"), "not hex").unwrap();
        std::fs::write(d.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(d.join("initrd"), b"initrd").unwrap();
        Fx { dir }
    }

    fn plan(&self, body: &str) -> Result<Plan> {
        let p = self.dir.path().join("chain.toml");
        std::fs::write(&p, format!("{HEAD}{body}")).unwrap();
        plan(&p)
    }

    /// Refuses `body` with `why`, at the first line holding `at`.
    fn refuses(&self, body: &str, at: &str, why: &str) {
        let text = format!("{HEAD}{body}");
        let line = text.lines().position(|l| l.contains(at)).expect("the marker is in the chain file") + 1;
        let e = match self.plan(body) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(&format!("chain.toml:{line}:")), "not at line {line} (`{at}`): {e}\n{text}");
        assert!(e.contains(why), "`{why}` missing: {e}");
    }
}

const CLIENT: &str = "[client]\nkernel = \"vmlinuz\"\ninitrd = \"initrd\"\n";

fn disk(key: &str, chain: &str) -> String {
    format!("{CLIENT}[[disk]]\nvolume = \"vol.img\"\nkey = {key}\nchain = {chain}\n")
}

#[test]
fn a_good_chain_plans() {
    let fx = Fx::new();
    let p = fx.plan(&disk("\"good.key\"", "[\"storage-crypt\"]")).unwrap();
    assert_eq!(p.disks.len(), 1);
}

#[test]
fn the_catalog_section_is_checked() {
    let fx = Fx::new();
    let e = format!("{:#}", fx.plan("[[disk]]\nvolume = 3\n").err().unwrap());
    assert!(e.contains("chain.toml:5"), "{e}");
    let p = fx.dir.path().join("chain.toml");
    std::fs::write(&p, "[catalog]\npath = \"catalog\"\ntrust = [\"missing.hex\"]\n[dedup]\n").unwrap();
    let e = format!("{:#}", plan(&p).err().unwrap());
    assert!(e.contains("chain.toml:3: [catalog] trust") && e.contains("missing.hex"), "{e}");
    let e = format!("{:#}", fx.plan(CLIENT).err().unwrap());
    assert!(e.contains("chain.toml: no [[disk]]") && e.contains("at least one service domain"), "{e}");
}

#[test]
fn every_disk_refusal_names_its_line() {
    let fx = Fx::new();
    fx.refuses(&disk("\"good.key\"", "[]"), "chain = []", "empty chain");
    fx.refuses(&disk("\"good.key\"", "[\"nope\"]"), "chain =", "no image `nope`");
    fx.refuses(&disk("\"good.key\"", "[\"dedup\"]"), "chain =", "does not offer a block device upstream");
    fx.refuses(
        &disk("\"good.key\"", "[\"storage-crypt\"]").replace("vol.img", "absent.img"),
        "volume =",
        "does not exist",
    );
    fx.refuses(&disk("\"bad.key\"", "[\"storage-crypt\"]"), "key =", "is not hex");
    fx.refuses(&disk("\"absent.key\"", "[\"storage-crypt\"]"), "key =", "reading key file");
    fx.refuses(
        &disk("[\"good.key\"]", "[\"storage-crypt\", \"storage-crypt\"]"),
        "key =",
        "needs `key = [...]` with one key file per SD",
    );
    fx.refuses(&disk("[\"bad.key\", \"good.key\"]", "[\"storage-crypt\", \"storage-crypt\"]"), "key =", "is not hex");
    fx.refuses(
        &format!("{}format = \"xts\"\n", disk("\"good.key\"", "[\"storage-crypt\"]")),
        "format =",
        "format `xts` is not `native` or `raw`",
    );
    let neither = format!("{CLIENT}[[disk]]\nvolume = \"vol.img\"\nchain = [\"storage-crypt\"]\n");
    fx.refuses(&neither, "volume =", "give exactly one of `key` or `luks_passphrase`");
    let both = format!("{}luks_passphrase = \"pass\"\n", disk("\"good.key\"", "[\"storage-crypt\"]"));
    fx.refuses(&both, "volume =", "give exactly one of");
    let luks = format!(
        "{CLIENT}[[disk]]\nvolume = \"vol.img\"\nluks_passphrase = \"absent-pass\"\nchain = [\"storage-crypt\"]\n"
    );
    fx.refuses(&luks, "luks_passphrase =", "absent-pass");
    let luks2 = format!(
        "{CLIENT}[[disk]]\nvolume = \"vol.img\"\nluks_passphrase = \"p\"\n\
         chain = [\"storage-crypt\", \"storage-crypt\"]\nkey = [\"good.key\", \"good.key\"]\n"
    );
    fx.refuses(&luks2, "volume =", "`luks_passphrase` works with a single-SD chain only");
    let attested =
        format!("{}[udom0]\n", disk("[\"good.key\", \"good.key\"]", "[\"storage-crypt\", \"storage-crypt\"]"));
    fx.refuses(&attested, "key =", "with [udom0], a disk has one storage SD");
}

#[test]
fn an_sd_that_does_not_serve_nbd_over_a_block_device_is_refused_at_its_chain_line() {
    let fx = Fx::with_images(|t| t.replace("offers = [\"block\"]\nneeds = [\"block\"]", "offers = [\"block\"]"));
    fx.refuses(&disk("\"good.key\"", "[\"storage-crypt\"]"), "chain =", "does not take a block device downstream");
}

#[test]
fn every_memory_sd_refusal_names_its_section() {
    let fx = Fx::new();
    let ck = |extra: &str| format!("{CLIENT}[checkpoint]\ndisk = \"ck.img\"\nkey = \"good.key\"\n{extra}");
    fx.refuses(&ck("").replace("good.key", "bad.key"), "[checkpoint]", "is not hex");
    fx.refuses(&ck("volume_key = \"good.key\"\n"), "[checkpoint]", "checkpoint volume");
    std::fs::write(fx.dir.path().join("ck.img"), b"").unwrap();
    fx.refuses(&ck("volume_key = \"bad.key\"\n"), "[checkpoint]", "volume_key: key file");
    fx.refuses(&ck("volume_key = \"good.key\"\n[udom0]\n"), "[checkpoint]", "not keyed through Udom0 yet");
    fx.refuses(&format!("{CLIENT}[dedup]\nperiod = 0\n"), "[dedup]", "period = 0");
    fx.refuses("[client]\ncount = 2\n[introspect]\n", "[introspect]", "monitors one client");
    fx.refuses(&format!("{CLIENT}[introspect]\nprofile = \"absent.json\"\n"), "[introspect]", "[introspect]:");

    // Images that do not declare what the section needs.
    let fx = Fx::with_images(|t| t.replace("windows = 2", "windows = 0"));
    fx.refuses(&format!("{CLIENT}[dedup]\n"), "[dedup]", "does not declare a memory window");
    let fx = Fx::with_images(|t| t.replace("name = \"checkpoint\"", "name = \"checkpoint-old\""));
    fx.refuses(&format!("{CLIENT}[checkpoint]\ndisk = \"d\"\nkey = \"good.key\"\n"), "[checkpoint]", "needs the");
    let fx = Fx::with_images(|t| t.replace("name = \"storage-crypt\"", "name = \"storage-old\""));
    std::fs::write(fx.dir.path().join("ck.img"), b"").unwrap();
    fx.refuses(
        &format!("{CLIENT}[checkpoint]\ndisk = \"ck.img\"\nkey = \"good.key\"\nvolume_key = \"good.key\"\n"),
        "[checkpoint]",
        "puts a storage SD under the checkpoints",
    );
}

#[test]
fn every_hsm_and_udom0_refusal_names_its_section() {
    let fx = Fx::new();
    fx.refuses(&format!("{CLIENT}[hsm]\npin_file = \"absent\"\n"), "[hsm]", "[hsm]: reading PIN file");
    std::fs::write(fx.dir.path().join("pin"), "123456\n").unwrap();
    fx.refuses("[client]\ncount = 2\n[hsm]\npin_file = \"pin\"\n", "[hsm]", "serves one client");
    fx.refuses(&format!("{CLIENT}[dedup]\n[udom0]\nlisten = \"10.0.0.1:7443\"\n"), "[udom0]", "loopback");
    fx.refuses(
        &format!("{CLIENT}[hsm]\npin_file = \"pin\"\naudit_when_full = \"maybe\"\n"),
        "[hsm]",
        "audit_when_full = `maybe`: `block` (the default) or `drop-oldest`",
    );
    let fx = Fx::with_images(|t| t.replace("permissions = [\"hsm\"]", "permissions = []"));
    std::fs::write(fx.dir.path().join("pin"), "123456\n").unwrap();
    fx.refuses(&format!("{CLIENT}[hsm]\npin_file = \"pin\"\n"), "[hsm]", "does not declare the `hsm` permission");
    let fx = Fx::with_images(|t| t.replace("name = \"domc\"", "name = \"domc-old\""));
    fx.refuses(&format!("{CLIENT}[hsm]\npin_file = \"pin\"\n"), "[hsm]", "`domc`");
    let fx = Fx::with_images(|t| t.replace("name = \"udom0\"", "name = \"udom0-old\""));
    fx.refuses(&format!("{CLIENT}[dedup]\n[udom0]\n"), "[udom0]", "no image `udom0`");
}

#[test]
fn every_client_refusal_names_its_line() {
    let fx = Fx::new();
    for n in [0, 17] {
        fx.refuses(&format!("[client]\ncount = {n}\n[dedup]\n"), "count =", "a chain runs 1 to 16 clients");
    }
    fx.refuses(
        &format!("[client]\ncount = 2\n{}", disk("\"good.key\"", "[\"storage-crypt\"]").replace(CLIENT, "")),
        "count =",
        "several clients work without [[disk]] and [checkpoint] only",
    );
    fx.refuses("[client]\nkernel = \"absent-kernel\"\n[dedup]\n", "kernel =", "client kernel");
    fx.refuses("[client]\nkernel = \"vmlinuz\"\ninitrd = \"absent\"\n[dedup]\n", "initrd =", "client initrd");
    // The default client files are named with the way to build them (the
    // test runs in host-tools/, where build/client does not exist).
    let e = format!("{:#}", fx.plan("[dedup]\n").err().unwrap());
    assert!(e.contains("chain.toml: client kernel") && e.contains("make client"), "{e}");
}
