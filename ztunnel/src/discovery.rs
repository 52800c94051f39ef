//! The discovery client: the node's view of the mesh, streamed from the controller.
//!
//! The ztunnel opens `Discovery.Watch(node)` with its node credential, applies the first
//! snapshot and every delta *whole* (a resource that fails validation rejects its update, the
//! last good state stays, and the stream is reopened so a fresh snapshot resynchronises), and
//! publishes workloads, Services, the trust bundle and the compiled policy to the proxy. When
//! the stream breaks, the ztunnel keeps enforcing its last state and reconnects with capped
//! exponential backoff and jitter; the snapshot that opens every stream replaces everything,
//! so removals made while it was away take effect. The ztunnel turns ready once the first
//! snapshot is applied and the pods of a previous run are re-enrolled.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{SharedTrustBundle, TrustBundle, TrustDomain, WorkloadIdentity};
use membrane_policy::PolicyIndex;
use membrane_proto::v1 as pb;
use pb::discovery_client::DiscoveryClient;
use pb::resource::Kind as ResourceKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::authz::Authorizer;
use crate::certs::CaConfig;
use crate::conntrack::OpenConnections;
use crate::state::{MeshState, PlaintextMode, Protocol, ServiceTarget, Workload};

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Largest update accepted (a snapshot of a large mesh).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// Labels of the update counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpdateLabels {
    /// `snapshot` or `delta`.
    pub kind: &'static str,
    /// `applied` or `rejected`.
    pub result: &'static str,
}

/// Discovery client metrics.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryMetrics {
    connected: Gauge,
    updates: Family<UpdateLabels, Counter>,
    reconnects: Counter,
    version: Gauge,
}

impl DiscoveryMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "discovery_connected",
            "1 while the discovery stream from the controller is open",
            m.connected.clone(),
        );
        registry.register(
            "discovery_updates",
            "Discovery updates received, by kind and result",
            m.updates.clone(),
        );
        registry.register(
            "discovery_reconnects",
            "Discovery stream (re)connection attempts after a failure",
            m.reconnects.clone(),
        );
        registry.register(
            "discovery_version",
            "Version of the last applied discovery update",
            m.version.clone(),
        );
        m
    }
}

/// Why an update was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// A resource is malformed.
    #[error("{kind} {name}: {message}")]
    Invalid {
        /// Resource kind.
        kind: &'static str,
        /// Its key.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A delta arrived before any snapshot.
    #[error("a delta arrived before the first snapshot")]
    NoSnapshot,
}

/// Resources held, by (kind, key).
pub type Held = BTreeMap<(i32, String), pb::Resource>;

/// What the proxy uses, built from the held resources.
#[derive(Debug)]
pub struct Built {
    /// Workloads and Services.
    pub state: MeshState,
    /// Compiled policy.
    pub policy: PolicyIndex,
    /// The trust bundle, when one was sent.
    pub bundle: Option<TrustBundle>,
    /// The federated trust domains' bundles (none: no trust domain is federated).
    pub federated: Vec<TrustBundle>,
}

fn key_of(resource: &pb::Resource) -> Option<(i32, String)> {
    use pb::resource_key::Kind;
    Some(match resource.kind.as_ref()? {
        ResourceKind::Workload(w) => (Kind::Workload as i32, w.uid.clone()),
        ResourceKind::Service(s) => (Kind::Service as i32, service_key(s)),
        ResourceKind::Authorization(a) => (
            Kind::Authorization as i32,
            format!("{}/{}", a.namespace, a.name),
        ),
        ResourceKind::TrustBundle(_) => (Kind::TrustBundle as i32, String::new()),
        ResourceKind::FederatedBundle(b) => (Kind::FederatedBundle as i32, b.trust_domain.clone()),
        ResourceKind::Egress(e) => (Kind::Egress as i32, format!("{}/{}", e.namespace, e.name)),
        ResourceKind::Ingress(i) => (Kind::Ingress as i32, format!("{}/{}", i.namespace, i.name)),
    })
}

