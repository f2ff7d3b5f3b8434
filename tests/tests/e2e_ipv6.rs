//! Dual stack end to end: pods with an IPv4 and an IPv6 address, a Service
//! with ipFamilyPolicy RequireDualStack (both ClusterIPs), reached over both
//! families from a pod (per-packet translation) and from the node namespace
//! (socket-level LB), by TCP and UDP; an IPv6 Service without endpoints is
//! refused; pings to the IPv6 ClusterIP are answered.

use std::{collections::BTreeSet, time::Duration};

use lb_tests::e2e::*;

/// Besides `WEB_DUAL_STACK`: an IPv6-only Service without endpoints.
const EMPTY6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: "fd00:96::20"
  clusterIPs: ["fd00:96::20"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  selector: {app: nothing}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

const WEB: [(&str, &str, &str); 2] = [
    ("web-0", "10.244.1.11", "fd00:244::11"),
    ("web-1", "10.244.1.12", "fd00:244::12"),
];

fn cluster() -> (Cluster, Pod) {
    let mut c = Cluster::new();
    let client = c.dual_pod("client", "10.244.1.2", "fd00:244::2", &[], &[]);
    for (name, ip, ip6) in WEB {
        c.dual_pod(name, ip, ip6, &[8080], &[5353]);
        let both = format!("{ip},{ip6}");
        c.write(
            &format!("pod-{name}.yaml"),
            &PodSpec {
                name,
                ip: &both,
                labels: &[("app", "web")],
                ready: true,
                ports: &[],
                terminating: false,
            }
            .yaml(),
        );
    }
    c.write("svc.yaml", WEB_DUAL_STACK);
    c.write("empty.yaml", EMPTY6);
    (c, client)
}

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

#[test]
fn dual_stack_service_answers_over_both_families() {
    let (mut c, client) = cluster();
    c.start_agent();
    let within = Duration::from_secs(10);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        within,
    );
    c.wait_backends(
        "[fd00:96::10]:80/TCP",
        &["[fd00:244::11]:8080", "[fd00:244::12]:8080"],
        within,
    );
    c.wait_backends(
        "[fd00:96::10]:53/UDP",
        &["[fd00:244::11]:5353", "[fd00:244::12]:5353"],
        within,
    );

    // From a pod: per-packet translation, client address kept, both families.
    let v6 = c.answering_pods(&client, "http://[fd00:96::10]/", 24);
    assert_eq!(v6.len(), 2, "both endpoints answer over IPv6: {v6:?}");
    let body = c
        .get(&client, "http://[fd00:96::10]/")
        .expect("IPv6 request");
    assert!(
        field(&body, "client").starts_with("fd00:244::2:"),
        "IPv6 client address kept: {body}"
    );
    let body = c.get(&client, "http://10.96.0.10/").expect("IPv4 request");
    assert!(field(&body, "client").starts_with("10.244.1.2:"), "{body}");
    let answer = c
        .topo
        .udp(
            &client,
            "fd00:96::10".parse::<std::net::IpAddr>().unwrap(),
            53,
            2.0,
            0,
        )
        .expect("IPv6 UDP answer");
    assert!(answer.starts_with("pod=web-"), "{answer}");
    let new_flows = c.stats()["new_flow"].as_u64().unwrap_or(0);
    assert!(new_flows >= 27, "pod traffic is translated per packet");

    // Refused at once when the IPv6 Service has no endpoint (curl 7: RST).
    assert_eq!(c.get(&client, "http://[fd00:96::20]/"), Err(7));
    // An undeclared UDP port of the IPv6 ClusterIP: ICMPv6 port unreachable.
    let refused = c.topo.udp(
        &client,
        "fd00:96::10".parse::<std::net::IpAddr>().unwrap(),
        54,
        2.0,
        0,
    );
    assert_eq!(refused, Err("refused".to_string()));

    // Ping6 to the ClusterIP is answered while it has endpoints.
    let ping = c
        .topo
        .exec(
            &client.ns,
            &["ping", "-6", "-c", "1", "-W", "2", "fd00:96::10"],
        )
        .expect("ping");
    assert!(
        ping.status.success(),
        "ping6 answered: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // From the node namespace: socket-level LB over IPv6, TCP and UDP.
    let node = c.topo.node_ns.clone();
    let mut pods = BTreeSet::new();
    for i in 0..16 {
        let (status, body) = c.http_from(&node, "http://[fd00:96::10]/");
        assert_eq!(status, 200, "node request {i}: {body:?}");
        pods.insert(field(&body, "pod").to_string());
    }
    assert_eq!(pods.len(), 2, "both endpoints answer the node: {pods:?}");
    let tcp = probe(&c, &["tcp", "fd00:96::10", "80"]);
    assert_eq!(tcp[0], "peer=[fd00:96::10]:80", "{tcp:?}");
    let udp = probe(&c, &["sendto", "fd00:96::10", "53"]);
    assert!(
        udp[0].starts_with("from=[fd00:96::10]:53 pod=web-"),
        "{udp:?}"
    );
    assert_eq!(
        c.stats()["new_flow"].as_u64().unwrap_or(0),
        new_flows,
        "the node's sockets are translated at connect(), not per packet"
    );

    // explain speaks IPv6: the frontend, its candidates, the verdict.
    let out = std::process::Command::new(agent_bin())
        .args([
            "explain",
            "--from",
            "[fd00:244::2]:41000",
            "--to",
            "[fd00:96::10]:80",
            "--bpffs",
        ])
        .arg(&c.topo.bpffs)
        .output()
        .expect("run explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("frontend   [fd00:96::10]:80/TCP ClusterIP"),
        "{text}"
    );
    assert!(text.contains("[fd00:244::11]:8080 active"), "{text}");
    assert!(
        text.contains("verdict    translated to [fd00:244::1"),
        "{text}"
    );
    // And the node's own IPv6 socket, through connect6.
    let text = c.explain(&["--from", "node", "--to", "[fd00:96::10]:80"]);
    assert!(
        text.contains("translated at connect() to [fd00:244::1"),
        "{text}"
    );

    // dump speaks IPv6, in tables too.
    let table = std::process::Command::new(agent_bin())
        .args(["dump", "services", "--bpffs"])
        .arg(&c.topo.bpffs)
        .output()
        .expect("dump table");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("[fd00:96::10]:80/TCP"), "{table}");
    assert!(table.contains("[fd00:244::11]:8080 (active)"), "{table}");
    let services = c.dump("services");
    assert!(
        services["services"]
            .as_array()
            .expect("services")
            .iter()
            .any(|s| s["frontend"]["address"] == "fd00:96::10"),
        "{services}"
    );
}

#[test]
fn ipv6_endpoint_removal_reaches_the_datapath() {
    let (mut c, client) = cluster();
    c.start_agent();
    c.wait_backends(
        "[fd00:96::10]:80/TCP",
        &["[fd00:244::11]:8080", "[fd00:244::12]:8080"],
        Duration::from_secs(10),
    );
    c.remove("pod-web-0.yaml");
    c.wait_backends(
        "[fd00:96::10]:80/TCP",
        &["[fd00:244::12]:8080"],
        Duration::from_secs(10),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    let pods = c.answering_pods(&client, "http://[fd00:96::10]/", 8);
    assert_eq!(pods, BTreeSet::from(["web-1".to_string()]));
}
