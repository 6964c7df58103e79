//! `ssc bench dedup-core`: the dedup SD's core natively over N client
//! memory images in host memory (2 × 512 MiB and 4 × 1 GiB by default),
//! beside, in the same run: the reference a tenant would write (SHA-256 of
//! every page into an ordered map, grouping by digest), XXH3-64 over every
//! page with no grouping (the hashing ceiling) and a plain read of the
//! memory (the memory ceiling).
//!
//! Images are synthetic unless `--from` names memory files captured from
//! real clients (e.g. copies of `ssc up`'s shared-memory files): per
//! client 40 % zero pages, 30 % pages every client of the same image
//! shares (kernel text, page cache of the same files; a few repeated
//! within the client too) and 30 % pages of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use sd_dedup::{Client, PAGE, PageRef, Plan};
use sha2::Digest;

use crate::bench_checkpoint::{best, gbps};
use crate::bench_storage::Row;

/// Published anchors and the aim, printed under the table.
pub const ANCHORS: &str = "Anchors (published): the SSC paper's dedup SD took 6.9 s for a pair of 512 MB VMs and \
15.8 s for 1 GB (~0.15 GB/s). Aim: 2 × 512 MiB in < 0.3 s (>= 3.6 GB/s).";

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Client `c`'s synthetic memory image.
pub fn client_image(c: usize, bytes: usize) -> Vec<u8> {
    let mut m = vec![0u8; bytes];
    let mut own = 0x1234_5678_9abc_def1u64 ^ ((c as u64 + 1) << 32);
    for (p, page) in m.chunks_mut(PAGE).enumerate() {
        match p % 10 {
            0..=3 => {}
            4..=6 => {
                // Shared across clients: content from the page number (every
                // 64th repeats an earlier one, as within-VM duplicates do).
                let mut x = ((p % 50_000) as u64 | 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                if p % 64 == 4 {
                    x = 0x5555_aaaa_5555_aaab;
                }
                for w in page.chunks_mut(8) {
                    w.copy_from_slice(&xorshift(&mut x).to_le_bytes());
                }
            }
            _ => {
                for w in page.chunks_mut(8) {
                    w.copy_from_slice(&xorshift(&mut own).to_le_bytes());
                }
            }
        }
    }
    m
}

/// The reference a tenant would write, independent of the core: SHA-256
/// of every page, grouped by digest in an ordered map. Returns the groups
/// of two or more non-zero pages (sorted) and each client's zero pages.
pub fn reference(images: &[Vec<u8>]) -> (Vec<Vec<PageRef>>, Vec<u64>) {
    let mut by: BTreeMap<[u8; 32], Vec<PageRef>> = BTreeMap::new();
    let zero: [u8; 32] = sha2::Sha256::digest([0u8; PAGE]).into();
    let mut zeros = vec![0; images.len()];
    for (c, m) in images.iter().enumerate() {
        for (p, page) in m.chunks(PAGE).enumerate() {
            let d: [u8; 32] = sha2::Sha256::digest(page).into();
            if d == zero {
                zeros[c] += 1;
            } else {
                by.entry(d).or_default().push(PageRef { client: c as u32, page: p as u64 });
            }
        }
    }
    let mut groups: Vec<Vec<PageRef>> = by.into_values().filter(|g| g.len() >= 2).collect();
    groups.sort();
    (groups, zeros)
}

/// Allocated extents per image (`None`: all of it).
type Extents = Vec<Option<Vec<(u64, u64)>>>;

fn scan(images: &[Vec<u8>], extents: &Extents) -> Plan {
    let clients: Vec<Client<'_>> =
        images.iter().zip(extents).map(|(m, e)| Client { memory: m, extents: e.clone() }).collect();
    sd_dedup::scan(&clients, &mut |_, _| {}).expect("in-memory images")
}

/// One configuration: the core and its anchors over `images`.
fn measure(label: &str, images: &[Vec<u8>], extents: &Extents, rows: &mut Vec<Row>) -> Result<()> {
    let bytes: usize = images.iter().map(Vec::len).sum();
    let row = |what: String, value: f64, anchor: Option<(&str, f64)>| Row {
        what,
        value,
        unit: "GB/s",
        anchor: anchor.map(|(n, v)| (n.to_string(), v)),
    };
    let (t_sum, _) = best(3, || {
        let mut page = vec![0u8; PAGE];
        for p in images.iter().flat_map(|m| m.chunks(PAGE)) {
            // What the core does first with each page: copy it out of the
            // window (black_box: the copy must happen).
            page.copy_from_slice(std::hint::black_box(p));
            std::hint::black_box(&page);
        }
    });
    let (t_xxh, _) =
        best(3, || images.iter().flat_map(|m| m.chunks(PAGE)).fold(0u64, |a, p| a ^ sd_dedup::page_hash(p)));
    let (t_ref, (ref_groups, ref_zeros)) = best(1, || reference(images));
    let ref_dups: u64 = ref_groups.iter().map(|g| g.len() as u64 - 1).sum();
    let ref_zeros: u64 = ref_zeros.iter().sum();
    let (t_scan, plan) = best(3, || scan(images, extents));
    let zeros: u64 = plan.clients.iter().map(|c| c.zero_pages).sum();
    anyhow::ensure!(
        plan.duplicate_pages() == ref_dups && zeros == ref_zeros,
        "the core ({} duplicates, {zeros} zero) disagrees with the reference ({ref_dups}, {ref_zeros})",
        plan.duplicate_pages()
    );
    let reference = gbps(bytes, t_ref);
    rows.push(row(format!("{label}: ceiling, copy every page out"), gbps(bytes, t_sum), None));
    rows.push(row(format!("{label}: ceiling, XXH3-64 every page, no grouping"), gbps(bytes, t_xxh), None));
    rows.push(row(format!("{label}: reference, SHA-256 per page + ordered map ({t_ref:.2} s)"), reference, None));
    rows.push(row(
        format!(
            "{label}: dedup core scan ({t_scan:.3} s; {} duplicate + {} zero pages, {} groups)",
            plan.duplicate_pages(),
            zeros,
            plan.groups.len()
        ),
        gbps(bytes, t_scan),
        Some(("reference", reference)),
    ));
    Ok(())
}

/// Runs the configurations: `(clients, MiB each)` of synthetic images, or
/// the captured memory files `from` as one configuration.
pub fn run(configs: &[(usize, usize)], from: &[PathBuf]) -> Result<Vec<Row>> {
    let mut rows = vec![];
    if !from.is_empty() {
        let images = from
            .iter()
            .map(|f| std::fs::read(f).with_context(|| format!("reading memory image {}", f.display())))
            .collect::<Result<Vec<_>>>()?;
        let mib = images.iter().map(Vec::len).sum::<usize>() >> 20;
        // As the SD sees them: only the files' allocated extents are read.
        let extents = from.iter().map(|f| crate::checkpoint::allocated_extents(f).map(Some)).collect::<Result<_>>()?;
        let label = format!("{} captured images, {mib} MiB, holes skipped", images.len());
        measure(&label, &images, &extents, &mut rows)?;
        return Ok(rows);
    }
    for &(n, mib) in configs {
        eprintln!("bench dedup-core: {n} × {mib} MiB");
        let images: Vec<Vec<u8>> = (0..n).map(|c| client_image(c, mib << 20)).collect();
        measure(&format!("{n} × {mib} MiB"), &images, &vec![None; n], &mut rows)?;
    }
    Ok(rows)
}
