//! Workload certificates: keys made on this node, SVIDs signed by the controller.
//!
//! For each local identity the manager generates an ECDSA P-256 key here, sends only a CSR to
//! `Certificates.Sign` (authenticated with the node's bootstrap token), and caches the SVID.
//! Callers for one identity share one request (per-identity lock). An SVID is refreshed once
//! half its lifetime has passed; if the refresh fails, the still-valid SVID keeps serving. The
//! trust roots the controller returns replace the shared bundle, so verifiers pick up a root
//! rotation at their next handshake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use membrane_identity::{SharedTrustBundle, TrustBundle, WorkloadIdentity, WorkloadSvid, csr};
use membrane_proto::v1::SignRequest;
use membrane_proto::v1::certificates_client::CertificatesClient;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

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
}

/// Expiry information for the admin config dump and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateStatus {
    /// SPIFFE ID.
    pub identity: String,
    /// Serial (hex).
    pub serial: String,
    /// Seconds since the epoch when the SVID expires.
    pub not_after_unix: u64,
    /// Seconds until expiry (0 when expired).
    pub expires_in_seconds: u64,
}

type Slot = Arc<tokio::sync::Mutex<Option<WorkloadSvid>>>;

/// Deadline of one signing call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Issues and caches the SVIDs of this node's workloads.
#[derive(Debug)]
pub struct CertificateManager {
    config: CaConfig,
    bundle: SharedTrustBundle,
    /// The signing client and the bundle its channel trusts (rebuilt when the bundle
    /// changes, so a rotated controller certificate is trusted).
    client: tokio::sync::Mutex<Option<(Arc<TrustBundle>, CertificatesClient<Channel>)>>,
    slots: Mutex<HashMap<WorkloadIdentity, Slot>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn needs_refresh(svid: &WorkloadSvid, now: SystemTime) -> bool {
    let info = svid.info();
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let refresh_at = info.not_before + lifetime / 2;
    now >= refresh_at || !svid.is_valid_at(now)
}

// === impl CertificateManager ===

impl CertificateManager {
    /// A manager for `config`; `bundle` is the bootstrap trust bundle, updated from responses.
    pub fn new(config: CaConfig, bundle: SharedTrustBundle) -> Self {
        Self {
            config,
            bundle,
            client: tokio::sync::Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The trust bundle peers are verified against.
    pub fn bundle(&self) -> SharedTrustBundle {
        self.bundle.clone()
    }

    /// The SVID for `identity`, fetching or refreshing it as needed.
    pub async fn svid(&self, identity: &WorkloadIdentity) -> Result<WorkloadSvid, CertError> {
        let slot = lock(&self.slots)
            .entry(identity.clone())
            .or_default()
            .clone();
        let mut current = slot.lock().await;
        let now = SystemTime::now();
        if let Some(svid) = current.as_ref()
            && !needs_refresh(svid, now)
        {
            return Ok(svid.clone());
        }
        match self.fetch(identity).await {
            Ok(svid) => {
                tracing::info!(
                    %identity,
                    serial = svid.info().serial,
                    old_serial = current.as_ref().map(|s| s.info().serial.clone()),
                    "workload certificate issued"
                );
                *current = Some(svid.clone());
                Ok(svid)
            }
            Err(e) => match current.as_ref() {
                Some(old) if old.is_valid_at(now) => {
                    tracing::warn!(%identity, error = %e, "renewal failed; serving the still-valid certificate");
                    Ok(old.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// Forgets an identity whose last pod left the node.
    pub fn forget(&self, identity: &WorkloadIdentity) {
        lock(&self.slots).remove(identity);
    }

    /// Expiry of every cached SVID.
    pub fn status(&self) -> Vec<CertificateStatus> {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        let now = SystemTime::now();
        let mut out: Vec<CertificateStatus> = slots
            .iter()
            .filter_map(|slot| {
                let guard = slot.try_lock().ok()?;
                let svid = guard.as_ref()?;
                let secs = |t: SystemTime| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                };
                Some(CertificateStatus {
                    identity: svid.identity().to_string(),
                    serial: svid.info().serial.clone(),
                    not_after_unix: secs(svid.info().not_after),
                    expires_in_seconds: svid
                        .info()
                        .not_after
                        .duration_since(now)
                        .map_or(0, |d| d.as_secs()),
                })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    async fn client(&self) -> Result<CertificatesClient<Channel>, CertError> {
        let mut guard = self.client.lock().await;
        let bundle = self.bundle.load();
        if let Some((trusted, client)) = guard.as_ref()
            && **trusted == *bundle
        {
            return Ok(client.clone());
        }
        let client = CertificatesClient::new(channel(&self.config, &bundle, Some(CALL_TIMEOUT))?);
        *guard = Some((bundle, client.clone()));
        Ok(client)
    }

    async fn fetch(&self, identity: &WorkloadIdentity) -> Result<WorkloadSvid, CertError> {
        let generated =
            csr::generate(identity).map_err(|e| CertError::BadResponse(e.to_string()))?;
        let mut request = tonic::Request::new(SignRequest {
            csr_der: generated.csr.to_vec(),
            ttl_seconds: self.config.ttl.as_secs(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.config.bearer()?);
        let response = self
            .client()
            .await?
            .sign(request)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => {
                    CertError::Connect(s.message().to_owned())
                }
                code => CertError::Refused {
                    identity: identity.to_string(),
                    code,
                    message: s.message().to_owned(),
                },
            })?
            .into_inner();
        let roots: Vec<CertificateDer<'static>> = response
            .trust_roots_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        if !roots.is_empty() {
            let bundle = TrustBundle::new(identity.trust_domain().clone(), roots)
                .map_err(|e| CertError::BadResponse(e.to_string()))?;
            if *self.bundle.load() != bundle {
                tracing::info!(roots = bundle.roots().len(), "trust bundle updated");
                self.bundle.store(bundle);
            }
        }
        let chain = response
            .cert_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let svid = WorkloadSvid::new(chain, generated.key, &membrane_identity::crypto_provider())
            .map_err(|e| CertError::BadResponse(e.to_string()))?;
        if svid.identity() != identity {
            return Err(CertError::BadResponse(format!(
                "asked for {identity}, got {}",
                svid.identity()
            )));
        }
        Ok(svid)
    }
}
