//! Provider verbs: the provider's narrow API to the meta-domains running
//! on this host (SSC's de-privileged Sdom0).
//!
//! Every `ssc up` (the builder of one meta-domain) listens on a provider
//! socket, `<run base>/provider/<id>.sock` (mode 0600), and answers
//! exactly three verbs, one line each:
//! * `status`: the meta-domain's id, its domains (name, memory, running)
//!   and totals, as JSON: no tenant data, no keys, no console output;
//! * `stop`: clients stop, SDs shut down gracefully (volumes flushed);
//! * `destroy`: every domain is killed at once and the run directory goes.
//!
//! Nothing else is parsed: a verb that would open a memory window, a data
//! link or a tenant console does not exist, and asking for one is refused
//! by name. The tenant's own socket (beside the chain file) and Udom0's
//! TLS relay are separate; the provider is not handed either.
//!
//! Quotas (`ssc provider quotas`) live in a file the provider owns
//! (`$SSC_QUOTAS`, default `/var/lib/ssc/quotas.json`); `ssc up` refuses
//! to start a meta-domain over them, naming the limit.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::chain_checkpoint::CommandSocket;
use serde::{Deserialize, Serialize};

/// The host's provider directory, where builders run as root (or as a
/// member of the provider group) put their provider sockets.
pub const HOST_DIR: &str = "/run/ssc/provider";

/// Where this process, as a builder, puts its provider socket:
/// `$SSC_PROVIDER_DIR`, else [`HOST_DIR`] for root (the provider's admins,
/// another uid, find it there), else the user's own run base (a builder
/// run by an unprivileged developer, reachable by that user only).
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SSC_PROVIDER_DIR") {
        return PathBuf::from(d);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from(HOST_DIR);
    }
    own_dir()
}

fn own_dir() -> PathBuf {
    crate::builder::RunDir::base().join("provider")
}

/// Where the provider verbs look for builders: `$SSC_PROVIDER_DIR`, else
/// [`HOST_DIR`] and this user's own run base.
pub fn dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("SSC_PROVIDER_DIR") {
        return vec![PathBuf::from(d)];
    }
    let mut v = vec![PathBuf::from(HOST_DIR)];
    if !rustix::process::geteuid().is_root() {
        v.push(own_dir());
    }
    v
}

/// Makes the provider directory: 0750 and group [`crate::roles::PROVIDER_GROUP`]
/// when that group exists and we may give it the directory (root), else
/// 0700. Returns the gid the sockets are to be shared with.
fn make_dir(d: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = d.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
    }
    match std::fs::create_dir(d) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("creating {}", d.display()));
        }
        _ => {}
    }
    let meta = std::fs::symlink_metadata(d)?;
    if !meta.is_dir() {
        bail!("{} is not a directory: refusing to put provider sockets there", d.display());
    }
    let group = crate::roles::group_gid(crate::roles::PROVIDER_GROUP).filter(|_| rustix::process::geteuid().is_root());
    match group {
        Some(g) => {
            rustix::fs::chown(d, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::from_raw(g)))
                .with_context(|| format!("giving {} to group {}", d.display(), crate::roles::PROVIDER_GROUP))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))?;
        }
        None => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?,
    }
    Ok(group)
}

/// What a provider may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Status,
    Stop,
    Destroy,
}

/// Parses one request line; anything but the three verbs is refused, and
/// what would reach into the meta-domain is refused by name.
pub fn parse(line: &str) -> std::result::Result<Verb, String> {
    let word = line.split_whitespace().next().unwrap_or_default();
    match word {
        "status" => Ok(Verb::Status),
        "stop" => Ok(Verb::Stop),
        "destroy" => Ok(Verb::Destroy),
        "window" | "memory" | "map" | "mem-read" | "mem-write" => Err(format!(
            "refused: `{word}`: provider verbs cannot open memory windows on a tenant's domains \
             (only Udom0's grants do, checked by the builder)"
        )),
        "link" | "nbd" | "attach" | "relay" => {
            Err(format!("refused: `{word}`: provider verbs cannot open or read a tenant's data links"))
        }
        "console" | "log" | "serial" | "monitor" => {
            Err(format!("refused: `{word}`: provider verbs cannot open a tenant's consoles or monitors"))
        }
        other => Err(format!("refused: `{other}`: the provider verbs are status, stop and destroy")),
    }
}

