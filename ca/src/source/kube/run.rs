//! The source's task: one watcher per resource merged into one stream, the caches, and the
//! coalesced publication of snapshots.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{BoxStream, SelectAll, StreamExt};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::DynamicObject;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cache::{Cache, Change};
use super::convert::{self, Key, Slice};
use super::egress::{self, EgressValue};
use super::federation::{self, FederationValue};
use super::gateway_api;
use super::policy::{self, Fallback, PolicyKind, PolicyReport, PolicyReports, PolicyVerdict};
use super::{KubeSourceConfig, ReportSender, StateSender};
use crate::crd::AuthorizationPolicy;
use crate::metrics::SourceMetrics;
use crate::source::model::{ClusterState, Namespace, Pod, PolicyEntry, Service, ServiceAccount};

/// How long after the first change of a quiet period the snapshot is taken, so that the rest
/// of a burst read in one go lands in the same snapshot.
const SETTLE: Duration = Duration::from_millis(10);
/// How often a source still waiting for its initial lists says which.
const WAITING_LOG_PERIOD: Duration = Duration::from_secs(10);

type PolicyValue = (PolicyReport, Option<PolicyEntry>);

/// One converted watcher event, or a watcher error.
enum Update {
    Namespace(Change<String, Namespace>),
    Pod(Change<Key, Pod>),
    ServiceAccount(Change<Key, ServiceAccount>),
    Service(Change<Key, Service>),
    Slice(Change<Key, Slice>),
    Policy(Change<Key, PolicyValue>),
    Egress(Change<Key, EgressValue>),
    Gateway(Change<Key, membrane_policy::gateway::Gateway>),
    TcpRoute(Change<Key, membrane_policy::gateway::Route>),
    TlsRoute(Change<Key, membrane_policy::gateway::Route>),
    Federation(Change<String, FederationValue>),
    Error(&'static str, watcher::Error),
    /// An object without name or namespace (never sent by an API server).
    Skip,
}

/// Watches `api` and converts each event with `convert` (the key comes from `key`, so a
/// deleted or unconvertible object still removes its predecessor).
fn watch<K, Q, V>(
    api: Api<K>,
    resource: &'static str,
    key: fn(&K) -> Option<Q>,
    convert: fn(K) -> Option<(Q, V)>,
    wrap: fn(Change<Q, V>) -> Update,
) -> BoxStream<'static, Update>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Q: Send + 'static,
    V: Send + 'static,
{
    let value = move |obj: K| convert(obj).map(|(_, v)| v);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| {
            let change = match event {
                Err(e) => return Update::Error(resource, e),
                Ok(Event::Init) => Change::Init,
                Ok(Event::InitDone) => Change::InitDone,
                Ok(Event::InitApply(obj)) => match key(&obj) {
                    Some(k) => Change::InitApply(k, value(obj)),
                    None => return Update::Skip,
                },
                Ok(Event::Apply(obj)) => match key(&obj) {
                    Some(k) => Change::Apply(k, value(obj)),
                    None => return Update::Skip,
                },
                Ok(Event::Delete(obj)) => match key(&obj) {
                    Some(k) => Change::Delete(k),
                    None => return Update::Skip,
                },
            };
            wrap(change)
        })
        .boxed()
}

