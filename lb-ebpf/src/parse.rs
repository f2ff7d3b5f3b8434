//! Header parsing. Anything we cannot fully account for is reported with the
//! stat that explains why it is passed untouched.

use core::mem::MaybeUninit;

use lb_common::{
    Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, dsr, stat,
};

use crate::{
    maps::{FragKey, LB_FRAGS, count},
    packet::Packet,
};

pub const ETH_HLEN: u32 = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets inside the IPv4 header (from the start of the IP header).
pub const IP_TTL_OFF: u32 = 8;
pub const IP_CSUM_OFF: u32 = 10;
pub const IP_SRC_OFF: u32 = 12;
pub const IP_DST_OFF: u32 = 16;
/// Offsets inside the IPv6 header (from the start of the IP header).
pub const IP6_HOP_LIMIT_OFF: u32 = 7;
pub const IP6_SRC_OFF: u32 = 8;
pub const IP6_DST_OFF: u32 = 24;
pub const IP6_HLEN: u32 = 40;
/// IPv6 next header: a fragment header.
const IPPROTO_FRAGMENT: u8 = 44;
/// Offsets inside the L4 header.
pub const L4_SPORT: u32 = 0;
pub const L4_DPORT: u32 = 2;
pub const TCP_CSUM: u32 = 16;
pub const UDP_CSUM: u32 = 6;
/// SCTP's CRC32c: after the ports and the verification tag.
pub const SCTP_CSUM: u32 = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src_be: u32,
    pub dst_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc_flow_be: u32,
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
}

/// A TCP or UDP packet over IPv4 or IPv6, with what translation needs to know.
#[derive(Clone, Copy, Default)]
pub struct Flow {
    pub src_be: Addr,
    pub dst_be: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flag byte (0 for UDP).
    pub tcp_flags: u8,
    /// Start of the IP header (0 on L3 devices, else after Ethernet).
    pub l3_off: u32,
    /// Start of the L4 header.
    pub l4_off: u32,
    /// IP header length in bytes (IPv4 with options; 40 for IPv6).
    pub ihl_bytes: u32,
    /// L4 header length in bytes (TCP data offset, 8 for UDP).
    pub l4_hdr_bytes: u32,
    /// End of the IP datagram (l3_off + total length), before any padding.
    pub ip_end: u32,
    pub v6: bool,
    /// `FRAG_NONE`, `FRAG_FIRST` (ports here, the rest of the datagram
    /// follows) or `FRAG_LATER` (no L4 header: the ports are the first
    /// fragment's, from `LB_FRAGS`; only addresses may be rewritten).
    pub frag: u8,
}

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// An ICMP echo request (ping) over IPv4, or ICMPv6 echo request.
#[derive(Clone, Copy, Default)]
pub struct Echo {
    pub src_be: Addr,
    pub dst_be: Addr,
    pub l3_off: u32,
    /// Start of the ICMP header.
    pub l4_off: u32,
    pub v6: bool,
}

pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

pub enum Parsed {
    Flow(Flow),
    Echo(Echo),
    /// An ICMP / ICMPv6 error: the outer addresses, `l3_off`, `l4_off` (the
    /// ICMP header), `ip_end`, `proto` and `v6` set; the quoted packet is
    /// parsed by its translation (`icmp_error.rs`).
    IcmpError(Flow),
    /// A later fragment whose first fragment was not seen: addresses,
    /// `proto`, `v6` and `frag` set.
    LaterUnknown(Flow),
    /// Not ours to touch; the stat says why.
    Pass(u32),
}

/// The first 14 bytes of a TCP header: ports through the flag byte.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports: Ports,
    _seq_ack: [u8; 8],
    doff: u8,
    flags: u8,
}

/// A UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHdr {
    ports: Ports,
    len_be: u16,
    _csum: u16,
}

/// The IPv6 Fragment header (RFC 8200 4.5).
#[repr(C)]
#[derive(Clone, Copy)]
struct FragHdr6 {
    next_header: u8,
    _reserved: u8,
    /// Offset in 8-byte units (13 bits), 2 reserved bits, M (more).
    offset_flags_be: u16,
    id_be: u32,
}

const FRAG_HLEN6: u32 = 8;

const _: () = {
    assert!(size_of::<FragHdr6>() == 8);
    assert!(size_of::<Ipv4Hdr>() == 20);
    assert!(size_of::<Ipv6Hdr>() == 40);
    assert!(size_of::<TcpHead>() == 14);
    assert!(size_of::<UdpHdr>() == 8);
};

/// `parse_into`'s answers besides a stat index (which are small).
pub const FLOW: u32 = u32::MAX;
pub const ECHO: u32 = u32::MAX - 1;
pub const ICMP_ERROR: u32 = u32::MAX - 2;
pub const FRAG_UNKNOWN: u32 = u32::MAX - 3;

