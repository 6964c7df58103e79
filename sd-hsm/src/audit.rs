//! The hash-chained audit log.
//!
//! Each entry's hash covers the previous entry's hash and its own fields
//! (`ssc_abi::hsm::AuditEntry`), so the tenant can check that the entries
//! it exports are complete and unedited from any point on: [`verify`].
//! DomC keeps the most recent [`KEEP`] entries in memory. An entry the
//! tenant has acknowledged ([`AuditLog::acknowledge`], sent once its copy
//! is on disk; reading a page acknowledges nothing) may be dropped when
//! the log is full; one it has not received is evidence, so by default a
//! full log of undelivered entries makes DomC refuse operations until the
//! tenant reads them ([`AuditLog::blocked`]); the tenant may choose to
//! drop the oldest instead. Either way the chain links through what was
//! dropped, and a page says where the kept entries start.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use ssc_abi::hsm::{Actor, AuditEntry, AuditPage};

/// Entries kept in memory (about 150 bytes each).
pub const KEEP: usize = 65_536;
/// Most entries in one exported page (fits a control frame).
pub const PAGE: u32 = 256;

pub struct AuditLog {
    entries: VecDeque<AuditEntry>,
    keep: usize,
    next: u64,
    head: [u8; 32],
    /// Entries before this one have reached the tenant.
    delivered: u64,
    /// Whether a full log of undelivered entries refuses operations
    /// (`true`, the default) or drops its oldest.
    pub block_when_full: bool,
}

/// The hash of an entry given its predecessor's.
pub fn entry_hash(e: &AuditEntry) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&e.prev);
    ctx.update(&e.body_bytes());
    let mut h = [0u8; 32];
    h.copy_from_slice(ctx.finish().as_ref());
    h
}

/// Why an exported log does not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditBroken {
    /// Entry `seq`'s hash does not match its fields: it was edited.
    Edited { seq: u64 },
    /// Entry `seq` does not link to the entry before it (one was dropped,
    /// inserted or reordered).
    Unlinked { seq: u64 },
    /// The first entry of the log (seq 0) does not start from zeros.
    BadGenesis,
}

impl core::fmt::Display for AuditBroken {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AuditBroken::Edited { seq } => write!(f, "audit entry {seq} was altered: its hash does not match"),
            AuditBroken::Unlinked { seq } => {
                write!(f, "audit entry {seq} does not follow the entry before it (dropped, inserted or reordered)")
            }
            AuditBroken::BadGenesis => f.write_str("audit entry 0 does not start the chain"),
        }
    }
}

/// Checks that `entries` (in order) form an unbroken chain, ending at
/// `head` if given. Entry 0 must start from zeros.
pub fn verify(entries: &[AuditEntry], head: Option<[u8; 32]>) -> Result<(), AuditBroken> {
    let mut prev: Option<&AuditEntry> = None;
    for e in entries {
        if entry_hash(e) != e.hash {
            return Err(AuditBroken::Edited { seq: e.seq });
        }
        match prev {
            None if e.seq == 0 && e.prev != [0; 32] => return Err(AuditBroken::BadGenesis),
            Some(p) if p.seq + 1 != e.seq || p.hash != e.prev => return Err(AuditBroken::Unlinked { seq: e.seq }),
            _ => {}
        }
        prev = Some(e);
    }
    if let (Some(h), Some(last)) = (head, prev)
        && last.hash != h
    {
        return Err(AuditBroken::Unlinked { seq: last.seq + 1 });
    }
    Ok(())
}

impl AuditLog {
    pub fn new(keep: usize) -> Self {
        AuditLog {
            entries: VecDeque::new(),
            keep: keep.max(1),
            next: 0,
            head: [0; 32],
            delivered: 0,
            block_when_full: true,
        }
    }

    /// Appends one entry.
    pub fn append(&mut self, at_ms: u64, actor: Actor, op: &str, key: Option<u64>, outcome: &str) {
        let mut e = AuditEntry {
            seq: self.next,
            at_ms,
            actor,
            op: String::from(op),
            key,
            outcome: String::from(outcome),
            prev: self.head,
            hash: [0; 32],
        };
        e.hash = entry_hash(&e);
        self.head = e.hash;
        self.next += 1;
        if self.entries.len() == self.keep {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    pub fn len(&self) -> u64 {
        self.next
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    /// Whether appending now would drop an entry the tenant has not
    /// received, and the log is set to refuse rather than drop.
    pub fn blocked(&self) -> bool {
        self.block_when_full
            && self.entries.len() == self.keep
            && self.entries.front().is_some_and(|e| e.seq >= self.delivered)
    }

    /// The tenant holds every entry before `next`, the last of which
    /// hashes to `head`. Refused (false) for entries that do not exist yet
    /// or a head that is not that entry's (when DomC still has it).
    pub fn acknowledge(&mut self, next: u64, head: [u8; 32]) -> bool {
        if next > self.next {
            return false;
        }
        let last = next.checked_sub(1).and_then(|seq| self.entries.iter().find(|e| e.seq == seq));
        if last.is_some_and(|e| e.hash != head) {
            return false;
        }
        self.delivered = self.delivered.max(next);
        true
    }

    /// Entries from `from`, at most `max` (and at most [`PAGE`]).
    pub fn page(&self, from: u64, max: u32) -> AuditPage {
        let oldest = self.entries.front().map_or(self.next, |e| e.seq);
        let start = from.max(oldest);
        let skip = (start - oldest) as usize;
        let skip = skip.min(self.entries.len());
        let entries: Vec<AuditEntry> = self.entries.range(skip..).take(max.min(PAGE) as usize).cloned().collect();
        AuditPage { entries, oldest_kept: oldest, next: self.next, head: self.head }
    }
}
