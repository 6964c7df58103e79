//! Where a service domain's bytes go: its own virtio-blk disk (the
//! provider's file), or — in a chain — the next SD's NBD export, reached
//! as an NBD client over the `down` virtio-serial link. The storage SD
//! puts its ciphertext here; the checkpoint SD its sealed streams, so a
//! checkpoint can land on a volume behind a storage SD.
//!
//! Both sides implement `sd_storage_crypt::volume::BlockDevice`; the NBD
//! side speaks through the sans-IO client of `sd_storage_crypt::nbd::client`,
//! one request at a time.
#![no_std]

extern crate alloc;

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::time::Duration;

use runtime::blk;
use runtime::clock::Instant;
use runtime::log::warn;
use runtime::vserial::{PortId, VirtioSerial};
use sd_storage_crypt::nbd::client::{Command, Handshake, Reply};
use sd_storage_crypt::volume::{BlockDevice, IoError};

/// Name of the downstream link (the next SD's `nbd`).
pub const DOWN_PORT: &str = "down";
/// Export name every storage SD serves (and asks its downstream for).
pub const DOWN_EXPORT: &str = "vol";
/// How long a downstream request may take before it fails with EIO.
const DOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Log target.
const TARGET: &str = "downstream";

/// The virtio-serial device, shared by the control link, the upstream and
/// the downstream.
pub type Serial = Rc<RefCell<VirtioSerial>>;

/// The runtime's virtio-blk disk.
pub struct Disk(pub blk::BlockDevice);

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.0.capacity()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.0.read_at(offset, buf).map_err(|e| {
            warn!(target: TARGET, "disk read failed: {e}");
            IoError::Io
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.write_at(offset, data).map_err(|e| {
            warn!(target: TARGET, "disk write failed: {e}");
            IoError::Io
        })
    }

    fn flush(&mut self) -> Result<(), IoError> {
        self.0.flush().map_err(|e| {
            warn!(target: TARGET, "disk flush failed: {e}");
            IoError::Io
        })
    }
}

/// The next SD's NBD export over the `down` link, one request at a time.
pub struct NbdDown {
    serial: Serial,
    port: PortId,
    connection: u64,
    size: u64,
    handle: u64,
    header: Vec<u8>,
}

impl NbdDown {
    /// Waits for the link, then runs the handshake.
    pub fn connect(serial: &Serial, port: PortId) -> Result<NbdDown, String> {
        let start = Instant::now();
        let mut hs = Handshake::new(DOWN_EXPORT);
        let mut buf = [0u8; 512];
        let connection = loop {
            let mut sr = serial.borrow_mut();
            if sr.host_connected(port) {
                break sr.connections(port);
            }
            if start.elapsed() > DOWN_TIMEOUT {
                return Err("the downstream link never connected (is the next SD running?)".into());
            }
        };
        loop {
            let mut sr = serial.borrow_mut();
            let out = hs.take_output();
            sr.write_all(port, &out).map_err(|e| alloc::format!("downstream link: {e}"))?;
            let n =
                sr.read_connection(port, connection, &mut buf).map_err(|e| alloc::format!("downstream link: {e}"))?;
            if let Some(info) = hs.receive(&buf[..n]).map_err(|e| e.to_string())? {
                let out = hs.take_output();
                sr.write_all(port, &out).map_err(|e| alloc::format!("downstream link: {e}"))?;
                return Ok(NbdDown {
                    serial: serial.clone(),
                    port,
                    connection,
                    size: info.size,
                    handle: 0,
                    header: Vec::new(),
                });
            }
            if start.elapsed() > DOWN_TIMEOUT {
                return Err("the downstream NBD handshake timed out".into());
            }
        }
    }

