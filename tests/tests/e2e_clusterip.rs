//! ClusterIP end to end: the real agent on a manifests directory in a node
//! namespace, pods with real servers, curl and a UDP client.

use std::time::Duration;

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
"#;

#[test]
fn clusterip_tcp_reaches_every_ready_endpoint_and_keeps_client_ip() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(5),
    );

    let pods = c.answering_pods(&client, "http://10.96.0.10:80/", 40);
    assert_eq!(pods.len(), 3, "every ready endpoint answers: {pods:?}");
    let body = c.get(&client, "http://10.96.0.10/").expect("request");
    assert!(
        field(&body, "client").starts_with("10.244.1.2:"),
        "client IP preserved: {body}"
    );
}

/// Three web pods (8080/TCP, 5353/UDP) plus a client, manifests written, agent running.
fn web_cluster(svc: &str) -> (Cluster, Pod) {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[5353]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", svc);
    c.start_agent();
    (c, client)
}

const DNS_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  selector: {app: web}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

#[test]
fn clusterip_udp_reaches_every_ready_endpoint() {
    let (c, client) = web_cluster(DNS_SVC);
    c.wait_backends(
        "10.96.0.53:53/UDP",
        &["10.244.1.11:5353", "10.244.1.12:5353", "10.244.1.13:5353"],
        Duration::from_secs(5),
    );
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let reply = c
            .topo
            .udp(
                &client,
                "10.96.0.53".parse::<std::net::Ipv4Addr>().unwrap(),
                53,
                2.0,
                0,
            )
            .expect("udp reply");
        assert!(
            field(&reply, "client").starts_with("10.244.1.2:"),
            "{reply}"
        );
        pods.insert(field(&reply, "pod").to_string());
    }
    assert_eq!(pods.len(), 3, "{pods:?}");
}

#[test]
fn endpoint_changes_take_effect_within_a_second() {
    let (c, client) = web_cluster(SVC);
    let all = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];
    c.wait_backends("10.96.0.10:80/TCP", &all, Duration::from_secs(5));
    let url = "http://10.96.0.10/";

    // A failing readiness probe takes web-1 out.
    c.write(
        "pod-web-1.yaml",
        &pod_yaml("web-1", "10.244.1.12", "web", false),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.13:8080"],
        Duration::from_secs(1),
    );
    let pods = c.answering_pods(&client, url, 30);
    assert!(
        !pods.contains("web-1"),
        "unready pod still answers: {pods:?}"
    );

    // web-2 deleted.
    c.remove("pod-web-2.yaml");
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(1),
    );
    assert_eq!(
        c.answering_pods(&client, url, 10),
        ["web-0".to_string()].into()
    );

    // Both back.
    c.write(
        "pod-web-1.yaml",
        &pod_yaml("web-1", "10.244.1.12", "web", true),
    );
    c.write(
        "pod-web-2.yaml",
        &pod_yaml("web-2", "10.244.1.13", "web", true),
    );
    c.wait_backends("10.96.0.10:80/TCP", &all, Duration::from_secs(1));
    assert_eq!(c.answering_pods(&client, url, 40).len(), 3);

    // A new endpoint appears.
    let mut c = c;
    c.pod("web-3", "10.244.1.14", &[8080], &[]);
    c.write(
        "pod-web-3.yaml",
        &pod_yaml("web-3", "10.244.1.14", "web", true),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &[
            "10.244.1.11:8080",
            "10.244.1.12:8080",
            "10.244.1.13:8080",
            "10.244.1.14:8080",
        ],
        Duration::from_secs(1),
    );
    assert!(c.answering_pods(&client, url, 60).contains("web-3"));
}

