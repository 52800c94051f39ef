//! Policy status write-back: every `AuthorizationPolicy` and `EgressPolicy` object gets
//! `status.conditions` saying whether the controller accepted it, and why not.
//!
//! Conditions written (shaped like `metav1.Condition`, `observedGeneration` = the object's
//! `metadata.generation`):
//!
//! | type | status | reason | message |
//! |---|---|---|---|
//! | `Accepted` | `True` | `Accepted` | the policy is distributed to the ztunnels |
//! | `Accepted` | `False` | `Invalid` | every error as `<field path>: <problem>`, `; `-separated |
//! | `Enforced` | `True` | `LastValidVersion` or `DenyAllStandIn` | with `Accepted=False`: what the ztunnels enforce instead — the last valid version (its generation), or, when none was seen, an ALLOW-nothing stand-in for the object's selector or namespace |
//! | `Warning` | `True` | `L7FieldsIgnored`, `HostBitsCleared`, `NoRules` or `MultipleWarnings` | every warning as `<field path>: <text>` |
//!
//! `Warning` is present only when the accepted policy has warnings, so `kubectl wait
//! --for=condition=Warning` and the `Accepted` printer column both stay meaningful; the list
//! is written whole (a JSON merge patch of the status subresource replaces it), so a fixed
//! warning disappears. `lastTransitionTime` moves only when a condition's status changes.
//!
//! A status is written only when it would change: the desired conditions are compared with
//! the stored ones (ignoring `lastTransitionTime`), and a patch already made for the same
//! object version is not repeated while the watch catches up. Failed writes are retried at
//! the next renewal tick. Only the replica holding the `coordination.k8s.io/v1` Lease
//! ([`StatusConfig::lease_name`], renewed every [`StatusConfig::renew_period`]) writes;
//! every replica serves streams and certificates without it.

mod lease;

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use membrane_policy::{Warning, WarningKind};
use tokio_util::sync::CancellationToken;

use crate::crd::{AuthorizationPolicy, Condition, EgressPolicy};
use crate::metrics::StatusMetrics;
use crate::source::kube::{
    Fallback, PolicyKind, PolicyReport, PolicyReports, PolicyVerdict, ReportReceiver,
};

pub use lease::LeaseLock;

/// Condition type saying whether the policy is enforced.
pub const ACCEPTED: &str = "Accepted";
/// Condition type carrying validation warnings of an accepted policy.
pub const WARNING: &str = "Warning";
/// Condition type: what is enforced in place of an invalid policy.
pub const ENFORCED: &str = "Enforced";
/// Field manager of the status patches.
pub const FIELD_MANAGER: &str = "membrane-ca";
/// Longest condition message (Kubernetes' limit for `metav1.Condition.message`).
const MAX_MESSAGE: usize = 32 * 1024;

/// Who writes status, and how the Lease is kept.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's holder identity.
    pub identity: String,
    /// How long a holder that stops renewing keeps the Lease.
    pub lease_duration: Duration,
    /// How often the holder renews (and retries failed writes).
    pub renew_period: Duration,
    /// How often a replica without the Lease tries to take it.
    pub retry_period: Duration,
}

impl StatusConfig {
    /// Defaults (Lease `membrane-ca-status`, 15 s, renewed every 5 s) in `lease_namespace`,
    /// identity from `POD_NAME` (or `HOSTNAME`) plus a random suffix.
    pub fn new(lease_namespace: impl Into<String>) -> Self {
        let host = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "membrane-ca".to_owned());
        Self {
            lease_namespace: lease_namespace.into(),
            lease_name: "membrane-ca-status".to_owned(),
            identity: format!("{host}_{:08x}", rand::random::<u32>()),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Writes policy status while holding the Lease, until `cancel` fires (then releases it).
pub async fn run(
    client: Client,
    config: StatusConfig,
    mut reports: ReportReceiver,
    metrics: StatusMetrics,
    cancel: CancellationToken,
) {
    let mut lock = LeaseLock::new(client.clone(), &config);
    let mut writer = Writer::new(client, metrics.clone());
    let mut leader = false;
    let mut watching = true;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(next) => {
                let now_leader = lock.try_acquire_or_renew().await;
                if now_leader != leader {
                    tracing::info!(
                        lease = %config.lease_name,
                        namespace = %config.lease_namespace,
                        identity = %config.identity,
                        leader = now_leader,
                        "policy status Lease {}", if now_leader { "acquired" } else { "lost" }
                    );
                    leader = now_leader;
                    metrics.leader.set(i64::from(leader));
                }
                next = tokio::time::Instant::now()
                    + if leader { config.renew_period } else { config.retry_period };
                if leader {
                    let current = reports.borrow_and_update().clone();
                    writer.sync(current.as_deref()).await;
                }
            }
            changed = reports.changed(), if leader && watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let current = reports.borrow_and_update().clone();
                writer.sync(current.as_deref()).await;
            }
        }
    }
    if leader {
        lock.release().await;
        metrics.leader.set(0);
    }
}

