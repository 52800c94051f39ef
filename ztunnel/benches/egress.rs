//! What the outbound path adds to a connection leaving the mesh: the pod's pin lookup (with
//! 10,000 pins for that pod and 20 other pods' pins beside them) and reading a ClientHello's
//! server name from peeked bytes. Target: a pin lookup < 5 µs at 10,000 pins per pod.
//!
//! Run with `cargo bench -p membrane-ztunnel --bench egress`. Criterion gives the mean per
//! call; a manual loop of 100,000 timed lookups prints p50/p99/p99.9 (each sample includes
//! the ~20–40 ns cost of reading the clock twice).

#![allow(clippy::print_stdout)] // the percentiles are the program's output

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_main};
use membrane_ztunnel::dns::pins::{MIN_GRACE, PinMetrics, PinTable};
use membrane_ztunnel::sni::client_hello;

const PINS: u32 = 10_000;

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i))
}

fn table() -> PinTable {
    let t = PinTable::new(PINS as usize, MIN_GRACE, None, PinMetrics::default());
    let now = SystemTime::now();
    for pod in 0..21 {
        let uid = format!("pod-{pod}");
        for i in 0..PINS {
            t.pin(&uid, &format!("n{i}.example"), &[], &[addr(i)], 300, now);
        }
    }
    t
}

fn hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("huggingface.co").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

fn percentiles(t: &PinTable) {
    let now = SystemTime::now();
    let mut samples = Vec::with_capacity(100_000);
    for i in 0..100_000u32 {
        let ip = addr(i.wrapping_mul(7919) % (PINS + PINS / 10));
        let start = Instant::now();
        black_box(t.lookup("pod-0", black_box(ip), now));
        samples.push(start.elapsed());
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "pin lookup at {PINS} pins/pod (10% misses): p50 {:?} p99 {:?} p99.9 {:?} (target < 5 µs)",
        at(0.5),
        at(0.99),
        at(0.999)
    );
}

fn benches() {
    let t = table();
    percentiles(&t);
    let hello = hello();
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let now = SystemTime::now();
    c.bench_function("pin lookup (hit, 10k pins/pod)", |b| {
        b.iter(|| t.lookup("pod-0", black_box(addr(4242)), now));
    });
    c.bench_function("pin lookup (miss, 10k pins/pod)", |b| {
        b.iter(|| t.lookup("pod-0", black_box(addr(PINS + 5)), now));
    });
    c.bench_function("ClientHello server name", |b| {
        b.iter(|| client_hello(black_box(&hello)));
    });
    c.final_summary();
}

criterion_main!(benches);
