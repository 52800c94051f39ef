use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::federation::test_roots::{bundle, root_der};

fn federation(url: &str, bootstrap: &TrustBundle) -> TrustFederation {
    super::super::spec::parse(serde_json::json!({
        "apiVersion": "security.membrane.dev/v1",
        "kind": "TrustFederation",
        "metadata": {"name": "cluster-b"},
        "spec": {
            "trustDomain": "cluster-b.example",
            "bundleEndpoint": {
                "url": url,
                "spiffeId": "spiffe://cluster-b.example/ns/membrane-system/sa/membrane-ca",
            },
            "bootstrapBundle": bootstrap.to_pem(),
        },
    }))
    .expect("valid federation")
}

#[test]
fn a_saved_bundle_comes_back_with_its_sequence_private_on_disk() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::new(dir.path());
    let (boot, next) = (root_der(), root_der());
    let fed = federation("https://192.0.2.10:15015/", &bundle(&[&boot]));
    assert!(store.load(&fed).expect("nothing saved").is_none());

    let fetched = bundle(&[&boot, &next]);
    store.save(&fed, &fetched, Some(42)).expect("saved");
    let restored = store.load(&fed).expect("readable").expect("saved");
    assert_eq!(restored.bundle, fetched);
    assert_eq!(restored.sequence, Some(42));
    assert!(restored.age < Duration::from_secs(5), "{:?}", restored.age);

    let file = dir.path().join("federation/cluster-b.example.json");
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&dir.path().join("federation")), 0o700);

    store.remove(&fed.trust_domain);
    assert!(!file.exists());
    assert!(store.load(&fed).expect("gone").is_none());
}

#[test]
fn a_record_of_other_trust_settings_is_not_used() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::new(dir.path());
    let (boot, other) = (root_der(), root_der());
    let fed = federation("https://192.0.2.10:15015/", &bundle(&[&boot]));
    store
        .save(&fed, &bundle(&[&boot, &other]), Some(7))
        .expect("saved");
    // Another endpoint, or another bootstrap bundle: a different federation as far as
    // trust goes.
    let moved = federation("https://192.0.2.11:15015/", &bundle(&[&boot]));
    assert!(store.load(&moved).expect("readable").is_none());
    let rebootstrapped = federation("https://192.0.2.10:15015/", &bundle(&[&other]));
    assert!(store.load(&rebootstrapped).expect("readable").is_none());
    assert!(store.load(&fed).expect("readable").is_some());
}

#[test]
fn a_damaged_record_is_an_error_and_never_trusted_in_part() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::new(dir.path());
    let boot = root_der();
    let fed = federation("https://192.0.2.10:15015/", &bundle(&[&boot]));
    store.save(&fed, &bundle(&[&boot]), Some(1)).expect("saved");
    let file = dir.path().join("federation/cluster-b.example.json");
    let good = std::fs::read_to_string(&file).expect("read");
    let damaged = [
        String::new(),
        "{".into(),
        "[]".into(),
        good.replace("\"format\": 1", "\"format\": 2"),
        good.replace("BEGIN CERTIFICATE", "BEGIN NOTHING"),
        good.replace("MII", "!!!"),
        "x".repeat((MAX_RECORD + 1) as usize),
    ];
    for text in damaged {
        std::fs::write(&file, &text).expect("write");
        let result = store.load(&fed);
        assert!(
            result.is_err(),
            "accepted {:?}: {result:?}",
            &text[..text.len().min(60)]
        );
    }
}

#[test]
fn records_of_federations_gone_are_removed_and_a_disabled_store_keeps_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::new(dir.path());
    let boot = root_der();
    let fed = federation("https://192.0.2.10:15015/", &bundle(&[&boot]));
    store.save(&fed, &bundle(&[&boot]), None).expect("saved");
    store.retain(&[&fed.trust_domain]);
    assert!(store.load(&fed).expect("kept").is_some());
    store.retain(&[]);
    assert!(store.load(&fed).expect("readable").is_none());

    let off = Store::default();
    off.save(&fed, &bundle(&[&boot]), None).expect("no-op");
    assert!(off.load(&fed).expect("no-op").is_none());
}
