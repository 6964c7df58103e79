//! `ssc profile build`: the introspection profile of a client kernel,
//! derived from the Debian kernel package itself.
//!
//! - **Symbols** from `System.map` (the real one, from the `-dbg` package:
//!   the image package ships a placeholder).
//! - **Field offsets** (`task_struct`, `module`, `pt_regs`) from the
//!   kernel's own BTF, the `.BTF` section of the `vmlinux` ELF inside the
//!   bzImage (parsed with the `btf-rs` crate, the ELF with `object`).
//! - **The syscall table** as linked, from the ELF's `.rodata`; each
//!   entry's name from `System.map`.
//! - **The build id** (ELF note), which the SD matches against the running
//!   kernel's VMCOREINFO: a profile for another build is refused.
//!
//! Debian's cloud kernel compresses its bzImage payload with LZ4 (legacy
//! frames, decoded with `lz4_flex`); an uncompressed `vmlinux` is accepted
//! as well.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use object::{Object, ObjectSection};
use sd_introspect::profile::{FORMAT, ModuleLayout, Profile, Symbols, Syscall, TaskLayout};

/// x86-64 `THREAD_SIZE` without KASAN (Debian's kernels): 16 KiB stacks.
const THREAD_SIZE: u32 = 16384;
const LZ4_LEGACY: u32 = 0x184c_2102;

/// Builds the profile of the kernel in `vmlinuz` (a bzImage or an ELF)
/// with its `System.map`.
pub fn build(vmlinuz: &Path, system_map: &Path) -> Result<Profile> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let elf = vmlinux(&image).with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
    let map = std::fs::read_to_string(system_map).with_context(|| format!("reading {}", system_map.display()))?;
    let map = SystemMap::parse(&map).with_context(|| format!("{}", system_map.display()))?;
    from_parts(&elf, &map)
}

