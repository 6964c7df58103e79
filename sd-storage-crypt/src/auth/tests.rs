use super::*;
use crate::volume::MemDevice;
use proptest::prelude::*;
use std::collections::BTreeMap;

const KEY: [u8; 64] = [0x5a; 64];
const DEV: usize = 4 << 20;

fn formatted(size: usize) -> MemDevice {
    let mut d = MemDevice::new(size);
    let h = format(&KEY, size as u64, [3; 32], [4; 16]).unwrap();
    d.bytes[..512].copy_from_slice(&h);
    d
}

/// A writable open with a salt no other open of the tests used.
fn rw() -> Access {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Access::ReadWrite(OpenSalt::from_random(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes()))
}

fn open(d: MemDevice) -> AuthVolume<MemDevice> {
    AuthVolume::open(d, &KEY, 0, rw()).unwrap()
}

fn pattern(tag: u64) -> Vec<u8> {
    (0..SECTOR).map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(0x9e37)) as u8).collect()
}

#[test]
fn geometry_fits_the_device_and_keeps_metadata_whole() {
    for size in [2u64 << 20, 4 << 20, 1 << 30, (1 << 30) + 12345] {
        let g = Geometry::for_device(size).unwrap();
        assert!(g.end() <= size && Geometry::with_sectors(g.sectors + 1).end() > size, "{size}: {g:?}");
        assert!(g.meta_len >= g.sectors * 32 && g.data_offset.is_multiple_of(1 << 20));
    }
    assert_eq!(Geometry::for_device(1 << 20), None);
    assert_eq!(format(&KEY, 1 << 20, [0; 32], [0; 16]), Err(OpenError::TooSmall(1 << 20)));
}

proptest! {
    #[test]
    fn reads_match_a_plain_model_across_commits_and_reopens(
        ops in proptest::collection::vec((0u64..3_000_000, proptest::collection::vec(any::<u8>(), 1..9000), 0u8..4), 1..16)
    ) {
        let mut v = open(formatted(DEV));
        let size = v.size() as usize;
        let mut model = vec![0u8; size];
        for (off, data, what) in ops {
            let off = off as usize % (size - data.len());
            match what {
                0 => { v.commit().unwrap(); let d = core::mem::take(v.device()); v = open(d); }
                1 => { v.write_zeroes(off as u64, data.len() as u64).unwrap(); model[off..off + data.len()].fill(0); }
                _ => { v.write(off as u64, &data).unwrap(); model[off..off + data.len()].copy_from_slice(&data); }
            }
        }
        let mut back = vec![1u8; size];
        v.read(0, &mut back).unwrap();
        prop_assert!(back == model);
        v.commit().unwrap();
        let mut v = open(core::mem::take(v.device()));
        v.read(0, &mut back).unwrap();
        prop_assert!(back == model);
    }
}

#[test]
fn the_device_holds_no_plaintext_and_a_wrong_key_is_refused() {
    let mut v = open(formatted(DEV));
    v.write(0, &[0xab; 3 * SECTOR as usize]).unwrap();
    v.commit().unwrap();
    let d = core::mem::take(v.device());
    assert!(!d.bytes.windows(32).any(|w| w == [0xab; 32]), "plaintext on the device");
    let e = AuthVolume::open(d, &[1; 64], 0, rw()).err().unwrap();
    assert_eq!(e, OpenError::Header(HeaderError::WrongKey));
    assert!(std::format!("{e}").contains("wrong key"));
}

