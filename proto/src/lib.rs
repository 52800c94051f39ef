//! Membrane's control-plane protocol: the `.proto` files under `proto/` and the Rust code tonic
//! and prost generate from them.
//!
//! Nothing else lives here: conversions between wire messages and the domain types belong to
//! the crates that own those types (`TryFrom` impls at their edge).

/// `membrane.v1`: certificate signing, compiled authorization policy, discovery and the
/// controller-to-controller service export of a federation.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("membrane.v1");
}
