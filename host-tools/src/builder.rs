//! The domain builder: turns a domain spec into a QEMU process with the
//! project's device conventions, and owns its lifetime.
//!
//! Devices of every domain (see docs/architecture.md, "How domains are
//! wired"):
//! * console: COM1 on QEMU's stdout, read line by line (the image's log);
//! * control link: a `virtserialport` named `ctl` whose host side is a unix
//!   socket in the run directory; the builder connects to it and speaks the
//!   `ssc-abi` frames (Hello, Ready, Ping/Pong, Shutdown);
//! * data links: `virtserialport`s named by the spec, each a unix socket
//!   that QEMU listens on (`server=on,wait=off`) for a peer to connect;
//! * disks: `virtio-blk-pci` on raw files;
//! * QMP on a unix socket in the run directory, for a clean `quit`;
//! * `isa-debug-exit` at 0xf4 so the image's verdict is QEMU's exit status.
//!
//! Cleanup: QEMU runs under `setpriv --pdeathsig KILL`, so it dies with the
//! builder even on a crash; dropping a [`Domain`] quits or kills QEMU and
//! removes the sockets it created; dropping a [`RunDir`] removes the run
//! directory, and [`RunDir::create`] sweeps directories left by builders
//! that died. Ctrl-C makes every wait return an error, so the drops run.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ssc_abi::{Body, Envelope, FrameDecoder};

use crate::qemu::{Accel, Firmware, ImageExit, Machine, QEMU};

/// Name of the control link every domain gets.
pub const CONTROL_LINK: &str = "ctl";

/// A named data link and its unix socket: QEMU listens on it, or (for
/// `connect`) connects to another domain's listening link — how one SD's
/// `down` reaches the next SD's `nbd` in a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpec {
    pub name: String,
    pub socket: PathBuf,
    pub connect: bool,
}

impl LinkSpec {
    /// A link QEMU listens on (the usual case).
    pub fn listen(name: &str, socket: &Path) -> Self {
        LinkSpec { name: name.into(), socket: socket.into(), connect: false }
    }

    /// A link QEMU connects to at start (the peer must be listening).
    pub fn connect(name: &str, socket: &Path) -> Self {
        LinkSpec { name: name.into(), socket: socket.into(), connect: true }
    }
}

impl std::str::FromStr for LinkSpec {
    type Err = anyhow::Error;

    /// `NAME=SOCKET`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, socket) = s.split_once('=').ok_or_else(|| anyhow!("link `{s}` is not NAME=SOCKET"))?;
        validate_link_name(name)?;
        if socket.is_empty() {
            bail!("link `{name}` has an empty socket path");
        }
        Ok(LinkSpec::listen(name, Path::new(socket)))
    }
}

fn validate_link_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        bail!("link name `{name}` must be 1-64 characters of a-z, 0-9, `.`, `_`, `-`");
    }
    if name == CONTROL_LINK {
        bail!("link name `{CONTROL_LINK}` is reserved for the builder's control link");
    }
    Ok(())
}

/// Another domain's memory (a shared memory file) attached as an
/// `ivshmem-plain` device: BAR2 is the file. Read-only unless `writable`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub file: PathBuf,
    pub writable: bool,
}

impl std::str::FromStr for WindowSpec {
    type Err = anyhow::Error;

    /// `FILE` (read-only) or `FILE:rw`.
    fn from_str(s: &str) -> Result<Self> {
        let (file, writable) = match s.strip_suffix(":rw") {
            Some(f) => (f, true),
            None => (s.strip_suffix(":ro").unwrap_or(s), false),
        };
        if file.is_empty() {
            bail!("window `{s}` names no file");
        }
        Ok(WindowSpec { file: file.into(), writable })
    }
}

/// Creates a guest's memory file (private to the builder, sized, sparse),
/// so that windows on it can be attached before the guest's QEMU starts.
pub fn create_memory_file(f: &Path, mem_mib: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(f)
        .and_then(|file| file.set_len(u64::from(mem_mib) << 20))
        .with_context(|| format!("creating memory file {}", f.display()))
}

fn window_size(w: &WindowSpec) -> Result<u64> {
    let len = std::fs::metadata(&w.file).with_context(|| format!("memory window {}", w.file.display()))?.len();
    if len < 4096 || !len.is_power_of_two() {
        bail!(
            "memory window {} is {len} bytes; an ivshmem BAR needs a power of two of at least 4 KiB (`truncate -s 64M FILE`)",
            w.file.display()
        );
    }
    Ok(len)
}

/// A disk served over NBD (by a storage SD's upstream link): QEMU's own NBD
/// client attaches it as a plain virtio-blk device of the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdDisk {
    pub socket: PathBuf,
    pub export: String,
}

/// Everything the builder needs to start one domain.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub name: String,
    pub image: PathBuf,
    pub mem_mib: u32,
    pub disks: Vec<PathBuf>,
    pub links: Vec<LinkSpec>,
    /// Memory windows, in PCI order.
    pub windows: Vec<WindowSpec>,
    /// Disks served over NBD, after `disks` in PCI order.
    pub nbd_disks: Vec<NbdDisk>,
    /// An initramfs (Linux clients).
    pub initrd: Option<PathBuf>,
    /// Extra QEMU arguments, appended last (benchmark baselines such as
    /// QEMU's own LUKS driver).
    pub extra_args: Vec<String>,
    /// Extra kernel command line (`-append`), e.g. `ssc.log=debug`.
    pub append: String,
    pub machine: Machine,
    pub firmware: Firmware,
    /// The domain's RAM as a shared memory file (`share=on`), so granted
    /// SDs can map it as a window and QEMU's migration can skip it
    /// (`x-ignore-shared`). File offset = guest-physical address.
    pub memory_file: Option<PathBuf>,
    /// The image's catalog digest (hex SHA-384): [`MetaDomain::start`]
    /// refuses to launch other bytes.
    pub sha384: Option<String>,
}

impl DomainSpec {
    pub fn new(name: &str, image: &Path) -> Self {
        DomainSpec {
            name: name.into(),
            image: image.into(),
            mem_mib: 128,
            disks: vec![],
            links: vec![],
            windows: vec![],
            nbd_disks: vec![],
            initrd: None,
            extra_args: vec![],
            append: String::new(),
            machine: Machine::Q35,
            firmware: Firmware::Auto,
            memory_file: None,
            sha384: None,
        }
    }
}

