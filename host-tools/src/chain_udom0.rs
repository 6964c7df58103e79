//! Attested launch: a chain's `[udom0]` section, the builder's side of
//! Udom0 (vTPM, host TPM, quotes, the TLS relay) and the tenant's side
//! (`ssc attest`).
//!
//! ```toml
//! [udom0]
//! listen = "127.0.0.1:0"   # the relay's TCP address (0: any free port)
//! ```
//!
//! With `[udom0]`, `ssc up` (the builder) boots the host TPM, creates the
//! meta-domain's vTPM, launches Udom0 first and measures every launch into
//! the vTPM (Udom0, each SD image, each client's kernel, initramfs and
//! command line), with a TCG event log. It relays the tenant's TCP
//! connection to Udom0's `tls` link, byte for byte, and answers Udom0's
//! `QuoteRequest`s with vTPM and host quotes. It wires a key link between
//! Udom0 and each disk's SD and never reads the tenant's keys; it waits
//! until Udom0 has keyed the SDs and asked for grants (checked by
//! `crate::grants`) and the launch, then starts the clients with only the
//! granted wiring.
//!
//! `ssc attest CHAIN --host-profile FILE` is the tenant: it asks `ssc up`
//! for the relay's address, opens TLS 1.3 to Udom0 (rustls, Udom0's raw
//! public key), sends a fresh nonce, and verifies the evidence with
//! `udom0::verify` against the provider's published host profile and the
//! launches its own chain file implies (catalog digests, its own kernel and
//! initramfs), then prints what it verified or the attack it caught. With
//! `--provision`, and only after verifying, it sends the keys, the grants
//! and the launch through Udom0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use ssc_abi::Body;
use ssc_abi::attest::{
    ALG_SHA256, EXPORTER_LABEL, GrantRequest, NONCE_LEN, PcrValue, ProvisionKey, TenantMsg, Udom0Msg, encode_frame,
    take_frame,
};
use udom0::eventlog::Launch;
use udom0::verify::{Expectations, ExpectedLaunch, HostProfile, Verified};

use crate::builder::{ControlEvent, ControlSender, DomainSpec, LinkSpec, MetaDomain};
use crate::catalog::{self, VerifiedImage};
use crate::grants::{Authority, Granted};
use crate::qemu::Accel;
use crate::vtpm::{HostTpm, Vtpm};

/// The domain name of Udom0 in every meta-domain.
pub const DOMAIN: &str = "udom0";

/// `[udom0]` of a chain file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Udom0Section {
    /// The relay's TCP address, `127.0.0.1:0` by default.
    pub listen: Option<String>,
}

/// `[udom0]`, checked.
#[derive(Clone, Debug)]
pub struct Udom0Plan {
    pub image: VerifiedImage,
    pub listen: SocketAddr,
    /// Catalog publisher keys the builder trusts (measured into the host TPM).
    pub trusted: Vec<String>,
    /// Every verified catalog image, to name what the builder launches.
    pub catalog: Vec<VerifiedImage>,
}

impl Udom0Plan {
    pub fn check(section: Udom0Section, catalog_dir: &Path, trusted: &[String]) -> Result<Udom0Plan> {
        let image = catalog::find(catalog_dir, trusted, "udom0")?;
        let listen: SocketAddr = section
            .listen
            .as_deref()
            .unwrap_or("127.0.0.1:0")
            .parse()
            .map_err(|e| anyhow!("`listen` is not an address like 127.0.0.1:7443: {e}"))?;
        if !listen.ip().is_loopback() {
            bail!("`listen` = {listen}: the relay only listens on loopback here (127.0.0.1)");
        }
        Ok(Udom0Plan { image, listen, trusted: trusted.to_vec(), catalog: catalog::verify(catalog_dir, trusted)? })
    }
}

fn launch_of(domain: &str, role: &str, m: &catalog::ImageEntry) -> Launch {
    Launch::kernel(domain, role, &m.name, &m.version)
}

