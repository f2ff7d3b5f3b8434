//! The incremental translation equals a translation from scratch: random
//! sequences of changes (Services of every type, slices, Nodes, node
//! addresses; conflicting ClusterIPs, externalIPs, LoadBalancer IPs,
//! NodePorts and health-check ports; type changes; deletions) go through
//! `Translator::update`, and after every step its state must equal
//! `translate_with` on the same objects, and its `Delta` must name exactly
//! what differs from the step before.

use std::{net::IpAddr, sync::Arc};

use lb_agent::model::{
    Change, ChangeTracker, DesiredState, NodeConfig, ObjectKey, Translator, translate_with,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const SERVICES: usize = 5;
const SLICES: usize = 6;

#[derive(Clone, Debug)]
struct ServiceSpec {
    kind: usize,
    cluster_ip: usize,
    dual: bool,
    external_ip: Option<usize>,
    lb_ip: Option<usize>,
    node_port: usize,
    health_port: usize,
    etp_local: bool,
    itp_local: bool,
    udp: bool,
    affinity: bool,
    ranges: bool,
    created: usize,
    invalid: bool,
}

#[derive(Clone, Debug)]
struct SliceSpec {
    service: usize,
    v6: bool,
    endpoints: Vec<(usize, bool, bool, bool, bool)>,
}

#[derive(Clone, Debug)]
enum Op {
    Service(usize, ServiceSpec),
    DeleteService(usize),
    Slice(usize, SliceSpec),
    DeleteSlice(usize),
    Zone(Option<usize>),
    NodeAddresses(usize),
}

fn service_spec() -> impl Strategy<Value = ServiceSpec> {
    (
        (
            0usize..4,
            0usize..3,
            any::<bool>(),
            prop::option::of(0usize..3),
        ),
        (prop::option::of(0usize..3), 0usize..2, 0usize..2),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        (any::<bool>(), 0usize..3, prop::bool::weighted(0.05)),
    )
        .prop_map(
            |(
                (kind, cluster_ip, dual, external_ip),
                (lb_ip, node_port, health_port),
                (etp_local, itp_local, udp, affinity),
                (ranges, created, invalid),
            )| ServiceSpec {
                kind,
                cluster_ip,
                dual,
                external_ip,
                lb_ip,
                node_port,
                health_port,
                etp_local,
                itp_local,
                udp,
                affinity,
                ranges,
                created,
                invalid,
            },
        )
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        0usize..SERVICES,
        prop::bool::weighted(0.2),
        prop::collection::vec(
            (
                0usize..6,
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                prop::bool::weighted(0.3),
            ),
            0..4,
        ),
    )
        .prop_map(|(service, v6, endpoints)| SliceSpec {
            service,
            v6,
            endpoints,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..SERVICES, service_spec()).prop_map(|(i, s)| Op::Service(i, s)),
        2 => (0usize..SERVICES).prop_map(Op::DeleteService),
        6 => (0usize..SLICES, slice_spec()).prop_map(|(i, s)| Op::Slice(i, s)),
        2 => (0usize..SLICES).prop_map(Op::DeleteSlice),
        1 => prop::option::of(0usize..2).prop_map(Op::Zone),
        1 => (0usize..3).prop_map(Op::NodeAddresses),
    ]
}

fn service(i: usize, s: &ServiceSpec) -> Value {
    let kind = ["ClusterIP", "NodePort", "LoadBalancer", "ClusterIP"][s.kind];
    let mut cluster_ips = vec![json!(format!("10.96.0.{}", s.cluster_ip + 1))];
    let mut families = vec![json!("IPv4")];
    if s.dual {
        cluster_ips.push(json!(format!("fd00::{}", s.cluster_ip + 1)));
        families.push(json!("IPv6"));
    }
    let mut ports = vec![
        json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
        "nodePort": 30000 + s.node_port}),
    ];
    if s.udp {
        ports.push(
            json!({"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP",
            "nodePort": 30100 + s.node_port}),
        );
    }
    let mut spec = json!({
        "type": kind,
        "clusterIP": cluster_ips[0],
        "clusterIPs": cluster_ips,
        "ipFamilies": families,
        "ports": ports,
        "externalTrafficPolicy": if s.etp_local { "Local" } else { "Cluster" },
        "internalTrafficPolicy": if s.itp_local { "Local" } else { "Cluster" },
    });
    if s.kind == 3 {
        // A headless Service among the others.
        spec["clusterIP"] = json!("None");
        spec["clusterIPs"] = json!(["None"]);
    }
    if let Some(e) = s.external_ip {
        spec["externalIPs"] = json!([format!("192.0.2.{}", e + 1)]);
    }
    if s.kind == 2 && s.etp_local {
        spec["healthCheckNodePort"] = json!(32000 + s.health_port);
    }
    if s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    if s.kind == 2 && s.ranges {
        spec["loadBalancerSourceRanges"] = json!(["198.51.100.0/24", "10.0.0.0/8"]);
    }
    if s.invalid {
        spec["sessionAffinity"] = json!("Sometimes");
    }
    let mut svc = json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "ns",
            "creationTimestamp": format!("2020-01-0{}T00:00:00Z", s.created + 1)},
        "spec": spec,
    });
    if s.kind == 2
        && let Some(lb) = s.lb_ip
    {
        svc["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", lb + 1)}]}});
    }
    svc
}

