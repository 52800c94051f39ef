//! The network-namespace testbed against real namespaces: pod connectivity, cleanup (also
//! after a panic), stale sweeps, packet capture on the fabric, and concurrent testbeds.
//!
//! These tests need root and iproute2: they are `#[ignore = "needs root"]`, run by
//! `scripts/test.sh` as root, and reported ignored (never passed) otherwise.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::process::{Command, Stdio};
use std::sync::{Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use membrane_tests::netns::{
    Capture, Error, GENERATED_PREFIX, Netns, PodSpec, Testbed, run_in_netns,
};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Process start-up and kill waits: generous, a loaded 2-core machine can be slow to fork.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Names listed by `ip netns list`.
fn netns_list() -> anyhow::Result<BTreeSet<String>> {
    let output = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(output.status.success(), "ip netns list failed: {output:?}");
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn assert_gone(names: &[String]) -> anyhow::Result<()> {
    ensure!(!names.is_empty(), "no names to check");
    let listed = netns_list()?;
    let left: Vec<_> = names.iter().filter(|n| listed.contains(*n)).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    for name in names {
        let path = format!("/run/netns/{name}");
        ensure!(!std::path::Path::new(&path).exists(), "{path} still exists");
    }
    Ok(())
}

/// An echo server listening inside `ns`: each connection's bytes (until EOF) are sent back.
/// It serves `connections` connections or gives up after 10 s, and returns the peers' IPs.
struct EchoServer {
    addr: SocketAddr,
    thread: JoinHandle<anyhow::Result<Vec<IpAddr>>>,
}

impl EchoServer {
    fn start(ns: &impl Netns, ip: impl Into<IpAddr>, connections: usize) -> anyhow::Result<Self> {
        let ip: IpAddr = ip.into();
        let listener = ns.run(|| TcpListener::bind((ip, 0)))??;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut peers = Vec::new();
            while peers.len() < connections {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        stream.set_write_timeout(Some(IO_TIMEOUT))?;
                        let mut data = Vec::new();
                        stream.read_to_end(&mut data)?;
                        stream.write_all(&data)?;
                        stream.shutdown(Shutdown::Write)?;
                        peers.push(peer.ip());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!("echo server on {addr}: only {} connection(s)", peers.len());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(peers)
        });
        Ok(EchoServer { addr, thread })
    }

    fn peers(self) -> anyhow::Result<Vec<IpAddr>> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("echo server panicked"))?
    }
}

