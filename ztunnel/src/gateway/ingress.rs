//! The ingress gateway (DESIGN.md §10): external TCP and TLS in, HBONE to a mesh pod out.
//!
//! The gateway serves the `Gateway` its pod's label names, in the pod's namespace: the
//! discovery stream carries it with the routes the controller accepted (`membrane.v1.Ingress`),
//! built into an [`IngressTable`](membrane_policy::gateway::IngressTable), empty when every
//! route was refused. One listener
//! per port of the table, inside the gateway pod, follows the table as it changes. Per
//! connection:
//!
//! 1. a TLS listener peeks the ClientHello (never opened: passthrough) for its server name;
//! 2. the table answers the route — or why not (`unknown_port`, `no_route`, `no_sni`,
//!    `unknown_sni`): the connection is reset and recorded;
//! 3. a ready endpoint of the route's backend Service port that is a mesh pod is picked (an
//!    endpoint outside the mesh is never used: plaintext never leaves the gateway);
//! 4. the connection is carried in an HBONE tunnel to that pod's ztunnel with the *gateway's*
//!    SVID, requiring the pod's SPIFFE ID, with `forwarded: for=<client>`; the destination
//!    believes that address for `remoteIpBlocks` because the peer is an ingress gateway pod
//!    (its policy sees `source.principal` = the gateway).
//!
//! Mesh pods that dial the gateway's address are tunnelled to its 15008 by their ztunnel
//! ([`IngressHbone`]): a CONNECT to one of the gateway's addresses on a TCP listener's port is
//! routed the same way, with the source pod's address as the client's; a TLS listener's
//! port is refused (400: routing by server name needs the ClientHello, which comes only after
//! the tunnel is accepted — in-mesh clients call the backend Service instead).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::metrics::GatewayMetrics;
use crate::hbone::{
    Accepted, ConnectFuture, ConnectHandler, ConnectHeaders, ConnectRefusal, ConnectRequest,
    PoolKey,
};
use crate::outbound::PodDial;
use crate::proxy::{ConnectionLog, PodContext, Proxy, serve_listener};
use crate::relay::{Limits, RelayResult, Side};
use crate::sni::{self, Hello};
use crate::state::{MeshState, Workload};

const KIND: &str = "ingress";

/// The ingress gateway: its pod and the gateway (`namespace/name`) it serves.
pub struct IngressGateway {
    /// The gateway's own pod.
    pub pod: Arc<PodContext>,
    /// Node-wide state.
    pub proxy: Arc<Proxy>,
    /// `namespace/name` of the `Gateway`.
    pub gateway: String,
    /// Admissions and refusals.
    pub metrics: GatewayMetrics,
    /// A client connection that carried no byte either way for this long is closed
    /// (`--gateway-idle-timeout`; `None`: never).
    pub idle_timeout: Option<std::time::Duration>,
}

