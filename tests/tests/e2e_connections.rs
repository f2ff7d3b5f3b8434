//! Connection semantics end to end: session affinity, graceful termination,
//! UDP clients that keep their source port, agent restarts under load.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lb_tests::e2e::*;

const WEB_IPS: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
const ALL: [&str; 3] = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];

fn svc(extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n{extra}"
    )
}

const AFFINITY: &str =
    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n";
/// Affinity that outlives `lb-agent explain`'s own run (it loads and
/// verifies the program, seconds on a loaded machine, before it runs it).
const AFFINITY_LONG: &str =
    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";

fn cluster(extra: &str) -> (Cluster, Pod) {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in WEB_IPS.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[5353]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", &svc(extra));
    c.start_agent();
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(5));
    (c, client)
}

fn pod_spec(i: usize, ready: bool, terminating: bool) -> String {
    let name = format!("web-{i}");
    PodSpec {
        name: &name,
        ip: WEB_IPS[i],
        labels: &[("app", "web")],
        ready,
        ports: &[],
        terminating,
    }
    .yaml()
}

#[test]
fn session_affinity_sticks_expires_follows_readiness_and_toggles() {
    let (c, client) = cluster(AFFINITY);
    let url = "http://10.96.0.10/";
    let pods = c.answering_pods(&client, url, 15);
    assert_eq!(
        pods.len(),
        1,
        "15 sequential connections, one pod: {pods:?}"
    );
    let first = pods.into_iter().next().unwrap();

    // After the timeout (1 s idle) the next connection is balanced again:
    // over 8 idle gaps, a fresh choice lands elsewhere at least once
    // (all eight repeating it has probability (1/3)^8).
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        let chosen = c.answering_pods(&client, url, 3);
        assert_eq!(
            chosen.len(),
            1,
            "sticky again after the new choice: {chosen:?}"
        );
        seen.extend(chosen);
    }
    assert!(seen.len() > 1, "affinity must expire: always {seen:?}");

    // The affinity backend stops being ready: new connections move, and stick.
    let current = c
        .answering_pods(&client, url, 1)
        .into_iter()
        .next()
        .unwrap();
    let idx: usize = current.trim_start_matches("web-").parse().unwrap();
    c.write(&format!("pod-web-{idx}.yaml"), &pod_spec(idx, false, false));
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &ALL.iter()
            .copied()
            .filter(|b| !b.starts_with(WEB_IPS[idx]))
            .collect::<Vec<_>>(),
        Duration::from_secs(2),
    );
    let moved = c.answering_pods(&client, url, 10);
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(
        !moved.contains(&current),
        "affinity follows readiness: still {current}"
    );
    c.write(&format!("pod-web-{idx}.yaml"), &pod_spec(idx, true, false));
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(2));

    // Off: balanced at once. On again: sticky at once.
    c.write("svc.yaml", &svc(""));
    wait_until("affinity off is programmed", Duration::from_secs(2), || {
        c.dump("services")["services"][0]["flags"]
            .as_array()
            .is_some_and(|f| f.is_empty())
    });
    assert!(
        c.answering_pods(&client, url, 30).len() > 1,
        "no affinity: balanced"
    );
    c.write("svc.yaml", &svc(AFFINITY));
    wait_until("affinity on is programmed", Duration::from_secs(2), || {
        c.dump("services")["services"][0]["flags"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    });
    assert_eq!(
        c.answering_pods(&client, url, 15).len(),
        1,
        "affinity back on: sticky"
    );
    let _ = first;
}

