//! Inbound: HBONE on 15008 and plaintext capture on 15006, both in the pod's namespace.
//!
//! HBONE: mutual TLS is terminated with the pod's SVID, the peer SPIFFE ID comes from the
//! verified chain, the CONNECT `:authority` must be an application port of this pod (never a
//! ztunnel port: see [`crate::guard`]), the source address for policy is the TCP peer (never
//! the `forwarded` claim), and only then — within the pod's tunnel caps
//! ([`crate::tunnel_slots`]) — does the ztunnel connect to the application (from inside the
//! pod, with its mark). Connections register for policy re-checks before they are
//! decided, so a policy change never misses one being admitted. An admitted tunnel's record
//! is opened at admission and travels with it (the [`hbone::ConnectHandler`]'s admission), so
//! its duration is the tunnel's and the drain waits for it. Plaintext sources have no
//! identity: refused unless the pod's namespace permits plaintext, then decided by policy
//! like any other source (only rules that need no identity can admit them).

use std::sync::Arc;

use membrane_runtime::listener::{LogLimiter, RefusalReason};

use crate::conntrack::{ConnAttrs, ConnGuard};
use crate::hbone::{self, Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest};
use crate::proxy::{ConnectionLog, INBOUND_HBONE, PodContext, Proxy, original_dst, serve_listener};
use crate::relay::{Limits, RelayResult, ResetOnError, Side};
use crate::tunnel_slots::{INBOUND_TUNNELS, TunnelSlot};
use membrane_identity::WorkloadIdentity;

/// Lines a peer could otherwise write at its own rate: one per 5 s each, with the count left
/// out.
static CONNECTION_LOG: LogLimiter = LogLimiter::new();
static AUTHORITY_LOG: LogLimiter = LogLimiter::new();
static FORWARDED_LOG: LogLimiter = LogLimiter::new();
static TUNNEL_CAP_LOG: LogLimiter = LogLimiter::new();

/// Accepts HBONE connections for one pod until it is removed.
pub async fn run_hbone(listener: tokio::net::TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    serve_listener(listener, pod, proxy, INBOUND_HBONE, hbone_connection).await;
}

async fn hbone_connection(
    tcp: tokio::net::TcpStream,
    _peer: std::net::SocketAddr,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    let _ = tcp.set_nodelay(true);
    let identity = &pod.workload().identity;
    let svid = match proxy
        .certs
        .svid_for_connection(identity, "destination")
        .await
    {
        Ok(svid) => svid,
        Err(e) => {
            // Never an expired certificate: the connection is refused (the peer sees the TCP
            // connection close before any TLS) and counted.
            tracing::warn!(
                identity = %pod.workload().identity,
                error = %e,
                "no valid certificate to serve HBONE; connection refused"
            );
            return;
        }
    };
    let tls = match proxy.tls.server_config(&svid) {
        Ok(cfg) => cfg,
        Err(e) => {
            proxy
                .certs
                .metrics()
                .refused("destination", pod.workload().identity.to_string());
            tracing::warn!(error = %e, "TLS configuration failed; connection refused");
            return;
        }
    };
    let handler = Arc::new(InboundHandler {
        pod: pod.clone(),
        proxy: proxy.clone(),
    });
    if let Err(e) = hbone::serve_connection(tcp, tls, handler).await
        && let Some(left_out) = CONNECTION_LOG.allow()
    {
        tracing::info!(error = %e, left_out, "HBONE connection refused or failed");
    }
}

struct InboundHandler {
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
}

/// What an admitted tunnel keeps until its relay ends: its record, opened at admission (so
/// its duration is the tunnel's and the drain counts it), and its policy registration.
struct InboundTunnel {
    log: ConnectionLog,
    _registration: ConnGuard,
    _slot: TunnelSlot,
}

impl ConnectHandler for InboundHandler {
    type Admission = InboundTunnel;
    type App = tokio::net::TcpStream;

    fn denial_status(&self) -> hbone::DenialStatus {
        self.proxy.wire.denial
    }

