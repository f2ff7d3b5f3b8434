//! Service translation: frontend lookup, backend selection, conntrack, and
//! the reverse translation of replies. Shared by the tc and XDP programs.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use lb_common::{
    Addr, AffinityKey, AffinityValue, BACKEND_ACTIVE, BackendSetValue, BackendSlotKey,
    BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, IPPROTO_TCP, IPPROTO_UDP, MaglevKey,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SOCK_DIR_REVERSE, ServiceKey, ServiceValue, SetMemberKey,
    SockNatKey, SourceRange, backend_flags, config_flags, ct_flags, event_kind, event_reason,
    service_flags, stat,
};

use crate::{
    ct::{self, CreateError, Nat, NewFlow},
    dsr, icmp_error,
    maps::{
        LB_AFFINITY, LB_ALLOCATED, LB_BACKEND_SETS, LB_BACKEND_SLOTS, LB_BACKENDS, LB_CONFIG,
        LB_MAGLEV, LB_PREFILTER4, LB_PREFILTER6, LB_SERVICES, LB_SET_MEMBERS, LB_SOCK_NAT,
        LB_SOURCE_RANGES, ServiceCount, count, count_service, in_service_cidr4, in_service_cidr6,
    },
    monitor,
    nat::{self, End},
    packet::{Packet, Routed},
    parse::{self, Echo, FRAG_FIRST, FRAG_NONE, Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reject,
};

/// Which side of the node a packet came in on, and so what may be done to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod device's ingress: in-cluster traffic (frontends of scope internal).
    Pod,
    /// A node device's ingress: traffic from outside the node (scope external).
    Node,
    /// Replies only: a pod device's egress (the last hop before the client
    /// pod, whatever path the reply took) and the ingress of every other
    /// device (a second NIC, an overlay, a tunnel, bringing replies to the
    /// node's SNAT address). Nothing is balanced or refused here.
    Reply,
    /// Egress of every device that is not a pod device: replies (answers of
    /// the node's own sockets, hostNetwork endpoints, to outside clients),
    /// and connections of the node's sockets bound to a Service address
    /// (socket-level LB has sent them to a backend with that address as
    /// source, which only this node can answer for): masqueraded.
    NodeOut,
}

impl Origin {
    #[inline(always)]
    fn scope(self) -> u8 {
        match self {
            Origin::Node => SCOPE_EXTERNAL,
            Origin::Pod | Origin::Reply | Origin::NodeOut => SCOPE_INTERNAL,
        }
    }

    /// Programs that balance nothing: replies (and masquerade) only.
    #[inline(always)]
    fn replies_only(self) -> bool {
        matches!(self, Origin::Reply | Origin::NodeOut)
    }
}

/// Where a translated packet goes: the ends to write (see `Nat`), which
/// end `nat.addr` replaces, and the counter of a successful translation.
/// Lives in `process`'s frame; `forward` and `ct::create` fill it in place.
pub struct Rewrite {
    nat: Nat,
    /// The end `nat.addr_be` replaces: destination (forward) or source (reply).
    end: End,
    verdict: u32,
}

/// What `forward` and `reply` return when the packet is to be rewritten as
/// their `Rewrite` says, or refused (RST / ICMP unreachable); anything else
/// is the program's verdict.
const REWRITE: i32 = i32::MIN;
const REFUSE: i32 = i32::MIN + 1;
/// No reply entry on a node egress: maybe a node socket's connection to
/// masquerade (`masquerade_out`).
const MASQUERADE_OUT: i32 = i32::MIN + 2;

