//! Command line of `lb-agent`, optionally layered over a config file
//! (`--config FILE`, YAML with the same keys as the long flags).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use thiserror::Error;

use crate::model::{
    NodeConfig,
    cluster::{DEFAULT_HAIRPIN_SNAT_ADDR, DEFAULT_HAIRPIN_SNAT_ADDR6, ForwardingMode},
};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";
pub const DEFAULT_POD_DEVICES: &str = "veth*,lxc*,cali*";

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF Service load balancer: kube-proxy replacement node agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch Services and endpoints and keep the datapath programmed.
    Run(Box<RunArgs>),
    /// Show what the datapath holds, read from the pinned maps.
    Dump(DumpArgs),
    /// Where would this flow go, and why: runs the real program on a
    /// synthetic packet against the live maps, changing nothing.
    Explain(ExplainArgs),
    /// Detach every program and remove every pin (stop the agent first), and
    /// take back the NodePort range lb reserved: the node as it was before
    /// lb, so kube-proxy can be put back.
    Uninstall(UninstallArgs),
    /// Stream what the datapath does to packets as it happens: drops with
    /// their reason, refusals, translated ICMP errors and (when asked) new
    /// flows, each with its Service, frontend and backend.
    Monitor(MonitorArgs),
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// Only events of this Service (NAMESPACE/NAME).
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// Event kinds to show (repeat or comma-separate); default drop,
    /// reject and icmp. New flows only when asked.
    #[arg(long = "type", value_enum, value_delimiter = ',')]
    pub kinds: Vec<MonitorKind>,
    /// Only packets whose source is in this prefix.
    #[arg(long, value_name = "CIDR")]
    pub from: Option<ipnet::IpNet>,
    /// New flows: report one in N (the others cost nothing to report).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub sample: u32,
    /// Stop after N events shown.
    #[arg(short = 'c', long, value_name = "N")]
    pub count: Option<u64>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MonitorKind {
    Drop,
    Reject,
    New,
    Icmp,
}

