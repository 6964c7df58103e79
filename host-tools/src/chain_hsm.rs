//! DomC on a running chain: the `[hsm]` section of a chain file, the HSM
//! service domain beside the client, and what `ssc hsm` asks it through
//! `ssc up`.
//!
//! ```toml
//! [hsm]
//! pin_file = "hsm.pin"          # the client's user PIN (4-64 bytes, tenant secret)
//! # label = "DomC"              # the token label pkcs11-tool shows (no spaces)
//! # module = "target/debug/libssc_pkcs11.so"  # installed in the client (default: beside ssc)
//!
//! [[hsm.key]]                   # keys the tenant imports at start (any number)
//! file = "web.p8"               # PKCS#8 PEM or DER (EC P-256/P-384, Ed25519, RSA 2048-4096),
//!                               # or an AES-256 key: 64 hex digits
//! label = "web"
//! id = "01"                     # CKA_ID, hex
//! # usage = "sign,verify"       # sign, verify, encrypt, decrypt, wrap, unwrap (default: all)
//! # rate_per_sec = 100          # most operations per second (default: no limit)
//! ```
//!
//! DomC listens on its `hsm` link; the client's QEMU connects its
//! `ssc-hsm` port there, so the client sees `/dev/virtio-ports/ssc-hsm`
//! (or `/dev/vportNpM` without udev) and loads `libssc_pkcs11.so`, which
//! `ssc up` puts at `/usr/lib/ssc/libssc_pkcs11.so` in the client's
//! initramfs. Keys travel from the tenant to DomC over DomC's control link
//! only; the client never holds one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde::Deserialize;
use ssc_abi::Body;
use ssc_abi::hsm::{AdminOp, AdminReply, AuditEntry, KeyInfo, KeyMaterial, Usage};

use crate::builder::{ControlEvent, LinkSpec, MetaDomain};
use crate::catalog::VerifiedImage;
use crate::qemu::Accel;

/// The name of DomC's port in the client (`/dev/virtio-ports/ssc-hsm`).
pub const CLIENT_PORT: &str = "ssc-hsm";
/// Where `ssc up` installs the module in the client.
pub const CLIENT_MODULE: &str = "/usr/lib/ssc/libssc_pkcs11.so";

/// The chain file's `[hsm]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    pub pin_file: PathBuf,
    pub label: Option<String>,
    pub module: Option<PathBuf>,
    /// Where `ssc up` streams DomC's audit entries as they happen
    /// (default: beside the chain file, `CHAIN.hsm-audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// `block` (default): a full log of entries not yet streamed refuses
    /// operations; `drop-oldest`: drops them.
    pub audit_when_full: Option<String>,
    #[serde(default)]
    pub key: Vec<KeySection>,
}

/// One `[[hsm.key]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    pub file: PathBuf,
    pub label: String,
    pub id: Option<String>,
    pub usage: Option<String>,
    pub rate_per_sec: Option<u32>,
    /// The client may wrap (export sealed) this key; default false.
    #[serde(default)]
    pub extractable: bool,
}

/// A key to import, read and checked on the tenant side.
pub struct PlannedKey {
    pub label: String,
    pub id: Vec<u8>,
    pub usage: Usage,
    pub material: KeyMaterial,
    pub file: PathBuf,
}

/// A checked `[hsm]`.
pub struct HsmPlan {
    pub image: VerifiedImage,
    pub pin: Vec<u8>,
    pub label: String,
    pub module: PathBuf,
    pub keys: Vec<PlannedKey>,
    /// `audit_log`, resolved, if the chain file names one.
    pub audit_log: Option<PathBuf>,
    pub block_when_full: bool,
}

/// The PIN file: its first line, 4 to 64 bytes.
pub fn read_pin(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading PIN file {}", path.display()))?;
    let pin = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if !(4..=64).contains(&pin.len()) {
        bail!("PIN file {}: the PIN on its first line must be 4 to 64 bytes (it has {})", path.display(), pin.len());
    }
    Ok(pin.as_bytes().to_vec())
}

