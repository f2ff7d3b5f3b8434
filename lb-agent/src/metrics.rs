//! `/metrics` in Prometheus text format (prometheus-client). Sync-loop
//! metrics are recorded as they happen; map occupancy and the datapath's
//! verdict counters are read from the pinned maps at scrape time.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
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

use crate::datapath::maps::{Maps, expected_shapes};

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
    bpffs: PathBuf,
}

impl Metrics {
    pub fn new(bpffs: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("lb");
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
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
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
        for shape in expected_shapes() {
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
