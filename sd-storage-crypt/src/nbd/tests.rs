use super::*;
use crate::volume::{Cipher, Layout, MemDevice, SparseDevice};
use crate::xts::Xts;
use proptest::prelude::*;
use std::vec::Vec;

fn volume(read_only: bool) -> CryptVolume<MemDevice> {
    let x = Xts::new(&[3; 64]).unwrap();
    CryptVolume::new(MemDevice::new(1 << 20), Cipher::XtsPlain64(x.into()), Layout::PLAIN_512, read_only).unwrap()
}

fn server() -> Server {
    Server::new(Export { name: "vol".into(), description: "test volume".into() })
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    opt(OPT_GO, &d)
}

fn req(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Parsed option replies: (option, type, data).
fn option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 20 {
        assert_eq!(be64(b), OPTION_REPLY_MAGIC);
        let len = be32(&b[16..]) as usize;
        out.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    assert!(b.is_empty(), "trailing bytes in option replies");
    out
}

/// A server past the handshake (GO), its output drained.
fn connected<B: Backend>(vol: &mut B) -> Server {
    let mut s = server();
    let greeting = s.take_output();
    assert_eq!(be64(&greeting), NBDMAGIC);
    assert_eq!(be64(&greeting[8..]), IHAVEOPT);
    assert_eq!(be16(&greeting[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.receive(&3u32.to_be_bytes(), vol).unwrap();
    s.receive(&go("vol", &[INFO_BLOCK_SIZE]), vol).unwrap();
    assert!(s.transmitting());
    s.take_output();
    s
}

/// Simple replies: (error, handle, data); `reads` gives the data length of
/// each successful read by handle.
fn replies(mut b: &[u8], reads: &[(u64, usize)]) -> Vec<(u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(be32(b), SIMPLE_REPLY_MAGIC);
        let (err, handle) = (be32(&b[4..]), be64(&b[8..]));
        let n = if err == 0 { reads.iter().find(|r| r.0 == handle).map_or(0, |r| r.1) } else { 0 };
        out.push((err, handle, b[16..16 + n].to_vec()));
        b = &b[16 + n..];
    }
    out
}

#[test]
fn go_reports_size_flags_and_block_sizes() {
    let mut vol = volume(false);
    let mut s = server();
    s.take_output();
    s.receive(&1u32.to_be_bytes(), &mut vol).unwrap();
    s.receive(&go("vol", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]), &mut vol).unwrap();
    let r = option_replies(&s.take_output());
    assert_eq!(r[0].1, REP_INFO);
    assert_eq!(be16(&r[0].2), INFO_EXPORT);
    assert_eq!(be64(&r[0].2[2..]), 1 << 20);
    let flags = be16(&r[0].2[10..]);
    assert!(flags & TF_SEND_FLUSH != 0 && flags & TF_READ_ONLY == 0);
    assert_eq!(&r[1].2[..2], &INFO_BLOCK_SIZE.to_be_bytes());
    assert_eq!((be32(&r[1].2[2..]), be32(&r[1].2[6..]), be32(&r[1].2[10..])), (1, 4096, MAX_REQUEST));
    assert_eq!(&r[2].2[2..], b"vol");
    assert_eq!(&r[3].2[2..], b"test volume");
    assert_eq!(r[4].1, REP_ACK);
    assert!(s.transmitting());
}

#[test]
fn list_unknown_names_and_unsupported_options_keep_the_handshake_going() {
    let mut vol = volume(false);
    let mut s = server();
    s.take_output();
    s.receive(&3u32.to_be_bytes(), &mut vol).unwrap();
    s.receive(&opt(OPT_LIST, &[]), &mut vol).unwrap();
    let r = option_replies(&s.take_output());
    assert_eq!((r[0].1, &r[0].2[4..]), (REP_SERVER, &b"vol"[..]));
    assert_eq!(r[1].1, REP_ACK);
    s.receive(&go("other", &[]), &mut vol).unwrap();
    assert_eq!(option_replies(&s.take_output())[0].1, REP_ERR_UNKNOWN);
    s.receive(&opt(8, &[]), &mut vol).unwrap(); // STRUCTURED_REPLY
    assert_eq!(option_replies(&s.take_output())[0].1, REP_ERR_UNSUP);
    s.receive(&opt(OPT_GO, &[0, 0, 0, 9]), &mut vol).unwrap();
    assert_eq!(option_replies(&s.take_output())[0].1, REP_ERR_INVALID);
    assert!(!s.transmitting());
    // The default export (empty name) is this one.
    s.receive(&go("", &[]), &mut vol).unwrap();
    assert!(s.transmitting());
}

#[test]
fn old_style_export_name_enters_transmission_with_or_without_zeroes() {
    for (flags, pad) in [(1u32, 124usize), (3, 0)] {
        let mut vol = volume(true);
        let mut s = server();
        s.take_output();
        s.receive(&flags.to_be_bytes(), &mut vol).unwrap();
        s.receive(&opt(OPT_EXPORT_NAME, b"vol"), &mut vol).unwrap();
        let out = s.take_output();
        assert_eq!(out.len(), 10 + pad);
        assert_eq!(be64(&out), 1 << 20);
        assert!(be16(&out[8..]) & TF_READ_ONLY != 0);
    }
    let mut vol = volume(false);
    let mut s = server();
    s.receive(&1u32.to_be_bytes(), &mut vol).unwrap();
    assert_eq!(s.receive(&opt(OPT_EXPORT_NAME, b"nope"), &mut vol), Err(ProtocolError::UnknownExport("nope".into())));
}

#[test]
fn pipelined_writes_and_reads_are_served_in_order() {
    let mut vol = volume(false);
    let mut s = connected(&mut vol);
    let mut batch = req(CMD_WRITE, 0, 1, 1000, 3000);
    batch.extend(std::iter::repeat_n(0x5a, 3000));
    batch.extend(req(CMD_WRITE, CMD_FLAG_FUA, 2, 100, 4));
    batch.extend_from_slice(b"abcd");
    batch.extend(req(CMD_READ, 0, 3, 100, 4));
    batch.extend(req(CMD_READ, 0, 4, 999, 3002));
    batch.extend(req(CMD_FLUSH, 0, 5, 0, 0));
    // Byte by byte: nothing depends on how the stream is split.
    for b in &batch {
        s.receive(std::slice::from_ref(b), &mut vol).unwrap();
    }
    let r = replies(&s.take_output(), &[(3, 4), (4, 3002)]);
    let handles: Vec<u64> = r.iter().map(|x| x.1).collect();
    assert_eq!(handles, [1, 2, 3, 4, 5]);
    assert!(r.iter().all(|x| x.0 == 0));
    assert_eq!(r[2].2, b"abcd");
    assert_eq!(r[3].2[1..3001], [0x5a; 3000][..]);
    assert_eq!(vol.device().flushes, 2, "FUA and FLUSH both flush");
    assert_eq!(s.stats().writes, 2);
}

#[test]
fn errors_follow_the_spec_and_the_connection_survives() {
    let mut vol = volume(false);
    let mut s = connected(&mut vol);
    let size = 1u64 << 20;
    s.receive(&req(CMD_READ, 0, 1, size - 1, 2), &mut vol).unwrap();
    let mut w = req(CMD_WRITE, 0, 2, size - 1, 2);
    w.extend_from_slice(&[1, 2]);
    s.receive(&w, &mut vol).unwrap();
    s.receive(&req(CMD_READ, 0, 3, 0, MAX_REQUEST + 1), &mut vol).unwrap();
    s.receive(&req(42, 0, 4, 0, 0), &mut vol).unwrap();
    // An oversized write: refused, its payload skipped, next request fine.
    let mut big = req(CMD_WRITE, 0, 5, 0, MAX_REQUEST + 10);
    big.extend(std::iter::repeat_n(7, MAX_REQUEST as usize + 10));
    s.receive(&big, &mut vol).unwrap();
    s.receive(&req(CMD_READ, 0, 6, 0, 8), &mut vol).unwrap();
    let r = replies(&s.take_output(), &[(6, 8)]);
    let got: Vec<(u32, u64)> = r.iter().map(|x| (x.0, x.1)).collect();
    assert_eq!(got, [(EINVAL, 1), (ENOSPC, 2), (EINVAL, 3), (EINVAL, 4), (EINVAL, 5), (0, 6)]);
    assert!(s.closed().is_none());
}

#[test]
fn read_only_exports_refuse_writes_trims_and_zeroes() {
    let mut vol = volume(true);
    let mut s = connected(&mut vol);
    let mut w = req(CMD_WRITE, 0, 1, 0, 1);
    w.push(9);
    s.receive(&w, &mut vol).unwrap();
    s.receive(&req(CMD_TRIM, 0, 2, 0, 512), &mut vol).unwrap();
    s.receive(&req(CMD_WRITE_ZEROES, 0, 3, 0, 512), &mut vol).unwrap();
    let r = replies(&s.take_output(), &[]);
    assert!(r.iter().all(|x| x.0 == EPERM), "{r:?}");
}

#[test]
fn write_zeroes_zeroes_and_disc_closes() {
    let mut vol = volume(false);
    let mut s = connected(&mut vol);
    let mut w = req(CMD_WRITE, 0, 1, 0, 600);
    w.extend(std::iter::repeat_n(0xee, 600));
    s.receive(&w, &mut vol).unwrap();
    s.receive(&req(CMD_WRITE_ZEROES, 0, 2, 10, 500), &mut vol).unwrap();
    s.receive(&req(CMD_READ, 0, 3, 0, 600), &mut vol).unwrap();
    let r = replies(&s.take_output(), &[(3, 600)]);
    let d = &r[2].2;
    assert!(
        d[..10].iter().all(|&b| b == 0xee) && d[10..510].iter().all(|&b| b == 0) && d[510..].iter().all(|&b| b == 0xee)
    );
    assert_eq!(s.receive(&req(CMD_DISC, 0, 4, 0, 0), &mut vol), Err(ProtocolError::ClientClosed));
    assert_eq!(s.closed(), Some(&ProtocolError::ClientClosed));
}

#[test]
fn bad_magic_and_bad_client_flags_close_the_connection() {
    let mut vol = volume(false);
    let mut s = connected(&mut vol);
    let mut bad = req(CMD_READ, 0, 1, 0, 1);
    bad[0] ^= 0xff;
    assert!(matches!(s.receive(&bad, &mut vol), Err(ProtocolError::BadRequestMagic(_))));
    let mut s = server();
    assert_eq!(s.receive(&0x80u32.to_be_bytes(), &mut vol), Err(ProtocolError::UnknownClientFlags(0x80)));
    let mut s = server();
    assert_eq!(s.receive(&0u32.to_be_bytes(), &mut vol), Err(ProtocolError::NotFixedNewstyle));
    let mut s = server();
    s.receive(&1u32.to_be_bytes(), &mut vol).unwrap();
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
    assert_eq!(s.receive(&huge, &mut vol), Err(ProtocolError::OptionTooLarge(MAX_OPTION + 1)));
}

/// A large volume that costs only what is written to it (null cipher: the
/// reads are about the queue, not the crypto).
fn big_volume(size: u64) -> CryptVolume<SparseDevice> {
    CryptVolume::new(SparseDevice::new(size), Cipher::Null, Layout::PLAIN_512, false).unwrap()
}

/// Plays the SD's link: sends at most `budget` bytes of the queue, then
/// lets the server go on; returns what was sent.
fn send_some<B: Backend>(s: &mut Server, vol: &mut B, budget: usize) -> Vec<u8> {
    let mut sent = Vec::new();
    while sent.len() < budget && !s.output().is_empty() {
        let n = s.output().len().min(budget - sent.len());
        sent.extend_from_slice(&s.output()[..n]);
        s.consume_output(n);
    }
    if !s.wants_input() {
        s.serve(vol).unwrap();
    }
    sent
}

#[test]
fn pipelined_32_mib_reads_cannot_exhaust_the_sd() {
    // The attack: four pipelined 32 MiB reads are 112 bytes on the wire;
    // served at once they queued 128 MiB of replies in a 128 MiB SD.
    let mut vol = big_volume(256 << 20);
    let mut s = connected(&mut vol);
    let mut batch = Vec::new();
    for h in 0..4 {
        batch.extend(req(CMD_READ, 0, h, h * u64::from(MAX_REQUEST), MAX_REQUEST));
    }
    assert_eq!(batch.len(), 112);
    s.receive(&batch, &mut vol).unwrap();
    assert!(s.queued_output() <= MAX_QUEUED_OUTPUT, "{} bytes queued", s.queued_output());
    assert!(!s.wants_input(), "the server must stop reading while replies wait");
    // Sent a MiB at a time, every reply still comes, in order, and the
    // queue never holds more than one.
    let mut wire = Vec::new();
    while s.queued_output() > 0 {
        wire.extend(send_some(&mut s, &mut vol, 1 << 20));
        assert!(s.queued_output() <= MAX_QUEUED_OUTPUT, "{} bytes queued", s.queued_output());
    }
    let r = replies(
        &wire,
        &[(0, MAX_REQUEST as usize), (1, MAX_REQUEST as usize), (2, MAX_REQUEST as usize), (3, MAX_REQUEST as usize)],
    );
    assert_eq!(r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2), (0, 3)]);
    assert!(s.wants_input() && s.buffered_input() == 0);
}

