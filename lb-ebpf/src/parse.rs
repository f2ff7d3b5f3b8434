//! Header parsing. Anything we cannot fully account for is reported with the
//! stat that explains why it is passed untouched.

use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, stat};

use crate::packet::Packet;

pub const ETH_HLEN: u32 = 14;
pub const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header (from the start of the packet).
pub const IP_CSUM_OFF: u32 = ETH_HLEN + 10;
pub const IP_SRC_OFF: u32 = ETH_HLEN + 12;
pub const IP_DST_OFF: u32 = ETH_HLEN + 16;
/// Offsets inside the L4 header.
pub const L4_SPORT: u32 = 0;
pub const L4_DPORT: u32 = 2;
pub const TCP_CSUM: u32 = 16;
pub const UDP_CSUM: u32 = 6;

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
#[derive(Clone, Copy)]
pub struct Ports {
    pub src_be: u16,
    pub dst_be: u16,
}

/// A TCP or UDP packet over IPv4, with what translation needs to know.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flag byte (0 for UDP).
    pub tcp_flags: u8,
    /// Start of the L4 header.
    pub l4_off: u32,
    /// IPv4 header length in bytes (with options).
    pub ihl_bytes: u32,
    /// L4 header length in bytes (TCP data offset, 8 for UDP).
    pub l4_hdr_bytes: u32,
    /// End of the IP datagram (ETH_HLEN + total length), before any padding.
    pub ip_end: u32,
}

/// An ICMP echo request (ping) over IPv4.
#[derive(Clone, Copy)]
pub struct Echo {
    pub src_be: u32,
    pub dst_be: u32,
    /// Start of the ICMP header.
    pub l4_off: u32,
}

pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;

pub enum Parsed {
    Flow(Flow),
    Echo(Echo),
    /// Not ours to touch; the stat says why.
    Pass(u32),
}

/// Ethernet header and the fixed IPv4 header, read in one go (packed: the
/// IPv4 header starts at byte 14, not at a 4-byte boundary).
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct EthIpv4 {
    _macs: [u8; 12],
    proto_be: u16,
    ip: Ipv4Hdr,
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

const _: () = {
    assert!(size_of::<EthIpv4>() == 34);
    assert!(size_of::<TcpHead>() == 14);
    assert!(size_of::<UdpHdr>() == 8);
};

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    // One load for Ethernet + IPv4 (each helper call costs), a second for L4.
    let Ok(head) = pkt.load_header::<EthIpv4>(0) else {
        // Too short for IPv4 over Ethernet: say what it is, then pass.
        return match pkt.load::<u16>(12) {
            Ok(p) if u16::from_be(p) == ETH_P_IP => Parsed::Pass(stat::MALFORMED),
            Ok(_) => Parsed::Pass(stat::PASS_NOT_IPV4),
            Err(_) => Parsed::Pass(stat::MALFORMED),
        };
    };
    if u16::from_be(head.proto_be) != ETH_P_IP {
        return Parsed::Pass(stat::PASS_NOT_IPV4);
    }
    let ip = { head.ip };
    let ihl_bytes = ((ip.version_ihl & 0x0f) as u32) * 4;
    let tot_len = u16::from_be(ip.tot_len_be) as u32;
    if ip.version_ihl >> 4 != 4 || ihl_bytes < 20 || tot_len < ihl_bytes {
        return Parsed::Pass(stat::MALFORMED);
    }
    let ip_end = ETH_HLEN + tot_len;
    if ip_end > pkt.len() {
        return Parsed::Pass(stat::MALFORMED);
    }
    // MF set or a non-zero offset: the ports are not (all) here.
    if u16::from_be(ip.frag_be) & 0x3fff != 0 {
        return Parsed::Pass(stat::PASS_FRAGMENT);
    }
    let l4_off = ETH_HLEN + ihl_bytes;
    let mut tcp_flags = 0u8;
    let mut l4_hdr_bytes = 8;
    let ports = match ip.proto {
        IPPROTO_TCP => {
            if l4_off + 20 > ip_end {
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
        IPPROTO_UDP => {
            let Ok(udp) = pkt.load_header::<UdpHdr>(l4_off) else {
                return Parsed::Pass(stat::MALFORMED);
            };
            let udp_len = u16::from_be(udp.len_be) as u32;
            if udp_len < 8 || l4_off + udp_len > ip_end {
                return Parsed::Pass(stat::MALFORMED);
            }
            udp.ports
        }
        IPPROTO_ICMP => {
            // Only echo requests are ours (to answer for Service addresses).
            if l4_off + 8 > ip_end {
                return Parsed::Pass(stat::PASS_OTHER_PROTO);
            }
            return match pkt.load::<[u8; 2]>(l4_off) {
                Ok([ICMP_ECHO_REQUEST, 0]) => Parsed::Echo(Echo {
                    src_be: ip.src_be,
                    dst_be: ip.dst_be,
                    l4_off,
                }),
                _ => Parsed::Pass(stat::PASS_OTHER_PROTO),
            };
        }
        _ => return Parsed::Pass(stat::PASS_OTHER_PROTO),
    };
    Parsed::Flow(Flow {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        sport_be: ports.src_be,
        dport_be: ports.dst_be,
        proto: ip.proto,
        tcp_flags,
        l4_off,
        ihl_bytes,
        l4_hdr_bytes,
        ip_end,
    })
}
