//! The data plane's on-demand benchmark (not a test: nothing here asserts): one topology, two
//! nodes, a client pod on the first and a server pod on the second, both in a mesh namespace,
//! each with the real ztunnel of its node. Every round measures the same workloads "direct"
//! (pods not enrolled: no capture), "mesh" (both pods enrolled: captured, carried over HBONE
//! mutual TLS) and "relay" (not enrolled; two plain TCP relays, no TLS and no HTTP/2, placed
//! where the ztunnels sit — the ceiling of the topology itself, see `dataplane/relay.rs`) and,
//! when `ISTIO_ZTUNNEL_BIN` names an Istio ztunnel binary, "istio" (not enrolled; one Istio
//! ztunnel per node in in-pod mode, see `testbed::istio`), in an order reversed every
//! other round. The report gives medians over rounds, mesh/direct, mesh/relay and mesh/istio
//! ratios and each target's PASS/FAIL as a Markdown table, then one JSON line.
//!
//! Workloads: TCP throughput with one and four streams (`iperf3 --json`, both ends started
//! with `ip netns exec` in the pods); 1-byte request/response over one connection (rate, p50,
//! p99); connect + 1-byte request/response + close with a fixed number in flight (rate, p50,
//! p99). Around them: both ztunnels' CPU time (`utime + stime`) per GB carried, per
//! request/response and per new connection, and their resident memory idle (fresh, before the
//! first mesh traffic, and again at the start of later mesh phases) and at the peak of the
//! four-stream run.
//!
//! Run as root after `cargo build --release -p membrane-ztunnel` (iperf3 installed):
//! `cargo bench -p membrane-tests --bench dataplane`, or `scripts/bench-dataplane.sh`.
//! Environment: `MEMBRANE_BENCH_ROUNDS` (3), `MEMBRANE_BENCH_BULK_SECS` (10),
//! `MEMBRANE_BENCH_RR_SECS` (5), `MEMBRANE_BENCH_CONN_SECS` (5), `MEMBRANE_BENCH_INFLIGHT` (8),
//! `MEMBRANE_BENCH_MODES` (`direct,mesh,relay`, plus `istio` when `ISTIO_ZTUNNEL_BIN` is set),
//! `MEMBRANE_BENCH_TESTS` (`tcp1,tcp4,rr,conn`), `ISTIO_ZTUNNEL_WORKER_THREADS` (the Istio
//! ztunnel's own default unless set), `MEMBRANE_ZTUNNEL_BUSY_POLL` (the mesh ztunnels'
//! `--busy-poll`, e.g. `off` or `100us`; their default, `auto`, unless set; the report says
//! which), and the
//! harness's `MEMBRANE_ZTUNNEL_BIN`. Progress, with
//! both ztunnel pids (to attach a profiler) and each proxy's share of a core during every bulk
//! run (which one bounds it), goes to stderr; the report to stdout.
//!
//! The client pod gets `tcp_tw_reuse=1` and a wide ephemeral port range (both pods, so the
//! ztunnel's connections to the application have the same room): a few seconds of
//! connection churn would otherwise run out of ports in TIME_WAIT, in both modes alike.

#![allow(clippy::print_stdout)] // the report is the program's output

#[path = "dataplane/measure.rs"]
mod measure;
#[path = "dataplane/relay.rs"]
mod relay;
#[path = "dataplane/report.rs"]
mod report;
#[path = "dataplane/workloads.rs"]
mod workloads;

use measure::{
    Samples, clock_ticks_per_second, cpu_ticks, largest_rss_mib, load_average, nanos, quantile_us,
};

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use membrane_tests::istio;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef};
use membrane_tests::netns::{command_in, run_in_netns, wait_listening};
use membrane_tests::reap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: &str = "client";
const SERVER: &str = "server";
/// The istio mode's pods: same nodes, a namespace outside Membrane's mesh, so no state of
/// Membrane's rounds (sockets in TIME_WAIT on 15008, rules) is in their way.
const ISTIO_CLIENT: &str = "istio-client";
const ISTIO_SERVER: &str = "istio-server";
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7001;
const CONN_PORT: u16 = 7002;
/// Bounds on the measurement loops, whatever their duration.
const MAX_RR_SAMPLES: usize = 5_000_000;
const MAX_CONNS_PER_WORKER: usize = 500_000;
const MAX_CONN_ERRORS: usize = 1_000;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// === configuration ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Mesh,
    /// Two plain TCP relays where the ztunnels sit (the topology's ceiling; see `relay`).
    Relay,
    /// Two Istio ztunnels where Membrane's sit (`ISTIO_ZTUNNEL_BIN`; see `istio`).
    Istio,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
            Mode::Relay => "relay",
            Mode::Istio => "istio",
        }
    }
}

