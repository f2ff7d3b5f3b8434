//! Load the kernel programs, pin maps and links under --bpffs so traffic
//! keeps flowing while the agent is down, and attach the pod program to every
//! pod device and the node program (XDP, or tc) to every node device, now and
//! as devices appear.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpMode},
    },
};
use lb_common::{ConfigValue, LAYOUT_VERSION, map_names, program_names};
use thiserror::Error;
use tracing::{info, warn};

use super::maps::{
    Capacities, MapShape, Maps, MapsError, check_pin, check_pin_layout, shapes_with,
};
use super::migrate::{self, Migration, Pass};
use crate::config::DeviceMode;

/// Pin prefix of XDP links from agents that did not name the mode.
const LEGACY_XDP_PIN_PREFIX: &str = "xdp";

/// "native" / "generic", for messages.
fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Skb => "generic",
        _ => "native",
    }
}

/// statfs f_type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum LoadError {
    // Not a `source`: the message names it already, and a chain printing
    // it again would say it twice.
    #[error("{path}: {reason}")]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error(
        "{path}: {reason}; is a bpf filesystem mounted? (mount -t bpf bpf /sys/fs/bpf; \
         the DaemonSet mounts the host's)"
    )]
    NoBpffsDir {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "the pinned maps under {path} hold layout version {found}, this agent writes {expected}: \
         remove the pins or run the matching agent"
    )]
    LayoutVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("program {name} was refused by the kernel earlier")]
    Unloadable { name: &'static str },
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("writing {what}: {source}")]
    Map {
        what: &'static str,
        source: aya::maps::MapError,
    },
}

/// One program attached to a device, and the prefix of its link pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Pod device ingress: lb_tc_ingress.
    PodTc,
    /// Pod device egress: lb_tc_to_pod (replies into the client pod).
    PodEgress,
    /// Node device: lb_tc_node.
    NodeTc,
    /// Node device without an Ethernet header: lb_tc_node_l3.
    NodeTcL3,
    /// Node device: lb_xdp_node in the driver (native XDP).
    NodeXdp,
    /// Node device: lb_xdp_node as generic (skb) XDP.
    NodeXdpGeneric,
    /// Egress of every device but pod devices: lb_tc_node_egress (answers
    /// of the node's own sockets, hostNetwork endpoints, to outside
    /// clients; node sockets bound to a Service address masqueraded).
    NodeEgress,
    /// The same on a device without an Ethernet header: lb_tc_node_egress_l3.
    NodeEgressL3,
    /// Any other device's ingress: lb_tc_reply (replies only).
    ReplyTc,
    /// The same on a device without an Ethernet header: lb_tc_reply_l3.
    ReplyTcL3,
}

impl Attachment {
    const ALL: [Attachment; 10] = [
        Attachment::PodTc,
        Attachment::PodEgress,
        Attachment::NodeTc,
        Attachment::NodeTcL3,
        Attachment::NodeXdp,
        Attachment::NodeXdpGeneric,
        Attachment::NodeEgress,
        Attachment::NodeEgressL3,
        Attachment::ReplyTc,
        Attachment::ReplyTcL3,
    ];

    /// The tc programs loaded at start: what every node runs.
    const EAGER: [Attachment; 4] = [
        Attachment::PodTc,
        Attachment::PodEgress,
        Attachment::ReplyTc,
        Attachment::NodeEgress,
    ];

    fn pin_prefix(self) -> &'static str {
        match self {
            Attachment::PodTc => "tc",
            Attachment::PodEgress => "tce",
            Attachment::NodeTc => "tcn",
            Attachment::NodeTcL3 => "tcn3",
            Attachment::NodeXdp => "xdpn",
            Attachment::NodeXdpGeneric => "xdpg",
            Attachment::NodeEgress => "tcne",
            Attachment::NodeEgressL3 => "tcne3",
            Attachment::ReplyTc => "tcr",
            Attachment::ReplyTcL3 => "tcr3",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Attachment::PodTc => program_names::TC_INGRESS,
            Attachment::PodEgress => program_names::TC_TO_POD,
            Attachment::NodeEgress => program_names::TC_NODE_EGRESS,
            Attachment::NodeEgressL3 => program_names::TC_NODE_EGRESS_L3,
            Attachment::NodeTc => program_names::TC_NODE,
            Attachment::NodeTcL3 => program_names::TC_NODE_L3,
            Attachment::NodeXdp | Attachment::NodeXdpGeneric => program_names::XDP_NODE,
            Attachment::ReplyTc => program_names::TC_REPLY,
            Attachment::ReplyTcL3 => program_names::TC_REPLY_L3,
        }
    }

    /// The XDP attachment in `mode`.
    fn xdp(mode: XdpMode) -> Attachment {
        match mode {
            XdpMode::Skb => Attachment::NodeXdpGeneric,
            _ => Attachment::NodeXdp,
        }
    }

    fn tc_direction(self) -> TcAttachType {
        match self {
            Attachment::PodEgress | Attachment::NodeEgress | Attachment::NodeEgressL3 => {
                TcAttachType::Egress
            }
            _ => TcAttachType::Ingress,
        }
    }
}

/// What a device's link layer is, as far as our programs care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// An Ethernet header precedes IP (veth, NICs, bridges, VXLAN, Geneve).
    Ethernet,
    /// IP starts the packet (TUN, WireGuard, IPIP, GRE, SIT).
    L3,
    /// Loopback: nothing of ours passes there.
    Loopback,
    /// A link type whose header we cannot parse (InfiniBand, CAN ...).
    Other(u16),
}

/// ARPHRD_* values (linux/if_arp.h) of the devices we attach to.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_L3: [u16; 8] = [
    0xfffe, // NONE: TUN, WireGuard
    768,    // TUNNEL: IPIP
    769,    // TUNNEL6: ip6tnl
    776,    // SIT
    778,    // IPGRE
    823,    // IP6GRE
    519,    // RAWIP
    0xffff, // VOID
];

