//! Checkpoint streams are provider input (they sit on the provider's disk):
//! a real stream, with the fuzzer's byte flips applied, or the fuzzer's
//! bytes as a stream of their own. Nothing may panic, and whatever verifies
//! must restore exactly the memory that was saved: a tampered stream either
//! fails or changed nothing that counts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_checkpoint::{PAGE, Restorer, SaveOptions, Saver, Source};

const KEY: [u8; 32] = [0x11; 32];
const CLIENT: [u8; 16] = [7; 16];
const PAGES: usize = 12;

fn memory() -> Vec<u8> {
    (0..PAGES * PAGE).map(|i| if (i / PAGE) % 3 == 0 { 0 } else { (i * 7 % 251) as u8 }).collect()
}

fn stream(mem: &[u8], compress: bool) -> Vec<u8> {
    let opts = SaveOptions { compress, pages_per_chunk: 4 };
    let mut s = Saver::new(&KEY, CLIENT, mem.len() as u64, 1, None, [1; 16], opts).unwrap();
    let mut out = s.header_bytes().to_vec();
    let mem = mem.to_vec();
    while s.next_pages(&mem, &mut out).unwrap() {}
    s.device_state(b"device state", &mut out);
    s.finish(&mut out).unwrap();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, flips)) = data.split_first() else { return };
    let mem = memory();
    let bytes = if mode & 1 == 0 {
        // Flips (position: 3 bytes, xor: 1 byte) into a real stream.
        let mut s = stream(&mem, mode & 2 != 0);
        for f in flips.chunks_exact(4) {
            let at = (usize::from(f[0]) << 16 | usize::from(f[1]) << 8 | usize::from(f[2])) % s.len();
            s[at] ^= f[3];
        }
        if mode & 4 != 0 {
            let cut = flips.len() % s.len();
            s.truncate(s.len() - cut);
        }
        s
    } else {
        flips.to_vec()
    };
    let mut target = vec![0u8; mem.len()];
    let mut src: &[u8] = &bytes;
    let mut refs: Vec<&mut dyn Source> = vec![&mut src];
    if let Ok(r) = Restorer::new(&KEY, CLIENT, mem.len() as u64).restore(&mut refs, &mut target, true) {
        assert!(target == mem, "a stream that verified restored other memory");
        assert_eq!(r.device_state, b"device state");
    }
});
