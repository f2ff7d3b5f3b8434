//! Conntrack: a forward entry (client -> frontend) pins the flow's backend, a
//! reply entry (backend -> client) names the frontend to translate back to.
//! Entries age by protocol state; a dead entry reads as absent.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use lb_common::{
    Addr, BACKEND_STANDBY, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CtKey, CtValue,
    IPPROTO_SCTP, IPPROTO_TCP, config_flags, ct_flags, ct_lifetime,
};

use crate::{
    maps::{LB_CONFIG, LB_CT_KEY_SCRATCH, LB_CT_OTHER, LB_CT_SCRATCH, LB_CT_TCP},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub const NS_PER_SEC: u64 = 1_000_000_000;

/// `Addr::NONE` as a value LLVM cannot see is zero: a 16-byte zero store
/// becomes, for BPF, a call to a memset storing a byte per iteration; a
/// copy of this stays four word stores.
#[inline(always)]
pub fn no_addr() -> Addr {
    let zero = core::hint::black_box(0u32);
    Addr {
        be: [zero, zero, zero, zero],
    }
}

/// The datapath's clock: CLOCK_MONOTONIC at tick resolution. Every time lb
/// keeps (conntrack, affinity) counts in seconds, and the coarse clock is a
/// read of the last tick's time where the precise one reads the TSC and
/// scales it (about a tenth of an established packet's cost). The agent
/// reads CLOCK_MONOTONIC, which the coarse clock trails by under a tick.
#[inline(always)]
pub fn now() -> u64 {
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
}

/// The entry of `key` in its protocol's conntrack map.
#[inline(always)]
pub fn entry_ptr(key: &CtKey) -> Option<*mut CtValue> {
    if key.proto == IPPROTO_TCP {
        LB_CT_TCP.get_ptr_mut(key)
    } else {
        LB_CT_OTHER.get_ptr_mut(key)
    }
}

/// Insert into `key`'s protocol's conntrack map.
#[inline(always)]
pub fn insert(key: &CtKey, value: &CtValue, flags: u32) -> bool {
    let result = if key.proto == IPPROTO_TCP {
        LB_CT_TCP.insert(key, value, flags as u64)
    } else {
        LB_CT_OTHER.insert(key, value, flags as u64)
    };
    result.is_ok()
}

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

/// Lifetime of an entry in seconds from its state flags (shared by both
/// directions of a flow). One FIN half-closes: the other side may go on.
#[inline(always)]
pub fn lifetime(proto: u8, flags: u16) -> u32 {
    if proto != IPPROTO_TCP {
        if flags & ct_flags::REPLY_SEEN != 0 {
            ct_lifetime::OTHER_REPLIED
        } else {
            ct_lifetime::OTHER_UNREPLIED
        }
    } else if flags & ct_flags::RST_SEEN != 0 {
        ct_lifetime::TCP_CLOSED
    } else if flags & ct_flags::ANY_FIN == ct_flags::ANY_FIN
        || (flags & (ct_flags::DSR | ct_flags::DSR_LEARNT) != 0 && flags & ct_flags::ANY_FIN != 0)
    {
        // A DSR entry sees one side only: its FIN ends the connection.
        ct_lifetime::TCP_TIME_WAIT
    } else if flags & ct_flags::ANY_FIN != 0 {
        ct_lifetime::TCP_HALF_CLOSED
    } else if flags & ct_flags::REPLY_SEEN != 0 {
        ct_lifetime::TCP_ESTABLISHED
    } else {
        ct_lifetime::TCP_SYN
    }
}

/// A live entry for `key`, or None when absent or aged out.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = entry_ptr(key)?;
    alive(entry, now).then_some(entry)
}

#[inline(always)]
fn alive(entry: *mut CtValue, now: u64) -> bool {
    let (last_seen, lifetime_s) = unsafe { ((*entry).last_seen_ns, (*entry).lifetime_s) };
    now <= last_seen + lifetime_s as u64 * NS_PER_SEC
}

/// Whether a packet must start its flow over instead of following `entry`:
/// UDP to a backend that is terminating (a client reusing its port, like a
/// DNS resolver, must not stay stuck on it), or a fresh SYN on a TCP tuple
/// that was closed (FIN/RST seen): that is a new connection. An SCTP
/// association stays on its terminating endpoint, as a TCP connection does
/// (kube-proxy clears only UDP flows to departing endpoints): moved, it
/// would be aborted.
#[inline(always)]
pub fn restarts(flow: &Flow, entry: &CtValue, backend: &BackendValue) -> bool {
    if flow.proto == IPPROTO_SCTP {
        return false;
    }
    if flow.proto != IPPROTO_TCP {
        return backend.state == BACKEND_STANDBY;
    }
    flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && entry.flags & (ct_flags::ANY_FIN | ct_flags::RST_SEEN) != 0
}

