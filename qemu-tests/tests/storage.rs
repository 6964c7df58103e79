//! The storage encryption SD with real NBD peers: qemu-io (QEMU's NBD
//! client), nbdinfo and nbdcopy (libnbd).

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tests::ssc::builder::{Domain, DomainSpec, LinkSpec, LogEcho, NbdDisk, RunDir};
use qemu_tests::*;
use sd_storage_crypt::xts::Xts;
use ssc_abi::{Body, VolumeConfig};

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

struct Sd {
    domain: Domain,
    socket: PathBuf,
    volume: PathBuf,
    _run_dir: RunDir,
}

/// Boots storage-crypt on a fresh `size`-byte volume file in `dir`.
fn boot(dir: &Path, size: u64) -> Sd {
    let volume = dir.join("volume.img");
    std::fs::File::create(&volume).unwrap().set_len(size).unwrap();
    boot_on(dir, &volume)
}

/// Boots storage-crypt on an existing volume file.
fn boot_on(dir: &Path, volume: &Path) -> Sd {
    let volume = volume.to_path_buf();
    let socket = dir.join("nbd.sock");
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("storage-crypt", &image("storage-crypt"));
    spec.disks.push(volume.clone());
    spec.links.push(LinkSpec::listen("nbd", &socket));
    let mut domain = Domain::launch(&spec, accel(), &run_dir, LogEcho::Stdout("[storage-crypt] ".into())).unwrap();
    domain.wait_ready(Duration::from_secs(60)).unwrap();
    Sd { domain, socket, volume, _run_dir: run_dir }
}

fn xts_config(key: &[u8]) -> VolumeConfig<'_> {
    VolumeConfig::xts_plain64("vol", key)
}

fn configure(sd: &mut Sd, cfg: VolumeConfig<'_>) -> anyhow::Result<()> {
    sd.domain.control().expect("control link").request(Body::ConfigureVolume(cfg), Duration::from_secs(30))
}

fn nbd_opts(sd: &Sd) -> String {
    format!("driver=nbd,server.type=unix,server.path={},export=vol", sd.socket.display())
}

fn qemu_io(sd: &Sd, commands: &[&str]) -> String {
    let opts = nbd_opts(sd);
    let mut args = vec!["--image-opts", opts.as_str()];
    for c in commands {
        args.extend(["-c", c]);
    }
    let (ok, out) = peer("qemu-io", &args, T);
    assert!(ok && !out.contains("fail") && !out.contains("error"), "qemu-io {commands:?}:\n{out}");
    out
}

#[test]
fn qemu_io_writes_and_reads_through_the_sd_and_the_volume_holds_only_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sd = boot(tmp.path(), 64 * MIB as u64);
    let key = noise(64, 99);
    configure(&mut sd, xts_config(&key)).unwrap();
    let out = qemu_io(
        &sd,
        &["write -P 0x5a 0 4M", "read -P 0x5a 0 4M", "write -P 0xa5 1000 3000", "read -P 0xa5 1000 3000", "flush"],
    );
    assert!(out.contains("wrote 4194304/4194304 bytes") && out.contains("read 3000/3000 bytes"), "{out}");
    let file = std::fs::read(&sd.volume).unwrap();
    assert!(!file.windows(64).any(|w| w.iter().all(|&b| b == 0x5a)), "plaintext marker found in the provider's volume");
    // The file is dm-crypt's aes-xts-plain64: sector 10 decrypts with IV 10.
    let mut sector = file[10 * 512..11 * 512].to_vec();
    Xts::new(&key).unwrap().decrypt_sector(10, &mut sector);
    assert!(sector.iter().all(|&b| b == 0x5a), "the volume is not aes-xts-plain64 with the given key");
    // An unaligned write landed with read-modify-write around it.
    let mut s1 = file[512..1024].to_vec();
    Xts::new(&key).unwrap().decrypt_sector(1, &mut s1);
    assert!(s1[..1000 - 512].iter().all(|&b| b == 0x5a) && s1[1000 - 512..].iter().all(|&b| b == 0xa5));
}

