//! DomC, the tenant's virtual HSM service domain.
//!
//! The client VM's PKCS#11 module talks to it over the data link `hsm`
//! (a virtio-serial port that the client sees as
//! `/dev/virtio-ports/ssc-hsm`), in HSM frames (`ssc_abi::hsm`); the tenant
//! sets the PIN, imports keys and reads the audit log over the control link
//! (`HsmAdmin`). Keys live only here: the client gets signatures,
//! ciphertexts and public keys, never a private key. Every operation goes
//! into the `sd-hsm` core's hash-chained audit log.
//!
//! Requests are served in arrival order, one at a time (one vCPU); several
//! PKCS#11 sessions may have requests in flight on the link. Garbage on the
//! link is skipped up to the next frame's magic and counted in the log.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::time::Duration;

use runtime::clock::since_boot;
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::{PortId, VirtioSerial};
use runtime::{Boot, ImageResult, bail};
use sd_hsm::Hsm;
use ssc_abi::hsm::{HsmDecoder, MAGIC, MAX_FRAME};
use ssc_abi::{Body, Envelope, ErrorCode};

runtime::entry!(main);

const IMAGE: &str = "domc";
/// The data link to the client.
const HSM_PORT: &str = "hsm";
/// While more replies than this wait for the client, no requests are read.
const MAX_PENDING_OUT: usize = 1 << 20;

/// The client link: what arrived, what waits to be sent.
struct Link {
    port: PortId,
    decoder: HsmDecoder,
    out: Vec<u8>,
    sent: usize,
    reported_skips: u64,
}

fn main(mut boot: Boot) -> ImageResult {
    let Some(mut serial) = boot.platform.serial()? else {
        bail!("domc needs virtio-serial links (ctl, hsm)");
    };
    let mut ctl = ControlLink::open(&mut serial, IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    let port = serial
        .open(HSM_PORT, Duration::from_secs(2))
        .map_err(|e| runtime::ImageError(alloc::format!("client link `{HSM_PORT}`: {e}")))?;
    let label = boot.arg("ssc.hsm.label").unwrap_or("DomC");
    let mut serial_no = alloc::string::String::new();
    for b in sd_hsm::keys::random(8).map_err(|e| runtime::ImageError(alloc::format!("{e}")))? {
        serial_no.push_str(&alloc::format!("{b:02x}"));
    }
    let mut hsm = Hsm::new(label, &serial_no);
    let mut link = Link { port, decoder: HsmDecoder::new(), out: Vec::new(), sent: 0, reported_skips: 0 };
    ctl.ready(&mut serial, IMAGE)?;
    info!(target: IMAGE, "token `{label}` serial {serial_no}: waiting for the tenant's PIN and keys on the control link");
    let mut buf = alloc::vec![0u8; 64 * 1024];
    loop {
        if let Some(payload) = ctl.poll(&mut serial)?
            && let Some(env) = ctl.triage(&mut serial, &payload)?
        {
            let id = env.request_id;
            match env.body {
                Body::Shutdown => {
                    let s = hsm.stats;
                    info!(
                        target: IMAGE,
                        "Shutdown: {} requests ({} refused, {} malformed), {} audit entries, {} keys",
                        s.requests,
                        s.refused,
                        s.malformed,
                        hsm.audit.len(),
                        hsm.key_count()
                    );
                    return Ok(());
                }
                Body::HsmAdmin { request } => {
                    let reply = hsm.admin_frame(request, now_ms());
                    ctl.send(&mut serial, &Envelope::new(id, Body::HsmAdminReply { reply: &reply }))?;
                }
                other => {
                    let message = alloc::format!("{IMAGE} does not serve {other:?}");
                    warn!(target: IMAGE, "request {id} refused: {message}");
                    let body = Body::Error { code: ErrorCode::Unsupported, message: &message };
                    ctl.send(&mut serial, &Envelope::new(id, body))?;
                }
            }
        }
        serve(&mut serial, &mut link, &mut hsm, &mut buf)?;
        core::hint::spin_loop();
    }
}

fn now_ms() -> u64 {
    since_boot().as_millis() as u64
}

/// Sends pending replies, reads requests, serves every complete one.
fn serve(serial: &mut VirtioSerial, link: &mut Link, hsm: &mut Hsm, buf: &mut [u8]) -> ImageResult {
    if link.sent < link.out.len() {
        link.sent += serial.try_write(link.port, &link.out[link.sent..])?;
        if link.sent == link.out.len() {
            link.out.clear();
            link.sent = 0;
        }
    }
    if link.out.len() - link.sent > MAX_PENDING_OUT {
        return Ok(());
    }
    let n = serial.read(link.port, buf)?;
    if n == 0 {
        return Ok(());
    }
    link.decoder.feed(&buf[..n]);
    while let Some(payload) = link.decoder.next_payload() {
        let reply = hsm.client_frame(&payload, now_ms());
        if reply.len() > MAX_FRAME {
            warn!(target: IMAGE, "a reply of {} bytes does not fit a frame; dropped", reply.len());
            continue;
        }
        link.out.extend_from_slice(&MAGIC);
        link.out.extend_from_slice(&(reply.len() as u32).to_le_bytes());
        link.out.extend_from_slice(&reply);
    }
    if link.decoder.skipped != link.reported_skips {
        warn!(
            target: IMAGE,
            "skipped {} bytes of garbage on the client link (not HSM frames)",
            link.decoder.skipped - link.reported_skips
        );
        link.reported_skips = link.decoder.skipped;
    }
    if link.sent < link.out.len() {
        link.sent += serial.try_write(link.port, &link.out[link.sent..])?;
        if link.sent == link.out.len() {
            link.out.clear();
            link.sent = 0;
        }
    }
    Ok(())
}
