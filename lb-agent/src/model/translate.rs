//! kube-proxy's Service semantics as a pure function:
//! (ClusterState, NodeConfig) -> DesiredState, plus the problems found in
//! objects that could not be used. A bad object is skipped whole; it never
//! changes what a good one programs.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use super::{
    ClusterState, NodeConfig, ObjectKey,
    cluster::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME},
    desired::{Backend, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol},
};

/// Default and ceiling of sessionAffinityConfig.clientIP.timeoutSeconds.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// An object (or part of one) that was not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// "Service default/web", "EndpointSlice default/web-abc".
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[derive(Debug, Default)]
pub struct Translation {
    pub desired: DesiredState,
    pub problems: Vec<Problem>,
}

/// One endpoint of one service port, after kube-proxy's condition rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EndpointInfo {
    addr: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

pub fn translate(state: &ClusterState, node: &NodeConfig) -> Translation {
    let mut out = Translation::default();
    let slices = slices_by_service(state);

    // Oldest Service first: when two claim one ClusterIP, the first keeps it,
    // as the API server's allocator would have had it.
    let mut services: Vec<(&ObjectKey, &Service)> = state.services.iter().collect();
    services.sort_by(|(ka, a), (kb, b)| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| ka.cmp(kb))
    });
    let mut ip_owner: BTreeMap<Ipv4Addr, &ObjectKey> = BTreeMap::new();

    for (key, svc) in services {
        let object = format!("Service {key}");
        let frontends = match service_frontends(key, svc, &slices, node, &mut out.problems) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(reason) => {
                out.problems.push(Problem { object, reason });
                continue;
            }
        };
        if let Some((ip, _)) = frontends.first()
            && let Some(owner) = ip_owner.get(ip)
        {
            out.problems.push(Problem {
                object,
                reason: format!("clusterIP {ip} is already used by Service {owner}"),
            });
            continue;
        }
        for (ip, ports) in frontends {
            ip_owner.insert(ip, key);
            out.desired.service_ips.insert(ip);
            for (fk, frontend) in ports {
                out.desired.frontends.insert(fk, frontend);
            }
        }
    }
    out.problems.sort();
    out
}

/// EndpointSlices grouped by the Service they belong to.
fn slices_by_service(
    state: &ClusterState,
) -> BTreeMap<ObjectKey, Vec<(&ObjectKey, &EndpointSlice)>> {
    let mut by_service: BTreeMap<ObjectKey, Vec<_>> = BTreeMap::new();
    for (key, slice) in &state.endpoint_slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            continue;
        };
        by_service
            .entry(ObjectKey::new(key.namespace.clone(), service.clone()))
            .or_default()
            .push((key, slice));
    }
    by_service
}

type ServiceFrontends = Vec<(Ipv4Addr, Vec<(FrontendKey, Frontend)>)>;

/// The frontends of one Service; Ok(None) when kube-proxy ignores it.
fn service_frontends(
    key: &ObjectKey,
    svc: &Service,
    slices: &BTreeMap<ObjectKey, Vec<(&ObjectKey, &EndpointSlice)>>,
    node: &NodeConfig,
    problems: &mut Vec<Problem>,
) -> Result<Option<ServiceFrontends>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Err("has no spec".into());
    };
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
    {
        return Ok(None);
    }
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let cluster_ip = match cluster_ipv4(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref())? {
        Some(ip) => ip,
        None => return Ok(None),
    };

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
            if t < 1 || t > MAX_AFFINITY_TIMEOUT_S as i32 {
                return Err(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
                ));
            }
            Some(t as u32)
        }
        Some(other) => return Err(format!("sessionAffinity {other:?} is not None or ClientIP")),
    };
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "internalTrafficPolicy {other:?} is not Cluster or Local"
            ));
        }
    };

    let ports = spec.ports.as_deref().unwrap_or_default();
    // Validate every port before using any: an invalid object is skipped whole.
    let mut checked = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().enumerate() {
        let number = port_number(port.port)
            .ok_or_else(|| format!("spec.ports[{i}].port {} is outside 1..=65535", port.port))?;
        match port.protocol.as_deref() {
            Some("SCTP") => {
                problems.push(Problem {
                    object: format!("Service {key}"),
                    reason: format!(
                        "spec.ports[{i}] ({number}/SCTP) skipped: SCTP is not supported"
                    ),
                });
                continue;
            }
            p => {
                let proto = Protocol::from_k8s(p).map_err(|e| format!("spec.ports[{i}]: {e}"))?;
                checked.push((port, number, proto));
            }
        }
    }

    let service_slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
    let mut frontends = Vec::new();
    for (port, number, proto) in checked {
        let port_name = port.name.as_deref().unwrap_or("");
        let endpoints = endpoints_for_port(port_name, proto, service_slices, node, problems);
        let (backends, drop_if_empty) = select_backends(&endpoints, internal_local);
        let fk = FrontendKey {
            addr: cluster_ip,
            port: number,
            proto,
        };
        frontends.push((
            fk,
            Frontend {
                service_port: service_port_name(key, port),
                kind: FrontendKind::ClusterIP,
                backends,
                drop_if_empty,
                internal_local,
                affinity_timeout_s,
            },
        ));
    }
    Ok(Some(vec![(cluster_ip, frontends)]))
}

