//! The Kubernetes source, policy status write-back and TokenReview node authentication,
//! driven through a real `kube::Client` over a mocked API service (`tower_test::mock::pair`).
//!
//! [`FakeApi`] (in `kube_source/fake_api.rs`) answers like an API server and records every
//! non-watch request for the tests to inspect. Each test is bounded by timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use membrane_ca::metrics::{ResourceLabels, StatusMetrics, TokenReviewMetrics};
use membrane_ca::source::ClusterState;
use membrane_ca::source::kube::{PolicyKind, PolicyVerdict};
use membrane_ca::status::{self, StatusConfig};
use membrane_ca::tokenreview::{
    Caller, NodeAuthFailure, NodeAuthenticator, TokenReviewConfig, TokenReviewError, TokenReviewer,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

#[path = "kube_source/fake_api.rs"]
mod fake_api;

use fake_api::{FakeApi, Seen, Setup, Source, api_status, start_source};

fn namespace(name: &str, mesh: bool) -> Value {
    let labels = if mesh {
        json!({"membrane.dev/mesh": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node, "serviceAccountName": "trainer", "containers": [{"name": "c"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(ns: &str, name: &str, generation: i64, spec: Value) -> Value {
    json!({"apiVersion": "security.membrane.dev/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                        "generation": generation},
           "spec": spec})
}

fn slice(ns: &str, name: &str, service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                         "targetRef": {"kind": "Pod", "name": format!("pod-{ip}")}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

/// Waits for a published state satisfying `pred`.
async fn state_where(
    rx: &mut watch::Receiver<Option<Arc<ClusterState>>>,
    what: &str,
    pred: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let found = tokio::time::timeout(WAIT, rx.wait_for(|s| s.as_deref().is_some_and(&pred)))
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| s.clone()));
    match found {
        Some(Some(state)) => state,
        _ => panic!("no published state where {what}; last: {:?}", rx.borrow()),
    }
}

fn base_setup() -> Setup {
    let mut setup = Setup::default();
    setup
        .lists
        .insert("namespaces", vec![namespace("training", true)]);
    setup.lists.insert(
        "pods",
        vec![pod("training", "trainer-0", "node-a", "10.0.0.5")],
    );
    setup
}

fn mesh_pods(state: &ClusterState, node: &str) -> Vec<String> {
    state.mesh_pods_on(node).map(|p| p.name.clone()).collect()
}

#[tokio::test]
async fn nothing_is_published_until_every_resource_is_listed() {
    let mut setup = base_setup();
    setup.held.push("authorizationpolicies");
    let mut src = start_source(setup);
    let early = tokio::time::timeout(Duration::from_millis(500), src.state.changed()).await;
    assert!(early.is_err(), "published before the policies were listed");
    assert!(src.state.borrow().is_none());
    src.api.release_list("authorizationpolicies");
    let state = state_where(&mut src.state, "synced", |_| true).await;
    assert_eq!(mesh_pods(&state, "node-a"), ["trainer-0"]);
    assert_eq!(src.metrics.reloads.get(), 1);
}

#[tokio::test]
async fn namespace_label_moves_its_pods_in_and_out_of_the_mesh() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "trainer-0 in the mesh", |s| {
        mesh_pods(s, "node-a") == ["trainer-0"]
    })
    .await;
    src.api.events(
        "namespaces",
        vec![("MODIFIED", namespace("training", false))],
    );
    let state = state_where(&mut src.state, "label removed", |s| {
        s.namespaces
            .get("training")
            .is_some_and(|n| !n.mesh_enabled())
    })
    .await;
    assert!(mesh_pods(&state, "node-a").is_empty());
    assert_eq!(
        state.pods.len(),
        1,
        "the pod is still known, only not enrolled"
    );
    src.api.events(
        "namespaces",
        vec![("MODIFIED", namespace("training", true))],
    );
    state_where(&mut src.state, "label back", |s| {
        mesh_pods(s, "node-a") == ["trainer-0"]
    })
    .await;
}

#[tokio::test]
async fn pod_added_moved_and_deleted() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let moved = pod("training", "worker-1", "node-a", "10.0.0.6");
    src.api.events("pods", vec![("ADDED", moved.clone())]);
    state_where(&mut src.state, "worker-1 on node-a", |s| {
        mesh_pods(s, "node-a").contains(&"worker-1".to_owned())
    })
    .await;
    let mut on_b = pod("training", "worker-1", "node-b", "10.0.1.6");
    src.api.events("pods", vec![("MODIFIED", on_b.clone())]);
    let state = state_where(&mut src.state, "worker-1 on node-b", |s| {
        mesh_pods(s, "node-b") == ["worker-1"]
    })
    .await;
    assert_eq!(mesh_pods(&state, "node-a"), ["trainer-0"]);
    let worker = &state.pods[&("training".to_owned(), "worker-1".to_owned())];
    assert_eq!(
        worker.ips,
        ["10.0.1.6".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(worker.uid, "uid-worker-1");
    assert_eq!(worker.service_account, "trainer");
    on_b["status"]["phase"] = json!("Succeeded");
    src.api.events("pods", vec![("DELETED", on_b)]);
    state_where(&mut src.state, "worker-1 gone", |s| {
        !s.pods
            .contains_key(&("training".to_owned(), "worker-1".to_owned()))
    })
    .await;
}

#[tokio::test]
async fn endpoint_slices_become_service_endpoints() {
    let mut setup = base_setup();
    setup.lists.insert(
        "services",
        vec![json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "feature-store", "namespace": "training"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}})],
    );
    setup.lists.insert(
        "endpointslices",
        vec![slice(
            "training",
            "feature-store-abc",
            "feature-store",
            &["10.0.0.7"],
        )],
    );
    let mut src = start_source(setup);
    let key = ("training".to_owned(), "feature-store".to_owned());
    let state = state_where(&mut src.state, "service listed", |s| {
        s.services.contains_key(&key)
    })
    .await;
    let svc = &state.services[&key];
    assert_eq!(
        svc.vips,
        ["10.96.0.20".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(svc.ports.len(), 1, "UDP port dropped");
    assert_eq!((svc.ports[0].port, svc.ports[0].target_port), (80, 0));
    assert_eq!(svc.endpoints.len(), 1);
    assert_eq!(svc.endpoints[0].pod.as_deref(), Some("pod-10.0.0.7"));
    assert_eq!(svc.endpoints[0].ports.get("http"), Some(&8080));
    src.api.events(
        "endpointslices",
        vec![(
            "ADDED",
            slice(
                "training",
                "feature-store-def",
                "feature-store",
                &["10.0.0.8", "10.0.0.9"],
            ),
        )],
    );
    state_where(&mut src.state, "three endpoints", |s| {
        s.services[&key].endpoints.len() == 3
    })
    .await;
    src.api.events(
        "endpointslices",
        vec![(
            "DELETED",
            slice(
                "training",
                "feature-store-abc",
                "feature-store",
                &["10.0.0.7"],
            ),
        )],
    );
    let state = state_where(&mut src.state, "slice removed", |s| {
        s.services[&key].endpoints.len() == 2
    })
    .await;
    let ips: Vec<String> = state.services[&key]
        .endpoints
        .iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(ips, ["10.0.0.8", "10.0.0.9"]);
}

#[tokio::test]
async fn policy_created_updated_and_deleted() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let key = ("training".to_owned(), "deny-evil".to_owned());
    let rkey = (PolicyKind::Authorization, key.clone());
    let spec =
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]});
    src.api.events(
        "authorizationpolicies",
        vec![("ADDED", policy("training", "deny-evil", 1, spec))],
    );
    let state = state_where(&mut src.state, "policy enforced", |s| {
        s.policies.contains_key(&key)
    })
    .await;
    assert_eq!(state.policies[&key].policy.name(), "deny-evil");
    // An update that breaks it: reported as invalid, the last valid version stays enforced.
    let broken = json!({"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]});
    src.api.events(
        "authorizationpolicies",
        vec![(
            "MODIFIED",
            policy("training", "deny-evil", 2, broken.clone()),
        )],
    );
    let reports = tokio::time::timeout(
        WAIT,
        src.reports.wait_for(|r| {
            r.as_ref().is_some_and(|r| {
                r.get(&rkey)
                    .is_some_and(|p| matches!(p.verdict, PolicyVerdict::Invalid { .. }))
            })
        }),
    )
    .await
    .expect("report in time")
    .expect("open")
    .clone()
    .expect("some");
    assert_eq!(reports[&rkey].generation, Some(2));
    assert_eq!(src.metrics.invalid_policies.get(), 1);
    let kept = src.state.borrow().clone().expect("published");
    assert_eq!(kept.policies[&key].policy.name(), "deny-evil");
    // Fixed again, then deleted.
    let fixed =
        json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}]}]});
    src.api.events(
        "authorizationpolicies",
        vec![(
            "MODIFIED",
            policy("training", "deny-evil", 3, fixed.clone()),
        )],
    );
    state_where(&mut src.state, "policy back", |s| {
        s.policies.contains_key(&key)
    })
    .await;
    src.api.events(
        "authorizationpolicies",
        vec![("DELETED", policy("training", "deny-evil", 3, fixed))],
    );
    state_where(&mut src.state, "policy deleted", |s| s.policies.is_empty()).await;
}

