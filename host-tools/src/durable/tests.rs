//! Power cuts after every step of [`replace`], on a model filesystem that
//! forgets what was not synced; symlinks planted by an attacker on the
//! real one.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind};

use super::*;

/// Names and file contents; a name refers to an inode.
#[derive(Clone, Default)]
struct State {
    names: BTreeMap<PathBuf, usize>,
    data: Vec<Vec<u8>>,
}

/// A filesystem where data is durable after `sync` of its file and a name
/// after `sync_dir`; a crash keeps only what is durable. Power goes after
/// `budget` operations: that operation fails (a write tears first if
/// `torn`), and so does every later one.
struct Model {
    live: State,
    durable: State,
    budget: usize,
    torn: bool,
    /// A plain error (no crash) instead of the power cut.
    error_only: bool,
    ops: usize,
}

impl Model {
    fn with_record(path: &Path, bytes: &[u8]) -> Model {
        let mut s = State::default();
        s.data.push(bytes.to_vec());
        s.names.insert(path.to_path_buf(), 0);
        Model { live: s.clone(), durable: s, budget: usize::MAX, torn: false, error_only: false, ops: 0 }
    }

    fn step(&mut self) -> std::io::Result<()> {
        self.ops += 1;
        if self.budget == 0 {
            return Err(Error::other(if self.error_only { "disk full" } else { "power cut" }));
        }
        self.budget -= 1;
        Ok(())
    }

    fn crash(&mut self) {
        self.live = self.durable.clone();
    }

    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        self.live.names.get(path).map(|&i| self.live.data[i].clone())
    }
}

impl RecordFs for Model {
    type File = usize;
    fn create_new(&mut self, path: &Path) -> std::io::Result<usize> {
        self.step()?;
        if self.live.names.contains_key(path) {
            return Err(ErrorKind::AlreadyExists.into());
        }
        let i = self.live.data.len();
        self.live.data.push(vec![]);
        self.durable.data.push(vec![]);
        self.live.names.insert(path.to_path_buf(), i);
        Ok(i)
    }
    fn write_all(&mut self, f: &mut usize, bytes: &[u8]) -> std::io::Result<()> {
        if self.budget == 0 && self.torn && !self.error_only {
            self.live.data[*f] = bytes[..bytes.len() / 2].to_vec();
        }
        self.step()?;
        self.live.data[*f] = bytes.to_vec();
        Ok(())
    }
    fn sync(&mut self, f: &mut usize) -> std::io::Result<()> {
        self.step()?;
        self.durable.data[*f] = self.live.data[*f].clone();
        Ok(())
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.step()?;
        let i = self.live.names.remove(from).ok_or(ErrorKind::NotFound)?;
        self.live.names.insert(to.to_path_buf(), i);
        Ok(())
    }
    fn sync_dir(&mut self, _dir: &Path) -> std::io::Result<()> {
        self.step()?;
        self.durable.names = self.live.names.clone();
        Ok(())
    }
    fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        self.step()?;
        self.live.names.remove(path).map(|_| ()).ok_or_else(|| ErrorKind::NotFound.into())
    }
}

const OLD: &[u8] = b"7\n";
const NEW: &[u8] = b"8 and a longer record\n";

#[test]
fn a_power_cut_after_any_step_leaves_the_old_record_or_the_new_one() {
    let path = Path::new("/tenant/vol.key.generation");
    let mut full = Model::with_record(path, OLD);
    replace(&mut full, path, NEW, "t").unwrap();
    let steps = full.ops;
    assert_eq!(steps, 5, "create, write, sync, rename, sync the directory");
    for torn in [false, true] {
        for cut in 0..=steps {
            let mut m = Model::with_record(path, OLD);
            m.budget = cut;
            m.torn = torn;
            let r = replace(&mut m, path, NEW, "t");
            m.crash();
            let got = m.read(path);
            if r.is_ok() {
                assert_eq!(got.as_deref(), Some(NEW), "reported written, lost at the cut after {cut} steps");
            } else {
                assert!(
                    got.as_deref() == Some(OLD) || got.as_deref() == Some(NEW),
                    "cut after {cut} steps (torn {torn}) left {got:?}"
                );
            }
        }
    }
}

