//! `/healthz` and `/livez` as kube-proxy serves them (KEP-3836), with the
//! body `{"lastUpdated", "currentTime", "nodeEligible"}`:
//! - `/healthz` answers 503 while this node is being deleted (or the
//!   cluster autoscaler has tainted it `ToBeDeletedByClusterAutoscaler`),
//!   or when programming fails as a whole: no sync completed yet, or a
//!   change has waited past the timeout. A sync that leaves one Service out
//!   (it does not fit the maps) still completes: that Service is reported,
//!   the node stays healthy for the others.
//! - `/livez` answers 503 only when the agent's loop has stopped turning:
//!   a liveness probe restarts an agent that hangs, not one that cannot
//!   program a Service (a restart would program even less).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;

/// A change not programmed after this long makes the agent unhealthy
/// (kube-proxy's default healthz timeout is 2 x its 30 s sync period).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Inner {
    /// Wall clock of the last completed sync (None before the first).
    last_updated: Option<SystemTime>,
    /// The oldest change not yet programmed.
    pending_since: Option<Instant>,
    /// This node is not being deleted (kube-proxy's nodeEligible).
    node_eligible: bool,
    /// When the agent's loop last turned.
    beat: Instant,
}

/// Shared by the sync loop (writer) and the HTTP handlers (readers).
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub last_updated: String,
    pub current_time: String,
    pub node_eligible: bool,
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Health {
            inner: Arc::new(Mutex::new(Inner {
                last_updated: None,
                pending_since: None,
                node_eligible: true,
                beat: Instant::now(),
            })),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self, since: Instant) {
        self.lock().pending_since.get_or_insert(since);
    }

    /// Everything queued so far is programmed (a sync completed).
    pub fn updated(&self) {
        let mut i = self.lock();
        i.last_updated = Some(SystemTime::now());
        i.pending_since = None;
    }

    /// The agent's loop turned.
    pub fn beat(&self) {
        self.lock().beat = Instant::now();
    }

    /// Whether this node is to serve traffic (see `node_eligible`).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    fn body(i: &Inner) -> HealthBody {
        HealthBody {
            last_updated: i.last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(SystemTime::now()),
            node_eligible: i.node_eligible,
        }
    }

    /// (healthy, body) as `/healthz` reports it; `healthy` is also what the
    /// healthCheckNodePort servers report as `serviceProxyHealthy`.
    pub fn check(&self) -> (bool, HealthBody) {
        let i = self.lock();
        let stale = i.pending_since.is_some_and(|t| t.elapsed() > self.timeout);
        let healthy = i.last_updated.is_some() && !stale && i.node_eligible;
        (healthy, Self::body(&i))
    }

    /// (alive, body) as `/livez` reports it: the loop turned within the timeout.
    pub fn live(&self) -> (bool, HealthBody) {
        let i = self.lock();
        (i.beat.elapsed() <= self.timeout, Self::body(&i))
    }

    pub fn router(&self) -> Router {
        fn reply((ok, body): (bool, HealthBody)) -> impl IntoResponse {
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(body))
        }
        async fn healthz(State(h): State<Health>) -> impl IntoResponse {
            reply(h.check())
        }
        async fn livez(State(h): State<Health>) -> impl IntoResponse {
            reply(h.live())
        }
        Router::new()
            .route("/healthz", get(healthz))
            .route("/livez", get(livez))
            .with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_before_first_sync_and_when_a_change_waits_too_long() {
        let h = Health::new(Duration::from_millis(50));
        assert!(!h.check().0, "no sync yet");
        h.updated();
        assert!(h.check().0);
        h.queued(Instant::now());
        assert!(h.check().0, "a fresh pending change is fine");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.check().0, "a change pending past the timeout");
        h.updated();
        assert!(h.check().0);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let h = Health::new(Duration::from_secs(60));
        h.updated();
        h.set_node_eligible(false);
        let (healthy, body) = h.check();
        assert!(!healthy);
        assert!(!body.node_eligible);
        assert!(h.live().0, "the loop is alive: no restart");
        h.set_node_eligible(true);
        assert!(h.check().0);
    }

    #[test]
    fn livez_follows_the_loop_not_programming() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.live().0, "alive from the start, before any sync");
        assert!(!h.check().0);
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.live().0, "the loop has not turned within the timeout");
        h.beat();
        assert!(h.live().0);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t =
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000) + Duration::from_nanos(5);
        assert_eq!(rfc3339(t), "2026-05-28T20:26:40.000000005Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
    }
}