/// Whether a reply entry is a leftover for this packet: a SYN (a SYN-ACK
/// answering a new connection) on a tuple whose translated connection was
/// closed. Translating it would hijack a direct connection that happens to
/// reuse the client port.
#[inline(always)]
pub fn stale_for(flow: &Flow, entry: &CtValue) -> bool {
    flow.proto == IPPROTO_TCP
        && flow.tcp_flags & TCP_SYN != 0
        && entry.flags & (ct_flags::ANY_FIN | ct_flags::RST_SEEN) != 0
}

/// State bits a TCP flag byte adds; a FIN counts for the side that sent
/// it (`dir` is the packet's: forward from the client, reply from the backend).
#[inline(always)]
fn state_bits(flow: &Flow, dir: u8) -> u16 {
    if flow.proto != IPPROTO_TCP {
        return 0;
    }
    let mut bits = 0;
    if flow.tcp_flags & TCP_FIN != 0 {
        bits |= if dir == CT_DIR_FORWARD {
            ct_flags::FIN_SEEN
        } else {
            ct_flags::FIN_REPLY_SEEN
        };
    }
    if flow.tcp_flags & TCP_RST != 0 {
        bits |= ct_flags::RST_SEEN;
    }
    bits
}

/// Account a packet of direction `dir` on `entry`. Returns the state bits
/// that are new, which the caller copies to the other direction's entry.
///
/// The entry is written only when the packet changes what it records (new
/// state bits or TCP flags) or its last-seen second (lifetimes count in
/// seconds), unless `--conntrack-accounting` counts every packet: an
/// entry written by every packet of a busy flow, from several CPUs, is a
/// cache line passed between them per packet.
#[inline(always)]
pub fn observe(entry: *mut CtValue, flow: &Flow, dir: u8, now: u64, len: u32, extra: u16) -> u16 {
    unsafe {
        let old = (*entry).flags;
        let flags = old | state_bits(flow, dir) | extra;
        let tcp_flags_seen = (*entry).tcp_flags_seen | flow.tcp_flags;
        if LB_CONFIG
            .get(0)
            .is_some_and(|c| c.flags & config_flags::CT_ACCOUNTING != 0)
        {
            (*entry).packets += 1;
            (*entry).bytes += len as u64;
        } else if flags == old
            && tcp_flags_seen == (*entry).tcp_flags_seen
            && now / NS_PER_SEC == (*entry).last_seen_ns / NS_PER_SEC
        {
            return 0;
        }
        (*entry).flags = flags;
        (*entry).last_seen_ns = now;
        (*entry).lifetime_s = lifetime(flow.proto, flags);
        (*entry).tcp_flags_seen = tcp_flags_seen;
        flags & !old
    }
}

/// Add state bits learnt from the other direction; with `touch`, the entry
/// also counts as seen now (see `refresh_peer`).
#[inline(always)]
pub fn merge(key: &CtKey, proto: u8, bits: u16, now: u64, touch: bool) {
    if let Some(entry) = lookup(key, now) {
        unsafe {
            let flags = (*entry).flags | bits;
            (*entry).flags = flags;
            (*entry).lifetime_s = lifetime(proto, flags);
            if touch {
                (*entry).last_seen_ns = now;
            }
        }
    }
}

/// The ends a translation writes. A new flow: `addr`/`port` the backend
/// (destination), `other_*` the source written (NONE: no source NAT; a port
/// range allocation sets the port). A reply: `addr`/`port` the frontend
/// (source), `other_*` the client restored as destination (NONE: keep).
#[derive(Default)]
pub struct Nat {
    pub addr_be: Addr,
    pub port_be: u16,
    pub other_addr_be: Addr,
    pub other_port_be: u16,
}

pub enum CreateError {
    /// The map refused an insert: the flow goes on untracked.
    Full,
    /// Every SNAT port tried is taken: the flow cannot be translated.
    NoPort,
}

