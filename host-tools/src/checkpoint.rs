//! The tenant side of checkpoints: QEMU's device state through migration
//! with `x-ignore-shared` (the client's RAM is a shared memory file the
//! checkpoint SD reads through its window), and the control-link exchange
//! with the checkpoint SD.
//!
//! Save: `stop` the client, migrate its device state (only) to a file,
//! hand it to the SD, have the SD seal memory and state onto its disk,
//! `cont`. Restore: a fresh client QEMU started with `-incoming defer` on a
//! fresh memory file, the SD verifies the streams and writes memory
//! through a write-granted window and returns the device state, which
//! QEMU then loads; the client runs on from where it was saved.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use ssc_abi::Body;

use crate::builder::{ControlEvent, Domain};
use crate::qmp::Qmp;

const T: Duration = Duration::from_secs(30);

/// Where a checkpoint stream sits on the SD's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    pub generation: u64,
    pub at: u64,
    pub length: u64,
}

impl Stream {
    /// Where the next stream may start (4 KiB aligned).
    pub fn end(&self) -> u64 {
        (self.at + self.length).next_multiple_of(4096)
    }
}

fn pairs(streams: &[Stream]) -> Vec<u8> {
    ssc_abi::pairs::encode(streams.iter().map(|s| (s.at, s.length)))
}

/// Most extents one `SaveCheckpoint` frame carries (16 bytes each).
const MAX_EXTENTS: usize = 3000;

/// The allocated byte ranges of a (sparse) file, from `SEEK_DATA` /
/// `SEEK_HOLE`: everything else is a hole, known zero. Ranges closer than a
/// gap are merged until at most `MAX_EXTENTS` remain (reading a merged gap
/// allocates it, so the gap starts at one page and grows only as needed).
pub fn allocated_extents(file: &Path) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut out: Vec<(u64, u64)> = vec![];
    let mut pos = 0;
    while pos < len {
        let start = match seek(&f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e).with_context(|| format!("SEEK_DATA in {}", file.display())),
        };
        let end = seek(&f, SeekFrom::Hole(start)).with_context(|| format!("SEEK_HOLE in {}", file.display()))?;
        out.push((start, end - start));
        pos = end;
    }
    let mut gap = 4096;
    while out.len() > MAX_EXTENTS {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (s, l) in out {
            match merged.last_mut() {
                Some((ps, pl)) if s - (*ps + *pl) <= gap => *pl = s + l - *ps,
                _ => merged.push((s, l)),
            }
        }
        out = merged;
        gap *= 2;
    }
    Ok(out)
}

/// What a save reported.
#[derive(Clone, Copy, Debug)]
pub struct Saved {
    pub stream: Stream,
    pub pages_read: u64,
    pub pages_stored: u64,
    /// Time inside the SD, and the whole operation (client paused).
    pub sd_time: Duration,
    pub paused: Duration,
    pub device_state_bytes: usize,
}

fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let r = qmp.execute("query-migrate", None)?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => bail!("{what} failed: {}", r["error-desc"].as_str().unwrap_or("no reason given")),
            _ if start.elapsed() > T => bail!("{what} did not finish in {} s", T.as_secs()),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn ignore_shared(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
    )
    .context("enabling x-ignore-shared (QEMU >= 4.0)")?;
    Ok(())
}

/// Sends the client id and key to a checkpoint SD.
pub fn configure(sd: &mut Domain, client: [u8; 16], key: &[u8]) -> Result<()> {
    let ctl = sd.control().context("the checkpoint SD has no control link")?;
    ctl.request(Body::CheckpointKey { client: &client, key }, T).context("configuring the checkpoint SD")
}

/// What to save, and how.
#[derive(Clone, Copy, Debug)]
pub struct SaveRequest<'a> {
    pub generation: u64,
    /// Byte offset on the SD's disk (4 KiB aligned).
    pub at: u64,
    /// The chain this is a delta against (full first); empty: a full save.
    pub base: &'a [Stream],
    pub compress: bool,
    /// Leave the client paused afterwards (it is resumed otherwise).
    pub leave_paused: bool,
}

/// Called with (bytes done, bytes in all) as a save scans memory or a
/// restore reads its streams (twice: verify, then write).
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// A [`ProgressFn`] that shows nothing.
pub fn quiet(_: u64, _: u64) {}

/// Saves `client` (its RAM the shared memory file `memory`, mapped by
/// `sd`) as `req` says. The client is paused for the duration. Only the
/// file's allocated extents are read.
pub fn save(
    client: &Domain,
    memory: &Path,
    sd: &mut Domain,
    scratch: &Path,
    req: SaveRequest<'_>,
    progress: ProgressFn<'_>,
) -> Result<Saved> {
    let SaveRequest { generation, at, base, compress, leave_paused } = req;
    let start = Instant::now();
    let mut qmp = client.qmp(T)?;
    qmp.execute("stop", None)?;
    let result = (|| -> Result<Saved> {
        ignore_shared(&mut qmp)?;
        let file = scratch.join(format!("device-state-{generation}.bin"));
        let uri = format!("exec:cat > '{}'", file.display());
        qmp.execute("migrate", Some(json!({ "uri": uri })))?;
        wait_migration(&mut qmp, "saving the device state")?;
        let state = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let _ = std::fs::remove_file(&file);
        let ctl = sd.control().context("the checkpoint SD has no control link")?;
        let total = state.len() as u64;
        for (i, bytes) in state.chunks(48 * 1024).enumerate() {
            let offset = (i * 48 * 1024) as u64;
            ctl.request(Body::DeviceState { offset, total, bytes }, T).context("sending the device state")?;
        }
        let mut salt = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| anyhow::anyhow!("no randomness for the salt"))?;
        let base = pairs(base);
        let extents = ssc_abi::pairs::encode(allocated_extents(memory)?);
        let id =
            ctl.send(Body::SaveCheckpoint { generation, at, base: &base, compress, salt: &salt, extents: &extents })?;
        let r = wait_saved(ctl, id, progress)?;
        Ok(Saved {
            stream: Stream { generation, at, length: r.length },
            pages_read: r.pages_read,
            pages_stored: r.pages_stored,
            sd_time: r.sd_time,
            paused: Duration::ZERO,
            device_state_bytes: state.len(),
        })
    })();
    // After `migrate` QEMU sits in `postmigrate`; `cont` runs it again.
    if !leave_paused {
        qmp.execute("cont", None).context("resuming the client")?;
    }
    let mut saved = result?;
    saved.paused = start.elapsed();
    Ok(saved)
}

