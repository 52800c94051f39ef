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

use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{SharedTrustBundle, TrustDomain};
use membrane_policy::PolicyIndex;
use membrane_proto::v1 as pb;
use pb::discovery_client::DiscoveryClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::authz::Authorizer;
use crate::certs::CaConfig;
use crate::conntrack::OpenConnections;
use crate::state::MeshState;

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

pub use wire::{Built, CLUSTERSET_PREFIX, Held, UpdateError, apply, build, service_key};

#[path = "discovery_wire.rs"]
mod wire;

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
                let pem = bundle.to_pem();
                if let Err(e) = membrane_runtime::fsutil::write_atomic(path, pem.as_bytes(), 0o600)
                {
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
        sinks.open.refresh_destinations(&state);
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
