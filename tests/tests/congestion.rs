//! TCP congestion control per leg (`ztunnel --pod-tcp-congestion`): an enrolled pod's
//! default becomes the pod setting (the first listed name the node lets a pod's namespace
//! have: by default cubic, else reno), so the application's sockets (which only ever talk to the
//! ztunnel over the pod's loopback) and the ztunnel's pod-side sockets use it, while the
//! ztunnel's sockets across the network (HBONE) keep the node's; leaving the mesh puts the
//! node's default back, also when the pod left while the ztunnel was down (the next run lifts
//! what the last one set); pods outside the mesh are never touched.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::run_in_netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const SYSCTL: &str = "net.ipv4.tcp_congestion_control";

/// The node's default congestion control, and a different one a pod's namespace may have (the
/// first other name the node allows) — or `None`, said as "skipped", where it allows no other.
fn node_and_pod_setting() -> anyhow::Result<Option<(String, String)>> {
    let node = std::fs::read_to_string(format!("/proc/sys/{}", SYSCTL.replace('.', "/")))?
        .trim()
        .to_owned();
    let pod = node_allowed()?.into_iter().find(|name| *name != node);
    if pod.is_none() {
        eprintln!(
            "skipped: net.ipv4.tcp_allowed_congestion_control lists nothing but the node's {node}"
        );
    }
    Ok(pod.map(|pod| (node, pod)))
}

/// What the node lets a pod's namespace choose (`net.ipv4.tcp_allowed_congestion_control`).
fn node_allowed() -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// `membrane_tcp_congestion_errors_total` of node-a's ztunnel.
async fn congestion_errors(mesh: &Mesh) -> anyhow::Result<f64> {
    let (status, body) =
        membrane_tests::http_get(mesh.ztunnels["node-a"].metrics, "/metrics").await?;
    anyhow::ensure!(status == 200, "metrics: HTTP {status}");
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix("membrane_tcp_congestion_errors_total ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0))
}

/// A mesh whose ztunnels run with `args`, with its one pod, trainer on node-a, enrolled.
async fn trainer_enrolled(args: &[&str]) -> anyhow::Result<Mesh> {
    let mut spec = MeshSpec::two_nodes(
        vec![PodDef::new("trainer", "training", "trainer", "node-a")],
        &["training"],
    );
    spec.ztunnel_args = args.iter().map(|a| (*a).to_owned()).collect();
    let mesh = Mesh::start(spec).await?;
    mesh.enroll("trainer").await?;
    Ok(mesh)
}

/// The pod's default congestion control.
fn pod_default(mesh: &Mesh, pod: &str) -> anyhow::Result<String> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["sysctl", "-n", SYSCTL])?;
    anyhow::ensure!(out.status.success(), "sysctl in {pod}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Each established TCP socket in the pod: (local address, peer address, congestion control).
fn sockets(mesh: &Mesh, pod: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["ss", "-Htni", "state", "established"])?;
    anyhow::ensure!(out.status.success(), "ss in {pod}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        // State filter given: columns are Recv-Q, Send-Q, local, peer; the details follow
        // on the next, indented line, the congestion control first.
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(details) = lines.next() else { break };
        if let ([_, _, local, peer, ..], Some(cc)) = (&cols[..], details.split_whitespace().next())
        {
            found.push(((*local).to_owned(), (*peer).to_owned(), cc.to_owned()));
        }
    }
    Ok(found)
}

