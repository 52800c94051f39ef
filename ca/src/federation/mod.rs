//! SPIFFE Federation: the controller serves its own trust bundle at a bundle endpoint
//! ([`endpoint`]) and follows each `TrustFederation` ([`spec`]) by fetching that trust
//! domain's bundle ([`fetch`]) at the refresh hint the peer gives, and — where the federation
//! names the peer's federation listener — by importing the Services it exports
//! ([`services`], which also serves this cluster's exports). The bundles held are
//! streamed to the ztunnels as `FederatedBundle` resources, where a peer's chain is verified
//! against the bundle of its own trust domain only.
//!
//! Until its first fetch a federation's bootstrap bundle is in force (it vouches for the
//! endpoint and for the trust domain's identities alike). A failed fetch keeps the last good
//! bundle, says so in a log line and `membrane_ca_federated_bundle_fetches_total{result}`, and
//! `membrane_ca_federated_bundle_age_seconds` keeps growing. A `TrustFederation` removed
//! stops being trusted at the next discovery update. A federation naming the local trust
//! domain, or a second one naming a trust domain already federated, is refused with an error
//! log and changes nothing. The last good bundle of each federation is also kept in the state
//! directory ([`persist`]): a restarted controller starts from it (and from its sequence)
//! rather than from the bootstrap bundle, as long as the federation's trust settings are the
//! ones it was fetched under.

pub mod endpoint;
pub mod fetch;
mod follow;
pub mod importer;
pub mod persist;
pub mod services;
pub mod spec;
#[cfg(test)]
mod test_roots;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membrane_identity::{TrustBundle, TrustDomain};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::source::StateReceiver;
pub use spec::TrustFederation;

/// Refresh interval when a peer gives no hint.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Bounds on a peer's hint (a hint of 0 must not become a busy loop, nor one of a year a
/// bundle that never changes).
pub const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// How often an unchanged fetched bundle is saved again (its fetch time on disk).
pub const SAVE_INTERVAL: Duration = Duration::from_secs(60);
/// Retry delays after a failed fetch (doubling).
pub const RETRY_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The federated bundles streamed to the ztunnels.
pub type FederatedBundles = watch::Receiver<Arc<Vec<TrustBundle>>>;

/// Labels naming a federated trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrustDomainLabels {
    /// The federated trust domain.
    pub trust_domain: String,
}

/// Labels of `membrane_ca_federated_bundle_fetches_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FetchLabels {
    /// The federated trust domain.
    pub trust_domain: String,
    /// `ok`, or why it failed (`connect`, `tls`, `http`, `document`, `rollback`, `timeout`).
    pub result: &'static str,
}

/// Labels of `membrane_ca_federated_bundle_store_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StoreLabels {
    /// The federated trust domain.
    pub trust_domain: String,
    /// `save` or `load`.
    pub op: &'static str,
}

/// Federation metrics.
#[derive(Debug, Clone, Default)]
pub struct FederationMetrics {
    age: Family<TrustDomainLabels, Gauge<f64, AtomicU64>>,
    fetches: Family<FetchLabels, Counter>,
    sequence: Family<TrustDomainLabels, Gauge>,
    store_errors: Family<StoreLabels, Counter>,
    import_ends: Family<importer::ImportEndLabels, Counter>,
    import_open: Family<TrustDomainLabels, Gauge>,
}

impl FederationMetrics {
    fn store_error(&self, td: &TrustDomain, op: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels {
                trust_domain: td.to_string(),
                op,
            })
            .inc();
    }
}

