//! Decision cost and index build time with 10,000 policies in the mesh.
//!
//! Run with `cargo bench -p membrane-policy --bench decide`. The mesh: 200 namespaces, 10
//! policies in the root namespace (2 mesh-wide), and in the destination's namespace 50
//! policies that apply to the destination workload (30 ALLOW, 15 DENY, 5 AUDIT; selectors on
//! different subsets of its labels, plus namespace-wide ones) beside 20 that select other
//! workloads. Every policy has two rules with source constraints and ports.
//!
//! Two variants of the same mesh: *gated*, where rules name their sources' namespaces (exact
//! and prefix principals, `namespaces`) — the usual shape, which lets `decide` skip rules
//! that cannot concern the caller (see `gate.rs`) — and *ungated* (`ungated_…`), where rules
//! use suffix principals and `notNamespaces`, which pin nothing, so every rule of the 52
//! applicable policies is evaluated: the worst case.
//!
//! Targets: `decide` p99 < 2 µs; `PolicyIndex::build` for 10,000 policies < 1 s. Criterion
//! gives the mean per call; a manual loop of 100,000 timed calls prints p50/p99/p99.9 (each
//! sample includes the ~20–40 ns cost of reading the clock twice).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_main};
use membrane_policy::{Policy, PolicyIndex, Request, Source, Verdict, decide, parse_policies};

const ROOT: &str = "membrane-system";
const DEST_NS: &str = "inference";
const TOTAL: usize = 10_000;

