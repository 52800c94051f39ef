//! Conformance table of the EgressPolicy decision (DESIGN.md §9): each case is a set of
//! policies selecting the source, a connection, and the expected verdict, reason, deciding
//! policy and rule. Plus the validation of documents: every error names its field path.

use membrane_policy::Source;
use membrane_policy::egress::{
    EgressPolicy, EgressReason, EgressRequest, EgressVerdict, decide_egress, parse_egress_policies,
    validate::{parse_host, parse_quantity, parse_window},
};

const TRAINER: Source<'static> = Source {
    principal: "cluster.local/ns/training/sa/trainer",
    namespace: "training",
    service_account: "trainer",
};
const SERVER: Source<'static> = Source {
    principal: "cluster.local/ns/inference/sa/model-server",
    namespace: "inference",
    service_account: "model-server",
};

/// The policies every case picks from, by name.
const POLICIES: &str = r#"
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: model-hub, namespace: training}
spec:
  action: ALLOW
  rules:
  - to:
    - hosts: [huggingface.co, "*.hf.co"]
      ports: [443]
  - to:
    - ipBlocks: [192.0.2.0/24]
      ports: [8443]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: no-paste, namespace: training}
spec:
  action: DENY
  rules:
  - to: [{hosts: [paste.example, "*.paste.example"]}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: audit-s3, namespace: membrane-system}
spec:
  action: AUDIT
  rules:
  - to: [{hosts: [s3.example]}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: api, namespace: inference}
spec:
  rules:
  - from: [{serviceAccounts: [inference/model-server]}]
    to: [{hosts: [api.models.example], ports: ["443"], allowMissingSni: true}]
  budget: {sentBytes: 1Gi, per: 1h}
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata:
  name: try-deny-all
  namespace: training
  annotations: {membrane.dev/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{}]}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: only-principal, namespace: training}
spec:
  rules:
  - from: [{principals: ["cluster.local/ns/training/sa/other"]}]
    to: [{hosts: [internal.example]}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: any-port-any-dest, namespace: data}
spec:
  rules: [{to: [{ports: [53]}]}]
"#;

struct Case {
    name: &'static str,
    policies: &'static [&'static str],
    source: Source<'static>,
    ip: &'static str,
    port: u16,
    pinned: &'static [&'static str],
    sni: Option<&'static str>,
    tls: bool,
    verdict: EgressVerdict,
    reason: EgressReason,
    policy: Option<&'static str>,
    rule: Option<usize>,
}

const HF: &str = "198.51.100.10";

fn case(name: &'static str, policies: &'static [&'static str]) -> Case {
    Case {
        name,
        policies,
        source: TRAINER,
        ip: HF,
        port: 443,
        pinned: &[],
        sni: None,
        tls: false,
        verdict: EgressVerdict::Passthrough,
        reason: EgressReason::NoPolicy,
        policy: None,
        rule: None,
    }
}

fn allow(mut c: Case, policy: &'static str, rule: usize) -> Case {
    c.verdict = EgressVerdict::Allow;
    c.reason = EgressReason::Matched;
    c.policy = Some(policy);
    c.rule = Some(rule);
    c
}

fn deny(
    mut c: Case,
    reason: EgressReason,
    policy: Option<&'static str>,
    rule: Option<usize>,
) -> Case {
    c.verdict = EgressVerdict::Deny;
    c.reason = reason;
    c.policy = policy;
    c.rule = rule;
    c
}

fn tls(mut c: Case, pinned: &'static [&'static str], sni: Option<&'static str>) -> Case {
    c.pinned = pinned;
    c.sni = sni;
    c.tls = true;
    c
}

