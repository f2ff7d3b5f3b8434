//! Packet-table harness in the style of Katran's fixtures and Cilium's
//! PKTGEN/SETUP/CHECK: a `Case` is a map setup plus a sequence of steps, each
//! a frame in and the verdict and frame expected out.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, lpm_trie::LpmTrie},
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, BackendSetValue, BackendSlotKey, BackendValue,
    ConfigValue, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP, MaglevKey, MonitorConfig, MonitorEvent,
    RevNatValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceCounters, ServiceKey, ServiceValue,
    SetMemberKey, SourceRange, frontend_kind, map_names, program_names, service_flags, stat,
};

/// Rev-NAT ids the harness counts per frontend (0..64).
pub const SERVICE_COUNTER_SLOTS: u32 = 64;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The program under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// Pod devices (in-cluster traffic).
    Tc,
    /// The pod-side logic under XDP.
    Xdp,
    /// Node devices under tc (traffic from outside).
    TcNode,
    /// Node devices under XDP.
    XdpNode,
    /// Replies only, on the ingress of any other device (a second NIC, an overlay).
    TcReply,
    /// Replies only, on a pod device's egress (into the client pod).
    TcToPod,
    /// Replies (and node sockets' masquerade, which needs a sending socket
    /// the test runs cannot give), on any other device's egress.
    TcNodeEgress,
}

pub const BOTH: &[Prog] = &[Prog::Tc, Prog::Xdp];
/// The node-device programs.
pub const NODE: &[Prog] = &[Prog::TcNode, Prog::XdpNode];
/// The reply-only programs (other devices' ingress, pod devices' egress).
pub const REPLY_ONLY: &[Prog] = &[Prog::TcReply, Prog::TcToPod, Prog::TcNodeEgress];
/// Every program.
pub const ALL: &[Prog] = &[
    Prog::Tc,
    Prog::Xdp,
    Prog::TcNode,
    Prog::XdpNode,
    Prog::TcReply,
    Prog::TcToPod,
    Prog::TcNodeEgress,
];

/// What the program decided, normalised across tc and XDP return codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Sent back out of the device it came in on (tc redirect, XDP_TX).
    Bounce,
}

impl Prog {
    pub fn program_name(self) -> &'static str {
        match self {
            Prog::Tc => program_names::TC_INGRESS,
            Prog::Xdp => program_names::XDP,
            Prog::TcNode => program_names::TC_NODE,
            Prog::XdpNode => program_names::XDP_NODE,
            Prog::TcReply => program_names::TC_REPLY,
            Prog::TcToPod => program_names::TC_TO_POD,
            Prog::TcNodeEgress => program_names::TC_NODE_EGRESS,
        }
    }

    fn is_tc(self) -> bool {
        !matches!(self, Prog::Xdp | Prog::XdpNode)
    }

    fn verdict(self, code: u32) -> Verdict {
        match (self.is_tc(), code) {
            // tc: TCX_NEXT (-1: the chain goes on) or TC_ACT_OK.
            (true, 0 | 0xffff_ffff) | (false, 2) => Verdict::Pass,
            (true, 2) | (false, 1) => Verdict::Drop,
            (true, 7) | (false, 3) => Verdict::Bounce,
            (_, code) => panic!("{self:?} returned unexpected code {code}"),
        }
    }
}

/// IP address and port.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ep {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Debug for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))
    }
}

impl Ep {
    /// The IPv4 address (panics for IPv6: a test mixing families is wrong).
    pub fn v4(&self) -> Ipv4Addr {
        match self.addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => panic!("{a} is not IPv4"),
        }
    }
}

/// `ep("10.96.0.10:80")`, `ep("[fd00::10]:80")`.
pub fn ep(s: &str) -> Ep {
    let sa: SocketAddr = s
        .parse()
        .unwrap_or_else(|e| panic!("bad endpoint {s}: {e}"));
    Ep {
        addr: sa.ip(),
        port: sa.port(),
    }
}

/// An address as the maps hold it.
pub fn be32(addr: impl Into<IpAddr>) -> lb_common::Addr {
    lb_common::Addr::from(addr.into())
}

fn ip_layer(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{src} -> {dst}: mixed families"),
    }
}

/// TCP flags for building frames.
#[derive(Clone, Copy, Default)]
pub struct Tcp {
    pub syn: bool,
    pub ack: Option<u32>,
    pub fin: bool,
    pub rst: bool,
    pub seq: u32,
}

pub const SYN: Tcp = Tcp {
    syn: true,
    ack: None,
    fin: false,
    rst: false,
    seq: 1000,
};
pub const ACK: Tcp = Tcp {
    syn: false,
    ack: Some(1),
    fin: false,
    rst: false,
    seq: 1001,
};

pub fn tcp(src: Ep, dst: Ep, flags: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut b = ip_layer(src.addr, dst.addr).tcp(src.port, dst.port, flags.seq, 64240);
    if flags.syn {
        b = b.syn();
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    if let Some(ack) = flags.ack {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build tcp frame");
    out
}

pub fn udp(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    let b = ip_layer(src.addr, dst.addr).udp(src.port, dst.port);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build udp frame");
    out
}

/// SCTP's CRC32c of a whole SCTP packet (checksum field counted as zero),
/// from the bytes: the reference the datapath's incremental fix must match.
pub use lb_common::sctp_crc::checksum as sctp_crc32c;

/// An SCTP packet from `src` to `dst`: the common header (verification
/// tag 0x01020304) and one DATA chunk carrying `payload`, with its CRC32c.
pub fn sctp(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port.to_be_bytes());
    l4.extend_from_slice(&dst.port.to_be_bytes());
    l4.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    // DATA chunk: type 0, flags B|E, length, TSN, stream 0, seq 0, PPID 0.
    let chunk_len = 16 + payload.len();
    l4.extend_from_slice(&[0, 0x03]);
    l4.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    l4.extend_from_slice(&1u32.to_be_bytes());
    l4.extend_from_slice(&[0; 8]);
    l4.extend_from_slice(payload);
    while l4.len() % 4 != 0 {
        l4.push(0);
    }
    let crc = sctp_crc32c(&l4);
    l4[8..12].copy_from_slice(&crc.to_le_bytes());
    let mut out = Vec::new();
    ip_layer(src.addr, dst.addr)
        .write(&mut out, etherparse::IpNumber(132), &l4)
        .expect("build sctp frame");
    out
}

/// An ICMP (IPv4) or ICMPv6 error of `kind`/`code` from `src` to `dst`
/// quoting the IP packet of `quoted` (a frame from these builders; cut to
/// `quote_len` bytes of IP packet if given, as a router quoting 8 bytes of
/// L4 would). `rest` is the header's second word (MTU for "fragmentation
/// needed" and "packet too big").
pub fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
    quote_len: Option<usize>,
) -> Vec<u8> {
    let mut quote = quoted[14..].to_vec();
    if let Some(len) = quote_len {
        quote.truncate(len);
    }
    let b = ip_layer(src, dst);
    let mut out = Vec::new();
    match src {
        IpAddr::V4(_) => b
            .icmpv4_raw(kind, code, rest)
            .write(&mut out, &quote)
            .expect("build icmp error"),
        IpAddr::V6(_) => b
            .icmpv6_raw(kind, code, rest)
            .write(&mut out, &quote)
            .expect("build icmpv6 error"),
    }
    out
}

