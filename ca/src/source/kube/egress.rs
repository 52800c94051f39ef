//! EgressPolicy objects → validated `membrane_policy::egress::EgressPolicy` values for the
//! cluster state, and a [`PolicyReport`] per object for the status writer.
//!
//! Validation is `membrane_policy::egress` (the same code as `membrane policy check`, the
//! directory source and the ztunnels' re-validation). An invalid object never widens egress:
//! the last valid version of it stays enforced ([`super::policy::keep_last_valid`]), and
//! when none was seen a stand-in ([`crate::source::stand_in`]) is enforced — an ALLOW policy
//! without rules, which makes egress default-deny for the object's selector when that part is
//! valid, else its whole namespace. Dropping the object instead would let its pods pass
//! through.

use std::collections::BTreeMap;

use kube::ResourceExt;
use membrane_policy::egress::{EgressPolicy, check_egress_value, model::KIND};
use membrane_policy::model::MEMBRANE_API_VERSION;
use membrane_policy::{PolicyError, Problem};
use serde_json::{Value, json};

use super::convert::Key;
use super::policy::{Fallback, PolicyKind, PolicyReport, PolicyVerdict, dry_run_annotations};
use crate::crd;

/// A validated object: its report and what is enforced for it.
pub type EgressValue = (PolicyReport, Option<EgressPolicy>);

/// Validates one object.
pub fn egress(obj: crd::EgressPolicy) -> Option<(Key, EgressValue)> {
    let namespace = obj.namespace()?;
    let name = obj.metadata.name.clone()?;
    let annotations = dry_run_annotations(&obj);
    let selector = obj.spec.fields.get("selector").cloned();
    let document = |spec: Value, annotations: &BTreeMap<String, String>| {
        json!({
            "apiVersion": MEMBRANE_API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": spec,
        })
    };
    let (verdict, policy) = match check_egress_value(document(
        Value::Object(obj.spec.fields.clone()),
        &annotations,
    )) {
        Ok(policy) => (
            PolicyVerdict::Accepted {
                warnings: Vec::new(),
            },
            Some(policy),
        ),
        Err(errors) => {
            let errors: Vec<PolicyError> = errors
                .into_iter()
                .map(|e| PolicyError {
                    document: None,
                    policy: Some(e.policy),
                    path: e.path,
                    problem: Problem::Schema(e.message),
                })
                .collect();
            let (stand_in, by_selector) =
                crate::source::stand_in::egress(&namespace, &name, selector);
            let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(
                policy = %format_args!("{namespace}/{name}"),
                errors = errors.len(),
                first_error = %first,
                "EgressPolicy refused"
            );
            let fallback = Fallback::DenyAll {
                selector: by_selector,
            };
            (PolicyVerdict::Invalid { errors, fallback }, stand_in)
        }
    };
    let key = (namespace, name);
    let conditions = obj.status.map(|s| s.conditions).unwrap_or_default();
    let report = PolicyReport::new(PolicyKind::Egress, &key, &obj.metadata, conditions, verdict);
    Some((key, (report, policy)))
}

#[cfg(test)]
mod tests {
    use membrane_policy::egress::EgressAction;

    use super::*;

    fn object(spec: Value) -> crd::EgressPolicy {
        serde_json::from_value(json!({
            "apiVersion": "security.membrane.dev/v1",
            "kind": "EgressPolicy",
            "metadata": {"name": "hub", "namespace": "training", "uid": "u", "generation": 3},
            "spec": spec
        }))
        .expect("object")
    }

    #[test]
    fn a_valid_object_is_enforced_as_written() {
        let (key, (report, policy)) = egress(object(json!({
            "rules": [{"to": [{"hosts": ["HuggingFace.co."], "ports": [443]}]}],
            "budget": {"sentBytes": "1Gi", "per": "1h"}
        })))
        .expect("named");
        assert_eq!(key, ("training".to_owned(), "hub".to_owned()));
        assert!(matches!(report.verdict, PolicyVerdict::Accepted { .. }));
        let policy = policy.expect("valid");
        assert_eq!(policy.rules[0].to[0].hosts[0].to_string(), "huggingface.co");
        assert_eq!(report.kind, PolicyKind::Egress);
    }

    #[test]
    fn an_invalid_object_names_the_field_and_denies_its_scope() {
        let (_, (report, policy)) = egress(object(json!({
            "selector": {"matchLabels": {"app": "trainer"}},
            "rules": [{"to": [{"hosts": ["*"]}]}]
        })))
        .expect("named");
        let PolicyVerdict::Invalid { errors, fallback } = report.verdict else {
            panic!("invalid expected");
        };
        assert_eq!(errors[0].path, "spec.rules[0].to[0].hosts[0]", "{errors:?}");
        assert_eq!(fallback, Fallback::DenyAll { selector: true });
        let stand_in = policy.expect("a stand-in");
        assert_eq!(stand_in.action, EgressAction::Allow);
        assert!(stand_in.rules.is_empty(), "allows nothing");
        assert_eq!(
            stand_in.selector.get("app").map(String::as_str),
            Some("trainer")
        );
        // A broken selector: the whole namespace.
        let (_, (report, policy)) = egress(object(json!({"selector": 7}))).expect("named");
        assert!(matches!(
            report.verdict,
            PolicyVerdict::Invalid {
                fallback: Fallback::DenyAll { selector: false },
                ..
            }
        ));
        assert!(policy.expect("stand-in").selector.is_empty());
    }
}
