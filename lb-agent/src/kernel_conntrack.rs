//! The kernel's connection tracking table through ctnetlink
//! (NETLINK_NETFILTER): the connections kube-proxy's rules translated, so
//! that lb taking over a node can carry them on (`Syncer::import_flow`),
//! and their kernel entries deleted once lb translates them (a kept entry
//! would clash with the one netfilter creates for the translated packets).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// `CTA_STATUS` bits.
pub const IPS_SEEN_REPLY: u32 = 1 << 1;
pub const IPS_SRC_NAT: u32 = 1 << 4;
pub const IPS_DST_NAT: u32 = 1 << 5;

/// `tcp_conntrack` states.
pub const TCP_ESTABLISHED: u8 = 3;

/// One direction's tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// A kernel conntrack entry, as far as lb needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFlow {
    pub proto: u8,
    /// What the client sent: its address towards the Service.
    pub original: Tuple,
    /// What the backend answers: from the endpoint, to the client or to
    /// the address the client was masqueraded to.
    pub reply: Tuple,
    pub status: u32,
    /// TCP only.
    pub tcp_state: Option<u8>,
    pub timeout_s: u32,
    pub zone: u16,
}

impl KernelFlow {
    /// Translated to an endpoint by a DNAT rule (kube-proxy's KUBE-SEP-*).
    pub fn destination_translated(&self) -> bool {
        self.status & IPS_DST_NAT != 0
    }

    /// The endpoint has answered, and a TCP connection is established:
    /// the flows worth carrying (others restart cheaply).
    pub fn live(&self) -> bool {
        self.status & IPS_SEEN_REPLY != 0
            && self.tcp_state.is_none_or(|state| state == TCP_ESTABLISHED)
    }

    /// The client's address was rewritten too (kube-proxy's masquerade).
    pub fn masqueraded(&self) -> bool {
        self.reply.dst != self.original.src
    }
}

fn nlmsg_align(n: usize) -> usize {
    (n + 3) & !3
}

/// Attributes of a netlink attribute stream: (type without flags, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[nlmsg_align(len).min(buf.len())..];
        Some((kind, payload))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn tuple(buf: &[u8]) -> Option<(u8, Tuple)> {
    let ip = find(buf, CTA_TUPLE_IP)?;
    let proto = find(buf, CTA_TUPLE_PROTO)?;
    let addr = |kind| -> Option<IpAddr> {
        let a = find(ip, kind)?;
        match a.len() {
            4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?).into()),
            16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).into()),
            _ => None,
        }
    };
    let (src, dst) = match (addr(CTA_IP_V4_SRC), addr(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (addr(CTA_IP_V6_SRC)?, addr(CTA_IP_V6_DST)?),
    };
    let number = *find(proto, CTA_PROTO_NUM)?.first()?;
    let port = |kind| -> Option<u16> {
        let p = find(proto, kind)?;
        Some(u16::from_be_bytes(p.try_into().ok()?))
    };
    let (sport, dport) = (port(CTA_PROTO_SRC_PORT)?, port(CTA_PROTO_DST_PORT)?);
    Some((
        number,
        Tuple {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        },
    ))
}

