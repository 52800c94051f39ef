//! EgressPolicy's cost on new connections (not a test: nothing here asserts). One node, two
//! mesh pods connecting to the same server of the simulated world (paste.example:80, which
//! the pods resolved through the capture): `free`, which no EgressPolicy selects (its
//! connections pass through), and `trainer`, which an ALLOW policy selects and whose every
//! connection is decided (peek, pins, evaluator) and allowed. Each round measures both modes,
//! in an order reversed every other round: `MEMBRANE_BENCH_EGRESS_CLIENTS` (4) clients, each
//! connecting, sending a line, reading the greeting and closing, as fast as it can, for
//! `MEMBRANE_BENCH_EGRESS_SECS` (2); the ztunnel's CPU (utime + stime) over the run. Every
//! connection leaves two sockets in TIME_WAIT in the pod's namespace (the application's and
//! the ztunnel's) for 60 s; the pods reuse them (`tcp_tw_reuse`), else after some 14,000
//! connections the kernel's search for a free port, not the mesh, dominates both modes.
//!
//! The report gives medians over rounds: connections/s and ztunnel CPU per connection per
//! mode, and allowed/passthrough ratios (target: CPU per connection ≤ 1.15× passthrough), as
//! a Markdown table and one JSON line.
//!
//! Run as root after `cargo build --release -p membrane-ztunnel`:
//! `cargo bench -p membrane-tests --bench egress`. Environment: `MEMBRANE_BENCH_ROUNDS` (3),
//! the two above, and the harness's `MEMBRANE_ZTUNNEL_BIN`.

#![allow(clippy::print_stdout)] // the report is the program's output

#[path = "dataplane/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::time::Instant;

use anyhow::Context;
use hickory_proto::rr::RecordType;
use membrane_tests::dns::resolve;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::world::{RESOLVER, World};

const SERVER: &str = "198.51.100.20:80";
const POLICY: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: paste, namespace: training}
spec:
  rules:
  - to: [{hosts: [paste.example], ports: [80]}]
";

fn main() -> anyhow::Result<()> {
    if !membrane_tests::is_root() {
        eprintln!("skipped: the egress benchmark needs root (network namespaces)");
        return Ok(());
    }
    let rounds = measure::env_u64("MEMBRANE_BENCH_ROUNDS", 3)?;
    let clients = measure::env_u64("MEMBRANE_BENCH_EGRESS_CLIENTS", 4)?;
    let secs = measure::env_u64("MEMBRANE_BENCH_EGRESS_SECS", 2)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let spec = MeshSpec {
        nodes: vec!["node-a".into()],
        pods: vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("free", "data", "default", "node-a"),
        ],
        mesh_namespaces: vec!["training".into(), "data".into()],
        ztunnel_args: vec!["--dns-upstream".into(), RESOLVER.to_string()],
        extra_manifests: vec![("egress.yaml".into(), POLICY.into())],
        ..MeshSpec::default()
    };
    let mut mesh = rt.block_on(Mesh::start(spec))?;
    let world = World::start(&mut mesh.testbed)?;
    for pod in ["trainer", "free"] {
        // Connections to the same server reuse ports in TIME_WAIT (safe with timestamps), so
        // the kernel's port search stays out of the figures.
        let ns = mesh.netns_path(pod);
        let name = ns
            .file_name()
            .and_then(|n| n.to_str())
            .context("netns name")?;
        let out =
            membrane_tests::netns::exec_in(name, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        anyhow::ensure!(
            out.status.success(),
            "sysctl in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rt.block_on(mesh.enroll(pod))?;
        resolve(
            &mesh.netns_path(pod),
            world.resolver(),
            "paste.example",
            RecordType::A,
        )?;
    }
    let pid = mesh.ztunnels["node-a"].pid();
    let ticks = measure::clock_ticks_per_second();
    let load = measure::load_average();
    let (mut rate, mut cpu): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    for round in 1..=rounds {
        let mut order = [(0, "free"), (1, "trainer")];
        if round % 2 == 0 {
            order.reverse();
        }
        for (mode, pod) in order {
            let before = measure::cpu_ticks(pid)?;
            let started = Instant::now();
            let made = measure::connections(mesh.netns_path(pod), SERVER.parse()?, clients, secs)?;
            let elapsed = started.elapsed().as_secs_f64();
            let used = (measure::cpu_ticks(pid)? - before) as f64 / ticks;
            let per_conn_us = used / made as f64 * 1e6;
            rate[mode].push(made as f64 / elapsed);
            cpu[mode].push(per_conn_us);
            eprintln!(
                "round {round} {pod}: {:.0} connections/s, ztunnel {per_conn_us:.1} µs CPU per connection",
                made as f64 / elapsed
            );
        }
    }
    let med = |v: &[f64]| measure::median(v).unwrap_or(f64::NAN);
    let (pr, ar) = (med(&rate[0]), med(&rate[1]));
    let (pc, ac) = (med(&cpu[0]), med(&cpu[1]));
    println!(
        "| new connections, {rounds} rounds, {clients} clients, load {load} | passthrough | allowed by EgressPolicy | allowed/passthrough |"
    );
    println!("|---|---|---|---|");
    println!("| connections/s | {pr:.0} | {ar:.0} | {:.2} |", ar / pr);
    println!(
        "| ztunnel CPU per connection | {pc:.1} µs | {ac:.1} µs | {:.2} ({}: ≤ 1.15) |",
        ac / pc,
        if ac / pc <= 1.15 { "PASS" } else { "FAIL" }
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "egress", "rounds": rounds, "clients": clients, "load_before": load,
            "passthrough": {"conn_per_s": pr, "cpu_us_per_conn": pc},
            "allowed": {"conn_per_s": ar, "cpu_us_per_conn": ac},
            "rate_ratio": ar / pr, "cpu_ratio": ac / pc,
        })
    );
    drop(world);
    Ok(())
}
