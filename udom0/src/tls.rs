//! Udom0's TLS 1.3 endpoint for the tenant: rustls (`no_std`, ring
//! provider) driven through its unbuffered API, bytes in and bytes out.
//!
//! * **Key**: an Ed25519 key generated when Udom0 boots, presented as a
//!   raw public key (RFC 7250), not a certificate: nothing vouches for it
//!   before the handshake. The tenant trusts it only once a vTPM quote binds
//!   it together with this session's exporter value and the tenant's nonce
//!   (see `ssc_abi::attest`).
//! * **Exporter**: rustls offers `export_keying_material` only on its
//!   `std` connection types. Udom0 learns the session's exporter master
//!   secret through rustls's `KeyLog` hook (it never leaves Udom0's
//!   memory) and derives the RFC 8446 §7.5 exporter itself; the host tests
//!   check the value against rustls's own on the tenant's side.
//! * TLS 1.3 only, no resumption tickets, no early data, no client
//!   certificate (the tenant authenticates Udom0; Udom0 accepts whoever
//!   the builder relays, and only an attested session gets secrets because
//!   only the tenant can verify the quote).

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, ServerConfig, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::time_provider::TimeProvider;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CipherSuite, KeyLog};

/// Largest TLS input buffered before the session is refused.
const MAX_INCOMING: usize = 1 << 20;

/// Why the TLS endpoint failed.
#[derive(Debug)]
pub enum TlsError {
    Key(String),
    Tls(rustls::Error),
    Overflow,
    NotEstablished,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Key(e) => write!(f, "TLS key: {e}"),
            TlsError::Tls(e) => write!(f, "TLS: {e}"),
            TlsError::Overflow => write!(f, "TLS: the peer sent more than {MAX_INCOMING} bytes without a full record"),
            TlsError::NotEstablished => write!(f, "TLS: the handshake has not finished"),
        }
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Tls(e)
    }
}

/// The exporter master secret of the session being handshaken, caught
/// through rustls's key-log hook.
#[derive(Debug, Default)]
struct ExporterSecret(spin::Mutex<Option<Vec<u8>>>);

impl KeyLog for ExporterSecret {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == "EXPORTER_SECRET" {
            *self.0.lock() = Some(secret.to_vec());
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == "EXPORTER_SECRET"
    }
}

/// Wall-clock time as the builder told Udom0 at boot (rustls asks for it;
/// with no tickets and no client certificates nothing depends on it).
#[derive(Debug)]
struct BootClock(u64);

impl TimeProvider for BootClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(core::time::Duration::from_secs(self.0)))
    }
}

/// Udom0's TLS identity and configuration: one per boot.
pub struct TlsEndpoint {
    config: Arc<ServerConfig>,
    secret: Arc<ExporterSecret>,
    spki: Vec<u8>,
}

/// SubjectPublicKeyInfo DER of an Ed25519 public key.
pub fn ed25519_spki(public: &[u8; 32]) -> Vec<u8> {
    let mut v = alloc::vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    v.extend_from_slice(public);
    v
}

impl TlsEndpoint {
    /// Generates a fresh Ed25519 key; `unix_time` is the builder's clock.
    pub fn generate(unix_time: u64) -> Result<Self, TlsError> {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| TlsError::Key("no randomness".into()))?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| TlsError::Key(alloc::format!("{e}")))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        let spki = ed25519_spki(&public);
        let der = PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
        let signer = provider::sign::any_eddsa_type(&der)?;
        let certified = Arc::new(CertifiedKey::new(alloc::vec![CertificateDer::from(spki.clone())], signer));
        let secret = Arc::new(ExporterSecret::default());
        let mut config =
            ServerConfig::builder_with_details(Arc::new(provider::default_provider()), Arc::new(BootClock(unix_time)))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified)));
        config.send_tls13_tickets = 0;
        config.key_log = secret.clone();
        Ok(TlsEndpoint { config: Arc::new(config), secret, spki })
    }

    /// Udom0's public key, SubjectPublicKeyInfo DER.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// A new session for a tenant connection.
    pub fn accept(&self) -> Result<TlsSession, TlsError> {
        *self.secret.0.lock() = None;
        Ok(TlsSession {
            conn: UnbufferedServerConnection::new(self.config.clone())?,
            secret: self.secret.clone(),
            exporter_secret: None,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plaintext: Vec::new(),
            pending: Vec::new(),
            established: false,
            closed: false,
        })
    }
}

/// One tenant session: feed it TLS bytes, take TLS bytes to send back and
/// the plaintext that arrived; queue plaintext to send.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    secret: Arc<ExporterSecret>,
    /// The exporter master secret and whether the suite hashes with SHA-384.
    exporter_secret: Option<(Vec<u8>, bool)>,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    plaintext: Vec<u8>,
    pending: Vec<u8>,
    established: bool,
    closed: bool,
}