/// A key file as DomC takes it: PKCS#8 (PEM or DER) or 64 hex digits of
/// AES-256. Other encodings get a conversion command.
pub fn read_key_file(path: &Path) -> Result<KeyMaterial> {
    let bytes = std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let convert = format!("convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.p8`", path.display());
    if let Some(begin) = text.find("-----BEGIN ") {
        let rest = &text[begin + 11..];
        let label = rest.split("-----").next().unwrap_or("");
        match label {
            "PRIVATE KEY" => {}
            "ENCRYPTED PRIVATE KEY" => bail!("{} is an encrypted PKCS#8 key; {convert}", path.display()),
            "EC PRIVATE KEY" | "RSA PRIVATE KEY" => bail!("{} is a {label} (not PKCS#8); {convert}", path.display()),
            other => bail!("{} holds a `{other}`, not a private key", path.display()),
        }
        let body: String = rest
            .split_once("-----")
            .map(|(_, b)| b)
            .unwrap_or("")
            .split("-----END")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .with_context(|| format!("{}: the PEM body is not base64", path.display()))?;
        return Ok(KeyMaterial::Pkcs8(der));
    }
    let hex: String = text.split_whitespace().collect();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(KeyMaterial::Aes256(crate::catalog::unhex(&hex)?));
    }
    if bytes.first() == Some(&0x30) {
        return Ok(KeyMaterial::Pkcs8(bytes));
    }
    bail!(
        "{} is neither a PKCS#8 private key (PEM or DER) nor an AES-256 key (64 hex digits); \
         for other formats, {convert}",
        path.display()
    )
}

/// `01ab` → bytes.
fn parse_id(id: &str) -> Result<Vec<u8>> {
    crate::catalog::unhex(id).with_context(|| format!("id `{id}` is not hex (e.g. \"01\")"))
}

impl HsmPlan {
    /// Checks the section; `at` resolves paths against the chain file.
    pub fn check(s: HsmSection, image: VerifiedImage, at: impl Fn(&Path) -> PathBuf) -> Result<Self> {
        let pin = read_pin(&at(&s.pin_file))?;
        let label = s.label.unwrap_or_else(|| "DomC".into());
        if label.is_empty() || label.len() > 32 || !label.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("label `{label}`: 1 to 32 printable ASCII characters, no spaces");
        }
        let module = match s.module {
            Some(m) => at(&m),
            None => default_module()?,
        };
        if !module.is_file() {
            bail!("the PKCS#11 module {} is missing: build it with `make ssc`", module.display());
        }
        let block_when_full = match s.audit_when_full.as_deref() {
            None | Some("block") => true,
            Some("drop-oldest") => false,
            Some(other) => bail!("audit_when_full = `{other}`: `block` (the default) or `drop-oldest`"),
        };
        let audit_log = s.audit_log.map(|p| at(&p));
        let mut keys = vec![];
        for k in s.key {
            let file = at(&k.file);
            let material = read_key_file(&file)?;
            let usage = match &k.usage {
                Some(u) => {
                    Usage::parse(u, k.rate_per_sec.unwrap_or(0)).map_err(|e| anyhow!("key `{}`: {e}", k.label))?
                }
                None => Usage { rate_per_sec: k.rate_per_sec.unwrap_or(0), ..Usage::GENERAL },
            };
            let usage = Usage { extractable: k.extractable, ..usage };
            let id = parse_id(k.id.as_deref().unwrap_or(""))?;
            keys.push(PlannedKey { label: k.label, id, usage, material, file });
        }
        Ok(HsmPlan { image, pin, label, module, keys, audit_log, block_when_full })
    }
}

/// `libssc_pkcs11.so` beside the running `ssc` (cargo builds both into
/// the same target directory).
pub fn default_module() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the ssc binary")?;
    Ok(exe.with_file_name("libssc_pkcs11.so"))
}

/// DomC on a running chain.
pub struct Session {
    sd_name: String,
    stream: AuditStream,
}

