//! The directory source: Kubernetes objects from *.yaml, *.yml and *.json
//! files. A file that fails to parse keeps its last good content in force;
//! the rest keeps working.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

use super::endpoints::{derive_slices, mirror_endpoints};
use crate::model::{
    ClusterState, ObjectKey, Problem,
    cluster::{LABEL_SERVICE_NAME, LABEL_ZONE},
};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read manifests directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One object of a kind the agent reads.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Endpoints(Arc<Endpoints>),
    Pod(Arc<Pod>),
    Node(Arc<Node>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Endpoints(_) => "Endpoints",
            Object::Pod(_) => "Pod",
            Object::Node(_) => "Node",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Signature {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
struct FileState {
    signature: Signature,
    /// Objects of the last content that parsed.
    objects: Vec<(ObjectKey, Object)>,
    /// The current content's error, if it did not parse.
    error: Option<String>,
}

/// A file whose current content was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    pub reason: String,
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct PollResult {
    pub changed: bool,
    /// Files that failed in this poll (newly or again after a change).
    pub new_errors: Vec<FileError>,
}

pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml") | Some("json")
    )
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-read files that appeared, changed or vanished.
    pub fn poll(&mut self) -> Result<PollResult, ManifestError> {
        let dir_err = |source| ManifestError::Dir {
            path: self.dir.clone(),
            source,
        };
        let mut seen = BTreeSet::new();
        let mut result = PollResult::default();
        for entry in fs::read_dir(&self.dir).map_err(dir_err)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            seen.insert(path.clone());
            let signature = Signature {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.signature == signature)
            {
                continue;
            }
            result.changed = true;
            let parsed = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|text| parse_file(&path, &text));
            let previous = self
                .files
                .remove(&path)
                .map(|f| f.objects)
                .unwrap_or_default();
            let state = match parsed {
                Ok(objects) => FileState {
                    signature,
                    objects,
                    error: None,
                },
                Err(reason) => {
                    result.new_errors.push(FileError {
                        path: path.clone(),
                        reason: reason.clone(),
                    });
                    FileState {
                        signature,
                        objects: previous,
                        error: Some(reason),
                    }
                }
            };
            self.files.insert(path, state);
        }
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        result.changed |= self.files.len() != before;
        Ok(result)
    }

    /// Files whose current content is rejected (their last good content is in force).
    pub fn errors(&self) -> Vec<FileError> {
        self.files
            .iter()
            .filter_map(|(path, f)| {
                f.error.clone().map(|reason| FileError {
                    path: path.clone(),
                    reason,
                })
            })
            .collect()
    }

    /// Assemble the cluster: objects from every file (the first file by name
    /// wins a duplicate), slices mirrored from Endpoints and derived from Pods.
    pub fn cluster_state(&self) -> (ClusterState, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut state = ClusterState::default();
        let mut endpoints: BTreeMap<ObjectKey, Arc<Endpoints>> = BTreeMap::new();
        let mut pods: BTreeMap<ObjectKey, Arc<Pod>> = BTreeMap::new();
        let mut origin: BTreeMap<(&'static str, ObjectKey), &Path> = BTreeMap::new();

        for (path, file) in &self.files {
            for (key, object) in &file.objects {
                if let Some(first) = origin.get(&(object.kind(), key.clone())) {
                    problems.push(Problem {
                        object: format!("{} {key}", object.kind()),
                        reason: format!(
                            "defined again in {}; the definition in {} is used",
                            path.display(),
                            first.display()
                        ),
                    });
                    continue;
                }
                origin.insert((object.kind(), key.clone()), path);
                match object {
                    Object::Service(s) => {
                        state.services.insert(key.clone(), s.clone());
                    }
                    Object::EndpointSlice(s) => {
                        state.endpoint_slices.insert(key.clone(), s.clone());
                    }
                    Object::Endpoints(e) => {
                        endpoints.insert(key.clone(), e.clone());
                    }
                    Object::Pod(p) => {
                        pods.insert(key.clone(), p.clone());
                    }
                    Object::Node(n) => {
                        state.nodes.insert(key.name.clone(), n.clone());
                    }
                }
            }
        }

        let services_with_slices: BTreeSet<ObjectKey> = state
            .endpoint_slices
            .iter()
            .filter_map(|(k, s)| {
                let svc = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
                Some(ObjectKey::new(k.namespace.clone(), svc.clone()))
            })
            .collect();
        let node_zones: BTreeMap<String, String> = state
            .nodes
            .iter()
            .filter_map(|(name, n)| {
                Some((
                    name.clone(),
                    n.metadata.labels.as_ref()?.get(LABEL_ZONE)?.clone(),
                ))
            })
            .collect();

        let mut generated = Vec::new();
        for (key, svc) in &state.services {
            if services_with_slices.contains(key) {
                continue;
            }
            let has_selector = svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|s| !s.is_empty());
            if has_selector {
                generated.extend(derive_slices(key, svc, &pods, &node_zones));
            } else if let Some(ep) = endpoints.get(key) {
                generated.extend(mirror_endpoints(key, ep));
            }
        }
        for slice in generated {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let namespace = slice.metadata.namespace.clone().unwrap_or_default();
            state
                .endpoint_slices
                .insert(ObjectKey::new(namespace, name), Arc::new(slice));
        }
        (state, problems)
    }
}