    fn trust_bundles(&self) -> Option<membrane_identity::SharedTrustBundle> {
        Some(self.proxy.certs.bundle())
    }

    fn handshake_relay_share(&self, peer: std::net::IpAddr) -> bool {
        self.is_east_west_gateway(peer)
    }

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, InboundTunnel> {
        Box::pin(async move {
            // A `name:port` authority is for egress gateways: a pod is reached by address.
            if let Some(host) = &req.host {
                let reason = format!("authority names host {host:?}; a pod takes ip:port");
                self.log(&req).refused(reason.clone());
                return Err(ConnectRefusal::BadRequest(reason));
            }
            // The authority must be an application port of this pod: never loopback, another
            // address or a ztunnel port (a tunnel to 15001/15006/15008 would loop).
            if let Err(e) = crate::guard::check_inbound(req.authority, &self.pod.workload().ips) {
                self.proxy.guard.refused("inbound_hbone", &e);
                if let Some(left_out) = AUTHORITY_LOG.allow() {
                    tracing::warn!(
                        authority = %req.authority,
                        peer = %req.peer,
                        error = %e,
                        left_out,
                        "CONNECT authority refused"
                    );
                }
                let reason = format!("authority refused: {e}");
                self.log(&req).refused(reason.clone());
                return Err(ConnectRefusal::BadRequest(reason));
            }
            let Some(peer_addr) = req.peer_addr else {
                let reason = "the HBONE connection's peer address is unknown".to_owned();
                self.log(&req).refused(reason.clone());
                return Err(ConnectRefusal::Unauthenticated(reason));
            };
            let source = match WorkloadIdentity::from_spiffe_id(req.peer.clone()) {
                Ok(id) => id,
                Err(e) => {
                    let reason = format!("peer {} is not a workload identity: {e}", req.peer);
                    self.log(&req).refused(reason.clone());
                    return Err(ConnectRefusal::Unauthenticated(reason));
                }
            };
            // The handshake verified the peer against its trust domain's roots; a connection
            // made before that trust domain left the federation carries no new tunnel.
            if (self.proxy.certs.bundle())
                .for_trust_domain(source.trust_domain())
                .is_none()
            {
                let reason = format!(
                    "trust domain {} is not federated with this cluster",
                    source.trust_domain()
                );
                self.log(&req).refused(reason.clone());
                return Err(ConnectRefusal::Unauthenticated(reason));
            }
            // Policy sees the verified TCP peer (the source ztunnel dials from inside the
            // source pod), never the peer's `forwarded` claim — except as the remote address
            // (`remoteIpBlocks`) when the peer is an ingress gateway of the mesh: its
            // certificate's identity is the gateway pod's at that address.
            let (source_ip, claim) = crate::guard::hbone_source(peer_addr.ip(), req.forwarded_for);
            let remote_ip = claim.filter(|_| self.is_ingress_gateway(&source, source_ip));
            // Through this cluster's east-west gateway the TCP peer is the gateway, and the
            // claim a federated cluster's pod address: expected, recorded, not believed.
            // Policy gets neither: the source address is unknown, so address conditions
            // fail closed (`membrane_policy::UNKNOWN_SOURCE_IP`) instead of seeing every
            // federated source as the gateway's local address.
            let relayed = self.is_east_west_gateway(source_ip)
                && source.trust_domain() != &self.proxy.trust_domain;
            // A gateway carries many clients' tunnels: exempt from one peer's share — the
            // east-west gateway only for what it relays (a federated identity), since the
            // gateway role is a pod label and the label alone must not lift the share.
            let gateway_peer = relayed || self.is_ingress_gateway(&source, source_ip);
            if let (Some(claim), None, false) = (claim, remote_ip, relayed) {
                self.proxy.guard.forwarded_ignored();
                if let Some(left_out) = FORWARDED_LOG.allow() {
                    tracing::warn!(
                        peer = %req.peer,
                        peer_addr = %peer_addr,
                        forwarded_for = %claim,
                        left_out,
                        "forwarded source differs from the TCP peer; deciding on the TCP peer"
                    );
                }
            }
            let attrs = ConnAttrs {
                source: Some(source),
                source_ip: if relayed {
                    membrane_policy::UNKNOWN_SOURCE_IP
                } else {
                    source_ip
                },
                remote_ip,
                destination: self.pod.workload(),
                destination_ip: req.authority.ip(),
                destination_port: req.authority.port(),
            };
            // Registered before the decision: a policy change from here on re-checks this
            // connection, so none is admitted on a policy already replaced.
            let (cancel, registration) = self.proxy.open.register(attrs.clone());
            let decision = self.proxy.authorizer.authorize(&attrs);
            if !decision.allowed() {
                let reason = match &decision.policy {
                    Some(p) => format!("denied by policy {p}"),
                    None => "no ALLOW policy matches".to_owned(),
                };
                let mut log = self.log(&req);
                log.authorized(decision);
                log.refused(reason.clone());
                return Err(ConnectRefusal::Denied(reason));
            }
            // Each tunnel is a socket to the application: counted under the pod's caps.
            let caps = self.proxy.listener_caps;
            let slot = match self.pod.tunnels.take(source_ip, gateway_peer, caps) {
                Ok(slot) => slot,
                Err(cap) => {
                    let reason = self.over_tunnel_cap(source_ip, cap);
                    let mut log = self.log(&req);
                    log.authorized(decision);
                    log.refused(reason.clone());
                    return Err(ConnectRefusal::Unreachable(reason));
                }
            };
            let app = match self.pod.netns.connect_app(req.authority).await {
                Ok(app) => app,
                Err(e) => {
                    let reason = format!("application at {} unreachable: {e}", req.authority);
                    self.log(&req).refused(reason.clone());
                    return Err(ConnectRefusal::Unreachable(reason));
                }
            };
            if cancel.is_cancelled() {
                app.reset();
                let reason = "policy changed while connecting; no longer allowed".to_owned();
                let mut log = self.log(&req);
                log.authorized(decision);
                log.refused(reason.clone());
                return Err(ConnectRefusal::Denied(reason));
            }
            let mut log = self.log(&req);
            log.authorized(decision);
            log.opened();
            Ok(Accepted {
                app,
                admission: InboundTunnel {
                    log,
                    _registration: registration,
                    _slot: slot,
                },
                cancel: Some(cancel),
            })
        })
    }

