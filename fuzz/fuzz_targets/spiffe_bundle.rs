//! SPIFFE bundle documents as a federated peer's endpoint serves them: any bytes either parse
//! into a bundle of at least one CA root or are rejected whole, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_identity::federation::BundleDocument;

fuzz_target!(|data: &[u8]| {
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster-b.example")
        .expect("a valid trust domain");
    if let Ok(doc) = BundleDocument::parse(&td, data) {
        assert!(!doc.x509_roots.is_empty());
        assert!(doc.to_trust_bundle().is_ok());
    }
});
