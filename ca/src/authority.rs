//! Where the controller's signing key and certificates come from.
//!
//! Two ways: a self-managed root, generated on first start and persisted to the state directory
//! (`root-cert.pem` 0644, `root-key.pem` 0600, both written atomically, so a restart keeps the
//! same root); or a plug-in CA supplied by the operator in the layout Istio uses for `cacerts`
//! (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`), which lets
//! Membrane sign under an organisation's existing PKI. A plug-in is checked before use: the key
//! must match the signing certificate and a probe leaf must verify against the root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use membrane_identity::{TrustBundle, TrustDomain};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::fsutil::{self, FileError};

/// File names of a self-managed root in the state directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root's private key (mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The next root during a rotation (see [`crate::rotation`]).
pub const NEXT_ROOT_CERT_FILE: &str = "next-root-cert.pem";
/// The next root's private key (mode 0600).
pub const NEXT_ROOT_KEY_FILE: &str = "next-root-key.pem";

/// Why the signing authority could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A file does not hold what it should.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one of the root's two files exists: refuse rather than silently make a new root.
    #[error("state directory {dir} holds {present} but not {missing}; restore it or remove both")]
    HalfRoot {
        /// The state directory.
        dir: PathBuf,
        /// The file that exists.
        present: &'static str,
        /// The file that is missing.
        missing: &'static str,
    },
    /// The plug-in material is inconsistent.
    #[error("plug-in CA in {dir} is unusable: {reason}")]
    BadPlugin {
        /// The plug-in directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key generation or certificate encoding failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The key and certificates the controller signs with.
pub struct SigningAuthority {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// The signing certificate followed by any intermediates, up to but excluding the root. Empty
    /// when the root signs directly.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) bundle: TrustBundle,
    pub(crate) not_after: OffsetDateTime,
}

impl std::fmt::Debug for SigningAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningAuthority")
            .field("chain_len", &self.chain.len())
            .field("roots", &self.bundle.roots().len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    Ok(std::fs::read(path).map_err(FileError::at(path))?)
}

fn bad(path: &Path, reason: impl ToString) -> AuthorityError {
    AuthorityError::BadFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certs_from_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

fn key_from_pem(path: &Path) -> Result<KeyPair, AuthorityError> {
    let pem = read(path)?;
    let text = String::from_utf8(pem).map_err(|_| bad(path, "not UTF-8 PEM"))?;
    KeyPair::from_pem(&text).map_err(|e| bad(path, e))
}

fn not_after_of(path: &Path, der: &[u8]) -> Result<OffsetDateTime, AuthorityError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| bad(path, e))?;
    Ok(cert.validity().not_after.to_datetime())
}

// === impl SigningAuthority ===

