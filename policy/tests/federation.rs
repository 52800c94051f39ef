//! One policy file in two federated clusters (DESIGN.md §11): the same documents, indexed for
//! trust domain A and for trust domain B, give the same verdict for the same fully qualified
//! source when they name sources by principal or by qualified namespace; unqualified
//! namespaces and service accounts name the local trust domain's only, so their verdicts
//! follow the cluster, by design.

use std::collections::BTreeMap;
use std::net::IpAddr;

use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_policy::{PolicyIndex, Request, Source, Verdict, decide, parse_policies};

const A: &str = "cluster-a.example";
const B: &str = "cluster-b.example";

const A_TRAINER: &str = "spiffe://cluster-a.example/ns/training/sa/trainer";
const B_TRAINER: &str = "spiffe://cluster-b.example/ns/training/sa/trainer";
const A_SYSTEM: &str = "spiffe://cluster-a.example/ns/kube-system/sa/agent";
const B_SYSTEM: &str = "spiffe://cluster-b.example/ns/kube-system/sa/agent";
/// A third trust domain that no policy names.
const C_TRAINER: &str = "spiffe://cluster-c.example/ns/training/sa/trainer";

const SOURCES: [&str; 5] = [A_TRAINER, B_TRAINER, A_SYSTEM, B_SYSTEM, C_TRAINER];

/// One policy in `inference` selecting the model server; `spec` in flow style.
fn document(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: p, namespace: inference}}\n\
         spec: {{selector: {{matchLabels: {{app: model}}}}, {spec}}}\n"
    )
}

fn index(spec: &str, trust_domain: &str) -> PolicyIndex {
    let checked = parse_policies(&document(spec)).unwrap_or_else(|e| panic!("{spec}: {e:?}"));
    let td = parse_trust_domain(trust_domain).expect("trust domain");
    let index = PolicyIndex::build_for(
        checked.into_iter().map(|c| c.policy),
        membrane_policy::DEFAULT_ROOT_NAMESPACE,
        &td,
    );
    assert_eq!(index.trust_domain(), trust_domain);
    index
}

fn verdict(index: &PolicyIndex, from: &str) -> Verdict {
    let labels: BTreeMap<String, String> = [("app".to_owned(), "model".to_owned())].into();
    let req = Request {
        source: Some(Source::from_principal(from).expect("principal")),
        source_ip: IpAddr::from([10, 0, 1, 5]),
        remote_ip: None,
        destination_namespace: "inference",
        destination_labels: &labels,
        destination_ip: IpAddr::from([10, 0, 2, 7]),
        destination_port: 8080,
    };
    decide(index, &req).verdict
}

