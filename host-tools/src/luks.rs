//! LUKS1 on the tenant side: the tenant tool holds the passphrase, unlocks a
//! keyslot and hands the storage SD only the data segment's parameters and
//! volume key — the SD never sees the passphrase, and the provider's volume
//! keeps a standard LUKS1 header that QEMU's `luks` driver and cryptsetup
//! read.
//!
//! Supported: `aes` / `xts-plain64` with a 512-bit volume key, keyslot hash
//! sha1 or sha256 (what `qemu-img create -f luks` and `cryptsetup
//! --type luks1` write by default). LUKS1 IVs count 512-byte sectors from
//! the start of the payload.
//!
//! Unlock (LUKS1 on-disk format, v1.2.3): for each active keyslot, derive a
//! key with PBKDF2(hash, passphrase, slot salt, slot iterations), decrypt
//! the slot's key material (aes-xts-plain64, IVs from 0), merge the
//! anti-forensic stripes (XOR with hash diffusion between stripes), and
//! accept the result if PBKDF2(hash, candidate, mk salt, mk iterations)
//! equals the header's master-key digest.

use std::path::Path;

use anyhow::{Context, Result, bail};
use sd_storage_crypt::xts::Xts;
use sha2::Digest;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// The header comes from the provider's volume, so it is untrusted: bounds
/// that keep a hostile header from making the tenant tool allocate
/// gigabytes or run PBKDF2 for hours (cryptsetup writes 4000 stripes and
/// iteration counts in the low millions).
const MAX_STRIPES: usize = 65_536;
const MAX_ITERATIONS: u32 = 100_000_000;

/// What the storage SD needs to serve a LUKS1 volume's data segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Unlocked {
    pub key: Vec<u8>,
    /// Bytes of header before the payload.
    pub data_offset: u64,
    pub slot: usize,
}

impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unlocked {{ key: <{} bytes>, data_offset: {}, slot: {} }}",
            self.key.len(),
            self.data_offset,
            self.slot
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(parts),
            Hash::Sha256 => run::<sha2::Sha256>(parts),
        }
    }
}

fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Anti-forensic merge (LUKS1 AF_merge).
fn af_merge(hash: Hash, material: &[u8], key_bytes: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_bytes];
    for stripe in material.chunks(key_bytes).take(stripes - 1) {
        for (x, y) in d.iter_mut().zip(stripe) {
            *x ^= y;
        }
        // diffuse: each digest-sized chunk j becomes H(be32(j) || chunk)
        let digest_len = hash.digest(&[]).len();
        let mut out = Vec::with_capacity(key_bytes);
        for (j, chunk) in d.chunks(digest_len).enumerate() {
            let h = hash.digest(&[&(j as u32).to_be_bytes(), chunk]);
            out.extend_from_slice(&h[..chunk.len()]);
        }
        d = out;
    }
    let last = &material[(stripes - 1) * key_bytes..stripes * key_bytes];
    d.iter().zip(last).map(|(a, b)| a ^ b).collect()
}

/// Unlocks a LUKS1 volume with `passphrase`.
pub fn unlock(path: &Path, passphrase: &[u8]) -> Result<Unlocked> {
    let file = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display();
    if file.len() < 592 || &file[..6] != MAGIC {
        bail!("{name} is not a LUKS volume (no LUKS magic)");
    }
    let version = u16::from_be_bytes([file[6], file[7]]);
    if version != 1 {
        bail!("{name} is LUKS version {version}; this tool unlocks LUKS1 (for LUKS2, pass the volume key and offset)");
    }
    let (cipher, mode, hash) = (cstr(&file[8..40]), cstr(&file[40..72]), cstr(&file[72..104]));
    if cipher != "aes" || mode != "xts-plain64" {
        bail!("{name} uses {cipher}-{mode}; the storage SD serves aes-xts-plain64");
    }
    let hash = match hash.as_str() {
        "sha1" => Hash::Sha1,
        "sha256" => Hash::Sha256,
        other => bail!("{name}: keyslot hash {other} is not supported (sha1, sha256)"),
    };
    let payload_offset = u64::from(be32(&file, 104)) * 512;
    let key_bytes = be32(&file, 108) as usize;
    if key_bytes != 64 {
        bail!("{name} has a {}-bit volume key; the storage SD serves AES-256-XTS (512-bit keys)", key_bytes * 8);
    }
    let (mk_digest, mk_salt, mk_iter) = (&file[112..132], &file[132..164], be32(&file, 164));
    if mk_iter == 0 || mk_iter > MAX_ITERATIONS {
        bail!("{name}: master-key digest iteration count {mk_iter} is implausible; refusing this header");
    }
    for slot in 0..8 {
        let s = 208 + slot * 48;
        if be32(&file, s) != SLOT_ACTIVE {
            continue;
        }
        let (iterations, salt) = (be32(&file, s + 4), &file[s + 8..s + 40]);
        let (material_at, stripes) = (be32(&file, s + 40) as usize * 512, be32(&file, s + 44) as usize);
        if stripes == 0 || stripes > MAX_STRIPES || iterations == 0 || iterations > MAX_ITERATIONS {
            bail!(
                "{name}: keyslot {slot} has implausible parameters ({stripes} stripes, {iterations} iterations); refusing this header"
            );
        }
        let len = key_bytes * stripes;
        let Some(material) = file.get(material_at..material_at + len.next_multiple_of(512)) else {
            bail!("{name}: keyslot {slot} points past the end of the file (truncated header?)");
        };
        let mut slot_key = vec![0u8; key_bytes];
        hash.pbkdf2(passphrase, salt, iterations, &mut slot_key);
        let mut material = material.to_vec();
        let x = Xts::new(&slot_key).expect("64-byte key");
        for (i, sector) in material.chunks_mut(512).enumerate() {
            x.decrypt_sector(i as u64, sector);
        }
        let candidate = af_merge(hash, &material, key_bytes, stripes);
        let mut digest = [0u8; 20];
        hash.pbkdf2(&candidate, mk_salt, mk_iter, &mut digest);
        if digest == mk_digest {
            return Ok(Unlocked { key: candidate, data_offset: payload_offset, slot });
        }
    }
    bail!("wrong passphrase for {name}: no keyslot opens with it")
}

