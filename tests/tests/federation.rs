//! SPIFFE Federation between controllers over real TLS on loopback: a controller serves its
//! bundle at its bundle endpoint, another follows it through a `TrustFederation` manifest and
//! streams the roots to its nodes; a failing, lying or replaying endpoint leaves the last
//! good bundle in force, and its age is reported.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use membrane_proto::v1 as pb;
use membrane_tests::{MESH_MANIFESTS, OfflineCa, TestCa, node_token};

const B: &str = "cluster-b.example";
const C: &str = "cluster-c.example";
const D: &str = "cluster-d.example";

fn federation(name: &str, td: &str, url: &str, bootstrap_pem: &str) -> String {
    let indented: String = bootstrap_pem
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "---\napiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  bundleEndpoint:\n    url: {url}\n    spiffeId: spiffe://{td}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}"
    )
}

/// Controller A (trust domain `cluster-a.example`) with the mesh manifests and the
/// `TrustFederation` document `federation`, and node-a's discovery stream from it.
async fn federated_controller(
    federation: &str,
) -> anyhow::Result<(TestCa, tonic::Streaming<pb::Update>)> {
    let a = TestCa::builder()
        .trust_domain("cluster-a.example")
        .nodes(&["node-a".to_owned()])
        .manifest("mesh.yaml", MESH_MANIFESTS)
        .manifest("federation.yaml", federation)
        .start()
        .await?;
    let mut client = a.client(&node_token("node-a")).await?;
    let stream = client.watch("node-a").await?;
    Ok((a, stream))
}

/// The roots (DER) node-a is told to trust for `td`, once its stream carries them.
async fn federated_roots(
    stream: &mut tonic::Streaming<pb::Update>,
    held: &mut std::collections::BTreeMap<String, Vec<Vec<u8>>>,
    td: &str,
    want: impl Fn(Option<&Vec<Vec<u8>>>) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !want(held.get(td)) {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "node-a's stream never carried the expected roots of {td}"
        );
        let update = tokio::time::timeout(left, stream.message())
            .await
            .context("no update in time")??
            .context("stream ended")?;
        if update.snapshot {
            held.clear();
        }
        for r in &update.upserts {
            if let Some(pb::resource::Kind::FederatedBundle(b)) = &r.kind {
                held.insert(b.trust_domain.clone(), b.roots_der.clone());
            }
        }
        for k in &update.removals {
            if k.kind == pb::resource_key::Kind::FederatedBundle as i32 {
                held.remove(&k.name);
            }
        }
    }
    Ok(())
}

