//! Unit tests of `validate`: one test per rule, with the exact field path of each error.

use super::*;
use crate::diagnostics::{Problem, WarningKind};
use crate::matcher::StringMatch;
use crate::policy::Action;

/// A document with the given flow-style `spec`.
fn doc(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: p, namespace: ns}}\nspec: {spec}\n"
    )
}

fn ok(text: &str) -> Checked {
    let mut all = parse_policies(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
    assert_eq!(all.len(), 1, "{text}");
    all.remove(0)
}

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_policies(text) {
        Ok(c) => panic!("expected errors for {text}, got {c:?}"),
        Err(e) => e,
    }
}

/// The only error of `text`, asserting its path.
fn error_at(text: &str, path: &str) -> Problem {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, path, "{}", errs[0]);
    errs[0].problem.clone()
}

#[test]
fn full_policy_compiles() {
    let c = ok(&doc(
        r#"{selector: {matchLabels: {app: inference}}, action: DENY, rules: [
            {from: [{source: {principals: ["spiffe://cluster.local/ns/training/sa/trainer",
                                          "cluster.local/ns/ops/*", "*/sa/admin", "*"],
                              notNamespaces: [kube-system], serviceAccounts: [a/b],
                              ipBlocks: ["10.0.0.0/8", "2001:db8::/32"]}}],
             to: [{operation: {ports: ["8080", 9090], notPorts: ["22"]}}],
             when: [{key: destination.port, values: ["8080"]},
                    {key: source.ip, notValues: ["10.9.0.0/16"]}]}]}"#,
    ));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.document, Some(1));
    let p = &c.policy;
    assert_eq!(p.id.to_string(), "ns/p");
    assert_eq!(p.action, Action::Deny);
    assert!(!p.dry_run);
    assert_eq!(p.selector.get("app").map(String::as_str), Some("inference"));
    let rule = &p.rules[0];
    assert!(!rule.has_l7);
    let src = &rule.from[0];
    assert_eq!(
        src.principals.values,
        [
            StringMatch::Exact("cluster.local/ns/training/sa/trainer".into()),
            StringMatch::Prefix("cluster.local/ns/ops/".into()),
            StringMatch::Suffix("/sa/admin".into()),
            StringMatch::Any,
        ]
    );
    assert_eq!(
        src.namespaces.not_values,
        [NamespaceMatch::local(StringMatch::Exact(
            "kube-system".into()
        ))]
    );
    assert_eq!(src.service_accounts.values[0].to_string(), "a/b");
    assert_eq!(src.ip_blocks.values.len(), 2);
    assert_eq!(rule.to[0].ports.values, [8080, 9090]);
    assert_eq!(rule.to[0].ports.not_values, [22]);
    assert_eq!(rule.when.len(), 2);
    assert_eq!(rule.when[0].key(), "destination.port");
    assert_eq!(rule.when[1].key(), "source.ip");
}

#[test]
fn defaults() {
    let c = ok(
        "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n",
    );
    assert_eq!(c.policy.namespace(), "default");
    assert_eq!(c.policy.action, Action::Allow);
    assert!(c.policy.rules.is_empty());
    assert!(c.policy.selector.is_empty());
    // No spec at all is `spec: {}`.
    let c = ok(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
    );
    assert_eq!(c.policy.action, Action::Allow);
    assert!(c.policy.rules.is_empty());
    // An empty selector is no selector.
    let c = ok(&doc("{selector: {matchLabels: {}}, rules: [{}]}"));
    assert!(c.policy.selector.is_empty());
    assert_eq!(c.policy.rules, [Rule::default()]);
}

