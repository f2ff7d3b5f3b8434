//! `lb-agent dump`: what the datapath holds, read from the pinned maps by
//! any process. JSON output is a stable schema (docs/dump-schema.md).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context as _, Result, bail};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use lb_common::{
    Addr, BACKEND_STANDBY, BackendSetValue, BackendValue, CT_DIR_FORWARD, SOCK_DIR_FORWARD,
    ServiceKey, ServiceValue, backend_flags, config_flags, ct_flags, map_names, service_flags,
    stat,
};
use serde::Serialize;

use crate::{
    config::{DumpArgs, DumpWhat, ExplainArgs, ExplainVia, OutputFormat, ProtoArg},
    datapath::explain::Entry,
    datapath::maps::Maps,
    model::{FrontendKind, Protocol, Scope},
};

fn addr(a: Addr) -> IpAddr {
    a.ip()
}

/// "ip:port", with brackets around IPv6 addresses.
fn endpoint(a: Addr, port_be: u16) -> String {
    std::net::SocketAddr::new(a.ip(), u16::from_be(port_be)).to_string()
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

#[derive(Serialize)]
pub struct DumpEndpoint {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Serialize)]
pub struct DumpBackend {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// "active" or "terminating"; "missing" when a slot names an absent id.
    pub state: String,
    /// On another node (external traffic to it is source-NATed).
    pub remote: bool,
}

#[derive(Serialize)]
pub struct DumpService {
    pub frontend: DumpEndpoint,
    /// "internal" (traffic from pods and the node) or "external" (from outside).
    pub scope: Scope,
    #[serde(rename = "type")]
    pub kind: String,
    pub flags: Vec<&'static str>,
    pub rev_nat_id: u32,
    /// The backend set the frontend balances to (shared with the Service
    /// port's other frontends that select the same endpoints).
    pub backend_set_id: u32,
    pub affinity_timeout_s: u32,
    pub backends: Vec<DumpBackend>,
}

#[derive(Serialize)]
pub struct ServicesDump {
    pub services: Vec<DumpService>,
    /// Service IPs on which undeclared ports and protocols are rejected.
    pub service_ips: Vec<IpAddr>,
    /// Service addresses pings are answered for, per scope.
    pub pingable: Vec<DumpAddress>,
    /// What the agent could not program, and why.
    pub not_programmed: Vec<DumpNotProgrammed>,
}

#[derive(Serialize)]
pub struct DumpNotProgrammed {
    /// A Service port (`namespace/name:port`) or a Service IP.
    pub object: String,
    /// "map_full" (it does not fit) or "write_failed" (the kernel refused).
    pub cause: &'static str,
    pub reason: String,
}

#[derive(Serialize)]
pub struct DumpAddress {
    pub address: IpAddr,
    pub scope: Scope,
}

#[derive(Serialize)]
pub struct BackendsDump {
    pub backends: Vec<DumpBackend>,
}

#[derive(Serialize)]
pub struct DumpFlow {
    /// "forward" (client -> frontend) or "reply" (backend -> client).
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// Forward: the backend the destination becomes. Reply: the frontend the source becomes.
    pub translated_to: String,
    /// Source-NATed flows (hairpin, external to a remote backend): the
    /// source address written (forward) or the client restored (reply).
    pub snat: Option<IpAddr>,
    /// Port counterpart of `snat`.
    pub snat_port: Option<u16>,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub flags: Vec<&'static str>,
    pub age_s: f64,
    pub idle_s: f64,
    pub expires_in_s: f64,
    /// This direction's packets and bytes: counted only with
    /// `--conntrack-accounting` (None otherwise).
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// A socket the socket-level programs sent to a backend (node processes).
#[derive(Serialize)]
pub struct DumpSocket {
    /// The socket's cookie (as `ss -e` shows it, in decimal).
    pub socket_cookie: u64,
    pub protocol: String,
    /// The Service address the socket asked for.
    pub service: String,
    /// The backend it was sent to.
    pub backend: String,
    pub backend_id: u32,
    pub rev_nat_id: u32,
}

#[derive(Serialize)]
pub struct ConntrackDump {
    pub flows: Vec<DumpFlow>,
    /// Socket-level translations (no per-packet state exists for them).
    pub sockets: Vec<DumpSocket>,
}

#[derive(Serialize)]
pub struct DumpAffinity {
    pub client: IpAddr,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub idle_s: f64,
}

/// Socket-level affinity: the client is a network namespace.
#[derive(Serialize)]
pub struct DumpSocketAffinity {
    pub netns_cookie: u64,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub idle_s: f64,
}

#[derive(Serialize)]
pub struct AffinityDump {
    pub affinity: Vec<DumpAffinity>,
    pub sockets: Vec<DumpSocketAffinity>,
}

#[derive(Serialize)]
pub struct StatsDump {
    /// Counter name -> packets (kernel) or events (agent_* counters).
    pub counters: BTreeMap<&'static str, u64>,
    /// How full the hash maps are (conntrack first: when full, its least
    /// recently used flows are evicted; failed inserts count `err_ct_full`).
    pub maps: Vec<DumpMapFill>,
}

#[derive(Serialize)]
pub struct DumpMapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

fn frontend_flags(v: &ServiceValue) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (bit, name) in [
        (service_flags::AFFINITY, "affinity"),
        (service_flags::INTERNAL_LOCAL, "internal-local"),
        (service_flags::EXTERNAL_LOCAL, "external-local"),
        (service_flags::DROP_IF_EMPTY, "drop-if-empty"),
        (service_flags::MAGLEV, "maglev"),
        (service_flags::SOURCE_RANGES, "source-ranges"),
        (service_flags::MASQUERADE, "masquerade"),
        (service_flags::DSR, "dsr"),
    ] {
        if v.flags & bit != 0 {
            out.push(name);
        }
    }
    out
}

