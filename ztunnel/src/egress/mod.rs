//! EgressPolicy enforcement at the source ztunnel (DESIGN.md §9) for connections whose
//! destination is not a mesh workload (mesh destinations keep the destination's
//! AuthorizationPolicy).
//!
//! [`decide`] gathers what the decision needs — the EgressPolicies selecting the source pod
//! (from the discovery stream), the names *this pod* resolved the address under (its own live
//! DNS pins; a CNAME target or another pod's pin never counts), the ClientHello's server name
//! — and asks [`membrane_policy::egress::decide_egress`]. The outbound path does what the
//! verdict says: a denied connection is reset before any byte leaves (the destination is
//! never even dialled); an allowed one may be counted against a budget ([`budget`]) and is
//! registered in [`open::OpenEgress`] so that a policy change decides it again.
//!
//! A decision made when the peek's deadline passed without a whole ClientHello is not final
//! where a name concerns it (an ALLOW host rule matched, or a DENY by name selects the
//! source): the connection's first flight is held and decided again with the server name it
//! finally sends ([`first_flight`]), so waiting, or sending the ClientHello in pieces, cannot
//! dodge the SNI check.

pub mod budget;
pub mod first_flight;
pub mod open;

use std::net::SocketAddr;
use std::time::SystemTime;

use membrane_api::access::{Egress, UNRESOLVED};
use membrane_policy::Source;
use membrane_policy::egress::{EgressDecision, EgressRequest, EgressVerdict, decide_egress};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::dns::pins::PinTable;
use crate::sni::{self, Hello};
use crate::state::{MeshState, Workload};

/// What one egress connection was decided on, kept for re-decisions.
#[derive(Debug, Clone)]
pub struct EgressAttrs {
    /// Destination.
    pub dst: SocketAddr,
    /// The pod's pinned names for the address at admission (most recent first).
    pub pinned: Vec<String>,
    /// The ClientHello's server name.
    pub sni: Option<String>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// It began like a TLS handshake whose ClientHello could not be read.
    pub sni_unreadable: bool,
}

/// A decision and what the access record says about it.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The evaluator's decision.
    pub decision: EgressDecision,
    /// The access record's `egress` part.
    pub record: Egress,
    /// What it was decided on.
    pub attrs: EgressAttrs,
}

/// Whether the connection is TLS, as the decision counts it: it began with a ClientHello (or
/// a TLS handshake record that cannot be read), or it is on a TLS port and sent nothing
/// recognisable in time.
pub fn is_tls(hello: &Hello, port: u16) -> bool {
    match hello {
        Hello::Sni(_) | Hello::NoSni | Hello::UnreadableTls => true,
        Hello::NotTls => false,
        Hello::Incomplete => sni::TLS_PORTS.contains(&port),
    }
}

/// Decides `attrs` for `source` against `state`'s EgressPolicies.
pub fn decide_attrs(state: &MeshState, source: &Workload, attrs: &EgressAttrs) -> EgressDecision {
    let policies = state.egress().selecting(&source.namespace, &source.labels);
    decide_selected(&policies, source, attrs)
}

/// Decides `attrs` for `source` against `policies`, the EgressPolicies selecting it.
pub fn decide_selected(
    policies: &[&membrane_policy::egress::EgressPolicy],
    source: &Workload,
    attrs: &EgressAttrs,
) -> EgressDecision {
    let mut principal = String::new();
    let pinned: Vec<&str> = attrs.pinned.iter().map(String::as_str).collect();
    decide_egress(
        policies,
        &EgressRequest {
            source: Source::from_identity(&source.identity, &mut principal),
            ip: attrs.dst.ip(),
            port: attrs.dst.port(),
            pinned: &pinned,
            sni: attrs.sni.as_deref(),
            tls: attrs.tls,
            sni_unreadable: attrs.sni_unreadable,
        },
    )
}

/// Whether an enforced DENY by name selecting `source` applies on `port` (`policies`: those
/// selecting it): then the server name a connection sends may deny it.
pub fn deny_by_name_applies(
    policies: &[&membrane_policy::egress::EgressPolicy],
    source: &Workload,
    port: u16,
) -> bool {
    let mut principal = String::new();
    let source = Source::from_identity(&source.identity, &mut principal);
    membrane_policy::egress::deny_by_name_applies(policies, &source, port)
}

/// Whether a connection decided on `hello` (a peek that may have ended at its deadline) must
/// have its first flight decided again: the ClientHello had not arrived whole, and a name
/// concerns the connection — the ALLOW that admitted it matched a host (by the pod's pin), or
/// a DENY by name applies to the source on this port. Connections nothing names keep the
/// direct path.
pub fn first_flight_pending(hello: &Hello, decision: &EgressDecision, deny_by_name: bool) -> bool {
    *hello == Hello::Incomplete
        && decision.verdict != EgressVerdict::Deny
        && (decision.host.is_some() || deny_by_name)
}