#[test]
fn named_target_ports_resolve_per_pod_on_a_multi_port_service() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    // Two pods serve the named port "http" on different numbers, and a
    // second, numeric port on both.
    c.pod("a", "10.244.1.21", &[8080, 9100], &[]);
    c.pod("b", "10.244.1.22", &[9090, 9100], &[]);
    let pod = |name, ip, http| {
        PodSpec {
            name,
            ip,
            labels: &[("app", "named")],
            ready: true,
            ports: &[("http", http, "TCP"), ("metrics", 9100, "TCP")],
            terminating: false,
        }
        .yaml()
    };
    c.write("a.yaml", &pod("a", "10.244.1.21", 8080));
    c.write("b.yaml", &pod("b", "10.244.1.22", 9090));
    c.write(
        "svc.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: named}
spec:
  clusterIP: 10.96.0.20
  selector: {app: named}
  ports:
  - {name: web, port: 80, targetPort: http}
  - {name: metrics, port: 9100, targetPort: metrics}
"#,
    );
    c.start_agent();
    c.wait_backends(
        "10.96.0.20:80/TCP",
        &["10.244.1.21:8080", "10.244.1.22:9090"],
        Duration::from_secs(5),
    );
    c.wait_backends(
        "10.96.0.20:9100/TCP",
        &["10.244.1.21:9100", "10.244.1.22:9100"],
        Duration::from_secs(5),
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let body = c.get(&client, "http://10.96.0.20/").expect("web port");
        seen.insert((
            field(&body, "pod").to_string(),
            field(&body, "port").to_string(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("a".to_string(), "8080".to_string()),
            ("b".to_string(), "9090".to_string())
        ]
        .into()
    );
    let body = c
        .get(&client, "http://10.96.0.20:9100/")
        .expect("metrics port");
    assert_eq!(field(&body, "port"), "9100");
}

#[test]
fn same_port_on_tcp_and_udp_reaches_different_targets() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("dns", "10.244.1.31", &[5353], &[5354]);
    c.write("dns.yaml", &pod_yaml("dns", "10.244.1.31", "dns", true));
    c.write(
        "svc.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
  - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5354}
"#,
    );
    c.start_agent();
    c.wait_backends(
        "10.96.0.53:53/TCP",
        &["10.244.1.31:5353"],
        Duration::from_secs(5),
    );
    c.wait_backends(
        "10.96.0.53:53/UDP",
        &["10.244.1.31:5354"],
        Duration::from_secs(5),
    );
    let body = c.get(&client, "http://10.96.0.53:53/").expect("tcp");
    assert_eq!(field(&body, "port"), "5353");
    let reply = c
        .topo
        .udp(
            &client,
            "10.96.0.53".parse::<std::net::Ipv4Addr>().unwrap(),
            53,
            2.0,
            0,
        )
        .expect("udp");
    assert_eq!(field(&reply, "port"), "5354");
}

#[test]
fn pod_reaches_itself_through_its_service() {
    let mut c = Cluster::new();
    let web = c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    for _ in 0..5 {
        let body = c.get(&web, "http://10.96.0.10/").expect("hairpin request");
        assert_eq!(field(&body, "pod"), "web-0");
        // Masqueraded, or the pod would answer itself directly.
        assert!(
            field(&body, "client").starts_with("169.254.42.1:"),
            "{body}"
        );
    }
    assert!(c.stats()["hairpin"].as_u64().unwrap() >= 5);
}

#[test]
fn undeclared_port_and_empty_service_are_refused_fast() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.write("svc.yaml", SVC); // no pods: no endpoints
    c.write(
        "dns.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  selector: {app: none}
  ports:
  - {name: dns, port: 53, protocol: UDP}
"#,
    );
    c.start_agent();
    c.wait_backends("10.96.0.10:80/TCP", &[], Duration::from_secs(5));
    let started = std::time::Instant::now();
    assert_eq!(
        c.get(&client, "http://10.96.0.10/"),
        Err(7),
        "no endpoints: connection refused"
    );
    assert_eq!(
        c.get(&client, "http://10.96.0.10:81/"),
        Err(7),
        "undeclared port: refused"
    );
    let ip: std::net::Ipv4Addr = "10.96.0.53".parse().unwrap();
    assert_eq!(
        c.topo.udp(&client, ip, 53, 2.0, 0),
        Err("refused".into()),
        "UDP, no endpoints"
    );
    assert_eq!(
        c.topo.udp(&client, ip, 54, 2.0, 0),
        Err("refused".into()),
        "UDP, undeclared port"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals must be fast: {:?}",
        started.elapsed()
    );
    let stats = c.stats();
    assert!(stats["reject_tcp_rst"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["reject_icmp"].as_u64().unwrap() >= 2, "{stats}");
}