/// `lookup` reading the clock only when there is an entry: the miss (a
/// packet none of ours) costs no time read. Returns the entry and now.
#[inline(always)]
pub fn lookup_timed(key: &CtKey) -> Option<(*mut CtValue, u64)> {
    let entry = entry_ptr(key)?;
    let now = crate::ct::now();
    alive(entry, now).then_some((entry, now))
}

/// Whether the entry holding the flow's own reply tuple (its own source
/// port, before any from the range) may be replaced: it is free for any
/// flow (`tuple_free`), or it is this very flow's own: the same client
/// tuple to the same frontend, being balanced again. A reply entry lives as
/// long as its flow: a one-way flow renews it (`refresh_peer`).
#[inline(always)]
fn reusable(key: &CtKey, flow: &Flow, now: u64) -> bool {
    match entry_ptr(key) {
        None => true,
        Some(entry) => {
            let entry_ref = unsafe { &*entry };
            // The key's destination is the flow's source (or its SNAT
            // address, restoring the flow's source).
            let own = entry_ref.nat_addr_be == flow.dst_be
                && entry_ref.nat_port_be == flow.dport_be
                && (entry_ref.snat_addr_be.is_none()
                    || (entry_ref.snat_addr_be == flow.src_be
                        && entry_ref.snat_port_be == flow.sport_be));
            own || tuple_free(key, now)
        }
    }
}

/// Account a packet of a tracked flow in direction `dir`: its entry
/// records it, and the flow's other entry learns what changed (new state
/// bits) or is renewed (`refresh_peer`).
#[inline(always)]
pub fn account(entry: *mut CtValue, flow: &Flow, dir: u8, now: u64, len: u32, extra: u16) {
    let touch = refresh_peer(flow, unsafe { (*entry).last_seen_ns }, now);
    let new_bits = observe(entry, flow, dir, now, len, extra);
    if new_bits != 0 || touch {
        // Read through the pointer: an entry copied to the stack costs 88 bytes.
        let peer = peer_key(flow, unsafe { &*entry }, dir);
        merge(&peer, flow.proto, new_bits, now, touch);
    }
}

/// Whether a packet must also refresh its flow's other entry: a flow that
/// is not TCP (TCP always answers, with ACKs) may go one way only (a client
/// streaming, or a server pushing), and the silent direction's entry, aging
/// by its own clock, would end the flow (or free its reply tuple, a SNAT
/// port) while it is in use. At most once a second per direction.
#[inline(always)]
pub fn refresh_peer(flow: &Flow, last_seen_ns: u64, now: u64) -> bool {
    flow.proto != IPPROTO_TCP && now / NS_PER_SEC != last_seen_ns / NS_PER_SEC
}

/// Random probes for a free SNAT port before giving up. With the default
/// 4,536 ports and half of them in use towards one backend, all 16 collide
/// with probability 2^-16.
const SNAT_TRIES: u32 = 16;

/// What `create` records besides the NAT: the flow's backend and
/// frontend, whether a source port must be allocated at once (external flows
/// source-NATed to the node), the clock and the first packet's length.
pub struct NewFlow {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub allocate: bool,
    /// Direct server return: the answers go from the backend's node to the
    /// client, never here; no reply entry, and the forward entry says so.
    pub direct: bool,
    pub now: u64,
    pub len: u32,
}

