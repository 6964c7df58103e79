//! Checkpoints of a chain's client: the `[checkpoint]` section of a chain
//! file, the tenant's record of checkpoints, the command socket through
//! which `ssc checkpoint save` reaches a running `ssc up`, and restore at
//! start (`ssc up --restore`).
//!
//! ```toml
//! [checkpoint]
//! disk = "checkpoints.img"   # the provider's disk for sealed checkpoints (created if missing)
//! key = "checkpoint.key"     # tenant key (hex, 64 bytes; `ssc volume create` makes one)
//! # compress = false         # lz4 (default true)
//! ```
//!
//! The record (`KEY.checkpoints`, JSON, kept with the key) lists every
//! stream on the disk — generation, place, the chain it is a delta of —
//! and the generations already restored: restoring one twice replays its
//! RNG state and one-time secrets, so it is refused unless the tenant says
//! `--allow-rollback`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::builder::{Domain, LinkSpec, MetaDomain, WindowSpec};
use crate::catalog::VerifiedImage;
use crate::checkpoint::{self, SaveRequest, Stream};
use crate::qemu::Accel;

/// The chain file's `[checkpoint]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub disk: PathBuf,
    pub key: PathBuf,
    pub compress: Option<bool>,
    pub volume_key: Option<PathBuf>,
}

/// A checked `[checkpoint]`.
pub struct CheckpointPlan {
    pub image: VerifiedImage,
    /// The storage SD the streams go through, and its volume.
    pub through: Option<crate::chain::PlannedDisk>,
    pub disk: PathBuf,
    pub key: Vec<u8>,
    pub key_path: PathBuf,
    pub compress: bool,
}

/// One stream in the record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub generation: u64,
    pub at: u64,
    pub length: u64,
    /// Generations of the chain it is a delta against (full first).
    pub base: Vec<u64>,
    pub memory_mib: u32,
}

/// The tenant's record of checkpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// Hex, 16 bytes: binds every stream to this client.
    pub client_id: String,
    pub entries: Vec<Entry>,
    pub restored: Vec<u64>,
}

impl Record {
    pub fn path(key: &Path) -> PathBuf {
        crate::chain::beside(key, ".checkpoints")
    }

