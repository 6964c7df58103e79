//! Udom0 core: the tenant's admin domain, sans-IO.
//!
//! Udom0 is the tenant's TLS endpoint inside its meta-domain. The tenant
//! reaches it through the builder's relay (which sees only ciphertext),
//! asks it to attest the meta-domain, verifies the evidence itself and only
//! then hands it secrets. This crate is the state machine: feed it the
//! tenant's TLS bytes ([`Udom0::tenant_bytes`]) and the builder's answers
//! ([`Udom0::quote_evidence`], [`Udom0::quote_failed`]); it returns
//! [`Action`]s for the image to carry out. The image crate
//! (`kernels/udom0`) wires it to its links; the tenant's verifier is
//! [`verify`], which `ssc attest` runs.
//!
//! Modules: [`tls`] (rustls server, exporter), [`tpm`] (quote structures),
//! [`eventlog`] (TCG event log), [`verify`] (the tenant's checks).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod eventlog;
pub mod tls;
pub mod tpm;
pub mod verify;

use alloc::string::String;
use alloc::vec::Vec;

use ssc_abi::attest::{
    Binding, EXPORTER_LABEL, EXPORTER_LEN, Evidence, ProvisionKey, TenantMsg, Udom0Msg, encode_frame, take_frame,
};

pub use tls::{TlsEndpoint, TlsError, TlsSession};

/// What the image must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these TLS bytes to the tenant (on the `tls` link).
    ToTenant(Vec<u8>),
    /// Ask the builder for a quote with this qualifying data.
    RequestQuote { qualifying_data: Vec<u8> },
    /// A line for the console log (never a secret).
    Log(String),
}

/// Udom0's state.
pub struct Udom0 {
    endpoint: TlsEndpoint,
    session: Option<TlsSession>,
    inbox: Vec<u8>,
    /// The binding of the quote the builder is producing.
    pending: Option<Binding>,
    keys: Vec<ProvisionKey>,
    pub attestations: u64,
}

impl Udom0 {
    /// Generates Udom0's TLS key; `unix_time` is the builder's clock.
    pub fn new(unix_time: u64) -> Result<Self, TlsError> {
        Ok(Udom0 {
            endpoint: TlsEndpoint::generate(unix_time)?,
            session: None,
            inbox: Vec::new(),
            pending: None,
            keys: Vec::new(),
            attestations: 0,
        })
    }

    /// Udom0's TLS public key (SubjectPublicKeyInfo DER).
    pub fn spki(&self) -> &[u8] {
        self.endpoint.spki()
    }

    /// Keys the tenant provisioned, by domain and purpose (no key bytes).
    pub fn key_names(&self) -> Vec<(String, String)> {
        self.keys.iter().map(|k| (k.domain.clone(), k.purpose.clone())).collect()
    }

    /// The key the tenant provisioned for `domain` and `purpose`.
    pub fn key(&self, domain: &str, purpose: &str) -> Option<&[u8]> {
        self.keys.iter().find(|k| k.domain == domain && k.purpose == purpose).map(|k| k.key.as_slice())
    }

    /// A new tenant connection: the previous session, if any, is dropped.
    pub fn tenant_connected(&mut self) -> Vec<Action> {
        self.inbox.clear();
        self.pending = None;
        match self.endpoint.accept() {
            Ok(s) => {
                self.session = Some(s);
                alloc::vec![Action::Log("tenant connected: TLS handshake starts".into())]
            }
            Err(e) => {
                self.session = None;
                alloc::vec![Action::Log(alloc::format!("tenant connection refused: {e}"))]
            }
        }
    }

