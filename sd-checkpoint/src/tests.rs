use super::*;
use alloc::vec;
use alloc::vec::Vec;

const KEY: [u8; 32] = [0x11; 32];
const CLIENT: [u8; 16] = [7; 16];

/// A memory image with zero pages, text and noise.
fn memory(pages: usize, seed: u64) -> Vec<u8> {
    let mut m = vec![0u8; pages * PAGE];
    let mut x = seed | 1;
    for p in 0..pages {
        let page = &mut m[p * PAGE..(p + 1) * PAGE];
        match p % 4 {
            0 => {}
            1 => page.iter_mut().enumerate().for_each(|(i, b)| *b = b"the quick brown fox "[i % 20]),
            _ => page.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
        }
    }
    m
}

fn save(mem: &Vec<u8>, generation: u64, base: Option<&PageHashes>, compress: bool) -> (Vec<u8>, SaveStats, PageHashes) {
    let opts = SaveOptions { compress, pages_per_chunk: 64 };
    let mut s = Saver::new(&KEY, CLIENT, mem.len() as u64, generation, base, [generation as u8; 16], opts).unwrap();
    let mut out = s.header_bytes().to_vec();
    while s.next_pages(mem, &mut out).unwrap() {}
    s.device_state(b"qemu device state", &mut out);
    let (stats, hashes) = s.finish(&mut out).unwrap();
    assert_eq!(stats.bytes_out, out.len() as u64);
    (out, stats, hashes)
}

fn restore(streams: &[&[u8]], size: usize) -> Result<(Vec<u8>, Restored), CheckpointError> {
    let mut target = vec![0u8; size];
    let mut srcs: Vec<&[u8]> = streams.to_vec();
    let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
    let r = Restorer::new(&KEY, CLIENT, size as u64).restore(&mut refs, &mut target, true)?;
    Ok((target, r))
}

#[test]
fn a_stale_checkpoint_restored_under_a_newer_generations_name_is_refused() {
    // The record says generation 2 is at gen 1's place (or lists gen 1's
    // stream for gen 2): a consistent, authentic, older checkpoint. The SD
    // must name the mismatch before writing a page.
    let mut mem = memory(64, 3);
    let (full, _, base) = save(&mem, 1, None, false);
    mem[3 * PAGE] ^= 0xff;
    let (delta, _, _) = save(&mem, 2, Some(&base), false);
    let mut target = vec![0u8; mem.len()];
    let restore_as = |streams: &[&[u8]], asked: &[u64], target: &mut Vec<u8>| {
        let mut srcs: Vec<&[u8]> = streams.to_vec();
        let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
        Restorer::new(&KEY, CLIENT, mem.len() as u64)
            .expecting(asked)
            .restore(&mut refs, target, true)
            .map(|r| r.generation)
    };
    assert_eq!(
        restore_as(&[&full], &[2], &mut target).unwrap_err(),
        CheckpointError::WrongGeneration { asked: 2, found: 1 }
    );
    assert!(target.iter().all(|&b| b == 0), "a refused restore wrote pages");
    assert!(matches!(restore_as(&[&full, &delta], &[1], &mut target), Err(CheckpointError::Mismatch(_))));
    assert_eq!(
        restore_as(&[&full, &delta], &[1, 3], &mut target).unwrap_err(),
        CheckpointError::WrongGeneration { asked: 3, found: 2 }
    );
    assert_eq!(restore_as(&[&full, &delta], &[1, 2], &mut target), Ok(2));
}

#[test]
fn full_and_delta_checkpoints_restore_exactly_with_and_without_lz4() {
    for compress in [false, true] {
        let mut mem = memory(300, 1);
        let (full, st, base) = save(&mem, 1, None, compress);
        assert_eq!(st.zero_pages, 75);
        assert_eq!(st.pages_stored, 225);
        // Change a few pages (one to zero), save a delta.
        mem[5 * PAGE..5 * PAGE + 10].copy_from_slice(b"CHANGED!!!");
        mem[9 * PAGE..10 * PAGE].fill(0);
        mem[299 * PAGE] ^= 1;
        let (delta, st2, _) = save(&mem, 2, Some(&base), compress);
        assert_eq!((st2.pages_stored, st2.unchanged_pages), (3, 297));
        assert!(delta.len() < full.len() / 20, "delta {} vs full {}", delta.len(), full.len());
        let (back, r) = restore(&[&full, &delta], mem.len()).unwrap();
        assert!(back == mem, "restored memory differs (compress {compress})");
        assert_eq!((r.generation, r.device_state.as_slice()), (2, &b"qemu device state"[..]));
        // The restored hashes are a valid base for the next delta.
        assert_eq!(r.hashes, save(&mem, 2, None, compress).2);
    }
}

#[test]
fn the_stream_holds_no_plaintext() {
    let mut mem = memory(64, 3);
    mem[4 * PAGE..4 * PAGE + 14].copy_from_slice(b"SECRET-MARKER!");
    for compress in [false, true] {
        let (s, ..) = save(&mem, 1, None, compress);
        assert!(!s.windows(14).any(|w| w == b"SECRET-MARKER!"));
        assert!(!s.windows(20).any(|w| w == b"the quick brown fox "));
    }
}

