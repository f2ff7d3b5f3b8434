//! Replies restored wherever they arrive. A client pod on node A reaches a
//! ClusterIP whose only endpoint is a pod on node B; pod traffic between
//! the nodes takes a path that is not one of lb's `--devices`: a second NIC
//! cabled between the nodes, a VXLAN overlay, or an L3 tunnel (a TUN device,
//! no Ethernet header, relayed over UDP). lb translates the request on the
//! client's pod device; the backend's reply (10.1.2.2 -> client) comes back
//! over that path and must reach the client as 10.96.0.10 -> client, or the
//! client answers the SYN-ACK with an RST and drops the datagram.
//!
//! The same rig carries what comes back besides replies: ICMP errors about
//! translated packets (the backend's port unreachable; "fragmentation
//! needed" / "packet too big" from node A or from a router between the
//! nodes), and flows of one client ip:port to two Services sharing the
//! backend ip:port.
//!
//! Only node A runs lb-agent, with its defaults (`--manifests`, the pod
//! device glob, no `--devices` unless a case says so); node B only routes.
//! `netfilter_control` runs the same rig with kube-proxy-style DNAT rules
//! instead of lb: it proves the rig itself carries the traffic.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_common::{DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN};
use lb_tests::e2e::{Cluster, DualStackService, Lan, Pod, field, node_addresses, try_field};

const CLUSTER_IP: &str = "10.96.0.10";
const CLUSTER_IP6: &str = "fd00:96::10";
const CLUSTER_IP_2: &str = "10.96.0.11";
const CLUSTER_IP6_2: &str = "fd00:96::11";
const CLIENT: &str = "10.1.1.2";
const CLIENT6: &str = "fd00:1:1::2";
const BACKEND: &str = "10.1.2.2";
const BACKEND6: &str = "fd00:1:2::2";
/// The underlay addresses of node A, node B and the router.
const LAN: [&str; 3] = ["192.168.50.1", "192.168.50.2", "192.168.50.3"];
/// The pod CIDRs of node A and node B (IPv4, IPv6).
const PODS: [(&str, &str); 2] = [
    ("10.1.1.0/24", "fd00:1:1::/64"),
    ("10.1.2.0/24", "fd00:1:2::/64"),
];
/// UDP port the TUN relays talk on.
const RELAY_PORT: u16 = 4790;
/// A port of `web` whose target port nothing listens on.
const CLOSED: u16 = 54;
/// The fixed source port of the client's sockets in the tuple clash cases.
const CLIENT_PORT: u16 = 40000;
/// Bytes the client uploads in the PMTU cases.
const UPLOAD: usize = 300_000;
/// A UDP datagram (and its answer) three fragments long at MTU 1500.
const DATAGRAM: usize = 3000;

/// The rig's Services, both served by web-b alone (the same backend ports).
const SERVICES: [DualStackService; 2] = [
    DualStackService {
        name: "web",
        app: "web",
        cluster_ips: [CLUSTER_IP, CLUSTER_IP6],
        ports: &[
            ("http", 80, 8080, "TCP"),
            ("dns", 53, 5353, "UDP"),
            ("closed", CLOSED, 5999, "UDP"),
        ],
    },
    DualStackService {
        name: "web2",
        app: "web",
        cluster_ips: [CLUSTER_IP_2, CLUSTER_IP6_2],
        ports: &[("http", 80, 8080, "TCP"), ("dns", 53, 5353, "UDP")],
    },
];
/// The only endpoint of both Services: the pod on node B (IPv4, IPv6).
const ENDPOINTS: [&str; 2] = [BACKEND, BACKEND6];

/// One address family of the rig.
struct Family {
    /// The ClusterIPs of `web` and `web2`.
    web: &'static str,
    web2: &'static str,
    client: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        web: CLUSTER_IP,
        web2: CLUSTER_IP_2,
        client: CLIENT,
    },
    Family {
        web: CLUSTER_IP6,
        web2: CLUSTER_IP6_2,
        client: CLIENT6,
    },
];

/// How pod traffic travels between the nodes.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// A veth cabled straight between the node namespaces, off the underlay.
    SecondNic,
    /// A VXLAN device on each node over the underlay.
    Vxlan,
    /// A TUN device (IFF_TUN | IFF_NO_PI) on each node, relayed over UDP on
    /// the underlay: an L3 device, like ipip, gre or wireguard.
    L3Tunnel,
}

impl Via {
    /// The path's link: device names after the node's prefix, subnets as
    /// stems (the first end is `.1` / `::1`, the second `.2` / `::2`), MTU
    /// (a VXLAN device's default over a 1500 underlay; the TUN device's
    /// chosen one).
    fn link(self) -> Link {
        let (suffix, subnets, mtu) = match self {
            Via::SecondNic => ("n", ("192.168.60.", "fd60::"), 1500),
            Via::Vxlan => ("vx", ("172.30.0.", "fd30::"), 1450),
            Via::L3Tunnel => ("t", ("172.31.0.", "fd31::"), 1400),
        };
        Link {
            via: self,
            suffix,
            subnets,
            mtu,
        }
    }
}

/// A link between two node namespaces.
struct Link {
    via: Via,
    suffix: &'static str,
    subnets: (&'static str, &'static str),
    mtu: u32,
}

/// What lies between node A and node B.
#[derive(Clone, Copy, Debug)]
enum Hop {
    /// The path joins the nodes.
    Direct,
    /// The path joins node A to a router, which reaches node B over a
    /// second NIC with this MTU (both of its ends).
    Router { mtu: u32 },
}