/// The affinity backend leaves the Service (relabelled) while another
/// Service still selects it, so it stays an active backend: new connections
/// of the sticky client move off it at once, as kube-proxy's (its endpoint
/// chain goes with its `recent` check). The datapath follows an affinity
/// entry only while its backend is in the frontend's set. Agent defaults.
#[test]
fn affinity_leaves_a_backend_that_left_the_service_but_stays_active() {
    let (c, client) = cluster(AFFINITY_LONG);
    // `pool` selects every web pod, also the one that leaves `web`.
    let labelled = |i: usize, labels: &[(&str, &str)]| {
        PodSpec {
            name: &format!("web-{i}"),
            ip: WEB_IPS[i],
            labels,
            ready: true,
            ports: &[],
            terminating: false,
        }
        .yaml()
    };
    for i in 0..WEB_IPS.len() {
        c.write(
            &format!("pod-web-{i}.yaml"),
            &labelled(i, &[("app", "web"), ("pool", "web")]),
        );
    }
    c.write(
        "svc-pool.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: pool}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {pool: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
    );
    c.wait_backends("10.96.0.20:80/TCP", &ALL, Duration::from_secs(5));
    let url = "http://10.96.0.10/";
    let sticky = c.answering_pods(&client, url, 10);
    assert_eq!(sticky.len(), 1, "sticky: {sticky:?}");
    let current = sticky.into_iter().next().unwrap();
    let idx: usize = current.trim_start_matches("web-").parse().unwrap();

    c.write(
        &format!("pod-web-{idx}.yaml"),
        &labelled(idx, &[("pool", "web")]),
    );
    let rest: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|b| !b.starts_with(WEB_IPS[idx]))
        .collect();
    c.wait_backends("10.96.0.10:80/TCP", &rest, Duration::from_secs(2));
    let state: Vec<String> = c.dump("backends")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["address"] == WEB_IPS[idx])
        .map(|b| b["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(state, ["active"], "still active through the other Service");
    let moved = c.answering_pods(&client, url, 10);
    assert_eq!(moved.len(), 1, "sticky on its new backend: {moved:?}");
    assert!(
        !moved.contains(&current),
        "affinity left {current}, which is no longer web's"
    );
    // The other Service has no affinity: over 30 connections it reaches
    // the pod that left web too (missing it has probability (2/3)^30).
    let pool = c.answering_pods(&client, "http://10.96.0.20/", 30);
    assert!(
        pool.contains(&current),
        "pool still balances to {current}: {pool:?}"
    );
}

#[test]
fn terminating_endpoint_keeps_its_connections_and_gets_no_new_ones() {
    let (c, client) = cluster("");
    let mut conn = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&conn.greeting, "pod").to_string();
    let idx: usize = pod.trim_start_matches("web-").parse().unwrap();

    // Terminating (deletionTimestamp), still serving.
    c.write(&format!("pod-web-{idx}.yaml"), &pod_spec(idx, true, true));
    let others: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|b| !b.starts_with(WEB_IPS[idx]))
        .collect();
    c.wait_backends("10.96.0.10:80/TCP", &others, Duration::from_secs(2));
    let states: Vec<String> = c.dump("backends")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["address"] == WEB_IPS[idx])
        .map(|b| b["state"].as_str().unwrap().to_string())
        .collect();
    assert!(
        states.iter().all(|s| s == "standby"),
        "kept as standby: {states:?}"
    );
    for i in 0..5 {
        assert!(
            conn.send(&format!("still there {i}"))
                .contains(&format!("pod={pod}")),
            "stream survives"
        );
    }
    let fresh = c.answering_pods(&client, "http://10.96.0.10/", 20);
    assert!(
        !fresh.contains(&pod),
        "no new connection to the terminating pod: {fresh:?}"
    );

    // Nothing ready at all: the serving-terminating endpoints take traffic.
    for i in 0..3 {
        c.write(&format!("pod-web-{i}.yaml"), &pod_spec(i, true, true));
    }
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(2));
    assert!(
        c.dump("services")["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "terminating")
    );
    assert_eq!(
        c.answering_pods(&client, "http://10.96.0.10/", 30).len(),
        3,
        "fallback to serving-terminating"
    );
    assert!(conn.send("end").contains(&format!("pod={pod}")));
}