#[test]
fn nbdinfo_and_nbdcopy_see_the_export_and_copy_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sd = boot(tmp.path(), 16 * MIB as u64);
    configure(&mut sd, xts_config(&noise(64, 5))).unwrap();
    let uri = format!("nbd+unix:///vol?socket={}", sd.socket.display());
    let (ok, info) = peer("nbdinfo", &["--json", &uri], T);
    assert!(ok && info.contains("\"export-size\": 16777216") && info.contains("\"export-name\": \"vol\""), "{info}");
    let (ok, list) = peer("nbdinfo", &["--list", &format!("nbd+unix://?socket={}", sd.socket.display())], T);
    assert!(ok && list.contains("vol"), "{list}");
    let input = tmp.path().join("in.img");
    let data = noise(16 * MIB, 11);
    std::fs::write(&input, &data).unwrap();
    let (ok, out) = peer("nbdcopy", &[input.to_str().unwrap(), &uri], T);
    assert!(ok, "nbdcopy in: {out}");
    let output = tmp.path().join("out.img");
    let (ok, out) = peer("nbdcopy", &[&uri, output.to_str().unwrap()], T);
    assert!(ok, "nbdcopy out: {out}");
    assert!(std::fs::read(&output).unwrap() == data, "data copied in did not come back out");
    assert!(std::fs::read(&sd.volume).unwrap() != data, "the volume holds the plaintext");
}

#[test]
fn bad_configurations_are_refused_by_name_and_a_good_one_still_works() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sd = boot(tmp.path(), 8 * MIB as u64);
    let short = noise(32, 1);
    let e = configure(&mut sd, xts_config(&short)).unwrap_err().to_string();
    assert!(e.contains("64-byte"), "{e}");
    let key = noise(64, 2);
    let e = configure(&mut sd, VolumeConfig { cipher: "aes-cbc-essiv", ..xts_config(&key) }).unwrap_err().to_string();
    assert!(e.contains("not supported"), "{e}");
    let e = configure(&mut sd, VolumeConfig { sector_size: 1024, ..xts_config(&key) }).unwrap_err().to_string();
    assert!(e.contains("sector size 1024"), "{e}");
    let e =
        configure(&mut sd, VolumeConfig { data_offset: 64 * MIB as u64, ..xts_config(&key) }).unwrap_err().to_string();
    assert!(e.contains("no room"), "{e}");
    configure(&mut sd, xts_config(&key)).unwrap();
    let e = configure(&mut sd, xts_config(&key)).unwrap_err().to_string();
    assert!(e.contains("already configured"), "{e}");
    qemu_io(&sd, &["write -P 7 0 64k", "read -P 7 0 64k"]);
    assert!(!sd.domain.log().iter().any(|l| l.contains(&format!("{:?}", &key[..4]))), "key bytes in the log");
}

#[test]
fn a_garbage_speaking_client_does_not_stop_the_next_one() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let mut sd = boot(tmp.path(), 8 * MIB as u64);
    configure(&mut sd, xts_config(&noise(64, 3))).unwrap();
    {
        let mut s = std::os::unix::net::UnixStream::connect(&sd.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        s.write_all(&[0xff; 4096]).unwrap(); // bad client flags, then junk
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(300));
    qemu_io(&sd, &["write -P 9 4096 4096", "read -P 9 4096 4096"]);
    assert!(sd.domain.log().iter().any(|l| l.contains("NBD session closed: client sent unknown handshake flags")));
}

/// A raw NBD connection to the SD, past the handshake (fixed newstyle, GO
/// for `vol`): for clients no real peer plays.
fn raw_nbd(sd: &Sd) -> std::os::unix::net::UnixStream {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut hello = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    hello.extend_from_slice(b"IHAVEOPT");
    hello.extend_from_slice(&7u32.to_be_bytes()); // GO
    hello.extend_from_slice(&9u32.to_be_bytes());
    hello.extend_from_slice(&3u32.to_be_bytes());
    hello.extend_from_slice(b"vol");
    hello.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&hello).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        match kind {
            1 => return s, // ACK: transmission starts
            3 => continue, // INFO
            other => panic!("GO refused with reply type {other:#x}"),
        }
    }
}

