//! LUKS1 and LUKS2 on the tenant side: the tenant tool holds the
//! passphrase, unlocks a keyslot and hands the storage SD only the data
//! segment's parameters and volume key — the SD never sees the passphrase,
//! and the provider's volume keeps a standard LUKS header that cryptsetup
//! (and, for LUKS1, QEMU's `luks` driver) reads.
//!
//! Supported: `aes` / `xts-plain64` with a 512-bit volume key, keyslot hash
//! sha1 or sha256 (what `qemu-img create -f luks` and `cryptsetup
//! --type luks1` write by default). LUKS1 IVs count 512-byte sectors from
//! the start of the payload. LUKS2 (cryptsetup's default format): the
//! binary header and JSON area (primary, or a secondary copy when the
//! primary's SHA-256 checksum fails; the valid one with the highest seqid),
//! `luks2` keyslots with `pbkdf2`, `argon2i` or `argon2id` KDFs (the
//! `argon2` crate; cryptsetup's default is argon2id), `luks1` AF stripes,
//! `pbkdf2` digests, and `crypt` segments with their own sector size (512
//! or 4096; IVs still count 512-byte units) and IV tweak.
//!
//! Unlock (LUKS1 on-disk format, v1.2.3): for each active keyslot, derive a
//! key with PBKDF2(hash, passphrase, slot salt, slot iterations), decrypt
//! the slot's key material (aes-xts-plain64, IVs from 0), merge the
//! anti-forensic stripes (XOR with hash diffusion between stripes), and
//! accept the result if PBKDF2(hash, candidate, mk salt, mk iterations)
//! equals the header's master-key digest.
//!
//! The header is the provider's (it sits on the provider's volume), so
//! every field is untrusted: bounds keep it from making the tenant tool
//! allocate gigabytes or derive keys for hours, and the `luks_header` fuzz
//! target (`host-tools/luks/fuzz`) feeds it arbitrary headers. A crate of
//! its own so that the fuzz build does not drag in the rest of the host
//! tools.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use sd_storage_crypt::xts::Xts;
use sha2::Digest;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
/// The header comes from the provider's volume, so it is untrusted: bounds
/// that keep a hostile header from making the tenant tool allocate
/// gigabytes or derive keys for hours.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub stripes: usize,
    /// PBKDF2 iterations (keyslots and digests).
    pub iterations: u32,
    pub argon2_kib: u32,
    pub argon2_time: u32,
    pub argon2_lanes: u32,
}

impl Limits {
    /// What cryptsetup writes with room to spare: 4000 stripes and
    /// iteration counts in the low millions; argon2 up to its 4 GiB
    /// ceiling, 4 lanes by default (we accept 16), a time cost it never
    /// exceeds in practice.
    pub const CRYPTSETUP: Limits =
        Limits { stripes: 65_536, iterations: 100_000_000, argon2_kib: 4 << 20, argon2_time: 1_000, argon2_lanes: 16 };
}

/// What the storage SD needs to serve a LUKS volume's data segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Unlocked {
    pub key: Vec<u8>,
    /// Bytes of header before the payload.
    pub data_offset: u64,
    pub slot: usize,
    /// 1 or 2.
    pub version: u16,
    /// The data segment's sector size (512 for LUKS1).
    pub sector_size: u32,
    /// Added to IVs (LUKS2's `iv_tweak`; 0 for LUKS1).
    pub iv_offset: u64,
}

impl std::fmt::Debug for Unlocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unlocked {{ key: <{} bytes>, LUKS{}, data_offset: {}, sector_size: {}, iv_offset: {}, slot: {} }}",
            self.key.len(),
            self.version,
            self.data_offset,
            self.sector_size,
            self.iv_offset,
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
    fn parse(name: &str, what: &str) -> Result<Hash> {
        match name {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            other => bail!("{what}: hash {other} is not supported (sha1, sha256)"),
        }
    }

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

/// Where a LUKS header is read from: a volume file, or bytes (tests, the
/// fuzz target).
pub trait Source {
    fn size(&self) -> Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()>;
}

impl Source for std::fs::File {
    fn size(&self) -> Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        Ok(FileExt::read_exact_at(self, buf, at)?)
    }
}

/// A volume image in memory.
pub struct Bytes<'a>(pub &'a [u8]);