/// QEMU option values separate fields with commas; a literal comma is `,,`.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU command line for a domain (without the binary).
pub fn qemu_args(spec: &DomainSpec, accel: Accel, run_dir: &Path) -> Vec<OsString> {
    let mut a: Vec<String> = vec![];
    let (_, bios) = spec.firmware.resolve();
    let machine = match &spec.memory_file {
        Some(_) => format!("{},memory-backend=mem", spec.machine.name()),
        None => spec.machine.name().into(),
    };
    a.extend(["-name".into(), spec.name.clone(), "-machine".into(), machine]);
    if let Some(f) = &spec.memory_file {
        a.extend([
            "-object".into(),
            format!("memory-backend-file,id=mem,size={}M,mem-path={},share=on", spec.mem_mib, opt_path(f)),
        ]);
    }
    if let Some(b) = bios {
        a.extend(["-bios".into(), opt_path(&b)]);
    }
    a.extend(accel.args().map(String::from));
    a.extend(["-m".into(), format!("{}M", spec.mem_mib), "-smp".into(), "1".into()]);
    a.extend(
        ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"].map(String::from),
    );
    a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", opt_path(&qmp_socket(run_dir, &spec.name)))]);
    a.extend(["-device".into(), "isa-debug-exit,iobase=0xf4,iosize=1".into()]);
    for (i, d) in spec.disks.iter().enumerate() {
        a.extend(["-drive".into(), format!("file={},format=raw,if=none,id=disk{i}", opt_path(d))]);
        a.extend(["-device".into(), format!("virtio-blk-pci,drive=disk{i}")]);
    }
    for (i, d) in spec.nbd_disks.iter().enumerate() {
        a.extend([
            "-blockdev".into(),
            format!(
                "driver=nbd,server.type=unix,server.path={},export={},node-name=nbd{i}",
                opt_path(&d.socket),
                d.export.replace(',', ",,")
            ),
        ]);
        a.extend(["-device".into(), format!("virtio-blk-pci,drive=nbd{i}")]);
    }
    for (i, w) in spec.windows.iter().enumerate() {
        let size = window_size(w).map(|b| b >> 10).unwrap_or(0);
        let ro = if w.writable { "" } else { ",readonly=on" };
        a.extend([
            "-object".into(),
            format!("memory-backend-file,id=win{i},share=on,mem-path={},size={size}K{ro}", opt_path(&w.file)),
        ]);
        a.extend(["-device".into(), format!("ivshmem-plain,memdev=win{i}")]);
    }
    // Port 0 is reserved for a console; ports 1.. carry ctl and the links.
    a.extend(["-device".into(), format!("virtio-serial-pci,id=vser0,max_ports={}", spec.links.len() + 2)]);
    let ctl = control_socket(run_dir, &spec.name);
    let mut ports = vec![(CONTROL_LINK.to_string(), ctl, false)];
    ports.extend(spec.links.iter().map(|l| (l.name.clone(), l.socket.clone(), l.connect)));
    for (i, (name, sock, connect)) in ports.iter().enumerate() {
        let mode = if *connect { "server=off" } else { "server=on,wait=off" };
        a.extend(["-chardev".into(), format!("socket,id=port{i},path={},{mode}", opt_path(sock))]);
        a.extend(["-device".into(), format!("virtserialport,bus=vser0.0,chardev=port{i},name={name}")]);
    }
    a.extend(["-kernel".into(), opt_path(&spec.image)]);
    if let Some(initrd) = &spec.initrd {
        a.extend(["-initrd".into(), opt_path(initrd)]);
    }
    a.extend(spec.extra_args.iter().cloned());
    if !spec.append.is_empty() {
        a.extend(["-append".into(), spec.append.clone()]);
    }
    a.into_iter().map(OsString::from).collect()
}

fn qmp_socket(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.qmp"))
}

fn control_socket(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.ctl"))
}

/// Checks that `path` is an image QEMU can boot by PVH: a 64-bit x86-64
/// `EXEC` ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note, not truncated. A Linux
/// bzImage (a client VM's kernel) is accepted too.
pub fn check_image(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(());
    }
    let fail =
        |why: &str| anyhow!("{} is not a bootable SSC image: {why}; rebuild it with `make images`", path.display());
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(fail("no ELF header"));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(fail("not a 64-bit little-endian ELF"));
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    if u16_at(16) != Some(2) {
        return Err(fail("not an EXEC (static, non-relocatable) ELF"));
    }
    if u16_at(18) != Some(62) {
        return Err(fail("not an x86-64 ELF"));
    }
    let phoff = u64_at(32).ok_or_else(|| fail("truncated"))? as usize;
    let phentsize = u16_at(54).ok_or_else(|| fail("truncated"))? as usize;
    let phnum = u16_at(56).ok_or_else(|| fail("truncated"))? as usize;
    let mut has_pvh = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (Some(kind), Some(off), Some(filesz)) = (u32_at(ph), u64_at(ph + 8), u64_at(ph + 32)) else {
            return Err(fail("program headers run past the end of the file (truncated)"));
        };
        let (off, filesz) = (off as usize, filesz as usize);
        if off.checked_add(filesz).is_none_or(|end| end > bytes.len()) {
            return Err(fail("a segment runs past the end of the file (truncated)"));
        }
        if kind == 4 {
            let mut n = off;
            while n + 12 <= off + filesz {
                let (namesz, descsz, ty) =
                    (u32_at(n).unwrap() as usize, u32_at(n + 4).unwrap() as usize, u32_at(n + 8).unwrap());
                let name = bytes.get(n + 12..n + 12 + namesz).unwrap_or(&[]);
                if ty == 18 && name.starts_with(b"Xen") {
                    has_pvh = true;
                }
                n += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
            }
        }
    }
    if !has_pvh {
        return Err(fail("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"));
    }
    Ok(())
}

/// A file's bytes, read once and frozen in a sealed memfd that QEMU opens
/// as `/dev/fd/N`: what the builder measured (or checked against the
/// catalog) is exactly what QEMU runs. Handing QEMU the path instead let
/// whoever can write it swap the image between the measurement and QEMU's
/// own open. The memfd is not close-on-exec, so the QEMU spawned while it
/// is open inherits it (and keeps it after this handle is dropped).
#[derive(Debug)]
pub struct PinnedFile {
    file: std::fs::File,
}

impl PinnedFile {
    /// Reads `path` once; returns the pinned copy and the bytes read.
    pub fn read(path: &Path) -> Result<(PinnedFile, Vec<u8>)> {
        use std::io::Write;
        use std::os::fd::AsFd;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let fd = rustix::fs::memfd_create("ssc-pinned-image", rustix::fs::MemfdFlags::ALLOW_SEALING)
            .context("memfd_create for a pinned image")?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&bytes).context("copying an image into its memfd")?;
        use rustix::fs::SealFlags;
        rustix::fs::fcntl_add_seals(
            file.as_fd(),
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .context("sealing a pinned image")?;
        Ok((PinnedFile { file }, bytes))
    }

