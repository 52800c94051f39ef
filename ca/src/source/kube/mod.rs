//! The Kubernetes source: the cluster state from the API server, through `kube::runtime`
//! watchers.
//!
//! Watched (cluster-wide, list + watch with the watcher's default backoff): Namespaces, Pods,
//! ServiceAccounts, Services, `discovery.k8s.io/v1` EndpointSlices and Membrane's
//! `security.membrane.dev/v1` AuthorizationPolicy and EgressPolicy ([`crate::crd`];
//! [`policy`], [`egress`]), and, when their CRDs are installed, the Gateway API's `Gateway`,
//! `TCPRoute` and `TLSRoute` ([`gateway_api`]; absent CRDs count as no objects), and
//! `TrustFederation` ([`federation`]; cluster-scoped; an absent CRD counts as no federation,
//! an invalid version keeps the last valid one in force). Istio's
//! `security.istio.io` AuthorizationPolicies are *not* read from the API (the directory source
//! and `membrane policy check` accept them as files): watching a second group would need its
//! CRD installed and would race istiod for their status.
//!
//! Each watcher feeds a [`cache::Cache`] of objects already converted to the model
//! ([`convert`], [`policy`]). The state is rebuilt from the caches and published on the
//! `watch` channel:
//!
//! - only once **every** watcher has completed its initial list — until then `None` stays
//!   published, so nothing is authorized against half a cluster;
//! - **coalesced**: after a change, at most one snapshot per [`KubeSourceConfig::coalesce`]
//!   (100 ms by default), a few milliseconds after the first change so a burst delivered in
//!   one read lands in one snapshot; a burst of 1,000 pod events gives a handful of snapshots;
//! - only when it differs from the one published (a status-only change of a policy publishes
//!   nothing new).
//!
//! Alongside the state, a [`PolicyReports`] map (every AuthorizationPolicy and EgressPolicy
//! object with its verdict, valid or not) is published for the status writer ([`crate::status`]).
//!
//! A watch error is logged with the resource and the error, counted in
//! `membrane_ca_source_watch_errors_total{resource}`, and retried with backoff; the last
//! state stays published meanwhile. A relist after a gap replaces that resource's objects
//! whole.

pub mod cache;
pub mod convert;
pub mod egress;
pub mod federation;
pub mod gateway_api;
pub mod policy;
mod run;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use policy::{Fallback, PolicyKind, PolicyReport, PolicyReports, PolicyVerdict};
pub use run::run;

use super::ClusterState;

/// Where the state is published (the directory source uses the same channel type).
pub type StateSender = watch::Sender<Option<Arc<ClusterState>>>;
/// Where policy reports are published (`None` until the first complete list).
pub type ReportSender = watch::Sender<Option<Arc<PolicyReports>>>;
/// The receiving end of [`ReportSender`].
pub type ReportReceiver = watch::Receiver<Option<Arc<PolicyReports>>>;

/// Tuning of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    /// Shortest interval between two published snapshots.
    pub coalesce: Duration,
    /// The networks pod addresses are allocated from; empty: not checked
    /// ([`crate::source::ClusterState::pod_networks`]).
    pub pod_networks: Vec<membrane_policy::IpNet>,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            coalesce: Duration::from_millis(100),
            pod_networks: Vec::new(),
        }
    }
}

/// The resources watched, as named in logs and in the `resource` metric label.
pub const RESOURCES: [&str; 11] = [
    "namespaces",
    "pods",
    "serviceaccounts",
    "services",
    "endpointslices",
    "authorizationpolicies",
    "egresspolicies",
    gateway_api::GATEWAYS,
    gateway_api::TCP_ROUTES,
    gateway_api::TLS_ROUTES,
    "trustfederations",
];
