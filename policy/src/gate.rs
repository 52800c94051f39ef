//! Source-namespace gates: a cheap necessary condition computed per rule and per policy when
//! the index is built, so that `decide` skips, with one integer test, the rules that cannot
//! concern the caller.
//!
//! Most L4 rules name their sources (`principals`, `namespaces`, `serviceAccounts`, or the
//! `source.*` keys of `when`), and every such value pins the source namespace — an exact
//! principal `td/ns/N/sa/S`, a prefix `td/ns/N/…`, a namespace `N`, an account `N/S`. A rule
//! that can only match sources from a known set of namespaces gets a 64-bit Bloom filter of
//! that set; a request carries the two bits of its source namespace. A gate only ever says
//! "cannot match": false positives just mean the rule is evaluated as before. A gate of `0`
//! means "no gate".
//!
//! This module owns the derivation of gates from rules and must stay sound: a rule may get a
//! gate only if *every* way for it to match requires the source namespace to be in the set.
//! It relies on `eval::Source::namespace` being the namespace of `eval::Source::principal`.

use std::hash::Hasher;

use crate::hash::FxHasher;
use crate::matcher::{ServiceAccountRef, StringMatch};
use crate::namespace::NamespaceMatch;
use crate::policy::{Condition, Constraint, Rule, SourceMatch};

/// The Bloom bits of one namespace (two bits, from the well-mixed high bits; never zero).
#[inline]
pub(crate) fn bits(namespace: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(namespace.as_bytes());
    let h = h.finish();
    (1 << (h >> 58)) | (1 << ((h >> 52) & 63))
}

/// Whether a request whose source namespace has `bits` (0 = no source identity) may match
/// something behind `gate`.
#[inline]
pub(crate) fn passes(gate: u64, bits: u64) -> bool {
    gate == 0 || (bits != 0 && gate & bits == bits)
}

/// The gate of a rule, or 0.
pub(crate) fn rule(rule: &Rule) -> u64 {
    if !rule.from.is_empty() {
        let mut gate = 0;
        for source in &rule.from {
            match self::source(source) {
                0 => {
                    gate = 0;
                    break;
                }
                g => gate |= g,
            }
        }
        if gate != 0 {
            return gate;
        }
    }
    rule.when
        .iter()
        .map(condition)
        .find(|&g| g != 0)
        .unwrap_or(0)
}

/// The gate of a policy: the union of its rules' gates if every rule has one, else 0.
pub(crate) fn policy(rule_gates: &[u64]) -> u64 {
    if rule_gates.contains(&0) {
        return 0;
    }
    rule_gates.iter().fold(0, |acc, g| acc | g)
}

/// One `from` source: any of its positive constraints that pins the namespace (they are
/// AND-ed, so one suffices).
fn source(s: &SourceMatch) -> u64 {
    [
        principals(&s.principals),
        namespaces(&s.namespaces),
        accounts(&s.service_accounts),
    ]
    .into_iter()
    .find(|&g| g != 0)
    .unwrap_or(0)
}

fn condition(c: &Condition) -> u64 {
    match c {
        Condition::SourcePrincipal(m) => principals(m),
        Condition::SourceNamespace(m) => namespaces(m),
        Condition::SourceServiceAccount(m) => accounts(m),
        Condition::SourceIp(_) | Condition::DestinationIp(_) | Condition::DestinationPort(_) => 0,
    }
}

/// The union of the values' namespaces, or 0 if the list is empty or one value does not pin
/// a namespace.
fn set<T>(values: &[T], namespace_of: impl Fn(&T) -> Option<&str>) -> u64 {
    let mut gate = 0;
    for v in values {
        match namespace_of(v) {
            Some(ns) => gate |= bits(ns),
            None => return 0,
        }
    }
    gate
}

fn principals(c: &Constraint<StringMatch>) -> u64 {
    set(&c.values, principal_namespace)
}