/// The SD's `CheckpointSaved` for request `id` (stream length, pages).
struct SavedReply {
    length: u64,
    pages_read: u64,
    pages_stored: u64,
    sd_time: Duration,
}

fn wait_saved(ctl: &crate::builder::ControlLink, id: u64, progress: ProgressFn<'_>) -> Result<SavedReply> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.checked_duration_since(Instant::now()).context("the checkpoint SD did not answer")?;
        match ctl.recv(left) {
            Some(ControlEvent::CheckpointSaved { request_id, length, pages_read, pages_stored, micros, .. })
                if request_id == id =>
            {
                return Ok(SavedReply { length, pages_read, pages_stored, sd_time: Duration::from_micros(micros) });
            }
            Some(ControlEvent::Progress { request_id, done, total }) if request_id == id => progress(done, total),
            Some(ControlEvent::Error { request_id, code, message }) if request_id == id => {
                bail!("the checkpoint SD refused ({code:?}): {message}")
            }
            Some(ControlEvent::Broken(why)) => bail!("checkpoint SD control link broken: {why}"),
            Some(_) => {}
            None => bail!("the checkpoint SD did not answer"),
        }
    }
}

/// The copy-only baseline for benchmarks: with `client` paused, the SD
/// copies the allocated extents of its memory to the disk at `at`, as they
/// are (no hashing, no sealing: plaintext on the disk). Returns the bytes
/// written and the time the client was paused.
pub fn copy_only(client: &Domain, memory: &Path, sd: &mut Domain, at: u64) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut qmp = client.qmp(T)?;
    qmp.execute("stop", None)?;
    let result = (|| -> Result<u64> {
        let extents = ssc_abi::pairs::encode(allocated_extents(memory)?);
        let ctl = sd.control().context("the checkpoint SD has no control link")?;
        let id = ctl.send(Body::CopyMemory { at, extents: &extents })?;
        Ok(wait_saved(ctl, id, &mut quiet)?.length)
    })();
    qmp.execute("cont", None).context("resuming the client")?;
    Ok((result?, start.elapsed()))
}

/// Restores `streams` (full first, then deltas) into `client`, a fresh
/// QEMU started with `-incoming defer` whose memory file `sd` maps
/// writable; the client is left running.
pub fn restore(
    client: &Domain,
    sd: &mut Domain,
    scratch: &Path,
    streams: &[Stream],
    progress: ProgressFn<'_>,
) -> Result<Duration> {
    let start = Instant::now();
    let ctl = sd.control().context("the checkpoint SD has no control link")?;
    let list = pairs(streams);
    // The generations the tenant's record names: the SD refuses a stream of
    // any other before it writes a page.
    let generations: Vec<u8> = streams.iter().flat_map(|s| s.generation.to_le_bytes()).collect();
    let id = ctl.send(Body::RestoreCheckpoint { streams: &list, generations: &generations })?;
    let mut state = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.checked_duration_since(Instant::now()).context("the checkpoint SD did not answer")?;
        match ctl.recv(left) {
            Some(ControlEvent::DeviceState { request_id, offset, bytes, .. }) if request_id == id => {
                if offset != state.len() as u64 {
                    bail!("device state frames out of order");
                }
                state.extend_from_slice(&bytes);
            }
            Some(ControlEvent::Progress { request_id, done, total }) if request_id == id => progress(done, total),
            Some(ControlEvent::Ack { request_id }) if request_id == id => break,
            Some(ControlEvent::Error { request_id, code, message }) if request_id == id => {
                bail!("the checkpoint SD refused the restore ({code:?}): {message}")
            }
            Some(ControlEvent::Broken(why)) => bail!("checkpoint SD control link broken: {why}"),
            Some(_) => {}
            None => bail!("the checkpoint SD did not answer"),
        }
    }
    let file = scratch.join("device-state-restore.bin");
    std::fs::write(&file, &state)?;
    let mut qmp = client.qmp(T)?;
    ignore_shared(&mut qmp)?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("exec:cat '{}'", file.display()) })))?;
    let t = Instant::now();
    loop {
        match qmp.status()?.as_str() {
            "paused" | "running" => break,
            _ if t.elapsed() > T => bail!("the client did not load its device state"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // A checkpoint taken after `stop` comes up paused.
    if qmp.status()? == "paused" {
        qmp.execute("cont", None)?;
    }
    let _ = std::fs::remove_file(&file);
    Ok(start.elapsed())
}
