//! Events for `lb-agent monitor`: drops, refusals, translated ICMP errors
//! and (when asked) new flows, into the `LB_EVENTS` ring buffer. Nothing
//! is built unless a monitor set `LB_MONITOR`: a site pays one inlined
//! array read and a branch, and every site but new flows is a cold path.

use core::ptr::addr_of_mut;

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Addr, MonitorEvent, event_kind};

use crate::{
    maps::{LB_EVENTS, LB_MONITOR},
    parse::Flow,
};

/// Whether a monitor asks for events of `kind`.
#[inline(always)]
pub fn wanted(kind: u8) -> bool {
    LB_MONITOR
        .get(0)
        .is_some_and(|m| m.kinds & (1 << kind) != 0)
}

/// Whether this new flow is reported: new flows are asked for, and the
/// sample (one in `sample`) takes this one.
#[inline(always)]
pub fn new_flow_wanted() -> bool {
    let Some(m) = LB_MONITOR.get(0) else {
        return false;
    };
    if m.kinds & (1 << event_kind::NEW) == 0 {
        return false;
    }
    m.sample <= 1 || unsafe { bpf_get_prandom_u32() } % m.sample == 0
}

/// What an event is, packed into one argument (a BPF function takes five):
/// kind, reason, scope, ICMP type and code, and the backend's port
/// (network order).
#[inline(always)]
pub fn what(kind: u8, reason: u8, scope: u8) -> u64 {
    kind as u64 | (reason as u64) << 8 | (scope as u64) << 16
}

#[inline(always)]
pub fn with_icmp(what: u64, icmp_type: u8, icmp_code: u8) -> u64 {
    what | (icmp_type as u64) << 24 | (icmp_code as u64) << 32
}

#[inline(always)]
pub fn with_backend_port(what: u64, port_be: u16) -> u64 {
    what | (port_be as u64) << 40
}

/// The rev-NAT id and ifindex as `emit` takes them: one argument.
#[inline(always)]
pub fn ids(rev_nat_id: u32, ifindex: u32) -> u64 {
    rev_nat_id as u64 | (ifindex as u64) << 32
}

/// Write one event (callers check `wanted` first). A full ring buffer
/// loses the event (counted `monitor_events_lost`).
///
/// Field by field into the reserved record, never through the stack: this
/// frame adds to the deepest callers' (ICMP error translation, refusals),
/// which leave it nothing of the 512. Four arguments, so all four stay in
/// the registers a helper call keeps (r6-r9): no spill, no frame.
#[inline(never)]
pub fn emit(what: u64, flow: &Flow, backend_be: &Addr, ids: u64) {
    let Some(mut entry) = LB_EVENTS.reserve::<MonitorEvent>(0) else {
        // Full: the monitor reads slower than events come; counted so it
        // can say how many it missed.
        crate::maps::count(lb_common::stat::MONITOR_EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved record, `size_of::<MonitorEvent>()` bytes.
    unsafe {
        addr_of_mut!((*e).src_be).write(flow.src_be);
        addr_of_mut!((*e).dst_be).write(flow.dst_be);
        addr_of_mut!((*e).backend_be).write(*backend_be);
        addr_of_mut!((*e).sport_be).write(flow.sport_be);
        addr_of_mut!((*e).dport_be).write(flow.dport_be);
        addr_of_mut!((*e).backend_port_be).write((what >> 40) as u16);
        addr_of_mut!((*e).kind).write(what as u8);
        addr_of_mut!((*e).reason).write((what >> 8) as u8);
        addr_of_mut!((*e).proto).write(flow.proto);
        addr_of_mut!((*e).scope).write((what >> 16) as u8);
        addr_of_mut!((*e).icmp_type).write((what >> 24) as u8);
        addr_of_mut!((*e).icmp_code).write((what >> 32) as u8);
        addr_of_mut!((*e).ifindex).write((ids >> 32) as u32);
        addr_of_mut!((*e).rev_nat_id).write(ids as u32);
    }
    entry.submit(0);
}