fn sha384_bytes(b: &[u8]) -> [u8; 48] {
    let mut o = [0u8; 48];
    o.copy_from_slice(ring::digest::digest(&ring::digest::SHA384, b).as_ref());
    o
}

fn sha384_file(p: &Path) -> Result<[u8; 48]> {
    Ok(sha384_bytes(&std::fs::read(p).with_context(|| format!("measuring {}", p.display()))?))
}

/// The measurements of a client VM: kernel, initramfs, command line.
pub fn client_launches(domain: &str, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<Vec<(Launch, Vec<u8>)>> {
    let kernel = std::fs::read(kernel).with_context(|| format!("measuring {}", kernel.display()))?;
    let initrd = std::fs::read(initrd).with_context(|| format!("measuring {}", initrd.display()))?;
    Ok(client_launches_of(domain, &kernel, &initrd, cmdline))
}

/// [`client_launches`] of bytes already read (the builder's pinned copies).
pub fn client_launches_of(domain: &str, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Vec<(Launch, Vec<u8>)> {
    let l = |part: &str| Launch {
        domain: domain.into(),
        role: "client".into(),
        image: "client".into(),
        version: "tenant".into(),
        part: part.into(),
    };
    vec![(l("kernel"), kernel.to_vec()), (l("initrd"), initrd.to_vec()), (l("cmdline"), cmdline.as_bytes().to_vec())]
}

/// The builder's side of Udom0 in a running chain.
pub struct Session {
    vtpm: Arc<Mutex<Vtpm>>,
    host: HostTpm,
    relay: SocketAddr,
    connects: Receiver<Sender<Result<(), String>>>,
    waiting: Vec<(u64, Sender<Result<(), String>>)>,
    sender: ControlSender,
    /// Checks Udom0's grant requests.
    authority: Authority,
    /// What the builder granted.
    pub granted: Granted,
    /// The SDs Udom0 keys (one per disk).
    keyed_sds: Vec<String>,
    /// Udom0 asked to launch the clients, and the builder did.
    launched: bool,
    pub quotes: u64,
    /// Host TPM boot and vTPM manufacture.
    pub tpm_setup: Duration,
    /// The builder's TPM work for all quotes so far.
    pub quote_work: Duration,
}

/// The socket of Udom0's key link to SD `domain` (Udom0 listens).
pub fn key_socket(scratch: &Path, domain: &str) -> PathBuf {
    scratch.join(format!("udom0-key-{domain}.sock"))
}

/// Starts the TPMs and Udom0 (measured first), and the relay; from then
/// on, every domain `sds` starts is measured. Udom0 gets a key link to
/// each disk's SD of `chain`.
pub fn start(
    plan: &Udom0Plan,
    chain: &crate::chain::Plan,
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    scratch: &Path,
) -> Result<Session> {
    let t = Instant::now();
    let base = crate::vtpm::host_state_dir();
    let host = HostTpm::boot(&base, scratch, &plan.trusted).context("booting the host TPM")?;
    let vtpm = Vtpm::create(&base, &scratch.join("vtpm")).context("creating the meta-domain's vTPM")?;
    let tpm_setup = t.elapsed();
    eprintln!("ssc up: udom0: host TPM booted, vTPM manufactured ({} ms)", tpm_setup.as_millis());
    let vtpm = Arc::new(Mutex::new(vtpm));
    // Every SD image is named by its catalog manifest; anything else is
    // measured under its file name (and so fails the tenant's check).
    let catalog: Vec<(PathBuf, catalog::ImageEntry)> =
        plan.catalog.iter().map(|v| (v.path.clone(), v.manifest.image.clone())).collect();
    let v = vtpm.clone();
    let measure = move |spec: &DomainSpec, bytes: &[u8]| -> Result<()> {
        let role = if spec.name == DOMAIN { "udom0" } else { "sd" };
        let launch = match catalog.iter().find(|(p, _)| p == &spec.image) {
            Some((_, m)) => launch_of(&spec.name, role, m),
            None => Launch {
                domain: spec.name.clone(),
                role: role.into(),
                image: spec.image.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
                version: "uncatalogued".into(),
                part: "kernel".into(),
            },
        };
        v.lock().unwrap().measure(launch, bytes)
    };
    sds.measure_with(measure);
    let tls = scratch.join("udom0-tls.sock");
    let mut spec = plan.image.spec(DOMAIN);
    spec.links.push(LinkSpec::listen("tls", &tls));
    let keyed_sds: Vec<String> = chain.disks.iter().enumerate().map(|(i, d)| d.sd_name(&i.to_string(), 0)).collect();
    for sd in &keyed_sds {
        spec.links.push(LinkSpec::listen(&format!("key.{sd}"), &key_socket(scratch, sd)));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    spec.append = format!("ssc.time={now} ssc.keys={}", keyed_sds.join(","));
    let dom = sds.start(&spec, accel, echo, Duration::from_secs(60))?;
    let ctl = dom.control().ok_or_else(|| anyhow!("udom0 has no control link"))?;
    let sender = ctl.sender();
    let listener = TcpListener::bind(plan.listen).with_context(|| format!("binding the relay on {}", plan.listen))?;
    let relay = listener.local_addr()?;
    let link =
        UnixStream::connect(&tls).with_context(|| format!("connecting to udom0's tls link {}", tls.display()))?;
    let (tx, connects) = channel();
    std::thread::spawn(move || relay_loop(listener, link, tx));
    eprintln!("ssc up: udom0: ready; the tenant's TLS relay listens on {relay} (`ssc attest`)");
    Ok(Session {
        vtpm,
        host,
        relay,
        connects,
        waiting: vec![],
        sender,
        authority: Authority::of(chain),
        granted: Granted::default(),
        keyed_sds,
        launched: false,
        quotes: 0,
        tpm_setup,
        quote_work: Duration::ZERO,
    })
}

/// Relays one tenant connection at a time to Udom0's `tls` link. Before
/// the first byte, Udom0 is told a new session begins (and acknowledges).
fn relay_loop(listener: TcpListener, link: UnixStream, connects: Sender<Sender<Result<(), String>>>) {
    let current: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
    let (from_udom0, cur) = (link.try_clone(), current.clone());
    if let Ok(mut from_udom0) = from_udom0 {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_udom0.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(t) = cur.lock().unwrap().as_mut() {
                    let _ = t.write_all(&buf[..n]);
                }
            }
        });
    }
    for stream in listener.incoming() {
        let Ok(mut tcp) = stream else { continue };
        let (tx, rx) = channel();
        if connects.send(tx).is_err() {
            return;
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            _ => continue, // Udom0 did not take it: the tenant sees the connection close.
        }
        let Ok(peer) = tcp.try_clone() else { continue };
        *current.lock().unwrap() = Some(peer);
        let mut to_udom0 = &link;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_udom0.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        *current.lock().unwrap() = None;
    }
}