impl Source for Bytes<'_> {
    fn size(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        let start = usize::try_from(at).map_err(|_| anyhow!("offset {at} is out of range"))?;
        let end = start.checked_add(buf.len()).filter(|&e| e <= self.0.len());
        let end = end.ok_or_else(|| anyhow!("{} bytes at {at} are past the end", buf.len()))?;
        buf.copy_from_slice(&self.0[start..end]);
        Ok(())
    }
}

/// Reads `len` bytes at `at`, refusing ranges past the end of the file.
fn read_range(f: &dyn Source, at: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let size = f.size()?;
    if at.checked_add(len as u64).is_none_or(|end| end > size) {
        bail!("{what} points past the end of the file (truncated header?)");
    }
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at)?;
    Ok(buf)
}

/// Decrypts keyslot material (aes-xts-plain64, IVs from 0 in 512-byte
/// sectors) and merges its stripes.
fn open_material(hash: Hash, slot_key: &[u8], mut material: Vec<u8>, key_bytes: usize, stripes: usize) -> Vec<u8> {
    let x = Xts::new(slot_key).expect("64-byte key");
    for (i, sector) in material.chunks_mut(512).enumerate() {
        x.decrypt_sector(i as u64, sector);
    }
    af_merge(hash, &material, key_bytes, stripes)
}

/// Unlocks a LUKS1 or LUKS2 volume with `passphrase`. Only the header and
/// keyslot areas are read, never the data.
pub fn unlock(path: &Path, passphrase: &[u8]) -> Result<Unlocked> {
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    unlock_from(&f, &path.display().to_string(), passphrase, &Limits::CRYPTSETUP)
}

/// [`unlock`] on any [`Source`] within `limits`; `name` names it in errors.
pub fn unlock_from(f: &dyn Source, name: &str, passphrase: &[u8], limits: &Limits) -> Result<Unlocked> {
    let mut head = [0u8; 592];
    if f.read_exact_at(&mut head, 0).is_err() || &head[..6] != MAGIC {
        bail!("{name} is not a LUKS volume (no LUKS magic)");
    }
    match u16::from_be_bytes([head[6], head[7]]) {
        1 => unlock_luks1(f, &head, name, passphrase, limits),
        2 => unlock_luks2(f, name, passphrase, limits),
        v => bail!("{name} is LUKS version {v}; this tool unlocks LUKS1 and LUKS2"),
    }
}

fn unlock_luks1(f: &dyn Source, file: &[u8; 592], name: &str, passphrase: &[u8], limits: &Limits) -> Result<Unlocked> {
    let (cipher, mode, hash) = (cstr(&file[8..40]), cstr(&file[40..72]), cstr(&file[72..104]));
    if cipher != "aes" || mode != "xts-plain64" {
        bail!("{name} uses {cipher}-{mode}; the storage SD serves aes-xts-plain64");
    }
    let hash = Hash::parse(&hash, &format!("{name}: keyslot"))?;
    let payload_offset = u64::from(be32(file, 104)) * 512;
    let key_bytes = be32(file, 108) as usize;
    if key_bytes != 64 {
        bail!("{name} has a {}-bit volume key; the storage SD serves AES-256-XTS (512-bit keys)", key_bytes * 8);
    }
    let (mk_digest, mk_salt, mk_iter) = (&file[112..132], &file[132..164], be32(file, 164));
    if mk_iter == 0 || mk_iter > limits.iterations {
        bail!("{name}: master-key digest iteration count {mk_iter} is implausible; refusing this header");
    }
    for slot in 0..8 {
        let s = 208 + slot * 48;
        if be32(file, s) != SLOT_ACTIVE {
            continue;
        }
        let (iterations, salt) = (be32(file, s + 4), &file[s + 8..s + 40]);
        let (material_at, stripes) = (u64::from(be32(file, s + 40)) * 512, be32(file, s + 44) as usize);
        if stripes == 0 || stripes > limits.stripes || iterations == 0 || iterations > limits.iterations {
            bail!(
                "{name}: keyslot {slot} has implausible parameters ({stripes} stripes, {iterations} iterations); refusing this header"
            );
        }
        let len = (key_bytes * stripes).next_multiple_of(512);
        let material = read_range(f, material_at, len, &format!("{name}: keyslot {slot}"))?;
        let mut slot_key = vec![0u8; key_bytes];
        hash.pbkdf2(passphrase, salt, iterations, &mut slot_key);
        let candidate = open_material(hash, &slot_key, material, key_bytes, stripes);
        let mut digest = [0u8; 20];
        hash.pbkdf2(&candidate, mk_salt, mk_iter, &mut digest);
        if digest == mk_digest {
            return Ok(Unlocked {
                key: candidate,
                data_offset: payload_offset,
                slot,
                version: 1,
                sector_size: 512,
                iv_offset: 0,
            });
        }
    }
    bail!("wrong passphrase for {name}: no keyslot opens with it")
}

