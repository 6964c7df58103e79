//! `ssc bench checkpoint-core`: the checkpoint SD's core natively over a
//! 1 GiB memory image in host memory — a realistic mix of a quarter zero
//! pages, a quarter text and half random — beside its ceilings measured in
//! the same run: a plain memory copy, lz4 alone, AES-256-GCM (`ring`)
//! alone. Save (full, and a delta after 1 % of the pages changed) and
//! verify-then-restore, with and without lz4.

use std::time::Instant;

use anyhow::Result;
use sd_checkpoint::{PAGE, PageHashes, Restorer, SaveOptions, Saver, Source};

use crate::bench_storage::Row;

/// Published anchors and the aim, printed under the table.
pub const ANCHORS: &str = "Anchors (published): the SSC paper's checkpoint SD took 6.9 s for 512 MB (~0.08 GB/s) and \
15.8 s for 1 GB; Firecracker's full snapshot of 256 MB ~180 ms (~1.5 GB/s). Aim: encrypted save >= 2 GB/s.";

const KEY: [u8; 32] = [0x42; 32];
const CLIENT: [u8; 16] = [1; 16];

/// The memory image: 1/4 zero pages, 1/4 text, 1/2 random.
pub fn memory_mix(bytes: usize) -> Vec<u8> {
    let mut m = vec![0u8; bytes];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; 0123456789 ";
    for (p, page) in m.chunks_mut(PAGE).enumerate() {
        match p % 4 {
            0 => {}
            1 => page.iter_mut().enumerate().for_each(|(i, b)| *b = text[(i + p) % text.len()]),
            _ => {
                for w in page.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
                }
            }
        }
    }
    m
}

/// Saves into `out` (reused across runs: its pages are already mapped, as
/// a real output's buffers would be).
fn save(mem: &Vec<u8>, generation: u64, base: Option<&PageHashes>, compress: bool, out: &mut Vec<u8>) -> PageHashes {
    let opts = SaveOptions { compress, pages_per_chunk: 256 };
    let mut s = Saver::new(&KEY, CLIENT, mem.len() as u64, generation, base, [generation as u8; 16], opts)
        .expect("valid parameters");
    out.clear();
    out.extend_from_slice(&s.header_bytes());
    while s.next_pages(mem, out).expect("in memory") {}
    s.finish(out).expect("complete").1
}

/// Bytes per second in GB/s.
pub fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Best of `n` runs of `f`, in seconds, and the last result.
pub fn best<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(v);
    }
    (best, last.expect("n > 0"))
}

/// Runs every measurement over `bytes` of memory.
pub fn run(bytes: usize) -> Result<Vec<Row>> {
    let mem = memory_mix(bytes);
    let mut rows = vec![];
    let row = |what: &str, value: f64, anchor: Option<(&str, f64)>| Row {
        what: what.into(),
        value,
        unit: "GB/s",
        anchor: anchor.map(|(n, v)| (n.to_string(), v)),
    };
    // Ceilings.
    let mut copy = vec![0u8; bytes];
    let (t_copy, _) = best(3, || copy.copy_from_slice(&mem));
    let memcpy = gbps(bytes, t_copy);
    let (t_lz4, _) = best(2, || {
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(256 * PAGE)];
        let mut n = 0;
        for chunk in mem.chunks(256 * PAGE) {
            n += lz4_flex::block::compress_into(chunk, &mut out).expect("sized");
        }
        n
    });
    let lz4 = gbps(bytes, t_lz4);
    let (t_gcm, _) = best(3, || {
        use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).expect("key"));
        for (i, chunk) in copy.chunks_mut(256 * PAGE).enumerate() {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let _ = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), chunk);
        }
    });
    let gcm = gbps(bytes, t_gcm);
    drop(copy);
    rows.push(row("ceiling: memory copy", memcpy, None));
    rows.push(row("ceiling: lz4 compress alone (1 MiB blocks)", lz4, None));
    rows.push(row("ceiling: AES-256-GCM alone (ring, 1 MiB records)", gcm, None));
    for compress in [false, true] {
        let tag = if compress { "lz4 + AES-256-GCM" } else { "AES-256-GCM" };
        let mut stream = vec![0u8; bytes + (bytes >> 6)];
        let (t_save, base) = best(3, || save(&mem, 1, None, compress, &mut stream));
        let ceiling = if compress { ("lz4 alone", lz4) } else { ("AES-256-GCM alone", gcm) };
        rows.push(row(&format!("full save ({tag})"), gbps(bytes, t_save), Some(ceiling)));
        // A delta after 1 % of the pages changed: its cost is the scan.
        let mut changed = mem.clone();
        for p in (0..bytes / PAGE).step_by(100) {
            changed[p * PAGE] ^= 0x5a;
        }
        let mut delta = vec![0u8; bytes >> 4];
        let (t_delta, _) = best(3, || save(&changed, 2, Some(&base), compress, &mut delta));
        rows.push(row(
            &format!("delta save, 1 % of pages changed ({tag}; {} KiB stream)", delta.len() >> 10),
            gbps(bytes, t_delta),
            Some(("memory copy", memcpy)),
        ));
        // Into memory that is mapped but not known to be zero (absent pages
        // are written as zeroes too).
        let mut target = vec![0xffu8; bytes];
        let (t_restore, restored) = best(3, || {
            let mut s: &[u8] = &stream;
            let mut streams: [&mut dyn Source; 1] = [&mut s];
            Restorer::new(&KEY, CLIENT, bytes as u64).restore(&mut streams, &mut target, false).map(|_| ())
        });
        restored?;
        anyhow::ensure!(target == mem, "the benchmark's restore differs from the memory it saved");
        rows.push(row(
            &format!("verify + restore ({tag}; {} MiB stream)", stream.len() >> 20),
            gbps(bytes, t_restore),
            Some(("memory copy", memcpy)),
        ));
    }
    Ok(rows)
}
