//! The gateways' cost against the direct path, in one run (not a test: nothing here asserts).
//!
//! Two nodes, the simulated world, and a node per gateway. For each gateway, two modes are
//! measured with the same clients and servers, in an order reversed every other round:
//!
//! - **egress**: from a mesh pod to the world's servers (`s3.example`'s upload sink for
//!   throughput, `paste.example:80`'s greeter for new connections). `direct`: a pod no
//!   EgressPolicy selects (its connections leave from its node); `gateway`: a pod whose ALLOW
//!   rule says `via` the egress gateway (tunnelled to it, decided again, left from there).
//! - **ingress**: from the simulated internet to a sink and a greeter in a pod. `direct`: a pod
//!   outside the mesh, reached by its address (the no-mesh baseline); `gateway`: a mesh pod
//!   reached through the ingress gateway's TCP listeners (HBONE from the gateway to the pod).
//!
//! Per mode: one stream's throughput for `MEMBRANE_BENCH_GATEWAY_SECS` (3) seconds, and new
//! connections per second from `MEMBRANE_BENCH_GATEWAY_CLIENTS` (4) clients (connect, send a
//! line, read the greeting, close) for as long; and the CPU (utime + stime) of the gateway's
//! process over the connection runs. The report gives medians over rounds as gateway/direct
//! ratios, a Markdown table and one JSON line. Every namespace that dials (clients, pods,
//! gateways) reuses TIME_WAIT ports (`tcp_tw_reuse`): without it, after some thousands of
//! connections to one destination the kernel's search for a free port, not the mesh,
//! dominates (it was 25 % of the egress gateway's CPU in a profile).
//!
//! Run as root after `cargo build --release -p membrane-ztunnel`:
//! `cargo bench -p membrane-tests --bench gateway`. Environment: `MEMBRANE_BENCH_ROUNDS` (3),
//! the two above, and the harness's `MEMBRANE_ZTUNNEL_BIN`.

#![allow(clippy::print_stdout)] // the report is the program's output

#[path = "dataplane/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use membrane_tests::dns::resolve;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::NETNS_RUN_DIR;
use membrane_tests::world::{RESOLVER, SINK_PORT, World};

const GREETER: &str = "198.51.100.20:80";
const SINK_IP: [u8; 4] = [198, 51, 100, 30];
/// Ports of the in-pod servers (and of the ingress gateway's listeners).
const POD_SINK: u16 = 9000;
const POD_GREETER: u16 = 8080;

const MANIFESTS: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: via-gateway, namespace: training}
spec:
  rules:
  - to: [{hosts: [paste.example], ports: [80]}, {hosts: [s3.example], ports: [9000]}]
    via: {gateway: egress, namespace: gateways}
---
apiVersion: v1
kind: Service
metadata: {name: model, namespace: inference}
spec:
  clusterIP: 10.96.0.30
  selector: {app: model}
  ports: [{name: sink, port: 9000, targetPort: 9000}, {name: greet, port: 8080, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: inference}
spec:
  gatewayClassName: membrane
  listeners:
  - {name: sink, port: 9000, protocol: TCP}
  - {name: greet, port: 8080, protocol: TCP}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: sink, namespace: inference}
