//! The evaluation-ready encoding of policies: every rule, source, operation, condition and
//! value of an index flattened into a few contiguous arrays addressed by `u32` spans.
//!
//! A [`Policy`] is a tree of small heap allocations; walking it costs a chain of dependent
//! loads per rule, which dominated the decision time with 50 applicable policies. Here the
//! policies of one namespace sit next to each other in each array, and a string pattern
//! carries its length and last eight bytes inline, so a mismatch is decided without touching
//! the pattern's text. This module owns that layout and the value comparisons; it must not
//! decide what a match means (absent attributes, L7 fail-safe, order): that is `eval`.

use std::net::IpAddr;

use crate::gate;
use crate::matcher::{IpNet, ServiceAccountRef, StringMatch};
use crate::namespace::{NamespaceMatch, TrustDomainMatch};
use crate::policy::{Action, Condition, Constraint, Policy};

/// `start..end` in one of the [`Program`] arrays.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    start: u32,
    end: u32,
}

impl Span {
    #[inline]
    pub(crate) fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    #[inline]
    pub(crate) fn is_empty(self) -> bool {
        self.start == self.end
    }
}

/// A positive and a negated list (see [`Constraint`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct List {
    pub(crate) values: Span,
    pub(crate) not_values: Span,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct PolicyCode {
    pub(crate) rules: Span,
    /// See `gate`: 0, or the union of the rules' gates.
    pub(crate) gate: u64,
    pub(crate) action: Action,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleCode {
    pub(crate) from: Span,
    pub(crate) to: Span,
    pub(crate) when: Span,
    pub(crate) has_l7: bool,
    /// See `gate`: 0, or the source namespaces this rule can match.
    pub(crate) gate: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceCode {
    /// Into `patterns`.
    pub(crate) principals: List,
    /// Into `namespaces`.
    pub(crate) namespaces: List,
    /// Into `accounts`.
    pub(crate) service_accounts: List,
    /// Into `nets`.
    pub(crate) ip_blocks: List,
    /// Into `nets`.
    pub(crate) remote_ip_blocks: List,
}

/// The attribute a condition tests; its list points into the array of that value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CondKey {
    SourcePrincipal,
    SourceNamespace,
    SourceServiceAccount,
    SourceIp,
    DestinationIp,
    DestinationPort,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CondCode {
    pub(crate) key: CondKey,
    pub(crate) list: List,
}

/// A [`StringMatch`] as one uniform comparison, so that matching a list of mixed patterns
/// has no data-dependent jump: the value's slice `[off, off + len)` must equal `text`, where
/// `off` is 0 (exact, prefix) or `value.len() - len` (suffix), and an exact pattern also
/// needs `value.len() == len`. `*` is the empty prefix. The last eight bytes of `text` are
/// kept inline and compared first, so a mismatch rarely reads `text`.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    len: usize,
    whole: bool,
    from_end: bool,
    tail: u64,
    text: Box<str>,
}

impl Pattern {
    fn new(m: &StringMatch) -> Self {
        let (text, whole, from_end) = match m {
            StringMatch::Exact(s) => (s.clone(), true, false),
            StringMatch::Prefix(s) => (s.clone(), false, false),
            StringMatch::Suffix(s) => (s.clone(), false, true),
            StringMatch::Any => (Box::from(""), false, false),
        };
        let tail = text
            .as_bytes()
            .last_chunk::<8>()
            .map_or(0, |c| u64::from_le_bytes(*c));
        Self {
            len: text.len(),
            whole,
            from_end,
            tail,
            text,
        }
    }

    fn exact(s: &str) -> Self {
        Self::new(&StringMatch::Exact(s.into()))
    }

    /// Whether a present value matches (same meaning as [`StringMatch::matches`]).
    #[inline(always)]
    pub(crate) fn matches(&self, value: &str) -> bool {
        let v = value.as_bytes();
        if v.len() < self.len || (self.whole && v.len() != self.len) {
            return false;
        }
        let off = if self.from_end { v.len() - self.len } else { 0 };
        let Some(part) = v.get(off..off + self.len) else {
            return false;
        };
        match part.last_chunk::<8>() {
            Some(last) => u64::from_le_bytes(*last) == self.tail && part == self.text.as_bytes(),
            None => part == self.text.as_bytes(),
        }
    }
}

/// A trust domain as the program numbers it: [`TrustDomainId::LOCAL`] for the index's own,
/// one number per trust domain a qualified namespace entry names, [`TrustDomainId::OTHER`]
/// for a source from any other, [`TrustDomainId::ANY`] for an entry that covers them all.
/// A source's trust domain is looked up once per decision; entries then compare integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TrustDomainId(u32);

impl TrustDomainId {
    pub(crate) const LOCAL: Self = Self(0);
    /// A source trust domain no entry names (and not the local one).
    pub(crate) const OTHER: Self = Self(u32::MAX - 1);
    /// An entry's `*/…`: never a source's.
    const ANY: Self = Self(u32::MAX);
    /// An entry whose trust domain could not be numbered: matches no source.
    const NEVER: Self = Self(u32::MAX - 2);

    /// The id at position `i` of [`Program::trust_domains`], or `beyond` if it has none.
    fn at(i: usize, beyond: Self) -> Self {
        u32::try_from(i)
            .ok()
            .filter(|&i| i < Self::NEVER.0)
            .map_or(beyond, Self)
    }
}

/// A [`NamespaceMatch`] encoded: the trust domain as a number, the namespace as a pattern.
#[derive(Debug, Clone)]
pub(crate) struct NamespaceCode {
    trust_domain: TrustDomainId,
    namespace: Pattern,
}

impl NamespaceCode {
    /// Whether a source from `namespace` of trust domain `td` (from
    /// [`Program::trust_domain_id`]) matches.
    #[inline(always)]
    pub(crate) fn matches(&self, (td, namespace): (TrustDomainId, &str)) -> bool {
        (self.trust_domain == td || self.trust_domain == TrustDomainId::ANY)
            && self.namespace.matches(namespace)
    }
}

/// An address as one integer: IPv4 in the low 32 bits, with the family alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addr {
    v4: bool,
    bits: u128,
}

