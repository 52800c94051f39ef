//! What the controller knows about the cluster, whichever source it comes from.
//!
//! A source (a directory of manifests, or the Kubernetes API) publishes complete
//! [`ClusterState`] snapshots on a `watch` channel. Consumers (node authorization, the
//! discovery stream, readiness) read the latest snapshot and never see a half-applied change.

mod addresses;
mod annotations;
pub mod directory;
pub mod kube;
mod model;
pub mod stand_in;

use std::sync::Arc;

pub use addresses::{WithheldIp, WithheldIps};
pub use annotations::{
    MAX_PLAINTEXT_UDP_PORTS, PLAINTEXT_UDP_PORTS_ANNOTATION, UdpPortsError,
    parse_plaintext_udp_ports,
};
pub use model::{
    ClusterState, EXPORT_LABEL, Endpoint, MESH_LABEL, Namespace, Pod, PodPhase, PolicyEntry,
    PortNameError, Service, ServiceAccount, ServicePort, check_port_name,
};

/// The receiving end of a source: always holds the latest complete snapshot, or `None` until
/// the first load finished.
pub type StateReceiver = tokio::sync::watch::Receiver<Option<Arc<ClusterState>>>;
