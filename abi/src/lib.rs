//! The control-link ABI shared by the host tools and every image.
//!
//! A control link is a byte stream (a virtio-serial port whose host side is
//! a unix socket). On it travel **frames**: a 4-byte little-endian payload
//! length, then a `postcard` payload of at most [`MAX_PAYLOAD`] bytes. A
//! payload is an [`Envelope`]: the ABI [`VERSION`], a request id chosen by
//! the sender of a request and echoed in its reply, and a [`Body`].
//!
//! Decoding is sans-IO and bounded: [`FrameDecoder`] takes whatever bytes
//! arrived, never buffers more than one frame (`4 + MAX_PAYLOAD` bytes),
//! rejects an oversized length prefix before reading its data, and
//! [`Envelope::decode`] borrows strings and byte fields from the payload
//! instead of allocating; only the canonical encoding of an envelope is
//! accepted (no overlong varints). No input makes it panic (proptest and the fuzz
//! target in `abi/fuzz` check that).
//!
//! Compatibility: the version is decoded first and a payload of another
//! version is refused with [`FrameError::Version`]. New [`Body`] variants are
//! only ever appended, so a peer may answer an unknown variant with
//! [`ErrorCode::Unsupported`].
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

pub mod attest;
pub mod hsm;
pub mod memory;
pub mod pairs;

/// The ABI version this crate speaks.
pub const VERSION: u16 = 9;
/// Largest payload accepted or produced, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// A typed error carried in [`Body::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request could not be decoded.
    Malformed,
    /// The peer speaks another ABI version.
    Version,
    /// The request is valid but this domain does not serve it.
    Unsupported,
    /// The request was refused by policy.
    Denied,
    /// The domain failed while serving it.
    Internal,
}

