//! Input fuzzing (proptest): manifest parsing and translation never panic,
//! invalid objects are rejected with a reason, and a bad object never
//! removes or alters what a good one programs.

use std::{path::Path, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    model::{ClusterState, NodeConfig, ObjectKey, translate, translate_with},
    source::manifests::parse_file,
};
use proptest::prelude::*;
use serde_json::{Value, json};

fn good() -> (Service, EndpointSlice) {
    let svc = serde_json::from_value(json!({
        "metadata": {"name": "good", "namespace": "default", "creationTimestamp": "2020-01-01T00:00:00Z"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap();
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "good-a", "namespace": "default", "labels": {"kubernetes.io/service-name": "good"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]
    }))
    .unwrap();
    (svc, slice)
}

fn any_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("10.96.0.1")),
        Just(json!("10.96.0.2")),
        Just(json!("None")),
        Just(json!("")),
        Just(json!("fd00::1")),
        Just(json!("300.1.1.1")),
        Just(json!("TCP")),
        Just(json!("UDP")),
        Just(json!("SCTP")),
        Just(json!("ClientIP")),
        Just(json!("Local")),
        Just(json!("maglev")),
        "[a-zA-Z0-9./:-]{0,12}".prop_map(Value::from),
    ]
}

fn any_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any_string(),
        any::<i64>().prop_map(Value::from),
        (-5i64..70000).prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

/// A well-formed Service that collides with the good one (same IP, its
/// own port) and has no creationTimestamp.
fn colliding_service() -> impl Strategy<Value = Value> {
    ("[a-z]{1,8}", 1u16..65535).prop_map(|(name, port)| {
        json!({"metadata": {"name": name, "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "x", "port": port}]}})
    })
}

/// Service-shaped JSON with arbitrary values where the real fields are.
fn any_service() -> impl Strategy<Value = Value> {
    prop_oneof![colliding_service(), any_shaped_service()]
}

fn any_shaped_service() -> impl Strategy<Value = Value> {
    (
        any_string(),
        proptest::collection::vec((any_scalar(), any_scalar(), any_scalar(), any_scalar()), 0..4),
        any_scalar(),
        any_scalar(),
        any_scalar(),
        any_scalar(),
        "[a-z]{1,8}",
    )
        .prop_map(|(ip, ports, typ, affinity, timeout, itp, name)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(n, port, proto, target)| json!({"name": n, "port": port, "protocol": proto, "targetPort": target}))
                .collect();
            json!({
                "metadata": {"name": name, "namespace": "default", "annotations": {"lb/algorithm": typ}},
                "spec": {"clusterIP": ip, "ports": ports, "type": typ, "sessionAffinity": affinity,
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}},
                         "internalTrafficPolicy": itp}
            })
        })
}

fn good_only() -> (Vec<String>, lb_agent::model::Owners) {
    let (svc, slice) = good();
    let state = state(vec![svc], vec![slice]);
    let owners = translate(&state, &NodeConfig::default()).owners;
    (frontends(&state, &owners), owners)
}

fn state(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    let mut st = ClusterState::default();
    for s in services {
        let key = ObjectKey::new(
            s.metadata.namespace.clone().unwrap(),
            s.metadata.name.clone().unwrap(),
        );
        st.services.insert(key, Arc::new((&s).into()));
    }
    for s in slices {
        let key = ObjectKey::new(
            s.metadata.namespace.clone().unwrap(),
            s.metadata.name.clone().unwrap(),
        );
        st.endpoint_slices.insert(key, Arc::new((&s).into()));
    }
    st
}

/// The good Service's frontends as programmed (key + backends).
fn frontends(state: &ClusterState, owners: &lb_agent::model::Owners) -> Vec<String> {
    translate_with(state, &NodeConfig::default(), owners)
        .desired
        .frontends
        .iter()
        .filter(|(_, f)| f.service_port.starts_with("default/good"))
        .map(|(k, f)| format!("{k} {:?} {:?}", f.set.backends, f.set.standby))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parsing_never_panics(text in ".{0,300}", yaml_ish in proptest::collection::vec(prop_oneof![
        Just("kind: Service\n"), Just("metadata: {name: x}\n"), Just("---\n"), Just("spec:\n  ports: [{port: 80}]\n"),
        Just("items: [\n"), Just("kind: List\n"), Just("- a\n"), Just("  clusterIP: 10.96.0.1\n"), Just("{\"kind\": \"Pod\"}"),
        Just("&a [*a]\n"), Just("? : \n"), Just("\t\u{0}\n"),
    ], 0..12)) {
        let _ = parse_file(Path::new("fuzz.yaml"), &text);
        let _ = parse_file(Path::new("fuzz.json"), &text);
        let _ = parse_file(Path::new("fuzz.yaml"), &yaml_ish.concat());
    }

    #[test]
    fn bad_objects_never_alter_a_good_one(bad in proptest::collection::vec(any_service(), 1..4)) {
        let (svc, slice) = good();
        // The good Service was programmed first; then the bad ones arrive.
        let (expected, owners) = good_only();
        let mut services = vec![svc];
        let mut slices = vec![slice];
        for b in &bad {
            // Objects that do not even deserialize are rejected by the source
            // with a reason; translate sees the ones that do.
            if let Ok(s) = serde_json::from_value::<Service>(b.clone())
                && s.metadata.name.as_deref() != Some("good")
            {
                services.push(s);
            }
            let slice_json = json!({"metadata": {"name": format!("{}-s", b["metadata"]["name"].as_str().unwrap()), "namespace": "default",
                "labels": {"kubernetes.io/service-name": b["metadata"]["name"]}},
                "addressType": "IPv4", "ports": [{"name": b["spec"]["ports"][0]["name"], "port": b["spec"]["ports"][0]["port"]}],
                "endpoints": [{"addresses": [b["spec"]["clusterIP"]]}]});
            if let Ok(s) = serde_json::from_value::<EndpointSlice>(slice_json) {
                slices.push(s);
            }
        }
        let st = state(services.clone(), slices);
        let t = translate_with(&st, &NodeConfig::default(), &owners);
        prop_assert_eq!(frontends(&st, &owners), expected, "the good Service is programmed exactly as alone");
        for p in &t.problems {
            prop_assert!(!p.reason.is_empty() && !p.object.is_empty());
        }
        // A bad Service is either programmed, ignored (headless, ExternalName, IPv6)
        // or named in a problem: never silently dropped.
        for s in services.iter().skip(1) {
            let name = s.metadata.name.clone().unwrap();
            let programmed = t.desired.frontends.values().any(|f| f.service_port.starts_with(&format!("default/{name}")));
            let reported = t.problems.iter().any(|p| p.object == format!("Service default/{name}"));
            let spec = s.spec.clone().unwrap_or_default();
            let ip = spec.cluster_ip.clone().unwrap_or_default();
            let ignored = ip.is_empty() || ip == "None" || ip.contains(':') || spec.type_.as_deref() == Some("ExternalName")
                || spec.ports.as_ref().is_none_or(|p| p.is_empty());
            prop_assert!(programmed || reported || ignored, "Service {} vanished without a reason", name);
        }
    }
}
