//! A typed client for `Certificates.Sign`, used by the `membrane` CLI and the tests.
//!
//! It generates each key on the calling side and sends only the CSR. (The ztunnel will carry
//! its own client: it must not depend on this crate.)

use std::time::Duration;

use membrane_identity::{TrustBundle, WorkloadIdentity, WorkloadSvid, csr};
use membrane_proto::v1::SignRequest;
use membrane_proto::v1::certificates_client::CertificatesClient;
use rustls_pki_types::CertificateDer;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Why a signing round trip failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint or TLS settings are invalid, or the connection failed.
    #[error("cannot reach the controller: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The token contains characters not allowed in metadata.
    #[error("the bootstrap token is not valid ASCII metadata")]
    BadToken,
    /// The controller refused the request.
    #[error("controller refused: {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The controller's message.
        message: String,
    },
    /// The CSR could not be built.
    #[error(transparent)]
    Csr(#[from] csr::CsrError),
    /// The returned certificate is not acceptable.
    #[error("controller returned an unusable certificate: {0}")]
    BadResponse(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// A connection to the controller's `Certificates` and `Discovery` services, authenticated as
/// one node.
#[derive(Debug, Clone)]
pub struct CaClient {
    inner: CertificatesClient<Channel>,
    discovery: membrane_proto::v1::discovery_client::DiscoveryClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl CaClient {
    /// Connects to `endpoint` (for example `https://127.0.0.1:15012`), trusting the PEM roots
    /// `root_pem` and expecting the server name `server_name`, with node token `token`.
    pub async fn connect(
        endpoint: &str,
        root_pem: &[u8],
        server_name: &str,
        token: &str,
    ) -> Result<Self, ClientError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(server_name);
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        Ok(Self {
            inner: CertificatesClient::new(channel.clone()),
            discovery: membrane_proto::v1::discovery_client::DiscoveryClient::new(channel)
                .max_decoding_message_size(crate::server::DISCOVERY_MAX_MESSAGE_LEN),
            authorization,
        })
    }

    /// Opens `Discovery.Watch` for `node`: the stream of that node's view.
    pub async fn watch(
        &mut self,
        node: &str,
    ) -> Result<tonic::Streaming<membrane_proto::v1::Update>, ClientError> {
        let mut request = tonic::Request::new(membrane_proto::v1::WatchRequest {
            node: node.to_owned(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        Ok(self.discovery.watch(request).await?.into_inner())
    }

    /// Confirms to the controller that `node` applied every update up to `version`.
    pub async fn ack(&mut self, node: &str, version: u64) -> Result<(), ClientError> {
        let mut request = tonic::Request::new(membrane_proto::v1::AckRequest {
            node: node.to_owned(),
            version,
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        self.discovery.ack(request).await?;
        Ok(())
    }

    /// Sends a raw DER CSR; returns the chain (leaf first) and the trust roots.
    pub async fn sign_raw(
        &mut self,
        csr_der: Vec<u8>,
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), ClientError> {
        let mut request = tonic::Request::new(SignRequest {
            csr_der,
            ttl_seconds: ttl.as_secs(),
        });
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let response = self.inner.sign(request).await?.into_inner();
        let chain = response
            .cert_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let roots = response
            .trust_roots_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        Ok((chain, roots))
    }

    /// Generates a key for `identity` here, has the controller sign it, and returns the SVID
    /// with the trust bundle the controller reported.
    pub async fn request_svid(
        &mut self,
        identity: &WorkloadIdentity,
        ttl: Duration,
    ) -> Result<(WorkloadSvid, TrustBundle), ClientError> {
        let generated = csr::generate(identity)?;
        let (chain, roots) = self.sign_raw(generated.csr.to_vec(), ttl).await?;
        let bundle = TrustBundle::new(identity.trust_domain().clone(), roots)
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let svid = WorkloadSvid::new(chain, generated.key, &membrane_identity::crypto_provider())
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        if svid.identity() != identity {
            return Err(ClientError::BadResponse(format!(
                "asked for {identity}, got {}",
                svid.identity()
            )));
        }
        Ok((svid, bundle))
    }
}
