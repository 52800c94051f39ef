//! The ztunnel's workloads file parser (operator input): never panics on any UTF-8 text.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use membrane_identity::TrustDomain;
use membrane_ztunnel::state::MeshState;

fn trust_domain() -> &'static TrustDomain {
    static TD: OnceLock<TrustDomain> = OnceLock::new();
    TD.get_or_init(|| {
        membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("valid")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = MeshState::parse("fuzz", text, trust_domain());
    }
});
