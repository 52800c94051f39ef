//! The mesh driven by a real kube-apiserver: the chart applied, the controller run with its
//! ServiceAccount token, one ztunnel process per node (network-namespace pods, as in the other
//! end-to-end tests) authenticated with a bound token of the chart's ztunnel ServiceAccount.
//! The test does what kubelets and the endpoint controller would: Pods with `spec.nodeName`
//! and a patched `status.podIP`, a Service and its EndpointSlice.
//!
//! Checked: the ztunnels receive exactly the mesh workloads; an identity is issued only to the
//! node the Pod names, and a deleted or moved Pod loses it there; traffic and an
//! AuthorizationPolicy (through the CRD) work; the API server restarted after an etcd
//! compaction (every watch resumes with 410 Gone and relists) changes nothing — traffic and
//! enforcement continue, nothing is lost or duplicated, later changes arrive; RBAC revoked at
//! runtime gives clear errors and keeps the last state, and restoring it resumes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use membrane_testbed::kube::{KubeApi, KubeController};
use membrane_tests::identity;
use membrane_tests::kube::{
    Chart, apply, ca_client, create_pod, install, start_controller, until, ztunnel_token,
};
use membrane_tests::mesh::{ExternalController, Mesh, MeshSpec, PodDef, ping};
use serde_json::json;

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: training, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: inference, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"#;

