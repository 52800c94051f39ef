//! The DNS capture end to end, in network namespaces with real ztunnels and the simulated
//! outside world ([`World`]: an authoritative server for a few names and TCP/TLS servers at
//! their addresses): every query of a mesh pod is captured whatever resolver it addresses,
//! answered faithfully, recorded by identity and pinned; connections to what the pod resolved
//! carry the pinned name and SNI in their records.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use membrane_tests::dns::{addresses, query, resolve, tcp_exchange, udp_exchange};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::outside::{plain_hello, tls_hello};
use membrane_tests::world::World;
use membrane_tests::{require_root, ztunnel_metric};
use serde_json::Value;

/// A resolver address nothing serves: only the capture can answer it.
const UNSERVED: &str = "192.0.2.53:53";

fn spec(extra: &[&str]) -> MeshSpec {
    let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    if !extra.contains(&"--dns-upstream") {
        args.extend([
            "--dns-upstream".to_owned(),
            membrane_tests::world::RESOLVER.to_string(),
        ]);
    }
    MeshSpec {
        ztunnel_args: args,
        extra_manifests: vec![(
            "service.yaml".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: store, namespace: data}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: store}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n".into(),
        )],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("trainer-2", "training", "trainer", "node-a"),
                PodDef::new("outsider", "plain", "default", "node-a"),
                PodDef::new("store", "data", "feature-store", "node-b"),
            ],
            &["training", "data"],
        )
    }
}

async fn start(extra: &[&str]) -> anyhow::Result<(Mesh, World)> {
    let mut mesh = Mesh::start(spec(extra)).await?;
    let world = World::start(&mut mesh.testbed)?;
    for pod in ["trainer", "trainer-2", "store"] {
        mesh.enroll(pod).await?;
    }
    Ok((mesh, world))
}

fn dns_records(mesh: &Mesh, node: &str) -> Vec<Value> {
    mesh.ztunnels[node]
        .access_records()
        .into_iter()
        .filter(|r| r["kind"] == "dns")
        .collect()
}

async fn wait_dns(mesh: &Mesh, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    mesh.ztunnels["node-a"]
        .wait_for_record(|r| r["kind"] == "dns" && pred(r), Duration::from_secs(5))
        .await
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no such DNS record; have {:#?}",
                dns_records(mesh, "node-a")
            )
        })
}