impl Addr {
    /// Encodes an address; IPv4-mapped IPv6 addresses become IPv4.
    #[inline]
    pub(crate) fn new(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Self {
                v4: true,
                bits: u128::from(u32::from(a)),
            },
            IpAddr::V6(a) => Self {
                v4: false,
                bits: u128::from(a),
            },
        }
    }
}

/// An [`IpNet`] with its mask computed once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Net {
    v4: bool,
    addr: u128,
    mask: u128,
}

impl Net {
    fn new(net: &IpNet) -> Self {
        // Not canonicalised: `IpNet` already holds IPv4-mapped networks as IPv4.
        let (v4, bits) = match net.addr() {
            IpAddr::V4(a) => (true, u128::from(u32::from(a))),
            IpAddr::V6(a) => (false, u128::from(a)),
        };
        let width = if v4 { 32 } else { 128 };
        let host = u128::MAX
            .checked_shr(u32::from(net.prefix()) + (128 - width))
            .unwrap_or(0);
        let all = u128::MAX.checked_shr(128 - width).unwrap_or(u128::MAX);
        Self {
            v4,
            addr: bits,
            mask: all & !host,
        }
    }

    /// Whether `ip` lies in this network (same meaning as [`IpNet::contains`]).
    #[inline(always)]
    pub(crate) fn contains(&self, ip: Addr) -> bool {
        self.v4 == ip.v4 && ip.bits & self.mask == self.addr
    }
}

/// Every enforced detail of the policies of one index, flattened.
#[derive(Debug, Clone, Default)]
pub(crate) struct Program {
    /// One per policy, in the index's policy order.
    pub(crate) policies: Vec<PolicyCode>,
    pub(crate) rules: Vec<RuleCode>,
    pub(crate) sources: Vec<SourceCode>,
    /// Port lists of `to` entries.
    pub(crate) operations: Vec<List>,
    pub(crate) conditions: Vec<CondCode>,
    pub(crate) patterns: Vec<Pattern>,
    /// Source-namespace entries (`namespaces`, `source.namespace`).
    pub(crate) namespaces: Vec<NamespaceCode>,
    /// Trust domains by [`TrustDomainId`]: the local one first, then those that qualified
    /// namespace entries name.
    trust_domains: Vec<Box<str>>,
    /// (namespace, service account), both exact.
    pub(crate) accounts: Vec<(Pattern, Pattern)>,
    pub(crate) nets: Vec<Net>,
    pub(crate) ports: Vec<u16>,
}

