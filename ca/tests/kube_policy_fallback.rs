//! An invalid AuthorizationPolicy edit in Kubernetes never widens access, driven through a
//! real `kube::Client` over the mocked API service (`kube_source/fake_api.rs`): the last valid
//! version stays enforced, a controller that never saw a valid version enforces a deny-all
//! stand-in for the object's scope, and fixing the object replaces the stand-in. Verdicts are
//! computed as a node computes them: each published policy goes through the discovery wire
//! form (`pb::Authorization`) and back, into the ztunnel's policy index.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use membrane_ca::source::ClusterState;
use membrane_ca::source::kube::{self as ksource, Fallback, PolicyVerdict};
use membrane_ca::status;
use membrane_policy::{DEFAULT_ROOT_NAMESPACE, PolicyIndex, Request, Source, Verdict, decide};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

#[path = "kube_source/fake_api.rs"]
#[allow(dead_code)]
mod fake_api;

use fake_api::{Setup, Source as Harness, start_source};

fn policy(generation: i64, spec: Value) -> Value {
    json!({"apiVersion": "security.membrane.dev/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "only-trainer", "namespace": "training", "uid": "uid-p",
                        "generation": generation},
           "spec": spec})
}

/// ALLOW only the trainer to reach `app: model`.
fn only_trainer() -> Value {
    json!({"selector": {"matchLabels": {"app": "model"}}, "action": "ALLOW",
           "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/training/sa/trainer"]}}]}]})
}

/// The same policy edited into something invalid (a wildcard in the middle of a principal).
fn broken() -> Value {
    json!({"selector": {"matchLabels": {"app": "model"}}, "action": "ALLOW",
           "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/*/sa/trainer"]}}]}]})
}

fn start(policies: Vec<Value>) -> Harness {
    let mut setup = Setup::default();
    setup.lists.insert(
        "namespaces",
        vec![json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "training", "labels": {"membrane.dev/mesh": "enabled"}}})],
    );
    setup.lists.insert("authorizationpolicies", policies);
    start_source(setup)
}

/// The verdict for `service_account` (namespace `training`) connecting to a workload labelled
/// `app: <app>` in `training`, under the policies of `state` as a node receives them.
fn verdict(state: &ClusterState, service_account: &str, app: &str) -> Verdict {
    let received = state.policies.values().map(|e| {
        let wire = membrane_proto::v1::Authorization::from(&e.policy);
        membrane_policy::Policy::try_from(wire).expect("a node accepts the streamed policy")
    });
    let index = PolicyIndex::build(received, DEFAULT_ROOT_NAMESPACE);
    let principal = format!("cluster.local/ns/training/sa/{service_account}");
    let labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let req = Request {
        source: Source::from_principal(&principal),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
        remote_ip: None,
        destination_namespace: "training",
        destination_labels: &labels,
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
        destination_port: 8080,
    };
    decide(&index, &req).verdict
}

async fn state_where(
    h: &mut Harness,
    what: &str,
    pred: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let found = tokio::time::timeout(WAIT, h.state.wait_for(|s| s.as_deref().is_some_and(&pred)))
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| s.clone()));
    match found {
        Some(Some(state)) => state,
        _ => panic!(
            "no published state where {what}; last: {:?}",
            h.state.borrow()
        ),
    }
}

async fn report_where(
    h: &mut Harness,
    pred: impl Fn(&ksource::PolicyReport) -> bool,
) -> ksource::PolicyReport {
    let key = (
        ksource::PolicyKind::Authorization,
        ("training".to_owned(), "only-trainer".to_owned()),
    );
    let reports = tokio::time::timeout(
        WAIT,
        h.reports
            .wait_for(|r| r.as_ref().and_then(|r| r.get(&key)).is_some_and(&pred)),
    )
    .await
    .expect("report in time")
    .expect("open")
    .clone()
    .expect("some");
    reports[&key].clone()
}