/// Keeps one listener per port of the gateway's table until the pod stops accepting; ready
/// once the table is known and its listeners are bound.
pub async fn run(gw: Arc<IngressGateway>, ready: tokio::sync::watch::Sender<bool>) {
    let mut state = gw.proxy.state.clone();
    let mut listening: BTreeMap<u16, CancellationToken> = BTreeMap::new();
    let mut warned = false;
    loop {
        let ports: Option<Vec<u16>> = state
            .borrow_and_update()
            .ingress(&gw.gateway)
            .map(|t| t.ports().collect());
        match &ports {
            None if !warned => {
                warned = true;
                tracing::warn!(gateway = %gw.gateway, "no table for this gateway yet (no Gateway object for it); not ready");
            }
            _ => {}
        }
        let wanted = ports.clone().unwrap_or_default();
        listening.retain(|port, token| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(port, gateway = %gw.gateway, "listener removed from the gateway's routes; closing");
                token.cancel();
            }
            keep
        });
        let mut bound_all = true;
        for port in wanted {
            if listening.contains_key(&port) {
                continue;
            }
            match listen(&gw, port).await {
                Ok(token) => {
                    tracing::info!(port, gateway = %gw.gateway, "ingress listener bound");
                    listening.insert(port, token);
                }
                Err(e) => {
                    bound_all = false;
                    gw.metrics.refused(KIND, "bind_failed");
                    tracing::error!(port, gateway = %gw.gateway, error = %e, "cannot listen on a gateway port");
                }
            }
        }
        if ports.is_some() && bound_all && !*ready.borrow() {
            tracing::info!(
                gateway = %gw.gateway,
                identity = %gw.pod.workload().identity,
                ports = ?listening.keys().collect::<Vec<_>>(),
                "gateway serving"
            );
            ready.send_replace(true);
        }
        tokio::select! {
            _ = gw.pod.accepting.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

/// Binds `port` in the gateway pod and serves it until the returned token is cancelled.
async fn listen(gw: &Arc<IngressGateway>, port: u16) -> std::io::Result<CancellationToken> {
    let listener = gw
        .pod
        .netns
        .listen(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            crate::netns::Facing::Network,
        )
        .await?;
    let token = gw.pod.accepting.child_token();
    let pod = Arc::new(PodContext {
        workload: crate::proxy::WorkloadCell::new(gw.pod.workload()),
        netns: gw.pod.netns.clone(),
        accepting: token.clone(),
        cancel: gw.pod.cancel.clone(),
        tunnels: Default::default(),
    });
    let gw = gw.clone();
    tokio::spawn(serve_listener(
        listener,
        pod,
        gw.proxy.clone(),
        "ingress_gateway",
        move |tcp, peer, _pod, _proxy| {
            let gw = gw.clone();
            async move { gw.handle(tcp, peer).await }
        },
    ));
    Ok(token)
}

impl IngressGateway {
    async fn handle(&self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let refuse = |tcp: tokio::net::TcpStream, reason: &str, dst: SocketAddr| {
            self.metrics.refused(KIND, reason);
            tracing::info!(client = %peer, port = local.port(), gateway = %self.gateway, reason, "ingress refused");
            let _ = tcp.set_zero_linger();
            drop(tcp);
            let log =
                ConnectionLog::start(&self.proxy, "ingress_gateway", "tcp", peer, dst, None, None);
            log.refused(format!("ingress {reason}"));
        };
        let state = self.proxy.state.borrow().clone();
        let Some(table) = state.ingress(&self.gateway).cloned() else {
            return refuse(tcp, "no_table", local);
        };
        let Some(tls) = table.is_tls(local.port()) else {
            return refuse(tcp, "unknown_port", local);
        };
        drop(state);
        let server_name = if tls {
            match sni::peek(&tcp, sni::TLS_WAIT).await {
                Hello::Sni(name) => Some(name),
                _ => None,
            }
        } else {
            None
        };
        let target = match table.route(local.port(), server_name.as_deref()) {
            Ok(t) => t.clone(),
            Err(miss) => return refuse(tcp, miss.as_str(), local),
        };
        let state = self.proxy.state.borrow().clone();
        let Some((endpoint, workload)) = pick_endpoint(&state, &target.backends) else {
            return refuse(tcp, "no_endpoint", local);
        };
        drop(state);
        let log = ConnectionLog::start(
            &self.proxy,
            "ingress_gateway",
            "hbone",
            peer,
            endpoint,
            None,
            Some(workload.identity.to_string()),
        );
        let Some(stream) = self.tunnel(peer.ip(), endpoint, &workload).await else {
            self.metrics.refused(KIND, "tunnel_failed");
            let _ = tcp.set_zero_linger();
            return log.refused(format!("tunnel to {endpoint} failed"));
        };
        self.metrics.admitted(KIND);
        tracing::debug!(client = %peer, route = %target.route, endpoint = %endpoint, sni = server_name.as_deref(), "ingress admitted");
        let limits = Limits {
            revoked: None,
            idle: self.idle_timeout,
        };
        if log.relay(tcp, stream, limits).await.is_idle() {
            self.metrics.closed(KIND, "idle_timeout");
            tracing::debug!(client = %peer, route = %target.route, "ingress connection closed: idle");
        }
    }

    async fn tunnel(
        &self,
        client: std::net::IpAddr,
        endpoint: SocketAddr,
        workload: &Workload,
    ) -> Option<crate::hbone::H2Stream> {
        let own = &self.pod.workload();
        let svid = match self
            .proxy
            .certs
            .svid_for_connection(&own.identity, "gateway")
            .await
        {
            Ok(svid) => svid,
            Err(e) => {
                tracing::warn!(identity = %own.identity, error = %e, "no valid certificate for the gateway");
                return None;
            }
        };
        let tls = match self
            .proxy
            .tls
            .client_config(&svid, workload.identity.spiffe_id())
        {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::warn!(error = %e, "TLS configuration failed");
                return None;
            }
        };
        let src_ip = own
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == endpoint.is_ipv4())
            .copied()?;
        let key = PoolKey {
            src_ip,
            src: own.identity.spiffe_id().clone(),
            dst: workload.identity.spiffe_id().clone(),
            dst_addr: SocketAddr::new(endpoint.ip(), crate::hbone::HBONE_PORT),
            via: None,
        };
        let headers = ConnectHeaders {
            forwarded_for: Some(client),
            baggage: Some(self.proxy.wire.baggage(own)),
            ..ConnectHeaders::default()
        };
        let dial = Arc::new(PodDial(self.pod.netns.clone()));
        match self
            .proxy
            .pool
            .connect(key, tls, dial, endpoint, headers)
            .await
        {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::info!(endpoint = %endpoint, error = %e, "ingress tunnel refused or failed");
                None
            }
        }
    }
}

