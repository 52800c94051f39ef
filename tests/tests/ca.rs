//! The certificate authority over real sockets: TLS, gRPC, node authorization, restarts.

use std::sync::Arc;
use std::time::Duration;

use membrane_ca::client::ClientError;
use membrane_identity::svid::Usage;
use membrane_identity::{PeerCheck, SharedTrustBundle, TrustBundle, crypto_provider, csr};
use membrane_tests::{
    MESH_MANIFESTS, NODE_A_TOKEN, NODE_B_TOKEN, OfflineCa, TestCa, identity, trust_domain,
};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn refused_with(result: Result<impl std::fmt::Debug, ClientError>, code: tonic::Code) -> String {
    match result {
        Err(ClientError::Refused { code: got, message }) => {
            assert_eq!(got, code, "wrong status; message: {message}");
            message
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn allowed_identity_gets_an_svid_that_verifies() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let mut client = ca.client(NODE_A_TOKEN).await?;
    let trainer = identity("training", "trainer");
    let (svid, bundle) = client
        .request_svid(&trainer, Duration::from_secs(3600))
        .await?;
    assert_eq!(svid.identity(), &trainer);
    // The bundle a node was bootstrapped with and the one the CA returned agree.
    let loaded = TrustBundle::from_pem(trust_domain(), ca.root_pem().as_bytes())?;
    assert_eq!(bundle, loaded);
    for usage in [Usage::Client, Usage::Server] {
        let id = loaded.verify_svid_chain(svid.chain(), UnixTime::now(), usage)?;
        assert_eq!(id, *trainer.spiffe_id());
    }
    // Requested lifetime honoured (minus nothing, plus the backdate).
    let lifetime = svid
        .info()
        .not_after
        .duration_since(svid.info().not_before)?;
    assert!(lifetime <= Duration::from_secs(3600 + 10), "{lifetime:?}");
    assert!(lifetime >= Duration::from_secs(3600), "{lifetime:?}");
    // Lifetime capped by the maximum (24 h).
    let (long, _) = client
        .request_svid(&trainer, Duration::from_secs(7 * 24 * 3600))
        .await?;
    let lifetime = long
        .info()
        .not_after
        .duration_since(long.info().not_before)?;
    assert!(
        lifetime <= Duration::from_secs(24 * 3600 + 10),
        "{lifetime:?}"
    );

    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains("membrane_ca_certificates_signed_total 2"),
        "{metrics}"
    );
    ca.stop().await;
    Ok(())
}

#[tokio::test]
async fn identity_on_another_node_is_refused() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let mut node_a = ca.client(NODE_A_TOKEN).await?;
    // inference runs on node-b, not node-a.
    let msg = refused_with(
        node_a
            .request_svid(&identity("training", "inference"), Duration::ZERO)
            .await,
        tonic::Code::PermissionDenied,
    );
    assert!(msg.contains("node-a"), "{msg}");
    // A pod of a namespace that is not in the mesh gets nothing, even on its own node.
    let msg = refused_with(
        node_a
            .request_svid(&identity("legacy", "old-app"), Duration::ZERO)
            .await,
        tonic::Code::PermissionDenied,
    );
    assert!(msg.contains("not enrolled in the mesh"), "{msg}");
    // An identity nobody runs.
    refused_with(
        node_a
            .request_svid(&identity("training", "nobody"), Duration::ZERO)
            .await,
        tonic::Code::PermissionDenied,
    );
    // node-b may have it.
    let mut node_b = ca.client(NODE_B_TOKEN).await?;
    node_b
        .request_svid(&identity("training", "inference"), Duration::ZERO)
        .await?;

    // Moving the pod (editing the manifest) moves the entitlement.
    let moved = MESH_MANIFESTS.replace(
        "spec: {serviceAccountName: inference, nodeName: node-b}",
        "spec: {serviceAccountName: inference, nodeName: node-a}",
    );
    std::fs::write(ca.dir.path().join("manifests/mesh.yaml"), moved)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match node_a
            .request_svid(&identity("training", "inference"), Duration::ZERO)
            .await
        {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reload not applied: {e}"),
        }
    }
    refused_with(
        node_b
            .request_svid(&identity("training", "inference"), Duration::ZERO)
            .await,
        tonic::Code::PermissionDenied,
    );
    let metrics = ca.metrics().await?;
    assert!(
        // At least three; more while the test polls for the manifest reload.
        metrics.contains(r#"membrane_ca_csr_refused_total{reason="not_on_node"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"membrane_ca_csr_refused_total{reason="not_in_mesh"} 1"#),
        "{metrics}"
    );
    ca.stop().await;
    Ok(())
}