fn streams(client: &Client) -> SelectAll<BoxStream<'static, Update>> {
    futures_util::stream::select_all([
        watch::<core::Namespace, _, _>(
            Api::all(client.clone()),
            "namespaces",
            convert::namespace_key,
            convert::namespace,
            Update::Namespace,
        ),
        watch::<core::Pod, _, _>(
            Api::all(client.clone()),
            "pods",
            convert::key,
            convert::pod,
            Update::Pod,
        ),
        watch::<core::ServiceAccount, _, _>(
            Api::all(client.clone()),
            "serviceaccounts",
            convert::key,
            convert::service_account,
            Update::ServiceAccount,
        ),
        watch::<core::Service, _, _>(
            Api::all(client.clone()),
            "services",
            convert::key,
            convert::service,
            Update::Service,
        ),
        watch::<discovery::EndpointSlice, _, _>(
            Api::all(client.clone()),
            "endpointslices",
            convert::key,
            convert::endpoint_slice,
            Update::Slice,
        ),
        watch::<AuthorizationPolicy, _, _>(
            Api::all(client.clone()),
            "authorizationpolicies",
            convert::key,
            policy::policy,
            Update::Policy,
        ),
        watch::<crate::crd::EgressPolicy, _, _>(
            Api::all(client.clone()),
            "egresspolicies",
            convert::key,
            egress::egress,
            Update::Egress,
        ),
        watch::<crate::crd::TrustFederation, _, _>(
            Api::all(client.clone()),
            "trustfederations",
            federation::key,
            federation::federation,
            Update::Federation,
        ),
        watch::<DynamicObject, _, _>(
            Api::all_with(
                client.clone(),
                &gateway_api::api_resource(gateway_api::GATEWAYS),
            ),
            gateway_api::GATEWAYS,
            gateway_api::key,
            gateway_api::gateway,
            Update::Gateway,
        ),
        watch::<DynamicObject, _, _>(
            Api::all_with(
                client.clone(),
                &gateway_api::api_resource(gateway_api::TCP_ROUTES),
            ),
            gateway_api::TCP_ROUTES,
            gateway_api::key,
            gateway_api::route,
            Update::TcpRoute,
        ),
        watch::<DynamicObject, _, _>(
            Api::all_with(
                client.clone(),
                &gateway_api::api_resource(gateway_api::TLS_ROUTES),
            ),
            gateway_api::TLS_ROUTES,
            gateway_api::key,
            gateway_api::route,
            Update::TlsRoute,
        ),
    ])
}

#[derive(Default)]
struct Caches {
    namespaces: Cache<String, Namespace>,
    pods: Cache<Key, Pod>,
    service_accounts: Cache<Key, ServiceAccount>,
    services: Cache<Key, Service>,
    slices: Cache<Key, Slice>,
    policies: Cache<Key, PolicyValue>,
    egress: Cache<Key, EgressValue>,
    gateways: Cache<Key, membrane_policy::gateway::Gateway>,
    tcp_routes: Cache<Key, membrane_policy::gateway::Route>,
    tls_routes: Cache<Key, membrane_policy::gateway::Route>,
    federations: Cache<String, FederationValue>,
    /// `KubeSourceConfig::pod_networks`, set on every state.
    pod_networks: Vec<membrane_policy::IpNet>,
}

