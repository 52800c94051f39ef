//! Outbound capture (15001 in the pod's namespace): the pod's own connections.
//!
//! The original destination comes from `SO_ORIGINAL_DST`; [`crate::route`] decides where it
//! goes (a Service's virtual IP resolved to an endpoint; a mesh workload through HBONE; a
//! destination that is the ztunnel itself refused; anything else leaves the mesh), and this
//! module does what the route says. A connection leaving the mesh is decided by EgressPolicy
//! ([`crate::egress`]) when one selects the source pod — before the destination is dialled;
//! a denied one is reset — and passes through otherwise; its record names the host the pod
//! resolved the address under (its DNS pin, or `unresolved`), the TLS server name of its
//! ClientHello ([`crate::sni`], peeked, never consumed) and the decision; a decision the
//! peek's deadline cut short is made again on the first flight where a name concerns it
//! ([`crate::egress::first_flight`]). A tunnel presents the source
//! pod's SVID and requires the destination's expected SPIFFE ID, on `<pod ip>:15008` — for a
//! federated cluster's pod behind an east-west gateway, inside an outer tunnel to that gateway
//! (double HBONE, `GatewayDial`). Every
//! socket the ztunnel opens is created in the source pod's namespace with the ztunnel mark,
//! so it leaves with the pod's address and is not captured again.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_policy::egress::{EgressDecision, EgressVerdict, GatewayRef};
use tokio_util::sync::CancellationToken;

use crate::egress::first_flight::{self, FirstFlight};
use crate::egress::{self, budget::Metered};
use crate::hbone::{self, ConnectHeaders, Dial, PoolKey};
use crate::netns::PodNetns;
use crate::proxy::{ConnectionLog, PodContext, Proxy, original_dst, serve_listener};
use crate::relay::{Limits, RelayResult, ResetOnError, Side, relay_until};
use crate::route::{Route, route};
use crate::sni;
use crate::state::Workload;

/// Dials from inside a pod's namespace, with the ztunnel mark.
#[derive(Debug)]
pub struct PodDial(pub Arc<PodNetns>);

impl Dial for PodDial {
    fn dial(&self, addr: SocketAddr) -> hbone::DialFuture<'_> {
        Box::pin(async move { self.0.connect(addr).await.map(hbone::Carrier::tcp) })
    }
}

/// Double HBONE: each connection to the destination's ztunnel runs inside an outer tunnel,
/// from the same source pod with the same SVID, to a federated cluster's east-west gateway,
/// whose `:authority` is the destination's HBONE address. The gateway relays the inner TLS
/// unopened; outer connections are pooled like any other.
struct GatewayDial {
    pool: hbone::HbonePool,
    /// The outer tunnel's key (its destination: the gateway).
    key: PoolKey,
    /// Presents the source's SVID, requires the gateway's identity.
    tls: Arc<rustls::ClientConfig>,
    dial: Arc<dyn Dial>,
    headers: ConnectHeaders,
}

impl Dial for GatewayDial {
    fn dial(&self, addr: SocketAddr) -> hbone::DialFuture<'_> {
        Box::pin(async move {
            let outer = self.pool.connect(
                self.key.clone(),
                self.tls.clone(),
                self.dial.clone(),
                addr,
                self.headers.clone(),
            );
            match outer.await {
                Ok(stream) => Ok(hbone::Carrier::Tunnel(stream)),
                Err(e) => Err(std::io::Error::other(format!(
                    "through the east-west gateway {} ({}): {e}",
                    self.key.dst_addr, self.key.dst
                ))),
            }
        })
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
    let original = match original_dst(&tcp, peer) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(error = %e, "no original destination; closing");
            return;
        }
    };
    let route = route(&proxy.state.borrow(), &pod.workload(), original);
    let dst = route.dst();
    let log = |dst_identity: Option<String>| {
        ConnectionLog::start(
            proxy,
            "outbound",
            route.transport(),
            peer,
            dst,
            Some(pod.workload().identity.to_string()),
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
            // What the application already sent rides with the CONNECT (no wait for the 200).
            let mut early = hbone::EarlyData::from_socket(&tcp);
            let tunnelled = tunnel(peer.ip(), dst, workload, pod, proxy, log, &mut early).await;
            let (sent_early, failed) = (early.len(), early.take_error());
            let Some((stream, mut log)) = tunnelled else {
                return;
            };
            log.sent_early(sent_early);
            match failed {
                None => {
                    log.relay(tcp, stream, Limits::default()).await;
                }
                // The read that took the early data consumed the socket's error: end the
                // connection as the relay would have (dropping the stream resets it).
                Some(error) => {
                    log.opened();
                    let result = RelayResult::failed_before(Side::A, error);
                    log.relayed(&result, Side::A);
                }
            }
        }
        Route::Passthrough { .. } if membrane_api::clusterset::contains(dst.ip()) => {
            tracing::info!(dst = %dst, "clusterset address with no imported Service; refused");
            log(None).refused(format!(
                "clusterset address {dst}: no imported Service holds it (no federated cluster exports it, or its federation was removed)"
            ));
        }
        Route::Passthrough { .. } => passthrough(tcp, dst, pod, proxy, log(None)).await,
    }
}