/// The router's link to node B in `Hop::Router`.
fn router_link(mtu: u32) -> Link {
    Link {
        via: Via::SecondNic,
        suffix: "r",
        subnets: ("192.168.70.", "fd70::"),
        mtu,
    }
}

/// What `--devices` lists on node A.
#[derive(Clone, Copy, Debug)]
enum Devices {
    None,
    /// The underlay's device (a DaemonSet configured for the node's main NIC).
    Lan,
    /// The path's device itself.
    Path,
}

/// What translates ClusterIP traffic on node A.
#[derive(Clone, Copy, Debug)]
enum Proxy {
    /// lb-agent with its defaults, `--devices` as given and `--device-mode` if given.
    Lb {
        devices: Devices,
        mode: Option<&'static str>,
    },
    /// No agent: kube-proxy-style DNAT rules in node A's PREROUTING.
    Netfilter,
}

struct Rig {
    via: Via,
    a: Cluster,
    /// Node B: routes, and holds the backend pod.
    _b: Cluster,
    /// Between node A and node B, if the rig has one.
    _router: Option<Cluster>,
    client: Pod,
    /// The smallest MTU between the client and the backend.
    path_mtu: u32,
    /// What this rig is, for failure messages.
    what: String,
    proxy: Proxy,
    /// Removed last (deleting a node namespace takes its end of each link with it).
    _lan: Lan,
}

fn python() -> &'static Path {
    Path::new("python3")
}

/// Build `link` between `ends` (each on the underlay at the given address
/// through the given device), address its devices, and route over it what
/// lies behind the other end: node B's pods from the first end, node A's
/// from the second. Returns the two devices.
fn join(link: &Link, mut ends: [&mut Cluster; 2], underlay: [(&str, &str); 2]) -> [String; 2] {
    let dev = [
        format!("{}{}", ends[0].topo.prefix, link.suffix),
        format!("{}{}", ends[1].topo.prefix, link.suffix),
    ];
    match link.via {
        Via::SecondNic => ends[0]
            .topo
            .wire(&dev[0], &ends[1].topo, &dev[1])
            .expect("a veth between the nodes"),
        Via::Vxlan => {
            for (i, node) in ends.iter().enumerate() {
                #[rustfmt::skip]
                let args = [
                    "link", "add", &dev[i], "type", "vxlan", "id", "42", "local", underlay[i].0,
                    "remote", underlay[1 - i].0, "dstport", "4789", "dev", underlay[i].1,
                ];
                node.topo
                    .node_ip(&args)
                    .unwrap_or_else(|e| panic!("vxlan on {}: {e}", node.node_name));
                node.topo.tx_off(&dev[i]).expect("vxlan tx offload off");
            }
        }
        Via::L3Tunnel => {
            for (i, node) in ends.iter_mut().enumerate() {
                let relay = node.topo.dir.join("tun_relay.py").display().to_string();
                let args = [
                    relay,
                    "--dev".into(),
                    dev[i].clone(),
                    "--local".into(),
                    format!("{}:{RELAY_PORT}", underlay[i].0),
                    "--remote".into(),
                    format!("{}:{RELAY_PORT}", underlay[1 - i].0),
                ];
                node.topo
                    .start_in_node("tun relay", python(), &args)
                    .unwrap_or_else(|e| panic!("tun relay on {}: {e}", node.node_name));
            }
        }
    }
    let (net4, net6) = link.subnets;
    for (i, node) in ends.iter().enumerate() {
        let topo = &node.topo;
        let d = dev[i].as_str();
        let (me, peer) = (i + 1, 2 - i);
        let ok = |r: Result<(), String>| r.unwrap_or_else(|e| panic!("{}: {e}", node.node_name));
        ok(topo.node_ip(&["link", "set", d, "mtu", &link.mtu.to_string()]));
        ok(topo.node_ip(&["addr", "add", &format!("{net4}{me}/24"), "dev", d]));
        let addr6 = format!("{net6}{me}/64");
        ok(topo.node_ip(&["-6", "addr", "add", &addr6, "dev", d, "nodad"]));
        ok(topo.node_ip(&["link", "set", d, "up"]));
        let (pods4, pods6) = PODS[1 - i];
        let (gw4, gw6) = (format!("{net4}{peer}"), format!("{net6}{peer}"));
        for (dest, gw) in [(pods4, gw4.as_str()), (pods6, gw6.as_str())] {
            match link.via {
                // No link layer: the device is the next hop.
                Via::L3Tunnel => ok(topo.node_ip(&["route", "add", dest, "dev", d])),
                _ => ok(topo.node_ip(&["route", "add", dest, "via", gw, "dev", d])),
            }
        }
    }
    dev
}

impl Rig {
    fn new(via: Via, proxy: Proxy) -> Self {
        Self::with(via, proxy, Hop::Direct)
    }