#[test]
fn udp_client_with_a_fixed_port_moves_within_a_second_of_removal() {
    let (c, client) = cluster("");
    let ip: std::net::Ipv4Addr = "10.96.0.10".parse().unwrap();
    let first = c.topo.udp(&client, ip, 53, 2.0, 45000).expect("udp reply");
    let pod = field(&first, "pod").to_string();
    let idx: usize = pod.trim_start_matches("web-").parse().unwrap();
    // Same source port again: the same backend (conntrack).
    assert_eq!(
        field(&c.topo.udp(&client, ip, 53, 2.0, 45000).unwrap(), "pod"),
        pod
    );

    c.remove(&format!("pod-web-{idx}.yaml"));
    let removed_at = std::time::Instant::now();
    let mut moved = None;
    while removed_at.elapsed() < Duration::from_secs(1) {
        if let Ok(reply) = c.topo.udp(&client, ip, 53, 0.3, 45000)
            && field(&reply, "pod") != pod
        {
            moved = Some(removed_at.elapsed());
            break;
        }
    }
    let moved = moved.unwrap_or_else(|| panic!("the client's port stayed stuck on removed {pod}"));
    println!("UDP client moved {moved:?} after the removal");
    // Its conntrack entries were removed with the backend.
    let flows = c.dump("conntrack");
    assert!(
        !flows["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["translated_to"]
                .as_str()
                .unwrap()
                .starts_with(WEB_IPS[idx])),
        "no flow to the removed backend is left"
    );
}

