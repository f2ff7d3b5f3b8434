//! End-to-end harness: a node namespace running the real `lb-agent` on a
//! manifests directory, pods with real servers, clients using curl and UDP.

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

pub use lb_testnet::{Lan, Pod, SIGKILL, SIGTERM, Topology};

/// The agent binary (built by `cargo xtask test` before the tests run).
pub fn agent_bin() -> PathBuf {
    if let Ok(path) = std::env::var("LB_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/lb-agent
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("lb-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p lb-agent`; cargo xtask test does)",
        bin.display()
    );
    bin
}

pub const NODE_NAME: &str = "node-a";

/// Service `web` (app=web) in both families: 10.96.0.10 and fd00:96::10,
/// http 80 -> 8080/TCP and dns 53 -> 5353/UDP.
pub const WEB_DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

/// A dual-stack ClusterIP Service with one endpoint per family, rendered
/// as the manifests the agent reads (the Service and one EndpointSlice per
/// family), and as the frontends it must hold.
pub struct DualStackService<'a> {
    pub name: &'a str,
    /// The `app` label it selects.
    pub app: &'a str,
    /// IPv4, IPv6.
    pub cluster_ips: [&'a str; 2],
    /// (name, port, targetPort, protocol "TCP" | "UDP").
    pub ports: &'a [(&'a str, u16, u16, &'a str)],
}

/// One port of a Service in one family, and its endpoint.
pub struct Frontend {
    pub addr: std::net::SocketAddr,
    /// "TCP" | "UDP".
    pub protocol: String,
    pub backend: std::net::SocketAddr,
}

impl Frontend {
    /// "ip:port/PROTO", as `Cluster::wait_backends` takes it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.addr, self.protocol)
    }
}

impl DualStackService<'_> {
    /// The Service and its slices, `endpoints` (IPv4, IPv6) on node `node`.
    pub fn yaml(&self, endpoints: [&str; 2], node: &str) -> String {
        let [ip4, ip6] = self.cluster_ips;
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {}}}\nspec:\n  clusterIP: {ip4}\n  \
             clusterIPs: [{ip4}, \"{ip6}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
             ipFamilyPolicy: RequireDualStack\n  selector: {{app: {}}}\n  ports:\n",
            self.name, self.app
        );
        for (name, port, target, protocol) in self.ports {
            yaml += &format!(
                "  - {{name: {name}, port: {port}, targetPort: {target}, protocol: {protocol}}}\n"
            );
        }
        for (family, endpoint) in ["IPv4", "IPv6"].into_iter().zip(endpoints) {
            yaml += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                 name: {}-{}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: {family}\nports:\n",
                self.name,
                family.to_lowercase(),
                self.name
            );
            for (name, _, target, protocol) in self.ports {
                yaml += &format!("- {{name: {name}, port: {target}, protocol: {protocol}}}\n");
            }
            yaml += &format!(
                "endpoints:\n- {{addresses: [\"{endpoint}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
            );
        }
        yaml
    }

    /// Every port in both families, with its endpoint.
    pub fn frontends(&self, endpoints: [&str; 2]) -> Vec<Frontend> {
        let mut all = Vec::new();
        for (ip, endpoint) in self.cluster_ips.into_iter().zip(endpoints) {
            let ip: std::net::IpAddr = ip.parse().expect("ClusterIP");
            let endpoint: std::net::IpAddr = endpoint.parse().expect("endpoint address");
            for &(_, port, target, protocol) in self.ports {
                all.push(Frontend {
                    addr: (ip, port).into(),
                    protocol: protocol.to_string(),
                    backend: (endpoint, target).into(),
                });
            }
        }
        all
    }
}

pub struct Cluster {
    pub topo: Topology,
    pub manifests: PathBuf,
    /// The agent's --node-name.
    pub node_name: String,
}

impl Cluster {
    pub fn new() -> Self {
        Self::named(NODE_NAME)
    }

    /// A node called `node_name` (endpoints with that nodeName are its own).
    pub fn named(node_name: &str) -> Self {
        crate::require_root();
        let topo = Topology::new().unwrap_or_else(|e| panic!("building the topology: {e}"));
        let manifests = topo.dir.join("manifests");
        fs::create_dir_all(&manifests).expect("manifests dir");
        Cluster {
            topo,
            manifests,
            node_name: node_name.into(),
        }
    }

