//! The ztunnel assembled: the one place its long-lived tasks are spawned.
//!
//! [`start`] loads the bootstrap bundle (and, in local mode, the workloads and policy files),
//! binds every listener (enrollment socket, admin, metrics, readiness) so errors surface before
//! anything runs, starts the discovery client (or the policy file watcher), re-enrolls the
//! pods of a previous run once their workloads are known, and spawns the servers and the
//! pod reconciler (captured pods follow the mesh state) under one cancellation token.
//! Readiness turns true once the mesh state is loaded and the first reconciliation pass
//! (which re-enrolls the previous run's pods) is done.
//! [`Running::shutdown`] drains: listeners close, open connections get a grace period, then
//! everything stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{SharedTrustBundle, TrustBundle, TrustDomain};
use membrane_runtime::listener::{
    ConnectionCaps, GuardedListener, ListenerMetrics, RefusalReason, TimeoutStage,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::authz::{self, Authorizer, AuthzMetrics};
use crate::certs::{CaConfig, CertificateManager, TlsConfigs};
use crate::conntrack::OpenConnections;
use crate::discovery::{self, DiscoveryMetrics};
use crate::dns::pins::{self, PinMetrics, PinTable};
use crate::dns::{Dns, DnsConfig, metrics::DnsMetrics};
use crate::hbone::{HbonePool, PoolConfig};
use crate::pods::PodRegistry;
use crate::pods::reconcile::Reconciler;
use crate::pods::scan::NetnsScanner;
use crate::proxy::Proxy;
use crate::state::{MeshState, StateError};
use crate::telemetry::{AccessLog, TcpMetrics};
use crate::{admin, enroll};

/// Everything the ztunnel needs to start.
#[derive(Debug, Clone)]
pub struct ZtunnelConfig {
    /// This node's name.
    pub node: String,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Local mode: the workloads file. `None`: workloads, Services, policy and the trust
    /// bundle come from the controller's discovery stream.
    pub workloads_file: Option<PathBuf>,
    /// Local mode only: AuthorizationPolicy file; none: no policy, every authenticated
    /// connection is allowed.
    pub policy_file: Option<PathBuf>,
    /// The controller.
    pub ca: CaConfig,
    /// Enrollment socket path.
    pub enroll_socket: PathBuf,
    /// Where enrolled pods are persisted across restarts.
    pub state_dir: Option<PathBuf>,
    /// Directory where the container runtime pins pods' network namespaces; when set, mesh
    /// workloads of this node that nobody enrolled (pods older than Membrane) are found there
    /// by address and enrolled.
    pub netns_dir: Option<PathBuf>,
    /// Admin address (config dump).
    pub admin_addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Readiness address.
    pub readiness_addr: SocketAddr,
    /// Grace period for open connections at shutdown.
    pub drain_grace: Duration,
    /// Caps and timeouts of every listener.
    pub listeners: ListenerConfig,
    /// A pooled outbound HBONE connection that carried no tunnel for this long is closed.
    pub pool_idle_timeout: Duration,
    /// The DNS capture and its pins.
    pub dns: DnsSettings,
    /// Gateway mode: serve this gateway pod instead of capturing the node's pods (no
    /// enrollment socket).
    pub gateway: Option<crate::gateway::GatewayConfig>,
    /// Denial status and `baggage` (where HBONE dialects differ).
    pub wire: crate::dialect::WireDialect,
}

/// The DNS capture's settings and its pins' bounds.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Upstream, timeout, cluster domain.
    pub capture: DnsConfig,
    /// How long a pin outlives its answer's TTL (at least [`pins::MIN_GRACE`]).
    pub pin_grace: Duration,
    /// Addresses pinned per pod.
    pub max_pins_per_pod: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            capture: DnsConfig::default(),
            pin_grace: pins::MIN_GRACE,
            max_pins_per_pod: 10_000,
        }
    }
}

/// The pins, saved in the state directory.
pub const PINS_FILE: &str = "pins.json";