/// One policy. `gated`: its rules name source namespaces (exact and prefix principals, a
/// namespace), so `decide` can skip them for callers from elsewhere; otherwise they use
/// suffix principals and `notNamespaces`, which pin nothing, and every rule is evaluated.
fn doc(ns: &str, name: &str, selector: &str, action: &str, i: usize, gated: bool) -> String {
    let selector = if selector.is_empty() {
        String::new()
    } else {
        format!("selector: {{matchLabels: {{{selector}}}}}, ")
    };
    // Principals that never match the benchmark's callers except where intended.
    let a = i % 97;
    if !gated {
        return format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{{selector}action: {action}, rules: [\n\
               {{from: [{{source: {{principals: [\"*/ns/team-{a}/sa/app\", \"*/ns/team-{a}/sa/batch\", \"*/sa/tool-{a}\"]}}}}],\n\
                to: [{{operation: {{ports: [\"8080\", \"9090\"]}}}}]}},\n\
               {{from: [{{source: {{notNamespaces: [ops-{a}], ipBlocks: [\"10.{a}.0.0/16\"]}}}}],\n\
                to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}\n"
        );
    }
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{{selector}action: {action}, rules: [\n\
           {{from: [{{source: {{principals: [cluster.local/ns/team-{a}/sa/app, cluster.local/ns/team-{a}/sa/batch, \"cluster.local/ns/tools-{a}/*\"]}}}}],\n\
            to: [{{operation: {{ports: [\"8080\", \"9090\"]}}}}]}},\n\
           {{from: [{{source: {{namespaces: [ops-{a}], ipBlocks: [\"10.{a}.0.0/16\"]}}}}],\n\
            to: [{{operation: {{ports: [\"15000\"]}}}}]}}]}}\n"
    )
}

/// The mesh as YAML texts, one per namespace (as a directory of files would hold it).
fn mesh_texts(gated: bool) -> Vec<String> {
    let mut texts = Vec::new();
    let mut count = 0;
    // Root namespace: 2 mesh-wide DENY (not matching the callers), 8 selecting other apps.
    let mut root = String::new();
    for i in 0..10 {
        let selector = if i < 2 {
            String::new()
        } else {
            format!("app: other-{i}")
        };
        let action = if i < 2 { "DENY" } else { "ALLOW" };
        root.push_str(&doc(
            ROOT,
            &format!("mesh-{i}"),
            &selector,
            action,
            i,
            gated,
        ));
        count += 1;
    }
    texts.push(root);
    // Destination namespace: 50 apply to the destination, 20 select other workloads.
    let selecting = [
        "app: inference",
        "app: inference, version: v1",
        "tier: gpu",
        "team: ml, app: inference",
        "version: v1",
        "tier: gpu, team: ml",
        "", // namespace-wide
    ];
    let mut dest = String::new();
    for i in 0..50 {
        let action = match i % 10 {
            0..=5 => "ALLOW",
            6..=8 => "DENY",
            _ => "AUDIT",
        };
        dest.push_str(&doc(
            DEST_NS,
            &format!("sel-{i:02}"),
            selecting[i % selecting.len()],
            action,
            i,
            gated,
        ));
        count += 1;
    }
    for i in 0..20 {
        let selector = if i % 2 == 0 {
            format!("app: web-{i}")
        } else {
            "app: inference, version: v2".into()
        };
        dest.push_str(&doc(
            DEST_NS,
            &format!("other-{i:02}"),
            &selector,
            "ALLOW",
            i,
            gated,
        ));
        count += 1;
    }
    texts.push(dest);
    // 199 other namespaces share the rest.
    let mut n = 0;
    while count < TOTAL {
        let ns = format!("ns-{:03}", n % 199);
        let mut text = String::new();
        for j in 0..50 {
            if count == TOTAL {
                break;
            }
            let selector = if j % 5 == 0 {
                String::new()
            } else {
                format!("app: svc-{j}")
            };
            let action = ["ALLOW", "DENY", "AUDIT"][j % 3];
            text.push_str(&doc(
                &ns,
                &format!("p-{n}-{j}"),
                &selector,
                action,
                j,
                gated,
            ));
            count += 1;
        }
        texts.push(text);
        n += 1;
    }
    texts
}

fn parse_all(texts: &[String]) -> Vec<Policy> {
    texts
        .iter()
        .flat_map(|t| parse_policies(t).expect("valid policies"))
        .map(|c| c.policy)
        .collect()
}

struct Caller {
    name: &'static str,
    principal: &'static str,
    namespace: &'static str,
    service_account: &'static str,
    port: u16,
    want: Verdict,
}

const CALLERS: [Caller; 3] = [
    // Allowed by the last ALLOW policy (its prefix or suffix principal): every DENY and most
    // ALLOWs evaluated.
    Caller {
        name: "allowed",
        principal: "cluster.local/ns/tools-45/sa/tool-45",
        namespace: "tools-45",
        service_account: "tool-45",
        port: 8080,
        want: Verdict::Allow,
    },
    // Matches a DENY.
    Caller {
        name: "denied",
        principal: "cluster.local/ns/team-7/sa/app",
        namespace: "team-7",
        service_account: "app",
        port: 9090,
        want: Verdict::Deny,
    },
    // Matches nothing: every policy evaluated, denied for want of an ALLOW.
    Caller {
        name: "no_match",
        principal: "cluster.local/ns/elsewhere/sa/x",
        namespace: "elsewhere",
        service_account: "x",
        port: 8080,
        want: Verdict::Deny,
    },
];

fn request<'a>(caller: &'a Caller, labels: &'a BTreeMap<String, String>) -> Request<'a> {
    Request {
        source: Some(Source {
            principal: caller.principal,
            namespace: caller.namespace,
            service_account: caller.service_account,
        }),
        source_ip: IpAddr::from([192, 168, 3, 4]),
        remote_ip: None,
        destination_namespace: DEST_NS,
        destination_labels: labels,
        destination_ip: IpAddr::from([10, 200, 0, 7]),
        destination_port: caller.port,
    }
}

#[allow(clippy::print_stdout)]
fn percentiles(prefix: &str, index: &PolicyIndex, labels: &BTreeMap<String, String>) {
    const CALLS: usize = 100_000;
    for caller in CALLERS.iter() {
        let req = request(caller, labels);
        for _ in 0..10_000 {
            black_box(decide(index, black_box(&req)));
        }
        let mut samples: Vec<Duration> = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let start = Instant::now();
            let d = decide(index, black_box(&req));
            samples.push(start.elapsed());
            black_box(d);
        }
        samples.sort_unstable();
        let mean = samples.iter().sum::<Duration>() / CALLS as u32;
        let at = |q: f64| samples[((CALLS as f64 * q) as usize).min(CALLS - 1)];
        println!(
            "{prefix}decide/{:<9} {CALLS} timed calls: p50 {:?}  p99 {:?}  p99.9 {:?}  mean {:?}  max {:?}",
            caller.name,
            at(0.50),
            at(0.99),
            at(0.999),
            mean,
            samples[CALLS - 1]
        );
    }
}

/// Builds one mesh, checks it, prints the pipeline time and the percentiles, and registers
/// the criterion benchmarks of `decide` (and, for the gated mesh, of the build).
#[allow(clippy::print_stdout)]
fn scenario(c: &mut Criterion, gated: bool) {
    let prefix = if gated { "" } else { "ungated_" };
    let texts = mesh_texts(gated);
    let start = Instant::now();
    let policies = parse_all(&texts);
    let parsed = start.elapsed();
    assert_eq!(policies.len(), TOTAL);
    let start = Instant::now();
    let index = PolicyIndex::build(policies.clone(), ROOT);
    let built = start.elapsed();
    println!(
        "{prefix}pipeline: parse+validate {TOTAL} policies {parsed:?}, build index {built:?}, total {:?}",
        parsed + built
    );

    let labels: BTreeMap<String, String> = [
        ("app", "inference"),
        ("version", "v1"),
        ("tier", "gpu"),
        ("team", "ml"),
        ("pod-template-hash", "7d9f8c6b5"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let applicable = index.policies_for(DEST_NS, &labels).count();
    assert_eq!(applicable, 52, "50 in its namespace + 2 mesh-wide");
    for caller in CALLERS.iter() {
        let d = decide(&index, &request(caller, &labels));
        assert_eq!(d.verdict, caller.want, "{prefix}{}: {d:?}", caller.name);
    }

    percentiles(prefix, &index, &labels);

    let mut group = c.benchmark_group("policy");
    for caller in CALLERS.iter() {
        let req = request(caller, &labels);
        group.bench_function(format!("{prefix}decide_{}", caller.name), |b| {
            b.iter(|| decide(&index, black_box(&req)))
        });
    }
    if gated {
        group.sample_size(10);
        group.bench_function("build_index_10k", |b| {
            b.iter_batched(
                || policies.clone(),
                |p| PolicyIndex::build(p, ROOT),
                BatchSize::LargeInput,
            )
        });
        group.bench_function("parse_validate_10k", |b| b.iter(|| parse_all(&texts)));
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    scenario(c, true);
    scenario(c, false);
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
