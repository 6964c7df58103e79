//! A sans-IO NBD server (protocol as in the NBD project's `proto.md`).
//!
//! Feed it the client's bytes with [`Server::receive`]; it runs complete
//! options and requests against a [`Backend`] and queues the replies;
//! [`Server::output`] shows the next bytes to send and
//! [`Server::consume_output`] drops what was sent. Pipelined requests are
//! served in order. Only the fixed-newstyle handshake is spoken, with simple
//! replies (a client asking for structured replies or metadata contexts is
//! told `ERR_UNSUP` and carries on without them).
//!
//! Memory is bounded whatever the client sends (the server runs in a
//! 128 MiB unikernel): the reply queue never holds more than
//! [`MAX_QUEUED_OUTPUT`] bytes. A request (or option) starts only when its
//! reply fits beside what is queued, or the queue is empty; otherwise the
//! server stops serving, leaves the rest of the input buffered and says so
//! through [`Server::wants_input`] (false), and its driver sends replies
//! and calls [`Server::serve`] to go on. The bound counts whole buffers,
//! sent parts included: a reply buffer is freed once all of it was sent. A
//! driver that reads at most [`Server::input_wanted`] bytes at a time also
//! bounds the input buffer to one write's payload ([`MAX_REQUEST`], reserved
//! exactly when its header arrives) or what it reads at once.
//!
//! What gets which error (the spec's choices):
//! * read beyond the end, or longer than [`MAX_REQUEST`] → `EINVAL`;
//! * write beyond the end → `ENOSPC`; longer than [`MAX_REQUEST`] →
//!   `EINVAL`, and its payload is read and dropped so the connection lives;
//! * write/trim/zeroes on a read-only export → `EPERM`;
//! * unknown command → `EINVAL`; device failure → `EIO`;
//! * bad request magic, unknown client flags, an option over
//!   [`MAX_OPTION`] bytes, or an unknown export name in `EXPORT_NAME` →
//!   the connection closes ([`ProtocolError`]), as the spec allows.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use crate::auth::AuthVolume;
use crate::volume::{BlockDevice, CryptVolume, IoError};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

/// NBD error numbers (the spec fixes them to Linux's values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Largest read or write payload served (also advertised as the maximum
/// block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;
/// Most reply bytes ever queued: one largest read reply. Further requests
/// wait, unread, until the queue has room for their replies.
pub const MAX_QUEUED_OUTPUT: usize = 16 + MAX_REQUEST as usize;
/// Replies smaller than this share one buffer; a larger read reply gets its
/// own, which is freed as soon as it has been sent.
const SHARED_CHUNK: usize = 64 << 10;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;

/// What the server serves.
pub trait Backend {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError>;
    fn flush(&mut self) -> Result<(), IoError>;
    /// Advisory: contents after a trim are unspecified (NBD semantics).
    fn trim(&mut self, offset: u64, len: u64) -> Result<(), IoError>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), IoError>;
}