struct Config {
    /// An Istio ztunnel for the `istio` mode.
    istio_bin: Option<PathBuf>,
    rounds: usize,
    bulk: Duration,
    rr: Duration,
    conn: Duration,
    inflight: usize,
    modes: Vec<Mode>,
    tests: Vec<String>,
    /// The mesh ztunnels' `--busy-poll`, as the environment passes it to them (`auto` unset).
    busy_poll: String,
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let istio_bin = std::env::var_os("ISTIO_ZTUNNEL_BIN").map(PathBuf::from);
        let default_modes = if istio_bin.is_some() {
            "direct,mesh,relay,istio"
        } else {
            "direct,mesh,relay"
        };
        let mut modes = Vec::new();
        for m in env_list("MEMBRANE_BENCH_MODES", default_modes) {
            modes.push(match m.as_str() {
                "direct" => Mode::Direct,
                "mesh" => Mode::Mesh,
                "relay" => Mode::Relay,
                "istio" if istio_bin.is_some() => Mode::Istio,
                "istio" => bail!(
                    "MEMBRANE_BENCH_MODES: istio needs ISTIO_ZTUNNEL_BIN (an Istio ztunnel built with its testing feature)"
                ),
                other => bail!("MEMBRANE_BENCH_MODES: unknown mode {other}"),
            });
        }
        if let Some(bin) = &istio_bin
            && !bin.is_file()
        {
            bail!("ISTIO_ZTUNNEL_BIN={}: no such file", bin.display());
        }
        let tests = env_list("MEMBRANE_BENCH_TESTS", "tcp1,tcp4,rr,conn");
        if let Some(t) = tests
            .iter()
            .find(|t| !["tcp1", "tcp4", "rr", "conn"].contains(&t.as_str()))
        {
            bail!("MEMBRANE_BENCH_TESTS: unknown test {t}");
        }
        Ok(Self {
            istio_bin,
            rounds: usize::try_from(measure::env_u64("MEMBRANE_BENCH_ROUNDS", 3)?.max(1))?,
            bulk: Duration::from_secs(measure::env_u64("MEMBRANE_BENCH_BULK_SECS", 10)?.max(1)),
            rr: Duration::from_secs(measure::env_u64("MEMBRANE_BENCH_RR_SECS", 5)?.max(1)),
            conn: Duration::from_secs(measure::env_u64("MEMBRANE_BENCH_CONN_SECS", 5)?.max(1)),
            inflight: usize::try_from(
                measure::env_u64("MEMBRANE_BENCH_INFLIGHT", 8)?.clamp(1, 64),
            )?,
            modes,
            tests,
            busy_poll: std::env::var("MEMBRANE_ZTUNNEL_BUSY_POLL")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| "auto".into()),
        })
    }

    fn runs(&self, test: &str) -> bool {
        self.tests.iter().any(|t| t == test)
    }
}

// === the workloads ===

struct Bench<'a> {
    mesh: &'a Mesh,
    rt: &'a tokio::runtime::Runtime,
    cfg: &'a Config,
    /// The pods the workloads run between (the istio mode's own pair during its rounds).
    client: &'static str,
    server: &'static str,
    client_ns: String,
    server_ns: String,
    server_ip: Ipv4Addr,
    /// The proxies whose CPU time is measured: the ztunnels, or the relays in relay mode.
    pids: Vec<u32>,
    ticks: f64,
    errors: Vec<String>,
    /// A mesh phase ran already (the ztunnels are no longer fresh).
    carried_traffic: bool,
}

struct Iperf {
    bits_per_second: f64,
    bytes: f64,
}

