//! Connected UDP sockets of socket-level LB whose backend went away.
//!
//! A UDP socket connect()ed to a Service was connected to one backend; the
//! kernel sends every later datagram straight there, so removing the backend
//! from the maps does not move it (the bug Cilium and Calico users met). The
//! agent closes such sockets the way `ss -K` does (SOCK_DIAG's SOCK_DESTROY):
//! the owner's next call fails with ECONNABORTED and it reconnects, which
//! picks a live backend. Only sockets the programs translated are touched:
//! the socket's cookie must have a reverse entry in `LB_SOCK_NAT` naming the
//! frontend that lost the backend.

use std::{
    collections::BTreeSet,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use lb_common::{Addr, IPPROTO_UDP, SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SockNatKey};
use tracing::{debug, warn};

use super::maps::SockNatMap;
use crate::model::desired::{DesiredState, Frontend, FrontendKey, Protocol, Scope};

/// A backend one frontend no longer sends new flows to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Departed {
    pub frontend: (IpAddr, u16),
    pub backend: (IpAddr, u16),
}

/// UDP backends of in-cluster frontends (the ones socket-level LB serves)
/// that were selectable in `before` and are not in `after`: removed,
/// terminating, or their frontend gone.
/// `before` need only hold the frontends that changed.
pub fn departed_udp_backends<'a>(
    before: impl IntoIterator<Item = (&'a FrontendKey, &'a Frontend)>,
    after: &DesiredState,
) -> BTreeSet<Departed> {
    let mut gone = BTreeSet::new();
    for (key, frontend) in before {
        if key.proto != Protocol::Udp || key.scope != Scope::Internal {
            continue;
        }
        let kept = after.frontends.get(key).map(|f| &f.set.backends);
        for backend in &frontend.set.backends {
            let still = kept.is_some_and(|k| {
                k.iter()
                    .any(|b| b.addr == backend.addr && b.port == backend.port)
            });
            if !still {
                gone.insert(Departed {
                    frontend: (key.addr, key.port),
                    backend: (backend.addr, backend.port),
                });
            }
        }
    }
    gone
}

/// This process's network namespace cookie (what bpf_get_netns_cookie
/// returns for sockets of the namespace).
pub fn netns_cookie() -> io::Result<u64> {
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SO_NETNS_COOKIE (Linux 5.14).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Close the translated UDP sockets connected to a departed backend: in
/// this network namespace, or in every one (`all_namespaces`). Returns how
/// many were closed.
pub fn close_departed(
    departed: &BTreeSet<Departed>,
    sock_nat: &mut SockNatMap,
    all_namespaces: bool,
) -> io::Result<usize> {
    if departed.is_empty() {
        return Ok(0);
    }
    let backends: BTreeSet<(IpAddr, u16)> = departed.iter().map(|d| d.backend).collect();
    let both = |backends: &BTreeSet<(IpAddr, u16)>| -> io::Result<Vec<UdpSocket>> {
        let mut found = connected_udp(libc::AF_INET as u8, backends)?;
        found.extend(connected_udp(libc::AF_INET6 as u8, backends)?);
        Ok(found)
    };
    let mut sockets = if all_namespaces {
        let mut all = Vec::new();
        for netns in namespaces() {
            match in_namespace(&netns, || both(&backends)) {
                Ok(found) => all.extend(found.into_iter().map(|s| (Some(netns.clone()), s))),
                Err(e) => debug!(netns = %netns, error = %e, "cannot list sockets"),
            }
        }
        all
    } else {
        both(&backends)?.into_iter().map(|s| (None, s)).collect()
    };
    sockets.retain(|(_, socket)| {
        let (addr, port) = socket.peer();
        let reverse = SockNatKey {
            socket_cookie: socket.cookie(),
            addr_be: Addr::from(addr),
            port_be: port.to_be(),
            proto: IPPROTO_UDP,
            dir: SOCK_DIR_REVERSE,
            _pad: 0,
        };
        let Ok(entry) = sock_nat.get(&reverse, 0) else {
            return false;
        };
        let frontend = (entry.addr_be.ip(), u16::from_be(entry.port_be));
        if !departed.contains(&Departed {
            frontend,
            backend: (addr, port),
        }) {
            return false;
        }
        // The socket must choose again when it reconnects, even if the
        // backend still exists (it may only have left this frontend).
        let forward = SockNatKey {
            addr_be: entry.addr_be,
            port_be: entry.port_be,
            dir: SOCK_DIR_FORWARD,
            ..reverse
        };
        let _ = sock_nat.remove(&forward);
        let _ = sock_nat.remove(&reverse);
        true
    });
    let mut closed = 0;
    for (netns, socket) in &sockets {
        let result = match netns {
            Some(netns) => in_namespace(netns, || destroy(socket)),
            None => destroy(socket),
        };
        match result {
            Ok(()) => closed += 1,
            // Closed by its owner meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => warn!(peer = ?socket.peer(), error = %e, "closing a UDP socket failed"),
        }
    }
    Ok(closed)
}

/// Network namespaces of all processes (/proc/PID/ns/net), one path each.
fn namespaces() -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return paths;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = format!("/proc/{}/ns/net", name.to_string_lossy());
        if let Ok(meta) = std::fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    }
    paths
}

