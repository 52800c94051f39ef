//! Two clusters on one host, federated: separate controllers, roots and trust domains
//! (`cluster-a.example`, `cluster-b.example`), one node each, pod networks routed flat across
//! the fabric that stands for the WAN between them. Cluster B exports its model server; a
//! trainer in A reaches it by its clusterset name, end to end over HBONE, and B's policy
//! decides on A's real identity. Removing the federation stops new cross-cluster tunnels and
//! leaves A's own traffic alone.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hickory_proto::rr::RecordType;
use membrane_tests::dns::{addresses, resolve};
use membrane_tests::mesh::{Mesh, MeshSpec, NodeController, PodDef, ping};
use membrane_tests::{TestCa, node_token, require_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "cluster-a.example";
const B: &str = "cluster-b.example";
/// A resolver address nothing serves: only the DNS capture answers it.
const UNSERVED: &str = "192.0.2.53:53";
const MODEL_SERVER: &str = "model-server.inference.svc.clusterset.local";

fn federation(
    name: &str,
    td: &str,
    bundle_endpoint: &str,
    root_pem: &str,
    exports: Option<&str>,
) -> String {
    let indented: String = root_pem.lines().map(|l| format!("    {l}\n")).collect();
    let exports = exports
        .map(|url| {
            // The testbed's pod supernet: the only addresses imported from the peer.
            format!("  serviceExports:\n    url: {url}\n    addresses: [10.77.0.0/16]\n")
        })
        .unwrap_or_default();
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  bundleEndpoint:\n    url: {bundle_endpoint}\n    spiffeId: spiffe://{td}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}{exports}"
    )
}

/// Cluster B's manifests: its mesh namespace, the model server pod (at its testbed address)
/// behind an exported Service, and B's policy: only A's trainer may call it.
fn b_manifests(ip: IpAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: inference, labels: {{membrane.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: model-server, namespace: inference, uid: inference-model-server, labels: {{app: model-server}}}}
spec: {{serviceAccountName: model-server, nodeName: node-b}}
status: {{phase: Running, podIP: {ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: model-server, namespace: inference, labels: {{membrane.dev/export: "true"}}}}
spec:
  clusterIP: 10.96.0.20
  selector: {{app: model-server}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: trainer-only, namespace: inference}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{A}/ns/training/sa/trainer"]}}
"#
    )
}

