//! The image catalog: a folder of signed manifests beside the images.
//!
//! For each image `NAME`, the catalog holds `NAME-VERSION.elf` and
//! `NAME.toml`:
//!
//! ```toml
//! [image]
//! name = "selftest"
//! version = "0.1.0"
//! file = "selftest-0.1.0.elf"
//! sha384 = "…"            # of the image file
//! permissions = []        # what Udom0 may grant it: mem-read, mem-write, …
//! offers = []             # link types it offers (e.g. "block")
//! needs = []              # link types it needs downstream
//! description = "…"
//! disks = 0               # virtio-blk disks it expects
//! links = []              # data links it opens by name
//!
//! [signature]
//! publisher = "…"         # Ed25519 public key, hex
//! ed25519 = "…"           # over "ssc-catalog-manifest-v1\n" + JSON of [image]
//! ```
//!
//! Trust is the verifier's: `verify` takes the publisher keys the tenant
//! trusts; a manifest signed by any other key is refused even if its
//! signature is valid. The signed bytes are the canonical JSON of the
//! `[image]` table (fixed field order), so any edit of any field after
//! signing breaks the signature, and a flipped byte of the image breaks
//! the digest.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Permissions an image may declare.
pub const PERMISSIONS: &[&str] = &["mem-read", "mem-write", "blk-interpose", "net", "hsm"];
const DOMAIN: &[u8] = b"ssc-catalog-manifest-v1\n";

/// The signed part of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub name: String,
    pub version: String,
    pub file: String,
    pub sha384: String,
    pub permissions: Vec<String>,
    pub offers: Vec<String>,
    pub needs: Vec<String>,
    pub description: String,
    /// Disks the image expects (virtio-blk, in order).
    #[serde(default)]
    pub disks: u32,
    /// Data links the image opens by name.
    #[serde(default)]
    pub links: Vec<String>,
    /// Memory windows (another domain's RAM) the image expects.
    #[serde(default)]
    pub windows: u32,
}

/// The publisher's signature over an [`ImageEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub publisher: String,
    pub ed25519: String,
}

/// A manifest file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub image: ImageEntry,
    pub signature: Signature,
}

/// One image of `kernels/images.toml`: what the catalog build publishes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    pub name: String,
    /// Binary name under the kernels target directory.
    pub binary: String,
    pub description: String,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub offers: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    /// Disks the image expects.
    #[serde(default)]
    pub disks: u32,
    /// Data links the image opens by name.
    #[serde(default)]
    pub links: Vec<String>,
    /// Memory windows the image expects.
    #[serde(default)]
    pub windows: u32,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImagesFile {
    pub(crate) image: Vec<ImageSource>,
}

/// Why a catalog entry was refused. Every variant names the image.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "image `{image}`: digest mismatch: {file} has SHA-384 {actual}, the manifest says {expected} (image modified after signing)"
    )]
    DigestMismatch { image: String, file: String, expected: String, actual: String },
    #[error(
        "image `{image}`: signature check failed: the manifest was modified after signing, or the signature is not the publisher's"
    )]
    BadSignature { image: String },
    #[error("image `{image}`: publisher key {key} is not trusted (pass its public key with --trust)")]
    UnknownPublisher { image: String, key: String },
    #[error("image `{image}`: {file} is missing from the catalog")]
    MissingFile { image: String, file: String },
    #[error("image `{image}`: declares unknown permission `{permission}` (known: {known})")]
    UnknownPermission { image: String, permission: String, known: String },
    #[error("{path}: not a valid manifest: {why}")]
    Malformed { path: String, why: String },
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("`{s}` is not hex");
    }
    Ok((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect())
}

fn signed_bytes(entry: &ImageEntry) -> Vec<u8> {
    let mut v = DOMAIN.to_vec();
    v.extend(serde_json::to_vec(entry).expect("ImageEntry serializes"));
    v
}

pub fn sha384_file(path: &Path) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha384_hex(&data))
}

/// The hex SHA-384 of `bytes`, the form manifests carry.
pub fn sha384_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA384, bytes).as_ref())
}

