//! Udom0, the tenant's admin domain.
//!
//! The tenant reaches Udom0's TLS 1.3 endpoint through the builder's
//! relay, which carries the bytes on the data link `tls` and sees only
//! ciphertext. Udom0's key is generated at boot. When the tenant asks for
//! attestation, Udom0 binds the tenant's nonce, this session's TLS exporter
//! value and its own key into the qualifying data of a quote it asks the
//! builder for on the control link (`QuoteRequest`), and passes the
//! builder's evidence back inside the session. The state machine is the
//! `udom0` core crate; this is its glue to the links.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::time::Duration;

use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::{Boot, ImageResult, bail};
use ssc_abi::{Body, Envelope, ErrorCode};
use udom0_core::{Action, Udom0};

runtime::entry!(main);

const IMAGE: &str = "udom0";
/// The data link the builder relays the tenant's TLS bytes on.
const TLS_PORT: &str = "tls";

fn main(mut boot: Boot) -> ImageResult {
    let Some(mut serial) = boot.platform.serial()? else {
        bail!("udom0 needs virtio-serial links (ctl, tls)");
    };
    let mut ctl = ControlLink::open(&mut serial, IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    let tls = serial
        .open(TLS_PORT, Duration::from_secs(2))
        .map_err(|e| runtime::ImageError(alloc::format!("tenant link `{TLS_PORT}`: {e}")))?;
    let unix_time = boot.arg("ssc.time").and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut udom0 = Udom0::new(unix_time).map_err(|e| runtime::ImageError(alloc::format!("{e}")))?;
    let mut fingerprint = alloc::string::String::new();
    for b in &udom0.spki()[udom0.spki().len() - 8..] {
        fingerprint.push_str(&alloc::format!("{b:02x}"));
    }
    ctl.ready(&mut serial, IMAGE)?;
    info!(target: IMAGE, "TLS 1.3 endpoint up, Ed25519 key …{fingerprint} generated at boot; waiting for the tenant");
    let mut quote_id: Option<u64> = None;
    let mut next_id = 1u64 << 32;
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
                Body::QuoteEvidence { evidence } if quote_id == Some(id) => {
                    quote_id = None;
                    actions.extend(udom0.quote_evidence(evidence));
                }
                Body::Error { message, .. } if quote_id == Some(id) => {
                    quote_id = None;
                    actions.extend(udom0.quote_failed(message));
                }
                other => {
                    let message = alloc::format!("{IMAGE} does not serve {other:?}");
                    warn!(target: IMAGE, "request {id} refused: {message}");
                    let body = Body::Error { code: ErrorCode::Unsupported, message: &message };
                    ctl.send(&mut serial, &Envelope::new(id, body))?;
                }
            }
        }
        let n = serial.read(tls, &mut buf)?;
        if n > 0 {
            actions.extend(udom0.tenant_bytes(&buf[..n]));
        }
        for a in actions {
            match a {
                Action::ToTenant(bytes) => serial.write_all(tls, &bytes)?,
                Action::RequestQuote { qualifying_data } => {
                    next_id += 1;
                    quote_id = Some(next_id);
                    ctl.send(
                        &mut serial,
                        &Envelope::new(next_id, Body::QuoteRequest { qualifying_data: &qualifying_data }),
                    )?;
                }
                Action::Log(line) => info!(target: IMAGE, "{line}"),
            }
        }
        core::hint::spin_loop();
    }
}