fn from_parts(elf: &[u8], map: &SystemMap) -> Result<Profile> {
    let obj = object::File::parse(elf).context("the kernel is not an ELF file")?;
    let build_id = obj
        .build_id()
        .ok()
        .flatten()
        .context("the kernel ELF has no GNU build id note (the SD needs it to match the running kernel)")?
        .to_vec();
    let btf = obj
        .section_by_name(".BTF")
        .context("the kernel has no .BTF section (it must be built with CONFIG_DEBUG_INFO_BTF)")?;
    let btf = Btf::from_bytes(btf.data()?).map_err(|e| anyhow!("parsing the kernel's BTF: {e}"))?;
    let read = |va: u64, len: usize| -> Result<Vec<u8>> {
        for s in obj.sections() {
            if va >= s.address() && va + len as u64 <= s.address() + s.size() {
                let data = s.data()?;
                let at = (va - s.address()) as usize;
                return data.get(at..at + len).map(<[u8]>::to_vec).context("section data is short");
            }
        }
        bail!("{va:#x}+{len} is in no section of the kernel ELF")
    };
    let banner = read(map.addr("linux_banner")?, 256)?;
    let banner = String::from_utf8_lossy(&banner[..banner.iter().position(|&b| b == 0).unwrap_or(256)]).to_string();
    let release = banner
        .strip_prefix("Linux version ")
        .and_then(|r| r.split(' ').next())
        .context("linux_banner does not start with `Linux version`")?
        .to_string();

    // sys_call_table: up to the next symbol.
    let table = map.addr("sys_call_table")?;
    let entries = ((map.next_after(table)? - table) / 8) as usize;
    if !(1..=4096).contains(&entries) {
        bail!("sys_call_table seems to have {entries} entries; System.map does not fit this kernel");
    }
    let raw = read(table, entries * 8)?;
    let text = map.addr("_stext")?..map.addr("_etext")?;
    let mut syscalls = raw
        .chunks_exact(8)
        .map(|c| {
            let target = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            Syscall { name: map.syscall_name(target), target }
        })
        .collect::<Vec<_>>();
    // The symbol after the table may sit past alignment padding.
    while syscalls.last().is_some_and(|s| !text.contains(&s.target)) {
        syscalls.pop();
    }

    let off = |ty: &str, path: &str| member_offset(&btf, ty, path);
    let task = TaskLayout {
        tasks: off("task_struct", "tasks")?,
        pid: off("task_struct", "pid")?,
        tgid: off("task_struct", "tgid")?,
        comm: off("task_struct", "comm")?,
        mm: off("task_struct", "mm")?,
        state: off("task_struct", "__state").or_else(|_| off("task_struct", "state"))?,
        stack: off("task_struct", "stack")?,
        children: off("task_struct", "children")?,
        sibling: off("task_struct", "sibling")?,
        real_parent: off("task_struct", "real_parent")?,
        thread_group: off("task_struct", "thread_group")?,
    };
    let module = ModuleLayout {
        list: off("module", "list")?,
        name: off("module", "name")?,
        name_len: array_len(&btf, "module", "name")?,
        base: off("module", "core_layout.base").context(
            "struct module has no core_layout (kernels from 6.4 on use mem[]; this profile builder reads 6.1-style modules)",
        )?,
        size: off("module", "core_layout.size")?,
    };
    let profile = Profile {
        format: FORMAT,
        release,
        build_id,
        symbols: Symbols {
            text_start: map.addr("_stext")?,
            text_end: map.addr("_etext")?,
            init_text_start: map.addr("_sinittext")?,
            init_text_end: map.addr("_einittext")?,
            init_task: map.addr("init_task")?,
            sys_call_table: table,
            idt_table: map.addr("idt_table")?,
            modules: map.addr("modules")?,
            entry_syscall_64: map.addr("entry_SYSCALL_64")?,
        },
        task,
        module,
        pt_regs_size: struct_size(&btf, "pt_regs")?,
        pt_regs_orig_ax: off("pt_regs", "orig_ax")?,
        thread_size: THREAD_SIZE,
        syscalls,
    };
    // What the SD will check, checked here first.
    Profile::decode(&profile.encode()).map_err(|e| anyhow!("{e}"))
}

/// Reads a profile file written by `ssc profile build`.
pub fn load(path: &Path) -> Result<Profile> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading profile {} (make one with `ssc profile build`)", path.display()))?;
    Profile::decode(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The `vmlinux` ELF of a bzImage (or the file itself if it is one).
pub fn vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    if image.starts_with(b"\x7fELF") {
        return Ok(image.to_vec());
    }
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("neither an ELF nor a bzImage (no `HdrS` boot header)");
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let u32_at = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().expect("4 bytes")) as usize;
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let payload = image.get(start..start + u32_at(0x24c)).context("the bzImage payload is truncated")?;
    let magic = payload.get(..4).map(|m| u32::from_le_bytes(m.try_into().expect("4 bytes")));
    match magic {
        Some(LZ4_LEGACY) => lz4_legacy(&payload[4..]),
        _ if payload.starts_with(&[0x1f, 0x8b]) => {
            bail!("the payload is gzip; this build reads LZ4 (Debian's) or a plain vmlinux")
        }
        _ if payload.starts_with(b"\xfd7zXZ") => {
            bail!("the payload is xz; this build reads LZ4 (Debian's) or a plain vmlinux")
        }
        _ if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) => {
            bail!("the payload is zstd; this build reads LZ4 (Debian's) or a plain vmlinux")
        }
        _ => bail!("the bzImage payload has an unknown compression"),
    }
}