#[test]
fn agent_restart_under_load_fails_no_connection() {
    let (mut c, client) = cluster("");
    let mut conn = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&conn.greeting, "pod").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = client.clone();
        let topo_ns = client.ns.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &topo_ns,
                        "curl",
                        "-sS",
                        "--max-time",
                        "2",
                        "http://10.96.0.10/",
                    ])
                    .output()
                    .expect("curl");
                if out.status.success() { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.stop_agent(SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    c.start_agent();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    loader.join().unwrap();
    assert!(
        conn.send("after").contains(&format!("pod={pod}")),
        "the long stream survived"
    );
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("{ok} connections during the restart, {failed} failed");
    assert!(ok > 10, "the loop ran: {ok}");
    assert_eq!(
        failed, 0,
        "no new connection failed while the agent was down or coming back"
    );
}

fn explain(c: &Cluster, args: &[&str]) -> String {
    c.explain(args)
}

#[test]
fn explain_shows_frontend_candidates_deciding_state_and_verdict() {
    let (c, client) = cluster(AFFINITY_LONG);
    let conn = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&conn.greeting, "pod").to_string();
    let client_addr = field(&conn.greeting, "client").to_string();
    let flows_before = c.dump("conntrack")["flows"].as_array().unwrap().len();

    // The held connection's own tuple: its tracked flow decides.
    let text = explain(&c, &["--from", &client_addr, "--to", "10.96.0.10:80"]);
    assert!(
        text.contains("frontend   10.96.0.10:80/TCP ClusterIP"),
        "{text}"
    );
    assert!(text.contains("affinity"), "{text}");
    assert!(text.contains("service    default/web:http"), "{text}");
    // Without --service-counters there are none to show.
    assert!(!text.contains("counters"), "{text}");
    for ip in WEB_IPS {
        assert!(text.contains(&format!("{ip}:8080 active")), "{text}");
    }
    assert!(
        text.contains("a tracked flow from this port decides"),
        "{text}"
    );
    let idx: usize = pod.trim_start_matches("web-").parse().unwrap();
    assert!(
        text.contains(&format!("translated to {}:8080", WEB_IPS[idx]))
            && text.contains("(established"),
        "{text}"
    );

    // A new port from the same client: affinity decides.
    let text = explain(&c, &["--from", "10.244.1.2:50000", "--to", "10.96.0.10:80"]);
    assert!(text.contains("client entry for backend"), "{text}");
    assert!(
        text.contains(&format!("translated to {}:8080", WEB_IPS[idx])),
        "{text}"
    );
    assert!(text.contains("affinity_hit"), "{text}");

    // Undeclared port, UDP port, and a non-frontend.
    let text = explain(&c, &["--from", "10.244.1.2", "--to", "10.96.0.10:81"]);
    assert!(
        text.contains("refused") && text.contains("reject_undeclared"),
        "{text}"
    );
    let text = explain(
        &c,
        &[
            "--from",
            "10.244.1.2",
            "--to",
            "10.96.0.10:53",
            "--proto",
            "udp",
        ],
    );
    assert!(text.contains("translated to 10.244.1.1"), "{text}");
    let text = explain(&c, &["--from", "10.244.1.2", "--to", "192.0.2.1:80"]);
    assert!(
        text.contains("passed untouched (pass_not_frontend)"),
        "{text}"
    );

    // SCTP (this kernel has none, but the programs translate it): a
    // synthetic INIT through the pod program.
    c.write(
        "sctp.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: diameter}\nspec:\n  clusterIP: 10.96.0.38\n  selector: {app: web}\n  ports: [{name: diameter, port: 38, targetPort: 3868, protocol: SCTP}]\n",
    );
    let sctp_backends: Vec<String> = WEB_IPS.iter().map(|ip| format!("{ip}:3868")).collect();
    c.wait_backends(
        "10.96.0.38:38/SCTP",
        &sctp_backends.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(5),
    );
    let text = explain(
        &c,
        &[
            "--from",
            "10.244.1.2",
            "--to",
            "10.96.0.38:38",
            "--proto",
            "sctp",
        ],
    );
    assert!(
        text.contains("frontend   10.96.0.38:38/SCTP ClusterIP"),
        "{text}"
    );
    assert!(
        WEB_IPS
            .iter()
            .any(|ip| text.contains(&format!("translated to {ip}:3868"))),
        "{text}"
    );

    // The node's own sockets: connect() through the socket-level program,
    // from a namespace of explain's own (nothing is sent).
    let sock_translated = || c.stats()["sock_translated"].as_u64().unwrap();
    let translated_before = sock_translated();
    let text = explain(&c, &["--from", "node", "--to", "10.96.0.10:80"]);
    assert!(
        text.contains("flow       node -> 10.96.0.10:80/TCP"),
        "{text}"
    );
    assert!(
        text.contains("frontend   10.96.0.10:80/TCP ClusterIP"),
        "{text}"
    );
    assert!(
        WEB_IPS
            .iter()
            .any(|ip| text.contains(&format!("translated at connect() to {ip}:8080 (backend #"))),
        "{text}"
    );
    assert!(text.contains("sock_translated"), "{text}");
    let text = explain(
        &c,
        &["--from", "node", "--to", "10.96.0.10:53", "--proto", "udp"],
    );
    assert!(
        WEB_IPS
            .iter()
            .any(|ip| text.contains(&format!("translated at connect() to {ip}:5353"))),
        "{text}"
    );
    let text = explain(&c, &["--from", "node", "--to", "10.96.0.10:81"]);
    assert!(
        text.contains("refused: connect() fails with ECONNREFUSED"),
        "{text}"
    );
    let text = explain(&c, &["--from", "node", "--to", "192.0.2.1:80"]);
    assert!(
        text.contains("not translated: connect() goes to the address itself"),
        "{text}"
    );
    // --via is for packets, not the node's sockets.
    let out = std::process::Command::new(agent_bin())
        .args([
            "explain",
            "--from",
            "node",
            "--via",
            "xdp",
            "--to",
            "10.96.0.10:80",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--from node is the node's own sockets"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing live was touched.
    assert_eq!(
        c.dump("conntrack")["flows"].as_array().unwrap().len(),
        flows_before
    );
    assert_eq!(
        sock_translated(),
        translated_before,
        "the live socket-level program did not see explain's connect()"
    );
}

#[test]
fn maglev_service_moves_about_one_nth_of_flows_when_a_backend_goes() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    let ips: Vec<String> = (0..6).map(|i| format!("10.244.1.{}", 21 + i)).collect();
    for (i, ip) in ips.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations: {lb/algorithm: maglev}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    );
    c.start_agent();
    let all: Vec<String> = ips.iter().map(|ip| format!("{ip}:8080")).collect();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(5),
    );
    let svc = &c.dump("services")["services"][0];
    assert!(
        svc["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "maglev"),
        "{svc}"
    );
    assert_eq!(
        c.answering_pods(&client, "http://10.96.0.10/", 40).len(),
        6,
        "flows spread over all six"
    );

    // Where 100 client ports land, through the real program (explain's,
    // loaded once: each load costs the program's verification).
    let placement = |c: &Cluster| -> Vec<String> {
        let mut explainer = lb_agent::datapath::explain::Explainer::load(
            &c.topo.bpffs,
            lb_agent::datapath::explain::Entry::Pod,
        )
        .unwrap_or_else(|e| panic!("loading explain's program: {e}"));
        (0..100)
            .map(|i| {
                let from = format!("10.244.1.2:{}", 30000 + i).parse().unwrap();
                let to = "10.96.0.10:80".parse().unwrap();
                let outcome = explainer
                    .run(from, to, lb_agent::model::Protocol::Tcp, None)
                    .unwrap_or_else(|e| panic!("explain {from} -> {to}: {e}"));
                assert!(
                    outcome.reasons.contains(&"new_flow"),
                    "{from} -> {to} not balanced: {outcome:?}"
                );
                outcome.destination.to_string()
            })
            .collect()
    };
    let before = placement(&c);
    c.remove("pod-web-3.yaml");
    let left: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|b| !b.starts_with(&ips[3]))
        .collect();
    c.wait_backends("10.96.0.10:80/TCP", &left, Duration::from_secs(2));
    let after = placement(&c);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let on_removed = before.iter().filter(|b| b.starts_with(&ips[3])).count();
    println!(
        "maglev: {moved} of 100 flows moved after removing 1 of 6 backends ({on_removed} were on it; ideal 1/6 = 17)"
    );
    assert!(
        moved >= on_removed,
        "every flow of the removed backend moves"
    );
    assert!(
        moved <= on_removed + 100 / 10,
        "others barely move: {moved} moved, {on_removed} had to"
    );
}

