//! The source-independent model of the objects Membrane reads: Namespaces, Pods,
//! ServiceAccounts, Services (with their endpoints), AuthorizationPolicies and EgressPolicies.
//!
//! Both sources (the manifest directory and the Kubernetes API) fill the same
//! [`ClusterState`]; everything downstream (node authorization, the discovery stream, policy
//! status) reads only this model.

use std::collections::BTreeMap;

/// The namespace label that opts a namespace into the mesh (`enabled`), or a pod out of it
/// (`disabled`); `hbone-peer` (`HBONE_PEER`) on a namespace or a pod declares pods of another data plane.
pub const MESH_LABEL: &str = "membrane.dev/mesh";

/// [`MESH_LABEL`] value declaring pods that speak HBONE themselves, outside Membrane (another
/// data plane such as Istio ambient): mesh pods reach them through HBONE on 15008 with the
/// identity their namespace and service account name, and Membrane never captures them or
/// issues them an identity. An undeclared pod outside the mesh is reached in plaintext, or
/// refused where policy requires a tunnel.
pub const HBONE_PEER: &str = "hbone-peer";

/// The Service label that offers a Service to federated clusters (`"true"`): its ready mesh
/// endpoints, with their identities, are served to every federated controller that watches
/// this cluster's exports.
pub const EXPORT_LABEL: &str = "membrane.dev/export";

/// A namespace and the labels and annotations Membrane reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels (`membrane.dev/mesh=enabled` opts in).
    pub labels: BTreeMap<String, String>,
    /// Annotations (`membrane.dev/plaintext`, …).
    pub annotations: BTreeMap<String, String>,
}

impl Namespace {
    /// Whether the namespace opted into the mesh.
    pub fn mesh_enabled(&self) -> bool {
        self.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled")
    }
}

/// Lifecycle phase of a pod, as Kubernetes reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPhase {
    /// Accepted, containers not all started.
    Pending,
    /// Bound to a node and running (also assumed when a manifest has no status).
    #[default]
    Running,
    /// All containers terminated successfully.
    Succeeded,
    /// All containers terminated, at least one failed.
    Failed,
    /// Kubernetes' own `Unknown`: the pod's node stopped reporting it (it may still run there).
    Unknown,
    /// A phase string this version does not know: never active (fail closed).
    Unrecognized,
}

impl PodPhase {
    /// The phases Kubernetes defines, by their `status.phase` strings.
    pub const NAMES: &'static [&'static str] =
        &["Pending", "Running", "Succeeded", "Failed", "Unknown"];

    /// Parses the `status.phase` string; a string that is none of [`Self::NAMES`] is
    /// `Unrecognized`.
    pub fn parse(s: &str) -> Self {
        match s {
            "Pending" => Self::Pending,
            "Running" => Self::Running,
            "Succeeded" => Self::Succeeded,
            "Failed" => Self::Failed,
            "Unknown" => Self::Unknown,
            _ => Self::Unrecognized,
        }
    }

    /// Whether a pod in this phase still holds its node (and so may get an identity there):
    /// Pending, Running, and Kubernetes' `Unknown` (a node that stopped reporting may still
    /// run it); never a phase this version does not know.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Unknown)
    }
}

/// A pod and the fields Membrane needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (from the manifest; in a directory without one, `<namespace>/<name>`).
    pub uid: String,
    /// Service account (`default` when the manifest names none).
    pub service_account: String,
    /// Node the pod is scheduled on, if any.
    pub node_name: Option<String>,
    /// Pod IPs.
    pub ips: Vec<std::net::IpAddr>,
    /// Labels (`membrane.dev/mesh=disabled` opts out).
    pub labels: BTreeMap<String, String>,
    /// Phase.
    pub phase: PodPhase,
    /// Named container ports (`spec.containers[].ports[]` with a name), used to resolve a
    /// Service's named `targetPort` in the directory source.
    pub named_ports: BTreeMap<String, u16>,
}

/// A ServiceAccount (identities are issued per service account).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePort {
    /// Port name (empty for a single unnamed port).
    pub name: String,
    /// The port clients connect to on the Service's virtual IPs.
    pub port: u16,
    /// The port on the endpoints when every endpoint uses the same number; endpoints may
    /// override it per name ([`Endpoint::ports`]).
    pub target_port: u16,
}

