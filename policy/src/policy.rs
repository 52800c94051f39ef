//! The validated policy: what `validate` produces from a document and what `compile` indexes
//! and `eval` matches — typed, with no text left to interpret.
//!
//! This module owns the compiled-ready shape and its invariants (documented on each type);
//! it is also the seam for the wire conversion (build these types from proto messages with
//! the parsers in `matcher`). It must not parse YAML, report field paths or decide a verdict.
//!
//! L7 fields never reach this form. A rule that contained one carries
//! [`Rule::has_l7`]: an `ALLOW` rule with it never matches, while `DENY` and `AUDIT` rules
//! are kept with their L4 parts only (an L7-only `to` entry became an empty
//! [`OperationMatch`], which matches any operation; an L7 `when` condition was dropped,
//! i.e. counts as true).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::matcher::{IpNet, ServiceAccountRef, StringMatch};
use crate::namespace::NamespaceMatch;

/// Names a policy: namespace and name. Cheap to clone (two reference counts).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    /// The policy's namespace.
    pub namespace: Arc<str>,
    /// The policy's name.
    pub name: Arc<str>,
}

impl PolicyRef {
    /// Builds a reference from its two parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a matching rule of an enforced policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Admit the connection (if no `DENY` matches).
    Allow,
    /// Refuse the connection.
    Deny,
    /// Record the match; never changes the verdict.
    Audit,
}

impl Action {
    /// `ALLOW`, `DENY` or `AUDIT`: the document's spelling.
    pub fn as_str(self) -> &'static str {
        crate::model::Action::from(self).as_str()
    }
}

impl From<Action> for crate::model::Action {
    fn from(action: Action) -> Self {
        match action {
            Action::Allow => Self::Allow,
            Action::Deny => Self::Deny,
            Action::Audit => Self::Audit,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Namespace and name.
    pub id: PolicyRef,
    /// `selector.matchLabels`; empty means no selector (the whole namespace, or the whole
    /// mesh in the root namespace).
    pub selector: BTreeMap<String, String>,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: Action,
    /// Rules, OR-ed; empty → the policy matches nothing (`spec: {}`).
    pub rules: Vec<Rule>,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
}

impl Policy {
    /// The policy's namespace.
    pub fn namespace(&self) -> &str {
        &self.id.namespace
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.id.name
    }

    /// Whether the selector (if any) selects a workload with these labels. Scope (namespace)
    /// is the index's business.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

/// One rule: `from`, `to` and `when` AND-ed; each empty part matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Sources, OR-ed; empty → any source (including a plaintext one).
    pub from: Vec<SourceMatch>,
    /// Operations, OR-ed; empty → any operation.
    pub to: Vec<OperationMatch>,
    /// Conditions, AND-ed.
    pub when: Vec<Condition>,
    /// The document's rule had an L7 field: in an `ALLOW` policy the rule never matches.
    pub has_l7: bool,
}

/// A positive and a negated list for one attribute (`principals` / `notPrincipals`,
/// `values` / `notValues`). Each non-empty list must hold: `values` when the attribute is
/// present and matches one of them, `not_values` when it is absent or matches none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint<T> {
    /// Accepted values (OR); empty → no constraint.
    pub values: Vec<T>,
    /// Refused values; empty → no constraint.
    pub not_values: Vec<T>,
}

impl<T> Default for Constraint<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Constraint<T> {
    /// Neither list is set.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// Evaluates the constraint for an attribute that may be absent, with `matches` telling
    /// whether one value matches the attribute.
    #[inline]
    pub fn check<A: Copy>(&self, attr: Option<A>, matches: impl Fn(&T, A) -> bool) -> bool {
        if !self.values.is_empty() {
            match attr {
                Some(a) if self.values.iter().any(|v| matches(v, a)) => {}
                _ => return false,
            }
        }
        if !self.not_values.is_empty()
            && let Some(a) = attr
            && self.not_values.iter().any(|v| matches(v, a))
        {
            return false;
        }
        true
    }
}

/// One `from[].source`: all constraints AND-ed; all empty → any source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMatch {
    /// `principals` / `notPrincipals`, without the `spiffe://` scheme.
    pub principals: Constraint<StringMatch>,
    /// `namespaces` / `notNamespaces`: unqualified entries name the local trust domain's
    /// namespaces (see [`crate::namespace`]).
    pub namespaces: Constraint<NamespaceMatch>,
    /// `serviceAccounts` / `notServiceAccounts`: accounts of the local trust domain.
    pub service_accounts: Constraint<ServiceAccountRef>,
    /// `ipBlocks` / `notIpBlocks`: the peer's address.
    pub ip_blocks: Constraint<IpNet>,
    /// `remoteIpBlocks` / `notRemoteIpBlocks`: the original client's address
    /// ([`crate::Request::remote_ip`]).
    pub remote_ip_blocks: Constraint<IpNet>,
}

/// One `to[].operation` at L4; empty → any operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationMatch {
    /// `ports` / `notPorts`.
    pub ports: Constraint<u16>,
}

/// One `when` condition at L4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `source.principal` (principal patterns, no scheme).
    SourcePrincipal(Constraint<StringMatch>),
    /// `source.namespace` (as `namespaces`).
    SourceNamespace(Constraint<NamespaceMatch>),
    /// `source.serviceAccount` (`ns/sa`, local trust domain).
    SourceServiceAccount(Constraint<ServiceAccountRef>),
    /// `source.ip` (CIDR or address).
    SourceIp(Constraint<IpNet>),
    /// `destination.ip` (CIDR or address).
    DestinationIp(Constraint<IpNet>),
    /// `destination.port`.
    DestinationPort(Constraint<u16>),
}

impl Condition {
    /// The `when` key this condition tests.
    pub fn key(&self) -> &'static str {
        match self {
            Condition::SourcePrincipal(_) => "source.principal",
            Condition::SourceNamespace(_) => "source.namespace",
            Condition::SourceServiceAccount(_) => "source.serviceAccount",
            Condition::SourceIp(_) => "source.ip",
            Condition::DestinationIp(_) => "destination.ip",
            Condition::DestinationPort(_) => "destination.port",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_semantics() {
        let c = Constraint {
            values: vec![1u16, 2],
            not_values: vec![2],
        };
        let eq = |v: &u16, a: u16| *v == a;
        assert!(c.check(Some(1), eq));
        assert!(!c.check(Some(2), eq), "notValues wins");
        assert!(!c.check(Some(3), eq));
        assert!(!c.check(None, eq), "values need the attribute");
        let only_not = Constraint {
            values: vec![],
            not_values: vec![5u16],
        };
        assert!(
            only_not.check(None, eq),
            "absent attribute satisfies notValues"
        );
        assert!(only_not.check(Some(4), eq));
        assert!(!only_not.check(Some(5), eq));
        assert!(Constraint::<u16>::default().check(None, eq));
    }

    #[test]
    fn selector() {
        let mut p = Policy {
            id: PolicyRef::new("ns", "p"),
            selector: BTreeMap::new(),
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        };
        let labels: BTreeMap<String, String> = [("app", "a"), ("v", "1")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert!(p.selects(&labels));
        p.selector.insert("app".into(), "a".into());
        assert!(p.selects(&labels));
        p.selector.insert("v".into(), "2".into());
        assert!(!p.selects(&labels));
        assert_eq!(p.id.to_string(), "ns/p");
        assert_eq!((p.namespace(), p.name()), ("ns", "p"));
    }
}
