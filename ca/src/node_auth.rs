//! Node authorization: which node is calling, and may it have the identity it asks for.
//!
//! Local mode authenticates a node by a bootstrap token. The token file has one node per line,
//! `<node-name> <token>`; blank lines and `#` comments are ignored. Tokens are at least 16
//! characters of printable ASCII and unique. Only SHA-256 digests are kept in memory, and a
//! presented token is compared by digest.
//!
//! A node may obtain an SVID for `ns/N/sa/S` only if an active pod with that namespace and
//! service account, in a namespace that opted into the mesh (or labelled a gateway pod, in any
//! namespace), is scheduled on that node.

use std::collections::HashMap;
use std::path::Path;

use membrane_identity::WorkloadIdentity;
use ring::digest;

use crate::serving::{CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT};
use crate::source::ClusterState;

/// Shortest token accepted in the token file.
pub const MIN_TOKEN_LEN: usize = 16;

/// A problem with the token file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file names no node.
    #[error("{path}: no tokens")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Why a node was refused an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAuthError {
    /// No pod with that identity is scheduled on the calling node.
    #[error(
        "no mesh pod with service account {namespace}/{service_account} is scheduled on node {node}"
    )]
    NotOnNode {
        /// The calling node.
        node: String,
        /// Requested namespace.
        namespace: String,
        /// Requested service account.
        service_account: String,
    },
    /// A pod with that identity is on the node, but its namespace is not in the mesh (or the
    /// pod opted out).
    #[error(
        "{namespace}/{service_account} runs on node {node} but is not enrolled in the mesh (namespace label membrane.dev/mesh=enabled missing, or pod opted out)"
    )]
    NotInMesh {
        /// The calling node.
        node: String,
        /// Requested namespace.
        namespace: String,
        /// Requested service account.
        service_account: String,
    },
    /// The identity is the controller's own (`membrane-system/membrane-ca`), which federated
    /// peers authorize exports and bundle endpoints by: no node obtains it, whatever pods it
    /// runs.
    #[error(
        "{namespace}/{service_account} is the controller's own identity; no node may obtain it"
    )]
    Reserved {
        /// Requested namespace.
        namespace: String,
        /// Requested service account.
        service_account: String,
    },
    /// A gateway pod's credential asked for another identity than its own.
    #[error(
        "a gateway's credential ({account}) may obtain only its own identity, not {namespace}/{service_account}"
    )]
    NotOwnIdentity {
        /// Requested namespace.
        namespace: String,
        /// Requested service account.
        service_account: String,
        /// The credential's account.
        account: String,
    },
}

/// SHA-256 of a token: what credentials are kept and looked up by (never the token itself).
pub(crate) type Digest = [u8; 32];

/// The [`Digest`] of `token`.
pub(crate) fn sha256(token: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Bootstrap tokens and the nodes they stand for.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BootstrapTokens {
    nodes: HashMap<Digest, String>,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

// === impl BootstrapTokens ===

impl BootstrapTokens {
    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, &text)
    }

    /// Parses the text of a token file; `path` is only used in error messages.
    pub fn parse(path: &str, text: &str) -> Result<Self, TokenFileError> {
        let mut nodes = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line_err = |reason: &str| TokenFileError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason: reason.to_owned(),
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(node), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(line_err("expected `<node-name> <token>`"));
            };
            membrane_identity::spiffe_id::validate_service_account(node)
                .map_err(|_| line_err("node name must be a lower-case DNS name"))?;
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(line_err(
                    "token must be at least 16 printable ASCII characters",
                ));
            }
            if nodes.insert(sha256(token), node.to_owned()).is_some() {
                return Err(line_err("token already used by another line"));
            }
        }
        if nodes.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self { nodes })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// There are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node a presented token belongs to, if any.
    pub fn node_for(&self, token: &str) -> Option<&str> {
        self.nodes.get(&sha256(token)).map(String::as_str)
    }
}

