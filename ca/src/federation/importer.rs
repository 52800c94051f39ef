//! The importing side of service federation: one task per `TrustFederation` with
//! `spec.serviceExports`, following the peer controller's `ServiceExports.Watch` over mutual
//! TLS (this controller's serving SVID presented, the peer controller's identity required and
//! verified against the peer's federated bundle), validating each message whole
//! ([`super::services::validate`]) and publishing it, with the peer's east-west gateway, to the
//! imports every node's view is built from. A bad message, a broken stream or an unreachable
//! peer keeps the last good set; reconnects back off within [`RETRY_BOUNDS`]. When a root the
//! stream was verified against leaves the peer's bundle, the stream ends and is dialled again
//! after the shortest back-off, so the peer's controller is verified against the bundle in
//! force (a removed root does not keep a stream open); an added root changes nothing.

use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{PeerCheck, SharedTrustBundle, SpiffeId, TrustBundle, TrustDomain};
use membrane_proto::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::services::{Imported, Imports, MAX_MESSAGE_LEN, RETRY_BOUNDS, validate};
use crate::serving::ServingCert;

/// Why one import stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// No bundle is held for the peer's trust domain.
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    /// Connecting, TLS or gRPC failed.
    #[error("connecting to {url}: {message}")]
    Connect {
        /// The peer's federation listener.
        url: String,
        /// What failed.
        message: String,
    },
    /// The peer refused or ended the stream.
    #[error("stream from {url}: {status}")]
    Stream {
        /// The peer's federation listener.
        url: String,
        /// The gRPC status.
        status: String,
    },
}

/// One federation's import: where, whom to expect, and who we are.
#[derive(Clone)]
pub struct Importer {
    /// The peer's trust domain.
    pub trust_domain: TrustDomain,
    /// Its federation listener.
    pub url: http::Uri,
    /// Its controller's SPIFFE ID.
    pub peer_id: SpiffeId,
    /// Our serving SVID, presented as the client certificate.
    pub serving: Arc<ServingCert>,
    /// The networks its endpoints must lie in (empty: any importable address).
    pub allowed: Vec<membrane_policy::IpNet>,
    /// The federated bundles (the peer's is looked up at every connect).
    pub federated: watch::Receiver<Arc<Vec<TrustBundle>>>,
    /// The peer's east-west gateway, set on every imported workload.
    pub gateway: Option<pb::NetworkGateway>,
    /// Where validated imports go.
    pub out: watch::Sender<Imports>,
    /// Cleared when the federation goes: nothing is published after that.
    pub alive: Arc<std::sync::atomic::AtomicBool>,
    /// `membrane_ca_federated_import_stream_ends_total`.
    pub ends: Family<ImportEndLabels, Counter>,
    /// `membrane_ca_federated_import_streams_open`: 1 while the peer's stream is followed.
    pub open: Family<super::TrustDomainLabels, Gauge>,
}

/// Labels of `membrane_ca_federated_import_stream_ends_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ImportEndLabels {
    /// The federated trust domain.
    pub trust_domain: String,
    /// `bundle_changed` (a root the stream was verified against left the peer's bundle: it is
    /// dialled again and verified against the new one), `ended` (by the peer) or `error`
    /// (connecting, TLS, gRPC).
    pub reason: &'static str,
}

/// How an import stream that did not fail came to an end.
enum Ended {
    /// The peer ended it: dial again after the back-off.
    ByPeer,
    /// A root it was verified against was removed: dial again (after the shortest back-off)
    /// to verify the peer against the bundle in force.
    BundleChanged,
}

