//! Every map of the datapath. The agent pins them under --bpffs so they
//! outlive it; names and sizes come from lb-common so both sides agree.

use crate::parse::Ports;
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Addr, AffinityKey, AffinityValue, BackendSetValue, BackendSlotKey, BackendValue, ConfigValue,
    CtKey, CtValue, MaglevKey, MonitorConfig, NotProgrammedKey, NotProgrammedValue, RevNatValue,
    ServiceCidrs, ServiceCounters, ServiceKey, ServiceName, ServiceValue, SetMemberKey,
    SockAffinityKey, SockNatKey, SockNatValue, SourceRange, map_sizes, stat,
};

/// Frontends: {addr, port, proto, scope} -> backend set, rev-NAT id, flags;
/// {addr, 0, 0, scope} -> the Service address entry. The maps only the
/// agent writes are not preallocated: memory follows what is programmed,
/// and a replaced value is freed only after readers are done with it (a
/// preallocated map recycles it at once, under a reader's copy).
#[map(name = "LB_SERVICES")]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Backend id -> backend address, port and state.
#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: HashMap<u32, BackendValue> =
    HashMap::with_max_entries(map_sizes::BACKENDS, BPF_F_NO_PREALLOC);

/// Backend set id -> how many slots it has and its Maglev table's size.
#[map(name = "LB_BACKEND_SETS")]
pub static LB_BACKEND_SETS: HashMap<u32, BackendSetValue> =
    HashMap::with_max_entries(map_sizes::BACKEND_SETS, BPF_F_NO_PREALLOC);

