//! The data-plane half of `membrane demo`: a GenAI pipeline on a two-node mesh in network
//! namespaces.
//!
//! Nodes and pods are network namespaces on this host; the controller and one real `ztunnel`
//! process per node run as they would on a cluster (built by the same harness as the tests and
//! `membrane local`). The tour: trainer → feature store allowed and encrypted on the wire (a
//! capture of the inter-node link never shows the data), the same data in the clear between
//! two pods outside the mesh, the untrusted scraper denied by identity with the deciding
//! policy, a plaintext caller refused, a policy edit cutting a live connection,
//! certificates rotating under a running transfer, and egress decided by identity and name
//! against a simulated outside world ([`crate::dataplane_egress`], the model hub through the
//! egress gateway) and external clients through the ingress gateway
//! ([`crate::dataplane_ingress`]). Every claim is checked against what
//! happened and carried in the step's `detail` for `--json`. Everything is removed on drop,
//! also when the demo is interrupted.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use membrane_testbed::mesh::{Mesh, MeshSpec, PodDef};
use membrane_testbed::netns::{Capture, run_in_netns};
use membrane_testbed::world::World;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::narrator::Narrator;

const PORT: u16 = 8080;
const MARKER: &[u8] = b"GRADIENTS-OF-MODEL-v7-CONFIDENTIAL";

/// Workload certificate lifetime in the demo: short, so rotation happens while you watch.
const CERT_TTL: Duration = Duration::from_secs(3);
const POLICIES: &str = include_str!("../../examples/genai/policies.yaml");
/// The edit applied to a live connection: only the inference namespace may reach the model
/// server from now on.
const LOCKDOWN: &str = "---\napiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: model-server-lockdown, namespace: inference}\nspec:\n  selector: {matchLabels: {app: model-server-0}}\n  rules: [{from: [{source: {namespaces: [inference]}}]}]\n";

