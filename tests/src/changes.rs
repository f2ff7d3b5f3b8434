//! Random sequences of cluster changes for the incremental-translation
//! property tests: Services of every type, slices, Nodes and node addresses
//! drawn from small pools, so ClusterIPs, externalIPs, LoadBalancer IPs,
//! nodePorts and health-check ports collide often.

use std::{net::IpAddr, sync::Arc};

use lb_agent::model::{Change, NodeConfig, ObjectKey};
use proptest::prelude::*;
use serde_json::{Value, json};

pub const SERVICES: usize = 5;
pub const SLICES: usize = 6;

#[derive(Clone, Debug)]
pub struct ServiceSpec {
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
pub struct SliceSpec {
    service: usize,
    v6: bool,
    /// Endpoints carry zone hints.
    hints: bool,
    endpoints: Vec<(usize, bool, bool, bool, bool)>,
}

#[derive(Clone, Debug)]
pub enum Op {
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
        any::<bool>(),
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
        .prop_map(|(service, v6, hints, endpoints)| SliceSpec {
            service,
            v6,
            hints,
            endpoints,
        })
}

pub fn op() -> impl Strategy<Value = Op> {
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
            let mut endpoint = json!({"addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": if here { "node" } else { "other" }});
            if s.hints {
                let zone = if addr % 2 == 0 { "a" } else { "b" };
                endpoint["hints"] = json!({"forZones": [{"name": zone}]});
            }
            endpoint
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

pub fn node_config(variant: usize) -> NodeConfig {
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

pub fn change(op: &Op) -> Option<Change> {
    let key = |kind: &str, i: usize| ObjectKey::new("ns", format!("{kind}-{i}"));
    Some(match op {
        Op::Service(i, s) => Change::Service(
            key("svc", *i),
            Some(Arc::new(
                (&serde_json::from_value::<k8s_openapi::api::core::v1::Service>(service(*i, s))
                    .unwrap())
                    .into(),
            )),
        ),
        Op::DeleteService(i) => Change::Service(key("svc", *i), None),
        Op::Slice(i, s) => Change::EndpointSlice(
            key("slice", *i),
            Some(Arc::new(
                (&serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(slice(
                    *i, s,
                ))
                .unwrap())
                    .into(),
            )),
        ),
        Op::DeleteSlice(i) => Change::EndpointSlice(key("slice", *i), None),
        Op::Zone(z) => Change::Node(
            "node".into(),
            Some(Arc::new(serde_json::from_value(node_object(*z)).unwrap())),
        ),
        Op::NodeAddresses(_) => return None,
    })
}
