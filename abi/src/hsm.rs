//! DomC's RPC: what the client's PKCS#11 module asks the HSM service
//! domain on its `ssc-hsm` data link, and what the tenant asks it on the
//! control link (`Body::HsmAdmin`).
//!
//! The data link is a byte stream of **HSM frames**: the 4-byte magic
//! [`MAGIC`], a 4-byte little-endian payload length (at most
//! [`MAX_FRAME`]), then a `postcard` [`Request`] (client → DomC) or
//! [`Response`] (DomC → client). The magic lets DomC find the next frame
//! after garbage (a client killed mid-write, a stray `echo` into the port):
//! [`HsmDecoder`] skips bytes until it sees the magic again and counts what
//! it skipped, so one bad writer never wedges the link.
//!
//! Requests carry an id (echoed in the response) and the PKCS#11 session
//! they belong to, so several sessions can be in flight on one link and the
//! audit log can say which session did what.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// First bytes of every HSM frame.
pub const MAGIC: [u8; 4] = *b"SSCH";
/// Largest HSM frame payload, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest `Op::Random` request, in bytes.
pub const MAX_RANDOM: u32 = 16 * 1024;

/// Key kinds DomC holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    EcP256,
    EcP384,
    Ed25519,
    /// RSA 2048–4096 (imported only).
    Rsa,
    Aes256,
}

impl KeyKind {
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::EcP256 => "ec-p256",
            KeyKind::EcP384 => "ec-p384",
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Rsa => "rsa",
            KeyKind::Aes256 => "aes-256",
        }
    }
}

/// What a key may be used for, how often, and whether it may leave DomC
/// (wrapped). Every DomC key is sensitive (`CKA_SENSITIVE`): no operation
/// returns a secret in the clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// [`Usage::SIGN`] | [`Usage::VERIFY`] | …
    pub ops: u8,
    /// Most operations per second (0: no limit).
    pub rate_per_sec: u32,
    /// `CKA_EXTRACTABLE`: the key may be wrapped (only ever sealed under a
    /// wrap-only key, with this policy authenticated alongside). Tenant
    /// imports are not extractable unless the tenant says so.
    pub extractable: bool,
}

impl Usage {
    pub const SIGN: u8 = 1;
    pub const VERIFY: u8 = 2;
    pub const ENCRYPT: u8 = 4;
    pub const DECRYPT: u8 = 8;
    pub const WRAP: u8 = 16;
    pub const UNWRAP: u8 = 32;
    /// The operations of a wrapping key, which may do nothing else.
    pub const WRAPPING_OPS: u8 = Self::WRAP | Self::UNWRAP;
    /// Sign, verify, encrypt, decrypt; no limit; not extractable. (Wrapping
    /// is separate: a key that wraps may do nothing else, see
    /// [`Usage::check`].)
    pub const GENERAL: Usage = Usage { ops: 0x0f, rate_per_sec: 0, extractable: false };
    /// A wrapping key: wrap and unwrap only.
    pub const WRAPPING: Usage = Usage { ops: Self::WRAPPING_OPS, rate_per_sec: 0, extractable: false };

    pub fn allows(self, op: u8) -> bool {
        self.ops & op == op
    }

    /// A key may wrap or unwrap only if it does nothing else (PKCS#11's
    /// rule): a key that could both wrap and decrypt would hand out any
    /// key it wraps. Unknown bits are refused too.
    pub fn check(self) -> Result<(), String> {
        if self.ops & !0x3f != 0 {
            return Err(alloc::format!("unknown usage bits {:#x}", self.ops & !0x3f));
        }
        if self.ops & Self::WRAPPING_OPS != 0 && self.ops & !Self::WRAPPING_OPS != 0 {
            return Err(alloc::format!(
                "a key that wraps or unwraps may do nothing else (asked for {}): it could decrypt what it wraps",
                self.names()
            ));
        }
        Ok(())
    }