/// LZ4 legacy frames: `[u32 compressed size][block]…`, blocks of at most
/// 8 MiB; the kernel appends the decompressed size (4 bytes) at the end.
fn lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut block = vec![0u8; 8 << 20];
    while data.len() >= 4 {
        let n = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
        if n == LZ4_LEGACY as usize {
            data = &data[4..];
            continue;
        }
        if n + 4 > data.len() {
            break; // the trailing size field
        }
        let got = lz4_flex::block::decompress_into(&data[4..4 + n], &mut block)
            .map_err(|e| anyhow!("LZ4 block at payload byte {}: {e}", out.len()))?;
        out.extend_from_slice(&block[..got]);
        data = &data[4 + n..];
    }
    if !out.starts_with(b"\x7fELF") {
        bail!("the decompressed payload is not an ELF");
    }
    Ok(out)
}

/// `System.map`: symbol → address, and addresses in order.
pub struct SystemMap {
    by_name: BTreeMap<String, u64>,
    by_addr: BTreeMap<u64, Vec<String>>,
}

impl SystemMap {
    pub fn parse(text: &str) -> Result<SystemMap> {
        let (mut by_name, mut by_addr) = (BTreeMap::new(), BTreeMap::<u64, Vec<String>>::new());
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(_kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            by_name.entry(name.to_string()).or_insert(addr);
            by_addr.entry(addr).or_default().push(name.to_string());
        }
        if !by_name.contains_key("_stext") {
            bail!(
                "not a kernel System.map (no _stext); Debian's image package ships a placeholder — the real one is in linux-image-…-dbg (scripts/build-client.sh extracts it)"
            );
        }
        Ok(SystemMap { by_name, by_addr })
    }

    pub fn addr(&self, name: &str) -> Result<u64> {
        self.by_name.get(name).copied().with_context(|| format!("System.map has no `{name}`"))
    }

    fn next_after(&self, addr: u64) -> Result<u64> {
        self.by_addr.range(addr + 1..).next().map(|(a, _)| *a).context("no symbol after it in System.map")
    }

    /// The symbol containing `addr` and the offset into it.
    /// (Of several names at one address, a syscall's `__x64_sys_` one.)
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let (a, names) = self.by_addr.range(..=addr).next_back()?;
        let name = names.iter().find(|n| n.starts_with("__x64_sys_")).unwrap_or(&names[0]);
        Some((name.as_str(), addr - a))
    }

    fn syscall_name(&self, target: u64) -> String {
        let names = self.by_addr.get(&target).map(Vec::as_slice).unwrap_or_default();
        let x64 = names.iter().find_map(|n| n.strip_prefix("__x64_sys_"));
        match (x64, names.first()) {
            (Some(n), _) => n.to_string(),
            (None, Some(n)) if n.contains("ni_syscall") => "ni_syscall".into(),
            (None, Some(n)) => n.clone(),
            (None, None) => format!("{target:#x}"),
        }
    }
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    let types = btf.resolve_types_by_name(name).map_err(|e| anyhow!("BTF has no `{name}`: {e}"))?;
    types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .with_context(|| format!("BTF has no struct `{name}` with members"))
}

/// The type behind typedefs and qualifiers.
fn strip(btf: &Btf, mut t: Type) -> Result<Type> {
    for _ in 0..32 {
        match &t {
            Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                let bt = t.as_btf_type().expect("a chained type");
                t = btf.resolve_chained_type(bt).map_err(|e| anyhow!("BTF: {e}"))?;
            }
            _ => return Ok(t),
        }
    }
    bail!("BTF type chain too long")
}

/// Finds member `name` in `s` (looking into anonymous structs and unions):
/// its byte offset and type.
fn member(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).map_err(|e| anyhow!("BTF: {e}"))?;
        if mname == name {
            return Ok(Some((m.bit_offset() / 8, ty)));
        }
        if mname.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = strip(btf, ty)?
            && let Some((o, t)) = member(btf, &inner, name)?
        {
            return Ok(Some((m.bit_offset() / 8 + o, t)));
        }
    }
    Ok(None)
}

/// Byte offset of `path` (`a.b.c`) in struct `ty`.
pub fn member_offset(btf: &Btf, ty: &str, path: &str) -> Result<u32> {
    Ok(resolve_path(btf, ty, path)?.0)
}

