//! Service export and import between federated controllers over real mutual TLS on
//! loopback: a controller imports what a federated peer exports, with each endpoint's
//! identity, and only federated controllers may watch a controller's exports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use membrane_proto::v1 as pb;
use membrane_tests::{OfflineCa, TestCa};

#[path = "federation/common.rs"]
mod common;
use common::{federated_controller, federation};

const B: &str = "cluster-b.example";

/// Cluster B's inference namespace: the model server (exported) and a pod outside the mesh.
const B_SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: inference, labels: {membrane.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: model-server-0, namespace: inference, labels: {app: model-server}}
spec: {serviceAccountName: model-server, nodeName: node-b}
status: {phase: Running, podIP: 10.20.1.5}
---
apiVersion: v1
kind: Service
metadata: {name: model-server, namespace: inference, labels: {membrane.dev/export: "true"}}
spec:
  clusterIP: 10.96.0.20
  selector: {app: model-server}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: internal, namespace: inference}
spec:
  clusterIP: 10.96.0.21
  selector: {app: model-server}
  ports: [{name: http, port: 9090}]
"#;

/// Node-a's imported workloads and clusterset Services, once its stream carries `want`.
async fn imported(
    stream: &mut tonic::Streaming<pb::Update>,
    held: &mut std::collections::BTreeMap<(i32, String), pb::Resource>,
    want: impl Fn(&std::collections::BTreeMap<(i32, String), pb::Resource>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let imports: std::collections::BTreeMap<_, _> = held
            .iter()
            .filter(|((_, name), _)| {
                name.starts_with("imported/") || name.starts_with("clusterset:")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if want(&imports) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "node-a's stream never carried the expected imports: {imports:?}"
        );
        let update = tokio::time::timeout(left, stream.message())
            .await
            .context("no update in time")??
            .context("stream ended")?;
        if update.snapshot {
            held.clear();
        }
        for k in &update.removals {
            held.remove(&(k.kind, k.name.clone()));
        }
        for r in update.upserts {
            let key = match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => {
                    (pb::resource_key::Kind::Workload as i32, w.uid.clone())
                }
                Some(pb::resource::Kind::Service(s)) if s.clusterset => (
                    pb::resource_key::Kind::Service as i32,
                    format!("clusterset:{}/{}", s.namespace, s.name),
                ),
                _ => continue,
            };
            held.insert(key, r);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_services_are_imported_with_their_identities_and_only_by_federated_controllers()
-> anyhow::Result<()> {
    let b = TestCa::builder()
        .trust_domain(B)
        .bundle_endpoint(Duration::from_secs(1))
        .exports()
        .manifest("inference.yaml", B_SERVICES)
        .start()
        .await?;
    let endpoint = b.bundle_endpoint_addr().context("B serves its bundle")?;
    let exports = b.exports_addr().context("B serves its exports")?;
    let fed = format!(
        "{}  serviceExports:\n    url: https://{exports}\n    addresses: [10.20.0.0/16]\n",
        federation(
            "cluster-b",
            B,
            &format!("https://{endpoint}/"),
            &b.root_pem()
        )
    );
    let (a, mut stream) = federated_controller(&fed).await?;
    // Federation is mutual: B trusts A's controller (A serves no bundle endpoint here, so
    // its root stays B's bootstrap bundle for A).
    std::fs::write(
        b.manifests_dir().join("federation-a.yaml"),
        federation(
            "cluster-a",
            "cluster-a.example",
            "https://127.0.0.1:9/",
            &a.root_pem(),
        ),
    )?;
    let mut held = Default::default();
    // B's exported model server arrives: its pod as a foreign workload of B's trust domain,
    // the Service as a clusterset Service on an address of 240.240.0.0/16; B's unexported
    // Service does not.
    imported(&mut stream, &mut held, |imports| {
        let workload = imports.values().find_map(|r| match &r.kind {
            Some(pb::resource::Kind::Workload(w)) => Some(w),
            _ => None,
        });
        let service = imports.values().find_map(|r| match &r.kind {
            Some(pb::resource::Kind::Service(s)) => Some(s),
            _ => None,
        });
        let (Some(w), Some(s)) = (workload, service) else {
            return false;
        };
        imports.len() == 2
            && w.uid == format!("imported/{B}/inference/model-server-0")
            && w.trust_domain == B
            && w.foreign
            && w.service_account == "model-server"
            && w.ips == ["10.20.1.5"]
            && s.name == "model-server"
            && s.vips.len() == 1
            && s.vips[0].starts_with("240.240.")
            && s.ports.iter().map(|p| p.port).collect::<Vec<_>>() == [8080]
            && s.endpoints
                .iter()
                .map(|e| e.ip.as_str())
                .collect::<Vec<_>>()
                == ["10.20.1.5"]
    })
    .await?;

    // B starts a root rotation: its bundle gains a root and A's follower fetches it. An added
    // root cannot weaken the verified import stream, so it stays open (only a root it was
    // verified against leaving would end it: `importer::tests`).
    membrane_ca::rotation::request(
        &b.dir.path().join("state"),
        &membrane_identity::spiffe_id::parse_trust_domain(B)?,
        Duration::from_secs(3600),
    )?;
    let open = membrane_tests::metric_sum(
        &a.metrics().await?,
        "membrane_ca_federated_import_streams_open",
        &[&format!("trust_domain=\"{B}\"")],
    );
    ensure!(open == 1.0, "A's import stream is not counted open: {open}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.federated_roots("node-a", B).await?.len() != 2 {
        ensure!(
            Instant::now() < deadline,
            "A never held B's bundle with the new root"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (The first streams failed while B did not federate A yet: `reason="error"`.)
    let bundle_changed = format!(
        "membrane_ca_federated_import_stream_ends_total{{trust_domain=\"{B}\",reason=\"bundle_changed\"}}"
    );
    let metrics = a.metrics().await?;
    ensure!(
        !metrics.lines().any(|l| l.starts_with(&bundle_changed)),
        "A's import stream ended on an added root:\n{metrics}"
    );

    // B stops exporting the Service: A withdraws it.
    std::fs::write(
        b.manifests_dir().join("inference.yaml"),
        B_SERVICES.replace("labels: {membrane.dev/export: \"true\"}", "labels: {}"),
    )?;
    imported(&mut stream, &mut held, |imports| imports.is_empty()).await?;

    // Only a federated trust domain's controller may watch B's exports. B federates with X
    // (its endpoint unreachable: the bootstrap bundle stays in force).
    let x = OfflineCa::root("cluster X")?;
    const X: &str = "cluster-x.example";
    std::fs::write(
        b.manifests_dir().join("federation-x.yaml"),
        federation("cluster-x", X, "https://127.0.0.1:9/", &x.pem()),
    )?;
    let controller = format!("spiffe://{X}/ns/membrane-system/sa/membrane-ca");
    let deadline = Instant::now() + Duration::from_secs(15);
    let (first, mut x_stream) = loop {
        match watch_exports(exports, &b.root_pem(), &x, &controller).await {
            Ok(watching) => break watching,
            Err(e) if Instant::now() < deadline => {
                tracing_hint(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("X's controller never got B's exports")),
        }
    };
    ensure!(first.trust_domain == B, "exports of {}", first.trust_domain);
    // X's workloads are trusted by the handshake but are not controllers.
    let workload = format!("spiffe://{X}/ns/default/sa/app");
    let refused = watch_exports(exports, &b.root_pem(), &x, &workload).await;
    let message = format!(
        "{:?}",
        refused
            .err()
            .context("a workload of X watched B's exports")?
    );
    ensure!(message.contains("not a controller"), "{message}");
    // B replaces X's root (a compromise: X's trust domain stays federated under a new
    // bootstrap bundle): the stream X opened under the old root ends, unauthenticated.
    let x_rotated = OfflineCa::root("cluster X, rotated")?;
    std::fs::write(
        b.manifests_dir().join("federation-x.yaml"),
        federation("cluster-x", X, "https://127.0.0.1:9/", &x_rotated.pem()),
    )?;
    let ended = tokio::time::timeout(Duration::from_secs(10), x_stream.message())
        .await
        .context("X's stream stayed open under a root B no longer trusts")?;
    let status = ended
        .err()
        .context("X's stream ended without a status, or sent exports")?;
    ensure!(
        status.code() == tonic::Code::Unauthenticated,
        "X's stream ended with {status:?}"
    );
    // Under its new root X's controller watches again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match watch_exports(exports, &b.root_pem(), &x_rotated, &controller).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing_hint(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("X's controller under its new root")),
        }
    }
    // An unfederated trust domain's controller is refused in the handshake.
    let stranger = OfflineCa::root("stranger")?;
    let refused = watch_exports(
        exports,
        &b.root_pem(),
        &stranger,
        "spiffe://cluster-y.example/ns/membrane-system/sa/membrane-ca",
    )
    .await;
    ensure!(
        refused.is_err(),
        "a controller of an unfederated trust domain watched B's exports"
    );
    drop(a);
    Ok(())
}

/// Keeps the last error of a retried step visible when the test fails elsewhere.
fn tracing_hint(e: &anyhow::Error) {
    eprintln!("retrying: {e:#}");
}

/// Watches the exports at `addr` presenting an SVID of `id` issued by `ca`,
/// verifying the server against `root_pem`; the first message and the stream, or why there
/// was none.
async fn watch_exports(
    addr: std::net::SocketAddr,
    root_pem: &str,
    ca: &OfflineCa,
    id: &str,
) -> anyhow::Result<(pb::Exports, tonic::Streaming<pb::Exports>)> {
    let svid = ca.svid(id, &[])?;
    let roots = membrane_tests::pem_certificates(root_pem);
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(rustls_pki_types::CertificateDer::from(r))?;
    }
    // The test checks only the client side's refusal; the server is verified by its root.
    let mut tls = rustls::ClientConfig::builder_with_provider(membrane_identity::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_client_cert_resolver(Arc::new(Client(svid.certified_key())));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1")
                    .map_err(std::io::Error::other)?;
                let s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    let mut client = pb::service_exports_client::ServiceExportsClient::new(channel);
    let mut stream = client.watch(pb::ExportsRequest {}).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .context("no exports")?;
    Ok((first, stream))
}

#[derive(Debug)]
struct Client(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Client {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
