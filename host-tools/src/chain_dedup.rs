//! Memory deduplication on a running chain: the `[dedup]` section of a
//! chain file, the dedup SD beside the tenant's clients, and the commands
//! `ssc dedup scan|apply|stats` send to `ssc up` over its command socket.
//!
//! ```toml
//! [client]
//! count = 2            # identical clients of the same image (no disks, no [checkpoint])
//!
//! [dedup]
//! # period = 30        # also scan every 30 s (default: only on demand)
//! ```
//!
//! Every client's RAM becomes a shared memory file; the dedup SD gets a
//! read-only window on each (client i = window i). A scan reports
//! duplicates within and across the clients; `apply` punches the zero
//! pages out of each paused client's memory file (see [`crate::dedup`]
//! for why non-zero sharing is reported, not applied).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::builder::{Domain, MetaDomain, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::checkpoint::ProgressFn;
use crate::dedup::{self, Applied};
use crate::qemu::Accel;

/// The chain file's `[dedup]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupSection {
    /// Seconds between periodic scans (none: on demand only).
    pub period: Option<u64>,
}

/// A checked `[dedup]`.
pub struct DedupPlan {
    pub image: VerifiedImage,
    pub period: Option<Duration>,
}

/// One client's line of a report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientReport {
    pub name: String,
    #[serde(flatten)]
    pub stats: sd_dedup::ClientStats,
    /// What the last `apply` did to this client, if one ran.
    pub applied: Option<Applied>,
}

/// What `ssc dedup scan|apply|stats` prints (as a table, or `--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub clients: Vec<ClientReport>,
    pub groups: u64,
    pub duplicate_pages: u64,
    /// Bytes that sharing every duplicate and zero page would save.
    pub bytes_saved: u64,
    /// Pages that changed while the SD scanned them (left out).
    pub changed: u64,
    pub scan_ms: u64,
    /// Seconds since the scan.
    pub age_s: u64,
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>14}\n",
            "client", "pages", "read", "zero", "zero alloc", "dup in VM", "dup across", "punched", "allocated MiB"
        );
        for c in &self.clients {
            let st = &c.stats;
            let (punched, alloc) = match &c.applied {
                Some(a) => (
                    a.punched.to_string(),
                    format!(
                        "{:.1} → {:.1}",
                        a.allocated_before as f64 / 1048576.0,
                        a.allocated_after as f64 / 1048576.0
                    ),
                ),
                None => ("-".into(), "-".into()),
            };
            s += &format!(
                "{:<10} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>14}\n",
                c.name,
                st.pages,
                st.pages_read,
                st.zero_pages,
                st.zero_allocated,
                st.dup_within,
                st.dup_across,
                punched,
                alloc
            );
        }
        s += &format!(
            "{} duplicate pages in {} groups; sharing them and the allocated zero pages would save {:.1} MiB; \
             {} page(s) changed during the scan; scan took {} ms ({} s ago)\n",
            self.duplicate_pages,
            self.groups,
            self.bytes_saved as f64 / 1048576.0,
            self.changed,
            self.scan_ms,
            self.age_s
        );
        if self.clients.iter().any(|c| c.applied.is_some()) {
            s += "applied: zero pages punched out of the memory files; non-zero duplicates are reported only \
                  (stock QEMU/KVM cannot share a page copy-on-write between VMs with shared memory files)\n";
        }
        s
    }
}

/// The dedup SD of a running chain and its last scan.
pub struct Session {
    sd_name: String,
    memories: Vec<PathBuf>,
    names: Vec<String>,
    period: Option<Duration>,
    last: Option<(dedup::Scanned, Instant)>,
    applied: Vec<Option<Applied>>,
    next_scan: Option<Instant>,
}

