//! `ssc bench storage-core`: the storage SD's core, natively, beside its
//! anchors in the same invocation (the layer that carries over to a real KVM
//! host, where guest code runs at native speed):
//!
//! * `aes-xts-plain64` over 4 KiB sectors (encrypt and decrypt) vs
//!   `openssl speed -evp aes-256-xts -bytes 4096`;
//! * the authenticated mode (`aes-256-gcm`) sealing and opening 4 KiB
//!   sectors through the volume layer (records and all) vs
//!   `openssl speed -evp aes-256-gcm -bytes 4096`, with the bare `aes-gcm`
//!   crate beside it (what our layer costs on top);
//! * the NBD server's requests per second over an in-memory volume
//!   (4 KiB reads and writes, pipelined 32 deep): XTS, authenticated, null.
//!
//! Built without optimizations the figures mean nothing; the command says so.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_storage_crypt::auth::AuthVolume;
use sd_storage_crypt::nbd::{Backend, Export, Server};
use sd_storage_crypt::volume::{Cipher, CryptVolume, Layout, MemDevice};
use sd_storage_crypt::xts::Xts;
use serde::Serialize;

/// One row of the table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub what: String,
    pub value: f64,
    pub unit: &'static str,
    pub anchor: Option<(String, f64)>,
}

const SECTOR: usize = 4096;

