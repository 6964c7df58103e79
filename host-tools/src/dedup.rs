//! The tenant side of memory deduplication: asks the dedup SD to scan its
//! clients' memory windows and applies what stock QEMU/KVM allows.
//!
//! **What can be applied, honestly.** With shared memory files (which
//! memory windows need) there is no hypervisor call on stock QEMU/KVM that
//! makes two VMs share one non-zero page copy-on-write: that needs a
//! hypervisor that can remap a guest page to another frame read-only and
//! break the sharing on write (Xen's page sharing, KSM on private memory).
//! What is real: a page that is zero can be returned to the host by
//! punching a hole in the client's memory file; the guest reads zeroes
//! from a hole, so nothing changes for it. [`apply`] does that, only for
//! pages it re-reads as zero with the client paused, and never for a page
//! written since the scan. Non-zero duplicates are reported (what sharing
//! *would* save), not applied.
//!
//! Dedup runs over one tenant's VMs only: the cross-tenant side channels
//! that made clouds switch KSM off (Flip Feng Shui, page-fusion timing
//! attacks) need two tenants' pages merged, which this design never does.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sd_dedup::{ClientStats, PAGE, Plan, wire};
use ssc_abi::Body;

use crate::builder::{ControlEvent, Domain};
use crate::checkpoint::{ProgressFn, allocated_extents};

/// A scan's plan and the SD's time.
pub struct Scanned {
    pub plan: Plan,
    pub sd_time: Duration,
}

/// Asks `sd` (its windows on `memories`, in order) for a plan. Only the
/// files' allocated extents are read.
pub fn scan(sd: &mut Domain, memories: &[&Path], progress: ProgressFn<'_>) -> Result<Scanned> {
    let mut triples = vec![];
    for (i, m) in memories.iter().enumerate() {
        for (off, len) in allocated_extents(m)? {
            triples.extend([i as u64, off, len].iter().flat_map(|v| v.to_le_bytes()));
        }
    }
    let ctl = sd.control().context("the dedup SD has no control link")?;
    let id = ctl.send(Body::DedupScan { extents: &triples })?;
    let n = memories.len();
    let mut plan = Plan { clients: vec![ClientStats::default(); n], zero_runs: vec![vec![]; n], ..Plan::default() };
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let left = deadline.checked_duration_since(Instant::now()).context("the dedup SD did not finish its scan")?;
        match ctl.recv(left) {
            Some(ControlEvent::Progress { request_id, done, total }) if request_id == id => progress(done, total),
            Some(ControlEvent::DedupClient { request_id, client, stats }) if request_id == id => {
                *plan.clients.get_mut(client as usize).context("the SD reported a client it was not given")? = stats;
            }
            Some(ControlEvent::DedupZeroRuns { request_id, client, runs }) if request_id == id => {
                let runs = ssc_abi::pairs::decode(&runs).context("malformed zero runs from the dedup SD")?;
                plan.zero_runs.get_mut(client as usize).context("zero runs of an unknown client")?.extend(runs);
            }
            Some(ControlEvent::DedupGroups { request_id, groups }) if request_id == id => {
                wire::decode_groups(&groups, &mut plan.groups).context("malformed groups from the dedup SD")?;
            }
            Some(ControlEvent::DedupDone { request_id, changed, micros }) if request_id == id => {
                plan.changed = changed;
                return Ok(Scanned { plan, sd_time: Duration::from_micros(micros) });
            }
            Some(ControlEvent::Error { request_id, code, message }) if request_id == id => {
                bail!("the dedup SD refused the scan ({code:?}): {message}")
            }
            Some(ControlEvent::Broken(why)) => bail!("dedup SD control link broken: {why}"),
            Some(_) => {}
            None => bail!("the dedup SD did not finish its scan"),
        }
    }
}

/// What [`apply`] did to one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Pages punched out of the memory file.
    pub punched: u64,
    /// Pages of the plan that were no longer zero (written since the scan).
    pub skipped: u64,
    /// Allocated bytes of the memory file before and after.
    pub allocated_before: u64,
    pub allocated_after: u64,
    /// How long the client was paused.
    pub paused_ms: u64,
}

/// Allocated bytes of a file.
pub fn allocated_bytes(file: &Path) -> Result<u64> {
    Ok(std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.blocks() * 512)
}

/// Punches the zero pages `runs` (first page, count) of `client`'s memory
/// file `memory`, with the client paused, re-reading every page first: a
/// page that is no longer zero is skipped, never punched.
pub fn apply(client: &Domain, memory: &Path, runs: &[(u64, u64)]) -> Result<Applied> {
    let mut qmp = client.qmp(Duration::from_secs(30))?;
    let start = Instant::now();
    qmp.execute("stop", None)?;
    let result = punch_zero_pages(memory, runs);
    qmp.execute("cont", None).context("resuming the client")?;
    let mut applied = result?;
    applied.paused_ms = start.elapsed().as_millis() as u64;
    Ok(applied)
}

/// The paused half of [`apply`].
fn punch_zero_pages(memory: &Path, runs: &[(u64, u64)]) -> Result<Applied> {
    use rustix::fs::{FallocateFlags, fallocate};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(memory)
        .with_context(|| format!("opening {}", memory.display()))?;
    let size = f.metadata()?.len();
    let mut a = Applied { allocated_before: allocated_bytes(memory)?, ..Applied::default() };
    let punch = |first: u64, count: u64| -> Result<()> {
        fallocate(&f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, first * PAGE as u64, count * PAGE as u64)
            .with_context(|| format!("punching a hole in {}", memory.display()))
    };
    let mut buf = vec![0u8; 256 * PAGE];
    for &(first, count) in runs {
        if (first + count) * PAGE as u64 > size {
            bail!("the plan names pages beyond the end of {}", memory.display());
        }
        // Chunks of the run: read, then punch each stretch still zero.
        let mut p = first;
        while p < first + count {
            let n = (first + count - p).min(256);
            let bytes = &mut buf[..n as usize * PAGE];
            f.read_exact_at(bytes, p * PAGE as u64).with_context(|| format!("reading {}", memory.display()))?;
            let mut stretch: Option<u64> = None;
            for (i, page) in bytes.chunks(PAGE).enumerate() {
                let q = p + i as u64;
                if page.iter().all(|&b| b == 0) {
                    stretch.get_or_insert(q);
                } else {
                    a.skipped += 1;
                    if let Some(s) = stretch.take() {
                        punch(s, q - s)?;
                        a.punched += q - s;
                    }
                }
            }
            if let Some(s) = stretch {
                punch(s, p + n - s)?;
                a.punched += p + n - s;
            }
            p += n;
        }
    }
    a.allocated_after = allocated_bytes(memory)?;
    Ok(a)
}
