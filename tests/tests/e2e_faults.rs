//! Faults with traffic flowing: a pod device deleted and re-created, the
//! agent SIGKILLed in the middle of a large sync, a full map.

use std::time::Duration;

use lb_tests::e2e::*;

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

#[test]
fn a_recreated_pod_device_gets_the_program_again() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    assert!(c.get(&client, "http://10.96.0.10/").is_ok());

    // The client pod's device goes away (pod deleted) and a new one with the
    // same address comes up, on a new device.
    let old_dev = client.host_dev.clone();
    c.topo.delete_device(&client).expect("delete device");
    let _ = c.topo.exec(&c.topo.node_ns, &["true"]);
    std::process::Command::new("ip")
        .args(["netns", "del", &client.ns])
        .status()
        .unwrap();
    let client = c.pod("client2", "10.244.1.2", &[], &[]);
    // Its first packet already goes through the program: the device got it
    // on the link event as the device was created, while the pod was still
    // being set up (0.9 s leaves no room for a SYN retransmission: an
    // untranslated first SYN fails the request).
    let first = c.topo.curl(&client, "http://10.96.0.10/", 0.9);
    assert!(first.is_ok(), "a new pod's first request: {first:?}");
    assert_eq!(
        field(&c.get(&client, "http://10.96.0.10/").unwrap(), "pod"),
        "web-0"
    );
    // Only live devices keep link pins (the socket-level links live in links/cgroup/).
    let device_pins = || {
        std::fs::read_dir(c.topo.bpffs.join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "cgroup")
            .collect::<Vec<String>>()
    };
    // Two live pod devices, each with its ingress (tc-) and egress (tce-) link.
    let pod_pins = || {
        let mut pins: Vec<String> = device_pins()
            .into_iter()
            .filter(|name| name.starts_with("tc-") || name.starts_with("tce-"))
            .collect();
        pins.sort();
        pins
    };
    wait_until(
        "the dead device's pins are removed",
        Duration::from_secs(2),
        || {
            let pins = pod_pins();
            pins.len() == 4 && !pins.iter().any(|p| p.ends_with(&old_dev))
        },
    );
}

/// Every frontend's slots 1..=count name existing backends (the kernel's view).
fn assert_map_invariants(c: &Cluster) -> usize {
    let dump = c.dump("services");
    let services = dump["services"].as_array().unwrap();
    for s in services {
        for b in s["backends"].as_array().unwrap() {
            if b["state"] == "missing" {
                let backends = c.dump("backends");
                let ids: Vec<_> = backends["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_u64().unwrap())
                    .collect();
                let missing: Vec<_> = s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| b["state"] == "missing")
                    .collect();
                panic!(
                    "slot naming no backend: {missing:?} in {}\n{} backends, max id {:?}, contains? {}",
                    s["frontend"],
                    ids.len(),
                    ids.iter().max(),
                    ids.contains(&b["id"].as_u64().unwrap())
                );
            }
        }
    }
    services.len()
}

#[test]
fn agent_killed_mid_sync_leaves_consistent_maps_and_converges() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    // 3,000 more Services x 10 endpoints in two files.
    let mut svcs = String::new();
    let mut slices = String::new();
    for i in 0..3000u32 {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 1)) + i);
        svcs += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}\n"
        );
        slices += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: s{i}-a, labels: {{kubernetes.io/service-name: s{i}}}}}\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for j in 0..10u32 {
            let e = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + i * 10 + j,
            );
            slices += &format!("- {{addresses: [\"{e}\"]}}\n");
        }
    }
    c.write("many-svc.yaml", &svcs);
    c.write("many-slices.yaml", &slices);
    // Kill the agent at growing delays into its first sync; after each kill
    // the pinned maps must be consistent, and traffic to web flows.
    let mut partial = 0;
    for delay_ms in (0..10u64).map(|i| 1700 + i * 60) {
        c.spawn_agent();
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.stop_agent(SIGKILL);
        let n = assert_map_invariants(&c);
        let b = c.dump("backends")["backends"].as_array().unwrap().len();
        println!("kill after {delay_ms} ms: {n} services, {b} backends in the maps");
        if (n > 0 && n < 3001) || (b > 0 && b < 30001) {
            partial += 1;
        }
        // Start the next attempt from empty maps, so it is a first sync again.
        for map in lb_common::map_names::ALL {
            let _ = std::fs::remove_file(c.topo.bpffs.join(map));
        }
    }
    println!("{partial} of 10 kills landed mid-sync");
    c.start_agent();
    // While the agent runs, a dump reads the maps at slightly different
    // moments; check the invariants on a stopped agent's maps only.
    wait_until(
        "the restarted agent converges",
        Duration::from_secs(30),
        || c.dump("services")["services"].as_array().unwrap().len() == 3001,
    );
    c.stop_agent(SIGTERM);
    assert_eq!(assert_map_invariants(&c), 3001);
    c.start_agent();
    assert_eq!(
        field(&c.get(&client, "http://10.96.0.10/").expect("web"), "pod"),
        "web-0"
    );
}

