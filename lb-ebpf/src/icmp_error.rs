//! ICMP and ICMPv6 errors about translated flows, translated the way
//! netfilter's conntrack does (`nf_nat_icmp_reply_translation`): the quoted
//! packet is turned back into the one the receiver sent (addresses, ports,
//! the quoted IPv4 header's checksum and the quoted L4 checksum when quoted),
//! and the outer header is made to look like an answer about that packet.
//!
//! An error about a packet a flow sent to its backend (port unreachable from
//! the backend, fragmentation needed / packet too big from a router on the
//! way) travels towards the client: it is found by the flow's reply entry,
//! its quote gets the frontend back as destination (and the client as
//! source, for source-NATed flows), its outer source becomes the frontend
//! and, for source-NATed flows, its outer destination the client. An error
//! about a reply (the client's side refusing or too small) travels towards
//! the backend: found by the forward entry, translated the other way.

use lb_common::{
    Addr, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, IPPROTO_TCP, IPPROTO_UDP, event_kind, event_reason,
    stat,
};

use crate::{
    csum, ct,
    maps::count,
    monitor,
    packet::{L4Csum, Packet, Result},
    parse::{
        Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_HLEN, IP6_SRC_OFF, Ipv4Hdr,
        Ports, TCP_CSUM, UDP_CSUM,
    },
};

/// IPv6 next header: a Fragment header.
const IPPROTO_FRAGMENT: u8 = 44;

/// ICMP header length: type, code, checksum and 4 bytes before the quote.
const ICMP_HLEN: u32 = 8;
const ICMP_CSUM: u32 = 2;

/// The quoted packet: the one the error is about.
struct Quoted {
    src: Addr,
    dst: Addr,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    l3_off: u32,
    l4_off: u32,
}

/// What the quote's ends become. The outer header follows netfilter: an
/// end of the quote that changes changes the opposite end of the outer
/// header to the same address (the error then reads as an answer to the
/// translated-back quote: from the frontend, to the client).
struct Translation {
    inner_src: Addr,
    inner_sport_be: u16,
    inner_dst: Addr,
    inner_dport_be: u16,
}

