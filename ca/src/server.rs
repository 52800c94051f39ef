//! The controller's gRPC transport: the TLS server that carries the `Certificates`
//! ([`crate::certificates`]) and `Discovery` ([`crate::discovery`]) services, with its message
//! size limits and HTTP/2 keepalive.
//!
//! Owns serving only; it must not decide anything about a call (that is the services') nor
//! about the serving certificate's names or rotation ([`crate::serving`]).

use std::sync::Arc;
use std::time::Duration;

use membrane_proto::v1::certificates_server::CertificatesServer;
use membrane_proto::v1::discovery_server::DiscoveryServer;
use membrane_runtime::listener::ListenerMetrics;
use tokio_util::sync::CancellationToken;

use crate::auth_deadline::AuthenticatedConnections;
use crate::certificates::CertificateService;
use crate::discovery::DiscoveryService;
use crate::serving::{ListenerConfig, ServingCert};

/// The largest gRPC message the server decodes; a bigger request is refused by the transport
/// (RESOURCE_EXHAUSTED) before any parsing. CSRs above 16 KiB but below this get
/// INVALID_ARGUMENT from the CSR gate.
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// The largest discovery update sent (a snapshot of a large mesh).
pub const DISCOVERY_MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The serving certificate could not be made.
    #[error("cannot issue the controller's serving certificate: {0}")]
    Certificate(String),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Streams one connection may have open at once: a node's few watches and the certificate
/// requests of its pods starting together (a ztunnel queues the rest).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The server's HTTP/2 keepalive PING interval: 10 s, or a third of the idle timeout when that
/// is shorter.
fn keepalive_interval(idle: Duration) -> Duration {
    Duration::from_secs(10)
        .min(idle / 3)
        .max(Duration::from_millis(100))
}

/// Serves `service` and `discovery` over TLS (with the rotating `serving` certificate) on
/// `listener` until `cancel` fires, within the caps and timeouts of `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: CertificateService,
    discovery: DiscoveryService,
    serving: Arc<ServingCert>,
    limits: ListenerConfig,
    metrics: ListenerMetrics,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let config = serving
        .server_config()
        .map_err(|e| ServerError::Certificate(e.to_string()))?;
    // A connection must have a call authenticate on it within the idle timeout.
    let authenticated = AuthenticatedConnections::default();
    let service = service.with_authenticated(authenticated.clone());
    let discovery = discovery.with_authenticated(authenticated.clone());
    let incoming = crate::serving::incoming(
        listener,
        Arc::new(config),
        limits,
        metrics,
        authenticated,
        cancel.clone(),
    );
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        // A live client answers these PINGs, so it is never idle for `grpc_idle_timeout`.
        .http2_keepalive_interval(Some(keepalive_interval(limits.grpc_idle_timeout)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // Announced to the client (SETTINGS_MAX_CONCURRENT_STREAMS), which queues beyond it;
        // without it one connection could open streams without bound. Equal to the
        // concurrency limit, so no admitted stream waits outside the request timeout.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .add_service(
            CertificatesServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_LEN)
                .max_encoding_message_size(MAX_MESSAGE_LEN),
        )
        .add_service(
            DiscoveryServer::new(discovery)
                .max_decoding_message_size(MAX_MESSAGE_LEN)
                .max_encoding_message_size(DISCOVERY_MAX_MESSAGE_LEN),
        )
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await?;
    Ok(())
}
