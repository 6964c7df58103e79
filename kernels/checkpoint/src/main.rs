//! The checkpoint service domain.
//!
//! It sees one client's memory through a memory window (read-only for a
//! save, write-granted for a restore onto a fresh memory file) and keeps
//! checkpoint streams on its own virtio-blk disk. The tenant side drives
//! it on the control link: `CheckpointKey` (client id and key), then
//! `DeviceState` frames (QEMU's device state, taken by the builder with
//! `x-ignore-shared` migration) and `SaveCheckpoint`, or
//! `RestoreCheckpoint`, which verifies every stream before writing a page
//! and sends the device state back. Between operations it keeps only the
//! page hashes of the generation it last wrote or restored; a delta
//! against anything else re-verifies its base from the disk, which yields
//! the hashes and proves the base intact.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::time::Duration;

use downstream::{Down, Serial};
use runtime::clock::Instant;
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::VirtioSerial;
use runtime::window::MemoryWindow;
use runtime::{Boot, ImageResult, bail};
use sd_checkpoint::{CheckpointError, Restorer, SaveOptions, Saver, Source};
use sd_storage_crypt::volume::BlockDevice;
use ssc_abi::{Body, Envelope, ErrorCode};

runtime::entry!(main);

const IMAGE: &str = "checkpoint";
/// Bytes of device state per control frame.
const STATE_CHUNK: usize = 48 * 1024;
/// Stream bytes written to the disk at a time.
const FLUSH_AT: usize = 1 << 20;

/// Bytes between two `Progress` frames.
const PROGRESS_STEP: u64 = 32 << 20;

/// Sends `Progress` frames for one request on the control link (best
/// effort: a broken link shows up in the main loop).
struct Progress<'a> {
    serial: &'a Serial,
    ctl: &'a ControlLink,
    id: u64,
    total: u64,
    done: Cell<u64>,
    next: Cell<u64>,
}

impl<'a> Progress<'a> {
    fn new(serial: &'a Serial, ctl: &'a ControlLink, id: u64, total: u64) -> Self {
        Progress { serial, ctl, id, total, done: Cell::new(0), next: Cell::new(PROGRESS_STEP.min(total)) }
    }

    /// `n` more bytes done.
    fn add(&self, n: u64) {
        self.set(self.done.get() + n);
    }

    /// The operation is complete: reports 100 % unless that was sent.
    fn finish(&self) {
        if self.next.get() != u64::MAX {
            self.next.set(0);
            self.set(self.total);
        }
    }

    fn set(&self, done: u64) {
        self.done.set(done);
        // Every step, and once at the end.
        if done >= self.next.get() {
            self.next.set(if done >= self.total { u64::MAX } else { (done + PROGRESS_STEP).min(self.total) });
            let body = Body::Progress { done: done.min(self.total), total: self.total };
            let _ = self.ctl.send(&mut self.serial.borrow_mut(), &Envelope::new(self.id, body));
        }
    }
}

/// A stream on the disk, read through sector-aligned spans.
struct DiskSource<'d> {
    disk: &'d RefCell<Down>,
    at: u64,
    len: u64,
    span: Vec<u8>,
    progress: Option<&'d Progress<'d>>,
}

impl Source for DiskSource<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
        if offset + buf.len() as u64 > self.len {
            return Err(CheckpointError::Truncated { at: self.len });
        }
        let start = self.at + offset;
        let first = start & !511;
        let end = (start + buf.len() as u64).next_multiple_of(512);
        self.span.resize((end - first) as usize, 0);
        self.disk
            .borrow_mut()
            .read_at(first, &mut self.span)
            .map_err(|_| CheckpointError::Io("reading the checkpoint disk"))?;
        let skip = (start - first) as usize;
        buf.copy_from_slice(&self.span[skip..skip + buf.len()]);
        if let Some(p) = self.progress {
            p.add(buf.len() as u64);
        }
        Ok(())
    }
}

/// `offset, length` pairs (u64 LE) → sources on the disk.
fn sources<'d>(
    disk: &'d RefCell<Down>,
    pairs: &[u8],
    progress: Option<&'d Progress<'d>>,
) -> Result<Vec<DiskSource<'d>>, &'static str> {
    let list = ssc_abi::pairs::decode(pairs).ok_or("stream list is not offset/length pairs")?;
    let capacity = disk.borrow().size();
    let mut out = vec![];
    for (at, len) in list {
        if !at.is_multiple_of(512) || at.checked_add(len).is_none_or(|e| e > capacity) {
            return Err("a stream lies outside the checkpoint disk");
        }
        out.push(DiskSource { disk, at, len, span: Vec::new(), progress });
    }
    Ok(out)
}

