//! A small Kubernetes API server for tests: list and watch of Services,
//! EndpointSlices and Nodes with resourceVersions, watch events, bookmarks,
//! 410 Gone after compaction, and knobs to drop watch connections or go away,
//! so the agent's real kube-rs client is exercised end to end.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The resources the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// networking.k8s.io/v1 ServiceCIDR (served unless `unserve`d).
    ServiceCidr,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }
    fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Node | Kind::ServiceCidr)
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    kind: Kind,
    rv: u64,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Events before this resourceVersion are gone: watches from older ones get 410.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<WatchEvent>,
    /// Requests answered (by path), for assertions on re-lists.
    lists: HashMap<Kind, u64>,
    /// The label selector of each kind's last list.
    label_selectors: HashMap<Kind, Option<String>>,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<WatchEvent>,
    /// Bumped to end every open watch.
    generation: watch::Sender<u64>,
    /// While true every request gets 503 and watches end.
    down: watch::Sender<bool>,
    /// Kinds answered with 404, as an API server without them does.
    unserved: Mutex<std::collections::HashSet<Kind>>,
}

/// Handle owned by a test; the server runs on its own thread.
pub struct ApiServer {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Bind a listener inside a network namespace (the socket stays there).
fn bind_in_netns(netns: &str) -> std::net::TcpListener {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{netns}")).expect("open netns");
        use std::os::fd::AsRawFd as _;
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {netns}: {}",
            std::io::Error::last_os_error()
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind API server");
        listener.set_nonblocking(true).expect("nonblocking");
        listener
    })
    .join()
    .expect("bind thread")
}

fn key_of(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let meta = &obj["metadata"];
    let ns = if kind.cluster_scoped() {
        ""
    } else {
        meta["namespace"].as_str().unwrap_or("default")
    };
    (
        kind,
        ns.to_string(),
        meta["name"].as_str().expect("object name").to_string(),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl ApiServer {
    /// Start serving on 127.0.0.1 of the given network namespace.
    pub fn start_in_netns(netns: &str) -> Self {
        let listener = bind_in_netns(netns);
        let addr = listener.local_addr().expect("addr");
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            events,
            generation: watch::channel(0).0,
            down: watch::channel(false).0,
            unserved: Mutex::default(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let app = Router::new()
            .route("/api/v1/services", get(handle_service))
            .route("/api/v1/nodes", get(handle_node))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(handle_slice),
            )
            .route(
                "/apis/networking.k8s.io/v1/servicecidrs",
                get(handle_service_cidr),
            )
            .route("/readyz", get(handle_readyz))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(status(404, "NotFound", "not served here")),
                )
            })
            .with_state(shared.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("serve");
        });
        ApiServer {
            shared,
            addr,
            runtime: Some(runtime),
        }
    }

    /// A kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    fn record(&self, kind: Kind, event: &'static str, mut object: Value) {
        let mut store = self.shared.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv;
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !kind.cluster_scoped() && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        let key = key_of(kind, &object);
        if event == "DELETED" {
            store.objects.remove(&key);
        } else {
            store.objects.insert(key, object.clone());
        }
        let ev = WatchEvent {
            kind,
            rv,
            kind_of_event: event,
            object,
        };
        store.log.push(ev.clone());
        let _ = self.shared.events.send(ev);
    }

    /// Create or replace an object (ADDED or MODIFIED).
    pub fn apply(&self, kind: Kind, object: Value) {
        let exists = self
            .shared
            .store
            .lock()
            .unwrap()
            .objects
            .contains_key(&key_of(kind, &object));
        self.record(kind, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (
            kind,
            if kind.cluster_scoped() {
                String::new()
            } else {
                namespace.into()
            },
            name.to_string(),
        );
        let object = self
            .shared
            .store
            .lock()
            .unwrap()
            .objects
            .get(&key)
            .cloned()
            .expect("object to delete");
        self.record(kind, "DELETED", object);
    }

    /// End every open watch connection (clients reconnect from their last resourceVersion).
    pub fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Forget the event history: watches resuming from before now get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
        store.log.clear();
    }

    /// Go away (errors and no watches) or come back.
    /// Answer `kind` with 404 (an API server that does not have it), or
    /// serve it again.
    pub fn set_served(&self, kind: Kind, served: bool) {
        let mut unserved = self.shared.unserved.lock().unwrap();
        if served {
            unserved.remove(&kind);
        } else {
            unserved.insert(kind);
        }
    }

    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
        if down {
            self.drop_watches();
        }
    }

    /// How many lists of `kind` were served (initial list + re-lists).
    /// The label selector the last list of `kind` asked for.
    pub fn label_selector(&self, kind: Kind) -> Option<String> {
        self.shared
            .store
            .lock()
            .unwrap()
            .label_selectors
            .get(&kind)
            .cloned()
            .flatten()
    }

    pub fn lists(&self, kind: Kind) -> u64 {
        *self
            .shared
            .store
            .lock()
            .unwrap()
            .lists
            .get(&kind)
            .unwrap_or(&0)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn handle_service(s: State<Arc<Shared>>, q: Query<HashMap<String, String>>) -> Response {
    handle(Kind::Service, s, q).await
}
async fn handle_node(s: State<Arc<Shared>>, q: Query<HashMap<String, String>>) -> Response {
    handle(Kind::Node, s, q).await
}
async fn handle_slice(s: State<Arc<Shared>>, q: Query<HashMap<String, String>>) -> Response {
    handle(Kind::EndpointSlice, s, q).await
}
async fn handle_service_cidr(s: State<Arc<Shared>>, q: Query<HashMap<String, String>>) -> Response {
    handle(Kind::ServiceCidr, s, q).await
}

/// `metadata.name=X` field selectors (what the agent uses for its Node).
fn matches(selector: Option<&String>, obj: &Value) -> bool {
    match selector.and_then(|s| s.strip_prefix("metadata.name=")) {
        Some(name) => obj["metadata"]["name"] == name,
        None => true,
    }
}

/// A label selector of `key`, `!key` and `key=value` terms, as the API
/// server reads them (all must hold).
fn labels_match(selector: Option<&String>, obj: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    selector.split(',').all(|term| {
        if let Some(key) = term.strip_prefix('!') {
            labels.get(key).is_none()
        } else if let Some((key, value)) = term.split_once('=') {
            labels.get(key).and_then(Value::as_str) == Some(value)
        } else {
            labels.get(term).is_some()
        }
    })
}

/// A watch event as a client with a label selector sees it: an object that
/// does not match is not added, and one that stopped matching is deleted
/// (as the API server's watch cache does).
fn labelled_event(selector: Option<&String>, kind_of_event: &str, obj: &Value) -> Option<Value> {
    if labels_match(selector, obj) {
        return Some(json!({"type": kind_of_event, "object": obj}));
    }
    (kind_of_event != "ADDED").then(|| json!({"type": "DELETED", "object": obj}))
}

/// kube-apiserver's readiness: 200 "ok", 500 while down.
async fn handle_readyz(State(shared): State<Arc<Shared>>) -> Response {
    if *shared.down.borrow() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "going away").into_response();
    }
    (StatusCode::OK, "ok").into_response()
}