/// DomC's audit entries, streamed into the tenant's file as they happen
/// (issue 19, item 3): one JSON line per entry, checked to link to the one
/// before, synced after each pull. Pulling acknowledges what DomC sent
/// before, so DomC may drop it; what it has not sent it keeps (and by
/// default refuses operations rather than drop).
struct AuditStream {
    path: PathBuf,
    file: std::fs::File,
    next: u64,
    head: [u8; 32],
    last: Instant,
    failed: bool,
    /// DomC refuses rather than drops: a gap would be a broken promise.
    block_when_full: bool,
}

/// How often `ssc up` pulls DomC's new audit entries.
const AUDIT_PULL: Duration = Duration::from_millis(250);
/// Pages one tick pulls at most, so a busy client cannot hold `ssc up`'s
/// loop (the rest comes at the next tick; DomC blocks, not drops). With
/// 256 entries a page, the stream keeps up with ~65 000 operations per
/// second; a client faster than that waits for it.
const PAGES_PER_TICK: usize = 64;

impl AuditStream {
    /// Opens the tenant's file for appending: each `ssc up` runs a new
    /// DomC, whose log starts again at entry 0, so a line `{"session":…}`
    /// starts each run's chain; earlier runs' entries stay.
    fn create(path: &Path, block_when_full: bool) -> Result<AuditStream> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .with_context(|| format!("opening the audit stream {}", path.display()))?;
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let line = serde_json::json!({"session": {"started_unix": started, "first_seq": 0}}).to_string() + "\n";
        file.write_all(line.as_bytes()).and_then(|()| file.sync_all())?;
        crate::durable::sync_parent(path)?;
        Ok(AuditStream {
            path: path.to_path_buf(),
            file,
            next: 0,
            head: [0; 32],
            last: Instant::now(),
            failed: false,
            block_when_full,
        })
    }

    /// Pulls DomC's entries past `next` (at most `pages` pages), writes and
    /// syncs them, then acknowledges them so DomC may drop its copies.
    /// Returns how many.
    fn pull(&mut self, sd_name: &str, sds: &mut MetaDomain, pages: usize) -> Result<u64> {
        use std::io::Write;
        let mut wrote = 0;
        for _ in 0..pages {
            let page = match admin(sd_name, sds, AdminOp::Audit { from: self.next, max: 256 })? {
                AdminReply::Audit(p) => p,
                other => bail!("DomC answered {other:?} to an audit request"),
            };
            let mut text = String::new();
            if page.oldest_kept > self.next {
                if self.block_when_full {
                    bail!(
                        "DomC dropped audit entries {}..{} that {} never received, although it was told to block",
                        self.next,
                        page.oldest_kept,
                        self.path.display()
                    );
                }
                // `drop-oldest`: say so in the stream itself.
                eprintln!(
                    "ssc up: hsm: audit entries {}..{} were dropped before they reached {}",
                    self.next,
                    page.oldest_kept,
                    self.path.display()
                );
                text.push_str(&serde_json::json!({"gap": {"from": self.next, "to": page.oldest_kept}}).to_string());
                text.push('\n');
                self.next = page.oldest_kept;
                self.head = page.entries.first().map_or(page.head, |e| e.prev);
            }
            if let Some(first) = page.entries.first()
                && (first.seq != self.next || first.prev != self.head)
            {
                bail!("DomC's audit entry {} does not follow entry {} it sent before", first.seq, self.next);
            }
            sd_hsm::audit::verify(&page.entries, None).map_err(|e| anyhow!("DomC's audit stream: {e}"))?;
            for e in &page.entries {
                text.push_str(&serde_json::to_string(e)?);
                text.push('\n');
            }
            self.file.write_all(text.as_bytes()).with_context(|| format!("writing {}", self.path.display()))?;
            if let Some(last) = page.entries.last() {
                self.next = last.seq + 1;
                self.head = last.hash;
            }
            wrote += page.entries.len() as u64;
            if page.entries.is_empty() || self.next >= page.next {
                break;
            }
        }
        if wrote > 0 {
            self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))?;
            match admin(sd_name, sds, AdminOp::AuditAck { next: self.next, head: self.head })? {
                AdminReply::Ok => {}
                other => bail!("DomC refused the acknowledgement: {}", describe_error(&other)),
            }
        }
        Ok(wrote)
    }
}

