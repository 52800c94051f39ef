//! Which EgressPolicies select a workload, by scope (DESIGN.md §6, as for
//! AuthorizationPolicy): a policy in the root namespace without selector selects every
//! workload of the mesh; one in the root namespace with a selector, the matching workloads of
//! every namespace; elsewhere, no selector → every workload of its namespace, a selector →
//! the matching workloads of its namespace. Policies keep a stable (namespace, name) order.
//!
//! This module owns where a policy applies, nothing else: it does not decide (that is
//! [`super::decide_egress`]) and does not validate.

use std::collections::{BTreeMap, HashMap};

use super::EgressPolicy;

/// Policies with a selector, found from a workload's labels without testing each: every
/// selector is filed under its first `(key, value)` pair, so a lookup visits only the
/// selectors that pair of the workload's labels could satisfy.
#[derive(Debug, Clone, Default)]
struct Selectors {
    by_first: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl Selectors {
    fn insert(&mut self, i: usize, selector: &BTreeMap<String, String>) {
        if let Some((k, v)) = selector.iter().next() {
            self.by_first
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(i);
        }
    }

    fn matching<'a>(
        &'a self,
        policies: &'a [EgressPolicy],
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = usize> + 'a {
        labels
            .iter()
            .filter_map(|(k, v)| self.by_first.get(k)?.get(v))
            .flatten()
            .copied()
            .filter(move |i| selects(&policies[*i].selector, labels))
    }
}

/// EgressPolicies grouped by scope.
#[derive(Debug, Clone, Default)]
pub struct EgressIndex {
    policies: Vec<EgressPolicy>,
    root_namespace: String,
    mesh: Vec<usize>,
    mesh_selectors: Selectors,
    namespaces: HashMap<String, (Vec<usize>, Selectors)>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `policy` selects a workload of `namespace` with `labels` (the definition the index
/// must agree with).
pub fn applies(
    policy: &EgressPolicy,
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let root = policy.namespace == root_namespace;
    (root || policy.namespace == namespace) && selects(&policy.selector, labels)
}

impl EgressIndex {
    /// Indexes `policies`; `root_namespace` holds the mesh-wide ones.
    pub fn build(policies: impl IntoIterator<Item = EgressPolicy>, root_namespace: &str) -> Self {
        let mut policies: Vec<EgressPolicy> = policies.into_iter().collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut index = Self {
            root_namespace: root_namespace.to_owned(),
            ..Self::default()
        };
        for (i, p) in policies.iter().enumerate() {
            let root = p.namespace == root_namespace;
            match (root, p.selector.is_empty()) {
                (true, true) => index.mesh.push(i),
                (true, false) => index.mesh_selectors.insert(i, &p.selector),
                (false, true) => index
                    .namespaces
                    .entry(p.namespace.clone())
                    .or_default()
                    .0
                    .push(i),
                (false, false) => index
                    .namespaces
                    .entry(p.namespace.clone())
                    .or_default()
                    .1
                    .insert(i, &p.selector),
            }
        }
        index.policies = policies;
        index
    }

    /// The policies selecting a workload of `namespace` with `labels`, in (namespace, name)
    /// order (decisions take the first matching DENY, then the first matching ALLOW).
    pub fn selecting(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<&EgressPolicy> {
        let scope = if namespace == self.root_namespace {
            None
        } else {
            self.namespaces.get(namespace)
        };
        let all = scope.map(|s| s.0.as_slice()).unwrap_or_default();
        let mut chosen: Vec<usize> = self.mesh.iter().chain(all).copied().collect();
        chosen.extend(self.mesh_selectors.matching(&self.policies, labels));
        if let Some((_, selectors)) = scope {
            chosen.extend(selectors.matching(&self.policies, labels));
        }
        // Positions in `policies`, which is sorted: (namespace, name) order.
        chosen.sort_unstable();
        chosen.into_iter().map(|i| &self.policies[i]).collect()
    }

    /// Every policy, sorted by (namespace, name).
    pub fn policies(&self) -> &[EgressPolicy] {
        &self.policies
    }

    /// The root namespace.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }
}