#[test]
fn bad_cidr() {
    let p = error_at(
        &doc(r#"{rules: [{from: [{source: {ipBlocks: ["10.0.0.0/8", "10.0.0.0/33"]}}]}]}"#),
        "spec.rules[0].from[0].source.ipBlocks[1]",
    );
    assert!(
        matches!(p, Problem::BadCidr { ref value, .. } if value == "10.0.0.0/33"),
        "{p}"
    );
    let p = error_at(
        &doc(r#"{rules: [{from: [{source: {notIpBlocks: ["nonsense"]}}]}]}"#),
        "spec.rules[0].from[0].source.notIpBlocks[0]",
    );
    assert!(matches!(p, Problem::BadCidr { .. }), "{p}");
    let p = error_at(
        &doc(r#"{rules: [{when: [{key: destination.ip, values: ["fd00::/200"]}]}]}"#),
        "spec.rules[0].when[0].values[0]",
    );
    assert!(matches!(p, Problem::BadCidr { .. }), "{p}");
}

#[test]
fn host_bits_are_a_warning() {
    let c = ok(&doc(
        r#"{rules: [{from: [{source: {ipBlocks: ["10.1.2.3/8"]}}]}]}"#,
    ));
    assert_eq!(c.warnings.len(), 1);
    assert_eq!(
        c.warnings[0].path,
        "spec.rules[0].from[0].source.ipBlocks[0]"
    );
    assert!(matches!(
        &c.warnings[0].kind,
        WarningKind::HostBitsCleared { network, .. } if network == "10.0.0.0/8"
    ));
}

#[test]
fn bad_ports() {
    for (op, path) in [
        (
            r#"{ports: ["65536"]}"#,
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            r#"{ports: ["80", "http"]}"#,
            "spec.rules[0].to[0].operation.ports[1]",
        ),
        (
            r#"{notPorts: ["0"]}"#,
            "spec.rules[0].to[0].operation.notPorts[0]",
        ),
        (r#"{ports: [-1]}"#, "spec.rules[0].to[0].operation.ports[0]"),
    ] {
        let p = error_at(
            &doc(&format!("{{rules: [{{to: [{{operation: {op}}}]}}]}}")),
            path,
        );
        assert!(matches!(p, Problem::BadPort { .. }), "{p}");
    }
    let p = error_at(
        &doc(r#"{rules: [{when: [{key: destination.port, notValues: ["1-2"]}]}]}"#),
        "spec.rules[0].when[0].notValues[0]",
    );
    assert!(matches!(p, Problem::BadPort { .. }), "{p}");
}

#[test]
fn unknown_action() {
    let p = error_at(&doc("{action: PERMIT}"), "spec.action");
    assert!(p.to_string().contains("unknown action \"PERMIT\""), "{p}");
    let p = error_at(&doc("{action: deny}"), "spec.action");
    assert!(p.to_string().contains("upper case"), "{p}");
}

#[test]
fn custom_is_rejected() {
    let text = doc("{action: CUSTOM, provider: {name: ext-authz}, rules: [{}]}");
    assert_eq!(error_at(&text, "spec.action"), Problem::CustomUnsupported);
    let errs = errors(&text);
    assert!(errs[0].to_string().contains("CUSTOM"), "{}", errs[0]);
    assert_eq!(errs[0].policy.as_deref(), Some("ns/p"));
    assert_eq!(errs[0].document, Some(1));
}

#[test]
fn provider_and_target_refs() {
    assert_eq!(
        error_at(&doc("{provider: {name: x}}"), "spec.provider"),
        Problem::ProviderWithoutCustom
    );
    assert_eq!(
        error_at(
            &doc("{targetRef: {kind: Gateway, name: g}}"),
            "spec.targetRef"
        ),
        Problem::TargetRefUnsupported
    );
    assert_eq!(
        error_at(
            &doc("{targetRefs: [{kind: Service, name: s}]}"),
            "spec.targetRefs"
        ),
        Problem::TargetRefUnsupported
    );
}

#[test]
fn malformed_principal_patterns() {
    let text = doc(
        r#"{rules: [{}, {from: [{source: {principals: ["cluster.local/ns/a/sa/b", "*", "a*b"]}}]}]}"#,
    );
    let p = error_at(&text, "spec.rules[1].from[0].source.principals[2]");
    assert!(
        matches!(p, Problem::BadPrincipal { ref value, .. } if value == "a*b"),
        "{p}"
    );
    for bad in ["**", "*a*", "", "cluster.local/ns/*/sa/x", "x*y*"] {
        let text = doc(&format!(
            r#"{{rules: [{{from: [{{source: {{notPrincipals: ["{bad}"]}}}}]}}]}}"#
        ));
        let p = error_at(&text, "spec.rules[0].from[0].source.notPrincipals[0]");
        assert!(matches!(p, Problem::BadPrincipal { .. }), "{bad}: {p}");
    }
}

#[test]
fn invalid_spiffe_principals() {
    for bad in [
        "cluster.local/ns/a",
        "cluster.local/ns/a/sa/b/c",
        "Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local/ns/A/sa/b",
        "cluster.local/namespace/a/sa/b",
        "https://cluster.local/ns/a/sa/b",
    ] {
        let text = doc(&format!(
            r#"{{rules: [{{when: [{{key: source.principal, values: ["{bad}"]}}]}}]}}"#
        ));
        let p = error_at(&text, "spec.rules[0].when[0].values[0]");
        assert!(matches!(p, Problem::BadPrincipal { .. }), "{bad}: {p}");
    }
}

#[test]
fn principals_are_normalised_without_scheme() {
    let c = ok(&doc(
        r#"{rules: [{from: [{source: {principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/b"]}}]}]}"#,
    ));
    let values = &c.policy.rules[0].from[0].principals.values;
    assert_eq!(values[0], values[1]);
    assert_eq!(values[0].to_string(), "cluster.local/ns/a/sa/b");
}

#[test]
fn namespaces_are_names_or_patterns() {
    let c = ok(&doc(
        r#"{rules: [{from: [{source: {namespaces: ["team-*", "*-prod", "*", "a"]}}]}]}"#,
    ));
    assert_eq!(c.policy.rules[0].from[0].namespaces.values.len(), 4);
    let p = error_at(
        &doc(r#"{rules: [{from: [{source: {namespaces: ["Bad_NS"]}}]}]}"#),
        "spec.rules[0].from[0].source.namespaces[0]",
    );
    assert!(matches!(p, Problem::BadNamespace { .. }), "{p}");
}

#[test]
fn service_accounts_are_ns_slash_sa() {
    for bad in ["trainer", "a/b/c", "a/*", "*", "A/b"] {
        let text = doc(&format!(
            r#"{{rules: [{{from: [{{source: {{serviceAccounts: ["ok/fine", "{bad}"]}}}}]}}]}}"#
        ));
        let p = error_at(&text, "spec.rules[0].from[0].source.serviceAccounts[1]");
        assert!(matches!(p, Problem::BadServiceAccount { .. }), "{bad}: {p}");
    }
    let p = error_at(
        &doc(r#"{rules: [{when: [{key: source.serviceAccount, notValues: ["x"]}]}]}"#),
        "spec.rules[0].when[0].notValues[0]",
    );
    assert!(matches!(p, Problem::BadServiceAccount { .. }), "{p}");
}

#[test]
fn unknown_when_key() {
    let p = error_at(
        &doc(
            r#"{rules: [{when: [{key: source.principal, values: ["*"]}, {key: source.port, values: ["1"]}]}]}"#,
        ),
        "spec.rules[0].when[1].key",
    );
    assert_eq!(p, Problem::UnknownWhenKey("source.port".into()));
    for bad in [
        "request.headers[]",
        "request.foo",
        "destination.name",
        "SOURCE.IP",
    ] {
        let p = error_at(
            &doc(&format!(
                r#"{{rules: [{{when: [{{key: "{bad}", values: ["x"]}}]}}]}}"#
            )),
            "spec.rules[0].when[0].key",
        );
        assert!(matches!(p, Problem::UnknownWhenKey(_)), "{bad}: {p}");
    }
}

#[test]
fn every_l4_when_key_is_known() {
    let c = ok(&doc(r#"{rules: [{when: [
            {key: source.principal, values: ["*"]},
            {key: source.namespace, values: ["a"]},
            {key: source.serviceAccount, values: ["a/b"]},
            {key: source.ip, values: ["10.0.0.1"]},
            {key: destination.ip, values: ["10.0.0.0/8"]},
            {key: destination.port, values: ["80"]}]}]}"#));
    assert_eq!(c.policy.rules[0].when.len(), 6);
    assert!(!c.policy.rules[0].has_l7);
}

#[test]
fn remote_ip_blocks_are_l4_and_match_the_reported_client() {
    use crate::{PolicyIndex, Request, Verdict, decide};
    let c = ok(&doc(
        r#"{action: DENY, rules: [{from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]}]}"#,
    ));
    assert!(
        c.warnings.is_empty() && !c.policy.rules[0].has_l7,
        "{:?}",
        c.warnings
    );
    let index = PolicyIndex::build([c.policy], "membrane-system");
    let labels = std::collections::BTreeMap::new();
    let verdict = |remote: Option<[u8; 4]>| {
        decide(
            &index,
            &Request {
                source: None,
                source_ip: [10, 0, 0, 9].into(),
                remote_ip: remote.map(Into::into),
                destination_namespace: "ns",
                destination_labels: &labels,
                destination_ip: [10, 0, 0, 2].into(),
                destination_port: 80,
            },
        )
        .verdict
    };
    assert_eq!(verdict(Some([203, 0, 113, 7])), Verdict::Deny);
    assert_eq!(verdict(Some([198, 51, 100, 7])), Verdict::Allow);
    // Without a reported client the peer's address is the remote one.
    assert_eq!(verdict(None), Verdict::Allow);
}

#[test]
fn l7_fields_are_warnings() {
    let c = ok(&doc(
        r#"{rules: [{from: [{source: {requestPrincipals: ["*"]}}],
                     to: [{operation: {methods: [GET], notPaths: ["/admin"], hosts: [a], ports: ["80"]}}],
                     when: [{key: "request.headers[x-user]", values: ["a"]},
                            {key: "request.auth.claims[iss]", values: ["a"]},
                            {key: remote.ip, values: ["x"]},
                            {key: connection.sni, values: ["x"]}]},
                    {to: [{operation: {ports: ["81"]}}]}]}"#,
    ));
    let paths: Vec<&str> = c.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].from[0].source.requestPrincipals",
            "spec.rules[0].to[0].operation.hosts",
            "spec.rules[0].to[0].operation.methods",
            "spec.rules[0].to[0].operation.notPaths",
            "spec.rules[0].when[0].key",
            "spec.rules[0].when[1].key",
            "spec.rules[0].when[2].key",
            "spec.rules[0].when[3].key",
        ]
    );
    assert!(c.warnings.iter().all(|w| matches!(
        w.kind,
        WarningKind::L7Field {
            action: Action::Allow,
            ..
        }
    )));
    let rules = &c.policy.rules;
    assert!(rules[0].has_l7);
    assert!(!rules[1].has_l7);
    // The L4 parts are kept: an L7-only source becomes "any source", L7 conditions vanish.
    assert!(rules[0].from[0].principals.is_empty());
    assert_eq!(rules[0].to[0].ports.values, [80]);
    assert!(rules[0].when.is_empty());
    // In a DENY policy the warning says so.
    let c = ok(&doc(
        r#"{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"#,
    ));
    assert!(matches!(
        c.warnings[0].kind,
        WarningKind::L7Field {
            action: Action::Deny,
            ..
        }
    ));
    assert!(c.warnings[0].to_string().contains("L4 part"));
    assert!(
        c.policy.rules[0].to[0].ports.is_empty(),
        "L7-only to: any operation"
    );
}

