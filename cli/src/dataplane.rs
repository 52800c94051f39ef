//! The data-plane half of `membrane demo`: a two-node mesh in network namespaces.
//!
//! Nodes and pods are network namespaces on this host; the controller and one real `ztunnel`
//! process per node run as they would on a cluster. The tour sends a marker from the trainer
//! to the feature store through the mesh while capturing the inter-node link (the marker must
//! not appear), does the same between two pods outside the mesh (it does appear), and shows a
//! pod outside the mesh being refused by a mesh pod. Everything is removed on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::{Capture, run_in_netns};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::demo::Narrator;

const PORT: u16 = 8080;
const MARKER: &[u8] = b"GRADIENTS-OF-MODEL-v7-CONFIDENTIAL";

fn spec() -> MeshSpec {
    MeshSpec {
        nodes: vec!["node-a".into(), "node-b".into()],
        pods: vec![
            PodDef::new("trainer-0", "training", "trainer", "node-a"),
            PodDef::new("feature-store-0", "data", "feature-store", "node-b"),
            PodDef::new("scraper-0", "untrusted", "scraper", "node-a"),
            PodDef::new("legacy-db-0", "legacy", "db", "node-b"),
        ],
        mesh_namespaces: vec!["training".into(), "data".into()],
        plaintext_permit: vec![],
        policies: String::new(),
        cert_ttl: None,
        extra_manifests: Vec::new(),
        access_log: None,
        local_files: false,
    }
}

/// A one-shot server in a pod: reads until EOF, answers, returns what it read.
fn serve_once(
    mesh: &Mesh,
    pod: &str,
    reply: &'static [u8],
) -> anyhow::Result<tokio::task::JoinHandle<Vec<u8>>> {
    let listener = run_in_netns(mesh.netns_path(pod), || {
        TcpListener::bind(("0.0.0.0", PORT))
    })??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        let mut got = Vec::new();
        if let Ok(Ok((mut s, _))) =
            tokio::time::timeout(Duration::from_secs(10), listener.accept()).await
        {
            let _ = s.read_to_end(&mut got).await;
            let _ = s.write_all(reply).await;
            let _ = s.shutdown().await;
        }
        got
    }))
}

/// Connects from inside `pod` like its application would, sends `data`, half-closes and
/// returns the reply (or the error).
async fn call(mesh: &Mesh, pod: &str, dst: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let std_stream = run_in_netns(mesh.netns_path(pod), || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(TcpStream::from(s))
    })
    .map_err(std::io::Error::other)??;
    let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
    let mut s = tokio::time::timeout(Duration::from_secs(10), socket.connect(dst)).await??;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await??;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection closed without a reply",
        ));
    }
    Ok(reply)
}

/// Runs the data-plane tour.
pub async fn tour(out: &mut Narrator) -> anyhow::Result<()> {
    out.step("A two-node cluster on this host: pods are network namespaces, one ztunnel per node");
    let mesh = Mesh::start(spec())
        .await
        .context("building the mesh (needs root, iproute2 and nftables)")?;
    let pods: Vec<String> = spec()
        .pods
        .iter()
        .map(|p| {
            format!(
                "{}/{} on {} at {} ({})",
                p.namespace,
                p.name,
                p.node,
                mesh.ip(&p.name),
                mesh.pod(&p.name).netns_name()
            )
        })
        .collect();
    out.say(
        true,
        "namespaces training and data are in the mesh; untrusted and legacy are not",
        json!({"pods": pods}),
    );

    for pod in ["trainer-0", "feature-store-0"] {
        mesh.enroll(pod).await?;
    }
    out.say(
        true,
        "trainer-0 and feature-store-0 enrolled: each ztunnel installed capture rules inside the pod and obtained its SVID",
        json!({"capture": "nftables table inet membrane in each pod: outbound → 15001, inbound plaintext → 15006, HBONE on 15008"}),
    );

    out.step(
        "trainer → feature store through the mesh, while capturing the link between the nodes",
    );
    let store = SocketAddr::new(mesh.ip("feature-store-0"), PORT);
    let capture = Capture::start_any(mesh.testbed.fabric().netns_path())?;
    let server = serve_once(&mesh, "feature-store-0", b"features: [0.12, 0.97, 0.33]")?;
    let reply = call(&mesh, "trainer-0", store, MARKER).await?;
    let got = server.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wire = capture.stop();
    let inbound = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(5),
        )
        .await;
    out.say(
        got == MARKER && !wire.contains(MARKER) && wire.packets > 0,
        "the application received the data; on the wire between the nodes it was never visible",
        json!({
            "reply": String::from_utf8_lossy(&reply),
            "packets captured on the inter-node link": wire.packets,
            "marker seen on the wire": wire.contains(MARKER),
            "feature store's ztunnel saw caller": inbound.map(|r| r["src_identity"].clone()).unwrap_or_default(),
        }),
    );

    out.step("the same data between two pods outside the mesh, for contrast");
    let db = SocketAddr::new(mesh.ip("legacy-db-0"), PORT);
    let capture = Capture::start_any(mesh.testbed.fabric().netns_path())?;
    let server = serve_once(&mesh, "legacy-db-0", b"ok")?;
    call(&mesh, "scraper-0", db, MARKER).await?;
    server.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wire = capture.stop();
    out.say(
        wire.contains(MARKER),
        "without the mesh, anyone on the link reads it",
        json!({"marker seen on the wire": wire.contains(MARKER)}),
    );

    out.step("untrusted scraper → feature store: no identity, refused");
    let _server = serve_once(&mesh, "feature-store-0", b"you should not see this")?;
    let result = call(&mesh, "scraper-0", store, b"GET /features").await;
    let refusal = mesh.ztunnels["node-b"]
        .wait_for_record(|r| r["result"] == "refused", Duration::from_secs(5))
        .await;
    out.say(
        result.is_err(),
        "a plaintext caller without a SPIFFE identity is refused at the feature store's pod (zero trust)",
        json!({
            "caller saw": result.err().map(|e| e.to_string()).unwrap_or_else(|| "a reply (wrong!)".into()),
            "ztunnel access record": refusal.as_ref().and_then(|r| r["reason"].as_str()).unwrap_or_default(),
        }),
    );
    Ok(())
}
