//! Listener floods against the real binaries: idle connections by the thousand on every
//! listener of a ztunnel (15001, 15006, 15008 from pods; admin, metrics, readiness) and of the
//! controller (gRPC, metrics) are capped or closed by their timeouts while mesh traffic and
//! certificate issuance go on; a ztunnel at its descriptor limit backs off instead of
//! spinning and recovers; and (ignored by default, run by scripts/test.sh) a 10,000-connection
//! flood leaves the ztunnel's memory and descriptors where they were.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use membrane_tests::netns::run_in_netns;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const APP_PORT: u16 = 8080;
const FLOOD: usize = 1000;

/// Thousands of sockets live in this process at once: the soft descriptor limit goes up to
/// the hard one.
fn raise_nofile() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

fn pod(name: &str, ns: &str, node: &str) -> PodDef {
    PodDef::new(name, ns, name, node)
}

/// `attacker` and `client` (mesh, node-a), `server` (mesh, node-b), `outsider` (no mesh,
/// node-a).
fn spec(ztunnel_args: &[&str]) -> MeshSpec {
    MeshSpec {
        ztunnel_args: ztunnel_args.iter().map(|s| (*s).to_owned()).collect(),
        ..MeshSpec::two_nodes(
            vec![
                pod("attacker", "training", "node-a"),
                pod("client", "training", "node-a"),
                pod("late", "training", "node-a"),
                pod("fresh", "training", "node-a"),
                pod("server", "data", "node-b"),
                pod("outsider", "legacy", "node-a"),
            ],
            &["training", "data"],
        )
    }
}