/// Split a frame from these builders into IP fragments of `chunk` bytes of
/// payload each (a multiple of 8), datagram identification `id`: IPv4 with
/// MF and offsets, IPv6 with a Fragment header (RFC 8200 4.5).
pub fn fragment(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(
        chunk.is_multiple_of(8),
        "fragment payload must be a multiple of 8"
    );
    let v6 = frame[12..14] == [0x86, 0xdd];
    let (hlen, payload) = if v6 {
        (40, &frame[54..])
    } else {
        let ihl = (frame[14] & 0x0f) as usize * 4;
        let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        (ihl, &frame[14 + ihl..14 + tot])
    };
    let header = &frame[14..14 + hlen];
    let mut out = Vec::new();
    for (i, piece) in payload.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let more = offset + piece.len() < payload.len();
        let mut f = frame[..14].to_vec();
        let mut ip = header.to_vec();
        if v6 {
            let next_header = ip[6];
            ip[6] = 44;
            ip[4..6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&[next_header, 0]);
            let bits = (offset as u16) | more as u16;
            f.extend_from_slice(&bits.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        } else {
            ip[2..4].copy_from_slice(&((hlen + piece.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let bits = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&bits.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum = !fold(sum16(&ip));
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        f.extend_from_slice(piece);
        out.push(f);
    }
    out
}

/// An ICMP echo request (ping) with identifier, sequence and payload.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(id, seq);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build echo frame");
    out
}

/// An ICMPv6 echo request.
pub fn echo6_request(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, HOST_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .icmpv6_echo_request(id, seq);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build echo6 frame");
    out
}

/// The same UDP frame with checksum 0 ("no checksum").
pub fn udp_no_csum(src: Ep, dst: Ep, payload: &[u8]) -> Vec<u8> {
    let mut f = udp(src, dst, payload);
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

/// Insert IPv4 options (a multiple of 4 bytes) into a frame and fix the header.
pub fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(options);
    f.extend_from_slice(&frame[34..]);
    let ihl = 5 + options.len() / 4;
    f[14] = 0x40 | ihl as u8;
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize + options.len();
    f[16..18].copy_from_slice(&(tot as u16).to_be_bytes());
    f[24] = 0;
    f[25] = 0;
    let c = !fold(sum16(&f[14..14 + ihl * 4]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// `frame` as another node's lb forwards a DSR flow's first packet: the
/// frontend the client sent it to in lb's IPv4 option, or in lb's IPv6
/// Destination Options header, right after the fixed IP header.
pub fn with_dsr_option(frame: &[u8], frontend: Ep) -> Vec<u8> {
    let port = frontend.port.to_be_bytes();
    match frontend.addr {
        IpAddr::V4(addr) => {
            let mut option = vec![lb_common::dsr::OPT4_TYPE, lb_common::dsr::OPT4_LEN];
            option.extend_from_slice(&port);
            option.extend_from_slice(&addr.octets());
            with_ip_options(frame, &option)
        }
        IpAddr::V6(addr) => {
            let mut f = frame[..54].to_vec();
            let header_len = lb_common::dsr::OPT6_HDR_LEN as usize;
            f.extend_from_slice(&[
                frame[20],
                (header_len / 8 - 1) as u8,
                lb_common::dsr::OPT6_TYPE,
                lb_common::dsr::OPT6_DATA_LEN,
            ]);
            f.extend_from_slice(&addr.octets());
            f.extend_from_slice(&port);
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&frame[54..]);
            f[20] = lb_common::dsr::IPPROTO_DSTOPTS;
            let len = u16::from_be_bytes([f[18], f[19]]) as usize + header_len;
            f[18..20].copy_from_slice(&(len as u16).to_be_bytes());
            f
        }
    }
}

/// Set IPv4 header bytes and fix the header checksum (for fragments, bad lengths ...).
pub fn patch_ip(frame: &[u8], off_in_ip: usize, bytes: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + off_in_ip..14 + off_in_ip + bytes.len()].copy_from_slice(bytes);
    let ihl = ((f[14] & 0x0f) as usize * 4).clamp(20, f.len() - 14);
    f[24] = 0;
    f[25] = 0;
    let c = !fold(sum16(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// RFC 1071 sum of big-endian 16-bit words (odd byte padded).
pub fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Verify an IPv4 frame's header and L4 (TCP, UDP unless zero, ICMP)
/// checksums from scratch; for IPv6, the L4 checksum (TCP, UDP, ICMPv6)
/// with its pseudo header.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() >= 54 && frame[12..14] == [0x86, 0xdd] {
        let end = 54 + u16::from_be_bytes([frame[18], frame[19]]) as usize;
        if end > frame.len() {
            return Err("inconsistent IPv6 payload length".into());
        }
        // A Destination Options header (lb's DSR one) before the upper layer.
        let (l4_start, proto) = if frame[20] == lb_common::dsr::IPPROTO_DSTOPTS {
            (54 + (frame[55] as usize + 1) * 8, frame[54])
        } else {
            (54, frame[20])
        };
        if l4_start > end {
            return Err("IPv6 extension header past the payload".into());
        }
        let l4 = &frame[l4_start..end];
        let pseudo = sum16(&frame[22..54]) + proto as u32 + l4.len() as u32;
        return match proto {
            IPPROTO_TCP | IPPROTO_UDP | 58 if fold(pseudo + sum16(l4)) != 0xffff => {
                Err(format!("bad checksum (IPv6, next header {proto})"))
            }
            _ => Ok(()),
        };
    }
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    if ihl < 20 || tot < ihl || 14 + tot > frame.len() {
        return Err("inconsistent IPv4 lengths".into());
    }
    if fold(sum16(&frame[14..14 + ihl])) != 0xffff {
        return Err("bad IPv4 header checksum".into());
    }
    if u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0 {
        // A fragment: its L4 checksum covers the whole datagram.
        return Ok(());
    }
    let l4 = &frame[14 + ihl..14 + tot];
    let pseudo = sum16(&frame[26..34]) + frame[23] as u32 + l4.len() as u32;
    match frame[23] {
        IPPROTO_TCP if fold(pseudo + sum16(l4)) != 0xffff => Err("bad TCP checksum".into()),
        IPPROTO_UDP
            if l4.len() >= 8 && l4[6..8] != [0, 0] && fold(pseudo + sum16(l4)) != 0xffff =>
        {
            Err("bad UDP checksum".into())
        }
        1 if fold(sum16(l4)) != 0xffff => Err("bad ICMP checksum".into()),
        _ => Ok(()),
    }
}

/// A loaded copy of lb's programs with private (unpinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// `skb->mark` the last tc run left (BPF_PROG_TEST_RUN's context out).
    last_mark: std::cell::Cell<u32>,
    /// The members written per set: replacing a set's members must not scan
    /// the whole member map (the benchmark programs 100,000 sets).
    members: std::collections::BTreeMap<u32, Vec<u32>>,
}

thread_local! {
    /// Loaded datapaths by program set, for `Datapath::fresh_for`.
    static POOL: std::cell::RefCell<Vec<(Vec<Prog>, Datapath)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Room for `struct __sk_buff` as BPF_PROG_TEST_RUN's context (the kernel
/// checks any bytes past its size are zero).
const SKB_CTX: usize = 256;
/// Offset of `mark` in `struct __sk_buff` (after len and pkt_type).
const SKB_MARK: usize = 8;

impl Datapath {
    pub fn load() -> Self {
        // Small maps: tests load many copies in parallel.
        Self::load_sized(4096, 4096)
    }

    /// With room for `services` slots and `backends` backends (benchmarks).
    pub fn load_sized(services: u32, backends: u32) -> Self {
        Self::load_programs(services, backends, ALL)
    }

    /// Only `programs` loaded (each costs its verification time).
    pub fn load_for(programs: &[Prog]) -> Self {
        Self::load_programs(4096, 4096, programs)
    }

    /// `load_for`, reusing (with every map emptied) one this thread loaded
    /// for the same programs earlier: verifying the programs once per
    /// thread instead of once per case keeps the suite fast. Give it back
    /// with `recycle`.
    pub fn fresh_for(programs: &[Prog]) -> Self {
        let cached = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool.iter().position(|(p, _)| p.as_slice() == programs)?;
            Some(pool.swap_remove(at).1)
        });
        match cached {
            Some(mut dp) => {
                dp.reset();
                dp
            }
            None => Self::load_for(programs),
        }
    }

    /// Keep a Datapath loaded for `programs` for this thread's next case.
    pub fn recycle(self, programs: &[Prog]) {
        POOL.with(|pool| pool.borrow_mut().push((programs.to_vec(), self)));
    }

    /// Empty every map (a case's state must not reach the next case).
    fn reset(&mut self) {
        fn clear<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) {
            let mut map = HashMap::<_, K, V>::try_from(
                ebpf.map_mut(name).unwrap_or_else(|| panic!("map {name}")),
            )
            .unwrap_or_else(|e| panic!("map {name}: {e}"));
            let keys: Vec<K> = map.keys().map(|k| k.expect("key")).collect();
            for k in keys {
                map.remove(&k)
                    .unwrap_or_else(|e| panic!("clear {name}: {e}"));
            }
        }
        self.members.clear();
        let e = &mut self.ebpf;
        clear::<ServiceKey, ServiceValue>(e, map_names::SERVICES);
        clear::<u32, BackendValue>(e, map_names::BACKENDS);
        clear::<u32, RevNatValue>(e, map_names::REV_NAT);
        clear::<u32, BackendSetValue>(e, map_names::BACKEND_SETS);
        clear::<BackendSlotKey, u32>(e, map_names::BACKEND_SLOTS);
        clear::<SetMemberKey, u32>(e, map_names::SET_MEMBERS);
        clear::<CtKey, CtValue>(e, map_names::CT_TCP);
        clear::<CtKey, CtValue>(e, map_names::CT_OTHER);
        clear::<AffinityKey, AffinityValue>(e, map_names::AFFINITY);
        clear::<MaglevKey, u32>(e, map_names::MAGLEV);
        clear::<u32, u32>(e, map_names::PREFILTER4);
        clear::<lb_common::Addr, u32>(e, map_names::PREFILTER6);
        clear::<lb_common::SockNatKey, lb_common::SockNatValue>(e, map_names::SOCK_NAT);
        clear::<lb_common::SockAffinityKey, AffinityValue>(e, map_names::SOCK_AFFINITY);
        // The kernel side's fragment map ({src, dst, id, proto} -> ports).
        clear::<[u8; 40], [u8; 4]>(e, "LB_FRAGS");
        let mut trie = LpmTrie::<_, SourceRange, u32>::try_from(
            e.map_mut(map_names::SOURCE_RANGES).expect("source ranges"),
        )
        .expect("lpm trie");
        let keys: Vec<_> = trie.keys().map(|k| k.expect("key")).collect();
        for k in keys {
            trie.remove(&k).expect("clear source ranges");
        }
        let mut config =
            Array::<_, ConfigValue>::try_from(e.map_mut(map_names::CONFIG).expect("config map"))
                .expect("config is an array");
        config
            .set(0, ConfigValue::default(), 0)
            .expect("reset config");
        let mut stats =
            PerCpuArray::<_, u64>::try_from(e.map_mut(map_names::STATS).expect("stats map"))
                .expect("stats is a per-cpu array");
        let cpus = aya::util::nr_cpus().expect("cpus");
        for i in 0..stat::CAPACITY {
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).expect("zeros");
            stats.set(i, zeros, 0).expect("reset stat");
        }
        self.last_mark.set(0);
        self.monitor(0, 0);
        self.events();
        self.service_cidrs(&[]);
        let mut per_service = PerCpuArray::<_, ServiceCounters>::try_from(
            self.ebpf
                .map_mut(map_names::SERVICE_STATS)
                .expect("service stats map"),
        )
        .expect("service stats is a per-cpu array");
        let cpus = aya::util::nr_cpus().expect("cpus");
        for i in 0..SERVICE_COUNTER_SLOTS {
            let zeros = aya::maps::PerCpuValues::try_from(vec![ServiceCounters::default(); cpus])
                .expect("zeros");
            per_service
                .set(i, zeros, 0)
                .expect("reset service counters");
        }
    }

    /// A frontend's counters (by rev-NAT id), summed over CPUs.
    pub fn service_counters(&mut self, rev_nat_id: u32) -> ServiceCounters {
        let per_service = PerCpuArray::<_, ServiceCounters>::try_from(
            self.ebpf
                .map_mut(map_names::SERVICE_STATS)
                .expect("service stats map"),
        )
        .expect("service stats is a per-cpu array");
        per_service
            .get(&rev_nat_id, 0)
            .expect("a counted rev-NAT id")
            .iter()
            .fold(ServiceCounters::default(), |sum, c| ServiceCounters {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
                new_connections: sum.new_connections + c.new_connections,
                refused: sum.refused + c.refused,
                dropped: sum.dropped + c.dropped,
            })
    }

    /// Ask for events as `lb-agent monitor` does (`1 << event_kind::*`;
    /// new flows: one in `sample`); 0 stops them.
    pub fn monitor(&mut self, kinds: u32, sample: u32) {
        let mut monitor = Array::<_, MonitorConfig>::try_from(
            self.ebpf.map_mut(map_names::MONITOR).expect("monitor map"),
        )
        .expect("monitor is an array");
        monitor
            .set(0, MonitorConfig { kinds, sample }, 0)
            .expect("set monitor");
    }

    /// The cluster's Service CIDRs ("10.96.0.0/16", "fd00:96::/112"), as
    /// the agent writes them.
    pub fn service_cidrs(&mut self, cidrs: &[&str]) {
        let cidrs = cidrs.iter().map(|c| c.parse().expect("a CIDR")).collect();
        let (value, left_out) = lb_agent::datapath::sync::service_cidrs_value(&cidrs);
        assert!(left_out.is_empty(), "{left_out:?}");
        let mut map = Array::<_, lb_common::ServiceCidrs>::try_from(
            self.ebpf
                .map_mut(map_names::SERVICE_CIDRS)
                .expect("service cidrs map"),
        )
        .expect("service cidrs is an array");
        map.set(0, value, 0).expect("set service cidrs");
    }

    /// Hold `addr` as allocated to a Service lb does not serve, as the
    /// agent writes `LB_ALLOCATED`.
    pub fn allocated(&mut self, addr: std::net::IpAddr) {
        let mut map = aya::maps::HashMap::<_, lb_common::Addr, u32>::try_from(
            self.ebpf
                .map_mut(map_names::ALLOCATED)
                .expect("allocated map"),
        )
        .expect("allocated is a hash");
        map.insert(lb_common::Addr::from(addr), 1, 0)
            .expect("hold address");
    }

    /// The events written since the last call, oldest first.
    pub fn events(&mut self) -> Vec<MonitorEvent> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(map_names::EVENTS).expect("events map"))
            .expect("events is a ring buffer");
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<MonitorEvent>(), "event record size");
            // SAFETY: a MonitorEvent record, as the programs write them.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        events
    }

    fn load_programs(services: u32, backends: u32, programs: &[Prog]) -> Self {
        crate::require_root();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CT_TCP, services.max(4096))
            .map_max_entries(map_names::CT_OTHER, services.max(4096))
            .map_max_entries(map_names::SERVICES, services)
            .map_max_entries(map_names::BACKENDS, backends)
            .map_max_entries(map_names::AFFINITY, 1024)
            .map_max_entries(map_names::MAGLEV, 65536)
            // Counted per frontend, as with --service-counters.
            .map_max_entries(map_names::SERVICE_STATS, SERVICE_COUNTER_SLOTS)
            .load(lb_agent::EBPF_OBJECT)
            .expect("load lb eBPF object");
        for prog in programs.iter().filter(|p| p.is_tc()) {
            let name = prog.program_name();
            let tc: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} in object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is a classifier: {e}"));
            tc.load()
                .unwrap_or_else(|e| panic!("verifier accepts {name}: {e}"));
            if std::env::var_os("LB_VERIFIED").is_some() {
                eprintln!(
                    "VERIFIED {name} {:?}",
                    tc.info().ok().and_then(|i| i.verified_instruction_count())
                );
            }
        }
        for prog in programs.iter().filter(|p| !p.is_tc()) {
            let name = prog.program_name();
            let xdp: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} in object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is XDP: {e}"));
            xdp.load()
                .unwrap_or_else(|e| panic!("verifier accepts {name}: {e}"));
            if std::env::var_os("LB_VERIFIED").is_some() {
                eprintln!(
                    "VERIFIED {name} {:?}",
                    xdp.info().ok().and_then(|i| i.verified_instruction_count())
                );
            }
        }
        Datapath {
            ebpf,
            last_mark: std::cell::Cell::new(0),
            members: std::collections::BTreeMap::new(),
        }
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .unwrap_or_else(|| panic!("map {name}")),
        )
        .unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// Put `addr` in the prefilter, as the agent does for every frontend
    /// and backend address before writing it.
    pub fn prefilter(&mut self, addr: IpAddr) {
        match addr {
            IpAddr::V4(v4) => self
                .hash::<u32, u32>(map_names::PREFILTER4)
                .insert(u32::from(v4).to_be(), 1, 0)
                .expect("prefilter4"),
            IpAddr::V6(_) => self
                .hash::<lb_common::Addr, u32>(map_names::PREFILTER6)
                .insert(be32(addr), 1, 0)
                .expect("prefilter6"),
        }
    }

    pub fn backend(&mut self, id: u32, at: Ep, proto: u8) {
        self.prefilter(at.addr);
        let value = BackendValue {
            addr_be: be32(at.addr),
            port_be: at.port.to_be(),
            proto,
            state: BACKEND_ACTIVE,
            flags: 0,
        };
        self.hash::<u32, BackendValue>(map_names::BACKENDS)
            .insert(id, value, 0)
            .expect("insert backend");
    }

    /// Change a backend's state (`BACKEND_ACTIVE` / `BACKEND_STANDBY`) and flags.
    pub fn set_backend_state(&mut self, id: u32, state: u8, flags: u32) {
        let mut backends = self.hash::<u32, BackendValue>(map_names::BACKENDS);
        let mut value = backends.get(&id, 0).expect("backend exists");
        value.state = state;
        value.flags = flags;
        backends.insert(id, value, 0).expect("update backend");
    }

    /// Rewrite a frontend's entry directly (affinity timeout, flags).
    pub fn set_head(&mut self, at: Ep, proto: u8, update: impl FnOnce(&mut ServiceValue)) {
        let mut services = self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES);
        let key = Self::key(at, proto);
        let mut head = services.get(&key, 0).expect("frontend exists");
        update(&mut head);
        services.insert(key, head, 0).expect("update head");
    }

    /// Fill the Maglev table of a backend set (a frontend programmed here
    /// has the set of its rev-NAT id) and record its size in the set.
    pub fn maglev_table(&mut self, set_id: u32, table: &[u32]) {
        let mut maglev = self.hash::<MaglevKey, u32>(map_names::MAGLEV);
        for (i, id) in table.iter().enumerate() {
            maglev
                .insert(
                    MaglevKey {
                        set_id,
                        index: i as u32,
                    },
                    id,
                    0,
                )
                .expect("maglev entry");
        }
        let mut sets = self.hash::<u32, BackendSetValue>(map_names::BACKEND_SETS);
        let mut set = sets.get(&set_id, 0).expect("backend set exists");
        set.maglev_size = table.len() as u32;
        sets.insert(set_id, set, 0).expect("update backend set");
    }

    pub fn insert_affinity(
        &mut self,
        client: impl Into<IpAddr>,
        rev_nat_id: u32,
        backend_id: u32,
        last_used_ns: u64,
    ) {
        let key = AffinityKey {
            client_addr_be: be32(client),
            rev_nat_id,
        };
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns,
        };
        self.hash::<AffinityKey, AffinityValue>(map_names::AFFINITY)
            .insert(key, value, 0)
            .expect("affinity");
    }

    /// Load the socket-level programs and attach them to the cgroup v2
    /// directory `cgroup`. The links belong to this object: dropping it
    /// (also on a panic) detaches them. Set `SOCKET_LB` and the netns
    /// cookie in the config so they act only on the test's namespace.
    pub fn attach_sockets(&mut self, cgroup: &std::path::Path) {
        let dir = std::fs::File::open(cgroup).expect("open cgroup");
        for (name, _) in program_names::SOCKET {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} in object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is a sock_addr program: {e}"));
            program
                .load()
                .unwrap_or_else(|e| panic!("verifier accepts {name}: {e}"));
            program
                .attach(&dir, CgroupAttachMode::Single)
                .unwrap_or_else(|e| panic!("attach {name}: {e}"));
        }
    }

    pub fn remove_rev_nat(&mut self, id: u32) {
        self.hash::<u32, RevNatValue>(map_names::REV_NAT)
            .remove(&id)
            .expect("remove rev nat");
    }

    pub fn remove_backend(&mut self, id: u32) {
        self.hash::<u32, BackendValue>(map_names::BACKENDS)
            .remove(&id)
            .expect("remove backend");
    }

    fn key(at: Ep, proto: u8) -> ServiceKey {
        Self::scoped_key(at, proto, SCOPE_INTERNAL)
    }

    fn scoped_key(at: Ep, proto: u8, scope: u8) -> ServiceKey {
        ServiceKey {
            addr_be: be32(at.addr),
            port_be: at.port.to_be(),
            proto,
            scope,
            _pad: 0,
        }
    }

    /// Program a frontend for traffic from outside (node devices): kind
    /// `kind` (a `frontend_kind`), scope external.
    pub fn external_frontend(
        &mut self,
        at: Ep,
        proto: u8,
        rev_nat_id: u32,
        backends: &[u32],
        kind_and_flags: u32,
    ) {
        self.scoped_frontend(
            at,
            proto,
            rev_nat_id,
            backends,
            kind_and_flags,
            SCOPE_EXTERNAL,
        );
    }

    /// An address entry (`{addr, port 0, proto 0}`) in a scope with these flags.
    pub fn address_entry(&mut self, addr: impl Into<IpAddr>, scope: u8, flags: u32) {
        let addr = addr.into();
        self.prefilter(addr);
        let head = ServiceValue {
            flags: frontend_kind::CLUSTER_IP | flags,
            ..Default::default()
        };
        self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)
            .insert(Self::scoped_key(Ep { addr, port: 0 }, 0, scope), head, 0)
            .expect("address entry");
    }

    /// Allow clients in `client/prefix` to use LoadBalancer IP `frontend`.
    pub fn source_range(
        &mut self,
        frontend: impl Into<IpAddr>,
        client: impl Into<IpAddr>,
        prefix: u32,
    ) {
        let (frontend, client) = (frontend.into(), client.into());
        // Bits before the client prefix: the frontend, and for IPv4 the mapped prefix.
        let base = if client.is_ipv4() { 128 + 96 } else { 128 };
        let mut trie = LpmTrie::<_, SourceRange, u32>::try_from(
            self.ebpf
                .map_mut(map_names::SOURCE_RANGES)
                .expect("source ranges map"),
        )
        .expect("source ranges is an LPM trie");
        let key = aya::maps::lpm_trie::Key::new(
            base + prefix,
            SourceRange {
                frontend_addr_be: be32(frontend),
                client_addr_be: be32(client),
            },
        );
        trie.insert(&key, 1, 0).expect("insert source range");
    }

    /// Rewrite the node config (SNAT address and ports, flags).
    pub fn set_config(&mut self, update: impl FnOnce(&mut ConfigValue)) {
        let mut config = Array::<_, ConfigValue>::try_from(
            self.ebpf.map_mut(map_names::CONFIG).expect("config map"),
        )
        .expect("config is an array");
        let mut value = config.get(&0, 0).expect("read config");
        value.layout_version = lb_common::LAYOUT_VERSION;
        update(&mut value);
        config.set(0, value, 0).expect("write config");
    }

    /// Program a frontend with the given backend ids, in make-before-break
    /// order. Its backend set has the id of its rev-NAT id.
    pub fn frontend(&mut self, at: Ep, proto: u8, rev_nat_id: u32, backends: &[u32]) {
        self.frontend_with_flags(at, proto, rev_nat_id, backends, 0);
    }

    /// Mark `addr` as a Service IP: undeclared ports and protocols are rejected.
    pub fn address_only(&mut self, addr: impl Into<IpAddr>) {
        let addr = addr.into();
        self.prefilter(addr);
        let head = ServiceValue {
            flags: frontend_kind::CLUSTER_IP | service_flags::ADDRESS_ONLY,
            ..Default::default()
        };
        self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)
            .insert(Self::key(Ep { addr, port: 0 }, 0), head, 0)
            .expect("address entry");
    }

    pub fn set_hairpin_addr(&mut self, addr: Ipv4Addr) {
        let addr = IpAddr::V4(addr);
        let mut config = Array::<_, ConfigValue>::try_from(
            self.ebpf.map_mut(map_names::CONFIG).expect("config map"),
        )
        .expect("config is an array");
        let value = ConfigValue {
            layout_version: lb_common::LAYOUT_VERSION,
            hairpin_snat_addr4: be32(addr),
            ..Default::default()
        };
        config.set(0, value, 0).expect("write config");
    }

    pub fn frontend_with_flags(
        &mut self,
        at: Ep,
        proto: u8,
        rev_nat_id: u32,
        backends: &[u32],
        flags: u32,
    ) {
        self.scoped_frontend(
            at,
            proto,
            rev_nat_id,
            backends,
            frontend_kind::CLUSTER_IP | flags,
            SCOPE_INTERNAL,
        );
    }

    fn scoped_frontend(
        &mut self,
        at: Ep,
        proto: u8,
        rev_nat_id: u32,
        backends: &[u32],
        kind_and_flags: u32,
        scope: u8,
    ) {
        self.prefilter(at.addr);
        let set_id = rev_nat_id;
        let mut earlier = self
            .members
            .insert(set_id, backends.to_vec())
            .unwrap_or_default();
        earlier.sort_unstable();
        earlier.dedup();
        let mut members = self.hash::<SetMemberKey, u32>(map_names::SET_MEMBERS);
        // The set is exactly `backends`: earlier members go.
        for backend_id in earlier {
            members
                .remove(&SetMemberKey { set_id, backend_id })
                .expect("remove member");
        }
        for id in backends {
            let key = SetMemberKey {
                set_id,
                backend_id: *id,
            };
            members.insert(key, 1, 0).expect("set member");
        }
        let mut slots = self.hash::<BackendSlotKey, u32>(map_names::BACKEND_SLOTS);
        for (i, id) in backends.iter().enumerate() {
            let key = BackendSlotKey {
                set_id,
                slot: i as u32,
            };
            slots.insert(key, id, 0).expect("slot");
        }
        let mut sets = self.hash::<u32, BackendSetValue>(map_names::BACKEND_SETS);
        let set = BackendSetValue {
            count: backends.len() as u32,
            maglev_size: 0,
        };
        sets.insert(set_id, set, 0).expect("backend set");
        let head = ServiceValue {
            backend_set_id: set_id,
            rev_nat_id,
            flags: kind_and_flags,
            affinity_timeout_s: 0,
        };
        self.hash::<ServiceKey, ServiceValue>(map_names::SERVICES)
            .insert(Self::scoped_key(at, proto, scope), head, 0)
            .expect("frontend");
        let rev = RevNatValue {
            addr_be: be32(at.addr),
            port_be: at.port.to_be(),
            proto,
            scope,
        };
        self.hash::<u32, RevNatValue>(map_names::REV_NAT)
            .insert(rev_nat_id, rev, 0)
            .expect("rev nat");
    }

    /// Into the conntrack map of the key's protocol.
    pub fn insert_ct(&mut self, key: CtKey, value: CtValue) {
        // A reply entry's source is a backend: in the prefilter.
        if key.dir == lb_common::CT_DIR_REPLY {
            let src = key.src_addr_be;
            let mut octets = [0u8; 16];
            for (i, word) in src.be.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(octets);
            self.prefilter(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4));
        }
        let name = if key.proto == IPPROTO_TCP {
            map_names::CT_TCP
        } else {
            map_names::CT_OTHER
        };
        self.hash::<CtKey, CtValue>(name)
            .insert(key, value, 0)
            .expect("insert ct");
    }

    /// Every conntrack entry, TCP's then the others'.
    pub fn ct(&mut self) -> Vec<(CtKey, CtValue)> {
        let mut all = Vec::new();
        for name in [map_names::CT_TCP, map_names::CT_OTHER] {
            all.extend(
                self.hash::<CtKey, CtValue>(name)
                    .iter()
                    .map(|r| r.expect("read ct")),
            );
        }
        all
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Vec<u64> {
        let map = self.ebpf.map(map_names::STATS).expect("stats map");
        let stats = PerCpuArray::<_, u64>::try_from(map).expect("stats is a per-cpu array");
        (0..stat::COUNT)
            .map(|i| stats.get(&i, 0).expect("read stat").iter().sum())
            .collect()
    }

    /// Monotonic now, as bpf_ktime_get_ns reads it.
    pub fn now_ns() -> u64 {
        lb_agent::datapath::monotonic_ns()
    }

    /// In-kernel time per run of a program on `frame`, repeated `repeat` times
    /// (BPF_PROG_TEST_RUN's own measure), in nanoseconds.
    pub fn time(&mut self, program: &str, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        };
        let prog = self
            .ebpf
            .program_mut(program)
            .unwrap_or_else(|| panic!("program {program}"));
        let result = match prog {
            aya::programs::Program::SchedClassifier(p) => {
                if p.fd().is_err() {
                    p.load().expect("load");
                }
                p.test_run(opts)
            }
            aya::programs::Program::Xdp(p) => {
                if p.fd().is_err() {
                    p.load().expect("load");
                }
                p.test_run(opts)
            }
            _ => panic!("{program} is neither tc nor XDP"),
        }
        .unwrap_or_else(|e| panic!("test run {program}: {e}"));
        result.duration.as_nanos() as f64
    }

    pub fn run(&self, prog: Prog, frame: &[u8]) -> (Verdict, Vec<u8>) {
        self.try_run(prog, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {prog:?}: {e}"))
    }

    /// Like `run`, but a frame the kernel refuses to test (EINVAL for an skb
    /// too short for its headers) is an Err, not a panic.
    pub fn try_run(&self, prog: Prog, frame: &[u8]) -> Result<(Verdict, Vec<u8>), String> {
        self.try_run_marked(prog, frame, 0)
    }

    /// Run a tc program on `frame` with `skb->mark` = `mark`, as a packet an
    /// earlier program on the node marked.
    pub fn run_marked(&self, prog: Prog, frame: &[u8], mark: u32) -> (Verdict, Vec<u8>) {
        self.try_run_marked(prog, frame, mark)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {prog:?}: {e}"))
    }

    /// The mark the last tc run left on its packet.
    pub fn last_mark(&self) -> u32 {
        self.last_mark.get()
    }

    fn try_run_marked(
        &self,
        prog: Prog,
        frame: &[u8],
        mark: u32,
    ) -> Result<(Verdict, Vec<u8>), String> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_in = [0u8; SKB_CTX];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX];
        let tc = prog.is_tc();
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: tc.then_some(&ctx_in[..]),
            ctx_out: tc.then_some(&mut ctx_out[..]),
            ..TestRunOptions::default()
        };
        let name = prog.program_name();
        let result = match prog.is_tc() {
            true => {
                let p: &SchedClassifier = self
                    .ebpf
                    .program(name)
                    .expect("tc program")
                    .try_into()
                    .expect("classifier");
                p.test_run(opts)
            }
            false => {
                let p: &Xdp = self
                    .ebpf
                    .program(name)
                    .expect("xdp program")
                    .try_into()
                    .expect("xdp");
                p.test_run(opts)
            }
        }
        .map_err(|e| e.to_string())?;
        out.truncate(result.data_size_out as usize);
        // XDP leaves no mark (it has none to set).
        let mark = if tc {
            u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().unwrap())
        } else {
            0
        };
        self.last_mark.set(mark);
        Ok((prog.verdict(result.return_value), out))
    }
}