/// Refuses the controller's own identity: a pod that a node runs under the controller's
/// namespace and service account (a namespace someone else created, a gateway label) must not
/// make that node the controller in its federated peers' eyes.
fn refuse_reserved(identity: &WorkloadIdentity) -> Result<(), NodeAuthError> {
    if identity.namespace() == CONTROLLER_NAMESPACE
        && identity.service_account() == CONTROLLER_SERVICE_ACCOUNT
    {
        return Err(NodeAuthError::Reserved {
            namespace: CONTROLLER_NAMESPACE.to_owned(),
            service_account: CONTROLLER_SERVICE_ACCOUNT.to_owned(),
        });
    }
    Ok(())
}

/// Checks a gateway pod's own credential: it may obtain only `only` (its service account's
/// identity), and only while a gateway pod of that account is scheduled on `node`.
pub fn authorize_gateway(
    state: &ClusterState,
    node: &str,
    only: &(String, String),
    identity: &WorkloadIdentity,
) -> Result<(), NodeAuthError> {
    refuse_reserved(identity)?;
    let (namespace, service_account) = (
        identity.namespace().to_owned(),
        identity.service_account().to_owned(),
    );
    if (&namespace, &service_account) != (&only.0, &only.1) {
        return Err(NodeAuthError::NotOwnIdentity {
            namespace,
            service_account,
            account: format!("{}/{}", only.0, only.1),
        });
    }
    let gateway_here = state.mesh_pods_on(node).any(|pod| {
        pod.namespace == namespace
            && pod.service_account == service_account
            && membrane_policy::gateway::GatewayRole::from_labels(&pod.labels).is_some()
    });
    if gateway_here {
        Ok(())
    } else {
        Err(NodeAuthError::NotOnNode {
            node: node.to_owned(),
            namespace,
            service_account,
        })
    }
}

