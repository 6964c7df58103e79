//! Arbitrary client bytes, in arbitrary splits, into an NBD server over a
//! small encrypted volume: nothing may panic, before or after the handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_storage_crypt::nbd::{Export, Server};
use sd_storage_crypt::volume::{Cipher, CryptVolume, Layout, MemDevice};
use sd_storage_crypt::xts::Xts;

fuzz_target!(|data: &[u8]| {
    let x = Xts::new(&[9; 64]).unwrap();
    let mut vol = CryptVolume::new(MemDevice::new(64 << 10), Cipher::XtsPlain64(x.into()), Layout::PLAIN_512, false).unwrap();
    let mut s = Server::new(Export { name: "vol".into(), description: String::new() });
    // Half the inputs start from a completed handshake (client flags + GO).
    let (skip_handshake, rest) = data.split_first().map(|(b, r)| (b & 1 == 1, r)).unwrap_or((false, data));
    if skip_handshake {
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&[0; 6]);
        s.receive(&go, &mut vol).unwrap();
    }
    let split = rest.first().copied().unwrap_or(1).max(1) as usize;
    for chunk in rest.chunks(split) {
        if s.receive(chunk, &mut vol).is_err() {
            break;
        }
        let _ = s.take_output();
    }
});
