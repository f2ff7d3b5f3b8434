//! `lb-agent monitor`: the datapath's events (`LB_EVENTS`) as they happen,
//! named with the Services they concern. It asks the programs for events
//! through `LB_MONITOR` while it runs and clears it when it stops: with
//! nobody listening no event is built.

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use ipnet::IpNet;
use lb_common::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, MonitorConfig, MonitorEvent, RevNatValue, ServiceName,
    event_kind, event_reason, map_names,
};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    config::{MonitorArgs, MonitorKind, OutputFormat},
    datapath::maps::{check_pin_layout, expected_shapes},
    model::{Protocol, Scope},
};

/// One event as the monitor shows it (`-o json`: one object per line; the
/// schema is in docs/dump-schema.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonitorRecord {
    /// Seconds since the epoch, when the monitor read the event.
    pub time: f64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub reason: &'static str,
    /// `namespace/name`; None when no Service owns the frontend (any more).
    pub service: Option<String>,
    /// The Service's port name (empty for an unnamed port).
    pub port_name: Option<String>,
    /// The frontend the packet was for (`ip:port`, `[ip6]:port`).
    pub frontend: Option<String>,
    /// The backend chosen (new flows, SNAT exhaustion) or the flow's
    /// backend (ICMP errors); None otherwise.
    pub backend: Option<String>,
    pub src: String,
    pub dst: String,
    pub protocol: String,
    pub scope: Option<Scope>,
    /// The device the packet was seen on (its index if it is gone).
    pub device: String,
    /// ICMP errors: type and code as they arrived.
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
}

/// Where the monitor finds a frontend's name and address.
pub trait FrontendNames {
    /// The frontend of a rev-NAT id and its Service port name
    /// (`namespace/name:port`), if the agent wrote them.
    fn frontend(&mut self, rev_nat_id: u32) -> Option<(SocketAddr, Option<String>)>;
    /// The Service port name of some frontend on `addr` (for refusals of
    /// undeclared ports, which carry no rev-NAT id).
    fn on_address(&mut self, addr: IpAddr) -> Option<String>;
}

/// `address:port`, or the bare address for ICMP (which has no ports).
fn endpoint(addr: IpAddr, port: u16, proto: u8) -> String {
    if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
        addr.to_string()
    } else {
        SocketAddr::new(addr, port).to_string()
    }
}

/// An ICMP error's stable name, by its family, type and code.
pub fn icmp_reason(v6: bool, icmp_type: u8, code: u8) -> &'static str {
    match (v6, icmp_type, code) {
        (false, 3, 3) | (true, 1, 4) => "port_unreachable",
        (false, 3, 4) => "fragmentation_needed",
        (false, 3, _) | (true, 1, _) => "destination_unreachable",
        (true, 2, _) => "packet_too_big",
        (false, 11, _) | (true, 3, _) => "time_exceeded",
        (false, 12, _) | (true, 4, _) => "parameter_problem",
        _ => "icmp_error",
    }
}

/// Split `namespace/name:port` into `namespace/name` and the port name.
pub fn split_service_port(service_port: &str) -> (String, String) {
    match service_port.rsplit_once(':') {
        Some((service, port)) => (service.to_string(), port.to_string()),
        None => (service_port.to_string(), String::new()),
    }
}