async fn handle(
    kind: Kind,
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if shared.unserved.lock().unwrap().contains(&kind) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        )
            .into_response();
    }
    if *shared.down.borrow() {
        // 500, not 503: kube-rs retries 503 inside the client without telling
        // the watcher, which is not what an API server that is gone looks like.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(status(500, "InternalError", "going away")),
        )
            .into_response();
    }
    let selector = q.get("fieldSelector").cloned();
    let labels = q.get("labelSelector").cloned();
    if q.get("watch").map(String::as_str) != Some("true")
        && q.get("watch").map(String::as_str) != Some("1")
    {
        let mut store = shared.store.lock().unwrap();
        *store.lists.entry(kind).or_default() += 1;
        store.label_selectors.insert(kind, labels.clone());
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((k, _, _), o)| {
                *k == kind && matches(selector.as_ref(), o) && labels_match(labels.as_ref(), o)
            })
            .map(|(_, o)| o.clone())
            .collect();
        let body = json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        });
        return axum::Json(body).into_response();
    }

    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (backlog, live, current, gone) = {
        let store = shared.store.lock().unwrap();
        let backlog: Vec<WatchEvent> = store
            .log
            .iter()
            .filter(|e| e.kind == kind && e.rv > from)
            .cloned()
            .collect();
        (
            backlog,
            shared.events.subscribe(),
            store.rv,
            from < store.compacted,
        )
    };
    let line = |v: Value| -> Result<Bytes, Infallible> {
        let mut text = v.to_string();
        text.push('\n');
        Ok(Bytes::from(text))
    };
    if gone {
        let ev =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        return Response::new(Body::from_stream(futures::stream::iter([line(ev)])));
    }
    let mut generation = shared.generation.subscribe();
    generation.mark_unchanged();
    let selector2 = selector.clone();
    let labels2 = labels.clone();
    let backlog = futures::stream::iter(
        backlog
            .into_iter()
            .filter(move |e| matches(selector.as_ref(), &e.object))
            .filter_map(move |e| labelled_event(labels.as_ref(), e.kind_of_event, &e.object))
            .map(line),
    );
    let timeout: u64 = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let live = futures::stream::unfold(
        (
            live,
            generation,
            current,
            tokio::time::Instant::now() + Duration::from_secs(timeout),
        ),
        move |(mut rx, mut generation, mut last_rv, deadline)| {
            let selector = selector2.clone();
            let labels = labels2.clone();
            async move {
                loop {
                    tokio::select! {
                        ev = rx.recv() => match ev {
                            Ok(e) if e.kind == kind && e.rv > last_rv => {
                                last_rv = e.rv;
                                if !matches(selector.as_ref(), &e.object) { continue; }
                                let Some(out) = labelled_event(labels.as_ref(), e.kind_of_event, &e.object) else { continue };
                                return Some((line(out), (rx, generation, last_rv, deadline)));
                            }
                            Ok(_) => continue,
                            Err(_) => return None,
                        },
                        _ = generation.changed() => return None,
                        _ = tokio::time::sleep_until(deadline) => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)), if bookmarks => {
                            let bm = json!({"type": "BOOKMARK", "object": {
                                "kind": kind.name(), "apiVersion": kind.api_version(),
                                "metadata": {"resourceVersion": last_rv.to_string()}}});
                            return Some((line(bm), (rx, generation, last_rv, deadline)));
                        }
                    }
                }
            }
        },
    );
    Response::new(Body::from_stream(backlog.chain(live)))
}