/// The SD's log shows no allocation failure and no panic.
fn assert_sd_healthy(sd: &Sd) {
    let log = sd.domain.log();
    assert!(
        !log.iter().any(|l| l.contains("memory allocation") || l.contains("panic")),
        "the SD ran out of memory or panicked:\n{}",
        log.join("\n")
    );
}

#[test]
fn pipelined_32_mib_reads_cannot_exhaust_the_sd() {
    use std::io::{Read, Write};
    // The attack: four 32 MiB reads in 112 bytes, sent before reading any
    // reply; served at once they needed 128 MiB of replies in a 128 MiB SD
    // ("memory allocation of … bytes failed", panic). The null cipher keeps
    // this about memory, not emulated AES: the volume is the plaintext, so
    // markers written into the file must come back where they were put.
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path().join("volume.img");
    let size = 160 * MIB as u64;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&volume).unwrap();
        f.set_len(size).unwrap();
        for h in 0..4u64 {
            f.write_all_at(format!("MARK-{h}").as_bytes(), h * 32 * MIB as u64 + 12345).unwrap();
        }
    }
    let mut sd = boot_on(tmp.path(), &volume);
    configure(&mut sd, VolumeConfig { cipher: "null", key: &[], ..xts_config(&[]) }).unwrap();
    let mut s = raw_nbd(&sd);
    let mut batch = vec![];
    for h in 0..4u64 {
        batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        batch.extend_from_slice(&[0, 0, 0, 0]); // flags, READ
        batch.extend_from_slice(&h.to_be_bytes());
        batch.extend_from_slice(&(h * 32 * MIB as u64).to_be_bytes());
        batch.extend_from_slice(&(32 * MIB as u32).to_be_bytes());
    }
    assert_eq!(batch.len(), 112);
    s.write_all(&batch).unwrap();
    let mut data = vec![0u8; 32 * MIB];
    for h in 0..4u64 {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0, "read {h} failed");
        assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), h, "replies out of order");
        s.read_exact(&mut data).unwrap();
        assert_eq!(&data[12345..12351], format!("MARK-{h}").as_bytes(), "read {h} returned the wrong bytes");
    }
    drop(s);
    // nbdcopy of the whole export, the other way the SD died, then qemu-io.
    let uri = format!("nbd+unix:///vol?socket={}", sd.socket.display());
    let out = tmp.path().join("copy.img");
    let (ok, text) = peer("nbdcopy", &[&uri, out.to_str().unwrap()], T);
    assert!(ok, "nbdcopy of the 160 MiB export: {text}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&volume).unwrap(), "nbdcopy brought back other bytes");
    qemu_io(&sd, &["read -P 0 1M 1M"]);
    assert_sd_healthy(&sd);
}

/// Boots the Linux client with `job` and the SD's export as its disk
/// (/dev/vda); returns the client's console.
fn run_client(sd: &Sd, dir: &Path, job: &str) -> Vec<String> {
    run_client_on(dir, job, |spec| spec.nbd_disks.push(NbdDisk { socket: sd.socket.clone(), export: "vol".into() }))
}

/// Boots the Linux client with `job` and the disks `attach` adds.
fn run_client_on(dir: &Path, job: &str, attach: impl FnOnce(&mut DomainSpec)) -> Vec<String> {
    let (kernel, _) = client_kernel();
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("client", &kernel);
    spec.initrd = Some(client_initrd(dir, job));
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = 512;
    attach(&mut spec);
    let mut client = Domain::launch(&spec, accel(), &run_dir, LogEcho::Stdout("[client] ".into())).unwrap();
    client.wait_ready(Duration::from_secs(120)).unwrap();
    let exit = client.wait_exit(Some(Duration::from_secs(600))).unwrap();
    let log = client.log();
    assert!(log.iter().any(|l| l == "client: job passed"), "the client's job failed ({exit}):\n{}", log.join("\n"));
    log
}

const MARKER: &str = "SSC-PLAINTEXT-MARKER-7f3a9c";