fn key() -> Vec<u8> {
    (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
}

/// Best of three passes of `f` over `bytes` bytes, in GB/s (10^9).
fn gbps(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

/// OpenSSL's figure for a cipher at 4 KiB, in GB/s.
pub fn openssl_speed(cipher: &str) -> Result<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-evp", cipher, "-bytes", "4096", "-seconds", "2"])
        .output()
        .context("running `openssl speed` (install openssl)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kbps = text
        .lines()
        .filter(|l| l.to_lowercase().starts_with(cipher))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|v| v.trim_end_matches('k').parse::<f64>().ok())
        .next_back();
    match kbps {
        Some(k) => Ok(k * 1000.0 / 1e9),
        None => bail!("could not read `openssl speed -evp {cipher}` output:\n{text}"),
    }
}

/// An authenticated volume over `size` bytes of memory.
fn auth_volume(size: usize) -> AuthVolume<MemDevice> {
    let mut d = MemDevice::new(size);
    let h = sd_storage_crypt::auth::format(&key(), size as u64, [1; 32], [2; 16]).expect("big enough");
    d.bytes[..512].copy_from_slice(&h);
    let salt = sd_storage_crypt::auth::OpenSalt::from_random([7; 8]);
    AuthVolume::open(d, &key(), 0, sd_storage_crypt::auth::Access::ReadWrite(salt)).expect("fresh volume")
}

fn nbd_requests_per_second<B: Backend>(vol: &mut B, write: bool) -> f64 {
    const DEPTH: usize = 32;
    const BATCHES: usize = 2000;
    let size = (vol.size() as usize).min(64 << 20);
    let mut s = Server::new(Export { name: "bench".into(), description: String::new() });
    s.take_output();
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    s.receive(&go, vol).expect("handshake");
    s.take_output();
    let mut batch = Vec::new();
    for i in 0..DEPTH {
        batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        batch.extend_from_slice(&0u16.to_be_bytes());
        batch.extend_from_slice(&u16::from(write).to_be_bytes());
        batch.extend_from_slice(&(i as u64).to_be_bytes());
        batch.extend_from_slice(&((i * 7919 % (size / SECTOR)) as u64 * SECTOR as u64).to_be_bytes());
        batch.extend_from_slice(&(SECTOR as u32).to_be_bytes());
        if write {
            batch.extend(std::iter::repeat_n(i as u8, SECTOR));
        }
    }
    let t = Instant::now();
    for _ in 0..BATCHES {
        s.receive(&batch, vol).expect("requests");
        std::hint::black_box(s.take_output());
    }
    (DEPTH * BATCHES) as f64 / t.elapsed().as_secs_f64()
}

/// Runs every measurement.
pub fn run() -> Result<Vec<Row>> {
    let x = Xts::new(&key()).expect("64-byte key");
    let mut buf = vec![0x5au8; 256 << 20];
    let enc = gbps(buf.len(), || {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            x.encrypt_sector(i as u64 * 8, s);
        }
    });
    let dec = gbps(buf.len(), || {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            x.decrypt_sector(i as u64 * 8, s);
        }
    });
    let ecb = {
        use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
        let aes = aes::Aes256::new_from_slice(&key()[..32]).expect("32-byte key");
        gbps(buf.len(), || {
            for s in buf.chunks_mut(SECTOR) {
                let (blocks, _) = s.as_chunks_mut::<16>();
                aes.encrypt_blocks(Array::cast_slice_from_core_mut(blocks));
            }
        })
    };
    let ossl_xts = openssl_speed("aes-256-xts")?;
    let ossl_gcm = openssl_speed("aes-256-gcm")?;
    // The authenticated mode's sector AEAD in place (like the XTS rows).
    let sealer = sd_storage_crypt::auth::Sealer::new(&key(), [3; 16]);
    let mut tags = vec![[0u8; 16]; buf.len() / SECTOR];
    let seal_core = gbps(buf.len(), || {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            tags[i] = sealer.seal(i as u64, i as u64 + 1, s);
        }
    });
    // Opening destroys the ciphertext: reseal (untimed) before each pass.
    let mut ok = true;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            tags[i] = sealer.seal(i as u64, i as u64 + 1, s);
        }
        let t = Instant::now();
        for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
            ok &= sealer.open(i as u64, i as u64 + 1, s, &tags[i]);
        }
        best = best.min(t.elapsed());
    }
    let open_core = buf.len() as f64 / best.as_secs_f64() / 1e9;
    if !ok {
        bail!("the authenticated-mode benchmark failed its own tags");
    }
    // The authenticated mode through its volume layer: every sector sealed
    // with its own nonce, its record updated (the first pass also writes).
    let mut av = auth_volume((256 << 20) + (16 << 20));
    let span = buf.len().min(av.size() as usize);
    let seal = gbps(span, || av.write(0, &buf[..span]).expect("write"));
    let open = gbps(span, || av.read(0, &mut buf[..span]).expect("read"));
    let bare_gcm = {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let gcm = aes_gcm::Aes256Gcm::new_from_slice(&key()[..32]).expect("32-byte key");
        gbps(buf.len(), || {
            for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                std::hint::black_box(gcm.encrypt_inout_detached(&nonce.into(), b"", s.into()).expect("4 KiB"));
            }
        })
    };
    let mut rows = vec![
        Row {
            what: "aes-xts-plain64 encrypt, 4 KiB sectors".into(),
            value: enc,
            unit: "GB/s",
            anchor: Some(("openssl aes-256-xts".into(), ossl_xts)),
        },
        Row {
            what: "aes-xts-plain64 decrypt, 4 KiB sectors".into(),
            value: dec,
            unit: "GB/s",
            anchor: Some(("openssl aes-256-xts".into(), ossl_xts)),
        },
    ];
    rows.push(Row {
        what: "ceiling: the aes crate's AES-256 on 4 KiB batches (ECB, no XTS)".into(),
        value: ecb,
        unit: "GB/s",
        anchor: Some(("openssl aes-256-xts".into(), ossl_xts)),
    });
    let gcm = |what: &str, value| Row {
        what: what.into(),
        value,
        unit: "GB/s",
        anchor: Some(("openssl aes-256-gcm".into(), ossl_gcm)),
    };
    rows.push(gcm("authenticated (aes-256-gcm) seal, 4 KiB sectors in place", seal_core));
    rows.push(gcm("authenticated (aes-256-gcm) open + verify, 4 KiB sectors in place", open_core));
    rows.push(gcm("authenticated volume write (seal, record, copy to the memory device)", seal));
    rows.push(gcm("authenticated volume read (copy from the memory device, verify, open)", open));
    rows.push(gcm("ceiling: the aes-gcm crate sealing 4 KiB sectors", bare_gcm));
    let layout = Layout::PLAIN_512;
    let mem = || MemDevice::new(64 << 20);
    for write in [false, true] {
        let rw = if write { "writes" } else { "reads" };
        let mut xts = CryptVolume::new(mem(), Cipher::XtsPlain64(x.clone().into()), layout, false).expect("layout");
        let mut null = CryptVolume::new(mem(), Cipher::Null, layout, false).expect("layout");
        let mut auth = auth_volume(72 << 20);
        // Never-written sectors read as zeroes without any crypto: fill
        // the volume first so reads verify and decrypt like real data.
        auth.write(0, &vec![0x5a; 64 << 20]).expect("fill");
        for (name, value) in [
            ("xts", nbd_requests_per_second(&mut xts, write)),
            ("aes-256-gcm", nbd_requests_per_second(&mut auth, write)),
            ("null", nbd_requests_per_second(&mut null, write)),
        ] {
            rows.push(Row {
                what: format!("NBD 4 KiB {rw} over memory ({name}), 32 deep"),
                value,
                unit: "req/s",
                anchor: None,
            });
        }
    }
    Ok(rows)
}

/// The table as Markdown, with the storage anchors.
pub fn render(rows: &[Row]) -> String {
    render_with(
        rows,
        "Anchors (published): dm-crypt aes-xts 2–3.5 GB/s per core; the DBSP paper's ~1% I/O overhead with AES-NI.",
    )
}

/// The table as Markdown, then `footer`.
pub fn render_with(rows: &[Row], footer: &str) -> String {
    let mut s = String::from("| measurement | ours | anchor (same run) | ratio |\n|---|---|---|---|\n");
    for r in rows {
        let (anchor, ratio) = match &r.anchor {
            Some((name, v)) => (format!("{name}: {v:.2} {}", r.unit), format!("{:.2}×", r.value / v)),
            None => ("-".into(), "-".into()),
        };
        let value = if matches!(r.unit, "req/s" | "sig/s") {
            format!("{:.0} {}", r.value, r.unit)
        } else {
            format!("{:.2} {}", r.value, r.unit)
        };
        s.push_str(&format!("| {} | {value} | {anchor} | {ratio} |\n", r.what));
    }
    s.push('\n');
    s.push_str(footer);
    s.push('\n');
    s
}