#[tokio::test]
#[ignore = "needs root"]
async fn every_query_of_a_mesh_pod_is_captured_answered_and_recorded_by_identity()
-> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start(&[]).await?;
    let ns = mesh.netns_path("trainer");
    let unserved: SocketAddr = UNSERVED.parse()?;
    let id = mesh.spiffe_id("trainer");

    // Through the resolver its resolv.conf would name, and through one nothing serves.
    for server in [world.resolver(), unserved] {
        let m = resolve(&ns, server, "huggingface.co", RecordType::A)?;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&m), ["198.51.100.10"], "via {server}");
        assert_eq!(m.answers[0].ttl, 300, "the upstream's TTL, unchanged");
    }
    let m = resolve(&ns, unserved, "huggingface.co", RecordType::AAAA)?;
    assert_eq!(addresses(&m), ["2001:db8:100::10"]);
    let m = resolve(&ns, unserved, "HuggingFace.co", RecordType::TXT)?;
    assert_eq!(m.answers.len(), 1, "other types pass as they are");
    let m = resolve(&ns, unserved, "cdn.hf.co", RecordType::A)?;
    assert_eq!(addresses(&m), ["198.51.100.11"]);
    let m = resolve(&ns, unserved, "nothing.huggingface.co", RecordType::A)?;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Over TCP, to the unserved address too.
    let m = Message::from_vec(&tcp_exchange(
        &ns,
        unserved,
        &query("paste.example", RecordType::A, false)?,
    )?)?;
    assert_eq!(addresses(&m), ["198.51.100.20"]);
    // Truncated over UDP without EDNS, then complete over TCP: the client's retry works.
    let small = query("big.example", RecordType::A, false)?;
    let cut = Message::from_vec(
        &udp_exchange(&ns, unserved, &small, Duration::from_secs(5))?
            .ok_or_else(|| anyhow::anyhow!("no answer"))?,
    )?;
    assert!(
        cut.metadata.truncation,
        "over 512 bytes without EDNS: TC set"
    );
    let full = Message::from_vec(&tcp_exchange(&ns, unserved, &small)?)?;
    assert_eq!(addresses(&full).len(), 40);
    // A mesh Service's name is answered from the mesh state.
    let m = resolve(&ns, unserved, "store.data.svc.cluster.local", RecordType::A)?;
    assert_eq!(addresses(&m), ["10.96.0.10"]);
    assert!(m.metadata.authoritative);

    let a = wait_dns(&mesh, |r| {
        r["qname"] == "huggingface.co" && r["qtype"] == "A"
    })
    .await?;
    assert_eq!(a["src_identity"], id);
    assert_eq!(a["pod"], "training/trainer");
    assert_eq!(a["rcode"], "NOERROR");
    assert_eq!(a["answers"], serde_json::json!(["198.51.100.10"]));
    assert_eq!(a["ttl"], 300);
    assert_eq!(a["protocol"], "udp");
    assert_eq!(a["local"], false);
    assert!(a["upstream_us"].as_u64().is_some());
    assert_eq!(a["pinned"], 1);
    let cname = wait_dns(&mesh, |r| r["qname"] == "cdn.hf.co").await?;
    assert_eq!(cname["cnames"], serde_json::json!(["cdn-lb.hf.co"]));
    assert_eq!(cname["answers"], serde_json::json!(["198.51.100.11"]));
    let aaaa = wait_dns(&mesh, |r| r["qtype"] == "AAAA").await?;
    assert_eq!(aaaa["answers"], serde_json::json!(["2001:db8:100::10"]));
    let tcp = wait_dns(&mesh, |r| r["qname"] == "paste.example").await?;
    assert_eq!(tcp["protocol"], "tcp");
    assert_eq!(tcp["resolver"], UNSERVED, "the resolver the pod addressed");
    wait_dns(&mesh, |r| {
        r["qname"] == "big.example" && r["truncated"] == true
    })
    .await?;
    wait_dns(&mesh, |r| {
        r["qname"] == "nothing.huggingface.co" && r["rcode"] == "NXDOMAIN"
    })
    .await?;
    let local = wait_dns(&mesh, |r| r["qname"] == "store.data.svc.cluster.local").await?;
    assert_eq!(local["local"], true);
    assert!(local["upstream_us"].is_null());
    assert!(
        ztunnel_metric(
            &mesh,
            "node-a",
            "membrane_dns_requests_total",
            &[&id, "rcode=\"NOERROR\""]
        )
        .await?
            >= 8.0
    );

    // A pod outside the mesh is not captured: the unserved address stays silent, and the
    // real resolver answers it directly, with no record.
    let outsider = mesh.netns_path("outsider");
    let q = query("huggingface.co", RecordType::A, true)?;
    assert!(udp_exchange(&outsider, unserved, &q, Duration::from_secs(1))?.is_none());
    assert!(udp_exchange(&outsider, world.resolver(), &q, Duration::from_secs(5))?.is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outsider_ip = mesh.ip("outsider").to_string();
    assert!(
        dns_records(&mesh, "node-a").iter().all(|r| !r["src_addr"]
            .as_str()
            .unwrap_or("")
            .starts_with(&outsider_ip)),
        "no record for the outsider"
    );
    Ok(())
}

async fn egress_record(mesh: &Mesh, pod: &str, dst: SocketAddr, n: usize) -> anyhow::Result<Value> {
    membrane_tests::outside::egress_record(mesh, "node-a", pod, dst, n).await
}