    /// The operations by name (`sign,verify`).
    pub fn names(self) -> String {
        let mut s = String::new();
        for (bit, name) in USAGE_NAMES {
            if self.ops & bit != 0 {
                if !s.is_empty() {
                    s.push(',');
                }
                s.push_str(name);
            }
        }
        s
    }

    /// Parses `sign,verify,…` (names of [`Usage::names`]); not extractable.
    pub fn parse(list: &str, rate_per_sec: u32) -> Result<Usage, String> {
        let mut ops = 0;
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let Some((bit, _)) = USAGE_NAMES.iter().find(|(_, n)| *n == word) else {
                return Err(alloc::format!(
                    "unknown key usage `{word}` (known: sign, verify, encrypt, decrypt, wrap, unwrap)"
                ));
            };
            ops |= bit;
        }
        let usage = Usage { ops, rate_per_sec, extractable: false };
        usage.check()?;
        Ok(usage)
    }
}

const USAGE_NAMES: [(u8, &str); 6] = [
    (Usage::SIGN, "sign"),
    (Usage::VERIFY, "verify"),
    (Usage::ENCRYPT, "encrypt"),
    (Usage::DECRYPT, "decrypt"),
    (Usage::WRAP, "wrap"),
    (Usage::UNWRAP, "unwrap"),
];

/// A hash function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// A signature mechanism (PKCS#11 terms in the comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignMech {
    /// `CKM_ECDSA` (`hash: None`: the data is a digest) or
    /// `CKM_ECDSA_SHA256/384/512`. Signatures are `r || s`, fixed width.
    Ecdsa { hash: Option<Hash> },
    /// `CKM_EDDSA` (pure Ed25519).
    EdDsa,
    /// `CKM_RSA_PKCS` (`hash: None`: the data is a DER DigestInfo) or
    /// `CKM_SHA256_RSA_PKCS`….
    RsaPkcs1 { hash: Option<Hash> },
    /// `CKM_RSA_PKCS_PSS` (`prehashed`: the data is a digest of `hash`) or
    /// `CKM_SHA256_RSA_PKCS_PSS`…, MGF1 with the same hash.
    RsaPss { hash: Hash, prehashed: bool, salt_len: u32 },
}

/// Public facts about one key (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub handle: u64,
    pub kind: KeyKind,
    pub label: String,
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// EC: the SEC1 uncompressed point; Ed25519: the 32-byte key; RSA: the
    /// modulus (big-endian); AES: empty.
    pub public: Vec<u8>,
    /// RSA: the public exponent (big-endian); otherwise empty.
    pub exponent: Vec<u8>,
    pub bits: u32,
    pub usage: Usage,
    /// Generated inside DomC (`CKA_LOCAL`), not imported.
    pub local: bool,
}

/// Client → DomC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    /// The PKCS#11 session (for the audit log; 0: none).
    pub session: u32,
    /// The login this request speaks for: what [`Reply::LoggedIn`] gave
    /// the application that logged in (zeroes: none). A login belongs to
    /// the application holding its token, not to whoever opens the port
    /// next: a second process that opens the port after the first closed
    /// it (or crashed without logging out) is not logged in.
    pub token: [u8; 16],
    pub op: Op,
}

/// What the client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A new application on the link: forget the previous one's login.
    Hello,
    Login {
        pin: Vec<u8>,
    },
    Logout,
    /// Every key's public facts.
    List,
    Generate {
        kind: KeyKind,
        label: String,
        id: Vec<u8>,
        usage: Usage,
    },
    Sign {
        key: u64,
        mech: SignMech,
        data: Vec<u8>,
    },
    Verify {
        key: u64,
        mech: SignMech,
        data: Vec<u8>,
        signature: Vec<u8>,
    },
    /// AES-256-GCM, 12-byte IV, 16-byte tag appended to the ciphertext.
    Encrypt {
        key: u64,
        iv: Vec<u8>,
        aad: Vec<u8>,
        data: Vec<u8>,
    },
    Decrypt {
        key: u64,
        iv: Vec<u8>,
        aad: Vec<u8>,
        data: Vec<u8>,
    },
    /// `key`'s secret sealed under the AES key `wrapping`, which must be a
    /// wrap-only key; `key` must be extractable. The blob's kind and usage
    /// are authenticated with it (AES-256-GCM AAD); only DomC can unwrap it,
    /// and `Unwrap` gives the key exactly that policy, never a wider one.
    Wrap {
        wrapping: u64,
        key: u64,
    },
    Unwrap {
        wrapping: u64,
        blob: Vec<u8>,
        label: String,
        id: Vec<u8>,
    },
    Random {
        len: u32,
    },
    Destroy {
        key: u64,
    },
}

