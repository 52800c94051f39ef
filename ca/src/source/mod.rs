//! What the controller knows about the cluster, whichever source it comes from.
//!
//! A source (a directory of manifests now; the Kubernetes API later) publishes complete
//! [`ClusterState`] snapshots on a `watch` channel. Consumers — node authorization today, the
//! discovery stream later — read the latest snapshot and never see a half-applied change.

pub mod directory;
mod model;

use std::sync::Arc;

pub use model::{ClusterState, MESH_LABEL, Namespace, Pod, PodPhase};

/// The receiving end of a source: always holds the latest complete snapshot, or `None` until
/// the first load finished.
pub type StateReceiver = tokio::sync::watch::Receiver<Option<Arc<ClusterState>>>;