impl Importer {
    /// Follows the peer's exports forever (the task is aborted when the federation goes).
    pub async fn run(self) {
        let mut retry = RETRY_BOUNDS.0;
        let open = (self.open)
            .get_or_create(&super::TrustDomainLabels {
                trust_domain: self.trust_domain.to_string(),
            })
            .clone();
        loop {
            let outcome = self.stream(&mut retry, &open).await;
            open.set(0);
            let reason = match outcome {
                Ok(Ended::ByPeer) => {
                    tracing::info!(trust_domain = %self.trust_domain, "service exports stream ended; reconnecting");
                    "ended"
                }
                Ok(Ended::BundleChanged) => {
                    tracing::info!(trust_domain = %self.trust_domain, "a root the import stream was verified against left the peer's bundle; reconnecting to verify its controller against the bundle in force (the last imported set stays meanwhile)");
                    "bundle_changed"
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %self.trust_domain, error = %e, "service import failed; the last imported set stays");
                    "error"
                }
            };
            self.ends
                .get_or_create(&ImportEndLabels {
                    trust_domain: self.trust_domain.to_string(),
                    reason,
                })
                .inc();
            if reason == "bundle_changed" {
                // At once, but never more often than the shortest back-off: a peer whose
                // bundle keeps changing must not keep this controller redialling.
                tokio::time::sleep(RETRY_BOUNDS.0).await;
            } else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_BOUNDS.1);
            }
        }
    }

    /// The peer's bundle in force now, if any.
    fn peer_bundle(federated: &[TrustBundle], td: &TrustDomain) -> Option<TrustBundle> {
        federated.iter().find(|b| b.trust_domain() == td).cloned()
    }

    async fn stream(&self, retry: &mut Duration, open: &Gauge) -> Result<Ended, ImportError> {
        let url = self.url.to_string();
        let connect = |message: String| ImportError::Connect {
            url: url.clone(),
            message,
        };
        // The connection is verified against the bundle in force when it is made; a root of
        // it leaving the peer's bundle ends the stream (a removed root must not keep it open).
        let mut federated = Some(self.federated.clone());
        let bundle = federated
            .as_mut()
            .and_then(|f| Self::peer_bundle(&f.borrow_and_update(), &self.trust_domain))
            .ok_or_else(|| ImportError::NoBundle(self.trust_domain.to_string()))?;
        let provider = membrane_identity::crypto_provider();
        let verifier = membrane_identity::verify::SpiffeServerVerifier::new(
            SharedTrustBundle::new(bundle.clone()),
            PeerCheck::Exact(self.peer_id.clone()),
            provider.clone(),
        );
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| connect(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.serving.clone());
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let channel = grpc_channel(&self.url, Arc::new(tls))
            .await
            .map_err(connect)?;
        let mut client = pb::service_exports_client::ServiceExportsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_LEN);
        let stream_err = |status: tonic::Status| ImportError::Stream {
            url: url.clone(),
            status: format!("{}: {}", status.code(), status.message()),
        };
        let mut stream = client
            .watch(pb::ExportsRequest {})
            .await
            .map_err(stream_err)?
            .into_inner();
        tracing::info!(trust_domain = %self.trust_domain, url = %url, "following the peer's service exports");
        open.set(1);
        loop {
            let exports = tokio::select! {
                message = stream.message() => match message.map_err(stream_err)? {
                    Some(exports) => exports,
                    None => return Ok(Ended::ByPeer),
                },
                changed = async { federated.as_mut()?.changed().await.ok() }, if federated.is_some() => {
                    let Some(receiver) = federated.as_mut().filter(|_| changed.is_some()) else {
                        // The bundles' sender is gone (the controller is stopping): nothing
                        // changes any more; keep reading the stream.
                        federated = None;
                        continue;
                    };
                    let now = Self::peer_bundle(&receiver.borrow_and_update(), &self.trust_domain);
                    if !still_trusted(&bundle, now.as_ref()) {
                        return Ok(Ended::BundleChanged);
                    }
                    continue;
                }
            };
            *retry = RETRY_BOUNDS.0;
            if let Err(e) = validate(&exports, &self.trust_domain, &self.allowed) {
                tracing::warn!(trust_domain = %self.trust_domain, error = %e, "service exports refused whole; the last imported set stays");
                continue;
            }
            let services = exports.services.len();
            let td = self.trust_domain.clone();
            let alive = &self.alive;
            let imported = Imported {
                exports,
                gateway: self.gateway.clone(),
            };
            self.out.send_if_modified(|current| {
                // Checked under the channel's lock, which the removal also takes.
                if !alive.load(std::sync::atomic::Ordering::Acquire)
                    || current.get(&td) == Some(&imported)
                {
                    return false;
                }
                let mut next = current.as_ref().clone();
                next.insert(td.clone(), imported);
                *current = Arc::new(next);
                true
            });
            tracing::info!(trust_domain = %self.trust_domain, services, "service imports updated");
        }
    }
}

/// Whether every root of `verified` (the bundle a stream was verified against) is still in
/// `now`, the peer's bundle in force: an added root cannot weaken a verified connection, a
/// removed one (or a bundle gone) can.
fn still_trusted(verified: &TrustBundle, now: Option<&TrustBundle>) -> bool {
    now.is_some_and(|now| verified.roots().all(|root| now.roots().any(|r| r == root)))
}

/// A gRPC channel to `url` over TLS with `tls` (which verifies the server by SPIFFE ID).
async fn grpc_channel(
    url: &http::Uri,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, String> {
    let host = url
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    // The connector dials and does TLS itself; the endpoint's own scheme is only a label.
    // An IPv6 literal keeps its brackets in the URI.
    let authority = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (host, name, tls) = (host.clone(), name.clone(), tls.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e}: {}", source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut next = e.source();
    while let Some(s) = next {
        out.push(s.to_string());
        next = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::test_roots::{bundle, root_der as root};

    /// A root added to the peer's bundle (a rotation starting) keeps a verified stream; a root
    /// it was verified against leaving (a rotation finishing, a compromised root withdrawn),
    /// or the bundle going, ends it.
    #[test]
    fn only_a_removed_root_ends_a_verified_stream() {
        let (old, new) = (root(), root());
        let verified = bundle(&[&old]);
        assert!(still_trusted(&verified, Some(&bundle(&[&old]))));
        assert!(still_trusted(&verified, Some(&bundle(&[&new, &old]))));
        assert!(!still_trusted(&verified, Some(&bundle(&[&new]))));
        assert!(!still_trusted(
            &bundle(&[&old, &new]),
            Some(&bundle(&[&new]))
        ));
        assert!(!still_trusted(&verified, None));
    }
}