#[test]
fn pins_are_root_only_and_metrics_listen_on_localhost() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = Cluster::new();
    c.write("svc.yaml", SVC);
    c.start_agent();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.topo.bpffs), 0o700, "bpffs directory");
    assert_eq!(mode(&c.topo.bpffs.join("links")), 0o700, "links directory");
    for map in lb_common::map_names::ALL {
        assert_eq!(
            mode(&c.topo.bpffs.join(map)) & 0o077,
            0,
            "{map} is readable by root only"
        );
    }
    // The pins exist before the agent has bound its servers: wait for it.
    let listening = || {
        let out = c.topo.exec(&c.topo.node_ns, &["ss", "-Htln"]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the agent listens", Duration::from_secs(10), || {
        listening().contains(":10249")
    });
    let listening = listening();
    assert!(
        listening.contains("127.0.0.1:10249"),
        "metrics on localhost: {listening}"
    );
    assert!(
        !listening.contains("0.0.0.0:10249") && !listening.contains("*:10249"),
        "{listening}"
    );
}

#[test]
fn a_full_map_names_the_service_counts_it_and_keeps_the_others() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    let small = |name: &str, ip: &str, n: u32| {
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: {name}-a, labels: {{kubernetes.io/service-name: {name}}}}}\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for j in 0..n {
            text += &format!("- {{addresses: [\"10.{}.0.{}\"]}}\n", 130 + n / 100, j + 1);
        }
        text
    };
    c.write("other.yaml", &small("other", "10.96.0.20", 5));
    c.start_agent_with(&[
        "--manifests".into(),
        c.manifests.display().to_string(),
        "--lb-map-max".into(),
        "40".into(),
        "--health-timeout".into(),
        "2s".into(),
    ]);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    // A Service with more endpoints than the map holds.
    c.write("huge.yaml", &small("huge", "10.96.0.30", 45));
    wait_until("the full map is counted", Duration::from_secs(5), || {
        c.stats()["agent_map_full"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        c.backends_of("10.96.0.30:80/TCP").is_none(),
        "the Service that does not fit is not half-programmed"
    );
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.10/")
                .expect("web still works"),
            "pod"
        ),
        "web-0"
    );
    assert_eq!(
        c.backends_of("10.96.0.20:80/TCP").map(|b| b.len()),
        Some(5),
        "other still programmed"
    );
    let (_, metrics) = c.node_http(10249, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lb_sync_errors_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_map_capacity{map=\"LB_SERVICES\"} 40"),
        "{metrics}"
    );
    // One Service that does not fit is that Service's problem, not the
    // node's: past the health timeout /healthz still answers 200, and the
    // Service is listed, with its reason, in the metrics and the dump.
    assert!(
        metrics.contains("lb_services_not_programmed{reason=\"map_full\"} 1"),
        "{metrics}"
    );
    let listed = |c: &Cluster| {
        c.dump("services")["not_programmed"]
            .as_array()
            .expect("not_programmed list")
            .iter()
            .map(|n| {
                (
                    n["object"].as_str().unwrap_or("").to_string(),
                    n["cause"].as_str().unwrap_or("").to_string(),
                    n["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let not_programmed = listed(&c);
    assert_eq!(not_programmed.len(), 1, "{not_programmed:?}");
    assert_eq!(not_programmed[0].0, "default/huge:p");
    assert_eq!(not_programmed[0].1, "map_full");
    assert!(!not_programmed[0].2.is_empty());
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = c.node_http(10256, "/healthz");
    assert_eq!(
        status, 200,
        "a Service that does not fit fails /healthz: {body}"
    );
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
    // Gone, it is no longer reported.
    c.remove("huge.yaml");
    wait_until("the problem is cleared", Duration::from_secs(10), || {
        listed(&c).is_empty()
    });
    let (_, metrics) = c.node_http(10249, "/metrics");
    assert!(
        metrics.contains("lb_services_not_programmed{reason=\"map_full\"} 0"),
        "{metrics}"
    );
}

/// kube-proxy's nodeEligible (KEP-3836): a node the cluster autoscaler is
/// about to remove fails /healthz, and its healthCheckNodePorts say
/// serviceProxyHealthy false with 503, so load balancers drain it before
/// it goes; /livez stays 200 (no restart). Untainted, it is healthy again.
#[test]
fn a_node_marked_for_deletion_fails_healthz_and_health_checks_but_not_livez() {
    let mut c = Cluster::new();
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
    );
    let node = |tainted: bool| {
        let taints = if tainted {
            "\nspec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]"
        } else {
            ""
        };
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}{taints}\n")
    };
    c.write("node.yaml", &node(false));
    c.start_agent();
    let check = |c: &Cluster| c.node_http(32100, "/");
    wait_until(
        "the health check answers 200",
        Duration::from_secs(10),
        || check(&c).0 == 200,
    );
    assert_eq!(c.node_http(10256, "/healthz").0, 200);

    c.write("node.yaml", &node(true));
    wait_until("/healthz turns 503", Duration::from_secs(10), || {
        c.node_http(10256, "/healthz").0 == 503
    });
    let (_, body) = c.node_http(10256, "/healthz");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    let (status, body) = check(&c);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    let (status, body) = c.node_http(10256, "/livez");
    assert_eq!(status, 200, "the loop is alive: {body}");

    c.write("node.yaml", &node(false));
    wait_until("/healthz turns 200 again", Duration::from_secs(10), || {
        c.node_http(10256, "/healthz").0 == 200
    });
    assert_eq!(check(&c).0, 200);
}

/// The NodePort range is reserved from the node's ephemeral ports (in the
/// node's own network namespace), keeping what was reserved before: a host
/// socket bound to port 0 never draws a port a NodePort frontend would
/// capture the replies of.
#[test]
fn the_nodeport_range_is_reserved_from_the_nodes_ephemeral_ports() {
    let mut c = Cluster::new();
    let sysctl = |c: &Cluster, key: &str| {
        let out = c
            .topo
            .exec(&c.topo.node_ns, &["sysctl", "-n", key])
            .expect("sysctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    c.topo
        .node_sysctl("net.ipv4.ip_local_reserved_ports", "8080")
        .unwrap();
    // Ephemeral ports straddling the range's start.
    c.topo
        .node_sysctl("net.ipv4.ip_local_port_range", "29990 30020")
        .unwrap();
    c.write("svc.yaml", SVC);
    c.start_agent();
    assert_eq!(
        sysctl(&c, "net.ipv4.ip_local_reserved_ports"),
        "8080,30000-32767"
    );
    let script = "import socket\nports=[]\nsocks=[]\nfor _ in range(8):\n    s=socket.socket(); s.bind(('127.0.0.1',0)); socks.append(s); ports.append(s.getsockname()[1])\nprint(' '.join(map(str,ports)))\n";
    let out = c
        .topo
        .exec(&c.topo.node_ns, &["python3", "-c", script])
        .expect("python3");
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 8, "{out:?}");
    assert!(
        ports.iter().all(|p| (29990..30000).contains(p)),
        "ephemeral ports outside the NodePort range only: {ports:?}"
    );
    // A restart finds it reserved and leaves it as it is.
    c.stop_agent(15);
    c.start_agent();
    assert_eq!(
        sysctl(&c, "net.ipv4.ip_local_reserved_ports"),
        "8080,30000-32767"
    );
}