/// Which backend a translated frame must reach.
pub enum Target {
    Exact(Ep),
    OneOf(Vec<Ep>),
    /// The backend chosen at an earlier step (by index).
    SameAs(usize),
}

pub enum Expect {
    /// Passed byte-identical.
    Unchanged,
    /// Dropped.
    Dropped,
    /// Passed with the destination rewritten to a backend.
    Dnat(Target),
    /// Passed with the source rewritten to this frontend.
    RevNat(Ep),
    /// Passed with both ends rewritten (hairpin).
    Nat { src: Ep, dst: Ep },
    /// Passed with the destination rewritten to `dst` and the source to
    /// `src_addr` with a port in `ports` (SNAT port allocation).
    Snat {
        src_addr: IpAddr,
        ports: (u16, u16),
        dst: Ep,
    },
    /// Bounced as an RST with these sequence numbers (ack None: no ACK flag).
    TcpRst { seq: u32, ack: Option<u32> },
    /// Bounced as ICMP port unreachable quoting the input.
    IcmpPortUnreachable,
    /// Bounced as the ICMP echo reply to the input's request.
    EchoReply,
    /// Passed as exactly this frame (checksums included: build it with
    /// the harness's own builders).
    Frame(Vec<u8>),
}

pub enum Step {
    Send {
        frame: Vec<u8>,
        expect: Expect,
    },
    /// A frame through another program than the case's (the same maps):
    /// a flow's forward packet on the pod program, its reply on the one
    /// under test.
    SendOn {
        prog: Prog,
        frame: Vec<u8>,
        expect: Expect,
    },
    /// A frame through the case's program carrying the mark the previous
    /// step's tc program left (a packet going on through the node).
    SendMarked {
        frame: Vec<u8>,
        expect: Expect,
    },
    /// `SendOn` carrying the mark the previous step left (none after XDP):
    /// the packet the case's program translated, now leaving the node.
    SendOnMarked {
        prog: Prog,
        frame: Vec<u8>,
        expect: Expect,
    },
    Change(Box<dyn Fn(&mut Datapath)>),
    /// Counters (by `stat` index) that must have these totals now.
    Stats(Vec<(u32, u64)>),
    /// The monitor events written since the last such step, exactly.
    Events(Vec<Event>),
}

