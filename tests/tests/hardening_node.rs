//! Node enrollment under attack, end to end with the real binaries: the `membrane-cni`
//! plugin run as a container runtime runs it, the real ztunnels and controller of a mesh in
//! network namespaces.
//!
//! - A pod created while the controller is away must never start outside the mesh: its ADD
//!   fails (retryable) until the node's view is current again, and the retried ADD captures it.
//! - Plaintext UDP into a mesh pod of a namespace that refuses plaintext is dropped and
//!   counted, except on the ports the namespace names, replies, and loopback.
//! - An enrollment whose namespace path is a FIFO or a regular file is refused at once, and
//!   the socket keeps answering; an over-long request line closes the connection.
//!
//! Needs `cargo build -p membrane-cni -p membrane-ztunnel` first (the plugin is looked up next
//! to the ztunnel binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use membrane_tests::cni::{captured, cni};
use membrane_tests::http_get;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use membrane_tests::netns::run_in_netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// Node `node`'s ztunnel metrics (Prometheus text).
async fn metrics(mesh: &Mesh, node: &str) -> anyhow::Result<String> {
    let (status, body) = http_get(mesh.ztunnels[node].metrics, "/metrics").await?;
    ensure!(status == 200, "metrics: HTTP {status}");
    Ok(body)
}

/// The value of the sample whose line starts with `series` (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls (every 100 ms, up to `limit`) until `check` holds.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("{what}: not reached within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Whether node `node`'s ztunnel holds workload `uid` in its mesh state.
async fn knows(mesh: &Mesh, node: &str, uid: &str) -> anyhow::Result<bool> {
    let dump = mesh.config_dump(node).await?;
    Ok(dump["workloads"]
        .as_array()
        .is_some_and(|ws| ws.iter().any(|w| w["uid"] == uid)))
}