/// "active" (takes new flows), "terminating" (takes new flows only because
/// nothing is ready), "standby" (present, keeps its established flows only).
fn backend_state(v: &BackendValue) -> &'static str {
    if v.state == BACKEND_STANDBY {
        "standby"
    } else if v.flags & backend_flags::FALLBACK != 0 {
        "terminating"
    } else {
        "active"
    }
}

pub fn services(maps: &Maps) -> Result<ServicesDump> {
    let backends = backends(maps)?.backends;
    let by_id: BTreeMap<u32, &DumpBackend> = backends.iter().map(|b| (b.id, b)).collect();
    let mut sets: BTreeMap<u32, BackendSetValue> = BTreeMap::new();
    for entry in maps.backend_sets.iter() {
        let (id, v) = entry.context("reading LB_BACKEND_SETS")?;
        sets.insert(id, v);
    }
    let mut slots: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    for entry in maps.backend_slots.iter() {
        let (k, id) = entry.context("reading LB_BACKEND_SLOTS")?;
        slots.insert((k.set_id, k.slot), id);
    }
    type Id = (IpAddr, u16, u8, u8);
    let mut heads: BTreeMap<Id, ServiceValue> = BTreeMap::new();
    let mut service_ips = Vec::new();
    let mut pingable = Vec::new();
    for entry in maps.services.iter() {
        let (k, v): (ServiceKey, ServiceValue) = entry.context("reading LB_SERVICES")?;
        let scope = Scope::from_code(k.scope).unwrap_or(Scope::Internal);
        if k.port_be == 0 && k.proto == 0 {
            if v.flags & service_flags::ADDRESS_ONLY != 0 {
                service_ips.push(addr(k.addr_be));
            }
            if v.flags & service_flags::ECHO != 0 {
                pingable.push(DumpAddress {
                    address: addr(k.addr_be),
                    scope,
                });
            }
            continue;
        }
        heads.insert(
            (addr(k.addr_be), u16::from_be(k.port_be), k.proto, k.scope),
            v,
        );
    }
    service_ips.sort();
    pingable.sort_by_key(|a| (a.address, a.scope));
    let mut services = Vec::new();
    for ((a, port, proto, scope), head) in heads {
        // A frontend whose set is missing shows one "missing" backend: never
        // expected, shown so it can be noticed.
        let count = sets.get(&head.backend_set_id).map_or(1, |set| set.count);
        let backends = (0..count)
            .map(|s| {
                let id = slots.get(&(head.backend_set_id, s)).copied().unwrap_or(0);
                match by_id.get(&id) {
                    Some(b) => DumpBackend {
                        id,
                        address: b.address,
                        port: b.port,
                        protocol: b.protocol.clone(),
                        state: b.state.clone(),
                        remote: b.remote,
                    },
                    None => DumpBackend {
                        id,
                        address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        port: 0,
                        protocol: proto_name(proto),
                        state: "missing".into(),
                        remote: false,
                    },
                }
            })
            .collect();
        services.push(DumpService {
            frontend: DumpEndpoint {
                address: a,
                port,
                protocol: proto_name(proto),
            },
            scope: Scope::from_code(scope).unwrap_or(Scope::Internal),
            kind: FrontendKind::from_code(head.flags)
                .map_or_else(|| "Unknown".into(), |k| format!("{k:?}")),
            flags: frontend_flags(&head),
            rev_nat_id: head.rev_nat_id,
            backend_set_id: head.backend_set_id,
            affinity_timeout_s: head.affinity_timeout_s,
            backends,
        });
    }
    let mut not_programmed = Vec::new();
    for entry in maps.not_programmed.iter() {
        let (k, v) = entry.context("reading LB_NOT_PROGRAMMED")?;
        not_programmed.push(DumpNotProgrammed {
            object: k.object().to_string(),
            cause: if v.map_full != 0 {
                "map_full"
            } else {
                "write_failed"
            },
            reason: v.reason().to_string(),
        });
    }
    not_programmed.sort_by(|a, b| a.object.cmp(&b.object));
    Ok(ServicesDump {
        services,
        service_ips,
        pingable,
        not_programmed,
    })
}

