//! CSR signing throughput: the controller's whole per-request CPU work (parse and check the
//! CSR, verify its signature, build and sign the leaf), on one core.
//!
//! Run with `cargo bench -p membrane-ca --bench sign`. Criterion reports the time per SVID;
//! SVIDs per second per core is its inverse. The target is ≥ 2,000 SVIDs/s.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_main};
use membrane_ca::{Signer, SignerConfig, SigningAuthority};
use membrane_identity::{ValidatedCsr, WorkloadIdentity, csr, spiffe_id::parse_trust_domain};

fn bench(c: &mut Criterion) {
    let td = parse_trust_domain("cluster.local").expect("trust domain");
    let dir = std::env::temp_dir().join(format!("membrane-bench-{}", std::process::id()));
    let authority =
        SigningAuthority::load_or_create(&dir, &td, Duration::from_secs(3600)).expect("authority");
    let signer = Signer::new(authority, SignerConfig::default());
    // A pool of distinct CSRs, as a node would send for distinct workloads.
    let csrs: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let id = WorkloadIdentity::new(&td, "training", &format!("trainer-{i}")).expect("id");
            csr::generate(&id).expect("csr").csr.to_vec()
        })
        .collect();

    let mut group = c.benchmark_group("ca");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("validate_and_sign_csr", |b| {
        b.iter(|| {
            let der = &csrs[i % csrs.len()];
            i += 1;
            let csr = ValidatedCsr::parse(der, &td).expect("valid");
            signer.sign(&csr, Duration::ZERO).expect("signed")
        })
    });
    let parsed = ValidatedCsr::parse(&csrs[0], &td).expect("valid");
    group.bench_function("sign_only", |b| {
        b.iter(|| signer.sign(&parsed, Duration::ZERO).expect("signed"))
    });
    group.bench_function("validate_only", |b| {
        b.iter(|| ValidatedCsr::parse(&csrs[0], &td).expect("valid"))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
