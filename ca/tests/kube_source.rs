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

#[path = "kube_source/edges.rs"]
mod edges;
#[path = "kube_source/status_writes.rs"]
mod status_writes;
#[path = "kube_source/tokenreview.rs"]
mod tokenreview;