#[test]
fn a_linux_client_runs_fio_verify_through_the_sd_and_again_after_a_chain_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let key = noise(64, 1234);
    let mut sd = boot(tmp.path(), 64 * MIB as u64);
    configure(&mut sd, xts_config(&key)).unwrap();
    let fio = "fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --bs=4k \
               --size=16M --verify=crc32c --verify_fatal=1";
    run_client(
        &sd,
        tmp.path(),
        &format!(
            "{fio} --rw=randwrite --do_verify=1
             printf '{MARKER}' > /tmp/m; dd if=/tmp/m of=/dev/vda bs=512 seek=65536 conv=sync,notrunc; sync"
        ),
    );
    let file = std::fs::read(&sd.volume).unwrap();
    assert!(!file.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "the client's marker is in the volume file");
    let mut sector = file[65536 * 512..65537 * 512].to_vec();
    Xts::new(&key).unwrap().decrypt_sector(65536, &mut sector);
    assert!(sector.starts_with(MARKER.as_bytes()), "the marker did not land encrypted at sector 65536");

    // Restart the chain: a new SD on the same volume, the same key, and a
    // client that only verifies what the first one wrote.
    assert_eq!(sd.domain.shutdown(Duration::from_secs(30)).unwrap(), qemu_tests::ssc::qemu::ImageExit::Success);
    let volume = sd.volume.clone();
    drop(sd);
    let mut sd = boot_on(tmp.path(), &volume);
    configure(&mut sd, xts_config(&key)).unwrap();
    run_client(&sd, tmp.path(), &format!("{fio} --rw=randwrite --verify_only"));
}

/// A LUKS1 volume made by QEMU's own luks driver (aes-256-xts-plain64,
/// sha256; a short PBKDF2 time to keep the test fast).
fn qemu_luks_volume(dir: &Path, size: &str) -> PathBuf {
    let vol = dir.join("volume.luks");
    qemu_tests::ssc::luks::qemu_img_create(&vol, size, "correct horse", 10).unwrap();
    vol
}

fn qemu_io_luks(vol: &Path, commands: &[&str]) -> (bool, String) {
    let opts = format!("driver=luks,key-secret=sec0,file.filename={}", vol.display());
    let mut args = vec!["--object", "secret,id=sec0,data=correct horse", "--image-opts", opts.as_str()];
    for c in commands {
        args.extend(["-c", c]);
    }
    peer("qemu-io", &args, T)
}

#[test]
fn luks1_volumes_interoperate_with_qemus_luks_driver_both_ways() {
    use qemu_tests::ssc::luks;
    let tmp = tempfile::tempdir().unwrap();
    let vol = qemu_luks_volume(tmp.path(), "32M");
    // QEMU writes first, through its own LUKS driver.
    let (ok, out) = qemu_io_luks(&vol, &["write -P 0x3c 1M 2M"]);
    assert!(ok && !out.contains("fail"), "{out}");
    let wrong = luks::unlock(&vol, b"Tr0ub4dor&3").unwrap_err().to_string();
    assert!(wrong.contains("wrong passphrase"), "{wrong}");
    let unlocked = luks::unlock(&vol, b"correct horse").unwrap();
    assert!(unlocked.data_offset > 0 && unlocked.key.len() == 64, "{unlocked:?}");

    let mut sd = boot_on(tmp.path(), &vol);
    configure(&mut sd, VolumeConfig { data_offset: unlocked.data_offset, ..xts_config(&unlocked.key) }).unwrap();
    // The SD reads what QEMU's LUKS driver wrote, and writes its own.
    qemu_io(&sd, &["read -P 0x3c 1M 2M", "write -P 0xc3 8M 1M", "flush"]);
    assert_eq!(sd.domain.shutdown(Duration::from_secs(30)).unwrap(), qemu_tests::ssc::qemu::ImageExit::Success);
    drop(sd);
    // QEMU's LUKS driver reads what the SD wrote, header untouched.
    let (ok, out) = qemu_io_luks(&vol, &["read -P 0xc3 8M 1M", "read -P 0x3c 1M 2M"]);
    assert!(ok && !out.contains("fail") && !out.contains("Pattern verification"), "{out}");
}

