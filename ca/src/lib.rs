//! `membrane-ca`, Membrane's controller: the certificate authority that issues X.509-SVIDs, and
//! the workload source it authorizes them against.
//!
//! Layout: [`app`] (the one place tasks are spawned), [`authority`] (where the signing key comes from: a persisted self-managed root or
//! an operator's plug-in CA), [`signer`] (CSR → SVID), [`node_auth`] (which node is calling and
//! may it have this identity), [`source`] (Namespaces and Pods from a manifest directory; the
//! Kubernetes source and the discovery stream build on the same model), [`server`] (gRPC
//! `Certificates` over TLS), [`metrics`], and [`client`] (a typed client for tools and tests).
//!
//! This crate must never depend on the ztunnel crate: both sides meet only in `membrane-proto`.

pub mod app;
pub mod authority;
pub mod client;
mod fsutil;
pub mod metrics;
pub mod node_auth;
pub mod server;
pub mod signer;
pub mod source;

pub use authority::SigningAuthority;
pub use signer::{Signer, SignerConfig};
