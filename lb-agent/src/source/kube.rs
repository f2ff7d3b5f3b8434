//! The Kubernetes source: kube-rs watchers for Services, EndpointSlices and
//! this node's Node, kept in tables the way reflector stores are. The
//! watcher's Init / InitApply / InitDone protocol is followed: a re-list is
//! buffered and swapped in whole, so objects deleted while the watch was down
//! disappear, and nothing is dropped while the API server is unreachable
//! (the tables, and so the datapath, keep the last known state).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, utils::Backoff, watcher},
};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::model::{Change, ObjectKey, ServiceRecord, SliceRecord};

/// What the agent reads from the API: (API group, resource, verbs). The
/// ClusterRole in deploy/ grants exactly this (a test checks it).
pub const WATCHED: [(&str, &str, &[&str]); 4] = [
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "nodes", &["list", "watch"]),
    ("networking.k8s.io", "servicecidrs", &["list", "watch"]),
];

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no cluster configuration: {0} (give --kubeconfig, set $KUBECONFIG, or run in a pod)")]
    Infer(kube::config::InferConfigError),
    #[error("--api-server {url:?}: {reason}")]
    ApiServer { url: String, reason: String },
    #[error("building the API client: {0}")]
    Client(kube::Error),
}

/// Build a client from --kubeconfig, $KUBECONFIG, ~/.kube/config or the
/// in-cluster service account, with the API server address overridden
/// when given: without kube-proxy nothing serves the `kubernetes` Service's
/// ClusterIP that in-cluster configuration points at. Several addresses
/// are tried in order: the first that answers `/readyz` is used, and a
/// request that finds it unreachable (or answering 5xx) moves the client on
/// to the next (Cilium's k8s-api-server-urls).
pub async fn client(
    kubeconfig: Option<&PathBuf>,
    api_servers: &[String],
) -> Result<Client, KubeError> {
    let config = base_config(kubeconfig).await?;
    if api_servers.len() <= 1 {
        let mut config = config;
        if let Some(url) = api_servers.first() {
            config.cluster_url = parse_url(url)?;
        }
        return Client::try_from(config).map_err(KubeError::Client);
    }
    let mut servers = Vec::with_capacity(api_servers.len());
    for url in api_servers {
        let mut config = config.clone();
        config.cluster_url = parse_url(url)?;
        servers.push((
            url.clone(),
            Client::try_from(config).map_err(KubeError::Client)?,
        ));
    }
    let mut first = 0;
    for (i, (url, client)) in servers.iter().enumerate() {
        if ready(client).await {
            first = i;
            break;
        }
        warn!(api_server = %url, "API server not ready; trying the next");
    }
    info!(api_server = %servers[first].0, "using API server");
    let namespace = config.default_namespace.clone();
    let failover = Failover {
        servers: Arc::new(servers),
        current: Arc::new(AtomicUsize::new(first)),
    };
    Ok(Client::new(failover, namespace))
}

fn parse_url(url: &str) -> Result<http::Uri, KubeError> {
    url.parse()
        .map_err(|e: http::uri::InvalidUri| KubeError::ApiServer {
            url: url.into(),
            reason: e.to_string(),
        })
}

/// `GET /readyz` answers 200 within 2 s.
async fn ready(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(kube::client::Body::empty()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.send(request)).await,
        Ok(Ok(response)) if response.status().is_success()
    )
}

/// Sends each request to the current API server; one that cannot be
/// reached, or answers with a server error, makes the next one current
/// (the watcher then retries there after its backoff).
#[derive(Clone)]
struct Failover {
    servers: Arc<Vec<(String, Client)>>,
    current: Arc<AtomicUsize>,
}

impl tower_service::Service<http::Request<kube::client::Body>> for Failover {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, kube::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), kube::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let i = this.current.load(Ordering::Relaxed) % this.servers.len();
            let (url, client) = &this.servers[i];
            let result = client.send(request).await;
            let failed = match &result {
                Err(_) => true,
                Ok(response) => response.status().is_server_error(),
            };
            if failed {
                let next = (i + 1) % this.servers.len();
                if this
                    .current
                    .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    warn!(from = %url, to = %this.servers[next].0, "API server failing; switching to the next");
                }
            }
            result
        })
    }
}

