use super::*;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use proptest::prelude::*;

/// A memory of `pages` pages where page `i` holds `content(i)` (0 = zero
/// page, else a page filled from that seed).
fn memory(pages: &[u32]) -> Vec<u8> {
    let mut m = vec![0u8; pages.len() * PAGE];
    for (i, &seed) in pages.iter().enumerate() {
        if seed != 0 {
            fill(&mut m[i * PAGE..(i + 1) * PAGE], seed);
        }
    }
    m
}

fn fill(page: &mut [u8], seed: u32) {
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in page.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn clients<'a>(mems: &'a [Vec<u8>]) -> Vec<Client<'a>> {
    mems.iter().map(|m| Client { memory: m, extents: None }).collect()
}

/// The reference: group every non-zero page by its full content.
fn reference(mems: &[Vec<u8>]) -> (Vec<Vec<PageRef>>, Vec<u64>) {
    let mut by: BTreeMap<&[u8], Vec<PageRef>> = BTreeMap::new();
    let mut zeros = vec![0u64; mems.len()];
    for (c, m) in mems.iter().enumerate() {
        for (p, page) in m.chunks(PAGE).enumerate() {
            if page.iter().all(|&b| b == 0) {
                zeros[c] += 1;
            } else {
                by.entry(page).or_default().push(PageRef { client: c as u32, page: p as u64 });
            }
        }
    }
    let mut groups: Vec<Vec<PageRef>> = by.into_values().filter(|g| g.len() >= 2).collect();
    groups.sort();
    (groups, zeros)
}

fn sorted_groups(plan: &Plan) -> Vec<Vec<PageRef>> {
    let mut g: Vec<Vec<PageRef>> = plan.groups.iter().map(|g| g.members.clone()).collect();
    g.sort();
    g
}

#[test]
fn duplicates_within_and_across_clients_are_found_and_counted() {
    // Client 0: A A B 0 C; client 1: A D 0 0 B.
    let mems = [memory(&[1, 1, 2, 0, 3]), memory(&[1, 4, 0, 0, 2])];
    let plan = scan(&clients(&mems), &mut |_, _| {}).unwrap();
    let r = |client, page| PageRef { client, page };
    assert_eq!(sorted_groups(&plan), vec![vec![r(0, 0), r(0, 1), r(1, 0)], vec![r(0, 2), r(1, 4)]]);
    assert_eq!(plan.duplicate_pages(), 3);
    assert_eq!(
        plan.clients[0],
        ClientStats { pages: 5, pages_read: 5, zero_pages: 1, zero_allocated: 1, dup_within: 1, dup_across: 0 }
    );
    assert_eq!(
        plan.clients[1],
        ClientStats { pages: 5, pages_read: 5, zero_pages: 2, zero_allocated: 2, dup_within: 0, dup_across: 2 }
    );
    assert_eq!(plan.zero_runs, vec![vec![(3, 1)], vec![(2, 2)]]);
    assert_eq!(plan.bytes_saved(), 6 * PAGE as u64);
    assert_eq!(plan.changed, 0);
}

#[test]
fn a_hash_collision_never_merges_different_pages() {
    // Every page hashes alike: only the byte comparison separates them.
    let mems = [memory(&[1, 2, 1, 3]), memory(&[2, 3, 4, 0])];
    let plan = scan_with(&clients(&mems), |_| 7, &mut |_, _| {}).unwrap();
    assert_eq!(sorted_groups(&plan), reference(&mems).0);
    for g in &plan.groups {
        let first = &mems[g.members[0].client as usize][g.members[0].page as usize * PAGE..][..PAGE];
        for m in &g.members {
            assert_eq!(&mems[m.client as usize][m.page as usize * PAGE..][..PAGE], first);
        }
    }
    // A zero page is zero by its bytes, not its hash: with the constant
    // hash it is still classified (and pages are not all "zero").
    assert_eq!(plan.clients[1].zero_pages, 1);
    assert_eq!(plan.clients[0].zero_pages, 0);
}

#[test]
fn holes_are_zero_and_never_read() {
    /// Memory that fails any read outside its allocated pages.
    struct Sparse(Vec<u8>, Vec<(u64, u64)>);
    impl GuestMemory for Sparse {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
            let inside = self.1.iter().any(|&(s, l)| gpa >= s && gpa + buf.len() as u64 <= s + l);
            assert!(inside, "read a hole at {gpa:#x}+{}", buf.len());
            self.0.read(gpa, buf)
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), OutOfRange> {
            unreachable!()
        }
    }
    let ext = vec![(PAGE as u64, 2 * PAGE as u64), (6 * PAGE as u64, PAGE as u64)];
    let m = Sparse(memory(&[0, 5, 0, 0, 0, 0, 5, 0]), ext.clone());
    let plan = scan(&[Client { memory: &m, extents: Some(ext) }], &mut |_, _| {}).unwrap();
    assert_eq!(plan.clients[0].pages_read, 3);
    assert_eq!(plan.clients[0].zero_pages, 6);
    assert_eq!(plan.clients[0].zero_allocated, 1, "page 2 is allocated and zero");
    assert_eq!(plan.zero_runs[0], vec![(2, 1)]);
    assert_eq!(sorted_groups(&plan), vec![vec![PageRef { client: 0, page: 1 }, PageRef { client: 0, page: 6 }]]);
}