impl TlsSession {
    /// Takes TLS bytes from the tenant and runs the state machine.
    pub fn feed(&mut self, tls: &[u8]) -> Result<(), TlsError> {
        if self.incoming.len() + tls.len() > MAX_INCOMING {
            return Err(TlsError::Overflow);
        }
        self.incoming.extend_from_slice(tls);
        self.drive()
    }

    /// Queues plaintext for the tenant (sent once the handshake is done).
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), TlsError> {
        self.pending.extend_from_slice(plaintext);
        self.drive()
    }

    /// TLS bytes to send to the tenant.
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.outgoing)
    }

    /// Plaintext the tenant sent since the last call.
    pub fn take_plaintext(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.plaintext)
    }

    pub fn is_established(&self) -> bool {
        self.established
    }

    /// The tenant closed the session.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The RFC 8446 §7.5 exporter of this session, no context.
    pub fn exporter(&self, label: &[u8], out: &mut [u8]) -> Result<(), TlsError> {
        let (secret, hash) = self.exporter_secret.as_ref().ok_or(TlsError::NotEstablished)?;
        let (alg, digest) = match hash {
            true => (ring::hkdf::HKDF_SHA384, &ring::digest::SHA384),
            false => (ring::hkdf::HKDF_SHA256, &ring::digest::SHA256),
        };
        let empty = ring::digest::digest(digest, b"");
        // Derive-Secret(Secret, label, "") then HKDF-Expand-Label(.., "exporter", Hash(""), L).
        let mut derived = alloc::vec![0u8; digest.output_len()];
        expand_label(alg, secret, label, empty.as_ref(), &mut derived)?;
        expand_label(alg, &derived, b"exporter", empty.as_ref(), out)
    }

    fn drive(&mut self) -> Result<(), TlsError> {
        let mut scratch = alloc::vec![0u8; 0];
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let mut stop = false;
            match state? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec?;
                        discard += rec.discard;
                        self.plaintext.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => loop {
                    match e.encode(&mut scratch) {
                        Ok(n) => {
                            self.outgoing.extend_from_slice(&scratch[..n]);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(s)) => scratch.resize(s.required_size, 0),
                        Err(EncodeError::AlreadyEncoded) => break,
                    }
                },
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::WriteTraffic(mut w) => {
                    if !self.established {
                        self.established = true;
                        self.exporter_secret = self.secret.0.lock().take().map(|s| (s, false));
                    }
                    if !self.pending.is_empty() {
                        let need = self.pending.len() + 64 * (self.pending.len() / 16384 + 1);
                        scratch.resize(need, 0);
                        let n =
                            w.encrypt(&self.pending, &mut scratch).map_err(|e| TlsError::Key(alloc::format!("{e}")))?;
                        self.outgoing.extend_from_slice(&scratch[..n]);
                        self.pending.clear();
                    }
                    stop = true;
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.closed = true;
                    stop = true;
                }
                _ => stop = true,
            }
            if discard != 0 {
                self.incoming.drain(..discard);
            }
            if stop {
                if let Some((_, hash)) = self.exporter_secret.as_mut()
                    && let Some(suite) = self.conn.negotiated_cipher_suite()
                {
                    *hash = suite.suite() == CipherSuite::TLS13_AES_256_GCM_SHA384;
                }
                return Ok(());
            }
        }
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1).
fn expand_label(
    alg: ring::hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), TlsError> {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let context_len = [context.len() as u8];
    let info: [&[u8]; 6] = [&length, &label_len, b"tls13 ", label, &context_len, context];
    let prk = ring::hkdf::Prk::new_less_safe(alg, secret);
    let okm = prk.expand(&info, Len(out.len())).map_err(|_| TlsError::Key("exporter too long".into()))?;
    okm.fill(out).map_err(|_| TlsError::Key("exporter too long".into()))
}

/// The tenant's side of the handshake: accepts the raw public key Udom0
/// presents (checking its handshake signature) and remembers it; the
/// attestation, not the handshake, is what makes that key trusted.
#[derive(Debug, Default)]
pub struct RawKeyVerifier(spin::Mutex<Option<Vec<u8>>>);

impl RawKeyVerifier {
    /// The key the handshake presented (SubjectPublicKeyInfo DER).
    pub fn key(&self) -> Option<Vec<u8>> {
        self.0.lock().clone()
    }
}

impl rustls::client::danger::ServerCertVerifier for RawKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("Udom0 speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &rustls::pki_types::SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &provider::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider::default_provider().signature_verification_algorithms.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}
