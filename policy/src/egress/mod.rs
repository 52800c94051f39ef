//! `EgressPolicy` (`security.membrane.dev/v1`, DESIGN.md §9): which destinations outside the
//! mesh a workload may reach, decided at the source on (source identity, the *name* the pod
//! itself resolved the address under, port, TLS server name).
//!
//! Flow: text → [`validate::parse_egress_policies`] (or a typed [`model::EgressPolicyDoc`] →
//! [`validate::check_egress`]) → [`EgressPolicy`] values → [`decide_egress`] per connection,
//! given the policies that select the source ([`EgressIndex::selecting`]: scope as for
//! AuthorizationPolicy); [`wire`] converts to and from `membrane.v1.EgressPolicy`,
//! re-validating on receipt. Like the rest of this crate it does no I/O and never panics on
//! input; budget accounting is the caller's.
//!
//! Semantics: a matching DENY denies; if an ALLOW selects the source, only destinations one
//! of its rules matches pass (default deny for that source); without an ALLOW the connection
//! passes through. A `to` entry matches when its ports (if any) contain the port and either
//! one of its hosts matches a name the pod resolved the address under, or one of its
//! `ipBlocks` contains the address (an entry with neither matches any destination on its
//! ports). A literal address the pod never resolved matches no host. On TLS, a host match
//! also needs the ClientHello's SNI to be the pinned name or to match the host pattern
//! (`sni_mismatch`); no SNI where a host rule decides → `sni_missing`, unless the entry says
//! `allowMissingSni`; a TLS handshake whose ClientHello cannot be read
//! ([`EgressRequest::sni_unreadable`]) matches no host rule (`sni_unreadable`, which
//! `allowMissingSni` does not cover). A DENY host rule matches the pinned names *or* the SNI (a lie about the
//! name cannot dodge a deny). AUDIT and dry-run policies are reported, never enforced. An
//! ALLOW rule may name an egress gateway (`via`): the decision carries it, and the connection
//! must leave through that gateway, never directly.

pub mod index;
pub mod model;
pub mod validate;
pub mod wire;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::Source;
use crate::matcher::{IpNet, ServiceAccountRef, StringMatch};

pub use index::EgressIndex;
pub use validate::{EgressError, check_egress, check_egress_value, parse_egress_policies};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EgressAction {
    /// Allow (and, for the sources selected, deny everything else).
    Allow,
    /// Deny.
    Deny,
    /// Record only.
    Audit,
}

/// A validated host pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// The name itself.
    Exact(String),
    /// Names ending with this (`.suffix.example`: strictly below it, not the suffix itself).
    Suffix(String),
}

impl HostPattern {
    /// Whether `name` (lower-case, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(h) => name == h,
            HostPattern::Suffix(s) => name.len() > s.len() && name.ends_with(s.as_str()),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A source condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressFrom {
    /// Principal patterns.
    pub principals: Vec<StringMatch>,
    /// Service accounts.
    pub service_accounts: Vec<ServiceAccountRef>,
}

/// A destination condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressTo {
    /// Host patterns.
    pub hosts: Vec<HostPattern>,
    /// Ports; empty: any.
    pub ports: Vec<u16>,
    /// Address blocks.
    pub ip_blocks: Vec<IpNet>,
    /// A TLS connection without SNI may match the hosts.
    pub allow_missing_sni: bool,
}

/// An egress gateway, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// Sources (any); empty: every source the policy selects.
    pub from: Vec<EgressFrom>,
    /// Destinations (any); empty: none (a rule must say where).
    pub to: Vec<EgressTo>,
    /// The egress gateway its connections must leave through (ALLOW only); `None`: from the
    /// source's node.
    pub via: Option<GatewayRef>,
}

/// A byte budget per (source identity, host, window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes sent per window.
    pub sent_bytes: Option<u64>,
    /// Bytes received per window.
    pub received_bytes: Option<u64>,
    /// The window.
    pub per: Duration,
}

/// A validated `EgressPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `matchLabels`; empty: the whole namespace.
    pub selector: BTreeMap<String, String>,
    /// Action.
    pub action: EgressAction,
    /// Rules.
    pub rules: Vec<EgressRule>,
    /// Budget (ALLOW only).
    pub budget: Option<Budget>,
    /// Reported, never enforced.
    pub dry_run: bool,
}

