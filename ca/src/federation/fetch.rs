//! Fetching one federated trust domain's bundle from its SPIFFE bundle endpoint
//! (`https_spiffe` profile): TLS to the endpoint, whose certificate must be an X.509-SVID of
//! the configured SPIFFE ID verified against the peer's bundle (the bootstrap bundle until a
//! first fetch, then the last fetched one, so a peer's root rotation carries over), one
//! `GET`, and a bundle document accepted whole or not at all.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use membrane_identity::federation::BundleDocument;
use membrane_identity::verify::SpiffeServerVerifier;
use membrane_identity::{PeerCheck, SharedTrustBundle, TrustBundle};
use rustls_pki_types::ServerName;

use super::spec::TrustFederation;

/// Bound on connecting, the TLS handshake and the whole exchange.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bundle document accepted (a bundle holds a few roots).
pub const MAX_DOCUMENT: usize = 1 << 20;

/// Why a fetch failed; the last good bundle stays in force.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The endpoint could not be reached.
    #[error("connecting to {url}: {message}")]
    Connect {
        /// The endpoint.
        url: String,
        /// What failed.
        message: String,
    },
    /// TLS failed: the endpoint is not who the federation says, or not verifiable with the
    /// bundle held for its trust domain.
    #[error("TLS with {url}: {message}")]
    Tls {
        /// The endpoint.
        url: String,
        /// What failed.
        message: String,
    },
    /// The HTTP exchange failed or answered other than 200.
    #[error("HTTP from {url}: {message}")]
    Http {
        /// The endpoint.
        url: String,
        /// What failed.
        message: String,
    },
    /// The document is not a valid bundle of the trust domain.
    #[error("bundle document from {url} rejected: {message}")]
    Document {
        /// The endpoint.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The document's sequence number is lower than the one held (a replayed older bundle).
    #[error("bundle from {url} has sequence {got}, lower than the {held} held")]
    Rollback {
        /// The endpoint.
        url: String,
        /// The sequence held.
        held: u64,
        /// The sequence served.
        got: u64,
    },
    /// Gave up after [`FETCH_TIMEOUT`].
    #[error("fetching from {url} timed out")]
    Timeout {
        /// The endpoint.
        url: String,
    },
}

/// A fetched bundle.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The roots.
    pub bundle: TrustBundle,
    /// `spiffe_sequence`, when given.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, when given.
    pub refresh_hint: Option<Duration>,
}

/// Fetches `federation`'s bundle, verifying the endpoint with `trust` (roots of the peer's
/// trust domain). `held_sequence` refuses a document older than the one in force.
pub async fn fetch(
    federation: &TrustFederation,
    trust: &TrustBundle,
    held_sequence: Option<u64>,
) -> Result<Fetched, FetchError> {
    let url = federation.url.to_string();
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(federation, trust, &url)).await {
        Err(_) => Err(FetchError::Timeout { url }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(doc)) => {
            if let (Some(held), Some(got)) = (held_sequence, doc.sequence)
                && got < held
            {
                return Err(FetchError::Rollback { url, held, got });
            }
            let bundle = doc.to_trust_bundle().map_err(|e| FetchError::Document {
                url: url.clone(),
                message: e.to_string(),
            })?;
            Ok(Fetched {
                bundle,
                sequence: doc.sequence,
                refresh_hint: doc.refresh_hint,
            })
        }
    }
}

async fn fetch_inner(
    federation: &TrustFederation,
    trust: &TrustBundle,
    url: &str,
) -> Result<BundleDocument, FetchError> {
    let uri = &federation.url;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    let port = uri.port_u16().unwrap_or(443);
    let connect = |message: String| FetchError::Connect {
        url: url.to_owned(),
        message,
    };
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| connect(e.to_string()))?;
    let tls_err = |message: String| FetchError::Tls {
        url: url.to_owned(),
        message,
    };
    let provider = membrane_identity::crypto_provider();
    let verifier = SpiffeServerVerifier::new(
        SharedTrustBundle::new(trust.clone()),
        PeerCheck::Exact(federation.endpoint_id.clone()),
        provider.clone(),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_owned()).map_err(|e| connect(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    let http_err = |message: String| FetchError::Http {
        url: url.to_owned(),
        message,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| http_err(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = http::Request::get(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_err(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_err(e.to_string()))?;
    if response.status() != http::StatusCode::OK {
        driver.abort();
        return Err(http_err(format!("status {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| http_err(format!("reading the body: {e}")))?
        .to_bytes();
    driver.abort();
    BundleDocument::parse(&federation.trust_domain, &body).map_err(|e| FetchError::Document {
        url: url.to_owned(),
        message: e.to_string(),
    })
}
