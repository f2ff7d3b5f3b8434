//! `lb-agent explain`: where would this flow go, and why. The real program
//! runs against the live (pinned) service, backend, rev-NAT, Maglev and
//! config maps; conntrack, affinity and counters are private copies (the
//! live flow and affinity entries for this client are copied in, so they
//! decide as they would), and nothing live is written.
//!
//! Packets (a pod's, or one from outside on a node device, tc or XDP) go
//! through BPF_PROG_TEST_RUN on a synthetic packet. The node's own sockets
//! meet cgroup sock_addr programs, which the kernel cannot test-run: a
//! private copy of connect() is attached to the cgroup and a real socket
//! connects from a network namespace of its own (nothing is routable there,
//! so no packet leaves), the copy told by netns cookie to act only there.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, Program, TestRun, TestRunOptions},
};
use lb_common::{
    Addr, AffinityKey, AffinityValue, CT_DIR_FORWARD, ConfigValue, CtKey, CtValue,
    SOCK_DIR_FORWARD, SOCK_DIR_REVERSE, SockAffinityKey, SockNatKey, SockNatValue, config_flags,
    map_names, program_names, stat,
};
use thiserror::Error;

use super::maps::{Maps, MapsError};
use crate::model::Protocol;

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading the program against the pinned maps: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("running the program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("private map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("{program} is not a program explain can run")]
    NotRunnable { program: &'static str },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("the node's socket in a private network namespace: {what}: {source}")]
    Socket {
        what: &'static str,
        source: io::Error,
    },
}

/// Where the synthetic packet enters, so which of lb's programs meets it
/// and which frontends (scope) it can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A pod's packet: tc ingress on its device (in-cluster frontends).
    Pod,
    /// A packet from outside on a node device with the tc program.
    NodeTc,
    /// A packet from outside on a node device with XDP.
    NodeXdp,
}

impl Entry {
    fn program(self) -> &'static str {
        match self {
            Entry::Pod => program_names::TC_INGRESS,
            Entry::NodeTc => program_names::TC_NODE,
            Entry::NodeXdp => program_names::XDP_NODE,
        }
    }

    /// The frontends a packet entering here is balanced by.
    pub fn scope(self) -> crate::model::desired::Scope {
        match self {
            Entry::Pod => crate::model::desired::Scope::Internal,
            Entry::NodeTc | Entry::NodeXdp => crate::model::desired::Scope::External,
        }
    }

    pub fn is_xdp(self) -> bool {
        self == Entry::NodeXdp
    }
}

