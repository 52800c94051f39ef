//! Attacks on the controller, through the real controller over TLS+gRPC (and real ztunnel
//! processes in network namespaces where traffic is involved):
//! - a node that keeps its discovery stream open but never acknowledges the new root must not
//!   stall a root rotation past `--rotation-ack-timeout`, and it is reported;
//! - Istio's mesh-wide `allow-nothing` in the configured root namespace (`istio-system`) is
//!   enforced, not silently ignored.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use membrane_ca::rotation::{self, Phase};
use membrane_proto::v1 as pb;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use membrane_tests::{MESH_MANIFESTS, TestCa, node_token, trust_domain};

const TTL: Duration = Duration::from_secs(2);
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

async fn next(stream: &mut tonic::Streaming<pb::Update>) -> anyhow::Result<pb::Update> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

/// The next update that carries a trust bundle, and its roots.
async fn next_bundle(
    stream: &mut tonic::Streaming<pb::Update>,
) -> anyhow::Result<(pb::Update, Vec<Vec<u8>>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no trust bundle on the stream");
        let update = next(stream).await?;
        let roots = update.upserts.iter().find_map(|r| match &r.kind {
            Some(pb::resource::Kind::TrustBundle(b)) => Some(b.roots_der.clone()),
            _ => None,
        });
        if let Some(roots) = roots {
            return Ok((update, roots));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_acknowledges_cannot_stall_a_root_rotation() -> anyhow::Result<()> {
    let ca = TestCa::builder()
        .manifest("mesh.yaml", MESH_MANIFESTS)
        .nodes(&["node-a".to_owned(), "node-b".to_owned()])
        .cert_ttl(TTL)
        .rotation_ack_timeout(ACK_TIMEOUT)
        .start()
        .await?;
    let state = ca.dir.path().join("state");

    // The attacker: node-a holds its stream open and never acknowledges anything.
    let mut silent = ca.client(&node_token("node-a")).await?;
    let mut silent_stream = silent.watch("node-a").await?;
    let (_, old) = next_bundle(&mut silent_stream).await?;
    assert_eq!(old.len(), 1);
    // An honest node-b acknowledges every bundle.
    let mut honest = ca.client(&node_token("node-b")).await?;
    let mut honest_stream = honest.watch("node-b").await?;
    let (snapshot, _) = next_bundle(&mut honest_stream).await?;
    honest.ack("node-b", snapshot.version).await?;

    let started = Instant::now();
    rotation::request(&state, &trust_domain(), Duration::from_secs(3600))?;
    let (_, both) = next_bundle(&mut silent_stream).await?;
    assert_eq!(both.len(), 2);
    let new_root = both
        .iter()
        .find(|r| **r != old[0])
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no new root"))?;
    let roots = [old[0].clone(), new_root];
    let (update, honest_roots) = next_bundle(&mut honest_stream).await?;
    assert_eq!(honest_roots.len(), 2);
    honest.ack("node-b", update.version).await?;

    // Past the grace period, before the timeout: the silent node still holds signing back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(rotation::read_phase(&state)?, Phase::Distributing { .. }),
        "switched before the acknowledgement timeout"
    );
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [0]);

    // After the timeout the rotation proceeds anyway and names the silent node.
    let deadline = started + ACK_TIMEOUT + Duration::from_secs(10);
    let unacknowledged = loop {
        if let Phase::Signing { unacknowledged, .. } = rotation::read_phase(&state)? {
            break unacknowledged;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the silent node stalled the rotation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        started.elapsed() >= ACK_TIMEOUT - Duration::from_millis(300),
        "switched after {:?}, before the timeout",
        started.elapsed()
    );
    assert_eq!(unacknowledged, ["node-a"]);
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [1]);
    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains("membrane_ca_root_rotation_unacknowledged_nodes 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("membrane_ca_root_rotation_ack_timeouts_total 1"),
        "{metrics}"
    );
    drop((silent, silent_stream, honest, honest_stream));
    ca.stop().await;
    Ok(())
}

const APP_PORT: u16 = 8080;

/// Istio's standard mesh-wide deny, where Istio users keep it, plus one explicit ALLOW.
const ISTIO_POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: istio-system
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: trainer-to-model
  namespace: inference
spec:
  selector:
    matchLabels:
      app: model-server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/training/sa/trainer"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn istio_allow_nothing_in_the_configured_root_namespace_denies_mesh_traffic()
-> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(MeshSpec {
        policies: ISTIO_POLICIES.to_owned(),
        root_namespace: Some("istio-system".to_owned()),
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("etl", "data", "etl", "node-b"),
                PodDef::new("model-server", "inference", "model-server", "node-b"),
            ],
            &["training", "data", "inference"],
        )
    })
    .await?;
    for pod in ["trainer", "etl", "model-server"] {
        mesh.enroll(pod).await?;
    }
    let etl_accepted = mesh.echo_app("etl", APP_PORT)?;
    let model_accepted = mesh.echo_app("model-server", APP_PORT)?;

    // The legitimate path: an explicit ALLOW still admits the trainer.
    let mut ok = mesh
        .connect_from(
            "trainer",
            SocketAddr::new(mesh.ip("model-server"), APP_PORT),
        )
        .await?;
    ping(&mut ok).await?;
    assert_eq!(model_accepted.load(Ordering::SeqCst), 1);

    // No policy selects etl: only the mesh-wide allow-nothing in istio-system can deny it.
    let to_etl = async {
        let mut s = mesh
            .connect_from("trainer", SocketAddr::new(mesh.ip("etl"), APP_PORT))
            .await?;
        ping(&mut s).await
    };
    assert!(
        to_etl.await.is_err(),
        "allow-nothing in the root namespace istio-system must deny"
    );
    let denied = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| {
                r["result"] == "refused"
                    && r["src_identity"] == mesh.spiffe_id("trainer")
                    && r["authorization"]["verdict"] == "deny"
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(denied.is_some(), "the destination records the refusal");
    assert_eq!(
        etl_accepted.load(Ordering::SeqCst),
        0,
        "etl's app saw nothing"
    );
    Ok(())
}
