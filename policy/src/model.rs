//! The `AuthorizationPolicy` document as users write it: serde types, schema-compatible with
//! Istio's `security.istio.io/v1` (and `v1beta1`) and Membrane's `security.membrane.dev/v1`.
//!
//! This module owns the *shape* of a document and nothing else: it accepts what the schema
//! accepts (plus integers where Istio wants strings, such as `ports: [8080]`) and refuses
//! unknown fields anywhere under `spec`. It must not interpret values — CIDRs, ports,
//! principals, `when` keys and the meaning of L7 fields are `validate`'s job — and it never
//! decides anything.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `apiVersion` of Membrane's own policies.
pub const MEMBRANE_API_VERSION: &str = "security.membrane.dev/v1";
/// `apiVersion` values accepted for `kind: AuthorizationPolicy`.
pub const API_VERSIONS: [&str; 3] = [
    MEMBRANE_API_VERSION,
    "security.istio.io/v1",
    "security.istio.io/v1beta1",
];
/// The `kind` of a policy document.
pub const KIND: &str = "AuthorizationPolicy";
/// Namespace of a policy whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Annotation that turns a policy into a dry run (evaluated and reported, never enforced).
pub const DRY_RUN_ANNOTATION: &str = "membrane.dev/dry-run";
/// Istio's dry-run annotation, honoured too.
pub const ISTIO_DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// One `AuthorizationPolicy` document.
///
/// Fields outside `spec` that Kubernetes adds (`status`, `metadata.uid`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// One of [`API_VERSIONS`].
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// Name, namespace and annotations.
    pub metadata: Metadata,
    /// The policy itself; a missing `spec` is `spec: {}` (the allow-nothing policy).
    #[serde(default)]
    pub spec: Spec,
}

/// The parts of `metadata` a policy uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Metadata {
    /// Object name (a DNS-1123 subdomain).
    pub name: String,
    /// Namespace; [`DEFAULT_NAMESPACE`] when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Annotations; the dry-run ones are read.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// `spec` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// Workloads the policy applies to; absent or empty → the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Istio's attachment to a gateway or waypoint; refused by validation (no waypoints here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// Plural form of [`Spec::target_ref`]; refused likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<serde_json::Value>,
    /// What a matching rule does; `ALLOW` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Istio's external authorizer for `CUSTOM`; refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// Rules, OR-ed. Absent → the policy matches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.action` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `ALLOW`.
    Allow,
    /// `DENY`.
    Deny,
    /// `AUDIT`.
    Audit,
    /// `CUSTOM` (external authorization): parsed so validation can refuse it by name.
    Custom,
}

impl Action {
    /// The spelling in a document (`ALLOW`, `DENY`, `AUDIT`, `CUSTOM`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        match s.as_str() {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "AUDIT" => Ok(Action::Audit),
            "CUSTOM" => Ok(Action::Custom),
            other => {
                let hint = match other.to_ascii_uppercase().as_str() {
                    "ALLOW" | "DENY" | "AUDIT" | "CUSTOM" => " (actions are upper case)",
                    _ => "",
                };
                Err(de::Error::custom(format_args!(
                    "unknown action {other:?}: expected ALLOW, DENY or AUDIT{hint}"
                )))
            }
        }
    }
}

/// One entry of `spec.rules`: `from`, `to` and `when` are AND-ed; an absent part matches
/// anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources, OR-ed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    /// Operations, OR-ed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    /// Conditions, AND-ed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// One entry of `rules[].from`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// The source attributes; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// `rules[].from[].source`: every field that is set must match (AND); values in one field
/// are OR-ed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities (`td/ns/N/sa/S`, `spiffe://…`, `prefix*`, `*suffix`, `*`).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub principals: Vec<String>,
    /// Negated [`Source::principals`].
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_principals: Vec<String>,
    /// JWT principals (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub request_principals: Vec<String>,
    /// Negated [`Source::request_principals`] (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces (exact or pattern).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub namespaces: Vec<String>,
    /// Negated [`Source::namespaces`].
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts, `ns/sa`.
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_accounts: Vec<String>,
    /// Negated [`Source::service_accounts`].
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_service_accounts: Vec<String>,
    /// Source address blocks (CIDR or single address).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_blocks: Vec<String>,
    /// Negated [`Source::ip_blocks`].
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ip_blocks: Vec<String>,
    /// Client addresses from `X-Forwarded-For` or PROXY protocol (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub remote_ip_blocks: Vec<String>,
    /// Negated [`Source::remote_ip_blocks`] (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_remote_ip_blocks: Vec<String>,
}

