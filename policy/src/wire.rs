//! Conversions between the validated [`Policy`] and its wire form
//! (`membrane.v1.Authorization`), so the controller ships compiled policy and the ztunnel
//! never parses YAML.
//!
//! `From<&Policy>` cannot fail. `TryFrom<Authorization>` validates every value again with the
//! same parsers as the YAML path: a peer's message is input like any other.

use std::collections::BTreeMap;

use membrane_proto::v1::{self as pb, authorization, condition};

use crate::matcher::{IpNet, ServiceAccountRef, StringMatch, parse_port};
use crate::namespace::NamespaceMatch;
use crate::policy::{
    Action, Condition, Constraint, OperationMatch, Policy, PolicyRef, Rule, SourceMatch,
};

/// Why a wire message is not a valid policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorization {policy}: {path}: {message}")]
pub struct WireError {
    /// `namespace/name`.
    pub policy: String,
    /// Field path inside the message (`rules[0].from[1].principals.values[2]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn values<T: ToString>(c: &Constraint<T>) -> pb::Values {
    pb::Values {
        values: c.values.iter().map(ToString::to_string).collect(),
        not_values: c.not_values.iter().map(ToString::to_string).collect(),
    }
}

impl From<&Policy> for pb::Authorization {
    fn from(p: &Policy) -> Self {
        let action = match p.action {
            Action::Allow => authorization::Action::Allow,
            Action::Deny => authorization::Action::Deny,
            Action::Audit => authorization::Action::Audit,
        };
        pb::Authorization {
            namespace: p.namespace().to_owned(),
            name: p.name().to_owned(),
            selector: p.selector.clone().into_iter().collect(),
            action: action as i32,
            rules: p.rules.iter().map(rule_to_wire).collect(),
            dry_run: p.dry_run,
        }
    }
}

fn rule_to_wire(r: &Rule) -> pb::Rule {
    pb::Rule {
        from: r
            .from
            .iter()
            .map(|s| pb::Source {
                principals: Some(values(&s.principals)),
                namespaces: Some(values(&s.namespaces)),
                service_accounts: Some(values(&s.service_accounts)),
                ip_blocks: Some(values(&s.ip_blocks)),
                remote_ip_blocks: Some(values(&s.remote_ip_blocks)),
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|o| pb::Operation {
                ports: Some(values(&o.ports)),
            })
            .collect(),
        when: r.when.iter().map(condition_to_wire).collect(),
        has_l7: r.has_l7,
    }
}

fn condition_to_wire(c: &Condition) -> pb::Condition {
    let (key, v) = match c {
        Condition::SourcePrincipal(v) => (condition::Key::SourcePrincipal, values(v)),
        Condition::SourceNamespace(v) => (condition::Key::SourceNamespace, values(v)),
        Condition::SourceServiceAccount(v) => (condition::Key::SourceServiceAccount, values(v)),
        Condition::SourceIp(v) => (condition::Key::SourceIp, values(v)),
        Condition::DestinationIp(v) => (condition::Key::DestinationIp, values(v)),
        Condition::DestinationPort(v) => (condition::Key::DestinationPort, values(v)),
    };
    pb::Condition {
        key: key as i32,
        values: Some(v),
    }
}

struct Ctx<'a> {
    policy: &'a str,
}

impl Ctx<'_> {
    fn err(&self, path: String, message: impl ToString) -> WireError {
        WireError {
            policy: self.policy.to_owned(),
            path,
            message: message.to_string(),
        }
    }

    fn constraint<T>(
        &self,
        path: &str,
        v: Option<&pb::Values>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Constraint<T>, WireError> {
        let Some(v) = v else {
            return Ok(Constraint::default());
        };
        let list = |name: &str, items: &[String]| {
            items
                .iter()
                .enumerate()
                .map(|(i, s)| parse(s).map_err(|e| self.err(format!("{path}.{name}[{i}]"), e)))
                .collect::<Result<Vec<T>, WireError>>()
        };
        Ok(Constraint {
            values: list("values", &v.values)?,
            not_values: list("not_values", &v.not_values)?,
        })
    }
}

fn net(s: &str) -> Result<IpNet, String> {
    IpNet::parse(s).map(|p| p.net)
}

fn sa(s: &str) -> Result<ServiceAccountRef, String> {
    s.parse::<ServiceAccountRef>().map_err(|e| e.to_string())
}

impl TryFrom<pb::Authorization> for Policy {
    type Error = WireError;