/// DomC → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, HsmError>,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Token(TokenInfo),
    Keys(Vec<KeyInfo>),
    Key(KeyInfo),
    Bytes(Vec<u8>),
    /// A successful `Login`: the token every later request of this
    /// application carries ([`Request::token`]).
    LoggedIn {
        token: [u8; 16],
    },
}

/// What `Hello` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub label: String,
    pub serial: String,
    /// The tenant has set a user PIN (until then nobody can log in).
    pub pin_set: bool,
    pub keys: u32,
    /// Wrong PINs left before the token locks.
    pub pin_tries_left: u32,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HsmError {
    /// The frame was not a request.
    Malformed,
    NotLoggedIn,
    PinIncorrect {
        tries_left: u32,
    },
    /// Too many wrong PINs: the tenant must set the PIN again.
    PinLocked,
    /// The tenant has not set a user PIN.
    PinNotSet,
    UnknownKey {
        key: u64,
    },
    /// The mechanism does not fit the key (an RSA mechanism on an EC key…).
    WrongMechanism {
        kind: KeyKind,
    },
    /// The key may not leave DomC (`CKA_EXTRACTABLE` false).
    NotExtractable {
        key: u64,
    },
    /// The key's usage policy forbids this operation.
    Forbidden {
        key: u64,
        op: String,
    },
    /// The key's rate limit is spent for this second.
    RateLimited {
        key: u64,
        per_sec: u32,
    },
    /// Bad lengths or encodings in the request (an IV that is not 12 bytes…).
    BadInput {
        why: String,
    },
    SignatureInvalid,
    /// The tag did not verify (wrong key, IV, AAD, or tampered data).
    DecryptFailed,
    /// The key material could not be imported or unwrapped.
    BadKey {
        why: String,
    },
    /// The key store is full.
    Full,
    /// Requests without a login exceed DomC's budget for them this second
    /// (they could otherwise flood the audit log).
    Throttled {
        per_sec: u32,
    },
    /// The audit log is full of entries the tenant has not received yet;
    /// DomC refuses operations rather than drop evidence until the tenant
    /// reads them (`ssc up` streams them; `ssc hsm audit`).
    AuditFull,
}

impl core::fmt::Display for HsmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HsmError::Malformed => f.write_str("malformed request frame"),
            HsmError::NotLoggedIn => f.write_str("log in with the user PIN first"),
            HsmError::PinIncorrect { tries_left } => write!(f, "wrong PIN ({tries_left} tries left)"),
            HsmError::PinLocked => {
                f.write_str("PIN locked after too many wrong tries: the tenant sets it again (`ssc hsm set-pin`)")
            }
            HsmError::PinNotSet => f.write_str("no user PIN set: the tenant sets one (`pin_file` in [hsm])"),
            HsmError::UnknownKey { key } => write!(f, "no key with handle {key}"),
            HsmError::WrongMechanism { kind } => write!(f, "mechanism does not fit a {} key", kind.name()),
            HsmError::Forbidden { key, op } => write!(f, "key {key}'s usage policy does not allow {op}"),
            HsmError::NotExtractable { key } => write!(f, "key {key} is not extractable: it cannot be wrapped"),
            HsmError::RateLimited { key, per_sec } => {
                write!(f, "key {key} is limited to {per_sec} operations per second")
            }
            HsmError::BadInput { why } => write!(f, "bad input: {why}"),
            HsmError::SignatureInvalid => f.write_str("signature does not verify"),
            HsmError::DecryptFailed => f.write_str("authentication tag does not verify"),
            HsmError::BadKey { why } => write!(f, "bad key material: {why}"),
            HsmError::Full => f.write_str("the key store is full"),
            HsmError::Throttled { per_sec } => {
                write!(f, "too many requests without a login (at most {per_sec} per second)")
            }
            HsmError::AuditFull => f.write_str(
                "the audit log is full of entries the tenant has not received: operations wait until it reads them",
            ),
        }
    }
}

