//! Taking a node over from kube-proxy: its iptables rules (both backends)
//! and nftables table removed with `--cleanup-kube-proxy true`, kubelet's
//! and other components' `KUBE-*` chains left, the Service served by lb afterwards; and no start at all
//! while kube-proxy still runs.

use std::{process::Command, time::Duration};

use lb_tests::e2e::*;

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

/// kube-proxy's iptables shape for SVC (one endpoint), with kubelet's
/// chains beside it.
const KUBE_PROXY_RULES: &str = "\
*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-ROUTER-INPUT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-INPUT
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-WEB0 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SVC-WEB -j KUBE-SEP-WEB0
-A KUBE-SEP-WEB0 -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080
COMMIT
";

fn in_node(c: &Cluster, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &c.topo.node_ns]).args(args);
    let out = match stdin {
        Some(text) => {
            use std::io::Write as _;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output().expect("wait")
        }
        None => cmd.output().expect("run"),
    };
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// KUBE-* chain names in an iptables-save output.
fn kube_chains(save: &str) -> Vec<String> {
    let mut chains: Vec<String> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("KUBE-"))
        .map(String::from)
        .collect();
    chains.sort();
    chains
}

#[test]
fn kube_proxys_rules_are_removed_and_kubelets_kept() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    // kube-proxy's rules in both backends (a node switched from legacy to
    // nf_tables keeps both), and its nftables table.
    in_node(
        &c,
        &["iptables-nft-restore", "--noflush"],
        Some(KUBE_PROXY_RULES),
    );
    in_node(
        &c,
        &["iptables-legacy-restore", "--noflush"],
        Some(KUBE_PROXY_RULES),
    );
    in_node(
        &c,
        &["nft", "-f", "-"],
        Some("table ip kube-proxy {\n chain services {\n }\n}\n"),
    );
    // kube-proxy's rules serve the Service before lb runs.
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.10/")
                .expect("via kube-proxy's rules"),
            "pod"
        ),
        "web-0"
    );

    // With exactly the DaemonSet's capabilities, as it runs on a node.
    let caps = daemonset_caps();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    c.start_agent_with_caps(
        &[
            "--manifests".into(),
            c.manifests.display().to_string(),
            "--cleanup-kube-proxy".into(),
            "true".into(),
        ],
        &caps,
    );
    // Removed once lb has programmed the Services (right after its first sync).
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        wait_until(
            &format!("{save}: only kubelet's and kube-router's chains are left"),
            Duration::from_secs(10),
            || {
                kube_chains(&in_node(&c, &[save], None))
                    == [
                        "KUBE-FIREWALL",
                        "KUBE-IPTABLES-HINT",
                        "KUBE-KUBELET-CANARY",
                        "KUBE-ROUTER-INPUT",
                    ]
            },
        );
        let rules = in_node(&c, &[save, "-t", "filter"], None);
        assert!(rules.contains("-A INPUT -j KUBE-FIREWALL"), "{rules}");
        assert!(rules.contains("-j KUBE-ROUTER-INPUT"), "{rules}");
    }
    wait_until(
        "kube-proxy's nftables table is gone",
        Duration::from_secs(5),
        || !in_node(&c, &["nft", "list", "tables"], None).contains("kube-proxy"),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.10/").expect("via lb"),
            "pod"
        ),
        "web-0"
    );
}

/// kube-proxy still running (here: holding its health port) would put its
/// rules back: the agent refuses to start, saying so.
#[test]
fn the_agent_refuses_to_start_while_kube_proxy_runs() {
    let mut c = Cluster::new();
    c.write("svc.yaml", SVC);
    let holder = "import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0',10256)); s.listen(); time.sleep(60)\n";
    c.topo
        .spawn_in_node(
            "kube-proxy",
            std::path::Path::new("python3"),
            &["-c".to_string(), holder.to_string()],
        )
        .expect("port holder");
    wait_until("port 10256 is held", Duration::from_secs(5), || {
        in_node(&c, &["ss", "-ltnH", "sport = :10256"], None).contains("10256")
    });
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.topo.node_ns))
        .arg(agent_bin())
        .args(["run", "--manifests"])
        .arg(&c.manifests)
        .arg("--bpffs")
        .arg(&c.topo.bpffs)
        .args(["--node-name", NODE_NAME, "--socket-lb", "false"])
        .output()
        .expect("run the agent");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("kube-proxy is still running") && log.contains("10256"),
        "{log}"
    );
}

