//! SPIFFE bundle documents: what Membrane serves parses with the `spiffe` crate's bundle types,
//! a document in the shape SPIRE's bundle endpoint serves (fixture: an EC and an RSA root and a
//! JWT key) is accepted, and every malformed document is refused whole.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::TestCa;
use membrane_identity::TrustBundle;
use membrane_identity::federation::{
    BundleDocError, BundleDocument, MAX_DOCUMENT, bundle_document,
};
use membrane_identity::spiffe_id::parse_trust_domain;
use serde_json::{Value, json};

const SPIRE_FIXTURE: &str = include_str!("fixtures/spire-bundle.json");

fn td() -> membrane_identity::TrustDomain {
    parse_trust_domain("example.org").expect("valid")
}

fn parse(doc: &Value) -> Result<BundleDocument, BundleDocError> {
    BundleDocument::parse(&td(), doc.to_string().as_bytes())
}

/// The document Membrane serves for two fresh roots, as JSON.
fn served() -> (Value, Vec<Vec<u8>>) {
    let (a, b) = (TestCa::new("root a"), TestCa::new("root b"));
    let bundle = TrustBundle::new(td(), [a.cert.clone(), b.cert.clone()]).expect("bundle");
    let (json, skipped) = bundle_document(&bundle, 7, Duration::from_secs(300));
    assert!(skipped.is_empty(), "{skipped:?}");
    let value = serde_json::from_str(&json).expect("served document is JSON");
    // In the bundle's (stable) order.
    (value, bundle.roots().map(|c| c.to_vec()).collect())
}

#[test]
fn the_served_document_parses_with_the_spiffe_crates_bundle_types() {
    let (doc, roots) = served();
    assert_eq!(doc["spiffe_sequence"], 7);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    // Read as any SPIFFE consumer reads it: every x509-svid key's `x5c` is one DER root.
    let x5c: Vec<Vec<u8>> = doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| {
            let certs = k["x5c"].as_array().expect("x5c");
            assert_eq!(certs.len(), 1, "{k}");
            STANDARD
                .decode(certs[0].as_str().expect("string"))
                .expect("standard base64")
        })
        .collect();
    let spiffe_td = spiffe::TrustDomain::new("example.org").expect("trust domain");
    let authorities: Vec<&[u8]> = x5c.iter().map(Vec::as_slice).collect();
    let bundle = spiffe::X509Bundle::from_x509_authorities(spiffe_td.clone(), &authorities)
        .expect("X509Bundle");
    let held: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(held, roots);
    let mut set = spiffe::X509BundleSet::new();
    set.add_bundle(bundle);
    assert!(set.get(&spiffe_td).is_some());
    // And Membrane reads back what it wrote.
    let parsed = parse(&doc).expect("round trip");
    assert_eq!(parsed.sequence, Some(7));
    assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(300)));
    let parsed_roots: Vec<Vec<u8>> = parsed.x509_roots.iter().map(|c| c.to_vec()).collect();
    assert_eq!(parsed_roots, roots);
}

#[test]
fn a_document_in_spires_format_is_accepted() {
    let doc = BundleDocument::parse(&td(), SPIRE_FIXTURE.as_bytes()).expect("SPIRE bundle");
    assert_eq!(doc.sequence, Some(42));
    assert_eq!(doc.refresh_hint, Some(Duration::from_secs(300)));
    assert_eq!(doc.jwt_keys, 1);
    assert_eq!(doc.ignored_keys, 0);
    let value: Value = serde_json::from_str(SPIRE_FIXTURE).expect("json");
    let expected: Vec<Vec<u8>> = value["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| {
            STANDARD
                .decode(k["x5c"][0].as_str().expect("x5c"))
                .expect("b64")
        })
        .collect();
    assert_eq!(expected.len(), 2, "the fixture holds an EC and an RSA root");
    let roots: Vec<Vec<u8>> = doc.x509_roots.iter().map(|c| c.to_vec()).collect();
    assert_eq!(roots, expected);
    let bundle = doc.to_trust_bundle().expect("trust bundle");
    assert_eq!(bundle.roots().len(), 2);
}

