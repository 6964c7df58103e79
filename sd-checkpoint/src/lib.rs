//! Checkpoint SD core: page scanning, stream format, encryption, deltas, restore.
//!
//! Sans-IO and `no_std`: this crate consumes bytes and events and returns
//! bytes and actions; the image crate under `kernels/` wires it to devices.
//! Nothing here yet: its issue builds it (see docs/architecture.md).
#![no_std]
#![forbid(unsafe_code)]