    fn finished(&self, _req: &ConnectRequest, result: &RelayResult, tunnel: InboundTunnel) {
        // The HBONE server relays (application, tunnel): the source is the tunnel, side B.
        tunnel.log.relayed(result, Side::B);
    }
}

impl InboundHandler {
    /// Whether `ip` is an ingress gateway pod of the mesh whose identity is `source`.
    fn is_ingress_gateway(&self, source: &WorkloadIdentity, ip: std::net::IpAddr) -> bool {
        self.proxy.state.borrow().by_ip(ip).is_some_and(|w| {
            w.identity == *source
                && w.gateway
                    .as_ref()
                    .is_some_and(|r| r.kind == crate::state::GatewayKind::Ingress)
        })
    }

    /// Whether `ip` is an east-west gateway pod of this cluster.
    fn is_east_west_gateway(&self, ip: std::net::IpAddr) -> bool {
        self.proxy.state.borrow().is_local_east_west_gateway(ip)
    }

    /// Counts and logs (at a bounded rate) a tunnel refused over `cap`; the refusal's reason.
    fn over_tunnel_cap(&self, peer: std::net::IpAddr, cap: RefusalReason) -> String {
        let caps = self.proxy.listener_caps;
        self.proxy
            .listener_metrics
            .refused_counter(INBOUND_TUNNELS, cap)
            .inc();
        let (held, held_by_peer) = self.pod.tunnels.held(peer);
        if let Some(left_out) = TUNNEL_CAP_LOG.allow() {
            tracing::warn!(
                %peer,
                reason = cap.as_str(),
                held,
                held_by_peer,
                max = caps.max,
                max_per_peer = caps.max_per_peer,
                left_out,
                "tunnel refused: too many tunnels to this pod"
            );
        }
        match cap {
            RefusalReason::PeerLimit => format!(
                "{peer} already holds {} tunnels to this pod",
                caps.max_per_peer
            ),
            _ => format!("this pod already holds {} tunnels", caps.max),
        }
    }