    /// Reads exactly `buf.len()` bytes of this connection's replies.
    fn read_exact(&self, sr: &mut VirtioSerial, buf: &mut [u8]) -> Result<(), IoError> {
        let start = Instant::now();
        let mut got = 0;
        while got < buf.len() {
            let n = sr.read_connection(self.port, self.connection, &mut buf[got..]).map_err(|_| IoError::Io)?;
            got += n;
            if n == 0 {
                if !sr.host_connected(self.port) || sr.connections(self.port) != self.connection {
                    warn!(target: TARGET, "downstream NBD link lost");
                    return Err(IoError::Io);
                }
                if start.elapsed() > DOWN_TIMEOUT {
                    warn!(target: TARGET, "downstream NBD request timed out");
                    return Err(IoError::Io);
                }
            }
        }
        Ok(())
    }

    /// One request and its reply.
    fn exchange(&mut self, cmd: Command, offset: u64, out: &[u8], into: &mut [u8]) -> Result<(), IoError> {
        self.handle += 1;
        let len = if cmd == Command::Read { into.len() } else { out.len() };
        self.header.clear();
        sd_storage_crypt::nbd::client::request(&mut self.header, cmd, self.handle, offset, len as u32);
        let serial = self.serial.clone();
        let mut sr = serial.borrow_mut();
        sr.write_all(self.port, &self.header).map_err(|_| IoError::Io)?;
        if !out.is_empty() {
            sr.write_all(self.port, out).map_err(|_| IoError::Io)?;
        }
        let mut head = [0u8; Reply::LEN];
        self.read_exact(&mut sr, &mut head)?;
        let reply = Reply::parse(&head).map_err(|e| {
            warn!(target: TARGET, "{e}");
            IoError::Io
        })?;
        if reply.handle != self.handle {
            warn!(target: TARGET, "downstream NBD reply for handle {} while waiting for {}", reply.handle, self.handle);
            return Err(IoError::Io);
        }
        if reply.error != 0 {
            warn!(target: TARGET, "downstream NBD error {} at offset {offset}", reply.error);
            return Err(IoError::Io);
        }
        if cmd == Command::Read {
            self.read_exact(&mut sr, into)?;
        }
        Ok(())
    }
}

/// Where the SD's bytes go: the provider's disk, or the next SD.
pub enum Down {
    Disk(Box<Disk>),
    Nbd(NbdDown),
}

impl Down {
    /// The first disk if there is one, else the `down` link's export;
    /// `needs` names what the image wants, for the error when neither is
    /// there.
    pub fn open(disks: &mut Vec<blk::BlockDevice>, serial: &Serial, needs: &str) -> Result<Down, String> {
        if !disks.is_empty() {
            return Ok(Down::Disk(Disk(disks.remove(0)).into()));
        }
        if !serial.borrow().port_names().iter().any(|p| p == DOWN_PORT) {
            return Err(needs.into());
        }
        let port = serial
            .borrow_mut()
            .open(DOWN_PORT, Duration::from_secs(2))
            .map_err(|e| alloc::format!("downstream link: {e}"))?;
        Ok(Down::Nbd(NbdDown::connect(serial, port)?))
    }

    /// For the log: what the bytes land on.
    pub fn describe(&self) -> &'static str {
        match self {
            Down::Disk(_) => "virtio-blk disk",
            Down::Nbd(_) => "the next SD's NBD export",
        }
    }
}

impl BlockDevice for Down {
    fn size(&self) -> u64 {
        match self {
            Down::Disk(d) => d.size(),
            Down::Nbd(n) => n.size,
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        match self {
            Down::Disk(d) => d.read_at(offset, buf),
            Down::Nbd(n) => n.exchange(Command::Read, offset, &[], buf),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        match self {
            Down::Disk(d) => d.write_at(offset, data),
            Down::Nbd(n) => n.exchange(Command::Write, offset, data, &mut []),
        }
    }

    fn flush(&mut self) -> Result<(), IoError> {
        match self {
            Down::Disk(d) => d.flush(),
            Down::Nbd(n) => n.exchange(Command::Flush, 0, &[], &mut []),
        }
    }
}
