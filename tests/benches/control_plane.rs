//! The control plane at scale (not a test: nothing here asserts). One controller process
//! (`membrane-ca`, release build) holding `MEMBRANE_BENCH_CP_WORKLOADS` (10,000) mesh pods over
//! 100 namespaces and `MEMBRANE_BENCH_CP_POLICIES` (2,000) AuthorizationPolicies, streaming to
//! `MEMBRANE_BENCH_CP_NODES` (1,000) concurrent node streams — in-process `Discovery.Watch`
//! clients in this program, each authenticated as its own node, pods spread evenly over the
//! nodes. Measured for both sources, the same way:
//!
//! - `kubernetes`: objects created in a real kube-apiserver (`testbed::kube`), the chart
//!   applied, the controller run with its ServiceAccount token, each node stream with a bound
//!   token of the ztunnel ServiceAccount (TokenReview);
//! - `directory`: the same objects as manifest files, nodes with bootstrap tokens.
//!
//! Reported: the initial sync (controller start → every stream holds every workload); a
//! policy edit (`MEMBRANE_BENCH_CP_EDITS`, 10 edits: one policy's rule changed in the API or
//! its file) → each stream has received it: the per-stream latency p50/p99 and, per edit, the
//! time until *all* streams have it (p50/p99 over edits; target p99 < 1 s); a new pod (created
//! and its IP reported, as a kubelet does) → every stream; bytes of the update that carried
//! each change; the controller's RSS (current and peak) and CPU seconds per change. Markdown
//! table plus one JSON line.
//!
//! Run with `scripts/bench-control-plane.sh` (builds the release binaries, raises the file
//! limit: 1,000 streams are 1,000 TLS connections). `MEMBRANE_BENCH_CP_SOURCES`
//! (`kubernetes,directory`) picks the sources.

#![allow(clippy::print_stdout)] // the report is the program's output

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use membrane_proto::v1::resource::Kind;
use membrane_testbed::kube::{KubeApi, KubeController, controller_binary};
use membrane_tests::kube::{Chart, NAMESPACE, apply, create_pod, install, ztunnel_token};
use prost::Message as _;

#[path = "control_plane/sources.rs"]
mod sources;
use sources::{DirectorySource, KubeSource};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Scale {
    workloads: usize,
    policies: usize,
    nodes: usize,
    edits: usize,
    namespaces: usize,
}

impl Scale {
    fn from_env() -> Self {
        Self {
            workloads: env_usize("MEMBRANE_BENCH_CP_WORKLOADS", 10_000),
            policies: env_usize("MEMBRANE_BENCH_CP_POLICIES", 2_000),
            nodes: env_usize("MEMBRANE_BENCH_CP_NODES", 1_000),
            edits: env_usize("MEMBRANE_BENCH_CP_EDITS", 10),
            namespaces: 100,
        }
    }

    fn node(&self, pod: usize) -> String {
        format!("node-{}", pod % self.nodes)
    }

    fn ip(pod: usize) -> String {
        format!(
            "10.{}.{}.{}",
            100 + pod / 65_536,
            (pod / 256) % 256,
            pod % 256
        )
    }

    fn pod_ns(&self, pod: usize) -> String {
        format!("ns-{}", pod % self.namespaces)
    }
}

/// A marker each stream looks for in its updates: a policy's rule principal or a new
/// workload's name.
#[derive(Default)]
struct Seen {
    /// marker → (stream index → when it arrived, bytes of that update).
    arrivals: BTreeMap<String, BTreeMap<usize, (Instant, usize)>>,
    /// Streams that hold at least `workloads` workloads (the initial sync), with when.
    synced: BTreeMap<usize, Instant>,
}

type Shared = Arc<Mutex<Seen>>;

/// Streams opened at once before waiting for them to sync.
const WAVE: usize = 50;

/// The markers an update carries.
fn markers(update: &membrane_proto::v1::Update) -> Vec<String> {
    let mut out = Vec::new();
    for resource in &update.upserts {
        match &resource.kind {
            Some(Kind::Authorization(a)) if a.name == "bench-edit" => {
                for rule in &a.rules {
                    for source in &rule.from {
                        let principals = source.principals.iter().flat_map(|v| &v.values);
                        out.extend(principals.map(|p| format!("policy:{p}")));
                    }
                }
            }
            Some(Kind::Workload(w)) if w.name.starts_with("bench-new-") => {
                out.push(format!("pod:{}", w.name));
            }
            _ => {}
        }
    }
    out
}

