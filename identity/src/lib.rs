//! SPIFFE identities for Membrane.
//!
//! This crate owns everything about *who* a workload is: validated SPIFFE IDs in the
//! Kubernetes form ([`WorkloadIdentity`]), X.509-SVID parsing and checks ([`svid`]), trust
//! bundles with several roots per trust domain ([`TrustBundle`]), CSR generation and the CA's
//! CSR gate ([`csr`]), and rustls verifiers that accept a peer only if its chain verifies *and*
//! its SPIFFE ID is the one the caller expects ([`verify`]).
//!
//! It does no I/O and knows nothing of the control plane, the data plane or policy. The crypto
//! provider is `ring` throughout.

pub mod bundle;
pub mod csr;
pub mod spiffe_id;
pub mod svid;
pub mod verify;

pub use bundle::{SharedTrustBundle, TrustBundle};
pub use csr::{CsrError, ValidatedCsr};
pub use spiffe_id::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, TrustDomain, WorkloadIdentity};
pub use svid::{SvidError, SvidInfo, WorkloadSvid};
pub use verify::{PeerCheck, peer_spiffe_id};

/// The crypto provider Membrane uses everywhere (see docs/design.md, "Crypto provider").
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
