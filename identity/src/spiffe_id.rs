//! SPIFFE IDs in the form Membrane issues: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//!
//! Parsing of the generic SPIFFE ID grammar is the `spiffe` crate's job; this module adds what
//! Membrane needs on top of it: canonical form only (a trust domain with upper-case letters is
//! refused rather than silently folded, because two spellings of one identity must never both
//! reach a policy), and the Kubernetes path shape with validated namespace and service account.

use std::fmt;
use std::str::FromStr;

pub use spiffe::{SpiffeId, TrustDomain};

/// The trust domain Membrane uses when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Longest SPIFFE ID URI accepted (SPIFFE-ID spec §2.3: 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a valid Membrane identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The string is not a SPIFFE ID at all (scheme, trust domain or path grammar).
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    Spiffe {
        /// The rejected input (truncated to 256 characters).
        input: String,
        /// What the SPIFFE grammar found wrong.
        reason: String,
    },
    /// The SPIFFE ID is valid but not in canonical form (upper-case scheme or trust domain).
    #[error("SPIFFE ID {input:?} is not canonical; write it as {canonical:?}")]
    NotCanonical {
        /// The rejected input.
        input: String,
        /// The canonical spelling.
        canonical: String,
    },
    /// The SPIFFE ID is longer than the specification allows.
    #[error("SPIFFE ID is {len} bytes long; the maximum is {MAX_SPIFFE_ID_LEN}")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID {input:?} does not have the path /ns/<namespace>/sa/<service-account>")]
    NotKubernetesForm {
        /// The rejected input.
        input: String,
    },
    /// A namespace or service account name is not a valid Kubernetes name.
    #[error("{kind} {name:?} is not a valid Kubernetes name: {reason}")]
    BadName {
        /// `namespace` or `service account`.
        kind: &'static str,
        /// The rejected name (truncated to 256 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain {input:?}: {reason}")]
    TrustDomain {
        /// The rejected input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn truncated(s: &str) -> String {
    s.chars().take(256).collect()
}

/// Parses a trust domain name, refusing non-canonical (upper-case) spellings and full IDs.
pub fn parse_trust_domain(name: &str) -> Result<TrustDomain, IdentityError> {
    let err = |reason: String| IdentityError::TrustDomain {
        input: truncated(name),
        reason,
    };
    if name.contains(':') || name.contains('/') {
        return Err(err(
            "give the bare name (for example cluster.local), not a URI".into(),
        ));
    }
    let td = TrustDomain::new(name).map_err(|e| err(e.to_string()))?;
    if td.as_str() != name {
        return Err(err(format!("must be lower case ({})", td.as_str())));
    }
    Ok(td)
}

/// Parses any SPIFFE ID in canonical form (used for peers and policy principals).
pub fn parse_spiffe_id(input: &str) -> Result<SpiffeId, IdentityError> {
    if input.len() > MAX_SPIFFE_ID_LEN {
        return Err(IdentityError::TooLong { len: input.len() });
    }
    let id = SpiffeId::new(input).map_err(|e| IdentityError::Spiffe {
        input: truncated(input),
        reason: e.to_string(),
    })?;
    let canonical = id.to_string();
    if canonical != input {
        return Err(IdentityError::NotCanonical {
            input: truncated(input),
            canonical,
        });
    }
    Ok(id)
}

/// Checks a Kubernetes namespace name (RFC 1123 label: at most 63 characters of `[a-z0-9-]`,
/// starting and ending with an alphanumeric).
pub fn validate_namespace(name: &str) -> Result<(), IdentityError> {
    validate_dns_label(name, 63).map_err(|reason| IdentityError::BadName {
        kind: "namespace",
        name: truncated(name),
        reason,
    })
}

/// Checks a Kubernetes service account name (RFC 1123 subdomain: at most 253 characters, dot
/// separated labels of `[a-z0-9-]`).
pub fn validate_service_account(name: &str) -> Result<(), IdentityError> {
    let check = || -> Result<(), &'static str> {
        if name.len() > 253 {
            return Err("longer than 253 characters");
        }
        if name.is_empty() {
            return Err("empty");
        }
        for label in name.split('.') {
            validate_dns_label(label, 63)?;
        }
        Ok(())
    };
    check().map_err(|reason| IdentityError::BadName {
        kind: "service account",
        name: truncated(name),
        reason,
    })
}