/// A monitor event as a case expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `event_kind`.
    pub kind: u8,
    /// `event_reason`.
    pub reason: u8,
    pub rev_nat_id: u32,
    /// The packet's ends as it arrived.
    pub src: Ep,
    pub dst: Ep,
    pub backend: Option<Ep>,
    /// `SCOPE_INTERNAL` or `SCOPE_EXTERNAL`.
    pub scope: u8,
}

impl Event {
    fn of(e: &MonitorEvent) -> Event {
        let at = |a: lb_common::Addr, port_be: u16| Ep {
            addr: a.ip(),
            port: u16::from_be(port_be),
        };
        Event {
            kind: e.kind,
            reason: e.reason,
            rev_nat_id: e.rev_nat_id,
            src: at(e.src_be, e.sport_be),
            dst: at(e.dst_be, e.dport_be),
            backend: (!e.backend_be.is_none()).then(|| at(e.backend_be, e.backend_port_be)),
            scope: e.scope,
        }
    }
}

/// The monitor events written since the last such step, exactly.
pub fn events(want: Vec<Event>) -> Step {
    Step::Events(want)
}

pub fn send(frame: Vec<u8>, expect: Expect) -> Step {
    Step::Send { frame, expect }
}

pub fn send_on_marked(prog: Prog, frame: Vec<u8>, expect: Expect) -> Step {
    Step::SendOnMarked {
        prog,
        frame,
        expect,
    }
}