/// What the program did with the synthetic packet.
#[derive(Debug)]
pub struct Outcome {
    /// The program's return code: tc's (-1/0 pass, 2 drop, 7 redirect) or
    /// XDP's (1 drop, 2 pass, 3 tx, 4 redirect).
    pub verdict: i32,
    /// Source after the program ran (the node's address when masqueraded).
    pub source: SocketAddr,
    /// Destination after the program ran.
    pub destination: SocketAddr,
    /// Counters that moved, by name (the reason for the verdict).
    pub reasons: Vec<&'static str>,
    /// The live flow entry for this tuple, if any (it decides instead of balancing).
    pub existing_flow: Option<CtValue>,
    /// The live affinity entry for this client and frontend, if any.
    pub affinity: Option<AffinityValue>,
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Octets of an address, 4 or 16 of them.
fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A TCP SYN, a UDP datagram or an SCTP packet (common header and an INIT
/// chunk) from `from` to `to` (same family), with valid checksums.
pub fn synthetic_packet(from: SocketAddr, to: SocketAddr, proto: Protocol) -> Vec<u8> {
    let l4_len = match proto {
        Protocol::Tcp => 20,
        Protocol::Udp => 8 + 4,
        Protocol::Sctp => 12 + 20,
    };
    let v6 = to.is_ipv6();
    let ip_len = if v6 { 40 } else { 20 };
    let mut p = vec![0u8; 14 + ip_len + l4_len];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    let (src, dst) = (octets(from.ip()), octets(to.ip()));
    let ip = &mut p[14..14 + ip_len];
    if v6 {
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        ip[6] = proto.number();
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
    } else {
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = proto.number();
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = !fold(sum16(ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let l4 = &mut p[14 + ip_len..];
    l4[0..2].copy_from_slice(&from.port().to_be_bytes());
    l4[2..4].copy_from_slice(&to.port().to_be_bytes());
    match proto {
        Protocol::Tcp => {
            l4[4..8].copy_from_slice(&1u32.to_be_bytes());
            l4[12] = 5 << 4;
            l4[13] = 0x02; // SYN
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        }
        Protocol::Udp => {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4[8..12].copy_from_slice(b"lb?\n");
        }
        Protocol::Sctp => {
            // INIT: type 1, length 20, initiate tag, a_rwnd, streams, TSN.
            l4[12] = 1;
            l4[14..16].copy_from_slice(&20u16.to_be_bytes());
            l4[16..20].copy_from_slice(&1u32.to_be_bytes());
            l4[20..24].copy_from_slice(&65535u32.to_be_bytes());
            l4[24..26].copy_from_slice(&1u16.to_be_bytes());
            l4[26..28].copy_from_slice(&1u16.to_be_bytes());
            l4[28..32].copy_from_slice(&1u32.to_be_bytes());
            let crc = lb_common::sctp_crc::checksum(l4);
            l4[8..12].copy_from_slice(&crc.to_le_bytes());
            return p;
        }
    }
    let pseudo = sum16(&src) + sum16(&dst) + proto.number() as u32 + l4_len as u32;
    let csum_at = if proto == Protocol::Tcp { 16 } else { 6 };
    let c = !fold(pseudo + sum16(l4));
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    p
}

/// The tc program loaded against the live shared maps, with private
/// conntrack, affinity and counters: load once, explain many flows (each
/// program load costs its verification, seconds on a busy node).
pub struct Explainer {
    live: Maps,
    ebpf: aya::Ebpf,
    entry: Entry,
    ct_tcp: HashMap<MapData, CtKey, CtValue>,
    ct_other: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: Counters,
}

/// Empty a private map (the previous flow's state must not decide the next).
fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(), ExplainError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        map.remove(&key).map_err(|e| ExplainError::Map(name, e))?;
    }
    Ok(())
}

/// The object loaded with the live maps it only reads shared by pin
/// (`with_live_config`: the node settings too), and every map a program
/// writes private and small.
fn load_object(bpffs: &Path, with_live_config: bool) -> Result<aya::Ebpf, ExplainError> {
    let mut shared = vec![
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::BACKEND_SETS,
        map_names::BACKEND_SLOTS,
        map_names::SET_MEMBERS,
        map_names::REV_NAT,
        map_names::MAGLEV,
        map_names::SOURCE_RANGES,
        // Without the live prefilter, every packet would leave as none of lb's.
        map_names::PREFILTER4,
        map_names::PREFILTER6,
        // And without these, no unallocated Service IP would be dropped.
        map_names::SERVICE_CIDRS,
        map_names::ALLOCATED,
    ];
    if with_live_config {
        shared.push(map_names::CONFIG);
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, std::path::PathBuf)> =
        shared.iter().map(|n| (*n, bpffs.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    // Private, small: the live ones are only read, and copied from below.
    for name in [
        map_names::CT_TCP,
        map_names::CT_OTHER,
        map_names::AFFINITY,
        map_names::SOCK_NAT,
        map_names::SOCK_AFFINITY,
    ] {
        loader.map_max_entries(name, 16);
    }
    Ok(loader.load(crate::EBPF_OBJECT)?)
}

type Counters = PerCpuArray<MapData, u64>;

/// Zero the private counters: the next run's moved counters are its reasons.
fn zero_counters(stats: &mut Counters) -> Result<(), ExplainError> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| ExplainError::Map(map_names::STATS, aya::maps::MapError::IoError(e)))?;
    for i in 0..stat::COUNT {
        let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
            .map_err(|e| ExplainError::Map(map_names::STATS, aya::maps::MapError::IoError(e)))?;
        stats
            .set(i, zeros, 0)
            .map_err(|e| ExplainError::Map(map_names::STATS, e))?;
    }
    Ok(())
}

/// Names of the counters a run moved: the reasons for its verdict.
fn moved_counters(stats: &Counters) -> Vec<&'static str> {
    (0..stat::COUNT)
        .filter(|i| stats.get(i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0) > 0)
        .map(|i| stat::NAMES[i as usize])
        .collect()
}

impl Explainer {
    /// Load the program `entry` meets against the maps pinned under `bpffs`.
    pub fn load(bpffs: &Path, entry: Entry) -> Result<Self, ExplainError> {
        let live = Maps::open_pinned(bpffs)?;
        let mut ebpf = load_object(bpffs, true)?;
        let mut private = |name: &'static str| -> Result<aya::maps::Map, ExplainError> {
            ebpf.take_map(name)
                .ok_or(ExplainError::Maps(MapsError::Missing { name }))
        };
        let hash = |name: &'static str, map| {
            HashMap::try_from(map).map_err(|e| ExplainError::Map(name, e))
        };
        let ct_tcp = hash(map_names::CT_TCP, private(map_names::CT_TCP)?)?;
        let ct_other = hash(map_names::CT_OTHER, private(map_names::CT_OTHER)?)?;
        let affinity = HashMap::try_from(private(map_names::AFFINITY)?)
            .map_err(|e| ExplainError::Map(map_names::AFFINITY, e))?;
        let stats = PerCpuArray::try_from(private(map_names::STATS)?)
            .map_err(|e| ExplainError::Map(map_names::STATS, e))?;
        let program = entry.program();
        match ebpf.program_mut(program) {
            Some(Program::SchedClassifier(p)) => p.load()?,
            Some(Program::Xdp(p)) => p.load()?,
            Some(_) => return Err(ExplainError::NotRunnable { program }),
            None => return Err(ExplainError::Maps(MapsError::Missing { name: program })),
        }
        Ok(Explainer {
            live,
            ebpf,
            entry,
            ct_tcp,
            ct_other,
            affinity,
            stats,
        })
    }

