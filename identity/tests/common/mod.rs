//! A throwaway CA for the identity tests: mints roots and leaves with chosen defects.
#![allow(dead_code, missing_docs)]

use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

pub fn td() -> TrustDomain {
    parse_trust_domain("cluster.local").expect("valid")
}

pub struct TestCa {
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed");
        Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(td(), [self.cert.clone()]).expect("bundle")
    }

    /// A well-formed SVID params for `uri`; tests then spoil one property.
    pub fn params(uri: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ia5"))];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(1);
        p.not_after = now + Duration::hours(1);
        p.use_authority_key_identifier_extension = true;
        p
    }

    pub fn issue(&self, params: &CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("keygen");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    pub fn leaf(&self, uri: &str) -> Leaf {
        self.issue(&Self::params(uri))
    }
}

pub mod handshake;
