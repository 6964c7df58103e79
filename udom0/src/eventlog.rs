//! The TCG event log of a meta-domain's launches, in the crypto-agile
//! format of the TCG PC Client Platform Firmware Profile (§10.2): a first
//! `TCG_PCClientPCREvent` (SHA-1 layout, `EV_NO_ACTION`) carrying the
//! `Spec ID Event03` header that lists the banks, then one
//! `TCG_PCR_EVENT2` per measurement with a digest for every bank. All
//! integers little-endian. `tpm2_eventlog` reads these files.
//!
//! Every launch is an `EV_IPL` event into [`LAUNCH_PCR`] whose data is a
//! [`Launch`] line (`ssc-launch domain=… role=… image=… version=… part=…`)
//! and whose digests are those of the measured bytes (the image file, an
//! initramfs, a command line). The SHA-384 digest of an image is its
//! catalog digest.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use ssc_abi::attest::{ALG_SHA256, ALG_SHA384, LAUNCH_PCR};

use crate::tpm::bank_len;

/// `EV_NO_ACTION`.
pub const EV_NO_ACTION: u32 = 0x0000_0003;
/// `EV_IPL`: a boot loader's (here, the builder's) measurement.
pub const EV_IPL: u32 = 0x0000_000d;
const SPEC_ID: &[u8; 16] = b"Spec ID Event03\0";
/// The banks every log here carries.
pub const BANKS: [u16; 2] = [ALG_SHA256, ALG_SHA384];
/// Most events a log may hold (a meta-domain launches a handful).
pub const MAX_EVENTS: usize = 4096;

/// A log that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventLogError {
    Truncated { event: usize },
    NoSpecIdHeader,
    UnknownBank(u16),
    TooManyEvents,
}

impl fmt::Display for EventLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventLogError::Truncated { event } => write!(f, "the event log is truncated in event {event}"),
            EventLogError::NoSpecIdHeader => {
                write!(f, "the event log does not start with a `Spec ID Event03` header (not a crypto-agile TCG log)")
            }
            EventLogError::UnknownBank(a) => write!(f, "the event log uses the unknown hash algorithm {a:#06x}"),
            EventLogError::TooManyEvents => write!(f, "the event log has more than {MAX_EVENTS} events"),
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub event_type: u32,
    /// (bank, digest) for every bank of the log.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl Event {
    pub fn digest(&self, bank: u16) -> Option<&[u8]> {
        self.digests.iter().find(|(b, _)| *b == bank).map(|(_, d)| d.as_slice())
    }
}

/// The digests of `bytes` in every bank of the log.
pub fn measure(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let a = ring::digest::digest(&ring::digest::SHA256, bytes);
    let b = ring::digest::digest(&ring::digest::SHA384, bytes);
    alloc::vec![(ALG_SHA256, a.as_ref().to_vec()), (ALG_SHA384, b.as_ref().to_vec())]
}

/// Writes a log.
#[derive(Clone, Debug)]
pub struct EventLogWriter {
    bytes: Vec<u8>,
}

impl Default for EventLogWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLogWriter {
    /// A log with its `Spec ID Event03` header for [`BANKS`].
    pub fn new() -> Self {
        let mut spec = Vec::new();
        spec.extend_from_slice(SPEC_ID);
        spec.extend_from_slice(&0u32.to_le_bytes()); // platformClass: client
        spec.extend_from_slice(&[0, 2, 0, 2]); // spec 2.0 errata 0, UINTN = u64
        spec.extend_from_slice(&(BANKS.len() as u32).to_le_bytes());
        for bank in BANKS {
            spec.extend_from_slice(&bank.to_le_bytes());
            spec.extend_from_slice(&(bank_len(bank).unwrap_or(0) as u16).to_le_bytes());
        }
        spec.push(0); // vendorInfoSize
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 20]);
        bytes.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&spec);
        EventLogWriter { bytes }
    }

    /// Appends an event whose digests are given (one per bank of [`BANKS`],
    /// in that order).
    pub fn append(&mut self, pcr: u32, event_type: u32, digests: &[(u16, Vec<u8>)], data: &[u8]) {
        let b = &mut self.bytes;
        b.extend_from_slice(&pcr.to_le_bytes());
        b.extend_from_slice(&event_type.to_le_bytes());
        b.extend_from_slice(&(digests.len() as u32).to_le_bytes());
        for (bank, d) in digests {
            b.extend_from_slice(&bank.to_le_bytes());
            b.extend_from_slice(d);
        }
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize, event: usize) -> Result<&'a [u8], EventLogError> {
    if b.len() < n {
        return Err(EventLogError::Truncated { event });
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn le32(b: &mut &[u8], event: usize) -> Result<u32, EventLogError> {
    let v = take(b, 4, event)?;
    Ok(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))
}

