//! Identity-based AuthorizationPolicy enforced end to end: network namespaces, one ztunnel
//! process per node, the real controller.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use tokio::io::AsyncReadExt;

const PORT: u16 = 8080;

fn policy(principal: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-trainer
  namespace: inference
spec:
  selector:
    matchLabels:
      app: model-server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{principal}"]
    to:
    - operation:
        ports: ["{PORT}"]
"#
    )
}

fn spec() -> MeshSpec {
    MeshSpec {
        policies: policy("cluster.local/ns/training/sa/trainer"),
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("etl", "data", "etl", "node-a"),
                PodDef::new("model-server", "inference", "model-server", "node-b"),
                PodDef::new("outsider", "legacy", "outsider", "node-a"),
            ],
            &["training", "data", "inference"],
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn only_the_trainer_reaches_the_model_server() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec()).await?;
    for pod in ["trainer", "etl", "model-server"] {
        mesh.enroll(pod).await?;
    }
    let accepted = mesh.echo_app("model-server", PORT)?;
    let dst = SocketAddr::new(mesh.ip("model-server"), PORT);

    // The trainer gets through.
    let mut trainer = mesh.connect_from("trainer", dst).await?;
    ping(&mut trainer).await?;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Another identity: 403 between the ztunnels, nothing reaches the app.
    let etl = async {
        let mut s = mesh.connect_from("etl", dst).await?;
        ping(&mut s).await
    };
    assert!(etl.await.is_err(), "etl must be refused");
    let denied = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["result"] == "refused" && r["src_identity"] == mesh.spiffe_id("etl"),
            Duration::from_secs(10),
        )
        .await
        .expect("the destination logs the refusal");
    assert_eq!(denied["authorization"]["verdict"], "deny", "{denied}");
    let outbound = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| r["direction"] == "outbound" && r["src_identity"] == mesh.spiffe_id("etl"),
            Duration::from_secs(10),
        )
        .await
        .expect("the source logs the refusal");
    assert!(
        outbound["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("403"),
        "{outbound}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the app must see nothing of etl"
    );

    // A source outside the mesh (plaintext on 15006) is refused.
    let outsider = async {
        let mut s = mesh.connect_from("outsider", dst).await?;
        ping(&mut s).await
    };
    assert!(outsider.await.is_err(), "plaintext source must be refused");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // The allowed connection is still open; the policy changes to allow only etl: the
    // trainer's open connection is closed within a second.
    ping(&mut trainer).await?;
    let changed = Instant::now();
    mesh.set_policies(&policy("cluster.local/ns/data/sa/etl"))?;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(1), trainer.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the trainer's connection must be closed within a second of the change ({:?} later: {closed:?})",
        changed.elapsed()
    );
    let closure = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| {
                r["direction"] == "inbound"
                    && r["src_identity"] == mesh.spiffe_id("trainer")
                    && r["result"] != "refused"
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(closure.is_some());
    let logs = mesh.ztunnels["node-b"]
        .logs
        .lock()
        .map(|l| l.join("\n"))
        .unwrap_or_default();
    assert!(
        logs.lines().any(
            |l| l.contains("closing an open connection that policy no longer allows")
                && l.contains("inference/only-trainer")
        ),
        "the close is logged with the policy's name"
    );
    // And etl now gets through.
    let mut etl = mesh.connect_from("etl", dst).await?;
    ping(&mut etl).await?;

    // A malformed policy file changes nothing: the last good policy stays in force and the
    // open connection survives.
    mesh.set_policies("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: inference}\nspec: {action: ALLOW, rules: [{to: [{operation: {ports: [\"70000\"]}}]}]}\n")?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    ping(&mut etl).await?;
    let trainer_again = async {
        let mut s = mesh.connect_from("trainer", dst).await?;
        ping(&mut s).await
    };
    assert!(
        trainer_again.await.is_err(),
        "the broken file must not replace the last good policy"
    );
    Ok(())
}