/// `lb-agent uninstall` after the agent stopped: every program detached
/// (the Service is no longer translated), every pin gone, and the NodePort
/// range lb reserved taken back, what was reserved before kept.
#[test]
fn uninstall_leaves_the_node_as_it_was() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    c.topo
        .node_sysctl("net.ipv4.ip_local_reserved_ports", "8080")
        .unwrap();
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    c.stop_agent(15);
    // Stopped, the agent leaves the datapath serving.
    assert!(c.get(&client, "http://10.96.0.10/").is_ok());

    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.topo.node_ns))
        .arg(agent_bin())
        .args(["uninstall", "--bpffs"])
        .arg(&c.topo.bpffs)
        .output()
        .expect("lb-agent uninstall");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("detached"), "{said}");
    for map in lb_common::map_names::ALL {
        assert!(!c.topo.bpffs.join(map).exists(), "{map} still pinned");
    }
    assert!(!c.topo.bpffs.join("links").exists());
    let mut last = Ok(String::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        last = c.topo.curl(&client, "http://10.96.0.10/", 3.0);
        if matches!(last, Err((7, _))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        matches!(last, Err((7, _))),
        "the ClusterIP still answers or hangs after uninstall: {last:?}"
    );
    let reserved = in_node(
        &c,
        &["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"],
        None,
    );
    assert_eq!(reserved.trim(), "8080");
}

/// How many held connections still answer from the endpoint they opened
/// on (those that do not are printed).
fn still_on_their_endpoints(held: &mut [(HeldConnection, String)]) -> usize {
    let mut kept = 0;
    for (i, (conn, pod)) in held.iter_mut().enumerate() {
        let reply = conn.try_send(&format!("via lb {i}"));
        if reply
            .as_deref()
            .is_some_and(|r| r.contains(&format!("pod={pod}")))
        {
            kept += 1;
        } else {
            eprintln!("connection {i} (to {pod}) broke: {reply:?}");
        }
    }
    kept
}

/// kube-proxy's shape for a Service with three endpoints: one statistic
/// rule per endpoint, as its iptables mode writes them.
const KUBE_PROXY_THREE: &str = "\
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-WEB0 - [0:0]
:KUBE-SEP-WEB1 - [0:0]
:KUBE-SEP-WEB2 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SVC-WEB -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-WEB0
-A KUBE-SVC-WEB -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-WEB1
-A KUBE-SVC-WEB -j KUBE-SEP-WEB2
-A KUBE-SEP-WEB0 -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080
-A KUBE-SEP-WEB1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.12:8080
-A KUBE-SEP-WEB2 -p tcp -m tcp -j DNAT --to-destination 10.244.1.13:8080
COMMIT
";