    /// The path QEMU opens: this process's descriptor, which it inherits.
    pub fn qemu_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/dev/fd/{}", self.file.as_raw_fd()))
    }
}

static RUN_DIRS: AtomicU64 = AtomicU64::new(0);
/// The file that marks a directory as one [`RunDir::create_in`] made.
const RUN_DIR_MARK: &str = ".ssc-run-dir";

/// A private directory (mode 0700) for one builder run's sockets. Removed on
/// drop; directories of dead builders are swept by the next `create`.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Where run directories live (one per `ssc` process and run).
    pub fn base() -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if Path::new(&d).is_dir() => PathBuf::from(d).join("ssc"),
            // By uid, not $USER: users without $USER would share one base.
            _ => std::env::temp_dir().join(format!("ssc-{}", rustix::process::geteuid().as_raw())),
        }
    }

    pub fn create() -> Result<RunDir> {
        Self::create_in(&Self::base())
    }

    /// A run directory under `base`, which is created (0700) if missing and
    /// must otherwise be a real directory of this user's, closed to others:
    /// in a shared /tmp anyone can plant `/tmp/ssc-UID` first, as a symlink
    /// to the user's files (which the sweep would then delete) or as a
    /// directory they own (where they could swap our sockets).
    pub fn create_in(base: &Path) -> Result<RunDir> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        match std::fs::DirBuilder::new().mode(0o700).create(base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", base.display())),
        }
        let meta = std::fs::symlink_metadata(base).with_context(|| format!("checking {}", base.display()))?;
        let uid = rustix::process::geteuid().as_raw();
        let problem = if meta.file_type().is_symlink() {
            Some("is a symbolic link".to_string())
        } else if !meta.is_dir() {
            Some("is not a directory".to_string())
        } else if meta.uid() != uid {
            Some(format!("belongs to uid {}, not to this user (uid {uid})", meta.uid()))
        } else if meta.mode() & 0o077 != 0 {
            Some(format!("is open to other users (mode {:o})", meta.mode() & 0o777))
        } else {
            None
        };
        if let Some(problem) = problem {
            bail!(
                "the run directory base {} {problem}: someone else may have planted it. Remove it (or set \
                 XDG_RUNTIME_DIR to a private directory) and run again",
                base.display()
            );
        }
        Self::sweep(base);
        let path = base.join(format!("{}-{}", std::process::id(), RUN_DIRS.fetch_add(1, Ordering::SeqCst)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating run directory {}", path.display()))?;
        std::fs::write(path.join(RUN_DIR_MARK), b"")
            .with_context(|| format!("marking run directory {}", path.display()))?;
        Ok(RunDir { path })
    }

    /// Removes the run directories of builders that are gone: only real
    /// directories named `PID-N`, owned by this user and holding the mark
    /// [`RunDir::create_in`] leaves, never what a symlink points to.
    fn sweep(base: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        let uid = rustix::process::geteuid().as_raw();
        let ours = |p: &Path, dir: bool| {
            std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == uid && if dir { m.is_dir() } else { m.is_file() })
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((pid, n)) = name.split_once('-') else { continue };
            let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else { continue };
            let path = e.path();
            if !Path::new(&format!("/proc/{pid}")).exists()
                && ours(&path, true)
                && ours(&path.join(RUN_DIR_MARK), false)
            {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Where the image's log lines go besides the domain's own buffer.
#[derive(Clone, Debug)]
pub enum LogEcho {
    Quiet,
    /// Print each line to stdout with this prefix.
    Stdout(String),
}

/// What the control link delivered, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlEvent {
    Hello {
        image: String,
        version: String,
    },
    Ready {
        image: String,
        boot_us: u64,
    },
    Pong {
        request_id: u64,
        payload: Vec<u8>,
    },
    Error {
        request_id: u64,
        code: ssc_abi::ErrorCode,
        message: String,
    },
    Ack {
        request_id: u64,
    },
    /// An authenticated volume is durable at this generation.
    VolumeCommitted {
        generation: u64,
    },
    /// A sector failed authentication in the SD.
    IntegrityFailure {
        sector: u64,
    },
    /// A piece of device state from a checkpoint SD's restore.
    DeviceState {
        request_id: u64,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    },
    /// A checkpoint SD's reply to `SaveCheckpoint`.
    CheckpointSaved {
        request_id: u64,
        generation: u64,
        length: u64,
        pages_read: u64,
        pages_stored: u64,
        micros: u64,
    },
    /// How far a long request has come (bytes).
    Progress {
        request_id: u64,
        done: u64,
        total: u64,
    },
    /// A dedup SD's findings in one client.
    DedupClient {
        request_id: u64,
        client: u32,
        stats: sd_dedup::ClientStats,
    },
    DedupZeroRuns {
        request_id: u64,
        client: u32,
        runs: Vec<u8>,
    },
    DedupGroups {
        request_id: u64,
        groups: Vec<u8>,
    },
    DedupDone {
        request_id: u64,
        changed: u64,
        micros: u64,
    },
    /// An introspection SD's monitor event (`sd_introspect::Event`,
    /// postcard); request id 0 when unsolicited.
    Monitor {
        request_id: u64,
        event: Vec<u8>,
    },
    /// DomC's reply to an `HsmAdmin` request (`ssc_abi::hsm::AdminReply`,
    /// postcard).
    HsmAdminReply {
        request_id: u64,
        reply: Vec<u8>,
    },
    /// Udom0 asks for a quote of its meta-domain (`ssc_abi::attest`).
    QuoteRequest {
        request_id: u64,
        qualifying_data: Vec<u8>,
    },
    /// Udom0 asks for a grant (checked by `crate::grants`).
    Grant {
        request_id: u64,
        sd: String,
        client: String,
        permission: String,
    },
    /// Udom0 asks the builder to start the client VMs.
    LaunchClients {
        request_id: u64,
    },
    /// An SD took its key from Udom0 (the builder saw none of it).
    Keyed {
        by: String,
    },
    Other(String),
    /// The link failed (bad frame, closed): the reason.
    Broken(String),
}

fn owned(env: Envelope<'_>) -> ControlEvent {
    match env.body {
        Body::Hello { image, version } => ControlEvent::Hello { image: image.into(), version: version.into() },
        Body::Ready { image, boot_us } => ControlEvent::Ready { image: image.into(), boot_us },
        Body::Pong { payload } => ControlEvent::Pong { request_id: env.request_id, payload: payload.into() },
        Body::Error { code, message } => {
            ControlEvent::Error { request_id: env.request_id, code, message: message.into() }
        }
        Body::Ack => ControlEvent::Ack { request_id: env.request_id },
        Body::VolumeCommitted { generation } => ControlEvent::VolumeCommitted { generation },
        Body::IntegrityFailure { sector } => ControlEvent::IntegrityFailure { sector },
        Body::DeviceState { offset, total, bytes } => {
            ControlEvent::DeviceState { request_id: env.request_id, offset, total, bytes: bytes.into() }
        }
        Body::CheckpointSaved { generation, length, pages_read, pages_stored, micros } => {
            ControlEvent::CheckpointSaved {
                request_id: env.request_id,
                generation,
                length,
                pages_read,
                pages_stored,
                micros,
            }
        }
        Body::Progress { done, total } => ControlEvent::Progress { request_id: env.request_id, done, total },
        Body::DedupClient { client, pages, pages_read, zero_pages, zero_allocated, dup_within, dup_across } => {
            let stats = sd_dedup::ClientStats { pages, pages_read, zero_pages, zero_allocated, dup_within, dup_across };
            ControlEvent::DedupClient { request_id: env.request_id, client, stats }
        }
        Body::DedupZeroRuns { client, runs } => {
            ControlEvent::DedupZeroRuns { request_id: env.request_id, client, runs: runs.into() }
        }
        Body::DedupGroups { groups } => ControlEvent::DedupGroups { request_id: env.request_id, groups: groups.into() },
        Body::DedupDone { changed, micros, .. } => {
            ControlEvent::DedupDone { request_id: env.request_id, changed, micros }
        }
        Body::MonitorEvent { event } => ControlEvent::Monitor { request_id: env.request_id, event: event.into() },
        Body::HsmAdminReply { reply } => {
            ControlEvent::HsmAdminReply { request_id: env.request_id, reply: reply.into() }
        }
        Body::QuoteRequest { qualifying_data } => {
            ControlEvent::QuoteRequest { request_id: env.request_id, qualifying_data: qualifying_data.into() }
        }
        Body::Grant { sd, client, permission } => ControlEvent::Grant {
            request_id: env.request_id,
            sd: sd.into(),
            client: client.into(),
            permission: permission.into(),
        },
        Body::LaunchClients => ControlEvent::LaunchClients { request_id: env.request_id },
        Body::Keyed { by } => ControlEvent::Keyed { by: by.into() },
        other => ControlEvent::Other(format!("{other:?}")),
    }
}

/// A handle that sends on a control link from another thread (the
/// builder's relay to Udom0).
#[derive(Clone)]
pub struct ControlSender {
    writer: Arc<Mutex<UnixStream>>,
    next_id: Arc<AtomicU64>,
}

impl ControlSender {
    /// Sends a request body; returns its request id.
    pub fn send(&self, body: Body<'_>) -> Result<u64> {
        send_frame(&self.writer, &self.next_id, body)
    }
}

/// What the builder learned on a control link, shared with its reader.
#[derive(Default)]
struct ControlState {
    /// The image sent Hello or Ready: it speaks the ABI.
    speaks_abi: bool,
    /// The builder's Ping (sent on Ready) and when.
    ping: Option<(u64, Vec<u8>, Instant)>,
    /// Round trip of a Ping answered with an identical Pong.
    verified: Option<Duration>,
    /// Why the link failed, if it did.
    broken: Option<String>,
    /// Latest `VolumeCommitted` generation.
    generation: Option<u64>,
    /// Sectors reported in `IntegrityFailure` events.
    integrity_failures: Vec<u64>,
    /// Who keyed the SD, from its `Keyed` event.
    keyed_by: Option<String>,
    /// Called with each new generation (the tenant records it).
    on_commit: Option<Box<dyn FnMut(u64) + Send>>,
}

/// The builder's end of a domain's control link. A reader thread decodes
/// frames; on the image's Ready it sends a Ping and checks the Pong (the
/// builder's liveness check of every domain), and forwards every event.
pub struct ControlLink {
    writer: Arc<Mutex<UnixStream>>,
    events: Receiver<ControlEvent>,
    state: Arc<Mutex<ControlState>>,
    next_id: Arc<AtomicU64>,
    reader: std::thread::JoinHandle<()>,
}

fn send_frame(writer: &Mutex<UnixStream>, next_id: &AtomicU64, body: Body<'_>) -> Result<u64> {
    let id = next_id.fetch_add(1, Ordering::SeqCst);
    let frame = Envelope::new(id, body).to_frame()?;
    writer.lock().unwrap().write_all(&frame).context("writing to the control link")?;
    Ok(id)
}

impl ControlLink {
    /// Answers the image's request `request_id`.
    pub fn reply(&self, request_id: u64, body: Body<'_>) -> Result<()> {
        let frame = Envelope::new(request_id, body).to_frame()?;
        self.writer.lock().unwrap().write_all(&frame).context("writing to the control link")
    }

    /// A sender for another thread.
    pub fn sender(&self) -> ControlSender {
        ControlSender { writer: self.writer.clone(), next_id: self.next_id.clone() }
    }

    fn connect(path: &Path, child: &mut Child, timeout: Duration) -> Result<ControlLink> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < timeout && child.try_wait()?.is_none() => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to control link {}", path.display()));
                }
            }
        };
        let mut reader = stream.try_clone()?;
        let writer = Arc::new(Mutex::new(stream));
        let state = Arc::new(Mutex::new(ControlState::default()));
        let next_id = Arc::new(AtomicU64::new(1));
        let (tx, events) = channel();
        let (w, st, ids) = (writer.clone(), state.clone(), next_id.clone());
        let reader = std::thread::spawn(move || {
            let mut dec = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let used = dec.feed(rest);
                    rest = &rest[used..];
                    let ev = match dec.next_payload() {
                        Ok(Some(p)) => {
                            Envelope::decode(&p).map(owned).unwrap_or_else(|e| ControlEvent::Broken(e.to_string()))
                        }
                        Ok(None) => continue,
                        Err(e) => ControlEvent::Broken(e.to_string()),
                    };
                    let mut s = st.lock().unwrap();
                    match &ev {
                        ControlEvent::Hello { .. } => s.speaks_abi = true,
                        ControlEvent::Ready { .. } => {
                            s.speaks_abi = true;
                            let payload: Vec<u8> = (0..256u32).map(|i| (i * 7 + n as u32) as u8).collect();
                            match send_frame(&w, &ids, Body::Ping { payload: &payload }) {
                                Ok(id) => s.ping = Some((id, payload, Instant::now())),
                                Err(e) => s.broken = Some(format!("{e:#}")),
                            }
                        }
                        ControlEvent::Pong { request_id, payload } => match &s.ping {
                            Some((id, sent, at)) if id == request_id && sent == payload => {
                                s.verified = Some(at.elapsed())
                            }
                            _ => s.broken = Some(format!("Pong {request_id} does not match the Ping sent")),
                        },
                        ControlEvent::Broken(why) => s.broken = Some(why.clone()),
                        ControlEvent::VolumeCommitted { generation } => {
                            s.generation = Some(*generation);
                            if let Some(f) = s.on_commit.as_mut() {
                                f(*generation);
                            }
                        }
                        ControlEvent::IntegrityFailure { sector } => s.integrity_failures.push(*sector),
                        ControlEvent::Keyed { by } => s.keyed_by = Some(by.clone()),
                        _ => {}
                    }
                    let stop = s.broken.is_some();
                    drop(s);
                    if tx.send(ev).is_err() || stop {
                        return;
                    }
                }
            }
        });
        Ok(ControlLink { writer, events, state, next_id, reader })
    }

    /// Sends a request body; returns its request id.
    pub fn send(&self, body: Body<'_>) -> Result<u64> {
        send_frame(&self.writer, &self.next_id, body)
    }

    /// Sends a request and waits for its `Ack`; the image's `Error` reply
    /// becomes an error naming its code and message.
    pub fn request(&self, body: Body<'_>, timeout: Duration) -> Result<()> {
        let id = self.send(body)?;
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(ControlEvent::Ack { request_id }) if request_id == id => return Ok(()),
                Ok(ControlEvent::Error { request_id, code, message }) if request_id == id => {
                    bail!("refused ({code:?}): {message}")
                }
                Ok(ControlEvent::Broken(why)) => bail!("control link broken: {why}"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        bail!("no reply to request {id} within {} s", timeout.as_secs())
    }

    /// The next event, if one arrives within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<ControlEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Round trip of the builder's Ping, once answered.
    pub fn verified(&self) -> Option<Duration> {
        self.state.lock().unwrap().verified
    }

    /// The latest generation an authenticated volume reported as durable.
    pub fn generation(&self) -> Option<u64> {
        self.state.lock().unwrap().generation
    }

    /// Calls `f` with every generation reported from now on (and at once
    /// with the latest one, if any), on the link's reader thread.
    pub fn on_commit(&self, mut f: impl FnMut(u64) + Send + 'static) {
        let mut s = self.state.lock().unwrap();
        if let Some(g) = s.generation {
            f(g);
        }
        s.on_commit = Some(Box::new(f));
    }

    /// Who keyed the SD over a link of their own (`Keyed`), if anyone.
    pub fn keyed_by(&self) -> Option<String> {
        self.state.lock().unwrap().keyed_by.clone()
    }

    /// Sectors that failed authentication so far.
    pub fn integrity_failures(&self) -> Vec<u64> {
        self.state.lock().unwrap().integrity_failures.clone()
    }

    /// After the image exited: waits (briefly) until the reader has handled
    /// everything the image sent, so no last event (a final generation) is
    /// lost when the builder exits right after.
    fn drain(&self, timeout: Duration) {
        let start = Instant::now();
        while !self.reader.is_finished() && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn speaks_abi(&self) -> bool {
        self.state.lock().unwrap().speaks_abi
    }

    fn broken(&self) -> Option<String> {
        self.state.lock().unwrap().broken.clone()
    }
}

/// Timings of a domain's start.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// QEMU spawn → first line on the console.
    pub first_line: Duration,
    /// QEMU spawn → the `ssc: ready` line.
    pub ready: Duration,
    /// Guest time from PVH entry to ready, as the image measured it.
    pub guest_boot_us: u64,
}

