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
    Change, ClusterState, ObjectKey, Problem, ServiceRecord, SliceRecord,
    cluster::LABEL_ZONE,
    tracker::{SlicesByService, slice_service},
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
    /// Kept as the compact record the translation reads.
    Service(Arc<ServiceRecord>),
    /// Kept as the compact record the translation reads.
    EndpointSlice(Arc<SliceRecord>),
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

/// An object's kind and namespace/name: what "defined twice" compares.
type ObjectId = (&'static str, ObjectKey);

#[derive(Debug)]
struct FileState {
    signature: Signature,
    /// Objects of the last content that parsed.
    objects: Vec<(ObjectKey, Object)>,
    /// Each object's first position in `objects`.
    index: BTreeMap<ObjectId, usize>,
    /// How many more times an object is defined in this file.
    repeats: BTreeMap<ObjectId, usize>,
    /// The current content's error, if it did not parse.
    error: Option<String>,
}

impl FileState {
    fn new(signature: Signature, objects: Vec<(ObjectKey, Object)>, error: Option<String>) -> Self {
        let mut index = BTreeMap::new();
        let mut repeats = BTreeMap::new();
        for (i, (key, object)) in objects.iter().enumerate() {
            let id = (object.kind(), key.clone());
            match index.entry(id) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    *repeats.entry(e.key().clone()).or_insert(0) += 1;
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(i);
                }
            }
        }
        FileState {
            signature,
            objects,
            index,
            repeats,
            error,
        }
    }

    fn object(&self, id: &ObjectId) -> Option<&Object> {
        self.index.get(id).map(|i| &self.objects[*i].1)
    }
}

/// The cluster the files add up to, kept up to date object by object.
#[derive(Default)]
struct Assembly {
    /// Files defining each object, in name order (the first one's is used).
    /// (Sorted paths, shared per file: most objects have one, and a
    /// one-element BTreeSet would allocate a whole node.)
    defined: BTreeMap<ObjectId, Vec<Arc<Path>>>,
    /// Objects whose files changed since the last `changes()`.
    touched: BTreeSet<ObjectId>,
    /// Services, Nodes, and EndpointSlices as the translation sees them
    /// (written ones, then derived ones over them).
    state: ClusterState,
    written_slices: BTreeMap<ObjectKey, Arc<SliceRecord>>,
    /// Service -> its written EndpointSlices.
    slices_by_service: SlicesByService,
    endpoints: BTreeMap<ObjectKey, Arc<Endpoints>>,
    pods: BTreeMap<ObjectKey, Arc<Pod>>,
    /// Service -> the slices derived for it (from Pods or Endpoints).
    derived: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    derived_slices: BTreeSet<ObjectKey>,
    duplicates: BTreeMap<ObjectId, Vec<Problem>>,
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
    assembly: Assembly,
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
            assembly: Assembly::default(),
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
            let previous = self.files.remove(&path);
            let state = match parsed {
                Ok(objects) => FileState::new(signature, objects, None),
                Err(reason) => {
                    result.new_errors.push(FileError {
                        path: path.clone(),
                        reason: reason.clone(),
                    });
                    let objects = previous
                        .as_ref()
                        .map(|f| f.objects.clone())
                        .unwrap_or_default();
                    FileState::new(signature, objects, Some(reason))
                }
            };
            if let Some(previous) = &previous {
                self.assembly.forget(&path, previous);
            }
            self.assembly.learn(&path, &state);
            self.files.insert(path, state);
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !seen.contains(*path))
            .cloned()
            .collect();
        for path in gone {
            if let Some(file) = self.files.remove(&path) {
                self.assembly.forget(&path, &file);
                result.changed = true;
            }
        }
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

    /// What the files changed since the last call, as object changes (only
    /// objects whose files changed are looked at, and only Services whose
    /// Pods, Endpoints or slices changed get their slices derived again),
    /// and every duplicate definition found so far.
    pub fn changes(&mut self) -> (Vec<Change>, Vec<Problem>) {
        let changes = self.assembly.changes(&self.files);
        let problems = self
            .assembly
            .duplicates
            .values()
            .flatten()
            .cloned()
            .collect();
        (changes, problems)
    }

    /// Assemble the cluster from scratch: objects from every file (the first file by name
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
                        state.nodes.insert(key.name.to_string(), n.clone());
                    }
                }
            }
        }

        let services_with_slices: BTreeSet<ObjectKey> = state
            .endpoint_slices
            .iter()
            .filter_map(|(k, s)| {
                let svc = s.service_name.as_ref()?;
                Some(ObjectKey::new(k.namespace.clone(), svc.clone()))
            })
            .collect();
        let node_zones = node_zones(&state);

        let mut generated = Vec::new();
        for (key, svc) in &state.services {
            if services_with_slices.contains(key) {
                continue;
            }
            let has_selector = svc.spec.as_ref().is_some_and(|s| !s.selector.is_empty());
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
                .insert(ObjectKey::new(namespace, name), Arc::new((&slice).into()));
        }
        (state, problems)
    }
}

