//! Socket-level load balancing (cgroup sock_addr programs on the root
//! cgroup): connect() and sendmsg() to a frontend are sent to a backend
//! before a packet exists, so the node's own processes reach Services without
//! per-packet NAT; recvmsg() and getpeername() show the Service address again.
//!
//! These programs see every socket of the machine. They return at once for
//! sockets outside the node's network namespace (the agent's, by netns
//! cookie) unless the agent widened them to all namespaces.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Addr, AffinityValue, BACKEND_ACTIVE, BackendSetValue, IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL,
    SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, ServiceKey, ServiceValue, SockAffinityKey, SockNatKey,
    SockNatValue, config_flags, service_flags, stat,
};

use crate::{
    lb::{affinity_backend, backend_set, pick_backend},
    maps::{LB_BACKENDS, LB_CONFIG, LB_REV_NAT, LB_SERVICES, LB_SOCK_AFFINITY, LB_SOCK_NAT, count},
};

/// sock_addr verdicts: let the call proceed, or fail it (with the errno set
/// by bpf_set_retval, EPERM otherwise).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// The socket's protocol, if the programs should look at it at all: TCP or
/// UDP in the namespace(s) the agent asked for.
#[inline(always)]
fn socket_protocol(ctx: &SockAddrContext) -> Option<u8> {
    let config = LB_CONFIG.get(0)?;
    if config.flags & config_flags::SOCKET_LB == 0 {
        return None;
    }
    if config.flags & config_flags::SOCKET_LB_ALL_NETNS == 0
        && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.netns_cookie
    {
        return None;
    }
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(proto)
}

/// Which hook family a program serves: `*4` hooks carry `user_ip4`, `*6`
/// hooks `user_ip6` (where an IPv4-mapped address reaches IPv4 Services).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[inline(always)]
fn user_addr(sa: *mut bpf_sock_addr, family: Family) -> (Addr, u16) {
    // user_port holds the port in network order in its low 16 bits.
    unsafe {
        let addr = match family {
            Family::V4 => Addr::v4((*sa).user_ip4),
            Family::V6 => Addr {
                be: [
                    (*sa).user_ip6[0],
                    (*sa).user_ip6[1],
                    (*sa).user_ip6[2],
                    (*sa).user_ip6[3],
                ],
            },
        };
        (addr, (*sa).user_port as u16)
    }
}

/// Write the address back; false when it cannot be expressed in this
/// family (an IPv6 backend for an IPv4 hook never comes from the agent).
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, family: Family, addr: Addr, port_be: u16) -> bool {
    unsafe {
        match family {
            Family::V4 => {
                if !addr.is_v4() {
                    return false;
                }
                (*sa).user_ip4 = addr.v4_be();
            }
            Family::V6 => {
                (*sa).user_ip6[0] = addr.be[0];
                (*sa).user_ip6[1] = addr.be[1];
                (*sa).user_ip6[2] = addr.be[2];
                (*sa).user_ip6[3] = addr.be[3];
            }
        }
        (*sa).user_port = port_be as u32;
    }
    true
}

