//! Types shared by lb's kernel programs (`lb-ebpf`) and its agent (`lb-agent`).
//!
//! Every type here is a BPF map key or value: `#[repr(C)]`, explicit padding,
//! no `bool`, `Option` or data-carrying enum. Fields holding network data keep
//! network byte order and say so with a `_be` suffix; everything else is host
//! order. Sizes are asserted at compile time so a change on one side cannot
//! silently misread the other.
#![no_std]

/// Version of the map layout below. Bump it whenever a key or value changes
/// shape, so an agent never adopts pinned maps written with another layout.
pub const LAYOUT_VERSION: u32 = 5;

/// Map names, as the kernel object declares them and as they are pinned.
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const BACKEND_SETS: &str = "LB_BACKEND_SETS";
    pub const BACKEND_SLOTS: &str = "LB_BACKEND_SLOTS";
    /// {set id, backend id}: the backend is in the set's slots (the
    /// datapath's check that an affinity entry still holds).
    pub const SET_MEMBERS: &str = "LB_SET_MEMBERS";
    pub const REV_NAT: &str = "LB_REV_NAT";
    /// Conntrack of TCP flows, and of every other protocol: separate so a
    /// flood of one kind cannot evict the other's flows.
    pub const CT_TCP: &str = "LB_CT_TCP";
    pub const CT_OTHER: &str = "LB_CT_OTHER";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const STATS: &str = "LB_STATS";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const SOURCE_RANGES: &str = "LB_SOURCE_RANGES";
    pub const SOCK_NAT: &str = "LB_SOCK_NAT";
    pub const SOCK_AFFINITY: &str = "LB_SOCK_AFFINITY";
    /// What the agent could not program, and why (no program reads it:
    /// `dump services` does, from the pin, while the agent runs or not).
    pub const NOT_PROGRAMMED: &str = "LB_NOT_PROGRAMMED";
    /// The prefilter: every IPv4 address a frontend or a backend has (key:
    /// the address, network order). A TCP or UDP packet whose two
    /// addresses are in neither map, nor the node's SNAT addresses, is none
    /// of lb's and leaves after these lookups.
    pub const PREFILTER4: &str = "LB_PREFILTER4";
    /// The prefilter's IPv6 addresses (key: `Addr`).
    pub const PREFILTER6: &str = "LB_PREFILTER6";
    /// Datapath events for `lb-agent monitor` (a BPF ring buffer of
    /// `MonitorEvent`s): written only while `MONITOR` asks for them.
    pub const EVENTS: &str = "LB_EVENTS";
    /// What a running monitor asks for (`MonitorConfig`, index 0): all zero
    /// when nobody listens, and then no event is built.
    pub const MONITOR: &str = "LB_MONITOR";
    /// Rev-NAT id -> the Service port (`namespace/name:port`) its frontend
    /// belongs to (`ServiceName`). No program reads it: it is pinned for the
    /// monitor and dump, which name Services without the agent.
    pub const SERVICE_NAMES: &str = "LB_SERVICE_NAMES";
    /// Per-Service counters (`ServiceCounters`), per CPU, indexed by
    /// rev-NAT id. One entry (nothing counted) unless the agent runs with
    /// `--service-counters`, which sizes it to the rev-NAT id space.
    pub const SERVICE_STATS: &str = "LB_SERVICE_STATS";
    /// The cluster's Service CIDRs (`ServiceCidrs`, index 0): traffic to an
    /// address in one that no Service holds is dropped (kube-proxy's
    /// nftables mode), not routed on.
    pub const SERVICE_CIDRS: &str = "LB_SERVICE_CIDRS";
    /// Addresses in a Service CIDR that Services hold but no entry lists
    /// (another proxy's Services, ones lb cannot use; key: `Addr` -> 1):
    /// spared by the unallocated drop. Only that drop's path reads it.
    pub const ALLOCATED: &str = "LB_ALLOCATED";
    /// Every map of the object, in the order the agent pins them.
    pub const ALL: [&str; 24] = [
        SERVICES,
        BACKENDS,
        BACKEND_SETS,
        BACKEND_SLOTS,
        SET_MEMBERS,
        REV_NAT,
        CT_TCP,
        CT_OTHER,
        AFFINITY,
        STATS,
        CONFIG,
        MAGLEV,
        SOURCE_RANGES,
        SOCK_NAT,
        SOCK_AFFINITY,
        NOT_PROGRAMMED,
        PREFILTER4,
        PREFILTER6,
        EVENTS,
        MONITOR,
        SERVICE_NAMES,
        SERVICE_STATS,
        SERVICE_CIDRS,
        ALLOCATED,
    ];
    /// Pod devices (ifindex -> 1) the fast path may hand packets to with
    /// bpf_redirect_peer: veths lb attached to as pod devices. Not pinned:
    /// each agent fills its own as it attaches, so every program reading
    /// it was attached by the agent that keeps it.
    pub const POD_DEVICES: &str = "LB_POD_DEVICES";
    /// Pins of maps earlier versions wrote and this one no longer has.
    pub const RETIRED: [&str; 1] = ["LB_CT"];
}

/// Program names, as the kernel object declares them.
pub mod program_names {
    /// tc (TCX) ingress on pod devices: traffic from pods (scope internal).
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// XDP with the pod-side logic: packet tables and `xtask perf` compare
    /// it with the tc program; the agent does not attach it.
    pub const XDP: &str = "lb_xdp";
    /// XDP on node devices (--devices): traffic from outside the node.
    pub const XDP_NODE: &str = "lb_xdp_node";
    /// tc (TCX) ingress on node devices where XDP is not used.
    pub const TC_NODE: &str = "lb_tc_node";
    /// `TC_NODE` for node devices without an Ethernet header (TUN, WireGuard, IPIP).
    pub const TC_NODE_L3: &str = "lb_tc_node_l3";
    /// tc (TCX) egress on pod devices: replies restored before they reach
    /// the client pod, whatever device brought them in.
    pub const TC_TO_POD: &str = "lb_tc_to_pod";
    /// tc (TCX) egress on every other device: answers of the node's own
    /// sockets (hostNetwork endpoints) restored, and the node's sockets
    /// bound to a Service address masqueraded.
    pub const TC_NODE_EGRESS: &str = "lb_tc_node_egress";
    /// `TC_NODE_EGRESS` for devices without an Ethernet header.
    pub const TC_NODE_EGRESS_L3: &str = "lb_tc_node_egress_l3";
    /// tc (TCX) ingress on every other device (not a pod device, not in
    /// --devices): replies only, so none depends on the path it took.
    pub const TC_REPLY: &str = "lb_tc_reply";
    /// `TC_REPLY` for devices without an Ethernet header.
    pub const TC_REPLY_L3: &str = "lb_tc_reply_l3";
    /// cgroup connect4 on the root cgroup: socket-level LB of connect().
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    /// cgroup sendmsg4: socket-level LB of unconnected UDP sendmsg().
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    /// cgroup recvmsg4: restores the Service address as a datagram's source.
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    /// cgroup getpeername4: restores the Service address as the peer.
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
    /// Every socket-level program, each with its attach point's name (the
    /// link pin under `links/cgroup/`).
    pub const SOCKET: [(&str, &str); 8] = [
        (SOCK_CONNECT4, "connect4"),
        (SOCK_SENDMSG4, "sendmsg4"),
        (SOCK_RECVMSG4, "recvmsg4"),
        (SOCK_GETPEERNAME4, "getpeername4"),
        (SOCK_CONNECT6, "connect6"),
        (SOCK_SENDMSG6, "sendmsg6"),
        (SOCK_RECVMSG6, "recvmsg6"),
        (SOCK_GETPEERNAME6, "getpeername6"),
    ];
}