/// A ready endpoint of the first backend that has one among mesh pods (IPv4 first, picked at
/// random), and its workload.
fn pick_endpoint(
    state: &MeshState,
    backends: &[membrane_policy::gateway::Backend],
) -> Option<(SocketAddr, Arc<Workload>)> {
    for backend in backends {
        let service = format!("{}/{}", backend.namespace, backend.service);
        let Some(target) = state.service_port(&service, backend.port) else {
            continue;
        };
        let meshed: Vec<(SocketAddr, Arc<Workload>)> = target
            .endpoints
            .iter()
            .filter_map(|e| {
                let w = state.by_ip(e.ip()).filter(|w| w.captured())?;
                Some((*e, w.clone()))
            })
            .collect();
        let v4: Vec<&(SocketAddr, Arc<Workload>)> =
            meshed.iter().filter(|(e, _)| e.is_ipv4()).collect();
        let pool: Vec<&(SocketAddr, Arc<Workload>)> = if v4.is_empty() {
            meshed.iter().collect()
        } else {
            v4
        };
        if !pool.is_empty() {
            let (e, w) = pool[rand::random_range(0..pool.len())];
            return Some((*e, w.clone()));
        }
    }
    None
}

/// The ingress gateway's HBONE entrance (15008), for mesh pods whose ztunnel tunnels to it.
pub struct IngressHbone(pub Arc<IngressGateway>);

/// What an admitted in-mesh tunnel keeps: its record.
pub struct IngressTunnel(ConnectionLog);

impl ConnectHandler for IngressHbone {
    type Admission = IngressTunnel;
    type App = crate::hbone::H2Stream;

    fn denial_status(&self) -> crate::hbone::DenialStatus {
        self.0.proxy.wire.denial
    }

    fn trust_bundles(&self) -> Option<membrane_identity::SharedTrustBundle> {
        Some(self.0.proxy.certs.bundle())
    }

    fn connect(
        &self,
        req: ConnectRequest,
    ) -> ConnectFuture<'_, IngressTunnel, crate::hbone::H2Stream> {
        Box::pin(async move {
            let gw = &self.0;
            let client = req
                .peer_addr
                .map_or(std::net::IpAddr::from(Ipv4Addr::UNSPECIFIED), |a| a.ip());
            let refuse = |reason: &str, refusal: ConnectRefusal| {
                gw.metrics.refused(KIND, reason);
                let log = ConnectionLog::start(
                    &gw.proxy,
                    "ingress_gateway",
                    "hbone",
                    SocketAddr::new(client, 0),
                    req.authority,
                    Some(req.peer.to_string()),
                    None,
                );
                log.refused(format!("ingress {reason}: {}", refusal.reason()));
                Err(refusal)
            };
            if req.host.is_some() || !gw.pod.workload().ips.contains(&req.authority.ip()) {
                return refuse(
                    "bad_authority",
                    ConnectRefusal::BadRequest(format!(
                        "{} is not this gateway's address",
                        req.authority
                    )),
                );
            }
            let state = gw.proxy.state.borrow().clone();
            let Some(table) = state.ingress(&gw.gateway).cloned() else {
                return refuse("no_table", ConnectRefusal::Unreachable("no routes".into()));
            };
            let port = req.authority.port();
            let target = match table.is_tls(port) {
                None => {
                    return refuse(
                        "unknown_port",
                        ConnectRefusal::BadRequest(format!("no listener on {port}")),
                    );
                }
                Some(true) => {
                    return refuse(
                        "tls_from_mesh",
                        ConnectRefusal::BadRequest(
                            "a TLS listener routes by the ClientHello, which a tunnel brings only once accepted: call the backend Service".into(),
                        ),
                    );
                }
                Some(false) => match table.route(port, None) {
                    Ok(t) => t.clone(),
                    Err(miss) => {
                        return refuse(
                            miss.as_str(),
                            ConnectRefusal::Unreachable(miss.as_str().into()),
                        );
                    }
                },
            };
            let Some((endpoint, workload)) = pick_endpoint(&state, &target.backends) else {
                return refuse(
                    "no_endpoint",
                    ConnectRefusal::Unreachable("no ready mesh endpoint".into()),
                );
            };
            drop(state);
            let Some(app) = gw.tunnel(client, endpoint, &workload).await else {
                return refuse(
                    "tunnel_failed",
                    ConnectRefusal::Unreachable(format!("tunnel to {endpoint} failed")),
                );
            };
            gw.metrics.admitted(KIND);
            let mut log = ConnectionLog::start(
                &gw.proxy,
                "ingress_gateway",
                "hbone",
                SocketAddr::new(client, 0),
                endpoint,
                Some(req.peer.to_string()),
                Some(workload.identity.to_string()),
            );
            log.opened();
            Ok(Accepted {
                app,
                admission: IngressTunnel(log),
                cancel: None,
            })
        })
    }

    fn finished(&self, _req: &ConnectRequest, result: &RelayResult, tunnel: IngressTunnel) {
        // The HBONE server relays (backend, tunnel): the client is the tunnel, side B.
        tunnel.0.relayed(result, Side::B);
    }
}
