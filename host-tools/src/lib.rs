//! The host side of SSC-on-unikernels.
//!
//! * [`qemu`]: the QEMU binary, accelerators (KVM probed, TCG fallback),
//!   machine and firmware choice, and what an image's exit status means;
//! * [`builder`]: the domain builder: a domain spec becomes a QEMU process
//!   with the project's device conventions; start, readiness, control link,
//!   stop and cleanup (sockets, run directories) even on Ctrl-C or crash;
//! * [`qmp`]: a small QMP client;
//! * [`catalog`]: signed image manifests (SHA-384, Ed25519);
//! * [`doctor`]: what this machine has and how to install what it lacks;
//! * [`bench`]: boot-time benchmarks; [`bench_storage`]: the storage core.
//!
//! The `ssc` binary (src/main.rs) is a thin clap front end over these.

pub mod bench;
pub mod bench_checkpoint;
pub mod bench_checkpoint_e2e;
pub mod bench_dedup;
pub mod bench_dedup_e2e;
pub mod bench_hsm;
pub mod bench_introspect;
pub mod bench_launch;
pub mod bench_storage;
pub mod bench_storage_e2e;
pub mod builder;
pub mod catalog;
pub mod chain;
pub mod chain_checkpoint;
pub mod chain_dedup;
pub mod chain_hsm;
pub mod chain_introspect;
pub mod chain_udom0;
pub mod checkpoint;
pub mod dedup;
pub mod doctor;
pub mod durable;
pub mod grants;
pub mod luks;
pub mod profile;
pub mod provider;
pub mod qemu;
pub mod qmp;
pub mod roles;
pub mod tpm_gate;
pub mod vtpm;

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a Ctrl-C handler that makes every wait loop in this crate
/// return an "interrupted" error, so destructors stop QEMU and clean up.
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