#[test]
fn a_client_that_never_reads_replies_cannot_grow_the_queue() {
    // 1 MiB sequential reads at depth 16 (fio --rw=read --bs=1M
    // --iodepth=16), sent by a client that reads no reply: the server stops
    // taking input once the queue is full, so neither buffer grows.
    let mut vol = big_volume(128 << 20);
    let mut s = connected(&mut vol);
    let mut offered = 0u64;
    while offered < 128 && s.wants_input() {
        s.receive(&req(CMD_READ, 0, offered, offered << 20, 1 << 20), &mut vol).unwrap();
        offered += 1;
    }
    assert!(offered < 128, "the server kept taking requests with {} bytes queued", s.queued_output());
    assert!(s.queued_output() <= MAX_QUEUED_OUTPUT);
    assert!(s.buffered_input() <= 28, "{} bytes of requests buffered", s.buffered_input());
}

#[test]
fn a_write_waits_for_room_and_is_served_once_replies_drain() {
    let mut vol = big_volume(64 << 20);
    let mut s = connected(&mut vol);
    s.receive(&req(CMD_READ, 0, 1, 0, MAX_REQUEST), &mut vol).unwrap();
    let mut w = req(CMD_WRITE, 0, 2, 4096, 8);
    w.extend_from_slice(b"12345678");
    w.extend(req(CMD_READ, 0, 3, 4096, 8));
    s.receive(&w, &mut vol).unwrap();
    assert!(
        !s.wants_input() && s.buffered_input() == w.len(),
        "the write must wait while the read's reply fills the queue"
    );
    let mut wire = Vec::new();
    while s.queued_output() > 0 {
        wire.extend(send_some(&mut s, &mut vol, 4 << 20));
    }
    let r = replies(&wire, &[(1, MAX_REQUEST as usize), (3, 8)]);
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(r[2].2, b"12345678");
}