pub fn backends(maps: &Maps) -> Result<BackendsDump> {
    let mut backends = Vec::new();
    for entry in maps.backends.iter() {
        let (id, v) = entry.context("reading LB_BACKENDS")?;
        backends.push(DumpBackend {
            id,
            address: addr(v.addr_be),
            port: u16::from_be(v.port_be),
            protocol: proto_name(v.proto),
            state: backend_state(&v).into(),
            remote: v.flags & backend_flags::REMOTE != 0,
        });
    }
    backends.sort_by_key(|b| b.id);
    Ok(BackendsDump { backends })
}

pub fn conntrack(maps: &Maps) -> Result<ConntrackDump> {
    let now = crate::datapath::monotonic_ns();
    let secs = |ns: u64| ns as f64 / 1e9;
    let accounting = maps
        .config
        .get(&0, 0)
        .is_ok_and(|c| c.flags & config_flags::CT_ACCOUNTING != 0);
    let mut flows = Vec::new();
    for (name, ct) in maps.conntrack() {
        for entry in ct.iter() {
            let (k, v) = entry.with_context(|| format!("reading {name}"))?;
            let mut flags = Vec::new();
            for (bit, name) in [
                (ct_flags::SYN_SEEN, "syn"),
                (ct_flags::REPLY_SEEN, "reply-seen"),
                (ct_flags::FIN_SEEN, "fin"),
                (ct_flags::FIN_REPLY_SEEN, "fin-reply"),
                (ct_flags::RST_SEEN, "rst"),
                (ct_flags::DSR, "dsr"),
                (ct_flags::DSR_LEARNT, "dsr-learnt"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name);
                }
            }
            let expires = v.last_seen_ns + v.lifetime_s as u64 * 1_000_000_000;
            flows.push(DumpFlow {
                direction: if k.dir == CT_DIR_FORWARD {
                    "forward"
                } else {
                    "reply"
                },
                protocol: proto_name(k.proto),
                source: endpoint(k.src_addr_be, k.src_port_be),
                destination: endpoint(k.dst_addr_be, k.dst_port_be),
                translated_to: endpoint(v.nat_addr_be, v.nat_port_be),
                snat: (!v.snat_addr_be.is_none()).then(|| addr(v.snat_addr_be)),
                snat_port: (!v.snat_addr_be.is_none()).then(|| u16::from_be(v.snat_port_be)),
                backend_id: v.backend_id,
                rev_nat_id: v.rev_nat_id,
                flags,
                age_s: secs(now.saturating_sub(v.created_ns)),
                idle_s: secs(now.saturating_sub(v.last_seen_ns)),
                expires_in_s: (expires as f64 - now as f64) / 1e9,
                packets: accounting.then_some(v.packets),
                bytes: accounting.then_some(v.bytes),
            });
        }
    }
    flows.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
    let mut sockets = Vec::new();
    for entry in maps.sock_nat.iter() {
        let (k, v) = entry.context("reading LB_SOCK_NAT")?;
        // The forward entry names both ends; its reverse twin adds nothing.
        if k.dir != SOCK_DIR_FORWARD {
            continue;
        }
        sockets.push(DumpSocket {
            socket_cookie: k.socket_cookie,
            protocol: proto_name(k.proto),
            service: endpoint(k.addr_be, k.port_be),
            backend: endpoint(v.addr_be, v.port_be),
            backend_id: v.backend_id,
            rev_nat_id: v.rev_nat_id,
        });
    }
    sockets.sort_by_key(|s| s.socket_cookie);
    Ok(ConntrackDump { flows, sockets })
}

