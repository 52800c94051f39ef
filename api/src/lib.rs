//! The contracts between Membrane's processes, defined once.
//!
//! This crate owns the shapes that cross a process boundary as JSON and the numbers every
//! component must agree on:
//! - [`enrollment`]: the enrollment socket's requests and answers (the CNI plugin, `membrane`
//!   and the tests talk to the ztunnel with them);
//! - [`access`]: the access record the ztunnel writes for each connection and
//!   `membrane observe` reads;
//! - [`dns`]: the DNS record the ztunnel writes for each query a pod makes (same stream as
//!   the access records);
//! - [`ports`]: the ports the ztunnel owns in every enrolled pod's network namespace;
//! - [`clusterset`]: the addresses and DNS domain of Services imported from federated
//!   clusters (the controller allocates them, the ztunnel routes them).
//!
//! It must not do I/O, validate beyond what the types express, or know any mesh logic (state,
//! policy, identities): those belong to the crates that produce and consume these shapes. It
//! depends on `serde` only, so that the small synchronous CNI plugin can link it.

pub mod access;
pub mod clusterset;
pub mod dns;
pub mod enrollment;
pub mod ports;