/// Waits until the controller's metrics hold a line containing every part of `parts`.
async fn metric(ca: &TestCa, parts: &[&str]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = ca.metrics().await?;
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return Ok(line.to_owned());
        }
        ensure!(
            Instant::now() < deadline,
            "no metric line with {parts:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_bundle_is_fetched_from_its_endpoint_and_streamed_to_the_nodes() -> anyhow::Result<()>
{
    let b = TestCa::builder()
        .trust_domain(B)
        .bundle_endpoint(Duration::from_secs(1))
        .start()
        .await?;
    let endpoint = b.bundle_endpoint_addr().context("B serves its bundle")?;
    let (a, mut stream) = federated_controller(&federation(
        "cluster-b",
        B,
        &format!("https://{endpoint}/"),
        &b.root_pem(),
    ))
    .await?;
    let mut held = Default::default();
    let b_roots: Vec<Vec<u8>> = membrane_tests::pem_certificates(&b.root_pem());
    federated_roots(&mut stream, &mut held, B, |r| r == Some(&b_roots)).await?;
    metric(&a, &["federated_bundle_fetches_total", B, "result=\"ok\""]).await?;
    metric(&a, &["federated_bundle_sequence", B]).await?;

    // B goes away: A keeps B's bundle, says why, and its age grows.
    drop(b.stop().await);
    metric(
        &a,
        &["federated_bundle_fetches_total", B, "result=\"connect\""],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let age = metric(&a, &["federated_bundle_age_seconds", B]).await?;
    let secs: f64 = age.rsplit(' ').next().unwrap_or("0").parse()?;
    ensure!(secs >= 2.0, "the bundle's age is not growing: {age}");
    let roots = a.federated_roots("node-a", B).await?;
    ensure!(roots == b_roots, "B's last good bundle was dropped");

    // The federation removed: B is no longer trusted.
    std::fs::remove_file(a.manifests_dir().join("federation.yaml"))?;
    federated_roots(&mut stream, &mut held, B, |r| r.is_none()).await?;
    Ok(())
}

/// A bundle endpoint run by the test, with an SVID of `spiffe://cluster-c.example/...` from
/// `ca`, serving whatever document the test sets.
struct FakeEndpoint {
    addr: std::net::SocketAddr,
    document: Arc<Mutex<String>>,
    certificate: Arc<Fixed>,
    cancel: tokio_util::sync::CancellationToken,
}

impl FakeEndpoint {
    async fn start(ca: &OfflineCa) -> anyhow::Result<Self> {
        let certificate = Arc::new(Fixed(Mutex::new(endpoint_key(ca)?)));
        let mut tls =
            rustls::ServerConfig::builder_with_provider(membrane_identity::crypto_provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(certificate.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let document = Arc::new(Mutex::new(String::new()));
        let cancel = tokio_util::sync::CancellationToken::new();
        let (doc, stop) = (document.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                };
                let (acceptor, doc, stop) = (acceptor.clone(), doc.clone(), stop.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let route: membrane_runtime::Route = Arc::new(move |_: &str| {
                        membrane_runtime::Reply::ok(
                            "application/json",
                            membrane_runtime::lock(&doc).clone(),
                        )
                    });
                    let server = membrane_runtime::HttpServer::new(
                        "fake-bundle-endpoint",
                        membrane_runtime::listener::ListenerMetrics::default(),
                    );
                    server
                        .serve(peer, tls, route, Default::default(), stop)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            document,
            certificate,
            cancel,
        })
    }

    fn serve(&self, document: String) {
        *membrane_runtime::lock(&self.document) = document;
    }

    /// Presents an SVID issued by `ca` from now on.
    fn reissue(&self, ca: &OfflineCa) -> anyhow::Result<()> {
        *membrane_runtime::lock(&self.certificate.0) = endpoint_key(ca)?;
        Ok(())
    }
}

fn endpoint_key(ca: &OfflineCa) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    let svid = ca.svid(
        &format!("spiffe://{C}/ns/membrane-system/sa/membrane-ca"),
        &[],
    )?;
    Ok(svid.certified_key())
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Debug)]
struct Fixed(Mutex<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(membrane_runtime::lock(&self.0).clone())
    }
}