impl LinkKind {
    fn from_arphrd(kind: u16) -> LinkKind {
        match kind {
            ARPHRD_ETHER => LinkKind::Ethernet,
            ARPHRD_LOOPBACK => LinkKind::Loopback,
            k if ARPHRD_L3.contains(&k) => LinkKind::L3,
            k => LinkKind::Other(k),
        }
    }
}

/// The link type of `device` in the current network namespace (the
/// SIOCGIFHWADDR family; /sys/class/net may belong to another namespace).
pub fn link_kind(device: &str) -> std::io::Result<LinkKind> {
    let name = std::ffi::CString::new(device).map_err(std::io::Error::other)?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return Err(std::io::Error::other("device name too long"));
    }
    // SAFETY: a plain socket and ioctl on a zeroed ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.as_bytes().iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let ret = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if ret != 0 {
            return Err(err);
        }
        Ok(LinkKind::from_arphrd(
            req.ifr_ifru.ifru_hwaddr.sa_family as u16,
        ))
    }
}

/// The kernel driver of `device` in the current network namespace
/// (ethtool's GDRVINFO: "veth", "virtio_net", "mlx5_core" ...).
pub fn device_driver(device: &str) -> std::io::Result<String> {
    /// struct ethtool_drvinfo (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let name = std::ffi::CString::new(device).map_err(std::io::Error::other)?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return Err(std::io::Error::other("device name too long"));
    }
    // SAFETY: zeroed plain-data structs we own; the ioctl writes only into
    // `info`, which outlives the call.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.as_bytes().iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let ret = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if ret != 0 {
            return Err(err);
        }
        let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }
}

/// The programs a device gets: node devices the node program (tc on a
/// device without Ethernet, where XDP would not find one), pod devices the
/// pod program both ways, every other device the reply program, so a reply
/// is restored whichever device brings it (a second NIC, an overlay, a
/// tunnel). None: leave the device alone. `veth`: the device's driver is
/// veth, where `auto` mode picks tc (native XDP on veth holds XDP_TX answers
/// until the peer's next poll, or loses them). An XDP attachment here is
/// the wish; the mode it gets is settled when it is attached.
pub fn attachments_for(
    name: &str,
    link: LinkKind,
    veth: bool,
    pod_globs: &[String],
    devices: &[String],
    mode: DeviceMode,
) -> Option<Vec<Attachment>> {
    let l3 = match link {
        LinkKind::Ethernet => false,
        LinkKind::L3 => true,
        LinkKind::Loopback | LinkKind::Other(_) => return None,
    };
    if devices.iter().any(|d| d == name) {
        let ingress = match (l3, mode) {
            (true, _) => Attachment::NodeTcL3,
            (false, DeviceMode::Tc) => Attachment::NodeTc,
            (false, DeviceMode::Auto) if veth => Attachment::NodeTc,
            (false, DeviceMode::Auto | DeviceMode::Xdp) => Attachment::NodeXdp,
            (false, DeviceMode::XdpGeneric) => Attachment::NodeXdpGeneric,
        };
        let egress = if l3 {
            Attachment::NodeEgressL3
        } else {
            Attachment::NodeEgress
        };
        return Some(vec![ingress, egress]);
    }
    if !l3 && pod_globs.iter().any(|g| glob_match(g, name)) {
        return Some(vec![Attachment::PodTc, Attachment::PodEgress]);
    }
    Some(if l3 {
        vec![Attachment::ReplyTcL3, Attachment::NodeEgressL3]
    } else {
        vec![Attachment::ReplyTc, Attachment::NodeEgress]
    })
}

/// Attached devices, by ifindex.
struct Attached {
    name: String,
    kinds: Vec<Attachment>,
}

pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    attached: BTreeMap<u32, Attached>,
    /// Programs the kernel refused to load: not verified again (seconds of
    /// CPU each time), their devices left without them.
    unloadable: std::collections::BTreeSet<&'static str>,
    /// The maps a layout change replaced, until their flows are carried over.
    migration: Option<Migration>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |reason| LoadError::Io {
        path: path.to_path_buf(),
        reason,
    }
}

fn check_bpffs(path: &Path) -> Result<(), LoadError> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| LoadError::Io {
            path: path.into(),
            reason: std::io::Error::other(e),
        })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(LoadError::Io {
            path: path.into(),
            reason: std::io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs { path: path.into() });
    }
    Ok(())
}

/// The device of this namespace's default route per family (IPv4, IPv6),
/// lowest metric first, read from /proc/net (the current namespace's).
pub fn default_route_devices() -> (Option<String>, Option<String>) {
    // RTF_UP, RTF_REJECT (linux/route.h).
    const UP: u32 = 0x1;
    const REJECT: u32 = 0x200;
    let usable =
        |flags: &str| u32::from_str_radix(flags, 16).is_ok_and(|f| f & UP != 0 && f & REJECT == 0);
    let v4 = fs::read_to_string("/proc/net/route").ok().and_then(|t| {
        default_route_device(&t, |f| {
            // Iface Destination Gateway Flags(hex) RefCnt Use Metric(decimal) Mask ...
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" && usable(f[3]))
                .then(|| (f[0], f[6].parse().unwrap_or(u32::MAX)))
        })
    });
    let v6 = fs::read_to_string("/proc/net/ipv6_route")
        .ok()
        .and_then(|t| {
            default_route_device(&t, |f| {
                // dst dst_len src src_len gateway metric(hex) refcnt use flags(hex) iface
                (f.len() > 9 && f[1] == "00" && f[0].bytes().all(|b| b == b'0') && usable(f[8]))
                    .then(|| (f[9], u32::from_str_radix(f[5], 16).unwrap_or(u32::MAX)))
            })
        });
    (v4, v6)
}

