//! The benchmark's report: one Markdown table (medians per mode, ratios to direct, each
//! target's verdict) and one JSON line with every sample.

use serde_json::json;

use super::Config;
use super::measure::{Samples, median};

/// What a row is held to: nothing, a minimum mesh/direct ratio, or a maximum mesh figure.
enum Target {
    Info,
    Ratio(f64),
    Max(f64),
}

use self::Target::{Info, Max, Ratio};

#[rustfmt::skip]
const ROWS: &[(&str, &str, Target)] = &[
    ("TCP throughput, 1 stream (Gbit/s)", "tcp1_gbps", Ratio(0.6)),
    ("TCP throughput, 4 streams (Gbit/s)", "tcp4_gbps", Ratio(0.3)),
    ("1-byte request/response, one connection (/s)", "rr_per_s", Ratio(0.7)),
    ("request/response p50 (µs)", "rr_p50_us", Info),
    ("request/response p99 (µs)", "rr_p99_us", Info),
    ("connect + request/response + close (/s)", "conn_per_s", Ratio(0.35)),
    ("new connection p50 (µs)", "conn_p50_us", Info),
    ("new connection p99 (µs)", "conn_p99_us", Info),
    ("new-connection errors (per run)", "conn_errors", Info),
    ("ztunnel CPU per new connection, both (µs)", "zt_cpu_us_per_conn", Max(200.0)),
    ("ztunnel CPU per request/response, both (µs)", "zt_cpu_us_per_rr", Info),
    ("ztunnel CPU per GB, 1 stream, both (CPU-s)", "zt_cpu_s_per_gb_1", Info),
    ("ztunnel CPU per GB, 4 streams, both (CPU-s)", "zt_cpu_s_per_gb_4", Info),
    ("ztunnel RSS idle, fresh, larger of the two (MiB)", "zt_rss_idle_mb", Max(10.0)),
    ("ztunnel RSS idle after earlier rounds (MiB)", "zt_rss_idle_after_load_mb", Max(10.0)),
    ("ztunnel RSS peak, 4 streams (MiB)", "zt_rss_bulk_mb", Max(30.0)),
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

/// The report: for each row the direct, mesh and plain-relay medians, mesh/direct against the
/// target, and relay/direct (what the topology alone allows). In relay mode the "ztunnel"
/// rows measure the two relays.
pub fn report(cfg: &Config, samples: [&Samples; 3], load: (&str, &str), errors: &[String]) {
    let [direct, mesh, relayed] = samples;
    println!(
        "\nMembrane data plane, medians of {} rounds (load average at start {}, at end {})\n",
        cfg.rounds, load.0, load.1
    );
    println!(
        "| measurement | direct | mesh | mesh/direct | target | result | plain relay | relay/direct |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut medians = (
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    );
    let mut ratios = serde_json::Map::new();
    let mut relay_ratios = serde_json::Map::new();
    let mut verdicts = serde_json::Map::new();
    let over = |x: Option<f64>, base: Option<f64>| match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => Some(x / b),
        _ => None,
    };
    for (label, key, target) in ROWS {
        let d = direct.get(key).and_then(|v| median(v));
        let m = mesh.get(key).and_then(|v| median(v));
        let r = relayed.get(key).and_then(|v| median(v));
        let ratio = over(m, d);
        let relay_ratio = over(r, d);
        let (goal, pass) = match target {
            Info => (String::new(), None),
            Ratio(x) => (format!("≥ {x}×"), ratio.map(|r| r >= *x)),
            Max(x) => (format!("≤ {x}"), m.map(|m| m <= *x)),
        };
        let verdict = match pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None if goal.is_empty() => "",
            None => "n/a",
        };
        let times = |r: Option<f64>| r.map_or_else(|| "–".into(), |r| format!("{r:.2}×"));
        println!(
            "| {label} | {} | {} | {} | {goal} | {verdict} | {} | {} |",
            fmt(d),
            fmt(m),
            times(ratio),
            fmt(r),
            times(relay_ratio),
        );
        if let Some(d) = d {
            medians.0.insert((*key).into(), json!(d));
        }
        if let Some(m) = m {
            medians.1.insert((*key).into(), json!(m));
        }
        if let Some(r) = r {
            medians.2.insert((*key).into(), json!(r));
        }
        if let Some(r) = ratio {
            ratios.insert((*key).into(), json!(r));
        }
        if let Some(r) = relay_ratio {
            relay_ratios.insert((*key).into(), json!(r));
        }
        if let Some(p) = pass {
            verdicts.insert((*key).into(), json!(p));
        }
    }
    for e in errors {
        println!("\nerror: {e}");
    }
    let line = json!({
        "bench": "membrane-dataplane",
        "rounds": cfg.rounds,
        "bulk_secs": cfg.bulk.as_secs(),
        "rr_secs": cfg.rr.as_secs(),
        "conn_secs": cfg.conn.as_secs(),
        "inflight": cfg.inflight,
        "load_start": load.0,
        "load_end": load.1,
        "direct": medians.0,
        "mesh": medians.1,
        "relay": medians.2,
        "ratio": ratios,
        "relay_ratio": relay_ratios,
        "pass": verdicts,
        "samples": {"direct": direct, "mesh": mesh, "relay": relayed},
        "errors": errors,
    });
    println!("\n{line}");
}