    /// A pod with a server on the given ports.
    pub fn pod(&mut self, name: &str, ip: &str, tcp: &[u16], udp: &[u16]) -> Pod {
        let ip: Ipv4Addr = ip.parse().expect("pod ip");
        let pod = self
            .topo
            .add_pod(name, ip)
            .unwrap_or_else(|e| panic!("pod {name}: {e}"));
        if !tcp.is_empty() || !udp.is_empty() {
            self.topo
                .start_server(&pod, tcp, udp)
                .unwrap_or_else(|e| panic!("server {name}: {e}"));
        }
        pod
    }

    /// A dual-stack pod: `ip` and `ip6`, a server on the given ports (both families).
    pub fn dual_pod(&mut self, name: &str, ip: &str, ip6: &str, tcp: &[u16], udp: &[u16]) -> Pod {
        let pod = self.pod(name, ip, tcp, udp);
        self.topo
            .add_ipv6(&pod, ip6.parse().expect("pod ipv6"))
            .unwrap_or_else(|e| panic!("pod {name} ipv6: {e}"));
        pod
    }

    /// Write (or replace) a manifest file atomically.
    pub fn write(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        fs::rename(&tmp, self.manifests.join(file)).expect("rename manifest");
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.manifests.join(file)).expect("remove manifest");
    }

    pub fn start_agent(&mut self) {
        let source = [
            "--manifests".to_string(),
            self.manifests.display().to_string(),
        ];
        self.start_agent_with(&source);
    }

    /// Start the agent with the given source flags (and any extra flags).
    pub fn start_agent_with(&mut self, extra: &[String]) {
        self.start_agent_as(extra, None);
        self.wait_agent_ready(extra);
    }

    /// Start another build of the agent (an earlier release) with these
    /// flags (the source's included).
    pub fn start_agent_binary(&mut self, bin: &std::path::Path, args: &[String]) {
        self.start_agent_from(bin, args, None);
        self.wait_agent_ready_with(bin, args);
    }

    /// Spawn the agent on the manifests and return at once (no readiness wait).
    pub fn spawn_agent(&mut self) {
        let source = [
            "--manifests".to_string(),
            self.manifests.display().to_string(),
        ];
        self.start_agent_as(&source, None);
    }

    /// Start the agent holding only `caps` (capability names as in a pod
    /// spec, e.g. "NET_ADMIN"), the way a container runtime would start it.
    pub fn start_agent_with_caps(&mut self, extra: &[String], caps: &[&str]) {
        self.start_agent_as(extra, Some(caps));
        self.wait_agent_ready(extra);
    }

    /// The maps are pinned before the agent has verified its programs and
    /// written its config; its health server answers only after that. So
    /// wait for both (the pins alone would let a test talk to the previous
    /// agent's leftovers).
    fn wait_agent_ready(&self, extra: &[String]) {
        self.wait_agent_ready_with(&agent_bin(), extra);
    }

    fn wait_agent_ready_with(&self, bin: &std::path::Path, extra: &[String]) {
        let bpffs = self.topo.bpffs.clone();
        wait_until(
            "the agent's maps can be dumped",
            Duration::from_secs(20),
            || {
                Command::new(bin)
                    .args(["dump", "stats", "-o", "json", "--bpffs"])
                    .arg(&bpffs)
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
        if !extra.iter().any(|a| a == "--healthz-bind") {
            wait_until(
                "the agent's health server answers",
                Duration::from_secs(20),
                || self.node_http(10256, "/livez").0 != 0,
            );
        }
    }

    fn start_agent_as(&mut self, extra: &[String], caps: Option<&[&str]>) {
        self.start_agent_from(&agent_bin(), extra, caps);
    }

    fn start_agent_from(&mut self, bin: &std::path::Path, extra: &[String], caps: Option<&[&str]>) {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--bpffs".into(),
            self.topo.bpffs.display().to_string(),
            "--pod-devices".into(),
            self.topo.pod_device_glob(),
            "--node-name".into(),
            self.node_name.clone(),
        ];
        args.extend(extra.iter().cloned());
        match caps {
            None => self
                .topo
                .spawn_in_node("agent", bin, &args)
                .expect("start agent"),
            Some(caps) => {
                let set: Vec<String> = caps
                    .iter()
                    .map(|c| format!("+{}", c.to_lowercase()))
                    .collect();
                let set = format!("-all,{}", set.join(","));
                let mut wrapped = vec![
                    format!("--inh-caps={set}"),
                    format!("--ambient-caps={set}"),
                    format!("--bounding-set={set}"),
                    bin.display().to_string(),
                ];
                wrapped.extend(args);
                self.topo
                    .spawn_in_node("agent", std::path::Path::new("setpriv"), &wrapped)
                    .expect("start agent under setpriv");
            }
        }
    }

    pub fn stop_agent(&mut self, signal: i32) {
        self.topo.stop("agent", signal);
    }

    /// GET http://127.0.0.1:PORT/PATH inside the node namespace: (status, body).
    pub fn node_http(&self, port: u16, path: &str) -> (u16, String) {
        self.http_from(
            &self.topo.node_ns,
            &format!("http://127.0.0.1:{port}{path}"),
        )
    }

    /// GET `url` from namespace `ns`: (status, body); status 0 when nothing answered.
    pub fn http_from(&self, ns: &str, url: &str) -> (u16, String) {
        let out = self
            .topo
            .exec(
                ns,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "3",
                    "-w",
                    "\n%{http_code}",
                    url,
                ],
            )
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `lb-agent explain ARGS` in the node namespace (where the node
    /// programs' route lookups happen), against this run's pins: its output.
    pub fn explain(&self, args: &[&str]) -> String {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.insert(0, "explain".into());
        args.extend(["--bpffs".into(), self.topo.bpffs.display().to_string()]);
        let out = self
            .topo
            .node_command(&agent_bin(), &args)
            .output()
            .expect("run explain");
        assert!(
            out.status.success(),
            "explain {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("explain {args:?}:\n{text}");
        text
    }

    /// `lb-agent dump WHAT -o json` against this run's pins.
    pub fn dump(&self, what: &str) -> serde_json::Value {
        let out = Command::new(agent_bin())
            .args(["dump", what, "-o", "json", "--bpffs"])
            .arg(&self.topo.bpffs)
            .output()
            .expect("run dump");
        assert!(
            out.status.success(),
            "dump {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("dump JSON")
    }

    /// Backends ("ip:port") the datapath holds for a frontend "ip:port/PROTO"
    /// (in-cluster entry) or "ip:port/PROTO (external)".
    pub fn backends_of(&self, frontend: &str) -> Option<BTreeSet<String>> {
        let dump = self.dump("services");
        dump["services"]
            .as_array()
            .expect("services")
            .iter()
            .find_map(|s| {
                let f = &s["frontend"];
                let external = if s["scope"] == "external" {
                    " (external)"
                } else {
                    ""
                };
                let address = f["address"].as_str()?;
                let address = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.to_string()
                };
                let key = format!(
                    "{address}:{}/{}{external}",
                    f["port"],
                    f["protocol"].as_str()?
                );
                (key == frontend).then(|| {
                    s["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| {
                            let address = b["address"].as_str().unwrap_or("?");
                            if address.contains(':') {
                                format!("[{address}]:{}", b["port"])
                            } else {
                                format!("{address}:{}", b["port"])
                            }
                        })
                        .collect()
                })
            })
    }

    /// Wait until the frontend holds exactly these backends.
    pub fn wait_backends(&self, frontend: &str, want: &[&str], within: Duration) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut last = None;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            last = self.backends_of(frontend);
            if last.as_ref() == Some(&want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{frontend}: backends {last:?}, want {want:?} within {within:?}");
    }

    pub fn stats(&self) -> serde_json::Value {
        self.dump("stats")["counters"].clone()
    }

    /// curl http://URL from a pod; the body, or the curl exit code.
    pub fn get(&self, from: &Pod, url: &str) -> Result<String, i32> {
        self.topo.curl(from, url, 3.0).map_err(|(code, _)| code)
    }

    /// The pod names answering `n` requests from `from`.
    pub fn answering_pods(&self, from: &Pod, url: &str, n: usize) -> BTreeSet<String> {
        (0..n)
            .map(|i| {
                let body = self
                    .get(from, url)
                    .unwrap_or_else(|c| panic!("request {i} to {url}: curl exit {c}"));
                field(&body, "pod").to_string()
            })
            .collect()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// `key=value` from a server's answer line.
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    try_field(body, key).unwrap_or_else(|| panic!("no {key}= in {body:?}"))
}

/// `key=value` from a line, if it is there.
pub fn try_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Every address of a topology's node namespace (what a flow masqueraded
/// to the node may show as its source).
pub fn node_addresses(topo: &Topology) -> BTreeSet<std::net::IpAddr> {
    let out = Command::new("ip")
        .args(["-n", &topo.node_ns, "-j", "addr", "show"])
        .output()
        .expect("ip addr");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j addr");
    links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect()
}

pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting until {what}");
}

/// A Pod manifest as the API server would report it.
pub struct PodSpec<'a> {
    pub name: &'a str,
    /// "10.244.1.11", or both families: "10.244.1.11,fd00:244::11".
    pub ip: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub ready: bool,
    /// Named container ports: (name, number, protocol).
    pub ports: &'a [(&'a str, u16, &'a str)],
    pub terminating: bool,
}