/// Translate one packet; returns the program verdict.
///
/// Parsing, the forward and reply paths, and the rewrite are each their own
/// BPF function called from here, never from each other: the verifier adds
/// the stack frames along a call chain (512 bytes in all), and IPv6-sized
/// keys inlined into one body do not fit.
#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P, origin: Origin) -> i32 {
    if origin.replies_only()
        && pkt.translated_here()
        && !(origin == Origin::NodeOut && pkt.marked_dsr())
    {
        // Translated on its way in (towards a backend in this pod): not a
        // reply, whatever tuple it carries now.
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    let prefiltered = prefilter(pkt);
    if prefiltered == NONE_OF_OURS {
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    // kube-proxy's nftables mode drops traffic to an unallocated ClusterIP
    // from pods, the node and outside alike; reply-only devices refuse
    // nothing (the node's own sockets' egress does). Decided here, so the
    // answer is not live past this point (the verifier would walk the rest
    // once per value).
    if prefiltered == UNALLOCATED && origin != Origin::Reply {
        return unallocated(pkt, origin.scope());
    }
    // Not zeroed first: for BPF, LLVM zeroes a struct this size with a call
    // to a byte-at-a-time memset (60 iterations per packet). `parse_into`
    // writes all of it for every answer but a stat.
    let mut flow = MaybeUninit::<Flow>::uninit();
    let parsed = parse::parse_into(pkt, &mut flow);
    if parsed < parse::FRAG_UNKNOWN {
        count(parsed);
        return pkt.pass();
    }
    // SAFETY: initialised for every answer but a stat (see `parse_into`).
    let flow = unsafe { flow.assume_init() };

    match parsed {
        parse::FLOW => {}
        parse::ECHO if !origin.replies_only() => return echo_request(pkt, &flow, origin),
        parse::ECHO => {
            count(stat::PASS_OTHER_PROTO);
            return pkt.pass();
        }
        // Errors about replies travel towards backends: only where a flow's
        // forward packets arrive.
        // (The node's egress carries errors about answers too: the node's own.)
        parse::ICMP_ERROR => {
            return icmp_error::translate(pkt, &flow, origin != Origin::Reply, origin.scope());
        }
        _ => return unknown_fragment(pkt, &flow, origin),
    }
    let key = ServiceKey {
        addr_be: flow.dst_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        scope: origin.scope(),
        _pad: 0,
    };
    // Written whole by whichever path returns REWRITE, read only then (not
    // zeroed first, for the same reason as `flow`).
    let mut to = MaybeUninit::<Rewrite>::uninit();
    // The clock is read only where it is needed: not for packets that
    // are none of ours (the common case on a node).
    let frontend = if origin.replies_only() {
        None
    } else {
        unsafe { LB_SERVICES.get(key) }
    };
    let verdict = match frontend {
        Some(frontend) => forward(pkt, &flow, &key, frontend, &mut to),
        None => reply(pkt, &flow, origin, &mut to),
    };
    // Siblings, not nested: each call adds its frame to the chain's.
    let verdict = if verdict == MASQUERADE_OUT {
        masquerade_out(pkt, &flow, &mut to)
    } else {
        verdict
    };
    match verdict {
        // SAFETY: every path returning REWRITE wrote `to` whole.
        REWRITE => translate(pkt, &flow, unsafe { to.assume_init_ref() }),
        // A frontend without endpoints, or an undeclared port of a Service IP.
        REFUSE => match frontend {
            Some(frontend) => refuse(
                pkt,
                &flow,
                event_reason::NO_ENDPOINTS,
                frontend.rev_nat_id,
                origin.scope(),
            ),
            None => refuse(pkt, &flow, event_reason::UNDECLARED_PORT, 0, origin.scope()),
        },
        verdict => verdict,
    }
}

/// The prefilter: a whole TCP or UDP datagram (not a fragment, which may
/// need its first fragment's ports; not ICMP, whose errors quote flows of
/// other addresses) between two addresses that are neither a frontend's
/// nor a backend's, nor to the node's SNAT addresses, can be none of lb's:
/// no frontend, no reply entry (a reply comes from a backend or to an SNAT
/// address), no address entry to refuse, no Service address to masquerade.
/// It leaves after two lookups keyed by one address (IPv4-sized for IPv4)
/// and the Service CIDR test, before the full parse. A destination in a
/// Service CIDR that is not listed is an unallocated ClusterIP (every
/// allocated one is listed): dropped after the parse, which the event
/// needs. Anything else takes the full path.
#[inline(always)]
fn prefilter<P: Packet>(pkt: &P) -> u32 {
    let l3 = pkt.l3_off();
    let Ok(proto_be) = pkt.l3_proto_be() else {
        return OURS;
    };
    let ethertype = u16::from_be(proto_be);
    if ethertype == parse::ETH_P_IP {
        let Ok(ip) = pkt.load_header::<parse::Ipv4Hdr>(l3) else {
            return OURS;
        };
        if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP)
            || u16::from_be(ip.frag_be) & 0x3fff != 0
        {
            return OURS;
        }
        if let Some(config) = LB_CONFIG.get(0) {
            let dst = Addr::v4(ip.dst_be);
            if dst == config.nodeport_snat_addr4 || dst == config.hairpin_snat_addr4 {
                return OURS;
            }
        }
        if unsafe { LB_PREFILTER4.get(ip.dst_be) }.is_some() {
            return OURS;
        }
        // Not listed: in a Service CIDR, no Service holds it unless it is
        // one lb does not serve (see `unallocated`), whoever sends it.
        if in_service_cidr4(ip.dst_be) {
            return UNALLOCATED;
        }
        if unsafe { LB_PREFILTER4.get(ip.src_be) }.is_some() {
            return OURS;
        }
        NONE_OF_OURS
    } else if ethertype == parse::ETH_P_IPV6 {
        let Ok(ip) = pkt.load_header::<parse::Ipv6Hdr>(l3) else {
            return OURS;
        };
        if ip.next_header != IPPROTO_TCP && ip.next_header != IPPROTO_UDP {
            return OURS;
        }
        if let Some(config) = LB_CONFIG.get(0)
            && (ip.dst == config.nodeport_snat_addr6 || ip.dst == config.hairpin_snat_addr6)
        {
            return OURS;
        }
        if unsafe { LB_PREFILTER6.get(ip.dst) }.is_some() {
            return OURS;
        }
        if in_service_cidr6(&ip.dst) {
            return UNALLOCATED;
        }
        if unsafe { LB_PREFILTER6.get(ip.src) }.is_some() {
            return OURS;
        }
        NONE_OF_OURS
    } else {
        OURS
    }
}

