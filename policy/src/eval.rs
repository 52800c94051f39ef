//! The decision: [`decide`] takes an index and one connection's attributes and returns the
//! verdict with the policy and rule that decided it, plus AUDIT and dry-run matches.
//!
//! Semantics (DESIGN.md §6): any matching DENY → deny; else if no ALLOW applies to the
//! destination → allow; else any matching ALLOW → allow; else deny. AUDIT never changes the
//! verdict; dry-run policies are evaluated and reported, never enforced. When several
//! policies of one kind match, the one reported is the first in the order mesh-wide,
//! namespace-wide, workload-selected, then by (namespace, name); its first matching rule is
//! reported. An L7 field left a rule of an ALLOW policy dead (it never matches); DENY and
//! AUDIT rules were compiled to their L4 part (see [`crate::policy`]).
//!
//! This module owns the meaning of an absent attribute (a plaintext source has no
//! principal, namespace or service account: positive fields fail, `not` fields hold; a
//! source of a federated trust domain has no *local* service account, and its namespace
//! matches only entries qualified with its trust domain — see [`crate::namespace`]) and
//! must stay pure and cheap: no I/O, no locks, and no allocation unless an AUDIT or dry-run
//! policy applies (or more than [`INLINE_PARTS`] selectors select the destination).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::compile::{Lists, PolicyIndex};
use crate::gate;
use crate::policy::{Action, Policy, PolicyRef};
use crate::program::{
    Addr, CondCode, CondKey, List, NamespaceCode, Net, Pattern, Program, RuleCode, SourceCode,
    TrustDomainId, check,
};

/// The authenticated source of a connection.
///
/// `namespace` and `service_account` must be the ones in `principal` (build it with
/// [`Source::from_principal`] or from a verified `WorkloadIdentity`); the index relies on it
/// to skip rules that name other namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source<'a> {
    /// SPIFFE ID without the scheme: `cluster.local/ns/training/sa/trainer`. Its first
    /// segment is the source's trust domain.
    pub principal: &'a str,
    /// Namespace from the SPIFFE ID.
    pub namespace: &'a str,
    /// Service account from the SPIFFE ID.
    pub service_account: &'a str,
}

impl<'a> Source<'a> {
    /// The trust domain: the principal up to its first `/`.
    #[inline]
    pub fn trust_domain(&self) -> &'a str {
        let principal: &'a str = self.principal;
        principal.split_once('/').map_or(principal, |(td, _)| td)
    }

    /// The source of a verified workload identity. Its principal (the SPIFFE ID without the
    /// scheme) is written into `principal`, which the source borrows; namespace and service
    /// account are the identity's own, so they always agree with the principal.
    pub fn from_identity(
        identity: &'a membrane_identity::WorkloadIdentity,
        principal: &'a mut String,
    ) -> Self {
        use std::fmt::Write as _;
        principal.clear();
        // Writing to a `String` cannot fail.
        let _ = write!(principal, "{identity}");
        if principal.starts_with(crate::matcher::SPIFFE_SCHEME) {
            principal.drain(..crate::matcher::SPIFFE_SCHEME.len());
        }
        Self {
            principal: principal.as_str(),
            namespace: identity.namespace(),
            service_account: identity.service_account(),
        }
    }

    /// Splits a principal `td/ns/N/sa/S` (with or without `spiffe://`); `None` if it does not
    /// have that shape. Names are not validated: the identity was verified by the handshake.
    pub fn from_principal(principal: &'a str) -> Option<Self> {
        let principal = principal
            .strip_prefix(crate::matcher::SPIFFE_SCHEME)
            .unwrap_or(principal);
        let mut parts = principal.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Some(Self {
                    principal,
                    namespace: ns,
                    service_account: sa,
                })
            }
            _ => None,
        }
    }
}

/// The source address of a connection whose source address is unknown (`::`, which no TCP
/// peer has). Address conditions then fail closed: an ALLOW rule with `ipBlocks`,
/// `notIpBlocks`, `remoteIpBlocks` (when no remote address was reported either) or a
/// `source.ip` condition never matches, and a DENY or AUDIT rule with one always does.
pub const UNKNOWN_SOURCE_IP: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// What the destination ztunnel knows about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's identity; `None` for a plaintext source (no identity).
    pub source: Option<Source<'a>>,
    /// The peer's address; [`UNKNOWN_SOURCE_IP`] when the destination cannot know it (a
    /// federated cluster's pod relayed by this cluster's east-west gateway).
    pub source_ip: IpAddr,
    /// The original client's address, when a trusted gateway carried the connection and
    /// reported it (`remoteIpBlocks`); `None`: the peer's address.
    pub remote_ip: Option<IpAddr>,
    /// Namespace of the destination workload.
    pub destination_namespace: &'a str,
    /// Labels of the destination workload.
    pub destination_labels: &'a BTreeMap<String, String>,
    /// Address the connection was made to.
    pub destination_ip: IpAddr,
    /// Port the connection was made to.
    pub destination_port: u16,
}

