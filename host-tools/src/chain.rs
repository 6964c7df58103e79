//! Chain files and `ssc up`: a tenant composes its client VM's disks from
//! catalog images.
//!
//! ```toml
//! [catalog]
//! path = "build/catalog"
//! trust = ["build/publisher.pub"]
//!
//! [client]                      # all optional
//! kernel = "build/client/vmlinuz"
//! initrd = "build/client/initrd.cpio.gz"
//! memory = 512
//! append = "console=ttyS0 quiet"
//!
//! [[disk]]
//! volume = "volume.img"         # the provider's volume file
//! key = "volume.key"            # tenant key file (hex, 64 bytes); for an
//!                               # authenticated volume, volume.key.generation
//!                               # holds the tenant's generation record — or:
//! # luks_passphrase = "pass.txt" # the volume is LUKS1; unlock on the tenant side
//! chain = ["storage-crypt"]     # service domains in this disk's path
//! ```
//!
//! A chain of several SDs lists them client side first, and `key` then
//! lists one key file per SD in the same order: the last SD sits on the
//! volume (its `format` as above); each SD before it reaches the next one's
//! export over a `down` link and encrypts as raw aes-xts-plain64 (its
//! header would live inside the next layer, which the tenant tool cannot
//! write offline):
//!
//! ```toml
//! chain = ["storage-crypt", "storage-crypt"]
//! key = ["outer.key", "volume.key"]
//! ```
//!
//! Before anything starts, every image must be in the catalog with a valid
//! signature from a trusted publisher, and neighbours must fit: the client
//! needs `block`, each SD must offer `block` upstream and need `block`
//! downstream (the next SD's offer, or the volume). Errors point at the line of the chain
//! file. Relative paths are relative to the chain file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use ssc_abi::{Body, VolumeConfig};
use toml::Spanned;

