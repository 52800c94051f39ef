//! Certificate signing requests: generated on the node, validated by the CA.
//!
//! [`generate`] makes a fresh ECDSA P-256 key and a CSR naming one workload identity; the key
//! is returned to the caller and never serialised into the request. [`ValidatedCsr::parse`] is
//! the CA's gate: it accepts a CSR only if it is small, well-formed, self-signed with a P-256,
//! P-384 or Ed25519 key, and names exactly one SAN — a workload SPIFFE ID of the CA's trust
//! domain. Nothing else in the request (subject, extensions, key usages) is ever copied into a
//! certificate: the CA decides those.

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_ED25519, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::spiffe_id::{IdentityError, TrustDomain, WorkloadIdentity, parse_spiffe_id};

/// Largest CSR the CA looks at, in bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a CSR was refused. Every variant is the caller's fault (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The request is larger than [`MAX_CSR_LEN`].
    #[error("CSR is {len} bytes; the limit is {MAX_CSR_LEN}")]
    TooLarge {
        /// Size of the request.
        len: usize,
    },
    /// The DER does not parse as a PKCS#10 request.
    #[error("CSR is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    /// The request's self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// The key is not ECDSA P-256, P-384 or Ed25519.
    #[error("CSR key type not accepted ({0}); use ECDSA P-256, P-384 or Ed25519")]
    UnsupportedKey(String),
    /// The request names no SAN, or more than one.
    #[error("CSR must name exactly one subject alternative name; found {0}")]
    SanCount(usize),
    /// The one SAN is not a URI.
    #[error("CSR's subject alternative name must be a spiffe:// URI")]
    SanNotUri,
    /// The URI SAN is not a workload SPIFFE ID.
    #[error("CSR's SPIFFE ID is invalid: {0}")]
    BadIdentity(#[source] IdentityError),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("CSR asks for {id}, which is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The requested ID.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// Key generation or encoding failed on the requesting side.
    #[error("could not build the CSR: {0}")]
    Generate(String),
}

/// The public key of a validated CSR, in the form rcgen signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A CSR that passed every check: the identity it asks for and the key to certify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCsr {
    identity: WorkloadIdentity,
    public_key: CsrPublicKey,
}

// === impl ValidatedCsr ===

impl ValidatedCsr {
    /// Parses and checks a DER CSR for trust domain `trust_domain`.
    pub fn parse(der: &[u8], trust_domain: &TrustDomain) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge { len: der.len() });
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(
                "trailing bytes after the request".into(),
            ));
        }
        let info = &csr.certification_request_info;
        let alg = key_algorithm(info)?;
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

        let mut names: Vec<&GeneralName<'_>> = Vec::new();
        for attr in info.iter_attributes() {
            if let x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(req) =
                attr.parsed_attribute()
            {
                for ext in &req.extensions {
                    if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                        names.extend(san.general_names.iter());
                    }
                }
            }
        }
        let [name] = names.as_slice() else {
            return Err(CsrError::SanCount(names.len()));
        };
        let GeneralName::URI(uri) = name else {
            return Err(CsrError::SanNotUri);
        };
        let id = parse_spiffe_id(uri).map_err(CsrError::BadIdentity)?;
        if id.trust_domain() != trust_domain {
            return Err(CsrError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        let identity = WorkloadIdentity::from_spiffe_id(id).map_err(CsrError::BadIdentity)?;
        Ok(Self {
            identity,
            public_key: CsrPublicKey {
                raw: info.subject_pki.subject_public_key.data.to_vec(),
                alg,
            },
        })
    }

    /// The identity the CSR asks for.
    pub fn identity(&self) -> &WorkloadIdentity {
        &self.identity
    }

    /// The key to certify.
    pub fn public_key(&self) -> &CsrPublicKey {
        &self.public_key
    }
}

fn key_algorithm(
    info: &x509_parser::certification_request::X509CertificationRequestInfo<'_>,
) -> Result<&'static SignatureAlgorithm, CsrError> {
    let alg = &info.subject_pki.algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            Ok(&PKCS_ECDSA_P256_SHA256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(&PKCS_ECDSA_P384_SHA384)
        } else {
            Err(CsrError::UnsupportedKey(format!("EC curve {curve}")))
        }
    } else if alg.algorithm == OID_SIG_ED25519 {
        Ok(&PKCS_ED25519)
    } else {
        Err(CsrError::UnsupportedKey(format!(
            "algorithm {}",
            alg.algorithm
        )))
    }
}