/// What an event says, named. `device` names an interface index.
pub fn describe(
    event: &MonitorEvent,
    names: &mut impl FrontendNames,
    device: &mut impl FnMut(u32) -> String,
    time: f64,
) -> MonitorRecord {
    let src = event.src_be.ip();
    let dst = event.dst_be.ip();
    let (sport, dport) = (u16::from_be(event.sport_be), u16::from_be(event.dport_be));
    let kind = event_kind::NAMES
        .get(event.kind as usize)
        .copied()
        .unwrap_or("unknown");
    let reason = if event.kind == event_kind::ICMP {
        icmp_reason(dst.is_ipv6(), event.icmp_type, event.icmp_code)
    } else {
        event_reason::NAMES
            .get(event.reason as usize)
            .copied()
            .unwrap_or("unknown")
    };
    let (frontend, service_port) = if event.rev_nat_id != 0 {
        match names.frontend(event.rev_nat_id) {
            // A NodePort frontend on every node address: the packet's.
            Some((fe, name)) if fe.ip().is_unspecified() => {
                (Some(SocketAddr::new(dst, fe.port()).to_string()), name)
            }
            Some((fe, name)) => (Some(fe.to_string()), name),
            None => (Some(endpoint(dst, dport, event.proto)), None),
        }
    } else if event.reason == event_reason::UNDECLARED_PORT {
        (
            Some(endpoint(dst, dport, event.proto)),
            names.on_address(dst),
        )
    } else {
        (None, None)
    };
    let (service, port_name) = match service_port {
        Some(sp) => {
            let (service, port) = split_service_port(&sp);
            (Some(service), Some(port))
        }
        None => (None, None),
    };
    let backend = (!event.backend_be.is_none()).then(|| {
        endpoint(
            event.backend_be.ip(),
            u16::from_be(event.backend_port_be),
            event.proto,
        )
    });
    let icmp = event.kind == event_kind::ICMP
        || (event.proto == IPPROTO_ICMP || event.proto == IPPROTO_ICMPV6)
            && event.reason == event_reason::REWRITE_FAILED;
    MonitorRecord {
        time,
        kind,
        reason,
        service,
        port_name,
        frontend,
        backend,
        src: endpoint(src, sport, event.proto),
        dst: endpoint(dst, dport, event.proto),
        protocol: match event.proto {
            IPPROTO_ICMP => "ICMP".to_string(),
            IPPROTO_ICMPV6 => "ICMPv6".to_string(),
            p => Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string()),
        },
        scope: Scope::from_code(event.scope),
        device: device(event.ifindex),
        icmp_type: icmp.then_some(event.icmp_type),
        icmp_code: icmp.then_some(event.icmp_code),
    }
}

/// What the user filters on, beyond the kinds the datapath is asked for.
pub struct Filter {
    pub service: Option<String>,
    pub from: Option<IpNet>,
}

impl Filter {
    pub fn new(service: Option<&str>, from: Option<IpNet>) -> Result<Self> {
        if let Some(s) = service {
            let valid = s.split_once('/').is_some_and(|(ns, name)| {
                !ns.is_empty() && !name.is_empty() && !name.contains('/')
            });
            if !valid {
                bail!("--service {s:?}: expected NAMESPACE/NAME");
            }
        }
        Ok(Filter {
            service: service.map(str::to_string),
            from,
        })
    }

    pub fn matches(&self, record: &MonitorRecord, src: IpAddr) -> bool {
        if let Some(service) = &self.service
            && record.service.as_deref() != Some(service.as_str())
        {
            return false;
        }
        self.from.is_none_or(|net| net.contains(&src))
    }
}

/// The kinds asked for: the given ones, or drops, refusals and ICMP errors.
pub fn kinds_mask(kinds: &[MonitorKind]) -> u32 {
    let kinds: &[MonitorKind] = if kinds.is_empty() {
        &[MonitorKind::Drop, MonitorKind::Reject, MonitorKind::Icmp]
    } else {
        kinds
    };
    kinds.iter().fold(0, |mask, k| mask | 1 << k.code())
}

/// The pinned rev-NAT and name maps, read as events need them.
struct PinnedNames {
    rev_nat: HashMap<MapData, u32, RevNatValue>,
    names: HashMap<MapData, u32, ServiceName>,
    /// Address -> a Service port name on it, rebuilt at most every 2 s.
    by_address: StdHashMap<IpAddr, String>,
    built: Option<Instant>,
}