use crate::builder::{ControlLink, Domain, DomainSpec, LinkSpec, LogEcho, MetaDomain, NbdDisk};
use crate::catalog::{self, VerifiedImage};
use crate::qemu::{Accel, ImageExit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogRef {
    path: PathBuf,
    trust: Spanned<Vec<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSection {
    kernel: Option<Spanned<PathBuf>>,
    initrd: Option<Spanned<PathBuf>>,
    memory: Option<u32>,
    append: Option<String>,
    count: Option<Spanned<u32>>,
}

/// One key file, or one per SD of a chain.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Keys {
    One(PathBuf),
    PerSd(Vec<PathBuf>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskSection {
    volume: Spanned<PathBuf>,
    key: Option<Spanned<Keys>>,
    luks_passphrase: Option<Spanned<PathBuf>>,
    /// `native` (default: the volume has `ssc volume create`'s header, so a
    /// wrong key is refused) or `raw` (plain aes-xts-plain64 from byte 0).
    format: Option<Spanned<String>>,
    chain: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainFile {
    catalog: CatalogRef,
    #[serde(default)]
    client: ClientSection,
    #[serde(default)]
    disk: Vec<DiskSection>,
    checkpoint: Option<Spanned<crate::chain_checkpoint::CheckpointSection>>,
    dedup: Option<Spanned<crate::chain_dedup::DedupSection>>,
    introspect: Option<Spanned<crate::chain_introspect::IntrospectSection>>,
    hsm: Option<Spanned<crate::chain_hsm::HsmSection>>,
    udom0: Option<Spanned<crate::chain_udom0::Udom0Section>>,
}

/// The tenant-side secret of one disk: where it is, read only when the
/// SD is keyed (with `[udom0]`, only by `ssc attest --provision`: the
/// builder never reads it).
enum Secret {
    /// A raw key's file, and whether the volume has a native header.
    Key(PathBuf, bool),
    /// A LUKS passphrase's file.
    LuksPassphrase(PathBuf),
}

/// One disk of the plan.
pub struct PlannedDisk {
    pub volume: PathBuf,
    /// The SDs in the disk's path, client side first.
    pub sds: Vec<VerifiedImage>,
    secret_kind: &'static str,
    /// The secret of the last SD (the one on the volume).
    secret: Secret,
    /// Raw aes-xts-plain64 keys of the SDs before it.
    outer_keys: Vec<Vec<u8>>,
}

/// A checked chain file, ready to start.
pub struct Plan {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory: u32,
    pub append: String,
    pub disks: Vec<PlannedDisk>,
    /// The chain file's `[checkpoint]`, checked.
    pub checkpoint: Option<crate::chain_checkpoint::CheckpointPlan>,
    /// How many identical clients (`[client] count`).
    pub clients: u32,
    /// The chain file's `[dedup]`, checked.
    pub dedup: Option<crate::chain_dedup::DedupPlan>,
    /// The chain file's `[introspect]`, checked.
    pub introspect: Option<crate::chain_introspect::IntrospectPlan>,
    /// The chain file's `[hsm]`, checked.
    pub hsm: Option<crate::chain_hsm::HsmPlan>,
    /// The chain file's `[udom0]`, checked: an attested launch.
    pub udom0: Option<crate::chain_udom0::Udom0Plan>,
    /// The chain file (its command socket sits beside it).
    pub path: PathBuf,
}

impl Plan {
    /// An SD image of the chain (to probe the accelerator with).
    pub fn first_sd_image(&self) -> &Path {
        let disk = self.disks.first().map(|d| d.sds[0].path.as_path());
        disk.or(self.checkpoint.as_ref().map(|c| c.image.path.as_path()))
            .or(self.dedup.as_ref().map(|d| d.image.path.as_path()))
            .or(self.introspect.as_ref().map(|i| i.image.path.as_path()))
            .or(self.hsm.as_ref().map(|h| h.image.path.as_path()))
            .expect("plan() refuses a chain without service domains")
    }

    /// Every SD image the chain launches (not Udom0), once per launch.
    pub fn service_images(&self) -> Vec<&VerifiedImage> {
        let mut v: Vec<&VerifiedImage> = self.disks.iter().flat_map(|d| d.sds.iter()).collect();
        v.extend(self.hsm.as_ref().map(|h| &h.image));
        v.extend(self.checkpoint.as_ref().map(|c| &c.image));
        v.extend(self.dedup.as_ref().map(|d| &d.image));
        v.extend(self.introspect.as_ref().map(|i| &i.image));
        v
    }

    /// The meta-domain's name: the chain file's stem.
    pub fn meta_name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "chain".into())
    }

    /// The client VMs' domain names: `client`, or `client-0`, `client-1`….
    pub fn client_names(&self) -> Vec<String> {
        match self.clients {
            1 => vec!["client".into()],
            n => (0..n).map(|i| format!("client-{i}")).collect(),
        }
    }
}

impl PlannedDisk {
    /// The domain name of SD `k` (client side first) of disk `i`.
    pub fn sd_name(&self, i: &str, k: usize) -> String {
        let m = &self.sds[k].manifest.image;
        if self.sds.len() == 1 { format!("{}-{i}", m.name) } else { format!("{}-{i}-{k}", m.name) }
    }
}

/// The initramfs the chain's clients boot: the plan's (or `over`), with
/// the PKCS#11 module and tools appended for `[hsm]` chains (written into
/// `scratch`). The same bytes every time, so the tenant can measure it.
pub fn client_initrd(plan: &Plan, over: Option<&Path>, scratch: &Path) -> Result<PathBuf> {
    let base = over.unwrap_or(&plan.initrd);
    let Some(h) = &plan.hsm else { return Ok(base.to_path_buf()) };
    let module = std::fs::read(&h.module).with_context(|| format!("reading {}", h.module.display()))?;
    let out = scratch.join("initrd-hsm");
    // The PKCS#11 peer tools of `make client`, when there.
    let tools = plan.initrd.with_file_name("pkcs11-tools.cpio.gz");
    let mut parts = vec![base];
    if tools.is_file() {
        parts.push(&tools);
    }
    let name = crate::chain_hsm::CLIENT_MODULE.trim_start_matches('/');
    append_to_initrd(&parts, &[(name, 0o100755, &module)], &out)?;
    Ok(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads a key file: 128 hex digits (whitespace ignored).
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading key file {}", path.display()))?;
    let hex: String = text.split_whitespace().collect();
    let key = catalog::unhex(&hex).with_context(|| format!("key file {} is not hex", path.display()))?;
    if key.len() != 64 {
        bail!("key file {} holds {} bytes; aes-xts-plain64 needs 64", path.display(), key.len());
    }
    Ok(key)
}

/// The image a `[name]` section starts (named alike), verified, which
/// must declare a memory window it may read.
fn memory_sd(catalog_dir: &Path, trusted: &[String], name: &str, line: &str) -> Result<VerifiedImage> {
    let image = catalog::find(catalog_dir, trusted, name)
        .map_err(|e| anyhow!("{line}: [{name}] needs the `{name}` image: {e:#}"))?;
    let m = &image.manifest.image;
    if m.windows < 1 || !m.permissions.iter().any(|p| p == "mem-read") {
        bail!("{line}: `{}` does not declare a memory window with mem-read", m.name);
    }
    Ok(image)
}

/// Parses and checks a chain file. Nothing is started.
pub fn plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading chain file {}", path.display()))?;
    let name = path.display().to_string();
    let file: ChainFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| format!(":{}", line_of(&text, s.start))).unwrap_or_default();
        anyhow!("{name}{line}: {}", e.message())
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let at = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let trust = &file.catalog.trust;
    let trusted = catalog::load_trusted(&trust.get_ref().iter().map(|p| at(p)).collect::<Vec<_>>())
        .map_err(|e| anyhow!("{name}:{}: [catalog] trust: {e:#}", line_of(&text, trust.span().start)))?;
    let catalog_dir = at(&file.catalog.path);
    if file.disk.is_empty()
        && file.checkpoint.is_none()
        && file.dedup.is_none()
        && file.introspect.is_none()
        && file.hsm.is_none()
    {
        bail!(
            "{name}: no [[disk]], [checkpoint], [dedup], [introspect] or [hsm]: a chain needs at least one service domain"
        );
    }
    // With [udom0] the tenant's secrets go to the SDs through Udom0:
    // `ssc up` does not read them (`ssc attest --provision` does).
    let attested = file.udom0.is_some();
    let mut disks = vec![];
    for d in file.disk {
        let line = |off: usize| format!("{name}:{}", line_of(&text, off));
        let entries = d.chain.get_ref();
        if entries.is_empty() {
            bail!(
                "{}: empty chain: name the service domains in this disk's path, e.g. [\"storage-crypt\"]",
                line(d.chain.span().start)
            );
        }
        let mut sds = vec![];
        for entry in entries {
            let sd = catalog::find(&catalog_dir, &trusted, entry.get_ref())
                .map_err(|e| anyhow!("{}: `{}`: {e:#}", line(entry.span().start), entry.get_ref()))?;
            let m = &sd.manifest.image;
            if !m.offers.iter().any(|o| o == "block") {
                bail!(
                    "{}: `{}` does not offer a block device upstream (offers: {:?}); the client needs one",
                    line(entry.span().start),
                    m.name,
                    m.offers
                );
            }
            if !m.needs.iter().any(|n| n == "block") || !m.links.iter().any(|l| l == "nbd") {
                bail!(
                    "{}: `{}` does not take a block device downstream and serve NBD upstream",
                    line(entry.span().start),
                    m.name
                );
            }
            sds.push(sd);
        }
        let volume = at(d.volume.get_ref());
        if !volume.is_file() {
            bail!(
                "{}: volume {} does not exist (make one with `ssc volume create`)",
                line(d.volume.span().start),
                volume.display()
            );
        }
        let key_line = d.key.as_ref().map(|k| line(k.span().start)).unwrap_or_else(|| line(d.volume.span().start));
        let (volume_key, outer_keys) = match d.key.map(|k| (k.span().start, k.into_inner())) {
            None => (None, vec![]),
            Some((_, Keys::One(k))) if sds.len() == 1 => (Some(k), vec![]),
            Some((off, Keys::PerSd(_))) if attested && sds.len() > 1 => bail!(
                "{}: with [udom0], a disk has one storage SD (Udom0 keys SDs that sit on a volume; \
                 chains of SDs are not keyed through Udom0 yet)",
                line(off)
            ),
            Some((_, Keys::PerSd(mut ks))) if ks.len() == sds.len() => {
                let last = ks.pop();
                let outer = ks.iter().map(|k| read_key(&at(k))).collect::<Result<Vec<_>>>();
                (last, outer.map_err(|e| anyhow!("{key_line}: {e:#}"))?)
            }
            Some((off, _)) => bail!(
                "{}: a chain of {} SDs needs `key = [...]` with one key file per SD (client side first)",
                line(off),
                sds.len()
            ),
        };
        if sds.len() > 1 && d.luks_passphrase.is_some() {
            bail!("{}: `luks_passphrase` works with a single-SD chain only", line(d.volume.span().start));
        }
        let (secret_kind, secret) = match (volume_key, d.luks_passphrase) {
            (Some(k), None) => {
                let native = match d.format.as_ref().map(|f| (f.get_ref().as_str(), f.span().start)) {
                    None | Some(("native", _)) => true,
                    Some(("raw", _)) => false,
                    Some((other, at)) => bail!("{}: format `{other}` is not `native` or `raw`", line(at)),
                };
                if !attested {
                    read_key(&at(&k)).map_err(|e| anyhow!("{key_line}: {e:#}"))?;
                }
                ("key", Secret::Key(at(&k), native))
            }
            (None, Some(p)) => {
                let (p_line, p) = (line(p.span().start), p.into_inner());
                if !attested {
                    crate::luks::read_passphrase(&at(&p)).map_err(|e| anyhow!("{p_line}: {e:#}"))?;
                }
                ("luks", Secret::LuksPassphrase(at(&p)))
            }
            _ => bail!("{}: give exactly one of `key` or `luks_passphrase`", line(d.volume.span().start)),
        };
        disks.push(PlannedDisk { volume, sds, secret_kind, secret, outer_keys });
    }
    let checkpoint = match file.checkpoint {
        None => None,
        Some(c) => {
            let line = format!("{name}:{}", line_of(&text, c.span().start));
            let c = c.into_inner();
            let image = memory_sd(&catalog_dir, &trusted, "checkpoint", &line)?;
            let key_path = at(&c.key);
            let disk = at(&c.disk);
            // Through a storage SD: the disk is a volume of its own.
            let through = match &c.volume_key {
                None => None,
                Some(k) => {
                    let sd = catalog::find(&catalog_dir, &trusted, "storage-crypt")
                        .map_err(|e| anyhow!("{line}: `volume_key` puts a storage SD under the checkpoints: {e:#}"))?;
                    if !disk.is_file() {
                        bail!(
                            "{line}: checkpoint volume {} does not exist: with `volume_key` the disk is a volume, \
                             make it with `ssc volume create --format auth|native`",
                            disk.display()
                        );
                    }
                    if attested {
                        bail!(
                            "{line}: `volume_key` with [udom0]: the checkpoint volume is not keyed through Udom0 yet"
                        );
                    }
                    let k = at(k);
                    read_key(&k).map_err(|e| anyhow!("{line}: volume_key: {e:#}"))?;
                    Some(PlannedDisk {
                        volume: disk.clone(),
                        sds: vec![sd],
                        secret_kind: "key",
                        secret: Secret::Key(k, true),
                        outer_keys: vec![],
                    })
                }
            };
            Some(crate::chain_checkpoint::CheckpointPlan {
                image,
                through,
                disk,
                key: read_key(&key_path).map_err(|e| anyhow!("{line}: {e:#}"))?,
                key_path,
                compress: c.compress.unwrap_or(true),
            })
        }
    };
    let dedup = match file.dedup {
        None => None,
        Some(d) => {
            let line = format!("{name}:{}", line_of(&text, d.span().start));
            let d = d.into_inner();
            let image = memory_sd(&catalog_dir, &trusted, "dedup", &line)?;
            if d.period == Some(0) {
                bail!("{line}: period = 0: leave it out to scan on demand only");
            }
            Some(crate::chain_dedup::DedupPlan { image, period: d.period.map(Duration::from_secs) })
        }
    };
    let introspect = match file.introspect {
        None => None,
        Some(d) => {
            let line = format!("{name}:{}", line_of(&text, d.span().start));
            let image = memory_sd(&catalog_dir, &trusted, "introspect", &line)?;
            if file.client.count.as_ref().is_some_and(|c| *c.get_ref() > 1) {
                bail!("{line}: [introspect] monitors one client; leave out [client] count");
            }
            let plan = crate::chain_introspect::IntrospectPlan::check(d.into_inner(), image, |p| at(p))
                .map_err(|e| anyhow!("{line}: [introspect]: {e:#}"))?;
            Some(plan)
        }
    };
    let hsm = match file.hsm {
        None => None,
        Some(h) => {
            let line = format!("{name}:{}", line_of(&text, h.span().start));
            let image = catalog::find(&catalog_dir, &trusted, "domc").map_err(|e| anyhow!("{line}: `domc`: {e:#}"))?;
            if !image.manifest.image.permissions.iter().any(|p| p == "hsm") {
                bail!("{line}: the catalog's `domc` image does not declare the `hsm` permission");
            }
            if file.client.count.as_ref().is_some_and(|c| *c.get_ref() > 1) {
                bail!("{line}: [hsm] serves one client; leave out [client] count");
            }
            let plan = crate::chain_hsm::HsmPlan::check(h.into_inner(), image, |p| at(p))
                .map_err(|e| anyhow!("{line}: [hsm]: {e:#}"))?;
            Some(plan)
        }
    };
    let udom0 = match file.udom0 {
        None => None,
        Some(u) => {
            let line = format!("{name}:{}", line_of(&text, u.span().start));
            Some(
                crate::chain_udom0::Udom0Plan::check(u.into_inner(), &catalog_dir, &trusted)
                    .map_err(|e| anyhow!("{line}: [udom0]: {e:#}"))?,
            )
        }
    };
    let clients = match &file.client.count {
        None => 1,
        Some(n) => {
            let line = format!("{name}:{}", line_of(&text, n.span().start));
            match *n.get_ref() {
                0 | 17.. => bail!("{line}: count = {}: a chain runs 1 to 16 clients", n.get_ref()),
                1 => 1,
                k if !disks.is_empty() || checkpoint.is_some() => bail!(
                    "{line}: count = {k}: several clients work without [[disk]] and [checkpoint] only \
                     (each disk's SD serves one client, the checkpoint SD one)"
                ),
                k => k,
            }
        }
    };
    let client_dir = Path::new("build/client");
    let c = file.client;
    let client_file = |given: Option<Spanned<PathBuf>>, what: &str, default: &str| -> Result<PathBuf> {
        match given {
            Some(p) => {
                let (l, p) = (line_of(&text, p.span().start), at(p.get_ref()));
                if !p.is_file() {
                    bail!("{name}:{l}: client {what} {} is missing", p.display());
                }
                Ok(p)
            }
            None => {
                let p = client_dir.join(default);
                if !p.is_file() {
                    bail!(
                        "{name}: client {what} {} (the default) is missing: build the client with `make client`, \
                         or name one with [client] {what}",
                        p.display()
                    );
                }
                Ok(p)
            }
        }
    };
    let kernel = client_file(c.kernel, "kernel", "vmlinuz")?;
    let initrd = client_file(c.initrd, "initrd", "initrd.cpio.gz")?;
    Ok(Plan {
        kernel,
        initrd,
        memory: c.memory.unwrap_or(512),
        append: c.append.unwrap_or_else(|| "console=ttyS0 quiet".into()),
        disks,
        checkpoint,
        clients,
        dedup,
        introspect,
        hsm,
        udom0,
        path: path.to_path_buf(),
    })
}

/// Where client `name`'s RAM lives when memory SDs have windows on it.
fn memory_file(scratch: &Path, name: &str) -> PathBuf {
    scratch.join(format!("{name}.mem"))
}

type MemorySds = (
    Option<crate::chain_checkpoint::Session>,
    Option<crate::chain_dedup::Session>,
    Option<crate::chain_introspect::Session>,
);

/// Starts the chain's memory SDs (checkpoint, dedup, introspection), each
/// with windows on the clients' memory files.
fn start_memory_sds(
    plan: &Plan,
    names: &[String],
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    scratch: &Path,
    restoring: bool,
) -> Result<MemorySds> {
    let first = memory_file(scratch, &names[0]);
    let checkpoint = match &plan.checkpoint {
        // One client (plan() refuses [checkpoint] with several).
        Some(c) => {
            Some(crate::chain_checkpoint::start_sd(c, sds, (accel, echo), scratch, (&first, plan.memory), restoring)?)
        }
        None => None,
    };
    let dedup = match &plan.dedup {
        Some(d) => {
            let mems: Vec<(String, PathBuf)> = names.iter().map(|n| (n.clone(), memory_file(scratch, n))).collect();
            Some(crate::chain_dedup::start_sd(d, sds, (accel, echo), &mems)?)
        }
        None => None,
    };
    let introspect = match &plan.introspect {
        // One client (plan() refuses [introspect] with several).
        Some(i) => Some(crate::chain_introspect::start_sd(i, sds, (accel, echo), &first)?),
        None => None,
    };
    Ok((checkpoint, dedup, introspect))
}

/// The running chain: SDs first, then the client.
pub struct Running {
    pub sds: MetaDomain,
    /// The first is `client` (or `client-0`).
    pub clients: Vec<Domain>,
    checkpoint: Option<crate::chain_checkpoint::Session>,
    dedup: Option<crate::chain_dedup::Session>,
    introspect: Option<crate::chain_introspect::Session>,
    hsm: Option<crate::chain_hsm::Session>,
    udom0: Option<crate::chain_udom0::Session>,
    commands: Option<crate::chain_checkpoint::CommandSocket>,
    /// The provider's narrow API: status, stop, destroy.
    provider: crate::provider::Socket,
    /// Holds the NBD sockets; dropped after the domains.
    _scratch: crate::builder::RunDir,
}

/// Starts disk `i`'s SDs from the volume up, each keyed before the one
/// above it connects to its export; returns the NBD socket of the topmost
/// (client side) SD. With `attested` (a `[udom0]` chain, one SD per disk)
/// the SD gets a key link to Udom0 instead, and waits for Udom0 to key it.
pub(crate) fn start_disk_sds(
    d: &PlannedDisk,
    i: &str,
    sds: &mut MetaDomain,
    (accel, echo, attested): (Accel, bool, bool),
    scratch: &Path,
) -> Result<PathBuf> {
    let n = d.sds.len();
    // The listening socket of the SD below (toward the volume).
    let mut below: Option<PathBuf> = None;
    for k in (0..n).rev() {
        let name = d.sd_name(i, k);
        let mut spec = d.sds[k].spec(&name);
        match &below {
            None => spec.disks.push(d.volume.clone()),
            Some(s) => spec.links.push(LinkSpec::connect("down", s)),
        }
        let socket = scratch.join(format!("disk{i}-{k}.nbd"));
        spec.links.push(LinkSpec::listen("nbd", &socket));
        if attested {
            spec.links.push(LinkSpec::connect("udom0", &crate::chain_udom0::key_socket(scratch, &name)));
            spec.append = "ssc.keyed_by=udom0".into();
        }
        let dom = sds.start(&spec, accel, echo, Duration::from_secs(60))?;
        let ctl = dom.control().ok_or_else(|| anyhow!("{name} has no control link"))?;
        if attested {
            if let Some(key_path) = d.generation_record()? {
                record_generations(ctl, key_path);
            }
            eprintln!("ssc up: disk {i}: {name} waits for its key from Udom0");
        } else if below.is_none() {
            key_volume_sd(ctl, &name, d, i)?;
        } else {
            let cfg = VolumeConfig::xts_plain64("vol", &d.outer_keys[k]);
            ctl.request(Body::ConfigureVolume(cfg), Duration::from_secs(30))
                .with_context(|| format!("provisioning the key of disk {i}, SD {k} ({name})"))?;
            eprintln!("ssc up: disk {i}: {name} keyed (raw aes-xts-plain64 over the SD below)");
        }
        below = Some(socket);
    }
    below.ok_or_else(|| anyhow!("disk {i} has no service domain"))
}

/// The key and layout of the SD on a disk's volume, from the tenant's
/// secret (read here), and the generation record of an authenticated
/// volume.
pub struct VolumeSecret {
    pub key: Vec<u8>,
    pub params: ssc_abi::attest::VolumeParams,
    /// The tenant's generation record (beside the key) and its value.
    pub generation_of: Option<(PathBuf, u64)>,
}

impl PlannedDisk {
    /// Reads the tenant's secret of disk `i` (the LUKS unlock happens here,
    /// on the tenant's side).
    pub fn secret(&self, i: &str) -> Result<VolumeSecret> {
        // Authenticated volumes: the tenant's generation record guards
        // against a rolled-back volume, and follows every commit.
        let mut generation_of = None;
        let (key, base) = match &self.secret {
            Secret::Key(path, native) => {
                if *native && self.authenticated(path)? {
                    generation_of = Some((path.clone(), read_generation(path)?));
                }
                (read_key(path)?, VolumeConfig { native_header: *native, ..VolumeConfig::xts_plain64("vol", &[]) })
            }
            Secret::LuksPassphrase(p) => {
                let u = crate::luks::unlock(&self.volume, &crate::luks::read_passphrase(p)?)?;
                eprintln!(
                    "disk {i}: LUKS{} keyslot {} unlocked on the tenant side ({}-byte sectors, data at {} KiB)",
                    u.version,
                    u.slot,
                    u.sector_size,
                    u.data_offset >> 10
                );
                let base = VolumeConfig {
                    data_offset: u.data_offset,
                    sector_size: u.sector_size,
                    iv_offset: u.iv_offset,
                    ..VolumeConfig::xts_plain64("vol", &[])
                };
                (u.key, base)
            }
        };
        let params = match &generation_of {
            Some((_, g)) => ssc_abi::attest::VolumeParams::of(&VolumeConfig::authenticated("vol", &[], *g)),
            None => ssc_abi::attest::VolumeParams::of(&base),
        };
        Ok(VolumeSecret { key, params, generation_of })
    }

    /// The tenant's generation record, for an authenticated volume keyed
    /// by Udom0 (no key is read).
    fn generation_record(&self) -> Result<Option<PathBuf>> {
        match &self.secret {
            Secret::Key(path, true) if self.authenticated(path)? => Ok(Some(path.clone())),
            _ => Ok(None),
        }
    }

    /// Whether the volume (keyed by the key file `key`) is authenticated.
    /// The tenant's record decides, not the provider's header: a volume
    /// with a generation record beside its key is authenticated, and a
    /// header that says otherwise (a version-1 XTS header written over an
    /// authenticated volume, which the shared key check would let open) is
    /// a downgrade, refused by name.
    fn authenticated(&self, key: &Path) -> Result<bool> {
        let header = volume_header_version(&self.volume)?;
        let auth = sd_storage_crypt::auth::VERSION;
        let record = generation_file(key);
        match (record.exists(), header) {
            (_, Some(v)) if sd_storage_crypt::auth::is_auth_version(v) => Ok(true),
            (true, other) => bail!(
                "downgrade refused: the tenant's record {} says {} is an authenticated volume (format {auth}), but \
                 its header now says {}; someone rewrote it to be served without integrity. Restore the volume \
                 from a copy you trust (delete the record only if you re-created the volume yourself)",
                record.display(),
                self.volume.display(),
                match other {
                    Some(v) => format!("format {v}"),
                    None => "no native header".into(),
                }
            ),
            (false, _) => Ok(false),
        }
    }
}

/// Follows an authenticated volume's commits into the tenant's record.
fn record_generations(ctl: &ControlLink, key_path: PathBuf) {
    ctl.on_commit(move |generation| {
        if let Err(e) = write_generation(&key_path, generation) {
            eprintln!("ssc up: cannot record generation {generation}: {e:#}");
        }
    });
}

/// Keys the SD that sits on disk `i`'s volume from the tenant's secret.
fn key_volume_sd(ctl: &ControlLink, name: &str, d: &PlannedDisk, i: &str) -> Result<()> {
    let secret = d.secret(i)?;
    ctl.request(Body::ConfigureVolume(secret.params.config(&secret.key)), Duration::from_secs(30))
        .with_context(|| format!("provisioning the key of disk {i} ({} from {})", d.secret_kind, d.volume.display()))?;
    if let Some((key_path, g)) = secret.generation_of {
        eprintln!("ssc up: disk {i}: authenticated volume opened at generation ≥ {g} (tenant record)");
        record_generations(ctl, key_path);
    }
    eprintln!("ssc up: disk {i}: {name} keyed, volume {}", d.volume.display());
    Ok(())
}

/// Starts the plan: each disk's SDs from the volume up (each keyed before
/// the one above it connects to its export), then the client on the first
/// SDs' NBD links. Progress goes to stderr.
pub fn up(
    plan: &Plan,
    accel: Accel,
    echo: bool,
    initrd_override: Option<&Path>,
    restore: Option<u64>,
) -> Result<Running> {
    let scratch = crate::builder::RunDir::create()?;
    let total: usize = plan.disks.iter().map(|d| d.sds.len()).sum();
    if total > 0 {
        eprintln!("ssc up: starting {total} storage service domain(s)");
    }
    // Everything the builder and its QEMUs create (sockets, memory files,
    // run directories) is private to the builder's user (`ssc up` sets
    // this before it writes anything; here for library callers).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let sd_count = plan.service_images().len() as u32 + u32::from(plan.udom0.is_some());
    let quotas = crate::provider::Quotas::read(&crate::provider::quotas_file())?;
    quotas.check(
        if quotas.max_meta_domains.is_some() { crate::provider::running().len() } else { 0 },
        sd_count + plan.clients,
        sd_count * 128 + plan.memory * plan.clients,
    )?;
    let mut provider = crate::provider::Socket::bind(&plan.meta_name())?;
    eprintln!("ssc up: meta-domain `{}` (provider verbs: `ssc provider list|stop|destroy`)", provider.id);
    let mut sds = MetaDomain::new()?;
    // Udom0 first: from then on every launch is measured into the vTPM.
    let mut udom0 = match &plan.udom0 {
        Some(u) => Some(crate::chain_udom0::start(u, plan, &mut sds, (accel, echo), scratch.path())?),
        None => None,
    };
    let attested = udom0.is_some();
    let mut sockets = vec![];
    for (i, d) in plan.disks.iter().enumerate() {
        sockets.push(start_disk_sds(d, &i.to_string(), &mut sds, (accel, echo, attested), scratch.path())?);
    }
    // DomC listens before the client's QEMU connects its ssc-hsm port; the
    // client gets the PKCS#11 module in its initramfs.
    let (hsm, hsm_link) = match &plan.hsm {
        Some(h) => {
            let stream = h.audit_log.clone().unwrap_or_else(|| beside(&plan.path, ".hsm-audit.jsonl"));
            let (session, socket) = crate::chain_hsm::start_sd(h, &mut sds, (accel, echo), scratch.path(), &stream)?;
            (Some(session), Some(LinkSpec::connect(crate::chain_hsm::CLIENT_PORT, &socket)))
        }
        None => (None, None),
    };
    let initrd = client_initrd(plan, initrd_override, scratch.path())?;
    let names = plan.client_names();
    // In an attested meta-domain every client is measured before the
    // tenant is asked to attest; the clients start once Udom0 has keyed
    // the SDs and the builder has checked the tenant's grants.
    // The command socket answers `ssc attest` meanwhile.
    let mut commands = match attested {
        true => Some(crate::chain_checkpoint::CommandSocket::bind(&plan.path)?),
        false => None,
    };
    // The clients' kernel and initramfs are read once and pinned: what is
    // measured is what every client's QEMU runs, whatever happens to the
    // files meanwhile (`ssc up` may wait long for the tenant here).
    let shared_ram = plan.checkpoint.is_some() || plan.dedup.is_some() || plan.introspect.is_some();
    // In an attested meta-domain the memory SDs start now, before the
    // tenant attests, so the evidence that decides whether secrets go out
    // covers them too (issue 19, item 11). Their windows are the clients'
    // memory files, made now and empty until the clients start, which
    // only happens once the tenant has granted the windows and launched.
    let memory_sds = match attested && shared_ram {
        true => {
            for name in &names {
                crate::builder::create_memory_file(&memory_file(scratch.path(), name), plan.memory)?;
            }
            Some(start_memory_sds(plan, &names, &mut sds, (accel, echo), scratch.path(), restore.is_some())?)
        }
        false => None,
    };
    let (kernel_pin, kernel_bytes) = crate::builder::PinnedFile::read(&plan.kernel)?;
    let (initrd_pin, initrd_bytes) = crate::builder::PinnedFile::read(&initrd)?;
    let granted = match udom0.as_mut() {
        Some(u) => {
            for name in &names {
                u.measure_client(name, &kernel_bytes, &initrd_bytes, &plan.append)?;
            }
            Some(u.wait_for_launch(plan, &mut sds, commands.as_mut(), &mut provider)?)
        }
        None => None,
    };
    drop((kernel_bytes, initrd_bytes));
    // Memory windows only with their grants (attested meta-domains): the
    // memory SDs the chain names need what its policy asks for them.
    if let Some(g) = &granted {
        for want in crate::grants::policy(plan).iter().filter(|w| w.permission.starts_with("mem-")) {
            g.require(&want.sd, &want.client, &want.permission)?;
        }
    }
    let mut clients = vec![];
    for name in &names {
        let mut spec = DomainSpec::new(name, &kernel_pin.qemu_path());
        spec.initrd = Some(initrd_pin.qemu_path());
        spec.mem_mib = plan.memory;
        spec.append = plan.append.clone();
        for (i, (s, d)) in sockets.iter().zip(&plan.disks).enumerate() {
            let sd = d.sd_name(&i.to_string(), 0);
            match &granted {
                Some(g) if !g.has(&sd, name, "blk-interpose") => {
                    eprintln!("ssc up: {name}: disk {i} left out: `{sd}` has no blk-interpose grant over `{name}`")
                }
                _ => spec.nbd_disks.push(NbdDisk { socket: s.clone(), export: "vol".into() }),
            }
        }
        match &granted {
            Some(g) if hsm_link.is_some() && !g.has("domc", name, "hsm") => {
                eprintln!("ssc up: {name}: DomC left out: no hsm grant over `{name}`")
            }
            _ => spec.links.extend(hsm_link.clone()),
        }
        if shared_ram {
            // Shared RAM: the SDs' windows (and skipped by migration).
            spec.memory_file = Some(memory_file(scratch.path(), name));
        }
        if restore.is_some() {
            spec.extra_args.extend(["-incoming".into(), "defer".into()]);
        }
        let log = if echo { LogEcho::Stdout(format!("[{name}] ")) } else { LogEcho::Quiet };
        clients.push((Domain::launch(&spec, accel, &scratch, log)?, spec.memory_file));
    }
    // Each client's QEMU holds its own copy of the descriptors.
    drop((kernel_pin, initrd_pin));
    let (mut session, dedup, introspect) = match memory_sds {
        Some(m) => m,
        None => start_memory_sds(plan, &names, &mut sds, (accel, echo), scratch.path(), restore.is_some())?,
    };
    let mut clients: Vec<Domain> = clients.into_iter().map(|(d, _)| d).collect();
    if commands.is_none() && (session.is_some() || dedup.is_some() || introspect.is_some() || hsm.is_some()) {
        commands = Some(crate::chain_checkpoint::CommandSocket::bind(&plan.path)?);
    }
    if let Some(c) = commands.as_mut() {
        c.monitor = introspect.is_some();
    }
    match (restore, session.as_mut()) {
        (Some(g), Some(s)) => s.restore(&clients[0], &mut sds, scratch.path(), g)?,
        (Some(_), None) => bail!("--restore needs a [checkpoint] section in the chain file"),
        _ => {
            for c in &mut clients {
                c.wait_ready(Duration::from_secs(180))?;
            }
            eprintln!("ssc up: {} ready with {} disk(s) (/dev/vda…)", names.join(", "), plan.disks.len());
        }
    }
    if session.is_some() {
        eprintln!(
            "ssc up: checkpoints: `ssc checkpoint save {}` (listening on {})",
            plan.path.display(),
            crate::chain_checkpoint::socket_path(&plan.path).display()
        );
    }
    if dedup.is_some() {
        eprintln!("ssc up: dedup: `ssc dedup scan|apply|stats {}`", plan.path.display());
    }
    if introspect.is_some() {
        eprintln!("ssc up: introspection: `ssc monitor {}` (add --ps for the process list)", plan.path.display());
    }
    if hsm.is_some() {
        eprintln!("ssc up: hsm: `ssc hsm list|import|audit {}`", plan.path.display());
    }
    if udom0.is_some() {
        eprintln!("ssc up: attestation at any time: `ssc attest {} --host-profile FILE`", plan.path.display());
    }
    Ok(Running {
        sds,
        clients,
        checkpoint: session,
        dedup,
        introspect,
        hsm,
        udom0,
        commands,
        provider,
        _scratch: scratch,
    })
}

impl Running {
    /// With `[udom0]`: the TPM setup time and the builder's quote work.
    pub fn udom0_timings(&self) -> Option<(Duration, Duration)> {
        self.udom0.as_ref().map(|u| (u.tpm_setup, u.quote_work))
    }

    /// Waits for every client to finish (or Ctrl-C), then stops the SDs;
    /// returns the first client's exit and log. Meanwhile it serves
    /// `ssc checkpoint save` and `ssc dedup …` on the command socket.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<(ImageExit, Vec<String>)> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut exits: Vec<Option<ImageExit>> = vec![None; self.clients.len()];
        let exit = loop {
            // An SD (or Udom0) that ends on its own leaves its clients
            // without the service they were promised: a disk that returns
            // EIO, a monitor that no longer watches. Stop them and fail.
            // (Ctrl-C reaches the SDs' QEMUs too: that is not a death.)
            if !crate::interrupted()
                && let Some((name, died)) =
                    self.sds.domains_mut().iter_mut().find_map(|d| d.exited().map(|e| (d.name.clone(), e)))
            {
                let clients: Vec<String> = self.clients.iter().map(|c| c.name.clone()).collect();
                eprintln!("ssc up: {name} died ({died}); stopping the client(s) it serves: {}", clients.join(", "));
                for c in &mut self.clients {
                    c.stop();
                }
                break Err(anyhow!(
                    "service domain `{name}` died ({died}) while the meta-domain ran; its clients were stopped \
                     (its console's last lines are above)"
                ));
            }
            let mut failed = None;
            let several = self.clients.len() > 1;
            for (c, e) in self.clients.iter_mut().zip(exits.iter_mut()) {
                if e.is_none() {
                    match c.poll_exit() {
                        Ok(Some(exit)) => {
                            if several {
                                eprintln!("ssc up: {}: {exit}", c.name);
                            }
                            *e = Some(exit);
                        }
                        Err(err) => failed = Some(err),
                        Ok(None) => {}
                    }
                }
            }
            if let Some(err) = failed {
                break Err(err);
            }
            if exits.iter().all(Option::is_some) {
                break Ok(exits[0].take().expect("all exited"));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() > d) {
                for c in &mut self.clients {
                    c.stop();
                }
                break Err(anyhow!(
                    "the client was still running after {} s; stopped it",
                    timeout.unwrap_or_default().as_secs()
                ));
            }
            match self.provider.poll(self.sds.domains_mut().iter_mut().chain(&mut self.clients), self.udom0.is_some()) {
                Some(crate::provider::Verb::Stop) => {
                    eprintln!("ssc up: the provider stops this meta-domain (`ssc provider stop`)");
                    for c in &mut self.clients {
                        c.stop();
                    }
                    break Err(anyhow!("stopped by the provider (`ssc provider stop`)"));
                }
                Some(crate::provider::Verb::Destroy) => {
                    eprintln!("ssc up: the provider destroys this meta-domain (`ssc provider destroy`)");
                    // The tenant's audit stream ends complete even so.
                    if let Some(h) = self.hsm.as_mut() {
                        h.pull_audit(&mut self.sds);
                    }
                    for c in &mut self.clients {
                        c.kill();
                    }
                    for d in self.sds.domains_mut() {
                        d.kill();
                    }
                    bail!("destroyed by the provider (`ssc provider destroy`)");
                }
                _ => {}
            }
            if let Some(d) = self.dedup.as_mut() {
                d.tick(&mut self.sds);
            }
            if let Some(u) = self.udom0.as_mut() {
                u.tick(&mut self.sds);
            }
            if let Some(h) = self.hsm.as_mut() {
                h.tick(&mut self.sds);
            }
            if let Some(i) = self.introspect.as_mut() {
                for line in i.drain(&mut self.sds) {
                    if line.alert || matches!(line.event, sd_introspect::Event::Attached { .. }) {
                        eprintln!("ssc up: introspect: {}", line.text);
                    }
                    if let (Some(cmds), Ok(json)) = (self.commands.as_mut(), serde_json::to_string(&line)) {
                        cmds.broadcast(&json);
                    }
                }
            }
            if let Some(cmds) = self.commands.as_mut() {
                let (clients, sds, scratch) = (&self.clients, &mut self.sds, self._scratch.path());
                let (checkpoint, dedup, introspect) = (&mut self.checkpoint, &mut self.dedup, &mut self.introspect);
                let hsm = &self.hsm;
                let relay = self.udom0.as_ref().map(|u| u.relay());
                cmds.poll(|cmd, progress| match (cmd, checkpoint.as_mut(), dedup.as_mut()) {
                    ("monitor", _, _) => bail!("this chain has no [introspect] section"),
                    ("udom0 relay", _, _) => match relay {
                        Some(r) => Ok(r.to_string()),
                        None => bail!("this chain has no [udom0] section"),
                    },
                    (c, _, _) if c.starts_with("hsm ") => match hsm.as_ref() {
                        Some(h) => crate::chain_hsm::serve(c, h, sds),
                        None => bail!("this chain has no [hsm] section"),
                    },
                    (c, _, _) if c.starts_with("introspect ") => match introspect.as_mut() {
                        Some(i) => crate::chain_introspect::serve(c, i, sds),
                        None => bail!("this chain has no [introspect] section"),
                    },
                    ("save", Some(s), _) => s.save(&clients[0], sds, scratch, false, progress),
                    ("save full", Some(s), _) => s.save(&clients[0], sds, scratch, true, progress),
                    ("save" | "save full", None, _) => bail!("this chain has no [checkpoint] section"),
                    (c, _, Some(d)) if c.starts_with("dedup ") => {
                        let refs: Vec<&Domain> = clients.iter().collect();
                        crate::chain_dedup::serve(c, d, &refs, sds, progress)
                    }
                    (c, _, None) if c.starts_with("dedup ") => bail!("this chain has no [dedup] section"),
                    (other, _, _) => bail!("unknown command `{other}`"),
                });
            }
        };
        // The audit stream ends with DomC's last entry.
        if let Some(h) = self.hsm.as_mut() {
            h.pull_audit(&mut self.sds);
        }
        let log = self.clients[0].log();
        for d in self.sds.domains() {
            let failed = d.control_ref().map(|c| c.integrity_failures()).unwrap_or_default();
            if !failed.is_empty() {
                eprintln!(
                    "ssc up: {}: {} sector(s) failed authentication (tampered with, or torn by a crash): {:?}",
                    d.name,
                    failed.len(),
                    failed
                );
            }
        }
        let verdicts = self.sds.shutdown(Duration::from_secs(30));
        let mut unclean = vec![];
        for (name, v) in verdicts {
            match v {
                Ok(ImageExit::Success) => eprintln!("ssc up: {name} stopped cleanly"),
                Ok(other) => {
                    eprintln!("ssc up: {name}: {other}");
                    unclean.push(format!("{name} ({other})"));
                }
                Err(e) => {
                    eprintln!("ssc up: {name}: {e:#}");
                    unclean.push(format!("{name} ({e})"));
                }
            }
        }
        let exit = exit?;
        if !unclean.is_empty() {
            // The client may have finished, but a service that failed (a
            // volume not flushed, a panic) is not a clean run.
            bail!("service domain(s) did not stop cleanly: {}", unclean.join(", "));
        }
        Ok((exit, log))
    }
}