impl MonitorKind {
    /// `lb_common::event_kind` of this kind.
    pub fn code(self) -> u8 {
        match self {
            MonitorKind::Drop => lb_common::event_kind::DROP,
            MonitorKind::Reject => lb_common::event_kind::REJECT,
            MonitorKind::New => lb_common::event_kind::NEW,
            MonitorKind::Icmp => lb_common::event_kind::ICMP,
        }
    }
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Client: IP[:PORT] (a pod's, or with --via node|xdp a client outside
    /// the node; the port matches an existing flow, default 40000), or
    /// `node` for the node's own sockets (socket-level LB at connect()).
    #[arg(long, value_name = "IP[:PORT]|node")]
    pub from: String,
    /// Destination (a Service frontend, or anything): IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub to: std::net::SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// Where the packet comes in: `pod` (a pod's device: in-cluster
    /// frontends), `node` (a node device with the tc program: traffic from
    /// outside, NodePorts, LoadBalancer IPs, externalIPs) or `xdp` (a node
    /// device with XDP). Default: pod.
    #[arg(long, value_enum, value_name = "pod|node|xdp")]
    pub via: Option<ExplainVia>,
    /// cgroup v2 directory the socket-level programs are attached to (with
    /// --from node). Default: the cgroup2 mount, as `run` uses.
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// `explain --via`: the program the synthetic packet meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainVia {
    Pod,
    Node,
    Xdp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Read Service, EndpointSlice, Endpoints, Pod and Node objects from this
    /// directory (*.yaml, *.yml, *.json) instead of a cluster.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Cluster credentials. Default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's or in-cluster address (which
    /// points at the `kubernetes` Service that nothing serves without kube-proxy).
    /// Several, comma-separated: tried in order, the next used when one fails.
    #[arg(long, value_name = "URL[,URL]", env = "LB_API_SERVER")]
    pub api_server: Option<String>,
    /// /healthz and /livez address ("" disables). Default: 0.0.0.0:10256
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind: Option<String>,
    /// /metrics address ("" disables). Default: 127.0.0.1:10249
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind: Option<String>,
    /// /healthz fails when a change waits this long unprogrammed (kube-proxy:
    /// twice its sync period); /livez when the agent's loop stops this long. Default: 60s
    #[arg(long, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// Least time between two syncs; a lone change is applied at once, a burst
    /// is coalesced (kube-proxy's minSyncPeriod). Default: 1s with a cluster, 0s with --manifests.
    #[arg(long, value_name = "DURATION")]
    pub min_sync_period: Option<String>,
    /// This node's name (endpoints with this nodeName are local). Default: $NODE_NAME, then the hostname.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Host-side pod devices to attach to, as globs. Default: veth*,lxc*,cali*
    #[arg(long, value_name = "GLOB[,GLOB]", value_delimiter = ',')]
    pub pod_devices: Option<Vec<String>>,
    /// Node devices carrying traffic from outside the node (NodePort,
    /// LoadBalancer IPs, externalIPs). Default: none (in-cluster traffic only)
    #[arg(long, value_name = "IF[,IF]", value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Program on node devices: auto (native XDP where the driver has it,
    /// except veth, else tc), xdp (native, else generic), xdp-generic, or tc
    /// (TCX ingress). Default: auto
    #[arg(long, value_enum)]
    pub device_mode: Option<DeviceMode>,
    /// Pod CIDRs of the cluster: traffic from outside them reaching a ClusterIP
    /// through a node device is served and masqueraded, as kube-proxy does.
    /// Default: unset (ClusterIPs are not served from outside)
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub cluster_cidr: Option<Vec<ipnet::IpNet>>,
    /// Service CIDRs, beside the cluster's ServiceCIDR objects (the
    /// manifests source has none): traffic to an address in one that no
    /// Service holds is dropped, as kube-proxy's nftables mode does.
    /// Default: unset
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub service_cidr: Option<Vec<ipnet::IpNet>>,
    /// externalTrafficPolicy Cluster: masquerade connections to NodePorts,
    /// LoadBalancer IPs and externalIPs to the node, from outside and from
    /// pods, as kube-proxy does. false: endpoints on this node see the
    /// client's address (a difference from kube-proxy). Default: true
    #[arg(long, value_name = "BOOL")]
    pub masquerade_cluster_policy: Option<bool>,
    /// NodePorts answer only on node device addresses inside these CIDRs. Default: all of them
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<ipnet::IpNet>>,
    /// Answer pings to Service addresses that have a usable endpoint (and
    /// drop them when none has). Default: true
    #[arg(long, value_name = "BOOL")]
    pub ping_services: Option<bool>,
    /// Hand translated packets on tc straight to the device the FIB routes
    /// them to (bpf_redirect_neigh), skipping the host's routing and
    /// netfilter for them. Default: true
    #[arg(long, value_name = "BOOL")]
    pub fast_path: Option<bool>,
    /// Count every packet and byte of each tracked flow (`dump conntrack`'s
    /// packets and bytes): a conntrack write per packet. Off, an entry is
    /// written on a state change and at most once a second. Default: false
    #[arg(long, value_name = "BOOL")]
    pub conntrack_accounting: Option<bool>,
    /// Count packets, bytes, new connections, refusals and drops per
    /// frontend (`dump stats --by-service`, `lb_service_*` metrics): a
    /// per-CPU counter slot for every rev-NAT id (40 bytes x CPUs x
    /// `--lb-map-max`). Default: false
    #[arg(long, value_name = "BOOL")]
    pub service_counters: Option<bool>,
    /// Socket-level LB: the node's own processes (hostNetwork pods, kubelet,
    /// tools) reach Services, translated at connect()/sendmsg() by cgroup
    /// programs on the root cgroup. Default: true
    #[arg(long, value_name = "BOOL")]
    pub socket_lb: Option<bool>,
    /// Socket-level LB for sockets of every network namespace (pods too),
    /// not only the node's. Default: false (pods keep per-packet translation)
    #[arg(long, value_name = "BOOL")]
    pub socket_lb_all_namespaces: Option<bool>,
    /// The cgroup v2 directory the socket-level programs attach to (the
    /// host's root cgroup). Default: the cgroup2 mount (/sys/fs/cgroup or
    /// /sys/fs/cgroup/unified)
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Where maps and links are pinned. Default: /sys/fs/bpf/lb
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Source address for hairpin flows. Default: 169.254.42.1
    #[arg(long, value_name = "ADDR")]
    pub hairpin_snat_address: Option<Ipv4Addr>,
    /// Source address for IPv6 hairpin flows. Default: fd6c:6268:6169:7270::1
    #[arg(long, value_name = "ADDR")]
    pub hairpin_snat_address6: Option<std::net::Ipv6Addr>,
    /// Only program spec.externalIPs inside these CIDRs (CVE-2020-8554). Default: all
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub external_ip_cidrs: Option<Vec<ipnet::IpNet>>,
    /// Serve only Services labelled service.kubernetes.io/service-proxy-name=NAME
    /// (a canary beside kube-proxy, which skips them). Default: the Services
    /// without that label, as kube-proxy
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    /// Remove the rules kube-proxy left on the node (iptables KUBE-* chains,
    /// nftables kube-proxy tables, IPVS) at start, sparing kubelet's. Default: false
    #[arg(long, value_name = "BOOL")]
    pub cleanup_kube_proxy: Option<bool>,
    /// The cluster's NodePort range (kube-apiserver's --service-node-port-range),
    /// reserved from the node's ephemeral ports. Default: 30000-32767
    #[arg(long, value_name = "LO-HI")]
    pub nodeport_range: Option<String>,
    /// Capacity of each of the frontend, backend, backend set and backend
    /// slot maps (entries). Default: 262144 / 262144 / 131072 / 524288
    #[arg(long, value_name = "N")]
    pub lb_map_max: Option<u32>,
    /// TCP flows conntrack holds (two map entries each; least recently used
    /// go first when full). Default: 32768 per CPU, at least 131072 (kube-proxy's)
    #[arg(long, value_name = "FLOWS")]
    pub ct_max_tcp: Option<u32>,
    /// UDP and other flows conntrack holds. Default: half of the TCP default
    #[arg(long, value_name = "FLOWS")]
    pub ct_max_other: Option<u32>,
    /// Backend selection for Services without the `lb/algorithm` annotation. Default: random
    #[arg(long, value_enum)]
    pub default_algorithm: Option<Algorithm>,
    /// How traffic from outside reaches endpoints on other nodes
    /// (externalTrafficPolicy Cluster), for Services without the
    /// `lb/forwarding-mode` annotation: snat (through this node), dsr (the
    /// endpoint's node answers the client directly, client address kept),
    /// hybrid (dsr for TCP, snat for UDP). Default: snat
    #[arg(long, value_enum)]
    pub default_forwarding_mode: Option<ForwardingMode>,
    /// Agent settings as YAML; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format. RUST_LOG filters (default info).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[arg(value_enum)]
    pub what: DumpWhat,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// `stats` only: the counters of every frontend (the agent must run
    /// with `--service-counters`).
    #[arg(long)]
    pub by_service: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Affinity,
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// The config file: the long flags' names as keys.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub healthz_bind: Option<String>,
    pub metrics_bind: Option<String>,
    pub health_timeout: Option<String>,
    pub min_sync_period: Option<String>,
    pub node_name: Option<String>,
    pub pod_devices: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub device_mode: Option<DeviceMode>,
    pub nodeport_addresses: Option<Vec<ipnet::IpNet>>,
    pub cluster_cidr: Option<Vec<ipnet::IpNet>>,
    pub service_cidr: Option<Vec<ipnet::IpNet>>,
    pub masquerade_cluster_policy: Option<bool>,
    pub ping_services: Option<bool>,
    pub fast_path: Option<bool>,
    pub conntrack_accounting: Option<bool>,
    pub service_counters: Option<bool>,
    pub socket_lb: Option<bool>,
    pub socket_lb_all_namespaces: Option<bool>,
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub hairpin_snat_address: Option<Ipv4Addr>,
    pub hairpin_snat_address6: Option<std::net::Ipv6Addr>,
    pub default_algorithm: Option<Algorithm>,
    pub default_forwarding_mode: Option<ForwardingMode>,
    pub lb_map_max: Option<u32>,
    pub ct_max_tcp: Option<u32>,
    pub ct_max_other: Option<u32>,
    pub external_ip_cidrs: Option<Vec<ipnet::IpNet>>,
    pub service_proxy_name: Option<String>,
    pub cleanup_kube_proxy: Option<bool>,
    pub nodeport_range: Option<String>,
    pub log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceMode {
    /// Native XDP where the driver has it, except on veth (whose native XDP
    /// holds XDP_TX answers until the peer's next poll), else tc.
    Auto,
    /// XDP in the driver where it supports it, generic XDP otherwise.
    Xdp,
    /// Generic (skb) XDP only: for drivers whose native XDP misbehaves
    /// (veth delays XDP_TX answers until its next poll).
    XdpGeneric,
    /// A TCX ingress program (for drivers or setups where XDP is unwanted).
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// A random backend per new flow.
    Random,
    /// Maglev consistent hashing: removing one of N backends moves ~1/N of flows.
    Maglev,
}

/// Bounds of --ct-max-tcp / --ct-max-other, in flows.
const MIN_CT_FLOWS: u32 = 1024;
const MAX_CT_FLOWS: u32 = 1 << 30;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("--pod-devices: empty pattern")]
    EmptyGlob,
    #[error("--{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

/// Where the cluster comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    Manifests(PathBuf),
    Kube {
        kubeconfig: Option<PathBuf>,
        /// --api-server URLs in order (empty: the kubeconfig's).
        api_servers: Vec<String>,
    },
}

