//! AuthorizationPolicy objects → validated [`PolicyEntry`]s for the cluster state, and a
//! [`PolicyReport`] per object for the status writer.
//!
//! The spec is typed and validated by `membrane_policy` exactly as `membrane policy check`
//! does it (same model, same field paths). An invalid policy never widens access: its report
//! carries every error, and what is enforced in its place ([`Fallback`]) is the last valid
//! version of the same object when one was seen ([`keep_last_valid`]), else a deny-all
//! stand-in ([`crate::source::stand_in`]) — an ALLOW policy without rules (`spec: {}`) scoped
//! by the invalid object's selector when that part is valid, else its whole namespace. It must
//! not drop an invalid object from the state: "no policy" means "allow".

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
    /// Refused: not enforced; [`Fallback`] says what is enforced in its place.
    Invalid {
        /// Every problem found, each with its field path.
        errors: Vec<PolicyError>,
        /// What the ztunnels enforce instead.
        fallback: Fallback,
    },
}

/// What is enforced in place of an invalid policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The last valid version of the object (its `metadata.generation` when known).
    LastValid {
        /// The generation of the version still enforced.
        generation: Option<i64>,
    },
    /// No valid version was seen (e.g. the controller started with the object invalid): a
    /// deny-all stand-in for the object's scope.
    DenyAll {
        /// `true`: scoped by the object's selector; `false`: its whole namespace.
        selector: bool,
    },
}

/// Which policy resource a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// `AuthorizationPolicy`.
    Authorization,
    /// `EgressPolicy`.
    Egress,
}

impl PolicyKind {
    /// The resource's kind.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Authorization => "AuthorizationPolicy",
            PolicyKind::Egress => "EgressPolicy",
        }
    }
}

/// One policy object as last seen, and the verdict on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReport {
    /// Which resource.
    pub kind: PolicyKind,
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

impl PolicyReport {
    /// The report on the object of `kind` at `key` with `meta`, its stored `conditions`, and
    /// the verdict.
    pub fn new(
        kind: PolicyKind,
        (namespace, name): &Key,
        meta: &kube::api::ObjectMeta,
        conditions: Vec<Condition>,
        verdict: PolicyVerdict,
    ) -> Self {
        Self {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
            uid: meta.uid.clone(),
            generation: meta.generation,
            resource_version: meta.resource_version.clone(),
            conditions,
            verdict,
        }
    }
}

/// Every policy object by kind and `(namespace, name)`, valid or not.
pub type PolicyReports = BTreeMap<(PolicyKind, Key), PolicyReport>;

/// The object's dry-run annotations (Membrane's and Istio's), the only ones validation reads.
pub(super) fn dry_run_annotations(obj: &impl ResourceExt) -> BTreeMap<String, String> {
    obj.annotations()
        .iter()
        .filter(|(k, _)| *k == DRY_RUN_ANNOTATION || *k == ISTIO_DRY_RUN_ANNOTATION)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Validates one object: the report, and the entry for the state when it is valid.
pub fn policy(obj: AuthorizationPolicy) -> Option<(Key, (PolicyReport, Option<PolicyEntry>))> {
    let namespace = obj.namespace()?;
    let name = obj.metadata.name.clone()?;
    let annotations = dry_run_annotations(&obj);
    let selector = obj.spec.fields.get("selector").cloned();
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
        Err(errors) => {
            let (entry, selector) =
                crate::source::stand_in::authorization(&namespace, &name, selector);
            let fallback = Fallback::DenyAll { selector };
            (PolicyVerdict::Invalid { errors, fallback }, entry)
        }
    };
    if let PolicyVerdict::Invalid { errors, .. } = &verdict {
        let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
        tracing::warn!(
            policy = %label,
            errors = errors.len(),
            first_error = %first,
            "AuthorizationPolicy refused"
        );
    }
    let key = (namespace, name);
    let conditions = obj.status.map(|s| s.conditions).unwrap_or_default();
    let report = PolicyReport::new(
        PolicyKind::Authorization,
        &key,
        &obj.metadata,
        conditions,
        verdict,
    );
    Some((key, (report, entry)))
}

/// Applies the last-valid rule to a freshly validated object: when `new` is invalid and
/// `previous` (the same object as last seen) enforced a valid version, that version stays
/// enforced and the verdict says so; otherwise `new` is returned unchanged.
pub fn keep_last_valid<E: Clone>(
    previous: Option<&(PolicyReport, Option<E>)>,
    new: (PolicyReport, Option<E>),
) -> (PolicyReport, Option<E>) {
    let (mut report, entry) = new;
    let PolicyVerdict::Invalid { fallback, .. } = &mut report.verdict else {
        return (report, entry);
    };
    let last_valid = previous.and_then(|(prev, prev_entry)| {
        let generation = match prev.verdict {
            PolicyVerdict::Accepted { .. } => prev.generation,
            PolicyVerdict::Invalid {
                fallback: Fallback::LastValid { generation },
                ..
            } => generation,
            PolicyVerdict::Invalid { .. } => return None,
        };
        Some((generation, prev_entry.clone()?))
    });
    match last_valid {
        Some((generation, kept)) => {
            *fallback = Fallback::LastValid { generation };
            tracing::warn!(
                policy = %format_args!("{}/{}", report.namespace, report.name),
                kind = report.kind.as_str(),
                enforced_generation = ?generation,
                "invalid policy edit; the last valid version stays enforced"
            );
            (report, Some(kept))
        }
        None => {
            if let Fallback::DenyAll { selector } = fallback {
                tracing::warn!(
                    policy = %format_args!("{}/{}", report.namespace, report.name),
                    kind = report.kind.as_str(),
                    scope = if *selector { "selector" } else { "namespace" },
                    "invalid policy with no valid version seen; a deny-all stand-in is enforced for its scope"
                );
            }
            (report, entry)
        }
    }
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
        assert!(entry.is_some(), "a deny-all stand-in");
        let PolicyVerdict::Invalid { errors, fallback } = report.verdict else {
            panic!("invalid expected");
        };
        assert_eq!(errors[0].path, "spec.rules[0].from[0].source.principals[0]");
        assert_eq!(fallback, Fallback::DenyAll { selector: false });

        let (_, (report, _)) = policy(object(json!({"rules": [{"form": []}]}))).expect("named");
        let PolicyVerdict::Invalid { errors, .. } = report.verdict else {
            panic!("invalid expected");
        };
        assert_eq!(errors[0].path, "spec.rules[0].form", "{errors:?}");
    }
}