impl FederationMetrics {
    /// Registers the federation metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "federated_bundle_age_seconds",
            "Seconds since the bundle in force for a federated trust domain was fetched (or since its bootstrap bundle took effect)",
            m.age.clone(),
        );
        registry.register(
            "federated_bundle_fetches",
            "Fetches of federated trust domains' bundles, by result",
            m.fetches.clone(),
        );
        registry.register(
            "federated_bundle_sequence",
            "spiffe_sequence of the bundle in force for a federated trust domain",
            m.sequence.clone(),
        );
        registry.register(
            "federated_bundle_store_errors",
            "Federated bundles that could not be saved to or restored from the state directory",
            m.store_errors.clone(),
        );
        registry.register(
            "federated_import_stream_ends",
            "Service import streams from federated peers that ended, by reason (bundle_changed, ended, error)",
            m.import_ends.clone(),
        );
        registry.register(
            "federated_import_streams_open",
            "1 while a federated peer's service exports stream is followed, 0 while it is being dialled again",
            m.import_open.clone(),
        );
        m
    }
}

/// What is held for one federated trust domain.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    bundle: TrustBundle,
    sequence: Option<u64>,
    /// When the bundle in force took effect (bootstrap or fetch).
    since: Instant,
}

type HeldMap = Arc<Mutex<BTreeMap<TrustDomain, Held>>>;

/// What the federation tasks publish to, and present.
#[derive(Clone)]
pub struct Outputs {
    /// The bundles held, for the ztunnels and the federation listener.
    pub bundles: watch::Sender<Arc<Vec<TrustBundle>>>,
    /// The Services imported from federated peers.
    pub imports: watch::Sender<services::Imports>,
    /// The controller's serving SVID (the client certificate of an import stream).
    pub serving: Arc<crate::serving::ServingCert>,
    /// Where the last good bundles are kept across restarts.
    pub store: persist::Store,
}

/// A running importer, and the flag that stops it publishing once its federation is gone
/// (aborting a task is not immediate).
type ImporterTask = (JoinHandle<()>, Arc<std::sync::atomic::AtomicBool>);

/// A running fetcher, and the flag that stops it committing a fetched bundle once its
/// federation is gone (aborting a task is not immediate: a fetch that completes as the
/// federation is removed would otherwise put the removed trust domain's bundle back). The
/// flag is cleared, and checked, under the lock of the held bundles.
type FetcherTask = (JoinHandle<()>, Arc<std::sync::atomic::AtomicBool>);

/// A running federation: its fetcher, and its importer when it imports.
type Tasks = BTreeMap<String, (TrustFederation, FetcherTask, Option<ImporterTask>)>;

/// Stops a fetcher: after this, it never changes the bundles held (see [`FetcherTask`]).
fn stop_fetcher((task, alive): FetcherTask, held: &HeldMap) {
    {
        // Under the lock the fetcher commits under: no commit of it follows this.
        let _held = membrane_runtime::lock(held);
        alive.store(false, std::sync::atomic::Ordering::Release);
    }
    task.abort();
}

/// Follows the `TrustFederation`s of the source state and publishes the bundles held and
/// the Services imported to `out` until `cancel` fires.
pub async fn run(
    local: TrustDomain,
    mut state: StateReceiver,
    out: Outputs,
    metrics: FederationMetrics,
    cancel: CancellationToken,
) {
    let held: HeldMap = Arc::default();
    let mut tasks: Tasks = BTreeMap::new();
    let mut ager = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let wanted = state
                    .borrow_and_update()
                    .as_ref()
                    .map(|s| s.federations.clone());
                if let Some(wanted) = &wanted {
                    // Only a loaded state says which federations are gone.
                    let named: Vec<&TrustDomain> = wanted.values().map(|f| &f.trust_domain).collect();
                    out.store.retain(&named);
                }
                reconcile(&local, wanted.unwrap_or_default(), &mut tasks, &held, &out, &metrics);
            }
            _ = ager.tick() => {
                for (td, h) in membrane_runtime::lock(&held).iter() {
                    let labels = TrustDomainLabels { trust_domain: td.to_string() };
                    metrics.age.get_or_create(&labels).set(h.since.elapsed().as_secs_f64());
                }
            }
        }
    }
    for (_, (_, fetcher, importer)) in tasks {
        stop_fetcher(fetcher, &held);
        if let Some((importer, alive)) = importer {
            alive.store(false, std::sync::atomic::Ordering::Release);
            importer.abort();
        }
    }
}