impl FrontendNames for PinnedNames {
    fn frontend(&mut self, rev_nat_id: u32) -> Option<(SocketAddr, Option<String>)> {
        let rev = self.rev_nat.get(&rev_nat_id, 0).ok()?;
        let name = self
            .names
            .get(&rev_nat_id, 0)
            .ok()
            .map(|n| n.as_str().to_string());
        Some((
            SocketAddr::new(rev.addr_be.ip(), u16::from_be(rev.port_be)),
            name,
        ))
    }

    fn on_address(&mut self, addr: IpAddr) -> Option<String> {
        let stale = self
            .built
            .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
        if !self.by_address.contains_key(&addr) && stale {
            self.by_address.clear();
            for (id, rev) in self.rev_nat.iter().flatten() {
                if let Ok(name) = self.names.get(&id, 0) {
                    self.by_address
                        .entry(rev.addr_be.ip())
                        .or_insert_with(|| name.as_str().to_string());
                }
            }
            self.built = Some(Instant::now());
        }
        self.by_address.get(&addr).cloned()
    }
}

/// Clears `LB_MONITOR` when the monitor stops, however it stops.
struct Listening {
    config: Array<MapData, MonitorConfig>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.config.set(0, MonitorConfig::default(), 0);
    }
}

/// One reader per ring buffer: two would take each other's events. The
/// lock is the `--bpffs` directory itself (flock), which a monitor on the
/// host and one in the agent's pod both see.
pub fn lock(bpffs: &Path) -> Result<File> {
    let dir = File::open(bpffs).with_context(|| format!("opening {}", bpffs.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another lb-agent monitor is reading the events of {}: the ring buffer has one reader",
            bpffs.display()
        );
    }
    Ok(dir)
}

/// Turn events off if no monitor holds the lock: one that was killed
/// (SIGKILL) could not. The agent calls this at start.
pub fn clear_abandoned(bpffs: &Path, monitor: &mut Array<MapData, MonitorConfig>) {
    if let Ok(_lock) = lock(bpffs)
        && monitor
            .get(&0, 0)
            .is_ok_and(|m| m != MonitorConfig::default())
    {
        let _ = monitor.set(0, MonitorConfig::default(), 0);
        tracing::info!("turned off datapath events a monitor left on");
    }
}