/// `lb-agent monitor` streams what the datapath does, named: a refusal
/// (a Service without endpoints) and, asked for, a new flow with its
/// backend; it stops after `-c` events and leaves the datapath silent.
#[test]
fn monitor_streams_refusals_and_new_flows_named_by_their_service() {
    let (c, client) = cluster("");
    c.write(
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: none}\n  ports:\n  - {name: http, port: 80}\n",
    );
    c.wait_backends("10.96.0.20:80/TCP", &[], Duration::from_secs(5));
    let monitor = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.topo.node_ns))
        .arg(agent_bin())
        .args(["monitor", "-o", "json", "--type", "reject,new", "-c", "2"])
        .arg("--bpffs")
        .arg(&c.topo.bpffs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lb-agent monitor");
    let asked = || monitor_kinds(&c) != 0;
    wait_until(
        "the monitor asks for events",
        Duration::from_secs(10),
        asked,
    );

    assert_eq!(c.get(&client, "http://10.96.0.20/"), Err(7), "refused");
    let body = c.get(&client, "http://10.96.0.10/").expect("web answers");
    let pod = field(&body, "pod").to_string();

    let out = wait_output(monitor, Duration::from_secs(10));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    let refused = &events[0];
    assert_eq!(refused["type"], "reject", "{refused}");
    assert_eq!(refused["reason"], "no_endpoints", "{refused}");
    assert_eq!(refused["service"], "default/empty", "{refused}");
    assert_eq!(refused["port_name"], "http", "{refused}");
    assert_eq!(refused["frontend"], "10.96.0.20:80", "{refused}");
    assert_eq!(refused["dst"], "10.96.0.20:80", "{refused}");
    assert!(
        refused["src"].as_str().unwrap().starts_with("10.244.1.2:"),
        "{refused}"
    );
    assert_eq!(refused["scope"], "internal", "{refused}");
    assert_eq!(refused["device"], client.host_dev.as_str(), "{refused}");
    assert!(refused["backend"].is_null(), "{refused}");
    let new = &events[1];
    assert_eq!(new["type"], "new", "{new}");
    assert_eq!(new["service"], "default/web", "{new}");
    assert_eq!(new["frontend"], "10.96.0.10:80", "{new}");
    let backend = new["backend"].as_str().unwrap().to_string();
    let answered = WEB_IPS
        .iter()
        .position(|ip| backend == format!("{ip}:8080"))
        .map(|i| format!("web-{i}"));
    assert_eq!(answered.as_deref(), Some(pod.as_str()), "{new}");
    assert_eq!(
        monitor_kinds(&c),
        0,
        "the monitor stopped asking for events"
    );

    // The table, filtered to one Service: the web flow is not shown.
    let monitor = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.topo.node_ns))
        .arg(agent_bin())
        .args([
            "monitor",
            "--service",
            "default/empty",
            "-c",
            "1",
            "--bpffs",
        ])
        .arg(&c.topo.bpffs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lb-agent monitor");
    wait_until(
        "the monitor asks for events",
        Duration::from_secs(10),
        || monitor_kinds(&c) != 0,
    );
    c.get(&client, "http://10.96.0.10/").expect("web answers");
    assert_eq!(c.get(&client, "http://10.96.0.20/"), Err(7), "refused");
    let out = wait_output(monitor, Duration::from_secs(10));
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("TYPE"), "{table}");
    assert!(
        lines[1].starts_with("reject no_endpoints") && lines[1].contains("default/empty"),
        "{table}"
    );
}

