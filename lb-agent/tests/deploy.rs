//! deploy/ and the Helm chart: they parse, carry what a kube-proxy
//! replacement DaemonSet needs, grant exactly what the code watches, and the
//! agent config they ship is one the agent accepts.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use lb_agent::{
    config::{FileConfig, RunArgs, SourceConfig},
    source::kube::WATCHED,
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Every object of the kustomization.
fn kustomize_objects() -> Vec<Value> {
    let dir = deploy_dir();
    let k = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .flat_map(|r| yaml_docs(&dir.join(r.as_str().unwrap())))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// (group, resource, sorted verbs) of a ClusterRole, to compare with WATCHED.
fn rules(role: &Value) -> BTreeSet<(String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let mut verbs: Vec<String> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().into())
            .collect();
        verbs.sort();
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                out.insert((
                    g.as_str().unwrap().into(),
                    r.as_str().unwrap().into(),
                    verbs.clone(),
                ));
            }
        }
    }
    out
}

fn watched() -> BTreeSet<(String, String, Vec<String>)> {
    WATCHED
        .iter()
        .map(|(g, r, v)| {
            let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            v.sort();
            (g.to_string(), r.to_string(), v)
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_what_the_agent_watches() {
    let objects = kustomize_objects();
    assert_eq!(rules(find(&objects, "ClusterRole")), watched());
    let binding = find(&objects, "ClusterRoleBinding");
    let sa = find(&objects, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["roleRef"]["name"],
        find(&objects, "ClusterRole")["metadata"]["name"]
    );
}

#[test]
fn daemonset_has_what_a_kube_proxy_replacement_needs() {
    let objects = kustomize_objects();
    let ds = find(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null()),
        "tolerates every taint"
    );
    assert_eq!(
        pod["serviceAccountName"],
        find(&objects, "ServiceAccount")["metadata"]["name"]
    );
    let c = &pod["containers"][0];
    let node_env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    let caps: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        caps,
        ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"].into(),
        "least privilege, no SYS_ADMIN"
    );
    let bpffs = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        .expect("bpffs hostPath");
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == bpffs["name"] && m["mountPath"] == "/sys/fs/bpf")
    );
    // The config file the args name is the ConfigMap's agent.yaml.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/lb/agent.yaml"]);
    let cm_vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| !v["configMap"].is_null())
        .expect("config volume");
    assert_eq!(
        cm_vol["configMap"]["name"],
        find(&objects, "ConfigMap")["metadata"]["name"]
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == cm_vol["name"] && m["mountPath"] == "/etc/lb")
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 10256);
}

#[test]
fn shipped_agent_config_is_accepted_by_the_agent() {
    let objects = kustomize_objects();
    let text = find(&objects, "ConfigMap")["data"]["agent.yaml"]
        .as_str()
        .expect("agent.yaml")
        .to_string();
    serde_saphyr::from_str::<FileConfig>(&text).expect("agent.yaml has only known keys");
    let path = std::env::temp_dir().join(format!("lb-deploy-test-{}.yaml", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let cfg = RunArgs {
        config: Some(path.clone()),
        node_name: Some("n".into()),
        ..Default::default()
    }
    .resolve()
    .expect("resolves");
    std::fs::remove_file(path).unwrap();
    assert!(
        matches!(
            &cfg.source,
            SourceConfig::Kube { api_servers, .. } if api_servers.len() == 1
        ),
        "{:?}",
        cfg.source
    );
    assert_eq!(cfg.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()));
}

/// Replace `{{ ... }}` actions with a placeholder so a template without
/// control flow parses as YAML.
fn stub_render(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .map(|e| start + e + 2)
            .expect("closed action");
        out.push('X');
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn helm_chart_values_are_defined_documented_and_rbac_matches() {
    let chart = deploy_dir().join("helm/lb");
    assert_eq!(yaml_docs(&chart.join("Chart.yaml"))[0]["name"], "lb");
    let values_text = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let values = &yaml_docs(&chart.join("values.yaml"))[0];
    // Every top-level value is documented with a "# --" comment above it.
    let lines: Vec<&str> = values_text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && !line.starts_with('#') && line.contains(':') {
            let doc = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .any(|l| l.starts_with("# --"));
            assert!(doc, "values.yaml: {line:?} has no \"# --\" comment");
        }
    }
    // Every .Values path a template uses exists.
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices(".Values.") {
            let path_str: String = text[i + 8..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.')
                .collect();
            let mut v = values;
            for part in path_str.trim_end_matches('.').split('.') {
                v = &v[part];
                assert!(
                    !v.is_null(),
                    "{}: .Values.{path_str} is not in values.yaml",
                    path.display()
                );
            }
        }
    }
    let rbac = stub_render(&std::fs::read_to_string(chart.join("templates/rbac.yaml")).unwrap());
    let docs: Vec<Value> = serde_saphyr::from_multiple(&rbac).unwrap();
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    assert_eq!(
        rules(role),
        watched(),
        "the chart's ClusterRole matches the code"
    );
    let ds_text =
        stub_render(&std::fs::read_to_string(chart.join("templates/daemonset.yaml")).unwrap());
    assert!(
        ds_text.contains("add: [BPF, NET_ADMIN, PERFMON, NET_RAW]")
            && !ds_text.contains("SYS_ADMIN]")
    );
}
