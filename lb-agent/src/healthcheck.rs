//! healthCheckNodePort servers: for each LoadBalancer Service with
//! externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort
//! telling the cloud load balancer whether this node has endpoints for it,
//! as kube-proxy's service health server does: any path, 200 with local
//! endpoints and 503 without, a JSON body with the count.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    health::Health,
    model::{HealthCheck, ObjectKey},
};

#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

/// kube-proxy's body: `{"service":{"namespace","name"},"localEndpoints",
/// "serviceProxyHealthy"}`.
#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckBody {
    pub service: ServiceRef,
    pub local_endpoints: usize,
    pub service_proxy_healthy: bool,
}

/// One server's Service and local endpoint count, and the agent's health.
#[derive(Clone)]
struct Shared {
    check: Arc<Mutex<HealthCheck>>,
    health: Health,
}

struct Server {
    state: Shared,
    task: JoinHandle<()>,
}

/// The running servers, one per port; `update` starts, changes and stops them.
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    bind: Option<Ipv4Addr>,
    health: Health,
}

fn body(check: &HealthCheck, proxy_healthy: bool) -> HealthCheckBody {
    let ObjectKey { namespace, name } = check.service.clone();
    HealthCheckBody {
        service: ServiceRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    }
}

/// kube-proxy's answer: 200 only with local endpoints while the proxy is
/// healthy (/healthz would answer 200), so a load balancer drains a node
/// being deleted, or one whose programming has stopped.
async fn answer(State(state): State<Shared>) -> Response {
    let check = match state.check.lock() {
        Ok(c) => c.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let proxy_healthy = state.health.check().0;
    let status = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let text = serde_json::to_string(&body(&check, proxy_healthy)).unwrap_or_default();
    let mut response = (status, text).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(weight) = HeaderValue::from_str(&check.local_endpoints.to_string()) {
        headers.insert(
            HeaderName::from_static("x-load-balancing-endpoint-weight"),
            weight,
        );
    }
    response
}

impl HealthCheckServers {
    /// Servers listen on `bind` (default: every address) and report
    /// `health` as serviceProxyHealthy.
    pub fn new(bind: Option<Ipv4Addr>, health: Health) -> Self {
        HealthCheckServers {
            servers: BTreeMap::new(),
            bind,
            health,
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Serve exactly `wanted`: stop servers of ports no longer wanted,
    /// update the counts of the others, start new ones. A port that cannot
    /// be bound is logged and tried again on the next update.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                server.task.abort();
                info!(port, "healthCheckNodePort server stopped");
            }
        }
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                if let Ok(mut current) = server.state.check.lock() {
                    *current = check.clone();
                }
                continue;
            }
            let addr = SocketAddr::from((self.bind.unwrap_or(Ipv4Addr::UNSPECIFIED), *port));
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, service = %check.service, error = %e, "cannot serve healthCheckNodePort; will retry");
                    continue;
                }
            };
            let state = Shared {
                check: Arc::new(Mutex::new(check.clone())),
                health: self.health.clone(),
            };
            let router = Router::new().fallback(answer).with_state(state.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    warn!(error = %e, "healthCheckNodePort server stopped");
                }
            });
            info!(port, service = %check.service, "healthCheckNodePort server listening");
            self.servers.insert(*port, Server { state, task });
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_kube_proxys() {
        let check = HealthCheck {
            service: ObjectKey::new("default", "web"),
            local_endpoints: 2,
        };
        assert_eq!(
            serde_json::to_string(&body(&check, true)).unwrap(),
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
    }

    #[tokio::test]
    async fn servers_follow_the_desired_ports_and_counts() {
        let health = Health::new(std::time::Duration::from_secs(60));
        health.updated();
        let mut servers = HealthCheckServers::new(Some(Ipv4Addr::LOCALHOST), health.clone());
        // A free port: bind, note, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let check = |n| HealthCheck {
            service: ObjectKey::new("ns", "svc"),
            local_endpoints: n,
        };
        let get = || async move {
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                stream.read_to_string(&mut out)?;
                Ok::<_, std::io::Error>(out)
            })
            .await
            .unwrap()
        };
        servers.update(&BTreeMap::from([(port, check(1))]));
        let reply = get().await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(r#""localEndpoints":1"#), "{reply}");
        // A node being deleted: unhealthy for the load balancer, local endpoints or not.
        health.set_node_eligible(false);
        let reply = get().await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(reply.contains(r#""serviceProxyHealthy":false"#), "{reply}");
        health.set_node_eligible(true);
        servers.update(&BTreeMap::from([(port, check(0))]));
        let reply = get().await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(reply.contains(r#""serviceProxyHealthy":true"#), "{reply}");
        servers.update(&BTreeMap::new());
        assert!(servers.ports().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(get().await.is_err(), "port released after the Service went");
    }
}
