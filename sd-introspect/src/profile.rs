//! The profile of one client kernel build: where its symbols are linked,
//! where the fields the scanner reads sit in its structures, and what its
//! syscall table holds. `ssc profile build` derives it from the Debian
//! kernel package (System.map, the kernel's own BTF and `.rodata`); the
//! SD receives it as a `postcard` blob on its control link.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// The profile format this crate reads.
pub const FORMAT: u16 = 1;
/// Where x86-64 Linux links its text (`__START_KERNEL`); a symbol's
/// run-time address is its link address plus the KASLR slide.
pub const LINK_BASE: u64 = 0xffff_ffff_8100_0000;
/// `__START_KERNEL_map`: kernel-image virtual addresses minus this plus
/// `phys_base` are physical.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// A kernel build's profile. Addresses are link-time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub format: u16,
    /// `uname -r` of the build, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The GNU build id of `vmlinux` (the kernel puts it in VMCOREINFO):
    /// a profile for another build is refused by this, not by the release.
    pub build_id: Vec<u8>,
    pub symbols: Symbols,
    pub task: TaskLayout,
    pub module: ModuleLayout,
    /// `sizeof(struct pt_regs)` and the offset of `orig_ax` in it.
    pub pt_regs_size: u32,
    pub pt_regs_orig_ax: u32,
    /// Bytes of a kernel stack (`THREAD_SIZE`); `pt_regs` sits at its top.
    pub thread_size: u32,
    /// Entry i of `sys_call_table`: its syscall name and link-time target.
    pub syscalls: Vec<Syscall>,
}

/// Link-time addresses of the symbols the scanner reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbols {
    /// `_stext` and `_etext`: the text that is hashed.
    pub text_start: u64,
    pub text_end: u64,
    /// `_sinittext` and `_einittext`: boot-only text. The kernel leaves
    /// unused exception gates pointing there (benign, but a gate that
    /// moves there later is reported).
    pub init_text_start: u64,
    pub init_text_end: u64,
    pub init_task: u64,
    pub sys_call_table: u64,
    pub idt_table: u64,
    /// The `modules` list head.
    pub modules: u64,
    /// `entry_SYSCALL_64`, where `MSR_LSTAR` points.
    pub entry_syscall_64: u64,
}

/// Byte offsets in `struct task_struct`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLayout {
    pub tasks: u32,
    pub pid: u32,
    pub tgid: u32,
    pub comm: u32,
    pub mm: u32,
    pub state: u32,
    pub stack: u32,
    pub children: u32,
    pub sibling: u32,
    pub real_parent: u32,
    pub thread_group: u32,
}

/// Byte offsets in `struct module`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLayout {
    pub list: u32,
    pub name: u32,
    pub name_len: u32,
    /// The module's core text: base pointer and size (u32).
    pub base: u32,
    pub size: u32,
}

/// One `sys_call_table` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Syscall {
    /// Without the `__x64_sys_` prefix (`read`, `getppid`); `ni_syscall`
    /// for an unused number.
    pub name: String,
    pub target: u64,
}

/// Why a profile blob was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileError {
    Decode,
    Format(u16),
    Invalid(&'static str),
}

impl core::fmt::Display for ProfileError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProfileError::Decode => {
                write!(f, "the profile is not a postcard-encoded profile (rebuild it with `ssc profile build`)")
            }
            ProfileError::Format(v) => {
                write!(
                    f,
                    "the profile has format {v}, this monitor reads format {FORMAT} (rebuild it with `ssc profile build`)"
                )
            }
            ProfileError::Invalid(why) => write!(f, "the profile is inconsistent: {why}"),
        }
    }
}

impl Profile {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a profile always encodes")
    }

    /// Decodes and sanity-checks a profile (it comes from the tenant, but
    /// a corrupt file must not make the scanner misbehave).
    pub fn decode(bytes: &[u8]) -> Result<Profile, ProfileError> {
        let p: Profile = postcard::from_bytes(bytes).map_err(|_| ProfileError::Decode)?;
        if p.format != FORMAT {
            return Err(ProfileError::Format(p.format));
        }
        let s = &p.symbols;
        if s.text_start >= s.text_end || s.text_end - s.text_start > 1 << 30 {
            return Err(ProfileError::Invalid("the kernel text range is empty or larger than 1 GiB"));
        }
        if p.syscalls.is_empty() || p.syscalls.len() > 4096 {
            return Err(ProfileError::Invalid("the syscall table must have 1 to 4096 entries"));
        }
        if !(4096..=1 << 20).contains(&p.thread_size) || p.pt_regs_size == 0 || p.pt_regs_size > 1024 {
            return Err(ProfileError::Invalid("thread_size or pt_regs size out of range"));
        }
        if p.module.name_len == 0 || p.module.name_len > 256 || p.build_id.is_empty() || p.build_id.len() > 64 {
            return Err(ProfileError::Invalid("module name length or build id size out of range"));
        }
        Ok(p)
    }

    /// The number of the syscall called `name`.
    pub fn syscall_nr(&self, name: &str) -> Option<u16> {
        self.syscalls.iter().position(|s| s.name == name).map(|n| n as u16)
    }

    /// The name of syscall `nr` (`?` if out of the table).
    pub fn syscall_name(&self, nr: u64) -> &str {
        usize::try_from(nr).ok().and_then(|n| self.syscalls.get(n)).map(|s| s.name.as_str()).unwrap_or("?")
    }
}
