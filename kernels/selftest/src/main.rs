//! The runtime's acceptance test, booted by `ssc run` and by CI.
//!
//! Checks, in order: heap, RNG, clock, the C shim, ring (SHA-256 and
//! AES-256-GCM known answers, round trip, tamper detection, throughput),
//! the control link (Hello/Ready frames, then a Ping from the builder
//! answered with a Pong), virtio-blk (host marker at sector 0, a written
//! pattern read back after flush, throughput), and a virtio-serial echo on
//! the `echo` link (the host sends an 8-byte length, then data; every byte
//! comes back), and a memory window (ivshmem BAR2 above 4 GiB: the host's
//! marker at both ends, a bounded access refused, a write that the host
//! checks reached the file only under a writable grant). A check whose device is
//! absent is logged as SKIP, a failed one stops the image with a non-zero
//! exit; the last line is `selftest: PASS checks=N skipped=M`.
//!
//! `selftest.fail=panic` and `selftest.fail=fault` make the image panic, or
//! touch a non-canonical address (#GP), right after it is ready: tests use
//! them to check that the runtime reports both with the right exit reason.
//!
//! With `selftest.hold=1` the image then keeps serving its control link
//! (Ping → Pong) until the builder sends `Shutdown`, so builder lifecycle
//! tests have a domain that stays up and stops gracefully.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use runtime::clock::Instant;
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::{PortId, VirtioSerial};
use runtime::{Boot, ImageResult, bail};
use ssc_abi::{Body, Envelope};

runtime::entry!(main);

const MIB: usize = 1 << 20;
/// Where the disk check writes its pattern, and how much.
const PATTERN_OFFSET: u64 = MIB as u64;
const PATTERN_LEN: usize = 8 * MIB;
/// The first bytes of sector 0 that the host writes before boot.
const DISK_MARKER: &[u8] = b"SSC-SELFTEST-DISK\n";
/// The host writes these at the start and the end of a memory window.
const WINDOW_MARKER: &[u8] = b"SSC-SELFTEST-WINDOW\n";
const WINDOW_END: &[u8] = b"WINDOWEN";
/// What the guest tries to write at offset 4096 of a window.
const WINDOW_WRITE: &[u8] = b"GUEST-WROTE-THIS";

#[derive(Default)]
struct Tally {
    passed: u32,
    skipped: u32,
}

impl Tally {
    fn pass(&mut self, name: &str, detail: core::fmt::Arguments) {
        self.passed += 1;
        info!(target: "selftest", "PASS {name}: {detail}");
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        warn!(target: "selftest", "SKIP {name}: {why}");
    }
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
}