#[test]
fn unknown_fields_name_their_path() {
    let p = error_at(
        &doc(r#"{rules: [{from: [{source: {principal: ["x"]}}]}]}"#),
        "spec.rules[0].from[0].source.principal",
    );
    assert!(p.to_string().contains("unknown field `principal`"), "{p}");
    error_at(&doc("{rule: []}"), "spec.rule");
    error_at(
        &doc("{selector: {matchExpressions: []}}"),
        "spec.selector.matchExpressions",
    );
    error_at(
        &doc("{rules: [{when: [{key: a, value: [b]}]}]}"),
        "spec.rules[0].when[0].value",
    );
    // Outside spec, unknown fields are Kubernetes' business.
    ok(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, uid: x, labels: {a: b}}\nstatus: {x: 1}\nspec: {}\n",
    );
}

#[test]
fn wrong_types_name_their_path() {
    let p = error_at(&doc("{rules: {from: []}}"), "spec.rules");
    assert!(matches!(p, Problem::Schema(_)), "{p}");
    error_at(
        &doc("{selector: {matchLabels: [a]}}"),
        "spec.selector.matchLabels",
    );
    error_at(
        &doc(r#"{rules: [{to: [{operation: {ports: [[1]]}}]}]}"#),
        "spec.rules[0].to[0].operation.ports[0]",
    );
    let errs = errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: a}\n",
    );
    assert_eq!(errs[0].path, "metadata");
    assert!(errs[0].to_string().contains("name"), "{}", errs[0]);
}

