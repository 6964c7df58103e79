//! `libssc_pkcs11.so`: the PKCS#11 v2.40 module a client VM loads to use
//! DomC, the tenant's HSM service domain, like a smart card.
//!
//! Every key operation is an RPC to DomC over the client's `ssc-hsm`
//! virtio-serial port ([`transport`]); the module holds no key material,
//! only public facts (labels, ids, public keys) and per-session state
//! (search results, the mechanism of an operation in progress).
//!
//! One slot (0) with one token. Objects: each asymmetric key in DomC is a
//! private-key object (handle `2k`) and a public-key object (`2k+1`); an
//! AES key is a secret-key object (`2k`). Private and secret objects are
//! visible after `C_Login` only.
//!
//! Mechanisms: `CKM_EC_KEY_PAIR_GEN` (P-256, P-384),
//! `CKM_EC_EDWARDS_KEY_PAIR_GEN` (Ed25519), `CKM_ECDSA[_SHA256/384/512]`,
//! `CKM_EDDSA`, `CKM_RSA_PKCS`, `CKM_SHA256/384/512_RSA_PKCS`,
//! `CKM_RSA_PKCS_PSS`, `CKM_SHA256/384/512_RSA_PKCS_PSS` (RSA keys are
//! imported by the tenant with `ssc hsm import`), `CKM_AES_KEY_GEN`,
//! `CKM_AES_GCM`, and `CKM_SSC_WRAP` (vendor-defined, DomC's own wrapped
//! format) for `C_WrapKey`/`C_UnwrapKey` ([`wrap`]). Entry points outside
//! that set return
//! `CKR_FUNCTION_NOT_SUPPORTED`.
//!
//! Threads: the module's state sits behind one lock that is never held
//! across an RPC, so threads with their own sessions run their requests
//! concurrently (DomC serves them in arrival order).
//!
//! This is the one place in `host-tools` with `unsafe`: the C ABI hands us
//! raw pointers. Each is checked for NULL and read or written through the
//! small helpers at the top, whose `// SAFETY:` comments state what the
//! PKCS#11 contract guarantees.
#![allow(non_snake_case)]

pub mod transport;
mod unsupported;
mod wrap;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cryptoki_sys::*;
use ssc_abi::hsm::{Hash, HsmError, KeyInfo, KeyKind, Op, Reply, SignMech, TokenInfo, Usage};

use crate::transport::{Failure, Transport};

// ---------------------------------------------------------------------------
// Raw-pointer helpers: the only unsafe code besides the entry points.

/// The bytes at `p` (empty for NULL or zero length).
///
/// # Safety
///
/// `p` is NULL or valid for reading `len` bytes for the lifetime `'a`.
unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> &'a [u8] {
    if p.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: PKCS#11 callers pass `len` readable bytes at a non-NULL `p`.
    unsafe { std::slice::from_raw_parts(p, len as usize) }
}

/// The attribute array of a template.
///
/// # Safety
///
/// `p` is NULL or valid for reading and writing `n` attributes for `'a`,
/// and nothing else refers to them meanwhile.
unsafe fn template<'a>(p: CK_ATTRIBUTE_PTR, n: CK_ULONG) -> &'a mut [CK_ATTRIBUTE] {
    if p.is_null() || n == 0 {
        return &mut [];
    }
    // SAFETY: PKCS#11 callers pass `n` attributes at a non-NULL `p`, ours to
    // fill for C_GetAttributeValue.
    unsafe { std::slice::from_raw_parts_mut(p, n as usize) }
}

/// Stores `v` at `p` (CKR_ARGUMENTS_BAD for NULL).
///
/// # Safety
///
/// `p` is NULL or valid for writing one `T`.
unsafe fn put<T>(p: *mut T, v: T) -> CK_RV {
    if p.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-NULL output pointer from the caller, valid for one T.
    unsafe { p.write(v) };
    CKR_OK
}

/// The PKCS#11 output convention: NULL `out` asks for the length; a short
/// buffer gets CKR_BUFFER_TOO_SMALL and the length.
///
/// # Safety
///
/// `out_len` is NULL or valid for one `CK_ULONG`; `out` is NULL or valid
/// for writing `*out_len` bytes.
unsafe fn output(data: &[u8], out: *mut u8, out_len: *mut CK_ULONG) -> CK_RV {
    if out_len.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-NULL length pointer from the caller.
    let room = unsafe { *out_len } as usize;
    // SAFETY: as above.
    unsafe { *out_len = data.len() as CK_ULONG };
    if out.is_null() {
        return CKR_OK;
    }
    if room < data.len() {
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: the caller said `out` holds `room >= data.len()` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    CKR_OK
}

/// Space-padded fixed-width PKCS#11 text.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut a = [b' '; N];
    let b = s.as_bytes();
    let n = b.len().min(N);
    a[..n].copy_from_slice(&b[..n]);
    a
}

// ---------------------------------------------------------------------------
// State.

const SLOT: CK_SLOT_ID = 0;

/// A sign or verify in progress.
#[derive(Clone)]
struct SignOp {
    key: u64,
    mech: SignMech,
    sig_len: usize,
    data: Vec<u8>,
}

/// An AES-GCM operation in progress.
#[derive(Clone)]
struct CryptOp {
    key: u64,
    iv: Vec<u8>,
    aad: Vec<u8>,
}

#[derive(Default)]
struct Session {
    rw: bool,
    found: Option<Vec<CK_OBJECT_HANDLE>>,
    sign: Option<SignOp>,
    verify: Option<SignOp>,
    encrypt: Option<CryptOp>,
    decrypt: Option<CryptOp>,
    /// A blob `C_WrapKey` made for a length query: (wrapping key, key, blob).
    wrapped: Option<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE, Vec<u8>)>,
}