/// The disk pattern: one splitmix64 word per 8 bytes of absolute offset.
/// `qemu-tests` computes the same words to check the file after the run.
fn pattern_word(offset: u64) -> u64 {
    let mut z = offset ^ 0x5353_4353_0000_0000;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn main(mut boot: Boot) -> ImageResult {
    let mut disks = boot.platform.block_devices()?;
    let mut serial = boot.platform.serial()?;
    let mut windows = boot.platform.memory_windows()?;
    // Hello first: the builder knows the image speaks the ABI (and can ask it
    // to stop) before it is ready.
    let mut ctl = serial
        .as_mut()
        .and_then(|s| ControlLink::open(s, "selftest", env!("CARGO_PKG_VERSION"), Duration::from_millis(500)).ok());
    runtime::ready("selftest");
    match boot.arg("selftest.fail") {
        Some("panic") => panic!("deliberate panic (selftest.fail=panic)"),
        Some("fault") => {
            // SAFETY: deliberately unsound: a read from a non-canonical
            // address raises #GP, which the runtime must report and exit on.
            let v = unsafe { core::ptr::read_volatile(0x8000_0000_0000_0000 as *const u64) };
            bail!("a non-canonical read returned {v:#x} instead of faulting");
        }
        _ => {}
    }

    let mut t = Tally::default();
    check_heap(&mut t, boot.heap_bytes)?;
    check_rng(&mut t)?;
    check_clock(&mut t)?;
    check_shim(&mut t)?;
    check_crypto(&mut t)?;

    let mut ctl = match (serial.as_mut(), ctl.take()) {
        (Some(s), Some(mut ctl)) => {
            if !check_control(&mut t, s, &mut ctl)? {
                info!(target: "selftest", "Shutdown received during the checks; stopping");
                return Ok(());
            }
            Some(ctl)
        }
        _ => {
            t.skip("control link", "no `ctl` port (ssc run attaches one)");
            None
        }
    };
    match windows.first_mut() {
        Some(w) => check_window(&mut t, w)?,
        None => t.skip("memory window", "no ivshmem window (ssc run --window FILE)"),
    }
    match disks.first_mut() {
        Some(d) => check_disk(&mut t, d)?,
        None => t.skip("virtio-blk", "no disk attached (ssc run --disk FILE)"),
    }
    match serial.as_mut() {
        Some(s) => match s.open("echo", Duration::from_millis(500)) {
            Ok(port) => check_echo(&mut t, s, port)?,
            Err(_) => t.skip("virtio-serial echo", "no `echo` link (ssc run --link echo=SOCKET)"),
        },
        None => t.skip("virtio-serial echo", "no virtio-serial device"),
    }
    info!(target: "selftest", "selftest: PASS checks={} skipped={}", t.passed, t.skipped);
    if boot.arg("selftest.hold") == Some("1") {
        match (serial.as_mut(), ctl.as_mut()) {
            (Some(s), Some(ctl)) => serve_until_shutdown(s, ctl)?,
            _ => bail!("selftest.hold=1 needs the control link"),
        }
    }
    Ok(())
}

fn serve_until_shutdown(s: &mut VirtioSerial, ctl: &mut ControlLink) -> ImageResult {
    info!(target: "selftest", "holding: serving the control link until Shutdown");
    loop {
        let payload = ctl.next(s, None)?;
        let env = Envelope::decode(&payload)?;
        match env.body {
            Body::Ping { payload } => ctl.send(s, &Envelope::new(env.request_id, Body::Pong { payload }))?,
            Body::Shutdown => {
                info!(target: "selftest", "Shutdown received; stopping");
                return Ok(());
            }
            other => {
                let msg = alloc::format!("selftest does not serve {other:?}");
                ctl.send(
                    s,
                    &Envelope::new(
                        env.request_id,
                        Body::Error { code: ssc_abi::ErrorCode::Unsupported, message: &msg },
                    ),
                )?
            }
        }
    }
}

fn check_window(t: &mut Tally, w: &mut runtime::window::MemoryWindow) -> ImageResult {
    let mut head = [0u8; 20];
    w.read(0, &mut head)?;
    let mut tail = [0u8; 8];
    w.read(w.len() - 8, &mut tail)?;
    if head[..] != WINDOW_MARKER[..] || tail[..] != WINDOW_END[..] {
        bail!("memory window: the host's markers are not at offset 0 and at the end");
    }
    if w.read(w.len() - 4, &mut tail).is_ok() {
        bail!("memory window: a read past the end was not refused");
    }
    // Whether this reaches the file is the host's to check: QEMU maps a
    // read-only window copy-on-write, so the guest always reads its own
    // write back, but only a writable grant carries it to the other domain.
    w.write(4096, WINDOW_WRITE)?;
    t.pass(
        "memory window",
        format_args!(
            "{} MiB ivshmem window, host markers read, out-of-window read refused, marker written at 4096",
            w.len() >> 20
        ),
    );
    Ok(())
}

fn check_heap(t: &mut Tally, heap_bytes: usize) -> ImageResult {
    let len = (16 * MIB).min(heap_bytes / 4);
    let mut big: Vec<u64> = Vec::with_capacity(len / 8);
    for i in 0..len / 8 {
        big.push((i as u64).wrapping_mul(0x9e37_79b9));
    }
    if big.iter().enumerate().any(|(i, &v)| v != (i as u64).wrapping_mul(0x9e37_79b9)) {
        bail!("heap: a {len}-byte buffer did not read back what was written");
    }
    drop(big);
    let small: Vec<alloc::boxed::Box<[u8; 24]>> = (0..10_000).map(|i| alloc::boxed::Box::new([i as u8; 24])).collect();
    if small.iter().enumerate().any(|(i, b)| b[23] != i as u8) {
        bail!("heap: small allocations overlap");
    }
    t.pass(
        "heap",
        format_args!("{} MiB heap, {} MiB buffer and 10000 small boxes verified", heap_bytes / MIB, len / MIB),
    );
    Ok(())
}

fn check_rng(t: &mut Tally) -> ImageResult {
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 4096];
    getrandom::getrandom(&mut a).map_err(|e| runtime::ImageError(alloc::format!("getrandom: {e}")))?;
    runtime::rng::fill(&mut b)?;
    let ones: u32 = a.iter().map(|x| x.count_ones()).sum();
    // 32768 bits: mean 16384, sigma 90; 10 sigma is a broken source.
    if a == b || !(15_484..=17_284).contains(&ones) {
        bail!("rng: output looks non-random ({ones} one-bits of 32768)");
    }
    t.pass("rng", format_args!("getrandom() through the syscall shim, {ones}/32768 one-bits"));
    Ok(())
}