/// Key material the tenant imports (`ssc hsm import`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyMaterial {
    /// A PKCS#8 `PrivateKeyInfo` (DER): EC P-256/P-384, Ed25519 or RSA.
    Pkcs8(Vec<u8>),
    /// 32 raw bytes.
    Aes256(Vec<u8>),
}

impl core::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KeyMaterial::Pkcs8(b) => write!(f, "Pkcs8(<{} bytes>)", b.len()),
            KeyMaterial::Aes256(b) => write!(f, "Aes256(<{} bytes>)", b.len()),
        }
    }
}

/// Tenant → DomC, inside `Body::HsmAdmin` on the control link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    /// Sets (or resets, unlocking) the user PIN.
    SetPin {
        pin: Vec<u8>,
    },
    Import {
        label: String,
        id: Vec<u8>,
        usage: Usage,
        material: KeyMaterial,
    },
    List,
    Destroy {
        key: u64,
    },
    /// Audit entries from sequence number `from`, at most `max` (reading
    /// acknowledges nothing).
    Audit {
        from: u64,
        max: u32,
    },
    /// The tenant holds, durably, every entry before `next`, the last of
    /// which hashes to `head`: DomC may drop them when its log is full.
    AuditAck {
        next: u64,
        head: [u8; 32],
    },
    /// What DomC does when its audit log is full of entries the tenant
    /// has not received: refuse operations (`block`, the default) or drop
    /// the oldest.
    AuditWhenFull {
        block: bool,
    },
}

/// DomC → tenant, inside `Body::HsmAdminReply`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReply {
    Ok,
    Key(KeyInfo),
    Keys(Vec<KeyInfo>),
    Audit(AuditPage),
    Error(HsmError),
}

/// Who asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    Tenant,
    Client { session: u32 },
}

/// One audited operation. `hash` = SHA-256(`prev` ‖ postcard of the other
/// fields but `hash`), and `prev` is the previous entry's hash (zeros for
/// the first), so an edited, dropped or reordered entry breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Milliseconds since DomC booted.
    pub at_ms: u64,
    pub actor: Actor,
    pub op: String,
    pub key: Option<u64>,
    /// `ok`, or the error.
    pub outcome: String,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
}

/// The fields of an entry that its hash covers (all but `hash`).
#[derive(Serialize)]
pub struct AuditBody<'a> {
    pub seq: u64,
    pub at_ms: u64,
    pub actor: Actor,
    pub op: &'a str,
    pub key: Option<u64>,
    pub outcome: &'a str,
}

impl AuditEntry {
    /// The bytes hashed after `prev`.
    pub fn body_bytes(&self) -> Vec<u8> {
        let body = AuditBody {
            seq: self.seq,
            at_ms: self.at_ms,
            actor: self.actor,
            op: &self.op,
            key: self.key,
            outcome: &self.outcome,
        };
        postcard::to_allocvec(&body).expect("in-memory encoding")
    }
}

/// A page of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Entries before this sequence number were dropped from DomC's memory
    /// (the log keeps the most recent ones; the chain still links).
    pub oldest_kept: u64,
    /// The sequence number the next entry will get.
    pub next: u64,
    /// The hash of the latest entry.
    pub head: [u8; 32],
}

