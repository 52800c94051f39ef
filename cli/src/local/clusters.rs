//! Several federated clusters in one `membrane local`: a manifest directory holding
//! `clusters.yaml` and one subdirectory of manifests per cluster.
//!
//! ```yaml
//! clusters:
//!   - name: cluster-a              # the subdirectory cluster-a/
//!     trustDomain: cluster-a.example
//!   - name: cluster-b
//!     trustDomain: cluster-b.example
//! ```
//!
//! Each cluster gets its own controller, root and trust domain; its pods' nodes belong to it
//! (node names must differ between clusters). Every pair of clusters is federated both ways:
//! each controller serves its bundle endpoint and its exported Services (`membrane.dev/export:
//! "true"`), and follows every other's. Each cluster also gets an east-west gateway — the pod
//! `east-west-<cluster>` of namespace [`GATEWAY_NAMESPACE`] alone on node `<cluster>-gw` — and
//! the pod networks of different clusters are not routed to each other: a pod reaches another
//! cluster's pods only through that cluster's gateway (double HBONE), as between real clusters
//! joined over a WAN. The first cluster's controller is the mesh's own; the others run beside
//! it in the same daemon.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use membrane_testbed::mesh::{MeshSpec, NodeController, PodDef};
use serde::Deserialize;

use super::manifests;

/// The file that makes a manifest directory a set of clusters.
pub const FILE: &str = "clusters.yaml";
/// `spiffe_refresh_hint` of the local controllers' bundle endpoints.
pub const REFRESH_HINT: Duration = Duration::from_secs(2);
/// The namespace (and service account) of every cluster's east-west gateway pod.
pub const GATEWAY_NAMESPACE: &str = "mesh-gateways";
const GATEWAY_SA: &str = "east-west";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    clusters: Vec<ClusterDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClusterDoc {
    name: String,
    trust_domain: String,
}

/// One cluster: its name, trust domain, manifest directory and the mesh its manifests alone
/// describe.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Its name (and subdirectory).
    pub name: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// Its manifest directory.
    pub dir: PathBuf,
    /// What its manifests describe on their own.
    pub spec: MeshSpec,
}

/// The clusters of `dir`, or `None` when it has no [`FILE`] (one cluster).
pub fn read(dir: &Path, cert_ttl: Option<Duration>) -> anyhow::Result<Option<Vec<Cluster>>> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let doc: Doc =
        serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if doc.clusters.len() < 2 {
        bail!("{}: name at least two clusters", path.display());
    }
    let mut clusters = Vec::new();
    let (mut names, mut domains, mut nodes) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for c in doc.clusters {
        membrane_identity::spiffe_id::validate_namespace(&c.name)
            .with_context(|| format!("{}: cluster name {:?}", path.display(), c.name))?;
        membrane_identity::spiffe_id::parse_trust_domain(&c.trust_domain)
            .with_context(|| format!("{}: cluster {}: trustDomain", path.display(), c.name))?;
        if !names.insert(c.name.clone()) || !domains.insert(c.trust_domain.clone()) {
            bail!(
                "{}: cluster {} repeats a name or a trust domain",
                path.display(),
                c.name
            );
        }
        let cluster_dir = dir.join(&c.name);
        let mut spec = manifests::spec(&cluster_dir, cert_ttl, None)
            .with_context(|| format!("cluster {}", c.name))?;
        let node = gateway_node(&c.name);
        spec.nodes.push(node.clone());
        spec.pods.push(PodDef::gateway(
            &gateway_pod(&c.name),
            GATEWAY_NAMESPACE,
            GATEWAY_SA,
            &node,
            "east-west",
            "east-west",
        ));
        for node in &spec.nodes {
            if !nodes.insert(node.clone()) {
                bail!("node {node} appears in two clusters: every cluster needs nodes of its own");
            }
        }
        clusters.push(Cluster {
            name: c.name,
            trust_domain: c.trust_domain,
            dir: cluster_dir,
            spec,
        });
    }
    Ok(Some(clusters))
}

