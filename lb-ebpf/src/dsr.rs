//! Direct server return, Cilium's "option" mode: the node a flow from
//! outside comes in on forwards it to the backend's node with the client's
//! address kept and the frontend it was sent to in the packet (an IPv4
//! option, or an IPv6 Destination Options header); the backend's node
//! learns the frontend from it and sends the answers to the client itself,
//! from the frontend's address. No tunnel, and the answers skip the first
//! node.

use lb_common::{
    Addr, CT_DIR_FORWARD, CT_DIR_REPLY, CT_NO_BACKEND, CtKey, CtValue, IPPROTO_TCP, ct_flags,
    dsr::{IPPROTO_DSTOPTS, OPT4_LEN, OPT4_TYPE, OPT6_DATA_LEN, OPT6_HDR_LEN, OPT6_TYPE},
    stat,
};

use crate::{
    csum, ct,
    maps::{LB_CT_SCRATCH, count},
    packet::{Packet, PacketError, Result},
    parse::{Flow, IP_CSUM_OFF, IP6_HLEN, TCP_ACK, TCP_SYN},
};

/// lb's IPv6 Destination Options header: one option holding the frontend.
#[repr(C)]
#[derive(Clone, Copy)]
struct DstOpt6 {
    next_header: u8,
    /// In 8-byte units, not counting the first 8.
    hdr_ext_len: u8,
    opt_type: u8,
    opt_len: u8,
    addr: Addr,
    port_be: u16,
    _zero: u16,
}

const _: () = {
    assert!(size_of::<DstOpt6>() == OPT6_HDR_LEN as usize);
};

