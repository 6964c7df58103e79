//! Arbitrary client bytes, in arbitrary splits, into an NBD server over a
//! 1 GiB volume (sparse: it costs only what is written), drained the way
//! the SD drains it: input only while the server wants it, replies sent a
//! budget at a time. Nothing may panic, before or after the handshake, and
//! the reply queue's buffers may never hold more than `MAX_QUEUED_OUTPUT`
//! bytes, nor the input buffer more than one write's payload
//! (pipelined 32 MiB reads once queued 128 MiB in a 128 MiB SD).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_storage_crypt::nbd::{Export, MAX_QUEUED_OUTPUT, MAX_REQUEST, Server};
use sd_storage_crypt::volume::{Cipher, CryptVolume, Layout, SparseDevice};
use sd_storage_crypt::xts::Xts;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&budget, rest)) = rest.split_first() else { return };
    // XTS or the null cipher (fast 32 MiB reads, so more of them per run).
    let cipher = if mode & 2 == 0 { Cipher::XtsPlain64(Xts::new(&[9; 64]).unwrap().into()) } else { Cipher::Null };
    let mut vol = CryptVolume::new(SparseDevice::new(1 << 30), cipher, Layout::PLAIN_512, false).unwrap();
    let mut s = Server::new(Export { name: "vol".into(), description: String::new() });
    // Half the inputs start from a completed handshake (client flags + GO).
    if mode & 1 == 1 {
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"IHAVEOPT");
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&[0; 6]);
        s.receive(&go, &mut vol).unwrap();
    }
    // Bytes the "link" takes per turn: from 4 KiB to 64 MiB.
    let budget = 4096usize << (budget % 15);
    // Reads of at most `split` bytes, and never more than the server wants.
    let split = rest.first().copied().unwrap_or(1).max(1) as usize;
    let mut fed = 0;
    let mut turns = 0;
    while (fed < rest.len() || s.queued_output() > 0) && turns < 100_000 {
        turns += 1;
        let n = s.input_wanted().min(split).min(rest.len() - fed);
        let r = if !s.wants_input() {
            s.serve(&mut vol)
        } else if n > 0 {
            fed += n;
            s.receive(&rest[fed - n..fed], &mut vol)
        } else if fed < rest.len() {
            // Closed: the rest of the input is never read.
            fed = rest.len();
            Ok(())
        } else {
            Ok(())
        };
        assert!(s.queued_output() <= MAX_QUEUED_OUTPUT, "{} bytes of replies held", s.queued_output());
        assert!(s.input_capacity() <= 28 + MAX_REQUEST as usize + 2 * split.max(64 << 10), "input holds {} bytes", s.input_capacity());
        let mut sent = 0;
        while sent < budget && !s.output().is_empty() {
            let n = s.output().len().min(budget - sent);
            s.consume_output(n);
            sent += n;
        }
        if r.is_err() && s.queued_output() == 0 {
            break;
        }
    }
});
