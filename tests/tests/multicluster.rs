//! Two clusters on one host, federated: separate controllers, roots and trust domains
//! (`cluster-a.example`, `cluster-b.example`), one node each, pod networks routed flat across
//! the fabric that stands for the WAN between them. Cluster B exports its model server; a
//! trainer in A reaches it by its clusterset name, end to end over HBONE, and B's policy
//! decides on A's real identity. Removing the federation stops new cross-cluster tunnels and
//! leaves A's own traffic alone: B no longer federating A closes A's open tunnels into B and
//! refuses A's handshakes with the reason; A no longer federating B drops B's imports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use membrane_tests::clusters::{A, B, Options, TwoClusters, echo, two_clusters, until};
use membrane_tests::mesh::{Mesh, ping};
use membrane_tests::{TestCa, require_root};

#[tokio::test]
#[ignore = "needs root"]
async fn a_trainer_reaches_a_model_server_in_a_federated_cluster_by_name() -> anyhow::Result<()> {
    require_root()?;
    let TwoClusters { mesh, b, dst, .. } = two_clusters(Options::default()).await?;

    // The trainer reaches it; nothing on the WAN is plaintext; B records A's identity.
    let capture = mesh.testbed.capture_fabric()?;
    let marker = format!("CROSS-CLUSTER-{}", mesh.testbed.id());
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, marker.as_bytes()).await.is_ok()) },
    )
    .await?;
    let captured = capture.stop();
    ensure!(
        !captured.contains(marker.as_bytes()),
        "the payload crossed the WAN in plaintext"
    );
    b_records_the_trainer_and_denies_the_scraper(&mesh, dst).await?;
    b_stops_federating_a(&mesh, &b, dst).await?;

    // The federation goes away: its imports go with it, so a new connection to the
    // clusterset address is refused with the reason; the tunnel already open runs on
    // (refusing new tunnels on pooled connections and handshakes of a trust domain no longer
    // federated is tested where it happens: the ztunnel's pool and the identity verifiers);
    // A's own traffic is untouched.
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    std::fs::remove_file(mesh.ca().manifests_dir().join("federation-b.yaml"))?;
    until(
        "a new cross-cluster tunnel is refused",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, b"after").await.is_err()) },
    )
    .await?;
    let refusal = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| {
                r["direction"] == "outbound"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.contains("no imported Service"))
            },
            Duration::from_secs(5),
        )
        .await;
    ensure!(
        refusal.is_some(),
        "no outbound record says why the clusterset address is refused: {:#?}",
        mesh.ztunnels["node-a"]
            .access_records()
            .into_iter()
            .filter(|r| r["direction"] == "outbound")
            .map(|r| r["reason"].clone())
            .collect::<Vec<_>>()
    );
    let store = SocketAddr::new(mesh.ip("store"), 9000);
    echo(&mesh, "trainer", store, b"local traffic")
        .await
        .context("A's own traffic after the federation was removed")?;
    // The tunnel opened before the change runs on (only new ones are refused).
    ping(&mut long)
        .await
        .context("the open cross-cluster tunnel")?;
    drop(long);
    drop(mesh);
    drop(b);
    Ok(())
}

