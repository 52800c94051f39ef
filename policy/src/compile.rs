//! The policy index: validated policies grouped by scope, so that one decision looks only at
//! the policies that can apply to its destination.
//!
//! Scopes (DESIGN.md §6): a policy in the root namespace without selector is mesh-wide; one
//! in the root namespace *with* a selector selects matching workloads in every namespace (as
//! in Istio); elsewhere, no selector → the policy's namespace, a selector → the matching
//! workloads of that namespace. Selector policies are grouped by identical selector, and the
//! groups of a scope are found through an inverted index on one label pair of each selector
//! (the pair that is rarest among that scope's selectors), so a lookup costs one hash probe
//! per destination label, not one selector check per policy. Each part of a scope keeps its
//! policies split by kind (DENY, ALLOW, AUDIT, dry run), and the index carries the policies'
//! flattened encoding (`program`) that `eval` walks.
//!
//! An index is built for one trust domain, the one whose workloads it protects: unqualified
//! namespaces and service accounts in its policies name that trust domain's (see
//! [`crate::namespace`]).
//!
//! This module owns where a policy applies and a stable order between policies (by
//! namespace, then name); it must not match rules (that is `eval`) nor validate (policies
//! arrive validated).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;

use membrane_identity::spiffe_id::{DEFAULT_TRUST_DOMAIN, TrustDomain};

use crate::hash::{FxBuildHasher, FxHasher};
use crate::policy::{Action, Policy};
use crate::program::Program;

/// Policies indexed by scope. Built once per policy change; immutable afterwards.
#[derive(Debug, Clone, Default)]
pub struct PolicyIndex {
    /// Sorted by (namespace, name); positions are the order of "first policy" in decisions.
    pub(crate) policies: Vec<Policy>,
    /// The same policies, encoded for evaluation (same order).
    pub(crate) program: Program,
    /// Root namespace, no selector.
    pub(crate) mesh: Lists,
    /// Root namespace with a selector: selects in every namespace.
    pub(crate) mesh_selectors: SelectorIndex,
    /// Other namespaces.
    pub(crate) namespaces: HashMap<Box<str>, NamespaceScope, FxBuildHasher>,
    root_namespace: String,
}

/// The policies of one (non-root) namespace.
#[derive(Debug, Clone, Default)]
pub(crate) struct NamespaceScope {
    /// No selector: the whole namespace.
    pub(crate) all: Lists,
    /// With a selector.
    pub(crate) selectors: SelectorIndex,
}

/// Selector policies of one scope, grouped by identical selector.
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectorIndex {
    pub(crate) groups: Vec<SelectorGroup>,
    /// Hash of a group's anchor pair → groups with that anchor (collisions are possible;
    /// callers compare the anchor itself).
    pub(crate) by_anchor: HashMap<u64, Vec<u32>, FxBuildHasher>,
}

/// Policies sharing one selector.
#[derive(Debug, Clone)]
pub(crate) struct SelectorGroup {
    /// The selector, as sorted (key, value) pairs.
    pub(crate) labels: Box<[(Box<str>, Box<str>)]>,
    /// Index in `labels` of the anchor pair.
    pub(crate) anchor: usize,
    /// Policies with this selector.
    pub(crate) lists: Lists,
}

/// The policies of one part of a scope (mesh-wide, namespace-wide, or one selector), each
/// list ascending in policy order. Split by how `decide` treats them, so that its loops run
/// over one kind at a time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lists {
    /// Every policy of the part.
    pub(crate) all: Vec<u32>,
    /// Enforced DENY policies.
    pub(crate) deny: Vec<u32>,
    /// Enforced ALLOW policies.
    pub(crate) allow: Vec<u32>,
    /// Enforced AUDIT policies.
    pub(crate) audit: Vec<u32>,
    /// Dry-run policies, whatever their action.
    pub(crate) dry_run: Vec<u32>,
}

impl Lists {
    /// An empty part, usable in constants.
    pub(crate) const EMPTY: Lists = Lists {
        all: Vec::new(),
        deny: Vec::new(),
        allow: Vec::new(),
        audit: Vec::new(),
        dry_run: Vec::new(),
    };