impl Assembly {
    /// A file's objects are now defined (by it).
    fn learn(&mut self, path: &Path, file: &FileState) {
        let shared: Arc<Path> = Arc::from(path);
        for id in file.index.keys() {
            let paths = self.defined.entry(id.clone()).or_default();
            if let Err(at) = paths.binary_search_by(|p| (**p).cmp(path)) {
                paths.insert(at, shared.clone());
            }
            self.touched.insert(id.clone());
        }
    }

    /// A file's objects are no longer defined by it.
    fn forget(&mut self, path: &Path, file: &FileState) {
        for id in file.index.keys() {
            if let Some(paths) = self.defined.get_mut(id) {
                paths.retain(|p| **p != *path);
                if paths.is_empty() {
                    self.defined.remove(id);
                }
            }
            self.touched.insert(id.clone());
        }
    }

    fn changes(&mut self, files: &BTreeMap<PathBuf, FileState>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut affected: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut pod_namespaces: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut zones_changed = false;
        for id in std::mem::take(&mut self.touched) {
            let paths: Vec<PathBuf> = self
                .defined
                .get(&id)
                .into_iter()
                .flatten()
                .map(|p| p.to_path_buf())
                .collect();
            let winner = paths
                .first()
                .and_then(|p| Some((p, files.get(p)?.object(&id)?.clone())));
            self.note_duplicates(&id, &paths, files);
            let (kind, key) = id;
            let object = winner.map(|(_, o)| o);
            match (kind, object) {
                ("Service", o) => {
                    let o = o.and_then(|o| match o {
                        Object::Service(s) => Some(s),
                        _ => None,
                    });
                    if replace(&mut self.state.services, &key, o.clone()) {
                        changes.push(Change::Service(key.clone(), o));
                        affected.insert(key);
                    }
                }
                ("EndpointSlice", o) => {
                    let o = o.and_then(|o| match o {
                        Object::EndpointSlice(s) => Some(s),
                        _ => None,
                    });
                    let old_service = self
                        .written_slices
                        .get(&key)
                        .and_then(|s| slice_service(&key, s));
                    if !replace(&mut self.written_slices, &key, o.clone()) {
                        continue;
                    }
                    let new_service = o.as_ref().and_then(|s| slice_service(&key, s));
                    self.slices_by_service.move_slice(
                        &key,
                        old_service.as_ref(),
                        new_service.as_ref(),
                    );
                    affected.extend(old_service);
                    affected.extend(new_service);
                    if !self.is_derived(&key) {
                        replace(&mut self.state.endpoint_slices, &key, o.clone());
                        changes.push(Change::EndpointSlice(key, o));
                    }
                }
                ("Endpoints", o) => {
                    let o = o.and_then(|o| match o {
                        Object::Endpoints(e) => Some(e),
                        _ => None,
                    });
                    if replace(&mut self.endpoints, &key, o) {
                        affected.insert(key);
                    }
                }
                ("Pod", o) => {
                    let o = o.and_then(|o| match o {
                        Object::Pod(p) => Some(p),
                        _ => None,
                    });
                    if replace(&mut self.pods, &key, o) {
                        pod_namespaces.insert(key.namespace);
                    }
                }
                ("Node", o) => {
                    let o = o.and_then(|o| match o {
                        Object::Node(n) => Some(n),
                        _ => None,
                    });
                    let name = key.name.to_string();
                    if replace(&mut self.state.nodes, &name, o.clone()) {
                        changes.push(Change::Node(name, o));
                        zones_changed = true;
                    }
                }
                _ => {}
            }
        }
        // Services whose derived slices may differ now.
        if zones_changed {
            affected.extend(self.state.services.keys().cloned());
        }
        for ns in pod_namespaces {
            let from = ObjectKey::new(ns.clone(), "");
            affected.extend(
                self.state
                    .services
                    .range(from..)
                    .take_while(|(k, _)| k.namespace == ns)
                    .map(|(k, _)| k.clone()),
            );
        }
        affected.extend(self.derived.keys().filter(|_| zones_changed).cloned());
        if affected.is_empty() {
            return changes;
        }
        let node_zones = node_zones(&self.state);
        for service in affected {
            self.derive(&service, &node_zones, &mut changes);
        }
        changes
    }

    fn is_derived(&self, slice: &ObjectKey) -> bool {
        self.derived_slices.contains(slice)
    }

