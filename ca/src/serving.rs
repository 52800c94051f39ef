//! The controller's own serving certificate, rotated while it serves.
//!
//! The key is generated here and kept in memory only; the certificate is issued by the
//! controller's signer for SPIFFE ID `spiffe://<td>/ns/membrane-system/sa/membrane-ca` plus
//! the default names and any extra ones. TLS is terminated here (tokio-rustls, ALPN h2) with a
//! certificate resolver, so [`ServingCert::renew`] changes the certificate for new handshakes
//! without restarting the gRPC server or touching open streams. [`ServingCert::run`] renews at
//! half of the lifetime; root rotation renews right after switching the signing root.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::auth_deadline::{AuthDeadline, AuthenticatedConnections};
use membrane_runtime::idle::IdleTimeout;
use membrane_runtime::listener::{
    Admission, ConnectionCaps, GuardedListener, ListenerMetrics, TimeoutStage,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use rcgen::SanType;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::signer::Signer;

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

/// How long a TLS handshake may take before the connection is dropped (the default of
/// [`ListenerConfig::tls_handshake_timeout`]).
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

impl ServingCert {
    /// The certificate in use.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.0.clone(),
            Err(p) => p.into_inner().0.clone(),
        }
    }
}

/// The controller presents the same SVID as a client (to a federated controller).
impl rustls::client::ResolvesClientCert for ServingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
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

/// Caps and timeouts of the controller's listeners: the gRPC port (TLS, 15012) and the
/// metrics port (HTTP, 15014). Every cap applies before any authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerConfig {
    /// gRPC connections held at once (TLS handshakes in progress included).
    pub grpc_max_connections: usize,
    /// gRPC connections one peer IP holds at once.
    pub grpc_max_connections_per_peer: usize,
    /// Bound on a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// A gRPC connection on which the client sent nothing for this long is closed: a client
    /// that never sends the HTTP/2 preface, or that stops answering the server's keepalive
    /// PINGs (sent every 10 s, so a live client always has something to send).
    pub grpc_idle_timeout: Duration,
    /// Metrics connections held at once.
    pub http_max_connections: usize,
    /// Metrics connections one peer IP holds at once.
    pub http_max_connections_per_peer: usize,
    /// Header-read and idle timeouts of the metrics port.
    pub http: membrane_runtime::HttpTimeouts,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            grpc_max_connections: 1024,
            grpc_max_connections_per_peer: 64,
            tls_handshake_timeout: HANDSHAKE_TIMEOUT,
            grpc_idle_timeout: Duration::from_secs(30),
            http_max_connections: 1024,
            http_max_connections_per_peer: 8,
            http: membrane_runtime::HttpTimeouts::default(),
        }
    }
}

/// A gRPC connection handed to the server: the TLS stream, closed when the client stays
/// silent too long, and its place under the listener's caps (freed when it drops).
pub struct ServedConnection {
    io: IdleTimeout<TlsStream<TcpStream>>,
    auth: Option<AuthDeadline>,
    _admission: Admission,
}

impl std::fmt::Debug for ServedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedConnection").finish_non_exhaustive()
    }
}

impl Connected for ServedConnection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.get_ref().connect_info()
    }
}

impl AsyncRead for ServedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(auth) = &mut this.auth
            && let Poll::Ready(e) = auth.poll_expired(cx)
        {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The gRPC listener's name in metrics and logs.
pub const GRPC_LISTENER: &str = "grpc";

/// Accepts TCP connections on `listener` within the caps of `limits` (global and per peer IP,
/// before any TLS) and yields them once their TLS handshake completed. Each handshake runs in
/// its own task, bounded by `limits.tls_handshake_timeout` (timeouts are counted in
/// `membrane_ca_listener_timeouts_total`; failures are logged at debug level and dropped). A
/// connection on which no call authenticated (`authenticated`) within `limits.grpc_idle_timeout`
/// is closed ([`crate::auth_deadline`]).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: ListenerConfig,
    metrics: ListenerMetrics,
    authenticated: AuthenticatedConnections,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<ServedConnection, std::io::Error>> {
    incoming_on(
        GRPC_LISTENER,
        listener,
        config,
        limits,
        metrics,
        Some(authenticated),
        cancel,
    )
}

/// As [`incoming`], for the gRPC listener `name` (its name in metrics and logs); without
/// `authenticated` (a listener whose TLS handshake authenticates the caller) no connection
/// has an authentication deadline.
pub fn incoming_on(
    name: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: ListenerConfig,
    metrics: ListenerMetrics,
    authenticated: Option<AuthenticatedConnections>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<ServedConnection, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let idle_expired = metrics.timeout_counter(name, TimeoutStage::Idle);
    let auth_expired = metrics.timeout_counter(name, TimeoutStage::Unauthenticated);
    let mut listener = GuardedListener::new(
        listener,
        name,
        ConnectionCaps {
            max: limits.grpc_max_connections,
            max_per_peer: limits.grpc_max_connections_per_peer,
        },
        metrics.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, peer, admission) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            let (idle_expired, auth_expired) = (idle_expired.clone(), auth_expired.clone());
            let authenticated = authenticated.clone();
            tokio::spawn(async move {
                let timeout = limits.tls_handshake_timeout;
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let io =
                            IdleTimeout::new(tls, limits.grpc_idle_timeout, false, idle_expired);
                        let auth = authenticated.map(|connections| {
                            AuthDeadline::start(
                                peer,
                                connections,
                                limits.grpc_idle_timeout,
                                auth_expired,
                            )
                        });
                        let _ = tx
                            .send(Ok(ServedConnection {
                                io,
                                auth,
                                _admission: admission,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        metrics.timed_out(name, TimeoutStage::Handshake);
                        tracing::debug!(%peer, timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