/// Socket-level LB settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLb {
    /// --cgroup-root (None: the cgroup2 mount found at start).
    pub cgroup_root: Option<PathBuf>,
    /// Every network namespace, not only the node's.
    pub all_namespaces: bool,
}

/// Everything `run` needs, resolved from flags, file and environment.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    /// Frontend, backend, set and slot map capacity (`--lb-map-max`), when
    /// not the default.
    pub lb_map_max: Option<u32>,
    /// Flows conntrack holds: TCP, and everything else (resolved defaults).
    pub ct_max_tcp: u32,
    pub ct_max_other: u32,
    pub healthz_bind: Option<SocketAddr>,
    pub metrics_bind: Option<SocketAddr>,
    pub health_timeout: Duration,
    /// Added to net.ipv4.ip_local_reserved_ports.
    pub nodeport_range: crate::reserved_ports::PortRange,
    pub min_sync_period: Duration,
    pub node: NodeConfig,
    pub pod_devices: Vec<String>,
    /// Node devices (NodePort, LoadBalancer and externalIP traffic).
    pub devices: Vec<String>,
    pub device_mode: DeviceMode,
    /// --nodeport-addresses (None: every node device address).
    pub nodeport_cidrs: Option<Vec<ipnet::IpNet>>,
    pub ping_services: bool,
    /// Remove kube-proxy's leftover rules at start.
    pub cleanup_kube_proxy: bool,
    pub fast_path: bool,
    /// Per-packet conntrack counters (`--conntrack-accounting`).
    pub conntrack_accounting: bool,
    /// Per-frontend counters (`--service-counters`).
    pub service_counters: bool,
    /// Socket-level LB, when on.
    pub socket_lb: Option<SocketLb>,
    pub bpffs: PathBuf,
    pub log_format: LogFormat,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl RunArgs {
    pub fn resolve(self) -> Result<RunConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let source = match self.manifests.or(file.manifests) {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Kube {
                kubeconfig: self.kubeconfig.or(file.kubeconfig),
                api_servers: self
                    .api_server
                    .or(file.api_server)
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            },
        };
        let default_period = match source {
            SourceConfig::Manifests(_) => "0s",
            SourceConfig::Kube { .. } => "1s",
        };
        let min_sync_period = self.min_sync_period.or(file.min_sync_period);
        let min_sync_period = parse_duration(min_sync_period.as_deref().unwrap_or(default_period))
            .map_err(|reason| ConfigError::Invalid {
                flag: "min-sync-period",
                value: min_sync_period.clone().unwrap_or_default(),
                reason,
            })?;
        let health_timeout = match self.health_timeout.or(file.health_timeout) {
            None => crate::health::DEFAULT_HEALTH_TIMEOUT,
            Some(text) => parse_duration(&text)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| ConfigError::Invalid {
                    flag: "health-timeout",
                    value: text.clone(),
                    reason: "not a positive duration (e.g. 60s, 2m)".into(),
                })?,
        };
        let service_proxy_name = match self.service_proxy_name.or(file.service_proxy_name) {
            Some(name) => Some(label_value(&name).map_err(|reason| ConfigError::Invalid {
                flag: "service-proxy-name",
                value: name.clone(),
                reason,
            })?),
            None => None,
        };
        let nodeport_range = match self.nodeport_range.or(file.nodeport_range) {
            None => crate::reserved_ports::PortRange::NODEPORT_DEFAULT,
            Some(text) => text.parse().map_err(|reason| ConfigError::Invalid {
                flag: "nodeport-range",
                value: text.clone(),
                reason,
            })?,
        };
        let healthz_bind = parse_bind(
            "healthz-bind",
            self.healthz_bind.or(file.healthz_bind),
            "0.0.0.0:10256",
        )?;
        let metrics_bind = parse_bind(
            "metrics-bind",
            self.metrics_bind.or(file.metrics_bind),
            "127.0.0.1:10249",
        )?;
        let node_name = self
            .node_name
            .or(file.node_name)
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(hostname);
        let pod_devices = self
            .pod_devices
            .or(file.pod_devices)
            .unwrap_or_else(|| DEFAULT_POD_DEVICES.split(',').map(String::from).collect());
        if pod_devices.iter().any(|g| g.is_empty()) {
            return Err(ConfigError::EmptyGlob);
        }
        let devices = self.devices.or(file.devices).unwrap_or_default();
        if let Some(bad) = devices
            .iter()
            .find(|d| d.is_empty() || d.len() > 15 || d.contains(['/', ' ', '*']))
        {
            return Err(ConfigError::Invalid {
                flag: "devices",
                value: bad.clone(),
                reason: "not an interface name".into(),
            });
        }
        let lb_map_max = self.lb_map_max.or(file.lb_map_max);
        if lb_map_max.is_some_and(|n| n < 16) {
            return Err(ConfigError::Invalid {
                flag: "lb-map-max",
                value: lb_map_max.unwrap_or_default().to_string(),
                reason: "at least 16 entries".into(),
            });
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let (default_tcp, default_other) = lb_common::map_sizes::ct_flows_default(cpus);
        let ct_flows = |flag, given: Option<u32>, default| match given {
            // Two entries per flow must fit a map's u32 capacity.
            Some(n) if !(MIN_CT_FLOWS..=MAX_CT_FLOWS).contains(&n) => Err(ConfigError::Invalid {
                flag,
                value: n.to_string(),
                reason: format!("between {MIN_CT_FLOWS} and {MAX_CT_FLOWS} flows"),
            }),
            given => Ok(given.unwrap_or(default)),
        };
        let ct_max_tcp = ct_flows(
            "ct-max-tcp",
            self.ct_max_tcp.or(file.ct_max_tcp),
            default_tcp,
        )?;
        let ct_max_other = ct_flows(
            "ct-max-other",
            self.ct_max_other.or(file.ct_max_other),
            default_other,
        )?;
        Ok(RunConfig {
            source,
            lb_map_max,
            ct_max_tcp,
            ct_max_other,
            healthz_bind,
            metrics_bind,
            health_timeout,
            nodeport_range,
            min_sync_period,
            node: NodeConfig {
                node_name,
                hairpin_snat_addr: self
                    .hairpin_snat_address
                    .or(file.hairpin_snat_address)
                    .unwrap_or(DEFAULT_HAIRPIN_SNAT_ADDR),
                hairpin_snat_addr6: self
                    .hairpin_snat_address6
                    .or(file.hairpin_snat_address6)
                    .unwrap_or(DEFAULT_HAIRPIN_SNAT_ADDR6),
                external_ip_cidrs: self.external_ip_cidrs.or(file.external_ip_cidrs),
                service_proxy_name,
                default_maglev: self.default_algorithm.or(file.default_algorithm)
                    == Some(Algorithm::Maglev),
                nodeport_addresses: Vec::new(),
                node_ips: Vec::new(),
                host_addresses: Default::default(),
                cluster_cidrs: self.cluster_cidr.or(file.cluster_cidr).unwrap_or_default(),
                service_cidrs: self.service_cidr.or(file.service_cidr).unwrap_or_default(),
                masquerade_cluster_policy: self
                    .masquerade_cluster_policy
                    .or(file.masquerade_cluster_policy)
                    .unwrap_or(true),
                default_forwarding_mode: self
                    .default_forwarding_mode
                    .or(file.default_forwarding_mode)
                    .unwrap_or_default(),
            },
            pod_devices,
            devices,
            device_mode: self
                .device_mode
                .or(file.device_mode)
                .unwrap_or(DeviceMode::Auto),
            nodeport_cidrs: self.nodeport_addresses.or(file.nodeport_addresses),
            ping_services: self.ping_services.or(file.ping_services).unwrap_or(true),
            cleanup_kube_proxy: self
                .cleanup_kube_proxy
                .or(file.cleanup_kube_proxy)
                .unwrap_or(false),
            fast_path: self.fast_path.or(file.fast_path).unwrap_or(true),
            conntrack_accounting: self
                .conntrack_accounting
                .or(file.conntrack_accounting)
                .unwrap_or(false),
            service_counters: self
                .service_counters
                .or(file.service_counters)
                .unwrap_or(false),
            socket_lb: self
                .socket_lb
                .or(file.socket_lb)
                .unwrap_or(true)
                .then(|| SocketLb {
                    cgroup_root: self.cgroup_root.or(file.cgroup_root),
                    all_namespaces: self
                        .socket_lb_all_namespaces
                        .or(file.socket_lb_all_namespaces)
                        .unwrap_or(false),
                }),
            bpffs: self
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| DEFAULT_BPFFS.into()),
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
        })
    }
}

