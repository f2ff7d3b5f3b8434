//! The Kubernetes source end to end: the real kube-rs client in the agent
//! against the test API server (list/watch, resourceVersions, bookmarks,
//! dropped watches, 410 Gone), with traffic through the maps it programs.

use std::time::Duration;

use lb_tests::{
    apiserver::{ApiServer, Kind},
    e2e::*,
};
use serde_json::json;

fn service(name: &str, ip: &str, port: u16) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

fn slice(name: &str, service: &str, port: u16, ips: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
        .collect();
    json!({"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn node() -> serde_json::Value {
    json!({"metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
}

/// Pods web-0..2 serving 8080, an API server in the node namespace, and the agent on it.
fn kube_cluster() -> (Cluster, Pod, ApiServer) {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
    }
    let api = ApiServer::start_in_netns(&c.topo.node_ns);
    // An API server before ServiceCIDRs (404): the agent is ready without them.
    api.set_served(Kind::ServiceCidr, false);
    api.apply(Kind::Node, node());
    // Another node: must not be watched.
    api.apply(Kind::Node, json!({"metadata": {"name": "node-b"}}));
    api.apply(Kind::Service, service("web", "10.96.0.10", 80));
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.11", "10.244.1.12"]),
    );
    let kubeconfig = api.write_kubeconfig(&c.topo.dir);
    c.start_agent_with(&["--kubeconfig".into(), kubeconfig.display().to_string()]);
    (c, client, api)
}

#[test]
fn objects_created_changed_and_deleted_in_the_api_reach_the_maps() {
    let (c, client, api) = kube_cluster();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 2);

    // A lone change is applied at once, not after the min sync period.
    let started = std::time::Instant::now();
    api.apply(
        Kind::EndpointSlice,
        slice(
            "web-abc",
            "web",
            8080,
            &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
        ),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(2),
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "lone change took {:?}",
        started.elapsed()
    );

    // A second Service, then the first one deleted.
    api.apply(Kind::Service, service("other", "10.96.0.20", 81));
    api.apply(
        Kind::EndpointSlice,
        slice("other-x", "other", 8080, &["10.244.1.13"]),
    );
    c.wait_backends(
        "10.96.0.20:81/TCP",
        &["10.244.1.13:8080"],
        Duration::from_secs(3),
    );
    // Handed to another proxy: kube-proxy's label selector, which the API
    // server applies to lb's watch, turns the change into a deletion; and
    // back again.
    assert_eq!(
        api.label_selector(Kind::EndpointSlice).as_deref(),
        Some("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"),
        "EndpointSlices are filtered by the API server"
    );
    // Services of another proxy come too: their ClusterIPs are allocated.
    assert_eq!(
        api.label_selector(Kind::Service).as_deref(),
        Some("!service.kubernetes.io/headless"),
    );
    let mut handed = service("other", "10.96.0.20", 81);
    handed["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "another-proxy"});
    api.apply(Kind::Service, handed);
    wait_until("other leaves lb's maps", Duration::from_secs(3), || {
        c.backends_of("10.96.0.20:81/TCP").is_none()
    });
    api.apply(Kind::Service, service("other", "10.96.0.20", 81));
    c.wait_backends(
        "10.96.0.20:81/TCP",
        &["10.244.1.13:8080"],
        Duration::from_secs(3),
    );
    api.delete(Kind::Service, "default", "web");
    wait_until("web is removed", Duration::from_secs(3), || {
        c.backends_of("10.96.0.10:80/TCP").is_none()
    });
    assert_eq!(
        c.get(&client, "http://10.96.0.10/"),
        Err(7),
        "deleted Service: its IP is no longer served"
    );
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.20:81/").expect("other"),
            "pod"
        ),
        "web-2"
    );
}

#[test]
fn dropped_watches_and_410_gone_lose_nothing() {
    let (c, client, api) = kube_cluster();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    let lists_before = api.lists(Kind::EndpointSlice);

    // The connection drops; a change made meanwhile arrives on the re-watch.
    api.drop_watches();
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.13"]),
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.13:8080"],
        Duration::from_secs(10),
    );

    // History compacted while the agent cannot reach the server: its resume
    // gets 410 Gone and it re-lists; an object deleted meanwhile must go.
    api.apply(Kind::Service, service("temp", "10.96.0.30", 80));
    c.wait_backends("10.96.0.30:80/TCP", &[], Duration::from_secs(5));
    api.set_down(true);
    std::thread::sleep(Duration::from_millis(300));
    api.delete(Kind::Service, "default", "temp");
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.11", "10.244.1.13"]),
    );
    api.compact();
    api.set_down(false);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.13:8080"],
        Duration::from_secs(15),
    );
    wait_until(
        "temp is pruned after the re-list",
        Duration::from_secs(15),
        || c.backends_of("10.96.0.30:80/TCP").is_none(),
    );
    assert!(
        api.lists(Kind::EndpointSlice) > lists_before,
        "a 410 forces a re-list ({} lists, {lists_before} before)",
        api.lists(Kind::EndpointSlice)
    );
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 30).len(), 2);
}