/// Run `f` on a thread that joined the network namespace at `path` (a
/// netlink socket belongs to the namespace it is created in).
fn in_namespace<T: Send>(path: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

// SOCK_DIAG wire format (linux/inet_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// Connected UDP sockets are in TCP_ESTABLISHED.
const TCP_ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InetDiagSockId {
    sport_be: u16,
    dport_be: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    header: libc::nlmsghdr,
    body: InetDiagReqV2,
}

/// A connected UDP socket as SOCK_DIAG reports it.
#[derive(Clone, Copy, Debug)]
struct UdpSocket {
    family: u8,
    id: InetDiagSockId,
}

impl UdpSocket {
    /// The peer; an IPv6 socket's IPv4-mapped peer reads as IPv4, as the
    /// programs' map entries name it.
    fn peer(&self) -> (IpAddr, u16) {
        let ip = if self.family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::from(self.id.dst[0].to_ne_bytes()))
        } else {
            let mut octets = [0u8; 16];
            for (i, word) in self.id.dst.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(octets);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        };
        (ip, u16::from_be(self.id.dport_be))
    }

    fn cookie(&self) -> u64 {
        self.id.cookie[0] as u64 | (self.id.cookie[1] as u64) << 32
    }
}

fn netlink() -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, kind: u16, flags: u16, body: InetDiagReqV2) -> io::Result<()> {
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: kind,
            nlmsg_flags: flags,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body,
    };
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Netlink messages of one datagram: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let header_len = size_of::<libc::nlmsghdr>();
    let mut out = Vec::new();
    let mut at = 0;
    while at + header_len <= buf.len() {
        // SAFETY: bounds checked above; nlmsghdr has no invalid bit patterns.
        let header: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let len = header.nlmsg_len as usize;
        if len < header_len || at + len > buf.len() {
            break;
        }
        out.push((header.nlmsg_type, &buf[at + header_len..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn netlink_error(payload: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// Connected UDP sockets of `family` (AF_INET, AF_INET6) in this
/// namespace whose peer is in `peers`.
fn connected_udp(family: u8, peers: &BTreeSet<(IpAddr, u16)>) -> io::Result<Vec<UdpSocket>> {
    let fd = netlink()?;
    send(
        &fd,
        SOCK_DIAG_BY_FAMILY,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        InetDiagReqV2 {
            family,
            protocol: IPPROTO_UDP,
            states: 1 << TCP_ESTABLISHED,
            ..Default::default()
        },
    )?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (kind, payload) in messages(&buf[..n as usize]) {
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(found),
                k if k == libc::NLMSG_ERROR as u16 => {
                    return Err(
                        netlink_error(payload).unwrap_or_else(|| io::Error::other("netlink error"))
                    );
                }
                SOCK_DIAG_BY_FAMILY if payload.len() >= 4 + size_of::<InetDiagSockId>() => {
                    // inet_diag_msg: family, state, timer, retrans, then the id.
                    // SAFETY: length checked; plain integers.
                    let id: InetDiagSockId =
                        unsafe { std::ptr::read_unaligned(payload[4..].as_ptr().cast()) };
                    let socket = UdpSocket { family, id };
                    if peers.contains(&socket.peer()) {
                        found.push(socket);
                    }
                }
                _ => {}
            }
        }
        if n == 0 {
            return Ok(found);
        }
    }
}

/// SOCK_DESTROY one socket (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN).
fn destroy(socket: &UdpSocket) -> io::Result<()> {
    let fd = netlink()?;
    send(
        &fd,
        SOCK_DESTROY,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        InetDiagReqV2 {
            family: socket.family,
            protocol: IPPROTO_UDP,
            states: u32::MAX,
            id: socket.id,
            ..Default::default()
        },
    )?;
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for (kind, payload) in messages(&buf[..n as usize]) {
        if kind == libc::NLMSG_ERROR as u16 {
            return match netlink_error(payload) {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired::{
        Backend, BackendSet, BackendSetKey, Frontend, FrontendKey, FrontendKind, Selection,
    };

    fn frontend(backends: &[&str]) -> Frontend {
        Frontend {
            service_port: "default/dns:dns".into(),
            kind: FrontendKind::ClusterIP,
            set: std::sync::Arc::new(BackendSet {
                key: BackendSetKey {
                    service_port: "default/dns:dns".into(),
                    proto: Protocol::Udp,
                    v6: false,
                    selection: Selection::Cluster,
                },
                backends: backends
                    .iter()
                    .map(|a| Backend {
                        addr: a.parse().unwrap(),
                        port: 53,
                        terminating: false,
                        remote: false,
                        on_node: false,
                    })
                    .collect(),
                standby: Vec::new(),
                maglev: false,
            }),
            drop_if_empty: false,
            internal_local: false,
            affinity_timeout_s: None,
            source_ranges: false,
            masquerade: false,
            dsr: false,
        }
    }

    fn state(entries: &[(Protocol, Scope, &[&str])]) -> DesiredState {
        let mut state = DesiredState::default();
        for (proto, scope, backends) in entries {
            state.frontends.insert(
                FrontendKey {
                    addr: "10.96.0.10".parse().unwrap(),
                    port: 53,
                    proto: *proto,
                    scope: *scope,
                },
                frontend(backends),
            );
        }
        state
    }

    #[test]
    fn departed_backends_are_the_udp_in_cluster_ones_that_left() {
        use Protocol::{Tcp, Udp};
        use Scope::{External, Internal};
        let gone = |b: &str| Departed {
            frontend: ("10.96.0.10".parse().unwrap(), 53),
            backend: (b.parse().unwrap(), 53),
        };
        let cases: Vec<(&str, DesiredState, DesiredState, Vec<Departed>)> = vec![
            (
                "one of two removed",
                state(&[(Udp, Internal, &["10.0.0.1", "10.0.0.2"])]),
                state(&[(Udp, Internal, &["10.0.0.2"])]),
                vec![gone("10.0.0.1")],
            ),
            (
                "replaced",
                state(&[(Udp, Internal, &["10.0.0.1"])]),
                state(&[(Udp, Internal, &["10.0.0.3"])]),
                vec![gone("10.0.0.1")],
            ),
            (
                "frontend deleted",
                state(&[(Udp, Internal, &["10.0.0.1"])]),
                state(&[]),
                vec![gone("10.0.0.1")],
            ),
            (
                "added only",
                state(&[(Udp, Internal, &["10.0.0.1"])]),
                state(&[(Udp, Internal, &["10.0.0.1", "10.0.0.2"])]),
                vec![],
            ),
            (
                "TCP: kept (TCP notices a dead peer itself)",
                state(&[(Tcp, Internal, &["10.0.0.1"])]),
                state(&[(Tcp, Internal, &[])]),
                vec![],
            ),
            (
                "external scope: not socket-level",
                state(&[(Udp, External, &["10.0.0.1"])]),
                state(&[(Udp, External, &[])]),
                vec![],
            ),
        ];
        for (name, before, after, want) in cases {
            let got: Vec<Departed> = departed_udp_backends(&before.frontends, &after)
                .into_iter()
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn netlink_messages_are_split_on_aligned_lengths() {
        let mut buf = Vec::new();
        for (kind, payload) in [(20u16, vec![1u8, 2, 3]), (3, vec![0; 4])] {
            let len = (size_of::<libc::nlmsghdr>() + payload.len()) as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&payload);
            while buf.len() % 4 != 0 {
                buf.push(0);
            }
        }
        let got = messages(&buf);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (20, &[1u8, 2, 3][..]));
        assert_eq!(got[1].0, 3);
    }
}