fn key() -> (String, String) {
    ("training".to_owned(), "only-trainer".to_owned())
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_last_valid_version_enforced() {
    let mut h = start(vec![policy(1, only_trainer())]);
    let state = state_where(&mut h, "policy enforced", |s| {
        s.policies.contains_key(&key())
    })
    .await;
    assert_eq!(verdict(&state, "trainer", "model"), Verdict::Allow);
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);

    // The attack: edit the ALLOW-only-trainer policy into an invalid object.
    h.api.events(
        "authorizationpolicies",
        vec![("MODIFIED", policy(2, broken()))],
    );
    let report = report_where(&mut h, |r| {
        matches!(r.verdict, PolicyVerdict::Invalid { .. })
    })
    .await;
    assert_eq!(report.generation, Some(2));
    let PolicyVerdict::Invalid { errors, fallback } = &report.verdict else {
        unreachable!()
    };
    assert!(
        errors[0]
            .path
            .starts_with("spec.rules[0].from[0].source.principals[0]"),
        "{errors:?}"
    );
    assert_eq!(
        *fallback,
        Fallback::LastValid {
            generation: Some(1)
        }
    );
    let conditions = status::desired_conditions(&report, "2026-01-01T00:00:00Z");
    assert_eq!(
        (conditions[0].type_.as_str(), conditions[0].status.as_str()),
        ("Accepted", "False")
    );
    assert!(
        conditions[0]
            .message
            .starts_with("spec.rules[0].from[0].source.principals[0]"),
        "{}",
        conditions[0].message
    );
    assert_eq!(conditions[1].reason, "LastValidVersion");
    assert!(conditions[1].message.contains("generation 1"));
    // The published state still holds the valid version: the non-trainer is still denied.
    let state = h.state.borrow().clone().expect("published");
    assert!(
        state.policies.contains_key(&key()),
        "the policy was dropped"
    );
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);
    assert_eq!(verdict(&state, "trainer", "model"), Verdict::Allow);
    assert_eq!(h.metrics.invalid_policies.get(), 1);
    assert_eq!(h.metrics.deny_all_stand_ins.get(), 0);

    // A further invalid edit still keeps the last valid version (not the previous invalid one).
    h.api.events(
        "authorizationpolicies",
        vec![("MODIFIED", policy(3, json!({"action": "NOPE"})))],
    );
    let report = report_where(&mut h, |r| r.generation == Some(3)).await;
    assert!(matches!(
        report.verdict,
        PolicyVerdict::Invalid {
            fallback: Fallback::LastValid {
                generation: Some(1)
            },
            ..
        }
    ));
    let state = h.state.borrow().clone().expect("published");
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);
}

#[tokio::test]
async fn a_controller_started_with_an_invalid_policy_denies_its_scope_until_fixed() {
    let mut h = start(vec![policy(5, broken())]);
    let state = state_where(&mut h, "stand-in enforced", |s| {
        s.policies.contains_key(&key())
    })
    .await;
    // No valid version was ever seen: everything the object selects is denied …
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);
    assert_eq!(verdict(&state, "trainer", "model"), Verdict::Deny);
    // … and only that: its selector was readable, other workloads are untouched.
    assert_eq!(verdict(&state, "intruder", "other"), Verdict::Allow);
    let report = report_where(&mut h, |r| {
        matches!(r.verdict, PolicyVerdict::Invalid { .. })
    })
    .await;
    assert!(matches!(
        report.verdict,
        PolicyVerdict::Invalid {
            fallback: Fallback::DenyAll { selector: true },
            ..
        }
    ));
    let conditions = status::desired_conditions(&report, "2026-01-01T00:00:00Z");
    assert_eq!(conditions[1].reason, "DenyAllStandIn");
    assert_eq!(h.metrics.deny_all_stand_ins.get(), 1);

    // Fixing the object replaces the stand-in.
    h.api.events(
        "authorizationpolicies",
        vec![("MODIFIED", policy(6, only_trainer()))],
    );
    let state = state_where(&mut h, "fixed policy enforced", |s| {
        verdict(s, "trainer", "model") == Verdict::Allow
    })
    .await;
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);
    report_where(&mut h, |r| {
        matches!(r.verdict, PolicyVerdict::Accepted { .. })
    })
    .await;
    assert_eq!(h.metrics.deny_all_stand_ins.get(), 0);
    assert_eq!(h.metrics.invalid_policies.get(), 0);
}

#[tokio::test]
async fn an_invalid_selector_widens_the_stand_in_to_the_whole_namespace() {
    let mut h = start(vec![policy(
        1,
        json!({"selector": {"matchLabels": {"app": 7}}, "rules": "nonsense"}),
    )]);
    let state = state_where(&mut h, "stand-in enforced", |s| {
        s.policies.contains_key(&key())
    })
    .await;
    assert_eq!(verdict(&state, "intruder", "model"), Verdict::Deny);
    assert_eq!(verdict(&state, "intruder", "other"), Verdict::Deny);
    let report = report_where(&mut h, |r| {
        matches!(r.verdict, PolicyVerdict::Invalid { .. })
    })
    .await;
    assert!(matches!(
        report.verdict,
        PolicyVerdict::Invalid {
            fallback: Fallback::DenyAll { selector: false },
            ..
        }
    ));
}
