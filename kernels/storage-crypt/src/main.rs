//! The storage encryption service domain.
//!
//! Upstream: an NBD server on the virtio-serial link `nbd` (the client VM's
//! QEMU, `qemu-io`, `nbdinfo`, or the previous SD of a chain connect to its
//! socket). Downstream: its own virtio-blk disk, the provider's volume,
//! which only ever receives ciphertext — or, in a chain, an NBD client on
//! the `down` link toward the next SD's export. The key and the data-segment parameters arrive on the control
//! link (`ConfigureVolume`); until then nothing is served. One NBD client at
//! a time; a new connection on the socket starts a new NBD session.
//!
//! The key is never logged; the log names the cipher, sector size and size.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::time::Duration;

use downstream::{Down, Serial};
use runtime::clock::Instant;
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::{PortId, VirtioSerial};
use runtime::{Boot, ImageResult, bail};
use sd_storage_crypt::auth::{self, AuthVolume};
use sd_storage_crypt::header::{HEADER_LEN, VolumeHeader};
use sd_storage_crypt::nbd::{Backend, Export, ProtocolError, Server};
use sd_storage_crypt::volume::{BlockDevice, Cipher, CryptVolume, Layout};
use sd_storage_crypt::xts::Xts;
use ssc_abi::{Body, Envelope, ErrorCode, VolumeConfig};

runtime::entry!(main);

const IMAGE: &str = "storage-crypt";
/// Name of the upstream link.
const NBD_PORT: &str = "nbd";
/// The key link from Udom0 (with `ssc.keyed_by=udom0`).
const UDOM0_PORT: &str = "udom0";
/// A served volume: either mode, plus what the authenticated mode reports.
trait Served: Backend {
    /// The durable generation (authenticated mode).
    fn generation(&self) -> Option<u64> {
        None
    }
    /// Sectors that failed authentication since the last call.
    fn take_failures(&mut self) -> Vec<u64> {
        Vec::new()
    }
}

impl Served for CryptVolume<Down> {}

impl Served for AuthVolume<Down> {
    fn generation(&self) -> Option<u64> {
        Some(AuthVolume::generation(self))
    }
    fn take_failures(&mut self) -> Vec<u64> {
        AuthVolume::take_failures(self)
    }
}

/// The configured volume and the NBD session on the upstream link.
struct Service {
    volume: alloc::boxed::Box<dyn Served>,
    /// Last generation reported on the control link.
    reported: Option<u64>,
    export: Export,
    session: Option<(u64, Server)>,
    /// Time this session spent serving requests (disk and crypto included)
    /// and handing replies to the link, for the log.
    serving: Duration,
    sending: Duration,
}