/// One IPCTNL_MSG_CT_NEW message's attributes (after the nfgenmsg header).
/// None for entries without ports (ICMP) or that cannot be read.
pub fn parse_flow(attrs: &[u8]) -> Option<KernelFlow> {
    let (proto, original) = tuple(find(attrs, CTA_TUPLE_ORIG)?)?;
    let (_, reply) = tuple(find(attrs, CTA_TUPLE_REPLY)?)?;
    let be32 = |p: &[u8]| p.try_into().ok().map(u32::from_be_bytes);
    let status = find(attrs, CTA_STATUS).and_then(be32).unwrap_or(0);
    let timeout_s = find(attrs, CTA_TIMEOUT).and_then(be32).unwrap_or(0);
    let zone = find(attrs, CTA_ZONE)
        .and_then(|p| p.try_into().ok().map(u16::from_be_bytes))
        .unwrap_or(0);
    let tcp_state = find(attrs, CTA_PROTOINFO)
        .and_then(|info| find(info, CTA_PROTOINFO_TCP))
        .and_then(|tcp| find(tcp, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first().copied());
    Some(KernelFlow {
        proto,
        original,
        reply,
        status,
        tcp_state,
        timeout_s,
        zone,
    })
}

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain syscalls on a socket this function owns.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            // A dump of a busy table must not wait forever.
            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            Ok(Netlink { fd, seq: 0 })
        }
    }

    /// Send one ctnetlink request: nlmsghdr + nfgenmsg + attributes.
    fn send(&mut self, msg_type: u16, flags: u16, family: u8, attrs: &[u8]) -> io::Result<u32> {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg_type).to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, res_id 0.
        msg.extend_from_slice(&[family, 0, 0, 0]);
        msg.extend_from_slice(attrs);
        // SAFETY: send a buffer we own.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Read the answers to request `seq` until NLMSG_DONE (or the ack of a
    /// non-dump request), handing each message's payload to `each`.
    fn receive(&self, seq: u32, dump: bool, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let payload = &rest[16..len];
                rest = &rest[nlmsg_align(len).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .unwrap_or(0);
                        if code == 0 {
                            if !dump {
                                return Ok(());
                            }
                            continue;
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {
                        if payload.len() >= 4 {
                            each(&payload[4..]);
                        }
                    }
                }
            }
        }
    }
}

/// Walk every entry of the kernel's table in this network namespace (both
/// families) that has ports; only what `each` keeps is held in memory (the
/// table may hold a million entries).
fn walk(mut each: impl FnMut(KernelFlow)) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    let seq = nl.send(
        IPCTNL_MSG_CT_GET,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        libc::AF_UNSPEC as u8,
        &[],
    )?;
    nl.receive(seq, true, |attrs| {
        if let Some(flow) = parse_flow(attrs) {
            each(flow);
        }
    })
}

/// The live connections a DNAT rule translated (kube-proxy's Services).
pub fn translated_connections() -> io::Result<Vec<KernelFlow>> {
    let mut flows = Vec::new();
    walk(|flow| {
        if flow.destination_translated() && flow.live() {
            flows.push(flow);
        }
    })?;
    Ok(flows)
}

/// How many `translated_connections` there are, holding none of them.
pub fn count_translated_connections() -> io::Result<usize> {
    let mut n = 0;
    walk(|flow| {
        if flow.destination_translated() && flow.live() {
            n += 1;
        }
    })?;
    Ok(n)
}

