//! External traffic end to end: two node namespaces joined by an underlay
//! (a bridge), each running its own agent with its own --bpffs (node A with
//! native or generic XDP on its node device, node B with the tc program),
//! pods on both, and
//! external clients on the underlay. Real servers, curl, a UDP client, ping.

use std::{collections::BTreeSet, time::Duration};

use lb_tests::e2e::{Cluster, HeldConnection, Lan, Pod, field, wait_until};

const NODE_A: &str = "192.168.50.1";
const NODE_B: &str = "192.168.50.2";
const CLIENT: &str = "192.168.50.100";
const OTHER_CLIENT: &str = "192.168.50.101";
const LB_IP: &str = "198.51.100.10";
const EXTERNAL_IP: &str = "192.0.2.10";
const POD_A: &str = "10.1.1.2";
const POD_B: &str = "10.1.2.2";

struct TwoNodes {
    a: Cluster,
    b: Cluster,
    pod_a: Pod,
    pod_b: Pod,
    client: Pod,
    other_client: Pod,
    /// The underlay and its hosts; removed last (deleting a node namespace
    /// takes its end of each link with it).
    _lan: Lan,
}

impl TwoNodes {
    /// Node A runs `a_mode` on its node device ("default": no
    /// --device-mode), node B the tc program.
    fn new(a_mode: &str) -> Self {
        Self::with_b(a_mode, true)
    }

    /// `new`, with node B on lb's defaults (no node device: its underlay
    /// device gets only the reply and egress programs) unless `b_devices`.
    fn with_b(a_mode: &str, b_devices: bool) -> Self {
        let mut a = Cluster::named("node-a");
        let mut b = Cluster::named("node-b");
        let mut lan = Lan::new(&a.topo).expect("lan");
        let dev_a = lan
            .connect(&a.topo, &format!("{NODE_A}/24"))
            .expect("node A on the lan");
        let dev_b = lan
            .connect(&b.topo, &format!("{NODE_B}/24"))
            .expect("node B on the lan");
        // Pod CIDRs are routed to their node over the underlay; LoadBalancer
        // IPs and externalIPs reach node A (as an upstream router would send them).
        a.topo
            .route("10.1.2.0/24", NODE_B)
            .expect("route to B's pods");
        b.topo
            .route("10.1.1.0/24", NODE_A)
            .expect("route to A's pods");
        let routes = [("198.51.100.0/24", NODE_A), ("192.0.2.0/24", NODE_A)];
        let client = lan
            .add_host("client", &format!("{CLIENT}/24"), &routes)
            .expect("client");
        let other_client = lan
            .add_host("other", &format!("{OTHER_CLIENT}/24"), &routes)
            .expect("other client");
        let pod_a = a.pod("web-a", POD_A, &[8080], &[5353]);
        let pod_b = b.pod("web-b", POD_B, &[8080], &[5353]);
        let manifests = a.manifests.display().to_string();
        a.start_agent_with(&agent_args(&manifests, &dev_a, a_mode));
        if b_devices {
            b.start_agent_with(&agent_args(&manifests, &dev_b, "tc"));
        } else {
            b.start_agent_with(&["--manifests".into(), manifests]);
        }
        TwoNodes {
            a,
            b,
            pod_a,
            pod_b,
            client,
            other_client,
            _lan: lan,
        }
    }

    /// EndpointSlice of Service `svc` with endpoints (ip, node).
    fn endpoints(&self, svc: &str, endpoints: &[(&str, &str)]) {
        let list: Vec<String> = endpoints
            .iter()
            .map(|(ip, node)| {
                format!(
                    "- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}"
                )
            })
            .collect();
        let list = if list.is_empty() {
            "[]".to_string()
        } else {
            format!("\n{}", list.join("\n"))
        };
        self.a.write(
            &format!("{svc}-slice.yaml"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  \
                 labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
                 - {{name: dns, port: 5353, protocol: UDP}}\nendpoints: {list}\n"
            ),
        );
    }

    /// Wait until both agents hold `frontend` (as dump shows it) with `n` backends.
    fn wait_programmed(&self, frontend: &str, n: usize) {
        self.wait_programmed_on(&[&self.a, &self.b], frontend, n);
    }

    fn wait_programmed_on(&self, nodes: &[&Cluster], frontend: &str, n: usize) {
        for node in nodes {
            wait_until(
                &format!("{} programs {frontend} with {n} backends", node.node_name),
                Duration::from_secs(10),
                || node.backends_of(frontend).is_some_and(|b| b.len() == n),
            );
        }
    }
}