/// Map capacities.
pub mod map_sizes {
    /// Frontends and Service address entries: a dual-stack LoadBalancer
    /// Service with one port on a node with two addresses per family has 14
    /// frontends and 6 address entries.
    pub const SERVICES: u32 = 262_144;
    /// Backends (endpoint ip:port/protocol), each stored once however many
    /// sets name it.
    pub const BACKENDS: u32 = 262_144;
    /// Backend sets: one per Service port, family and endpoint selection
    /// (cluster-wide, node-local), shared by all the frontends that use it.
    pub const BACKEND_SETS: u32 = 131_072;
    /// Backend references over all sets.
    pub const BACKEND_SLOTS: u32 = 524_288;
    /// One rev-NAT id per frontend (sized with `SERVICES`).
    pub const REV_NAT: u32 = SERVICES;
    /// Conntrack entries as the object declares them: two (forward and
    /// reply) per flow, for the smallest default (`ct_flows_default`). The
    /// agent sizes them from --ct-max-tcp / --ct-max-other.
    pub const CT_TCP: u32 = 2 * CT_MIN_FLOWS;
    pub const CT_OTHER: u32 = CT_MIN_FLOWS;
    /// kube-proxy's conntrack sizing (`conntrack.maxPerCore` 32768,
    /// `conntrack.min` 131072), in flows.
    pub const CT_FLOWS_PER_CORE: u32 = 32_768;
    pub const CT_MIN_FLOWS: u32 = 131_072;

    /// Default flows tracked (TCP, other) on a machine with `cpus` CPUs:
    /// kube-proxy's formula for TCP; half of it for the rest (Cilium's
    /// ratio of its TCP and "any" conntrack tables).
    pub const fn ct_flows_default(cpus: u32) -> (u32, u32) {
        let per_core = CT_FLOWS_PER_CORE.saturating_mul(cpus);
        let tcp = if per_core > CT_MIN_FLOWS {
            per_core
        } else {
            CT_MIN_FLOWS
        };
        (tcp, tcp / 2)
    }
    pub const AFFINITY: u32 = 131_072;
    /// Maglev entries over all Maglev frontends (allocated as used).
    pub const MAGLEV: u32 = 1 << 20;
    /// loadBalancerSourceRanges prefixes over all LoadBalancer IPs.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Socket-level translations: two entries per translated socket and frontend.
    pub const SOCK_NAT: u32 = 262_144;
    /// Socket-level affinity: one entry per network namespace and frontend.
    pub const SOCK_AFFINITY: u32 = 65_536;
    /// Objects reported as not programmed (beyond this, only the metric
    /// counts them).
    pub const NOT_PROGRAMMED: u32 = 4_096;
    /// Prefilter addresses per family: at most one per frontend and one
    /// per backend (the agent sizes them from --lb-map-max as those).
    pub const PREFILTER: u32 = SERVICES + BACKENDS;
    /// `LB_EVENTS`' ring buffer, in bytes (a power of two of pages): room
    /// for ~13,000 events (80 bytes with the record header) between two
    /// reads of the monitor.
    pub const EVENTS_BYTES: u32 = 1 << 20;
}

/// `skb->mark` bit lb sets on packets it translated on the way in, so the
/// reply-only program on a pod device's egress leaves them alone (a
/// forward-translated packet may carry another flow's reply tuple). The
/// mark is scrubbed when the packet enters the pod's namespace through the
/// veth; the fast path's peer redirect clears it itself. Outside
/// kube-proxy's (0x4000, 0x8000) and Calico's (0xffff0000) bits.
pub const MARK_TRANSLATED: u32 = 0x0000_0800;
/// `skb->mark` bit beside `MARK_TRANSLATED` on a packet of a DSR flow the
/// node program translated under tc: the node's egress program must still
/// look at it, to put the frontend into the packet (`dsr` module).
pub const MARK_DSR: u32 = 0x0000_1000;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// SCTP's CRC32c (RFC 9260 appendix A: Castagnoli, reflected) fixed for a
/// change of the common header's ports, without reading the packet: a CRC
/// is linear, so the new one is the old one XOR the CRC of the change
/// followed by as many zero bytes as follow it (zlib's crc32_combine).
pub mod sctp_crc {
    /// The reflected Castagnoli polynomial.
    const POLY: u32 = 0x82F6_3B78;

    /// a * b modulo the polynomial (reflected: bit 31 is x^0).
    #[inline(always)]
    pub const fn mul_mod(a: u32, mut b: u32) -> u32 {
        let mut p = 0u32;
        let mut i = 0;
        while i < 32 {
            if a & (1 << (31 - i)) != 0 {
                p ^= b;
            }
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
            i += 1;
        }
        p
    }

    /// x^(8 * 2^k) modulo the polynomial, k = 0..16: appending 2^k zero bytes.
    pub const ZERO_BYTES: [u32; 16] = {
        let mut t = [0u32; 16];
        // x^8: one zero byte.
        let mut p = 1u32 << 23;
        let mut k = 0;
        while k < 16 {
            t[k] = p;
            p = mul_mod(p, p);
            k += 1;
        }
        t
    };

    /// The CRC register (no initial value, no final XOR) of four bytes.
    #[inline(always)]
    pub const fn raw4(bytes: [u8; 4]) -> u32 {
        let mut crc = 0u32;
        let mut i = 0;
        while i < 4 {
            crc = shift8(crc ^ bytes[i] as u32);
            i += 1;
        }
        crc
    }

    /// What to XOR into the checksum (as the little-endian value the
    /// header stores) when the first four bytes of an SCTP packet of
    /// `len` bytes change by `delta` (old XOR new, in packet order).
    #[inline(always)]
    pub fn port_change(delta: [u8; 4], len: u32) -> u32 {
        let mut crc = raw4(delta);
        let zeros = len.saturating_sub(4);
        let mut k = 0;
        while k < 16 {
            if zeros & (1 << k) != 0 {
                crc = mul_mod(ZERO_BYTES[k], crc);
            }
            k += 1;
        }
        crc
    }

    /// The CRC32c of a whole SCTP packet with its checksum field (bytes
    /// 8..12) counted as zero, as the header stores it (little-endian).
    pub fn checksum(packet: &[u8]) -> u32 {
        let mut crc = !0u32;
        for (i, byte) in packet.iter().enumerate() {
            let byte = if (8..12).contains(&i) { 0 } else { *byte };
            crc = shift8(crc ^ byte as u32);
        }
        !crc
    }

    /// Eight steps of the register: one byte in.
    #[inline(always)]
    const fn shift8(mut crc: u32) -> u32 {
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        crc
    }
}

/// An IP address in a map: IPv6, or IPv4 as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), as four words in network byte order. One key shape
/// for both families: every map, lookup and rule is written once, and a
/// dual-stack Service is two frontends in the same maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr {
    pub be: [u32; 4],
}

impl Addr {
    /// All zeroes: "none" where a field is optional.
    pub const NONE: Addr = Addr { be: [0; 4] };