/// One file of a cpio `newc` archive.
fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], ino: u32) {
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The client's initramfs with `/job.sh` appended as a second archive: the
/// client runs it at boot (`set -e`), prints `client: job passed|failed`
/// and powers off. Written to `out`.
/// The plan's initramfs with the job script `job` (`ssc up --job`), in
/// `scratch`; `None` without a job.
pub fn job_initrd(plan: &Plan, job: Option<&Path>, scratch: &Path) -> Result<Option<PathBuf>> {
    let Some(j) = job else { return Ok(None) };
    let script = std::fs::read_to_string(j).with_context(|| format!("reading job {}", j.display()))?;
    let out = scratch.join("initrd-job");
    initrd_with_job(&plan.initrd, &script, &out)?;
    Ok(Some(out))
}

pub fn initrd_with_job(base: &Path, job: &str, out: &Path) -> Result<()> {
    let job = format!("#!/bin/sh\nset -e\n{job}\n");
    append_to_initrd(&[base], &[("job.sh", 0o100755, job.as_bytes())], out)
}

/// The initramfs archives `parts` one after the other (each a multiple of
/// 4 bytes long; the kernel unpacks them in order), then a further archive
/// of `files` (path without the leading `/`, mode, bytes) whose parent
/// directories are created. Written to `out`.
pub fn append_to_initrd(parts: &[&Path], files: &[(&str, u32, &[u8])], out: &Path) -> Result<()> {
    let mut data = vec![];
    for p in parts {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        if !bytes.len().is_multiple_of(4) {
            bail!("{} is not 4-byte aligned; rebuild it with `make client`", p.display());
        }
        data.extend(bytes);
    }
    let mut ino = 1;
    let mut dirs: Vec<String> = vec![];
    for (name, mode, bytes) in files {
        let parts: Vec<&str> = name.split('/').collect();
        for i in 1..parts.len() {
            let dir = parts[..i].join("/");
            if !dirs.contains(&dir) {
                newc_entry(&mut data, &dir, 0o040755, b"", ino);
                ino += 1;
                dirs.push(dir);
            }
        }
        newc_entry(&mut data, name, *mode, bytes, ino);
        ino += 1;
    }
    newc_entry(&mut data, "TRAILER!!!", 0, b"", 0);
    // Keep the 4-byte alignment for a further archive.
    data.resize(data.len().next_multiple_of(4), 0);
    std::fs::write(out, data).with_context(|| format!("writing {}", out.display()))
}

/// Parses sizes like `64M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64> {
    let (num, mult) = match s.trim().char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| anyhow!("`{s}` is not a size (e.g. 512M, 4G)"))?;
    n.checked_mul(mult).ok_or_else(|| anyhow!("`{s}` is too large"))
}