/// The agent's flags on a node: the manifests, its node device and
/// `mode` ("default": lb's own choice).
fn agent_args(manifests: &str, dev: &str, mode: &str) -> Vec<String> {
    let mut args = vec![
        "--manifests".into(),
        manifests.into(),
        "--devices".into(),
        dev.into(),
    ];
    if mode != "default" {
        args.extend(["--device-mode".into(), mode.into()]);
    }
    args
}

/// curl from an external host: the body, or curl's exit code (7 refused, 28 timeout).
fn get(node: &Cluster, from: &Pod, url: &str, timeout_s: f64) -> Result<String, i32> {
    node.topo
        .curl(from, url, timeout_s)
        .map_err(|(code, _)| code)
}

/// (pod, client address it saw) for `n` requests.
fn answers(node: &Cluster, from: &Pod, url: &str, n: usize) -> BTreeSet<(String, String)> {
    (0..n)
        .map(|i| {
            let body = get(node, from, url, 3.0).unwrap_or_else(|c| {
                panic!(
                    "request {i} to {url}: curl exit {c}\n{} stats: {}\nconntrack: {}",
                    node.node_name,
                    node.stats(),
                    node.dump("conntrack")
                )
            });
            // "ip:port", the IP of either family.
            let client = field(&body, "client");
            let ip = client.rsplit_once(':').map_or(client, |(ip, _)| ip);
            (field(&body, "pod").to_string(), ip.to_string())
        })
        .collect()
}

fn pair(pod: &str, client: &str) -> (String, String) {
    (pod.to_string(), client.to_string())
}

#[test]
fn nodeport_from_outside_reaches_local_and_remote_endpoints_and_is_released_on_delete() {
    let net = TwoNodes::new("xdp");
    net.a.write(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  \
         clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, nodePort: 30080, protocol: TCP}\n  \
         - {name: dns, port: 53, nodePort: 30053, protocol: UDP}\n",
    );
    net.endpoints("web", &[(POD_A, "node-a"), (POD_B, "node-b")]);
    net.wait_programmed_on(&[&net.a], &format!("{NODE_A}:30080/TCP (external)"), 2);
    net.wait_programmed_on(&[&net.b], &format!("{NODE_B}:30080/TCP (external)"), 2);

    // eTP Cluster: masqueraded as kube-proxy does, both endpoints see the
    // node that source-NATed (the remote one so its reply comes back here).
    for (node, addr) in [(&net.a, NODE_A), (&net.b, NODE_B)] {
        let (local, remote) = if addr == NODE_A {
            ("web-a", "web-b")
        } else {
            ("web-b", "web-a")
        };
        let seen = answers(node, &net.client, &format!("http://{addr}:30080/"), 24);
        assert_eq!(
            seen,
            BTreeSet::from([pair(local, addr), pair(remote, addr)]),
            "through {} ({addr})",
            node.node_name
        );
    }
    // UDP through the NodePort, to whichever endpoint.
    for _ in 0..6 {
        let reply = net
            .a
            .topo
            .udp(
                &net.client,
                NODE_A.parse::<std::net::Ipv4Addr>().unwrap(),
                30053,
                2.0,
                0,
            )
            .expect("UDP through the NodePort");
        assert!(reply.contains("port=5353"), "{reply}");
    }
    let stats = net.a.stats();
    assert!(stats["nodeport_snat"].as_u64().unwrap() > 0, "{stats}");

    // Deleting the Service releases its NodePorts at once: nothing answers
    // there any more, so the node's own stack refuses the connection.
    net.a.remove("web.yaml");
    wait_until(
        "node A's NodePort is gone from the maps",
        Duration::from_secs(5),
        || {
            net.a
                .backends_of(&format!("{NODE_A}:30080/TCP (external)"))
                .is_none()
        },
    );
    assert_eq!(
        get(&net.a, &net.client, &format!("http://{NODE_A}:30080/"), 3.0),
        Err(7),
        "a released NodePort is refused"
    );
}

