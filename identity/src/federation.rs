//! SPIFFE bundle documents (SPIFFE Trust Domain and Bundle, §4): the JWK Set a bundle
//! endpoint serves. Membrane reads and writes the X.509 part: one key per root, `use`
//! `x509-svid`, the root in `x5c` (exactly one standard-base64 DER certificate) and its public
//! key as JWK parameters; `spiffe_sequence` and `spiffe_refresh_hint` (seconds) at the top.
//!
//! Parsing is strict and total: a document over [`MAX_DOCUMENT`], not a JSON object, with a
//! malformed X.509 key (bad base64, not exactly one `x5c`, not a CA certificate, JWK
//! parameters that are not the certificate's key) or with no X.509 root at all is rejected
//! *whole* — the caller keeps the bundle it had. Keys of another `use` (`jwt-svid`, as SPIRE
//! serves beside its X.509 roots), of a `use` this version does not know, or with no `use` at
//! all are counted and ignored, as the SPIFFE bundle format asks of consumers: ignoring a key
//! can only ever trust less.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::bundle::{BundleError, TrustBundle};
use crate::spiffe_id::TrustDomain;
use crate::svid;

/// Largest document accepted.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// Largest `spiffe_refresh_hint` accepted (a week).
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a bundle document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleDocError {
    /// Larger than [`MAX_DOCUMENT`].
    #[error("bundle document of {0} bytes is over the {MAX_DOCUMENT}-byte limit")]
    TooLarge(usize),
    /// Not JSON, or not a JSON object with a `keys` array.
    #[error("bundle document is not a JWK Set: {0}")]
    NotJwks(String),
    /// A top-level SPIFFE parameter is malformed.
    #[error("bundle document field {field}: {message}")]
    Field {
        /// `spiffe_sequence` or `spiffe_refresh_hint`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// One key is malformed.
    #[error("bundle document keys[{index}]: {message}")]
    Key {
        /// Its position in `keys`.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// No `x509-svid` key: such a bundle would trust nothing.
    #[error("bundle document has no x509-svid key")]
    NoX509Roots,
}

/// A parsed bundle document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleDocument {
    /// The trust domain it was fetched for.
    pub trust_domain: TrustDomain,
    /// `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Option<Duration>,
    /// The X.509 roots, DER, duplicates removed.
    pub x509_roots: Vec<CertificateDer<'static>>,
    /// `jwt-svid` keys seen (Membrane does not use JWT-SVIDs).
    pub jwt_keys: usize,
    /// Keys with an unknown `use`, or none, ignored.
    pub ignored_keys: usize,
}

impl BundleDocument {
    /// Parses `json` as the bundle of `trust_domain`.
    pub fn parse(trust_domain: &TrustDomain, json: &[u8]) -> Result<Self, BundleDocError> {
        if json.len() > MAX_DOCUMENT {
            return Err(BundleDocError::TooLarge(json.len()));
        }
        let value: Value =
            serde_json::from_slice(json).map_err(|e| BundleDocError::NotJwks(e.to_string()))?;
        let Value::Object(top) = value else {
            return Err(BundleDocError::NotJwks("not a JSON object".into()));
        };
        let Some(Value::Array(keys)) = top.get("keys") else {
            return Err(BundleDocError::NotJwks("no `keys` array".into()));
        };
        let sequence = match top.get("spiffe_sequence") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| BundleDocError::Field {
                field: "spiffe_sequence",
                message: "must be a non-negative integer".into(),
            })?),
        };
        let refresh_hint = match top.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => {
                let secs = v
                    .as_u64()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| BundleDocError::Field {
                        field: "spiffe_refresh_hint",
                        message: "must be a positive number of seconds".into(),
                    })?;
                let hint = Duration::from_secs(secs);
                if hint > MAX_REFRESH_HINT {
                    return Err(BundleDocError::Field {
                        field: "spiffe_refresh_hint",
                        message: format!("{secs} s is over a week"),
                    });
                }
                Some(hint)
            }
        };
        let mut x509_roots: Vec<CertificateDer<'static>> = Vec::new();
        let (mut jwt_keys, mut ignored_keys) = (0, 0);
        for (index, key) in keys.iter().enumerate() {
            let err = |message: String| BundleDocError::Key { index, message };
            let Value::Object(key) = key else {
                return Err(err("not a JSON object".into()));
            };
            match key.get("use").map(Value::as_str) {
                None => ignored_keys += 1,
                Some(None) => return Err(err("`use` is not a string".into())),
                Some(Some("x509-svid")) => {
                    let root = x509_root(key).map_err(err)?;
                    if !x509_roots.contains(&root) {
                        x509_roots.push(root);
                    }
                }
                Some(Some("jwt-svid")) => jwt_keys += 1,
                Some(Some(_)) => ignored_keys += 1,
            }
        }
        if x509_roots.is_empty() {
            return Err(BundleDocError::NoX509Roots);
        }
        Ok(Self {
            trust_domain: trust_domain.clone(),
            sequence,
            refresh_hint,
            x509_roots,
            jwt_keys,
            ignored_keys,
        })
    }

    /// The roots as a trust bundle of the document's trust domain.
    pub fn to_trust_bundle(&self) -> Result<TrustBundle, BundleError> {
        TrustBundle::new(self.trust_domain.clone(), self.x509_roots.iter().cloned())
    }
}

