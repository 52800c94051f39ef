//! Process plumbing shared by `membrane-ca` and `ztunnel`.
//!
//! The small plain-HTTP server behind their metrics, readiness and admin endpoints, and the
//! shutdown signal. Nothing domain-specific lives here.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use tokio_util::sync::CancellationToken;

/// A plain-text (or JSON) response for an admin endpoint.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: http::StatusCode,
    /// `content-type` header.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Reply {
    /// 200 with `body` of `content_type`.
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: http::StatusCode::OK,
            content_type,
            body,
        }
    }

    /// `status` with a plain-text body.
    pub fn text(status: http::StatusCode, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
        }
    }
}

/// Answers a request by path (GET only; the body is ignored).
pub type Route = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Serves `route` on `listener` (HTTP/1.1) until `cancel` fires.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    route: Route,
    cancel: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener accept failed");
                    continue;
                }
            },
        };
        let route = route.clone();
        let conn_cancel = cancel.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = if req.method() == http::Method::GET {
                        route(req.uri().path())
                    } else {
                        Reply::text(http::StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
                    };
                    async move { Ok::<_, std::convert::Infallible>(to_response(reply)) }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn_cancel.cancelled() => {}
                result = conn => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                },
            }
        });
    }
}

fn to_response(reply: Reply) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(reply.content_type),
    );
    response
}

/// The Prometheus text exposition content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Completes on SIGTERM or SIGINT: the process's one drain signal. If the handlers cannot be
/// installed it logs why and never completes (the process can then only be killed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