struct State {
    link: Arc<Transport>,
    token: TokenInfo,
    sessions: HashMap<CK_SESSION_HANDLE, Session>,
    next_session: CK_SESSION_HANDLE,
    logged_in: bool,
    keys: Vec<KeyInfo>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
/// The link outlives C_Finalize (its reader thread blocks in read), so a
/// second C_Initialize in the same process reuses it.
static LINK: Mutex<Option<Arc<Transport>>> = Mutex::new(None);

fn debug(msg: &str) {
    if std::env::var_os("SSC_PKCS11_DEBUG").is_some() {
        eprintln!("ssc-pkcs11: {msg}");
    }
}

fn hsm_rv(e: &HsmError) -> CK_RV {
    match e {
        HsmError::Malformed => CKR_DEVICE_ERROR,
        HsmError::NotLoggedIn => CKR_USER_NOT_LOGGED_IN,
        HsmError::PinIncorrect { .. } => CKR_PIN_INCORRECT,
        HsmError::PinLocked => CKR_PIN_LOCKED,
        HsmError::PinNotSet => CKR_USER_PIN_NOT_INITIALIZED,
        HsmError::UnknownKey { .. } => CKR_KEY_HANDLE_INVALID,
        HsmError::WrongMechanism { .. } => CKR_KEY_TYPE_INCONSISTENT,
        HsmError::Forbidden { .. } => CKR_KEY_FUNCTION_NOT_PERMITTED,
        HsmError::NotExtractable { .. } => CKR_KEY_UNEXTRACTABLE,
        HsmError::RateLimited { .. } => CKR_FUNCTION_REJECTED,
        HsmError::BadInput { .. } => CKR_DATA_INVALID,
        HsmError::SignatureInvalid => CKR_SIGNATURE_INVALID,
        HsmError::DecryptFailed => CKR_ENCRYPTED_DATA_INVALID,
        HsmError::BadKey { .. } => CKR_WRAPPED_KEY_INVALID,
        HsmError::Full => CKR_DEVICE_MEMORY,
        // Both pass: the next second, or once the tenant has the log.
        HsmError::Throttled { .. } => CKR_FUNCTION_REJECTED,
        HsmError::AuditFull => CKR_DEVICE_MEMORY,
    }
}

fn failure_rv(f: Failure) -> CK_RV {
    match f {
        Failure::Hsm(e) => {
            debug(&format!("DomC: {e}"));
            hsm_rv(&e)
        }
        Failure::Link(why) => {
            eprintln!("ssc-pkcs11: {why}");
            CKR_DEVICE_ERROR
        }
    }
}

/// Runs `f` on the state (CKR_CRYPTOKI_NOT_INITIALIZED without one).
fn with<R>(f: impl FnOnce(&mut State) -> Result<R, CK_RV>) -> Result<R, CK_RV> {
    let mut g = STATE.lock().map_err(|_| CKR_GENERAL_ERROR)?;
    let s = g.as_mut().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
    f(s)
}

fn with_session<R>(h: CK_SESSION_HANDLE, f: impl FnOnce(&mut Session, &State) -> Result<R, CK_RV>) -> Result<R, CK_RV> {
    with(|s| {
        let mut sess = s.sessions.remove(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let r = f(&mut sess, s);
        s.sessions.insert(h, sess);
        r
    })
}

/// One RPC, outside the state lock.
fn call(session: CK_SESSION_HANDLE, op: Op) -> Result<Reply, CK_RV> {
    let link = with(|s| Ok(s.link.clone()))?;
    link.call(session as u32, op).map_err(failure_rv)
}

fn refresh_keys(session: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
    match call(session, Op::List)? {
        Reply::Keys(k) => with(|s| {
            s.keys = k;
            Ok(())
        }),
        _ => Err(CKR_DEVICE_ERROR),
    }
}

fn rv(r: Result<(), CK_RV>) -> CK_RV {
    r.err().unwrap_or(CKR_OK)
}

// ---------------------------------------------------------------------------
// Objects and attributes.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Private,
    Public,
    Secret,
}

fn classes(k: &KeyInfo) -> &'static [Class] {
    match k.kind {
        KeyKind::Aes256 => &[Class::Secret],
        _ => &[Class::Private, Class::Public],
    }
}

fn handle_of(k: &KeyInfo, c: Class) -> CK_OBJECT_HANDLE {
    k.handle * 2 + CK_OBJECT_HANDLE::from(c == Class::Public)
}

fn object(s: &State, h: CK_OBJECT_HANDLE) -> Option<(KeyInfo, Class)> {
    let k = s.keys.iter().find(|k| k.handle == h / 2)?;
    let c = match (h % 2, k.kind) {
        (1, KeyKind::Aes256) => return None,
        (1, _) => Class::Public,
        (_, KeyKind::Aes256) => Class::Secret,
        _ => Class::Private,
    };
    if c != Class::Public && !s.logged_in {
        return None;
    }
    Some((k.clone(), c))
}

const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// GnuPG's curve25519 OID for Ed25519 (older OpenSC sends it).
const OID_ED25519_GNU: &[u8] = &[0x06, 0x09, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xda, 0x47, 0x0f, 0x01];

fn der_octets(b: &[u8]) -> Vec<u8> {
    let mut v = vec![0x04];
    if b.len() < 128 {
        v.push(b.len() as u8);
    } else {
        v.extend([0x81, b.len() as u8]);
    }
    v.extend_from_slice(b);
    v
}