impl Session {
    /// The relay's TCP address.
    pub fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// Measures a client VM before it starts, from the bytes it will run
    /// (the builder's pinned copies of its kernel and initramfs).
    pub fn measure_client(&self, domain: &str, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<()> {
        let mut v = self.vtpm.lock().unwrap();
        for (l, bytes) in client_launches_of(domain, kernel, initrd, cmdline) {
            v.measure(l, &bytes)?;
        }
        Ok(())
    }

    /// Serves Udom0's quote requests and the relay's new connections.
    pub fn tick(&mut self, sds: &mut MetaDomain) {
        while let Ok(tx) = self.connects.try_recv() {
            match self.sender.send(Body::TenantConnected) {
                Ok(id) => self.waiting.push((id, tx)),
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            }
        }
        let Some(ctl) = sds.domains().iter().find(|d| d.name == DOMAIN).and_then(|d| d.control_ref()) else {
            return;
        };
        while let Some(ev) = ctl.recv(Duration::ZERO) {
            match ev {
                ControlEvent::Ack { request_id } => {
                    if let Some(i) = self.waiting.iter().position(|(id, _)| *id == request_id) {
                        let _ = self.waiting.remove(i).1.send(Ok(()));
                    }
                }
                ControlEvent::QuoteRequest { request_id, qualifying_data } => {
                    let t = Instant::now();
                    let reply = self.evidence(&qualifying_data);
                    let sent = match &reply {
                        Ok(bytes) => ctl.reply(request_id, Body::QuoteEvidence { evidence: bytes }),
                        Err(e) => {
                            let message = format!("{e:#}");
                            ctl.reply(request_id, Body::Error { code: ssc_abi::ErrorCode::Internal, message: &message })
                        }
                    };
                    match (reply, sent) {
                        (Ok(_), Ok(())) => {
                            self.quotes += 1;
                            self.quote_work += t.elapsed();
                            eprintln!("ssc up: udom0: quote {} served ({} ms)", self.quotes, t.elapsed().as_millis());
                        }
                        (Err(e), _) | (_, Err(e)) => eprintln!("ssc up: udom0: quote failed: {e:#}"),
                    }
                }
                ControlEvent::Grant { request_id, sd, client, permission } => {
                    let asked = GrantRequest { sd, client, permission };
                    let verdict = match self.launched {
                        true => Err("the clients are running: grants are fixed at launch".to_string()),
                        false => self.authority.check(DOMAIN, &asked).map_err(|e| e.to_string()),
                    };
                    let sent = match verdict {
                        Ok(g) => {
                            eprintln!("ssc up: udom0: granted `{}` {} over `{}`", g.sd, g.permission, g.client);
                            if !self.granted.has(&g.sd, &g.client, &g.permission) {
                                self.granted.0.push(g);
                            }
                            ctl.reply(request_id, Body::Ack)
                        }
                        Err(message) => {
                            eprintln!("ssc up: udom0: grant refused: {message}");
                            let code = ssc_abi::ErrorCode::Denied;
                            ctl.reply(request_id, Body::Error { code, message: &message })
                        }
                    };
                    if let Err(e) = sent {
                        eprintln!("ssc up: udom0: {e:#}");
                    }
                }
                ControlEvent::LaunchClients { request_id } => {
                    let unkeyed: Vec<&String> = self
                        .keyed_sds
                        .iter()
                        .filter(|n| {
                            let d = sds.domains().iter().find(|d| &&d.name == n);
                            d.and_then(|d| d.control_ref()).and_then(|c| c.keyed_by()).is_none()
                        })
                        .collect();
                    let verdict = match (self.launched, unkeyed.is_empty()) {
                        (true, _) => Err("the clients are already running".to_string()),
                        (false, false) => {
                            Err(format!("not launched: {unkeyed:?} have no key yet (provision through Udom0 first)"))
                        }
                        (false, true) => Ok(()),
                    };
                    let sent = match verdict {
                        Ok(()) => {
                            self.launched = true;
                            ctl.reply(request_id, Body::Ack)
                        }
                        Err(message) => {
                            ctl.reply(request_id, Body::Error { code: ssc_abi::ErrorCode::Denied, message: &message })
                        }
                    };
                    if let Err(e) = sent {
                        eprintln!("ssc up: udom0: {e:#}");
                    }
                }
                ControlEvent::Broken(why) => {
                    eprintln!("ssc up: udom0: control link broken: {why}");
                    return;
                }
                _ => {}
            }
        }
    }

    /// Serves Udom0 (quotes, grants) and `ssc attest`'s relay question
    /// until Udom0 asks to launch the clients; returns the grants given.
    /// Gives up after `$SSC_UDOM0_WAIT` seconds (default 900).
    pub fn wait_for_launch(
        &mut self,
        plan: &crate::chain::Plan,
        sds: &mut MetaDomain,
        mut commands: Option<&mut crate::chain_checkpoint::CommandSocket>,
        provider: &mut crate::provider::Socket,
    ) -> Result<Granted> {
        let limit = std::env::var("SSC_UDOM0_WAIT").ok().and_then(|s| s.parse().ok()).unwrap_or(900u64);
        eprintln!(
            "ssc up: udom0: waiting for the tenant to attest, provision and launch: \
             `ssc attest {} --host-profile FILE --provision`",
            plan.path.display()
        );
        let start = Instant::now();
        let mut keyed = vec![];
        while !self.launched {
            self.tick(sds);
            for d in sds.domains() {
                if let Some(by) = d.control_ref().and_then(|c| c.keyed_by())
                    && !keyed.contains(&d.name)
                {
                    eprintln!("ssc up: {}: keyed by {by} (the builder saw no key)", d.name);
                    keyed.push(d.name.clone());
                }
            }
            if let Some(c) = commands.as_mut() {
                let relay = self.relay;
                c.poll(|cmd, _| match cmd {
                    "udom0 relay" => Ok(relay.to_string()),
                    "monitor" => bail!("this chain has no [introspect] section"),
                    other => bail!("`{other}`: the clients have not launched yet (waiting for the tenant)"),
                });
            }
            if let Some(verb) = provider.poll(sds.domains_mut().iter_mut(), true) {
                bail!("the provider ended this meta-domain before its clients launched ({verb:?})");
            }
            if crate::interrupted() {
                bail!("interrupted while waiting for the tenant to launch the clients");
            }
            for d in sds.domains_mut() {
                if !d.running() {
                    bail!("{} stopped while waiting for the tenant: {:?}", d.name, d.log().last());
                }
            }
            if start.elapsed() > Duration::from_secs(limit) {
                bail!(
                    "the tenant did not launch the clients within {limit} s ($SSC_UDOM0_WAIT): run \
                     `ssc attest {} --host-profile FILE --provision` while `ssc up` waits",
                    plan.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("ssc up: udom0: the tenant launched the clients with {} grant(s)", self.granted.0.len());
        Ok(self.granted.clone())
    }

    fn evidence(&mut self, qualifying_data: &[u8]) -> Result<Vec<u8>> {
        if qualifying_data.len() != 32 {
            bail!("qualifying data must be 32 bytes (a SHA-256), got {}", qualifying_data.len());
        }
        let mut v = self.vtpm.lock().unwrap();
        let ev = crate::vtpm::evidence(&mut v, &mut self.host, qualifying_data)?;
        Ok(postcard::to_allocvec(&ev)?)
    }
}

// ---------------------------------------------------------------- tenant

/// The provider's published host profile, as a file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProfileFile {
    /// `TPMT_PUBLIC` of the host TPM's attestation key, hex.
    pub ak_public: String,
    pub pcrs: Vec<ProfilePcr>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProfilePcr {
    pub index: u8,
    pub sha256: String,
    /// What the builder measures into it.
    pub holds: String,
}

impl ProfileFile {
    pub fn read(path: &Path) -> Result<HostProfile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading host profile {}", path.display()))?;
        let f: ProfileFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a host profile (`ssc provider profile` writes one)", path.display()))?;
        let mut pcrs = vec![];
        for p in f.pcrs {
            pcrs.push(PcrValue { bank: ALG_SHA256, index: p.index, value: catalog::unhex(&p.sha256)? });
        }
        Ok(HostProfile { ak_public: catalog::unhex(&f.ak_public)?, pcrs })
    }
}

/// `ssc provider profile`: this host's profile.
pub fn provider_profile(trust: &[PathBuf]) -> Result<ProfileFile> {
    let trusted = catalog::load_trusted(trust)?;
    let scratch = crate::builder::RunDir::create()?;
    let (p, what) = crate::vtpm::host_profile(&crate::vtpm::host_state_dir(), scratch.path(), &trusted)?;
    Ok(ProfileFile {
        ak_public: catalog::hex(&p.ak_public),
        pcrs: p
            .pcrs
            .iter()
            .zip(what)
            .map(|(v, (_, holds))| ProfilePcr { index: v.index, sha256: catalog::hex(&v.value), holds })
            .collect(),
    })
}

/// The tenant's TLS session to Udom0.
pub struct TenantSession {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    key: Arc<udom0::tls::RawKeyVerifier>,
    inbox: Vec<u8>,
}

impl TenantSession {
    pub fn connect(addr: SocketAddr) -> Result<TenantSession> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to the builder's relay {addr}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
        let key = Arc::new(udom0::tls::RawKeyVerifier::default());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(key.clone())
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(Arc::new(config), rustls::pki_types::ServerName::try_from("udom0")?)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).context("TLS handshake with Udom0 (through the relay)")?;
        }
        Ok(TenantSession { tls, key, inbox: vec![] })
    }