/// One domain as the provider sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainStatus {
    pub name: String,
    pub memory_mib: u32,
    pub running: bool,
}

/// A meta-domain as the provider sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub pid: u32,
    /// Whether the meta-domain has a Udom0 (attested launch).
    pub attested: bool,
    pub uptime_s: u64,
    pub memory_mib: u32,
    pub domains: Vec<DomainStatus>,
}

/// The builder's end: the provider socket of one meta-domain (a command
/// socket like the tenant's, with its own narrow dispatcher).
pub struct Socket {
    commands: CommandSocket,
    pub id: String,
    started: Instant,
}

impl Socket {
    /// Binds `<dir>/<meta>-<pid>.sock`: shared with the provider group
    /// where it exists (see [`make_dir`]), else private to the builder's
    /// user.
    pub fn bind(meta: &str) -> Result<Socket> {
        let d = dir();
        let group = make_dir(&d)?;
        let id = format!("{meta}-{}", std::process::id());
        let commands = CommandSocket::bind_for(d.join(format!("{id}.sock")), group)?;
        Ok(Socket { commands, id, started: Instant::now() })
    }

    /// Serves at most one pending request; returns `stop` or `destroy`
    /// for the caller to carry out (after the reply went out).
    pub fn poll<'d>(
        &mut self,
        domains: impl Iterator<Item = &'d mut crate::builder::Domain>,
        attested: bool,
    ) -> Option<Verb> {
        let (id, uptime_s) = (self.id.clone(), self.started.elapsed().as_secs());
        let mut domains = Some(domains);
        let mut verb = None;
        self.commands.poll_admitting(crate::roles::admit_provider, |line, _| match parse(line) {
            Ok(Verb::Status) => {
                let domains: Vec<DomainStatus> = domains
                    .take()
                    .into_iter()
                    .flatten()
                    .map(|d| DomainStatus { name: d.name.clone(), memory_mib: d.mem_mib, running: d.running() })
                    .collect();
                let status = Status {
                    id: id.clone(),
                    pid: std::process::id(),
                    attested,
                    uptime_s,
                    memory_mib: domains.iter().map(|d| d.memory_mib).sum(),
                    domains,
                };
                Ok(serde_json::to_string(&status)?)
            }
            Ok(v @ Verb::Stop) => {
                verb = Some(v);
                Ok("stopping: clients stop, SDs shut down".into())
            }
            Ok(v @ Verb::Destroy) => {
                verb = Some(v);
                Ok("destroying: every domain is killed".into())
            }
            Err(e) => {
                eprintln!("ssc up: provider request {e}");
                Err(anyhow!(e))
            }
        });
        verb
    }
}

/// The ids of the meta-domains whose builder is alive (their socket
/// accepts a connection); sockets of dead builders are removed.
pub fn running() -> Vec<String> {
    let mut out = vec![];
    for d in dirs() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".sock") else { continue };
            match UnixStream::connect(e.path()) {
                Ok(_) => out.push(id.to_string()),
                // Nobody listens: the builder died; its socket goes (if ours).
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                    let _ = std::fs::remove_file(e.path());
                }
                Err(_) => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn denied(path: &Path) -> anyhow::Error {
    anyhow!(
        "{}: permission denied: the provider verbs are for members of group `{}`",
        path.display(),
        crate::roles::PROVIDER_GROUP
    )
}

/// Sends one line to meta-domain `id`'s provider socket. A builder still
/// starting its domains answers once they are up.
pub fn request(id: &str, line: &str) -> Result<String> {
    let mut stream = None;
    for d in dirs() {
        let path = d.join(format!("{id}.sock"));
        match UnixStream::connect(&path) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(denied(&path)),
            Err(_) => {}
        }
    }
    let stream =
        stream.ok_or_else(|| anyhow!("no meta-domain `{id}` runs here (`ssc provider list` shows the ids)"))?;
    crate::chain_checkpoint::exchange(&stream, line, Duration::from_secs(300), &mut |_, _| {})
}