#[test]
fn a_page_that_changes_during_the_scan_is_left_out() {
    use core::cell::Cell;
    /// Page 1 reads differently the second time (the guest wrote it).
    struct Moving(Vec<u8>, Cell<u32>);
    impl GuestMemory for Moving {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
            self.0.read(gpa, buf)?;
            if gpa == PAGE as u64 && buf.len() == PAGE {
                self.1.set(self.1.get() + 1);
                buf[9] ^= 0xff;
            }
            Ok(())
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), OutOfRange> {
            unreachable!()
        }
    }
    let m = Moving(memory(&[1, 1, 1]), Cell::new(0));
    let plan = scan(&[Client { memory: &m, extents: None }], &mut |_, _| {}).unwrap();
    assert_eq!(m.1.get(), 1, "the batch read is not page 1 alone; the re-read is");
    assert_eq!(plan.changed, 1);
    assert_eq!(sorted_groups(&plan), vec![vec![PageRef { client: 0, page: 0 }, PageRef { client: 0, page: 2 }]]);
}

#[test]
fn bad_windows_are_errors_not_panics() {
    let odd = vec![0u8; PAGE + 1];
    let e = scan(&[Client { memory: &odd, extents: None }], &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("not a whole number of 4 KiB pages"), "{e}");
    // Extents beyond the memory: pages past the end are simply not there.
    let m = memory(&[1, 1]);
    let plan = scan(&[Client { memory: &m, extents: Some(vec![(0, 1 << 40)]) }], &mut |_, _| {}).unwrap();
    assert_eq!(plan.clients[0].pages_read, 2);
}

#[test]
fn progress_reaches_the_total() {
    let mems = [vec![0u8; 80 << 20], vec![1u8; 80 << 20]];
    let mut seen = vec![];
    let plan = scan(&clients(&mems), &mut |d, t| seen.push((d, t))).unwrap();
    assert_eq!(seen.last(), Some(&(160 << 20, 160 << 20)));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    assert!(seen.len() >= 3, "{seen:?}");
    // 20480 identical pages in client 1: one group.
    assert_eq!(plan.groups.len(), 1);
    assert_eq!(plan.clients[1].dup_within, 20479);
}

proptest! {
    #[test]
    fn the_plan_matches_a_byte_for_byte_reference(
        a in proptest::collection::vec(0u32..6, 1..40),
        b in proptest::collection::vec(0u32..6, 1..40),
        weak in any::<bool>(),
    ) {
        let mems = [memory(&a), memory(&b)];
        let cs = clients(&mems);
        let plan = if weak { scan_with(&cs, |p| u64::from(p[0] & 1), &mut |_, _| {}) } else { scan(&cs, &mut |_, _| {}) }.unwrap();
        let (groups, zeros) = reference(&mems);
        prop_assert_eq!(sorted_groups(&plan), groups);
        prop_assert_eq!(plan.clients.iter().map(|c| c.zero_pages).collect::<Vec<_>>(), zeros);
        let dups: u64 = plan.clients.iter().map(|c| c.dup_within + c.dup_across).sum();
        prop_assert_eq!(dups, plan.duplicate_pages());
    }
}

proptest! {
    #[test]
    fn groups_survive_the_wire_in_frames_of_any_size(
        sizes in proptest::collection::vec(2usize..300, 0..20),
        max in 16usize..2000,
    ) {
        let groups: Vec<Group> = sizes.iter().enumerate().map(|(g, &n)| Group {
            members: (0..n).map(|i| PageRef { client: (i % 3) as u32, page: (g * 1000 + i) as u64 }).collect(),
        }).collect();
        let frames = wire::encode_groups(&groups, max);
        prop_assert!(frames.iter().all(|f| f.len() <= max && !f.is_empty()));
        let mut back = vec![];
        for f in &frames {
            prop_assert!(wire::decode_groups(f, &mut back).is_some());
        }
        prop_assert_eq!(back, groups);
    }
}

#[test]
fn malformed_wire_payloads_are_refused() {
    let mut g = vec![];
    assert!(wire::decode_groups(&[2, 0, 0, 0, 1, 2, 3], &mut g).is_none(), "short member");
    assert!(wire::decode_groups(&(1u32 | 1 << 31).to_le_bytes(), &mut g).is_none(), "continuation of nothing");
    assert!(wire::decode_extents(&[0; 23], 1).is_none());
    let mut t = vec![];
    t.extend_from_slice(&5u64.to_le_bytes());
    t.extend_from_slice(&[0; 16]);
    assert!(wire::decode_extents(&t, 2).is_none(), "client 5 of 2");
    assert_eq!(wire::decode_extents(&[], 2), Some(vec![None, None]));
}