/// Parse into `flow` (returns FLOW, ICMP_ERROR or FRAG_UNKNOWN), or an
/// echo request into `flow`'s addresses, `l3_off`, `l4_off` and `v6` (the
/// rest zero; returns ECHO), or return the stat that says why the packet is
/// passed, leaving `flow` as it was: every answer but a stat (those are
/// below FRAG_UNKNOWN) writes all of `flow`. Its own BPF function, so the
/// headers it reads do not sit in its caller's stack frame.
#[inline(never)]
pub fn parse_into<P: Packet>(pkt: &P, flow: &mut MaybeUninit<Flow>) -> u32 {
    match parse(pkt) {
        Parsed::Flow(f) => {
            flow.write(f);
            FLOW
        }
        Parsed::Echo(e) => {
            flow.write(Flow {
                src_be: e.src_be,
                dst_be: e.dst_be,
                l3_off: e.l3_off,
                l4_off: e.l4_off,
                v6: e.v6,
                ..Flow::default()
            });
            ECHO
        }
        Parsed::IcmpError(f) => {
            flow.write(f);
            ICMP_ERROR
        }
        Parsed::LaterUnknown(f) => {
            flow.write(f);
            FRAG_UNKNOWN
        }
        Parsed::Pass(reason) => reason,
    }
}

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    let l3 = pkt.l3_off();
    let Ok(proto_be) = pkt.l3_proto_be() else {
        return Parsed::Pass(stat::MALFORMED);
    };
    let ethertype = u16::from_be(proto_be);
    if ethertype == ETH_P_IPV6 {
        return parse6(pkt, l3);
    }
    if ethertype != ETH_P_IP {
        return Parsed::Pass(stat::PASS_NOT_IP);
    }
    let Ok(ip) = pkt.load_header::<Ipv4Hdr>(l3) else {
        // Too short for an IPv4 header.
        return Parsed::Pass(stat::MALFORMED);
    };
    let ihl_bytes = ((ip.version_ihl & 0x0f) as u32) * 4;
    let tot_len = u16::from_be(ip.tot_len_be) as u32;
    if ip.version_ihl >> 4 != 4 || ihl_bytes < 20 || tot_len < ihl_bytes {
        return Parsed::Pass(stat::MALFORMED);
    }
    let ip_end = l3 + tot_len;
    if ip_end > pkt.len() {
        return Parsed::Pass(stat::MALFORMED);
    }
    // MF set or a non-zero offset: a fragment.
    let frag_bits = u16::from_be(ip.frag_be);
    let frag = match (frag_bits & 0x1fff, frag_bits & 0x2000) {
        (0, 0) => FRAG_NONE,
        (0, _) => FRAG_FIRST,
        _ => FRAG_LATER,
    };
    let l4_off = l3 + ihl_bytes;
    let ip = Ends {
        src: Addr::v4(ip.src_be),
        dst: Addr::v4(ip.dst_be),
        proto: ip.proto,
        l3_off: l3,
        ihl_bytes,
        ip_end,
        v6: false,
        frag,
        frag_id_be: ip.id_be as u32,
    };
    if ip.proto == IPPROTO_ICMP {
        if frag != FRAG_NONE {
            return Parsed::Pass(stat::PASS_OTHER_PROTO);
        }
        return echo(pkt, &ip, l4_off, ICMP_ECHO_REQUEST);
    }
    transport(pkt, &ip, l4_off)
}

/// What the IP layer says, for the transport parse shared by both families.
struct Ends {
    src: Addr,
    dst: Addr,
    proto: u8,
    l3_off: u32,
    ihl_bytes: u32,
    ip_end: u32,
    v6: bool,
    /// `FRAG_*`, and the datagram's identification (IPv4's 16 bits, or the
    /// IPv6 Fragment header's 32) when a fragment.
    frag: u8,
    frag_id_be: u32,
}

