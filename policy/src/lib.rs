//! Membrane's AuthorizationPolicy engine: the YAML model, validation, the compiled index and
//! the pure `decide` function (DESIGN.md §6 is the contract for the semantics).
//!
//! Flow: text → [`validate::parse_policies`] (or a typed [`model::AuthorizationPolicy`] →
//! [`validate::check`]) → [`Policy`] values with [`Warning`]s → [`PolicyIndex::build`] →
//! [`decide`] per connection. [`wire`] converts [`Policy`] to and from the wire form
//! (`membrane.v1.Authorization`) with the same parsers re-checking every value, so the
//! controller ships compiled policy and the ztunnel never parses YAML.
//!
//! Modules: `model` (document shape), `validate` and `diagnostics` (errors and warnings with
//! field paths), `matcher` (one value's syntax and matching), `namespace` (source
//! namespaces across trust domains), `policy` (the validated form),
//! `compile` (the index by scope), `eval` (the decision), `wire` (proto conversions),
//! `plaintext` (which identity-less sources a namespace admits); private: `program` (the
//! flattened encoding `decide` walks), `gate` (per-rule source-namespace filters) and `hash`
//! (the Fx hash both use).
//!
//! [`egress`] holds EgressPolicy (model, validation, the decision at the source) beside it,
//! and [`gateway`] the ingress routes in the Gateway API's shape.
//!
//! This crate never does I/O (no files, network, clock or logging) and never panics on input:
//! its callers (controller, ztunnel, CLI) read, log and measure.

pub mod compile;
pub mod diagnostics;
pub mod egress;
pub mod eval;
mod gate;
pub mod gateway;
mod hash;
pub mod matcher;
pub mod model;
pub mod namespace;
pub mod plaintext;
pub mod policy;
mod program;
pub mod validate;
pub mod wire;

pub use compile::PolicyIndex;
pub use diagnostics::{PolicyError, Problem, Warning, WarningKind};
pub use eval::{
    Decision, DecisionReason, DryRunMatch, Request, RuleMatch, Source, UNKNOWN_SOURCE_IP, Verdict,
    decide,
};
pub use matcher::{IpNet, ServiceAccountRef, StringMatch};
pub use namespace::{NamespaceMatch, TrustDomainMatch};
pub use plaintext::{PLAINTEXT_ANNOTATION, PlaintextMode};
pub use policy::{
    Action, Condition, Constraint, OperationMatch, Policy, PolicyRef, Rule, SourceMatch,
};
pub use validate::{Checked, check, check_value, parse_policies};

/// The namespace whose policies without selector apply to the whole mesh, unless the controller
/// is started with another `--root-namespace` (it streams its choice to the ztunnels). The one
/// definition of this default: the controller, the ztunnel and the CLI all use it. (The
/// controller's own namespace has the same name by default but is another setting.)
pub const DEFAULT_ROOT_NAMESPACE: &str = "membrane-system";