    fn try_from(m: pb::Authorization) -> Result<Self, Self::Error> {
        let shown = format!("{}/{}", m.namespace, m.name);
        let ctx = Ctx { policy: &shown };
        membrane_identity::spiffe_id::validate_namespace(&m.namespace)
            .map_err(|e| ctx.err("namespace".into(), e))?;
        if m.name.is_empty() || m.name.len() > 253 {
            return Err(ctx.err("name".into(), "must be 1 to 253 characters"));
        }
        let action = match authorization::Action::try_from(m.action) {
            Ok(authorization::Action::Allow) => Action::Allow,
            Ok(authorization::Action::Deny) => Action::Deny,
            Ok(authorization::Action::Audit) => Action::Audit,
            Err(_) => return Err(ctx.err("action".into(), format!("unknown action {}", m.action))),
        };
        let mut rules = Vec::with_capacity(m.rules.len());
        for (i, r) in m.rules.iter().enumerate() {
            let at = |rest: String| format!("rules[{i}].{rest}");
            let mut from = Vec::with_capacity(r.from.len());
            for (j, s) in r.from.iter().enumerate() {
                from.push(SourceMatch {
                    principals: ctx.constraint(
                        &at(format!("from[{j}].principals")),
                        s.principals.as_ref(),
                        StringMatch::principal,
                    )?,
                    namespaces: ctx.constraint(
                        &at(format!("from[{j}].namespaces")),
                        s.namespaces.as_ref(),
                        NamespaceMatch::parse,
                    )?,
                    service_accounts: ctx.constraint(
                        &at(format!("from[{j}].service_accounts")),
                        s.service_accounts.as_ref(),
                        sa,
                    )?,
                    ip_blocks: ctx.constraint(
                        &at(format!("from[{j}].ip_blocks")),
                        s.ip_blocks.as_ref(),
                        net,
                    )?,
                    remote_ip_blocks: ctx.constraint(
                        &at(format!("from[{j}].remote_ip_blocks")),
                        s.remote_ip_blocks.as_ref(),
                        net,
                    )?,
                });
            }
            let mut to = Vec::with_capacity(r.to.len());
            for (j, o) in r.to.iter().enumerate() {
                to.push(OperationMatch {
                    ports: ctx.constraint(
                        &at(format!("to[{j}].ports")),
                        o.ports.as_ref(),
                        parse_port,
                    )?,
                });
            }
            let mut when = Vec::with_capacity(r.when.len());
            for (j, c) in r.when.iter().enumerate() {
                let path = at(format!("when[{j}]"));
                let v = c.values.as_ref();
                let p = format!("{path}.values");
                when.push(match condition::Key::try_from(c.key) {
                    Ok(condition::Key::SourcePrincipal) => Condition::SourcePrincipal(ctx.constraint(&p, v, StringMatch::principal)?),
                    Ok(condition::Key::SourceNamespace) => Condition::SourceNamespace(ctx.constraint(&p, v, NamespaceMatch::parse)?),
                    Ok(condition::Key::SourceServiceAccount) => Condition::SourceServiceAccount(ctx.constraint(&p, v, sa)?),
                    Ok(condition::Key::SourceIp) => Condition::SourceIp(ctx.constraint(&p, v, net)?),
                    Ok(condition::Key::DestinationIp) => Condition::DestinationIp(ctx.constraint(&p, v, net)?),
                    Ok(condition::Key::DestinationPort) => Condition::DestinationPort(ctx.constraint(&p, v, parse_port)?),
                    Err(_) => return Err(ctx.err(format!("{path}.key"), format!("unknown key {}", c.key))),
                });
            }
            rules.push(Rule {
                from,
                to,
                when,
                has_l7: r.has_l7,
            });
        }
        Ok(Policy {
            id: PolicyRef::new(&m.namespace, &m.name),
            selector: m.selector.into_iter().collect::<BTreeMap<_, _>>(),
            action,
            rules,
            dry_run: m.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::parse_policies;

    const DOCS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: full, namespace: inference, annotations: {"membrane.dev/dry-run": "true"}}
spec:
  selector: {matchLabels: {app: model}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/training/sa/trainer", "cluster.local/ns/data/*", "*"]
        namespaces: ["training", "cluster-b.example/*", "*/data"]
        notNamespaces: ["untrusted", "dev-*", "cluster-b.example/kube-system"]
        serviceAccounts: ["training/trainer"]
        ipBlocks: ["10.0.0.0/8", "2001:db8::/32"]
    to: [{operation: {ports: ["8080"], notPorts: ["9090"]}}]
    when:
    - {key: source.ip, values: ["192.168.0.0/16"]}
    - {key: destination.port, notValues: ["22"]}
    - {key: source.namespace, values: ["*-prod", "cluster-b.example/*-prod"]}
  - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: data}
spec: {}
"#;

    #[test]
    fn round_trips_every_field() {
        let checked = parse_policies(DOCS).expect("valid");
        assert_eq!(checked.len(), 2);
        for c in checked {
            let wire = pb::Authorization::from(&c.policy);
            let back = Policy::try_from(wire).expect("valid wire form");
            assert_eq!(back, c.policy);
        }
    }

    #[test]
    fn rejects_invalid_messages_with_a_path() {
        let checked = parse_policies(DOCS).expect("valid");
        let good = pb::Authorization::from(&checked[0].policy);
        let mut bad_principal = good.clone();
        bad_principal.rules[0].from[0]
            .principals
            .as_mut()
            .expect("principals")
            .values[1] = "Not A Principal".into();
        let err = Policy::try_from(bad_principal).expect_err("bad principal");
        assert_eq!(err.path, "rules[0].from[0].principals.values[1]");
        let mut bad_port = good.clone();
        bad_port.rules[0].to[0]
            .ports
            .as_mut()
            .expect("ports")
            .values[0] = "70000".into();
        assert!(Policy::try_from(bad_port).is_err());
        let mut bad_action = good.clone();
        bad_action.action = 42;
        assert_eq!(
            Policy::try_from(bad_action).expect_err("action").path,
            "action"
        );
        let mut bad_key = good.clone();
        bad_key.rules[0].when[0].key = 99;
        assert!(Policy::try_from(bad_key).is_err());
        let mut bad_ns = good;
        bad_ns.namespace = "Bad_NS".into();
        assert_eq!(
            Policy::try_from(bad_ns).expect_err("namespace").path,
            "namespace"
        );
    }
}