/// connect() (TCP and UDP) and sendmsg() (unconnected UDP) to a frontend.
#[inline(always)]
pub fn translate_forward(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(proto) = socket_protocol(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let (addr_be, port_be) = user_addr(sa, family);
    let key = ServiceKey {
        addr_be,
        port_be,
        proto,
        // The node's own traffic is in-cluster traffic (internalTrafficPolicy).
        scope: SCOPE_INTERNAL,
        _pad: 0,
    };
    let Some(frontend) = (unsafe { LB_SERVICES.get(key) }).copied() else {
        return undeclared_port(addr_be);
    };
    let Some(set) = backend_set(&frontend) else {
        // An impossible state, counted: leave the call alone.
        return ALLOW;
    };
    if set.count == 0 {
        let errno = if frontend.flags & service_flags::DROP_IF_EMPTY != 0 {
            EHOSTUNREACH
        } else {
            ECONNREFUSED
        };
        return refuse(errno);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let forward_key = SockNatKey {
        socket_cookie: cookie,
        addr_be,
        port_be,
        proto,
        dir: SOCK_DIR_FORWARD,
        _pad: 0,
    };
    let now = crate::ct::now();
    // A socket that already talks to this frontend keeps its backend while
    // that backend takes flows (UDP sendmsg() per datagram, or a reconnect).
    // The id must still name the same address: ids of removed backends are
    // reused, and the reverse entry is keyed by the address.
    let kept = unsafe { LB_SOCK_NAT.get(forward_key) }.and_then(|entry| {
        let backend = unsafe { LB_BACKENDS.get(entry.backend_id) }?;
        (backend.state == BACKEND_ACTIVE
            && entry.rev_nat_id == frontend.rev_nat_id
            && backend.addr_be == entry.addr_be
            && backend.port_be == entry.port_be)
            .then_some((entry.backend_id, *backend))
    });
    let chosen = match kept {
        Some(chosen) => Some(chosen),
        None => select(ctx, &frontend, &set, now),
    };
    let Some((backend_id, backend)) = chosen else {
        // An impossible state, counted by the selection: leave the call alone.
        return ALLOW;
    };
    if kept.is_none() {
        let forward = SockNatValue {
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            _pad: 0,
            rev_nat_id: frontend.rev_nat_id,
            backend_id,
        };
        let reverse_key = SockNatKey {
            socket_cookie: cookie,
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            proto,
            dir: SOCK_DIR_REVERSE,
            _pad: 0,
        };
        let reverse = SockNatValue {
            addr_be,
            port_be,
            _pad: 0,
            rev_nat_id: frontend.rev_nat_id,
            backend_id,
        };
        // Reverse first: a datagram may come back before sendmsg() returns.
        // LRU maps evict the oldest socket when full; nothing to count.
        let _ = LB_SOCK_NAT.insert(reverse_key, reverse, 0);
        let _ = LB_SOCK_NAT.insert(forward_key, forward, 0);
    }
    if set_user_addr(sa, family, backend.addr_be, backend.port_be) {
        count(stat::SOCK_TRANSLATED);
    }
    ALLOW
}

/// A Service IP on a port it does not declare is refused, as the packet
/// path does; any other address is none of ours.
#[inline(always)]
fn undeclared_port(addr_be: Addr) -> i32 {
    let address_key = ServiceKey {
        addr_be,
        port_be: 0,
        proto: 0,
        scope: SCOPE_INTERNAL,
        _pad: 0,
    };
    match unsafe { LB_SERVICES.get(address_key) } {
        Some(address) if address.flags & service_flags::ADDRESS_ONLY != 0 => refuse(ECONNREFUSED),
        _ => ALLOW,
    }
}

/// Fail the call with `errno`: the socket's owner learns at once, as a TCP
/// client learns from the RST the packet path would send.
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    unsafe { bpf_set_retval(-errno) };
    count(stat::SOCK_REFUSED);
    DENY
}

/// A backend for a socket: the namespace's affinity backend while fresh and
/// active, else the slots (or Maglev table).
#[inline(always)]
fn select(
    ctx: &SockAddrContext,
    frontend: &ServiceValue,
    set: &BackendSetValue,
    now: u64,
) -> Option<(u32, lb_common::BackendValue)> {
    let affinity = frontend.flags & service_flags::AFFINITY != 0;
    let affinity_key = SockAffinityKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        rev_nat_id: frontend.rev_nat_id,
        _pad: 0,
    };
    if affinity
        && let Some(entry) = unsafe { LB_SOCK_AFFINITY.get(affinity_key) }
        && let Some(chosen) = affinity_backend(entry, frontend, now)
    {
        remember(&affinity_key, chosen.0, now);
        return Some(chosen);
    }
    // No packet tuple to hash yet: Maglev's index is random here, which is
    // all a new connection from this node needs.
    let chosen = pick_backend(frontend, set, || unsafe { bpf_get_prandom_u32() })?;
    if affinity {
        remember(&affinity_key, chosen.0, now);
    }
    Some(chosen)
}

#[inline(always)]
fn remember(key: &SockAffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = LB_SOCK_AFFINITY.insert(key, value, 0);
}

/// recvmsg() (a datagram's source) and getpeername() (the connected peer):
/// a backend this socket was sent to shows as the frontend it asked for,
/// while that frontend still exists.
#[inline(always)]
pub fn translate_reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let Some(proto) = socket_protocol(ctx) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    let (addr_be, port_be) = user_addr(sa, family);
    let key = SockNatKey {
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr_be,
        port_be,
        proto,
        dir: SOCK_DIR_REVERSE,
        _pad: 0,
    };
    let Some(entry) = (unsafe { LB_SOCK_NAT.get(key) }) else {
        return ALLOW;
    };
    let frontend_alive = unsafe { LB_REV_NAT.get(entry.rev_nat_id) }
        .is_some_and(|f| f.addr_be == entry.addr_be && f.port_be == entry.port_be);
    if frontend_alive && set_user_addr(sa, family, entry.addr_be, entry.port_be) {
        count(stat::SOCK_REV_TRANSLATED);
    }
    ALLOW
}