    fn new(indices: &[u32], policies: &[Policy]) -> Self {
        let mut lists = Lists::default();
        for &i in indices {
            let Some(p) = policies.get(i as usize) else {
                continue;
            };
            lists.all.push(i);
            let list = match (p.dry_run, p.action) {
                (true, _) => &mut lists.dry_run,
                (false, Action::Deny) => &mut lists.deny,
                (false, Action::Allow) => &mut lists.allow,
                (false, Action::Audit) => &mut lists.audit,
            };
            list.push(i);
        }
        lists
    }
}

impl SelectorGroup {
    /// Whether every pair other than the anchor is in `labels`.
    #[inline]
    pub(crate) fn rest_matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .enumerate()
            .all(|(i, (k, v))| i == self.anchor || labels.get(&**k).is_some_and(|l| **l == **v))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| labels.get(&**k).is_some_and(|l| **l == **v))
    }
}

/// A selector and the policy (index) carrying it.
type Selected = (BTreeMap<String, String>, u32);

impl SelectorIndex {
    fn build(entries: Vec<Selected>, all: &[Policy]) -> Self {
        let mut by_selector: BTreeMap<BTreeMap<String, String>, Vec<u32>> = BTreeMap::new();
        for (selector, idx) in entries {
            by_selector.entry(selector).or_default().push(idx);
        }
        // How many selectors use each pair: the rarest pair of a selector is its anchor.
        let mut frequency: HashMap<(&str, &str), usize> = HashMap::new();
        for selector in by_selector.keys() {
            for (k, v) in selector {
                *frequency.entry((k, v)).or_default() += 1;
            }
        }
        let mut groups = Vec::with_capacity(by_selector.len());
        let mut by_anchor: HashMap<u64, Vec<u32>, FxBuildHasher> = HashMap::default();
        for (selector, policies) in &by_selector {
            let anchor = selector
                .iter()
                .enumerate()
                .min_by_key(|(_, (k, v))| frequency[&(k.as_str(), v.as_str())])
                .map_or(0, |(i, _)| i);
            let labels: Box<[(Box<str>, Box<str>)]> = selector
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect();
            let (k, v) = &labels[anchor];
            let group = u32::try_from(groups.len()).unwrap_or(u32::MAX);
            by_anchor.entry(pair_hash(k, v)).or_default().push(group);
            // Pushed in index order, hence ascending.
            groups.push(SelectorGroup {
                labels,
                anchor,
                lists: Lists::new(policies, all),
            });
        }
        Self { groups, by_anchor }
    }

    /// Calls `f` with the policies of every group whose selector selects `labels`.
    #[inline]
    pub(crate) fn for_each_selected<'a>(
        &'a self,
        labels: &BTreeMap<String, String>,
        mut f: impl FnMut(&'a Lists),
    ) {
        if self.groups.is_empty() {
            return;
        }
        for (k, v) in labels {
            let Some(groups) = self.by_anchor.get(&pair_hash(k, v)) else {
                continue;
            };
            for &g in groups {
                let group = &self.groups[g as usize];
                let (ak, av) = &group.labels[group.anchor];
                if **ak == **k && **av == **v && group.rest_matches(labels) {
                    f(&group.lists);
                }
            }
        }
    }

    fn selected<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = u32> + 'a {
        self.groups
            .iter()
            .filter(move |g| g.matches(labels))
            .flat_map(|g| g.lists.all.iter().copied())
    }
}

impl PolicyIndex {
    /// Indexes `policies` for the default trust domain (`cluster.local`); see
    /// [`PolicyIndex::build_for`].
    pub fn build(policies: impl IntoIterator<Item = Policy>, root_namespace: &str) -> Self {
        Self::build_in(policies, root_namespace, DEFAULT_TRUST_DOMAIN)
    }

