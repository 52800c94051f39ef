//! Interoperability with Istio's ztunnel, both ways, in its post-quantum mode — when the user
//! supplies one: `ISTIO_ZTUNNEL_BIN` (an Istio ztunnel built with its `testing` feature, for
//! the fake CA) and `ISTIO_ZTUNNEL_CA_DIR` (the directory holding that fake CA's root and key,
//! `root-cert.pem` and `ca-key.pem`: `src/tls/` in Istio's source). Without them the test says
//! "skipped"; the project never builds or ships Istio's ztunnel.
//!
//! Membrane's controller signs with the same root (its plug-in CA), as two data planes
//! sharing an operator root would; the Istio pods' namespace is declared an HBONE peer
//! (`membrane.dev/mesh: hbone-peer`). Istio's ztunnels run with `COMPLIANCE_POLICY=pqc`, so
//! they offer and accept only X25519MLKEM768: every tunnel below negotiated it. Two of them on
//! the Istio pods' node: one serves `istio-app` and knows nothing of Membrane's pods (so its
//! telemetry can only name the trainer from the `baggage` Membrane sends), the other serves
//! `istio-client` and knows the trainer as an HBONE workload (so it tunnels to it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use membrane_tests::istio::{IstioZtunnels, PodRef};
use membrane_tests::kube::until;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const ISTIO_APP: &str = "spiffe://cluster.local/ns/ambient/sa/istio-app";
const ISTIO_CLIENT: &str = "spiffe://cluster.local/ns/ambient/sa/istio-client";
const TRAINER: &str = "spiffe://cluster.local/ns/training/sa/trainer";

