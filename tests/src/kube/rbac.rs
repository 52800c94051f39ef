//! The chart's RBAC against what the controller really asked for: its ClusterRole's and
//! Role's grants ([`Grant`]), its requests from the API server's audit log ([`Use`]), and
//! the comparison ([`RbacReport`]): denials (a permission the chart lacks) and grants never
//! used (a permission beyond need), each named.

use std::collections::BTreeSet;

use anyhow::bail;
use membrane_testbed::kube::KubeApi;
use serde_json::Value;

use super::{Chart, NAMESPACE};

/// One permission a Role grants: `verb` on `group`/`resource` (a subresource as
/// `resource/sub`), cluster-wide or in `namespace`, on any object or only on `names`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// API group (`""`: core).
    pub group: String,
    /// Resource, with `/subresource`.
    pub resource: String,
    /// Verb.
    pub verb: String,
    /// `None`: a ClusterRole's grant.
    pub namespace: Option<String>,
    /// Resource names (empty: any).
    pub names: BTreeSet<String>,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {} ({group})", self.verb, self.resource)?;
        if let Some(ns) = &self.namespace {
            write!(f, " in {ns}")?;
        }
        if !self.names.is_empty() {
            write!(f, " named {:?}", self.names)?;
        }
        Ok(())
    }
}

/// One request of the controller, from the API server's audit log.
#[derive(Debug, Clone)]
pub struct Use {
    /// What was asked (namespace and name as requested).
    pub grant: Grant,
    /// `true` when RBAC allowed it.
    pub allowed: bool,
    /// The authorizer's reason (for a denial).
    pub reason: String,
}

impl Use {
    fn from_event(event: &Value) -> Option<Self> {
        let object = &event["objectRef"];
        let resource = object["resource"].as_str()?;
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let annotations = &event["annotations"];
        Some(Self {
            grant: Grant {
                group: object["apiGroup"].as_str().unwrap_or_default().to_owned(),
                resource,
                verb: event["verb"].as_str()?.to_owned(),
                namespace: object["namespace"].as_str().map(str::to_owned),
                names: object["name"]
                    .as_str()
                    .map(str::to_owned)
                    .into_iter()
                    .collect(),
            },
            allowed: annotations["authorization.k8s.io/decision"] == "allow",
            reason: annotations["authorization.k8s.io/reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    fn covered_by(&self, grant: &Grant) -> bool {
        let g = &self.grant;
        g.group == grant.group
            && g.resource == grant.resource
            && g.verb == grant.verb
            && (grant.namespace.is_none() || g.namespace == grant.namespace)
            && (grant.names.is_empty() || g.names.iter().all(|n| grant.names.contains(n)))
    }
}

/// What the controller was denied, and what it was granted but never used.
#[derive(Debug, Default)]
pub struct RbacReport {
    /// Requests RBAC refused: a permission the chart lacks.
    pub denied: Vec<String>,
    /// Grants no request used: a permission beyond need.
    pub unused: Vec<String>,
    /// How many requests were compared.
    pub requests: usize,
}

impl RbacReport {
    /// Compares the controller ServiceAccount's audited requests with the chart's grants.
    pub fn of(api: &KubeApi, chart: &Chart) -> anyhow::Result<Self> {
        let user = format!(
            "system:serviceaccount:{NAMESPACE}:{}",
            chart.controller_account()?
        );
        let uses: Vec<Use> = (api.audit_events(&user)?.iter())
            .filter_map(Use::from_event)
            .collect();
        let mut denied: BTreeSet<String> = BTreeSet::new();
        for u in uses.iter().filter(|u| !u.allowed) {
            denied.insert(format!(
                "the controller was denied {} ({})",
                u.grant, u.reason
            ));
        }
        let unused = chart
            .grants()
            .into_iter()
            .filter(|g| !uses.iter().any(|u| u.allowed && u.covered_by(g)))
            .map(|g| format!("the chart grants {g}, which the controller never used"))
            .collect();
        Ok(Self {
            denied: denied.into_iter().collect(),
            unused,
            requests: uses.len(),
        })
    }

    /// An error listing every finding; `Ok` when there is none.
    pub fn check(&self) -> anyhow::Result<()> {
        let findings: Vec<&String> = self.denied.iter().chain(&self.unused).collect();
        if findings.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = findings.iter().map(|f| format!("  - {f}")).collect();
        bail!(
            "the chart's RBAC does not match what the controller does ({} requests audited):\n{}",
            self.requests,
            lines.join("\n")
        )
    }
}
