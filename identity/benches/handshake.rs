//! What hybrid post-quantum key exchange costs a mutual-TLS handshake: one full handshake
//! between Membrane's client and server configurations (ECDSA P-256 SVIDs, TLS 1.3, both
//! ends in this thread, in memory), with X25519MLKEM768 and with X25519 only.
//! `cargo bench -p membrane-identity --bench handshake`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::handshake::Pair;
use criterion::{Criterion, criterion_main};
use membrane_identity::KeyExchange;

fn handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("mtls_handshake");
    for (name, kx) in [
        ("x25519mlkem768", KeyExchange::PqPreferred),
        ("x25519", KeyExchange::Classical),
    ] {
        let pair = Pair::new(kx, kx);
        group.bench_function(name, |b| {
            b.iter(|| pair.handshake().expect("handshake"));
        });
    }
    group.finish();
}

// The macro generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::handshakes);
}
criterion_main!(group::benches);
