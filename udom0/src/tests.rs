//! Host tests of the Udom0 core: a real rustls client (std) talks to the
//! core; quotes are signed by a software P-256 key laid out exactly as a
//! TPM lays out a quote (the real swtpm is exercised by host-tools' tests).

use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec::Vec;
use std::io::{Read, Write};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use ssc_abi::attest::{
    ALG_SHA256, ALG_SHA384, Binding, EXPORTER_LABEL, Evidence, GrantRequest, LAUNCH_PCR, PcrValue, Quote, TenantMsg,
    Udom0Msg, encode_frame, take_frame,
};

use super::*;
use crate::eventlog::{EventLogWriter, Launch};
use crate::verify::{AttestError, Expectations, ExpectedLaunch, HostProfile};

struct Client {
    conn: ClientConnection,
    key: Arc<tls::RawKeyVerifier>,
}

impl Client {
    fn new(suites: Option<&[rustls::SupportedCipherSuite]>) -> Self {
        let key = Arc::new(tls::RawKeyVerifier::default());
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(s) = suites {
            provider.cipher_suites = s.to_vec();
        }
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(key.clone())
            .with_no_client_auth();
        let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("udom0").unwrap()).unwrap();
        Client { conn, key }
    }

    fn out(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut v).unwrap();
        }
        v
    }

    fn take(&mut self, actions: Vec<Action>) -> Vec<Action> {
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::ToTenant(b) => {
                    let mut r = &b[..];
                    while !r.is_empty() {
                        self.conn.read_tls(&mut r).unwrap();
                    }
                    self.conn.process_new_packets().unwrap();
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn handshake(&mut self, u: &mut Udom0) {
        u.tenant_connected();
        for _ in 0..10 {
            let out = self.out();
            let acts = u.tenant_bytes(&out);
            self.take(acts);
            if !self.conn.is_handshaking() {
                // The client's Finished.
                let out = self.out();
                let acts = u.tenant_bytes(&out);
                self.take(acts);
                return;
            }
        }
        panic!("handshake did not finish");
    }

    fn send(&mut self, u: &mut Udom0, msg: &TenantMsg) -> Vec<Action> {
        self.conn.writer().write_all(&encode_frame(msg).unwrap()).unwrap();
        let out = self.out();
        let acts = u.tenant_bytes(&out);
        self.take(acts)
    }

    fn recv(&mut self) -> Udom0Msg {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let frame = take_frame(&mut buf).unwrap().expect("a whole frame");
        postcard::from_bytes(&frame).unwrap()
    }

    fn exporter(&self) -> [u8; 32] {
        self.conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None).unwrap()
    }
}