/// Connections kube-proxy's rules translated keep their endpoint when lb
/// takes the node over and the rules are removed: lb reads the kernel's
/// conntrack table after its first sync and carries each connection on to
/// the endpoint kube-proxy chose. With three endpoints, six connections
/// re-balanced afresh would all keep theirs with probability (1/3)^6.
#[test]
fn connections_kube_proxy_translated_survive_the_takeover() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", SVC);
    in_node(
        &c,
        &["iptables-nft-restore", "--noflush"],
        Some(KUBE_PROXY_THREE),
    );
    let mut held: Vec<(HeldConnection, String)> = (0..6)
        .map(|_| {
            let conn = HeldConnection::open(&client, "10.96.0.10", 80);
            let pod = field(&conn.greeting, "pod").to_string();
            (conn, pod)
        })
        .collect();
    for (conn, pod) in &mut held {
        assert!(conn.send("via kube-proxy").contains(&format!("pod={pod}")));
    }
    // With the DaemonSet's capabilities: reading and deleting the kernel's
    // conntrack entries needs nothing more.
    let caps = daemonset_caps();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    c.start_agent_with_caps(
        &[
            "--manifests".into(),
            c.manifests.display().to_string(),
            "--cleanup-kube-proxy".into(),
            "true".into(),
        ],
        &caps,
    );
    wait_until(
        "kube-proxy's chains are removed",
        Duration::from_secs(10),
        || kube_chains(&in_node(&c, &["iptables-nft-save"], None)).is_empty(),
    );
    let kept = still_on_their_endpoints(&mut held);
    assert_eq!(
        kept, 6,
        "every connection kept the endpoint kube-proxy chose"
    );
    // lb translates them now: its conntrack holds them.
    let flows = c.dump("conntrack");
    let tracked = flows["flows"].as_array().expect("flows").len();
    assert!(tracked >= 6, "lb tracks the carried connections: {flows}");
    // New connections are lb's, over every endpoint.
    let seen = c.answering_pods(&client, "http://10.96.0.10/", 30);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// kube-proxy's NodePort shape: the node's address and port 30080 go to
/// the Service's endpoints, masqueraded (externalTrafficPolicy Cluster).
const KUBE_PROXY_NODEPORT: &str = "\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-EXT-WEB - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-WEB0 - [0:0]
:KUBE-SEP-WEB1 - [0:0]
:KUBE-SEP-WEB2 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-WEB
-A KUBE-EXT-WEB -j KUBE-MARK-MASQ
-A KUBE-EXT-WEB -j KUBE-SVC-WEB
-A KUBE-SVC-WEB -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-WEB0
-A KUBE-SVC-WEB -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-WEB1
-A KUBE-SVC-WEB -j KUBE-SEP-WEB2
-A KUBE-SEP-WEB0 -p tcp -m tcp -j DNAT --to-destination 10.244.1.11:8080
-A KUBE-SEP-WEB1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.12:8080
-A KUBE-SEP-WEB2 -p tcp -m tcp -j DNAT --to-destination 10.244.1.13:8080
COMMIT
";

/// The same from outside the node, over its own NIC: NodePort connections
/// kube-proxy masqueraded to the node keep their endpoint and their
/// masquerade address and port (lb's conntrack restores the client on the
/// way back), through lb's node program with its defaults.
#[test]
fn nodeport_connections_kube_proxy_masqueraded_survive_the_takeover() {
    const NODE: &str = "192.168.50.1";
    let mut c = Cluster::new();
    let mut lan = Lan::new(&c.topo).expect("lan");
    let dev = lan
        .connect(&c.topo, &format!("{NODE}/24"))
        .expect("node on the lan");
    let outside = lan
        .add_host("client", "192.168.50.100/24", &[])
        .expect("client");
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
    );
    in_node(
        &c,
        &["iptables-nft-restore", "--noflush"],
        Some(KUBE_PROXY_NODEPORT),
    );
    let mut held: Vec<(HeldConnection, String)> = (0..6)
        .map(|_| {
            let conn = HeldConnection::open(&outside, NODE, 30080);
            let pod = field(&conn.greeting, "pod").to_string();
            // kube-proxy masqueraded it: the pod saw the node, not the client.
            assert!(
                !field(&conn.greeting, "client").starts_with("192.168.50.100"),
                "{}",
                conn.greeting
            );
            (conn, pod)
        })
        .collect();
    c.start_agent_with(&[
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--devices".into(),
        dev,
        "--cleanup-kube-proxy".into(),
        "true".into(),
    ]);
    wait_until(
        "kube-proxy's chains are removed",
        Duration::from_secs(10),
        || kube_chains(&in_node(&c, &["iptables-nft-save"], None)).is_empty(),
    );
    let kept = still_on_their_endpoints(&mut held);
    assert_eq!(
        kept, 6,
        "every connection kept the endpoint kube-proxy chose"
    );
    // New connections from outside are lb's, over every endpoint.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let body = c
            .topo
            .curl(&outside, &format!("http://{NODE}:30080/"), 3.0)
            .expect("NodePort via lb");
        seen.insert(field(&body, "pod").to_string());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}