/// Decides a new connection of `source` to `dst` that began with `hello`, at `now`, against
/// `policies` (the EgressPolicies selecting `source`, found once by the caller).
pub fn decide(
    policies: &[&membrane_policy::egress::EgressPolicy],
    pins: &PinTable,
    source: &Workload,
    dst: SocketAddr,
    hello: &Hello,
    now: SystemTime,
) -> Admission {
    let sni = match hello {
        Hello::Sni(name) => Some(name.clone()),
        _ => None,
    };
    let names = pins.lookup(&source.uid, dst.ip(), now).unwrap_or_default();
    let attrs = EgressAttrs {
        dst,
        pinned: names.iter().map(|n| n.name.clone()).collect(),
        sni: sni.clone(),
        tls: is_tls(hello, dst.port()),
        sni_unreadable: *hello == Hello::UnreadableTls,
    };
    let decision = decide_selected(policies, source, &attrs);
    let mut names = names.into_iter();
    let first = names.next();
    let record = Egress {
        cnames: first.as_ref().map(|n| n.cnames.clone()).unwrap_or_default(),
        other_hosts: names.map(|n| n.name).collect(),
        ..record(&decision, first.map(|n| n.name), sni)
    };
    Admission {
        decision,
        record,
        attrs,
    }
}

/// The access record's `egress` part for `decision` of a connection to `host` (the name it
/// was resolved under, if any) that sent `sni`.
pub fn record(decision: &EgressDecision, host: Option<String>, sni: Option<String>) -> Egress {
    Egress {
        host: host.unwrap_or_else(|| UNRESOLVED.to_owned()),
        cnames: Vec::new(),
        other_hosts: Vec::new(),
        sni,
        verdict: verdict_str(decision.verdict).into(),
        reason: decision.reason.as_str().into(),
        policy: decision.policy.clone(),
        rule: decision.rule,
        matched: decision.host.clone(),
        via: decision.via.as_ref().map(ToString::to_string),
        audit: decision.audit.clone(),
        dry_run: decision.dry_run.clone(),
    }
}

/// The budget meter of an allowed connection of `identity` to `ip` under `decision`: `None`
/// when its policy has no budget, an error when the window is spent (counted).
pub fn admit_budget(
    control: &EgressControl,
    decision: &EgressDecision,
    identity: &str,
    ip: std::net::IpAddr,
    now: SystemTime,
) -> Result<Option<budget::Meter>, budget::Exhausted> {
    let Some((budget, policy)) = decision.budget.as_ref().zip(decision.policy.as_ref()) else {
        return Ok(None);
    };
    let key = budget::BudgetKey {
        identity: identity.to_owned(),
        host: decision.host.clone().unwrap_or_else(|| ip.to_string()),
        policy: policy.clone(),
    };
    match control.ledger.admit(key, budget, now) {
        Ok(meter) => Ok(Some(meter)),
        Err(e) => {
            control.metrics.budget_refused();
            Err(e)
        }
    }
}

/// As records and metrics say it.
pub fn verdict_str(verdict: EgressVerdict) -> &'static str {
    match verdict {
        EgressVerdict::Passthrough => "passthrough",
        EgressVerdict::Allow => "allow",
        EgressVerdict::Deny => "deny",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClosedLabels {
    reason: &'static str,
}

/// Egress decision metrics.
#[derive(Debug, Clone, Default)]
pub struct EgressMetrics {
    decisions: Family<DecisionLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    /// Budget metrics.
    pub budget: budget::BudgetMetrics,
}

impl EgressMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            budget: budget::BudgetMetrics::register(registry),
            ..Self::default()
        };
        registry.register(
            "egress_decisions",
            "Connections leaving the mesh, by EgressPolicy verdict and reason",
            m.decisions.clone(),
        );
        registry.register(
            "egress_connections_closed",
            "Open egress connections closed by the ztunnel (policy_changed, budget_exhausted)",
            m.closed.clone(),
        );
        m
    }

    /// Counts a decision.
    pub fn decided(&self, decision: &EgressDecision) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verdict: verdict_str(decision.verdict),
                reason: decision.reason.as_str(),
            })
            .inc();
    }

    /// Counts a refusal for a spent budget.
    pub fn budget_refused(&self) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verdict: "deny",
                reason: "budget_exhausted",
            })
            .inc();
    }

    /// Counts a refusal of a connection whose rule names a gateway.
    pub fn gateway_unavailable(&self) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verdict: "deny",
                reason: "gateway_unavailable",
            })
            .inc();
    }

    /// Counts an open connection closed for `reason`.
    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }
}

/// What the outbound path needs to enforce EgressPolicy beyond the decision itself.
#[derive(Debug)]
pub struct EgressControl {
    /// Open egress connections, decided again on policy changes.
    pub open: std::sync::Arc<open::OpenEgress>,
    /// Budget windows.
    pub ledger: std::sync::Arc<budget::Ledger>,
    /// Metrics.
    pub metrics: EgressMetrics,
}

/// The budget ledger's file in the state directory.
pub const BUDGETS_FILE: &str = "budgets.json";

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
