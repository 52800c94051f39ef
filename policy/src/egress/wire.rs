//! Conversions between the validated [`EgressPolicy`] and its wire form
//! (`membrane.v1.EgressPolicy`). `From<&EgressPolicy>` cannot fail; `TryFrom` validates every
//! value again with the same parsers as the YAML path (a peer's message is input like any
//! other) and names the field of the first problem.

use std::time::Duration;

use membrane_proto::v1::{self as pb, egress_policy};

use super::validate::{MAX_WINDOW, parse_host};
use super::{Budget, EgressAction, EgressFrom, EgressPolicy, EgressRule, EgressTo, GatewayRef};
use crate::matcher::{IpNet, ServiceAccountRef, StringMatch};

/// Why a wire message is not a valid EgressPolicy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress policy {policy}: {path}: {message}")]
pub struct EgressWireError {
    /// `namespace/name`.
    pub policy: String,
    /// Field path inside the message (`rules[0].to[1].hosts[2]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl From<&EgressPolicy> for pb::EgressPolicy {
    fn from(p: &EgressPolicy) -> Self {
        let action = match p.action {
            EgressAction::Allow => egress_policy::Action::Allow,
            EgressAction::Deny => egress_policy::Action::Deny,
            EgressAction::Audit => egress_policy::Action::Audit,
        };
        pb::EgressPolicy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            selector: p.selector.clone().into_iter().collect(),
            action: action.into(),
            rules: p
                .rules
                .iter()
                .map(|r| pb::EgressRule {
                    from: r
                        .from
                        .iter()
                        .map(|f| pb::EgressFrom {
                            principals: f.principals.iter().map(ToString::to_string).collect(),
                            service_accounts: f
                                .service_accounts
                                .iter()
                                .map(ToString::to_string)
                                .collect(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| pb::EgressTo {
                            hosts: t.hosts.iter().map(ToString::to_string).collect(),
                            ports: t.ports.iter().map(|p| u32::from(*p)).collect(),
                            ip_blocks: t.ip_blocks.iter().map(ToString::to_string).collect(),
                            allow_missing_sni: t.allow_missing_sni,
                        })
                        .collect(),
                    via: r.via.as_ref().map(|v| pb::GatewayRef {
                        namespace: v.namespace.clone(),
                        name: v.name.clone(),
                    }),
                })
                .collect(),
            budget: p.budget.map(|b| pb::EgressBudget {
                sent_bytes: b.sent_bytes.unwrap_or(0),
                received_bytes: b.received_bytes.unwrap_or(0),
                per_seconds: b.per.as_secs(),
            }),
            dry_run: p.dry_run,
        }
    }
}

impl TryFrom<pb::EgressPolicy> for EgressPolicy {
    type Error = EgressWireError;

