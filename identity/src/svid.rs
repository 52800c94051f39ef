//! X.509-SVIDs: parsing, the checks of the X509-SVID specification, and chain verification.
//!
//! [`parse_leaf`] checks what a leaf must carry on its own (exactly one URI SAN holding a
//! canonical SPIFFE ID, not a CA, `digitalSignature` and no signing usages); [`verify_chain`]
//! adds the validity window and the path to one of a trust domain's roots (a trust bundle's). [`WorkloadSvid`] is a
//! leaf plus the private key that goes with it, ready to serve.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::spiffe_id::{IdentityError, SpiffeId, TrustDomain, WorkloadIdentity, parse_spiffe_id};

/// Why a certificate is not an acceptable X.509-SVID (or root).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The chain is empty.
    #[error("no certificate presented")]
    NoCertificate,
    /// The DER does not parse as one X.509 certificate.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN or more than one.
    #[error("an X.509-SVID must carry exactly one URI SAN; found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[source] IdentityError),
    /// The leaf is marked as a CA.
    #[error("leaf certificate must not be a CA")]
    LeafIsCa,
    /// The leaf's key usage is wrong.
    #[error("leaf key usage: {0}")]
    KeyUsage(&'static str),
    /// A root is not a CA certificate that may sign certificates.
    #[error("not a CA certificate: {0}")]
    NotCa(&'static str),
    /// The certificate is not yet or no longer valid.
    #[error(
        "certificate is outside its validity window (valid {not_before} to {not_after} unix seconds)"
    )]
    Expired {
        /// Start of validity, unix seconds.
        not_before: i64,
        /// End of validity, unix seconds.
        not_after: i64,
    },
    /// The SPIFFE ID belongs to another trust domain than the bundle.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The presented ID.
        id: String,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// No path from the leaf to a root of the bundle (bad signature, unknown issuer, bad EKU…).
    #[error("chain does not verify against the trust bundle: {0}")]
    Untrusted(String),
    /// The private key does not belong to the leaf, or is of an unsupported type.
    #[error("private key does not match the certificate: {0}")]
    KeyMismatch(String),
}

/// The TLS role a certificate is verified for (selects the extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a TLS server.
    Server,
    /// The peer is a TLS client.
    Client,
}

/// What a parsed leaf says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The SPIFFE ID of the URI SAN.
    pub spiffe_id: SpiffeId,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

fn parse_one(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(
            "trailing bytes after certificate".into(),
        ));
    }
    Ok(cert)
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Parses a leaf certificate and applies the X509-SVID rules that need no trust bundle.
pub fn parse_leaf(der: &[u8]) -> Result<SvidInfo, SvidError> {
    let cert = parse_one(der)?;
    let mut uris = Vec::new();
    let mut is_ca = false;
    let mut key_usage = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                }));
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => key_usage = Some(*ku),
            ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
                if ext.critical =>
            {
                return Err(SvidError::Malformed(format!(
                    "unsupported critical extension {}",
                    ext.oid
                )));
            }
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let spiffe_id = parse_spiffe_id(uri).map_err(SvidError::BadSpiffeId)?;
    if is_ca {
        return Err(SvidError::LeafIsCa);
    }
    let ku = key_usage.ok_or(SvidError::KeyUsage("key usage extension missing"))?;
    if !ku.digital_signature() {
        return Err(SvidError::KeyUsage("digitalSignature must be set"));
    }
    if ku.key_cert_sign() || ku.crl_sign() {
        return Err(SvidError::KeyUsage(
            "keyCertSign and cRLSign must not be set",
        ));
    }
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(SvidInfo {
        spiffe_id,
        serial,
        not_before: unix_to_system(cert.validity().not_before.timestamp()),
        not_after: unix_to_system(cert.validity().not_after.timestamp()),
    })
}

/// Checks that a certificate is a CA that may sign leaves (basic constraints CA, keyCertSign).
pub fn check_ca_certificate(der: &[u8]) -> Result<(), SvidError> {
    let cert = parse_one(der)?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(SvidError::NotCa("basic constraints do not say CA")),
        Err(_) => return Err(SvidError::NotCa("duplicate basic constraints")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(SvidError::NotCa("key usage lacks keyCertSign"))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(SvidError::NotCa("duplicate key usage")),
    }
}

/// Verifies a presented chain (leaf first) at `now` against `roots`, the roots of
/// `trust_domain`, and returns the SPIFFE ID. Callers holding a trust bundle use
/// [`TrustBundle::verify_svid_chain`](crate::TrustBundle::verify_svid_chain).
pub fn verify_chain(
    trust_domain: &TrustDomain,
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    let info = parse_leaf(leaf)?;
    if info.spiffe_id.trust_domain() != trust_domain {
        return Err(SvidError::WrongTrustDomain {
            id: info.spiffe_id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    let now_secs = now.as_secs();
    let (nb, na) = (secs(info.not_before), secs(info.not_after));
    if now_secs < nb || now_secs > na {
        return Err(SvidError::Expired {
            not_before: i64::try_from(nb).unwrap_or(i64::MAX),
            not_after: i64::try_from(na).unwrap_or(i64::MAX),
        });
    }
    let anchors = roots
        .iter()
        .map(|root| webpki::anchor_from_trusted_cert(root).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Untrusted(format!("unusable root: {e}")))?;
    let end_entity =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    end_entity
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(|e| SvidError::Untrusted(e.to_string()))?;
    Ok(info.spiffe_id)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A workload's X.509-SVID together with its private key: what a TLS endpoint serves.
#[derive(Debug, Clone)]
pub struct WorkloadSvid {
    identity: WorkloadIdentity,
    info: SvidInfo,
    certified: Arc<CertifiedKey>,
}

// === impl WorkloadSvid ===

impl WorkloadSvid {
    /// Pairs a chain (leaf first) with its private key, checking that the key matches the leaf
    /// and that the leaf is a valid X.509-SVID for a workload identity.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        let info = parse_leaf(leaf)?;
        let identity = WorkloadIdentity::from_spiffe_id(info.spiffe_id.clone())
            .map_err(SvidError::BadSpiffeId)?;
        let certified = CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| SvidError::KeyMismatch(e.to_string()))?;
        Ok(Self {
            identity,
            info,
            certified: Arc::new(certified),
        })
    }

    /// The identity this SVID proves.
    pub fn identity(&self) -> &WorkloadIdentity {
        &self.identity
    }

    /// Serial, validity and SPIFFE ID of the leaf.
    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The chain and signing key in the form rustls serves.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Whether the leaf is still valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.info.not_before <= now && now <= self.info.not_after
    }
}
