//! The egress gateway (DESIGN.md §10): HBONE in, the outside world out, from the gateway's own
//! address.
//!
//! A source ztunnel whose EgressPolicy rule says `via: <this gateway>` opens an HBONE tunnel
//! here presenting the *source pod's* SVID, with `:authority` `name:port` (the name the pod
//! resolved) or `ip:port` (an address rule). Nothing the source node says is taken on its
//! word:
//!
//! 1. the source is the verified certificate's identity, and the tunnel's TCP peer must be an
//!    address of a mesh workload with that identity (the source ztunnel dials from inside the
//!    source pod) — its namespace and labels select the EgressPolicies;
//! 2. the name is resolved here ([`super::resolve`], answers kept for their TTL), never taken
//!    from the source;
//! 3. the gateway decides the same EgressPolicies for that source again: only an ALLOW whose
//!    rule names this gateway in `via` admits the tunnel (no policy, a DENY, or a rule that
//!    leaves directly or through another gateway refuses it), and the budget of the deciding
//!    policy is counted here, per source identity;
//! 4. one source pod address holds at most its share of the gateway's tunnels (the pod caps
//!    counted in tunnels, [`crate::tunnel_slots`]);
//! 5. the connection leaves from the gateway pod, to the first resolved address that answers;
//!    the client's first flight is held until its ClientHello is whole and decided again with
//!    its server name ([`crate::egress::first_flight`]).
//!
//! Open tunnels are registered like the node's egress connections, so a policy change that
//! no longer allows one closes it. Every tunnel has a record (direction `egress_gateway`)
//! naming the source identity, the name and this gateway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use membrane_identity::WorkloadIdentity;
use membrane_policy::egress::{EgressDecision, EgressVerdict, GatewayRef};
use tokio_util::sync::CancellationToken;

use super::metrics::GatewayMetrics;
use super::resolve::CachingResolver;
use crate::egress::first_flight::{self, FirstFlight, FlightRefusal, HelloCheck};
use crate::egress::{self, EgressAttrs, open::OpenHandle};
use crate::hbone::{Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest};
use crate::proxy::{ConnectionLog, PodContext, Proxy};
use crate::relay::{RelayResult, Side};
use crate::state::Workload;
use crate::tunnel_slots::TunnelSlot;

/// How long connecting to one resolved address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolved addresses tried, in order, before the tunnel is refused as unreachable.
pub const MAX_ATTEMPTS: usize = 3;

const KIND: &str = "egress";

/// The egress gateway's CONNECT handler.
pub struct EgressGateway {
    /// The gateway's own pod (its workload, network namespace and tokens).
    pub pod: Arc<PodContext>,
    /// Node-wide state: mesh state, certificates, egress control, records.
    pub proxy: Arc<Proxy>,
    /// The gateway this pod serves (what `via` must name).
    pub me: GatewayRef,
    /// Where names are resolved (answers kept for their TTL).
    pub resolver: CachingResolver,
    /// Admissions and refusals.
    pub metrics: GatewayMetrics,
}

/// What an admitted tunnel keeps until it ends.
pub struct EgressTunnel {
    log: ConnectionLog,
    open: OpenHandle,
    meter: Option<egress::budget::Meter>,
    /// Set when the first flight was refused.
    gate_refused: Arc<OnceLock<FlightRefusal>>,
    _slot: TunnelSlot,
}

/// A refusal: the record's reason, the metric's label, the peer's status.
struct Refusal {
    label: String,
    refusal: ConnectRefusal,
}

impl Refusal {
    fn new(label: &str, refusal: ConnectRefusal) -> Self {
        Self {
            label: label.to_owned(),
            refusal,
        }
    }
}

impl ConnectHandler for EgressGateway {
    type Admission = EgressTunnel;
    type App = FirstFlight;

    fn denial_status(&self) -> crate::hbone::DenialStatus {
        self.proxy.wire.denial
    }