/// The sources each spec admits (every other source of [`SOURCES`] is refused).
fn expect(spec: &str, admitted: &[&str], trust_domain: &str) {
    let index = index(spec, trust_domain);
    for from in SOURCES {
        let want = if admitted.contains(&from) {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        assert_eq!(
            verdict(&index, from),
            want,
            "{spec}\nevaluated in {trust_domain}, from {from}"
        );
    }
}

#[test]
fn qualified_policies_give_the_same_verdicts_in_both_trust_domains() {
    let cases: &[(&str, &[&str])] = &[
        // Principals carry their trust domain.
        (
            "rules: [{from: [{source: {principals: [cluster-b.example/ns/training/sa/trainer]}}]}]",
            &[B_TRAINER],
        ),
        (
            "rules: [{from: [{source: {principals: [\"spiffe://cluster-a.example/ns/training/sa/trainer\"]}}]}]",
            &[A_TRAINER],
        ),
        (
            "rules: [{from: [{source: {principals: [\"spiffe://cluster-b.example/*\"]}}]}]",
            &[B_TRAINER, B_SYSTEM],
        ),
        (
            "rules: [{from: [{source: {principals: [\"*/sa/trainer\"]}}]}]",
            &[A_TRAINER, B_TRAINER, C_TRAINER],
        ),
        (
            "rules: [{from: [{source: {notPrincipals: [\"cluster-b.example/*\"]}}]}]",
            &[A_TRAINER, A_SYSTEM, C_TRAINER],
        ),
        // Qualified namespaces.
        (
            "rules: [{from: [{source: {namespaces: [cluster-b.example/training]}}]}]",
            &[B_TRAINER],
        ),
        (
            "rules: [{from: [{source: {namespaces: [cluster-a.example/training, cluster-b.example/training]}}]}]",
            &[A_TRAINER, B_TRAINER],
        ),
        (
            "rules: [{from: [{source: {namespaces: [\"cluster-b.example/*\"]}}]}]",
            &[B_TRAINER, B_SYSTEM],
        ),
        (
            "rules: [{from: [{source: {namespaces: [\"cluster-b.example/kube-*\"]}}]}]",
            &[B_SYSTEM],
        ),
        (
            "rules: [{from: [{source: {namespaces: [\"*/training\"]}}]}]",
            &[A_TRAINER, B_TRAINER, C_TRAINER],
        ),
        (
            "rules: [{from: [{source: {notNamespaces: [\"*/kube-system\"]}}]}]",
            &[A_TRAINER, B_TRAINER, C_TRAINER],
        ),
        (
            "rules: [{from: [{source: {principals: [\"*\"], notNamespaces: [cluster-b.example/kube-system]}}]}]",
            &[A_TRAINER, B_TRAINER, A_SYSTEM, C_TRAINER],
        ),
        (
            "rules: [{when: [{key: source.namespace, values: [cluster-b.example/training]}]}]",
            &[B_TRAINER],
        ),
        (
            "rules: [{when: [{key: source.namespace, notValues: [\"cluster-a.example/*\"]}]}]",
            &[B_TRAINER, B_SYSTEM, C_TRAINER],
        ),
        // DENY: no ALLOW applies, so what the DENY does not match is allowed.
        (
            "action: DENY, rules: [{from: [{source: {namespaces: [cluster-b.example/kube-system]}}]}]",
            &[A_TRAINER, B_TRAINER, A_SYSTEM, C_TRAINER],
        ),
        (
            "action: DENY, rules: [{from: [{source: {notPrincipals: [\"cluster-a.example/*\", \"cluster-b.example/*\"]}}]}]",
            &[A_TRAINER, B_TRAINER, A_SYSTEM, B_SYSTEM],
        ),
    ];
    for (spec, admitted) in cases {
        expect(spec, admitted, A);
        expect(spec, admitted, B);
    }
}

#[test]
fn unqualified_names_mean_the_local_trust_domain() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        // (spec, admitted in A, admitted in B)
        (
            "rules: [{from: [{source: {namespaces: [training]}}]}]",
            &[A_TRAINER],
            &[B_TRAINER],
        ),
        // `*` alone is every namespace of the local trust domain, not of a federated one.
        (
            "rules: [{from: [{source: {namespaces: [\"*\"]}}]}]",
            &[A_TRAINER, A_SYSTEM],
            &[B_TRAINER, B_SYSTEM],
        ),
        (
            "rules: [{when: [{key: source.namespace, values: [kube-system]}]}]",
            &[A_SYSTEM],
            &[B_SYSTEM],
        ),
        (
            "rules: [{from: [{source: {serviceAccounts: [training/trainer]}}]}]",
            &[A_TRAINER],
            &[B_TRAINER],
        ),
        // The consequence for negation: a foreign kube-system is not the local kube-system,
        // so it is "not in" `notNamespaces: [kube-system]`, and this ALLOW admits it.
        (
            "rules: [{from: [{source: {notNamespaces: [kube-system]}}]}]",
            &[A_TRAINER, B_TRAINER, B_SYSTEM, C_TRAINER],
            &[A_TRAINER, B_TRAINER, A_SYSTEM, C_TRAINER],
        ),
        // ... and the same for service accounts.
        (
            "rules: [{from: [{source: {notServiceAccounts: [kube-system/agent]}}]}]",
            &[A_TRAINER, B_TRAINER, B_SYSTEM, C_TRAINER],
            &[A_TRAINER, B_TRAINER, A_SYSTEM, C_TRAINER],
        ),
        // A DENY on a negated local list denies every foreign source.
        (
            "action: DENY, rules: [{from: [{source: {notNamespaces: [kube-system]}}]}]",
            &[A_SYSTEM],
            &[B_SYSTEM],
        ),
        // Naming the local trust domain explicitly is the same as leaving it out.
        (
            "rules: [{from: [{source: {namespaces: [cluster-a.example/training]}}]}]",
            &[A_TRAINER],
            &[A_TRAINER],
        ),
    ];
    for (spec, in_a, in_b) in cases {
        expect(spec, in_a, A);
        expect(spec, in_b, B);
    }
}

