//! The data plane's edges, end to end: who may use port 15008, many connections through few
//! tunnels, a ztunnel restart, and SIGTERM draining.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use membrane_identity::verify::{SpiffeServerVerifier, mtls_client_config};
use membrane_identity::{PeerCheck, crypto_provider};
use membrane_tests::hbone::{FromPod, mesh_bundle};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::run_in_netns;
use membrane_tests::{identity, node_token};
use membrane_ztunnel::hbone::{
    self, ConnectHeaders, Dial, HboneError, HbonePool, PoolConfig, PoolKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;

fn spec() -> MeshSpec {
    MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("outsider", "legacy", "outsider", "node-a"),
        ],
        &["training", "data"],
    )
}

fn h2(mut cfg: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    cfg.alpn_protocols = vec![hbone::ALPN_H2.to_vec()];
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn port_15008_refuses_strangers_and_misaddressed_tunnels() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec()).await?;
    mesh.enroll("store").await?;
    let accepted = mesh.echo_app("store", APP_PORT)?;
    let store_id = identity("data", "feature-store");
    let bundle = mesh_bundle(&mesh)?;
    let pool = HbonePool::new(PoolConfig::default());
    let dial: Arc<dyn Dial> = Arc::new(FromPod(mesh.netns_path("outsider")));
    let store_ip = mesh.ip("store");
    let key = |src: &str| PoolKey {
        src_ip: mesh.ip("outsider"),
        src: src.parse().expect("id"),
        dst: store_id.spiffe_id().clone(),
        dst_addr: SocketAddr::new(store_ip, hbone::HBONE_PORT),
        via: None,
    };
    let app_addr = SocketAddr::new(store_ip, APP_PORT);
    let trainer = identity("training", "trainer");

    // 1. A certificate from another CA.
    let rogue = membrane_tests::impostor_svid(&trainer.to_string())?;
    let cfg = h2(mtls_client_config(
        &rogue,
        bundle.clone(),
        PeerCheck::Exact(store_id.spiffe_id().clone()),
        crypto_provider(),
    )?);
    let result = pool
        .connect(
            key(&trainer.to_string()),
            cfg,
            dial.clone(),
            app_addr,
            ConnectHeaders::default(),
        )
        .await;
    assert!(
        result.is_err(),
        "a foreign CA's certificate must be refused"
    );

    // 2. No client certificate at all.
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle.clone(),
        PeerCheck::Exact(store_id.spiffe_id().clone()),
        crypto_provider(),
    ));
    let no_cert = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let result = pool
        .connect(
            key("spiffe://cluster.local/ns/x/sa/anonymous"),
            h2(no_cert),
            dial.clone(),
            app_addr,
            ConnectHeaders::default(),
        )
        .await;
    assert!(
        result.is_err(),
        "a client without a certificate must be refused"
    );

    // 3. A valid SVID, but an authority that is not a workload of that pod.
    let (svid, _) = mesh
        .ca()
        .client(&node_token("node-a"))
        .await?
        .request_svid(&trainer, Duration::ZERO)
        .await?;
    let good = h2(mtls_client_config(
        &svid,
        bundle.clone(),
        PeerCheck::Exact(store_id.spiffe_id().clone()),
        crypto_provider(),
    )?);
    let elsewhere = SocketAddr::new(mesh.ip("trainer"), APP_PORT);
    match pool
        .connect(
            key(&trainer.to_string()),
            good.clone(),
            dial.clone(),
            elsewhere,
            ConnectHeaders::default(),
        )
        .await
    {
        Err(HboneError::Refused(status)) => assert!(
            status.is_client_error() || status.is_server_error(),
            "{status}"
        ),
        other => panic!("misaddressed tunnel must be refused, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing may reach the app"
    );

    // Control: the same valid client with the right authority gets through.
    let mut stream = pool
        .connect(
            key(&trainer.to_string()),
            good,
            dial,
            app_addr,
            ConnectHeaders::default(),
        )
        .await?;
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_thousand_concurrent_connections_share_few_tunnels() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec()).await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    let accepted = mesh.echo_app("store", APP_PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), APP_PORT);
    const N: usize = 1000;
    let mut sockets = Vec::with_capacity(N);
    for _ in 0..N {
        sockets.push(mesh.socket_in("trainer")?);
    }
    // Open all of them before any finishes, so they are concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::with_capacity(N);
    for (i, socket) in sockets.into_iter().enumerate() {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = socket.connect(dst).await?;
            let msg = format!("hello {i}\n");
            s.write_all(msg.as_bytes()).await?;
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).await?;
            anyhow::ensure!(buf == msg.as_bytes(), "echo mismatch on {i}");
            barrier.wait().await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    let all = async {
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(60), all).await??;
    assert_eq!(accepted.load(Ordering::SeqCst), N);
    // Count the node-to-node TLS connections the trainer's pod holds to 15008.
    let out = mesh.testbed.exec(
        mesh.pod("trainer"),
        &["ss", "-Htn", "state", "established", "dport", "= :15008"],
    )?;
    let tunnels = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        (1..=20).contains(&tunnels),
        "{tunnels} TLS connections for {N} tunnelled ones"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn restarted_ztunnel_reenrolls_its_pods() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = Mesh::start(spec()).await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    let accepted = mesh.echo_app("store", APP_PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), APP_PORT);
    let roundtrip = |mesh: &Mesh| {
        let socket = mesh.socket_in("trainer");
        async move {
            let mut s =
                tokio::time::timeout(Duration::from_secs(5), socket?.connect(dst)).await??;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await??;
            Ok::<_, anyhow::Error>(())
        }
    };
    roundtrip(&mesh).await?;

    // SIGTERM: drains and exits cleanly, keeping the rules (traffic fails closed meanwhile).
    let status = mesh
        .ztunnels
        .get_mut("node-b")
        .expect("node-b")
        .terminate(Duration::from_secs(15))?;
    assert!(status.success(), "{status}");
    assert!(
        roundtrip(&mesh).await.is_err(),
        "with its ztunnel down, the pod must not be reachable in plaintext"
    );

    mesh.restart_ztunnel("node-b")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match roundtrip(&mesh).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("pod not re-enrolled after restart")),
        }
    }
    let list = mesh
        .enroll_request("node-b", &serde_json::json!({"op": "list"}))
        .await?;
    assert_eq!(list["pods"][0]["uid"], "data-store", "{list}");
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn resets_propagate_and_metrics_name_both_principals() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec()).await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    // The application resets every connection after reading a little.
    let listener = run_in_netns(mesh.netns_path("store"), || {
        TcpListener::bind(("0.0.0.0", APP_PORT))
    })??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let dst = SocketAddr::new(mesh.ip("store"), APP_PORT);
    let mut s = mesh.socket_in("trainer")?.connect(dst).await?;
    s.write_all(b"hello").await?;
    let mut buf = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await?;
    let err = result.expect_err("the reset must reach the client as a reset, not a clean close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // Metrics on each ztunnel carry Istio's label names with both SPIFFE IDs. (The inbound
    // side counts the connection when its relay ends: poll.)
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let opened = loop {
            let (_, text) =
                membrane_tests::http_get(mesh.ztunnels[node].metrics, "/metrics").await?;
            if let Some(line) = text
                .lines()
                .find(|l| l.starts_with("membrane_tcp_connections_opened_total{"))
            {
                break line.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no opened metric on {node}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            opened.contains(&format!("reporter=\"{reporter}\"")),
            "{opened}"
        );
        assert!(
            opened.contains(&format!(
                "source_principal=\"{}\"",
                mesh.spiffe_id("trainer")
            )),
            "{opened}"
        );
        assert!(
            opened.contains(&format!(
                "destination_principal=\"{}\"",
                mesh.spiffe_id("store")
            )),
            "{opened}"
        );
    }
    // The admin config dump lists the node's certificates with their expiry.
    let dump = mesh.config_dump("node-b").await?;
    let certs = dump["certificates"].as_array().expect("certificates");
    assert!(
        certs
            .iter()
            .any(|c| c["identity"] == mesh.spiffe_id("store")
                && c["expires_in_seconds"].as_u64() > Some(3600)),
        "{dump}"
    );
    Ok(())
}