/// Builds the volume from a `ConfigureVolume`; the disk is only taken when
/// everything checks out, so a refused configuration can be retried.
fn open_volume(
    disk: &mut Option<Down>,
    cfg: &VolumeConfig,
) -> Result<(alloc::boxed::Box<dyn Served>, Export), (ErrorCode, alloc::string::String)> {
    let Some(device_size) = disk.as_ref().map(Down::size) else {
        return Err((ErrorCode::Denied, "the volume is already configured".into()));
    };
    let export = Export { name: cfg.export.into(), description: alloc::format!("{} volume", cfg.cipher) };
    if cfg.cipher == auth::CIPHER {
        // The authenticated mode always has its own header: the key, the
        // metadata's Merkle root and the generation are checked before
        // anything is served. The disk is only consumed on success.
        // A fresh salt per writable open: its sub-key seals what this open
        // writes, so a rolled-back volume never repeats a (key, nonce).
        let access = if cfg.read_only {
            auth::Access::ReadOnly
        } else {
            let mut salt = [0u8; 8];
            runtime::rng::fill(&mut salt)
                .map_err(|e| (ErrorCode::Internal, alloc::format!("no randomness for the open salt: {e}")))?;
            auth::Access::ReadWrite(auth::OpenSalt::from_random(salt))
        };
        let d = disk.take().expect("checked above");
        let d = match AuthVolume::open_or_return(d, cfg.key, cfg.min_generation, access) {
            Ok(v) => return Ok((alloc::boxed::Box::new(v), export)),
            Err((e, d)) => {
                *disk = Some(d);
                e
            }
        };
        let code = match d {
            auth::OpenError::Header(sd_storage_crypt::header::HeaderError::WrongKey) => ErrorCode::Denied,
            auth::OpenError::RolledBack { .. } | auth::OpenError::MetadataTampered | auth::OpenError::HeaderForged => {
                ErrorCode::Denied
            }
            auth::OpenError::Io => ErrorCode::Internal,
            _ => ErrorCode::Malformed,
        };
        return Err((code, d.to_string()));
    }
    let cipher = match cfg.cipher {
        "aes-xts-plain64" => {
            Cipher::XtsPlain64(Xts::new(cfg.key).map_err(|e| (ErrorCode::Malformed, e.to_string()))?.into())
        }
        "null" if cfg.key.is_empty() => Cipher::Null,
        "null" => return Err((ErrorCode::Malformed, "the null cipher takes no key".into())),
        other => {
            return Err((
                ErrorCode::Unsupported,
                alloc::format!("cipher `{other}` is not supported (aes-xts-plain64, aes-256-gcm, null)"),
            ));
        }
    };
    let mut layout = Layout {
        sector_size: cfg.sector_size,
        data_offset: cfg.data_offset,
        iv_offset: cfg.iv_offset,
        large_iv: cfg.large_iv,
    };
    if cfg.native_header {
        // The key is checked against the volume's own header before anything
        // is served: a wrong key is refused, never read as garbage.
        let mut sector0 = [0u8; HEADER_LEN];
        let d = disk.as_mut().expect("checked above");
        d.read_at(0, &mut sector0).map_err(|_| (ErrorCode::Internal, "cannot read the volume header".to_string()))?;
        let header = VolumeHeader::decode(&sector0).map_err(|e| (ErrorCode::Malformed, e.to_string()))?;
        header.verify_key(cfg.key).map_err(|e| (ErrorCode::Denied, e.to_string()))?;
        layout.sector_size = header.sector_size;
        layout.data_offset = header.data_offset;
    }
    layout.check(device_size).map_err(|e| (ErrorCode::Malformed, e.to_string()))?;
    let disk = disk.take().expect("checked above");
    let volume = CryptVolume::new(disk, cipher, layout, cfg.read_only).expect("layout checked");
    Ok((alloc::boxed::Box::new(volume), export))
}

/// Builds the service from a `ConfigureVolume`, whoever sent it.
fn configure(
    disk: &mut Option<Down>,
    cfg: &VolumeConfig,
    service: &mut Option<Service>,
) -> Result<(), (ErrorCode, String)> {
    match open_volume(disk, cfg) {
        Ok((volume, export)) => {
            info!(
                target: IMAGE,
                "volume configured: export `{}`, {}, {}-byte sectors, {} MiB{}",
                export.name,
                cfg.cipher,
                cfg.sector_size,
                volume.size() >> 20,
                if cfg.read_only { ", read-only" } else { "" }
            );
            *service = Some(Service {
                volume,
                reported: None,
                export,
                session: None,
                serving: Duration::ZERO,
                sending: Duration::ZERO,
            });
            Ok(())
        }
        Err((code, msg)) => {
            warn!(target: IMAGE, "ConfigureVolume refused: {msg}");
            Err((code, msg))
        }
    }
}

