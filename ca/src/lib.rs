//! `membrane-ca`, Membrane's controller: the certificate authority that issues X.509-SVIDs, and
//! the workload source it authorizes them against.
//!
//! Layout, in the order a certificate request meets it:
//!
//! - [`app`]: the one place tasks are spawned; binds, starts and drains everything below.
//! - [`server`]: the gRPC transport (TLS listener, limits, keepalive) carrying
//!   [`certificates`] (the `Certificates` service: CSR → SVID after authentication and
//!   authorization) and [`discovery`] (each node's view of the mesh, streamed).
//! - [`serving`]: the controller's own serving certificate (its names, rotation, the TLS
//!   accept loop).
//! - [`node_auth`] (which node is calling, bootstrap tokens, may it have this identity) and
//!   [`tokenreview`] (nodes authenticated by their projected ServiceAccount token).
//! - [`signer`] (CSR → SVID), [`authority`] (where the signing key comes from: a persisted
//!   self-managed root or an operator's plug-in CA), `leaf` (the certificate template both
//!   use), [`rotation`] (root rotation without downtime), [`plugin_reload`] (a plug-in CA's
//!   intermediate replaced while running) and `fsutil` (atomic, permission-checked state files).
//! - [`source`]: the cluster model, filled from a manifest directory or the Kubernetes API;
//!   Kubernetes mode adds [`crd`] (the AuthorizationPolicy custom resource) and [`status`]
//!   (policy status write-back under a Lease).
//! - [`metrics`] (metric definitions) and [`endpoint`] (`/metrics` and `/ready` over HTTP).
//! - [`federation`]: SPIFFE Federation — the bundle endpoint serving this trust domain's
//!   roots, and the fetchers that follow each `TrustFederation` for the ztunnels.
//! - [`client`]: a typed client for tools and tests.
//!
//! This crate must never depend on the ztunnel crate: both sides meet only in `membrane-proto`.

pub mod app;
pub mod auth_deadline;
pub mod authority;
pub mod certificates;
pub mod client;
pub mod crd;
pub mod discovery;
pub mod endpoint;
pub mod federation;
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
pub mod token_file;
pub mod tokenreview;

pub use authority::SigningAuthority;
pub use fsutil::FileError;
pub use signer::{Signer, SignerConfig};