/// The one mesh of every cluster: the first cluster's controller is the mesh's own, every
/// other cluster's nodes talk to `controllers[i]` (the others', in order).
pub fn combined(
    clusters: &[Cluster],
    controllers: &[NodeController],
    access_log: Option<PathBuf>,
) -> anyhow::Result<MeshSpec> {
    let (first, others) = clusters.split_first().context("no cluster")?;
    let mut spec = first.spec.clone();
    spec.trust_domain = Some(first.trust_domain.clone());
    spec.bundle_endpoint = Some(REFRESH_HINT);
    spec.exports = true;
    spec.access_log = access_log;
    for (cluster, controller) in others.iter().zip(controllers) {
        for node in &cluster.spec.nodes {
            let mut own = controller.clone();
            own.token = membrane_testbed::node_token(node);
            spec.node_controllers.insert(node.clone(), own);
        }
        spec.nodes.extend(cluster.spec.nodes.iter().cloned());
        spec.pods.extend(cluster.spec.pods.iter().cloned());
        // Mesh namespaces and plaintext permits stay per cluster: the combined spec's are the
        // first cluster's (its controller's manifests), each other cluster's controller gets
        // its own (`NodeController::mesh_namespaces`, `Mesh::cluster_manifests`) — a namespace
        // another cluster puts in its mesh or opens to plaintext must not do so here.
    }
    // Node numbers (and so pod ranges) follow the order of all nodes: an address a cluster
    // pinned is checked again against it.
    spec.nodes.sort();
    for pod in &spec.pods {
        if let Some(ip) = pod.ip {
            let index = spec.nodes.iter().position(|n| *n == pod.node).unwrap_or(0) + 1;
            if usize::from(ip.octets()[2]) != index {
                bail!(
                    "pod {}/{}: status.podIP {ip} is outside node {}'s range 10.77.{index}.0/24 once every cluster's nodes are numbered; remove it to have one assigned",
                    pod.namespace,
                    pod.name,
                    pod.node
                );
            }
        }
    }
    Ok(spec)
}

/// The node of cluster `name`'s east-west gateway.
pub fn gateway_node(cluster: &str) -> String {
    format!("{cluster}-gw")
}

/// The east-west gateway pod of cluster `name`.
pub fn gateway_pod(cluster: &str) -> String {
    format!("east-west-{cluster}")
}

/// Takes the routes between the pod networks of every two clusters away (gateway nodes keep
/// theirs: they are each cluster's way in).
pub fn separate(
    testbed: &membrane_testbed::netns::Testbed,
    clusters: &[Cluster],
) -> anyhow::Result<()> {
    let pods = |c: &Cluster| -> Vec<String> {
        let gw = gateway_node(&c.name);
        c.spec.nodes.iter().filter(|n| **n != gw).cloned().collect()
    };
    for (i, a) in clusters.iter().enumerate() {
        for b in &clusters[i + 1..] {
            for x in pods(a) {
                for y in pods(b) {
                    testbed
                        .unroute_pods(&x, &y)
                        .with_context(|| format!("separating {x} from {y}"))?;
                }
            }
        }
    }
    Ok(())
}

/// What one cluster's peers need to federate with it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The cluster's name.
    pub name: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub bundle_endpoint: std::net::SocketAddr,
    /// Its federation listener (exported Services).
    pub exports: std::net::SocketAddr,
    /// Its root (PEM).
    pub root_pem: String,
    /// Its east-west gateway pod's address.
    pub gateway: std::net::IpAddr,
}

