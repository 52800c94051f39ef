//! What every connection handler on the node shares, and the per-pod proxy context.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use membrane_identity::TrustDomain;
use membrane_runtime::listener::{ConnectionCaps, GuardedListener, ListenerMetrics};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::certs::CertificateManager;
use crate::hbone::HbonePool;
use crate::netns::PodNetns;
use crate::relay::{Limits, RelayResult, ResetOnError, Side, relay_with};
use crate::state::{MeshState, Workload};
use crate::telemetry::{AccessLog, AccessRecord, TcpLabels, TcpMetrics};

/// Node-wide proxy state shared by every enrolled pod.
#[derive(Debug)]
pub struct Proxy {
    /// This node's name.
    pub node: String,
    /// Trust domain of the mesh.
    pub trust_domain: TrustDomain,
    /// The current mesh state.
    pub state: watch::Receiver<Arc<MeshState>>,
    /// Workload certificates.
    pub certs: Arc<CertificateManager>,
    /// Pooled HBONE connections (a shared handle: clones use the same pool).
    pub pool: HbonePool,
    /// TLS configurations (outbound and inbound), built once per identity and SVID serial.
    pub tls: crate::certs::TlsConfigs,
    /// Connection metrics.
    pub metrics: TcpMetrics,
    /// Access records.
    pub access: AccessLog,
    /// Connections currently open (for the drain).
    pub active: Arc<AtomicUsize>,
    /// Decides inbound connections.
    pub authorizer: crate::authz::Authorizer,
    /// Admitted inbound connections, re-checked when policy changes.
    pub open: Arc<crate::conntrack::OpenConnections>,
    /// Refusals of the ztunnel's own addresses and ignored `forwarded` claims.
    pub guard: crate::guard::GuardMetrics,
    /// Caps of each pod listener (15001, 15006, 15008); the per-peer cap applies to the
    /// inbound ones only.
    pub listener_caps: ConnectionCaps,
    /// Listener metrics (refusals, accept errors).
    pub listener_metrics: ListenerMetrics,
    /// What each enrolled pod resolved through the DNS capture (read for connections leaving
    /// the mesh).
    pub pins: Arc<crate::dns::pins::PinTable>,
    /// EgressPolicy enforcement: open egress connections, budgets, metrics.
    pub egress: Arc<crate::egress::EgressControl>,
    /// Denial status and `baggage`: where HBONE dialects differ.
    pub wire: crate::dialect::WireDialect,
}

/// One enrolled pod: its workload, its namespace worker, and the token that stops its tasks.
#[derive(Debug)]
pub struct PodContext {
    /// The workload, as the mesh state describes it now ([`PodContext::workload`]).
    pub workload: WorkloadCell,
    /// The pod's network namespace.
    pub netns: Arc<PodNetns>,
    /// Cancelled when the pod is removed or the ztunnel drains: its listeners close.
    pub accepting: CancellationToken,
    /// Cancelled when the pod is removed or the drain grace period ends: open connections stop.
    pub cancel: CancellationToken,
    /// Its open inbound HBONE tunnels, under the listener caps counted in tunnels.
    pub tunnels: crate::tunnel_slots::TunnelSlots,
}

impl PodContext {
    /// The pod's workload as the mesh state describes it now: its addresses and labels
    /// follow the state (a pod's address is often published only after it was captured; a
    /// relabelled pod is selected by other policies), its identity never changes.
    pub fn workload(&self) -> Arc<Workload> {
        self.workload.get()
    }
}

/// A pod's workload, replaced when the mesh state's description of the pod changes.
#[derive(Debug)]
pub struct WorkloadCell(std::sync::RwLock<Arc<Workload>>);

impl WorkloadCell {
    /// A cell holding `workload`.
    pub fn new(workload: Arc<Workload>) -> Self {
        Self(std::sync::RwLock::new(workload))
    }

