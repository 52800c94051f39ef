//! Membrane's AuthorizationPolicy: the YAML model, validation, the compiled index and the pure
//! `decide` function.
//!
//! Not built yet: the policy engine lands with the identity-based AuthorizationPolicy work
//! (see `docs/design.md`). This crate must never do I/O.