#[test]
fn a_truncated_or_foreign_luks_header_is_refused_by_name() {
    use qemu_tests::ssc::luks;
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 4096]).unwrap();
    assert!(luks::unlock(&plain, b"x").unwrap_err().to_string().contains("not a LUKS volume"));
    let vol = qemu_luks_volume(tmp.path(), "8M");
    let bytes = std::fs::read(&vol).unwrap();
    let cut = tmp.path().join("cut.luks");
    std::fs::write(&cut, &bytes[..8192]).unwrap();
    let e = luks::unlock(&cut, b"correct horse").unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

/// A LUKS2 volume with 4096-byte sectors, formatted by cryptsetup; returns
/// its volume key and data offset as `luksDump --dump-volume-key` reports.
fn cryptsetup_luks2_4096(dir: &Path) -> (PathBuf, Vec<u8>, u64) {
    cryptsetup_luks2(dir, &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
}

/// A LUKS2 volume (64 MiB, 4096-byte sectors, passphrase `open sesame`)
/// formatted by cryptsetup with `kdf` options; its volume key and data
/// offset as cryptsetup reports them.
fn cryptsetup_luks2(dir: &Path, kdf: &[&str]) -> (PathBuf, Vec<u8>, u64) {
    let vol = dir.join("luks2.img");
    std::fs::File::create(&vol).unwrap().set_len(64 * MIB as u64).unwrap();
    let pass = dir.join("pass");
    std::fs::write(&pass, "open sesame").unwrap();
    let (v, p) = (vol.to_str().unwrap(), pass.to_str().unwrap());
    let (ok, out) = peer(
        "cryptsetup",
        &["luksFormat", "--type", "luks2", "--sector-size", "4096", "--batch-mode"]
            .into_iter()
            .chain(kdf.iter().copied())
            .chain(["--key-file", p, v])
            .collect::<Vec<_>>(),
        T,
    );
    assert!(ok, "cryptsetup luksFormat: {out}");
    let (ok, dump) = peer("cryptsetup", &["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", p, v], T);
    assert!(ok, "cryptsetup luksDump: {dump}");
    let mut key = vec![];
    let mut in_key = false;
    for line in dump.lines() {
        let body = match line.split_once("MK dump:").or_else(|| line.split_once("Volume key:")) {
            Some((_, rest)) => {
                in_key = true;
                rest
            }
            None if in_key => line,
            None => continue,
        };
        let bytes: Vec<u8> = body.split_whitespace().filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
        if bytes.is_empty() {
            in_key = false;
        }
        key.extend(bytes);
    }
    assert_eq!(key.len(), 64, "volume key from luksDump:\n{dump}");
    let (ok, layout) = peer("cryptsetup", &["luksDump", v], T);
    assert!(ok, "cryptsetup luksDump: {layout}");
    let offset = layout
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("offset:").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok())
        })
        .expect("data segment offset in luksDump");
    (vol, key, offset)
}

fn fio_region(name: &str, offset: &str, extra: &str) -> String {
    format!(
        "fio --name={name} --filename=$DEV --direct=1 --ioengine=libaio --iodepth=8 --bs=4k --offset={offset} \\
         --size=8M --rw=randwrite --randseed=7 --verify=crc32c --verify_fatal=1 {extra}"
    )
}