/// Translate an ICMP error in place if it concerns a tracked flow; pass it
/// otherwise. `towards_backend`: errors about replies are looked for too
/// (only where a flow's forward packets arrive: pod and node programs).
#[inline(never)]
pub fn translate<P: Packet>(pkt: &mut P, outer: &Flow, towards_backend: bool, scope: u8) -> i32 {
    let Some(quoted) = parse_quote(pkt, outer) else {
        count(stat::PASS_OTHER_PROTO);
        return pkt.pass();
    };
    // The flow's tuple in the direction of the quoted packet's answer.
    let mut key = CtKey {
        src_addr_be: quoted.dst,
        dst_addr_be: quoted.src,
        src_port_be: quoted.dport_be,
        dst_port_be: quoted.sport_be,
        proto: quoted.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let now = crate::ct::now();
    // For the monitor: the flow's frontend and backend.
    let rev_nat_id;
    let backend;
    let to = if let Some(entry) = ct::lookup(&key, now) {
        // The quote left towards the backend: restore the frontend (and the
        // client, if source-NATed).
        let entry = unsafe { &*entry };
        rev_nat_id = entry.rev_nat_id;
        backend = (quoted.dst, quoted.dport_be);
        let (client, client_port) = restored(entry.snat_addr_be, entry.snat_port_be, &quoted, true);
        Translation {
            inner_src: client,
            inner_sport_be: client_port,
            inner_dst: entry.nat_addr_be,
            inner_dport_be: entry.nat_port_be,
        }
    } else {
        key.dir = CT_DIR_FORWARD;
        let entry = if towards_backend {
            ct::lookup(&key, now)
        } else {
            None
        };
        let Some(entry) = entry else {
            count(stat::PASS_OTHER_PROTO);
            return pkt.pass();
        };
        // The quote is a reply as the client saw it: make it the backend's.
        let entry = unsafe { &*entry };
        rev_nat_id = entry.rev_nat_id;
        backend = (entry.nat_addr_be, entry.nat_port_be);
        let (snat, snat_port) = restored(entry.snat_addr_be, entry.snat_port_be, &quoted, false);
        Translation {
            inner_src: entry.nat_addr_be,
            inner_sport_be: entry.nat_port_be,
            inner_dst: snat,
            inner_dport_be: snat_port,
        }
    };
    match rewrite(pkt, outer, &quoted, &to) {
        Ok(()) => {
            count(stat::ICMP_ERROR_TRANSLATED);
            report(pkt, outer, event_kind::ICMP, scope, &backend, rev_nat_id);
            pkt.pass()
        }
        Err(_) => {
            count(stat::ERR_NAT_FAILED);
            report(pkt, outer, event_kind::DROP, scope, &backend, rev_nat_id);
            pkt.drop_verdict()
        }
    }
}

/// Tell a monitor about a translated error (or one dropped because its
/// rewrite failed), with the error's type and code as it arrived.
#[inline(always)]
fn report<P: Packet>(
    pkt: &P,
    outer: &Flow,
    kind: u8,
    scope: u8,
    backend: &(Addr, u16),
    rev_nat_id: u32,
) {
    if !monitor::wanted(kind) {
        return;
    }
    let reason = if kind == event_kind::ICMP {
        event_reason::ICMP_ERROR
    } else {
        event_reason::REWRITE_FAILED
    };
    // Type and code: the first two bytes of the ICMP header (the rewrite
    // leaves them as they arrived).
    let type_code = pkt.load_header::<[u8; 2]>(outer.l4_off).unwrap_or([0, 0]);
    let what = monitor::what(kind, reason, scope);
    let what = monitor::with_icmp(what, type_code[0], type_code[1]);
    let what = monitor::with_backend_port(what, backend.1);
    let ifindex = pkt.ifindex();
    monitor::emit(what, outer, &backend.0, monitor::ids(rev_nat_id, ifindex));
}

/// The other end of the quote after translation: the entry's source NAT end
/// when it has one, else the quote's own (source if `src`, else destination).
#[inline(always)]
fn restored(addr: Addr, port_be: u16, quoted: &Quoted, src: bool) -> (Addr, u16) {
    if !addr.is_none() {
        (addr, port_be)
    } else if src {
        (quoted.src, quoted.sport_be)
    } else {
        (quoted.dst, quoted.dport_be)
    }
}

/// The quoted IP header and the ports after it (RFC 792 and 4443 quote at
/// least 8 bytes of L4). Only TCP and UDP quotes, without IPv6 extension
/// headers other than a Fragment header, not a non-first fragment (no ports).
#[inline(always)]
fn parse_quote<P: Packet>(pkt: &P, outer: &Flow) -> Option<Quoted> {
    let l3_off = outer.l4_off + ICMP_HLEN;
    let (src, dst, proto, l4_off) = if outer.v6 {
        // Version and next header, then the addresses: the whole header
        // would cost this frame 40 bytes.
        let [version, _, _, _, _, _, mut next_header, _]: [u8; 8] = pkt.load(l3_off).ok()?;
        if version >> 4 != 6 {
            return None;
        }
        let src: Addr = pkt.load(l3_off + IP6_SRC_OFF).ok()?;
        let dst: Addr = pkt.load(l3_off + IP6_DST_OFF).ok()?;
        let mut l4_off = l3_off + IP6_HLEN;
        if next_header == IPPROTO_FRAGMENT {
            // A quoted first fragment (a router refusing a fragment too big
            // for its link): its ports follow the Fragment header.
            let [inner_next, _, offset_hi, offset_lo]: [u8; 4] = pkt.load(l4_off).ok()?;
            if u16::from_be_bytes([offset_hi, offset_lo]) & 0xfff8 != 0 {
                return None;
            }
            next_header = inner_next;
            l4_off += 8;
        }
        (src, dst, next_header, l4_off)
    } else {
        let ip: Ipv4Hdr = pkt.load(l3_off).ok()?;
        let ihl = ((ip.version_ihl & 0x0f) as u32) * 4;
        if ip.version_ihl >> 4 != 4 || ihl < 20 || u16::from_be(ip.frag_be) & 0x1fff != 0 {
            return None;
        }
        (
            Addr::v4(ip.src_be),
            Addr::v4(ip.dst_be),
            ip.proto,
            l3_off + ihl,
        )
    };
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || l4_off + 8 > outer.ip_end {
        return None;
    }
    let ports: Ports = pkt.load(l4_off).ok()?;
    Some(Quoted {
        src,
        dst,
        sport_be: ports.src_be,
        dport_be: ports.dst_be,
        proto,
        l3_off,
        l4_off,
    })
}

/// The running checksums of a rewrite: ICMP's, and the quoted L4 one
/// (None: not quoted, or a zero UDP checksum, which stays zero).
struct Sums {
    icmp: u16,
    l4: Option<u16>,
}

/// A 4-byte word changes inside the ICMP message: the ICMP checksum and the
/// quoted L4 checksum (pseudo header) follow.
#[inline(always)]
fn word_changed(sums: &mut Sums, from: u32, to: u32) {
    sums.icmp = csum::replace4(sums.icmp, from, to);
    if let Some(sum) = &mut sums.l4 {
        *sum = csum::replace4(*sum, from, to);
    }
}

/// One address of the quote, at `off` in its IP header, becomes `new`.
#[inline(always)]
fn quote_addr<P: Packet>(
    pkt: &mut P,
    v6: bool,
    q: &Quoted,
    sums: &mut Sums,
    off: u32,
    old: Addr,
    new: Addr,
) -> Result<()> {
    if v6 {
        for i in 0..4 {
            word_changed(sums, old.be[i], new.be[i]);
        }
        pkt.store(q.l3_off + off, &new)
    } else {
        let (from, to) = (old.v4_be(), new.v4_be());
        word_changed(sums, from, to);
        // The quoted IPv4 header's checksum, and the ICMP one over it.
        let ip_csum: u16 = pkt.load(q.l3_off + IP_CSUM_OFF)?;
        let new_ip_csum = csum::replace4(ip_csum, from, to);
        sums.icmp = csum::replace2(sums.icmp, ip_csum, new_ip_csum);
        pkt.store(q.l3_off + IP_CSUM_OFF, &new_ip_csum)?;
        pkt.store(q.l3_off + off, &to)
    }
}

/// One port of the quote, at `off` in its L4 header, becomes `new`.
#[inline(always)]
fn quote_port<P: Packet>(
    pkt: &mut P,
    q: &Quoted,
    sums: &mut Sums,
    off: u32,
    old: u16,
    new: u16,
) -> Result<()> {
    sums.icmp = csum::replace2(sums.icmp, old, new);
    if let Some(sum) = &mut sums.l4 {
        *sum = csum::replace2(*sum, old, new);
    }
    pkt.store(q.l4_off + off, &new)
}

/// One outer address (source if `src`) becomes `new`: IPv4's header
/// checksum, or ICMPv6's pseudo header, through the packet's helpers.
#[inline(always)]
fn outer_addr<P: Packet>(pkt: &mut P, outer: &Flow, src: bool, new: Addr) -> Result<()> {
    let old = if src { outer.src_be } else { outer.dst_be };
    if old == new {
        return Ok(());
    }
    if outer.v6 {
        for i in 0..4 {
            let (from, to) = (old.be[i], new.be[i]);
            if from != to {
                pkt.l4_csum_replace(L4Csum::Icmp, outer.l4_off + ICMP_CSUM, from, to, 4, true)?;
            }
        }
        let off = if src { IP6_SRC_OFF } else { IP6_DST_OFF };
        pkt.store_addr6(outer.l3_off + off, &new)
    } else {
        let (from, to) = (old.v4_be(), new.v4_be());
        pkt.l3_csum_replace4(outer.l3_off + IP_CSUM_OFF, from, to)?;
        let off = if src { IP_SRC_OFF } else { IP_DST_OFF };
        pkt.store(outer.l3_off + off, &to)
    }
}

/// Apply `to` to the error: the quote first, its checksums computed here
/// (they are plain data, and so is the ICMP checksum over them), then the
/// outer addresses through the packet's checksum helpers.
#[inline(always)]
fn rewrite<P: Packet>(pkt: &mut P, outer: &Flow, q: &Quoted, to: &Translation) -> Result<()> {
    let icmp_csum_off = outer.l4_off + ICMP_CSUM;
    // The quoted L4 checksum, where the quote holds it (a router quotes 8
    // bytes: UDP's is there, TCP's is not).
    let (l4_csum_off, udp) = if q.proto == IPPROTO_UDP {
        (q.l4_off + UDP_CSUM, true)
    } else {
        (q.l4_off + TCP_CSUM, false)
    };
    let l4_orig: Option<u16> = if l4_csum_off + 2 <= outer.ip_end {
        pkt.load::<u16>(l4_csum_off)
            .ok()
            .filter(|sum| !(udp && *sum == 0))
    } else {
        None
    };
    let mut sums = Sums {
        icmp: pkt.load(icmp_csum_off)?,
        l4: l4_orig,
    };
    let (src_off, dst_off) = if outer.v6 { (8, 24) } else { (12, 16) };
    let src_changed = q.src != to.inner_src;
    let dst_changed = q.dst != to.inner_dst;
    if src_changed {
        quote_addr(pkt, outer.v6, q, &mut sums, src_off, q.src, to.inner_src)?;
    }
    if dst_changed {
        quote_addr(pkt, outer.v6, q, &mut sums, dst_off, q.dst, to.inner_dst)?;
    }
    if q.sport_be != to.inner_sport_be {
        quote_port(pkt, q, &mut sums, 0, q.sport_be, to.inner_sport_be)?;
    }
    if q.dport_be != to.inner_dport_be {
        quote_port(pkt, q, &mut sums, 2, q.dport_be, to.inner_dport_be)?;
    }
    if let (Some(orig), Some(mut sum)) = (l4_orig, sums.l4) {
        if udp && sum == 0 {
            sum = 0xffff;
        }
        sums.icmp = csum::replace2(sums.icmp, orig, sum);
        pkt.store(l4_csum_off, &sum)?;
    }
    pkt.store(icmp_csum_off, &sums.icmp)?;
    // The outer header answers the restored quote.
    if dst_changed {
        outer_addr(pkt, outer, true, to.inner_dst)?;
    }
    if src_changed {
        outer_addr(pkt, outer, false, to.inner_src)?;
    }
    Ok(())
}