/// Cluster B rotates its root (`rotate-root`) while A's trainer talks to B's model server: a
/// long stream pinged every 100 ms and a new connection every 500 ms all succeed, through the
/// new root's distribution (A fetches it from B's bundle endpoint before B signs with it),
/// B's switch to signing with it (B's pods renew under it) and the old root's removal.
#[tokio::test]
#[ignore = "needs root"]
async fn cross_cluster_traffic_continues_while_a_federated_cluster_rotates_its_root()
-> anyhow::Result<()> {
    use membrane_ca::rotation::{self, Phase};
    require_root()?;
    let TwoClusters { mesh, b, dst, .. } = two_clusters(Options {
        cert_ttl: Some(Duration::from_secs(3)),
        ..Options::default()
    })
    .await?;
    until(
        "the trainer reaches the model server",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, b"before").await.is_ok()) },
    )
    .await?;
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    // The long stream is pinged every 100 ms until told to stop, then reports its count.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let pinger = tokio::spawn(async move {
        let mut pings = 0u32;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) && pings < 10_000 {
            ping(&mut long).await.context("the long stream")?;
            pings += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(pings)
    });
    let started = Instant::now();

    let state = b.dir.path().join("state");
    let td = membrane_identity::spiffe_id::parse_trust_domain(B)?;
    rotation::request(&state, &td, Duration::from_secs(3600))?;
    let renewed_before = mesh.ztunnels["node-b"].renewals(None).len();
    let (mut saw_signing, mut connections) = (false, 0u32);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let phase = rotation::read_phase(&state)?;
        echo(&mesh, "trainer", dst, b"during")
            .await
            .with_context(|| format!("new connection {connections} in phase {phase:?}"))?;
        ensure!(
            !pinger.is_finished(),
            "the long stream ended: {:?}",
            pinger.await
        );
        connections += 1;
        saw_signing |= matches!(phase, Phase::Signing { .. });
        // Done once the rotation is over and B's model server has renewed under the new root.
        let renewed = mesh.ztunnels["node-b"].renewals(None).len() > renewed_before + 2;
        if saw_signing && phase == Phase::Idle && renewed {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "rotation not done: phase {phase:?}, {connections} connections"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(
        connections >= 4,
        "only {connections} connections during the rotation"
    );
    // A's ztunnels follow B's bundle down to the new root alone, and traffic still flows.
    let b_roots = membrane_tests::pem_certificates(&b.root_pem());
    ensure!(b_roots.len() == 1, "B still holds {} roots", b_roots.len());
    until(
        "A trusts B's new root only",
        Duration::from_secs(15),
        || async { Ok(mesh.ca().federated_roots("node-a", B).await? == b_roots) },
    )
    .await?;
    // A's import stream, verified under B's old root, ended when that root left B's bundle and
    // was dialled again, verified against the new one.
    let td_label = format!("trust_domain=\"{B}\"");
    until(
        "A's import stream redialled under B's new root",
        Duration::from_secs(15),
        || async {
            let metrics = mesh.ca().metrics().await?;
            let ends = membrane_tests::metric_sum(
                &metrics,
                "membrane_ca_federated_import_stream_ends_total",
                &[&td_label, "reason=\"bundle_changed\""],
            );
            let open = membrane_tests::metric_sum(
                &metrics,
                "membrane_ca_federated_import_streams_open",
                &[&td_label],
            );
            Ok(ends >= 1.0 && open == 1.0)
        },
    )
    .await?;
    echo(&mesh, "trainer", dst, b"after")
        .await
        .context("after the rotation")?;
    // The long stream lived through the whole rotation and still answers after it.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let pings = pinger
        .await?
        .context("the long stream after the rotation")?;
    let expected = u32::try_from(started.elapsed().as_millis() / 200).unwrap_or(u32::MAX);
    ensure!(
        pings >= expected,
        "the long stream answered only {pings} pings in {:?}",
        started.elapsed()
    );
    drop(mesh);
    drop(b);
    Ok(())
}

/// Pod networks that are not flat: A's pods have no route to B's, and B's east-west gateway
/// (node-c) is the only way in. The trainer still reaches the model server by name — double
/// HBONE: an outer tunnel to the gateway, the end-to-end tunnel inside it — and B decides on
/// the trainer's own identity, not the gateway's; B's policy still denies A's scraper. On the
/// WAN nothing is plaintext and every packet A exchanges with B has B's gateway at its other
/// end; the gateway counts the tunnel it relayed; B's address rules fail closed for the
/// relayed source, whose address B cannot know.
#[tokio::test]
#[ignore = "needs root"]
async fn through_an_east_west_gateway_when_pod_networks_are_not_flat() -> anyhow::Result<()> {
    require_root()?;
    // One connection per peer address on every pod's HBONE listener: behind B's gateway all
    // of A's sources share the gateway's address, which B's ztunnel exempts from that cap (the
    // gateway limits each source identity itself) — the trainer's pooled tunnel connection
    // and the scraper's below are both admitted.
    let TwoClusters { mesh, b, dst, .. } = two_clusters(Options {
        east_west: true,
        ztunnel_args: vec!["--pod-max-connections-per-peer=1".into()],
        ..Options::default()
    })
    .await?;
    let capture = mesh.testbed.capture_fabric()?;
    let marker = format!("THROUGH-THE-GATEWAY-{}", mesh.testbed.id());
    until(
        "the trainer reaches the model server through B's gateway",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, marker.as_bytes()).await.is_ok()) },
    )
    .await?;
    let captured = capture.stop();
    ensure!(
        !captured.contains(marker.as_bytes()),
        "the payload crossed the WAN in plaintext"
    );
    let node_a = mesh.testbed.node("node-a").context("node-a")?;
    let a_side: Vec<std::net::IpAddr> = ["trainer", "scraper", "store"]
        .iter()
        .flat_map(|p| [mesh.ip(p), mesh.ip6(p)])
        .chain([node_a.fabric_ip().into(), node_a.fabric_ip6().into()])
        .collect();
    let gateway = [mesh.ip("ew-gateway"), mesh.ip6("ew-gateway")];
    let crossing: Vec<_> = (captured.ip_pairs.iter())
        .filter(|(s, d)| a_side.contains(s) != a_side.contains(d))
        .collect();
    ensure!(!crossing.is_empty(), "no packet of A's crossed the WAN");
    for (s, d) in &crossing {
        let other = if a_side.contains(s) { d } else { s };
        ensure!(
            gateway.contains(other),
            "A exchanged packets with {other}, not B's gateway ({s} -> {d})"
        );
    }

    // B decides on A's real identity through the gateway as directly.
    b_records_the_trainer_and_denies_the_scraper(&mesh, dst).await?;
    // The gateway admitted the outer tunnel (its record is written when the pooled tunnel
    // ends; the counter moves at admission).
    let admitted = membrane_tests::ztunnel_metric(
        &mesh,
        "node-c",
        "membrane_gateway_connections_total",
        &[r#"kind="east-west""#, r#"result="admitted""#],
    )
    .await?;
    ensure!(admitted >= 1.0, "B's gateway admitted no tunnel");

    let trainer = format!("spiffe://{A}/ns/training/sa/trainer");
    // Behind the gateway the source address is unknown to B: an address rule fails closed.
    // A DENY on a range no pod uses refuses the trainer, as it would not on flat networks.
    b.write_manifest(
        "deny-by-address.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-doc-range, namespace: inference}\nspec:\n  action: DENY\n  rules: [{from: [{source: {ipBlocks: [192.0.2.0/24]}}]}]\n",
    )?;
    until(
        "B's address rule refuses the relayed trainer",
        Duration::from_secs(20),
        || async { Ok(echo(&mesh, "trainer", dst, b"by address").await.is_err()) },
    )
    .await?;
    let refused = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| {
                r["src_identity"] == trainer.as_str()
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.contains("no-doc-range"))
            },
            Duration::from_secs(5),
        )
        .await;
    ensure!(refused.is_some(), "no record of the address rule's refusal");
    drop(mesh);
    drop(b);
    Ok(())
}

