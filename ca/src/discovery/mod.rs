//! The `Discovery` service: each ztunnel's view of the mesh, streamed (DESIGN.md §4).
//!
//! A `Watch` is authenticated like `Certificates.Sign` and may only name the caller's own
//! node. The stream starts with a full snapshot; after that, every change of the source state
//! or the trust bundle is coalesced for [`COALESCE`] (a burst of edits becomes one delta, not
//! thousands) and sent as the difference between the node's previous and new view. The part of
//! the view every node shares is built once per state and cached; each stream adds the
//! policies that select its node's workloads.
//!
//! Each caller (a node's ztunnel credential, or a gateway pod's: its ack-book key) may hold at
//! most [`MAX_STREAMS_PER_CALLER`] streams at once; each holds a full view of its node, so a
//! stolen or buggy credential must not multiply them. More are refused with
//! RESOURCE_EXHAUSTED, logged and counted
//! (`membrane_ca_discovery_refused_total{reason="too_many_streams"}`).
//!
//! A stream outlives the call that opened it, so its credential is checked again every
//! [`CREDENTIAL_RECHECK`]: a token that is no longer accepted (a removed bootstrap token, a
//! revoked Kubernetes token, one now naming another node) ends the stream with
//! UNAUTHENTICATED (`membrane_ca_discovery_refused_total{reason="credential_revoked"}`); a
//! projected token past its `exp` ends it the same way, counted as `credential_expired` and
//! logged at info (the kubelet has replaced it: the ztunnel reconnects with the token it
//! holds now, once per token lifetime). A check that cannot be made (the API server
//! unreachable) keeps the stream.

mod acks;
mod credential;
mod delta;
mod imported;
mod view;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_identity::TrustBundle;
use membrane_proto::v1 as pb;
use pb::discovery_server::Discovery;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use acks::AckBook;
pub use delta::{Key, View, diff, diff_with};
pub use view::{MeshView, PLAINTEXT_ANNOTATION, bundle_resource};

use crate::auth_deadline::AuthenticatedConnections;
use crate::federation::services::Imports;
use crate::source::{ClusterState, StateReceiver, WithheldIps};
use crate::tokenreview::NodeAuthenticator;

/// Withheld pod addresses logged one by one per change (each way); the rest are summed up in
/// one line.
const WITHHELD_LOG_LINES: usize = 16;

/// How often an open stream's credential is checked again (a node's certificates outlive a
/// revocation longer than this anyway; each check of a Kubernetes token can cost a review).
pub const CREDENTIAL_RECHECK: Duration = Duration::from_secs(300);

/// How long changes are gathered before a delta is sent.
pub const COALESCE: Duration = Duration::from_millis(50);

/// `Discovery.Watch` streams one caller (ack-book key: a node's ztunnel credential, or one
/// gateway account's on one node) may hold open at once. A ztunnel needs one; the rest cover
/// a reconnect racing its old stream's teardown. More are refused with RESOURCE_EXHAUSTED.
pub const MAX_STREAMS_PER_CALLER: usize = 4;

/// A gateway's refused routes: (kind, namespace, name) → why.
type RefusedRoutes = BTreeMap<
    (membrane_policy::gateway::RouteKind, String, String),
    membrane_policy::gateway::RefusalReason,
>;

/// Open discovery streams per ack-book key.
type StreamSlots = membrane_runtime::slots::KeyedSlots<String>;

/// Labels of the update counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpdateLabels {
    /// `snapshot` or `delta`.
    pub kind: &'static str,
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// A node-authentication refusal reason (`unauthenticated`, …), `wrong_node`,
    /// `source_not_ready` or `too_many_streams`.
    pub reason: &'static str,
}

/// Labels of the refused ingress route counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IngressRouteLabels {
    /// A [`membrane_policy::gateway::RefusalReason`] (`backend_not_found`,
    /// `hostname_conflict`, …).
    pub reason: &'static str,
}

/// Labels of the withheld-address gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WithheldLabels {
    /// `contested` (claimed by more than one active pod), `service_ip`, `clusterset_ip` or
    /// `outside_pod_networks`.
    pub reason: &'static str,
}

