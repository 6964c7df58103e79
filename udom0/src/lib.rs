//! Udom0 core: the tenant's admin domain, sans-IO.
//!
//! Udom0 is the tenant's TLS endpoint inside its meta-domain. The tenant
//! reaches it through the builder's relay (which sees only ciphertext),
//! asks it to attest the meta-domain, verifies the evidence itself and only
//! then hands it secrets: volume keys, which Udom0 passes to each storage
//! SD over a link the builder wires but does not read, and the chain
//! policy (grants), which Udom0 asks the builder for one by one. This
//! crate is the state machine: feed it the tenant's TLS bytes
//! ([`Udom0::tenant_bytes`]) and the answers of the builder and the SDs
//! ([`Udom0::reply`]); it returns [`Action`]s for the image to carry out. The image crate
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
    Binding, EXPORTER_LABEL, EXPORTER_LEN, Evidence, GrantRequest, ProvisionKey, TenantMsg, Udom0Msg, encode_frame,
    take_frame,
};

pub use tls::{TlsEndpoint, TlsError, TlsSession};

/// What the image must do. Requests carry an `id` the core chose; the
/// image sends them as envelopes with that request id and hands the
/// answers back to [`Udom0::reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these TLS bytes to the tenant (on the `tls` link).
    ToTenant(Vec<u8>),
    /// Ask the builder for a quote with this qualifying data
    /// (`Body::QuoteRequest` on the control link).
    RequestQuote { id: u64, qualifying_data: Vec<u8> },
    /// Ask the builder for one grant (`Body::Grant`).
    RequestGrant { id: u64, grant: GrantRequest },
    /// Ask the builder to start the client VMs (`Body::LaunchClients`).
    RequestLaunch { id: u64 },
    /// Key an SD (`Body::ConfigureVolume` on the key link to `key.domain`).
    KeySd { id: u64, key: ProvisionKey },
    /// A line for the console log (never a secret).
    Log(String),
}

