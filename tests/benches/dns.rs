//! The DNS capture's on-demand benchmark (not a test: nothing here asserts). One node, two
//! pods: `mesh-client` in a mesh namespace (its queries are captured and answered through its
//! ztunnel) and `plain-client` outside the mesh (its queries go straight to the resolver),
//! both asking the same upstream: the simulated world's authoritative server. Every round
//! measures both modes, in an order reversed every other round:
//!
//! - latency: sequential UDP queries (rotating over the world's names), p50 and p99;
//! - throughput: `MEMBRANE_BENCH_DNS_CLIENTS` clients (8), each with its own socket sending
//!   its next query as soon as the last is answered, for `MEMBRANE_BENCH_DNS_SECS` (5).
//!
//! The report gives medians over rounds: queries/s per mode and the ratio, and the latency
//! the capture adds (mesh − direct) at p50 and p99 (target: p99 added < 200 µs), as a Markdown
//! table and one JSON line. The capture's answers pin every address; the pins stay within the
//! ztunnel's default bound.
//!
//! Run as root after `cargo build --release -p membrane-ztunnel`:
//! `cargo bench -p membrane-tests --bench dns`. Environment: `MEMBRANE_BENCH_ROUNDS` (3),
//! `MEMBRANE_BENCH_DNS_QUERIES` (3000 per latency run), the two above, and the harness's
//! `MEMBRANE_ZTUNNEL_BIN`.

#![allow(clippy::print_stdout)] // the report is the program's output

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use membrane_tests::dns::query;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::world::{RESOLVER, World};

const NAMES: [&str; 4] = ["huggingface.co", "cdn.hf.co", "paste.example", "s3.example"];

fn env(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

/// The encoded queries, one per name, with distinct ids.
fn queries() -> anyhow::Result<Vec<Vec<u8>>> {
    NAMES
        .iter()
        .map(|n| query(n, hickory_proto::rr::RecordType::A, true))
        .collect()
}

/// Sequential queries from inside `netns`; each latency in nanoseconds, sorted.
fn latencies(netns: PathBuf, server: SocketAddr, n: u64) -> anyhow::Result<Vec<u64>> {
    let queries = queries()?;
    membrane_tests::netns::run_in_netns(netns, move || -> anyhow::Result<Vec<u64>> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.connect(server)?;
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        for i in 0..n {
            let q = &queries[usize::try_from(i)? % queries.len()];
            let start = Instant::now();
            socket.send(q)?;
            socket.recv(&mut buf).context("no answer")?;
            out.push(u64::try_from(start.elapsed().as_nanos())?);
        }
        out.sort_unstable();
        Ok(out)
    })?
}

/// `clients` sockets in `netns`, each querying back to back for `secs`; answers per second.
fn throughput(netns: PathBuf, server: SocketAddr, clients: u64, secs: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let netns = netns.clone();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let queries = queries()?;
                membrane_tests::netns::run_in_netns(netns, move || -> anyhow::Result<u64> {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                    socket.connect(server)?;
                    let deadline = Instant::now() + Duration::from_secs(secs);
                    let mut buf = [0u8; 4096];
                    let mut answered = 0u64;
                    while Instant::now() < deadline {
                        socket.send(&queries[usize::try_from(answered)? % queries.len()])?;
                        if socket.recv(&mut buf).is_ok() {
                            answered += 1;
                        }
                    }
                    Ok(answered)
                })?
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn quantile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Default)]
struct Mode {
    p50: Vec<f64>,
    p99: Vec<f64>,
    qps: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    if !membrane_tests::is_root() {
        eprintln!("skipped: the DNS benchmark needs root (network namespaces)");
        return Ok(());
    }
    let rounds = env("MEMBRANE_BENCH_ROUNDS", 3)?;
    let n = env("MEMBRANE_BENCH_DNS_QUERIES", 3000)?;
    let clients = env("MEMBRANE_BENCH_DNS_CLIENTS", 8)?;
    let secs = env("MEMBRANE_BENCH_DNS_SECS", 5)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let spec = MeshSpec {
        nodes: vec!["node-a".into()],
        pods: vec![
            PodDef::new("mesh-client", "training", "trainer", "node-a"),
            PodDef::new("plain-client", "plain", "default", "node-a"),
        ],
        mesh_namespaces: vec!["training".into()],
        ztunnel_args: vec!["--dns-upstream".into(), RESOLVER.to_string()],
        ..MeshSpec::default()
    };
    let mut mesh = rt.block_on(Mesh::start(spec))?;
    let world = World::start(&mut mesh.testbed)?;
    rt.block_on(mesh.enroll("mesh-client"))?;
    let server = world.resolver();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (mut direct, mut meshed) = (Mode::default(), Mode::default());
    for round in 1..=rounds {
        let mut order = [("direct", "plain-client"), ("mesh", "mesh-client")];
        if round % 2 == 0 {
            order.reverse();
        }
        for (mode, pod) in order {
            let netns = mesh.netns_path(pod);
            let lat = latencies(netns.clone(), server, n)?;
            let qps = throughput(netns, server, clients, secs)?;
            let out = if mode == "mesh" {
                &mut meshed
            } else {
                &mut direct
            };
            out.p50.push(quantile_us(&lat, 0.5));
            out.p99.push(quantile_us(&lat, 0.99));
            out.qps.push(qps);
            eprintln!(
                "round {round} {mode}: p50 {:.0} µs p99 {:.0} µs, {qps:.0} queries/s",
                quantile_us(&lat, 0.5),
                quantile_us(&lat, 0.99)
            );
        }
    }
    let (d50, d99, dq) = (median(direct.p50), median(direct.p99), median(direct.qps));
    let (m50, m99, mq) = (median(meshed.p50), median(meshed.p99), median(meshed.qps));
    println!(
        "| DNS, UDP, {rounds} rounds, {clients} clients | direct | through the capture | mesh/direct |"
    );
    println!("|---|---|---|---|");
    println!("| queries/s | {dq:.0} | {mq:.0} | {:.2} |", mq / dq);
    println!(
        "| latency p50 | {d50:.0} µs | {m50:.0} µs | +{:.0} µs |",
        m50 - d50
    );
    println!(
        "| latency p99 | {d99:.0} µs | {m99:.0} µs | +{:.0} µs ({}: < 200 µs) |",
        m99 - d99,
        if m99 - d99 < 200.0 { "PASS" } else { "FAIL" }
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "dns", "rounds": rounds, "clients": clients, "load_before": load.trim(),
            "direct": {"p50_us": d50, "p99_us": d99, "qps": dq},
            "mesh": {"p50_us": m50, "p99_us": m99, "qps": mq},
            "added_p50_us": m50 - d50, "added_p99_us": m99 - d99, "qps_ratio": mq / dq,
        })
    );
    drop(world);
    Ok(())
}