/// Removing a node's line from the token file takes its credential away while the
/// controller runs; a broken edit changes nothing.
#[tokio::test]
async fn a_token_removed_from_the_file_is_refused_from_then_on() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let trainer = identity("training", "trainer");
    let mut node_b = ca.client(NODE_B_TOKEN).await?;
    // Known: authenticated, then refused for the node (the trainer runs on node-a).
    refused_with(
        node_b.request_svid(&trainer, Duration::ZERO).await,
        tonic::Code::PermissionDenied,
    );
    ca.write_tokens(&format!("node-a {NODE_A_TOKEN}\n"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match node_b.request_svid(&trainer, Duration::ZERO).await {
            Err(ClientError::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            }) => {
                break;
            }
            other if std::time::Instant::now() > deadline => {
                anyhow::bail!("node-b's removed token still accepted: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    ca.write_tokens("node-a too-short\n")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ca
        .metrics()
        .await?
        .contains(r#"membrane_ca_token_file_reloads_total{result="refused"} 1"#)
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the broken edit was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut node_a = ca.client(NODE_A_TOKEN).await?;
    node_a.request_svid(&trainer, Duration::ZERO).await?;
    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains(r#"membrane_ca_token_file_reloads_total{result="applied"} 1"#),
        "{metrics}"
    );
    ca.stop().await;
    Ok(())
}

#[tokio::test]
async fn missing_or_wrong_token_is_unauthenticated() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let trainer = identity("training", "trainer");
    let mut wrong = ca.client("not-a-known-token-at-all").await?;
    refused_with(
        wrong.request_svid(&trainer, Duration::ZERO).await,
        tonic::Code::Unauthenticated,
    );
    // No authorization metadata at all: a raw client.
    let channel = tonic::transport::Endpoint::from_shared(ca.endpoint())?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca.root_pem()))
                .domain_name("membrane-ca"),
        )?
        .connect()
        .await?;
    let mut raw = membrane_proto::v1::certificates_client::CertificatesClient::new(channel);
    let generated = csr::generate(&trainer)?;
    let status = raw
        .sign(membrane_proto::v1::SignRequest {
            csr_der: generated.csr.to_vec(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // Unauthenticated callers learn nothing about the CSR: even garbage is UNAUTHENTICATED.
    let status = raw
        .sign(membrane_proto::v1::SignRequest {
            csr_der: b"garbage".to_vec(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains(r#"membrane_ca_csr_refused_total{reason="unauthenticated"} 3"#),
        "{metrics}"
    );
    ca.stop().await;
    Ok(())
}

fn csr_der(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .serialize_request(key)
        .expect("serialize")
        .der()
        .to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

#[tokio::test]
async fn malformed_csrs_are_invalid_argument() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let mut client = ca.client(NODE_A_TOKEN).await?;
    let ok = "spiffe://cluster.local/ns/training/sa/trainer";
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut tampered = csr_der(&p256, vec![uri(ok)]);
    let at = tampered
        .windows(7)
        .position(|w| w == b"trainer")
        .expect("id in CSR");
    tampered[at] = b'T';
    let rsa = pem::parse(include_str!("../../identity/testdata/rsa-csr.pem"))?.into_contents();
    let p521 = pem::parse(include_str!("../../identity/testdata/p521-csr.pem"))?.into_contents();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"definitely not DER".to_vec()),
        ("empty", Vec::new()),
        ("tampered signature", tampered),
        ("RSA key", rsa),
        ("P-521 key", p521),
        ("no SAN", csr_der(&p256, vec![])),
        ("two SANs", csr_der(&p256, vec![uri(ok), uri(ok)])),
        (
            "DNS SAN",
            csr_der(&p256, vec![SanType::DnsName("trainer.example".try_into()?)]),
        ),
        (
            "foreign trust domain",
            csr_der(
                &p256,
                vec![uri("spiffe://evil.example/ns/training/sa/trainer")],
            ),
        ),
        ("too large", vec![0x30; 16 * 1024 + 1]),
    ];
    for (name, der) in cases {
        let result = client.sign_raw(der, Duration::ZERO).await;
        let msg = refused_with(result, tonic::Code::InvalidArgument);
        assert!(!msg.is_empty(), "{name}: empty message");
    }
    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains(r#"membrane_ca_csr_refused_total{reason="invalid_csr"} 10"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("membrane_ca_certificates_signed_total 0"),
        "{metrics}"
    );
    ca.stop().await;
    Ok(())
}

#[tokio::test]
async fn restart_keeps_the_same_root() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let root_before = ca.root_pem();
    let key_path = ca.dir.path().join("state/root-key.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_path)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "root key must be 0600");
    let dir = ca.stop().await;

    let ca = TestCa::start_in(dir, None).await?;
    assert_eq!(ca.root_pem(), root_before);
    let mut client = ca.client(NODE_A_TOKEN).await?;
    let (svid, _) = client
        .request_svid(&identity("training", "trainer"), Duration::ZERO)
        .await?;
    let old_bundle = TrustBundle::from_pem(trust_domain(), root_before.as_bytes())?;
    old_bundle.verify_svid_chain(svid.chain(), UnixTime::now(), Usage::Client)?;
    ca.stop().await;
    Ok(())
}

/// Two peers with SVIDs from the CA complete a mutual-TLS handshake and learn each other's
/// SPIFFE ID; a peer whose certificate comes from another CA is refused.
#[tokio::test]
async fn svids_work_in_a_real_mtls_handshake() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let trainer = identity("training", "trainer");
    let inference = identity("training", "inference");
    let (trainer_svid, bundle) = ca
        .client(NODE_A_TOKEN)
        .await?
        .request_svid(&trainer, Duration::ZERO)
        .await?;
    let (inference_svid, _) = ca
        .client(NODE_B_TOKEN)
        .await?
        .request_svid(&inference, Duration::ZERO)
        .await?;
    let bundle = SharedTrustBundle::new(bundle);
    let provider = crypto_provider();

    let server_cfg = membrane_identity::verify::mtls_server_config(
        &inference_svid,
        bundle.clone(),
        PeerCheck::TrustDomain(trust_domain()),
        provider.clone(),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    let peer =
                        membrane_identity::peer_spiffe_id(tls.get_ref().1.peer_certificates())
                            .expect("verified peer");
                    tls.write_all(b"hello").await.expect("write");
                    tls.shutdown().await.ok();
                    outcomes.push(Ok(peer.to_string()));
                }
                Err(e) => outcomes.push(Err(e.to_string())),
            }
        }
        outcomes
    });

    // 1. The trainer dials the inference server, requiring exactly its identity.
    let client_cfg = membrane_identity::verify::mtls_client_config(
        &trainer_svid,
        bundle.clone(),
        PeerCheck::Exact(inference.spiffe_id().clone()),
        provider.clone(),
    )?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("ignored.invalid")?, tcp)
        .await?;
    let server_id = membrane_identity::peer_spiffe_id(tls.get_ref().1.peer_certificates())?;
    assert_eq!(server_id, *inference.spiffe_id());
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    assert_eq!(buf, b"hello");

    // 2. An impostor with a certificate for the same SPIFFE ID from another CA is refused.
    let rogue_svid = membrane_tests::impostor_svid(&trainer.to_string())?;
    let rogue_cfg = membrane_identity::verify::mtls_client_config(
        &rogue_svid,
        bundle.clone(),
        PeerCheck::Exact(inference.spiffe_id().clone()),
        provider.clone(),
    )?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let rogue = tokio_rustls::TlsConnector::from(Arc::new(rogue_cfg))
        .connect(ServerName::try_from("ignored.invalid")?, tcp)
        .await;
    // In TLS 1.3 the client may finish before the server rejects its certificate; the
    // server's verdict is authoritative.
    if let Ok(mut stream) = rogue {
        let mut buf = Vec::new();
        assert!(
            stream.read_to_end(&mut buf).await.is_err() || buf.is_empty(),
            "rogue client must not receive application data"
        );
    }
    let outcomes = server.await?;
    assert_eq!(outcomes[0].as_deref(), Ok(trainer.to_string().as_str()));
    let rejection = outcomes[1]
        .as_ref()
        .expect_err("rogue client must be rejected");
    assert!(
        rejection.contains("does not verify") || rejection.contains("certificate"),
        "{rejection}"
    );

    // 3. A client expecting a different server identity refuses the real server.
    let wrong_expectation = membrane_identity::verify::mtls_client_config(
        &trainer_svid,
        bundle,
        PeerCheck::Exact(identity("training", "someone-else").spiffe_id().clone()),
        provider,
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_cfg = Arc::new(membrane_identity::verify::mtls_server_config(
        &inference_svid,
        SharedTrustBundle::new(TrustBundle::from_pem(
            trust_domain(),
            ca.root_pem().as_bytes(),
        )?),
        PeerCheck::TrustDomain(trust_domain()),
        crypto_provider(),
    )?);
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await
            .is_ok()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let err = tokio_rustls::TlsConnector::from(Arc::new(wrong_expectation))
        .connect(ServerName::try_from("ignored.invalid")?, tcp)
        .await
        .expect_err("wrong server identity");
    assert!(err.to_string().contains("someone-else"), "{err}");
    assert!(!accept.await?, "server must see the handshake fail");
    ca.stop().await;
    Ok(())
}

