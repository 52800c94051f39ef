//! EgressPolicy end to end, in network namespaces with real ztunnels, the controller's
//! directory source and the simulated outside world: each rule form, DENY over ALLOW,
//! default deny for selected sources, pins that are the pod's own, SNI on a shared address,
//! expiry, the no-bypass drops, budgets (across a restart) and policy edits closing open
//! connections.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use membrane_tests::dns::{resolve, udp_exchange};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::outside::{egress_record, hello, plain_hello, tls_hello, tls_open};
use membrane_tests::world::{HF6, SINK_PORT, World};
use membrane_tests::{require_root, ztunnel_metric};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A resolver address nothing serves: only the capture answers it.
const RESOLVER: &str = "192.0.2.53:53";

const HUB: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: hub, namespace: training}
spec:
  action: ALLOW
  rules:
  - to:
    - hosts: [huggingface.co, \"*.hf.co\"]
      ports: [443]
    - hosts: [models.shared.example]
      ports: [443]
    - hosts: [paste.example, s3.example]
      ports: [80]
  - from: [{principals: [\"cluster.local/ns/training/sa/trainer\"]}]
    to: [{ipBlocks: [198.51.100.30/32], ports: [80]}]
  - to: [{hosts: [s3.example], ports: [443]}]
    via: {gateway: egress}
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: no-paste, namespace: training}
spec:
  action: DENY
  rules:
  - to: [{hosts: [paste.example]}]
";

const MODEL_API: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: model-api, namespace: inference}
spec:
  rules:
  - to: [{hosts: [s3.example], ports: [9000]}]
  budget: {sentBytes: 1Mi, per: 20s}
";

fn spec() -> MeshSpec {
    MeshSpec {
        ztunnel_args: vec![
            "--dns-upstream".to_owned(),
            membrane_tests::world::RESOLVER.to_string(),
        ],
        extra_manifests: vec![
            ("egress-training.yaml".into(), HUB.into()),
            ("egress-inference.yaml".into(), MODEL_API.into()),
        ],
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("helper", "training", "helper", "node-a"),
                PodDef::new("infer", "inference", "model-server", "node-a"),
                PodDef::new("free", "data", "default", "node-a"),
            ],
            &["training", "inference", "data"],
        )
    }
}

