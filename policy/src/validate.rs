//! From text or documents to validated [`Policy`] values: every rule of DESIGN.md §6 that can
//! be checked before a connection exists is checked here, and every problem is reported with
//! its document, policy and field path.
//!
//! This module owns the decision "error, warning or fine" for each field, the normalisation
//! of principals (the `spiffe://` scheme is removed: `spiffe://td/ns/a/sa/b` and
//! `td/ns/a/sa/b` are the same principal) and the fail-safe compilation of L7 fields (see
//! [`crate::policy`]). It must not read files, log, or panic on any input: [`parse_policies`]
//! is a fuzz target.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::diagnostics::{PolicyError, Problem, Warning, WarningKind};
use crate::matcher::{IpNet, ServiceAccountRef, StringMatch, parse_port};
use crate::model::{self, API_VERSIONS, AuthorizationPolicy, KIND};
use crate::namespace::NamespaceMatch;
use crate::policy::{
    Action, Condition, Constraint, OperationMatch, Policy, PolicyRef, Rule, SourceMatch,
};

/// A validated policy, with what its author should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The policy, ready for [`crate::compile::PolicyIndex::build`].
    pub policy: Policy,
    /// Accepted but noteworthy fields (L7 fields, cleared host bits, …).
    pub warnings: Vec<Warning>,
    /// 1-based index of the document in the text given to [`parse_policies`]; `None` from
    /// [`check`].
    pub document: Option<usize>,
}

/// Parses a multi-document YAML text and validates every `AuthorizationPolicy` in it.
///
/// Documents of other kinds are skipped, as are `AuthorizationPolicy` documents of other
/// API groups (Linkerd has a kind of that name); a `kind: List` is unpacked. The text is
/// taken whole or not at all: any error refuses it, and every error found is returned.
/// Never panics. The YAML parser's default budget applies (at most 1,024 documents, 250,000
/// nodes and 64 levels of nesting per text; aliases limited): larger texts are refused with
/// a YAML error rather than parsed at any cost.
pub fn parse_policies(text: &str) -> Result<Vec<Checked>, Vec<PolicyError>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        vec![PolicyError {
            document: None,
            policy: None,
            path: String::new(),
            problem: Problem::Yaml(e.to_string()),
        }]
    })?;
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        document(i + 1, doc, "", &mut checked, &mut errors);
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(errors)
    }
}

/// Validates one document. Errors carry no document index.
pub fn check(doc: AuthorizationPolicy) -> Result<Checked, Vec<PolicyError>> {
    check_at(doc, None, "")
}

fn document(
    index: usize,
    doc: Value,
    prefix: &str,
    checked: &mut Vec<Checked>,
    errors: &mut Vec<PolicyError>,
) {
    let err = |problem: Problem| PolicyError {
        document: Some(index),
        policy: None,
        path: prefix.trim_end_matches('.').to_owned(),
        problem,
    };
    let map = match doc {
        Value::Null => return,
        Value::Object(map) => map,
        _ => {
            return errors.push(err(Problem::Document(
                "expected a mapping with apiVersion and kind".into(),
            )));
        }
    };
    let (Some(kind), Some(api_version)) = (
        map.get("kind").and_then(Value::as_str),
        map.get("apiVersion").and_then(Value::as_str),
    ) else {
        return errors.push(err(Problem::Document(
            "missing string fields apiVersion and kind".into(),
        )));
    };
    if kind == "List" {
        let items = match map.get("items") {
            Some(Value::Array(items)) => items.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return errors.push(err(Problem::Schema("items: expected a list".into()))),
        };
        for (i, item) in items.into_iter().enumerate() {
            document(
                index,
                item,
                &format!("{prefix}items[{i}]."),
                checked,
                errors,
            );
        }
        return;
    }
    if kind != KIND {
        return;
    }
    if !API_VERSIONS.contains(&api_version) {
        let group = api_version.split('/').next().unwrap_or_default();
        if matches!(group, "security.istio.io" | "security.membrane.dev") {
            errors.push(PolicyError {
                path: format!("{prefix}apiVersion"),
                ..err(Problem::UnsupportedApiVersion(api_version.to_owned()))
            });
        }
        return;
    }
    let label = label_of(&map);
    match typed(Value::Object(map), Some(index), label, prefix) {
        Ok(doc) => match check_at(doc, Some(index), prefix) {
            Ok(c) => checked.push(c),
            Err(e) => errors.extend(e),
        },
        Err(e) => errors.push(e),
    }
}

