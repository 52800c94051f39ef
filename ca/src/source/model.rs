//! The source-independent model of the objects Membrane reads: Namespaces and Pods.

use std::collections::BTreeMap;

/// The namespace label that opts a namespace into the mesh (`enabled`), or a pod out of it
/// (`disabled`).
pub const MESH_LABEL: &str = "membrane.dev/mesh";

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
    /// Phase not known.
    Unknown,
}

impl PodPhase {
    /// Parses the `status.phase` string; unknown strings map to `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s {
            "Pending" => Self::Pending,
            "Running" => Self::Running,
            "Succeeded" => Self::Succeeded,
            "Failed" => Self::Failed,
            _ => Self::Unknown,
        }
    }

    /// Whether a pod in this phase still holds its node (and so may get an identity there).
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
}

/// One complete, consistent view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterState {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
}

impl ClusterState {
    /// Whether `pod` is part of the mesh: its namespace opted in and it did not opt out.
    pub fn is_mesh_pod(&self, pod: &Pod) -> bool {
        let ns_enabled = self
            .namespaces
            .get(&pod.namespace)
            .is_some_and(Namespace::mesh_enabled);
        let opted_out = pod.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled");
        ns_enabled && !opted_out
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
}