/// The root of one `x509-svid` key, checked against the key's JWK parameters.
fn x509_root(key: &Map<String, Value>) -> Result<CertificateDer<'static>, String> {
    let Some(Value::Array(x5c)) = key.get("x5c") else {
        return Err("an x509-svid key needs an `x5c` array".into());
    };
    let [cert] = x5c.as_slice() else {
        return Err(format!(
            "`x5c` must hold exactly one certificate, not {}",
            x5c.len()
        ));
    };
    let b64 = cert.as_str().ok_or("`x5c[0]` is not a string")?;
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("`x5c[0]` is not base64: {e}"))?;
    svid::check_ca_certificate(&der).map_err(|e| format!("`x5c[0]`: {e}"))?;
    let expected = jwk_params(&der)?;
    let kty = key.get("kty").and_then(Value::as_str).ok_or("no `kty`")?;
    if expected.get("kty").and_then(Value::as_str) != Some(kty) {
        return Err(format!("`kty` {kty} is not the certificate's key type"));
    }
    for (name, want) in &expected {
        if let Some(got) = key.get(name)
            && got != want
        {
            return Err(format!("`{name}` is not the certificate's public key"));
        }
    }
    Ok(CertificateDer::from(der))
}

/// The JWK parameters of a certificate's public key (EC P-256/P-384 or RSA).
fn jwk_params(der: &[u8]) -> Result<Map<String, Value>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
    let spki = cert.public_key();
    let b64 = |bytes: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(bytes));
    let mut params = Map::new();
    match spki.parsed().map_err(|e| format!("public key: {e}"))? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let (crv, len) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data.first() != Some(&4) {
                return Err("EC point is not uncompressed".into());
            }
            let (x, y) = data[1..].split_at(len);
            params.insert("kty".into(), "EC".into());
            params.insert("crv".into(), crv.into());
            params.insert("x".into(), b64(x));
            params.insert("y".into(), b64(y));
        }
        PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| -> Vec<u8> {
                let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            params.insert("kty".into(), "RSA".into());
            params.insert("n".into(), b64(&trim(rsa.modulus)));
            params.insert("e".into(), b64(&trim(rsa.exponent)));
        }
        _ => return Err("unsupported public key type (EC P-256/P-384 or RSA)".into()),
    }
    Ok(params)
}

/// The bundle document for `bundle` (what a bundle endpoint serves). A root whose key type
/// has no JWK form here (not EC P-256/P-384 or RSA) is left out and named in the error list.
pub fn bundle_document(
    bundle: &TrustBundle,
    sequence: u64,
    refresh_hint: Duration,
) -> (String, Vec<String>) {
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for root in bundle.roots() {
        match jwk_params(root) {
            Ok(mut key) => {
                key.insert("use".into(), "x509-svid".into());
                key.insert("x5c".into(), json!([STANDARD.encode(root)]));
                keys.push(Value::Object(key));
            }
            Err(e) => skipped.push(e),
        }
    }
    let doc = json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs().max(1),
    });
    (doc.to_string(), skipped)
}
