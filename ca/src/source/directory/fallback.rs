//! What a manifest file that has never parsed contributes: a deny-all stand-in
//! ([`crate::source::stand_in`]) for each AuthorizationPolicy and EgressPolicy document in it,
//! valid or not, and nothing else. A file is applied whole or not at all, but leaving its
//! policies out would fail open ("no policy" means "allow"), so their scopes are closed
//! instead until the file parses.
//!
//! A stand-in needs the document's kind and name (namespace `default` when absent, the
//! selector when valid). A file whose documents cannot all be told apart — not YAML, not a
//! mapping, no `kind`, a policy without a usable name — is [`Unidentified`]: any of them may
//! be a policy, so no stand-in can be built for it (the source then withholds its first
//! state, see [`super::watch::run`]). Pure, like [`super::manifest`].

use serde_json::Value;

use super::manifest::Object;

/// Why a file's documents cannot all be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unidentified(pub String);

/// The stand-ins for the text of a file that never parsed (`None`: not readable as text).
pub fn stand_ins(text: Option<&str>) -> Result<Vec<Object>, Unidentified> {
    let text = text.ok_or_else(|| Unidentified("the file cannot be read as text".into()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| Unidentified(format!("not valid YAML, no document can be read: {e}")))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        document(i + 1, doc, &mut out)?;
    }
    Ok(out)
}

fn document(index: usize, doc: Value, out: &mut Vec<Object>) -> Result<(), Unidentified> {
    let unidentified = |why: &str| Unidentified(format!("document {index}: {why}"));
    let map = match doc {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        _ => return Err(unidentified("not a mapping; it may be a policy")),
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| unidentified("no string `kind`; it may be a policy"))?;
    // A wrong or missing apiVersion does not make a policy less of one: only a string that
    // the parser would skip (another API's kind of the same name) is left out.
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    match kind {
        "List" if api_version.is_none_or(|v| v == "v1") => match map.get("items") {
            None => Ok(()),
            Some(Value::Array(items)) => {
                for item in items {
                    document(index, item.clone(), out)?;
                }
                Ok(())
            }
            Some(_) => Err(unidentified("`items` of a List is not a list")),
        },
        membrane_policy::model::KIND
            if api_version.is_none_or(|v| membrane_policy::model::API_VERSIONS.contains(&v)) =>
        {
            let (namespace, name, selector) = scope(&map).map_err(|why| unidentified(&why))?;
            let (entry, _) = crate::source::stand_in::authorization(&namespace, &name, selector);
            let entry = entry.ok_or_else(|| {
                unidentified(&format!(
                    "AuthorizationPolicy {namespace}/{name}: not a valid name"
                ))
            })?;
            out.push(Object::Policy(entry));
            Ok(())
        }
        membrane_policy::egress::model::KIND => {
            let (namespace, name, selector) = scope(&map).map_err(|why| unidentified(&why))?;
            let (policy, _) = crate::source::stand_in::egress(&namespace, &name, selector);
            let policy = policy.ok_or_else(|| {
                unidentified(&format!(
                    "EgressPolicy {namespace}/{name}: not a valid name"
                ))
            })?;
            out.push(Object::Egress(policy));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `(namespace, name, spec.selector)` of a policy document.
fn scope(map: &serde_json::Map<String, Value>) -> Result<(String, String, Option<Value>), String> {
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{kind} without a string metadata.name"))?;
    let namespace = match meta.and_then(|m| m.get("namespace")) {
        None | Some(Value::Null) => membrane_policy::model::DEFAULT_NAMESPACE,
        Some(Value::String(ns)) => ns.as_str(),
        Some(_) => return Err(format!("{kind} {name}: metadata.namespace is not a string")),
    };
    let selector = map.get("spec").and_then(|s| s.get("selector")).cloned();
    Ok((namespace.to_owned(), name.to_owned(), selector))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| match o {
                Object::Policy(p) => {
                    let p = &p.policy;
                    assert!(p.rules.is_empty() && p.action == membrane_policy::Action::Allow);
                    let scope = p.selector.values().cloned().collect::<Vec<_>>().join(",");
                    format!("authz {}/{} [{scope}]", p.namespace(), p.name())
                }
                Object::Egress(p) => {
                    assert!(p.rules.is_empty());
                    format!("egress {} [{}]", p.key(), p.selector.len())
                }
                other => panic!("not a stand-in: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn every_policy_document_gets_a_stand_in_and_nothing_else_counts() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: training}
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: allow-gateway, namespace: training}
spec:
  selector: {matchLabels: {app: trainer}}
  rules: [{from: [{source: {namespaces: [ingress]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken}
spec: {selector: 7, rules: [{form: []}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: security.membrane.dev/v1
  kind: EgressPolicy
  metadata: {name: hub, namespace: training}
  spec: {selector: {matchLabels: {app: trainer}}, rules: [{to: [{hosts: ["*"]}]}]}
---
apiVersion: other.example/v1
kind: AuthorizationPolicy
metadata: {name: someone-elses}
---
kind: Pod
"#;
        let objects = stand_ins(Some(text)).expect("identified");
        assert_eq!(
            names(&objects),
            [
                "authz training/allow-gateway [trainer]",
                "authz default/broken []",
                "egress training/hub [1]",
            ]
        );
    }

    #[test]
    fn documents_that_cannot_be_told_apart_are_unidentified() {
        for (text, why) in [
            ("a: [unclosed\n", "not valid YAML"),
            ("- a\n- b\n", "document 1: not a mapping"),
            (
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nspec: {}\n",
                "document 2: no string `kind`",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {namespace: a}\n",
                "without a string metadata.name",
            ),
            (
                "kind: EgressPolicy\nmetadata: {name: e, namespace: [a]}\n",
                "not a string",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: Bad_Name}\n",
                "not a valid name",
            ),
            ("apiVersion: v1\nkind: List\nitems: {a: b}\n", "not a list"),
        ] {
            let err = stand_ins(Some(text)).expect_err(text).to_string();
            assert!(
                err.contains(why),
                "{text:?}: {err:?} should contain {why:?}"
            );
        }
        assert!(stand_ins(None).is_err());
    }
}