impl EgressPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One connection leaving the mesh, as the source ztunnel sees it.
#[derive(Debug, Clone, Copy)]
pub struct EgressRequest<'a> {
    /// The source workload.
    pub source: Source<'a>,
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// The names this pod resolved `ip` under (its own, live pins; most recent first).
    pub pinned: &'a [&'a str],
    /// The ClientHello's server name, lower-case, if the connection began with one.
    pub sni: Option<&'a str>,
    /// Whether the connection is TLS (began with a ClientHello, or is on a TLS port).
    pub tls: bool,
    /// The connection began like a TLS handshake whose ClientHello could not be read
    /// (malformed, refused by the parser, or too long): TLS with an unknown server name. It
    /// matches no ALLOW host rule, `allowMissingSni` or not.
    pub sni_unreadable: bool,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressVerdict {
    /// No ALLOW selects the source and no DENY matched: the connection passes through.
    Passthrough,
    /// An ALLOW rule matched.
    Allow,
    /// Denied.
    Deny,
}

/// Why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressReason {
    /// No enforced policy applies.
    NoPolicy,
    /// A rule matched.
    Matched,
    /// An ALLOW selects the source and none of its rules matched.
    NotAllowed,
    /// A host rule matched the pin, but the SNI names something else.
    SniMismatch,
    /// A host rule matched the pin, but the TLS connection sent no SNI.
    SniMissing,
    /// A host rule matched the pin, but the TLS connection's ClientHello could not be read.
    SniUnreadable,
}

impl EgressReason {
    /// As records and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressReason::NoPolicy => "no_policy",
            EgressReason::Matched => "matched",
            EgressReason::NotAllowed => "not_allowed",
            EgressReason::SniMismatch => "sni_mismatch",
            EgressReason::SniMissing => "sni_missing",
            EgressReason::SniUnreadable => "sni_unreadable",
        }
    }
}

/// A decision: the verdict, why, the deciding policy and rule, the host that matched, and the
/// AUDIT and dry-run policies that would have matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressDecision {
    /// Verdict.
    pub verdict: EgressVerdict,
    /// Reason.
    pub reason: EgressReason,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// Index of the deciding rule.
    pub rule: Option<usize>,
    /// The pinned name (or SNI, for a DENY) the deciding rule matched.
    pub host: Option<String>,
    /// The budget of the deciding ALLOW policy.
    pub budget: Option<Budget>,
    /// The egress gateway the deciding ALLOW rule sends the connection through.
    pub via: Option<GatewayRef>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
    /// Dry-run policies that would have matched.
    pub dry_run: Vec<String>,
}

/// How one rule fared against a request.
enum RuleOutcome {
    Match(Option<String>),
    Sni(EgressReason),
    NoMatch,
}

fn from_matches(from: &[EgressFrom], source: &Source<'_>) -> bool {
    from.is_empty()
        || from.iter().any(|f| {
            f.principals.iter().any(|p| p.matches(source.principal))
                || f.service_accounts
                    .iter()
                    .any(|sa| sa.matches(source.namespace, source.service_account))
        })
}

fn to_outcome(to: &EgressTo, req: &EgressRequest<'_>, deny: bool) -> RuleOutcome {
    if !to.ports.is_empty() && !to.ports.contains(&req.port) {
        return RuleOutcome::NoMatch;
    }
    if to.hosts.is_empty() && to.ip_blocks.is_empty() {
        return RuleOutcome::Match(None);
    }
    if to.ip_blocks.iter().any(|b| b.contains(req.ip)) {
        return RuleOutcome::Match(None);
    }
    let pinned = req
        .pinned
        .iter()
        .find(|name| to.hosts.iter().any(|h| h.matches(name)));
    if deny {
        // A deny matches what the pod resolved or what it claims in the SNI.
        let claimed = req.sni.filter(|s| to.hosts.iter().any(|h| h.matches(s)));
        return match pinned.copied().or(claimed) {
            Some(name) => RuleOutcome::Match(Some(name.to_owned())),
            None => RuleOutcome::NoMatch,
        };
    }
    let Some(name) = pinned else {
        return RuleOutcome::NoMatch;
    };
    if req.tls || req.sni_unreadable {
        match req.sni {
            Some(sni) if sni == *name || to.hosts.iter().any(|h| h.matches(sni)) => {}
            Some(_) => return RuleOutcome::Sni(EgressReason::SniMismatch),
            None if req.sni_unreadable => return RuleOutcome::Sni(EgressReason::SniUnreadable),
            None if to.allow_missing_sni => {}
            None => return RuleOutcome::Sni(EgressReason::SniMissing),
        }
    }
    RuleOutcome::Match(Some((*name).to_owned()))
}

