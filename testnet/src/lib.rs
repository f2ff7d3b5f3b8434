//! Throw-away topologies in network namespaces: a node namespace, pod
//! namespaces joined to it by veth the way a CNI's ptp plugin does it (a /32
//! per pod, routed from the node; the pod's default route via a link-local
//! gateway address of the node), servers that name the pod that answered,
//! and clients. Everything is named with a per-run prefix and removed on
//! drop; namespaces of runs that died are swept on the next start.
//! Tests and `cargo xtask demo` share it; it needs root and iproute2.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod soak;

pub const SERVER_PY: &str = include_str!("../assets/server.py");
pub const UDP_CLIENT_PY: &str = include_str!("../assets/udp_client.py");
pub const SOCK_PROBE_PY: &str = include_str!("../assets/sock_probe.py");
pub const TUN_RELAY_PY: &str = include_str!("../assets/tun_relay.py");

/// Every name this crate creates starts with this.
pub const PREFIX: &str = "lbt";
/// The pods' gateway: an address of the node namespace (on its lo), so the
/// node answers the pods' ARP for it on every veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The node namespace's IPv6 address (on its lo).
pub const NODE_ADDR6: &str = "fd00:ffff::1";

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Write a sysctl inside a namespace (net sysctls are per namespace).
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        &format!("echo {value} > {path}"),
    ]))
    .map(|_| ())
}

/// A namespace whose devices' IPv6 addresses (link-local ones included)
/// are usable at once: no duplicate address detection. With it, a new link
/// carries no IPv6 for about a second after it comes up (neighbour
/// discovery waits for the link-local address to be confirmed), longer
/// than some tests wait for an answer.
fn add_netns(ns: &str) -> Result<(), String> {
    ip(&["netns", "add", ns])?;
    for key in ["all", "default"] {
        sysctl(ns, &format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
    }
    Ok(())
}

/// The pid that created a prefixed name: "lbt<pid><letter>...".
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Remove namespaces and bpffs pins left by runs whose process is gone.
pub fn sweep_stale() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(e.path().join("bpffs"))
                    .output();
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The host side of the pod's veth, in the node namespace.
    pub host_dev: String,
}

pub struct Topology {
    pub prefix: String,
    pub node_ns: String,
    /// A bpf filesystem mounted for this run's pins (in the scratch dir, so
    /// nothing of the machine's own /sys/fs/bpf is touched).
    pub bpffs: PathBuf,
    /// A scratch directory (manifests, scripts).
    pub dir: PathBuf,
    pods: Vec<Pod>,
    children: Vec<(String, Child)>,
    next_dev: u32,
}

