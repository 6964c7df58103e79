//! Syscall and kernel-integrity monitor core: out-of-VM introspection of a
//! Linux client through a read-only window on its guest-physical memory,
//! in the manner of the scanning side of LibVMI/Volatility (upstream KVM
//! has no introspection event API).
//!
//! Sans-IO, `no_std`, no unsafe: everything reads through the
//! [`GuestMemory`] trait (the image's memory window; buffers in tests and
//! benchmarks).
//!
//! - [`profile`]: what one kernel build looks like (symbols from
//!   System.map, field offsets from BTF, the syscall table), made on the
//!   host by `ssc profile build`.
//! - [`vmcoreinfo`]: the KASLR slide and the page-table root, found
//!   deterministically in the kernel's own VMCOREINFO page; a profile of
//!   another build is refused by the build id there.
//! - [`paging`]: 4- and 5-level x86-64 page-table walks.
//! - [`linux`]: the task list, the process tree, modules, the syscall
//!   table, the IDT, kernel text hashes, and each task's syscall (from
//!   the user registers at the top of its kernel stack).
//! - [`monitor`]: scan after scan, the differences as typed [`Event`]s:
//!   process start/exit, hidden process (in the tree, off the task list),
//!   syscall-table and IDT hooks (with the module they point into), text
//!   changes, module load/unload, syscall alerts and per-second samples.
//!
//! Guest memory is attacker-controlled and changes under the reader: every
//! walk is bounded, every pointer is translated and range-checked, lists
//! must link back, and a scan that cannot be read consistently is
//! reported as such instead of a wrong answer. A proptest throws random
//! memory at it.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod linux;
pub mod monitor;
pub mod paging;
pub mod profile;
pub mod vmcoreinfo;

#[cfg(any(test, feature = "fake-guest"))]
#[doc(hidden)]
pub mod fake;
#[cfg(test)]
mod tests;

pub use linux::{AttachError, Kernel, Module, Process, ScanError, Snapshot};
pub use monitor::{Config, Event, Monitor, Owner};
pub use profile::Profile;
pub use ssc_abi::memory::{GuestMemory, OutOfRange};