/// Discovery metrics.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryMetrics {
    streams: Gauge,
    updates: Family<UpdateLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    ingress_routes_refused: Family<IngressRouteLabels, Counter>,
    withheld: Family<WithheldLabels, Gauge>,
}

impl DiscoveryMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "discovery_streams",
            "Discovery streams open",
            m.streams.clone(),
        );
        registry.register(
            "discovery_updates",
            "Discovery updates sent, by kind (snapshot or delta)",
            m.updates.clone(),
        );
        registry.register(
            "discovery_refused",
            "Discovery streams refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "discovery_ingress_routes_refused",
            "Routes left out of an ingress gateway's table (the gateway serves its other routes), by reason; counted when a route is refused, or refused for another reason, not at every rebuild",
            m.ingress_routes_refused.clone(),
        );
        registry.register(
            "discovery_withheld_pod_ips",
            "Pod addresses published for no pod in the last view built, by reason (contested, service_ip, clusterset_ip, outside_pod_networks)",
            m.withheld.clone(),
        );
        m
    }
}

type Cached = (
    Arc<ClusterState>,
    Arc<TrustBundle>,
    Arc<Vec<TrustBundle>>,
    Imports,
    Arc<MeshView>,
);

/// The `Discovery` service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    auth: NodeAuthenticator,
    state: StateReceiver,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    /// The federated trust domains' bundles.
    federated: watch::Receiver<Arc<Vec<TrustBundle>>>,
    /// Keeps the default (empty, never changing) federation channel open: a stream ends
    /// when a channel it watches closes.
    _no_federation: Arc<watch::Sender<Arc<Vec<TrustBundle>>>>,
    /// The Services imported from federated clusters.
    imports: watch::Receiver<Imports>,
    /// Keeps the default (empty) imports channel open.
    _no_imports: Arc<watch::Sender<Imports>>,
    cache: Arc<Mutex<Option<Cached>>>,
    /// Each ingress gateway's refused routes at the last build, with their reasons (a
    /// refusal is logged and counted when it first appears).
    ingress_refused: Arc<Mutex<BTreeMap<(String, String), RefusedRoutes>>>,
    /// The withheld pod addresses last reported (each change is logged once).
    withheld: Arc<Mutex<WithheldIps>>,
    version: Arc<AtomicU64>,
    acks: AckBook,
    /// Open streams per ack-book key (at most [`MAX_STREAMS_PER_CALLER`]).
    open: StreamSlots,
    /// The node port's connections a call authenticated on.
    authenticated: AuthenticatedConnections,
    /// How often an open stream's credential is checked again.
    credential_recheck: Duration,
    metrics: DiscoveryMetrics,
    cancel: CancellationToken,
    root_namespace: Arc<str>,
}

struct StreamGuard {
    gauge: Gauge,
    acks: AckBook,
    node: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        self.acks.closed(&self.node);
    }
}

impl DiscoveryService {
    /// A service streaming views of `state` and `bundle`, authenticating callers with `auth`
    /// (the same node authenticator as `Certificates.Sign`); streams end when `cancel` fires.
    pub fn new(
        auth: NodeAuthenticator,
        state: StateReceiver,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        metrics: DiscoveryMetrics,
        cancel: CancellationToken,
    ) -> Self {
        let (no_federation, federated) = watch::channel(Arc::new(Vec::new()));
        let (no_imports, imports) = watch::channel(Imports::default());
        Self {
            auth,
            state,
            bundle,
            federated,
            _no_federation: Arc::new(no_federation),
            imports,
            _no_imports: Arc::new(no_imports),
            cache: Arc::default(),
            ingress_refused: Arc::default(),
            withheld: Arc::default(),
            version: Arc::new(AtomicU64::new(0)),
            acks: AckBook::default(),
            open: StreamSlots::default(),
            authenticated: AuthenticatedConnections::default(),
            credential_recheck: CREDENTIAL_RECHECK,
            metrics,
            cancel,
            root_namespace: Arc::from(membrane_policy::DEFAULT_ROOT_NAMESPACE),
        }
    }