/// --kubeconfig, $KUBECONFIG, ~/.kube/config or the in-cluster account.
async fn base_config(kubeconfig: Option<&PathBuf>) -> Result<Config, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(KubeError::Infer)?,
    };
    Ok(config)
}

/// Retry delays after a watch error: 0.5 s doubling to 5 s, with up to 20 %
/// jitter so a fleet of nodes does not reconnect in lockstep. Shorter than
/// client-go's 30 s ceiling: a node agent must catch up soon after an API
/// outage, and a node watches only three kinds.
struct WatchBackoff {
    next: Duration,
}

const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let jitter = base.mul_f64((nanos % 200) as f64 / 1000.0);
        Some(base + jitter)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

/// One watched kind: the live objects and, during a re-list, the buffer.
struct Table<K> {
    live: BTreeMap<ObjectKey, Arc<K>>,
    relist: Option<BTreeMap<ObjectKey, Arc<K>>>,
    ready: bool,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            live: BTreeMap::new(),
            relist: None,
            ready: false,
        }
    }
}

#[derive(Default)]
struct Tables {
    /// Services and slices are kept as the compact records the
    /// translation reads, not as API objects.
    services: Table<ServiceRecord>,
    slices: Table<SliceRecord>,
    nodes: Table<Node>,
    /// ServiceCIDR objects: their CIDRs.
    service_cidrs: Table<Vec<ipnet::IpNet>>,
    /// Object changes not yet handed to the change tracker, the latest per
    /// object (bounded by the cluster, however long the loop waits).
    changes: BTreeMap<(&'static str, ObjectKey), Change>,
    /// When the oldest change not yet handed to a sync arrived.
    pending_since: Option<Instant>,
}

/// Watch restarts per kind (errors after which the watcher backs off and re-lists).
#[derive(Clone, Debug, Default)]
pub struct WatchStats {
    pub restarts: BTreeMap<&'static str, u64>,
}

/// The Services lb watches: every one with a ClusterIP to hold, its own
/// (see `label_selector`) and another proxy's.
pub const SERVICE_SELECTOR: &str = "!service.kubernetes.io/headless";

/// kube-proxy's label selector: not the Services (and their EndpointSlices,
/// which the endpointslice controller labels alike) another proxy serves,
/// nor headless ones. With --service-proxy-name, only those labelled with it.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        None => "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless".into(),
        Some(name) => {
            format!(
                "service.kubernetes.io/service-proxy-name={name},!service.kubernetes.io/headless"
            )
        }
    }
}

/// What lb never reads, dropped before an object is kept: managedFields
/// are often the largest part of an object.
fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    /// What is kept of an object.
    type Record: PartialEq + Send + Sync + 'static;
    fn table(t: &mut Tables) -> &mut Table<Self::Record>;
    fn record(self) -> Self::Record;
    fn record_version(record: &Self::Record) -> Option<&str>;
    fn change(key: ObjectKey, obj: Option<Arc<Self::Record>>) -> Change;
}

