//! The controller's SPIFFE bundle endpoint (`https_spiffe` profile): the trust bundle it
//! streams to its own ztunnels, served as a SPIFFE bundle document over TLS with the
//! controller's serving certificate (an X.509-SVID of
//! `spiffe://<td>/ns/<namespace>/sa/membrane-ca` under its own root) and no client
//! authentication. `GET /` only.
//!
//! `spiffe_sequence` grows with every change of the bundle (it starts at the Unix time of the
//! controller's start, so it also grows across restarts); `spiffe_refresh_hint` is
//! `--bundle-refresh-hint`. The listener has the same caps, handshake and idle timeouts as
//! every other listener of the controller.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use membrane_identity::TrustBundle;
use membrane_runtime::listener::{GuardedListener, TimeoutStage};
use membrane_runtime::{HttpServer, HttpTimeouts, Reply};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::serving::ServingCert;

/// The listener's name in metrics and logs.
pub const LISTENER: &str = "bundle-endpoint";

/// Settings of the bundle endpoint.
#[derive(Debug, Clone, Copy)]
pub struct EndpointConfig {
    /// `spiffe_refresh_hint` served to peers.
    pub refresh_hint: Duration,
    /// Bound on a TLS handshake.
    pub handshake_timeout: Duration,
    /// Header and idle timeouts.
    pub http: HttpTimeouts,
}

/// The document served now, replaced on every bundle change.
#[derive(Debug, Default)]
struct Served {
    sequence: u64,
    json: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves the bundle of `bundle` on `listener` until `cancel` fires.
pub async fn serve(
    mut listener: GuardedListener,
    serving: Arc<ServingCert>,
    mut bundle: watch::Receiver<Arc<TrustBundle>>,
    config: EndpointConfig,
    cancel: CancellationToken,
) {
    let tls = rustls::ServerConfig::builder_with_provider(membrane_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth().with_cert_resolver(serving));
    let mut tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "bundle endpoint: no TLS configuration; not serving");
            return;
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let served = Arc::new(Mutex::new(Served::default()));
    let publish = |served: &Mutex<Served>, current: &TrustBundle| {
        let mut s = membrane_runtime::lock(served);
        s.sequence = (s.sequence + 1).max(unix_now());
        let (json, skipped) = membrane_identity::federation::bundle_document(
            current,
            s.sequence,
            config.refresh_hint,
        );
        s.json = json;
        for reason in skipped {
            tracing::error!(%reason, "bundle endpoint: a root has no JWK form and is not served");
        }
        tracing::info!(
            sequence = s.sequence,
            roots = current.roots().len(),
            "bundle endpoint serves a new bundle"
        );
    };
    publish(&served, &bundle.borrow_and_update());
    let route_served = served.clone();
    let route: membrane_runtime::Route = Arc::new(move |path: &str| match path {
        "/" => Reply::ok(
            "application/json",
            membrane_runtime::lock(&route_served).json.clone(),
        ),
        _ => Reply::text(StatusCode::NOT_FOUND, "not found\n"),
    });
    let server = HttpServer::new(LISTENER, listener.metrics().clone());
    loop {
        let (tcp, peer, admission) = tokio::select! {
            _ = cancel.cancelled() => return,
            changed = bundle.changed() => {
                if changed.is_err() {
                    return;
                }
                publish(&served, &bundle.borrow_and_update());
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (acceptor, route, cancel) = (acceptor.clone(), route.clone(), cancel.clone());
        let server = server.clone();
        tokio::spawn(async move {
            let _admission = admission;
            match tokio::time::timeout(config.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => server.serve(peer, tls, route, config.http, cancel).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed")
                }
                Err(_) => {
                    server
                        .metrics()
                        .timed_out(LISTENER, TimeoutStage::Handshake);
                    tracing::debug!(%peer, "bundle endpoint: TLS handshake timed out");
                }
            }
        });
    }
}
