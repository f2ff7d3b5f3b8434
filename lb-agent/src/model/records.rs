//! Compact records of the objects kept for the whole cluster: only what
//! the translation reads, in a fraction of the API object's size (an
//! EndpointSlice endpoint is ~350 bytes as `k8s-openapi` holds it, before
//! its strings; here it is a parsed address, three conditions, its node and
//! its zone hints).

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::cluster::LABEL_SERVICE_NAME;

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
