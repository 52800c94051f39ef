use super::*;
use crate::source::PodPhase;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: training
  labels:
    membrane.dev/mesh: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: trainer-0
  namespace: training
  uid: 6f1c
spec:
  serviceAccountName: trainer
  nodeName: node-a
status:
  podIP: 10.0.0.5
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored-kind
"#;

#[test]
fn parses_namespaces_pods_and_policies_and_skips_other_kinds() {
    let objects = parse_manifests(GOOD).expect("valid");
    assert_eq!(objects.len(), 3);
    let Object::Policy(policy) = &objects[2] else {
        panic!("expected a policy, got {:?}", objects[2]);
    };
    assert_eq!(
        (policy.policy.namespace(), policy.policy.name()),
        ("default", "allow-nothing")
    );
    let Object::Pod(pod) = &objects[1] else {
        panic!("expected a pod, got {:?}", objects[1]);
    };
    assert_eq!(pod.service_account, "trainer");
    assert_eq!(pod.node_name.as_deref(), Some("node-a"));
    assert_eq!(pod.uid, "6f1c");
    assert_eq!(
        pod.ips,
        vec!["10.0.0.5".parse::<std::net::IpAddr>().expect("ip")]
    );
}

#[test]
fn defaults_follow_kubernetes() {
    let objects =
        parse_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").expect("valid");
    let Object::Pod(pod) = &objects[0] else {
        panic!("expected a pod");
    };
    assert_eq!(pod.namespace, "default");
    assert_eq!(pod.service_account, "default");
    assert_eq!(pod.uid, "default/p");
    assert_eq!(pod.phase, PodPhase::Running);
}

#[test]
fn list_kind_is_unpacked() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n";
    assert_eq!(parse_manifests(text).expect("valid").len(), 1);
}

#[test]
fn errors_name_document_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: 5}\n",
            "document 1 (Pod p): field spec.nodeName",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Bad_NS}\n",
            "document 2 (Pod Bad_NS/p): field metadata.namespace",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n",
            "field status.podIP",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, labels: {a: {b: c}}}\n",
            "field metadata.labels.a",
        ),
        ("apiVersion: v1\nkind: Pod\n", "missing field `metadata`"),
        ("kind: Pod\n", "missing string field apiVersion"),
        ("- a\n- b\n", "expected a mapping"),
        (
            "apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n",
            "apiVersion",
        ),
        ("a: [unclosed\n", "not valid YAML"),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec: {rules: [{to: [{operation: {ports: [\"99999\"]}}]}]}\n",
            "field spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: nope}\n",
            "field spec.clusterIP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n",
            "field spec.ports[0].port",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, name: HTTP}]}\n",
            "field spec.ports[0].name",
        ),
        (
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: Bad_SA}\n",
            "field metadata.name",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {membrane.dev/plaintext-udp-ports: \"53,dns\"}}\n",
            "field metadata.annotations[\"membrane.dev/plaintext-udp-ports\"]: annotation membrane.dev/plaintext-udp-ports: \"dns\" is not a UDP port",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {phase: Completed}\n",
            "field status.phase: \"Completed\" is not a pod phase",
        ),
    ];
    for (text, expected) in cases {
        let err = parse_manifests(text).expect_err(text).to_string();
        assert!(
            err.contains(expected),
            "{text:?}: {err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn broken_edit_keeps_last_good_version_and_delete_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, GOOD).expect("write");
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [valid").expect("write");
    std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
    let mut source = DirectorySource::new(dir.path());
    assert!(source.rescan().expect("scan"));
    let good = source.state();
    assert_eq!(good.pods.len(), 1);
    assert!(source.errors().is_empty());

    // Break the file: the error names it, the old objects stay.
    std::fs::write(&file, GOOD.replace("node-a", "[broken")).expect("write");
    assert!(!source.rescan().expect("scan"));
    assert_eq!(source.state(), good);
    let errors = source.errors();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("pods.yaml"), "{}", errors[0]);

    // A second file with a partial error changes nothing either.
    let other = dir.path().join("more.yaml");
    std::fs::write(
        &other,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n---\nkind: Pod\n",
    )
    .expect("write");
    source.rescan().expect("scan");
    assert_eq!(source.state(), good);

    // Fix it: applied.
    std::fs::write(&file, GOOD.replace("node-a", "node-b")).expect("write");
    assert!(source.rescan().expect("scan"));
    let pod = source.state().pods.values().next().cloned().expect("pod");
    assert_eq!(pod.node_name.as_deref(), Some("node-b"));

    // Delete: gone.
    std::fs::remove_file(&file).expect("rm");
    assert!(source.rescan().expect("scan"));
    assert!(source.state().pods.is_empty());
}

#[test]
fn services_take_their_endpoints_from_the_selector() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: store-0, namespace: data, labels: {app: store}}
spec:
  containers: [{ports: [{name: http, containerPort: 9090}]}]
status: {podIP: 10.0.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: data, labels: {app: other}}
status: {podIP: 10.0.0.8}
---
apiVersion: v1
kind: Pod
metadata: {name: store-elsewhere, namespace: web, labels: {app: store}}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: store, namespace: data}
spec:
  clusterIP: 10.96.0.10
  selector: {app: store}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc, port: 81, targetPort: 9091}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: store, namespace: data}
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("all.yaml"), text).expect("write");
    let mut source = DirectorySource::new(dir.path());
    source.rescan().expect("scan");
    let state = source.state();
    let svc = &state.services[&("data".to_owned(), "store".to_owned())];
    assert_eq!(
        svc.vips,
        ["10.96.0.10".parse::<std::net::IpAddr>().expect("ip")]
    );
    let ports: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.target_port))
        .collect();
    assert_eq!(ports, [("http", 80, 0), ("grpc", 81, 9091)], "UDP skipped");
    assert_eq!(
        svc.endpoints.len(),
        1,
        "same namespace, matching labels only"
    );
    let ep = &svc.endpoints[0];
    assert_eq!(ep.pod.as_deref(), Some("store-0"));
    assert!(ep.ready);
    assert_eq!(ep.ports.get("http"), Some(&9090), "named port resolved");
    assert!(
        state
            .service_accounts
            .contains_key(&("data".to_owned(), "store".to_owned()))
    );
}

