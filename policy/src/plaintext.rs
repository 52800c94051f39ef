//! The plaintext rule: which identity-less (plaintext) sources a namespace lets reach its
//! workloads, decided from the namespace's `membrane.dev/plaintext` annotation.
//!
//! One rule, used by every place that applies or explains it: the controller turns the
//! annotation into a [`PlaintextMode`] for the ztunnels, the ztunnel admits or refuses
//! plaintext TCP (and UDP) by it, and `membrane policy explain` predicts the same. A source
//! that is admitted still goes to [`crate::decide`] with no identity. This module only decides;
//! it must not read annotations from anywhere or log.

use serde::{Deserialize, Serialize};

/// The namespace annotation that admits plaintext sources (value [`PlaintextMode::PERMIT`]).
pub const PLAINTEXT_ANNOTATION: &str = "membrane.dev/plaintext";

/// How a namespace treats plaintext (identity-less) sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextMode {
    /// Refused (zero trust, the default).
    #[default]
    Deny,
    /// Handed to policy with no identity (`membrane.dev/plaintext: permit`).
    Permit,
}

// === impl PlaintextMode ===

impl PlaintextMode {
    /// The annotation value that permits plaintext.
    pub const PERMIT: &'static str = "permit";

    /// The mode a [`PLAINTEXT_ANNOTATION`] value gives: only `permit` permits; no annotation,
    /// or any other value, refuses (fail closed).
    pub fn from_annotation(value: Option<&str>) -> Self {
        match value {
            Some(Self::PERMIT) => Self::Permit,
            _ => Self::Deny,
        }
    }

    /// Whether a connection may go on to policy evaluation in a namespace of this mode: an
    /// authenticated source (it has a verified identity) always may, a plaintext source only
    /// where the namespace permits plaintext.
    pub fn admits(self, authenticated: bool) -> bool {
        authenticated || self == Self::Permit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permit_admits_plaintext_sources() {
        assert_eq!(
            PlaintextMode::from_annotation(Some("permit")),
            PlaintextMode::Permit
        );
        for refused in [None, Some(""), Some("Permit"), Some("deny"), Some("yes")] {
            assert_eq!(
                PlaintextMode::from_annotation(refused),
                PlaintextMode::Deny,
                "{refused:?}"
            );
        }
        assert!(PlaintextMode::Permit.admits(false));
        assert!(!PlaintextMode::Deny.admits(false));
        assert!(PlaintextMode::Deny.admits(true) && PlaintextMode::Permit.admits(true));
        assert_eq!(PlaintextMode::default(), PlaintextMode::Deny);
    }
}