    fn with(via: Via, proxy: Proxy, hop: Hop) -> Self {
        let mut a = Cluster::named("node-a");
        let mut b = Cluster::named("node-b");
        let mut router = matches!(hop, Hop::Router { .. }).then(|| Cluster::named("router"));
        let mut lan = Lan::new(&a.topo).expect("underlay");
        let mut plug = |node: &Cluster, addr: &str| {
            lan.connect(&node.topo, &format!("{addr}/24"))
                .unwrap_or_else(|e| panic!("{} on the underlay: {e}", node.node_name))
        };
        let a_lan = plug(&a, LAN[0]);
        let b_lan = plug(&b, LAN[1]);
        let link = via.link();
        let (dev, path_mtu) = match (hop, router.as_mut()) {
            (Hop::Router { mtu }, Some(r)) => {
                let r_lan = plug(r, LAN[2]);
                let dev = join(&link, [&mut a, r], [(LAN[0], &a_lan), (LAN[2], &r_lan)]);
                let r_b = [(LAN[2], r_lan.as_str()), (LAN[1], b_lan.as_str())];
                join(&router_link(mtu), [r, &mut b], r_b);
                (dev, link.mtu.min(mtu))
            }
            _ => {
                let ends = [(LAN[0], a_lan.as_str()), (LAN[1], b_lan.as_str())];
                (join(&link, [&mut a, &mut b], ends), link.mtu)
            }
        };

        let client = a.dual_pod("client", CLIENT, CLIENT6, &[], &[]);
        b.dual_pod("web-b", BACKEND, BACKEND6, &[8080], &[5353]);
        for service in &SERVICES {
            a.write(
                &format!("{}.yaml", service.name),
                &service.yaml(ENDPOINTS, "node-b"),
            );
        }

        let on_a = match proxy {
            Proxy::Lb { devices, mode } => {
                let mut args = vec!["--manifests".to_string(), a.manifests.display().to_string()];
                match devices {
                    Devices::None => {}
                    Devices::Lan => args.extend(["--devices".into(), a_lan.clone()]),
                    Devices::Path => args.extend(["--devices".into(), dev[0].clone()]),
                }
                if let Some(mode) = mode {
                    args.extend(["--device-mode".into(), mode.into()]);
                }
                a.start_agent_with(&args);
                for frontend in SERVICES.iter().flat_map(|s| s.frontends(ENDPOINTS)) {
                    let backend = frontend.backend.to_string();
                    a.wait_backends(&frontend.key(), &[&backend], Duration::from_secs(10));
                }
                match &args[2..] {
                    [] => "lb-agent with its defaults (no --devices)".to_string(),
                    flags => format!("lb-agent with its defaults and {}", flags.join(" ")),
                }
            }
            Proxy::Netfilter => {
                netfilter_rules(&a);
                "no agent, iptables/ip6tables DNAT rules".to_string()
            }
        };
        let between = match hop {
            Hop::Direct => String::new(),
            Hop::Router { mtu } => format!(
                " to a router, which forwards to node B over a link with MTU {mtu} \
                 (smallest MTU between client and backend: {path_mtu})"
            ),
        };
        let what = format!(
            "{via:?} rig: client pod {CLIENT} / {CLIENT6} on node A -> Services web \
             ({CLUSTER_IP} / {CLUSTER_IP6}) and web2 ({CLUSTER_IP_2} / {CLUSTER_IP6_2}), \
             only endpoint web-b ({BACKEND} / {BACKEND6}) on node B; pod traffic between the \
             nodes over node A's {} (MTU {}){between}; node A runs: {on_a}",
            dev[0], link.mtu
        );
        Rig {
            via,
            a,
            _b: b,
            _router: router,
            client,
            path_mtu,
            what,
            proxy,
            _lan: lan,
        }
    }

    /// TCP and UDP over both families from the client pod to the ClusterIP:
    /// the backend answers, sees the client's own address, and its answer
    /// reaches the client from the ClusterIP (curl's connection and the
    /// UDP client's connected socket accept nothing else).
    fn check(&self) {
        let mut failures = Vec::new();
        for family in &FAMILIES {
            let (cluster_ip, client) = (family.web, family.client);
            let ip: IpAddr = cluster_ip.parse().expect("ClusterIP");
            let url = url(ip);
            let tcp = self
                .a
                .topo
                .curl(&self.client, &url, 3.0)
                .map_err(|(code, err)| {
                    format!("curl exit {code} ({}): {}", curl_meaning(code), err.trim())
                });
            let udp = self
                .a
                .topo
                .udp(&self.client, ip, 53, 2.0, 0)
                .map_err(|e| format!("{e}; {}", self.udp_source(ip)));
            for (what, result) in [
                (format!("TCP: curl {url}"), tcp),
                (format!("UDP: one datagram to {cluster_ip}:53"), udp),
            ] {
                let problem = match result {
                    Err(e) => Some(e),
                    Ok(body) if !body.contains("pod=") => {
                        Some(format!("unexpected answer {body:?}"))
                    }
                    Ok(body) if field(&body, "pod") != "web-b" => {
                        Some(format!("answered by the wrong pod: {body:?}"))
                    }
                    Ok(body) if !field(&body, "client").starts_with(&format!("{client}:")) => Some(
                        format!("the backend saw another client address than {client}: {body:?}"),
                    ),
                    Ok(_) => None,
                };
                if let Some(p) = problem {
                    failures.push(format!("{what} from the client pod ({client}): {p}"));
                }
            }
        }
        self.verdict(failures, 4);
    }

    /// A connected UDP socket in the client pod sends one datagram to
    /// ClusterIP:54, whose target port (5999) nothing listens on in web-b:
    /// the backend's port unreachable must reach the client as one from the
    /// ClusterIP about client -> ClusterIP:54, so the socket gets
    /// ECONNREFUSED at once (it waits half a second at most).
    fn closed_port_refused(&self) {
        let mut failures = Vec::new();
        for family in &FAMILIES {
            let ip: IpAddr = family.web.parse().expect("ClusterIP");
            let started = Instant::now();
            let result = self.a.topo.udp(&self.client, ip, CLOSED, 0.5, 0);
            let took = started.elapsed();
            let sent = format!(
                "one datagram from a connected UDP socket in the client pod ({}) to {}",
                family.client,
                std::net::SocketAddr::new(ip, CLOSED)
            );
            match result {
                Err(e) if e == "refused" => {}
                Err(e) if e == "timeout" => failures.push(format!(
                    "{sent}: no ECONNREFUSED within 0.5 s (client exited after {took:?}): \
                     web-b's port unreachable did not reach the client as an error about its \
                     datagram to the ClusterIP"
                )),
                other => failures.push(format!("{sent}: {other:?} after {took:?}")),
            }
        }
        failures.extend(self.errors_translated(2));
        self.verdict(failures, 2);
    }