/// How long a connection on a port that is not a TLS port may take to send its first bytes
/// when an EgressPolicy selects its source (the decision reads the SNI if it is TLS; a
/// server-speaks-first protocol waits this long once).
pub const ENFORCED_PEEK: Duration = Duration::from_millis(5);

/// How long connecting to a destination outside the mesh may take: the application's own
/// `connect` returned at the capture, so only this bounds its wait for one that drops SYNs.
pub const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    let source = &pod.workload();
    let policies = state.egress().selecting(&source.namespace, &source.labels);
    let selected = !policies.is_empty();
    let tls_port = sni::TLS_PORTS.contains(&dst.port());
    if !selected {
        let (connected, hello) = if tls_port {
            // The wait for the ClientHello overlaps the connect.
            tokio::join!(
                pod.netns.connect_within(dst, PASSTHROUGH_CONNECT_TIMEOUT),
                sni::peek(&tcp, sni::TLS_WAIT)
            )
        } else {
            let connected = pod
                .netns
                .connect_within(dst, PASSTHROUGH_CONNECT_TIMEOUT)
                .await;
            (connected, sni::peek(&tcp, Duration::ZERO).await)
        };
        admit(&policies, proxy, source, dst, &hello, &mut log);
        // A long-lived connection must not keep this version of the mesh state alive.
        drop(policies);
        drop(state);
        match connected {
            Ok(upstream) => {
                log.relay(tcp, upstream, Limits::default()).await;
            }
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
    let (decision, attrs) = admit(&policies, proxy, source, dst, &hello, &mut log);
    // Decided before a whole ClientHello came: where a name concerns the connection, its
    // first flight is decided again (no deadline), whatever it turns out to be.
    let pending = egress::first_flight_pending(
        &hello,
        &decision,
        egress::deny_by_name_applies(&policies, source, dst.port()),
    );
    drop(policies);
    drop(state);
    let control = &proxy.egress;
    if decision.verdict == EgressVerdict::Deny {
        tracing::info!(
            src = %source.identity,
            dst = %dst,
            host = attrs.pinned.first().map(String::as_str),
            sni = attrs.sni.as_deref(),
            policy = decision.policy.as_deref(),
            reason = decision.reason.as_str(),
            "egress denied"
        );
        tcp.reset();
        log.refused(format!("egress denied: {}", decision.reason.as_str()));
        return;
    }
    if let Some(gateway) = decision.via.clone() {
        // Never directly: through the gateway, or not at all (fail closed).
        return via_gateway(tcp, dst, &gateway, &decision, attrs, pod, proxy, log).await;
    }
    let identity = source.identity.to_string();
    let meter = match egress::admit_budget(
        control,
        &decision,
        &identity,
        dst.ip(),
        SystemTime::now(),
    ) {
        Ok(meter) => meter,
        Err(e) => {
            tracing::info!(src = %source.identity, dst = %dst, error = %e, "egress refused: budget spent");
            log.egress_closed("budget_exhausted", None);
            tcp.reset();
            log.refused(e.to_string());
            return;
        }
    };
    let upstream = match pod
        .netns
        .connect_within(dst, PASSTHROUGH_CONNECT_TIMEOUT)
        .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            log.refused(format!("connect {dst}: {e}"));
            return;
        }
    };
    let cancel = meter
        .as_ref()
        .map_or_else(CancellationToken::new, |m| m.spent().child_token());
    let flight_refused = Arc::new(std::sync::OnceLock::new());
    let check = pending.then(|| {
        first_flight::recheck(
            proxy.state.clone(),
            source.clone(),
            attrs.clone(),
            |d| d.verdict != EgressVerdict::Deny && d.via.is_none(),
            "node",
            flight_refused.clone(),
        )
    });
    let handle = control.open.register(source.clone(), attrs, cancel.clone());
    log.opened();
    let result = match (check, meter.clone()) {
        (Some(check), meter) => {
            relay_until(tcp, FirstFlight::new(upstream, meter, check), cancel).await
        }
        (None, Some(meter)) => relay_until(tcp, Metered::new(upstream, meter), cancel).await,
        (None, None) => relay_until(tcp, upstream, cancel).await,
    };
    if let Some(revoked) = handle.revoked.get() {
        control.metrics.closed("policy_changed");
        log.egress_closed("policy_changed", revoked.policy.clone());
    } else if let Some(refusal) = flight_refused.get() {
        // Counted as the decision it is: a deny with its reason (`sni_mismatch`, ...).
        control.metrics.decided(&refusal.decision);
        log.egress_redecided(&refusal.decision, refusal.sni.clone());
    } else if meter.is_some_and(|m| m.spent().is_cancelled()) {
        control.metrics.closed("budget_exhausted");
        log.egress_closed("budget_exhausted", None);
    }
    drop(handle);
    log.relayed(&result, Side::A);
}

