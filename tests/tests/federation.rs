//! SPIFFE Federation between controllers over real TLS on loopback: a controller serves its
//! bundle at its bundle endpoint, another follows it through a `TrustFederation` manifest and
//! streams the roots to its nodes; a failing, lying or replaying endpoint leaves the last
//! good bundle in force, and its age is reported; a restarted controller resumes with the
//! bundle it fetched last.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use membrane_proto::v1 as pb;
use membrane_tests::{OfflineCa, TestCa};

#[path = "federation/common.rs"]
mod common;
use common::{federated_controller, federation};

const B: &str = "cluster-b.example";
const C: &str = "cluster-c.example";
const D: &str = "cluster-d.example";

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

/// Waits until the counter on the metric line with `parts` is at least `n`.
async fn counter_reaches(ca: &TestCa, parts: &[&str], n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let line = metric(ca, parts).await?;
        let value: f64 = (line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no value in {line}"))?;
        if value >= n as f64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{parts:?} stayed at {value}, below {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
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

    // Garbage; a newer document with a new root beside a damaged key; a newer one whose root
    // is not a CA; a replayed older sequence: each refused whole (the new root is not taken).
    let refused = ["federated_bundle_fetches_total", C, "result=\"document\""];
    fake.serve("{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"not base64!\"]}]}".into());
    counter_reaches(&a, &refused, 1).await?;
    let extra = OfflineCa::root("C extra root")?;
    let mut mixed: serde_json::Value = serde_json::from_str(&document(&[&extra], 20)?)?;
    let damaged = serde_json::json!({"use": "x509-svid", "kty": "EC", "x5c": ["not base64!"]});
    mixed["keys"].as_array_mut().context("keys")?.push(damaged);
    fake.serve(mixed.to_string());
    counter_reaches(&a, &refused, 2).await?;
    let leaf = extra.svid(&format!("spiffe://{C}/ns/a/sa/b"), &[])?;
    let mut not_ca: serde_json::Value = serde_json::from_str(&document(&[&extra], 21)?)?;
    let leaf_b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&leaf.chain()[0])
    };
    not_ca["keys"][0]["x5c"] = serde_json::json!([leaf_b64]);
    fake.serve(not_ca.to_string());
    counter_reaches(&a, &refused, 3).await?;
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

/// The roots a fresh snapshot for node-a holds for `td`, once it holds any.
async fn roots_once_federated(a: &TestCa, td: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let roots = a.federated_roots("node-a", td).await?;
        if !roots.is_empty() {
            return Ok(roots);
        }
        ensure!(Instant::now() < deadline, "{td} never federated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resumes_with_the_bundle_it_last_fetched() -> anyhow::Result<()> {
    let (root_c, next_c) = (OfflineCa::root("C root")?, OfflineCa::root("C next root")?);
    let fake = FakeEndpoint::start(&root_c).await?;
    fake.serve(document(&[&root_c, &next_c], 10)?);
    let url = format!("https://{}/", fake.addr);
    let (mut a, mut stream) =
        federated_controller(&federation("cluster-c", C, &url, &root_c.pem())).await?;
    let mut held = Default::default();
    // C rotates to its next root (bundle and endpoint certificate); A follows.
    fake.reissue(&next_c)?;
    fake.serve(document(&[&next_c], 11)?);
    let only_next = vec![next_c.der().to_vec()];
    federated_roots(&mut stream, &mut held, C, |r| r == Some(&only_next)).await?;
    let saved = a.dir.path().join(format!("state/federation/{C}.json"));
    ensure!(saved.exists(), "no saved bundle at {}", saved.display());

    // C's endpoint becomes unverifiable, and A restarts meanwhile: it resumes with the bundle
    // it fetched last (the bootstrap root alone would no longer verify C's identities).
    let stranger = OfflineCa::root("stranger")?;
    fake.reissue(&stranger)?;
    drop(stream);
    a.pause().await.context("A was running")?;
    a.resume().await?;
    let now = roots_once_federated(&a, C).await?;
    ensure!(
        now == only_next,
        "the restart fell back to the bootstrap bundle: {now:?}"
    );
    metric(&a, &["federated_bundle_fetches_total", C, "result=\"tls\""]).await?;
    let sequence = metric(&a, &["federated_bundle_sequence", C]).await?;
    ensure!(sequence.ends_with(" 11"), "{sequence}");

    // The saved sequence still refuses a replayed older bundle after the restart.
    fake.reissue(&next_c)?;
    fake.serve(document(&[&root_c], 5)?);
    metric(
        &a,
        &["federated_bundle_fetches_total", C, "result=\"rollback\""],
    )
    .await?;
    let now = a.federated_roots("node-a", C).await?;
    ensure!(now == only_next, "a replayed bundle was taken: {now:?}");

    // A damaged record is refused whole: the bootstrap bundle is in force, and it is counted.
    a.pause().await.context("A was running")?;
    std::fs::write(&saved, "{\"format\": 1, \"roots_pem\": \"garbage\"}")?;
    a.resume().await?;
    let now = roots_once_federated(&a, C).await?;
    ensure!(
        now == vec![root_c.der().to_vec()],
        "a damaged record changed the bundle: {now:?}"
    );
    metric(
        &a,
        &["federated_bundle_store_errors_total", C, "op=\"load\""],
    )
    .await?;

    // The operator re-bootstraps the federation while A is down: the saved bundle belongs to
    // other trust settings and is not used.
    let other = OfflineCa::root("C re-bootstrapped")?;
    a.pause().await.context("A was running")?;
    a.write_manifest(
        "federation.yaml",
        &federation("cluster-c", C, &url, &other.pem()),
    )?;
    a.resume().await?;
    let now = roots_once_federated(&a, C).await?;
    ensure!(
        now == vec![other.der().to_vec()],
        "a bundle saved under other trust settings was used: {now:?}"
    );

    // The federation removed: its saved bundle goes too.
    std::fs::remove_file(a.manifests_dir().join("federation.yaml"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while saved.exists() {
        ensure!(
            Instant::now() < deadline,
            "the saved bundle outlived its federation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(a.federated_roots("node-a", C).await?.is_empty());
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
