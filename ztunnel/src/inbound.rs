//! Inbound: HBONE on 15008 and plaintext capture on 15006, both in the pod's namespace.
//!
//! HBONE: mutual TLS is terminated with the pod's SVID, the peer SPIFFE ID comes from the
//! verified chain, the CONNECT `:authority` must be this pod, and only then does the ztunnel
//! connect to the application (from inside the pod, with its mark). Plaintext sources have no
//! identity: refused unless the pod's namespace is `membrane.dev/plaintext: permit` (policy
//! evaluation comes with the policy engine; until then permit means accept).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use membrane_identity::PeerCheck;
use tracing::Instrument;

use crate::hbone::{self, ConnectHandler, ConnectRefusal, ConnectRequest, RelayResult};
use crate::proxy::{ConnectionLog, PodContext, Proxy, original_dst, owns};
use crate::state::PlaintextMode;

/// Accepts HBONE connections for one pod until it is removed.
pub async fn run_hbone(listener: tokio::net::TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(pod = %pod.workload.name, error = %e, "HBONE accept failed");
                    continue;
                }
            },
        };
        let span = tracing::info_span!("inbound", pod = %pod.workload.name, peer = %peer);
        let (pod, proxy) = (pod.clone(), proxy.clone());
        tokio::spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let svid = match proxy.certs.svid(&pod.workload.identity).await {
                    Ok(svid) => svid,
                    Err(e) => {
                        tracing::warn!(error = %e, "no certificate to serve HBONE; closing");
                        return;
                    }
                };
                let tls = match membrane_identity::verify::mtls_server_config(
                    &svid,
                    proxy.certs.bundle(),
                    PeerCheck::TrustDomain(proxy.trust_domain.clone()),
                    membrane_identity::crypto_provider(),
                ) {
                    Ok(mut cfg) => {
                        cfg.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
                        Arc::new(cfg)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS configuration failed");
                        return;
                    }
                };
                let handler = Arc::new(InboundHandler {
                    pod: pod.clone(),
                    proxy: proxy.clone(),
                });
                let cancel = pod.cancel.clone();
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    result = hbone::serve_connection(tcp, tls, handler) => {
                        if let Err(e) = result {
                            tracing::info!(error = %e, "HBONE connection refused or failed");
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

struct InboundHandler {
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
}

impl ConnectHandler for InboundHandler {
    fn connect(
        &self,
        req: ConnectRequest,
    ) -> Pin<Box<dyn Future<Output = Result<tokio::net::TcpStream, ConnectRefusal>> + Send + '_>>
    {
        Box::pin(async move {
            if !owns(&self.pod.workload, req.authority.ip()) {
                let reason = format!("{} is not a workload on this node", req.authority);
                self.log(&req).refused(reason.clone());
                return Err(ConnectRefusal::Unreachable(reason));
            }
            match self.pod.netns.connect(req.authority).await {
                Ok(app) => Ok(app),
                Err(e) => {
                    let reason = format!("application at {} unreachable: {e}", req.authority);
                    self.log(&req).refused(reason.clone());
                    Err(ConnectRefusal::Unreachable(reason))
                }
            }
        })
    }

    fn finished(&self, req: &ConnectRequest, result: &RelayResult) {
        let (kind, reason) = result.summary();
        let mut log = self.log(req);
        log.opened();
        log.closed(result.b_to_a, result.a_to_b, kind, reason);
    }
}

impl InboundHandler {
    fn log(&self, req: &ConnectRequest) -> ConnectionLog {
        let src = std::net::SocketAddr::new(
            req.forwarded_for
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            0,
        );
        ConnectionLog::start(
            &self.proxy,
            "inbound",
            "hbone",
            src,
            req.authority,
            Some(req.peer.to_string()),
            Some(self.pod.workload.identity.to_string()),
        )
    }
}

/// Accepts plaintext (identity-less) connections for one pod until it is removed.
pub async fn run_plaintext(
    listener: tokio::net::TcpListener,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(pod = %pod.workload.name, error = %e, "plaintext accept failed");
                    continue;
                }
            },
        };
        let span = tracing::info_span!("plaintext", pod = %pod.workload.name, src = %peer);
        let (pod, proxy) = (pod.clone(), proxy.clone());
        tokio::spawn(
            async move {
                let Ok(dst) = original_dst(&tcp) else { return };
                let mut log = ConnectionLog::start(
                    &proxy,
                    "inbound",
                    "plaintext",
                    peer,
                    dst,
                    None,
                    Some(pod.workload.identity.to_string()),
                );
                let mode = proxy.state.borrow().plaintext(&pod.workload.namespace);
                if mode != PlaintextMode::Permit {
                    // Reset rather than close: the caller sees a refusal, not an empty reply.
                    let _ =
                        socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                    drop(tcp);
                    return log.refused(format!(
                        "plaintext source refused: namespace {} does not permit plaintext",
                        pod.workload.namespace
                    ));
                }
                let app = match pod.netns.connect(dst).await {
                    Ok(app) => app,
                    Err(e) => return log.refused(format!("application at {dst} unreachable: {e}")),
                };
                log.opened();
                let cancel = pod.cancel.clone();
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    result = hbone::relay(tcp, app) => {
                        let (kind, reason) = result.summary();
                        log.closed(result.a_to_b, result.b_to_a, kind, reason);
                    }
                }
            }
            .instrument(span),
        );
    }
}
