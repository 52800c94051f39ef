//! Roots and bundles of `cluster-b.example` for the federation's unit tests.

use membrane_identity::TrustBundle;
use rustls_pki_types::CertificateDer;

/// A fresh self-signed CA certificate.
pub fn root_der() -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.self_signed(&key).expect("root").der().clone()
}

/// `cluster-b.example`'s bundle of `roots`.
pub fn bundle(roots: &[&CertificateDer<'static>]) -> TrustBundle {
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster-b.example").expect("td");
    TrustBundle::new(td, roots.iter().map(|r| (*r).clone())).expect("bundle")
}
