use super::*;
use proptest::prelude::*;
use std::string::String;
use std::vec;
use std::vec::Vec;

fn body_strategy() -> impl Strategy<Value = (String, String, Vec<u8>, u64, u8)> {
    (".{0,40}", ".{0,40}", proptest::collection::vec(any::<u8>(), 0..2048), any::<u64>(), 0u8..8)
}

fn make_body<'a>(k: u8, s1: &'a str, s2: &'a str, bytes: &'a [u8], n: u64) -> Body<'a> {
    match k {
        0 => Body::Hello { image: s1, version: s2 },
        1 => Body::Ready { image: s1, boot_us: n },
        2 => Body::Ping { payload: bytes },
        3 => Body::Pong { payload: bytes },
        4 => Body::Error { code: ErrorCode::Denied, message: s1 },
        5 => Body::Progress { done: n / 2, total: n },
        6 => Body::DeviceState { offset: n, total: n.saturating_add(bytes.len() as u64), bytes },
        _ => Body::Shutdown,
    }
}

proptest! {
    #[test]
    fn envelope_round_trips_through_a_split_stream((s1, s2, bytes, n, k) in body_strategy(), id in any::<u64>(), split in 0usize..3000) {
        let env = Envelope::new(id, make_body(k, &s1, &s2, &bytes, n));
        let mut stream = env.to_frame().unwrap();
        stream.extend_from_slice(&Envelope::new(id ^ 1, Body::Shutdown).to_frame().unwrap());
        let split = split.min(stream.len());
        let mut dec = FrameDecoder::new();
        let mut payloads = vec![];
        for part in [&stream[..split], &stream[split..]] {
            let mut rest = part;
            while !rest.is_empty() {
                let used = dec.feed(rest);
                rest = &rest[used..];
                while let Some(p) = dec.next_payload().unwrap() { payloads.push(p); }
            }
        }
        prop_assert_eq!(payloads.len(), 2);
        prop_assert_eq!(Envelope::decode(&payloads[0]).unwrap(), env);
        prop_assert_eq!(Envelope::decode(&payloads[1]).unwrap().body, Body::Shutdown);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Envelope::decode(&input);
        let mut dec = FrameDecoder::new();
        let mut rest = &input[..];
        loop {
            let used = dec.feed(rest);
            rest = &rest[used..];
            prop_assert!(dec.buffered() <= PREFIX + MAX_PAYLOAD);
            match dec.next_payload() {
                Ok(Some(p)) => { let _ = Envelope::decode(&p); }
                Ok(None) if rest.is_empty() || used == 0 => break,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_an_error_or_a_different_envelope(id in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 1..64), at in any::<usize>(), bit in 0u8..8) {
        let env = Envelope::new(id, Body::Ping { payload: &bytes });
        let mut frame = env.to_frame().unwrap();
        let i = PREFIX + at % (frame.len() - PREFIX);
        frame[i] ^= 1 << bit;
        if let Ok(other) = Envelope::decode(&frame[PREFIX..]) { prop_assert_ne!(other, env) }
    }
}

#[test]
fn oversized_length_prefix_is_refused_before_its_data_arrives() {
    let mut dec = FrameDecoder::new();
    let prefix = ((MAX_PAYLOAD + 1) as u32).to_le_bytes();
    assert_eq!(dec.feed(&prefix), PREFIX);
    assert_eq!(dec.next_payload(), Err(FrameError::TooLarge { len: MAX_PAYLOAD + 1 }));
    assert_eq!(dec.feed(&[0; 16]), 0, "a failed decoder takes nothing more");
    let huge = u32::MAX.to_le_bytes();
    let mut dec = FrameDecoder::new();
    dec.feed(&huge);
    assert!(matches!(dec.next_payload(), Err(FrameError::TooLarge { .. })));
    assert!(dec.buffered() <= PREFIX);
}

#[test]
fn other_version_is_named_in_the_error() {
    let other = VERSION + 1;
    let mut env = Envelope::new(7, Body::Shutdown);
    env.version = other;
    let frame = env.to_frame().unwrap();
    let err = Envelope::decode(&frame[PREFIX..]).unwrap_err();
    assert_eq!(err, FrameError::Version { got: other });
    assert!(std::format!("{err}").contains(&std::format!("version {other}")));
}

#[test]
fn trailing_garbage_and_truncation_are_malformed() {
    let frame = Envelope::new(1, Body::Ping { payload: b"abc" }).to_frame().unwrap();
    let mut longer = frame[PREFIX..].to_vec();
    longer.push(0);
    assert_eq!(Envelope::decode(&longer), Err(FrameError::Malformed));
    for cut in 0..frame.len() - PREFIX {
        assert!(Envelope::decode(&frame[PREFIX..PREFIX + cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn a_seq_claiming_four_gigabytes_allocates_nothing_big() {
    // This version, request id 0, Ping, then a varint length of ~4 GiB with no data.
    let payload = [VERSION as u8, 0, 2, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert_eq!(Envelope::decode(&payload), Err(FrameError::Malformed));
}

#[test]
fn encoding_more_than_the_limit_is_refused() {
    let big = vec![0u8; MAX_PAYLOAD];
    let err = Envelope::new(1, Body::Ping { payload: &big }).to_frame().unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }));
}

#[test]
fn zero_length_payload_is_a_complete_but_malformed_frame() {
    let mut dec = FrameDecoder::new();
    assert_eq!(dec.feed(&[0, 0, 0, 0, 9]), 4);
    let p = dec.next_payload().unwrap().unwrap();
    assert!(p.is_empty());
    assert_eq!(Envelope::decode(&p), Err(FrameError::Malformed));
}

#[test]
fn overlong_varints_are_not_a_second_encoding() {
    // Found by the fuzzer: variant 5 (Shutdown) written as 0x85 0x00.
    assert_eq!(Envelope::decode(&[VERSION as u8, 0, 5]).unwrap().body, Body::Shutdown);
    assert_eq!(Envelope::decode(&[VERSION as u8, 0, 0x85, 0]), Err(FrameError::Malformed));
    assert_eq!(Envelope::decode(&[0x80 | VERSION as u8, 0, 0, 5]), Err(FrameError::Malformed), "overlong version");
}

#[test]
fn volume_config_round_trips_and_its_debug_hides_the_key() {
    let key = [0x5au8; 64];
    let cfg = VolumeConfig {
        export: "vol",
        cipher: "aes-xts-plain64",
        key: &key,
        sector_size: 4096,
        data_offset: 16 << 20,
        iv_offset: 0,
        large_iv: true,
        read_only: false,
        native_header: true,
        min_generation: 7,
    };
    let frame = Envelope::new(9, Body::ConfigureVolume(cfg.clone())).to_frame().unwrap();
    let env = Envelope::decode(&frame[PREFIX..]).unwrap();
    assert_eq!(env.body, Body::ConfigureVolume(cfg.clone()));
    let shown = std::format!("{:?}", env.body);
    assert!(shown.contains("<64 bytes>") && !shown.contains("90, 90"), "{shown}");
}