fn check_clock(t: &mut Tally) -> ImageResult {
    let start = Instant::now();
    let mut last = runtime::clock::since_boot();
    for _ in 0..1000 {
        let now = runtime::clock::since_boot();
        if now < last {
            bail!("clock went backwards: {now:?} < {last:?}");
        }
        last = now;
    }
    runtime::clock::spin_for(Duration::from_millis(5));
    let e = start.elapsed();
    if e < Duration::from_millis(5) {
        bail!("clock: a 5 ms wait lasted {e:?}");
    }
    t.pass(
        "clock",
        format_args!("monotonic, TSC {} MHz, 5 ms wait measured {:?}", runtime::clock::tsc_hz() / 1_000_000, e),
    );
    Ok(())
}

fn check_shim(t: &mut Tally) -> ImageResult {
    // Overlapping moves of every small length/offset through core's
    // `copy_within` (→ memmove) and copies (→ memcpy), SSE-width included.
    let base: Vec<u8> = (0..512u32).map(|i| (i * 31 + 7) as u8).collect();
    for (from, to) in [(0usize, 1usize), (1, 0), (3, 40), (40, 3), (16, 48), (48, 16)] {
        for n in [1usize, 15, 16, 17, 32, 33, 100, 300] {
            let mut v = base.clone();
            v.copy_within(from..from + n, to);
            let expect: Vec<u8> =
                (0..512).map(|i| if i >= to && i < to + n { base[from + i - to] } else { base[i] }).collect();
            if v != expect {
                bail!("memmove from {from} to {to} len {n} is wrong");
            }
        }
    }
    t.pass("c-shim", format_args!("memcpy/memmove/memset/memcmp verified on overlapping SSE-width copies"));
    Ok(())
}

fn hex(bytes: &[u8]) -> alloc::string::String {
    bytes.iter().map(|b| alloc::format!("{b:02x}")).collect()
}

fn check_crypto(t: &mut Tally) -> ImageResult {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use ring::digest::{SHA256, digest};
    use ring::rand::{SecureRandom, SystemRandom};

    let d = digest(&SHA256, b"abc");
    if hex(d.as_ref()) != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
        bail!("SHA-256(\"abc\") known answer is wrong: {}", hex(d.as_ref()));
    }
    // NIST GCM test case 14: K = 0^256, IV = 0^96, P = 0^128.
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0; 32]).map_err(|_| runtime::ImageError("aes key".into()))?);
    let mut block = vec![0u8; 16];
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut block)
        .map_err(|_| runtime::ImageError("aes-gcm seal failed".into()))?;
    if hex(&block) != "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919" {
        bail!("AES-256-GCM known answer is wrong: {}", hex(&block));
    }

    let rng = SystemRandom::new();
    let mut raw_key = [0u8; 32];
    rng.fill(&mut raw_key).map_err(|_| runtime::ImageError("SystemRandom failed".into()))?;
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw_key).map_err(|_| runtime::ImageError("aes key".into()))?);
    let plain: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();

    let start = Instant::now();
    let d = digest(&SHA256, &plain);
    let sha_rate = mib_s(plain.len(), start.elapsed());
    if d.as_ref() == [0u8; 32] {
        bail!("SHA-256 of 4 MiB is zero");
    }

    let mut buf = plain.clone();
    let start = Instant::now();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([7; 12]), Aad::from(b"ssc"), &mut buf)
        .map_err(|_| runtime::ImageError("aes-gcm seal failed".into()))?;
    let seal_rate = mib_s(plain.len(), start.elapsed());
    let mut tampered = buf.clone();
    tampered[1234] ^= 1;
    if key.open_in_place(Nonce::assume_unique_for_key([7; 12]), Aad::from(b"ssc"), &mut tampered).is_ok() {
        bail!("AES-256-GCM accepted a tampered ciphertext");
    }
    let opened = key
        .open_in_place(Nonce::assume_unique_for_key([7; 12]), Aad::from(b"ssc"), &mut buf)
        .map_err(|_| runtime::ImageError("AES-256-GCM could not open its own ciphertext".into()))?;
    if opened != &plain[..] {
        bail!("AES-256-GCM round trip changed the data");
    }
    t.pass(
        "crypto",
        format_args!("ring SHA-256 and AES-256-GCM known answers, round trip, tamper refused; sha256 {sha_rate:.1} MiB/s, aes-256-gcm seal {seal_rate:.1} MiB/s"),
    );
    Ok(())
}