/// Only the trainer may reach the model server.
const POLICY: &str = r#"
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: trainer-only, namespace: inference}
spec:
  selector: {matchLabels: {app: model-server}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/training/sa/trainer"]}}]
"#;

struct World {
    api: KubeApi,
    chart: Chart,
    controller: KubeController,
    mesh: Mesh,
    tokens: BTreeMap<String, String>,
    /// Pod UIDs the API server assigned, by pod name.
    uids: BTreeMap<String, String>,
}

/// The API server with the chart, the controller, a two-node mesh whose pods exist as Pods
/// (trainer and scraper in `training` on node-a, model-server in `inference` and an app in
/// the unlabelled `legacy` on node-b), the model server's Service and EndpointSlice, the
/// policy, and the mesh pods enrolled.
async fn world() -> anyhow::Result<World> {
    let api = KubeApi::start().await?;
    let chart = Chart::render(&[])?;
    install(&api, &chart)?;
    let controller = start_controller(&api, &chart, "membrane-ca-0").await?;
    let mut tokens = BTreeMap::new();
    for node in ["node-a", "node-b"] {
        tokens.insert(node.to_owned(), ztunnel_token(&api, &chart, node).await?);
    }
    let pods = vec![
        PodDef::new("trainer", "training", "trainer", "node-a"),
        PodDef::new("scraper", "training", "scraper", "node-a"),
        PodDef::new("model-server", "inference", "model-server", "node-b"),
        PodDef::new("app", "legacy", "app", "node-b"),
    ];
    let mut spec = MeshSpec::two_nodes(pods, &["training", "inference"]);
    spec.external_controller = Some(ExternalController {
        endpoint: controller.endpoint(),
        root_pem: controller.root_pem()?,
        tokens: tokens.clone(),
    });
    let mesh = Mesh::start(spec).await?;
    apply(&api, NAMESPACES)?;
    let mut uids = BTreeMap::new();
    for def in mesh.pods() {
        let uid = create_pod(
            &api,
            &def.namespace,
            &def.name,
            &def.service_account,
            &def.node,
            &mesh.ip(&def.name).to_string(),
            &json!(def.labels),
        )
        .await?;
        uids.insert(def.name.clone(), uid);
    }
    let server_ip = mesh.ip("model-server");
    apply(
        &api,
        &format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: model-server, namespace: inference}}
spec:
  selector: {{app: model-server}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: model-server-abc12
  namespace: inference
  labels: {{kubernetes.io/service-name: model-server, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
  - addresses: ["{server_ip}"]
    conditions: {{ready: true}}
    nodeName: node-b
    targetRef: {{kind: Pod, namespace: inference, name: model-server, uid: {}}}
---{POLICY}"#,
            uids["model-server"]
        ),
    )?;
    let world = World {
        api,
        chart,
        controller,
        mesh,
        tokens,
        uids,
    };
    // The whole initial state, policy included: later checks then test that it persists,
    // not how fast it first arrives.
    until(
        "both ztunnels know the mesh pods and node-b enforces the policy",
        Duration::from_secs(30),
        || async {
            for node in ["node-a", "node-b"] {
                if workload_names(&world.mesh, node).await?.len() != 3 {
                    return Ok(false);
                }
            }
            let dump = world.mesh.config_dump("node-b").await?;
            let policies = dump["policies"].as_array().into_iter().flatten();
            Ok(policies
                .filter_map(|p| p.as_str())
                .any(|p| p == "inference/trainer-only"))
        },
    )
    .await?;
    for name in ["trainer", "scraper", "model-server"] {
        world.mesh.enroll_as(name, &world.uids[name]).await?;
    }
    world.mesh.echo_app("model-server", 8080)?;
    Ok(world)
}

/// `namespace/name` of every workload node `node`'s ztunnel holds, sorted (duplicates kept).
async fn workload_names(mesh: &Mesh, node: &str) -> anyhow::Result<Vec<String>> {
    let dump = mesh.config_dump(node).await?;
    let mut names: Vec<String> = (dump["workloads"].as_array().into_iter().flatten())
        .map(|w| {
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap_or(""),
                w["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Whether `from` reaches the model server (an echoed ping) through the mesh.
async fn reaches(mesh: &Mesh, from: &str) -> bool {
    let dst = SocketAddr::new(mesh.ip("model-server"), 8080);
    match mesh.connect_from(from, dst).await {
        Ok(mut s) => ping(&mut s).await.is_ok(),
        Err(_) => false,
    }
}

/// Whether node `node`'s token obtains `namespace/sa`'s identity.
async fn issued(w: &World, node: &str, namespace: &str, sa: &str) -> anyhow::Result<bool> {
    let mut client = ca_client(&w.controller, &w.tokens[node]).await?;
    Ok(client
        .request_svid(&identity(namespace, sa), Duration::ZERO)
        .await
        .is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn workloads_identities_and_policy_follow_the_api_server() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let w = world().await?;
    let expected = [
        "inference/model-server",
        "training/scraper",
        "training/trainer",
    ];
    for node in ["node-a", "node-b"] {
        let names = workload_names(&w.mesh, node).await?;
        ensure!(
            names == expected,
            "{node} holds {names:?}, expected exactly the mesh pods {expected:?}"
        );
    }
    // The Service's VIP, allocated by the API server, reaches the ztunnels (its Service and
    // EndpointSlice are watch events of their own, after the Pods').
    until(
        "the model-server Service reaches node-a",
        Duration::from_secs(20),
        || async {
            let dump = w.mesh.config_dump("node-a").await?;
            Ok(dump["services"].to_string().contains("model-server"))
        },
    )
    .await?;

    // Traffic and the policy through the CRD.
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(reaches(&w.mesh, "trainer").await) },
    )
    .await?;
    let record = w.mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(5),
        )
        .await
        .context("no inbound record on node-b")?;
    ensure!(
        record["src_identity"] == "spiffe://cluster.local/ns/training/sa/trainer",
        "inbound record: {record}"
    );
    // The CRD policy is a watch event of its own too: denied within the bound, and then
    // for good.
    until(
        "the scraper is denied by the CRD policy",
        Duration::from_secs(20),
        || async { Ok(!reaches(&w.mesh, "scraper").await) },
    )
    .await?;
    ensure!(
        !reaches(&w.mesh, "scraper").await,
        "the scraper was denied once, then reached the model server"
    );

    // Identities follow the Pods' nodes.
    ensure!(
        issued(&w, "node-a", "training", "trainer").await?,
        "node-a: trainer"
    );
    ensure!(
        !issued(&w, "node-b", "training", "trainer").await?,
        "node-b obtained the identity of a pod on node-a"
    );
    // The scraper's Pod is deleted: its node loses its identity and its workload.
    let pods: Api<Pod> = Api::namespaced(w.api.client.clone(), "training");
    pods.delete("scraper", &DeleteParams::default().grace_period(0))
        .await?;
    until(
        "the scraper's identity is gone",
        Duration::from_secs(20),
        || async {
            Ok(!issued(&w, "node-a", "training", "scraper").await?
                && !workload_names(&w.mesh, "node-a")
                    .await?
                    .contains(&"training/scraper".to_owned()))
        },
    )
    .await?;
    // A Pod moved to another node: its identity goes with it.
    create_pod(
        &w.api,
        "training",
        "evaluator",
        "evaluator",
        "node-a",
        "10.250.0.7",
        &json!({}),
    )
    .await?;
    until(
        "node-a gets the evaluator's identity",
        Duration::from_secs(20),
        || async { issued(&w, "node-a", "training", "evaluator").await },
    )
    .await?;
    pods.delete("evaluator", &DeleteParams::default().grace_period(0))
        .await?;
    create_pod(
        &w.api,
        "training",
        "evaluator",
        "evaluator",
        "node-b",
        "10.250.0.8",
        &json!({}),
    )
    .await?;
    until(
        "the evaluator's identity moved to node-b",
        Duration::from_secs(20),
        || async {
            Ok(issued(&w, "node-b", "training", "evaluator").await?
                && !issued(&w, "node-a", "training", "evaluator").await?)
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn restarts_compaction_and_revoked_rbac_keep_the_mesh() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut w = world().await?;
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(reaches(&w.mesh, "trainer").await) },
    )
    .await?;
    let dst = SocketAddr::new(w.mesh.ip("model-server"), 8080);
    let mut long = w.mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    mesh_runs(&w, &mut long, "before the restart").await?;

    // etcd compacted, the API server restarted: every watch resumes from a compacted
    // resource version (410 Gone) and relists. Meanwhile the mesh runs on.
    let revision = w.api.compact_etcd().await?;
    let lists_before = lists(&w)?;
    w.api.restart_apiserver(Duration::from_secs(2)).await?;
    mesh_runs(&w, &mut long, "across the restart").await?;
    plain_pod(&w, "evaluator", "10.250.0.9").await?;
    let what = "a pod created after the restart arrives";
    arrives(&w, "evaluator", what, Duration::from_secs(30)).await?;
    let relisted = lists(&w)?;
    ensure!(
        relisted > lists_before,
        "no relist after compaction at revision {revision} and the restart ({lists_before} → {relisted} lists)"
    );
    let names = workload_names(&w.mesh, "node-a").await?;
    ensure!(
        names
            == [
                "inference/evaluator",
                "inference/model-server",
                "training/scraper",
                "training/trainer"
            ],
        "after the relist node-a holds {names:?}: lost or duplicated state"
    );

    // RBAC revoked: the controller's watches are refused when they resume (the restart makes
    // them resume now, not at their timeout). It says so, and keeps its last state.
    let binding = w.chart.controller_account()?;
    w.api
        .kubectl(&["delete", "clusterrolebinding", &binding], None)?;
    w.api.restart_apiserver(Duration::from_millis(500)).await?;
    w.controller
        .wait_for_log(Duration::from_secs(30), |l| {
            (l["level"] == "ERROR" || l["level"] == "WARN") && l.to_string().contains("forbidden")
        })
        .await
        .context("no controller error naming the refusal")?;
    plain_pod(&w, "late", "10.250.0.10").await?;
    mesh_runs(&w, &mut long, "after RBAC was revoked").await?;
    let held = workload_names(&w.mesh, "node-a").await?;
    ensure!(held == names, "state changed without RBAC: {held:?}");

    // RBAC restored (the chart applied again): the controller resumes on its own.
    install_rest(&w)?;
    let what = "the controller resumes after RBAC returns";
    arrives(&w, "late", what, Duration::from_secs(60)).await?;
    mesh_runs(&w, &mut long, "after RBAC returned").await?;
    Ok(())
}

/// Creates a plain pod `inference/<name>` on node-b (no network namespace: only its
/// identity and workload matter).
async fn plain_pod(w: &World, name: &str, ip: &str) -> anyhow::Result<String> {
    create_pod(&w.api, "inference", name, name, "node-b", ip, &json!({})).await
}

/// Waits until node-a's ztunnel holds `inference/<name>`.
async fn arrives(w: &World, name: &str, what: &str, within: Duration) -> anyhow::Result<()> {
    let expected = format!("inference/{name}");
    until(what, within, || async {
        Ok(workload_names(&w.mesh, "node-a").await?.contains(&expected))
    })
    .await
}

/// Traffic and enforcement both still work, and the long stream still echoes.
async fn mesh_runs(w: &World, long: &mut tokio::net::TcpStream, when: &str) -> anyhow::Result<()> {
    ensure!(reaches(&w.mesh, "trainer").await, "traffic stopped {when}");
    ensure!(
        !reaches(&w.mesh, "scraper").await,
        "enforcement stopped {when}"
    );
    ping(long)
        .await
        .with_context(|| format!("the long stream broke {when}"))
}

/// How many `list` requests the controller has made so far (relists show as more).
fn lists(w: &World) -> anyhow::Result<usize> {
    let user = format!(
        "system:serviceaccount:{}:{}",
        membrane_tests::kube::NAMESPACE,
        w.chart.controller_account()?
    );
    Ok(w.api
        .audit_events(&user)?
        .iter()
        .filter(|e| e["verb"] == "list")
        .count())
}

/// Applies the chart's objects again (restores a deleted binding).
fn install_rest(w: &World) -> anyhow::Result<()> {
    let bindings: Vec<&serde_json::Value> = (w.chart.docs.iter())
        .filter(|d| d["kind"] == "ClusterRoleBinding")
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": bindings});
    apply(&w.api, &list.to_string())?;
    Ok(())
}