#[tokio::test]
async fn a_burst_of_pod_events_gives_a_handful_of_snapshots() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let before = src.metrics.reloads.get();
    let events: Vec<_> = (0..1000)
        .map(|i| {
            let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
            (
                "ADDED",
                pod("training", &format!("burst-{i}"), "node-c", &ip),
            )
        })
        .collect();
    src.api.events("pods", events);
    let state = state_where(&mut src.state, "all 1000 pods", |s| {
        s.mesh_pods_on("node-c").count() == 1000
    })
    .await;
    assert_eq!(state.pods.len(), 1001);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snapshots = src.metrics.reloads.get() - before;
    eprintln!("1,000 pod events: {snapshots} snapshots");
    assert!(
        (1..=5).contains(&snapshots),
        "1,000 events gave {snapshots} snapshots"
    );
    // A steady trickle (20 reads, 20 ms apart) is rate-limited to one snapshot per 100 ms.
    let before = src.metrics.reloads.get();
    let started = tokio::time::Instant::now();
    for batch in 0..20 {
        let events = (0..10)
            .map(|i| {
                let n = batch * 10 + i;
                let ip = format!("10.2.{}.{}", n / 250, n % 250 + 1);
                (
                    "ADDED",
                    pod("training", &format!("trickle-{n}"), "node-d", &ip),
                )
            })
            .collect();
        src.api.events("pods", events);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state_where(&mut src.state, "all 200 trickled pods", |s| {
        s.mesh_pods_on("node-d").count() == 200
    })
    .await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snapshots = src.metrics.reloads.get() - before;
    let allowed = u64::try_from(elapsed.as_millis() / 100).unwrap_or(u64::MAX) + 2;
    eprintln!("20 reads over {elapsed:?}: {snapshots} snapshots (at most {allowed})");
    assert!(
        (1..=allowed).contains(&snapshots) && snapshots < 20,
        "20 reads over {elapsed:?} gave {snapshots} snapshots"
    );
}

