//! `membrane-ca`, Membrane's controller: the certificate authority that issues X.509-SVIDs, and
//! the workload source it authorizes them against.
//!
//! Layout: [`app`] (the one place tasks are spawned), [`authority`] (where the signing key comes from: a persisted self-managed root or
//! an operator's plug-in CA), [`signer`] (CSR → SVID), [`node_auth`] (which node is calling and
//! may it have this identity), [`source`] (the cluster model, filled from a manifest directory or
//! the Kubernetes API), [`discovery`] (each node's view of the mesh, streamed), [`server`] (gRPC
//! `Certificates` and `Discovery` over TLS), [`metrics`], and [`client`] (a typed client for
//! tools and tests). Kubernetes mode adds [`crd`] (the AuthorizationPolicy custom resource),
//! [`status`] (policy status write-back under a Lease) and [`tokenreview`] (nodes
//! authenticated by their projected ServiceAccount token).
//!
//! This crate must never depend on the ztunnel crate: both sides meet only in `membrane-proto`.

pub mod app;
pub mod authority;
pub mod client;
pub mod crd;
pub mod discovery;
mod fsutil;
mod leaf;
pub mod metrics;
pub mod node_auth;
pub mod plugin_reload;
pub mod rotation;
pub mod server;
pub mod serving;
pub mod signer;
pub mod source;
pub mod status;
pub mod tokenreview;

pub use authority::SigningAuthority;
pub use signer::{Signer, SignerConfig};