fn slice(i: usize, s: &SliceSpec) -> Value {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|&(addr, ready, serving, here, terminating)| {
            let ip = if s.v6 {
                format!("fd10::{}", addr + 1)
            } else {
                format!("10.0.0.{}", addr + 1)
            };
            json!({"addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": if here { "node" } else { "other" },
                "hints": {"forZones": [{"name": if addr % 2 == 0 { "a" } else { "b" }}]}})
        })
        .collect();
    json!({
        "metadata": {"name": format!("slice-{i}"), "namespace": "ns",
            "labels": {"kubernetes.io/service-name": format!("svc-{}", s.service)}},
        "addressType": if s.v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    })
}

fn node_object(zone: Option<usize>) -> Value {
    match zone {
        Some(z) => {
            let zone = ["a", "b"][z];
            json!({"metadata": {"name": "node", "labels": {"topology.kubernetes.io/zone": zone}}})
        }
        None => json!({"metadata": {"name": "node"}}),
    }
}

fn node_config(variant: usize) -> NodeConfig {
    let addresses: Vec<IpAddr> = match variant {
        0 => vec!["172.16.0.1".parse().unwrap()],
        1 => vec![
            "172.16.0.1".parse().unwrap(),
            "10.0.0.9".parse().unwrap(),
            "fd20::1".parse().unwrap(),
        ],
        // A node address that is also a LoadBalancer IP (k3s' ServiceLB).
        _ => vec!["203.0.113.1".parse().unwrap()],
    };
    NodeConfig {
        node_name: "node".into(),
        nodeport_addresses: addresses.clone(),
        node_ips: addresses.clone(),
        host_addresses: addresses
            .iter()
            .copied()
            .chain(["10.0.0.6".parse().unwrap()])
            .collect(),
        ..NodeConfig::default()
    }
}

fn change(op: &Op) -> Option<Change> {
    let key = |kind: &str, i: usize| ObjectKey::new("ns", format!("{kind}-{i}"));
    Some(match op {
        Op::Service(i, s) => Change::Service(
            key("svc", *i),
            Some(Arc::new(serde_json::from_value(service(*i, s)).unwrap())),
        ),
        Op::DeleteService(i) => Change::Service(key("svc", *i), None),
        Op::Slice(i, s) => Change::EndpointSlice(
            key("slice", *i),
            Some(Arc::new(serde_json::from_value(slice(*i, s)).unwrap())),
        ),
        Op::DeleteSlice(i) => Change::EndpointSlice(key("slice", *i), None),
        Op::Zone(z) => Change::Node(
            "node".into(),
            Some(Arc::new(serde_json::from_value(node_object(*z)).unwrap())),
        ),
        Op::NodeAddresses(_) => return None,
    })
}

/// The delta names every difference between two desired states, and only those.
fn check_delta(before: &DesiredState, after: &DesiredState, delta: &lb_agent::model::Delta) {
    for (fk, old) in &delta.frontends {
        assert_eq!(
            before.frontends.get(fk),
            old.as_ref(),
            "{fk}: wrong prior value"
        );
        assert_ne!(
            after.frontends.get(fk),
            old.as_ref(),
            "{fk}: named but unchanged"
        );
    }
    let keys: std::collections::BTreeSet<_> = before
        .frontends
        .keys()
        .chain(after.frontends.keys())
        .collect();
    for fk in keys {
        if before.frontends.get(fk) != after.frontends.get(fk) {
            assert!(
                delta.frontends.contains_key(fk),
                "{fk} changed but is not in the delta"
            );
        }
    }
    let addrs: std::collections::BTreeSet<_> = before
        .addresses
        .keys()
        .chain(after.addresses.keys())
        .collect();
    for a in addrs {
        if before.addresses.get(a) != after.addresses.get(a) {
            assert!(
                delta.addresses.contains(a),
                "address {a:?} changed but is not in the delta"
            );
        }
    }
    let ranges: std::collections::BTreeSet<_> = before
        .source_ranges
        .keys()
        .chain(after.source_ranges.keys())
        .collect();
    for ip in ranges {
        if before.source_ranges.get(ip) != after.source_ranges.get(ip) {
            assert!(
                delta.source_ranges.contains(ip),
                "source ranges of {ip} not in the delta"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_translation_equals_translation_from_scratch(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut tracker = ChangeTracker::default();
        let mut node = node_config(0);
        let mut translator = Translator::new(node.clone());
        let mut owners = lb_agent::model::Owners::new();
        for (step, op) in ops.iter().enumerate() {
            match change(op) {
                Some(c) => tracker.apply(c),
                None => if let Op::NodeAddresses(v) = op { node = node_config(*v) },
            }
            let before = translator.desired().clone();
            let old_problems = translator.problems();
            let dirty = tracker.take_dirty();
            let delta = translator.update(&tracker, &node, &dirty);
            let scratch = translate_with(tracker.state(), &node, &owners);
            let got = translator.translation();
            prop_assert_eq!(&got.desired, &scratch.desired, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.problems, &scratch.problems, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.ip_owners, &scratch.ip_owners, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.owners, &scratch.owners, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.no_local_endpoints, &scratch.no_local_endpoints, "step {}", step);
            check_delta(&before, &got.desired, &delta);
            for p in &delta.new_problems {
                prop_assert!(!old_problems.contains(p) && got.problems.contains(p));
            }
            for p in &delta.resolved_problems {
                prop_assert!(old_problems.contains(p) && !got.problems.contains(p));
            }
            owners = scratch.owners;
        }
    }
}