#[tokio::test]
async fn watch_errors_are_counted_and_the_last_state_stays() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let errors = || {
        src.metrics
            .watch_errors
            .get_or_create(&ResourceLabels { resource: "pods" })
            .get()
    };
    assert_eq!(errors(), 0);
    src.api
        .events("pods", vec![("ERROR", api_status(500, "InternalError"))]);
    tokio::time::timeout(WAIT, async {
        while errors() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("error counted");
    let state = src.state.borrow().clone().expect("state kept");
    assert_eq!(mesh_pods(&state, "node-a"), ["trainer-0"]);
    // The watch resumes after its backoff.
    src.api.events(
        "pods",
        vec![("ADDED", pod("training", "late", "node-a", "10.0.0.9"))],
    );
    state_where(&mut src.state, "event after the error", |s| {
        s.pods.len() == 2
    })
    .await;
}

fn status_config(lease_ms: u64) -> StatusConfig {
    let mut config = StatusConfig::new("membrane-system");
    config.identity = "replica-a".into();
    config.lease_duration = Duration::from_millis(lease_ms);
    config.renew_period = Duration::from_millis(200);
    config.retry_period = Duration::from_millis(100);
    config
}

fn start_status(src: &Source, config: StatusConfig) -> StatusMetrics {
    let metrics = StatusMetrics::default();
    tokio::spawn(status::run(
        src.client.clone(),
        config,
        src.reports.clone(),
        metrics.clone(),
        src.cancel.clone(),
    ));
    metrics
}

fn is_patch(s: &Seen) -> bool {
    s.method == "PATCH" && s.path.ends_with("/status")
}

fn condition<'a>(patch: &'a Seen, type_: &str) -> Option<&'a Value> {
    patch.body["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

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

fn review_ok(username: &str, node: Option<&str>) -> Value {
    let extra = match node {
        Some(node) => json!({"authentication.kubernetes.io/node-name": [node],
                             "authentication.kubernetes.io/pod-name": ["ztunnel-x"]}),
        None => json!({}),
    };
    json!({"authenticated": true, "audiences": ["membrane-ca"],
           "user": {"username": username, "extra": extra}})
}

fn reviewer_setup() -> Setup {
    let mut setup = Setup::default();
    let ztunnel = "system:serviceaccount:membrane-system:ztunnel";
    setup
        .reviews
        .insert("good".into(), review_ok(ztunnel, Some("node-a")));
    setup.reviews.insert(
        "wrong-sa".into(),
        review_ok("system:serviceaccount:training:trainer", Some("node-a")),
    );
    setup
        .reviews
        .insert("unbound".into(), review_ok(ztunnel, None));
    setup.reviews.insert(
        "gateway".into(),
        review_ok(
            "system:serviceaccount:membrane-system:membrane-egress-gateway",
            Some("node-b"),
        ),
    );
    let mut other_audience = review_ok(ztunnel, Some("node-a"));
    other_audience["audiences"] = json!(["https://kubernetes.default.svc"]);
    setup
        .reviews
        .insert("other-audience".into(), other_audience);
    setup
}

fn bearer(token: &str) -> tonic::metadata::MetadataMap {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    md
}

#[tokio::test]
async fn tokenreview_accepts_a_bound_ztunnel_token_and_caches_it() {
    let (client, mut api) = FakeApi::start(reviewer_setup());
    let metrics = TokenReviewMetrics::default();
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        TokenReviewConfig::default(),
        metrics.clone(),
    ));
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good")))
        .await
        .expect("in time");
    assert_eq!(node, Ok(Caller::node("node-a")));
    let review = api.next_seen(|s| s.path.ends_with("/tokenreviews")).await;
    assert_eq!(review.method, "POST");
    assert_eq!(review.body["spec"]["token"], "good");
    assert_eq!(review.body["spec"]["audiences"], json!(["membrane-ca"]));
    // Served from the cache: no second review.
    let node = auth.authenticate(&bearer("good")).await;
    assert_eq!(node, Ok(Caller::node("node-a")));
    let more = api
        .seen_within(Duration::from_millis(200), |s| {
            s.path.ends_with("/tokenreviews")
        })
        .await;
    assert!(more.is_empty(), "a cached token was reviewed again");
    let count = |outcome| {
        metrics
            .results
            .get_or_create(&membrane_ca::metrics::OutcomeLabels { outcome })
            .get()
    };
    assert_eq!((count("authenticated"), count("cached")), (1, 1));
}

