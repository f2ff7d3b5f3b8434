//! What the datapath must hold: frontends and their backend lists, in a
//! form the sync step diffs against the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use lb_common::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, frontend_kind,
};
use serde::Serialize;

use super::ObjectKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            IPPROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Kubernetes' spelling.
    pub fn from_k8s(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!(
                "protocol {other:?} is not supported (TCP, UDP and SCTP are)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Which traffic a frontend entry serves: in-cluster (from pods and the
/// node, on pod devices) or external (from outside, on node devices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Internal,
    External,
}

impl Scope {
    pub fn code(self) -> u8 {
        match self {
            Scope::Internal => SCOPE_INTERNAL,
            Scope::External => SCOPE_EXTERNAL,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            SCOPE_INTERNAL => Some(Scope::Internal),
            SCOPE_EXTERNAL => Some(Scope::External),
            _ => None,
        }
    }
}

/// {address, port, protocol, scope} of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ip:port, [ip6]:port
        let at = std::net::SocketAddr::new(self.addr, self.port);
        write!(f, "{at}/{}", self.proto)?;
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

impl FrontendKind {
    pub fn code(self) -> u32 {
        match self {
            FrontendKind::ClusterIP => frontend_kind::CLUSTER_IP,
            FrontendKind::NodePort => frontend_kind::NODE_PORT,
            FrontendKind::LoadBalancer => frontend_kind::LOAD_BALANCER,
            FrontendKind::ExternalIP => frontend_kind::EXTERNAL_IP,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        match code & frontend_kind::MASK {
            frontend_kind::CLUSTER_IP => Some(FrontendKind::ClusterIP),
            frontend_kind::NODE_PORT => Some(FrontendKind::NodePort),
            frontend_kind::LOAD_BALANCER => Some(FrontendKind::LoadBalancer),
            frontend_kind::EXTERNAL_IP => Some(FrontendKind::ExternalIP),
            _ => None,
        }
    }
}

/// One endpoint a frontend balances to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Used only because nothing is ready (serving-terminating fallback).
    pub terminating: bool,
    /// Not on this node: external traffic to it is source-NATed.
    pub remote: bool,
    /// Its address is one of this node's own (a hostNetwork pod): never
    /// masqueraded (the answer to the node would stay on loopback).
    pub on_node: bool,
}

/// Which endpoints of a Service port a backend set holds: kube-proxy's
/// cluster-wide set (after topology hints) or the node-local one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    Cluster,
    Local,
}

/// Names a backend set: one per Service port, protocol, family and selection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSetKey {
    /// namespace/name:port-name.
    pub service_port: Arc<str>,
    pub proto: Protocol,
    pub v6: bool,
    pub selection: Selection,
}

impl fmt::Display for BackendSetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = if self.v6 { "IPv6" } else { "IPv4" };
        let selection = match self.selection {
            Selection::Cluster => "cluster",
            Selection::Local => "local",
        };
        write!(
            f,
            "{}/{} {family} {selection}",
            self.service_port, self.proto
        )
    }
}

/// The backends a frontend balances to. Every frontend of a Service port
/// that selects the same endpoints (its ClusterIP, NodePorts on each node
/// address, LoadBalancer IPs, in each scope) shares one set, stored once in
/// the maps with one slot list and one Maglev table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSet {
    pub key: BackendSetKey,
    /// Sorted; empty means "reject" (or drop, with `drop_if_empty`).
    pub backends: Vec<Backend>,
    /// Endpoints that exist but take no new flows (terminating or not ready):
    /// kept in the backend map so established TCP flows to them finish.
    pub standby: Vec<Backend>,
    /// New flows pick from a Maglev table instead of a random slot.
    pub maglev: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// namespace/name:port-name, kube-proxy's ServicePortName.
    /// (Shared with its backend set's key.)
    pub service_port: Arc<str>,
    pub kind: FrontendKind,
    /// Shared with the Service port's other frontends that select the same
    /// endpoints.
    pub set: Arc<BackendSet>,
    /// Drop rather than reject when empty (traffic policy Local, endpoints elsewhere).
    pub drop_if_empty: bool,
    pub internal_local: bool,
    /// sessionAffinity ClientIP timeout; None without affinity.
    pub affinity_timeout_s: Option<u32>,
    /// Clients are checked against `DesiredState::source_ranges` of the address.
    pub source_ranges: bool,
    /// Every new flow is source-NATed to the node: a ClusterIP from outside,
    /// and NodePorts / LoadBalancer IPs / externalIPs under policy Cluster.
    pub masquerade: bool,
    /// Direct server return (`lb/forwarding-mode`): from outside to an
    /// endpoint on another node, the client's address is kept and that
    /// node answers the client. External-scope entries only.
    pub dsr: bool,
}

