//! DomC's client link carries whatever any process in the client writes:
//! arbitrary bytes through the frame decoder into a token with a PIN, keys
//! and a logged-in application (requests with an odd id carry its login
//! token). Nothing may panic; no reply may carry a key's secret bytes; no
//! request without the application's login token may use a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_hsm::Hsm;
use ssc_abi::hsm::{AdminOp, AdminReply, HsmDecoder, KeyKind, KeyMaterial, Op, Reply, Request, Response, Usage};

const AES: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let mut h = Hsm::new("fuzz", "0");
    h.admin(AdminOp::SetPin { pin: b"1234".to_vec() }, 0);
    let usage = Usage { extractable: true, ..Usage::GENERAL };
    let AdminReply::Key(_) =
        h.admin(AdminOp::Import { label: "aes".into(), id: vec![1], usage, material: KeyMaterial::Aes256(AES.to_vec()) }, 0)
    else {
        panic!("import")
    };
    h.admin(AdminOp::Import { label: "w".into(), id: vec![2], usage: Usage::WRAPPING, material: KeyMaterial::Aes256(vec![7; 32]) }, 0);
    let login = Request { id: 1, session: 1, token: [0; 16], op: Op::Login { pin: b"1234".to_vec() } };
    let Ok(Reply::LoggedIn { token }) = h.client(login, 0).result else { panic!("login") };
    let generate = Request { id: 2, session: 1, token, op: Op::Generate { kind: KeyKind::EcP256, label: "ec".into(), id: vec![3], usage: Usage::GENERAL } };
    h.client(generate, 0);
    // The fuzzer's bytes, in its own splits, as frames on the link.
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    let mut d = HsmDecoder::new();
    for chunk in data.chunks(split) {
        d.feed(chunk);
        while let Some(mut p) = d.next_payload() {
            // Requests with an odd id speak for the logged-in application
            // (the fuzzer cannot guess a random token): wrap, unwrap and
            // every key operation are reached too.
            if let Some(mut req) = ssc_abi::hsm::decode_payload::<Request>(&p)
                && req.id & 1 == 1
            {
                req.token = token;
                p = postcard::to_allocvec(&req).unwrap();
            }
            let reply = h.client_frame(&p, 0);
            assert!(!reply.windows(AES.len()).any(|w| w == AES), "a key's secret in a reply");
            let asked = ssc_abi::hsm::decode_payload::<Request>(&p);
            let resp: Response = ssc_abi::hsm::decode_payload(&reply).expect("replies decode");
            if let (Some(req), Ok(_)) = (&asked, &resp.result) {
                let needs_login = matches!(
                    req.op,
                    Op::Sign { .. } | Op::Verify { .. } | Op::Encrypt { .. } | Op::Decrypt { .. } | Op::Wrap { .. }
                        | Op::Unwrap { .. } | Op::Generate { .. } | Op::Destroy { .. } | Op::Logout
                );
                assert!(!needs_login || req.token == token, "a request without the login token used the token");
            }
        }
    }
});
