//! What the tenant's verifier and Udom0 parse from others: TPM quotes
//! (TPMS_ATTEST), attestation keys (TPMT_PUBLIC) and signatures, TCG event
//! logs and their launch lines (from the provider's TPMs and builder), and
//! the tenant's and Udom0's messages (postcard). Nothing may panic; a
//! message that decodes re-encodes to what was decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssc_abi::attest::{Evidence, TenantMsg, Udom0Msg};
use udom0::eventlog;
use udom0::tpm::{AttestationKey, QuoteInfo};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 6 {
        0 => {
            let _ = QuoteInfo::parse(rest);
        }
        1 => {
            // A key, then a signature over the rest.
            let Some((&n, r)) = rest.split_first() else { return };
            let (key, signature) = r.split_at(usize::from(n).min(r.len()));
            if let Ok(k) = AttestationKey::parse(key) {
                let _ = k.verify(b"attest", signature);
            }
        }
        2 => {
            let _ = eventlog::parse(rest);
        }
        3 => {
            let _ = eventlog::Launch::parse(rest);
        }
        4 => {
            if let Ok(m) = postcard::from_bytes::<TenantMsg>(rest) {
                let again = postcard::to_allocvec(&m).unwrap();
                assert_eq!(postcard::from_bytes::<TenantMsg>(&again).unwrap(), m);
            }
        }
        _ => {
            let _ = postcard::from_bytes::<Udom0Msg>(rest);
            let _ = postcard::from_bytes::<Evidence>(rest);
        }
    }
});