/// Track a new translated flow: forward entry keyed by the client's tuple,
/// reply entry keyed by the backend's answer. A reply entry is inserted only
/// if its tuple is free (or dead, or reset, or this flow's own): two live
/// flows never share one. With `allocate` the source port comes from the
/// range at once; otherwise the client's port is kept unless its reply tuple
/// is taken (one client port to two Services sharing a backend ip:port, as
/// Linux hands out), and then, as netfilter does, the flow gets a source
/// port from the range (`nat.other_addr_be` is set to the source address,
/// unchanged, so the reply path restores the port).
/// `nat.other_port_be` is set to the port taken.
/// Both entries are built in a per-CPU scratch map: two IPv6-sized entries
/// on the stack would not fit the 512-byte frame. (References on purpose:
/// passing the values themselves would copy them back onto the stack.)
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn create(flow: &Flow, new: &NewFlow, nat: &mut Nat) -> Result<(), CreateError> {
    let (Some(reply), Some(forward), Some(reply_key)) = (
        LB_CT_SCRATCH.get_ptr_mut(0),
        LB_CT_SCRATCH.get_ptr_mut(1),
        LB_CT_KEY_SCRATCH.get_ptr_mut(0),
    ) else {
        return Err(CreateError::Full);
    };
    let mut flags = state_bits(flow, CT_DIR_FORWARD);
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        flags |= ct_flags::SYN_SEEN;
    }
    let lifetime_s = lifetime(flow.proto, flags);
    // With SNAT the backend answers the SNAT address, and the reply entry
    // remembers the real client to restore.
    let (reply_dst, restore_addr, restore_port) = if !nat.other_addr_be.is_none() {
        (nat.other_addr_be, flow.src_be, flow.sport_be)
    } else {
        (flow.src_be, no_addr(), 0)
    };
    // The key's raw pointer: `lb_ct_snat_search` writes the port it takes
    // through its own, and it is read back through this one.
    let key_ptr = reply_key;
    // SAFETY: per-CPU scratch slots, ours for the length of this program run.
    let (reply, forward, reply_key) = unsafe { (&mut *reply, &mut *forward, &mut *reply_key) };
    reply_key.src_addr_be = nat.addr_be;
    reply_key.dst_addr_be = reply_dst;
    reply_key.src_port_be = nat.port_be;
    reply_key.dst_port_be = nat.other_port_be;
    reply_key.proto = flow.proto;
    reply_key.dir = CT_DIR_REPLY;
    reply_key._pad = [0; 2];
    reply.backend_id = new.backend_id;
    reply.rev_nat_id = new.rev_nat_id;
    reply.flags = flags;
    reply.nat_addr_be = flow.dst_be;
    reply.nat_port_be = flow.dport_be;
    reply.tcp_flags_seen = 0;
    reply.created_ns = new.now;
    reply.last_seen_ns = new.now;
    reply.lifetime_s = lifetime_s;
    reply.snat_addr_be = restore_addr;
    reply.snat_port_be = restore_port;
    // Zero the LLVM cannot see, for the reason `no_addr` says.
    let zero = core::hint::black_box(0u64);
    reply.packets = zero;
    reply.bytes = zero;
    // Reply first: a forward entry must never exist without its way back.
    if new.direct {
        // No answer comes here: the second entry is keyed by the packet as
        // it leaves for the backend's node (client -> backend), for the
        // egress program to find and put the frontend into (`dsr.rs`). The
        // client's port is kept: the backend's node answers it directly.
        flags |= ct_flags::DSR;
        reply.flags = flags;
        reply_key.src_addr_be = flow.src_be;
        reply_key.dst_addr_be = nat.addr_be;
        reply_key.src_port_be = flow.sport_be;
        reply_key.dst_port_be = nat.port_be;
    }
    let taken = if new.direct {
        insert(reply_key, reply, BPF_ANY)
    } else {
        !new.allocate
            && (insert(reply_key, reply, BPF_NOEXIST)
                || (reusable(reply_key, flow, new.now) && insert(reply_key, reply, BPF_ANY)))
    };
    if new.direct && !taken {
        return Err(CreateError::Full);
    }
    if !taken {
        // Source ports come from the configured SNAT range.
        if nat.other_addr_be.is_none() {
            // A clash on the client's own tuple: only its port changes.
            nat.other_addr_be = flow.src_be;
            reply.snat_addr_be = flow.src_be;
            reply.snat_port_be = flow.sport_be;
        }
        if lb_ct_snat_search() == 0 {
            return Err(CreateError::NoPort);
        }
    }
    if !new.direct {
        // SAFETY: the scratch key, written last by this run (here or by
        // `lb_ct_snat_search`); read through the raw pointer, not the
        // reference held across that call.
        nat.other_port_be = unsafe { core::ptr::read_volatile(&raw const (*key_ptr).dst_port_be) };
    }
    forward.backend_id = new.backend_id;
    forward.rev_nat_id = new.rev_nat_id;
    forward.flags = flags;
    forward.nat_addr_be = nat.addr_be;
    forward.nat_port_be = nat.port_be;
    forward.tcp_flags_seen = flow.tcp_flags;
    forward.created_ns = new.now;
    forward.last_seen_ns = new.now;
    forward.lifetime_s = lifetime_s;
    forward.snat_addr_be = nat.other_addr_be;
    forward.snat_port_be = nat.other_port_be;
    forward.packets = 1;
    forward.bytes = new.len as u64;
    if insert(&forward_key(flow), forward, BPF_ANY) {
        Ok(())
    } else {
        Err(CreateError::Full)
    }
}

