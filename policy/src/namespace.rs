//! Source-namespace values across trust domains: `namespaces` / `notNamespaces` entries and
//! `source.namespace` values, plain (`training`, the local trust domain) or qualified by a
//! trust domain (`cluster-b.example/training`).
//!
//! The rule (DESIGN.md §11, docs/design.md "Policy enforcement"): an unqualified entry,
//! `*` included, names namespaces of the trust domain the policy is evaluated in (the
//! index's local trust domain), never a federated one; `<trust-domain>/<namespace>` names
//! a namespace of that trust domain, whichever cluster evaluates it; `*/<namespace>` names
//! it in every trust domain. The namespace part is a pattern as for plain namespaces.
//!
//! This module owns that syntax and the meaning of one entry for one source; it must not
//! know about documents or field paths (callers attach them) nor about the index's
//! encoding (`program` interns trust domains).

use std::fmt;

use membrane_identity::spiffe_id::parse_trust_domain;

use crate::matcher::StringMatch;

/// Which trust domains a namespace entry covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrustDomainMatch {
    /// Unqualified entry: the trust domain the policy is evaluated in.
    Local,
    /// `<trust-domain>/…`: that trust domain only (canonical, lower-case name).
    Named(Box<str>),
    /// `*/…`: every trust domain.
    Any,
}

/// One namespace entry: a trust domain and a namespace pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceMatch {
    /// The trust domains the entry covers.
    pub trust_domain: TrustDomainMatch,
    /// The namespace pattern (exact, `prefix*`, `*suffix` or `*`).
    pub namespace: StringMatch,
}

impl NamespaceMatch {
    /// An unqualified entry: `namespace` in the local trust domain.
    pub fn local(namespace: StringMatch) -> Self {
        Self {
            trust_domain: TrustDomainMatch::Local,
            namespace,
        }
    }

    /// Parses `namespace`, `<trust-domain>/<namespace>` or `*/<namespace>`, where
    /// `namespace` is a namespace pattern (see [`StringMatch::namespace`]) and
    /// `trust-domain` a canonical SPIFFE trust domain name.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let Some((td, ns)) = raw.split_once('/') else {
            return StringMatch::namespace(raw).map(Self::local);
        };
        const FORM: &str = "write a qualified namespace as <trust-domain>/<namespace>";
        if ns.contains('/') {
            return Err(format!("more than one '/'; {FORM}"));
        }
        let trust_domain = match td {
            "" => return Err(format!("the trust domain is empty; {FORM}")),
            "*" => TrustDomainMatch::Any,
            td if td.contains('*') => {
                return Err(format!(
                    "a trust domain is written out, or `*` alone for every trust domain; {FORM}"
                ));
            }
            td => TrustDomainMatch::Named(
                parse_trust_domain(td)
                    .map_err(|e| format!("{e}; {FORM}"))?
                    .as_str()
                    .into(),
            ),
        };
        if ns.is_empty() {
            return Err(format!(
                "the namespace is empty; {FORM} (`{td}/*` for every namespace)"
            ));
        }
        let namespace = StringMatch::namespace(ns).map_err(|e| format!("namespace part: {e}"))?;
        Ok(Self {
            trust_domain,
            namespace,
        })
    }

    /// Whether a source from `namespace` of `trust_domain` matches, evaluated in
    /// `local_trust_domain`. (The index encodes the same meaning without comparing names per
    /// entry.)
    pub fn matches(&self, local_trust_domain: &str, trust_domain: &str, namespace: &str) -> bool {
        let td = match &self.trust_domain {
            TrustDomainMatch::Local => trust_domain == local_trust_domain,
            TrustDomainMatch::Named(td) => **td == *trust_domain,
            TrustDomainMatch::Any => true,
        };
        td && self.namespace.matches(namespace)
    }
}

impl fmt::Display for NamespaceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.trust_domain {
            TrustDomainMatch::Local => write!(f, "{}", self.namespace),
            TrustDomainMatch::Named(td) => write!(f, "{td}/{}", self.namespace),
            TrustDomainMatch::Any => write!(f, "*/{}", self.namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(td: &str, ns: StringMatch) -> NamespaceMatch {
        NamespaceMatch {
            trust_domain: TrustDomainMatch::Named(td.into()),
            namespace: ns,
        }
    }

    #[test]
    fn forms() {
        let exact = |s: &str| StringMatch::Exact(s.into());
        let ok = [
            ("training", NamespaceMatch::local(exact("training"))),
            ("*", NamespaceMatch::local(StringMatch::Any)),
            (
                "team-*",
                NamespaceMatch::local(StringMatch::Prefix("team-".into())),
            ),
            (
                "cluster-b.example/training",
                named("cluster-b.example", exact("training")),
            ),
            (
                "cluster-b.example/*",
                named("cluster-b.example", StringMatch::Any),
            ),
            (
                "cluster-b.example/*-prod",
                named("cluster-b.example", StringMatch::Suffix("-prod".into())),
            ),
            (
                "*/kube-system",
                NamespaceMatch {
                    trust_domain: TrustDomainMatch::Any,
                    namespace: exact("kube-system"),
                },
            ),
        ];
        for (raw, want) in ok {
            let got = NamespaceMatch::parse(raw);
            assert_eq!(got.as_ref(), Ok(&want), "{raw}");
            assert_eq!(want.to_string(), raw, "round trip");
        }
    }

    #[test]
    fn malformed_qualified_entries() {
        for (raw, says) in [
            ("/training", "trust domain is empty"),
            ("cluster-b.example/", "namespace is empty"),
            ("a/b/c", "more than one '/'"),
            ("Cluster-B.example/training", "lower case"),
            ("spiffe://cluster-b.example/training", "more than one '/'"),
            ("spiffe:/training", "not a URI"),
            ("cluster-*/training", "written out"),
            ("cluster b/training", "invalid trust domain"),
            ("cluster-b.example/Training", "namespace part"),
            ("cluster-b.example/a*b", "namespace part"),
            ("cluster-b.example/ns/training", "more than one '/'"),
        ] {
            let e = NamespaceMatch::parse(raw).expect_err(raw);
            assert!(e.contains(says), "{raw}: {e}");
        }
    }

    #[test]
    fn matching() {
        let p = |s: &str| NamespaceMatch::parse(s).expect("valid");
        let local = "cluster-a.example";
        let b = "cluster-b.example";
        assert!(p("training").matches(local, local, "training"));
        assert!(!p("training").matches(local, b, "training"));
        assert!(!p("*").matches(local, b, "training"));
        assert!(p("*").matches(local, local, "anything"));
        assert!(p("cluster-b.example/training").matches(local, b, "training"));
        assert!(!p("cluster-b.example/training").matches(local, local, "training"));
        assert!(p("cluster-b.example/*").matches(local, b, "x"));
        assert!(p("*/training").matches(local, b, "training"));
        assert!(p("*/training").matches(local, local, "training"));
        assert!(!p("*/training").matches(local, b, "other"));
    }
}
