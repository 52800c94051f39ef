//! Tests of `decide` details: sources from principals and identities (and their trust
//! domain), names, and the spill path of many selectors.

use super::*;
use crate::policy::Rule;

#[test]
fn source_from_principal() {
    let s = Source::from_principal("spiffe://cluster.local/ns/a/sa/b").expect("valid");
    assert_eq!(
        (s.principal, s.namespace, s.service_account),
        ("cluster.local/ns/a/sa/b", "a", "b")
    );
    assert_eq!(
        Source::from_principal("td/ns/x/sa/y").map(|s| s.namespace),
        Some("x")
    );
    for bad in [
        "",
        "td/ns/x",
        "td/ns//sa/y",
        "td/ns/x/sa/y/z",
        "td/sa/x/ns/y",
        "/ns/x/sa/y",
    ] {
        assert_eq!(Source::from_principal(bad), None, "{bad}");
    }
}

#[test]
fn names() {
    assert_eq!(Verdict::Deny.to_string(), "DENY");
    assert_eq!(
        DecisionReason::NoAllowMatched.to_string(),
        "no_allow_matched"
    );
    assert_eq!(DecisionReason::DeniedBy.as_str(), "denied_by_policy");
    assert_eq!(DecisionReason::AllowedBy.as_str(), "allowed_by_policy");
}

/// More selector groups apply than `Parts` holds inline: the spill path gives the same
/// answer.
#[test]
fn many_selectors_select_one_workload() {
    let keys = ["a", "b", "c", "d", "e"];
    let labels: BTreeMap<String, String> = keys.iter().map(|k| ((*k).into(), "1".into())).collect();
    // Every non-empty subset of the labels is a distinct selector: 31 groups.
    let mut policies = Vec::new();
    for mask in 1u32..32 {
        let selector = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, k)| ((*k).into(), "1".into()))
            .collect();
        let action = match mask {
            31 => Action::Deny,
            7 => Action::Audit,
            _ => Action::Allow,
        };
        policies.push(Policy {
            id: PolicyRef::new("ns", &format!("p{mask:02}")),
            selector,
            action,
            rules: vec![Rule::default()],
            dry_run: mask == 3,
        });
    }
    let index = PolicyIndex::build(policies, "membrane-system");
    assert_eq!(index.policies_for("ns", &labels).count(), 31);
    let req = Request {
        source: None,
        source_ip: IpAddr::from([10, 0, 0, 1]),
        remote_ip: None,
        destination_namespace: "ns",
        destination_labels: &labels,
        destination_ip: IpAddr::from([10, 0, 0, 2]),
        destination_port: 80,
    };
    let d = decide(&index, &req);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.policy.map(|p| p.to_string()).as_deref(), Some("ns/p31"));
    assert_eq!(d.audit.len(), 1);
    assert_eq!(d.dry_run.len(), 1);
    assert!(d.dry_run[0].would_match);
    assert_eq!(d.dry_run[0].action, Action::Allow);
}

#[test]
fn a_verified_identity_is_the_source_its_principal_names() {
    let identity: membrane_identity::WorkloadIdentity =
        "spiffe://cluster.local/ns/training/sa/trainer"
            .parse()
            .expect("identity");
    let mut principal = String::from("left over");
    let source = Source::from_identity(&identity, &mut principal);
    assert_eq!(
        source,
        Source {
            principal: "cluster.local/ns/training/sa/trainer",
            namespace: "training",
            service_account: "trainer",
        }
    );
    assert_eq!(
        Source::from_principal("spiffe://cluster.local/ns/training/sa/trainer"),
        Some(source)
    );
}

#[test]
fn a_source_knows_its_trust_domain() {
    let s = Source::from_principal("spiffe://cluster-b.example/ns/a/sa/b").expect("valid");
    assert_eq!(s.trust_domain(), "cluster-b.example");
    let bare = Source {
        principal: "no-slash",
        namespace: "a",
        service_account: "b",
    };
    assert_eq!(bare.trust_domain(), "no-slash");
}