    pub fn send(&mut self, msg: &TenantMsg) -> Result<()> {
        self.tls.write_all(&encode_frame(msg)?)?;
        self.tls.flush()?;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Udom0Msg> {
        let mut buf = [0u8; 16384];
        loop {
            if let Some(frame) = take_frame(&mut self.inbox).map_err(|e| anyhow!("{e}"))? {
                return postcard::from_bytes(&frame).context("Udom0's reply is malformed");
            }
            let n = self.tls.read(&mut buf).context("reading from Udom0")?;
            if n == 0 {
                bail!("Udom0 closed the session");
            }
            self.inbox.extend_from_slice(&buf[..n]);
        }
    }

    /// This session's exporter value.
    pub fn exporter(&self) -> Result<[u8; 32]> {
        Ok(self.tls.conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)?)
    }

    /// Udom0's key as the handshake presented it.
    pub fn udom0_spki(&self) -> Vec<u8> {
        self.key.key().unwrap_or_default()
    }
}

/// What `ssc attest` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub verified: bool,
    pub relay: String,
    pub udom0_key_sha256: String,
    pub host: Vec<ReportPcr>,
    pub launches: Vec<ReportLaunch>,
    pub error: Option<String>,
    /// With `--provision`: what the tenant sent after verifying.
    pub provisioned: Option<Provisioned>,
    pub timings_ms: Timings,
}