/// B's inbound record of the trainer's tunnel names A's trainer (B decides on the real source
/// identity), and B's policy, which admits only that trainer, refuses A's scraper with its
/// reason recorded.
/// B stops federating A (A still federates B and imports its Services): a tunnel from A
/// already open is closed by B, a handshake from an A pod with no pooled connection to B yet
/// (the store) fails at B with the reason in B's log; federated again, the trainer gets
/// through.
async fn b_stops_federating_a(mesh: &Mesh, b: &TestCa, dst: SocketAddr) -> anyhow::Result<()> {
    let node_b = &mesh.ztunnels["node-b"];
    let lines = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        let logs = node_b.logs.lock().map(|l| l.clone()).unwrap_or_default();
        (logs.iter())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| pred(v))
            .count()
    };
    let forgot_a = |v: &serde_json::Value| {
        v["message"] == "federated trust bundles updated"
            && v["trust_domains"]
                .as_str()
                .is_some_and(|tds| !tds.contains(A))
    };
    let mut held = mesh.connect_from("trainer", dst).await?;
    ping(&mut held)
        .await
        .context("a tunnel before the change")?;
    let file = b.manifests_dir().join("federation-a.yaml");
    let manifest = std::fs::read(&file)?;
    let before = lines(&forgot_a);
    std::fs::remove_file(&file)?;
    until(
        "B's ztunnel drops A's trust domain",
        Duration::from_secs(20),
        || async { Ok(lines(&forgot_a) > before) },
    )
    .await?;
    ensure!(
        ping(&mut held).await.is_err(),
        "B left a tunnel from a trust domain it no longer federates open"
    );
    ensure!(
        echo(mesh, "store", dst, b"unfederated").await.is_err(),
        "B accepted a handshake from a trust domain it no longer federates"
    );
    let not_federated = |v: &serde_json::Value| {
        v["message"] == "HBONE connection refused or failed"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("trust domain {A} is not federated")))
    };
    let said = until(
        "B logs why it refused the handshake",
        Duration::from_secs(5),
        || async { Ok(lines(&not_federated) > 0) },
    )
    .await;
    if said.is_err() {
        let logs = node_b.logs.lock().map(|l| l.clone()).unwrap_or_default();
        let related: Vec<&String> = (logs.iter())
            .filter(|l| l.contains("federated") || l.contains("HBONE") || l.contains("handshake"))
            .collect();
        anyhow::bail!("B did not log why it refused the handshake: {related:#?}");
    }
    std::fs::write(&file, manifest)?;
    until(
        "the trainer gets through once B federates A again",
        Duration::from_secs(30),
        || async { Ok(echo(mesh, "trainer", dst, b"again").await.is_ok()) },
    )
    .await
}

async fn b_records_the_trainer_and_denies_the_scraper(
    mesh: &Mesh,
    dst: SocketAddr,
) -> anyhow::Result<()> {
    let trainer = format!("spiffe://{A}/ns/training/sa/trainer");
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(5),
        )
        .await
        .context("no inbound record in cluster B")?;
    ensure!(
        record["src_identity"] == trainer.as_str(),
        "B's record names {}: {record}",
        record["src_identity"]
    );
    ensure!(
        echo(mesh, "scraper", dst, b"scrape").await.is_err(),
        "cluster B's policy let A's scraper through"
    );
    let scraper = format!("spiffe://{A}/ns/monitoring/sa/scraper");
    let denied = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| {
                r["direction"] == "inbound"
                    && r["src_identity"] == scraper.as_str()
                    && r["reason"]
                        .as_str()
                        .is_some_and(|why| why.contains("no ALLOW policy"))
            },
            Duration::from_secs(5),
        )
        .await;
    ensure!(
        denied.is_some(),
        "B did not deny A's scraper by its policy: {:#?}",
        mesh.ztunnels["node-b"].access_records()
    );
    Ok(())
}