    /// The workload now.
    pub fn get(&self) -> Arc<Workload> {
        match self.0.read() {
            Ok(w) => w.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the workload with `workload` if it differs; whether it did.
    pub fn set(&self, workload: &Arc<Workload>) -> bool {
        let mut held = match self.0.write() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if Arc::ptr_eq(&held, workload) || **held == **workload {
            return false;
        }
        *held = workload.clone();
        true
    }
}

/// The `kind` of the outbound listener (15001).
pub const OUTBOUND: &str = "outbound";
/// The `kind` of the DNS capture's TCP listener (15053).
pub const DNS_TCP: &str = "dns";
/// The `kind` of the inbound HBONE listener (15008).
pub const INBOUND_HBONE: &str = "inbound";

/// Accepts on one of a pod's listeners until the pod stops accepting. Each connection runs
/// `handle` in its own task, in a span named after the listener (`kind`), and is dropped when
/// the pod is removed or the drain grace period ends. The listener holds at most
/// [`Proxy::listener_caps`] connections (more are closed at once and counted under `kind`), and
/// backs off after accept errors (at the descriptor limit they fail at once).
pub async fn serve_listener<F, Fut>(
    listener: tokio::net::TcpListener,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
    kind: &'static str,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<PodContext>, Arc<Proxy>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let mut caps = proxy.listener_caps;
    if kind == OUTBOUND || kind == DNS_TCP {
        // Every connection on these listeners comes from the pod itself.
        caps.max_per_peer = 0;
    }
    let mut listener = GuardedListener::new(listener, kind, caps, proxy.listener_metrics.clone());
    if kind == INBOUND_HBONE {
        // Through this cluster's east-west gateway every federated source arrives from the
        // gateway's address; the gateway limits each source identity itself. Half of the
        // pod's cap, not all of it: the role is a pod label, which any pod could give itself.
        let state = proxy.state.clone();
        listener = listener.with_relay_peers(Arc::new(move |ip| {
            state.borrow().is_local_east_west_gateway(ip)
        }));
    }
    loop {
        let (tcp, peer, admission) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let span = tracing::info_span!("conn", kind, pod = %pod.workload().name, peer = %peer);
        let cancel = pod.cancel.clone();
        let connection = handle(tcp, peer, pod.clone(), proxy.clone());
        tokio::spawn(
            async move {
                let _admission = admission;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    () = connection => {}
                }
            }
            .instrument(span),
        );
    }
}

/// The original destination of a redirected connection (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST` for IPv6), accepted from `peer`: a TCP connection's two ends have
/// one family, so no `getsockname` is needed to pick the option.
pub fn original_dst(
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
) -> std::io::Result<SocketAddr> {
    if peer.is_ipv6() {
        let sa = nix::sys::socket::getsockopt(
            &stream.as_fd(),
            nix::sys::socket::sockopt::Ip6tOriginalDst,
        )
        .map_err(std::io::Error::from)?;
        let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
        return Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
            ip,
            u16::from_be(sa.sin6_port),
            0,
            0,
        )));
    }
    let sa = nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sa.sin_port),
    )))
}

/// One connection's access record and metrics, from start to end. A record dropped before
/// it was finished (the pod was removed, the ztunnel stopped) is emitted as `cancelled`.
#[derive(Debug)]
pub struct ConnectionLog {
    started: Instant,
    labels: TcpLabels,
    record: AccessRecord,
    metrics: TcpMetrics,
    access: AccessLog,
    active: Arc<AtomicUsize>,
    /// The source's bytes sent with the tunnel's request, before the relay ran.
    sent_early: u64,
    open: bool,
    done: bool,
}

impl ConnectionLog {
    /// Starts the record of a connection.
    pub fn start(
        proxy: &Proxy,
        direction: &'static str,
        transport: &'static str,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
        src_identity: Option<String>,
        dst_identity: Option<String>,
    ) -> Self {
        let reporter = match direction {
            "outbound" => "source",
            "egress_gateway" | "ingress_gateway" | "east_west_gateway" => "gateway",
            _ => "destination",
        };
        let labels = TcpLabels {
            reporter,
            source_principal: src_identity.clone().unwrap_or_else(|| "unknown".into()),
            destination_principal: dst_identity.clone().unwrap_or_else(|| "unknown".into()),
        };
        Self {
            started: Instant::now(),
            labels,
            record: AccessRecord {
                kind: membrane_api::access::KIND.into(),
                start: crate::telemetry::rfc3339(SystemTime::now()),
                direction: direction.into(),
                src_addr,
                dst_addr,
                src_identity,
                dst_identity,
                transport: transport.into(),
                bytes_sent: 0,
                bytes_received: 0,
                duration_ms: 0,
                result: String::new(),
                reason: None,
                authorization: None,
                forwarded_for: None,
                egress: None,
            },
            metrics: proxy.metrics.clone(),
            access: proxy.access.clone(),
            active: proxy.active.clone(),
            sent_early: 0,
            open: false,
            done: false,
        }
    }