fn default_route_device<'a>(
    table: &'a str,
    default: impl Fn(&[&'a str]) -> Option<(&'a str, u32)>,
) -> Option<String> {
    table
        .lines()
        .filter_map(|line| default(&line.split_whitespace().collect::<Vec<_>>()))
        .filter(|(dev, _)| *dev != "lo" && *dev != "*")
        .min_by_key(|(_, metric)| *metric)
        .map(|(dev, _)| dev.to_string())
}

/// Interfaces of the current network namespace: (ifindex, name). An
/// error (fd exhaustion, say) is not an empty namespace: callers must not
/// take it for one.
pub fn interfaces() -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(out)
}

/// The devices to compare attachments with, or None when the listing
/// cannot be trusted: it failed, or it is empty (a network namespace always
/// has `lo`). Then nothing is detached or forgotten.
pub fn trusted_listing(listing: std::io::Result<Vec<(u32, String)>>) -> Option<Vec<(u32, String)>> {
    match listing {
        Ok(devices) if !devices.is_empty() => Some(devices),
        Ok(_) => {
            warn!("the device list came back empty; keeping every attachment until it does not");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot list devices; keeping every attachment, will retry");
            None
        }
    }
}

/// Addresses of the named devices in the current network namespace, in the
/// order the devices are named (then the kernel's order): IPv4, and IPv6
/// other than link-local (NodePorts are not served on fe80::/10). An error
/// is not "no addresses": callers keep what they had.
pub fn device_addresses(devices: &[String]) -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut found: Vec<(String, IpAddr)> = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut p = list;
        while !p.is_null() {
            let entry = &*p;
            if !entry.ifa_addr.is_null() && !entry.ifa_name.is_null() {
                let name = CStr::from_ptr(entry.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                match (*entry.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                        found.push((name, IpAddr::V4(addr)));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                        let addr = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        if !addr.is_unicast_link_local() {
                            found.push((name, IpAddr::V6(addr)));
                        }
                    }
                    _ => {}
                }
            }
            p = entry.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    let mut out = Vec::new();
    for device in devices {
        out.extend(found.iter().filter(|(n, _)| n == device).cloned());
    }
    Ok(out)
}

/// The link an earlier agent pinned at `pin`, as a `L`; None when there is
/// none or it is unusable (then the pin is removed, with a log line).
fn pinned_link<L>(pin: &Path) -> Option<L>
where
    L: TryFrom<FdLink>,
    <L as TryFrom<FdLink>>::Error: std::fmt::Display,
{
    if !pin.exists() {
        return None;
    }
    let link = PinnedLink::from_pin(pin)
        .map_err(|e| e.to_string())
        .and_then(|p| L::try_from(FdLink::from(p)).map_err(|e| e.to_string()));
    match link {
        Ok(link) => Some(link),
        Err(e) => {
            drop_pin(pin, &e);
            None
        }
    }
}

fn drop_pin(pin: &Path, error: &dyn std::fmt::Display) {
    warn!(pin = %pin.display(), error = %error, "pinned link unusable; attaching anew");
    let _ = fs::remove_file(pin);
}

/// Pin a freshly attached link so it outlives the agent.
fn pin_link<L>(link: L, pin: &Path) -> Result<(), LoadError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let io = |e: String| LoadError::Io {
        path: pin.to_path_buf(),
        reason: std::io::Error::other(e),
    };
    FdLink::try_from(link)
        .map_err(|e| io(e.to_string()))?
        .pin(pin)
        .map_err(|e| io(e.to_string()))?;
    Ok(())
}

/// Let `device` accept packets whose source is one of the node's own
/// addresses. Translated packets re-enter the stack that way: external flows
/// source-NATed to the node address, and replies from a NodePort (a node
/// address) reverse-translated on the way back. Without it the stack drops
/// them as martians.
/// In a container /proc/sys is read-only; the DaemonSet mounts the host's
/// /proc/sys/net at /host/proc/sys/net for this.
fn accept_local(device: &str) {
    if let Err(errors) = device_sysctl(device, "accept_local", "1") {
        warn!(
            device,
            errors = %errors,
            "cannot set accept_local: NodePort replies and SNATed flows through this device will be dropped by the stack"
        );
    }
}

