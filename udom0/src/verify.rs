//! The tenant's check of Udom0's evidence, before it sends a secret.
//!
//! Sans-IO: the tenant's side (`ssc attest`) gathers what it knows — its
//! nonce, the TLS exporter value and Udom0 key of *its* session, the
//! provider's published host profile, and the launches it asked for with
//! their catalog digests — and [`verify`] says whether the evidence proves
//! exactly that, or names the attack it caught:
//!
//! | check | failure |
//! |---|---|
//! | host AK is the profile's, its quote verifies, PCRs equal the profile | [`AttestError::HostSubstitution`] |
//! | host quote's qualifying data binds the vTPM key and this session | [`AttestError::VtpmNotVouched`] |
//! | vTPM quote verifies over the quoted PCRs | [`AttestError::VtpmQuote`] |
//! | qualifying data = H(Udom0's claimed binding) | [`AttestError::BindingForged`] |
//! | claimed nonce = ours | [`AttestError::Replay`] |
//! | claimed exporter and key = those of our TLS session | [`AttestError::Diversion`] |
//! | event log replays to the quoted PCRs | [`AttestError::EventLogMismatch`] |
//! | every launch is one we asked for, with its catalog digest, each once | [`AttestError::VmSubstitution`] and friends |

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ssc_abi::attest::{
    ALG_SHA256, ALG_SHA384, Binding, EXPORTER_LEN, Evidence, LAUNCH_PCR, NONCE_LEN, PcrValue, Quote, binding_input,
    host_binding_input,
};

use crate::eventlog::{self, EventLogError, Launch};
use crate::tpm::{AttestationKey, QuoteInfo, TpmError};

/// The provider's published profile of a host: its TPM's attestation key
/// and the values of `ssc_abi::attest::HOST_PCRS` a correct host has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProfile {
    /// `TPMT_PUBLIC` of the host TPM's attestation key.
    pub ak_public: Vec<u8>,
    /// SHA-256 bank, [`HOST_PCRS`] in order.
    pub pcrs: Vec<PcrValue>,
}

/// One measurement the tenant expects, in launch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedLaunch {
    pub launch: Launch,
    /// SHA-384 of the measured bytes (the catalog digest for an image).
    pub sha384: [u8; 48],
}

/// What the tenant's side of the session knows.
#[derive(Clone, Debug)]
pub struct Expectations<'a> {
    pub nonce: [u8; NONCE_LEN],
    pub exporter: [u8; EXPORTER_LEN],
    /// Udom0's public key as the TLS handshake presented it.
    pub udom0_spki: &'a [u8],
    pub host: &'a HostProfile,
    pub launches: &'a [ExpectedLaunch],
}

/// What a verified attestation established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub host_pcrs: Vec<PcrValue>,
    pub vtpm_pcrs: Vec<PcrValue>,
    /// The launches, in order, with their SHA-384 digests.
    pub launches: Vec<(Launch, [u8; 48])>,
    /// The vTPM's reset count and clock (ms) at the quote.
    pub vtpm_reset_count: u32,
    pub vtpm_clock_ms: u64,
}

/// Why evidence was refused; each names the attack or fault it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttestError {
    /// The host quote is not from the profile's host, or the host is not
    /// in the profile's state.
    HostSubstitution(String),
    /// The host TPM did not vouch for this vTPM key in this session.
    VtpmNotVouched,
    VtpmQuote(TpmError),
    /// Udom0's claimed binding does not hash to the vTPM quote's
    /// qualifying data.
    BindingForged,
    /// The quote answers another nonce than ours.
    Replay,
    /// The quote was made for another TLS session or another Udom0 key.
    Diversion(&'static str),
    EventLog(EventLogError),
    /// The log does not replay to the quoted PCR.
    EventLogMismatch {
        bank: &'static str,
    },
    /// A launch measured other bytes, or another image or version, than
    /// the tenant asked for.
    VmSubstitution {
        index: usize,
        expected: String,
        got: String,
    },
    /// The log has a launch the tenant did not ask for.
    UnexpectedLaunch(String),
    /// A launch the tenant asked for is not in the log.
    MissingLaunch(String),
}

