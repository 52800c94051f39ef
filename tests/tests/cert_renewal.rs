//! Workload certificates renew by themselves: two nodes, the real controller issuing
//! certificates of a few seconds, one real ztunnel per node.
//!
//! - A long-lived tunnel carries checked bytes across many renewals of both ends'
//!   certificates, while new connections keep succeeding.
//! - A controller outage longer than the renewal point but shorter than the lifetime is
//!   invisible to traffic; renewals resume afterwards.
//! - An outage past expiry refuses new connections with a reason naming the expired
//!   certificate (access record, metric), and the mesh recovers by itself once the controller
//!   is back.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use membrane_tests::Pattern;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PORT: u16 = 8080;
const TRAINER_NODE: &str = "node-a";
const STORE_NODE: &str = "node-b";

async fn start(ttl: Duration) -> anyhow::Result<Mesh> {
    let mesh = Mesh::start(MeshSpec {
        nodes: vec![TRAINER_NODE.into(), STORE_NODE.into()],
        pods: vec![
            PodDef::new("trainer", "training", "trainer", TRAINER_NODE),
            PodDef::new("store", "data", "feature-store", STORE_NODE),
        ],
        mesh_namespaces: vec!["training".into(), "data".into()],
        cert_ttl: Some(ttl),
        ..MeshSpec::default()
    })
    .await?;
    mesh.enroll("trainer").await?;
    mesh.enroll("store").await?;
    mesh.echo_app("store", APP_PORT)?;
    Ok(mesh)
}

fn store_addr(mesh: &Mesh) -> SocketAddr {
    SocketAddr::new(mesh.ip("store"), APP_PORT)
}

/// A new connection from the trainer to the store's echo application, one ping, closed.
async fn probe(mesh: &Mesh) -> anyhow::Result<()> {
    let mut s = mesh.connect_from("trainer", store_addr(mesh)).await?;
    ping(&mut s).await
}