    /// The connection was refused before any byte reached the destination.
    pub fn refused(mut self, reason: String) {
        tracing::info!(
            direction = %self.record.direction,
            src = %self.record.src_addr,
            dst = %self.record.dst_addr,
            reason,
            "connection refused"
        );
        self.metrics.refused(&self.labels);
        self.record.result = "refused".into();
        self.record.reason = Some(reason);
        self.finish();
    }

    /// Sets the destination once it is known (a gateway resolves it after the record began).
    pub fn destination(&mut self, addr: SocketAddr) {
        self.record.dst_addr = addr;
    }

    /// Records a source address the peer claimed (`forwarded`) that differs from the verified
    /// one in `src_addr`; it is kept for the record, never used for policy.
    pub fn claimed_source(&mut self, ip: std::net::IpAddr) {
        self.record.forwarded_for = Some(ip);
    }

    /// Records what is known about a connection leaving the mesh (pinned name, SNI).
    pub fn egress(&mut self, egress: membrane_api::access::Egress) {
        self.record.egress = Some(Box::new(egress));
    }

    /// The ztunnel closed this egress connection: `reason` (`budget_exhausted`,
    /// `policy_changed`) and, when known, the deciding policy replace the admission's.
    pub fn egress_closed(&mut self, reason: &str, policy: Option<String>) {
        if let Some(egress) = self.record.egress.as_mut() {
            egress.verdict = "deny".into();
            egress.reason = reason.into();
            if policy.is_some() {
                egress.policy = policy;
            }
        }
    }

    /// The connection's first flight was decided again (`decision`, on server name `sni`) and
    /// refused: the record says that decision instead of the admission's.
    pub fn egress_redecided(
        &mut self,
        decision: &membrane_policy::egress::EgressDecision,
        sni: Option<String>,
    ) {
        if let Some(egress) = self.record.egress.as_mut() {
            let again = crate::egress::record(decision, None, sni);
            egress.sni = again.sni;
            egress.verdict = again.verdict;
            egress.reason = again.reason;
            egress.policy = again.policy;
            egress.rule = again.rule;
            egress.matched = again.matched;
            egress.via = again.via;
        }
    }

    /// Records the authorization decision.
    pub fn authorized(&mut self, decision: crate::authz::DecisionSummary) {
        self.record.authorization = Some(decision.into());
    }

    /// `n` bytes of the source's went out with the tunnel's request
    /// ([`crate::hbone::EarlyData`]); they count as sent once the relay has run.
    pub fn sent_early(&mut self, n: usize) {
        self.sent_early = u64::try_from(n).unwrap_or(u64::MAX);
    }

    /// The connection was opened (counted once, before bytes flow).
    pub fn opened(&mut self) {
        self.metrics.opened(&self.labels);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.open = true;
    }

    /// Opens the record, relays `source` (the side that made the connection) and
    /// `destination` until both directions end — or until one of `limits` ends it, resetting
    /// both — and closes the record with what happened, which it returns. The epilogue of
    /// every path but inbound HBONE (whose relay the HBONE server runs: it closes its record
    /// with [`Self::relayed`]).
    pub async fn relay<S, D>(mut self, source: S, destination: D, limits: Limits) -> RelayResult
    where
        S: AsyncRead + AsyncWrite + ResetOnError + Unpin,
        D: AsyncRead + AsyncWrite + ResetOnError + Unpin,
    {
        self.opened();
        let result = relay_with(source, destination, limits).await;
        self.relayed(&result, Side::A);
        result
    }

    /// The connection ended after carrying bytes: `result` is its relay's, in which the
    /// source was side `source` (bytes sent are those from the source).
    pub fn relayed(mut self, result: &RelayResult, source: Side) {
        let (sent, received) = match source {
            Side::A => (result.a_to_b, result.b_to_a),
            Side::B => (result.b_to_a, result.a_to_b),
        };
        let (kind, reason) = result.summary();
        self.record.bytes_sent = sent.saturating_add(self.sent_early);
        self.record.bytes_received = received;
        self.record.result = kind.into();
        self.record.reason = reason;
        self.finish();
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if self.open {
            self.metrics.closed(
                &self.labels,
                self.record.bytes_sent,
                self.record.bytes_received,
            );
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.record.duration_ms =
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.access.record(&self.record);
    }
}

impl Drop for ConnectionLog {
    fn drop(&mut self) {
        if !self.done {
            self.record.result = "cancelled".into();
            self.record.reason = Some("pod removed or ztunnel stopping".into());
            self.finish();
        }
    }
}

/// Whether `ip` belongs to `workload`.
pub fn owns(workload: &Workload, ip: IpAddr) -> bool {
    workload.ips.contains(&ip)
}
