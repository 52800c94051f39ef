//! The gRPC `Certificates` service and the TLS server that carries it.
//!
//! Each call is checked in a fixed order, and every refusal gets its own status code, a
//! structured log line with the reason, and a count in `membrane_ca_csr_refused_total`:
//! credential (UNAUTHENTICATED; UNAVAILABLE when a TokenReview cannot be made) → CSR
//! (INVALID_ARGUMENT) → source loaded (UNAVAILABLE) → identity scheduled on the caller's node
//! (PERMISSION_DENIED). Only then is a certificate signed.

use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{TrustDomain, ValidatedCsr};
use membrane_proto::v1::certificates_server::{Certificates, CertificatesServer};
use membrane_proto::v1::{SignRequest, SignResponse};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::discovery::DiscoveryService;
use crate::metrics::{RefusalReason, SignMetrics};
use crate::node_auth;
use crate::serving::{ListenerConfig, ServingCert};
use crate::signer::Signer;
use crate::source::StateReceiver;
use crate::tokenreview::{NodeAuthFailure, NodeAuthenticator};
use membrane_proto::v1::discovery_server::DiscoveryServer;
use membrane_runtime::listener::ListenerMetrics;

/// The largest gRPC message the server decodes; a bigger request is refused by the transport
/// (RESOURCE_EXHAUSTED) before any parsing. CSRs above 16 KiB but below this get
/// INVALID_ARGUMENT from the CSR gate.
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// The largest discovery update sent (a snapshot of a large mesh).
pub const DISCOVERY_MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// The namespace and service account of the controller's own identity.
pub const CONTROLLER_NAMESPACE: &str = "membrane-system";
/// Service account of the controller.
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "membrane-ca";

/// DNS names the controller's serving certificate always carries.
pub const DEFAULT_SERVER_NAMES: &[&str] = &[
    "membrane-ca",
    "membrane-ca.membrane-system",
    "membrane-ca.membrane-system.svc",
    "localhost",
    "127.0.0.1",
    "::1",
];

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

/// The `Certificates` service.
#[derive(Debug, Clone)]
pub struct CertificateService {
    signer: Signer,
    authenticator: NodeAuthenticator,
    state: StateReceiver,
    metrics: SignMetrics,
}

impl CertificateService {
    /// A service signing with `signer` for nodes known by `authenticator` (bootstrap tokens
    /// or TokenReview), authorizing against the latest source state.
    pub fn new(
        signer: Signer,
        authenticator: impl Into<NodeAuthenticator>,
        state: StateReceiver,
        metrics: SignMetrics,
    ) -> Self {
        Self {
            signer,
            authenticator: authenticator.into(),
            state,
            metrics,
        }
    }

    fn trust_domain(&self) -> TrustDomain {
        self.signer.bundle().trust_domain().clone()
    }

    fn refuse(&self, reason: RefusalReason, status: Status) -> Status {
        self.metrics.refuse(reason);
        status
    }

    /// The node the call's `authorization: Bearer` credential belongs to (bootstrap token or
    /// TokenReview), or why it is refused ([`NodeAuthFailure::status`] is the gRPC answer).
    pub async fn authenticate_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<String, NodeAuthFailure> {
        self.authenticator.authenticate(metadata).await
    }
}

#[tonic::async_trait]
impl Certificates for CertificateService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.remote_addr();
        let node = match self.authenticate_caller(request.metadata()).await {
            Ok(node) => node,
            Err(failure) => {
                let reason = failure.refusal();
                tracing::warn!(peer = ?peer, reason = reason.as_str(), error = %failure, "refused certificate request: unauthenticated");
                return Err(self.refuse(reason, failure.status()));
            }
        };
        let request = request.into_inner();
        let csr = match ValidatedCsr::parse(&request.csr_der, &self.trust_domain()) {
            Ok(csr) => csr,
            Err(e) => {
                tracing::warn!(node, peer = ?peer, error = %e, "refused certificate request: invalid CSR");
                return Err(self.refuse(
                    RefusalReason::InvalidCsr,
                    Status::invalid_argument(e.to_string()),
                ));
            }
        };
        let identity = csr.identity();
        let Some(state) = self.state.borrow().clone() else {
            tracing::warn!(node, %identity, "refused certificate request: workload source not loaded yet");
            return Err(self.refuse(
                RefusalReason::SourceNotReady,
                Status::unavailable("the controller has not loaded its workload source yet"),
            ));
        };
        if let Err(e) = node_auth::authorize(&state, &node, identity) {
            let reason = match e {
                node_auth::NodeAuthError::NotInMesh { .. } => RefusalReason::NotInMesh,
                _ => RefusalReason::NotOnNode,
            };
            tracing::warn!(node, %identity, reason = reason.as_str(), error = %e, "refused certificate request: node not entitled");
            return Err(self.refuse(reason, Status::permission_denied(e.to_string())));
        }
        let requested = Duration::from_secs(request.ttl_seconds);
        let signed = match self.signer.sign(&csr, requested) {
            Ok(signed) => signed,
            Err(e) => {
                tracing::error!(node, %identity, error = %e, "signing failed");
                return Err(self.refuse(RefusalReason::Internal, Status::internal(e.to_string())));
            }
        };
        self.metrics.signed.inc();
        tracing::info!(
            node,
            %identity,
            serial = signed.serial,
            not_after = %signed.not_after,
            "issued workload certificate"
        );
        Ok(Response::new(SignResponse {
            cert_chain_der: signed.chain.iter().map(|c| c.to_vec()).collect(),
            trust_roots_der: self.signer.bundle().roots().map(|c| c.to_vec()).collect(),
            not_after_unix: signed.not_after.unix_timestamp(),
            refresh_at_unix: signed.refresh_at.unix_timestamp(),
        }))
    }
}

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
    let incoming =
        crate::serving::incoming(listener, Arc::new(config), limits, metrics, cancel.clone());
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        // A live client answers these PINGs, so it is never idle for `grpc_idle_timeout`.
        .http2_keepalive_interval(Some(keepalive_interval(limits.grpc_idle_timeout)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .concurrency_limit_per_connection(256)
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