impl PodSpec<'_> {
    pub fn yaml(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(n, p, proto)| format!("{{name: {n}, containerPort: {p}, protocol: {proto}}}"))
            .collect();
        let deletion = if self.terminating {
            "\n  deletionTimestamp: \"2026-01-01T00:00:00Z\""
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels: {{{}}}{deletion}\nspec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: app\n    image: test\n    ports: [{}]\nstatus:\n  podIP: \"{}\"\n  podIPs: [{}]\n  conditions:\n  - {{type: Ready, status: \"{}\"}}\n",
            self.name,
            labels.join(", "),
            ports.join(", "),
            self.ip.split(',').next().unwrap_or_default(),
            self.ip
                .split(',')
                .map(|ip| format!("{{ip: \"{ip}\"}}"))
                .collect::<Vec<_>>()
                .join(", "),
            if self.ready { "True" } else { "False" },
        )
    }
}

pub fn pod_yaml(name: &str, ip: &str, app: &str, ready: bool) -> String {
    PodSpec {
        name,
        ip,
        labels: &[("app", app)],
        ready,
        ports: &[],
        terminating: false,
    }
    .yaml()
}

/// A TCP connection held open from a pod (server.py's HOLD mode), driven
/// line by line.
pub struct HeldConnection {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// The server's first line: "pod=NAME client=IP:PORT port=N".
    pub greeting: String,
}