pub fn send_on(prog: Prog, frame: Vec<u8>, expect: Expect) -> Step {
    Step::SendOn {
        prog,
        frame,
        expect,
    }
}

pub fn change(f: impl Fn(&mut Datapath) + 'static) -> Step {
    Step::Change(Box::new(f))
}

/// Counters (by `stat` index) that must have these totals now.
pub fn counters(want: &[(u32, u64)]) -> Step {
    Step::Stats(want.to_vec())
}

pub struct Case {
    pub name: &'static str,
    pub programs: &'static [Prog],
    pub setup: Box<dyn Fn(&mut Datapath)>,
    pub steps: Vec<Step>,
    /// `stat` counters of impossible states this case provokes on purpose.
    pub allowed_errors: &'static [u32],
}

impl Case {
    /// A case on `programs` that provokes no impossible state.
    pub fn on(
        programs: &'static [Prog],
        name: &'static str,
        setup: impl Fn(&mut Datapath) + 'static,
        steps: Vec<Step>,
    ) -> Case {
        Case {
            name,
            programs,
            setup: Box::new(setup),
            steps,
            allowed_errors: &[],
        }
    }
}

const IMPOSSIBLE: &[u32] = &[
    stat::ERR_SLOT_MISSING,
    stat::ERR_BACKEND_MISSING,
    stat::ERR_CT_FULL,
    stat::ERR_REJECT_FAILED,
    stat::ERR_NAT_FAILED,
];

