//! The east-west gateway (DESIGN.md §11): the way into this cluster's pod network for
//! federated clusters whose pods cannot route to it.
//!
//! A source ztunnel in a federated cluster opens an *outer* HBONE tunnel here, presenting its
//! source pod's SVID (verified against the roots of that identity's own trust domain), with
//! `:authority` `<pod ip>:15008`: the destination pod's HBONE address. Inside that tunnel it
//! runs the *inner*, end-to-end HBONE connection (mutual TLS with the destination's ztunnel),
//! so this gateway relays ciphertext only and the destination authorizes the real source
//! identity. The gateway is never an open relay:
//!
//! 1. the peer must be of a federated trust domain — this cluster's own workloads reach its
//!    pods directly;
//! 2. the authority must be an address, never a name, on port 15008, of a mesh pod this
//!    cluster captures (not a gateway, not an imported or foreign workload, not this pod);
//! 3. the connection leaves from the gateway pod, bounded by [`CONNECT_TIMEOUT`].
//!
//! Every tunnel has a record (direction `east_west_gateway`) naming the source identity and
//! the pod's HBONE address; refusals are counted by reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use membrane_api::ports;

use super::metrics::GatewayMetrics;
use crate::hbone::{Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest};
use crate::proxy::{ConnectionLog, PodContext, Proxy};
use crate::relay::{RelayResult, Side};

/// How long connecting to the destination pod's HBONE port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const KIND: &str = "east-west";

/// The east-west gateway's CONNECT handler.
pub struct EastWestGateway {
    /// The gateway's own pod (its workload, network namespace and tokens).
    pub pod: Arc<PodContext>,
    /// Node-wide state: mesh state, certificates, records.
    pub proxy: Arc<Proxy>,
    /// Admissions and refusals.
    pub metrics: GatewayMetrics,
}

/// Why a tunnel was refused: the metric's label and the peer's status.
type Refusal = (&'static str, ConnectRefusal);

impl ConnectHandler for EastWestGateway {
    type Admission = ConnectionLog;
    type App = tokio::net::TcpStream;

    fn denial_status(&self) -> crate::hbone::DenialStatus {
        self.proxy.wire.denial
    }

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, ConnectionLog, Self::App> {
        Box::pin(async move {
            let peer_ip = req
                .peer_addr
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
            let mut log = ConnectionLog::start(
                &self.proxy,
                "east_west_gateway",
                "hbone",
                SocketAddr::new(peer_ip, 0),
                req.authority,
                Some(req.peer.to_string()),
                Some(self.pod.workload.identity.to_string()),
            );
            let admitted = match self.check(&req) {
                Ok(dst) => self.connect_to(dst).await,
                Err(refusal) => Err(refusal),
            };
            match admitted {
                Ok(tcp) => {
                    self.metrics.admitted(KIND);
                    log.opened();
                    Ok(Accepted {
                        app: tcp,
                        admission: log,
                        cancel: None,
                    })
                }
                Err((label, refusal)) => {
                    self.metrics.refused(KIND, label);
                    tracing::info!(
                        src = %req.peer,
                        peer = %peer_ip,
                        authority = %req.authority,
                        reason = label,
                        "east-west gateway refused a tunnel"
                    );
                    log.refused(refusal.reason().to_owned());
                    Err(refusal)
                }
            }
        })
    }

    fn finished(&self, _req: &ConnectRequest, result: &RelayResult, log: ConnectionLog) {
        // The HBONE server relays (destination, tunnel): the source is the tunnel, side B.
        log.relayed(result, Side::B);
    }
}

impl EastWestGateway {
    /// The destination pod's HBONE address, if this tunnel may go there.
    fn check(&self, req: &ConnectRequest) -> Result<SocketAddr, Refusal> {
        if req.peer.trust_domain() == &self.proxy.trust_domain {
            return Err((
                "local_source",
                ConnectRefusal::Denied(format!(
                    "{} is of this cluster: its pods are reached directly",
                    req.peer
                )),
            ));
        }
        if let Some(host) = &req.host {
            return Err((
                "not_an_address",
                ConnectRefusal::BadRequest(format!(
                    "{host}: an east-west gateway takes a pod's address, never a name"
                )),
            ));
        }
        let dst = req.authority;
        if dst.port() != ports::HBONE {
            return Err((
                "not_hbone",
                ConnectRefusal::BadRequest(format!(
                    "{dst}: only a pod's HBONE port ({}) is reachable through an east-west gateway",
                    ports::HBONE
                )),
            ));
        }
        let state = self.proxy.state.borrow().clone();
        let own = self.pod.workload.ips.contains(&dst.ip());
        match state.by_ip(dst.ip()) {
            Some(w) if w.captured() && !own => Ok(dst),
            _ => Err((
                "unknown_destination",
                ConnectRefusal::BadRequest(format!(
                    "{} is not a mesh pod of this cluster",
                    dst.ip()
                )),
            )),
        }
    }

    async fn connect_to(&self, dst: SocketAddr) -> Result<tokio::net::TcpStream, Refusal> {
        let unreachable = |why: String| ("unreachable", ConnectRefusal::Unreachable(why));
        match tokio::time::timeout(CONNECT_TIMEOUT, self.pod.netns.connect(dst)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(unreachable(format!("connect {dst}: {e}"))),
            Err(_) => Err(unreachable(format!(
                "connect {dst}: no answer within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }
}