/// Caps and timeouts of the ztunnel's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Connections each pod listener (15001, 15006, 15008) holds at once; also a pod's
    /// inbound HBONE tunnels ([`crate::tunnel_slots`]).
    pub pod_max_connections: usize,
    /// Connections one peer IP holds at once on each pod's inbound listeners (15006, 15008);
    /// on the outbound one every peer is the pod itself. Also the inbound HBONE tunnels one
    /// peer IP holds to a pod.
    pub pod_max_connections_per_peer: usize,
    /// Connections each HTTP listener (admin, metrics, readiness) holds at once.
    pub http_max_connections: usize,
    /// Connections one peer IP holds at once on each HTTP listener.
    pub http_max_connections_per_peer: usize,
    /// Header-read and idle timeouts of the HTTP listeners.
    pub http: membrane_runtime::HttpTimeouts,
    /// Bound on an inbound HBONE (15008) TLS + HTTP/2 handshake, waiting for its turn included.
    pub hbone_handshake_timeout: Duration,
    /// Inbound HBONE handshakes in progress at once, node-wide.
    pub hbone_max_pending_handshakes: usize,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            pod_max_connections: 16384,
            pod_max_connections_per_peer: 4096,
            http_max_connections: 1024,
            http_max_connections_per_peer: 8,
            http: membrane_runtime::HttpTimeouts::default(),
            hbone_handshake_timeout: Duration::from_secs(10),
            hbone_max_pending_handshakes: 256,
        }
    }
}

/// The streamed trust bundle, saved in the state directory (PEM).
pub const BUNDLE_FILE: &str = "trust-bundle.pem";