/// Starts DomC listening on its `hsm` link, sets the PIN and imports the
/// chain file's keys; returns the session and the socket the client's
/// `ssc-hsm` port connects to.
pub fn start_sd(
    plan: &HsmPlan,
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    scratch: &Path,
    audit_log: &Path,
) -> Result<(Session, PathBuf)> {
    let stream = AuditStream::create(audit_log, plan.block_when_full)?;
    let socket = scratch.join("domc.hsm");
    let mut spec = plan.image.spec("domc");
    spec.links.push(LinkSpec::listen("hsm", &socket));
    spec.append = format!("ssc.hsm.label={}", plan.label);
    sds.start(&spec, accel, echo, Duration::from_secs(60))?;
    let mut session = Session { sd_name: spec.name, stream };
    match session.admin(sds, AdminOp::SetPin { pin: plan.pin.clone() })? {
        AdminReply::Ok => {}
        other => bail!("DomC refused the PIN: {}", describe_error(&other)),
    }
    match session.admin(sds, AdminOp::AuditWhenFull { block: plan.block_when_full })? {
        AdminReply::Ok => {}
        other => bail!("DomC refused the audit policy: {}", describe_error(&other)),
    }
    for k in &plan.keys {
        let op =
            AdminOp::Import { label: k.label.clone(), id: k.id.clone(), usage: k.usage, material: k.material.clone() };
        match session.admin(sds, op)? {
            AdminReply::Key(info) => eprintln!("ssc up: hsm: imported {}", describe_key(&info)),
            other => bail!("DomC refused key {} ({}): {}", k.label, k.file.display(), describe_error(&other)),
        }
    }
    eprintln!(
        "ssc up: DomC (token `{}`) started; {} key(s) imported; the client reaches it on port ssc-hsm with {CLIENT_MODULE}; \
         audit entries stream to {}",
        plan.label,
        plan.keys.len(),
        audit_log.display()
    );
    session.pull_audit(sds);
    Ok((session, socket))
}

fn describe_error(r: &AdminReply) -> String {
    match r {
        AdminReply::Error(e) => e.to_string(),
        other => format!("unexpected reply {other:?}"),
    }
}

/// One line about a key.
pub fn describe_key(k: &KeyInfo) -> String {
    let id: String = k.id.iter().map(|b| format!("{b:02x}")).collect();
    let rate = match k.usage.rate_per_sec {
        0 => String::new(),
        n => format!(", at most {n}/s"),
    };
    format!(
        "#{} {} `{}` id {} ({}{}{})",
        k.handle,
        k.kind.name(),
        k.label,
        if id.is_empty() { "-" } else { &id },
        k.usage.names(),
        rate,
        if k.local { ", generated in DomC" } else { ", imported" }
    )
}

impl Session {
    /// Pulls DomC's new audit entries into the stream, at most once per
    /// [`AUDIT_PULL`]; call it from the chain's loop.
    pub fn tick(&mut self, sds: &mut MetaDomain) {
        if self.stream.last.elapsed() >= AUDIT_PULL {
            self.pull_pages(sds, PAGES_PER_TICK);
        }
    }

    /// Pulls everything now (as the chain stops, so the stream ends
    /// complete).
    pub fn pull_audit(&mut self, sds: &mut MetaDomain) {
        self.pull_pages(sds, usize::MAX);
    }

    fn pull_pages(&mut self, sds: &mut MetaDomain, pages: usize) {
        let stream = &mut self.stream;
        stream.last = Instant::now();
        match stream.pull(&self.sd_name, sds, pages) {
            Ok(_) => stream.failed = false,
            Err(e) if !stream.failed => {
                eprintln!("ssc up: hsm: streaming the audit log to {}: {e:#}", stream.path.display());
                stream.failed = true;
            }
            Err(_) => {}
        }
    }

    /// One admin request over DomC's control link.
    pub fn admin(&self, sds: &mut MetaDomain, op: AdminOp) -> Result<AdminReply> {
        admin(&self.sd_name, sds, op)
    }
}