/// Opens one node's stream and records what arrives, until the program ends.
async fn stream(
    index: usize,
    node: String,
    endpoint: String,
    root: String,
    token: String,
    workloads: usize,
    seen: Shared,
) -> anyhow::Result<()> {
    let mut client =
        membrane_ca::client::CaClient::connect(&endpoint, root.as_bytes(), "membrane-ca", &token)
            .await?;
    let mut updates = client.watch(&node).await?;
    let mut held = 0usize;
    while let Some(update) = updates.next().await {
        let update = update?;
        let now = Instant::now();
        let bytes = update.encoded_len();
        if update.snapshot {
            held = 0;
        }
        held += (update.upserts.iter())
            .filter(|r| matches!(r.kind, Some(Kind::Workload(_))))
            .count();
        let found = markers(&update);
        let version = update.version;
        if let Ok(mut s) = seen.lock() {
            if held >= workloads {
                s.synced.entry(index).or_insert(now);
            }
            for marker in found {
                s.arrivals
                    .entry(marker)
                    .or_default()
                    .entry(index)
                    .or_insert((now, bytes));
            }
        }
        client.ack(&node, version).await?;
    }
    bail!("stream of {node} ended")
}

/// Waits until `done(seen)` holds (bounded).
async fn wait_for(seen: &Shared, timeout: Duration, done: impl Fn(&Seen) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if seen.lock().map(|s| done(&s)).unwrap_or(false) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// utime + stime (seconds) and RSS / peak RSS (MiB) of `pid`.
fn usage(pid: u32) -> anyhow::Result<(f64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((
        ticks / 100.0,
        kib("VmRSS:") / 1024.0,
        kib("VmHWM:") / 1024.0,
    ))
}

/// One source under test: creates objects, edits a policy, adds a pod.
trait Source {
    fn controller(&self) -> &KubeController;
    fn token(&self, node: usize) -> String;
    async fn edit_policy(&self, principal: &str) -> anyhow::Result<()>;
    async fn add_pod(&self, name: &str, pod: usize) -> anyhow::Result<()>;
}

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    source: String,
    initial_sync_s: f64,
    edit_per_stream_p50_ms: f64,
    edit_per_stream_p99_ms: f64,
    edit_all_streams_p50_ms: f64,
    edit_all_streams_p99_ms: f64,
    pod_all_streams_p50_ms: f64,
    pod_all_streams_p99_ms: f64,
    edit_update_bytes: f64,
    pod_update_bytes: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    cpu_ms_per_edit: f64,
    cpu_ms_per_pod: f64,
}

