//! Outbound capture (15001 in the pod's namespace): the pod's own connections.
//!
//! The original destination comes from `SO_ORIGINAL_DST`; [`crate::route`] decides where it
//! goes (a Service's virtual IP resolved to an endpoint; a mesh workload through HBONE; a
//! destination that is the ztunnel itself refused; anything else leaves the mesh), and this
//! module does what the route says. A connection leaving the mesh is decided by EgressPolicy
//! ([`crate::egress`]) when one selects the source pod — before the destination is dialled;
//! a denied one is reset — and passes through otherwise; its record names the host the pod
//! resolved the address under (its DNS pin, or `unresolved`), the TLS server name of its
//! ClientHello ([`crate::sni`], peeked, never consumed) and the decision. A tunnel presents the source
//! pod's SVID and requires the destination's expected SPIFFE ID, on `<pod ip>:15008`. Every
//! socket the ztunnel opens is created in the source pod's namespace with the ztunnel mark,
//! so it leaves with the pod's address and is not captured again.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_policy::egress::EgressVerdict;
use tokio_util::sync::CancellationToken;

use crate::egress::{
    self,
    budget::{BudgetKey, Metered},
};
use crate::hbone::{self, ConnectHeaders, Dial, PoolKey};
use crate::netns::PodNetns;
use crate::proxy::{ConnectionLog, PodContext, Proxy, original_dst, serve_listener};
use crate::relay::{ResetOnError, Side, relay_until};
use crate::route::{Route, route};
use crate::sni;
use crate::state::Workload;

/// Dials from inside a pod's namespace, with the ztunnel mark.
#[derive(Debug)]
pub struct PodDial(pub Arc<PodNetns>);

impl Dial for PodDial {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + '_>,
    > {
        Box::pin(self.0.connect(addr))
    }
}

/// Accepts captured outbound connections until the pod is removed.
pub async fn run(listener: tokio::net::TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    serve_listener(
        listener,
        pod,
        proxy,
        "outbound",
        |tcp, peer, pod, proxy| async move {
            handle(tcp, peer, &pod, &proxy).await;
        },
    )
    .await;
}

async fn handle(tcp: tokio::net::TcpStream, peer: SocketAddr, pod: &PodContext, proxy: &Proxy) {
    let _ = tcp.set_nodelay(true);
    let original = match original_dst(&tcp) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(error = %e, "no original destination; closing");
            return;
        }
    };
    let route = route(&proxy.state.borrow(), &pod.workload, original);
    let dst = route.dst();
    let log = |dst_identity: Option<String>| {
        ConnectionLog::start(
            proxy,
            "outbound",
            route.transport(),
            peer,
            dst,
            Some(pod.workload.identity.to_string()),
            dst_identity,
        )
    };
    match &route {
        Route::Refused {
            workload, reason, ..
        } => {
            // Never relay to the ztunnel itself: its listeners would take the connection
            // back and relay it again, without end.
            proxy.guard.refused("outbound", reason);
            tracing::warn!(dst = %dst, error = %reason, "outbound destination is the ztunnel itself; refused");
            log(workload.as_ref().map(|w| w.identity.to_string()))
                .refused(format!("loop refused: {reason}"));
        }
        Route::Hbone { workload, .. } => {
            let log = log(Some(workload.identity.to_string()));
            let Some((stream, log)) = tunnel(peer.ip(), dst, workload, pod, proxy, log).await
            else {
                return;
            };
            log.relay(tcp, stream, None).await;
        }
        Route::Passthrough { .. } => passthrough(tcp, dst, pod, proxy, log(None)).await,
    }
}

/// How long a connection on a port that is not a TLS port may take to send its first bytes
/// when an EgressPolicy selects its source (the decision reads the SNI if it is TLS; a
/// server-speaks-first protocol waits this long once).
pub const ENFORCED_PEEK: Duration = Duration::from_millis(5);

