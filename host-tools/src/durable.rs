//! Records that protect against rollback or loss (a volume's generation,
//! the checkpoint record, provider quotas, catalog manifests) are replaced
//! whole: a power cut at any point leaves the old record or the new one,
//! never a mix, never an empty file; a record reported written is on disk;
//! and a symlink planted beside or at the record never redirects the
//! write.
//!
//! The steps, in [`replace`]: create a fresh temporary file beside the
//! record (`O_CREAT|O_EXCL`, mode 0600, a random name: a name an attacker
//! prepared, symlink or not, is refused, never followed), write it,
//! `fsync` it, rename it over the record (which replaces a symlink at the
//! record's name rather than writing through it), `fsync` the directory.
//! [`RecordFs`] is that filesystem surface, so the tests can cut power
//! after every step on a model that forgets whatever was not synced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};

/// The filesystem operations [`replace`] uses.
pub trait RecordFs {
    type File;
    /// Creates `path`, which must not exist (not even as a symlink).
    fn create_new(&mut self, path: &Path) -> std::io::Result<Self::File>;
    fn write_all(&mut self, file: &mut Self::File, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self, file: &mut Self::File) -> std::io::Result<()>;
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()>;
    fn remove(&mut self, path: &Path) -> std::io::Result<()>;
}

/// The real filesystem; new records get `mode`.
pub struct Disk {
    pub mode: u32,
}

impl RecordFs for Disk {
    type File = File;
    fn create_new(&mut self, path: &Path) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
    }
    fn write_all(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        file.write_all(bytes)
    }
    fn sync(&mut self, file: &mut File) -> std::io::Result<()> {
        file.sync_all()
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// Replaces the record at `path` with `bytes` on the real filesystem,
/// readable by its owner only (mode 0600).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(&mut Disk { mode: 0o600 }, path, bytes, &fresh_suffix()?)
}

/// Like [`write`], for a record others may read (mode 0644: a catalog).
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    replace(&mut Disk { mode: 0o644 }, path, bytes, &fresh_suffix()?)
}

fn fresh_suffix() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut r = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut r).map_err(|_| anyhow!("no randomness for a temporary name"))?;
    Ok(crate::catalog::hex(&r))
}

/// The temporary file beside `path` for one write.
fn temp_path(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{suffix}"));
    Ok(path.with_file_name(tmp))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes the directory entry of `path` (a file just created) durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    Disk { mode: 0 }.sync_dir(&dir).with_context(|| format!("syncing {}", dir.display()))
}

/// Replaces the record at `path` with `bytes` through `fs`; `suffix` makes
/// the temporary name fresh.
pub fn replace<F: RecordFs>(fs: &mut F, path: &Path, bytes: &[u8], suffix: &str) -> Result<()> {
    let tmp = temp_path(path, suffix)?;
    let dir = parent_dir(path);
    let mut f = fs.create_new(&tmp).with_context(|| {
        format!("creating {} (a file of that name exists: refusing to write through it)", tmp.display())
    })?;
    let written = fs
        .write_all(&mut f, bytes)
        .and_then(|()| fs.sync(&mut f))
        .and_then(|()| fs.rename(&tmp, path))
        .with_context(|| format!("replacing {}", path.display()));
    if written.is_err() {
        let _ = fs.remove(&tmp);
        return written;
    }
    fs.sync_dir(&dir).with_context(|| format!("syncing {} after replacing {}", dir.display(), path.display()))
}

#[cfg(test)]
mod tests;