/// `n` unconnected sockets created inside pod `name` (one namespace switch for all).
fn sockets_in(mesh: &Mesh, name: &str, n: usize) -> anyhow::Result<Vec<TcpSocket>> {
    let std_sockets = run_in_netns(mesh.netns_path(name), move || {
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(s))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    Ok(std_sockets
        .into_iter()
        .map(TcpSocket::from_std_stream)
        .collect())
}

/// `n` sockets on the host bound to `ip` (a loopback address other than 127.0.0.1, so the
/// flood has its own peer address).
fn sockets_from(ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<TcpSocket>> {
    (0..n)
        .map(|_| {
            let s = TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((ip, 0)))?;
            Ok(s)
        })
        .collect()
}

/// Connects every socket to `dst`, 100 at a time, each within 3 s. Returns the connected
/// streams (a connection refused later by the server still connects: the kernel accepts it).
async fn connect_all(sockets: Vec<TcpSocket>, dst: SocketAddr) -> anyhow::Result<Vec<TcpStream>> {
    let total = sockets.len();
    let mut streams = Vec::with_capacity(total);
    let mut sockets = sockets.into_iter();
    loop {
        let batch: Vec<TcpSocket> = sockets.by_ref().take(100).collect();
        if batch.is_empty() {
            break;
        }
        let mut set = tokio::task::JoinSet::new();
        for s in batch {
            set.spawn(
                async move { tokio::time::timeout(Duration::from_secs(3), s.connect(dst)).await },
            );
        }
        while let Some(joined) = set.join_next().await {
            if let Ok(Ok(stream)) = joined? {
                streams.push(stream);
            }
        }
    }
    anyhow::ensure!(
        streams.len() * 10 >= total * 9,
        "only {} of {total} flood connections to {dst} connected",
        streams.len()
    );
    Ok(streams)
}

/// How many of `streams` the server closes (EOF or reset) within `within`.
async fn closed_within(streams: Vec<TcpStream>, within: Duration) -> anyhow::Result<usize> {
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            let mut buf = [0u8; 256];
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Err(_) => return false,
                    Ok(Ok(0) | Err(_)) => return true,
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    let mut closed = 0;
    while let Some(joined) = set.join_next().await {
        closed += usize::from(joined?);
    }
    Ok(closed)
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_of(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = membrane_tests::http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "metrics: HTTP {status}");
    Ok(body)
}

/// A fresh connection from `from` to the server's echo application carries bytes.
async fn traffic_flows(mesh: &Mesh, from: &str) -> anyhow::Result<()> {
    let dst = SocketAddr::new(mesh.ip("server"), APP_PORT);
    let mut s = mesh.connect_from(from, dst).await?;
    ping(&mut s).await
}

const ZTUNNEL_LIMITS: &str = "--pod-max-connections 400 --pod-max-connections-per-peer 100 \
    --http-max-connections 32 --http-max-connections-per-peer 8 --http-header-timeout 1s \
    --http-idle-timeout 2s --hbone-handshake-timeout 2s --hbone-max-pending-handshakes 32";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn idle_floods_on_ztunnel_listeners_are_capped_and_closed() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    raise_nofile()?;
    let limits: Vec<&str> = ZTUNNEL_LIMITS.split_whitespace().collect();
    let mesh = Mesh::start(spec(&limits)).await?;
    for p in ["attacker", "client", "server", "fresh"] {
        mesh.enroll(p).await?;
    }
    let _app = mesh.echo_app("server", APP_PORT)?;
    traffic_flows(&mesh, "client").await?;
    let server = SocketAddr::new(mesh.ip("server"), APP_PORT);
    let (za, zb) = (&mesh.ztunnels["node-a"], &mesh.ztunnels["node-b"]);

    // 15001: a pod opens 1,000 captured connections and sits on them. The attacker's own
    // listener holds 400 at most; the rest are closed at once. Each of the 400 is a tunnel to
    // the server, i.e. a socket to its application: the server's pod holds 100 of them from
    // one peer (its share of the pod's 400), so the other 300 are refused there and closed
    // too. Other pods are not affected: the server has room for their tunnels.
    let held = connect_all(sockets_in(&mesh, "attacker", FLOOD)?, server).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    traffic_flows(&mesh, "client").await?;
    let refused = metric(
        &metrics_of(za.metrics).await?,
        "membrane_listener_connections_refused_total",
        &["listener=\"outbound\"", "reason=\"listener_limit\""],
    );
    assert!(refused >= 500.0, "outbound refusals: {refused}");
    let closed = closed_within(held, Duration::from_secs(2)).await?;
    assert!(
        (850..=950).contains(&closed),
        "the connections over either cap are closed, the admitted ones stay: {closed}"
    );
    let tunnels = metric(
        &metrics_of(zb.metrics).await?,
        "membrane_listener_connections_refused_total",
        &["listener=\"inbound_tunnels\"", "reason=\"peer_limit\""],
    );
    assert!(
        (250.0..=400.0).contains(&tunnels),
        "tunnels over the attacker's share at the server: {tunnels}"
    );

    // 15008: a non-mesh pod opens 1,000 TCP connections to a pod's HBONE port and never
    // starts TLS. At most 100 per peer are held; that peer may have 4 of the 32 handshake
    // slots (an eighth): the rest are closed at once, those 4 by the 2 s handshake timeout.
    let hbone = SocketAddr::new(mesh.ip("server"), 15008);
    let held = connect_all(sockets_in(&mesh, "outsider", FLOOD)?, hbone).await?;
    let n = held.len();
    traffic_flows(&mesh, "client").await?;
    // A pod that has not talked to the server yet needs a new HBONE handshake (tunnels are
    // pooled per source pod): it must get a slot while the flood holds its own share.
    traffic_flows(&mesh, "fresh").await?;
    let started = Instant::now();
    let closed = closed_within(held, Duration::from_secs(8)).await?;
    assert_eq!(closed, n, "every idle HBONE connection is closed");
    assert!(started.elapsed() < Duration::from_secs(8));
    let text = metrics_of(zb.metrics).await?;
    let refused = metric(
        &text,
        "membrane_listener_connections_refused_total",
        &["listener=\"inbound\"", "reason=\"peer_limit\""],
    );
    let timeouts = metric(
        &text,
        "membrane_listener_timeouts_total",
        &["listener=\"inbound\"", "stage=\"handshake\""],
    );
    assert!(timeouts >= 4.0, "handshake timeouts: {timeouts}");
    let over_share = metric(
        &text,
        "membrane_listener_connections_refused_total",
        &["listener=\"inbound\"", "reason=\"peer_handshakes\""],
    );
    assert!(
        over_share >= 90.0,
        "handshakes over the peer's share refused: {over_share}"
    );
    // Everything but the peer's few handshake slots was closed at once by one cap or the other.
    assert!(
        refused + over_share >= 900.0,
        "inbound refusals: {refused} at the connection cap, {over_share} over the handshake share"
    );
    traffic_flows(&mesh, "client").await?;

    // 15006: plaintext from a non-mesh pod into a namespace that refuses it: all closed.
    let held = connect_all(sockets_in(&mesh, "outsider", FLOOD)?, server).await?;
    let n = held.len();
    traffic_flows(&mesh, "client").await?;
    assert_eq!(closed_within(held, Duration::from_secs(5)).await?, n);

    // Admin, metrics, readiness: 1,000 idle connections each from 127.0.0.2. Eight are
    // admitted and closed by the header / idle timeouts; a scrape from another address
    // works throughout.
    for (name, addr) in [
        ("admin", za.admin),
        ("metrics", za.metrics),
        ("readiness", za.readiness),
    ] {
        let held = connect_all(sockets_from(Ipv4Addr::new(127, 0, 0, 2), FLOOD)?, addr).await?;
        let n = held.len();
        let text = metrics_of(za.metrics).await?;
        traffic_flows(&mesh, "client").await?;
        let started = Instant::now();
        assert_eq!(
            closed_within(held, Duration::from_secs(6)).await?,
            n,
            "{name}"
        );
        assert!(started.elapsed() < Duration::from_secs(6), "{name}");
        let listener = format!("listener=\"{name}\"");
        let refused = metric(
            &text,
            "membrane_listener_connections_refused_total",
            &[&listener, "reason=\"peer_limit\""],
        );
        assert!(refused >= 900.0, "{name} refusals: {refused}");
    }
    let text = metrics_of(za.metrics).await?;
    for name in ["admin", "metrics", "readiness"] {
        let timeouts = metric(
            &text,
            "membrane_listener_timeouts_total",
            &[&format!("listener=\"{name}\"")],
        );
        assert!(timeouts >= 8.0, "{name} timeouts: {timeouts}");
    }
    traffic_flows(&mesh, "client").await?;
    Ok(())
}