fn service_port_name(key: &ObjectKey, port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{key}:{name}"),
        _ => key.to_string(),
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The IPv4 ClusterIP, None for headless / unallocated, Err when malformed.
fn cluster_ipv4(
    cluster_ip: Option<&str>,
    cluster_ips: Option<&[String]>,
) -> Result<Option<Ipv4Addr>, String> {
    let candidates: Vec<&str> = match cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => cluster_ip.into_iter().collect(),
    };
    for ip in &candidates {
        if ip.is_empty() || *ip == "None" {
            return Ok(None);
        }
        if ip.contains(':') {
            // IPv6 family: not programmed by this IPv4 datapath.
            continue;
        }
        return ip
            .parse::<Ipv4Addr>()
            .map(Some)
            .map_err(|_| format!("spec.clusterIP {ip:?} is not an IPv4 address"));
    }
    Ok(None)
}

/// kube-proxy's endpointslicecache: the endpoints of one service port, from
/// every slice of the Service, de-duplicated by ip:port.
fn endpoints_for_port(
    port_name: &str,
    proto: Protocol,
    slices: &[(&ObjectKey, &EndpointSlice)],
    node: &NodeConfig,
    problems: &mut Vec<Problem>,
) -> Vec<EndpointInfo> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), EndpointInfo> = BTreeMap::new();
    for (slice_key, slice) in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(slice_port) = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::from_k8s(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        // A slice port without a number is skipped, as kube-proxy does.
        let Some(port) = slice_port.port.and_then(port_number) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(addr) = first.parse::<Ipv4Addr>() else {
                problems.push(Problem {
                    object: format!("EndpointSlice {slice_key}"),
                    reason: format!(
                        "endpoint address {first:?} is not an IPv4 address; endpoint skipped"
                    ),
                });
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let info = EndpointInfo {
                addr,
                port,
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                local: endpoint.node_name.as_deref() == Some(node.node_name.as_str()),
            };
            match by_addr.get(&(addr, port)) {
                // A non-terminating duplicate wins over a terminating one.
                Some(existing) if !existing.terminating => {}
                _ => {
                    by_addr.insert((addr, port), info);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// Ready endpoints, else serving-terminating ones (kube-proxy's fallback).
fn usable(endpoints: &[&EndpointInfo]) -> Vec<Backend> {
    let ready: Vec<Backend> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
            terminating: false,
        })
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
            terminating: true,
        })
        .collect()
}

/// The backend set for in-cluster traffic and whether an empty set drops.
fn select_backends(endpoints: &[EndpointInfo], internal_local: bool) -> (Vec<Backend>, bool) {
    let all: Vec<&EndpointInfo> = endpoints.iter().collect();
    let cluster = usable(&all);
    if !internal_local {
        return (cluster, false);
    }
    let local: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.local).collect();
    let local = usable(&local);
    // Endpoints exist, just not here: kube-proxy drops rather than rejects.
    let drop_if_empty = local.is_empty() && !cluster.is_empty();
    (local, drop_if_empty)
}
