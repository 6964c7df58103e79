//! The image's end of its control link (`ctl`): frames of the shared ABI
//! (`ssc-abi`) over a virtio-serial port. Bytes read from the port wait in
//! `pending` until the decoder, which holds one frame at a time, takes them,
//! so pipelined frames are never lost.

use alloc::vec::Vec;
use core::time::Duration;

use alloc::string::ToString;
use ssc_abi::{Body, Envelope, ErrorCode, FrameDecoder, FrameError};

use crate::clock::Instant;
use crate::vserial::{PortId, SerialError, VirtioSerial};

/// Name of the control port the builder attaches to every domain.
pub const PORT: &str = "ctl";

/// A control-link failure.
#[derive(Debug)]
pub enum ControlError {
    Serial(SerialError),
    Frame(FrameError),
    Timeout(Duration),
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::Serial(e) => write!(f, "control link: {e}"),
            ControlError::Frame(e) => write!(f, "control link: {e}"),
            ControlError::Timeout(t) => {
                write!(f, "control link: nothing from the builder within {t:?}")
            }
        }
    }
}

impl From<SerialError> for ControlError {
    fn from(e: SerialError) -> Self {
        ControlError::Serial(e)
    }
}

impl From<FrameError> for ControlError {
    fn from(e: FrameError) -> Self {
        ControlError::Frame(e)
    }
}

/// The control link of this image.
pub struct ControlLink {
    port: PortId,
    dec: FrameDecoder,
    pending: Vec<u8>,
}

impl ControlLink {
    /// Opens the `ctl` port and introduces the image with a Hello frame.
    pub fn open(serial: &mut VirtioSerial, image: &str, version: &str, wait: Duration) -> Result<Self, ControlError> {
        let port = serial.open(PORT, wait)?;
        let link = ControlLink { port, dec: FrameDecoder::new(), pending: Vec::new() };
        link.send(serial, &Envelope::new(0, Body::Hello { image, version }))?;
        Ok(link)
    }

    /// Opens another port that carries ABI frames (a link between two
    /// domains, such as Udom0's key link to an SD), without the Hello the
    /// builder expects on `ctl`.
    pub fn attach(serial: &mut VirtioSerial, port: &str, wait: Duration) -> Result<Self, ControlError> {
        let port = serial.open(port, wait)?;
        Ok(ControlLink { port, dec: FrameDecoder::new(), pending: Vec::new() })
    }

    /// Sends one envelope.
    pub fn send(&self, serial: &mut VirtioSerial, env: &Envelope) -> Result<(), ControlError> {
        serial.write_all(self.port, &env.to_frame()?)?;
        Ok(())
    }

    /// Waits until the builder has taken everything sent so far.
    pub fn flush(&self, serial: &mut VirtioSerial) -> Result<(), ControlError> {
        Ok(serial.flush(self.port)?)
    }

    /// Logs the standard ready line and sends a Ready frame.
    pub fn ready(&self, serial: &mut VirtioSerial, image: &str) -> Result<(), ControlError> {
        crate::ready(image);
        let boot_us = crate::clock::since_boot().as_micros() as u64;
        self.send(serial, &Envelope::new(0, Body::Ready { image, boot_us }))
    }

    /// The next complete payload if one has arrived; never waits.
    pub fn poll(&mut self, serial: &mut VirtioSerial) -> Result<Option<Vec<u8>>, ControlError> {
        let mut buf = [0u8; 512];
        loop {
            let used = self.dec.feed(&self.pending);
            self.pending.drain(..used);
            if let Some(p) = self.dec.next_payload()? {
                return Ok(Some(p));
            }
            let n = serial.read(self.port, &mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Answers what every image answers alike: a payload that does not
    /// decode is refused with a `Malformed` error, a `Ping` gets its
    /// `Pong`. Anything else is a request for the image: its envelope.
    pub fn triage<'p>(
        &self,
        serial: &mut VirtioSerial,
        payload: &'p [u8],
    ) -> Result<Option<Envelope<'p>>, ControlError> {
        match Envelope::decode(payload) {
            Err(e) => {
                let message = e.to_string();
                self.send(serial, &Envelope::new(0, Body::Error { code: ErrorCode::Malformed, message: &message }))?;
                Ok(None)
            }
            Ok(Envelope { request_id, body: Body::Ping { payload }, .. }) => {
                self.send(serial, &Envelope::new(request_id, Body::Pong { payload }))?;
                Ok(None)
            }
            Ok(env) => Ok(Some(env)),
        }
    }

    /// The next payload, waiting up to `timeout` (forever if `None`).
    pub fn next(&mut self, serial: &mut VirtioSerial, timeout: Option<Duration>) -> Result<Vec<u8>, ControlError> {
        let start = Instant::now();
        loop {
            if let Some(p) = self.poll(serial)? {
                return Ok(p);
            }
            if let Some(t) = timeout
                && start.elapsed() > t
            {
                return Err(ControlError::Timeout(t));
            }
            core::hint::spin_loop();
        }
    }
}