const HOLD_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("r")
s.sendall(b"HOLD\n")
print(f.readline().strip(), flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(f.readline().strip(), flush=True)
"#;

impl HeldConnection {
    pub fn open(from: &Pod, addr: &str, port: u16) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &from.ns,
                "python3",
                "-c",
                HOLD_CLIENT,
                addr,
                &port.to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("hold client");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut greeting = String::new();
        stdout.read_line(&mut greeting).expect("greeting");
        assert!(
            greeting.contains("pod="),
            "no greeting from {addr}:{port}: {greeting:?}"
        );
        HeldConnection {
            child,
            stdin,
            stdout,
            greeting: greeting.trim().to_string(),
        }
    }

    /// `send`, None when the connection is gone (reset, or closed).
    pub fn try_send(&mut self, line: &str) -> Option<String> {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{line}").ok()?;
        self.stdin.flush().ok()?;
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).ok()?;
        (!reply.is_empty()).then(|| reply.trim().to_string())
    }

    /// Send one line on the connection and return the server's answer line.
    pub fn send(&mut self, line: &str) -> String {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{line}").expect("write to held connection");
        self.stdin.flush().expect("flush");
        let mut reply = String::new();
        self.stdout
            .read_line(&mut reply)
            .expect("read from held connection");
        assert!(!reply.is_empty(), "held connection closed (sent {line:?})");
        reply.trim().to_string()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The capabilities deploy/daemonset.yaml gives the agent.
pub fn daemonset_caps() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path).expect("daemonset.yaml");
    let ds: serde_json::Value = serde_saphyr::from_str(&text).expect("parse daemonset");
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}