impl Watched for Service {
    const KIND: &'static str = "services";
    type Record = ServiceRecord;
    fn table(t: &mut Tables) -> &mut Table<ServiceRecord> {
        &mut t.services
    }
    fn record(self) -> ServiceRecord {
        (&self).into()
    }
    fn record_version(record: &ServiceRecord) -> Option<&str> {
        record.resource_version.as_deref()
    }
    fn change(key: ObjectKey, obj: Option<Arc<ServiceRecord>>) -> Change {
        Change::Service(key, obj)
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "endpointslices";
    type Record = SliceRecord;
    fn table(t: &mut Tables) -> &mut Table<SliceRecord> {
        &mut t.slices
    }
    fn record(self) -> SliceRecord {
        (&self).into()
    }
    fn record_version(record: &SliceRecord) -> Option<&str> {
        record.resource_version.as_deref()
    }
    fn change(key: ObjectKey, obj: Option<Arc<SliceRecord>>) -> Change {
        Change::EndpointSlice(key, obj)
    }
}

impl Watched for Node {
    const KIND: &'static str = "nodes";
    type Record = Node;
    fn table(t: &mut Tables) -> &mut Table<Node> {
        &mut t.nodes
    }
    fn record(self) -> Node {
        self
    }
    fn record_version(record: &Node) -> Option<&str> {
        record.metadata.resource_version.as_deref()
    }
    fn change(key: ObjectKey, obj: Option<Arc<Self>>) -> Change {
        Change::Node(key.name.to_string(), obj)
    }
}

impl Watched for ServiceCIDR {
    const KIND: &'static str = "servicecidrs";
    type Record = Vec<ipnet::IpNet>;
    fn table(t: &mut Tables) -> &mut Table<Vec<ipnet::IpNet>> {
        &mut t.service_cidrs
    }
    fn record(self) -> Vec<ipnet::IpNet> {
        let name = self.metadata.name.unwrap_or_default();
        self.spec
            .and_then(|s| s.cidrs)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| match c.parse() {
                Ok(net) => Some(net),
                Err(e) => {
                    warn!(servicecidr = %name, cidr = %c, error = %e, "ServiceCIDR: not a CIDR; ignored");
                    None
                }
            })
            .collect()
    }
    fn record_version(_: &Vec<ipnet::IpNet>) -> Option<&str> {
        // Kept by value (a handful of prefixes): a re-list compares them.
        None
    }
    fn change(key: ObjectKey, obj: Option<Arc<Vec<ipnet::IpNet>>>) -> Change {
        Change::ServiceCidr(key.name.to_string(), obj)
    }
}

fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    ObjectKey::new(
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// How long an optional kind's watch rests after a 404.
const NOT_SERVED_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

/// The API server answered 404 (it does not serve the kind) or 403 (the
/// ClusterRole does not grant it, e.g. one from before lb read the kind).
fn not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            if status.code == 404 || status.code == 403
    )
}

/// The watched cluster, shared between the watcher tasks and the sync loop.
#[derive(Clone)]
pub struct KubeSource {
    tables: Arc<Mutex<Tables>>,
    stats: Arc<Mutex<WatchStats>>,
    changed: Arc<Notify>,
}