fn ulong(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn boolean(b: bool) -> Vec<u8> {
    vec![b as u8]
}

enum Attr {
    Value(Vec<u8>),
    Sensitive,
    Invalid,
}

fn key_type(k: KeyKind) -> CK_KEY_TYPE {
    match k {
        KeyKind::EcP256 | KeyKind::EcP384 => CKK_EC,
        KeyKind::Ed25519 => CKK_EC_EDWARDS,
        KeyKind::Rsa => CKK_RSA,
        KeyKind::Aes256 => CKK_AES,
    }
}

fn attr(k: &KeyInfo, c: Class, ty: CK_ATTRIBUTE_TYPE) -> Attr {
    use Attr::*;
    let u = k.usage;
    let private = c != Class::Public;
    let v = match ty {
        CKA_CLASS => ulong(match c {
            Class::Private => CKO_PRIVATE_KEY,
            Class::Public => CKO_PUBLIC_KEY,
            Class::Secret => CKO_SECRET_KEY,
        }),
        CKA_KEY_TYPE => ulong(key_type(k.kind)),
        CKA_LABEL => k.label.as_bytes().to_vec(),
        CKA_ID => k.id.clone(),
        CKA_TOKEN => boolean(true),
        CKA_LOCAL => boolean(k.local),
        CKA_PRIVATE => boolean(private),
        CKA_MODIFIABLE | CKA_COPYABLE | CKA_DERIVE | CKA_ALWAYS_AUTHENTICATE | CKA_WRAP_WITH_TRUSTED => boolean(false),
        CKA_DESTROYABLE => boolean(true),
        CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE if private => boolean(true),
        // Extractability never changes after creation.
        CKA_EXTRACTABLE if private => boolean(u.extractable),
        CKA_NEVER_EXTRACTABLE if private => boolean(!u.extractable),
        CKA_SIGN if c != Class::Public => boolean(u.allows(Usage::SIGN)),
        CKA_VERIFY if c != Class::Private => boolean(u.allows(Usage::VERIFY)),
        CKA_ENCRYPT if c != Class::Private => boolean(u.allows(Usage::ENCRYPT)),
        CKA_DECRYPT if c != Class::Public => boolean(u.allows(Usage::DECRYPT)),
        CKA_WRAP if c != Class::Private => boolean(u.allows(Usage::WRAP)),
        CKA_UNWRAP if c != Class::Public => boolean(u.allows(Usage::UNWRAP)),
        CKA_SIGN_RECOVER | CKA_VERIFY_RECOVER => boolean(false),
        CKA_EC_PARAMS => match k.kind {
            KeyKind::EcP256 => OID_P256.to_vec(),
            KeyKind::EcP384 => OID_P384.to_vec(),
            KeyKind::Ed25519 => OID_ED25519.to_vec(),
            _ => return Invalid,
        },
        CKA_EC_POINT
            if c == Class::Public && matches!(k.kind, KeyKind::EcP256 | KeyKind::EcP384 | KeyKind::Ed25519) =>
        {
            der_octets(&k.public)
        }
        CKA_MODULUS if k.kind == KeyKind::Rsa => k.public.clone(),
        CKA_PUBLIC_EXPONENT if k.kind == KeyKind::Rsa => k.exponent.clone(),
        CKA_MODULUS_BITS if k.kind == KeyKind::Rsa => ulong(k.bits as CK_ULONG),
        CKA_VALUE_LEN if k.kind == KeyKind::Aes256 => ulong(32),
        CKA_KEY_GEN_MECHANISM => ulong(match (k.local, k.kind) {
            (false, _) => CK_UNAVAILABLE_INFORMATION,
            (true, KeyKind::Ed25519) => CKM_EC_EDWARDS_KEY_PAIR_GEN,
            (true, KeyKind::Aes256) => CKM_AES_KEY_GEN,
            (true, _) => CKM_EC_KEY_PAIR_GEN,
        }),
        CKA_START_DATE | CKA_END_DATE | CKA_SUBJECT => Vec::new(),
        CKA_VALUE | CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2 | CKA_EXPONENT_1 | CKA_EXPONENT_2
        | CKA_COEFFICIENT
            if private =>
        {
            return Sensitive;
        }
        _ => return Invalid,
    };
    Value(v)
}

// ---------------------------------------------------------------------------
// Entry points.

static mut FUNCTIONS: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION { major: 2, minor: 40 },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(unsupported::C_InitToken),
    C_InitPIN: Some(unsupported::C_InitPIN),
    C_SetPIN: Some(unsupported::C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(unsupported::C_GetOperationState),
    C_SetOperationState: Some(unsupported::C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(unsupported::C_CreateObject),
    C_CopyObject: Some(unsupported::C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(unsupported::C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(unsupported::C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(unsupported::C_EncryptUpdate),
    C_EncryptFinal: Some(unsupported::C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(unsupported::C_DecryptUpdate),
    C_DecryptFinal: Some(unsupported::C_DecryptFinal),
    C_DigestInit: Some(unsupported::C_DigestInit),
    C_Digest: Some(unsupported::C_Digest),
    C_DigestUpdate: Some(unsupported::C_DigestUpdate),
    C_DigestKey: Some(unsupported::C_DigestKey),
    C_DigestFinal: Some(unsupported::C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(unsupported::C_SignRecoverInit),
    C_SignRecover: Some(unsupported::C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(unsupported::C_VerifyRecoverInit),
    C_VerifyRecover: Some(unsupported::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(unsupported::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(unsupported::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(unsupported::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(unsupported::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(wrap::C_WrapKey),
    C_UnwrapKey: Some(wrap::C_UnwrapKey),
    C_DeriveKey: Some(unsupported::C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(unsupported::C_GetFunctionStatus),
    C_CancelFunction: Some(unsupported::C_CancelFunction),
    C_WaitForSlotEvent: Some(unsupported::C_WaitForSlotEvent),
};

/// The module's one exported symbol that applications look up.
///
/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    // SAFETY: FUNCTIONS is never written; callers only read through it.
    unsafe { put(list, &raw mut FUNCTIONS) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Initialize(_args: CK_VOID_PTR) -> CK_RV {
    // Threads: the module uses its own locks (std::sync), which is what
    // CKF_OS_LOCKING_OK allows and what a NULL argument asks for.
    let mut g = match STATE.lock() {
        Ok(g) => g,
        Err(_) => return CKR_GENERAL_ERROR,
    };
    if g.is_some() {
        return CKR_CRYPTOKI_ALREADY_INITIALIZED;
    }
    let link = {
        let mut l = LINK.lock().unwrap();
        match l.as_ref().filter(|t| t.broken().is_none()) {
            Some(t) => t.clone(),
            None => {
                let target = match transport::locate() {
                    Ok(t) => t,
                    Err(why) => {
                        eprintln!("ssc-pkcs11: {why}");
                        return CKR_DEVICE_ERROR;
                    }
                };
                match Transport::connect(&target) {
                    Ok(t) => {
                        let t = Arc::new(t);
                        *l = Some(t.clone());
                        t
                    }
                    Err(why) => {
                        eprintln!("ssc-pkcs11: {why}");
                        return CKR_DEVICE_ERROR;
                    }
                }
            }
        }
    };
    // A new application: DomC forgets any earlier login (Hello), and so
    // does this process's link.
    link.set_token([0; 16]);
    let token = match link.call(0, Op::Hello) {
        Ok(Reply::Token(t)) => t,
        Ok(_) => return CKR_DEVICE_ERROR,
        Err(f) => return failure_rv(f),
    };
    debug(&format!("connected to DomC token `{}` over {}", token.label, link.what));
    *g = Some(State { link, token, sessions: HashMap::new(), next_session: 1, logged_in: false, keys: vec![] });
    CKR_OK
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Finalize(_reserved: CK_VOID_PTR) -> CK_RV {
    let Ok(mut g) = STATE.lock() else { return CKR_GENERAL_ERROR };
    match g.take() {
        Some(s) => {
            // Log out so the next application starts from scratch.
            let _ = s.link.call(0, Op::Logout);
            s.link.set_token([0; 16]);
            CKR_OK
        }
        None => CKR_CRYPTOKI_NOT_INITIALIZED,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetInfo(info: CK_INFO_PTR) -> CK_RV {
    if with(|_| Ok(())).is_err() {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    let i = CK_INFO {
        cryptokiVersion: CK_VERSION { major: 2, minor: 40 },
        manufacturerID: padded("ssc-unikernels"),
        flags: 0,
        libraryDescription: padded("DomC virtual HSM (SSC)"),
        libraryVersion: CK_VERSION { major: 0, minor: 1 },
    };
    // SAFETY: output pointer from the caller.
    unsafe { put(info, i) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetSlotList(_present: CK_BBOOL, list: CK_SLOT_ID_PTR, count: CK_ULONG_PTR) -> CK_RV {
    if with(|_| Ok(())).is_err() {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    if count.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-NULL count pointer from the caller.
    let room = unsafe { *count };
    // SAFETY: as above.
    unsafe { *count = 1 };
    if list.is_null() {
        return CKR_OK;
    }
    if room < 1 {
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: the caller's list holds `room >= 1` slot ids.
    unsafe { put(list, SLOT) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: CK_SLOT_INFO_PTR) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    if with(|_| Ok(())).is_err() {
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    let i = CK_SLOT_INFO {
        slotDescription: padded("DomC over virtio-serial ssc-hsm"),
        manufacturerID: padded("ssc-unikernels"),
        flags: CKF_TOKEN_PRESENT | CKF_HW_SLOT,
        hardwareVersion: CK_VERSION { major: 0, minor: 1 },
        firmwareVersion: CK_VERSION { major: 0, minor: 1 },
    };
    // SAFETY: output pointer from the caller.
    unsafe { put(info, i) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    let r = with(|s| {
        let t = &s.token;
        let mut flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED;
        if t.pin_set {
            flags |= CKF_USER_PIN_INITIALIZED;
        }
        if t.pin_tries_left == 0 {
            flags |= CKF_USER_PIN_LOCKED;
        } else if t.pin_tries_left == 1 {
            flags |= CKF_USER_PIN_FINAL_TRY;
        }
        let n = s.sessions.len() as CK_ULONG;
        Ok(CK_TOKEN_INFO {
            label: padded(&t.label),
            manufacturerID: padded("ssc-unikernels"),
            model: padded("DomC"),
            serialNumber: padded(&t.serial),
            flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: n,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: n,
            ulMaxPinLen: 64,
            ulMinPinLen: 4,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: CK_VERSION { major: 0, minor: 1 },
            firmwareVersion: CK_VERSION { major: 0, minor: 1 },
            utcTime: [b' '; 16],
        })
    });
    match r {
        // SAFETY: output pointer from the caller.
        Ok(i) => unsafe { put(info, i) },
        Err(e) => e,
    }
}

/// Mechanisms: (type, min key bits, max key bits, flags).
const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (CKM_EC_KEY_PAIR_GEN, 256, 384, CKF_GENERATE_KEY_PAIR | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS),
    (CKM_EC_EDWARDS_KEY_PAIR_GEN, 255, 255, CKF_GENERATE_KEY_PAIR),
    (CKM_ECDSA, 256, 384, CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS),
    (CKM_ECDSA_SHA256, 256, 384, CKF_SIGN | CKF_VERIFY),
    (CKM_ECDSA_SHA384, 256, 384, CKF_SIGN | CKF_VERIFY),
    (CKM_ECDSA_SHA512, 256, 384, CKF_SIGN | CKF_VERIFY),
    (CKM_EDDSA, 255, 255, CKF_SIGN | CKF_VERIFY),
    (CKM_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_RSA_PKCS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, CKF_SIGN | CKF_VERIFY),
    (CKM_AES_KEY_GEN, 32, 32, CKF_GENERATE),
    (CKM_AES_GCM, 32, 32, CKF_ENCRYPT | CKF_DECRYPT),
    (wrap::CKM_SSC_WRAP, 32, 32, CKF_WRAP | CKF_UNWRAP),
];

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetMechanismList(slot: CK_SLOT_ID, list: CK_MECHANISM_TYPE_PTR, count: CK_ULONG_PTR) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    if count.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-NULL count pointer from the caller.
    let room = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = MECHANISMS.len() as CK_ULONG };
    if list.is_null() {
        return CKR_OK;
    }
    if room < MECHANISMS.len() {
        return CKR_BUFFER_TOO_SMALL;
    }
    for (i, m) in MECHANISMS.iter().enumerate() {
        // SAFETY: the caller's list holds `room` entries, i < room.
        unsafe { list.add(i).write(m.0) };
    }
    CKR_OK
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetMechanismInfo(slot: CK_SLOT_ID, ty: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO_PTR) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    match MECHANISMS.iter().find(|m| m.0 == ty) {
        // SAFETY: output pointer from the caller.
        Some(m) => unsafe { put(info, CK_MECHANISM_INFO { ulMinKeySize: m.1, ulMaxKeySize: m.2, flags: m.3 }) },
        None => CKR_MECHANISM_INVALID,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _app: CK_VOID_PTR,
    _notify: CK_NOTIFY,
    out: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    if flags & CKF_SERIAL_SESSION == 0 {
        return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
    }
    let r = with(|s| {
        let h = s.next_session;
        s.next_session += 1;
        s.sessions.insert(h, Session { rw: flags & CKF_RW_SESSION != 0, ..Session::default() });
        Ok(h)
    });
    match r {
        // SAFETY: output pointer from the caller.
        Ok(h) => unsafe { put(out, h) },
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    rv(with(|s| {
        s.sessions.remove(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if s.sessions.is_empty() {
            s.logged_in = false;
        }
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    if slot != SLOT {
        return CKR_SLOT_ID_INVALID;
    }
    rv(with(|s| {
        s.sessions.clear();
        s.logged_in = false;
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetSessionInfo(h: CK_SESSION_HANDLE, info: CK_SESSION_INFO_PTR) -> CK_RV {
    let r = with(|s| {
        let sess = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let state = match (sess.rw, s.logged_in) {
            (true, true) => CKS_RW_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (false, false) => CKS_RO_PUBLIC_SESSION,
        };
        let flags = CKF_SERIAL_SESSION | if sess.rw { CKF_RW_SESSION } else { 0 };
        Ok(CK_SESSION_INFO { slotID: SLOT, state, flags, ulDeviceError: 0 })
    });
    match r {
        // SAFETY: output pointer from the caller.
        Ok(i) => unsafe { put(info, i) },
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Login(h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: CK_UTF8CHAR_PTR, len: CK_ULONG) -> CK_RV {
    if user != CKU_USER {
        // The security officer is the tenant, on the control link.
        return CKR_USER_TYPE_INVALID;
    }
    if let Err(e) = with(|s| match (s.sessions.contains_key(&h), s.logged_in) {
        (false, _) => Err(CKR_SESSION_HANDLE_INVALID),
        (true, true) => Err(CKR_USER_ALREADY_LOGGED_IN),
        _ => Ok(()),
    }) {
        return e;
    }
    // SAFETY: the caller passes `len` PIN bytes.
    let pin = unsafe { bytes(pin, len) }.to_vec();
    let r = match call(h, Op::Login { pin }) {
        // The token is this process's: every later request carries it.
        Ok(Reply::LoggedIn { token }) => with(|s| {
            s.link.set_token(token);
            s.logged_in = true;
            Ok(())
        }),
        Ok(_) => Err(CKR_DEVICE_ERROR),
        Err(e) => Err(e),
    };
    if r == Err(CKR_PIN_INCORRECT) || r == Err(CKR_PIN_LOCKED) {
        // Refresh the tries left for C_GetTokenInfo.
        if let Ok(Reply::Token(t)) = call(h, Op::Hello) {
            let _ = with(|s| {
                s.token = t;
                Ok(())
            });
        }
    }
    rv(r)
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Logout(h: CK_SESSION_HANDLE) -> CK_RV {
    let r = with(|s| match (s.sessions.contains_key(&h), s.logged_in) {
        (false, _) => Err(CKR_SESSION_HANDLE_INVALID),
        (true, false) => Err(CKR_USER_NOT_LOGGED_IN),
        _ => {
            s.logged_in = false;
            Ok(())
        }
    });
    let r = r.and_then(|()| call(h, Op::Logout).map(|_| ()));
    let _ = with(|s| {
        s.link.set_token([0; 16]);
        Ok(())
    });
    rv(r)
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_DestroyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> CK_RV {
    let r = with_session(h, |_, s| object(s, obj).ok_or(CKR_OBJECT_HANDLE_INVALID).map(|(k, _)| k.handle));
    let r = r.and_then(|key| call(h, Op::Destroy { key })).and_then(|_| refresh_keys(h));
    rv(r)
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GetAttributeValue(
    h: CK_SESSION_HANDLE,
    obj: CK_OBJECT_HANDLE,
    tmpl: CK_ATTRIBUTE_PTR,
    n: CK_ULONG,
) -> CK_RV {
    let found = with_session(h, |_, s| object(s, obj).ok_or(CKR_OBJECT_HANDLE_INVALID));
    let (k, c) = match found {
        Ok(x) => x,
        Err(e) => return e,
    };
    let mut result = CKR_OK;
    // SAFETY: the caller's template of `n` attributes.
    for a in unsafe { template(tmpl, n) } {
        match attr(&k, c, a.type_) {
            Attr::Value(v) => {
                if a.pValue.is_null() {
                    a.ulValueLen = v.len() as CK_ULONG;
                } else if (a.ulValueLen as usize) < v.len() {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    result = CKR_BUFFER_TOO_SMALL;
                } else {
                    // SAFETY: the caller said pValue holds ulValueLen bytes.
                    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len()) };
                    a.ulValueLen = v.len() as CK_ULONG;
                }
            }
            Attr::Sensitive => {
                a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                result = CKR_ATTRIBUTE_SENSITIVE;
            }
            Attr::Invalid => {
                a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                result = CKR_ATTRIBUTE_TYPE_INVALID;
            }
        }
    }
    result
}

/// A template's attributes as owned (type, value) pairs.
///
/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn owned_template(tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    // SAFETY: the caller's template; each value holds ulValueLen bytes.
    unsafe { template(tmpl, n) }
        .iter()
        // SAFETY: as above.
        .map(|a| (a.type_, unsafe { bytes(a.pValue as *const u8, a.ulValueLen) }.to_vec()))
        .collect()
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_FindObjectsInit(h: CK_SESSION_HANDLE, tmpl: CK_ATTRIBUTE_PTR, n: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's template.
    let want = unsafe { owned_template(tmpl, n) };
    if let Err(e) = with_session(h, |sess, _| if sess.found.is_some() { Err(CKR_OPERATION_ACTIVE) } else { Ok(()) }) {
        return e;
    }
    if let Err(e) = refresh_keys(h) {
        return e;
    }
    rv(with_session(h, |sess, s| {
        let mut found = vec![];
        for k in &s.keys {
            for &c in classes(k) {
                let h = handle_of(k, c);
                if object(s, h).is_none() {
                    continue;
                }
                let matches = want.iter().all(|(ty, v)| match attr(k, c, *ty) {
                    // CK_BBOOL may come as a wider value from some callers.
                    Attr::Value(mine) => &mine == v || (mine.len() == 1 && v.len() > 1 && v[0] == mine[0]),
                    _ => false,
                });
                if matches {
                    found.push(h);
                }
            }
        }
        sess.found = Some(found);
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_FindObjects(
    h: CK_SESSION_HANDLE,
    out: CK_OBJECT_HANDLE_PTR,
    max: CK_ULONG,
    count: CK_ULONG_PTR,
) -> CK_RV {
    let r = with_session(h, |sess, _| {
        let found = sess.found.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let n = found.len().min(max as usize);
        Ok(found.drain(..n).collect::<Vec<_>>())
    });
    match r {
        Ok(batch) => {
            if !batch.is_empty() && out.is_null() {
                return CKR_ARGUMENTS_BAD;
            }
            for (i, o) in batch.iter().enumerate() {
                // SAFETY: the caller's array holds `max` handles, i < max.
                unsafe { out.add(i).write(*o) };
            }
            // SAFETY: output pointer from the caller.
            unsafe { put(count, batch.len() as CK_ULONG) }
        }
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_FindObjectsFinal(h: CK_SESSION_HANDLE) -> CK_RV {
    rv(with_session(h, |sess, _| sess.found.take().map(|_| ()).ok_or(CKR_OPERATION_NOT_INITIALIZED)))
}

fn hash_of(mech: CK_MECHANISM_TYPE) -> Option<Hash> {
    match mech {
        CKM_SHA256 => Some(Hash::Sha256),
        CKM_SHA384 => Some(Hash::Sha384),
        CKM_SHA512 => Some(Hash::Sha512),
        _ => None,
    }
}

/// The mechanism a `CK_MECHANISM` names, its parameters checked.
///
/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn sign_mech(m: CK_MECHANISM_PTR) -> Result<SignMech, CK_RV> {
    if m.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL mechanism from the caller.
    let m = unsafe { &*m };
    let pss = |default: Option<Hash>| -> Result<SignMech, CK_RV> {
        if m.pParameter.is_null() || (m.ulParameterLen as usize) < std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        // SAFETY: the caller's parameter is a CK_RSA_PKCS_PSS_PARAMS (size checked).
        let p = unsafe { &*(m.pParameter as *const CK_RSA_PKCS_PSS_PARAMS) };
        let hash = hash_of(p.hashAlg).ok_or(CKR_MECHANISM_PARAM_INVALID)?;
        if default.is_some_and(|d| d != hash) {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        Ok(SignMech::RsaPss { hash, prehashed: default.is_none(), salt_len: p.sLen as u32 })
    };
    Ok(match m.mechanism {
        CKM_ECDSA => SignMech::Ecdsa { hash: None },
        CKM_ECDSA_SHA256 => SignMech::Ecdsa { hash: Some(Hash::Sha256) },
        CKM_ECDSA_SHA384 => SignMech::Ecdsa { hash: Some(Hash::Sha384) },
        CKM_ECDSA_SHA512 => SignMech::Ecdsa { hash: Some(Hash::Sha512) },
        CKM_EDDSA => SignMech::EdDsa,
        CKM_RSA_PKCS => SignMech::RsaPkcs1 { hash: None },
        CKM_SHA256_RSA_PKCS => SignMech::RsaPkcs1 { hash: Some(Hash::Sha256) },
        CKM_SHA384_RSA_PKCS => SignMech::RsaPkcs1 { hash: Some(Hash::Sha384) },
        CKM_SHA512_RSA_PKCS => SignMech::RsaPkcs1 { hash: Some(Hash::Sha512) },
        CKM_RSA_PKCS_PSS => pss(None)?,
        CKM_SHA256_RSA_PKCS_PSS => pss(Some(Hash::Sha256))?,
        CKM_SHA384_RSA_PKCS_PSS => pss(Some(Hash::Sha384))?,
        CKM_SHA512_RSA_PKCS_PSS => pss(Some(Hash::Sha512))?,
        _ => return Err(CKR_MECHANISM_INVALID),
    })
}

fn fits(kind: KeyKind, mech: SignMech) -> bool {
    matches!(
        (kind, mech),
        (KeyKind::EcP256 | KeyKind::EcP384, SignMech::Ecdsa { .. })
            | (KeyKind::Ed25519, SignMech::EdDsa)
            | (KeyKind::Rsa, SignMech::RsaPkcs1 { .. } | SignMech::RsaPss { .. })
    )
}

fn sig_len(k: &KeyInfo) -> usize {
    match k.kind {
        KeyKind::EcP256 | KeyKind::Ed25519 => 64,
        KeyKind::EcP384 => 96,
        KeyKind::Rsa => k.public.len(),
        KeyKind::Aes256 => 0,
    }
}

/// C_SignInit and C_VerifyInit.
///
/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn sign_init(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE, verify: bool) -> CK_RV {
    // SAFETY: the caller's mechanism.
    let mech = match unsafe { sign_mech(m) } {
        Ok(x) => x,
        Err(e) => return e,
    };
    rv(with_session(h, |sess, s| {
        let slot = if verify { &mut sess.verify } else { &mut sess.sign };
        if slot.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let (k, c) = object(s, key).ok_or(CKR_KEY_HANDLE_INVALID)?;
        if (c == Class::Public) != verify || !fits(k.kind, mech) {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        *slot = Some(SignOp { key: k.handle, mech, sig_len: sig_len(&k), data: vec![] });
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_SignInit(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded caller pointers.
    unsafe { sign_init(h, m, key, false) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_VerifyInit(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded caller pointers.
    unsafe { sign_init(h, m, key, true) }
}

/// Finishes a signature: length query, or the RPC. `extra` is the data of
/// a single-part C_Sign.
///
/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn sign_finish(h: CK_SESSION_HANDLE, extra: &[u8], sig: *mut u8, sig_len: CK_ULONG_PTR) -> CK_RV {
    let op = with_session(h, |sess, _| sess.sign.clone().ok_or(CKR_OPERATION_NOT_INITIALIZED));
    let op = match op {
        Ok(op) => op,
        Err(e) => return e,
    };
    if sig.is_null() {
        // A length query keeps the operation active.
        // SAFETY: caller's length pointer.
        return unsafe { put(sig_len, op.sig_len as CK_ULONG) };
    }
    // A short buffer is refused before the RPC, leaving the operation
    // active as PKCS#11 asks.
    // SAFETY: caller's length pointer, read only when non-NULL.
    if !sig_len.is_null() && (unsafe { *sig_len } as usize) < op.sig_len {
        // SAFETY: caller's length pointer (checked non-NULL).
        unsafe { *sig_len = op.sig_len as CK_ULONG };
        return CKR_BUFFER_TOO_SMALL;
    }
    let _ = with_session(h, |sess, _| {
        sess.sign = None;
        Ok(())
    });
    let mut data = op.data;
    data.extend_from_slice(extra);
    match call(h, Op::Sign { key: op.key, mech: op.mech, data }) {
        // SAFETY: caller's buffers, sized as checked above.
        Ok(Reply::Bytes(s)) => unsafe { output(&s, sig, sig_len) },
        Ok(_) => CKR_DEVICE_ERROR,
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Sign(
    h: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    sig: CK_BYTE_PTR,
    sig_len: CK_ULONG_PTR,
) -> CK_RV {
    // SAFETY: the caller's data and output buffers.
    unsafe { sign_finish(h, bytes(data, len), sig, sig_len) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_SignUpdate(h: CK_SESSION_HANDLE, part: CK_BYTE_PTR, len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's data.
    let part = unsafe { bytes(part, len) };
    rv(with_session(h, |sess, _| {
        let op = sess.sign.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        if op.data.len() + part.len() > ssc_abi::hsm::MAX_FRAME - 1024 {
            sess.sign = None;
            return Err(CKR_DATA_LEN_RANGE);
        }
        op.data.extend_from_slice(part);
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_SignFinal(h: CK_SESSION_HANDLE, sig: CK_BYTE_PTR, sig_len: CK_ULONG_PTR) -> CK_RV {
    // SAFETY: the caller's output buffers.
    unsafe { sign_finish(h, &[], sig, sig_len) }
}

fn verify_finish(h: CK_SESSION_HANDLE, extra: &[u8], signature: &[u8]) -> CK_RV {
    let op = with_session(h, |sess, _| sess.verify.take().ok_or(CKR_OPERATION_NOT_INITIALIZED));
    let op = match op {
        Ok(op) => op,
        Err(e) => return e,
    };
    if signature.len() != op.sig_len {
        return CKR_SIGNATURE_LEN_RANGE;
    }
    let mut data = op.data;
    data.extend_from_slice(extra);
    rv(call(h, Op::Verify { key: op.key, mech: op.mech, data, signature: signature.to_vec() }).map(|_| ()))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Verify(
    h: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    sig: CK_BYTE_PTR,
    sig_len: CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { verify_finish(h, bytes(data, len), bytes(sig, sig_len)) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_VerifyUpdate(h: CK_SESSION_HANDLE, part: CK_BYTE_PTR, len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's data.
    let part = unsafe { bytes(part, len) };
    rv(with_session(h, |sess, _| {
        let op = sess.verify.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        op.data.extend_from_slice(part);
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_VerifyFinal(h: CK_SESSION_HANDLE, sig: CK_BYTE_PTR, sig_len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's buffer.
    verify_finish(h, &[], unsafe { bytes(sig, sig_len) })
}

/// C_EncryptInit and C_DecryptInit: AES-GCM with a 128-bit tag.
///
/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn crypt_init(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE, decrypt: bool) -> CK_RV {
    if m.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-NULL mechanism from the caller.
    let m = unsafe { &*m };
    if m.mechanism != CKM_AES_GCM {
        return CKR_MECHANISM_INVALID;
    }
    if m.pParameter.is_null() || (m.ulParameterLen as usize) < std::mem::size_of::<CK_GCM_PARAMS>() {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // SAFETY: the parameter is a CK_GCM_PARAMS (size checked).
    let p = unsafe { &*(m.pParameter as *const CK_GCM_PARAMS) };
    if p.ulTagBits != 128 || p.ulIvLen != 12 {
        return CKR_MECHANISM_PARAM_INVALID;
    }
    // SAFETY: the parameter's IV and AAD buffers.
    let (iv, aad) = unsafe { (bytes(p.pIv, p.ulIvLen).to_vec(), bytes(p.pAAD, p.ulAADLen).to_vec()) };
    rv(with_session(h, |sess, s| {
        let slot = if decrypt { &mut sess.decrypt } else { &mut sess.encrypt };
        if slot.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let (k, _) = object(s, key).ok_or(CKR_KEY_HANDLE_INVALID)?;
        if k.kind != KeyKind::Aes256 {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        *slot = Some(CryptOp { key: k.handle, iv, aad });
        Ok(())
    }))
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_EncryptInit(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded caller pointers.
    unsafe { crypt_init(h, m, key, false) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_DecryptInit(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: forwarded caller pointers.
    unsafe { crypt_init(h, m, key, true) }
}

/// # Safety
///
/// Pointer arguments as for the entry points: NULL or valid for the
/// length passed with them.
unsafe fn crypt(h: CK_SESSION_HANDLE, input: &[u8], out: *mut u8, out_len: CK_ULONG_PTR, decrypt: bool) -> CK_RV {
    let op = with_session(h, |sess, _| {
        let slot = if decrypt { &sess.decrypt } else { &sess.encrypt };
        slot.clone().ok_or(CKR_OPERATION_NOT_INITIALIZED)
    });
    let op = match op {
        Ok(op) => op,
        Err(e) => return e,
    };
    let len = if decrypt { input.len().saturating_sub(16) } else { input.len() + 16 };
    if out.is_null() {
        // SAFETY: caller's length pointer.
        return unsafe { put(out_len, len as CK_ULONG) };
    }
    let _ = with_session(h, |sess, _| {
        if decrypt {
            sess.decrypt = None
        } else {
            sess.encrypt = None
        };
        Ok(())
    });
    let (key, iv, aad, data) = (op.key, op.iv, op.aad, input.to_vec());
    let req = if decrypt { Op::Decrypt { key, iv, aad, data } } else { Op::Encrypt { key, iv, aad, data } };
    match call(h, req) {
        // SAFETY: the caller's output buffers.
        Ok(Reply::Bytes(b)) => unsafe { output(&b, out, out_len) },
        Ok(_) => CKR_DEVICE_ERROR,
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Encrypt(
    h: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { crypt(h, bytes(data, len), out, out_len, false) }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_Decrypt(
    h: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    len: CK_ULONG,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    // SAFETY: the caller's buffers.
    unsafe { crypt(h, bytes(data, len), out, out_len, true) }
}

/// Whether a template asks for a session object (`CKA_TOKEN` false). DomC
/// keeps only token objects, which outlive the session: rather than hand
/// back a key that claims `CKA_TOKEN` true and piles up in DomC, such a
/// template is refused (`CKR_TEMPLATE_INCONSISTENT`, as PKCS#11 allows).
fn asks_for_session_object(templates: &[&[(CK_ATTRIBUTE_TYPE, Vec<u8>)]]) -> bool {
    templates.iter().flat_map(|t| t.iter()).any(|(ty, v)| *ty == CKA_TOKEN && v.first() == Some(&0))
}

/// Label, id and usage from templates (later templates win). A template
/// that asks for wrap or unwrap without naming other operations gets a
/// wrap-only key (DomC refuses a key that both wraps and decrypts);
/// `CKA_EXTRACTABLE` defaults to false.
fn key_facts(templates: &[&[(CK_ATTRIBUTE_TYPE, Vec<u8>)]], default: u8) -> (String, Vec<u8>, Usage) {
    let (mut label, mut id, mut ops, mut named, mut extractable) = (String::new(), vec![], default, 0u8, false);
    for t in templates {
        for (ty, v) in t.iter() {
            let on = v.first().is_some_and(|b| *b != 0);
            let bit = match *ty {
                CKA_LABEL => {
                    label = String::from_utf8_lossy(v).into_owned();
                    continue;
                }
                CKA_ID => {
                    id = v.clone();
                    continue;
                }
                CKA_EXTRACTABLE => {
                    extractable = on;
                    continue;
                }
                CKA_SIGN => Usage::SIGN,
                CKA_VERIFY => Usage::VERIFY,
                CKA_ENCRYPT => Usage::ENCRYPT,
                CKA_DECRYPT => Usage::DECRYPT,
                CKA_WRAP => Usage::WRAP,
                CKA_UNWRAP => Usage::UNWRAP,
                _ => continue,
            };
            named |= bit;
            if on { ops |= bit } else { ops &= !bit }
        }
    }
    if ops & Usage::WRAPPING_OPS != 0 {
        // Default operations give way to an explicit wrapping key.
        ops &= Usage::WRAPPING_OPS | named;
    }
    (label, id, Usage { ops, rate_per_sec: 0, extractable })
}

fn generate(h: CK_SESSION_HANDLE, kind: KeyKind, label: String, id: Vec<u8>, usage: Usage) -> Result<KeyInfo, CK_RV> {
    with_session(h, |_, _| Ok(()))?;
    match call(h, Op::Generate { kind, label, id, usage })? {
        Reply::Key(k) => {
            refresh_keys(h)?;
            Ok(k)
        }
        _ => Err(CKR_DEVICE_ERROR),
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GenerateKeyPair(
    h: CK_SESSION_HANDLE,
    m: CK_MECHANISM_PTR,
    pub_t: CK_ATTRIBUTE_PTR,
    pub_n: CK_ULONG,
    priv_t: CK_ATTRIBUTE_PTR,
    priv_n: CK_ULONG,
    pub_out: CK_OBJECT_HANDLE_PTR,
    priv_out: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    if m.is_null() || pub_out.is_null() || priv_out.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the caller's mechanism and templates.
    let (mech, public, private) =
        unsafe { ((*m).mechanism, owned_template(pub_t, pub_n), owned_template(priv_t, priv_n)) };
    let params = public.iter().chain(&private).find(|(t, _)| *t == CKA_EC_PARAMS).map(|(_, v)| v.as_slice());
    let kind = match (mech, params) {
        (CKM_EC_KEY_PAIR_GEN, Some(OID_P256)) => KeyKind::EcP256,
        (CKM_EC_KEY_PAIR_GEN, Some(OID_P384)) => KeyKind::EcP384,
        (CKM_EC_KEY_PAIR_GEN, _) => return CKR_CURVE_NOT_SUPPORTED,
        (CKM_EC_EDWARDS_KEY_PAIR_GEN, None | Some(OID_ED25519 | OID_ED25519_GNU)) => KeyKind::Ed25519,
        // PrintableString "edwards25519" (PKCS#11 3.0).
        (CKM_EC_EDWARDS_KEY_PAIR_GEN, Some(p)) if p.ends_with(b"edwards25519") => KeyKind::Ed25519,
        (CKM_EC_EDWARDS_KEY_PAIR_GEN, _) => return CKR_CURVE_NOT_SUPPORTED,
        (CKM_RSA_PKCS_KEY_PAIR_GEN, _) => {
            eprintln!("ssc-pkcs11: DomC does not generate RSA keys; the tenant imports them with `ssc hsm import`");
            return CKR_MECHANISM_INVALID;
        }
        _ => return CKR_MECHANISM_INVALID,
    };
    if asks_for_session_object(&[&public, &private]) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    let (label, id, usage) = key_facts(&[&public, &private], Usage::SIGN | Usage::VERIFY);
    match generate(h, kind, label, id, usage) {
        Ok(k) => {
            // SAFETY: non-NULL output pointers from the caller.
            unsafe {
                put(pub_out, handle_of(&k, Class::Public));
                put(priv_out, handle_of(&k, Class::Private))
            }
        }
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GenerateKey(
    h: CK_SESSION_HANDLE,
    m: CK_MECHANISM_PTR,
    tmpl: CK_ATTRIBUTE_PTR,
    n: CK_ULONG,
    out: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    if m.is_null() || out.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the caller's mechanism and template.
    let (mech, t) = unsafe { ((*m).mechanism, owned_template(tmpl, n)) };
    if mech != CKM_AES_KEY_GEN {
        return CKR_MECHANISM_INVALID;
    }
    if asks_for_session_object(&[&t]) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    if let Some((_, v)) = t.iter().find(|(ty, _)| *ty == CKA_VALUE_LEN)
        && v.len() == 8
        && u64::from_ne_bytes(v[..8].try_into().unwrap()) != 32
    {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    let (label, id, usage) = key_facts(&[&t], Usage::ENCRYPT | Usage::DECRYPT);
    match generate(h, KeyKind::Aes256, label, id, usage) {
        // SAFETY: non-NULL output pointer from the caller.
        Ok(k) => unsafe { put(out, handle_of(&k, Class::Secret)) },
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_SeedRandom(h: CK_SESSION_HANDLE, _seed: CK_BYTE_PTR, _len: CK_ULONG) -> CK_RV {
    match with_session(h, |_, _| Ok(())) {
        Ok(()) => CKR_RANDOM_SEED_NOT_SUPPORTED,
        Err(e) => e,
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
unsafe extern "C" fn C_GenerateRandom(h: CK_SESSION_HANDLE, out: CK_BYTE_PTR, len: CK_ULONG) -> CK_RV {
    if let Err(e) = with_session(h, |_, _| Ok(())) {
        return e;
    }
    if out.is_null() && len > 0 {
        return CKR_ARGUMENTS_BAD;
    }
    let mut done = 0usize;
    while done < len as usize {
        let n = (len as usize - done).min(ssc_abi::hsm::MAX_RANDOM as usize);
        match call(h, Op::Random { len: n as u32 }) {
            Ok(Reply::Bytes(b)) if b.len() == n => {
                // SAFETY: the caller's buffer holds `len` bytes; done + n <= len.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out.add(done), n) };
                done += n;
            }
            Ok(_) => return CKR_DEVICE_ERROR,
            Err(e) => return e,
        }
    }
    CKR_OK
}