/// IPv6: the fixed header, then TCP, UDP or an ICMPv6 echo request right
/// after it. Extension headers (and fragments) are passed untouched.
#[inline(always)]
fn parse6<P: Packet>(pkt: &P, l3: u32) -> Parsed {
    let Ok(ip) = pkt.load_header::<Ipv6Hdr>(l3) else {
        return Parsed::Pass(stat::MALFORMED);
    };
    if u32::from_be(ip.vtc_flow_be) >> 28 != 6 {
        return Parsed::Pass(stat::MALFORMED);
    }
    let ip_end = l3 + IP6_HLEN + u16::from_be(ip.payload_len_be) as u32;
    if ip_end > pkt.len() {
        return Parsed::Pass(stat::MALFORMED);
    }
    // IPv4-mapped addresses never appear on the IPv6 wire (RFC 4291
    // 2.5.5.2); in our maps they are IPv4 entries, not this packet's.
    if ip.src.is_v4() || ip.dst.is_v4() {
        return Parsed::Pass(stat::MALFORMED);
    }
    let mut ends = Ends {
        src: ip.src,
        dst: ip.dst,
        proto: ip.next_header,
        l3_off: l3,
        ihl_bytes: IP6_HLEN,
        ip_end,
        v6: true,
        frag: FRAG_NONE,
        frag_id_be: 0,
    };
    let mut l4_off = l3 + IP6_HLEN;
    if ip.next_header == IPPROTO_FRAGMENT {
        // A Fragment header right after the fixed header (RFC 8200 4.5);
        // the upper-layer header, in the first fragment, after it.
        let Ok(fh) = pkt.load_header::<FragHdr6>(l4_off) else {
            return Parsed::Pass(stat::MALFORMED);
        };
        let offset_flags = u16::from_be(fh.offset_flags_be);
        ends.frag = if offset_flags & 0xfff8 != 0 {
            FRAG_LATER
        } else if offset_flags & 1 != 0 {
            FRAG_FIRST
        } else {
            // An atomic fragment (offset 0, no more): a whole datagram.
            FRAG_NONE
        };
        ends.frag_id_be = fh.id_be;
        ends.proto = fh.next_header;
        ends.ihl_bytes = IP6_HLEN + FRAG_HLEN6;
        l4_off += FRAG_HLEN6;
    } else if ip.next_header == dsr::IPPROTO_DSTOPTS {
        // lb's DSR header from another node (`dsr.rs`), right after the
        // fixed header; other Destination Options headers pass as before.
        let Ok([next, len, opt_type, opt_len]) = pkt.load_header::<[u8; 4]>(l4_off) else {
            return Parsed::Pass(stat::MALFORMED);
        };
        if len as u32 == dsr::OPT6_HDR_LEN / 8 - 1
            && opt_type == dsr::OPT6_TYPE
            && opt_len == dsr::OPT6_DATA_LEN
        {
            ends.proto = next;
            ends.ihl_bytes = IP6_HLEN + dsr::OPT6_HDR_LEN;
            l4_off += dsr::OPT6_HDR_LEN;
        }
    }
    match ends.proto {
        IPPROTO_ICMPV6 if ends.frag == FRAG_NONE && ends.ihl_bytes == IP6_HLEN => {
            echo(pkt, &ends, l4_off, ICMPV6_ECHO_REQUEST)
        }
        IPPROTO_ICMPV6 => Parsed::Pass(stat::PASS_OTHER_PROTO),
        _ => transport(pkt, &ends, l4_off),
    }
}

/// ICMPv4 errors netfilter relates to a connection (destination
/// unreachable: port unreachable, fragmentation needed ...; time exceeded;
/// parameter problem), and the ICMPv6 ones (RFC 4443: destination
/// unreachable, packet too big, time exceeded, parameter problem).
#[inline(always)]
fn is_icmp_error(kind: u8, v6: bool) -> bool {
    if v6 {
        matches!(kind, 1..=4)
    } else {
        matches!(kind, 3 | 11 | 12)
    }
}

/// An echo request (`request` is the family's type) is ours to answer for
/// Service addresses, an error may concern a translated flow; any other
/// ICMP passes.
#[inline(always)]
fn echo<P: Packet>(pkt: &P, ip: &Ends, l4_off: u32, request: u8) -> Parsed {
    if l4_off + 8 > ip.ip_end {
        return Parsed::Pass(stat::PASS_OTHER_PROTO);
    }
    match pkt.load::<[u8; 2]>(l4_off) {
        Ok([kind, 0]) if kind == request => Parsed::Echo(Echo {
            src_be: ip.src,
            dst_be: ip.dst,
            l3_off: ip.l3_off,
            l4_off,
            v6: ip.v6,
        }),
        Ok([kind, _]) if is_icmp_error(kind, ip.v6) => Parsed::IcmpError(Flow {
            src_be: ip.src,
            dst_be: ip.dst,
            proto: ip.proto,
            l3_off: ip.l3_off,
            l4_off,
            ihl_bytes: ip.ihl_bytes,
            ip_end: ip.ip_end,
            v6: ip.v6,
            ..Flow::default()
        }),
        _ => Parsed::Pass(stat::PASS_OTHER_PROTO),
    }
}

