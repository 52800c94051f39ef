//! Conformance of `decide` with DESIGN.md §6, table-driven: each case is a set of policies
//! (one line each, see [`policies`]), a connection and the expected decision.

use std::collections::BTreeMap;
use std::net::IpAddr;

use membrane_policy::{
    Action, Decision, DecisionReason, PolicyIndex, Problem, Request, Source, Verdict, decide,
    parse_policies,
};

const TRAINER: &str = "cluster.local/ns/training/sa/trainer";

/// Turns lines `[dry ]namespace/name {flow-style spec}` into one multi-document YAML text.
fn policies(lines: &str) -> String {
    let mut text = String::new();
    for line in lines.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (dry, line) = match line.strip_prefix("dry ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (id, spec) = line.split_once(' ').unwrap_or((line, "{}"));
        let (ns, name) = id.split_once('/').expect("namespace/name");
        let annotations = if dry {
            ", annotations: {\"membrane.dev/dry-run\": \"true\"}"
        } else {
            ""
        };
        text.push_str(&format!(
            "---\napiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec: {spec}\n"
        ));
    }
    text
}

/// The connection of a case; defaults: the trainer calls the inference pod on 8080.
#[derive(Clone)]
struct Conn {
    from: Option<&'static str>,
    source_ip: &'static str,
    namespace: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    destination_ip: &'static str,
    port: u16,
}

fn conn() -> Conn {
    Conn {
        from: Some(TRAINER),
        source_ip: "10.0.1.5",
        namespace: "inference",
        labels: vec![("app", "inference"), ("version", "v1")],
        destination_ip: "10.0.2.7",
        port: 8080,
    }
}

