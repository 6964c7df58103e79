//! Sector 0 of a provider's volume is untrusted: decoding it and checking a
//! key against it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_storage_crypt::header::VolumeHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = VolumeHeader::decode(data) {
        let _ = h.verify_key(&[1; 64]);
        assert_eq!(VolumeHeader::decode(&h.encode()), Ok(h));
    }
});
