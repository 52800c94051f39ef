//! What one node is told: its view of the cluster as wire resources, and the delta between
//! two views.
//!
//! The part every node shares (workloads, services, the trust bundle, the compiled policy
//! index, the EgressPolicy index) is built once per source state ([`MeshView::build`]); a
//! node's view adds the AuthorizationPolicies and EgressPolicies that select its own workloads
//! ([`MeshView::node_view`]; every EgressPolicy for a node running an egress gateway pod, which
//! decides for sources anywhere). A node's view shares the workloads, Services and bundle with
//! every other node's (one map, [`super::delta`]), and a new version reuses the previous one's
//! unchanged resources ([`MeshView::intern`]).
//!
//! A pod address more than one active pod claims, or that is a Service's cluster IP, is
//! published for no pod and no Service endpoint ([`ClusterState::withheld_ips`]): a node
//! writes its pods' status, and must not be able to take another pod's or a Service's
//! address for a pod of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use membrane_identity::TrustBundle;
use membrane_policy::PolicyIndex;
use membrane_policy::egress::EgressIndex;
use membrane_policy::gateway::{GatewayKind, GatewayRole};
use membrane_proto::v1 as pb;
use pb::resource_key::Kind;

use crate::federation::services::Imports;
use crate::source::{ClusterState, Pod, Service, WithheldIps};

pub use membrane_policy::PLAINTEXT_ANNOTATION;

pub use super::delta::View;
use super::delta::{Interned, Resources, SharedDelta};

/// A workload's namespace and labels (what policy selection reads).
type LocalWorkload = (String, BTreeMap<String, String>);

/// The part of every node's view that does not depend on the node.
#[derive(Debug)]
pub struct MeshView {
    /// The shared resources and the delta from the version before (see [`MeshView::intern`]).
    shared: Interned,
    bundle: Arc<TrustBundle>,
    index: PolicyIndex,
    egress: EgressIndex,
    /// Local workloads per node: (namespace, labels).
    by_node: BTreeMap<String, Vec<LocalWorkload>>,
    /// Nodes running an egress gateway pod: they re-decide every source's EgressPolicies.
    egress_gateway_nodes: BTreeSet<String>,
    /// The ingress gateways (`namespace`, `name`) whose pods run on each node.
    ingress_gateway_nodes: BTreeMap<String, BTreeSet<(String, String)>>,
    /// Each ingress gateway's wire form (set by [`MeshView::set_ingress`]).
    ingress: BTreeMap<(String, String), pb::Ingress>,
    /// The pod addresses published for no pod ([`ClusterState::withheld_ips`]).
    withheld: WithheldIps,
}

/// Each gateway's wire form, carrying only the routes its table accepted (in precedence
/// order), with the routes it refused.
pub fn ingress_wire(
    state: &ClusterState,
) -> BTreeMap<(String, String), (pb::Ingress, Vec<membrane_policy::gateway::RefusedRoute>)> {
    state
        .ingress_tables()
        .into_iter()
        .filter_map(|(key, built)| {
            let gateway = state.gateways.get(&key)?;
            let accepted: Vec<&membrane_policy::gateway::Route> = built.accepted.iter().collect();
            let wire = membrane_policy::gateway::wire::to_wire(gateway, &accepted);
            Some((key, (wire, built.refused)))
        })
        .collect()
}

/// `pod`'s wire form; its addresses without the `withheld` ones.
fn workload(state: &ClusterState, pod: &Pod, withheld: &WithheldIps) -> pb::Workload {
    let plaintext = state
        .namespaces
        .get(&pod.namespace)
        .and_then(|ns| ns.annotations.get(PLAINTEXT_ANNOTATION))
        .map(String::as_str);
    let plaintext = membrane_policy::PlaintextMode::from_annotation(plaintext)
        == membrane_policy::PlaintextMode::Permit;
    // The sources validated the value (a directory refuses it, Kubernetes logs and counts
    // it); an invalid one exempts nothing.
    let udp_ports = state
        .namespaces
        .get(&pod.namespace)
        .and_then(|ns| {
            ns.annotations
                .get(crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION)
        })
        .and_then(|v| crate::source::parse_plaintext_udp_ports(v).ok())
        .unwrap_or_default();
    pb::Workload {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        node: pod.node_name.clone().unwrap_or_default(),
        ips: withheld
            .published(&pod.ips)
            .map(|ip| ip.to_string())
            .collect(),
        protocol: pb::workload::Protocol::Hbone as i32,
        labels: pod.labels.clone().into_iter().collect(),
        plaintext_permitted: plaintext,
        plaintext_udp_ports: udp_ports.into_iter().map(u32::from).collect(),
        gateway: GatewayRole::from_labels(&pod.labels).map(|role| pb::GatewayRole {
            kind: match role.kind {
                GatewayKind::Egress => pb::gateway_role::Kind::Egress,
                GatewayKind::Ingress => pb::gateway_role::Kind::Ingress,
                GatewayKind::EastWest => pb::gateway_role::Kind::EastWest,
            } as i32,
            name: role.name,
        }),
        foreign: false,
        trust_domain: String::new(),
        network_gateway: None,
    }
}

