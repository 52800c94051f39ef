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
//! 1. the peer must be of a trust domain federated now (checked at every CONNECT: a
//!    connection outlives a federation) and not this cluster's own — its workloads reach its
//!    pods directly; one source identity holds at most [`MAX_TUNNELS_PER_SOURCE`] tunnels;
//! 2. the authority must be an address, never a name, on port 15008, of a mesh pod this
//!    cluster captures (not a gateway, not an imported or foreign workload, not this pod)
//!    that is a ready endpoint of a Service offered to federated clusters
//!    (`membrane.dev/export=true`): what this cluster does not export stays out of reach;
//! 3. the connection leaves from the gateway pod, bounded by [`CONNECT_TIMEOUT`].
//!
//! Every tunnel has a record (direction `east_west_gateway`) naming the source identity and
//! the pod's HBONE address; refusals are counted by reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use membrane_api::ports;
use membrane_identity::SpiffeId;
use membrane_runtime::slots::{KeyedSlots, Slot};

use super::metrics::GatewayMetrics;
use crate::hbone::{Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest};
use crate::proxy::{ConnectionLog, PodContext, Proxy};
use crate::relay::{RelayResult, Side};
use crate::state::MeshState;

/// How long connecting to the destination pod's HBONE port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Tunnels one source identity may hold through the gateway at once. Each carries one
/// multiplexed HBONE connection of a source pod to a destination pod, so a workload needs a
/// few per destination; the cap keeps one federated workload from holding the gateway's (and
/// the destinations') connection budget.
pub const MAX_TUNNELS_PER_SOURCE: usize = 256;

const KIND: &str = "east-west";

/// The east-west gateway's CONNECT handler.
pub struct EastWestGateway {
    /// The gateway's own pod (its workload, network namespace and tokens).
    pub pod: Arc<PodContext>,
    /// Node-wide state: mesh state, certificates, records.
    pub proxy: Arc<Proxy>,
    /// Admissions and refusals.
    pub metrics: GatewayMetrics,
    /// Open tunnels per source identity.
    pub open: SourceSlots,
}

/// Open tunnels per source identity (at most [`MAX_TUNNELS_PER_SOURCE`] each).
pub type SourceSlots = KeyedSlots<SpiffeId>;

/// A place for one more tunnel of `source`, or the `source_limit` refusal.
fn take_tunnel(slots: &SourceSlots, source: &SpiffeId) -> Result<Slot<SpiffeId>, Refusal> {
    slots.take(source, MAX_TUNNELS_PER_SOURCE).ok_or_else(|| {
        (
            "source_limit",
            ConnectRefusal::Unreachable(format!(
                "{source} already holds {MAX_TUNNELS_PER_SOURCE} tunnels through this gateway"
            )),
        )
    })
}

/// What an admitted tunnel keeps until it ends.
pub struct Tunnel {
    log: ConnectionLog,
    _slot: Slot<SpiffeId>,
}

