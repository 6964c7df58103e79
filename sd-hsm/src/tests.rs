//! Host tests of the core. Every signature is also checked by an
//! implementation other than the one that made it (ring for ECDSA and RSA,
//! the RFC 8032 vector for Ed25519): a single implementation's
//! self-consistency proves little.

extern crate std;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;
use ring::signature::{self as rs, UnparsedPublicKey};
use ssc_abi::hsm::*;

use super::*;

const PIN: &[u8] = b"123456";
const RSA: &[u8] = include_bytes!("../testdata/rsa2048.pk8");
const RSA_PUB_PKCS1: &[u8] = include_bytes!("../testdata/rsa2048.pkcs1pub.der");
const P256: &[u8] = include_bytes!("../testdata/p256.pk8");
const ED25519: &[u8] = include_bytes!("../testdata/ed25519.pk8");

fn hsm() -> Hsm {
    let mut h = Hsm::new("DomC", "0001");
    assert_eq!(h.admin(AdminOp::SetPin { pin: PIN.to_vec() }, 0), AdminReply::Ok);
    h
}

fn call(h: &mut Hsm, op: Op) -> Result<Reply, HsmError> {
    h.client(Request { id: 9, session: 1, op }, 0).result
}

fn login(h: &mut Hsm) {
    call(h, Op::Hello).unwrap();
    assert_eq!(call(h, Op::Login { pin: PIN.to_vec() }), Ok(Reply::Ok));
}

fn generate(h: &mut Hsm, kind: KeyKind) -> KeyInfo {
    match call(h, Op::Generate { kind, label: "k".into(), id: vec![1], usage: Usage::ALL }) {
        Ok(Reply::Key(k)) => k,
        other => panic!("{other:?}"),
    }
}

fn import(h: &mut Hsm, der: &[u8], usage: Usage) -> KeyInfo {
    let op = AdminOp::Import { label: "imp".into(), id: vec![2], usage, material: KeyMaterial::Pkcs8(der.to_vec()) };
    match h.admin(op, 0) {
        AdminReply::Key(k) => k,
        other => panic!("{other:?}"),
    }
}

fn sign(h: &mut Hsm, key: u64, mech: SignMech, data: &[u8]) -> Vec<u8> {
    match call(h, Op::Sign { key, mech, data: data.to_vec() }) {
        Ok(Reply::Bytes(b)) => b,
        other => panic!("{other:?}"),
    }
}

#[test]
fn ecdsa_signatures_verify_with_ring() {
    let mut h = hsm();
    login(&mut h);
    let msg = b"the tenant signs this";
    for (kind, alg, hash) in [
        (KeyKind::EcP256, &rs::ECDSA_P256_SHA256_FIXED, Hash::Sha256),
        (KeyKind::EcP384, &rs::ECDSA_P384_SHA384_FIXED, Hash::Sha384),
    ] {
        let k = generate(&mut h, kind);
        // Hash inside DomC, and over the caller's digest (CKM_ECDSA).
        let s1 = sign(&mut h, k.handle, SignMech::Ecdsa { hash: Some(hash) }, msg);
        let s2 = sign(&mut h, k.handle, SignMech::Ecdsa { hash: None }, &keys::digest(hash, msg));
        for s in [&s1, &s2] {
            UnparsedPublicKey::new(alg, &k.public).verify(msg, s).expect("ring verifies DomC's ECDSA");
        }
        assert_eq!(
            call(
                &mut h,
                Op::Verify {
                    key: k.handle,
                    mech: SignMech::Ecdsa { hash: Some(hash) },
                    data: msg.to_vec(),
                    signature: s1.clone()
                }
            ),
            Ok(Reply::Ok)
        );
        let mut bad = s1.clone();
        bad[5] ^= 1;
        assert_eq!(
            call(
                &mut h,
                Op::Verify {
                    key: k.handle,
                    mech: SignMech::Ecdsa { hash: Some(hash) },
                    data: msg.to_vec(),
                    signature: bad
                }
            ),
            Err(HsmError::SignatureInvalid)
        );
    }
}

#[test]
fn short_ecdsa_digest_is_refused() {
    let mut h = hsm();
    login(&mut h);
    let k = generate(&mut h, KeyKind::EcP256);
    let r = call(&mut h, Op::Sign { key: k.handle, mech: SignMech::Ecdsa { hash: None }, data: vec![1; 8] });
    assert!(matches!(r, Err(HsmError::BadInput { .. })), "{r:?}");
}

