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

std::thread_local! {
    /// The login token this test's application holds.
    static TOKEN: core::cell::Cell<[u8; 16]> = const { core::cell::Cell::new([0; 16]) };
}

fn call(h: &mut Hsm, op: Op) -> Result<Reply, HsmError> {
    call_as(h, TOKEN.get(), op)
}

/// A request carrying `token` (another application's, or none).
fn call_as(h: &mut Hsm, token: [u8; 16], op: Op) -> Result<Reply, HsmError> {
    h.client(Request { id: 9, session: 1, token, op }, 0).result
}

fn login(h: &mut Hsm) {
    call(h, Op::Hello).unwrap();
    match call(h, Op::Login { pin: PIN.to_vec() }) {
        Ok(Reply::LoggedIn { token }) => TOKEN.set(token),
        other => panic!("{other:?}"),
    }
}

fn generate(h: &mut Hsm, kind: KeyKind) -> KeyInfo {
    generate_with(h, kind, Usage::GENERAL)
}

fn generate_with(h: &mut Hsm, kind: KeyKind, usage: Usage) -> KeyInfo {
    match call(h, Op::Generate { kind, label: "k".into(), id: vec![1], usage }) {
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
    let k = import(&mut h, &der, Usage::GENERAL);
    assert_eq!(k.public, hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"));
    let sig = sign(&mut h, k.handle, SignMech::EdDsa, b"");
    assert_eq!(
        sig,
        hex(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        )
    );
    let k2 = import(&mut h, ED25519, Usage::GENERAL);
    let s = sign(&mut h, k2.handle, SignMech::EdDsa, b"msg");
    UnparsedPublicKey::new(&rs::ED25519, &k2.public).verify(b"msg", &s).unwrap();
}

#[test]
fn rsa_pkcs1_and_pss_verify_with_ring() {
    let mut h = hsm();
    login(&mut h);
    let k = import(&mut h, RSA, Usage::GENERAL);
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
        call(&mut h, Op::Generate { kind: KeyKind::Rsa, label: String::new(), id: vec![], usage: Usage::GENERAL }),
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
    let k = import(&mut h, P256, Usage::GENERAL);
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
            AdminOp::Import { label: "x".into(), id: vec![], usage: Usage::GENERAL, material: KeyMaterial::Pkcs8(der) };
        match h.admin(op, 0) {
            AdminReply::Error(HsmError::BadKey { why }) => assert!(why.contains(what), "{why}"),
            other => panic!("{other:?}"),
        }
    }
    let op = AdminOp::Import {
        label: "x".into(),
        id: vec![],
        usage: Usage::GENERAL,
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
        call(&mut h, Op::Generate { kind: KeyKind::EcP256, label: String::new(), id: vec![], usage: Usage::GENERAL }),
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
    let verify_only = import(&mut h, P256, Usage { ops: Usage::VERIFY, ..Usage::GENERAL });
    let r = call(
        &mut h,
        Op::Sign { key: verify_only.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: vec![1] },
    );
    assert_eq!(r, Err(HsmError::Forbidden { key: verify_only.handle, op: "sign".into() }));
    let limited = import(&mut h, ED25519, Usage { ops: Usage::SIGN, rate_per_sec: 3, extractable: false });
    let op = || Request {
        id: 1,
        session: 4,
        token: TOKEN.get(),
        op: Op::Sign { key: limited.handle, mech: SignMech::EdDsa, data: vec![1] },
    };
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
    // Wrap an extractable EC key under a wrap-only key, unwrap it as a new
    // object: RFC 6979 signatures match, and the copy has the same policy.
    let wrapper = generate_with(&mut h, KeyKind::Aes256, Usage::WRAPPING);
    let ec = generate_with(&mut h, KeyKind::EcP256, Usage { extractable: true, ..Usage::GENERAL });
    let Ok(Reply::Bytes(blob)) = call(&mut h, Op::Wrap { wrapping: wrapper.handle, key: ec.handle }) else { panic!() };
    let Ok(Reply::Key(copy)) =
        call(&mut h, Op::Unwrap { wrapping: wrapper.handle, blob: blob.clone(), label: "copy".into(), id: vec![3] })
    else {
        panic!()
    };
    assert_eq!(copy.public, ec.public);
    assert_eq!(copy.usage, ec.usage);
    // CKM_ECDSA over a digest is RFC 6979 (deterministic); the hashing
    // mechanisms go through ring, whose nonces are random.
    let (mech, digest) = (SignMech::Ecdsa { hash: None }, [5u8; 32]);
    assert_eq!(sign(&mut h, ec.handle, mech, &digest), sign(&mut h, copy.handle, mech, &digest));
    let other = generate_with(&mut h, KeyKind::Aes256, Usage::WRAPPING);
    assert_eq!(
        call(&mut h, Op::Unwrap { wrapping: other.handle, blob, label: String::new(), id: vec![] }),
        Err(HsmError::DecryptFailed)
    );
}

#[test]
fn a_second_application_on_the_port_is_not_logged_in() {
    // The application logs in, then closes the port (or crashes) without
    // logging out; a second process opens the port and, without a Hello,
    // asks for a signature with the tenant's key. It holds no token.
    let mut h = hsm();
    login(&mut h);
    let k = import(&mut h, P256, Usage { ops: Usage::SIGN, ..Usage::GENERAL });
    let sign = Op::Sign { key: k.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: b"x".to_vec() };
    assert!(call(&mut h, sign.clone()).is_ok(), "the application itself signs");
    assert_eq!(call_as(&mut h, [0; 16], sign.clone()), Err(HsmError::NotLoggedIn));
    assert_eq!(call_as(&mut h, [0x41; 16], sign.clone()), Err(HsmError::NotLoggedIn), "a guessed token");
    for op in
        [Op::Generate { kind: KeyKind::EcP256, label: String::new(), id: vec![], usage: Usage::GENERAL }, Op::Logout]
    {
        assert_eq!(call_as(&mut h, [0; 16], op), Err(HsmError::NotLoggedIn));
    }
    // A new application's Hello ends the old login for everyone.
    call_as(&mut h, [0; 16], Op::Hello).unwrap();
    assert_eq!(call(&mut h, sign), Err(HsmError::NotLoggedIn));
}

#[test]
fn a_key_that_both_wraps_and_decrypts_cannot_be_made() {
    // The attack's first step: Generate{Aes256, WRAP|DECRYPT}. Refused from
    // the client, from the tenant's import, and from a parsed usage list.
    let mut h = hsm();
    login(&mut h);
    let both = Usage { ops: Usage::WRAP | Usage::DECRYPT, ..Usage::GENERAL };
    let r = call(&mut h, Op::Generate { kind: KeyKind::Aes256, label: "w".into(), id: vec![], usage: both });
    assert!(matches!(&r, Err(HsmError::BadInput { why }) if why.contains("may do nothing else")), "{r:?}");
    let op = AdminOp::Import { label: "w".into(), id: vec![], usage: both, material: KeyMaterial::Aes256(vec![1; 32]) };
    assert!(matches!(h.admin(op, 0), AdminReply::Error(HsmError::BadInput { .. })));
    assert!(Usage::parse("wrap,decrypt", 0).unwrap_err().contains("may do nothing else"));
    // Nor may an EC key wrap.
    let r = call(&mut h, Op::Generate { kind: KeyKind::EcP256, label: "w".into(), id: vec![], usage: Usage::WRAPPING });
    assert!(matches!(r, Err(HsmError::BadInput { .. })), "{r:?}");
}

#[test]
fn wrapping_a_non_extractable_key_is_refused() {
    // The tenant's imported key (not extractable unless the tenant says so)
    // and a generated key without CKA_EXTRACTABLE never leave DomC, even
    // under a proper wrap-only key.
    let mut h = hsm();
    login(&mut h);
    let wrapper = generate_with(&mut h, KeyKind::Aes256, Usage::WRAPPING);
    let tenant_key = import(&mut h, RSA, Usage { ops: Usage::SIGN, ..Usage::GENERAL });
    assert!(!tenant_key.usage.extractable);
    let generated = generate(&mut h, KeyKind::EcP256);
    for key in [tenant_key.handle, generated.handle] {
        assert_eq!(
            call(&mut h, Op::Wrap { wrapping: wrapper.handle, key }),
            Err(HsmError::NotExtractable { key }),
            "key {key} left DomC"
        );
    }
}

#[test]
fn the_wrap_decrypt_export_of_a_private_key_is_closed() {
    // The whole attack from issue 19: wrap the tenant's RSA key under an AES
    // key, then decrypt the blob with the same AES key. Every way to get a
    // key that both wraps and decrypts is refused; a wrap-only key cannot
    // decrypt its blob, and the tenant's key cannot be wrapped at all.
    let mut h = hsm();
    login(&mut h);
    let tenant_key = import(&mut h, RSA, Usage { ops: Usage::SIGN, extractable: true, rate_per_sec: 0 });
    let wrapper = generate_with(&mut h, KeyKind::Aes256, Usage::WRAPPING);
    let Ok(Reply::Bytes(blob)) = call(&mut h, Op::Wrap { wrapping: wrapper.handle, key: tenant_key.handle }) else {
        panic!()
    };
    let iv = blob[blob.len() - 12 - 16 - 1..][..12].to_vec(); // any 12 bytes: the op itself must be refused
    let r = call(&mut h, Op::Decrypt { key: wrapper.handle, iv, aad: vec![], data: blob.clone() });
    assert!(matches!(r, Err(HsmError::Forbidden { .. })), "a wrapping key decrypted: {r:?}");
}

#[test]
fn an_unwrapped_key_cannot_get_a_wider_policy_than_it_was_wrapped_with() {
    // Edit the policy in a blob (sign-only, rate-limited → everything): the
    // policy is authenticated, so the tag fails and nothing is unwrapped.
    let mut h = hsm();
    login(&mut h);
    let wrapper = generate_with(&mut h, KeyKind::Aes256, Usage::WRAPPING);
    let narrow = Usage { ops: Usage::SIGN, rate_per_sec: 2, extractable: true };
    let ec = generate_with(&mut h, KeyKind::EcP256, narrow);
    let Ok(Reply::Bytes(blob)) = call(&mut h, Op::Wrap { wrapping: wrapper.handle, key: ec.handle }) else { panic!() };
    // The header follows the 5-byte magic and the 2-byte length; its first
    // byte is the kind, then usage.ops: widen it to sign|decrypt|encrypt.
    let mut widened = blob.clone();
    assert_eq!(widened[8], narrow.ops);
    widened[8] = Usage::SIGN | Usage::ENCRYPT | Usage::DECRYPT;
    assert_eq!(
        call(&mut h, Op::Unwrap { wrapping: wrapper.handle, blob: widened, label: String::new(), id: vec![] }),
        Err(HsmError::DecryptFailed)
    );
    // A format-1 blob (no magic: nonce ‖ ciphertext) is refused by name.
    let old = blob[7 + usize::from(blob[5])..].to_vec();
    let r = call(&mut h, Op::Unwrap { wrapping: wrapper.handle, blob: old, label: String::new(), id: vec![] });
    assert!(matches!(&r, Err(HsmError::BadKey { why }) if why.contains("format-1")), "{r:?}");
}

#[test]
fn malformed_frames_get_an_error_and_the_next_request_is_served() {
    let mut h = hsm();
    let r: Response = decode_payload(&h.client_frame(&[0xde, 0xad, 0xbe, 0xef], 0)).unwrap();
    assert_eq!(r, Response { id: 0, result: Err(HsmError::Malformed) });
    let good =
        postcard::to_allocvec(&Request { id: 5, session: 1, token: [0; 16], op: Op::Random { len: 32 } }).unwrap();
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

/// Everything DomC still keeps of its log.
fn kept(h: &mut Hsm) -> Vec<AuditEntry> {
    let mut out = vec![];
    let mut from = 0;
    loop {
        let AdminReply::Audit(p) = h.admin(AdminOp::Audit { from, max: 256 }, 0) else { panic!() };
        from = from.max(p.oldest_kept) + p.entries.len() as u64;
        if p.entries.is_empty() {
            return out;
        }
        out.extend(p.entries);
    }
}

#[test]
fn a_flood_of_requests_without_a_login_cannot_flush_the_audit_log() {
    let mut h = hsm();
    import(&mut h, P256, Usage::GENERAL);
    // A client floods Random and garbage without logging in: far more
    // than the log keeps.
    let n = audit::KEEP as u64 + 1000;
    let mut refused = 0;
    for i in 0..n {
        let r = if i % 2 == 0 {
            call_as(&mut h, [0; 16], Op::Random { len: 8 })
        } else {
            let reply: Response = postcard::from_bytes(&h.client_frame(b"garbage", 0)).unwrap();
            reply.result
        };
        if r == Err(HsmError::Throttled { per_sec: UNAUTHENTICATED_PER_SEC }) {
            refused += 1;
        }
    }
    assert_eq!(refused, n - u64::from(UNAUTHENTICATED_PER_SEC));
    // The tenant's import is still in the log, and the flood is one line.
    let log = kept(&mut h);
    assert!(log.iter().any(|e| e.op == "import" && e.outcome == "ok"), "the import was flushed out");
    let summary: Vec<&AuditEntry> = log.iter().filter(|e| e.op == "throttled").collect();
    assert_eq!(summary.len(), 1);
    assert!(
        summary[0].outcome.starts_with(&alloc::format!("{refused} requests without a login refused")),
        "{summary:?}"
    );
    assert!(log.len() < 200, "{} entries", log.len());
    audit::verify(&log, None).unwrap();
    // The next second serves again; a logged-in application is never
    // throttled.
    assert!(h.client(Request { id: 1, session: 1, token: [0; 16], op: Op::List }, 1000).result.is_ok());
    login(&mut h);
    for _ in 0..500 {
        assert!(call(&mut h, Op::Random { len: 8 }).is_ok());
    }
}

#[test]
fn a_full_audit_log_of_undelivered_entries_blocks_operations_until_the_tenant_acknowledges_it() {
    let mut h = hsm();
    h.audit = audit::AuditLog::new(16);
    login(&mut h);
    let k = generate(&mut h, KeyKind::EcP256);
    let mut served = 0;
    let blocked = loop {
        match call(
            &mut h,
            Op::Sign { key: k.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: vec![1] },
        ) {
            Ok(_) => served += 1,
            Err(e) => break e,
        }
        assert!(served < 100, "never blocked");
    };
    assert_eq!(blocked, HsmError::AuditFull);
    assert!(h.audit.blocked());
    // The tenant's own requests wait too, but reading the log does not.
    assert_eq!(h.admin(AdminOp::List, 0), AdminReply::Error(HsmError::AuditFull));
    let log = kept(&mut h);
    assert_eq!(log.len(), 16);
    assert_eq!(log[0].seq, 0, "nothing was dropped before the tenant had it");
    // Reading acknowledges nothing (`ssc hsm audit`, or a page from far
    // ahead); neither does the policy change, which would itself drop one.
    let AdminReply::Audit(_) = h.admin(AdminOp::Audit { from: u64::MAX, max: 1 }, 0) else { panic!() };
    assert!(h.audit.blocked());
    assert_eq!(h.admin(AdminOp::AuditWhenFull { block: true }, 0), AdminReply::Error(HsmError::AuditFull));
    assert_eq!(kept(&mut h)[0].seq, 0);
    // A wrong head, or entries that do not exist, are not acknowledged.
    assert!(matches!(h.admin(AdminOp::AuditAck { next: 16, head: [0; 32] }, 0), AdminReply::Error(_)));
    assert!(matches!(h.admin(AdminOp::AuditAck { next: 99, head: log[15].hash }, 0), AdminReply::Error(_)));
    // The tenant's stream acknowledges what it holds: operations go on.
    assert_eq!(h.admin(AdminOp::AuditAck { next: 16, head: log[15].hash }, 0), AdminReply::Ok);
    let sign = Op::Sign { key: k.handle, mech: SignMech::Ecdsa { hash: Some(Hash::Sha256) }, data: vec![1] };
    assert!(call(&mut h, sign).is_ok());

    // A tenant who prefers availability drops the oldest instead.
    let mut h = hsm();
    h.audit = audit::AuditLog::new(16);
    assert_eq!(h.admin(AdminOp::AuditWhenFull { block: false }, 0), AdminReply::Ok);
    login(&mut h);
    for _ in 0..100 {
        assert!(call(&mut h, Op::List).is_ok());
    }
    assert!(kept(&mut h)[0].seq > 0);
}