#[test]
fn headless_external_name_and_other_proxies_services_are_not_programmed() {
    let mut c = Cluster::new();
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write(
        "ignored.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: other-proxy
  labels: {service.kubernetes.io/service-proxy-name: someone-else}
spec: {clusterIP: 10.96.0.30, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: headless-label
  labels: {service.kubernetes.io/headless: ""}
spec: {clusterIP: 10.96.0.31, selector: {app: web}, ports: [{port: 80}]}
"#,
    );
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    let dump = c.dump("services");
    assert_eq!(
        dump["services"].as_array().unwrap().len(),
        1,
        "only web is programmed: {dump}"
    );
    assert_eq!(dump["service_ips"], serde_json::json!(["10.96.0.10"]));
}

#[test]
fn selectorless_service_with_manual_endpoints() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("db", "10.244.1.41", &[5432], &[]);
    c.write(
        "db.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: external-db}
spec:
  clusterIP: 10.96.0.40
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: external-db}
subsets:
- addresses: [{ip: 10.244.1.41}]
  notReadyAddresses: [{ip: 10.244.1.42}]
  ports: [{name: pg, port: 5432}]
"#,
    );
    c.start_agent();
    c.wait_backends(
        "10.96.0.40:5432/TCP",
        &["10.244.1.41:5432"],
        Duration::from_secs(5),
    );
    let body = c
        .get(&client, "http://10.96.0.40:5432/")
        .expect("mirrored endpoint");
    assert_eq!(field(&body, "pod"), "db");
}

#[test]
fn established_connection_survives_changes_to_other_endpoints() {
    let (mut c, client) = web_cluster(SVC);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(5),
    );
    let mut conn = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&conn.greeting, "pod").to_string();
    // Take every other endpoint out, then add a new one.
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        let name = format!("web-{i}");
        if name != pod {
            c.write(
                &format!("pod-{name}.yaml"),
                &pod_yaml(&name, ip, "web", false),
            );
        }
    }
    c.pod("web-9", "10.244.1.19", &[8080], &[]);
    c.write(
        "pod-web-9.yaml",
        &pod_yaml("web-9", "10.244.1.19", "web", true),
    );
    wait_until("the change is programmed", Duration::from_secs(2), || {
        c.backends_of("10.96.0.10:80/TCP")
            .is_some_and(|b| b.contains("10.244.1.19:8080") && b.len() == 2)
    });
    for i in 0..5 {
        let reply = conn.send(&format!("msg{i}"));
        assert_eq!(
            field(&reply, "pod"),
            pod,
            "the connection stays on its backend"
        );
    }
}

#[test]
fn bad_files_and_invalid_objects_never_remove_what_works() {
    let (c, client) = web_cluster(SVC);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(5),
    );

    // The Service's file is replaced by something that does not parse: its
    // last good content stays in force.
    c.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n  broken",
    );
    wait_until("the bad file is counted", Duration::from_secs(2), || {
        c.stats()["agent_bad_files"].as_u64() == Some(1)
    });
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 3);

    // Objects that do not validate are skipped whole; the good one stays.
    c.write(
        "invalid.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.999, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: port-zero}
spec: {clusterIP: 10.96.0.51, selector: {app: web}, ports: [{port: 0}]}
---
apiVersion: v1
kind: Service
metadata: {name: port-too-big}
spec: {clusterIP: 10.96.0.52, selector: {app: web}, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-protocol}
spec: {clusterIP: 10.96.0.53, selector: {app: web}, ports: [{port: 80, protocol: ICMP}]}
---
apiVersion: v1
kind: Service
metadata: {name: duplicate, creationTimestamp: "2030-01-01T00:00:00Z"}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 81}]}
"#,
    );
    wait_until(
        "five invalid objects are counted",
        Duration::from_secs(2),
        || c.stats()["agent_invalid_objects"].as_u64() == Some(5),
    );
    let dump = c.dump("services");
    assert_eq!(dump["services"].as_array().unwrap().len(), 1, "{dump}");
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 3);
    assert_eq!(
        c.get(&client, "http://10.96.0.10:81/"),
        Err(7),
        "the duplicate's port is not programmed"
    );

    // Fixing the file takes effect.
    c.write("svc.yaml", &SVC.replace("port: 80,", "port: 8000,"));
    c.wait_backends(
        "10.96.0.10:8000/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(1),
    );
    assert!(c.get(&client, "http://10.96.0.10:8000/").is_ok());
    assert_eq!(
        c.get(&client, "http://10.96.0.10:80/"),
        Err(7),
        "the old port is released"
    );
}