/// What `ssc attest --provision` handed Udom0.
#[derive(Debug, Default, Serialize)]
pub struct Provisioned {
    /// `domain: purpose` of each key an SD took from Udom0.
    pub keys: Vec<String>,
    /// `sd permission client` of each grant the builder gave.
    pub grants: Vec<String>,
    pub launched: bool,
}

#[derive(Debug, Serialize)]
pub struct ReportPcr {
    pub index: u8,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct ReportLaunch {
    pub domain: String,
    pub role: String,
    pub image: String,
    pub version: String,
    pub part: String,
    pub sha384: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Timings {
    pub tls_handshake: f64,
    pub quote: f64,
    pub verification: f64,
    /// Keys to the SDs through Udom0, then grants and the launch request.
    pub provisioning: f64,
}

/// The launches the tenant's chain implies, from its plan: Udom0, every
/// SD (the memory SDs too: an attested meta-domain starts them before the
/// tenant attests), every client's kernel, initramfs and command line.
pub fn expected_launches(plan: &crate::chain::Plan, client_initrd: &Path) -> Result<Vec<ExpectedLaunch>> {
    let u =
        plan.udom0.as_ref().ok_or_else(|| anyhow!("{}: no [udom0] section: nothing to attest", plan.path.display()))?;
    let mut out = vec![ExpectedLaunch {
        launch: launch_of(DOMAIN, "udom0", &u.image.manifest.image),
        sha384: sha384_file(&u.image.path)?,
    }];
    for img in plan.service_images() {
        out.push(ExpectedLaunch { launch: launch_of("", "sd", &img.manifest.image), sha384: sha384_file(&img.path)? });
    }
    for c in 0..plan.clients {
        for (launch, bytes) in client_launches(&format!("client{c}"), &plan.kernel, client_initrd, &plan.append)? {
            out.push(ExpectedLaunch { launch, sha384: sha384_bytes(&bytes) });
        }
    }
    Ok(out)
}

/// `ssc attest`: attests the chain `ssc up` runs; `Ok(report)` whether or
/// not it verified (the report says), `Err` when it could not even ask.
/// With `provision`, and only once the evidence verified, it then sends
/// Udom0 the volume keys (read here, on the tenant's side), the chain's
/// grants and the request to launch the clients.
pub fn attest(chain: &Path, host_profile: &Path, job: Option<&Path>, provision: bool) -> Result<Report> {
    let plan = crate::chain::plan(chain)?;
    let profile = ProfileFile::read(host_profile)?;
    let scratch = crate::builder::RunDir::create()?;
    let job = crate::chain::job_initrd(&plan, job, scratch.path())?;
    let initrd = crate::chain::client_initrd(&plan, job.as_deref(), scratch.path())?;
    let expected = expected_launches(&plan, &initrd)?;
    // The secrets are read before anything goes out, so a missing key
    // file fails here, not half-way through provisioning.
    let keys = match provision {
        true => provision_keys(&plan)?,
        false => vec![],
    };
    let relay: SocketAddr = crate::chain_checkpoint::request(chain, "udom0 relay", &mut |_, _| {})?
        .parse()
        .map_err(|e| anyhow!("`ssc up` gave no relay address: {e}"))?;
    let t = Instant::now();
    let mut s = TenantSession::connect(relay)?;
    let tls_handshake = t.elapsed().as_secs_f64() * 1e3;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| anyhow!("no randomness"))?;
    let t = Instant::now();
    s.send(&TenantMsg::Attest { nonce })?;
    let (binding, evidence) = match s.recv()? {
        Udom0Msg::Evidence { binding, evidence } => (binding, evidence),
        Udom0Msg::Error { message } => bail!("Udom0 could not attest: {message}"),
        other => bail!("Udom0 answered {other:?} to an attestation request"),
    };
    let quote = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let spki = s.udom0_spki();
    let ex = Expectations { nonce, exporter: s.exporter()?, udom0_spki: &spki, host: &profile, launches: &expected };
    let result = udom0::verify::verify(&evidence, &binding, &ex);
    let verification = t.elapsed().as_secs_f64() * 1e3;
    let verified = result.is_ok();
    let mut timings = Timings { tls_handshake, quote, verification, provisioning: 0.0 };
    let mut r = report(relay, &spki, &evidence, result, Timings::default());
    if provision && verified {
        let t = Instant::now();
        r.provisioned = Some(provision_and_launch(&mut s, keys, crate::grants::policy(&plan))?);
        timings.provisioning = t.elapsed().as_secs_f64() * 1e3;
    }
    r.timings_ms = timings;
    Ok(r)
}

/// The volume key of each disk's SD, read from the tenant's files.
pub fn provision_keys(plan: &crate::chain::Plan) -> Result<Vec<ProvisionKey>> {
    let mut keys = vec![];
    for (i, d) in plan.disks.iter().enumerate() {
        let i = i.to_string();
        let secret = d.secret(&i).with_context(|| format!("the tenant's secret of disk {i}"))?;
        keys.push(ProvisionKey {
            domain: d.sd_name(&i, 0),
            purpose: "volume".into(),
            key: secret.key,
            volume: Some(secret.params),
        });
    }
    Ok(keys)
}

/// After a verified attestation: keys, grants, launch, each answered by
/// Udom0 before the next goes; the first refusal stops it, named.
pub fn provision_and_launch(
    s: &mut TenantSession,
    keys: Vec<ProvisionKey>,
    grants: Vec<GrantRequest>,
) -> Result<Provisioned> {
    let mut out = Provisioned {
        keys: keys.iter().map(|k| format!("{}: {}", k.domain, k.purpose)).collect(),
        grants: grants.iter().map(|g| format!("{} {} {}", g.sd, g.permission, g.client)).collect(),
        launched: false,
    };
    s.send(&TenantMsg::Provision { keys })?;
    match s.recv()? {
        Udom0Msg::Provisioned { .. } => {}
        Udom0Msg::Error { message } => bail!("provisioning through Udom0 failed: {message}"),
        other => bail!("Udom0 answered {other:?} to the keys"),
    }
    s.send(&TenantMsg::Grant { grants })?;
    match s.recv()? {
        Udom0Msg::Granted { .. } => {}
        Udom0Msg::Error { message } => bail!("grants refused: {message}"),
        other => bail!("Udom0 answered {other:?} to the grants"),
    }
    s.send(&TenantMsg::Launch)?;
    match s.recv()? {
        Udom0Msg::Launched => out.launched = true,
        Udom0Msg::Error { message } => bail!("launch refused: {message}"),
        other => bail!("Udom0 answered {other:?} to the launch"),
    }
    Ok(out)
}

fn report(
    relay: SocketAddr,
    spki: &[u8],
    evidence: &ssc_abi::attest::Evidence,
    result: std::result::Result<Verified, udom0::verify::AttestError>,
    timings_ms: Timings,
) -> Report {
    let host =
        evidence.host.pcrs.iter().map(|p| ReportPcr { index: p.index, sha256: catalog::hex(&p.value) }).collect();
    let (verified, launches, error) = match result {
        Ok(v) => {
            let launches = v
                .launches
                .iter()
                .map(|(l, d)| ReportLaunch {
                    domain: l.domain.clone(),
                    role: l.role.clone(),
                    image: l.image.clone(),
                    version: l.version.clone(),
                    part: l.part.clone(),
                    sha384: catalog::hex(d),
                })
                .collect();
            (true, launches, None)
        }
        Err(e) => (false, vec![], Some(e.to_string())),
    };
    Report {
        verified,
        relay: relay.to_string(),
        udom0_key_sha256: catalog::hex(ring::digest::digest(&ring::digest::SHA256, spki).as_ref()),
        host,
        launches,
        error,
        provisioned: None,
        timings_ms,
    }
}

/// The report in plain words.
pub fn print_report(r: &Report) {
    match &r.error {
        None => println!("attestation VERIFIED (Udom0 via relay {})", r.relay),
        Some(e) => println!("attestation FAILED: {e}"),
    }
    println!(
        "  session: TLS 1.3 to Udom0 key sha256:{}…, bound to this session's exporter and a fresh nonce",
        &r.udom0_key_sha256[..16]
    );
    println!("  host: TPM quote by the provider's attestation key; PCRs equal the published profile:");
    for p in &r.host {
        println!("    PCR {:>2} = {}…", p.index, &p.sha256[..16]);
    }
    if r.verified {
        println!("  vTPM: quote over PCR 9 (sha256+sha384) vouched for by the host TPM; event log replays to it:");
        for l in &r.launches {
            println!(
                "    {:<7} {:<14} {:<10} {:<8} sha384:{}… ({})",
                l.role,
                l.image,
                l.version,
                l.part,
                &l.sha384[..16],
                l.domain
            );
        }
    }
    if let Some(p) = &r.provisioned {
        println!("  provisioned through Udom0 (the builder saw no key):");
        for k in &p.keys {
            println!("    key    {k}");
        }
        for g in &p.grants {
            println!("    grant  {g}");
        }
        if p.launched {
            println!("  launched: the builder is starting the client VMs");
        }
    }
    println!(
        "  took: TLS handshake {:.1} ms, quote {:.1} ms, verification {:.1} ms, provisioning {:.1} ms",
        r.timings_ms.tls_handshake, r.timings_ms.quote, r.timings_ms.verification, r.timings_ms.provisioning
    );
}