fn main(mut boot: Boot) -> ImageResult {
    let mut disks = boot.platform.block_devices()?;
    let Some(serial) = boot.platform.serial()? else {
        bail!("storage-crypt needs virtio-serial links (ctl, nbd)");
    };
    let serial: Serial = Rc::new(RefCell::new(serial));
    let mut ctl =
        ControlLink::open(&mut serial.borrow_mut(), IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    let nbd = serial
        .borrow_mut()
        .open(NBD_PORT, Duration::from_secs(2))
        .map_err(|e| runtime::ImageError(alloc::format!("upstream link: {e}")))?;
    // Downstream: the provider's disk, or in a chain the next SD's export.
    let down = Down::open(
        &mut disks,
        &serial,
        "storage-crypt needs its downstream: a volume (--disk FILE) or a `down` link to the next SD",
    )
    .map_err(runtime::ImageError)?;
    let what = down.describe();
    let mut disk = Some(down);
    // In an attested meta-domain the key comes from Udom0 over this link.
    let mut udom0 = match boot.arg("ssc.keyed_by") {
        Some("udom0") => Some(
            ControlLink::attach(&mut serial.borrow_mut(), UDOM0_PORT, Duration::from_secs(2))
                .map_err(|e| runtime::ImageError(alloc::format!("key link `{UDOM0_PORT}`: {e}")))?,
        ),
        _ => None,
    };
    ctl.ready(&mut serial.borrow_mut(), IMAGE)?;
    let from = if udom0.is_some() { "from Udom0 on the key link" } else { "on the control link" };
    info!(target: IMAGE, "downstream: {what}, {} MiB; waiting for ConfigureVolume {from}", disk.as_ref().map_or(0, |d| d.size() >> 20));

    let mut service: Option<Service> = None;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        loop {
            let polled = ctl.poll(&mut serial.borrow_mut())?;
            let Some(payload) = polled else { break };
            let Some(env) = ctl.triage(&mut serial.borrow_mut(), &payload)? else { continue };
            let id = env.request_id;
            let reply = match env.body {
                Body::Shutdown => {
                    if let Some(s) = service.as_mut() {
                        let _ = s.volume.flush();
                        report(&mut serial.borrow_mut(), &mut ctl, s)?;
                        ctl.flush(&mut serial.borrow_mut())?;
                    }
                    info!(target: IMAGE, "Shutdown: volume flushed, stopping");
                    return Ok(());
                }
                Body::ConfigureVolume(_) if udom0.is_some() => Err((
                    ErrorCode::Denied,
                    "this SD takes its key from Udom0 over its key link, not from the builder".to_string(),
                )),
                Body::ConfigureVolume(cfg) => configure(&mut disk, &cfg, &mut service),
                other => Err((ErrorCode::Unsupported, alloc::format!("{IMAGE} does not serve {other:?}"))),
            };
            match reply {
                Ok(()) => ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, Body::Ack))?,
                Err((code, message)) => {
                    ctl.send(&mut serial.borrow_mut(), &Envelope::new(id, Body::Error { code, message: &message }))?
                }
            }
        }
        // Udom0's key link (no serial borrow may be held across
        // `configure`: a `down` link reads through the same serial).
        let from_udom0 = match udom0.as_mut() {
            Some(link) => link.poll(&mut serial.borrow_mut())?,
            None => None,
        };
        if let (Some(link), Some(payload)) = (udom0.as_ref(), from_udom0) {
            let env = link.triage(&mut serial.borrow_mut(), &payload)?;
            if let Some(env) = env {
                let reply = match env.body {
                    Body::ConfigureVolume(cfg) => configure(&mut disk, &cfg, &mut service),
                    other => Err((
                        ErrorCode::Unsupported,
                        alloc::format!("{IMAGE} takes only its key from Udom0, not {other:?}"),
                    )),
                };
                let ok = reply.is_ok();
                let answer = match &reply {
                    Ok(()) => Envelope::new(env.request_id, Body::Ack),
                    Err((code, message)) => Envelope::new(env.request_id, Body::Error { code: *code, message }),
                };
                link.send(&mut serial.borrow_mut(), &answer)?;
                if ok {
                    info!(target: IMAGE, "keyed by Udom0 over the key link");
                    ctl.send(&mut serial.borrow_mut(), &Envelope::new(0, Body::Keyed { by: "udom0" }))?;
                }
            }
        }
        if let Some(s) = service.as_mut() {
            serve_nbd(&serial, nbd, s, &mut buf)?;
            report(&mut serial.borrow_mut(), &mut ctl, s)?;
        }
    }
}