/// Connects from inside `ns` to `addr`, sends `message`, and returns what came back.
fn echo(ns: &impl Netns, addr: SocketAddr, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))?
        .with_context(|| format!("connect from {} to {addr}", ns.netns_name()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(message)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(reply)
}

#[test]
#[ignore = "needs root"]
fn pods_reach_each_other_across_and_within_nodes() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut tb = Testbed::new()?;
    let id = tb.id().to_owned();
    ensure!(id.starts_with(&format!("{GENERATED_PREFIX}{}-", std::process::id())));
    let node_a = tb.add_node("node-a")?;
    let node_b = tb.add_node("node-b")?;
    let a1 = tb.add_pod("node-a", "a1")?;
    let a2 = tb.add_pod("node-a", "a2")?;
    let b1 = tb.add_pod("node-b", "b1")?;
    let b2 = tb.add_pod_with(
        PodSpec::new("node-b", "b2")
            .ip(Ipv4Addr::new(10, 77, 2, 50))
            .netns_name(format!("{id}-custom-b2")),
    )?;

    // Addressing and naming.
    assert_eq!(node_a.fabric_ip(), Ipv4Addr::new(172, 31, 0, 1));
    assert_eq!(node_b.fabric_ip(), Ipv4Addr::new(172, 31, 0, 2));
    assert_eq!(node_b.pod_cidr().to_string(), "10.77.2.0/24");
    assert_eq!(node_a.pod_gateway(), Ipv4Addr::new(10, 77, 1, 1));
    assert_eq!(a1.ip(), Ipv4Addr::new(10, 77, 1, 2));
    assert_eq!(a2.ip(), Ipv4Addr::new(10, 77, 1, 3));
    assert_eq!(b1.ip(), Ipv4Addr::new(10, 77, 2, 2));
    assert_eq!(b2.ip(), Ipv4Addr::new(10, 77, 2, 50));
    assert_eq!(tb.fabric().netns_name(), format!("{id}-fabric"));
    assert_eq!(node_a.netns_name(), format!("{id}-node-a"));
    assert_eq!(a1.netns_name(), format!("{id}-a1"));
    assert_eq!(b2.netns_name(), format!("{id}-custom-b2"));
    assert_eq!(
        a1.netns_path(),
        std::path::PathBuf::from(format!("/run/netns/{id}-a1"))
    );
    assert_eq!(tb.netns_names().len(), 7);
    let listed = netns_list()?;
    for name in tb.netns_names() {
        ensure!(listed.contains(name), "{name} not listed");
    }

    // Refusals.
    let refused = [
        tb.add_pod("node-c", "x").err(),
        tb.add_pod("node-a", "a1").err(),
        tb.add_node("node-a").err(),
        tb.add_pod("node-a", "bad/name").err(),
        tb.add_pod_with(PodSpec::new("node-a", "x").ip(Ipv4Addr::new(10, 77, 2, 9)))
            .err(),
        tb.add_pod_with(PodSpec::new("node-a", "x").ip(a2.ip()))
            .err(),
        tb.add_pod_with(PodSpec::new("node-a", "x").ip(node_a.pod_gateway()))
            .err(),
        tb.add_pod_with(PodSpec::new("node-a", "x").netns_name(a1.netns_name()))
            .err(),
    ];
    for (i, error) in refused.iter().enumerate() {
        ensure!(error.is_some(), "refusal #{i} was accepted");
    }
    assert!(matches!(refused[0], Some(Error::UnknownNode(_))));
    assert!(matches!(refused[4], Some(Error::InvalidAddress { .. })));
    assert!(matches!(refused[7], Some(Error::AlreadyExists { .. })));
    assert_eq!(tb.pods().len(), 4, "refused pods must not be recorded");

    // `exec` runs inside the namespace.
    let out = tb.exec(&a1, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("10.77.1.2/32"),
        "{out:?}"
    );
    let out = node_a.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // Pods on another node, on the same node, and pods to nodes: TCP echo, no NAT.
    let server_b1 = EchoServer::start(&b1, b1.ip(), 3)?;
    let server_a2 = EchoServer::start(&a2, a2.ip(), 1)?;
    let server_node_b = EchoServer::start(&node_b, node_b.fabric_ip(), 1)?;
    let server_a1 = EchoServer::start(&a1, a1.ip(), 1)?;
    assert_eq!(echo(&a1, server_b1.addr, b"a1 to b1")?, b"a1 to b1");
    assert_eq!(echo(&a2, server_b1.addr, b"a2 to b1")?, b"a2 to b1");
    assert_eq!(echo(&b2, server_b1.addr, b"b2 to b1")?, b"b2 to b1");
    assert_eq!(echo(&a1, server_a2.addr, b"a1 to a2")?, b"a1 to a2");
    assert_eq!(
        echo(&a1, server_node_b.addr, b"pod to node")?,
        b"pod to node"
    );
    assert_eq!(
        echo(&node_a, server_a1.addr, b"node to pod")?,
        b"node to pod"
    );
    let mut peers = server_b1.peers()?;
    peers.sort();
    let mut expected = vec![
        IpAddr::V4(a1.ip()),
        IpAddr::V4(a2.ip()),
        IpAddr::V4(b2.ip()),
    ];
    expected.sort();
    assert_eq!(peers, expected);
    assert_eq!(server_a2.peers()?, [IpAddr::V4(a1.ip())]);
    assert_eq!(server_node_b.peers()?, [IpAddr::V4(a1.ip())]);
    assert_eq!(server_a1.peers()?, [IpAddr::V4(node_a.pod_gateway())]);

    let names = tb.netns_names().to_vec();
    tb.teardown()?;
    assert_gone(&names)
}