#[test]
fn unreadable_directory_is_an_error() {
    let mut source = DirectorySource::new("/nonexistent/membrane/manifests");
    assert!(matches!(source.rescan(), Err(SourceError::Io { .. })));
}

const INGRESS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: model-server, namespace: inference}
spec:
  clusterIP: 10.96.0.20
  selector: {app: model-server}
  ports: [{name: tls, port: 8443, targetPort: 8443}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: inference}
spec:
  gatewayClassName: membrane
  listeners: [{name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: model-api, namespace: inference}
spec:
  parentRefs: [{name: ingress}]
  hostnames: [api.models.example]
  rules: [{backendRefs: [{name: model-server, port: 8443}]}]
"#;

#[test]
fn gateways_and_routes_are_read_and_a_route_to_nothing_is_left_out_of_a_still_built_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ingress.yaml");
    std::fs::write(&file, INGRESS).expect("write");
    let mut source = DirectorySource::new(dir.path());
    assert!(source.rescan().expect("scan"));
    let state = source.state();
    assert_eq!((state.gateways.len(), state.routes.len()), (1, 1));
    let tables = state.ingress_tables();
    let built = &tables[&("inference".to_owned(), "ingress".to_owned())];
    assert!(built.refused.is_empty(), "{:?}", built.refused);
    let target = built
        .table
        .route(443, Some("api.models.example"))
        .expect("routed");
    assert_eq!(target.backends[0].service, "model-server");

    // A route to a Service that does not exist: left out, with its reason and field path; the
    // gateway still has its (now empty) table.
    std::fs::write(
        &file,
        INGRESS.replace("name: model-server, port", "name: nothing, port"),
    )
    .expect("write");
    assert!(source.rescan().expect("scan"));
    let built =
        source.state().ingress_tables()[&("inference".to_owned(), "ingress".to_owned())].clone();
    assert!(built.accepted.is_empty());
    assert_eq!(
        built.refused[0].reason,
        membrane_policy::gateway::RefusalReason::BackendNotFound
    );
    assert_eq!(
        built.refused[0].errors[0].path,
        "spec.rules[0].backendRefs[0].name"
    );
    assert_eq!(built.table.ports().collect::<Vec<_>>(), [443]);

    // An invalid Gateway breaks its file, whose last good version stays.
    std::fs::write(&file, INGRESS.replace("protocol: TLS,", "protocol: HTTP,")).expect("write");
    assert!(!source.rescan().expect("scan"));
    assert!(
        source.errors()[0]
            .to_string()
            .contains("spec.listeners[0].protocol"),
        "{}",
        source.errors()[0]
    );
    assert_eq!(source.state().gateways.len(), 1);
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: training, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: trainer-0, namespace: training, labels: {app: trainer}}
spec: {serviceAccountName: trainer, nodeName: node-a}
status: {podIP: 10.0.0.5}
"#;

/// A valid ALLOW (only the gateway may reach the trainers) and an invalid policy, in one file.
const POLICIES: &str = r#"
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: trainers-from-gateway, namespace: training}
spec:
  selector: {matchLabels: {app: trainer}}
  rules: [{from: [{source: {principals: [cluster.local/ns/ingress/sa/gateway]}}]}]
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: training}
spec:
  rules: [{form: [{source: {namespaces: [ingress]}}]}]
