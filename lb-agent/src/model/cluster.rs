//! The cluster as the sources report it: Kubernetes objects keyed by
//! namespace/name, plus this node's settings.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;

use k8s_openapi::api::core::v1::Node;

use super::{
    desired::Protocol,
    records::{ServiceRecord, SliceRecord},
};

/// namespace/name of an object. Shared strings: the translation and the
/// sync index objects by key in many places, and a clone costs no copy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Every object the translation reads. Sources (manifests directory,
/// Kubernetes API) fill it the same way. Objects are shared (`Arc`), as
/// kube-rs reflector stores hand them out, so assembling a state is cheap.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectKey, Arc<ServiceRecord>>,
    /// EndpointSlices by their own namespace/name; the Service they belong
    /// to is their `kubernetes.io/service-name` label.
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<SliceRecord>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// ServiceCIDR objects (networking.k8s.io/v1) by name: their CIDRs.
    pub service_cidrs: BTreeMap<String, Arc<Vec<IpNet>>>,
}

/// This node's view: who we are and which addresses are ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    /// Source address for hairpin flows (a pod reaching itself through its
    /// Service), per family.
    pub hairpin_snat_addr: Ipv4Addr,
    pub hairpin_snat_addr6: Ipv6Addr,
    /// Maglev for Services without the `lb/algorithm` annotation.
    pub default_maglev: bool,
    /// spec.externalIPs allowed (None: all, as kube-proxy does).
    pub external_ip_cidrs: Option<Vec<IpNet>>,
    /// --service-proxy-name: serve only the Services with this
    /// `service.kubernetes.io/service-proxy-name` label (None: only those
    /// without the label, as kube-proxy).
    pub service_proxy_name: Option<String>,
    /// Addresses NodePorts answer on: the node devices' addresses, filtered
    /// by --nodeport-addresses.
    pub nodeport_addresses: Vec<IpAddr>,
    /// The node's primary addresses (its masquerade addresses, per family):
    /// with the NodePort addresses, what loadBalancerSourceRanges must admit
    /// for the Service's LB IPs to be admitted as sources too.
    pub node_ips: Vec<IpAddr>,
    /// Every address of the node's own devices: endpoints there are
    /// hostNetwork pods.
    pub host_addresses: BTreeSet<IpAddr>,
    /// --cluster-cidr: when set, ClusterIPs are also served to traffic from
    /// outside (sources outside these CIDRs), masqueraded to the node.
    pub cluster_cidrs: Vec<IpNet>,
    /// externalTrafficPolicy Cluster: masquerade every connection to a
    /// NodePort / LoadBalancer IP / externalIP, from outside and from pods,
    /// as kube-proxy does. Off, only what must be (outside to an endpoint on
    /// another node) is, and local endpoints see the client's address.
    pub masquerade_cluster_policy: bool,
    /// --service-cidr: Service CIDRs beside the cluster's ServiceCIDR
    /// objects (the directory source has none).
    pub service_cidrs: Vec<IpNet>,
    /// --default-forwarding-mode: how external traffic reaches endpoints
    /// on other nodes, for Services without the `lb/forwarding-mode`
    /// annotation.
    pub default_forwarding_mode: ForwardingMode,
}

/// How traffic from outside reaches an endpoint on another node
/// (externalTrafficPolicy Cluster), Cilium's `bpf-lb-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// Source-NATed to this node; the answers come back through it.
    #[default]
    Snat,
    /// Direct server return: the client's address is kept, and the
    /// endpoint's node answers the client itself.
    Dsr,
    /// DSR for TCP, SNAT for UDP (whose datagrams each carry the DSR
    /// option, which can push one past the path MTU).
    Hybrid,
}

impl ForwardingMode {
    /// The annotation's value.
    pub fn parse(text: &str) -> Option<ForwardingMode> {
        match text {
            "snat" => Some(ForwardingMode::Snat),
            "dsr" => Some(ForwardingMode::Dsr),
            "hybrid" => Some(ForwardingMode::Hybrid),
            _ => None,
        }
    }

    /// Whether flows of `proto` go by DSR.
    pub fn direct(self, proto: Protocol) -> bool {
        match self {
            ForwardingMode::Snat => false,
            ForwardingMode::Dsr => matches!(proto, Protocol::Tcp | Protocol::Udp),
            ForwardingMode::Hybrid => proto == Protocol::Tcp,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_name: "node".into(),
            hairpin_snat_addr: DEFAULT_HAIRPIN_SNAT_ADDR,
            hairpin_snat_addr6: DEFAULT_HAIRPIN_SNAT_ADDR6,
            default_maglev: false,
            external_ip_cidrs: None,
            service_proxy_name: None,
            nodeport_addresses: Vec::new(),
            node_ips: Vec::new(),
            host_addresses: BTreeSet::new(),
            cluster_cidrs: Vec::new(),
            masquerade_cluster_policy: true,
            service_cidrs: Vec::new(),
            default_forwarding_mode: ForwardingMode::Snat,
        }
    }
}

/// Link-local, never a pod or node address; like Cilium's 169.254.42.1.
pub const DEFAULT_HAIRPIN_SNAT_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// The IPv6 twin: a unique local address (fd00::/8, random global ID), so a
/// pod routes its answer to the node like any off-link address (a
/// link-local source would be answered on-link, past the node).
pub const DEFAULT_HAIRPIN_SNAT_ADDR6: Ipv6Addr =
    Ipv6Addr::new(0xfd6c, 0x6268, 0x6169, 0x7270, 0, 0, 0, 1);

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Per-Service load-balancing algorithm: `maglev` or `random`.
pub const ANNOTATION_ALGORITHM: &str = "lb/algorithm";
/// Per-Service forwarding of external traffic: `snat`, `dsr` or `hybrid`.
pub const ANNOTATION_FORWARDING_MODE: &str = "lb/forwarding-mode";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// The cluster autoscaler's taint on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's nodeEligible (KEP-3836): a node being deleted, or one the
/// cluster autoscaler has marked for removal, should get no new traffic
/// from load balancers, so its /healthz fails.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_eligibility_as_kube_proxy_judges_it() {
        let cases = [
            (serde_json::json!({"metadata": {"name": "n"}}), true),
            (
                serde_json::json!({"metadata": {"name": "n", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
                false,
            ),
            (
                serde_json::json!({"metadata": {"name": "n"}, "spec": {"taints": [
                    {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}),
                false,
            ),
            (
                serde_json::json!({"metadata": {"name": "n"}, "spec": {"taints": [
                    {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
                true,
            ),
        ];
        for (node, eligible) in cases {
            let parsed: Node = serde_json::from_value(node.clone()).unwrap();
            assert_eq!(node_eligible(&parsed), eligible, "{node}");
        }
    }
}