    fn trust_bundles(&self) -> Option<membrane_identity::SharedTrustBundle> {
        Some(self.proxy.certs.bundle())
    }

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, EgressTunnel, FirstFlight> {
        Box::pin(async move {
            let peer_ip = req
                .peer_addr
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
            let mut log = ConnectionLog::start(
                &self.proxy,
                "egress_gateway",
                "hbone",
                SocketAddr::new(peer_ip, 0),
                req.authority,
                Some(req.peer.to_string()),
                Some(self.pod.workload().identity.to_string()),
            );
            match self.admit(&req, peer_ip, &mut log).await {
                Ok((app, open, meter, gate_refused, slot)) => {
                    self.metrics.admitted(KIND);
                    log.opened();
                    let cancel = open.cancel.clone();
                    Ok(Accepted {
                        app,
                        admission: EgressTunnel {
                            log,
                            open,
                            meter,
                            gate_refused,
                            _slot: slot,
                        },
                        cancel: Some(cancel),
                    })
                }
                Err(Refusal { label, refusal }) => {
                    self.metrics.refused(KIND, &label);
                    tracing::info!(
                        src = %req.peer,
                        peer = %peer_ip,
                        host = req.host.as_deref(),
                        port = req.authority.port(),
                        reason = %label,
                        "egress gateway refused a tunnel"
                    );
                    log.refused(refusal.reason().to_owned());
                    Err(refusal)
                }
            }
        })
    }

    fn finished(&self, _req: &ConnectRequest, result: &RelayResult, tunnel: EgressTunnel) {
        let EgressTunnel {
            mut log,
            open,
            meter,
            gate_refused,
            _slot,
        } = tunnel;
        let control = &self.proxy.egress;
        if let Some(revoked) = open.revoked.get() {
            control.metrics.closed("policy_changed");
            log.egress_closed("policy_changed", revoked.policy.clone());
        } else if meter.is_some_and(|m| m.spent().is_cancelled()) {
            control.metrics.closed("budget_exhausted");
            log.egress_closed("budget_exhausted", None);
        } else if let Some(refusal) = gate_refused.get() {
            let reason = refusal.decision.reason.as_str();
            self.metrics.refused(KIND, reason);
            log.egress_closed(reason, None);
        }
        drop(open);
        // The HBONE server relays (upstream, tunnel): the source is the tunnel, side B.
        log.relayed(result, Side::B);
    }
}

type Admitted = (
    FirstFlight,
    OpenHandle,
    Option<egress::budget::Meter>,
    Arc<OnceLock<FlightRefusal>>,
    TunnelSlot,
);

impl EgressGateway {
    /// The source workload: the certificate's identity at the tunnel's TCP peer address.
    fn source(&self, req: &ConnectRequest, peer_ip: IpAddr) -> Result<Arc<Workload>, Refusal> {
        let identity = WorkloadIdentity::from_spiffe_id(req.peer.clone()).map_err(|e| {
            Refusal::new(
                "unauthenticated",
                ConnectRefusal::Unauthenticated(format!("{} is not a workload: {e}", req.peer)),
            )
        })?;
        let state = self.proxy.state.borrow().clone();
        match state.by_ip(peer_ip) {
            Some(w) if w.identity == identity && w.captured() => Ok(w.clone()),
            _ => Err(Refusal::new(
                "unknown_source",
                ConnectRefusal::Denied(format!(
                    "the tunnel comes from {peer_ip}, which is not a mesh pod of {identity}"
                )),
            )),
        }
    }

