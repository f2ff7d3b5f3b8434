//! Answers the datapath gives itself. For a frontend without backends, the
//! way kube-proxy's REJECT does: TCP gets an RST, UDP an ICMP port
//! unreachable. For a ping to a Service address with a usable backend, the
//! echo reply. The packet is rewritten in place into the answer and bounced
//! back out of the device it came from.

use lb_common::{IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    csum,
    packet::{L4Csum, Packet, Result},
    parse::{
        ETH_HLEN, ETH_P_IP, Echo, Flow, ICMP_ECHO_REPLY, IP_DST_OFF, IP_SRC_OFF, Ipv4Hdr, TCP_ACK,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
};

#[repr(C)]
#[derive(Clone, Copy)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport_be: u16,
    dport_be: u16,
    seq_be: u32,
    ack_be: u32,
    doff_res: u8,
    flags: u8,
    window_be: u16,
    csum: u16,
    urg_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    csum: u16,
    unused: u32,
}

const IP_HLEN: u32 = 20;
const TCP_HLEN: u32 = 20;
const ICMP_HLEN: u32 = 8;
/// Longest quote: a 60-byte IPv4 header plus 8 bytes of L4.
const MAX_QUOTE_WORDS: u32 = 17;

/// Swapped Ethernet header for the answer.
#[inline(always)]
fn answer_eth<P: Packet>(pkt: &P) -> Result<EthHdr> {
    let eth: EthHdr = pkt.load(0)?;
    Ok(EthHdr {
        dst: eth.src,
        src: eth.dst,
        proto_be: ETH_P_IP.to_be(),
    })
}

/// IPv4 header of the answer, from the frontend to the client, checksummed.
#[inline(always)]
fn answer_ip(flow: &Flow, proto: u8, tot_len: u32) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len_be: (tot_len as u16).to_be(),
        id_be: 0,
        frag_be: 0x4000u16.to_be(),
        ttl: 64,
        proto,
        csum: 0,
        src_be: flow.dst_be,
        dst_be: flow.src_be,
    };
    let words: [u16; 10] = unsafe { core::mem::transmute(ip) };
    let mut sum = 0u32;
    for w in words {
        sum += w as u32;
    }
    ip.csum = !csum::fold(sum);
    ip
}

/// Rewrite a TCP packet into the RST that refuses it (RFC 9293 3.10.7.1).
#[inline(always)]
pub fn tcp_rst<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<()> {
    let eth = answer_eth(pkt)?;
    let seq_ack: [u32; 2] = pkt.load(flow.l4_off + 4)?;
    let (seq_be, ack_be, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (seq_ack[1], 0, TCP_RST)
    } else {
        let mut seg_len = flow.ip_end - flow.l4_off - flow.l4_hdr_bytes;
        if flow.tcp_flags & TCP_SYN != 0 {
            seg_len += 1;
        }
        if flow.tcp_flags & TCP_FIN != 0 {
            seg_len += 1;
        }
        let ack = u32::from_be(seq_ack[0]).wrapping_add(seg_len);
        (0, ack.to_be(), TCP_RST | TCP_ACK)
    };
    let mut tcp = TcpHdr {
        sport_be: flow.dport_be,
        dport_be: flow.sport_be,
        seq_be,
        ack_be,
        doff_res: 5 << 4,
        flags,
        window_be: 0,
        csum: 0,
        urg_be: 0,
    };
    // Pseudo header + header; the RST carries no payload.
    let mut sum = csum::add4(0, flow.dst_be);
    sum = csum::add4(sum, flow.src_be);
    sum += (IPPROTO_TCP as u16).to_be() as u32 + (TCP_HLEN as u16).to_be() as u32;
    let words: [u16; 10] = unsafe { core::mem::transmute(tcp) };
    for w in words {
        sum += w as u32;
    }
    tcp.csum = !csum::fold(sum);
    let ip = answer_ip(flow, IPPROTO_TCP, IP_HLEN + TCP_HLEN);

    pkt.truncate(ETH_HLEN + IP_HLEN + TCP_HLEN)?;
    pkt.store(0, &eth)?;
    pkt.store(ETH_HLEN, &ip)?;
    pkt.store(ETH_HLEN + IP_HLEN, &tcp)
}

/// Rewrite a UDP packet into ICMP port unreachable quoting its IP header and
/// first 8 bytes of UDP (RFC 792), so the client's socket gets ECONNREFUSED.
#[inline(always)]
pub fn icmp_port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<()> {
    let eth = answer_eth(pkt)?;
    let quote_len = flow.ihl_bytes + 8;
    let extra = IP_HLEN + ICMP_HLEN;
    // The original IP header and L4 start stay where they are, shifted by the
    // new headers in front: [eth][ip][icmp][quoted ip][8 bytes of udp].
    pkt.push_head(extra)?;
    let quote_off = ETH_HLEN + extra;
    pkt.truncate(quote_off + quote_len)?;

    let mut icmp = IcmpHdr {
        kind: 3,
        code: 3,
        csum: 0,
        unused: 0,
    };
    let mut sum = (icmp.kind as u16 | ((icmp.code as u16) << 8)) as u32;
    let mut i = 0;
    while i < MAX_QUOTE_WORDS {
        if i * 4 >= quote_len {
            break;
        }
        let word: u32 = pkt.load(quote_off + i * 4)?;
        sum = csum::add4(sum, word);
        i += 1;
    }
    icmp.csum = !csum::fold(sum);
    let ip = answer_ip(flow, IPPROTO_ICMP, extra + quote_len);

    pkt.store(0, &eth)?;
    pkt.store(ETH_HLEN, &ip)?;
    pkt.store(ETH_HLEN + IP_HLEN, &icmp)
}

/// Rewrite an ICMP echo request into its reply (RFC 792): addresses
/// swapped, type 0; identifier, sequence and data stay as they came.
#[inline(always)]
pub fn echo_reply<P: Packet>(pkt: &mut P, echo: &Echo) -> Result<()> {
    let eth = answer_eth(pkt)?;
    let old_type_code: u16 = pkt.load(echo.l4_off)?;
    let new_type_code = u16::from_ne_bytes([ICMP_ECHO_REPLY, 0]);
    pkt.l4_csum_replace(
        L4Csum::Icmp,
        echo.l4_off + 2,
        old_type_code as u32,
        new_type_code as u32,
        2,
        false,
    )?;
    pkt.store(echo.l4_off, &new_type_code)?;
    // Swapping the addresses leaves the IPv4 header's sum as it is.
    pkt.store(IP_SRC_OFF, &echo.dst_be)?;
    pkt.store(IP_DST_OFF, &echo.src_be)?;
    pkt.store(0, &eth)
}