/// An operator's PKI: root → intermediate; the controller signs with the intermediate.
#[tokio::test]
async fn plugin_intermediate_signs_chains_to_the_operator_root() -> anyhow::Result<()> {
    let plugin = tempfile::tempdir()?;
    let root = OfflineCa::root("Example Corp root")?;
    write_plugin(plugin.path(), &root, "Example Corp mesh intermediate")?;

    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let dir = ca.stop().await;
    let ca = TestCa::start_in(dir, Some(plugin.path().to_owned())).await?;
    let (svid, bundle) = ca
        .client(NODE_A_TOKEN)
        .await?
        .request_svid(&identity("training", "trainer"), Duration::ZERO)
        .await?;
    assert_eq!(svid.chain().len(), 2, "leaf + intermediate, no root");
    let operator_root = TrustBundle::from_pem(trust_domain(), root.pem().as_bytes())?;
    assert_eq!(bundle, operator_root);
    operator_root.verify_svid_chain(svid.chain(), UnixTime::now(), Usage::Client)?;
    let dir = ca.stop().await;

    // A key that does not belong to ca-cert.pem is refused at start.
    std::fs::write(
        plugin.path().join("ca-key.pem"),
        KeyPair::generate()?.serialize_pem(),
    )?;
    let err = TestCa::start_in(dir, Some(plugin.path().to_owned()))
        .await
        .err()
        .expect("mismatched key must be refused");
    assert!(err.to_string().contains("plug-in CA"), "{err}");
    Ok(())
}