    /// Derive one Service's slices again (the endpointslice controller's
    /// and the Endpoints mirror's rules): only for a Service without
    /// written slices.
    fn derive(
        &mut self,
        service: &ObjectKey,
        node_zones: &BTreeMap<String, String>,
        changes: &mut Vec<Change>,
    ) {
        let generated: Vec<EndpointSlice> = match self.state.services.get(service) {
            Some(svc) if !self.slices_by_service.has(service) => {
                let has_selector = svc.spec.as_ref().is_some_and(|s| !s.selector.is_empty());
                if has_selector {
                    derive_slices(service, svc, &self.pods, node_zones)
                } else if let Some(ep) = self.endpoints.get(service) {
                    mirror_endpoints(service, ep)
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        let new: BTreeMap<ObjectKey, Arc<SliceRecord>> = generated
            .into_iter()
            .map(|slice| {
                let name = slice.metadata.name.clone().unwrap_or_default();
                let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                (ObjectKey::new(namespace, name), Arc::new((&slice).into()))
            })
            .collect();
        for old in self.derived.remove(service).unwrap_or_default() {
            self.derived_slices.remove(&old);
            if new.contains_key(&old) {
                continue;
            }
            // A written slice of that name shows again.
            let written = self.written_slices.get(&old).cloned();
            replace(&mut self.state.endpoint_slices, &old, written.clone());
            changes.push(Change::EndpointSlice(old, written));
        }
        if new.is_empty() {
            return;
        }
        self.derived
            .insert(service.clone(), new.keys().cloned().collect());
        self.derived_slices.extend(new.keys().cloned());
        for (key, slice) in new {
            if replace(&mut self.state.endpoint_slices, &key, Some(slice.clone())) {
                changes.push(Change::EndpointSlice(key, Some(slice)));
            }
        }
    }

    /// "defined again" problems of one object: every definition after the
    /// first, in file order.
    fn note_duplicates(
        &mut self,
        id: &ObjectId,
        paths: &[PathBuf],
        files: &BTreeMap<PathBuf, FileState>,
    ) {
        let Some(first) = paths.first() else {
            self.duplicates.remove(id);
            return;
        };
        let mut problems = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let again = files
                .get(path)
                .and_then(|f| f.repeats.get(id))
                .copied()
                .unwrap_or(0)
                + usize::from(i > 0);
            for _ in 0..again {
                problems.push(Problem {
                    object: format!("{} {}", id.0, id.1),
                    reason: format!(
                        "defined again in {}; the definition in {} is used",
                        path.display(),
                        first.display()
                    ),
                });
            }
        }
        if problems.is_empty() {
            self.duplicates.remove(id);
        } else {
            self.duplicates.insert(id.clone(), problems);
        }
    }
}

/// Node name -> its `topology.kubernetes.io/zone` label (for derived slices' hints).
fn node_zones(state: &ClusterState) -> BTreeMap<String, String> {
    state
        .nodes
        .iter()
        .filter_map(|(name, n)| {
            Some((
                name.clone(),
                n.metadata.labels.as_ref()?.get(LABEL_ZONE)?.clone(),
            ))
        })
        .collect()
}

/// Put `value` at `key` (None: remove); true when that changed anything.
fn replace<K: Ord + Clone, V: PartialEq>(
    map: &mut BTreeMap<K, Arc<V>>,
    key: &K,
    value: Option<Arc<V>>,
) -> bool {
    match value {
        Some(v) => match map.get(key) {
            Some(old) if Arc::ptr_eq(old, &v) || **old == *v => false,
            _ => {
                map.insert(key.clone(), v);
                true
            }
        },
        None => map.remove(key).is_some(),
    }
}

/// Parse one file into objects; Err names the document and the reason.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(ObjectKey, Object)>, String> {
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let mut objects = Vec::new();
    if is_json {
        let doc = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        collect(doc, "document 1", &mut objects)?;
        return Ok(objects);
    }
    // One document at a time: a file of many thousand objects is never
    // held as generic values all at once.
    let mut reader = text.as_bytes();
    let documents = serde_saphyr::read_with_options::<_, Value>(&mut reader, yaml_options());
    for (i, doc) in documents.enumerate() {
        let doc = doc.map_err(|e| format!("invalid YAML: {e}"))?;
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
            max_reader_input_bytes: Some(4 << 30),
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
        "Service" => Object::Service(Arc::new(ServiceRecord::from(&typed::<Service>(doc, &ctx)?))),
        "EndpointSlice" => {
            let slice: EndpointSlice = typed(doc, &ctx)?;
            Object::EndpointSlice(Arc::new((&slice).into()))
        }
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