/// A running domain: one QEMU process.
pub struct Domain {
    pub name: String,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    child: Option<Child>,
    lines: Receiver<(Instant, String)>,
    /// Every console line so far, filled by the reader thread.
    log: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    control: Option<ControlLink>,
    qmp: PathBuf,
    owned_sockets: Vec<PathBuf>,
    started: Instant,
    first_line: Option<Duration>,
    /// How QEMU ended, once [`Domain::exited`] saw it end on its own.
    ended: Option<ImageExit>,
}

fn spawn_line_reader(
    stream: impl Read + Send + 'static,
    tx: Sender<(Instant, String)>,
    log: Arc<Mutex<Vec<String>>>,
    echo: LogEcho,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { return };
            let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if let LogEcho::Stdout(prefix) = &echo {
                println!("{prefix}{line}");
            }
            log.lock().unwrap().push(line.clone());
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
}

impl Domain {
    /// Starts QEMU for `spec` and connects the control link.
    pub fn launch(spec: &DomainSpec, accel: Accel, run_dir: &RunDir, echo: LogEcho) -> Result<Domain> {
        check_image(&spec.image)?;
        for d in &spec.disks {
            if !d.is_file() {
                bail!("disk {} does not exist (create it with `truncate -s 64M {}`)", d.display(), d.display());
            }
        }
        if let Some(f) = &spec.memory_file
            && !f.exists()
        {
            create_memory_file(f, spec.mem_mib)?;
        }
        for w in &spec.windows {
            window_size(w)?;
        }
        let mut seen = std::collections::HashSet::new();
        for l in &spec.links {
            validate_link_name(&l.name)?;
            if !seen.insert(&l.name) {
                bail!("link `{}` is given twice", l.name);
            }
            if l.connect && !l.socket.exists() {
                bail!("link `{}`: nothing listens on {} (start the peer domain first)", l.name, l.socket.display());
            }
            if !l.connect && l.socket.exists() {
                bail!("link `{}`: {} already exists; remove it or choose another path", l.name, l.socket.display());
            }
        }
        let args = qemu_args(spec, accel, run_dir.path());
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--", QEMU]);
            c
        } else {
            Command::new(QEMU)
        };
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| {
            format!("starting {QEMU}: is it installed? (`sudo apt-get install -y qemu-system-x86`, or `ssc doctor`)")
        })?;
        let (tx, lines) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        spawn_line_reader(child.stdout.take().expect("piped stdout"), tx, log.clone(), echo);
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err_pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            // Line by line, so a hung QEMU's complaint is in a timeout error.
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut owned_sockets: Vec<PathBuf> =
            spec.links.iter().filter(|l| !l.connect).map(|l| l.socket.clone()).collect();
        let ctl_path = control_socket(run_dir.path(), &spec.name);
        owned_sockets.push(ctl_path.clone());
        let mut dom = Domain {
            mem_mib: spec.mem_mib,
            name: spec.name.clone(),
            child: None,
            lines,
            log,
            stderr,
            control: None,
            qmp: qmp_socket(run_dir.path(), &spec.name),
            owned_sockets,
            started,
            first_line: None,
            ended: None,
        };
        let control = ControlLink::connect(&ctl_path, &mut child, Duration::from_secs(10));
        dom.child = Some(child);
        match control {
            Ok(c) => dom.control = Some(c),
            Err(e) => {
                let exit = dom.wait_exit(Some(Duration::from_secs(2)));
                return Err(dom.failure(format!("{e:#}; QEMU: {}", exit.map(|x| x.to_string()).unwrap_or_default())));
            }
        }
        Ok(dom)
    }

    /// An error that carries the last log lines and QEMU's stderr.
    pub fn failure(&self, what: String) -> anyhow::Error {
        let log = self.log();
        let tail = &log[log.len().saturating_sub(15)..];
        let stderr = self.stderr.lock().map(|s| s.trim().to_string()).unwrap_or_default();
        let mut msg = format!("domain `{}`: {what}", self.name);
        if !tail.is_empty() {
            msg.push_str("\n--- last console lines ---");
            for l in tail {
                msg.push_str("\n  ");
                msg.push_str(l);
            }
        }
        if !stderr.is_empty() {
            msg.push_str("\n--- QEMU stderr ---\n  ");
            msg.push_str(&stderr.replace('\n', "\n  "));
        }
        anyhow!(msg)
    }

    /// Console lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn take_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok((at, line)) => {
                if self.first_line.is_none() {
                    self.first_line = Some(at - self.started);
                }
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Fails if the control link broke (bad frame, Pong mismatch), or if
    /// QEMU stopped on a KVM emulation failure (it pauses and would
    /// otherwise hang until the timeout).
    fn service_control(&mut self) -> Result<()> {
        if self.stderr.lock().is_ok_and(|s| s.contains("KVM internal error")) {
            bail!(
                "QEMU stopped on a KVM internal error (emulation failure): this host's KVM cannot run the image; use --accel tcg"
            );
        }
        if let Some(why) = self.control.as_ref().and_then(ControlLink::broken) {
            bail!("control link broken: {why}");
        }
        Ok(())
    }

    /// Round trip of the builder's Ping on the control link, once the image
    /// answered it.
    pub fn control_verified(&self) -> Option<Duration> {
        self.control.as_ref().and_then(ControlLink::verified)
    }

    /// When QEMU was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Without waiting: how QEMU ended, if it ended on its own (a panic, a
    /// failure verdict, a kill from outside). Its last console lines are
    /// collected first; [`Domain::shutdown`] later reports the same verdict.
    pub fn exited(&mut self) -> Option<ImageExit> {
        if self.ended.is_none()
            && let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
        {
            self.child = None;
            self.drain_lines();
            self.ended = Some(ImageExit::from_status(status));
        }
        self.ended.clone()
    }

    /// Waits for the image's `ssc: ready` line.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Ready> {
        let deadline = Instant::now() + timeout;
        loop {
            if crate::interrupted() {
                return Err(self.failure("interrupted".into()));
            }
            if let Err(e) = self.service_control() {
                return Err(self.failure(format!("{e:#}")));
            }
            if let Some(line) = self.take_line(Duration::from_millis(20)) {
                if let Some(rest) = line.split(" ssc: ready ").nth(1) {
                    let guest_boot_us = rest
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("boot_us="))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    return Ok(Ready {
                        first_line: self.first_line.unwrap_or_default(),
                        ready: self.started.elapsed(),
                        guest_boot_us,
                    });
                }
                continue;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.drain_lines();
                return Err(self.failure(format!("exited before it was ready: {}", ImageExit::from_status(status))));
            }
            if Instant::now() > deadline {
                return Err(self.failure(format!("not ready after {} s", timeout.as_secs())));
            }
        }
    }

    fn drain_lines(&mut self) {
        while self.take_line(Duration::from_millis(50)).is_some() {}
    }

    /// Waits for QEMU to exit (the image's verdict), serving the control
    /// link meanwhile. `None` waits forever (until Ctrl-C).
    pub fn wait_exit(&mut self, timeout: Option<Duration>) -> Result<ImageExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(exit) = self.poll_exit()? {
                return Ok(exit);
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(self
                    .failure(format!("still running after {} s; stopped it", timeout.unwrap_or_default().as_secs())));
            }
        }
    }

    /// One step of [`Domain::wait_exit`] (about 20 ms): the exit, if the
    /// domain has ended.
    pub fn poll_exit(&mut self) -> Result<Option<ImageExit>> {
        if crate::interrupted() {
            return Err(self.failure("interrupted".into()));
        }
        if let Err(e) = self.service_control() {
            return Err(self.failure(format!("{e:#}")));
        }
        while self.take_line(Duration::from_millis(0)).is_some() {}
        let Some(child) = self.child.as_mut() else { bail!("domain `{}` was not started", self.name) };
        if let Some(status) = child.try_wait()? {
            self.drain_lines();
            self.child = None;
            return Ok(Some(ImageExit::from_status(status)));
        }
        let _ = self.take_line(Duration::from_millis(20));
        Ok(None)
    }

    /// The control link, once connected.
    /// A QMP session with this domain's QEMU.
    pub fn qmp(&self, timeout: Duration) -> Result<crate::qmp::Qmp> {
        crate::qmp::Qmp::connect(&self.qmp, timeout)
    }

    /// The control link, shared (its state and events are behind locks).
    pub fn control_ref(&self) -> Option<&ControlLink> {
        self.control.as_ref()
    }

    pub fn control(&mut self) -> Option<&mut ControlLink> {
        self.control.as_mut()
    }

    /// Asks the image to stop (`Shutdown` on the control link) and waits up
    /// to `grace` for its verdict; falls back to [`Domain::stop`] (then the
    /// verdict is [`ImageExit::Signal`] or whatever QEMU reported).
    pub fn shutdown(&mut self, grace: Duration) -> Result<ImageExit> {
        if let Some(exit) = &self.ended {
            return Ok(exit.clone());
        }
        if self.running()
            && let Some(ctl) = self.control.as_ref()
        {
            // Sent even before the image's Hello has been seen (it may be in
            // flight); an image that never speaks the ABI gets a short grace.
            let _ = ctl.send(Body::Shutdown);
            std::thread::sleep(Duration::from_millis(50));
            let grace = if ctl.speaks_abi() { grace } else { grace.min(Duration::from_secs(2)) };
            if let Ok(exit) = self.wait_exit(Some(grace)) {
                if let Some(ctl) = self.control.as_ref() {
                    ctl.drain(Duration::from_secs(1));
                }
                return Ok(exit);
            }
        }
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            self.child = None;
            return Ok(ImageExit::from_status(status));
        }
        self.stop();
        Ok(ImageExit::Signal)
    }

    /// Stops QEMU: QMP `quit`, then SIGKILL if it is still there after 2 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            if let Ok(mut q) = crate::qmp::Qmp::connect(&self.qmp, Duration::from_millis(500)) {
                let _ = q.execute("quit", None);
            }
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Kills QEMU at once (benchmarks, failed probes).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.stop();
        for s in &self.owned_sockets {
            let _ = std::fs::remove_file(s);
        }
        let _ = std::fs::remove_file(&self.qmp);
    }
}