    /// The IPv4-mapped form of an IPv4 address given in network order.
    #[inline(always)]
    pub const fn v4(addr_be: u32) -> Addr {
        Addr {
            be: [0, 0, 0xffff_u32.to_be(), addr_be],
        }
    }

    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.be[0] == 0 && self.be[1] == 0 && self.be[2] == 0xffff_u32.to_be()
    }

    /// The IPv4 address in network order (meaningful when `is_v4`).
    #[inline(always)]
    pub fn v4_be(&self) -> u32 {
        self.be[3]
    }

    #[inline(always)]
    pub fn is_none(&self) -> bool {
        self.be[0] | self.be[1] | self.be[2] | self.be[3] == 0
    }

    /// From the 16 bytes of an IPv6 address, as they are on the wire.
    #[inline(always)]
    pub fn from_octets(o: [u8; 16]) -> Addr {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Addr {
            be: [w(0), w(4), w(8), w(12)],
        }
    }

    /// The address as the standard library spells it (IPv4-mapped: IPv4).
    pub fn ip(&self) -> core::net::IpAddr {
        let v6 = core::net::Ipv6Addr::from(self.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => core::net::IpAddr::V4(v4),
            None => core::net::IpAddr::V6(v6),
        }
    }

    /// The 16 bytes as they are on the wire.
    #[inline(always)]
    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.be[i].to_ne_bytes();
            o[i * 4] = b[0];
            o[i * 4 + 1] = b[1];
            o[i * 4 + 2] = b[2];
            o[i * 4 + 3] = b[3];
            i += 1;
        }
        o
    }
}

/// `ServiceKey::scope`: which traffic an entry serves. In-cluster traffic:
/// packets from pods (pod devices) and the node itself.
pub const SCOPE_INTERNAL: u8 = 0;
/// Traffic from outside the node (node devices): NodePort, LoadBalancer IPs
/// and externalIPs, with externalTrafficPolicy's backend set.
pub const SCOPE_EXTERNAL: u8 = 1;

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Addr {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::v4(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => Addr::from_octets(v6.octets()),
        }
    }
}

impl From<core::net::Ipv4Addr> for Addr {
    fn from(ip: core::net::Ipv4Addr) -> Addr {
        Addr::v4(u32::from_ne_bytes(ip.octets()))
    }
}

/// Key of `LB_SERVICES`: a frontend, or with port and protocol 0 a Service
/// address entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Frontend address.
    pub addr_be: Addr,
    /// Frontend port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
    pub _pad: u32,
}

/// Frontend kind, stored in the low byte of `ServiceValue::flags`.
pub mod frontend_kind {
    pub const MASK: u32 = 0xff;
    pub const CLUSTER_IP: u32 = 1;
    pub const NODE_PORT: u32 = 2;
    pub const LOAD_BALANCER: u32 = 3;
    pub const EXTERNAL_IP: u32 = 4;
}

/// Bits of `ServiceValue::flags` above the kind byte.
pub mod service_flags {
    /// sessionAffinity ClientIP.
    pub const AFFINITY: u32 = 1 << 8;
    /// internalTrafficPolicy Local.
    pub const INTERNAL_LOCAL: u32 = 1 << 9;
    /// externalTrafficPolicy Local.
    pub const EXTERNAL_LOCAL: u32 = 1 << 10;
    /// With no backend, drop instead of rejecting (traffic policy Local with
    /// endpoints only on other nodes, as kube-proxy does).
    pub const DROP_IF_EMPTY: u32 = 1 << 11;
    /// On the entry of `{addr, port 0, proto 0}`: the address is a Service IP, and
    /// packets to it on an undeclared port or protocol are rejected.
    pub const ADDRESS_ONLY: u32 = 1 << 12;
    /// New flows pick their backend from the backend set's Maglev table
    /// (`LB_MAGLEV`, of `BackendSetValue::maglev_size` entries).
    pub const MAGLEV: u32 = 1 << 13;
    /// On an address entry: answer ICMP echo requests (the address has a
    /// frontend with a usable backend). An address entry without it drops them.
    pub const ECHO: u32 = 1 << 14;
    /// Only clients inside the frontend address's `LB_SOURCE_RANGES`
    /// prefixes may use it (loadBalancerSourceRanges); others are dropped.
    pub const SOURCE_RANGES: u32 = 1 << 15;
    /// Source-NAT every new flow to the node address, also to local
    /// backends, as kube-proxy masquerades: a ClusterIP reached from outside
    /// --cluster-cidr, and NodePorts / LoadBalancer IPs / externalIPs under
    /// externalTrafficPolicy Cluster (from outside and from pods).
    pub const MASQUERADE: u32 = 1 << 16;
    /// Direct server return (`lb/forwarding-mode`): a new flow from outside
    /// to a backend on another node keeps its client address and carries
    /// the frontend's address and port to the backend's node in an IP
    /// option (IPv6: a Destination Options header), whose answer goes
    /// straight to the client. On external-scope entries only.
    pub const DSR: u32 = 1 << 17;
}

/// Direct server return on the wire, as Cilium's DSR "option" mode puts
/// it: the frontend a flow came to rides to the backend's node in the
/// flow's first packet (TCP SYNs; every UDP datagram).
pub mod dsr {
    /// IPv4 option type: copied on fragmentation (0x80), class 0, number
    /// 26. Linux ignores options it does not know on received packets.
    pub const OPT4_TYPE: u8 = 0x9a;
    /// type, length, port (2), address (4).
    pub const OPT4_LEN: u8 = 8;
    /// IPv6 Destination Options header holding one option of this type:
    /// the top two bits 00 tell a receiver that does not know it to skip it.
    pub const OPT6_TYPE: u8 = 0x1b;
    /// The option's data: address (16), port (2), two zero bytes.
    pub const OPT6_DATA_LEN: u8 = 20;
    /// The whole header: next header, length, option type, length, data.
    pub const OPT6_HDR_LEN: u32 = 24;
    /// IPv6 next header: Destination Options.
    pub const IPPROTO_DSTOPTS: u8 = 60;
}

/// Key of `LB_MAGLEV`: one entry of a backend set's Maglev lookup table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MaglevKey {
    pub set_id: u32,
    pub index: u32,
}

/// Value of `LB_SERVICES`. A frontend: the backend set it balances to, its
/// rev-NAT id (replies, affinity), `service_flags` and the affinity timeout.
/// An address entry: `flags` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub backend_set_id: u32,
    pub rev_nat_id: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}

/// Value of `LB_BACKEND_SETS`, keyed by a `u32` set id (never 0): a list of
/// backends several frontends share (a Service port's endpoints as one
/// family and traffic policy select them), stored once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendSetValue {
    /// Slots `0..count` in `LB_BACKEND_SLOTS`; 0: no backend takes new flows.
    pub count: u32,
    /// Entries of the set's Maglev table (0: none).
    pub maglev_size: u32,
}

/// Key of `LB_BACKEND_SLOTS`: slot `slot` (`0..count`) of a backend set;
/// the value is a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendSlotKey {
    pub set_id: u32,
    pub slot: u32,
}

/// Key of `LB_SET_MEMBERS` (value: 1): `backend_id` is in the slots of set
/// `set_id`. An affinity entry is followed only while its backend is a
/// member of the frontend's set (Cilium's `LB_AFFINITY_MATCH`), so no
/// affinity entry needs removing for correctness when a backend leaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SetMemberKey {
    pub set_id: u32,
    pub backend_id: u32,
}

/// `BackendValue::state`: takes new flows (it is in some frontend's slots).
pub const BACKEND_ACTIVE: u8 = 0;
/// Present but takes no new flows (terminating or not ready): established
/// TCP flows finish on it, UDP flows and affinity move away from it.
pub const BACKEND_STANDBY: u8 = 1;

