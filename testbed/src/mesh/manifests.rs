//! What a [`Mesh`]'s controllers are told: the Namespace and Pod manifests (and, in local
//! mode, the ztunnels' workload file) generated from its [`MeshSpec`], per cluster.
//!
//! Must not: start processes or touch namespaces (the parent module does both).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;

use super::{Mesh, MeshSpec, PodDef, uid};
use crate::netns::Testbed;

impl Mesh {
    /// The Namespace and Pod manifests of the pods on `nodes` (what another cluster's
    /// controller, per [`MeshSpec::node_controllers`], must be told about its own pods), with
    /// that cluster's own mesh namespaces and plaintext permits.
    pub fn cluster_manifests(
        &self,
        nodes: &[String],
        mesh_namespaces: &[String],
        plaintext_permit: &[String],
    ) -> anyhow::Result<String> {
        let spec = MeshSpec {
            pods: (self.spec.pods.iter())
                .filter(|p| nodes.contains(&p.node))
                .cloned()
                .collect(),
            node_controllers: BTreeMap::new(),
            mesh_namespaces: mesh_namespaces.to_vec(),
            plaintext_permit: plaintext_permit.to_vec(),
            ..self.spec.clone()
        };
        Ok(Self::documents(&spec, &self.testbed)?.0)
    }

    pub(super) fn documents(
        spec: &MeshSpec,
        testbed: &Testbed,
    ) -> anyhow::Result<(String, String)> {
        let mut manifests = String::new();
        // Pods of another cluster's nodes are that cluster's controller's business.
        let own = |p: &&PodDef| !spec.node_controllers.contains_key(&p.node);
        let mut namespaces: Vec<&str> = (spec.pods.iter().filter(own))
            .map(|p| p.namespace.as_str())
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut workloads = String::from("namespaces:\n");
        for ns in &namespaces {
            let mesh = spec.mesh_namespaces.iter().any(|m| m == ns);
            let peer = spec.hbone_peer_namespaces.iter().any(|m| m == ns);
            let label = if mesh {
                "\n  labels: {membrane.dev/mesh: enabled}"
            } else if peer {
                "\n  labels: {membrane.dev/mesh: hbone-peer}"
            } else {
                ""
            };
            let permit = spec.plaintext_permit.iter().any(|m| m == ns);
            let annotation = if permit {
                "\n  annotations: {membrane.dev/plaintext: permit}"
            } else {
                ""
            };
            writeln!(
                manifests,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{label}{annotation}"
            )?;
            writeln!(
                workloads,
                "- {{name: {ns}, plaintext: {}}}",
                if permit { "permit" } else { "deny" }
            )?;
        }
        workloads.push_str("workloads:\n");
        for def in spec.pods.iter().filter(own) {
            let pod = testbed.pod(def.key()).context("pod missing from testbed")?;
            let mesh = spec.mesh_namespaces.iter().any(|m| m == &def.namespace);
            let peer = spec
                .hbone_peer_namespaces
                .iter()
                .any(|m| m == &def.namespace);
            // JSON is YAML: a flow mapping that quotes every key and value.
            let labels = serde_json::to_string(&def.labels)?;
            writeln!(
                manifests,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {labels}}}\nspec: {{serviceAccountName: {}, nodeName: {}}}\nstatus: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}",
                def.name,
                def.namespace,
                uid(def),
                def.service_account,
                def.node,
                pod.ip(),
                pod.ip(),
                pod.ip6()
            )?;
            writeln!(
                workloads,
                "- {{uid: {}, name: {}, namespace: {}, serviceAccount: {}, node: {}, ips: [{}, \"{}\"], protocol: {}, foreign: {peer}, labels: {labels}}}",
                uid(def),
                def.name,
                def.namespace,
                def.service_account,
                def.node,
                pod.ip(),
                pod.ip6(),
                if mesh || peer { "HBONE" } else { "TCP" }
            )?;
        }
        Ok((manifests, workloads))
    }
}