/// Several domains started in order: each must be ready before the next
/// starts (a chain's downstream before its upstream), and they stop in
/// reverse order. Dropping a meta-domain stops whatever it started.
pub struct MetaDomain {
    domains: Vec<Domain>,
    run_dir: RunDir,
    /// Called with each spec before its domain starts: the vTPM
    /// measurement of an attested meta-domain.
    measure: Option<Measure>,
}

/// A measurement hook: called with each spec before its domain starts.
type Measure = Box<dyn FnMut(&DomainSpec, &[u8]) -> Result<()> + Send>;

impl MetaDomain {
    /// Starts `specs` in order. On any failure, the domains already started
    /// are stopped and the error names the one that failed.
    pub fn launch(specs: &[DomainSpec], accel: Accel, echo: bool, ready_timeout: Duration) -> Result<MetaDomain> {
        let mut names = std::collections::HashSet::new();
        for s in specs {
            if !names.insert(&s.name) {
                bail!("two domains are named `{}`; names must be unique", s.name);
            }
        }
        let mut meta = MetaDomain::new()?;
        for spec in specs {
            meta.start(spec, accel, echo, ready_timeout)?;
        }
        Ok(meta)
    }

    /// A meta-domain with nothing running yet.
    pub fn new() -> Result<MetaDomain> {
        Ok(MetaDomain { domains: vec![], run_dir: RunDir::create()?, measure: None })
    }