impl fmt::Display for AttestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttestError::HostSubstitution(why) => write!(f, "host substitution: {why}"),
            AttestError::VtpmNotVouched => write!(
                f,
                "the host TPM's quote does not vouch for this vTPM's attestation key in this session (vTPM substitution)"
            ),
            AttestError::VtpmQuote(e) => write!(f, "vTPM quote: {e}"),
            AttestError::BindingForged => {
                write!(f, "the binding Udom0 claims is not what the vTPM quoted (forged evidence)")
            }
            AttestError::Replay => write!(f, "replayed quote: it answers another nonce than the one this tenant sent"),
            AttestError::Diversion(what) => write!(
                f,
                "diversion: the quote was made for another {what} than this TLS session's; the session does not end in the attested Udom0"
            ),
            AttestError::EventLog(e) => write!(f, "event log: {e}"),
            AttestError::EventLogMismatch { bank } => {
                write!(f, "the event log does not replay to the quoted {bank} PCR {LAUNCH_PCR}: it was edited")
            }
            AttestError::VmSubstitution { index, expected, got } => {
                write!(f, "VM substitution at launch {index}: expected {expected}, the builder launched {got}")
            }
            AttestError::UnexpectedLaunch(l) => write!(f, "the builder launched something not asked for: {l}"),
            AttestError::MissingLaunch(l) => write!(f, "the builder did not launch {l}"),
        }
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec()
}

/// Hex of a digest, for messages.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&alloc::format!("{x:02x}"));
    }
    s
}

/// The vTPM quote's qualifying data for a binding.
pub fn qualifying_data(b: &Binding) -> Vec<u8> {
    sha256(&binding_input(&b.nonce, &b.exporter, &b.udom0_spki))
}

/// The host quote's qualifying data for a vTPM key and vTPM qualifying data.
pub fn host_qualifying_data(vtpm_ak_public: &[u8], vtpm_qualifying: &[u8]) -> Vec<u8> {
    sha256(&host_binding_input(vtpm_ak_public, vtpm_qualifying))
}

/// Checks one quote's signature and PCR digest; returns its contents.
fn check_quote(q: &Quote) -> Result<QuoteInfo, TpmError> {
    let ak = AttestationKey::parse(&q.ak_public)?;
    ak.verify(&q.attest, &q.signature)?;
    let info = QuoteInfo::parse(&q.attest)?;
    if !info.matches(&q.pcrs) {
        return Err(TpmError::PcrMismatch);
    }
    Ok(info)
}

fn describe(l: &Launch, d: &[u8]) -> String {
    alloc::format!("{} `{}` {} ({}) sha384 {}", l.role, l.image, l.version, l.part, hex(&d[..8.min(d.len())]))
}

