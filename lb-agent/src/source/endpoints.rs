//! EndpointSlices for the directory source, made the way Kubernetes'
//! controllers make them: derived from Pods for selector Services (the
//! endpointslice controller) and mirrored from custom Endpoints objects
//! (the endpointslice mirroring controller).

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod},
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::model::{
    ObjectKey, ServiceRecord, cluster::LABEL_SERVICE_NAME, records::ServicePortRecord,
};

/// Labels a selector requires, all of which the pod must carry.
fn selects(selector: &[(Box<str>, Box<str>)], pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(&**k)).map(String::as_str) == Some(&**v))
}

/// EndpointSlice addressType of an address, None when it is not one.
fn address_type(ip: &str) -> Option<&'static str> {
    match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(_) => Some("IPv4"),
        std::net::IpAddr::V6(_) => Some("IPv6"),
    }
}

/// The pod's address of each family (status.podIPs, else status.podIP),
/// as the endpointslice controller makes one slice per family.
fn pod_ips(pod: &Pod) -> Vec<(&'static str, String)> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<String> = match status.pod_ips.as_ref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.clone()).collect(),
        _ => status.pod_ip.clone().into_iter().collect(),
    };
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for ip in listed {
        if let Some(family) = address_type(&ip)
            && !out.iter().any(|(f, _)| *f == family)
        {
            out.push((family, ip));
        }
    }
    out
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// The number a Service port's targetPort means on this pod, if any.
fn resolve_target_port(port: &ServicePortRecord, pod: &Pod) -> Option<i32> {
    let proto = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            // A numeric string is a number, as the API server treats it.
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            let spec = pod.spec.as_ref()?;
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == proto)
                        .then_some(p.container_port)
                })
        }
    }
}

fn slice_meta(namespace: &str, name: String, service: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(
            LABEL_SERVICE_NAME.to_string(),
            service.to_string(),
        )])),
        ..Default::default()
    }
}

/// Slices for a selector Service from the pods it selects. Pods whose named
/// ports resolve to different numbers land in different slices, each with
/// its own port numbers, as the endpointslice controller groups them.
pub fn derive_slices(
    key: &ObjectKey,
    service: &ServiceRecord,
    pods: &BTreeMap<ObjectKey, Arc<Pod>>,
    node_zones: &BTreeMap<String, String>,
) -> Vec<EndpointSlice> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let selector = &spec.selector;
    if selector.is_empty() {
        return Vec::new();
    }
    let publish_not_ready = spec.publish_not_ready_addresses;
    // trafficDistribution, as the endpointslice controller hints it (the
    // proxy decides whether to use the hints): PreferSameZone (and its old
    // name PreferClose) hints every endpoint for its own zone;
    // PreferSameNode for its own node, and its zone too, so proxies that
    // do not know node hints fall back to the zone (KEP-3015).
    let prefer_same_node = spec.traffic_distribution.as_deref() == Some("PreferSameNode");
    let prefer_zone = prefer_same_node
        || matches!(
            spec.traffic_distribution.as_deref(),
            Some("PreferClose") | Some("PreferSameZone")
        );
    let ports = &spec.ports;

    // (family, resolved port list) -> endpoints, so each group becomes one slice.
    type Group = (&'static str, Vec<(String, String, i32)>);
    let mut groups: BTreeMap<Group, Vec<Endpoint>> = BTreeMap::new();
    for (pod_key, pod) in pods {
        if pod_key.namespace != key.namespace || !selects(selector, pod) || pod_finished(pod) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let resolved: Vec<(String, String, i32)> = ports
            .iter()
            .filter_map(|p| {
                let number = resolve_target_port(p, pod)?;
                let proto = p.protocol.as_deref().unwrap_or("TCP").to_string();
                Some((
                    p.name.as_deref().unwrap_or_default().to_string(),
                    proto,
                    number,
                ))
            })
            .collect();
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = pod_ready(pod);
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let zone = node_name.as_ref().and_then(|n| node_zones.get(n).cloned());
        let for_zones = zone
            .clone()
            .filter(|_| prefer_zone)
            .map(|name| vec![ForZone { name }]);
        let for_nodes = node_name
            .clone()
            .filter(|_| prefer_same_node)
            .map(|name| vec![ForNode { name }]);
        let hints = (for_zones.is_some() || for_nodes.is_some()).then_some(EndpointHints {
            for_zones,
            for_nodes,
        });
        for (family, ip) in ips {
            let endpoint = Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(publish_not_ready || (ready && !terminating)),
                    serving: Some(publish_not_ready || ready),
                    terminating: Some(terminating),
                }),
                zone: zone.clone(),
                node_name: node_name.clone(),
                hints: hints.clone(),
                target_ref: None,
                ..Default::default()
            };
            groups
                .entry((family, resolved.clone()))
                .or_default()
                .push(endpoint);
        }
    }

    groups
        .into_iter()
        .enumerate()
        .map(|(i, ((family, ports), endpoints))| EndpointSlice {
            metadata: slice_meta(
                &key.namespace,
                format!("{}-derived-{i}", key.name),
                &key.name,
            ),
            address_type: family.into(),
            endpoints,
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name: Some(name),
                        protocol: Some(protocol),
                        port: Some(port),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        })
        .collect()
}

