//! The ingress gateway end to end: clients in the simulated internet reach the model server
//! only through the gateway (TLS passthrough by SNI, TCP by port), bytes intact, the hop to
//! the model server's node encrypted; the model server's record names the gateway and the
//! client; `remoteIpBlocks` refuses one client and admits another; unknown server names and
//! direct plaintext are refused; another namespace's route to an unknown Service, on the
//! shared listener, is left out on its own — present from the start, the gateway still turns
//! ready, and every other route, including one added afterwards, is served; the gateway
//! carries more tunnels to one backend than one peer address's share; a client connection
//! that carries nothing for the idle timeout is closed, a busy one is not.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::Capture;
use membrane_tests::outside::{client_hello, connect_from_internet, echo_from_internet};
use membrane_tests::world::World;
use membrane_tests::{http_get, require_root, ztunnel_metric};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GW_NODE: &str = "gw-ingress";
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 78);

const MANIFESTS: &str = "apiVersion: v1
kind: Service
metadata: {name: model-server, namespace: inference}
spec:
  clusterIP: 10.96.0.20
  selector: {app: model-server}
  ports: [{name: tls, port: 8443, targetPort: 8443}, {name: raw, port: 8080, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: inference}
spec:
  gatewayClassName: membrane
  listeners:
  - {name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}, allowedRoutes: {namespaces: {from: All}}}
  - {name: raw, port: 8080, protocol: TCP}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: model-api, namespace: inference}
spec:
  parentRefs: [{name: ingress, sectionName: tls}]
  hostnames: [api.models.example]
  rules: [{backendRefs: [{name: model-server, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: model-raw, namespace: inference}
spec:
  parentRefs: [{name: ingress, sectionName: raw}]
  rules: [{backendRefs: [{name: model-server, port: 8080}]}]
";

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: through-the-gateway, namespace: inference}
spec:
  selector: {matchLabels: {app: model-server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/inference/sa/ingress-gateway]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-one-client, namespace: inference}
spec:
  action: DENY
  rules: [{from: [{source: {remoteIpBlocks: [198.51.100.78/32]}}]}]
";

/// Another namespace's route on the shared TLS listener, to a Service that does not exist.
const BROKEN_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: new-model, namespace: apps}
spec:
  parentRefs: [{name: ingress, namespace: inference, sectionName: tls}]
  hostnames: [new.models.example]
  rules: [{backendRefs: [{name: no-such-service, port: 8443}]}]
";

/// A route added while the broken one is there.
const LATE_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: late-model, namespace: inference}
spec:
  parentRefs: [{name: ingress, sectionName: tls}]
  hostnames: [late.models.example]
  rules: [{backendRefs: [{name: model-server, port: 8443}]}]
";

fn spec() -> MeshSpec {
    spec_with(&[])
}

fn spec_with(ztunnel_args: &[&str]) -> MeshSpec {
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("model-server", "inference", "model-server", "node-b"),
            PodDef::new("client", "apps", "client", "node-a"),
            PodDef::gateway(
                "ingress-gw",
                "inference",
                "ingress-gateway",
                GW_NODE,
                "ingress",
                "ingress",
            ),
        ],
        &["inference", "apps"],
    );
    spec.nodes.push(GW_NODE.to_owned());
    spec.policies = POLICIES.to_owned();
    spec.extra_manifests = vec![("ingress.yaml".into(), MANIFESTS.into())];
    spec.ztunnel_args = ztunnel_args.iter().map(|a| (*a).to_owned()).collect();
    spec
}

async fn start() -> anyhow::Result<(Mesh, World)> {
    start_with(spec()).await
}

async fn start_with(spec: MeshSpec) -> anyhow::Result<(Mesh, World)> {
    let mut mesh = Mesh::start(spec).await?;
    let world = World::start(&mut mesh.testbed)?;
    mesh.enroll("model-server").await?;
    mesh.enroll("client").await?;
    mesh.echo_app("model-server", 8443)?;
    mesh.echo_app("model-server", 8080)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        http_get(mesh.ztunnels[GW_NODE].readiness, "/healthz/ready").await,
        Ok((200, _))
    ) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ingress gateway never turned ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((mesh, world))
}

/// Sends `bytes` from `source` to `dst` and expects them echoed intact (5 s bound).
async fn echoed(
    world: &World,
    source: Ipv4Addr,
    dst: SocketAddr,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let got = echo_from_internet(world, source, dst, bytes).await?;
    anyhow::ensure!(got == bytes, "the bytes came back changed");
    Ok(())
}

/// Expects the connection from `source` to `dst` to carry nothing back.
async fn refused(world: &World, source: Ipv4Addr, dst: SocketAddr, bytes: &[u8]) {
    assert!(
        echoed(world, source, dst, bytes).await.is_err(),
        "{source} → {dst} was carried"
    );
}

