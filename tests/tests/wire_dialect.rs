//! How Membrane speaks HBONE where dialects differ, end to end between real ztunnel
//! processes: denials answered 401 (`--deny-status 401`, as Istio's ztunnel does), `baggage`
//! naming the source for the destination's telemetry, post-quantum key exchange required
//! (`--tls-kx pq-only`), and a pod of another data plane declared an HBONE peer
//! (`membrane.dev/mesh: hbone-peer`) tunnelled to, while an undeclared pod outside the mesh
//! is not.
//!
//! The declared peer and the undeclared pod run an HBONE server of their own on 15008 that
//! records every CONNECT; its certificate comes from the operator CA the controller signs
//! with (a plug-in root), as a second data plane sharing the root would hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_identity::verify::mtls_server_config;
use membrane_identity::{KeyExchange, PeerCheck, SharedTrustBundle, WorkloadSvid};
use membrane_tests::OfflineCa;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, socket_in_netns};
use membrane_tests::{identity, trust_domain};
use membrane_ztunnel::hbone::{
    self, Accepted, ConnectFuture, ConnectHandler, ConnectHeaders, ConnectRefusal, ConnectRequest,
    HboneError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const PEER_ID: &str = "spiffe://cluster.local/ns/ambient/sa/istio-app";
const LEGACY_ID: &str = "spiffe://cluster.local/ns/legacy/sa/legacy";

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: model-allow-trainer, namespace: inference}
spec:
  selector: {matchLabels: {app: model}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/training/sa/trainer"]}
"#;

/// Writes `ca` as an operator CA directory (plug-in layout) and returns its path.
fn plugin_dir(ca: &OfflineCa, dir: &tempfile::TempDir) -> anyhow::Result<PathBuf> {
    let path = dir.path().join("plugin");
    std::fs::create_dir_all(&path)?;
    std::fs::write(path.join("ca-cert.pem"), ca.pem())?;
    std::fs::write(path.join("root-cert.pem"), ca.pem())?;
    std::fs::write(path.join("ca-key.pem"), ca.key_pem())?;
    Ok(path)
}

/// Records every CONNECT and forwards it to the application on loopback inside its pod.
struct Recorder {
    netns: PathBuf,
    seen: Mutex<Vec<ConnectRequest>>,
}

impl ConnectHandler for Recorder {
    type Admission = ();
    type App = tokio::net::TcpStream;

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, ()> {
        Box::pin(async move {
            lock(&self.seen).push(req);
            let socket = socket_in_netns(self.netns.clone())
                .map_err(|e| ConnectRefusal::Unreachable(e.to_string()))?;
            socket
                .connect(SocketAddr::from(([127, 0, 0, 1], APP_PORT)))
                .await
                .map(Accepted::from)
                .map_err(|e| ConnectRefusal::Unreachable(e.to_string()))
        })
    }
}

/// An HBONE server on `<pod ip>:15008` inside pod `name`, presenting `svid`.
fn hbone_server(
    mesh: &Mesh,
    name: &str,
    svid: &WorkloadSvid,
    bundle: SharedTrustBundle,
) -> anyhow::Result<Arc<Recorder>> {
    let mut tls = mtls_server_config(
        svid,
        bundle,
        PeerCheck::TrustDomain(trust_domain()),
        membrane_identity::crypto_provider(),
    )?;
    tls.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
    let tls = Arc::new(tls);
    let socket = mesh.socket_in(name)?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(mesh.ip(name), hbone::HBONE_PORT))?;
    let listener = socket.listen(64)?;
    let recorder = Arc::new(Recorder {
        netns: mesh.netns_path(name),
        seen: Mutex::default(),
    });
    let handler = recorder.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(hbone::serve_connection(tcp, tls.clone(), handler.clone()));
        }
    });
    Ok(recorder)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends a line from pod `from` to `dst` and expects it echoed.
async fn echoes(mesh: &Mesh, from: &str, dst: SocketAddr) -> anyhow::Result<()> {
    let mut s = mesh.connect_from(from, dst).await?;
    s.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await??;
    anyhow::ensure!(&buf == b"ping\n", "echo from {dst} was {buf:?}");
    Ok(())
}