    /// Measures every domain started from now on with `f`, given the spec
    /// and the image's bytes, which are exactly what QEMU will run (before
    /// it starts; an error stops the launch).
    pub fn measure_with(&mut self, f: impl FnMut(&DomainSpec, &[u8]) -> Result<()> + Send + 'static) {
        self.measure = Some(Box::new(f));
    }

    /// Starts one more domain and waits until it is ready (for chains whose
    /// next domain needs this one configured first).
    pub fn start(
        &mut self,
        spec: &DomainSpec,
        accel: Accel,
        echo: bool,
        ready_timeout: Duration,
    ) -> Result<&mut Domain> {
        if self.domains.iter().any(|d| d.name == spec.name) {
            bail!("two domains are named `{}`; names must be unique", spec.name);
        }
        // The image is read once: checked, measured and run from one copy.
        let (pinned, bytes) = PinnedFile::read(&spec.image)?;
        if let Some(want) = &spec.sha384 {
            let got = crate::catalog::sha384_hex(&bytes);
            if !got.eq_ignore_ascii_case(want) {
                bail!(
                    "{}: the image {} changed after the catalog verified it (sha384 {}…, the manifest says {}…): \
                     refusing to launch it",
                    spec.name,
                    spec.image.display(),
                    &got[..16],
                    &want[..16.min(want.len())]
                );
            }
        }
        if let Some(m) = self.measure.as_mut() {
            m(spec, &bytes).with_context(|| format!("measuring {} into the vTPM", spec.name))?;
        }
        let log = if echo { LogEcho::Stdout(format!("[{}] ", spec.name)) } else { LogEcho::Quiet };
        let launched = DomainSpec { image: pinned.qemu_path(), ..spec.clone() };
        let mut d = Domain::launch(&launched, accel, &self.run_dir, log)?;
        drop(pinned);
        d.wait_ready(ready_timeout)?;
        self.domains.push(d);
        Ok(self.domains.last_mut().expect("just pushed"))
    }

