//! `C_WrapKey` and `C_UnwrapKey` under DomC's wrapping model (issue 19,
//! item 1): only a key created extractable (`CKA_EXTRACTABLE`) can be
//! wrapped, only by a key whose usage is wrap/unwrap alone; the blob is
//! DomC's own format (AES-256-GCM, the key's kind and policy authenticated
//! as AAD), so the mechanism is a vendor one, [`CKM_SSC_WRAP`], and
//! `C_UnwrapKey` gives back exactly the policy the key was wrapped with:
//! a template can name the copy (`CKA_LABEL`, `CKA_ID`) but never widen
//! what it may do. DomC enforces all of it; the module only forwards.

use cryptoki_sys::*;
use ssc_abi::hsm::{KeyInfo, KeyKind, Op, Reply, Usage};

use super::{
    Class, asks_for_session_object, bytes, call, handle_of, object, output, owned_template, put, refresh_keys, with,
    with_session,
};

/// DomC's key-wrapping mechanism ("SSCW" in the vendor range).
pub const CKM_SSC_WRAP: CK_MECHANISM_TYPE = CKM_VENDOR_DEFINED | 0x5353_4357;

/// The DomC handle of an AES wrapping key named by `h`.
fn wrapping_key(h: CK_OBJECT_HANDLE) -> Result<u64, CK_RV> {
    with(|s| match object(s, h) {
        Some((k, Class::Secret)) => Ok(k.handle),
        Some(_) => Err(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
        None => Err(CKR_WRAPPING_KEY_HANDLE_INVALID),
    })
}

/// Whether the attributes a template states hold for the unwrapped key:
/// its policy is the one it was wrapped with, and a template may not
/// pretend otherwise (every DomC key is sensitive).
fn template_agrees(t: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)], k: &KeyInfo) -> bool {
    t.iter().all(|(ty, v)| {
        let on = v.first().is_some_and(|b| *b != 0);
        let have = match *ty {
            CKA_EXTRACTABLE => k.usage.extractable,
            CKA_SENSITIVE => true,
            CKA_SIGN => k.usage.allows(Usage::SIGN),
            CKA_VERIFY => k.usage.allows(Usage::VERIFY),
            CKA_ENCRYPT => k.usage.allows(Usage::ENCRYPT),
            CKA_DECRYPT => k.usage.allows(Usage::DECRYPT),
            CKA_WRAP => k.usage.allows(Usage::WRAP),
            CKA_UNWRAP => k.usage.allows(Usage::UNWRAP),
            _ => return true,
        };
        on == have
    })
}

/// What both calls check first: the mechanism is [`CKM_SSC_WRAP`], and the
/// session is logged in (wrapping works on private and secret objects).
///
/// # Safety
///
/// `m` is NULL or one `CK_MECHANISM`.
unsafe fn begin(h: CK_SESSION_HANDLE, m: CK_MECHANISM_PTR) -> Result<(), CK_RV> {
    if m.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-NULL mechanism from the caller.
    if unsafe { (*m).mechanism } != CKM_SSC_WRAP {
        return Err(CKR_MECHANISM_INVALID);
    }
    with_session(h, |_, s| if s.logged_in { Ok(()) } else { Err(CKR_USER_NOT_LOGGED_IN) })
}

/// The blob of `key` wrapped by `wrapping`: the one a length query of
/// this session made (PKCS#11 asks for the length first, and each wrap
/// is a fresh blob and an audit entry), or a new one.
fn wrapped(h: CK_SESSION_HANDLE, wrapping: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE) -> Result<Vec<u8>, CK_RV> {
    let pending = with_session(h, |sess, _| Ok(sess.wrapped.take()))?;
    if let Some((w, k, blob)) = pending
        && (w, k) == (wrapping, key)
    {
        return Ok(blob);
    }
    let wrapping_handle = wrapping_key(wrapping)?;
    let target = with(|s| match object(s, key) {
        Some((k, Class::Private | Class::Secret)) => Ok(k.handle),
        Some(_) => Err(CKR_KEY_NOT_WRAPPABLE),
        None => Err(CKR_KEY_HANDLE_INVALID),
    })?;
    match call(h, Op::Wrap { wrapping: wrapping_handle, key: target })? {
        Reply::Bytes(b) => Ok(b),
        _ => Err(CKR_DEVICE_ERROR),
    }
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
pub(crate) unsafe extern "C" fn C_WrapKey(
    h: CK_SESSION_HANDLE,
    m: CK_MECHANISM_PTR,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: CK_BYTE_PTR,
    out_len: CK_ULONG_PTR,
) -> CK_RV {
    if out_len.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the caller's mechanism.
    if let Err(e) = unsafe { begin(h, m) } {
        return e;
    }
    let blob = match wrapped(h, wrapping, key) {
        Ok(b) => b,
        Err(e) => return e,
    };
    // SAFETY: the caller's output buffer and length.
    let rv = unsafe { output(&blob, out, out_len) };
    if rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && out.is_null()) {
        // The caller asks again with room: hand it the same blob.
        let _ = with_session(h, |sess, _| {
            sess.wrapped = Some((wrapping, key, blob));
            Ok(())
        });
    }
    rv
}

/// # Safety
///
/// The PKCS#11 v2.40 caller contract: each pointer argument is NULL or
/// valid for the length passed with it (one object where none is).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe extern "C" fn C_UnwrapKey(
    h: CK_SESSION_HANDLE,
    m: CK_MECHANISM_PTR,
    unwrapping: CK_OBJECT_HANDLE,
    blob: CK_BYTE_PTR,
    len: CK_ULONG,
    tmpl: CK_ATTRIBUTE_PTR,
    n: CK_ULONG,
    out: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    if out.is_null() || blob.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the caller's mechanism.
    if let Err(e) = unsafe { begin(h, m) } {
        return e;
    }
    // SAFETY: the caller's wrapped key and template.
    let (blob, t) = unsafe { (bytes(blob, len).to_vec(), owned_template(tmpl, n)) };
    if asks_for_session_object(&[&t]) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    let label = t.iter().find(|(ty, _)| *ty == CKA_LABEL).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    let id = t.iter().find(|(ty, _)| *ty == CKA_ID).map(|(_, v)| v.clone()).unwrap_or_default();
    let wrapping = match wrapping_key(unwrapping) {
        Ok(w) => w,
        Err(CKR_WRAPPING_KEY_HANDLE_INVALID) => return CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        Err(CKR_WRAPPING_KEY_TYPE_INCONSISTENT) => return CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
        Err(e) => return e,
    };
    let op = Op::Unwrap { wrapping, blob, label: label.unwrap_or_else(|| "unwrapped".into()), id };
    let k = match call(h, op) {
        Ok(Reply::Key(k)) => k,
        Ok(_) => return CKR_DEVICE_ERROR,
        Err(e) => return e,
    };
    if !template_agrees(&t, &k) {
        // The copy exists only with the policy it was wrapped with.
        let _ = call(h, Op::Destroy { key: k.handle });
        return CKR_TEMPLATE_INCONSISTENT;
    }
    if let Err(e) = refresh_keys(h) {
        return e;
    }
    let class = if k.kind == KeyKind::Aes256 { Class::Secret } else { Class::Private };
    // SAFETY: non-NULL output pointer from the caller.
    unsafe { put(out, handle_of(&k, class)) }
}