pub fn affinity(maps: &Maps) -> Result<AffinityDump> {
    let now = crate::datapath::monotonic_ns();
    let mut out = Vec::new();
    for entry in maps.affinity.iter() {
        let (k, v) = entry.context("reading LB_AFFINITY")?;
        out.push(DumpAffinity {
            client: addr(k.client_addr_be),
            rev_nat_id: k.rev_nat_id,
            backend_id: v.backend_id,
            idle_s: now.saturating_sub(v.last_used_ns) as f64 / 1e9,
        });
    }
    let mut sockets = Vec::new();
    for entry in maps.sock_affinity.iter() {
        let (k, v) = entry.context("reading LB_SOCK_AFFINITY")?;
        sockets.push(DumpSocketAffinity {
            netns_cookie: k.netns_cookie,
            rev_nat_id: k.rev_nat_id,
            backend_id: v.backend_id,
            idle_s: now.saturating_sub(v.last_used_ns) as f64 / 1e9,
        });
    }
    Ok(AffinityDump {
        affinity: out,
        sockets,
    })
}

pub fn stats(maps: &Maps, bpffs: &std::path::Path) -> Result<StatsDump> {
    let values = maps.read_stats().context("reading LB_STATS")?;
    let capacity = |name: &str| {
        aya::maps::MapInfo::from_pin(bpffs.join(name))
            .map(|i| i.max_entries())
            .with_context(|| format!("reading {name}'s capacity"))
    };
    let fill = [
        (map_names::CT_TCP, maps.ct_tcp.keys().count()),
        (map_names::CT_OTHER, maps.ct_other.keys().count()),
        (map_names::SERVICES, maps.services.keys().count()),
        (map_names::BACKENDS, maps.backends.keys().count()),
        (map_names::BACKEND_SETS, maps.backend_sets.keys().count()),
        (map_names::BACKEND_SLOTS, maps.backend_slots.keys().count()),
        (map_names::SET_MEMBERS, maps.set_members.keys().count()),
        (map_names::MAGLEV, maps.maglev.keys().count()),
        (map_names::REV_NAT, maps.rev_nat.keys().count()),
        (map_names::AFFINITY, maps.affinity.keys().count()),
        (map_names::SOCK_NAT, maps.sock_nat.keys().count()),
    ];
    let maps = fill
        .into_iter()
        .map(|(map, entries)| {
            Ok(DumpMapFill {
                map,
                entries,
                capacity: capacity(map)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(StatsDump {
        counters: stat::NAMES.iter().copied().zip(values).collect(),
        maps,
    })
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// `dump stats --by-service`: every frontend's counters.
#[derive(Serialize)]
pub struct ServiceStatsDump {
    pub services: Vec<DumpServiceCounters>,
}

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct DumpServiceCounters {
    /// `namespace/name`; None when the agent has not named the frontend.
    pub service: Option<String>,
    /// The Service port's name (`""` when unnamed).
    pub port_name: Option<String>,
    /// `ip:port` (`[ip6]:port`).
    pub frontend: String,
    pub protocol: String,
    pub scope: Option<Scope>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub refused: u64,
    pub dropped: u64,
}

/// Every frontend's counters, summed over CPUs, by Service and frontend.
pub fn service_counters(maps: &Maps) -> Result<Vec<DumpServiceCounters>> {
    let slots = maps.service_stats.len();
    if slots <= 1 {
        bail!(
            "per-Service counters are off: run the agent with --service-counters \
             (LB_SERVICE_STATS has {slots} slot)"
        );
    }
    let mut out = Vec::new();
    for entry in maps.rev_nat.iter() {
        let (id, rev) = entry.context("reading LB_REV_NAT")?;
        if id >= slots {
            continue;
        }
        let per_cpu = maps
            .service_stats
            .get(&id, 0)
            .with_context(|| format!("reading LB_SERVICE_STATS[{id}]"))?;
        let mut sum = lb_common::ServiceCounters::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_connections += c.new_connections;
            sum.refused += c.refused;
            sum.dropped += c.dropped;
        }
        let (service, port_name) = match maps.service_names.get(&id, 0) {
            Ok(name) => {
                let (service, port) = crate::monitor::split_service_port(name.as_str());
                (Some(service), Some(port))
            }
            Err(_) => (None, None),
        };
        out.push(DumpServiceCounters {
            service,
            port_name,
            frontend: endpoint(rev.addr_be, rev.port_be),
            protocol: proto_name(rev.proto),
            scope: Scope::from_code(rev.scope),
            packets: sum.packets,
            bytes: sum.bytes,
            new_connections: sum.new_connections,
            refused: sum.refused,
            dropped: sum.dropped,
        });
    }
    out.sort_by(|a, b| {
        (&a.service, &a.frontend, &a.protocol, a.scope).cmp(&(
            &b.service,
            &b.frontend,
            &b.protocol,
            b.scope,
        ))
    });
    Ok(out)
}

pub fn run(args: &DumpArgs) -> Result<()> {
    if args.by_service && args.what != DumpWhat::Stats {
        bail!("--by-service goes with `dump stats` only");
    }
    let maps = Maps::open_pinned(&args.bpffs)
        .with_context(|| format!("opening the maps pinned under {}", args.bpffs.display()))?;
    let json = args.output == OutputFormat::Json;
    let text = match args.what {
        DumpWhat::Stats if args.by_service => {
            let services = service_counters(&maps)?;
            if json {
                serde_json::to_string_pretty(&ServiceStatsDump { services })?
            } else {
                let mut t = table(&[
                    "SERVICE", "FRONTEND", "SCOPE", "PACKETS", "BYTES", "NEW", "REFUSED", "DROPPED",
                ]);
                for s in &services {
                    let name = match (&s.service, &s.port_name) {
                        (Some(service), Some(port)) if !port.is_empty() => {
                            format!("{service}:{port}")
                        }
                        (Some(service), _) => service.clone(),
                        _ => "-".into(),
                    };
                    t.add_row(vec![
                        name,
                        format!("{}/{}", s.frontend, s.protocol),
                        s.scope
                            .map_or_else(|| "-".into(), |s| format!("{s:?}").to_lowercase()),
                        s.packets.to_string(),
                        s.bytes.to_string(),
                        s.new_connections.to_string(),
                        s.refused.to_string(),
                        s.dropped.to_string(),
                    ]);
                }
                t.to_string()
            }
        }
        DumpWhat::Services => {
            let d = services(&maps)?;
            if json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut t = table(&["FRONTEND", "TYPE", "FLAGS", "REV-NAT", "BACKENDS"]);
                for s in &d.services {
                    let backends = if s.backends.is_empty() {
                        "(none: rejected)".to_string()
                    } else {
                        s.backends
                            .iter()
                            .map(|b| {
                                let at = std::net::SocketAddr::new(b.address, b.port);
                                format!("{at} ({}) #{}", b.state, b.id)
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    };
                    t.add_row(vec![
                        format!(
                            "{}/{}{}",
                            std::net::SocketAddr::new(s.frontend.address, s.frontend.port),
                            s.frontend.protocol,
                            if s.scope == Scope::External {
                                " (external)"
                            } else {
                                ""
                            }
                        ),
                        s.kind.clone(),
                        s.flags.join(","),
                        s.rev_nat_id.to_string(),
                        backends,
                    ]);
                }
                let mut text = t.to_string();
                if !d.not_programmed.is_empty() {
                    let mut np = table(&["NOT PROGRAMMED", "CAUSE", "REASON"]);
                    for n in &d.not_programmed {
                        np.add_row(vec![n.object.clone(), n.cause.into(), n.reason.clone()]);
                    }
                    text = format!("{text}\n{np}");
                }
                text
            }
        }
        DumpWhat::Backends => {
            let d = backends(&maps)?;
            if json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut t = table(&["ID", "BACKEND", "STATE"]);
                for b in &d.backends {
                    t.add_row(vec![
                        b.id.to_string(),
                        format!(
                            "{}/{}",
                            std::net::SocketAddr::new(b.address, b.port),
                            b.protocol
                        ),
                        b.state.clone(),
                    ]);
                }
                t.to_string()
            }
        }
        DumpWhat::Conntrack => {
            let d = conntrack(&maps)?;
            if json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut t = table(&[
                    "DIR",
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "TRANSLATED",
                    "FLAGS",
                    "AGE",
                    "EXPIRES",
                    "PKTS",
                ]);
                for f in &d.flows {
                    t.add_row(vec![
                        f.direction.to_string(),
                        f.protocol.clone(),
                        f.source.clone(),
                        f.destination.clone(),
                        f.translated_to.clone(),
                        f.flags.join(","),
                        format!("{:.0}s", f.age_s),
                        format!("{:.0}s", f.expires_in_s),
                        f.packets.map_or("-".to_string(), |p| p.to_string()),
                    ]);
                }
                for sock in &d.sockets {
                    t.add_row(vec![
                        "socket".to_string(),
                        sock.protocol.clone(),
                        format!("cookie {}", sock.socket_cookie),
                        sock.service.clone(),
                        sock.backend.clone(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                    ]);
                }
                t.to_string()
            }
        }
        DumpWhat::Affinity => {
            let d = affinity(&maps)?;
            if json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut t = table(&["CLIENT", "REV-NAT", "BACKEND", "IDLE"]);
                for a in &d.affinity {
                    t.add_row(vec![
                        a.client.to_string(),
                        a.rev_nat_id.to_string(),
                        a.backend_id.to_string(),
                        format!("{:.0}s", a.idle_s),
                    ]);
                }
                for a in &d.sockets {
                    t.add_row(vec![
                        format!("netns {}", a.netns_cookie),
                        a.rev_nat_id.to_string(),
                        a.backend_id.to_string(),
                        format!("{:.0}s", a.idle_s),
                    ]);
                }
                t.to_string()
            }
        }
        DumpWhat::Stats => {
            let d = stats(&maps, &args.bpffs)?;
            if json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut t = table(&["COUNTER", "VALUE"]);
                for (name, value) in &d.counters {
                    t.add_row(vec![name.to_string(), value.to_string()]);
                }
                let mut m = table(&["MAP", "ENTRIES", "CAPACITY", "FILL"]);
                for fill in &d.maps {
                    m.add_row(vec![
                        fill.map.to_string(),
                        fill.entries.to_string(),
                        fill.capacity.to_string(),
                        format!(
                            "{:.1}%",
                            100.0 * fill.entries as f64 / fill.capacity.max(1) as f64
                        ),
                    ]);
                }
                format!("{t}\n{m}")
            }
        }
    };
    println!("{text}");
    Ok(())
}

/// Where `explain`'s flow starts.
enum ExplainFrom {
    /// A client address (a pod's, or one outside the node).
    Client(std::net::SocketAddr, bool),
    /// The node's own sockets.
    Node,
}

/// `lb-agent explain`: the frontend, its candidates, what decides, and the
/// program's verdict on a synthetic packet (or on the node's connect()).
pub fn explain(args: &ExplainArgs) -> Result<()> {
    let from = if args.from == "node" {
        if args.via.is_some_and(|v| v != ExplainVia::Pod) {
            bail!(
                "--from node is the node's own sockets (connect() through the socket-level programs); --via chooses where a client's packet comes in"
            );
        }
        ExplainFrom::Node
    } else {
        let (ip, port, given) = match args.from.parse::<std::net::SocketAddr>() {
            Ok(sa) => (sa.ip(), sa.port(), true),
            Err(_) => {
                let ip: IpAddr = args.from.parse().with_context(|| {
                    format!(
                        "--from {:?}: expected IP, IP:PORT ([IPv6]:PORT) or node",
                        args.from
                    )
                })?;
                (ip, 40000, false)
            }
        };
        if ip.is_ipv4() != args.to.is_ipv4() {
            bail!(
                "--from {ip} and --to {} are of different IP families",
                args.to
            );
        }
        ExplainFrom::Client(std::net::SocketAddr::new(ip, port), given)
    };
    let entry = match args.via.unwrap_or(ExplainVia::Pod) {
        ExplainVia::Pod => Entry::Pod,
        ExplainVia::Node => Entry::NodeTc,
        ExplainVia::Xdp => Entry::NodeXdp,
    };
    let proto = match args.proto {
        ProtoArg::Tcp => Protocol::Tcp,
        ProtoArg::Udp => Protocol::Udp,
        ProtoArg::Sctp => Protocol::Sctp,
    };
    let maps = Maps::open_pinned(&args.bpffs)
        .with_context(|| format!("opening the maps pinned under {}", args.bpffs.display()))?;
    let all = services(&maps)?;
    // The node's sockets and pods reach in-cluster entries; packets from
    // outside the external ones (externalTrafficPolicy's backends).
    let scope = match from {
        ExplainFrom::Node => Scope::Internal,
        ExplainFrom::Client(..) => entry.scope(),
    };
    let frontend = all.services.iter().find(|s| {
        s.scope == scope
            && s.frontend.address == args.to.ip()
            && s.frontend.port == args.to.port()
            && s.frontend.protocol == proto.to_string()
    });
    match from {
        ExplainFrom::Node => println!(
            "flow       node -> {}/{proto} (a socket of the node: socket-level LB at connect())",
            args.to
        ),
        ExplainFrom::Client(client, _) => {
            let via = match entry {
                Entry::Pod => "from a pod's device",
                Entry::NodeTc => "in on a node device (tc)",
                Entry::NodeXdp => "in on a node device (XDP)",
            };
            println!("flow       {client} -> {}/{proto} {via}", args.to)
        }
    }
    match frontend {
        None if all.service_ips.contains(&args.to.ip()) => {
            println!(
                "frontend   none: {} is a Service IP without port {}/{proto} (rejected like kube-proxy)",
                args.to.ip(),
                args.to.port()
            )
        }
        None if scope == Scope::External => println!(
            "frontend   none from outside: no NodePort, LoadBalancer IP or externalIP here (passes to the node's stack, unless it is a reply of a tracked flow)"
        ),
        None => println!(
            "frontend   none: not a Service frontend (passes untouched, unless it is a reply of a tracked flow)"
        ),
        Some(f) => {
            let flags = if f.flags.is_empty() {
                String::new()
            } else {
                format!(", {}", f.flags.join(", "))
            };
            println!(
                "frontend   {}/{} {} (rev-NAT {}{flags})",
                std::net::SocketAddr::new(f.frontend.address, f.frontend.port),
                f.frontend.protocol,
                f.kind,
                f.rev_nat_id
            );
            if let Ok(name) = maps.service_names.get(&f.rev_nat_id, 0) {
                println!("service    {}", name.as_str());
            }
            // With --service-counters: what this frontend saw on this node.
            if let Ok(per_cpu) = maps.service_stats.get(&f.rev_nat_id, 0) {
                let sum = per_cpu.iter().fold([0u64; 5], |s, c| {
                    [
                        s[0] + c.packets,
                        s[1] + c.bytes,
                        s[2] + c.new_connections,
                        s[3] + c.refused,
                        s[4] + c.dropped,
                    ]
                });
                println!(
                    "counters   {} packets, {} bytes, {} new connections, {} refused, {} dropped",
                    sum[0], sum[1], sum[2], sum[3], sum[4]
                );
            }
            if f.backends.is_empty() {
                println!("candidates none");
            }
            for (i, b) in f.backends.iter().enumerate() {
                let head = if i == 0 { "candidates" } else { "" };
                let at = std::net::SocketAddr::new(b.address, b.port);
                println!("{head:<10} {at} {} #{}", b.state, b.id);
            }
        }
    }
    let random = frontend.is_some_and(|f| f.backends.len() > 1 && !f.flags.contains(&"maglev"));
    let direct = frontend.is_some_and(|f| f.flags.contains(&"dsr"));
    let rev_nat_id = frontend.map(|f| f.rev_nat_id);
    let (client, port_given) = match from {
        ExplainFrom::Node if proto == Protocol::Sctp => {
            println!(
                "verdict    not translated: socket-level LB handles TCP and UDP; the node's own SCTP packets leave to {} untranslated",
                args.to
            );
            return Ok(());
        }
        ExplainFrom::Node => {
            let cgroup = args
                .cgroup_root
                .clone()
                .or_else(crate::datapath::loader::default_cgroup_root)
                .context("no cgroup v2 mount found: pass --cgroup-root")?;
            let outcome = crate::datapath::explain::run_socket(
                &args.bpffs,
                &cgroup,
                args.to,
                proto,
                rev_nat_id,
            )
            .context("running the socket-level program on a connect()")?;
            explain_socket_verdict(&outcome, random);
            return Ok(());
        }
        ExplainFrom::Client(client, given) => (client, given),
    };
    let outcome =
        crate::datapath::explain::run(&args.bpffs, entry, client, args.to, proto, rev_nat_id)
            .context("running the program on a synthetic packet")?;
    match (&outcome.existing_flow, port_given) {
        (Some(ct), _) => println!(
            "existing   a tracked flow from this port decides: backend #{} ({})",
            ct.backend_id,
            endpoint(ct.nat_addr_be, ct.nat_port_be)
        ),
        (None, true) => println!("existing   no tracked flow from this port"),
        (None, false) => {
            println!("existing   not considered (give --from IP:PORT to match a flow)")
        }
    }
    if let Some(a) = &outcome.affinity {
        let idle = crate::datapath::monotonic_ns().saturating_sub(a.last_used_ns) as f64 / 1e9;
        println!(
            "affinity   client entry for backend #{} (idle {idle:.0}s), used for new flows while live and active",
            a.backend_id
        );
    }
    println!(
        "verdict    {}",
        packet_verdict(&outcome, entry, client, args.to, direct)
    );
    if random && outcome.existing_flow.is_none() && outcome.destination != args.to {
        println!(
            "           (a new flow picks a random candidate: another run may choose another)"
        );
    }
    Ok(())
}

/// What happened to explain's synthetic packet, in words.
fn packet_verdict(
    outcome: &crate::datapath::explain::Outcome,
    entry: Entry,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    direct: bool,
) -> String {
    let why = outcome.reasons.join(", ");
    enum Action {
        Pass,
        Drop,
        /// Sent on by the program itself (tc redirect, XDP_TX or redirect).
        Sent,
        Other,
    }
    // tc passes with TCX_NEXT (-1) or TC_ACT_OK (0); XDP has its own codes.
    let action = match (entry.is_xdp(), outcome.verdict) {
        (false, -1 | 0) | (true, 2) => Action::Pass,
        (false, 2) | (true, 0 | 1) => Action::Drop,
        (false, 7) | (true, 3 | 4) => Action::Sent,
        _ => Action::Other,
    };
    let answered = outcome
        .reasons
        .iter()
        .any(|r| r.starts_with("reject") || *r == "echo_reply");
    let mut translated = String::new();
    if outcome.destination != to {
        translated = format!("translated to {}", outcome.destination);
        if outcome.source != from {
            translated.push_str(&format!(
                ", source masqueraded to {} (replies come back to this node)",
                outcome.source
            ));
        } else if entry != Entry::Pod && direct {
            translated.push_str(
                ", client address kept (direct server return: if the endpoint is on another \
                 node, this node's egress adds the frontend to the flow's TCP SYN or each UDP \
                 datagram, and that node answers the client itself)",
            );
        } else if entry != Entry::Pod {
            translated.push_str(", client address kept");
        }
    }
    match action {
        Action::Drop => format!("dropped ({why})"),
        Action::Sent if answered => {
            format!("refused: answer sent back to the client ({why})")
        }
        Action::Sent if !translated.is_empty() => {
            format!("{translated}, sent on by the program itself ({why})")
        }
        Action::Sent => format!("sent on by the program itself ({why})"),
        Action::Pass if !translated.is_empty() => format!("{translated} ({why})"),
        Action::Pass => format!("passed untouched ({why})"),
        Action::Other => format!("return code {} ({why})", outcome.verdict),
    }
}

/// The verdict of the node's connect(), in words.
fn explain_socket_verdict(outcome: &crate::datapath::explain::SocketOutcome, random: bool) {
    if !outcome.socket_lb {
        println!(
            "verdict    socket-level LB is off (--socket-lb=false): connect() is not translated; the node's packets to a Service leave untranslated"
        );
        return;
    }
    if let Some(a) = &outcome.affinity {
        let idle = crate::datapath::monotonic_ns().saturating_sub(a.last_used_ns) as f64 / 1e9;
        println!(
            "affinity   the node's entry for backend #{} (idle {idle:.0}s), used while live and active",
            a.backend_id
        );
    }
    let why = outcome.reasons.join(", ");
    let verdict = match (outcome.backend, outcome.errno) {
        (_, Some(libc::ECONNREFUSED)) => {
            format!("refused: connect() fails with ECONNREFUSED ({why})")
        }
        (_, Some(libc::EHOSTUNREACH)) => {
            format!("refused: connect() fails with EHOSTUNREACH ({why})")
        }
        (Some((backend, id)), _) => format!(
            "translated at connect() to {backend} (backend #{id}); the node's packets go there directly, getpeername() shows the Service ({why})"
        ),
        (None, _) => {
            let why = if why.is_empty() {
                "not a frontend"
            } else {
                &why
            };
            if outcome.unallocated {
                format!(
                    "not translated, and dropped on the node's way out: an unallocated Service IP ({why})"
                )
            } else {
                format!("not translated: connect() goes to the address itself ({why})")
            }
        }
    };
    println!("verdict    {verdict}");
    if outcome.live_decided {
        println!(
            "           (--socket-lb-all-namespaces: the live program decided this connect() and counted it)"
        );
    }
    if random && outcome.backend.is_some() {
        println!(
            "           (a new connection picks a random candidate: another run may choose another)"
        );
    }
}