#[test]
fn a_tampered_or_spliced_sector_fails_its_read_and_is_reported() {
    let mut v = open(formatted(DEV));
    for s in 0..4 {
        v.write(s * SECTOR, &pattern(s)).unwrap();
    }
    v.commit().unwrap();
    let data = v.header.geometry.data_offset as usize;
    // Flip one bit of sector 1; copy sector 2's ciphertext over sector 3.
    let d = &mut v.device().bytes;
    d[data + 4096 + 100] ^= 1;
    let s2 = d[data + 2 * 4096..data + 3 * 4096].to_vec();
    d[data + 3 * 4096..data + 4 * 4096].copy_from_slice(&s2);
    let mut buf = vec![0u8; SECTOR as usize];
    assert_eq!(v.read(SECTOR, &mut buf), Err(IoError::Integrity));
    assert_eq!(v.read(3 * SECTOR, &mut buf), Err(IoError::Integrity));
    assert_eq!(v.take_failures(), [1, 3]);
    v.read(2 * SECTOR, &mut buf).unwrap();
    assert_eq!(buf, pattern(2));
    // A partial write over the tampered sector needs its old contents: refused too.
    assert_eq!(v.write(SECTOR + 10, &[1, 2, 3]), Err(IoError::Integrity));
}

#[test]
fn tampered_metadata_a_forged_header_and_a_rollback_are_refused_at_open() {
    let mut v = open(formatted(DEV));
    v.write(0, &pattern(1)).unwrap();
    v.commit().unwrap();
    let old = v.device().clone();
    let old_generation = v.generation();
    v.write(0, &pattern(2)).unwrap();
    v.commit().unwrap();
    let generation = v.generation();
    assert!(generation > old_generation);
    let now = core::mem::take(v.device());

    // Rollback: the whole old device, consistent in itself.
    let e = AuthVolume::open(old.clone(), &KEY, generation, rw()).err().unwrap();
    assert_eq!(e, OpenError::RolledBack { found: old_generation, expected: generation });
    assert!(std::format!("{e}").contains("rolled back"));
    assert!(AuthVolume::open(old, &KEY, old_generation, rw()).is_ok());

    // Metadata: flip a tag byte in the copy the newest header describes.
    let h = AuthVolume::open(now.clone(), &KEY, 0, rw()).unwrap().header;
    let mut bad = now.clone();
    bad.bytes[h.geometry.copy_offset(h.copy) as usize + 8] ^= 1;
    assert_eq!(AuthVolume::open(bad, &KEY, 0, rw()).err(), Some(OpenError::MetadataTampered));

    // Header: a new root with a fixed-up checksum fails the MAC (both slots).
    let mut bad = now.clone();
    for at in [0usize, SLOT as usize] {
        bad.bytes[at + 180] ^= 1;
        let sum = Sha256::digest(&bad.bytes[at..at + SUM_AT]);
        bad.bytes[at + SUM_AT..at + SUM_AT + 32].copy_from_slice(&sum);
    }
    assert_eq!(AuthVolume::open(bad, &KEY, 0, rw()).err(), Some(OpenError::HeaderForged));

    // Damaged (not forged) newest header: the older slot opens.
    let mut torn = now.clone();
    let newest = if generation % 2 == 1 { 0 } else { SLOT as usize };
    torn.bytes[newest + 300] ^= 1;
    torn.bytes[newest + 50] ^= 1;
    let v = AuthVolume::open(torn, &KEY, 0, rw()).unwrap();
    assert_eq!(v.generation(), generation - 1);

    // Truncated device.
    let mut short = now;
    short.bytes.truncate(DEV - 8192);
    assert_eq!(AuthVolume::open(short, &KEY, 0, rw()).err(), Some(OpenError::TooSmall((DEV - 8192) as u64)));
}

#[test]
fn nonces_never_repeat_across_sessions_even_after_a_crash() {
    // Session 1 writes without committing and "crashes"; session 2 must not
    // reuse its counters (the reservation was durable before any write).
    let mut v = open(formatted(DEV));
    v.write(0, &pattern(1)).unwrap();
    v.commit().unwrap();
    v.write(0, &pattern(2)).unwrap();
    v.write(SECTOR, &pattern(2)).unwrap();
    let used = v.record(1).0;
    let crashed = core::mem::take(v.device());
    let mut v = open(crashed);
    let mut buf = vec![0u8; SECTOR as usize];
    // The uncommitted overwrite of sector 0 is detected, not served stale;
    // sector 1 was never committed at all: it reads as its committed zeroes.
    assert_eq!(v.read(0, &mut buf), Err(IoError::Integrity));
    v.read(SECTOR, &mut buf).unwrap();
    assert_eq!(buf, [0u8; SECTOR as usize]);
    v.write(2 * SECTOR, &pattern(3)).unwrap();
    assert!(v.record(2).0 > used, "counter {} reused after {used}", v.record(2).0);
}