/// Bits of `BackendValue::flags`.
pub mod backend_flags {
    /// Selected only because nothing is ready: a serving-terminating endpoint
    /// (kube-proxy's fallback). Affinity does not pin clients to it.
    pub const FALLBACK: u32 = 1 << 0;
    /// The endpoint runs on another node: external traffic sent to it is
    /// source-NATed to the node address so the reply comes back through us.
    pub const REMOTE: u32 = 1 << 1;
    /// The endpoint's address is this node's own (a hostNetwork pod): never
    /// masqueraded to the node, whose answer would stay on loopback.
    pub const ON_NODE: u32 = 1 << 2;
}

/// Value of `LB_BACKENDS`, keyed by a `u32` backend id (never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    /// Backend address.
    pub addr_be: Addr,
    /// Backend port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub state: u8,
    pub flags: u32,
}

/// Value of `LB_REV_NAT`, keyed by a `u32` rev-NAT id (never 0): the frontend
/// a reply is translated back to. Each scope of a frontend has its own id
/// (own affinity).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNatValue {
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Data of an `LB_SOURCE_RANGES` LPM trie key (the trie's key is
/// `{prefix_len: u32, data}`): the prefix length counts from the start of
/// `frontend_addr_be` (128 + the client prefix length, an IPv4 prefix being
/// 96 + its length in the mapped form), so a lookup with 256 bits matches
/// one LoadBalancer IP's allowed client prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRange {
    pub frontend_addr_be: Addr,
    pub client_addr_be: Addr,
}

/// `CtKey::dir`: the packet goes client -> frontend.
pub const CT_DIR_FORWARD: u8 = 0;
/// The packet goes backend -> client (a reply to a translated flow).
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `LB_CT_TCP` / `LB_CT_OTHER`: the tuple as the packet carries it when it reaches the
/// program. Forward entries hold the client's tuple towards the frontend;
/// reply entries the backend's tuple towards the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src_addr_be: Addr,
    pub dst_addr_be: Addr,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Bits of `CtValue::flags`.
pub mod ct_flags {
    /// A SYN without ACK opened the flow.
    pub const SYN_SEEN: u16 = 1 << 0;
    /// Both directions have been seen (the backend answered).
    pub const REPLY_SEEN: u16 = 1 << 1;
    /// The client sent a FIN.
    pub const FIN_SEEN: u16 = 1 << 2;
    pub const RST_SEEN: u16 = 1 << 3;
    /// The backend sent a FIN.
    pub const FIN_REPLY_SEEN: u16 = 1 << 4;
    /// A FIN from either side.
    pub const ANY_FIN: u16 = FIN_SEEN | FIN_REPLY_SEEN;
    /// Direct server return, on the first node. Its forward entry: the
    /// flow's answers go straight to the client, never here. Its second
    /// entry, keyed by the translated packet (client -> backend, in the
    /// reply direction's map slot): the node's egress program puts the
    /// frontend it names into the flow's first packets (`dsr`).
    pub const DSR: u16 = 1 << 5;
    /// Direct server return, on the backend's node: a reply entry learnt
    /// from the frontend another node's packet carried; it restores that
    /// frontend as the source of the backend's answers.
    pub const DSR_LEARNT: u16 = 1 << 6;
}

/// Conntrack lifetimes, in seconds, counted from the last packet: kube-proxy's
/// settings for netfilter (`conntrack.tcpEstablishedTimeout` 24 h,
/// `tcpCloseWaitTimeout` 1 h) and the kernel's defaults for the rest.
pub mod ct_lifetime {
    /// TCP before the backend answers (nf_conntrack_tcp_timeout_syn_sent).
    pub const TCP_SYN: u32 = 120;
    /// TCP once both sides have been seen.
    pub const TCP_ESTABLISHED: u32 = 86_400;
    /// TCP after a FIN from one side only: the other may go on sending.
    pub const TCP_HALF_CLOSED: u32 = 3_600;
    /// TCP after FINs from both sides (TIME_WAIT).
    pub const TCP_TIME_WAIT: u32 = 120;
    /// TCP after an RST: no TIME_WAIT follows.
    pub const TCP_CLOSED: u32 = 10;
    /// UDP and others until an answer (nf_conntrack_udp_timeout).
    pub const OTHER_UNREPLIED: u32 = 30;
    /// UDP and others once both sides were seen (udp_timeout_stream).
    pub const OTHER_REPLIED: u32 = 120;
}

/// `CtValue::backend_id` of entries that only masquerade (a node socket
/// bound to a Service address, sent to a backend by socket-level LB): no
/// backend of ours, so removing backends never prunes them.
pub const CT_NO_BACKEND: u32 = 0;

/// Value of `LB_CT_TCP` / `LB_CT_OTHER`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// Forward: the backend address written as destination. Reply: the
    /// frontend address written as source.
    pub nat_addr_be: Addr,
    /// Port counterpart of `nat_addr_be`, network byte order.
    pub nat_port_be: u16,
    /// Port counterpart of `snat_addr_be` (forward: the allocated source
    /// port; reply: the client port), network byte order.
    pub snat_port_be: u16,
    /// `ct_flags` bits, shared meaning in both directions.
    pub flags: u16,
    /// Union of the TCP flag bytes seen in this direction.
    pub tcp_flags_seen: u8,
    pub _pad0: u8,
    /// Seconds after `last_seen_ns` at which the entry is dead.
    pub lifetime_s: u32,
    pub _pad1: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Source NAT (hairpin, or external traffic to a remote backend).
    /// Forward: the source address written (NONE: none). Reply: the client
    /// address to restore as destination (NONE: none).
    pub snat_addr_be: Addr,
    pub packets: u64,
    pub bytes: u64,
}

/// Key of `LB_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client_addr_be: Addr,
    pub rev_nat_id: u32,
}

/// Value of `LB_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// `SockNatKey::dir`: `addr`/`port` are the frontend the socket asked for.
pub const SOCK_DIR_FORWARD: u8 = 0;
/// `addr`/`port` are the backend the socket was sent to.
pub const SOCK_DIR_REVERSE: u8 = 1;

/// Key of `LB_SOCK_NAT`: what the socket-level programs did for one socket.
/// Forward entries let a UDP socket keep its backend across sendmsg() calls;
/// reverse entries let recvmsg()/getpeername() show the Service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockNatKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub socket_cookie: u64,
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u32,
}

/// Value of `LB_SOCK_NAT`. Forward: the backend chosen (`addr`/`port` its
/// address). Reverse: the frontend to show (`addr`/`port`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockNatValue {
    pub addr_be: Addr,
    pub port_be: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
    pub backend_id: u32,
}

/// Key of `LB_SOCK_AFFINITY`: sessionAffinity for socket-level LB, where the
/// client is a network namespace (its sockets have no source address yet at
/// connect() time), as kube-proxy treats the node as one client IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAffinityKey {
    pub netns_cookie: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}

/// Bytes of an object's name in `LB_NOT_PROGRAMMED` (a Service port
/// `namespace/name:port` is at most 143).
pub const NOT_PROGRAMMED_OBJECT_LEN: usize = 192;
/// Bytes of the reason (longer ones are cut at a character boundary).
pub const NOT_PROGRAMMED_REASON_LEN: usize = 248;

/// Key of `LB_NOT_PROGRAMMED`: the object (a Service port, a Service IP)
/// as UTF-8, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotProgrammedKey {
    pub object: [u8; NOT_PROGRAMMED_OBJECT_LEN],
}

/// Value of `LB_NOT_PROGRAMMED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotProgrammedValue {
    /// 1: it did not fit (a map or an id space is full).
    pub map_full: u32,
    /// Bytes of `reason` used.
    pub reason_len: u32,
    pub reason: [u8; NOT_PROGRAMMED_REASON_LEN],
}