/// Applies `update` to a copy of `held`; the caller keeps `held` when this fails.
pub fn apply(held: Option<&Held>, update: &pb::Update) -> Result<Held, UpdateError> {
    let mut next = match (update.snapshot, held) {
        (true, _) => Held::new(),
        (false, Some(held)) => held.clone(),
        (false, None) => return Err(UpdateError::NoSnapshot),
    };
    for key in &update.removals {
        next.remove(&(key.kind, key.name.clone()));
    }
    for resource in &update.upserts {
        let key = key_of(resource).ok_or_else(|| UpdateError::Invalid {
            kind: "resource",
            name: String::new(),
            message: "empty resource".into(),
        })?;
        next.insert(key, resource.clone());
    }
    Ok(next)
}

fn invalid(kind: &'static str, name: &str, message: impl ToString) -> UpdateError {
    UpdateError::Invalid {
        kind,
        name: name.to_owned(),
        message: message.to_string(),
    }
}

fn port(kind: &'static str, name: &str, value: u32) -> Result<u16, UpdateError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(kind, name, format!("port {value} is not 1-65535")))
}

fn workload(w: &pb::Workload, local: &TrustDomain) -> Result<Workload, UpdateError> {
    // A pod of another trust domain (imported from a federated cluster) is only ever a
    // destination: its own cluster's ztunnel captures it and holds its identity.
    let foreign_td = match w.trust_domain.as_str() {
        "" => None,
        td => Some(
            membrane_identity::spiffe_id::parse_trust_domain(td)
                .map_err(|e| invalid("workload", &w.uid, format!("trust domain: {e}")))?,
        )
        .filter(|td| td != local),
    };
    if foreign_td.is_some() && !w.foreign {
        return Err(invalid(
            "workload",
            &w.uid,
            "a workload of another trust domain must be foreign (captured by its own cluster)",
        ));
    }
    let td = foreign_td.as_ref().unwrap_or(local);
    let identity = WorkloadIdentity::new(td, &w.namespace, &w.service_account)
        .map_err(|e| invalid("workload", &w.uid, e))?;
    let ips = w
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| invalid("workload", &w.uid, format!("{ip:?} is not an IP")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match pb::workload::Protocol::try_from(w.protocol) {
        Ok(pb::workload::Protocol::Hbone) => Protocol::Hbone,
        Ok(pb::workload::Protocol::Tcp) => Protocol::Tcp,
        Err(_) => return Err(invalid("workload", &w.uid, "unknown protocol")),
    };
    let gateway = gateway_role(w)?;
    if w.foreign && (protocol != Protocol::Hbone || gateway.is_some()) {
        return Err(invalid(
            "workload",
            &w.uid,
            "a foreign HBONE peer is neither plain TCP nor a gateway",
        ));
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ips,
        protocol,
        labels: w.labels.clone().into_iter().collect(),
        identity,
        gateway,
        foreign: w.foreign,
    })
}

fn gateway_role(w: &pb::Workload) -> Result<Option<crate::state::GatewayRole>, UpdateError> {
    use crate::state::{GatewayKind, GatewayRole};
    let Some(role) = &w.gateway else {
        return Ok(None);
    };
    let kind = match pb::gateway_role::Kind::try_from(role.kind) {
        Ok(pb::gateway_role::Kind::Unspecified) => return Ok(None),
        Ok(pb::gateway_role::Kind::Egress) => GatewayKind::Egress,
        Ok(pb::gateway_role::Kind::Ingress) => GatewayKind::Ingress,
        Err(_) => return Err(invalid("workload", &w.uid, "unknown gateway kind")),
    };
    membrane_identity::spiffe_id::validate_namespace(&role.name)
        .map_err(|e| invalid("workload", &w.uid, format!("gateway name: {e}")))?;
    Ok(Some(GatewayRole {
        kind,
        name: role.name.clone(),
    }))
}