#[test]
#[ignore = "needs root"]
fn drop_removes_everything_even_after_a_panic() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    // Plain drop, with a process still running in a pod.
    let mut tb = Testbed::new()?;
    tb.add_node("node-a")?;
    let pod = tb.add_pod("node-a", "sleeper")?;
    let mut child = tb.spawn_in(&pod, Command::new("sleep").arg("30").stdin(Stdio::null()))?;
    let names = tb.netns_names().to_vec();
    drop(tb);
    assert_gone(&names)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("process in a dropped testbed's pod still running");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(9), "{status:?}");

    // Drop while unwinding from a panic in the test body.
    let seen: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut tb = Testbed::new().expect("testbed");
        tb.add_node("node-a").expect("node");
        tb.add_node("node-b").expect("node");
        tb.add_pod("node-b", "doomed").expect("pod");
        *seen.lock().expect("lock") = tb.netns_names().to_vec();
        panic!("deliberate panic with a live testbed");
    }));
    ensure!(outcome.is_err(), "the closure should have panicked");
    let names = seen.into_inner().expect("lock");
    ensure!(names.len() == 4, "{names:?}");
    assert_gone(&names)?;

    // A panic inside `run_in_netns` reaches the caller, and the testbed still cleans up.
    let mut tb = Testbed::new()?;
    tb.add_node("node-a")?;
    let names = tb.netns_names().to_vec();
    let path = tb.node("node-a").context("node")?.netns_path();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run_in_netns(&path, || panic!("inside the namespace"))
    }));
    ensure!(outcome.is_err(), "panic not propagated");
    tb.teardown()?;
    assert_gone(&names)
}

/// Deletes hand-made namespaces on drop.
struct Handmade(Vec<String>);

impl Handmade {
    fn add(&mut self, name: String) -> anyhow::Result<()> {
        let status = Command::new("ip").args(["netns", "add", &name]).status()?;
        self.0.push(name.clone());
        ensure!(status.success(), "ip netns add {name}");
        Ok(())
    }

    /// For names that look stale: a concurrent sweep (another test, another test process)
    /// may delete them even while `ip` is still creating them, which is fine.
    fn add_stale(&mut self, name: String) -> anyhow::Result<()> {
        Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()?;
        self.0.push(name);
        Ok(())
    }
}