/// Write `net.ipv4.conf.<device>.<key>` in this namespace (or the host's
/// copy the DaemonSet mounts).
fn device_sysctl(device: &str, key: &str, value: &str) -> Result<(), String> {
    let tail = format!("ipv4/conf/{device}/{key}");
    let mut errors = Vec::new();
    for root in ["/proc/sys/net", "/host/proc/sys/net"] {
        let path = format!("{root}/{tail}");
        match fs::write(&path, value) {
            Ok(()) => return Ok(()),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Reverse-path filtering on a pod device drops what lb hands the stack
/// there with a node address as source (flows masqueraded to the node,
/// answers from a NodePort) when the fast path does not redirect it: the
/// device has no address, so any rp_filter mode rejects. Off on the pod
/// devices, as Cilium does; `all` still wins when it is stricter.
fn no_rp_filter(device: &str) {
    if let Err(errors) = device_sysctl(device, "rp_filter", "0") {
        warn!(device, errors = %errors, "cannot turn rp_filter off on this pod device");
    }
}

/// `net.ipv4.conf.all.rp_filter` when it is on (it overrides the devices').
pub fn global_rp_filter() -> Option<String> {
    ["/proc/sys/net", "/host/proc/sys/net"]
        .iter()
        .find_map(|root| fs::read_to_string(format!("{root}/ipv4/conf/all/rp_filter")).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| v != "0")
}

/// statfs f_type of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn check_cgroup2(path: &Path) -> Result<(), String> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err("not a cgroup v2 directory (pass --cgroup-root with the cgroup2 mount)".into());
    }
    Ok(())
}

/// The cgroup v2 mount of this mount namespace: /sys/fs/cgroup on unified
/// hierarchies, /sys/fs/cgroup/unified on hybrid ones, else the first
/// cgroup2 mount listed.
pub fn default_cgroup_root() -> Option<PathBuf> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if check_cgroup2(Path::new(candidate)).is_ok() {
            return Some(candidate.into());
        }
    }
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        (fs_type == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Shell-style glob with `*` and `?`, as --pod-devices uses.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Pinned maps written with another layout are never read as ours: a map
/// whose shape differs, or every map when LB_CONFIG records another layout
/// version, is replaced. Replaced pins move to `previous-layout/` (the
/// programs still attached keep using them, so traffic flows throughout)
/// and, where `migrate` converts their layout, the maps holding state and
/// the ids it names are returned open so their entries are carried over;
/// the directory goes once the hand-over is done (`Migration::finish`). An
/// agent that stops mid-hand-over finds it at its next start and resumes.
fn replace_stale_pins(bpffs: &Path, shapes: &[MapShape]) -> Result<Option<Migration>, LoadError> {
    let unpin = |path: &Path| fs::remove_file(path).map_err(io_err(path));
    for name in map_names::RETIRED {
        let path = bpffs.join(name);
        if path.exists() {
            warn!(
                map = name,
                "removing the pin of a map this version no longer uses"
            );
            unpin(&path)?;
        }
    }
    let carried: Vec<&'static str> = migrate::STATE_MAPS
        .into_iter()
        .chain(migrate::ID_MAPS)
        .collect();
    let previous = bpffs.join(migrate::PREVIOUS_DIR);
    // Move `names` aside (an older unfinished hand-over's maps go first).
    let set_aside = |names: &[&'static str]| -> Result<(), LoadError> {
        if previous.exists() {
            migrate::remove_previous(bpffs);
        }
        fs::create_dir_all(&previous).map_err(io_err(&previous))?;
        for name in names {
            let from = bpffs.join(name);
            if from.exists() {
                let to = previous.join(name);
                fs::rename(&from, &to).map_err(io_err(&to))?;
            }
        }
        Ok(())
    };
    let config_path = bpffs.join(map_names::CONFIG);
    if config_path.exists()
        && let Some(config_shape) = shapes.iter().find(|s| s.name == map_names::CONFIG)
        && check_pin(&config_path, config_shape).is_ok()
    {
        let version = migrate::layout_version(&config_path);
        if version != 0 && version != LAYOUT_VERSION {
            let names: Vec<&'static str> = shapes.iter().map(|s| s.name).collect();
            set_aside(&names)?;
            let migration = Migration::open(&previous, version, &carried);
            match &migration {
                Some(_) => warn!(
                    found = version,
                    expected = LAYOUT_VERSION,
                    bpffs = %bpffs.display(),
                    "pinned maps have another layout version: replacing all of them, carrying tracked flows, affinity and ids over"
                ),
                None => {
                    warn!(
                        found = version,
                        expected = LAYOUT_VERSION,
                        bpffs = %bpffs.display(),
                        "pinned maps have a layout version this agent cannot convert: replacing all of them; tracked flows will be re-balanced"
                    );
                    migrate::remove_previous(bpffs);
                }
            }
            return Ok(migration);
        }
    }
    let mut replaced = Vec::new();
    for shape in shapes {
        let path = bpffs.join(shape.name);
        if !path.exists() {
            continue;
        }
        match check_pin(&path, shape) {
            Ok(()) => {}
            Err(MapsError::Incompatible {
                found, expected, ..
            }) => {
                warn!(
                    map = shape.name,
                    found = %found,
                    expected = %expected,
                    "pinned map has another shape: replacing it"
                );
                replaced.push(shape.name);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if replaced.is_empty() {
        // A hand-over an earlier agent of this layout did not finish.
        return Ok(migrate::resume(bpffs, &carried));
    }
    // Same layout, other sizes: entries convert as they are, as long as
    // their key and value sizes are this layout's.
    let same_layout: Vec<&'static str> = replaced
        .iter()
        .copied()
        .filter(|name| carried.contains(name))
        .filter(|name| {
            let expected = shapes.iter().find(|s| s.name == *name);
            expected.is_some_and(|e| check_pin_layout(&bpffs.join(name), e, false).is_ok())
        })
        .collect();
    set_aside(&replaced)?;
    let migration = Migration::open(&previous, LAYOUT_VERSION, &same_layout);
    if migration.is_none() {
        migrate::remove_previous(bpffs);
    }
    Ok(migration)
}

impl Datapath {
    /// Load the programs with maps pinned under `bpffs` (adopting existing
    /// pins after checking their shape), and write the node config.
    pub fn load(bpffs: &Path, config: ConfigValue) -> Result<(Self, Maps), LoadError> {
        Self::load_sized(bpffs, config, Capacities::default())
    }

    /// `load` with the service and backend maps sized as given (a pinned map
    /// of another size is replaced, which drops its entries).
    pub fn load_sized(
        bpffs: &Path,
        config: ConfigValue,
        capacities: Capacities,
    ) -> Result<(Self, Maps), LoadError> {
        fs::create_dir_all(bpffs).map_err(|reason| LoadError::NoBpffsDir {
            path: bpffs.to_path_buf(),
            reason,
        })?;
        check_bpffs(bpffs)?;
        let links_dir = bpffs.join("links");
        fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        // The maps hold every flow of the node: root only.
        use std::os::unix::fs::PermissionsExt as _;
        for dir in [bpffs, links_dir.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }

        let shapes = shapes_with(capacities);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES, capacities.services)
            .map_max_entries(map_names::BACKENDS, capacities.backends)
            .map_max_entries(map_names::REV_NAT, capacities.services)
            .map_max_entries(map_names::BACKEND_SETS, capacities.backend_sets)
            .map_max_entries(map_names::BACKEND_SLOTS, capacities.backend_slots)
            .map_max_entries(map_names::SET_MEMBERS, capacities.backend_slots)
            .map_max_entries(map_names::CT_TCP, capacities.ct_tcp)
            .map_max_entries(map_names::CT_OTHER, capacities.ct_other)
            .map_max_entries(
                map_names::PREFILTER4,
                capacities.services.saturating_add(capacities.backends),
            )
            .map_max_entries(
                map_names::PREFILTER6,
                capacities.services.saturating_add(capacities.backends),
            )
            .map_max_entries(map_names::SERVICE_NAMES, capacities.services)
            .map_max_entries(map_names::ALLOCATED, capacities.services)
            .map_max_entries(map_names::SERVICE_STATS, capacities.service_counters);
        let paths: Vec<(&'static str, PathBuf)> = shapes
            .iter()
            .map(|s| (s.name, bpffs.join(s.name)))
            .collect();
        let migration = replace_stale_pins(bpffs, &shapes)?;
        for (name, path) in &paths {
            if path.exists() {
                info!(map = name, path = %path.display(), "adopting pinned map");
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        // Programs every node runs are verified now (a program the kernel
        // refuses stops the agent here); the others (node devices, L3
        // devices) when a device first needs them: each costs seconds of
        // verification.
        for name in Attachment::EAGER.map(Attachment::program) {
            let prog_err = |source| LoadError::Program { name, source };
            let tc: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(prog_err(ProgramError::NotLoaded))?
                .try_into()
                .map_err(prog_err)?;
            tc.load().map_err(prog_err)?;
        }

        let mut maps = Maps::take(&mut ebpf)?;
        if let Some(migration) = &migration {
            let copied = migration.copy(&mut maps, Pass::First);
            migration.report(Pass::First, &copied);
        }
        let config = ConfigValue {
            layout_version: LAYOUT_VERSION,
            ..config
        };
        maps.config
            .set(0, config, 0)
            .map_err(|source| LoadError::Map {
                what: "config",
                source,
            })?;
        Ok((
            Datapath {
                ebpf,
                bpffs: bpffs.into(),
                attached: BTreeMap::new(),
                unloadable: Default::default(),
                migration,
            },
            maps,
        ))
    }

    /// The replaced maps of a layout change (their entries are in the new
    /// maps already): the programs on the devices still use them, so the
    /// caller attaches the new programs once the new maps are synced and
    /// then copies what the old programs added (`migrate`).
    pub fn take_migration(&mut self) -> Option<Migration> {
        self.migration.take()
    }

    fn link_pin(&self, kind: Attachment, ifindex: u32, name: &str) -> PathBuf {
        self.bpffs
            .join("links")
            .join(format!("{}-{ifindex}-{name}", kind.pin_prefix()))
    }

    /// Attach to every device of the namespace what `attachments_for` says
    /// (node program to `devices`, pod programs to devices matching
    /// `pod_globs`, the reply program to the rest), where not attached yet,
    /// and forget devices that went away. Returns the devices newly attached.
    pub fn attach_matching(
        &mut self,
        pod_globs: &[String],
        devices: &[String],
        mode: DeviceMode,
    ) -> Vec<String> {
        self.attach_matching_where(pod_globs, devices, mode, |_, _| true)
    }

    /// `attach_matching` for the devices no earlier agent left a link on
    /// (devices created since): during an upgrade's hand-over the others
    /// keep the previous programs until the new maps are synced.
    pub fn attach_unclaimed(
        &mut self,
        pod_globs: &[String],
        devices: &[String],
        mode: DeviceMode,
    ) -> Vec<String> {
        let links = self.bpffs.join("links");
        let claimed: std::collections::BTreeSet<String> = fs::read_dir(&links)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let file = e.file_name().to_string_lossy().into_owned();
                        // "<kind>-<ifindex>-<name>": the device part.
                        file.split_once('-').map(|(_, device)| device.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.attach_matching_where(pod_globs, devices, mode, |ifindex, name| {
            !claimed.contains(&format!("{ifindex}-{name}"))
        })
    }

    fn attach_matching_where(
        &mut self,
        pod_globs: &[String],
        devices: &[String],
        mode: DeviceMode,
        wanted_device: impl Fn(u32, &str) -> bool,
    ) -> Vec<String> {
        let Some(current) = trusted_listing(interfaces()) else {
            return Vec::new();
        };
        let live: BTreeMap<u32, &str> = current.iter().map(|(i, n)| (*i, n.as_str())).collect();
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(i, a)| live.get(i) != Some(&a.name.as_str()))
            .map(|(i, _)| *i)
            .collect();
        for ifindex in gone {
            self.attached.remove(&ifindex);
            self.set_pod_device(ifindex, false);
        }
        self.prune_stale_link_pins(&live);

        let mut newly = Vec::new();
        // Pod devices first: each attach (link and pin) takes ~10 ms here,
        // and a new pod's first packets wait on its own device, not on the
        // other end of its veth pair.
        let mut order: Vec<&(u32, String)> = current.iter().collect();
        order.sort_by_key(|(ifindex, name)| {
            let pod = pod_globs.iter().any(|g| glob_match(g, name));
            (!pod, *ifindex)
        });
        for (ifindex, name) in order {
            if self.attached.contains_key(ifindex) || !wanted_device(*ifindex, name) {
                continue;
            }
            let link = match link_kind(name) {
                Ok(link) => link,
                // Gone meanwhile, most likely: the next round sees.
                Err(e) => {
                    warn!(device = %name, error = %e, "cannot read the device's link type; will retry");
                    continue;
                }
            };
            // Only node devices' drivers matter (auto mode on veth).
            let veth = mode == DeviceMode::Auto
                && link == LinkKind::Ethernet
                && devices.contains(name)
                && match device_driver(name) {
                    Ok(driver) => driver == "veth",
                    Err(e) => {
                        warn!(device = %name, error = %e, "cannot read the device's driver (ethtool); --device-mode auto assumes native XDP works");
                        false
                    }
                };
            if veth {
                info!(device = %name, "--device-mode auto: tc on this veth device (native XDP on veth delays or loses XDP_TX answers; --device-mode xdp forces it)");
            }
            let Some(wanted) = attachments_for(name, link, veth, pod_globs, devices, mode) else {
                if let LinkKind::Other(kind) = link {
                    warn!(device = %name, link_type = kind, "device has a link layer lb cannot parse; not attached");
                }
                // Remembered, so it is looked at once.
                self.attached.insert(
                    *ifindex,
                    Attached {
                        name: name.clone(),
                        kinds: Vec::new(),
                    },
                );
                continue;
            };
            let mut kinds = Vec::new();
            let mut failed = false;
            for kind in wanted {
                let result = match kind {
                    Attachment::NodeXdp | Attachment::NodeXdpGeneric => {
                        // auto: native or tc; xdp: native, else generic, else tc.
                        let order: &[XdpMode] = match (kind, mode) {
                            (Attachment::NodeXdpGeneric, _) => &[XdpMode::Skb],
                            (_, DeviceMode::Xdp) => &[XdpMode::Driver, XdpMode::Skb],
                            _ => &[XdpMode::Driver],
                        };
                        match self.attach_xdp(*ifindex, name, order) {
                            Ok(attached) => Ok(attached),
                            Err(e) => {
                                warn!(device = %name, error = %e, "XDP unavailable on this device; using the tc program");
                                self.attach_tc(Attachment::NodeTc, *ifindex, name)
                                    .map(|how| (Attachment::NodeTc, how))
                            }
                        }
                    }
                    _ => self.attach_tc(kind, *ifindex, name).map(|how| (kind, how)),
                };
                match result {
                    Ok((kind, how)) => {
                        info!(device = %name, ifindex, program = kind.program(), how, "program attached");
                        kinds.push(kind);
                    }
                    // Refused by the kernel: retrying cannot help.
                    Err(e) if self.unloadable.contains(kind.program()) => {
                        warn!(device = %name, error = %e, "device left without this program");
                    }
                    Err(e) => {
                        warn!(device = %name, error = %e, "attaching program failed; will retry");
                        failed = true;
                    }
                }
            }
            if failed {
                // Whatever did attach is pinned; the next round adopts it.
                continue;
            }
            accept_local(name);
            if kinds.contains(&Attachment::PodTc) {
                no_rp_filter(name);
                // Only a veth can take a peer redirect (its other end is
                // the pod's eth0); anything else matching --pod-devices
                // gets the fast path's neighbour redirect.
                let veth = device_driver(name).is_ok_and(|d| d == "veth");
                self.set_pod_device(*ifindex, veth);
            }
            // Make before break: programs of other kinds from an earlier run
            // go only now.
            let legacy = self
                .bpffs
                .join("links")
                .join(format!("{LEGACY_XDP_PIN_PREFIX}-{ifindex}-{name}"));
            for pin in Attachment::ALL
                .into_iter()
                .filter(|other| !kinds.contains(other))
                .map(|other| self.link_pin(other, *ifindex, name))
                .chain([legacy])
            {
                if pin.exists() {
                    info!(pin = %pin.display(), "detaching the previous program");
                    let _ = fs::remove_file(&pin);
                }
            }
            self.attached.insert(
                *ifindex,
                Attached {
                    name: name.clone(),
                    kinds,
                },
            );
            newly.push(name.clone());
        }
        newly
    }

    fn attach_tc(
        &mut self,
        kind: Attachment,
        ifindex: u32,
        name: &str,
    ) -> Result<&'static str, LoadError> {
        let pin = self.link_pin(kind, ifindex, name);
        let program = kind.program();
        let prog_err = |source| LoadError::Program {
            name: program,
            source,
        };
        self.load_tc(kind)?;
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(prog_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(prog_err)?;
        // A link from an earlier agent: swap its program atomically, so the
        // device is never without one.
        if let Some(link) = pinned_link::<SchedClassifierLink>(&pin) {
            match tc.attach_to_link(link) {
                Ok(_) => return Ok("replaced program of pinned link"),
                Err(e) => drop_pin(&pin, &e),
            }
        }
        let id = tc
            .attach_with_options(
                name,
                kind.tc_direction(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err)?;
        pin_link(tc.take_link(id).map_err(prog_err)?, &pin)?;
        Ok("attached (TCX) and pinned")
    }

    /// lb_xdp_node in the first of `order`'s modes that attaches, the link
    /// pinned like the tc ones (by mode). A device runs one XDP mode at a
    /// time, so a link an earlier agent left in another mode (or under the
    /// pin name agents before the split used) is replaced through the tc
    /// program: tc first, then the old link goes, then the new one comes.
    fn attach_xdp(
        &mut self,
        ifindex: u32,
        name: &str,
        order: &[XdpMode],
    ) -> Result<(Attachment, &'static str), LoadError> {
        let program = program_names::XDP_NODE;
        let prog_err = |source| LoadError::Program {
            name: program,
            source,
        };
        self.load_xdp()?;
        let preferred = Attachment::xdp(order[0]);
        let pin = self.link_pin(preferred, ifindex, name);
        if let Some(link) = pinned_link::<XdpLink>(&pin) {
            match self.xdp_program()?.attach_to_link(link) {
                Ok(_) => return Ok((preferred, "replaced program of pinned XDP link")),
                Err(e) => drop_pin(&pin, &e),
            }
        }
        let mut errors = Vec::new();
        for &mode in order {
            let kind = Attachment::xdp(mode);
            let others: Vec<PathBuf> = [
                self.link_pin(Attachment::xdp(XdpMode::Driver), ifindex, name),
                self.link_pin(Attachment::xdp(XdpMode::Skb), ifindex, name),
                self.bpffs
                    .join("links")
                    .join(format!("{LEGACY_XDP_PIN_PREFIX}-{ifindex}-{name}")),
            ]
            .into_iter()
            .filter(|p| *p != self.link_pin(kind, ifindex, name) && p.exists())
            .collect();
            if !others.is_empty() {
                // Make before break: the tc program holds the device meanwhile.
                let bridge = self.attach_tc(Attachment::NodeTc, ifindex, name)?;
                for old in &others {
                    info!(device = %name, pin = %old.display(), bridge, "switching XDP mode: detaching the previous XDP link while the tc program runs");
                    let _ = fs::remove_file(old);
                }
            }
            // The old link goes asynchronously once its pin is removed (the
            // kernel releases it from a workqueue): until then the other
            // mode is refused (EEXIST), so wait for it a little.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let attached = loop {
                match self.xdp_program()?.attach(name, mode) {
                    Ok(id) => break Ok(id),
                    Err(_) if !others.is_empty() && std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => break Err(format!("{}: {e}", xdp_mode_name(mode))),
                }
            };
            match attached {
                Ok(id) => {
                    let link = self.xdp_program()?.take_link(id).map_err(prog_err)?;
                    pin_link(link, &self.link_pin(kind, ifindex, name))?;
                    return Ok((
                        kind,
                        match mode {
                            XdpMode::Skb => "attached (XDP generic) and pinned",
                            _ => "attached (XDP native) and pinned",
                        },
                    ));
                }
                Err(e) => errors.push(e),
            }
        }
        Err(prog_err(ProgramError::IOError(std::io::Error::other(
            errors.join("; "),
        ))))
    }

    /// Verify and load `kind`'s tc program once (a refused one is not tried again).
    fn load_tc(&mut self, kind: Attachment) -> Result<(), LoadError> {
        let program = kind.program();
        let prog_err = |source| LoadError::Program {
            name: program,
            source,
        };
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(prog_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(prog_err)?;
        if tc.fd().is_err() {
            if self.unloadable.contains(program) {
                return Err(LoadError::Unloadable { name: program });
            }
            if let Err(e) = tc.load() {
                tracing::error!(program, error = %e, "the kernel refuses this program; devices that need it go without");
                self.unloadable.insert(program);
                return Err(prog_err(e));
            }
        }
        Ok(())
    }

    /// Verify now every program the namespace's devices will need, without
    /// attaching any: an upgrade's hand-over then swaps all devices within
    /// milliseconds instead of seconds of verification between two of them
    /// (while old and new programs share a flow, its replies may miss).
    pub fn prepare_matching(&mut self, pod_globs: &[String], devices: &[String], mode: DeviceMode) {
        let Some(current) = trusted_listing(interfaces()) else {
            return;
        };
        for (_, name) in &current {
            let Ok(link) = link_kind(name) else {
                continue;
            };
            let veth = mode == DeviceMode::Auto
                && link == LinkKind::Ethernet
                && devices.contains(name)
                && device_driver(name).is_ok_and(|driver| driver == "veth");
            let Some(wanted) = attachments_for(name, link, veth, pod_globs, devices, mode) else {
                continue;
            };
            for kind in wanted {
                let loaded = match kind {
                    Attachment::NodeXdp | Attachment::NodeXdpGeneric => self
                        .load_xdp()
                        // The tc program stands in where XDP will not attach.
                        .or_else(|_| self.load_tc(Attachment::NodeTc)),
                    _ => self.load_tc(kind),
                };
                if let Err(e) = loaded {
                    warn!(device = %name, error = %e, "cannot verify a program this device needs");
                }
            }
        }
    }

    fn load_xdp(&mut self) -> Result<(), LoadError> {
        let program = program_names::XDP_NODE;
        if self.xdp_program()?.fd().is_err() {
            if self.unloadable.contains(program) {
                return Err(LoadError::Unloadable { name: program });
            }
            if let Err(e) = self.xdp_program()?.load() {
                tracing::error!(program, error = %e, "the kernel refuses this program; devices that need it go without");
                self.unloadable.insert(program);
                return Err(LoadError::Program {
                    name: program,
                    source: e,
                });
            }
        }
        Ok(())
    }

    fn xdp_program(&mut self) -> Result<&mut Xdp, LoadError> {
        let program = program_names::XDP_NODE;
        let prog_err = |source| LoadError::Program {
            name: program,
            source,
        };
        self.ebpf
            .program_mut(program)
            .ok_or(prog_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(prog_err)
    }

    /// Remove link pins of devices that no longer exist (their links are defunct).
    fn prune_stale_link_pins(&self, live: &BTreeMap<u32, &str>) {
        let dir = self.bpffs.join("links");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some((_, rest)) = file.split_once('-') else {
                continue;
            };
            let Some((index, name)) = rest.split_once('-') else {
                continue;
            };
            let alive = index.parse::<u32>().ok().and_then(|i| live.get(&i)) == Some(&name);
            if !alive {
                info!(pin = %file, "removing link pin of a device that is gone");
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn socket_links_dir(&self) -> PathBuf {
        self.bpffs.join("links").join("cgroup")
    }

    /// Attach the socket-level programs to the cgroup v2 directory `cgroup`
    /// (the root cgroup: every process of the node) and pin their links.
    /// Make before break: links an earlier agent pinned are replaced only
    /// once the new ones are attached; while both run, the older program
    /// finds no frontend at the backend address the newer one wrote.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        let cgroup_err = |reason: String| LoadError::Cgroup {
            path: cgroup.to_path_buf(),
            reason,
        };
        check_cgroup2(cgroup).map_err(cgroup_err)?;
        let dir = self.socket_links_dir();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let cgroup_dir = fs::File::open(cgroup).map_err(|e| cgroup_err(e.to_string()))?;
        for (name, pin_name) in program_names::SOCKET {
            let prog_err = |source| LoadError::Program { name, source };
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(prog_err(ProgramError::NotLoaded))?
                .try_into()
                .map_err(prog_err)?;
            if program.fd().is_err() {
                program.load().map_err(prog_err)?;
            }
            // A cgroup *link* always coexists with others (the kernel wants
            // no flags for it); Single only means "no flags" here.
            let id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(prog_err)?;
            let link = program.take_link(id).map_err(prog_err)?;
            let pin = dir.join(pin_name);
            // bpffs refuses names with a dot.
            let fresh = dir.join(format!("{pin_name}-new"));
            let _ = fs::remove_file(&fresh);
            pin_link(link, &fresh)?;
            // The old link (if any) loses its last reference here and detaches.
            fs::rename(&fresh, &pin).map_err(io_err(&pin))?;
        }
        info!(cgroup = %cgroup.display(), "socket-level programs attached and pinned");
        Ok(())
    }

    /// Detach the socket-level programs an earlier agent left attached
    /// (socket-level LB turned off).
    pub fn detach_sockets(&self) {
        let dir = self.socket_links_dir();
        for (_, pin_name) in program_names::SOCKET {
            let pin = dir.join(pin_name);
            if pin.exists() {
                info!(pin = %pin.display(), "detaching the socket-level program");
                let _ = fs::remove_file(&pin);
            }
        }
    }

    /// Mark `ifindex` as a pod device the fast path may redirect into (or
    /// no longer). A failed write only costs the fast path's shortcut.
    fn set_pod_device(&mut self, ifindex: u32, pod: bool) {
        let Some(map) = self.ebpf.map_mut(map_names::POD_DEVICES) else {
            return;
        };
        let Ok(mut devices) = aya::maps::HashMap::<_, u32, u32>::try_from(map) else {
            return;
        };
        let result = if pod {
            devices.insert(ifindex, 1, 0)
        } else {
            match devices.remove(&ifindex) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        };
        if let Err(e) = result {
            warn!(ifindex, error = %e, "updating LB_POD_DEVICES failed: the fast path hands this device's packets to the neighbour subsystem instead");
        }
    }

    /// Attached devices and the programs each runs.
    pub fn attached_devices(&self) -> Vec<(String, &'static str)> {
        self.attached
            .values()
            .flat_map(|a| a.kinds.iter().map(|k| (a.name.clone(), k.program())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Attachment, LinkKind, attachments_for, glob_match, trusted_listing};
    use crate::config::DeviceMode;

    #[test]
    fn programs_per_device() {
        use Attachment::*;
        let pods = ["veth*".to_string()];
        let devices = ["eth0".to_string(), "tun0".to_string()];
        let cases = [
            (
                "eth0",
                LinkKind::Ethernet,
                DeviceMode::Xdp,
                Some(vec![NodeXdp, NodeEgress]),
            ),
            (
                "eth0",
                LinkKind::Ethernet,
                DeviceMode::Tc,
                Some(vec![NodeTc, NodeEgress]),
            ),
            // No Ethernet header: XDP would not find one, tc runs the L3 build.
            (
                "tun0",
                LinkKind::L3,
                DeviceMode::Xdp,
                Some(vec![NodeTcL3, NodeEgressL3]),
            ),
            (
                "veth1",
                LinkKind::Ethernet,
                DeviceMode::Xdp,
                Some(vec![PodTc, PodEgress]),
            ),
            // Everything else restores replies, whatever brought them.
            (
                "eth1",
                LinkKind::Ethernet,
                DeviceMode::Xdp,
                Some(vec![ReplyTc, NodeEgress]),
            ),
            (
                "vxlan.calico",
                LinkKind::Ethernet,
                DeviceMode::Tc,
                Some(vec![ReplyTc, NodeEgress]),
            ),
            (
                "wg0",
                LinkKind::L3,
                DeviceMode::Xdp,
                Some(vec![ReplyTcL3, NodeEgressL3]),
            ),
            ("lo", LinkKind::Loopback, DeviceMode::Xdp, None),
            ("ib0", LinkKind::Other(32), DeviceMode::Xdp, None),
            ("eth0", LinkKind::Loopback, DeviceMode::Tc, None),
            (
                "eth0",
                LinkKind::Ethernet,
                DeviceMode::XdpGeneric,
                Some(vec![NodeXdpGeneric, NodeEgress]),
            ),
            (
                "eth0",
                LinkKind::Ethernet,
                DeviceMode::Auto,
                Some(vec![NodeXdp, NodeEgress]),
            ),
        ];
        for (name, link, mode, want) in cases {
            assert_eq!(
                attachments_for(name, link, false, &pods, &devices, mode),
                want,
                "{name} ({link:?}, {mode:?})"
            );
        }
    }

    #[test]
    fn auto_mode_runs_tc_on_veth_unless_xdp_is_asked_for() {
        use Attachment::*;
        let devices = ["eth0".to_string()];
        for (mode, want) in [
            (DeviceMode::Auto, NodeTc),
            (DeviceMode::Xdp, NodeXdp),
            (DeviceMode::XdpGeneric, NodeXdpGeneric),
            (DeviceMode::Tc, NodeTc),
        ] {
            assert_eq!(
                attachments_for("eth0", LinkKind::Ethernet, true, &[], &devices, mode),
                Some(vec![want, NodeEgress]),
                "{mode:?} on veth"
            );
        }
    }

    #[test]
    fn a_failed_or_empty_device_listing_detaches_nothing() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(trusted_listing(Err(emfile)), None);
        assert_eq!(trusted_listing(Ok(Vec::new())), None);
        let lo = vec![(1, "lo".to_string())];
        assert_eq!(trusted_listing(Ok(lo.clone())), Some(lo));
    }

    #[test]
    fn globs() {
        let cases = [
            ("veth*", "veth0", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("lxc*", "lxc12ab", true),
            ("*", "anything", true),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("pfx-*-h", "pfx-3-h", true),
            ("pfx-*-h", "pfx-3-p", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(glob_match(pattern, name), want, "{pattern} vs {name}");
        }
    }
}