impl Topology {
    /// A node namespace with forwarding on, and scratch dirs.
    pub fn new() -> Result<Self, String> {
        sweep_stale();
        let n = RUN_COUNTER.fetch_add(1, Ordering::SeqCst);
        let letter = (b'a' + (n % 26) as u8) as char;
        let prefix = format!("{PREFIX}{}{letter}", std::process::id());
        let node_ns = format!("{prefix}-node");
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        fs::write(dir.join("server.py"), SERVER_PY).map_err(|e| e.to_string())?;
        fs::write(dir.join("udp_client.py"), UDP_CLIENT_PY).map_err(|e| e.to_string())?;
        fs::write(dir.join("sock_probe.py"), SOCK_PROBE_PY).map_err(|e| e.to_string())?;
        fs::write(dir.join("tun_relay.py"), TUN_RELAY_PY).map_err(|e| e.to_string())?;
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs).map_err(|e| format!("{}: {e}", bpffs.display()))?;
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        let topo = Topology {
            bpffs,
            prefix,
            node_ns: node_ns.clone(),
            dir,
            pods: Vec::new(),
            children: Vec::new(),
            next_dev: 0,
        };
        add_netns(&node_ns)?;
        ip(&["-n", &node_ns, "link", "set", "lo", "up"])?;
        // The pods' gateway is a node address: the node answers their ARP for it.
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{POD_GATEWAY}/32"),
            "dev",
            "lo",
        ])?;
        sysctl(&node_ns, "net.ipv4.ip_forward", "1")?;
        sysctl(&node_ns, "net.ipv6.conf.all.forwarding", "1")?;
        // The node's own IPv6 address (a node has a global one): the source
        // its sockets pick for pods, instead of a veth's link-local address.
        ip(&[
            "-n",
            &node_ns,
            "-6",
            "addr",
            "add",
            &format!("{NODE_ADDR6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        for key in ["all", "default"] {
            sysctl(&node_ns, &format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
            sysctl(
                &node_ns,
                &format!("net.ipv4.conf.{key}.send_redirects"),
                "0",
            )?;
        }
        Ok(topo)
    }

    /// The glob matching every pod device of this topology.
    pub fn pod_device_glob(&self) -> String {
        format!("{}h*", self.prefix)
    }

    /// A pod namespace with `ip`/32, joined to the node by a veth whose
    /// checksum offload is off (so checksum bugs are not hidden).
    pub fn add_pod(&mut self, name: &str, ip_addr: Ipv4Addr) -> Result<Pod, String> {
        let ns = format!("{}-{name}", self.prefix);
        let host_dev = format!("{}h{}", self.prefix, self.next_dev);
        self.next_dev += 1;
        let pod = Pod {
            name: name.into(),
            ns: ns.clone(),
            ip: ip_addr,
            host_dev: host_dev.clone(),
        };
        add_netns(&ns)?;
        self.pods.push(pod.clone());
        let node = self.node_ns.clone();
        ip(&[
            "-n", &node, "link", "add", &host_dev, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        ip(&["-n", &node, "link", "set", &host_dev, "up"])?;
        sysctl(&node, &format!("net.ipv4.conf.{host_dev}.proxy_arp"), "1")?;
        sysctl(&node, &format!("net.ipv4.conf.{host_dev}.rp_filter"), "0")?;
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            &host_dev,
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
        ])?;
        for (where_ns, dev) in [(ns.as_str(), "eth0"), (node.as_str(), host_dev.as_str())] {
            run(Command::new("ip")
                .args(["netns", "exec", where_ns, "ethtool", "-K", dev, "tx", "off"]))?;
        }
        Ok(pod)
    }

    /// Give a pod an IPv6 address too (dual stack): a /128 on its eth0,
    /// routed from the node like the IPv4 /32, with the pod's default route
    /// via fe80::1, which the host side of its veth holds (as Cilium's
    /// router address does). No duplicate address detection: the address
    /// is usable at once.
    pub fn add_ipv6(&self, pod: &Pod, addr: std::net::Ipv6Addr) -> Result<(), String> {
        let node = self.node_ns.as_str();
        let ns = pod.ns.as_str();
        let host = pod.host_dev.as_str();
        ip(&[
            "-n",
            node,
            "-6",
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            host,
            "nodad",
        ])?;
        ip(&[
            "-n",
            node,
            "-6",
            "route",
            "add",
            &format!("{addr}/128"),
            "dev",
            host,
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n", ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])
    }

    /// Delete a pod's host device (and with it the pod's end).
    pub fn delete_device(&self, pod: &Pod) -> Result<(), String> {
        ip(&["-n", &self.node_ns, "link", "del", &pod.host_dev])
    }

    /// Start the test server in a pod and wait until it listens.
    pub fn start_server(&mut self, pod: &Pod, tcp: &[u16], udp: &[u16]) -> Result<(), String> {
        let join = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let args: Vec<String> = [
            self.dir.join("server.py").display().to_string(),
            "--name".into(),
            pod.name.clone(),
            "--tcp".into(),
            join(tcp),
            "--udp".into(),
            join(udp),
        ]
        .into();
        self.start_in_pod(
            &format!("server {}", pod.name),
            pod,
            Path::new("python3"),
            &args,
        )
    }

    /// Run `program` in a pod's namespace and wait for its first stdout line
    /// to be "ready" (servers print it once listening).
    pub fn start_in_pod(
        &mut self,
        label: &str,
        pod: &Pod,
        program: &Path,
        args: &[String],
    ) -> Result<(), String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns]).arg(program).args(args);
        self.start_ready(label, &pod.name, cmd)
    }

    /// Run `program` in the node namespace (`nsenter --net`) and wait for
    /// its first stdout line to be "ready".
    pub fn start_in_node(
        &mut self,
        label: &str,
        program: &Path,
        args: &[String],
    ) -> Result<(), String> {
        let cmd = self.node_command(program, args);
        let node = self.node_ns.clone();
        self.start_ready(label, &node, cmd)
    }

    /// `program args` in the node namespace: `nsenter --net`, which keeps
    /// /sys/fs/bpf visible (`ip netns exec` remounts /sys).
    pub fn node_command(&self, program: &Path, args: &[String]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg(program)
            .args(args);
        cmd
    }

    /// Spawn `cmd`, wait for "ready" on its stdout, keep it until drop.
    fn start_ready(&mut self, label: &str, place: &str, mut cmd: Command) -> Result<(), String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start {label} in {place}: {e}"))?;
        let stdout = child.stdout.take().ok_or("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{label} in {place} did not start: {line:?}"));
        }
        self.children.push((label.into(), child));
        Ok(())
    }

    /// Write a net sysctl of the node namespace.
    pub fn node_sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        sysctl(&self.node_ns, key, value)
    }

    /// Spawn a process in the node namespace with `nsenter --net` (keeps
    /// /sys/fs/bpf visible, unlike `ip netns exec`).
    pub fn spawn_in_node(
        &mut self,
        label: &str,
        program: &Path,
        args: &[String],
    ) -> Result<(), String> {
        let mut cmd = self.node_command(program, args);
        if std::env::var_os("RUST_LOG").is_none() {
            // Quiet unless asked: RUST_LOG=info shows the agent's whole log.
            cmd.env("RUST_LOG", "warn,kube_client=off");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn {label}: {e}"))?;
        self.children.push((label.into(), child));
        Ok(())
    }

    /// Like `spawn_in_node`, with stdout and stderr appended to `log`.
    pub fn spawn_in_node_logged(
        &mut self,
        label: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<u32, String> {
        let file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .node_command(program, args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {label}: {e}"))?;
        // nsenter execs the program: this is its pid.
        let pid = child.id();
        self.children.push((label.into(), child));
        Ok(pid)
    }

    /// Stop a process started here (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, label: &str, signal: i32) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            unsafe { libc_kill(child.id() as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// HTTP GET with curl from a pod: Ok(body) or Err(curl exit code, stderr).
    /// 7 = refused (RST), 28 = timed out.
    pub fn curl(&self, from: &Pod, url: &str, timeout_s: f64) -> Result<String, (i32, String)> {
        self.curl_with(from, &[], url, timeout_s)
    }

    /// `curl` with more arguments before the URL.
    pub fn curl_with(
        &self,
        from: &Pod,
        extra: &[&str],
        url: &str,
        timeout_s: f64,
    ) -> Result<String, (i32, String)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &from.ns, "curl", "-sS", "--max-time"])
            .arg(timeout_s.to_string())
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| (-1, e.to_string()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    }

    /// One UDP request from a pod: Ok(reply) or Err("refused" | "timeout" | other).
    pub fn udp(
        &self,
        from: &Pod,
        addr: impl Into<std::net::IpAddr>,
        port: u16,
        timeout_s: f64,
        src_port: u16,
    ) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &from.ns, "python3"])
            .arg(self.dir.join("udp_client.py"))
            .args([
                addr.into().to_string(),
                port.to_string(),
                timeout_s.to_string(),
                src_port.to_string(),
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// Run a command in a namespace and return its output (any status).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output, String> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())
    }
}