/// A Service port name that is not a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port name {name:?} is not a DNS label: {reason}")]
pub struct PortNameError {
    /// The name (its first 256 characters).
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Checks a Service port name as Kubernetes does: empty (a single unnamed port) or a DNS
/// label (at most 63 characters of `[a-z0-9-]`, starting and ending with a letter or digit).
pub fn check_port_name(name: &str) -> Result<(), PortNameError> {
    if name.is_empty() {
        return Ok(());
    }
    membrane_identity::spiffe_id::validate_namespace(name).map_err(|e| match e {
        membrane_identity::IdentityError::BadName { name, reason, .. } => PortNameError {
            name,
            reason: reason.to_owned(),
        },
        other => PortNameError {
            name: name.chars().take(256).collect(),
            reason: other.to_string(),
        },
    })
}

/// One backend of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The backend's IP.
    pub ip: std::net::IpAddr,
    /// The pod behind it, when known (same namespace as the Service).
    pub pod: Option<String>,
    /// Whether it is ready to receive traffic.
    pub ready: bool,
    /// Target port per Service port name, when it differs from [`ServicePort::target_port`]
    /// (named target ports resolve per pod).
    pub ports: BTreeMap<String, u16>,
}

/// A Service: virtual IPs, ports and the endpoints behind them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs (empty for a headless Service).
    pub vips: Vec<std::net::IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoints (from EndpointSlices in Kubernetes; from the selector in a directory).
    pub endpoints: Vec<Endpoint>,
    /// Labelled [`EXPORT_LABEL`]`: "true"`: offered to federated clusters.
    pub exported: bool,
}

/// A validated AuthorizationPolicy and what its author should know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    /// The policy as the ztunnels enforce it.
    pub policy: membrane_policy::Policy,
    /// Accepted but noteworthy fields (L7 fields, …), reported in the policy's status.
    pub warnings: Vec<membrane_policy::Warning>,
}

/// One complete, consistent view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterState {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// ServiceAccounts by (namespace, name).
    pub service_accounts: BTreeMap<(String, String), ServiceAccount>,
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// Valid AuthorizationPolicies by (namespace, name); invalid ones are left out (their
    /// errors are reported by the source).
    pub policies: BTreeMap<(String, String), PolicyEntry>,
    /// Valid EgressPolicies by (namespace, name); invalid ones are left out, as above.
    pub egress_policies: BTreeMap<(String, String), membrane_policy::egress::EgressPolicy>,
    /// Valid Gateway API `Gateway`s by (namespace, name).
    pub gateways: BTreeMap<(String, String), membrane_policy::gateway::Gateway>,
    /// Valid `TCPRoute`s and `TLSRoute`s by (namespace, name, kind).
    pub routes: BTreeMap<(String, String, &'static str), membrane_policy::gateway::Route>,
    /// Valid `TrustFederation`s by name (cluster-scoped).
    pub federations: BTreeMap<String, crate::federation::TrustFederation>,
    /// The networks pod addresses are allocated from (the controller's `--pod-networks`),
    /// set by the source from its configuration; empty: not checked. A pod address outside
    /// them is published for no pod ([`ClusterState::withheld_ips`]).
    pub pod_networks: Vec<membrane_policy::IpNet>,
}

impl ClusterState {
    /// Whether `pod` is part of the mesh: its namespace opted in and it did not opt out, or it
    /// is a gateway pod (`membrane.dev/gateway`, in any namespace: it tunnels for itself and
    /// needs its identity; it is never captured).
    pub fn is_mesh_pod(&self, pod: &Pod) -> bool {
        if membrane_policy::gateway::GatewayRole::from_labels(&pod.labels).is_some() {
            return true;
        }
        let ns_enabled = self
            .namespaces
            .get(&pod.namespace)
            .is_some_and(Namespace::mesh_enabled);
        let opted_out = pod.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled");
        ns_enabled && !opted_out
    }

    /// Each gateway's routing table, built against this state's Services, with the routes it
    /// accepted and those it refused (a route to an unknown Service or port, one that lost a
    /// server name or listener to an older route, …), each refusal with its reason and the
    /// route's field paths. Every gateway has a table, empty when all its routes are refused.
    pub fn ingress_tables(&self) -> BTreeMap<(String, String), membrane_policy::gateway::Built> {
        let routes: Vec<membrane_policy::gateway::Route> = self.routes.values().cloned().collect();
        let service_ports = |namespace: &str, name: &str| {
            self.services
                .get(&(namespace.to_owned(), name.to_owned()))
                .map(|s| s.ports.iter().map(|p| p.port).collect())
        };
        self.gateways
            .iter()
            .map(|(key, gateway)| {
                (
                    key.clone(),
                    membrane_policy::gateway::IngressTable::build(gateway, &routes, service_ports),
                )
            })
            .collect()
    }