#[tokio::test]
async fn a_gateway_accounts_token_names_its_node_and_only_its_own_identity() {
    let (client, _api) = FakeApi::start(reviewer_setup());
    let config = TokenReviewConfig {
        gateway_accounts: vec![(
            "membrane-system".to_owned(),
            "membrane-egress-gateway".to_owned(),
        )],
        ..TokenReviewConfig::default()
    };
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        config,
        TokenReviewMetrics::default(),
    ));
    let caller = tokio::time::timeout(WAIT, auth.authenticate(&bearer("gateway")))
        .await
        .expect("in time")
        .expect("accepted");
    assert_eq!(
        caller,
        Caller {
            node: "node-b".to_owned(),
            gateway: Some((
                "membrane-system".to_owned(),
                "membrane-egress-gateway".to_owned()
            )),
        }
    );
    // The ztunnel account is still a node.
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good")))
        .await
        .expect("in time");
    assert_eq!(node, Ok(Caller::node("node-a")));
}

#[tokio::test]
async fn tokenreview_refusals_are_typed() {
    let (client, _api) = FakeApi::start(reviewer_setup());
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        TokenReviewConfig::default(),
        TokenReviewMetrics::default(),
    ));
    let check = |token: &'static str| {
        let auth = auth.clone();
        async move {
            tokio::time::timeout(WAIT, auth.authenticate(&bearer(token)))
                .await
                .expect("in time")
        }
    };
    // A gateway account's token is refused unless the account is configured as one.
    assert!(matches!(
        check("gateway").await,
        Err(NodeAuthFailure::TokenReview(
            TokenReviewError::WrongAccount { .. }
        ))
    ));
    let refused = check("forged").await;
    assert!(
        matches!(&refused, Err(NodeAuthFailure::TokenReview(TokenReviewError::Unauthenticated(m))) if m.contains("invalid bearer token")),
        "{refused:?}"
    );
    assert_eq!(
        refused.expect_err("refused").status().code(),
        tonic::Code::Unauthenticated
    );
    assert!(matches!(
        check("wrong-sa").await,
        Err(NodeAuthFailure::TokenReview(TokenReviewError::WrongAccount { username })) if username == "system:serviceaccount:training:trainer"
    ));
    assert!(matches!(
        check("unbound").await,
        Err(NodeAuthFailure::TokenReview(
            TokenReviewError::NoNodeBinding { .. }
        ))
    ));
    assert!(matches!(
        check("other-audience").await,
        Err(NodeAuthFailure::TokenReview(TokenReviewError::Unauthenticated(m))) if m.contains("audience")
    ));
    let down = check("fail").await.expect_err("API error");
    assert!(matches!(
        down,
        NodeAuthFailure::TokenReview(TokenReviewError::Unavailable(_))
    ));
    assert_eq!(down.status().code(), tonic::Code::Unavailable);
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", "Basic abc".parse().expect("ascii"));
    assert!(matches!(
        auth.authenticate(&md).await,
        Err(NodeAuthFailure::Credential(_))
    ));
}