#[tokio::test]
#[ignore = "needs root"]
async fn connections_carry_the_pods_own_pins_and_sni_which_survive_a_restart_and_expire()
-> anyhow::Result<()> {
    require_root()?;
    let (mut mesh, world) = start(&[]).await?;
    let ns = mesh.netns_path("trainer");
    let unserved: SocketAddr = UNSERVED.parse()?;
    resolve(&ns, unserved, "huggingface.co", RecordType::A)?;
    resolve(&ns, unserved, "s3.example", RecordType::A)?;
    let hf: SocketAddr = "198.51.100.10:443".parse()?;
    let line = tls_hello(&mesh, "trainer", &world, hf, "huggingface.co").await?;
    assert!(line.contains("sni=huggingface.co"), "{line}");
    let r = egress_record(&mesh, "trainer", hf, 1).await?;
    assert_eq!(r["transport"], "passthrough");
    assert_eq!(r["egress"]["host"], "huggingface.co");
    assert_eq!(r["egress"]["sni"], "huggingface.co");
    assert_eq!(
        r["bytes_sent"].as_u64().map(|b| b > 100),
        Some(true),
        "the ClientHello went through"
    );

    // A literal address the pod never resolved; and pod A's pin is not pod B's.
    let paste: SocketAddr = "198.51.100.20:80".parse()?;
    assert!(
        plain_hello(&mesh, "trainer", paste)
            .await?
            .contains("paste.example")
    );
    let r = egress_record(&mesh, "trainer", paste, 1).await?;
    assert_eq!(r["egress"]["host"], "unresolved");
    assert!(r["egress"]["sni"].is_null());
    let hf80: SocketAddr = "198.51.100.10:80".parse()?;
    plain_hello(&mesh, "trainer-2", hf80).await?;
    let r = egress_record(&mesh, "trainer-2", hf80, 1).await?;
    assert_eq!(
        r["egress"]["host"], "unresolved",
        "trainer's pin is not trainer-2's"
    );

    // Pins survive a restart of the node's ztunnel (state directory).
    let s3: SocketAddr = "198.51.100.31:80".parse()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mesh.restart_ztunnel("node-a")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while plain_hello(&mesh, "trainer", hf80).await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no connection after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = egress_record(&mesh, "trainer", hf80, 1).await?;
    assert_eq!(
        r["egress"]["host"], "huggingface.co",
        "pinned before the restart"
    );
    let dump = mesh.config_dump("node-a").await?;
    assert_eq!(
        dump["dns"]["pins"]["training-trainer"], 3,
        "{:#}",
        dump["dns"]
    );

    // s3.example's TTL is 5 s: its pins end 35 s after the answer (TTL + 30 s grace).
    plain_hello(&mesh, "trainer", s3).await?;
    assert_eq!(
        egress_record(&mesh, "trainer", s3, 1).await?["egress"]["host"],
        "s3.example"
    );
    tokio::time::sleep(Duration::from_secs(36)).await;
    plain_hello(&mesh, "trainer", s3).await?;
    assert_eq!(
        egress_record(&mesh, "trainer", s3, 2).await?["egress"]["host"],
        "unresolved"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn malformed_queries_get_formerr_and_a_dead_upstream_servfail_without_harm()
-> anyhow::Result<()> {
    require_root()?;
    // Upstream: an address of the outside world where nothing listens.
    let (mesh, world) = start(&[
        "--dns-upstream",
        "198.51.100.99",
        "--dns-upstream-timeout",
        "1s",
    ])
    .await?;
    let ns = mesh.netns_path("trainer");
    let unserved: SocketAddr = UNSERVED.parse()?;
    let garbage = [
        0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff,
    ];
    let reply = udp_exchange(&ns, unserved, &garbage, Duration::from_secs(5))?
        .ok_or_else(|| anyhow::anyhow!("no FORMERR"))?;
    let reply = Message::from_vec(&reply)?;
    assert_eq!(
        (reply.metadata.id, reply.metadata.response_code),
        (0xbeef, ResponseCode::FormErr)
    );
    let started = std::time::Instant::now();
    let m = resolve(&ns, unserved, "huggingface.co", RecordType::A)?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded: {:?}",
        started.elapsed()
    );
    wait_dns(&mesh, |r| {
        r["rcode"] == "SERVFAIL" && r["reason"].is_string()
    })
    .await?;
    wait_dns(&mesh, |r| r["rcode"] == "FORMERR").await?;
    assert!(
        ztunnel_metric(&mesh, "node-a", "membrane_dns_upstream_failures_total", &[]).await? >= 1.0
    );
    assert!(
        ztunnel_metric(
            &mesh,
            "node-a",
            "membrane_dns_requests_total",
            &["rcode=\"SERVFAIL\""]
        )
        .await?
            >= 1.0
    );
    // The pod's other traffic is unaffected by the dead upstream.
    let line = plain_hello(&mesh, "trainer", "198.51.100.20:80".parse()?).await?;
    assert!(line.contains("paste.example"), "{line}");
    drop(world);
    Ok(())
}

/// A pod's queries over TCP share its in-flight budget with UDP: 320 connections each
/// asking an upstream that never answers, at once, have at most 256 queries in flight; the rest are dropped
/// and counted, and the pod's next query is answered once the budget is back.
#[tokio::test]
#[ignore = "needs root"]
async fn queries_over_tcp_are_held_to_the_pods_in_flight_budget() -> anyhow::Result<()> {
    use std::io::Write;
    require_root()?;
    // Upstream: the world's upload sink, which takes a query over TCP and never answers.
    let (mesh, world) = start(&[
        "--dns-upstream",
        "198.51.100.30:9000",
        "--dns-upstream-timeout",
        "6s",
    ])
    .await?;
    let ns = mesh.netns_path("trainer");
    let unserved: SocketAddr = UNSERVED.parse()?;
    let ask = query("huggingface.co", RecordType::A, true)?;
    let held = membrane_tests::netns::run_in_netns(&ns, move || -> anyhow::Result<Vec<_>> {
        let mut held = Vec::new();
        for _ in 0..320 {
            let mut s = std::net::TcpStream::connect_timeout(&unserved, Duration::from_secs(2))?;
            s.write_all(&u16::try_from(ask.len())?.to_be_bytes())?;
            s.write_all(&ask)?;
            held.push(s);
        }
        Ok(held)
    })??;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut dropped = 0.0;
    while dropped < 64.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dropped =
            ztunnel_metric(&mesh, "node-a", "membrane_dns_queries_dropped_total", &[]).await?;
    }
    assert!(
        (64.0..=70.0).contains(&dropped),
        "dropped over the budget: {dropped}"
    );
    drop(held);
    // Once the held queries time out upstream, the budget is back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let m = resolve(&ns, unserved, "huggingface.co", RecordType::A)?;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    drop(world);
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn udp_leaving_a_mesh_pod_is_counted_and_recorded_per_flow() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, _world) = start(&[]).await?;
    let ns = mesh.netns_path("trainer");
    let quic: SocketAddr = "198.51.100.10:443".parse()?;
    for _ in 0..3 {
        let echoed = udp_exchange(&ns, quic, b"quic-ish", Duration::from_secs(5))?;
        assert_eq!(
            echoed.as_deref(),
            Some(&b"quic-ish"[..]),
            "UDP is not blocked in part 1"
        );
    }
    let record = mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| r["transport"] == "udp" && r["dst_addr"] == "198.51.100.10:443",
            Duration::from_secs(12),
        )
        .await
        .ok_or_else(|| anyhow::anyhow!("no UDP flow record"))?;
    assert_eq!(record["src_identity"], mesh.spiffe_id("trainer"));
    assert_eq!(record["result"], "observed");
    let packets = ztunnel_metric(
        &mesh,
        "node-a",
        "membrane_udp_egress_packets_total",
        &["training/trainer"],
    )
    .await?;
    assert!(packets >= 3.0, "{packets}");
    // DNS is not counted as UDP egress: it is captured.
    resolve(&ns, UNSERVED.parse()?, "paste.example", RecordType::A)?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let flows: Vec<Value> = mesh.ztunnels["node-a"]
        .access_records()
        .into_iter()
        .filter(|r| r["transport"] == "udp")
        .collect();
    assert_eq!(
        flows.len(),
        1,
        "one record per flow, none for DNS: {flows:#?}"
    );
    Ok(())
}

