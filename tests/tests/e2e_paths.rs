//! Replies restored wherever they arrive. A client pod on node A reaches a
//! ClusterIP whose only endpoint is a pod on node B; pod traffic between
//! the nodes takes a path that is not one of lb's `--devices`: a second NIC
//! cabled between the nodes, a VXLAN overlay, or an L3 tunnel (a TUN device,
//! no Ethernet header, relayed over UDP). lb translates the request on the
//! client's pod device; the backend's reply (10.1.2.2 -> client) comes back
//! over that path and must reach the client as 10.96.0.10 -> client, or the
//! client answers the SYN-ACK with an RST and drops the datagram.
//!
//! Only node A runs lb-agent, with its defaults (`--manifests`, the pod
//! device glob, no `--devices` unless a case says so); node B only routes.
//! `netfilter_control` runs the same rig with kube-proxy-style DNAT rules
//! instead of lb: it proves the rig itself carries the traffic.

use std::{net::IpAddr, path::Path, process::Command, time::Duration};

use lb_tests::e2e::{Cluster, Lan, Pod, WEB_DUAL_STACK, field};

const CLUSTER_IP: &str = "10.96.0.10";
const CLUSTER_IP6: &str = "fd00:96::10";
const CLIENT: &str = "10.1.1.2";
const CLIENT6: &str = "fd00:1:1::2";
const BACKEND: &str = "10.1.2.2";
const BACKEND6: &str = "fd00:1:2::2";
/// The underlay addresses of node A and node B.
const LAN: [&str; 2] = ["192.168.50.1", "192.168.50.2"];
/// The pod CIDRs of node A and node B (IPv4, IPv6).
const PODS: [(&str, &str); 2] = [
    ("10.1.1.0/24", "fd00:1:1::/64"),
    ("10.1.2.0/24", "fd00:1:2::/64"),
];
/// UDP port the TUN relays talk on.
const RELAY_PORT: u16 = 4790;

/// The only endpoint of `web` (WEB_DUAL_STACK): the pod on node B, per family.
const SLICES: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-4
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: ["10.1.2.2"], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-6
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: ["fd00:1:2::2"], conditions: {ready: true}, nodeName: node-b}
"#;

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
    /// The device's name after the node's prefix.
    fn suffix(self) -> &'static str {
        match self {
            Via::SecondNic => "n",
            Via::Vxlan => "vx",
            Via::L3Tunnel => "t",
        }
    }

    /// The path's subnets as stems: node A is `.1` / `::1`, node B `.2` / `::2`.
    fn subnets(self) -> (&'static str, &'static str) {
        match self {
            Via::SecondNic => ("192.168.60.", "fd60::"),
            Via::Vxlan => ("172.30.0.", "fd30::"),
            Via::L3Tunnel => ("172.31.0.", "fd31::"),
        }
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
    a: Cluster,
    /// Node B: routes, and holds the backend pod.
    _b: Cluster,
    client: Pod,
    /// What this rig is, for failure messages.
    what: String,
    proxy: Proxy,
    /// Removed last (deleting a node namespace takes its end of each link with it).
    _lan: Lan,
}

fn python() -> &'static Path {
    Path::new("python3")
}