#[test]
fn ed25519_matches_rfc8032_and_imports_openssl_pkcs8() {
    let mut h = hsm();
    login(&mut h);
    // RFC 8032 section 7.1, test 1, as PKCS#8.
    let seed = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
    let mut der = hex("302e020100300506032b657004220420");
    der.extend(&seed);
    let k = import(&mut h, &der, Usage::ALL);
    assert_eq!(k.public, hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"));
    let sig = sign(&mut h, k.handle, SignMech::EdDsa, b"");
    assert_eq!(
        sig,
        hex(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        )
    );
    let k2 = import(&mut h, ED25519, Usage::ALL);
    let s = sign(&mut h, k2.handle, SignMech::EdDsa, b"msg");
    UnparsedPublicKey::new(&rs::ED25519, &k2.public).verify(b"msg", &s).unwrap();
}

#[test]
fn rsa_pkcs1_and_pss_verify_with_ring() {
    let mut h = hsm();
    login(&mut h);
    let k = import(&mut h, RSA, Usage::ALL);
    assert_eq!((k.kind, k.bits), (KeyKind::Rsa, 2048));
    let msg = b"rsa message";
    let pk = UnparsedPublicKey::new(&rs::RSA_PKCS1_2048_8192_SHA256, RSA_PUB_PKCS1);
    let s1 = sign(&mut h, k.handle, SignMech::RsaPkcs1 { hash: Some(Hash::Sha256) }, msg);
    pk.verify(msg, &s1).unwrap();
    // ring signed that one: the rsa crate (DomC's Verify) checks it too.
    let v = Op::Verify {
        key: k.handle,
        mech: SignMech::RsaPkcs1 { hash: Some(Hash::Sha256) },
        data: msg.to_vec(),
        signature: s1,
    };
    assert_eq!(call(&mut h, v), Ok(Reply::Ok));
    // CKM_RSA_PKCS: the caller sends the DigestInfo.
    let mut info = hex("3031300d060960864801650304020105000420");
    info.extend(keys::digest(Hash::Sha256, msg));
    pk.verify(msg, &sign(&mut h, k.handle, SignMech::RsaPkcs1 { hash: None }, &info)).unwrap();
    let pss = UnparsedPublicKey::new(&rs::RSA_PSS_2048_8192_SHA256, RSA_PUB_PKCS1);
    let mech = SignMech::RsaPss { hash: Hash::Sha256, prehashed: false, salt_len: 32 };
    pss.verify(msg, &sign(&mut h, k.handle, mech, msg)).unwrap();
    let mech = SignMech::RsaPss { hash: Hash::Sha256, prehashed: true, salt_len: 32 };
    pss.verify(msg, &sign(&mut h, k.handle, mech, &keys::digest(Hash::Sha256, msg))).unwrap();
    // RSA is import only; an EC mechanism on it is refused.
    assert!(matches!(
        call(&mut h, Op::Generate { kind: KeyKind::Rsa, label: String::new(), id: vec![], usage: Usage::ALL }),
        Err(HsmError::BadInput { .. })
    ));
    assert_eq!(
        call(&mut h, Op::Sign { key: k.handle, mech: SignMech::EdDsa, data: vec![] }),
        Err(HsmError::WrongMechanism { kind: KeyKind::Rsa })
    );
}

#[test]
fn imported_p256_signs_as_openssl_made_it() {
    let mut h = hsm();
    login(&mut h);
    let k = import(&mut h, P256, Usage::ALL);
    assert_eq!(k.kind, KeyKind::EcP256);
    let s = sign(&mut h, k.handle, SignMech::Ecdsa { hash: Some(Hash::Sha256) }, b"x");
    UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &k.public).verify(b"x", &s).unwrap();
    // Replies never carry the private scalar.
    use p256::pkcs8::DecodePrivateKey;
    let scalar = p256::SecretKey::from_pkcs8_der(P256).unwrap().to_bytes();
    let everything = postcard::to_allocvec(&h.admin(AdminOp::List, 0)).unwrap();
    assert!(!everything.windows(32).any(|w| w == scalar.as_slice()));
}

