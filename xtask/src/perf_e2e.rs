//! End to end for `cargo xtask perf`: a pod connecting to a ClusterIP, and a
//! host outside the cluster connecting to a NodePort, through each
//! contender, in the same topology with the same server and clients:
//! direct to the backend pod (the ceiling), lb, kube-proxy's iptables rule
//! shape and its nftables rule shape, all generated from the same Services.
//! Connect latency is a sequential connect() probe in paired, alternating
//! rounds against the direct path; connections per second come from two
//! connecting threads. The netfilter contenders' rule loads (full and one
//! change, as kube-proxy writes them) are timed too.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_testnet::{Lan, Pod, Topology};
use serde_json::Value;

use crate::contenders::{self, ServicePort};

pub const CONTENDERS: [&str; 5] = ["direct", "lb (no fast path)", "lb", "iptables", "nftables"];

#[derive(Clone, Debug)]
pub struct E2eRow {
    pub services: u32,
    /// "pod -> ClusterIP" or "outside -> NodePort".
    pub path: &'static str,
    pub contender: &'static str,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The direct path in the same paired rounds.
    pub direct_p50_us: f64,
    pub conns_per_s: f64,
    pub direct_conns_per_s: f64,
    /// Connects that timed out in the rate runs (both targets).
    pub failed_connects: u64,
    /// Rules loaded from empty (netfilter contenders), ms.
    pub load_ms: Option<f64>,
    /// One Service's endpoints changed, as kube-proxy writes it, ms.
    pub change_ms: Option<f64>,
}

pub struct E2eParams {
    pub rounds: usize,
    pub per_round: usize,
    pub rate_seconds: f64,
    /// Load and measure the netfilter contenders too (false at counts
    /// their loads cannot reach within the run: see perf.rs).
    pub netfilter: bool,
}

const SERVER_PORT: u16 = 8080;
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 1);
const NODE_PORT: u16 = 30080;

/// Who connects where: the client, the Service's address for it, and the
/// backend it can also reach directly (the ceiling).
struct Route {
    name: &'static str,
    client: Pod,
    service: SocketAddr,
    direct: SocketAddr,
}

struct Bench {
    topo: Topology,
    routes: Vec<Route>,
    xtask: PathBuf,
    params: E2eParams,
}

impl Bench {
    fn client_json(&self, client: &Pod, args: &[String]) -> Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.ns])
            .arg(&self.xtask)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running the benchmark client")?;
        if !out.status.success() {
            bail!(
                "benchmark client {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("benchmark client output")
    }

    /// Every route through the contender now in place.
    fn measure_all(&self, services: u32, contender: &'static str) -> Result<Vec<E2eRow>> {
        self.routes
            .iter()
            .map(|route| {
                // The direct contender pairs the backend with itself: the
                // probe's own spread.
                let target = if contender == "direct" {
                    route.direct
                } else {
                    route.service
                };
                self.measure(services, contender, route, target)
            })
            .collect()
    }

    /// Paired latency (`target` vs direct) and both rates.
    fn measure(
        &self,
        services: u32,
        contender: &'static str,
        route: &Route,
        target: SocketAddr,
    ) -> Result<E2eRow> {
        let latency = self.client_json(
            &route.client,
            &[
                "net-latency".into(),
                "--targets".into(),
                format!("{target},{}", route.direct),
                "--rounds".into(),
                self.params.rounds.to_string(),
                "--per-round".into(),
                self.params.per_round.to_string(),
            ],
        )?;
        // Median of three short runs: one SYN lost to a full queue anywhere
        // costs a second-long retransmit, which would dominate a single run.
        let rate = |target: SocketAddr| -> Result<(f64, u64)> {
            let mut runs = Vec::new();
            let mut failures = 0;
            for _ in 0..3 {
                let v = self.client_json(
                    &route.client,
                    &[
                        "net-rate".into(),
                        "--target".into(),
                        target.to_string(),
                        "--seconds".into(),
                        (self.params.rate_seconds / 3.0).to_string(),
                    ],
                )?;
                runs.push(v["conns_per_s"].as_f64().unwrap_or(f64::NAN));
                failures += v["failures"].as_u64().unwrap_or(0);
            }
            runs.sort_by(f64::total_cmp);
            Ok((runs[1], failures))
        };
        let failures = latency[0]["failures"].as_u64().unwrap_or(0);
        if failures > 0 {
            bail!("{contender}: {failures} connects to {target} failed");
        }
        let (direct_conns_per_s, direct_failures) = rate(route.direct)?;
        let (conns_per_s, rate_failures) = rate(target)?;
        let f = |i: usize, k: &str| latency[i][k].as_f64().unwrap_or(f64::NAN);
        Ok(E2eRow {
            services,
            path: route.name,
            contender,
            p50_us: f(0, "p50_us"),
            p99_us: f(0, "p99_us"),
            direct_p50_us: f(1, "p50_us"),
            conns_per_s,
            direct_conns_per_s,
            failed_connects: rate_failures + direct_failures,
            load_ms: None,
            change_ms: None,
        })
    }

    /// Run a command in the node namespace with `input` on stdin; its wall time.
    fn node_cmd(&self, args: &[&str], input: &Path) -> Result<Duration> {
        let started = Instant::now();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.topo.node_ns])
            .args(args)
            .stdin(fs::File::open(input)?)
            .output()
            .with_context(|| format!("running {args:?}"))?;
        if !out.status.success() {
            bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(started.elapsed())
    }
}

