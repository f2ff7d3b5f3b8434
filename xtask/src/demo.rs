//! `cargo xtask demo`: the README's ClusterIP example, live. A throw-away
//! node namespace runs lb-agent on `examples/`; three pods (the sample
//! Deployment's) answer with their names; a client pod calls the ClusterIP.
//! Everything is removed at the end, also on Ctrl-C.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_testnet::Topology;

use crate::{
    build::{self, workspace_root},
    setup,
};

const CLUSTER_IP: &str = "10.96.249.28";
const CLUSTER_IP_URL: &str = "http://10.96.249.28:8080/";
/// The node's address on the underlay, where the NodePort example answers.
const NODE_ADDR: &str = "192.168.60.1";
const NODE_PORT_URL: &str = "http://192.168.60.1:30001/";
const PODS_FILE: &str = "sample-deployment-pods.yaml";
const NODE_NAME: &str = "node-a";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Pods of the example: (name, IP), read from the example file.
fn example_pods(text: &str) -> Vec<(String, Ipv4Addr)> {
    let mut pods = Vec::new();
    let mut name = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line
            .strip_prefix("name: ")
            .filter(|n| n.starts_with("sample-deployment"))
        {
            name = Some(n.to_string());
        }
        if let Some(ip) = line.strip_prefix("podIP: ")
            && let (Some(n), Ok(ip)) = (name.take(), ip.parse())
        {
            pods.push((n, ip));
        }
    }
    pods
}

/// The pods file with the `index`-th pod's Ready condition set to `ready`.
fn with_readiness(text: &str, index: usize, ready: bool) -> String {
    let marker = "{type: Ready, status: \"True\"}";
    let mut out = String::new();
    let mut rest = text;
    let mut i = 0;
    while let Some(pos) = rest.find(marker) {
        out.push_str(&rest[..pos]);
        out.push_str(if i == index && !ready {
            "{type: Ready, status: \"False\"}"
        } else {
            marker
        });
        rest = &rest[pos + marker.len()..];
        i += 1;
    }
    out.push_str(rest);
    out
}

fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("?")
}

fn requests(topo: &Topology, client: &lb_testnet::Pod, n: usize) -> Result<Vec<(String, String)>> {
    requests_to(topo, client, CLUSTER_IP_URL, n)
}

fn requests_to(
    topo: &Topology,
    client: &lb_testnet::Pod,
    url: &str,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    for _ in 0..n {
        check_interrupt()?;
        let body = topo
            .curl(client, url, 3.0)
            .map_err(|(code, err)| anyhow!("curl {url} failed (exit {code}): {err}"))?;
        rows.push((
            field(&body, "pod").to_string(),
            field(&body, "client").to_string(),
        ));
    }
    Ok(rows)
}

fn print_table(rows: &[(String, String)]) {
    let width = rows
        .iter()
        .map(|(p, _)| p.len())
        .max()
        .unwrap_or(10)
        .max(10);
    println!(
        "    {:<4} {:<width$}  client address the pod saw",
        "#", "answered by"
    );
    for (i, (pod, client)) in rows.iter().enumerate() {
        println!("    {:<4} {:<width$}  {}", i + 1, pod, client);
    }
}

