//! The gRPC `Certificates` service: turns an authenticated node's CSR into an X.509-SVID.
//!
//! Each call is checked in a fixed order, and every refusal gets its own status code, a
//! structured log line with the reason, and a count in `membrane_ca_csr_refused_total`:
//! credential (UNAUTHENTICATED; UNAVAILABLE when a TokenReview cannot be made) → CSR
//! (INVALID_ARGUMENT) → source loaded (UNAVAILABLE) → identity scheduled on the caller's node
//! (PERMISSION_DENIED). Only then is a certificate signed. The transport (TLS, limits) is
//! [`crate::server`]'s; this module must not listen on anything.

use std::time::Duration;

use membrane_identity::{TrustDomain, ValidatedCsr};
use membrane_proto::v1::certificates_server::Certificates;
use membrane_proto::v1::{SignRequest, SignResponse};
use tonic::{Request, Response, Status};

use crate::auth_deadline::AuthenticatedConnections;
use crate::metrics::{RefusalReason, SignMetrics};
use crate::node_auth;
use crate::signer::Signer;
use crate::source::StateReceiver;
use crate::tokenreview::NodeAuthenticator;

/// The `Certificates` service.
#[derive(Debug, Clone)]
pub struct CertificateService {
    signer: Signer,
    authenticator: NodeAuthenticator,
    state: StateReceiver,
    metrics: SignMetrics,
    authenticated: AuthenticatedConnections,
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
            authenticated: AuthenticatedConnections::default(),
        }
    }

    /// Marks the connections its calls authenticate on in `authenticated` (the node port's
    /// [`crate::auth_deadline`]).
    pub fn with_authenticated(mut self, authenticated: AuthenticatedConnections) -> Self {
        self.authenticated = authenticated;
        self
    }

    fn trust_domain(&self) -> TrustDomain {
        self.signer.bundle().trust_domain().clone()
    }

    fn refuse(&self, reason: RefusalReason, status: Status) -> Status {
        self.metrics.refuse(reason);
        status
    }
}

#[tonic::async_trait]
impl Certificates for CertificateService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.remote_addr();
        let caller = match self
            .authenticator
            .authenticate(request.metadata(), peer)
            .await
        {
            Ok(caller) => caller,
            Err(failure) => {
                let reason = failure.refusal();
                tracing::warn!(peer = ?peer, reason = reason.as_str(), error = %failure, "refused certificate request: unauthenticated");
                return Err(self.refuse(reason, failure.status()));
            }
        };
        self.authenticated.mark(peer);
        let node = caller.node.clone();
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
        let authorized = match &caller.gateway {
            None => node_auth::authorize(&state, &node, identity),
            Some(only) => node_auth::authorize_gateway(&state, &node, only, identity),
        };
        if let Err(e) = authorized {
            let reason = match e {
                node_auth::NodeAuthError::NotInMesh { .. } => RefusalReason::NotInMesh,
                node_auth::NodeAuthError::Reserved { .. } => RefusalReason::ReservedIdentity,
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
