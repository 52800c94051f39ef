//! Membrane's end-to-end test harness. Today it is the testbed ([`membrane_testbed`]: the
//! network-namespace mesh, the controller with its one builder [`TestCa::builder`], the
//! offline CAs of [`OfflineCa`] and the one root check [`require_root`]) re-exported, so tests
//! write `membrane_tests::mesh::Mesh`; helpers only tests need go here.
//!
//! Must not: hold anything `membrane local` or `membrane demo` needs at run time (that belongs
//! in `membrane-testbed`).

pub mod cni;
pub mod dns;
pub mod hbone;

pub use membrane_testbed::*;