/// Wait until lb's maps hold the Service under test with `want` backends.
fn wait_lb(agent: &Path, bpffs: &Path, vip: SocketAddr, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let out = Command::new(agent)
            .args(["dump", "services", "-o", "json", "--bpffs"])
            .arg(bpffs)
            .output()?;
        if let Ok(dump) = serde_json::from_slice::<Value>(&out.stdout)
            && dump["services"].as_array().is_some_and(|all| {
                all.iter().any(|s| {
                    s["frontend"]["address"] == vip.ip().to_string()
                        && s["frontend"]["port"] == vip.port()
                        && s["backends"].as_array().map(Vec::len) == Some(want)
                })
            })
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("lb did not program {vip} within 300 s")
}

/// Remove lb's link and map pins: its programs detach, its maps go.
fn clear_pins(bpffs: &Path) -> Result<()> {
    // Device links, and the socket-level links under links/cgroup/.
    for dir in [bpffs.join("links/cgroup"), bpffs.join("links")] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                continue;
            }
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for entry in fs::read_dir(bpffs)? {
        let path = entry?.path();
        // Only lb's maps: a bpffs also holds the kernel's maps.debug and
        // progs.debug, which cannot be removed.
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("LB_"))
        {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Every contender at `services` Services; `progress` is told each step.
pub fn run(
    agent: &Path,
    services: u32,
    params: E2eParams,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<E2eRow>> {
    let mut topo = Topology::new().map_err(|e| anyhow!(e))?;
    // RST-closed connections leave conntrack entries in CLOSE state: age
    // them out after a second so the netfilter contenders' table stays small.
    for (key, value) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
    ] {
        topo.node_sysctl(key, value).map_err(|e| anyhow!(e))?;
    }
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let mut backends = Vec::new();
    for (i, ip) in [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12)]
        .into_iter()
        .enumerate()
    {
        let pod = topo
            .add_pod(&format!("srv{i}"), ip)
            .map_err(|e| anyhow!(e))?;
        topo.start_in_pod(
            &format!("net-server {i}"),
            &pod,
            &xtask,
            &[
                "net-server".into(),
                "--port".into(),
                SERVER_PORT.to_string(),
            ],
        )
        .map_err(|e| anyhow!(e))?;
        backends.push((ip, SERVER_PORT));
    }
    let client = topo
        .add_pod("client", Ipv4Addr::new(10, 244, 1, 2))
        .map_err(|e| anyhow!(e))?;
    // The node's NIC on a LAN with a host outside the cluster, which routes
    // the pod range via the node (for its direct path).
    let mut lan = Lan::new(&topo).map_err(|e| anyhow!(e))?;
    let node_device = lan
        .connect(&topo, &format!("{NODE_ADDR}/24"))
        .map_err(|e| anyhow!(e))?;
    let outside = lan
        .add_host(
            "outside",
            "192.168.70.100/24",
            &[("10.244.1.0/24", &NODE_ADDR.to_string())],
        )
        .map_err(|e| anyhow!(e))?;

    // The Service under test is the last one programmed, also a NodePort.
    let mut set: Vec<ServicePort> = contenders::service_set(services, 10);
    let last = set.len() - 1;
    set[last].endpoints = backends.clone();
    set[last].node_port = Some(NODE_PORT);
    let vip = SocketAddr::from((set[last].cluster_ip, set[last].port));
    let direct = SocketAddr::from(backends[0]);
    let dir = topo.dir.clone();
    let bench = Bench {
        topo,
        routes: vec![
            Route {
                name: "pod -> ClusterIP",
                client,
                service: vip,
                direct,
            },
            Route {
                name: "outside -> NodePort",
                client: outside,
                service: SocketAddr::from((NODE_ADDR, NODE_PORT)),
                direct,
            },
        ],
        xtask,
        params,
    };
    let mut rows = Vec::new();

    progress("direct");
    rows.extend(bench.measure_all(services, "direct")?);

    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    // The backends are this node's pods (the agent runs as node "perf").
    let (svc_yaml, slices_yaml) = contenders::manifests(&set, "perf");
    fs::write(manifests.join("services.yaml"), svc_yaml)?;
    fs::write(manifests.join("slices.yaml"), slices_yaml)?;
    let mut bench = bench;
    // lb without, then with the fast path; each from empty pins, so the
    // Service showing up in the maps means this agent programmed it.
    for (contender, fast_path) in [("lb (no fast path)", "false"), ("lb", "true")] {
        progress(contender);
        // Past the default maps (262,144 backends), sized as an operator
        // of such a cluster would size them.
        let backend_count: usize = set.iter().map(|s| s.endpoints.len()).sum::<usize>() + 1_000;
        let map_max = (backend_count > lb_common::map_sizes::BACKENDS as usize)
            .then(|| backend_count.next_power_of_two().to_string());
        let mut args: Vec<String> = [
            "run",
            "--manifests",
            &manifests.display().to_string(),
            "--bpffs",
            &bench.topo.bpffs.display().to_string(),
            "--pod-devices",
            &bench.topo.pod_device_glob(),
            "--node-name",
            "perf",
            "--healthz-bind",
            "",
            "--metrics-bind",
            "",
            "--fast-path",
            fast_path,
            "--devices",
            &node_device,
            // The XDP program is what is measured (lb's default on a veth
            // device would be tc).
            "--device-mode",
            "xdp",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(n) = &map_max {
            args.extend(["--lb-map-max".to_string(), n.clone()]);
        }
        let log = dir.join("agent.log");
        bench
            .topo
            .spawn_in_node_logged("agent", agent, &args, &log)
            .map_err(|e| anyhow!(e))?;
        wait_lb(agent, &bench.topo.bpffs, vip, backends.len())?;
        rows.extend(bench.measure_all(services, contender)?);
        // Detach: stop the agent, then drop the pins that keep programs
        // and maps alive.
        bench.topo.stop("agent", lb_testnet::SIGTERM);
        clear_pins(&bench.topo.bpffs)?;
    }

    if !bench.params.netfilter {
        drop(lan);
        return Ok(rows);
    }
    progress("iptables");
    let full = dir.join("iptables.rules");
    fs::write(&full, contenders::iptables_full(&set))?;
    let load = bench.node_cmd(&["iptables-restore"], &full)?;
    let mut measured = bench.measure_all(services, "iptables")?;
    let mut changed = set[0].clone();
    changed.endpoints.pop();
    let change = dir.join("iptables.change");
    fs::write(&change, contenders::iptables_one_change(0, &changed))?;
    let change_ms = bench
        .node_cmd(&["iptables-restore", "--noflush"], &change)?
        .as_secs_f64()
        * 1e3;
    for row in &mut measured {
        row.load_ms = Some(load.as_secs_f64() * 1e3);
        row.change_ms = Some(change_ms);
    }
    rows.extend(measured);
    let empty = dir.join("iptables.empty");
    fs::write(&empty, "*nat\nCOMMIT\n")?;
    bench.node_cmd(&["iptables-restore"], &empty)?;

    progress("nftables");
    let full = dir.join("nft.rules");
    fs::write(&full, contenders::nft_full(&set))?;
    let load = bench.node_cmd(&["nft", "-f", "-"], &full)?;
    let mut measured = bench.measure_all(services, "nftables")?;
    let change = dir.join("nft.change");
    fs::write(&change, contenders::nft_one_change(0, &changed))?;
    let change_ms = bench.node_cmd(&["nft", "-f", "-"], &change)?.as_secs_f64() * 1e3;
    for row in &mut measured {
        row.load_ms = Some(load.as_secs_f64() * 1e3);
        row.change_ms = Some(change_ms);
    }
    rows.extend(measured);
    drop(lan);
    Ok(rows)
}
