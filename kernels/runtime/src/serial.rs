//! COM1 (16550 UART at 0x3F8), transmit only. Log lines go here; never a
//! secret (see the logging rule in docs/architecture.md).

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;

/// Programs COM1 for 115200 8N1 with FIFOs on. Under QEMU the speed does not
/// matter, but real UARTs (and some VMMs) want a sane setup.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1 = 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR | RTS
}

/// Writes bytes, waiting for the transmit holding register each time.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

fn put(b: u8) {
    // Bounded wait: a UART that never drains must not hang the image.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// A `core::fmt::Write` sink on COM1.
pub struct Com1;

impl core::fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}
