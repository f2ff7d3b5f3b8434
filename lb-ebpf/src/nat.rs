//! Address and port rewrites with incremental checksum fixes.

use lb_common::{Addr, IPPROTO_SCTP, IPPROTO_TCP, sctp_crc};

use crate::{
    packet::{L4Csum, Packet, Result},
    parse::{
        FRAG_LATER, Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, IP6_DST_OFF,
        IP6_HOP_LIMIT_OFF, IP6_SRC_OFF, L4_DPORT, L4_SPORT, SCTP_CSUM, TCP_CSUM, UDP_CSUM,
    },
};

/// Which end of the tuple a rewrite touches.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub enum End {
    /// DNAT: client -> frontend becomes client -> backend.
    #[default]
    Destination,
    /// Reverse NAT: backend -> client becomes frontend -> client.
    Source,
}

/// Rewrite one end of `flow` to `addr_be:port_be`, fixing the IPv4 header
/// checksum (IPv6 has none) and the L4 checksum's pseudo header.
#[inline(always)]
pub fn rewrite<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    end: End,
    addr_be: Addr,
    port_be: u16,
) -> Result<()> {
    if flow.proto == IPPROTO_SCTP {
        return rewrite_sctp(pkt, flow, end, addr_be, port_be);
    }
    let (kind, csum_off) = if flow.proto == IPPROTO_TCP {
        (L4Csum::Tcp, flow.l4_off + TCP_CSUM)
    } else {
        (L4Csum::Udp, flow.l4_off + UDP_CSUM)
    };
    let (addr_off, old_addr, port_off, old_port) = match (end, flow.v6) {
        (End::Destination, false) => (
            flow.l3_off + IP_DST_OFF,
            flow.dst_be,
            flow.l4_off + L4_DPORT,
            flow.dport_be,
        ),
        (End::Source, false) => (
            flow.l3_off + IP_SRC_OFF,
            flow.src_be,
            flow.l4_off + L4_SPORT,
            flow.sport_be,
        ),
        (End::Destination, true) => (
            flow.l3_off + IP6_DST_OFF,
            flow.dst_be,
            flow.l4_off + L4_DPORT,
            flow.dport_be,
        ),
        (End::Source, true) => (
            flow.l3_off + IP6_SRC_OFF,
            flow.src_be,
            flow.l4_off + L4_SPORT,
            flow.sport_be,
        ),
    };
    if flow.frag == FRAG_LATER {
        // No L4 header here: the first fragment carried the ports and the
        // L4 checksum (over the whole datagram) and was translated already.
        if old_addr != addr_be {
            if flow.v6 {
                pkt.store_addr6(addr_off, &addr_be)?;
            } else {
                let (from, to) = (old_addr.v4_be(), addr_be.v4_be());
                pkt.l3_csum_replace4(flow.l3_off + IP_CSUM_OFF, from, to)?;
                pkt.store(addr_off, &to)?;
            }
        }
        return Ok(());
    }
    if old_addr != addr_be {
        if flow.v6 {
            // Each changed word of the address is a pseudo-header change.
            for i in 0..4 {
                let (from, to) = (old_addr.be[i], addr_be.be[i]);
                if from != to {
                    pkt.l4_csum_replace(kind, csum_off, from, to, 4, true)?;
                }
            }
            pkt.store_addr6(addr_off, &addr_be)?;
        } else {
            let (from, to) = (old_addr.v4_be(), addr_be.v4_be());
            pkt.l4_csum_replace(kind, csum_off, from, to, 4, true)?;
            pkt.l3_csum_replace4(flow.l3_off + IP_CSUM_OFF, from, to)?;
            pkt.store(addr_off, &to)?;
        }
    }
    if old_port != port_be {
        pkt.l4_csum_replace(kind, csum_off, old_port as u32, port_be as u32, 2, false)?;
        pkt.store(port_off, &port_be)?;
    }
    Ok(())
}