/// Whether a plaintext connection from `from` to `dst` was refused (reset at connect, or
/// closed without an echo).
async fn plaintext_refused(mesh: &Mesh, from: &str, dst: SocketAddr) -> bool {
    match mesh.connect_from(from, dst).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"ping").await;
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            !matches!(read, Ok(Ok(_))) || buf.is_empty()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_pod_added_while_the_controller_is_away_never_starts_outside_the_mesh()
-> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = Mesh::start(MeshSpec {
        nodes: vec!["node-a".into()],
        pods: vec![
            PodDef::new("client", "shop", "client", "node-a"),
            PodDef::new("late", "shop", "late", "node-a"),
            PodDef::new("outsider", "web", "outsider", "node-a"),
        ],
        mesh_namespaces: vec!["shop".into()],
        ..MeshSpec::default()
    })
    .await?;

    // `late` is not created yet as far as the controller knows: its manifest comes later.
    let manifest: PathBuf = mesh.ca().manifests_dir().join("mesh.yaml");
    let full = std::fs::read_to_string(&manifest)?;
    let without_late: String = full
        .split("---\n")
        .filter(|doc| !doc.contains("uid: shop-late,"))
        .collect::<Vec<_>>()
        .join("---\n");
    ensure!(
        without_late != full,
        "the late pod's manifest was not found"
    );
    mesh.write_manifest("mesh.yaml", &without_late)?;
    until("node-a forgets late", Duration::from_secs(15), || async {
        Ok(!knows(&mesh, "node-a", "shop-late").await?
            && knows(&mesh, "node-a", "shop-client").await?)
    })
    .await?;

    // Legitimate path with a current view: a mesh pod is captured, a non-mesh pod starts.
    let run = cni(&mesh, "ADD", "client", true).await?;
    ensure!(run.ok(), "client ADD: {run:?}");
    ensure!(captured(&mesh, "client")?, "client not captured");
    let run = cni(&mesh, "ADD", "outsider", true).await?;
    ensure!(run.ok(), "outsider ADD: {run:?}");
    ensure!(!captured(&mesh, "outsider")?, "outsider captured");

    // The controller goes away; the pod is created meanwhile.
    mesh.ca_mut()
        .pause()
        .await
        .context("controller was not running")?;
    until(
        "the discovery stream is seen down",
        Duration::from_secs(15),
        || async {
            Ok(sample(
                &metrics(&mesh, "node-a").await?,
                "membrane_discovery_connected ",
            ) == 0.0)
        },
    )
    .await?;
    mesh.write_manifest("mesh.yaml", &full)?;

    // The attack: the runtime adds `late`. Before, the ztunnel answered "not a mesh pod" after
    // 2 s and the pod started uncaptured. Now every attempt fails, retryably, naming why.
    for attempt in 0..3 {
        let run = cni(&mesh, "ADD", "late", true).await?;
        ensure!(
            !run.ok(),
            "attempt {attempt}: ADD succeeded uncaptured: {run:?}"
        );
        let error = run.json()?;
        assert_eq!(error["code"], 11, "{error}");
        let msg = error["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("shop-late") && msg.contains("not current"),
            "the error must name the pod and the reason: {msg}"
        );
        assert!(!captured(&mesh, "late")?);
        // The runtime tears the sandbox down after a failed ADD.
        let del = cni(&mesh, "DEL", "late", true).await?;
        ensure!(del.ok(), "DEL: {del:?}");
    }
    let text = metrics(&mesh, "node-a").await?;
    assert!(
        sample(
            &text,
            "membrane_enroll_refused_total{reason=\"stale_view\"} "
        ) >= 3.0,
        "refusals not counted: {text}"
    );
    // A pod the node already knows as a mesh workload is still captured: capture fails closed.
    let run = cni(&mesh, "ADD", "client", true).await?;
    ensure!(
        run.ok(),
        "known mesh pod refused while the controller is away: {run:?}"
    );
    // `failClosed: false` keeps its documented meaning: the pod starts, uncaptured, warned.
    let run = cni(&mesh, "ADD", "late", false).await?;
    ensure!(run.ok(), "failClosed=false ADD: {run:?}");
    assert!(run.stderr.contains("failClosed is false"), "{run:?}");
    assert!(!captured(&mesh, "late")?);
    let del = cni(&mesh, "DEL", "late", true).await?;
    ensure!(del.ok(), "DEL: {del:?}");

    // The controller returns: the runtime's retried ADD captures the pod.
    mesh.ca_mut().resume().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let run = cni(&mesh, "ADD", "late", true).await?;
        if run.ok() {
            break run;
        }
        ensure!(
            Instant::now() < deadline,
            "retried ADD never succeeded: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(run.stderr.is_empty(), "{run:?}");
    assert!(
        captured(&mesh, "late")?,
        "late not captured after the retried ADD"
    );

    // Its application starts: plaintext from a non-mesh pod never reaches it; the mesh does.
    let accepted = mesh.echo_app("late", PORT)?;
    let dst = SocketAddr::new(mesh.ip("late"), PORT);
    assert!(
        plaintext_refused(&mesh, "outsider", dst).await,
        "plaintext reached the late pod"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the app accepted plaintext"
    );
    let mut s = mesh.connect_from("client", dst).await?;
    ping(&mut s).await?;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    Ok(())
}

/// A UDP socket bound to `port` (0: any) inside the namespace at `netns`, with a 300 ms read
/// timeout.
fn udp_in(netns: PathBuf, port: u16) -> anyhow::Result<std::net::UdpSocket> {
    let socket = run_in_netns(netns, move || {
        std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))
    })??;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(socket)
}

/// A UDP-Lite socket (a protocol no listener of the ztunnel sees) bound to `port` inside the
/// namespace at `netns`, with a 300 ms read timeout.
fn udplite_in(netns: PathBuf, port: u16) -> anyhow::Result<std::net::UdpSocket> {
    const IPPROTO_UDPLITE: i32 = 136;
    let socket = run_in_netns(netns, move || -> std::io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(IPPROTO_UDPLITE)),
        )?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        Ok(s.into())
    })??;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(socket)
}

