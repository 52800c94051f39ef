//! `Discovery.Watch` over real TLS+gRPC on loopback: authentication, the snapshot, deltas and
//! their coalescing, and what each node is (not) told.

use std::time::{Duration, Instant};

use membrane_ca::client::ClientError;
use membrane_proto::v1 as pb;
use membrane_tests::{MESH_MANIFESTS, NODE_A_TOKEN, NODE_B_TOKEN, TestCa};
use pb::resource::Kind;

const POLICY: &str = "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: inference-only, namespace: training}\nspec:\n  selector: {matchLabels: {app: inference}}\n  rules: [{from: [{source: {namespaces: [training]}}]}]\n";

fn names(update: &pb::Update) -> Vec<String> {
    let mut out: Vec<String> = update
        .upserts
        .iter()
        .filter_map(|r| match r.kind.as_ref()? {
            Kind::Workload(w) => Some(format!("workload {}/{}", w.namespace, w.name)),
            Kind::Service(s) => Some(format!("service {}/{}", s.namespace, s.name)),
            Kind::Authorization(a) => Some(format!("policy {}/{}", a.namespace, a.name)),
            Kind::TrustBundle(b) => Some(format!("bundle {} roots", b.roots_der.len())),
            Kind::Egress(e) => Some(format!("egress {}/{}", e.namespace, e.name)),
            Kind::Ingress(i) => Some(format!("ingress {}/{}", i.namespace, i.name)),
            Kind::FederatedBundle(b) => Some(format!("federated bundle {}", b.trust_domain)),
        })
        .collect();
    out.sort();
    out
}

async fn next(stream: &mut tonic::Streaming<pb::Update>) -> anyhow::Result<pb::Update> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

fn manifests_with_labels() -> String {
    MESH_MANIFESTS.replace(
        "metadata: {name: inference-0, namespace: training}",
        "metadata: {name: inference-0, namespace: training, labels: {app: inference}}",
    )
}

#[tokio::test]
async fn callers_are_authenticated_and_see_only_their_node() -> anyhow::Result<()> {
    let ca = TestCa::start(&manifests_with_labels()).await?;
    let code = |r: Result<_, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => Some(code),
        _ => None,
    };
    let mut stranger = ca.client("not-a-known-token-at-all").await?;
    assert_eq!(
        code(stranger.watch("node-a").await),
        Some(tonic::Code::Unauthenticated)
    );
    let mut a = ca.client(NODE_A_TOKEN).await?;
    assert_eq!(
        code(a.watch("node-b").await),
        Some(tonic::Code::PermissionDenied)
    );
    Ok(())
}

#[tokio::test]
async fn snapshot_first_then_deltas_and_policies_only_where_they_select() -> anyhow::Result<()> {
    let ca = TestCa::start(&manifests_with_labels()).await?;
    ca.write_manifest("policy.yaml", POLICY)?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut a = ca.client(NODE_A_TOKEN).await?.watch("node-a").await?;
    let mut b = ca.client(NODE_B_TOKEN).await?.watch("node-b").await?;
    let (snap_a, snap_b) = (next(&mut a).await?, next(&mut b).await?);
    assert!(snap_a.snapshot && snap_b.snapshot);
    // Every mesh workload on both nodes (not the legacy, non-mesh pod), the bundle, and the
    // policy only on node-b, where the pod it selects runs.
    assert_eq!(
        names(&snap_a),
        [
            "bundle 1 roots",
            "workload training/inference-0",
            "workload training/trainer-0"
        ]
    );
    assert_eq!(
        names(&snap_b),
        [
            "bundle 1 roots",
            "policy training/inference-only",
            "workload training/inference-0",
            "workload training/trainer-0"
        ]
    );

    // The policy removed: node-b gets a delta removing it; node-a gets nothing.
    ca.write_manifest("policy.yaml", "")?;
    let delta = next(&mut b).await?;
    assert!(!delta.snapshot && delta.version > snap_b.version);
    assert!(delta.upserts.is_empty());
    assert_eq!(
        delta.removals,
        [pb::ResourceKey {
            kind: pb::resource_key::Kind::Authorization as i32,
            name: "training/inference-only".into()
        }]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.message())
            .await
            .is_err(),
        "node-a had nothing to learn"
    );
    Ok(())
}

#[tokio::test]
async fn a_burst_of_changes_becomes_a_few_deltas() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let mut a = ca.client(NODE_A_TOKEN).await?.watch("node-a").await?;
    next(&mut a).await?;
    // 200 edits in quick succession, each replacing the pod that burst.yaml defines.
    let start = Instant::now();
    for i in 0..200 {
        ca.write_manifest(
            "burst.yaml",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: burst-{i}, namespace: training}}\nspec: {{serviceAccountName: trainer, nodeName: node-a}}\n"
            ),
        )?;
    }
    let written = start.elapsed();
    // Collect deltas until the last edit is visible.
    let mut deltas = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "last edit never arrived");
        let update = next(&mut a).await?;
        deltas += 1;
        if names(&update).contains(&"workload training/burst-199".to_owned()) {
            break;
        }
    }
    // The directory is rescanned every 50 ms and changes are gathered for 50 ms more: the
    // burst (written in `written`) cannot yield more than one delta per 50 ms of it, plus one.
    let bound = 2 + written.as_millis() / 50;
    assert!(
        deltas as u128 <= bound,
        "{deltas} deltas for 200 edits in {written:?}"
    );
    assert!(deltas < 50, "{deltas} deltas for 200 edits");
    Ok(())
}

#[tokio::test]
async fn replicas_serve_the_same_view_side_by_side() -> anyhow::Result<()> {
    let ca = TestCa::start(&manifests_with_labels()).await?;
    let replica = ca.replica().await?;
    let mut first = ca.client(NODE_B_TOKEN).await?.watch("node-b").await?;
    let mut second = membrane_ca::client::CaClient::connect(
        &format!("https://{}", replica.grpc_addr()),
        ca.root_pem().as_bytes(),
        "membrane-ca",
        NODE_B_TOKEN,
    )
    .await?
    .watch("node-b")
    .await?;
    let (a, b) = (next(&mut first).await?, next(&mut second).await?);
    assert_eq!(names(&a), names(&b));
    // One edit of the shared source reaches the streams of both replicas.
    ca.write_manifest("policy.yaml", POLICY)?;
    for stream in [&mut first, &mut second] {
        let delta = next(stream).await?;
        assert_eq!(names(&delta), ["policy training/inference-only"]);
    }
    replica.shutdown().await;
    Ok(())
}
