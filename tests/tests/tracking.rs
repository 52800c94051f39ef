//! Connection tracking in an enrolled pod: the capture's redirects need it, the ztunnel's
//! tunnels and loopback connections do not. A tunnel between two ztunnels (port 15008 at
//! either end) leaves no conntrack entry in either pod — its packets skip the per-packet
//! tracking —, nor does the destination ztunnel's connection to the application, while the
//! connections the capture redirected stay tracked (their answers are translated back), and
//! traffic from outside the mesh that only claims the tunnel's port (source port 15008 to an
//! application) is still tracked and redirected to the plaintext capture, which refuses it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::run_in_netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;

/// The pod's conntrack table, one line per entry.
fn conntrack(mesh: &Mesh, pod: &str) -> anyhow::Result<Vec<String>> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["cat", "/proc/net/nf_conntrack"])?;
    anyhow::ensure!(out.status.success(), "conntrack table of {pod}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" tcp "))
        .map(str::to_owned)
        .collect())
}

/// The entries of `table` in which `port` appears as either tuple's source or destination.
fn with_port(table: &[String], port: u16) -> Vec<&str> {
    let (sport, dport) = (format!("sport={port} "), format!("dport={port} "));
    table
        .iter()
        .filter(|l| {
            let l = format!("{l} ");
            l.contains(&sport) || l.contains(&dport)
        })
        .map(String::as_str)
        .collect()
}

/// Whether `pod` has an established TCP socket whose peer address ends with `:port`.
fn has_peer_port(mesh: &Mesh, pod: &str, port: u16) -> anyhow::Result<bool> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["ss", "-Htn", "state", "established"])?;
    anyhow::ensure!(out.status.success(), "ss in {pod}: {out:?}");
    let suffix = format!(":{port}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .any(|peer| peer.ends_with(&suffix)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn tunnels_are_untracked_and_captured_connections_stay_tracked() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-a"),
        ],
        &["training", "data"],
    );
    let mesh = Mesh::start(spec).await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;

    // An echo application in the store; it counts the connections it accepts.
    let accepted = mesh.echo_app("store", APP_PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), APP_PORT);
    let echo = |mut s: tokio::net::TcpStream| async move {
        s.write_all(b"hello").await?;
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await??;
        anyhow::ensure!(&got == b"hello", "echo: {got:?}");
        Ok::<_, anyhow::Error>(s)
    };

    // trainer → store through both ztunnels, held open while the tables are read.
    let mut meshed = echo(mesh.connect_from("trainer", dst).await?)
        .await
        .context("trainer to store through the mesh")?;
    assert!(
        has_peer_port(&mesh, "trainer", 15008)?,
        "the connection must have gone through a tunnel"
    );
    let (trainer, store) = (conntrack(&mesh, "trainer")?, conntrack(&mesh, "store")?);
    assert_eq!(
        with_port(&trainer, 15008),
        Vec::<&str>::new(),
        "tunnel, client side"
    );
    assert_eq!(
        with_port(&store, 15008),
        Vec::<&str>::new(),
        "tunnel, server side"
    );
    // The destination ztunnel's connection to the application, over the store's loopback:
    // nothing to translate, untracked.
    assert_eq!(
        with_port(&store, APP_PORT),
        Vec::<&str>::new(),
        "the ztunnel's connection to the application"
    );
    // The application's connection was redirected to the outbound capture: tracked, its
    // answer translated back from 15001.
    let captured = with_port(&trainer, APP_PORT);
    assert!(
        captured.iter().any(|l| l.contains("sport=15001 ")),
        "the captured connection must stay tracked: {trainer:?}"
    );

    // A pod outside the mesh connecting from source port 15008: not a tunnel, so tracked and
    // redirected to the plaintext capture (15006) like any other inbound connection, which
    // refuses it (the store's namespace does not permit plaintext). Had it skipped the
    // capture, the application would have answered.
    let from_legacy = run_in_netns(mesh.netns_path("legacy"), move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], 15008)).into())?;
        socket.connect_timeout(&dst.into(), Duration::from_secs(5))?;
        Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
    })?;
    let store = conntrack(&mesh, "store")?;
    let claimed = with_port(&store, 15008);
    assert!(
        claimed.iter().any(|l| l.contains("sport=15006 ")),
        "a plaintext connection from port 15008 must be tracked and captured: {store:?}"
    );
    // The refusal may come before the connect has returned, or at the first exchange.
    match from_legacy {
        Ok(s) => {
            s.set_nonblocking(true)?;
            let refused = echo(tokio::net::TcpStream::from_std(s)?).await;
            assert!(
                refused.is_err(),
                "plaintext from port 15008 reached the application"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "only the tunnelled one");

    meshed
        .shutdown()
        .await
        .context("closing the tunnelled connection")?;
    Ok(())
}