impl Conn {
    fn from(mut self, principal: Option<&'static str>) -> Self {
        self.from = principal;
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.source_ip = ip;
        self
    }
    fn dst_ip(mut self, ip: &'static str) -> Self {
        self.destination_ip = ip;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn to(mut self, namespace: &'static str, labels: &[(&'static str, &'static str)]) -> Self {
        self.namespace = namespace;
        self.labels = labels.to_vec();
        self
    }
}

/// Expected outcome.
struct Want {
    verdict: Verdict,
    reason: DecisionReason,
    policy: Option<(&'static str, usize)>,
    audit: Vec<&'static str>,
    dry_run: Vec<(&'static str, bool)>,
}

fn allowed_by(policy: &'static str, rule: usize) -> Want {
    Want {
        verdict: Verdict::Allow,
        reason: DecisionReason::AllowedBy,
        policy: Some((policy, rule)),
        audit: vec![],
        dry_run: vec![],
    }
}

fn denied_by(policy: &'static str, rule: usize) -> Want {
    Want {
        verdict: Verdict::Deny,
        reason: DecisionReason::DeniedBy,
        ..allowed_by(policy, rule)
    }
}

fn no_allow_policies() -> Want {
    Want {
        verdict: Verdict::Allow,
        reason: DecisionReason::NoAllowPolicies,
        policy: None,
        audit: vec![],
        dry_run: vec![],
    }
}

fn no_allow_matched() -> Want {
    Want {
        verdict: Verdict::Deny,
        reason: DecisionReason::NoAllowMatched,
        ..no_allow_policies()
    }
}

impl Want {
    /// AUDIT matches, as `namespace/name#rule`.
    fn audit(mut self, audit: &[&'static str]) -> Self {
        self.audit = audit.to_vec();
        self
    }
    fn dry(mut self, dry_run: &[(&'static str, bool)]) -> Self {
        self.dry_run = dry_run.to_vec();
        self
    }
}

fn run(index: &PolicyIndex, c: &Conn) -> Decision {
    let labels: BTreeMap<String, String> = c
        .labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let parts = c.from.map(|p| {
        let segs: Vec<&str> = p.split('/').collect();
        (p, segs[2], segs[4])
    });
    let req = Request {
        source: parts.map(|(principal, namespace, service_account)| Source {
            principal,
            namespace,
            service_account,
        }),
        source_ip: c.source_ip.parse::<IpAddr>().expect("source ip"),
        remote_ip: None,
        destination_namespace: c.namespace,
        destination_labels: &labels,
        destination_ip: c.destination_ip.parse::<IpAddr>().expect("destination ip"),
        destination_port: c.port,
    };
    decide(index, &req)
}

fn check_case(name: &str, lines: &str, c: Conn, want: Want) {
    let text = policies(lines);
    let checked = parse_policies(&text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let index = PolicyIndex::build(checked.into_iter().map(|c| c.policy), "membrane-system");
    let got = run(&index, &c);
    assert_eq!(got.verdict, want.verdict, "{name}: {got:?}");
    assert_eq!(got.reason, want.reason, "{name}: {got:?}");
    let policy = got.policy.as_ref().map(|p| p.to_string());
    assert_eq!(
        policy.as_deref().zip(got.rule),
        want.policy,
        "{name}: deciding policy and rule"
    );
    let audit: Vec<String> = got
        .audit
        .iter()
        .map(|m| format!("{}#{}", m.policy, m.rule))
        .collect();
    assert_eq!(audit, want.audit, "{name}: audit");
    let dry: Vec<(String, bool)> = got
        .dry_run
        .iter()
        .map(|m| (m.policy.to_string(), m.would_match))
        .collect();
    let want_dry: Vec<(String, bool)> = want
        .dry_run
        .iter()
        .map(|(p, m)| ((*p).to_owned(), *m))
        .collect();
    assert_eq!(dry, want_dry, "{name}: dry run");
}

const SEL: &str = "selector: {matchLabels: {app: inference}}";

#[test]
fn conformance() {
    let trainer_only = format!(
        "inference/trainer-only {{{SEL}, rules: [{{from: [{{source: {{principals: [{TRAINER}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}"
    );
    let cases: Vec<(&str, String, Conn, Want)> = vec![
        // --- order of evaluation
        ("no policies: allow", String::new(), conn(), no_allow_policies()),
        ("allow matches", trainer_only.clone(), conn(), allowed_by("inference/trainer-only", 0)),
        ("allow present, other principal: deny", trainer_only.clone(),
            conn().from(Some("cluster.local/ns/web/sa/frontend")), no_allow_matched()),
        ("allow present, other port: deny (from AND to)", trainer_only.clone(), conn().port(9090), no_allow_matched()),
        ("deny beats allow", format!("{trainer_only}\ninference/no-trainer {{action: DENY, rules: [{{from: [{{source: {{principals: [{TRAINER}]}}}}]}}]}}"),
            conn(), denied_by("inference/no-trainer", 0)),
        ("deny not matching, no allow: allow", "inference/d {action: DENY, rules: [{from: [{source: {namespaces: [web]}}]}]}".into(),
            conn(), no_allow_policies()),
        ("spec: {} denies everything", "inference/nothing {}".into(), conn(), no_allow_matched()),
        ("spec: {} elsewhere does not apply", "web/nothing {}".into(), conn(), no_allow_policies()),
        ("rules: [{}] allows everything, plaintext too", "inference/all {rules: [{}]}".into(),
            conn().from(None), allowed_by("inference/all", 0)),
        ("deny without rules never matches", "inference/d {action: DENY}".into(), conn(), no_allow_policies()),
        ("two allows match: first by name reported", "inference/b {rules: [{}]}\ninference/a {rules: [{}]}".into(),
            conn(), allowed_by("inference/a", 0)),
        // --- scope
        ("selector for another workload does not apply", "inference/web {selector: {matchLabels: {app: web}}}".into(),
            conn(), no_allow_policies()),
        ("selector needs every label", "inference/v2 {selector: {matchLabels: {app: inference, version: v2}}}".into(),
            conn(), no_allow_policies()),
        ("namespace-wide allow applies, does not match", "inference/ns-wide {rules: [{from: [{source: {namespaces: [web]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("other namespace's policy does not apply", "training/ns-wide {}".into(), conn(), no_allow_policies()),
        ("root namespace without selector is mesh-wide", "membrane-system/mesh-deny {action: DENY, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}".into(),
            conn().to("elsewhere", &[("app", "x")]), denied_by("membrane-system/mesh-deny", 0)),
        ("root namespace with selector selects in every namespace", format!("membrane-system/mesh-sel {{{SEL}}}"),
            conn(), no_allow_matched()),
        ("root namespace selector, other labels: not applied", format!("membrane-system/mesh-sel {{{SEL}}}"),
            conn().to("inference", &[("app", "web")]), no_allow_policies()),
        ("mesh-wide deny reported before namespace deny", "inference/a-deny {action: DENY, rules: [{}]}\nmembrane-system/z-deny {action: DENY, rules: [{}]}".into(),
            conn(), denied_by("membrane-system/z-deny", 0)),
        ("namespace-wide deny reported before selector deny", format!("inference/a-sel {{{SEL}, action: DENY, rules: [{{}}]}}\ninference/z-ns {{action: DENY, rules: [{{}}]}}"),
            conn(), denied_by("inference/z-ns", 0)),
        // --- rules, fields, values
        ("rules are OR-ed", "inference/p {rules: [{from: [{source: {namespaces: [web]}}]}, {from: [{source: {namespaces: [training]}}]}]}".into(),
            conn(), allowed_by("inference/p", 1)),
        ("fields in a source are AND-ed", "inference/p {rules: [{from: [{source: {namespaces: [training], ipBlocks: [\"192.168.0.0/16\"]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("from entries are OR-ed", "inference/p {rules: [{from: [{source: {namespaces: [web]}}, {source: {ipBlocks: [\"10.0.0.0/8\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("values in a field are OR-ed", "inference/p {rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/a, cluster.local/ns/training/sa/trainer]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("notPrincipals excludes", "inference/p {rules: [{from: [{source: {notPrincipals: [cluster.local/ns/training/sa/trainer]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("notPrincipals holds for plaintext (no principal)", "inference/p {action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}".into(),
            conn().from(None), denied_by("inference/p", 0)),
        ("notPrincipals [*] does not catch authenticated peers", "inference/p {action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}".into(),
            conn(), no_allow_policies()),
        ("principal * is any authenticated peer", "inference/p {rules: [{from: [{source: {principals: [\"*\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("principal * does not match plaintext", "inference/p {rules: [{from: [{source: {principals: [\"*\"]}}]}]}".into(),
            conn().from(None), no_allow_matched()),
        ("principal prefix", "inference/p {rules: [{from: [{source: {principals: [cluster.local/ns/training/*]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("principal prefix, other namespace", "inference/p {rules: [{from: [{source: {principals: [cluster.local/ns/train/*]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("principal suffix", "inference/p {rules: [{from: [{source: {principals: [\"*/sa/trainer\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("spiffe:// principals match", "inference/p {rules: [{from: [{source: {principals: [\"spiffe://cluster.local/ns/training/sa/trainer\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("namespaces need a namespace: plaintext fails", "inference/p {rules: [{from: [{source: {namespaces: [\"*\"]}}]}]}".into(),
            conn().from(None), no_allow_matched()),
        ("notNamespaces holds for plaintext", "inference/p {rules: [{from: [{source: {notNamespaces: [web]}}]}]}".into(),
            conn().from(None), allowed_by("inference/p", 0)),
        ("serviceAccounts ns/sa", "inference/p {rules: [{from: [{source: {serviceAccounts: [training/trainer]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("notServiceAccounts", "inference/p {action: DENY, rules: [{from: [{source: {notServiceAccounts: [training/trainer]}}]}]}".into(),
            conn().from(Some("cluster.local/ns/training/sa/other")), denied_by("inference/p", 0)),
        ("ipBlocks admit a plaintext source", "inference/p {rules: [{from: [{source: {ipBlocks: [\"10.0.1.0/24\"]}}]}]}".into(),
            conn().from(None), allowed_by("inference/p", 0)),
        ("ipBlocks IPv6", "inference/p {rules: [{from: [{source: {ipBlocks: [\"fd00:10::/64\"]}}]}]}".into(),
            conn().ip("fd00:10::5").dst_ip("fd00:20::7"), allowed_by("inference/p", 0)),
        ("ipBlocks IPv6 outside", "inference/p {rules: [{from: [{source: {ipBlocks: [\"fd00:10::/64\"]}}]}]}".into(),
            conn().ip("fd00:11::5"), no_allow_matched()),
        ("IPv4-mapped source matches an IPv4 block", "inference/p {rules: [{from: [{source: {ipBlocks: [\"10.0.1.5\"]}}]}]}".into(),
            conn().ip("::ffff:10.0.1.5"), allowed_by("inference/p", 0)),
        ("notIpBlocks", "inference/p {action: DENY, rules: [{from: [{source: {notIpBlocks: [\"10.0.0.0/8\"]}}]}]}".into(),
            conn().ip("192.168.1.1"), denied_by("inference/p", 0)),
        ("ports", "inference/p {rules: [{to: [{operation: {ports: [\"80\", \"8080\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("notPorts", "inference/p {rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("to entries are OR-ed", "inference/p {rules: [{to: [{operation: {ports: [\"1\"]}}, {operation: {ports: [\"8080\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        // --- when
        ("when source.principal and source.namespace (AND)", "inference/p {rules: [{when: [{key: source.principal, values: [\"cluster.local/ns/training/*\"]}, {key: source.namespace, notValues: [web]}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("when source.principal values fail for plaintext", "inference/p {rules: [{when: [{key: source.principal, values: [\"*\"]}]}]}".into(),
            conn().from(None), no_allow_matched()),
        ("when source.serviceAccount", "inference/p {rules: [{when: [{key: source.serviceAccount, values: [training/trainer]}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("when source.ip", "inference/p {action: DENY, rules: [{when: [{key: source.ip, values: [\"10.0.1.0/24\"]}]}]}".into(),
            conn(), denied_by("inference/p", 0)),
        ("when destination.ip", "inference/p {rules: [{when: [{key: destination.ip, values: [\"10.0.3.0/24\"]}]}]}".into(),
            conn(), no_allow_matched()),
        ("when destination.port notValues", "inference/p {rules: [{when: [{key: destination.port, notValues: [\"9090\"]}]}]}".into(),
            conn(), allowed_by("inference/p", 0)),
        ("when destination.port values", "inference/p {rules: [{when: [{key: destination.port, values: [\"9090\"]}]}]}".into(),
            conn(), no_allow_matched()),
        // --- L7 fail-safe
        ("L7 field in ALLOW: rule never matches, policy applies", "inference/p {rules: [{to: [{operation: {methods: [GET]}}]}]}".into(),
            conn(), no_allow_matched()),
        ("L7 rule dead, L4 rule still matches", "inference/p {rules: [{to: [{operation: {paths: [\"/x\"], ports: [\"8080\"]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]}".into(),
            conn(), allowed_by("inference/p", 1)),
        ("L7 when key in ALLOW: never matches", "inference/p {rules: [{when: [{key: \"request.headers[x-a]\", values: [a]}]}]}".into(),
            conn(), no_allow_matched()),
        ("L7 field in DENY: enforced on the L4 part (port matches)", "inference/p {action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]}".into(),
            conn(), denied_by("inference/p", 0)),
        ("L7 field in DENY: enforced on the L4 part (port differs)", "inference/p {action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]}".into(),
            conn().port(9090), no_allow_policies()),
        ("L7-only to in DENY counts as any operation", "inference/p {action: DENY, rules: [{from: [{source: {namespaces: [training]}}], to: [{operation: {paths: [\"/admin\"]}}]}]}".into(),
            conn(), denied_by("inference/p", 0)),
        ("L7 when key in DENY counts as true", "inference/p {action: DENY, rules: [{when: [{key: request.auth.principal, values: [x]}, {key: destination.port, values: [\"8080\"]}]}]}".into(),
            conn(), denied_by("inference/p", 0)),
        ("requestPrincipals-only source in DENY denies every source", "inference/p {action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}".into(),
            conn().from(None), denied_by("inference/p", 0)),
        // --- dry run and AUDIT
        ("dry-run deny is reported, not enforced", "dry inference/p {action: DENY, rules: [{}]}".into(),
            conn(), no_allow_policies().dry(&[("inference/p", true)])),
        ("dry-run allow does not make an ALLOW apply", "dry inference/p {rules: [{from: [{source: {namespaces: [web]}}]}]}".into(),
            conn(), no_allow_policies().dry(&[("inference/p", false)])),
        ("dry-run spec: {} does not deny", format!("dry inference/p {{}}\n{trainer_only}"),
            conn(), allowed_by("inference/trainer-only", 0).dry(&[("inference/p", false)])),
        ("AUDIT never changes the verdict (allow)", "inference/a {action: AUDIT, rules: [{to: [{operation: {ports: [\"1\"]}}]}, {}]}".into(),
            conn(), no_allow_policies().audit(&["inference/a#1"])),
        ("AUDIT never changes the verdict (deny)", "inference/a {action: AUDIT, rules: [{}]}\nmembrane-system/z {action: AUDIT, rules: [{}]}\ninference/nothing {}".into(),
            conn(), no_allow_matched().audit(&["inference/a#0", "membrane-system/z#0"])),
        ("AUDIT that does not match is not recorded", "inference/a {action: AUDIT, rules: [{from: [{source: {namespaces: [web]}}]}]}".into(),
            conn(), no_allow_policies()),
        ("AUDIT with an L7 field records on its L4 part", "inference/a {action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]}".into(),
            conn(), no_allow_policies().audit(&["inference/a#0"])),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (name, lines, c, want) in cases {
        check_case(name, &lines, c, want);
    }
}

#[test]
fn custom_is_rejected_not_enforced() {
    let text = policies(&format!(
        "inference/ext {{{SEL}, action: CUSTOM, provider: {{name: authz}}, rules: [{{}}]}}\ninference/ok {{}}"
    ));
    let errs = parse_policies(&text).expect_err("CUSTOM");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].problem, Problem::CustomUnsupported);
    assert_eq!(errs[0].policy.as_deref(), Some("inference/ext"));
    assert_eq!(errs[0].document, Some(1));
}

#[test]
fn decision_carries_actions_of_dry_runs() {
    let text = policies(
        "dry inference/d {action: DENY, rules: [{}]}\ndry inference/a {action: AUDIT, rules: [{}]}",
    );
    let index = PolicyIndex::build(
        parse_policies(&text)
            .expect("valid")
            .into_iter()
            .map(|c| c.policy),
        "membrane-system",
    );
    let d = run(&index, &conn());
    assert!(d.is_allowed());
    let actions: Vec<(Action, Option<usize>)> =
        d.dry_run.iter().map(|m| (m.action, m.rule)).collect();
    assert_eq!(actions, [(Action::Audit, Some(0)), (Action::Deny, Some(0))]);
    assert!(
        d.audit.is_empty(),
        "a dry-run AUDIT is reported as dry run only"
    );
    assert_eq!(d.reason.as_str(), "no_allow_policies");
    assert_eq!(d.verdict.to_string(), "ALLOW");
}
