//! `membrane demo`: the identity layer of the mesh, narrated.
//!
//! It starts the real controller on loopback against the GenAI example manifests (embedded in
//! the binary, so it runs from anywhere), plays two node agents asking for identities — some
//! granted, some refused and why — then opens a mutual-TLS connection between the trainer and
//! the feature store with those identities, and shows an impostor with a certificate from
//! another CA being turned away. Everything lives in a temporary directory that is removed at
//! the end, on error, or on Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use membrane_ca::app::{self, AppConfig, Running};
use membrane_ca::client::{CaClient, ClientError};
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{
    PeerCheck, SharedTrustBundle, TrustBundle, WorkloadIdentity, WorkloadSvid,
};
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::narrator::Narrator;

const MANIFESTS: &str = include_str!("../../examples/genai/mesh.yaml");

fn random_token() -> String {
    let bytes: [u8; 18] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs the demo; Ctrl-C stops it early and still cleans up.
pub async fn run(json: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("membrane-demo-")
        .tempdir()?;
    let tokens = [("node-a", random_token()), ("node-b", random_token())];
    std::fs::create_dir_all(dir.path().join("manifests"))?;
    std::fs::write(dir.path().join("manifests/mesh.yaml"), MANIFESTS)?;
    let token_file: String = tokens.iter().map(|(n, t)| format!("{n} {t}\n")).collect();
    std::fs::write(dir.path().join("tokens"), token_file)?;

    let loopback = "127.0.0.1:0".parse()?;
    let config = AppConfig {
        trust_domain: parse_trust_domain("cluster.local")?,
        state_dir: dir.path().join("state"),
        plugin_ca_dir: None,
        root_ttl: Duration::from_secs(24 * 3600),
        source_dir: dir.path().join("manifests"),
        reload_interval: Duration::from_millis(200),
        tokens_file: dir.path().join("tokens"),
        listen: loopback,
        metrics_listen: loopback,
        server_names: Vec::new(),
        serving_cert_ttl: Duration::from_secs(3600),
        rotation_grace: Duration::from_secs(1),
        rotation_ack_timeout: Duration::from_secs(600),
        root_namespace: membrane_policy::DEFAULT_ROOT_NAMESPACE.to_owned(),
        // The example pods' network (examples/genai/mesh.yaml), as an operator would set it.
        pod_networks: vec![
            "10.77.0.0/16"
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
        ],
        federation: Default::default(),
        signer: membrane_ca::SignerConfig {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            ..membrane_ca::SignerConfig::default()
        },
        listeners: Default::default(),
    };
    let mut out = Narrator::new(json);
    let running = app::start(config)
        .await
        .context("starting the controller")?;
    let result = tokio::select! {
        r = tour(&mut out, &running, &tokens) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    running.shutdown().await;
    // The data plane needs network namespaces: root only.
    let result = match result {
        Ok(()) if membrane_testbed::is_root() => tokio::select! {
            r = crate::dataplane::tour(&mut out) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Ok(()) => {
            out.step("The data plane");
            out.say(
                true,
                "skipped: creating network namespaces needs root (run the demo as root)",
                json!({}),
            );
            Ok(())
        }
        Err(e) => Err(e),
    };
    let path = dir.path().to_owned();
    drop(dir);
    out.step("Clean up");
    out.say(
        !path.exists(),
        "controllers and ztunnels stopped; namespaces, rules, keys and manifests are deleted",
        json!({"removed": path.display().to_string()}),
    );
    result
}

async fn tour(
    out: &mut Narrator,
    ca: &Running,
    tokens: &[(&str, String); 2],
) -> anyhow::Result<()> {
    ca.ready().await;
    let td = ca.bundle().trust_domain().clone();
    let root = ca.bundle().roots().next().context("no root")?;
    out.step("The controller (membrane-ca) is up");
    out.say(
        true,
        "a fresh root CA was generated; every identity in the mesh chains to it",
        json!({
            "trust domain": td.to_string(),
            "root fingerprint (SHA-256)": fingerprint(root),
            "gRPC (TLS)": ca.grpc_addr().to_string(),
            "metrics": format!("http://{}/metrics", ca.metrics_addr()),
            "workloads": "data/feature-store and inference/model-server on node-b, training/trainer and untrusted/scraper on node-a",
        }),
    );

    let endpoint = format!("https://{}", ca.grpc_addr());
    let root_pem = ca.bundle().to_pem();
    let connect = |token: &str| {
        let (endpoint, root_pem, token) = (endpoint.clone(), root_pem.clone(), token.to_owned());
        async move { CaClient::connect(&endpoint, root_pem.as_bytes(), "membrane-ca", &token).await }
    };
    let mut node_a = connect(&tokens[0].1).await?;
    let mut node_b = connect(&tokens[1].1).await?;
    let id = |ns: &str, sa: &str| WorkloadIdentity::new(&td, ns, sa);

    out.step("node-a's agent asks for the trainer's identity");
    let trainer = id("training", "trainer")?;
    let (trainer_svid, bundle) = node_a.request_svid(&trainer, Duration::ZERO).await?;
    describe_svid(
        out,
        &trainer_svid,
        "key generated on node-a; only a CSR left the node",
    );

    out.step("node-b's agent asks for the feature store's identity");
    let store = id("data", "feature-store")?;
    let (store_svid, _) = node_b.request_svid(&store, Duration::ZERO).await?;
    describe_svid(out, &store_svid, "issued: feature-store runs on node-b");

    out.step("node-a asks for an identity that is not scheduled on it");
    let model = id("inference", "model-server")?;
    refusal(
        out,
        node_a.request_svid(&model, Duration::ZERO).await,
        "model-server runs on node-b; node-a cannot obtain its identity",
    );

    out.step("node-a asks for a pod whose namespace is not in the mesh");
    let scraper = id("untrusted", "scraper")?;
    refusal(
        out,
        node_a.request_svid(&scraper, Duration::ZERO).await,
        "scraper runs on node-a, but namespace untrusted is not in the mesh: no identity",
    );

    out.step("a caller with a stolen-looking, unknown token");
    let mut stranger = connect("this-token-was-never-issued").await?;
    refusal(
        out,
        stranger.request_svid(&trainer, Duration::ZERO).await,
        "unknown node credential: nothing is issued",
    );

    out.step("trainer → feature store over mutual TLS, authenticated by SPIFFE ID");
    mtls_exchange(out, &trainer_svid, &store_svid, &bundle).await?;

    out.step("what the controller counted");
    let metrics = scrape(ca.metrics_addr()).await?;
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("membrane_ca_certificates_signed_total")
                || l.starts_with("membrane_ca_csr_refused_total")
        })
        .collect();
    out.say(true, "Prometheus counters", json!({"metrics": lines}));
    Ok(())
}

fn describe_svid(out: &Narrator, svid: &WorkloadSvid, why: &str) {
    let info = svid.info();
    let valid_for = info
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    out.say(
        true,
        why,
        json!({
            "SPIFFE ID": svid.identity().to_string(),
            "serial": info.serial,
            "valid for": humantime::format_duration(Duration::from_secs(valid_for.as_secs())).to_string(),
        }),
    );
}

fn refusal<T>(out: &Narrator, result: Result<T, ClientError>, why: &str) {
    match result {
        Err(ClientError::Refused { code, message }) => out.say(
            true,
            why,
            json!({"refused with": format!("{code:?}"), "reason": message}),
        ),
        Err(e) => out.say(false, "unexpected error", json!({"error": e.to_string()})),
        Ok(_) => out.say(false, "UNEXPECTED: an identity was issued", json!({})),
    }
}

async fn mtls_exchange(
    out: &Narrator,
    client_svid: &WorkloadSvid,
    server_svid: &WorkloadSvid,
    bundle: &TrustBundle,
) -> anyhow::Result<()> {
    let provider = membrane_identity::crypto_provider();
    let shared = SharedTrustBundle::new(bundle.clone());
    let server_cfg = membrane_identity::verify::mtls_server_config(
        server_svid,
        shared.clone(),
        PeerCheck::TrustDomain(bundle.trust_domain().clone()),
        provider.clone(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    let peer =
                        membrane_identity::peer_spiffe_id(tls.get_ref().1.peer_certificates());
                    let mut buf = [0u8; 64];
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    let _ = tls.write_all(b"features: [0.12, 0.97, 0.33]").await;
                    let _ = tls.shutdown().await;
                    seen.push(Ok((peer.map(|p| p.to_string()).unwrap_or_default(), n)));
                }
                Err(e) => seen.push(Err(e.to_string())),
            }
        }
        seen
    });

    let expected = server_svid.identity().spiffe_id().clone();
    let client_cfg = membrane_identity::verify::mtls_client_config(
        client_svid,
        shared.clone(),
        PeerCheck::Exact(expected.clone()),
        provider.clone(),
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(ServerName::try_from("feature-store.data")?, tcp)
        .await?;
    let server_id = membrane_identity::peer_spiffe_id(tls.get_ref().1.peer_certificates())?;
    let cipher = tls
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    tls.write_all(b"GET features for batch 42").await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;

    // An impostor: a certificate claiming the trainer's SPIFFE ID, from a CA the mesh does not
    // trust.
    let impostor = membrane_testbed::impostor_svid(&client_svid.identity().to_string())?;
    let impostor_cfg = membrane_identity::verify::mtls_client_config(
        &impostor,
        shared,
        PeerCheck::Exact(expected),
        provider,
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    if let Ok(mut s) = tokio_rustls::TlsConnector::from(Arc::new(impostor_cfg))
        .connect(ServerName::try_from("feature-store.data")?, tcp)
        .await
    {
        let _ = s.write_all(b"GET features").await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    }
    let seen = server.await?;
    let first = seen
        .first()
        .cloned()
        .unwrap_or_else(|| Err("no connection".into()));
    out.say(
        first.is_ok(),
        "handshake verified both ways; each side knows the other's workload identity",
        json!({
            "client saw server": server_id.to_string(),
            "server saw client": first.as_ref().map(|(p, _)| p.clone()).unwrap_or_else(|e| e.clone()),
            "TLS": format!("1.3, {cipher}"),
            "reply": String::from_utf8_lossy(&reply),
        }),
    );
    let second = seen
        .get(1)
        .cloned()
        .unwrap_or_else(|| Ok((String::new(), 0)));
    out.say(
        second.is_err(),
        "an impostor presenting the trainer's SPIFFE ID from an untrusted CA is refused",
        json!({"server said": second.err().unwrap_or_else(|| "ACCEPTED (wrong!)".into())}),
    );
    Ok(())
}

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text)
}
