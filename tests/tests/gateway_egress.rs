//! The egress gateway end to end, in network namespaces with real ztunnels (one of them in
//! gateway mode, alone on its node), the controller's directory source and the simulated
//! outside world: a `via` rule's connections leave from the gateway's address and never from
//! the source's node, both records name the source identity, the name and the gateway, a
//! forged CONNECT with another identity's valid SVID is refused by the gateway, budgets are
//! counted at the gateway, one source pod holds only its share of the gateway's tunnels, and
//! a gateway restart fails open tunnels cleanly.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use membrane_identity::crypto_provider;
use membrane_tests::dns::resolve;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::Capture;
use membrane_tests::outside::{hello, tls_hello, tls_open};
use membrane_tests::world::{SINK_PORT, World};
use membrane_tests::{http_get, identity, node_token, require_root, ztunnel_metric};
use membrane_ztunnel::hbone::{self, ConnectHeaders, HboneError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A resolver address nothing serves: only the capture answers it.
const RESOLVER: &str = "192.0.2.53:53";
const HF: &str = "198.51.100.10:443";
const GW_NODE: &str = "gw-egress";
const GATEWAY: &str = "egress/egress";

const POLICY: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: hub, namespace: training}
spec:
  action: ALLOW
  rules:
  - from: [{principals: [\"cluster.local/ns/training/sa/trainer\"]}]
    to: [{hosts: [huggingface.co], ports: [443]}]
    via: {gateway: egress, namespace: egress}
  - from: [{principals: [\"cluster.local/ns/training/sa/trainer\"]}]
    to: [{hosts: [s3.example], ports: [9000]}]
    via: {gateway: egress, namespace: egress}
  budget: {sentBytes: 1Mi, per: 60s}
";

fn spec() -> MeshSpec {
    spec_with(&[])
}

fn spec_with(extra_args: &[&str]) -> MeshSpec {
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("helper", "training", "helper", "node-a"),
            PodDef::gateway(
                "egress-gw",
                "egress",
                "egress-gateway",
                GW_NODE,
                "egress",
                "egress",
            ),
        ],
        &["training"],
    );
    spec.nodes.push(GW_NODE.to_owned());
    spec.ztunnel_args = vec![
        "--dns-upstream".to_owned(),
        membrane_tests::world::RESOLVER.to_string(),
    ];
    spec.ztunnel_args
        .extend(extra_args.iter().map(|a| (*a).to_owned()));
    spec.extra_manifests = vec![("egress.yaml".into(), POLICY.into())];
    spec
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

async fn start() -> anyhow::Result<(Mesh, World)> {
    start_with(spec()).await
}

async fn start_with(spec: MeshSpec) -> anyhow::Result<(Mesh, World)> {
    let mut mesh = Mesh::start(spec).await?;
    let world = World::start(&mut mesh.testbed)?;
    mesh.enroll("trainer").await?;
    wait_ready(&mesh, GW_NODE, Duration::from_secs(20)).await?;
    Ok((mesh, world))
}

/// Waits until `node`'s ztunnel reports ready.
async fn wait_ready(mesh: &Mesh, node: &str, bound: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok((200, _)) = http_get(mesh.ztunnels[node].readiness, "/healthz/ready").await {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{node} never turned ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first record of `node` matching `pred` (5 s bound).
async fn record(mesh: &Mesh, node: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    mesh.ztunnels[node]
        .wait_for_record(pred, Duration::from_secs(5))
        .await
        .ok_or_else(|| anyhow::anyhow!("no such record on {node}"))
}

/// The upload sink, once the trainer has resolved s3.example (the gateway's rule is by name).
fn s3_sink(mesh: &Mesh) -> anyhow::Result<SocketAddr> {
    resolve(
        &mesh.netns_path("trainer"),
        addr(RESOLVER),
        "s3.example",
        RecordType::A,
    )?;
    Ok(SocketAddr::new(IpAddr::from([198, 51, 100, 30]), SINK_PORT))
}

/// Whether the captured frames carry an IPv4 header addressed to `ip` (its 4 bytes).
fn saw(captured: &membrane_tests::netns::Captured, ip: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().expect("ipv4");
    captured.contains(&ip.octets())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_via_rule_leaves_from_the_gateway_and_never_from_the_node() -> anyhow::Result<()> {
    require_root()?;
    let (mut mesh, world) = start().await?;
    let gw_ip = mesh.ip("egress-gw");
    // Resolved before the capture starts: the DNS answer carries the address too.
    resolve(
        &mesh.netns_path("trainer"),
        addr(RESOLVER),
        "huggingface.co",
        RecordType::A,
    )?;
    let node_a = mesh.testbed.node("node-a").expect("node-a").clone();
    let uplink = Capture::start(node_a.netns_path(), node_a.ifname())?;

    let line = tls_hello(&mesh, "trainer", &world, addr(HF), "huggingface.co").await?;
    assert!(line.contains("sni=huggingface.co"), "{line}");
    assert!(
        line.contains(&format!("client={gw_ip}")),
        "not from the gateway: {line}"
    );

    let captured = uplink.stop();
    assert!(
        !saw(&captured, "198.51.100.10"),
        "node-a's uplink carried a packet to the hub"
    );
    assert!(
        saw(&captured, &gw_ip.to_string()),
        "node-a's uplink never reached the gateway"
    );

    let trainer = mesh.spiffe_id("trainer");
    let at_gateway = record(&mesh, GW_NODE, |r| {
        r["direction"] == "egress_gateway" && r["result"] != "refused"
    })
    .await?;
    assert_eq!(
        at_gateway["src_identity"],
        trainer.as_str(),
        "{at_gateway:#}"
    );
    assert_eq!(
        at_gateway["egress"]["host"], "huggingface.co",
        "{at_gateway:#}"
    );
    assert_eq!(at_gateway["egress"]["via"], GATEWAY, "{at_gateway:#}");
    assert_eq!(at_gateway["dst_addr"], HF, "{at_gateway:#}");
    let at_source = record(&mesh, "node-a", |r| {
        r["direction"] == "outbound" && r["dst_addr"] == HF && r["result"] != "refused"
    })
    .await?;
    assert_eq!(at_source["src_identity"], trainer.as_str(), "{at_source:#}");
    assert_eq!(
        at_source["egress"]["host"], "huggingface.co",
        "{at_source:#}"
    );
    assert_eq!(at_source["egress"]["via"], GATEWAY, "{at_source:#}");

    // Restart: an open tunnel fails cleanly, new ones work once the gateway is ready again.
    let mut open = tls_open(&mesh, "trainer", &world, addr(HF), "huggingface.co").await?;
    hello(&mut open).await?;
    mesh.restart_ztunnel(GW_NODE)?;
    let broken = async {
        open.write_all(b"still there?\n").await?;
        hello(&mut open).await
    };
    match tokio::time::timeout(Duration::from_secs(10), broken).await {
        Ok(Err(_)) => {}
        Ok(Ok(line)) => anyhow::bail!("a tunnel survived the gateway's restart: {line}"),
        Err(_) => anyhow::bail!("a tunnel of the stopped gateway hung instead of failing"),
    }
    wait_ready(&mesh, GW_NODE, Duration::from_secs(20)).await?;
    let line = tls_hello(&mesh, "trainer", &world, addr(HF), "huggingface.co").await?;
    assert!(line.contains(&format!("client={gw_ip}")), "{line}");

    // With the gateway gone the connection is refused; it never leaves from the node.
    let uplink = Capture::start(node_a.netns_path(), node_a.ifname())?;
    drop(mesh.ztunnels.remove(GW_NODE));
    assert!(
        tls_hello(&mesh, "trainer", &world, addr(HF), "huggingface.co")
            .await
            .is_err(),
        "reached the hub with the gateway down"
    );
    let captured = uplink.stop();
    assert!(
        !saw(&captured, "198.51.100.10"),
        "the node went direct with the gateway down"
    );
    Ok(())
}

/// An HBONE client in pod `from` presenting a valid SVID of `training/<sa>` (issued by the
/// controller to node-a, where that pod runs) to the gateway.
async fn forged(
    mesh: &Mesh,
    from: &str,
    sa: &str,
    authority: &str,
    headers: ConnectHeaders,
) -> anyhow::Result<hbone::H2Stream> {
    let source = identity("training", sa);
    let gateway = identity("egress", "egress-gateway");
    let (svid, _) = mesh
        .ca()
        .client(&node_token("node-a"))
        .await?
        .request_svid(&source, Duration::ZERO)
        .await?;
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    let headers = ConnectHeaders {
        host: Some(host.to_owned()),
        ..headers
    };
    let dst = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port.parse()?);
    Ok(membrane_tests::hbone::connect_as(
        mesh,
        from,
        &svid,
        membrane_tests::hbone::mesh_bundle(mesh)?,
        gateway.spiffe_id(),
        mesh.ip("egress-gw"),
        crypto_provider(),
        dst,
        headers,
    )
    .await?)
}

fn refused_403(result: anyhow::Result<hbone::H2Stream>) {
    match result {
        Err(e) => match e.downcast_ref::<HboneError>() {
            Some(HboneError::Refused(s)) => assert_eq!(s.as_u16(), 403, "{s}"),
            _ => panic!("expected 403, got {e:#}"),
        },
        Ok(_) => panic!("expected 403, the tunnel was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn the_gateway_decides_again_and_refuses_forged_requests() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, _world) = start().await?;
    // helper is in training but no rule lets it out: its own valid SVID, sent straight to
    // the gateway (no source ztunnel in between), claims nothing the gateway believes.
    let claims = ConnectHeaders {
        forwarded_for: Some(mesh.ip("trainer")),
        baggage: Some("membrane.egress.verdict=allow".into()),
        ..ConnectHeaders::default()
    };
    refused_403(forged(&mesh, "helper", "helper", "huggingface.co:443", claims).await);
    let r = record(&mesh, GW_NODE, |r| {
        r["direction"] == "egress_gateway" && r["result"] == "refused"
    })
    .await?;
    assert_eq!(
        r["src_identity"],
        mesh.spiffe_id("helper").as_str(),
        "{r:#}"
    );
    assert_eq!(r["egress"]["verdict"], "deny", "{r:#}");
    assert!(
        ztunnel_metric(
            &mesh,
            GW_NODE,
            "membrane_gateway_connections_total",
            &["result=\"refused\""]
        )
        .await?
            >= 1.0
    );
    // trainer's SVID is valid and allowed, but presented from helper's address: refused.
    refused_403(
        forged(
            &mesh,
            "helper",
            "trainer",
            "huggingface.co:443",
            ConnectHeaders::default(),
        )
        .await,
    );
    assert!(
        ztunnel_metric(
            &mesh,
            GW_NODE,
            "membrane_gateway_connections_total",
            &["reason=\"unknown_source\""]
        )
        .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn budgets_are_counted_at_the_gateway() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    let sink = s3_sink(&mesh)?;
    let mut upload = mesh.connect_from("trainer", sink).await?;
    let chunk = vec![7u8; 64 * 1024];
    // Four times the budget (bounded), then the connection must be closed by the gateway.
    let offered = async {
        for _ in 0..64 {
            if upload.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let mut buf = [0u8; 16];
        upload.read(&mut buf).await
    };
    let ended = tokio::time::timeout(Duration::from_secs(20), offered).await;
    assert!(
        matches!(ended, Ok(Ok(0) | Err(_))),
        "the upload was not closed (sunk {}): {ended:?}",
        world.sunk()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sunk = world.sunk();
    assert!(
        sunk <= 1 << 20,
        "{sunk} bytes reached the sink past a 1 MiB budget"
    );
    assert!(sunk >= 512 << 10, "only {sunk} bytes reached the sink");
    let r = record(&mesh, GW_NODE, |r| {
        r["direction"] == "egress_gateway" && r["egress"]["reason"] == "budget_exhausted"
    })
    .await?;
    assert_eq!(
        r["src_identity"],
        mesh.spiffe_id("trainer").as_str(),
        "{r:#}"
    );
    // The window is spent: the next upload is refused at the gateway.
    let mut again = mesh.connect_from("trainer", sink).await?;
    let refused = async {
        for _ in 0..16 {
            if again.write_all(&chunk).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .unwrap_or(false)
    );
    assert_eq!(world.sunk(), sunk, "bytes got through a spent window");
    assert!(
        ztunnel_metric(
            &mesh,
            GW_NODE,
            "membrane_egress_budget_exhausted_total",
            &[]
        )
        .await?
            >= 1.0
    );
    Ok(())
}

/// Whether the connection is closed (or reset) within `within`; the sink never answers.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn one_source_pod_holds_its_share_of_the_gateways_tunnels() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, _world) = start_with(spec_with(&["--pod-max-connections-per-peer", "4"])).await?;
    let sink = s3_sink(&mesh)?;
    // Six uploads held open at once: each is a tunnel to the gateway and a socket out of it.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = mesh.connect_from("trainer", sink).await?;
        s.write_all(b"x").await?;
        held.push(s);
        // In order: the first four take the share, the last two are over it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut closed = Vec::new();
    for s in &mut held {
        closed.push(closed_within(s, Duration::from_millis(1500)).await);
    }
    assert_eq!(
        closed,
        [false, false, false, false, true, true],
        "the gateway keeps four tunnels of one source pod"
    );
    let over = ztunnel_metric(
        &mesh,
        GW_NODE,
        "membrane_gateway_connections_total",
        &["reason=\"peer_limit\""],
    )
    .await?;
    assert_eq!(over, 2.0, "refusals over the share");
    // Places are given back when tunnels end.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = mesh.connect_from("trainer", sink).await?;
    again.write_all(b"y").await?;
    assert!(
        !closed_within(&mut again, Duration::from_millis(1500)).await,
        "a tunnel after the others ended"
    );
    Ok(())
}