impl Bench<'_> {
    fn path(&self, pod: &str) -> PathBuf {
        self.mesh.netns_path(pod)
    }

    /// Both ztunnels' CPU time so far, in seconds.
    fn ztunnel_cpu(&self) -> anyhow::Result<f64> {
        Ok(self.proxy_cpu()?.iter().sum())
    }

    /// Each proxy's CPU time so far, in seconds (in the order of `pids`).
    fn proxy_cpu(&self) -> anyhow::Result<Vec<f64>> {
        self.pids
            .iter()
            .map(|&pid| Ok(cpu_ticks(pid)? as f64 / self.ticks))
            .collect()
    }

    /// The larger ztunnel's resident memory, in MiB.
    fn ztunnel_rss_mib(&self) -> anyhow::Result<f64> {
        largest_rss_mib(&self.pids)
    }

    fn clear_access_records(&self) -> usize {
        let mut n = 0;
        for z in self.mesh.ztunnels.values() {
            if let Ok(mut records) = z.access.lock() {
                n += records.len();
                records.clear();
            }
        }
        n
    }

    fn note(&mut self, what: String) {
        eprintln!("  ERROR {what}");
        self.errors.push(what);
    }

    /// One mode of one round: every selected workload, pushing its figures into `out`.
    fn run_mode(&mut self, mode: Mode, round: usize, out: &mut Samples) -> anyhow::Result<()> {
        match mode {
            Mode::Direct | Mode::Mesh => self.run_workloads(mode, round, out),
            Mode::Relay => {
                let relays = relay::Relays::start(
                    &self.client_ns,
                    &self.server_ns,
                    self.server_ip,
                    &[IPERF_PORT, RR_PORT, CONN_PORT],
                )?;
                let ztunnels = std::mem::replace(&mut self.pids, relays.pids());
                let result = self.run_workloads(mode, round, out);
                self.pids = ztunnels;
                drop(relays);
                result
            }
            Mode::Istio => {
                let bin = self.cfg.istio_bin.clone().context("ISTIO_ZTUNNEL_BIN")?;
                let pods: Vec<istio::PodRef> = [ISTIO_CLIENT, ISTIO_SERVER]
                    .iter()
                    .map(|name| istio::PodRef::of(self.mesh, name))
                    .collect();
                let env: Vec<(String, String)> = std::env::var("ISTIO_ZTUNNEL_WORKER_THREADS")
                    .map(|t| vec![("ZTUNNEL_WORKER_THREADS".to_owned(), t)])
                    .unwrap_or_default();
                let istio = istio::IstioZtunnels::start(&bin, &pods, &[], &env)?;
                let ztunnels = std::mem::replace(&mut self.pids, istio.pids());
                eprintln!("[round {round} istio] Istio ztunnel pids: {:?}", self.pids);
                let saved = (
                    self.client,
                    self.server,
                    self.client_ns.clone(),
                    self.server_ns.clone(),
                    self.server_ip,
                );
                self.client = ISTIO_CLIENT;
                self.server = ISTIO_SERVER;
                self.client_ns = pods[0].netns.clone();
                self.server_ns = pods[1].netns.clone();
                self.server_ip = pods[1].ip;
                let result = self.run_workloads(mode, round, out);
                (
                    self.client,
                    self.server,
                    self.client_ns,
                    self.server_ns,
                    self.server_ip,
                ) = saved;
                self.pids = ztunnels;
                match istio.connections_opened() {
                    Ok(n) if n > 0.0 => {}
                    Ok(_) => self.note(format!(
                        "[round {round} istio] the Istio ztunnels opened no connection: traffic not captured?"
                    )),
                    Err(e) => self.note(format!("[round {round} istio] Istio metrics: {e:#}")),
                }
                drop(istio);
                result
            }
        }
    }

    fn run_workloads(&mut self, mode: Mode, round: usize, out: &mut Samples) -> anyhow::Result<()> {
        let tag = format!("round {round} {}", mode.name());
        let mesh = mode == Mode::Mesh;
        let proxied = mode != Mode::Direct;
        if mode == Mode::Istio {
            // Started for this round: as fresh as Membrane's ztunnels before their first load.
            std::thread::sleep(Duration::from_millis(500));
            push(out, "zt_rss_idle_mb", self.ztunnel_rss_mib()?);
        }
        if mesh {
            self.rt.block_on(self.mesh.enroll(CLIENT))?;
            self.rt.block_on(self.mesh.enroll(SERVER))?;
            std::thread::sleep(Duration::from_millis(500));
            // Before the first mesh traffic the ztunnels are pristine; later, the allocator
            // holds on to what the earlier rounds used.
            let key = if self.carried_traffic {
                "zt_rss_idle_after_load_mb"
            } else {
                "zt_rss_idle_mb"
            };
            push(out, key, self.ztunnel_rss_mib()?);
            self.carried_traffic = true;
        }
        self.clear_access_records();
        for test in ["tcp1", "tcp4", "rr", "conn"] {
            if !self.cfg.runs(test) {
                continue;
            }
            let result = match test {
                "tcp1" => self.bulk(&tag, 1, proxied, out),
                "tcp4" => self.bulk(&tag, 4, proxied, out),
                "rr" => self.rr(&tag, proxied, out),
                _ => self.conn(&tag, proxied, out),
            };
            if let Err(e) = result {
                self.note(format!("[{tag}] {test}: {e:#}"));
            }
        }
        // Were the connections really (not) carried by the mesh? Records come per connection.
        std::thread::sleep(Duration::from_millis(300));
        let records = self.clear_access_records();
        match (mesh, records) {
            (true, 0) => self.note(format!("[{tag}] no access records: traffic not captured?")),
            (false, n) if n > 0 => self.note(format!("[{tag}] {n} access records in direct mode")),
            _ => {}
        }
        if mesh {
            self.rt.block_on(self.mesh.unenroll(CLIENT))?;
            self.rt.block_on(self.mesh.unenroll(SERVER))?;
            std::thread::sleep(Duration::from_millis(500));
            self.clear_access_records();
        }
        Ok(())
    }

    /// Bulk throughput with `streams` streams; with four, the proxies' RSS peak too. `proxied`:
    /// there are proxies whose CPU time to count (mesh or relay mode).
    fn bulk(
        &self,
        tag: &str,
        streams: u32,
        proxied: bool,
        out: &mut Samples,
    ) -> anyhow::Result<()> {
        let test = if streams == 1 { "tcp1" } else { "tcp4" };
        eprintln!("[{tag}] {test} start ({} s)", self.cfg.bulk.as_secs());
        let cpu0 = self.proxy_cpu()?;
        let started = std::time::Instant::now();
        let (run, peak) = if streams == 4 {
            self.iperf_sampling_rss(streams)
        } else {
            (self.iperf(streams), f64::NAN)
        };
        let elapsed = started.elapsed().as_secs_f64();
        let per_proxy: Vec<f64> = (self.proxy_cpu()?.iter().zip(&cpu0))
            .map(|(now, before)| now - before)
            .collect();
        let cpu: f64 = per_proxy.iter().sum();
        let r = run?;
        let gbps = r.bits_per_second / 1e9;
        // Each proxy's share of a core shows which one bounds the transfer (one thread each
        // by default).
        let cores: Vec<String> = (per_proxy.iter())
            .map(|c| format!("{:.2}", c / elapsed))
            .collect();
        eprintln!(
            "[{tag}] {test}: {gbps:.2} Gbit/s, ztunnels {cpu:.2} CPU-s (cores per proxy, pid order: {})",
            cores.join(" / ")
        );
        push(
            out,
            if streams == 1 {
                "tcp1_gbps"
            } else {
                "tcp4_gbps"
            },
            gbps,
        );
        if proxied {
            let key = if streams == 1 {
                "zt_cpu_s_per_gb_1"
            } else {
                "zt_cpu_s_per_gb_4"
            };
            push(out, key, cpu / (r.bytes / 1e9));
            if streams == 4 {
                push(out, "zt_rss_bulk_mb", peak);
            }
        }
        Ok(())
    }

    fn rr(&self, tag: &str, proxied: bool, out: &mut Samples) -> anyhow::Result<()> {
        eprintln!("[{tag}] rr start ({} s)", self.cfg.rr.as_secs());
        let cpu0 = self.ztunnel_cpu()?;
        let (rate, lat) = self.request_response()?;
        let cpu = self.ztunnel_cpu()? - cpu0;
        let p99 = quantile_us(&lat, 0.99);
        eprintln!("[{tag}] rr: {rate:.0}/s, p99 {p99:.0} µs, ztunnels {cpu:.2} CPU-s");
        push(out, "rr_per_s", rate);
        push(out, "rr_p50_us", quantile_us(&lat, 0.5));
        push(out, "rr_p99_us", p99);
        if proxied {
            push(out, "zt_cpu_us_per_rr", cpu * 1e6 / lat.len().max(1) as f64);
        }
        Ok(())
    }

    fn conn(&self, tag: &str, proxied: bool, out: &mut Samples) -> anyhow::Result<()> {
        eprintln!("[{tag}] conn start ({} s)", self.cfg.conn.as_secs());
        self.clear_access_records();
        let cpu0 = self.ztunnel_cpu()?;
        let (rate, lat, errors) = self.connection_rate()?;
        let cpu = self.ztunnel_cpu()? - cpu0;
        let p99 = quantile_us(&lat, 0.99);
        eprintln!(
            "[{tag}] conn: {rate:.0}/s, p99 {p99:.0} µs, {errors} errors, ztunnels {cpu:.2} CPU-s"
        );
        push(out, "conn_per_s", rate);
        push(out, "conn_p50_us", quantile_us(&lat, 0.5));
        push(out, "conn_p99_us", p99);
        push(out, "conn_errors", errors as f64);
        if proxied {
            push(
                out,
                "zt_cpu_us_per_conn",
                cpu * 1e6 / lat.len().max(1) as f64,
            );
        }
        Ok(())
    }
}

