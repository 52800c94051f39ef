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

#[path = "validate_fields.rs"]
mod fields;
use fields::Checker;

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
