//! A peer's verified chain, kept for the life of its connection.
//!
//! A verifier checks a chain once, at the handshake; a long-lived connection (a pooled HBONE
//! connection) then carries new tunnels for hours. When the bundles change — a root removed
//! from a trust domain after a rotation or a compromise, a trust domain no longer federated —
//! a connection authenticated under the old bundles must not start anything new on the
//! strength of a chain the current bundles reject. [`PeerTrust::recheck`] answers that before
//! each new use: while the bundles are at the generation the chain was last checked against,
//! it is one read; after a change it verifies the chain again, once, against its trust
//! domain's current bundle (skipped when that bundle's roots did not change).

use std::sync::{Arc, Mutex};

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::bundle::{SharedTrustBundle, TrustBundle};
use crate::spiffe_id::TrustDomain;
use crate::svid::{self, SvidError, Usage};

/// Why a connection's peer is no longer trusted.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// No bundle speaks for the peer's trust domain any more.
    #[error("trust domain {0} is no longer trusted (no bundle for it)")]
    NotFederated(TrustDomain),
    /// The current bundle rejects the chain (a root removed, the certificate expired).
    #[error("the peer's chain no longer verifies: {0}")]
    Chain(#[source] SvidError),
}

/// The bundle generation a chain was last checked at, and the bundle it was checked against
/// (`None`: the one current at that generation, not kept).
#[derive(Debug)]
struct Checked {
    generation: u64,
    bundle: Option<Arc<TrustBundle>>,
}

/// A chain a verifier accepted, and when it was last checked.
#[derive(Debug)]
pub struct PeerTrust {
    chain: Vec<CertificateDer<'static>>,
    trust_domain: TrustDomain,
    usage: Usage,
    checked: Mutex<Checked>,
}

impl PeerTrust {
    /// `chain` (leaf first), accepted by a verifier for `usage` at bundle generation
    /// `verified_at` — read *before* the handshake began, so a change during the handshake
    /// is checked again at the first use.
    pub fn new(
        chain: &[CertificateDer<'_>],
        usage: Usage,
        verified_at: u64,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        let trust_domain = svid::parse_leaf(leaf)?.spiffe_id.trust_domain().clone();
        Ok(Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            trust_domain,
            usage,
            checked: Mutex::new(Checked {
                generation: verified_at,
                bundle: None,
            }),
        })
    }

    /// Whether the chain is still trusted by `bundles` at `now`.
    pub fn recheck(&self, bundles: &SharedTrustBundle, now: UnixTime) -> Result<(), Untrusted> {
        let mut checked = (self.checked.lock()).unwrap_or_else(std::sync::PoisonError::into_inner);
        let (generation, current) = bundles.current(&self.trust_domain);
        if generation == checked.generation {
            return Ok(());
        }
        let current = current.ok_or_else(|| Untrusted::NotFederated(self.trust_domain.clone()))?;
        let same_roots = checked.bundle.as_ref().is_some_and(|b| **b == *current);
        if !same_roots {
            current
                .verify_svid_chain(&self.chain, now, self.usage)
                .map_err(Untrusted::Chain)?;
        }
        *checked = Checked {
            generation,
            bundle: Some(current),
        };
        Ok(())
    }

    /// The peer's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
}