/// Checks `evidence` and Udom0's `binding` against what the tenant knows.
pub fn verify(evidence: &Evidence, binding: &Binding, ex: &Expectations) -> Result<Verified, AttestError> {
    // 1. The host: the provider's TPM, in the provider's published state.
    if evidence.host.ak_public != ex.host.ak_public {
        return Err(AttestError::HostSubstitution(
            "the host quote is signed by another TPM than the provider's profile names".into(),
        ));
    }
    let host = check_quote(&evidence.host)
        .map_err(|e| AttestError::HostSubstitution(alloc::format!("the host quote does not verify: {e}")))?;
    for want in &ex.host.pcrs {
        let got = evidence.host.pcrs.iter().find(|p| p.bank == want.bank && p.index == want.index);
        match got {
            Some(g) if g.value == want.value => {}
            Some(g) => {
                return Err(AttestError::HostSubstitution(alloc::format!(
                    "host PCR {} is {} where the provider's profile says {}: the host runs other software than published",
                    want.index,
                    hex(&g.value[..8]),
                    hex(&want.value[..8.min(want.value.len())])
                )));
            }
            None => {
                return Err(AttestError::HostSubstitution(alloc::format!(
                    "the host quote does not cover PCR {}",
                    want.index
                )));
            }
        }
    }
    // 2. The vTPM's quote, and the host vouching for its key.
    let vtpm = check_quote(&evidence.vtpm).map_err(AttestError::VtpmQuote)?;
    if host.extra_data != host_qualifying_data(&evidence.vtpm.ak_public, &vtpm.extra_data) {
        return Err(AttestError::VtpmNotVouched);
    }
    // 3. The binding: this nonce, this TLS session, this Udom0 key.
    if vtpm.extra_data != qualifying_data(binding) {
        return Err(AttestError::BindingForged);
    }
    if binding.nonce != ex.nonce {
        return Err(AttestError::Replay);
    }
    if binding.exporter != ex.exporter {
        return Err(AttestError::Diversion("TLS session (exporter value)"));
    }
    if binding.udom0_spki != ex.udom0_spki {
        return Err(AttestError::Diversion("Udom0 key"));
    }
    // 4. The event log against the quoted PCRs.
    let events = eventlog::parse(&evidence.event_log).map_err(AttestError::EventLog)?;
    for (bank, name) in [(ALG_SHA256, "sha256"), (ALG_SHA384, "sha384")] {
        let quoted = evidence.vtpm.pcrs.iter().find(|p| p.bank == bank && p.index == LAUNCH_PCR);
        let replayed = eventlog::replay(&events, bank, LAUNCH_PCR as u32);
        if quoted.is_none() || replayed.as_deref() != quoted.map(|p| p.value.as_slice()) {
            return Err(AttestError::EventLogMismatch { bank: name });
        }
    }
    // 5. Exactly the launches asked for, each once (in any order: the
    // domain names are the builder's labels, the images are the tenant's).
    let mut remaining: Vec<&ExpectedLaunch> = ex.launches.iter().collect();
    let mut launches = Vec::new();
    let measured = events.iter().filter(|e| e.pcr == LAUNCH_PCR as u32 && e.event_type != eventlog::EV_NO_ACTION);
    for (i, e) in measured.enumerate() {
        let Some(l) = Launch::parse(&e.data) else {
            return Err(AttestError::UnexpectedLaunch(alloc::format!("event {} is not a launch record", i + 1)));
        };
        let d384 = e.digest(ALG_SHA384).unwrap_or(&[]);
        let mut digest = [0u8; 48];
        if d384.len() == 48 {
            digest.copy_from_slice(d384);
        }
        let same_slot = |w: &&ExpectedLaunch| w.launch.role == l.role && w.launch.part == l.part;
        let exact = |w: &&ExpectedLaunch| {
            same_slot(w) && w.launch.image == l.image && w.launch.version == l.version && w.sha384 == digest
        };
        if let Some(pos) = remaining.iter().position(exact) {
            remaining.remove(pos);
            launches.push((l, digest));
        } else if let Some(want) = remaining.iter().find(|w| same_slot(w)) {
            return Err(AttestError::VmSubstitution {
                index: i + 1,
                expected: describe(&want.launch, &want.sha384),
                got: alloc::format!("{} as domain `{}`", describe(&l, d384), l.domain),
            });
        } else {
            return Err(AttestError::UnexpectedLaunch(alloc::format!(
                "{} as domain `{}`",
                describe(&l, d384),
                l.domain
            )));
        }
    }
    if let Some(missing) = remaining.first() {
        return Err(AttestError::MissingLaunch(describe(&missing.launch, &missing.sha384)));
    }
    Ok(Verified {
        host_pcrs: evidence.host.pcrs.clone(),
        vtpm_pcrs: evidence.vtpm.pcrs.clone(),
        launches,
        vtpm_reset_count: vtpm.reset_count,
        vtpm_clock_ms: vtpm.clock,
    })
}