/// A TCP or UDP datagram to an unallocated Service IP: dropped, counted,
/// and told to a monitor. The event's tuple is read from the headers the
/// prefilter checked, not by the full parse: a second call site of
/// `parse_into` would have the verifier walk it twice.
///
/// An address a Service lb does not serve holds (another proxy's,
/// `LB_ALLOCATED`) is allocated: none of lb's, passed. Looked up here, off
/// the prefilter's path, which the verifier walks for every packet shape.
#[inline(never)]
fn unallocated<P: Packet>(pkt: &mut P, scope: u8) -> i32 {
    if let Some(dst) = header_dst(pkt)
        && unsafe { LB_ALLOCATED.get(dst) }.is_some()
    {
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    count(stat::DROP_UNALLOCATED);
    if monitor::wanted(event_kind::DROP)
        && let Some(flow) = header_tuple(pkt)
    {
        let what = monitor::what(
            event_kind::DROP,
            event_reason::UNALLOCATED_SERVICE_IP,
            scope,
        );
        let ifindex = pkt.ifindex();
        monitor::emit(what, &flow, &ct::no_addr(), monitor::ids(0, ifindex));
    }
    pkt.drop_verdict()
}

/// The destination address of an IPv4 or IPv6 packet.
#[inline(always)]
fn header_dst<P: Packet>(pkt: &P) -> Option<Addr> {
    let l3 = pkt.l3_off();
    if u16::from_be(pkt.l3_proto_be().ok()?) == parse::ETH_P_IP {
        Some(Addr::v4(pkt.load_header::<parse::Ipv4Hdr>(l3).ok()?.dst_be))
    } else {
        Some(pkt.load_header::<parse::Ipv6Hdr>(l3).ok()?.dst)
    }
}

/// Addresses, ports and protocol of an unfragmented TCP/UDP datagram (the
/// fields an event reads; the rest stay zero).
#[inline(always)]
fn header_tuple<P: Packet>(pkt: &P) -> Option<Flow> {
    let l3 = pkt.l3_off();
    let mut flow = Flow::default();
    let l4 = if u16::from_be(pkt.l3_proto_be().ok()?) == parse::ETH_P_IP {
        let ip = pkt.load_header::<parse::Ipv4Hdr>(l3).ok()?;
        flow.src_be = Addr::v4(ip.src_be);
        flow.dst_be = Addr::v4(ip.dst_be);
        flow.proto = ip.proto;
        l3 + (ip.version_ihl as u32 & 0x0f) * 4
    } else {
        let ip = pkt.load_header::<parse::Ipv6Hdr>(l3).ok()?;
        flow.src_be = ip.src;
        flow.dst_be = ip.dst;
        flow.proto = ip.next_header;
        flow.v6 = true;
        l3 + parse::IP6_HLEN
    };
    let ports = pkt.load_header::<parse::Ports>(l4).ok()?;
    flow.sport_be = ports.src_be;
    flow.dport_be = ports.dst_be;
    Some(flow)
}

/// `prefilter`'s answers: take the full path; none of lb's (pass); a TCP
/// or UDP datagram to an address in a Service CIDR that no Service holds.
const OURS: u32 = 0;
const NONE_OF_OURS: u32 = 1;
const UNALLOCATED: u32 = 2;

/// The entry marking `addr` as a Service address in `scope` (port and
/// protocol 0): pings, undeclared ports and stray fragments consult it.
#[inline(always)]
fn address_key(addr_be: Addr, scope: u8) -> ServiceKey {
    ServiceKey {
        addr_be,
        port_be: 0,
        proto: 0,
        scope,
        _pad: 0,
    }
}

/// A ping. Answered for a Service address with a usable backend, dropped for
/// one without (so it tells the truth), passed for anything else.
// Its own BPF function: its stack frame is not added to the flow path's.
#[inline(never)]
fn echo_request<P: Packet>(pkt: &mut P, flow: &Flow, origin: Origin) -> i32 {
    let echo = &Echo {
        src_be: flow.src_be,
        dst_be: flow.dst_be,
        l3_off: flow.l3_off,
        l4_off: flow.l4_off,
        v6: flow.v6,
    };
    let key = address_key(echo.dst_be, origin.scope());
    let Some(address) = (unsafe { LB_SERVICES.get(key) }) else {
        count(stat::PASS_OTHER_PROTO);
        return pkt.pass();
    };
    let enabled = LB_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::ECHO_REPLY != 0);
    if !enabled {
        count(stat::PASS_OTHER_PROTO);
        return pkt.pass();
    }
    if address.flags & service_flags::ECHO == 0 {
        count(stat::DROP_ECHO);
        dropped(pkt, flow, event_reason::NO_ENDPOINTS, 0, origin.scope());
        return pkt.drop_verdict();
    }
    match reject::echo_reply(pkt, echo) {
        Ok(()) => {
            count(stat::ECHO_REPLY);
            pkt.bounce()
        }
        Err(_) => {
            count(stat::ERR_REJECT_FAILED);
            dropped(pkt, flow, event_reason::REJECT_FAILED, 0, origin.scope());
            pkt.drop_verdict()
        }
    }
}

/// A later fragment whose first fragment was not seen: dropped if it is
/// addressed to a Service address (it could only leak untranslated, and its
/// datagram cannot be completed), passed otherwise (not ours, or a reply we
/// cannot restore).
#[inline(never)]
fn unknown_fragment<P: Packet>(pkt: &mut P, flow: &Flow, origin: Origin) -> i32 {
    let key = address_key(flow.dst_be, origin.scope());
    if !origin.replies_only() && unsafe { LB_SERVICES.get(key) }.is_some() {
        count(stat::DROP_FRAG_NO_FIRST);
        dropped(
            pkt,
            flow,
            event_reason::FRAGMENT_WITHOUT_FIRST,
            0,
            origin.scope(),
        );
        return pkt.drop_verdict();
    }
    count(stat::PASS_FRAGMENT);
    pkt.pass()
}