#[test]
fn luks2_volumes_unlock_on_the_tenant_side_with_pbkdf2_and_argon2id() {
    use qemu_tests::ssc::luks;
    for kdf in [
        &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"][..],
        &["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "2"],
        &["--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "16384", "--pbkdf-parallel", "1"],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (vol, key, offset) = cryptsetup_luks2(tmp.path(), kdf);
        let u = luks::unlock(&vol, b"open sesame").unwrap();
        assert_eq!((u.version, u.sector_size, u.data_offset, u.iv_offset), (2, 4096, offset, 0), "{kdf:?}: {u:?}");
        assert!(u.key == key, "{kdf:?}: the unlocked key differs from cryptsetup's");
        let wrong = luks::unlock(&vol, b"open sesame!").unwrap_err().to_string();
        assert!(wrong.contains("wrong passphrase"), "{wrong}");
        // A damaged primary header: the secondary copy still opens.
        let mut bytes = std::fs::read(&vol).unwrap();
        bytes[4096 + 10] ^= 0x55;
        std::fs::write(&vol, &bytes).unwrap();
        assert!(luks::unlock(&vol, b"open sesame").unwrap().key == key, "{kdf:?}: secondary header");
        // Both copies damaged: refused by name.
        for at in [0x4000usize, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000] {
            bytes[at + 4096 + 10] ^= 0x55;
        }
        std::fs::write(&vol, &bytes).unwrap();
        let e = luks::unlock(&vol, b"open sesame").unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }
}

#[test]
fn luks2_with_4096_byte_sectors_interoperates_with_dm_crypt_in_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let (vol, key, offset) = cryptsetup_luks2_4096(tmp.path());
    // The tenant tool unlocks it to the same key and layout cryptsetup reports.
    let u = qemu_tests::ssc::luks::unlock(&vol, b"open sesame").unwrap();
    assert!(u.key == key && u.data_offset == offset && u.sector_size == 4096, "{u:?}");
    let cfg = |key| VolumeConfig { sector_size: 4096, data_offset: offset, large_iv: false, ..xts_config(key) };

    // 1. Region A written through the SD.
    let mut sd = boot_on(tmp.path(), &vol);
    configure(&mut sd, cfg(&key)).unwrap();
    run_client(&sd, tmp.path(), &format!("DEV=/dev/vda\n{}", fio_region("a", "0", "--do_verify=1")));
    assert_eq!(sd.domain.shutdown(Duration::from_secs(30)).unwrap(), qemu_tests::ssc::qemu::ImageExit::Success);
    drop(sd);

    // 2. The kernel's dm-crypt, opened by cryptsetup in a client on the raw
    //    volume: region A verifies, region B is written.
    let job = format!(
        "echo -n 'open sesame' > /tmp/pass\n\
         DM_DISABLE_UDEV=1 cryptsetup open --disable-locks --key-file /tmp/pass /dev/vda sec\n\
         DEV=/dev/mapper/sec\n{}\n{}\n\
         DM_DISABLE_UDEV=1 cryptsetup close --disable-locks sec",
        fio_region("a", "0", "--verify_only"),
        fio_region("b", "16M", "--do_verify=1")
    );
    run_client_on(tmp.path(), &job, |spec| spec.disks.push(vol.clone()));

    // 3. Region B (written by dm-crypt) verifies through the SD.
    let mut sd = boot_on(tmp.path(), &vol);
    configure(&mut sd, cfg(&key)).unwrap();
    run_client(&sd, tmp.path(), &format!("DEV=/dev/vda\n{}", fio_region("b", "16M", "--verify_only")));
}

#[test]
fn killing_the_sd_mid_write_gives_io_errors_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let key = noise(64, 77);
    let volume = tmp.path().join("volume.img");
    std::fs::File::create(&volume).unwrap().set_len(32 * MIB as u64).unwrap();
    kill_mid_write_and_check(tmp.path(), &volume, &|sd: &mut Sd, _| configure(sd, xts_config(&key)).unwrap(), false);
}

#[test]
fn killing_the_sd_mid_write_on_an_authenticated_volume_loses_nothing_flushed_and_serves_nothing_wrong() {
    use qemu_tests::ssc::chain::{VolumeFormat, create_volume, read_key};
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path().join("volume.img");
    let keyfile = tmp.path().join("volume.key");
    create_volume(&volume, 32 * MIB as u64, &keyfile, VolumeFormat::Auth).unwrap();
    let key = read_key(&keyfile).unwrap();
    kill_mid_write_and_check(
        tmp.path(),
        &volume,
        &|sd: &mut Sd, generation| configure(sd, VolumeConfig::authenticated("vol", &key, generation)).unwrap(),
        true,
    );
}