    /// Marks the connections its calls authenticate on in `authenticated` (the node port's
    /// [`crate::auth_deadline`]).
    pub fn with_authenticated(mut self, authenticated: AuthenticatedConnections) -> Self {
        self.authenticated = authenticated;
        self
    }

    /// Checks an open stream's credential every `every` ([`CREDENTIAL_RECHECK`] by default).
    pub fn with_credential_recheck(mut self, every: Duration) -> Self {
        self.credential_recheck = every;
        self
    }

    /// Sets the root namespace (default `membrane-system`): its selector-less policies apply
    /// mesh-wide, and it is streamed to the ztunnels with the trust bundle.
    pub fn with_root_namespace(mut self, root_namespace: &str) -> Self {
        self.root_namespace = Arc::from(root_namespace);
        self
    }

    /// Streams the bundles of `federated` trust domains with the view (none by default).
    pub fn with_federated(mut self, federated: watch::Receiver<Arc<Vec<TrustBundle>>>) -> Self {
        self.federated = federated;
        self
    }

    /// Streams the Services `imports` from federated clusters with the view (none by
    /// default).
    pub fn with_imports(mut self, imports: watch::Receiver<Imports>) -> Self {
        self.imports = imports;
        self
    }

    /// What the nodes have confirmed.
    pub fn acks(&self) -> AckBook {
        self.acks.clone()
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
        status
    }

