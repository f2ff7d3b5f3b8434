//! Answers the datapath gives itself. For a frontend without backends, the
//! way kube-proxy's REJECT does: TCP gets an RST, UDP an ICMP port
//! unreachable. For a ping to a Service address with a usable backend, the
//! echo reply. The packet is rewritten in place into the answer and bounced
//! back out of the device it came from.

use lb_common::{Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

use crate::{
    csum,
    packet::{L4Csum, Packet, Result},
    parse::{
        ETH_P_IP, ETH_P_IPV6, Echo, Flow, ICMP_ECHO_REPLY, ICMPV6_ECHO_REPLY, IP_DST_OFF,
        IP_SRC_OFF, IP6_DST_OFF, IP6_HLEN, IP6_SRC_OFF, Ipv4Hdr, Ipv6Hdr, TCP_ACK, TCP_FIN,
        TCP_RST, TCP_SYN,
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
/// ICMPv6 quotes the IPv6 header and 8 bytes of L4.
const QUOTE6_WORDS: u32 = (IP6_HLEN + 8) / 4;

/// Swapped Ethernet header for the answer (None on an L3 device).
#[inline(always)]
fn answer_eth<P: Packet>(pkt: &P, v6: bool) -> Result<Option<EthHdr>> {
    if pkt.l3_off() == 0 {
        return Ok(None);
    }
    let eth: EthHdr = pkt.load(0)?;
    Ok(Some(EthHdr {
        dst: eth.src,
        src: eth.dst,
        proto_be: if v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be(),
    }))
}

/// Write the answer's Ethernet header, if the device has one.
#[inline(always)]
fn store_eth<P: Packet>(pkt: &mut P, eth: &Option<EthHdr>) -> Result<()> {
    match eth {
        Some(eth) => pkt.store(0, eth),
        None => Ok(()),
    }
}

/// IPv6 header of the answer, from the frontend to the client.
#[inline(always)]
fn answer_ip6(flow: &Flow, next_header: u8, payload_len: u32) -> Ipv6Hdr {
    Ipv6Hdr {
        vtc_flow_be: (6u32 << 28).to_be(),
        payload_len_be: (payload_len as u16).to_be(),
        next_header,
        hop_limit: 64,
        src: flow.dst_be,
        dst: flow.src_be,
    }
}

/// One's-complement sum of an IPv6 pseudo header (RFC 8200 8.1) for an
/// upper-layer packet of `len` bytes.
#[inline(always)]
fn pseudo6_sum(src: &Addr, dst: &Addr, next_header: u8, len: u32) -> u32 {
    let mut sum = 0u32;
    for i in 0..4 {
        sum = csum::add4(sum, src.be[i]);
        sum = csum::add4(sum, dst.be[i]);
    }
    sum + (len as u16).to_be() as u32 + (next_header as u16).to_be() as u32
}

/// The RST answering `flow`'s TCP segment (RFC 9293 3.10.7.1), checksum
/// over the header only, starting from the pseudo-header sum `pseudo`.
#[inline(always)]
fn rst_header<P: Packet>(pkt: &P, flow: &Flow, pseudo: u32) -> Result<TcpHdr> {
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
    let words: [u16; 10] = unsafe { core::mem::transmute(tcp) };
    let mut sum = pseudo;
    for w in words {
        sum += w as u32;
    }
    tcp.csum = !csum::fold(sum);
    Ok(tcp)
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
        src_be: flow.dst_be.v4_be(),
        dst_be: flow.src_be.v4_be(),
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
    let eth = answer_eth(pkt, false)?;
    // Pseudo header; the RST carries no payload.
    let mut pseudo = csum::add4(0, flow.dst_be.v4_be());
    pseudo = csum::add4(pseudo, flow.src_be.v4_be());
    pseudo += (IPPROTO_TCP as u16).to_be() as u32 + (TCP_HLEN as u16).to_be() as u32;
    let tcp = rst_header(pkt, flow, pseudo)?;
    let ip = answer_ip(flow, IPPROTO_TCP, IP_HLEN + TCP_HLEN);

    let l3 = pkt.l3_off();
    pkt.truncate(l3 + IP_HLEN + TCP_HLEN)?;
    store_eth(pkt, &eth)?;
    pkt.store(l3, &ip)?;
    pkt.store(l3 + IP_HLEN, &tcp)
}

/// The IPv6 twin of `tcp_rst`.
#[inline(always)]
pub fn tcp6_rst<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<()> {
    let eth = answer_eth(pkt, true)?;
    let pseudo = pseudo6_sum(&flow.dst_be, &flow.src_be, IPPROTO_TCP, TCP_HLEN);
    let tcp = rst_header(pkt, flow, pseudo)?;
    let ip = answer_ip6(flow, IPPROTO_TCP, TCP_HLEN);

    let l3 = pkt.l3_off();
    pkt.truncate(l3 + IP6_HLEN + TCP_HLEN)?;
    store_eth(pkt, &eth)?;
    pkt.store(l3, &ip)?;
    pkt.store(l3 + IP6_HLEN, &tcp)
}

/// Rewrite a UDP packet into ICMP port unreachable quoting its IP header and
/// first 8 bytes of UDP (RFC 792), so the client's socket gets ECONNREFUSED.
#[inline(always)]
pub fn icmp_port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<()> {
    let eth = answer_eth(pkt, false)?;
    let quote_len = flow.ihl_bytes + 8;
    let extra = IP_HLEN + ICMP_HLEN;
    // The original IP header and L4 start stay where they are, shifted by the
    // new headers in front: [eth][ip][icmp][quoted ip][8 bytes of udp].
    pkt.push_head(extra)?;
    let l3 = pkt.l3_off();
    let quote_off = l3 + extra;
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

    store_eth(pkt, &eth)?;
    pkt.store(l3, &ip)?;
    pkt.store(l3 + IP_HLEN, &icmp)
}

/// Rewrite a UDP packet over IPv6 into ICMPv6 destination unreachable, port
/// unreachable (RFC 4443 3.1), quoting the IPv6 header and 8 bytes of UDP.
#[inline(always)]
pub fn icmp6_port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<()> {
    let eth = answer_eth(pkt, true)?;
    let quote_len = IP6_HLEN + 8;
    let extra = IP6_HLEN + ICMP_HLEN;
    pkt.push_head(extra)?;
    let l3 = pkt.l3_off();
    let quote_off = l3 + extra;
    pkt.truncate(quote_off + quote_len)?;

    let mut icmp = IcmpHdr {
        kind: 1,
        code: 4,
        csum: 0,
        unused: 0,
    };
    let icmp_len = ICMP_HLEN + quote_len;
    let mut sum = pseudo6_sum(&flow.dst_be, &flow.src_be, IPPROTO_ICMPV6, icmp_len);
    sum += (icmp.kind as u16 | ((icmp.code as u16) << 8)) as u32;
    for i in 0..QUOTE6_WORDS {
        let word: u32 = pkt.load(quote_off + i * 4)?;
        sum = csum::add4(sum, word);
    }
    icmp.csum = !csum::fold(sum);
    let ip = answer_ip6(flow, IPPROTO_ICMPV6, icmp_len);

    store_eth(pkt, &eth)?;
    pkt.store(l3, &ip)?;
    pkt.store(l3 + IP6_HLEN, &icmp)
}

/// Rewrite an echo request into its reply: ICMP type 0 (RFC 792) or ICMPv6
/// type 129 (RFC 4443 4.2), addresses swapped; identifier, sequence and data
/// stay as they came. Swapping the addresses leaves the IPv4 header's sum
/// and ICMPv6's pseudo-header sum as they are: only the type changes a sum.
#[inline(always)]
pub fn echo_reply<P: Packet>(pkt: &mut P, echo: &Echo) -> Result<()> {
    let eth = answer_eth(pkt, echo.v6)?;
    let old_type_code: u16 = pkt.load(echo.l4_off)?;
    let reply = if echo.v6 {
        ICMPV6_ECHO_REPLY
    } else {
        ICMP_ECHO_REPLY
    };
    let new_type_code = u16::from_ne_bytes([reply, 0]);
    pkt.l4_csum_replace(
        L4Csum::Icmp,
        echo.l4_off + 2,
        old_type_code as u32,
        new_type_code as u32,
        2,
        false,
    )?;
    pkt.store(echo.l4_off, &new_type_code)?;
    let l3 = echo.l3_off;
    if echo.v6 {
        pkt.store(l3 + IP6_SRC_OFF, &echo.dst_be)?;
        pkt.store(l3 + IP6_DST_OFF, &echo.src_be)?;
    } else {
        pkt.store(l3 + IP_SRC_OFF, &echo.dst_be.v4_be())?;
        pkt.store(l3 + IP_DST_OFF, &echo.src_be.v4_be())?;
    }
    store_eth(pkt, &eth)
}