#[test]
fn a_half_sent_reply_still_counts_against_the_bound() {
    // A 32 MiB reply sent all but 64 KiB still holds its 32 MiB buffer: a
    // second 32 MiB read must wait, or 64 MiB would be held.
    let mut vol = big_volume(128 << 20);
    let mut s = connected(&mut vol);
    let mut batch = req(CMD_READ, 0, 1, 0, MAX_REQUEST);
    batch.extend(req(CMD_READ, 0, 2, 0, MAX_REQUEST - (64 << 10)));
    s.receive(&batch, &mut vol).unwrap();
    let almost = s.queued_output() - (64 << 10);
    send_some(&mut s, &mut vol, almost);
    assert!(s.queued_output() <= MAX_QUEUED_OUTPUT, "{} bytes held", s.queued_output());
    assert!(!s.wants_input() && s.buffered_input() == 28, "the second read must still wait");
    send_some(&mut s, &mut vol, 64 << 10);
    assert!(s.buffered_input() == 0, "the second read is served once the first buffer is gone");
}

#[test]
fn a_write_payload_is_read_into_its_own_buffer_and_never_copied_to_a_larger_one() {
    // READ 32 MiB, WRITE 32 MiB, READ: sent at once by the client, read by
    // a driver that takes at most `input_wanted()` bytes at a time.
    let mut vol = big_volume(128 << 20);
    let mut s = connected(&mut vol);
    let mut wire = req(CMD_READ, 0, 1, 0, MAX_REQUEST);
    wire.extend(req(CMD_WRITE, 0, 2, 0, MAX_REQUEST));
    wire.extend(std::iter::repeat_n(0x42, MAX_REQUEST as usize));
    wire.extend(req(CMD_READ, 0, 3, 0, 4096));
    let (mut fed, mut replies_seen) = (0, Vec::new());
    while fed < wire.len() || s.queued_output() > 0 {
        let n = s.input_wanted().min(256 << 10).min(wire.len() - fed);
        if n > 0 {
            s.receive(&wire[fed..fed + n], &mut vol).unwrap();
            fed += n;
        }
        assert!(s.input_capacity() <= 28 + MAX_REQUEST as usize + (256 << 10), "input grew to {}", s.input_capacity());
        assert!(s.queued_output() <= MAX_QUEUED_OUTPUT);
        replies_seen.extend(send_some(&mut s, &mut vol, 8 << 20));
    }
    let r = replies(&replies_seen, &[(1, MAX_REQUEST as usize), (3, 4096)]);
    assert_eq!(r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(), [(0, 1), (0, 2), (0, 3)]);
    assert!(r[2].2.iter().all(|&b| b == 0x42));
}

