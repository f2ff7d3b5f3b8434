//! Compact records of the objects kept for the whole cluster: only what
//! the translation reads, in a fraction of the API object's size (an
//! EndpointSlice endpoint is ~350 bytes as `k8s-openapi` holds it, before
//! its strings; here it is a parsed address, three conditions, its node and
//! its zone hints).

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
    jiff::Timestamp,
};

use super::cluster::{
    ANNOTATION_ALGORITHM, ANNOTATION_FORWARDING_MODE, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
};

/// The annotation the endpointslice controller sets to when the change
/// that produced the slice happened.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// An EndpointSlice as the translation reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// Its `kubernetes.io/service-name` label.
    pub service_name: Option<String>,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointRecord>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    pub trigger_time: Option<String>,
    /// metadata.resourceVersion (a re-list keeps an unchanged record).
    pub resource_version: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

/// The first address of an endpoint, parsed, or its text when it is not an
/// IP address (reported, then skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Invalid(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// None: the endpoint lists no address.
    pub address: Option<EndpointAddress>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Shared among the endpoints of a slice on one node.
    pub node_name: Option<Arc<str>>,
    /// hints.forZones, when set.
    pub zone_hints: Option<Box<[Box<str>]>>,
    /// hints.forNodes, when set (trafficDistribution PreferSameNode).
    pub node_hints: Option<Box<[Box<str>]>>,
}

impl From<&EndpointSlice> for SliceRecord {
    fn from(slice: &EndpointSlice) -> Self {
        let meta = &slice.metadata;
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut node = |name: &str| -> Arc<str> {
            match nodes.iter().find(|n| &***n == name) {
                Some(n) => n.clone(),
                None => {
                    let n: Arc<str> = Arc::from(name);
                    nodes.push(n.clone());
                    n
                }
            }
        };
        SliceRecord {
            service_name: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .cloned(),
            address_type: slice.address_type.clone(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| {
                    let conditions = e.conditions.as_ref();
                    EndpointRecord {
                        address: e.addresses.first().map(|a| match a.parse::<IpAddr>() {
                            Ok(ip) => EndpointAddress::Ip(ip),
                            Err(_) => EndpointAddress::Invalid(a.as_str().into()),
                        }),
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                        node_name: e.node_name.as_deref().map(&mut node),
                        zone_hints: e
                            .hints
                            .as_ref()
                            .and_then(|h| h.for_zones.as_ref())
                            .map(|zones| zones.iter().map(|z| z.name.as_str().into()).collect()),
                        node_hints: e
                            .hints
                            .as_ref()
                            .and_then(|h| h.for_nodes.as_ref())
                            .map(|nodes| nodes.iter().map(|n| n.name.as_str().into()).collect()),
                    }
                })
                .collect(),
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME))
                .cloned(),
            resource_version: meta.resource_version.clone(),
        }
    }
}

/// A Service as the translation (and the directory source's endpointslice
/// controller) reads it. Fields keep the object's own text, not a parsed
/// form: the translation validates them and names the bad value in its
/// error, as before. A `k8s-openapi` Service is ~2 KB with its maps and
/// strings; this is a few hundred bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    /// metadata.resourceVersion (a re-list keeps an unchanged record).
    pub resource_version: Option<Box<str>>,
    /// metadata.creationTimestamp: the older of two Services claiming one
    /// ClusterIP keeps it.
    pub created: Option<Timestamp>,
    /// The `service.kubernetes.io/service-proxy-name` label.
    pub service_proxy_name: Option<Box<str>>,
    /// The `service.kubernetes.io/headless` label is present.
    pub headless_label: bool,
    /// The `lb/algorithm` annotation.
    pub algorithm: Option<Box<str>>,
    /// The `lb/forwarding-mode` annotation.
    pub forwarding_mode: Option<Box<str>>,
    /// None: the object has no spec.
    pub spec: Option<ServiceSpecRecord>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpecRecord {
    pub service_type: Option<Box<str>>,
    pub cluster_ip: Option<Box<str>>,
    pub cluster_ips: Option<Box<[Box<str>]>>,
    pub session_affinity: Option<Box<str>>,
    /// sessionAffinityConfig.clientIP.timeoutSeconds.
    pub affinity_timeout_s: Option<i32>,
    pub internal_traffic_policy: Option<Box<str>>,
    pub external_traffic_policy: Option<Box<str>>,
    pub ports: Box<[ServicePortRecord]>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    pub external_ips: Box<[Box<str>]>,
    pub health_check_node_port: Option<i32>,
    /// status.loadBalancer.ingress.
    pub ingress: Box<[IngressRecord]>,
    /// What the directory source derives EndpointSlices from (the API
    /// server's controller does that for the Kubernetes source).
    pub selector: Box<[(Box<str>, Box<str>)]>,
    pub publish_not_ready_addresses: bool,
    pub traffic_distribution: Option<Box<str>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePortRecord {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub port: i32,
    pub node_port: Option<i32>,
    pub target_port: Option<IntOrString>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressRecord {
    pub ip: Option<Box<str>>,
    /// ipMode Proxy: the load balancer proxies to the nodes itself.
    pub proxied: bool,
}

fn boxed(s: &Option<String>) -> Option<Box<str>> {
    s.as_deref().map(Box::from)
}

fn boxed_list(list: &Option<Vec<String>>) -> Box<[Box<str>]> {
    list.iter()
        .flatten()
        .map(|s| Box::from(s.as_str()))
        .collect()
}

impl From<&Service> for ServiceRecord {
    fn from(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let labels = meta.labels.as_ref();
        let spec = svc.spec.as_ref().map(|spec| ServiceSpecRecord {
            service_type: boxed(&spec.type_),
            cluster_ip: boxed(&spec.cluster_ip),
            cluster_ips: spec
                .cluster_ips
                .as_ref()
                .map(|ips| ips.iter().map(|ip| Box::from(ip.as_str())).collect()),
            session_affinity: boxed(&spec.session_affinity),
            affinity_timeout_s: spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds),
            internal_traffic_policy: boxed(&spec.internal_traffic_policy),
            external_traffic_policy: boxed(&spec.external_traffic_policy),
            ports: spec
                .ports
                .iter()
                .flatten()
                .map(|p| ServicePortRecord {
                    name: boxed(&p.name),
                    protocol: boxed(&p.protocol),
                    port: p.port,
                    node_port: p.node_port,
                    target_port: p.target_port.clone(),
                })
                .collect(),
            load_balancer_source_ranges: boxed_list(&spec.load_balancer_source_ranges),
            external_ips: boxed_list(&spec.external_ips),
            health_check_node_port: spec.health_check_node_port,
            ingress: svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .map(|entry| IngressRecord {
                    ip: boxed(&entry.ip),
                    proxied: entry.ip_mode.as_deref() == Some("Proxy"),
                })
                .collect(),
            selector: spec
                .selector
                .iter()
                .flatten()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
                .collect(),
            publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
            traffic_distribution: boxed(&spec.traffic_distribution),
        });
        ServiceRecord {
            resource_version: boxed(&meta.resource_version),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            service_proxy_name: labels
                .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
                .map(|v| Box::from(v.as_str())),
            headless_label: labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)),
            algorithm: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_ALGORITHM))
                .map(|v| Box::from(v.as_str())),
            forwarding_mode: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_FORWARDING_MODE))
                .map(|v| Box::from(v.as_str())),
            spec,
        }
    }
}