/// Connects from pod `from` to `dst` and echoes one line; the time-bounded result.
async fn echo(mesh: &Mesh, from: &str, dst: SocketAddr, line: &[u8]) -> anyhow::Result<()> {
    let attempt = async {
        let mut s = mesh.connect_from(from, dst).await?;
        s.write_all(line).await?;
        let mut back = vec![0; line.len()];
        s.read_exact(&mut back).await?;
        ensure!(back == line, "echo differs");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("timed out")?
}

async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = check().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {limit:?} (last: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clusters A (the mesh's controller: node-a with trainer, scraper and store) and B (its own
/// controller: node-b with the exported model server), federated both ways, every pod
/// enrolled, echo servers on model-server:8080 and store:9000; and the model server's
/// clusterset address as resolved by the trainer. `cert_ttl` is both clusters' workload
/// certificate lifetime.
async fn two_clusters(cert_ttl: Option<Duration>) -> anyhow::Result<(Mesh, TestCa, SocketAddr)> {
    // Cluster B: its own controller, root and trust domain; node-b only.
    let mut b = TestCa::builder().trust_domain(B);
    if let Some(ttl) = cert_ttl {
        b = b.cert_ttl(ttl);
    }
    let b = b
        .nodes(&["node-b".to_owned()])
        .bundle_endpoint(Duration::from_secs(1))
        .exports()
        .start()
        .await?;
    let b_bundle = b.bundle_endpoint_addr().context("B's bundle endpoint")?;
    let b_exports = b.exports_addr().context("B's federation listener")?;
    // Cluster A: the mesh's own controller, federated with B and importing its Services;
    // node-b's ztunnel belongs to B.
    let spec = MeshSpec {
        cert_ttl,
        trust_domain: Some(A.into()),
        bundle_endpoint: Some(Duration::from_secs(1)),
        node_controllers: BTreeMap::from([(
            "node-b".to_owned(),
            NodeController {
                endpoint: b.endpoint(),
                root_pem: b.root_pem(),
                token: node_token("node-b"),
                trust_domain: B.into(),
            },
        )]),
        extra_manifests: vec![(
            "federation-b.yaml".into(),
            federation(
                "cluster-b",
                B,
                &format!("https://{b_bundle}/"),
                &b.root_pem(),
                Some(&format!("https://{b_exports}")),
            ),
        )],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("scraper", "monitoring", "scraper", "node-a"),
                PodDef::new("store", "training", "feature-store", "node-a"),
                PodDef::new("model-server", "inference", "model-server", "node-b"),
            ],
            &["training", "monitoring", "inference"],
        )
    };
    let mesh = Mesh::start(spec).await?;
    let a_bundle = mesh
        .ca()
        .bundle_endpoint_addr()
        .context("A's bundle endpoint")?;
    // B federates with A (mutual), and learns its pods.
    std::fs::write(
        b.manifests_dir().join("federation-a.yaml"),
        federation(
            "cluster-a",
            A,
            &format!("https://{a_bundle}/"),
            &mesh.ca().root_pem(),
            None,
        ),
    )?;
    std::fs::write(
        b.manifests_dir().join("inference.yaml"),
        b_manifests(mesh.ip("model-server")),
    )?;
    for pod in ["trainer", "scraper", "store", "model-server"] {
        until(
            &format!("{pod} enrolled"),
            Duration::from_secs(20),
            || async { Ok(mesh.enroll(pod).await.is_ok()) },
        )
        .await?;
    }
    mesh.echo_app("model-server", 8080)?;
    mesh.echo_app("store", 9000)?;

    // The clusterset name resolves, through A's DNS capture, to the imported Service's VIP.
    let unserved: SocketAddr = UNSERVED.parse()?;
    let trainer_ns = mesh.netns_path("trainer");
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip: IpAddr = loop {
        let ns = trainer_ns.clone();
        let answer = tokio::task::spawn_blocking(move || {
            resolve(&ns, unserved, MODEL_SERVER, RecordType::A)
        })
        .await?;
        let got = answer.as_ref().map(addresses);
        if let Ok([one]) = got.as_deref()
            && one.starts_with("240.240.")
        {
            break one.parse()?;
        }
        ensure!(
            Instant::now() < deadline,
            "{MODEL_SERVER} never resolved to a clusterset address: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    Ok((mesh, b, SocketAddr::new(vip, 8080)))
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_trainer_reaches_a_model_server_in_a_federated_cluster_by_name() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, b, dst) = two_clusters(None).await?;

    // The trainer reaches it; nothing on the WAN is plaintext; B records A's identity.
    let capture = mesh.testbed.capture_fabric()?;
    let marker = format!("CROSS-CLUSTER-{}", mesh.testbed.id());
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, marker.as_bytes()).await.is_ok()) },
    )
    .await?;
    let captured = capture.stop();
    ensure!(
        !captured.contains(marker.as_bytes()),
        "the payload crossed the WAN in plaintext"
    );
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(5),
        )
        .await
        .context("no inbound record in cluster B")?;
    ensure!(
        record["src_identity"] == format!("spiffe://{A}/ns/training/sa/trainer"),
        "B's record names {}: {record}",
        record["src_identity"]
    );

    // B's policy admits only A's trainer: A's scraper is refused by B.
    ensure!(
        echo(&mesh, "scraper", dst, b"scrape").await.is_err(),
        "cluster B's policy let A's scraper through"
    );
    let scraper = format!("spiffe://{A}/ns/monitoring/sa/scraper");
    let denied = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| {
                r["direction"] == "inbound"
                    && r["src_identity"] == scraper.as_str()
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.contains("no ALLOW policy"))
            },
            Duration::from_secs(5),
        )
        .await;
    ensure!(
        denied.is_some(),
        "B did not deny A's scraper by its policy: {:#?}",
        mesh.ztunnels["node-b"].access_records()
    );

    // The federation goes away: its imports go with it, so a new connection to the
    // clusterset address is refused with the reason; the tunnel already open runs on
    // (refusing new tunnels on pooled connections and handshakes of a trust domain no longer
    // federated is tested where it happens: the ztunnel's pool and the identity verifiers);
    // A's own traffic is untouched.
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    std::fs::remove_file(mesh.ca().manifests_dir().join("federation-b.yaml"))?;
    until(
        "a new cross-cluster tunnel is refused",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, b"after").await.is_err()) },
    )
    .await?;
    let refusal = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| {
                r["direction"] == "outbound"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.contains("no imported Service"))
            },
            Duration::from_secs(5),
        )
        .await;
    ensure!(
        refusal.is_some(),
        "no outbound record says why the clusterset address is refused: {:#?}",
        mesh.ztunnels["node-a"]
            .access_records()
            .into_iter()
            .filter(|r| r["direction"] == "outbound")
            .map(|r| r["reason"].clone())
            .collect::<Vec<_>>()
    );
    let store = SocketAddr::new(mesh.ip("store"), 9000);
    echo(&mesh, "trainer", store, b"local traffic")
        .await
        .context("A's own traffic after the federation was removed")?;
    // The tunnel opened before the change runs on (only new ones are refused).
    ping(&mut long)
        .await
        .context("the open cross-cluster tunnel")?;
    drop(long);
    drop(mesh);
    drop(b);
    Ok(())
}

