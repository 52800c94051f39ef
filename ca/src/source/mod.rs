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
#[cfg(test)]
pub(crate) mod test_pods;

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

/// Logs each problem of an ingress route that `gateway` (`namespace/name`) left out of its
/// table, with its field path; the directory source (at each load) and the discovery service
/// (when a refusal first appears) log them alike.
pub(crate) fn log_refused_route(
    gateway: &dyn std::fmt::Display,
    route: &membrane_policy::gateway::RefusedRoute,
) {
    for e in &route.errors {
        tracing::warn!(
            gateway = %gateway,
            route_kind = route.kind.as_str(),
            route_namespace = %route.namespace,
            route_name = %route.name,
            reason = route.reason.as_str(),
            field = %e.path,
            error = %e.message,
            "ingress route refused; the gateway serves its other routes"
        );
    }
}