/// What `ssc volume create` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeFormat {
    /// Plain aes-xts-plain64 from byte 0 (no header: a wrong key cannot be
    /// told from the right one).
    Raw,
    /// aes-xts-plain64 with the native header (key check, data at 1 MiB).
    Native,
    /// The authenticated mode (`aes-256-gcm`, see `sd_storage_crypt::auth`).
    Auth,
}

/// `path` with `suffix` appended to its file name (`vol.key` →
/// `vol.key.generation`): where the tenant's records sit beside a key.
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the tenant keeps an authenticated volume's latest generation:
/// beside its key (`KEY.generation`).
pub fn generation_file(key: &Path) -> PathBuf {
    beside(key, ".generation")
}

/// Reads the tenant's generation record.
pub fn read_generation(key: &Path) -> Result<u64> {
    let path = generation_file(key);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: the tenant's record of this authenticated volume's generation (made by `ssc volume create`, \
             updated by `ssc up`). Without it a rolled-back volume cannot be detected; if it is lost and you trust \
             the volume, write the generation you last saw into it",
            path.display()
        )
    })?;
    text.trim().parse().with_context(|| format!("{} does not hold a generation number", path.display()))
}

/// Records `generation` ([`crate::durable`]: a crash leaves the old or
/// the new, and a record reported written is on disk).
pub fn write_generation(key: &Path, generation: u64) -> Result<()> {
    crate::durable::write(&generation_file(key), format!("{generation}\n").as_bytes())
}

