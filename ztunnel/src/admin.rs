//! The ztunnel's HTTP endpoints: admin (127.0.0.1:15000), metrics (15020), readiness (15021).
//!
//! - `GET /config_dump` on the admin port: mesh workloads, Services, policies in force,
//!   enrolled pods, certificates (serial, expiry, next planned renewal, renewal failures),
//!   egress (EgressPolicies held, open decided connections, budget windows), the DNS capture
//!   (upstream, pin counts by pod UID), as JSON.
//! - `GET /metrics` on the metrics port: Prometheus text format.
//! - `GET /healthz/ready` on the readiness port: 200 once the mesh state is loaded and the
//!   enrollment socket is listening.

use std::sync::Arc;

use http::StatusCode;
use membrane_runtime::{Reply, Route};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::pods::PodRegistry;
use crate::proxy::Proxy;

/// The admin routes.
pub fn admin_routes(proxy: Arc<Proxy>, pods: Arc<PodRegistry>) -> Route {
    Arc::new(move |path: &str| match path {
        "/config_dump" => {
            let state = proxy.state.borrow().clone();
            let workloads: Vec<crate::state::Workload> = state
                .workloads()
                .iter()
                .map(|w| w.as_ref().clone())
                .collect();
            let dump = json!({
                "node": proxy.node,
                "workloads": workloads,
                "services": state.services(),
                "policies": proxy.authorizer.policy_names(),
                "enrolled": pods.names(),
                "certificates": proxy.certs.status(),
                "trustBundleRoots": proxy.certs.bundle().load().roots().len(),
                "hbonePoolConnections": proxy.pool.connection_count(),
                "egress": {
                    "policies": state
                        .egress()
                        .policies()
                        .iter()
                        .map(membrane_policy::egress::EgressPolicy::key)
                        .collect::<Vec<_>>(),
                    "openConnections": proxy.egress.open.len(),
                    "budgetWindows": proxy.egress.ledger.windows(),
                },
                "dns": {
                    "upstream": pods.dns().config.upstream,
                    "maxPinsPerPod": proxy.pins.max_per_pod(),
                    "pins": proxy.pins.counts(),
                },
            });
            match serde_json::to_string_pretty(&dump) {
                Ok(body) => Reply::ok("application/json", body),
                Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => Reply::text(StatusCode::NOT_FOUND, "try /config_dump\n"),
    })
}

/// The metrics route.
pub fn metrics_routes(registry: Arc<Registry>) -> Route {
    Arc::new(move |path: &str| match path {
        "/metrics" | "/stats/prometheus" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => Reply::ok(membrane_runtime::OPENMETRICS, text),
                Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => Reply::text(StatusCode::NOT_FOUND, "try /metrics\n"),
    })
}

/// The readiness route.
pub fn readiness_routes(ready: tokio::sync::watch::Receiver<bool>) -> Route {
    Arc::new(move |path: &str| match path {
        "/healthz/ready" if *ready.borrow() => Reply::text(StatusCode::OK, "ready\n"),
        "/healthz/ready" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => Reply::text(StatusCode::NOT_FOUND, "try /healthz/ready\n"),
    })
}
