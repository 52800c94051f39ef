//! Why a pod could not be taken by the [`super::PodRegistry`]: the typed refusals the
//! enrollment socket reports (with a retry hint and a metric label). Only the error type
//! lives here; deciding when to refuse belongs to the registry.

use std::path::PathBuf;

use crate::netns::NetnsError;
use crate::redirect::RedirectError;

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The ztunnel has no mesh state yet (the controller's first snapshot has not arrived).
    /// The pod is remembered and enrolled once the state says it is a mesh workload.
    #[error("the ztunnel has not received the mesh state from the controller yet; retry shortly")]
    NotReady,
    /// The pod is not a known mesh workload and the node's view is not current (the
    /// discovery stream is down): it may be a mesh pod the controller announced while the
    /// node could not hear it, so it is neither captured nor let start uncaptured.
    #[error(
        "pod {uid} is not a mesh workload this node knows, and the node's view of the mesh is not current \
         (the discovery stream from the controller is down): whether the pod belongs to the mesh cannot be \
         decided, so it may not start uncaptured; retry once the controller is reachable"
    )]
    StaleView {
        /// Pod UID.
        uid: String,
    },
    /// The pod is scheduled on another node.
    #[error("pod {uid} runs on node {node}, not on this node ({this})")]
    OtherNode {
        /// Pod UID.
        uid: String,
        /// Its node.
        node: String,
        /// This node.
        this: String,
    },
    /// The pod's network namespace does not exist (or cannot be read).
    #[error("the pod's network namespace {path} cannot be opened: {source}")]
    NoNamespace {
        /// The path given.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A listener could not be bound in the pod.
    #[error("cannot listen on port {port} in the pod: {source}")]
    Listen {
        /// Port.
        port: u16,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The redirect rules could not be installed.
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

impl EnrollError {
    /// The refusal of a namespace path that could not be opened as a pod's network namespace
    /// ([`crate::netns::open_netns_file`]).
    pub fn from_open(error: NetnsError) -> Self {
        match error {
            NetnsError::Open { path, source } => Self::NoNamespace { path, source },
            other => Self::Netns(other),
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Netns(NetnsError::NotNetns { .. }) => "not_netns",
            Self::Netns(NetnsError::OwnNetns { .. }) => "own_netns",
            Self::NotReady => "not_ready",
            Self::StaleView { .. } => "stale_view",
            Self::OtherNode { .. } => "other_node",
            Self::NoNamespace { .. } => "no_namespace",
            Self::Netns(_) => "netns",
            Self::Listen { .. } => "listen",
            Self::Redirect(_) => "redirect",
        }
    }

    /// Whether a later retry may succeed (the caller should fail and retry, not give up).
    pub fn retryable(&self) -> bool {
        matches!(self, Self::NotReady | Self::StaleView { .. })
    }
}