fn open_pin(bpffs: &Path, name: &'static str) -> Result<MapData> {
    let path = bpffs.join(name);
    if !path.exists() {
        bail!(
            "{} is not pinned: no lb datapath of this version under {} (is the agent running, and is --bpffs right?)",
            name,
            bpffs.display()
        );
    }
    if let Some(shape) = expected_shapes().iter().find(|s| s.name == name) {
        check_pin_layout(&path, shape, false)?;
    }
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

pub fn run(args: &MonitorArgs) -> Result<()> {
    let filter = Filter::new(args.service.as_deref(), args.from)?;
    if args.sample == 0 {
        bail!("--sample 0: report one new flow in N, N >= 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(stream(args, &filter))
}

async fn stream(args: &MonitorArgs, filter: &Filter) -> Result<()> {
    let _lock = lock(&args.bpffs)?;
    let events = RingBuf::try_from(Map::RingBuf(open_pin(&args.bpffs, map_names::EVENTS)?))
        .context("LB_EVENTS")?;
    let mut names = PinnedNames {
        rev_nat: HashMap::try_from(Map::HashMap(open_pin(&args.bpffs, map_names::REV_NAT)?))
            .context("LB_REV_NAT")?,
        names: HashMap::try_from(Map::HashMap(open_pin(
            &args.bpffs,
            map_names::SERVICE_NAMES,
        )?))
        .context("LB_SERVICE_NAMES")?,
        by_address: StdHashMap::new(),
        built: None,
    };
    // Events a killed monitor left unread are not this one's.
    let mut events = events;
    while events.next().is_some() {}
    let mut config: Array<MapData, MonitorConfig> =
        Array::try_from(Map::Array(open_pin(&args.bpffs, map_names::MONITOR)?))
            .context("LB_MONITOR")?;
    config
        .set(
            0,
            MonitorConfig {
                kinds: kinds_mask(&args.kinds),
                sample: args.sample,
            },
            0,
        )
        .context("asking the datapath for events (LB_MONITOR)")?;
    let _listening = Listening { config };

    let mut devices: StdHashMap<u32, String> = StdHashMap::new();
    let mut device = |ifindex: u32| {
        devices
            .entry(ifindex)
            .or_insert_with(|| device_name(ifindex))
            .clone()
    };
    let mut out = std::io::stdout().lock();
    if args.output == OutputFormat::Table {
        writeln!(out, "{}", table_line(None))?;
    }
    let mut shown = 0u64;
    // SAFETY: the ring buffer owns its map descriptor, the same one for as
    // long as the AsyncFd owns the ring buffer.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|e| e.into_parts().1)
        .context("polling LB_EVENTS")?;
    // Every signal that ends a terminal session or asks to stop: each
    // leaves through `Listening`, which turns the events off.
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut quit = signal(SignalKind::quit()).context("SIGQUIT handler")?;
    loop {
        tokio::select! {
            ready = events.readable_mut() => {
                let mut ready = ready.context("polling LB_EVENTS")?;
                let ring = ready.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<MonitorEvent>() {
                        continue;
                    }
                    // SAFETY: a record the programs wrote as a MonitorEvent
                    // (plain data; the ring's records are 8-byte aligned).
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MonitorEvent>()) };
                    let record = describe(&event, &mut names, &mut device, now());
                    if !filter.matches(&record, event.src_be.ip()) {
                        continue;
                    }
                    match args.output {
                        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&record)?)?,
                        OutputFormat::Table => writeln!(out, "{}", table_line(Some(&record)))?,
                    }
                    shown += 1;
                    if args.count.is_some_and(|n| shown >= n) {
                        out.flush()?;
                        return Ok(());
                    }
                }
                out.flush()?;
                ready.clear_ready();
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => break,
            _ = quit.recv() => break,
        }
    }
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

