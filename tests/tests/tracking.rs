//! Connection tracking in an enrolled pod: the capture's redirects need it, the ztunnel's
//! tunnels and the pod's loopback connections do not. A tunnel leaves no conntrack entry in
//! either pod — its packets skip the per-packet tracking —, nor does the destination
//! ztunnel's connection to the application, while the connections the capture redirected
//! stay tracked (their answers are translated back), and traffic from outside the mesh that
//! only claims to be a tunnel (source port 15008, or a listener carrying the ztunnel's mark,
//! which a pod with `CAP_NET_RAW` can set) has its SYN tracked and redirected to the
//! plaintext capture, and never reaches the application.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::run_in_netns;
use membrane_ztunnel::netns::ZTUNNEL_MARK;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
/// A second application port, whose listener carries the ztunnel's mark.
const MARKED_PORT: u16 = 8081;

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
async fn accepted_tunnels_and_loopback_are_untracked_and_redirects_stay_tracked()
-> anyhow::Result<()> {
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

    // A pod outside the mesh connecting from source port 15008, and to a listener of the
    // store's that carries the ztunnel's mark (any pod with CAP_NET_RAW can set it) while the
    // store answers every handshake with a SYN cookie (no request socket in between): neither
    // is a tunnel, so each SYN is tracked and redirected to the plaintext capture (15006)
    // like any other inbound connection's; the capture refuses plaintext here, and what
    // follows a refused handshake cannot open one elsewhere. Had a SYN skipped the capture,
    // the application would have answered.
    let marked = mesh.echo_app_marked("store", MARKED_PORT, Some(ZTUNNEL_MARK))?;
    let cookies = mesh.testbed.exec(
        mesh.pod("store"),
        &["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"],
    )?;
    anyhow::ensure!(cookies.status.success(), "syncookies: {cookies:?}");
    let marked_dst = SocketAddr::new(mesh.ip("store"), MARKED_PORT);
    for (what, from_port, dst) in [
        ("from source port 15008", 15008, dst),
        ("to a marked listener", 0, marked_dst),
    ] {
        let attempt = run_in_netns(mesh.netns_path("legacy"), move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], from_port)).into())?;
            socket.connect_timeout(&dst.into(), Duration::from_secs(5))?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
        })?;
        let store = conntrack(&mesh, "store")?;
        assert!(
            with_port(&store, dst.port())
                .iter()
                .any(|l| l.contains("sport=15006 ")),
            "the SYN of plaintext {what} must be tracked and redirected: {store:?}"
        );
        // The refusal may come before the connect has returned, or at the first exchange.
        match attempt {
            Ok(s) => {
                s.set_nonblocking(true)?;
                let refused = echo(tokio::net::TcpStream::from_std(s)?).await;
                assert!(refused.is_err(), "plaintext {what} reached the application");
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "only the tunnelled one");
    assert_eq!(marked.load(Ordering::SeqCst), 0, "the marked listener");

    meshed
        .shutdown()
        .await
        .context("closing the tunnelled connection")?;
    Ok(())
}
