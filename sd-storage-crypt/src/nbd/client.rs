//! A sans-IO NBD client: the downstream side of an SD whose volume is the
//! next SD's export (a chain). It speaks what [`super::Server`] and
//! `nbdkit`/`qemu-nbd` speak: the fixed-newstyle handshake with `NBD_OPT_GO`
//! and simple replies, one request at a time.
//!
//! * [`Handshake`]: feed it the server's bytes, send what it queues; it ends
//!   with the export's size and flags, or an error naming what went wrong
//!   (not an NBD server, an unknown export, an unsupported server).
//! * [`request`] encodes a command; [`Reply::parse`] decodes a simple
//!   reply header (the read data follows it).

use alloc::string::String;
use alloc::vec::Vec;

use super::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_GO,
    OPTION_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, TF_READ_ONLY,
};

/// The export the handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
}

/// Why the handshake or a reply failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The peer does not speak (fixed) newstyle NBD.
    NotNbd,
    /// The server refused `NBD_OPT_GO` with this reply type (e.g. unknown
    /// export), and its message.
    Refused { reply: u32, message: String },
    /// A malformed message from the server.
    Protocol(&'static str),
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::NotNbd => write!(f, "the downstream peer is not a fixed-newstyle NBD server"),
            ClientError::Refused { reply, message } => {
                write!(f, "the downstream NBD server refused the export (reply {reply:#x}): {message}")
            }
            ClientError::Protocol(what) => write!(f, "downstream NBD protocol error: {what}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Replies,
    Done,
}

/// The client side of the handshake.
pub struct Handshake {
    export: String,
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    info: Option<ExportInfo>,
}

impl Handshake {
    pub fn new(export: &str) -> Self {
        Handshake { export: export.into(), state: State::Greeting, buf: Vec::new(), out: Vec::new(), info: None }
    }

    /// Bytes to send to the server.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.out)
    }

    /// Feeds the server's bytes; `Some` once the export is agreed (bytes
    /// after the handshake belong to transmission and stay unread here).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Option<ExportInfo>, ClientError> {
        self.buf.extend_from_slice(bytes);
        loop {
            match self.state {
                State::Greeting => {
                    if self.buf.len() < 18 {
                        return Ok(None);
                    }
                    if u64_at(&self.buf, 0) != NBDMAGIC || u64_at(&self.buf, 8) != IHAVEOPT {
                        return Err(ClientError::NotNbd);
                    }
                    let flags = u16::from_be_bytes([self.buf[16], self.buf[17]]);
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(ClientError::NotNbd);
                    }
                    self.buf.drain(..18);
                    let ours = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
                    self.out.extend_from_slice(&ours.to_be_bytes());
                    let name = self.export.as_bytes();
                    self.out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    self.out.extend_from_slice(&OPT_GO.to_be_bytes());
                    self.out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
                    self.out.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    self.out.extend_from_slice(name);
                    self.out.extend_from_slice(&0u16.to_be_bytes());
                    self.state = State::Replies;
                }
                State::Replies => {
                    if self.buf.len() < 20 {
                        return Ok(None);
                    }
                    if u64_at(&self.buf, 0) != OPTION_REPLY_MAGIC {
                        return Err(ClientError::Protocol("bad option reply magic"));
                    }
                    if u32_at(&self.buf, 8) != OPT_GO {
                        return Err(ClientError::Protocol("a reply to an option we did not send"));
                    }
                    let kind = u32_at(&self.buf, 12);
                    let len = u32_at(&self.buf, 16) as usize;
                    if len > super::MAX_OPTION as usize {
                        return Err(ClientError::Protocol("option reply too long"));
                    }
                    if self.buf.len() < 20 + len {
                        return Ok(None);
                    }
                    let data: Vec<u8> = self.buf.drain(..20 + len).skip(20).collect();
                    match kind {
                        REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            self.info =
                                Some(ExportInfo { size: u64_at(&data, 2), read_only: flags & TF_READ_ONLY != 0 });
                        }
                        REP_INFO => {}
                        REP_ACK => {
                            self.state = State::Done;
                            return match self.info {
                                Some(i) => Ok(Some(i)),
                                None => Err(ClientError::Protocol("the server acknowledged GO without export info")),
                            };
                        }
                        k if k & (1 << 31) != 0 => {
                            return Err(ClientError::Refused {
                                reply: k,
                                message: String::from_utf8_lossy(&data).into(),
                            });
                        }
                        _ => return Err(ClientError::Protocol("unexpected option reply")),
                    }
                }
                State::Done => return Ok(self.info),
            }
        }
    }
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// A transmission-phase command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Flush,
}

