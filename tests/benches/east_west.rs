//! What crossing clusters through an east-west gateway costs against the direct path, in one
//! run (not a test: nothing here asserts).
//!
//! Two federated clusters (`membrane_tests::clusters`): A's trainer on node-a, B's model
//! server on node-b, B's east-west gateway on node-c, pod networks routed flat so both paths
//! work. The modes alternate within each round (order reversed every other round) by editing
//! A's `TrustFederation` for B — which the controller applies in place — and waiting until
//! node-a's ztunnel holds it:
//!
//! - **direct**: no `eastWestGateway`: the trainer's ztunnel tunnels straight to node-b.
//! - **gateway**: double HBONE, an outer tunnel to node-c's gateway and the end-to-end one
//!   inside it.
//!
//! Per mode: one stream's throughput to a sink in the model server's pod for
//! `MEMBRANE_BENCH_GATEWAY_SECS` (3) seconds, and new connections per second from
//! `MEMBRANE_BENCH_GATEWAY_CLIENTS` (4) clients (connect, send a line, read the greeting,
//! close) for as long, to the pod's address (an imported workload), and the CPU of node-a's
//! ztunnel and of the gateway's process per connection. Medians over rounds, a Markdown
//! table and one JSON line.
//!
//! Run as root after `cargo build --release -p membrane-ztunnel`:
//! `cargo bench -p membrane-tests --bench east_west`. Environment: `MEMBRANE_BENCH_ROUNDS`
//! (3), the two above, and the harness's `MEMBRANE_ZTUNNEL_BIN`.

#![allow(clippy::print_stdout)] // the report is the program's output

#[path = "dataplane/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use membrane_tests::clusters::{Options, two_clusters};

/// Ports of the in-pod servers in the model server's pod.
const POD_SINK: u16 = 9000;
const POD_GREETER: u16 = 9001;

fn main() -> anyhow::Result<()> {
    if !membrane_tests::is_root() {
        eprintln!("skipped: the east-west benchmark needs root (network namespaces)");
        return Ok(());
    }
    let rounds = measure::env_u64("MEMBRANE_BENCH_ROUNDS", 3)?;
    let clients = measure::env_u64("MEMBRANE_BENCH_GATEWAY_CLIENTS", 4)?;
    let secs = measure::env_u64("MEMBRANE_BENCH_GATEWAY_SECS", 3)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clusters = rt.block_on(two_clusters(Options {
        east_west: true,
        keep_routes: true,
        ..Options::default()
    }))?;
    let mesh = &clusters.mesh;
    for pod in ["trainer", "model-server", "ew-gateway"] {
        measure::tw_reuse(&mesh.netns_path(pod))?;
    }
    measure::pod_servers(mesh.netns_path("model-server"), POD_SINK, POD_GREETER)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        rt.block_on(membrane_tests::http_get(
            mesh.ztunnels["node-c"].readiness,
            "/healthz/ready"
        )),
        Ok((200, _))
    ) {
        anyhow::ensure!(Instant::now() < deadline, "the gateway never turned ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = mesh.ip("model-server");
    let (sink, greeter) = (
        SocketAddr::new(server, POD_SINK),
        SocketAddr::new(server, POD_GREETER),
    );
    let client = mesh.netns_path("trainer");
    let (source_pid, gateway_pid) = (mesh.ztunnels["node-a"].pid(), mesh.ztunnels["node-c"].pid());
    let ticks = measure::clock_ticks_per_second();
    let load = measure::load_average();
    type PerMode = [Vec<f64>; 2];
    let (mut gbps, mut rate, mut source_cpu): (PerMode, PerMode, PerMode) = Default::default();
    let mut gateway_cpu = Vec::new();
    for round in 1..=rounds {
        let mut order = [0, 1];
        if round % 2 == 0 {
            order.reverse();
        }
        for m in order {
            rt.block_on(clusters.use_gateway(m == 1))?;
            let bytes = measure::throughput(client.clone(), sink, secs)?;
            let (src0, gw0) = (
                measure::cpu_ticks(source_pid)?,
                measure::cpu_ticks(gateway_pid)?,
            );
            let started = Instant::now();
            let made = measure::connections(client.clone(), greeter, clients, secs)?;
            let per_s = made as f64 / started.elapsed().as_secs_f64();
            let per_conn = |pid: u32, before: u64| -> anyhow::Result<f64> {
                let used = (measure::cpu_ticks(pid)? - before) as f64 / ticks;
                Ok(used / made.max(1) as f64 * 1e6)
            };
            source_cpu[m].push(per_conn(source_pid, src0)?);
            if m == 1 {
                gateway_cpu.push(per_conn(gateway_pid, gw0)?);
            }
            gbps[m].push(bytes * 8.0 / 1e9);
            rate[m].push(per_s);
            eprintln!(
                "round {round} {}: {:.2} Gbit/s one stream, {per_s:.0} connections/s",
                if m == 0 { "direct" } else { "gateway" },
                bytes * 8.0 / 1e9
            );
        }
    }
    let med = |v: &[f64]| measure::median(v).unwrap_or(f64::NAN);
    let (dg, gg) = (med(&gbps[0]), med(&gbps[1]));
    let (dr, gr) = (med(&rate[0]), med(&rate[1]));
    let (ds, gs) = (med(&source_cpu[0]), med(&source_cpu[1]));
    let gc = med(&gateway_cpu);
    println!(
        "| {rounds} rounds, {secs} s each, load {load} | direct | through the gateway | gateway/direct |"
    );
    println!("|---|---|---|---|");
    println!(
        "| one stream, Gbit/s | {dg:.2} | {gg:.2} | {:.2} |",
        gg / dg
    );
    println!(
        "| new connections/s ({clients} clients) | {dr:.0} | {gr:.0} | {:.2} |",
        gr / dr
    );
    println!(
        "| source ztunnel CPU per connection | {ds:.0} µs | {gs:.0} µs | {:.2} |",
        gs / ds
    );
    println!("| gateway CPU per connection | — | {gc:.0} µs | — |");
    println!(
        "{}",
        serde_json::json!({
            "bench": "east_west",
            "rounds": rounds,
            "load_before": load,
            "direct": {"gbit_per_s": dg, "conn_per_s": dr, "source_cpu_us_per_conn": ds},
            "gateway": {
                "gbit_per_s": gg, "conn_per_s": gr, "source_cpu_us_per_conn": gs,
                "gateway_cpu_us_per_conn": gc,
            },
            "throughput_ratio": gg / dg, "rate_ratio": gr / dr,
        })
    );
    drop(clusters);
    Ok(())
}
