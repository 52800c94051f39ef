//! The benchmark's report: one Markdown table (medians per mode; mesh against direct, against
//! the plain relay and against Istio's ztunnel; each target's verdict) and one JSON line with
//! every sample.

use serde_json::json;

use super::Config;
use super::measure::{Samples, median};

/// What a row is held to: a minimum or maximum ratio of mesh to another mode, or a maximum
/// mesh figure.
#[derive(Clone, Copy)]
enum Target {
    /// mesh/istio at least this.
    AboveIstio(f64),
    /// mesh/istio at most this.
    BelowIstio(f64),
    /// mesh/relay at least this.
    AboveRelay(f64),
    /// The mesh figure at most this.
    Max(f64),
}

use self::Target::{AboveIstio, AboveRelay, BelowIstio, Max};

#[rustfmt::skip]
const ROWS: &[(&str, &str, &[Target])] = &[
    ("TCP throughput, 1 stream (Gbit/s)", "tcp1_gbps", &[AboveIstio(1.4), AboveRelay(0.85)]),
    ("TCP throughput, 4 streams (Gbit/s)", "tcp4_gbps", &[AboveIstio(1.5)]),
    ("1-byte request/response, one connection (/s)", "rr_per_s", &[AboveIstio(1.2)]),
    ("request/response p50 (µs)", "rr_p50_us", &[]),
    ("request/response p99 (µs)", "rr_p99_us", &[BelowIstio(0.8)]),
    ("connect + request/response + close (/s)", "conn_per_s", &[AboveIstio(1.5)]),
    ("new connection p50 (µs)", "conn_p50_us", &[]),
    ("new connection p99 (µs)", "conn_p99_us", &[]),
    ("new-connection errors (per run)", "conn_errors", &[]),
    ("proxy CPU per new connection, both (µs)", "zt_cpu_us_per_conn", &[]),
    ("proxy CPU per request/response, both (µs)", "zt_cpu_us_per_rr", &[]),
    ("proxy CPU per GB, 1 stream, both (CPU-s)", "zt_cpu_s_per_gb_1", &[BelowIstio(0.75), Max(1.5)]),
    ("proxy CPU per GB, 4 streams, both (CPU-s)", "zt_cpu_s_per_gb_4", &[BelowIstio(0.75), Max(1.5)]),
    ("proxy RSS idle, fresh, larger of the two (MiB)", "zt_rss_idle_mb", &[Max(10.0)]),
    ("proxy RSS idle after earlier rounds (MiB)", "zt_rss_idle_after_load_mb", &[Max(10.0)]),
    ("proxy RSS peak, 4 streams (MiB)", "zt_rss_bulk_mb", &[Max(30.0)]),
];

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.is_nan() => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn times(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
}

fn over(x: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 && !x.is_nan() => Some(x / b),
        _ => None,
    }
}

/// One target's statement and verdict (`None`: the modes it compares did not run).
fn judge(
    target: Target,
    mesh: Option<f64>,
    vs_relay: Option<f64>,
    vs_istio: Option<f64>,
) -> (String, Option<bool>) {
    match target {
        AboveIstio(x) => (format!("≥ {x}× istio"), vs_istio.map(|r| r >= x)),
        BelowIstio(x) => (format!("≤ {x}× istio"), vs_istio.map(|r| r <= x)),
        AboveRelay(x) => (format!("≥ {x}× relay"), vs_relay.map(|r| r >= x)),
        Max(x) => (
            format!("≤ {x}"),
            mesh.filter(|m| !m.is_nan()).map(|m| m <= x),
        ),
    }
}

/// The report: for each row the direct, mesh, plain-relay and Istio medians, mesh/direct,
/// mesh/relay and mesh/istio, and each target with PASS/FAIL (n/a when its modes did not
/// run). In the relay and istio modes the "proxy" rows measure the two relays or the two
/// Istio ztunnels.
pub fn report(cfg: &Config, samples: [&Samples; 4], load: (&str, &str), errors: &[String]) {
    let [direct, mesh, relayed, istio] = samples;
    println!(
        "\nMembrane data plane, medians of {} rounds (load average at start {}, at end {})\n",
        cfg.rounds, load.0, load.1
    );
    println!(
        "The mesh's ztunnels ran with --busy-poll {} (the default is auto).\n",
        cfg.busy_poll
    );
    println!(
        "| measurement | direct | mesh | plain relay | Istio ztunnel | mesh/direct | mesh/relay | mesh/istio | targets |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut medians: [serde_json::Map<String, serde_json::Value>; 4] = Default::default();
    let mut ratios: [serde_json::Map<String, serde_json::Value>; 3] = Default::default();
    let mut verdicts = serde_json::Map::new();
    for (label, key, targets) in ROWS {
        let m: [Option<f64>; 4] =
            [direct, mesh, relayed, istio].map(|s| s.get(key).and_then(|v| median(v)));
        let r = [over(m[1], m[0]), over(m[1], m[2]), over(m[1], m[3])];
        let mut stated = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let (goal, pass) = judge(*t, m[1], r[1], r[2]);
            let verdict = match pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "n/a",
            };
            stated.push(format!("{goal} {verdict}"));
            if let Some(p) = pass {
                verdicts.insert(format!("{key}#{i}"), json!(p));
            }
        }
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(m[0]),
            fmt(m[1]),
            fmt(m[2]),
            fmt(m[3]),
            times(r[0]),
            times(r[1]),
            times(r[2]),
            stated.join("; "),
        );
        for (map, v) in medians.iter_mut().zip(m) {
            if let Some(v) = v.filter(|v| !v.is_nan()) {
                map.insert((*key).into(), json!(v));
            }
        }
        for (map, v) in ratios.iter_mut().zip(r) {
            if let Some(v) = v {
                map.insert((*key).into(), json!(v));
            }
        }
    }
    for e in errors {
        println!("\nerror: {e}");
    }
    let [md, mm, mr, mi] = medians;
    let [rd, rr, ri] = ratios;
    let line = json!({
        "bench": "membrane-dataplane",
        "rounds": cfg.rounds,
        "bulk_secs": cfg.bulk.as_secs(),
        "rr_secs": cfg.rr.as_secs(),
        "conn_secs": cfg.conn.as_secs(),
        "inflight": cfg.inflight,
        "mesh_busy_poll": cfg.busy_poll,
        "load_start": load.0,
        "load_end": load.1,
        "direct": md,
        "mesh": mm,
        "relay": mr,
        "istio": mi,
        "ratio": rd,
        "relay_ratio": rr,
        "istio_ratio": ri,
        "pass": verdicts,
        "samples": {"direct": direct, "mesh": mesh, "relay": relayed, "istio": istio},
        "errors": errors,
    });
    println!("\n{line}");
}
