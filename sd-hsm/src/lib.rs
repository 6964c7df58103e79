//! DomC's core: a key store behind the HSM RPC of `ssc_abi::hsm`.
//!
//! Sans-IO: the image hands it request payloads from the client's data link
//! ([`Hsm::client_frame`]) and the tenant's admin requests from the control
//! link ([`Hsm::admin`]), with the time; it returns the reply bytes. It
//! never blocks and holds no device.
//!
//! * Keys: ECDSA P-256/P-384 and Ed25519 (generated inside or imported),
//!   RSA 2048–4096 (imported; PKCS#1 v1.5 and PSS signing), AES-256 (GCM
//!   encrypt/decrypt, and wrapping other keys so they leave only sealed).
//!   Secrets never appear in a reply, a log line or the audit log.
//! * Policy: each key has a [`Usage`] (allowed operations, an optional
//!   rate limit per second, and whether it is extractable); the client must
//!   log in with the user PIN the tenant set; the login belongs to the
//!   application that made it (a random token it sends with every request),
//!   not to the port; five wrong PINs lock the token until the tenant sets
//!   the PIN again.
//! * Wrapping follows PKCS#11's model: every key is sensitive; only an
//!   extractable key can be wrapped (tenant imports are not, unless the
//!   tenant says so), only by a key whose usage is wrap/unwrap and nothing
//!   else (a key that could also decrypt would hand out what it wraps); the
//!   wrapped blob authenticates the key's kind and policy, and `Unwrap`
//!   gives exactly that policy back.
//! * Audit: every operation, from the client or the tenant, allowed or
//!   refused, is appended to a hash chain ([`audit::AuditLog`]) that the
//!   tenant exports and verifies with `ssc hsm audit`.
//!
//! Crates: `ring` for Ed25519, AES-GCM, SHA-2 and randomness (constant-time
//! assembly); RustCrypto `p256`/`p384` for ECDSA over a caller's digest
//! (`CKM_ECDSA`, which ring does not offer) and `rsa` for RSA over a
//! caller's DigestInfo (`CKM_RSA_PKCS`) and prehashed PSS, blinded.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod audit;
pub mod keys;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

pub use ssc_abi::hsm::MAX_RANDOM;
use ssc_abi::hsm::{Actor, AdminOp, AdminReply, HsmError, KeyInfo, Op, Reply, Request, Response, TokenInfo, Usage};

use crate::audit::AuditLog;
use crate::keys::KeyMaterialHeld;

/// Wrong PINs before the token locks.
pub const PIN_TRIES: u32 = 5;
/// Most keys DomC holds.
pub const MAX_KEYS: usize = 4096;

struct Key {
    label: String,
    id: Vec<u8>,
    usage: Usage,
    local: bool,
    material: KeyMaterialHeld,
    /// Rate limit: the second (since boot) and the operations in it.
    window: (u64, u32),
}

impl Key {
    fn info(&self, handle: u64) -> KeyInfo {
        KeyInfo {
            handle,
            kind: self.material.kind,
            label: self.label.clone(),
            id: self.id.clone(),
            public: self.material.public.clone(),
            exponent: self.material.exponent.clone(),
            bits: self.material.bits,
            usage: self.usage,
            local: self.local,
        }
    }
}

/// The user PIN, salted and hashed.
struct Pin {
    salt: [u8; 16],
    hash: [u8; 32],
}

impl Pin {
    fn new(pin: &[u8]) -> Result<Pin, HsmError> {
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&keys::random(16)?);
        Ok(Pin { salt, hash: Self::hash(&salt, pin) })
    }

    fn hash(salt: &[u8; 16], pin: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(salt);
        ctx.update(pin);
        let mut h = [0u8; 32];
        h.copy_from_slice(ctx.finish().as_ref());
        h
    }

    fn matches(&self, pin: &[u8]) -> bool {
        ct_eq(&Self::hash(&self.salt, pin), &self.hash)
    }
}

/// Equal-length byte strings compared in constant time (every byte).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counters for the image's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub refused: u64,
    pub malformed: u64,
    /// Requests without a login refused over [`UNAUTHENTICATED_PER_SEC`].
    pub throttled: u64,
    /// Requests refused because the audit log was full of undelivered
    /// entries.
    pub audit_blocked: u64,
}