const DENY_ISTIO_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-istio-client, namespace: training}
spec:
  selector: {matchLabels: {app: trainer}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/ambient/sa/istio-client"]}
"#;

/// The plug-in CA directory made from Istio's fake-CA root.
fn plugin_from(istio_ca: &std::path::Path, dir: &tempfile::TempDir) -> anyhow::Result<PathBuf> {
    let path = dir.path().join("plugin");
    std::fs::create_dir_all(&path)?;
    let root = std::fs::read(istio_ca.join("root-cert.pem")).context("root-cert.pem")?;
    std::fs::write(path.join("ca-cert.pem"), &root)?;
    std::fs::write(path.join("root-cert.pem"), &root)?;
    std::fs::copy(istio_ca.join("ca-key.pem"), path.join("ca-key.pem")).context("ca-key.pem")?;
    Ok(path)
}

/// Whether a line sent from pod `from` to `dst` comes back.
async fn echoes(mesh: &Mesh, from: &str, dst: SocketAddr) -> anyhow::Result<bool> {
    let Ok(mut s) = mesh.connect_from(from, dst).await else {
        return Ok(false);
    };
    s.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    Ok(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
            && &buf == b"ping\n",
    )
}

/// Sends `len` bytes from pod `from` to the echo app at `dst` while reading them back (large
/// DATA frames each way through both meshes); they must return unchanged within 30 s.
async fn bulk_echo(mesh: &Mesh, from: &str, dst: SocketAddr, len: usize) -> anyhow::Result<()> {
    let (mut rd, mut wr) = mesh.connect_from(from, dst).await?.into_split();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0; len];
    let (sent, read) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(wr.write_all(&data), rd.read_exact(&mut back))
    })
    .await
    .with_context(|| format!("{len} bytes from {from} to {dst} did not come back in time"))?;
    sent?;
    read?;
    anyhow::ensure!(
        back == data,
        "the bytes from {from} to {dst} came back changed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn membrane_and_istio_ztunnels_tunnel_to_each_other_post_quantum() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let (Some(bin), Some(ca)) = (
        std::env::var_os("ISTIO_ZTUNNEL_BIN").map(PathBuf::from),
        std::env::var_os("ISTIO_ZTUNNEL_CA_DIR").map(PathBuf::from),
    ) else {
        eprintln!(
            "skipped: set ISTIO_ZTUNNEL_BIN and ISTIO_ZTUNNEL_CA_DIR to run Membrane against Istio's ztunnel"
        );
        return Ok(());
    };
    let keep = tempfile::tempdir()?;
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("istio-app", "ambient", "istio-app", "node-b"),
            PodDef::new("istio-client", "ambient", "istio-client", "node-b"),
        ],
        &["training"],
    );
    spec.hbone_peer_namespaces = vec!["ambient".into()];
    spec.plugin_ca = Some(plugin_from(&ca, &keep)?);
    spec.ztunnel_args = ["--deny-status", "401", "--cluster-name", "membrane-east"]
        .map(String::from)
        .to_vec();
    let mesh = Mesh::start(spec).await?;
    mesh.enroll("trainer").await?;
    mesh.echo_app("trainer", APP_PORT)?;
    mesh.echo_app("istio-app", APP_PORT)?;
    let pqc = [("COMPLIANCE_POLICY".to_owned(), "pqc".to_owned())];
    let istio = IstioZtunnels::start(&bin, &[PodRef::of(&mesh, "istio-app")], &[], &pqc)?;
    let istio_client = IstioZtunnels::start(
        &bin,
        &[PodRef::of(&mesh, "istio-client")],
        &[PodRef::of(&mesh, "trainer")],
        &pqc,
    )?;

    // Membrane → Istio: the trainer reaches the Istio pod through a tunnel to its 15008.
    let istio_app = SocketAddr::new(mesh.ip("istio-app"), APP_PORT);
    let reached = until(
        "the trainer reaches the Istio pod",
        Duration::from_secs(20),
        || echoes(&mesh, "trainer", istio_app),
    )
    .await;
    if let Err(e) = reached {
        let records = mesh.ztunnels["node-a"].access.lock().map(|r| r.clone());
        anyhow::bail!("{e:#}; node-a's records: {records:?}");
    }
    let out = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| r["direction"] == "outbound" && r["dst_identity"] == ISTIO_APP,
            Duration::from_secs(5),
        )
        .await
        .context("no outbound record to the Istio pod")?;
    anyhow::ensure!(out["transport"] == "hbone", "outbound record: {out}");
    // Istio's telemetry names Membrane's pod from the baggage the tunnel carried.
    let metrics = istio.metrics()?;
    let named = metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("source_workload=\"trainer\"")
            && l.contains("source_cluster=\"membrane-east\"")
            && l.contains("source_workload_namespace=\"training\"")
    });
    anyhow::ensure!(
        named,
        "Istio's metrics do not name the trainer: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Bulk both ways through a tunnel Membrane opened: Istio's frames are read by a
    // receiver that sleeps until each frame can be whole.
    bulk_echo(&mesh, "trainer", istio_app, 16 << 20).await?;

    // Istio → Membrane: the Istio pod reaches the trainer; Membrane verified Istio's
    // certificate and names its identity.
    let trainer = SocketAddr::new(mesh.ip("trainer"), APP_PORT);
    until(
        "the Istio pod reaches the trainer",
        Duration::from_secs(20),
        || echoes(&mesh, "istio-client", trainer),
    )
    .await?;
    bulk_echo(&mesh, "istio-client", trainer, 16 << 20).await?;
    let inbound = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["src_identity"] == ISTIO_CLIENT,
            Duration::from_secs(5),
        )
        .await
        .context("no inbound record from the Istio pod")?;
    anyhow::ensure!(
        inbound["dst_identity"] == TRAINER,
        "inbound record: {inbound}"
    );

    // Membrane's policy applies to Istio's pod like to any other identity.
    mesh.set_policies(DENY_ISTIO_CLIENT)?;
    until(
        "the Istio pod is denied",
        Duration::from_secs(20),
        || async { Ok(!echoes(&mesh, "istio-client", trainer).await?) },
    )
    .await?;
    anyhow::ensure!(
        echoes(&mesh, "trainer", istio_app).await?,
        "the trainer's own tunnel to the Istio pod must still work"
    );
    drop(istio_client);
    drop(istio);
    Ok(())
}
