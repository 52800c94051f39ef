//! Attacks on the controller's root rotation, through the real controller over TLS+gRPC: a
//! node that keeps its discovery stream open but never acknowledges the new root must not
//! stall the rotation past `--rotation-ack-timeout`, and it is reported.

use std::time::{Duration, Instant};

use membrane_ca::SignerConfig;
use membrane_ca::rotation::{self, Phase};
use membrane_identity::TrustBundle;
use membrane_identity::svid::Usage;
use membrane_proto::v1 as pb;
use membrane_tests::{MESH_MANIFESTS, TestCa, identity, node_token, trust_domain};
use rustls_pki_types::{CertificateDer, UnixTime};

const TTL: Duration = Duration::from_secs(2);
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

async fn next(stream: &mut tonic::Streaming<pb::Update>) -> anyhow::Result<pb::Update> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

/// The next update that carries a trust bundle, and its roots.
async fn next_bundle(
    stream: &mut tonic::Streaming<pb::Update>,
) -> anyhow::Result<(pb::Update, Vec<Vec<u8>>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no trust bundle on the stream");
        let update = next(stream).await?;
        let roots = update.upserts.iter().find_map(|r| match &r.kind {
            Some(pb::resource::Kind::TrustBundle(b)) => Some(b.roots_der.clone()),
            _ => None,
        });
        if let Some(roots) = roots {
            return Ok((update, roots));
        }
    }
}

/// Which of `roots` the trainer's freshly issued SVID chains to.
async fn signed_by(ca: &TestCa, roots: &[Vec<u8>]) -> anyhow::Result<Vec<usize>> {
    let mut client = ca.client(&node_token("node-a")).await?;
    let (svid, _) = client
        .request_svid(&identity("training", "trainer"), TTL)
        .await?;
    let mut which = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let only = TrustBundle::new(trust_domain(), [CertificateDer::from(root.clone())])?;
        if only
            .verify_svid_chain(svid.chain(), UnixTime::now(), Usage::Client)
            .is_ok()
        {
            which.push(i);
        }
    }
    Ok(which)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_acknowledges_cannot_stall_a_root_rotation() -> anyhow::Result<()> {
    let signer = SignerConfig {
        default_ttl: TTL,
        max_ttl: TTL,
        ..SignerConfig::default()
    };
    let nodes = ["node-a".to_owned(), "node-b".to_owned()];
    let ca = TestCa::start_with_rotation_ack_timeout(
        &[("mesh.yaml", MESH_MANIFESTS)],
        &nodes,
        signer,
        ACK_TIMEOUT,
    )
    .await?;
    let state = ca.dir.path().join("state");

    // The attacker: node-a holds its stream open and never acknowledges anything.
    let mut silent = ca.client(&node_token("node-a")).await?;
    let mut silent_stream = silent.watch("node-a").await?;
    let (_, old) = next_bundle(&mut silent_stream).await?;
    assert_eq!(old.len(), 1);
    // An honest node-b acknowledges every bundle.
    let mut honest = ca.client(&node_token("node-b")).await?;
    let mut honest_stream = honest.watch("node-b").await?;
    let (snapshot, _) = next_bundle(&mut honest_stream).await?;
    honest.ack("node-b", snapshot.version).await?;

    let started = Instant::now();
    rotation::request(&state, &trust_domain(), Duration::from_secs(3600))?;
    let (_, both) = next_bundle(&mut silent_stream).await?;
    assert_eq!(both.len(), 2);
    let new_root = both
        .iter()
        .find(|r| **r != old[0])
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no new root"))?;
    let roots = [old[0].clone(), new_root];
    let (update, honest_roots) = next_bundle(&mut honest_stream).await?;
    assert_eq!(honest_roots.len(), 2);
    honest.ack("node-b", update.version).await?;

    // Past the grace period, before the timeout: the silent node still holds signing back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(rotation::read_phase(&state)?, Phase::Distributing { .. }),
        "switched before the acknowledgement timeout"
    );
    assert_eq!(signed_by(&ca, &roots).await?, [0]);

    // After the timeout the rotation proceeds anyway and names the silent node.
    let deadline = started + ACK_TIMEOUT + Duration::from_secs(10);
    let unacknowledged = loop {
        if let Phase::Signing { unacknowledged, .. } = rotation::read_phase(&state)? {
            break unacknowledged;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the silent node stalled the rotation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        started.elapsed() >= ACK_TIMEOUT - Duration::from_millis(300),
        "switched after {:?}, before the timeout",
        started.elapsed()
    );
    assert_eq!(unacknowledged, ["node-a"]);
    assert_eq!(signed_by(&ca, &roots).await?, [1]);
    let metrics = ca.metrics().await?;
    assert!(
        metrics.contains("membrane_ca_root_rotation_unacknowledged_nodes 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("membrane_ca_root_rotation_ack_timeouts_total 1"),
        "{metrics}"
    );
    drop((silent, silent_stream, honest, honest_stream));
    ca.stop().await;
    Ok(())
}