/// An answer to one of the core's requests, from the builder or an SD.
#[derive(Clone, Copy, Debug)]
pub enum Reply<'a> {
    Ack,
    /// `postcard` of [`Evidence`] (`Body::QuoteEvidence`).
    Evidence(&'a [u8]),
    Error(&'a str),
}

/// The tenant request being carried out (one at a time).
enum Pending {
    Quote {
        id: u64,
        binding: Binding,
    },
    /// Requests out to SDs (keys: each names its SD) or the builder
    /// (grants: each describes the grant), and what came back.
    Batch {
        kind: Batch,
        waiting: Vec<(u64, String)>,
        done: u32,
        refused: Vec<String>,
    },
    Launch {
        id: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Batch {
    Keys,
    Grants,
}

/// Udom0's state.
pub struct Udom0 {
    endpoint: TlsEndpoint,
    session: Option<TlsSession>,
    inbox: Vec<u8>,
    pending: Option<Pending>,
    next_id: u64,
    /// The SDs the builder wired a key link to (`key.<domain>`).
    key_links: Vec<String>,
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
            next_id: 1 << 32,
            key_links: Vec::new(),
            keys: Vec::new(),
            attestations: 0,
        })
    }

    /// The SDs Udom0 has a key link to (from its command line).
    pub fn set_key_links(&mut self, domains: Vec<String>) {
        self.key_links = domains;
    }

    /// Udom0's TLS public key (SubjectPublicKeyInfo DER).
    pub fn spki(&self) -> &[u8] {
        self.endpoint.spki()
    }

    /// Keys the SDs took, by domain and purpose (no key bytes).
    pub fn key_names(&self) -> Vec<(String, String)> {
        self.keys.iter().map(|k| (k.domain.clone(), k.purpose.clone())).collect()
    }

    /// The key an SD took for `domain` and `purpose`.
    pub fn key(&self, domain: &str, purpose: &str) -> Option<&[u8]> {
        self.keys.iter().find(|k| k.domain == domain && k.purpose == purpose).map(|k| k.key.as_slice())
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
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
                    Ok(msg) if self.pending.is_some() => {
                        let what = alloc::format!("{msg:?}");
                        let what = what.split([' ', '{']).next().unwrap_or_default();
                        let message = alloc::format!("`{what}` while the previous request is still being served");
                        self.reply_tenant(&Udom0Msg::Error { message }, &mut actions);
                    }
                    Ok(msg) => self.tenant_msg(msg, &mut actions),
                    Err(e) => self.reply_tenant(
                        &Udom0Msg::Error { message: alloc::format!("malformed request: {e}") },
                        &mut actions,
                    ),
                },
                Ok(None) => break,
                Err(e) => {
                    self.reply_tenant(&Udom0Msg::Error { message: alloc::format!("{e}") }, &mut actions);
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
                    self.reply_tenant(&Udom0Msg::Error { message: alloc::format!("{e}") }, actions);
                    return;
                }
                let binding = Binding { nonce, exporter, udom0_spki: self.spki().to_vec() };
                let qualifying_data = verify::qualifying_data(&binding);
                let id = self.id();
                self.pending = Some(Pending::Quote { id, binding });
                actions.push(Action::Log("tenant asked for attestation: quoting".into()));
                actions.push(Action::RequestQuote { id, qualifying_data });
            }
            TenantMsg::Provision { keys } => self.provision(keys, actions),
            TenantMsg::Grant { grants } => {
                if grants.is_empty() {
                    self.reply_tenant(&Udom0Msg::Granted { grants: 0 }, actions);
                    return;
                }
                let mut waiting = Vec::new();
                for grant in grants {
                    let id = self.id();
                    actions.push(Action::Log(alloc::format!(
                        "asking the builder: grant `{}` {} over `{}`",
                        grant.sd,
                        grant.permission,
                        grant.client
                    )));
                    waiting.push((id, alloc::format!("`{}` {} over `{}`", grant.sd, grant.permission, grant.client)));
                    actions.push(Action::RequestGrant { id, grant });
                }
                self.pending = Some(Pending::Batch { kind: Batch::Grants, waiting, done: 0, refused: Vec::new() });
            }
            TenantMsg::Launch => {
                let id = self.id();
                self.pending = Some(Pending::Launch { id });
                actions.push(Action::Log("tenant asked to launch the client VMs".into()));
                actions.push(Action::RequestLaunch { id });
            }
            TenantMsg::Status => {
                let msg = Udom0Msg::Status { attestations: self.attestations, keys: self.key_names() };
                self.reply_tenant(&msg, actions);
            }
        }
    }

    /// Checks every key first, so a bad request keys no SD at all.
    fn provision(&mut self, keys: Vec<ProvisionKey>, actions: &mut Vec<Action>) {
        let problem = keys.iter().find_map(|k| {
            if !self.key_links.contains(&k.domain) {
                Some(alloc::format!(
                    "no key link to `{}`: the SDs of this meta-domain that take keys from Udom0 are {:?}",
                    k.domain,
                    self.key_links
                ))
            } else if k.purpose != "volume" || k.volume.is_none() {
                Some(alloc::format!(
                    "key `{}` for `{}`: Udom0 provisions volume keys (purpose `volume`, with the volume's layout)",
                    k.purpose,
                    k.domain
                ))
            } else {
                None
            }
        });
        if let Some(message) = problem {
            self.reply_tenant(&Udom0Msg::Error { message }, actions);
            return;
        }
        if keys.is_empty() {
            self.reply_tenant(&Udom0Msg::Provisioned { keys: 0 }, actions);
            return;
        }
        let mut waiting = Vec::new();
        for k in keys {
            let id = self.id();
            actions.push(Action::Log(alloc::format!(
                "keying `{}`: a {}-byte `{}` key from the tenant",
                k.domain,
                k.key.len(),
                k.purpose
            )));
            waiting.push((id, k.domain.clone()));
            self.keys.retain(|old| !(old.domain == k.domain && old.purpose == k.purpose));
            self.keys.push(k.clone());
            actions.push(Action::KeySd { id, key: k });
        }
        self.pending = Some(Pending::Batch { kind: Batch::Keys, waiting, done: 0, refused: Vec::new() });
    }

    /// The builder's or an SD's answer to request `id`.
    pub fn reply(&mut self, id: u64, reply: Reply<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        let answer = match self.pending.take() {
            Some(Pending::Quote { id: want, binding }) if want == id => Some(match reply {
                Reply::Evidence(bytes) => match postcard::from_bytes::<Evidence>(bytes) {
                    Ok(evidence) => {
                        self.attestations += 1;
                        actions.push(Action::Log(alloc::format!(
                            "evidence for the tenant: vTPM quote, host quote, {}-byte event log",
                            evidence.event_log.len()
                        )));
                        Udom0Msg::Evidence { binding, evidence: alloc::boxed::Box::new(evidence) }
                    }
                    Err(e) => Udom0Msg::Error { message: alloc::format!("the builder's evidence is malformed: {e}") },
                },
                Reply::Error(m) => Udom0Msg::Error { message: alloc::format!("the builder could not quote: {m}") },
                Reply::Ack => Udom0Msg::Error { message: "the builder answered a quote request with no quote".into() },
            }),
            Some(Pending::Batch { kind, mut waiting, mut done, mut refused })
                if waiting.iter().any(|(w, _)| *w == id) =>
            {
                let i = waiting.iter().position(|(w, _)| *w == id).expect("checked");
                let (_, what) = waiting.remove(i);
                match (reply, kind) {
                    (Reply::Ack, Batch::Keys) => {
                        actions.push(Action::Log(alloc::format!("`{what}` took its key")));
                        done += 1;
                    }
                    (Reply::Ack, Batch::Grants) => done += 1,
                    (other, _) => {
                        let m = match other {
                            Reply::Error(m) => String::from(m),
                            _ => String::from("an unexpected answer"),
                        };
                        if kind == Batch::Keys {
                            let refusal = alloc::format!("`{what}` refused its key: {m}");
                            actions.push(Action::Log(refusal.clone()));
                            self.keys.retain(|k| k.domain != what);
                            refused.push(refusal);
                        } else {
                            refused.push(m);
                        }
                    }
                }
                if !waiting.is_empty() {
                    self.pending = Some(Pending::Batch { kind, waiting, done, refused });
                    None
                } else if !refused.is_empty() {
                    let message = match kind {
                        Batch::Keys => refused.join("; "),
                        Batch::Grants => alloc::format!("the builder refused: {}", refused.join("; ")),
                    };
                    Some(Udom0Msg::Error { message })
                } else {
                    Some(match kind {
                        Batch::Keys => Udom0Msg::Provisioned { keys: done },
                        Batch::Grants => Udom0Msg::Granted { grants: done },
                    })
                }
            }
            Some(Pending::Launch { id: want }) if want == id => Some(match reply {
                Reply::Ack => Udom0Msg::Launched,
                Reply::Error(m) => Udom0Msg::Error { message: alloc::format!("the builder did not launch: {m}") },
                Reply::Evidence(_) => Udom0Msg::Error { message: "unexpected answer to the launch".into() },
            }),
            other => {
                self.pending = other;
                actions.push(Action::Log(alloc::format!("an answer to request {id}, which is not pending; dropped")));
                None
            }
        };
        if let Some(msg) = answer {
            self.reply_tenant(&msg, &mut actions);
            self.flush(&mut actions);
        }
        actions
    }

    fn reply_tenant(&mut self, msg: &Udom0Msg, actions: &mut Vec<Action>) {
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
