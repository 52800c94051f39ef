//! Process plumbing shared by `membrane-ca` and `ztunnel`.
//!
//! The small plain-HTTP server behind their metrics, readiness and admin endpoints, the
//! guarded listener every server accepts on ([`listener`], [`idle`]), the shutdown signal, the
//! flags and log setup the binaries share ([`cli`]), poison-tolerant locking ([`sync`]) and
//! atomic, mode-preserving state files ([`fsutil`]).
//! Nothing domain-specific lives here.

pub mod cli;
pub mod fsutil;
pub mod idle;
pub mod listener;
pub mod slots;
pub mod sync;

pub use sync::lock;

use std::sync::Arc;
use std::time::Duration;

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

/// Timeouts of an HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Longest wait for a request's headers, from the moment the server waits for them.
    pub header: Duration,
    /// A connection on which nothing was received or sent for this long is closed.
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// Serves `route` on `listener` (HTTP/1.1) until `cancel` fires. The listener's caps bound the
/// connections; `timeouts` bound how long one may wait for headers or sit idle.
pub async fn serve_http(
    mut listener: listener::GuardedListener,
    route: Route,
    timeouts: HttpTimeouts,
    cancel: CancellationToken,
) {
    let server = HttpServer::new(listener.name(), listener.metrics().clone());
    loop {
        let (stream, peer, admission) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (server, route, cancel) = (server.clone(), route.clone(), cancel.clone());
        tokio::spawn(async move {
            let _admission = admission;
            server.serve(peer, stream, route, timeouts, cancel).await;
        });
    }
}

/// The HTTP side of a listener, for servers that do more than [`serve_http`] before HTTP
/// starts on a connection (a TLS handshake). Cheap to clone: one per connection.
#[derive(Debug, Clone)]
pub struct HttpServer {
    listener: &'static str,
    metrics: listener::ListenerMetrics,
    idle_expired: prometheus_client::metrics::counter::Counter,
}

impl HttpServer {
    /// The HTTP side of the listener `name`, counting into `metrics`.
    pub fn new(name: &'static str, metrics: listener::ListenerMetrics) -> Self {
        let idle_expired = metrics.timeout_counter(name, listener::TimeoutStage::Idle);
        Self {
            listener: name,
            metrics,
            idle_expired,
        }
    }

    /// The listener's metrics.
    pub fn metrics(&self) -> &listener::ListenerMetrics {
        &self.metrics
    }

    /// Serves `route` (GET only, HTTP/1.1) on `io`, accepted from `peer`, until the peer
    /// closes, a timeout of `timeouts` expires or `cancel` fires.
    pub async fn serve<IO>(
        self,
        peer: std::net::SocketAddr,
        io: IO,
        route: Route,
        timeouts: HttpTimeouts,
        cancel: CancellationToken,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            listener: name,
            metrics,
            idle_expired,
        } = self;
        let stream = idle::IdleTimeout::new(io, timeouts.idle, true, idle_expired);
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
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeouts.header)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::select! {
            _ = cancel.cancelled() => {}
            result = conn => if let Err(e) = result {
                if e.is_timeout() {
                    metrics.timed_out(name, listener::TimeoutStage::Header);
                }
                tracing::debug!(listener = name, %peer, error = %e, "HTTP connection ended with an error");
            },
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A client that asks for a large body and never reads it holds no slot past the idle
    /// timeout: a write that makes no progress is idleness too.
    #[tokio::test]
    async fn a_reader_that_never_reads_is_closed_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server_io, peer) = listener.accept().await.expect("accept");
        let big = "x".repeat(32 * 1024 * 1024);
        let route: Route = Arc::new(move |_| Reply::ok("text/plain", big.clone()));
        let server = HttpServer::new("test", listener::ListenerMetrics::default());
        let timeouts = HttpTimeouts {
            header: Duration::from_secs(5),
            idle: Duration::from_millis(300),
        };
        let serving =
            tokio::spawn(server.serve(peer, server_io, route, timeouts, CancellationToken::new()));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the connection outlived the idle timeout by seconds")
            .expect("join");
        drop(client);
    }
}