/// Why a tunnel was refused: the metric's label and the peer's status.
type Refusal = (&'static str, ConnectRefusal);

/// Whether `req` may pass a gateway of trust domain `local` whose own addresses are `own`,
/// its peer's trust domain being `federated` now or not: the destination pod's HBONE address,
/// or why not.
fn admit(
    req: &ConnectRequest,
    local: &membrane_identity::TrustDomain,
    federated: bool,
    state: &MeshState,
    own: &[IpAddr],
) -> Result<SocketAddr, Refusal> {
    if !federated {
        return Err((
            "not_federated",
            ConnectRefusal::Unauthenticated(format!(
                "trust domain {} is not federated with this cluster",
                req.peer.trust_domain()
            )),
        ));
    }
    if req.peer.trust_domain() == local {
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
    match state.by_ip(dst.ip()) {
        Some(w) if w.captured() && !own.contains(&dst.ip()) => {}
        _ => {
            return Err((
                "unknown_destination",
                ConnectRefusal::BadRequest(format!(
                    "{} is not a mesh pod of this cluster",
                    dst.ip()
                )),
            ));
        }
    }
    if !state.is_exported(dst.ip()) {
        return Err((
            "not_exported",
            ConnectRefusal::Denied(format!(
                "{} backs no Service this cluster exports",
                dst.ip()
            )),
        ));
    }
    Ok(dst)
}

impl ConnectHandler for EastWestGateway {
    type Admission = Tunnel;
    type App = tokio::net::TcpStream;

    fn denial_status(&self) -> crate::hbone::DenialStatus {
        self.proxy.wire.denial
    }

    fn trust_bundles(&self) -> Option<membrane_identity::SharedTrustBundle> {
        Some(self.proxy.certs.bundle())
    }

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, Tunnel, Self::App> {
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
                Some(self.pod.workload().identity.to_string()),
            );
            let admitted = match self.check(&req) {
                Ok(dst) => match take_tunnel(&self.open, &req.peer) {
                    Ok(slot) => self.connect_to(dst).await.map(|tcp| (tcp, slot)),
                    Err(refusal) => Err(refusal),
                },
                Err(refusal) => Err(refusal),
            };
            match admitted {
                Ok((tcp, slot)) => {
                    self.metrics.admitted(KIND);
                    log.opened();
                    Ok(Accepted {
                        app: tcp,
                        admission: Tunnel { log, _slot: slot },
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

    fn finished(&self, _req: &ConnectRequest, result: &RelayResult, tunnel: Tunnel) {
        // The HBONE server relays (destination, tunnel): the source is the tunnel, side B.
        tunnel.log.relayed(result, Side::B);
    }
}

impl EastWestGateway {
    /// The destination pod's HBONE address, if this tunnel may go there.
    fn check(&self, req: &ConnectRequest) -> Result<SocketAddr, Refusal> {
        let state = self.proxy.state.borrow().clone();
        let federated = (self.proxy.certs.bundle())
            .for_trust_domain(req.peer.trust_domain())
            .is_some();
        admit(
            req,
            &self.proxy.trust_domain,
            federated,
            &state,
            &self.pod.workload().ips,
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str) -> membrane_identity::TrustDomain {
        membrane_identity::spiffe_id::parse_trust_domain(name).expect("td")
    }

    /// Cluster B: an exported mesh pod, an unexported one, a plain (non-mesh) pod, a foreign
    /// HBONE peer, an egress gateway pod and this gateway.
    fn state() -> MeshState {
        let text = "workloads:\n\
            - {uid: m, name: model, namespace: inference, node: n1, ips: [10.20.0.5]}\n\
            - {uid: p, name: plain, namespace: web, node: n1, ips: [10.20.0.6], protocol: TCP}\n\
            - {uid: f, name: other, namespace: ambient, node: n1, ips: [10.20.0.7], foreign: true}\n\
            - {uid: g, name: gw, namespace: gw, node: n2, ips: [10.20.0.9]}\n\
            - {uid: i, name: internal, namespace: inference, node: n1, ips: [10.20.0.8]}\n";
        let mut state = MeshState::parse("f", text, &td("cluster-b.example")).expect("valid");
        // An egress gateway pod (never captured), even if a Service selected it.
        let mut egress = (**state.by_uid("m").expect("model")).clone();
        egress.uid = "e".into();
        egress.ips = vec!["10.20.0.10".parse().expect("ip")];
        egress.gateway = Some(crate::state::GatewayRole {
            kind: crate::state::GatewayKind::Egress,
            name: "egress".into(),
        });
        state.insert(egress).expect("insert");
        // Exported: the model server and the egress gateway pod; `internal` is not.
        for ip in ["10.20.0.5", "10.20.0.10"] {
            state.add_exported(ip.parse().expect("ip"));
        }
        state
    }

    fn request(peer: &str, authority: &str, host: Option<&str>) -> ConnectRequest {
        ConnectRequest {
            peer: peer.parse().expect("id"),
            authority: authority.parse().expect("authority"),
            host: host.map(str::to_owned),
            forwarded_for: None,
            peer_addr: Some("10.10.0.3:40000".parse().expect("addr")),
            baggage: None,
            traceparent: None,
        }
    }

    const TRAINER: &str = "spiffe://cluster-a.example/ns/training/sa/trainer";

    /// Only a federated identity, to a mesh pod's HBONE port by address, passes; the gateway
    /// is never a way to anything else.
    #[test]
    fn only_federated_sources_to_a_mesh_pods_hbone_port() {
        let (local, state) = (td("cluster-b.example"), state());
        let own: Vec<IpAddr> = vec!["10.20.0.9".parse().expect("ip")];
        let admitted = admit(
            &request(TRAINER, "10.20.0.5:15008", None),
            &local,
            true,
            &state,
            &own,
        );
        assert_eq!(
            admitted.ok(),
            Some("10.20.0.5:15008".parse().expect("addr"))
        );
        let cases = [
            (
                request(
                    "spiffe://cluster-b.example/ns/web/sa/default",
                    "10.20.0.5:15008",
                    None,
                ),
                "local_source",
            ),
            (
                request(TRAINER, "0.0.0.0:15008", Some("model.inference")),
                "not_an_address",
            ),
            (request(TRAINER, "10.20.0.5:8080", None), "not_hbone"),
            (
                request(TRAINER, "10.20.0.6:15008", None),
                "unknown_destination",
            ),
            (
                request(TRAINER, "10.20.0.7:15008", None),
                "unknown_destination",
            ),
            (
                request(TRAINER, "10.20.0.9:15008", None),
                "unknown_destination",
            ),
            (
                request(TRAINER, "10.99.0.1:15008", None),
                "unknown_destination",
            ),
            (
                request(TRAINER, "127.0.0.1:15008", None),
                "unknown_destination",
            ),
            (
                request(TRAINER, "10.20.0.10:15008", None),
                "unknown_destination",
            ),
            (request(TRAINER, "10.20.0.8:15008", None), "not_exported"),
        ];
        for (req, label) in cases {
            let got = admit(&req, &local, true, &state, &own);
            assert_eq!(got.err().map(|(l, _)| l), Some(label), "{req:?}");
        }
        // A trust domain no longer federated passes nothing (its connection outlived it).
        let gone = admit(
            &request(TRAINER, "10.20.0.5:15008", None),
            &local,
            false,
            &state,
            &own,
        );
        assert_eq!(gone.err().map(|(l, _)| l), Some("not_federated"));
    }

    /// One source identity holds at most `MAX_TUNNELS_PER_SOURCE` tunnels; an ended one
    /// frees its slot; other identities are counted apart.
    #[test]
    fn tunnels_are_capped_per_source_identity() {
        let slots = SourceSlots::default();
        let trainer: SpiffeId = TRAINER.parse().expect("id");
        let other: SpiffeId = "spiffe://cluster-a.example/ns/x/sa/y".parse().expect("id");
        let mut held: Vec<_> = (0..MAX_TUNNELS_PER_SOURCE)
            .map(|_| take_tunnel(&slots, &trainer).expect("under the cap"))
            .collect();
        assert_eq!(
            take_tunnel(&slots, &trainer).err().map(|(l, _)| l),
            Some("source_limit")
        );
        assert!(take_tunnel(&slots, &other).is_ok(), "another identity");
        held.pop();
        held.push(take_tunnel(&slots, &trainer).expect("a slot was freed"));
        drop(held);
        assert!(slots.is_empty());
    }
}