/// The whole controller in Kubernetes mode: state from the (fake) API, nodes authenticated by
/// TokenReview, certificates issued over real gRPC/TLS only to the node a pod runs on.
#[tokio::test]
async fn controller_in_kubernetes_mode_signs_for_the_reviewed_node() {
    use membrane_ca::app::{self, AppConfig, KubernetesMode, SourceMode};
    use membrane_ca::client::{CaClient, ClientError};
    use membrane_identity::WorkloadIdentity;

    let mut setup = base_setup();
    setup.reviews = reviewer_setup().reviews;
    let (client, api) = FakeApi::start(setup);
    let dir = tempfile::tempdir().expect("tempdir");
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
    let config = AppConfig {
        trust_domain: td.clone(),
        state_dir: dir.path().join("state"),
        plugin_ca_dir: None,
        root_ttl: Duration::from_secs(3600 * 24),
        source_dir: Default::default(),
        reload_interval: Duration::from_millis(100),
        tokens_file: Default::default(),
        listen: loopback,
        metrics_listen: loopback,
        server_names: Vec::new(),
        serving_cert_ttl: Duration::from_secs(3600),
        rotation_grace: Duration::from_secs(30),
        rotation_ack_timeout: Duration::from_secs(600),
        root_namespace: membrane_policy::DEFAULT_ROOT_NAMESPACE.to_owned(),
        federation: Default::default(),
        signer: membrane_ca::SignerConfig::default(),
        listeners: Default::default(),
    };
    let mode = SourceMode::Kubernetes(Box::new(KubernetesMode {
        client,
        token_review: TokenReviewConfig::default(),
        status: status_config(15_000),
    }));
    let running = app::start_with(config, mode).await.expect("started");
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("source synced");
    let endpoint = format!("https://{}", running.grpc_addr());
    let roots = running.bundle().to_pem();
    let connect = |token: &'static str| {
        let (endpoint, roots) = (endpoint.clone(), roots.clone());
        async move {
            CaClient::connect(&endpoint, roots.as_bytes(), "localhost", token)
                .await
                .expect("connect")
        }
    };
    let trainer = WorkloadIdentity::new(&td, "training", "trainer").expect("id");
    let (svid, _) = connect("good")
        .await
        .request_svid(&trainer, Duration::from_secs(600))
        .await
        .expect("node-a may have the trainer identity");
    assert_eq!(svid.identity(), &trainer);
    let code = |r: Result<_, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    let other = WorkloadIdentity::new(&td, "training", "default").expect("id");
    let mut good = connect("good").await;
    assert_eq!(
        code(good.request_svid(&other, Duration::from_secs(600)).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            connect("forged")
                .await
                .request_svid(&trainer, Duration::from_secs(600))
                .await
        ),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(
            connect("fail")
                .await
                .request_svid(&trainer, Duration::from_secs(600))
                .await
        ),
        tonic::Code::Unavailable
    );
    // The pod moves to node-b: node-a loses the identity.
    api.events(
        "pods",
        vec![(
            "MODIFIED",
            pod("training", "trainer-0", "node-b", "10.0.1.5"),
        )],
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match good.request_svid(&trainer, Duration::from_secs(600)).await {
            Err(ClientError::Refused { code, .. }) => {
                assert_eq!(code, tonic::Code::PermissionDenied);
                break;
            }
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "node-a still signed for a pod on node-b: {:?}",
                other.map(|_| ())
            ),
        }
    }
    running.shutdown().await;
}