/// Decides a connection of `source` to `dst` that began with `hello` against `policies` (the
/// EgressPolicies selecting it), counts the decision and puts it in the record; returns it
/// and what it was decided on.
fn admit(
    policies: &[&membrane_policy::egress::EgressPolicy],
    proxy: &Proxy,
    source: &Workload,
    dst: SocketAddr,
    hello: &sni::Hello,
    log: &mut ConnectionLog,
) -> (EgressDecision, egress::EgressAttrs) {
    let admission = egress::decide(policies, &proxy.pins, source, dst, hello, SystemTime::now());
    proxy.egress.metrics.decided(&admission.decision);
    log.egress(admission.record);
    (admission.decision, admission.attrs)
}

/// Carries an allowed egress connection whose rule names `gateway` through an HBONE tunnel
/// to one of its pods, presenting the source pod's SVID, with the name the rule matched (or
/// the address) and the port as the CONNECT authority. The gateway decides again, resolves
/// the name itself and connects out from its own address; budgets are counted there. No
/// published gateway pod, or a tunnel it refuses, resets the connection: it never leaves
/// from this node.
#[allow(clippy::too_many_arguments)]
async fn via_gateway(
    tcp: tokio::net::TcpStream,
    dst: SocketAddr,
    gateway: &GatewayRef,
    decision: &EgressDecision,
    attrs: egress::EgressAttrs,
    pod: &PodContext,
    proxy: &Proxy,
    log: ConnectionLog,
) {
    let source = &pod.workload();
    let control = &proxy.egress;
    let Some(target) = pick_gateway(&proxy.state.borrow(), gateway, source) else {
        control.metrics.gateway_unavailable();
        tracing::warn!(src = %source.identity, dst = %dst, gateway = %gateway, "egress refused: no pod of its gateway is published");
        let mut log = log;
        log.egress_closed("gateway_unavailable", None);
        tcp.reset();
        log.refused(format!("egress gateway {gateway} has no pod"));
        return;
    };
    let Some(gw_ip) = target
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or(target.ips.first())
        .copied()
    else {
        tcp.reset();
        log.refused(format!("egress gateway {gateway} has no address"));
        return;
    };
    // The name the pod resolved and the rule matched; an address rule sends the address.
    let host = decision
        .host
        .clone()
        .filter(|h| crate::hbone::parse_named_authority(&format!("{h}:1")).is_some());
    let headers = ConnectHeaders {
        forwarded_for: Some(pod_ip(source, dst)),
        host,
        ..ConnectHeaders::default()
    };
    let Some((stream, mut log)) = tunnel_to(
        dst,
        &target,
        SocketAddr::new(gw_ip, hbone::HBONE_PORT),
        headers,
        pod,
        proxy,
        log,
        &mut hbone::EarlyData::none(),
    )
    .await
    else {
        return;
    };
    let cancel = CancellationToken::new();
    let handle = control.open.register(source.clone(), attrs, cancel.clone());
    log.opened();
    let result = relay_until(tcp, stream, cancel).await;
    if let Some(revoked) = handle.revoked.get() {
        control.metrics.closed("policy_changed");
        log.egress_closed("policy_changed", revoked.policy.clone());
    }
    drop(handle);
    log.relayed(&result, Side::A);
}