#[test]
fn empty_clauses() {
    assert_eq!(
        error_at(&doc("{rules: [{from: []}]}"), "spec.rules[0].from"),
        Problem::EmptyList("from")
    );
    assert_eq!(
        error_at(&doc("{rules: [{to: []}]}"), "spec.rules[0].to"),
        Problem::EmptyList("to")
    );
    assert_eq!(
        error_at(&doc("{rules: [{when: []}]}"), "spec.rules[0].when"),
        Problem::EmptyList("when")
    );
    assert!(matches!(
        error_at(&doc("{rules: [{from: [{}]}]}"), "spec.rules[0].from[0]"),
        Problem::EmptyClause(_)
    ));
    assert!(matches!(
        error_at(
            &doc("{rules: [{from: [{source: {}}]}]}"),
            "spec.rules[0].from[0].source"
        ),
        Problem::EmptyClause(_)
    ));
    assert!(matches!(
        error_at(
            &doc("{rules: [{to: [{operation: {}}]}]}"),
            "spec.rules[0].to[0].operation"
        ),
        Problem::EmptyClause(_)
    ));
    assert!(matches!(
        error_at(&doc("{rules: [{to: [{}]}]}"), "spec.rules[0].to[0]"),
        Problem::EmptyClause(_)
    ));
    assert_eq!(
        error_at(
            &doc("{rules: [{when: [{key: source.ip}]}]}"),
            "spec.rules[0].when[0]"
        ),
        Problem::NoConditionValues
    );
    assert!(matches!(
        error_at(
            &doc(r#"{rules: [{when: [{values: ["a"]}]}]}"#),
            "spec.rules[0].when[0].key"
        ),
        Problem::EmptyClause(_)
    ));
}

#[test]
fn names() {
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: Bad_Name, namespace: ns}\nspec: {}\n";
    assert!(matches!(
        error_at(text, "metadata.name"),
        Problem::InvalidName { .. }
    ));
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: -ns}\nspec: {}\n";
    assert!(matches!(
        error_at(text, "metadata.namespace"),
        Problem::InvalidName { .. }
    ));
    ok(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a.b-c, namespace: x}\nspec: {}\n",
    );
}