#[tokio::test]
async fn egress_policies_are_read_validated_and_kept_at_their_last_valid_version() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let key = ("training".to_owned(), "hub".to_owned());
    let object = |generation: i64, spec: Value| {
        json!({"apiVersion": "security.membrane.dev/v1", "kind": "EgressPolicy",
               "metadata": {"name": "hub", "namespace": "training", "uid": "uid-hub",
                            "generation": generation},
               "spec": spec})
    };
    let valid = json!({"rules": [{"to": [{"hosts": ["huggingface.co"], "ports": [443]}]}]});
    src.api
        .events("egresspolicies", vec![("ADDED", object(1, valid))]);
    let state = state_where(&mut src.state, "egress policy enforced", |s| {
        s.egress_policies.contains_key(&key)
    })
    .await;
    assert_eq!(
        state.egress_policies[&key].rules[0].to[0].hosts[0].to_string(),
        "huggingface.co"
    );
    // A broken edit: reported with its field path; the last valid version stays.
    let broken = json!({"rules": [{"to": [{"hosts": ["*"]}]}]});
    src.api
        .events("egresspolicies", vec![("MODIFIED", object(2, broken))]);
    let rkey = (PolicyKind::Egress, key.clone());
    let reports = tokio::time::timeout(
        WAIT,
        src.reports.wait_for(|r| {
            r.as_ref().is_some_and(|r| {
                r.get(&rkey)
                    .is_some_and(|p| matches!(p.verdict, PolicyVerdict::Invalid { .. }))
            })
        }),
    )
    .await
    .expect("report in time")
    .expect("open")
    .clone()
    .expect("some");
    let PolicyVerdict::Invalid { errors, .. } = &reports[&rkey].verdict else {
        panic!("invalid expected");
    };
    assert_eq!(errors[0].path, "spec.rules[0].to[0].hosts[0]");
    let kept = src.state.borrow().clone().expect("published");
    assert_eq!(kept.egress_policies[&key].rules[0].to[0].ports, [443]);
    // Deleted: gone from the state.
    src.api
        .events("egresspolicies", vec![("DELETED", object(2, json!({})))]);
    state_where(&mut src.state, "egress policy removed", |s| {
        !s.egress_policies.contains_key(&key)
    })
    .await;
}