/// `svc`'s wire form; an endpoint on a `withheld` address is left out (it is nobody's).
fn service(svc: &Service, withheld: &WithheldIps) -> pb::Service {
    pb::Service {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vips: svc.vips.iter().map(ToString::to_string).collect(),
        ports: crate::federation::services::ports_wire(svc),
        endpoints: svc
            .endpoints
            .iter()
            .filter(|e| !withheld.contains(e.ip))
            .map(|e| pb::Endpoint {
                ip: e.ip.to_string(),
                pod: e.pod.clone().unwrap_or_default(),
                ready: e.ready,
                ports: e
                    .ports
                    .iter()
                    .map(|(k, v)| (k.clone(), u32::from(*v)))
                    .collect(),
            })
            .collect(),
        clusterset: false,
        exported: svc.exported,
    }
}

/// What the federation adds to every node's view.
#[derive(Debug, Clone, Copy)]
pub struct Federated<'a> {
    /// The federated trust domains' bundles.
    pub bundles: &'a [TrustBundle],
    /// The Services imported from them.
    pub imports: &'a Imports,
}

fn resource(kind: pb::resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

/// The wire form of a trust bundle.
pub fn bundle_resource(bundle: &TrustBundle, root_namespace: &str) -> pb::Resource {
    resource(pb::resource::Kind::TrustBundle(pb::TrustBundle {
        trust_domain: bundle.trust_domain().to_string(),
        roots_der: bundle.roots().map(|r| r.to_vec()).collect(),
        root_namespace: root_namespace.to_owned(),
    }))
}

// === impl MeshView ===

impl MeshView {
    /// Builds the shared part from a source state and the current trust bundle, with the
    /// default root namespace.
    pub fn build(state: &ClusterState, bundle: &Arc<TrustBundle>) -> Self {
        Self::build_in(state, bundle, membrane_policy::DEFAULT_ROOT_NAMESPACE)
    }

    /// Builds the shared part; selector-less policies in `root_namespace` apply mesh-wide
    /// (and the ztunnels are told so with the trust bundle).
    pub fn build_in(state: &ClusterState, bundle: &Arc<TrustBundle>, root_namespace: &str) -> Self {
        let imports = Imports::default();
        let none = Federated {
            bundles: &[],
            imports: &imports,
        };
        Self::build_federated(state, bundle, &none, root_namespace)
    }

    /// Builds the shared part with the federated trust domains' bundles (streamed to every
    /// node as `FederatedBundle` resources) and the Services imported from them (foreign
    /// workloads of their trust domains and `clusterset` Services).
    pub fn build_federated(
        state: &ClusterState,
        bundle: &Arc<TrustBundle>,
        federation: &Federated<'_>,
        root_namespace: &str,
    ) -> Self {
        let mut shared = Resources::new();
        let mut by_node: BTreeMap<String, Vec<_>> = BTreeMap::new();
        let mut egress_gateway_nodes = BTreeSet::new();
        let mut ingress_gateway_nodes: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
        let withheld = state.withheld_ips();
        for pod in state.pods.values() {
            if !pod.phase.is_active() {
                continue;
            }
            if state.is_hbone_peer(pod) {
                // Reached through HBONE, never captured here: no node, policy or gateway
                // bookkeeping.
                let mut peer = workload(state, pod, &withheld);
                peer.foreign = true;
                peer.gateway = None;
                shared.insert(
                    (Kind::Workload as i32, pod.uid.clone()),
                    Arc::new(resource(pb::resource::Kind::Workload(peer))),
                );
                continue;
            }
            if !state.is_mesh_pod(pod) {
                continue;
            }
            let Some(node) = &pod.node_name else {
                continue;
            };
            match GatewayRole::from_labels(&pod.labels) {
                Some(r) if r.kind == GatewayKind::Egress => {
                    egress_gateway_nodes.insert(node.clone());
                }
                Some(r) if r.kind == GatewayKind::Ingress => {
                    ingress_gateway_nodes
                        .entry(node.clone())
                        .or_insert_with(BTreeSet::new)
                        .insert((pod.namespace.clone(), r.name));
                }
                // An east-west gateway needs only the workloads every node sees.
                Some(_) | None => {}
            }
            by_node
                .entry(node.clone())
                .or_default()
                .push((pod.namespace.clone(), pod.labels.clone()));
            shared.insert(
                (Kind::Workload as i32, pod.uid.clone()),
                Arc::new(resource(pb::resource::Kind::Workload(workload(
                    state, pod, &withheld,
                )))),
            );
        }
        for svc in state.services.values() {
            shared.insert(
                (
                    Kind::Service as i32,
                    format!("{}/{}", svc.namespace, svc.name),
                ),
                Arc::new(resource(pb::resource::Kind::Service(service(
                    svc, &withheld,
                )))),
            );
        }
        shared.insert(
            (Kind::TrustBundle as i32, String::new()),
            Arc::new(bundle_resource(bundle, root_namespace)),
        );
        for (key, resource) in super::imported::resources(state, federation.imports) {
            shared.insert(key, Arc::new(resource));
        }
        for federated in federation.bundles {
            let td = federated.trust_domain().to_string();
            shared.insert(
                (Kind::FederatedBundle as i32, td.clone()),
                Arc::new(resource(pb::resource::Kind::FederatedBundle(
                    pb::FederatedBundle {
                        trust_domain: td,
                        roots_der: federated.roots().map(|r| r.to_vec()).collect(),
                    },
                ))),
            );
        }
        let index = PolicyIndex::build(
            state.policies.values().map(|e| e.policy.clone()),
            root_namespace,
        );
        let egress = EgressIndex::build(state.egress_policies.values().cloned(), root_namespace);
        Self {
            shared: super::delta::intern(shared, None),
            bundle: bundle.clone(),
            index,
            egress,
            by_node,
            egress_gateway_nodes,
            ingress_gateway_nodes,
            ingress: BTreeMap::new(),
            withheld,
        }
    }

    /// Reuses `previous`'s resources wherever this version's are equal (and its whole shared
    /// part when nothing changed), recording the shared delta from it once for every stream.
    pub fn intern(&mut self, previous: &MeshView) {
        let fresh = std::mem::take(&mut self.shared).shared;
        let fresh = Arc::try_unwrap(fresh).unwrap_or_else(|shared| shared.as_ref().clone());
        self.shared = super::delta::intern(fresh, Some(&previous.shared.shared));
    }

    /// The shared part's delta from the version this one was interned against.
    pub fn shared_delta(&self) -> Option<&SharedDelta> {
        self.shared.delta.as_ref()
    }

    /// Sets the ingress gateways' wire forms (each with the routes its table accepted).
    pub fn set_ingress(&mut self, ingress: BTreeMap<(String, String), pb::Ingress>) {
        self.ingress = ingress;
    }

    /// Node `node`'s complete view: the shared part plus the policies selecting its
    /// workloads.
    pub fn node_view(&self, node: &str) -> View {
        let mut view = Resources::new();
        let mut seen = BTreeSet::new();
        for (namespace, labels) in self.by_node.get(node).into_iter().flatten() {
            for policy in self.index.policies_for(namespace, labels) {
                let name = format!("{}/{}", policy.id.namespace, policy.id.name);
                if seen.insert(name.clone()) {
                    view.insert(
                        (Kind::Authorization as i32, name),
                        Arc::new(resource(pb::resource::Kind::Authorization(policy.into()))),
                    );
                }
            }
            for policy in self.egress.selecting(namespace, labels) {
                let key = (Kind::Egress as i32, policy.key());
                view.entry(key).or_insert_with(|| {
                    Arc::new(resource(pb::resource::Kind::Egress(policy.into())))
                });
            }
        }
        for (namespace, name) in self.ingress_gateway_nodes.get(node).into_iter().flatten() {
            let key = (namespace.clone(), name.clone());
            if let Some(ingress) = self.ingress.get(&key) {
                view.insert(
                    (Kind::Ingress as i32, format!("{namespace}/{name}")),
                    Arc::new(resource(pb::resource::Kind::Ingress(ingress.clone()))),
                );
            }
        }
        if self.egress_gateway_nodes.contains(node) {
            // An egress gateway decides for sources anywhere in the mesh.
            for policy in self.egress.policies() {
                let key = (Kind::Egress as i32, policy.key());
                view.entry(key).or_insert_with(|| {
                    Arc::new(resource(pb::resource::Kind::Egress(policy.into())))
                });
            }
        }
        View::new(self.shared.shared.clone(), view)
    }

    /// The pod addresses this view publishes for no pod, and why.
    pub fn withheld(&self) -> &WithheldIps {
        &self.withheld
    }

    /// The trust bundle this view carries.
    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    /// Number of mesh workloads.
    pub fn workloads(&self) -> usize {
        self.shared
            .shared
            .keys()
            .filter(|(k, _)| *k == Kind::Workload as i32)
            .count()
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