/// Why the ztunnel could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The workloads file is unusable.
    #[error(transparent)]
    State(#[from] StateError),
    /// The policy file is unusable.
    #[error("policy: {0}")]
    Policy(String),
    /// The bootstrap trust bundle is unusable.
    #[error("bootstrap trust bundle: {0}")]
    Bundle(String),
    /// The access log's writer thread could not start.
    #[error("cannot start the access log writer: {0}")]
    AccessLog(#[source] std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A started ztunnel.
pub struct Running {
    proxy: Arc<Proxy>,
    pods: Arc<PodRegistry>,
    cancel: CancellationToken,
    pods_cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    drain_grace: Duration,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("node", &self.proxy.node)
            .finish_non_exhaustive()
    }
}

/// Starts the ztunnel.
pub async fn start(config: ZtunnelConfig) -> Result<Running, StartError> {
    if config.workloads_file.is_none() && config.policy_file.is_some() {
        return Err(StartError::Policy(
            "a policy file is only read in local mode (with a workloads file); with the discovery stream, policy comes from the controller".into(),
        ));
    }
    if config.gateway.is_some() && config.workloads_file.is_some() {
        return Err(StartError::Policy(
            "gateway mode reads its pod, routes and policies from the controller's discovery stream, not from a workloads file".into(),
        ));
    }
    let mesh = match &config.workloads_file {
        Some(path) => MeshState::load(path, &config.trust_domain)?,
        None => MeshState::default(),
    };
    // The bootstrap roots, plus the last bundle the controller streamed (kept in the state
    // directory): after a root rotation the controller's certificate chains to a root the
    // bootstrap file may not have.
    let bundle_file = config.state_dir.as_ref().map(|d| d.join(BUNDLE_FILE));
    let mut initial = TrustBundle::from_pem(config.trust_domain.clone(), &config.ca.root_pem)
        .map_err(|e| StartError::Bundle(e.to_string()))?;
    if let Some(path) = &bundle_file
        && let Ok(pem) = std::fs::read(path)
    {
        match TrustBundle::from_pem(config.trust_domain.clone(), &pem) {
            Ok(saved) => {
                for root in saved.roots() {
                    let _ = initial.add_root(root.clone());
                }
                tracing::info!(file = %path.display(), roots = initial.roots().len(), "trust bundle of the previous run added to the bootstrap roots");
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring the saved trust bundle");
            }
        }
    }
    let bundle = SharedTrustBundle::new(initial);
    let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(mesh));
    let mut registry = prometheus_client::registry::Registry::with_prefix("membrane");
    let metrics = TcpMetrics::register(&mut registry);
    let authz_metrics = AuthzMetrics::register(&mut registry);
    let discovery_metrics = DiscoveryMetrics::register(&mut registry);
    let enroll_metrics = enroll::EnrollMetrics::register(&mut registry);
    let scan_metrics = crate::pods::scan::ScanMetrics::register(&mut registry);
    let udp_metrics = crate::udp::UdpMetrics::register(&mut registry);
    let guard_metrics = crate::guard::GuardMetrics::register(&mut registry);
    let listener_metrics = ListenerMetrics::register(&mut registry);
    let memory_metrics = crate::memory::MemoryMetrics::register(&mut registry);
    registry.register_collector(Box::new(crate::relay::BudgetCollector));
    registry.register_collector(Box::new(crate::busy_poll::Collector));
    registry.register(
        "hbone_tls_records_refused",
        "HBONE connections closed because the peer sent a TLS record refused after the handshake (failed authentication, oversize, unexpected type or message)",
        crate::hbone::records_refused().clone(),
    );
    registry.register(
        "hbone_requests_malformed",
        "CONNECT requests refused before any handler saw them (not CONNECT, an authority that is neither ip:port nor name:port, no usable peer identity)",
        crate::hbone::requests_malformed().clone(),
    );
    registry.register(
        "hbone_handshakes_failed",
        "Inbound HBONE connections whose TLS or HTTP/2 handshake failed (untrusted or expired certificate, no h2, garbage); timeouts and refused shares are counted as listener timeouts and refusals",
        crate::hbone::handshakes_failed().clone(),
    );
    registry.register(
        "hbone_peers_untrusted",
        "CONNECT requests refused on an established inbound HBONE connection because the peer's chain no longer verifies against the changed trust bundles (a root removed, a trust domain no longer federated); the connection is closed",
        crate::hbone::peers_untrusted().clone(),
    );
    registry.register(
        "tcp_congestion_errors",
        "Failures to read or set a TCP congestion control (a pod's default or a network socket's); the traffic goes on with the kernel's",
        crate::congestion::errors().clone(),
    );
    let pin_metrics = PinMetrics::register(&mut registry);
    let dns_metrics = DnsMetrics::register(&mut registry);
    let pin_table = Arc::new(PinTable::new(
        config.dns.max_pins_per_pod,
        config.dns.pin_grace,
        config.state_dir.as_ref().map(|d| d.join(PINS_FILE)),
        pin_metrics,
    ));
    pin_table.restore(std::time::SystemTime::now());
    let egress_metrics = crate::egress::EgressMetrics::register(&mut registry);
    let gateway_metrics = crate::gateway::metrics::GatewayMetrics::register(&mut registry);
    let ledger = Arc::new(crate::egress::budget::Ledger::new(
        config
            .state_dir
            .as_ref()
            .map(|d| d.join(crate::egress::BUDGETS_FILE)),
        egress_metrics.budget.clone(),
    ));
    ledger.restore(std::time::SystemTime::now());
    let egress = Arc::new(crate::egress::EgressControl {
        open: Arc::new(crate::egress::open::OpenEgress::default()),
        ledger: ledger.clone(),
        metrics: egress_metrics,
    });
    tracing::info!(upstream = ?config.dns.capture.upstream, "DNS capture upstream");
    let limits = config.listeners;
    if !crate::hbone::set_handshake_limits(crate::hbone::HandshakeLimits {
        timeout: limits.hbone_handshake_timeout,
        max_pending: limits.hbone_max_pending_handshakes,
        timed_out: listener_metrics.timeout_counter("inbound", TimeoutStage::Handshake),
        peer_refused: listener_metrics.refused_counter("inbound", RefusalReason::PeerHandshakes),
        idle_closed: listener_metrics.timeout_counter("inbound", TimeoutStage::Idle),
        evicted: listener_metrics.timeout_counter("inbound", TimeoutStage::HandshakeEvicted),
        evict_after: limits.hbone_handshake_timeout / 4,
        ..crate::hbone::HandshakeLimits::default()
    }) {
        tracing::warn!("HBONE handshake limits were already set in this process; keeping them");
    }
    let certs = Arc::new(CertificateManager::new(config.ca.clone(), bundle.clone()));
    certs.register_metrics(&mut registry);
    let index = match &config.policy_file {
        Some(path) => {
            authz::load_policies(path, &config.trust_domain).map_err(StartError::Policy)?
        }
        None => authz::empty_index(),
    };
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(index));
    let authorizer = Authorizer::new(policy_rx, authz_metrics.clone());
    let open = Arc::new(OpenConnections::default());
    let registry = Arc::new(registry);

    let cancel = CancellationToken::new();
    let pods_cancel = CancellationToken::new();
    // Pooled connections take no new tunnel once a bundle change leaves their peer untrusted.
    let pool = HbonePool::checking_trust(
        PoolConfig {
            idle_timeout: config.pool_idle_timeout,
            ..PoolConfig::default()
        },
        certs.bundle(),
    );
    let access =
        AccessLog::stdout(metrics.access_dropped.clone()).map_err(StartError::AccessLog)?;
    let proxy = Arc::new(Proxy {
        node: config.node.clone(),
        trust_domain: config.trust_domain.clone(),
        state: state_rx,
        certs: certs.clone(),
        pool: pool.clone(),
        tls: TlsConfigs::new(certs.bundle()),
        metrics,
        access,
        active: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        authorizer: authorizer.clone(),
        open: open.clone(),
        guard: guard_metrics,
        listener_caps: ConnectionCaps {
            max: limits.pod_max_connections,
            max_per_peer: limits.pod_max_connections_per_peer,
        },
        listener_metrics: listener_metrics.clone(),
        pins: pin_table.clone(),
        egress: egress.clone(),
        wire: config.wire.clone(),
    });
    let persist = match &config.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| StartError::Bind {
                what: dir.display().to_string(),
                source,
            })?;
            Some(dir.join("enrolled.json"))
        }
        None => None,
    };
    // Local mode reads its whole view from files: always current.
    let (current_tx, current_rx) = tokio::sync::watch::channel(config.workloads_file.is_some());
    let pods = Arc::new(
        PodRegistry::new(
            proxy.clone(),
            Arc::new(Dns::new(
                config.dns.capture.clone(),
                pin_table.clone(),
                dns_metrics,
            )),
            persist,
            cancel.clone(),
            pods_cancel.clone(),
        )
        .with_current_view(current_rx),
    );

    let bind_tcp = |addr: SocketAddr, what: &str| {
        let what = format!("{what} {addr}");
        async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, source })
        }
    };
    let admin_l = bind_tcp(config.admin_addr, "admin").await?;
    let metrics_l = bind_tcp(config.metrics_addr, "metrics").await?;
    let ready_l = bind_tcp(config.readiness_addr, "readiness").await?;
    let local = |l: &tokio::net::TcpListener| l.local_addr().unwrap_or(config.admin_addr);
    let (admin_addr, metrics_addr, readiness_addr) =
        (local(&admin_l), local(&metrics_l), local(&ready_l));
    let http_caps = ConnectionCaps {
        max: limits.http_max_connections,
        max_per_peer: limits.http_max_connections_per_peer,
    };
    let guard = |l, name| GuardedListener::new(l, name, http_caps, listener_metrics.clone());
    let (admin_l, metrics_l, ready_l) = (
        guard(admin_l, "admin"),
        guard(metrics_l, "metrics"),
        guard(ready_l, "readiness"),
    );
    let enroll_l = match &config.gateway {
        Some(_) => None,
        None => Some(
            enroll::bind(&config.enroll_socket).map_err(|source| StartError::Bind {
                what: config.enroll_socket.display().to_string(),
                source,
            })?,
        ),
    };

    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut reconciler = Reconciler::new(
        pods.clone(),
        config
            .netns_dir
            .clone()
            .map(|dir| NetnsScanner::new(dir).with_metrics(scan_metrics)),
    );
    // The previous run's pods are loaded (not yet enrolled) before the enrollment socket
    // serves: an early request must not overwrite the persisted list with just itself.
    pods.restore().await;
    match (&config.workloads_file, &config.policy_file) {
        (Some(_), policy_file) => {
            reconciler.pass().await;
            tasks.push(tokio::spawn(reconciler.run(cancel.clone())));
            if let Some(path) = policy_file {
                tasks.push(tokio::spawn(authz::watch_policy_file(
                    path.clone(),
                    config.trust_domain.clone(),
                    policy_tx,
                    authorizer,
                    open,
                    authz_metrics,
                    cancel.clone(),
                )));
            }
            ready_tx.send_replace(true);
        }
        (None, _) => {
            let (loaded_tx, mut loaded) = tokio::sync::watch::channel(false);
            let client = discovery::Client {
                ca: config.ca.clone(),
                node: config.node.clone(),
                trust_domain: config.trust_domain.clone(),
                sinks: discovery::Sinks {
                    state: state_tx,
                    policy: policy_tx,
                    bundle,
                    authorizer,
                    pool: pool.clone(),
                    open,
                    egress_open: egress.open.clone(),
                    loaded: loaded_tx,
                    current: current_tx,
                    bundle_file,
                },
                metrics: discovery_metrics,
            };
            tasks.push(tokio::spawn(client.run(cancel.clone())));
            if let Some(gateway) = config.gateway.clone() {
                // A gateway is ready once its pod is published, its identity issued and its
                // listeners bound.
                tasks.push(tokio::spawn(crate::gateway::run(
                    gateway,
                    proxy.clone(),
                    gateway_metrics.clone(),
                    ready_tx.clone(),
                    cancel.clone(),
                    pods_cancel.clone(),
                )));
            }
            let gateway_mode = config.gateway.is_some();
            // Pods of a previous run are re-enrolled once the first snapshot says who they
            // are (their rules stayed in place meanwhile, so their traffic failed closed);
            // only then is the ztunnel ready. From then on the reconciler follows the state.
            let stop = cancel.clone();
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let loaded = tokio::select! {
                    _ = stop.cancelled() => false,
                    r = loaded.wait_for(|l| *l) => r.is_ok(),
                };
                if loaded {
                    reconciler.pass().await;
                    if !gateway_mode {
                        ready.send_replace(true);
                    }
                    reconciler.run(stop).await;
                }
            }));
        }
    }
    if let Some(enroll_l) = enroll_l {
        tasks.push(tokio::spawn(enroll::serve(
            enroll_l,
            pods.clone(),
            enroll_metrics,
            cancel.clone(),
        )));
    }
    tasks.extend([
        tokio::spawn(membrane_runtime::serve_http(
            admin_l,
            admin::admin_routes(proxy.clone(), pods.clone()),
            limits.http,
            cancel.clone(),
        )),
        tokio::spawn(membrane_runtime::serve_http(
            metrics_l,
            admin::metrics_routes(registry),
            limits.http,
            cancel.clone(),
        )),
        tokio::spawn(membrane_runtime::serve_http(
            ready_l,
            admin::readiness_routes(ready_rx),
            limits.http,
            cancel.clone(),
        )),
        tokio::spawn(crate::udp::run(
            pods.clone(),
            proxy.clone(),
            udp_metrics,
            cancel.clone(),
        )),
        tokio::spawn(pins::maintain(pin_table, cancel.clone())),
        tokio::spawn(crate::egress::budget::maintain(ledger, cancel.clone())),
        tokio::spawn(pool.run_reaper(cancel.clone())),
        tokio::spawn(crate::memory::run_trimmer(memory_metrics, cancel.clone())),
        tokio::spawn(certs.run_renewals(cancel.clone())),
    ]);
    // Keep the sender alive as long as the servers run.
    let keep = cancel.clone();
    let tasks = {
        let mut t = tasks;
        t.push(tokio::spawn(async move {
            keep.cancelled().await;
            drop(ready_tx);
        }));
        t
    };
    tracing::info!(
        node = %config.node,
        enroll = %config.enroll_socket.display(),
        admin = %admin_addr,
        metrics = %metrics_addr,
        readiness = %readiness_addr,
        "ztunnel serving"
    );
    Ok(Running {
        proxy,
        pods,
        cancel,
        pods_cancel,
        tasks,
        admin_addr,
        metrics_addr,
        readiness_addr,
        drain_grace: config.drain_grace,
    })
}