/// Appends a request header (a write's data goes right after it).
pub fn request(out: &mut Vec<u8>, command: Command, handle: u64, offset: u64, len: u32) {
    let kind = match command {
        Command::Read => CMD_READ,
        Command::Write => CMD_WRITE,
        Command::Flush => CMD_FLUSH,
    };
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A simple reply's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// 0, or the NBD error number.
    pub error: u32,
    pub handle: u64,
}

impl Reply {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8; 16]) -> Result<Reply, ClientError> {
        if u32_at(b, 0) != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad simple reply magic (structured replies are not negotiated)"));
        }
        Ok(Reply { error: u32_at(b, 4), handle: u64_at(b, 8) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{Export, Server};
    use crate::volume::{Cipher, CryptVolume, Layout, MemDevice};

    fn server_volume() -> (Server, CryptVolume<MemDevice>) {
        let vol = CryptVolume::new(MemDevice::new(1 << 20), Cipher::Null, Layout::PLAIN_512, false).unwrap();
        (Server::new(Export { name: "vol".into(), description: "d".into() }), vol)
    }

    /// Runs our client against our server, byte-exact, one byte at a time
    /// from the server to exercise partial input.
    #[test]
    fn handshake_and_requests_against_our_server() {
        let (mut s, mut vol) = server_volume();
        let mut c = Handshake::new("vol");
        let mut info = None;
        for _ in 0..10 {
            for b in s.take_output() {
                if let Some(i) = c.receive(&[b]).unwrap() {
                    info = Some(i);
                }
            }
            s.receive(&c.take_output(), &mut vol).unwrap();
        }
        assert_eq!(info, Some(ExportInfo { size: 1 << 20, read_only: false }));
        let mut req = Vec::new();
        request(&mut req, Command::Write, 7, 4096, 512);
        req.extend_from_slice(&[0xab; 512]);
        request(&mut req, Command::Read, 8, 4096, 512);
        request(&mut req, Command::Flush, 9, 0, 0);
        request(&mut req, Command::Read, 10, 1 << 20, 512);
        s.receive(&req, &mut vol).unwrap();
        let out = s.take_output();
        let r = |at: usize| Reply::parse(out[at..at + 16].try_into().unwrap()).unwrap();
        assert_eq!(r(0), Reply { error: 0, handle: 7 });
        assert_eq!(r(16), Reply { error: 0, handle: 8 });
        assert_eq!(&out[32..32 + 512], &[0xab; 512][..]);
        assert_eq!(r(544), Reply { error: 0, handle: 9 });
        assert_eq!(r(560), Reply { error: crate::nbd::EINVAL, handle: 10 });
    }

    #[test]
    fn an_unknown_export_or_a_non_nbd_peer_is_named() {
        let (mut s, mut vol) = server_volume();
        let mut c = Handshake::new("nope");
        let mut err = None;
        for _ in 0..4 {
            if let Err(e) = c.receive(&s.take_output()) {
                err = Some(e);
                break;
            }
            let _ = s.receive(&c.take_output(), &mut vol);
        }
        assert!(matches!(err, Some(ClientError::Refused { .. })), "{err:?}");
        let mut c = Handshake::new("vol");
        assert_eq!(c.receive(b"HTTP/1.1 200 OK\r\n\r\n"), Err(ClientError::NotNbd));
        assert!(Reply::parse(&[0; 16]).is_err());
    }
}