/// Run a case on each of its programs with fresh maps; panics naming the
/// case, program and step on the first mismatch.
pub fn run_case(case: Case) {
    // Only the programs the case runs are loaded: verifying each takes time.
    let mut used: Vec<Prog> = case.programs.to_vec();
    for step in &case.steps {
        if let Step::SendOn { prog, .. } | Step::SendOnMarked { prog, .. } = step
            && !used.contains(prog)
        {
            used.push(*prog);
        }
    }
    for &prog in case.programs {
        let mut dp = Datapath::fresh_for(&used);
        (case.setup)(&mut dp);
        let mut chosen: Vec<Option<Ep>> = Vec::new();
        for (i, step) in case.steps.iter().enumerate() {
            let ctx = format!("case {} [{prog:?}] step {i}", case.name);
            match step {
                Step::Send { frame, expect } => {
                    let (verdict, out) = dp.run(prog, frame);
                    chosen.push(check(&ctx, frame, verdict, &out, expect, &chosen));
                }
                Step::SendMarked { frame, expect } => {
                    let mark = dp.last_mark();
                    let ctx = format!("{ctx} (mark {mark:#x})");
                    let (verdict, out) = dp.run_marked(prog, frame, mark);
                    chosen.push(check(&ctx, frame, verdict, &out, expect, &chosen));
                }
                Step::SendOnMarked {
                    prog: other,
                    frame,
                    expect,
                } => {
                    let mark = dp.last_mark();
                    let ctx = format!("{ctx} (on {other:?}, mark {mark:#x})");
                    let (verdict, out) = dp.run_marked(*other, frame, mark);
                    chosen.push(check(&ctx, frame, verdict, &out, expect, &chosen));
                }
                Step::SendOn {
                    prog: other,
                    frame,
                    expect,
                } => {
                    let ctx = format!("{ctx} (on {other:?})");
                    let (verdict, out) = dp.run(*other, frame);
                    chosen.push(check(&ctx, frame, verdict, &out, expect, &chosen));
                }
                Step::Change(f) => {
                    f(&mut dp);
                    chosen.push(None);
                }
                Step::Stats(want) => {
                    let got = dp.stats();
                    for (idx, n) in want {
                        assert_eq!(
                            got[*idx as usize],
                            *n,
                            "{ctx}: counter {} is {} (all: {got:?})",
                            stat::NAMES[*idx as usize],
                            got[*idx as usize]
                        );
                    }
                    chosen.push(None);
                }
                Step::Events(want) => {
                    let got: Vec<Event> = dp.events().iter().map(Event::of).collect();
                    assert_eq!(&got, want, "{ctx}: monitor events");
                    chosen.push(None);
                }
            }
        }
        let got = dp.stats();
        for idx in IMPOSSIBLE {
            if !case.allowed_errors.contains(idx) {
                assert_eq!(
                    got[*idx as usize],
                    0,
                    "case {} [{prog:?}]: impossible-state counter {} moved",
                    case.name,
                    stat::NAMES[*idx as usize]
                );
            }
        }
        println!(
            "case {} [{prog:?}]: {} steps ok",
            case.name,
            case.steps.len()
        );
        dp.recycle(&used);
    }
}