/// The congestion control of the one socket matching `what`, or an error listing them all.
/// Which end of a listed socket a port is matched against.
#[derive(Clone, Copy)]
enum End<'a> {
    Local(&'a str),
    Peer(&'a str),
}
use End::{Local, Peer};

fn cc_of(
    all: &[(String, String, String)],
    what: &str,
    matches: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<String> {
    let hits: Vec<_> = all.iter().filter(|(l, p, _)| matches(l, p)).collect();
    match hits.as_slice() {
        [(_, _, cc)] => Ok(cc.clone()),
        _ => anyhow::bail!("{} sockets for {what} in {all:?}", hits.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn pods_get_the_pod_setting_and_the_tunnel_keeps_the_nodes() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let Some((node, pod)) = node_and_pod_setting()? else {
        return Ok(());
    };
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-b"),
        ],
        &["training", "data"],
    );
    spec.ztunnel_args = vec!["--pod-tcp-congestion".into(), pod.clone()];
    let mesh = Mesh::start(spec).await?;
    for p in ["trainer", "store", "legacy"] {
        assert_eq!(pod_default(&mesh, p)?, node, "{p} before enrollment");
    }
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    assert_eq!(pod_default(&mesh, "trainer")?, pod);
    assert_eq!(pod_default(&mesh, "store")?, pod);
    assert_eq!(pod_default(&mesh, "legacy")?, node, "not in the mesh");

    // One connection trainer → store through both ztunnels, held open while the sockets
    // are listed.
    let listener = run_in_netns(mesh.netns_path("store"), || {
        TcpListener::bind(("0.0.0.0", APP_PORT))
    })??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await?;
        s.write_all(&b).await?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    });
    let dst = SocketAddr::new(mesh.ip("store"), APP_PORT);
    let mut client = mesh.connect_from("trainer", dst).await?;
    client.write_all(b"hello").await?;
    let mut echo = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echo)).await??;
    assert_eq!(&echo, b"hello");

    let app_port = format!(":{APP_PORT}");
    let (trainer, store) = (sockets(&mesh, "trainer")?, sockets(&mesh, "store")?);
    // Whose sockets, which one (by the port its local or its peer address ends with), and the
    // setting it must have.
    let (app_end, node_cc, pod) = (app_port.as_str(), node.as_str(), pod.as_str());
    #[rustfmt::skip]
    let expected = [
        (&trainer, "the application's socket", Peer(app_end), pod),
        (&trainer, "the outbound capture's socket", Local(":15001"), pod),
        (&trainer, "the tunnel (client side)", Peer(":15008"), node_cc),
        (&store, "the tunnel (server side)", Local(":15008"), node_cc),
        (&store, "the application's accepted socket", Local(app_end), pod),
        (&store, "the ztunnel's socket to the application", Peer(app_end), pod),
    ];
    for (all, what, end, want) in expected {
        let cc = cc_of(all, what, |l, p| match end {
            Local(port) => l.ends_with(port),
            Peer(port) => p.ends_with(port),
        })?;
        assert_eq!(cc, want, "{what}");
    }
    client.shutdown().await?;
    tokio::time::timeout(Duration::from_secs(10), app).await???;

    // Leaving the mesh puts the node's default back.
    mesh.unenroll("store").await?;
    assert_eq!(pod_default(&mesh, "store")?, node);
    assert_eq!(pod_default(&mesh, "trainer")?, pod, "still enrolled");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_pod_gets_the_first_listed_name_the_node_allows() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let Some((node, pod)) = node_and_pod_setting()? else {
        return Ok(());
    };
    let allowed = node_allowed()?;
    // The default, cubic,reno: a kernel built with BBR as its default allows "reno bbr" in a
    // pod's namespace, and there the pods must get reno rather than keep BBR.
    let by_default = if node == "cubic" || allowed.iter().any(|a| a == "cubic") {
        "cubic"
    } else {
        "reno"
    };
    let passed_over = format!("membrane_none,{pod}");
    for (args, want) in [
        (vec![], by_default),
        (
            vec!["--pod-tcp-congestion", passed_over.as_str()],
            pod.as_str(),
        ),
    ] {
        let mesh = trainer_enrolled(&args).await?;
        assert_eq!(
            pod_default(&mesh, "trainer")?,
            want,
            "{args:?} (node {node}, allowed {allowed:?})"
        );
        assert_eq!(congestion_errors(&mesh).await?, 0.0, "{args:?}");
        mesh.unenroll("trainer").await?;
        assert_eq!(
            pod_default(&mesh, "trainer")?,
            node,
            "{args:?}: after leaving"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn node_leaves_pods_alone_and_an_unreachable_sysctl_only_counts() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let Some((node, pod)) = node_and_pod_setting()? else {
        return Ok(());
    };
    let missing = format!("/nonexistent-membrane-proc-sys-{}", std::process::id());
    let not_allowed = "membrane_none";
    for (args, errors) in [
        (vec!["--pod-tcp-congestion", "node"], false),
        // Nothing listed may be a pod's: pods keep the node's, and that is counted.
        (vec!["--pod-tcp-congestion", not_allowed], true),
        (
            vec![
                "--pod-tcp-congestion",
                pod.as_str(),
                "--proc-sys-net",
                &missing,
            ],
            true,
        ),
    ] {
        let mesh = trainer_enrolled(&args).await?;
        assert_eq!(pod_default(&mesh, "trainer")?, node, "{args:?}");
        let counted = congestion_errors(&mesh).await?;
        assert_eq!(counted > 0.0, errors, "{args:?}: {counted}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_pod_that_left_the_mesh_while_the_ztunnel_was_down_gets_the_nodes_back()
-> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let Some((node, pod)) = node_and_pod_setting()? else {
        return Ok(());
    };
    let mut mesh = trainer_enrolled(&["--pod-tcp-congestion", &pod]).await?;
    assert_eq!(pod_default(&mesh, "trainer")?, pod);
    // The ztunnel dies; meanwhile the namespace leaves the mesh; the next run finds the
    // pod in its saved state, no longer a mesh workload, and lifts what the last run set.
    mesh.stop_ztunnel("node-a");
    let path = mesh.ca().manifests_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&path)?;
    let labelled = "  name: training\n  labels: {membrane.dev/mesh: enabled}\n";
    anyhow::ensure!(text.contains(labelled), "namespace not found in:\n{text}");
    mesh.ca().write_manifest(
        "mesh.yaml",
        &text.replacen(labelled, "  name: training\n", 1),
    )?;
    mesh.restart_ztunnel("node-a")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = pod_default(&mesh, "trainer")?;
        if now == node {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "still {now} after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rules = mesh.testbed.exec(
        mesh.pod("trainer"),
        &["nft", "list", "table", "inet", "membrane"],
    )?;
    assert!(
        !rules.status.success(),
        "the previous run's rules were lifted too"
    );
    Ok(())
}
