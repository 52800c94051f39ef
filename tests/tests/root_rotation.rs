//! Root rotation through the real controller over TLS+gRPC: the phases, the wait for every
//! connected node's acknowledgement, and a controller restart at each step.

use std::time::{Duration, Instant};

use membrane_ca::client::CaClient;
use membrane_ca::rotation::{self, Phase};
use membrane_proto::v1 as pb;
use membrane_tests::{MESH_MANIFESTS, Pattern, TestCa, node_token, trust_domain};

/// Workload lifetime in this test: the old root retires this long (plus the signer's
/// backdate) after the switch.
const TTL: Duration = Duration::from_secs(2);

async fn next(stream: &mut tonic::Streaming<pb::Update>) -> anyhow::Result<pb::Update> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

fn roots_in(update: &pb::Update) -> Option<Vec<Vec<u8>>> {
    update.upserts.iter().find_map(|r| match &r.kind {
        Some(pb::resource::Kind::TrustBundle(b)) => Some(b.roots_der.clone()),
        _ => None,
    })
}

fn phase(ca: &TestCa) -> anyhow::Result<Phase> {
    Ok(rotation::read_phase(&ca.dir.path().join("state"))?)
}

async fn watch_a(ca: &TestCa) -> anyhow::Result<(CaClient, tonic::Streaming<pb::Update>)> {
    let mut client = ca.client(&node_token("node-a")).await?;
    let stream = client.watch("node-a").await?;
    Ok((client, stream))
}

async fn wait_phase(
    ca: &TestCa,
    limit: Duration,
    want: impl Fn(Phase) -> bool,
) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + limit;
    loop {
        let p = phase(ca)?;
        if want(p.clone()) {
            return Ok(p);
        }
        anyhow::ensure!(Instant::now() < deadline, "phase stuck at {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_waits_for_nodes_and_survives_restarts_at_every_step() -> anyhow::Result<()>
{
    let mut ca = TestCa::builder()
        .manifest("mesh.yaml", MESH_MANIFESTS)
        .nodes(&["node-a".to_owned()])
        .cert_ttl(TTL)
        .start()
        .await?;
    let state = ca.dir.path().join("state");
    let (client, mut stream) = watch_a(&ca).await?;
    let snapshot = next(&mut stream).await?;
    let old = roots_in(&snapshot).ok_or_else(|| anyhow::anyhow!("no bundle"))?;
    assert_eq!(old.len(), 1);

    // The operator starts it: the bundle grows to two roots on the stream.
    rotation::request(&state, &trust_domain(), Duration::from_secs(3600))?;
    let update = next(&mut stream).await?;
    let both = roots_in(&update).ok_or_else(|| anyhow::anyhow!("no bundle in {update:?}"))?;
    assert_eq!(both.len(), 2);
    assert!(both.contains(&old[0]));
    let new_root = both
        .iter()
        .find(|r| **r != old[0])
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no new root"))?;
    let roots = [old[0].clone(), new_root.clone()];

    // Unacknowledged, it keeps signing with the old root.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(matches!(phase(&ca)?, Phase::Distributing { .. }));
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [0]);

    // Restart while distributing: still distributing, still both roots in the snapshot.
    drop((client, stream));
    ca.pause().await;
    ca.resume().await?;
    let (mut client, mut stream) = watch_a(&ca).await?;
    let snapshot = next(&mut stream).await?;
    assert_eq!(roots_in(&snapshot).map(|r| r.len()), Some(2));
    assert!(matches!(phase(&ca)?, Phase::Distributing { .. }));

    // The node acknowledges: signing switches to the new root.
    client.ack("node-a", snapshot.version).await?;
    wait_phase(&ca, Duration::from_secs(5), |p| {
        matches!(p, Phase::Signing { .. })
    })
    .await?;
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [1]);

    // Restart while signing with the new root: it keeps doing so.
    drop((client, stream));
    ca.pause().await;
    ca.resume().await?;
    assert!(matches!(phase(&ca)?, Phase::Signing { .. }));
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [1]);

    // Once the old root's last leaf expired, it leaves the bundle.
    let (_client, mut stream) = watch_a(&ca).await?;
    let snapshot = next(&mut stream).await?;
    assert_eq!(roots_in(&snapshot).map(|r| r.len()), Some(2));
    let limit = TTL + membrane_ca::signer::BACKDATE + Duration::from_secs(10);
    let update = next_with_bundle(&mut stream, limit).await?;
    assert_eq!(roots_in(&update), Some(vec![new_root.clone()]));
    assert_eq!(phase(&ca)?, Phase::Idle);
    for gone in ["next-root-cert.pem", "next-root-key.pem", "rotation.json"] {
        assert!(!state.join(gone).exists(), "{gone} left behind");
    }

    // And a restart afterwards keeps the new root.
    ca.pause().await;
    ca.resume().await?;
    assert_eq!(ca.trainer_signed_by(&roots, TTL).await?, [1]);
    let (_client, mut stream) = watch_a(&ca).await?;
    assert_eq!(roots_in(&next(&mut stream).await?), Some(vec![new_root]));
    Ok(())
}