/// What `LB_MONITOR` asks the programs for (0: nobody listens).
fn monitor_kinds(c: &Cluster) -> u32 {
    let data = aya::maps::MapData::from_pin(c.topo.bpffs.join(lb_common::map_names::MONITOR))
        .expect("LB_MONITOR pinned");
    let monitor: aya::maps::Array<_, lb_common::MonitorConfig> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array");
    monitor.get(&0, 0).expect("index 0").kinds
}

/// A child's output once it exits, killed (and the test failed) after `within`.
fn wait_output(mut child: std::process::Child, within: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!(
        "still running after {within:?}: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--service-counters`: each frontend counts what its clients sent, new
/// connections and refusals, shown by `dump stats --by-service` and in
/// `/metrics`; without the flag the dump says the counters are off.
#[test]
fn service_counters_count_each_frontend_in_dump_and_metrics() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in WEB_IPS.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[5353]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", &svc(""));
    c.write(
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: none}\n  ports:\n  - {name: http, port: 80}\n",
    );
    let source = ["--manifests".to_string(), c.manifests.display().to_string()];
    let flags = [
        source.as_slice(),
        &["--service-counters".into(), "true".into()],
    ]
    .concat();
    c.start_agent_with(&flags);
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(5));
    c.wait_backends("10.96.0.20:80/TCP", &[], Duration::from_secs(5));

    for _ in 0..3 {
        c.get(&client, "http://10.96.0.10/").expect("web answers");
    }
    assert_eq!(c.get(&client, "http://10.96.0.20/"), Err(7), "refused");

    let out = std::process::Command::new(agent_bin())
        .args(["dump", "stats", "--by-service", "-o", "json", "--bpffs"])
        .arg(&c.topo.bpffs)
        .output()
        .expect("dump stats --by-service");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let services = dump["services"].as_array().expect("services");
    let find = |frontend: &str| {
        services
            .iter()
            .find(|s| s["frontend"] == frontend && s["scope"] == "internal")
            .unwrap_or_else(|| panic!("{frontend} in {dump:#}"))
            .clone()
    };
    let web = find("10.96.0.10:80");
    assert_eq!(web["service"], "default/web", "{web}");
    assert_eq!(web["port_name"], "http", "{web}");
    assert_eq!(web["new_connections"], 3, "{web}");
    // A handshake, a request and the close at least, per connection.
    assert!(web["packets"].as_u64().unwrap() >= 9, "{web}");
    assert!(web["bytes"].as_u64().unwrap() > 9 * 54, "{web}");
    assert_eq!(web["refused"], 0, "{web}");
    let empty = find("10.96.0.20:80");
    assert_eq!(empty["service"], "default/empty", "{empty}");
    assert_eq!(empty["refused"], 1, "{empty}");
    assert_eq!(empty["new_connections"], 0, "{empty}");

    let table = std::process::Command::new(agent_bin())
        .args(["dump", "stats", "--by-service", "--bpffs"])
        .arg(&c.topo.bpffs)
        .output()
        .expect("dump stats --by-service");
    let table = String::from_utf8_lossy(&table.stdout);
    println!("{table}");
    assert!(
        table.contains("default/web:http") && table.contains("10.96.0.20:80/TCP"),
        "{table}"
    );

    let (_, metrics) = c.node_http(10249, "/metrics");
    let series = metrics
        .lines()
        .find(|l| {
            l.starts_with("lb_service_new_connections{")
                && l.contains("service=\"default/web\"")
                && l.contains("frontend=\"10.96.0.10:80\"")
                && l.contains("scope=\"internal\"")
        })
        .unwrap_or_else(|| panic!("no web series in {metrics}"));
    assert!(series.ends_with(" 3"), "{series}");

    // explain names the Service and shows the frontend's counters; its own
    // synthetic packet counts nowhere.
    let text = explain(&c, &["--from", "10.244.1.2", "--to", "10.96.0.10:80"]);
    assert!(text.contains("service    default/web:http"), "{text}");
    assert!(text.contains(", 3 new connections, 0 refused"), "{text}");
    let text = explain(&c, &["--from", "10.244.1.2", "--to", "10.96.0.10:80"]);
    assert!(text.contains(", 3 new connections, 0 refused"), "{text}");

    // Off, the dump says so instead of printing zeros.
    c.stop_agent(15);
    c.start_agent();
    let out = std::process::Command::new(agent_bin())
        .args(["dump", "stats", "--by-service", "--bpffs"])
        .arg(&c.topo.bpffs)
        .output()
        .expect("dump stats --by-service");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(said.contains("--service-counters"), "{said}");
}

