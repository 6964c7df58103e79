//! The link to DomC: HSM frames over the client's virtio-serial port (or,
//! for tests on the host, a unix socket).
//!
//! One reader thread takes responses off the link and hands each to the
//! thread waiting for its request id, so several threads (sessions) can
//! have requests in flight at once. Responses nobody waits for (left over
//! from an application that died mid-request) are dropped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssc_abi::hsm::{HsmDecoder, HsmError, Op, Reply, Request, Response, decode_payload, encode_frame};

/// Where the client sees DomC when udev names ports.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/ssc-hsm";
/// The port's name on the virtio-serial bus.
pub const PORT_NAME: &str = "ssc-hsm";
/// How long one request may take in DomC (an RSA-4096 signature under
/// TCG is well under this).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// DomC answered with an error.
    Hsm(HsmError),
    /// The link failed (DomC gone, no port, timeout).
    Link(String),
}

enum Stream {
    Port(File),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Port(f) => Stream::Port(f.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Port(f) => f.write_all(b),
            Stream::Unix(s) => s.write_all(b),
        }
    }

    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Port(f) => f.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

type Waiters = Arc<Mutex<(HashMap<u64, Sender<Response>>, Option<String>)>>;

/// A connected link.
pub struct Transport {
    writer: Mutex<Stream>,
    waiters: Waiters,
    next_id: AtomicU64,
    /// What it is connected to, for messages.
    pub what: String,
    /// This process's login token ([`Transport::set_token`]).
    token: Mutex<[u8; 16]>,
}

/// Finds the port: `$SSC_HSM_PORT` (a device path, or `unix:PATH`), else
/// the udev name, else the `vportNpM` whose sysfs name is `ssc-hsm`.
pub fn locate() -> Result<String, String> {
    if let Ok(p) = std::env::var("SSC_HSM_PORT") {
        return Ok(p);
    }
    if Path::new(DEFAULT_PORT).exists() {
        return Ok(DEFAULT_PORT.into());
    }
    if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
        for e in dir.flatten() {
            let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            if name.trim() == PORT_NAME {
                return Ok(PathBuf::from("/dev").join(e.file_name()).display().to_string());
            }
        }
    }
    Err(format!(
        "no DomC port: {DEFAULT_PORT} does not exist and no virtio-serial port is named `{PORT_NAME}` \
         (does the chain file have an [hsm] section? is virtio_console loaded?); set SSC_HSM_PORT to override"
    ))
}

impl Transport {
    /// Opens the port (or socket) and starts the reader.
    pub fn connect(target: &str) -> Result<Transport, String> {
        let stream = match target.strip_prefix("unix:") {
            Some(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| format!("connecting to {path}: {e}"))?),
            None => Stream::Port(OpenOptions::new().read(true).write(true).open(target).map_err(|e| {
                let hint = if e.raw_os_error() == Some(16) {
                    " (another process has DomC's port open: one application at a time)"
                } else {
                    ""
                };
                format!("opening {target}: {e}{hint}")
            })?),
        };
        let mut reader = stream.try_clone().map_err(|e| format!("{target}: {e}"))?;
        let waiters: Waiters = Arc::new(Mutex::new((HashMap::new(), None)));
        let w = waiters.clone();
        std::thread::Builder::new()
            .name("ssc-pkcs11-reader".into())
            .spawn(move || {
                let mut decoder = HsmDecoder::new();
                let mut buf = vec![0u8; 64 * 1024];
                let why = loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break "DomC closed the link".to_string(),
                        Ok(n) => decoder.feed(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => break format!("reading the DomC link: {e}"),
                    }
                    while let Some(p) = decoder.next_payload() {
                        if let Some(resp) = decode_payload::<Response>(&p) {
                            let tx = w.lock().unwrap().0.remove(&resp.id);
                            if let Some(tx) = tx {
                                let _ = tx.send(resp);
                            }
                        }
                    }
                };
                let mut g = w.lock().unwrap();
                g.0.clear();
                g.1 = Some(why);
            })
            .map_err(|e| format!("starting the reader thread: {e}"))?;
        // Ids start from a random point: a stale response from an earlier
        // application on the same port never matches.
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Ok(Transport {
            writer: Mutex::new(stream),
            waiters,
            next_id: AtomicU64::new((seed << 16) | 1),
            what: target.into(),
            token: Mutex::new([0; 16]),
        })
    }

    /// The login token DomC gave this process (zeroes: not logged in); it
    /// goes with every request and never leaves the process otherwise.
    pub fn set_token(&self, token: [u8; 16]) {
        *self.token.lock().unwrap() = token;
    }

    /// Whether the link has failed (the reader saw EOF or an error).
    pub fn broken(&self) -> Option<String> {
        self.waiters.lock().unwrap().1.clone()
    }

    /// One request and its response.
    pub fn call(&self, session: u32, op: Op) -> Result<Reply, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = *self.token.lock().unwrap();
        let frame = encode_frame(&Request { id, session, token, op }).map_err(|e| Failure::Link(e.to_string()))?;
        let (tx, rx) = channel();
        {
            let mut g = self.waiters.lock().unwrap();
            if let Some(why) = &g.1 {
                return Err(Failure::Link(why.clone()));
            }
            g.0.insert(id, tx);
        }
        if let Err(e) = self.writer.lock().unwrap().write_all(&frame) {
            self.waiters.lock().unwrap().0.remove(&id);
            return Err(Failure::Link(format!("writing to {}: {e}", self.what)));
        }
        match rx.recv_timeout(TIMEOUT) {
            Ok(resp) => resp.result.map_err(Failure::Hsm),
            Err(_) => {
                self.waiters.lock().unwrap().0.remove(&id);
                Err(Failure::Link(match self.broken() {
                    Some(why) => why,
                    None => format!("DomC did not answer within {} s", TIMEOUT.as_secs()),
                }))
            }
        }
    }
}