fn agent_dump(agent: &Path, bpffs: &Path) -> Result<String> {
    let out = Command::new(agent)
        .args(["dump", "services", "--bpffs"])
        .arg(bpffs)
        .output()
        .context("running lb-agent dump")?;
    if !out.status.success() {
        bail!(
            "lb-agent dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Active backends of the sample-clusterip frontend, from `dump -o json`.
fn clusterip_backends(agent: &Path, bpffs: &Path) -> Option<usize> {
    let out = Command::new(agent)
        .args(["dump", "services", "-o", "json", "--bpffs"])
        .arg(bpffs)
        .output()
        .ok()?;
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let service = dump["services"].as_array()?.iter().find(|s| {
        s["frontend"]["address"] == CLUSTER_IP
            && s["frontend"]["port"] == 8080
            && s["scope"] == "internal"
    })?;
    Some(
        service["backends"]
            .as_array()?
            .iter()
            .filter(|b| b["state"] == "active")
            .count(),
    )
}

fn wait_backends(agent: &Path, bpffs: &Path, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        check_interrupt()?;
        if clusterip_backends(agent, bpffs) == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the datapath did not reach {want} backends within 10 s")
}

pub fn run() -> Result<()> {
    if !setup::is_root() {
        bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    setup::run()?;
    let root = workspace_root();
    let agent = build::binary("lb-agent", "lb-agent", false)?;
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };

    let examples = root.join("examples");
    let pods_text =
        fs::read_to_string(examples.join(PODS_FILE)).context("reading the example pods")?;
    let pods = example_pods(&pods_text);
    if pods.is_empty() {
        bail!("no pods found in examples/{PODS_FILE}");
    }

    println!("== lb demo: a ClusterIP Service in front of three pods ==\n");
    let mut topo = Topology::new().map_err(|e| anyhow!(e))?;
    let manifests = topo.dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    for entry in fs::read_dir(&examples)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            fs::copy(&path, manifests.join(path.file_name().expect("file name")))?;
        }
    }
    println!(
        "A throw-away node (network namespace {}) with pods joined by veth, like a CNI does:",
        topo.node_ns
    );
    let mut pod_handles = Vec::new();
    for (i, (name, ip)) in pods.iter().enumerate() {
        let pod = topo
            .add_pod(&format!("pod{i}"), *ip)
            .map_err(|e| anyhow!(e))?;
        let named = lb_testnet::Pod {
            name: name.clone(),
            ..pod
        };
        topo.start_server(&named, &[80], &[])
            .map_err(|e| anyhow!(e))?;
        println!("  pod {name:<36} {ip}  serving HTTP on :80");
        pod_handles.push(named);
    }
    let client = topo
        .add_pod("testpod", "10.244.1.2".parse()?)
        .map_err(|e| anyhow!(e))?;
    println!(
        "  pod {:<36} {}  the client (like `kubectl run testpod`)",
        "testpod", client.ip
    );
    // The node's NIC on a LAN with a host outside the cluster.
    let mut lan = lb_testnet::Lan::new(&topo).map_err(|e| anyhow!(e))?;
    let node_device = lan
        .connect(&topo, &format!("{NODE_ADDR}/24"))
        .map_err(|e| anyhow!(e))?;
    let outside = lan
        .add_host("outside", "192.168.60.100/24", &[])
        .map_err(|e| anyhow!(e))?;
    println!(
        "  host {:<35} {}  outside the cluster, on the node's LAN ({NODE_ADDR})\n",
        "outside", outside.ip
    );

    let args: Vec<String> = [
        "run",
        "--manifests",
        &manifests.display().to_string(),
        "--bpffs",
        &topo.bpffs.display().to_string(),
        "--pod-devices",
        &topo.pod_device_glob(),
        "--node-name",
        NODE_NAME,
        "--devices",
        &node_device,
        "--device-mode",
        "tc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    topo.spawn_in_node("agent", &agent, &args)
        .map_err(|e| anyhow!(e))?;
    println!(
        "lb-agent runs on examples/ (sample-clusterip.yaml: ClusterIP 10.96.249.28, port 8080 -> pod port 80)."
    );
    wait_backends(&agent, &topo.bpffs, pods.len())?;

    println!("\n1. Nine requests from testpod to {CLUSTER_IP_URL}:");
    let rows = requests(&topo, &client, 9)?;
    print_table(&rows);
    let distinct: std::collections::BTreeSet<&String> = rows.iter().map(|(p, _)| p).collect();
    println!(
        "   {} different pods answered; each saw the client's own address (no SNAT).",
        distinct.len()
    );

    let flipped = &pods[1].0;
    println!(
        "\n2. {flipped}'s readiness probe starts failing (its Ready condition becomes False):"
    );
    let started = Instant::now();
    fs::write(
        manifests.join(PODS_FILE),
        with_readiness(&pods_text, 1, false),
    )?;
    wait_backends(&agent, &topo.bpffs, pods.len() - 1)?;
    println!(
        "   the datapath dropped it after {} ms; six more requests:",
        started.elapsed().as_millis()
    );
    let rows = requests(&topo, &client, 6)?;
    print_table(&rows);
    if rows.iter().any(|(p, _)| p == flipped) {
        bail!("{flipped} answered while not ready");
    }
    println!("   {flipped} gets no traffic while it is not ready.");

    println!("\n3. The probe passes again:");
    let started = Instant::now();
    fs::write(manifests.join(PODS_FILE), &pods_text)?;
    wait_backends(&agent, &topo.bpffs, pods.len())?;
    println!(
        "   back in the datapath after {} ms.",
        started.elapsed().as_millis()
    );

    println!(
        "\n4. From outside the cluster: six requests from the LAN host to the NodePort of\n   \
         sample-nodeport.yaml (the notes' http-go-svc, nodePort 30001) at {NODE_PORT_URL}:"
    );
    let rows = requests_to(&topo, &outside, NODE_PORT_URL, 6)?;
    print_table(&rows);
    println!("   the endpoints are on this node, so each pod sees the outside host's own address.");

    println!("\n5. What the datapath holds (`lb-agent dump services`):");
    print!("{}", agent_dump(&agent, &topo.bpffs)?);

    println!("\nCleaning up (namespaces, pins, processes).");
    drop(lan);
    drop(topo);
    println!("Done.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = include_str!("../../examples/sample-deployment-pods.yaml");

    #[test]
    fn reads_the_example_pods() {
        let pods = example_pods(TEXT);
        assert_eq!(pods.len(), 3);
        assert_eq!(pods[0].1, Ipv4Addr::new(10, 244, 1, 11));
    }

    #[test]
    fn flips_one_pods_readiness() {
        let flipped = with_readiness(TEXT, 1, false);
        assert_eq!(
            flipped.matches("{type: Ready, status: \"False\"}").count(),
            1
        );
        assert_eq!(
            flipped.matches("{type: Ready, status: \"True\"}").count(),
            2
        );
        let second = flipped.find("54g6x").unwrap();
        assert!(
            flipped[second..].find("False") < flipped[second..].find("True"),
            "the second pod is the one flipped"
        );
        assert_eq!(with_readiness(TEXT, 1, true), TEXT);
    }
}