/// Resident anonymous memory of a process, KiB (code pages vary between runs).
fn anon_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no RssAnon for {pid}"))
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_flood_of_names_stays_within_the_pin_bound() -> anyhow::Result<()> {
    require_root()?;
    const BOUND: u64 = 1000;
    const NAMES: u32 = 100_000;
    const CLIENTS: u32 = 8;
    let (mesh, _world) = start(&["--dns-max-pins-per-pod", &BOUND.to_string()]).await?;
    let ns = mesh.netns_path("trainer");
    let pid = mesh.ztunnels["node-a"].pid();
    // Fill the table to its bound first, so what follows can only replace pins.
    let flood = |from: u32, to: u32| {
        let ns = ns.clone();
        std::thread::spawn(move || -> anyhow::Result<u32> {
            membrane_tests::netns::run_in_netns(ns, move || -> anyhow::Result<u32> {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(3)))?;
                socket.connect(UNSERVED)?;
                let mut buf = [0u8; 1024];
                let mut answered = 0;
                for i in from..to {
                    socket.send(&query(
                        &format!("n{i}.flood.example"),
                        RecordType::A,
                        false,
                    )?)?;
                    if socket.recv(&mut buf).is_ok() {
                        answered += 1;
                    }
                }
                Ok(answered)
            })?
        })
    };
    flood(0, 2 * BOUND as u32)
        .join()
        .map_err(|_| anyhow::anyhow!("panicked"))??;
    let before = anon_kib(pid)?;
    let per = NAMES / CLIENTS;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| flood(10_000 + c * per, 10_000 + (c + 1) * per))
        .collect();
    let mut answered = 0;
    for w in workers {
        answered += w.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    }
    assert!(
        answered > NAMES * 99 / 100,
        "{answered} of {NAMES} answered"
    );
    let dump = mesh.config_dump("node-a").await?;
    assert_eq!(
        dump["dns"]["pins"]["training-trainer"], BOUND,
        "exactly the bound"
    );
    let evicted = ztunnel_metric(&mesh, "node-a", "membrane_dns_pins_evicted_total", &[]).await?;
    assert!(
        evicted >= f64::from(answered) - BOUND as f64,
        "evictions counted: {evicted}"
    );
    let after = anon_kib(pid)?;
    eprintln!(
        "{answered} names answered; pins {BOUND}, evicted {evicted}; anonymous memory {before} KiB → {after} KiB"
    );
    // The bound holds the table; what may grow is allocator slack, not one entry per name.
    assert!(
        after < before + 16 * 1024,
        "anonymous memory {before} KiB → {after} KiB after {NAMES} names"
    );
    // The world answers n<i>.flood.example with 100.64.0.0 + i.
    let m = resolve(&ns, UNSERVED.parse()?, "n0.flood.example", RecordType::A)?;
    assert_eq!(addresses(&m), ["100.64.0.0"], "the world's address plan");
    Ok(())
}
