//! Validation of `EgressPolicy` documents: every value interpreted (hosts lower-cased, trailing
//! dot dropped, IDNs as punycode; CIDRs, ports, principals, service accounts, quantities,
//! durations), every error with its field path. A document with any error is refused whole.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::model::{BudgetDoc, EgressPolicyDoc, EgressRuleDoc, KIND};
use super::{Budget, EgressAction, EgressFrom, EgressPolicy, EgressRule, EgressTo, HostPattern};
use crate::matcher::{IpNet, ServiceAccountRef, StringMatch, parse_port};
use crate::model::{DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION, MEMBRANE_API_VERSION};

/// One problem of a document: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {path}: {message}")]
pub struct EgressError {
    /// `namespace/name` (or `document N` when the name is unknown).
    pub policy: String,
    /// Field path, e.g. `spec.rules[0].to[1].hosts[2]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Longest window of a budget.
pub const MAX_WINDOW: Duration = Duration::from_secs(31 * 24 * 3600);

/// Parses every `EgressPolicy` document of `text` (others are skipped); all or nothing.
pub fn parse_egress_policies(text: &str) -> Result<Vec<EgressPolicy>, Vec<EgressError>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        vec![EgressError {
            policy: "input".into(),
            path: String::new(),
            message: format!("not valid YAML: {e}"),
        }]
    })?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.get("kind").and_then(Value::as_str) != Some(KIND) {
            continue;
        }
        let label = format!("document {}", i + 1);
        match serde_path_to_error::deserialize::<_, EgressPolicyDoc>(doc) {
            Ok(doc) => match check_egress(doc) {
                Ok(p) => out.push(p),
                Err(mut e) => errors.append(&mut e),
            },
            Err(e) => errors.push(EgressError {
                policy: label,
                path: e.path().to_string(),
                message: e.inner().to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A host pattern: `name.example` or `*.suffix.example`, lower-cased, without trailing dot,
/// internationalised labels as punycode.
pub fn parse_host(raw: &str) -> Result<HostPattern, String> {
    let trimmed = raw.trim().trim_end_matches('.');
    let (wild, name) = match trimmed.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    if name.is_empty() || name.contains('*') {
        return Err(format!(
            "{raw:?} is not a host: expected name.example or *.suffix.example"
        ));
    }
    let ascii =
        idna::domain_to_ascii(name).map_err(|_| format!("{raw:?} is not a valid domain name"))?;
    let valid_labels = ascii.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !valid_labels || ascii.len() > 253 {
        return Err(format!("{raw:?} is not a valid domain name"));
    }
    if ascii.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{raw:?} is an address: use ipBlocks"));
    }
    Ok(if wild {
        HostPattern::Suffix(format!(".{ascii}"))
    } else {
        HostPattern::Exact(ascii)
    })
}

/// A byte quantity: an integer, optionally with a suffix `k M G T` (powers of 1000) or
/// `Ki Mi Gi Ti` (powers of 1024).
pub fn parse_quantity(value: &Value) -> Result<u64, String> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        other => {
            return Err(format!(
                "{other} is not a quantity: expected e.g. 1Gi or 500M"
            ));
        }
    };
    let bad = || format!("{text:?} is not a quantity: expected e.g. 1Gi, 500M or 1048576");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    match n.checked_mul(unit) {
        Some(0) => Err(format!(
            "{text:?}: a budget of zero bytes allows nothing; use a DENY policy"
        )),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

/// Validates one document given as a JSON/YAML value (as a Kubernetes watch or a manifest
/// reader holds it); a shape error names its field path.
pub fn check_egress_value(value: Value) -> Result<EgressPolicy, Vec<EgressError>> {
    let label = match (
        value.pointer("/metadata/namespace").and_then(Value::as_str),
        value.pointer("/metadata/name").and_then(Value::as_str),
    ) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        _ => "document".to_owned(),
    };
    match serde_path_to_error::deserialize::<_, EgressPolicyDoc>(value) {
        Ok(doc) => check_egress(doc),
        Err(e) => Err(vec![EgressError {
            policy: label,
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }]),
    }
}

/// Validates one document.
pub fn check_egress(doc: EgressPolicyDoc) -> Result<EgressPolicy, Vec<EgressError>> {
    let name = doc.metadata.name.clone();
    let namespace = doc.metadata.namespace.clone();
    let label = format!("{namespace}/{name}");
    let mut errors = Vec::new();
    let mut err = |path: String, message: String| {
        errors.push(EgressError {
            policy: label.clone(),
            path,
            message,
        });
    };
    if doc.api_version != MEMBRANE_API_VERSION {
        err(
            "apiVersion".into(),
            format!(
                "{:?} is not supported: use {MEMBRANE_API_VERSION}",
                doc.api_version
            ),
        );
    }
    if let Err(e) = crate::validate::object_name(&name) {
        err(
            "metadata.name".into(),
            format!("invalid name {name:?}: {e}"),
        );
    }
    if let Err(e) = membrane_identity::spiffe_id::validate_namespace(&namespace) {
        err(
            "metadata.namespace".into(),
            format!("invalid namespace {namespace:?}: {e}"),
        );
    }
    let action = match doc.spec.action.as_deref() {
        None | Some("ALLOW") => EgressAction::Allow,
        Some("DENY") => EgressAction::Deny,
        Some("AUDIT") => EgressAction::Audit,
        Some(other) => {
            err(
                "spec.action".into(),
                format!("{other:?}: expected ALLOW, DENY or AUDIT"),
            );
            EgressAction::Allow
        }
    };
    let selector: BTreeMap<String, String> = doc
        .spec
        .selector
        .map(|s| s.match_labels)
        .unwrap_or_default();
    let mut rules = Vec::new();
    for (r, rule) in doc.spec.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let via = rule
            .via
            .clone()
            .and_then(|v| check_via(v, &namespace, action, &format!("{at}.via"), &mut err));
        let mut rule = check_rule(rule, &at, &mut err);
        rule.via = via;
        rules.push(rule);
    }
    let budget = doc
        .spec
        .budget
        .and_then(|b| check_budget(b, action, &mut err));
    let dry_run = [DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION]
        .iter()
        .any(|a| {
            doc.metadata
                .annotations
                .get(*a)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(EgressPolicy {
        name,
        namespace,
        selector,
        action,
        rules,
        budget,
        dry_run,
    })
}

fn check_rule(rule: EgressRuleDoc, at: &str, err: &mut impl FnMut(String, String)) -> EgressRule {
    let mut from = Vec::new();
    for (f, doc) in rule.from.into_iter().enumerate() {
        let mut principals = Vec::new();
        for (i, p) in doc.principals.iter().enumerate() {
            match StringMatch::principal(p) {
                Ok(m) => principals.push(m),
                Err(e) => err(format!("{at}.from[{f}].principals[{i}]"), e),
            }
        }
        let mut service_accounts = Vec::new();
        for (i, sa) in doc.service_accounts.iter().enumerate() {
            match sa.parse::<ServiceAccountRef>() {
                Ok(m) => service_accounts.push(m),
                Err(e) => err(format!("{at}.from[{f}].serviceAccounts[{i}]"), e),
            }
        }
        if principals.is_empty() && service_accounts.is_empty() {
            err(
                format!("{at}.from[{f}]"),
                "names no principal and no service account (it would match nothing)".into(),
            );
        }
        from.push(EgressFrom {
            principals,
            service_accounts,
        });
    }
    let mut to = Vec::new();
    for (t, doc) in rule.to.into_iter().enumerate() {
        let mut hosts = Vec::new();
        for (i, h) in doc.hosts.iter().enumerate() {
            match parse_host(h) {
                Ok(p) => hosts.push(p),
                Err(e) => err(format!("{at}.to[{t}].hosts[{i}]"), e),
            }
        }
        let mut ports = Vec::new();
        for (i, p) in doc.ports.iter().enumerate() {
            match parse_port(p) {
                Ok(p) => ports.push(p),
                Err(e) => err(format!("{at}.to[{t}].ports[{i}]"), e),
            }
        }
        let mut ip_blocks = Vec::new();
        for (i, b) in doc.ip_blocks.iter().enumerate() {
            match b.parse::<IpNet>() {
                Ok(n) => ip_blocks.push(n),
                Err(e) => err(format!("{at}.to[{t}].ipBlocks[{i}]"), e),
            }
        }
        if doc.allow_missing_sni && hosts.is_empty() {
            err(
                format!("{at}.to[{t}].allowMissingSni"),
                "only meaningful with hosts".into(),
            );
        }
        to.push(EgressTo {
            hosts,
            ports,
            ip_blocks,
            allow_missing_sni: doc.allow_missing_sni,
        });
    }
    EgressRule {
        from,
        to,
        via: None,
    }
}

/// A rule's `via`: an object name and a namespace (the policy's by default), on ALLOW only.
fn check_via(
    via: super::model::ViaDoc,
    policy_namespace: &str,
    action: EgressAction,
    at: &str,
    err: &mut impl FnMut(String, String),
) -> Option<super::GatewayRef> {
    let mut ok = true;
    if action != EgressAction::Allow {
        err(
            at.to_owned(),
            "only an ALLOW rule can send connections through a gateway".into(),
        );
        ok = false;
    }
    if let Err(e) = crate::validate::object_name(&via.gateway) {
        err(
            format!("{at}.gateway"),
            format!("invalid gateway name {:?}: {e}", via.gateway),
        );
        ok = false;
    }
    let namespace = via.namespace.unwrap_or_else(|| policy_namespace.to_owned());
    if let Err(e) = membrane_identity::spiffe_id::validate_namespace(&namespace) {
        err(
            format!("{at}.namespace"),
            format!("invalid namespace {namespace:?}: {e}"),
        );
        ok = false;
    }
    ok.then_some(super::GatewayRef {
        namespace,
        name: via.gateway,
    })
}

fn check_budget(
    doc: BudgetDoc,
    action: EgressAction,
    err: &mut impl FnMut(String, String),
) -> Option<Budget> {
    if action != EgressAction::Allow {
        err(
            "spec.budget".into(),
            "a budget belongs to an ALLOW policy".into(),
        );
    }
    let mut quantity = |field: &str, v: Option<Value>| {
        v.and_then(|v| match parse_quantity(&v) {
            Ok(n) => Some(n),
            Err(e) => {
                err(format!("spec.budget.{field}"), e);
                None
            }
        })
    };
    let sent = quantity("sentBytes", doc.sent_bytes.clone());
    let received = quantity("receivedBytes", doc.received_bytes.clone());
    let per = match doc.per.as_deref().map(parse_window) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            err("spec.budget.per".into(), e);
            None
        }
        None => {
            err(
                "spec.budget.per".into(),
                "required: the window, e.g. 1h".into(),
            );
            None
        }
    };
    if doc.sent_bytes.is_none() && doc.received_bytes.is_none() {
        err(
            "spec.budget".into(),
            "names neither sentBytes nor receivedBytes".into(),
        );
    }
    Some(Budget {
        sent_bytes: sent,
        received_bytes: received,
        per: per?,
    })
}

/// A window: a number and a unit `s`, `m`, `h` or `d` (`90s`, `30m`, `1h`, `1d`).
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a window: expected e.g. 30m, 1h or 1d");
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let unit = match &t[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let window = Duration::from_secs(n.checked_mul(unit).ok_or_else(bad)?);
    if window < Duration::from_secs(1) || window > MAX_WINDOW {
        return Err(format!("{text:?}: a window is from 1s to 31d"));
    }
    Ok(window)
}