/// Writes a plug-in CA (intermediate signed by `root`) into `dir`, Istio's layout:
/// `cert-chain.pem` holds the intermediate and the root.
fn write_plugin(dir: &std::path::Path, root: &OfflineCa, name: &str) -> anyhow::Result<OfflineCa> {
    let int = root.intermediate(name)?;
    std::fs::write(dir.join("ca-key.pem"), int.key_pem())?;
    std::fs::write(dir.join("ca-cert.pem"), int.pem())?;
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )?;
    std::fs::write(dir.join("root-cert.pem"), root.pem())?;
    Ok(int)
}

#[tokio::test]
async fn plugin_intermediate_is_replaced_in_place_but_not_its_root() -> anyhow::Result<()> {
    let plugin = tempfile::tempdir()?;
    let root = OfflineCa::root("Example Corp root")?;
    let first = write_plugin(plugin.path(), &root, "intermediate one")?;
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let dir = ca.stop().await;
    let ca = TestCa::start_in(dir, Some(plugin.path().to_owned())).await?;
    let intermediate = || async {
        let (svid, _) = ca
            .client(NODE_A_TOKEN)
            .await?
            .request_svid(&identity("training", "trainer"), Duration::ZERO)
            .await?;
        anyhow::Ok(svid.chain()[1].to_vec())
    };
    assert_eq!(intermediate().await?, first.der().to_vec());

    // A new intermediate under the same root: signing switches without a restart.
    let second = write_plugin(plugin.path(), &root, "intermediate two")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while intermediate().await? != second.der().to_vec() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never switched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another root: refused (trust in it was never distributed); the second keeps signing.
    let other = OfflineCa::root("Another root")?;
    write_plugin(plugin.path(), &other, "intermediate three")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ca
        .metrics()
        .await?
        .contains("membrane_ca_plugin_ca_reloads_total{result=\"root_changed\"} 1")
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "root change not refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(intermediate().await?, second.der().to_vec());
    Ok(())
}

#[tokio::test]
async fn half_written_root_is_refused_not_replaced() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let dir = ca.stop().await;
    std::fs::remove_file(dir.path().join("state/root-cert.pem"))?;
    let err = TestCa::start_in(dir, None)
        .await
        .err()
        .expect("key without certificate must be refused");
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
    Ok(())
}

/// The controller's TLS offers the hybrid post-quantum group first: a client that has it
/// agrees on X25519MLKEM768, a classical client still gets X25519 (this process keeps the
/// default, `pq-preferred`).
#[tokio::test]
async fn the_controller_tls_prefers_post_quantum_key_exchange() -> anyhow::Result<()> {
    use membrane_identity::KeyExchange;
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let addr = ca.endpoint().trim_start_matches("https://").to_owned();
    let roots = TrustBundle::from_pem(trust_domain(), ca.root_pem().as_bytes())?;
    let mut store = rustls::RootCertStore::empty();
    for root in roots.roots() {
        store.add(root.clone())?;
    }
    let mut agreed = Vec::new();
    for kx in [KeyExchange::PqPreferred, KeyExchange::Classical] {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(kx.provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(store.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(&addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("membrane-ca")?, tcp)
            .await?;
        agreed.push(membrane_identity::kx::negotiated_group(tls.get_ref().1));
    }
    assert_eq!(
        agreed,
        [Some("X25519MLKEM768".to_owned()), Some("X25519".to_owned())]
    );
    Ok(())
}
