//! AuthorizationPolicy objects → validated [`PolicyEntry`]s for the cluster state, and a
//! [`PolicyReport`] per object for the status writer.
//!
//! The spec is typed and validated by `membrane_policy` exactly as `membrane policy check`
//! does it (same model, same field paths). An invalid policy is left out of the state — the
//! ztunnels never see it — and its report carries every error.

use std::collections::BTreeMap;

use kube::ResourceExt;
use membrane_policy::model::{
    DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION, KIND, MEMBRANE_API_VERSION,
};
use membrane_policy::{PolicyError, Warning};
use serde_json::{Value, json};

use super::convert::Key;
use crate::crd::{AuthorizationPolicy, Condition};
use crate::source::model::PolicyEntry;

/// What the controller concluded about one policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// Valid: enforced, with what the author should know.
    Accepted {
        /// Accepted but noteworthy fields (L7 fields, …).
        warnings: Vec<Warning>,
    },
    /// Refused: not enforced.
    Invalid {
        /// Every problem found, each with its field path.
        errors: Vec<PolicyError>,
    },
}

/// One AuthorizationPolicy object as last seen, and the verdict on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation` (what `observedGeneration` refers to).
    pub generation: Option<i64>,
    /// `metadata.resourceVersion` of the object seen.
    pub resource_version: Option<String>,
    /// `status.conditions` as stored.
    pub conditions: Vec<Condition>,
    /// The verdict.
    pub verdict: PolicyVerdict,
}

/// Every AuthorizationPolicy object by `(namespace, name)`, valid or not.
pub type PolicyReports = BTreeMap<Key, PolicyReport>;

/// Validates one object: the report, and the entry for the state when it is valid.
pub fn policy(obj: AuthorizationPolicy) -> Option<(Key, (PolicyReport, Option<PolicyEntry>))> {
    let namespace = obj.namespace()?;
    let name = obj.metadata.name.clone()?;
    let annotations: BTreeMap<String, String> = obj
        .annotations()
        .iter()
        .filter(|(k, _)| *k == DRY_RUN_ANNOTATION || *k == ISTIO_DRY_RUN_ANNOTATION)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let document = json!({
        "apiVersion": MEMBRANE_API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": Value::Object(obj.spec.fields),
    });
    let label = format!("{namespace}/{name}");
    let (verdict, entry) = match membrane_policy::check_value(document) {
        Ok(checked) => (
            PolicyVerdict::Accepted {
                warnings: checked.warnings.clone(),
            },
            Some(PolicyEntry {
                policy: checked.policy,
                warnings: checked.warnings,
            }),
        ),
        Err(errors) => (PolicyVerdict::Invalid { errors }, None),
    };
    if let PolicyVerdict::Invalid { errors } = &verdict {
        let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(
            policy = %label,
            errors = errors.len(),
            first_error = %first,
            "AuthorizationPolicy refused; it is not enforced"
        );
    }
    let report = PolicyReport {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: obj.metadata.uid.clone(),
        generation: obj.metadata.generation,
        resource_version: obj.metadata.resource_version.clone(),
        conditions: obj.status.map(|s| s.conditions).unwrap_or_default(),
        verdict,
    };
    Some(((namespace, name), (report, entry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(spec: Value) -> AuthorizationPolicy {
        serde_json::from_value(json!({
            "apiVersion": "security.membrane.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 2,
                         "resourceVersion": "7",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": spec
        }))
        .expect("object")
    }

    #[test]
    fn valid_policy_becomes_an_entry() {
        let (key, (report, entry)) = policy(object(json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["evil"]}}],
                       "to": [{"operation": {"ports": [8080], "methods": ["GET"]}}]}]
        })))
        .expect("named");
        assert_eq!(key, ("ns".to_owned(), "p".to_owned()));
        let entry = entry.expect("valid");
        assert_eq!(entry.policy.name(), "p");
        assert_eq!(report.generation, Some(2));
        let PolicyVerdict::Accepted { warnings } = report.verdict else {
            panic!("accepted expected");
        };
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].path.ends_with("operation.methods"),
            "{warnings:?}"
        );
    }

    #[test]
    fn invalid_policy_names_the_field() {
        let (_, (report, entry)) = policy(object(json!({
            "rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]
        })))
        .expect("named");
        assert!(entry.is_none());
        let PolicyVerdict::Invalid { errors } = report.verdict else {
            panic!("invalid expected");
        };
        assert_eq!(errors[0].path, "spec.rules[0].from[0].source.principals[0]");

        let (_, (report, _)) = policy(object(json!({"rules": [{"form": []}]}))).expect("named");
        let PolicyVerdict::Invalid { errors } = report.verdict else {
            panic!("invalid expected");
        };
        assert_eq!(errors[0].path, "spec.rules[0].form", "{errors:?}");
    }
}