fn spec() -> MeshSpec {
    let mut feature_store = PodDef::new("feature-store-0", "data", "feature-store", "node-b");
    feature_store
        .labels
        .insert("app".into(), "feature-store".into());
    // The trainer carries the example's label (examples/genai/egress.yaml selects it).
    let mut trainer = PodDef::new("trainer-0", "training", "trainer", "node-a");
    trainer.labels.insert("app".into(), "trainer".into());
    MeshSpec {
        nodes: vec![
            "node-a".into(),
            "node-b".into(),
            "node-egress-gw".into(),
            "node-ingress-gw".into(),
        ],
        pods: vec![
            trainer,
            PodDef::new("scraper-0", "untrusted", "scraper", "node-a"),
            PodDef::new("legacy-etl-0", "legacy", "etl", "node-a"),
            feature_store,
            PodDef::new("model-server-0", "inference", "model-server", "node-b"),
            PodDef::new("legacy-db-0", "legacy", "db", "node-b"),
            // The gateways of examples/genai/gateways.yaml, each alone on its node.
            PodDef::gateway(
                "egress-gateway-0",
                "membrane-system",
                "egress-gateway",
                "node-egress-gw",
                "egress",
                "egress",
            ),
            PodDef::gateway(
                "ingress-gateway-0",
                "inference",
                "ingress-gateway",
                "node-ingress-gw",
                "ingress",
                "ingress",
            ),
        ],
        mesh_namespaces: vec![
            "training".into(),
            "data".into(),
            "inference".into(),
            "untrusted".into(),
        ],
        policies: POLICIES.to_owned(),
        cert_ttl: Some(CERT_TTL),
        // Pods resolve through their ztunnel's capture against the simulated outside world.
        ztunnel_args: vec![
            "--dns-upstream".into(),
            membrane_testbed::world::RESOLVER.to_string(),
        ],
        ..MeshSpec::default()
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
    out.step(
        "A GenAI cluster on this host: two nodes, pods as network namespaces, one ztunnel per node",
    );
    let mut mesh = Mesh::start(spec())
        .await
        .context("building the mesh (needs root, iproute2 and nftables)")?;
    let world = World::start(&mut mesh.testbed).context("starting the simulated outside world")?;
    let in_mesh = [
        "trainer-0",
        "scraper-0",
        "feature-store-0",
        "model-server-0",
    ];
    for pod in in_mesh {
        mesh.enroll(pod).await?;
    }
    let pods: Vec<String> = mesh
        .pods()
        .iter()
        .map(|p| {
            let identity = if in_mesh.contains(&p.name.as_str()) {
                mesh.spiffe_id(&p.name)
            } else if let Some(kind) = &p.gateway {
                format!("{kind} gateway, {}", mesh.spiffe_id(&p.name))
            } else {
                "not in the mesh".into()
            };
            format!(
                "{}/{} on {} at {} — {identity}",
                p.namespace,
                p.name,
                p.node,
                mesh.ip(&p.name)
            )
        })
        .collect();
    out.say(
        true,
        "namespaces data, training, inference and untrusted are in the mesh (captured, with identities); legacy is not",
        json!({
            "pods": pods,
            "policies": "data/feature-store-readers: only the trainer reads features; inference/deny-untrusted: nothing from untrusted",
            "certificate lifetime": humantime::format_duration(CERT_TTL).to_string(),
            "workDir": mesh.dir.path().display().to_string(),
        }),
    );

    out.step("trainer → feature store through the mesh, capturing the link between the nodes");
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
        .await
        .unwrap_or_default();
    out.say(
        got == MARKER && !wire.contains(MARKER) && wire.packets > 0,
        "allowed by identity; the application received the data, the wire between the nodes never showed it",
        json!({
            "allowed": got == MARKER,
            "reply": String::from_utf8_lossy(&reply),
            "packetsCaptured": wire.packets,
            "markerOnWire": wire.contains(MARKER),
            "caller seen by the feature store": inbound["src_identity"],
            "deciding policy": inbound["authorization"]["policy"],
        }),
    );

    out.step("the same data between two pods outside the mesh, for contrast");
    let db = SocketAddr::new(mesh.ip("legacy-db-0"), PORT);
    let capture = Capture::start_any(mesh.testbed.fabric().netns_path())?;
    let server = serve_once(&mesh, "legacy-db-0", b"ok")?;
    call(&mesh, "legacy-etl-0", db, MARKER).await?;
    server.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wire = capture.stop();
    out.say(
        wire.contains(MARKER),
        "without the mesh, anyone on the link reads it",
        json!({"markerOnWire": wire.contains(MARKER)}),
    );

    out.step("untrusted scraper → model server: it has an identity, and that identity is denied");
    let model = SocketAddr::new(mesh.ip("model-server-0"), PORT);
    let accepted = mesh.echo_app("model-server-0", PORT)?;
    let result = call(&mesh, "scraper-0", model, b"GET /v1/weights").await;
    let denial = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["authorization"]["verdict"] == "deny",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
    let denied = result.is_err() && accepted.load(std::sync::atomic::Ordering::SeqCst) == 0;
    out.say(
        denied && denial["authorization"]["policy"] == "inference/deny-untrusted",
        "denied at the model server's node (HTTP 403 between the ztunnels); nothing reached the application",
        json!({
            "denied": denied,
            "caller": denial["src_identity"],
            "policy": denial["authorization"]["policy"],
            "appConnections": accepted.load(std::sync::atomic::Ordering::SeqCst),
        }),
    );

    out.step("a pod outside the mesh → feature store: no identity at all, refused");
    let _server = serve_once(&mesh, "feature-store-0", b"you should not see this")?;
    let result = call(&mesh, "legacy-etl-0", store, b"GET /features").await;
    let refusal = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["result"] == "refused" && r["transport"] == "plaintext",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
    out.say(
        result.is_err(),
        "plaintext callers are refused by default (zero trust)",
        json!({
            "refused": result.is_err(),
            "ztunnel access record": refusal["reason"],
        }),
    );

    out.step("a policy edit reaches a live connection: the model server is locked down");
    let mut live = mesh.connect_from("trainer-0", model).await?;
    membrane_testbed::mesh::ping(&mut live).await?;
    let edited = std::time::Instant::now();
    mesh.set_policies(&format!("{POLICIES}{LOCKDOWN}"))?;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), live.read(&mut buf)).await;
    let took = edited.elapsed();
    let closed_ok = matches!(closed, Ok(Ok(0) | Err(_)));
    let after = call(&mesh, "trainer-0", model, b"ping").await;
    out.say(
        closed_ok && after.is_err(),
        "the trainer's open connection to the model server was closed when the policy changed; new ones are denied",
        json!({
            "liveConnectionClosed": closed_ok,
            "closedAfterMs": u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "policy added": "inference/model-server-lockdown (only the inference namespace)",
            "newConnectionDenied": after.is_err(),
        }),
    );

    out.step("certificates rotate under a running transfer");
    let trainer_id = mesh.spiffe_id("trainer-0");
    let store_id = mesh.spiffe_id("feature-store-0");
    let before = (
        mesh.ztunnels["node-a"].renewals(Some(&trainer_id)).len(),
        mesh.ztunnels["node-b"].renewals(Some(&store_id)).len(),
    );
    let echo = mesh.echo_app("feature-store-0", PORT + 1)?;
    let stream = mesh
        .connect_from(
            "trainer-0",
            SocketAddr::new(mesh.ip("feature-store-0"), PORT + 1),
        )
        .await?;
    let (sent, received) = transfer(stream, Duration::from_secs(7)).await?;
    let after = (
        mesh.ztunnels["node-a"].renewals(Some(&trainer_id)),
        mesh.ztunnels["node-b"].renewals(Some(&store_id)),
    );
    let rotated = (after.0.len() - before.0, after.1.len() - before.1);
    out.say(
        sent == received && rotated.0 >= 2 && rotated.1 >= 2 && echo.load(std::sync::atomic::Ordering::SeqCst) == 1,
        "both ends renewed their certificates during the transfer (new keys, new serials); the tunnel carried every byte without a reset",
        json!({
            "renewals": {"trainer": rotated.0, "feature-store": rotated.1},
            "latest serials": {"trainer": after.0.last(), "feature-store": after.1.last()},
            "bytesSent": sent,
            "bytesIntact": sent == received,
            "root rotation": "membrane-ca rotate-root --state-dir DIR (see the README)",
        }),
    );
    crate::dataplane_egress::tour(out, &mesh, &world).await?;
    crate::dataplane_ingress::tour(out, &mesh, &world).await
}

/// Streams pattern bytes through `stream` (an echo) for `duration`, checking every byte that
/// comes back; returns (sent, received intact).
async fn transfer(stream: tokio::net::TcpStream, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let (mut rx, mut tx) = stream.into_split();
    let writer = tokio::spawn(async move {
        let (mut pattern, mut buf, mut sent) = (
            membrane_testbed::Pattern(0xfeed_beef),
            vec![0u8; 16 * 1024],
            0u64,
        );
        let end = std::time::Instant::now() + duration;
        while std::time::Instant::now() < end {
            pattern.fill(&mut buf);
            tx.write_all(&buf).await?;
            sent += buf.len() as u64;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.shutdown().await?;
        anyhow::Ok(sent)
    });
    let (mut pattern, mut want, mut got, mut total) = (
        membrane_testbed::Pattern(0xfeed_beef),
        vec![0u8; 16 * 1024],
        vec![0u8; 16 * 1024],
        0u64,
    );
    loop {
        pattern.fill(&mut want);
        match tokio::time::timeout(Duration::from_secs(10), rx.read_exact(&mut got)).await? {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(got == want, "corrupted after {total} bytes");
        total += got.len() as u64;
    }
    Ok((writer.await??, total))
}
