//! `ssc-p11bench MODULE PIN SECONDS THREADS ALG...`: signatures per second
//! through any PKCS#11 module (DomC's `libssc_pkcs11.so`, SoftHSM2…), the
//! driver of `ssc bench hsm-core` (SoftHSM2 on the host) and `ssc bench hsm`
//! (inside a client VM).
//!
//! ALG: `ecdsa-p256` (CKM_ECDSA over a SHA-256 digest, what TLS asks),
//! `ecdsa-p256-sha256` (CKM_ECDSA_SHA256 over 64 bytes), `aes-gcm` (an
//! AES-256-GCM encrypt and decrypt of 64 bytes, checked),
//! `ed25519` (CKM_EDDSA over 64 bytes) or `rsa2048` (CKM_SHA256_RSA_PKCS over
//! 64 bytes). It uses the first token's key of that kind, generating an EC
//! or Ed25519 key (and an RSA key where the token can) if there is none.
//! Each thread has its own session. One line per run:
//! `p11bench ALG THREADS OPS SECONDS OPS_PER_SEC`.

use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

fn key(session: &Session, alg: &str) -> Result<ObjectHandle, String> {
    if alg == "aes-gcm" {
        let t = [
            Attribute::Token(true),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ];
        return session.generate_key(&Mechanism::AesKeyGen, &t).map_err(|e| format!("generating an AES key: {e}"));
    }
    let (kt, params) = match alg {
        "ecdsa-p256" | "ecdsa-p256-sha256" => (KeyType::EC, Some(P256)),
        "ed25519" => (KeyType::EC_EDWARDS, None),
        "rsa2048" => (KeyType::RSA, None),
        other => return Err(format!("unknown algorithm `{other}` (ecdsa-p256, ecdsa-p256-sha256, ed25519, rsa2048)")),
    };
    let found = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::KeyType(kt)])
        .map_err(|e| format!("finding a {alg} key: {e}"))?;
    if let Some(k) = found.into_iter().next() {
        return Ok(k);
    }
    let label = Attribute::Label(format!("p11bench-{alg}").into_bytes());
    let (mech, public) = match alg {
        "ecdsa-p256" | "ecdsa-p256-sha256" => {
            (Mechanism::EccKeyPairGen, vec![Attribute::EcParams(params.unwrap().to_vec()), Attribute::Verify(true)])
        }
        "ed25519" => {
            (Mechanism::EccEdwardsKeyPairGen, vec![Attribute::EcParams(ED25519.to_vec()), Attribute::Verify(true)])
        }
        _ => (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Verify(true),
            ],
        ),
    };
    let private = vec![Attribute::Token(true), Attribute::Sign(true), Attribute::Sensitive(true), label];
    let (_, k) =
        session.generate_key_pair(&mech, &public, &private).map_err(|e| format!("generating a {alg} key: {e}"))?;
    Ok(k)
}

/// AES-256-GCM: encrypt, decrypt, compare; a flipped byte must fail.
fn aes_round_trip(session: &Session, k: ObjectHandle, n: u64, data: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
    use cryptoki::mechanism::aead::GcmParams;
    let mut iv = [0u8; 12];
    iv[..8].copy_from_slice(&n.to_le_bytes());
    let ct = session.encrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into())?), k, data)?;
    let pt = session.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into())?), k, &ct)?;
    assert_eq!(pt, data, "AES-GCM round trip");
    if n == 0 {
        let mut bad = ct.clone();
        bad[0] ^= 1;
        let r = session.decrypt(&Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into())?), k, &bad);
        assert!(r.is_err(), "a tampered AES-GCM ciphertext decrypted");
    }
    Ok(ct)
}

fn run(ctx: &Pkcs11, slot: Slot, pin: &str, alg: &str, threads: usize, secs: f64) -> Result<u64, String> {
    let setup = ctx.open_rw_session(slot).map_err(|e| format!("session: {e}"))?;
    let _ = setup.login(UserType::User, Some(&AuthPin::new(pin.into())));
    let k = key(&setup, alg)?;
    // SoftHSM2 2.6 has no CKM_ECDSA_SHA256: there the caller hashes (a
    // SHA-256 of 64 bytes, ~0.2 µs) and asks for CKM_ECDSA.
    let hash_here = alg == "ecdsa-p256-sha256" && setup.sign(&Mechanism::EcdsaSha256, k, &[9u8; 64]).is_err();
    if hash_here {
        eprintln!("ssc-p11bench: this token has no CKM_ECDSA_SHA256; hashing here and signing with CKM_ECDSA");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let total: Result<u64, String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || -> Result<u64, String> {
                    let session = ctx.open_rw_session(slot).map_err(|e| format!("session: {e}"))?;
                    let digest = [7u8; 32];
                    let data = [9u8; 64];
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let r = match alg {
                            "ecdsa-p256" => session.sign(&Mechanism::Ecdsa, k, &digest),
                            "ecdsa-p256-sha256" if hash_here => session.sign(&Mechanism::Ecdsa, k, &digest),
                            "ecdsa-p256-sha256" => session.sign(&Mechanism::EcdsaSha256, k, &data),
                            "aes-gcm" => aes_round_trip(&session, k, n, &data),
                            "ed25519" => {
                                session.sign(&Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)), k, &data)
                            }
                            _ => session.sign(&Mechanism::Sha256RsaPkcs, k, &data),
                        };
                        r.map_err(|e| format!("{alg} sign: {e}"))?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).sum()
    });
    total
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 || args[1] == "--help" {
        eprintln!(
            "usage: ssc-p11bench MODULE PIN SECONDS THREADS[,THREADS…] ALG… (ecdsa-p256, ecdsa-p256-sha256, ed25519, rsa2048, aes-gcm)"
        );
        return std::process::ExitCode::from(2);
    }
    let (module, pin) = (&args[1], &args[2]);
    let secs: f64 = args[3].parse().unwrap_or(2.0);
    let threads: Vec<usize> = args[4].split(',').filter_map(|t| t.parse().ok()).collect();
    let result = (|| -> Result<(), String> {
        let ctx = Pkcs11::new(module).map_err(|e| format!("loading {module}: {e}"))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("C_Initialize: {e}"))?;
        let slot = *ctx.get_slots_with_token().map_err(|e| format!("slots: {e}"))?.first().ok_or("no token")?;
        for alg in &args[5..] {
            for &t in &threads {
                let start = Instant::now();
                let ops = run(&ctx, slot, pin, alg, t, secs)?;
                let el = start.elapsed().as_secs_f64();
                println!("p11bench {alg} {t} {ops} {el:.3} {:.1}", ops as f64 / el);
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssc-p11bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