impl SigningAuthority {
    /// Loads the self-managed root from `state_dir`, or creates and persists one (valid for
    /// `root_ttl`) when the directory holds none.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &TrustDomain,
        root_ttl: Duration,
    ) -> Result<Self, AuthorityError> {
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load_root(&cert_path, &key_path, trust_domain),
            (false, false) => Self::create_root(
                state_dir,
                ROOT_CERT_FILE,
                ROOT_KEY_FILE,
                trust_domain,
                root_ttl,
            ),
            (true, false) => Err(AuthorityError::HalfRoot {
                dir: state_dir.to_owned(),
                present: ROOT_CERT_FILE,
                missing: ROOT_KEY_FILE,
            }),
            (false, true) => Err(AuthorityError::HalfRoot {
                dir: state_dir.to_owned(),
                present: ROOT_KEY_FILE,
                missing: ROOT_CERT_FILE,
            }),
        }
    }

    /// Loads a self-managed root from its certificate and key files, checking they match.
    pub fn load_root(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<Self, AuthorityError> {
        let key = key_from_pem(key_path)?;
        let certs = certs_from_pem(cert_path)?;
        let [root] = certs.as_slice() else {
            return Err(bad(cert_path, "expected exactly one certificate"));
        };
        let bundle = TrustBundle::new(trust_domain.clone(), [root.clone()])
            .map_err(|e| bad(cert_path, e))?;
        let not_after = not_after_of(cert_path, root)?;
        let issuer = Issuer::from_ca_cert_der(root, key).map_err(|e| bad(cert_path, e))?;
        let authority = Self {
            issuer,
            chain: Vec::new(),
            bundle,
            not_after,
        };
        authority.self_check().map_err(|reason| {
            let cert = cert_path.file_name().unwrap_or_default().to_string_lossy();
            bad(key_path, format!("does not match {cert}: {reason}"))
        })?;
        Ok(authority)
    }

    /// Creates a root valid for `root_ttl` and persists it as `cert_file` and `key_file` in
    /// `state_dir` (key first, 0600).
    pub fn create_root(
        state_dir: &Path,
        cert_file: &str,
        key_file: &str,
        trust_domain: &TrustDomain,
        root_ttl: Duration,
    ) -> Result<Self, AuthorityError> {
        fsutil::ensure_private_dir(state_dir).map_err(FileError::at(state_dir))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain.as_str());
        params
            .distinguished_name
            .push(DnType::CommonName, "Membrane root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + root_ttl;
        params.serial_number = Some(crate::leaf::random_serial());
        let cert = params.self_signed(&key)?;
        // Key first: a crash between the two writes leaves a key without a certificate, which
        // load_or_create reports instead of silently minting a second root.
        let key_path = state_dir.join(key_file);
        fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
            .map_err(FileError::at(&key_path))?;
        let cert_path = state_dir.join(cert_file);
        fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
            .map_err(FileError::at(&cert_path))?;
        tracing::info!(dir = %state_dir.display(), file = cert_file, not_after = %params.not_after, "created a new root CA");
        let bundle = TrustBundle::new(trust_domain.clone(), [cert.der().clone()])
            .map_err(|e| bad(&cert_path, e))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            chain: Vec::new(),
            bundle,
            not_after: now + root_ttl,
        })
    }

    /// Loads an operator-supplied CA from `dir` (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// optional `cert-chain.pem`).
    pub fn load_plugin(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, AuthorityError> {
        let plugin_err = |reason: String| AuthorityError::BadPlugin {
            dir: dir.to_owned(),
            reason,
        };
        let ca_cert_path = dir.join("ca-cert.pem");
        let ca_certs = certs_from_pem(&ca_cert_path)?;
        let ca_cert = ca_certs[0].clone();
        let key = key_from_pem(&dir.join("ca-key.pem"))?;
        let roots = certs_from_pem(&dir.join("root-cert.pem"))?;
        let bundle = TrustBundle::new(trust_domain.clone(), roots.clone())
            .map_err(|e| plugin_err(format!("root-cert.pem: {e}")))?;
        membrane_identity::svid::check_ca_certificate(&ca_cert)
            .map_err(|e| plugin_err(format!("ca-cert.pem: {e}")))?;

        // cert-chain.pem (Istio's layout) may repeat ca-cert.pem first and the root last.
        let chain_path = dir.join("cert-chain.pem");
        let extra = if chain_path.exists() {
            certs_from_pem(&chain_path)?
        } else {
            ca_certs[1..].to_vec()
        };
        let mut chain = Vec::new();
        if !roots.contains(&ca_cert) {
            chain.push(ca_cert.clone());
        }
        for cert in extra {
            if cert != ca_cert && !roots.contains(&cert) && !chain.contains(&cert) {
                chain.push(cert);
            }
        }
        let not_after = not_after_of(&ca_cert_path, &ca_cert)?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)
            .map_err(|e| plugin_err(format!("ca-cert.pem: {e}")))?;
        let authority = Self {
            issuer,
            chain,
            bundle,
            not_after,
        };
        authority.self_check().map_err(plugin_err)?;
        Ok(authority)
    }

    /// Signs a probe leaf and verifies it against the bundle: proves the key belongs to the
    /// signing certificate and the chain reaches a root.
    fn self_check(&self) -> Result<(), String> {
        let probe = probe_leaf(self).map_err(|e| e.to_string())?;
        self.bundle
            .verify_svid_chain(
                &probe,
                rustls_pki_types::UnixTime::now(),
                membrane_identity::svid::Usage::Client,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The same authority announcing `bundle` (which must contain its own root, as a
    /// rotation's bundle of old and new roots does): checked with a probe leaf.
    pub fn with_bundle(self, bundle: TrustBundle) -> Result<Self, AuthorityError> {
        let authority = Self { bundle, ..self };
        authority
            .self_check()
            .map_err(|reason| AuthorityError::BadFile {
                path: PathBuf::from("(trust bundle)"),
                reason: format!("the bundle does not contain the signing root: {reason}"),
            })?;
        Ok(authority)
    }

    /// The root certificate this authority signs under, when it is self-managed (the bundle's
    /// only root at load time).
    pub fn own_root(&self) -> Option<&CertificateDer<'static>> {
        match self.bundle.roots().len() {
            1 => self.bundle.roots().next(),
            _ => None,
        }
    }

    /// The trust bundle leaves from this authority verify against.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// End of the signing certificate's validity; no leaf outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

/// Signs a throwaway leaf with a fresh key; used to self-check an authority at load time.
fn probe_leaf(authority: &SigningAuthority) -> Result<Vec<CertificateDer<'static>>, rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = OffsetDateTime::now_utc();
    let probe = rcgen::SanType::URI(
        format!(
            "spiffe://{}/ns/membrane-system/sa/probe",
            authority.bundle.trust_domain()
        )
        .try_into()?,
    );
    let (params, _) = crate::leaf::leaf_params(
        vec![probe],
        now - crate::leaf::BACKDATE,
        now + Duration::from_secs(60),
    );
    let leaf = params.signed_by(&key, &authority.issuer)?;
    let mut chain = vec![leaf.der().clone()];
    chain.extend(authority.chain.iter().cloned());
    Ok(chain)
}