#[test]
fn a_failed_write_names_the_record_keeps_the_old_one_and_leaves_no_temporary_file() {
    let path = Path::new("/tenant/vol.key.checkpoints");
    for fail in 1..4 {
        let mut m = Model::with_record(path, OLD);
        m.budget = fail;
        m.error_only = true;
        let e = format!("{:#}", replace(&mut m, path, NEW, "t").unwrap_err());
        assert!(e.contains("vol.key.checkpoints") && e.contains("disk full"), "{e}");
        assert_eq!(m.read(path).as_deref(), Some(OLD));
        // The removal failed too (the model fails every later step), so
        // only a retry's fresh name avoids the leftover; with a working
        // disk the temporary file is gone.
        let mut ok = Model::with_record(path, OLD);
        ok.budget = fail;
        ok.error_only = true;
        let _ = replace(&mut ok, path, NEW, "t");
        ok.budget = usize::MAX;
        replace(&mut ok, path, NEW, "u").unwrap();
        assert_eq!(ok.read(path).as_deref(), Some(NEW));
    }
    // A write that fails while the disk still works removes its temp file.
    struct FullDisk(Model);
    impl RecordFs for FullDisk {
        type File = usize;
        fn create_new(&mut self, p: &Path) -> std::io::Result<usize> {
            self.0.create_new(p)
        }
        fn write_all(&mut self, _: &mut usize, _: &[u8]) -> std::io::Result<()> {
            Err(Error::other("no space left on device"))
        }
        fn sync(&mut self, f: &mut usize) -> std::io::Result<()> {
            self.0.sync(f)
        }
        fn rename(&mut self, a: &Path, b: &Path) -> std::io::Result<()> {
            self.0.rename(a, b)
        }
        fn sync_dir(&mut self, d: &Path) -> std::io::Result<()> {
            self.0.sync_dir(d)
        }
        fn remove(&mut self, p: &Path) -> std::io::Result<()> {
            self.0.remove(p)
        }
    }
    let mut d = FullDisk(Model::with_record(path, OLD));
    let e = format!("{:#}", replace(&mut d, path, NEW, "t").unwrap_err());
    assert!(e.contains("no space left"), "{e}");
    assert_eq!(d.0.live.names.keys().collect::<Vec<_>>(), vec![path], "the temporary file stayed");
}

#[test]
fn a_symlink_planted_beside_a_record_does_not_redirect_its_write() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"the provider's bait").unwrap();
    let record = dir.path().join("vol.key.generation");
    std::fs::write(&record, OLD).unwrap();
    // Where the old code put its temporary file, and the record itself.
    symlink(&victim, dir.path().join("vol.key.generation.tmp")).unwrap();
    crate::chain::write_generation(&dir.path().join("vol.key"), 8).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"the provider's bait");
    assert_eq!(std::fs::read(&record).unwrap(), b"8\n");

    std::fs::remove_file(&record).unwrap();
    symlink(&victim, &record).unwrap();
    crate::chain::write_generation(&dir.path().join("vol.key"), 9).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"the provider's bait");
    assert!(std::fs::symlink_metadata(&record).unwrap().is_file(), "the record is a file of its own now");
    assert_eq!(std::fs::read(&record).unwrap(), b"9\n");

    // A prepared temporary name is refused by name, never written through.
    let tmp = temp_path(&record, "fixed").unwrap();
    symlink(&victim, &tmp).unwrap();
    let e = format!("{:#}", replace(&mut Disk { mode: 0o600 }, &record, b"10\n", "fixed").unwrap_err());
    assert!(e.contains("refusing to write through it"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"the provider's bait");
    assert_eq!(std::fs::read(&record).unwrap(), b"9\n");
}

#[test]
fn records_are_private_to_their_writer() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("quota.json");
    write(&p, b"{}").unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}