/// trafficDistribution PreferSameNode from the directory source: the
/// derived slices carry the hints the endpointslice controller writes
/// (node and zone), and the datapath follows them as kube-proxy does: the
/// endpoint on this node only, every endpoint once it is not ready.
#[test]
fn prefer_same_node_serves_from_this_node_and_falls_back_to_the_others() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in WEB_IPS[..2].iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[5353]);
    }
    let on_node = |i: usize, ready: bool| {
        let yaml = pod_yaml(&format!("web-{i}"), WEB_IPS[i], "web", ready);
        if i == 0 {
            yaml
        } else {
            // Another node's pod (reachable here all the same).
            yaml.replace(&format!("nodeName: {NODE_NAME}"), "nodeName: node-b")
        }
    };
    c.write("pod-web-0.yaml", &on_node(0, true));
    c.write("pod-web-1.yaml", &on_node(1, true));
    c.write("svc.yaml", &svc("  trafficDistribution: PreferSameNode\n"));
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    assert_eq!(
        c.answering_pods(&client, "http://10.96.0.10/", 8),
        BTreeSet::from(["web-0".to_string()])
    );
    // This node's endpoint goes unready: the node hints no longer apply.
    c.write("pod-web-0.yaml", &on_node(0, false));
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.12:8080"],
        Duration::from_secs(5),
    );
    assert_eq!(
        c.answering_pods(&client, "http://10.96.0.10/", 4),
        BTreeSet::from(["web-1".to_string()])
    );
}

/// `--service-cidr`: a connection to an address in the Service CIDR that
/// no Service holds is dropped (the client times out) and counted, as
/// kube-proxy's nftables mode does, instead of following the node's routes
/// (here: none, so the node answered "unreachable" before); the Service's
/// own ClusterIP still answers.
#[test]
fn unallocated_cluster_ips_are_dropped_with_service_cidr() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in WEB_IPS.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[5353]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", &svc(""));
    // Without the flag, the node has no route for it: refused at once.
    c.start_agent();
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(5));
    assert_eq!(c.get(&client, "http://10.96.0.99/"), Err(7));
    c.stop_agent(15);

    let flags = [
        "--manifests".to_string(),
        c.manifests.display().to_string(),
        "--service-cidr".into(),
        "10.96.0.0/16".into(),
    ];
    c.start_agent_with(&flags);
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(5));
    assert_eq!(c.get(&client, "http://10.96.0.99/"), Err(28), "dropped");
    c.get(&client, "http://10.96.0.10/")
        .expect("the Service answers");
    let stats = c.stats();
    assert!(
        stats["drop_unallocated_service_ip"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // explain sees it too, from a pod and from the node.
    let text = c.explain(&["--from", "10.244.1.2", "--to", "10.96.0.99:80"]);
    assert!(
        text.contains("verdict    dropped (drop_unallocated_service_ip)"),
        "{text}"
    );
    let text = c.explain(&["--from", "node", "--to", "10.96.0.99:80"]);
    assert!(
        text.contains("dropped on the node's way out: an unallocated Service IP"),
        "{text}"
    );
}
