//! `/metrics` in Prometheus text format (prometheus-client). Sync-loop
//! metrics are recorded as they happen; map occupancy and the datapath's
//! verdict counters are read from the pinned maps at scrape time. Beside
//! lb's own (`lb_*`), kube-proxy's sync metrics (`kubeproxy_*`, its names,
//! meanings and buckets), so dashboards and scalability tests made for
//! kube-proxy work unchanged.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::SystemTime,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use aya::maps::MapInfo;
use lb_common::{map_names, stat};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    datapath::maps::{Maps, expected_shapes},
    model::{ObjectKey, cluster::ClusterState},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabel {
    pub counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// One frontend of one Service (`--service-counters`): bounded by the
/// frontends the node programs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendLabel {
    /// `namespace/name` ("" when unnamed).
    pub service: String,
    pub port_name: String,
    /// `ip:port`.
    pub frontend: String,
    pub protocol: String,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    pub traffic_policy: String,
}

/// kube-proxy's metrics (pkg/proxy/metrics), fed by the same sync loop.
#[derive(Clone)]
pub struct KubeProxyMetrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`.
    pub sync_duration: Histogram,
    /// `kubeproxy_network_programming_duration_seconds`: from an
    /// EndpointSlice's last-change-trigger-time to its change programmed.
    pub network_programming: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    last_sync: Gauge<f64, AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`.
    no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
}

impl KubeProxyMetrics {
    /// A sync that programmed the maps ended now.
    /// A sync that programmed everything; `no_local`: Service ports without
    /// a local endpoint under (internal, external) traffic policy Local.
    pub fn synced(&self, elapsed_s: f64, no_local: (usize, usize)) {
        self.sync_duration.observe(elapsed_s);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_sync.set(now);
        for (policy, n) in [("internal", no_local.0), ("external", no_local.1)] {
            self.no_local_endpoints
                .get_or_create(&TrafficPolicyLabel {
                    traffic_policy: policy.into(),
                })
                .set(n as i64);
        }
    }
}

/// kube-proxy's network programming buckets: 0.25 s, 0.5 s, 1..59 s, 60..115 s
/// by 5, 120..300 s by 30.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

/// Which EndpointSlice changes a sync programs, by their trigger times: a
/// slice whose annotation differs from the one last seen is a change to
/// measure. The first sync only learns them (kube-proxy measures changes
/// it saw happen, not the state it starts in).
#[derive(Debug, Default)]
pub struct TriggerTimes {
    seen: BTreeMap<ObjectKey, String>,
    primed: bool,
}

impl TriggerTimes {
    /// Seconds from each new trigger time of the `changed` slices to `now`
    /// (negative clock skew dropped), remembering their current trigger
    /// times; the first call only learns them.
    pub fn programmed<'a>(
        &mut self,
        state: &ClusterState,
        changed: impl IntoIterator<Item = &'a ObjectKey>,
        now: SystemTime,
    ) -> Vec<f64> {
        let mut latencies = Vec::new();
        for key in changed {
            let trigger = state
                .endpoint_slices
                .get(key)
                .and_then(|slice| slice.trigger_time.as_ref());
            let Some(trigger) = trigger else {
                self.seen.remove(key);
                continue;
            };
            if self.primed && self.seen.get(key) != Some(trigger) {
                let at = trigger.parse::<k8s_openapi::jiff::Timestamp>().ok();
                let now_ts = k8s_openapi::jiff::Timestamp::try_from(now).ok();
                if let (Some(at), Some(now_ts)) = (at, now_ts) {
                    let s = now_ts.duration_since(at).as_secs_f64();
                    if s >= 0.0 {
                        latencies.push(s);
                    }
                }
            }
            self.seen.insert(key.clone(), trigger.clone());
        }
        self.primed = true;
        latencies
    }
}