/// A TLS client that completes the handshake with the controller and then says nothing.
async fn idle_tls(
    connector: &tokio_rustls::TlsConnector,
    from: Ipv4Addr,
    dst: SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let tcp = socket.connect(dst).await?;
    let name = rustls_pki_types::ServerName::try_from("membrane-ca")?;
    Ok(connector.connect(name, tcp).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn idle_floods_on_the_controller_leave_issuance_working() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    raise_nofile()?;
    let mut spec = spec(&[]);
    spec.ca_listeners = membrane_ca::serving::ListenerConfig {
        grpc_max_connections: 600,
        grpc_max_connections_per_peer: 50,
        tls_handshake_timeout: Duration::from_secs(2),
        grpc_idle_timeout: Duration::from_secs(3),
        http_max_connections: 32,
        http_max_connections_per_peer: 8,
        http: membrane_runtime::HttpTimeouts {
            header: Duration::from_secs(1),
            idle: Duration::from_secs(2),
        },
    };
    let mesh = Mesh::start(spec).await?;
    for p in ["client", "server"] {
        mesh.enroll(p).await?;
    }
    let _app = mesh.echo_app("server", APP_PORT)?;
    traffic_flows(&mesh, "client").await?;
    let grpc: SocketAddr = mesh
        .ca()
        .endpoint()
        .trim_start_matches("https://")
        .parse()?;

    // 1,000 TCP connections that never start TLS (127.0.0.2), and 20 that finish TLS and
    // never send the HTTP/2 preface (127.0.0.3).
    let raw = connect_all(sockets_from(Ipv4Addr::new(127, 0, 0, 2), FLOOD)?, grpc).await?;
    let bundle = membrane_identity::TrustBundle::from_pem(
        membrane_tests::trust_domain(),
        mesh.ca().root_pem().as_bytes(),
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for root in bundle.roots() {
        roots.add(root.clone())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(membrane_identity::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(idle_tls(&connector, Ipv4Addr::new(127, 0, 0, 3), grpc).await?);
    }

    // An HTTP/2 client is told how many streams it may open at once.
    let tls = idle_tls(&connector, Ipv4Addr::new(127, 0, 0, 4), grpc).await?;
    let (h2_client, h2_conn) = h2::client::handshake(tls).await?;
    let h2_task = tokio::spawn(h2_conn);
    let h2_client = h2_client.ready().await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while h2_client.current_max_send_streams() == usize::MAX && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        h2_client.current_max_send_streams(),
        membrane_ca::server::MAX_STREAMS_PER_CONNECTION as usize
    );
    // That client answers the server's keepalive PINGs but never makes a call: it is closed
    // once the idle timeout passed without an authenticated call on it.
    let ended = tokio::time::timeout(Duration::from_secs(8), h2_task).await;
    assert!(
        ended.is_ok(),
        "a connection without an authenticated call was kept open"
    );
    drop(h2_client);

    // While they are held: a Sign succeeds, and a pod enrolled now gets its certificate
    // (its traffic flows).
    let mut client = mesh
        .ca()
        .client(&membrane_tests::node_token("node-a"))
        .await?;
    let identity = membrane_tests::identity("training", "late");
    let (svid, _) = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_svid(&identity, Duration::from_secs(600)),
    )
    .await??;
    assert_eq!(svid.identity(), &identity);
    mesh.enroll("late").await?;
    traffic_flows(&mesh, "late").await?;

    // The raw ones go at the handshake timeout (or at once, over the per-peer cap); the TLS
    // ones when the idle timeout passed without an authenticated call.
    let n = raw.len();
    let started = Instant::now();
    assert_eq!(closed_within(raw, Duration::from_secs(6)).await?, n);
    assert!(started.elapsed() < Duration::from_secs(6));
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        while let Ok(r) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            if matches!(r, Ok(0) | Err(_)) {
                closed += 1;
                break;
            }
        }
    }
    assert_eq!(
        closed, 20,
        "idle TLS connections without a preface are closed"
    );

    // The metrics port: 1,000 idle connections from 127.0.0.2; a scrape from 127.0.0.1 works.
    let held = connect_all(
        sockets_from(Ipv4Addr::new(127, 0, 0, 2), FLOOD)?,
        mesh.ca().metrics_addr(),
    )
    .await?;
    let n = held.len();
    let text = mesh.ca().metrics().await?;
    assert_eq!(closed_within(held, Duration::from_secs(6)).await?, n);
    let refused = |listener: &str| {
        metric(
            &text,
            "membrane_ca_listener_connections_refused_total",
            &[&format!("listener=\"{listener}\""), "reason=\"peer_limit\""],
        )
    };
    assert!(
        refused("grpc") >= 900.0,
        "grpc refusals: {}",
        refused("grpc")
    );
    assert!(
        refused("metrics") >= 900.0,
        "metrics refusals: {}",
        refused("metrics")
    );
    let text = mesh.ca().metrics().await?;
    let timeouts = |stage: &str| {
        metric(
            &text,
            "membrane_ca_listener_timeouts_total",
            &["listener=\"grpc\"", &format!("stage=\"{stage}\"")],
        )
    };
    assert!(timeouts("handshake") >= 40.0, "{}", timeouts("handshake"));
    // The 20 without a preface and the HTTP/2 client without a call: none authenticated a
    // call. The preface-less ones meet the deadline and the idle timeout (the same length) at
    // once, and either may close them; the HTTP/2 client answered every PING, so only the
    // deadline closes it.
    let (unauthenticated, idle) = (timeouts("unauthenticated"), timeouts("idle"));
    assert!(
        unauthenticated >= 1.0 && unauthenticated + idle >= 21.0,
        "unauthenticated {unauthenticated}, idle {idle}"
    );
    // Sign still works after the flood, on the same channel.
    client
        .request_svid(&identity, Duration::from_secs(600))
        .await?;
    traffic_flows(&mesh, "client").await?;
    // The ztunnels' own long-lived streams stay silent for longer than the idle timeout,
    // but answer the server's keepalive PINGs: none is cut.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for (node, z) in &mesh.ztunnels {
        let logs = z.logs.lock().map(|l| l.clone()).unwrap_or_default();
        let lost = logs
            .iter()
            .filter(|l| l.contains("discovery stream lost"))
            .count();
        assert_eq!(lost, 0, "{node} lost its discovery stream");
    }
    Ok(())
}