/// One entry of `rules[].to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// The operation attributes; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// `rules[].to[].operation`: every field that is set must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination ports (strings in Istio's schema; integers are accepted too).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<String>,
    /// Negated [`Operation::ports`].
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ports: Vec<String>,
    /// HTTP hosts (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hosts: Vec<String>,
    /// Negated [`Operation::hosts`] (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_hosts: Vec<String>,
    /// HTTP methods (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub methods: Vec<String>,
    /// Negated [`Operation::methods`] (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_methods: Vec<String>,
    /// HTTP paths (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub paths: Vec<String>,
    /// Negated [`Operation::paths`] (L7).
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_paths: Vec<String>,
}

/// One entry of `rules[].when`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute name (`source.ip`, `destination.port`, …).
    #[serde(default)]
    pub key: String,
    /// Accepted values, OR-ed.
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
    /// Refused values.
    #[serde(
        default,
        deserialize_with = "strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_values: Vec<String>,
}

/// A list of strings; `null` is the empty list and integers are taken as their decimal
/// spelling (YAML turns an unquoted `8080` into a number where Istio's schema wants a string).
pub(crate) fn strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element::<StringLike>()? {
                out.push(item.0);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_any(ListVisitor)
}

/// One list item: a string, or an integer taken as its decimal spelling.
struct StringLike(String);

impl<'de> Deserialize<'de> for StringLike {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;

        impl Visitor<'_> for ItemVisitor {
            type Value = StringLike;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StringLike(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(StringLike(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StringLike(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StringLike(v.to_string()))
            }
        }

        deserializer.deserialize_any(ItemVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<AuthorizationPolicy, String> {
        serde_path_to_error::deserialize(json).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn defaults_and_integer_ports() {
        let doc = parse(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "uid": "ignored"},
            "spec": {"rules": [{"to": [{"operation": {"ports": [8080, "9090"], "notPorts": null}}]}]},
            "status": {"ignored": true},
        }))
        .expect("valid");
        assert_eq!(doc.metadata.namespace, "default");
        assert_eq!(doc.spec.action, None);
        let rules = doc.spec.rules.expect("rules");
        let op = rules[0].to.as_ref().expect("to")[0]
            .operation
            .clone()
            .expect("operation");
        assert_eq!(op.ports, ["8080", "9090"]);
        assert!(op.not_ports.is_empty());
    }

    #[test]
    fn unknown_fields_under_spec_are_refused() {
        let err = parse(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p"},
            "spec": {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]},
        }))
        .expect_err("unknown field");
        assert!(err.starts_with("spec.rules[0].from[0].source"), "{err}");
        assert!(err.contains("unknown field `principal`"), "{err}");
    }

    #[test]
    fn actions() {
        for (text, action) in [
            ("ALLOW", Action::Allow),
            ("DENY", Action::Deny),
            ("AUDIT", Action::Audit),
            ("CUSTOM", Action::Custom),
        ] {
            let a: Action = serde_json::from_value(serde_json::json!(text)).expect("action");
            assert_eq!(a, action);
            assert_eq!(a.as_str(), text);
        }
        let err = serde_json::from_value::<Action>(serde_json::json!("allow")).expect_err("lower");
        assert!(err.to_string().contains("upper case"), "{err}");
        assert!(serde_json::from_value::<Action>(serde_json::json!("PERMIT")).is_err());
    }

    #[test]
    fn list_items_must_be_strings_or_integers() {
        let err = parse(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p"},
            "spec": {"rules": [{"to": [{"operation": {"ports": ["1", 2.5]}}]}]},
        }))
        .expect_err("float");
        assert!(
            err.starts_with("spec.rules[0].to[0].operation.ports[1]"),
            "{err}"
        );
        let err = parse(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p"},
            "spec": {"rules": [{"from": [{"source": {"principals": "a"}}]}]},
        }))
        .expect_err("not a list");
        assert!(err.contains("a list of strings"), "{err}");
    }

    #[test]
    fn serializes_back() {
        let doc = AuthorizationPolicy {
            api_version: MEMBRANE_API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name: "p".into(),
                namespace: "ns".into(),
                annotations: BTreeMap::new(),
            },
            spec: Spec {
                action: Some(Action::Deny),
                ..Spec::default()
            },
        };
        let value = serde_json::to_value(&doc).expect("serialize");
        assert_eq!(value["spec"]["action"], "DENY");
        assert_eq!(parse(value).expect("round trip"), doc);
    }
}