    async fn admit(
        &self,
        req: &ConnectRequest,
        peer_ip: IpAddr,
        log: &mut ConnectionLog,
    ) -> Result<Admitted, Refusal> {
        let source = self.source(req, peer_ip)?;
        // Each tunnel is a socket out of this pod: one source pod holds its share of them
        // (the pod caps counted in tunnels, as for a pod's inbound tunnels).
        let caps = self.proxy.listener_caps;
        let slot = self.pod.tunnels.take(peer_ip, false, caps).map_err(|cap| {
            Refusal::new(
                cap.as_str(),
                ConnectRefusal::Unreachable(format!(
                    "{peer_ip} already holds its share of this gateway's tunnels \
                     ({} per peer, {} in all)",
                    caps.max_per_peer, caps.max
                )),
            )
        })?;
        let port = req.authority.port();
        let addresses = match &req.host {
            Some(host) => {
                self.resolver
                    .resolve(&self.pod.netns, host)
                    .await
                    .map_err(|e| {
                        Refusal::new(
                            e.label(),
                            ConnectRefusal::Unreachable(format!("resolving {host}: {e}")),
                        )
                    })?
                    .addresses
            }
            None => vec![req.authority.ip()],
        };
        let state = self.proxy.state.borrow().clone();
        // Never a way into the mesh or back to a gateway: mesh addresses keep their own path.
        if let Some(ip) = addresses
            .iter()
            .find(|ip| ip.is_unspecified() || ip.is_loopback() || state.by_ip(**ip).is_some())
        {
            return Err(Refusal::new(
                "mesh_destination",
                ConnectRefusal::BadRequest(format!("{ip} is not outside the mesh")),
            ));
        }
        let attrs = EgressAttrs {
            dst: SocketAddr::new(addresses[0], port),
            pinned: req.host.iter().cloned().collect(),
            sni: None,
            // Decided on name and port here; the server name when the first flight comes.
            tls: false,
            sni_unreadable: false,
        };
        log.destination(attrs.dst);
        let decision = egress::decide_attrs(&state, &source, &attrs);
        drop(state);
        let control = &self.proxy.egress;
        control.metrics.decided(&decision);
        log.egress(egress::record(&decision, req.host.clone(), None));
        self.through_me(&decision)?;
        let meter = egress::admit_budget(
            control,
            &decision,
            &source.identity.to_string(),
            attrs.dst.ip(),
            SystemTime::now(),
        )
        .map_err(|e| {
            log.egress_closed("budget_exhausted", None);
            Refusal::new("budget_exhausted", ConnectRefusal::Denied(e.to_string()))
        })?;
        let (tcp, dst) = self.connect_out(&addresses, port).await?;
        log.destination(dst);
        let attrs = EgressAttrs { dst, ..attrs };
        let cancel = meter
            .as_ref()
            .map_or_else(CancellationToken::new, |m| m.spent().child_token());
        let open = control.open.register(source.clone(), attrs.clone(), cancel);
        let gate_refused = Arc::new(OnceLock::new());
        let check = self.hello_check(source, attrs, gate_refused.clone());
        let app = FirstFlight::new(tcp, meter.clone(), check);
        Ok((app, open, meter, gate_refused, slot))
    }

    /// Only an ALLOW whose rule sends the connection through this gateway admits it.
    fn through_me(&self, decision: &EgressDecision) -> Result<(), Refusal> {
        let refuse =
            |label: &str, why: String| Err(Refusal::new(label, ConnectRefusal::Denied(why)));
        match (decision.verdict, &decision.via) {
            (EgressVerdict::Allow, Some(via)) if *via == self.me => Ok(()),
            (EgressVerdict::Allow, Some(via)) => refuse(
                "other_gateway",
                format!("the deciding rule sends this connection through {via}"),
            ),
            (EgressVerdict::Allow, None) => refuse(
                "not_via_gateway",
                "the deciding rule does not send this connection through a gateway".into(),
            ),
            (EgressVerdict::Deny | EgressVerdict::Passthrough, _) => refuse(
                decision.reason.as_str(),
                format!("egress {}", decision.reason.as_str()),
            ),
        }
    }

    async fn connect_out(
        &self,
        addresses: &[IpAddr],
        port: u16,
    ) -> Result<(tokio::net::TcpStream, SocketAddr), Refusal> {
        let mut last = String::new();
        for ip in addresses.iter().take(MAX_ATTEMPTS) {
            let dst = SocketAddr::new(*ip, port);
            match tokio::time::timeout(CONNECT_TIMEOUT, self.pod.netns.connect(dst)).await {
                Ok(Ok(tcp)) => return Ok((tcp, dst)),
                Ok(Err(e)) => last = format!("connect {dst}: {e}"),
                Err(_) => last = format!("connect {dst}: no answer within {CONNECT_TIMEOUT:?}"),
            }
        }
        Err(Refusal::new(
            "unreachable",
            ConnectRefusal::Unreachable(last),
        ))
    }

    /// The decision again once the first flight shows whether it is TLS and which server
    /// name it asks for: only an ALLOW through this gateway lets it on.
    fn hello_check(
        &self,
        source: Arc<Workload>,
        attrs: EgressAttrs,
        refused: Arc<OnceLock<FlightRefusal>>,
    ) -> HelloCheck {
        let me = self.me.clone();
        first_flight::recheck(
            self.proxy.state.clone(),
            source,
            attrs,
            move |decision| {
                decision.verdict == EgressVerdict::Allow && decision.via.as_ref() == Some(&me)
            },
            "gateway",
            refused,
        )
    }
}
