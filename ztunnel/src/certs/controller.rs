//! The signing call: a key made here, a CSR to `Certificates.Sign`, the response checked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_identity::{SharedTrustBundle, TrustBundle, WorkloadIdentity, WorkloadSvid, csr};
use membrane_proto::v1::SignRequest;
use membrane_proto::v1::certificates_client::CertificatesClient;
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

use super::{CaConfig, CertError, channel};

/// Deadline of one signing call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A freshly issued SVID and the controller's suggested renewal time.
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    pub svid: WorkloadSvid,
    pub refresh_at: Option<SystemTime>,
}

/// Where SVIDs come from: the controller, or a stand-in in tests.
pub(crate) trait SvidSource: Send + Sync + std::fmt::Debug {
    fn issue<'a>(
        &'a self,
        identity: &'a WorkloadIdentity,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CertError>> + Send + 'a>>;
}

/// Signs through the controller's `Certificates` service.
#[derive(Debug)]
pub(crate) struct Controller {
    config: CaConfig,
    bundle: SharedTrustBundle,
    /// The signing client and the bundle its channel trusts (rebuilt when the bundle
    /// changes, so a rotated controller certificate is trusted).
    client: tokio::sync::Mutex<Option<(Arc<TrustBundle>, CertificatesClient<Channel>)>>,
}

impl Controller {
    pub(crate) fn new(config: CaConfig, bundle: SharedTrustBundle) -> Self {
        Self {
            config,
            bundle,
            client: tokio::sync::Mutex::new(None),
        }
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

    async fn fetch(&self, identity: &WorkloadIdentity) -> Result<Issued, CertError> {
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
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
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
        let refresh_at = u64::try_from(response.refresh_at_unix)
            .ok()
            .filter(|secs| *secs > 0)
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        Ok(Issued { svid, refresh_at })
    }
}

impl SvidSource for Controller {
    fn issue<'a>(
        &'a self,
        identity: &'a WorkloadIdentity,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, CertError>> + Send + 'a>> {
        Box::pin(self.fetch(identity))
    }
}
