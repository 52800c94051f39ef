//! What the ztunnel knows: mesh workloads, and which of them live on this node.
//!
//! Until the controller's discovery stream exists the workloads come from a local file — the
//! same objects the stream will carry — and that stays a supported way to run without a
//! controller. The file is YAML or JSON:
//!
//! ```yaml
//! workloads:
//!   - uid: 6f1c…            # pod UID (what enrollment names)
//!     name: trainer-0
//!     namespace: training
//!     serviceAccount: trainer
//!     node: node-a
//!     ips: [10.77.1.10]
//!     protocol: HBONE        # HBONE (in the mesh, default) or TCP (plain, not captured)
//!     labels: {app: trainer} # pod labels, matched by policy selectors
//! namespaces:
//!   - name: training
//!     plaintext: deny        # `permit` admits plaintext sources (membrane.dev/plaintext)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use membrane_identity::{TrustDomain, WorkloadIdentity};
use serde::Deserialize;

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// In the mesh: reached through HBONE on port 15008.
    #[default]
    Hbone,
    /// Not in the mesh: plain TCP.
    Tcp,
}

/// One workload (pod).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod UID.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// How it is reached.
    pub protocol: Protocol,
    /// Pod labels (policy selectors match them).
    pub labels: BTreeMap<String, String>,
    /// Its SPIFFE identity.
    #[serde(serialize_with = "display")]
    pub identity: WorkloadIdentity,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// How a namespace treats plaintext (identity-less) sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextMode {
    /// Refused (zero trust, the default).
    #[default]
    Deny,
    /// Handed to policy with no identity (`membrane.dev/plaintext: permit`).
    Permit,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadDoc {
    uid: String,
    name: String,
    namespace: String,
    #[serde(default = "default_sa")]
    service_account: String,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceDoc {
    name: String,
    #[serde(default)]
    plaintext: PlaintextMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    #[serde(default)]
    workloads: Vec<WorkloadDoc>,
    #[serde(default)]
    namespaces: Vec<NamespaceDoc>,
}

/// Why a workloads file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a valid workloads document.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong (with the field path).
        message: String,
    },
    /// A workload's identity is invalid, or two workloads clash.
    #[error("{path}: workload {uid}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The workload.
        uid: String,
        /// What is wrong.
        message: String,
    },
}

/// An immutable view of the mesh; replaced whole on every change.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    by_uid: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    plaintext: BTreeMap<String, PlaintextMode>,
}

// === impl MeshState ===

impl MeshState {
    /// Parses a workloads document (YAML or JSON).
    pub fn parse(path: &str, text: &str, trust_domain: &TrustDomain) -> Result<Self, StateError> {
        let doc: StateDoc = serde_saphyr::from_str(text).map_err(|e| StateError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut state = MeshState::default();
        for ns in doc.namespaces {
            state.plaintext.insert(ns.name, ns.plaintext);
        }
        for w in doc.workloads {
            let invalid = |message: String| StateError::Invalid {
                path: path.to_owned(),
                uid: w.uid.clone(),
                message,
            };
            let identity = WorkloadIdentity::new(trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| invalid(e.to_string()))?;
            let workload = Arc::new(Workload {
                uid: w.uid.clone(),
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                protocol: w.protocol,
                labels: w.labels,
                identity,
            });
            if state
                .by_uid
                .insert(w.uid.clone(), workload.clone())
                .is_some()
            {
                return Err(invalid("duplicate uid".into()));
            }
            for ip in &workload.ips {
                if let Some(other) = state.by_ip.insert(*ip, workload.clone()) {
                    return Err(invalid(format!("IP {ip} is also used by {}", other.uid)));
                }
            }
        }
        Ok(state)
    }

    /// Reads and parses a workloads file.
    pub fn load(path: &Path, trust_domain: &TrustDomain) -> Result<Self, StateError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, &text, trust_domain)
    }

    /// The workload with this pod UID.
    pub fn by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    /// The workload owning this IP.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Whether plaintext sources may reach workloads of `namespace`.
    pub fn plaintext(&self, namespace: &str) -> PlaintextMode {
        self.plaintext.get(namespace).copied().unwrap_or_default()
    }

    /// Every workload, in UID order.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        let mut all: Vec<_> = self.by_uid.values().cloned().collect();
        all.sort_by(|a, b| a.uid.cmp(&b.uid));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td")
    }

    #[test]
    fn parses_and_indexes() {
        let text = "workloads:\n- {uid: u1, name: a, namespace: ns1, serviceAccount: sa, node: n1, ips: [10.0.0.1]}\n- {uid: u2, name: b, namespace: ns2, node: n2, ips: [10.0.0.2], protocol: TCP}\nnamespaces:\n- {name: ns1, plaintext: permit}\n";
        let state = MeshState::parse("f", text, &td()).expect("valid");
        let a = state.by_ip("10.0.0.1".parse().expect("ip")).expect("a");
        assert_eq!(
            a.identity.to_string(),
            "spiffe://cluster.local/ns/ns1/sa/sa"
        );
        assert_eq!(state.by_uid("u2").expect("b").protocol, Protocol::Tcp);
        assert_eq!(state.by_uid("u2").expect("b").service_account, "default");
        assert_eq!(state.plaintext("ns1"), PlaintextMode::Permit);
        assert_eq!(state.plaintext("ns2"), PlaintextMode::Deny);
    }

    #[test]
    fn rejects_bad_documents() {
        for bad in [
            "workloads: [{uid: u, name: a, namespace: Bad_NS, node: n}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, ips: [nope]}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, extra: 1}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n}, {uid: u, name: b, namespace: ns, node: n}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, ips: [10.0.0.1]}, {uid: v, name: b, namespace: ns, node: n, ips: [10.0.0.1]}]",
            "[unclosed",
        ] {
            assert!(MeshState::parse("f", bad, &td()).is_err(), "{bad}");
        }
    }
}
