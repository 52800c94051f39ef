//! A connection's verified chain checked again after the bundles change: still trusted while
//! its root stays (whatever else changed), refused once its root is removed or its trust
//! domain is no longer federated, and checked once per change, not at every use.

mod common;

use common::TestCa;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::svid::Usage;
use membrane_identity::{PeerTrust, SharedTrustBundle, TrustBundle, Untrusted};
use rustls_pki_types::UnixTime;

const LOCAL: &str = "spiffe://cluster.local/ns/training/sa/trainer";
const REMOTE: &str = "spiffe://cluster-b.example/ns/training/sa/scraper";

fn remote_bundle(ca: &TestCa) -> TrustBundle {
    let td = parse_trust_domain("cluster-b.example").expect("td");
    TrustBundle::new(td, [ca.cert.clone()]).expect("bundle")
}

#[test]
fn a_chain_stays_trusted_while_its_root_does_and_no_longer_once_it_is_removed() {
    let (old, new) = (TestCa::new("old root"), TestCa::new("new root"));
    let shared = SharedTrustBundle::new(old.bundle());
    let leaf = old.leaf(LOCAL);
    let trust = PeerTrust::new(&leaf.chain, Usage::Client, shared.generation()).expect("a leaf");
    let now = UnixTime::now();
    trust.recheck(&shared, now).expect("nothing changed");

    // Rotation, phase one: both roots. The chain still verifies.
    let mut both = old.bundle();
    both.add_root(new.cert.clone()).expect("add");
    shared.store(both.clone());
    trust
        .recheck(&shared, now)
        .expect("its root is still there");
    // A change elsewhere (a federated trust domain) leaves the same roots: still trusted.
    let remote = TestCa::new("remote root");
    shared
        .store_federated([remote_bundle(&remote)])
        .expect("federate");
    trust.recheck(&shared, now).expect("same roots");

    // Phase two: the old root removed. The connection's chain is refused from now on.
    let mut only_new = both;
    only_new.remove_root(&old.cert).expect("remove");
    shared.store(only_new);
    let refused = trust.recheck(&shared, now);
    assert!(matches!(refused, Err(Untrusted::Chain(_))), "{refused:?}");
    assert!(
        trust.recheck(&shared, now).is_err(),
        "refused again, never remembered as checked"
    );

    // A chain of the new root, made before the change, verifies after it.
    let fresh = new.leaf(LOCAL);
    let before = PeerTrust::new(&fresh.chain, Usage::Client, 0).expect("a leaf");
    before
        .recheck(&shared, now)
        .expect("issued under the new root");
}

#[test]
fn a_trust_domain_no_longer_federated_is_refused_by_name() {
    let (local, remote) = (TestCa::new("local root"), TestCa::new("remote root"));
    let shared = SharedTrustBundle::new(local.bundle());
    shared
        .store_federated([remote_bundle(&remote)])
        .expect("federate");
    let leaf = remote.leaf(REMOTE);
    let trust = PeerTrust::new(&leaf.chain, Usage::Client, shared.generation()).expect("a leaf");
    shared.store_federated([]).expect("unfederate");
    let refused = trust.recheck(&shared, UnixTime::now());
    assert!(
        matches!(&refused, Err(Untrusted::NotFederated(td)) if td.to_string() == "cluster-b.example"),
        "{refused:?}"
    );
}

#[test]
fn a_chain_that_expired_is_refused_at_the_next_change() {
    let ca = TestCa::new("root");
    let shared = SharedTrustBundle::new(ca.bundle());
    let leaf = ca.leaf(LOCAL);
    let trust = PeerTrust::new(&leaf.chain, Usage::Client, shared.generation()).expect("a leaf");
    let other = TestCa::new("another root");
    let mut both = ca.bundle();
    both.add_root(other.cert.clone()).expect("add");
    shared.store(both);
    // Two hours on: the leaf (valid for one) no longer verifies against the changed bundle.
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        UnixTime::now().as_secs() + 2 * 3600,
    ));
    assert!(matches!(
        trust.recheck(&shared, later),
        Err(Untrusted::Chain(_))
    ));
    assert!(PeerTrust::new(&[], Usage::Client, 0).is_err(), "no leaf");
}