/// Creates a LUKS1 volume with QEMU's own tool (`qemu-img create -f luks`:
/// aes-256-xts-plain64, sha256) — the baseline and interop peer. A short
/// `iter_time_ms` keeps tests fast; QEMU's PBKDF2 calibration then sometimes
/// fails under load ("Unable to get accurate CPU usage"), so that failure is
/// retried.
pub fn qemu_img_create(path: &Path, size: &str, passphrase: &str, iter_time_ms: u32) -> Result<()> {
    let mut last = String::new();
    for _ in 0..5 {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object", &format!("secret,id=sec0,data={passphrase}")])
            .args(["-o", &format!("key-secret=sec0,iter-time={iter_time_ms}")])
            .arg(path)
            .arg(size)
            .output()
            .context("running qemu-img (install qemu-utils: `make deps`)")?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("accurate CPU usage") {
            break;
        }
        let _ = std::fs::remove_file(path);
    }
    bail!("qemu-img create -f luks {}: {}", path.display(), last.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A LUKS1 header with one active slot whose fields come from the test.
    fn header(iter: u32, stripes: u32, material_sector: u32, mk_iter: u32, tail: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 592];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..11].copy_from_slice(b"aes");
        h[40..51].copy_from_slice(b"xts-plain64");
        h[72..78].copy_from_slice(b"sha256");
        h[104..108].copy_from_slice(&4096u32.to_be_bytes());
        h[108..112].copy_from_slice(&64u32.to_be_bytes());
        h[164..168].copy_from_slice(&mk_iter.to_be_bytes());
        h[208..212].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
        h[212..216].copy_from_slice(&iter.to_be_bytes());
        h[248..252].copy_from_slice(&material_sector.to_be_bytes());
        h[252..256].copy_from_slice(&stripes.to_be_bytes());
        h.extend_from_slice(tail);
        h
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hostile_headers_are_refused_without_panics_or_stalls(
            iter in prop_oneof![Just(0u32), Just(u32::MAX), 1u32..50],
            stripes in prop_oneof![Just(0u32), Just(u32::MAX), 1u32..8],
            sector in prop_oneof![Just(u32::MAX), 0u32..4],
            mk_iter in prop_oneof![Just(0u32), Just(u32::MAX), 1u32..50],
            tail in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("h");
            std::fs::write(&p, header(iter, stripes, sector, mk_iter, &tail)).unwrap();
            let start = std::time::Instant::now();
            prop_assert!(unlock(&p, b"pass").is_err());
            prop_assert!(start.elapsed() < std::time::Duration::from_secs(5));
        }
    }

    #[test]
    fn zero_stripes_and_huge_counts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        std::fs::write(&p, header(10, 0, 1, 10, &[0; 1024])).unwrap();
        assert!(unlock(&p, b"x").unwrap_err().to_string().contains("implausible"));
        std::fs::write(&p, header(10, 4000, 1, u32::MAX, &[0; 1024])).unwrap();
        assert!(unlock(&p, b"x").unwrap_err().to_string().contains("implausible"));
    }
}