/// Validates one `AuthorizationPolicy` document given as a JSON value (for example an object
/// read from the Kubernetes API): a schema error names the field as [`parse_policies`] does.
pub fn check_value(doc: Value) -> Result<Checked, Vec<PolicyError>> {
    let label = doc.as_object().and_then(label_of);
    let typed = typed(doc, None, label, "").map_err(|e| vec![e])?;
    check_at(typed, None, "")
}

/// Types a document; an error's path ends with the offending field (also an unknown one).
fn typed(
    doc: Value,
    index: Option<usize>,
    label: Option<String>,
    prefix: &str,
) -> Result<AuthorizationPolicy, PolicyError> {
    serde_path_to_error::deserialize::<_, AuthorizationPolicy>(doc).map_err(|e| {
        let mut path = match e.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        let message = e.into_inner().to_string();
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            && path.rsplit('.').next() != Some(field)
        {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(field);
        }
        PolicyError {
            document: index,
            policy: label,
            path: format!("{prefix}{path}").trim_end_matches('.').to_owned(),
            problem: Problem::Schema(message),
        }
    })
}

/// `namespace/name` from an untyped document, for errors raised before typing succeeds.
fn label_of(map: &serde_json::Map<String, Value>) -> Option<String> {
    let meta = map.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(model::DEFAULT_NAMESPACE);
    Some(format!("{ns}/{name}"))
}

fn check_at(
    doc: AuthorizationPolicy,
    document: Option<usize>,
    prefix: &str,
) -> Result<Checked, Vec<PolicyError>> {
    let mut cx = Checker {
        document,
        label: Some(format!("{}/{}", doc.metadata.namespace, doc.metadata.name)),
        prefix,
        errors: Vec::new(),
        warnings: Vec::new(),
        action: Action::Allow,
    };
    if doc.kind != KIND {
        cx.error(
            "kind".into(),
            Problem::Document(format!("kind must be {KIND}")),
        );
    }
    if !API_VERSIONS.contains(&doc.api_version.as_str()) {
        cx.error(
            "apiVersion".into(),
            Problem::UnsupportedApiVersion(doc.api_version.clone()),
        );
    }
    let meta = &doc.metadata;
    if let Err(reason) = object_name(&meta.name) {
        cx.error(
            "metadata.name".into(),
            Problem::InvalidName {
                value: meta.name.clone(),
                reason,
            },
        );
    }
    if let Err(e) = membrane_identity::spiffe_id::validate_namespace(&meta.namespace) {
        cx.error(
            "metadata.namespace".into(),
            Problem::InvalidName {
                value: meta.namespace.clone(),
                reason: e.to_string(),
            },
        );
    }
    let mut dry_run = false;
    for key in [model::DRY_RUN_ANNOTATION, model::ISTIO_DRY_RUN_ANNOTATION] {
        let Some(value) = meta.annotations.get(key) else {
            continue;
        };
        if value.eq_ignore_ascii_case("true") {
            dry_run = true;
        } else if !value.eq_ignore_ascii_case("false") {
            cx.error(
                format!("metadata.annotations[\"{key}\"]"),
                Problem::BadDryRun {
                    key,
                    value: value.clone(),
                },
            );
        }
    }

    let spec = &doc.spec;
    if spec.target_ref.is_some() {
        cx.error("spec.targetRef".into(), Problem::TargetRefUnsupported);
    }
    if spec.target_refs.is_some() {
        cx.error("spec.targetRefs".into(), Problem::TargetRefUnsupported);
    }
    cx.action = match spec.action.unwrap_or(model::Action::Allow) {
        model::Action::Allow => Action::Allow,
        model::Action::Deny => Action::Deny,
        model::Action::Audit => Action::Audit,
        model::Action::Custom => {
            cx.error("spec.action".into(), Problem::CustomUnsupported);
            Action::Allow
        }
    };
    if spec.provider.is_some() && spec.action != Some(model::Action::Custom) {
        cx.error("spec.provider".into(), Problem::ProviderWithoutCustom);
    }
    let selector: BTreeMap<String, String> = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    let rules: Vec<Rule> = spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, rule)| cx.rule(&format!("spec.rules[{i}]"), rule))
        .collect();
    if rules.is_empty() && cx.action != Action::Allow {
        cx.warn("spec".into(), WarningKind::NoRules(cx.action));
    }

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(Checked {
        policy: Policy {
            id: PolicyRef::new(&meta.namespace, &meta.name),
            selector,
            action: cx.action,
            rules,
            dry_run,
        },
        warnings: cx.warnings,
        document,
    })
}

/// A Kubernetes object name: a DNS-1123 subdomain.
pub(crate) fn object_name(name: &str) -> Result<(), String> {
    membrane_identity::spiffe_id::validate_service_account(name).map_err(|_| {
        "object names are at most 253 characters: dot-separated lower-case letters, digits \
         and '-', each part starting and ending with a letter or digit"
            .to_owned()
    })
}