/// Cluster B rotates its root (`rotate-root`) while A's trainer talks to B's model server: a
/// long stream pinged every 100 ms and a new connection every 500 ms all succeed, through the
/// new root's distribution (A fetches it from B's bundle endpoint before B signs with it),
/// B's switch to signing with it (B's pods renew under it) and the old root's removal.
#[tokio::test]
#[ignore = "needs root"]
async fn cross_cluster_traffic_continues_while_a_federated_cluster_rotates_its_root()
-> anyhow::Result<()> {
    use membrane_ca::rotation::{self, Phase};
    require_root()?;
    let (mesh, b, dst) = two_clusters(Some(Duration::from_secs(3))).await?;
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, b"before").await.is_ok()) },
    )
    .await?;
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    let pinger = tokio::spawn(async move {
        let mut pings = 0u32;
        loop {
            ping(&mut long).await.context("the long stream")?;
            pings += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if pings >= 10_000 {
                return anyhow::Ok(pings);
            }
        }
    });

    let state = b.dir.path().join("state");
    let td = membrane_identity::spiffe_id::parse_trust_domain(B)?;
    rotation::request(&state, &td, Duration::from_secs(3600))?;
    let renewed_before = mesh.ztunnels["node-b"].renewals(None).len();
    let (mut saw_signing, mut connections) = (false, 0u32);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let phase = rotation::read_phase(&state)?;
        echo(&mesh, "trainer", dst, b"during")
            .await
            .with_context(|| format!("new connection {connections} in phase {phase:?}"))?;
        ensure!(
            !pinger.is_finished(),
            "the long stream ended: {:?}",
            pinger.await
        );
        connections += 1;
        saw_signing |= matches!(phase, Phase::Signing { .. });
        // Done once the rotation is over and B's model server has renewed under the new root.
        let renewed = mesh.ztunnels["node-b"].renewals(None).len() > renewed_before + 2;
        if saw_signing && phase == Phase::Idle && renewed {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "rotation not done: phase {phase:?}, {connections} connections"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        connections >= 4,
        "only {connections} connections during the rotation"
    );
    // A's ztunnels follow B's bundle down to the new root alone, and traffic still flows.
    let b_roots = membrane_tests::pem_certificates(&b.root_pem());
    ensure!(b_roots.len() == 1, "B still holds {} roots", b_roots.len());
    until(
        "A trusts B's new root only",
        Duration::from_secs(15),
        || async { Ok(mesh.ca().federated_roots("node-a", B).await? == b_roots) },
    )
    .await?;
    echo(&mesh, "trainer", dst, b"after")
        .await
        .context("after the rotation")?;
    pinger.abort();
    drop(mesh);
    drop(b);
    Ok(())
}