/// `ssc volume create`: a volume file and a fresh 512-bit key (hex, mode
/// 0600) that stays with the tenant. `Native` writes the volume header
/// (layout and a key check, see `sd_storage_crypt::header`) so the SD can
/// refuse a wrong key; the data then starts at 1 MiB. `Auth` writes the
/// authenticated mode's header and the tenant's generation record.
pub fn create_volume(volume: &Path, size: u64, key_out: &Path, format: VolumeFormat) -> Result<()> {
    use ring::rand::SecureRandom;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let mut key = [0u8; 64];
    rng.fill(&mut key).map_err(|_| anyhow!("no randomness for the key"))?;
    let (mut salt, mut id) = ([0u8; 32], [0u8; 16]);
    rng.fill(&mut salt).and_then(|_| rng.fill(&mut id)).map_err(|_| anyhow!("no randomness for the header"))?;
    let header = match format {
        VolumeFormat::Raw => None,
        VolumeFormat::Native => {
            use sd_storage_crypt::header::{DEFAULT_DATA_OFFSET, VolumeHeader};
            if size <= DEFAULT_DATA_OFFSET {
                bail!("a native volume needs more than {} bytes (header and data)", DEFAULT_DATA_OFFSET);
            }
            Some(VolumeHeader::new(&key, 512, DEFAULT_DATA_OFFSET, salt, id).encode())
        }
        VolumeFormat::Auth => Some(
            sd_storage_crypt::auth::format(&key, size, salt, id)
                .map_err(|e| anyhow!("{e}: an authenticated volume needs at least 2 MiB"))?,
        ),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_out)
        .with_context(|| format!("creating key file {} (it must not exist yet)", key_out.display()))?;
    writeln!(f, "{}", catalog::hex(&key))?;
    let v = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(volume)
        .with_context(|| format!("creating volume {} (it must not exist yet)", volume.display()))?;
    v.set_len(size)?;
    if let Some(h) = header {
        std::os::unix::fs::FileExt::write_all_at(&v, &h, 0)?;
    }
    if format == VolumeFormat::Auth {
        write_generation(key_out, 1)?;
    } else if generation_file(key_out).exists() {
        // The key is new (it did not exist), so a record beside it belongs
        // to an earlier key of that name; left, it would make `ssc up` take
        // this volume for a downgraded authenticated one.
        let stale = generation_file(key_out);
        std::fs::remove_file(&stale).with_context(|| format!("removing the stale record {}", stale.display()))?;
        eprintln!("note: removed {}, a generation record left by an earlier key of that name", stale.display());
    }
    Ok(())
}

