//! `cargo xtask perf`: benchmarks that write a report. This first part
//! measures the control plane: programming N Services x 10 endpoints from
//! empty, and how long one endpoint change takes to reach the maps.
//! (Per-packet and end-to-end sections follow with the performance issue.)

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_testnet::Topology;
use serde_json::Value;

use crate::{build, chart, contenders, perf_e2e, setup};

const ENDPOINTS_PER_SERVICE: u32 = 10;

pub struct PerfArgs {
    pub quick: bool,
    pub control_plane_only: bool,
    pub services: Vec<u32>,
    pub changes: usize,
    pub out: PathBuf,
}

/// N Services (one TCP port each) and one EndpointSlice of 10 ready endpoints per Service.
fn write_manifests(dir: &Path, services: u32) -> Result<()> {
    let (svc, slices) = contenders::manifests(
        &contenders::service_set(services, ENDPOINTS_PER_SERVICE),
        "perf",
    );
    fs::write(dir.join("services.yaml"), svc)?;
    fs::write(dir.join("slices.yaml"), slices)?;
    Ok(())
}

/// One extra slice for svc-0 whose endpoint flips readiness: one change.
fn churn_yaml(ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: svc-0-churn\n  namespace: perf\n  labels: {{kubernetes.io/service-name: svc-0}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"10.250.0.1\"], conditions: {{ready: {ready}}}}}\n"
    )
}

/// Follows the agent's JSON log for "synced" lines.
struct LogTail {
    reader: BufReader<fs::File>,
}

impl LogTail {
    fn open(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        Ok(LogTail {
            reader: BufReader::new(file),
        })
    }

    fn skip_to_end(&mut self) -> Result<()> {
        self.reader.seek(SeekFrom::End(0))?;
        Ok(())
    }

    /// Wait for the next "synced" record matching `want`; returns its fields.
    fn wait_synced(&mut self, within: Duration, want: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + within;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                if Instant::now() > deadline {
                    bail!("no matching sync in the agent log within {within:?}");
                }
                if n > 0 {
                    // A partial line: rewind and wait for the rest.
                    self.reader.seek(SeekFrom::Current(-(n as i64)))?;
                }
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let fields = &record["fields"];
            if fields["message"] == "synced" && want(fields) {
                return Ok(fields.clone());
            }
            if record["level"] == "ERROR" {
                bail!("agent error: {}", line.trim());
            }
        }
    }
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

struct ControlPlaneResult {
    services: u32,
    program_from_start_ms: f64,
    sync_ms: f64,
    /// From the agent's start: its programs verified and attached, and
    /// (in parallel) its manifests directory read and parsed.
    verified_ms: f64,
    manifests_read_ms: f64,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_max_ms: f64,
    /// Medians of the agent's own phases for one change.
    change_assemble_ms: f64,
    change_translate_ms: f64,
    change_sync_ms: f64,
    /// p50 / p99 of a Service (with its slice) created, deleted, and of
    /// this node's Node labels changed (every Service translated again).
    created: (f64, f64),
    deleted: (f64, f64),
    node_labels: (f64, f64),
    rss_mb: f64,
    cpu_s: f64,
}

/// The `elapsed_ms` of the agent's first JSON log line with this message.
fn logged_elapsed_ms(log: &Path, message: &str) -> Result<f64> {
    let text = fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == message)
        .and_then(|v| v["fields"]["elapsed_ms"].as_f64())
        .with_context(|| format!("the agent did not log {message:?} with elapsed_ms"))
}

/// A Service of its own with one slice: one Service created.
fn extra_service_yaml(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{i}, namespace: perf}}\nspec:\n  clusterIP: 10.255.{}.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: extra-{i}\n  namespace: perf\n  labels: {{kubernetes.io/service-name: extra-{i}}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"10.251.0.1\"], conditions: {{ready: true}}}}\n",
        i / 250,
        i % 250 + 1
    )
}

/// This node's Node object, its zone label alternating.
fn node_yaml(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: perf\n  labels: {{topology.kubernetes.io/zone: zone-{}}}\n",
        i % 2
    )
}

/// Replace `name` in `dir` atomically with `text`; returns when it was renamed.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<Instant> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    let t = Instant::now();
    fs::rename(&tmp, dir.join(name))?;
    Ok(t)
}

/// p50 and p99 of a set of samples.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// `lb-agent run` on the manifests directory in the perf node, JSON logs.
fn agent_args(topo: &Topology, manifests: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--manifests",
        &manifests.display().to_string(),
        "--bpffs",
        &topo.bpffs.display().to_string(),
        "--pod-devices",
        &topo.pod_device_glob(),
        "--node-name",
        "perf",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Run a command that prints one JSON document; its stderr on failure.
fn json_output(cmd: &mut Command, what: &str) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what} output"))
}

