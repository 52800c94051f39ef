//! The egress decision as the outbound path makes it ([`membrane_ztunnel::egress::decide`]:
//! the EgressPolicies selecting the source, its pins for the address, the evaluator, the
//! record) with 10,000 EgressPolicies and 10,000 pins for the source pod. Target: p99 < 2 µs.
//!
//! Two layouts of the 10,000 policies: spread over 2,000 namespaces (5 each, the source's
//! namespace among them) plus 20 mesh-wide selector policies; and all in the source's own
//! namespace, each selecting a different `app` label (the worst case for selection).
//!
//! Run with `cargo bench -p membrane-ztunnel --bench egress_decision`. Criterion gives the mean;
//! a manual loop of 100,000 timed decisions prints p50/p99/p99.9 (each sample includes the
//! ~20–40 ns of reading the clock twice).

#![allow(clippy::print_stdout)] // the percentiles are the program's output

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_main};
use membrane_identity::WorkloadIdentity;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_policy::egress::{EgressIndex, parse_egress_policies};
use membrane_ztunnel::dns::pins::{MIN_GRACE, PinMetrics, PinTable};
use membrane_ztunnel::egress::{Admission, decide};
use membrane_ztunnel::sni::Hello;
use membrane_ztunnel::state::{MeshState, Protocol, Workload};

const POLICIES: usize = 10_000;
const PINS: u32 = 10_000;

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i))
}

fn policy(namespace: &str, name: &str, selector: Option<&str>, action: &str, i: usize) -> String {
    let selector = selector.map_or_else(String::new, |app| {
        format!("  selector: {{matchLabels: {{app: {app}}}}}\n")
    });
    format!(
        "---\napiVersion: security.membrane.dev/v1\nkind: EgressPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{selector}  action: {action}\n  rules:\n  - to:\n    - hosts: [h{i}.example, \"*.cdn{i}.example\", n{i}.example]\n      ports: [443]\n    - ipBlocks: [203.0.113.{}/32]\n      ports: [80]\n",
        i % 250
    )
}

/// 2,000 namespaces × 5 (one DENY each), plus 20 mesh-wide selector policies.
fn spread() -> Vec<String> {
    let mut text = Vec::new();
    for i in 0..POLICIES - 20 {
        let ns = format!("ns-{}", i % 2000);
        let action = if i % 5 == 4 { "DENY" } else { "ALLOW" };
        let app = (i % 3 == 0).then_some("trainer");
        text.push(policy(&ns, &format!("p{i}"), app, action, i));
    }
    for i in 0..20 {
        let app = if i == 0 {
            "trainer".to_owned()
        } else {
            format!("svc-{i}")
        };
        text.push(policy(
            "membrane-system",
            &format!("mesh{i}"),
            Some(&app),
            "ALLOW",
            90_000 + i,
        ));
    }
    text
}

/// All 10,000 in the source's namespace, each selecting another `app`.
fn one_namespace() -> Vec<String> {
    (0..POLICIES)
        .map(|i| {
            policy(
                "ns-0",
                &format!("p{i}"),
                Some(&format!("svc-{i}")),
                "ALLOW",
                i,
            )
        })
        .collect()
}

fn state(docs: &[String]) -> MeshState {
    // Parsed one document at a time: a text holds at most 1,024 documents.
    let policies: Vec<_> = docs
        .iter()
        .flat_map(|d| parse_egress_policies(d).expect("valid policy"))
        .collect();
    assert_eq!(policies.len(), POLICIES);
    let mut state = MeshState::empty_loaded();
    state.set_egress(EgressIndex::build(policies, "membrane-system"));
    state
}

fn source(app: &str) -> Workload {
    let td = parse_trust_domain("cluster.local").expect("td");
    Workload {
        uid: "pod-0".into(),
        name: "trainer-0".into(),
        namespace: "ns-0".into(),
        service_account: "trainer".into(),
        node: "node-a".into(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 77, 1, 10))],
        protocol: Protocol::Hbone,
        labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        identity: WorkloadIdentity::new(&td, "ns-0", "trainer").expect("identity"),
        gateway: None,
        foreign: false,
        network_gateway: None,
    }
}

fn pins() -> PinTable {
    let t = PinTable::new(PINS as usize, MIN_GRACE, None, PinMetrics::default());
    let now = SystemTime::now();
    for i in 0..PINS {
        t.pin("pod-0", &format!("n{i}.example"), &[], &[addr(i)], 300, now);
    }
    t
}

/// The outbound path's whole decision: the policies selecting the source, then the rest.
fn decide_whole(
    state: &MeshState,
    pins: &PinTable,
    source: &Workload,
    dst: SocketAddr,
    hello: &Hello,
    now: SystemTime,
) -> Admission {
    let policies = state.egress().selecting(&source.namespace, &source.labels);
    decide(&policies, pins, source, dst, hello, now)
}

fn percentiles(label: &str, state: &MeshState, pins: &PinTable, source: &Workload) {
    let now = SystemTime::now();
    let mut samples = Vec::with_capacity(100_000);
    let mut allowed = 0;
    for i in 0..100_000u32 {
        let n = i.wrapping_mul(7919) % PINS;
        let dst = SocketAddr::new(addr(n), 443);
        let hello = Hello::Sni(format!("n{n}.example"));
        let start = Instant::now();
        let admission = black_box(decide_whole(state, pins, source, dst, &hello, now));
        samples.push(start.elapsed());
        allowed += usize::from(admission.record.verdict == "allow");
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "egress decision, {label}: p50 {:?}  p99 {:?}  p99.9 {:?}  ({allowed} of 100000 allowed)",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn benches() {
    let pins = pins();
    let spread = state(&spread());
    let crowded = state(&one_namespace());
    let trainer = Arc::new(source("trainer"));
    let svc = Arc::new(source("svc-4242"));
    percentiles(
        "10k policies over 2,000 namespaces, 10k pins",
        &spread,
        &pins,
        &trainer,
    );
    percentiles(
        "10k selector policies in the source's namespace, 10k pins",
        &crowded,
        &pins,
        &svc,
    );
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let dst = SocketAddr::new(addr(4242), 443);
    let hello = Hello::Sni("n4242.example".into());
    let now = SystemTime::now();
    c.bench_function("egress decision (spread, 10k/10k)", |b| {
        b.iter(|| decide_whole(&spread, &pins, &trainer, black_box(dst), &hello, now));
    });
    c.bench_function("egress decision (one namespace, 10k/10k)", |b| {
        b.iter(|| decide_whole(&crowded, &pins, &svc, black_box(dst), &hello, now));
    });
    c.final_summary();
}

criterion_main!(benches);