/// Whether a `when` key names an L7 attribute Istio knows (warning, not error).
fn is_l7_key(key: &str) -> bool {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| !inner.is_empty())
    };
    matches!(
        key,
        "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "remote.ip"
            | "connection.sni"
    ) || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
        || key
            .strip_prefix("experimental.envoy.filters.")
            .is_some_and(|rest| !rest.is_empty())
}

struct Checker<'a> {
    document: Option<usize>,
    label: Option<String>,
    prefix: &'a str,
    errors: Vec<PolicyError>,
    warnings: Vec<Warning>,
    action: Action,
}

impl Checker<'_> {
    fn error(&mut self, path: String, problem: Problem) {
        self.errors.push(PolicyError {
            document: self.document,
            policy: self.label.clone(),
            path: format!("{}{path}", self.prefix),
            problem,
        });
    }

    fn warn(&mut self, path: String, kind: WarningKind) {
        self.warnings.push(Warning {
            path: format!("{}{path}", self.prefix),
            kind,
        });
    }

    fn l7(&mut self, path: String, field: String, has_l7: &mut bool) {
        *has_l7 = true;
        let action = self.action;
        self.warn(path, WarningKind::L7Field { field, action });
    }

    fn rule(&mut self, path: &str, rule: &model::Rule) -> Rule {
        let mut out = Rule::default();
        let mut has_l7 = false;
        if let Some(from) = &rule.from {
            if from.is_empty() {
                self.error(format!("{path}.from"), Problem::EmptyList("from"));
            }
            for (j, f) in from.iter().enumerate() {
                let p = format!("{path}.from[{j}]");
                out.from.push(self.source(&p, f, &mut has_l7));
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                self.error(format!("{path}.to"), Problem::EmptyList("to"));
            }
            for (j, t) in to.iter().enumerate() {
                let p = format!("{path}.to[{j}]");
                out.to.push(self.operation(&p, t, &mut has_l7));
            }
        }
        if let Some(when) = &rule.when {
            if when.is_empty() {
                self.error(format!("{path}.when"), Problem::EmptyList("when"));
            }
            for (j, c) in when.iter().enumerate() {
                let p = format!("{path}.when[{j}]");
                if let Some(c) = self.condition(&p, c, &mut has_l7) {
                    out.when.push(c);
                }
            }
        }
        out.has_l7 = has_l7;
        out
    }

    fn source(&mut self, path: &str, from: &model::From, has_l7: &mut bool) -> SourceMatch {
        let Some(s) = &from.source else {
            self.error(
                path.to_owned(),
                Problem::EmptyClause("`source` is required in a from entry"),
            );
            return SourceMatch::default();
        };
        let path = format!("{path}.source");
        let all = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if all.iter().all(|l| l.is_empty()) {
            self.error(
                path.clone(),
                Problem::EmptyClause("source must set at least one field"),
            );
        }
        for (field, list) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ] {
            if !list.is_empty() {
                self.l7(format!("{path}.{field}"), field.to_owned(), has_l7);
            }
        }
        SourceMatch {
            principals: Constraint {
                values: self.principals(&path, "principals", &s.principals),
                not_values: self.principals(&path, "notPrincipals", &s.not_principals),
            },
            namespaces: Constraint {
                values: self.namespaces(&path, "namespaces", &s.namespaces),
                not_values: self.namespaces(&path, "notNamespaces", &s.not_namespaces),
            },
            service_accounts: Constraint {
                values: self.service_accounts(&path, "serviceAccounts", &s.service_accounts),
                not_values: self.service_accounts(
                    &path,
                    "notServiceAccounts",
                    &s.not_service_accounts,
                ),
            },
            ip_blocks: Constraint {
                values: self.nets(&path, "ipBlocks", &s.ip_blocks),
                not_values: self.nets(&path, "notIpBlocks", &s.not_ip_blocks),
            },
            remote_ip_blocks: Constraint {
                values: self.nets(&path, "remoteIpBlocks", &s.remote_ip_blocks),
                not_values: self.nets(&path, "notRemoteIpBlocks", &s.not_remote_ip_blocks),
            },
        }
    }

    fn operation(&mut self, path: &str, to: &model::To, has_l7: &mut bool) -> OperationMatch {
        let Some(op) = &to.operation else {
            self.error(
                path.to_owned(),
                Problem::EmptyClause("`operation` is required in a to entry"),
            );
            return OperationMatch::default();
        };
        let path = format!("{path}.operation");
        let l7 = [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ];
        if op.ports.is_empty() && op.not_ports.is_empty() && l7.iter().all(|(_, l)| l.is_empty()) {
            self.error(
                path.clone(),
                Problem::EmptyClause("operation must set at least one field"),
            );
        }
        for (field, list) in l7 {
            if !list.is_empty() {
                self.l7(format!("{path}.{field}"), field.to_owned(), has_l7);
            }
        }
        OperationMatch {
            ports: Constraint {
                values: self.ports(&path, "ports", &op.ports),
                not_values: self.ports(&path, "notPorts", &op.not_ports),
            },
        }
    }

    fn condition(
        &mut self,
        path: &str,
        c: &model::Condition,
        has_l7: &mut bool,
    ) -> Option<Condition> {
        if c.key.is_empty() {
            self.error(
                format!("{path}.key"),
                Problem::EmptyClause("a when condition needs a key"),
            );
            return None;
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.error(path.to_owned(), Problem::NoConditionValues);
        }
        let (v, nv) = (&c.values, &c.not_values);
        let cond = match c.key.as_str() {
            "source.principal" => Condition::SourcePrincipal(Constraint {
                values: self.principals(path, "values", v),
                not_values: self.principals(path, "notValues", nv),
            }),
            "source.namespace" => Condition::SourceNamespace(Constraint {
                values: self.namespaces(path, "values", v),
                not_values: self.namespaces(path, "notValues", nv),
            }),
            "source.serviceAccount" => Condition::SourceServiceAccount(Constraint {
                values: self.service_accounts(path, "values", v),
                not_values: self.service_accounts(path, "notValues", nv),
            }),
            "source.ip" => Condition::SourceIp(Constraint {
                values: self.nets(path, "values", v),
                not_values: self.nets(path, "notValues", nv),
            }),
            "destination.ip" => Condition::DestinationIp(Constraint {
                values: self.nets(path, "values", v),
                not_values: self.nets(path, "notValues", nv),
            }),
            "destination.port" => Condition::DestinationPort(Constraint {
                values: self.ports(path, "values", v),
                not_values: self.ports(path, "notValues", nv),
            }),
            key if is_l7_key(key) => {
                self.l7(format!("{path}.key"), format!("when key {key}"), has_l7);
                return None;
            }
            key => {
                self.error(
                    format!("{path}.key"),
                    Problem::UnknownWhenKey(key.to_owned()),
                );
                return None;
            }
        };
        Some(cond)
    }

    /// Parses each item of a list, reporting failures at `path.field[i]`.
    fn each<T>(
        &mut self,
        path: &str,
        field: &str,
        items: &[String],
        mut parse: impl FnMut(&mut Self, &str, &str) -> Result<T, Problem>,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(items.len());
        for (i, raw) in items.iter().enumerate() {
            let item_path = format!("{path}.{field}[{i}]");
            match parse(self, &item_path, raw) {
                Ok(v) => out.push(v),
                Err(problem) => self.error(item_path, problem),
            }
        }
        out
    }

    fn principals(&mut self, path: &str, field: &str, items: &[String]) -> Vec<StringMatch> {
        self.each(path, field, items, |_, _, raw| {
            StringMatch::principal(raw).map_err(|reason| Problem::BadPrincipal {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn namespaces(&mut self, path: &str, field: &str, items: &[String]) -> Vec<NamespaceMatch> {
        self.each(path, field, items, |_, _, raw| {
            NamespaceMatch::parse(raw).map_err(|reason| Problem::BadNamespace {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn service_accounts(
        &mut self,
        path: &str,
        field: &str,
        items: &[String],
    ) -> Vec<ServiceAccountRef> {
        self.each(path, field, items, |_, _, raw| {
            raw.parse().map_err(|reason| Problem::BadServiceAccount {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn nets(&mut self, path: &str, field: &str, items: &[String]) -> Vec<IpNet> {
        self.each(path, field, items, |cx, item_path, raw| {
            let parsed = IpNet::parse(raw).map_err(|reason| Problem::BadCidr {
                value: raw.to_owned(),
                reason,
            })?;
            if parsed.host_bits_cleared {
                cx.warn(
                    item_path.to_owned(),
                    WarningKind::HostBitsCleared {
                        value: raw.to_owned(),
                        network: parsed.net.to_string(),
                    },
                );
            }
            Ok(parsed.net)
        })
    }

    fn ports(&mut self, path: &str, field: &str, items: &[String]) -> Vec<u16> {
        self.each(path, field, items, |_, _, raw| {
            parse_port(raw).map_err(|reason| Problem::BadPort {
                value: raw.to_owned(),
                reason,
            })
        })
    }
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
