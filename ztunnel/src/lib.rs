//! The node agent (`ztunnel`): in-pod traffic capture, the HBONE mutual-TLS tunnel between
//! nodes, and enforcement of identity-based policy.
//!
//! Not built yet: the data plane lands with its own piece of work (see `docs/design.md`). It
//! will depend on `membrane-proto`, `membrane-identity` and `membrane-policy`, never on the
//! controller crate.