/// Where LUKS2 may keep its secondary header (the spec's fixed offsets).
const LUKS2_SECONDARY: [u64; 9] =
    [0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000];

/// One LUKS2 header copy at `at`: its seqid and JSON, if its magic, size
/// and SHA-256 checksum hold.
fn luks2_header(f: &dyn Source, at: u64) -> Option<(u64, serde_json::Value)> {
    let bin = read_range(f, at, 4096, "").ok()?;
    // The secondary copy's magic is "SKUL\xba\xbe".
    let magic: &[u8] = if at == 0 { MAGIC } else { b"SKUL\xba\xbe" };
    if &bin[..6] != magic || u16::from_be_bytes([bin[6], bin[7]]) != 2 {
        return None;
    }
    let be64 = |i: usize| u64::from_be_bytes(bin[i..i + 8].try_into().expect("8 bytes"));
    let (hdr_size, seqid, offset) = (be64(8), be64(16), be64(256));
    if !(0x4000..=0x40_0000).contains(&hdr_size) || offset != at || cstr(&bin[72..104]) != "sha256" {
        return None;
    }
    let mut area = read_range(f, at, hdr_size as usize, "").ok()?;
    let stored: Vec<u8> = area[448..480].to_vec();
    area[448..512].fill(0);
    if sha2::Sha256::digest(&area)[..] != stored[..] {
        return None;
    }
    let json = &area[4096..];
    let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
    serde_json::from_slice(&json[..end]).ok().map(|v| (seqid, v))
}

fn json_u64(v: &serde_json::Value, what: &str) -> Result<u64> {
    match v {
        serde_json::Value::String(s) => s.parse().map_err(|_| anyhow!("{what}: `{s}` is not a number")),
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| anyhow!("{what}: {n} is not a number")),
        _ => bail!("{what} is missing"),
    }
}

fn json_str<'a>(v: &'a serde_json::Value, what: &str) -> Result<&'a str> {
    v.as_str().ok_or_else(|| anyhow!("{what} is missing"))
}

fn json_b64(v: &serde_json::Value, what: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(json_str(v, what)?).map_err(|_| anyhow!("{what} is not base64"))
}

/// Derives a LUKS2 keyslot's area key from its `kdf` object.
fn luks2_kdf(kdf: &serde_json::Value, passphrase: &[u8], out: &mut [u8], what: &str, limits: &Limits) -> Result<()> {
    let salt = json_b64(&kdf["salt"], &format!("{what}: kdf salt"))?;
    match json_str(&kdf["type"], &format!("{what}: kdf type"))? {
        "pbkdf2" => {
            let hash = Hash::parse(json_str(&kdf["hash"], &format!("{what}: kdf hash"))?, what)?;
            let iterations = json_u64(&kdf["iterations"], &format!("{what}: kdf iterations"))?;
            if iterations == 0 || iterations > u64::from(limits.iterations) {
                bail!("{what}: {iterations} PBKDF2 iterations is implausible; refusing this header");
            }
            hash.pbkdf2(passphrase, &salt, iterations as u32, out);
        }
        kind @ ("argon2i" | "argon2id") => {
            let time = json_u64(&kdf["time"], &format!("{what}: kdf time"))?;
            let memory = json_u64(&kdf["memory"], &format!("{what}: kdf memory"))?;
            let cpus = json_u64(&kdf["cpus"], &format!("{what}: kdf cpus"))?;
            if time == 0
                || time > u64::from(limits.argon2_time)
                || memory > u64::from(limits.argon2_kib)
                || cpus == 0
                || cpus > u64::from(limits.argon2_lanes)
            {
                bail!(
                    "{what}: argon2 parameters (time {time}, memory {memory} KiB, {cpus} lanes) are implausible; refusing this header"
                );
            }
            let algorithm = if kind == "argon2i" { argon2::Algorithm::Argon2i } else { argon2::Algorithm::Argon2id };
            let params = argon2::Params::new(memory as u32, time as u32, cpus as u32, Some(out.len()))
                .map_err(|e| anyhow!("{what}: argon2 parameters: {e}"))?;
            argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
                .hash_password_into(passphrase, &salt, out)
                .map_err(|e| anyhow!("{what}: argon2: {e}"))?;
        }
        other => bail!("{what}: KDF {other} is not supported (pbkdf2, argon2i, argon2id)"),
    }
    Ok(())
}