/// A device with a volatile write cache: writes land in `pending` and become
/// durable at flush. `crash_at` cuts the power before that many operations
/// (writes and flushes) completed; what survives is the durable image plus
/// an arbitrary subset of the pending writes, one of them possibly torn.
#[derive(Clone)]
struct CrashDevice {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    ops: usize,
    crash_at: usize,
}

impl BlockDevice for CrashDevice {
    fn size(&self) -> u64 {
        self.durable.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let o = offset as usize;
        buf.copy_from_slice(&self.durable[o..o + buf.len()]);
        for (at, data) in &self.pending {
            let (a, b) = (*at as usize, *at as usize + data.len());
            let (lo, hi) = (a.max(o), b.min(o + buf.len()));
            if lo < hi {
                buf[lo - o..hi - o].copy_from_slice(&data[lo - a..hi - a]);
            }
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.ops += 1;
        if self.ops > self.crash_at {
            return Err(IoError::Io);
        }
        self.pending.push((offset, data.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), IoError> {
        self.ops += 1;
        if self.ops > self.crash_at {
            return Err(IoError::Io);
        }
        for (at, data) in self.pending.drain(..) {
            self.durable[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

impl CrashDevice {
    /// The device after the power cut, `seed` choosing the surviving pending writes.
    fn after_crash(mut self, seed: u64) -> MemDevice {
        let mut x = seed | 1;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (at, data) in core::mem::take(&mut self.pending) {
            let keep = match rnd() % 3 {
                0 => 0,
                1 => data.len(),
                _ => (rnd() as usize % (data.len() / 512 + 1)) * 512,
            };
            self.durable[at as usize..at as usize + keep].copy_from_slice(&data[..keep]);
        }
        MemDevice { bytes: self.durable, flushes: 0 }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64),
    Zero(u64),
    Commit,
}

/// The workload the crash test cuts: writes, zeroing and commits over a few
/// metadata blocks (sector 130 sits in the second block).
fn workload() -> Vec<Op> {
    use Op::*;
    vec![
        Write(0, 1),
        Write(130, 2),
        Commit,
        Write(0, 3),
        Write(5, 4),
        Zero(130),
        Commit,
        Write(5, 5),
        Write(300, 6),
        Write(0, 7),
        Commit,
        Write(131, 8),
        Commit,
        Write(0, 9),
    ]
}

#[test]
fn a_power_cut_at_any_device_write_leaves_flushed_data_intact_and_nothing_silently_wrong() {
    let ops = workload();
    let sectors = [0u64, 5, 130, 131, 300];
    let mut cut_points = 0;
    for crash_at in 0.. {
        let base = formatted(DEV);
        let dev = CrashDevice { durable: base.bytes, pending: vec![], ops: 0, crash_at };
        let mut v = AuthVolume::open(dev, &KEY, 0, rw()).unwrap();
        // Per sector: the contents of the last completed commit, and every
        // value written since (any of them may survive a crash mid-commit).
        let mut committed: BTreeMap<u64, u64> = BTreeMap::new();
        let mut since: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut generation = v.generation();
        let mut crashed = false;
        for op in &ops {
            let r = match *op {
                Op::Write(s, tag) => {
                    since.entry(s).or_default().push(tag);
                    v.write(s * SECTOR, &pattern(tag))
                }
                Op::Zero(s) => {
                    since.entry(s).or_default().push(0);
                    v.write_zeroes(s * SECTOR, SECTOR)
                }
                Op::Commit => v.commit().map(|()| {
                    for (s, vals) in core::mem::take(&mut since) {
                        committed.insert(s, *vals.last().unwrap());
                    }
                    generation = v.generation();
                }),
            };
            if r.is_err() {
                crashed = true;
                break;
            }
        }
        if !crashed {
            break;
        }
        cut_points += 1;
        let dev = v.dev;
        for seed in 1..=4u64 {
            let after = dev.clone().after_crash(seed * 7919 + crash_at as u64);
            let mut v = AuthVolume::open(after, &KEY, generation, rw())
                .unwrap_or_else(|e| panic!("cut at op {crash_at} (seed {seed}): does not open: {e}"));
            for &s in &sectors {
                let mut buf = vec![0u8; SECTOR as usize];
                let expect = |tag: u64| if tag == 0 { vec![0u8; SECTOR as usize] } else { pattern(tag) };
                let old = committed.get(&s).copied().unwrap_or(0);
                let newer = since.get(&s).cloned().unwrap_or_default();
                match v.read(s * SECTOR, &mut buf) {
                    Ok(()) => assert!(
                        buf == expect(old) || newer.iter().any(|&t| buf == expect(t)),
                        "cut at op {crash_at} (seed {seed}): sector {s} reads neither its committed nor a later value"
                    ),
                    Err(IoError::Integrity) => assert!(
                        !newer.is_empty(),
                        "cut at op {crash_at} (seed {seed}): committed sector {s} fails its read"
                    ),
                    Err(e) => panic!("cut at op {crash_at}: sector {s}: {e:?}"),
                }
            }
            // The recovered volume takes new writes and commits.
            v.write(7 * SECTOR, &pattern(77)).unwrap();
            v.commit().unwrap();
        }
    }
    assert!(cut_points > 20, "only {cut_points} cut points exercised");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The provider may change any bytes of the volume: opening it at the
    /// tenant's generation then either fails, or every sector reads back
    /// exactly or fails its read. Never a wrong byte, never a panic.
    #[test]
    fn any_tampering_is_refused_or_detected_never_served(
        flips in proptest::collection::vec((0usize..DEV, 1u8..=255), 1..6),
        near_metadata in any::<bool>(),
    ) {
        let mut v = open(formatted(DEV));
        for s in 0..12u64 {
            v.write(s * 131 % 700 * SECTOR, &pattern(s)).unwrap();
            if s % 5 == 4 { v.commit().unwrap(); }
        }
        v.commit().unwrap();
        let generation = v.generation();
        let mut model = vec![0u8; v.size() as usize];
        v.read(0, &mut model).unwrap();
        let mut d = core::mem::take(v.device());
        for (at, x) in flips {
            // Half the cases aim at the headers and metadata.
            let at = if near_metadata { at % (META as usize + 2 * 8192) } else { at };
            d.bytes[at] ^= x;
        }
        if let Ok(mut v) = AuthVolume::open(d, &KEY, generation, rw()) {
            for s in 0..v.size() / SECTOR {
                let mut buf = vec![0u8; SECTOR as usize];
                match v.read(s * SECTOR, &mut buf) {
                    Ok(()) => prop_assert!(buf[..] == model[(s * SECTOR) as usize..][..SECTOR as usize], "sector {} served wrong", s),
                    Err(e) => prop_assert_eq!(e, IoError::Integrity),
                }
            }
        }
    }
}

/// What a provider does to a volume between and during opens.
#[derive(Clone, Debug)]
enum Step {
    /// The client writes `byte` over a whole sector.
    Write(u64, u8),
    Commit,
    /// The SD is killed: the volume reopens from what reached the device.
    Crash,
    /// The provider copies the device.
    Snapshot,
    /// The provider puts an earlier copy back, with the tenant's record of
    /// its generation (so the open's rollback check passes).
    Rollback(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..6, any::<u8>()).prop_map(|(s, b)| Step::Write(s, b)),
        2 => Just(Step::Commit),
        1 => Just(Step::Crash),
        2 => Just(Step::Snapshot),
        2 => any::<usize>().prop_map(Step::Rollback),
    ]
}

fn reopen(d: MemDevice, fingerprints: &mut Vec<[u8; 8]>) -> AuthVolume<MemDevice> {
    let v = AuthVolume::open(d, &KEY, 0, rw()).unwrap();
    fingerprints.push(v.writer.as_ref().unwrap().1.fingerprint);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn no_sequence_of_opens_writes_crashes_and_rollbacks_seals_two_plaintexts_under_one_key_and_nonce(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        let mut fps = vec![];
        let mut v = reopen(formatted(DEV), &mut fps);
        let mut snapshots = vec![v.device().clone()];
        for s in &steps {
            match s {
                Step::Write(sector, byte) => v.write(sector * SECTOR, &[*byte; SECTOR as usize]).unwrap(),
                Step::Commit => v.commit().unwrap(),
                Step::Crash => {
                    let d = v.device().clone();
                    v = reopen(d, &mut fps);
                }
                Step::Snapshot => snapshots.push(v.device().clone()),
                Step::Rollback(i) => v = reopen(snapshots[i % snapshots.len()].clone(), &mut fps),
            }
        }
        let log = SEALS.lock().unwrap();
        let mut seen: BTreeMap<([u8; 8], u64, u64), [u8; 32]> = BTreeMap::new();
        for (key, sector, counter, plain) in log.iter().filter(|e| fps.contains(&e.0)) {
            if let Some(earlier) = seen.insert((*key, *sector, *counter), *plain) {
                prop_assert_eq!(earlier, *plain, "sector {} counter {}: two plaintexts under one key and nonce", sector, counter);
            }
        }
    }
}

#[test]
fn a_version_2_volume_opens_reads_and_is_upgraded_at_its_first_commit() {
    // A version-2 volume: records sealed under the data key (salt 0).
    let mut v = open(formatted(DEV));
    let id = v.header.id;
    v.writer = Some((0, Sealer::new(&KEY, id)));
    v.write(5 * SECTOR, &pattern(5)).unwrap();
    v.commit().unwrap();
    // Both slots as version 2 wrote them: the XTS format's key check label.
    let legacy = AuthHeader {
        version: LEGACY_VERSION,
        key_check: key_check(&KEY, &v.header.salt).finalize().into_bytes().into(),
        ..v.header.clone()
    };
    let raw = legacy.encode(&v.keys.mac);
    let mut d = v.device().clone();
    for at in [0, SLOT as usize] {
        d.bytes[at..at + 512].copy_from_slice(&raw);
    }

    let mut v = open(d);
    let mut buf = vec![0u8; SECTOR as usize];
    v.read(5 * SECTOR, &mut buf).unwrap();
    assert_eq!(buf, pattern(5), "a legacy sector reads under the data key");
    v.write(6 * SECTOR, &pattern(6)).unwrap();
    v.commit().unwrap();
    let mut d = v.device().clone();
    let mut v = open(d.clone());
    for s in [5, 6] {
        v.read(s * SECTOR, &mut buf).unwrap();
        assert_eq!(buf, pattern(s));
    }
    assert_eq!(v.record(6).2, v.record(6).2.max(1), "new sectors name their open's salt");
    assert_eq!(v.record(5).2, 0);
    let at = if v.header.generation % 2 == 1 { 0 } else { SLOT } as usize;
    assert_eq!(u32::from_be_bytes(d.bytes[at + 8..][..4].try_into().unwrap()), VERSION, "upgraded header");
    // A salt edited in the metadata is caught like any other tampering.
    let meta = v.header.geometry.copy_offset(v.header.copy) as usize;
    d.bytes[meta + 6 * RECORD + 24] ^= 1;
    assert_eq!(AuthVolume::open(d, &KEY, 0, rw()).err(), Some(OpenError::MetadataTampered));
}

#[test]
fn an_authenticated_volumes_key_check_does_not_open_it_as_an_xts_volume() {
    // The downgrade of issue 19, item 7: the provider rewrites the header as
    // an XTS header with the volume's salt and key check, to have it
    // served without integrity. Version 3's check has a label of its own.
    let v = open(formatted(DEV));
    let h = &v.header;
    assert_eq!(h.version, VERSION);
    let mut xts = crate::header::VolumeHeader::new(&KEY, 512, 1 << 20, h.salt, h.id);
    assert!(xts.verify_key(&KEY).is_ok(), "a genuine XTS header opens");
    xts.key_check = h.key_check;
    assert_eq!(xts.verify_key(&KEY), Err(HeaderError::WrongKey));
}