/// loadBalancerSourceRanges: whether the client may use this frontend address.
#[inline(always)]
fn source_allowed(flow: &Flow) -> bool {
    let key = Key::new(
        256,
        SourceRange {
            frontend_addr_be: flow.dst_be,
            client_addr_be: flow.src_be,
        },
    );
    LB_SOURCE_RANGES.get(key).is_some()
}

/// A packet addressed to a frontend. Its own BPF function (as are `reply`
/// and the answers): inlined together they outgrow the 512-byte stack.
#[inline(never)]
fn forward<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    to: &mut MaybeUninit<Rewrite>,
) -> i32 {
    // One consistent copy: the agent may rewrite the entry meanwhile.
    let frontend = &{ *frontend };
    let origin = if key.scope == SCOPE_EXTERNAL {
        Origin::Node
    } else {
        Origin::Pod
    };
    if frontend.flags & service_flags::SOURCE_RANGES != 0 && !source_allowed(flow) {
        count(stat::DROP_SOURCE_RANGE);
        count_service(frontend.rev_nat_id, ServiceCount::Dropped);
        dropped(
            pkt,
            flow,
            event_reason::SOURCE_RANGE,
            frontend.rev_nat_id,
            key.scope,
        );
        return pkt.drop_verdict();
    }
    let now = crate::ct::now();
    let len = pkt.len();
    let fwd_key = ct::forward_key(flow);
    if let Some(entry) = ct::lookup(&fwd_key, now) {
        let backend_id = unsafe { (*entry).backend_id };
        // Ids are reused: the id must still name the address the flow went to.
        let backend = unsafe { LB_BACKENDS.get(backend_id) }.filter(|b| {
            b.addr_be == unsafe { (*entry).nat_addr_be }
                && b.port_be == unsafe { (*entry).nat_port_be }
        });
        match backend {
            Some(backend) if !ct::restarts(flow, unsafe { &*entry }, backend) => {
                let direct = unsafe { (*entry).flags } & ct_flags::DSR != 0;
                if direct {
                    pkt.mark_dsr();
                }
                to.write(Rewrite {
                    nat: Nat {
                        addr_be: backend.addr_be,
                        port_be: backend.port_be,
                        other_addr_be: unsafe { (*entry).snat_addr_be },
                        other_port_be: unsafe { (*entry).snat_port_be },
                    },
                    end: End::Destination,
                    verdict: stat::ESTABLISHED,
                });
                // A DSR flow's answers never come here: the client going on
                // (past its SYN, or a second datagram) says the flow is up.
                let extra =
                    if direct && (flow.proto != IPPROTO_TCP || flow.tcp_flags & TCP_ACK != 0) {
                        ct_flags::REPLY_SEEN
                    } else {
                        0
                    };
                ct::account(entry, flow, CT_DIR_FORWARD, now, len, extra);
                count_service(
                    frontend.rev_nat_id,
                    ServiceCount::Packet {
                        len,
                        new_flow: false,
                    },
                );
                return REWRITE;
            }
            // The flow no longer fits its entry: balance it again below.
            Some(_) => count(stat::FLOW_RESTARTED),
            // The flow's backend is gone (or its id names another now).
            None => count(stat::BACKEND_REPLACED),
        }
    } else if flow.proto == IPPROTO_TCP && flow.tcp_flags & TCP_SYN == 0 && migrating() {
        // An upgrade has not copied this connection's entry from the
        // previous maps yet: balanced afresh it would reach another
        // backend and be reset; dropped, TCP sends it again.
        count(stat::DROP_MIGRATING);
        count_service(frontend.rev_nat_id, ServiceCount::Dropped);
        dropped(
            pkt,
            flow,
            event_reason::MIGRATING,
            frontend.rev_nat_id,
            key.scope,
        );
        return pkt.drop_verdict();
    }

    let Some(set) = backend_set(frontend) else {
        count_service(frontend.rev_nat_id, ServiceCount::Dropped);
        dropped(
            pkt,
            flow,
            event_reason::BACKEND_MISSING,
            frontend.rev_nat_id,
            key.scope,
        );
        return pkt.drop_verdict();
    };
    if set.count == 0 {
        if frontend.flags & service_flags::DROP_IF_EMPTY != 0 {
            count(stat::DROP_NO_BACKEND);
            count_service(frontend.rev_nat_id, ServiceCount::Dropped);
            dropped(
                pkt,
                flow,
                event_reason::NO_LOCAL_ENDPOINTS,
                frontend.rev_nat_id,
                key.scope,
            );
            return pkt.drop_verdict();
        }
        return REFUSE;
    }
    let Some((backend_id, backend)) = select_backend(flow, frontend, &set, now) else {
        count_service(frontend.rev_nat_id, ServiceCount::Dropped);
        dropped(
            pkt,
            flow,
            event_reason::BACKEND_MISSING,
            frontend.rev_nat_id,
            key.scope,
        );
        return pkt.drop_verdict();
    };
    // Built in the caller's frame: this one is near the stack limit.
    let to = to.write(Rewrite {
        nat: Nat {
            addr_be: backend.addr_be,
            port_be: backend.port_be,
            other_addr_be: ct::no_addr(),
            other_port_be: flow.sport_be,
        },
        end: End::Destination,
        verdict: stat::NEW_FLOW,
    });
    // Direct server return: to another node's backend, from outside, with
    // the client's address kept; that node answers the client itself. The
    // node's egress program adds the frontend to the packet (`dsr.rs`).
    let direct = origin == Origin::Node
        && frontend.flags & service_flags::DSR != 0
        && backend.flags & backend_flags::REMOTE != 0
        && backend.addr_be != flow.src_be;
    if direct {
        pkt.mark_dsr();
    }
    let nat = &mut to.nat;
    let config = LB_CONFIG.get(0);
    let mut allocate = false;
    if backend.addr_be == flow.src_be {
        // Hairpin: the pod would answer itself directly, bypassing the
        // reverse translation. Make the reply come back through us.
        if let Some(config) = config {
            nat.other_addr_be = if flow.v6 {
                config.hairpin_snat_addr6
            } else {
                config.hairpin_snat_addr4
            };
        }
        if !nat.other_addr_be.is_none() {
            count(stat::HAIRPIN);
        }
    } else if !direct
        && (frontend.flags & service_flags::MASQUERADE != 0
            || (origin == Origin::Node && backend.flags & backend_flags::REMOTE != 0))
        && let Some(config) = config
    {
        // Masqueraded as kube-proxy does (policy Cluster, from outside or
        // from pods), or external traffic to another node's backend, whose
        // reply must come back here to be translated: the source becomes
        // this node. Not for a backend on one of the node's addresses (a
        // hostNetwork endpoint): its answer to the node would stay on
        // loopback, where nothing restores it, and netfilter's masquerade
        // does not apply to locally delivered packets either.
        let node = if flow.v6 {
            config.nodeport_snat_addr6
        } else {
            config.nodeport_snat_addr4
        };
        if !node.is_none() && backend.flags & backend_flags::ON_NODE == 0 {
            nat.other_addr_be = node;
            allocate = true;
        }
    }
    let new_flow = NewFlow {
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
        allocate,
        direct,
        now,
        len,
    };
    match ct::create(flow, &new_flow, nat) {
        Ok(()) => {
            if allocate {
                count(stat::NODEPORT_SNAT);
            } else if nat.other_port_be != flow.sport_be {
                count(stat::PORT_REMAPPED);
            }
        }
        Err(CreateError::Full) => count(stat::ERR_CT_FULL),
        Err(CreateError::NoPort) => {
            count(stat::ERR_SNAT_PORTS);
            count_service(frontend.rev_nat_id, ServiceCount::Dropped);
            if monitor::wanted(event_kind::DROP) {
                let what = monitor::what(
                    event_kind::DROP,
                    event_reason::SNAT_PORTS_EXHAUSTED,
                    key.scope,
                );
                let what = monitor::with_backend_port(what, nat.port_be);
                let ifindex = pkt.ifindex();
                monitor::emit(
                    what,
                    flow,
                    &nat.addr_be,
                    monitor::ids(frontend.rev_nat_id, ifindex),
                );
            }
            return pkt.drop_verdict();
        }
    }
    count_service(
        frontend.rev_nat_id,
        ServiceCount::Packet {
            len,
            new_flow: true,
        },
    );
    if monitor::new_flow_wanted() {
        let what = monitor::what(event_kind::NEW, event_reason::NEW_FLOW, key.scope);
        let what = monitor::with_backend_port(what, nat.port_be);
        let ifindex = pkt.ifindex();
        monitor::emit(
            what,
            flow,
            &nat.addr_be,
            monitor::ids(frontend.rev_nat_id, ifindex),
        );
    }
    REWRITE
}