#[test]
fn exporter_matches_rustls_for_both_hashes() {
    let suites = [
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    for one in suites {
        let s = &[one][..];
        let mut u = Udom0::new(1_800_000_000).unwrap();
        let mut c = Client::new(Some(s));
        c.handshake(&mut u);
        let mut mine = [0u8; 32];
        u.session.as_ref().unwrap().exporter(EXPORTER_LABEL, &mut mine).unwrap();
        assert_eq!(mine, c.exporter(), "suite {:?}", s[0].suite());
        assert_eq!(c.key.key().as_deref(), Some(u.spki()));
    }
}

#[test]
fn attest_request_binds_nonce_exporter_and_key() {
    let mut u = Udom0::new(1_800_000_000).unwrap();
    let mut c = Client::new(None);
    c.handshake(&mut u);
    let nonce = [7u8; 32];
    let acts = c.send(&mut u, &TenantMsg::Attest { nonce });
    let qd = acts
        .iter()
        .find_map(|a| match a {
            Action::RequestQuote { id, qualifying_data } => Some((*id, qualifying_data.clone())),
            _ => None,
        })
        .expect("a quote request");
    let (id, qd) = qd;
    let binding = Binding { nonce, exporter: c.exporter(), udom0_spki: u.spki().to_vec() };
    assert_eq!(qd, verify::qualifying_data(&binding));

    let fake = FakeMetaDomain::new(&[launch("udom0", "udom0", "udom0")]);
    let evidence = fake.evidence(&qd);
    let acts = u.reply(id, Reply::Evidence(&postcard::to_allocvec(&evidence).unwrap()));
    c.take(acts);
    let Udom0Msg::Evidence { binding: got, evidence: ev } = c.recv() else { panic!("no evidence") };
    assert_eq!(got, binding);
    let profile = fake.profile();
    let ex =
        Expectations { nonce, exporter: c.exporter(), udom0_spki: u.spki(), host: &profile, launches: &fake.expected };
    let v = verify::verify(&ev, &got, &ex).unwrap();
    assert_eq!(v.launches.len(), 1);
    assert_eq!(u.attestations, 1);
}

fn volume_key(domain: &str, byte: u8) -> ProvisionKey {
    let volume = ssc_abi::attest::VolumeParams {
        export: "vol".into(),
        cipher: "aes-xts-plain64".into(),
        sector_size: 512,
        data_offset: 0,
        iv_offset: 0,
        large_iv: false,
        read_only: false,
        native_header: true,
        min_generation: 0,
    };
    ProvisionKey { domain: domain.into(), purpose: "volume".into(), key: alloc::vec![byte; 64], volume: Some(volume) }
}

fn key_requests(acts: &[Action]) -> Vec<(u64, ProvisionKey)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::KeySd { id, key } => Some((*id, key.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn keys_go_to_their_sds_and_the_tenant_hears_once_all_took_them() {
    let mut u = Udom0::new(0).unwrap();
    u.set_key_links(alloc::vec!["sd0".into(), "sd1".into()]);
    let mut c = Client::new(None);
    c.handshake(&mut u);
    let acts = c.send(&mut u, &TenantMsg::Provision { keys: alloc::vec![volume_key("sd0", 9), volume_key("sd1", 8)] });
    assert!(acts.iter().all(|a| !matches!(a, Action::Log(l) if l.contains("\u{9}"))));
    let reqs = key_requests(&acts);
    assert_eq!(reqs.iter().map(|(_, k)| k.domain.as_str()).collect::<Vec<_>>(), ["sd0", "sd1"]);
    assert_eq!(reqs[0].1.key, [9u8; 64]);
    // A second request while these are out is refused, not queued.
    c.send(&mut u, &TenantMsg::Status);
    assert!(matches!(c.recv(), Udom0Msg::Error { message } if message.contains("still being served")));
    let acts = u.reply(reqs[0].0, Reply::Ack);
    assert!(!acts.iter().any(|a| matches!(a, Action::ToTenant(_))), "no answer before every SD answered");
    let acts = u.reply(reqs[1].0, Reply::Ack);
    c.take(acts);
    assert_eq!(c.recv(), Udom0Msg::Provisioned { keys: 2 });
    c.send(&mut u, &TenantMsg::Status);
    let Udom0Msg::Status { keys, .. } = c.recv() else { panic!() };
    assert_eq!(keys, [("sd0".into(), "volume".into()), ("sd1".into(), "volume".into())]);
    assert_eq!(u.key("sd0", "volume"), Some(&[9u8; 64][..]));
}

#[test]
fn an_sd_refusing_its_key_is_named_and_unknown_sds_key_nothing() {
    let mut u = Udom0::new(0).unwrap();
    u.set_key_links(alloc::vec!["sd0".into()]);
    let mut c = Client::new(None);
    c.handshake(&mut u);
    // One unknown domain: nothing is keyed at all.
    let acts = c.send(&mut u, &TenantMsg::Provision { keys: alloc::vec![volume_key("sd0", 1), volume_key("sdX", 2)] });
    assert!(key_requests(&acts).is_empty());
    assert!(matches!(c.recv(), Udom0Msg::Error { message } if message.contains("no key link to `sdX`")));
    // A key without a layout is refused by purpose.
    let mut bare = volume_key("sd0", 1);
    bare.volume = None;
    c.send(&mut u, &TenantMsg::Provision { keys: alloc::vec![bare] });
    assert!(matches!(c.recv(), Udom0Msg::Error { message } if message.contains("volume keys")));
    // The SD refuses (wrong key): the tenant hears which SD and why.
    let acts = c.send(&mut u, &TenantMsg::Provision { keys: alloc::vec![volume_key("sd0", 1)] });
    let (id, _) = key_requests(&acts)[0].clone();
    c.take(u.reply(id, Reply::Error("the key does not match the volume header")));
    assert!(
        matches!(c.recv(), Udom0Msg::Error { message } if message.contains("`sd0` refused its key: the key does not match"))
    );
    assert_eq!(u.key("sd0", "volume"), None, "a refused key is not held");
    // Answers nobody asked for are dropped.
    assert!(u.reply(id, Reply::Ack).iter().all(|a| matches!(a, Action::Log(_))));
}

#[test]
fn grants_and_launch_go_to_the_builder_and_refusals_reach_the_tenant() {
    let mut u = Udom0::new(0).unwrap();
    let mut c = Client::new(None);
    c.handshake(&mut u);
    let g =
        |sd: &str, client: &str, p: &str| GrantRequest { sd: sd.into(), client: client.into(), permission: p.into() };
    let acts = c.send(
        &mut u,
        &TenantMsg::Grant {
            grants: alloc::vec![g("sd0", "client", "blk-interpose"), g("sd0", "other/client", "mem-read")],
        },
    );
    let ids: Vec<u64> = acts
        .iter()
        .filter_map(|a| match a {
            Action::RequestGrant { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    u.reply(ids[0], Reply::Ack);
    c.take(u.reply(ids[1], Reply::Error("domain violation: `other/client` is not in this meta-domain")));
    assert!(matches!(c.recv(), Udom0Msg::Error { message } if message.contains("domain violation")));
    let acts = c.send(&mut u, &TenantMsg::Grant { grants: alloc::vec![g("sd0", "client", "blk-interpose")] });
    let Some(Action::RequestGrant { id, .. }) = acts.iter().find(|a| matches!(a, Action::RequestGrant { .. })) else {
        panic!()
    };
    c.take(u.reply(*id, Reply::Ack));
    assert_eq!(c.recv(), Udom0Msg::Granted { grants: 1 });
    let acts = c.send(&mut u, &TenantMsg::Launch);
    let Some(Action::RequestLaunch { id }) = acts.iter().find(|a| matches!(a, Action::RequestLaunch { .. })) else {
        panic!()
    };
    c.take(u.reply(*id, Reply::Ack));
    assert_eq!(c.recv(), Udom0Msg::Launched);
}

#[test]
fn garbage_instead_of_tls_ends_the_session_not_udom0() {
    let mut u = Udom0::new(0).unwrap();
    u.tenant_connected();
    let acts = u.tenant_bytes(b"GET / HTTP/1.1\r\n\r\n");
    assert!(acts.iter().any(|a| matches!(a, Action::Log(l) if l.contains("tenant session ended"))), "{acts:?}");
    // A new connection works.
    let mut c = Client::new(None);
    c.handshake(&mut u);
    assert!(u.session.as_ref().unwrap().is_established());
}

#[test]
fn malformed_tenant_frame_gets_an_error_reply() {
    let mut u = Udom0::new(0).unwrap();
    let mut c = Client::new(None);
    c.handshake(&mut u);
    c.conn.writer().write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let out = c.out();
    let acts = u.tenant_bytes(&out);
    c.take(acts);
    assert!(matches!(c.recv(), Udom0Msg::Error { message } if message.contains("malformed")));
}

// --- A meta-domain in software: the quote layout of a TPM, a P-256 key. ---

fn launch(domain: &str, role: &str, image: &str) -> Launch {
    Launch::kernel(domain, role, image, "0.1.0")
}

struct SoftTpm {
    key: ring::signature::EcdsaKeyPair,
    public: Vec<u8>,
}

impl SoftTpm {
    fn new() -> Self {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pk8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap();
        let point = key.public_key().as_ref().to_vec();
        // TPMT_PUBLIC: ECC, SHA-256 name, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign.
        let mut p = Vec::new();
        p.extend_from_slice(&0x0023u16.to_be_bytes());
        p.extend_from_slice(&0x000bu16.to_be_bytes());
        p.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        for v in [0x0010u16, 0x0018, 0x000b, 0x0003, 0x0010] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        p.extend_from_slice(&32u16.to_be_bytes());
        p.extend_from_slice(&point[1..33]);
        p.extend_from_slice(&32u16.to_be_bytes());
        p.extend_from_slice(&point[33..]);
        SoftTpm { key, public: p }
    }

    fn quote(&self, qd: &[u8], pcrs: Vec<PcrValue>) -> Quote {
        let mut a = Vec::new();
        a.extend_from_slice(&0xff54_4347u32.to_be_bytes());
        a.extend_from_slice(&0x8018u16.to_be_bytes());
        a.extend_from_slice(&0u16.to_be_bytes());
        a.extend_from_slice(&(qd.len() as u16).to_be_bytes());
        a.extend_from_slice(qd);
        a.extend_from_slice(&[0u8; 8 + 4 + 4 + 1 + 8]);
        let banks: Vec<u16> = pcrs.iter().map(|p| p.bank).fold(Vec::new(), |mut v, b| {
            if !v.contains(&b) {
                v.push(b);
            }
            v
        });
        a.extend_from_slice(&(banks.len() as u32).to_be_bytes());
        for b in &banks {
            a.extend_from_slice(&b.to_be_bytes());
            a.push(3);
            let mut bits = [0u8; 3];
            for p in pcrs.iter().filter(|p| p.bank == *b) {
                bits[p.index as usize / 8] |= 1 << (p.index % 8);
            }
            a.extend_from_slice(&bits);
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in &pcrs {
            ctx.update(&p.value);
        }
        a.extend_from_slice(&32u16.to_be_bytes());
        a.extend_from_slice(ctx.finish().as_ref());
        let sig = self.key.sign(&ring::rand::SystemRandom::new(), &a).unwrap();
        let mut s = Vec::new();
        s.extend_from_slice(&0x0018u16.to_be_bytes());
        s.extend_from_slice(&0x000bu16.to_be_bytes());
        s.extend_from_slice(&32u16.to_be_bytes());
        s.extend_from_slice(&sig.as_ref()[..32]);
        s.extend_from_slice(&32u16.to_be_bytes());
        s.extend_from_slice(&sig.as_ref()[32..]);
        Quote { attest: a, signature: s, ak_public: self.public.clone(), pcrs }
    }
}

struct FakeMetaDomain {
    host: SoftTpm,
    vtpm: SoftTpm,
    log: EventLogWriter,
    expected: Vec<ExpectedLaunch>,
    host_pcrs: Vec<PcrValue>,
}

impl FakeMetaDomain {
    fn new(launches: &[Launch]) -> Self {
        let mut log = EventLogWriter::new();
        let mut expected = Vec::new();
        for l in launches {
            let image = alloc::format!("image bytes of {}", l.image);
            let d = l.record(&mut log, image.as_bytes());
            let mut sha384 = [0u8; 48];
            sha384.copy_from_slice(&d[1].1);
            expected.push(ExpectedLaunch { launch: l.clone(), sha384 });
        }
        let host_pcrs =
            [8u8, 9, 10].iter().map(|&i| PcrValue { bank: ALG_SHA256, index: i, value: alloc::vec![i; 32] }).collect();
        FakeMetaDomain { host: SoftTpm::new(), vtpm: SoftTpm::new(), log, expected, host_pcrs }
    }

    fn profile(&self) -> HostProfile {
        HostProfile { ak_public: self.host.public.clone(), pcrs: self.host_pcrs.clone() }
    }

    fn evidence(&self, qd: &[u8]) -> Evidence {
        let events = eventlog::parse(self.log.bytes()).unwrap();
        let pcrs = [ALG_SHA256, ALG_SHA384]
            .iter()
            .map(|&b| PcrValue {
                bank: b,
                index: LAUNCH_PCR,
                value: eventlog::replay(&events, b, LAUNCH_PCR as u32).unwrap(),
            })
            .collect();
        let vtpm = self.vtpm.quote(qd, pcrs);
        let hq = verify::host_qualifying_data(&vtpm.ak_public, qd);
        let host = self.host.quote(&hq, self.host_pcrs.clone());
        Evidence { vtpm, event_log: self.log.bytes().to_vec(), host }
    }
}

struct Case {
    fake: FakeMetaDomain,
    binding: Binding,
    spki: Vec<u8>,
}

impl Case {
    fn new() -> Self {
        let fake = FakeMetaDomain::new(&[launch("udom0", "udom0", "udom0"), launch("sd0", "sd", "storage-crypt")]);
        let spki = tls::ed25519_spki(&[5u8; 32]);
        let binding = Binding { nonce: [1u8; 32], exporter: [2u8; 32], udom0_spki: spki.clone() };
        Case { fake, binding, spki }
    }

    fn check(
        &self,
        evidence: &Evidence,
        binding: &Binding,
        launches: &[ExpectedLaunch],
        profile: &HostProfile,
    ) -> Result<verify::Verified, AttestError> {
        let ex =
            Expectations { nonce: [1u8; 32], exporter: [2u8; 32], udom0_spki: &self.spki, host: profile, launches };
        verify::verify(evidence, binding, &ex)
    }

    fn evidence(&self) -> Evidence {
        self.fake.evidence(&verify::qualifying_data(&self.binding))
    }
}

#[test]
fn honest_evidence_verifies() {
    let c = Case::new();
    let v = c.check(&c.evidence(), &c.binding, &c.fake.expected, &c.fake.profile()).unwrap();
    assert_eq!(v.launches.iter().map(|(l, _)| l.image.as_str()).collect::<Vec<_>>(), ["udom0", "storage-crypt"]);
}

#[test]
fn replayed_quote_is_refused() {
    let c = Case::new();
    let old = Binding { nonce: [9u8; 32], ..c.binding.clone() };
    let ev = c.fake.evidence(&verify::qualifying_data(&old));
    assert_eq!(c.check(&ev, &old, &c.fake.expected, &c.fake.profile()), Err(AttestError::Replay));
}

#[test]
fn diversion_to_another_session_or_key_is_refused() {
    let c = Case::new();
    let other = Binding { exporter: [3u8; 32], ..c.binding.clone() };
    let ev = c.fake.evidence(&verify::qualifying_data(&other));
    assert!(
        matches!(c.check(&ev, &other, &c.fake.expected, &c.fake.profile()), Err(AttestError::Diversion(w)) if w.contains("exporter"))
    );
    let other = Binding { udom0_spki: tls::ed25519_spki(&[6u8; 32]), ..c.binding.clone() };
    let ev = c.fake.evidence(&verify::qualifying_data(&other));
    assert!(
        matches!(c.check(&ev, &other, &c.fake.expected, &c.fake.profile()), Err(AttestError::Diversion(w)) if w.contains("key"))
    );
}

#[test]
fn forged_binding_is_refused() {
    let c = Case::new();
    let ev = c.evidence();
    let lie = Binding { nonce: [1u8; 32], exporter: [2u8; 32], udom0_spki: tls::ed25519_spki(&[8u8; 32]) };
    assert_eq!(c.check(&ev, &lie, &c.fake.expected, &c.fake.profile()), Err(AttestError::BindingForged));
}

#[test]
fn substituted_image_is_named() {
    let c = Case::new();
    let mut want = c.fake.expected.clone();
    want[1].sha384 = [0xab; 48];
    let err = c.check(&c.evidence(), &c.binding, &want, &c.fake.profile()).unwrap_err();
    assert!(matches!(&err, AttestError::VmSubstitution { index: 2, .. }), "{err}");
    assert!(err.to_string().contains("storage-crypt"), "{err}");
    let mut want = c.fake.expected.clone();
    want[1].launch.version = "0.2.0".into();
    assert!(matches!(
        c.check(&c.evidence(), &c.binding, &want, &c.fake.profile()),
        Err(AttestError::VmSubstitution { .. })
    ));
    assert!(matches!(
        c.check(&c.evidence(), &c.binding, &want[..1], &c.fake.profile()),
        Err(AttestError::UnexpectedLaunch(_))
    ));
    let mut more = c.fake.expected.clone();
    more.push(more[1].clone());
    assert!(matches!(c.check(&c.evidence(), &c.binding, &more, &c.fake.profile()), Err(AttestError::MissingLaunch(_))));
}

#[test]
fn edited_event_log_is_refused() {
    let c = Case::new();
    let mut ev = c.evidence();
    // Drop the last event: the log no longer replays to the quoted PCR.
    let events = eventlog::parse(&ev.event_log).unwrap();
    let mut w = EventLogWriter::new();
    let e = &events[0];
    w.append(e.pcr, e.event_type, &e.digests, &e.data);
    ev.event_log = w.bytes().to_vec();
    assert!(matches!(
        c.check(&ev, &c.binding, &c.fake.expected, &c.fake.profile()),
        Err(AttestError::EventLogMismatch { .. })
    ));
}

#[test]
fn host_substitution_is_refused() {
    let c = Case::new();
    let ev = c.evidence();
    let mut p = c.fake.profile();
    p.pcrs[1].value = alloc::vec![0xee; 32];
    assert!(
        matches!(c.check(&ev, &c.binding, &c.fake.expected, &p), Err(AttestError::HostSubstitution(w)) if w.contains("PCR 9"))
    );
    let other_host = SoftTpm::new();
    let p = HostProfile { ak_public: other_host.public.clone(), pcrs: c.fake.host_pcrs.clone() };
    assert!(matches!(c.check(&ev, &c.binding, &c.fake.expected, &p), Err(AttestError::HostSubstitution(_))));
}

#[test]
fn vtpm_not_vouched_by_host_is_refused() {
    let c = Case::new();
    let mut ev = c.evidence();
    let rogue = SoftTpm::new();
    ev.vtpm = rogue.quote(&verify::qualifying_data(&c.binding), ev.vtpm.pcrs.clone());
    assert_eq!(c.check(&ev, &c.binding, &c.fake.expected, &c.fake.profile()), Err(AttestError::VtpmNotVouched));
}

#[test]
fn tampered_quote_signature_is_refused() {
    let c = Case::new();
    let mut ev = c.evidence();
    let last = ev.vtpm.attest.len() - 1;
    ev.vtpm.attest[last] ^= 1;
    assert!(matches!(
        c.check(&ev, &c.binding, &c.fake.expected, &c.fake.profile()),
        Err(AttestError::VtpmQuote(tpm::TpmError::BadSignature))
    ));
}

#[test]
fn event_log_round_trips_and_launch_lines_parse() {
    let l = launch("sd0-storage", "sd", "storage-crypt");
    assert_eq!(Launch::parse(l.line().as_bytes()), Some(l.clone()));
    let mut w = EventLogWriter::new();
    l.record(&mut w, b"abc");
    let events = eventlog::parse(w.bytes()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].digest(ALG_SHA384).unwrap(), ring::digest::digest(&ring::digest::SHA384, b"abc").as_ref());
    for cut in 0..w.bytes().len() {
        let _ = eventlog::parse(&w.bytes()[..cut]);
    }
}

proptest::proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let _ = eventlog::parse(&bytes);
        let _ = tpm::QuoteInfo::parse(&bytes);
        let _ = tpm::AttestationKey::parse(&bytes);
        let _ = Launch::parse(&bytes);
        let mut b = bytes.clone();
        let _ = take_frame(&mut b);
    }
}
