//! TPMs of the builder: one `swtpm` (TPM 2.0) per meta-domain, the
//! **vTPM**, into which every launch is measured; and a second `swtpm`
//! standing in for the host's hardware TPM, which holds the host's own
//! measurements (builder, QEMU, the catalog key it trusts) and vouches for
//! each vTPM's attestation key in its quotes. All TPM commands go through
//! `tss-esapi` (the system's `libtss2`, TCTI `swtpm`); swtpm listens on
//! unix sockets of mode 0600 only, reached through [`crate::tpm_gate`].
//!
//! * **Provisioning**: `swtpm_setup` manufactures each TPM (SHA-256 and
//!   SHA-384 PCR banks, an EK with its certificate from swtpm's local CA,
//!   whose CA keys live in the host TPM's state directory).
//! * **Attestation keys**: a primary ECC P-256 restricted signing key in
//!   the endorsement hierarchy. A primary key is derived from the
//!   hierarchy's seed, so the host TPM's AK is the same at every boot: it is
//!   what the provider's published profile names.
//! * **Host boot**: each builder run starts the host TPM from a copy of its
//!   persistent state (so builders can run side by side, as tests do), which
//!   resets its PCRs, and extends [`HOST_PCRS`] with what it runs; see
//!   [`host_measurements`].
//!
//! swtpm runs under `setpriv --pdeathsig KILL`, so it dies with the builder.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use ssc_abi::attest::{ALG_SHA256, ALG_SHA384, HOST_PCRS, LAUNCH_PCR, PcrValue, Quote};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::{KeyHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, PcrSelectionListBuilder,
    PcrSlot, PublicBuilder, PublicEccParametersBuilder, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::{NetworkTPMConfig, TctiNameConf};
use tss_esapi::traits::Marshall;
use udom0::eventlog::{EventLogWriter, Launch};

use crate::tpm_gate::Gate;

/// Where the host TPM's persistent state lives: `$SSC_HOST_TPM_DIR`, else
/// `/var/lib/ssc/host-tpm` for root, else `~/.local/state/ssc/host-tpm`.
pub fn host_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SSC_HOST_TPM_DIR") {
        return PathBuf::from(d);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/ssc/host-tpm");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".local/state/ssc/host-tpm")
}

fn need_tool(tool: &str, package: &str) -> Result<()> {
    if which(tool).is_none() {
        bail!("`{tool}` is not installed; attested launch needs it (`apt-get install {package}`, or `make deps`)");
    }
    Ok(())
}