/// The SNAT port search of `create`: up to `SNAT_TRIES` random ports of
/// the configured range for the reply entry built in the scratch slots
/// (`LB_CT_KEY_SCRATCH[0]`, `LB_CT_SCRATCH[0]`); the key keeps the port
/// taken. Returns 1 when one was taken, 0 when none was free.
///
/// A global BPF function (no arguments, its state in the scratch maps and
/// the config): the verifier checks its probes once, not again for every
/// packet shape that starts a flow; inline they were a third of a node
/// program's verification.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_ct_snat_search() -> u32 {
    // Only the probe count lives across the helper calls: the range, the
    // clock (the scratch entry's creation time) and the scratch slots are
    // read again per probe, so nothing is spilled. This frame adds to
    // `forward`'s, which leaves it 16 bytes of the call chain's 512.
    for _ in 0..SNAT_TRIES {
        let Some((port_min, port_max)) = LB_CONFIG
            .get(0)
            .map(|c| (c.snat_port_min as u32, c.snat_port_max as u32))
        else {
            return 0;
        };
        if port_max == 0 || port_max < port_min {
            return 0;
        }
        let port = port_min + unsafe { bpf_get_prandom_u32() } % (port_max - port_min + 1);
        let Some(reply_key) = LB_CT_KEY_SCRATCH.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: per-CPU scratch slots, ours for the length of this run.
        unsafe { (*reply_key).dst_port_be = (port as u16).to_be() };
        if scratch_insert(BPF_NOEXIST) || (scratch_tuple_free() && scratch_insert(BPF_ANY)) {
            return 1;
        }
    }
    0
}

/// Insert the scratch reply entry under the scratch key.
#[inline(always)]
fn scratch_insert(flags: u32) -> bool {
    match (LB_CT_KEY_SCRATCH.get_ptr(0), LB_CT_SCRATCH.get_ptr(0)) {
        // SAFETY: per-CPU scratch slots, ours for the length of this run.
        (Some(key), Some(value)) => insert(unsafe { &*key }, unsafe { &*value }, flags),
        _ => false,
    }
}

/// `tuple_free` for the scratch key, at the scratch entry's creation time.
#[inline(always)]
fn scratch_tuple_free() -> bool {
    match (LB_CT_KEY_SCRATCH.get_ptr(0), LB_CT_SCRATCH.get_ptr(0)) {
        // SAFETY: per-CPU scratch slots, ours for the length of this run.
        (Some(key), Some(value)) => tuple_free(unsafe { &*key }, unsafe { (*value).created_ns }),
        _ => false,
    }
}

/// Whether a reply tuple is free for a new flow: no entry holds it, or the
/// one that does is dead, or its connection was closed (reset, or FINs both
/// ways: netfilter's NAT reuses TIME_WAIT / CLOSE tuples too; with a few
/// thousand SNAT ports per backend, 120 s of TIME_WAIT would cap new
/// connections).
#[inline(always)]
pub fn tuple_free(key: &CtKey, now: u64) -> bool {
    match entry_ptr(key) {
        None => true,
        Some(entry) => {
            let flags = unsafe { (*entry).flags };
            let closed = (flags & ct_flags::RST_SEEN != 0)
                | (flags & ct_flags::ANY_FIN == ct_flags::ANY_FIN);
            closed || !alive(entry, now)
        }
    }
}

/// The reply key of a forward entry, and the forward key of a reply entry.
#[inline(always)]
pub fn peer_key(flow: &Flow, entry: &CtValue, dir: u8) -> CtKey {
    if dir == CT_DIR_FORWARD {
        let (client, client_port) = if !entry.snat_addr_be.is_none() {
            (entry.snat_addr_be, entry.snat_port_be)
        } else {
            (flow.src_be, flow.sport_be)
        };
        CtKey {
            src_addr_be: entry.nat_addr_be,
            dst_addr_be: client,
            src_port_be: entry.nat_port_be,
            dst_port_be: client_port,
            proto: flow.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        }
    } else {
        let (client, client_port) = if !entry.snat_addr_be.is_none() {
            (entry.snat_addr_be, entry.snat_port_be)
        } else {
            (flow.dst_be, flow.dport_be)
        };
        CtKey {
            src_addr_be: client,
            dst_addr_be: entry.nat_addr_be,
            src_port_be: client_port,
            dst_port_be: entry.nat_port_be,
            proto: flow.proto,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        }
    }
}
