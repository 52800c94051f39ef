//! The X509-SVID rules, one test per rule, over certificates minted for the purpose.

mod common;

use common::{TestCa, td};
use membrane_identity::svid::{self, SvidError, Usage};
use membrane_identity::{TrustBundle, WorkloadSvid, crypto_provider};
use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::UnixTime;
use time::{Duration, OffsetDateTime};

const ID: &str = "spiffe://cluster.local/ns/training/sa/trainer";

fn verify(ca: &TestCa, leaf: &common::Leaf) -> Result<String, SvidError> {
    ca.bundle()
        .verify_svid_chain(&leaf.chain, UnixTime::now(), Usage::Client)
        .map(|id| id.to_string())
}

#[test]
fn valid_svid_verifies_and_parses() {
    let ca = TestCa::new("root");
    let leaf = ca.leaf(ID);
    assert_eq!(verify(&ca, &leaf).expect("valid"), ID);
    assert_eq!(
        ca.bundle()
            .verify_svid_chain(&leaf.chain, UnixTime::now(), Usage::Server)
            .expect("server usage too")
            .to_string(),
        ID
    );
    let svid = WorkloadSvid::new(leaf.chain.clone(), leaf.key.clone_key(), &crypto_provider())
        .expect("key matches");
    assert_eq!(svid.identity().to_string(), ID);
    assert!(svid.is_valid_at(std::time::SystemTime::now()));
    assert!(!svid.info().serial.is_empty());
}

#[test]
fn requires_exactly_one_uri_san() {
    let ca = TestCa::new("root");
    let mut none = TestCa::params(ID);
    none.subject_alt_names = vec![SanType::DnsName("a.example".try_into().expect("ia5"))];
    assert_eq!(
        verify(&ca, &ca.issue(&none)),
        Err(SvidError::UriSanCount(0))
    );

    let mut two = TestCa::params(ID);
    two.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/x/sa/y".try_into().expect("ia5"),
    ));
    assert_eq!(verify(&ca, &ca.issue(&two)), Err(SvidError::UriSanCount(2)));

    // Other SAN types beside the one URI are allowed by the X509-SVID spec.
    let mut with_dns = TestCa::params(ID);
    with_dns
        .subject_alt_names
        .push(SanType::DnsName("a.example".try_into().expect("ia5")));
    assert_eq!(verify(&ca, &ca.issue(&with_dns)).expect("valid"), ID);
}

#[test]
fn uri_san_must_be_a_canonical_spiffe_id() {
    let ca = TestCa::new("root");
    for bad in [
        "https://cluster.local/ns/a/sa/b",
        "spiffe://Cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b/",
    ] {
        let leaf = ca.leaf(bad);
        assert!(
            matches!(verify(&ca, &leaf), Err(SvidError::BadSpiffeId(_))),
            "{bad}"
        );
    }
}

#[test]
fn leaf_must_not_be_a_ca_and_must_sign_only_handshakes() {
    let ca = TestCa::new("root");
    let mut is_ca = TestCa::params(ID);
    is_ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(verify(&ca, &ca.issue(&is_ca)), Err(SvidError::LeafIsCa));

    let mut no_ds = TestCa::params(ID);
    no_ds.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(
        verify(&ca, &ca.issue(&no_ds)),
        Err(SvidError::KeyUsage(_))
    ));

    let mut cert_sign = TestCa::params(ID);
    cert_sign.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    assert!(matches!(
        verify(&ca, &ca.issue(&cert_sign)),
        Err(SvidError::KeyUsage(_))
    ));

    let mut no_ku = TestCa::params(ID);
    no_ku.key_usages = vec![];
    assert!(matches!(
        verify(&ca, &ca.issue(&no_ku)),
        Err(SvidError::KeyUsage(_))
    ));
}

#[test]
fn validity_window_is_enforced() {
    let ca = TestCa::new("root");
    let now = OffsetDateTime::now_utc();
    let mut expired = TestCa::params(ID);
    expired.not_before = now - Duration::hours(2);
    expired.not_after = now - Duration::hours(1);
    assert!(matches!(
        verify(&ca, &ca.issue(&expired)),
        Err(SvidError::Expired { .. })
    ));

    let mut future = TestCa::params(ID);
    future.not_before = now + Duration::hours(1);
    future.not_after = now + Duration::hours(2);
    assert!(matches!(
        verify(&ca, &ca.issue(&future)),
        Err(SvidError::Expired { .. })
    ));
}

#[test]
fn chain_must_reach_a_root_of_the_bundle() {
    let ca = TestCa::new("root");
    let other = TestCa::new("other root");
    let leaf = other.leaf(ID);
    assert!(matches!(verify(&ca, &leaf), Err(SvidError::Untrusted(_))));
    assert!(matches!(
        ca.bundle()
            .verify_svid_chain(&[], UnixTime::now(), Usage::Client),
        Err(SvidError::NoCertificate)
    ));
}

#[test]
fn bundle_with_two_roots_accepts_both() {
    let old = TestCa::new("old root");
    let new = TestCa::new("new root");
    let mut bundle = old.bundle();
    assert!(bundle.add_root(new.cert.clone()).expect("CA cert"));
    assert!(
        !bundle.add_root(new.cert.clone()).expect("CA cert"),
        "no duplicates"
    );
    assert_eq!(bundle.roots().len(), 2);
    for ca in [&old, &new] {
        let leaf = ca.leaf(ID);
        bundle
            .verify_svid_chain(&leaf.chain, UnixTime::now(), Usage::Client)
            .expect("either root");
    }
    // Removing the old root stops accepting its leaves; the last root cannot go.
    assert!(bundle.remove_root(&old.cert).expect("removable"));
    assert!(matches!(
        bundle.verify_svid_chain(&old.leaf(ID).chain, UnixTime::now(), Usage::Client),
        Err(SvidError::Untrusted(_))
    ));
    assert!(bundle.remove_root(&new.cert).is_err());
    // Round trip through PEM keeps both roots.
    let mut two = old.bundle();
    two.add_root(new.cert.clone()).expect("CA cert");
    let back = TrustBundle::from_pem(td(), two.to_pem().as_bytes()).expect("pem");
    assert_eq!(back, two);
}

#[test]
fn bundle_refuses_leaf_as_root() {
    let ca = TestCa::new("root");
    let leaf = ca.leaf(ID);
    assert!(TrustBundle::new(td(), leaf.chain.clone()).is_err());
    assert!(TrustBundle::new(td(), []).is_err());
    assert!(TrustBundle::from_pem(td(), b"garbage").is_err());
}

#[test]
fn wrong_trust_domain_is_refused() {
    let ca = TestCa::new("root");
    let leaf = ca.leaf("spiffe://other.domain/ns/a/sa/b");
    assert!(matches!(
        verify(&ca, &leaf),
        Err(SvidError::WrongTrustDomain { .. })
    ));
}

#[test]
fn key_must_match_leaf() {
    let ca = TestCa::new("root");
    let a = ca.leaf(ID);
    let b = ca.leaf(ID);
    assert!(matches!(
        WorkloadSvid::new(a.chain, b.key, &crypto_provider()),
        Err(SvidError::KeyMismatch(_))
    ));
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for der in [&b""[..], b"\x30\x03\x02\x01\x01", &[0xffu8; 64]] {
        assert!(svid::parse_leaf(der).is_err());
    }
}