fn rule_outcome(rule: &EgressRule, req: &EgressRequest<'_>, deny: bool) -> RuleOutcome {
    if !from_matches(&rule.from, &req.source) {
        return RuleOutcome::NoMatch;
    }
    let mut sni = None;
    for to in &rule.to {
        match to_outcome(to, req, deny) {
            RuleOutcome::Match(host) => return RuleOutcome::Match(host),
            RuleOutcome::Sni(reason) => sni = sni.or(Some(reason)),
            RuleOutcome::NoMatch => {}
        }
    }
    sni.map_or(RuleOutcome::NoMatch, RuleOutcome::Sni)
}

/// The first matching rule of `policy`: its index and the host it matched.
fn first_match(
    policy: &EgressPolicy,
    req: &EgressRequest<'_>,
    sni_failure: &mut Option<EgressReason>,
) -> Option<(usize, Option<String>)> {
    let deny = policy.action == EgressAction::Deny;
    for (i, rule) in policy.rules.iter().enumerate() {
        match rule_outcome(rule, req, deny) {
            RuleOutcome::Match(host) => return Some((i, host)),
            RuleOutcome::Sni(reason) => *sni_failure = sni_failure.or(Some(reason)),
            RuleOutcome::NoMatch => {}
        }
    }
    None
}

/// Whether an enforced DENY rule selecting `source` names hosts on `port`: the server name a
/// connection on that port sends may then deny it, so a decision made before its ClientHello
/// arrived is not final.
pub fn deny_by_name_applies(policies: &[&EgressPolicy], source: &Source<'_>, port: u16) -> bool {
    policies
        .iter()
        .filter(|p| !p.dry_run && p.action == EgressAction::Deny)
        .flat_map(|p| &p.rules)
        .filter(|rule| from_matches(&rule.from, source))
        .flat_map(|rule| &rule.to)
        .any(|to| !to.hosts.is_empty() && (to.ports.is_empty() || to.ports.contains(&port)))
}

/// Decides `req` against `policies`, the EgressPolicies that select its source.
pub fn decide_egress(policies: &[&EgressPolicy], req: &EgressRequest<'_>) -> EgressDecision {
    let mut decision = EgressDecision {
        verdict: EgressVerdict::Passthrough,
        reason: EgressReason::NoPolicy,
        policy: None,
        rule: None,
        host: None,
        budget: None,
        via: None,
        audit: Vec::new(),
        dry_run: Vec::new(),
    };
    let mut ignored = None;
    for p in policies {
        if first_match(p, req, &mut ignored).is_none() {
            continue;
        }
        if p.dry_run {
            decision.dry_run.push(p.key());
        } else if p.action == EgressAction::Audit {
            decision.audit.push(p.key());
        }
    }
    let enforced = |action| {
        policies
            .iter()
            .filter(move |p| !p.dry_run && p.action == action)
    };
    for p in enforced(EgressAction::Deny) {
        if let Some((rule, host)) = first_match(p, req, &mut ignored) {
            decision.verdict = EgressVerdict::Deny;
            decision.reason = EgressReason::Matched;
            decision.policy = Some(p.key());
            decision.rule = Some(rule);
            decision.host = host;
            return decision;
        }
    }
    let mut any_allow = false;
    let mut sni_failure = None;
    for p in enforced(EgressAction::Allow) {
        any_allow = true;
        if let Some((rule, host)) = first_match(p, req, &mut sni_failure) {
            decision.verdict = EgressVerdict::Allow;
            decision.reason = EgressReason::Matched;
            decision.policy = Some(p.key());
            decision.rule = Some(rule);
            decision.host = host;
            decision.budget = p.budget;
            decision.via = p.rules.get(rule).and_then(|r| r.via.clone());
            return decision;
        }
    }
    if any_allow {
        decision.verdict = EgressVerdict::Deny;
        decision.reason = sni_failure.unwrap_or(EgressReason::NotAllowed);
    }
    decision
}
