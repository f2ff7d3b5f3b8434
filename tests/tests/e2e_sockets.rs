//! Socket-level LB end to end: processes of the node namespace (the host
//! network: kubelet, hostNetwork pods, the node's tools) reach Services
//! through the cgroup programs the agent attaches to the root cgroup, while
//! pods keep per-packet translation. The programs act only on the agent's
//! network namespace, so the test runner's own sockets are never touched.

use std::{fs, path::PathBuf, time::Duration};

use lb_tests::e2e::*;

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  clusterIP: 10.96.0.30
  selector: {app: web}
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.0.20
  selector: {app: nothing}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

const WEB: [(&str, &str); 2] = [("web-0", "10.244.1.11"), ("web-1", "10.244.1.12")];
/// The web pods' IPv6 addresses (dual-stack variant).
const WEB6: [&str; 2] = ["fd00:244::11", "fd00:244::12"];

/// For the all-namespaces test: an address no other test uses, since its
/// programs see the sockets of every namespace on the machine.
const SVC_ALL_NAMESPACES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.201.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

/// Two web pods (8080/TCP, 5353/UDP), a client pod, the Services `svc`.
fn cluster(svc: &str) -> (Cluster, Pod) {
    cluster_of(svc, false)
}

/// `cluster`, with IPv6 addresses on the web pods too when `dual`.
fn cluster_of(svc: &str, dual: bool) -> (Cluster, Pod) {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for ((name, ip), ip6) in WEB.into_iter().zip(WEB6) {
        let ips = if dual {
            c.dual_pod(name, ip, ip6, &[8080], &[5353]);
            format!("{ip},{ip6}")
        } else {
            c.pod(name, ip, &[8080], &[5353]);
            ip.to_string()
        };
        c.write(
            &format!("pod-{name}.yaml"),
            &pod_yaml(name, &ips, "web", true),
        );
    }
    c.write("svc.yaml", svc);
    (c, client)
}