/// Manufactures a TPM's state in `state` with swtpm_setup: PCR banks
/// SHA-256 and SHA-384, an ECC EK and its certificate from the local CA
/// whose keys live in `ca_dir`.
pub fn manufacture(state: &Path, ca_dir: &Path) -> Result<()> {
    need_tool("swtpm_setup", "swtpm-tools")?;
    private_dir(state)?;
    private_dir(ca_dir)?;
    let ca = ca_dir.display();
    let localca = ca_dir.join("swtpm-localca.conf");
    std::fs::write(
        &localca,
        format!(
            "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
        ),
    )?;
    let options = ca_dir.join("swtpm-localca.options");
    std::fs::write(&options, "--platform-manufacturer SSC\n--platform-version 2.1\n--platform-model ssc-vtpm\n")?;
    let setup = ca_dir.join("swtpm_setup.conf");
    std::fs::write(
        &setup,
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256,sha384\n",
            localca.display(),
            options.display()
        ),
    )?;
    let out = Command::new("swtpm_setup")
        .args(["--tpm2", "--ecc", "--create-ek-cert", "--pcr-banks", "sha256,sha384", "--overwrite", "--config"])
        .arg(&setup)
        .arg("--tpmstate")
        .arg(state)
        .output()
        .context("running swtpm_setup")?;
    if !out.status.success() {
        bail!(
            "swtpm_setup failed for {}: {}{}",
            state.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A running swtpm, listening on two unix sockets of mode 0600 in its
/// state directory and reached through a [`Gate`] that serves only this
/// process.
pub struct Swtpm {
    child: Child,
    gate: Gate,
    log: PathBuf,
}

impl Swtpm {
    /// Starts swtpm on `state` (already manufactured). Its TPM and control
    /// sockets are `state/swtpm.sock` and `state/swtpm-ctrl.sock`, mode
    /// 0600; `state` itself is made 0700. No TCP port of swtpm's exists.
    ///
    /// swtpm dies with the *thread* that started it (`setpriv --pdeathsig`
    /// follows the parent thread): start TPMs from a thread that outlives
    /// them, not from a short-lived worker.
    pub fn start(state: &Path) -> Result<Swtpm> {
        need_tool("swtpm", "swtpm")?;
        private_dir(state)?;
        let log = state.join("swtpm.log");
        let (server, ctrl) = (state.join("swtpm.sock"), state.join("swtpm-ctrl.sock"));
        for s in [&server, &ctrl] {
            match std::fs::remove_file(s) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing a stale {}", s.display()));
                }
                _ => {}
            }
        }
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "swtpm", "socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={},mode=0600", server.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={},mode=0600", ctrl.display()))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting swtpm")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(server.exists() && ctrl.exists()) {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("could not start swtpm on {}: swtpm exited ({status}): {}", state.display(), err.trim());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("swtpm on {} did not listen within 10 s (log: {})", state.display(), log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let gate = match Gate::open(&server, &ctrl) {
            Ok(g) => g,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Swtpm { child, gate, log })
    }

    /// A tss-esapi context on this TPM.
    pub fn context(&self) -> Result<tss_esapi::Context> {
        let port = self.gate.port();
        let conf = NetworkTPMConfig::from_str(&format!("host=127.0.0.1,port={port}"))
            .map_err(|e| anyhow!("swtpm TCTI configuration: {e}"))?;
        tss_esapi::Context::new(TctiNameConf::Swtpm(conf)).with_context(|| {
            format!("connecting to swtpm through the gate on port {port} (log: {})", self.log.display())
        })
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `dir` if needed and makes it 0700: a TPM's state and sockets
/// are the builder's alone.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// A TPM with its attestation key loaded.
pub struct Tpm {
    // Dropped before the process: the context closes its connection first.
    ctx: tss_esapi::Context,
    ak: KeyHandle,
    ak_public: Vec<u8>,
    swtpm: Swtpm,
}

impl Tpm {
    /// Opens the TPM and creates its attestation key.
    pub fn open(swtpm: Swtpm) -> Result<Tpm> {
        let mut ctx = swtpm.context()?;
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_restricted(true)
            .with_sign_encrypt(true)
            .build()?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_restricted(true)
                    .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()?;
        let ak = ctx
            .execute_with_nullauth_session(|c| c.create_primary(Hierarchy::Endorsement, public, None, None, None, None))
            .context("creating the attestation key")?;
        let (public, _, _) = ctx.read_public(ak.key_handle)?;
        let ak_public = public.marshall()?;
        Ok(Tpm { ctx, ak: ak.key_handle, ak_public, swtpm })
    }

    /// `TPMT_PUBLIC` of the attestation key.
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// Extends `pcr` with one digest per bank.
    pub fn extend(&mut self, pcr: u8, digests: &[(u16, Vec<u8>)]) -> Result<()> {
        let mut values = DigestValues::new();
        for (bank, d) in digests {
            values.set(hashing(*bank)?, Digest::try_from(d.clone())?);
        }
        let handle = pcr_handle(pcr)?;
        self.ctx
            .execute_with_nullauth_session(|c| c.pcr_extend(handle, values))
            .with_context(|| format!("extending PCR {pcr}"))
    }

    /// Quotes `pcrs` of each bank with `qualifying_data`.
    pub fn quote(&mut self, qualifying_data: &[u8], selection: &[(u16, &[u8])]) -> Result<Quote> {
        let mut b = PcrSelectionListBuilder::new();
        for (bank, pcrs) in selection {
            let slots: Vec<PcrSlot> = pcrs.iter().map(|&p| pcr_slot(p)).collect::<Result<_>>()?;
            b = b.with_selection(hashing(*bank)?, &slots);
        }
        let list = b.build()?;
        let qd = Data::try_from(qualifying_data.to_vec())?;
        let ak = self.ak;
        let (attest, signature) = self
            .ctx
            .execute_with_nullauth_session(|c| c.quote(ak, qd, SignatureScheme::Null, list.clone()))
            .context("TPM2_Quote")?;
        let attest = attest.marshall()?;
        // The values in the order the TPM digested them (its selection
        // order, which need not be ours).
        let info = udom0::tpm::QuoteInfo::parse(&attest).map_err(|e| anyhow!("the TPM's own quote: {e}"))?;
        let mut values = vec![];
        for s in &info.selection {
            for &p in &s.pcrs {
                values.push(PcrValue { bank: s.bank, index: p, value: self.read_pcr(s.bank, p)? });
            }
        }
        Ok(Quote { attest, signature: signature.marshall()?, ak_public: self.ak_public.clone(), pcrs: values })
    }

    /// One PCR's value.
    pub fn read_pcr(&mut self, bank: u16, pcr: u8) -> Result<Vec<u8>> {
        let list = PcrSelectionListBuilder::new().with_selection(hashing(bank)?, &[pcr_slot(pcr)?]).build()?;
        let (_, _, digests) = self.ctx.pcr_read(list)?;
        let d = digests.value().first().ok_or_else(|| anyhow!("the TPM returned no value for PCR {pcr}"))?;
        Ok(d.to_vec())
    }

    /// The swtpm log, for error messages.
    pub fn log(&self) -> &Path {
        &self.swtpm.log
    }
}

fn hashing(bank: u16) -> Result<HashingAlgorithm> {
    match bank {
        ALG_SHA256 => Ok(HashingAlgorithm::Sha256),
        ALG_SHA384 => Ok(HashingAlgorithm::Sha384),
        b => bail!("PCR bank {b:#06x} is not used here"),
    }
}

fn pcr_handle(pcr: u8) -> Result<PcrHandle> {
    Ok(match pcr {
        8 => PcrHandle::Pcr8,
        9 => PcrHandle::Pcr9,
        10 => PcrHandle::Pcr10,
        p => bail!("PCR {p} is not one the builder extends"),
    })
}

fn pcr_slot(pcr: u8) -> Result<PcrSlot> {
    PcrSlot::try_from(1u32 << pcr).map_err(|e| anyhow!("PCR {pcr}: {e}"))
}

/// What the host TPM's [`HOST_PCRS`] hold: for each, a description and
/// the SHA-256 of the bytes measured into it.
pub fn host_measurements(trusted_keys: &[String]) -> Result<Vec<(u8, String, [u8; 32])>> {
    let exe = std::env::current_exe().context("finding the builder's own binary")?;
    let qemu = which(crate::qemu::QEMU).ok_or_else(|| anyhow!("{} is not installed", crate::qemu::QEMU))?;
    let mut keys = trusted_keys.to_vec();
    keys.sort();
    let keys = keys.join("\n");
    Ok(vec![
        (HOST_PCRS[0], format!("builder {}", exe.display()), sha256_file(&exe)?),
        (HOST_PCRS[1], format!("QEMU {}", qemu.display()), sha256_file(&qemu)?),
        (HOST_PCRS[2], "catalog publisher keys the builder trusts".into(), sha256(keys.as_bytes())),
    ])
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut o = [0u8; 32];
    o.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    o
}

fn sha256_file(p: &Path) -> Result<[u8; 32]> {
    let bytes = std::fs::read(p).with_context(|| format!("measuring {}", p.display()))?;
    Ok(sha256(&bytes))
}

/// A PCR's value after extending these digests into zeros.
pub fn replay(digests: &[[u8; 32]]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for d in digests {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        c.update(&v);
        c.update(d);
        v.copy_from_slice(c.finish().as_ref());
    }
    v
}

/// The host TPM of this builder run.
pub struct HostTpm {
    pub tpm: Tpm,
}

impl HostTpm {
    /// Boots the host TPM in `run_dir`: manufactures the persistent state
    /// on first use (under a lock), copies it, starts swtpm, and extends
    /// [`HOST_PCRS`] with [`host_measurements`].
    pub fn boot(base: &Path, run_dir: &Path, trusted_keys: &[String]) -> Result<HostTpm> {
        let tpm = Self::start(base, run_dir)?;
        let mut host = HostTpm { tpm };
        for (pcr, _, d) in host_measurements(trusted_keys)? {
            host.tpm.extend(pcr, &[(ALG_SHA256, d.to_vec()), (ALG_SHA384, sha384_of_sha256(&d))])?;
        }
        Ok(host)
    }

    /// Starts a copy of the host TPM's persistent state, measuring nothing.
    /// `base` is the persistent state directory ([`host_state_dir`]).
    pub fn start(base: &Path, run_dir: &Path) -> Result<Tpm> {
        let state = base.join("tpm");
        private_dir(base).context("the host TPM directory")?;
        let lock = std::fs::File::create(base.join(".lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
        if !state.join("tpm2-00.permall").is_file() {
            eprintln!("ssc: manufacturing the host TPM in {} (once)", state.display());
            manufacture(&state, &base.join("localca"))?;
        }
        let copy = run_dir.join("host-tpm");
        private_dir(&copy)?;
        std::fs::copy(state.join("tpm2-00.permall"), copy.join("tpm2-00.permall"))
            .with_context(|| format!("copying the host TPM state from {}", state.display()))?;
        drop(lock);
        Tpm::open(Swtpm::start(&copy)?)
    }

    /// Quotes [`HOST_PCRS`] (SHA-256 bank).
    pub fn quote(&mut self, qualifying_data: &[u8]) -> Result<Quote> {
        self.tpm.quote(qualifying_data, &[(ALG_SHA256, &HOST_PCRS)])
    }
}

/// The SHA-384 bank gets the SHA-384 of the SHA-256 measurement (the host
/// profile fixes the SHA-256 bank only).
fn sha384_of_sha256(d: &[u8; 32]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA384, d).as_ref().to_vec()
}

/// A meta-domain's vTPM and the event log of its launches.
pub struct Vtpm {
    pub tpm: Tpm,
    log: EventLogWriter,
    launches: Vec<Launch>,
}

impl Vtpm {
    /// Manufactures a fresh vTPM in `dir` (EK certificate from the local CA
    /// in the host TPM's state directory `base`) and starts it.
    pub fn create(base: &Path, dir: &Path) -> Result<Vtpm> {
        manufacture(dir, &base.join("localca"))?;
        Ok(Vtpm { tpm: Tpm::open(Swtpm::start(dir)?)?, log: EventLogWriter::new(), launches: vec![] })
    }

    /// Measures a launch: appends its event and extends [`LAUNCH_PCR`].
    pub fn measure(&mut self, launch: Launch, bytes: &[u8]) -> Result<()> {
        let digests = launch.record(&mut self.log, bytes);
        self.tpm.extend(LAUNCH_PCR, &digests)?;
        self.launches.push(launch);
        Ok(())
    }

    /// Measures a file.
    pub fn measure_file(&mut self, launch: Launch, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("measuring {}", path.display()))?;
        self.measure(launch, &bytes)
    }

    pub fn event_log(&self) -> &[u8] {
        self.log.bytes()
    }

    pub fn launches(&self) -> &[Launch] {
        &self.launches
    }

    /// Quotes [`LAUNCH_PCR`] in both banks.
    pub fn quote(&mut self, qualifying_data: &[u8]) -> Result<Quote> {
        self.tpm.quote(qualifying_data, &[(ALG_SHA256, &[LAUNCH_PCR]), (ALG_SHA384, &[LAUNCH_PCR])])
    }
}

/// The provider's profile of this host: the host TPM's attestation key
/// and the [`HOST_PCRS`] values a correct boot of this builder gives.
pub fn host_profile(
    base: &Path,
    scratch: &Path,
    trusted_keys: &[String],
) -> Result<(udom0::verify::HostProfile, Vec<(u8, String)>)> {
    let tpm = HostTpm::start(base, scratch)?;
    let mut pcrs = vec![];
    let mut what = vec![];
    for (pcr, desc, d) in host_measurements(trusted_keys)? {
        pcrs.push(PcrValue { bank: ALG_SHA256, index: pcr, value: replay(&[d]).to_vec() });
        what.push((pcr, desc));
    }
    Ok((udom0::verify::HostProfile { ak_public: tpm.ak_public().to_vec(), pcrs }, what))
}

/// The evidence for one quote request: the vTPM's quote, its event log and
/// the host's quote vouching for the vTPM's key.
pub fn evidence(vtpm: &mut Vtpm, host: &mut HostTpm, qualifying_data: &[u8]) -> Result<ssc_abi::attest::Evidence> {
    let v = vtpm.quote(qualifying_data)?;
    let hq = udom0::verify::host_qualifying_data(&v.ak_public, qualifying_data);
    let h = host.quote(&hq)?;
    Ok(ssc_abi::attest::Evidence { vtpm: v, event_log: vtpm.event_log().to_vec(), host: h })
}

#[cfg(test)]
mod tests;
