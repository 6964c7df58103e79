//! Grants: which service domain may do what to which client VM, and the
//! builder's least-privilege check of each.
//!
//! In an attested meta-domain (`[udom0]`) the tenant sends its chain
//! policy to Udom0 inside TLS, and Udom0 asks the builder for each grant
//! (`Body::Grant`). The builder ([`Authority::check`]) accepts a grant only
//! when
//! * it comes from this meta-domain's Udom0 (not an SD, not a provider
//!   verb),
//! * the SD and the client are domains of this meta-domain (a name
//!   qualified with another meta-domain, `tenant-b/client`, or a domain
//!   this meta-domain does not have is a *domain violation*),
//! * the SD's signed catalog manifest declares the permission (anything
//!   else is a grant *beyond the manifest*).
//!
//! The builder then wires only what was granted: a client's disk goes
//! through its storage SD only with `blk-interpose`, DomC's port only with
//! `hsm`, and a memory SD gets its window only with `mem-read` (and, for
//! the checkpoint SD's restores, `mem-write`).

use std::fmt;

use ssc_abi::attest::GrantRequest;

use crate::chain::Plan;

/// Permissions a catalog manifest may declare.
pub const PERMISSIONS: [&str; 5] = ["blk-interpose", "mem-read", "mem-write", "hsm", "net"];

/// Why the builder refused a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// Someone other than the meta-domain's Udom0 asked.
    NotUdom0 { from: String },
    /// The grant names a domain of another meta-domain, or none of this one.
    DomainViolation { domain: String, meta: String },
    /// The SD named is a client (or Udom0): only SDs are granted.
    NotAnSd { domain: String },
    /// The client named is not a client VM.
    NotAClient { domain: String },
    /// The permission is not one a manifest can declare.
    UnknownPermission { permission: String },
    /// The SD's manifest does not declare the permission.
    BeyondManifest { sd: String, permission: String, declared: Vec<String> },
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantError::NotUdom0 { from } => {
                write!(f, "not Udom0: `{from}` asked for a grant; only the meta-domain's Udom0 grants")
            }
            GrantError::DomainViolation { domain, meta } => {
                write!(f, "domain violation: `{domain}` is not a domain of meta-domain `{meta}`")
            }
            GrantError::NotAnSd { domain } => write!(f, "`{domain}` is not a service domain; only SDs are granted"),
            GrantError::NotAClient { domain } => write!(f, "`{domain}` is not a client VM of this meta-domain"),
            GrantError::UnknownPermission { permission } => {
                write!(f, "unknown permission `{permission}` (known: {})", PERMISSIONS.join(", "))
            }
            GrantError::BeyondManifest { sd, permission, declared } => write!(
                f,
                "grant beyond manifest: `{sd}` asks for `{permission}`, its signed manifest declares [{}]",
                declared.join(", ")
            ),
        }
    }
}

impl std::error::Error for GrantError {}

/// What the builder knows to check grants of one meta-domain.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The meta-domain's name.
    pub meta: String,
    /// Each SD's domain name and its manifest's permissions.
    pub sds: Vec<(String, Vec<String>)>,
    pub clients: Vec<String>,
}

impl Authority {
    /// The domains `plan` starts, with their manifests' permissions.
    pub fn of(plan: &Plan) -> Authority {
        let mut sds = vec![];
        for (i, d) in plan.disks.iter().enumerate() {
            for (k, img) in d.sds.iter().enumerate() {
                sds.push((d.sd_name(&i.to_string(), k), img.manifest.image.permissions.clone()));
            }
        }
        let memory = [
            ("checkpoint", plan.checkpoint.as_ref().map(|c| &c.image)),
            ("dedup", plan.dedup.as_ref().map(|d| &d.image)),
            ("introspect", plan.introspect.as_ref().map(|i| &i.image)),
            ("domc", plan.hsm.as_ref().map(|h| &h.image)),
        ];
        for (name, img) in memory {
            if let Some(img) = img {
                sds.push((name.to_string(), img.manifest.image.permissions.clone()));
            }
        }
        Authority { meta: plan.meta_name(), sds, clients: plan.client_names() }
    }

    /// A domain name of this meta-domain: `name` or `<meta>/name`.
    fn local<'n>(&self, name: &'n str) -> Result<&'n str, GrantError> {
        let violation = || GrantError::DomainViolation { domain: name.to_string(), meta: self.meta.clone() };
        let local = match name.split_once('/') {
            Some((meta, local)) if meta == self.meta => local,
            Some(_) => return Err(violation()),
            None => name,
        };
        let known = self.sds.iter().any(|(n, _)| n == local)
            || self.clients.iter().any(|c| c == local)
            || local == crate::chain_udom0::DOMAIN;
        if known { Ok(local) } else { Err(violation()) }
    }

    /// Checks one grant `from` a domain of this meta-domain; returns it
    /// with unqualified names.
    pub fn check(&self, from: &str, g: &GrantRequest) -> Result<GrantRequest, GrantError> {
        if from != crate::chain_udom0::DOMAIN {
            return Err(GrantError::NotUdom0 { from: from.to_string() });
        }
        let sd = self.local(&g.sd)?;
        let client = self.local(&g.client)?;
        let Some((_, declared)) = self.sds.iter().find(|(n, _)| n == sd) else {
            return Err(GrantError::NotAnSd { domain: sd.to_string() });
        };
        if !self.clients.iter().any(|c| c == client) {
            return Err(GrantError::NotAClient { domain: client.to_string() });
        }
        if !PERMISSIONS.contains(&g.permission.as_str()) {
            return Err(GrantError::UnknownPermission { permission: g.permission.clone() });
        }
        if !declared.contains(&g.permission) {
            return Err(GrantError::BeyondManifest {
                sd: sd.to_string(),
                permission: g.permission.clone(),
                declared: declared.clone(),
            });
        }
        Ok(GrantRequest { sd: sd.into(), client: client.into(), permission: g.permission.clone() })
    }
}