/// Creates a publisher key pair: PKCS#8 private key (mode 0600) and the hex
/// public key. Returns the public key.
pub fn keygen(private: &Path, public: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let doc =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| anyhow::anyhow!("generated key unusable"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(private)
        .with_context(|| format!("creating {} (it must not exist yet)", private.display()))?;
    std::io::Write::write_all(&mut f, doc.as_ref())?;
    let pubkey = hex(pair.public_key().as_ref());
    crate::durable::write_public(public, format!("{pubkey}\n").as_bytes())?;
    Ok(pubkey)
}

fn load_key(private: &Path) -> Result<Ed25519KeyPair> {
    let der = std::fs::read(private).with_context(|| format!("reading publisher key {}", private.display()))?;
    Ed25519KeyPair::from_pkcs8(&der).map_err(|_| {
        anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key (make one with `ssc catalog keygen`)", private.display())
    })
}

/// Reads trusted public keys (hex, one per file).
pub fn load_trusted(paths: &[PathBuf]) -> Result<Vec<String>> {
    paths
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading trusted key {}", p.display()))?;
            let k = unhex(&s).with_context(|| format!("{}: not a hex public key", p.display()))?;
            if k.len() != 32 {
                bail!("{}: an Ed25519 public key has 32 bytes, this has {}", p.display(), k.len());
            }
            Ok(hex(&k))
        })
        .collect()
}

fn check_permissions(entry: &ImageEntry) -> Result<(), CatalogError> {
    for p in &entry.permissions {
        if !PERMISSIONS.contains(&p.as_str()) {
            return Err(CatalogError::UnknownPermission {
                image: entry.name.clone(),
                permission: p.clone(),
                known: PERMISSIONS.join(", "),
            });
        }
    }
    Ok(())
}

/// Builds a catalog in `out` from `images.toml`, the built binaries in
/// `bin_dir`, the version, and the publisher's private key.
pub fn build(images_toml: &Path, bin_dir: &Path, version: &str, key: &Path, out: &Path) -> Result<Vec<Manifest>> {
    let text = std::fs::read_to_string(images_toml).with_context(|| format!("reading {}", images_toml.display()))?;
    let spec: ImagesFile = toml::from_str(&text).with_context(|| format!("parsing {}", images_toml.display()))?;
    let pair = load_key(key)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut manifests = vec![];
    for src in spec.image {
        let bin = bin_dir.join(&src.binary);
        crate::builder::check_image(&bin).with_context(|| format!("image `{}`", src.name))?;
        let file = format!("{}-{version}.elf", src.name);
        std::fs::copy(&bin, out.join(&file)).with_context(|| format!("copying {}", bin.display()))?;
        let entry = ImageEntry {
            name: src.name,
            version: version.into(),
            sha384: sha384_file(&out.join(&file))?,
            file,
            permissions: src.permissions,
            offers: src.offers,
            needs: src.needs,
            description: src.description,
            disks: src.disks,
            links: src.links,
            windows: src.windows,
        };
        check_permissions(&entry)?;
        let sig = pair.sign(&signed_bytes(&entry));
        let m = Manifest {
            signature: Signature { publisher: hex(pair.public_key().as_ref()), ed25519: hex(sig.as_ref()) },
            image: entry,
        };
        crate::durable::write_public(
            &out.join(format!("{}.toml", m.image.name)),
            toml::to_string_pretty(&m)?.as_bytes(),
        )?;
        manifests.push(m);
    }
    Ok(manifests)
}

/// Reads every manifest in `dir` without verifying it.
pub fn read(dir: &Path) -> Result<Vec<(PathBuf, Result<Manifest, CatalogError>)>> {
    let mut out = vec![];
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading catalog {}", dir.display()))?;
    let mut paths: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    paths.sort();
    for p in paths {
        let m = std::fs::read_to_string(&p)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<Manifest>(&t).map_err(|e| e.to_string()))
            .map_err(|why| CatalogError::Malformed { path: p.display().to_string(), why });
        out.push((p, m));
    }
    if out.is_empty() {
        bail!("{} holds no manifests; build one with `ssc catalog build` (or `make catalog`)", dir.display());
    }
    Ok(out)
}