fn push(out: &mut Samples, key: &'static str, value: f64) {
    out.entry(key).or_default().push(value);
}

// === setup ===

fn spec() -> MeshSpec {
    MeshSpec {
        nodes: vec!["node-1".into(), "node-2".into()],
        pods: vec![
            PodDef::new(CLIENT, "bench", "client", "node-1"),
            PodDef::new(SERVER, "bench", "server", "node-2"),
            PodDef::new(ISTIO_CLIENT, "bench-istio", "client", "node-1"),
            PodDef::new(ISTIO_SERVER, "bench-istio", "server", "node-2"),
        ],
        mesh_namespaces: vec!["bench".into()],
        ..MeshSpec::default()
    }
}

/// Room for connection churn in a pod: TIME_WAIT reuse and a wide ephemeral port range.
fn tune_pod(mesh: &Mesh, pod: &str) -> anyhow::Result<()> {
    run_in_netns(mesh.netns_path(pod), || -> io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")
    })??;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if relay::run_if_requested()? {
        return Ok(());
    }
    if !membrane_tests::is_root() {
        eprintln!("skipped: the data-plane benchmark needs root (network namespaces)");
        return Ok(());
    }
    let cfg = Config::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load_start = load_average();
    let mesh = rt.block_on(Mesh::start(spec()))?;
    for pod in [CLIENT, SERVER, ISTIO_CLIENT, ISTIO_SERVER] {
        tune_pod(&mesh, pod)?;
    }
    let pids: Vec<u32> = mesh.ztunnels.values().map(|z| z.pid()).collect();
    eprintln!(
        "ztunnel pids: {}",
        mesh.ztunnels
            .iter()
            .map(|(node, z)| format!("{node}={}", z.pid()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut bench = Bench {
        mesh: &mesh,
        rt: &rt,
        cfg: &cfg,
        client: CLIENT,
        server: SERVER,
        client_ns: mesh.pod(CLIENT).netns_name().to_owned(),
        server_ns: mesh.pod(SERVER).netns_name().to_owned(),
        server_ip: mesh.pod(SERVER).ip(),
        pids,
        ticks: clock_ticks_per_second(),
        errors: Vec::new(),
        carried_traffic: false,
    };
    let (mut direct, mut meshed, mut relayed, mut istioed) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    for round in 1..=cfg.rounds {
        // The listed order, reversed every other round, so drift hits every mode alike.
        let mut order = cfg.modes.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for mode in order {
            let out = match mode {
                Mode::Direct => &mut direct,
                Mode::Mesh => &mut meshed,
                Mode::Relay => &mut relayed,
                Mode::Istio => &mut istioed,
            };
            bench.run_mode(mode, round, out)?;
        }
    }
    let errors = std::mem::take(&mut bench.errors);
    report::report(
        &cfg,
        [&direct, &meshed, &relayed, &istioed],
        (&load_start, &load_average()),
        &errors,
    );
    drop(mesh);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
