//! Who may talk to the builder, as the kernel reports it.
//!
//! The provider's admins are the members of the group [`PROVIDER_GROUP`]
//! (made by `make deps`, `scripts/users.sh`). They reach a builder only
//! through its provider socket, which is group-writable for that group and
//! nobody else; the builder also asks the kernel who connected
//! (`SO_PEERCRED`) and refuses, by name, a peer that is neither the
//! builder's own user nor root nor a member of the group, so a socket or
//! directory left with looser modes does not let anyone else in. Every
//! other file of a meta-domain (run directory, QMP and key-link sockets,
//! memory files, swtpm sockets) stays private to the builder's user.

use std::os::unix::net::UnixStream;

/// The group whose members may use the provider verbs.
pub const PROVIDER_GROUP: &str = "ssc-provider";

/// The gid of group `name` in `/etc/group` (local groups only).
pub fn group_gid(name: &str) -> Option<u32> {
    gid_in(&std::fs::read_to_string("/etc/group").ok()?, name)
}

fn gid_in(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok()).flatten()
    })
}

/// The groups of process `pid` (real and supplementary), from
/// `/proc/PID/status`.
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return vec![] };
    groups_in(&status)
}

fn groups_in(status: &str) -> Vec<u32> {
    let mut out = vec![];
    for l in status.lines() {
        if let Some(gids) = l.strip_prefix("Gid:") {
            out.extend(gids.split_whitespace().take(1).filter_map(|g| g.parse::<u32>().ok()));
        }
        if let Some(groups) = l.strip_prefix("Groups:") {
            out.extend(groups.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        }
    }
    out
}

/// Admits the peer of `stream` to the provider verbs: this builder's own
/// user, root, or a member of [`PROVIDER_GROUP`]. The refusal names the
/// uid and the group to join.
pub fn admit_provider(stream: &UnixStream) -> Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("refused: the kernel did not name the peer: {e}"))?;
    let uid = cred.uid.as_raw();
    if uid == 0 || uid == rustix::process::geteuid().as_raw() {
        return Ok(());
    }
    let member = group_gid(PROVIDER_GROUP)
        .is_some_and(|g| cred.gid.as_raw() == g || groups_of(cred.pid.as_raw_pid() as u32).contains(&g));
    if member {
        Ok(())
    } else {
        Err(format!("refused: uid {uid} is not in group `{PROVIDER_GROUP}`, whose members are the provider's admins"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_read_from_the_files_the_kernel_and_the_admin_keep() {
        let etc = "root:x:0:\nssc-provider:x:997:ssc-admin\nnogroup:x:65534:\n";
        assert_eq!(gid_in(etc, "ssc-provider"), Some(997));
        assert_eq!(gid_in(etc, "ssc"), None);
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t1001\t1001\t1001\t1001\nGroups:\t27 997 \n";
        assert_eq!(groups_in(status), vec![1001, 27, 997]);
    }

    #[test]
    fn the_builders_own_user_is_admitted() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(admit_provider(&a), Ok(()));
    }
}