/// The frontend's backend set (a copy: the agent may rewrite it). Counts
/// and returns None on an impossible state (the caller drops).
#[inline(always)]
pub fn backend_set(frontend: &ServiceValue) -> Option<BackendSetValue> {
    let set = unsafe { LB_BACKEND_SETS.get(frontend.backend_set_id) }.copied();
    if set.is_none() {
        count(stat::ERR_SLOT_MISSING);
    }
    set
}

/// Choose the backend of a new flow: the client's affinity backend while it
/// is live and active, else the Maglev table or a random slot. Counts and
/// returns None on an impossible state (the caller drops).
#[inline(always)]
fn select_backend(
    flow: &Flow,
    frontend: &ServiceValue,
    set: &BackendSetValue,
    now: u64,
) -> Option<(u32, BackendValue)> {
    let affinity = frontend.flags & service_flags::AFFINITY != 0;
    let affinity_key = AffinityKey {
        client_addr_be: flow.src_be,
        rev_nat_id: frontend.rev_nat_id,
    };
    if affinity
        && let Some(entry) = unsafe { LB_AFFINITY.get(affinity_key) }
        && let Some(backend) = affinity_backend(entry, frontend, now)
    {
        remember(&affinity_key, backend.0, now);
        return Some(backend);
    }
    let chosen = pick_backend(frontend, set, || flow_hash(flow))?;
    if affinity {
        remember(&affinity_key, chosen.0, now);
    }
    Some(chosen)
}

/// The backend an affinity entry names, if the entry is fresh, the backend
/// is still in the frontend's set and takes new flows (counted as an
/// affinity hit).
#[inline(always)]
pub fn affinity_backend(
    entry: &AffinityValue,
    frontend: &ServiceValue,
    now: u64,
) -> Option<(u32, BackendValue)> {
    let fresh = now.saturating_sub(entry.last_used_ns)
        <= frontend.affinity_timeout_s as u64 * 1_000_000_000;
    if !fresh {
        return None;
    }
    let backend_id = entry.backend_id;
    let member = SetMemberKey {
        set_id: frontend.backend_set_id,
        backend_id,
    };
    unsafe { LB_SET_MEMBERS.get(member) }?;
    let backend = unsafe { LB_BACKENDS.get(backend_id) }?;
    if backend.state != BACKEND_ACTIVE || backend.flags & backend_flags::FALLBACK != 0 {
        return None;
    }
    count(stat::AFFINITY_HIT);
    Some((backend_id, *backend))
}