/// Everything exported; cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub services_programmed: Gauge,
    pub endpoints_programmed: Gauge,
    pub sync_errors: Counter,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    datapath: Family<CounterLabel, Gauge>,
    watch_restarts: Family<KindLabel, Gauge>,
    not_programmed: Family<ReasonLabel, Gauge>,
    /// Per-frontend series (`--service-counters`), by counter name.
    per_service: Option<[(&'static str, Family<FrontendLabel, Gauge>); 5]>,
    pub kube_proxy: KubeProxyMetrics,
    bpffs: PathBuf,
}

impl Metrics {
    /// `per_service`: export the per-frontend counters (`--service-counters`).
    pub fn new(bpffs: PathBuf, per_service: bool) -> Self {
        let mut root = Registry::default();
        let kube_proxy = KubeProxyMetrics {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            network_programming: Histogram::new(network_programming_buckets()),
            last_sync: Gauge::default(),
            no_local_endpoints: Family::default(),
        };
        let kp = root.sub_registry_with_prefix("kubeproxy");
        kp.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            kube_proxy.sync_duration.clone(),
        );
        kp.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            kube_proxy.network_programming.clone(),
        );
        kp.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            kube_proxy.last_sync.clone(),
        );
        kp.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            kube_proxy.no_local_endpoints.clone(),
        );
        let registry = root.sub_registry_with_prefix("lb");
        let sync_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            registry: Arc::default(),
            sync_duration: sync_duration.clone(),
            network_programming: network_programming.clone(),
            services_programmed: Gauge::default(),
            endpoints_programmed: Gauge::default(),
            sync_errors: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            datapath: Family::default(),
            watch_restarts: Family::default(),
            not_programmed: Family::default(),
            per_service: per_service.then(|| {
                ["packets", "bytes", "new_connections", "refused", "dropped"]
                    .map(|name| (name, Family::default()))
            }),
            kube_proxy,
            bpffs,
        };
        registry.register(
            "sync_duration_seconds",
            "Time of one sync: assembling the cluster state, translation and map writes",
            sync_duration,
        );
        registry.register(
            "network_programming_duration_seconds",
            "From a change reaching the agent (watch event or file change) to the maps holding it",
            network_programming,
        );
        registry.register(
            "services_programmed",
            "Frontends in the datapath",
            m.services_programmed.clone(),
        );
        registry.register(
            "endpoints_programmed",
            "Backends in the datapath",
            m.endpoints_programmed.clone(),
        );
        registry.register(
            "sync_errors",
            "Services that could not be programmed (map full ...)",
            m.sync_errors.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each pinned map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of each pinned map",
            m.map_capacity.clone(),
        );
        registry.register(
            "datapath_packets",
            "Packets per verdict and reason, summed over CPUs (agent_* counters: agent events)",
            m.datapath.clone(),
        );
        registry.register(
            "watch_restarts",
            "Kubernetes watches restarted after an error, per kind",
            m.watch_restarts.clone(),
        );
        registry.register(
            "services_not_programmed",
            "Service ports and Service IPs the maps do not hold, by reason (map_full: they do not fit; write_failed: the kernel refused the write)",
            m.not_programmed.clone(),
        );
        if let Some(families) = &m.per_service {
            for (name, family) in families {
                registry.register(
                    format!("service_{name}"),
                    format!(
                        "Per Service frontend: {} (summed over CPUs; packets and bytes are client to frontend)",
                        name.replace('_', " ")
                    ),
                    family.clone(),
                );
            }
        }
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = root;
        m
    }

    /// Objects not programmed: (did not fit, kernel refused).
    pub fn set_not_programmed(&self, map_full: usize, write_failed: usize) {
        for (reason, n) in [("map_full", map_full), ("write_failed", write_failed)] {
            self.not_programmed
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .set(n as i64);
        }
    }

    pub fn set_watch_restarts(&self, kind: &str, n: u64) {
        self.watch_restarts
            .get_or_create(&KindLabel { kind: kind.into() })
            .set(n as i64);
    }

    /// Read occupancy and counters from the pins (another process's view is fine).
    fn refresh_from_maps(&self) {
        let Ok(maps) = Maps::open_pinned(&self.bpffs) else {
            return;
        };
        // The event ring buffer's capacity is in bytes, not entries.
        for shape in expected_shapes()
            .into_iter()
            .filter(|s| s.name != map_names::EVENTS)
        {
            // The agent may have sized a map differently (--lb-map-max).
            let capacity = MapInfo::from_pin(self.bpffs.join(shape.name))
                .map_or(shape.max_entries, |i| i.max_entries());
            self.map_capacity
                .get_or_create(&MapLabel {
                    map: shape.name.into(),
                })
                .set(capacity as i64);
        }
        let counts = [
            (map_names::SERVICES, maps.services.keys().count()),
            (map_names::BACKENDS, maps.backends.keys().count()),
            (map_names::BACKEND_SETS, maps.backend_sets.keys().count()),
            (map_names::BACKEND_SLOTS, maps.backend_slots.keys().count()),
            (map_names::SET_MEMBERS, maps.set_members.keys().count()),
            (map_names::REV_NAT, maps.rev_nat.keys().count()),
            (map_names::CT_TCP, maps.ct_tcp.keys().count()),
            (map_names::CT_OTHER, maps.ct_other.keys().count()),
            (map_names::AFFINITY, maps.affinity.keys().count()),
        ];
        for (name, n) in counts {
            self.map_entries
                .get_or_create(&MapLabel { map: name.into() })
                .set(n as i64);
        }
        if let Some(families) = &self.per_service
            && let Ok(frontends) = crate::dump::service_counters(&maps)
        {
            for (_, family) in families {
                // Frontends that went must not keep their series.
                family.clear();
            }
            for f in frontends {
                let label = FrontendLabel {
                    service: f.service.unwrap_or_default(),
                    port_name: f.port_name.unwrap_or_default(),
                    frontend: f.frontend,
                    protocol: f.protocol,
                    scope: f
                        .scope
                        .map_or_else(String::new, |s| format!("{s:?}").to_lowercase()),
                };
                let values = [f.packets, f.bytes, f.new_connections, f.refused, f.dropped];
                for ((_, family), value) in families.iter().zip(values) {
                    family.get_or_create(&label).set(value as i64);
                }
            }
        }
        if let Ok(values) = maps.read_stats() {
            for (i, v) in values.iter().enumerate() {
                self.datapath
                    .get_or_create(&CounterLabel {
                        counter: stat::NAMES[i].into(),
                    })
                    .set(*v as i64);
            }
        }
    }

    pub fn render(&self) -> String {
        self.refresh_from_maps();
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn router(&self) -> Router {
        async fn handler(State(m): State<Metrics>) -> impl IntoResponse {
            let body = tokio::task::spawn_blocking(move || m.render())
                .await
                .unwrap_or_default();
            (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                body,
            )
        }
        Router::new()
            .route("/metrics", get(handler))
            .with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;
    use crate::model::records::TRIGGER_TIME;

    fn slice(name: &str, trigger: Option<&str>) -> (ObjectKey, Arc<crate::model::SliceRecord>) {
        let mut meta = serde_json::json!({"name": name, "namespace": "default"});
        if let Some(t) = trigger {
            meta["annotations"] = serde_json::json!({ TRIGGER_TIME: t });
        }
        let s: EndpointSlice = serde_json::from_value(
            serde_json::json!({"metadata": meta, "addressType": "IPv4", "endpoints": []}),
        )
        .unwrap();
        (ObjectKey::new("default", name), Arc::new((&s).into()))
    }

    #[test]
    fn network_programming_is_measured_from_new_trigger_times_only() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        let mut state = ClusterState::default();
        state
            .endpoint_slices
            .extend([slice("a", Some("2023-11-14T22:13:20Z")), slice("b", None)]);
        let mut times = TriggerTimes::default();
        let all: Vec<ObjectKey> = state.endpoint_slices.keys().cloned().collect();
        // The first sync learns what it starts from.
        assert_eq!(times.programmed(&state, &all, now), Vec::<f64>::new());
        assert_eq!(times.programmed(&state, &all, now), Vec::<f64>::new());
        // a changes (triggered 4 s before now), c appears (10 s before).
        state.endpoint_slices.extend([
            slice("a", Some("2023-11-14T22:13:26Z")),
            slice("c", Some("2023-11-14T22:13:20.000Z")),
        ]);
        let changed = [
            ObjectKey::new("default", "a"),
            ObjectKey::new("default", "c"),
        ];
        let mut got = times.programmed(&state, &changed, now);
        got.sort_by(f64::total_cmp);
        assert_eq!(got, vec![4.0, 10.0]);
        // Measured once, even if named again.
        assert_eq!(times.programmed(&state, &changed, now), Vec::<f64>::new());
    }

    #[test]
    fn kube_proxys_network_programming_buckets() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 2 + 59 + 12 + 7);
        assert_eq!(&b[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[60], 59.0);
        assert_eq!(b[61], 60.0);
        assert_eq!(b[72], 115.0);
        assert_eq!(b[73], 120.0);
        assert_eq!(*b.last().unwrap(), 300.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