/// "1s", "500ms", "2m", "0": a non-negative duration.
/// A Kubernetes label value: 1 to 63 characters, alphanumerics with `-`,
/// `_` and `.` inside.
fn label_value(name: &str) -> Result<String, String> {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if name.is_empty() || name.len() > 63 {
        return Err("a label value of 1 to 63 characters is needed".into());
    }
    if !bytes.iter().all(inner)
        || !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
    {
        return Err("not a label value (alphanumerics, with '-', '_' or '.' inside)".into());
    }
    Ok(name.to_string())
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| "expected a duration like 1s or 500ms".to_string())?;
    let secs = match unit {
        "" if n == 0.0 => 0.0,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err("expected a duration like 1s or 500ms".into()),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A listen address, or None when given as "".
fn parse_bind(
    flag: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    let value = value.unwrap_or_else(|| default.to_string());
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            flag,
            value,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(
            &file,
            "node-name: from-file\nbpffs: /sys/fs/bpf/x\nmanifests: /m\n",
        )
        .unwrap();
        let args = RunArgs {
            node_name: Some("from-flag".into()),
            config: Some(file),
            ..Default::default()
        };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node.node_name, "from-flag");
        assert_eq!(cfg.bpffs, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(cfg.source, SourceConfig::Manifests(PathBuf::from("/m")));
        assert_eq!(cfg.min_sync_period, Duration::ZERO);
        assert_eq!(cfg.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(cfg.pod_devices, vec!["veth*", "lxc*", "cali*"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_config_key_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("lb-config-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.yaml");
        std::fs::write(&file, "nodename: typo\n").unwrap();
        let err = RunArgs {
            config: Some(file.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_manifests_the_cluster_is_the_source() {
        let cfg = RunArgs {
            api_server: Some("https://10.0.0.1:6443, https://10.0.0.2:6443".into()),
            metrics_bind: Some("".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            cfg.source,
            SourceConfig::Kube {
                kubeconfig: None,
                api_servers: vec![
                    "https://10.0.0.1:6443".to_string(),
                    "https://10.0.0.2:6443".to_string()
                ]
            }
        );
        assert_eq!(cfg.min_sync_period, Duration::from_secs(1));
        assert_eq!(cfg.metrics_bind, None, "empty disables");
    }

    #[test]
    fn conntrack_sizes_scale_with_the_machine_and_flags_win() {
        use lb_common::map_sizes::ct_flows_default;
        // kube-proxy's formula: 32768 per CPU, at least 131072; others half.
        for (cpus, tcp, other) in [
            (1, 131_072, 65_536),
            (4, 131_072, 65_536),
            (8, 262_144, 131_072),
            (64, 2_097_152, 1_048_576),
        ] {
            assert_eq!(ct_flows_default(cpus), (tcp, other), "{cpus} CPUs");
        }
        let cfg = RunArgs {
            manifests: Some("/m".into()),
            ct_max_tcp: Some(500_000),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.ct_max_tcp, 500_000);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        assert_eq!(cfg.ct_max_other, ct_flows_default(cpus).1);
        for bad in [0, 10, (1 << 30) + 1] {
            let err = RunArgs {
                manifests: Some("/m".into()),
                ct_max_other: Some(bad),
                ..Default::default()
            }
            .resolve()
            .unwrap_err();
            assert!(err.to_string().contains("ct-max-other"), "{err}");
        }
    }

    #[test]
    fn durations_and_bad_values() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("fast").is_err());
        let err = RunArgs {
            healthz_bind: Some("nowhere".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.to_string().contains("--healthz-bind \"nowhere\""),
            "{err}"
        );
        for (flag, args) in [
            (
                "--health-timeout",
                RunArgs {
                    health_timeout: Some("0s".into()),
                    ..Default::default()
                },
            ),
            (
                "--service-proxy-name",
                RunArgs {
                    service_proxy_name: Some("not a label!".into()),
                    ..Default::default()
                },
            ),
            (
                "--nodeport-range",
                RunArgs {
                    nodeport_range: Some("32767-30000".into()),
                    ..Default::default()
                },
            ),
        ] {
            let err = args.resolve().unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let cfg = RunArgs {
            service_proxy_name: Some("lb-canary.v2".into()),
            health_timeout: Some("90s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.node.service_proxy_name.as_deref(), Some("lb-canary.v2"));
        assert_eq!(cfg.health_timeout, Duration::from_secs(90));
    }
}