/// Starts the dedup SD with a read-only window on each client's memory.
pub fn start_sd(
    plan: &DedupPlan,
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    clients: &[(String, PathBuf)],
) -> Result<Session> {
    let mut spec = plan.image.spec("dedup");
    for (_, m) in clients {
        spec.windows.push(WindowSpec { file: m.clone(), writable: false });
    }
    sds.start(&spec, accel, echo, Duration::from_secs(60))?;
    eprintln!("ssc up: dedup SD started with read-only windows on {} client(s)", clients.len());
    Ok(Session {
        sd_name: spec.name,
        memories: clients.iter().map(|(_, m)| m.clone()).collect(),
        names: clients.iter().map(|(n, _)| n.clone()).collect(),
        period: plan.period,
        last: None,
        applied: vec![None; clients.len()],
        next_scan: plan.period.map(|p| Instant::now() + p),
    })
}

impl Session {
    /// Scans all clients now.
    pub fn scan(&mut self, sds: &mut MetaDomain, progress: ProgressFn<'_>) -> Result<Report> {
        let sd = sds.domain(&self.sd_name).context("the dedup SD is gone")?;
        let paths: Vec<&std::path::Path> = self.memories.iter().map(PathBuf::as_path).collect();
        let scanned = dedup::scan(sd, &paths, progress)?;
        self.last = Some((scanned, Instant::now()));
        self.applied = vec![None; self.memories.len()];
        self.report()
    }

    /// Punches the last scan's zero pages (scanning first if there was
    /// none) out of every client, each paused in turn.
    pub fn apply(&mut self, clients: &[&Domain], sds: &mut MetaDomain, progress: ProgressFn<'_>) -> Result<Report> {
        if self.last.is_none() {
            self.scan(sds, progress)?;
        }
        let (scanned, _) = self.last.as_ref().expect("scanned");
        for (i, client) in clients.iter().enumerate() {
            let runs = scanned.plan.zero_runs.get(i).map(Vec::as_slice).unwrap_or_default();
            let a = dedup::apply(client, &self.memories[i], runs)
                .with_context(|| format!("applying the plan to {}", self.names[i]))?;
            self.applied[i] = Some(a);
        }
        self.report()
    }

    /// The last scan (and apply), without scanning again.
    pub fn report(&self) -> Result<Report> {
        let (s, at) = self.last.as_ref().context("no scan yet: run `ssc dedup scan` first")?;
        let p = &s.plan;
        Ok(Report {
            clients: p
                .clients
                .iter()
                .zip(&self.names)
                .zip(&self.applied)
                .map(|((c, name), applied)| ClientReport { name: name.clone(), stats: *c, applied: *applied })
                .collect(),
            groups: p.groups.len() as u64,
            duplicate_pages: p.duplicate_pages(),
            bytes_saved: p.bytes_saved(),
            changed: p.changed,
            scan_ms: s.sd_time.as_millis() as u64,
            age_s: at.elapsed().as_secs(),
        })
    }

    /// Runs the periodic scan when it is due; logs one line.
    pub fn tick(&mut self, sds: &mut MetaDomain) {
        let Some(due) = self.next_scan else { return };
        if Instant::now() < due {
            return;
        }
        self.next_scan = self.period.map(|p| Instant::now() + p);
        match self.scan(sds, &mut crate::checkpoint::quiet) {
            Ok(r) => eprintln!(
                "ssc up: dedup: {} duplicate pages in {} groups, {:.1} MiB to save ({} ms)",
                r.duplicate_pages,
                r.groups,
                r.bytes_saved as f64 / 1048576.0,
                r.scan_ms
            ),
            Err(e) => eprintln!("ssc up: dedup: periodic scan failed: {e:#}"),
        }
    }
}

/// Serves one `dedup …` command line for `ssc up`; the reply is the report
/// as one line of JSON.
pub fn serve(
    cmd: &str,
    session: &mut Session,
    clients: &[&Domain],
    sds: &mut MetaDomain,
    progress: ProgressFn<'_>,
) -> Result<String> {
    let report = match cmd {
        "dedup scan" => session.scan(sds, progress)?,
        "dedup apply" => session.apply(clients, sds, progress)?,
        "dedup stats" => session.report()?,
        other => anyhow::bail!("unknown command `{other}` (dedup scan, dedup apply, dedup stats)"),
    };
    Ok(serde_json::to_string(&report)?)
}