impl Running {
    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics address actually bound.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The readiness address actually bound.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    /// The enrolled pods.
    pub fn pods(&self) -> &Arc<PodRegistry> {
        &self.pods
    }

    /// Drains: every listener closes (servers, enrollment, pods), open connections get up to
    /// `drain_grace` to finish, then the rest are closed. With `unenroll`, the pods' redirect
    /// rules are removed too; otherwise they stay, so traffic stays captured (failing closed)
    /// until a restarted ztunnel picks the pods up again.
    pub async fn shutdown(self, unenroll: bool) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        let deadline = tokio::time::Instant::now() + self.drain_grace;
        while self.proxy.active.load(std::sync::atomic::Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.proxy.active.load(std::sync::atomic::Ordering::Relaxed);
        if left > 0 {
            tracing::info!(
                connections = left,
                "drain grace period over; closing the rest"
            );
        }
        self.pods_cancel.cancel();
        if unenroll {
            self.pods.remove_all().await;
        }
        // The records of the connections that just ended, before the process exits.
        let access = self.proxy.access.clone();
        let flushed =
            tokio::task::spawn_blocking(move || access.flush(Duration::from_secs(2))).await;
        if !matches!(flushed, Ok(true)) {
            tracing::warn!("access records of the last connections may be lost");
        }
    }
}