/// A backend from the set's Maglev table (indexed by `hash`) or a random
/// slot of a set with `count > 0`. Counts and returns None on an impossible
/// state.
#[inline(always)]
pub fn pick_backend(
    frontend: &ServiceValue,
    set: &BackendSetValue,
    hash: impl FnOnce() -> u32,
) -> Option<(u32, BackendValue)> {
    let set_id = frontend.backend_set_id;
    let backend_id = if frontend.flags & service_flags::MAGLEV != 0 && set.maglev_size != 0 {
        let index = hash() % set.maglev_size;
        let Some(id) = (unsafe { LB_MAGLEV.get(MaglevKey { set_id, index }) }) else {
            count(stat::ERR_SLOT_MISSING);
            return None;
        };
        count(stat::MAGLEV);
        *id
    } else {
        let slot = unsafe { bpf_get_prandom_u32() } % set.count;
        let Some(id) = (unsafe { LB_BACKEND_SLOTS.get(BackendSlotKey { set_id, slot }) }) else {
            count(stat::ERR_SLOT_MISSING);
            return None;
        };
        *id
    };
    let Some(backend) = (unsafe { LB_BACKENDS.get(backend_id) }) else {
        count(stat::ERR_BACKEND_MISSING);
        return None;
    };
    Some((backend_id, *backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    // A full LRU evicts the oldest client; nothing to count.
    let _ = LB_AFFINITY.insert(key, value, 0);
}

/// Deterministic hash of the flow's 5-tuple (murmur3's finaliser over the
/// words), so every node's Maglev table sends a flow to the same backend.
#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    let mix = |mut h: u32, k: u32| {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        h
    };
    let mut h = 0x5bd1_e995;
    for i in 0..4 {
        h = mix(h, flow.src_be.be[i]);
        h = mix(h, flow.dst_be.be[i]);
    }
    h = mix(h, (flow.sport_be as u32) << 16 | flow.dport_be as u32);
    h = mix(h, flow.proto as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A packet not addressed to a frontend: a reply of a translated flow, a
/// packet to a Service IP on an undeclared port, or none of ours.
#[inline(never)]
fn reply<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    origin: Origin,
    to: &mut MaybeUninit<Rewrite>,
) -> i32 {
    let key = ct::reply_key(flow);
    let Some((entry, now)) = ct::lookup_timed(&key) else {
        // Another node's DSR flow to a backend here: only where packets
        // from other nodes come in (node devices, other devices), not a
        // pod device's either way (a pod must not choose the source of
        // another pod's answers).
        if matches!(origin, Origin::Node) || (origin == Origin::Reply && !pkt.is_egress()) {
            let base = if flow.v6 { parse::IP6_HLEN } else { 20 };
            if flow.ihl_bytes > base && flow.frag == FRAG_NONE && dsr::learn(pkt, flow) {
                return pkt.pass();
            }
            if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                dsr::client_closing(flow);
            }
        }
        if awaiting_copy(flow) {
            count(stat::DROP_MIGRATING);
            dropped(pkt, flow, event_reason::MIGRATING, 0, origin.scope());
            return pkt.drop_verdict();
        }
        return not_a_frontend(pkt, flow, origin);
    };
    if ct::stale_for(flow, unsafe { &*entry }) {
        // A new connection on the tuple of a closed one (the client reached
        // the backend directly from the same port): not ours to translate.
        return not_a_frontend(pkt, flow, origin);
    }
    if unsafe { (*entry).flags } & ct_flags::DSR != 0 {
        // A DSR flow's packet leaving for the backend's node (the entry is
        // keyed by the translated packet), not an answer.
        return dsr::leaving(pkt, flow, entry, origin == Origin::NodeOut, now);
    }
    let first_reply = unsafe { (*entry).flags } & ct_flags::REPLY_SEEN == 0;
    let extra = if first_reply { ct_flags::REPLY_SEEN } else { 0 };
    ct::account(entry, flow, CT_DIR_REPLY, now, pkt.len(), extra);
    // Read through the pointer: an entry copied to the stack costs 88 bytes.
    let entry = unsafe { &*entry };
    to.write(Rewrite {
        nat: Nat {
            addr_be: entry.nat_addr_be,
            port_be: entry.nat_port_be,
            other_addr_be: entry.snat_addr_be,
            other_port_be: entry.snat_port_be,
        },
        end: End::Source,
        verdict: stat::REPLY,
    });
    REWRITE
}