/// One published pod of `gateway` (egress role), the same one for a given source pod while
/// the set does not change.
fn pick_gateway(
    state: &crate::state::MeshState,
    gateway: &GatewayRef,
    source: &Workload,
) -> Option<Arc<Workload>> {
    let mut pods: Vec<Arc<Workload>> = state
        .workloads()
        .into_iter()
        .filter(|w| {
            w.namespace == gateway.namespace
                && w.gateway.as_ref().is_some_and(|r| {
                    r.kind == crate::state::GatewayKind::Egress && r.name == gateway.name
                })
                && !w.ips.is_empty()
        })
        .collect();
    if pods.is_empty() {
        return None;
    }
    pods.sort_by(|a, b| a.uid.cmp(&b.uid));
    let spread = source.uid.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    Some(pods.swap_remove(spread % pods.len()))
}

/// The source pod's address of `dst`'s family (what its tunnel comes from).
fn pod_ip(source: &Workload, dst: SocketAddr) -> std::net::IpAddr {
    source
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or(source.ips.first())
        .copied()
        .unwrap_or(dst.ip())
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
    early: &mut hbone::EarlyData<'_>,
) -> Option<(hbone::H2Stream, ConnectionLog)> {
    let headers = ConnectHeaders {
        forwarded_for: Some(src_ip),
        ..ConnectHeaders::default()
    };
    let peer = SocketAddr::new(dst.ip(), hbone::HBONE_PORT);
    tunnel_to(dst, workload, peer, headers, pod, proxy, log, early).await
}

/// Opens an HBONE stream from `pod` to `workload` at `peer` (its HBONE address) for `dst`,
/// with `headers` and `early` data; on failure the record is closed as refused and `None`
/// returned.
#[allow(clippy::too_many_arguments)]
async fn tunnel_to(
    dst: SocketAddr,
    workload: &Workload,
    peer: SocketAddr,
    headers: ConnectHeaders,
    pod: &PodContext,
    proxy: &Proxy,
    log: ConnectionLog,
    early: &mut hbone::EarlyData<'_>,
) -> Option<(hbone::H2Stream, ConnectionLog)> {
    let mut headers = headers;
    headers.baggage = Some(proxy.wire.baggage(&pod.workload()));
    let src_ip = headers.forwarded_for.unwrap_or(peer.ip());
    // Never an expired certificate: a renewal failed until expiry is refused here, with the
    // reason, until the controller answers again.
    let identity = &pod.workload().identity;
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
    let direct: Arc<dyn Dial> = Arc::new(PodDial(pod.netns.clone()));
    let (dial, via) = match &workload.network_gateway {
        None => (direct, None),
        Some(gw) => {
            let outer_tls = match proxy.tls.client_config(&svid, &gw.identity) {
                Ok(cfg) => cfg,
                Err(e) => {
                    log.refused(format!("TLS configuration for the east-west gateway: {e}"));
                    return None;
                }
            };
            let outer = GatewayDial {
                pool: proxy.pool.clone(),
                key: PoolKey {
                    src_ip,
                    src: pod.workload().identity.spiffe_id().clone(),
                    dst: gw.identity.clone(),
                    dst_addr: gw.addr,
                    via: None,
                },
                tls: outer_tls,
                dial: direct,
                headers: ConnectHeaders {
                    forwarded_for: Some(src_ip),
                    baggage: headers.baggage.clone(),
                    ..ConnectHeaders::default()
                },
            };
            (
                Arc::new(outer) as Arc<dyn Dial>,
                Some((gw.addr, gw.identity.clone())),
            )
        }
    };
    let key = PoolKey {
        src_ip,
        src: pod.workload().identity.spiffe_id().clone(),
        dst: workload.identity.spiffe_id().clone(),
        dst_addr: peer,
        via,
    };
    match proxy
        .pool
        .connect_with_early(key, tls, dial, dst, headers, early)
        .await
    {
        Ok(stream) => Some((stream, log)),
        Err(e) => {
            log.refused(format!("tunnel to {dst}: {e}"));
            None
        }
    }
}