/// Sends Ready and answers the builder's Ping; `Ok(false)` if the builder
/// asked the image to stop instead.
fn check_control(t: &mut Tally, s: &mut VirtioSerial, ctl: &mut ControlLink) -> Result<bool, runtime::ImageError> {
    let boot_us = runtime::clock::since_boot().as_micros() as u64;
    ctl.send(s, &Envelope::new(0, Body::Ready { image: "selftest", boot_us }))?;
    let payload = ctl.next(s, Some(Duration::from_secs(30)))?;
    let env = Envelope::decode(&payload)?;
    match env.body {
        Body::Ping { payload } => {
            ctl.send(s, &Envelope::new(env.request_id, Body::Pong { payload }))?;
            ctl.flush(s)?;
            t.pass("control link", format_args!("Hello/Ready sent, Ping of {} bytes answered", payload.len()));
            Ok(true)
        }
        Body::Shutdown => Ok(false),
        other => bail!("control link: expected the builder's Ping, got {other:?}"),
    }
}

fn check_disk(t: &mut Tally, d: &mut runtime::blk::BlockDevice) -> ImageResult {
    let need = PATTERN_OFFSET + PATTERN_LEN as u64;
    if d.capacity() < need {
        bail!("virtio-blk: disk has {} bytes, the self-test needs {need}", d.capacity());
    }
    let mut sector = [0u8; 512];
    d.read_at(0, &mut sector)?;
    if !sector.starts_with(DISK_MARKER) {
        bail!(
            "virtio-blk: sector 0 does not start with the host's marker {:?}",
            core::str::from_utf8(DISK_MARKER).unwrap_or("")
        );
    }
    let mut data = vec![0u8; PATTERN_LEN];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(PATTERN_OFFSET + 8 * i as u64).to_le_bytes());
    }
    let start = Instant::now();
    d.write_at(PATTERN_OFFSET, &data)?;
    d.flush()?;
    let write_rate = mib_s(PATTERN_LEN, start.elapsed());
    let mut back = vec![0u8; PATTERN_LEN];
    let start = Instant::now();
    d.read_at(PATTERN_OFFSET, &mut back)?;
    let read_rate = mib_s(PATTERN_LEN, start.elapsed());
    if back != data {
        let at = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        bail!("virtio-blk: read-back differs at byte {}", PATTERN_OFFSET + at as u64);
    }
    t.pass(
        "virtio-blk",
        format_args!("{} MiB disk, host marker read, {} MiB written+flushed+verified; write {write_rate:.1} MiB/s, read {read_rate:.1} MiB/s", d.capacity() >> 20, PATTERN_LEN / MIB),
    );
    Ok(())
}

fn check_echo(t: &mut Tally, s: &mut VirtioSerial, port: PortId) -> ImageResult {
    let mut len = [0u8; 8];
    s.read_exact(port, &mut len, Some(Duration::from_secs(60)))
        .map_err(|e| runtime::ImageError(alloc::format!("echo: no length header from the host within 60 s: {e}")))?;
    let total = u64::from_le_bytes(len) as usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    let start = Instant::now();
    while done < total {
        let want = buf.len().min(total - done);
        let n = s.read(port, &mut buf[..want])?;
        if n > 0 {
            s.write_all(port, &buf[..n])?;
            done += n;
        }
    }
    s.flush(port)?;
    t.pass(
        "virtio-serial echo",
        format_args!("{total} bytes echoed losslessly, {:.1} MiB/s each way", mib_s(total, start.elapsed())),
    );
    Ok(())
}