/// Every meta-domain running here, with its status.
pub fn list() -> Result<Vec<Status>> {
    // The host's builders are out of reach, and this user runs none.
    let host = Path::new(HOST_DIR);
    if let Err(e) = std::fs::read_dir(host)
        && e.kind() == std::io::ErrorKind::PermissionDenied
        && dirs().iter().all(|d| d == host || !d.exists())
    {
        return Err(denied(host));
    }
    let mut out = vec![];
    for id in running() {
        let json = request(&id, "status")?;
        out.push(serde_json::from_str(&json).with_context(|| format!("status of `{id}`"))?);
    }
    Ok(out)
}

/// The provider's limits on meta-domains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Meta-domains running at once on this host.
    pub max_meta_domains: Option<u32>,
    /// Memory of one meta-domain (all its domains), MiB.
    pub max_memory_mib: Option<u32>,
    /// Domains of one meta-domain (Udom0, SDs, clients).
    pub max_domains: Option<u32>,
}

/// The quota file.
pub fn quotas_file() -> PathBuf {
    std::env::var_os("SSC_QUOTAS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/ssc/quotas.json"))
}

impl Quotas {
    /// The quotas in `path`, or none if it does not exist.
    pub fn read(path: &Path) -> Result<Quotas> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a quota file (`ssc provider quotas --help`)", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Quotas::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        // Readable by every builder (a non-root `ssc up` checks quotas too).
        crate::durable::write_public(path, (serde_json::to_string_pretty(self)? + "\n").as_bytes())
    }

    /// Refuses a meta-domain of `domains` domains and `memory_mib` MiB
    /// when `running` meta-domains already run.
    pub fn check(&self, running: usize, domains: u32, memory_mib: u32) -> Result<()> {
        let file = quotas_file();
        let over = |what: String| anyhow!("over the provider's quota: {what} (quotas: {})", file.display());
        if let Some(m) = self.max_meta_domains
            && running as u32 >= m
        {
            return Err(over(format!("{running} meta-domain(s) run already, the limit is {m}")));
        }
        if let Some(m) = self.max_domains
            && domains > m
        {
            return Err(over(format!("this meta-domain has {domains} domains, the limit is {m}")));
        }
        if let Some(m) = self.max_memory_mib
            && memory_mib > m
        {
            return Err(over(format!("this meta-domain needs {memory_mib} MiB, the limit is {m} MiB")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_three_verbs_and_reaching_in_is_refused_by_name() {
        assert_eq!(parse("status"), Ok(Verb::Status));
        assert_eq!(parse("stop"), Ok(Verb::Stop));
        assert_eq!(parse("destroy"), Ok(Verb::Destroy));
        for (line, want) in [
            ("window client", "memory windows"),
            ("mem-read client", "memory windows"),
            ("link storage-crypt-0 nbd", "data links"),
            ("relay", "data links"),
            ("console client", "consoles"),
            ("monitor", "consoles"),
            ("grant introspect client mem-read", "status, stop and destroy"),
            ("", "status, stop and destroy"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn quotas_name_the_limit_and_a_missing_file_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("q.json");
        assert_eq!(Quotas::read(&f).unwrap(), Quotas::default());
        let q = Quotas { max_meta_domains: Some(2), max_memory_mib: Some(1024), max_domains: Some(4) };
        q.write(&f).unwrap();
        let q = Quotas::read(&f).unwrap();
        q.check(1, 4, 1024).unwrap();
        assert!(q.check(2, 1, 1).unwrap_err().to_string().contains("2 meta-domain(s) run already, the limit is 2"));
        assert!(q.check(0, 5, 1).unwrap_err().to_string().contains("5 domains, the limit is 4"));
        assert!(q.check(0, 1, 2048).unwrap_err().to_string().contains("2048 MiB, the limit is 1024 MiB"));
        std::fs::write(&f, "{\"max_cpus\": 3}").unwrap();
        assert!(format!("{:#}", Quotas::read(&f).unwrap_err()).contains("not a quota file"));
    }
}