/// What the tenant side configured, and the page hashes of the last
/// checkpoint this domain wrote or restored (the base of the next delta).
struct Job {
    client: [u8; 16],
    key: Vec<u8>,
    hashes: Option<sd_checkpoint::PageHashes>,
}

type Reply = Result<(), (ErrorCode, alloc::string::String)>;

fn main(mut boot: Boot) -> ImageResult {
    let mut disks = boot.platform.block_devices()?;
    let Some(serial) = boot.platform.serial()? else {
        bail!("checkpoint needs its control link");
    };
    let serial: Serial = Rc::new(RefCell::new(serial));
    let mut ctl =
        ControlLink::open(&mut serial.borrow_mut(), IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    // Streams land on its own disk, or through a storage SD's export.
    let disk = Down::open(
        &mut disks,
        &serial,
        "checkpoint needs somewhere for its checkpoints: a disk (--disk FILE) or a `down` link to a storage SD",
    )
    .map_err(runtime::ImageError)?;
    let what = disk.describe();
    let disk = RefCell::new(disk);
    let mut windows = boot.platform.memory_windows()?;
    if windows.is_empty() {
        bail!("checkpoint needs the client's memory window (a grant: --window FILE[:rw])");
    }
    let mut window = windows.remove(0);
    ctl.ready(&mut serial.borrow_mut(), IMAGE)?;
    info!(
        target: IMAGE,
        "client memory window {} MiB, checkpoints on {what} of {} MiB; waiting for CheckpointKey",
        window.len() >> 20,
        disk.borrow().size() >> 20
    );
    let mut job: Option<Job> = None;
    let mut state: Vec<u8> = Vec::new();
    loop {
        let Some(payload) = ctl.poll(&mut serial.borrow_mut())? else { continue };
        let Some(env) = ctl.triage(&mut serial.borrow_mut(), &payload)? else { continue };
        let id = env.request_id;
        let reply: Reply = match env.body {
            Body::Shutdown => {
                info!(target: IMAGE, "Shutdown");
                return Ok(());
            }
            Body::CheckpointKey { client, key } => match <[u8; 16]>::try_from(client) {
                Ok(client) if key.len() >= 32 => {
                    job = Some(Job { client, key: key.to_vec(), hashes: None });
                    info!(target: IMAGE, "checkpoint key configured for client {:02x}{:02x}…", client[0], client[1]);
                    Ok(())
                }
                _ => {
                    Err((ErrorCode::Malformed, "CheckpointKey needs a 16-byte client id and a key of 32+ bytes".into()))
                }
            },
            Body::DeviceState { offset, total, bytes } => {
                if offset == 0 {
                    state.clear();
                }
                if offset != state.len() as u64 || offset + bytes.len() as u64 > total || total > 64 << 20 {
                    Err((ErrorCode::Malformed, "DeviceState frames out of order or too large".into()))
                } else {
                    state.extend_from_slice(bytes);
                    Ok(())
                }
            }
            Body::SaveCheckpoint { generation, at, base, compress, salt, extents } => match job.as_mut() {
                None => Err((ErrorCode::Denied, "no CheckpointKey yet".into())),
                Some(job) => {
                    let progress = Progress::new(&serial, &ctl, id, window.len());
                    let req = SaveReq { generation, at, base, compress, salt, extents };
                    match save(&disk, &window, job, &req, &state, &progress) {
                        Ok((length, stats, micros)) => {
                            let body = Body::CheckpointSaved {
                                generation,
                                length,
                                pages_read: stats.pages_read,
                                pages_stored: stats.pages_stored,
                                micros,
                            };
                            ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, body))?;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            },
            Body::CopyMemory { at, extents } => match copy_memory(&disk, &window, at, extents) {
                Ok((length, pages, micros)) => {
                    let body =
                        Body::CheckpointSaved { generation: 0, length, pages_read: pages, pages_stored: pages, micros };
                    ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, body))?;
                    continue;
                }
                Err(e) => Err(e),
            },
            Body::RestoreCheckpoint { streams, generations } => match job.as_mut() {
                None => Err((ErrorCode::Denied, "no CheckpointKey yet".into())),
                Some(job) => restore(&disk, &mut window, job, (streams, generations), (&serial, &ctl, id)).and_then(
                    |device_state| {
                        send_state(&mut serial.borrow_mut(), &ctl, id, &device_state)
                            .map_err(|e| (ErrorCode::Internal, alloc::format!("control link: {}", e.0)))
                    },
                ),
            },
            other => Err((ErrorCode::Unsupported, alloc::format!("{IMAGE} does not serve {other:?}"))),
        };
        match reply {
            Ok(()) => ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, Body::Ack))?,
            Err((code, message)) => {
                warn!(target: IMAGE, "request {id} refused: {message}");
                ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, Body::Error { code, message: &message }))?
            }
        }
    }
}

