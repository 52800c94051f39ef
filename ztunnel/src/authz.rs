//! Authorization of inbound connections against identity-based AuthorizationPolicy.
//!
//! The ztunnel holds the current compiled [`PolicyIndex`] in a `watch` channel, fed by the
//! controller's discovery stream ([`crate::discovery`]) or, in local mode, by a file of
//! AuthorizationPolicy documents (the same YAML operators write), reloaded when it changes; a
//! broken file is reported and the last good policy stays in force. Every decision is counted
//! (`membrane_authorization_decisions_total{verdict, policy}`) and carried into the
//! connection's access record. When the policy changes, open connections are decided again
//! and the ones no longer allowed are closed ([`crate::conntrack`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_identity::TrustDomain;
use membrane_policy::compile::PolicyIndex;
use membrane_policy::eval::{Decision, Request, Source, Verdict, decide};
use membrane_policy::policy::Action;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::conntrack::{ConnAttrs, OpenConnections};

/// Labels of the decision counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// `namespace/name` of the deciding policy, or `none` (no policy decided).
    pub policy: String,
}

/// Authorization metrics.
#[derive(Debug, Clone, Default)]
pub struct AuthzMetrics {
    decisions: Family<DecisionLabels, Counter>,
    reloads_failed: Counter,
    closed_by_policy: Counter,
}

impl AuthzMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "authorization_decisions",
            "Authorization decisions, by verdict and deciding policy",
            m.decisions.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy file versions rejected (the last good policy stays in force)",
            m.reloads_failed.clone(),
        );
        registry.register(
            "connections_closed_by_policy",
            "Open connections closed because a policy change no longer allows them",
            m.closed_by_policy.clone(),
        );
        m
    }
}

/// What an access record says about authorization.
#[derive(Debug, Clone)]
pub struct DecisionSummary {
    /// Allow or deny.
    pub verdict: Verdict,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// Index of the deciding rule.
    pub rule: Option<usize>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
    /// Dry-run policies that would have matched.
    pub dry_run: Vec<String>,
}

impl DecisionSummary {
    /// Whether the connection is admitted.
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// The verdict as records and metric labels spell it: `allow` or `deny`.
fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

impl From<DecisionSummary> for membrane_api::access::Authorization {
    fn from(d: DecisionSummary) -> Self {
        Self {
            verdict: verdict_label(d.verdict).into(),
            policy: d.policy,
            rule: d.rule,
            audit: d.audit,
            dry_run: d.dry_run,
        }
    }
}

/// Decides connections against the current policy.
#[derive(Debug, Clone)]
pub struct Authorizer {
    index: watch::Receiver<Arc<PolicyIndex>>,
    metrics: AuthzMetrics,
}

fn summarize(d: &Decision) -> DecisionSummary {
    DecisionSummary {
        verdict: d.verdict,
        policy: d
            .policy
            .as_ref()
            .map(|p| format!("{}/{}", p.namespace, p.name)),
        rule: d.rule,
        audit: d
            .audit
            .iter()
            .map(|m| format!("{}/{}", m.policy.namespace, m.policy.name))
            .collect(),
        dry_run: d
            .dry_run
            .iter()
            .filter(|m| m.would_match)
            .map(|m| format!("{}/{}", m.policy.namespace, m.policy.name))
            .collect(),
    }
}

impl Authorizer {
    /// An authorizer over a policy channel.
    pub fn new(index: watch::Receiver<Arc<PolicyIndex>>, metrics: AuthzMetrics) -> Self {
        Self { index, metrics }
    }

    fn evaluate(&self, attrs: &ConnAttrs) -> Decision {
        let index = self.index.borrow().clone();
        Self::evaluate_with(&index, attrs)
    }

    fn evaluate_with(index: &PolicyIndex, attrs: &ConnAttrs) -> Decision {
        let mut principal = String::new();
        let source = attrs
            .source
            .as_ref()
            .map(|id| Source::from_identity(id, &mut principal));
        let request = Request {
            source,
            source_ip: attrs.source_ip,
            remote_ip: attrs.remote_ip,
            destination_namespace: &attrs.destination.namespace,
            destination_labels: &attrs.destination.labels,
            destination_ip: attrs.destination_ip,
            destination_port: attrs.destination_port,
        };
        decide(index, &request)
    }

    /// `namespace/name` of every policy in force on this node.
    pub fn policy_names(&self) -> Vec<String> {
        self.index
            .borrow()
            .policies()
            .iter()
            .map(|p| format!("{}/{}", p.namespace(), p.name()))
            .collect()
    }

    /// Decides a new connection; counts the decision.
    pub fn authorize(&self, attrs: &ConnAttrs) -> DecisionSummary {
        let summary = summarize(&self.evaluate(attrs));
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict_label(summary.verdict),
                policy: summary.policy.clone().unwrap_or_else(|| "none".into()),
            })
            .inc();
        summary
    }

    /// Re-decides every open connection; closes those now denied, naming the deciding DENY
    /// policy or the ALLOW policies none of which matches any more. Returns how many closed.
    pub fn recheck(&self, open: &OpenConnections) -> usize {
        let index = self.index.borrow().clone();
        let closed = open.recheck(|attrs| {
            let d = Self::evaluate_with(&index, attrs);
            if d.verdict == Verdict::Allow {
                return Ok(());
            }
            Err(match d.policy {
                Some(p) => format!("denied by {}/{}", p.namespace, p.name),
                None => {
                    let allows: Vec<String> = index
                        .policies_for(&attrs.destination.namespace, &attrs.destination.labels)
                        .filter(|p| p.action == Action::Allow && !p.dry_run)
                        .map(|p| format!("{}/{}", p.namespace(), p.name()))
                        .collect();
                    format!("no longer matched by ALLOW policy {}", allows.join(", "))
                }
            })
        });
        self.metrics.closed_by_policy.inc_by(closed as u64);
        closed
    }
}

/// Loads a policy file: every AuthorizationPolicy document in it, compiled for the local
/// `trust_domain`.
pub fn load_policies(path: &Path, trust_domain: &TrustDomain) -> Result<PolicyIndex, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let checked = membrane_policy::validate::parse_policies(&text).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    for c in &checked {
        for w in &c.warnings {
            tracing::warn!(file = %path.display(), warning = %w, "policy warning");
        }
    }
    Ok(PolicyIndex::build_for(
        checked.into_iter().map(|c| c.policy),
        membrane_policy::DEFAULT_ROOT_NAMESPACE,
        trust_domain,
    ))
}

/// Watches `path` (polling its modification time and size) and publishes every valid new
/// version; after each publication, open connections are re-checked.
pub async fn watch_policy_file(
    path: PathBuf,
    trust_domain: TrustDomain,
    tx: watch::Sender<Arc<PolicyIndex>>,
    authorizer: Authorizer,
    open: Arc<OpenConnections>,
    metrics: AuthzMetrics,
    cancel: CancellationToken,
) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut last = stamp(&path);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_policies(&path, &trust_domain) {
            Ok(index) => {
                tx.send_replace(Arc::new(index));
                let closed = authorizer.recheck(&open);
                tracing::info!(file = %path.display(), closed, "policy reloaded");
            }
            Err(e) => {
                metrics.reloads_failed.inc();
                tracing::warn!(error = %e, "policy file rejected; keeping the last good policy");
            }
        }
    }
}

/// An empty policy set: every connection is allowed (no ALLOW policy applies).
pub fn empty_index() -> PolicyIndex {
    PolicyIndex::build(Vec::new(), membrane_policy::DEFAULT_ROOT_NAMESPACE)
}