/// Encodes `value` as one HSM frame.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, HsmFrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(value, out).map_err(|_| HsmFrameError::Encode)?;
    let len = out.len() - 8;
    if len > MAX_FRAME {
        return Err(HsmFrameError::TooLarge { len });
    }
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes one payload (without magic and length), refusing trailing bytes.
pub fn decode_payload<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((v, [])) => Some(v),
        _ => None,
    }
}

/// Why a frame could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HsmFrameError {
    Encode,
    TooLarge { len: usize },
}

impl core::fmt::Display for HsmFrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HsmFrameError::Encode => f.write_str("cannot encode the HSM frame"),
            HsmFrameError::TooLarge { len } => write!(f, "HSM frame of {len} bytes exceeds {MAX_FRAME}"),
        }
    }
}

/// Splits an HSM byte stream into payloads, resynchronizing on [`MAGIC`]
/// after garbage or an oversized length.
#[derive(Debug, Default)]
pub struct HsmDecoder {
    buf: Vec<u8>,
    /// Bytes thrown away while looking for a frame.
    pub skipped: u64,
}

impl HsmDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete payload, if one has arrived.
    pub fn next_payload(&mut self) -> Option<Vec<u8>> {
        loop {
            // Find the magic; keep a partial magic at the end.
            let start = self.buf.windows(4).position(|w| w == MAGIC);
            match start {
                Some(0) => {}
                Some(s) => {
                    self.skipped += s as u64;
                    self.buf.drain(..s);
                }
                None => {
                    let keep = (1..4)
                        .rev()
                        .find(|&k| self.buf.len() >= k && MAGIC.starts_with(&self.buf[self.buf.len() - k..]));
                    let drop = self.buf.len() - keep.unwrap_or(0);
                    self.skipped += drop as u64;
                    self.buf.drain(..drop);
                    return None;
                }
            }
            if self.buf.len() < 8 {
                return None;
            }
            let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
            if len > MAX_FRAME {
                // Not a frame after all: skip this magic and look again.
                self.skipped += 4;
                self.buf.drain(..4);
                continue;
            }
            if self.buf.len() < 8 + len {
                return None;
            }
            let payload = self.buf[8..8 + len].to_vec();
            self.buf.drain(..8 + len);
            return Some(payload);
        }
    }

    /// Bytes waiting (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn frames_round_trip_and_garbage_is_skipped() {
        let req = Request { id: 7, session: 2, token: [0; 16], op: Op::Random { len: 16 } };
        let frame = encode_frame(&req).unwrap();
        let mut d = HsmDecoder::new();
        d.feed(b"garbage SS");
        d.feed(&frame[..5]);
        assert_eq!(d.next_payload(), None);
        d.feed(&frame[5..]);
        let p = d.next_payload().unwrap();
        assert_eq!(decode_payload::<Request>(&p), Some(req.clone()));
        assert_eq!(d.skipped, 10);
        // A magic with an absurd length is skipped, the next frame found.
        let mut bogus = MAGIC.to_vec();
        bogus.extend_from_slice(&u32::MAX.to_le_bytes());
        d.feed(&bogus);
        d.feed(&frame);
        assert_eq!(decode_payload::<Request>(&d.next_payload().unwrap()), Some(req));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn payload_with_trailing_bytes_is_refused() {
        let frame = encode_frame(&Request { id: 1, session: 0, token: [0; 16], op: Op::List }).unwrap();
        let mut payload = frame[8..].to_vec();
        payload.push(0);
        assert_eq!(decode_payload::<Request>(&payload), None);
        assert_eq!(decode_payload::<Request>(&[0xff; 3]), None);
    }

    #[test]
    fn usage_names_parse_back() {
        let u = Usage::parse("sign, verify", 5).unwrap();
        assert_eq!(u, Usage { ops: Usage::SIGN | Usage::VERIFY, rate_per_sec: 5, extractable: false });
        assert_eq!(u.names(), "sign,verify");
        assert!(Usage::parse("sign,fly", 0).unwrap_err().contains("fly"));
        let _ = vec![0u8];
    }
}