impl<D: BlockDevice> Backend for CryptVolume<D> {
    fn size(&self) -> u64 {
        CryptVolume::size(self)
    }
    fn read_only(&self) -> bool {
        CryptVolume::read_only(self)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        CryptVolume::read(self, offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        CryptVolume::write(self, offset, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        CryptVolume::flush(self)
    }
    fn trim(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        // Ciphertext cannot be "discarded" to zeroes without lying about
        // the plaintext; a trim is a hint, so it only checks its range.
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        CryptVolume::write_zeroes(self, offset, len)
    }
}

impl<D: BlockDevice> Backend for AuthVolume<D> {
    fn size(&self) -> u64 {
        AuthVolume::size(self)
    }
    fn read_only(&self) -> bool {
        AuthVolume::read_only(self)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        AuthVolume::read(self, offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        AuthVolume::write(self, offset, data)
    }
    /// A FLUSH commits: the metadata and a new header become durable.
    fn flush(&mut self) -> Result<(), IoError> {
        self.commit()
    }
    /// Whole sectors lose their record (they read as zeroes afterwards).
    fn trim(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        AuthVolume::write_zeroes(self, offset, len)
    }
}

/// The one export this server offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub description: String,
}

/// Why the server closed the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    UnknownClientFlags(u32),
    NotFixedNewstyle,
    BadOptionMagic(u64),
    OptionTooLarge(u32),
    UnknownExport(String),
    BadRequestMagic(u32),
    /// The client aborted or disconnected (not a failure).
    ClientClosed,
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProtocolError::UnknownClientFlags(x) => {
                write!(f, "client sent unknown handshake flags {x:#x}")
            }
            ProtocolError::NotFixedNewstyle => f.write_str("client does not speak the fixed newstyle handshake"),
            ProtocolError::BadOptionMagic(m) => write!(f, "bad option magic {m:#x}"),
            ProtocolError::OptionTooLarge(n) => {
                write!(f, "option of {n} bytes exceeds {MAX_OPTION}")
            }
            ProtocolError::UnknownExport(n) => write!(f, "client asked for unknown export `{n}`"),
            ProtocolError::BadRequestMagic(m) => write!(f, "bad request magic {m:#x}"),
            ProtocolError::ClientClosed => f.write_str("client closed the connection"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Transmission,
    /// Dropping the payload of an oversized write.
    Discard(u64),
    Closed(ProtocolError),
}

/// Counters for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Replies waiting to be sent, in order. A buffer is dropped as soon as all
/// of it was sent (a large read reply is a buffer of its own).
#[derive(Debug, Default)]
struct ReplyQueue {
    chunks: VecDeque<Vec<u8>>,
    /// How much of the front chunk was sent.
    sent: usize,
    /// Unsent bytes in all chunks.
    len: usize,
}

impl ReplyQueue {
    /// Bytes the queue's buffers hold, sent or not: what the memory bound
    /// counts (a half-sent 32 MiB reply still holds 32 MiB).
    fn held(&self) -> usize {
        self.len + self.sent
    }

    /// A buffer at the back with room for `n` more bytes, shared with the
    /// replies before it when they are small.
    fn back(&mut self, n: usize) -> &mut Vec<u8> {
        if self.chunks.back().is_none_or(|c| c.len() + n > SHARED_CHUNK) {
            self.chunks.push_back(Vec::with_capacity(if n < SHARED_CHUNK { n.max(4096) } else { n }));
        }
        self.chunks.back_mut().expect("pushed")
    }

    fn push(&mut self, bytes: &[u8]) {
        self.back(bytes.len()).extend_from_slice(bytes);
        self.len += bytes.len();
    }

    fn front(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[self.sent..])
    }

    fn consume(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front().expect("len counts queued bytes");
            let take = n.min(front.len() - self.sent);
            self.sent += take;
            n -= take;
            if self.sent == front.len() {
                self.chunks.pop_front();
                self.sent = 0;
            }
        }
    }

    fn take_all(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in self.chunks.drain(..) {
            out.extend_from_slice(&c[self.sent..]);
            self.sent = 0;
        }
        self.len = 0;
        out
    }
}