/// Slices mirrored from a custom Endpoints object: one per subset, ready
/// addresses ready and notReadyAddresses not.
pub fn mirror_endpoints(key: &ObjectKey, endpoints: &Endpoints) -> Vec<EndpointSlice> {
    let mut slices = Vec::new();
    for (i, subset) in endpoints.subsets.iter().flatten().enumerate() {
        // One slice per family, as the mirroring controller makes them.
        let mut by_family: BTreeMap<&'static str, Vec<Endpoint>> = BTreeMap::new();
        let groups = [
            (subset.addresses.as_ref(), true),
            (subset.not_ready_addresses.as_ref(), false),
        ];
        for (addresses, ready) in groups {
            for address in addresses.into_iter().flatten() {
                let Some(family) = address_type(&address.ip) else {
                    continue;
                };
                by_family.entry(family).or_default().push(Endpoint {
                    addresses: vec![address.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    node_name: address.node_name.clone(),
                    ..Default::default()
                });
            }
        }
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                protocol: p.protocol.clone(),
                port: Some(p.port),
                app_protocol: None,
            })
            .collect();
        if by_family.is_empty() {
            by_family.insert("IPv4", Vec::new());
        }
        for (family, items) in by_family {
            let suffix = if family == "IPv6" { "-v6" } else { "" };
            slices.push(EndpointSlice {
                metadata: slice_meta(
                    &key.namespace,
                    format!("{}-mirrored-{i}{suffix}", key.name),
                    &key.name,
                ),
                address_type: family.into(),
                endpoints: items,
                ports: Some(ports.clone()),
            });
        }
    }
    slices
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn pod(name: &str, ns: &str, ip: &str, ready: bool, extra: Value) -> (ObjectKey, Arc<Pod>) {
        let mut v = json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": if name.ends_with('b') { 9090 } else { 8080 }}
            ]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        merge(&mut v, extra);
        (
            ObjectKey::new(ns, name),
            Arc::new(serde_json::from_value(v).unwrap()),
        )
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn service(spec: Value) -> (ObjectKey, ServiceRecord) {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": spec}),
        )
        .unwrap();
        (ObjectKey::new("ns", "web"), (&svc).into())
    }

    /// (address, port, ready, serving, terminating) of every derived endpoint.
    fn endpoints(slices: &[EndpointSlice]) -> Vec<(String, i32, bool, bool, bool)> {
        let mut out = Vec::new();
        for s in slices {
            let port = s.ports.as_ref().unwrap()[0].port.unwrap();
            for e in &s.endpoints {
                let c = e.conditions.as_ref().unwrap();
                out.push((
                    e.addresses[0].clone(),
                    port,
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn derived_like_the_endpointslice_controller() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> = [
            pod("a", "ns", "10.0.0.1", true, json!({})),
            pod("b", "ns", "10.0.0.2", true, json!({})),
            pod("unready", "ns", "10.0.0.3", false, json!({})),
            pod(
                "gone",
                "ns",
                "10.0.0.4",
                true,
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
            pod(
                "done",
                "ns",
                "10.0.0.5",
                true,
                json!({"status": {"phase": "Succeeded"}}),
            ),
            pod("noip", "ns", "", true, json!({"status": {"podIP": null}})),
            pod("elsewhere", "other", "10.0.0.6", true, json!({})),
            pod(
                "unlabelled",
                "ns",
                "10.0.0.7",
                true,
                json!({"metadata": {"labels": {"app": "db"}}}),
            ),
        ]
        .into_iter()
        .collect();
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}),
        );
        let slices = derive_slices(&key, &svc, &pods, &BTreeMap::new());
        assert_eq!(
            endpoints(&slices),
            vec![
                ("10.0.0.1".into(), 8080, true, true, false),
                ("10.0.0.2".into(), 9090, true, true, false),
                ("10.0.0.3".into(), 8080, false, false, false),
                ("10.0.0.4".into(), 8080, false, true, true),
            ]
        );
        assert_eq!(
            slices.len(),
            2,
            "pods resolving the named port differently get separate slices"
        );
        for s in &slices {
            assert_eq!(
                s.metadata.labels.as_ref().unwrap()[LABEL_SERVICE_NAME],
                "web"
            );
        }
    }

    #[test]
    fn dual_stack_pods_give_one_slice_per_family() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> = [
            pod(
                "a",
                "ns",
                "10.0.0.1",
                true,
                json!({"status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}}),
            ),
            pod("six", "ns", "fd00::2", true, json!({})),
        ]
        .into_iter()
        .collect();
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        let slices = derive_slices(&key, &svc, &pods, &BTreeMap::new());
        let got: Vec<(String, Vec<String>)> = slices
            .iter()
            .map(|s| {
                (
                    s.address_type.clone(),
                    s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("IPv4".to_string(), vec!["10.0.0.1".to_string()]),
                (
                    "IPv6".to_string(),
                    vec!["fd00::1".to_string(), "fd00::2".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn prefer_close_hints_each_endpoint_for_its_zone() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> = [pod("a", "ns", "10.0.0.1", true, json!({}))]
            .into_iter()
            .collect();
        let zones = BTreeMap::from([("n1".to_string(), "zone-a".to_string())]);
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "trafficDistribution": "PreferClose", "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        let slices = derive_slices(&key, &svc, &pods, &zones);
        let e = &slices[0].endpoints[0];
        assert_eq!(e.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            e.hints.as_ref().unwrap().for_zones.as_ref().unwrap()[0].name,
            "zone-a"
        );
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        assert!(
            derive_slices(&key, &svc, &pods, &zones)[0].endpoints[0]
                .hints
                .is_none(),
            "no hints without PreferClose"
        );
    }

    #[test]
    fn prefer_same_node_hints_each_endpoint_for_its_node_and_zone() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> = [pod("a", "ns", "10.0.0.1", true, json!({}))]
            .into_iter()
            .collect();
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "trafficDistribution": "PreferSameNode", "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        let zones = BTreeMap::from([("n1".to_string(), "zone-a".to_string())]);
        let hints = |zones: &BTreeMap<String, String>| {
            derive_slices(&key, &svc, &pods, zones)[0].endpoints[0]
                .hints
                .clone()
                .expect("hints")
        };
        let both = hints(&zones);
        let names = |v: Option<Vec<String>>| v.unwrap_or_default();
        assert_eq!(
            names(
                both.for_nodes
                    .map(|n| n.into_iter().map(|n| n.name).collect())
            ),
            ["n1"]
        );
        assert_eq!(
            names(
                both.for_zones
                    .map(|z| z.into_iter().map(|z| z.name).collect())
            ),
            ["zone-a"]
        );
        // A node without a zone label: the node hint alone.
        let node_only = hints(&BTreeMap::new());
        assert!(node_only.for_nodes.is_some() && node_only.for_zones.is_none());
    }

    #[test]
    fn publish_not_ready_addresses_marks_everything_ready() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> =
            [pod("unready", "ns", "10.0.0.3", false, json!({}))]
                .into_iter()
                .collect();
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true, "ports": [{"port": 80, "targetPort": 8080}]}),
        );
        assert_eq!(
            endpoints(&derive_slices(&key, &svc, &pods, &BTreeMap::new())),
            vec![("10.0.0.3".into(), 8080, true, true, false)]
        );
    }

    #[test]
    fn unresolvable_named_port_leaves_the_pod_out() {
        let pods: BTreeMap<ObjectKey, Arc<Pod>> = [pod("a", "ns", "10.0.0.1", true, json!({}))]
            .into_iter()
            .collect();
        let (key, svc) = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "grpc"}]}),
        );
        assert!(endpoints(&derive_slices(&key, &svc, &pods, &BTreeMap::new())).is_empty());
    }

    #[test]
    fn endpoints_are_mirrored_per_subset() {
        let e: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "ns"},
            "subsets": [{"addresses": [{"ip": "10.1.0.1"}], "notReadyAddresses": [{"ip": "10.1.0.2"}], "ports": [{"port": 5432}]}],
        }))
        .unwrap();
        let slices = mirror_endpoints(&ObjectKey::new("ns", "db"), &e);
        assert_eq!(
            endpoints(&slices),
            vec![
                ("10.1.0.1".into(), 5432, true, true, false),
                ("10.1.0.2".into(), 5432, false, false, false)
            ]
        );
    }
}