/// The conditions `report` should carry; `lastTransitionTime` is kept from `report`'s
/// stored condition of the same type and status, else `now`.
pub fn desired_conditions(report: &PolicyReport, now: &str) -> Vec<Condition> {
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        let kept = report
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: truncate(message),
            observed_generation: report.generation,
            last_transition_time: Some(kept.unwrap_or_else(|| now.to_owned())),
        }
    };
    match &report.verdict {
        PolicyVerdict::Accepted { warnings } => {
            let mut out = vec![condition(
                ACCEPTED,
                "True",
                "Accepted",
                "the policy is valid and distributed to the ztunnels".to_owned(),
            )];
            if !warnings.is_empty() {
                out.push(condition(
                    WARNING,
                    "True",
                    warning_reason(warnings),
                    join(warnings.iter().map(Warning::to_string)),
                ));
            }
            out
        }
        PolicyVerdict::Invalid { errors, fallback } => {
            let (reason, message) = match fallback {
                Fallback::LastValid { generation } => (
                    "LastValidVersion",
                    match generation {
                        Some(g) => format!(
                            "this version is invalid; the last valid version (generation {g}) is still enforced"
                        ),
                        None => "this version is invalid; the last valid version is still enforced"
                            .to_owned(),
                    },
                ),
                Fallback::DenyAll { selector } => (
                    "DenyAllStandIn",
                    format!(
                        "no valid version seen; {} the workloads {} is denied until the policy is fixed",
                        match report.kind {
                            PolicyKind::Authorization => "every request to",
                            PolicyKind::Egress => "every connection leaving the mesh from",
                        },
                        if *selector {
                            "its selector matches"
                        } else {
                            "of its namespace"
                        }
                    ),
                ),
            };
            vec![
                condition(
                    ACCEPTED,
                    "False",
                    "Invalid",
                    join(errors.iter().map(|e| {
                        if e.path.is_empty() {
                            e.problem.to_string()
                        } else {
                            format!("{}: {}", e.path, e.problem)
                        }
                    })),
                ),
                condition(ENFORCED, "True", reason, message),
            ]
        }
    }
}

fn warning_reason(warnings: &[Warning]) -> &'static str {
    let reason = |w: &Warning| match w.kind {
        WarningKind::L7Field { .. } => "L7FieldsIgnored",
        WarningKind::HostBitsCleared { .. } => "HostBitsCleared",
        WarningKind::NoRules(_) => "NoRules",
        _ => "Warning",
    };
    let first = warnings.first().map_or("Warning", reason);
    if warnings.iter().all(|w| reason(w) == first) {
        first
    } else {
        "MultipleWarnings"
    }
}

fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join("; ")
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// Whether two condition lists say the same, ignoring `lastTransitionTime` and order.
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key = |list: &[Condition]| {
        let mut v: Vec<_> = list
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                    c.observed_generation,
                )
            })
            .collect();
        v.sort();
        v
    };
    key(a) == key(b)
}

/// What was last patched for one object: its uid and resourceVersion when seen, and the
/// conditions written.
type Written = (Option<String>, Option<String>, Vec<Condition>);

/// Patches status where it differs.
struct Writer {
    client: Client,
    metrics: StatusMetrics,
    written: BTreeMap<(PolicyKind, (String, String)), Written>,
}

impl Writer {
    fn new(client: Client, metrics: StatusMetrics) -> Self {
        Self {
            client,
            metrics,
            written: BTreeMap::new(),
        }
    }

    async fn sync(&mut self, reports: Option<&PolicyReports>) {
        let Some(reports) = reports else { return };
        self.written.retain(|key, _| reports.contains_key(key));
        let now = k8s_openapi::jiff::Timestamp::now()
            .round(k8s_openapi::jiff::Unit::Second)
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
            .to_string();
        for (key, report) in reports {
            let desired = desired_conditions(report, &now);
            if same_conditions(&report.conditions, &desired) {
                continue;
            }
            if let Some((uid, rv, conditions)) = self.written.get(key)
                && *uid == report.uid
                && *rv == report.resource_version
                && same_conditions(conditions, &desired)
            {
                // Patched already; the watch has not delivered the new version yet.
                continue;
            }
            if self.patch(report, &desired).await {
                self.written.insert(
                    key.clone(),
                    (report.uid.clone(), report.resource_version.clone(), desired),
                );
            }
        }
    }