/// Starts, restarts and stops fetchers so they follow `wanted`.
fn reconcile(
    local: &TrustDomain,
    wanted: BTreeMap<String, TrustFederation>,
    tasks: &mut Tasks,
    held: &HeldMap,
    out: &Outputs,
    metrics: &FederationMetrics,
) {
    // An edit that leaves the trust settings alone (service exports, east-west gateway)
    // restarts only the importer: the bundle held — possibly fetched long after the
    // bootstrap one — stays in force.
    for (name, (fed, _, importer)) in tasks.iter_mut() {
        let Some(new) = wanted.get(name) else {
            continue;
        };
        if new == fed || !same_trust(fed, new) {
            continue;
        }
        if let Some((task, alive)) = importer.take() {
            alive.store(false, std::sync::atomic::Ordering::Release);
            task.abort();
        }
        if new.exports_url == fed.exports_url && new.exports_addresses == fed.exports_addresses {
            // The same exports, validated the same way: only the gateway changes, in place
            // (no gap in which the imported Services vanish).
            let gateway = wire_gateway(new);
            out.imports.send_if_modified(|imports| {
                let Some(held) = imports.get(&new.trust_domain) else {
                    return false;
                };
                let mut next = imports.as_ref().clone();
                next.insert(
                    new.trust_domain.clone(),
                    services::Imported {
                        exports: held.exports.clone(),
                        gateway: gateway.clone(),
                    },
                );
                *imports = Arc::new(next);
                true
            });
        } else {
            drop_imports(&out.imports, &fed.trust_domain);
        }
        *fed = new.clone();
        *importer = spawn_importer(fed, out, metrics);
        tracing::info!(federation = %name, trust_domain = %fed.trust_domain, "federation's service import changed; its bundle stays");
    }
    let stale: Vec<String> = (tasks.iter())
        .filter(|(name, (fed, _, _))| wanted.get(*name) != Some(fed))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        if let Some((fed, fetcher, importer)) = tasks.remove(&name) {
            stop_fetcher(fetcher, held);
            if let Some((importer, alive)) = importer {
                alive.store(false, std::sync::atomic::Ordering::Release);
                importer.abort();
            }
            drop_imports(&out.imports, &fed.trust_domain);
            membrane_runtime::lock(held).remove(&fed.trust_domain);
            out.store.remove(&fed.trust_domain);
            let labels = TrustDomainLabels {
                trust_domain: fed.trust_domain.to_string(),
            };
            metrics.age.remove(&labels);
            metrics.sequence.remove(&labels);
            metrics.import_open.remove(&labels);
            tracing::info!(federation = %name, trust_domain = %fed.trust_domain, "federation removed or changed; its bundle is no longer trusted");
        }
    }
    for (name, fed) in wanted {
        if tasks.contains_key(&name) {
            continue;
        }
        if &fed.trust_domain == local {
            tracing::error!(federation = %name, trust_domain = %fed.trust_domain, "a TrustFederation cannot name the local trust domain; ignored");
            continue;
        }
        if let Some((other, _)) = tasks
            .iter()
            .find(|(_, (f, _, _))| f.trust_domain == fed.trust_domain)
        {
            tracing::error!(federation = %name, other = %other, trust_domain = %fed.trust_domain, "trust domain already federated by another TrustFederation; ignored");
            continue;
        }
        let start = initial(&name, &fed, out, metrics);
        if let Some(seq) = start.sequence {
            metrics
                .sequence
                .get_or_create(&TrustDomainLabels {
                    trust_domain: fed.trust_domain.to_string(),
                })
                .set(i64::try_from(seq).unwrap_or(i64::MAX));
        }
        membrane_runtime::lock(held).insert(fed.trust_domain.clone(), start);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = tokio::spawn(follow::follow(follow::Fetcher {
            fed: fed.clone(),
            held: held.clone(),
            alive: alive.clone(),
            out: out.bundles.clone(),
            store: out.store.clone(),
            metrics: metrics.clone(),
        }));
        // The importer looks the peer's bundle up when it connects: publish it first.
        publish(held, &out.bundles);
        let importer = spawn_importer(&fed, out, metrics);
        tasks.insert(name, (fed, (task, alive), importer));
    }
    publish(held, &out.bundles);
}

