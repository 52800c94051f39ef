//! Trust bundles: the set of root certificates a trust domain currently accepts.
//!
//! A bundle holds *several* roots at once. That is what makes a root rotation hitless: the new
//! root is added, distributed, used for signing, and the old one removed only once every leaf it
//! signed has expired. Verification accepts a chain ending at any root of the bundle.
//!
//! [`SharedTrustBundle`] also holds the bundles of federated trust domains (SPIFFE
//! Federation): a peer's chain is verified against the bundle of the trust domain in its own
//! SPIFFE ID and no other, so one trust domain's root never vouches for another's identity.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::spiffe_id::TrustDomain;
use crate::svid::{self, SvidError};

/// Why a bundle could not be built or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// A PEM file held no certificate or could not be decoded.
    #[error("trust bundle PEM: {0}")]
    Pem(String),
    /// A root is not a usable CA certificate.
    #[error("root certificate rejected: {0}")]
    BadRoot(#[source] SvidError),
    /// A bundle must hold at least one root.
    #[error("a trust bundle needs at least one root")]
    Empty,
    /// A federated bundle named the local trust domain.
    #[error("trust domain {0} is the local one; it cannot be federated")]
    FederatedLocal(String),
    /// Two federated bundles named the same trust domain.
    #[error("two federated bundles for trust domain {0}")]
    FederatedTwice(String),
}

/// The roots one trust domain accepts. Cheap to clone behind an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    /// Kept sorted by DER and free of duplicates so equal bundles compare equal.
    roots: Vec<CertificateDer<'static>>,
}

// === impl TrustBundle ===

impl TrustBundle {
    /// Builds a bundle from DER roots, checking that each one is a CA certificate.
    pub fn new(
        trust_domain: TrustDomain,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self {
            trust_domain,
            roots: Vec::new(),
        };
        for root in roots {
            bundle.add_root(root)?;
        }
        if bundle.roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(bundle)
    }

    /// Builds a bundle from every `CERTIFICATE` block of a PEM document.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        Self::new(trust_domain, roots)
    }

    /// Adds a root (a no-op if it is already present). Returns whether it was new.
    pub fn add_root(&mut self, root: CertificateDer<'static>) -> Result<bool, BundleError> {
        svid::check_ca_certificate(&root).map_err(BundleError::BadRoot)?;
        match self
            .roots
            .binary_search_by(|r| r.as_ref().cmp(root.as_ref()))
        {
            Ok(_) => Ok(false),
            Err(at) => {
                self.roots.insert(at, root);
                Ok(true)
            }
        }
    }

    /// Removes a root. Returns whether it was present. The last root cannot be removed.
    pub fn remove_root(&mut self, root: &CertificateDer<'_>) -> Result<bool, BundleError> {
        let Some(at) = self.roots.iter().position(|r| r == root) else {
            return Ok(false);
        };
        if self.roots.len() == 1 {
            return Err(BundleError::Empty);
        }
        self.roots.remove(at);
        Ok(true)
    }

    /// The trust domain these roots speak for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots, in a stable order.
    pub fn roots(&self) -> impl ExactSizeIterator<Item = &CertificateDer<'static>> {
        self.roots.iter()
    }

    /// The roots as one PEM document.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect()
    }

    /// Verifies that `chain` (leaf first, then intermediates) is a valid X.509-SVID of this
    /// trust domain at `now`, for the given TLS role, and returns its SPIFFE ID.
    pub fn verify_svid_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        usage: svid::Usage,
    ) -> Result<crate::SpiffeId, SvidError> {
        svid::verify_chain(&self.trust_domain, &self.roots, chain, now, usage)
    }
}

/// The bundles a verifier trusts: the local trust domain's, and one per federated trust
/// domain. Each speaks only for its own trust domain.
#[derive(Debug)]
struct BundleSet {
    local: Arc<TrustBundle>,
    federated: BTreeMap<TrustDomain, Arc<TrustBundle>>,
    /// Bumped by every replacement: a verification made at one generation holds until the
    /// next ([`crate::verify::PeerTrust`]).
    generation: u64,
}

impl BundleSet {
    fn for_trust_domain(&self, trust_domain: &TrustDomain) -> Option<Arc<TrustBundle>> {
        if self.local.trust_domain() == trust_domain {
            return Some(self.local.clone());
        }
        self.federated.get(trust_domain).cloned()
    }
}

/// The trust bundles verifiers use, replaceable while they hold on to it (root rotation, a
/// federated peer's new roots): the local trust domain's bundle and the federated ones.
#[derive(Debug, Clone)]
pub struct SharedTrustBundle(Arc<RwLock<Arc<BundleSet>>>);

// === impl SharedTrustBundle ===

impl SharedTrustBundle {
    /// Wraps the local bundle; no trust domain is federated yet.
    pub fn new(bundle: TrustBundle) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(BundleSet {
            local: Arc::new(bundle),
            federated: BTreeMap::new(),
            generation: 0,
        }))))
    }

    fn set(&self) -> Arc<BundleSet> {
        // A poisoned lock only means a writer panicked between two whole-Arc stores; the
        // value inside is still a complete set.
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, change: impl FnOnce(&BundleSet) -> BundleSet) {
        let mut guard = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = guard.generation.wrapping_add(1);
        *guard = Arc::new(BundleSet {
            generation,
            ..change(&guard)
        });
    }

    /// The local trust domain's bundle.
    pub fn load(&self) -> Arc<TrustBundle> {
        self.set().local.clone()
    }

    /// Replaces the local bundle; handshakes that start afterwards use the new one.
    pub fn store(&self, bundle: TrustBundle) {
        self.replace(|set| BundleSet {
            local: Arc::new(bundle),
            federated: set.federated.clone(),
            generation: set.generation,
        });
    }

    /// The bundle that speaks for `trust_domain`: the local one or a federated one.
    pub fn for_trust_domain(&self, trust_domain: &TrustDomain) -> Option<Arc<TrustBundle>> {
        self.set().for_trust_domain(trust_domain)
    }

    /// How many times the bundles were replaced: a chain verified at one generation is still
    /// trusted while it lasts.
    pub fn generation(&self) -> u64 {
        self.set().generation
    }

    /// [`Self::generation`] and [`Self::for_trust_domain`], read together.
    pub fn current(&self, trust_domain: &TrustDomain) -> (u64, Option<Arc<TrustBundle>>) {
        let set = self.set();
        (set.generation, set.for_trust_domain(trust_domain))
    }

    /// The federated bundles, by trust domain.
    pub fn federated(&self) -> Vec<Arc<TrustBundle>> {
        self.set().federated.values().cloned().collect()
    }

    /// Replaces the whole set of federated bundles (a trust domain left out is no longer
    /// trusted). A bundle for the local trust domain, or two for one trust domain, is refused
    /// and nothing changes: only the local controller speaks for the local trust domain.
    pub fn store_federated(
        &self,
        bundles: impl IntoIterator<Item = TrustBundle>,
    ) -> Result<(), BundleError> {
        let local = self.load();
        let mut federated = BTreeMap::new();
        for bundle in bundles {
            let td = bundle.trust_domain().clone();
            if &td == local.trust_domain() {
                return Err(BundleError::FederatedLocal(td.to_string()));
            }
            if federated.insert(td.clone(), Arc::new(bundle)).is_some() {
                return Err(BundleError::FederatedTwice(td.to_string()));
            }
        }
        self.replace(|set| BundleSet {
            local: set.local.clone(),
            federated,
            generation: set.generation,
        });
        Ok(())
    }
}
