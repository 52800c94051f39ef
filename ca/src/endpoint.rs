//! The controller's plain-HTTP endpoint: `/metrics` (the Prometheus text format of the
//! registry built in [`crate::metrics`]) and `/ready` (200 once the workload source has
//! loaded, 503 before).
//!
//! Owns the routes only; the listener, its caps and timeouts are `membrane-runtime`'s, and
//! metric definitions stay in [`crate::metrics`]. It must not change any state.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use membrane_runtime::Reply;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::source::StateReceiver;

/// Serves `/metrics` and `/ready` on `listener` until `cancel` fires.
pub async fn serve(
    listener: membrane_runtime::listener::GuardedListener,
    registry: Arc<Registry>,
    ready: StateReceiver,
    timeouts: membrane_runtime::HttpTimeouts,
    cancel: CancellationToken,
) {
    let route: membrane_runtime::Route =
        Arc::new(move |path: &str| respond(path, &registry, &ready));
    membrane_runtime::serve_http(listener, route, timeouts, cancel).await;
}

fn respond(path: &str, registry: &Registry, ready: &StateReceiver) -> Reply {
    match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => Reply::ok(membrane_runtime::OPENMETRICS, text),
                Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        "/ready" if ready.borrow().is_some() => Reply::text(StatusCode::OK, "ready\n"),
        "/ready" => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "workload source not loaded\n",
        ),
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Binds the metrics listener (separate so `main` reports a busy port before starting work).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