async fn start() -> anyhow::Result<(Mesh, World)> {
    let mut mesh = Mesh::start(spec()).await?;
    let world = World::start(&mut mesh.testbed)?;
    for pod in ["trainer", "helper", "infer", "free"] {
        mesh.enroll(pod).await?;
    }
    Ok((mesh, world))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Resolves `name` from `pod` through the capture (which pins it for that pod).
fn lookup(mesh: &Mesh, pod: &str, name: &str, qtype: RecordType) -> anyhow::Result<()> {
    resolve(&mesh.netns_path(pod), addr(RESOLVER), name, qtype)?;
    Ok(())
}

async fn record(mesh: &Mesh, pod: &str, dst: &str, n: usize) -> anyhow::Result<Value> {
    egress_record(mesh, "node-a", pod, addr(dst), n).await
}

/// Asserts the `n`th record from `pod` to `dst` carries this verdict and reason.
async fn expect(
    mesh: &Mesh,
    pod: &str,
    dst: &str,
    n: usize,
    verdict: &str,
    reason: &str,
) -> anyhow::Result<Value> {
    let r = record(mesh, pod, dst, n).await?;
    anyhow::ensure!(
        r["egress"]["verdict"] == verdict && r["egress"]["reason"] == reason,
        "{pod} → {dst}: expected {verdict}/{reason}, got {r:#}"
    );
    Ok(r)
}

/// A connection the ztunnel refuses is accepted by the capture, then reset before any byte
/// of the destination arrives.
async fn refused_plain(mesh: &Mesh, pod: &str, dst: &str) -> anyhow::Result<()> {
    match plain_hello(mesh, pod, addr(dst)).await {
        Ok(line) => anyhow::bail!("{pod} → {dst} was let through: {line}"),
        Err(_) => Ok(()),
    }
}

async fn refused_tls(
    mesh: &Mesh,
    world: &World,
    pod: &str,
    dst: &str,
    sni: &str,
) -> anyhow::Result<()> {
    match tls_hello(mesh, pod, world, addr(dst), sni).await {
        Ok(line) => anyhow::bail!("{pod} → {dst} (sni {sni}) was let through: {line}"),
        Err(_) => Ok(()),
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn each_rule_form_decides_by_the_pods_own_names() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    for name in [
        "huggingface.co",
        "cdn.hf.co",
        "paste.example",
        "models.shared.example",
        "uploads.shared.example",
    ] {
        lookup(&mesh, "trainer", name, RecordType::A)?;
    }

    // Exact host on its port, with the pinned name as SNI.
    let line = tls_hello(
        &mesh,
        "trainer",
        &world,
        addr("198.51.100.10:443"),
        "huggingface.co",
    )
    .await?;
    assert!(line.contains("sni=huggingface.co"), "{line}");
    let r = expect(&mesh, "trainer", "198.51.100.10:443", 1, "allow", "matched").await?;
    assert_eq!(r["egress"]["policy"], "training/hub");
    assert_eq!(r["egress"]["rule"], 0);
    assert_eq!(r["egress"]["matched"], "huggingface.co");
    assert_eq!(r["egress"]["sni"], "huggingface.co");
    assert_eq!(r["result"], "closed");
    // Wildcard.
    tls_hello(
        &mesh,
        "trainer",
        &world,
        addr("198.51.100.11:443"),
        "cdn.hf.co",
    )
    .await?;
    let r = expect(&mesh, "trainer", "198.51.100.11:443", 1, "allow", "matched").await?;
    assert_eq!(r["egress"]["matched"], "cdn.hf.co");
    // The right host on a port the rule does not name: default deny.
    refused_plain(&mesh, "trainer", "198.51.100.10:80").await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.10:80",
        1,
        "deny",
        "not_allowed",
    )
    .await?;
    assert_eq!(r["result"], "refused");
    assert_eq!(r["bytes_received"], 0);
    // DENY over ALLOW.
    refused_plain(&mesh, "trainer", "198.51.100.20:80").await?;
    let r = expect(&mesh, "trainer", "198.51.100.20:80", 1, "deny", "matched").await?;
    assert_eq!(r["egress"]["policy"], "training/no-paste");
    // ipBlocks with a from-principal: the trainer's literal address passes, the helper's
    // (same namespace, another service account) does not.
    assert!(
        plain_hello(&mesh, "trainer", addr("198.51.100.30:80"))
            .await?
            .contains("s3.example")
    );
    expect(&mesh, "trainer", "198.51.100.30:80", 1, "allow", "matched").await?;
    refused_plain(&mesh, "helper", "198.51.100.30:80").await?;
    expect(
        &mesh,
        "helper",
        "198.51.100.30:80",
        1,
        "deny",
        "not_allowed",
    )
    .await?;
    // A literal address never matches a host rule (s3.example was never resolved).
    refused_plain(&mesh, "trainer", "198.51.100.31:80").await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.31:80",
        1,
        "deny",
        "not_allowed",
    )
    .await?;
    assert_eq!(r["egress"]["host"], "unresolved");
    // Another pod's pin never helps: the helper did not resolve huggingface.co.
    refused_tls(
        &mesh,
        &world,
        "helper",
        "198.51.100.10:443",
        "huggingface.co",
    )
    .await?;
    expect(
        &mesh,
        "helper",
        "198.51.100.10:443",
        1,
        "deny",
        "not_allowed",
    )
    .await?;
    // One address, two names, one allowed: the SNI decides.
    tls_hello(
        &mesh,
        "trainer",
        &world,
        addr("198.51.100.40:443"),
        "models.shared.example",
    )
    .await?;
    let r = expect(&mesh, "trainer", "198.51.100.40:443", 1, "allow", "matched").await?;
    assert_eq!(r["egress"]["matched"], "models.shared.example");
    refused_tls(
        &mesh,
        &world,
        "trainer",
        "198.51.100.40:443",
        "uploads.shared.example",
    )
    .await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.40:443",
        2,
        "deny",
        "sni_mismatch",
    )
    .await?;
    assert_eq!(r["egress"]["sni"], "uploads.shared.example");
    // A ClientHello without SNI where a host rule decides.
    refused_tls(
        &mesh,
        &world,
        "trainer",
        "198.51.100.10:443",
        "198.51.100.10",
    )
    .await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.10:443",
        2,
        "deny",
        "sni_missing",
    )
    .await?;
    assert!(r["egress"]["sni"].is_null());
    // A rule that names an egress gateway never lets the node connect directly.
    lookup(&mesh, "trainer", "s3.example", RecordType::A)?;
    refused_tls(&mesh, &world, "trainer", "198.51.100.30:443", "s3.example").await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.30:443",
        1,
        "deny",
        "gateway_unavailable",
    )
    .await?;
    assert_eq!(r["egress"]["via"], "training/egress", "{r:#}");
    // No policy selects the free pod: it passes through, recorded as such.
    assert!(
        plain_hello(&mesh, "free", addr("198.51.100.20:80"))
            .await?
            .contains("paste.example")
    );
    let r = expect(
        &mesh,
        "free",
        "198.51.100.20:80",
        1,
        "passthrough",
        "no_policy",
    )
    .await?;
    assert!(r["egress"]["policy"].is_null());

    let id = mesh.spiffe_id("trainer");
    let denied = ztunnel_metric(
        &mesh,
        "node-a",
        "membrane_egress_decisions_total",
        &["verdict=\"deny\""],
    )
    .await?;
    assert!(denied >= 7.0, "{denied} denials counted ({id})");
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_selected_pod_cannot_leave_over_udp_or_ipv6_while_others_can() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, _world) = start().await?;
    let exchange = |pod: &str, dst: SocketAddr, wait: Duration| {
        let ns = mesh.netns_path(pod);
        tokio::task::spawn_blocking(move || udp_exchange(&ns, dst, b"quic-ish", wait))
    };
    let quic = addr("198.51.100.10:443");
    let quic6 = SocketAddr::new(HF6.into(), 443);
    for dst in [quic, quic6] {
        let echoed = exchange("free", dst, Duration::from_secs(5)).await??;
        assert_eq!(
            echoed.as_deref(),
            Some(&b"quic-ish"[..]),
            "free pod to {dst}"
        );
        // Dropped in the pod's output path: the send fails (EPERM) or nothing comes back.
        match exchange("trainer", dst, Duration::from_secs(1)).await? {
            Ok(None) => {}
            Err(e) if e.to_string().contains("not permitted") => {}
            other => anyhow::bail!("the trainer's UDP to {dst} left the pod: {other:?}"),
        }
    }
    // DNS still works for the locked pod, over both families' answers.
    lookup(&mesh, "trainer", "huggingface.co", RecordType::AAAA)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    loop {
        let dropped = ztunnel_metric(
            &mesh,
            "node-a",
            "membrane_egress_dropped_packets_total",
            &["training/trainer"],
        )
        .await?;
        if dropped >= 2.0 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "drops not counted: {dropped}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // TCP over IPv6 is captured and decided like IPv4: the pinned name allows it.
    let mut tcp = mesh
        .connect_from("trainer", SocketAddr::new(HF6.into(), 80))
        .await?;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(
        !matches!(n, Ok(Ok(1))),
        "port 80 is not allowed over IPv6 either"
    );
    let r = egress_record(
        &mesh,
        "node-a",
        "trainer",
        SocketAddr::new(HF6.into(), 80),
        1,
    )
    .await?;
    assert_eq!(r["egress"]["verdict"], "deny", "{r:#}");
    assert_eq!(r["egress"]["host"], "huggingface.co", "{r:#}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn an_expired_pin_no_longer_allows() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, _world) = start().await?;
    // s3.example's TTL is 5 s: its pins end 35 s after the answer (TTL + 30 s grace).
    lookup(&mesh, "trainer", "s3.example", RecordType::A)?;
    assert!(
        plain_hello(&mesh, "trainer", addr("198.51.100.31:80"))
            .await?
            .contains("s3.example")
    );
    expect(&mesh, "trainer", "198.51.100.31:80", 1, "allow", "matched").await?;
    tokio::time::sleep(Duration::from_secs(36)).await;
    refused_plain(&mesh, "trainer", "198.51.100.31:80").await?;
    let r = expect(
        &mesh,
        "trainer",
        "198.51.100.31:80",
        2,
        "deny",
        "not_allowed",
    )
    .await?;
    assert_eq!(r["egress"]["host"], "unresolved");
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_budget_cuts_an_upload_near_its_limit_and_holds_across_a_restart() -> anyhow::Result<()> {
    require_root()?;
    let (mut mesh, world) = start().await?;
    lookup(&mesh, "infer", "s3.example", RecordType::A)?;
    let sink = addr(&format!("198.51.100.30:{SINK_PORT}"));
    let started = tokio::time::Instant::now();
    let mut tcp = mesh.connect_from("infer", sink).await?;
    let chunk = vec![0x5a; 64 * 1024];
    let mut sent = 0usize;
    // 10 MiB, bounded: the write fails once the ztunnel cuts the connection.
    let upload = async {
        while sent < 10 << 20 {
            tcp.write_all(&chunk).await?;
            sent += chunk.len();
        }
        tcp.shutdown().await
    };
    // The pod's writes may all land in socket buffers before the cut: the record and the
    // sink say what left.
    let _ = tokio::time::timeout(Duration::from_secs(15), upload).await;
    let r = record(&mesh, "infer", &sink.to_string(), 1).await?;
    assert_eq!(r["egress"]["reason"], "budget_exhausted", "{r:#}");
    assert_eq!(r["egress"]["policy"], "inference/model-api");
    let out = r["bytes_sent"].as_u64().unwrap_or(u64::MAX);
    assert!(
        ((1 << 20) - (64 << 10)..=1 << 20).contains(&out),
        "{out} bytes sent"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let arrived = world.sunk();
    assert!(
        (900 << 10..=1 << 20).contains(&arrived),
        "{arrived} bytes arrived"
    );
    let exhausted = ztunnel_metric(
        &mesh,
        "node-a",
        "membrane_egress_budget_exhausted_total",
        &["policy=\"inference/model-api\"", "direction=\"sent\""],
    )
    .await?;
    assert_eq!(exhausted, 1.0);
    // The node's admin dump shows the policies it holds and the spent window.
    let dump = mesh.config_dump("node-a").await?;
    let held = dump["egress"]["policies"].to_string();
    assert!(
        held.contains("inference/model-api") && held.contains("training/hub"),
        "{held}"
    );
    let windows = dump["egress"]["budgetWindows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        windows.iter().any(|w| w["policy"] == "inference/model-api"
            && w["host"] == "s3.example"
            && w["spent"] == true
            && w["sent"] == 1 << 20),
        "{windows:#?}"
    );

    // Refused until the window rolls, even after the ztunnel restarts.
    refused_plain(&mesh, "infer", &sink.to_string()).await.ok();
    let r = record(&mesh, "infer", &sink.to_string(), 2).await?;
    assert_eq!(r["egress"]["reason"], "budget_exhausted", "{r:#}");
    assert_eq!(r["result"], "refused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mesh.restart_ztunnel("node-a")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let third = loop {
        let mut tcp = match mesh.connect_from("infer", sink).await {
            Ok(tcp) => tcp,
            Err(e) => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no capture after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.write_all(b"more").await;
        match record(&mesh, "infer", &sink.to_string(), 1).await {
            Ok(r) => break r,
            Err(_) => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no record after the restart"
                );
            }
        }
    };
    assert_eq!(third["egress"]["reason"], "budget_exhausted", "{third:#}");
    // After the window (20 s from the first connection), connections pass again.
    let rolled = started + Duration::from_secs(21);
    tokio::time::sleep_until(rolled).await;
    let before = world.sunk();
    let mut tcp = mesh.connect_from("infer", sink).await?;
    tcp.write_all(b"after the window").await?;
    tcp.shutdown().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while world.sunk() < before + 16 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived after the window rolled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_policy_edit_closes_an_open_connection_within_a_second() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    lookup(&mesh, "trainer", "huggingface.co", RecordType::A)?;
    let hf = addr("198.51.100.10:443");
    let mut tls = tls_open(&mesh, "trainer", &world, hf, "huggingface.co").await?;
    assert!(hello(&mut tls).await?.contains("huggingface.co"));
    tls.write_all(b"ping\n").await?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await?;
    // The edit drops huggingface.co from the hub policy.
    let edited = HUB.replace(
        "hosts: [huggingface.co, \"*.hf.co\"]",
        "hosts: [\"*.hf.co\"]",
    );
    anyhow::ensure!(edited != HUB, "the edit must change the policy");
    let edit_at = tokio::time::Instant::now();
    mesh.write_manifest("egress-training.yaml", &edited)?;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    let closed_after = edit_at.elapsed();
    assert!(read.is_ok(), "the connection stayed open after the edit");
    assert!(
        closed_after < Duration::from_secs(1),
        "closed after {closed_after:?}"
    );
    let r = record(&mesh, "trainer", &hf.to_string(), 1).await?;
    assert_eq!(r["egress"]["reason"], "policy_changed", "{r:#}");
    assert_eq!(r["egress"]["verdict"], "deny");
    // And a new connection is refused.
    refused_tls(
        &mesh,
        &world,
        "trainer",
        "198.51.100.10:443",
        "huggingface.co",
    )
    .await?;
    expect(
        &mesh,
        "trainer",
        "198.51.100.10:443",
        2,
        "deny",
        "not_allowed",
    )
    .await?;
    Ok(())
}

/// A destination outside the mesh that drops SYNs: the application's `connect` returned at
/// the capture, so the ztunnel gives up after its own connect timeout (10 s), closes the
/// application's connection and records why — not after the kernel's two minutes of retries.
#[tokio::test]
#[ignore = "needs root"]
async fn a_destination_that_drops_syns_is_given_up_on_in_seconds() -> anyhow::Result<()> {
    require_root()?;
    let (mesh, world) = start().await?;
    let rules = "table ip membrane-test-blackhole {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 81 drop\n }\n}\n";
    let mut nft = membrane_tests::netns::command_in(world.netns_name(), "nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = nft.stdin.take() {
        std::io::Write::write_all(&mut stdin, rules.as_bytes())?;
    }
    anyhow::ensure!(nft.wait()?.success(), "installing the blackhole rule");
    // "free" has no EgressPolicy: its connections pass through.
    let dst = "198.51.100.20:81";
    let started = std::time::Instant::now();
    let mut tcp = mesh.connect_from("free", addr(dst)).await?;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the connection was not closed: {read:?}"
    );
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&waited),
        "closed after {waited:?}"
    );
    let r = record(&mesh, "free", dst, 1).await?;
    assert_eq!(r["result"], "refused", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|why| why.contains("no answer within 10s")),
        "{r:#}"
    );
    drop(world);
    Ok(())
}
