//! What the datapath must hold: frontends and their backend lists, in a
//! form the sync step diffs against the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, frontend_kind};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Kubernetes' spelling; None for SCTP and anything unknown.
    pub fn from_k8s(s: Option<&str>) -> Result<Self, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            other => Err(format!(
                "protocol {other:?} is not supported (TCP and UDP are)"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// {address, port, protocol} of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
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
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Used only because nothing is ready (serving-terminating fallback).
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// namespace/name:port-name, kube-proxy's ServicePortName.
    pub service_port: String,
    pub kind: FrontendKind,
    /// Sorted; empty means "reject" (or drop, with `drop_if_empty`).
    pub backends: Vec<Backend>,
    /// Endpoints that exist but take no new flows (terminating or not ready):
    /// kept in the backend map so established TCP flows to them finish.
    pub standby: Vec<Backend>,
    /// New flows pick from a Maglev table instead of a random slot.
    pub maglev: bool,
    /// Drop rather than reject when empty (traffic policy Local, endpoints elsewhere).
    pub drop_if_empty: bool,
    pub internal_local: bool,
    /// sessionAffinity ClientIP timeout; None without affinity.
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Service IPs whose undeclared ports and protocols are rejected.
    pub service_ips: BTreeSet<Ipv4Addr>,
}
