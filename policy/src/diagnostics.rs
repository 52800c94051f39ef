//! What validation tells a person: errors (the document is refused) and warnings (it is
//! accepted, but Membrane enforces less or differently than the text suggests).
//!
//! This module owns the wording and the structure — document index, `namespace/name`, field
//! path in the form `spec.rules[1].from[0].source.principals[2]`, and a typed problem — so
//! that `membrane policy check`, status conditions and logs all say the same thing. It must
//! not decide what is an error: that is `validate`'s job.

use std::fmt;

use crate::policy::Action;

/// Why a document is refused. Each error names its document and field; see [`PolicyError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The text is not YAML (the message carries the line and column).
    #[error("not valid YAML: {0}")]
    Yaml(String),
    /// A document is not a Kubernetes object (not a mapping, no `kind`, no `apiVersion`).
    #[error("{0}")]
    Document(String),
    /// `kind: AuthorizationPolicy` in a Membrane or Istio group, with a version we do not
    /// read.
    #[error(
        "apiVersion {0:?} is not supported: use security.membrane.dev/v1, security.istio.io/v1 \
         or security.istio.io/v1beta1"
    )]
    UnsupportedApiVersion(String),
    /// The document does not have the schema's shape: wrong type, unknown field, unknown
    /// action, missing `metadata.name`.
    #[error("{0}")]
    Schema(String),
    /// `metadata.name` or `metadata.namespace` is not a valid Kubernetes name.
    #[error("invalid name {value:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `action: CUSTOM` (external authorization) is not supported.
    #[error("action CUSTOM (external authorization) is not supported; the policy is not enforced")]
    CustomUnsupported,
    /// `targetRef`/`targetRefs` attach a policy to a gateway or waypoint, which Membrane has
    /// not.
    #[error(
        "targetRef/targetRefs (policies attached to gateways or waypoints) are not supported; \
         use selector.matchLabels or no selector"
    )]
    TargetRefUnsupported,
    /// `provider` without `action: CUSTOM`.
    #[error("provider is only meaningful with action CUSTOM")]
    ProviderWithoutCustom,
    /// An `ipBlocks` entry or a `source.ip`/`destination.ip` value is not a CIDR or address.
    #[error("bad CIDR {value:?}: {reason}")]
    BadCidr {
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A port is not a number from 1 to 65535.
    #[error("bad port: {reason}")]
    BadPort {
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A principal is not a valid pattern or identity.
    #[error("malformed principal {value:?}: {reason}")]
    BadPrincipal {
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A namespace pattern is malformed.
    #[error("malformed namespace {value:?}: {reason}")]
    BadNamespace {
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A service account is not `ns/sa`.
    #[error("malformed service account {value:?}: {reason}")]
    BadServiceAccount {
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `when` key that is neither an L4 key nor a known L7 key.
    #[error(
        "unknown when key {0:?}: expected source.principal, source.namespace, \
         source.serviceAccount, source.ip, destination.ip or destination.port (or an L7 key \
         such as request.headers[...])"
    )]
    UnknownWhenKey(String),
    /// A list that must not be empty when present (`from: []`, `to: []`).
    #[error("`{0}` must not be an empty list (leave it out to match anything)")]
    EmptyList(&'static str),
    /// A clause with nothing in it (`from[].source` or `to[].operation` missing or empty, a
    /// `when` entry without key).
    #[error("{0}")]
    EmptyClause(&'static str),
    /// A `when` entry with neither `values` nor `notValues`.
    #[error("a when condition needs values or notValues")]
    NoConditionValues,
    /// A dry-run annotation that is neither `"true"` nor `"false"`.
    #[error("annotation {key} must be \"true\" or \"false\", not {value:?}")]
    BadDryRun {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

/// One reason a document was refused, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// 1-based index of the document in the text (empty documents are not counted); `None`
    /// for [`crate::validate::check`] of a single document.
    pub document: Option<usize>,
    /// `namespace/name` of the policy, when the document got that far.
    pub policy: Option<String>,
    /// Field path (`spec.rules[1].from[0].source.principals[2]`); empty for the document as
    /// a whole. Items of a `kind: List` start with `items[i].`.
    pub path: String,
    /// What is wrong.
    #[source]
    pub problem: Problem,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.document, &self.policy) {
            (Some(d), Some(p)) => write!(f, "document {d} ({p}): ")?,
            (Some(d), None) => write!(f, "document {d}: ")?,
            (None, Some(p)) => write!(f, "{p}: ")?,
            (None, None) => {}
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.problem)
    }
}

/// Something accepted but worth telling the author.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Field path, as in [`PolicyError::path`].
    pub path: String,
    /// What it is about.
    pub kind: WarningKind,
}

/// The kinds of [`Warning`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WarningKind {
    /// An L7-only field (`methods`, `paths`, `hosts`, `requestPrincipals`,
    /// `remoteIpBlocks`, `request.*` keys, …) in a rule of a policy with this action.
    L7Field {
        /// Field name, or `when key <key>`.
        field: String,
        /// The policy's action, which decides the fail-safe behaviour.
        action: Action,
    },
    /// A CIDR had address bits set past its prefix; they were cleared.
    HostBitsCleared {
        /// As written.
        value: String,
        /// As enforced.
        network: String,
    },
    /// A `DENY` or `AUDIT` policy without rules matches nothing.
    NoRules(Action),
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        match &self.kind {
            WarningKind::L7Field { field, action } => {
                write!(
                    f,
                    "{field} is an L7 (HTTP) field; Membrane authorizes at L4, so "
                )?;
                match action {
                    Action::Allow => f.write_str(
                        "this ALLOW rule never matches (the policy still applies to its \
                         workloads and denies what no other rule allows)",
                    ),
                    Action::Deny => f.write_str(
                        "the field is ignored and this DENY rule is enforced on its L4 part \
                         (it denies more than the text says; Istio's ztunnel would never fire it)",
                    ),
                    Action::Audit => f.write_str(
                        "the field is ignored and this AUDIT rule records on its L4 part",
                    ),
                }
            }
            WarningKind::HostBitsCleared { value, network } => write!(
                f,
                "{value:?} has address bits set past its prefix; enforced as {network}"
            ),
            WarningKind::NoRules(action) => {
                write!(f, "a {action} policy without rules never matches anything")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_document_policy_and_path() {
        let e = PolicyError {
            document: Some(2),
            policy: Some("ns/p".into()),
            path: "spec.rules[1].from[0].source.principals[2]".into(),
            problem: Problem::BadPrincipal {
                value: "a*b".into(),
                reason: "'*' may only be the first or the last character".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "document 2 (ns/p): spec.rules[1].from[0].source.principals[2]: malformed \
             principal \"a*b\": '*' may only be the first or the last character"
        );
        let e = PolicyError {
            document: None,
            policy: None,
            path: String::new(),
            problem: Problem::Yaml("bad".into()),
        };
        assert_eq!(e.to_string(), "not valid YAML: bad");
    }

    #[test]
    fn warning_display() {
        let w = Warning {
            path: "spec.rules[0].to[0].operation.methods".into(),
            kind: WarningKind::L7Field {
                field: "methods".into(),
                action: Action::Allow,
            },
        };
        let text = w.to_string();
        assert!(text.starts_with("spec.rules[0].to[0].operation.methods: methods is an L7"));
        assert!(text.contains("never matches"));
        let w = Warning {
            path: String::new(),
            kind: WarningKind::NoRules(Action::Deny),
        };
        assert_eq!(
            w.to_string(),
            "a DENY policy without rules never matches anything"
        );
    }
}