/// The status an HBONE CONNECT from pod `from` presenting `svid` to `to`'s ztunnel gets, with
/// key exchange `kx`, verifying it against the mesh's bundle; the authority is `to`'s application address, or `host`:8080 (Istio's
/// hostname form) when given.
#[allow(clippy::too_many_arguments)]
async fn connect_as(
    mesh: &Mesh,
    from: &str,
    svid: &WorkloadSvid,
    to: &str,
    to_id: &str,
    kx: KeyExchange,
    host: Option<&str>,
) -> Result<(), HboneError> {
    let (dst, headers) = match host {
        Some(host) => (
            SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
            ConnectHeaders {
                host: Some(host.to_owned()),
                ..ConnectHeaders::default()
            },
        ),
        None => (
            SocketAddr::new(mesh.ip(to), APP_PORT),
            ConnectHeaders::default(),
        ),
    };
    membrane_tests::hbone::connect_as(
        mesh,
        from,
        svid,
        membrane_tests::hbone::mesh_bundle(mesh).expect("the mesh's bundle"),
        &to_id.parse().expect("id"),
        mesh.ip(to),
        Arc::new(kx.provider()),
        dst,
        headers,
    )
    .await
    .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn istio_dialect_and_declared_hbone_peers() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let keep = tempfile::tempdir()?;
    let operator_ca = OfflineCa::root("operator")?;
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("model", "inference", "model-server", "node-b"),
            PodDef::new("istio-app", "ambient", "istio-app", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-b"),
        ],
        &["training", "inference"],
    );
    spec.hbone_peer_namespaces = vec!["ambient".into()];
    spec.plugin_ca = Some(plugin_dir(&operator_ca, &keep)?);
    spec.policies = POLICY.into();
    spec.ztunnel_args = [
        "--deny-status",
        "401",
        "--cluster-name",
        "gpu-east",
        "--tls-kx",
        "pq-only",
    ]
    .map(String::from)
    .to_vec();
    let mesh = Mesh::start(spec).await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("model").await?;
    for pod in ["model", "istio-app", "legacy"] {
        mesh.echo_app(pod, APP_PORT)?;
    }
    let bundle = membrane_tests::hbone::mesh_bundle(&mesh)?;
    let peer_svid = operator_ca.svid(PEER_ID, &[])?;
    let peer = hbone_server(&mesh, "istio-app", &peer_svid, bundle.clone())?;
    let legacy_svid = operator_ca.svid(LEGACY_ID, &[])?;
    let legacy = hbone_server(&mesh, "legacy", &legacy_svid, bundle.clone())?;

    // The mesh works with post-quantum key exchange required on every tunnel.
    let model = SocketAddr::new(mesh.ip("model"), APP_PORT);
    membrane_tests::kube::until("trainer reaches model", Duration::from_secs(20), || async {
        echoes(&mesh, "trainer", model).await.map(|()| true)
    })
    .await?;

    // A declared HBONE peer is tunnelled to, with the trainer's identity and baggage.
    let peer_app = SocketAddr::new(mesh.ip("istio-app"), APP_PORT);
    echoes(&mesh, "trainer", peer_app).await?;
    let seen = lock(&peer.seen).clone();
    assert_eq!(
        seen.len(),
        1,
        "one CONNECT reached the declared peer: {seen:?}"
    );
    let connect = &seen[0];
    assert_eq!(
        connect.peer.to_string(),
        identity("training", "trainer").to_string()
    );
    assert_eq!(connect.authority, peer_app);
    assert_eq!(connect.forwarded_for, Some(mesh.ip("trainer")));
    assert_eq!(
        connect.baggage.as_deref(),
        Some(
            "k8s.cluster.name=gpu-east,k8s.namespace.name=training,k8s.pod.name=trainer,\
             service.name=trainer,service.version=latest"
        )
    );

    // An undeclared pod outside the mesh is reached directly: nothing on its 15008.
    echoes(
        &mesh,
        "trainer",
        SocketAddr::new(mesh.ip("legacy"), APP_PORT),
    )
    .await?;
    assert!(
        lock(&legacy.seen).is_empty(),
        "no tunnel to an undeclared pod"
    );

    // The peer as a client: authenticated (same root), denied by policy, answered 401.
    let denied = connect_as(
        &mesh,
        "istio-app",
        &peer_svid,
        "model",
        &mesh.spiffe_id("model"),
        KeyExchange::PqPreferred,
        None,
    )
    .await;
    match denied {
        Err(HboneError::Refused(status)) => assert_eq!(status.as_u16(), 401, "{status}"),
        other => panic!("expected 401, got {other:?}"),
    }
    // Istio's hostname authority is refused with 400: a pod is reached by address.
    let named = connect_as(
        &mesh,
        "istio-app",
        &peer_svid,
        "model",
        &mesh.spiffe_id("model"),
        KeyExchange::PqPreferred,
        Some("model.inference.svc.cluster.local"),
    )
    .await;
    match named {
        Err(HboneError::Refused(status)) => assert_eq!(status.as_u16(), 400, "{status}"),
        other => panic!("expected 400, got {other:?}"),
    }
    // A classical-only client cannot complete a handshake with a pq-only ztunnel.
    let classical = connect_as(
        &mesh,
        "istio-app",
        &peer_svid,
        "model",
        &mesh.spiffe_id("model"),
        KeyExchange::Classical,
        None,
    )
    .await;
    match classical {
        Err(HboneError::Tls(e)) => assert!(
            e.to_string().contains("HandshakeFailure") || e.to_string().contains("handshake"),
            "{e}"
        ),
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    // The declared peer never got an identity from the controller, and the peer's pod is not
    // captured by node-b's ztunnel (it answered on 15008 itself above).
    Ok(())
}