/// Parse one file into objects; Err names the document and the reason.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(ObjectKey, Object)>, String> {
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let documents: Vec<Value> = if is_json {
        vec![serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?]
    } else {
        serde_saphyr::from_multiple_with_options(text, yaml_options())
            .map_err(|e| format!("invalid YAML: {e}"))?
    };
    let mut objects = Vec::new();
    for (i, doc) in documents.into_iter().enumerate() {
        collect(doc, &format!("document {}", i + 1), &mut objects)?;
    }
    Ok(objects)
}

/// serde-saphyr's default budget (1,024 documents, 250,000 nodes) is sized
/// for config files; a cluster's manifests are far larger. The depth, alias
/// and anchor limits that guard against hostile YAML stay at their defaults.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 10_000_000,
            max_nodes: 500_000_000,
            max_events: 1_000_000_000,
            max_total_scalar_bytes: 4 << 30,
        },
    }
}

fn collect(doc: Value, at: &str, out: &mut Vec<(ObjectKey, Object)>) -> Result<(), String> {
    if doc.is_null() {
        return Ok(());
    }
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{at}: no kind"))?
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        let items = doc
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (j, item) in items.into_iter().enumerate() {
            collect(item, &format!("{at} item {}", j + 1), out)?;
        }
        return Ok(());
    }
    let meta = doc.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{at} ({kind}): metadata.name is missing"))?
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let key = ObjectKey::new(namespace, name);
    let ctx = format!("{at} ({kind} {key})");
    let object = match kind.as_str() {
        "Service" => Object::Service(Arc::new(typed(doc, &ctx)?)),
        "EndpointSlice" => Object::EndpointSlice(Arc::new(typed(doc, &ctx)?)),
        "Endpoints" => Object::Endpoints(Arc::new(typed(doc, &ctx)?)),
        "Pod" => Object::Pod(Arc::new(typed(doc, &ctx)?)),
        "Node" => {
            let node: Node = typed(doc, &ctx)?;
            // Nodes are cluster-scoped: key them by name alone.
            out.push((ObjectKey::new("", key.name), Object::Node(Arc::new(node))));
            return Ok(());
        }
        _ => {
            tracing::debug!(object = %ctx, "ignoring a kind the agent does not read");
            return Ok(());
        }
    };
    out.push((key, object));
    Ok(())
}

fn typed<T: DeserializeOwned>(doc: Value, ctx: &str) -> Result<T, String> {
    serde_json::from_value(doc).map_err(|e| format!("{ctx}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_and_lists() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web-1, namespace: shop, labels: {app: web}}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
---
"#;
        let objects = parse_file(Path::new("x.yaml"), text).expect("parses");
        let kinds: Vec<(String, &str)> = objects
            .iter()
            .map(|(k, o)| (k.to_string(), o.kind()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("default/web".into(), "Service"),
                ("shop/web-1".into(), "Pod")
            ]
        );
    }

    #[test]
    fn errors_name_the_document_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "a.yaml",
                "kind: Service\nmetadata: {name: a}\nspec: {ports: 7}\n",
                "document 1 (Service default/a)",
            ),
            (
                "b.yaml",
                "kind: Service\nspec: {}\n",
                "metadata.name is missing",
            ),
            ("c.yaml", "{ this is: [not yaml", "invalid YAML"),
            ("d.json", "{\"kind\": \"Pod\",", "invalid JSON"),
            ("e.yaml", "metadata: {name: x}\n", "no kind"),
        ];
        for (file, text, want) in cases {
            let err = parse_file(Path::new(file), text).expect_err(file);
            assert!(
                err.contains(want),
                "{file}: {err:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn large_files_are_not_refused_by_the_yaml_budget() {
        let doc = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n";
        let text: String = (0..3000)
            .map(|i| doc.replace("name: p", &format!("name: p{i}")))
            .collect();
        assert_eq!(
            parse_file(Path::new("big.yaml"), &text)
                .expect("parses")
                .len(),
            3000
        );
    }

    #[test]
    fn json_file_is_read() {
        let text = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n1","labels":{"topology.kubernetes.io/zone":"z1"}}}"#;
        let objects = parse_file(Path::new("n.json"), text).expect("parses");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].0, ObjectKey::new("", "n1"));
    }
}
