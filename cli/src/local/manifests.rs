//! From a directory of Kubernetes-style manifests to the mesh `membrane local` builds.
//!
//! Namespaces, Pods, Services and AuthorizationPolicies are read with the controller's own
//! directory reader, so a manifest that `membrane local` accepts is one the controller
//! accepts, with the same errors (file, document, field). Every pod needs `spec.nodeName`:
//! its node is created as a simulated node. A pod keeps its `status.podIP` when given (it must
//! lie in its node's range, `10.77.<node number>.0/24`, nodes numbered in name order from 1),
//! otherwise it gets the lowest free address there. Its network namespace is named
//! `<namespace>-<pod>` ([`netns_name`]).
//!
//! Everything but Pods and Namespaces (Services, policies, …) is handed to the controller as
//! the user wrote it ([`other_documents`]), and re-read when the files change, so policy edits
//! take effect on the running mesh.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use membrane_ca::source::MESH_LABEL;
use membrane_ca::source::directory::DirectorySource;
use membrane_testbed::mesh::{MeshSpec, PodDef};

/// Longest network namespace name used; longer `<namespace>-<pod>` names are shortened.
pub const MAX_NETNS_NAME: usize = 48;

/// `<namespace>-<pod>`, or, when longer than [`MAX_NETNS_NAME`], its first 39 bytes, `-`, and
/// 8 hex digits of a hash of the whole name (stable across runs).
pub fn netns_name(namespace: &str, pod: &str) -> String {
    let full = format!("{namespace}-{pod}");
    if full.len() <= MAX_NETNS_NAME {
        return full;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, full.as_bytes());
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{hex}", &full[..39])
}

/// The mesh to build from `dir`.
pub fn spec(
    dir: &Path,
    cert_ttl: Option<Duration>,
    access_log: Option<PathBuf>,
) -> anyhow::Result<MeshSpec> {
    let mut source = DirectorySource::new(dir);
    source
        .rescan()
        .with_context(|| format!("reading {}", dir.display()))?;
    let errors = source.errors();
    if !errors.is_empty() {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        bail!("the manifests are not valid:\n  {}", text.join("\n  "));
    }
    let state = source.state();
    if state.pods.is_empty() {
        bail!(
            "{} defines no Pod: a local mesh needs pods (see examples/genai)",
            dir.display()
        );
    }
    let mut nodes = BTreeSet::new();
    let mut pods = Vec::new();
    for pod in state.pods.values() {
        let Some(node) = &pod.node_name else {
            bail!(
                "pod {}/{} has no spec.nodeName: in a local mesh every pod names its (simulated) node",
                pod.namespace,
                pod.name
            );
        };
        nodes.insert(node.clone());
        let mut def = PodDef::new(&pod.name, &pod.namespace, &pod.service_account, node);
        def.labels = pod.labels.clone();
        def.netns = Some(netns_name(&pod.namespace, &pod.name));
        def.ip = pod.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        // A gateway pod runs as its own simulated node: that node's ztunnel serves it in
        // gateway mode.
        def.gateway = membrane_policy::gateway::GatewayRole::from_labels(&pod.labels)
            .map(|role| role.kind.as_str().to_owned());
        pods.push(def);
    }
    for gateway in pods.iter().filter(|p| p.gateway.is_some()) {
        if let Some(other) = pods
            .iter()
            .find(|p| p.node == gateway.node && p.name != gateway.name)
        {
            bail!(
                "gateway pod {}/{} shares node {} with {}/{}: in a local mesh a gateway runs alone on its node",
                gateway.namespace,
                gateway.name,
                gateway.node,
                other.namespace,
                other.name
            );
        }
    }
    if nodes.len() > membrane_testbed::netns::MAX_NODES {
        bail!(
            "{} nodes named; a local mesh supports at most {}",
            nodes.len(),
            membrane_testbed::netns::MAX_NODES
        );
    }
    let nodes: Vec<String> = nodes.into_iter().collect();
    for def in &pods {
        if let Some(ip) = def.ip {
            let index = nodes.iter().position(|n| *n == def.node).unwrap_or(0) + 1;
            let range = Ipv4Addr::new(10, 77, u8::try_from(index).unwrap_or(0), 0);
            if ip.octets()[..3] != range.octets()[..3] || matches!(ip.octets()[3], 0 | 1 | 255) {
                bail!(
                    "pod {}/{}: status.podIP {ip} is outside node {}'s range {range}/24 (.2–.254); remove it to have one assigned",
                    def.namespace,
                    def.name,
                    def.node
                );
            }
        }
    }
    let mesh_namespaces = state
        .namespaces
        .values()
        .filter(|n| n.mesh_enabled())
        .map(|n| n.name.clone())
        .collect();
    let plaintext_permit = state
        .namespaces
        .values()
        .filter(|n| {
            let value = n.annotations.get(membrane_policy::PLAINTEXT_ANNOTATION);
            membrane_policy::PlaintextMode::from_annotation(value.map(String::as_str))
                == membrane_policy::PlaintextMode::Permit
        })
        .map(|n| n.name.clone())
        .collect();
    Ok(MeshSpec {
        nodes,
        pods,
        mesh_namespaces,
        plaintext_permit,
        policies: String::new(),
        cert_ttl,
        extra_manifests: other_documents(dir)?,
        access_log,
        local_files: false,
        ..MeshSpec::default()
    })
}