/// A connection to a destination outside the mesh. Without an EgressPolicy selecting the
/// source it passes through (the connect overlaps the wait for a ClientHello); otherwise it
/// is decided *before* the destination is dialled, and a denied connection is reset without
/// a byte leaving.
async fn passthrough(
    tcp: tokio::net::TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    proxy: &Proxy,
    mut log: ConnectionLog,
) {
    let state = proxy.state.borrow().clone();
    let source = &pod.workload;
    let selected = !state
        .egress()
        .selecting(&source.namespace, &source.labels)
        .is_empty();
    let tls_port = sni::TLS_PORTS.contains(&dst.port());
    if !selected {
        let (connected, hello) = if tls_port {
            // The wait for the ClientHello overlaps the connect.
            tokio::join!(pod.netns.connect(dst), sni::peek(&tcp, sni::TLS_WAIT))
        } else {
            let connected = pod.netns.connect(dst).await;
            (connected, sni::peek(&tcp, Duration::ZERO).await)
        };
        let admission = egress::decide(&state, &proxy.pins, source, dst, &hello, SystemTime::now());
        // A long-lived connection must not keep this version of the mesh state alive.
        drop(state);
        proxy.egress.metrics.decided(&admission.decision);
        log.egress(admission.record);
        match connected {
            Ok(upstream) => log.relay(tcp, upstream, None).await,
            Err(e) => log.refused(format!("connect {dst}: {e}")),
        }
        return;
    }
    let wait = if tls_port {
        sni::TLS_WAIT
    } else {
        ENFORCED_PEEK
    };
    let hello = sni::peek(&tcp, wait).await;
    let admission = egress::decide(&state, &proxy.pins, source, dst, &hello, SystemTime::now());
    drop(state);
    let control = &proxy.egress;
    control.metrics.decided(&admission.decision);
    let decision = admission.decision;
    log.egress(admission.record);
    if decision.verdict == EgressVerdict::Deny {
        tracing::info!(
            src = %source.identity,
            dst = %dst,
            host = admission.attrs.pinned.first().map(String::as_str),
            sni = admission.attrs.sni.as_deref(),
            policy = decision.policy.as_deref(),
            reason = decision.reason.as_str(),
            "egress denied"
        );
        tcp.reset();
        log.refused(format!("egress denied: {}", decision.reason.as_str()));
        return;
    }
    if let Some(gateway) = &decision.via {
        // The rule sends these connections through an egress gateway, which this ztunnel
        // cannot reach yet: never connect directly instead (fail closed).
        control.metrics.gateway_unavailable();
        tracing::info!(src = %source.identity, dst = %dst, gateway = %gateway, "egress refused: its rule names a gateway this node cannot use");
        log.egress_closed("gateway_unavailable", None);
        tcp.reset();
        log.refused(format!("egress through gateway {gateway} is not available"));
        return;
    }
    let meter = match decision.budget.as_ref().zip(decision.policy.as_ref()) {
        None => None,
        Some((budget, policy)) => {
            let key = BudgetKey {
                identity: source.identity.to_string(),
                host: decision
                    .host
                    .clone()
                    .unwrap_or_else(|| dst.ip().to_string()),
                policy: policy.clone(),
            };
            match control.ledger.admit(key, budget, SystemTime::now()) {
                Ok(meter) => Some(meter),
                Err(e) => {
                    control.metrics.budget_refused();
                    tracing::info!(src = %source.identity, dst = %dst, error = %e, "egress refused: budget spent");
                    log.egress_closed("budget_exhausted", None);
                    tcp.reset();
                    log.refused(e.to_string());
                    return;
                }
            }
        }
    };
    let upstream = match pod.netns.connect(dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            log.refused(format!("connect {dst}: {e}"));
            return;
        }
    };
    let cancel = meter
        .as_ref()
        .map_or_else(CancellationToken::new, |m| m.spent().child_token());
    let handle = control
        .open
        .register(source.clone(), admission.attrs, cancel.clone());
    log.opened();
    let result = match meter.clone() {
        Some(meter) => relay_until(tcp, Metered::new(upstream, meter), cancel).await,
        None => relay_until(tcp, upstream, cancel).await,
    };
    if let Some(revoked) = handle.revoked.get() {
        control.metrics.closed("policy_changed");
        log.egress_closed("policy_changed", revoked.policy.clone());
    } else if meter.is_some_and(|m| m.spent().is_cancelled()) {
        control.metrics.closed("budget_exhausted");
        log.egress_closed("budget_exhausted", None);
    }
    drop(handle);
    log.relayed(&result, Side::A);
}

/// Opens an HBONE stream from `pod` to `workload` for the application at `dst`; on failure the
/// record is closed as refused, with the reason, and `None` returned.
async fn tunnel(
    src_ip: std::net::IpAddr,
    dst: SocketAddr,
    workload: &Workload,
    pod: &PodContext,
    proxy: &Proxy,
    log: ConnectionLog,
) -> Option<(hbone::H2Stream, ConnectionLog)> {
    // Never an expired certificate: a renewal failed until expiry is refused here, with the
    // reason, until the controller answers again.
    let identity = &pod.workload.identity;
    let svid = match proxy.certs.svid_for_connection(identity, "source").await {
        Ok(svid) => svid,
        Err(e) => {
            log.refused(format!("no valid certificate for the source: {e}"));
            return None;
        }
    };
    let tls = match proxy
        .tls
        .client_config(&svid, workload.identity.spiffe_id())
    {
        Ok(cfg) => cfg,
        Err(e) => {
            log.refused(format!("TLS configuration: {e}"));
            return None;
        }
    };
    // The pool reuses a connection only while it presents this SVID (the one in `tls`) and
    // neither end's certificate has expired; after a renewal new tunnels get a new connection
    // and open ones stay where they are.
    let key = PoolKey {
        src_ip,
        src: pod.workload.identity.spiffe_id().clone(),
        dst: workload.identity.spiffe_id().clone(),
        dst_addr: SocketAddr::new(dst.ip(), hbone::HBONE_PORT),
    };
    let headers = ConnectHeaders {
        forwarded_for: Some(src_ip),
        ..ConnectHeaders::default()
    };
    let dial = Arc::new(PodDial(pod.netns.clone()));
    match proxy.pool.connect(key, tls, dial, dst, headers).await {
        Ok(stream) => Some((stream, log)),
        Err(e) => {
            log.refused(format!("tunnel to {dst}: {e}"));
            None
        }
    }
}