    /// Loads the record, or starts one with a fresh client id.
    pub fn load(key: &Path) -> Result<Record> {
        let path = Record::path(key);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("{} is not a checkpoint record", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut id = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .map_err(|_| anyhow!("no randomness for the client id"))?;
                Ok(Record { client_id: crate::catalog::hex(&id), ..Record::default() })
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the record atomically (a crash leaves the old or the new).
    pub fn store(&self, key: &Path) -> Result<()> {
        crate::durable::write(&Record::path(key), serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub fn client(&self) -> Result<[u8; 16]> {
        let b = crate::catalog::unhex(&self.client_id).context("client id")?;
        b.try_into().map_err(|_| anyhow!("the record's client id is not 16 bytes"))
    }

    fn entry(&self, generation: u64) -> Option<&Entry> {
        self.entries.iter().find(|e| e.generation == generation)
    }

    /// The streams that restore `generation` (its base chain, then itself).
    pub fn chain(&self, generation: u64) -> Result<Vec<Stream>> {
        let e =
            self.entry(generation).ok_or_else(|| anyhow!("no checkpoint of generation {generation} in the record"))?;
        let mut out = vec![];
        for g in e.base.iter().chain([&generation]) {
            let b = self
                .entry(*g)
                .ok_or_else(|| anyhow!("generation {generation} needs {g}, which is not in the record"))?;
            out.push(Stream { generation: b.generation, at: b.at, length: b.length });
        }
        Ok(out)
    }

    fn next_generation(&self) -> u64 {
        self.entries.iter().map(|e| e.generation).max().unwrap_or(0) + 1
    }

    fn next_offset(&self) -> u64 {
        self.entries.iter().map(|e| (e.at + e.length).next_multiple_of(4096)).max().unwrap_or(0)
    }

    /// Which generation `--restore` means, refusing a second restore of the
    /// same one without `allow_rollback`.
    pub fn choose(&self, choice: &str, allow_rollback: bool) -> Result<u64> {
        let g = match choice {
            "latest" => self.entries.iter().map(|e| e.generation).max().ok_or_else(|| anyhow!("no checkpoints yet"))?,
            n => n.parse().map_err(|_| anyhow!("--restore takes a generation number or `latest`, not `{n}`"))?,
        };
        self.entry(g).ok_or_else(|| anyhow!("no checkpoint of generation {g} in the record"))?;
        if self.restored.contains(&g) && !allow_rollback {
            bail!(
                "generation {g} was already restored once; restoring it again replays its RNG state and one-time \
                 secrets. Pass --allow-rollback if you mean it"
            );
        }
        Ok(g)
    }
}

/// The checkpoint SD of a running chain and what it has saved.
pub struct Session {
    pub plan_disk: PathBuf,
    pub key: Vec<u8>,
    pub key_path: PathBuf,
    pub compress: bool,
    pub memory: PathBuf,
    pub memory_mib: u32,
    pub sd_name: String,
    /// The chain the running client descends from (empty after a fresh boot).
    pub lineage: Vec<u64>,
}

/// Starts the checkpoint SD beside the client (its window on `memory`,
/// writable only in a session that restores), and first the storage SD it
/// writes through, if the plan has one.
pub fn start_sd(
    plan: &CheckpointPlan,
    sds: &mut MetaDomain,
    (accel, echo): (Accel, bool),
    scratch: &Path,
    (memory, memory_mib): (&Path, u32),
    restore: bool,
) -> Result<Session> {
    let mut spec = plan.image.spec("checkpoint");
    if let Some(d) = &plan.through {
        let socket = crate::chain::start_disk_sds(d, "checkpoint", sds, (accel, echo, false), scratch)?;
        spec.links.push(LinkSpec::connect("down", &socket));
    } else if !plan.disk.exists() {
        std::fs::File::create(&plan.disk)
            .and_then(|f| f.set_len((u64::from(memory_mib) * 8 + 64) << 20))
            .with_context(|| format!("creating checkpoint disk {}", plan.disk.display()))?;
        eprintln!("ssc up: created checkpoint disk {} (sparse)", plan.disk.display());
    }
    if plan.through.is_none() {
        spec.disks.push(plan.disk.clone());
    }
    // Read-only unless this session restores: only a restore writes the
    // client's memory, and a session that only saves never holds a write
    // grant over it.
    spec.windows.push(WindowSpec { file: memory.to_path_buf(), writable: restore });
    let dom = sds.start(&spec, accel, echo, Duration::from_secs(60))?;
    // The client id is fixed by the first record written (now, if new).
    let record = Record::load(&plan.key_path)?;
    record.store(&plan.key_path)?;
    checkpoint::configure(dom, record.client()?, &plan.key)?;
    Ok(Session {
        plan_disk: plan.disk.clone(),
        key: plan.key.clone(),
        key_path: plan.key_path.clone(),
        compress: plan.compress,
        memory: memory.to_path_buf(),
        memory_mib,
        sd_name: "checkpoint".into(),
        lineage: vec![],
    })
}

impl Session {
    /// Restores `generation` into `client` (started with `-incoming defer`).
    pub fn restore(&mut self, client: &Domain, sds: &mut MetaDomain, scratch: &Path, generation: u64) -> Result<()> {
        let mut record = Record::load(&self.key_path)?;
        let streams = record.chain(generation)?;
        let sd = sds.domain(&self.sd_name).context("the checkpoint SD is gone")?;
        eprintln!("ssc up: restoring generation {generation} ({} stream(s))…", streams.len());
        let mut show = progress_lines("ssc up: restore (verify, then write)");
        let took = checkpoint::restore(client, sd, scratch, &streams, &mut show)?;
        record.restored.push(generation);
        record.store(&self.key_path)?;
        self.lineage = streams.iter().map(|s| s.generation).collect();
        eprintln!("ssc up: restored generation {generation} in {:.1} s; the client runs on", took.as_secs_f64());
        // The SD that restored keeps its writable window for the rest of
        // the session: restarting it read-only would be a second measured
        // launch of `checkpoint`, which the tenant's verifier (rightly)
        // takes for a substitution, and would lose the page hashes that
        // bind the next delta to the restored generation.
        Ok(())
    }

    /// Saves the running client: a delta of its lineage, or full;
    /// `progress` sees the SD's scan of memory.
    pub fn save(
        &mut self,
        client: &Domain,
        sds: &mut MetaDomain,
        scratch: &Path,
        full: bool,
        progress: checkpoint::ProgressFn<'_>,
    ) -> Result<String> {
        let mut record = Record::load(&self.key_path)?;
        let generation = record.next_generation();
        let at = record.next_offset();
        let full = full || self.lineage.is_empty() || self.lineage.len() >= 16;
        let base: Vec<Stream> = if full { vec![] } else { record.chain(*self.lineage.last().expect("not empty"))? };
        let sd = sds.domain(&self.sd_name).context("the checkpoint SD is gone")?;
        let req = SaveRequest { generation, at, base: &base, compress: self.compress, leave_paused: false };
        let saved = checkpoint::save(client, &self.memory, sd, scratch, req, progress)?;
        record.entries.push(Entry {
            generation,
            at,
            length: saved.stream.length,
            base: base.iter().map(|s| s.generation).collect(),
            memory_mib: self.memory_mib,
        });
        record.store(&self.key_path)?;
        if full {
            self.lineage.clear();
        }
        self.lineage.push(generation);
        Ok(format!(
            "generation {generation} ({}): {} pages stored of {} read, {:.1} MiB on {}, client paused {:.2} s",
            if full { "full".to_string() } else { format!("delta of {}", base.len()) },
            saved.pages_stored,
            saved.pages_read,
            saved.stream.length as f64 / (1 << 20) as f64,
            self.plan_disk.display(),
            saved.paused.as_secs_f64()
        ))
    }
}

/// A progress callback that prints `what: N% (done of total MiB)` to
/// stderr each time another tenth of the way is done.
pub fn progress_lines(what: &str) -> impl FnMut(u64, u64) + use<'_> {
    let mut shown = 0;
    move |done, total| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if percent / 10 > shown {
            shown = percent / 10;
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            eprintln!("{what}: {percent}% ({:.0} of {:.0} MiB)", mib(done), mib(total));
        }
    }
}

/// Where `ssc up` listens for commands about `chain`.
pub fn socket_path(chain: &Path) -> PathBuf {
    crate::chain::beside(chain, ".sock")
}

/// The command socket of a running `ssc up` (mode 0600, removed on drop).
pub struct CommandSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Whether `monitor` is served (the chain has an introspection SD).
    pub monitor: bool,
    /// Connections that sent `monitor`: each gets every event line.
    subscribers: Vec<UnixStream>,
}

impl CommandSocket {
    pub fn bind(chain: &Path) -> Result<CommandSocket> {
        let path = socket_path(chain);
        if path.exists() && UnixStream::connect(&path).is_ok() {
            bail!("{} is in use: another `ssc up` runs this chain", path.display());
        }
        Self::bind_at(path)
    }