/// Tells the tenant side about new durable generations and integrity
/// failures (authenticated mode), and logs the failures.
fn report(serial: &mut VirtioSerial, ctl: &mut ControlLink, s: &mut Service) -> ImageResult {
    for sector in s.volume.take_failures() {
        warn!(target: IMAGE, "integrity: sector {sector} failed authentication (tampered, or torn by a crash); the read got EIO");
        ctl.send(serial, &Envelope::new(0, Body::IntegrityFailure { sector }))?;
    }
    if let Some(g) = s.volume.generation()
        && s.reported != Some(g)
    {
        ctl.send(serial, &Envelope::new(0, Body::VolumeCommitted { generation: g }))?;
        s.reported = Some(g);
    }
    Ok(())
}

/// Moves bytes between the upstream link and the NBD session. Never blocks
/// on a write: NBD clients pipeline requests and may not read replies while
/// they are still sending. The session's reply queue is bounded
/// ([`sd_storage_crypt::nbd::MAX_QUEUED_OUTPUT`], one largest read reply)
/// and drops what was sent; while a request waits for room in it, no more
/// requests are read, so memory stays bounded however many reads a client
/// pipelines.
/// The serial device is borrowed only around link operations: serving a
/// request may use it too (a chain's downstream).
fn serve_nbd(serial: &Serial, port: PortId, s: &mut Service, buf: &mut [u8]) -> ImageResult {
    let connected = serial.borrow_mut().host_connected(port);
    let epoch = serial.borrow_mut().connections(port);
    let stale = s.session.as_ref().is_some_and(|(e, _)| *e != epoch);
    if (!connected || stale) && s.session.is_some() {
        let (_, old) = s.session.take().expect("checked");
        let st = old.stats();
        let _ = s.volume.flush();
        info!(
            target: IMAGE,
            "NBD client gone: {} reads ({} MiB), {} writes ({} MiB), {} errors; serving {} ms, sending {} ms",
            st.reads,
            st.bytes_read >> 20,
            st.writes,
            st.bytes_written >> 20,
            st.errors,
            s.serving.as_millis(),
            s.sending.as_millis()
        );
        s.serving = Duration::ZERO;
        s.sending = Duration::ZERO;
    }
    if connected && s.session.is_none() {
        s.session = Some((epoch, Server::new(s.export.clone())));
    }
    let Some((connection, server)) = s.session.as_mut() else { return Ok(()) };
    let t = Instant::now();
    while !server.output().is_empty() {
        let n = serial.borrow_mut().try_write(port, server.output())?;
        server.consume_output(n);
        if n == 0 {
            break;
        }
    }
    s.sending += t.elapsed();
    let t = Instant::now();
    let served = if server.closed().is_some() {
        return Ok(());
    } else if !server.wants_input() {
        // A request waits for reply room: serve it now if there is some.
        server.serve(&mut *s.volume)
    } else {
        // A write's payload is read exactly, into the buffer reserved for it.
        let want = server.input_wanted().min(buf.len());
        let n = serial.borrow_mut().read_connection(port, *connection, &mut buf[..want])?;
        if n == 0 {
            return Ok(());
        }
        server.receive(&buf[..n], &mut *s.volume)
    };
    s.serving += t.elapsed();
    match served {
        Ok(()) => {}
        Err(ProtocolError::ClientClosed) => info!(target: IMAGE, "NBD client disconnected cleanly"),
        Err(e) => warn!(target: IMAGE, "NBD session closed: {e}"),
    }
    Ok(())
}
