//! rustls verifiers that authenticate peers by SPIFFE ID.
//!
//! A peer is accepted only if its chain verifies against the current [`SharedTrustBundle`] of
//! the trust domain in its own SPIFFE ID (the local one or a federated one; a trust domain
//! with no bundle is refused by name) *and* its SPIFFE ID passes the caller's [`PeerCheck`]. DNS names play no part: the server name a
//! client dials is ignored in favour of the expected SPIFFE ID. After the handshake,
//! [`peer_spiffe_id`] hands the verified ID back for authorization.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::SharedTrustBundle;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError, Usage, WorkloadSvid};

/// Which SPIFFE IDs a verifier accepts (after the chain verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCheck {
    /// Exactly this ID (an outbound tunnel to a known destination).
    Exact(SpiffeId),
    /// Any ID in this trust domain (an inbound listener; policy decides later).
    TrustDomain(TrustDomain),
    /// Any ID whose chain verified: one of the local trust domain or of a federated one
    /// (an inbound listener of a federated mesh; policy decides later).
    AnyTrusted,
}

/// Why a peer was refused before its chain was looked at: nothing speaks for its trust domain.
#[derive(Debug, thiserror::Error)]
#[error(
    "peer SPIFFE ID {presented}: trust domain {trust_domain} is not federated with this mesh (no trust bundle for it)"
)]
pub struct NotFederated {
    presented: String,
    trust_domain: String,
}

/// Why a peer's SPIFFE ID was refused after its chain verified.
#[derive(Debug, thiserror::Error)]
#[error("peer SPIFFE ID {presented} is not accepted here (expected {expected})")]
pub struct UnexpectedPeer {
    presented: String,
    expected: String,
}

// === impl PeerCheck ===

impl PeerCheck {
    fn check(&self, id: &SpiffeId) -> Result<(), UnexpectedPeer> {
        let ok = match self {
            PeerCheck::Exact(expected) => expected == id,
            PeerCheck::TrustDomain(td) => id.trust_domain() == td,
            PeerCheck::AnyTrusted => true,
        };
        if ok {
            return Ok(());
        }
        Err(UnexpectedPeer {
            presented: id.to_string(),
            expected: match self {
                PeerCheck::Exact(e) => e.to_string(),
                PeerCheck::TrustDomain(td) => format!("any ID in {td}"),
                PeerCheck::AnyTrusted => "any trusted ID".to_owned(),
            },
        })
    }
}

fn to_rustls(e: SvidError) -> rustls::Error {
    let cert_error = match e {
        SvidError::Expired { .. } => CertificateError::Expired,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Shared core of the client and server verifiers.
#[derive(Debug)]
struct SpiffeVerifier {
    bundle: SharedTrustBundle,
    check: PeerCheck,
    provider: Arc<CryptoProvider>,
}

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        // The local bundle first (the common case: one parse of the leaf). A chain of another
        // trust domain is verified against that trust domain's bundle only.
        let id = match self.bundle.load().verify_svid_chain(&chain, now, usage) {
            Err(SvidError::WrongTrustDomain { .. }) => {
                let claimed = svid::parse_leaf(end_entity).map_err(to_rustls)?.spiffe_id;
                let td = claimed.trust_domain();
                let Some(bundle) = self.bundle.for_trust_domain(td) else {
                    return Err(other(NotFederated {
                        presented: claimed.to_string(),
                        trust_domain: td.to_string(),
                    }));
                };
                bundle
                    .verify_svid_chain(&chain, now, usage)
                    .map_err(to_rustls)?
            }
            verified => verified.map_err(to_rustls)?,
        };
        self.check.check(&id).map_err(other)
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a TLS server's X.509-SVID (used by the dialling side).
#[derive(Debug)]
pub struct SpiffeServerVerifier(SpiffeVerifier);

impl SpiffeServerVerifier {
    /// Accepts servers whose chain verifies against `bundle` and whose ID passes `check`.
    pub fn new(bundle: SharedTrustBundle, check: PeerCheck, provider: Arc<CryptoProvider>) -> Self {
        Self(SpiffeVerifier {
            bundle,
            check,
            provider,
        })
    }
}

/// The handshake-signature methods both rustls verifier traits share, delegated to the inner
/// [`SpiffeVerifier`] (the traits differ only in how a certificate is verified).
macro_rules! signature_checks_of_inner_verifier {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.tls12(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.schemes()
        }
    };
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, Usage::Server)
            .map(|()| ServerCertVerified::assertion())
    }

    signature_checks_of_inner_verifier!();
}

/// Verifies a TLS client's X.509-SVID (used by the listening side). Client certificates are
/// mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier(SpiffeVerifier);

impl SpiffeClientVerifier {
    /// Accepts clients whose chain verifies against `bundle` and whose ID passes `check`.
    pub fn new(bundle: SharedTrustBundle, check: PeerCheck, provider: Arc<CryptoProvider>) -> Self {
        Self(SpiffeVerifier {
            bundle,
            check,
            provider,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, Usage::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    signature_checks_of_inner_verifier!();
}

/// The SPIFFE ID of a peer whose certificate a [`SpiffeServerVerifier`] or
/// [`SpiffeClientVerifier`] already accepted (pass `conn.peer_certificates()`).
pub fn peer_spiffe_id(
    peer_certificates: Option<&[CertificateDer<'_>]>,
) -> Result<SpiffeId, SvidError> {
    let leaf = peer_certificates
        .and_then(|c| c.first())
        .ok_or(SvidError::NoCertificate)?;
    Ok(svid::parse_leaf(leaf)?.spiffe_id)
}

/// Serves one fixed SVID as both a client and a server certificate.
#[derive(Debug)]
struct FixedSvid(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedSvid {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for FixedSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.3 server configuration that presents `svid` and requires a client SVID passing
/// `check`.
pub fn mtls_server_config(
    svid: &WorkloadSvid,
    bundle: SharedTrustBundle,
    check: PeerCheck,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle, check, provider.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedSvid(svid.certified_key())));
    // A resumed session skips certificate verification: a peer would keep its access after
    // its root left the bundle. Every handshake verifies.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 client configuration that presents `svid` and requires a server SVID passing
/// `check`.
pub fn mtls_client_config(
    svid: &WorkloadSvid,
    bundle: SharedTrustBundle,
    check: PeerCheck,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, check, provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedSvid(svid.certified_key())));
    // No resumption (see mtls_server_config).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::{parse_spiffe_id, parse_trust_domain};

    #[test]
    fn peer_check_exact_and_trust_domain() {
        let a = parse_spiffe_id("spiffe://cluster.local/ns/a/sa/x").expect("id");
        let b = parse_spiffe_id("spiffe://cluster.local/ns/b/sa/y").expect("id");
        let foreign = parse_spiffe_id("spiffe://other.org/ns/a/sa/x").expect("id");
        let exact = PeerCheck::Exact(a.clone());
        assert!(exact.check(&a).is_ok());
        let err = exact.check(&b).expect_err("other id");
        assert!(err.to_string().contains("ns/b/sa/y"), "{err}");
        let domain = PeerCheck::TrustDomain(parse_trust_domain("cluster.local").expect("td"));
        assert!(domain.check(&a).is_ok() && domain.check(&b).is_ok());
        assert!(domain.check(&foreign).is_err());
    }

    #[test]
    fn peer_id_requires_a_certificate() {
        assert!(matches!(
            peer_spiffe_id(None),
            Err(SvidError::NoCertificate)
        ));
        assert!(matches!(
            peer_spiffe_id(Some(&[])),
            Err(SvidError::NoCertificate)
        ));
    }
}