#[inline(always)]
fn not_a_frontend<P: Packet>(pkt: &mut P, flow: &Flow, origin: Origin) -> i32 {
    if origin == Origin::NodeOut && pkt.sent_by_local_socket() {
        return MASQUERADE_OUT;
    }
    if origin != Origin::Pod {
        // From outside, other ports of these addresses may be the node's own
        // services (an externalIP on a node address): never refused here.
        // Reply-only programs refuse nothing.
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    let key = address_key(flow.dst_be, SCOPE_INTERNAL);
    if let Some(address) = unsafe { LB_SERVICES.get(key) }
        && address.flags & service_flags::ADDRESS_ONLY != 0
    {
        count(stat::REJECT_UNDECLARED);
        return REFUSE;
    }
    count(stat::PASS_NOT_FRONTEND);
    pkt.pass()
}

#[inline(never)]
fn translate<P: Packet>(pkt: &mut P, flow: &Flow, to: &Rewrite) -> i32 {
    let (end, verdict) = (to.end, to.verdict);
    let to = &to.nat;
    let mut result = nat::rewrite(pkt, flow, end, to.addr_be, to.port_be);
    if result.is_ok() && !to.other_addr_be.is_none() {
        let other_end = match end {
            End::Destination => End::Source,
            End::Source => End::Destination,
        };
        result = nat::rewrite(pkt, flow, other_end, to.other_addr_be, to.other_port_be);
    }
    match result {
        Ok(()) => {
            count(verdict);
            if end == End::Destination {
                pkt.mark_translated();
            }
            if LB_CONFIG
                .get(0)
                .is_some_and(|c| c.flags & config_flags::FAST_PATH != 0)
            {
                let (src, dst) = match end {
                    End::Destination => (
                        other_or(to, (flow.src_be, flow.sport_be)),
                        (to.addr_be, to.port_be),
                    ),
                    End::Source => (
                        (to.addr_be, to.port_be),
                        other_or(to, (flow.dst_be, flow.dport_be)),
                    ),
                };
                let routed = Routed {
                    src_be: src.0,
                    dst_be: dst.0,
                    sport_be: src.1,
                    dport_be: dst.1,
                    proto: flow.proto,
                    v6: flow.v6,
                    l3_off: flow.l3_off,
                    tot_len: (flow.ip_end - flow.l3_off) as u16,
                };
                if let Some(redirected) = pkt.redirect_routed(&routed) {
                    count(stat::REDIRECTED);
                    return redirected;
                }
            }
            pkt.pass()
        }
        Err(_) => {
            count(stat::ERR_NAT_FAILED);
            dropped(pkt, flow, event_reason::REWRITE_FAILED, 0, SCOPE_INTERNAL);
            pkt.drop_verdict()
        }
    }
}

/// The agent is carrying flows over from a previous layout's maps.
#[inline(always)]
fn migrating() -> bool {
    LB_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::MIGRATING != 0)
}

/// While flows are carried over (`MIGRATING`): a TCP packet to one of the
/// node's SNAT addresses, at a port of lb's SNAT range, with no entry, is a
/// reply whose flow the agent has not copied yet. Passed on, the node's
/// stack would answer it with an RST and reset the backend's connection;
/// dropped, the backend sends it again.
#[inline(always)]
fn awaiting_copy(flow: &Flow) -> bool {
    if flow.proto != IPPROTO_TCP {
        return false;
    }
    let Some(config) = LB_CONFIG.get(0) else {
        return false;
    };
    if config.flags & config_flags::MIGRATING == 0 {
        return false;
    }
    let (nodeport, hairpin) = if flow.v6 {
        (config.nodeport_snat_addr6, config.hairpin_snat_addr6)
    } else {
        (config.nodeport_snat_addr4, config.hairpin_snat_addr4)
    };
    let port = u16::from_be(flow.dport_be);
    (flow.dst_be == nodeport || flow.dst_be == hairpin)
        && !flow.dst_be.is_none()
        && port >= config.snat_port_min
        && port <= config.snat_port_max
}

/// The backend id of conntrack entries that only masquerade (a node
/// socket's connection): backend ids start at 1.
const NO_BACKEND: u32 = lb_common::CT_NO_BACKEND;