/// Sends `count` datagrams from `from` to `dst`; how many `to` received (it is drained).
fn datagrams(
    from: &std::net::UdpSocket,
    to: &std::net::UdpSocket,
    dst: SocketAddr,
    count: usize,
) -> anyhow::Result<usize> {
    for i in 0..count {
        from.send_to(format!("datagram {i}").as_bytes(), dst)?;
    }
    let mut got = 0;
    let mut buf = [0u8; 64];
    while got < count && to.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    Ok(got)
}

/// The packets counted by the drop rule in `pod`.
fn nft_dropped(mesh: &Mesh, pod: &str) -> anyhow::Result<u64> {
    let out = mesh.testbed.exec(
        mesh.pod(pod),
        &[
            "nft",
            "list",
            "counter",
            "inet",
            "membrane",
            "udp_dropped_inbound",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in {pod}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn plaintext_udp_into_a_mesh_pod_is_dropped_and_counted() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(MeshSpec {
        plaintext_permit: vec!["lax".into()],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("target", "shop", "target", "node-a"),
                PodDef::new("peer", "shop", "peer", "node-b"),
                PodDef::new("relaxed", "lax", "relaxed", "node-a"),
                PodDef::new("outsider", "web", "outsider", "node-b"),
            ],
            &["shop", "lax"],
        )
    })
    .await?;
    let ip = |pod: &str, port: u16| SocketAddr::new(mesh.ip(pod), port);

    // Uncaptured, the path works: what follows can only fail because of the capture.
    let closed = udp_in(mesh.netns_path("target"), 7000)?;
    let named = udp_in(mesh.netns_path("target"), 5353)?;
    let outsider = udp_in(mesh.netns_path("outsider"), 7000)?;
    let peer = udp_in(mesh.netns_path("peer"), 0)?;
    ensure!(
        datagrams(&outsider, &closed, ip("target", 7000), 3)? == 3,
        "no UDP path from outsider"
    );
    let lite_target = udplite_in(mesh.netns_path("target"), 7100)?;
    let lite_outsider = udplite_in(mesh.netns_path("outsider"), 0)?;
    ensure!(
        datagrams(&lite_outsider, &lite_target, ip("target", 7100), 3)? == 3,
        "no UDP-Lite path from outsider"
    );
    ensure!(
        datagrams(&peer, &closed, ip("target", 7000), 3)? == 3,
        "no UDP path from peer"
    );

    // The shop namespace opens two UDP ports to plaintext.
    let manifest = mesh.ca().manifests_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&manifest)?;
    let shop = "  name: shop\n  labels: {membrane.dev/mesh: enabled}";
    ensure!(text.contains(shop), "shop namespace not found: {text}");
    mesh.write_manifest(
        "mesh.yaml",
        &text.replace(
            shop,
            &format!("{shop}\n  annotations: {{membrane.dev/plaintext-udp-ports: \"9999, 5353\"}}"),
        ),
    )?;
    for pod in ["target", "peer", "relaxed"] {
        mesh.enroll(pod).await?;
    }
    until(
        "the named ports are open in target",
        Duration::from_secs(15),
        || async {
            let out = mesh.testbed.exec(
                mesh.pod("target"),
                &["nft", "list", "table", "inet", "membrane"],
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).contains("udp dport { 5353, 9999 } accept"))
        },
    )
    .await?;

    // The attack: plaintext UDP from a non-mesh pod and from another mesh pod (another node).
    assert_eq!(
        datagrams(&outsider, &closed, ip("target", 7000), 5)?,
        0,
        "non-mesh UDP got through"
    );
    assert_eq!(
        datagrams(&peer, &closed, ip("target", 7000), 5)?,
        0,
        "mesh-pod UDP got through"
    );
    // Nor by a protocol no listener sees.
    assert_eq!(
        datagrams(&lite_outsider, &lite_target, ip("target", 7100), 5)?,
        0,
        "non-mesh UDP-Lite got through"
    );
    let counted = nft_dropped(&mesh, "target")?;
    assert!(counted >= 15, "drops not counted in the pod: {counted}");
    until(
        "the drops are exported",
        Duration::from_secs(15),
        || async {
            let text = metrics(&mesh, "node-a").await?;
            Ok(sample(
                &text,
                "membrane_udp_dropped_packets_total{pod=\"shop/target\",direction=\"inbound\"} ",
            ) >= 15.0)
        },
    )
    .await?;

    // What stays open: a named port, replies to the pod's own UDP, loopback, and a namespace
    // that permits plaintext.
    assert_eq!(
        datagrams(&outsider, &named, ip("target", 5353), 3)?,
        3,
        "named port closed"
    );
    let asker = udp_in(mesh.netns_path("target"), 0)?;
    asker.send_to(b"question", ip("outsider", 7000))?;
    let mut buf = [0u8; 64];
    let (n, from) = outsider
        .recv_from(&mut buf)
        .context("the query never left")?;
    outsider.send_to(&buf[..n], from)?;
    let (n, _) = asker.recv_from(&mut buf).context("the reply was dropped")?;
    assert_eq!(&buf[..n], b"question");
    let local = udp_in(mesh.netns_path("target"), 0)?;
    assert_eq!(
        datagrams(&local, &closed, SocketAddr::from(([127, 0, 0, 1], 7000)), 3)?,
        3,
        "loopback UDP dropped"
    );
    let relaxed = udp_in(mesh.netns_path("relaxed"), 7000)?;
    assert_eq!(
        datagrams(&outsider, &relaxed, ip("relaxed", 7000), 3)?,
        3,
        "a namespace that permits plaintext must keep its UDP"
    );
    assert_eq!(nft_dropped(&mesh, "relaxed")?, 0);
    Ok(())
}