fn refused(e: CheckpointError) -> (ErrorCode, alloc::string::String) {
    let code = match e {
        CheckpointError::Io(_) => ErrorCode::Internal,
        CheckpointError::WrongKey
        | CheckpointError::Mismatch(_)
        | CheckpointError::BrokenChain { .. }
        | CheckpointError::WrongGeneration { .. } => ErrorCode::Denied,
        _ => ErrorCode::Malformed,
    };
    (code, e.to_string())
}

/// A `SaveCheckpoint` request's fields.
struct SaveReq<'a> {
    generation: u64,
    at: u64,
    base: &'a [u8],
    compress: bool,
    salt: &'a [u8],
    extents: &'a [u8],
}

/// Writes a checkpoint at `req.at`; returns its length, statistics and time.
fn save(
    disk: &RefCell<Down>,
    window: &MemoryWindow,
    job: &mut Job,
    req: &SaveReq<'_>,
    state: &[u8],
    progress: &Progress<'_>,
) -> Result<(u64, sd_checkpoint::SaveStats, u64), (ErrorCode, alloc::string::String)> {
    let SaveReq { generation, at, base, compress, salt, extents } = *req;
    let start = Instant::now();
    let salt: [u8; 16] = salt.try_into().map_err(|_| (ErrorCode::Malformed, "the salt must be 16 bytes".into()))?;
    if !at.is_multiple_of(4096) {
        return Err((ErrorCode::Malformed, "checkpoints start at a multiple of 4096".into()));
    }
    let size = window.len();
    // A delta: the hashes this domain kept from the base's last generation
    // if it wrote or restored it; otherwise re-verify the base chain from
    // the disk, which yields them (and proves the base intact).
    let hashes = if base.is_empty() {
        None
    } else {
        let mut srcs = sources(disk, base, None).map_err(|e| (ErrorCode::Malformed, e.into()))?;
        let mut head = [0u8; 96];
        srcs.last_mut().expect("non-empty").read_at(0, &mut head).map_err(refused)?;
        let last = sd_checkpoint::Header::decode(&head).map_err(refused)?.generation;
        match job.hashes.take() {
            Some(h) if h.generation == last && h.client_id == job.client => Some(h),
            _ => {
                info!(target: IMAGE, "delta base generation {last} not in memory: verifying it from the disk");
                let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
                Some(Restorer::new(&job.key, job.client, size).verify(&mut refs).map_err(refused)?.1)
            }
        }
    };
    let opts = SaveOptions { compress, pages_per_chunk: 256 };
    let mut saver = Saver::new(&job.key, job.client, size, generation, hashes.as_ref(), salt, opts).map_err(refused)?;
    if !extents.is_empty() {
        let ext = ssc_abi::pairs::decode(extents)
            .ok_or((ErrorCode::Malformed, "extents are not offset/length pairs".into()))?;
        saver.set_extents(ext);
    }
    let mut out = Vec::with_capacity(2 * FLUSH_AT);
    out.extend_from_slice(&saver.header_bytes());
    let mut written = 0u64;
    let mut next_report = 64u64 << 20;
    while saver.next_pages(window, &mut out).map_err(refused)? {
        if out.len() >= FLUSH_AT {
            written += flush_out(disk, at + written, &mut out, false)?;
        }
        progress.set(saver.scanned());
        if written >= next_report {
            info!(target: IMAGE, "save: {} MiB scanned, {} MiB written", saver.scanned() >> 20, written >> 20);
            next_report += 64 << 20;
        }
    }
    saver.device_state(state, &mut out);
    let (stats, new_hashes) = saver.finish(&mut out).map_err(refused)?;
    let length = stats.bytes_out;
    flush_out(disk, at + written, &mut out, true)?;
    disk.borrow_mut()
        .flush()
        .map_err(|_| (ErrorCode::Internal, "flushing the checkpoint disk failed (see the log)".into()))?;
    job.hashes = Some(new_hashes);
    progress.finish();
    let micros = start.elapsed().as_micros() as u64;
    info!(
        target: IMAGE,
        "saved generation {generation}{}: {} pages read, {} stored, {} zero, {} KiB in {} ms",
        if base.is_empty() { "" } else { " (delta)" },
        stats.pages_read,
        stats.pages_stored,
        stats.zero_pages,
        length >> 10,
        micros / 1000
    );
    Ok((length, stats, micros))
}