async fn record(mesh: &Mesh, node: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    mesh.ztunnels[node]
        .wait_for_record(pred, Duration::from_secs(5))
        .await
        .ok_or_else(|| anyhow::anyhow!("no such record on {node}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn external_clients_reach_the_model_server_only_through_the_gateway() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    let gw = mesh.ip("ingress-gw");
    let model = mesh.ip("model-server");
    let node_b = mesh.testbed.node("node-b").expect("node-b").clone();
    let gw_node = mesh.testbed.node(GW_NODE).expect("gateway node").clone();
    let to_b = Capture::start(node_b.netns_path(), node_b.ifname())?;
    let at_gw = Capture::start(gw_node.netns_path(), gw_node.ifname())?;

    // TLS passthrough by server name: the ClientHello and what follows arrive unopened.
    let marker = b"INGRESS-PLAINTEXT-MARKER-0451";
    let mut hello = client_hello("api.models.example")?;
    hello.extend_from_slice(marker);
    echoed(&world, ALLOWED, SocketAddr::new(gw, 443), &hello).await?;
    // TCP by port.
    echoed(&world, ALLOWED, SocketAddr::new(gw, 8080), marker).await?;
    let (to_b, at_gw) = (to_b.stop(), at_gw.stop());
    assert!(
        at_gw.contains(marker),
        "the capture at the gateway saw no client bytes"
    );
    assert!(
        !to_b.contains(marker),
        "plaintext crossed to the model server's node"
    );

    let gateway_id = mesh.spiffe_id("ingress-gw");
    let r = record(&mesh, "node-b", |r| {
        r["direction"] == "inbound" && r["dst_addr"] == format!("{model}:8443")
    })
    .await?;
    assert_eq!(r["src_identity"], gateway_id.as_str(), "{r:#}");
    assert_eq!(r["forwarded_for"], ALLOWED.to_string(), "{r:#}");
    let r = record(&mesh, GW_NODE, |r| {
        r["direction"] == "ingress_gateway" && r["dst_addr"] == format!("{model}:8443")
    })
    .await?;
    assert_eq!(
        r["src_addr"]
            .as_str()
            .map(|a| a.starts_with(&ALLOWED.to_string())),
        Some(true),
        "{r:#}"
    );

    // remoteIpBlocks at the destination: the blocked client is refused, the other admitted.
    refused(&world, BLOCKED, SocketAddr::new(gw, 8080), marker).await;
    let r = record(&mesh, "node-b", |r| {
        r["direction"] == "inbound"
            && r["result"] == "refused"
            && r["forwarded_for"] == BLOCKED.to_string()
    })
    .await?;
    assert_eq!(
        r["authorization"]["policy"], "inference/block-one-client",
        "{r:#}"
    );
    echoed(&world, ALLOWED, SocketAddr::new(gw, 8080), marker).await?;

    // Unknown server name, unknown port: refused at the gateway, recorded.
    refused(
        &world,
        ALLOWED,
        SocketAddr::new(gw, 443),
        &client_hello("evil.example")?,
    )
    .await;
    record(&mesh, GW_NODE, |r| {
        r["direction"] == "ingress_gateway" && r["reason"] == "ingress unknown_sni"
    })
    .await?;
    assert!(
        connect_from_internet(&world, ALLOWED, SocketAddr::new(gw, 9999))
            .await
            .is_err()
    );
    // Straight to the pod, in plaintext: refused as before.
    refused(&world, ALLOWED, SocketAddr::new(model, 8080), marker).await;
    assert!(
        ztunnel_metric(
            &mesh,
            GW_NODE,
            "membrane_gateway_connections_total",
            &["reason=\"unknown_sni\""]
        )
        .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn mesh_pods_reach_tcp_routes_over_hbone_and_are_told_why_not_tls_ones() -> anyhow::Result<()>
{
    require_root()?;
    let (mesh, _world) = start().await?;
    let gw = mesh.ip("ingress-gw");
    let client = mesh.ip("client");
    let node_a = mesh.testbed.node("node-a").expect("node-a").clone();
    let uplink = Capture::start(node_a.netns_path(), node_a.ifname())?;
    let marker = b"IN-MESH-CLIENT-MARKER-7731";
    let mut s = mesh
        .connect_from("client", SocketAddr::new(gw, 8080))
        .await?;
    s.write_all(marker).await?;
    let mut got = vec![0u8; marker.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
    assert_eq!(&got, marker);
    drop(s);
    assert!(
        !uplink.stop().contains(marker),
        "plaintext left the client's node"
    );
    let r = record(&mesh, "node-b", |r| {
        r["direction"] == "inbound" && r["forwarded_for"] == client.to_string()
    })
    .await?;
    assert_eq!(
        r["src_identity"],
        mesh.spiffe_id("ingress-gw").as_str(),
        "{r:#}"
    );
    let r = record(&mesh, GW_NODE, |r| {
        r["direction"] == "ingress_gateway"
            && r["src_identity"] == mesh.spiffe_id("client").as_str()
    })
    .await?;
    assert_ne!(r["result"], "refused", "{r:#}");
    // A TLS listener cannot route a tunnel by server name: refused, with the reason recorded.
    let tls = async {
        let mut s = mesh
            .connect_from("client", SocketAddr::new(gw, 443))
            .await?;
        s.write_all(&client_hello("api.models.example")?).await?;
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        anyhow::Ok(n)
    };
    assert!(
        !matches!(tls.await, Ok(n) if n > 0),
        "a TLS route answered a tunnel"
    );
    record(&mesh, GW_NODE, |r| {
        r["result"] == "refused"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("ingress tls_from_mesh"))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_route_to_an_unknown_service_is_left_out_and_every_other_route_is_served()
-> anyhow::Result<()> {
    require_root()?;
    // The broken route is there from the controller's start: the gateway still gets its
    // table (start_with waits for it to turn ready).
    let mut spec = spec();
    spec.extra_manifests
        .push(("broken-route.yaml".into(), BROKEN_ROUTE.into()));
    let (mesh, world) = start_with(spec).await?;
    let gw = mesh.ip("ingress-gw");
    // The controller refuses that route alone, counted by reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = mesh.ca().metrics().await?;
        if metrics.lines().any(|l| {
            l.starts_with("membrane_ca_discovery_ingress_routes_refused_total")
                && l.contains("reason=\"backend_not_found\"")
                && !l.ends_with(" 0")
        }) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broken route was never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hello = client_hello("api.models.example")?;
    hello.extend_from_slice(b"still-routed");
    echoed(&world, ALLOWED, SocketAddr::new(gw, 443), &hello).await?;
    echoed(
        &world,
        ALLOWED,
        SocketAddr::new(gw, 8080),
        b"raw-still-routed",
    )
    .await?;
    refused(
        &world,
        ALLOWED,
        SocketAddr::new(gw, 443),
        &client_hello("new.models.example")?,
    )
    .await;
    // A route added while the broken one stays is applied.
    mesh.write_manifest("late-route.yaml", LATE_ROUTE)?;
    let mut hello = client_hello("late.models.example")?;
    hello.extend_from_slice(b"late-routed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = echoed(&world, ALLOWED, SocketAddr::new(gw, 443), &hello).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the route added later was never served: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn the_gateway_carries_more_tunnels_to_one_backend_than_one_peers_share() -> anyhow::Result<()>
{
    require_root()?;
    // One peer address may hold 4 tunnels to a pod; the gateway speaks for many clients.
    let (mesh, world) = start_with(spec_with(&["--pod-max-connections-per-peer", "4"])).await?;
    let gw = SocketAddr::new(mesh.ip("ingress-gw"), 8080);
    // Three clients, three connections each (within each client's share at the gateway),
    // held open together: nine tunnels from the gateway's address to the model server.
    let mut held = Vec::new();
    for client in 1..=3u8 {
        for n in 0..3u8 {
            let source = Ipv4Addr::new(198, 51, 100, 100 + client);
            let mut s = connect_from_internet(&world, source, gw).await?;
            let msg = [b'a' + client, b'0' + n];
            s.write_all(&msg).await?;
            let mut got = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
            assert_eq!(got, msg, "client {client}, connection {n}");
            held.push(s);
        }
    }
    let refused = ztunnel_metric(
        &mesh,
        "node-b",
        "membrane_listener_connections_refused_total",
        &["listener=\"inbound_tunnels\""],
    )
    .await?;
    assert_eq!(refused, 0.0, "no tunnel of the gateway refused");
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn an_idle_client_connection_is_closed_and_a_busy_one_is_not() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start_with(spec_with(&["--gateway-idle-timeout", "1s"])).await?;
    let gw = SocketAddr::new(mesh.ip("ingress-gw"), 8080);
    let started = Instant::now();
    let mut idle = connect_from_internet(&world, ALLOWED, gw).await?;
    let mut busy = connect_from_internet(&world, ALLOWED, gw).await?;
    for s in [&mut idle, &mut busy] {
        s.write_all(b"hi").await?;
        let mut got = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
        assert_eq!(&got, b"hi");
    }
    // The busy one echoes a byte every 200 ms for 3.5 s: never a whole second without one.
    for i in 0..18u8 {
        busy.write_all(&[i]).await?;
        let mut got = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut got))
            .await?
            .map_err(|e| anyhow::anyhow!("the busy connection ended after {i} bytes: {e}"))?;
        assert_eq!(got, [i]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // By then (over three periods) the idle one has been closed: its read ends at once.
    let mut got = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut got)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection is still open after {:?}: {ended:?}",
        started.elapsed()
    );
    let closed = ztunnel_metric(
        &mesh,
        GW_NODE,
        "membrane_gateway_connections_total",
        &["result=\"closed\"", "reason=\"idle_timeout\""],
    )
    .await?;
    assert_eq!(closed, 1.0, "exactly the idle connection was closed");
    let rec = record(&mesh, GW_NODE, |r| r["result"] == "idle_timeout").await?;
    assert_eq!(rec["direction"], "ingress_gateway", "{rec}");
    Ok(())
}
