//! `/healthz` and `/livez` as kube-proxy serves them: 200 with
//! `{"lastUpdated", "currentTime", "nodeEligible"}` while the datapath is
//! programmed and no change has waited past the timeout, 503 otherwise.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;

/// A change not programmed after this long makes the agent unhealthy
/// (kube-proxy's default healthz timeout is 2 x its 30 s sync period).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Inner {
    /// Wall clock of the last successful sync (None before the first).
    last_updated: Option<SystemTime>,
    /// The oldest change not yet programmed.
    pending_since: Option<Instant>,
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
            inner: Arc::default(),
            timeout,
        }
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self, since: Instant) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.pending_since.get_or_insert(since);
    }

    /// Everything queued so far is programmed.
    pub fn updated(&self) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.last_updated = Some(SystemTime::now());
        i.pending_since = None;
    }

    /// (healthy, body) as `/healthz` reports it.
    pub fn check(&self) -> (bool, HealthBody) {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let stale = i.pending_since.is_some_and(|t| t.elapsed() > self.timeout);
        let healthy = i.last_updated.is_some() && !stale;
        let body = HealthBody {
            last_updated: i.last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(SystemTime::now()),
            node_eligible: true,
        };
        (healthy, body)
    }

    pub fn router(&self) -> Router {
        async fn handler(State(h): State<Health>) -> impl IntoResponse {
            let (healthy, body) = h.check();
            let code = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(body))
        }
        Router::new()
            .route("/healthz", get(handler))
            .route("/livez", get(handler))
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