    /// The shared view of the current state and bundle, or `None` before the source loaded.
    fn mesh_view(&self) -> Option<Arc<MeshView>> {
        let state = self.state.borrow().clone()?;
        let bundle = self.bundle.borrow().clone();
        let federated = self.federated.borrow().clone();
        let imports = self.imports.borrow().clone();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, b, f, i, view)) = cache.as_ref()
            && Arc::ptr_eq(s, &state)
            && Arc::ptr_eq(b, &bundle)
            && Arc::ptr_eq(f, &federated)
            && Arc::ptr_eq(i, &imports)
        {
            return Some(view.clone());
        }
        let mut view = MeshView::build_federated(
            &state,
            &bundle,
            &view::Federated {
                bundles: &federated,
                imports: &imports,
            },
            &self.root_namespace,
        );
        if let Some((_, _, _, _, previous)) = cache.as_ref() {
            view.intern(previous);
        }
        view.set_ingress(self.ingress_of(&state));
        self.report_withheld(view.withheld());
        let view = Arc::new(view);
        *cache = Some((state, bundle, federated, imports, view.clone()));
        Some(view)
    }

    /// Each gateway's wire form with the routes its table accepted; a gateway whose every
    /// route is refused gets its (empty) table all the same. A route refused anew (or for
    /// another reason than at the previous build) is logged with every field path and counted
    /// by reason; one that stays refused is not logged again at every rebuild.
    fn ingress_of(&self, state: &ClusterState) -> BTreeMap<(String, String), pb::Ingress> {
        let mut seen = self
            .ingress_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut now = BTreeMap::new();
        let mut wires = BTreeMap::new();
        for (key, (wire, refused)) in view::ingress_wire(state) {
            let before = seen.get(&key);
            let mut refusals = RefusedRoutes::new();
            for route in refused {
                let id = (route.kind, route.namespace.clone(), route.name.clone());
                if before.and_then(|b| b.get(&id)) != Some(&route.reason) {
                    self.metrics
                        .ingress_routes_refused
                        .get_or_create(&IngressRouteLabels {
                            reason: route.reason.as_str(),
                        })
                        .inc();
                    crate::source::log_refused_route(&format_args!("{}/{}", key.0, key.1), &route);
                }
                refusals.insert(id, route.reason);
            }
            now.insert(key.clone(), refusals);
            wires.insert(key, wire);
        }
        *seen = now;
        wires
    }

    /// Logs each withheld pod address that is new or whose claimants changed, and each that
    /// is published again — at most [`WITHHELD_LOG_LINES`] of each per change, then one line
    /// with how many more and why (a `--pod-networks` that misses a pod range withholds every
    /// pod of it at once) — and sets the gauge.
    fn report_withheld(&self, now: &WithheldIps) {
        let mut last = self.withheld.lock().unwrap_or_else(|e| e.into_inner());
        if *last == *now {
            return;
        }
        let before: BTreeMap<_, _> = last.iter().collect();
        let mut more: BTreeMap<&'static str, usize> = BTreeMap::new();
        let changed = now.iter().filter(|(ip, why)| before.get(ip) != Some(why));
        for (n, (ip, why)) in changed.enumerate() {
            if n >= WITHHELD_LOG_LINES {
                *more.entry(why.reason()).or_default() += 1;
                continue;
            }
            tracing::warn!(
                %ip,
                pods = ?why.pods,
                services = ?why.services,
                reason = why.reason(),
                "pod address withheld: published for no pod (claimed by more than one active pod, a Service's or clusterset address, or outside the pod networks)"
            );
        }
        if !more.is_empty() {
            tracing::warn!(by_reason = ?more, "more pod addresses withheld than logged one by one (the gauge counts them all)");
        }
        let published = before.iter().filter(|(ip, _)| !now.contains(***ip));
        let mut more_published = 0usize;
        for (n, (ip, why)) in published.enumerate() {
            if n >= WITHHELD_LOG_LINES {
                more_published += 1;
                continue;
            }
            tracing::info!(%ip, pods = ?why.pods, "pod address no longer withheld");
        }
        if more_published > 0 {
            tracing::info!(
                count = more_published,
                "more pod addresses no longer withheld than logged one by one"
            );
        }
        for reason in [
            "contested",
            "service_ip",
            "clusterset_ip",
            "outside_pod_networks",
        ] {
            let count = now.iter().filter(|(_, w)| w.reason() == reason).count();
            self.metrics
                .withheld
                .get_or_create(&WithheldLabels { reason })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        *last = now.clone();
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Streams `node`'s view; acknowledgements are booked under `book` (the node, or for a
    /// gateway pod's credential a key of its own, so a gateway never confirms for its node's
    /// ztunnel).
    async fn stream(
        self,
        node: String,
        book: String,
        credential: (String, crate::tokenreview::Caller),
        slot: membrane_runtime::slots::Slot<String>,
        tx: mpsc::Sender<Result<pb::Update, Status>>,
    ) {
        let _slot = slot;
        let _guard = {
            self.metrics.streams.inc();
            self.acks.opened(&book);
            StreamGuard {
                gauge: self.metrics.streams.clone(),
                acks: self.acks.clone(),
                node: book.clone(),
            }
        };
        let mut state_rx = self.state.clone();
        let mut bundle_rx = self.bundle.clone();
        let mut federated_rx = self.federated.clone();
        let mut imports_rx = self.imports.clone();
        state_rx.borrow_and_update();
        bundle_rx.borrow_and_update();
        federated_rx.borrow_and_update();
        imports_rx.borrow_and_update();
        let Some(mesh) = self.mesh_view() else {
            return;
        };
        let mut sent = mesh.node_view(&node);
        let snapshot = pb::Update {
            version: self.next_version(),
            snapshot: true,
            upserts: sent.to_wire(),
            removals: Vec::new(),
        };
        let resources = snapshot.upserts.len();
        let snapshot_version = snapshot.version;
        if tx.send(Ok(snapshot)).await.is_err() {
            return;
        }
        self.acks.sent(&book, snapshot_version);
        self.acks
            .sent_bundle(&book, mesh.bundle().clone(), snapshot_version);
        self.metrics
            .updates
            .get_or_create(&UpdateLabels { kind: "snapshot" })
            .inc();
        tracing::info!(node, resources, "discovery stream opened; snapshot sent");
        let every = self.credential_recheck;
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tx.closed() => break,
                r = state_rx.changed() => if r.is_err() { break },
                r = bundle_rx.changed() => if r.is_err() { break },
                r = federated_rx.changed() => if r.is_err() { break },
                r = imports_rx.changed() => if r.is_err() { break },
                _ = recheck.tick() => {
                    if let Err(status) = self.recheck(&node, &credential).await {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(COALESCE) => {}
            }
            state_rx.borrow_and_update();
            bundle_rx.borrow_and_update();
            federated_rx.borrow_and_update();
            imports_rx.borrow_and_update();
            let Some(mesh) = self.mesh_view() else {
                continue;
            };
            let view = mesh.node_view(&node);
            let (upserts, removals) = diff_with(&sent, &view, mesh.shared_delta());
            if upserts.is_empty() && removals.is_empty() {
                continue;
            }
            let carries_bundle = upserts
                .iter()
                .any(|r| matches!(r.kind, Some(pb::resource::Kind::TrustBundle(_))));
            let update = pb::Update {
                version: self.next_version(),
                snapshot: false,
                upserts,
                removals,
            };
            let version = update.version;
            tracing::debug!(
                node,
                version = update.version,
                upserts = update.upserts.len(),
                removals = update.removals.len(),
                "discovery delta sent"
            );
            if tx.send(Ok(update)).await.is_err() {
                break;
            }
            self.acks.sent(&book, version);
            if carries_bundle {
                self.acks.sent_bundle(&book, mesh.bundle().clone(), version);
            }
            self.metrics
                .updates
                .get_or_create(&UpdateLabels { kind: "delta" })
                .inc();
            sent = view;
        }
        tracing::info!(node, "discovery stream closed");
    }
}

/// Where a caller's acknowledgements are booked: its node, or a gateway pod's own key.
fn ack_book_key(caller: &crate::tokenreview::Caller) -> String {
    match &caller.gateway {
        None => caller.node.clone(),
        Some((ns, sa)) => format!("{}#gateway:{ns}/{sa}", caller.node),
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<pb::Update, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr();
        let caller = match self.auth.authenticate(request.metadata(), peer).await {
            Ok(caller) => caller,
            Err(failure) => {
                let reason = failure.refusal().as_str();
                tracing::warn!(peer = ?peer, reason, error = %failure, "refused discovery stream: unauthenticated");
                return Err(self.refuse(reason, failure.status()));
            }
        };
        self.authenticated.mark(peer);
        // Checked again while the stream is open (authenticate read it already).
        let token = crate::tokenreview::bearer_token(request.metadata())
            .unwrap_or_default()
            .to_owned();
        let book = ack_book_key(&caller);
        let node = caller.node.clone();
        let asked = request.into_inner().node;
        if asked != node {
            tracing::warn!(
                node,
                asked,
                "refused discovery stream: another node's view asked"
            );
            return Err(self.refuse(
                "wrong_node",
                Status::permission_denied(format!(
                    "this credential belongs to node {node:?}, not {asked:?}"
                )),
            ));
        }
        if self.state.borrow().is_none() {
            return Err(self.refuse(
                "source_not_ready",
                Status::unavailable("the controller has not loaded its workload source yet"),
            ));
        }
        let Some(slot) = self.open.take(&book, MAX_STREAMS_PER_CALLER) else {
            tracing::warn!(
                node,
                caller = book,
                limit = MAX_STREAMS_PER_CALLER,
                "refused discovery stream: too many open streams for this credential"
            );
            return Err(self.refuse(
                "too_many_streams",
                Status::resource_exhausted(format!(
                    "this credential ({book}) already holds {MAX_STREAMS_PER_CALLER} discovery \
                     streams; close one first"
                )),
            ));
        };
        let (tx, rx) = mpsc::channel(4);
        let credential = (token, caller);
        tokio::spawn(self.clone().stream(node, book, credential, slot, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = match self
            .auth
            .authenticate(request.metadata(), request.remote_addr())
            .await
        {
            Ok(caller) => caller,
            Err(failure) => {
                return Err(self.refuse(failure.refusal().as_str(), failure.status()));
            }
        };
        self.authenticated.mark(request.remote_addr());
        let book = ack_book_key(&caller);
        let node = caller.node;
        let ack = request.into_inner();
        if ack.node != node {
            return Err(self.refuse(
                "wrong_node",
                Status::permission_denied(format!(
                    "this credential belongs to node {node:?}, not {:?}",
                    ack.node
                )),
            ));
        }
        tracing::debug!(node, version = ack.version, "discovery update acknowledged");
        self.acks.acked(&book, ack.version);
        Ok(Response::new(pb::AckResponse {}))
    }
}

#[cfg(test)]
mod tests;