    /// Run the program on one synthetic packet, from a clean private state
    /// holding only this flow's live conntrack entry and its client's live
    /// affinity entry. `rev_nat_id` is the frontend's (for the affinity
    /// lookup), when it has one.
    pub fn run(
        &mut self,
        from: SocketAddr,
        to: SocketAddr,
        proto: Protocol,
        rev_nat_id: Option<u32>,
    ) -> Result<Outcome, ExplainError> {
        clear(&mut self.ct_tcp, map_names::CT_TCP)?;
        clear(&mut self.ct_other, map_names::CT_OTHER)?;
        clear(&mut self.affinity, map_names::AFFINITY)?;
        zero_counters(&mut self.stats)?;
        let key = CtKey {
            src_addr_be: Addr::from(from.ip()),
            dst_addr_be: Addr::from(to.ip()),
            src_port_be: from.port().to_be(),
            dst_port_be: to.port().to_be(),
            proto: proto.number(),
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let (ct_name, live_ct, ct) = if proto.number() == lb_common::IPPROTO_TCP {
            (map_names::CT_TCP, &self.live.ct_tcp, &mut self.ct_tcp)
        } else {
            (map_names::CT_OTHER, &self.live.ct_other, &mut self.ct_other)
        };
        let existing_flow = live_ct.get(&key, 0).ok();
        if let Some(v) = existing_flow {
            ct.insert(key, v, 0)
                .map_err(|e| ExplainError::Map(ct_name, e))?;
        }
        let affinity_key = rev_nat_id.map(|id| AffinityKey {
            client_addr_be: Addr::from(from.ip()),
            rev_nat_id: id,
        });
        let affinity = affinity_key.and_then(|k| self.live.affinity.get(&k, 0).ok());
        if let (Some(k), Some(v)) = (affinity_key, affinity) {
            self.affinity
                .insert(k, v, 0)
                .map_err(|e| ExplainError::Map(map_names::AFFINITY, e))?;
        }
        let packet = synthetic_packet(from, to, proto);
        let mut out = vec![0u8; packet.len() + 128];
        let options = TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let program = self.entry.program();
        let result = match self.ebpf.program_mut(program) {
            Some(Program::SchedClassifier(p)) => p.test_run(options)?,
            Some(Program::Xdp(p)) => p.test_run(options)?,
            Some(_) => return Err(ExplainError::NotRunnable { program }),
            None => return Err(ExplainError::Maps(MapsError::Missing { name: program })),
        };
        // The ends as the packet left (a refusal's answer has them swapped).
        let (src, dst) = if to.is_ipv6() {
            let a: [u8; 16] = out[22..38].try_into().unwrap_or([0; 16]);
            let b: [u8; 16] = out[38..54].try_into().unwrap_or([0; 16]);
            (
                SocketAddr::new(IpAddr::from(a), u16::from_be_bytes([out[54], out[55]])),
                SocketAddr::new(IpAddr::from(b), u16::from_be_bytes([out[56], out[57]])),
            )
        } else {
            let a: [u8; 4] = out[26..30].try_into().unwrap_or([0; 4]);
            let b: [u8; 4] = out[30..34].try_into().unwrap_or([0; 4]);
            (
                SocketAddr::new(IpAddr::from(a), u16::from_be_bytes([out[34], out[35]])),
                SocketAddr::new(IpAddr::from(b), u16::from_be_bytes([out[36], out[37]])),
            )
        };
        Ok(Outcome {
            verdict: result.return_value as i32,
            source: src,
            destination: dst,
            reasons: moved_counters(&self.stats),
            existing_flow,
            affinity,
        })
    }
}

/// Run the program `entry` meets on one synthetic packet (see `Explainer::run`).
pub fn run(
    bpffs: &Path,
    entry: Entry,
    from: SocketAddr,
    to: SocketAddr,
    proto: Protocol,
    rev_nat_id: Option<u32>,
) -> Result<Outcome, ExplainError> {
    Explainer::load(bpffs, entry)?.run(from, to, proto, rev_nat_id)
}

/// What connect() of one of the node's sockets met.
#[derive(Debug)]
pub struct SocketOutcome {
    /// Socket-level LB is on (`--socket-lb`); when off, nothing ran.
    pub socket_lb: bool,
    /// connect()'s error: ENETUNREACH is the private namespace's (the call
    /// got past lb's program); ECONNREFUSED and EHOSTUNREACH are lb's refusals.
    pub errno: Option<i32>,
    /// The backend the socket was sent to, and its id, when translated.
    pub backend: Option<(SocketAddr, u32)>,
    /// Counters that moved, by name.
    pub reasons: Vec<&'static str>,
    /// The live affinity entry of the node's namespace for this frontend.
    pub affinity: Option<AffinityValue>,
    /// With `--socket-lb-all-namespaces` the live program (attached
    /// first) decided, and counted the call in the live counters.
    pub live_decided: bool,
    /// The address is an unallocated Service IP: a connect() lb leaves
    /// alone is dropped on the node's way out.
    pub unallocated: bool,
}

/// Whether `ip` is in a Service CIDR and no entry lists it nor a Service
/// holds it (the programs drop what is sent to it).
pub fn unallocated(live: &Maps, ip: IpAddr) -> bool {
    let Ok(cidrs) = live.service_cidrs.get(&0, 0) else {
        return false;
    };
    let key = Addr::from(ip);
    let within = match ip {
        IpAddr::V4(_) => cidrs.v4[..(cidrs.v4_count as usize).min(cidrs.v4.len())]
            .iter()
            .any(|p| key.be[3] & p.mask_be == p.addr_be),
        IpAddr::V6(_) => cidrs.v6[..(cidrs.v6_count as usize).min(cidrs.v6.len())]
            .iter()
            .any(|p| (0..4).all(|i| key.be[i] & p.mask.be[i] == p.addr.be[i])),
    };
    let listed = match ip {
        IpAddr::V4(_) => live.prefilter4.get(&key.be[3], 0).is_ok(),
        IpAddr::V6(_) => live.prefilter6.get(&key, 0).is_ok(),
    };
    within && !listed && live.allocated.get(&key, 0).is_err()
}

fn socket_err(what: &'static str) -> impl FnOnce(io::Error) -> ExplainError {
    move |source| ExplainError::Socket { what, source }
}

/// A socket of `proto` and `to`'s family, non-blocking: connect() may
/// never wait.
fn raw_socket(to: SocketAddr, proto: Protocol) -> Result<OwnedFd, ExplainError> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let kind = if proto == Protocol::Tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(socket_err("socket()")(io::Error::last_os_error()));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn socket_cookie(socket: &OwnedFd) -> Result<u64, ExplainError> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(socket_err("SO_COOKIE")(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// connect(): None when it succeeded (or is under way), else its errno.
fn connect(socket: &OwnedFd, to: SocketAddr) -> Option<i32> {
    let rc = match to {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    let errno = io::Error::last_os_error().raw_os_error();
    match (rc, errno) {
        (0, _) | (_, Some(libc::EINPROGRESS)) => None,
        (_, errno) => errno,
    }
}

/// connect() of one of the node's sockets to `to` through the socket-level
/// program (see the module's note). `rev_nat_id` is the frontend's, for the
/// affinity entry of the node's namespace.
pub fn run_socket(
    bpffs: &Path,
    cgroup: &Path,
    to: SocketAddr,
    proto: Protocol,
    rev_nat_id: Option<u32>,
) -> Result<SocketOutcome, ExplainError> {
    let live = Maps::open_pinned(bpffs)?;
    let config = live
        .config
        .get(&0, 0)
        .map_err(|e| ExplainError::Map(map_names::CONFIG, e))?;
    let node_affinity = rev_nat_id.and_then(|rev_nat_id| {
        live.sock_affinity
            .get(
                &SockAffinityKey {
                    netns_cookie: config.netns_cookie,
                    rev_nat_id,
                    _pad: 0,
                },
                0,
            )
            .ok()
    });
    let unallocated = unallocated(&live, to.ip());
    if config.flags & config_flags::SOCKET_LB == 0 {
        return Ok(SocketOutcome {
            socket_lb: false,
            errno: None,
            backend: None,
            reasons: Vec::new(),
            affinity: None,
            live_decided: false,
            unallocated,
        });
    }
    let all_netns = config.flags & config_flags::SOCKET_LB_ALL_NETNS != 0;
    let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| ExplainError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    // unshare() moves only the calling thread: this one ends with the namespace.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(socket_err("unshare(CLONE_NEWNET)")(
                        io::Error::last_os_error(),
                    ));
                }
                let cookie =
                    super::sockets::netns_cookie().map_err(socket_err("SO_NETNS_COOKIE"))?;
                let mut ebpf = load_object(bpffs, false)?;
                let private_map = |ebpf: &mut aya::Ebpf, name: &'static str| {
                    ebpf.take_map(name)
                        .ok_or(ExplainError::Maps(MapsError::Missing { name }))
                };
                // The node's settings, for this namespace alone.
                let mut private_config: Array<MapData, ConfigValue> =
                    Array::try_from(private_map(&mut ebpf, map_names::CONFIG)?)
                        .map_err(|e| ExplainError::Map(map_names::CONFIG, e))?;
                let mut own = config;
                own.netns_cookie = cookie;
                own.flags &= !config_flags::SOCKET_LB_ALL_NETNS;
                private_config
                    .set(0, own, 0)
                    .map_err(|e| ExplainError::Map(map_names::CONFIG, e))?;
                let mut affinity: HashMap<MapData, SockAffinityKey, AffinityValue> =
                    HashMap::try_from(private_map(&mut ebpf, map_names::SOCK_AFFINITY)?)
                        .map_err(|e| ExplainError::Map(map_names::SOCK_AFFINITY, e))?;
                let mut live_affinity = live.sock_affinity;
                if let (Some(rev_nat_id), Some(value)) = (rev_nat_id, node_affinity) {
                    let key = SockAffinityKey {
                        netns_cookie: cookie,
                        rev_nat_id,
                        _pad: 0,
                    };
                    affinity
                        .insert(key, value, 0)
                        .map_err(|e| ExplainError::Map(map_names::SOCK_AFFINITY, e))?;
                    if all_netns {
                        // The live program acts here too: give it the node's
                        // entry as well (taken back below).
                        live_affinity
                            .insert(key, value, 0)
                            .map_err(|e| ExplainError::Map(map_names::SOCK_AFFINITY, e))?;
                    }
                }
                let sock_nat: HashMap<MapData, SockNatKey, SockNatValue> =
                    HashMap::try_from(private_map(&mut ebpf, map_names::SOCK_NAT)?)
                        .map_err(|e| ExplainError::Map(map_names::SOCK_NAT, e))?;
                let mut stats: Counters =
                    PerCpuArray::try_from(private_map(&mut ebpf, map_names::STATS)?)
                        .map_err(|e| ExplainError::Map(map_names::STATS, e))?;
                zero_counters(&mut stats)?;
                let name = if to.is_ipv4() {
                    program_names::SOCK_CONNECT4
                } else {
                    program_names::SOCK_CONNECT6
                };
                let program: &mut CgroupSockAddr = ebpf
                    .program_mut(name)
                    .ok_or(ExplainError::Maps(MapsError::Missing { name }))?
                    .try_into()?;
                program.load()?;
                // Detached when `ebpf` drops, however this returns.
                program.attach(&cgroup_dir, CgroupAttachMode::Single)?;