impl Drop for Handmade {
    fn drop(&mut self) {
        for name in &self.0 {
            if std::path::Path::new(&format!("/run/netns/{name}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

#[test]
#[ignore = "needs root"]
fn stale_namespaces_of_dead_processes_are_swept() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    // `pid_max` itself is never a pid, so that "process" is certainly dead. Concurrent tests
    // (and test processes) sweep too, so the stale namespaces may vanish at any moment; the
    // names carry our pid so that they are ours alone.
    let dead: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()?;
    let own = std::process::id();
    let mut handmade = Handmade(Vec::new());
    let stale_dead = format!("{GENERATED_PREFIX}{dead}-{own}-node-a");
    // Our own pid with a counter we never issued: a previous process had our pid.
    let stale_reused = format!("{GENERATED_PREFIX}{own}-999999-node-a");
    // pid 1 is alive; the other two do not follow the scheme.
    let kept = [
        format!("{GENERATED_PREFIX}1-{own}-node-a"),
        format!("{GENERATED_PREFIX}{dead}-x{own}-node-a"),
        format!("membrane-netns-test-{own}-{dead}"),
    ];
    handmade.add_stale(stale_dead.clone())?;
    handmade.add_stale(stale_reused.clone())?;
    for name in &kept {
        handmade.add(name.clone())?;
    }
    let stale_path = format!("/run/netns/{stale_dead}");
    let target = std::fs::metadata(&stale_path).ok();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &stale_dead, "sleep", "30"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Let it enter the namespace (unless a concurrent sweep was faster) before sweeping.
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    while let Some(target) = &target {
        let inside = std::fs::metadata(format!("/proc/{}/ns/net", child.id()))
            .is_ok_and(|m| (m.dev(), m.ino()) == (target.dev(), target.ino()));
        if inside || !std::path::Path::new(&stale_path).exists() || child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("ip netns exec did not enter {stale_dead}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let tb = Testbed::new()?;
    let listed = netns_list()?;
    ensure!(!listed.contains(&stale_dead), "{stale_dead} not swept");
    ensure!(!listed.contains(&stale_reused), "{stale_reused} not swept");
    for name in &kept {
        ensure!(listed.contains(name), "{name} was swept");
    }
    for name in tb.netns_names() {
        ensure!(listed.contains(name), "{name} (live) was swept");
    }
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            bail!("process in a swept namespace still running");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tb.teardown()?;
    drop(handmade);
    assert_gone(&kept)
}

#[test]
#[ignore = "needs root"]
fn capture_sees_cross_node_traffic_but_not_same_node_traffic() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut tb = Testbed::new()?;
    let node_a = tb.add_node("node-a")?;
    tb.add_node("node-b")?;
    let a1 = tb.add_pod("node-a", "a1")?;
    let a2 = tb.add_pod("node-a", "a2")?;
    let b1 = tb.add_pod("node-b", "b1")?;

    ensure!(Capture::start(tb.fabric().netns_path(), "no-such-if").is_err());
    let fabric_all = tb.capture_fabric()?;
    let port_a = Capture::start(tb.fabric().netns_path(), node_a.bridge_port())?;
    let uplink_a = Capture::start(node_a.netns_path(), node_a.ifname())?;
    let pod_a2 = Capture::start(a2.netns_path(), a2.ifname())?;

    let cross = format!("MARKER-CROSS-{}", tb.id());
    let local = format!("MARKER-LOCAL-{}", tb.id());
    let server_b1 = EchoServer::start(&b1, b1.ip(), 1)?;
    let server_a2 = EchoServer::start(&a2, a2.ip(), 1)?;
    assert_eq!(
        echo(&a1, server_b1.addr, cross.as_bytes())?,
        cross.as_bytes()
    );
    assert_eq!(
        echo(&a1, server_a2.addr, local.as_bytes())?,
        local.as_bytes()
    );
    server_b1.peers()?;
    server_a2.peers()?;

    let fabric_all = fabric_all.stop();
    let port_a = port_a.stop();
    let uplink_a = uplink_a.stop();
    let pod_a2 = pod_a2.stop();
    for (what, captured) in [
        ("fabric", &fabric_all),
        ("bridge port", &port_a),
        ("node uplink", &uplink_a),
    ] {
        ensure!(captured.error.is_none(), "{what}: {:?}", captured.error);
        ensure!(
            captured.packets > 0 && captured.overflow_packets == 0,
            "{what}: {captured:?}"
        );
        ensure!(
            captured.contains(cross.as_bytes()),
            "{what}: cross-node marker not seen"
        );
        ensure!(
            !captured.contains(local.as_bytes()),
            "{what}: same-node marker seen"
        );
    }
    // Positive control: the same-node marker is visible where it does travel.
    ensure!(
        pod_a2.contains(local.as_bytes()),
        "pod capture missed the local marker"
    );
    ensure!(
        !pod_a2.contains(cross.as_bytes()),
        "pod capture saw another pod's traffic"
    );
    // Both directions cross the fabric: the echo reply too, on two ports each.
    ensure!(
        fabric_all.packets >= port_a.packets,
        "{} < {}",
        fabric_all.packets,
        port_a.packets
    );
    tb.teardown()?;
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn concurrent_testbeds_do_not_collide() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    // Start both builds at once. (Only this one rendezvous, before anything can fail, so a
    // failing builder cannot leave the other waiting.)
    let barrier = Barrier::new(2);
    let build = || -> anyhow::Result<(Vec<String>, Testbed)> {
        barrier.wait();
        let mut tb = Testbed::new()?;
        tb.add_node("node-a")?;
        tb.add_node("node-b")?;
        let client = tb.add_pod("node-a", "client")?;
        let server = tb.add_pod("node-b", "server")?;
        // Both testbeds use the very same addresses; each must reach its own server.
        assert_eq!(server.ip(), Ipv4Addr::new(10, 77, 2, 2));
        let message = format!("hello from {}", tb.id());
        let echo_server = EchoServer::start(&server, server.ip(), 1)?;
        ensure!(echo(&client, echo_server.addr, message.as_bytes())? == message.as_bytes());
        ensure!(echo_server.peers()? == [IpAddr::V4(client.ip())]);
        Ok((tb.netns_names().to_vec(), tb))
    };
    let (first, second) = std::thread::scope(|s| {
        let one = s.spawn(build);
        let two = s.spawn(build);
        (one.join(), two.join())
    });
    let (first, tb1) = first.map_err(|_| anyhow::anyhow!("builder panicked"))??;
    let (second, tb2) = second.map_err(|_| anyhow::anyhow!("builder panicked"))??;
    ensure!(tb1.id() != tb2.id());
    let overlap: Vec<_> = first.iter().filter(|n| second.contains(n)).collect();
    ensure!(overlap.is_empty(), "shared namespaces: {overlap:?}");
    tb1.teardown()?;
    // Tearing one down leaves the other intact.
    let listed = netns_list()?;
    for name in &second {
        ensure!(
            listed.contains(name),
            "{name} removed with the other testbed"
        );
    }
    tb2.teardown()?;
    assert_gone(&first)?;
    assert_gone(&second)
}

#[test]
#[ignore = "needs root"]
fn caller_chosen_names() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    ensure!(
        Testbed::with_prefix("mbt-1-2").is_err(),
        "reserved prefix accepted"
    );
    ensure!(
        Testbed::with_prefix("bad name").is_err(),
        "bad prefix accepted"
    );
    let prefix = format!("mbtest{}", std::process::id());
    let mut tb = Testbed::with_prefix(&prefix)?;
    // A second testbed with the same prefix would reuse existing names: refused, and the
    // first one is left untouched.
    ensure!(matches!(
        Testbed::with_prefix(&prefix),
        Err(Error::AlreadyExists { .. })
    ));
    let node = tb.add_node("node-a")?;
    let pod = tb.add_pod_with(
        PodSpec::new("node-a", "trainer-0").netns_name(format!("{prefix}-training-trainer-0")),
    )?;
    assert_eq!(tb.fabric().netns_name(), format!("{prefix}-fabric"));
    assert_eq!(tb.fabric().bridge_name(), "br-fabric");
    assert_eq!(node.netns_name(), format!("{prefix}-node-a"));
    assert_eq!(pod.netns_name(), format!("{prefix}-training-trainer-0"));
    let names = tb.netns_names().to_vec();
    let listed = netns_list()?;
    for name in &names {
        ensure!(listed.contains(name), "{name} missing");
    }
    // A node talks to its own pod.
    let server = EchoServer::start(&pod, pod.ip(), 1)?;
    assert_eq!(echo(&node, server.addr, b"ping")?, b"ping");
    server.peers()?;
    tb.teardown()?;
    assert_gone(&names)
}

#[test]
#[ignore = "needs root"]
fn pods_reach_each_other_over_ipv6_across_and_within_nodes() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut tb = Testbed::new()?;
    tb.add_node("node-a")?;
    tb.add_node("node-b")?;
    let a1 = tb.add_pod("node-a", "a1")?;
    let a2 = tb.add_pod("node-a", "a2")?;
    let b1 = tb.add_pod("node-b", "b1")?;
    assert_eq!(a1.ip6().to_string(), "fd00:77:1::2");
    assert_eq!(b1.ip6().to_string(), "fd00:77:2::2");
    // Larger than one packet, so a path that passes only small packets fails.
    let message = vec![b'6'; 64 * 1024];
    let capture = tb.capture_fabric()?;
    for (from, to) in [(&a1, &b1), (&a1, &a2), (&b1, &a2)] {
        let server = EchoServer::start(to, to.ip6(), 1)?;
        assert_eq!(
            echo(from, server.addr, &message)?,
            message,
            "{} → {}",
            from.name(),
            to.name()
        );
        assert_eq!(server.peers()?, vec![IpAddr::V6(from.ip6())], "no NAT");
    }
    let captured = capture.stop();
    assert!(
        captured.contains(b"666666666666"),
        "the cross-node IPv6 payload crossed the fabric"
    );
    tb.teardown()?;
    Ok(())
}
