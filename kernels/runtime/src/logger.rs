//! `log` backend on COM1: `[   1.234567] LEVEL target: message`.
//! The timestamp is guest monotonic time since PVH entry.

use core::fmt::Write;
use log::{LevelFilter, Log, Metadata, Record};

use crate::serial::Com1;

struct Com1Logger;

static LOGGER: Com1Logger = Com1Logger;
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

impl Log for Com1Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let _guard = LOCK.lock();
        let t = crate::clock::since_boot();
        let _ = writeln!(
            Com1,
            "[{:5}.{:06}] {:5} {}: {}",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger. `level` comes from the `ssc.log=` command-line token.
pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
