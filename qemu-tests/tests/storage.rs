//! The storage encryption SD with real NBD peers: qemu-io (QEMU's NBD
//! client), nbdinfo and nbdcopy (libnbd).

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tests::ssc::builder::{Domain, DomainSpec, LinkSpec, LogEcho, RunDir};
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
    let socket = dir.join("nbd.sock");
    let run_dir = RunDir::create().unwrap();
    let mut spec = DomainSpec::new("storage-crypt", &image("storage-crypt"));
    spec.disks.push(volume.clone());
    spec.links.push(LinkSpec { name: "nbd".into(), socket: socket.clone() });
    let mut domain = Domain::launch(&spec, accel(), &run_dir, LogEcho::Stdout("[storage-crypt] ".into())).unwrap();
    domain.wait_ready(Duration::from_secs(60)).unwrap();
    Sd { domain, socket, volume, _run_dir: run_dir }
}

fn xts_config(key: &[u8]) -> VolumeConfig<'_> {
    VolumeConfig {
        export: "vol",
        cipher: "aes-xts-plain64",
        key,
        sector_size: 512,
        data_offset: 0,
        iv_offset: 0,
        large_iv: false,
        read_only: false,
    }
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
