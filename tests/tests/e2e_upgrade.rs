//! Upgrading across a map layout change: the previous release (built from
//! the git history: the last commit of layout `LAYOUT_VERSION - 1`) runs
//! the node, then this agent replaces it. Its maps are replaced, but the
//! flows they track are carried over: a long-lived connection keeps its
//! backend and a connection loop sees no failure.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lb_tests::{e2e::*, previous::previous_agent};

const WEB_IPS: [&str; 3] = ["10.244.1.11", "10.244.1.12", "10.244.1.13"];
const ALL: [&str; 3] = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"];

/// The previous release verifies every program at start (seconds each):
/// two upgrades at once on two cores miss the harness's readiness wait.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";

/// A client connecting to the ClusterIP over and over, counting outcomes.
struct Loop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn start(client: &Pod, url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let ns = client.ns.clone();
            let url = url.to_string();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec", &ns, "curl", "-sS", "--max-time", "3", &url])
                        .output()
                        .expect("curl");
                    if out.status.success() {
                        &ok
                    } else {
                        eprintln!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
                        &failed
                    }
                    .fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Loop {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("loop thread");
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

fn stat(c: &Cluster, name: &str) -> u64 {
    c.stats()[name].as_u64().unwrap_or(0)
}

#[test]
fn upgrade_from_the_previous_layout_keeps_every_connection() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (old_agent, commit, version) = previous_agent();
    println!("upgrading from layout {version} ({commit})");
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in WEB_IPS.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", SVC);
    let source = vec!["--manifests".to_string(), c.manifests.display().to_string()];
    c.start_agent_binary(&old_agent, &source);
    wait_until(
        "the previous release serves the ClusterIP",
        Duration::from_secs(10),
        || c.get(&client, "http://10.96.0.10/").is_ok(),
    );
    // Three backends: a flow that lost its entry would be balanced afresh
    // and most likely reset by another pod.
    let mut held = HeldConnection::open(&client, "10.96.0.10", 80);
    let pod = field(&held.greeting, "pod").to_string();
    let load = Loop::start(&client, "http://10.96.0.10/");
    std::thread::sleep(Duration::from_millis(700));

    // A DaemonSet rollout: the old pod stops (pins and links stay), the new starts.
    c.stop_agent(SIGTERM);
    c.start_agent();
    c.wait_backends("10.96.0.10:80/TCP", &ALL, Duration::from_secs(10));
    // The hand-over happens after the new agent's first sync; the loop
    // runs across it and a while after.
    let mut replies = Vec::new();
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        replies.push(held.send(&format!("during {i}")));
    }
    let (ok, failed) = load.finish();
    println!("{ok} connections across the upgrade, {failed} failed");
    for reply in &replies {
        assert!(
            reply.contains(&format!("pod={pod}")),
            "the long-lived connection kept its backend {pod}: {reply}"
        );
    }
    assert!(ok > 10, "the loop ran: {ok}");
    assert_eq!(failed, 0, "no connection failed across the upgrade");

    // The new maps hold the old flow (converted, same backend), and the
    // new programs run: this agent's own counters move.
    let flows = c.dump("conntrack");
    let to_pod = flows["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .filter(|f| f["translated_to"].as_str().is_some_and(|t| t.contains(':')))
        .count();
    assert!(to_pod > 0, "the migrated conntrack holds flows: {flows}");
    let before = stat(&c, "established");
    assert!(held.send("after").contains(&format!("pod={pod}")));
    wait_until(
        "the new programs count the held connection",
        Duration::from_secs(3),
        || stat(&c, "established") > before,
    );
    // The hand-over is done: the previous layout's maps are gone.
    let previous = c.topo.bpffs.join(lb_agent::datapath::migrate::PREVIOUS_DIR);
    wait_until(
        "the previous layout's maps are released",
        Duration::from_secs(5),
        || !previous.exists(),
    );
    // A new connection is balanced by the new programs over every backend.
    let seen = c.answering_pods(&client, "http://10.96.0.10/", 30);
    assert_eq!(
        seen.len(),
        3,
        "30 new connections reach every pod: {seen:?}"
    );
}

/// The same across the node programs: an outside client on the node's LAN
/// reaches a NodePort (masqueraded, to endpoints on the node) through the
/// node device's program, with the agent's defaults otherwise; the
/// hand-over swaps that program too.
#[test]
fn upgrade_keeps_nodeport_connections_from_outside() {
    const NODE: &str = "192.168.50.1";
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (old_agent, _, _) = previous_agent();
    let mut c = Cluster::new();
    let mut lan = Lan::new(&c.topo).expect("lan");
    let dev = lan
        .connect(&c.topo, &format!("{NODE}/24"))
        .expect("node on the lan");
    let outside = lan
        .add_host("client", "192.168.50.100/24", &[])
        .expect("client");
    for (i, ip) in WEB_IPS.iter().enumerate() {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]\n",
    );
    let args = vec![
        "--manifests".to_string(),
        c.manifests.display().to_string(),
        "--devices".to_string(),
        dev,
    ];
    c.start_agent_binary(&old_agent, &args);
    let url = format!("http://{NODE}:30080/");
    wait_until(
        "the previous release serves the NodePort",
        Duration::from_secs(10),
        || c.topo.curl(&outside, &url, 2.0).is_ok(),
    );
    let mut held = HeldConnection::open(&outside, NODE, 30080);
    let pod = field(&held.greeting, "pod").to_string();
    let load = Loop::start(&outside, &url);
    std::thread::sleep(Duration::from_millis(700));
    c.stop_agent(SIGTERM);
    c.start_agent_with(&args);
    let previous = c.topo.bpffs.join(lb_agent::datapath::migrate::PREVIOUS_DIR);
    wait_until("the hand-over is done", Duration::from_secs(15), || {
        !previous.exists()
    });
    let mut replies = Vec::new();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        replies.push(held.send(&format!("during {i}")));
    }
    let (ok, failed) = load.finish();
    println!("{ok} NodePort connections across the upgrade, {failed} failed");
    for reply in &replies {
        assert!(
            reply.contains(&format!("pod={pod}")),
            "the long-lived connection kept its backend {pod}: {reply}"
        );
    }
    assert!(ok > 10, "the loop ran: {ok}");
    assert_eq!(
        failed, 0,
        "no NodePort connection failed across the upgrade"
    );
}