/// The header version in the volume's first sector (None: no native header).
pub fn volume_header_version(volume: &Path) -> Result<Option<u32>> {
    use std::io::Read;
    let mut b = [0u8; 12];
    let mut f = std::fs::File::open(volume).with_context(|| format!("opening volume {}", volume.display()))?;
    Ok(match f.read_exact(&mut b) {
        Ok(()) => sd_storage_crypt::header::version(&b),
        Err(_) => None,
    })
}

#[cfg(test)]
mod plan_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_point_at_the_line_of_the_chain_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chain.toml");
        std::fs::write(&p, "[catalog]\npath = \"c\"\ntrust = []\n\n[[disk]]\nvolume = 3\n").unwrap();
        let e = plan(&p).err().expect("refused").to_string();
        assert!(e.contains("chain.toml:6"), "{e}");
        std::fs::write(&p, "[catalog]\npath = \"c\"\ntrust = []\n[[disk]]\nvolume = \"v\"\nkey = \"k\"\nchain = []\n")
            .unwrap();
        let e = plan(&p).err().expect("refused").to_string();
        assert!(e.contains("chain.toml:7") && e.contains("empty chain"), "{e}");
        std::fs::write(&p, "[catalog]\npath = \"c\"\ntrust = []\nbogus = 1\n").unwrap();
        assert!(plan(&p).err().expect("refused").to_string().contains("chain.toml:4"));
    }

    #[test]
    fn created_volumes_have_a_private_64_byte_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (v, k) = (dir.path().join("v.img"), dir.path().join("v.key"));
        create_volume(&v, 2 << 20, &k, VolumeFormat::Native).unwrap();
        assert_eq!(std::fs::metadata(&v).unwrap().len(), 2 << 20);
        let header = sd_storage_crypt::header::VolumeHeader::decode(&std::fs::read(&v).unwrap()[..512]).unwrap();
        header.verify_key(&read_key(&k).unwrap()).unwrap();
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_key(&k).unwrap().len(), 64);
        assert!(
            create_volume(&v, 2 << 20, &dir.path().join("k2"), VolumeFormat::Native).is_err(),
            "an existing volume is never overwritten"
        );
    }
}