/// A Service's key and its name in the mesh state: `namespace/name`, or
/// `clusterset:namespace/name` for one imported from federated clusters.
pub fn service_key(s: &pb::Service) -> String {
    if s.clusterset {
        format!("{CLUSTERSET_PREFIX}{}/{}", s.namespace, s.name)
    } else {
        format!("{}/{}", s.namespace, s.name)
    }
}

/// The prefix of an imported (clusterset) Service's name in the mesh state.
pub const CLUSTERSET_PREFIX: &str = "clusterset:";

fn service(s: &pb::Service, state: &mut MeshState) -> Result<(), UpdateError> {
    let name = service_key(s);
    let vips = s
        .vips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| invalid("service", &name, format!("{ip:?} is not an IP")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for p in &s.ports {
        let service_port = port("service", &name, p.port)?;
        let mut endpoints = Vec::new();
        for e in s.endpoints.iter().filter(|e| e.ready) {
            let ip: IpAddr =
                e.ip.parse()
                    .map_err(|_| invalid("service", &name, format!("{:?} is not an IP", e.ip)))?;
            let target = match e.ports.get(&p.name) {
                Some(n) => port("service", &name, *n)?,
                None if p.target_port == 0 => continue,
                None => port("service", &name, p.target_port)?,
            };
            endpoints.push(SocketAddr::new(ip, target));
        }
        state.add_service_port(
            &name,
            service_port,
            ServiceTarget {
                service: name.clone(),
                endpoints: endpoints.clone(),
            },
        );
        for vip in &vips {
            state.add_service(
                SocketAddr::new(*vip, service_port),
                ServiceTarget {
                    service: name.clone(),
                    endpoints: endpoints.clone(),
                },
            );
        }
    }
    Ok(())
}

/// Builds what the proxy uses from the held resources, validating every value.
pub fn build(held: &Held, td: &TrustDomain) -> Result<Built, UpdateError> {
    let mut state = MeshState::empty_loaded();
    let mut policies = Vec::new();
    let mut egress = Vec::new();
    let mut ingress = Vec::new();
    let mut bundle = None;
    let mut federated = Vec::new();
    // The controller streams its `--root-namespace` with the trust bundle; until it names one,
    // the default applies.
    let mut root_namespace = membrane_policy::DEFAULT_ROOT_NAMESPACE;
    // Pods of federated clusters come after every local one: a local pod keeps its address
    // whatever a peer exports, and a peer's namespace settings never touch the local namespace
    // of the same name.
    let mut imported = Vec::new();
    for resource in held.values() {
        match &resource.kind {
            Some(ResourceKind::Workload(w))
                if !w.trust_domain.is_empty() && w.trust_domain != td.to_string() =>
            {
                imported.push(w);
            }
            Some(ResourceKind::Workload(w)) => {
                let mode = if w.plaintext_permitted {
                    PlaintextMode::Permit
                } else {
                    PlaintextMode::Deny
                };
                state.set_plaintext(&w.namespace, mode);
                let udp_ports = w
                    .plaintext_udp_ports
                    .iter()
                    .map(|p| port("workload", &w.uid, *p))
                    .collect::<Result<Vec<_>, _>>()?;
                state.set_plaintext_udp_ports(&w.namespace, udp_ports);
                state
                    .insert_lenient(workload(w, td)?)
                    .map_err(|m| invalid("workload", &w.uid, m))?;
            }
            Some(ResourceKind::Service(s)) => service(s, &mut state)?,
            Some(ResourceKind::Authorization(a)) => {
                let name = format!("{}/{}", a.namespace, a.name);
                let policy = membrane_policy::Policy::try_from(a.clone())
                    .map_err(|e| invalid("authorization", &name, e))?;
                policies.push(policy);
            }
            Some(ResourceKind::Egress(e)) => {
                let name = format!("{}/{}", e.namespace, e.name);
                let policy = membrane_policy::egress::EgressPolicy::try_from(e.clone())
                    .map_err(|e| invalid("egress policy", &name, e))?;
                egress.push(policy);
            }
            Some(ResourceKind::Ingress(i)) => ingress.push(i),
            Some(ResourceKind::TrustBundle(b)) => {
                if b.trust_domain != td.to_string() {
                    return Err(invalid(
                        "trust bundle",
                        &b.trust_domain,
                        format!("trust domain is not {td}"),
                    ));
                }
                let roots = b.roots_der.iter().cloned().map(CertificateDer::from);
                let built = TrustBundle::new(td.clone(), roots)
                    .map_err(|e| invalid("trust bundle", "", e))?;
                bundle = Some(built);
                if !b.root_namespace.is_empty() {
                    root_namespace = &b.root_namespace;
                }
            }
            Some(ResourceKind::FederatedBundle(b)) => federated.push(federated_bundle(b, td)?),
            None => return Err(invalid("resource", "", "empty resource")),
        }
    }
    for w in imported {
        state
            .insert_lenient(workload(w, td)?)
            .map_err(|m| invalid("workload", &w.uid, m))?;
    }
    state.set_egress(membrane_policy::egress::EgressIndex::build(
        egress,
        root_namespace,
    ));
    // After every Service: a table is built against the same update's Services, whole or
    // the update is refused.
    for i in ingress {
        let name = format!("{}/{}", i.namespace, i.name);
        let (gateway, routes) = membrane_policy::gateway::wire::from_wire(i)
            .map_err(|e| invalid("ingress", &name, e))?;
        let table = membrane_policy::gateway::IngressTable::build(&gateway, &routes, |ns, svc| {
            state.service_port_numbers(ns, svc)
        })
        .map_err(|errors| {
            let first = errors
                .first()
                .map(|e| format!("{} {}: {}", e.object, e.path, e.message));
            invalid("ingress", &name, first.unwrap_or_default())
        })?;
        state.set_ingress(name, table);
    }
    Ok(Built {
        state,
        policy: PolicyIndex::build_for(policies, root_namespace, td),
        bundle,
        federated,
    })
}

/// A federated trust domain's roots: never the local trust domain's.
fn federated_bundle(
    b: &pb::FederatedBundle,
    local: &TrustDomain,
) -> Result<TrustBundle, UpdateError> {
    let what = "federated trust bundle";
    let td = membrane_identity::spiffe_id::parse_trust_domain(&b.trust_domain)
        .map_err(|e| invalid(what, &b.trust_domain, e))?;
    if &td == local {
        return Err(invalid(what, &b.trust_domain, "is the local trust domain"));
    }
    let roots = b.roots_der.iter().cloned().map(CertificateDer::from);
    TrustBundle::new(td, roots).map_err(|e| invalid(what, &b.trust_domain, e))
}

/// Where the client publishes what it receives.
#[derive(Debug)]
pub struct Sinks {
    /// Workloads and Services.
    pub state: watch::Sender<Arc<MeshState>>,
    /// Compiled policy.
    pub policy: watch::Sender<Arc<PolicyIndex>>,
    /// The trust bundle peers are verified against.
    pub bundle: SharedTrustBundle,
    /// Re-decides open connections after a change.
    pub authorizer: Authorizer,
    /// Outbound HBONE connections (retired when their peer's trust domain leaves the
    /// federation).
    pub pool: crate::hbone::HbonePool,
    /// Open connections.
    pub open: Arc<OpenConnections>,
    /// Open egress connections, decided again after a change.
    pub egress_open: Arc<crate::egress::open::OpenEgress>,
    /// Turns true when the first snapshot is applied.
    pub loaded: watch::Sender<bool>,
    /// True while the node's view is current: a stream is open and its snapshot (and every
    /// update since) is applied. False while the stream is down: the state is the last one
    /// received, and the ztunnel cannot tell a new pod's membership (see `pods::PodRegistry::add`).
    pub current: watch::Sender<bool>,
    /// Where a changed bundle is saved (PEM), so a restart trusts the controller even after
    /// a root rotation replaced the bootstrap root.
    pub bundle_file: Option<std::path::PathBuf>,
}

/// The discovery client.
#[derive(Debug)]
pub struct Client {
    /// The controller.
    pub ca: CaConfig,
    /// This node.
    pub node: String,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Where updates go.
    pub sinks: Sinks,
    /// Metrics.
    pub metrics: DiscoveryMetrics,
}

enum StreamEnd {
    /// The controller closed the stream or the connection failed.
    Broken(String),
    /// An update was rejected; resynchronise.
    Rejected(UpdateError),
    /// Shutting down.
    Cancelled,
}

fn jittered(delay: Duration) -> Duration {
    let factor = rand::random_range(0.5..1.0);
    delay.mul_f64(factor)
}

// === impl Client ===

impl Client {
    /// Runs until `cancel` fires: connects, applies, reconnects.
    pub async fn run(self, cancel: CancellationToken) {
        let mut held: Option<Held> = None;
        let mut backoff = BACKOFF_MIN;
        loop {
            let (end, got_snapshot) = self.session(&mut held, &cancel).await;
            self.metrics.connected.set(0);
            self.sinks.current.send_replace(false);
            match end {
                StreamEnd::Cancelled => return,
                StreamEnd::Broken(reason) => {
                    tracing::warn!(node = %self.node, reason, "discovery stream lost; serving the last state");
                }
                StreamEnd::Rejected(error) => {
                    tracing::error!(node = %self.node, error = %error, "discovery update rejected; keeping the last state and resynchronising");
                }
            }
            if got_snapshot {
                backoff = BACKOFF_MIN;
            }
            let delay = jittered(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.metrics.reconnects.inc();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(
        &self,
    ) -> Result<(DiscoveryClient<Channel>, tonic::Streaming<pb::Update>), String> {
        let channel = crate::certs::channel(&self.ca, &self.sinks.bundle.load(), None)
            .map_err(|e| e.to_string())?;
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_MESSAGE_LEN);
        let mut request = tonic::Request::new(pb::WatchRequest {
            node: self.node.clone(),
        });
        let auth = self.ca.bearer().map_err(|e| e.to_string())?;
        request.metadata_mut().insert("authorization", auth);
        let response = client
            .watch(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok((client, response.into_inner()))
    }

    /// Confirms `version` to the controller (root rotation waits for it). A failure is only
    /// logged: the next update is confirmed again, and a reconnect starts with a snapshot.
    async fn ack(&self, client: &mut DiscoveryClient<Channel>, version: u64) {
        let mut request = tonic::Request::new(pb::AckRequest {
            node: self.node.clone(),
            version,
        });
        request.set_timeout(Duration::from_secs(10));
        match self.ca.bearer() {
            Ok(auth) => {
                request.metadata_mut().insert("authorization", auth);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot acknowledge a discovery update");
                return;
            }
        }
        if let Err(s) = client.ack(request).await {
            tracing::warn!(version, code = ?s.code(), message = s.message(), "discovery acknowledgement failed");
        }
    }

    /// One stream: returns how it ended and whether a snapshot was applied.
    async fn session(
        &self,
        held: &mut Option<Held>,
        cancel: &CancellationToken,
    ) -> (StreamEnd, bool) {
        let (mut client, mut stream) = tokio::select! {
            _ = cancel.cancelled() => return (StreamEnd::Cancelled, false),
            r = self.connect() => match r {
                Ok(pair) => pair,
                Err(e) => return (StreamEnd::Broken(e), false),
            },
        };
        let mut got_snapshot = false;
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => return (StreamEnd::Cancelled, got_snapshot),
                m = stream.message() => m,
            };
            let update = match message {
                Ok(Some(update)) => update,
                Ok(None) => {
                    return (
                        StreamEnd::Broken("the controller ended the stream".into()),
                        got_snapshot,
                    );
                }
                Err(s) => {
                    return (
                        StreamEnd::Broken(format!("{:?}: {}", s.code(), s.message())),
                        got_snapshot,
                    );
                }
            };
            // The first message of every stream must be a snapshot: a delta would apply on
            // top of state the controller does not know we hold.
            let base = if got_snapshot { held.as_ref() } else { None };
            let kind = if update.snapshot { "snapshot" } else { "delta" };
            let result = apply(base, &update)
                .and_then(|next| build(&next, &self.trust_domain).map(|b| (next, b)));
            match result {
                Ok((next, built)) => {
                    self.publish(built);
                    *held = Some(next);
                    got_snapshot |= update.snapshot;
                    self.metrics.connected.set(1);
                    self.sinks.current.send_replace(got_snapshot);
                    self.metrics
                        .version
                        .set(i64::try_from(update.version).unwrap_or(i64::MAX));
                    self.metrics
                        .updates
                        .get_or_create(&UpdateLabels {
                            kind,
                            result: "applied",
                        })
                        .inc();
                    tracing::info!(
                        node = %self.node,
                        version = update.version,
                        kind,
                        upserts = update.upserts.len(),
                        removals = update.removals.len(),
                        "discovery update applied"
                    );
                    self.ack(&mut client, update.version).await;
                }
                Err(e) => {
                    self.metrics
                        .updates
                        .get_or_create(&UpdateLabels {
                            kind,
                            result: "rejected",
                        })
                        .inc();
                    return (StreamEnd::Rejected(e), got_snapshot);
                }
            }
        }
    }

    /// After the federated set changed: no pooled connection to a trust domain no longer
    /// trusted takes a new tunnel (the next one dials, and its handshake is refused by name),
    /// and open inbound connections from such a trust domain are closed.
    fn forget_untrusted(&self) {
        let bundle = &self.sinks.bundle;
        let trusted = |td: &TrustDomain| bundle.for_trust_domain(td).is_some();
        let retired = self
            .sinks
            .pool
            .retire(|key| !trusted(key.dst.trust_domain()));
        let closed = self.sinks.open.recheck(|attrs| match &attrs.source {
            Some(src) if !trusted(src.trust_domain()) => Err(format!(
                "trust domain {} is no longer federated",
                src.trust_domain()
            )),
            _ => Ok(()),
        });
        if retired + closed > 0 {
            tracing::info!(
                retired,
                closed,
                "connections of trust domains no longer federated retired and closed"
            );
        }
    }

    fn publish(&self, built: Built) {
        let sinks = &self.sinks;
        if let Some(bundle) = built.bundle
            && *sinks.bundle.load() != bundle
        {
            tracing::info!(roots = bundle.roots().len(), "trust bundle updated");
            if let Some(path) = &sinks.bundle_file {
                let tmp = path.with_extension("pem.tmp");
                let saved = std::fs::write(&tmp, bundle.to_pem())
                    .and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = saved {
                    tracing::warn!(file = %path.display(), error = %e, "cannot save the trust bundle");
                }
            }
            sinks.bundle.store(bundle);
        }
        let mut federated = built.federated;
        federated.sort_by(|a, b| a.trust_domain().cmp(b.trust_domain()));
        let held = sinks.bundle.federated();
        let unchanged =
            held.len() == federated.len() && held.iter().zip(&federated).all(|(h, b)| **h == *b);
        if !unchanged {
            let trust_domains: Vec<String> = (federated.iter())
                .map(|b| b.trust_domain().to_string())
                .collect();
            match sinks.bundle.store_federated(federated) {
                Ok(()) => {
                    tracing::info!(?trust_domains, "federated trust bundles updated");
                    self.forget_untrusted();
                }
                // `build` refused the local trust domain and the keys are unique per trust
                // domain, so this is not reached; were it, the last set stays.
                Err(e) => tracing::warn!(error = %e, "federated trust bundles refused"),
            }
        }
        let state = Arc::new(built.state);
        sinks.state.send_replace(state.clone());
        sinks.policy.send_replace(Arc::new(built.policy));
        let closed = sinks.authorizer.recheck(&sinks.open);
        if closed > 0 {
            tracing::info!(closed, "connections closed after a discovery update");
        }
        let closed = sinks.egress_open.recheck(&state);
        if closed > 0 {
            tracing::info!(closed, "egress connections closed after a discovery update");
        }
        sinks.loaded.send_replace(true);
    }
}

#[cfg(test)]
#[path = "discovery_tests.rs"]
mod tests;
