//! EgressPolicy and a ClientHello that comes late, end to end: a decision made when the
//! peek's deadline passed without a whole ClientHello is not the last word where a host rule
//! or a DENY by name concerns the connection — the first bytes the pod eventually sends are
//! held and decided again with their server name, and a refused first flight never leaves.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use membrane_tests::dns::resolve;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::outside::{client_hello, egress_record, tls_connector};
use membrane_tests::world::{SINK_PORT, World};
use membrane_tests::{require_root, ztunnel_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A resolver address nothing serves: only the capture answers it.
const RESOLVER: &str = "192.0.2.53:53";

/// The trainer may upload to s3.example's sink (a port that is not a TLS port); the
/// `data` namespace is free but for paste sites.
const POLICIES: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: uploads, namespace: training}
spec:
  action: ALLOW
  rules:
  - to: [{hosts: [s3.example], ports: [9000]}]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: no-paste, namespace: data}
spec:
  action: DENY
  rules:
  - to: [{hosts: [paste.example]}]
";

async fn start() -> anyhow::Result<(Mesh, World)> {
    let spec = MeshSpec {
        ztunnel_args: vec![
            "--dns-upstream".to_owned(),
            membrane_tests::world::RESOLVER.to_string(),
        ],
        extra_manifests: vec![("egress.yaml".into(), POLICIES.into())],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("analyst", "data", "default", "node-a"),
            ],
            &["training", "data"],
        )
    };
    let mut mesh = Mesh::start(spec).await?;
    let world = World::start(&mut mesh.testbed)?;
    for pod in ["trainer", "analyst"] {
        mesh.enroll(pod).await?;
    }
    Ok((mesh, world))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Reads until the connection ends (5 s bound): what came back.
async fn drain(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_late_client_hello_for_another_name_never_reaches_a_pinned_address() -> anyhow::Result<()>
{
    require_root()?;
    let (mesh, world) = start().await?;
    resolve(
        &mesh.netns_path("trainer"),
        addr(RESOLVER),
        "s3.example",
        RecordType::A,
    )?;
    let sink = addr(&format!("198.51.100.30:{SINK_PORT}"));

    // Plain bytes, however late, are what the pin allows.
    let mut tcp = mesh.connect_from("trainer", sink).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(b"PUT /checkpoint HTTP/1.1\r\n\r\n").await?;
    tcp.shutdown().await?;
    drain(&mut tcp).await;
    let r = egress_record(&mesh, "node-a", "trainer", sink, 1).await?;
    assert_eq!(r["egress"]["verdict"], "allow", "{r:#}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while world.sunk() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = world.sunk();
    assert!(before > 0, "the allowed upload never arrived");

    // A ClientHello for another name, sent after the peek gave up (and a header first).
    let hello = client_hello("paste.example")?;
    let mut tcp = mesh.connect_from("trainer", sink).await?;
    tcp.write_all(&hello[..5]).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&hello[5..]).await?;
    let _ = tcp.write_all(&[0x17; 4096]).await;
    let _ = tcp.shutdown().await;
    let back = drain(&mut tcp).await;
    assert!(back.is_empty(), "{} bytes came back", back.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        world.sunk(),
        before,
        "bytes of the refused connection reached the sink"
    );
    let r = egress_record(&mesh, "node-a", "trainer", sink, 2).await?;
    assert_eq!(r["egress"]["verdict"], "deny", "{r:#}");
    assert_eq!(r["egress"]["reason"], "sni_mismatch", "{r:#}");
    assert_eq!(r["egress"]["sni"], "paste.example", "{r:#}");
    let refused = ztunnel_metric(
        &mesh,
        "node-a",
        "membrane_egress_decisions_total",
        &["verdict=\"deny\"", "reason=\"sni_mismatch\""],
    )
    .await?;
    assert!(refused >= 1.0, "{refused} sni_mismatch denials counted");
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_deny_by_name_holds_when_the_client_hello_comes_after_the_wait() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    // paste.example's address, never resolved by the analyst: only the SNI names it.
    let dst = addr("198.51.100.20:443");
    let name = rustls_pki_types::ServerName::try_from("paste.example")?;
    // On time, the SNI is denied at once.
    let tcp = mesh.connect_from("analyst", dst).await?;
    let on_time = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(&world)?.connect(name.clone(), tcp),
    )
    .await?;
    assert!(on_time.is_err(), "the on-time ClientHello was let through");
    let r = egress_record(&mesh, "node-a", "analyst", dst, 1).await?;
    assert_eq!(r["egress"]["verdict"], "deny", "{r:#}");
    // After the 1 s wait for the ClientHello on 443: still denied, nothing comes back.
    let tcp = mesh.connect_from("analyst", dst).await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let late = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(&world)?.connect(name, tcp),
    )
    .await?;
    assert!(late.is_err(), "the late ClientHello was let through");
    let r = egress_record(&mesh, "node-a", "analyst", dst, 2).await?;
    assert_eq!(r["egress"]["verdict"], "deny", "{r:#}");
    assert_eq!(r["egress"]["reason"], "matched", "{r:#}");
    assert_eq!(r["egress"]["policy"], "data/no-paste", "{r:#}");
    assert_eq!(r["egress"]["sni"], "paste.example", "{r:#}");
    Ok(())
}