    /// Binds `path` (replacing a stale socket), mode 0600, non-blocking.
    pub fn bind_at(path: PathBuf) -> Result<CommandSocket> {
        Self::bind_for(path, None)
    }

    /// Binds `path` (replacing a stale socket), non-blocking: mode 0600,
    /// or 0660 with group `group` (whose members may then connect).
    pub fn bind_for(path: PathBuf, group: Option<u32>) -> Result<CommandSocket> {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some(g) = group {
            rustix::fs::chown(&path, None, Some(rustix::fs::Gid::from_raw(g)))
                .with_context(|| format!("giving {} to gid {g}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
        }
        listener.set_nonblocking(true)?;
        Ok(CommandSocket { listener, path, monitor: false, subscribers: Vec::new() })
    }

    /// Serves at most one pending command with `f`: one line in; out, any
    /// number of `progress DONE TOTAL` lines (`f` sends them through its
    /// second argument), then one `ok …` or `error …` line.
    pub fn poll(&mut self, f: impl FnMut(&str, checkpoint::ProgressFn<'_>) -> Result<String>) {
        self.poll_admitting(|_| Ok(()), f)
    }

    /// [`CommandSocket::poll`], serving a connection only if `admit` lets
    /// its peer in; a refused peer gets `error` and the refusal.
    pub fn poll_admitting(
        &mut self,
        admit: impl FnOnce(&UnixStream) -> std::result::Result<(), String>,
        mut f: impl FnMut(&str, checkpoint::ProgressFn<'_>) -> Result<String>,
    ) {
        let Ok((stream, _)) = self.listener.accept() else { return };
        let _ = stream.set_nonblocking(false);
        if let Err(why) = admit(&stream) {
            eprintln!("ssc up: {why}");
            let _ = (&stream).write_all(format!("error {why}\n").as_bytes());
            return;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        // Nothing at all (a peer checking that someone listens): no reply.
        if reader.read_line(&mut line).is_err() || line.is_empty() {
            return;
        }
        if self.monitor && line.trim() == "monitor" {
            if (&stream).write_all(b"ok monitoring\n").is_ok() {
                // A monitor that stops reading is dropped, not waited for.
                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                self.subscribers.push(stream);
            }
            return;
        }
        let mut progress = |done: u64, total: u64| {
            let _ = (&stream).write_all(format!("progress {done} {total}\n").as_bytes());
        };
        let reply = match f(line.trim(), &mut progress) {
            Ok(msg) => format!("ok {msg}\n"),
            Err(e) => format!("error {e:#}\n").replace('\n', " ").trim_end().to_string() + "\n",
        };
        let _ = (&stream).write_all(reply.as_bytes());
    }
}

impl CommandSocket {
    /// Sends `event LINE` to every `monitor` connection; drops the ones
    /// that went away.
    pub fn broadcast(&mut self, line: &str) {
        let msg = format!("event {line}\n");
        self.subscribers.retain(|s| (&*s).write_all(msg.as_bytes()).is_ok());
    }
}

impl Drop for CommandSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `ssc checkpoint save`: asks the `ssc up` running `chain` to save;
/// `progress` sees the progress lines before the answer.
pub fn request(chain: &Path, command: &str, progress: checkpoint::ProgressFn<'_>) -> Result<String> {
    let path = socket_path(chain);
    let stream = UnixStream::connect(&path).with_context(|| {
        format!("no `ssc up {}` is running (nothing listens on {})", chain.display(), path.display())
    })?;
    exchange(&stream, command, Duration::from_secs(900), progress)
}

/// One command on a connected command socket: its progress lines, then
/// its `ok …` (the answer) or `error …`.
pub fn exchange(
    stream: &UnixStream,
    command: &str,
    timeout: Duration,
    progress: checkpoint::ProgressFn<'_>,
) -> Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    (&*stream).write_all(format!("{command}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut reply = String::new();
        reader.read_line(&mut reply)?;
        match reply.trim_end().split_once(' ') {
            Some(("progress", nums)) => {
                let mut n = nums.split(' ').filter_map(|x| x.parse::<u64>().ok());
                if let (Some(done), Some(total)) = (n.next(), n.next()) {
                    progress(done, total);
                }
            }
            Some(("ok", msg)) => return Ok(msg.to_string()),
            Some(("error", msg)) => bail!("{msg}"),
            _ => bail!("`ssc up` answered nothing (it may have stopped)"),
        }
    }
}