                let socket = raw_socket(to, proto)?;
                let socket_cookie = socket_cookie(&socket)?;
                let errno = connect(&socket, to);
                let forward_key = SockNatKey {
                    socket_cookie,
                    addr_be: Addr::from(to.ip()),
                    port_be: to.port().to_be(),
                    proto: proto.number(),
                    dir: SOCK_DIR_FORWARD,
                    _pad: 0,
                };
                let mut chosen = sock_nat.get(&forward_key, 0).ok();
                let mut live_decided = false;
                if all_netns {
                    // The live programs act on every namespace, this one too,
                    // and the live one (attached first) decides. Take back
                    // what it wrote (its counters stay counted).
                    if let Ok(live_entry) = live.sock_nat.get(&forward_key, 0) {
                        live_decided = true;
                        chosen = Some(live_entry);
                        let reverse_key = SockNatKey {
                            addr_be: live_entry.addr_be,
                            port_be: live_entry.port_be,
                            dir: SOCK_DIR_REVERSE,
                            ..forward_key
                        };
                        let mut live_nat = live.sock_nat;
                        let _ = live_nat.remove(&forward_key);
                        let _ = live_nat.remove(&reverse_key);
                    }
                    if let Some(rev_nat_id) = rev_nat_id {
                        let _ = live_affinity.remove(&SockAffinityKey {
                            netns_cookie: cookie,
                            rev_nat_id,
                            _pad: 0,
                        });
                    }
                }
                let backend = chosen.map(|entry| {
                    (
                        SocketAddr::new(entry.addr_be.ip(), u16::from_be(entry.port_be)),
                        entry.backend_id,
                    )
                });
                Ok(SocketOutcome {
                    socket_lb: true,
                    errno,
                    backend,
                    reasons: moved_counters(&stats),
                    affinity: node_affinity,
                    live_decided,
                    unallocated,
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