impl Topology {
    /// A route in the node namespace (`ip route add DEST via GATEWAY`).
    pub fn route(&self, dest: &str, via: &str) -> Result<(), String> {
        ip(&["-n", &self.node_ns, "route", "add", dest, "via", via])
    }

    /// `ip -n <node namespace> ARGS`.
    pub fn node_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.node_ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Turn transmit checksum offload off on a device of the node namespace
    /// (so checksum bugs are not hidden).
    pub fn tx_off(&self, dev: &str) -> Result<(), String> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.node_ns,
            "ethtool",
            "-K",
            dev,
            "tx",
            "off",
        ]))
        .map(|_| ())
    }

    /// A veth straight from this node namespace (`dev`) to `other`'s (`peer`
    /// there), both ends up with transmit checksum offload off: a second
    /// NIC cabled between two nodes. It goes with either namespace.
    pub fn wire(&self, dev: &str, other: &Topology, peer: &str) -> Result<(), String> {
        ip(&[
            "-n",
            &self.node_ns,
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            &other.node_ns,
        ])?;
        for (topo, d) in [(self, dev), (other, peer)] {
            topo.tx_off(d)?;
            topo.node_ip(&["link", "set", d, "up"])?;
        }
        Ok(())
    }

    /// One ping from a namespace: whether an echo reply came back within a second.
    pub fn ping(&self, ns: &str, addr: Ipv4Addr) -> bool {
        self.exec(ns, &["ping", "-c", "1", "-W", "1", &addr.to_string()])
            .is_ok_and(|o| o.status.success())
    }
}