/// Parsed view of an IPv4 or IPv6 TCP/UDP/ICMP frame for comparisons.
struct View<'a> {
    frame: &'a [u8],
    /// IP header length (IPv4 with options; 40 for IPv6).
    ihl: usize,
    v6: bool,
}

impl<'a> View<'a> {
    fn new(ctx: &str, frame: &'a [u8]) -> Self {
        assert!(
            frame.len() >= 34,
            "{ctx}: frame too short ({} bytes)",
            frame.len()
        );
        match frame[12..14] {
            [0x08, 0x00] => {
                let ihl = (frame[14] & 0x0f) as usize * 4;
                View {
                    frame,
                    ihl,
                    v6: false,
                }
            }
            [0x86, 0xdd] => {
                assert!(frame.len() >= 54, "{ctx}: IPv6 frame too short");
                View {
                    frame,
                    ihl: 40,
                    v6: true,
                }
            }
            _ => panic!("{ctx}: neither IPv4 nor IPv6"),
        }
    }
    fn ip(&self) -> &'a [u8] {
        &self.frame[14..14 + self.ihl]
    }
    fn l4(&self) -> &'a [u8] {
        let end = if self.v6 {
            54 + u16::from_be_bytes([self.frame[18], self.frame[19]]) as usize
        } else {
            14 + u16::from_be_bytes([self.frame[16], self.frame[17]]) as usize
        };
        &self.frame[14 + self.ihl..end]
    }
    fn proto(&self) -> u8 {
        if self.v6 {
            self.frame[20]
        } else {
            self.frame[23]
        }
    }
    fn addr(&self, at: usize) -> IpAddr {
        if self.v6 {
            let o: [u8; 16] = self.frame[at..at + 16].try_into().unwrap();
            IpAddr::from(o)
        } else {
            let o: [u8; 4] = self.frame[at..at + 4].try_into().unwrap();
            IpAddr::from(o)
        }
    }
    fn src_addr(&self) -> IpAddr {
        self.addr(if self.v6 { 22 } else { 26 })
    }
    fn dst_addr(&self) -> IpAddr {
        self.addr(if self.v6 { 38 } else { 30 })
    }
    fn src(&self) -> Ep {
        let l4 = self.l4();
        Ep {
            addr: self.src_addr(),
            port: u16::from_be_bytes([l4[0], l4[1]]),
        }
    }
    fn dst(&self) -> Ep {
        let l4 = self.l4();
        Ep {
            addr: self.dst_addr(),
            port: u16::from_be_bytes([l4[2], l4[3]]),
        }
    }
    /// Verify the IPv4 header and L4 checksums (IPv6: L4 with its pseudo
    /// header, ICMPv6 included) from scratch.
    fn assert_checksums(&self, ctx: &str) {
        let l4 = self.l4();
        let pseudo = if self.v6 {
            sum16(&self.frame[22..54]) + self.proto() as u32 + l4.len() as u32
        } else {
            assert_eq!(
                fold(sum16(self.ip())),
                0xffff,
                "{ctx}: bad IPv4 header checksum"
            );
            if u16::from_be_bytes([self.frame[20], self.frame[21]]) & 0x3fff != 0 {
                // A fragment: its L4 checksum covers the whole datagram.
                return;
            }
            sum16(&self.frame[26..34]) + self.proto() as u32 + l4.len() as u32
        };
        match self.proto() {
            IPPROTO_TCP => {
                assert_eq!(fold(pseudo + sum16(l4)), 0xffff, "{ctx}: bad TCP checksum");
            }
            IPPROTO_UDP => {
                if l4[6..8] != [0, 0] {
                    assert_eq!(fold(pseudo + sum16(l4)), 0xffff, "{ctx}: bad UDP checksum");
                }
            }
            132 => assert_eq!(
                sctp_crc32c(l4),
                u32::from_le_bytes([l4[8], l4[9], l4[10], l4[11]]),
                "{ctx}: bad SCTP CRC32c"
            ),
            1 => assert_eq!(fold(sum16(l4)), 0xffff, "{ctx}: bad ICMP checksum"),
            58 => assert_eq!(
                fold(pseudo + sum16(l4)),
                0xffff,
                "{ctx}: bad ICMPv6 checksum"
            ),
            p => panic!("{ctx}: unexpected protocol {p}"),
        }
    }
}

fn expect_verdict(ctx: &str, got: Verdict, want: Verdict) {
    assert_eq!(got, want, "{ctx}: verdict");
}