/// The sum of the samples of metric `name` whose labels contain every one of `labels`.
async fn metric(mesh: &Mesh, node: &str, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
    let z = mesh.ztunnels.get(node).context("no such node")?;
    let (status, body) = membrane_tests::http_get(z.metrics, "/metrics").await?;
    anyhow::ensure!(status == 200, "metrics: HTTP {status}");
    let mut sum = 0.0;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels.iter().all(|l| rest.contains(l)) {
            let value = rest.rsplit(' ').next().unwrap_or_default();
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(sum)
}

async fn renewals(mesh: &Mesh, node: &str, result: &str) -> anyhow::Result<u64> {
    let label = format!("result=\"{result}\"");
    let n = metric(
        mesh,
        node,
        "membrane_workload_certificate_renewals_total",
        &[&label],
    )
    .await?;
    Ok(n as u64)
}

/// The config dump's entry for the certificate of pod `pod`.
async fn certificate(mesh: &Mesh, pod: &str) -> anyhow::Result<serde_json::Value> {
    let node = &mesh.def(pod).node;
    let dump = mesh.config_dump(node).await?;
    let id = mesh.spiffe_id(pod);
    dump["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == id.as_str()))
        .cloned()
        .with_context(|| format!("no certificate for {id} in {dump}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A long-lived connection through the mesh to the echo application: a writer sends paced
/// pattern bytes until told to stop, a reader checks every echoed byte. Any reset, error or
/// mismatch ends it with an error.
struct Stream {
    stop: tokio::sync::watch::Sender<bool>,
    writer: tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>,
    reader: tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>,
}

impl Stream {
    async fn open(mesh: &Mesh) -> anyhow::Result<Self> {
        let s = mesh.connect_from("trainer", store_addr(mesh)).await?;
        let (mut r, mut w) = s.into_split();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let writer = tokio::spawn(async move {
            let mut pattern = Pattern(0x7261_696e);
            let (mut sent, mut hash) = (0u64, FNV_OFFSET);
            let mut buf = vec![0u8; 8 * 1024];
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                pattern.fill(&mut buf);
                w.write_all(&buf)
                    .await
                    .context("write on the long-lived tunnel")?;
                sent += buf.len() as u64;
                hash = fnv1a(hash, &buf);
            }
            w.shutdown().await?;
            Ok((sent, hash))
        });
        let reader = tokio::spawn(async move {
            // The writer fills whole 8-byte words, so the echo is the pattern word by word.
            let mut pattern = Pattern(0x7261_696e);
            let (mut word, mut used) = ([0u8; 8], 8);
            let (mut received, mut hash) = (0u64, FNV_OFFSET);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = r
                    .read(&mut buf)
                    .await
                    .context("read on the long-lived tunnel")?;
                if n == 0 {
                    break;
                }
                for (i, byte) in buf[..n].iter().enumerate() {
                    if used == word.len() {
                        pattern.fill(&mut word);
                        used = 0;
                    }
                    anyhow::ensure!(
                        *byte == word[used],
                        "corrupted echo at byte {}",
                        received + i as u64
                    );
                    used += 1;
                }
                received += n as u64;
                hash = fnv1a(hash, &buf[..n]);
            }
            Ok((received, hash))
        });
        Ok(Self {
            stop,
            writer,
            reader,
        })
    }

    /// Whether neither side has failed so far.
    fn healthy(&self) -> bool {
        !self.writer.is_finished() && !self.reader.is_finished()
    }

    /// Stops writing, half-closes, waits for the rest of the echo and checks both checksums.
    async fn finish(self) -> anyhow::Result<u64> {
        let _ = self.stop.send(true);
        let (sent, sent_hash) = tokio::time::timeout(Duration::from_secs(10), self.writer)
            .await
            .context("writer did not stop")???;
        let (received, received_hash) = tokio::time::timeout(Duration::from_secs(10), self.reader)
            .await
            .context("echo did not end")???;
        anyhow::ensure!(
            sent == received && sent_hash == received_hash,
            "sent {sent} bytes (checksum {sent_hash:x}), got back {received} ({received_hash:x})"
        );
        Ok(sent)
    }
}

/// (a) A tunnel open for more than 20 s across ≥ 10 renewals of each end's certificate keeps
/// carrying intact bytes; new connections every 500 ms all succeed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn long_lived_tunnel_survives_many_renewals() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = start(Duration::from_secs(4)).await?;
    probe(&mesh).await.context("first connection")?;
    let first_serial = certificate(&mesh, "trainer").await?["serial"].clone();
    let before = [
        renewals(&mesh, TRAINER_NODE, "success").await?,
        renewals(&mesh, STORE_NODE, "success").await?,
    ];
    let stream = Stream::open(&mesh).await?;
    let started = Instant::now();
    let mut probes = 0u32;
    let counts = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        probe(&mesh)
            .await
            .with_context(|| format!("new connection #{probes} failed"))?;
        probes += 1;
        anyhow::ensure!(stream.healthy(), "the long-lived tunnel ended early");
        let counts = [
            renewals(&mesh, TRAINER_NODE, "success").await? - before[0],
            renewals(&mesh, STORE_NODE, "success").await? - before[1],
        ];
        let elapsed = started.elapsed();
        if elapsed >= Duration::from_secs(20) && counts.iter().all(|n| *n >= 10) {
            break counts;
        }
        anyhow::ensure!(
            elapsed < Duration::from_secs(40),
            "only {counts:?} renewals (trainer, store) in {elapsed:?}"
        );
    };
    let duration = started.elapsed();
    let bytes = stream.finish().await?;
    let logged = [
        mesh.ztunnels[TRAINER_NODE].renewals(None).len(),
        mesh.ztunnels[STORE_NODE].renewals(None).len(),
    ];
    eprintln!(
        "long-lived tunnel: {bytes} bytes over {duration:?} across {counts:?} renewals \
         (trainer, store; {logged:?} logged with old and new serial), {probes} new connections"
    );
    assert!(
        logged.iter().all(|n| *n >= 10),
        "renewal log lines: {logged:?}"
    );
    // The tunnel's access record: closed cleanly, every byte counted.
    let z = &mesh.ztunnels[TRAINER_NODE];
    let record = z
        .wait_for_record(
            |r| r["direction"] == "outbound" && r["bytes_sent"].as_u64() == Some(bytes),
            Duration::from_secs(5),
        )
        .await
        .context("access record of the long-lived tunnel")?;
    assert_eq!(record["result"], "closed", "{record}");
    // The config dump shows the current certificate, its expiry and the next renewal.
    let cert = certificate(&mesh, "trainer").await?;
    assert_ne!(cert["serial"], first_serial, "{cert}");
    assert_eq!(cert["expired"], false, "{cert}");
    let next = cert["next_renewal_unix_ms"]
        .as_u64()
        .context("next renewal")?;
    let not_after_ms = cert["not_after_unix"].as_u64().context("expiry")? * 1000;
    assert!(next + 1000 >= now_ms() && next < not_after_ms, "{cert}");
    assert!(cert["next_renewal"].is_string() && cert["not_after"].is_string());
    let expiry = metric(
        &mesh,
        TRAINER_NODE,
        "membrane_workload_certificate_expiry_seconds",
        &[&mesh.spiffe_id("trainer")],
    )
    .await?;
    assert!(expiry > 0.0 && expiry <= 4.0, "expiry gauge {expiry}");
    Ok(())
}

/// The certificates' shortest time left, and the earliest planned renewal, in ms from now.
async fn margins(mesh: &Mesh) -> anyhow::Result<(i64, i64)> {
    let now = now_ms() as i64;
    let mut left = i64::MAX;
    let mut next = i64::MAX;
    for pod in ["trainer", "store"] {
        let cert = certificate(mesh, pod).await?;
        let not_after = cert["not_after_unix"].as_i64().context("expiry")? * 1000;
        let renewal = cert["next_renewal_unix_ms"].as_i64().context("renewal")?;
        left = left.min(not_after - now);
        next = next.min(renewal - now);
    }
    Ok((left, next))
}

/// (b) The controller goes away past the renewal point but not past expiry: renewals fail,
/// the valid certificates keep serving, traffic and new connections carry on, and renewals
/// resume once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn outage_shorter_than_the_lifetime_is_invisible() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = start(Duration::from_secs(6)).await?;
    probe(&mesh).await.context("first connection")?;
    let stream = Stream::open(&mesh).await?;
    // Pause when both certificates have ≥ 3 s left and a renewal is due well within the
    // outage: the outage then spans a renewal point but no expiry.
    let deadline = Instant::now() + Duration::from_secs(20);
    let outage = loop {
        let (left, next) = margins(&mesh).await?;
        let outage = (left - 1000).min(3500);
        if outage >= 2000 && next >= 0 && next + 500 < outage {
            break Duration::from_millis(outage as u64);
        }
        anyhow::ensure!(Instant::now() < deadline, "no window to pause in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let failures_before = renewals(&mesh, TRAINER_NODE, "failure").await?
        + renewals(&mesh, STORE_NODE, "failure").await?;
    let successes_before = [
        renewals(&mesh, TRAINER_NODE, "success").await?,
        renewals(&mesh, STORE_NODE, "success").await?,
    ];
    let paused_at = Instant::now();
    mesh.ca_mut().pause().await.context("pause")?;
    let mut probes = 0;
    while paused_at.elapsed() + Duration::from_millis(300) < outage {
        probe(&mesh)
            .await
            .with_context(|| format!("new connection #{probes} during the outage"))?;
        probes += 1;
        anyhow::ensure!(
            stream.healthy(),
            "the long-lived tunnel ended during the outage"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let failures = renewals(&mesh, TRAINER_NODE, "failure").await?
        + renewals(&mesh, STORE_NODE, "failure").await?
        - failures_before;
    let outage = paused_at.elapsed();
    assert!(
        failures >= 1,
        "a renewal was due during the {outage:?} outage"
    );
    mesh.ca_mut().resume().await?;
    // Renewals resume on both nodes; traffic never noticed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = [
            renewals(&mesh, TRAINER_NODE, "success").await?,
            renewals(&mesh, STORE_NODE, "success").await?,
        ];
        let failing = certificate(&mesh, "trainer").await?["renewal_failures"].as_u64() != Some(0)
            || certificate(&mesh, "store").await?["renewal_failures"].as_u64() != Some(0);
        if after[0] > successes_before[0] && after[1] > successes_before[1] && !failing {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "renewals did not resume: {after:?} after {successes_before:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    probe(&mesh).await.context("after the outage")?;
    let bytes = stream.finish().await?;
    eprintln!(
        "outage of {outage:?}: {failures} failed renewal attempts, {probes} new connections \
         during it, {bytes} bytes on the long-lived tunnel"
    );
    for node in [TRAINER_NODE, STORE_NODE] {
        let refused = metric(
            &mesh,
            node,
            "membrane_workload_certificate_refused_connections_total",
            &[],
        )
        .await?;
        assert_eq!(
            refused, 0.0,
            "{node} refused connections for want of a certificate"
        );
    }
    Ok(())
}

/// (c) The controller stays away past expiry: new connections are refused with a reason
/// naming the expired certificate and counted; once the controller is back they succeed
/// again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn outage_past_expiry_refuses_then_recovers() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = start(Duration::from_secs(3)).await?;
    probe(&mesh).await.context("first connection")?;
    mesh.ca_mut().pause().await.context("pause")?;
    // Both certificates expire (bounded: the lifetime is 3 s).
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let trainer = certificate(&mesh, "trainer").await?;
        let store = certificate(&mesh, "store").await?;
        if trainer["expired"] == true && store["expired"] == true {
            assert!(
                trainer["last_error"].is_string() && trainer["renewal_failures"].as_u64() > Some(0),
                "{trainer}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "certificates did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = probe(&mesh)
        .await
        .expect_err("refused without a valid certificate");
    eprintln!("connection with an expired certificate: {err:#}");
    let trainer_id = mesh.spiffe_id("trainer");
    let z = &mesh.ztunnels[TRAINER_NODE];
    let record = z
        .wait_for_record(
            |r| r["direction"] == "outbound" && r["result"] == "refused",
            Duration::from_secs(5),
        )
        .await
        .context("no refused access record")?;
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("expired")
            && reason.contains(&trainer_id)
            && reason.contains("renewal failed"),
        "reason: {reason}"
    );
    let refused = metric(
        &mesh,
        TRAINER_NODE,
        "membrane_workload_certificate_refused_connections_total",
        &["reporter=\"source\"", &trainer_id],
    )
    .await?;
    assert!(refused >= 1.0, "refusals counted: {refused}");
    let expiry = metric(
        &mesh,
        TRAINER_NODE,
        "membrane_workload_certificate_expiry_seconds",
        &[&trainer_id],
    )
    .await?;
    assert!(expiry < 0.0, "expiry gauge after expiry: {expiry}");
    let logged = z
        .logs
        .lock()
        .map(|l| {
            l.iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|v| {
                    v["message"] == "connection refused"
                        && v["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("expired") && r.contains(&trainer_id))
                })
        })
        .unwrap_or(false);
    assert!(logged, "a log line says why the connection was refused");

    // The controller is back: the next connections succeed, no restart.
    mesh.ca_mut().resume().await?;
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(10);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match probe(&mesh).await {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("no recovery within 10 s of the controller's return")),
        }
    }
    eprintln!(
        "recovered {:?} after the controller came back ({attempts} attempts)",
        resumed.elapsed()
    );
    for pod in ["trainer", "store"] {
        let cert = certificate(&mesh, pod).await?;
        assert_eq!(cert["expired"], false, "{cert}");
    }
    Ok(())
}