/// The copy-only baseline (benchmarks): the allocated extents of memory to
/// the disk at `at`, as they are. Returns bytes, pages and time.
fn copy_memory(
    disk: &RefCell<Down>,
    window: &MemoryWindow,
    at: u64,
    extents: &[u8],
) -> Result<(u64, u64, u64), (ErrorCode, alloc::string::String)> {
    let start = Instant::now();
    if !at.is_multiple_of(4096) {
        return Err((ErrorCode::Malformed, "the copy starts at a multiple of 4096".into()));
    }
    let mut list =
        ssc_abi::pairs::decode(extents).ok_or((ErrorCode::Malformed, "extents are not offset/length pairs".into()))?;
    if list.is_empty() {
        list.push((0, window.len()));
    }
    let mut buf = vec![0u8; FLUSH_AT];
    let mut written = 0u64;
    for (offset, len) in list {
        let end = offset.checked_add(len).filter(|&e| e <= window.len());
        let Some(end) = end else { return Err((ErrorCode::Malformed, "an extent lies outside the window".into())) };
        let mut pos = offset & !4095;
        while pos < end {
            let n = (end.next_multiple_of(4096) - pos).min(FLUSH_AT as u64) as usize;
            window
                .read(pos, &mut buf[..n])
                .map_err(|_| (ErrorCode::Internal, "reading the memory window failed".into()))?;
            let mut d = disk.borrow_mut();
            if at + written + n as u64 > d.size() {
                return Err((ErrorCode::Internal, "the checkpoint disk is full".into()));
            }
            d.write_at(at + written, &buf[..n])
                .map_err(|_| (ErrorCode::Internal, "writing the checkpoint disk failed (see the log)".into()))?;
            written += n as u64;
            pos += n as u64;
        }
    }
    disk.borrow_mut()
        .flush()
        .map_err(|_| (ErrorCode::Internal, "flushing the checkpoint disk failed (see the log)".into()))?;
    let micros = start.elapsed().as_micros() as u64;
    info!(target: IMAGE, "copy-only baseline: {} MiB in {} ms", written >> 20, micros / 1000);
    Ok((written, written / 4096, micros))
}

/// Writes the whole 4 KiB blocks of `out` at `at` (with `all`, the tail
/// too, zero-padded) and drops them from `out`; returns the bytes written.
fn flush_out(
    disk: &RefCell<Down>,
    at: u64,
    out: &mut Vec<u8>,
    all: bool,
) -> Result<u64, (ErrorCode, alloc::string::String)> {
    if all {
        out.resize(out.len().next_multiple_of(4096), 0);
    }
    let n = out.len() / 4096 * 4096;
    if n == 0 {
        return Ok(0);
    }
    let mut d = disk.borrow_mut();
    if at + n as u64 > d.size() {
        return Err((ErrorCode::Internal, "the checkpoint disk is full".into()));
    }
    d.write_at(at, &out[..n])
        .map_err(|_| (ErrorCode::Internal, "writing the checkpoint disk failed (see the log)".into()))?;
    out.drain(..n);
    Ok(n as u64)
}

/// Verifies `streams` and writes them into the window; returns the device
/// state.
fn restore(
    disk: &RefCell<Down>,
    window: &mut MemoryWindow,
    job: &mut Job,
    (streams, generations): (&[u8], &[u8]),
    (serial, ctl, id): (&Serial, &ControlLink, u64),
) -> Result<Vec<u8>, (ErrorCode, alloc::string::String)> {
    if !generations.len().is_multiple_of(8) {
        return Err((ErrorCode::Malformed, "generations are u64 values".into()));
    }
    let generations: Vec<u64> =
        generations.chunks_exact(8).map(|g| u64::from_le_bytes(g.try_into().expect("8 bytes"))).collect();
    let start = Instant::now();
    // Every stream is read twice: the verify pass, then the write pass.
    let total = ssc_abi::pairs::decode(streams).map_or(0, |l| l.iter().map(|(_, len)| 2 * len).sum());
    let progress = Progress::new(serial, ctl, id, total);
    let mut srcs = sources(disk, streams, Some(&progress)).map_err(|e| (ErrorCode::Malformed, e.into()))?;
    let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
    let size = window.len();
    // The builder restores onto a fresh (zero) memory file.
    let r = Restorer::new(&job.key, job.client, size)
        .expecting(&generations)
        .restore(&mut refs, window, true)
        .map_err(refused)?;
    info!(
        target: IMAGE,
        "restored generation {}: {} pages written, device state {} KiB, in {} ms",
        r.generation,
        r.pages_written,
        r.device_state.len() >> 10,
        start.elapsed().as_millis()
    );
    job.hashes = Some(r.hashes);
    progress.finish();
    Ok(r.device_state)
}

/// Sends the device state in `DeviceState` frames tagged with the request.
fn send_state(serial: &mut VirtioSerial, ctl: &ControlLink, id: u64, state: &[u8]) -> ImageResult {
    let total = state.len() as u64;
    let mut offset = 0;
    for bytes in state.chunks(STATE_CHUNK) {
        ctl.send(serial, &Envelope::new(id, Body::DeviceState { offset, total, bytes }))?;
        offset += bytes.len() as u64;
    }
    Ok(())
}