/// Whether `pod` should be enrolled: its namespace is in the mesh, it did not opt out, and it
/// is not a gateway pod (a gateway tunnels for itself).
pub fn enrolled(spec: &MeshSpec, pod: &PodDef) -> bool {
    pod.gateway.is_none()
        && spec.in_mesh(pod)
        && pod.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
}

/// Every document of `dir` that is neither a Pod nor a Namespace, one output file per input
/// file (`user-<path>.yaml`), re-emitted as JSON documents (JSON is YAML). Files that do not
/// parse are skipped here: [`spec`] already reported them.
pub fn other_documents(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(docs) = serde_saphyr::from_multiple::<serde_json::Value>(&text) else {
            continue;
        };
        let kept: Vec<String> = docs
            .iter()
            .filter(|d| !matches!(d["kind"].as_str(), Some("Pod" | "Namespace") | None))
            .map(|d| d.to_string())
            .collect();
        let rel = path.strip_prefix(dir).unwrap_or(&path);
        let name = format!("user-{}", rel.to_string_lossy().replace(['/', '\\'], "_"));
        out.push((name, kept.join("\n---\n")));
    }
    Ok(out)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_kept_or_shortened_predictably() {
        assert_eq!(netns_name("training", "trainer-0"), "training-trainer-0");
        let long = netns_name(
            "a-very-long-namespace-name-for-tests",
            "and-a-long-pod-name-0",
        );
        assert_eq!(long.len(), MAX_NETNS_NAME);
        assert_eq!(
            long,
            netns_name(
                "a-very-long-namespace-name-for-tests",
                "and-a-long-pod-name-0"
            )
        );
        assert_ne!(
            long,
            netns_name(
                "a-very-long-namespace-name-for-tests",
                "and-a-long-pod-name-1"
            )
        );
    }

    #[test]
    fn spec_from_the_example_manifests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/genai");
        let spec = spec(&dir, None, None).expect("valid example");
        assert!(spec.nodes.len() >= 2);
        assert!(spec.pods.iter().all(|p| p.netns.is_some()));
        assert!(spec.mesh_namespaces.contains(&"training".to_owned()));
        // The example's gateways run alone on their nodes and are not enrolled.
        let gateways: Vec<_> = spec.pods.iter().filter(|p| p.gateway.is_some()).collect();
        assert_eq!(gateways.len(), 2);
        assert!(gateways.iter().all(|g| !enrolled(&spec, g)));
        let policies = spec
            .extra_manifests
            .iter()
            .any(|(_, text)| text.contains("AuthorizationPolicy"));
        assert!(policies, "policies are passed on");
        assert!(
            spec.extra_manifests
                .iter()
                .all(|(_, text)| !text.contains("\"kind\":\"Pod\""))
        );
    }

    #[test]
    fn pods_without_a_node_or_with_a_foreign_ip_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |text: &str| std::fs::write(dir.path().join("m.yaml"), text).expect("write");
        write("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\n");
        let err = spec(dir.path(), None, None)
            .expect_err("no node")
            .to_string();
        assert!(err.contains("spec.nodeName"), "{err}");
        write(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: n1}\nstatus: {podIP: 10.77.2.5}\n",
        );
        let err = spec(dir.path(), None, None)
            .expect_err("bad ip")
            .to_string();
        assert!(err.contains("outside node n1's range"), "{err}");
        write(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: 5}\n",
        );
        let err = spec(dir.path(), None, None)
            .expect_err("bad field")
            .to_string();
        assert!(
            err.contains("m.yaml") && err.contains("spec.nodeName"),
            "{err}"
        );
    }
}