fn le16(b: &mut &[u8], event: usize) -> Result<u16, EventLogError> {
    let v = take(b, 2, event)?;
    Ok(u16::from_le_bytes([v[0], v[1]]))
}

/// Reads a log: its events after the header.
pub fn parse(log: &[u8]) -> Result<Vec<Event>, EventLogError> {
    let mut b = log;
    let _pcr = le32(&mut b, 0)?;
    let kind = le32(&mut b, 0)?;
    take(&mut b, 20, 0)?;
    let size = le32(&mut b, 0)? as usize;
    let mut spec = take(&mut b, size, 0)?;
    if kind != EV_NO_ACTION || spec.len() < 28 || &spec[..16] != SPEC_ID {
        return Err(EventLogError::NoSpecIdHeader);
    }
    spec = &spec[24..];
    let n = le32(&mut spec, 0)? as usize;
    let mut sizes = Vec::new();
    for _ in 0..n.min(16) {
        let alg = le16(&mut spec, 0)?;
        let len = le16(&mut spec, 0)? as usize;
        sizes.push((alg, len));
    }
    let mut events = Vec::new();
    while !b.is_empty() {
        let i = events.len() + 1;
        if events.len() == MAX_EVENTS {
            return Err(EventLogError::TooManyEvents);
        }
        let pcr = le32(&mut b, i)?;
        let event_type = le32(&mut b, i)?;
        let count = le32(&mut b, i)? as usize;
        if count > 16 {
            return Err(EventLogError::Truncated { event: i });
        }
        let mut digests = Vec::new();
        for _ in 0..count {
            let alg = le16(&mut b, i)?;
            let len = sizes.iter().find(|(a, _)| *a == alg).map(|(_, l)| *l).ok_or(EventLogError::UnknownBank(alg))?;
            digests.push((alg, take(&mut b, len, i)?.to_vec()));
        }
        let size = le32(&mut b, i)? as usize;
        let data = take(&mut b, size, i)?.to_vec();
        events.push(Event { pcr, event_type, digests, data });
    }
    Ok(events)
}

/// The value `pcr` of `bank` holds after extending every event of the log
/// into a PCR that started at zero.
pub fn replay(events: &[Event], bank: u16, pcr: u32) -> Option<Vec<u8>> {
    let alg = match bank {
        ALG_SHA256 => &ring::digest::SHA256,
        ALG_SHA384 => &ring::digest::SHA384,
        _ => return None,
    };
    let mut value = alloc::vec![0u8; alg.output_len()];
    for e in events.iter().filter(|e| e.pcr == pcr && e.event_type != EV_NO_ACTION) {
        let d = e.digest(bank)?;
        let mut ctx = ring::digest::Context::new(alg);
        ctx.update(&value);
        ctx.update(d);
        value = ctx.finish().as_ref().to_vec();
    }
    Some(value)
}

/// What a launch event says it measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The domain's name in the meta-domain (`udom0`, `sd0-storage`, `client`).
    pub domain: String,
    /// `udom0`, `sd` or `client`.
    pub role: String,
    /// Catalog image name (`client` for the tenant's own kernel).
    pub image: String,
    pub version: String,
    /// `kernel`, `initrd` or `cmdline`.
    pub part: String,
}

impl Launch {
    /// The launch of an image's kernel (`part` = `kernel`).
    pub fn kernel(domain: &str, role: &str, image: &str, version: &str) -> Launch {
        Launch {
            domain: domain.into(),
            role: role.into(),
            image: image.into(),
            version: version.into(),
            part: "kernel".into(),
        }
    }

    /// The event data.
    pub fn line(&self) -> String {
        alloc::format!(
            "ssc-launch domain={} role={} image={} version={} part={}",
            self.domain,
            self.role,
            self.image,
            self.version,
            self.part
        )
    }

    /// Reads an event's data; `None` if it is not a launch line.
    pub fn parse(data: &[u8]) -> Option<Launch> {
        let s = core::str::from_utf8(data).ok()?.trim_end_matches('\0');
        let rest = s.strip_prefix("ssc-launch ")?;
        let get = |key: &str| -> Option<String> {
            rest.split(' ').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).map(|v| v.to_string())
        };
        Some(Launch {
            domain: get("domain")?,
            role: get("role")?,
            image: get("image")?,
            version: get("version")?,
            part: get("part")?,
        })
    }

    /// Appends this launch's event for `bytes` to `log`.
    pub fn record(&self, log: &mut EventLogWriter, bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let digests = measure(bytes);
        log.append(LAUNCH_PCR as u32, EV_IPL, &digests, self.line().as_bytes());
        digests
    }
}