/// Admit or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Admit the connection.
    Allow,
    /// Refuse the connection.
    Deny,
}

impl Verdict {
    /// `ALLOW` or `DENY`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which branch of the decision order gave the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// A DENY rule matched ([`Decision::policy`] names it).
    DeniedBy,
    /// An ALLOW rule matched ([`Decision::policy`] names it).
    AllowedBy,
    /// No ALLOW policy applies to the destination: allowed by default.
    NoAllowPolicies,
    /// ALLOW policies apply, none matched: denied.
    NoAllowMatched,
}

impl DecisionReason {
    /// A stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::DeniedBy => "denied_by_policy",
            DecisionReason::AllowedBy => "allowed_by_policy",
            DecisionReason::NoAllowPolicies => "no_allow_policies",
            DecisionReason::NoAllowMatched => "no_allow_matched",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy and the index of its rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// The policy.
    pub policy: PolicyRef,
    /// Index in `spec.rules`.
    pub rule: usize,
}

/// A dry-run policy that applies to the destination, and what it would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunMatch {
    /// The policy.
    pub policy: PolicyRef,
    /// Its action.
    pub action: Action,
    /// Whether one of its rules matched.
    pub would_match: bool,
    /// The first rule that matched.
    pub rule: Option<usize>,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Admit or refuse.
    pub verdict: Verdict,
    /// Why.
    pub reason: DecisionReason,
    /// The deciding policy, for [`DecisionReason::DeniedBy`] and
    /// [`DecisionReason::AllowedBy`].
    pub policy: Option<PolicyRef>,
    /// The deciding rule's index in `spec.rules`, with `policy`.
    pub rule: Option<usize>,
    /// Matching AUDIT policies (first matching rule each), by (namespace, name).
    pub audit: Vec<RuleMatch>,
    /// Every dry-run policy that applies, by (namespace, name).
    pub dry_run: Vec<DryRunMatch>,
}

