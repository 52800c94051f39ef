//! Turns a validated CSR into an X.509-SVID.
//!
//! The CA copies nothing from the request but the public key and the one SPIFFE ID it already
//! validated: key usage, extended key usage, validity and serial are the CA's decisions. The
//! lifetime is the requested one, or the default, capped by the configured maximum and by the
//! signing certificate's own expiry.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use membrane_identity::{TrustBundle, ValidatedCsr, WorkloadIdentity};
use rcgen::SanType;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::authority::SigningAuthority;
pub use crate::leaf::BACKDATE;
use crate::leaf::leaf_params;

/// Lifetimes the signer applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignerConfig {
    /// Lifetime when the request asks for none (default 24 h).
    pub default_ttl: Duration,
    /// Longest lifetime granted, whatever the request says (default 24 h).
    pub max_ttl: Duration,
    /// Fraction of a certificate's lifetime after which nodes are told to renew it (before
    /// their jitter); default 0.5.
    pub renewal_fraction: f64,
}

/// The renewal fraction nodes are told when nothing else is configured.
pub const DEFAULT_RENEWAL_FRACTION: f64 = 0.5;

impl Default for SignerConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            renewal_fraction: DEFAULT_RENEWAL_FRACTION,
        }
    }
}

/// Why signing failed after the request was accepted (a controller fault, not the caller's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The signing certificate has expired or expires within the backdate window.
    #[error("the signing certificate expired at {0}")]
    AuthorityExpired(OffsetDateTime),
    /// rcgen could not encode or sign the certificate.
    #[error("certificate encoding failed: {0}")]
    Encode(#[from] rcgen::Error),
}

/// A signed SVID as returned to the node: the chain (leaf first, no root) and its expiry.
#[derive(Debug, Clone)]
pub struct SignedSvid {
    /// Leaf followed by the intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity (backdated by [`BACKDATE`]).
    pub not_before: OffsetDateTime,
    /// End of the leaf's validity.
    pub not_after: OffsetDateTime,
    /// When the node should renew it: the renewal fraction of the time between issue and
    /// expiry.
    pub refresh_at: OffsetDateTime,
    /// Serial, lower-case hex.
    pub serial: String,
}

/// Signs leaves with a [`SigningAuthority`]. Cheap to share: clones share the authority, so
/// [`Signer::replace`] (root rotation) takes effect for every holder at once.
#[derive(Debug, Clone)]
pub struct Signer {
    authority: Arc<RwLock<Arc<SigningAuthority>>>,
    config: SignerConfig,
}

fn uri_san(identity: &WorkloadIdentity) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(identity.to_string().try_into()?))
}

// === impl Signer ===

impl Signer {
    /// A signer using `authority` with the given lifetimes.
    pub fn new(authority: SigningAuthority, config: SignerConfig) -> Self {
        Self {
            authority: Arc::new(RwLock::new(Arc::new(authority))),
            config,
        }
    }

    fn current(&self) -> Arc<SigningAuthority> {
        match self.authority.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs with `authority` from now on (every clone of this signer).
    pub fn replace(&self, authority: SigningAuthority) {
        let mut guard = match self.authority.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(authority);
    }

    /// The trust bundle this signer's leaves verify against (during a root rotation: every
    /// root in use).
    pub fn bundle(&self) -> TrustBundle {
        self.current().bundle.clone()
    }

    /// End of the current signing certificate's validity; no leaf outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current().not_after
    }

    /// The configured lifetimes.
    pub fn config(&self) -> SignerConfig {
        self.config
    }

    /// The lifetime granted for a request of `requested` (zero: the default).
    pub fn granted_ttl(&self, requested: Duration) -> Duration {
        let wanted = if requested.is_zero() {
            self.config.default_ttl
        } else {
            requested
        };
        wanted.min(self.config.max_ttl)
    }

    /// Signs the SVID for a validated CSR.
    pub fn sign(&self, csr: &ValidatedCsr, requested: Duration) -> Result<SignedSvid, SignError> {
        let san = uri_san(csr.identity())?;
        self.issue(vec![san], csr.public_key(), self.granted_ttl(requested))
    }

    /// Signs a leaf with arbitrary SANs valid for `lifetime` (capped only by the signing
    /// certificate's expiry, not by the workload maximum: the controller's own serving
    /// certificate uses it).
    pub fn issue(
        &self,
        sans: Vec<SanType>,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<SignedSvid, SignError> {
        let authority = self.current();
        let now = OffsetDateTime::now_utc();
        let limit = authority.not_after;
        let not_after = (now + lifetime).min(limit);
        if not_after <= now {
            return Err(SignError::AuthorityExpired(limit));
        }
        let not_before = now - BACKDATE;
        let (params, serial) = leaf_params(sans, not_before, not_after);
        let leaf = params.signed_by(public_key, &authority.issuer)?;
        let mut chain = Vec::with_capacity(1 + authority.chain.len());
        chain.push(leaf.der().clone());
        chain.extend(authority.chain.iter().cloned());
        let fraction = self.config.renewal_fraction.clamp(0.05, 0.95);
        // From the moment of issue, not from the backdated start: with short lifetimes the
        // backdate would otherwise put the renewal point in the past.
        let refresh_at = now + (not_after - now) * fraction;
        Ok(SignedSvid {
            chain,
            not_before,
            not_after,
            refresh_at,
            serial,
        })
    }
}