#[test]
fn external_policy_local_keeps_the_client_ip_drops_elsewhere_and_reports_health() {
    let net = TwoNodes::new("xdp");
    net.a.write(
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 10.96.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  \
             - {{name: http, port: 80, nodePort: 30090, protocol: TCP}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n"
        ),
    );
    net.endpoints("web", &[(POD_A, "node-a")]);
    net.wait_programmed_on(&[&net.a], &format!("{NODE_A}:30090/TCP (external)"), 1);
    net.wait_programmed_on(&[&net.b], &format!("{NODE_B}:30090/TCP (external)"), 0);

    let url_a = format!("http://{NODE_A}:30090/");
    let url_b = format!("http://{NODE_B}:30090/");
    assert_eq!(
        answers(&net.a, &net.client, &url_a, 4),
        BTreeSet::from([pair("web-a", CLIENT)]),
        "local endpoint, client address preserved"
    );
    assert_eq!(
        answers(&net.a, &net.client, &format!("http://{LB_IP}/"), 4),
        BTreeSet::from([pair("web-a", CLIENT)]),
        "LoadBalancer IP, client address preserved"
    );
    assert_eq!(
        get(&net.b, &net.client, &url_b, 1.5),
        Err(28),
        "node B has no local endpoint: dropped, not refused"
    );
    // Pods reaching the NodePort are short-circuited to every endpoint.
    assert_eq!(
        answers(&net.b, &net.pod_b, &url_b, 2),
        BTreeSet::from([pair("web-a", POD_B)]),
    );

    // explain follows the outside client's packet through each node's program.
    let to_a = format!("{NODE_A}:30090");
    let text = net
        .a
        .explain(&["--via", "xdp", "--from", CLIENT, "--to", &to_a]);
    assert!(
        text.contains(&format!(
            "flow       {CLIENT}:40000 -> {to_a}/TCP in on a node device (XDP)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("frontend   {to_a}/TCP NodePort")),
        "{text}"
    );
    assert!(
        text.contains(&format!("translated to {POD_A}:8080, client address kept")),
        "{text}"
    );
    let text = net.a.explain(&[
        "--via",
        "xdp",
        "--from",
        CLIENT,
        "--to",
        &format!("{LB_IP}:80"),
    ]);
    assert!(
        text.contains(&format!("translated to {POD_A}:8080, client address kept")),
        "{text}"
    );
    let text = net.b.explain(&[
        "--via",
        "node",
        "--from",
        CLIENT,
        "--to",
        &format!("{NODE_B}:30090"),
    ]);
    assert!(text.contains("candidates none"), "{text}");
    assert!(text.contains("verdict    dropped ("), "{text}");

    let health = |node: &Cluster, addr: &str| -> (u16, String) {
        node.http_from(&net.client.ns, &format!("http://{addr}:32000/healthz"))
    };
    let (code, body) = health(&net.a, NODE_A);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""localEndpoints":1"#), "{body}");
    assert!(body.contains(r#""name":"web""#), "{body}");
    assert_eq!(health(&net.b, NODE_B).0, 503);

    // The endpoint moves to node B: the health checks flip, and so does traffic.
    net.endpoints("web", &[(POD_B, "node-b")]);
    wait_until(
        "node A's health check turns 503",
        Duration::from_secs(10),
        || health(&net.a, NODE_A).0 == 503,
    );
    wait_until(
        "node B's health check turns 200",
        Duration::from_secs(10),
        || health(&net.b, NODE_B).0 == 200,
    );
    assert_eq!(
        answers(&net.b, &net.client, &url_b, 4),
        BTreeSet::from([pair("web-b", CLIENT)]),
    );
    assert_eq!(get(&net.a, &net.client, &url_a, 1.5), Err(28));
}

#[test]
fn source_ranges_external_ips_and_pings() {
    // lb's default on a veth node device is tc: native XDP on veth holds
    // XDP_TX answers (the echo replies) until its next poll, which a
    // one-second ping misses.
    let net = TwoNodes::new("default");
    net.a.write(
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
             clusterIP: 10.96.0.30\n  externalIPs: [{EXTERNAL_IP}]\n  loadBalancerSourceRanges: [{CLIENT}/32]\n  ports:\n  \
             - {{name: http, port: 80, nodePort: 30100, protocol: TCP}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n"
        ),
    );
    net.endpoints("web", &[(POD_A, "node-a"), (POD_B, "node-b")]);
    net.wait_programmed(&format!("{LB_IP}:80/TCP"), 2);

    let lb_url = format!("http://{LB_IP}/");
    assert!(
        get(&net.a, &net.client, &lb_url, 3.0).is_ok(),
        "inside the ranges"
    );
    // explain from outside (node A's default program on a veth: tc).
    let lb_to = format!("{LB_IP}:80");
    let text = net
        .a
        .explain(&["--via", "node", "--from", CLIENT, "--to", &lb_to]);
    assert!(text.contains("source-ranges"), "{text}");
    assert!(
        [POD_A, POD_B].iter().any(|pod| text.contains(&format!(
            "translated to {pod}:8080, source masqueraded to {NODE_A}:"
        ))),
        "{text}"
    );
    let text = net
        .a
        .explain(&["--via", "node", "--from", OTHER_CLIENT, "--to", &lb_to]);
    assert!(
        text.contains("verdict    dropped (drop_source_range)"),
        "{text}"
    );
    let text = net.a.explain(&[
        "--via",
        "node",
        "--from",
        OTHER_CLIENT,
        "--to",
        &format!("{EXTERNAL_IP}:80"),
    ]);
    assert!(text.contains("ExternalIP"), "{text}");
    assert!(text.contains("translated to"), "{text}");
    let text = net.a.explain(&[
        "--via",
        "node",
        "--from",
        CLIENT,
        "--to",
        &format!("{LB_IP}:81"),
    ]);
    assert!(text.contains("frontend   none from outside"), "{text}");
    let text = net
        .a
        .explain(&["--via", "node", "--from", CLIENT, "--to", "192.168.50.1:22"]);
    assert!(text.contains("frontend   none from outside"), "{text}");
    assert!(text.contains("passed untouched"), "{text}");

    assert_eq!(
        get(&net.a, &net.other_client, &lb_url, 1.5),
        Err(28),
        "outside loadBalancerSourceRanges: dropped"
    );
    assert!(
        get(
            &net.a,
            &net.other_client,
            &format!("http://{NODE_A}:30100/"),
            3.0
        )
        .is_ok(),
        "NodePorts are not filtered by the ranges"
    );
    let seen = answers(
        &net.a,
        &net.other_client,
        &format!("http://{EXTERNAL_IP}/"),
        16,
    );
    let pods: BTreeSet<String> = seen.into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        pods,
        BTreeSet::from(["web-a".into(), "web-b".into()]),
        "externalIP"
    );

    // Pings tell the truth: answered while an endpoint exists...
    let lb: std::net::Ipv4Addr = LB_IP.parse().unwrap();
    let cluster_ip: std::net::Ipv4Addr = "10.96.0.30".parse().unwrap();
    assert!(
        net.a.topo.ping(&net.client.ns, lb),
        "ping the LoadBalancer IP from outside: {}",
        net.a.stats()
    );
    assert!(
        net.a.topo.ping(&net.pod_a.ns, cluster_ip),
        "ping the ClusterIP from a pod"
    );
    // ... and not when none does.
    net.endpoints("web", &[]);
    net.wait_programmed(&format!("{LB_IP}:80/TCP"), 0);
    assert!(!net.a.topo.ping(&net.client.ns, lb), "no endpoint: no echo");
    assert!(
        !net.a.topo.ping(&net.pod_a.ns, cluster_ip),
        "no endpoint: no echo"
    );
    let stats = net.a.stats();
    assert!(stats["echo_reply"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["drop_echo"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["drop_source_range"].as_u64().unwrap() >= 1, "{stats}");
}

/// The same two nodes over IPv6: a dual-stack NodePort Service answers on
/// the nodes' IPv6 addresses; both endpoints see the node that source-NATed
/// (policy Cluster is masqueraded, as kube-proxy does): its IPv6 address.
const NODE_A6: &str = "2001:db8:50::1";
const NODE_B6: &str = "2001:db8:50::2";
const CLIENT6: &str = "2001:db8:50::100";
const POD_A6: &str = "fd00:1:1::2";
const POD_B6: &str = "fd00:1:2::2";

/// Two dual-stack nodes on the underlay (IPv6 routes between their pod
/// CIDRs), a dual-stack pod on each, and an IPv6 client.
struct SixNodes {
    a: Cluster,
    b: Cluster,
    client: Pod,
    _pods: (Pod, Pod),
    _lan: Lan,
}

impl SixNodes {
    /// `service` (a dual-stack NodePort 30080 Service's YAML) with an
    /// endpoint on each node given in `endpoints` (IPv6 address, node);
    /// node A's device runs `a_mode`, node B's `b_mode`, each agent with
    /// `extra` flags.
    fn new(
        a_mode: &str,
        b_mode: &str,
        extra: &[&str],
        service: &str,
        endpoints: &[(&str, &str)],
    ) -> Self {
        let mut a = Cluster::named("node-a");
        let mut b = Cluster::named("node-b");
        let mut lan = Lan::new(&a.topo).expect("lan");
        let dev_a = lan
            .connect(&a.topo, &format!("{NODE_A}/24"))
            .expect("node A on the lan");
        let dev_b = lan
            .connect(&b.topo, &format!("{NODE_B}/24"))
            .expect("node B on the lan");
        let client = lan
            .add_host("client", &format!("{CLIENT}/24"), &[])
            .expect("client");
        let six = |ns: &str, dev: &str, addr: &str| {
            let out = std::process::Command::new("ip")
                .args([
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr}/64"),
                    "dev",
                    dev,
                    "nodad",
                ])
                .output()
                .expect("ip");
            assert!(out.status.success(), "{addr} on {ns}/{dev}: {out:?}");
        };
        six(&a.topo.node_ns, &dev_a, NODE_A6);
        six(&b.topo.node_ns, &dev_b, NODE_B6);
        six(&client.ns, "eth0", CLIENT6);
        a.topo
            .route("fd00:1:2::/64", NODE_B6)
            .expect("route to B's pods");
        b.topo
            .route("fd00:1:1::/64", NODE_A6)
            .expect("route to A's pods");
        let pod_a = a.dual_pod("web-a", POD_A, POD_A6, &[8080], &[]);
        let pod_b = b.dual_pod("web-b", POD_B, POD_B6, &[8080], &[]);
        a.write("web.yaml", service);
        let list: Vec<String> = endpoints
            .iter()
            .map(|(ip, node)| {
                format!(
                    "- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}"
                )
            })
            .collect();
        a.write(
            "web-slice.yaml",
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-6\n  \
                 labels: {{kubernetes.io/service-name: web}}\naddressType: IPv6\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
                 endpoints:\n{}\n",
                list.join("\n")
            ),
        );
        let manifests = a.manifests.display().to_string();
        for (node, dev, mode) in [(&mut a, dev_a, a_mode), (&mut b, dev_b, b_mode)] {
            let mut args = vec![
                "--manifests".to_string(),
                manifests.clone(),
                "--devices".into(),
                dev,
                "--device-mode".into(),
                mode.into(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            node.start_agent_with(&args);
        }
        for (node, addr) in [(&a, NODE_A6), (&b, NODE_B6)] {
            let frontend = format!("[{addr}]:30080/TCP (external)");
            wait_until(
                &format!("{} programs {frontend}", node.node_name),
                Duration::from_secs(10),
                || {
                    node.backends_of(&frontend)
                        .is_some_and(|b| b.len() == endpoints.len())
                },
            );
        }
        SixNodes {
            a,
            b,
            client,
            _pods: (pod_a, pod_b),
            _lan: lan,
        }
    }
}

const DUAL_STACK_WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  \
     clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]\n  \
     ipFamilyPolicy: RequireDualStack\n  ports:\n  - {name: http, port: 80, nodePort: 30080, protocol: TCP}\n";

#[test]
fn nodeport_on_ipv6_node_addresses_reaches_local_and_remote_endpoints() {
    let net = SixNodes::new(
        "xdp",
        "tc",
        &[],
        DUAL_STACK_WEB,
        &[(POD_A6, "node-a"), (POD_B6, "node-b")],
    );
    let (a, b) = (&net.a, &net.b);
    // explain from the IPv6 client: XDP on node A, tc on node B, both masquerade.
    for (node, addr, via) in [(a, NODE_A6, "xdp"), (b, NODE_B6, "node")] {
        let to = format!("[{addr}]:30080");
        let text = node.explain(&["--via", via, "--from", CLIENT6, "--to", &to]);
        assert!(
            text.contains(&format!("frontend   {to}/TCP NodePort")),
            "{text}"
        );
        assert!(
            [POD_A6, POD_B6].iter().any(|pod| text.contains(&format!(
                "translated to [{pod}]:8080, source masqueraded to [{addr}]:"
            ))),
            "{text}"
        );
    }
    for (node, addr, local, remote) in [
        (a, NODE_A6, "web-a", "web-b"),
        (b, NODE_B6, "web-b", "web-a"),
    ] {
        let seen = answers(node, &net.client, &format!("http://[{addr}]:30080/"), 24);
        assert_eq!(
            seen,
            BTreeSet::from([pair(local, addr), pair(remote, addr)]),
            "through {} ({addr})",
            node.node_name
        );
    }
    assert!(a.stats()["nodeport_snat"].as_u64().unwrap() > 0);
}

#[test]
fn dsr_over_ipv6_keeps_the_client_both_ways_between_tc_and_xdp() {
    // --default-forwarding-mode (no annotation); each node's endpoint is
    // reached through the other node's NodePort: node A (tc) to node B
    // (XDP) and back, so each side both adds the Destination Options header
    // and learns from one.
    let net = SixNodes::new(
        "tc",
        "xdp",
        &["--default-forwarding-mode", "dsr"],
        DUAL_STACK_WEB,
        &[(POD_A6, "node-a"), (POD_B6, "node-b")],
    );
    let text = net.a.explain(&[
        "--via",
        "node",
        "--from",
        CLIENT6,
        "--to",
        &format!("[{NODE_A6}]:30080"),
    ]);
    assert!(!text.contains("source masqueraded"), "{text}");
    for (node, addr) in [(&net.a, NODE_A6), (&net.b, NODE_B6)] {
        let seen = answers(node, &net.client, &format!("http://[{addr}]:30080/"), 24);
        // Both endpoints answer, and both see the client itself.
        assert_eq!(
            seen,
            BTreeSet::from([pair("web-a", CLIENT6), pair("web-b", CLIENT6)]),
            "through {} ({addr})",
            node.node_name
        );
    }
    for node in [&net.a, &net.b] {
        let stats = node.stats();
        for name in ["dsr_forwarded", "dsr_learned"] {
            assert!(
                stats[name].as_u64().unwrap_or_default() > 0,
                "{name}: {stats}"
            );
        }
        assert_eq!(stats["nodeport_snat"].as_u64(), Some(0), "{stats}");
    }
}

/// A counter of a node's `dump stats`.
fn counter(node: &Cluster, name: &str) -> u64 {
    node.stats()[name].as_u64().unwrap_or_default()
}

#[test]
fn dsr_keeps_the_client_and_answers_from_the_endpoints_node() {
    // Node A (XDP) takes the client's flows; the endpoint is on node B, which
    // runs lb's defaults: no node device, so what comes in over the underlay
    // meets the reply program there, and the pod device's.
    let mut net = TwoNodes::with_b("xdp", false);
    net.a.write(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  \
         annotations: {lb/forwarding-mode: dsr}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  \
         ports:\n  - {name: http, port: 80, nodePort: 30080, protocol: TCP}\n  \
         - {name: dns, port: 53, nodePort: 30053, protocol: UDP}\n",
    );
    // hybrid: DSR for TCP, SNAT for UDP.
    net.a.write(
        "hybrid.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: hybrid\n  namespace: default\n  \
         annotations: {lb/forwarding-mode: hybrid}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  \
         ports:\n  - {name: http, port: 80, nodePort: 30081, protocol: TCP}\n  \
         - {name: dns, port: 53, nodePort: 30054, protocol: UDP}\n",
    );
    net.endpoints("web", &[(POD_B, "node-b")]);
    net.endpoints("hybrid", &[(POD_B, "node-b")]);
    net.wait_programmed_on(&[&net.a], &format!("{NODE_A}:30080/TCP (external)"), 1);
    net.wait_programmed_on(&[&net.a], &format!("{NODE_A}:30081/TCP (external)"), 1);
    // Node B knows the endpoint (its own pod) before the first flow comes.
    net.wait_programmed_on(&[&net.b], "10.96.0.10:80/TCP", 1);

    let text = net.a.explain(&[
        "--via",
        "xdp",
        "--from",
        CLIENT,
        "--to",
        &format!("{NODE_A}:30080"),
    ]);
    assert!(
        text.contains(&format!("translated to {POD_B}:8080"))
            && !text.contains("source masqueraded")
            && text.contains("direct server return"),
        "{text}"
    );

    dsr_answers_come_from_node_b(&net, "the underlay");

    // A datagram the option would grow past the underlay's MTU (1500) is
    // dropped on node A's way out and counted; one with room gets through.
    let too_big = counter(&net.a, "drop_dsr_too_big");
    for (payload, answered) in [(1500 - 20 - 8 - 4, false), (1500 - 20 - 8 - 8, true)] {
        let out = net
            .a
            .topo
            .exec(
                &net.client.ns,
                &[
                    "python3",
                    "-c",
                    SIZED_DATAGRAM,
                    NODE_A,
                    "30053",
                    &payload.to_string(),
                ],
            )
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.contains("pod=web-b"),
            answered,
            "a {payload}-byte datagram: {text}"
        );
    }
    assert_eq!(
        counter(&net.a, "drop_dsr_too_big") - too_big,
        1,
        "{}",
        net.a.stats()
    );

    // The same over a VXLAN overlay between the nodes (pod traffic only):
    // node A's egress program on the VXLAN device adds the option to the
    // inner packet, node B's reply program on its VXLAN device learns it.
    for (node, local, remote, addr) in [
        (&net.a, NODE_A, NODE_B, "172.30.0.1/24"),
        (&net.b, NODE_B, NODE_A, "172.30.0.2/24"),
    ] {
        let topo = &node.topo;
        let vx = format!("{}vx", topo.prefix);
        let under = format!("{}u", topo.prefix);
        #[rustfmt::skip]
        let steps: [&[&str]; 3] = [
            &["link", "add", &vx, "type", "vxlan", "id", "42", "local", local, "remote", remote, "dstport", "4789", "dev", &under],
            &["addr", "add", addr, "dev", &vx],
            &["link", "set", &vx, "up"],
        ];
        for step in steps {
            topo.node_ip(step).expect("VXLAN device");
        }
        topo.tx_off(&vx).expect("VXLAN checksum offload off");
    }
    for (node, pods, via) in [
        (&net.a, "10.1.2.0/24", "172.30.0.2"),
        (&net.b, "10.1.1.0/24", "172.30.0.1"),
    ] {
        node.topo
            .node_ip(&["route", "replace", pods, "via", via])
            .expect("pod route over VXLAN");
        wait_attached(node, &format!("{}vx", node.topo.prefix), &["tcr", "tcne"]);
    }
    let before = rx_packets(&net.b, &format!("{}vx", net.b.topo.prefix));
    dsr_answers_come_from_node_b(&net, "VXLAN");
    assert!(
        rx_packets(&net.b, &format!("{}vx", net.b.topo.prefix)) > before + 19,
        "the flows did not come over VXLAN"
    );

    // And over an L3 device (no Ethernet header, like ipip or WireGuard): a
    // TUN device on each node relayed over UDP on the underlay. Node A's L3
    // egress program adds the option, node B's L3 reply program learns it.
    for (node, local, remote, addr) in [
        (&mut net.a, NODE_A, NODE_B, "172.31.0.1/24"),
        (&mut net.b, NODE_B, NODE_A, "172.31.0.2/24"),
    ] {
        let tun = format!("{}t", node.topo.prefix);
        let relay = node.topo.dir.join("tun_relay.py").display().to_string();
        let args = [
            relay,
            "--dev".into(),
            tun.clone(),
            "--local".into(),
            format!("{local}:4790"),
            "--remote".into(),
            format!("{remote}:4790"),
        ];
        node.topo
            .start_in_node("tun relay", std::path::Path::new("python3"), &args)
            .expect("TUN relay");
        for step in [
            &["link", "set", &tun, "mtu", "1400"][..],
            &["addr", "add", addr, "dev", &tun],
            &["link", "set", &tun, "up"],
        ] {
            node.topo.node_ip(step).expect("TUN device");
        }
    }
    for (node, pods) in [(&net.a, "10.1.2.0/24"), (&net.b, "10.1.1.0/24")] {
        let tun = format!("{}t", node.topo.prefix);
        node.topo
            .node_ip(&["route", "replace", pods, "dev", &tun])
            .expect("pod route over the TUN device");
        wait_attached(node, &tun, &["tcr3", "tcne3"]);
    }
    let tun_b = format!("{}t", net.b.topo.prefix);
    let before = rx_packets(&net.b, &tun_b);
    dsr_answers_come_from_node_b(&net, "an L3 tunnel");
    assert!(
        rx_packets(&net.b, &tun_b) > before + 19,
        "the flows did not come over the TUN device"
    );
}

/// Packets `dev` of `node` has received.
fn rx_packets(node: &Cluster, dev: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/rx_packets");
    let out = node
        .topo
        .exec(&node.topo.node_ns, &["cat", &path])
        .expect("cat");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path} on {}: {e}: {out:?}", node.node_name))
}

/// Wait until the device watcher has pinned links of these kinds
/// (`tcr`, `tcne`, ...) for `dev` (on its link event).
fn wait_attached(node: &Cluster, dev: &str, kinds: &[&str]) {
    wait_until(
        &format!("{} attaches to {dev}", node.node_name),
        Duration::from_secs(10),
        || {
            let names: Vec<String> = std::fs::read_dir(node.topo.bpffs.join("links"))
                .map(|dir| {
                    dir.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            kinds.iter().all(|kind| {
                names
                    .iter()
                    .any(|n| n.starts_with(&format!("{kind}-")) && n.ends_with(&format!("-{dev}")))
            })
        },
    );
}

/// One UDP datagram of argv[3] payload bytes, DF set, to argv[1]:argv[2];
/// prints the answer or "nothing".
const SIZED_DATAGRAM: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.settimeout(2.0)
s.sendto(b"x" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recv(65535).decode().strip())
except socket.timeout:
    print("nothing")
"#;

/// The DSR case's checks: TCP through both Services and UDP through both
/// NodePorts of node A reach web-b on node B; what the pod saw, and the
/// counters' growth on each node (`path` names the way between them).
fn dsr_answers_come_from_node_b(net: &TwoNodes, path: &str) {
    let (forwarded, learnt, replies) = (
        counter(&net.a, "dsr_forwarded"),
        counter(&net.b, "dsr_learned"),
        counter(&net.a, "reply"),
    );
    // TCP: the pod sees the client itself, and the answer, from node A's
    // NodePort, comes from node B.
    for port in [30080, 30081] {
        let seen = answers(&net.a, &net.client, &format!("http://{NODE_A}:{port}/"), 8);
        assert_eq!(
            seen,
            BTreeSet::from([pair("web-b", CLIENT)]),
            "NodePort {port} over {path}"
        );
    }
    // UDP: DSR keeps the client; hybrid source-NATs it to node A.
    for (port, seen_client) in [(30053, CLIENT), (30054, NODE_A)] {
        for _ in 0..3 {
            let reply = net
                .a
                .topo
                .udp(
                    &net.client,
                    NODE_A.parse::<std::net::Ipv4Addr>().unwrap(),
                    port,
                    2.0,
                    0,
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "UDP to {NODE_A}:{port} over {path}: {e}\nA: {}\nB: {}",
                        net.a.stats(),
                        net.b.stats()
                    )
                });
            assert!(
                reply.contains("pod=web-b") && reply.contains(&format!("client={seen_client}:")),
                "{port} over {path}: {reply}"
            );
        }
    }
    // Node A put the frontend into each flow's first packet and restored no
    // answer: they went from node B to the client. Node B learnt every flow.
    let flows = 8 + 8 + 3;
    assert!(
        counter(&net.a, "dsr_forwarded") - forwarded >= flows,
        "over {path}: {}",
        net.a.stats()
    );
    assert_eq!(counter(&net.a, "err_dsr_option"), 0);
    assert_eq!(
        counter(&net.a, "reply") - replies,
        3,
        "over {path}, only hybrid's source-NATed UDP answers come back to node A: {}",
        net.a.stats()
    );
    assert!(
        counter(&net.b, "dsr_learned") - learnt >= flows,
        "over {path}: {}",
        net.b.stats()
    );
    let conntrack = net.a.dump("conntrack").to_string();
    assert!(conntrack.contains("\"dsr\""), "{conntrack}");
}

/// What node A's device runs, from the kernel's view and the agent's pins:
/// "native", "generic" or "tc".
fn node_device_mode(node: &Cluster) -> String {
    let dev = format!("{}u", node.topo.prefix);
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &node.topo.node_ns,
            "-j",
            "-d",
            "link",
            "show",
            "dev",
            &dev,
        ])
        .output()
        .expect("ip link");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    // IFLA_XDP_ATTACHED: 1 driver, 2 generic (skb), 4 several.
    let xdp = link[0]["xdp"]["mode"].as_u64();
    let (egress, pins): (Vec<String>, Vec<String>) =
        std::fs::read_dir(node.topo.bpffs.join("links"))
            .expect("links dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(&format!("-{dev}")))
            .partition(|name| name.starts_with("tcne-"));
    // The egress program (answers of the node's own sockets) in every mode.
    if egress.len() != 1 {
        return format!("egress pins {egress:?}");
    }
    match (xdp, pins.as_slice()) {
        (Some(1), [pin]) if pin.starts_with("xdpn-") => "native".into(),
        (Some(2), [pin]) if pin.starts_with("xdpg-") => "generic".into(),
        (None, [pin]) if pin.starts_with("tcn-") => "tc".into(),
        other => format!("inconsistent: XDP mode {:?}, pins {:?}", other.0, other.1),
    }
}

/// A changed --device-mode is applied over the links an earlier agent
/// pinned (native XDP -> generic -> lb's default, tc on veth -> native),
/// with the device never left without a program: a connection held open
/// through the NodePort keeps working across every switch.
#[test]
fn device_mode_changes_are_applied_over_pinned_links() {
    let mut net = TwoNodes::new("xdp");
    net.a.write(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  \
         clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, nodePort: 30080, protocol: TCP}\n",
    );
    net.endpoints("web", &[(POD_A, "node-a")]);
    net.wait_programmed_on(&[&net.a], &format!("{NODE_A}:30080/TCP (external)"), 1);
    assert_eq!(node_device_mode(&net.a), "native");
    let mut held = HeldConnection::open(&net.client, NODE_A, 30080);
    let manifests = net.a.manifests.display().to_string();
    let dev = format!("{}u", net.a.topo.prefix);
    for (mode, want) in [
        ("xdp-generic", "generic"),
        ("default", "tc"),
        ("xdp", "native"),
        ("tc", "tc"),
    ] {
        net.a.stop_agent(lb_tests::e2e::SIGTERM);
        net.a.start_agent_with(&agent_args(&manifests, &dev, mode));
        wait_until(
            &format!("--device-mode {mode} runs {want}"),
            Duration::from_secs(10),
            || node_device_mode(&net.a) == want,
        );
        let reply = held.send(mode);
        assert!(
            reply.contains(&format!("echo={mode}")),
            "the held connection after switching to {mode}: {reply:?}"
        );
        let seen = answers(&net.a, &net.client, &format!("http://{NODE_A}:30080/"), 2);
        assert_eq!(
            seen,
            BTreeSet::from([pair("web-a", CLIENT)]),
            "new connections in {mode}"
        );
    }
}