#[test]
fn the_default_trust_domain_is_cluster_local() {
    let checked = parse_policies(&document(
        "rules: [{from: [{source: {namespaces: [training]}}]}]",
    ))
    .expect("valid");
    let index = PolicyIndex::build(
        checked.into_iter().map(|c| c.policy),
        membrane_policy::DEFAULT_ROOT_NAMESPACE,
    );
    assert_eq!(index.trust_domain(), "cluster.local");
    assert_eq!(
        verdict(&index, "spiffe://cluster.local/ns/training/sa/trainer"),
        Verdict::Allow
    );
    assert_eq!(verdict(&index, A_TRAINER), Verdict::Deny);
}

#[test]
fn malformed_qualified_namespaces_are_refused_with_their_path() {
    let text = document(
        "rules: [{from: [{source: {namespaces: [\"/training\", \"cluster-b.example/\", ok, \"Cluster-B.example/x\"], \
         notNamespaces: [\"a/b/c\", \"cluster-*/x\"]}}], \
         when: [{key: source.namespace, notValues: [\"cluster-b.example/Bad\"]}]}]",
    );
    let errors = parse_policies(&text).expect_err("malformed");
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.rules[0].from[0].source.namespaces[0]",
            "spec.rules[0].from[0].source.namespaces[1]",
            "spec.rules[0].from[0].source.namespaces[3]",
            "spec.rules[0].from[0].source.notNamespaces[0]",
            "spec.rules[0].from[0].source.notNamespaces[1]",
            "spec.rules[0].when[0].notValues[0]",
        ],
        "{errors:?}"
    );
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(text[0].contains("trust domain is empty"), "{}", text[0]);
    assert!(text[1].contains("namespace is empty"), "{}", text[1]);
    assert!(text[2].contains("lower case"), "{}", text[2]);
    assert!(
        text[3].contains("<trust-domain>/<namespace>"),
        "{}",
        text[3]
    );
}

/// A federated source relayed by an east-west gateway has no address the destination can
/// know (`UNKNOWN_SOURCE_IP`): address conditions fail closed — an ALLOW that needs an
/// address (listed or excluded) never admits it, a DENY that names addresses always refuses
/// it — and policies that name identities only decide as usual.
#[test]
fn an_unknown_source_address_fails_address_conditions_closed() {
    let labels: BTreeMap<String, String> = [("app".to_owned(), "model".to_owned())].into();
    let decide_from = |spec: &str, source_ip: IpAddr| {
        let index = index(spec, B);
        let req = Request {
            source: Some(Source::from_principal(A_TRAINER).expect("principal")),
            source_ip,
            remote_ip: None,
            destination_namespace: "inference",
            destination_labels: &labels,
            destination_ip: IpAddr::from([10, 0, 2, 7]),
            destination_port: 8080,
        };
        decide(&index, &req).verdict
    };
    let unknown = membrane_policy::UNKNOWN_SOURCE_IP;
    let known = IpAddr::from([10, 0, 1, 5]);
    let cases = [
        // (spec, verdict for a known 10.0.1.5, verdict for an unknown address)
        (
            "action: ALLOW, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]",
            Verdict::Allow,
            Verdict::Deny,
        ),
        (
            "action: ALLOW, rules: [{from: [{source: {notIpBlocks: [192.168.0.0/16]}}]}]",
            Verdict::Allow,
            Verdict::Deny,
        ),
        (
            "action: ALLOW, rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]",
            Verdict::Allow,
            Verdict::Deny,
        ),
        (
            "action: DENY, rules: [{from: [{source: {ipBlocks: [192.168.0.0/16]}}]}]",
            Verdict::Allow,
            Verdict::Deny,
        ),
        (
            "action: ALLOW, rules: [{from: [{source: {principals: [\"cluster-a.example/ns/training/sa/trainer\"]}}]}]",
            Verdict::Allow,
            Verdict::Allow,
        ),
    ];
    for (spec, with_known, with_unknown) in cases {
        assert_eq!(decide_from(spec, known), with_known, "{spec} (known)");
        assert_eq!(decide_from(spec, unknown), with_unknown, "{spec} (unknown)");
    }
}