    /// Whether `pod` was declared a foreign HBONE peer (`hbone-peer` on itself, or on its
    /// namespace without the pod opting out) and is not a mesh pod.
    pub fn is_hbone_peer(&self, pod: &Pod) -> bool {
        if self.is_mesh_pod(pod) {
            return false;
        }
        match pod.labels.get(MESH_LABEL).map(String::as_str) {
            Some(HBONE_PEER) => true,
            Some(_) => false,
            None => self
                .namespaces
                .get(&pod.namespace)
                .and_then(|ns| ns.labels.get(MESH_LABEL))
                .is_some_and(|v| v == HBONE_PEER),
        }
    }

    /// Active mesh pods scheduled on `node`.
    pub fn mesh_pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.values().filter(move |p| {
            p.node_name.as_deref() == Some(node) && p.phase.is_active() && self.is_mesh_pod(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, enabled: bool) -> Namespace {
        let mut labels = BTreeMap::new();
        if enabled {
            labels.insert(MESH_LABEL.into(), "enabled".into());
        }
        Namespace {
            name: name.into(),
            labels,
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, node: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    #[test]
    fn mesh_membership_follows_labels_and_phase() {
        let mut state = ClusterState::default();
        state.namespaces.insert("in".into(), ns("in", true));
        state.namespaces.insert("out".into(), ns("out", false));
        let mut opted_out = pod("in", "b", "n1");
        opted_out
            .labels
            .insert(MESH_LABEL.into(), "disabled".into());
        let mut done = pod("in", "c", "n1");
        done.phase = PodPhase::Succeeded;
        for p in [
            pod("in", "a", "n1"),
            opted_out,
            done,
            pod("out", "d", "n1"),
            pod("in", "e", "n2"),
            pod("missing", "f", "n1"),
        ] {
            state.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        let names: Vec<_> = state.mesh_pods_on("n1").map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn only_known_live_phases_are_active() {
        for name in PodPhase::NAMES {
            assert_ne!(PodPhase::parse(name), PodPhase::Unrecognized, "{name}");
        }
        let active: Vec<_> = PodPhase::NAMES
            .iter()
            .filter(|n| PodPhase::parse(n).is_active())
            .collect();
        assert_eq!(active, [&"Pending", &"Running", &"Unknown"]);
        for odd in ["Completed", "running", "", "Evicted"] {
            assert_eq!(PodPhase::parse(odd), PodPhase::Unrecognized);
            assert!(!PodPhase::parse(odd).is_active(), "{odd}");
        }
    }

    #[test]
    fn hbone_peers_are_declared_and_never_mesh_pods() {
        let mut state = ClusterState::default();
        state.namespaces.insert("in".into(), ns("in", true));
        let mut ambient = ns("ambient", false);
        ambient.labels.insert(MESH_LABEL.into(), HBONE_PEER.into());
        state.namespaces.insert("ambient".into(), ambient);
        state.namespaces.insert("out".into(), ns("out", false));
        let mut declared_pod = pod("out", "p", "n1");
        declared_pod
            .labels
            .insert(MESH_LABEL.into(), HBONE_PEER.into());
        let mut opted_out = pod("ambient", "o", "n1");
        opted_out
            .labels
            .insert(MESH_LABEL.into(), "disabled".into());
        let mut in_mesh_label = pod("in", "m", "n1");
        in_mesh_label
            .labels
            .insert(MESH_LABEL.into(), HBONE_PEER.into());
        let cases = [
            (pod("ambient", "a", "n1"), true),
            (declared_pod, true),
            (opted_out, false),
            (pod("out", "plain", "n1"), false),
            // A mesh namespace's pod stays a mesh pod whatever it claims.
            (in_mesh_label, false),
        ];
        for (p, peer) in cases {
            assert_eq!(state.is_hbone_peer(&p), peer, "{}/{}", p.namespace, p.name);
            if peer {
                assert!(!state.is_mesh_pod(&p));
            }
        }
    }
}