/// Verifies one manifest against the catalog folder and the trusted keys.
pub fn verify_manifest(dir: &Path, m: &Manifest, trusted: &[String]) -> Result<PathBuf, CatalogError> {
    let name = m.image.name.clone();
    if !trusted.iter().any(|k| k.eq_ignore_ascii_case(&m.signature.publisher)) {
        return Err(CatalogError::UnknownPublisher { image: name, key: m.signature.publisher.clone() });
    }
    let (Ok(key), Ok(sig)) = (unhex(&m.signature.publisher), unhex(&m.signature.ed25519)) else {
        return Err(CatalogError::BadSignature { image: name });
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_bytes(&m.image), &sig)
        .map_err(|_| CatalogError::BadSignature { image: name.clone() })?;
    check_permissions(&m.image)?;
    if m.image.file.contains('/') || m.image.file.starts_with('.') {
        return Err(CatalogError::MissingFile { image: name, file: m.image.file.clone() });
    }
    let file = dir.join(&m.image.file);
    if !file.is_file() {
        return Err(CatalogError::MissingFile { image: name, file: m.image.file.clone() });
    }
    let actual = sha384_file(&file)
        .map_err(|_| CatalogError::MissingFile { image: name.clone(), file: m.image.file.clone() })?;
    if actual != m.image.sha384 {
        return Err(CatalogError::DigestMismatch {
            image: name,
            file: m.image.file.clone(),
            expected: m.image.sha384.clone(),
            actual,
        });
    }
    Ok(file)
}

/// A verified image: its manifest and the path of its file.
#[derive(Clone, Debug)]
pub struct VerifiedImage {
    pub manifest: Manifest,
    pub path: PathBuf,
}

impl VerifiedImage {
    /// A spec that boots this image as domain `name`, bound to the digest
    /// the catalog verified (the builder refuses other bytes at launch).
    pub fn spec(&self, name: &str) -> crate::builder::DomainSpec {
        crate::builder::DomainSpec {
            sha384: Some(self.manifest.image.sha384.clone()),
            ..crate::builder::DomainSpec::new(name, &self.path)
        }
    }

    /// A spec that boots this image on its own: the scratch disks and
    /// memory windows (16 MiB each, created in `scratch`) and link sockets
    /// its manifest declares.
    pub fn standalone_spec(&self, scratch: &Path) -> Result<crate::builder::DomainSpec> {
        let m = &self.manifest.image;
        let mut spec = self.spec(&m.name);
        for i in 0..m.disks {
            let disk = scratch.join(format!("{}-{i}.img", m.name));
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len(16 << 20))
                .with_context(|| format!("creating scratch disk {}", disk.display()))?;
            spec.disks.push(disk);
        }
        for i in 0..m.windows {
            let file = scratch.join(format!("{}-{i}.mem", m.name));
            std::fs::File::create(&file)
                .and_then(|f| f.set_len(16 << 20))
                .with_context(|| format!("creating scratch memory window {}", file.display()))?;
            spec.windows.push(crate::builder::WindowSpec { file, writable: false });
        }
        for l in &m.links {
            let socket = scratch.join(format!("{}-{l}.sock", m.name));
            let _ = std::fs::remove_file(&socket);
            spec.links.push(crate::builder::LinkSpec::listen(l, &socket));
        }
        Ok(spec)
    }
}

/// Verifies the whole catalog; the first failure is the error.
pub fn verify(dir: &Path, trusted: &[String]) -> Result<Vec<VerifiedImage>> {
    let mut out = vec![];
    for (_, m) in read(dir)? {
        let m = m?;
        let path = verify_manifest(dir, &m, trusted)?;
        out.push(VerifiedImage { manifest: m, path });
    }
    Ok(out)
}

/// Orders image versions like semver: `RELEASE[-PRE]`, release parts
/// compared as numbers (`0.10` after `0.9`; `1.0` = `1.0.0`), a
/// pre-release below its release (`2.0-rc1` < `2.0`). A release part that
/// is not a number sorts below every number, so `1.x` never outranks `1.9`.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(v: &str) -> (Vec<(bool, u64, String)>, bool, String) {
        let (release, pre) = match v.split_once('-') {
            Some((r, p)) => (r, Some(p)),
            None => (v, None),
        };
        let mut parts: Vec<(bool, u64, String)> = release
            .split('.')
            .map(|p| match p.parse::<u64>() {
                Ok(n) => (true, n, String::new()),
                Err(_) => (false, 0, p.to_string()),
            })
            .collect();
        while parts.len() > 1 && parts.last() == Some(&(true, 0, String::new())) {
            parts.pop();
        }
        (parts, pre.is_none(), pre.unwrap_or_default().to_string())
    }
    key(a).cmp(&key(b))
}