/// `rewrite` for SCTP. Its CRC32c covers the SCTP packet alone, no pseudo
/// header: an address changes the IP header only, a port the CRC, fixed
/// by the change alone (see `lb_common::sctp_crc`). Stores keep tc's
/// CHECKSUM_COMPLETE sum right (no Internet checksum covers them).
#[inline(never)]
fn rewrite_sctp<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    end: End,
    addr_be: Addr,
    port_be: u16,
) -> Result<()> {
    let source = end == End::Source;
    let (addr_off, old_addr) = match (source, flow.v6) {
        (false, false) => (flow.l3_off + IP_DST_OFF, flow.dst_be),
        (true, false) => (flow.l3_off + IP_SRC_OFF, flow.src_be),
        (false, true) => (flow.l3_off + IP6_DST_OFF, flow.dst_be),
        (true, true) => (flow.l3_off + IP6_SRC_OFF, flow.src_be),
    };
    // The same address store as `rewrite`'s later-fragment branch, written
    // twice on purpose: shared as one inlined function it cost the XDP
    // programs ~90k more verified instructions and `translate` 8 bytes of
    // stack (measured).
    if old_addr != addr_be {
        if flow.v6 {
            pkt.store_addr6(addr_off, &addr_be)?;
        } else {
            let (from, to) = (old_addr.v4_be(), addr_be.v4_be());
            pkt.l3_csum_replace4(flow.l3_off + IP_CSUM_OFF, from, to)?;
            pkt.store(addr_off, &to)?;
        }
    }
    let (port_off, old_port) = if source {
        (flow.l4_off + L4_SPORT, flow.sport_be)
    } else {
        (flow.l4_off + L4_DPORT, flow.dport_be)
    };
    if old_port == port_be {
        return Ok(());
    }
    let (o, n) = (old_port.to_ne_bytes(), port_be.to_ne_bytes());
    let delta = if source {
        [o[0] ^ n[0], o[1] ^ n[1], 0, 0]
    } else {
        [0, 0, o[0] ^ n[0], o[1] ^ n[1]]
    };
    let csum_off = flow.l4_off + SCTP_CSUM;
    // Stored little-endian (the CRC's bit order): a native load on BPF.
    let crc: u32 = pkt.load(csum_off)?;
    pkt.store_uncovered(port_off, &port_be)?;
    if crc == 0 {
        // Not computed yet: a pod's packet through its veth (SCTP CRC
        // offload) gets its CRC when it leaves, over the new port. A real
        // CRC of 0 (one in 2^32) costs a retransmission.
        return Ok(());
    }
    let fixed = crc ^ lb_sctp_crc_change(u32::from_ne_bytes(delta), flow.ip_end - flow.l4_off);
    pkt.store_uncovered(csum_off, &fixed)
}

/// The CRC change for `delta` (the first four bytes' change, as loaded)
/// over an SCTP packet of `len` bytes. A global BPF function: scalars in,
/// a scalar out, so the verifier checks it once, not at every call.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_sctp_crc_change(delta: u32, len: u32) -> u32 {
    sctp_crc::port_change(delta.to_ne_bytes(), len)
}

/// Count the hop of a packet lb forwards past the stack (which would have):
/// the IPv4 TTL (and header checksum) or the IPv6 hop limit decremented.
/// Ok(false), unchanged, when it would reach zero: the stack must forward
/// it, and send the sender "time exceeded".
#[inline(always)]
pub fn count_hop<P: Packet>(pkt: &mut P, l3_off: u32, v6: bool) -> Result<bool> {
    if v6 {
        let hop_limit: u8 = pkt.load(l3_off + IP6_HOP_LIMIT_OFF)?;
        if hop_limit <= 1 {
            return Ok(false);
        }
        pkt.store_uncovered(l3_off + IP6_HOP_LIMIT_OFF, &(hop_limit - 1))?;
        return Ok(true);
    }
    // TTL and protocol: one 16-bit word of the header checksum.
    let [ttl, proto]: [u8; 2] = pkt.load(l3_off + IP_TTL_OFF)?;
    if ttl <= 1 {
        return Ok(false);
    }
    let (from, to) = (
        u16::from_ne_bytes([ttl, proto]),
        u16::from_ne_bytes([ttl - 1, proto]),
    );
    // A 16-bit change through the 4-byte replace: the upper halves are
    // zero on both sides and cancel.
    pkt.l3_csum_replace4(l3_off + IP_CSUM_OFF, from as u32, to as u32)?;
    pkt.store(l3_off + IP_TTL_OFF, &[ttl - 1])?;
    Ok(true)
}