/// A freshly generated key pair and the CSR for it. The key stays with the caller.
pub struct GeneratedCsr {
    /// The DER request to send to the CA.
    pub csr: CertificateSigningRequestDer<'static>,
    /// The private key (PKCS#8). Never sent anywhere.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for GeneratedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCsr")
            .field("csr_len", &self.csr.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Generates an ECDSA P-256 key pair and a CSR for `identity`.
pub fn generate(identity: &WorkloadIdentity) -> Result<GeneratedCsr, CsrError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CsrError::Generate(e.to_string()))?;
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CsrError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CsrError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(GeneratedCsr {
        csr: csr.der().clone(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::parse_trust_domain;

    fn td() -> TrustDomain {
        parse_trust_domain("cluster.local").expect("valid")
    }

    fn ident() -> WorkloadIdentity {
        WorkloadIdentity::new(&td(), "training", "trainer").expect("valid")
    }

    fn csr_with(alg: &'static SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("keygen");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .serialize_request(&key)
            .expect("serialize")
            .der()
            .to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    #[test]
    fn generated_csr_validates() {
        let generated = generate(&ident()).expect("generate");
        let v = ValidatedCsr::parse(&generated.csr, &td()).expect("valid");
        assert_eq!(v.identity(), &ident());
        assert_eq!(v.public_key().algorithm(), &PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn accepts_p384_and_ed25519() {
        let id = "spiffe://cluster.local/ns/a/sa/b";
        for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
            let der = csr_with(alg, vec![uri(id)]);
            ValidatedCsr::parse(&der, &td()).expect("accepted key type");
        }
    }

    #[test]
    fn rejects_each_malformation() {
        let ok = "spiffe://cluster.local/ns/a/sa/b";
        type Case = (Vec<u8>, fn(&CsrError) -> bool);
        let cases: Vec<Case> = vec![
            (vec![], |e| matches!(e, CsrError::Malformed(_))),
            (b"not a csr".to_vec(), |e| {
                matches!(e, CsrError::Malformed(_))
            }),
            (vec![0x30; MAX_CSR_LEN + 1], |e| {
                matches!(e, CsrError::TooLarge { .. })
            }),
            (csr_with(&PKCS_ECDSA_P256_SHA256, vec![]), |e| {
                matches!(e, CsrError::SanCount(0))
            }),
            (
                csr_with(&PKCS_ECDSA_P256_SHA256, vec![uri(ok), uri(ok)]),
                |e| matches!(e, CsrError::SanCount(2)),
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![
                        uri(ok),
                        SanType::DnsName("a.example".try_into().expect("ia5")),
                    ],
                ),
                |e| matches!(e, CsrError::SanCount(2)),
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![SanType::DnsName("a.example".try_into().expect("ia5"))],
                ),
                |e| matches!(e, CsrError::SanNotUri),
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![uri("spiffe://other.domain/ns/a/sa/b")],
                ),
                |e| matches!(e, CsrError::ForeignTrustDomain { .. }),
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![uri("spiffe://cluster.local/x")],
                ),
                |e| matches!(e, CsrError::BadIdentity(_)),
            ),
            (
                csr_with(
                    &PKCS_ECDSA_P256_SHA256,
                    vec![uri("https://cluster.local/ns/a/sa/b")],
                ),
                |e| matches!(e, CsrError::BadIdentity(_)),
            ),
        ];
        for (i, (der, expected)) in cases.into_iter().enumerate() {
            let err = ValidatedCsr::parse(&der, &td()).expect_err("must be refused");
            assert!(expected(&err), "case {i}: unexpected error {err:?}");
        }
    }

    #[test]
    fn rejects_tampered_signature() {
        let mut der = csr_with(
            &PKCS_ECDSA_P256_SHA256,
            vec![uri("spiffe://cluster.local/ns/a/sa/b")],
        );
        // Flip a byte inside the signed SPIFFE ID: still parses, signature no longer matches.
        let pos = der
            .windows(5)
            .position(|w| w == b"ns/a/")
            .expect("id in CSR");
        der[pos + 3] = b'z';
        assert_eq!(
            ValidatedCsr::parse(&der, &td()).expect_err("tampered"),
            CsrError::BadSignature
        );
    }

    #[test]
    fn rejects_rsa_keys() {
        // RSA-2048 and ECDSA P-521 CSRs made once with openssl (ring generates neither).
        let pem = include_str!("../testdata/rsa-csr.pem");
        let der = pem::parse(pem).expect("pem").into_contents();
        assert!(matches!(
            ValidatedCsr::parse(&der, &td()),
            Err(CsrError::UnsupportedKey(_))
        ));
        let pem = include_str!("../testdata/p521-csr.pem");
        let der = pem::parse(pem).expect("pem").into_contents();
        assert!(matches!(
            ValidatedCsr::parse(&der, &td()),
            Err(CsrError::UnsupportedKey(_))
        ));
    }
}