#[test]
fn api_server_away_keeps_the_datapath_then_converges() {
    let (c, client, api) = kube_cluster();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    api.set_down(true);
    // 30 s unreachable: nothing is removed, traffic flows throughout, and
    // the change made meanwhile is not seen yet.
    let away = std::time::Instant::now();
    let mut changed = false;
    while away.elapsed() < Duration::from_secs(30) {
        // 24 requests: all must succeed, and both pods answer (with 10, a
        // random split leaves one pod out once in 512 rounds).
        assert_eq!(
            c.answering_pods(&client, "http://10.96.0.10/", 24).len(),
            2,
            "at {:?}",
            away.elapsed()
        );
        if !changed && away.elapsed() > Duration::from_secs(10) {
            api.apply(
                Kind::EndpointSlice,
                slice("web-abc", "web", 8080, &["10.244.1.12", "10.244.1.13"]),
            );
            changed = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(1),
    );
    // Changes made while it was away arrive when it is back.
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.12", "10.244.1.13"]),
    );
    api.set_down(false);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(30),
    );
}

/// The capabilities deploy/daemonset.yaml grants.

#[test]
fn daemonset_capabilities_suffice_and_health_and_metrics_answer() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    let api = ApiServer::start_in_netns(&c.topo.node_ns);
    api.apply(Kind::Node, node());
    api.apply(Kind::Service, service("web", "10.96.0.10", 80));
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.11"]),
    );
    let kubeconfig = api.write_kubeconfig(&c.topo.dir);
    let caps = daemonset_caps();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    c.start_agent_with_caps(
        &["--kubeconfig".into(), kubeconfig.display().to_string()],
        &caps,
    );
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(10),
    );
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.10/").expect("request"),
            "pod"
        ),
        "web-0"
    );

    let (code, body) = c.node_http(10256, "/healthz");
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    assert!(
        health["lastUpdated"].as_str().unwrap().ends_with('Z'),
        "{health}"
    );
    assert!(health["currentTime"].is_string());
    assert_eq!(c.node_http(10256, "/livez").0, 200);

    // A failing API server counts watch restarts (once the client's own
    // retries of 503 give up).
    api.set_down(true);
    wait_until(
        "a watch restart is counted",
        Duration::from_secs(30),
        || {
            c.node_http(10249, "/metrics")
                .1
                .lines()
                .any(|l| l.starts_with("lb_watch_restarts{") && !l.ends_with(" 0"))
        },
    );
    api.set_down(false);
    let (code, metrics) = c.node_http(10249, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "lb_services_programmed 1",
        "lb_endpoints_programmed 1",
        "lb_map_capacity{map=\"LB_SERVICES\"} 262144",
        "lb_map_entries{map=\"LB_BACKENDS\"} 1",
        "lb_sync_duration_seconds_count",
        "lb_network_programming_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(want), "metrics lack {want:?}:\n{metrics}");
    }
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("lb_datapath_packets{{counter=\"{name}\"}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no datapath counter {name}:\n{metrics}"))
    };
    assert!(counter("new_flow") >= 1);
    assert!(counter("reply") >= 1);

    // kube-proxy's own metrics, its names and buckets.
    for want in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"}",
    ] {
        assert!(metrics.contains(want), "metrics lack {want:?}:\n{metrics}");
    }
    // A slice change the endpointslice controller stamped 3 s ago: measured
    // from that trigger time to its programming, once.
    let trigger = std::process::Command::new("date")
        .args(["-u", "-d", "-3 seconds", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    let trigger = String::from_utf8_lossy(&trigger.stdout).trim().to_string();
    let mut changed = slice("web-abc", "web", 8080, &["10.244.1.11", "10.244.1.12"]);
    changed["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": trigger});
    api.apply(Kind::EndpointSlice, changed);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(10),
    );
    let sample = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}:\n{metrics}"))
    };
    wait_until(
        "the slice's programming latency is recorded",
        Duration::from_secs(5),
        || {
            sample(
                &c.node_http(10249, "/metrics").1,
                "kubeproxy_network_programming_duration_seconds_count",
            ) == 1.0
        },
    );
    let metrics = c.node_http(10249, "/metrics").1;
    let latency = sample(
        &metrics,
        "kubeproxy_network_programming_duration_seconds_sum",
    );
    assert!((3.0..10.0).contains(&latency), "{latency} s:\n{metrics}");
}

