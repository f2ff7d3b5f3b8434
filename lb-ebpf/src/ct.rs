//! Conntrack: a forward entry (client -> frontend) pins the flow's backend, a
//! reply entry (backend -> client) names the frontend to translate back to.
//! Entries age by protocol state; a dead entry reads as absent.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    BACKEND_STANDBY, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue, IPPROTO_TCP,
    ct_flags, ct_lifetime,
};

use crate::{
    maps::LB_CT,
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn forward_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr_be: flow.src_be,
        dst_addr_be: flow.dst_be,
        src_port_be: flow.sport_be,
        dst_port_be: flow.dport_be,
        proto: flow.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn reply_key(flow: &Flow) -> CtKey {
    CtKey {
        src_addr_be: flow.src_be,
        dst_addr_be: flow.dst_be,
        src_port_be: flow.sport_be,
        dst_port_be: flow.dport_be,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// Lifetime of an entry in seconds from its state flags.
#[inline(always)]
pub fn lifetime(proto: u8, flags: u16) -> u32 {
    if proto != IPPROTO_TCP {
        ct_lifetime::NON_TCP
    } else if flags & (ct_flags::FIN_SEEN | ct_flags::RST_SEEN) != 0 {
        ct_lifetime::TCP_CLOSING
    } else if flags & ct_flags::REPLY_SEEN != 0 {
        ct_lifetime::TCP_ESTABLISHED
    } else {
        ct_lifetime::TCP_SYN
    }
}

/// A live entry for `key`, or None when absent or aged out.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = LB_CT.get_ptr_mut(key)?;
    let (last_seen, lifetime_s) = unsafe { ((*entry).last_seen_ns, (*entry).lifetime_s) };
    if now > last_seen + lifetime_s as u64 * NS_PER_SEC {
        return None;
    }
    Some(entry)
}

/// Whether a packet must start its flow over instead of following `entry`:
/// UDP to a backend that is terminating (a client reusing its port, like a
/// DNS resolver, must not stay stuck on it), or a fresh SYN on a TCP tuple
/// that was closed (FIN/RST seen): that is a new connection.
#[inline(always)]
pub fn restarts(flow: &Flow, entry: &CtValue, backend: &BackendValue) -> bool {
    if flow.proto != IPPROTO_TCP {
        return backend.state == BACKEND_STANDBY;
    }
    flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.flags & (ct_flags::FIN_SEEN | ct_flags::RST_SEEN) != 0
}

/// State bits a TCP flag byte adds.
#[inline(always)]
fn state_bits(flow: &Flow) -> u16 {
    if flow.proto != IPPROTO_TCP {
        return 0;
    }
    let mut bits = 0;
    if flow.tcp_flags & TCP_FIN != 0 {
        bits |= ct_flags::FIN_SEEN;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        bits |= ct_flags::RST_SEEN;
    }
    bits
}

/// Account a packet on `entry`. Returns the state bits that are new, which the
/// caller copies to the other direction's entry.
#[inline(always)]
pub fn observe(entry: *mut CtValue, flow: &Flow, now: u64, len: u32, extra: u16) -> u16 {
    unsafe {
        let old = (*entry).flags;
        let flags = old | state_bits(flow) | extra;
        (*entry).flags = flags;
        (*entry).last_seen_ns = now;
        (*entry).lifetime_s = lifetime(flow.proto, flags);
        (*entry).packets += 1;
        (*entry).bytes += len as u64;
        (*entry).tcp_flags_seen |= flow.tcp_flags;
        flags & !old
    }
}

/// Add state bits learnt from the other direction.
#[inline(always)]
pub fn merge(key: &CtKey, proto: u8, bits: u16, now: u64) {
    if let Some(entry) = lookup(key, now) {
        unsafe {
            let flags = (*entry).flags | bits;
            (*entry).flags = flags;
            (*entry).lifetime_s = lifetime(proto, flags);
        }
    }
}

/// Track a new translated flow: forward entry keyed by the client's tuple,
/// reply entry keyed by the backend's answer. False when the map refused.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    flow: &Flow,
    backend_id: u32,
    rev_nat_id: u16,
    backend_addr_be: u32,
    backend_port_be: u16,
    snat_addr_be: u32,
    now: u64,
    len: u32,
) -> bool {
    let mut flags = state_bits(flow);
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        flags |= ct_flags::SYN_SEEN;
    }
    let lifetime_s = lifetime(flow.proto, flags);
    let forward = CtValue {
        backend_id,
        rev_nat_id,
        flags,
        nat_addr_be: backend_addr_be,
        nat_port_be: backend_port_be,
        tcp_flags_seen: flow.tcp_flags,
        created_ns: now,
        last_seen_ns: now,
        lifetime_s,
        snat_addr_be,
        packets: 1,
        bytes: len as u64,
        ..Default::default()
    };
    // With hairpin SNAT the backend answers the SNAT address, and the reply
    // entry remembers the real client to restore.
    let (reply_dst, restore) = if snat_addr_be != 0 {
        (snat_addr_be, flow.src_be)
    } else {
        (flow.src_be, 0)
    };
    let reply_key = CtKey {
        src_addr_be: backend_addr_be,
        dst_addr_be: reply_dst,
        src_port_be: backend_port_be,
        dst_port_be: flow.sport_be,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = CtValue {
        backend_id,
        rev_nat_id,
        flags,
        nat_addr_be: flow.dst_be,
        nat_port_be: flow.dport_be,
        created_ns: now,
        last_seen_ns: now,
        lifetime_s,
        snat_addr_be: restore,
        ..Default::default()
    };
    // Reply first: a forward entry must never exist without its way back.
    LB_CT.insert(reply_key, reply, BPF_ANY as u64).is_ok()
        && LB_CT
            .insert(forward_key(flow), forward, BPF_ANY as u64)
            .is_ok()
}

/// The reply key of a forward entry, and the forward key of a reply entry.
#[inline(always)]
pub fn peer_key(flow: &Flow, entry: &CtValue, dir: u8) -> CtKey {
    if dir == CT_DIR_FORWARD {
        let client = if entry.snat_addr_be != 0 {
            entry.snat_addr_be
        } else {
            flow.src_be
        };
        CtKey {
            src_addr_be: entry.nat_addr_be,
            dst_addr_be: client,
            src_port_be: entry.nat_port_be,
            dst_port_be: flow.sport_be,
            proto: flow.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        }
    } else {
        let client = if entry.snat_addr_be != 0 {
            entry.snat_addr_be
        } else {
            flow.dst_be
        };
        CtKey {
            src_addr_be: client,
            dst_addr_be: entry.nat_addr_be,
            src_port_be: flow.dport_be,
            dst_port_be: entry.nat_port_be,
            proto: flow.proto,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        }
    }
}