async fn next_with_bundle(
    stream: &mut tonic::Streaming<pb::Update>,
    limit: Duration,
) -> anyhow::Result<pb::Update> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        if roots_in(&update).is_some() {
            return Ok(update);
        }
    }
}

#[tokio::test]
async fn a_second_request_during_a_rotation_is_refused() -> anyhow::Result<()> {
    let ca = TestCa::start(MESH_MANIFESTS).await?;
    let state = ca.dir.path().join("state");
    rotation::request(&state, &trust_domain(), Duration::from_secs(3600))?;
    let err =
        rotation::request(&state, &trust_domain(), Duration::from_secs(3600)).expect_err("refused");
    assert!(err.to_string().contains("already in progress"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_long_transfer_survives_renewals_and_a_root_rotation() -> anyhow::Result<()> {
    use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    membrane_tests::require_root()?;
    let mut mesh = Mesh::start(MeshSpec {
        cert_ttl: Some(Duration::from_secs(3)),
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("store", "data", "feature-store", "node-b"),
            ],
            &["training", "data"],
        )
    })
    .await?;
    for pod in ["trainer", "store"] {
        mesh.enroll(pod).await?;
    }
    mesh.echo_app("store", 8080)?;
    let dst = std::net::SocketAddr::new(mesh.ip("store"), 8080);
    let stream = mesh.connect_from("trainer", dst).await?;
    let (mut rx, mut tx) = stream.into_split();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writer: a bounded rate of pattern bytes; reader: checks every echoed byte.
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut pattern, mut buf, mut sent) =
                (Pattern(0x9e37_79b9_7f4a_7c15), vec![0u8; 16 * 1024], 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pattern.fill(&mut buf);
                tx.write_all(&buf).await?;
                sent += buf.len() as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tx.shutdown().await?;
            anyhow::Ok(sent)
        })
    };
    let reader = tokio::spawn(async move {
        let (mut pattern, mut want, mut got, mut total) = (
            Pattern(0x9e37_79b9_7f4a_7c15),
            vec![0u8; 16 * 1024],
            vec![0u8; 16 * 1024],
            0u64,
        );
        loop {
            pattern.fill(&mut want);
            match rx.read_exact(&mut got).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return anyhow::Ok(total);
                }
                Err(e) => return Err(e.into()),
            }
            anyhow::ensure!(got == want, "corrupted at byte {total}");
            total += got.len() as u64;
        }
    });

    // Rotate the root while the transfer runs; open a new connection every 500 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = mesh.ca().dir.path().join("state");
    rotation::request(&state, &trust_domain(), Duration::from_secs(3600))?;
    let (mut saw_signing, mut new_connections) = (false, 0);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let attempt = async {
            let mut s = mesh.connect_from("trainer", dst).await?;
            ping(&mut s).await
        };
        if let Err(e) = attempt.await {
            for node in ["node-a", "node-b"] {
                for r in mesh.ztunnels[node].access_records() {
                    if r["result"] == "refused" {
                        eprintln!("{node}: {r}");
                    }
                }
                let logs = mesh.ztunnels[node]
                    .logs
                    .lock()
                    .map(|l| l.clone())
                    .unwrap_or_default();
                for l in logs.iter().filter(|l| {
                    l.contains("WARN") || l.contains("ERROR") || l.contains("trust bundle")
                }) {
                    eprintln!("{node} log: {l}");
                }
            }
            anyhow::bail!(
                "new connection {new_connections} failed in phase {:?}: {e}",
                rotation::read_phase(&state)?
            );
        }
        new_connections += 1;
        let p = rotation::read_phase(&state)?;
        saw_signing |= matches!(p, Phase::Signing { .. });
        let done = saw_signing
            && p == Phase::Idle
            && mesh.ztunnels["node-a"].renewals(None).len() >= 10
            && mesh.ztunnels["node-b"].renewals(None).len() >= 10;
        if done {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not done: phase {p:?}, renewals {} / {}",
            mesh.ztunnels["node-a"].renewals(None).len(),
            mesh.ztunnels["node-b"].renewals(None).len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = writer.await??;
    let received = reader.await??;
    assert_eq!(sent, received, "every byte came back, in order");
    assert!(new_connections >= 20, "{new_connections} new connections");
    // Both ztunnels end with the one new root (the last bundle update is on its way when the
    // controller's phase turns idle).
    for node in ["node-a", "node-b"] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let dump = mesh.config_dump(node).await?;
            if dump["trustBundleRoots"] == 1 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{node}: {dump}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A ztunnel restarted now still trusts the controller, whose certificate chains to the
    // new root that its bootstrap file (the old root) lacks: it kept the streamed bundle.
    mesh.restart_ztunnel("node-a")?;
    let readiness = mesh.ztunnels["node-a"].readiness;
    let deadline = Instant::now() + Duration::from_secs(30);
    while membrane_tests::http_get(readiness, "/healthz/ready")
        .await?
        .0
        != 200
    {
        anyhow::ensure!(Instant::now() < deadline, "restarted ztunnel never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = mesh.connect_from("trainer", dst).await?;
    ping(&mut s).await?;
    Ok(())
}