impl Caches {
    /// Applies one converted event; `true` when something visible changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Namespace(c) => self.namespaces.apply(c),
            Update::Pod(c) => self.pods.apply(c),
            Update::ServiceAccount(c) => self.service_accounts.apply(c),
            Update::Service(c) => self.services.apply(c),
            Update::Slice(c) => self.slices.apply(c),
            Update::Policy(c) => {
                // An invalid edit keeps the last valid version enforced (never "no policy").
                let c = match c {
                    Change::Apply(k, Some(v)) => {
                        let v = policy::keep_last_valid(self.policies.items().get(&k), v);
                        Change::Apply(k, Some(v))
                    }
                    Change::InitApply(k, Some(v)) => {
                        let v = policy::keep_last_valid(self.policies.items().get(&k), v);
                        Change::InitApply(k, Some(v))
                    }
                    other => other,
                };
                self.policies.apply(c)
            }
            Update::Egress(c) => {
                // As above: an invalid edit keeps the last valid version enforced.
                let c = match c {
                    Change::Apply(k, Some(v)) => {
                        let v = policy::keep_last_valid(self.egress.items().get(&k), v);
                        Change::Apply(k, Some(v))
                    }
                    Change::InitApply(k, Some(v)) => {
                        let v = policy::keep_last_valid(self.egress.items().get(&k), v);
                        Change::InitApply(k, Some(v))
                    }
                    other => other,
                };
                self.egress.apply(c)
            }
            Update::Gateway(c) => self.gateways.apply(c),
            Update::TcpRoute(c) => self.tcp_routes.apply(c),
            Update::TlsRoute(c) => self.tls_routes.apply(c),
            Update::Federation(c) => {
                // An invalid edit keeps the last valid version in force.
                let c = match c {
                    Change::Apply(k, Some(v)) => {
                        let v = federation::keep_last_valid(self.federations.items().get(&k), v);
                        Change::Apply(k, Some(v))
                    }
                    Change::InitApply(k, Some(v)) => {
                        let v = federation::keep_last_valid(self.federations.items().get(&k), v);
                        Change::InitApply(k, Some(v))
                    }
                    other => other,
                };
                self.federations.apply(c)
            }
            Update::Error(..) | Update::Skip => false,
        }
    }

    /// An optional resource's API is not served (its CRD is not installed): it counts as
    /// listed and empty. `true` when that changed something.
    fn absent(&mut self, resource: &str) -> bool {
        fn empty<V: PartialEq>(cache: &mut Cache<Key, V>) -> bool {
            cache.apply(Change::Init);
            cache.apply(Change::InitDone)
        }
        match resource {
            gateway_api::GATEWAYS => empty(&mut self.gateways),
            gateway_api::TCP_ROUTES => empty(&mut self.tcp_routes),
            gateway_api::TLS_ROUTES => empty(&mut self.tls_routes),
            "trustfederations" => {
                self.federations.apply(Change::Init);
                self.federations.apply(Change::InitDone)
            }
            _ => false,
        }
    }

    /// Resources whose first list is not complete yet.
    fn waiting(&self) -> Vec<&'static str> {
        let ready = [
            self.namespaces.ready(),
            self.pods.ready(),
            self.service_accounts.ready(),
            self.services.ready(),
            self.slices.ready(),
            self.policies.ready(),
            self.egress.ready(),
            self.gateways.ready(),
            self.tcp_routes.ready(),
            self.tls_routes.ready(),
            self.federations.ready(),
        ];
        super::RESOURCES
            .into_iter()
            .zip(ready)
            .filter_map(|(name, ready)| (!ready).then_some(name))
            .collect()
    }

    fn state(&self) -> ClusterState {
        ClusterState {
            namespaces: self.namespaces.items().clone(),
            pods: self.pods.items().clone(),
            service_accounts: self.service_accounts.items().clone(),
            services: convert::join(self.services.items(), self.slices.items()),
            policies: self
                .policies
                .items()
                .iter()
                .filter_map(|(k, (_, entry))| Some((k.clone(), entry.clone()?)))
                .collect(),
            egress_policies: self
                .egress
                .items()
                .iter()
                .filter_map(|(k, (_, policy))| Some((k.clone(), policy.clone()?)))
                .collect(),
            gateways: self.gateways.items().clone(),
            routes: self
                .tcp_routes
                .items()
                .iter()
                .chain(self.tls_routes.items())
                .map(|(k, r)| (gateway_api::route_key(k, r), r.clone()))
                .collect(),
            federations: self
                .federations
                .items()
                .iter()
                .filter_map(|(k, f)| Some((k.clone(), f.clone()?)))
                .collect(),
            pod_networks: self.pod_networks.clone(),
        }
    }

    fn reports(&self) -> PolicyReports {
        let authorization = self
            .policies
            .items()
            .iter()
            .map(|(k, (report, _))| ((PolicyKind::Authorization, k.clone()), report.clone()));
        let egress = self
            .egress
            .items()
            .iter()
            .map(|(k, (report, _))| ((PolicyKind::Egress, k.clone()), report.clone()));
        authorization.chain(egress).collect()
    }
}

/// Watches the cluster through `client` until `cancel` fires, publishing complete states on
/// `tx` and policy reports on `reports` (see the module docs for when).
pub async fn run(
    client: Client,
    config: KubeSourceConfig,
    tx: StateSender,
    reports: ReportSender,
    metrics: SourceMetrics,
    cancel: CancellationToken,
) {
    let mut updates = streams(&client);
    let mut caches = Caches {
        pod_networks: config.pod_networks.clone(),
        ..Caches::default()
    };
    let mut synced = false;
    // When the pending change should be published; `None`: nothing pending.
    let mut due: Option<Instant> = None;
    let mut last_published: Option<Instant> = None;
    let mut waiting_log = tokio::time::interval(WAITING_LOG_PERIOD);
    waiting_log.reset();
    loop {
        if let Some(at) = due
            && synced
            && Instant::now() >= at
        {
            publish(&caches, &tx, &reports, &metrics);
            due = None;
            last_published = Some(Instant::now());
        }
        let timer = async {
            match due {
                Some(at) if synced => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            update = updates.next() => {
                let Some(update) = update else {
                    tracing::error!("every Kubernetes watcher ended; the source stops");
                    return;
                };
                if let Update::Error(resource, e) = &update {
                    let optional = gateway_api::OPTIONAL.contains(resource)
                        || *resource == "trustfederations";
                    if optional && not_served(e) {
                        // No Gateway API or TrustFederation CRD: none of them, and the rest
                        // is published.
                        if caches.absent(resource) {
                            tracing::info!(resource, "optional resource not served (CRD not installed); treated as empty, still watched");
                        } else {
                            continue;
                        }
                    } else {
                        watch_error(resource, e, &metrics);
                        continue;
                    }
                } else if !caches.apply(update) {
                    continue;
                }
                if !synced && caches.waiting().is_empty() {
                    synced = true;
                    let state = caches.state();
                    tracing::info!(
                        namespaces = state.namespaces.len(),
                        pods = state.pods.len(),
                        service_accounts = state.service_accounts.len(),
                        services = state.services.len(),
                        policies = state.policies.len(),
                        egress_policies = state.egress_policies.len(),
                        "Kubernetes source synced"
                    );
                    due = Some(Instant::now());
                } else if due.is_none() {
                    let settle = Instant::now() + SETTLE.min(config.coalesce);
                    let spaced = last_published.map(|t| t + config.coalesce);
                    due = Some(spaced.map_or(settle, |s| s.max(settle)));
                }
            }
            () = timer => {}
            _ = waiting_log.tick(), if !synced => {
                tracing::warn!(
                    waiting_for = ?caches.waiting(),
                    "Kubernetes source still waiting for initial lists; nothing is published yet"
                );
            }
        }
    }
}

/// Whether a watch failed because the API server does not serve the resource (404).
fn not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 404
    )
}