#[tokio::test]
async fn egress_policy_status_is_written_to_its_own_resource() {
    let mut setup = base_setup();
    let object = |name: &str, spec: Value| {
        json!({"apiVersion": "security.membrane.dev/v1", "kind": "EgressPolicy",
               "metadata": {"name": name, "namespace": "training", "uid": format!("uid-{name}"),
                            "generation": 2},
               "spec": spec})
    };
    setup.lists.insert(
        "egresspolicies",
        vec![
            object(
                "hub",
                json!({"rules": [{"to": [{"hosts": ["huggingface.co"]}]}]}),
            ),
            object("broken", json!({"rules": [{"to": [{"ports": [70000]}]}]})),
        ],
    );
    let mut src = start_source(setup);
    start_status(&src, status_config(15_000));
    let mut patches = Vec::new();
    while patches.len() < 2 {
        patches.push(src.api.next_seen(is_patch).await);
    }
    let find = |name: &str| {
        patches
            .iter()
            .find(|p| p.path.ends_with(&format!("/egresspolicies/{name}/status")))
            .unwrap_or_else(|| panic!("no status patch for {name}: {patches:?}"))
    };
    let hub = find("hub");
    assert!(hub.path.contains("/namespaces/training/"), "{}", hub.path);
    assert_eq!(
        condition(hub, "Accepted").expect("Accepted")["status"],
        "True"
    );
    let broken = find("broken");
    let accepted = condition(broken, "Accepted").expect("Accepted");
    assert_eq!(accepted["status"], "False");
    assert!(
        accepted["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.rules[0].to[0].ports[0]")),
        "{accepted}"
    );
    let enforced = condition(broken, "Enforced").expect("Enforced");
    assert_eq!(enforced["reason"], "DenyAllStandIn");
    assert!(
        enforced["message"]
            .as_str()
            .is_some_and(|m| m.contains("leaving the mesh")),
        "{enforced}"
    );
}

#[tokio::test]
async fn gateway_api_objects_are_read_when_installed_and_absent_crds_block_nothing() {
    // Without the CRDs (404 on their paths) the source still syncs: every other test runs so.
    let mut src = start_source(base_setup());
    let state = state_where(&mut src.state, "synced without Gateway API", |_| true).await;
    assert!(state.gateways.is_empty() && state.routes.is_empty());

    let mut setup = base_setup();
    setup.gateway_api = true;
    setup.lists.insert(
        "gateways",
        vec![
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "ingress", "namespace": "inference"},
                   "spec": {"gatewayClassName": "membrane",
                            "listeners": [{"name": "tls", "port": 443, "protocol": "TLS",
                                           "tls": {"mode": "Passthrough"}}]}}),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "http", "namespace": "inference"},
                   "spec": {"gatewayClassName": "membrane",
                            "listeners": [{"name": "web", "port": 80, "protocol": "HTTP"}]}}),
        ],
    );
    setup.lists.insert(
        "tlsroutes",
        vec![json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
                    "metadata": {"name": "model-api", "namespace": "inference"},
                    "spec": {"parentRefs": [{"name": "ingress"}],
                             "hostnames": ["api.models.example"],
                             "rules": [{"backendRefs": [{"name": "model-server", "port": 8443}]}]}})],
    );
    let mut src = start_source(setup);
    let state = state_where(&mut src.state, "gateways read", |s| !s.gateways.is_empty()).await;
    assert_eq!(
        state.gateways.keys().cloned().collect::<Vec<_>>(),
        [("inference".to_owned(), "ingress".to_owned())],
        "the HTTP gateway is refused"
    );
    assert!(state.routes.contains_key(&(
        "inference".to_owned(),
        "model-api".to_owned(),
        "TLSRoute"
    )));
}