fn at(mut c: Case, ip: &'static str, port: u16, pinned: &'static [&'static str]) -> Case {
    c.ip = ip;
    c.port = port;
    c.pinned = pinned;
    c
}

fn from(mut c: Case, source: Source<'static>) -> Case {
    c.source = source;
    c
}

const HUB: &str = "training/model-hub";
const NO_PASTE: &str = "training/no-paste";
const API: &str = "inference/api";
use EgressReason::{Matched, NotAllowed, SniMismatch, SniMissing};

fn cases() -> Vec<Case> {
    let hub: &[&str] = &["model-hub"];
    let both: &[&str] = &["model-hub", "no-paste"];
    vec![
        case("no policy: passthrough", &[]),
        at(
            case("no policy, literal IP: passthrough", &[]),
            "203.0.113.9",
            80,
            &[],
        ),
        case(
            "only a DENY that does not match: passthrough",
            &["no-paste"],
        ),
        allow(
            tls(
                case("exact host, pinned, SNI equal", hub),
                &["huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        allow(
            tls(
                case("wildcard host, pinned, SNI equal", hub),
                &["cdn.hf.co"],
                Some("cdn.hf.co"),
            ),
            HUB,
            0,
        ),
        allow(
            tls(
                case("wildcard two labels deep", hub),
                &["a.b.hf.co"],
                Some("a.b.hf.co"),
            ),
            HUB,
            0,
        ),
        deny(
            tls(
                case("wildcard does not match its own suffix", hub),
                &["hf.co"],
                Some("hf.co"),
            ),
            NotAllowed,
            None,
            None,
        ),
        allow(
            tls(
                case(
                    "pinned exact, SNI matches the pattern of the same entry",
                    hub,
                ),
                &["cdn.hf.co"],
                Some("x.hf.co"),
            ),
            HUB,
            0,
        ),
        deny(
            tls(
                case("SNI lies about the name (shared address)", hub),
                &["huggingface.co"],
                Some("paste.example"),
            ),
            SniMismatch,
            None,
            None,
        ),
        deny(
            tls(
                case("no SNI on TLS where a host rule decides", hub),
                &["huggingface.co"],
                None,
            ),
            SniMissing,
            None,
            None,
        ),
        allow(
            case("not TLS: no SNI needed", hub).pinned_(&["huggingface.co"]),
            HUB,
            0,
        ),
        deny(
            at(
                case("literal IP never matches a host rule", hub),
                HF,
                443,
                &[],
            ),
            NotAllowed,
            None,
            None,
        ),
        deny(
            tls(
                at(
                    case("literal IP with a matching SNI still denied", hub),
                    HF,
                    443,
                    &[],
                ),
                &[],
                Some("huggingface.co"),
            ),
            NotAllowed,
            None,
            None,
        ),
        deny(
            at(case("wrong port", hub), HF, 80, &["huggingface.co"]),
            NotAllowed,
            None,
            None,
        ),
        allow(
            at(
                case("ipBlocks match the address", hub),
                "192.0.2.44",
                8443,
                &[],
            ),
            HUB,
            1,
        ),
        deny(
            at(
                case("ipBlocks on another port", hub),
                "192.0.2.44",
                443,
                &[],
            ),
            NotAllowed,
            None,
            None,
        ),
        deny(
            at(
                case("address outside ipBlocks", hub),
                "192.0.3.1",
                8443,
                &[],
            ),
            NotAllowed,
            None,
            None,
        ),
        allow(
            tls(
                case("one of several pins matches", hub),
                &["evil.example", "huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        deny(
            tls(
                at(
                    case("a denied name pinned at a shared address", hub),
                    HF,
                    443,
                    &["paste.example"],
                ),
                &["paste.example"],
                Some("paste.example"),
            ),
            Matched,
            Some(NO_PASTE),
            Some(0),
        )
        .with(both),
        deny(
            at(
                case("DENY over ALLOW", both),
                "198.51.100.20",
                443,
                &["paste.example"],
            ),
            Matched,
            Some(NO_PASTE),
            Some(0),
        ),
        deny(
            at(
                case("DENY by wildcard", both),
                "198.51.100.21",
                443,
                &["up.paste.example"],
            ),
            Matched,
            Some(NO_PASTE),
            Some(0),
        ),
        deny(
            tls(
                at(
                    case("DENY matches the SNI even without a pin", both),
                    "198.51.100.20",
                    443,
                    &[],
                ),
                &[],
                Some("paste.example"),
            ),
            Matched,
            Some(NO_PASTE),
            Some(0),
        ),
        allow(
            tls(
                case("DENY not matching leaves the ALLOW", both),
                &["huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        deny(
            at(
                case(
                    "DENY alone on a port-less rule matches any port",
                    &["no-paste"],
                ),
                "198.51.100.20",
                9999,
                &["paste.example"],
            ),
            Matched,
            Some(NO_PASTE),
            Some(0),
        ),
        at(
            case("DENY alone, other host: passthrough", &["no-paste"]),
            HF,
            443,
            &["huggingface.co"],
        ),
        at(
            case("AUDIT alone: passthrough, reported", &["audit-s3"]),
            "198.51.100.30",
            443,
            &["s3.example"],
        ),
        at(
            case("dry-run DENY: passthrough, reported", &["try-deny-all"]),
            HF,
            443,
            &[],
        ),
        allow(
            tls(
                case(
                    "dry-run DENY beside an ALLOW: allowed",
                    &["model-hub", "try-deny-all"],
                ),
                &["huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        allow(
            from(
                tls(
                    case("from serviceAccounts matches", &["api"]),
                    &["api.models.example"],
                    Some("api.models.example"),
                ),
                SERVER,
            ),
            API,
            0,
        ),
        allow(
            from(
                tls(
                    case("allowMissingSni", &["api"]),
                    &["api.models.example"],
                    None,
                ),
                SERVER,
            ),
            API,
            0,
        ),
        deny(
            from(
                tls(
                    case("allowMissingSni does not excuse a lying SNI", &["api"]),
                    &["api.models.example"],
                    Some("paste.example"),
                ),
                SERVER,
            ),
            SniMismatch,
            None,
            None,
        ),
        deny(
            tls(
                case("from serviceAccounts not matching: default deny", &["api"]),
                &["api.models.example"],
                Some("api.models.example"),
            ),
            NotAllowed,
            None,
            None,
        ),
        deny(
            at(
                case("from principals not matching", &["only-principal"]),
                HF,
                80,
                &["internal.example"],
            ),
            NotAllowed,
            None,
            None,
        ),
        allow(
            at(
                case("ports only, any destination", &["any-port-any-dest"]),
                "203.0.113.1",
                53,
                &[],
            ),
            "data/any-port-any-dest",
            0,
        ),
        deny(
            at(
                case("ports only, other port", &["any-port-any-dest"]),
                "203.0.113.1",
                80,
                &[],
            ),
            NotAllowed,
            None,
            None,
        ),
        deny(
            tls(
                at(
                    case("IPv6 literal never matches a host", hub),
                    "2001:db8:100::10",
                    443,
                    &[],
                ),
                &[],
                Some("huggingface.co"),
            ),
            NotAllowed,
            None,
            None,
        ),
        allow(
            tls(
                at(
                    case("IPv6 pinned address", hub),
                    "2001:db8:100::10",
                    443,
                    &["huggingface.co"],
                ),
                &["huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        deny(
            tls(
                case("SNI mismatch reported over not-allowed", hub),
                &["cdn.hf.co"],
                Some("evil.example"),
            ),
            SniMismatch,
            None,
            None,
        ),
        allow(
            tls(
                case("SNI case already lowered by the caller", hub),
                &["huggingface.co"],
                Some("huggingface.co"),
            ),
            HUB,
            0,
        ),
        deny(
            at(
                case("two ALLOWs, neither matching", &["model-hub", "api"]),
                "203.0.113.5",
                443,
                &["other.example"],
            ),
            NotAllowed,
            None,
            None,
        ),
        allow(
            from(
                tls(
                    case("two ALLOWs, the second matching", &["model-hub", "api"]),
                    &["api.models.example"],
                    Some("api.models.example"),
                ),
                SERVER,
            ),
            API,
            0,
        ),
    ]
}

trait CaseExt {
    fn pinned_(self, pinned: &'static [&'static str]) -> Self;
    fn with(self, policies: &'static [&'static str]) -> Self;
}

impl CaseExt for Case {
    fn pinned_(mut self, pinned: &'static [&'static str]) -> Self {
        self.pinned = pinned;
        self
    }
    fn with(mut self, policies: &'static [&'static str]) -> Self {
        self.policies = policies;
        self
    }
}

fn all() -> Vec<EgressPolicy> {
    parse_egress_policies(POLICIES).expect("the table's policies are valid")
}

#[test]
fn the_decision_table_holds() {
    let policies = all();
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for c in &cases {
        let selected: Vec<&EgressPolicy> = c
            .policies
            .iter()
            .map(|n| {
                policies
                    .iter()
                    .find(|p| p.name == *n)
                    .expect("policy in the table")
            })
            .collect();
        let req = EgressRequest {
            source: c.source,
            ip: c.ip.parse().expect("ip"),
            port: c.port,
            pinned: c.pinned,
            sni: c.sni,
            tls: c.tls,
            sni_unreadable: false,
        };
        let d = decide_egress(&selected, &req);
        assert_eq!(
            (d.verdict, d.reason, d.policy.as_deref(), d.rule),
            (c.verdict, c.reason, c.policy, c.rule),
            "case {:?}: {d:?}",
            c.name
        );
    }
}

#[test]
fn audit_and_dry_run_matches_are_reported_never_enforced() {
    let policies = all();
    let pick = |n: &str| policies.iter().find(|p| p.name == n).expect("policy");
    let req = EgressRequest {
        source: TRAINER,
        ip: "198.51.100.30".parse().expect("ip"),
        port: 443,
        pinned: &["s3.example"],
        sni: None,
        tls: false,
        sni_unreadable: false,
    };
    let d = decide_egress(&[pick("audit-s3"), pick("try-deny-all")], &req);
    assert_eq!(d.verdict, EgressVerdict::Passthrough);
    assert_eq!(d.audit, ["membrane-system/audit-s3"]);
    assert_eq!(d.dry_run, ["training/try-deny-all"]);
    // The deciding ALLOW carries its budget.
    let api = EgressRequest {
        source: SERVER,
        pinned: &["api.models.example"],
        ..req
    };
    let d = decide_egress(&[pick("api")], &api);
    let budget = d.budget.expect("budget");
    assert_eq!(budget.sent_bytes, Some(1 << 30));
    assert_eq!(budget.per.as_secs(), 3600);
}

#[test]
fn invalid_documents_are_refused_whole_with_field_paths() {
    let bad = r#"
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: broken, namespace: training}
spec:
  action: PERMIT
  rules:
  - from: [{}]
    to:
    - hosts: ["*", "ok.example", "exa mple", "*.a.*.b", "198.51.100.10"]
      ports: [0, "https"]
      ipBlocks: [10.0.0.0/33]
  budget: {sentBytes: 1Qi, per: 1y}
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: fine, namespace: training}
spec: {rules: [{to: [{hosts: [ok.example]}]}]}
"#;
    let errors = parse_egress_policies(bad).expect_err("refused");
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "spec.action",
        "spec.rules[0].from[0]",
        "spec.rules[0].to[0].hosts[0]",
        "spec.rules[0].to[0].hosts[2]",
        "spec.rules[0].to[0].hosts[3]",
        "spec.rules[0].to[0].hosts[4]",
        "spec.rules[0].to[0].ports[0]",
        "spec.rules[0].to[0].ports[1]",
        "spec.rules[0].to[0].ipBlocks[0]",
        "spec.budget.sentBytes",
        "spec.budget.per",
    ] {
        assert!(paths.contains(&want), "no error at {want}: {errors:#?}");
    }
    assert!(
        !paths.contains(&"spec.rules[0].to[0].hosts[1]"),
        "{paths:?}"
    );
    assert!(
        errors.iter().all(|e| e.policy == "training/broken"),
        "{errors:#?}"
    );
    // Unknown fields and a wrong group are refused too.
    let unknown = "apiVersion: security.membrane.dev/v1\nkind: EgressPolicy\nmetadata: {name: x}\nspec: {rulez: []}\n";
    let e = parse_egress_policies(unknown).expect_err("unknown field");
    assert!(e[0].path.contains("spec"), "{e:?}");
    let group =
        "apiVersion: security.istio.io/v1\nkind: EgressPolicy\nmetadata: {name: x}\nspec: {}\n";
    assert_eq!(
        parse_egress_policies(group).expect_err("group")[0].path,
        "apiVersion"
    );
    // Other kinds are skipped; garbage is an error, not a panic.
    assert!(
        parse_egress_policies("kind: Service\n")
            .expect("skipped")
            .is_empty()
    );
    assert!(parse_egress_policies("{{{{").is_err());
}

#[test]
fn hosts_quantities_and_windows_are_normalised() {
    assert_eq!(
        parse_host("HuggingFace.CO.").expect("host").to_string(),
        "huggingface.co"
    );
    assert_eq!(parse_host("*.HF.co").expect("host").to_string(), "*.hf.co");
    assert_eq!(
        parse_host("bücher.example").expect("idn").to_string(),
        "xn--bcher-kva.example"
    );
    assert!(parse_host("").is_err() && parse_host("*.").is_err() && parse_host("a..b").is_err());
    let q = |v: serde_json::Value| parse_quantity(&v);
    assert_eq!(q(serde_json::json!("1Gi")), Ok(1 << 30));
    assert_eq!(q(serde_json::json!("500M")), Ok(500_000_000));
    assert_eq!(q(serde_json::json!(1048576)), Ok(1 << 20));
    assert!(q(serde_json::json!("0")).is_err());
    assert!(q(serde_json::json!("99999999999Ti")).is_err());
    assert!(q(serde_json::json!(-5)).is_err());
    assert_eq!(parse_window("1h").expect("1h").as_secs(), 3600);
    assert_eq!(parse_window("30m").expect("30m").as_secs(), 1800);
    assert!(
        parse_window("0s").is_err() && parse_window("32d").is_err() && parse_window("h").is_err()
    );
}

#[test]
fn a_rule_through_a_gateway_says_so_and_only_allow_may_name_one() {
    let text = r#"
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: hub-via-gateway, namespace: training}
spec:
  rules:
  - to: [{hosts: [huggingface.co], ports: [443]}]
    via: {gateway: egress}
  - to: [{hosts: [cdn.hf.co], ports: [443]}]
    via: {gateway: shared-egress, namespace: membrane-system}
  - to: [{hosts: [s3.example], ports: [443]}]
"#;
    let policies = parse_egress_policies(text).expect("valid");
    let refs: Vec<&EgressPolicy> = policies.iter().collect();
    let source = Source {
        principal: "cluster.local/ns/training/sa/trainer",
        namespace: "training",
        service_account: "trainer",
    };
    let decide = |pinned: &'static [&'static str], sni: &'static str| {
        decide_egress(
            &refs,
            &EgressRequest {
                source,
                ip: "198.51.100.10".parse().expect("ip"),
                port: 443,
                pinned,
                sni: Some(sni),
                tls: true,
                sni_unreadable: false,
            },
        )
    };
    let d = decide(&["huggingface.co"], "huggingface.co");
    assert_eq!(d.verdict, EgressVerdict::Allow);
    assert_eq!(
        d.via.map(|g| g.to_string()).as_deref(),
        Some("training/egress"),
        "the policy's namespace by default"
    );
    let d = decide(&["cdn.hf.co"], "cdn.hf.co");
    assert_eq!(
        d.via.map(|g| g.to_string()).as_deref(),
        Some("membrane-system/shared-egress")
    );
    assert_eq!(decide(&["s3.example"], "s3.example").via, None);

    let bad = r#"
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: no-gateway-deny, namespace: training}
spec:
  action: DENY
  rules:
  - to: [{hosts: [paste.example]}]
    via: {gateway: egress}
  - to: [{hosts: [paste.example]}]
    via: {gateway: Bad_Name, namespace: "-x"}
"#;
    let errors = parse_egress_policies(bad).expect_err("refused");
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"spec.rules[0].via"), "{errors:?}");
    assert!(paths.contains(&"spec.rules[1].via.gateway"), "{errors:?}");
    assert!(paths.contains(&"spec.rules[1].via.namespace"), "{errors:?}");
    let unknown = bad.replace("namespace: \"-x\"", "port: 1");
    let errors = parse_egress_policies(&unknown).expect_err("refused");
    assert_eq!(errors[0].path, "spec.rules[1].via.port", "{errors:?}");
}