/// `--service-proxy-name lb` as a canary beside kube-proxy: the API server
/// filters lb's watches to the Services (and slices) labelled for it; a
/// Service the agent served before the restart that is not labelled so is
/// removed from the maps by the restart's first sync.
#[test]
fn a_canary_serves_only_its_labelled_services_and_drops_the_rest_on_restart() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    let api = ApiServer::start_in_netns(&c.topo.node_ns);
    api.apply(Kind::Node, node());
    let label = json!({"service.kubernetes.io/service-proxy-name": "lb"});
    api.apply(Kind::Service, service("web", "10.96.0.10", 80));
    api.apply(
        Kind::EndpointSlice,
        slice("web-abc", "web", 8080, &["10.244.1.11"]),
    );
    // The endpointslice controller copies the Service's labels to its slices.
    let mut canary = service("canary", "10.96.0.30", 80);
    canary["metadata"]["labels"] = label.clone();
    api.apply(Kind::Service, canary);
    let mut canary_slice = slice("canary-abc", "canary", 8080, &["10.244.1.11"]);
    canary_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("lb");
    api.apply(Kind::EndpointSlice, canary_slice);
    // The cluster's Service CIDR: an address in it that no Service holds is
    // dropped; another proxy's ClusterIP is allocated all the same.
    api.apply(
        Kind::ServiceCidr,
        json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}}),
    );
    let kubeconfig = api.write_kubeconfig(&c.topo.dir);
    let source = ["--kubeconfig".to_string(), kubeconfig.display().to_string()];

    // As kube-proxy: the unlabelled Service only.
    c.start_agent_with(&source);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(10),
    );
    assert!(c.backends_of("10.96.0.30:80/TCP").is_none());
    wait_until(
        "an unallocated ClusterIP is dropped",
        Duration::from_secs(10),
        || c.get(&client, "http://10.96.0.99/") == Err(28),
    );
    assert_eq!(
        c.get(&client, "http://10.96.0.30/"),
        Err(7),
        "the canary's ClusterIP is allocated: left to its proxy, not dropped"
    );
    let dropped = c.stats()["drop_unallocated_service_ip"].as_u64().unwrap();
    assert!(dropped >= 1);

    // Restarted as the canary: only the labelled one; web is removed.
    c.stop_agent(9);
    let mut canary_args = source.to_vec();
    canary_args.extend(["--service-proxy-name".to_string(), "lb".to_string()]);
    c.start_agent_with(&canary_args);
    c.wait_backends(
        "10.96.0.30:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(10),
    );
    wait_until(
        "web leaves the canary's maps",
        Duration::from_secs(5),
        || c.backends_of("10.96.0.10:80/TCP").is_none(),
    );
    assert_eq!(
        api.label_selector(Kind::EndpointSlice).as_deref(),
        Some("service.kubernetes.io/service-proxy-name=lb,!service.kubernetes.io/headless"),
        "EndpointSlices are filtered by the API server"
    );
    assert_eq!(
        api.label_selector(Kind::Service).as_deref(),
        Some("!service.kubernetes.io/headless"),
    );
    assert_eq!(
        field(
            &c.get(&client, "http://10.96.0.30/").expect("canary"),
            "pod"
        ),
        "web-0"
    );
    assert_eq!(
        c.get(&client, "http://10.96.0.10/"),
        Err(7),
        "web is left to kube-proxy, not dropped as unallocated"
    );
    assert_eq!(
        c.get(&client, "http://10.96.0.99/"),
        Err(28),
        "unallocated: dropped"
    );
    // The ServiceCIDR goes: nothing is dropped any more.
    api.delete(Kind::ServiceCidr, "", "kubernetes");
    wait_until(
        "the unallocated address is no longer dropped",
        Duration::from_secs(10),
        || c.get(&client, "http://10.96.0.99/") == Err(7),
    );
}

/// Several `--api-server` URLs (Cilium's k8s-api-server-urls): the first
/// is not ready when the agent starts, so it uses the second; when that one
/// goes away, the agent moves on (back to the first, now ready), and a
/// change made there reaches the maps.
#[test]
fn api_server_urls_are_tried_in_order_and_failed_over() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.pod("web-1", "10.244.1.12", &[8080], &[]);
    let first = ApiServer::start_in_netns(&c.topo.node_ns);
    let second = ApiServer::start_in_netns(&c.topo.node_ns);
    // Two servers of one cluster: the same objects.
    for api in [&first, &second] {
        api.apply(Kind::Node, node());
        api.apply(Kind::Service, service("web", "10.96.0.10", 80));
        api.apply(
            Kind::EndpointSlice,
            slice("web-abc", "web", 8080, &["10.244.1.11"]),
        );
    }
    first.set_down(true);
    let kubeconfig = second.write_kubeconfig(&c.topo.dir);
    c.start_agent_with(&[
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--api-server".into(),
        format!("http://{},http://{}", first.addr, second.addr),
    ]);
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(10),
    );
    assert_eq!(
        first.lists(Kind::Service),
        0,
        "the unready server is skipped"
    );
    assert!(second.lists(Kind::Service) >= 1);

    second.set_down(true);
    first.set_down(false);
    // Only the first, ready again, can tell the agent about this change.
    for api in [&first, &second] {
        api.apply(
            Kind::EndpointSlice,
            slice("web-abc", "web", 8080, &["10.244.1.11", "10.244.1.12"]),
        );
    }
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080"],
        Duration::from_secs(20),
    );
    assert_eq!(c.answering_pods(&client, "http://10.96.0.10/", 20).len(), 2);
}
