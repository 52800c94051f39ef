//! Deny-all stand-ins for invalid policies, shared by both sources: an invalid policy must
//! never widen access, and "no policy" means "allow", so when no valid version of a policy
//! was seen, an ALLOW policy without rules (`spec: {}`) under the same name is enforced in its
//! place — for an AuthorizationPolicy it admits nothing to the workloads it scopes, for an
//! EgressPolicy it lets them leave for nowhere. The scope is the object's `selector` when that
//! part alone is valid, else its whole namespace.

use membrane_policy::egress::EgressPolicy;
use membrane_policy::model::MEMBRANE_API_VERSION;
use serde_json::{Value, json};

use crate::source::model::PolicyEntry;

/// The stand-in's document: `spec` under the object's name, without annotations (a dry-run
/// annotation on an invalid object does not make its stand-in a dry run).
fn document(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": MEMBRANE_API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// Builds the stand-in from `build`, scoped by `selector` when that is valid (`true`), else
/// the whole namespace (`false`).
fn scoped<T>(selector: Option<Value>, build: impl Fn(Value) -> Option<T>) -> (Option<T>, bool) {
    if let Some(selector) = selector
        && let Some(entry) = build(json!({ "selector": selector }))
    {
        return (Some(entry), true);
    }
    (build(json!({})), false)
}

/// A deny-all stand-in for an invalid AuthorizationPolicy `namespace/name` with `spec.selector`
/// `selector`, and whether it is scoped by the selector. `None` only if even `spec: {}` is
/// refused (an invalid name or namespace).
pub fn authorization(
    namespace: &str,
    name: &str,
    selector: Option<Value>,
) -> (Option<PolicyEntry>, bool) {
    scoped(selector, |spec| {
        let doc = document(membrane_policy::model::KIND, namespace, name, spec);
        membrane_policy::check_value(doc)
            .ok()
            .map(|checked| PolicyEntry {
                policy: checked.policy,
                warnings: Vec::new(),
            })
    })
}

/// A default-deny stand-in for an invalid EgressPolicy, as [`authorization`].
pub fn egress(
    namespace: &str,
    name: &str,
    selector: Option<Value>,
) -> (Option<EgressPolicy>, bool) {
    scoped(selector, |spec| {
        let doc = document(membrane_policy::egress::model::KIND, namespace, name, spec);
        membrane_policy::egress::check_egress_value(doc).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_ins_allow_nothing_in_the_narrowest_valid_scope() {
        let selector = json!({"matchLabels": {"app": "trainer"}});
        let (entry, by_selector) = authorization("ns", "p", Some(selector.clone()));
        let policy = entry.expect("built").policy;
        assert!(by_selector);
        assert_eq!(policy.action, membrane_policy::Action::Allow);
        assert!(policy.rules.is_empty(), "admits nothing");
        assert_eq!(
            policy.selector.get("app").map(String::as_str),
            Some("trainer")
        );
        let (entry, by_selector) = authorization("ns", "p", Some(json!(7)));
        assert!(!by_selector && entry.expect("built").policy.selector.is_empty());
        let (policy, by_selector) = egress("ns", "e", Some(selector));
        let policy = policy.expect("built");
        assert!(by_selector && policy.rules.is_empty());
        assert_eq!(policy.action, membrane_policy::egress::EgressAction::Allow);
        assert_eq!(authorization("ns", "Not_A_Name", None).0, None);
    }
}
