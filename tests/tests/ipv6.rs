//! IPv6 through the mesh: a pod's IPv6 TCP to a mesh pod on another node is captured,
//! carried over HBONE (mutual TLS, nothing readable on the wire between the nodes) and
//! recorded with both identities; its DNS to an IPv6 resolver address is captured like IPv4.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hickory_proto::rr::RecordType;
use membrane_tests::dns::{addresses, resolve};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::{Capture, run_in_netns};
use membrane_tests::require_root;
use membrane_tests::world::{RESOLVER, World};

const APP_PORT: u16 = 8080;

#[tokio::test]
#[ignore = "needs root"]
async fn ipv6_tcp_between_mesh_pods_is_tunnelled_encrypted_and_recorded() -> anyhow::Result<()> {
    require_root()?;
    let spec = MeshSpec {
        ztunnel_args: vec!["--dns-upstream".into(), RESOLVER.to_string()],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("store", "data", "feature-store", "node-b"),
            ],
            &["training", "data"],
        )
    };
    let mut mesh = Mesh::start(spec).await?;
    let world = World::start(&mut mesh.testbed)?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    let store6 = mesh.ip6("store");
    assert!(store6.is_ipv6());
    let dst = SocketAddr::new(store6, APP_PORT);

    // The application listens on IPv6 only; it echoes the byte count it read.
    let listener = run_in_netns(mesh.netns_path("store"), || {
        TcpListener::bind(("::", APP_PORT))
    })??;
    let app = std::thread::spawn(move || -> anyhow::Result<usize> {
        let (mut s, peer) = listener.accept()?;
        anyhow::ensure!(peer.is_ipv6(), "the application sees an IPv6 peer: {peer}");
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(format!("{}\n", got.len()).as_bytes())?;
        Ok(got.len())
    });
    let marker = b"MEMBRANE-IPV6-PLAINTEXT-MARKER";
    let capture = Capture::start_any(mesh.testbed.fabric().netns_path())?;
    // Async, so the controller (on this test's runtime) can issue the store's certificate.
    let mut s = mesh.connect_from("trainer", dst).await?;
    for _ in 0..64 {
        s.write_all(marker).await?;
    }
    s.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply)).await??;
    let received = tokio::task::spawn_blocking(move || app.join())
        .await?
        .map_err(|_| anyhow::anyhow!("app panicked"))??;
    assert_eq!(received, marker.len() * 64);
    assert_eq!(reply.trim(), received.to_string());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let captured = capture.stop();
    assert!(captured.packets > 0, "the capture saw the tunnel's packets");
    assert!(
        !captured.contains(marker),
        "plaintext marker seen on the inter-node link"
    );

    let wait = Duration::from_secs(10);
    let outbound = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| r["direction"] == "outbound" && r["dst_addr"] == dst.to_string(),
            wait,
        )
        .await
        .ok_or_else(|| anyhow::anyhow!("no outbound record for {dst}"))?;
    assert_eq!(outbound["transport"], "hbone");
    assert_eq!(outbound["dst_identity"], mesh.spiffe_id("store"));
    let inbound = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["dst_addr"] == dst.to_string(),
            wait,
        )
        .await
        .ok_or_else(|| anyhow::anyhow!("no inbound record for {dst}"))?;
    assert_eq!(inbound["src_identity"], mesh.spiffe_id("trainer"));
    assert_eq!(inbound["result"], "closed");

    // DNS to an IPv6 resolver address nothing serves is captured and answered as well.
    let unserved6: SocketAddr = "[2001:db8:53::53]:53".parse()?;
    let m = resolve(
        &mesh.netns_path("trainer"),
        unserved6,
        "huggingface.co",
        RecordType::AAAA,
    )?;
    assert_eq!(addresses(&m), ["2001:db8:100::10"]);
    drop(world);
    Ok(())
}
