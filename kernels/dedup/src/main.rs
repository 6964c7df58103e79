//! The memory deduplication service domain.
//!
//! It sees each client of the tenant through a read-only memory window
//! (client i = window i, in the order the builder attached them). On
//! `DedupScan` it runs the `sd-dedup` core over all of them — only the
//! allocated extents the builder names are read — and streams the plan on
//! its control link: `Progress`, one `DedupClient` per client,
//! `DedupZeroRuns`, `DedupGroups`, then `DedupDone`. It never writes a
//! client's memory: applying the plan (punching zero pages out of the
//! memory files) is the builder's job, after it re-checks each page.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::ToString;
use alloc::vec::Vec;
use core::time::Duration;

use runtime::clock::Instant;
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::VirtioSerial;
use runtime::window::MemoryWindow;
use runtime::{Boot, ImageResult, bail};
use sd_dedup::{Client, Plan, wire};
use ssc_abi::{Body, Envelope, ErrorCode};

runtime::entry!(main);

const IMAGE: &str = "dedup";
/// Largest payload of a plan frame (the ABI allows 64 KiB in all).
const FRAME: usize = 48 * 1024;

fn main(mut boot: Boot) -> ImageResult {
    let windows = boot.platform.memory_windows()?;
    if windows.is_empty() {
        bail!("dedup needs the clients' memory windows (grants: --window FILE, one per client)");
    }
    let Some(mut serial) = boot.platform.serial()? else {
        bail!("dedup needs its control link");
    };
    let mut ctl = ControlLink::open(&mut serial, IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    ctl.ready(&mut serial, IMAGE)?;
    let mib: Vec<u64> = windows.iter().map(|w| w.len() >> 20).collect();
    info!(target: IMAGE, "{} client window(s) of {:?} MiB; waiting for DedupScan", windows.len(), mib);
    loop {
        let Some(payload) = ctl.poll(&mut serial)? else { continue };
        let Some(env) = ctl.triage(&mut serial, &payload)? else { continue };
        let id = env.request_id;
        let refused = match env.body {
            Body::Shutdown => {
                info!(target: IMAGE, "Shutdown");
                return Ok(());
            }
            Body::DedupScan { extents } => match wire::decode_extents(extents, windows.len()) {
                None => alloc::format!("extents are not client/offset/length triples for {} client(s)", windows.len()),
                Some(extents) => match scan(&mut serial, &ctl, id, &windows, extents) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
            },
            other => alloc::format!("{IMAGE} does not serve {other:?}"),
        };
        warn!(target: IMAGE, "request {id} refused: {refused}");
        ctl.send(&mut serial, &Envelope::new(id, Body::Error { code: ErrorCode::Malformed, message: &refused }))?;
    }
}

/// Scans and streams the plan; an `Err` is the refusal's message.
fn scan(
    serial: &mut VirtioSerial,
    ctl: &ControlLink,
    id: u64,
    windows: &[MemoryWindow],
    extents: Vec<Option<Vec<(u64, u64)>>>,
) -> Result<(), alloc::string::String> {
    let start = Instant::now();
    let clients: Vec<Client<'_>> =
        windows.iter().zip(extents).map(|(w, extents)| Client { memory: w, extents }).collect();
    let plan = {
        let mut progress = |done: u64, total: u64| {
            let _ = ctl.send(serial, &Envelope::new(id, Body::Progress { done, total }));
        };
        sd_dedup::scan(&clients, &mut progress).map_err(|e| e.to_string())?
    };
    let micros = start.elapsed().as_micros() as u64;
    send_plan(serial, ctl, id, &plan, micros).map_err(|e| alloc::format!("control link: {}", e.0))?;
    let read: u64 = plan.clients.iter().map(|c| c.pages_read).sum();
    info!(
        target: IMAGE,
        "scanned {} client(s), {read} pages read: {} duplicate pages in {} groups, {} allocated zero pages, {} changed during the scan; {} KiB to save, in {} ms",
        plan.clients.len(),
        plan.duplicate_pages(),
        plan.groups.len(),
        plan.clients.iter().map(|c| c.zero_allocated).sum::<u64>(),
        plan.changed,
        plan.bytes_saved() >> 10,
        micros / 1000
    );
    Ok(())
}

fn send_plan(serial: &mut VirtioSerial, ctl: &ControlLink, id: u64, plan: &Plan, micros: u64) -> ImageResult {
    for (i, c) in plan.clients.iter().enumerate() {
        let body = Body::DedupClient {
            client: i as u32,
            pages: c.pages,
            pages_read: c.pages_read,
            zero_pages: c.zero_pages,
            zero_allocated: c.zero_allocated,
            dup_within: c.dup_within,
            dup_across: c.dup_across,
        };
        ctl.send(serial, &Envelope::new(id, body))?;
    }
    for (i, runs) in plan.zero_runs.iter().enumerate() {
        for chunk in runs.chunks(FRAME / 16) {
            let runs = ssc_abi::pairs::encode(chunk.iter().copied());
            ctl.send(serial, &Envelope::new(id, Body::DedupZeroRuns { client: i as u32, runs: &runs }))?;
        }
    }
    for groups in wire::encode_groups(&plan.groups, FRAME) {
        ctl.send(serial, &Envelope::new(id, Body::DedupGroups { groups: &groups }))?;
    }
    let body = Body::DedupDone {
        groups: plan.groups.len() as u64,
        duplicate_pages: plan.duplicate_pages(),
        changed: plan.changed,
        micros,
    };
    ctl.send(serial, &Envelope::new(id, body))?;
    Ok(())
}
