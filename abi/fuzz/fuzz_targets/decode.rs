//! Feeds arbitrary bytes to the frame decoder in arbitrary splits and
//! decodes every payload: nothing may panic, and the decoder's buffer never
//! exceeds one frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssc_abi::{Envelope, FrameDecoder, MAX_PAYLOAD, PREFIX};

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::decode(data);
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    let mut dec = FrameDecoder::new();
    for chunk in data.chunks(split) {
        let mut rest = chunk;
        loop {
            let used = dec.feed(rest);
            rest = &rest[used..];
            assert!(dec.buffered() <= PREFIX + MAX_PAYLOAD);
            match dec.next_payload() {
                Ok(Some(p)) => {
                    if let Ok(env) = Envelope::decode(&p) {
                        // whatever decodes must re-encode to the same bytes
                        let again = env.to_frame().unwrap();
                        assert_eq!(&again[PREFIX..], &p[..]);
                    }
                }
                Ok(None) if rest.is_empty() => break,
                Ok(None) => {}
                Err(_) => return,
            }
        }
    }
});
