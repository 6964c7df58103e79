//! The only way into a builder's swtpm: a loopback gate that serves
//! connections made by this very process and drops every other.
//!
//! swtpm listens on two unix sockets (TPM and control) of mode 0600 inside
//! the builder's own 0700 directories, so no other uid can reach it. The
//! TPM client library cannot follow it there: `tss-esapi` 7 configures the
//! `swtpm` TCTI with a host and a port only (libtss2 3.2 could take a
//! `path=`, but the binding has no way to pass one, and we keep `unsafe`
//! out of this crate). So the builder listens on two adjacent loopback
//! ports itself and forwards a connection to the matching unix socket only
//! when the connecting socket belongs to this process's user and is one of
//! this process's own file descriptors: the kernel's `sock_diag` names the
//! owner and the inode of the socket at the other end, `/proc/self/fd`
//! whether we hold it. The uid is what keeps other users out (socket inode
//! numbers come from a wrapping counter, so an inode alone could in
//! principle be matched by a socket of theirs); the inode keeps out this
//! user's other processes that merely connect to the port (a process of the
//! same user could open the 0600 sockets, or ptrace us, anyway). Another
//! local user who connects gets a closed connection and never a byte of
//! TPM protocol.

use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context as _, Result, bail};

/// Two gates (TPM port `port`, control port `port + 1`, as the swtpm TCTI
/// expects) in front of two unix sockets.
pub struct Gate {
    port: u16,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl Gate {
    /// Opens the two ports and starts forwarding to `server` and `ctrl`.
    pub fn open(server: &Path, ctrl: &Path) -> Result<Gate> {
        let (a, b) = adjacent_listeners()?;
        let port = a.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        for (listener, target) in [(a, server.to_path_buf()), (b, ctrl.to_path_buf())] {
            let (stop, refused) = (stop.clone(), refused.clone());
            std::thread::Builder::new()
                .name(format!("tpm-gate-{}", listener.local_addr()?.port()))
                .spawn(move || serve(listener, target, stop, refused))
                .context("starting the TPM gate")?;
        }
        Ok(Gate { port, stop, refused })
    }

    /// The TPM port; the control port is the next one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections refused because another process made them.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake both accept loops; they see the flag before looking at us.
        for p in [self.port, self.port + 1] {
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, p));
        }
    }
}

fn adjacent_listeners() -> Result<(TcpListener, TcpListener)> {
    for _ in 0..64 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let p = a.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        if let Ok(b) = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)) {
            return Ok((a, b));
        }
    }
    bail!("no two adjacent free loopback ports for the TPM gate")
}

fn serve(listener: TcpListener, target: PathBuf, stop: Arc<AtomicBool>, refused: Arc<AtomicU64>) {
    let Ok(local) = listener.local_addr() else { return };
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(tcp) = conn else {
            // Out of descriptors, say: do not spin.
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        let Ok(peer) = tcp.peer_addr() else { continue };
        if !held_by_this_process(peer, local) {
            refused.fetch_add(1, Ordering::Relaxed);
            let _ = tcp.shutdown(Shutdown::Both);
            continue;
        }
        // Commands and replies are small and strictly alternate: without
        // this, Nagle's algorithm and delayed ACKs hold a reply ~40 ms.
        let _ = tcp.set_nodelay(true);
        let Ok(unix) = UnixStream::connect(&target) else {
            let _ = tcp.shutdown(Shutdown::Both);
            continue;
        };
        let _ = std::thread::Builder::new().name("tpm-gate-pipe".into()).spawn(move || pipe(tcp, unix));
    }
}

/// Copies both ways until either side closes.
fn pipe(tcp: TcpStream, unix: UnixStream) {
    let (Ok(tcp2), Ok(unix2)) = (tcp.try_clone(), unix.try_clone()) else { return };
    let back = std::thread::Builder::new().name("tpm-gate-pipe".into()).spawn(move || {
        let _ = std::io::copy(&mut &unix2, &mut &tcp2);
        let _ = tcp2.shutdown(Shutdown::Both);
    });
    let _ = std::io::copy(&mut &tcp, &mut &unix);
    let _ = unix.shutdown(Shutdown::Both);
    if let Ok(back) = back {
        let _ = back.join();
    }
}