fn device_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return ifindex.to_string();
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A line of the table (the header for None).
fn table_line(record: Option<&MonitorRecord>) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let cols: [String; 9] = match record {
        None => [
            "TYPE",
            "REASON",
            "SERVICE",
            "FRONTEND",
            "BACKEND",
            "SOURCE",
            "DESTINATION",
            "SCOPE",
            "DEVICE",
        ]
        .map(String::from),
        Some(r) => [
            r.kind.to_string(),
            r.reason.to_string(),
            dash(&r.service),
            dash(&r.frontend),
            dash(&r.backend),
            r.src.clone(),
            r.dst.clone(),
            r.scope
                .map_or_else(|| "-".to_string(), |s| format!("{s:?}").to_lowercase()),
            r.device.clone(),
        ],
    };
    format!(
        "{:<6} {:<22} {:<28} {:<22} {:<22} {:<22} {:<22} {:<8} {}",
        cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{Addr, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL};

    fn addr(ip: IpAddr) -> Addr {
        Addr::from(ip)
    }

    struct Fixed;
    impl FrontendNames for Fixed {
        fn frontend(&mut self, id: u32) -> Option<(SocketAddr, Option<String>)> {
            match id {
                7 => Some((
                    "10.96.0.10:80".parse().unwrap(),
                    Some("default/web:http".into()),
                )),
                8 => Some(("0.0.0.0:30080".parse().unwrap(), Some("default/np:".into()))),
                9 => Some(("[fd00:96::10]:53".parse().unwrap(), None)),
                _ => None,
            }
        }
        fn on_address(&mut self, addr: IpAddr) -> Option<String> {
            (addr.to_string() == "10.96.0.10").then(|| "default/web:http".into())
        }
    }

    fn event(kind: u8, reason: u8, src: &str, dst: &str, proto: u8) -> MonitorEvent {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        MonitorEvent {
            src_be: addr(src.ip()),
            dst_be: addr(dst.ip()),
            sport_be: src.port().to_be(),
            dport_be: dst.port().to_be(),
            kind,
            reason,
            proto,
            scope: SCOPE_INTERNAL,
            ifindex: 3,
            ..Default::default()
        }
    }

    fn describe_one(e: &MonitorEvent) -> MonitorRecord {
        describe(e, &mut Fixed, &mut |i| format!("if{i}"), 1.0)
    }

    #[test]
    fn events_are_named_by_their_service_frontend_and_reason() {
        struct Case {
            what: &'static str,
            event: MonitorEvent,
            kind: &'static str,
            reason: &'static str,
            service: Option<&'static str>,
            frontend: Option<&'static str>,
            backend: Option<&'static str>,
        }
        let mut new = event(
            event_kind::NEW,
            event_reason::NEW_FLOW,
            "10.244.1.2:40000",
            "10.96.0.10:80",
            IPPROTO_TCP,
        );
        new.rev_nat_id = 7;
        new.backend_be = addr("10.244.1.11".parse().unwrap());
        new.backend_port_be = 8080u16.to_be();
        let mut no_endpoints = event(
            event_kind::REJECT,
            event_reason::NO_ENDPOINTS,
            "10.244.1.2:40000",
            "10.96.0.10:80",
            IPPROTO_TCP,
        );
        no_endpoints.rev_nat_id = 7;
        let undeclared = event(
            event_kind::REJECT,
            event_reason::UNDECLARED_PORT,
            "10.244.1.2:40000",
            "10.96.0.10:81",
            IPPROTO_UDP,
        );
        let mut nodeport = event(
            event_kind::DROP,
            event_reason::NO_LOCAL_ENDPOINTS,
            "192.0.2.9:5555",
            "172.18.0.2:30080",
            IPPROTO_TCP,
        );
        nodeport.rev_nat_id = 8;
        nodeport.scope = SCOPE_EXTERNAL;
        let mut gone = event(
            event_kind::DROP,
            event_reason::SOURCE_RANGE,
            "192.0.2.9:5555",
            "10.96.0.99:80",
            IPPROTO_TCP,
        );
        gone.rev_nat_id = 1234;
        let mut unnamed6 = event(
            event_kind::DROP,
            event_reason::SOURCE_RANGE,
            "[2001:db8::9]:5555",
            "[fd00:96::10]:53",
            IPPROTO_UDP,
        );
        unnamed6.rev_nat_id = 9;
        let frag = event(
            event_kind::DROP,
            event_reason::FRAGMENT_WITHOUT_FIRST,
            "10.244.1.2:0",
            "10.96.0.10:0",
            IPPROTO_UDP,
        );
        let cases = [
            Case {
                what: "a new flow names its backend",
                event: new,
                kind: "new",
                reason: "new_flow",
                service: Some("default/web"),
                frontend: Some("10.96.0.10:80"),
                backend: Some("10.244.1.11:8080"),
            },
            Case {
                what: "a refusal for want of endpoints",
                event: no_endpoints,
                kind: "reject",
                reason: "no_endpoints",
                service: Some("default/web"),
                frontend: Some("10.96.0.10:80"),
                backend: None,
            },
            Case {
                what: "an undeclared port is named by its address",
                event: undeclared,
                kind: "reject",
                reason: "undeclared_port",
                service: Some("default/web"),
                frontend: Some("10.96.0.10:81"),
                backend: None,
            },
            Case {
                what: "a NodePort on every address shows the one the packet came to",
                event: nodeport,
                kind: "drop",
                reason: "no_local_endpoints",
                service: Some("default/np"),
                frontend: Some("172.18.0.2:30080"),
                backend: None,
            },
            Case {
                what: "a frontend removed meanwhile keeps the packet's destination",
                event: gone,
                kind: "drop",
                reason: "source_range",
                service: None,
                frontend: Some("10.96.0.99:80"),
                backend: None,
            },
            Case {
                what: "an IPv6 frontend without a name",
                event: unnamed6,
                kind: "drop",
                reason: "source_range",
                service: None,
                frontend: Some("[fd00:96::10]:53"),
                backend: None,
            },
            Case {
                what: "a fragment has no frontend to name",
                event: frag,
                kind: "drop",
                reason: "fragment_without_first",
                service: None,
                frontend: None,
                backend: None,
            },
        ];
        for case in cases {
            let r = describe_one(&case.event);
            assert_eq!(
                (
                    r.kind,
                    r.reason,
                    r.service.as_deref(),
                    r.frontend.as_deref(),
                    r.backend.as_deref()
                ),
                (
                    case.kind,
                    case.reason,
                    case.service,
                    case.frontend,
                    case.backend
                ),
                "{}",
                case.what
            );
            assert_eq!(r.device, "if3", "{}", case.what);
        }
    }

    #[test]
    fn icmp_errors_are_named_by_type_and_code_and_have_no_ports() {
        let mut e = event(
            event_kind::ICMP,
            event_reason::ICMP_ERROR,
            "10.244.1.11:0",
            "10.244.1.2:0",
            IPPROTO_ICMP,
        );
        e.rev_nat_id = 7;
        e.icmp_type = 3;
        e.icmp_code = 4;
        let r = describe_one(&e);
        assert_eq!(r.reason, "fragmentation_needed");
        assert_eq!(
            (r.src.as_str(), r.dst.as_str()),
            ("10.244.1.11", "10.244.1.2")
        );
        assert_eq!((r.icmp_type, r.icmp_code), (Some(3), Some(4)));
        assert_eq!(r.protocol, "ICMP");
        for (v6, t, c, name) in [
            (false, 3, 3, "port_unreachable"),
            (false, 3, 1, "destination_unreachable"),
            (false, 11, 0, "time_exceeded"),
            (true, 1, 4, "port_unreachable"),
            (true, 2, 0, "packet_too_big"),
            (true, 3, 0, "time_exceeded"),
            (true, 4, 1, "parameter_problem"),
            (false, 5, 0, "icmp_error"),
        ] {
            assert_eq!(icmp_reason(v6, t, c), name, "v6={v6} type {t} code {c}");
        }
    }

    #[test]
    fn filters_take_the_service_and_the_source_prefix() {
        let mut e = event(
            event_kind::REJECT,
            event_reason::NO_ENDPOINTS,
            "10.244.1.2:40000",
            "10.96.0.10:80",
            IPPROTO_TCP,
        );
        e.rev_nat_id = 7;
        let r = describe_one(&e);
        let src: IpAddr = "10.244.1.2".parse().unwrap();
        let f = |s: Option<&str>, from: Option<&str>| {
            Filter::new(s, from.map(|f| f.parse().unwrap())).unwrap()
        };
        assert!(f(None, None).matches(&r, src));
        assert!(f(Some("default/web"), None).matches(&r, src));
        assert!(!f(Some("default/other"), None).matches(&r, src));
        assert!(f(None, Some("10.244.0.0/16")).matches(&r, src));
        assert!(!f(None, Some("10.245.0.0/16")).matches(&r, src));
        for bad in ["web", "/web", "default/", "a/b/c"] {
            let err = Filter::new(Some(bad), None).err().expect(bad).to_string();
            assert!(err.contains("NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn without_types_drops_refusals_and_icmp_errors_are_asked_for() {
        let bit = |k: u8| 1u32 << k;
        assert_eq!(
            kinds_mask(&[]),
            bit(event_kind::DROP) | bit(event_kind::REJECT) | bit(event_kind::ICMP)
        );
        assert_eq!(kinds_mask(&[MonitorKind::New]), bit(event_kind::NEW));
    }
}