    /// A DATAGRAM-byte UDP datagram from the client pod to web's ClusterIP
    /// (fragmented at the client's MTU of 1500) and its answer as large
    /// (fragmented by the backend): every fragment must be translated both
    /// ways, so the whole answer arrives from the ClusterIP.
    fn big_datagrams(&self) {
        let probe = self.a.topo.dir.join("sock_probe.py").display().to_string();
        let mut failures = Vec::new();
        for family in &FAMILIES {
            let ip: IpAddr = family.web.parse().expect("ClusterIP");
            let to = std::net::SocketAddr::new(ip, 53).to_string();
            let size = DATAGRAM.to_string();
            let args = ["python3", &probe, "big", family.web, "53", &size];
            let line = match self.a.topo.exec(&self.client.ns, &args) {
                Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
                Err(e) => e,
            };
            let want_size = DATAGRAM.to_string();
            let ok = try_field(&line, "from") == Some(to.as_str())
                && try_field(&line, "size") == Some(want_size.as_str())
                && try_field(&line, "bytes") == Some(want_size.as_str())
                && try_field(&line, "pod") == Some("web-b");
            if !ok {
                failures.push(format!(
                    "a {DATAGRAM}-byte datagram from the client pod ({}) to {to}, answer as \
                     large expected from {to}: got {line:?}",
                    family.client
                ));
            }
        }
        if let Proxy::Lb { .. } = self.proxy {
            let n = self.a.stats()["fragment"].as_u64().unwrap_or(0);
            // Both families, three fragments each way at least.
            if n < 12 {
                failures.push(format!(
                    "lb counted {n} fragments translated, want 12 or more"
                ));
            }
        }
        self.verdict(failures, 2);
    }

    /// With lb: a failure unless its `icmp_error_translated` counter shows
    /// at least `want` errors (the ones the client got came through lb).
    fn errors_translated(&self, want: u64) -> Option<String> {
        let Proxy::Lb { .. } = self.proxy else {
            return None;
        };
        let n = self.a.stats()["icmp_error_translated"]
            .as_u64()
            .unwrap_or(0);
        (n < want).then(|| format!("lb counted {n} ICMP errors translated, want {want} or more"))
    }

    /// The client pod uploads UPLOAD bytes over TCP to web's ClusterIP.
    /// Its first full-sized segments are too big for a hop on the way, which
    /// sends "fragmentation needed" / "packet too big" about client ->
    /// backend; translated back, it lowers the client's path MTU to the
    /// ClusterIP and the upload completes. Untranslated, the upload stalls.
    fn upload(&self) {
        let file = self.a.topo.dir.join("upload.bin");
        std::fs::write(&file, vec![b'x'; UPLOAD]).expect("upload file");
        let data = format!("@{}", file.display());
        #[rustfmt::skip]
        let args = [
            "--data-binary", &data, "-H", "Expect:", "-w", "%{stderr}(uploaded %{size_upload} bytes)",
        ];
        let mut failures = Vec::new();
        for family in &FAMILIES {
            let ip: IpAddr = family.web.parse().expect("ClusterIP");
            let url = url(ip);
            let started = Instant::now();
            let result = self.a.topo.curl_with(&self.client, &args, &url, 5.0);
            let took = started.elapsed();
            let mtu = self.client_path_mtu(ip);
            let sent = format!(
                "a {UPLOAD}-byte POST from the client pod ({}, MTU 1500) to {url}",
                family.client
            );
            let mtu_seen = match mtu {
                Some(m) => format!("the client's path MTU to {ip} is now {m}"),
                None => format!("the client holds no path MTU for {ip} (no error reached it)"),
            };
            let problem = match result {
                Err((code, err)) => Some(format!(
                    "curl exit {code} ({}) after {took:?}: {}; {mtu_seen}, smallest MTU on the \
                     way {}",
                    curl_meaning(code),
                    err.split_whitespace().collect::<Vec<_>>().join(" "),
                    self.path_mtu
                )),
                Ok(body) if try_field(&body, "bytes") != Some(&UPLOAD.to_string()) => {
                    Some(format!("unexpected answer {body:?} after {took:?}"))
                }
                Ok(body) if field(&body, "pod") != "web-b" => {
                    Some(format!("answered by the wrong pod: {body:?}"))
                }
                Ok(_) if mtu != Some(self.path_mtu) => Some(format!(
                    "the upload completed, but {mtu_seen}, not {}: the small hop was not \
                     exercised as the rig means",
                    self.path_mtu
                )),
                Ok(_) => None,
            };
            if let Some(p) = problem {
                failures.push(format!("{sent}: {p}"));
            }
        }
        failures.extend(self.errors_translated(2));
        self.verdict(failures, 2);
    }