    async fn patch(&self, report: &PolicyReport, conditions: &[Condition]) -> bool {
        let body = serde_json::json!({"status": {"conditions": conditions}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        let patch = Patch::Merge(&body);
        let (client, ns, name) = (self.client.clone(), &report.namespace, &report.name);
        let result = match report.kind {
            PolicyKind::Authorization => Api::<AuthorizationPolicy>::namespaced(client, ns)
                .patch_status(name, &params, &patch)
                .await
                .map(drop),
            PolicyKind::Egress => Api::<EgressPolicy>::namespaced(client, ns)
                .patch_status(name, &params, &patch)
                .await
                .map(drop),
        };
        let accepted = conditions
            .iter()
            .find(|c| c.type_ == ACCEPTED)
            .map_or("", |c| c.status.as_str());
        match result {
            Ok(()) => {
                self.metrics.write(true);
                tracing::info!(
                    kind = report.kind.as_str(),
                    policy = %format!("{}/{}", report.namespace, report.name),
                    accepted,
                    generation = report.generation,
                    "policy status written"
                );
                true
            }
            Err(e) => {
                self.metrics.write(false);
                tracing::warn!(
                    kind = report.kind.as_str(),
                    policy = %format!("{}/{}", report.namespace, report.name),
                    error = %e,
                    "cannot write policy status; retrying at the next renewal"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use membrane_policy::{Action, PolicyError, Problem};

    use super::*;

    fn report(verdict: PolicyVerdict, conditions: Vec<Condition>) -> PolicyReport {
        PolicyReport {
            kind: PolicyKind::Authorization,
            namespace: "ns".into(),
            name: "p".into(),
            uid: Some("u".into()),
            generation: Some(4),
            resource_version: Some("10".into()),
            conditions,
            verdict,
        }
    }

    #[test]
    fn invalid_policy_gets_accepted_false_with_paths() {
        let r = report(
            PolicyVerdict::Invalid {
                errors: vec![PolicyError {
                    document: None,
                    policy: Some("ns/p".into()),
                    path: "spec.rules[0].to[0].operation.ports[0]".into(),
                    problem: Problem::BadPort {
                        value: "0".into(),
                        reason: "must be 1-65535".into(),
                    },
                }],
                fallback: Fallback::LastValid {
                    generation: Some(3),
                },
            },
            vec![],
        );
        let c = desired_conditions(&r, "2026-01-01T00:00:00Z");
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[1].type_.as_str(), c[1].reason.as_str()),
            ("Enforced", "LastValidVersion")
        );
        assert!(c[1].message.contains("generation 3"), "{}", c[1].message);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            ("Accepted", "False")
        );
        assert_eq!(c[0].reason, "Invalid");
        assert!(
            c[0].message
                .starts_with("spec.rules[0].to[0].operation.ports[0]: bad port"),
            "{}",
            c[0].message
        );
        assert_eq!(c[0].observed_generation, Some(4));
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let warn = Warning {
            path: "spec.rules[0].to[0].operation.methods".into(),
            kind: WarningKind::L7Field {
                field: "methods".into(),
                action: Action::Allow,
            },
        };
        let accepted = PolicyVerdict::Accepted {
            warnings: vec![warn],
        };
        let first = desired_conditions(&report(accepted.clone(), vec![]), "T1");
        assert_eq!(first.len(), 2);
        assert_eq!(first[1].reason, "L7FieldsIgnored");
        let again = desired_conditions(&report(accepted, first.clone()), "T2");
        assert_eq!(again, first, "nothing changed: same conditions, same time");
        assert!(same_conditions(&first, &again));
        let now_clean = desired_conditions(
            &report(PolicyVerdict::Accepted { warnings: vec![] }, first.clone()),
            "T3",
        );
        assert_eq!(now_clean.len(), 1);
        assert_eq!(now_clean[0].last_transition_time.as_deref(), Some("T1"));
        assert!(!same_conditions(&first, &now_clean));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let cut = truncate("é".repeat(MAX_MESSAGE));
        assert!(cut.len() <= MAX_MESSAGE && cut.ends_with("..."));
    }
}
