//! Outbound capture (15001 in the pod's namespace): the pod's own connections.
//!
//! The original destination comes from `SO_ORIGINAL_DST`; a Service's virtual IP and port are
//! resolved to one of its endpoints. A mesh workload is reached through
//! HBONE on `<pod ip>:15008`, presenting the source pod's SVID and requiring the destination's
//! expected SPIFFE ID; anything else is passed through unchanged (egress rules come later).
//! Every socket the ztunnel opens is created in the source pod's namespace with the ztunnel
//! mark, so it leaves with the pod's address and is not captured again. A destination that is
//! the ztunnel itself (loopback, its ports on the pod's addresses) is refused (see [`crate::guard`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::hbone::{self, ConnectHeaders, Dial, PoolKey};
use crate::netns::PodNetns;
use crate::proxy::{ConnectionLog, PodContext, Proxy, original_dst, serve_listener};
use crate::state::Protocol;

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
    let dst = match original_dst(&tcp) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(error = %e, "no original destination; closing");
            return;
        }
    };
    // A Service's virtual IP is resolved here to one of its endpoints (in-pod capture sees
    // the VIP before any node-level NAT could).
    let (dst, destination) = proxy.state.borrow().resolve(dst);
    let src_id = pod.workload.identity.to_string();
    // Never relay to the ztunnel itself: its listeners would take the connection back and
    // relay it again, without end.
    let mesh = matches!(&destination, Some(w) if w.protocol == Protocol::Hbone);
    if let Err(e) = crate::guard::check_outbound(dst, &pod.workload.ips, mesh) {
        proxy.guard.refused("outbound", &e);
        tracing::warn!(dst = %dst, error = %e, "outbound destination is the ztunnel itself; refused");
        let transport = if mesh { "hbone" } else { "passthrough" };
        let log = ConnectionLog::start(
            proxy,
            "outbound",
            transport,
            peer,
            dst,
            Some(src_id),
            destination.map(|w| w.identity.to_string()),
        );
        return log.refused(format!("loop refused: {e}"));
    }
    match destination {
        Some(w) if w.protocol == Protocol::Hbone => {
            let mut log = ConnectionLog::start(
                proxy,
                "outbound",
                "hbone",
                peer,
                dst,
                Some(src_id),
                Some(w.identity.to_string()),
            );
            // Never an expired certificate: a renewal failed until expiry is refused here,
            // with the reason, until the controller answers again.
            let svid = match proxy.certs.svid(&pod.workload.identity).await {
                Ok(svid) => svid,
                Err(e) => {
                    proxy
                        .certs
                        .metrics()
                        .refused("source", pod.workload.identity.to_string());
                    return log.refused(format!("no valid certificate for the source: {e}"));
                }
            };
            let tls = match proxy.tls.client_config(&svid, w.identity.spiffe_id()) {
                Ok(cfg) => cfg,
                Err(e) => return log.refused(format!("TLS configuration: {e}")),
            };
            // The pool reuses a connection only while it presents this SVID (the one in
            // `tls`) and neither end's certificate has expired; after a renewal new tunnels
            // get a new connection and open ones stay where they are.
            let key = PoolKey {
                src_ip: peer.ip(),
                src: pod.workload.identity.spiffe_id().clone(),
                dst: w.identity.spiffe_id().clone(),
                dst_addr: SocketAddr::new(dst.ip(), hbone::HBONE_PORT),
            };
            let headers = ConnectHeaders {
                forwarded_for: Some(peer.ip()),
                ..ConnectHeaders::default()
            };
            let dial = Arc::new(PodDial(pod.netns.clone()));
            let stream = match proxy.pool.connect(key, tls, dial, dst, headers).await {
                Ok(stream) => stream,
                Err(e) => return log.refused(format!("tunnel to {dst}: {e}")),
            };
            log.opened();
            let result = hbone::relay(tcp, stream).await;
            let (result_kind, reason) = result.summary();
            log.closed(result.a_to_b, result.b_to_a, result_kind, reason);
        }
        _ => {
            let mut log = ConnectionLog::start(
                proxy,
                "outbound",
                "passthrough",
                peer,
                dst,
                Some(src_id),
                None,
            );
            let upstream = match pod.netns.connect(dst).await {
                Ok(s) => s,
                Err(e) => return log.refused(format!("connect {dst}: {e}")),
            };
            log.opened();
            let result = hbone::relay(tcp, upstream).await;
            let (result_kind, reason) = result.summary();
            log.closed(result.a_to_b, result.b_to_a, result_kind, reason);
        }
    }
}
