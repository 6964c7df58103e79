//! The syscall and kernel-integrity monitor service domain.
//!
//! It sees one Linux client through a read-only memory window. After
//! `IntrospectStart` (the client kernel's profile and the scan settings)
//! it looks for the kernel's VMCOREINFO until the client has booted far
//! enough, checks the build id against the profile, and then scans every
//! period with the `sd-introspect` core, sending what changed as
//! `MonitorEvent` frames on its control link. `IntrospectSnapshot` gets
//! the current processes and modules. It never writes the client.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::ToString;
use core::time::Duration;

use runtime::clock::{Instant, since_boot};
use runtime::control::ControlLink;
use runtime::log::{info, warn};
use runtime::vserial::VirtioSerial;
use runtime::window::MemoryWindow;
use runtime::{Boot, ImageResult, bail};
use sd_introspect::{AttachError, Config, Event, Monitor, Profile};
use ssc_abi::{Body, Envelope, ErrorCode};

runtime::entry!(main);

const IMAGE: &str = "introspect";
/// How often to look for VMCOREINFO while the client boots.
const ATTACH_RETRY: Duration = Duration::from_millis(500);

struct Scanning {
    monitor: Monitor,
    period: Duration,
    /// When the next scan is due (time since boot).
    next: Duration,
    /// Given up (attach failed for good): the reason was sent.
    stopped: bool,
}

fn main(mut boot: Boot) -> ImageResult {
    let windows = boot.platform.memory_windows()?;
    let [window] = windows.as_slice() else {
        bail!("introspect needs exactly one memory window, the client's (grant: --window FILE)");
    };
    let Some(mut serial) = boot.platform.serial()? else {
        bail!("introspect needs its control link");
    };
    let mut ctl = ControlLink::open(&mut serial, IMAGE, env!("CARGO_PKG_VERSION"), Duration::from_secs(2))?;
    ctl.ready(&mut serial, IMAGE)?;
    info!(target: IMAGE, "client window of {} MiB; waiting for IntrospectStart", window.len() >> 20);
    let mut scanning: Option<Scanning> = None;
    loop {
        if let Some(payload) = ctl.poll(&mut serial)?
            && let Some(env) = ctl.triage(&mut serial, &payload)?
        {
            let id = env.request_id;
            let reply = match env.body {
                Body::Shutdown => {
                    info!(target: IMAGE, "Shutdown");
                    return Ok(());
                }
                Body::IntrospectStart { profile, period_ms, text_slices, summary_every } => {
                    match start(profile, period_ms, text_slices, summary_every) {
                        Ok(s) => {
                            info!(
                                target: IMAGE,
                                "profile for {} ({} syscalls); scanning every {} ms once the client kernel is found",
                                s.monitor.profile.release,
                                s.monitor.profile.syscalls.len(),
                                period_ms
                            );
                            scanning = Some(s);
                            Ok(())
                        }
                        Err(e) => Err((ErrorCode::Malformed, e)),
                    }
                }
                Body::IntrospectSnapshot => match scanning.as_mut() {
                    Some(s) if s.monitor.attached() => match s.monitor.snapshot(window) {
                        Ok(ev) => {
                            send_event(&mut serial, &ctl, id, &ev)?;
                            continue;
                        }
                        Err(e) => Err((ErrorCode::Internal, e.to_string())),
                    },
                    _ => Err((ErrorCode::Unsupported, "not attached to the client kernel yet".to_string())),
                },
                other => Err((ErrorCode::Unsupported, alloc::format!("{IMAGE} does not serve {other:?}"))),
            };
            match reply {
                Ok(()) => ctl.send(&mut serial, &Envelope::new(id, Body::Ack))?,
                Err((code, message)) => {
                    warn!(target: IMAGE, "request {id} refused: {message}");
                    ctl.send(&mut serial, &Envelope::new(id, Body::Error { code, message: &message }))?;
                }
            }
        }
        if let Some(s) = scanning.as_mut()
            && !s.stopped
            && since_boot() >= s.next
        {
            tick(&mut serial, &ctl, s, window)?;
        }
        core::hint::spin_loop();
    }
}

fn start(
    profile: &[u8],
    period_ms: u32,
    text_slices: u32,
    summary_every: u32,
) -> Result<Scanning, alloc::string::String> {
    let profile = Profile::decode(profile).map_err(|e| e.to_string())?;
    if !(10..=60_000).contains(&period_ms) {
        return Err(alloc::format!("period {period_ms} ms: between 10 ms and 60 s"));
    }
    let config = Config::new(&profile, text_slices, summary_every);
    Ok(Scanning {
        monitor: Monitor::new(profile, config),
        period: Duration::from_millis(period_ms as u64),
        next: Duration::ZERO,
        stopped: false,
    })
}

/// One due scan (or attach attempt); schedules the next.
fn tick(serial: &mut VirtioSerial, ctl: &ControlLink, s: &mut Scanning, window: &MemoryWindow) -> ImageResult {
    let (start, due) = (Instant::now(), since_boot());
    if s.monitor.attached() {
        let events = s.monitor.scan(window);
        s.monitor.note_scan_micros(start.elapsed().as_micros() as u64);
        for ev in &events {
            send_event(serial, ctl, 0, ev)?;
        }
        s.next = due + s.period;
        return Ok(());
    }
    match s.monitor.attach(window) {
        Ok(events) => {
            if let Some(Event::Attached { release, slide, processes, modules, .. }) = events.first() {
                info!(
                    target: IMAGE,
                    "attached to {release}: KASLR slide {slide:#x}, {processes} processes, {modules} modules ({} ms)",
                    start.elapsed().as_millis()
                );
            }
            for ev in &events {
                send_event(serial, ctl, 0, ev)?;
            }
            s.next = due + s.period;
        }
        Err(AttachError::NoVmcoreInfo | AttachError::Busy(_)) => s.next = due + ATTACH_RETRY,
        Err(e) => {
            let reason = e.to_string();
            warn!(target: IMAGE, "cannot monitor the client: {reason}");
            send_event(serial, ctl, 0, &Event::AttachFailed { reason })?;
            s.stopped = true;
        }
    }
    Ok(())
}

fn send_event(serial: &mut VirtioSerial, ctl: &ControlLink, id: u64, ev: &Event) -> ImageResult {
    let bytes = ev.encode();
    if bytes.len() > ssc_abi::MAX_PAYLOAD - 64 {
        warn!(target: IMAGE, "an event of {} bytes does not fit a frame; dropped", bytes.len());
        return Ok(());
    }
    ctl.send(serial, &Envelope::new(id, Body::MonitorEvent { event: &bytes }))?;
    Ok(())
}