/// What the datapath does with packets to a Service address that match no
/// frontend (an address entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressEntry {
    /// Undeclared ports and protocols are refused: ClusterIPs in the
    /// in-cluster scope only, as kube-proxy's nftables mode. From outside,
    /// other ports of an address may be the node's own; a LoadBalancer IP or
    /// externalIP may be a node's address too (k3s' ServiceLB, externalIPs
    /// set to node IPs), which answers to flows masqueraded to it arrive at.
    pub reject_undeclared: bool,
    /// Some frontend on the address has a usable backend: pings are answered.
    pub echo: bool,
}

/// healthCheckNodePort of a Service with externalTrafficPolicy Local.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    /// Endpoints on this node that external traffic may use.
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Service addresses (ClusterIPs, externalIPs, LoadBalancer IPs) per scope.
    pub addresses: BTreeMap<(IpAddr, Scope), AddressEntry>,
    /// loadBalancerSourceRanges per LoadBalancer IP.
    pub source_ranges: BTreeMap<IpAddr, BTreeSet<IpNet>>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// The cluster's Service CIDRs (ServiceCIDR objects and --service-cidr):
    /// traffic to an address in one that no Service holds is dropped.
    pub service_cidrs: BTreeSet<IpNet>,
    /// Every address a Service of the cluster holds (ClusterIPs,
    /// externalIPs, LoadBalancer IPs), ours or another proxy's, used or not
    /// (-> how many Services hold it): the Service CIDR drop must spare the
    /// ones inside a Service CIDR.
    pub allocated: BTreeMap<IpAddr, u32>,
}

impl DesiredState {
    /// Address entries from the frontends: every Service address (not the
    /// node addresses NodePorts live on), in the scopes it has frontends in.
    pub fn derive_addresses(&mut self) {
        let keys: BTreeSet<(IpAddr, Scope)> = self
            .frontends
            .keys()
            .map(|fk| (fk.addr, fk.scope))
            .collect();
        self.addresses = keys
            .into_iter()
            .filter_map(|(addr, scope)| Some(((addr, scope), self.address_entry(addr, scope)?)))
            .collect();
    }

    /// The address entry of one Service address in one scope, from the
    /// frontends there; None when only NodePorts (node addresses) are.
    pub fn address_entry(&self, addr: IpAddr, scope: Scope) -> Option<AddressEntry> {
        let first = FrontendKey {
            addr,
            port: 0,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        let last = FrontendKey {
            addr,
            port: u16::MAX,
            // The last protocol in the key's order.
            proto: Protocol::Sctp,
            scope: Scope::External,
        };
        let mut entry: Option<AddressEntry> = None;
        for (fk, frontend) in self.frontends.range(first..=last) {
            if fk.scope != scope || frontend.kind == FrontendKind::NodePort {
                continue;
            }
            let e = entry.get_or_insert_default();
            e.reject_undeclared =
                fk.scope == Scope::Internal && frontend.kind == FrontendKind::ClusterIP;
            e.echo |= !frontend.set.backends.is_empty();
        }
        entry
    }
}