    /// Indexes `policies` as evaluated in `trust_domain`, the local trust domain: the one
    /// unqualified `namespaces`, `notNamespaces`, `source.namespace` and service accounts
    /// refer to. `root_namespace` (normally `membrane-system`) holds the mesh-wide policies.
    /// When two policies share a namespace and name, the one given last is kept (an update
    /// replaces).
    pub fn build_for(
        policies: impl IntoIterator<Item = Policy>,
        root_namespace: &str,
        trust_domain: &TrustDomain,
    ) -> Self {
        Self::build_in(policies, root_namespace, trust_domain.as_str())
    }

    fn build_in(
        policies: impl IntoIterator<Item = Policy>,
        root_namespace: &str,
        trust_domain: &str,
    ) -> Self {
        // Stable sort, then keep the last of equal ids.
        let mut all: Vec<Policy> = policies.into_iter().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let mut policies: Vec<Policy> = Vec::with_capacity(all.len());
        for p in all {
            match policies.last_mut() {
                Some(last) if last.id == p.id => *last = p,
                _ => policies.push(p),
            }
        }

        let mut mesh = Vec::new();
        let mut mesh_selected = Vec::new();
        let mut per_ns: BTreeMap<&str, (Vec<u32>, Vec<Selected>)> = BTreeMap::new();
        for (i, p) in policies.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let root = p.namespace() == root_namespace;
            match (root, p.selector.is_empty()) {
                (true, true) => mesh.push(i),
                (true, false) => mesh_selected.push((p.selector.clone(), i)),
                (false, true) => per_ns.entry(p.namespace()).or_default().0.push(i),
                (false, false) => per_ns
                    .entry(p.namespace())
                    .or_default()
                    .1
                    .push((p.selector.clone(), i)),
            }
        }
        let namespaces = per_ns
            .into_iter()
            .map(|(ns, (all, selected))| {
                let scope = NamespaceScope {
                    all: Lists::new(&all, &policies),
                    selectors: SelectorIndex::build(selected, &policies),
                };
                (Box::<str>::from(ns), scope)
            })
            .collect();
        Self {
            mesh: Lists::new(&mesh, &policies),
            mesh_selectors: SelectorIndex::build(mesh_selected, &policies),
            program: Program::build(&policies, trust_domain),
            policies,
            namespaces,
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// Every policy that applies to a workload in `namespace` with `labels`: mesh-wide ones,
    /// the namespace's unselective ones, then selector matches (root namespace first), each
    /// part in (namespace, name) order. For shipping a node the policies of its workloads.
    pub fn policies_for<'a>(
        &'a self,
        namespace: &str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        let scope = if namespace == self.root_namespace {
            None
        } else {
            self.namespaces.get(namespace)
        };
        let ns_all = scope.map(|s| s.all.all.as_slice()).unwrap_or_default();
        self.mesh
            .all
            .iter()
            .copied()
            .chain(ns_all.iter().copied())
            .chain(self.mesh_selectors.selected(labels))
            .chain(scope.into_iter().flat_map(|s| s.selectors.selected(labels)))
            .map(|i| &self.policies[i as usize])
    }

    /// Every policy, sorted by (namespace, name).
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The namespace whose unselective policies are mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The local trust domain the index was built for.
    pub fn trust_domain(&self) -> &str {
        self.program.local_trust_domain()
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// No policies at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The scope of a destination namespace, if it has policies of its own. The root
    /// namespace has none besides the mesh-wide ones.
    #[inline]
    pub(crate) fn namespace_scope(&self, namespace: &str) -> Option<&NamespaceScope> {
        if self.namespaces.is_empty() || namespace == self.root_namespace {
            return None;
        }
        self.namespaces.get(namespace)
    }
}

/// Hash of one label pair for the anchor index.
#[inline]
fn pair_hash(key: &str, value: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(key.as_bytes());
    h.write_u8(0xff);
    h.write(value.as_bytes());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, PolicyRef};