    /// The domain called `name`.
    pub fn domain(&mut self, name: &str) -> Option<&mut Domain> {
        self.domains.iter_mut().find(|d| d.name == name)
    }

    /// The domains, in start order.
    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    /// The domains, mutably (to poll them).
    pub fn domains_mut(&mut self) -> &mut [Domain] {
        &mut self.domains
    }

    /// The run directory holding the domains' sockets.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// Stops every domain in reverse start order (graceful `Shutdown` first)
    /// and returns each one's verdict.
    pub fn shutdown(mut self, grace: Duration) -> Vec<(String, Result<ImageExit>)> {
        let mut out = vec![];
        while let Some(mut d) = self.domains.pop() {
            let exit = d.shutdown(grace);
            out.push((d.name.clone(), exit));
        }
        out
    }
}

impl Drop for MetaDomain {
    fn drop(&mut self) {
        while let Some(d) = self.domains.pop() {
            drop(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn joined(spec: &DomainSpec) -> String {
        qemu_args(spec, Accel::Tcg, Path::new("/run/x"))
            .iter()
            .map(|s| s.to_string_lossy().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_planted_symlink_as_the_run_base_is_refused_and_its_target_is_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Looks like a dead builder's run directory to the old sweep.
        std::fs::create_dir(victim.join("999999999-0")).unwrap();
        let base = tmp.path().join("ssc-user");
        std::os::unix::fs::symlink(&victim, &base).unwrap();
        let e = RunDir::create_in(&base).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && e.contains("planted"), "{e}");
        assert!(victim.join("999999999-0").is_dir(), "the sweep followed the symlink and deleted the victim's files");
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o755, "chmod followed the link");
    }

    #[test]
    fn a_run_base_open_to_others_or_owned_by_someone_else_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("ssc-user");
        std::fs::create_dir(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = RunDir::create_in(&base).unwrap_err().to_string();
        assert!(e.contains("open to other users (mode 777)"), "{e}");
        if rustix::process::geteuid().is_root() {
            // Planted by another user (nobody), closed to others.
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&base, Some(65534), Some(65534)).unwrap();
            let e = RunDir::create_in(&base).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
    }

    #[test]
    fn the_sweep_removes_only_run_directories_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("ssc-user");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let first = RunDir::create_in(&base).unwrap();
        // A dead builder's run directory, with the mark: swept.
        let dead = base.join("999999999-0");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(RUN_DIR_MARK), b"").unwrap();
        // Without the mark, or a symlink with a run directory's name: kept.
        std::fs::create_dir(base.join("999999998-0")).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("999999997-0")).unwrap();
        let second = RunDir::create_in(&base).unwrap();
        assert!(!dead.exists(), "a dead builder's marked run directory was not swept");
        assert!(base.join("999999998-0").is_dir(), "an unmarked directory was removed");
        assert!(outside.join("keep").is_file(), "the sweep followed a symlink");
        assert!(first.path().is_dir() && second.path().is_dir(), "a live run directory was swept");
    }

    #[test]
    fn an_image_changed_after_the_catalog_check_is_refused_before_anything_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("storage-crypt");
        std::fs::write(&image, b"the image the catalog verified").unwrap();
        let digest = crate::catalog::sha384_hex(b"the image the catalog verified");
        // The provider replaces the file after the catalog check.
        std::fs::write(&image, b"another image").unwrap();
        let spec = DomainSpec { sha384: Some(digest), ..DomainSpec::new("storage-crypt-0", &image) };
        let mut meta = MetaDomain::new().unwrap();
        let measured = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let m = measured.clone();
        meta.measure_with(move |_, _| {
            m.store(true, Ordering::SeqCst);
            Ok(())
        });
        let Err(e) = meta.start(&spec, Accel::Tcg, false, Duration::from_secs(1)) else {
            panic!("an image changed after the catalog check was launched")
        };
        let e = e.to_string();
        assert!(e.contains("changed after the catalog verified it"), "{e}");
        assert!(!measured.load(Ordering::SeqCst), "a refused image was measured");
    }

    #[test]
    fn a_pinned_image_keeps_its_bytes_and_cannot_be_written() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("img");
        std::fs::write(&image, b"measured bytes").unwrap();
        let (pin, bytes) = PinnedFile::read(&image).unwrap();
        assert_eq!(bytes, b"measured bytes");
        std::fs::write(&image, b"swapped").unwrap();
        assert_eq!(std::fs::read(pin.qemu_path()).unwrap(), b"measured bytes", "the pinned copy followed the file");
        let w = std::fs::OpenOptions::new().write(true).open(pin.qemu_path());
        let written = w.and_then(|mut f| std::io::Write::write_all(&mut f, b"x"));
        assert!(written.is_err(), "a sealed image took a write");
    }

    #[test]
    fn every_domain_gets_console_qmp_exit_device_and_control_link() {
        let spec = DomainSpec { firmware: Firmware::Seabios, ..DomainSpec::new("sd1", Path::new("/img/selftest")) };
        let a = joined(&spec);
        for want in [
            "-serial stdio",
            "-qmp unix:/run/x/sd1.qmp,server=on,wait=off",
            "isa-debug-exit,iobase=0xf4,iosize=1",
            "virtio-serial-pci,id=vser0,max_ports=2",
            "socket,id=port0,path=/run/x/sd1.ctl,server=on,wait=off",
            "virtserialport,bus=vser0.0,chardev=port0,name=ctl",
            "-kernel /img/selftest",
            "-accel tcg -cpu max",
        ] {
            assert!(a.contains(want), "missing `{want}` in {a}");
        }
        assert!(!a.contains("-bios"));
    }

    #[test]
    fn disks_and_links_become_devices_and_commas_are_escaped() {
        let mut spec = DomainSpec::new("d", Path::new("/img/a,b"));
        spec.disks.push("/v/disk,1.img".into());
        spec.links.push("echo=/tmp/e.sock".parse().unwrap());
        spec.firmware = Firmware::Qboot;
        let a = joined(&spec);
        assert!(a.contains("file=/v/disk,,1.img,format=raw,if=none,id=disk0"));
        assert!(a.contains("virtio-blk-pci,drive=disk0"));
        assert!(a.contains("path=/tmp/e.sock,server=on,wait=off"));
        assert!(a.contains("name=echo"));
        assert!(a.contains("max_ports=3"));
        assert!(a.contains("-kernel /img/a,,b"));
        assert!(a.contains("-bios /usr/share/qemu/qboot.rom"));
    }

    #[test]
    fn windows_become_ivshmem_devices_read_only_unless_granted_write() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mem");
        std::fs::File::create(&f).unwrap().set_len(1 << 20).unwrap();
        let mut spec = DomainSpec::new("d", Path::new("/img"));
        spec.windows.push(f.display().to_string().parse().unwrap());
        spec.windows.push(format!("{}:rw", f.display()).parse().unwrap());
        let a = joined(&spec);
        assert!(
            a.contains(&format!(
                "memory-backend-file,id=win0,share=on,mem-path={},size=1024K,readonly=on",
                f.display()
            )),
            "{a}"
        );
        assert!(
            a.contains(&format!("memory-backend-file,id=win1,share=on,mem-path={},size=1024K -device", f.display())),
            "{a}"
        );
        assert!(a.contains("ivshmem-plain,memdev=win0") && a.contains("ivshmem-plain,memdev=win1"));
        std::fs::File::create(&f).unwrap().set_len(3 << 20).unwrap();
        let e = window_size(&spec.windows[0]).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn link_specs_are_validated() {
        assert!("echo".parse::<LinkSpec>().unwrap_err().to_string().contains("NAME=SOCKET"));
        assert!("ctl=/x".parse::<LinkSpec>().unwrap_err().to_string().contains("reserved"));
        assert!("Bad Name=/x".parse::<LinkSpec>().unwrap_err().to_string().contains("a-z"));
        assert!("up=".parse::<LinkSpec>().unwrap_err().to_string().contains("empty"));
        assert_eq!("up=/s".parse::<LinkSpec>().unwrap(), LinkSpec::listen("up", Path::new("/s")));
    }

    #[test]
    fn non_images_and_truncated_images_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let e = check_image(&p).unwrap_err().to_string();
        assert!(e.contains("no ELF header") && e.contains("make images"), "{e}");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[16] = 2;
        elf[18] = 62;
        elf[32] = 64; // phoff
        elf[54] = 56; // phentsize
        elf[56] = 1; // phnum, but no program header follows
        std::fs::write(&p, &elf).unwrap();
        assert!(check_image(&p).unwrap_err().to_string().contains("truncated"));
        assert!(check_image(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn run_dirs_of_dead_builders_are_swept() {
        let d = RunDir::create().unwrap();
        let base = d.path().parent().unwrap().to_path_buf();
        // No process has pid 4294967295 (above any pid_max).
        let stale = base.join("4294967295-0");
        std::fs::create_dir_all(stale.join("leftover.ctl")).unwrap();
        std::fs::write(stale.join(RUN_DIR_MARK), b"").unwrap();
        let live = base.join(format!("{}-999999", std::process::id()));
        std::fs::create_dir_all(&live).unwrap();
        let d2 = RunDir::create().unwrap();
        assert!(!stale.exists(), "a dead builder's run directory was not swept");
        assert!(live.exists(), "a live builder's run directory was swept");
        std::fs::remove_dir_all(live).unwrap();
        drop((d, d2));
    }

    #[test]
    fn run_dirs_are_private_and_removed_on_drop() {
        let d = RunDir::create().unwrap();
        let p = d.path().to_path_buf();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        drop(d);
        assert!(!p.exists());
    }
}