/// The device the node routes `addr` out of (rtnetlink RTM_GETROUTE): with
/// symmetric routing, where that client's packets come in.
pub fn route_device(addr: IpAddr) -> io::Result<Option<u32>> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_GETROUTE: u16 = 26;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    // SAFETY: plain syscalls on a socket this function owns.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let (family, octets): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut attrs = Vec::new();
    push_attr(&mut attrs, RTA_DST, &octets);
    let len = 16 + 12 + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, then zeros (src_len, tos, table, protocol,
    // scope, type, flags).
    msg.extend_from_slice(&[family, (octets.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&attrs);
    // SAFETY: send and recv with buffers we own.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let reply = &buf[..n as usize];
    if reply.len() < 16 + 12 {
        return Ok(None);
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != RTM_NEWROUTE {
        // NLMSG_ERROR: no route.
        return Ok(None);
    }
    let total =
        (u32::from_ne_bytes(reply[0..4].try_into().expect("4 bytes")) as usize).min(reply.len());
    Ok(attributes(&reply[28..total])
        .find(|(k, _)| *k == RTA_OIF)
        .and_then(|(_, p)| p.try_into().ok().map(u32::from_ne_bytes)))
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(nlmsg_align(buf.len()), 0);
}

/// The attributes naming `flow` by its original tuple (for a delete).
pub fn tuple_attributes(flow: &KernelFlow) -> Vec<u8> {
    let t = flow.original;
    let mut ip = Vec::new();
    match (t.src.ip(), t.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            push_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
            push_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let six = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            push_attr(&mut ip, CTA_IP_V6_SRC, &six(s));
            push_attr(&mut ip, CTA_IP_V6_DST, &six(d));
        }
    }
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[flow.proto]);
    push_attr(&mut proto, CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
    push_attr(&mut proto, CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
    let mut tuple = Vec::new();
    push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut attrs = Vec::new();
    push_attr(&mut attrs, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
    if flow.zone != 0 {
        push_attr(&mut attrs, CTA_ZONE, &flow.zone.to_be_bytes());
    }
    attrs
}

/// Deletes kernel entries, one request each.
pub struct Deleter(Netlink);

impl Deleter {
    pub fn open() -> io::Result<Self> {
        Netlink::open().map(Deleter)
    }

    /// Delete the entry of `flow`. Ok(false): it was gone already.
    pub fn delete(&mut self, flow: &KernelFlow) -> io::Result<bool> {
        let family = if flow.original.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        let seq = self.0.send(
            IPCTNL_MSG_CT_DELETE,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            family,
            &tuple_attributes(flow),
        )?;
        match self.0.receive(seq, false, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> KernelFlow {
        KernelFlow {
            proto: 6,
            original: Tuple {
                src: "10.244.1.2:40000".parse().unwrap(),
                dst: "10.96.0.10:80".parse().unwrap(),
            },
            reply: Tuple {
                src: "10.244.1.11:8080".parse().unwrap(),
                dst: "10.244.1.2:40000".parse().unwrap(),
            },
            status: IPS_SEEN_REPLY | IPS_DST_NAT | (1 << 3),
            tcp_state: Some(TCP_ESTABLISHED),
            timeout_s: 86_390,
            zone: 0,
        }
    }

    /// A message as the kernel writes it (tuples, status, timeout, TCP
    /// state) reads back field by field.
    #[test]
    fn a_dumped_entry_reads_back() {
        let f = flow();
        let mut reply_ip = Vec::new();
        push_attr(&mut reply_ip, CTA_IP_V4_SRC, &[10, 244, 1, 11]);
        push_attr(&mut reply_ip, CTA_IP_V4_DST, &[10, 244, 1, 2]);
        let mut reply_proto = Vec::new();
        push_attr(&mut reply_proto, CTA_PROTO_NUM, &[6]);
        push_attr(&mut reply_proto, CTA_PROTO_SRC_PORT, &8080u16.to_be_bytes());
        push_attr(
            &mut reply_proto,
            CTA_PROTO_DST_PORT,
            &40000u16.to_be_bytes(),
        );
        let mut reply = Vec::new();
        push_attr(&mut reply, CTA_TUPLE_IP | NLA_F_NESTED, &reply_ip);
        push_attr(&mut reply, CTA_TUPLE_PROTO | NLA_F_NESTED, &reply_proto);
        let mut tcp = Vec::new();
        push_attr(&mut tcp, CTA_PROTOINFO_TCP_STATE, &[TCP_ESTABLISHED]);
        let mut info = Vec::new();
        push_attr(&mut info, CTA_PROTOINFO_TCP | NLA_F_NESTED, &tcp);
        let mut msg = tuple_attributes(&f);
        push_attr(&mut msg, CTA_TUPLE_REPLY | NLA_F_NESTED, &reply);
        push_attr(&mut msg, CTA_STATUS, &f.status.to_be_bytes());
        push_attr(&mut msg, CTA_TIMEOUT, &86_390u32.to_be_bytes());
        push_attr(&mut msg, CTA_PROTOINFO | NLA_F_NESTED, &info);
        let read = parse_flow(&msg).expect("parses");
        assert_eq!(read, f);
        assert!(read.destination_translated() && read.live() && !read.masqueraded());
    }

    /// Read-only and unprivileged: the loopback address routes out of `lo`,
    /// ifindex 1 in every network namespace.
    #[test]
    fn the_route_to_an_address_names_its_device() {
        assert_eq!(route_device("127.0.0.1".parse().unwrap()).unwrap(), Some(1));
        assert_eq!(route_device("::1".parse().unwrap()).unwrap(), Some(1));
    }

    #[test]
    fn unreadable_or_portless_entries_are_skipped() {
        assert_eq!(parse_flow(&[]), None);
        assert_eq!(parse_flow(&[8, 0, 1, 0x80, 0, 0, 0, 0]), None);
        let mut f = flow();
        f.reply.dst = "192.168.0.1:61000".parse().unwrap();
        f.tcp_state = Some(1);
        assert!(f.masqueraded() && !f.live());
    }
}