impl KubeSource {
    /// Start the three watchers. The node watch is limited to this node.
    pub fn start(client: Client, node_name: &str, service_proxy_name: Option<&str>) -> Self {
        let source = KubeSource {
            tables: Arc::default(),
            stats: Arc::default(),
            changed: Arc::new(Notify::new()),
        };
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let selector = label_selector(service_proxy_name);
        // Filtered by the API server, as kube-proxy's informers are: objects
        // lb would ignore never reach (or stay in) memory. An object that
        // gains one of these labels arrives as deleted. Services of another
        // proxy do come (the translation skips them): their ClusterIPs are
        // allocated, and the Service CIDR drop must spare them.
        source.spawn(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_SELECTOR),
        );
        source.spawn(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&selector),
        );
        source.spawn(Api::<Node>::all(client.clone()), node_cfg);
        // Optional: an API server before 1.33 (or without the
        // MultiCIDRServiceAllocator) does not serve ServiceCIDRs; the
        // first sync does not wait for them (see `ready`).
        source.spawn_optional(Api::<ServiceCIDR>::all(client), watcher::Config::default());
        source
    }

    fn spawn<K: Watched>(&self, api: Api<K>, config: watcher::Config) {
        self.spawn_watch(api, config, false);
    }

    /// `spawn` for a kind the API server may not serve: on a 404 (or 403) the watch
    /// rests and asks again later (an API server upgraded, or one of
    /// several behind a balancer answering for an older version), instead
    /// of retrying at the backoff's pace.
    fn spawn_optional<K: Watched>(&self, api: Api<K>, config: watcher::Config) {
        self.spawn_watch(api, config, true);
    }

    fn spawn_watch<K: Watched>(&self, api: Api<K>, config: watcher::Config, optional: bool) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut told = false;
            loop {
                let stream = watcher(api.clone(), config.clone()).backoff(WatchBackoff::default());
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(event) => this.apply(event),
                        Err(e) if optional && not_served(&e) => {
                            if !told {
                                info!(
                                    kind = K::KIND,
                                    "the API server does not serve this kind, or the ClusterRole does not grant it; asking again every {}s (--service-cidr still applies)",
                                    NOT_SERVED_RETRY.as_secs()
                                );
                                told = true;
                            }
                            break;
                        }
                        Err(e) => {
                            warn!(kind = K::KIND, error = %e, "watch failed; backing off and re-listing, the datapath keeps its state");
                            let mut stats = this.stats.lock().unwrap_or_else(|p| p.into_inner());
                            *stats.restarts.entry(K::KIND).or_default() += 1;
                        }
                    }
                }
                tokio::time::sleep(NOT_SERVED_RETRY).await;
            }
        });
    }

    fn apply<K: Watched>(&self, event: watcher::Event<K>) {
        let event = event.modify(strip);
        let mut guard = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let tables = &mut *guard;
        let mut changes = Vec::new();
        let table = K::table(tables);
        let changed = match event {
            watcher::Event::Init => {
                table.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                // An object the re-list finds unchanged (same resourceVersion)
                // keeps the copy already held: no second copy of the cluster.
                let key = key_of(&obj);
                let version = obj.meta().resource_version.as_deref();
                let kept = table
                    .live
                    .get(&key)
                    .filter(|old| version.is_some() && K::record_version(old) == version)
                    .cloned();
                let obj = match kept {
                    Some(old) => old,
                    None => {
                        // Records kept without a version compare by value.
                        let record = obj.record();
                        match table.live.get(&key) {
                            Some(old) if K::record_version(old).is_none() && **old == record => {
                                old.clone()
                            }
                            _ => Arc::new(record),
                        }
                    }
                };
                table.relist.get_or_insert_default().insert(key, obj);
                false
            }
            watcher::Event::InitDone => {
                let relisted = table.relist.take().unwrap_or_default();
                for (key, obj) in &relisted {
                    if !table.live.get(key).is_some_and(|old| Arc::ptr_eq(old, obj)) {
                        changes.push(K::change(key.clone(), Some(obj.clone())));
                    }
                }
                for key in table.live.keys() {
                    if !relisted.contains_key(key) {
                        changes.push(K::change(key.clone(), None));
                    }
                }
                table.live = relisted;
                if !table.ready {
                    info!(
                        kind = K::KIND,
                        objects = table.live.len(),
                        "initial list done"
                    );
                }
                table.ready = true;
                true
            }
            watcher::Event::Apply(obj) => {
                let key = key_of(&obj);
                debug!(kind = K::KIND, object = %key, "applied");
                let obj = Arc::new(obj.record());
                table.live.insert(key.clone(), obj.clone());
                changes.push(K::change(key, Some(obj)));
                table.ready
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj);
                debug!(kind = K::KIND, object = %key, "deleted");
                if table.live.remove(&key).is_some() {
                    changes.push(K::change(key, None));
                }
                table.ready
            }
        };
        for change in changes {
            let key = match &change {
                Change::Service(k, _) => ("Service", k.clone()),
                Change::EndpointSlice(k, _) => ("EndpointSlice", k.clone()),
                Change::Node(name, _) => ("Node", ObjectKey::new("", name.clone())),
                Change::ServiceCidr(name, _) => ("ServiceCIDR", ObjectKey::new("", name.clone())),
            };
            tables.changes.insert(key, change);
        }
        if changed {
            tables.pending_since.get_or_insert_with(Instant::now);
            drop(guard);
            self.changed.notify_one();
        }
    }

    /// Every watcher has completed its initial list.
    pub fn ready(&self) -> bool {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.services.ready && t.slices.ready && t.nodes.ready
    }

    /// A change arrived since the last snapshot.
    pub fn has_pending(&self) -> bool {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending_since
            .is_some()
    }

    /// Wait for the next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The object changes since the last call, and when the oldest arrived.
    pub fn take_changes(&self) -> (Vec<Change>, Option<Instant>) {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let changes = std::mem::take(&mut t.changes).into_values().collect();
        (changes, t.pending_since.take())
    }

    pub fn watch_stats(&self) -> WatchStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