    fn try_from(m: pb::EgressPolicy) -> Result<Self, Self::Error> {
        let policy = format!("{}/{}", m.namespace, m.name);
        let err = |path: String, message: String| EgressWireError {
            policy: policy.clone(),
            path,
            message,
        };
        crate::validate::object_name(&m.name).map_err(|e| err("name".into(), e))?;
        membrane_identity::spiffe_id::validate_namespace(&m.namespace)
            .map_err(|e| err("namespace".into(), e.to_string()))?;
        let action = match egress_policy::Action::try_from(m.action) {
            Ok(egress_policy::Action::Allow) => EgressAction::Allow,
            Ok(egress_policy::Action::Deny) => EgressAction::Deny,
            Ok(egress_policy::Action::Audit) => EgressAction::Audit,
            Err(_) => return Err(err("action".into(), format!("unknown action {}", m.action))),
        };
        let mut rules = Vec::with_capacity(m.rules.len());
        for (r, rule) in m.rules.into_iter().enumerate() {
            let mut from = Vec::new();
            for (f, src) in rule.from.into_iter().enumerate() {
                let at = format!("rules[{r}].from[{f}]");
                let principals = src
                    .principals
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        StringMatch::principal(p)
                            .map_err(|e| err(format!("{at}.principals[{i}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let service_accounts = src
                    .service_accounts
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        s.parse::<ServiceAccountRef>()
                            .map_err(|e| err(format!("{at}.service_accounts[{i}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if principals.is_empty() && service_accounts.is_empty() {
                    return Err(err(at, "names no principal and no service account".into()));
                }
                from.push(EgressFrom {
                    principals,
                    service_accounts,
                });
            }
            let mut to = Vec::new();
            for (t, dst) in rule.to.into_iter().enumerate() {
                let at = format!("rules[{r}].to[{t}]");
                let hosts = dst
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let parsed =
                            parse_host(h).map_err(|e| err(format!("{at}.hosts[{i}]"), e))?;
                        // The wire carries the canonical form only.
                        if parsed.to_string() != *h {
                            return Err(err(
                                format!("{at}.hosts[{i}]"),
                                format!("{h:?} is not canonical"),
                            ));
                        }
                        Ok(parsed)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let ports = dst
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                            err(format!("{at}.ports[{i}]"), format!("{p} is not a port"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let ip_blocks = dst
                    .ip_blocks
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        b.parse::<IpNet>()
                            .map_err(|e| err(format!("{at}.ip_blocks[{i}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if dst.allow_missing_sni && hosts.is_empty() {
                    return Err(err(
                        format!("{at}.allow_missing_sni"),
                        "only meaningful with hosts".into(),
                    ));
                }
                to.push(EgressTo {
                    hosts,
                    ports,
                    ip_blocks,
                    allow_missing_sni: dst.allow_missing_sni,
                });
            }
            let via = match rule.via {
                None => None,
                Some(v) => {
                    let at = format!("rules[{r}].via");
                    if action != EgressAction::Allow {
                        return Err(err(at, "only an ALLOW rule can name a gateway".into()));
                    }
                    crate::validate::object_name(&v.name)
                        .map_err(|e| err(format!("{at}.name"), e))?;
                    membrane_identity::spiffe_id::validate_namespace(&v.namespace)
                        .map_err(|e| err(format!("{at}.namespace"), e.to_string()))?;
                    Some(GatewayRef {
                        namespace: v.namespace,
                        name: v.name,
                    })
                }
            };
            rules.push(EgressRule { from, to, via });
        }
        let budget = match m.budget {
            None => None,
            Some(b) => {
                if action != EgressAction::Allow {
                    return Err(err(
                        "budget".into(),
                        "a budget belongs to an ALLOW policy".into(),
                    ));
                }
                if b.sent_bytes == 0 && b.received_bytes == 0 {
                    return Err(err(
                        "budget".into(),
                        "names neither sent nor received bytes".into(),
                    ));
                }
                let per = Duration::from_secs(b.per_seconds);
                if per < Duration::from_secs(1) || per > MAX_WINDOW {
                    return Err(err(
                        "budget.per_seconds".into(),
                        "a window is from 1s to 31d".into(),
                    ));
                }
                Some(Budget {
                    sent_bytes: (b.sent_bytes > 0).then_some(b.sent_bytes),
                    received_bytes: (b.received_bytes > 0).then_some(b.received_bytes),
                    per,
                })
            }
        };
        Ok(EgressPolicy {
            name: m.name,
            namespace: m.namespace,
            selector: m.selector.into_iter().collect(),
            action,
            rules,
            budget,
            dry_run: m.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: model-hub, namespace: training, annotations: {membrane.dev/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: trainer}}
  rules:
  - from: [{principals: ["cluster.local/ns/training/sa/trainer", "*/sa/ci"], serviceAccounts: [training/trainer]}]
    to:
    - {hosts: [HuggingFace.co., "*.hf.co", "bücher.example"], ports: [443], allowMissingSni: true}
    - {ipBlocks: [192.0.2.0/24, "2001:db8::/32"], ports: [8443]}
    via: {gateway: egress, namespace: membrane-system}
  budget: {sentBytes: 1Gi, receivedBytes: 10G, per: 1h}
"#;

    fn policy() -> EgressPolicy {
        super::super::parse_egress_policies(DOC)
            .expect("valid")
            .remove(0)
    }

    #[test]
    fn policies_survive_the_wire_unchanged() {
        let p = policy();
        let wire = pb::EgressPolicy::from(&p);
        assert_eq!(
            wire.rules[0].to[0].hosts,
            ["huggingface.co", "*.hf.co", "xn--bcher-kva.example"]
        );
        assert_eq!(EgressPolicy::try_from(wire).expect("valid on receipt"), p);
    }

    #[test]
    fn a_bad_value_from_a_peer_is_refused_with_its_path() {
        let good = pb::EgressPolicy::from(&policy());
        let mut m = good.clone();
        m.rules[0].to[0].hosts[1] = "*.HF.co".into();
        let e = EgressPolicy::try_from(m).expect_err("not canonical");
        assert_eq!(e.path, "rules[0].to[0].hosts[1]");
        let mut m = good.clone();
        m.rules[0].to[1].ports[0] = 70_000;
        assert_eq!(
            EgressPolicy::try_from(m).expect_err("port").path,
            "rules[0].to[1].ports[0]"
        );
        let mut m = good.clone();
        m.rules[0].from[0].principals[0] = "not a principal".into();
        assert_eq!(
            EgressPolicy::try_from(m).expect_err("principal").path,
            "rules[0].from[0].principals[0]"
        );
        let mut m = good.clone();
        if let Some(via) = m.rules[0].via.as_mut() {
            via.name = "Not_A_Name".into();
        }
        assert_eq!(
            EgressPolicy::try_from(m).expect_err("gateway").path,
            "rules[0].via.name"
        );
        let mut m = good.clone();
        m.action = 9;
        assert_eq!(
            EgressPolicy::try_from(m).expect_err("action").path,
            "action"
        );
        let mut m = good.clone();
        if let Some(b) = m.budget.as_mut() {
            b.per_seconds = 0;
        }
        assert_eq!(
            EgressPolicy::try_from(m).expect_err("window").path,
            "budget.per_seconds"
        );
        let mut m = good;
        m.name = "Bad_Name".into();
        assert_eq!(EgressPolicy::try_from(m).expect_err("name").path, "name");
    }
}
