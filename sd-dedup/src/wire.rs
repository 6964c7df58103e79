//! How a plan travels on the control link (`ssc_abi::Body::DedupGroups`):
//! groups as `count: u32 LE` followed by `count` members of
//! `client: u32 LE, page: u64 LE`. A group too large for one frame is cut
//! into pieces; a piece whose count has the high bit set continues the
//! group before it.

use alloc::vec;
use alloc::vec::Vec;

use crate::{Group, PageRef};

/// Bytes per member.
const MEMBER: usize = 12;
/// Set in a piece's count: it continues the previous group.
const CONTINUES: u32 = 1 << 31;

/// Encodes `groups` into payloads of at most `max` bytes each (`max` ≥ 16).
pub fn encode_groups(groups: &[Group], max: usize) -> Vec<Vec<u8>> {
    assert!(max >= 4 + MEMBER, "a frame must hold one member");
    let mut out: Vec<Vec<u8>> = vec![Vec::new()];
    for g in groups {
        let mut rest = &g.members[..];
        let mut first = true;
        while !rest.is_empty() {
            let cur = out.last_mut().expect("never empty");
            let room = max.saturating_sub(cur.len() + 4) / MEMBER;
            if room == 0 {
                out.push(Vec::new());
                continue;
            }
            let n = room.min(rest.len());
            let count = n as u32 | if first { 0 } else { CONTINUES };
            cur.extend_from_slice(&count.to_le_bytes());
            for m in &rest[..n] {
                cur.extend_from_slice(&m.client.to_le_bytes());
                cur.extend_from_slice(&m.page.to_le_bytes());
            }
            rest = &rest[n..];
            first = false;
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Appends the groups of one payload to `groups`; `None` if the payload is
/// malformed (a short member, a continuation with nothing before it).
pub fn decode_groups(payload: &[u8], groups: &mut Vec<Group>) -> Option<()> {
    let mut rest = payload;
    while !rest.is_empty() {
        let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        let n = (count & !CONTINUES) as usize;
        let bytes = rest.get(..n.checked_mul(MEMBER)?)?;
        rest = &rest[bytes.len()..];
        let members = bytes.chunks_exact(MEMBER).map(|m| PageRef {
            client: u32::from_le_bytes(m[..4].try_into().expect("4 bytes")),
            page: u64::from_le_bytes(m[4..].try_into().expect("8 bytes")),
        });
        if count & CONTINUES != 0 {
            groups.last_mut()?.members.extend(members);
        } else {
            groups.push(Group { members: members.collect() });
        }
    }
    Some(())
}

/// `client, offset, length` u64 LE triples → per-client extents for `n`
/// clients (`None` for all of them when `b` is empty: all allocated).
/// `None` if malformed or a client index is out of range.
#[allow(clippy::type_complexity)]
pub fn decode_extents(b: &[u8], n: usize) -> Option<Vec<Option<Vec<(u64, u64)>>>> {
    if b.is_empty() {
        return Some(vec![None; n]);
    }
    if !b.len().is_multiple_of(24) {
        return None;
    }
    let mut out = vec![Some(Vec::new()); n];
    for t in b.chunks_exact(24) {
        let c = u64::from_le_bytes(t[..8].try_into().expect("8")) as usize;
        let off = u64::from_le_bytes(t[8..16].try_into().expect("8"));
        let len = u64::from_le_bytes(t[16..].try_into().expect("8"));
        out.get_mut(c)?.as_mut().expect("Some").push((off, len));
    }
    Some(out)
}
