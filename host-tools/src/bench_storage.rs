//! `ssc bench storage-core`: the storage SD's core, natively, beside its
//! anchors in the same invocation (the layer that carries over to a real KVM
//! host, where guest code runs at native speed):
//!
//! * `aes-xts-plain64` over 4 KiB sectors (encrypt and decrypt) vs
//!   `openssl speed -evp aes-256-xts -bytes 4096`;
//! * the NBD server's requests per second over an in-memory volume
//!   (4 KiB reads and writes, pipelined 32 deep), XTS and null cipher.
//!
//! Built without optimizations the figures mean nothing; the command says so.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_storage_crypt::nbd::{Export, Server};
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

fn nbd_requests_per_second(cipher: Cipher, write: bool) -> f64 {
    const DEPTH: usize = 32;
    const BATCHES: usize = 2000;
    let size = 64 << 20;
    let mut vol = CryptVolume::new(MemDevice::new(size), cipher, Layout::PLAIN_512, false).expect("layout");
    let mut s = Server::new(Export { name: "bench".into(), description: String::new() });
    s.take_output();
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    s.receive(&go, &mut vol).expect("handshake");
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
        s.receive(&batch, &mut vol).expect("requests");
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
    for (name, cipher) in [("xts", Cipher::XtsPlain64(x.clone().into())), ("null", Cipher::Null)] {
        for write in [false, true] {
            rows.push(Row {
                what: format!("NBD 4 KiB {} over memory ({name}), 32 deep", if write { "writes" } else { "reads" }),
                value: nbd_requests_per_second(cipher.clone(), write),
                unit: "req/s",
                anchor: None,
            });
        }
    }
    Ok(rows)
}

/// The table as Markdown.
pub fn render(rows: &[Row]) -> String {
    let mut s = String::from("| measurement | ours | anchor (same run) | ratio |\n|---|---|---|---|\n");
    for r in rows {
        let (anchor, ratio) = match &r.anchor {
            Some((name, v)) => (format!("{name}: {v:.2} {}", r.unit), format!("{:.2}×", r.value / v)),
            None => ("-".into(), "-".into()),
        };
        let value =
            if r.unit == "req/s" { format!("{:.0} {}", r.value, r.unit) } else { format!("{:.2} {}", r.value, r.unit) };
        s.push_str(&format!("| {} | {value} | {anchor} | {ratio} |\n", r.what));
    }
    s.push_str(
        "\nAnchors (published): dm-crypt aes-xts 2–3.5 GB/s per core; the DBSP paper's ~1% I/O overhead with AES-NI.\n",
    );
    s
}