/// {set id, slot} -> backend id.
#[map(name = "LB_BACKEND_SLOTS")]
pub static LB_BACKEND_SLOTS: HashMap<BackendSlotKey, u32> =
    HashMap::with_max_entries(map_sizes::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

/// {set id, backend id} -> 1 while the backend is in the set's slots.
#[map(name = "LB_SET_MEMBERS")]
pub static LB_SET_MEMBERS: HashMap<SetMemberKey, u32> =
    HashMap::with_max_entries(map_sizes::BACKEND_SLOTS, BPF_F_NO_PREALLOC);

/// Rev-NAT id -> the frontend replies are translated back to.
#[map(name = "LB_REV_NAT")]
pub static LB_REV_NAT: HashMap<u32, RevNatValue> =
    HashMap::with_max_entries(map_sizes::REV_NAT, BPF_F_NO_PREALLOC);

/// Conntrack: forward and reply tuples of translated TCP flows.
#[map(name = "LB_CT_TCP")]
pub static LB_CT_TCP: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(map_sizes::CT_TCP, 0);

/// Conntrack of every other protocol (UDP): a UDP flood evicts only UDP flows.
#[map(name = "LB_CT_OTHER")]
pub static LB_CT_OTHER: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(map_sizes::CT_OTHER, 0);

/// Per-CPU room to build conntrack entries in (not pinned: scratch only).
#[map(name = "LB_CT_SCRATCH")]
pub static LB_CT_SCRATCH: PerCpuArray<CtValue> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU room for the reply key `ct::create` probes (not pinned): the
/// forward path's frame is at the stack limit.
#[map(name = "LB_CT_KEY_SCRATCH")]
pub static LB_CT_KEY_SCRATCH: PerCpuArray<CtKey> = PerCpuArray::with_max_entries(1, 0);

/// A datagram's fragments: {src, dst, identification, protocol}.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragKey {
    pub src_addr_be: Addr,
    pub dst_addr_be: Addr,
    pub id_be: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// IP fragments: the first fragment's ports, so the later ones (which carry
/// no L4 header) get the same translation (Cilium's fragment map). LRU: a
/// datagram's entry is needed only while its fragments pass.
#[map(name = "LB_FRAGS")]
pub static LB_FRAGS: LruHashMap<FragKey, Ports> = LruHashMap::with_max_entries(FRAGS, 0);

/// Datagrams in flight whose fragments are tracked at once.
const FRAGS: u32 = 16_384;

/// Session affinity: {client, rev-NAT id} -> last backend.
#[map(name = "LB_AFFINITY")]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::AFFINITY, 0);

/// Per-CPU packet counters indexed by `lb_common::stat`.
#[map(name = "LB_STATS")]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::CAPACITY, 0);

/// Maglev lookup tables: {backend set id, index} -> backend id. Not preallocated:
/// memory follows the tables actually programmed.
#[map(name = "LB_MAGLEV")]
pub static LB_MAGLEV: HashMap<MaglevKey, u32> =
    HashMap::with_max_entries(map_sizes::MAGLEV, BPF_F_NO_PREALLOC);

/// loadBalancerSourceRanges: {LoadBalancer IP, client prefix} -> 1.
/// LPM tries must not be preallocated.
#[map(name = "LB_SOURCE_RANGES")]
pub static LB_SOURCE_RANGES: LpmTrie<SourceRange, u32> =
    LpmTrie::with_max_entries(map_sizes::SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// Socket-level LB: per socket, the backend chosen for a frontend and the
/// frontend to show for that backend.
#[map(name = "LB_SOCK_NAT")]
pub static LB_SOCK_NAT: LruHashMap<SockNatKey, SockNatValue> =
    LruHashMap::with_max_entries(map_sizes::SOCK_NAT, 0);

/// Socket-level sessionAffinity: {network namespace, rev-NAT id} -> last backend.
#[map(name = "LB_SOCK_AFFINITY")]
pub static LB_SOCK_AFFINITY: LruHashMap<SockAffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::SOCK_AFFINITY, 0);

/// Objects the agent could not program, with the reason: no program reads
/// it; it lives here so it is pinned with the others, for `dump services`.
#[map(name = "LB_NOT_PROGRAMMED")]
pub static LB_NOT_PROGRAMMED: HashMap<NotProgrammedKey, NotProgrammedValue> =
    HashMap::with_max_entries(map_sizes::NOT_PROGRAMMED, BPF_F_NO_PREALLOC);

/// The prefilter (see `lb_common::map_names::PREFILTER4`): frontend and
/// backend addresses -> 1. Written only by the agent.
#[map(name = "LB_PREFILTER4")]
pub static LB_PREFILTER4: HashMap<u32, u32> =
    HashMap::with_max_entries(map_sizes::PREFILTER, BPF_F_NO_PREALLOC);

#[map(name = "LB_PREFILTER6")]
pub static LB_PREFILTER6: HashMap<Addr, u32> =
    HashMap::with_max_entries(map_sizes::PREFILTER, BPF_F_NO_PREALLOC);

/// Pod devices the fast path may redirect into (see
/// `lb_common::map_names::POD_DEVICES`).
#[map(name = "LB_POD_DEVICES")]
pub static LB_POD_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(65_536, 0);

/// Events for `lb-agent monitor` (see `lb_common::map_names::EVENTS`).
#[map(name = "LB_EVENTS")]
pub static LB_EVENTS: RingBuf = RingBuf::with_byte_size(map_sizes::EVENTS_BYTES, 0);

/// What a running monitor asks for (index 0; zero: nobody listens).
#[map(name = "LB_MONITOR")]
pub static LB_MONITOR: Array<MonitorConfig> = Array::with_max_entries(1, 0);

/// Rev-NAT id -> Service port name: read by the monitor and dump only; here
/// so it is pinned with the others.
#[map(name = "LB_SERVICE_NAMES")]
pub static LB_SERVICE_NAMES: HashMap<u32, ServiceName> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Per-Service counters by rev-NAT id (see
/// `lb_common::map_names::SERVICE_STATS`): one entry until the agent sizes it.
#[map(name = "LB_SERVICE_STATS")]
pub static LB_SERVICE_STATS: PerCpuArray<ServiceCounters> = PerCpuArray::with_max_entries(1, 0);

/// The cluster's Service CIDRs (index 0; see
/// `lb_common::map_names::SERVICE_CIDRS`).
#[map(name = "LB_SERVICE_CIDRS")]
pub static LB_SERVICE_CIDRS: Array<ServiceCidrs> = Array::with_max_entries(1, 0);

/// Addresses in a Service CIDR that a Service holds but no entry lists
/// (see `lb_common::map_names::ALLOCATED`). Sized by the agent.
#[map(name = "LB_ALLOCATED")]
pub static LB_ALLOCATED: HashMap<Addr, u32> =
    HashMap::with_max_entries(map_sizes::SERVICES, BPF_F_NO_PREALLOC);

/// Whether `dst` (an IPv4 address, network order) is in a Service CIDR.
/// Early returns, not branch-free arithmetic: LLVM turns `v != 0` back
/// into a jump (BPF has no conditional set), and jumps whose outcomes stay
/// live multiply the verifier's paths; a return ends each one. Its own BPF
/// function, so its registers do not spill into the program's own frame.
#[inline(always)]
pub fn in_service_cidr4(dst_be: u32) -> bool {
    let Some(c) = LB_SERVICE_CIDRS.get(0) else {
        return false;
    };
    let n = c.v4_count as usize;
    let mut i = 0;
    while i < lb_common::SERVICE_CIDRS_PER_FAMILY {
        if i >= n {
            return false;
        }
        if dst_be & c.v4[i].mask_be == c.v4[i].addr_be {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether an IPv6 `dst` is in a Service CIDR (see `in_service_cidr4`).
#[inline(always)]
pub fn in_service_cidr6(dst: &Addr) -> bool {
    let Some(c) = LB_SERVICE_CIDRS.get(0) else {
        return false;
    };
    let n = c.v6_count as usize;
    let mut i = 0;
    while i < lb_common::SERVICE_CIDRS_PER_FAMILY {
        if i >= n {
            return false;
        }
        let p = &c.v6[i];
        // One compare per slot: the words' differences OR-ed first.
        let differs = ((dst.be[0] & p.mask.be[0]) ^ p.addr.be[0])
            | ((dst.be[1] & p.mask.be[1]) ^ p.addr.be[1])
            | ((dst.be[2] & p.mask.be[2]) ^ p.addr.be[2])
            | ((dst.be[3] & p.mask.be[3]) ^ p.addr.be[3]);
        if differs == 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// Node-wide settings written by the agent (index 0).
#[map(name = "LB_CONFIG")]
pub static LB_CONFIG: Array<ConfigValue> = Array::with_max_entries(1, 0);

/// Which per-Service counter `count_service` adds to.
#[derive(Clone, Copy)]
pub enum ServiceCount {
    /// A translated packet of `len` bytes; a new flow also counts a
    /// connection.
    Packet {
        len: u32,
        new_flow: bool,
    },
    Refused,
    Dropped,
}

/// Count for the frontend `rev_nat_id` (nothing when counters are off:
/// rev-NAT ids start at 1, past the map's one entry).
#[inline(always)]
pub fn count_service(rev_nat_id: u32, what: ServiceCount) {
    // 0 is no frontend's (an undeclared port): its slot is never read.
    if rev_nat_id == 0 {
        return;
    }
    let Some(c) = LB_SERVICE_STATS.get_ptr_mut(rev_nat_id) else {
        return;
    };
    // Per-CPU slot: no other writer.
    unsafe {
        match what {
            ServiceCount::Packet { len, new_flow } => {
                (*c).packets += 1;
                (*c).bytes += len as u64;
                if new_flow {
                    (*c).new_connections += 1;
                }
            }
            ServiceCount::Refused => (*c).refused += 1,
            ServiceCount::Dropped => (*c).dropped += 1,
        }
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = LB_STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer.
        unsafe { *counter += 1 };
    }
}
