//! The LUKS header is the provider's: the input is a whole volume image
//! (LUKS1 or LUKS2 header, JSON area, keyslot areas) that the tenant tool
//! tries to unlock. Never a panic, whatever the header says; the limits
//! here are small so that each input costs milliseconds, and the library's
//! bounds are what refuses anything bigger.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssc_luks::{Bytes, Limits, unlock_from};

const LIMITS: Limits = Limits { stripes: 4000, iterations: 2000, argon2_kib: 256, argon2_time: 4, argon2_lanes: 4 };

fuzz_target!(|data: &[u8]| {
    let _ = unlock_from(&Bytes(data), "fuzz", b"pass", &LIMITS);
});