/// A namespace entry pins its namespace part, whatever trust domain it names.
fn namespaces(c: &Constraint<NamespaceMatch>) -> u64 {
    set(&c.values, |m| match &m.namespace {
        StringMatch::Exact(ns) => Some(ns),
        _ => None,
    })
}

fn accounts(c: &Constraint<ServiceAccountRef>) -> u64 {
    set(&c.values, |sa| Some(sa.namespace()))
}

/// The namespace an exact principal `td/ns/N/sa/S`, or a prefix that contains the whole
/// `td/ns/N/`, requires.
fn principal_namespace(m: &StringMatch) -> Option<&str> {
    let (text, exact) = match m {
        StringMatch::Exact(s) => (&**s, true),
        StringMatch::Prefix(s) => (&**s, false),
        StringMatch::Suffix(_) | StringMatch::Any => return None,
    };
    let mut parts = text.split('/');
    let (_trust_domain, keyword, ns) = (parts.next()?, parts.next()?, parts.next()?);
    // A prefix must close the namespace segment (`…/ns/N/`), or `…/ns/tra` would pin `tra`.
    if keyword != "ns" || ns.is_empty() || (!exact && parts.next().is_none()) {
        return None;
    }
    Some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::OperationMatch;

    fn p(s: &str) -> StringMatch {
        StringMatch::principal(s).expect("pattern")
    }

    #[test]
    fn namespaces_pinned_by_principals() {
        assert_eq!(principal_namespace(&p("td/ns/a/sa/b")), Some("a"));
        assert_eq!(principal_namespace(&p("td/ns/a/*")), Some("a"));
        assert_eq!(principal_namespace(&p("td/ns/a/sa/*")), Some("a"));
        assert_eq!(principal_namespace(&p("td/ns/a*")), None);
        assert_eq!(principal_namespace(&p("td/ns/*")), None);
        assert_eq!(principal_namespace(&p("td/*")), None);
        assert_eq!(principal_namespace(&p("*/sa/b")), None);
        assert_eq!(principal_namespace(&p("*")), None);
    }

    #[test]
    fn gates() {
        let source = |principals: Vec<StringMatch>| SourceMatch {
            principals: Constraint {
                values: principals,
                not_values: vec![],
            },
            ..SourceMatch::default()
        };
        let gated = Rule {
            from: vec![source(vec![p("td/ns/a/sa/x"), p("td/ns/b/*")])],
            ..Rule::default()
        };
        let g = rule(&gated);
        assert_ne!(g, 0);
        assert!(passes(g, bits("a")));
        assert!(passes(g, bits("b")));
        assert!(
            !passes(g, 0),
            "a plaintext source cannot match a gated rule"
        );
        // One ungated source ungates the rule.
        let open = Rule {
            from: vec![source(vec![p("td/ns/a/sa/x")]), source(vec![p("*/sa/x")])],
            ..Rule::default()
        };
        assert_eq!(rule(&open), 0);
        assert!(passes(0, 0));
        // No `from`: ungated unless a `when` condition pins the namespace.
        let ports = Rule {
            to: vec![OperationMatch::default()],
            ..Rule::default()
        };
        assert_eq!(rule(&ports), 0);
        let when = Rule {
            when: vec![
                Condition::DestinationPort(Constraint {
                    values: vec![80],
                    not_values: vec![],
                }),
                Condition::SourceNamespace(Constraint {
                    values: vec![NamespaceMatch::local(StringMatch::Exact("c".into()))],
                    not_values: vec![],
                }),
            ],
            ..Rule::default()
        };
        assert!(passes(rule(&when), bits("c")));
        // Negated lists never gate.
        let not = Rule {
            from: vec![SourceMatch {
                principals: Constraint {
                    values: vec![],
                    not_values: vec![p("td/ns/a/sa/x")],
                },
                ..SourceMatch::default()
            }],
            ..Rule::default()
        };
        assert_eq!(rule(&not), 0);
        assert_eq!(policy(&[g, 0]), 0);
        assert_eq!(policy(&[g, bits("z")]), g | bits("z"));
    }
}
