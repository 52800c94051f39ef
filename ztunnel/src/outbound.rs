//! Outbound capture (15001 in the pod's namespace): the pod's own connections.
//!
//! The original destination comes from `SO_ORIGINAL_DST`; [`crate::route`] decides where it
//! goes (a Service's virtual IP resolved to an endpoint; a mesh workload through HBONE; a
//! destination that is the ztunnel itself refused; anything else passed through — egress
//! rules come later), and this module does what the route says. A connection passed through
//! leaves the mesh: its record names the host the pod resolved the address under (its DNS
//! pin, or `unresolved`) and the TLS server name of its ClientHello ([`crate::sni`], peeked,
//! never consumed). A tunnel presents the source
//! pod's SVID and requires the destination's expected SPIFFE ID, on `<pod ip>:15008`. Every
//! socket the ztunnel opens is created in the source pod's namespace with the ztunnel mark,
//! so it leaves with the pod's address and is not captured again.
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_api::access::{Egress, UNRESOLVED};

use crate::hbone::{self, ConnectHeaders, Dial, PoolKey};
use crate::netns::PodNetns;
use crate::proxy::{ConnectionLog, PodContext, Proxy, original_dst, serve_listener};
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
        Route::Passthrough { .. } => {
            let mut log = log(None);
            let (connected, hello) = if sni::TLS_PORTS.contains(&dst.port()) {
                // The wait for the ClientHello overlaps the connect.
                tokio::join!(pod.netns.connect(dst), sni::peek(&tcp, sni::TLS_WAIT))
            } else {
                let connected = pod.netns.connect(dst).await;
                (connected, sni::peek(&tcp, Duration::ZERO).await)
            };
            log.egress(egress(pod, proxy, dst, hello));
            match connected {
                Ok(upstream) => log.relay(tcp, upstream, None).await,
                Err(e) => log.refused(format!("connect {dst}: {e}")),
            }
        }
    }
}

/// What the record says about a connection leaving the mesh: the pod's pin for the address
/// and the ClientHello's server name.
fn egress(pod: &PodContext, proxy: &Proxy, dst: SocketAddr, hello: sni::Hello) -> Egress {
    let sni = match hello {
        sni::Hello::Sni(name) => Some(name),
        _ => None,
    };
    let pinned = proxy
        .pins
        .lookup(&pod.workload.uid, dst.ip(), SystemTime::now());
    match pinned {
        Some(names) => {
            let mut names = names.into_iter();
            let first = names.next().unwrap_or_default();
            Egress {
                host: first.name,
                cnames: first.cnames,
                other_hosts: names.map(|n| n.name).collect(),
                sni,
            }
        }
        None => Egress {
            host: UNRESOLVED.into(),
            sni,
            ..Egress::default()
        },
    }
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