#[test]
fn dry_run_annotations() {
    let with = |annotations: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p, annotations: {annotations}}}\nspec: {{}}\n"
        )
    };
    assert!(
        ok(&with(r#"{"membrane.dev/dry-run": "true"}"#))
            .policy
            .dry_run
    );
    assert!(ok(&with(r#"{"istio.io/dry-run": "true"}"#)).policy.dry_run);
    assert!(ok(&with(r#"{"istio.io/dry-run": "TRUE"}"#)).policy.dry_run);
    assert!(
        !ok(&with(r#"{"membrane.dev/dry-run": "false"}"#))
            .policy
            .dry_run
    );
    assert!(!ok(&with(r#"{"other": "true"}"#)).policy.dry_run);
    let p = error_at(
        &with(r#"{"membrane.dev/dry-run": "yes"}"#),
        "metadata.annotations[\"membrane.dev/dry-run\"]",
    );
    assert!(matches!(p, Problem::BadDryRun { .. }), "{p}");
    // Kubernetes annotations are strings; an unquoted boolean is a type error.
    error_at(
        &with(r#"{"istio.io/dry-run": true}"#),
        "metadata.annotations.istio.io/dry-run",
    );
}

#[test]
fn deny_without_rules_warns() {
    let c = ok(&doc("{action: DENY}"));
    assert_eq!(c.warnings[0].kind, WarningKind::NoRules(Action::Deny));
    assert!(ok(&doc("{}")).warnings.is_empty());
}

#[test]
fn api_versions_and_kinds() {
    for v in [
        "security.istio.io/v1",
        "security.istio.io/v1beta1",
        "security.membrane.dev/v1",
    ] {
        ok(&format!(
            "apiVersion: {v}\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\n"
        ));
    }
    let p = error_at(
        "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        "apiVersion",
    );
    assert!(matches!(p, Problem::UnsupportedApiVersion(_)), "{p}");
    // Other products' AuthorizationPolicy, and other kinds, are skipped.
    let text = "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: l}\n---\n\
                apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {whatever: 1}\n";
    assert_eq!(parse_policies(text).expect("skipped"), []);
    assert_eq!(parse_policies("").expect("empty"), []);
    assert_eq!(parse_policies("---\n---\n").expect("empty docs"), []);
}

#[test]
fn multiple_documents_and_lists() {
    let text = format!(
        "{}---\n{}---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: q}}}}\n",
        doc("{}"),
        doc("{action: DENY, rules: [{}]}").replace("name: p", "name: d"),
    );
    let all = parse_policies(&text).expect("valid");
    let names: Vec<String> = all.iter().map(|c| c.policy.id.to_string()).collect();
    assert_eq!(names, ["ns/p", "ns/d", "default/q"]);
    assert_eq!(all[2].document, Some(3));
    // Errors in several documents are all reported, each with its document.
    let text = format!(
        "{}---\n{}---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: q}}, spec: {{action: CUSTOM}}}}\n",
        doc(r#"{rules: [{to: [{operation: {ports: ["x"]}}]}]}"#),
        doc("{}"),
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0].document, Some(1));
    assert_eq!(errs[1].document, Some(3));
    assert_eq!(errs[1].path, "items[0].spec.action");
    assert_eq!(errs[1].policy.as_deref(), Some("default/q"));
}

#[test]
fn not_objects() {
    let errs = errors("- a\n- b\n");
    assert!(matches!(errs[0].problem, Problem::Document(_)));
    let errs = errors("metadata: {name: p}\n");
    assert!(matches!(errs[0].problem, Problem::Document(_)));
    let errs = errors("key: [unclosed\n");
    assert!(matches!(errs[0].problem, Problem::Yaml(_)));
}

#[test]
fn check_on_a_typed_document() {
    let doc = model::AuthorizationPolicy {
        api_version: model::MEMBRANE_API_VERSION.into(),
        kind: model::KIND.into(),
        metadata: model::Metadata {
            name: "p".into(),
            namespace: "ns".into(),
            annotations: Default::default(),
        },
        spec: model::Spec {
            action: Some(model::Action::Custom),
            ..Default::default()
        },
    };
    let errs = check(doc.clone()).expect_err("custom");
    assert_eq!(errs[0].document, None);
    assert_eq!(
        errs[0].to_string(),
        "ns/p: spec.action: action CUSTOM (external authorization) is not supported; the policy is not enforced"
    );
    let mut fine = doc;
    fine.spec.action = None;
    let c = check(fine.clone()).expect("valid");
    assert_eq!(c.document, None);
    fine.kind = "Other".into();
    fine.api_version = "v1".into();
    let errs = check(fine).expect_err("kind");
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["kind", "apiVersion"]);
}