/// Requests without a login (Hello, Login, List, Random, and frames that
/// do not decode) DomC serves per second, all applications together. Each
/// is audited, so without a bound a client could flood the log; those
/// over it are refused and audited as one summary entry.
pub const UNAUTHENTICATED_PER_SEC: u32 = 100;

/// The budget of requests without a login: the second, the count in it,
/// and the refusals not yet audited.
#[derive(Default)]
struct Throttle {
    second: u64,
    count: u32,
    suppressed: u64,
}

/// The HSM.
pub struct Hsm {
    label: String,
    serial: String,
    keys: BTreeMap<u64, Key>,
    next_handle: u64,
    pin: Option<Pin>,
    tries_left: u32,
    /// The token of the application logged in, if one is.
    logged_in: Option<[u8; 16]>,
    pub audit: AuditLog,
    pub stats: Stats,
    throttle: Throttle,
}

/// What an operation needs before it may run.
enum Need {
    Nothing,
    Login,
    /// Login, and the key's usage must allow `op` (a [`Usage`] bit).
    Key(u64, u8),
}

impl Hsm {
    /// An empty token called `label` (shown by `pkcs11-tool -L`).
    pub fn new(label: &str, serial: &str) -> Hsm {
        Hsm {
            label: label.into(),
            serial: serial.into(),
            keys: BTreeMap::new(),
            next_handle: 1,
            pin: None,
            tries_left: PIN_TRIES,
            logged_in: None,
            audit: AuditLog::new(audit::KEEP),
            stats: Stats::default(),
            throttle: Throttle::default(),
        }
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Serves one request payload from the data link; returns the response
    /// payload. A payload that does not decode gets `Malformed` under id 0.
    pub fn client_frame(&mut self, payload: &[u8], now_ms: u64) -> Vec<u8> {
        let resp = match ssc_abi::hsm::decode_payload::<Request>(payload) {
            Some(req) => self.client(req, now_ms),
            None => {
                self.stats.malformed += 1;
                let refused = self.gate(now_ms, false).err();
                if refused.is_none() {
                    self.audit.append(now_ms, Actor::Client { session: 0 }, "malformed-frame", None, "refused");
                }
                Response { id: 0, result: Err(refused.unwrap_or(HsmError::Malformed)) }
            }
        };
        postcard::to_allocvec(&resp).expect("in-memory encoding")
    }

    /// Serves one decoded request.
    pub fn client(&mut self, req: Request, now_ms: u64) -> Response {
        self.stats.requests += 1;
        let logged_in = self.logged_in_as(&req.token);
        if let Err(e) = self.gate(now_ms, logged_in) {
            return Response { id: req.id, result: Err(e) };
        }
        let actor = Actor::Client { session: req.session };
        let (name, mut key) = op_name(&req.op);
        let result = self.check(&req.op, &req.token, now_ms).and_then(|()| self.run(req.op, now_ms));
        if let Ok(Reply::Key(info)) = &result {
            key = Some(info.handle);
        }
        let outcome = match &result {
            Ok(_) => String::from("ok"),
            Err(e) => {
                self.stats.refused += 1;
                e.to_string()
            }
        };
        // Random and List are frequent and change nothing: audited too,
        // as the audit log is the record of every use of the token.
        self.audit.append(now_ms, actor, name, key, &outcome);
        Response { id: req.id, result }
    }

    fn need(op: &Op) -> Need {
        match op {
            Op::Hello | Op::Login { .. } | Op::List | Op::Random { .. } => Need::Nothing,
            Op::Logout | Op::Generate { .. } | Op::Destroy { .. } => Need::Login,
            Op::Sign { key, .. } => Need::Key(*key, Usage::SIGN),
            Op::Verify { key, .. } => Need::Key(*key, Usage::VERIFY),
            Op::Encrypt { key, .. } => Need::Key(*key, Usage::ENCRYPT),
            Op::Decrypt { key, .. } => Need::Key(*key, Usage::DECRYPT),
            Op::Wrap { wrapping, .. } => Need::Key(*wrapping, Usage::WRAP),
            Op::Unwrap { wrapping, .. } => Need::Key(*wrapping, Usage::UNWRAP),
        }
    }

    /// What every request passes before it runs (and is audited): the
    /// audit log must have room for its entry, and a request without a
    /// login must be within [`UNAUTHENTICATED_PER_SEC`]. A refusal here
    /// is not audited one by one: a full log has no room, and a flood's
    /// refusals become one summary entry.
    fn gate(&mut self, now_ms: u64, logged_in: bool) -> Result<(), HsmError> {
        let second = now_ms / 1000;
        if second != self.throttle.second {
            self.flush_throttled(now_ms);
            self.throttle.second = second;
            self.throttle.count = 0;
        }
        if self.audit.blocked() {
            self.stats.refused += 1;
            self.stats.audit_blocked += 1;
            return Err(HsmError::AuditFull);
        }
        if logged_in {
            return Ok(());
        }
        let t = &mut self.throttle;
        t.count += 1;
        if t.count > UNAUTHENTICATED_PER_SEC {
            t.suppressed += 1;
            self.stats.refused += 1;
            self.stats.throttled += 1;
            return Err(HsmError::Throttled { per_sec: UNAUTHENTICATED_PER_SEC });
        }
        Ok(())
    }

    /// The refusals of the last flood become one audit entry (at a new
    /// second, or when the tenant reads the log).
    fn flush_throttled(&mut self, now_ms: u64) {
        if self.throttle.suppressed > 0 && !self.audit.blocked() {
            let outcome = alloc::format!(
                "{} requests without a login refused (over {UNAUTHENTICATED_PER_SEC} per second)",
                self.throttle.suppressed
            );
            self.audit.append(now_ms, Actor::Client { session: 0 }, "throttled", None, &outcome);
            self.throttle.suppressed = 0;
        }
    }

    /// Whether `token` is the logged-in application's (constant time).
    fn logged_in_as(&self, token: &[u8; 16]) -> bool {
        self.logged_in.is_some_and(|t| ct_eq(&t, token))
    }

    /// Login, policy and rate limit.
    fn check(&mut self, op: &Op, token: &[u8; 16], now_ms: u64) -> Result<(), HsmError> {
        let logged_in = self.logged_in_as(token);
        match Self::need(op) {
            Need::Nothing => Ok(()),
            Need::Login if logged_in => Ok(()),
            Need::Key(handle, bit) if logged_in => {
                let k = self.keys.get_mut(&handle).ok_or(HsmError::UnknownKey { key: handle })?;
                if !k.usage.allows(bit) {
                    let op = Usage { ops: bit, ..Usage::GENERAL }.names();
                    return Err(HsmError::Forbidden { key: handle, op });
                }
                let limit = k.usage.rate_per_sec;
                if limit > 0 {
                    let second = now_ms / 1000;
                    if k.window.0 != second {
                        k.window = (second, 0);
                    }
                    if k.window.1 >= limit {
                        return Err(HsmError::RateLimited { key: handle, per_sec: limit });
                    }
                    k.window.1 += 1;
                }
                Ok(())
            }
            _ => Err(HsmError::NotLoggedIn),
        }
    }

    fn key(&self, handle: u64) -> Result<&Key, HsmError> {
        self.keys.get(&handle).ok_or(HsmError::UnknownKey { key: handle })
    }

    fn insert(
        &mut self,
        label: String,
        id: Vec<u8>,
        usage: Usage,
        local: bool,
        m: KeyMaterialHeld,
    ) -> Result<KeyInfo, HsmError> {
        if self.keys.len() >= MAX_KEYS {
            return Err(HsmError::Full);
        }
        if label.len() > 128 || id.len() > 128 {
            return Err(HsmError::BadInput { why: "labels and ids are at most 128 bytes".into() });
        }
        usage.check().map_err(|why| HsmError::BadInput { why })?;
        if usage.ops & Usage::WRAPPING_OPS != 0 && m.kind != ssc_abi::hsm::KeyKind::Aes256 {
            return Err(HsmError::BadInput { why: "only AES-256 keys wrap and unwrap".into() });
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        let key = Key { label, id, usage, local, material: m, window: (0, 0) };
        let info = key.info(handle);
        self.keys.insert(handle, key);
        Ok(info)
    }

    fn run(&mut self, op: Op, _now_ms: u64) -> Result<Reply, HsmError> {
        match op {
            Op::Hello => {
                self.logged_in = None;
                Ok(Reply::Token(TokenInfo {
                    label: self.label.clone(),
                    serial: self.serial.clone(),
                    pin_set: self.pin.is_some(),
                    keys: self.keys.len() as u32,
                    pin_tries_left: self.tries_left,
                }))
            }
            Op::Login { pin } => {
                let Some(p) = &self.pin else { return Err(HsmError::PinNotSet) };
                if self.tries_left == 0 {
                    return Err(HsmError::PinLocked);
                }
                if p.matches(&pin) {
                    self.tries_left = PIN_TRIES;
                    let mut token = [0u8; 16];
                    token.copy_from_slice(&keys::random(16)?);
                    self.logged_in = Some(token);
                    Ok(Reply::LoggedIn { token })
                } else {
                    self.tries_left -= 1;
                    self.logged_in = None;
                    match self.tries_left {
                        0 => Err(HsmError::PinLocked),
                        n => Err(HsmError::PinIncorrect { tries_left: n }),
                    }
                }
            }
            Op::Logout => {
                self.logged_in = None;
                Ok(Reply::Ok)
            }
            Op::List => Ok(Reply::Keys(self.keys.iter().map(|(h, k)| k.info(*h)).collect())),
            Op::Generate { kind, label, id, usage } => {
                let m = KeyMaterialHeld::generate(kind)?;
                Ok(Reply::Key(self.insert(label, id, usage, true, m)?))
            }
            Op::Sign { key, mech, data } => Ok(Reply::Bytes(self.key(key)?.material.sign(mech, &data)?)),
            Op::Verify { key, mech, data, signature } => {
                self.key(key)?.material.verify(mech, &data, &signature)?;
                Ok(Reply::Ok)
            }
            Op::Encrypt { key, iv, aad, data } => Ok(Reply::Bytes(self.key(key)?.material.encrypt(&iv, &aad, &data)?)),
            Op::Decrypt { key, iv, aad, data } => Ok(Reply::Bytes(self.key(key)?.material.decrypt(&iv, &aad, &data)?)),
            Op::Wrap { wrapping, key } => {
                let target = self.key(key)?;
                if !target.usage.extractable {
                    return Err(HsmError::NotExtractable { key });
                }
                let w = self.key(wrapping)?;
                if w.usage.ops & !Usage::WRAPPING_OPS != 0 {
                    // Refused at creation already; checked again here.
                    return Err(HsmError::Forbidden { key: wrapping, op: "wrap (it may also do other things)".into() });
                }
                // The target's own usage policy travels with it, authenticated.
                Ok(Reply::Bytes(keys::wrap(&w.material, &target.material, target.usage)?))
            }
            Op::Unwrap { wrapping, blob, label, id } => {
                let (m, usage) = keys::unwrap(&self.key(wrapping)?.material, &blob)?;
                Ok(Reply::Key(self.insert(label, id, usage, false, m)?))
            }
            Op::Random { len } => {
                if len > MAX_RANDOM {
                    return Err(HsmError::BadInput {
                        why: alloc::format!("at most {MAX_RANDOM} random bytes per call"),
                    });
                }
                Ok(Reply::Bytes(keys::random(len as usize)?))
            }
            Op::Destroy { key } => {
                self.keys.remove(&key).ok_or(HsmError::UnknownKey { key })?;
                Ok(Reply::Ok)
            }
        }
    }

    /// Serves one tenant request payload from the control link; returns the
    /// reply payload.
    pub fn admin_frame(&mut self, payload: &[u8], now_ms: u64) -> Vec<u8> {
        let reply = match ssc_abi::hsm::decode_payload::<AdminOp>(payload) {
            Some(op) => self.admin(op, now_ms),
            None => AdminReply::Error(HsmError::Malformed),
        };
        postcard::to_allocvec(&reply).expect("in-memory encoding")
    }

    /// Serves one tenant request.
    pub fn admin(&mut self, op: AdminOp, now_ms: u64) -> AdminReply {
        let (name, key) = match &op {
            AdminOp::SetPin { .. } => ("set-pin", None),
            AdminOp::Import { .. } => ("import", None),
            AdminOp::List => ("list", None),
            AdminOp::Destroy { key } => ("destroy", Some(*key)),
            // Reading the log is not itself logged: exporting would
            // otherwise grow the log it exports. A flood's summary is
            // written first, so the tenant sees it.
            AdminOp::Audit { from, max } => {
                self.flush_throttled(now_ms);
                return AdminReply::Audit(self.audit.page(*from, *max));
            }
            AdminOp::AuditAck { next, head } => {
                return match self.audit.acknowledge(*next, *head) {
                    true => AdminReply::Ok,
                    false => AdminReply::Error(HsmError::BadInput {
                        why: alloc::format!("audit acknowledgement of entries before {next} does not match the log"),
                    }),
                };
            }
            AdminOp::AuditWhenFull { block: true } => ("audit-when-full: block", None),
            AdminOp::AuditWhenFull { block: false } => ("audit-when-full: drop the oldest", None),
        };
        // Even the policy change waits: its own audit entry would drop an
        // entry the tenant does not have yet.
        if self.audit.blocked() {
            self.stats.audit_blocked += 1;
            return AdminReply::Error(HsmError::AuditFull);
        }
        let reply = match op {
            AdminOp::SetPin { pin } => match pin.len() {
                4..=64 => match Pin::new(&pin) {
                    Ok(p) => {
                        self.pin = Some(p);
                        self.tries_left = PIN_TRIES;
                        self.logged_in = None;
                        AdminReply::Ok
                    }
                    Err(e) => AdminReply::Error(e),
                },
                n => AdminReply::Error(HsmError::BadInput { why: alloc::format!("a PIN is 4 to 64 bytes, not {n}") }),
            },
            AdminOp::Import { label, id, usage, material } => {
                match KeyMaterialHeld::import(&material).and_then(|m| self.insert(label, id, usage, false, m)) {
                    Ok(info) => AdminReply::Key(info),
                    Err(e) => AdminReply::Error(e),
                }
            }
            AdminOp::List => AdminReply::Keys(self.keys.iter().map(|(h, k)| k.info(*h)).collect()),
            AdminOp::Destroy { key } => match self.keys.remove(&key) {
                Some(_) => AdminReply::Ok,
                None => AdminReply::Error(HsmError::UnknownKey { key }),
            },
            AdminOp::Audit { .. } | AdminOp::AuditAck { .. } => unreachable!("answered above"),
            AdminOp::AuditWhenFull { block } => {
                self.audit.block_when_full = block;
                AdminReply::Ok
            }
        };
        let (key, outcome) = match &reply {
            AdminReply::Key(info) => (Some(info.handle), String::from("ok")),
            AdminReply::Error(e) => (key, e.to_string()),
            _ => (key, String::from("ok")),
        };
        self.audit.append(now_ms, Actor::Tenant, name, key, &outcome);
        reply
    }
}

/// The audit name of an operation and the key it touches.
fn op_name(op: &Op) -> (&'static str, Option<u64>) {
    match op {
        Op::Hello => ("hello", None),
        Op::Login { .. } => ("login", None),
        Op::Logout => ("logout", None),
        Op::List => ("list", None),
        Op::Generate { .. } => ("generate", None),
        Op::Sign { key, .. } => ("sign", Some(*key)),
        Op::Verify { key, .. } => ("verify", Some(*key)),
        Op::Encrypt { key, .. } => ("encrypt", Some(*key)),
        Op::Decrypt { key, .. } => ("decrypt", Some(*key)),
        Op::Wrap { key, .. } => ("wrap", Some(*key)),
        Op::Unwrap { wrapping, .. } => ("unwrap", Some(*wrapping)),
        Op::Random { .. } => ("random", None),
        Op::Destroy { key } => ("destroy", Some(*key)),
    }
}

#[cfg(test)]
mod tests;