"#;

struct Running {
    rx: tokio::sync::watch::Receiver<Option<std::sync::Arc<crate::source::ClusterState>>>,
    metrics: crate::metrics::SourceMetrics,
    cancel: tokio_util::sync::CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn start(dir: &std::path::Path) -> Running {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let metrics = crate::metrics::SourceMetrics::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(run(
        DirectorySource::new(dir),
        std::time::Duration::from_millis(20),
        tx,
        metrics.clone(),
        cancel.clone(),
    ));
    Running {
        rx,
        metrics,
        cancel,
    }
}

async fn published_where(
    running: &mut Running,
    pred: impl Fn(&crate::source::ClusterState) -> bool,
) -> std::sync::Arc<crate::source::ClusterState> {
    let wait = running.rx.wait_for(|s| s.as_deref().is_some_and(&pred));
    let found = tokio::time::timeout(std::time::Duration::from_secs(10), wait)
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| s.clone()));
    match found {
        Some(Some(state)) => state,
        _ => panic!("no such state published; last: {:?}", running.rx.borrow()),
    }
}

/// A policy file with one broken document, present at startup: its policies are enforced as
/// deny-all stand-ins for their scopes, never left out (which would allow everyone).
#[tokio::test]
async fn a_policy_file_that_never_parsed_closes_its_policies_scopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("workload.yaml"), WORKLOAD).expect("write");
    let policies = dir.path().join("policies.yaml");
    std::fs::write(&policies, POLICIES).expect("write");
    let mut running = start(dir.path());
    let state = published_where(&mut running, |_| true).await;
    assert_eq!(state.pods.len(), 1, "the valid file is applied");
    let key = |name: &str| ("training".to_owned(), name.to_owned());
    let allow = &state
        .policies
        .get(&key("trainers-from-gateway"))
        .expect("the ALLOW policy's scope is not left open")
        .policy;
    assert_eq!(allow.action, membrane_policy::Action::Allow);
    assert!(allow.rules.is_empty(), "a stand-in admits nothing");
    assert_eq!(
        allow.selector.get("app").map(String::as_str),
        Some("trainer")
    );
    let typo = &state.policies.get(&key("typo")).expect("stand-in").policy;
    assert!(
        typo.rules.is_empty() && typo.selector.is_empty(),
        "whole namespace"
    );
    assert_eq!(running.metrics.deny_all_stand_ins.get(), 2);
    assert_eq!(running.metrics.file_errors.get(), 1);

    // Fixed: the real policies replace the stand-ins.
    std::fs::write(&policies, POLICIES.replace("form:", "from:")).expect("write");
    let state = published_where(&mut running, |s| {
        s.policies.values().all(|p| !p.policy.rules.is_empty())
    })
    .await;
    assert_eq!(state.policies.len(), 2);
    assert_eq!(running.metrics.deny_all_stand_ins.get(), 0);
}

/// A file that never parsed and whose documents cannot be told apart (not even YAML): any of
/// them may be a policy, so the first state waits for it; once it parses, the state is out.
#[tokio::test]
async fn an_unidentifiable_file_withholds_the_first_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("workload.yaml"), WORKLOAD).expect("write");
    let policies = dir.path().join("policies.yaml");
    std::fs::write(&policies, format!("{POLICIES}\n---\nrules: [unclosed\n")).expect("write");
    let mut running = start(dir.path());
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        running.rx.wait_for(Option::is_some),
    )
    .await
    .map(|r| r.map(|s| s.clone()));
    assert!(early.is_err(), "published without the policies: {early:?}");
    assert_eq!(running.metrics.unidentified_files.get(), 1);
    std::fs::write(&policies, POLICIES.replace("form:", "from:")).expect("write");
    let state = published_where(&mut running, |_| true).await;
    assert_eq!((state.pods.len(), state.policies.len()), (1, 2));
    assert_eq!(running.metrics.unidentified_files.get(), 0);
}

/// The pod networks given to the source are on every state it builds, so a pod address
/// outside them is withheld.
#[test]
fn the_pod_networks_are_on_every_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pods.yaml"), GOOD).expect("write");
    let mut source = DirectorySource::new(dir.path())
        .with_pod_networks(vec!["10.1.0.0/16".parse().expect("net")]);
    assert!(source.rescan().expect("scan"));
    let state = source.state();
    assert_eq!(state.pod_networks, ["10.1.0.0/16".parse().expect("net")]);
    assert!(
        state
            .withheld_ips()
            .contains("10.0.0.5".parse().expect("ip"))
    );
}