#[test]
fn holes_are_not_read_and_restore_as_zero() {
    let mut mem = memory(128, 5);
    // Only the first 32 pages are "allocated"; the builder says so.
    mem[32 * PAGE..].fill(0);
    let mut s = Saver::new(&KEY, CLIENT, mem.len() as u64, 1, None, [1; 16], SaveOptions::default()).unwrap();
    s.set_extents(vec![(0, 32 * PAGE as u64)]);
    let mut out = s.header_bytes().to_vec();
    while s.next_pages(&mem, &mut out).unwrap() {}
    let (st, _) = s.finish(&mut out).unwrap();
    assert_eq!(st.pages_read, 32);
    assert_eq!(restore(&[&out], mem.len()).unwrap().0, mem);
}

/// Every bad input is refused by verification, before a page is written.
#[test]
fn bad_streams_are_refused_before_any_page_is_written() {
    let mem = memory(200, 9);
    let (full, _, base) = save(&mem, 1, None, true);
    let (delta, ..) = save(&mem, 2, Some(&base), true);
    let (other_gen, ..) = save(&mem, 5, None, true);
    let check = |streams: &[&[u8]], want: fn(&CheckpointError) -> bool| {
        let mut target = vec![0xeeu8; mem.len()];
        let mut srcs: Vec<&[u8]> = streams.to_vec();
        let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
        let e = Restorer::new(&KEY, CLIENT, mem.len() as u64).restore(&mut refs, &mut target, false).unwrap_err();
        assert!(want(&e), "unexpected error: {e}");
        assert!(target.iter().all(|&b| b == 0xee), "{e}: memory was written");
        std::format!("{e}")
    };
    // Truncations at many points.
    for cut in [0, 50, 96, 100, full.len() / 2, full.len() - 1] {
        check(&[&full[..cut]], |e| matches!(e, CheckpointError::Truncated { .. } | CheckpointError::NotACheckpoint));
    }
    // A flipped byte in a record.
    let mut flipped = full.clone();
    flipped[full.len() / 2] ^= 0x40;
    check(&[&flipped], |e| matches!(e, CheckpointError::Tampered { .. }));
    // A flipped byte in the header (authenticated through the AAD).
    let mut h = full.clone();
    h[70] ^= 1;
    check(&[&h], |e| matches!(e, CheckpointError::Tampered { .. }));
    // A record spliced in from another checkpoint of the same client.
    let mut spliced = full.clone();
    let at = 96 + 9;
    let n = 200.min(other_gen.len() - at);
    spliced[at..at + n].copy_from_slice(&other_gen[at..at + n]);
    check(&[&spliced], |e| matches!(e, CheckpointError::Tampered { .. }));
    // Wrong key, another client, another memory size.
    let e = {
        let mut srcs: Vec<&[u8]> = vec![&full];
        let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
        Restorer::new(&[9; 32], CLIENT, mem.len() as u64).verify(&mut refs).unwrap_err()
    };
    assert_eq!(e, CheckpointError::WrongKey);
    let mut srcs: Vec<&[u8]> = vec![&full];
    let mut refs: Vec<&mut dyn Source> = srcs.iter_mut().map(|s| s as &mut dyn Source).collect();
    assert!(matches!(
        Restorer::new(&KEY, [8; 16], mem.len() as u64).verify(&mut refs),
        Err(CheckpointError::Mismatch(_))
    ));
    assert!(matches!(Restorer::new(&KEY, CLIENT, 4096).verify(&mut refs), Err(CheckpointError::Mismatch(_))));
    // Deltas out of order, alone, or on the wrong base; garbage after END.
    check(&[&delta], |e| matches!(e, CheckpointError::BrokenChain { .. }));
    check(&[&other_gen, &delta], |e| matches!(e, CheckpointError::BrokenChain { expected: 5, found: 1 }));
    let mut longer = full.clone();
    longer.push(0);
    check(&[&longer], |e| matches!(e, CheckpointError::Malformed { .. }));
    // A valid stream followed by a bad delta: still nothing written.
    let mut bad_delta = delta.clone();
    bad_delta[delta.len() - 3] ^= 1;
    check(&[&full, &bad_delta], |e| matches!(e, CheckpointError::Tampered { .. }));
}

#[test]
fn a_delta_base_of_another_client_or_size_is_refused() {
    let mem = memory(16, 2);
    let (_, _, base) = save(&mem, 1, None, false);
    let other = PageHashes { client_id: [1; 16], ..base.clone() };
    assert!(Saver::new(&KEY, CLIENT, mem.len() as u64, 2, Some(&other), [0; 16], SaveOptions::default()).is_err());
    assert!(Saver::new(&KEY, CLIENT, 2 * mem.len() as u64, 2, Some(&base), [0; 16], SaveOptions::default()).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Random byte flips anywhere in a stream pair: refused, or (flip in a
    /// spot that does not matter: none exist) restored exactly. Never a
    /// wrong byte in memory, never a panic.
    #[test]
    fn flipped_bytes_never_restore_wrong_memory(
        flips in proptest::collection::vec((0usize..1 << 20, 1u8..=255, proptest::prelude::any::<bool>()), 1..4),
        compress in proptest::prelude::any::<bool>(),
    ) {
        let mut mem = memory(64, 11);
        let (mut full, _, base) = save(&mem, 1, None, compress);
        mem[3 * PAGE] ^= 0xff;
        let (mut delta, ..) = save(&mem, 2, Some(&base), compress);
        for (at, x, in_delta) in flips {
            let s = if in_delta { &mut delta } else { &mut full };
            let i = at % s.len();
            s[i] ^= x;
        }
        if let Ok((back, _)) = restore(&[&full, &delta], mem.len()) {
            proptest::prop_assert!(back == mem);
        }
    }
}
