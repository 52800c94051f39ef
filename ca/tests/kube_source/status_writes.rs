//! Policy status written back to the API server: valid accepted, invalid refused with the
//! reason, written once, and only by the lease holder (an abandoned lease is taken over).

use super::*;

#[tokio::test]
async fn status_accepts_valid_refuses_invalid_and_writes_once() {
    let mut setup = base_setup();
    setup.lists.insert(
        "authorizationpolicies",
        vec![
            policy("training", "good", 1, json!({"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]})),
            policy("training", "bad", 4, json!({"rules": [{"to": [{"operation": {"ports": ["99999"]}}]}]})),
        ],
    );
    let mut src = start_source(setup);
    let metrics = start_status(&src, status_config(15_000));
    // The Lease is created first (none existed).
    let lease = src
        .api
        .next_seen(|s| s.path.contains("/leases") && s.method == "POST")
        .await;
    assert_eq!(lease.body["spec"]["holderIdentity"], "replica-a");
    let mut patches = HashMap::new();
    for _ in 0..2 {
        let p = src.api.next_seen(is_patch).await;
        patches.insert(p.path.clone(), p);
    }
    let good = &patches["/apis/security.membrane.dev/v1/namespaces/training/authorizationpolicies/good/status"];
    let accepted = condition(good, "Accepted").expect("Accepted");
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("True"), Some("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], 1);
    let warning = condition(good, "Warning").expect("L7 warning");
    assert!(
        warning["message"]
            .as_str()
            .unwrap_or_default()
            .contains("methods"),
        "{warning}"
    );
    let bad = &patches["/apis/security.membrane.dev/v1/namespaces/training/authorizationpolicies/bad/status"];
    let refused = condition(bad, "Accepted").expect("Accepted");
    assert_eq!(
        (refused["status"].as_str(), refused["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
    assert_eq!(refused["observedGeneration"], 4);
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("spec.rules[0].to[0].operation.ports[0]: "),
        "{message}"
    );
    assert!(condition(bad, "Warning").is_none());
    // The watch now delivers the objects with the status written, and an unrelated change:
    // nothing to write again.
    let mut good_obj = policy(
        "training",
        "good",
        1,
        json!({"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}),
    );
    good_obj["status"] = good.body["status"].clone();
    let mut relabelled = good_obj.clone();
    relabelled["metadata"]["labels"] = json!({"team": "ml"});
    src.api.events(
        "authorizationpolicies",
        vec![("MODIFIED", good_obj), ("MODIFIED", relabelled)],
    );
    let again = src
        .api
        .seen_within(Duration::from_millis(800), is_patch)
        .await;
    assert!(
        again.is_empty(),
        "status written again without a change: {again:?}"
    );
    let ok = metrics
        .writes
        .get_or_create(&membrane_ca::metrics::OutcomeLabels { outcome: "ok" })
        .get();
    assert_eq!(ok, 2);
    assert_eq!(metrics.leader.get(), 1);
    // A new generation that fixes "bad" is written once more.
    src.api.events(
        "authorizationpolicies",
        vec![(
            "MODIFIED",
            policy(
                "training",
                "bad",
                5,
                json!({"rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}),
            ),
        )],
    );
    let fixed = src.api.next_seen(is_patch).await;
    assert!(fixed.path.ends_with("/bad/status"));
    let accepted = condition(&fixed, "Accepted").expect("Accepted");
    assert_eq!(
        (
            accepted["status"].as_str(),
            accepted["observedGeneration"].as_i64()
        ),
        (Some("True"), Some(5))
    );
}

fn lease_held_by(holder: &str, seconds: i64) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "membrane-ca-status", "namespace": "membrane-system",
                        "resourceVersion": "5"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds,
                    "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 3}})
}

#[tokio::test]
async fn status_is_written_only_by_the_lease_holder() {
    let mut setup = base_setup();
    setup.lists.insert(
        "authorizationpolicies",
        vec![policy("training", "p", 1, json!({}))],
    );
    // Held by a live replica (from our point of view it never expires during the test).
    setup.lease = Some(lease_held_by("replica-b", 3600));
    let mut src = start_source(setup);
    let metrics = start_status(&src, status_config(15_000));
    let seen = src
        .api
        .seen_within(Duration::from_secs(1), |s| is_patch(s) || s.method == "PUT")
        .await;
    assert!(seen.is_empty(), "wrote without the Lease: {seen:?}");
    assert_eq!(metrics.leader.get(), 0);
}

#[tokio::test]
async fn an_abandoned_lease_is_taken_over_then_status_is_written() {
    let mut setup = base_setup();
    setup.lists.insert(
        "authorizationpolicies",
        vec![policy("training", "p", 1, json!({}))],
    );
    // Held by a replica that stopped renewing; its duration is 1 s.
    setup.lease = Some(lease_held_by("replica-b", 1));
    let mut src = start_source(setup);
    let started = tokio::time::Instant::now();
    start_status(&src, status_config(15_000));
    let put = src
        .api
        .next_seen(|s| s.method == "PUT" && s.path.contains("/leases"))
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "took a live lease"
    );
    assert_eq!(put.body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
    assert_eq!(
        put.body["metadata"]["resourceVersion"], "5",
        "optimistic update"
    );
    let patch = src.api.next_seen(is_patch).await;
    assert_eq!(
        condition(&patch, "Accepted").expect("Accepted")["status"],
        "True"
    );
}