/// What a frame says. Variants are appended, never reordered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<'a> {
    /// Image → builder, first frame on the control link.
    Hello { image: &'a str, version: &'a str },
    /// Image → builder: initialized and serving.
    Ready { image: &'a str, boot_us: u64 },
    /// Liveness check; the reply is a `Pong` with the same payload.
    Ping { payload: &'a [u8] },
    /// Reply to `Ping`.
    Pong { payload: &'a [u8] },
    /// A request failed.
    Error { code: ErrorCode, message: &'a str },
    /// Builder → image: stop cleanly.
    Shutdown,
    /// Tenant side → storage SD: the volume to serve and its key. The key
    /// never appears in a log line.
    ConfigureVolume(VolumeConfig<'a>),
    /// A request succeeded (reply to e.g. `ConfigureVolume`).
    Ack,
    /// Storage SD → tenant side, unsolicited (request id 0): an
    /// authenticated volume's header is durable at this generation. The
    /// tenant keeps the latest and passes it as `min_generation` next time.
    VolumeCommitted { generation: u64 },
    /// Storage SD → tenant side, unsolicited: a sector failed
    /// authentication (tampered with, or torn by a crash); the read got EIO.
    IntegrityFailure { sector: u64 },
    /// Tenant side → checkpoint SD: the client's 16-byte id and the
    /// checkpoint key (never logged).
    CheckpointKey { client: &'a [u8], key: &'a [u8] },
    /// Either way: a piece of QEMU's device state (`total` bytes in all),
    /// host → SD before a save, SD → host after a restore.
    DeviceState { offset: u64, total: u64, bytes: &'a [u8] },
    /// Tenant side → checkpoint SD: write a checkpoint at byte `at` of the
    /// SD's disk (a multiple of 4096). `base` lists the streams it is a
    /// delta against (full first, as `offset, length` u64 LE pairs; empty:
    /// a full checkpoint). `salt`: 16 fresh random bytes. `extents`: the
    /// allocated byte ranges of the client's memory file (u64 LE pairs;
    /// empty: all of it) — the rest is holes, known zero and never read.
    SaveCheckpoint { generation: u64, at: u64, base: &'a [u8], compress: bool, salt: &'a [u8], extents: &'a [u8] },
    /// Checkpoint SD → tenant side: the reply to `SaveCheckpoint`.
    CheckpointSaved { generation: u64, length: u64, pages_read: u64, pages_stored: u64, micros: u64 },
    /// Tenant side → checkpoint SD: verify the streams (full first, then
    /// deltas; `offset, length` u64 LE pairs) and write them into the
    /// client's memory window; the device state comes back in
    /// `DeviceState` frames before the `Ack`.
    /// `generations`: the generation each stream must be (u64 LE each),
    /// from the tenant's record; a stream of another generation is refused
    /// by name before a page is written.
    RestoreCheckpoint { streams: &'a [u8], generations: &'a [u8] },
    /// SD → tenant side, tagged with the request it belongs to: how far a
    /// long operation (a checkpoint save or restore) has come, in bytes.
    Progress { done: u64, total: u64 },
    /// Tenant side → checkpoint SD, for benchmarks only: copy the client's
    /// memory (its allocated `extents`, u64 LE pairs; empty: all of it) to
    /// the disk at `at` as it is — no hashing, no sealing — the copy-only
    /// baseline of a save. Reply: `CheckpointSaved` with generation 0.
    CopyMemory { at: u64, extents: &'a [u8] },
    /// Tenant side → dedup SD: scan every window (client i = window i).
    /// `extents`: the allocated byte ranges of the clients' memory files
    /// as `client, offset, length` u64 LE triples (empty: all of every
    /// client). The reply: `Progress` frames, one `DedupClient` per
    /// client, `DedupZeroRuns` and `DedupGroups` frames, then `DedupDone`.
    DedupScan { extents: &'a [u8] },
    /// Dedup SD → tenant side: what the scan found in one client.
    DedupClient {
        client: u32,
        pages: u64,
        pages_read: u64,
        zero_pages: u64,
        zero_allocated: u64,
        dup_within: u64,
        dup_across: u64,
    },
    /// Dedup SD → tenant side: runs of allocated zero pages of a client
    /// (`first page, count` u64 LE pairs).
    DedupZeroRuns { client: u32, runs: &'a [u8] },
    /// Dedup SD → tenant side: groups of identical non-zero pages
    /// (`sd_dedup::wire` encoding).
    DedupGroups { groups: &'a [u8] },
    /// Dedup SD → tenant side: the end of a scan's reply.
    DedupDone { groups: u64, duplicate_pages: u64, changed: u64, micros: u64 },
    /// Tenant side → introspection SD: the client kernel's profile
    /// (`postcard`, from `ssc profile build`) and how to scan: every
    /// `period_ms`, kernel text hashed over `text_slices` scans, a syscall
    /// summary every `summary_every` scans. Reply: `Ack` once the profile
    /// decodes; then `MonitorEvent`s, unsolicited (request id 0).
    IntrospectStart { profile: &'a [u8], period_ms: u32, text_slices: u32, summary_every: u32 },
    /// Tenant side → introspection SD: the processes and modules now.
    /// Reply: one `MonitorEvent` (a snapshot) or an `Error`.
    IntrospectSnapshot,
    /// Introspection SD → tenant side: one monitor event (`postcard` of
    /// `sd_introspect::Event`: process start/exit, hidden process, hook,
    /// text change, module, syscall alert or summary, snapshot).
    MonitorEvent { event: &'a [u8] },
    /// Tenant side → DomC: one administrative request (`postcard` of
    /// [`hsm::AdminOp`]: set the PIN, import a key, list, destroy, read the
    /// audit log). Reply: `HsmAdminReply`.
    HsmAdmin { request: &'a [u8] },
    /// DomC → tenant side: `postcard` of [`hsm::AdminReply`].
    HsmAdminReply { reply: &'a [u8] },
    /// Udom0 → builder: quote this meta-domain's vTPM (and the host TPM)
    /// with this qualifying data (SHA-256 of [`attest::binding_input`]).
    /// Reply: `QuoteEvidence` or an `Error`.
    QuoteRequest { qualifying_data: &'a [u8] },
    /// Builder → Udom0: `postcard` of [`attest::Evidence`].
    QuoteEvidence { evidence: &'a [u8] },
    /// Builder → Udom0: a tenant connection begins on the `tls` link; drop
    /// any previous session. Reply: `Ack`.
    TenantConnected,
    /// Udom0 → builder: the tenant grants service domain `sd` the
    /// `permission` (`blk-interpose`, `mem-read`, `mem-write`, `hsm`) over
    /// client `client` of this meta-domain. The builder checks that it is
    /// Udom0 asking, that both domains are this meta-domain's and that the
    /// SD's signed manifest declares the permission. Reply: `Ack` or an
    /// `Error` (`Denied`) naming the check that failed.
    Grant { sd: &'a str, client: &'a str, permission: &'a str },
    /// Udom0 → builder: keys are provisioned and grants given; start the
    /// client VMs with the granted wiring. Reply: `Ack`.
    LaunchClients,
    /// SD → builder: Udom0 keyed this SD over their link (the key went
    /// from Udom0 to the SD; the builder saw none of it).
    Keyed { by: &'a str },
}

/// Parameters of an encrypted volume (dm-crypt/LUKS data-segment terms).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig<'a> {
    /// NBD export name.
    pub export: &'a str,
    /// `aes-xts-plain64`, `aes-256-gcm` (the authenticated mode; the
    /// volume's own header gives the layout), or `null` (pass-through
    /// baseline).
    pub cipher: &'a str,
    /// 64 bytes for aes-xts-plain64 and aes-256-gcm, empty for null.
    pub key: &'a [u8],
    /// 512 or 4096.
    pub sector_size: u32,
    /// Bytes of header before the data segment.
    pub data_offset: u64,
    /// Added to sector numbers to form IVs.
    pub iv_offset: u64,
    /// IVs count sector_size units (dm-crypt `iv_large_sectors`; LUKS1 and
    /// LUKS2 do not use it, even with 4096-byte sectors).
    pub large_iv: bool,
    pub read_only: bool,
    /// The volume starts with a native header (sector 0): the SD checks the
    /// key against it and takes the layout from it, refusing a wrong key.
    pub native_header: bool,
    /// Authenticated mode: the oldest generation the tenant accepts (the
    /// latest it saw in `VolumeCommitted`); an older volume is refused as
    /// rolled back.
    pub min_generation: u64,
}

impl<'a> VolumeConfig<'a> {
    /// `aes-xts-plain64` with `key`, 512-byte sectors, data from byte 0,
    /// read-write, no native header: adjust fields from here.
    pub fn xts_plain64(export: &'a str, key: &'a [u8]) -> Self {
        VolumeConfig {
            export,
            cipher: "aes-xts-plain64",
            key,
            sector_size: 512,
            data_offset: 0,
            iv_offset: 0,
            large_iv: false,
            read_only: false,
            native_header: false,
            min_generation: 0,
        }
    }

    /// The authenticated mode with `key`; the tenant last saw generation
    /// `min_generation`.
    pub fn authenticated(export: &'a str, key: &'a [u8], min_generation: u64) -> Self {
        VolumeConfig {
            cipher: "aes-256-gcm",
            sector_size: 4096,
            native_header: true,
            min_generation,
            ..VolumeConfig::xts_plain64(export, key)
        }
    }
}

impl core::fmt::Debug for VolumeConfig<'_> {
    /// Everything but the key.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("export", &self.export)
            .field("cipher", &self.cipher)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("sector_size", &self.sector_size)
            .field("data_offset", &self.data_offset)
            .field("iv_offset", &self.iv_offset)
            .field("large_iv", &self.large_iv)
            .field("read_only", &self.read_only)
            .field("native_header", &self.native_header)
            .field("min_generation", &self.min_generation)
            .finish()
    }
}

/// One decoded payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    pub version: u16,
    pub request_id: u64,
    #[serde(borrow)]
    pub body: Body<'a>,
}

/// Why bytes could not become a frame or an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A length prefix (or an encoded envelope) exceeds [`MAX_PAYLOAD`];
    /// the stream cannot be resynchronized and must be closed.
    TooLarge { len: usize },
    /// The payload is not a valid envelope.
    Malformed,
    /// The payload is from another ABI version.
    Version { got: u16 },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::TooLarge { len } => {
                write!(f, "control frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit; closing the link")
            }
            FrameError::Malformed => f.write_str("control frame is not a valid envelope"),
            FrameError::Version { got } => {
                write!(f, "control frame speaks ABI version {got}, this side speaks {VERSION}; update the older side")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

impl<'a> Envelope<'a> {
    /// An envelope of this ABI version.
    pub fn new(request_id: u64, body: Body<'a>) -> Self {
        Envelope { version: VERSION, request_id, body }
    }

    /// Decodes a payload (without its length prefix). Borrows from `payload`.
    pub fn decode(payload: &'a [u8]) -> Result<Self, FrameError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len: payload.len() });
        }
        let (version, _) = postcard::take_from_bytes::<u16>(payload).map_err(|_| FrameError::Malformed)?;
        if version != VERSION {
            return Err(FrameError::Version { got: version });
        }
        let (env, rest) = postcard::take_from_bytes::<Envelope<'a>>(payload).map_err(|_| FrameError::Malformed)?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed);
        }
        // postcard accepts overlong varints (0x85 0x00 reads as 5): insist on
        // the canonical encoding so every envelope has exactly one byte form
        // (frames may be hashed or logged as evidence later).
        let canonical = postcard::to_allocvec(&env).map_err(|_| FrameError::Malformed)?;
        if canonical != payload {
            return Err(FrameError::Malformed);
        }
        Ok(env)
    }

    /// Appends this envelope as one frame (prefix + payload) to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let at = out.len();
        out.extend_from_slice(&[0; PREFIX]);
        let payload = postcard::to_extend(self, core::mem::take(out)).map_err(|_| FrameError::Malformed)?;
        *out = payload;
        let len = out.len() - at - PREFIX;
        if len > MAX_PAYLOAD {
            out.truncate(at);
            return Err(FrameError::TooLarge { len });
        }
        out[at..at + PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    /// This envelope as one frame.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        let mut v = Vec::new();
        self.encode_frame(&mut v)?;
        Ok(v)
    }
}

/// Splits a byte stream into frame payloads. Feed it whatever arrived; take
/// complete payloads out with [`FrameDecoder::next_payload`].
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn wanted(&self) -> usize {
        if self.buf.len() < PREFIX {
            PREFIX
        } else {
            PREFIX + u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
        }
    }

    fn complete(&self) -> bool {
        self.buf.len() >= PREFIX && self.buf.len() == self.wanted()
    }

    /// Takes bytes from `input` up to the end of the current frame; returns
    /// how many it took. Take the payload out, then feed the rest.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let mut taken = 0;
        while self.failed.is_none() && !self.complete() && taken < input.len() {
            let wanted = self.wanted();
            let n = (wanted - self.buf.len()).min(input.len() - taken);
            self.buf.extend_from_slice(&input[taken..taken + n]);
            taken += n;
            if self.buf.len() == PREFIX && self.wanted() > PREFIX + MAX_PAYLOAD {
                self.failed = Some(FrameError::TooLarge { len: self.wanted() - PREFIX });
            }
        }
        taken
    }

    /// The next complete payload, if one has arrived. After an error the
    /// decoder stays failed: the stream is out of sync.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.complete() {
            let payload = self.buf.split_off(PREFIX);
            self.buf.clear();
            return Ok(Some(payload));
        }
        Ok(None)
    }

    /// Bytes buffered for the frame in progress.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests;