/// One admin request over the control link of DomC `sd_name`.
fn admin(sd_name: &str, sds: &mut MetaDomain, op: AdminOp) -> Result<AdminReply> {
    let ctl = sds.domain(sd_name).and_then(|d| d.control_ref()).context("DomC is gone")?;
    let request = postcard::to_allocvec(&op)?;
    let id = ctl.send(Body::HsmAdmin { request: &request })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match ctl.recv(left) {
            Some(ControlEvent::HsmAdminReply { request_id, reply }) if request_id == id => {
                return ssc_abi::hsm::decode_payload(&reply).context("DomC sent a reply this ssc cannot decode");
            }
            Some(ControlEvent::Error { request_id, message, .. }) if request_id == id => bail!("DomC: {message}"),
            Some(ControlEvent::Broken(why)) => bail!("DomC's control link broke: {why}"),
            Some(_) => {}
            None => break,
        }
    }
    bail!("DomC did not answer within 60 s")
}

/// Serves `hsm admin BASE64` from the command socket: the reply, base64.
pub fn serve(cmd: &str, session: &Session, sds: &mut MetaDomain) -> Result<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let arg = cmd.strip_prefix("hsm admin ").context("unknown hsm command")?;
    let bytes = b64.decode(arg.trim()).context("hsm admin: not base64")?;
    let op: AdminOp = ssc_abi::hsm::decode_payload(&bytes).context("hsm admin: not an admin request")?;
    let reply = session.admin(sds, op)?;
    Ok(b64.encode(postcard::to_allocvec(&reply)?))
}

/// `ssc hsm …`: one admin request to DomC through the `ssc up` running
/// `chain`.
pub fn request(chain: &Path, op: &AdminOp) -> Result<AdminReply> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let cmd = format!("hsm admin {}", b64.encode(postcard::to_allocvec(op)?));
    let reply = crate::chain_checkpoint::request(chain, &cmd, &mut crate::checkpoint::quiet)?;
    let bytes = b64.decode(reply.trim()).context("`ssc up` sent a reply this ssc cannot read")?;
    let r: AdminReply = ssc_abi::hsm::decode_payload(&bytes).context("`ssc up` sent a reply this ssc cannot read")?;
    match r {
        AdminReply::Error(e) => Err(anyhow!("DomC refused: {e}")),
        r => Ok(r),
    }
}

/// The whole audit log DomC still holds, verified: the entries, and the
/// sequence number of the first one kept.
pub fn audit(chain: &Path) -> Result<(Vec<AuditEntry>, u64)> {
    let mut entries: Vec<AuditEntry> = vec![];
    let mut from = 0;
    let (oldest, head) = loop {
        let page = match request(chain, &AdminOp::Audit { from, max: 256 })? {
            AdminReply::Audit(p) => p,
            other => bail!("DomC answered {other:?} to an audit request"),
        };
        if entries.is_empty() {
            from = page.oldest_kept;
        }
        let n = page.entries.len() as u64;
        entries.extend(page.entries);
        from += n;
        if n == 0 || from >= page.next {
            break (page.oldest_kept, page.head);
        }
    };
    // Entries appended while we paged are fine; the chain must link and
    // reach the head DomC reported last.
    sd_hsm::audit::verify(&entries, Some(head)).map_err(|e| anyhow!("the audit log does not verify: {e}"))?;
    Ok((entries, oldest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_in_other_formats_get_a_conversion_command() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        std::fs::write(&p, "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n").unwrap();
        let e = read_key_file(&p).unwrap_err().to_string();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
        std::fs::write(&p, "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n").unwrap();
        assert_eq!(read_key_file(&p).unwrap(), KeyMaterial::Pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00]));
        std::fs::write(&p, "ab".repeat(32)).unwrap();
        assert_eq!(read_key_file(&p).unwrap(), KeyMaterial::Aes256(vec![0xab; 32]));
        std::fs::write(&p, "hello").unwrap();
        assert!(read_key_file(&p).unwrap_err().to_string().contains("neither"));
    }

    #[test]
    fn pins_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "123\n").unwrap();
        assert!(read_pin(&p).unwrap_err().to_string().contains("4 to 64"));
        std::fs::write(&p, "123456\nignored\n").unwrap();
        assert_eq!(read_pin(&p).unwrap(), b"123456");
    }
}