#[test]
fn repeated_info_requests_are_answered_once() {
    // 32k INFO_NAME requests in one 64 KiB GO: one answer, not 32k.
    let mut vol = volume(false);
    let mut s = server();
    s.take_output();
    s.receive(&3u32.to_be_bytes(), &mut vol).unwrap();
    let infos = std::vec![INFO_NAME; 32000];
    s.receive(&go("vol", &infos), &mut vol).unwrap();
    let r = option_replies(&s.take_output());
    assert_eq!(r.len(), 3, "export info, one name, ack");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Any mix of request sizes, however the link drains: the reply queue's
    /// buffers stay bounded, the input buffer's memory holds at most one
    /// write's payload or one read's worth, and every reply comes back, in
    /// order.
    #[test]
    fn the_reply_queue_stays_bounded_and_every_reply_comes(
        ops in proptest::collection::vec((any::<bool>(), 0u32..=MAX_REQUEST / 4096, 0u64..64), 1..12),
        budgets in proptest::collection::vec(1usize..(40 << 20), 1..8),
    ) {
        let mut vol = big_volume(1 << 30);
        let mut s = connected(&mut vol);
        let mut input = Vec::new();
        let mut reads = Vec::new();
        for (h, (write, pages, at)) in ops.iter().enumerate() {
            let (len, offset) = (pages * 4096, at << 20);
            if *write {
                input.extend(req(CMD_WRITE, 0, h as u64, offset, len));
                input.extend(std::iter::repeat_n(h as u8, len as usize));
            } else {
                input.extend(req(CMD_READ, 0, h as u64, offset, len));
                reads.push((h as u64, len as usize));
            }
        }
        let (mut fed, mut wire, mut turn) = (0usize, Vec::new(), 0usize);
        const CHUNK: usize = 256 << 10;
        while fed < input.len() || s.queued_output() > 0 {
            let n = s.input_wanted().min(CHUNK).min(input.len() - fed);
            if n > 0 {
                s.receive(&input[fed..fed + n], &mut vol).unwrap();
                fed += n;
            }
            prop_assert!(s.queued_output() <= MAX_QUEUED_OUTPUT);
            prop_assert!(s.input_capacity() <= 28 + MAX_REQUEST as usize + CHUNK, "input holds {}", s.input_capacity());
            wire.extend(send_some(&mut s, &mut vol, budgets[turn % budgets.len()]));
            turn += 1;
        }
        let r = replies(&wire, &reads);
        prop_assert_eq!(r.len(), ops.len());
        prop_assert!(r.iter().enumerate().all(|(i, x)| x.0 == 0 && x.1 == i as u64));
    }

    #[test]
    fn arbitrary_client_bytes_never_panic(handshake in any::<bool>(), junk in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut vol = volume(false);
        let mut s = if handshake { connected(&mut vol) } else { server() };
        let _ = s.receive(&junk, &mut vol);
        let _ = s.take_output();
    }
}
