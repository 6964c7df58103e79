//! Entry points DomC does not offer: each returns
//! `CKR_FUNCTION_NOT_SUPPORTED` (generated from cryptoki-sys's
//! `CK_FUNCTION_LIST` signatures), so a caller gets an error code, never a
//! NULL function pointer.

use cryptoki_sys::*;

pub(crate) unsafe extern "C" fn C_InitToken(
    _a1: CK_SLOT_ID,
    _a2: *mut CK_UTF8CHAR,
    _a3: CK_ULONG,
    _a4: *mut CK_UTF8CHAR,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_InitPIN(_a1: CK_SESSION_HANDLE, _a2: *mut CK_UTF8CHAR, _a3: CK_ULONG) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SetPIN(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_UTF8CHAR,
    _a3: CK_ULONG,
    _a4: *mut CK_UTF8CHAR,
    _a5: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_GetOperationState(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SetOperationState(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: CK_OBJECT_HANDLE,
    _a5: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_CreateObject(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_ATTRIBUTE,
    _a3: CK_ULONG,
    _a4: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_CopyObject(
    _a1: CK_SESSION_HANDLE,
    _a2: CK_OBJECT_HANDLE,
    _a3: *mut CK_ATTRIBUTE,
    _a4: CK_ULONG,
    _a5: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_GetObjectSize(
    _a1: CK_SESSION_HANDLE,
    _a2: CK_OBJECT_HANDLE,
    _a3: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SetAttributeValue(
    _a1: CK_SESSION_HANDLE,
    _a2: CK_OBJECT_HANDLE,
    _a3: *mut CK_ATTRIBUTE,
    _a4: CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_EncryptUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_EncryptFinal(_a1: CK_SESSION_HANDLE, _a2: *mut CK_BYTE, _a3: *mut CK_ULONG) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DecryptUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DecryptFinal(_a1: CK_SESSION_HANDLE, _a2: *mut CK_BYTE, _a3: *mut CK_ULONG) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DigestInit(_a1: CK_SESSION_HANDLE, _a2: *mut CK_MECHANISM) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_Digest(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DigestUpdate(_a1: CK_SESSION_HANDLE, _a2: *mut CK_BYTE, _a3: CK_ULONG) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DigestKey(_a1: CK_SESSION_HANDLE, _a2: CK_OBJECT_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DigestFinal(_a1: CK_SESSION_HANDLE, _a2: *mut CK_BYTE, _a3: *mut CK_ULONG) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SignRecoverInit(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_MECHANISM,
    _a3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SignRecover(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_VerifyRecoverInit(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_MECHANISM,
    _a3: CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_VerifyRecover(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DigestEncryptUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DecryptDigestUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_SignEncryptUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DecryptVerifyUpdate(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_BYTE,
    _a3: CK_ULONG,
    _a4: *mut CK_BYTE,
    _a5: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_DeriveKey(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_MECHANISM,
    _a3: CK_OBJECT_HANDLE,
    _a4: *mut CK_ATTRIBUTE,
    _a5: CK_ULONG,
    _a6: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_WaitForSlotEvent(
    _a1: CK_FLAGS,
    _a2: *mut CK_SLOT_ID,
    _a3: *mut ::std::os::raw::c_void,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_WrapKey(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_MECHANISM,
    _a3: CK_OBJECT_HANDLE,
    _a4: CK_OBJECT_HANDLE,
    _a5: *mut CK_BYTE,
    _a6: *mut CK_ULONG,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}

pub(crate) unsafe extern "C" fn C_UnwrapKey(
    _a1: CK_SESSION_HANDLE,
    _a2: *mut CK_MECHANISM,
    _a3: CK_OBJECT_HANDLE,
    _a4: *mut CK_BYTE,
    _a5: CK_ULONG,
    _a6: *mut CK_ATTRIBUTE,
    _a7: CK_ULONG,
    _a8: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    CKR_FUNCTION_NOT_SUPPORTED
}
pub(crate) unsafe extern "C" fn C_GetFunctionStatus(_a1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}

pub(crate) unsafe extern "C" fn C_CancelFunction(_a1: CK_SESSION_HANDLE) -> CK_RV {
    CKR_FUNCTION_NOT_PARALLEL
}