/// `text`'s bytes in a zero-padded field, cut at a character boundary.
fn text_field<const N: usize>(text: &str) -> ([u8; N], usize) {
    let mut len = text.len().min(N);
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    let mut field = [0u8; N];
    field[..len].copy_from_slice(&text.as_bytes()[..len]);
    (field, len)
}

/// The text of a field `text_field` wrote (empty if it is not UTF-8).
fn field_text(field: &[u8]) -> &str {
    core::str::from_utf8(field).unwrap_or("")
}

impl NotProgrammedKey {
    pub fn new(object: &str) -> Self {
        NotProgrammedKey {
            object: text_field(object).0,
        }
    }

    pub fn object(&self) -> &str {
        let len = self
            .object
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.object.len());
        field_text(&self.object[..len])
    }
}

impl NotProgrammedValue {
    pub fn new(reason: &str, map_full: bool) -> Self {
        let (reason, len) = text_field(reason);
        NotProgrammedValue {
            map_full: map_full as u32,
            reason_len: len as u32,
            reason,
        }
    }

    pub fn reason(&self) -> &str {
        let len = (self.reason_len as usize).min(self.reason.len());
        field_text(&self.reason[..len])
    }
}

/// Bytes of a Service port's name in `LB_SERVICE_NAMES` (as
/// `NOT_PROGRAMMED_OBJECT_LEN`: `namespace/name:port` is at most 143).
pub const SERVICE_NAME_LEN: usize = 192;

/// Value of `LB_SERVICE_NAMES`: `namespace/name:port` (port name; empty
/// for an unnamed port, as kube-proxy's ServicePortName), zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub len: u32,
    pub text: [u8; SERVICE_NAME_LEN],
}

impl ServiceName {
    pub fn new(service_port: &str) -> Self {
        let (text, len) = text_field(service_port);
        ServiceName {
            len: len as u32,
            text,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(self.text.len());
        field_text(&self.text[..len])
    }
}

/// Value of `LB_SERVICE_STATS` (one per CPU) for one frontend: what its
/// clients sent it (replies are not counted) and what became of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCounters {
    /// Packets and bytes to the frontend that were translated (new and
    /// established flows).
    pub packets: u64,
    pub bytes: u64,
    /// Flows balanced to a backend.
    pub new_connections: u64,
    /// Packets refused for want of endpoints (RST, ICMP unreachable).
    pub refused: u64,
    /// Packets dropped (source ranges, Local policy without a local
    /// endpoint, SNAT ports exhausted, an unanswerable refusal, ...).
    pub dropped: u64,
}

/// Service CIDRs per family `LB_SERVICE_CIDRS` holds (a cluster has one
/// or two per family; more are refused by the agent, named).
pub const SERVICE_CIDRS_PER_FAMILY: usize = 4;

/// An IPv4 prefix: `addr & mask == addr_be` (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Prefix4 {
    pub addr_be: u32,
    pub mask_be: u32,
}

/// An IPv6 prefix, word by word as `Prefix4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Prefix6 {
    pub addr: Addr,
    pub mask: Addr,
}

/// Value of `LB_SERVICE_CIDRS` index 0: the first `v4_count` / `v6_count`
/// prefixes are the cluster's Service CIDRs (all zero: none, as a map is
/// before the agent writes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceCidrs {
    pub v4_count: u32,
    pub v6_count: u32,
    pub v4: [Prefix4; SERVICE_CIDRS_PER_FAMILY],
    pub v6: [Prefix6; SERVICE_CIDRS_PER_FAMILY],
}

/// Value of `LB_MONITOR` index 0: what a running `lb-agent monitor` asks
/// for. Zero (nobody listens): the programs build no event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorConfig {
    /// `1 << event_kind::*` of the kinds wanted.
    pub kinds: u32,
    /// New flows: one in `sample` is reported (0 and 1: every one).
    pub sample: u32,
}

/// `MonitorEvent::kind`.
pub mod event_kind {
    /// A packet dropped (`reason` says why).
    pub const DROP: u8 = 0;
    /// A packet refused: answered with a TCP RST or ICMP unreachable.
    pub const REJECT: u8 = 1;
    /// A new flow balanced to a backend.
    pub const NEW: u8 = 2;
    /// An ICMP / ICMPv6 error about a translated flow, translated.
    pub const ICMP: u8 = 3;
    /// Names as `lb-agent monitor` shows them (`--type`, JSON `type`).
    pub const NAMES: [&str; 4] = ["drop", "reject", "new", "icmp"];
}

/// `MonitorEvent::reason`: why a packet was dropped or refused. Stable
/// snake_case names (`NAMES`), as the monitor's JSON carries them.
pub mod event_reason {
    /// The frontend has no endpoint (refused; dropped when it cannot be
    /// answered: an RST, a later fragment, a ping).
    pub const NO_ENDPOINTS: u8 = 0;
    /// A Service IP on a port or protocol it does not declare (refused).
    pub const UNDECLARED_PORT: u8 = 1;
    /// The client is outside the LoadBalancer IP's loadBalancerSourceRanges.
    pub const SOURCE_RANGE: u8 = 2;
    /// externalTrafficPolicy / internalTrafficPolicy Local and no endpoint
    /// on this node.
    pub const NO_LOCAL_ENDPOINTS: u8 = 3;
    /// No free source port left for the flow's SNAT.
    pub const SNAT_PORTS_EXHAUSTED: u8 = 4;
    /// The conntrack map took no new entry.
    pub const CONNTRACK_FULL: u8 = 5;
    /// A later IP fragment to a Service address whose first fragment was
    /// not seen: no ports to translate it by.
    pub const FRAGMENT_WITHOUT_FIRST: u8 = 6;
    /// A mid-connection TCP packet whose flow an upgrade has not copied yet.
    pub const MIGRATING: u8 = 7;
    /// Rewriting the packet failed (the kernel refused a helper).
    pub const REWRITE_FAILED: u8 = 8;
    /// Building the refusal (RST, ICMP) failed.
    pub const REJECT_FAILED: u8 = 9;
    /// A new flow (`event_kind::NEW`).
    pub const NEW_FLOW: u8 = 10;
    /// An ICMP error translated (`event_kind::ICMP`; the monitor names it
    /// by its type and code).
    pub const ICMP_ERROR: u8 = 11;
    /// The frontend's backend set or chosen backend was not in the maps
    /// (the agent rewrote them under the packet).
    pub const BACKEND_MISSING: u8 = 12;
    /// An address in a Service CIDR that no Service holds.
    pub const UNALLOCATED_SERVICE_IP: u8 = 13;
    pub const NAMES: [&str; 14] = [
        "no_endpoints",
        "undeclared_port",
        "source_range",
        "no_local_endpoints",
        "snat_ports_exhausted",
        "conntrack_full",
        "fragment_without_first",
        "migrating",
        "rewrite_failed",
        "reject_failed",
        "new_flow",
        "icmp_error",
        "backend_missing",
        "unallocated_service_ip",
    ];
}

/// One record of `LB_EVENTS`: the packet as it arrived (before any
/// rewrite), the frontend's rev-NAT id (0: none, e.g. an undeclared port),
/// and the backend when one was chosen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MonitorEvent {
    pub src_be: Addr,
    pub dst_be: Addr,
    /// `Addr::NONE` when no backend is involved.
    pub backend_be: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub backend_port_be: u16,
    /// `event_kind`.
    pub kind: u8,
    /// `event_reason`.
    pub reason: u8,
    pub proto: u8,
    /// `SCOPE_INTERNAL` (a pod device, the node's egress) or `SCOPE_EXTERNAL`.
    pub scope: u8,
    /// ICMP errors: the error's type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The device the packet was seen on.
    pub ifindex: u32,
    pub rev_nat_id: u32,
}