fn document(roots: &[&OfflineCa], sequence: u64) -> anyhow::Result<String> {
    let td = membrane_identity::spiffe_id::parse_trust_domain(C)?;
    let bundle = membrane_identity::TrustBundle::new(td, roots.iter().map(|r| r.der().clone()))?;
    let (json, skipped) =
        membrane_identity::federation::bundle_document(&bundle, sequence, Duration::from_secs(1));
    ensure!(skipped.is_empty(), "{skipped:?}");
    Ok(json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_older_bundle_is_rejected_whole_and_the_last_good_one_stays() -> anyhow::Result<()>
{
    let (root_c, next_c) = (OfflineCa::root("C root")?, OfflineCa::root("C next root")?);
    let fake = FakeEndpoint::start(&root_c).await?;
    fake.serve(document(&[&root_c, &next_c], 10)?);
    let (a, mut stream) = federated_controller(&federation(
        "cluster-c",
        C,
        &format!("https://{}/", fake.addr),
        &root_c.pem(),
    ))
    .await?;
    let mut held = Default::default();
    let both = {
        let mut r = vec![root_c.der().to_vec(), next_c.der().to_vec()];
        r.sort();
        r
    };
    // The fetched two-root bundle replaces the one-root bootstrap.
    federated_roots(&mut stream, &mut held, C, |r| r == Some(&both)).await?;

    // Garbage, a root that is not a CA, a replayed older sequence: each refused whole.
    fake.serve("{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"not base64!\"]}]}".into());
    metric(
        &a,
        &["federated_bundle_fetches_total", C, "result=\"document\""],
    )
    .await?;
    fake.serve(document(&[&root_c], 5)?);
    metric(
        &a,
        &["federated_bundle_fetches_total", C, "result=\"rollback\""],
    )
    .await?;
    let now = a.federated_roots("node-a", C).await?;
    ensure!(
        now == both,
        "a rejected document changed the bundle: {now:?}"
    );

    // The peer rotates its root: the endpoint's certificate now comes from the next root
    // only, and so does the bundle. A verifies the endpoint with the bundle it last fetched
    // (which holds the next root), not the bootstrap one, and follows.
    fake.reissue(&next_c)?;
    fake.serve(document(&[&next_c], 11)?);
    let only_next = vec![next_c.der().to_vec()];
    federated_roots(&mut stream, &mut held, C, |r| r == Some(&only_next)).await?;

    // An endpoint vouched for by a root A does not hold is refused by TLS; the bundle stays.
    let stranger = OfflineCa::root("stranger")?;
    fake.reissue(&stranger)?;
    fake.serve(document(&[&stranger], 12)?);
    metric(&a, &["federated_bundle_fetches_total", C, "result=\"tls\""]).await?;
    let now = a.federated_roots("node-a", C).await?;
    ensure!(
        now == only_next,
        "an unverified endpoint changed the bundle: {now:?}"
    );

    // An edit that changes only what is imported (here an east-west gateway) keeps the
    // bundle fetched last — not the bootstrap one — although the endpoint cannot be verified
    // now. A second federation (D) in the same edit shows when the controller has applied it.
    let root_d = OfflineCa::root("D root")?;
    let gateway = "  eastWestGateway:\n    address: 192.0.2.20\n    spiffeId: spiffe://cluster-c.example/ns/gw/sa/east-west\n";
    let edited = federation(
        "cluster-c",
        C,
        &format!("https://{}/", fake.addr),
        &root_c.pem(),
    ) + gateway
        + &federation("cluster-d", D, "https://192.0.2.1:9/", &root_d.pem());
    a.write_manifest("federation.yaml", &edited)?;
    let only_d = vec![root_d.der().to_vec()];
    federated_roots(&mut stream, &mut held, D, |r| r == Some(&only_d)).await?;
    let now = a.federated_roots("node-a", C).await?;
    ensure!(
        now == only_next,
        "editing the import settings reset the bundle: {now:?}"
    );

    // A document in the shape SPIRE's bundle endpoint serves (EC and RSA roots, a JWT key
    // beside them) is accepted: its X.509 roots become C's bundle, the JWT key is ignored.
    fake.reissue(&next_c)?;
    let (spire, mut spire_roots) = spire_document(&next_c)?;
    fake.serve(spire);
    spire_roots.sort();
    federated_roots(&mut stream, &mut held, C, |r| r == Some(&spire_roots)).await?;
    Ok(())
}

/// SPIRE's bundle format (identity/tests/fixtures/spire-bundle.json: sequence 42) with
/// `root` added as one more X.509 key; and every X.509 root it holds (DER).
fn spire_document(root: &OfflineCa) -> anyhow::Result<(String, Vec<Vec<u8>>)> {
    use base64::Engine;
    let mut doc: serde_json::Value = serde_json::from_str(include_str!(
        "../../identity/tests/fixtures/spire-bundle.json"
    ))?;
    let ours: serde_json::Value = serde_json::from_str(&document(&[root], 0)?)?;
    let keys = doc["keys"].as_array_mut().context("fixture keys")?;
    keys.push(ours["keys"][0].clone());
    let roots = keys
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| {
            let b64 = k["x5c"][0].as_str().context("x5c")?;
            Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((doc.to_string(), roots))
}

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
    let first = loop {
        match watch_exports(exports, &b.root_pem(), &x, &controller).await {
            Ok(first) => break first,
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
/// verifying the server against `root_pem`; the first message, or why there was none.
async fn watch_exports(
    addr: std::net::SocketAddr,
    root_pem: &str,
    ca: &OfflineCa,
    id: &str,
) -> anyhow::Result<pb::Exports> {
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
    Ok(first)
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