    fn log(&self, req: &ConnectRequest) -> ConnectionLog {
        let unknown = std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED);
        let (ip, claim) = match req.peer_addr {
            Some(addr) => crate::guard::hbone_source(addr.ip(), req.forwarded_for),
            None => (unknown, req.forwarded_for),
        };
        let mut log = ConnectionLog::start(
            &self.proxy,
            "inbound",
            "hbone",
            std::net::SocketAddr::new(ip, 0),
            req.authority,
            Some(req.peer.to_string()),
            Some(self.pod.workload().identity.to_string()),
        );
        if let Some(claim) = claim {
            log.claimed_source(claim);
        }
        log
    }
}

/// Accepts plaintext (identity-less) connections for one pod until it is removed.
pub async fn run_plaintext(
    listener: tokio::net::TcpListener,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    serve_listener(listener, pod, proxy, "plaintext", plaintext_connection).await;
}

async fn plaintext_connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    let dst = match original_dst(&tcp, peer) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(error = %e, "no original destination; closing");
            return;
        }
    };
    let mut log = ConnectionLog::start(
        &proxy,
        "inbound",
        "plaintext",
        peer,
        dst,
        None,
        Some(pod.workload().identity.to_string()),
    );
    let mode = proxy.state.borrow().plaintext(&pod.workload().namespace);
    let refuse = |log: ConnectionLog, tcp: tokio::net::TcpStream, reason: String| {
        // Reset rather than close: the caller sees a refusal, not an empty reply.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        drop(tcp);
        log.refused(reason);
    };
    // Only an application port of this pod: a ztunnel port or loopback would loop.
    if let Err(e) = crate::guard::check_inbound(dst, &pod.workload().ips) {
        proxy.guard.refused("inbound_plaintext", &e);
        tracing::warn!(dst = %dst, error = %e, "plaintext destination refused");
        return refuse(log, tcp, format!("destination refused: {e}"));
    }
    // A plaintext source is not authenticated.
    if !mode.admits(false) {
        return refuse(
            log,
            tcp,
            format!(
                "plaintext source refused: namespace {} does not permit plaintext",
                pod.workload().namespace
            ),
        );
    }
    // Permitted namespaces evaluate plaintext sources like any other, with no
    // identity: only rules that need none (ipBlocks, notPrincipals, …) admit them.
    let attrs = ConnAttrs {
        source: None,
        source_ip: peer.ip(),
        remote_ip: None,
        destination: pod.workload(),
        destination_ip: dst.ip(),
        destination_port: dst.port(),
    };
    // Registered before the decision, as for HBONE: no policy change can slip in between.
    let (revoked, _registration) = proxy.open.register(attrs.clone());
    let decision = proxy.authorizer.authorize(&attrs);
    let allowed = decision.allowed();
    let policy = decision.policy.clone();
    log.authorized(decision);
    if !allowed {
        let reason = match policy {
            Some(p) => format!("plaintext source denied by policy {p}"),
            None => "plaintext source: no ALLOW policy matches".to_owned(),
        };
        return refuse(log, tcp, reason);
    }
    let app = match pod.netns.connect_app(dst).await {
        Ok(app) => app,
        Err(e) => return log.refused(format!("application at {dst} unreachable: {e}")),
    };
    if revoked.is_cancelled() {
        app.reset();
        return refuse(
            log,
            tcp,
            "policy changed while connecting; no longer allowed".to_owned(),
        );
    }
    log.relay(
        tcp,
        app,
        Limits {
            revoked: Some(revoked),
            idle: None,
        },
    )
    .await;
}