#[test]
fn bad_key_material_is_refused_with_the_reason() {
    let mut h = hsm();
    for (der, what) in [(vec![0x30, 0x03, 0x02, 0x01, 0x00], "PKCS#8"), (RSA[..600].to_vec(), "PKCS#8")] {
        let op =
            AdminOp::Import { label: "x".into(), id: vec![], usage: Usage::ALL, material: KeyMaterial::Pkcs8(der) };
        match h.admin(op, 0) {
            AdminReply::Error(HsmError::BadKey { why }) => assert!(why.contains(what), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    let op = AdminOp::Import {
        label: "x".into(),
        id: vec![],
        usage: Usage::ALL,
        material: KeyMaterial::Aes256(vec![0; 16]),
    };
    assert!(matches!(h.admin(op, 0), AdminReply::Error(HsmError::BadKey { .. })));
}

#[test]
fn login_is_required_and_wrong_pins_lock_the_token() {
    let mut h = Hsm::new("DomC", "1");
    call(&mut h, Op::Hello).unwrap();
    assert_eq!(call(&mut h, Op::Login { pin: PIN.to_vec() }), Err(HsmError::PinNotSet));
    h.admin(AdminOp::SetPin { pin: PIN.to_vec() }, 0);
    assert_eq!(
        call(&mut h, Op::Generate { kind: KeyKind::EcP256, label: String::new(), id: vec![], usage: Usage::ALL }),
        Err(HsmError::NotLoggedIn)
    );
    login(&mut h);
    let k = generate(&mut h, KeyKind::EcP256);
    // A new application on the link starts logged out.
    call(&mut h, Op::Hello).unwrap();
    let sign_op = || Op::Sign { key: k.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: vec![1] };
    assert_eq!(call(&mut h, sign_op()), Err(HsmError::NotLoggedIn));
    for left in (1..PIN_TRIES).rev() {
        assert_eq!(
            call(&mut h, Op::Login { pin: b"000000".to_vec() }),
            Err(HsmError::PinIncorrect { tries_left: left })
        );
    }
    assert_eq!(call(&mut h, Op::Login { pin: b"000000".to_vec() }), Err(HsmError::PinLocked));
    assert_eq!(
        call(&mut h, Op::Login { pin: PIN.to_vec() }),
        Err(HsmError::PinLocked),
        "locked even for the right PIN"
    );
    assert_eq!(h.admin(AdminOp::SetPin { pin: PIN.to_vec() }, 0), AdminReply::Ok);
    login(&mut h);
    assert!(call(&mut h, sign_op()).is_ok());
    assert!(matches!(
        h.admin(AdminOp::SetPin { pin: b"12".to_vec() }, 0),
        AdminReply::Error(HsmError::BadInput { .. })
    ));
}

#[test]
fn usage_policy_and_rate_limit_are_enforced() {
    let mut h = hsm();
    login(&mut h);
    let verify_only = import(&mut h, P256, Usage { ops: Usage::VERIFY, rate_per_sec: 0 });
    let r = call(
        &mut h,
        Op::Sign { key: verify_only.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: vec![1] },
    );
    assert_eq!(r, Err(HsmError::Forbidden { key: verify_only.handle, op: "sign".into() }));
    let limited = import(&mut h, ED25519, Usage { ops: Usage::SIGN, rate_per_sec: 3 });
    let op =
        || Request { id: 1, session: 4, op: Op::Sign { key: limited.handle, mech: SignMech::EdDsa, data: vec![1] } };
    for _ in 0..3 {
        assert!(h.client(op(), 5_100).result.is_ok());
    }
    assert_eq!(h.client(op(), 5_900).result, Err(HsmError::RateLimited { key: limited.handle, per_sec: 3 }));
    assert!(h.client(op(), 6_000).result.is_ok(), "a new second, a new budget");
    assert_eq!(
        call(&mut h, Op::Sign { key: 999, mech: SignMech::EdDsa, data: vec![] }),
        Err(HsmError::UnknownKey { key: 999 })
    );
}

#[test]
fn aes_gcm_and_key_wrap() {
    let mut h = hsm();
    login(&mut h);
    let aes = generate(&mut h, KeyKind::Aes256);
    let (iv, aad) = (vec![7u8; 12], b"hdr".to_vec());
    let Ok(Reply::Bytes(ct)) =
        call(&mut h, Op::Encrypt { key: aes.handle, iv: iv.clone(), aad: aad.clone(), data: b"secret data".to_vec() })
    else {
        panic!()
    };
    assert_eq!(ct.len(), 11 + 16);
    assert_eq!(
        call(&mut h, Op::Decrypt { key: aes.handle, iv: iv.clone(), aad: aad.clone(), data: ct.clone() }),
        Ok(Reply::Bytes(b"secret data".to_vec()))
    );
    let mut tampered = ct.clone();
    tampered[0] ^= 1;
    assert_eq!(
        call(&mut h, Op::Decrypt { key: aes.handle, iv: iv.clone(), aad, data: tampered }),
        Err(HsmError::DecryptFailed)
    );
    assert!(matches!(
        call(&mut h, Op::Encrypt { key: aes.handle, iv: vec![0; 8], aad: vec![], data: vec![] }),
        Err(HsmError::BadInput { .. })
    ));
    // Wrap an EC key, unwrap it as a new object: RFC 6979 signatures match.
    let ec = generate(&mut h, KeyKind::EcP256);
    let Ok(Reply::Bytes(blob)) = call(&mut h, Op::Wrap { wrapping: aes.handle, key: ec.handle }) else { panic!() };
    let Ok(Reply::Key(copy)) =
        call(&mut h, Op::Unwrap { wrapping: aes.handle, blob: blob.clone(), label: "copy".into(), id: vec![3] })
    else {
        panic!()
    };
    assert_eq!(copy.public, ec.public);
    // CKM_ECDSA over a digest is RFC 6979 (deterministic); the hashing
    // mechanisms go through ring, whose nonces are random.
    let (mech, digest) = (SignMech::Ecdsa { hash: None }, [5u8; 32]);
    assert_eq!(sign(&mut h, ec.handle, mech, &digest), sign(&mut h, copy.handle, mech, &digest));
    let other = generate(&mut h, KeyKind::Aes256);
    assert_eq!(
        call(&mut h, Op::Unwrap { wrapping: other.handle, blob, label: String::new(), id: vec![] }),
        Err(HsmError::DecryptFailed)
    );
}

#[test]
fn malformed_frames_get_an_error_and_the_next_request_is_served() {
    let mut h = hsm();
    let r: Response = decode_payload(&h.client_frame(&[0xde, 0xad, 0xbe, 0xef], 0)).unwrap();
    assert_eq!(r, Response { id: 0, result: Err(HsmError::Malformed) });
    let good = postcard::to_allocvec(&Request { id: 5, session: 1, op: Op::Random { len: 32 } }).unwrap();
    let r: Response = decode_payload(&h.client_frame(&good, 0)).unwrap();
    assert!(matches!(r, Response { id: 5, result: Ok(Reply::Bytes(b)) } if b.len() == 32));
    assert_eq!(h.stats.malformed, 1);
    let too_much = Op::Random { len: MAX_RANDOM + 1 };
    assert!(matches!(call(&mut h, too_much), Err(HsmError::BadInput { .. })));
}

#[test]
fn the_audit_log_chains_and_catches_edits() {
    let mut h = hsm();
    login(&mut h);
    let k = generate(&mut h, KeyKind::Ed25519);
    sign(&mut h, k.handle, SignMech::EdDsa, b"a");
    let _ = call(&mut h, Op::Login { pin: b"bad!".to_vec() });
    let page = h.audit.page(0, 100);
    assert_eq!(page.oldest_kept, 0);
    let ops: Vec<&str> = page.entries.iter().map(|e| e.op.as_str()).collect();
    assert_eq!(ops, ["set-pin", "hello", "login", "generate", "sign", "login"]);
    assert_eq!(page.entries[4].key, Some(k.handle));
    assert!(page.entries[5].outcome.contains("wrong PIN"));
    audit::verify(&page.entries, Some(page.head)).unwrap();
    let mut edited = page.entries.clone();
    edited[4].outcome = "ok?".into();
    assert_eq!(audit::verify(&edited, None), Err(audit::AuditBroken::Edited { seq: 4 }));
    let mut dropped = page.entries.clone();
    dropped.remove(3);
    assert_eq!(audit::verify(&dropped, None), Err(audit::AuditBroken::Unlinked { seq: 4 }));
    // Truncated at the end: the head gives it away.
    assert!(audit::verify(&page.entries[..5], Some(page.head)).is_err());
    // Export reads are not logged.
    assert_eq!(h.audit.page(0, 100).next, 6);
}

#[test]
fn the_audit_log_keeps_the_most_recent_entries() {
    let mut log = audit::AuditLog::new(4);
    for i in 0..10 {
        log.append(i, Actor::Tenant, "op", None, "ok");
    }
    let page = log.page(0, 100);
    assert_eq!((page.oldest_kept, page.next, page.entries.len()), (6, 10, 4));
    audit::verify(&page.entries, Some(page.head)).unwrap();
    assert_eq!(log.page(8, 1).entries[0].seq, 8);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut h = hsm();
        let _ = h.client_frame(&bytes, 0);
        let _ = h.admin_frame(&bytes, 0);
        let mut d = HsmDecoder::new();
        d.feed(&bytes);
        while let Some(p) = d.next_payload() {
            let _ = h.client_frame(&p, 0);
        }
    }
}