fn control_plane(agent: &Path, services: u32, changes: usize) -> Result<ControlPlaneResult> {
    let mut topo = Topology::new().map_err(|e| anyhow!(e))?;
    let manifests = topo.dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    write_manifests(&manifests, services)?;
    let log = topo.dir.join("agent.log");
    // Past the default maps (262,144 backends), sized as an operator of such
    // a cluster would size them.
    let backends = services * ENDPOINTS_PER_SERVICE + 1_000;
    let map_max = (backends > lb_common::map_sizes::BACKENDS)
        .then(|| backends.next_power_of_two().to_string());
    let extra: Vec<&str> = match &map_max {
        Some(n) => vec!["--lb-map-max", n],
        None => vec![],
    };
    let args = agent_args(&topo, &manifests, &extra);
    let started = Instant::now();
    let pid = topo
        .spawn_in_node_logged("agent", agent, &args, &log)
        .map_err(|e| anyhow!(e))?;
    // The log file exists from the spawn on.
    let mut tail = LogTail::open(&log)?;
    let first = tail.wait_synced(Duration::from_secs(300), |f| f["frontends"] == services)?;
    let program_from_start_ms = started.elapsed().as_secs_f64() * 1e3;
    let sync_ms = first["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
    let verified_ms = logged_elapsed_ms(&log, "programs verified and attached")?;
    let manifests_read_ms = logged_elapsed_ms(&log, "manifests directory read")?;

    let mut latencies = Vec::with_capacity(changes);
    let mut phases: Vec<(f64, f64, f64)> = Vec::with_capacity(changes);
    let churn = manifests.join("churn.yaml");
    for i in 0..changes {
        tail.skip_to_end()?;
        let tmp = manifests.join(".churn.tmp");
        fs::write(&tmp, churn_yaml(i % 2 == 0))?;
        let t = Instant::now();
        fs::rename(&tmp, &churn)?;
        let fields = tail.wait_synced(Duration::from_secs(30), |f| f["sets_written"] == 1)?;
        if i < 2 && std::env::var_os("LB_PERF_TRACE").is_some() {
            eprintln!("change {i}: {fields}");
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        let num = |k: &str| fields[k].as_f64().unwrap_or(f64::NAN);
        phases.push((
            num("assemble_ms"),
            num("translate_ms"),
            num("elapsed_ms") - num("assemble_ms") - num("translate_ms"),
        ));
    }
    if std::env::var_os("LB_PERF_TRACE").is_some() {
        eprintln!("change latencies (ms, in order): {latencies:.2?}");
    }
    // Services created and deleted, and the Node's labels changed.
    let rounds = changes.clamp(5, 20);
    let (mut created, mut deleted, mut node_labels) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        tail.skip_to_end()?;
        let name = format!("extra-{i}.yaml");
        let t = write_atomic(&manifests, &name, &extra_service_yaml(i))?;
        tail.wait_synced(Duration::from_secs(30), |f| {
            f["written"] == 1 && f["frontends"] == services + 1
        })?;
        created.push(t.elapsed().as_secs_f64() * 1e3);
        tail.skip_to_end()?;
        let t = Instant::now();
        fs::remove_file(manifests.join(&name))?;
        tail.wait_synced(Duration::from_secs(30), |f| f["removed"] == 1)?;
        deleted.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for i in 0..rounds {
        tail.skip_to_end()?;
        let t = write_atomic(&manifests, "node.yaml", &node_yaml(i))?;
        tail.wait_synced(Duration::from_secs(60), |f| f["frontends"] == services)?;
        node_labels.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let result = ControlPlaneResult {
        change_assemble_ms: median(phases.iter().map(|p| p.0).collect()),
        change_translate_ms: median(phases.iter().map(|p| p.1).collect()),
        change_sync_ms: median(phases.iter().map(|p| p.2).collect()),
        services,
        program_from_start_ms,
        sync_ms,
        verified_ms,
        manifests_read_ms,
        change_p50_ms: percentile(&latencies, 0.5),
        change_p99_ms: percentile(&latencies, 0.99),
        created: p50_p99(created),
        deleted: p50_p99(deleted),
        node_labels: p50_p99(node_labels),
        change_max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        rss_mb: rss_mb(pid).unwrap_or(f64::NAN),
        cpu_s: cpu_seconds(pid).unwrap_or(f64::NAN),
    };
    if let Some(dir) = std::env::var_os("LB_PERF_TRACE") {
        // The agent's own log, for its startup timeline.
        let keep = Path::new(&dir).join(format!("agent-{services}.log"));
        fs::copy(&log, &keep).with_context(|| format!("keeping {}", keep.display()))?;
    }
    drop(topo);
    Ok(result)
}

/// Frontends of one dual-stack LoadBalancer Service with one port on a node
/// with two addresses per family: per family its ClusterIP, its
/// LoadBalancer IP in both scopes, and its nodePort on both node addresses
/// in both scopes.
const LB_FRONTENDS_PER_SERVICE: u32 = 2 * (1 + 2 + 2 * 2);

/// `services` dual-stack LoadBalancer Services with 10 endpoints per
/// family, as the capacity check programs them. Service i has ClusterIPs
/// 10.96.0.1+i and fd00:96::1+i, LoadBalancer IPs 198.18.0.1+i and
/// 2001:db8:18::1+i, and nodePort 20000+i: that many LoadBalancer Services
/// need a --service-node-port-range wider than the default, as clusters of
/// this size set.
fn write_lb_manifests(dir: &Path, services: u32) -> Result<()> {
    let v4 = |base: [u8; 4], n: u32| std::net::Ipv4Addr::from(u32::from_be_bytes(base) + n);
    let mut svc = String::with_capacity(services as usize * 520);
    let mut slices = String::with_capacity(services as usize * 2400);
    for i in 0..services {
        writeln!(
            svc,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: lb-{i}, namespace: perf}}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {c4}\n  clusterIPs: [\"{c4}\", \"fd00:96::{c6:x}\"]\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {np}}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: \"{l4}\"}}, {{ip: \"2001:db8:18::{c6:x}\"}}]",
            c4 = v4([10, 96, 0, 1], i),
            c6 = i + 1,
            np = 20_000 + i,
            l4 = v4([198, 18, 0, 1], i),
        )?;
        for (family, suffix) in [("IPv4", "a"), ("IPv6", "b")] {
            writeln!(
                slices,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: {family}\nmetadata:\n  name: lb-{i}-{suffix}\n  namespace: perf\n  labels: {{kubernetes.io/service-name: lb-{i}}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:"
            )?;
            for j in 0..ENDPOINTS_PER_SERVICE {
                let n = i * ENDPOINTS_PER_SERVICE + j;
                let addr = if family == "IPv4" {
                    v4([10, 128, 0, 1], n).to_string()
                } else {
                    format!("fd00:128::{:x}:{:x}", (n + 1) >> 16, (n + 1) & 0xffff)
                };
                // Half the endpoints on this node, half elsewhere.
                let node = if j % 2 == 0 { "perf" } else { "other" };
                writeln!(
                    slices,
                    "- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}"
                )?;
            }
        }
    }
    fs::write(dir.join("services.yaml"), svc)?;
    fs::write(dir.join("slices.yaml"), slices)?;
    Ok(())
}

struct CapacityResult {
    services: u32,
    frontends: u32,
    program_from_start_ms: f64,
    rss_mb: f64,
    /// (map, entries, capacity), from `lb-agent dump stats`.
    maps: Vec<(String, u64, u64)>,
}

/// Do `services` dual-stack LoadBalancer Services x 10 endpoints, on a node
/// with two addresses per family, fit the default maps? The agent runs with
/// its default map sizes and must program every frontend without an error.
fn capacity(agent: &Path, services: u32) -> Result<CapacityResult> {
    let mut topo = Topology::new().map_err(|e| anyhow!(e))?;
    // The node's external device, with two addresses per family.
    let (dev, peer) = (format!("{}x0", topo.prefix), format!("{}x1", topo.prefix));
    let node_ip = |args: &[&str]| topo.node_ip(args).map_err(|e| anyhow!(e));
    node_ip(&["link", "add", &dev, "type", "veth", "peer", "name", &peer])?;
    node_ip(&["link", "set", &dev, "up"])?;
    node_ip(&["link", "set", &peer, "up"])?;
    for addr in ["192.0.2.1/24", "192.0.2.2/24"] {
        node_ip(&["addr", "add", addr, "dev", &dev])?;
    }
    for addr in ["2001:db8:ff::1/64", "2001:db8:ff::2/64"] {
        node_ip(&["-6", "addr", "add", addr, "dev", &dev, "nodad"])?;
    }
    let manifests = topo.dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    write_lb_manifests(&manifests, services)?;
    let log = topo.dir.join("agent.log");
    let args = agent_args(&topo, &manifests, &["--devices", &dev]);
    let started = Instant::now();
    let pid = topo
        .spawn_in_node_logged("agent", agent, &args, &log)
        .map_err(|e| anyhow!(e))?;
    let mut tail = LogTail::open(&log)?;
    let frontends = LB_FRONTENDS_PER_SERVICE * services;
    let synced = tail.wait_synced(Duration::from_secs(600), |f| f["frontends"] == frontends)?;
    let program_from_start_ms = started.elapsed().as_secs_f64() * 1e3;
    if synced["errors"] != 0 {
        bail!(
            "{services} dual-stack LoadBalancer Services do not fit the default maps: {} sync errors (see {})",
            synced["errors"],
            log.display()
        );
    }
    let stats = json_output(
        Command::new(agent)
            .args(["dump", "stats", "-o", "json", "--bpffs"])
            .arg(&topo.bpffs),
        "lb-agent dump stats",
    )?;
    let maps = stats["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["map"].as_str().unwrap_or("?").to_string(),
                m["entries"].as_u64().unwrap_or(0),
                m["capacity"].as_u64().unwrap_or(0),
            )
        })
        .filter(|(name, _, _)| {
            !name.starts_with("LB_CT") && name != "LB_AFFINITY" && name != "LB_SOCK_NAT"
        })
        .collect();
    let result = CapacityResult {
        services,
        frontends,
        program_from_start_ms,
        rss_mb: rss_mb(pid).unwrap_or(f64::NAN),
        maps,
    };
    drop(topo);
    Ok(result)
}

/// Pod devices created while the agent runs.
const DEVICES_CREATED: usize = 50;

/// How long a new pod device goes without its program: from `ip link add`
/// starting to the program's link pin appearing, for `DEVICES_CREATED`
/// veth devices created one after the other (p50, p99 ms). The agent learns
/// of a device from the kernel's link events.
fn device_attach(agent: &Path) -> Result<(f64, f64)> {
    let mut topo = Topology::new().map_err(|e| anyhow!(e))?;
    let manifests = topo.dir.join("manifests");
    fs::create_dir_all(&manifests)?;
    let log = topo.dir.join("agent.log");
    let args = agent_args(&topo, &manifests, &[]);
    topo.spawn_in_node_logged("agent", agent, &args, &log)
        .map_err(|e| anyhow!(e))?;
    let mut tail = LogTail::open(&log)?;
    tail.wait_synced(Duration::from_secs(60), |_| true)?;
    let links = topo.bpffs.join("links");
    let mut took = Vec::with_capacity(DEVICES_CREATED);
    for i in 0..DEVICES_CREATED {
        // Matches the pod device glob.
        let (dev, peer) = (
            format!("{}h{}", topo.prefix, 100 + i),
            format!("{}q{}", topo.prefix, 100 + i),
        );
        let suffix = format!("-{dev}");
        let t = Instant::now();
        topo.node_ip(&["link", "add", &dev, "type", "veth", "peer", "name", &peer])
            .map_err(|e| anyhow!(e))?;
        let deadline = t + Duration::from_secs(10);
        loop {
            let attached = fs::read_dir(&links)?.any(|e| {
                e.is_ok_and(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("tc-") && name.ends_with(&suffix)
                })
            });
            if attached {
                break;
            }
            if Instant::now() > deadline {
                bail!("{dev} got no program within 10 s (see {})", log.display());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        took.push(t.elapsed().as_secs_f64() * 1e3);
        topo.node_ip(&["link", "del", &dev])
            .map_err(|e| anyhow!(e))?;
    }
    drop(topo);
    Ok(p50_p99(took))
}

/// The control-plane targets (issue "Control plane at scale"): per Service
/// count, (one change p99 ms, from empty ms, RSS MB).
const CONTROL_PLANE_TARGETS: [(u32, f64, f64, f64); 2] = [
    (10_000, 5.0, 1_000.0, 100.0),
    (100_000, 10.0, 10_000.0, 600.0),
];

fn verdict(measured: f64, target: f64) -> String {
    if measured < target {
        "met".into()
    } else {
        format!("missed by {:.0} %", (measured / target - 1.0) * 100.0)
    }
}

fn write_control_plane_targets(md: &mut String, results: &[ControlPlaneResult]) -> Result<()> {
    let rows: Vec<_> = CONTROL_PLANE_TARGETS
        .iter()
        .filter_map(|t| Some((t, results.iter().find(|r| r.services == t.0)?)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "
Targets:
"
    )?;
    writeln!(
        md,
        "| Services | one change p99 | programmed from empty | agent RSS |"
    )?;
    writeln!(md, "|---:|---|---|---|")?;
    for ((_, change, empty, rss), r) in &rows {
        writeln!(
            md,
            "| {} | {:.1} ms < {change} ms: {} | {:.0} ms < {empty:.0} ms: {} | {:.0} MB < {rss:.0} MB: {} |",
            r.services,
            r.change_p99_ms,
            verdict(r.change_p99_ms, *change),
            r.program_from_start_ms,
            verdict(r.program_from_start_ms, *empty),
            r.rss_mb,
            verdict(r.rss_mb, *rss),
        )?;
    }
    writeln!(
        md,
        "\nWhere the misses come from:\n\n\
         - *From empty*: the floor is the kernel verifying the programs (the *programs verified* column: the verifier's state pruning, `states_equal`, is the largest single cost in a profile of a start), while the manifests are parsed in parallel on the second core; at 100,000 Services the YAML parse (serde-saphyr, about 5 MB/s on this machine) and the first pass's map writes (one `bpf()` call per entry: frontends, backends, slots and set members, 3.3 million at 100,000 Services) dominate. Smaller programs (\"Per-packet cost near the floor\") shorten the first; parsing files in parallel and `BPF_MAP_UPDATE_BATCH` writes would shorten the others.\n\
         - *RSS*: the agent holds each endpoint three times, none of them a copy of the API object: its compact record, the translated desired state, and the sync's mirror of what each map holds (which lets a change write only differences). A heap profile (heaptrack) of the 10,000-Service agent put its heap at 99 MB at the first pass's peak, spread over some forty ordered maps (the translation's indexes, the sync's mirrors), none over 9 %: no single structure to shrink. The 10-Service row is the agent's floor (runtime, BPF object, buffers)."
    )?;
    Ok(())
}

fn write_capacity(md: &mut String, r: &CapacityResult) -> Result<()> {
    writeln!(
        md,
        "\n## Capacity: {} dual-stack LoadBalancer Services x {ENDPOINTS_PER_SERVICE} endpoints per family, default map sizes\n",
        r.services
    )?;
    writeln!(
        md,
        "A node with two addresses per family: {} frontends ({LB_FRONTENDS_PER_SERVICE} per Service), programmed without an error {:.1} s after the agent started (agent RSS {:.0} MB). Every frontend of a Service port that selects the same endpoints shares one backend set.\n",
        r.frontends,
        r.program_from_start_ms / 1e3,
        r.rss_mb
    )?;
    writeln!(md, "| map | entries | capacity | full |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    for (map, entries, capacity) in &r.maps {
        writeln!(
            md,
            "| {map} | {entries} | {capacity} | {:.0} % |",
            *entries as f64 * 100.0 / (*capacity).max(1) as f64
        )?;
    }
    Ok(())
}

/// One line of progress, redrawn in place: `[=====>    ] 3/8 what`.
fn progress_bar(done: usize, total: usize, what: &str) {
    const WIDTH: usize = 24;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    eprint!("\r\x1b[2Kperf: [{bar}] {done}/{total} {what}");
}

fn write_e2e(md: &mut String, rows: &[perf_e2e::E2eRow]) -> Result<()> {
    writeln!(
        md,
        "\n## End to end: new TCP connections, pod -> ClusterIP and outside host -> NodePort\n"
    )?;
    writeln!(
        md,
        "Same node namespace, same two backend pods (a Rust accept-and-close server), same client pod and outside host (on the node's LAN, its NIC running lb's XDP program when lb is measured), for every contender; the Service under test is the last one programmed, also a NodePort (externalTrafficPolicy Cluster: every contender masquerades that traffic, lb as kube-proxy does by default). *connect* is a sequential connect() probe, paired in alternating rounds with the direct path (Δ = contender p50 - direct p50 of the same rounds). *conns/s*: two connecting threads; both ends close with an RST, so no TIME_WAIT fills ports or conntrack, and the node's conntrack ages CLOSE entries after 1 s. The netfilter contenders run kube-proxy's rule shapes generated from the same Services (iptables: Debian's iptables-nft backend). Loading NAT rules turns on conntrack for all of the node's traffic, the direct path included, so the Δ column understates them: compare their absolute values with the direct row. What saturates: the CPUs. Client threads, server threads and the kernel path all share the machine's cores, so connections per second measure the whole box; the paired latency probe (one connection at a time) is the cleaner comparison of the paths.\n"
    )?;
    writeln!(
        md,
        "| Services | path | contender | connect p50 | p99 | Δ p50 vs direct | conns/s | vs direct | failed connects | rules from empty | one change |"
    )?;
    writeln!(md, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    for r in rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.1} us | {:.1} us | {:+.1} us | {:.0} | {:.2}x | {} | {} | {} |",
            r.services,
            r.path,
            r.contender,
            r.p50_us,
            r.p99_us,
            r.p50_us - r.direct_p50_us,
            r.conns_per_s,
            r.conns_per_s / r.direct_conns_per_s,
            r.failed_connects,
            ms(r.load_ms),
            ms(r.change_ms),
        )?;
    }
    Ok(())
}

/// The per-packet section: every row, the targets (multiples of the no-op
/// programs), IPv6 against IPv4, and the XDP NodePort throughput.
fn write_per_packet(md: &mut String, packet: &Value, repeat: &str) -> Result<()> {
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    writeln!(
        md,
        "Floor: a no-op tc program {:.0} ns, a no-op XDP program {:.0} ns (repeated {repeat} times); run once per packet, {:.0} ns and {:.0} ns (the timer's own cost and cold caches included). *Established* and *reply* repeat one packet {repeat} times through a pair of frontends that are each other's backends, so every run is a translation (BPF_PROG_TEST_RUN repeats on the packet the previous run rewrote: reports before this one timed one translation and then misses); *not a frontend* repeats a packet between two addresses no frontend or backend has; *new flow* is one run per packet (distinct flows), median, against the once-per-packet floor.\n",
        num(packet, "floor_tc_ns"),
        num(packet, "floor_xdp_ns"),
        num(packet, "floor_tc_single_ns"),
        num(packet, "floor_xdp_single_ns"),
    )?;
    writeln!(
        md,
        "| Services | family | program | new flow | established | reply | not a frontend | new / floor | established / floor | not a frontend / floor |"
    )?;
    writeln!(md, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let rows: Vec<&Value> = packet["rows"].as_array().into_iter().flatten().collect();
    for row in &rows {
        let f = |k: &str| num(row, k);
        writeln!(
            md,
            "| {} | {} | {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.1}x | {:.1}x | {:.1}x |",
            row["services"],
            row["family"].as_str().unwrap_or("?"),
            row["program"].as_str().unwrap_or("?"),
            f("new_flow_ns"),
            f("established_ns"),
            f("reply_ns"),
            f("miss_ns"),
            f("new_flow_ns") / f("floor_single_ns"),
            f("established_ns") / f("floor_ns"),
            f("miss_ns") / f("floor_ns"),
        )?;
    }
    // Targets at the largest Service count, IPv4, per program.
    let largest = rows
        .iter()
        .filter_map(|r| r["services"].as_u64())
        .max()
        .unwrap_or(0);
    writeln!(md, "\nTargets at {largest} Services (IPv4):\n")?;
    writeln!(
        md,
        "| program | not a frontend <= 2.5x | established <= 4x | new flow <= 10x | IPv6 established vs IPv4 <= +20 % |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for program in ["tc", "xdp"] {
        let row = |family: &str| {
            rows.iter().copied().find(|r| {
                r["services"].as_u64() == Some(largest)
                    && r["program"].as_str() == Some(program)
                    && r["family"].as_str() == Some(family)
            })
        };
        let (Some(v4), Some(v6)) = (row("ipv4"), row("ipv6")) else {
            continue;
        };
        let ratio = |k: &str, floor: &str, target: f64| {
            let r = num(v4, k) / num(v4, floor);
            format!("{r:.1}x: {}", verdict(r, target))
        };
        let v6_delta = (num(v6, "established_ns") / num(v4, "established_ns") - 1.0) * 100.0;
        writeln!(
            md,
            "| {program} | {} | {} | {} | {:+.0} %: {} |",
            ratio("miss_ns", "floor_ns", 2.5),
            ratio("established_ns", "floor_ns", 4.0),
            ratio("new_flow_ns", "floor_single_ns", 10.0),
            v6_delta,
            if v6_delta <= 20.0 { "met" } else { "missed" },
        )?;
    }
    let t = &packet["throughput"];
    if t.is_object() {
        writeln!(
            md,
            "\nThroughput, XDP node program, NodePort to an endpoint on another node (masqueraded to the node), both directions of the flow alternating: {:.0} ns per packet, **{:.2} Mpps per core** (1e9 / in-program ns: the program's bound, without a NIC); a no-op XDP_TX program: {:.0} ns, {:.1} Mpps. The translated packets leave with XDP_PASS (the stack forwards them): XDP_TX back out of the NIC is not done yet (see README, Performance).",
            num(t, "nodeport_remote_ns"),
            num(t, "nodeport_remote_mpps"),
            num(t, "noop_xdp_tx_ns"),
            num(t, "noop_xdp_tx_mpps"),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// per-packet.svg (established-flow cost over the floor) and
/// connect-latency.svg (Δ p50 vs direct per contender), linked from the report.
fn write_charts(
    out: &Path,
    packet: &Value,
    e2e: &[perf_e2e::E2eRow],
    md: &mut String,
) -> Result<()> {
    let mut per_packet = Vec::new();
    for row in packet["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        for (case, key) in [
            ("new flow", "new_flow_ns"),
            ("established", "established_ns"),
            ("reply", "reply_ns"),
            ("not a frontend", "miss_ns"),
        ] {
            per_packet.push((
                format!(
                    "{} {} {} Services, {case}",
                    row["program"].as_str().unwrap_or("?"),
                    row["family"].as_str().unwrap_or("?"),
                    row["services"]
                ),
                f(key)
                    / if key == "new_flow_ns" {
                        f("floor_single_ns")
                    } else {
                        f("floor_ns")
                    },
            ));
        }
    }
    fs::write(
        out.join("per-packet.svg"),
        chart::bars(
            "Per-packet cost as a multiple of the no-op program",
            "x",
            &per_packet,
        ),
    )?;
    let connect: Vec<(String, f64)> = e2e
        .iter()
        .map(|r| {
            (
                format!("{}: {} at {} Services", r.path, r.contender, r.services),
                r.p50_us,
            )
        })
        .collect();
    fs::write(
        out.join("connect-latency.svg"),
        chart::bars("connect() p50", "us", &connect),
    )?;
    writeln!(
        md,
        "\n![per-packet cost](per-packet.svg)\n\n![connect latency](connect-latency.svg)"
    )?;
    Ok(())
}

pub fn run(args: PerfArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("perf loads BPF programs and builds namespaces: run it as root");
    }
    setup::run()?;
    let root = build::workspace_root();
    let agent = build::binary("lb-agent", "lb-agent", true)?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    fs::create_dir_all(&out)?;

    // The capacity check's size: the 10,000, or 1,000 in a quick run.
    let capacity_services = if args.quick { 1_000 } else { 10_000 };
    if args.control_plane_only {
        let (p50, p99) = device_attach(&agent)?;
        println!(
            "perf: a new pod device has its program {p50:.1} ms (p50), {p99:.1} ms (p99) after `ip link add` starts"
        );
        let r = capacity(&agent, capacity_services)?;
        println!(
            "perf: {} dual-stack LoadBalancer Services fit the default maps ({} frontends, programmed {:.1} s after start, RSS {:.0} MB): {}",
            r.services,
            r.frontends,
            r.program_from_start_ms / 1e3,
            r.rss_mb,
            r.maps
                .iter()
                .map(|(m, e, c)| format!("{m} {e}/{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for &n in &args.services {
            let r = control_plane(&agent, n, args.changes)?;
            println!(
                "perf: {n} Services: programmed {:.0} ms after start (sync {:.0} ms); one change p50 {:.2} ms p99 {:.2} ms (assemble {:.2} translate {:.2} sync {:.2}); Service created p50 {:.2} p99 {:.2}, deleted p50 {:.2} p99 {:.2}, Node labels p50 {:.1} p99 {:.1} ms; RSS {:.0} MB",
                r.program_from_start_ms,
                r.sync_ms,
                r.change_p50_ms,
                r.change_p99_ms,
                r.change_assemble_ms,
                r.change_translate_ms,
                r.change_sync_ms,
                r.created.0,
                r.created.1,
                r.deleted.0,
                r.deleted.1,
                r.node_labels.0,
                r.node_labels.1,
                r.rss_mb
            );
        }
        return Ok(());
    }

    // Per-packet cost through BPF_PROG_TEST_RUN (the lb-bench binary of lb-tests).
    let bench_bin = build::binary("lb-tests", "lb-bench", true)?;
    let bench_services = if args.quick {
        "10,1000,10000"
    } else {
        "10,1000,10000,100000"
    };
    let repeat = if args.quick { "100000" } else { "1000000" };
    println!(
        "perf: per-packet cost at {bench_services} Services (repeat {repeat}, median of 5) ..."
    );
    let packet = json_output(
        Command::new(&bench_bin).args([
            "--services",
            bench_services,
            "--repeat",
            repeat,
            "--runs",
            "5",
        ]),
        "lb-bench",
    )?;

    // The control plane also at 100,000 Services (the contenders' end-to-end
    // runs stay at the asked counts: iptables alone would take hours there).
    // And at 10 Services: the agent's floor (start, RSS) the others add to.
    let mut control_counts = args.services.clone();
    if !args.quick {
        control_counts.extend([10, 100_000]);
        control_counts.sort_unstable();
        control_counts.dedup();
    }
    let mut results = Vec::new();
    for &n in &control_counts {
        println!(
            "perf: control plane, {n} Services x {ENDPOINTS_PER_SERVICE} endpoints, {} changes ...",
            args.changes
        );
        let r = control_plane(&agent, n, args.changes)?;
        println!(
            "perf:   programmed {:.0} ms after start (sync {:.0} ms); one change p50 {:.1} ms p99 {:.1} ms; RSS {:.0} MB",
            r.program_from_start_ms, r.sync_ms, r.change_p50_ms, r.change_p99_ms, r.rss_mb
        );
        results.push(r);
    }
    println!(
        "perf: capacity, {capacity_services} dual-stack LoadBalancer Services x {ENDPOINTS_PER_SERVICE} endpoints per family ..."
    );
    let capacity_result = capacity(&agent, capacity_services)?;
    println!("perf: pod devices created under a running agent ...");
    let attach = device_attach(&agent)?;

    // End to end: every contender in the same topology.
    // And lb (with the direct path) at 100,000 Services: the netfilter
    // shapes are not loaded there (iptables-restore took 11 s at 10,000
    // and grows faster than the rule count; nft 1.0.6 70 s, quadratic in
    // the anonymous verdict maps kube-proxy's shape has per Service).
    let mut e2e_counts: Vec<(u32, bool)> = if args.quick {
        vec![(1000, true)]
    } else {
        args.services.iter().map(|&n| (n, true)).collect()
    };
    if !args.quick && !args.services.contains(&100_000) {
        e2e_counts.push((100_000, false));
    }
    let total: usize = e2e_counts
        .iter()
        .map(|(_, netfilter)| {
            if *netfilter {
                perf_e2e::CONTENDERS.len()
            } else {
                3
            }
        })
        .sum();
    let mut done = 0;
    let mut e2e = Vec::new();
    for &(n, netfilter) in &e2e_counts {
        let params = perf_e2e::E2eParams {
            rounds: if args.quick { 6 } else { 10 },
            per_round: if args.quick { 100 } else { 200 },
            rate_seconds: if args.quick { 1.5 } else { 4.0 },
            netfilter,
        };
        let rows = perf_e2e::run(&agent, n, params, &mut |name| {
            done += 1;
            progress_bar(done, total, &format!("end to end: {name}, {n} Services"));
        })?;
        e2e.extend(rows);
    }
    eprintln!();

    let mut md = String::new();
    writeln!(md, "# lb performance report\n")?;
    writeln!(
        md,
        "Produced by `cargo xtask perf --services {}` (release agent, {} CPUs).\n",
        args.services
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(
        md,
        "## Per-packet cost (BPF_PROG_TEST_RUN, in-kernel ns per packet, median of 5)\n"
    )?;
    write_per_packet(&mut md, &packet, repeat)?;
    writeln!(md)?;
    writeln!(
        md,
        "## Control plane ({ENDPOINTS_PER_SERVICE} endpoints per Service)\n"
    )?;
    writeln!(
        md,
        "| Services | programmed after agent start | programs verified | manifests read | translate + sync | one change to maps p50 | p99 | max | agent RSS | agent CPU |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &results {
        writeln!(
            md,
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} MB | {:.1} s |",
            r.services,
            r.program_from_start_ms,
            r.verified_ms,
            r.manifests_read_ms,
            r.sync_ms,
            r.change_p50_ms,
            r.change_p99_ms,
            r.change_max_ms,
            r.rss_mb,
            r.cpu_s
        )?;
    }
    writeln!(
        md,
        "\nOther changes, from the file written to the agent's log line (p50 / p99):\n"
    )?;
    writeln!(
        md,
        "| Services | a Service created | a Service deleted | this Node's labels changed |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|")?;
    for r in &results {
        writeln!(
            md,
            "| {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms |",
            r.services,
            r.created.0,
            r.created.1,
            r.deleted.0,
            r.deleted.1,
            r.node_labels.0,
            r.node_labels.1
        )?;
    }
    writeln!(
        md,
        "\nWhere one change's time goes (medians, the agent's own measure):\n"
    )?;
    writeln!(
        md,
        "| Services | assemble cluster state | translate | map sync |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|")?;
    for r in &results {
        writeln!(
            md,
            "| {} | {:.1} ms | {:.1} ms | {:.2} ms |",
            r.services, r.change_assemble_ms, r.change_translate_ms, r.change_sync_ms
        )?;
    }
    writeln!(
        md,
        "\n- *programmed after agent start*: from spawning the agent (loading the BPF object and verifying its programs, reading and parsing every manifest) to its log line saying every Service is in the maps."
    )?;
    writeln!(
        md,
        "- *programs verified*, *manifests read*: from the agent's start to its log lines saying so; the two run in parallel (the directory is read on its own thread while the kernel verifies), and the first pass waits for both."
    )?;
    writeln!(
        md,
        "- *translate + sync*: the agent's own measure of that first pass (assembling the cluster state, translation, map writes)."
    )?;
    writeln!(
        md,
        "- *one change*: an EndpointSlice file of one Service replaced (atomic rename) until the agent logs the map write; {} changes.",
        args.changes
    )?;
    write_control_plane_targets(&mut md, &results)?;
    write_capacity(&mut md, &capacity_result)?;
    writeln!(
        md,
        "\n## A new pod device gets its program\n\n{DEVICES_CREATED} veth pod devices created one after the other under a running agent: from `ip link add` starting to the program's link pin, p50 {:.1} ms, p99 {:.1} ms. The agent learns of devices from the kernel's link events (rtnetlink), so a pod's device has its program while the CNI is still setting the pod up, before its first packet.",
        attach.0, attach.1
    )?;
    write_e2e(&mut md, &e2e)?;
    write_charts(&out, &packet, &e2e, &mut md)?;
    fs::write(out.join("report.md"), &md)?;
    let json: Vec<Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "services": r.services,
                "endpoints_per_service": ENDPOINTS_PER_SERVICE,
                "program_from_start_ms": r.program_from_start_ms,
                "sync_ms": r.sync_ms,
                "programs_verified_ms": r.verified_ms,
                "manifests_read_ms": r.manifests_read_ms,
                "change_p50_ms": r.change_p50_ms,
                "change_p99_ms": r.change_p99_ms,
                "change_max_ms": r.change_max_ms,
                "service_created_ms": [r.created.0, r.created.1],
                "service_deleted_ms": [r.deleted.0, r.deleted.1],
                "node_labels_changed_ms": [r.node_labels.0, r.node_labels.1],
                "change_assemble_ms": r.change_assemble_ms,
                "change_translate_ms": r.change_translate_ms,
                "change_sync_ms": r.change_sync_ms,
                "agent_rss_mb": r.rss_mb,
                "agent_cpu_s": r.cpu_s,
            })
        })
        .collect();
    fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "per_packet": packet,
            "control_plane": json,
            "capacity": {
                "load_balancer_services": capacity_result.services,
                "frontends": capacity_result.frontends,
                "program_from_start_ms": capacity_result.program_from_start_ms,
                "agent_rss_mb": capacity_result.rss_mb,
                "maps": capacity_result.maps.iter().map(|(m, e, c)| serde_json::json!({
                    "map": m, "entries": e, "capacity": c,
                })).collect::<Vec<_>>(),
            },
            "device_attach_ms": {"devices": DEVICES_CREATED, "p50": attach.0, "p99": attach.1},
            "end_to_end": e2e.iter().map(|r| serde_json::json!({
                "services": r.services,
                "contender": r.contender,
                "connect_p50_us": r.p50_us,
                "connect_p99_us": r.p99_us,
                "direct_connect_p50_us": r.direct_p50_us,
                "conns_per_s": r.conns_per_s,
                "direct_conns_per_s": r.direct_conns_per_s,
                "rules_load_ms": r.load_ms,
                "rules_one_change_ms": r.change_ms,
            })).collect::<Vec<_>>(),
        }))?,
    )?;
    println!(
        "perf: wrote {} and report.json",
        out.join("report.md").display()
    );
    print!("{md}");
    Ok(())
}