impl Rig {
    fn new(via: Via, proxy: Proxy) -> Self {
        let mut a = Cluster::named("node-a");
        let mut b = Cluster::named("node-b");
        let mut lan = Lan::new(&a.topo).expect("underlay");
        let lan_dev = [
            lan.connect(&a.topo, &format!("{}/24", LAN[0]))
                .expect("node A on the underlay"),
            lan.connect(&b.topo, &format!("{}/24", LAN[1]))
                .expect("node B on the underlay"),
        ];
        let dev = [
            format!("{}{}", a.topo.prefix, via.suffix()),
            format!("{}{}", b.topo.prefix, via.suffix()),
        ];
        let nodes = [&mut a, &mut b];
        match via {
            Via::SecondNic => nodes[0]
                .topo
                .wire(&dev[0], &nodes[1].topo, &dev[1])
                .expect("second NIC between the nodes"),
            Via::Vxlan => {
                for (i, node) in nodes.iter().enumerate() {
                    #[rustfmt::skip]
                    let args = [
                        "link", "add", &dev[i], "type", "vxlan", "id", "42", "local", LAN[i],
                        "remote", LAN[1 - i], "dstport", "4789", "dev", &lan_dev[i],
                    ];
                    node.topo
                        .node_ip(&args)
                        .unwrap_or_else(|e| panic!("vxlan on {}: {e}", node.node_name));
                    node.topo.tx_off(&dev[i]).expect("vxlan tx offload off");
                }
            }
            Via::L3Tunnel => {
                for (i, node) in nodes.into_iter().enumerate() {
                    let relay = node.topo.dir.join("tun_relay.py").display().to_string();
                    let args = [
                        relay,
                        "--dev".into(),
                        dev[i].clone(),
                        "--local".into(),
                        format!("{}:{RELAY_PORT}", LAN[i]),
                        "--remote".into(),
                        format!("{}:{RELAY_PORT}", LAN[1 - i]),
                    ];
                    node.topo
                        .start_in_node("tun relay", python(), &args)
                        .unwrap_or_else(|e| panic!("tun relay on {}: {e}", node.node_name));
                    node.topo
                        .node_ip(&["link", "set", &dev[i], "mtu", "1400"])
                        .expect("tun mtu");
                }
            }
        }
        // Addresses on the path, and the other node's pod CIDRs over it.
        let (net4, net6) = via.subnets();
        for (i, node) in [&a, &b].into_iter().enumerate() {
            let topo = &node.topo;
            let d = dev[i].as_str();
            let (me, peer) = (i + 1, 2 - i);
            let ok =
                |r: Result<(), String>| r.unwrap_or_else(|e| panic!("{}: {e}", node.node_name));
            ok(topo.node_ip(&["addr", "add", &format!("{net4}{me}/24"), "dev", d]));
            let addr6 = format!("{net6}{me}/64");
            ok(topo.node_ip(&["-6", "addr", "add", &addr6, "dev", d, "nodad"]));
            ok(topo.node_ip(&["link", "set", d, "up"]));
            let (pods4, pods6) = PODS[1 - i];
            let (gw4, gw6) = (format!("{net4}{peer}"), format!("{net6}{peer}"));
            for (dest, gw) in [(pods4, gw4.as_str()), (pods6, gw6.as_str())] {
                match via {
                    // No link layer: the device is the next hop.
                    Via::L3Tunnel => ok(topo.node_ip(&["route", "add", dest, "dev", d])),
                    _ => ok(topo.node_ip(&["route", "add", dest, "via", gw, "dev", d])),
                }
            }
        }

        let client = a.dual_pod("client", CLIENT, CLIENT6, &[], &[]);
        b.dual_pod("web-b", BACKEND, BACKEND6, &[8080], &[5353]);
        a.write("web.yaml", WEB_DUAL_STACK);
        a.write("web-slices.yaml", SLICES);

        let on_a = match proxy {
            Proxy::Lb { devices, mode } => {
                let mut args = vec!["--manifests".to_string(), a.manifests.display().to_string()];
                match devices {
                    Devices::None => {}
                    Devices::Lan => args.extend(["--devices".into(), lan_dev[0].clone()]),
                    Devices::Path => args.extend(["--devices".into(), dev[0].clone()]),
                }
                if let Some(mode) = mode {
                    args.extend(["--device-mode".into(), mode.into()]);
                }
                a.start_agent_with(&args);
                for (frontend, backend) in [
                    ("10.96.0.10:80/TCP", "10.1.2.2:8080"),
                    ("10.96.0.10:53/UDP", "10.1.2.2:5353"),
                    ("[fd00:96::10]:80/TCP", "[fd00:1:2::2]:8080"),
                    ("[fd00:96::10]:53/UDP", "[fd00:1:2::2]:5353"),
                ] {
                    a.wait_backends(frontend, &[backend], Duration::from_secs(10));
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
        let what = format!(
            "{via:?} rig: client pod {CLIENT} / {CLIENT6} on node A -> Service web \
             ({CLUSTER_IP} / {CLUSTER_IP6}), only endpoint web-b ({BACKEND} / {BACKEND6}) on node B; \
             pod traffic between the nodes over node A's {} (replies arrive there); node A runs: {on_a}",
            dev[0]
        );
        Rig {
            a,
            _b: b,
            client,
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
        for (cluster_ip, client) in [(CLUSTER_IP, CLIENT), (CLUSTER_IP6, CLIENT6)] {
            let ip: IpAddr = cluster_ip.parse().expect("ClusterIP");
            let url = match ip {
                IpAddr::V4(_) => format!("http://{ip}/"),
                IpAddr::V6(_) => format!("http://[{ip}]/"),
            };
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
        if !failures.is_empty() {
            panic!(
                "{}\n{} of 4 requests failed:\n  {}\n{}",
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
    let v6 = |addr: &str, port: u16| format!("[{addr}]:{port}");
    let v4 = |addr: &str, port: u16| format!("{addr}:{port}");
    for (tool, dst, proto, port, to) in [
        ("iptables", CLUSTER_IP, "tcp", "80", v4(BACKEND, 8080)),
        ("iptables", CLUSTER_IP, "udp", "53", v4(BACKEND, 5353)),
        ("ip6tables", CLUSTER_IP6, "tcp", "80", v6(BACKEND6, 8080)),
        ("ip6tables", CLUSTER_IP6, "udp", "53", v6(BACKEND6, 5353)),
    ] {
        #[rustfmt::skip]
        let args = [
            tool, "-t", "nat", "-A", "PREROUTING", "-d", dst, "-p", proto, "--dport", port,
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