/// An underlay: a bridge in its own namespace joining node namespaces (each
/// through a veth, its "node device") and external hosts.
pub struct Lan {
    pub ns: String,
    prefix: String,
    hosts: Vec<String>,
    next_port: u32,
}

impl Lan {
    /// A bridge namespace named after `topo`'s prefix.
    pub fn new(topo: &Topology) -> Result<Self, String> {
        let ns = format!("{}-lan", topo.prefix);
        add_netns(&ns)?;
        let lan = Lan {
            ns: ns.clone(),
            prefix: topo.prefix.clone(),
            hosts: Vec::new(),
            next_port: 0,
        };
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        Ok(lan)
    }

    /// A veth from `ns` (named `dev` there, with `addr_cidr`) to the bridge.
    /// Checksum offload off on both ends; GRO on the bridge end so frames an
    /// XDP program bounces (XDP_TX) into it are received.
    fn plug(&mut self, ns: &str, dev: &str, addr_cidr: &str) -> Result<(), String> {
        let port = format!("{}p{}", self.prefix, self.next_port);
        self.next_port += 1;
        ip(&[
            "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", &port, "netns", &self.ns,
        ])?;
        ip(&["-n", &self.ns, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &self.ns, "link", "set", &port, "up"])?;
        ip(&["-n", ns, "addr", "add", addr_cidr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        for (where_ns, d, feature) in [
            (ns, dev, "tx"),
            (self.ns.as_str(), port.as_str(), "tx"),
            (self.ns.as_str(), port.as_str(), "gro"),
        ] {
            let value = if feature == "gro" { "on" } else { "off" };
            run(Command::new("ip").args([
                "netns", "exec", where_ns, "ethtool", "-K", d, feature, value,
            ]))?;
        }
        Ok(())
    }

    /// Join a node: its node device is `<prefix>u` with `addr_cidr`. Returns the device name.
    pub fn connect(&mut self, topo: &Topology, addr_cidr: &str) -> Result<String, String> {
        let dev = format!("{}u", topo.prefix);
        self.plug(&topo.node_ns.clone(), &dev, addr_cidr)?;
        Ok(dev)
    }

    /// An external host on the LAN (a client outside the cluster), with
    /// routes `(destination, gateway)`. Returned as a `Pod` so the
    /// topology's clients (curl, UDP, ping) work from it.
    pub fn add_host(
        &mut self,
        name: &str,
        addr_cidr: &str,
        routes: &[(&str, &str)],
    ) -> Result<Pod, String> {
        let ns = format!("{}-{name}", self.prefix);
        add_netns(&ns)?;
        self.hosts.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.plug(&ns, "eth0", addr_cidr)?;
        for (dest, via) in routes {
            ip(&["-n", &ns, "route", "add", dest, "via", via])?;
        }
        let addr = addr_cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("bad host address {addr_cidr}"))?;
        Ok(Pod {
            name: name.into(),
            ns,
            ip: addr,
            host_dev: String::new(),
        })
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGTERM: i32 = 15;
pub const SIGKILL: i32 = 9;

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = ip(&["netns", "del", &pod.ns]);
        }
        let _ = ip(&["netns", "del", &self.node_ns]);
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_is_read_from_prefixed_names() {
        assert_eq!(owner_pid("lbt1234a-node"), Some(1234));
        assert_eq!(owner_pid("lbt99z"), Some(99));
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("lbtx"), None);
    }
}
