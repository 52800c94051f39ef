//! Membrane's end-to-end test harness: the testbed ([`membrane_testbed`], re-exported here so
//! tests write `membrane_tests::mesh::Mesh`, and with it the one root check,
//! [`require_root`]) plus what only tests need: the shared test certificate authority.
//!
//! Must not: hold anything `membrane local` or `membrane demo` needs at run time (that belongs
//! in `membrane-testbed`).

pub use membrane_testbed::*;