/// One connection's server.
#[derive(Debug)]
pub struct Server {
    export: Export,
    state: State,
    input: Vec<u8>,
    pos: usize,
    output: ReplyQueue,
    /// Serving stopped because the next reply does not fit in the queue.
    waiting_for_room: bool,
    no_zeroes: bool,
    stats: Stats,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl Server {
    /// A server for one connection; the greeting is queued at once.
    pub fn new(export: Export) -> Self {
        let mut output = ReplyQueue::default();
        output.push(&NBDMAGIC.to_be_bytes());
        output.push(&IHAVEOPT.to_be_bytes());
        output.push(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Server {
            export,
            state: State::ClientFlags,
            input: Vec::new(),
            pos: 0,
            output,
            waiting_for_room: false,
            no_zeroes: false,
            stats: Stats::default(),
        }
    }

    /// The next bytes to send to the client (empty when nothing is queued;
    /// more may follow once these are consumed).
    pub fn output(&self) -> &[u8] {
        self.output.front()
    }

    /// `n` bytes of [`Server::output`] were sent: they are dropped.
    pub fn consume_output(&mut self, n: usize) {
        self.output.consume(n);
    }

    /// Bytes the reply queue holds in memory, sent or not (never over
    /// [`MAX_QUEUED_OUTPUT`]); 0 once everything was sent.
    pub fn queued_output(&self) -> usize {
        self.output.held()
    }

    /// Everything queued for the client, in one buffer (drains the queue;
    /// tests and benchmarks: a driver sends [`Server::output`] instead).
    pub fn take_output(&mut self) -> Vec<u8> {
        self.output.take_all()
    }

    /// Whether more client bytes should be read: false while a buffered
    /// request waits for room in the reply queue. Send, then [`Server::serve`].
    pub fn wants_input(&self) -> bool {
        !self.waiting_for_room && self.closed().is_none()
    }

    /// Client bytes buffered and not yet served.
    pub fn buffered_input(&self) -> usize {
        self.input.len() - self.pos
    }

    /// Bytes the input buffer holds in memory (its capacity).
    pub fn input_capacity(&self) -> usize {
        self.input.capacity()
    }

    /// At most how many client bytes to read next: none while a request
    /// waits for room; exactly the rest of a write's payload while one is
    /// arriving (so its buffer, reserved for exactly that, never grows and
    /// is never copied to a larger one); otherwise any amount.
    pub fn input_wanted(&self) -> usize {
        if !self.wants_input() { 0 } else { self.missing_payload().unwrap_or(usize::MAX) }
    }

    /// Whether the handshake is done and commands are being served.
    pub fn transmitting(&self) -> bool {
        matches!(self.state, State::Transmission | State::Discard(_))
    }

    /// Why the connection closed, once it has.
    pub fn closed(&self) -> Option<&ProtocolError> {
        match &self.state {
            State::Closed(e) => Some(e),
            _ => None,
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Takes the client's bytes and serves everything complete that has room
    /// for its reply (see [`Server::wants_input`]).
    pub fn receive<B: Backend + ?Sized>(&mut self, bytes: &[u8], backend: &mut B) -> Result<(), ProtocolError> {
        if let State::Closed(e) = &self.state {
            return Err(e.clone());
        }
        self.input.extend_from_slice(bytes);
        self.serve(backend)
    }

    /// Serves buffered input as far as the reply queue has room: call it
    /// after output was consumed while [`Server::wants_input`] was false.
    pub fn serve<B: Backend + ?Sized>(&mut self, backend: &mut B) -> Result<(), ProtocolError> {
        if let State::Closed(e) = &self.state {
            return Err(e.clone());
        }
        self.waiting_for_room = false;
        let r = loop {
            match self.step(backend) {
                Ok(true) => continue,
                Ok(false) => break Ok(()),
                Err(e) => {
                    self.state = State::Closed(e.clone());
                    break Err(e);
                }
            }
        };
        // Compact what was consumed.
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        // A write's payload is still arriving: make room for exactly that,
        // not for the doubling a growing Vec would do (32 MiB → 64 MiB).
        if let Some(missing) = self.missing_payload() {
            self.input.reserve_exact(missing);
        }
        r
    }

    /// Bytes still to arrive for a buffered write request.
    fn missing_payload(&self) -> Option<usize> {
        let h = self.available().get(..28)?;
        let (kind, len) = (be16(&h[6..]), be32(&h[24..]));
        if self.state != State::Transmission || kind != CMD_WRITE || len > MAX_REQUEST {
            return None;
        }
        let whole = 28 + len as usize;
        (self.available().len() < whole).then(|| whole - self.available().len())
    }

    /// Whether a reply of `n` bytes may be queued now; if not, serving stops
    /// until the driver has sent some of the queue. Counts what the queue
    /// holds, sent or not, so memory and not only unsent bytes is bounded.
    fn room_for(&mut self, n: usize) -> bool {
        let held = self.output.held();
        let room = held == 0 || held + n <= MAX_QUEUED_OUTPUT;
        self.waiting_for_room = !room;
        room
    }

    /// The most bytes one option's replies take (info requests are answered
    /// once each, however often they are asked for).
    fn option_reply_bound(&self) -> usize {
        6 * 20 + 12 + 14 + 4 + 2 * self.export.name.len() + self.export.description.len() + 64
    }

    fn available(&self) -> &[u8] {
        &self.input[self.pos..]
    }

    /// Serves one unit of input; `Ok(false)` when more bytes are needed.
    fn step<B: Backend + ?Sized>(&mut self, backend: &mut B) -> Result<bool, ProtocolError> {
        match self.state.clone() {
            State::Closed(e) => Err(e),
            State::ClientFlags => {
                let Some(b) = self.available().get(..4) else {
                    return Ok(false);
                };
                let flags = be32(b);
                self.pos += 4;
                if flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
                    return Err(ProtocolError::UnknownClientFlags(flags));
                }
                if flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
                    return Err(ProtocolError::NotFixedNewstyle);
                }
                self.no_zeroes = flags & u32::from(FLAG_NO_ZEROES) != 0;
                self.state = State::Options;
                Ok(true)
            }
            State::Options => {
                let Some(h) = self.available().get(..16) else {
                    return Ok(false);
                };
                let (magic, option, len) = (be64(h), be32(&h[8..]), be32(&h[12..]));
                if magic != IHAVEOPT {
                    return Err(ProtocolError::BadOptionMagic(magic));
                }
                if len > MAX_OPTION {
                    return Err(ProtocolError::OptionTooLarge(len));
                }
                if self.available().len() < 16 + len as usize {
                    return Ok(false);
                }
                if !self.room_for(self.option_reply_bound()) {
                    return Ok(false);
                }
                let data = self.available()[16..16 + len as usize].to_vec();
                self.pos += 16 + len as usize;
                self.option(option, &data, backend)?;
                Ok(true)
            }
            State::Transmission => {
                let Some(h) = self.available().get(..28) else {
                    return Ok(false);
                };
                let magic = be32(h);
                if magic != REQUEST_MAGIC {
                    return Err(ProtocolError::BadRequestMagic(magic));
                }
                let (flags, kind, handle, offset, len) =
                    (be16(&h[4..]), be16(&h[6..]), be64(&h[8..]), be64(&h[16..]), be32(&h[24..]));
                let reply = if kind == CMD_READ && len <= MAX_REQUEST { 16 + len as usize } else { 16 };
                if kind == CMD_WRITE && len <= MAX_REQUEST {
                    let end = self.pos + 28 + len as usize;
                    if self.input.len() < end {
                        return Ok(false);
                    }
                    if !self.room_for(reply) {
                        return Ok(false);
                    }
                    // The payload is served from the input buffer, not copied.
                    let input = core::mem::take(&mut self.input);
                    self.write(flags, handle, offset, &input[self.pos + 28..end], backend);
                    self.input = input;
                    self.pos = end;
                    return Ok(true);
                }
                if !self.room_for(reply) {
                    return Ok(false);
                }
                self.pos += 28;
                self.command(flags, kind, handle, offset, len, backend)
            }
            State::Discard(left) => {
                let n = (self.available().len() as u64).min(left);
                if n == 0 {
                    return Ok(false);
                }
                self.pos += n as usize;
                self.state = if n == left { State::Transmission } else { State::Discard(left - n) };
                Ok(true)
            }
        }
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        let mut head = [0u8; 20];
        head[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        head[8..12].copy_from_slice(&option.to_be_bytes());
        head[12..16].copy_from_slice(&kind.to_be_bytes());
        head[16..].copy_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.push(&head);
        self.output.push(data);
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn transmission_flags<B: Backend + ?Sized>(backend: &B) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        if backend.read_only() {
            f |= TF_READ_ONLY;
        }
        f
    }

    fn option<B: Backend + ?Sized>(&mut self, option: u32, data: &[u8], backend: &mut B) -> Result<(), ProtocolError> {
        match option {
            OPT_EXPORT_NAME => {
                if !self.name_matches(data) {
                    return Err(ProtocolError::UnknownExport(String::from_utf8_lossy(data).into_owned()));
                }
                self.output.push(&backend.size().to_be_bytes());
                self.output.push(&Self::transmission_flags(backend).to_be_bytes());
                if !self.no_zeroes {
                    self.output.push(&[0; 124]);
                }
                self.state = State::Transmission;
            }
            OPT_ABORT => {
                self.option_reply(option, REP_ACK, &[]);
                return Err(ProtocolError::ClientClosed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else {
                    let mut d = (self.export.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(self.export.name.as_bytes());
                    self.option_reply(option, REP_SERVER, &d);
                    self.option_reply(option, REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, backend),
            _ => self.option_reply(option, REP_ERR_UNSUP, b"not supported by this server"),
        }
        Ok(())
    }

    fn info_or_go<B: Backend + ?Sized>(&mut self, option: u32, data: &[u8], backend: &mut B) {
        let parsed = (|| {
            let n = be32(data.get(..4)?) as usize;
            let name = data.get(4..4 + n)?;
            let count = be16(data.get(4 + n..6 + n)?) as usize;
            let reqs = data.get(6 + n..6 + n + 2 * count)?;
            (data.len() == 6 + n + 2 * count).then(|| (name.to_vec(), reqs.chunks(2).map(be16).collect::<Vec<u16>>()))
        })();
        let Some((name, requests)) = parsed else {
            self.option_reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO");
            return;
        };
        if !self.name_matches(&name) {
            self.option_reply(option, REP_ERR_UNKNOWN, b"no such export");
            return;
        }
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&backend.size().to_be_bytes());
        info.extend_from_slice(&Self::transmission_flags(backend).to_be_bytes());
        self.option_reply(option, REP_INFO, &info);
        // Each known info once, however often (or in whatever mix) asked for.
        let mut answered = [false; 4];
        for r in requests {
            match answered.get_mut(usize::from(r)) {
                Some(done) if !*done => *done = true,
                _ => continue,
            }
            let mut d = r.to_be_bytes().to_vec();
            match r {
                INFO_NAME => d.extend_from_slice(self.export.name.as_bytes()),
                INFO_DESCRIPTION => d.extend_from_slice(self.export.description.as_bytes()),
                INFO_BLOCK_SIZE => {
                    for v in [1, PREFERRED_BLOCK, MAX_REQUEST] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                }
                _ => continue,
            }
            self.option_reply(option, REP_INFO, &d);
        }
        self.option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.state = State::Transmission;
        }
    }

    fn reply(&mut self, handle: u64, error: u32) {
        self.output.push(&Self::reply_header(handle, error));
        if error != 0 {
            self.stats.errors += 1;
        }
    }

    fn reply_header(handle: u64, error: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&error.to_be_bytes());
        h[8..].copy_from_slice(&handle.to_be_bytes());
        h
    }

    fn result(&mut self, handle: u64, r: Result<(), IoError>, out_of_range: u32) {
        let e = match r {
            Ok(()) => 0,
            Err(IoError::Io | IoError::Integrity) => EIO,
            Err(IoError::OutOfRange) => out_of_range,
            Err(IoError::ReadOnly) => EPERM,
        };
        self.reply(handle, e);
    }

    fn write<B: Backend + ?Sized>(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8], backend: &mut B) {
        if backend.read_only() {
            return self.reply(handle, EPERM);
        }
        let mut r = backend.write(offset, data);
        if r.is_ok() && flags & CMD_FLAG_FUA != 0 {
            r = backend.flush();
        }
        if r.is_ok() {
            self.stats.writes += 1;
            self.stats.bytes_written += data.len() as u64;
        }
        self.result(handle, r, ENOSPC);
    }

    fn command<B: Backend + ?Sized>(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        backend: &mut B,
    ) -> Result<bool, ProtocolError> {
        match kind {
            CMD_READ => {
                if len > MAX_REQUEST {
                    self.reply(handle, EINVAL);
                    return Ok(true);
                }
                // The data is read straight into the reply, after its header.
                let n = 16 + len as usize;
                let out = self.output.back(n);
                let at = out.len();
                out.extend_from_slice(&Self::reply_header(handle, 0));
                out.resize(at + n, 0);
                match backend.read(offset, &mut out[at + 16..]) {
                    Ok(()) => {
                        self.output.len += n;
                        self.stats.reads += 1;
                        self.stats.bytes_read += u64::from(len);
                    }
                    Err(e) => {
                        out.truncate(at);
                        if out.is_empty() {
                            self.output.chunks.pop_back();
                        }
                        self.result(handle, Err(e), EINVAL);
                    }
                }
            }
            CMD_WRITE => {
                // Only oversized writes get here: refuse, drop the payload.
                self.reply(handle, EINVAL);
                self.state = State::Discard(u64::from(len));
            }
            CMD_DISC => return Err(ProtocolError::ClientClosed),
            CMD_FLUSH => {
                let r = backend.flush();
                self.stats.flushes += 1;
                self.result(handle, r, EINVAL);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if backend.read_only() {
                    self.reply(handle, EPERM);
                    return Ok(true);
                }
                let mut r = if kind == CMD_TRIM {
                    backend.trim(offset, u64::from(len))
                } else {
                    backend.write_zeroes(offset, u64::from(len))
                };
                if r.is_ok() && flags & CMD_FLAG_FUA != 0 {
                    r = backend.flush();
                }
                self.result(handle, r, if kind == CMD_TRIM { EINVAL } else { ENOSPC });
            }
            _ => self.reply(handle, EINVAL),
        }
        Ok(true)
    }
}

pub mod client;
#[cfg(test)]
mod tests;
