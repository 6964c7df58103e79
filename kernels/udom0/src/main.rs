//! Udom0, the tenant's admin domain.
//!
//! The tenant reaches Udom0's TLS 1.3 endpoint through the builder's
//! relay, which carries the bytes on the data link `tls` and sees only
//! ciphertext. Udom0's key is generated at boot. When the tenant asks for
//! attestation, Udom0 binds the tenant's nonce, this session's TLS exporter
//! value and its own key into the qualifying data of a quote it asks the
//! builder for on the control link (`QuoteRequest`), and passes the
//! builder's evidence back inside the session. After verifying, the tenant
//! sends volume keys, which Udom0 passes to each storage SD over a key
//! link (`key.<domain>`) the builder wired but does not read, and the
//! chain's grants, which Udom0 asks the builder for. The state machine is the
//! `udom0` core crate; this is its glue to the links.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::{Boot, ImageResult, bail};
use ssc_abi::{Body, Envelope, ErrorCode};
use udom0_core::{Action, Reply, Udom0};

runtime::entry!(main);

const IMAGE: &str = "udom0";
/// The data link the builder relays the tenant's TLS bytes on.
const TLS_PORT: &str = "tls";
/// Prefix of the key links to SDs: `key.<domain>`, one per SD named in
/// `ssc.keys=` (comma-separated) on the command line.
const KEY_PORT: &str = "key.";

fn main(mut boot: Boot) -> ImageResult {
    let Some(mut serial) = boot.platform.serial()? else {
        bail!("udom0 needs virtio-serial links (ctl, tls)");
    };
    let mut ctl = ControlLink::open(&mut serial, IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    let tls = serial
        .open(TLS_PORT, Duration::from_secs(2))
        .map_err(|e| runtime::ImageError(alloc::format!("tenant link `{TLS_PORT}`: {e}")))?;
    let mut links: Vec<(String, ControlLink)> = Vec::new();
    for domain in boot.arg("ssc.keys").unwrap_or_default().split(',').filter(|d| !d.is_empty()) {
        let port = alloc::format!("{KEY_PORT}{domain}");
        let link = ControlLink::attach(&mut serial, &port, Duration::from_secs(2))
            .map_err(|e| runtime::ImageError(alloc::format!("key link `{port}`: {e}")))?;
        links.push((domain.into(), link));
    }
    let unix_time = boot.arg("ssc.time").and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut udom0 = Udom0::new(unix_time).map_err(|e| runtime::ImageError(alloc::format!("{e}")))?;
    udom0.set_key_links(links.iter().map(|(d, _)| d.clone()).collect());
    let mut fingerprint = String::new();
    for b in &udom0.spki()[udom0.spki().len() - 8..] {
        fingerprint.push_str(&alloc::format!("{b:02x}"));
    }
    ctl.ready(&mut serial, IMAGE)?;
    info!(target: IMAGE, "TLS 1.3 endpoint up, Ed25519 key …{fingerprint} generated at boot; key links to {} SD(s); waiting for the tenant", links.len());
    let mut buf = alloc::vec![0u8; 64 * 1024];
    loop {
        let mut actions = Vec::new();
        if let Some(payload) = ctl.poll(&mut serial)?
            && let Some(env) = ctl.triage(&mut serial, &payload)?
        {
            let id = env.request_id;
            match env.body {
                Body::Shutdown => {
                    info!(target: IMAGE, "Shutdown: {} attestation(s) served", udom0.attestations);
                    return Ok(());
                }
                Body::TenantConnected => {
                    actions.extend(udom0.tenant_connected());
                    ctl.send(&mut serial, &Envelope::new(id, Body::Ack))?;
                }
                Body::Ack => actions.extend(udom0.reply(id, Reply::Ack)),
                Body::QuoteEvidence { evidence } => actions.extend(udom0.reply(id, Reply::Evidence(evidence))),
                Body::Error { message, .. } => actions.extend(udom0.reply(id, Reply::Error(message))),
                other => {
                    let message = alloc::format!("{IMAGE} does not serve {other:?}");
                    warn!(target: IMAGE, "request {id} refused: {message}");
                    let body = Body::Error { code: ErrorCode::Unsupported, message: &message };
                    ctl.send(&mut serial, &Envelope::new(id, body))?;
                }
            }
        }
        for (domain, link) in links.iter_mut() {
            let Some(payload) = link.poll(&mut serial)? else { continue };
            match Envelope::decode(&payload) {
                Ok(Envelope { request_id, body: Body::Ack, .. }) => actions.extend(udom0.reply(request_id, Reply::Ack)),
                Ok(Envelope { request_id, body: Body::Error { message, .. }, .. }) => {
                    actions.extend(udom0.reply(request_id, Reply::Error(message)))
                }
                Ok(_) => {}
                Err(e) => warn!(target: IMAGE, "key link to `{domain}`: {e}"),
            }
        }
        let n = serial.read(tls, &mut buf)?;
        if n > 0 {
            actions.extend(udom0.tenant_bytes(&buf[..n]));
        }
        for a in actions {
            match a {
                Action::ToTenant(bytes) => serial.write_all(tls, &bytes)?,
                Action::RequestQuote { id, qualifying_data } => {
                    ctl.send(&mut serial, &Envelope::new(id, Body::QuoteRequest { qualifying_data: &qualifying_data }))?
                }
                Action::RequestGrant { id, grant } => {
                    let body = Body::Grant { sd: &grant.sd, client: &grant.client, permission: &grant.permission };
                    ctl.send(&mut serial, &Envelope::new(id, body))?
                }
                Action::RequestLaunch { id } => ctl.send(&mut serial, &Envelope::new(id, Body::LaunchClients))?,
                Action::KeySd { id, key } => {
                    let Some((_, link)) = links.iter().find(|(d, _)| *d == key.domain) else { continue };
                    let Some(v) = key.volume.as_ref() else { continue };
                    let cfg = v.config(&key.key);
                    link.send(&mut serial, &Envelope::new(id, Body::ConfigureVolume(cfg)))?
                }
                Action::Log(line) => info!(target: IMAGE, "{line}"),
            }
        }
        core::hint::spin_loop();
    }
}