fn watch_error(resource: &'static str, e: &watcher::Error, metrics: &SourceMetrics) {
    metrics.watch_error(resource);
    let hint = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => match s.code {
            404 if resource == "authorizationpolicies" => {
                "is the AuthorizationPolicy CRD (security.membrane.dev) installed?"
            }
            404 if resource == "egresspolicies" => {
                "is the EgressPolicy CRD (security.membrane.dev) installed? (charts/membrane/crds)"
            }
            404 if resource == "trustfederations" => {
                "the TrustFederation CRD (charts/membrane/crds) is not installed: no federation"
            }
            401 | 403 => "check the controller's RBAC",
            _ => "",
        },
        _ => "",
    };
    if matches!(e, watcher::Error::WatchError(s) if s.code == 410) {
        // The resource version expired (etcd compaction): routine, the watcher relists.
        tracing::info!(resource, error = %e, "Kubernetes watch expired; relisting");
        return;
    }
    tracing::warn!(
        resource,
        error = %e,
        hint,
        "Kubernetes watch failed; retrying with backoff, the last state stays"
    );
}

fn publish(caches: &Caches, tx: &StateSender, reports_tx: &ReportSender, metrics: &SourceMetrics) {
    let state = caches.state();
    let reports = caches.reports();
    let invalid = reports
        .values()
        .filter(|r| matches!(r.verdict, PolicyVerdict::Invalid { .. }))
        .count();
    metrics
        .invalid_policies
        .set(i64::try_from(invalid).unwrap_or(i64::MAX));
    let invalid_annotations = state
        .namespaces
        .values()
        .filter(|ns| {
            ns.annotations
                .get(crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION)
                .is_some_and(|v| crate::source::parse_plaintext_udp_ports(v).is_err())
        })
        .count();
    metrics
        .invalid_annotations
        .set(i64::try_from(invalid_annotations).unwrap_or(i64::MAX));
    let stand_ins = reports
        .values()
        .filter(|r| {
            matches!(
                r.verdict,
                PolicyVerdict::Invalid {
                    fallback: Fallback::DenyAll { .. },
                    ..
                }
            )
        })
        .count();
    metrics
        .deny_all_stand_ins
        .set(i64::try_from(stand_ins).unwrap_or(i64::MAX));
    let counts = (
        state.namespaces.len(),
        state.pods.len(),
        state.services.len(),
        state.policies.len(),
    );
    let mut state = Some(state);
    let published = tx.send_if_modified(|current| {
        if current.as_deref() == state.as_ref() {
            return false;
        }
        *current = state.take().map(Arc::new);
        true
    });
    if published {
        metrics.reloads.inc();
        tracing::debug!(
            namespaces = counts.0,
            pods = counts.1,
            services = counts.2,
            policies = counts.3,
            invalid_policies = invalid,
            "Kubernetes source published a new state"
        );
    }
    let mut reports = Some(reports);
    reports_tx.send_if_modified(|current| {
        if current.as_deref() == reports.as_ref() {
            return false;
        }
        *current = reports.take().map(Arc::new);
        true
    });
}
