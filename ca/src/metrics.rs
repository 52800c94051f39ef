//! The controller's Prometheus metrics.
//!
//! Each module's metrics are a struct registered on the shared registry (`membrane_ca_` prefix).
//! Definitions only: the HTTP endpoint that serves them is [`crate::endpoint`].

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a signing request was refused (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No credential, or an unknown one.
    Unauthenticated,
    /// The identity is not scheduled on the caller's node.
    NotOnNode,
    /// A pod with the identity is on the node but not enrolled in the mesh.
    NotInMesh,
    /// The identity is the controller's own, which no node obtains.
    ReservedIdentity,
    /// The CSR failed validation.
    InvalidCsr,
    /// The workload source has not loaded yet.
    SourceNotReady,
    /// The node credential could not be checked (Kubernetes API unreachable).
    AuthUnavailable,
    /// The controller failed to sign.
    Internal,
}

impl RefusalReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::NotOnNode => "not_on_node",
            Self::NotInMesh => "not_in_mesh",
            Self::ReservedIdentity => "reserved_identity",
            Self::InvalidCsr => "invalid_csr",
            Self::SourceNotReady => "source_not_ready",
            Self::AuthUnavailable => "auth_unavailable",
            Self::Internal => "internal",
        }
    }
}

impl EncodeLabelValue for RefusalReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels of `membrane_ca_csr_refused_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why.
    pub reason: RefusalReason,
}

/// Certificate signing outcomes.
#[derive(Debug, Clone, Default)]
pub struct SignMetrics {
    /// Certificates issued.
    pub signed: Counter,
    /// Requests refused, by reason.
    pub refused: Family<RefusalLabels, Counter>,
}

impl SignMetrics {
    /// Registers the signing metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "certificates_signed",
            "X.509-SVIDs issued",
            m.signed.clone(),
        );
        registry.register(
            "csr_refused",
            "Certificate signing requests refused, by reason",
            m.refused.clone(),
        );
        m
    }

    /// Counts one refusal.
    pub fn refuse(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }
}

/// Workload source health.
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    /// Times a new state was published.
    pub reloads: Counter,
    /// Files whose newest version is rejected (their last good version is in force).
    pub file_errors: Gauge,
    /// Times the directory could not be listed.
    pub scan_failures: Counter,
    /// Kubernetes watch errors, by resource (each is retried with backoff).
    pub watch_errors: Family<ResourceLabels, Counter>,
    /// AuthorizationPolicies currently refused (not enforced; reported in their status).
    pub invalid_policies: Gauge,
    /// Kubernetes namespaces whose Membrane annotations are currently invalid (read in
    /// their narrowest meaning).
    pub invalid_annotations: Gauge,
    /// Invalid AuthorizationPolicies with no valid version seen, replaced by a deny-all
    /// stand-in for their scope (directory source: every policy of a file that never parsed,
    /// EgressPolicies included).
    pub deny_all_stand_ins: Gauge,
    /// Manifest files that never parsed and whose documents cannot all be identified (no
    /// stand-in can close their policies' scopes; the first state waits for them).
    pub unidentified_files: Gauge,
}

/// Labels of `membrane_ca_source_watch_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResourceLabels {
    /// The watched resource (`pods`, `endpointslices`, …).
    pub resource: &'static str,
}

impl SourceMetrics {
    /// Registers the source metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "source_reloads",
            "Workload source states published",
            m.reloads.clone(),
        );
        registry.register(
            "source_file_errors",
            "Manifest files currently rejected (last good version kept)",
            m.file_errors.clone(),
        );
        registry.register(
            "source_scan_failures",
            "Failed scans of the manifest directory",
            m.scan_failures.clone(),
        );
        registry.register(
            "source_watch_errors",
            "Kubernetes watch errors, by resource (retried with backoff; the last state stays)",
            m.watch_errors.clone(),
        );
        registry.register(
            "source_invalid_policies",
            "AuthorizationPolicies currently refused by validation (their last valid version, or a deny-all stand-in, is enforced instead)",
            m.invalid_policies.clone(),
        );
        registry.register(
            "source_invalid_annotations",
            "Namespaces whose Membrane annotations are invalid (membrane.dev/plaintext-udp-ports: no port exempted)",
            m.invalid_annotations.clone(),
        );
        registry.register(
            "source_policy_deny_all_stand_ins",
            "Invalid AuthorizationPolicies with no valid version seen, enforced as deny-all for their scope (directory source: every policy of a manifest file that never parsed)",
            m.deny_all_stand_ins.clone(),
        );
        registry.register(
            "source_unidentified_files",
            "Manifest files that never parsed and whose documents cannot be identified (the first state is withheld while any exists)",
            m.unidentified_files.clone(),
        );
        m
    }

    /// Counts one watch error of `resource`.
    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }
}

/// Labels with an outcome (`ok`, `failed`, `unauthenticated`, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// Policy status write-back.
#[derive(Debug, Clone, Default)]
pub struct StatusMetrics {
    /// Status patches, by outcome (`ok`, `failed`).
    pub writes: Family<OutcomeLabels, Counter>,
    /// 1 while this replica holds the status Lease (and so writes status), else 0.
    pub leader: Gauge,
}

impl StatusMetrics {
    /// Registers the status metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "policy_status_writes",
            "AuthorizationPolicy status patches, by outcome",
            m.writes.clone(),
        );
        registry.register(
            "policy_status_leader",
            "1 while this replica holds the status Lease",
            m.leader.clone(),
        );
        m
    }

    /// Counts one status write.
    pub fn write(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.writes.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Kubernetes node authentication (TokenReview).
#[derive(Debug, Clone, Default)]
pub struct TokenReviewMetrics {
    /// Node credentials checked, by outcome (`authenticated`, `cached`, `cached_refusal`,
    /// `unauthenticated`, `wrong_account`, `no_node_binding`, `unavailable`, and `busy`: not
    /// reviewed because too many reviews were in flight).
    pub results: Family<OutcomeLabels, Counter>,
}

impl TokenReviewMetrics {
    /// Registers the TokenReview metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tokenreview_results",
            "Node credentials checked with TokenReview, by outcome (busy: refused, too many reviews in flight)",
            m.results.clone(),
        );
        m
    }

    /// Counts one result.
    pub fn result(&self, outcome: &'static str) {
        self.results.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// A new registry with Membrane's controller prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("membrane_ca")
}
