//! Workload certificates: keys made on this node, SVIDs signed by the controller, renewed
//! before they expire.
//!
//! For each local identity the [`CertificateManager`] generates an ECDSA P-256 key here, sends
//! only a CSR to `Certificates.Sign` (authenticated with the node's bootstrap token), and
//! caches the SVID. Handshakes take the cached SVID without waiting; a renewal scheduler
//! ([`CertificateManager::run_renewals`]) replaces it at the controller's renewal point plus
//! jitter ([`schedule`]), retrying with capped exponential backoff while the still-valid one
//! keeps serving. An expired certificate is never handed out: callers get
//! [`CertError::Expired`] until the controller answers again. The trust roots the controller
//! returns replace the shared bundle, so verifiers pick up a root rotation at their next
//! handshake.
//!
//! - `controller`: the signing call (key, CSR, response checks, bundle update).
//! - `manager`: the per-identity cache, the scheduler, status for the config dump.
//! - `metrics`: renewal results, expiry per identity (computed at scrape time), connections
//!   refused for want of a certificate.
//! - [`schedule`]: when to renew and how long to back off (pure functions).
//! - `tls`: the client and server TLS configurations built from an SVID, cached per
//!   certificate serial ([`TlsConfigs`]).

use std::time::Duration;

use membrane_identity::TrustBundle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

mod controller;
mod manager;
mod metrics;
pub mod schedule;
mod tls;

pub use manager::{CertificateManager, CertificateStatus};
pub use metrics::CertMetrics;
pub use tls::{TlsConfigError, TlsConfigs};

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// `https://host:15012`.
    pub endpoint: String,
    /// PEM roots that authenticate the controller (the bootstrap bundle).
    pub root_pem: Vec<u8>,
    /// Name the controller's certificate must carry.
    pub server_name: String,
    /// This node's credential as read at start: a bootstrap token, or a projected
    /// ServiceAccount token.
    pub token: String,
    /// Where the credential is read from again before each call (projected tokens are
    /// rotated by the kubelet); `None` keeps `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// Requested SVID lifetime (zero: the controller's default).
    pub ttl: Duration,
}

impl CaConfig {
    /// The `authorization` metadata value: `Bearer <credential>`, re-read from the token
    /// file when there is one (falling back to the credential read at start when the file
    /// is unreadable or empty, with a warning).
    pub fn bearer(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, CertError> {
        let fresh = self.token_file.as_ref().and_then(|path| {
            match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "token file is empty; using the token read at start");
                    None
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot re-read the token file; using the token read at start");
                    None
                }
            }
        });
        let token = fresh.as_deref().unwrap_or(&self.token);
        format!("Bearer {token}")
            .parse()
            .map_err(|_| CertError::Connect("the node token is not valid ASCII".into()))
    }
}

/// Why an SVID could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The controller could not be reached.
    #[error("cannot reach the controller: {0}")]
    Connect(String),
    /// The controller refused.
    #[error("controller refused the certificate for {identity}: {code:?}: {message}")]
    Refused {
        /// The identity.
        identity: String,
        /// gRPC status.
        code: tonic::Code,
        /// Message.
        message: String,
    },
    /// The response was unusable.
    #[error("controller returned an unusable certificate: {0}")]
    BadResponse(String),
    /// The certificate expired and could not be renewed: the identity cannot open or accept
    /// connections until the controller answers again.
    #[error(
        "the workload certificate of {identity} expired at {expired_at} and renewal failed: {last_error}"
    )]
    Expired {
        /// The identity.
        identity: String,
        /// When the certificate expired (RFC 3339).
        expired_at: String,
        /// Why the last renewal attempt failed.
        last_error: String,
    },
}

/// A lazily connecting TLS channel to the controller, authenticated by the roots of `bundle`
/// (the bootstrap roots at first, then the streamed bundle, so the controller stays trusted
/// across a root rotation) and the controller's name, with a deadline per call when
/// `timeout` is set (not for streams). HTTP/2 keepalives notice a vanished controller.
pub fn channel(
    config: &CaConfig,
    bundle: &TrustBundle,
    timeout: Option<Duration>,
) -> Result<Channel, CertError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle.to_pem()))
        .domain_name(config.server_name.clone());
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| CertError::Connect(e.to_string()))?;
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    Ok(endpoint
        .tls_config(tls)
        .map_err(|e| CertError::Connect(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}