/// A node socket's packet leaving with a Service address as its source: a
/// socket bound to a LoadBalancer IP or externalIP the node holds, which
/// socket-level LB connected to a backend. Only this node can take the
/// answer for that address, so the flow is masqueraded to the node
/// (kube-proxy masquerades the node's traffic to Service addresses). The
/// backend stays the destination; the answer, addressed to the node's SNAT
/// address, is restored by the reply path where it comes in.
#[inline(never)]
fn masquerade_out<P: Packet>(pkt: &mut P, flow: &Flow, to: &mut MaybeUninit<Rewrite>) -> i32 {
    if unsafe { LB_SERVICES.get(address_key(flow.src_be, SCOPE_INTERNAL)) }.is_none() {
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    let now = crate::ct::now();
    let len = pkt.len();
    let syn = flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let entry = ct::lookup(&ct::forward_key(flow), now).filter(|entry| {
        // A new connection on a closed one's tuple starts afresh.
        !(syn && unsafe { (**entry).flags } & (ct_flags::RST_SEEN | ct_flags::ANY_FIN) != 0)
    });
    if let Some(entry) = entry {
        to.write(Rewrite {
            nat: Nat {
                addr_be: flow.dst_be,
                port_be: flow.dport_be,
                other_addr_be: unsafe { (*entry).snat_addr_be },
                other_port_be: unsafe { (*entry).snat_port_be },
            },
            end: End::Destination,
            verdict: stat::ESTABLISHED,
        });
        ct::account(entry, flow, CT_DIR_FORWARD, now, len, 0);
        return REWRITE;
    }
    // Only a connection's first packet starts one (a TCP SYN; any
    // datagram), and only of a socket that socket-level LB sent to this
    // backend: not a server answering on a Service address, nor a socket
    // bound to one talking to anything else (a Service address may be a
    // node address, as with k3s' ServiceLB).
    let sock_key = SockNatKey {
        socket_cookie: pkt.socket_cookie(),
        addr_be: flow.dst_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        dir: SOCK_DIR_REVERSE,
        _pad: 0,
    };
    let sent_by_socket_lb = unsafe { LB_SOCK_NAT.get(sock_key) }.is_some();
    let node = LB_CONFIG.get(0).map_or(Addr::NONE, |c| {
        if flow.v6 {
            c.nodeport_snat_addr6
        } else {
            c.nodeport_snat_addr4
        }
    });
    if (flow.proto == IPPROTO_TCP && !syn)
        || !sent_by_socket_lb
        || node.is_none()
        || node == flow.src_be
    {
        count(stat::PASS_NOT_FRONTEND);
        return pkt.pass();
    }
    let to = to.write(Rewrite {
        nat: Nat {
            addr_be: flow.dst_be,
            port_be: flow.dport_be,
            other_addr_be: node,
            other_port_be: flow.sport_be,
        },
        end: End::Destination,
        verdict: stat::NEW_FLOW,
    });
    let nat = &mut to.nat;
    let new_flow = NewFlow {
        // No backend of ours: the agent's conntrack pruning leaves id 0 be.
        backend_id: NO_BACKEND,
        rev_nat_id: 0,
        allocate: true,
        direct: false,
        now,
        len,
    };
    match ct::create(flow, &new_flow, nat) {
        Ok(()) => {
            count(stat::NODE_SOCKET_MASQUERADE);
            REWRITE
        }
        Err(CreateError::Full) => {
            count(stat::ERR_CT_FULL);
            dropped(pkt, flow, event_reason::CONNTRACK_FULL, 0, SCOPE_INTERNAL);
            pkt.drop_verdict()
        }
        Err(CreateError::NoPort) => {
            count(stat::ERR_SNAT_PORTS);
            dropped(
                pkt,
                flow,
                event_reason::SNAT_PORTS_EXHAUSTED,
                0,
                SCOPE_INTERNAL,
            );
            pkt.drop_verdict()
        }
    }
}

/// The other end after translation: the SNAT one, or the packet's own.
#[inline(always)]
fn other_or(to: &Nat, unchanged: (Addr, u16)) -> (Addr, u16) {
    if !to.other_addr_be.is_none() {
        (to.other_addr_be, to.other_port_be)
    } else {
        unchanged
    }
}

/// No backend at all: refuse fast instead of letting the client time out.
// Its own BPF function: its stack frame is not added to the flow path's.
#[inline(never)]
fn refuse<P: Packet>(pkt: &mut P, flow: &Flow, reason: u8, rev_nat_id: u32, scope: u8) -> i32 {
    // Only the first fragment of an IPv4 UDP datagram can be quoted
    // correctly; other fragments are dropped (the first one answers).
    let answerable = match flow.frag {
        FRAG_NONE => true,
        FRAG_FIRST => !flow.v6 && flow.proto != IPPROTO_TCP,
        _ => false,
    };
    // The ICMP answer grows the packet at its head; on a device without a
    // MAC header the kernel would then send the old header's bytes.
    let answerable = answerable && (flow.proto == IPPROTO_TCP || pkt.l3_off() != 0);
    // The IPv6 answers are built for a bare fixed header.
    let answerable = answerable && (!flow.v6 || flow.ihl_bytes == parse::IP6_HLEN);
    if flow.tcp_flags & TCP_RST != 0 || !answerable {
        // Never answer an RST.
        count(stat::DROP_NO_BACKEND);
        count_service(rev_nat_id, ServiceCount::Dropped);
        dropped(pkt, flow, reason, rev_nat_id, scope);
        return pkt.drop_verdict();
    }
    let (built, counter) = match (flow.proto == IPPROTO_TCP, flow.v6) {
        (true, false) => (reject::tcp_rst(pkt, flow), stat::REJECT_TCP_RST),
        (true, true) => (reject::tcp6_rst(pkt, flow), stat::REJECT_TCP_RST),
        (false, false) => (reject::icmp_port_unreachable(pkt, flow), stat::REJECT_ICMP),
        (false, true) => (reject::icmp6_port_unreachable(pkt, flow), stat::REJECT_ICMP),
    };
    match built {
        Ok(()) => {
            count(counter);
            count_service(rev_nat_id, ServiceCount::Refused);
            if monitor::wanted(event_kind::REJECT) {
                let what = monitor::what(event_kind::REJECT, reason, scope);
                let ifindex = pkt.ifindex();
                monitor::emit(
                    what,
                    flow,
                    &ct::no_addr(),
                    monitor::ids(rev_nat_id, ifindex),
                );
            }
            pkt.bounce()
        }
        Err(_) => {
            count(stat::ERR_REJECT_FAILED);
            count_service(rev_nat_id, ServiceCount::Dropped);
            dropped(pkt, flow, event_reason::REJECT_FAILED, rev_nat_id, scope);
            pkt.drop_verdict()
        }
    }
}

/// Report a dropped packet to a monitor that asks for drops.
#[inline(always)]
fn dropped<P: Packet>(pkt: &P, flow: &Flow, reason: u8, rev_nat_id: u32, scope: u8) {
    if monitor::wanted(event_kind::DROP) {
        let what = monitor::what(event_kind::DROP, reason, scope);
        let ifindex = pkt.ifindex();
        monitor::emit(
            what,
            flow,
            &ct::no_addr(),
            monitor::ids(rev_nat_id, ifindex),
        );
    }
}