/// `(user + system CPU time, resident set size, its anonymous part (both KiB), open
/// descriptors)` of process `pid`.
fn usage(pid: u32) -> anyhow::Result<(Duration, u64, u64, usize)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses): state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100);
    let cpu = Duration::from_millis(ticks * 1000 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((cpu, kib("VmRSS:"), kib("RssAnon:"), fds))
}

fn set_nofile(pid: u32, limit: usize) -> anyhow::Result<()> {
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Retries [`traffic_flows`] for up to `within` (a listener may be in its accept back-off).
async fn traffic_recovers(mesh: &Mesh, from: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match traffic_flows(mesh, from).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn at_the_descriptor_limit_the_ztunnel_backs_off_and_recovers() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    raise_nofile()?;
    let mesh = Mesh::start(spec(&[])).await?;
    for p in ["attacker", "client", "server"] {
        mesh.enroll(p).await?;
    }
    let _app = mesh.echo_app("server", APP_PORT)?;
    traffic_flows(&mesh, "client").await?;
    let za = &mesh.ztunnels["node-a"];
    let pid = za.pid();
    let (_, _, _, baseline_fds) = usage(pid)?;
    set_nofile(pid, baseline_fds + 64)?;

    // A pod opens 1,000 connections: the ztunnel runs out of descriptors after ~60, the rest
    // wait in the listen backlog and every accept fails at once.
    let held = connect_all(
        sockets_in(&mesh, "attacker", FLOOD)?,
        SocketAddr::new(mesh.ip("server"), APP_PORT),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The node's tooling connects to the enrollment socket meanwhile: its accept fails too,
    // and must back off like the listeners'.
    let enrolling = tokio::net::UnixStream::connect(&za.enroll_socket).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cpu_before, _, _, fds) = usage(pid)?;
    assert!(
        fds >= baseline_fds + 60,
        "the ztunnel reached its limit: {fds} descriptors"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu_after, _, _, _) = usage(pid)?;
    let cpu = cpu_after.saturating_sub(cpu_before);
    eprintln!("CPU time over 3 s at the descriptor limit: {cpu:?}");
    assert!(
        cpu < Duration::from_millis(500),
        "the ztunnel spins: {cpu:?} of CPU in 3 s"
    );
    let accept_lines = || {
        za.logs
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|l| l.contains("accept failed; backing off"))
                    .count()
            })
            .unwrap_or(0)
    };
    let lines = accept_lines();
    eprintln!("accept error log lines over ~4 s: {lines}");
    assert!(
        (1..=4).contains(&lines),
        "accept errors logged {lines} times"
    );
    let enroll_lines = za
        .logs
        .lock()
        .map(|l| {
            l.iter()
                .filter(|l| l.contains("enrollment accept failed; backing off"))
                .count()
        })
        .unwrap_or(0);
    eprintln!("enrollment accept error log lines over ~3 s: {enroll_lines}");
    assert!(
        (1..=4).contains(&enroll_lines),
        "enrollment accept errors logged {enroll_lines} times"
    );
    drop(enrolling);

    // The flood ends: the descriptors come back and new connections work again, without
    // raising the limit.
    drop(held);
    traffic_recovers(&mesh, "client", Duration::from_secs(15)).await?;
    let errors = metric(
        &metrics_of(za.metrics).await?,
        "membrane_listener_accept_errors_total",
        &["listener=\"outbound\""],
    );
    assert!(errors >= 1.0, "accept errors counted: {errors}");
    let enroll_errors = metric(
        &metrics_of(za.metrics).await?,
        "membrane_enroll_accept_errors_total",
        &[],
    );
    assert!(
        enroll_errors >= 1.0,
        "enrollment accept errors counted: {enroll_errors}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "resource test: run by scripts/test.sh"]
async fn ten_thousand_connection_flood_returns_memory_and_descriptors() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    raise_nofile()?;
    let started = Instant::now();
    // The flood's 2,500 tunnels open ~25 pooled HBONE connections (100 streams each); they
    // are kept for reuse until idle for --pool-idle-timeout (60 s by default).
    let mesh = Mesh::start(spec(&["--pool-idle-timeout", "10s"])).await?;
    for p in ["attacker", "client", "server"] {
        mesh.enroll(p).await?;
    }
    let _app = mesh.echo_app("server", APP_PORT)?;
    for _ in 0..20 {
        traffic_flows(&mesh, "client").await?;
    }
    let za = &mesh.ztunnels["node-a"];
    let pid = za.pid();
    let client = mesh.ip("client");
    let server = SocketAddr::new(mesh.ip("server"), APP_PORT);
    // 2,500 connections on each of 15001 (captured, from a mesh pod), 15006 (plaintext from a
    // non-mesh pod), 15008 (never starting TLS, from a non-mesh pod) and 15020.
    let flood = |per: usize| {
        let mesh = &mesh;
        async move {
            let mut held = Vec::new();
            held.extend(connect_all(sockets_in(mesh, "attacker", per)?, server).await?);
            let plaintext = SocketAddr::new(client, APP_PORT);
            held.extend(connect_all(sockets_in(mesh, "outsider", per)?, plaintext).await?);
            let hbone = SocketAddr::new(client, 15008);
            held.extend(connect_all(sockets_in(mesh, "outsider", per)?, hbone).await?);
            let from = Ipv4Addr::new(127, 0, 0, 2);
            held.extend(connect_all(sockets_from(from, per)?, za.metrics).await?);
            Ok::<_, anyhow::Error>(held)
        }
    };
    // The pre-flood value is taken once the ztunnel has served a flood of the same kinds and
    // size (2,500 per listener) and settled as it will after the measured one: the code they
    // run is paged in, the allocator's arenas have grown to what such a flood needs, its
    // pooled connections are reaped (10 s idle) and the trimmer's follow-ups after a flood
    // (the last 26 s after it) have run. Measured after a smaller first flood and 13 s, the
    // baseline varied from run to run by more than the slack (6 MiB once, 11.7 MiB usually),
    // failing a run whose memory after the flood was below the usual baseline. A leak still
    // adds its bytes per connection of the measured flood on top of this baseline.
    drop(flood(2500).await?);
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Memory is judged on the anonymous resident set: what the process allocated. The rest
    // of VmRSS is the binary's code, shared and evictable, and varies from run to run with
    // what the kernel kept paged in; it is reported too.
    let (_, rss_before, anon_before, fds_before) = usage(pid)?;

    let held = flood(2500).await?;
    let (mut rss_peak, mut anon_peak, mut fds_peak) = (0, 0, 0);
    for _ in 0..4 {
        let (_, rss, anon, fds) = usage(pid)?;
        rss_peak = rss_peak.max(rss);
        anon_peak = anon_peak.max(anon);
        fds_peak = fds_peak.max(fds);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let flood = held.len();
    drop(held);

    // "Back" is within 10 % of the pre-flood value or 4 MiB, whichever is more: the allocator's
    // arenas keep a little after a flood from run to run, while a leak of some 450 bytes per
    // connection (over 4 MiB over the flood) fails.
    let slack = (anon_before / 10).max(4 * 1024);
    let released = Instant::now();
    let (rss_after, anon_after, fds_after) = loop {
        let (_, rss, anon, fds) = usage(pid)?;
        let back = fds <= fds_before && anon <= anon_before + slack;
        if back || released.elapsed() > Duration::from_secs(30) {
            break (rss, anon, fds);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "flood of {flood} connections: anonymous RSS {anon_before} KiB before, {anon_peak} KiB peak, {anon_after} KiB after {:?} (VmRSS {rss_before} / {rss_peak} / {rss_after} KiB); descriptors {fds_before} before, {fds_peak} peak, {fds_after} after; test took {:?}",
        released.elapsed(),
        started.elapsed()
    );
    assert!(
        fds_after <= fds_before,
        "descriptors: {fds_before} -> {fds_after}"
    );
    assert!(
        anon_after <= anon_before + slack,
        "anonymous RSS: {anon_before} KiB -> {anon_after} KiB (allowed: +{slack} KiB)"
    );
    traffic_flows(&mesh, "client").await?;
    // Idle connections took no relay buffer growth, and none was refused.
    let text = metrics_of(za.metrics).await?;
    assert!(text.contains("membrane_relay_grown_bytes "), "{text}");
    assert_eq!(
        metric(&text, "membrane_relay_growth_refused_total", &[]),
        0.0
    );
    Ok(())
}
