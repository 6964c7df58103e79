//! Monotonic clock: the TSC, with its frequency from CPUID leaf 0x15 when the
//! CPU reports it, otherwise calibrated once at boot against PIT channel 2
//! over 2 ms (the method Linux's `pit_calibrate_tsc` uses). The boot TSC is
//! read in the first instructions of the PVH entry, so `since_boot` covers
//! the whole guest part of the boot.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use crate::cpu::{cpuid, inb, outb, rdtsc};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    /// TSC value stored by the PVH entry code before anything else ran.
    static SSC_BOOT_TSC: u64;
}

/// TSC at PVH entry.
pub fn boot_tsc() -> u64 {
    #[cfg(not(test))]
    {
        // SAFETY: written once by the boot assembly before Rust code runs and
        // never again; reading a `u64` from `.data` is always valid.
        unsafe { core::ptr::read_volatile(&raw const SSC_BOOT_TSC) }
    }
    #[cfg(test)]
    {
        0
    }
}

/// How the TSC frequency was found, for the boot log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cpuid15,
    Pit,
}

/// Finds the TSC frequency. Called once at boot, before the logger runs.
pub fn init() -> Source {
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let l = cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
            TSC_HZ.store(hz, Ordering::Relaxed);
            return Source::Cpuid15;
        }
    }
    TSC_HZ.store(calibrate_with_pit(), Ordering::Relaxed);
    Source::Pit
}

fn calibrate_with_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 2;
    let latch = (PIT_HZ * MS / 1000) as u16;
    // Gate channel 2 on, speaker off; mode 0, lobyte/hibyte.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, latch as u8);
    outb(0x42, (latch >> 8) as u8);
    let start = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            break; // no PIT: fall through to a nominal frequency below
        }
    }
    let ticks = rdtsc().wrapping_sub(start);
    if ticks == 0 || spins > 50_000_000 {
        return 1_000_000_000;
    }
    ticks * 1000 / MS
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    match TSC_HZ.load(Ordering::Relaxed) {
        0 => 1_000_000_000,
        hz => hz,
    }
}

/// Converts a TSC delta to a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz());
    Duration::from_nanos(ns as u64)
}

/// Monotonic time since the PVH entry.
pub fn since_boot() -> Duration {
    ticks_to_duration(rdtsc().saturating_sub(boot_tsc()))
}

/// A point on the monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    pub fn now() -> Self {
        Instant(rdtsc())
    }

    pub fn elapsed(&self) -> Duration {
        ticks_to_duration(rdtsc().saturating_sub(self.0))
    }
}

/// Busy-waits for `d`.
pub fn spin_for(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        core::hint::spin_loop();
    }
}