/// Compare a translated frame to its input: only `src`/`dst`, their
/// checksums and nothing else may differ.
fn assert_translated(ctx: &str, input: &[u8], out: &[u8], src: Ep, dst: Ep) {
    assert_eq!(out.len(), input.len(), "{ctx}: length changed");
    let (i, o) = (View::new(ctx, input), View::new(ctx, out));
    assert_eq!(&out[..14], &input[..14], "{ctx}: Ethernet header changed");
    assert_eq!(o.src(), src, "{ctx}: source");
    assert_eq!(o.dst(), dst, "{ctx}: destination");
    if i.v6 {
        // IPv6 header: all but the addresses (8..40) unchanged.
        assert_eq!(
            &o.ip()[..8],
            &i.ip()[..8],
            "{ctx}: IPv6 header fields changed"
        );
    } else {
        // IP header: all but checksum (10..12) and addresses (12..20) unchanged.
        assert_eq!(
            &o.ip()[..10],
            &i.ip()[..10],
            "{ctx}: IPv4 header fields changed"
        );
        assert_eq!(&o.ip()[20..], &i.ip()[20..], "{ctx}: IPv4 options changed");
    }
    let (il4, ol4) = (i.l4(), o.l4());
    match i.proto() {
        IPPROTO_TCP => {
            assert_eq!(
                &ol4[4..16],
                &il4[4..16],
                "{ctx}: TCP seq/ack/flags/window changed"
            );
            assert_eq!(
                &ol4[18..],
                &il4[18..],
                "{ctx}: TCP options or payload changed"
            );
        }
        132 => {
            assert_eq!(
                &ol4[4..8],
                &il4[4..8],
                "{ctx}: SCTP verification tag changed"
            );
            assert_eq!(&ol4[12..], &il4[12..], "{ctx}: SCTP chunks changed");
        }
        _ => {
            assert_eq!(&ol4[4..6], &il4[4..6], "{ctx}: UDP length changed");
            if il4[6..8] == [0, 0] {
                assert_eq!(
                    &ol4[6..8],
                    &[0, 0],
                    "{ctx}: zero UDP checksum must stay zero"
                );
            }
            assert_eq!(&ol4[8..], &il4[8..], "{ctx}: UDP payload changed");
        }
    }
    o.assert_checksums(ctx);
}

fn check(
    ctx: &str,
    input: &[u8],
    verdict: Verdict,
    out: &[u8],
    expect: &Expect,
    chosen: &[Option<Ep>],
) -> Option<Ep> {
    match expect {
        Expect::Unchanged => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            assert_eq!(out, input, "{ctx}: frame must pass byte-identical");
            None
        }
        Expect::Dropped => {
            expect_verdict(ctx, verdict, Verdict::Drop);
            None
        }
        Expect::Frame(want) => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            if out != want.as_slice() {
                let diff: Vec<usize> = (0..out.len().max(want.len()))
                    .filter(|i| out.get(*i) != want.get(*i))
                    .collect();
                panic!(
                    "{ctx}: frame differs at bytes {diff:?}\n got  {out:02x?}\n want {want:02x?}"
                );
            }
            verify_checksums(out).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            None
        }
        Expect::Dnat(target) => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            let i = View::new(ctx, input);
            let dst = View::new(ctx, out).dst();
            match target {
                Target::Exact(want) => assert_eq!(dst, *want, "{ctx}: backend"),
                Target::OneOf(set) => assert!(set.contains(&dst), "{ctx}: {dst:?} not in {set:?}"),
                Target::SameAs(step) => {
                    let want = chosen[*step].expect("referenced step chose no backend");
                    assert_eq!(dst, want, "{ctx}: flow moved off its backend");
                }
            }
            assert_translated(ctx, input, out, i.src(), dst);
            Some(dst)
        }
        Expect::RevNat(frontend) => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            let i = View::new(ctx, input);
            assert_translated(ctx, input, out, *frontend, i.dst());
            None
        }
        Expect::Nat { src, dst } => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            assert_translated(ctx, input, out, *src, *dst);
            None
        }
        Expect::Snat {
            src_addr,
            ports,
            dst,
        } => {
            expect_verdict(ctx, verdict, Verdict::Pass);
            let src = View::new(ctx, out).src();
            assert_eq!(src.addr, *src_addr, "{ctx}: SNAT address");
            assert!(
                (ports.0..=ports.1).contains(&src.port),
                "{ctx}: SNAT port {} outside {ports:?}",
                src.port
            );
            assert_translated(ctx, input, out, src, *dst);
            Some(src)
        }
        Expect::TcpRst { seq, ack } => {
            expect_verdict(ctx, verdict, Verdict::Bounce);
            let (i, o) = (View::new(ctx, input), View::new(ctx, out));
            let want_len = if i.v6 { 74 } else { 54 };
            assert_eq!(out.len(), want_len, "{ctx}: RST frame length");
            assert_eq!(
                &out[..6],
                &input[6..12],
                "{ctx}: RST goes back to the sender's MAC"
            );
            assert_eq!(
                &out[6..12],
                &input[..6],
                "{ctx}: RST comes from the receiving MAC"
            );
            assert_eq!(o.proto(), IPPROTO_TCP, "{ctx}: RST protocol");
            assert_eq!((o.src(), o.dst()), (i.dst(), i.src()), "{ctx}: RST tuple");
            let l4 = o.l4();
            assert_eq!(
                u32::from_be_bytes(l4[4..8].try_into().unwrap()),
                *seq,
                "{ctx}: RST seq"
            );
            let flags = l4[13];
            assert_eq!(flags & 0x04, 0x04, "{ctx}: RST flag");
            match ack {
                Some(a) => {
                    assert_eq!(flags, 0x14, "{ctx}: RST|ACK flags");
                    let got = u32::from_be_bytes(l4[8..12].try_into().unwrap());
                    assert_eq!(got, *a, "{ctx}: RST ack");
                }
                None => assert_eq!(flags, 0x04, "{ctx}: RST without ACK"),
            }
            o.assert_checksums(ctx);
            None
        }
        Expect::EchoReply => {
            expect_verdict(ctx, verdict, Verdict::Bounce);
            assert_eq!(out.len(), input.len(), "{ctx}: echo reply length");
            assert_eq!(&out[..6], &input[6..12], "{ctx}: reply to the sender's MAC");
            assert_eq!(
                &out[6..12],
                &input[..6],
                "{ctx}: reply from the receiving MAC"
            );
            let (i, o) = (View::new(ctx, input), View::new(ctx, out));
            let (proto, reply_type) = if i.v6 { (58, 129) } else { (1, 0) };
            assert_eq!(o.proto(), proto, "{ctx}: protocol ICMP");
            assert_eq!(o.src_addr(), i.dst_addr(), "{ctx}: from the pinged address");
            assert_eq!(o.dst_addr(), i.src_addr(), "{ctx}: to the pinger");
            assert_eq!(
                (o.l4()[0], o.l4()[1]),
                (reply_type, 0),
                "{ctx}: echo reply type, code 0"
            );
            assert_eq!(
                &o.l4()[4..],
                &i.l4()[4..],
                "{ctx}: identifier, sequence and data echoed"
            );
            o.assert_checksums(ctx);
            None
        }
        Expect::IcmpPortUnreachable => {
            expect_verdict(ctx, verdict, Verdict::Bounce);
            let (i, o) = (View::new(ctx, input), View::new(ctx, out));
            assert_eq!(
                &out[..6],
                &input[6..12],
                "{ctx}: ICMP goes back to the sender's MAC"
            );
            let (proto, kind, code) = if i.v6 { (58, 1, 4) } else { (1, 3, 3) };
            assert_eq!(o.proto(), proto, "{ctx}: protocol ICMP");
            assert_eq!(
                o.src_addr(),
                i.dst_addr(),
                "{ctx}: ICMP from the frontend address"
            );
            assert_eq!(o.dst_addr(), i.src_addr(), "{ctx}: ICMP to the client");
            let l4 = o.l4();
            assert_eq!(
                (l4[0], l4[1]),
                (kind, code),
                "{ctx}: port unreachable type and code"
            );
            let quote = &input[14..14 + i.ihl + 8];
            assert_eq!(&l4[8..], quote, "{ctx}: ICMP quotes IP header + 8 bytes");
            o.assert_checksums(ctx);
            None
        }
    }
}