fn validate_dns_label(label: &str, max: usize) -> Result<(), &'static str> {
    if label.is_empty() {
        return Err("empty");
    }
    if label.len() > max {
        return Err("longer than 63 characters");
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// The identity of a Kubernetes workload: `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
///
/// Always valid and canonical: the only ways to build one check every part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadIdentity {
    id: SpiffeId,
    namespace: String,
    service_account: String,
}

// === impl WorkloadIdentity ===

impl WorkloadIdentity {
    /// Builds the identity of service account `service_account` in `namespace`.
    pub fn new(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        let uri = format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            trust_domain.as_str()
        );
        let id = parse_spiffe_id(&uri)?;
        Ok(Self {
            id,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Interprets an already parsed SPIFFE ID as a workload identity.
    pub fn from_spiffe_id(id: SpiffeId) -> Result<Self, IdentityError> {
        let not_k8s = || IdentityError::NotKubernetesForm {
            input: truncated(&id.to_string()),
        };
        let mut segments = id.path().strip_prefix('/').ok_or_else(not_k8s)?.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(not_k8s());
        };
        validate_namespace(ns)?;
        validate_service_account(sa)?;
        let (namespace, service_account) = (ns.to_owned(), sa.to_owned());
        Ok(Self {
            id,
            namespace,
            service_account,
        })
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.id.trust_domain()
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for WorkloadIdentity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_spiffe_id(parse_spiffe_id(s)?)
    }
}

impl fmt::Display for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        parse_trust_domain("cluster.local").expect("valid trust domain")
    }

    #[test]
    fn parses_kubernetes_form() {
        let id: WorkloadIdentity = "spiffe://cluster.local/ns/training/sa/trainer"
            .parse()
            .expect("valid");
        assert_eq!(id.namespace(), "training");
        assert_eq!(id.service_account(), "trainer");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/training/sa/trainer"
        );
        assert_eq!(
            WorkloadIdentity::new(&td(), "training", "trainer").expect("valid"),
            id
        );
    }

    #[test]
    fn rejects_spec_invalid_ids() {
        // Cases from the SPIFFE-ID specification and its reference implementations.
        let invalid = [
            "",
            "spiffe://",
            "spiffe:///ns/a/sa/b",
            "http://cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/sa/b",
            "spiffe:/cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local//ns/a/sa/b",
            "spiffe://cluster.local/ns/./sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a%20b/sa/b",
            "spiffe://clu$ter.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?query",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local/ns/a/sa/b c",
        ];
        for s in invalid {
            assert!(
                s.parse::<WorkloadIdentity>().is_err(),
                "{s:?} must be rejected"
            );
            assert!(parse_spiffe_id(s).is_err(), "{s:?} must be rejected");
        }
    }

    #[test]
    fn rejects_non_canonical_spelling() {
        for s in [
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
        ] {
            let err = parse_spiffe_id(s).expect_err("non-canonical");
            assert!(
                matches!(
                    err,
                    IdentityError::NotCanonical { .. } | IdentityError::Spiffe { .. }
                ),
                "{s}: {err}"
            );
        }
        assert!(parse_trust_domain("Cluster.local").is_err());
        assert!(parse_trust_domain("spiffe://cluster.local").is_err());
        assert!(parse_trust_domain("").is_err());
    }

    #[test]
    fn rejects_too_long() {
        let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(2100));
        assert!(matches!(
            parse_spiffe_id(&long),
            Err(IdentityError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_other_paths() {
        for s in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
        ] {
            assert!(
                matches!(
                    s.parse::<WorkloadIdentity>(),
                    Err(IdentityError::NotKubernetesForm { .. })
                ),
                "{s}"
            );
        }
    }

    #[test]
    fn validates_kubernetes_names() {
        for bad_ns in ["A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(
                WorkloadIdentity::new(&td(), bad_ns, "sa").is_err(),
                "{bad_ns}"
            );
        }
        for bad_sa in ["", "Sa", "-sa", "s_a", "a..b", &"a".repeat(254)] {
            assert!(
                WorkloadIdentity::new(&td(), "ns", bad_sa).is_err(),
                "{bad_sa}"
            );
        }
        assert!(WorkloadIdentity::new(&td(), "a-1", "x.y-z").is_ok());
        assert!(WorkloadIdentity::new(&td(), &"a".repeat(63), "default").is_ok());
    }
}