/// What a federation starts with: the bundle saved by an earlier run under the same trust
/// settings, else its bootstrap bundle.
fn initial(name: &str, fed: &TrustFederation, out: &Outputs, metrics: &FederationMetrics) -> Held {
    match out.store.load(fed) {
        Ok(Some(saved)) => {
            tracing::info!(federation = %name, trust_domain = %fed.trust_domain, url = %fed.url, age_s = saved.age.as_secs(), sequence = ?saved.sequence, "federation added; the bundle it last fetched is in force until the next fetch");
            return Held {
                since: Instant::now()
                    .checked_sub(saved.age)
                    .unwrap_or_else(Instant::now),
                bundle: saved.bundle,
                sequence: saved.sequence,
            };
        }
        Ok(None) => {
            tracing::info!(federation = %name, trust_domain = %fed.trust_domain, url = %fed.url, "federation added; its bootstrap bundle is in force until the first fetch");
        }
        Err(e) => {
            metrics.store_error(&fed.trust_domain, "load");
            tracing::warn!(federation = %name, trust_domain = %fed.trust_domain, error = %e, "the saved federated bundle cannot be used; the bootstrap bundle is in force until the first fetch");
        }
    }
    Held {
        bundle: fed.bootstrap.clone(),
        sequence: None,
        since: Instant::now(),
    }
}

/// Whether two versions of a federation trust the same way (trust domain, bundle endpoint,
/// its identity, bootstrap bundle): they may differ only in what is imported.
fn same_trust(a: &TrustFederation, b: &TrustFederation) -> bool {
    a.name == b.name
        && a.trust_domain == b.trust_domain
        && a.url == b.url
        && a.endpoint_id == b.endpoint_id
        && a.bootstrap == b.bootstrap
}

/// Withdraws what was imported from `td`.
fn drop_imports(imports: &watch::Sender<services::Imports>, td: &TrustDomain) {
    imports.send_if_modified(|imports| {
        if !imports.contains_key(td) {
            return false;
        }
        let mut next = imports.as_ref().clone();
        next.remove(td);
        *imports = Arc::new(next);
        true
    });
}

/// `spec.eastWestGateway` as the ztunnels receive it.
fn wire_gateway(fed: &TrustFederation) -> Option<membrane_proto::v1::NetworkGateway> {
    let gw = fed.east_west_gateway.as_ref()?;
    Some(membrane_proto::v1::NetworkGateway {
        address: gw.addr.to_string(),
        spiffe_id: gw.identity.to_string(),
    })
}

/// Starts `fed`'s importer, when it imports the peer's Services.
fn spawn_importer(
    fed: &TrustFederation,
    out: &Outputs,
    metrics: &FederationMetrics,
) -> Option<ImporterTask> {
    let url = fed.exports_url.clone()?;
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let task = tokio::spawn(
        importer::Importer {
            trust_domain: fed.trust_domain.clone(),
            url,
            peer_id: fed.endpoint_id.clone(),
            serving: out.serving.clone(),
            allowed: fed.exports_addresses.clone(),
            gateway: wire_gateway(fed),
            federated: out.bundles.subscribe(),
            out: out.imports.clone(),
            alive: alive.clone(),
            ends: metrics.import_ends.clone(),
            open: metrics.import_open.clone(),
        }
        .run(),
    );
    Some((task, alive))
}

/// Publishes the bundles held, if they changed.
fn publish(held: &HeldMap, out: &watch::Sender<Arc<Vec<TrustBundle>>>) {
    let bundles: Vec<TrustBundle> = membrane_runtime::lock(held)
        .values()
        .map(|h| h.bundle.clone())
        .collect();
    out.send_if_modified(|current| {
        if **current == bundles {
            return false;
        }
        *current = Arc::new(bundles);
        true
    });
}