/// The grants a chain file asks for: each disk's SD interposes on each
/// client's disk, memory SDs read (the checkpoint SD also writes, for
/// restores) the client's memory, DomC serves the client.
pub fn policy(plan: &Plan) -> Vec<GrantRequest> {
    let g = |sd: &str, client: &str, permission: &str| GrantRequest {
        sd: sd.into(),
        client: client.into(),
        permission: permission.into(),
    };
    let mut out = vec![];
    for client in plan.client_names() {
        for (i, d) in plan.disks.iter().enumerate() {
            // The client-side SD of the disk.
            out.push(g(&d.sd_name(&i.to_string(), 0), &client, "blk-interpose"));
        }
        if plan.checkpoint.is_some() {
            out.push(g("checkpoint", &client, "mem-read"));
            out.push(g("checkpoint", &client, "mem-write"));
        }
        if plan.dedup.is_some() {
            out.push(g("dedup", &client, "mem-read"));
        }
        if plan.introspect.is_some() {
            out.push(g("introspect", &client, "mem-read"));
        }
        if plan.hsm.is_some() {
            out.push(g("domc", &client, "hsm"));
        }
    }
    out
}

/// The grants the builder gave.
#[derive(Debug, Default, Clone)]
pub struct Granted(pub Vec<GrantRequest>);

impl Granted {
    pub fn has(&self, sd: &str, client: &str, permission: &str) -> bool {
        self.0.iter().any(|g| g.sd == sd && g.client == client && g.permission == permission)
    }

    /// Fails, naming the missing grant, unless it was given.
    pub fn require(&self, sd: &str, client: &str, permission: &str) -> anyhow::Result<()> {
        if self.has(sd, client, permission) {
            return Ok(());
        }
        anyhow::bail!(
            "`{sd}` has no `{permission}` grant over `{client}`: the tenant's policy (sent through Udom0) did not give it"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> Authority {
        Authority {
            meta: "tenant-a".into(),
            sds: vec![
                ("storage-crypt-0".into(), vec!["blk-interpose".into()]),
                ("introspect".into(), vec!["mem-read".into()]),
            ],
            clients: vec!["client".into()],
        }
    }

    fn g(sd: &str, client: &str, p: &str) -> GrantRequest {
        GrantRequest { sd: sd.into(), client: client.into(), permission: p.into() }
    }

    #[test]
    fn udom0_gets_what_the_manifest_declares_over_its_own_domains() {
        let a = authority();
        assert_eq!(a.check("udom0", &g("storage-crypt-0", "client", "blk-interpose")).unwrap().sd, "storage-crypt-0");
        let q = a.check("udom0", &g("tenant-a/introspect", "tenant-a/client", "mem-read")).unwrap();
        assert_eq!((q.sd.as_str(), q.client.as_str()), ("introspect", "client"));
    }

    #[test]
    fn each_attack_is_refused_by_name() {
        let a = authority();
        let cases = [
            ("storage-crypt-0", g("storage-crypt-0", "client", "blk-interpose"), "not Udom0"),
            ("udom0", g("introspect", "tenant-b/client", "mem-read"), "domain violation: `tenant-b/client`"),
            ("udom0", g("tenant-b/introspect", "client", "mem-read"), "domain violation"),
            ("udom0", g("introspect", "client-7", "mem-read"), "domain violation: `client-7`"),
            ("udom0", g("storage-crypt-0", "client", "mem-read"), "grant beyond manifest"),
            ("udom0", g("introspect", "client", "mem-write"), "declares [mem-read]"),
            ("udom0", g("client", "client", "mem-read"), "not a service domain"),
            ("udom0", g("introspect", "storage-crypt-0", "mem-read"), "not a client VM"),
            ("udom0", g("introspect", "client", "root"), "unknown permission `root`"),
        ];
        for (from, grant, want) in cases {
            let e = a.check(from, &grant).unwrap_err().to_string();
            assert!(e.contains(want), "{grant:?} from {from}: {e}");
        }
    }

    #[test]
    fn granted_names_what_is_missing() {
        let have = Granted(vec![g("introspect", "client", "mem-read")]);
        assert!(have.require("introspect", "client", "mem-read").is_ok());
        let e = have.require("checkpoint", "client", "mem-write").unwrap_err().to_string();
        assert!(e.contains("`checkpoint` has no `mem-write` grant over `client`"), "{e}");
    }
}