/// Converts an array length to a span bound. Indexes hold far fewer than 2³² values; a
/// larger one saturates (and is then cut short) rather than panic.
fn bound(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn push_all<T, U>(out: &mut Vec<U>, items: &[T], f: impl Fn(&T) -> U) -> Span {
    let start = bound(out.len());
    out.extend(items.iter().map(f));
    Span {
        start,
        end: bound(out.len()),
    }
}

impl Program {
    /// Encodes `policies`, in order, as evaluated in `trust_domain`.
    pub(crate) fn build(policies: &[Policy], trust_domain: &str) -> Self {
        let mut p = Program {
            trust_domains: vec![trust_domain.into()],
            ..Program::default()
        };
        for policy in policies {
            let start = bound(p.rules.len());
            let mut gates = Vec::with_capacity(policy.rules.len());
            for rule in &policy.rules {
                let from = Span {
                    start: bound(p.sources.len()),
                    end: bound(p.sources.len() + rule.from.len()),
                };
                for s in &rule.from {
                    let code = SourceCode {
                        principals: p.strings(&s.principals),
                        namespaces: p.namespaces(&s.namespaces),
                        service_accounts: p.accounts(&s.service_accounts),
                        ip_blocks: p.nets(&s.ip_blocks),
                        remote_ip_blocks: p.nets(&s.remote_ip_blocks),
                    };
                    p.sources.push(code);
                }
                let to = Span {
                    start: bound(p.operations.len()),
                    end: bound(p.operations.len() + rule.to.len()),
                };
                for op in &rule.to {
                    let ports = p.ports(&op.ports);
                    p.operations.push(ports);
                }
                let when = Span {
                    start: bound(p.conditions.len()),
                    end: bound(p.conditions.len() + rule.when.len()),
                };
                for c in &rule.when {
                    let code = match c {
                        Condition::SourcePrincipal(m) => (CondKey::SourcePrincipal, p.strings(m)),
                        Condition::SourceNamespace(m) => {
                            (CondKey::SourceNamespace, p.namespaces(m))
                        }
                        Condition::SourceServiceAccount(m) => {
                            (CondKey::SourceServiceAccount, p.accounts(m))
                        }
                        Condition::SourceIp(m) => (CondKey::SourceIp, p.nets(m)),
                        Condition::DestinationIp(m) => (CondKey::DestinationIp, p.nets(m)),
                        Condition::DestinationPort(m) => (CondKey::DestinationPort, p.ports(m)),
                    };
                    p.conditions.push(CondCode {
                        key: code.0,
                        list: code.1,
                    });
                }
                let gate = gate::rule(rule);
                gates.push(gate);
                p.rules.push(RuleCode {
                    from,
                    to,
                    when,
                    has_l7: rule.has_l7,
                    gate,
                });
            }
            p.policies.push(PolicyCode {
                rules: Span {
                    start,
                    end: bound(p.rules.len()),
                },
                action: policy.action,
                gate: gate::policy(&gates),
            });
        }
        p
    }

    fn strings(&mut self, c: &Constraint<StringMatch>) -> List {
        List {
            values: push_all(&mut self.patterns, &c.values, Pattern::new),
            not_values: push_all(&mut self.patterns, &c.not_values, Pattern::new),
        }
    }

    fn namespaces(&mut self, c: &Constraint<NamespaceMatch>) -> List {
        List {
            values: self.push_namespaces(&c.values),
            not_values: self.push_namespaces(&c.not_values),
        }
    }

    fn push_namespaces(&mut self, items: &[NamespaceMatch]) -> Span {
        let start = bound(self.namespaces.len());
        for m in items {
            let trust_domain = match &m.trust_domain {
                TrustDomainMatch::Local => TrustDomainId::LOCAL,
                TrustDomainMatch::Any => TrustDomainId::ANY,
                TrustDomainMatch::Named(td) => self.intern(td),
            };
            self.namespaces.push(NamespaceCode {
                trust_domain,
                namespace: Pattern::new(&m.namespace),
            });
        }
        Span {
            start,
            end: bound(self.namespaces.len()),
        }
    }

    /// The number of a trust domain a qualified entry names (the local one is 0).
    fn intern(&mut self, td: &str) -> TrustDomainId {
        let i = match self.trust_domains.iter().position(|t| **t == *td) {
            Some(i) => i,
            None => {
                self.trust_domains.push(td.into());
                self.trust_domains.len() - 1
            }
        };
        TrustDomainId::at(i, TrustDomainId::NEVER)
    }

    /// The number of a source's trust domain: one comparison per trust domain the policies
    /// name (usually one or two), once per decision.
    #[inline]
    pub(crate) fn trust_domain_id(&self, td: &str) -> TrustDomainId {
        match self.trust_domains.iter().position(|t| **t == *td) {
            Some(i) => TrustDomainId::at(i, TrustDomainId::OTHER),
            None => TrustDomainId::OTHER,
        }
    }

    /// The trust domain the program was built for.
    pub(crate) fn local_trust_domain(&self) -> &str {
        self.trust_domains
            .first()
            .map_or(membrane_identity::spiffe_id::DEFAULT_TRUST_DOMAIN, |t| t)
    }

    fn accounts(&mut self, c: &Constraint<ServiceAccountRef>) -> List {
        let enc =
            |sa: &ServiceAccountRef| (Pattern::exact(sa.namespace()), Pattern::exact(sa.name()));
        List {
            values: push_all(&mut self.accounts, &c.values, enc),
            not_values: push_all(&mut self.accounts, &c.not_values, enc),
        }
    }

    fn nets(&mut self, c: &Constraint<IpNet>) -> List {
        List {
            values: push_all(&mut self.nets, &c.values, Net::new),
            not_values: push_all(&mut self.nets, &c.not_values, Net::new),
        }
    }

    fn ports(&mut self, c: &Constraint<u16>) -> List {
        List {
            values: push_all(&mut self.ports, &c.values, |p| *p),
            not_values: push_all(&mut self.ports, &c.not_values, |p| *p),
        }
    }
}

/// Evaluates one list against an attribute that may be absent: `values` need the attribute
/// and one match, `not_values` need the attribute absent or no match.
#[inline(always)]
pub(crate) fn check<T, A: Copy>(
    items: &[T],
    list: List,
    attr: Option<A>,
    matches: impl Fn(&T, A) -> bool,
) -> bool {
    if !list.values.is_empty() {
        let Some(a) = attr else { return false };
        if !items[list.values.range()].iter().any(|v| matches(v, a)) {
            return false;
        }
    }
    if !list.not_values.is_empty()
        && let Some(a) = attr
        && items[list.not_values.range()].iter().any(|v| matches(v, a))
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_agree_with_string_match() {
        let patterns = [
            "*",
            "cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/*",
            "c/*",
            "*/sa/b",
            "*b",
            "cluster.local/ns/training/sa/trainer",
        ];
        let values = [
            "cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/sa/bb",
            "cluster.local/ns/ab/sa/b",
            "c/x",
            "b",
            "",
            "cluster.local/ns/training/sa/trainer",
            "cluster.local/ns/training/sa/trainee",
        ];
        for p in patterns {
            let m = StringMatch::principal(p)
                .or_else(|_| match p {
                    "c/*" => Ok(StringMatch::Prefix("c/".into())),
                    "*b" => Ok(StringMatch::Suffix("b".into())),
                    _ => Err(()),
                })
                .expect("pattern");
            let code = Pattern::new(&m);
            for v in values {
                assert_eq!(code.matches(v), m.matches(v), "{p} vs {v}");
            }
        }
    }

    #[test]
    fn nets_agree_with_ip_net() {
        let nets = [
            "10.0.0.0/8",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "fd00::/8",
            "::/0",
            "::1/128",
            "10.1.0.0/17",
        ];
        let ips = [
            "10.1.2.3",
            "10.255.0.1",
            "11.0.0.1",
            "fd12::1",
            "::1",
            "::ffff:10.1.2.3",
            "fe80::1",
        ];
        for n in nets {
            let net: IpNet = n.parse().expect("net");
            let code = Net::new(&net);
            for ip in ips {
                let ip: IpAddr = ip.parse().expect("ip");
                assert_eq!(
                    code.contains(Addr::new(ip)),
                    net.contains(ip.to_canonical()),
                    "{n} {ip}"
                );
            }
        }
    }

    #[test]
    fn check_semantics() {
        let items = [1u16, 2, 2];
        let list = List {
            values: Span { start: 0, end: 2 },
            not_values: Span { start: 2, end: 3 },
        };
        let eq = |v: &u16, a: u16| *v == a;
        assert!(check(&items, list, Some(1), eq));
        assert!(!check(&items, list, Some(2), eq));
        assert!(!check(&items, list, None, eq));
        let only_not = List {
            values: Span::default(),
            not_values: Span { start: 2, end: 3 },
        };
        assert!(check(&items, only_not, None, eq));
        assert!(!check(&items, only_not, Some(2), eq));
    }
}
