//! Federated verification: a peer's chain is verified against the bundle of the trust domain
//! in its own SPIFFE ID, never another's, and a trust domain without a bundle is refused.

mod common;

use common::{Leaf, TestCa};
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::verify::SpiffeClientVerifier;
use membrane_identity::{PeerCheck, SharedTrustBundle, TrustBundle};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::UnixTime;

const A: &str = "cluster-a.example";
const B: &str = "cluster-b.example";
const TRAINER_A: &str = "spiffe://cluster-a.example/ns/training/sa/trainer";
const SCRAPER_B: &str = "spiffe://cluster-b.example/ns/training/sa/scraper";

fn bundle(ca: &TestCa, td: &str) -> TrustBundle {
    TrustBundle::new(parse_trust_domain(td).expect("td"), [ca.cert.clone()]).expect("bundle")
}

/// Verifies `leaf` as a client certificate with the given bundles and check; the error text.
fn verify(shared: &SharedTrustBundle, check: PeerCheck, leaf: &Leaf) -> Result<(), String> {
    let verifier =
        SpiffeClientVerifier::new(shared.clone(), check, membrane_identity::crypto_provider());
    let (end_entity, intermediates) = leaf.chain.split_first().expect("a leaf");
    verifier
        .verify_client_cert(end_entity, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| match e {
            // The reason Membrane gave, not rustls' wrapper of it.
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(inner)) => {
                inner.0.to_string()
            }
            other => other.to_string(),
        })
}

struct Federation {
    ca_a: TestCa,
    ca_b: TestCa,
    /// Cluster A's view: its own bundle, B's federated.
    shared: SharedTrustBundle,
}

fn federation() -> Federation {
    let (ca_a, ca_b) = (TestCa::new("root A"), TestCa::new("root B"));
    let shared = SharedTrustBundle::new(bundle(&ca_a, A));
    shared
        .store_federated([bundle(&ca_b, B)])
        .expect("federate B");
    Federation { ca_a, ca_b, shared }
}

#[test]
fn a_federated_identity_verifies_against_its_own_trust_domain_only() {
    let f = federation();
    let scraper = f.ca_b.leaf(SCRAPER_B);
    verify(&f.shared, PeerCheck::AnyTrusted, &scraper).expect("B's identity, B's root");
    verify(&f.shared, PeerCheck::AnyTrusted, &f.ca_a.leaf(TRAINER_A)).expect("local identity");
    let td_a = parse_trust_domain(A).expect("td");
    let local_only = verify(&f.shared, PeerCheck::TrustDomain(td_a), &scraper)
        .expect_err("a local-only check refuses B");
    assert!(local_only.contains("not accepted here"), "{local_only}");
}

#[test]
fn a_root_never_vouches_for_another_trust_domains_identity() {
    let f = federation();
    // B's root signs a certificate claiming A's trainer: verified against A's roots, refused.
    let forged = f.ca_b.leaf(TRAINER_A);
    let err = verify(&f.shared, PeerCheck::AnyTrusted, &forged).expect_err("forged");
    assert!(err.contains("does not verify"), "{err}");
    // And A's root cannot speak for B.
    let forged = f.ca_a.leaf(SCRAPER_B);
    let err = verify(&f.shared, PeerCheck::AnyTrusted, &forged).expect_err("forged");
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn an_unfederated_trust_domain_is_refused_by_name() {
    let f = federation();
    let scraper = f.ca_b.leaf(SCRAPER_B);
    f.shared.store_federated([]).expect("federation removed");
    let err = verify(&f.shared, PeerCheck::AnyTrusted, &scraper).expect_err("no bundle for B");
    assert!(
        err.contains("trust domain cluster-b.example is not federated"),
        "{err}"
    );
    // The local trust domain is unaffected.
    verify(&f.shared, PeerCheck::AnyTrusted, &f.ca_a.leaf(TRAINER_A)).expect("local");
}

#[test]
fn federated_bundles_cannot_replace_the_local_one_and_a_refusal_changes_nothing() {
    let f = federation();
    let rogue = TestCa::new("rogue");
    let err = f
        .shared
        .store_federated([bundle(&f.ca_b, B), bundle(&rogue, A)])
        .expect_err("a federated bundle for the local trust domain");
    assert!(err.to_string().contains("is the local one"), "{err}");
    let err = f
        .shared
        .store_federated([bundle(&f.ca_b, B), bundle(&rogue, B)])
        .expect_err("two bundles for B");
    assert!(err.to_string().contains("two federated bundles"), "{err}");
    // The last good set is still in force: B's real root, not the rogue one.
    assert_eq!(f.shared.federated().len(), 1);
    verify(&f.shared, PeerCheck::AnyTrusted, &f.ca_b.leaf(SCRAPER_B)).expect("B still trusted");
    let err = verify(&f.shared, PeerCheck::AnyTrusted, &rogue.leaf(TRAINER_A)).expect_err("rogue");
    assert!(err.contains("does not verify"), "{err}");
}