/// Sends a change `edits` times and reports (per-stream latencies, time to all streams,
/// bytes, controller CPU per change).
async fn changes<S: Source>(
    source: &S,
    seen: &Shared,
    scale: Scale,
    pods: bool,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64, f64)> {
    let pid = source.controller().pid().context("controller pid")?;
    let (mut per_stream, mut all, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let (cpu0, _, _) = usage(pid)?;
    for k in 0..scale.edits {
        let marker = if pods {
            format!("pod:bench-new-{k}")
        } else {
            format!("policy:cluster.local/ns/ns-0/sa/edit-{k}")
        };
        let start = Instant::now();
        if pods {
            source
                .add_pod(&format!("bench-new-{k}"), scale.workloads + k)
                .await?;
        } else {
            source
                .edit_policy(&format!("cluster.local/ns/ns-0/sa/edit-{k}"))
                .await?;
        }
        let complete = wait_for(seen, Duration::from_secs(60), |s| {
            s.arrivals.get(&marker).map_or(0, BTreeMap::len) >= scale.nodes
        })
        .await;
        if !complete {
            bail!("{marker} did not reach every stream within 60 s");
        }
        let arrivals: Vec<(Instant, usize)> = {
            let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            s.arrivals[&marker].values().copied().collect()
        };
        let mut last = 0f64;
        for (when, b) in arrivals {
            let ms = when.duration_since(start).as_secs_f64() * 1e3;
            per_stream.push(ms);
            last = last.max(ms);
            bytes.push(b as f64);
        }
        all.push(last);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (cpu1, _, _) = usage(pid)?;
    per_stream.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    let mean_bytes = bytes.iter().sum::<f64>() / bytes.len().max(1) as f64;
    let cpu_ms = (cpu1 - cpu0) * 1e3 / scale.edits.max(1) as f64;
    Ok((per_stream, all, mean_bytes, cpu_ms))
}

async fn run<S: Source>(name: &str, source: S, scale: Scale) -> anyhow::Result<Report> {
    let seen: Shared = Arc::default();
    let started = Instant::now();
    let endpoint = source.controller().endpoint();
    let root = source.controller().root_pem()?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..scale.nodes {
        let (endpoint, root, token, shared) = (
            endpoint.clone(),
            root.clone(),
            source.token(i),
            seen.clone(),
        );
        // As a ztunnel does: reconnect after a refusal (the controller answers Unavailable
        // until its source has loaded) or a broken stream.
        tasks.spawn(async move {
            loop {
                let (node, e, r, t) = (format!("node-{i}"), &endpoint, &root, &token);
                let result = stream(
                    i,
                    node,
                    e.clone(),
                    r.clone(),
                    t.clone(),
                    scale.workloads,
                    shared.clone(),
                );
                if let Err(e) = result.await
                    && !e.to_string().contains("not loaded")
                {
                    eprintln!("stream node-{i}: {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        // Streams open in waves, each synced before the next opens, as ztunnels roll out: all
        // 1,000 snapshots at once (10 GB of TLS on 2 cores shared with the API server) would
        // starve the clients' HTTP/2 keepalive answers and the controller would close them.
        let opened = i + 1;
        if opened % WAVE == 0 || opened == scale.nodes {
            let synced = wait_for(&seen, Duration::from_secs(120), |s| {
                s.synced.len() >= opened
            });
            if !synced.await {
                bail!("{name}: the wave up to stream {opened} did not sync within 120 s");
            }
        }
    }
    if !wait_for(&seen, Duration::from_secs(60), |s| {
        s.synced.len() >= scale.nodes
    })
    .await
    {
        let n = seen.lock().map(|s| s.synced.len()).unwrap_or(0);
        bail!(
            "{name}: only {n} of {} streams synced within 600 s",
            scale.nodes
        );
    }
    let initial_sync_s = started.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {} streams synced in {initial_sync_s:.1} s",
        scale.nodes
    );
    let (edit_stream, edit_all, edit_bytes, cpu_edit) =
        changes(&source, &seen, scale, false).await?;
    let (_, pod_all, pod_bytes, cpu_pod) = changes(&source, &seen, scale, true).await?;
    let pid = source.controller().pid().context("controller pid")?;
    let (_, rss, peak) = usage(pid)?;
    tasks.abort_all();
    Ok(Report {
        source: name.to_owned(),
        initial_sync_s,
        edit_per_stream_p50_ms: percentile(&edit_stream, 50.0),
        edit_per_stream_p99_ms: percentile(&edit_stream, 99.0),
        edit_all_streams_p50_ms: percentile(&edit_all, 50.0),
        edit_all_streams_p99_ms: percentile(&edit_all, 99.0),
        pod_all_streams_p50_ms: percentile(&pod_all, 50.0),
        pod_all_streams_p99_ms: percentile(&pod_all, 99.0),
        edit_update_bytes: edit_bytes,
        pod_update_bytes: pod_bytes,
        rss_mib: rss,
        peak_rss_mib: peak,
        cpu_ms_per_edit: cpu_edit,
        cpu_ms_per_pod: cpu_pod,
    })
}

fn main() -> anyhow::Result<()> {
    let scale = Scale::from_env();
    eprintln!("controller: {}", controller_binary()?.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sources = std::env::var("MEMBRANE_BENCH_CP_SOURCES")
        .unwrap_or_else(|_| "kubernetes,directory".into());
    let mut reports = Vec::new();
    for source in sources.split(',') {
        // Interrupted (Ctrl-C, SIGTERM), the measurement is dropped, which stops the API
        // server, etcd and the controller it started.
        let report = runtime.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let measure = async {
                match source {
                    "kubernetes" => run(source, KubeSource::start(scale).await?, scale).await,
                    "directory" => run(source, DirectorySource::start(scale)?, scale).await,
                    other => bail!("unknown source {other} (kubernetes, directory)"),
                }
            };
            tokio::select! {
                report = measure => report,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                _ = term.recv() => bail!("terminated"),
            }
        })?;
        // Shown at once, so a later source's failure loses nothing.
        eprintln!("{source}: {}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    let mut out = format!(
        "\n{} workloads, {} policies, {} node streams, {} edits\n\n| source | initial sync | policy edit → a stream p50 / p99 | → all streams p50 / p99 | new pod → all streams p50 / p99 | bytes per update (edit / pod) | controller RSS (peak) | CPU per edit / pod |\n|---|---|---|---|---|---|---|---|\n",
        scale.workloads, scale.policies, scale.nodes, scale.edits
    );
    for r in &reports {
        writeln!(
            out,
            "| {} | {:.1} s | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} B | {:.0} MiB ({:.0}) | {:.0} / {:.0} ms |",
            r.source,
            r.initial_sync_s,
            r.edit_per_stream_p50_ms,
            r.edit_per_stream_p99_ms,
            r.edit_all_streams_p50_ms,
            r.edit_all_streams_p99_ms,
            r.pod_all_streams_p50_ms,
            r.pod_all_streams_p99_ms,
            r.edit_update_bytes,
            r.pod_update_bytes,
            r.rss_mib,
            r.peak_rss_mib,
            r.cpu_ms_per_edit,
            r.cpu_ms_per_pod,
        )?;
    }
    println!("{out}");
    println!("{}", serde_json::to_string(&reports)?);
    Ok(())
}
