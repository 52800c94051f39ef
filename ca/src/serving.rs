//! The controller's own serving certificate, rotated while it serves.
//!
//! The key is generated here and kept in memory only; the certificate is issued by the
//! controller's signer for SPIFFE ID `spiffe://<td>/ns/membrane-system/sa/membrane-ca` plus
//! the default names and any extra ones. TLS is terminated here (tokio-rustls, ALPN h2) with a
//! certificate resolver, so [`ServingCert::renew`] changes the certificate for new handshakes
//! without restarting the gRPC server or touching open streams. [`ServingCert::run`] renews at
//! half of the lifetime; root rotation renews right after switching the signing root.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::SanType;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::server::{CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, DEFAULT_SERVER_NAMES};
use crate::signer::Signer;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the serving certificate could not be issued.
#[derive(Debug, thiserror::Error)]
#[error("cannot issue the controller's serving certificate: {0}")]
pub struct ServingError(String);

/// The serving certificate in use, replaceable at any time.
pub struct ServingCert {
    current: RwLock<Current>,
    signer: Signer,
    names: Vec<String>,
    ttl: Duration,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("serial", &self.serial())
            .finish_non_exhaustive()
    }
}

/// The certificate in use: key, serial, and when it expires.
type Current = (Arc<CertifiedKey>, String, time::OffsetDateTime);

fn issue(signer: &Signer, extra: &[String], ttl: Duration) -> Result<Current, ServingError> {
    let err = |e: &dyn std::fmt::Display| ServingError(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let id = format!(
        "spiffe://{}/ns/{CONTROLLER_NAMESPACE}/sa/{CONTROLLER_SERVICE_ACCOUNT}",
        signer.bundle().trust_domain()
    );
    let mut sans = vec![SanType::URI(id.try_into().map_err(|e| err(&e))?)];
    let names = DEFAULT_SERVER_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned());
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(|e| err(&e))?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let signed = signer.issue(sans, &key, ttl).map_err(|e| err(&e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = membrane_identity::crypto_provider();
    let certified = CertifiedKey::from_der(signed.chain, der, &provider).map_err(|e| err(&e))?;
    Ok((Arc::new(certified), signed.serial, signed.not_after))
}

impl ServingCert {
    /// Issues the first certificate, valid for `ttl`, with the default names and `extra`.
    pub fn new(signer: Signer, extra: Vec<String>, ttl: Duration) -> Result<Self, ServingError> {
        let current = issue(&signer, &extra, ttl)?;
        Ok(Self {
            current: RwLock::new(current),
            signer,
            names: extra,
            ttl,
        })
    }

    /// Serial of the certificate in use (hex).
    pub fn serial(&self) -> String {
        match self.current.read() {
            Ok(g) => g.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Issues a new certificate from the current signer; new handshakes use it.
    pub fn renew(&self) -> Result<(), ServingError> {
        let fresh = issue(&self.signer, &self.names, self.ttl)?;
        let old = self.serial();
        tracing::info!(
            old_serial = old,
            serial = fresh.1,
            "controller serving certificate renewed"
        );
        let mut guard = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *guard = fresh;
        Ok(())
    }

    /// Half of the current certificate's remaining lifetime (it may be shorter than asked
    /// for when the signing certificate expires sooner).
    fn half_life(&self) -> Duration {
        let not_after = match self.current.read() {
            Ok(g) => g.2,
            Err(p) => p.into_inner().2,
        };
        let left: time::Duration = (not_after - time::OffsetDateTime::now_utc()) / 2;
        Duration::try_from(left)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1))
    }

    /// Renews at half of the remaining lifetime until `cancel` fires (retrying every 10 s at
    /// most on failure).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut wait = self.half_life();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = match self.renew() {
                Ok(()) => self.half_life(),
                Err(e) => {
                    tracing::error!(error = %e, "serving certificate renewal failed; retrying");
                    Duration::from_secs(10).min(self.half_life())
                }
            };
        }
    }

    /// The rustls configuration serving this certificate (TLS 1.3 and 1.2, ALPN h2).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, ServingError> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(membrane_identity::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| ServingError(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(g) => g.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        })
    }
}

/// Accepts TCP connections on `listener` and yields them once their TLS handshake completed
/// (each handshake runs in its own task, bounded by [`HANDSHAKE_TIMEOUT`]; failures are logged
/// at debug level and dropped).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