/// Runs a client that writes 4 KiB chunks with fsync, kills the SD after
/// 40 acknowledged chunks, restarts it on the same volume and checks every
/// acknowledged chunk. `configure` keys the SD, given the generation the
/// tenant last saw (authenticated mode). `authenticated`: the chunk in
/// flight at the kill may fail its read (EIO) but reads as nothing other
/// than its old (zero) or new contents.
fn kill_mid_write_and_check(dir: &Path, volume: &Path, configure: &dyn Fn(&mut Sd, u64), authenticated: bool) {
    let mut sd = boot_on(dir, volume);
    configure(&mut sd, 1);
    // Each chunk is acknowledged only after dd's fsync returned (virtio-blk
    // flush → NBD FLUSH → the SD flushes its disk; authenticated: commits).
    let writer = "i=0
        while [ $i -lt 4000 ]; do
          yes \"chunk-$i\" | head -c 4096 > /tmp/c
          if dd if=/tmp/c of=/dev/vda bs=4096 seek=$i conv=fsync 2>/dev/null; then echo \"acked $i\"; else echo \"io error at $i\"; exit 0; fi
          i=$((i+1))
        done
        echo 'the SD was never killed'; exit 1";
    let (kernel, _) = client_kernel();
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("client", &kernel);
    spec.initrd = Some(client_initrd(dir, writer));
    spec.append = "console=ttyS0 quiet".into();
    spec.mem_mib = 512;
    spec.nbd_disks.push(NbdDisk { socket: sd.socket.clone(), export: "vol".into() });
    let mut client = Domain::launch(&spec, accel(), &run_dir, LogEcho::Quiet).unwrap();
    client.wait_ready(Duration::from_secs(120)).unwrap();
    let start = std::time::Instant::now();
    while !client.log().iter().any(|l| l == "acked 40") {
        assert!(start.elapsed() < Duration::from_secs(300), "the client never got going:\n{}", client.log().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    sd.domain.kill();
    // The tenant's view of the last commit (the SD reports every one).
    let generation = sd.domain.control_ref().and_then(|c| c.generation()).unwrap_or(1);
    assert!(!authenticated || generation > 1, "the SD never reported a commit");
    client.wait_exit(Some(Duration::from_secs(120))).unwrap();
    let log = client.log();
    assert!(log.iter().any(|l| l.starts_with("io error at")), "the client saw no I/O error:\n{}", log.join("\n"));
    let last = log.iter().filter_map(|l| l.strip_prefix("acked ")).filter_map(|n| n.parse::<u32>().ok()).max().unwrap();
    drop(sd);

    // Restart the SD on the same volume: every acknowledged chunk is there.
    let _ = std::fs::remove_file(dir.join("nbd.sock"));
    let mut sd = boot_on(dir, volume);
    configure(&mut sd, generation);
    let in_flight = if authenticated {
        format!(
            "i=$(({last}+1)); yes \"chunk-$i\" | head -c 4096 > /tmp/c; head -c 4096 /dev/zero > /tmp/z
             if dd if=/dev/vda of=/tmp/r bs=4096 skip=$i count=1 iflag=direct 2>/dev/null; then
               cmp -s /tmp/r /tmp/c || cmp -s /tmp/r /tmp/z || {{ echo \"chunk $i reads WRONG\"; bad=1; }}
               echo \"in-flight chunk $i: old or new contents\"
             else echo \"in-flight chunk $i: I/O error\"; fi"
        )
    } else {
        String::new()
    };
    let checker = format!(
        "i=0; bad=0
         while [ $i -le {last} ]; do
           yes \"chunk-$i\" | head -c 4096 > /tmp/c
           dd if=/dev/vda of=/tmp/r bs=4096 skip=$i count=1 2>/dev/null
           cmp -s /tmp/c /tmp/r || {{ echo \"lost chunk $i\"; bad=1; }}
           i=$((i+1))
         done
         echo \"checked chunks 0..={last}\"
         {in_flight}
         [ $bad = 0 ]"
    );
    let log = run_client(&sd, dir, &checker);
    assert!(log.iter().any(|l| l == &format!("checked chunks 0..={last}")), "{}", log.join("\n"));
    assert!(!authenticated || log.iter().any(|l| l.starts_with("in-flight chunk")), "{}", log.join("\n"));
}