impl Decision {
    /// Whether the verdict is [`Verdict::Allow`].
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Decides one connection. Pure; allocates only for AUDIT and dry-run matches (and when more
/// than [`INLINE_PARTS`] selectors select the destination).
pub fn decide(index: &PolicyIndex, req: &Request<'_>) -> Decision {
    debug_assert!(
        req.source
            .is_none_or(|s| Source::from_principal(s.principal).is_none_or(|p| (
                p.namespace,
                p.service_account
            ) == (
                s.namespace,
                s.service_account
            ))),
        "Source::namespace and service_account must be those of the principal: {:?}",
        req.source
    );
    let prog = &index.program;
    // The source's trust domain, numbered once; entries compare numbers.
    let td = req.source.map(|s| prog.trust_domain_id(s.trust_domain()));
    let local = td == Some(TrustDomainId::LOCAL);
    let attrs = Attrs {
        namespace_bits: req.source.map_or(0, |s| gate::bits(s.namespace)),
        principal: req.source.map(|s| s.principal),
        namespace: req.source.zip(td).map(|(s, td)| (td, s.namespace)),
        service_account: req
            .source
            .filter(|_| local)
            .map(|s| (s.namespace, s.service_account)),
        source_ip: Some(req.source_ip)
            .filter(|ip| *ip != UNKNOWN_SOURCE_IP)
            .map(Addr::new),
        remote_ip: (req.remote_ip.or(Some(req.source_ip)))
            .filter(|ip| *ip != UNKNOWN_SOURCE_IP)
            .map(Addr::new),
        destination_ip: Addr::new(req.destination_ip),
        port: req.destination_port,
    };

    // The parts of the index that apply, in rank order.
    let mut parts = Parts::new();
    parts.push(MESH, &index.mesh);
    let scope = index.namespace_scope(req.destination_namespace);
    if let Some(scope) = scope {
        parts.push(NAMESPACE, &scope.all);
    }
    let labels = req.destination_labels;
    index
        .mesh_selectors
        .for_each_selected(labels, |l| parts.push(SELECTED, l));
    if let Some(scope) = scope {
        scope
            .selectors
            .for_each_selected(labels, |l| parts.push(SELECTED, l));
    }
    let parts = parts.as_slice();

    let deny = first_of(prog, parts, |l| &l.deny, Action::Deny, &attrs);
    let mut allow_applies = false;
    let mut allow = None;
    if deny.is_none() {
        allow_applies = parts.iter().any(|(_, l)| !l.allow.is_empty());
        if allow_applies {
            allow = first_of(prog, parts, |l| &l.allow, Action::Allow, &attrs);
        }
    }
    let mut audit: Vec<(u32, usize)> = Vec::new();
    let mut dry_run: Vec<(u32, Option<usize>)> = Vec::new();
    for (_, lists) in parts {
        for &idx in &lists.audit {
            if let Some(rule) = first_match(prog, idx, Action::Audit, &attrs) {
                audit.push((idx, rule));
            }
        }
        for &idx in &lists.dry_run {
            let action = prog
                .policies
                .get(idx as usize)
                .map_or(Action::Allow, |p| p.action);
            dry_run.push((idx, first_match(prog, idx, action, &attrs)));
        }
    }
    finish(index.policies(), deny, allow_applies, allow, audit, dry_run)
}

/// Scope ranks: the order in which policies of one kind take precedence in reporting.
const MESH: u8 = 0;
const NAMESPACE: u8 = 1;
const SELECTED: u8 = 2;

/// (scope rank, index in the sorted policy list).
type Key = (u8, u32);

/// How many applicable parts (mesh, namespace, one per matching selector) are held without
/// allocating.
pub const INLINE_PARTS: usize = 16;

/// Filler for the unused slots of [`Parts`].
static NO_POLICIES: Lists = Lists::EMPTY;

/// The applicable parts of the index, on the stack unless there are many.
struct Parts<'a> {
    inline: [(u8, &'a Lists); INLINE_PARTS],
    len: usize,
    spill: Vec<(u8, &'a Lists)>,
}

impl<'a> Parts<'a> {
    fn new() -> Self {
        Self {
            inline: [(0, &NO_POLICIES); INLINE_PARTS],
            len: 0,
            spill: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, rank: u8, lists: &'a Lists) {
        if self.len < INLINE_PARTS {
            self.inline[self.len] = (rank, lists);
            self.len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push((rank, lists));
        }
    }

    fn as_slice(&self) -> &[(u8, &'a Lists)] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
}

/// The first policy (by key) among `list` of every part whose rules match, and its rule.
/// Lists are ascending and parts come in rank order, so the search stops as soon as no
/// remaining policy can precede the best match found.
#[inline]
fn first_of(
    prog: &Program,
    parts: &[(u8, &Lists)],
    list: impl Fn(&Lists) -> &Vec<u32>,
    action: Action,
    attrs: &Attrs<'_>,
) -> Option<(Key, usize)> {
    let mut best: Option<(Key, usize)> = None;
    for &(rank, lists) in parts {
        if best.is_some_and(|((r, _), _)| r < rank) {
            break;
        }
        for &idx in list(lists) {
            let key = (rank, idx);
            if best.is_some_and(|(k, _)| k < key) {
                break;
            }
            if let Some(rule) = first_match(prog, idx, action, attrs) {
                best = Some((key, rule));
                break;
            }
        }
    }
    best
}

struct Attrs<'a> {
    /// Bloom bits of the source namespace (see `gate`); 0 without a source identity.
    namespace_bits: u64,
    principal: Option<&'a str>,
    /// The source's trust domain and namespace.
    namespace: Option<(TrustDomainId, &'a str)>,
    /// Only for a source of the local trust domain: service accounts name local ones.
    service_account: Option<(&'a str, &'a str)>,
    /// `None`: unknown ([`UNKNOWN_SOURCE_IP`]).
    source_ip: Option<Addr>,
    remote_ip: Option<Addr>,
    destination_ip: Addr,
    port: u16,
}

fn finish(
    policies: &[Policy],
    deny: Option<(Key, usize)>,
    allow_applies: bool,
    allow: Option<(Key, usize)>,
    mut audit: Vec<(u32, usize)>,
    mut dry_run: Vec<(u32, Option<usize>)>,
) -> Decision {
    let id = |idx: u32| policies[idx as usize].id.clone();
    audit.sort_unstable();
    dry_run.sort_unstable();
    let audit = audit
        .iter()
        .map(|&(idx, rule)| RuleMatch {
            policy: id(idx),
            rule,
        })
        .collect();
    let dry_run = dry_run
        .iter()
        .map(|&(idx, rule)| DryRunMatch {
            policy: id(idx),
            action: policies[idx as usize].action,
            would_match: rule.is_some(),
            rule,
        })
        .collect();
    let (verdict, reason, decided) = if let Some(d) = deny {
        (Verdict::Deny, DecisionReason::DeniedBy, Some(d))
    } else if !allow_applies {
        (Verdict::Allow, DecisionReason::NoAllowPolicies, None)
    } else if let Some(a) = allow {
        (Verdict::Allow, DecisionReason::AllowedBy, Some(a))
    } else {
        (Verdict::Deny, DecisionReason::NoAllowMatched, None)
    };
    Decision {
        verdict,
        reason,
        policy: decided.map(|((_, idx), _)| id(idx)),
        rule: decided.map(|(_, rule)| rule),
        audit,
        dry_run,
    }
}

/// The first rule of policy `idx` that matches, with the L7 fail-safe: a rule of an ALLOW
/// policy that had an L7 field never matches.
#[inline(always)]
fn first_match(prog: &Program, idx: u32, action: Action, a: &Attrs<'_>) -> Option<usize> {
    let allow = action == Action::Allow;
    let policy = prog.policies.get(idx as usize)?;
    if !gate::passes(policy.gate, a.namespace_bits) {
        return None;
    }
    let rules = prog.rules.get(policy.rules.range())?;
    rules.iter().position(|rule| {
        !(allow && rule.has_l7)
            && gate::passes(rule.gate, a.namespace_bits)
            && rule_matches(prog, rule, a, allow)
    })
}

#[inline(always)]
fn rule_matches(prog: &Program, rule: &RuleCode, a: &Attrs<'_>, allow: bool) -> bool {
    let port = |p: &u16, port: u16| *p == port;
    (rule.to.is_empty()
        || prog.operations[rule.to.range()]
            .iter()
            .any(|&ports| check(&prog.ports, ports, Some(a.port), port)))
        && (rule.from.is_empty()
            || prog.sources[rule.from.range()]
                .iter()
                .any(|s| source_matches(prog, s, a, allow)))
        && prog.conditions[rule.when.range()]
            .iter()
            .all(|c| condition_matches(prog, c, a, allow))
}

/// An address list against an address that may be unknown: an unknown one fails an ALLOW's
/// list and satisfies any other's (fail closed), whatever the list says.
#[inline(always)]
fn ip_check(prog: &Program, list: List, ip: Option<Addr>, allow: bool) -> bool {
    match ip {
        Some(ip) => check(&prog.nets, list, Some(ip), in_net),
        None => (list.values.is_empty() && list.not_values.is_empty()) || !allow,
    }
}

#[inline(always)]
fn source_matches(prog: &Program, s: &SourceCode, a: &Attrs<'_>, allow: bool) -> bool {
    ip_check(prog, s.ip_blocks, a.source_ip, allow)
        && ip_check(prog, s.remote_ip_blocks, a.remote_ip, allow)
        && check(&prog.patterns, s.principals, a.principal, Pattern::matches)
        && check(
            &prog.namespaces,
            s.namespaces,
            a.namespace,
            NamespaceCode::matches,
        )
        && check(
            &prog.accounts,
            s.service_accounts,
            a.service_account,
            account,
        )
}

fn condition_matches(prog: &Program, c: &CondCode, a: &Attrs<'_>, allow: bool) -> bool {
    let l = c.list;
    match c.key {
        CondKey::SourcePrincipal => check(&prog.patterns, l, a.principal, Pattern::matches),
        CondKey::SourceNamespace => check(&prog.namespaces, l, a.namespace, NamespaceCode::matches),
        CondKey::SourceServiceAccount => check(&prog.accounts, l, a.service_account, account),
        CondKey::SourceIp => ip_check(prog, l, a.source_ip, allow),
        CondKey::DestinationIp => check(&prog.nets, l, Some(a.destination_ip), in_net),
        CondKey::DestinationPort => check(&prog.ports, l, Some(a.port), |p: &u16, port| *p == port),
    }
}

#[inline]
fn in_net(net: &Net, ip: Addr) -> bool {
    net.contains(ip)
}

#[inline]
fn account(sa: &(Pattern, Pattern), (ns, name): (&str, &str)) -> bool {
    sa.1.matches(name) && sa.0.matches(ns)
}

#[cfg(test)]
#[path = "eval_tests.rs"]
mod tests;