/// Finds and verifies an image: `name` or `name@latest` is the highest
/// signed version, `name@VERSION` exactly that one. An older manifest,
/// however validly signed, never stands in for the newest (a provider
/// dropping one into the catalog cannot downgrade a chain), and two signed
/// manifests claiming one name and version with different images are
/// refused.
pub fn find(dir: &Path, trusted: &[String], spec: &str) -> Result<VerifiedImage> {
    let (name, version) = match spec.split_once('@') {
        Some((n, "latest")) => (n, None),
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let mut matches: Vec<VerifiedImage> =
        verify(dir, trusted)?.into_iter().filter(|img| img.manifest.image.name == name).collect();
    if matches.is_empty() {
        bail!("no image `{name}` in catalog {}", dir.display());
    }
    matches.sort_by(|a, b| compare_versions(&a.manifest.image.version, &b.manifest.image.version));
    for pair in matches.windows(2) {
        let (a, b) = (&pair[0].manifest.image, &pair[1].manifest.image);
        if compare_versions(&a.version, &b.version).is_eq() && a.sha384 != b.sha384 {
            bail!(
                "catalog {} holds two signed manifests for `{name}` {} with different images ({}… and {}…): \
                 refusing to choose",
                dir.display(),
                a.version,
                &a.sha384[..16.min(a.sha384.len())],
                &b.sha384[..16.min(b.sha384.len())]
            );
        }
    }
    match version {
        None => Ok(matches.pop().expect("not empty")),
        Some(v) => {
            let found = matches.iter().rposition(|img| compare_versions(&img.manifest.image.version, v).is_eq());
            match found {
                Some(i) => Ok(matches.swap_remove(i)),
                None => {
                    let have: Vec<&str> = matches.iter().map(|m| m.manifest.image.version.as_str()).collect();
                    bail!("no `{name}` version {v} in catalog {} (signed versions: {})", dir.display(), have.join(", "))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let cat = dir.path().join("catalog");
        std::fs::create_dir(&cat).unwrap();
        let key = dir.path().join("pub.pk8");
        let pubkey = keygen(&key, &dir.path().join("pub.hex")).unwrap();
        publish(&dir, &cat, "1.0", "img.toml", b"\x7fELF pretend image bytes");
        (dir, cat, pubkey)
    }

    /// Signs `img` `version` (its file: `bytes`) with the fixture's key into
    /// `cat`, as manifest `manifest`.
    fn publish(dir: &tempfile::TempDir, cat: &Path, version: &str, manifest: &str, bytes: &[u8]) {
        let key = dir.path().join("pub.pk8");
        let pubkey = std::fs::read_to_string(dir.path().join("pub.hex")).unwrap().trim().to_string();
        // The fixture's image keeps the name the older tests expect.
        let file = if manifest == "img.toml" { format!("img-{version}.elf") } else { format!("{manifest}.elf") };
        std::fs::write(cat.join(&file), bytes).unwrap();
        let entry = ImageEntry {
            name: "img".into(),
            version: version.into(),
            file: file.clone(),
            sha384: sha384_file(&cat.join(&file)).unwrap(),
            permissions: vec!["mem-read".into()],
            offers: vec![],
            needs: vec![],
            description: "test".into(),
            disks: 0,
            links: vec![],
            windows: 0,
        };
        let pair = load_key(&key).unwrap();
        let sig = pair.sign(&signed_bytes(&entry));
        let m = Manifest { image: entry, signature: Signature { publisher: pubkey, ed25519: hex(sig.as_ref()) } };
        std::fs::write(cat.join(manifest), toml::to_string_pretty(&m).unwrap()).unwrap();
    }

    #[test]
    fn an_old_signed_manifest_dropped_into_the_catalog_cannot_downgrade_the_image() {
        let (dir, cat, key) = fixture();
        // The provider drops last year's validly signed manifest in, named
        // to sort first (the old `find` took the first sorted match).
        publish(&dir, &cat, "0.9", "a-old-img.toml", b"\x7fELF old image with a known hole");
        publish(&dir, &cat, "0.10", "b-img.toml", b"\x7fELF image 0.10");
        let trusted = vec![key];
        assert_eq!(find(&cat, &trusted, "img").unwrap().manifest.image.version, "1.0");
        assert_eq!(find(&cat, &trusted, "img@latest").unwrap().manifest.image.version, "1.0");
        // A chain may pin a version, and gets exactly that one.
        assert_eq!(find(&cat, &trusted, "img@0.9").unwrap().manifest.image.version, "0.9");
        let e = find(&cat, &trusted, "img@2.0").unwrap_err().to_string();
        assert!(e.contains("no `img` version 2.0") && e.contains("0.9, 0.10, 1.0"), "{e}");
        use std::cmp::Ordering::{Equal, Greater, Less};
        assert_eq!(compare_versions("0.10", "0.9"), Greater);
        assert_eq!(compare_versions("2.0-rc1", "2.0"), Less, "a pre-release outranked its release");
        assert_eq!(compare_versions("1.x", "1.99"), Less, "a non-numeric part outranked a number");
        assert_eq!(compare_versions("1.0.0", "1.0"), Equal);
    }

    #[test]
    fn two_signed_manifests_for_one_version_with_different_images_are_refused() {
        let (dir, cat, key) = fixture();
        // Spelled differently, the same version: still two images for it.
        publish(&dir, &cat, "1.0.0", "img-again.toml", b"\x7fELF another image, same version");
        let e = find(&cat, &[key], "img").unwrap_err().to_string();
        assert!(e.contains("two signed manifests for `img` 1.0"), "{e}");
        assert!(e.contains("different images"), "{e}");
    }

    #[test]
    fn a_signed_catalog_verifies() {
        let (_d, cat, pk) = fixture();
        let v = verify(&cat, &[pk]).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].manifest.image.name, "img");
    }

    #[test]
    fn a_flipped_image_byte_is_a_digest_mismatch_naming_the_image() {
        let (_d, cat, pk) = fixture();
        let f = cat.join("img-1.0.elf");
        let mut b = std::fs::read(&f).unwrap();
        b[5] ^= 1;
        std::fs::write(&f, b).unwrap();
        let e = verify(&cat, &[pk]).unwrap_err().to_string();
        assert!(e.contains("image `img`") && e.contains("digest mismatch"), "{e}");
    }

    #[test]
    fn a_manifest_edited_after_signing_fails_the_signature() {
        let (_d, cat, pk) = fixture();
        let p = cat.join("img.toml");
        let t = std::fs::read_to_string(&p).unwrap().replace("\"mem-read\"", "\"mem-write\"");
        std::fs::write(&p, t).unwrap();
        let e = verify(&cat, &[pk]).unwrap_err().to_string();
        assert!(e.contains("image `img`") && e.contains("signature check failed"), "{e}");
    }

    #[test]
    fn an_unknown_publisher_is_refused_even_with_a_valid_signature() {
        let (d, cat, _pk) = fixture();
        let other = keygen(&d.path().join("o.pk8"), &d.path().join("o.hex")).unwrap();
        let e = verify(&cat, &[other]).unwrap_err().to_string();
        assert!(e.contains("image `img`") && e.contains("not trusted"), "{e}");
    }

    #[test]
    fn a_missing_image_file_and_a_malformed_manifest_are_named() {
        let (_d, cat, pk) = fixture();
        std::fs::remove_file(cat.join("img-1.0.elf")).unwrap();
        let e = verify(&cat, std::slice::from_ref(&pk)).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::write(cat.join("img.toml"), "not = [valid").unwrap();
        let e = verify(&cat, &[pk]).unwrap_err().to_string();
        assert!(e.contains("img.toml") && e.contains("not a valid manifest"), "{e}");
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_trusted_keys_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        keygen(&k, &d.path().join("k.pub")).unwrap();
        assert!(keygen(&k, &d.path().join("k2.pub")).is_err());
        std::fs::write(d.path().join("short"), "abcd").unwrap();
        assert!(load_trusted(&[d.path().join("short")]).unwrap_err().to_string().contains("32 bytes"));
    }
}
