//! Random bytes from RDSEED (preferred, retried) or RDRAND. An image refuses
//! to start on a CPU with neither: `getrandom` (and so `ring`) draws from
//! here through the `syscall` shim, and there is no other entropy source.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::cpu::{cpuid, hw_random};

const NONE: u8 = 0;
const RDRAND: u8 = 1;
const RDSEED: u8 = 2;
const BOTH: u8 = 3;

static SUPPORT: AtomicU8 = AtomicU8::new(NONE);

/// The entropy instruction failed repeatedly or is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngError;

impl core::fmt::Display for RngError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("hardware RNG (RDSEED/RDRAND) gave no entropy after retries")
    }
}

/// Probes CPUID. Returns a description of what is available, or an error
/// message that tells the operator how to fix it.
pub fn init() -> Result<&'static str, &'static str> {
    let rdrand = cpuid(1, 0).ecx & (1 << 30) != 0;
    let rdseed = cpuid(0, 0).eax >= 7 && cpuid(7, 0).ebx & (1 << 18) != 0;
    let (s, name) = match (rdseed, rdrand) {
        (true, true) => (BOTH, "rdseed+rdrand"),
        (true, false) => (RDSEED, "rdseed"),
        (false, true) => (RDRAND, "rdrand"),
        (false, false) => {
            return Err(
                "this CPU has neither RDSEED nor RDRAND; start QEMU with `-cpu max` (TCG) or `-cpu host` on a CPU that has them",
            );
        }
    };
    SUPPORT.store(s, Ordering::Relaxed);
    Ok(name)
}

fn next_u64() -> Result<u64, RngError> {
    let s = SUPPORT.load(Ordering::Relaxed);
    if s & RDSEED != 0 {
        for _ in 0..64 {
            if let Some(v) = hw_random(true) {
                return Ok(v);
            }
            core::hint::spin_loop();
        }
    }
    if s & RDRAND != 0 {
        // Intel's guidance: ten retries make a failure a hardware fault.
        for _ in 0..10 {
            if let Some(v) = hw_random(false) {
                return Ok(v);
            }
        }
    }
    Err(RngError)
}

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> Result<(), RngError> {
    for chunk in buf.chunks_mut(8) {
        let v = next_u64()?.to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    Ok(())
}