impl Peer {
    /// The `TrustFederation` that follows this cluster: its bundle endpoint, its exports (any
    /// testbed pod address) and its east-west gateway.
    pub fn federation(&self) -> String {
        let Peer {
            name,
            trust_domain,
            bundle_endpoint,
            exports,
            root_pem,
            gateway,
        } = self;
        let indented: String = root_pem.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: security.membrane.dev/v1\nkind: TrustFederation\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {trust_domain}\n  bundleEndpoint:\n    url: https://{bundle_endpoint}/\n    spiffeId: spiffe://{trust_domain}/ns/membrane-system/sa/membrane-ca\n  bootstrapBundle: |\n{indented}  serviceExports:\n    url: https://{exports}\n    addresses: [10.77.0.0/16, \"fd00:77::/32\"]\n  eastWestGateway:\n    address: {gateway}\n    spiffeId: spiffe://{trust_domain}/ns/{GATEWAY_NAMESPACE}/sa/{GATEWAY_SA}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller for `cluster`'s nodes that is never dialled (`combined` only records it).
    fn unreachable_controller(cluster: &Cluster) -> NodeController {
        NodeController {
            endpoint: "https://127.0.0.1:1".into(),
            root_pem: String::new(),
            token: String::new(),
            trust_domain: cluster.trust_domain.clone(),
            mesh_namespaces: cluster.spec.mesh_namespaces.clone(),
        }
    }

    #[test]
    fn the_example_names_two_clusters_with_nodes_of_their_own() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multicluster");
        let clusters = read(&dir, None).expect("valid").expect("clusters.yaml");
        assert_eq!(clusters.len(), 2);
        assert_ne!(clusters[0].trust_domain, clusters[1].trust_domain);
        let spec =
            combined(&clusters, &[unreachable_controller(&clusters[1])], None).expect("combined");
        assert_eq!(
            spec.node_controllers.len(),
            clusters[1].spec.nodes.len(),
            "the second cluster's nodes talk to its controller"
        );
        assert_eq!(
            spec.pods.len(),
            clusters[0].spec.pods.len() + clusters[1].spec.pods.len()
        );
    }

    #[test]
    fn mesh_membership_and_plaintext_permits_stay_in_their_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Namespace `shared` exists in both clusters: only cluster two puts it in its mesh
        // and opens it to plaintext.
        let docs = |node: &str, two: bool| {
            let meta = if two {
                "\n  labels: {membrane.dev/mesh: enabled}\n  annotations: {membrane.dev/plaintext: permit}"
            } else {
                ""
            };
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shared{meta}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p-{node}, namespace: shared}}\nspec: {{nodeName: {node}}}\n"
            )
        };
        for (name, node, two) in [("one", "n1", false), ("two", "n2", true)] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("m.yaml"), docs(node, two)).expect("write");
        }
        std::fs::write(
            dir.path().join(FILE),
            "clusters:\n- {name: one, trustDomain: one.example}\n- {name: two, trustDomain: two.example}\n",
        )
        .expect("write");
        let clusters = read(dir.path(), None).expect("valid").expect("clusters");
        assert_eq!(clusters[1].spec.plaintext_permit, vec!["shared".to_owned()]);
        let spec =
            combined(&clusters, &[unreachable_controller(&clusters[1])], None).expect("combined");
        assert!(
            spec.plaintext_permit.is_empty(),
            "cluster two's permit opened cluster one's namespace: {:?}",
            spec.plaintext_permit
        );
        assert!(
            !spec.mesh_namespaces.contains(&"shared".to_owned()),
            "cluster two's mesh namespace joined cluster one's mesh"
        );
        let pod = |node: &str| {
            (spec.pods.iter())
                .find(|p| p.node == node)
                .expect("pod of the node")
        };
        assert!(!manifests::enrolled(&spec, pod("n1")), "cluster one's pod");
        assert!(manifests::enrolled(&spec, pod("n2")), "cluster two's pod");
    }

    #[test]
    fn shared_nodes_or_domains_and_single_clusters_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = |node: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: a}}\nspec: {{nodeName: {node}}}\n"
            )
        };
        for (name, node) in [("one", "n1"), ("two", "n1")] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("m.yaml"), pod(node)).expect("write");
        }
        let write = |text: &str| std::fs::write(dir.path().join(FILE), text).expect("write");
        write(
            "clusters:\n- {name: one, trustDomain: one.example}\n- {name: two, trustDomain: two.example}\n",
        );
        let err = format!("{:#}", read(dir.path(), None).expect_err("shared node"));
        assert!(err.contains("node n1 appears in two clusters"), "{err}");
        write(
            "clusters:\n- {name: one, trustDomain: same.example}\n- {name: two, trustDomain: same.example}\n",
        );
        let err = format!("{:#}", read(dir.path(), None).expect_err("shared domain"));
        assert!(err.contains("repeats"), "{err}");
        write("clusters:\n- {name: one, trustDomain: one.example}\n");
        assert!(read(dir.path(), None).is_err(), "one cluster");
        std::fs::remove_file(dir.path().join(FILE)).expect("rm");
        assert!(read(dir.path(), None).expect("no file").is_none());
    }
}