/// Value of `LB_CONFIG` index 0: node-wide datapath settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigValue {
    /// Must equal `LAYOUT_VERSION` once the agent has written the config.
    pub layout_version: u32,
    /// `config_flags` bits.
    pub flags: u32,
    /// Source ports for the NodePort SNAT, host order, inclusive. Outside
    /// the node's ephemeral range, so they never meet the node's own sockets.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
    /// Network namespace whose sockets the socket-level programs translate
    /// (the agent's: the node's), unless `SOCKET_LB_ALL_NETNS` is set.
    pub netns_cookie: u64,
    /// Source address for hairpin flows (a pod reaching itself through a
    /// Service), per family; NONE disables hairpin SNAT for that family.
    pub hairpin_snat_addr4: Addr,
    pub hairpin_snat_addr6: Addr,
    /// Node address external flows to remote backends are source-NATed
    /// to, per family; NONE disables that SNAT for the family.
    pub nodeport_snat_addr4: Addr,
    pub nodeport_snat_addr6: Addr,
}

pub mod config_flags {
    /// Log every new flow through aya-log (debugging only: it costs per connection).
    pub const DEBUG_FLOWS: u32 = 1 << 0;
    /// Answer ICMP echo requests to Service addresses (`ECHO` entries).
    pub const ECHO_REPLY: u32 = 1 << 1;
    /// tc programs hand translated packets straight to the device the FIB
    /// routes them to (bpf_redirect_neigh), skipping the host stack.
    pub const FAST_PATH: u32 = 1 << 2;
    /// The cgroup programs translate connect()/sendmsg() to Services.
    pub const SOCKET_LB: u32 = 1 << 3;
    /// ... in every network namespace, not only `netns_cookie`'s.
    pub const SOCKET_LB_ALL_NETNS: u32 = 1 << 4;
    /// An upgrade is carrying flows over from the previous layout's maps: a
    /// mid-connection TCP packet with no conntrack entry is dropped (TCP
    /// sends it again once its entry is copied), not balanced afresh.
    pub const MIGRATING: u32 = 1 << 5;
    /// Conntrack entries count every packet and byte (`packets`, `bytes`):
    /// a write per packet. Off, an entry is written when its state changes
    /// and at most once a second otherwise (Cilium's report interval; its
    /// per-flow accounting is off by default for the same reason).
    pub const CT_ACCOUNTING: u32 = 1 << 6;
}

/// Default SNAT port range: above Linux's default ip_local_port_range
/// (32768-60999) and the NodePort range.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65_535;

