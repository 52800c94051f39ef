//! Offline certificate authorities made in memory: a self-signed root, intermediates under
//! it, and the leaf SVIDs they sign. Tests use them for operator PKIs (plug-in CA), rogue
//! roots and throwaway meshes; the demo uses one for its impostor.
//!
//! Must not: write files, talk to the controller or stand in for the mesh's CA (that is
//! `membrane-ca`, run by [`crate::TestCa`]); callers decide what to do with the PEM and DER.

use membrane_identity::{WorkloadSvid, crypto_provider};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA certificate and its key: a root ([`OfflineCa::root`]) or an intermediate
/// ([`OfflineCa::intermediate`]).
pub struct OfflineCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl OfflineCa {
    /// A fresh self-signed root named `name` (common name).
    pub fn root(name: &str) -> anyhow::Result<Self> {
        let issuer = CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// A fresh intermediate CA named `name`, signed by this one.
    pub fn intermediate(&self, name: &str) -> anyhow::Result<Self> {
        let issuer =
            CertifiedIssuer::signed_by(ca_params(name), KeyPair::generate()?, &self.issuer)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        self.issuer.der()
    }

    /// The CA's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The signing side, to sign other rcgen certificates with.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// A leaf SVID for `spiffe_id` (URI SAN, client and server use, valid from a minute ago
    /// for an hour) signed by this CA; its chain is the leaf followed by `chain` (DER, e.g.
    /// this CA's own certificate, so only a trust bundle can refuse it).
    pub fn svid(
        &self,
        spiffe_id: &str,
        chain: &[CertificateDer<'static>],
    ) -> anyhow::Result<WorkloadSvid> {
        self.svid_valid_for(spiffe_id, chain, std::time::Duration::from_secs(3600))
    }

    /// [`Self::svid`] valid for `lifetime` from now (and from a minute ago).
    pub fn svid_valid_for(
        &self,
        spiffe_id: &str,
        chain: &[CertificateDer<'static>],
        lifetime: std::time::Duration,
    ) -> anyhow::Result<WorkloadSvid> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut certs = vec![leaf.der().clone()];
        certs.extend(chain.iter().cloned());
        Ok(WorkloadSvid::new(
            certs,
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            &crypto_provider(),
        )?)
    }
}

/// An SVID claiming `spiffe_id`, signed by a fresh CA the mesh does not trust: what an
/// impostor presents. The chain carries that CA, so only the trust bundle can refuse it.
pub fn impostor_svid(spiffe_id: &str) -> anyhow::Result<WorkloadSvid> {
    let ca = OfflineCa::root("impostor")?;
    ca.svid(spiffe_id, std::slice::from_ref(ca.der()))
}