/// TCP, UDP or SCTP at `l4_off`, checked against the datagram's end.
#[inline(always)]
fn transport<P: Packet>(pkt: &P, ip: &Ends, l4_off: u32) -> Parsed {
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP && ip.proto != IPPROTO_SCTP {
        return Parsed::Pass(stat::PASS_OTHER_PROTO);
    }
    if ip.frag == FRAG_LATER {
        return later_fragment(ip, l4_off);
    }
    let ip_end = ip.ip_end;
    let mut tcp_flags = 0u8;
    let mut l4_hdr_bytes = 8;
    let ports = match ip.proto {
        IPPROTO_TCP => {
            if l4_off + 20 > ip_end {
                if ip.frag == FRAG_FIRST {
                    // A first fragment too short for the TCP header: no
                    // translation for its datagram, like a later fragment
                    // whose first was not seen (dropped if to a Service).
                    return Parsed::LaterUnknown(flow_of(ip, l4_off, Ports::default(), 0, 0));
                }
                return Parsed::Pass(stat::MALFORMED);
            }
            let Ok(tcp) = pkt.load_header::<TcpHead>(l4_off) else {
                return Parsed::Pass(stat::MALFORMED);
            };
            let ports = { tcp.ports };
            let doff = ((tcp.doff >> 4) as u32) * 4;
            if doff < 20 || l4_off + doff > ip_end {
                return Parsed::Pass(stat::MALFORMED);
            }
            tcp_flags = tcp.flags;
            l4_hdr_bytes = doff;
            ports
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            // Both start with the ports; SCTP's common header is 12 bytes
            // (ports, verification tag, CRC32c). A port rewrite fixes the
            // CRC from the packet's length, which a fragment does not give:
            // fragmented SCTP is not translated.
            let Ok(udp) = pkt.load_header::<UdpHdr>(l4_off) else {
                return Parsed::Pass(stat::MALFORMED);
            };
            if ip.proto == IPPROTO_SCTP {
                if l4_off + 12 > ip_end || ip.frag != FRAG_NONE {
                    return Parsed::Pass(stat::MALFORMED);
                }
            } else {
                let udp_len = u16::from_be(udp.len_be) as u32;
                // A first fragment carries only the start of the datagram.
                if udp_len < 8 || (ip.frag == FRAG_NONE && l4_off + udp_len > ip_end) {
                    return Parsed::Pass(stat::MALFORMED);
                }
            }
            udp.ports
        }
        _ => return Parsed::Pass(stat::PASS_OTHER_PROTO),
    };
    if ip.frag == FRAG_FIRST {
        // The rest of the datagram gets this one's ports (and so its
        // translation). A full LRU evicts the oldest datagram.
        let _ = LB_FRAGS.insert(frag_key(ip), ports, 0);
        count(stat::FRAGMENT);
    }
    Parsed::Flow(flow_of(ip, l4_off, ports, tcp_flags, l4_hdr_bytes))
}

/// The flow of a TCP/UDP packet (or fragment) with these ports.
#[inline(always)]
fn flow_of(ip: &Ends, l4_off: u32, ports: Ports, tcp_flags: u8, l4_hdr_bytes: u32) -> Flow {
    Flow {
        src_be: ip.src,
        dst_be: ip.dst,
        sport_be: ports.src_be,
        dport_be: ports.dst_be,
        proto: ip.proto,
        tcp_flags,
        l3_off: ip.l3_off,
        l4_off,
        ihl_bytes: ip.ihl_bytes,
        l4_hdr_bytes,
        ip_end: ip.ip_end,
        v6: ip.v6,
        frag: ip.frag,
    }
}

#[inline(always)]
fn frag_key(ip: &Ends) -> FragKey {
    FragKey {
        src_addr_be: ip.src,
        dst_addr_be: ip.dst,
        id_be: ip.frag_id_be,
        proto: ip.proto,
        _pad: [0; 3],
    }
}

/// A fragment after the first: the ports its first fragment recorded. One
/// that arrives before its first fragment (reordered, or the first lost)
/// has no ports to be translated by: it passes untouched, counted
/// (`frag_unknown`); the caller drops it if it is addressed to a Service.
#[inline(always)]
fn later_fragment(ip: &Ends, l4_off: u32) -> Parsed {
    let Some(ports) = (unsafe { LB_FRAGS.get(frag_key(ip)) }) else {
        return Parsed::LaterUnknown(Flow {
            src_be: ip.src,
            dst_be: ip.dst,
            proto: ip.proto,
            l3_off: ip.l3_off,
            l4_off,
            ip_end: ip.ip_end,
            v6: ip.v6,
            frag: FRAG_LATER,
            ..Flow::default()
        });
    };
    count(stat::FRAGMENT);
    // No L4 header here: the ports are the first fragment's.
    Parsed::Flow(flow_of(ip, l4_off, *ports, 0, 0))
}