fn resolve_path(btf: &Btf, ty: &str, path: &str) -> Result<(u32, Type)> {
    let mut s = find_struct(btf, ty)?;
    let mut offset = 0;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (o, t) = member(btf, &s, part)?.with_context(|| format!("struct {ty} has no member `{path}` in BTF"))?;
        offset += o;
        if i + 1 == parts.len() {
            return Ok((offset, t));
        }
        s = match strip(btf, t)? {
            Type::Struct(x) | Type::Union(x) => x,
            _ => bail!("`{part}` in struct {ty} is not a struct"),
        };
    }
    unreachable!("a path has at least one part")
}

fn array_len(btf: &Btf, ty: &str, path: &str) -> Result<u32> {
    match strip(btf, resolve_path(btf, ty, path)?.1)? {
        Type::Array(a) => Ok(a.len() as u32),
        _ => bail!("{ty}.{path} is not an array"),
    }
}

fn struct_size(btf: &Btf, ty: &str) -> Result<u32> {
    Ok(find_struct(btf, ty)?.size() as u32)
}

/// One line per fact, for `ssc profile build|show`.
pub fn describe(p: &Profile) -> String {
    let hooked_names = ["read", "write", "getppid", "finit_module"];
    let sample: Vec<String> =
        hooked_names.iter().filter_map(|n| p.syscall_nr(n).map(|nr| format!("{n}={nr}"))).collect();
    format!(
        "kernel {} (build id {})\n\
         text {:#x}..{:#x}, init_task {:#x}, sys_call_table {:#x} ({} entries: {}), idt_table {:#x}\n\
         task_struct: tasks +{}, pid +{}, comm +{}, mm +{}, stack +{}, children +{}, sibling +{}; \
         pt_regs {} bytes (orig_ax +{}); module: list +{}, name +{} [{}], core base +{}",
        p.release,
        p.build_id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        p.symbols.text_start,
        p.symbols.text_end,
        p.symbols.init_task,
        p.symbols.sys_call_table,
        p.syscalls.len(),
        sample.join(" "),
        p.symbols.idt_table,
        p.task.tasks,
        p.task.pid,
        p.task.comm,
        p.task.mm,
        p.task.stack,
        p.task.children,
        p.task.sibling,
        p.pt_regs_size,
        p.pt_regs_orig_ax,
        p.module.list,
        p.module.name,
        p.module.name_len,
        p.module.base,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_system_map_is_refused_with_the_fix() {
        let e =
            SystemMap::parse("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
                .err()
                .unwrap();
        assert!(e.to_string().contains("-dbg"), "{e}");
    }

    #[test]
    fn syscall_names_prefer_the_x64_alias() {
        let m = SystemMap::parse(
            "ffffffff81000000 T _stext\nffffffff81000100 T __ia32_sys_read\nffffffff81000100 T __x64_sys_read\nffffffff81000200 T __x64_sys_ni_syscall\nffffffff81000300 T sys_ni_syscall\n",
        )
        .unwrap();
        assert_eq!(m.syscall_name(0xffffffff81000100), "read");
        assert_eq!(m.syscall_name(0xffffffff81000200), "ni_syscall");
        assert_eq!(m.syscall_name(0xffffffff81000300), "ni_syscall");
        assert_eq!(m.symbolize(0xffffffff81000110), Some(("__x64_sys_read", 0x10)));
        assert_eq!(m.symbolize(0xffffffff81000301), Some(("sys_ni_syscall", 0x1)));
    }

    #[test]
    fn garbage_images_are_refused_by_name() {
        assert!(
            vmlinux(b"not a kernel at all, not even close to one, really").unwrap_err().to_string().contains("bzImage")
        );
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(vmlinux(&bz).unwrap_err().to_string().contains("truncated"));
    }
}