#[test]
fn keys_of_unknown_or_missing_use_are_ignored_not_trusted() {
    let (mut doc, roots) = served();
    let keys = doc["keys"].as_array_mut().expect("keys");
    // The same root without `use`, and under a use this version does not know: neither is
    // taken as an X.509 root, and neither spoils the document.
    let stranger = TestCa::new("stranger");
    let mut loose = keys[0].clone();
    loose["x5c"] = json!([STANDARD.encode(&stranger.cert)]);
    let mut no_use = loose.clone();
    no_use.as_object_mut().expect("object").remove("use");
    loose["use"] = json!("x509-future");
    keys.push(no_use);
    keys.push(loose);
    let parsed = parse(&doc).expect("accepted");
    assert_eq!(parsed.ignored_keys, 2);
    let parsed_roots: Vec<Vec<u8>> = parsed.x509_roots.iter().map(|c| c.to_vec()).collect();
    assert_eq!(parsed_roots, roots, "an ignored key added a root");
}

/// Spoils the first key of the served document with `f` and expects a refusal naming `want`.
fn refused(f: impl FnOnce(&mut Value), want: &str) {
    let (mut doc, _) = served();
    f(&mut doc);
    match parse(&doc) {
        Ok(parsed) => panic!("accepted a bad document ({want}): {parsed:?}"),
        Err(e) => assert!(e.to_string().contains(want), "{e} does not say {want}"),
    }
}

#[test]
fn a_malformed_key_refuses_the_whole_document() {
    let leaf = TestCa::new("issuer").leaf("spiffe://example.org/ns/a/sa/b");
    let other = TestCa::new("other");
    refused(
        |d| d["keys"][0]["x5c"] = json!(["not base64!"]),
        "not base64",
    );
    refused(|d| d["keys"][0]["x5c"] = json!([]), "exactly one");
    refused(
        |d| {
            let first = d["keys"][0]["x5c"][0].clone();
            d["keys"][0]["x5c"] = json!([first.clone(), first]);
        },
        "exactly one",
    );
    refused(
        |d| d["keys"][0]["x5c"] = json!([STANDARD.encode(&leaf.chain[0])]),
        "CA",
    );
    refused(
        |d| d["keys"][0]["x5c"] = json!([STANDARD.encode(b"\x30\x03\x02\x01\x00")]),
        "x5c[0]",
    );
    refused(|d| d["keys"][0]["kty"] = json!("RSA"), "kty");
    refused(
        |d| {
            d["keys"][0].as_object_mut().expect("object").remove("kty");
        },
        "kty",
    );
    // The JWK parameters name another key than the certificate's.
    refused(
        |d| {
            let (json, _) = bundle_document(
                &TrustBundle::new(td(), [other.cert.clone()]).expect("bundle"),
                1,
                Duration::from_secs(1),
            );
            let other_doc: Value = serde_json::from_str(&json).expect("json");
            d["keys"][0]["x"] = other_doc["keys"][0]["x"].clone();
        },
        "public key",
    );
    refused(|d| d["keys"][0]["use"] = json!(1), "`use` is not a string");
    refused(|d| d["keys"][1] = json!("a string"), "keys[1]");
}

#[test]
fn a_malformed_document_is_refused() {
    refused(|d| d["spiffe_sequence"] = json!(-1), "spiffe_sequence");
    refused(|d| d["spiffe_sequence"] = json!("7"), "spiffe_sequence");
    refused(
        |d| d["spiffe_refresh_hint"] = json!(0),
        "spiffe_refresh_hint",
    );
    refused(
        |d| d["spiffe_refresh_hint"] = json!(8 * 24 * 3600),
        "over a week",
    );
    refused(|d| d["keys"] = json!({}), "keys");
    refused(
        |d| {
            let keys = d["keys"].as_array_mut().expect("keys");
            keys.retain(|k| k["use"] != "x509-svid");
            keys.push(json!({"use": "jwt-svid", "kty": "EC", "kid": "k"}));
        },
        "no x509-svid key",
    );
    for garbage in [&b"[]"[..], b"", b"{", b"null", b"{\"keys\": 3}"] {
        assert!(
            BundleDocument::parse(&td(), garbage).is_err(),
            "accepted {:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    let huge = vec![b' '; MAX_DOCUMENT + 1];
    assert_eq!(
        BundleDocument::parse(&td(), &huge),
        Err(BundleDocError::TooLarge(MAX_DOCUMENT + 1))
    );
}