fn wait_programmed(c: &Cluster) {
    for frontend in ["10.96.0.10:80/TCP", "10.96.0.10:53/UDP"] {
        let port = if frontend.ends_with("TCP") {
            8080
        } else {
            5353
        };
        let want: Vec<String> = WEB.iter().map(|(_, ip)| format!("{ip}:{port}")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        c.wait_backends(frontend, &want, Duration::from_secs(10));
    }
}

/// Run the probe in the node namespace: its output lines.
fn probe(c: &Cluster, args: &[&str]) -> Vec<String> {
    let script = c.topo.dir.join("sock_probe.py");
    let mut argv = vec!["python3", script.to_str().expect("utf-8 path")];
    argv.extend_from_slice(args);
    let out = c.topo.exec(&c.topo.node_ns, &argv).expect("run probe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn counter(c: &Cluster, name: &str) -> u64 {
    c.stats()[name].as_u64().unwrap_or(0)
}

#[test]
fn host_namespace_reaches_clusterip_by_tcp_and_udp_without_per_packet_nat() {
    let (mut c, client) = cluster(SVC);
    c.start_agent();
    wait_programmed(&c);
    let node = c.topo.node_ns.clone();

    // TCP with curl: both endpoints answer the node's requests.
    let mut pods = std::collections::BTreeSet::new();
    for i in 0..24 {
        let (status, body) = c.http_from(&node, "http://10.96.0.10/");
        assert_eq!(status, 200, "request {i} from the node: {body:?}");
        pods.insert(field(&body, "pod").to_string());
    }
    assert_eq!(pods.len(), 2, "both endpoints answer the node: {pods:?}");

    // getpeername() shows the Service, not the backend.
    let tcp = probe(&c, &["tcp", "10.96.0.10", "80"]);
    assert_eq!(
        tcp.first().map(String::as_str),
        Some("peer=10.96.0.10:80"),
        "{tcp:?}"
    );
    assert!(tcp[1].starts_with("pod=web-"), "{tcp:?}");

    // Unconnected UDP: recvfrom() names the Service as the answer's source.
    let udp = probe(&c, &["sendto", "10.96.0.10", "53"]);
    assert_eq!(udp.len(), 1, "{udp:?}");
    assert!(udp[0].starts_with("from=10.96.0.10:53 pod=web-"), "{udp:?}");
    // Connected UDP: the peer is the Service, the answers come.
    let connected = probe(&c, &["connected", "10.96.0.10", "53", "0.5"]);
    assert_eq!(connected[0], "peer=10.96.0.10:53", "{connected:?}");
    assert!(
        connected[1..].iter().all(|l| l.starts_with("pod=web-")),
        "{connected:?}"
    );

    // dump shows what the programs did for the node's sockets.
    let dumped = c.dump("conntrack");
    let sockets = dumped["sockets"].as_array().expect("sockets");
    assert!(
        sockets.iter().any(|s| s["service"] == "10.96.0.10:53"
            && s["protocol"] == "UDP"
            && s["backend"].as_str().is_some_and(|b| b.ends_with(":5353"))),
        "{dumped}"
    );

    // All of it at connect()/sendmsg() time: the packet path translated nothing.
    assert!(counter(&c, "sock_translated") >= 27);
    assert!(counter(&c, "sock_rev_translated") >= 2);
    assert_eq!(counter(&c, "new_flow"), 0, "{}", c.stats());

    // sessionAffinity ClientIP: the node is one client.
    let sticky: std::collections::BTreeSet<String> = (0..10)
        .map(|_| {
            let (_, body) = c.http_from(&node, "http://10.96.0.30/");
            field(&body, "pod").to_string()
        })
        .collect();
    assert_eq!(
        sticky.len(),
        1,
        "affinity keeps the node on one pod: {sticky:?}"
    );

    // No endpoints, or a port the Service does not declare: refused at once.
    for url in ["http://10.96.0.20/", "http://10.96.0.10:81/"] {
        let (status, body) = c.http_from(&node, url);
        assert_eq!(status, 0, "{url}: {body:?}");
    }
    let refused = probe(&c, &["tcp", "10.96.0.20", "80"]);
    assert_eq!(refused, ["error=ECONNREFUSED"], "empty Service over TCP");
    let refused = probe(&c, &["sendto", "10.96.0.20", "53"]);
    assert_eq!(refused, ["error=ECONNREFUSED"], "empty Service over UDP");
    assert!(counter(&c, "sock_refused") >= 4);

    // Pods are another namespace: per-packet translation as before.
    let before = counter(&c, "sock_translated");
    let body = c.get(&client, "http://10.96.0.10/").expect("pod request");
    assert!(field(&body, "client").starts_with("10.244.1.2:"), "{body}");
    assert_eq!(
        counter(&c, "sock_translated"),
        before,
        "pod sockets are not translated"
    );
    assert!(counter(&c, "new_flow") >= 1);

    // Turned off: the links go, and the node no longer reaches the Service.
    let links = c.topo.bpffs.join("links/cgroup");
    assert!(links.join("connect4").exists());
    c.stop_agent(SIGTERM);
    c.start_agent_with(&[
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--socket-lb=false".into(),
    ]);
    let pins: Vec<PathBuf> = fs::read_dir(&links)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(pins.is_empty(), "socket links detached: {pins:?}");
    let (status, _) = c.http_from(&node, "http://10.96.0.10/");
    assert_eq!(status, 0, "nothing translates the node's sockets any more");
}

#[test]
fn connected_udp_socket_leaves_a_removed_backend() {
    connected_udp_leaves_a_removed_backend(SVC, "10.96.0.10", false);
}

#[test]
fn connected_udp6_socket_leaves_a_removed_backend() {
    connected_udp_leaves_a_removed_backend(WEB_DUAL_STACK, "fd00:96::10", true);
}

/// A connected UDP socket of the node talking to `service`:53 through one
/// backend; that backend's pod goes; the socket is closed and reconnects.
fn connected_udp_leaves_a_removed_backend(svc: &str, service: &str, dual: bool) {
    let (mut c, _client) = cluster_of(svc, dual);
    c.start_agent();
    wait_programmed(&c);
    let peer = if dual {
        format!("[{service}]:53")
    } else {
        format!("{service}:53")
    };

    let log = c.topo.dir.join("connected.log");
    let script = c.topo.dir.join("sock_probe.py");
    c.topo
        .spawn_in_node_logged(
            "probe",
            std::path::Path::new("python3"),
            &[
                script.display().to_string(),
                "connected".into(),
                service.into(),
                "53".into(),
                "20".into(),
            ],
            &log,
        )
        .expect("start probe");
    let lines = || -> Vec<String> {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    wait_until("the probe has 5 answers", Duration::from_secs(10), || {
        lines().iter().filter(|l| l.starts_with("pod=")).count() >= 5
    });
    let first: Vec<String> = lines()
        .iter()
        .filter(|l| l.starts_with("pod="))
        .map(|l| field(l, "pod").to_string())
        .collect();
    let pinned = first[0].clone();
    assert!(
        first.iter().all(|p| *p == pinned),
        "a connected socket talks to one backend: {first:?}"
    );

    // The pod it talks to goes away.
    c.remove(&format!("pod-{pinned}.yaml"));
    let other = WEB.iter().find(|(n, _)| *n != pinned).expect("other pod").0;
    wait_until(
        "the socket is closed and reconnects to the other pod",
        Duration::from_secs(10),
        || {
            let all = lines();
            let Some(error) = all.iter().position(|l| l == "error=ECONNABORTED") else {
                return false;
            };
            all[error + 1..]
                .iter()
                .any(|l| l.starts_with(&format!("pod={other} ")))
        },
    );
    let all = lines();
    let error = all
        .iter()
        .position(|l| l == "error=ECONNABORTED")
        .expect("error");
    assert_eq!(
        all[error + 1],
        format!("reconnected peer={peer}"),
        "the reconnected socket still shows the Service: {all:?}"
    );
    assert!(
        all[error + 2..]
            .iter()
            .filter(|l| l.starts_with("pod="))
            .all(|l| l.starts_with(&format!("pod={other} "))),
        "after the reconnect only the remaining pod answers: {all:?}"
    );
    c.topo.stop("probe", SIGTERM);
}

#[test]
fn all_namespaces_option_translates_pod_sockets_too() {
    let (mut c, client) = cluster(SVC_ALL_NAMESPACES);
    c.start_agent_with(&[
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--socket-lb-all-namespaces=true".into(),
    ]);
    c.wait_backends(
        "10.96.201.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    let body = c.get(&client, "http://10.96.201.10/").expect("pod request");
    assert!(body.starts_with("pod=web-"), "{body}");
    assert!(counter(&c, "sock_translated") >= 1, "{}", c.stats());
    assert_eq!(counter(&c, "new_flow"), 0, "translated at connect()");
}