/// Indices of the per-CPU `LB_STATS` array: one packet counter per verdict and reason.
pub mod stat {
    /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged ...): passed untouched.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP but neither TCP nor UDP (nor a ping to answer), or IPv6 with
    /// extension headers: passed untouched.
    pub const PASS_OTHER_PROTO: u32 = 1;
    /// TCP/UDP not addressed to a frontend nor part of a tracked flow.
    pub const PASS_NOT_FRONTEND: u32 = 2;
    /// A later IP fragment whose first fragment was not seen, not addressed
    /// to a Service address: passed untouched.
    pub const PASS_FRAGMENT: u32 = 3;
    /// Truncated or inconsistent headers: passed untouched.
    pub const MALFORMED: u32 = 4;
    /// First packet of a flow: backend chosen, translated, tracked.
    pub const NEW_FLOW: u32 = 5;
    /// Packet of a tracked flow translated to its backend.
    pub const ESTABLISHED: u32 = 6;
    /// Reply from a backend translated back to the frontend.
    pub const REPLY: u32 = 7;
    /// Frontend without backends, TCP: answered with an RST.
    pub const REJECT_TCP_RST: u32 = 8;
    /// Frontend without backends, UDP: answered with ICMP port unreachable.
    pub const REJECT_ICMP: u32 = 9;
    /// Tracked flow whose backend no longer exists: a new backend was chosen.
    pub const BACKEND_REPLACED: u32 = 10;
    /// Impossible: a frontend's backend set, or a slot in `0..count` of it,
    /// is missing (make-before-break broken).
    pub const ERR_SLOT_MISSING: u32 = 11;
    /// Impossible: a slot names a backend id that is not in `LB_BACKENDS`.
    pub const ERR_BACKEND_MISSING: u32 = 12;
    /// The conntrack map refused an insert: the flow is translated untracked.
    pub const ERR_CT_FULL: u32 = 13;
    /// Building a reject failed: the packet was dropped instead.
    pub const ERR_REJECT_FAILED: u32 = 14;
    /// A rewrite helper failed: the packet was dropped.
    pub const ERR_NAT_FAILED: u32 = 15;
    /// Frontend without backends, and a packet that must not be answered (an
    /// RST) or a frontend told to drop (traffic policy Local): dropped.
    pub const DROP_NO_BACKEND: u32 = 16;
    /// Undeclared port or protocol on a Service IP: rejected like an empty frontend.
    pub const REJECT_UNDECLARED: u32 = 17;
    /// Hairpin flow: source rewritten so the pod's reply comes back through us.
    pub const HAIRPIN: u32 = 18;
    /// Agent: a map was full and a Service could not be programmed.
    pub const AGENT_MAP_FULL: u32 = 19;
    /// Agent: objects skipped as invalid (bad IP, port, protocol, duplicate ClusterIP ...).
    pub const AGENT_INVALID_OBJECTS: u32 = 20;
    /// Agent: manifest files rejected (parse errors); their last good content stays.
    pub const AGENT_BAD_FILES: u32 = 21;
    /// New flow sent to the client's previous backend (sessionAffinity ClientIP).
    pub const AFFINITY_HIT: u32 = 22;
    /// Tracked flow re-balanced because its state no longer fits: a UDP flow
    /// whose backend is terminating, or a new SYN on a closed TCP tuple.
    pub const FLOW_RESTARTED: u32 = 23;
    /// New flow chosen through the frontend's Maglev table.
    pub const MAGLEV: u32 = 24;
    /// ICMP echo request to a Service address with a usable backend: answered.
    pub const ECHO_REPLY: u32 = 25;
    /// ICMP echo request to a Service address without a usable backend: dropped.
    pub const DROP_ECHO: u32 = 26;
    /// LoadBalancer IP traffic from outside loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 27;
    /// New external flow to a backend on another node: source-NATed to the node.
    pub const NODEPORT_SNAT: u32 = 28;
    /// No free SNAT port for a new external flow: dropped.
    pub const ERR_SNAT_PORTS: u32 = 29;
    /// Translated packet redirected to its FIB egress device (fast path).
    pub const REDIRECTED: u32 = 30;
    /// Socket-level LB: connect()/sendmsg() to a frontend sent to a backend.
    pub const SOCK_TRANSLATED: u32 = 31;
    /// Socket-level LB: connect()/sendmsg() to a frontend without a usable
    /// backend (or an undeclared port of a Service IP) failed with an error.
    pub const SOCK_REFUSED: u32 = 32;
    /// Socket-level LB: recvmsg()/getpeername() shown the Service address.
    pub const SOCK_REV_TRANSLATED: u32 = 33;
    /// New flow whose reply tuple another live flow holds (one client port
    /// to two Services sharing a backend ip:port): given another source
    /// port, as netfilter does.
    pub const PORT_REMAPPED: u32 = 34;
    /// ICMP / ICMPv6 error about a translated flow (port unreachable,
    /// fragmentation needed, packet too big, time exceeded ...) translated
    /// back to what its receiver sent.
    pub const ICMP_ERROR_TRANSLATED: u32 = 35;
    /// IP fragment (IPv4, or IPv6 with a Fragment header) of a TCP/UDP
    /// datagram whose ports are known: the first, or a later one whose first
    /// was seen. It is translated like its datagram.
    pub const FRAGMENT: u32 = 36;
    /// A later fragment addressed to a Service address whose first fragment
    /// was not seen (reordered or lost): no ports to translate it by,
    /// dropped (its datagram cannot be reassembled anyway).
    pub const DROP_FRAG_NO_FIRST: u32 = 37;
    /// A connection of the node's own socket, bound to a Service address and
    /// sent to a backend by socket-level LB, masqueraded to the node on its
    /// way out.
    pub const NODE_SOCKET_MASQUERADE: u32 = 38;
    /// A mid-connection TCP packet to a frontend with no conntrack entry
    /// while an upgrade copies the previous maps' flows (`MIGRATING`):
    /// dropped so the sender retransmits it once its flow is copied.
    pub const DROP_MIGRATING: u32 = 39;
    /// A monitor event the full ring buffer could not take (the monitor
    /// reads slower than events come).
    pub const MONITOR_EVENTS_LOST: u32 = 40;
    /// A packet to an address in a Service CIDR that no Service holds
    /// (kube-proxy's nftables mode drops these rather than letting them
    /// follow the default route).
    pub const DROP_UNALLOCATED: u32 = 41;
    /// A packet of a DSR flow sent to the backend's node with the frontend
    /// in an IP option (IPv6: a Destination Options header).
    pub const DSR_FORWARDED: u32 = 42;
    /// A DSR flow learnt from that option on the backend's node: its
    /// answers leave with the frontend as source.
    pub const DSR_LEARNED: u32 = 43;
    /// The DSR option could not be added (no room in the IPv4 header, or
    /// the packet could not grow): the packet was dropped.
    pub const ERR_DSR_OPTION: u32 = 44;
    /// A DSR flow's packet that the option would have grown past the MTU
    /// of the device it leaves by: dropped.
    pub const DROP_DSR_TOO_BIG: u32 = 45;
    /// Number of counters in use.
    pub const COUNT: u32 = 46;
    /// Size of the stats array (room to grow without a layout change).
    pub const CAPACITY: u32 = 48;

    /// Stable names, indexed by counter, as `lb-agent dump stats` shows them.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_other_proto",
        "pass_not_frontend",
        "pass_fragment",
        "malformed",
        "new_flow",
        "established",
        "reply",
        "reject_tcp_rst",
        "reject_icmp",
        "backend_replaced",
        "err_slot_missing",
        "err_backend_missing",
        "err_ct_full",
        "err_reject_failed",
        "err_nat_failed",
        "drop_no_backend",
        "reject_undeclared",
        "hairpin",
        "agent_map_full",
        "agent_invalid_objects",
        "agent_bad_files",
        "affinity_hit",
        "flow_restarted",
        "maglev",
        "echo_reply",
        "drop_echo",
        "drop_source_range",
        "nodeport_snat",
        "err_snat_ports",
        "redirected",
        "sock_translated",
        "sock_refused",
        "sock_rev_translated",
        "port_remapped",
        "icmp_error_translated",
        "fragment",
        "drop_frag_no_first",
        "node_socket_masquerade",
        "drop_migrating",
        "monitor_events_lost",
        "drop_unallocated_service_ip",
        "dsr_forwarded",
        "dsr_learned",
        "err_dsr_option",
        "drop_dsr_too_big",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<Addr>() == 16);
    assert!(core::mem::size_of::<ServiceKey>() == 24);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<BackendValue>() == 24);
    assert!(core::mem::size_of::<RevNatValue>() == 20);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 88);
    assert!(core::mem::size_of::<BackendSetValue>() == 8);
    assert!(core::mem::size_of::<BackendSlotKey>() == 8);
    assert!(core::mem::size_of::<SetMemberKey>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<ConfigValue>() == 88);
    assert!(core::mem::size_of::<SockNatKey>() == 32);
    assert!(core::mem::size_of::<SockNatValue>() == 28);
    assert!(core::mem::size_of::<SockAffinityKey>() == 16);
    assert!(core::mem::size_of::<SourceRange>() == 32);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<MonitorEvent>() == 68);
    assert!(core::mem::size_of::<MonitorConfig>() == 8);
    assert!(core::mem::size_of::<ServiceCounters>() == 40);
    assert!(core::mem::size_of::<ServiceCidrs>() == 8 + 4 * 8 + 4 * 32);
    assert!(core::mem::size_of::<ServiceName>() == 4 + SERVICE_NAME_LEN);
    assert!(stat::COUNT <= stat::CAPACITY);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, with explicit padding and no
    // invalid bit patterns, so any byte sequence of their size is a value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ConfigValue {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for BackendSetValue {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for SetMemberKey {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for SockNatKey {}
    unsafe impl aya::Pod for SockNatValue {}
    unsafe impl aya::Pod for SockAffinityKey {}
    unsafe impl aya::Pod for NotProgrammedKey {}
    unsafe impl aya::Pod for NotProgrammedValue {}
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for MonitorConfig {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for ServiceCidrs {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn sctp_checksum_matches_rfc_test_vector() {
        // RFC 3720 B.4: 32 bytes of zeros -> CRC32c 0x8a9136aa.
        assert_eq!(sctp_crc::checksum(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn sctp_port_change_equals_a_recomputed_checksum() {
        for len in [12usize, 13, 16, 28, 100, 1500, 9000, 65_000] {
            let mut packet: std::vec::Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let before = sctp_crc::checksum(&packet);
            let old: [u8; 4] = packet[0..4].try_into().unwrap();
            packet[0..4].copy_from_slice(&[0x1f, 0x90, 0x00, 0x50]);
            let after = sctp_crc::checksum(&packet);
            let delta = [old[0] ^ 0x1f, old[1] ^ 0x90, old[2], old[3] ^ 0x50];
            assert_eq!(
                before ^ sctp_crc::port_change(delta, len as u32),
                after,
                "len {len}"
            );
        }
    }

    /// Bytes of a value as the kernel sees them in a map.
    fn bytes<T: Copy>(v: &T) -> &[u8] {
        // SAFETY: T is a repr(C) map type with explicit padding (all bytes initialised).
        unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    fn six_one() -> [u8; 16] {
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    }

    fn v4(a: [u8; 4]) -> Addr {
        Addr::v4(u32::from_ne_bytes(a))
    }

    #[test]
    fn not_programmed_texts_round_trip_and_cut_at_character_boundaries() {
        let key = NotProgrammedKey::new("ns/web:http");
        assert_eq!(key.object(), "ns/web:http");
        let value = NotProgrammedValue::new("backend set: map full", true);
        assert_eq!(value.reason(), "backend set: map full");
        assert_eq!(value.map_full, 1);
        // '€' is three bytes: 82 of them fill 246 of the 248, the 83rd is cut whole.
        let long = "€".repeat(100);
        let cut = NotProgrammedValue::new(&long, false);
        assert_eq!(cut.reason(), "€".repeat(NOT_PROGRAMMED_REASON_LEN / 3));
        let key = NotProgrammedKey::new(&"x".repeat(500));
        assert_eq!(key.object().len(), NOT_PROGRAMMED_OBJECT_LEN);
    }

    #[test]
    fn addresses_are_ipv6_or_ipv4_mapped_in_wire_order() {
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1];
        assert_eq!(v4([10, 96, 0, 1]).octets(), mapped);
        assert!(v4([10, 96, 0, 1]).is_v4());
        assert_eq!(
            v4([10, 96, 0, 1]).v4_be(),
            u32::from_ne_bytes([10, 96, 0, 1])
        );
        let six = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(Addr::from_octets(six).octets(), six);
        assert!(!Addr::from_octets(six).is_v4());
        assert!(Addr::NONE.is_none() && !Addr::from_octets(six).is_none());
        let ip: core::net::IpAddr = "10.96.0.1".parse().unwrap();
        assert_eq!(Addr::from(ip), v4([10, 96, 0, 1]));
        assert_eq!(Addr::from(ip).ip(), ip);
        let ip6: core::net::IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(Addr::from(ip6).octets(), six_one());
        assert_eq!(Addr::from(ip6).ip(), ip6);
    }

    #[test]
    fn service_key_bytes_match_kernel_layout() {
        let key = ServiceKey {
            addr_be: v4([10, 96, 0, 1]),
            port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            scope: SCOPE_EXTERNAL,
            _pad: 0,
        };
        assert_eq!(
            bytes(&key),
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1, 0, 80, 6, 1, 0, 0, 0, 0
            ],
            "addresses and ports are in network order"
        );
    }

    #[test]
    fn field_offsets_are_what_the_kernel_reads() {
        let cases: &[(&str, usize, usize)] = &[
            ("ServiceKey.port_be", offset_of!(ServiceKey, port_be), 16),
            ("ServiceKey.proto", offset_of!(ServiceKey, proto), 18),
            ("ServiceKey.scope", offset_of!(ServiceKey, scope), 19),
            (
                "ServiceValue.rev_nat_id",
                offset_of!(ServiceValue, rev_nat_id),
                4,
            ),
            ("ServiceValue.flags", offset_of!(ServiceValue, flags), 8),
            (
                "ServiceValue.affinity_timeout_s",
                offset_of!(ServiceValue, affinity_timeout_s),
                12,
            ),
            (
                "BackendValue.port_be",
                offset_of!(BackendValue, port_be),
                16,
            ),
            ("BackendValue.proto", offset_of!(BackendValue, proto), 18),
            ("BackendValue.state", offset_of!(BackendValue, state), 19),
            ("BackendValue.flags", offset_of!(BackendValue, flags), 20),
            ("RevNatValue.port_be", offset_of!(RevNatValue, port_be), 16),
            ("RevNatValue.proto", offset_of!(RevNatValue, proto), 18),
            ("RevNatValue.scope", offset_of!(RevNatValue, scope), 19),
            ("CtKey.dst_addr_be", offset_of!(CtKey, dst_addr_be), 16),
            ("CtKey.src_port_be", offset_of!(CtKey, src_port_be), 32),
            ("CtKey.dst_port_be", offset_of!(CtKey, dst_port_be), 34),
            ("CtKey.proto", offset_of!(CtKey, proto), 36),
            ("CtKey.dir", offset_of!(CtKey, dir), 37),
            ("CtValue.rev_nat_id", offset_of!(CtValue, rev_nat_id), 4),
            ("CtValue.nat_addr_be", offset_of!(CtValue, nat_addr_be), 8),
            ("CtValue.nat_port_be", offset_of!(CtValue, nat_port_be), 24),
            (
                "CtValue.snat_port_be",
                offset_of!(CtValue, snat_port_be),
                26,
            ),
            ("CtValue.flags", offset_of!(CtValue, flags), 28),
            (
                "CtValue.tcp_flags_seen",
                offset_of!(CtValue, tcp_flags_seen),
                30,
            ),
            ("CtValue.lifetime_s", offset_of!(CtValue, lifetime_s), 32),
            ("CtValue.created_ns", offset_of!(CtValue, created_ns), 40),
            (
                "CtValue.last_seen_ns",
                offset_of!(CtValue, last_seen_ns),
                48,
            ),
            (
                "CtValue.snat_addr_be",
                offset_of!(CtValue, snat_addr_be),
                56,
            ),
            ("CtValue.packets", offset_of!(CtValue, packets), 72),
            ("CtValue.bytes", offset_of!(CtValue, bytes), 80),
            (
                "AffinityKey.rev_nat_id",
                offset_of!(AffinityKey, rev_nat_id),
                16,
            ),
            (
                "AffinityValue.last_used_ns",
                offset_of!(AffinityValue, last_used_ns),
                8,
            ),
            ("MaglevKey.index", offset_of!(MaglevKey, index), 4),
            ("BackendSlotKey.slot", offset_of!(BackendSlotKey, slot), 4),
            (
                "BackendSetValue.maglev_size",
                offset_of!(BackendSetValue, maglev_size),
                4,
            ),
            ("ConfigValue.flags", offset_of!(ConfigValue, flags), 4),
            (
                "ConfigValue.snat_port_min",
                offset_of!(ConfigValue, snat_port_min),
                8,
            ),
            (
                "ConfigValue.snat_port_max",
                offset_of!(ConfigValue, snat_port_max),
                10,
            ),
            (
                "ConfigValue.netns_cookie",
                offset_of!(ConfigValue, netns_cookie),
                16,
            ),
            (
                "ConfigValue.hairpin_snat_addr4",
                offset_of!(ConfigValue, hairpin_snat_addr4),
                24,
            ),
            (
                "ConfigValue.hairpin_snat_addr6",
                offset_of!(ConfigValue, hairpin_snat_addr6),
                40,
            ),
            (
                "ConfigValue.nodeport_snat_addr4",
                offset_of!(ConfigValue, nodeport_snat_addr4),
                56,
            ),
            (
                "ConfigValue.nodeport_snat_addr6",
                offset_of!(ConfigValue, nodeport_snat_addr6),
                72,
            ),
            ("SockNatKey.addr_be", offset_of!(SockNatKey, addr_be), 8),
            ("SockNatKey.port_be", offset_of!(SockNatKey, port_be), 24),
            ("SockNatKey.dir", offset_of!(SockNatKey, dir), 27),
            (
                "SockNatValue.rev_nat_id",
                offset_of!(SockNatValue, rev_nat_id),
                20,
            ),
            (
                "SockNatValue.backend_id",
                offset_of!(SockNatValue, backend_id),
                24,
            ),
            (
                "SockAffinityKey.rev_nat_id",
                offset_of!(SockAffinityKey, rev_nat_id),
                8,
            ),
            (
                "SourceRange.client_addr_be",
                offset_of!(SourceRange, client_addr_be),
                16,
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "offset of {name}");
        }
    }

    #[test]
    fn ct_key_bytes_match_kernel_layout() {
        let six = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let key = CtKey {
            src_addr_be: Addr::from_octets(six),
            dst_addr_be: v4([10, 96, 0, 1]),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 53u16.to_be(),
            proto: IPPROTO_UDP,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        let mut want = std::vec::Vec::new();
        want.extend_from_slice(&six);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]);
        want.extend_from_slice(&[0x9c, 0x40, 0, 53, 17, 1, 0, 0]);
        assert_eq!(bytes(&key), &want[..]);
    }

    #[test]
    fn stat_names_are_unique() {
        for (i, a) in stat::NAMES.iter().enumerate() {
            for b in &stat::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