    fn policy(ns: &str, name: &str, selector: &[(&str, &str)]) -> Policy {
        Policy {
            id: PolicyRef::new(ns, name),
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn names(index: &PolicyIndex, ns: &str, l: &BTreeMap<String, String>) -> Vec<String> {
        index
            .policies_for(ns, l)
            .map(|p| p.id.to_string())
            .collect()
    }

    fn via_decide_path(index: &PolicyIndex, ns: &str, l: &BTreeMap<String, String>) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(index.mesh.all.iter().copied());
        index
            .mesh_selectors
            .for_each_selected(l, |g| out.extend(g.all.iter().copied()));
        if let Some(scope) = index.namespace_scope(ns) {
            out.extend(scope.all.all.iter().copied());
            scope
                .selectors
                .for_each_selected(l, |g| out.extend(g.all.iter().copied()));
        }
        out.sort_unstable();
        out.into_iter()
            .map(|i| index.policies[i as usize].id.to_string())
            .collect()
    }

    #[test]
    fn scopes() {
        let index = PolicyIndex::build(
            [
                policy("membrane-system", "mesh", &[]),
                policy("membrane-system", "mesh-db", &[("app", "db")]),
                policy("a", "ns-a", &[]),
                policy("a", "a-db", &[("app", "db")]),
                policy("a", "a-db-v2", &[("app", "db"), ("v", "2")]),
                policy("a", "a-web", &[("app", "web")]),
                policy("b", "ns-b", &[]),
                policy("b", "b-db", &[("app", "db")]),
            ],
            "membrane-system",
        );
        assert_eq!(index.len(), 8);
        let db1 = labels(&[("app", "db"), ("v", "1")]);
        let db2 = labels(&[("app", "db"), ("v", "2")]);
        assert_eq!(
            names(&index, "a", &db1),
            [
                "membrane-system/mesh",
                "a/ns-a",
                "membrane-system/mesh-db",
                "a/a-db"
            ]
        );
        assert_eq!(
            names(&index, "a", &db2),
            [
                "membrane-system/mesh",
                "a/ns-a",
                "membrane-system/mesh-db",
                "a/a-db",
                "a/a-db-v2"
            ]
        );
        assert_eq!(
            names(&index, "c", &db1),
            ["membrane-system/mesh", "membrane-system/mesh-db"]
        );
        assert_eq!(
            names(&index, "membrane-system", &labels(&[])),
            ["membrane-system/mesh"]
        );
        for (ns, l) in [("a", &db1), ("a", &db2), ("b", &db2), ("c", &db1)] {
            let mut want = names(&index, ns, l);
            want.sort();
            let mut got = via_decide_path(&index, ns, l);
            got.sort();
            assert_eq!(got, want, "{ns} {l:?}");
        }
    }

    #[test]
    fn last_duplicate_wins_and_order_is_sorted() {
        let mut second = policy("a", "p", &[]);
        second.action = Action::Deny;
        let index = PolicyIndex::build(
            [policy("b", "z", &[]), policy("a", "p", &[]), second],
            "membrane-system",
        );
        assert_eq!(index.len(), 2);
        assert_eq!(index.policies()[0].action, Action::Deny);
        assert_eq!(index.policies()[1].id.to_string(), "b/z");
        assert!(!index.is_empty());
        assert_eq!(index.root_namespace(), "membrane-system");
    }

    #[test]
    fn anchor_is_rarest_pair() {
        let index = PolicyIndex::build(
            [
                policy("a", "1", &[("app", "x"), ("tier", "t")]),
                policy("a", "2", &[("app", "y"), ("tier", "t")]),
                policy("a", "3", &[("app", "y"), ("tier", "t")]),
            ],
            "membrane-system",
        );
        let scope = index.namespace_scope("a").expect("scope");
        assert_eq!(
            scope.selectors.groups.len(),
            2,
            "identical selectors share a group"
        );
        for g in &scope.selectors.groups {
            assert_eq!(&*g.labels[g.anchor].0, "app");
        }
    }

    #[test]
    fn fx_hash_distinguishes_pairs() {
        assert_ne!(pair_hash("a", "bc"), pair_hash("ab", "c"));
        assert_ne!(pair_hash("app", "x"), pair_hash("app", "y"));
        assert_eq!(pair_hash("app", "x"), pair_hash("app", "x"));
    }
}