/// Whether this packet of a DSR flow carries the frontend: a TCP SYN
/// (later packets follow the backend node's entry, which the SYN made), a
/// whole UDP datagram (each may be the first the backend's node sees).
/// Fragments go without it.
#[inline(always)]
fn carries_option(flow: &Flow) -> bool {
    flow.frag == crate::parse::FRAG_NONE
        && (flow.proto != IPPROTO_TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// A packet of a DSR flow leaving the first node for the backend's node:
/// `entry` (keyed by the translated packet) names the frontend the client
/// sent it to, which the flow's first packets carry (a TCP SYN, every whole
/// UDP datagram).
/// Only the node's egress program adds it (`egress`), for every program
/// that translated the flow: XDP's packets cannot grow there without the
/// verifier walking the whole translation again, and the egress program
/// sees the packet once routed. Always passes the packet.
#[inline(never)]
pub fn leaving<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    entry: *mut CtValue,
    egress: bool,
    now: u64,
) -> i32 {
    if !egress {
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    // The client's packets are the only ones this entry sees: a TCP one
    // past the SYN, or a datagram in a later second than the first (the
    // first passes here too), says the flow is up.
    let up = if flow.proto == IPPROTO_TCP {
        flow.tcp_flags & TCP_ACK != 0
    } else {
        now / ct::NS_PER_SEC != unsafe { (*entry).created_ns } / ct::NS_PER_SEC
    };
    let extra = if up { ct_flags::REPLY_SEEN } else { 0 };
    ct::observe(entry, flow, CT_DIR_FORWARD, now, pkt.len(), extra);
    if !carries_option(flow) {
        return pkt.pass();
    }
    // Already there: stacked devices (a VLAN and its parent, a bond and its
    // ports) each run this program, and the first one added it. One naming
    // another frontend came from the client itself: dropped, or the
    // endpoint's node would answer for whatever it names.
    if let Some((addr, port)) = option_frontend(pkt, flow) {
        let ours = unsafe { addr == (*entry).nat_addr_be && port == (*entry).nat_port_be };
        if ours {
            return pkt.pass();
        }
        count(stat::ERR_DSR_OPTION);
        return pkt.drop_verdict();
    }
    // IPv6 with an extension header before the upper layer (an atomic
    // fragment's Fragment header): lb's header would not come first, which
    // is all the endpoint's node reads. Dropped, as a packet without room.
    if flow.v6 && flow.ihl_bytes != IP6_HLEN {
        count(stat::ERR_DSR_OPTION);
        return pkt.drop_verdict();
    }
    let grow = if flow.v6 {
        OPT6_HDR_LEN
    } else {
        OPT4_LEN as u32
    };
    if !pkt.fits_mtu_grown(grow) {
        // Grown past the device's MTU it would be lost on the wire (or
        // fragmented); Cilium answers "fragmentation needed" with the MTU
        // less the option, lb drops it, counted (see README).
        count(stat::DROP_DSR_TOO_BIG);
        return pkt.drop_verdict();
    }
    // Read through the pointer: an entry copied to the stack costs 88 bytes.
    let frontend = Frontend {
        addr_be: unsafe { (*entry).nat_addr_be },
        port_be: unsafe { (*entry).nat_port_be },
        l3_off: flow.l3_off,
        v6: flow.v6,
    };
    match add_option(pkt, &frontend) {
        Ok(_) => {
            count(stat::DSR_FORWARDED);
            pkt.pass()
        }
        // Without it the endpoint's node would answer from the endpoint's
        // own address, which the client drops: dropped here (as Cilium).
        Err(_) => {
            count(stat::ERR_DSR_OPTION);
            pkt.drop_verdict()
        }
    }
}

/// What `add_option` writes, and where the IP header is.
pub struct Frontend {
    pub addr_be: Addr,
    pub port_be: u16,
    pub l3_off: u32,
    pub v6: bool,
}

/// Put the flow's frontend into the packet, already translated to its
/// backend. Returns the bytes the IP datagram grew by. Its own BPF
/// function; it reads and writes header fields one by one (its frame adds
/// to the call chain's 512 bytes).
#[inline(never)]
pub fn add_option<P: Packet>(pkt: &mut P, to: &Frontend) -> Result<u32> {
    let l3 = to.l3_off;
    if to.v6 {
        // Payload length, next header, hop limit.
        let [len_hi, len_lo, next_header, hop_limit]: [u8; 4] = pkt.load_header(l3 + 4)?;
        pkt.open_after_ip(true, OPT6_HDR_LEN)?;
        let payload_len = u16::from_be_bytes([len_hi, len_lo]) + OPT6_HDR_LEN as u16;
        let [len_hi, len_lo] = payload_len.to_be_bytes();
        // IPv6 has no header checksum, and the upper-layer checksum's
        // length leaves extension headers out: only tc's skb sum follows.
        pkt.store_uncovered(l3 + 4, &[len_hi, len_lo, IPPROTO_DSTOPTS, hop_limit])?;
        let opt = l3 + IP6_HLEN;
        let hdr_ext_len = (OPT6_HDR_LEN / 8 - 1) as u8;
        pkt.store_uncovered(opt, &[next_header, hdr_ext_len, OPT6_TYPE, OPT6_DATA_LEN])?;
        pkt.store_uncovered(opt + 4, &to.addr_be)?;
        pkt.store_uncovered(opt + 20, &[to.port_be, 0u16])?;
        return Ok(OPT6_HDR_LEN);
    }
    let first: [u8; 4] = pkt.load_header(l3)?;
    let old_csum: u16 = pkt.load_header(l3 + IP_CSUM_OFF)?;
    let ihl_words = first[0] & 0x0f;
    // Options fill at most 40 bytes (IHL 15).
    if ihl_words + OPT4_LEN / 4 > 15 {
        return Err(PacketError);
    }
    pkt.open_after_ip(false, OPT4_LEN as u32)?;
    let tot_len = (u16::from_be_bytes([first[2], first[3]]) + OPT4_LEN as u16).to_be_bytes();
    let new_first = [
        (first[0] & 0xf0) | (ihl_words + OPT4_LEN / 4),
        first[1],
        tot_len[0],
        tot_len[1],
    ];
    let [port_0, port_1] = to.port_be.to_ne_bytes();
    let option = [OPT4_TYPE, OPT4_LEN, port_0, port_1];
    let addr_be = to.addr_be.v4_be();
    // The header checksum follows the first word (IHL, total length) and
    // the option's two words (zero before); options already in the packet,
    // now after ours, stay covered by the old sum.
    let mut sum = csum::replace4(
        old_csum,
        u32::from_ne_bytes(first),
        u32::from_ne_bytes(new_first),
    );
    sum = csum::replace4(sum, 0, u32::from_ne_bytes(option));
    sum = csum::replace4(sum, 0, addr_be);
    pkt.store_uncovered(l3, &new_first)?;
    pkt.store_uncovered(l3 + IP_CSUM_OFF, &sum)?;
    pkt.store_uncovered(l3 + 20, &option)?;
    pkt.store_uncovered(l3 + 24, &addr_be)?;
    Ok(OPT4_LEN as u32)
}

/// The frontend a packet carries (lb's option right after the fixed IP
/// header), if any.
#[inline(always)]
fn option_frontend<P: Packet>(pkt: &P, flow: &Flow) -> Option<(Addr, u16)> {
    if flow.v6 {
        // The parse recognised lb's header (and only lb's) there.
        if flow.ihl_bytes != IP6_HLEN + OPT6_HDR_LEN {
            return None;
        }
        let opt: DstOpt6 = pkt.load_header(flow.l3_off + IP6_HLEN).ok()?;
        (opt.opt_type == OPT6_TYPE && opt.opt_len == OPT6_DATA_LEN)
            .then_some((opt.addr, opt.port_be))
    } else {
        if flow.ihl_bytes < 20 + OPT4_LEN as u32 {
            return None;
        }
        let [opt_type, opt_len, port_hi, port_lo]: [u8; 4] =
            pkt.load_header(flow.l3_off + 20).ok()?;
        if opt_type != OPT4_TYPE || opt_len != OPT4_LEN {
            return None;
        }
        let addr_be: u32 = pkt.load_header(flow.l3_off + 24).ok()?;
        Some((Addr::v4(addr_be), u16::from_ne_bytes([port_hi, port_lo])))
    }
}

/// On the backend's node: a packet (to a backend here) carrying lb's
/// option starts a reply entry that restores the frontend as the source
/// of the backend's answers, which then go straight to the client.
/// Returns whether the packet had the option.
///
/// An entry already holding the tuple is kept when it is another flow's
/// and live (a flow translated here, say: its answers are not another
/// node's to redirect) or this flow's own (learnt already: its answers
/// keep it; a new SYN starts it over); a dead or closed one, or another
/// frontend's DSR entry, is replaced.
#[inline(never)]
pub fn learn<P: Packet>(pkt: &P, flow: &Flow) -> bool {
    let Some((frontend, frontend_port_be)) = option_frontend(pkt, flow) else {
        return false;
    };
    if frontend.is_none() || (frontend.is_v4() && frontend.v4_be() == 0) || frontend_port_be == 0 {
        // Not a frontend: nothing to answer from.
        return true;
    }
    let now = ct::now();
    let syn = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let key = learnt_key(flow);
    if !ct::tuple_free(&key, now)
        && let Some(held) = ct::entry_ptr(&key)
    {
        let (learnt, own) = unsafe {
            let learnt = (*held).flags & ct_flags::DSR_LEARNT != 0;
            let own = (*held).nat_addr_be == frontend && (*held).nat_port_be == frontend_port_be;
            (learnt, learnt && own)
        };
        if !learnt {
            return true;
        }
        if own && !syn {
            // The client's datagrams keep it, not only the answers.
            ct::observe(held, flow, CT_DIR_FORWARD, now, pkt.len(), 0);
            return true;
        }
    }
    let Some(entry) = LB_CT_SCRATCH.get_ptr_mut(0) else {
        return true;
    };
    let flags = if syn {
        ct_flags::DSR_LEARNT | ct_flags::SYN_SEEN
    } else {
        ct_flags::DSR_LEARNT
    };
    // SAFETY: a per-CPU scratch slot, ours for the length of this run.
    let entry = unsafe { &mut *entry };
    // No backend of ours (the agent's pruning leaves it be) and no
    // frontend id: the frontend is another node's.
    entry.backend_id = CT_NO_BACKEND;
    entry.rev_nat_id = 0;
    entry.flags = flags;
    entry.nat_addr_be = frontend;
    entry.nat_port_be = frontend_port_be;
    entry.tcp_flags_seen = 0;
    entry.created_ns = now;
    entry.last_seen_ns = now;
    entry.lifetime_s = ct::lifetime(flow.proto, flags);
    entry.snat_addr_be = ct::no_addr();
    entry.snat_port_be = 0;
    let zero = core::hint::black_box(0u64);
    entry.packets = zero;
    entry.bytes = zero;
    if ct::insert(&key, entry, 0) {
        count(stat::DSR_LEARNED);
    } else {
        // A full map keeps the older entries: the flow's answers go
        // untranslated.
        count(stat::ERR_CT_FULL);
    }
    true
}

/// On the backend's node: the client's FIN or RST of a learnt DSR flow,
/// which its entry (seeing only the backend's answers) would not see
/// otherwise, so a closed connection's entry ages as one.
#[inline(never)]
pub fn client_closing(flow: &Flow) {
    let key = learnt_key(flow);
    let Some(entry) = ct::entry_ptr(&key) else {
        return;
    };
    if unsafe { (*entry).flags } & ct_flags::DSR_LEARNT != 0 {
        ct::observe(entry, flow, CT_DIR_FORWARD, ct::now(), 0, 0);
    }
}

/// The key of the reply entry learnt for a packet client -> backend.
#[inline(always)]
fn learnt_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr_be: flow.dst_be,
        dst_addr_be: flow.src_be,
        src_port_be: flow.dport_be,
        dst_port_be: flow.sport_be,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}
