//! Leaving an image: QEMU's `isa-debug-exit` device (I/O port 0xf4, one byte)
//! turns a write of `v` into QEMU's exit status `(v << 1) | 1`.
//!
//! | written | QEMU exit status | meaning |
//! | --- | --- | --- |
//! | 0x10 | 33 | the image finished and its checks passed |
//! | 0x20 + reason | 65 + 2 × reason | failure; `reason` is a [`Failure`] |
//!
//! `host-tools` (`ssc run`) maps these back to words and its own exit code.

use crate::cpu::{halt_forever, outb};

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Value written for success (QEMU exits with 33).
pub const SUCCESS_VALUE: u8 = 0x10;
/// Base of failure values (QEMU exits with 65 + 2 × reason).
pub const FAILURE_BASE: u8 = 0x20;

/// Why an image stopped unsuccessfully. Kept in sync with
/// `host-tools/src/qemu.rs` (`ExitStatus::from_qemu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    Panic = 1,
    CheckFailed = 2,
    NoEntropy = 3,
    CpuException = 4,
    BootInfo = 5,
    Device = 6,
}

/// Reports success to the host and stops.
pub fn success() -> ! {
    log::info!(target: "ssc", "exit: success");
    outb(DEBUG_EXIT_PORT, SUCCESS_VALUE);
    halt_forever()
}

/// Reports a failure to the host and stops. The reason is written to the
/// log as well, so a host without `isa-debug-exit` still sees it.
pub fn fail(reason: Failure, message: &str) -> ! {
    crate::serial::write_bytes(b"ssc: exit: failure: ");
    crate::serial::write_bytes(message.as_bytes());
    crate::serial::write_bytes(b"\n");
    outb(DEBUG_EXIT_PORT, FAILURE_BASE + reason as u8);
    halt_forever()
}
