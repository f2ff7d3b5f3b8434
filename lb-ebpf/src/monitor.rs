//! Events for `lb-agent monitor`: drops, refusals, translated ICMP errors
//! and (when asked) new flows, into the `LB_EVENTS` ring buffer. Nothing
//! is built unless a monitor set `LB_MONITOR`: a site pays one inlined
//! array read and a branch, and every site but new flows is a cold path.

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

/// Write one event (callers check `wanted` first). A full ring buffer
/// loses the event: the monitor counts what it missed by the counters.
#[inline(never)]
pub fn emit(what: u64, flow: &Flow, backend_be: &Addr, rev_nat_id: u32, ifindex: u32) {
    let Some(mut entry) = LB_EVENTS.reserve::<MonitorEvent>(0) else {
        return;
    };
    // Written whole in the reserved record: no 68-byte copy on the stack.
    entry.write(MonitorEvent {
        src_be: flow.src_be,
        dst_be: flow.dst_be,
        backend_be: *backend_be,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        backend_port_be: (what >> 40) as u16,
        kind: what as u8,
        reason: (what >> 8) as u8,
        proto: flow.proto,
        scope: (what >> 16) as u8,
        icmp_type: (what >> 24) as u8,
        icmp_code: (what >> 32) as u8,
        ifindex,
        rev_nat_id,
    });
    entry.submit(0);
}