/// Whether the socket connected from `peer` to `local` is one of this
/// process's file descriptors.
fn held_by_this_process(peer: SocketAddr, local: SocketAddr) -> bool {
    let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else { return false };
    let Ok(Some((uid, inode))) = socket_owner(peer, local) else { return false };
    if uid != rustix::process::geteuid().as_raw() {
        return false;
    }
    let want = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
}

// sock_diag (linux/sock_diag.h, linux/inet_diag.h): ask the kernel for the
// one TCP socket with a given 4-tuple. `/proc/net/tcp` would do, but it
// lists every socket of the namespace, and the TCTI's reconnect per
// command fills it with TIME_WAIT entries: ~4 ms a read here.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR: usize = 16;
/// `inet_diag_msg`: family, state, timer, retrans, `inet_diag_sockid` (48),
/// expires, rqueue, wqueue, uid, inode.
const UID_AT: usize = NLMSG_HDR + 4 + 48 + 12;
const INODE_AT: usize = UID_AT + 4;

/// The owner (uid) and inode of the TCP socket whose local end is `from`
/// and whose remote end is `to`, `None` if there is none.
fn socket_owner(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4) -> std::io::Result<Option<(u32, u32)>> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink};
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::DGRAM, Some(netlink::SOCK_DIAG))?;
    rustix::net::send(&fd, &diag_request(from, to), SendFlags::empty())?;
    let mut buf = [0u8; 512];
    let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
    Ok(diag_owner(&buf[..n]))
}

fn diag_request(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4) -> Vec<u8> {
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&[0u8; 8]); // sequence, port id
    // inet_diag_req_v2: AF_INET, IPPROTO_TCP, no extensions, pad, all states.
    m.extend_from_slice(&[2, 6, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network order, any interface,
    // no cookie.
    m.extend_from_slice(&from.port().to_be_bytes());
    m.extend_from_slice(&to.port().to_be_bytes());
    for ip in [from.ip(), to.ip()] {
        m.extend_from_slice(&ip.octets());
        m.extend_from_slice(&[0u8; 12]);
    }
    m.extend_from_slice(&[0u8; 4]);
    m.extend_from_slice(&[0xff; 8]);
    m
}

/// The uid and inode in a sock_diag reply (`None` for an error reply,
/// e.g. no such socket).
fn diag_owner(reply: &[u8]) -> Option<(u32, u32)> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let uid = u32::from_ne_bytes(reply.get(UID_AT..UID_AT + 4)?.try_into().ok()?);
    let inode = u32::from_ne_bytes(reply.get(INODE_AT..INODE_AT + 4)?.try_into().ok()?);
    (inode != 0).then_some((uid, inode))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn the_kernel_names_the_client_end_of_a_connection_not_the_accepted_end() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let inode = |s: &TcpStream| {
            use std::os::unix::fs::MetadataExt;
            let fd = std::os::fd::AsRawFd::as_raw_fd(s);
            std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino() as u32
        };
        let (SocketAddr::V4(from), SocketAddr::V4(to)) = (c.local_addr().unwrap(), l.local_addr().unwrap()) else {
            panic!()
        };
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(socket_owner(from, to).unwrap(), Some((me, inode(&c))));
        assert_ne!(inode(&c), inode(&a));
        assert!(held_by_this_process(c.local_addr().unwrap(), l.local_addr().unwrap()));
        // No such connection.
        let gone = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
        assert_eq!(socket_owner(gone, to).unwrap(), None);
    }

    #[test]
    fn a_connection_from_this_process_is_forwarded_and_one_from_another_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (server, ctrl) = (dir.path().join("s.sock"), dir.path().join("c.sock"));
        let echo = std::os::unix::net::UnixListener::bind(&server).unwrap();
        let _c = std::os::unix::net::UnixListener::bind(&ctrl).unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                let _ = std::io::copy(&mut &s, &mut &s);
            }
        });
        let gate = Gate::open(&server, &ctrl).unwrap();
        let mut ours = TcpStream::connect((Ipv4Addr::LOCALHOST, gate.port())).unwrap();
        ours.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(gate.refused(), 0);

        // Another process: python's socket is not ours.
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket;s=socket.create_connection(('127.0.0.1',{}));s.sendall(b'ping');\
                     s.settimeout(5);print(len(s.recv(4)))",
                    gate.port()
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
        assert_eq!(gate.refused(), 1);
    }
}