spec:
  parentRefs: [{name: ingress, sectionName: sink}]
  rules: [{backendRefs: [{name: model, port: 9000}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: greet, namespace: inference}
spec:
  parentRefs: [{name: ingress, sectionName: greet}]
  rules: [{backendRefs: [{name: model, port: 8080}]}]
";

/// One mode: where its clients run, and where they connect.
struct Mode {
    client: PathBuf,
    sink: SocketAddr,
    greeter: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    if !membrane_tests::is_root() {
        eprintln!("skipped: the gateway benchmark needs root (network namespaces)");
        return Ok(());
    }
    let rounds = measure::env_u64("MEMBRANE_BENCH_ROUNDS", 3)?;
    let clients = measure::env_u64("MEMBRANE_BENCH_GATEWAY_CLIENTS", 4)?;
    let secs = measure::env_u64("MEMBRANE_BENCH_GATEWAY_SECS", 3)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut model = PodDef::new("model", "inference", "model", "node-b");
    model.labels.insert("app".into(), "model".into());
    let spec = MeshSpec {
        nodes: vec![
            "node-a".into(),
            "node-b".into(),
            "gw-egress".into(),
            "gw-ingress".into(),
        ],
        pods: vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("free", "data", "default", "node-a"),
            model,
            PodDef::new("plain", "legacy", "default", "node-b"),
            PodDef::gateway(
                "egress-gw",
                "gateways",
                "egress",
                "gw-egress",
                "egress",
                "egress",
            ),
            PodDef::gateway(
                "ingress-gw",
                "inference",
                "ingress",
                "gw-ingress",
                "ingress",
                "ingress",
            ),
        ],
        mesh_namespaces: vec!["training".into(), "data".into(), "inference".into()],
        ztunnel_args: vec!["--dns-upstream".into(), RESOLVER.to_string()],
        extra_manifests: vec![("bench.yaml".into(), MANIFESTS.into())],
        ..MeshSpec::default()
    };
    let mut mesh = rt.block_on(Mesh::start(spec))?;
    let world = World::start(&mut mesh.testbed)?;
    let internet = Path::new(NETNS_RUN_DIR).join(world.netns_name());
    measure::tw_reuse(&internet)?;
    for pod in ["trainer", "free", "model"] {
        measure::tw_reuse(&mesh.netns_path(pod))?;
        rt.block_on(mesh.enroll(pod))?;
    }
    // The gateways dial too (the egress gateway a new connection out per tunnel).
    for pod in ["egress-gw", "ingress-gw", "plain"] {
        measure::tw_reuse(&mesh.netns_path(pod))?;
    }
    for pod in ["trainer", "free"] {
        for name in ["paste.example", "s3.example"] {
            resolve(&mesh.netns_path(pod), world.resolver(), name, RecordType::A)?;
        }
    }
    measure::pod_servers(mesh.netns_path("model"), POD_SINK, POD_GREETER)?;
    measure::pod_servers(mesh.netns_path("plain"), POD_SINK, POD_GREETER)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in ["gw-egress", "gw-ingress"] {
        while !matches!(
            rt.block_on(membrane_tests::http_get(
                mesh.ztunnels[node].readiness,
                "/healthz/ready"
            )),
            Ok((200, _))
        ) {
            anyhow::ensure!(Instant::now() < deadline, "{node} never turned ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let sink = SocketAddr::from((SINK_IP, SINK_PORT));
    let greeter: SocketAddr = GREETER.parse()?;
    let ingress = mesh.ip("ingress-gw");
    let plain = mesh.ip("plain");
    let kinds = [
        (
            "egress",
            "gw-egress",
            [
                Mode {
                    client: mesh.netns_path("free"),
                    sink,
                    greeter,
                },
                Mode {
                    client: mesh.netns_path("trainer"),
                    sink,
                    greeter,
                },
            ],
        ),
        (
            "ingress",
            "gw-ingress",
            [
                Mode {
                    client: internet.clone(),
                    sink: SocketAddr::new(plain, POD_SINK),
                    greeter: SocketAddr::new(plain, POD_GREETER),
                },
                Mode {
                    client: internet.clone(),
                    sink: SocketAddr::new(ingress, POD_SINK),
                    greeter: SocketAddr::new(ingress, POD_GREETER),
                },
            ],
        ),
    ];
    let ticks = measure::clock_ticks_per_second();
    let load = measure::load_average();
    let mut report = serde_json::Map::new();
    println!(
        "| {rounds} rounds, {secs} s each, load {load} | direct | through the gateway | gateway/direct |"
    );
    println!("|---|---|---|---|");
    for (kind, node, modes) in &kinds {
        let pid = mesh.ztunnels[*node].pid();
        let (mut gbps, mut rate, mut cpu): ([Vec<f64>; 2], [Vec<f64>; 2], Vec<f64>) =
            Default::default();
        for round in 1..=rounds {
            let mut order = [0, 1];
            if round % 2 == 0 {
                order.reverse();
            }
            for m in order {
                let mode = &modes[m];
                let bytes = measure::throughput(mode.client.clone(), mode.sink, secs)?;
                let before = measure::cpu_ticks(pid)?;
                let started = Instant::now();
                let made = measure::connections(mode.client.clone(), mode.greeter, clients, secs)?;
                let per_s = made as f64 / started.elapsed().as_secs_f64();
                if m == 1 {
                    let used = (measure::cpu_ticks(pid)? - before) as f64 / ticks;
                    cpu.push(used / made as f64 * 1e6);
                }
                gbps[m].push(bytes * 8.0 / 1e9);
                rate[m].push(per_s);
                eprintln!(
                    "round {round} {kind} {}: {:.2} Gbit/s one stream, {per_s:.0} connections/s",
                    if m == 0 { "direct" } else { "gateway" },
                    bytes * 8.0 / 1e9
                );
            }
        }
        let med = |v: &[f64]| measure::median(v).unwrap_or(f64::NAN);
        let (dg, gg) = (med(&gbps[0]), med(&gbps[1]));
        let (dr, gr) = (med(&rate[0]), med(&rate[1]));
        let gc = med(&cpu);
        println!(
            "| {kind}: one stream, Gbit/s | {dg:.2} | {gg:.2} | {:.2} |",
            gg / dg
        );
        println!(
            "| {kind}: new connections/s ({clients} clients) | {dr:.0} | {gr:.0} | {:.2} |",
            gr / dr
        );
        println!("| {kind}: gateway CPU per connection | — | {gc:.0} µs | — |");
        report.insert(
            (*kind).to_owned(),
            serde_json::json!({
                "direct": {"gbit_per_s": dg, "conn_per_s": dr},
                "gateway": {"gbit_per_s": gg, "conn_per_s": gr, "cpu_us_per_conn": gc},
                "throughput_ratio": gg / dg, "rate_ratio": gr / dr,
            }),
        );
    }
    report.insert("bench".into(), "gateway".into());
    report.insert("rounds".into(), rounds.into());
    report.insert("load_before".into(), load.into());
    println!("{}", serde_json::Value::Object(report));
    drop(world);
    Ok(())
}