/// A namespace path that is not a network namespace is refused at once with a clear error: a
/// FIFO (which a blocking open would wait on forever, holding the pod registry) and a regular
/// file; the socket keeps answering. A line over the limit closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn enrollment_refuses_paths_that_are_not_network_namespaces() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(MeshSpec::two_nodes(
        vec![PodDef::new("store", "data", "feature-store", "node-b")],
        &["data"],
    ))
    .await?;
    let fifo = mesh.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU)?;
    let file = mesh.path().join("file");
    std::fs::write(&file, b"")?;
    for path in [&fifo, &file] {
        // The store's UID: a mesh workload of node-b, so the path is opened to capture it.
        let add = serde_json::json!({"op": "add", "uid": "data-store", "netns": path});
        let reply =
            tokio::time::timeout(Duration::from_secs(1), mesh.enroll_request("node-b", &add))
                .await
                .with_context(|| format!("add of {} not answered within 1 s", path.display()))??;
        assert_eq!(reply["ok"], false, "{reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains("not a network namespace"), "{reply}");
        let list = tokio::time::timeout(
            Duration::from_secs(1),
            mesh.enroll_request("node-b", &serde_json::json!({"op": "list"})),
        )
        .await
        .context("list not answered within 1 s")??;
        assert_eq!(list["ok"], true, "{list}");
        assert_eq!(
            list["pods"],
            serde_json::json!([]),
            "a refused path is not remembered"
        );
    }

    // An over-long line: an error answer, then the connection is closed (the rest of the
    // line is not read as a request).
    let socket = &mesh.ztunnels["node-b"].enroll_socket;
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    let mut long = vec![b'x'; 64 * 1024 + 10];
    long.extend_from_slice(br#"{"op":"list"}"#);
    long.push(b'\n');
    stream.write_all(&long).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .context("connection not closed")??;
    let lines: Vec<&str> = reply.lines().collect();
    assert_eq!(lines.len(), 1, "{reply}");
    assert!(lines[0].contains("too long"), "{reply}");
    Ok(())
}