    /// TLS bytes from the tenant.
    pub fn tenant_bytes(&mut self, bytes: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(session) = self.session.as_mut() else {
            actions.push(Action::Log(alloc::format!("{} bytes from no tenant session; dropped", bytes.len())));
            return actions;
        };
        let was_established = session.is_established();
        if let Err(e) = session.feed(bytes) {
            let out = session.take_outgoing();
            if !out.is_empty() {
                actions.push(Action::ToTenant(out));
            }
            actions.push(Action::Log(alloc::format!("tenant session ended: {e}")));
            self.session = None;
            return actions;
        }
        if !was_established && session.is_established() {
            actions.push(Action::Log("tenant TLS 1.3 session established".into()));
        }
        self.inbox.extend_from_slice(&session.take_plaintext());
        loop {
            match take_frame(&mut self.inbox) {
                Ok(Some(frame)) => match postcard::from_bytes::<TenantMsg>(&frame) {
                    Ok(msg) => self.tenant_msg(msg, &mut actions),
                    Err(e) => {
                        self.reply(&Udom0Msg::Error { message: alloc::format!("malformed request: {e}") }, &mut actions)
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    self.reply(&Udom0Msg::Error { message: alloc::format!("{e}") }, &mut actions);
                    self.inbox.clear();
                    break;
                }
            }
        }
        self.flush(&mut actions);
        actions
    }

    fn tenant_msg(&mut self, msg: TenantMsg, actions: &mut Vec<Action>) {
        match msg {
            TenantMsg::Attest { nonce } => {
                let mut exporter = [0u8; EXPORTER_LEN];
                let Some(session) = self.session.as_ref() else { return };
                if let Err(e) = session.exporter(EXPORTER_LABEL, &mut exporter) {
                    self.reply(&Udom0Msg::Error { message: alloc::format!("{e}") }, actions);
                    return;
                }
                let binding = Binding { nonce, exporter, udom0_spki: self.spki().to_vec() };
                let qualifying_data = verify::qualifying_data(&binding);
                self.pending = Some(binding);
                actions.push(Action::Log("tenant asked for attestation: quoting".into()));
                actions.push(Action::RequestQuote { qualifying_data });
            }
            TenantMsg::Provision { keys } => {
                let n = keys.len() as u32;
                for k in keys {
                    actions.push(Action::Log(alloc::format!(
                        "tenant provisioned a {}-byte `{}` key for `{}`",
                        k.key.len(),
                        k.purpose,
                        k.domain
                    )));
                    self.keys.retain(|old| !(old.domain == k.domain && old.purpose == k.purpose));
                    self.keys.push(k);
                }
                self.reply(&Udom0Msg::Provisioned { keys: n }, actions);
            }
            TenantMsg::Status => {
                let msg = Udom0Msg::Status { attestations: self.attestations, keys: self.key_names() };
                self.reply(&msg, actions);
            }
        }
    }

    /// The builder's evidence for the pending quote.
    pub fn quote_evidence(&mut self, evidence: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(binding) = self.pending.take() else {
            actions.push(Action::Log("evidence arrived with no quote pending; dropped".into()));
            return actions;
        };
        match postcard::from_bytes::<Evidence>(evidence) {
            Ok(evidence) => {
                self.attestations += 1;
                actions.push(Action::Log(alloc::format!(
                    "evidence for the tenant: vTPM quote, host quote, {}-byte event log",
                    evidence.event_log.len()
                )));
                self.reply(&Udom0Msg::Evidence { binding, evidence: alloc::boxed::Box::new(evidence) }, &mut actions);
            }
            Err(e) => {
                self.reply(
                    &Udom0Msg::Error { message: alloc::format!("the builder's evidence is malformed: {e}") },
                    &mut actions,
                );
            }
        }
        self.flush(&mut actions);
        actions
    }

    /// The builder could not quote.
    pub fn quote_failed(&mut self, message: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        self.pending = None;
        self.reply(
            &Udom0Msg::Error { message: alloc::format!("the builder could not quote: {message}") },
            &mut actions,
        );
        self.flush(&mut actions);
        actions
    }

    fn reply(&mut self, msg: &Udom0Msg, actions: &mut Vec<Action>) {
        let Some(session) = self.session.as_mut() else { return };
        let frame = match encode_frame(msg) {
            Ok(f) => f,
            Err(e) => {
                actions.push(Action::Log(alloc::format!("reply not encodable: {e}")));
                return;
            }
        };
        if let Err(e) = session.send(&frame) {
            actions.push(Action::Log(alloc::format!("tenant session ended: {e}")));
            self.session = None;
        }
    }

    fn flush(&mut self, actions: &mut Vec<Action>) {
        if let Some(s) = self.session.as_mut() {
            let out = s.take_outgoing();
            if !out.is_empty() {
                actions.push(Action::ToTenant(out));
            }
        }
    }
}

#[cfg(test)]
mod tests;
