//! One inbound tunnel's life on the destination node: its record is opened at admission (its
//! duration is the tunnel's, the opened counter moves while it is open), and the drain on
//! SIGTERM waits for it as for any other connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use membrane_tests::ztunnel_metric;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;

/// `client` on node-a, `server` on node-b: every connection between them is an inbound
/// HBONE tunnel on node-b.
fn spec(ztunnel_args: &[&str]) -> MeshSpec {
    MeshSpec {
        ztunnel_args: ztunnel_args.iter().map(|a| (*a).to_owned()).collect(),
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("client", "training", "trainer", "node-a"),
                PodDef::new("server", "data", "feature-store", "node-b"),
            ],
            &["training", "data"],
        )
    }
}

async fn start(ztunnel_args: &[&str]) -> anyhow::Result<(Mesh, SocketAddr)> {
    let mesh = Mesh::start(spec(ztunnel_args)).await?;
    mesh.enroll("client").await?;
    mesh.enroll("server").await?;
    mesh.echo_app("server", APP_PORT)?;
    let server = SocketAddr::new(mesh.ip("server"), APP_PORT);
    Ok((mesh, server))
}

/// Whether process `pid` is still running (not exited, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Half-closes, and expects the peer's end of stream within 5 s.
async fn close(mut s: tokio::net::TcpStream) -> anyhow::Result<()> {
    s.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn an_inbound_tunnel_is_recorded_for_as_long_as_it_lived() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let (mesh, server) = start(&[]).await?;
    let client_addr_is = |r: &serde_json::Value, direction: &str| {
        r["direction"] == direction
            && r["dst_addr"] == server.to_string()
            && r["result"] != "refused"
    };
    let opened = "membrane_tcp_connections_opened_total";
    let closed = "membrane_tcp_connections_closed_total";
    let destination = ["reporter=\"destination\""];
    let opened_before = ztunnel_metric(&mesh, "node-b", opened, &destination).await?;
    let closed_before = ztunnel_metric(&mesh, "node-b", closed, &destination).await?;

    let mut s = mesh.connect_from("client", server).await?;
    ping(&mut s).await?;
    // Counted as opened while it is open, not when it closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ztunnel_metric(&mesh, "node-b", opened, &destination).await? <= opened_before {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the destination's opened counter did not move while the tunnel was open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ztunnel_metric(&mesh, "node-b", closed, &destination).await?,
        closed_before,
        "an open tunnel is not counted as closed"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    ping(&mut s).await?;
    close(s).await?;

    for (node, direction) in [("node-a", "outbound"), ("node-b", "inbound")] {
        let record = mesh.ztunnels[node]
            .wait_for_record(|r| client_addr_is(r, direction), Duration::from_secs(10))
            .await
            .ok_or_else(|| anyhow::anyhow!("no {direction} record on {node}"))?;
        let duration = record["duration_ms"].as_u64().unwrap_or(0);
        assert!(
            duration >= 2000,
            "{direction} record on {node} lasted {duration} ms for a 2.1 s tunnel: {record}"
        );
        assert_eq!(record["result"], "closed", "{record}");
        assert_eq!(record["bytes_sent"], 8, "two pings echoed: {record}");
        assert_eq!(record["bytes_received"], 8, "two pings sent: {record}");
        if direction == "inbound" {
            assert_eq!(record["authorization"]["verdict"], "allow", "{record}");
        }
    }
    let inbound = mesh.ztunnels["node-b"]
        .access_records()
        .into_iter()
        .filter(|r| client_addr_is(r, "inbound"))
        .count();
    assert_eq!(inbound, 1, "one record per tunnel on the destination");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn sigterm_on_the_destination_waits_for_its_open_inbound_tunnels() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let (mut mesh, server) = start(&["--drain-grace", "30s"]).await?;
    let mut s = mesh.connect_from("client", server).await?;
    ping(&mut s).await?;

    let pid = mesh.ztunnels["node-b"].pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    // Draining: no new listener accepts, but the open tunnel keeps carrying bytes.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            running(pid),
            "the destination ztunnel exited with a tunnel open"
        );
        ping(&mut s).await?;
    }
    // The tunnel ends: the drain is over long before its 30 s grace.
    let closed = Instant::now();
    close(s).await?;
    while running(pid) {
        anyhow::ensure!(
            closed.elapsed() < Duration::from_secs(10),
            "the destination ztunnel still runs 10 s after its last tunnel closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = mesh
        .ztunnels
        .get_mut("node-b")
        .ok_or_else(|| anyhow::anyhow!("node-b"))?
        .terminate(Duration::from_secs(5))?;
    assert!(status.success(), "drained and exited cleanly: {status}");
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["dst_addr"] == server.to_string(),
            Duration::from_secs(5),
        )
        .await
        .ok_or_else(|| anyhow::anyhow!("the drained tunnel's record was not written"))?;
    assert_eq!(record["result"], "closed", "{record}");
    Ok(())
}