#[test]
fn agent_restart_keeps_traffic_flowing_and_prunes_on_return() {
    let (mut c, client) = web_cluster(SVC);
    let all = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];
    c.wait_backends("10.96.0.10:80/TCP", &all, Duration::from_secs(5));
    let ids_before = c.dump("backends");
    let mut conn = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&conn.greeting, "pod").to_string();

    c.stop_agent(SIGKILL);
    // Down: the pinned maps and links keep serving old and new connections.
    assert!(conn.send("while down").contains(&format!("pod={pod}")));
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 3);

    // A pod other than the held connection's goes away meanwhile.
    let (gone_file, gone_ip) = ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
        .find(|(i, _)| format!("web-{i}") != pod)
        .map(|(i, ip)| (format!("pod-web-{i}.yaml"), ip.to_string()))
        .unwrap();
    c.remove(&gone_file);
    c.start_agent();
    let left: Vec<&str> = all
        .iter()
        .copied()
        .filter(|b| !b.starts_with(&format!("{gone_ip}:")))
        .collect();
    c.wait_backends("10.96.0.10:80/TCP", &left, Duration::from_secs(5));

    // The remaining backends kept their ids; the connection never broke.
    let ids_after = c.dump("backends");
    for b in ids_after["backends"].as_array().unwrap() {
        let before = ids_before["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == b["address"]);
        assert_eq!(
            before.map(|x| &x["id"]),
            Some(&b["id"]),
            "backend id changed across restart: {b}"
        );
    }
    assert!(conn.send("after restart").contains(&format!("pod={pod}")));
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 2);
}

#[test]
fn fast_path_redirects_translated_packets_and_can_be_turned_off() {
    let svc = format!("{SVC}  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n");
    let (mut c, client) = web_cluster(&svc);
    let all = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];
    c.wait_backends("10.96.0.10:80/TCP", &all, Duration::from_secs(5));
    let redirected = |c: &Cluster| c.stats()["redirected"].as_u64().unwrap_or(0);
    let before = redirected(&c);
    for _ in 0..5 {
        c.get(&client, "http://10.96.0.10/")
            .expect("through the fast path");
        let reply = c
            .topo
            .udp(
                &client,
                "10.96.0.10".parse::<std::net::Ipv4Addr>().unwrap(),
                53,
                2.0,
                0,
            )
            .expect("UDP through the fast path");
        assert!(reply.contains("pod=web-"), "{reply}");
    }
    // Requests and replies both skip the host stack once translated.
    assert!(
        redirected(&c) >= before + 20,
        "redirected {} -> {}",
        before,
        redirected(&c)
    );

    c.stop_agent(SIGTERM);
    c.start_agent_with(&[
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--fast-path".into(),
        "false".into(),
    ]);
    c.wait_backends("10.96.0.10:80/TCP", &all, Duration::from_secs(5));
    let off = redirected(&c);
    for _ in 0..5 {
        c.get(&client, "http://10.96.0.10/")
            .expect("through the host stack");
    }
    assert_eq!(redirected(&c), off, "--fast-path false: nothing redirected");
}