/// Checks that `identity` is scheduled on `node` in `state` (DESIGN §3).
pub fn authorize(
    state: &ClusterState,
    node: &str,
    identity: &WorkloadIdentity,
) -> Result<(), NodeAuthError> {
    refuse_reserved(identity)?;
    let scheduled = state.mesh_pods_on(node).any(|pod| {
        pod.namespace == identity.namespace() && pod.service_account == identity.service_account()
    });
    if scheduled {
        return Ok(());
    }
    let (node, namespace, service_account) = (
        node.to_owned(),
        identity.namespace().to_owned(),
        identity.service_account().to_owned(),
    );
    let present_outside_mesh = state.pods.values().any(|pod| {
        pod.node_name.as_deref() == Some(node.as_str())
            && pod.phase.is_active()
            && pod.namespace == namespace
            && pod.service_account == service_account
    });
    Err(if present_outside_mesh {
        NodeAuthError::NotInMesh {
            node,
            namespace,
            service_account,
        }
    } else {
        NodeAuthError::NotOnNode {
            node,
            namespace,
            service_account,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{MESH_LABEL, Namespace, Pod};

    #[test]
    fn token_file_parses_and_rejects_garbage() {
        let tokens = BootstrapTokens::parse(
            "t",
            "# nodes\nnode-a aaaaaaaaaaaaaaaa\n\nnode-b bbbbbbbbbbbbbbbb\n",
        )
        .expect("valid");
        assert_eq!(tokens.node_for("aaaaaaaaaaaaaaaa"), Some("node-a"));
        assert_eq!(tokens.node_for("bbbbbbbbbbbbbbbb"), Some("node-b"));
        assert_eq!(tokens.node_for("cccccccccccccccc"), None);
        assert_eq!(tokens.node_for(""), None);
        for bad in [
            "node-a\n",
            "node-a short\n",
            "Node_A aaaaaaaaaaaaaaaa\n",
            "node-a aaaaaaaaaaaaaaaa extra\n",
            "node-a aaaaaaaaaaaaaaaa\nnode-b aaaaaaaaaaaaaaaa\n",
            "# only comments\n",
        ] {
            assert!(BootstrapTokens::parse("t", bad).is_err(), "{bad:?}");
        }
        let err = BootstrapTokens::parse("tokens.txt", "ok-node aaaaaaaaaaaaaaaa\nbroken\n")
            .expect_err("bad line");
        assert!(err.to_string().starts_with("tokens.txt:2:"), "{err}");
    }

    #[test]
    fn identity_must_be_scheduled_on_the_node() {
        let mut state = ClusterState::default();
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(MESH_LABEL.to_owned(), "enabled".to_owned());
        state.namespaces.insert(
            "training".into(),
            Namespace {
                name: "training".into(),
                labels,
                ..Default::default()
            },
        );
        let pod = Pod {
            namespace: "training".into(),
            name: "trainer-0".into(),
            service_account: "trainer".into(),
            node_name: Some("node-a".into()),
            ..Default::default()
        };
        state
            .pods
            .insert(("training".into(), "trainer-0".into()), pod);
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
        let trainer = WorkloadIdentity::new(&td, "training", "trainer").expect("id");
        let other_sa = WorkloadIdentity::new(&td, "training", "default").expect("id");
        assert!(authorize(&state, "node-a", &trainer).is_ok());
        assert!(authorize(&state, "node-b", &trainer).is_err());
        assert!(authorize(&state, "node-a", &other_sa).is_err());
        state
            .namespaces
            .get_mut("training")
            .expect("ns")
            .labels
            .clear();
        assert!(matches!(
            authorize(&state, "node-a", &trainer),
            Err(NodeAuthError::NotInMesh { .. })
        ));
        // A gateway pod needs no mesh namespace, but still its node.
        let gateway = Pod {
            namespace: "egress".into(),
            name: "gw-0".into(),
            service_account: "egress-gateway".into(),
            node_name: Some("gw-node".into()),
            labels: std::collections::BTreeMap::from([
                ("membrane.dev/gateway".to_owned(), "egress".to_owned()),
                (
                    "gateway.networking.k8s.io/gateway-name".to_owned(),
                    "egress".to_owned(),
                ),
            ]),
            ..Default::default()
        };
        state.pods.insert(("egress".into(), "gw-0".into()), gateway);
        let gw = WorkloadIdentity::new(&td, "egress", "egress-gateway").expect("id");
        assert!(authorize(&state, "gw-node", &gw).is_ok());
        assert!(authorize(&state, "node-a", &gw).is_err());
    }

    /// A pod running as the controller's account (a mesh namespace of that name, or a gateway
    /// label anywhere) does not entitle its node to the controller's identity.
    #[test]
    fn the_controllers_identity_is_never_authorized() {
        let mut state = ClusterState::default();
        let labels =
            std::collections::BTreeMap::from([(MESH_LABEL.to_owned(), "enabled".to_owned())]);
        state.namespaces.insert(
            CONTROLLER_NAMESPACE.into(),
            Namespace {
                name: CONTROLLER_NAMESPACE.into(),
                labels,
                ..Default::default()
            },
        );
        let gateway_labels = std::collections::BTreeMap::from([
            ("membrane.dev/gateway".to_owned(), "egress".to_owned()),
            (
                "gateway.networking.k8s.io/gateway-name".to_owned(),
                "egress".to_owned(),
            ),
        ]);
        for (name, labels) in [("plain", Default::default()), ("gw", gateway_labels)] {
            state.pods.insert(
                (CONTROLLER_NAMESPACE.into(), name.into()),
                Pod {
                    namespace: CONTROLLER_NAMESPACE.into(),
                    name: name.into(),
                    service_account: CONTROLLER_SERVICE_ACCOUNT.into(),
                    node_name: Some("node-a".into()),
                    labels,
                    ..Default::default()
                },
            );
        }
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
        let controller =
            WorkloadIdentity::new(&td, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT)
                .expect("id");
        assert!(matches!(
            authorize(&state, "node-a", &controller),
            Err(NodeAuthError::Reserved { .. })
        ));
        let only = (
            CONTROLLER_NAMESPACE.to_owned(),
            CONTROLLER_SERVICE_ACCOUNT.to_owned(),
        );
        assert!(matches!(
            authorize_gateway(&state, "node-a", &only, &controller),
            Err(NodeAuthError::Reserved { .. })
        ));
        // Another account in that namespace is an ordinary workload.
        state.pods.insert(
            (CONTROLLER_NAMESPACE.into(), "other".into()),
            Pod {
                namespace: CONTROLLER_NAMESPACE.into(),
                name: "other".into(),
                service_account: "other".into(),
                node_name: Some("node-a".into()),
                ..Default::default()
            },
        );
        let other = WorkloadIdentity::new(&td, CONTROLLER_NAMESPACE, "other").expect("id");
        assert!(authorize(&state, "node-a", &other).is_ok());
    }
}