    /// The path MTU the client pod holds for `ip` (`ip route get`), if any.
    fn client_path_mtu(&self, ip: IpAddr) -> Option<u32> {
        let out = self
            .a
            .topo
            .exec(&self.client.ns, &["ip", "route", "get", &ip.to_string()])
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "mtu")?;
        words.next()?.parse().ok()
    }

    /// One UDP socket and two TCP connections, each from CLIENT_PORT in the
    /// client pod, to web and web2: the same client ip:port towards the
    /// same backend ip:port. Each flow must work and each answer come from
    /// the ClusterIP it was sent to, so the backend must see the flows from
    /// two client ports (the second one rewritten).
    fn one_source_port(&self) {
        let mut failures = Vec::new();
        for family in &FAMILIES {
            for (mode, port, want) in [("udp_one_port", 53, 3), ("tcp_one_port", 80, 5)] {
                let hosts = [family.web, family.web2];
                if let Err(e) = self.one_port(mode, port, hosts, want) {
                    failures.push(format!(
                        "{mode}: from {}:{CLIENT_PORT} to {}:{port} and {}:{port}: {e}",
                        family.client, hosts[0], hosts[1]
                    ));
                }
            }
        }
        self.verdict(failures, 4);
    }

    /// sock_probe.py's `mode` from the client pod; `want` result lines.
    /// The backend must see the first flow (to `hosts[0]`) from CLIENT_PORT
    /// and the second from another port (lb: one of its SNAT range).
    fn one_port(&self, mode: &str, port: u16, hosts: [&str; 2], want: usize) -> Result<(), String> {
        let probe = self.a.topo.dir.join("sock_probe.py").display().to_string();
        let (src, dport) = (CLIENT_PORT.to_string(), port.to_string());
        let args = ["python3", &probe, mode, &src, &dport, hosts[0], hosts[1]];
        let out = self.a.topo.exec(&self.client.ns, &args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let mut problems = Vec::new();
        if lines.len() != want {
            problems.push(format!("{} result lines, want {want}", lines.len()));
        }
        // The client ports the backend saw, per ClusterIP.
        let mut seen: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
        for line in &lines {
            let to = try_field(line, "to").unwrap_or("?");
            let from = try_field(line, "from");
            if line.contains("error=") || try_field(line, "pod") != Some("web-b") {
                problems.push(format!("failed: {line:?}"));
            } else if from.is_some_and(|f| f != to) {
                problems.push(format!("answered from another address: {line:?}"));
            }
            let client_port = try_field(line, "client")
                .and_then(|c| c.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok());
            if let Some(p) = client_port {
                seen.entry(to).or_default().insert(p);
            }
        }
        let [first, second] = hosts.map(|h| {
            let ip: IpAddr = h.parse().expect("ClusterIP");
            std::net::SocketAddr::new(ip, port).to_string()
        });
        let empty = BTreeSet::new();
        let seen_from = |to: &str| seen.get(to).unwrap_or(&empty);
        let snat = DEFAULT_SNAT_PORT_MIN..=DEFAULT_SNAT_PORT_MAX;
        let second_ok = |p: &u16| match self.proxy {
            Proxy::Lb { .. } => snat.contains(p),
            Proxy::Netfilter => *p != CLIENT_PORT,
        };
        if seen_from(&first).iter().any(|p| *p != CLIENT_PORT) {
            problems.push(format!(
                "the first flow lost its port {CLIENT_PORT}: {seen:?}"
            ));
        }
        if !seen_from(&second).iter().all(second_ok) {
            problems.push(format!(
                "the backend saw the second flow from {:?}, not from another port (lb: \
                 {snat:?}); all: {seen:?}",
                seen_from(&second)
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{}\n    probe output:\n      {}{}",
            problems.join("; "),
            lines.join("\n      "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }

    /// Panic with the rig, the failures (of `total` requests) and node A's
    /// translator if there are any.
    fn verdict(&self, failures: Vec<String>, total: usize) {
        if !failures.is_empty() {
            panic!(
                "{}\n{} failure(s) in {total} requests:\n  {}\n{}",
                self.what,
                failures.len(),
                failures.join("\n  "),
                self.state()
            );
        }
    }

    /// After a failed UDP request: where an unconnected socket's answer
    /// comes from (the connected client drops answers from other sources).
    fn udp_source(&self, ip: IpAddr) -> String {
        let out = self.a.topo.exec(
            &self.client.ns,
            &["python3", "-c", UDP_SOURCE, &ip.to_string(), "53", "1.5"],
        );
        match out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) {
            Ok(src) if src.is_empty() || src == "nothing" => {
                "an unconnected socket got no answer at all either".to_string()
            }
            Ok(src) => format!(
                "an unconnected socket got its answer from {src}, not from the ClusterIP: \
                 the reply was not translated back"
            ),
            Err(e) => format!("(unconnected probe failed: {e})"),
        }
    }

    /// What node A's translator holds, for failure messages.
    fn state(&self) -> String {
        match self.proxy {
            Proxy::Lb { .. } => format!(
                "lb counters on node A: {}\nlb conntrack on node A: {}",
                self.a.stats(),
                self.a.dump("conntrack")
            ),
            Proxy::Netfilter => {
                let rules = |tool: &str| {
                    self.a
                        .topo
                        .exec(
                            &self.a.topo.node_ns,
                            &[tool, "-t", "nat", "-S", "PREROUTING", "-v"],
                        )
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_else(|e| e)
                };
                format!(
                    "node A's rules:\n{}{}",
                    rules("iptables"),
                    rules("ip6tables")
                )
            }
        }
    }
}

/// externalIPs of Service `ext` (policy Cluster, only endpoint web-b).
const EXTERNAL_IPS: [&str; 2] = ["192.0.2.10", "2001:db8:fe::10"];

/// Service `ext` and its slices (both families).
fn ext_manifests() -> String {
    let slice = |family: &str, addr: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext-{family}\n  \
             labels: {{kubernetes.io/service-name: ext}}\naddressType: {family}\nports:\n\
             - {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\n\
             endpoints:\n- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: node-b}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec:\n  clusterIP: 10.96.0.12\n  \
         clusterIPs: [10.96.0.12, \"fd00:96::12\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  \
         externalIPs: [{}, \"{}\"]\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  \
         - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n{}{}",
        EXTERNAL_IPS[0],
        EXTERNAL_IPS[1],
        slice("IPv4", BACKEND),
        slice("IPv6", BACKEND6)
    )
}

impl Rig {
    /// Service `ext` (externalIPs, policy Cluster, endpoint on node B) in
    /// what translates on node A, and node A's default routes (the IPv4 one
    /// over the underlay, the IPv6 one over the path): lb takes its SNAT
    /// address from them.
    fn external_ip_service(&self) {
        let node = &self.a.topo;
        let link = self.via.link();
        let path_dev = format!("{}{}", node.prefix, link.suffix);
        let gw6 = format!("{}2", link.subnets.1);
        node.node_ip(&["route", "add", "default", "via", LAN[1]])
            .expect("IPv4 default route");
        let v6 = match self.via {
            Via::L3Tunnel => node.node_ip(&["-6", "route", "add", "default", "dev", &path_dev]),
            _ => node.node_ip(&[
                "-6", "route", "add", "default", "via", &gw6, "dev", &path_dev,
            ]),
        };
        v6.expect("IPv6 default route");
        match self.proxy {
            Proxy::Lb { .. } => {
                self.a.write("ext.yaml", &ext_manifests());
                let backend = format!("{BACKEND}:8080");
                self.a.wait_backends(
                    &format!("{}:80/TCP", EXTERNAL_IPS[0]),
                    &[&backend],
                    Duration::from_secs(10),
                );
            }
            Proxy::Netfilter => {
                for (tool, ext, to) in [
                    ("iptables", EXTERNAL_IPS[0], BACKEND.to_string()),
                    ("ip6tables", EXTERNAL_IPS[1], format!("[{BACKEND6}]")),
                ] {
                    for (proto, port, target) in [("tcp", "80", "8080"), ("udp", "53", "5353")] {
                        let dnat = format!("{to}:{target}");
                        // PREROUTING for pods, OUTPUT for the node's own
                        // sockets, as kube-proxy hooks its Service chains.
                        #[rustfmt::skip]
                        let rules: [&[&str]; 5] = [
                            &[tool, "-t", "nat", "-A", "PREROUTING", "-d", ext, "-p", proto, "--dport", port, "-j", "MARK", "--set-mark", "0x4000"],
                            &[tool, "-t", "nat", "-A", "PREROUTING", "-d", ext, "-p", proto, "--dport", port, "-j", "DNAT", "--to-destination", &dnat],
                            &[tool, "-t", "nat", "-A", "OUTPUT", "-d", ext, "-p", proto, "--dport", port, "-j", "MARK", "--set-mark", "0x4000"],
                            &[tool, "-t", "nat", "-A", "OUTPUT", "-d", ext, "-p", proto, "--dport", port, "-j", "DNAT", "--to-destination", &dnat],
                            &[tool, "-t", "nat", "-A", "POSTROUTING", "-m", "mark", "--mark", "0x4000", "-j", "MASQUERADE"],
                        ];
                        for rule in rules {
                            let out = node.exec(&node.node_ns, rule).expect("run iptables");
                            assert!(out.status.success(), "{rule:?}: {out:?}");
                        }
                    }
                }
            }
        }
    }

    /// Node A holds the externalIPs (as a cloud's guest agent adds a load
    /// balancer's address) and a node socket bound to one reaches the
    /// Service: socket-level LB sends it to the endpoint on node B with the
    /// externalIP as source, so it must be masqueraded on its way out over
    /// the path (kube-proxy masquerades the node's traffic to Service
    /// addresses), or the answer goes elsewhere.
    fn masqueraded_node_socket(&self) {
        self.external_ip_service();
        let node = &self.a.topo;
        for (ext, len) in [(EXTERNAL_IPS[0], 32), (EXTERNAL_IPS[1], 128)] {
            node.node_ip(&["addr", "add", &format!("{ext}/{len}"), "dev", "lo"])
                .expect("externalIP on node A");
        }
        let node_addresses = node_addresses(node);
        let from_node = Pod {
            name: "node-a".into(),
            ns: node.node_ns.clone(),
            ip: LAN[0].parse().expect("node address"),
            host_dev: String::new(),
        };
        let mut failures = Vec::new();
        for ext in EXTERNAL_IPS {
            let ip: IpAddr = ext.parse().expect("externalIP");
            let what = format!("TCP from a node socket bound to {ext}, to {ext}:80");
            match node.curl_with(&from_node, &["--interface", ext], &url(ip), 3.0) {
                Err((code, err)) => failures.push(format!(
                    "{what}: curl exit {code} ({}): {}",
                    curl_meaning(code),
                    err.trim()
                )),
                Ok(body) => {
                    let seen = try_field(&body, "client")
                        .and_then(|c| c.rsplit_once(':'))
                        .and_then(|(ip, _)| ip.parse::<IpAddr>().ok());
                    let addr: IpAddr = ext.parse().expect("externalIP");
                    if field(&body, "pod") != "web-b"
                        || seen.is_none_or(|c| c == addr || !node_addresses.contains(&c))
                    {
                        failures.push(format!(
                            "{what}: want web-b seeing a node address other than {ext}: {body:?}"
                        ));
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{}\n{}\n{}",
            self.what,
            failures.join("\n"),
            self.state()
        );
    }

    /// The client pod reaches an externalIP of a policy-Cluster Service
    /// whose endpoint is on node B: masqueraded to a node A address, as
    /// kube-proxy does, over the path, TCP and UDP in both families; the
    /// answer comes back to the node address (over the underlay for IPv4,
    /// the path for IPv6: node A's default routes) and is restored.
    fn masqueraded(&self) {
        self.external_ip_service();
        let node = &self.a.topo;
        let node_addresses = node_addresses(node);
        let mut failures = Vec::new();
        for ext in EXTERNAL_IPS {
            let ip: IpAddr = ext.parse().expect("externalIP");
            let tcp = node
                .curl(&self.client, &url(ip), 3.0)
                .map_err(|(code, err)| {
                    format!("curl exit {code} ({}): {}", curl_meaning(code), err.trim())
                });
            let udp = node.udp(&self.client, ip, 53, 2.0, 0);
            for (what, answer) in [
                (format!("TCP to {ext}:80"), tcp),
                (format!("UDP to {ext}:53"), udp),
            ] {
                let seen = answer.as_ref().ok().and_then(|body| {
                    try_field(body, "client")?
                        .rsplit_once(':')?
                        .0
                        .parse::<IpAddr>()
                        .ok()
                });
                match (answer, seen) {
                    (Err(e), _) => failures.push(format!("{what}: {e}")),
                    (Ok(body), Some(client)) if !node_addresses.contains(&client) => failures.push(
                        format!("{what}: the backend saw {client}, not a node A address: {body:?}"),
                    ),
                    (Ok(body), None) => {
                        failures.push(format!("{what}: unexpected answer {body:?}"))
                    }
                    (Ok(_), Some(_)) => {}
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{}\n{}\n{}",
            self.what,
            failures.join("\n"),
            self.state()
        );
    }
}

fn url(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("http://{ip}/"),
        IpAddr::V6(_) => format!("http://[{ip}]/"),
    }
}

/// One datagram from an unconnected socket; prints the answer's source
/// address ("ADDR:PORT") or "nothing".
const UDP_SOURCE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
try:
    print("%s:%s" % s.recvfrom(65535)[1][:2])
except socket.timeout:
    print("nothing")
"#;

fn curl_meaning(code: i32) -> &'static str {
    match code {
        7 => "refused",
        28 => "timed out",
        52 => "empty reply",
        56 => "connection reset",
        _ => "see curl(1)",
    }
}

/// kube-proxy's shape, reduced: DNAT the ClusterIP in PREROUTING.
fn netfilter_rules(a: &Cluster) {
    for tool in ["iptables", "ip6tables"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is not installed: the netfilter control needs it (`cargo xtask setup` installs it)"
        );
    }
    for frontend in SERVICES.iter().flat_map(|s| s.frontends(ENDPOINTS)) {
        let tool = match frontend.addr {
            std::net::SocketAddr::V4(_) => "iptables",
            std::net::SocketAddr::V6(_) => "ip6tables",
        };
        let (dst, port) = (
            frontend.addr.ip().to_string(),
            frontend.addr.port().to_string(),
        );
        let (proto, to) = (
            frontend.protocol.to_lowercase(),
            frontend.backend.to_string(),
        );
        #[rustfmt::skip]
        let args = [
            tool, "-t", "nat", "-A", "PREROUTING", "-d", &dst, "-p", &proto, "--dport", &port,
            "-j", "DNAT", "--to-destination", &to,
        ];
        let out = a.topo.exec(&a.topo.node_ns, &args).expect("run iptables");
        assert!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn lb(devices: Devices) -> Proxy {
    Proxy::Lb {
        devices,
        mode: None,
    }
}

/// Replies come back over a second NIC, lb's defaults (no `--devices`).
#[test]
fn second_nic() {
    Rig::new(Via::SecondNic, lb(Devices::None)).check();
}

/// The same with `--devices` naming the node's main NIC (the underlay), as a
/// DaemonSet would be configured: the second NIC is still not listed.
#[test]
fn second_nic_with_main_nic_as_node_device() {
    Rig::new(Via::SecondNic, lb(Devices::Lan)).check();
}

/// Replies come back decapsulated from a VXLAN device, no `--devices`.
#[test]
fn vxlan() {
    Rig::new(Via::Vxlan, lb(Devices::None)).check();
}

/// Replies come back from an L3 device (no Ethernet header), no `--devices`.
#[test]
fn l3_tunnel() {
    Rig::new(Via::L3Tunnel, lb(Devices::None)).check();
}

/// The L3 device listed in `--devices` with the tc program: the node
/// program must parse packets without an Ethernet header.
#[test]
fn l3_tunnel_as_node_device_tc() {
    Rig::new(
        Via::L3Tunnel,
        Proxy::Lb {
            devices: Devices::Path,
            mode: Some("tc"),
        },
    )
    .check();
}

/// The second-NIC rig with kube-proxy-style iptables rules and no agent:
/// the rig carries Service traffic both ways.
#[test]
fn netfilter_control() {
    Rig::new(Via::SecondNic, Proxy::Netfilter).check();
}

/// The router of the PMTU cases: its link towards node B has MTU 1280 (the
/// least IPv6 allows; IPv4 takes it too), the client pod's is 1500.
const ROUTER: Hop = Hop::Router { mtu: 1280 };

/// A datagram to a Service port whose target port has no listener on the
/// backend pod: the backend's ICMP port unreachable (about client ->
/// backend) must reach the client as one from the ClusterIP (about client
/// -> ClusterIP), so its connected socket gets ECONNREFUSED at once, as
/// with netfilter (not a timeout).
mod udp_to_a_closed_backend_port_is_refused_at_once {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::new(Via::SecondNic, lb(Devices::None)).closed_port_refused();
    }

    #[test]
    fn vxlan() {
        Rig::new(Via::Vxlan, lb(Devices::None)).closed_port_refused();
    }

    #[test]
    fn l3_tunnel() {
        Rig::new(Via::L3Tunnel, lb(Devices::None)).closed_port_refused();
    }

    #[test]
    fn netfilter_control() {
        Rig::new(Via::SecondNic, Proxy::Netfilter).closed_port_refused();
    }
}

/// PMTU discovery through the Service translation: a router between the
/// nodes (not node A) drops the client's full-sized segments and sends
/// "fragmentation needed" / "packet too big" to the client's address about
/// client -> backend; lb must hand it to the client about client ->
/// ClusterIP. Over VXLAN and the L3 tunnel, node A's own device is smaller
/// than the client's MTU too: node A's error comes first, then the router's.
mod pmtu_through_a_router_with_a_smaller_mtu {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::with(Via::SecondNic, lb(Devices::None), ROUTER).upload();
    }

    #[test]
    fn vxlan() {
        Rig::with(Via::Vxlan, lb(Devices::None), ROUTER).upload();
    }

    #[test]
    fn l3_tunnel() {
        Rig::with(Via::L3Tunnel, lb(Devices::None), ROUTER).upload();
    }

    #[test]
    fn netfilter_control() {
        Rig::with(Via::SecondNic, Proxy::Netfilter, ROUTER).upload();
    }

    /// Node A's own VXLAN device is a hop with a smaller MTU too.
    #[test]
    fn netfilter_control_vxlan() {
        Rig::with(Via::Vxlan, Proxy::Netfilter, ROUTER).upload();
    }
}

/// One client ip:port to two ClusterIPs sharing a backend ip:port: the
/// second flow must not take the first's reply tuple (netfilter gives it
/// another source port), so both work and each answer comes from its own
/// ClusterIP.
mod one_source_port_to_two_services_sharing_a_backend {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::new(Via::SecondNic, lb(Devices::None)).one_source_port();
    }

    #[test]
    fn vxlan() {
        Rig::new(Via::Vxlan, lb(Devices::None)).one_source_port();
    }

    #[test]
    fn l3_tunnel() {
        Rig::new(Via::L3Tunnel, lb(Devices::None)).one_source_port();
    }

    #[test]
    fn netfilter_control() {
        Rig::new(Via::SecondNic, Proxy::Netfilter).one_source_port();
    }
}

/// A 3000-byte UDP datagram to a ClusterIP and a 3000-byte answer: every
/// fragment gets its datagram's translation, both ways.
mod fragmented_datagrams_both_ways {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::new(Via::SecondNic, lb(Devices::None)).big_datagrams();
    }

    #[test]
    fn vxlan() {
        Rig::new(Via::Vxlan, lb(Devices::None)).big_datagrams();
    }

    #[test]
    fn l3_tunnel() {
        Rig::new(Via::L3Tunnel, lb(Devices::None)).big_datagrams();
    }

    #[test]
    fn netfilter_control() {
        Rig::new(Via::SecondNic, Proxy::Netfilter).big_datagrams();
    }

    /// Node A's VXLAN device is smaller than the client's MTU: IPv4
    /// fragments are fragmented again, IPv6 ones refused with "packet too
    /// big" quoting the first fragment (which must reach the client).
    #[test]
    fn netfilter_control_vxlan() {
        Rig::new(Via::Vxlan, Proxy::Netfilter).big_datagrams();
    }
}

/// A pod reaching an externalIP (policy Cluster) whose endpoint is on the
/// other node is masqueraded, as kube-proxy does, whichever path carries it.
mod masqueraded_external_ip_from_a_pod {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::new(Via::SecondNic, lb(Devices::None)).masqueraded();
    }

    #[test]
    fn vxlan() {
        Rig::new(Via::Vxlan, lb(Devices::None)).masqueraded();
    }

    #[test]
    fn l3_tunnel() {
        Rig::new(Via::L3Tunnel, lb(Devices::None)).masqueraded();
    }

    #[test]
    fn netfilter_control() {
        Rig::new(Via::SecondNic, Proxy::Netfilter).masqueraded();
    }
}

/// A node socket bound to an externalIP the node holds reaches that
/// Service's endpoint across the path, masqueraded on the way out.
mod masqueraded_node_socket_bound_to_an_external_ip {
    use super::*;

    #[test]
    fn second_nic() {
        Rig::new(Via::SecondNic, lb(Devices::None)).masqueraded_node_socket();
    }

    #[test]
    fn vxlan() {
        Rig::new(Via::Vxlan, lb(Devices::None)).masqueraded_node_socket();
    }

    #[test]
    fn l3_tunnel() {
        Rig::new(Via::L3Tunnel, lb(Devices::None)).masqueraded_node_socket();
    }

    #[test]
    fn netfilter_control() {
        Rig::new(Via::SecondNic, Proxy::Netfilter).masqueraded_node_socket();
    }
}