fn unlock_luks2(f: &dyn Source, name: &str, passphrase: &[u8], limits: &Limits) -> Result<Unlocked> {
    let header = std::iter::once(0)
        .chain(LUKS2_SECONDARY)
        .filter_map(|at| luks2_header(f, at))
        .max_by_key(|(seqid, _)| *seqid)
        .map(|(_, json)| json)
        .ok_or_else(|| anyhow!("{name}: no LUKS2 header copy passes its checksum (damaged or tampered)"))?;
    let keyslots = header["keyslots"].as_object().ok_or_else(|| anyhow!("{name}: LUKS2 header has no keyslots"))?;
    let mut ids: Vec<(usize, &String)> = keyslots.keys().filter_map(|k| k.parse().ok().map(|n| (n, k))).collect();
    ids.sort();
    let mut tried = 0;
    for (slot, id) in ids {
        let ks = &keyslots[id];
        let what = format!("{name}: keyslot {slot}");
        if ks["type"] != "luks2" {
            continue;
        }
        let key_bytes = json_u64(&ks["key_size"], &format!("{what}: key_size"))? as usize;
        if key_bytes != 64 {
            bail!("{what}: a {}-bit volume key; the storage SD serves AES-256-XTS (512-bit keys)", key_bytes * 8);
        }
        let area = &ks["area"];
        if area["type"] != "raw" || area["encryption"] != "aes-xts-plain64" || json_u64(&area["key_size"], &what)? != 64
        {
            bail!("{what}: keyslot area {} is not raw aes-xts-plain64 with a 512-bit key", area["encryption"]);
        }
        let af = &ks["af"];
        let stripes = json_u64(&af["stripes"], &format!("{what}: stripes"))? as usize;
        if af["type"] != "luks1" || stripes == 0 || stripes > limits.stripes {
            bail!("{what}: anti-forensic splitter {} with {stripes} stripes is not supported", af["type"]);
        }
        let af_hash = Hash::parse(json_str(&af["hash"], &format!("{what}: af hash"))?, &what)?;
        let len = (key_bytes * stripes).next_multiple_of(512);
        if json_u64(&area["size"], &format!("{what}: area size"))? < len as u64 {
            bail!("{what}: keyslot area is smaller than its key material");
        }
        let material = read_range(f, json_u64(&area["offset"], &format!("{what}: area offset"))?, len, &what)?;
        let mut area_key = vec![0u8; 64];
        luks2_kdf(&ks["kdf"], passphrase, &mut area_key, &what, limits)?;
        tried += 1;
        let candidate = open_material(af_hash, &area_key, material, key_bytes, stripes);
        // The digest that covers this keyslot decides, and names the segment.
        let digests = header["digests"].as_object().into_iter().flat_map(|d| d.values());
        for d in digests {
            let covers = d["keyslots"].as_array().is_some_and(|k| k.iter().any(|k| k.as_str() == Some(id.as_str())));
            if !covers || d["type"] != "pbkdf2" {
                continue;
            }
            let expected = json_b64(&d["digest"], &format!("{name}: digest"))?;
            let iterations = json_u64(&d["iterations"], &format!("{name}: digest iterations"))?;
            if expected.is_empty()
                || expected.len() > 64
                || iterations == 0
                || iterations > u64::from(limits.iterations)
            {
                bail!("{name}: digest parameters are implausible; refusing this header");
            }
            let hash = Hash::parse(json_str(&d["hash"], &format!("{name}: digest hash"))?, name)?;
            let mut got = vec![0u8; expected.len()];
            hash.pbkdf2(
                &candidate,
                &json_b64(&d["salt"], &format!("{name}: digest salt"))?,
                iterations as u32,
                &mut got,
            );
            if got != expected {
                continue;
            }
            let seg_id = d["segments"].as_array().and_then(|s| s.first()).and_then(|s| s.as_str()).unwrap_or("0");
            let seg = &header["segments"][seg_id];
            if seg["type"] != "crypt" || seg["encryption"] != "aes-xts-plain64" {
                bail!(
                    "{name}: data segment {seg_id} is {} {}; the storage SD serves aes-xts-plain64",
                    seg["type"],
                    seg["encryption"]
                );
            }
            let sector_size = json_u64(&seg["sector_size"], &format!("{name}: segment sector_size"))?;
            if sector_size != 512 && sector_size != 4096 {
                bail!("{name}: segment sector size {sector_size} is not 512 or 4096");
            }
            return Ok(Unlocked {
                key: candidate,
                data_offset: json_u64(&seg["offset"], &format!("{name}: segment offset"))?,
                slot,
                version: 2,
                sector_size: sector_size as u32,
                iv_offset: json_u64(&seg["iv_tweak"], &format!("{name}: segment iv_tweak")).unwrap_or(0),
            });
        }
    }
    if tried == 0 {
        bail!("{name}: no usable LUKS2 keyslot");
    }
    bail!("wrong passphrase for {name}: no keyslot opens with it")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fuzz_seeds_are_cryptsetup_volumes_that_unlock_from_bytes() {
        // cryptsetup luksFormat (LUKS1 sha256, LUKS2 pbkdf2; 1000
        // iterations, passphrase "pass"), cut after the keyslot areas.
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/luks_header");
        let small = Limits { iterations: 2000, ..Limits::CRYPTSETUP };
        for (file, version) in [("luks1-sha256", 1), ("luks2-pbkdf2", 2)] {
            let bytes = std::fs::read(seeds.join(file)).unwrap();
            let u = unlock_from(&Bytes(&bytes), file, b"pass", &small).unwrap();
            assert_eq!((u.version, u.key.len()), (version, 64));
            let e = unlock_from(&Bytes(&bytes), file, b"wrong", &small).unwrap_err().to_string();
            assert!(e.contains("wrong passphrase"), "{e}");
            let tight = Limits { iterations: 999, ..small };
            let e = unlock_from(&Bytes(&bytes), file, b"pass", &tight).unwrap_err().to_string();
            assert!(e.contains("implausible"), "{e}");
        }
    }

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

    /// A LUKS2 primary header (16 KiB, valid checksum) around `json`.
    fn luks2(json: &str) -> Vec<u8> {
        let mut h = vec![0u8; 0x4000];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&0x4000u64.to_be_bytes());
        h[16..24].copy_from_slice(&1u64.to_be_bytes());
        h[72..78].copy_from_slice(b"sha256");
        h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let sum = sha2::Sha256::digest(&h);
        h[448..480].copy_from_slice(&sum);
        h.resize(1 << 20, 0);
        h
    }

    fn slot(kdf: &str, stripes: u32, offset: u64) -> String {
        format!(
            r#"{{"keyslots":{{"0":{{"type":"luks2","key_size":64,"af":{{"type":"luks1","stripes":{stripes},"hash":"sha256"}},
            "area":{{"type":"raw","offset":"{offset}","size":"258048","encryption":"aes-xts-plain64","key_size":64}},
            "kdf":{kdf}}}}},"segments":{{}},"digests":{{}}}}"#
        )
    }

    #[test]
    fn hostile_luks2_headers_are_refused_by_name_without_stalls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h");
        let salt = r#""salt":"c2FsdA==""#;
        let cases = [
            (
                slot(&format!(r#"{{"type":"argon2id","time":4,"memory":1099511627776,"cpus":1,{salt}}}"#), 4000, 32768),
                "implausible",
            ),
            (
                slot(&format!(r#"{{"type":"argon2id","time":4294967295,"memory":1024,"cpus":1,{salt}}}"#), 4000, 32768),
                "implausible",
            ),
            (
                slot(&format!(r#"{{"type":"pbkdf2","hash":"sha256","iterations":4294967295,{salt}}}"#), 4000, 32768),
                "implausible",
            ),
            (slot(&format!(r#"{{"type":"scrypt",{salt}}}"#), 4000, 32768), "not supported"),
            (slot(&format!(r#"{{"type":"pbkdf2","hash":"sha256","iterations":10,{salt}}}"#), 0, 32768), "stripes"),
            (
                slot(&format!(r#"{{"type":"pbkdf2","hash":"sha256","iterations":10,{salt}}}"#), 4000, 1 << 40),
                "past the end",
            ),
            (r#"{"keyslots":{}}"#.to_string(), "no usable LUKS2 keyslot"),
        ];
        for (json, want) in cases {
            std::fs::write(&p, luks2(&json)).unwrap();
            let start = std::time::Instant::now();
            let e = unlock(&p, b"x").unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
        }
        // A bad checksum (no secondary copy): named.
        let mut h = luks2(r#"{"keyslots":{}}"#);
        h[5000] = b'x';
        std::fs::write(&p, h).unwrap();
        assert!(unlock(&p, b"x").unwrap_err().to_string().contains("checksum"));
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
