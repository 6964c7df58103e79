//! `ssc`: the Self-Service Cloud command line.
//!
//! Verbs are grouped by who uses them: running domains (`run`), checking the
//! machine (`doctor`), the image catalog (`catalog`, for publishers and
//! tenants), and benchmarks (`bench`). Later issues add tenant verbs (`up`,
//! `attest`, `checkpoint`, …) and provider verbs (`provider …`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use ssc::builder::{Domain, DomainSpec, LinkSpec, LogEcho, RunDir, WindowSpec};
use ssc::qemu::{self, AccelChoice, Firmware, ImageExit, Machine};
use ssc::{bench, catalog, doctor};

#[derive(Parser)]
#[command(
    name = "ssc",
    version,
    about = "Self-Service Cloud on unikernels: run, check, publish and benchmark service-domain images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot one image in QEMU, stream its log, and exit with its verdict.
    ///
    /// IMAGE is a path to an image file, or the name of an image in the
    /// catalog given by --catalog (verified against --trust first). The
    /// builder attaches a control link `ctl`, a QMP socket and the
    /// isa-debug-exit device; --disk and --link add devices. Exit status: 0
    /// when the image reports success, 1 otherwise.
    Run {
        image: String,
        /// A raw disk file, attached as virtio-blk (repeatable, in order).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// A data link NAME=SOCKET: a virtio-serial port named NAME whose host
        /// side is a unix socket QEMU listens on (repeatable).
        #[arg(long)]
        link: Vec<LinkSpec>,
        /// A memory window FILE (read-only) or FILE:rw: a shared memory file
        /// attached as an ivshmem device (repeatable).
        #[arg(long)]
        window: Vec<WindowSpec>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u32,
        /// Accelerator: auto probes KVM and falls back to TCG (SSC_ACCEL overrides).
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long, value_enum, default_value_t = Machine::Q35)]
        machine: Machine,
        /// Firmware before the PVH entry: qboot is faster, SeaBIOS is the QEMU default.
        #[arg(long, value_enum, default_value_t = Firmware::Auto)]
        firmware: Firmware,
        /// Extra kernel command line, e.g. `ssc.log=debug`.
        #[arg(long, default_value = "")]
        append: String,
        /// Give up (and stop QEMU) after this many seconds; 0 waits until Ctrl-C.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// Catalog folder to resolve IMAGE names in.
        #[arg(long, env = "SSC_CATALOG")]
        catalog: Option<PathBuf>,
        /// Trusted publisher public key files for --catalog.
        #[arg(long, env = "SSC_TRUST", value_delimiter = ':')]
        trust: Vec<PathBuf>,
        /// Do not print the image's console.
        #[arg(long)]
        quiet: bool,
    },
    /// Start a chain file: its service domains from the catalog (verified,
    /// neighbours checked), their keys, then the Linux client on them.
    ///
    /// With --job the client runs that shell script at boot (its disks are
    /// /dev/vda, /dev/vdb, …), and `ssc up` exits with its verdict after
    /// stopping the chain; without it the chain runs until Ctrl-C.
    Up {
        chain: PathBuf,
        /// A shell script for the client to run (then it powers off).
        #[arg(long)]
        job: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        /// Check the chain file and the catalog, start nothing.
        #[arg(long)]
        check: bool,
        /// Start the client from a checkpoint (a generation or `latest`)
        /// instead of booting it; needs a [checkpoint] section.
        #[arg(long)]
        restore: Option<String>,
        /// Allow restoring a generation that was restored before (its RNG
        /// state and one-time secrets are replayed).
        #[arg(long)]
        allow_rollback: bool,
    },
    /// Checkpoints of a running chain's client (see `[checkpoint]` in the
    /// chain file).
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Memory deduplication across the clients of a running chain (see
    /// `[dedup]` in the chain file).
    #[command(subcommand)]
    Dedup(DedupCmd),
    /// Tenant volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Watch the client of the `ssc up CHAIN` running now through its
    /// introspection SD (see `[introspect]` in the chain file): process
    /// start/exit, hidden processes, syscall-table and IDT hooks, kernel
    /// text changes, modules, syscall alerts, and once a second which
    /// syscalls the client's tasks are in. Runs until Ctrl-C or --for.
    Monitor {
        chain: PathBuf,
        /// One JSON object per event (t_ms, alert, text, event).
        #[arg(long)]
        json: bool,
        /// Print the process list and modules now, then exit.
        #[arg(long)]
        ps: bool,
        /// Only events worth attention (hooks, hidden tasks, alerts).
        #[arg(long)]
        alerts: bool,
        /// Stop after this many seconds.
        #[arg(long = "for")]
        duration: Option<u64>,
    },
    /// DomC, the tenant's virtual HSM in the `ssc up CHAIN` running now (see
    /// `[hsm]` in the chain file): its keys, imports, PIN and audit log.
    /// The client uses it through the PKCS#11 module `ssc up` installs
    /// (/usr/lib/ssc/libssc_pkcs11.so).
    #[command(subcommand)]
    Hsm(HsmCmd),
    /// Introspection profiles of client kernels (for `[introspect]`).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Attest the meta-domain `ssc up CHAIN` runs (a chain with `[udom0]`).
    ///
    /// Opens TLS 1.3 to Udom0 through the builder's relay, sends a fresh
    /// nonce, and verifies what comes back before anything secret is sent:
    /// the host TPM's quote against the provider's published profile
    /// (--host-profile, from `ssc provider profile`), the host vouching for
    /// the meta-domain's vTPM key, the vTPM quote binding the nonce, this
    /// TLS session's exporter value and Udom0's key, and the event log:
    /// exactly the images the chain file names (catalog digests) and the
    /// tenant's own client kernel, initramfs and command line. Prints what
    /// it verified, or the attack it caught (replay, diversion, VM or host
    /// substitution). Exit status 0 only when everything verified.
    ///
    /// `ssc up` with `[udom0]` waits for the tenant before it starts the
    /// client VMs: run `ssc attest --provision` once. Only after the
    /// evidence verified does it send Udom0 the volume keys (read from the
    /// chain's key files here; Udom0 passes each to its storage SD over a
    /// link the builder does not read), the chain's grants (which SD may
    /// interpose on which disk or read which client's memory; the builder
    /// checks each against the SD's signed manifest) and the launch.
    Attest {
        chain: PathBuf,
        /// The provider's host profile (JSON from `ssc provider profile`).
        #[arg(long)]
        host_profile: PathBuf,
        /// The job script `ssc up --job` was given (it is part of the
        /// client's measured initramfs).
        #[arg(long)]
        job: Option<PathBuf>,
        /// After verifying: provision keys, grant, launch the clients.
        #[arg(long)]
        provision: bool,
        #[arg(long)]
        json: bool,
    },
    /// Provider verbs: the host profile, and the narrow API to running
    /// meta-domains (list, stop, destroy, quotas). No provider verb opens a
    /// tenant's memory, data links or consoles.
    #[command(subcommand)]
    Provider(ProviderCmd),
    /// Report QEMU, KVM usability, swtpm and the rest, with install commands.
    Doctor {
        /// An image to probe KVM with (default: a built selftest image).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Build, verify and list the signed image catalog.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum ProviderCmd {
    /// Print (or write) this host's profile: the host TPM's attestation key
    /// and the PCR values a correct boot of this builder gives (builder
    /// binary, QEMU, the catalog publisher keys it trusts). Tenants check
    /// quotes against it (`ssc attest --host-profile`).
    Profile {
        /// Catalog publisher keys the builder trusts (as in chain files).
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Write the profile here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The meta-domains running on this host: id, domains, memory, and
    /// whether each has a Udom0. Nothing of the tenants' data.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a meta-domain: its clients stop, its SDs shut down cleanly.
    Stop {
        /// The id `ssc provider list` shows (`<chain>-<pid>`).
        id: String,
    },
    /// Destroy a meta-domain: every domain is killed at once.
    Destroy { id: String },
    /// Show or set this host's quotas (file: $SSC_QUOTAS, default
    /// /var/lib/ssc/quotas.json); `ssc up` refuses a meta-domain over them.
    Quotas {
        /// Meta-domains running at once.
        #[arg(long)]
        max_meta_domains: Option<u32>,
        /// Memory of one meta-domain, MiB (all its domains).
        #[arg(long)]
        max_memory_mib: Option<u32>,
        /// Domains in one meta-domain (Udom0, SDs, clients).
        #[arg(long)]
        max_domains: Option<u32>,
        /// Remove every quota.
        #[arg(long, conflicts_with_all = ["max_meta_domains", "max_memory_mib", "max_domains"])]
        clear: bool,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Save the client of the `ssc up CHAIN` running now: a delta of what
    /// it was restored from or last saved, or `--full`.
    Save {
        chain: PathBuf,
        #[arg(long)]
        full: bool,
    },
    /// Start the chain's client from a checkpoint instead of booting it
    /// (the same as `ssc up CHAIN --restore GENERATION`): a fresh client
    /// QEMU waits with `-incoming`, the checkpoint SD verifies every stream
    /// of the generation's chain before it writes a page, QEMU loads the
    /// device state and the client runs on. Each generation once, unless
    /// `--allow-rollback`.
    Restore {
        chain: PathBuf,
        /// A generation number, or `latest`.
        #[arg(default_value = "latest")]
        generation: String,
        /// Allow restoring a generation that was restored before (its RNG
        /// state and one-time secrets are replayed).
        #[arg(long)]
        allow_rollback: bool,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
    },
    /// The checkpoints in the tenant's record.
    List { chain: PathBuf },
}

#[derive(Subcommand)]
enum HsmCmd {
    /// The keys DomC holds: handle, kind, label, id, allowed operations
    /// (public facts only; no key ever leaves DomC).
    List {
        chain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Import a key into DomC over its control link: PKCS#8 (PEM or DER)
    /// EC P-256/P-384, Ed25519 or RSA 2048-4096, or an AES-256 key as 64
    /// hex digits. The client sees it as a PKCS#11 object with this label
    /// and id.
    Import {
        chain: PathBuf,
        file: PathBuf,
        #[arg(long)]
        label: String,
        /// CKA_ID, hex (e.g. 01).
        #[arg(long, default_value = "")]
        id: String,
        /// Allowed operations: sign, verify, encrypt, decrypt, or wrap,unwrap
        /// alone (a key that wraps may do nothing else).
        #[arg(long, default_value = "sign,verify,encrypt,decrypt")]
        usage: String,
        /// Most operations per second (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate_per_sec: u32,
        /// Let the client wrap this key (export it sealed under a wrap-only
        /// key in DomC). Off by default: the key never leaves DomC.
        #[arg(long)]
        extractable: bool,
    },
    /// Destroy a key (by the handle `ssc hsm list` shows).
    Destroy { chain: PathBuf, handle: u64 },
    /// Set the client's user PIN (also unlocks it after five wrong PINs).
    SetPin {
        chain: PathBuf,
        /// A file whose first line is the PIN (4-64 bytes).
        #[arg(long)]
        pin_file: PathBuf,
    },
    /// Export DomC's audit log (every operation, allowed or refused, from
    /// the client or the tenant) and verify its hash chain: an edited,
    /// dropped or reordered entry fails the check.
    Audit {
        chain: PathBuf,
        /// One JSON object per entry.
        #[arg(long)]
        json: bool,
        /// Also write the entries as JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print only the last N entries (all are verified).
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(Subcommand)]
enum DedupCmd {
    /// Have the dedup SD scan every client's memory now: zero pages,
    /// duplicates within and across clients, what sharing would save.
    Scan {
        chain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Return the clients' zero pages to the host: each client is paused
    /// in turn, every page of the last scan's zero runs re-read, and only
    /// pages still zero are punched out of its memory file (scans first if
    /// there was no scan). Non-zero duplicates are reported, not shared:
    /// stock QEMU/KVM cannot share a page copy-on-write between VMs.
    Apply {
        chain: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The last scan (and apply), without scanning again.
    Stats {
        chain: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Derive the profile of a client kernel from its Debian package: symbol
    /// addresses from System.map (the real one, from the -dbg package),
    /// structure offsets from the kernel's own BTF, the syscall table as
    /// linked, and the build id the introspection SD matches against the
    /// running kernel. `make client` leaves both inputs in build/client.
    Build {
        /// The kernel: a bzImage (LZ4 payload, as Debian's) or a vmlinux ELF.
        #[arg(long, default_value = "build/client/vmlinuz")]
        kernel: PathBuf,
        #[arg(long, default_value = "build/client/System.map")]
        system_map: PathBuf,
        /// Where the profile goes (postcard).
        #[arg(short, long, default_value = "build/client/profile.ssc")]
        out: PathBuf,
    },
    /// What a profile file holds.
    Show { profile: PathBuf },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume file and a fresh 512-bit key (hex, mode 0600), or a
    /// LUKS2 volume opened by a passphrase. The key stays with the tenant:
    /// `ssc up` hands it to the storage SD, never to the provider.
    Create {
        volume: PathBuf,
        #[arg(long)]
        size: String,
        /// Where the new key goes (not for `luks2`).
        #[arg(long)]
        key_out: Option<PathBuf>,
        /// `luks2`: the passphrase file (cryptsetup formats the volume:
        /// aes-xts-plain64, 4096-byte sectors, argon2id; `ssc up` unlocks it
        /// with `luks_passphrase`, and so can cryptsetup/dm-crypt).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// `luks2`: the time cryptsetup tunes the KDF to (ms).
        #[arg(long, default_value_t = 2000)]
        iter_time: u32,
        /// `native`: aes-xts-plain64 with a header that lets the SD refuse a
        /// wrong key (data from 1 MiB); `raw`: plain aes-xts-plain64 from
        /// byte 0; `auth`: the authenticated mode (AES-256-GCM per 4 KiB
        /// sector, Merkle root, tampering and rollback detected; ~1.6% of the
        /// volume holds metadata) plus the tenant's generation record
        /// KEY_OUT.generation, which `ssc up` keeps current; `luks2`: see
        /// --passphrase-file.
        #[arg(long, default_value = "native", value_parser = ["native", "raw", "auth", "luks2"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Create a publisher key pair (Ed25519).
    Keygen {
        /// PKCS#8 private key to create (mode 0600; must not exist).
        #[arg(long)]
        private: PathBuf,
        /// Hex public key file to write: what tenants pass to --trust.
        #[arg(long)]
        public: PathBuf,
    },
    /// Sign the built images listed in images.toml into a catalog folder.
    Build {
        #[arg(long, default_value = "kernels/images.toml")]
        images: PathBuf,
        /// Where the built image binaries are.
        #[arg(long, default_value = "kernels/target/x86_64-unknown-linux-gnu/release")]
        bin_dir: PathBuf,
        /// Publisher private key (from `ssc catalog keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify every manifest: publisher trusted, signature valid, digest matches.
    Verify {
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List images with their permissions and verification status.
    List {
        catalog: PathBuf,
        #[arg(long)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// fio in the Linux client over a raw file, the storage SD (null cipher
    /// and aes-xts-plain64) and QEMU's own LUKS, in one invocation.
    Storage {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Volume size (MiB) per path.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Seconds per fio job.
        #[arg(long, default_value_t = 10)]
        runtime: u32,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    /// Checkpoints of an idle Linux client end to end: the checkpoint SD's
    /// full save, delta save and restore beside QEMU's migrate-to-file and a
    /// raw copy of the memory file, per client size.
    Checkpoint {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Client memory sizes (MiB, powers of two).
        #[arg(long, value_delimiter = ',', default_values_t = [512, 1024])]
        sizes: Vec<u32>,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    /// The storage SD's core natively: aes-xts-plain64 beside `openssl speed`
    /// in the same run, and NBD requests/s over memory. Build with --release.
    StorageCore {
        #[arg(long)]
        json: bool,
    },
    /// The checkpoint SD's core natively: full and delta save, verify +
    /// restore, with and without lz4, over a memory image with zero, text
    /// and random pages; beside memcpy, lz4 and AES-GCM alone. --release.
    CheckpointCore {
        /// Memory image size (MiB).
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
        #[arg(long)]
        json: bool,
    },
    /// Dedup of idle Linux clients from one image, end to end: the dedup
    /// SD's scan and apply beside virtio-balloon free page reporting and
    /// (as root) Linux KSM on private-RAM clients, one invocation.
    Dedup {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Client memory (MiB, a power of two of at least 128).
        #[arg(long, default_value_t = 512)]
        mib: u32,
        /// Seconds clients idle before measuring.
        #[arg(long, default_value_t = 10)]
        settle: u64,
        /// Seconds KSM runs over the private-RAM clients (it starts slowly:
        /// with its default rate it merged nothing at 30 s here).
        #[arg(long, default_value_t = 60)]
        ksm_seconds: u64,
        /// Also copy the SD's clients' memory (paused, sparse) into this
        /// folder, for `ssc bench dedup-core --from`.
        #[arg(long)]
        capture: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    /// The dedup SD's core natively: scan of 2 × 512 MiB and 4 × 1 GiB
    /// synthetic client images (or --from captured memory files), beside a
    /// SHA-256-per-page reference, XXH3 alone and a plain read. --release.
    DedupCore {
        /// Configurations `CLIENTSxMIB`.
        #[arg(long, value_delimiter = ',', default_values_t = ["2x512".to_string(), "4x1024".to_string()])]
        configs: Vec<String>,
        /// Memory files captured from real clients (one configuration).
        #[arg(long, num_args = 1..)]
        from: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The introspection SD end to end: the slowdown of a syscall- and
    /// CPU-heavy workload in a Linux client with the SD scanning at 10 Hz,
    /// against no SD and an idle SD, in one run (the client runs ~100
    /// processes).
    Introspect {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long, default_value = "build/client/profile.ssc")]
        profile: PathBuf,
        /// Client memory (MiB, a power of two of at least 128).
        #[arg(long, default_value_t = 512)]
        mib: u32,
        /// Workload rounds measured per configuration.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Also copy the client's memory (paused) into this folder, for
        /// `ssc bench introspect-core --from`.
        #[arg(long)]
        capture: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    /// DomC end to end: signatures per second through the PKCS#11 module
    /// inside a client VM to the DomC image, beside SoftHSM2 inside the
    /// same client (ECDSA P-256, Ed25519, RSA-2048; 1 and 8 threads).
    Hsm {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Seconds per run.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Thread counts, comma-separated.
        #[arg(long, default_value = "1,8", value_delimiter = ',')]
        threads: Vec<usize>,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    /// DomC's core natively (one instance per thread) beside SoftHSM2 on
    /// the host through PKCS#11, same run. Build with --release.
    HsmCore {
        /// Seconds per run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Thread counts, comma-separated.
        #[arg(long, default_value = "1,8", value_delimiter = ',')]
        threads: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// The introspection core natively over a captured client memory file
    /// (`ssc bench introspect --capture`): attach, full scan, 10 Hz tick,
    /// process list, beside copying and hashing the kernel text. --release.
    IntrospectCore {
        /// A memory file captured from a running client.
        #[arg(long)]
        from: PathBuf,
        #[arg(long, default_value = "build/client/profile.ssc")]
        profile: PathBuf,
        #[arg(long, default_value_t = 50)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Boot time of every catalog image (median of --runs boots) per
    /// accelerator, machine type and firmware.
    /// Time from `ssc up` to the client ready, with and without attested
    /// launch ([udom0]: TPMs, measured launch, the tenant's attest, verify
    /// and provisioning through Udom0), median of --runs, the attestation
    /// steps broken down. The accelerator is named.
    Launch {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
        accel: AccelChoice,
        #[arg(long)]
        json: bool,
    },
    Boot {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    ssc::install_interrupt_handler();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ssc: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn default_probe_image() -> Option<PathBuf> {
    let p = PathBuf::from("kernels/target/x86_64-unknown-linux-gnu/release/selftest");
    p.is_file().then_some(p)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Run {
            image,
            disk,
            link,
            window,
            mem,
            accel,
            machine,
            firmware,
            append,
            timeout,
            catalog,
            trust,
            quiet,
        } => {
            let (path, name) = resolve_image(&image, catalog.as_deref(), &trust)?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let spec = DomainSpec {
                mem_mib: mem,
                disks: disk,
                links: link,
                windows: window,
                append,
                machine,
                firmware,
                ..DomainSpec::new(&name, &path)
            };
            let run_dir = RunDir::create()?;
            let echo = if quiet { LogEcho::Quiet } else { LogEcho::Stdout(String::new()) };
            let mut dom = Domain::launch(&spec, accel, &run_dir, echo)?;
            let wait = (timeout > 0).then(|| Duration::from_secs(timeout));
            let ready = dom.wait_ready(wait.unwrap_or(Duration::from_secs(120)))?;
            eprintln!(
                "ssc: {name} ready: {:.1} ms after QEMU start (first console line {:.1} ms, guest boot {:.2} ms)",
                ready.ready.as_secs_f64() * 1e3,
                ready.first_line.as_secs_f64() * 1e3,
                ready.guest_boot_us as f64 / 1e3
            );
            let exit = dom.wait_exit(wait)?;
            if let Some(rtt) = dom.control_verified() {
                eprintln!("ssc: control link verified (Ping/Pong round trip {:.2} ms)", rtt.as_secs_f64() * 1e3);
            }
            eprintln!("ssc: {name}: {exit}");
            Ok(match exit {
                ImageExit::Success => ExitCode::SUCCESS,
                _ => {
                    let e = dom.failure(exit.to_string());
                    eprintln!("ssc: error: {e:#}");
                    ExitCode::from(1)
                }
            })
        }
        Cmd::Up { chain, job, accel, check, restore, allow_rollback } => {
            up_cmd(chain, job, accel, check, restore, allow_rollback)
        }
        Cmd::Checkpoint(CheckpointCmd::Restore { chain, generation, allow_rollback, accel }) => {
            up_cmd(chain, None, accel, false, Some(generation), allow_rollback)
        }
        Cmd::Volume(VolumeCmd::Create { volume, size, key_out, passphrase_file, iter_time, format }) => {
            let bytes = ssc::chain::parse_size(&size)?;
            if format == "luks2" {
                let Some(pass) = passphrase_file else {
                    bail!("--format luks2 needs --passphrase-file (the tenant's passphrase)");
                };
                ssc::luks::create_luks2(&volume, bytes, &pass, iter_time)?;
                let u = ssc::luks::unlock(&volume, &ssc::luks::read_passphrase(&pass)?)?;
                println!(
                    "volume {} ({} MiB): LUKS2, aes-xts-plain64, {}-byte sectors, data at {} KiB; \
                     opens with the passphrase in {} (keep it: it never goes to the provider)",
                    volume.display(),
                    bytes >> 20,
                    u.sector_size,
                    u.data_offset >> 10,
                    pass.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if passphrase_file.is_some() {
                bail!("--passphrase-file is for --format luks2; {format} volumes use a key file (--key-out)");
            }
            let Some(key_out) = key_out else {
                bail!("{format} volumes need --key-out FILE: where the new key goes (it stays with the tenant)");
            };
            let format = match format.as_str() {
                "raw" => ssc::chain::VolumeFormat::Raw,
                "auth" => ssc::chain::VolumeFormat::Auth,
                _ => ssc::chain::VolumeFormat::Native,
            };
            ssc::chain::create_volume(&volume, bytes, &key_out, format)?;
            println!(
                "volume {} ({} MiB), key in {} (keep it: it never goes to the provider)",
                volume.display(),
                bytes >> 20,
                key_out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint(CheckpointCmd::Save { chain, full }) => {
            eprintln!("ssc checkpoint: saving (the client is paused meanwhile)…");
            let mut show = ssc::chain_checkpoint::progress_lines("ssc checkpoint: memory scanned");
            let msg = ssc::chain_checkpoint::request(&chain, if full { "save full" } else { "save" }, &mut show)?;
            println!("saved {msg}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Monitor { chain, json, ps, alerts, duration } => {
            if ps {
                let reply = ssc::chain_checkpoint::request(&chain, "introspect ps", &mut ssc::checkpoint::quiet)?;
                let line: ssc::chain_introspect::Line =
                    serde_json::from_str(&reply).context("`ssc up` sent a snapshot this ssc cannot read")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&line.event)?);
                } else {
                    let profile = ssc::chain::plan(&chain).ok().and_then(|p| p.introspect).map(|i| i.profile);
                    print!("{}", ssc::chain_introspect::process_table(&line.event, profile.as_ref())?);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let until = duration.map(|s| std::time::Instant::now() + Duration::from_secs(s));
            ssc::chain_introspect::watch(&chain, until, |line| {
                if alerts && !line.alert {
                    return;
                }
                if json {
                    println!("{}", serde_json::to_string(line).unwrap_or_default());
                } else {
                    let mark = if line.alert { "ALERT " } else { "" };
                    println!("{:>8.1}s {mark}{}", line.t_ms as f64 / 1000.0, line.text);
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Hsm(cmd) => hsm_command(cmd),
        Cmd::Attest { chain, host_profile, job, provision, json } => {
            let r = ssc::chain_udom0::attest(&chain, &host_profile, job.as_deref(), provision)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                ssc::chain_udom0::print_report(&r);
            }
            Ok(if r.verified { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Provider(ProviderCmd::Profile { trust, out }) => {
            let p = ssc::chain_udom0::provider_profile(&trust)?;
            let text = serde_json::to_string_pretty(&p)? + "\n";
            match out {
                Some(path) => {
                    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("ssc provider profile: wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Provider(ProviderCmd::List { json }) => {
            let all = ssc::provider::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no meta-domain runs on this host");
            } else {
                for m in &all {
                    let names: Vec<String> = m
                        .domains
                        .iter()
                        .map(|d| format!("{}{}", d.name, if d.running { "" } else { " (exited)" }))
                        .collect();
                    println!(
                        "{:<24} {:>6} MiB  up {:>5} s  {}  {}",
                        m.id,
                        m.memory_mib,
                        m.uptime_s,
                        if m.attested { "attested" } else { "        " },
                        names.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Provider(ProviderCmd::Stop { id }) => {
            println!("{id}: {}", ssc::provider::request(&id, "stop")?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Provider(ProviderCmd::Destroy { id }) => {
            println!("{id}: {}", ssc::provider::request(&id, "destroy")?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Provider(ProviderCmd::Quotas { max_meta_domains, max_memory_mib, max_domains, clear }) => {
            let file = ssc::provider::quotas_file();
            let mut q = ssc::provider::Quotas::read(&file)?;
            let set = max_meta_domains.is_some() || max_memory_mib.is_some() || max_domains.is_some();
            if clear {
                q = ssc::provider::Quotas::default();
            }
            q.max_meta_domains = max_meta_domains.or(q.max_meta_domains);
            q.max_memory_mib = max_memory_mib.or(q.max_memory_mib);
            q.max_domains = max_domains.or(q.max_domains);
            if set || clear {
                q.write(&file)?;
            }
            let show = |v: Option<u32>| v.map_or("unlimited".to_string(), |n| n.to_string());
            println!("quotas ({}):", file.display());
            println!("  meta-domains at once:    {}", show(q.max_meta_domains));
            println!("  memory per meta-domain:  {} MiB", show(q.max_memory_mib));
            println!("  domains per meta-domain: {}", show(q.max_domains));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Profile(ProfileCmd::Build { kernel, system_map, out }) => {
            let p = ssc::profile::build(&kernel, &system_map)?;
            let bytes = p.encode();
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("{}", ssc::profile::describe(&p));
            println!("profile: {} ({} bytes)", out.display(), bytes.len());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Profile(ProfileCmd::Show { profile }) => {
            let p = ssc::profile::load(&profile)?;
            println!("{}", ssc::profile::describe(&p));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dedup(cmd) => {
            let (chain, json, verb) = match cmd {
                DedupCmd::Scan { chain, json } => (chain, json, "scan"),
                DedupCmd::Apply { chain, json } => (chain, json, "apply"),
                DedupCmd::Stats { chain, json } => (chain, json, "stats"),
            };
            let mut show = ssc::chain_checkpoint::progress_lines("ssc dedup: memory scanned");
            let reply = ssc::chain_checkpoint::request(&chain, &format!("dedup {verb}"), &mut show)?;
            let report: ssc::chain_dedup::Report =
                serde_json::from_str(&reply).context("`ssc up` sent a report this ssc cannot read")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint(CheckpointCmd::List { chain }) => {
            let plan = ssc::chain::plan(&chain)?;
            let c = plan.checkpoint.as_ref().context("the chain file has no [checkpoint] section")?;
            let record = ssc::chain_checkpoint::Record::load(&c.key_path)?;
            println!("client {}", record.client_id);
            for e in &record.entries {
                let kind = if e.base.is_empty() { "full".to_string() } else { format!("delta of {:?}", e.base) };
                let restored = if record.restored.contains(&e.generation) { ", restored" } else { "" };
                println!(
                    "generation {}: {kind}, {:.1} MiB at {} MiB, {} MiB client{restored}",
                    e.generation,
                    e.length as f64 / (1 << 20) as f64,
                    e.at >> 20,
                    e.memory_mib
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor { image, json } => {
            let image = image.or_else(default_probe_image);
            let checks = doctor::run(image.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", doctor::render(&checks));
            }
            let missing = checks.iter().any(|c| !c.ok && !c.optional);
            Ok(if missing { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Cmd::Catalog(c) => catalog_cmd(c),
        Cmd::Bench(BenchCmd::Storage { catalog: dir, trust, size_mib, runtime, accel, json }) => {
            let sd = catalog::find(&dir, &catalog::load_trusted(&trust)?, "storage-crypt")?;
            let (kernel, initrd) = client_files()?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&sd.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let cells = ssc::bench_storage_e2e::run(&sd, &kernel, &initrd, accel, size_mib, runtime)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cells)?);
            } else {
                print!("{}", ssc::bench_storage_e2e::render(&cells, accel));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Checkpoint { catalog: dir, trust, sizes, accel, json }) => {
            if let Some(bad) = sizes.iter().find(|s| !s.is_power_of_two() || **s < 128) {
                bail!("client size {bad} MiB: a memory window needs a power of two of at least 128 MiB");
            }
            let image = catalog::find(&dir, &catalog::load_trusted(&trust)?, "checkpoint")?;
            let (kernel, initrd) = client_files()?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&image.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let cells = ssc::bench_checkpoint_e2e::run(&image, &kernel, &initrd, accel, &sizes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cells)?);
            } else {
                print!("{}", ssc::bench_checkpoint_e2e::render(&cells, accel));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::IntrospectCore { from, profile, runs, json }) => {
            let profile = ssc::profile::load(&profile)?;
            let rows = ssc::bench_introspect::core(&from, &profile, runs.max(1))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_introspect::render_core(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Introspect { catalog: dir, trust, profile, mib, rounds, capture, accel, json }) => {
            if !mib.is_power_of_two() || mib < 128 {
                bail!("client size {mib} MiB: a memory window needs a power of two of at least 128 MiB");
            }
            let image = catalog::find(&dir, &catalog::load_trusted(&trust)?, "introspect")?;
            let profile = ssc::profile::load(&profile)?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&image.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let (kernel, initrd) =
                (PathBuf::from("build/client/vmlinuz"), PathBuf::from("build/client/initrd.cpio.gz"));
            for p in [&kernel, &initrd] {
                if !p.is_file() {
                    bail!("{} is missing: build the client with `make client`", p.display());
                }
            }
            let setup = ssc::bench_introspect::Setup {
                image: &image,
                profile: &profile,
                kernel: &kernel,
                initrd: &initrd,
                accel,
                mib,
                rounds: rounds.max(1),
                capture,
            };
            let rows = ssc::bench_introspect::e2e(&setup)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_introspect::render_e2e(&rows, accel, setup.rounds));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Dedup {
            catalog: dir,
            trust,
            clients,
            mib,
            settle,
            ksm_seconds,
            capture,
            accel,
            json,
        }) => {
            if !mib.is_power_of_two() || mib < 128 {
                bail!("client size {mib} MiB: a memory window needs a power of two of at least 128 MiB");
            }
            if !(1..=8).contains(&clients) {
                bail!("--clients {clients}: between 1 and 8");
            }
            let image = catalog::find(&dir, &catalog::load_trusted(&trust)?, "dedup")?;
            let (kernel, initrd) = client_files()?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&image.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let setup = ssc::bench_dedup_e2e::Setup {
                image: &image,
                kernel: &kernel,
                initrd: &initrd,
                accel,
                clients,
                mib,
                settle: std::time::Duration::from_secs(settle),
                ksm_wait: std::time::Duration::from_secs(ksm_seconds),
                capture,
            };
            let cells = ssc::bench_dedup_e2e::run(&setup)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cells)?);
            } else {
                print!("{}", ssc::bench_dedup_e2e::render(&cells, &setup));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::HsmCore { secs, threads, json }) => {
            if cfg!(debug_assertions) {
                eprintln!("ssc: warning: this ssc is a debug build; core figures are meaningless (use `make bench`)");
            }
            let rows = ssc::bench_hsm::core(secs, &threads)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_storage::render_with(&rows, ssc::bench_hsm::ANCHORS));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Hsm { catalog: dir, trust, secs, threads, accel, json }) => {
            let image = catalog::find(&dir, &catalog::load_trusted(&trust)?, "domc")?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&image.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let setup = ssc::bench_hsm::E2e { catalog: &dir, trust: &trust, accel, secs, threads: &threads };
            let rows = ssc::bench_hsm::e2e(&setup)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_storage::render_with(&rows, ssc::bench_hsm::ANCHORS));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::DedupCore { configs, from, json }) => {
            if cfg!(debug_assertions) {
                eprintln!("ssc: warning: this ssc is a debug build; core figures are meaningless (use `make bench`)");
            }
            let configs = configs
                .iter()
                .map(|c| {
                    let (n, m) = c.split_once('x').with_context(|| format!("`{c}` is not CLIENTSxMIB (e.g. 2x512)"))?;
                    Ok((n.parse()?, m.parse()?))
                })
                .collect::<Result<Vec<(usize, usize)>>>()?;
            let rows = ssc::bench_dedup::run(&configs, &from)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_storage::render_with(&rows, ssc::bench_dedup::ANCHORS));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::CheckpointCore { size_mib, json }) => {
            if cfg!(debug_assertions) {
                eprintln!("ssc: warning: this ssc is a debug build; core figures are meaningless (use `make bench`)");
            }
            let rows = ssc::bench_checkpoint::run(size_mib << 20)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_storage::render_with(&rows, ssc::bench_checkpoint::ANCHORS));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::StorageCore { json }) => {
            if cfg!(debug_assertions) {
                eprintln!("ssc: warning: this ssc is a debug build; core figures are meaningless (use `make bench`)");
            }
            let rows = ssc::bench_storage::run()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_storage::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Launch { catalog: dir, trust, runs, accel, json }) => {
            let image = catalog::find(&dir, &catalog::load_trusted(&trust)?, "storage-crypt")?;
            let (accel, why) = qemu::resolve_accel(accel, Some(&image.path))?;
            eprintln!("ssc: accelerator {accel} ({why})");
            let rows = ssc::bench_launch::run(&dir, &trust, accel, runs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ssc::bench_launch::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Boot { catalog: dir, trust, runs, json }) => {
            let trusted = catalog::load_trusted(&trust)?;
            let images = catalog::verify(&dir, &trusted)?;
            let probe = images.first().map(|i| i.path.clone());
            let mut accels = vec![qemu::Accel::Tcg];
            if let Some(p) = probe {
                let v = qemu::probe_kvm(&p, Duration::from_secs(8));
                eprintln!("ssc: KVM: {}", v.reason);
                if v.usable {
                    accels.insert(0, qemu::Accel::Kvm);
                }
            }
            let rows = bench::boot(&images, &accels, runs.max(1))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", bench::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The image file to boot and the domain name to give it: a catalog
/// image's name, or a file's stem.
/// `ssc up` (and `ssc checkpoint restore`): starts the chain, serves
/// checkpoint commands, waits for the client.
fn up_cmd(
    chain: PathBuf,
    job: Option<PathBuf>,
    accel: AccelChoice,
    check: bool,
    restore: Option<String>,
    allow_rollback: bool,
) -> Result<ExitCode> {
    // The builder's files (run directory, sockets, memory files, the job's
    // initramfs) are private to its user.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let plan = ssc::chain::plan(&chain)?;
    for (i, d) in plan.disks.iter().enumerate() {
        let sds: Vec<String> = d
            .sds
            .iter()
            .map(|s| format!("{} {} (verified)", s.manifest.image.name, s.manifest.image.version))
            .collect();
        eprintln!("ssc up: disk {i}: client → {} → {}", sds.join(" → "), d.volume.display());
    }
    if check {
        eprintln!("ssc up: {} checks out", chain.display());
        return Ok(ExitCode::SUCCESS);
    }
    let (accel, why) = qemu::resolve_accel(accel, Some(plan.first_sd_image()))?;
    eprintln!("ssc: accelerator {accel} ({why})");
    let tmp = RunDir::create()?;
    let initrd = ssc::chain::job_initrd(&plan, job.as_deref(), tmp.path())?;
    let restore = match restore {
        Some(choice) => {
            let c = plan.checkpoint.as_ref().context("--restore needs a [checkpoint] section in the chain file")?;
            let record = ssc::chain_checkpoint::Record::load(&c.key_path)?;
            Some(record.choose(&choice, allow_rollback)?)
        }
        None => None,
    };
    let running = ssc::chain::up(&plan, accel, true, initrd.as_deref(), restore)?;
    let (exit, log) = running.wait(None)?;
    let passed = log.iter().any(|l| l == "client: job passed");
    match exit {
        ImageExit::Qemu { status: 0 } => eprintln!("ssc up: client powered off"),
        other => eprintln!("ssc up: client stopped: {other}"),
    }
    if job.is_some() {
        eprintln!("ssc up: job {}", if passed { "passed" } else { "FAILED" });
    }
    Ok(if job.is_none() || passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn resolve_image(image: &str, catalog_dir: Option<&Path>, trust: &[PathBuf]) -> Result<(PathBuf, String)> {
    let p = Path::new(image);
    if p.is_file() {
        let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        return Ok((p.to_path_buf(), if name.is_empty() { "image".into() } else { name }));
    }
    let Some(dir) = catalog_dir else {
        bail!(
            "{image} is not a file; to run a catalog image by name pass --catalog DIR --trust KEY (or set SSC_CATALOG/SSC_TRUST)"
        );
    };
    if trust.is_empty() {
        bail!("running `{image}` from catalog {} needs --trust PUBLISHER_KEY", dir.display());
    }
    let img = catalog::find(dir, &catalog::load_trusted(trust)?, image)?;
    eprintln!(
        "ssc: {} {} verified (sha384 {}…)",
        img.manifest.image.name,
        img.manifest.image.version,
        &img.manifest.image.sha384[..16]
    );
    Ok((img.path, img.manifest.image.name))
}

fn workspace_version(images_toml: &Path) -> Result<String> {
    let cargo = images_toml.parent().unwrap_or(Path::new(".")).join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo).with_context(|| format!("reading {}", cargo.display()))?;
    let v: toml::Value = toml::from_str(&text)?;
    v.get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(String::from)
        .with_context(|| format!("{} has no [workspace.package] version", cargo.display()))
}

fn catalog_cmd(c: CatalogCmd) -> Result<ExitCode> {
    match c {
        CatalogCmd::Keygen { private, public } => {
            let k = catalog::keygen(&private, &public)?;
            println!(
                "publisher key {k}\nprivate: {}\npublic:  {} (give this to tenants for --trust)",
                private.display(),
                public.display()
            );
        }
        CatalogCmd::Build { images, bin_dir, key, out } => {
            let version = workspace_version(&images)?;
            let ms = catalog::build(&images, &bin_dir, &version, &key, &out)?;
            for m in &ms {
                println!(
                    "signed {} {} ({}) sha384 {}…",
                    m.image.name,
                    m.image.version,
                    m.image.file,
                    &m.image.sha384[..16]
                );
            }
            println!("catalog written to {}", out.display());
        }
        CatalogCmd::Verify { catalog: dir, trust, json } => {
            let trusted = catalog::load_trusted(&trust)?;
            let v = catalog::verify(&dir, &trusted)?;
            if json {
                let list: Vec<_> = v.iter().map(|i| &i.manifest).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for i in &v {
                    println!(
                        "ok  {} {}  sha384 {}…  publisher {}…",
                        i.manifest.image.name,
                        i.manifest.image.version,
                        &i.manifest.image.sha384[..16],
                        &i.manifest.signature.publisher[..16]
                    );
                }
                println!("{} image(s) verified", v.len());
            }
        }
        CatalogCmd::List { catalog: dir, trust, json } => {
            let trusted = catalog::load_trusted(&trust)?;
            let mut rows = vec![];
            for (path, m) in catalog::read(&dir)? {
                let (m, status) = match m {
                    Ok(m) => {
                        let status = if trusted.is_empty() {
                            "unverified (no --trust)".to_string()
                        } else {
                            match catalog::verify_manifest(&dir, &m, &trusted) {
                                Ok(_) => "verified".into(),
                                Err(e) => format!("REFUSED: {e}"),
                            }
                        };
                        (Some(m), status)
                    }
                    Err(e) => (None, format!("REFUSED: {e}")),
                };
                rows.push((path, m, status));
            }
            if json {
                let j: Vec<_> = rows
                    .iter()
                    .map(|(p, m, s)| serde_json::json!({ "manifest": p, "image": m.as_ref().map(|m| &m.image), "status": s }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                println!("{:<14} {:<9} {:<28} {:<30} status", "name", "version", "permissions", "description");
                for (p, m, s) in &rows {
                    match m {
                        Some(m) => println!(
                            "{:<14} {:<9} {:<28} {:<30} {s}",
                            m.image.name,
                            m.image.version,
                            if m.image.permissions.is_empty() { "-".into() } else { m.image.permissions.join(",") },
                            m.image.description.chars().take(30).collect::<String>()
                        ),
                        None => println!("{:<14} {s}", p.display()),
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The client VM built by `make client`, for the end-to-end benchmarks.
fn client_files() -> Result<(PathBuf, PathBuf)> {
    let (kernel, initrd) = (PathBuf::from("build/client/vmlinuz"), PathBuf::from("build/client/initrd.cpio.gz"));
    if !kernel.is_file() || !initrd.is_file() {
        bail!("no client VM in build/client: run `make client`");
    }
    Ok((kernel, initrd))
}

fn hsm_command(cmd: HsmCmd) -> Result<ExitCode> {
    use ssc::chain_hsm::{describe_key, request};
    use ssc_abi::hsm::{AdminOp, AdminReply, Usage};
    match cmd {
        HsmCmd::List { chain, json } => {
            let AdminReply::Keys(keys) = request(&chain, &AdminOp::List)? else { bail!("DomC answered a list oddly") };
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else if keys.is_empty() {
                println!("DomC holds no keys");
            } else {
                for k in &keys {
                    println!("{}", describe_key(k));
                }
            }
        }
        HsmCmd::Import { chain, file, label, id, usage, rate_per_sec, extractable } => {
            let material = ssc::chain_hsm::read_key_file(&file)?;
            let usage = Usage { extractable, ..Usage::parse(&usage, rate_per_sec).map_err(|e| anyhow::anyhow!(e))? };
            let id = ssc::catalog::unhex(&id).with_context(|| format!("--id `{id}` is not hex"))?;
            match request(&chain, &AdminOp::Import { label, id, usage, material })? {
                AdminReply::Key(k) => println!("imported {}", describe_key(&k)),
                other => bail!("DomC answered {other:?}"),
            }
        }
        HsmCmd::Destroy { chain, handle } => {
            request(&chain, &AdminOp::Destroy { key: handle })?;
            println!("destroyed key #{handle}");
        }
        HsmCmd::SetPin { chain, pin_file } => {
            let pin = ssc::chain_hsm::read_pin(&pin_file)?;
            request(&chain, &AdminOp::SetPin { pin })?;
            println!("PIN set; the client logs in with it");
        }
        HsmCmd::Audit { chain, json, out, tail } => {
            let (entries, oldest) = ssc::chain_hsm::audit(&chain)?;
            if let Some(path) = &out {
                let mut text = String::new();
                for e in &entries {
                    text.push_str(&serde_json::to_string(e)?);
                    text.push('\n');
                }
                ssc::durable::write(path, text.as_bytes())?;
            }
            let shown = &entries[entries.len().saturating_sub(tail.unwrap_or(usize::MAX))..];
            for e in shown {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let who = match e.actor {
                        ssc_abi::hsm::Actor::Tenant => "tenant".to_string(),
                        ssc_abi::hsm::Actor::Client { session } => format!("client session {session}"),
                    };
                    let key = e.key.map(|k| format!(" key #{k}")).unwrap_or_default();
                    println!("{:>6} {:>10.3}s {who}: {}{key}: {}", e.seq, e.at_ms as f64 / 1000.0, e.op, e.outcome);
                }
            }
            let dropped = if oldest > 0 {
                format!(
                    " (entries before {oldest} were streamed to the chain's audit log, \
                     `[hsm] audit_log`, default {}, and left DomC's memory)",
                    ssc::chain::beside(&chain, ".hsm-audit.jsonl").display()
                )
            } else {
                String::new()
            };
            eprintln!("ssc hsm audit: {} entries, hash chain verified{dropped}", entries.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
