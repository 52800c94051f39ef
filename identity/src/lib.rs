//! SPIFFE identities for Membrane.
//!
//! This crate owns everything about *who* a workload is: validated SPIFFE IDs in the
//! Kubernetes form ([`WorkloadIdentity`]), X.509-SVID parsing and checks ([`svid`]), trust
//! bundles with several roots per trust domain ([`TrustBundle`]), CSR generation and the CA's
//! CSR gate ([`csr`]), SPIFFE bundle documents for federation ([`federation`]), and rustls verifiers that accept a peer only if its chain verifies *and*
//! its SPIFFE ID is the one the caller expects ([`verify`]), and a connection's verified chain
//! checked again after the bundles change ([`peer_trust`]).
//!
//! It does no I/O and knows nothing of the control plane, the data plane or policy. Every TLS
//! configuration is built on aws-lc-rs with the process-wide key exchange ([`kx`]: hybrid
//! post-quantum `X25519MLKEM768` preferred unless the operator chose otherwise); certificate
//! generation and path validation use `ring`.

pub mod bundle;
pub mod csr;
pub mod federation;
pub mod kx;
pub mod peer_trust;
pub mod spiffe_id;
pub mod svid;
pub mod verify;

pub use bundle::{SharedTrustBundle, TrustBundle};
pub use csr::{CsrError, ValidatedCsr};
pub use kx::{KeyExchange, key_exchange, set_key_exchange};
pub use peer_trust::{PeerTrust, Untrusted};
pub use spiffe_id::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, TrustDomain, WorkloadIdentity};
pub use svid::{SvidError, SvidInfo, WorkloadSvid};
pub use verify::{PeerCheck, peer_spiffe_id};

/// The crypto provider every TLS configuration is built on: aws-lc-rs with the process-wide
/// key exchange ([`kx::set_key_exchange`]; see docs/design.md, "Crypto provider").
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    kx::process_provider()
}
