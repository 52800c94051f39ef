//! The `EgressPolicy` document as users write it (`security.membrane.dev/v1`): serde types
//! only. Unknown fields under `spec` are refused; values are not interpreted here (hosts,
//! CIDRs, ports, quantities and durations are `validate`'s job).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::model::{Metadata, WorkloadSelector};

/// The `kind` of an egress policy document.
pub const KIND: &str = "EgressPolicy";

/// One `EgressPolicy` document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicyDoc {
    /// Always `security.membrane.dev/v1`.
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// Name, namespace and annotations (the dry-run annotation is read).
    pub metadata: Metadata,
    /// The policy.
    #[serde(default)]
    pub spec: EgressSpec,
}

/// `spec` of an `EgressPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressSpec {
    /// Workloads the policy applies to; absent or empty → the whole namespace (the root
    /// namespace: the whole mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (the default), `DENY` or `AUDIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Rules; an ALLOW policy without rules allows nothing (its sources may leave for no
    /// destination).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EgressRuleDoc>,
    /// Byte budget per (source identity, host, window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetDoc>,
}

/// One rule: any of its `from` (all sources the policy selects when absent) to any of its
/// `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRuleDoc {
    /// Sources, narrowed further than the selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<EgressFromDoc>,
    /// Destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<EgressToDoc>,
    /// Leave through this egress gateway instead of from the source's node (ALLOW only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<ViaDoc>,
}

/// `via`: the egress gateway a rule's connections leave through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ViaDoc {
    /// The gateway's name.
    pub gateway: String,
    /// Its namespace; absent: the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A source condition: its principals or service accounts (either matches).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressFromDoc {
    /// SPIFFE IDs (`td/ns/N/sa/S`, with or without `spiffe://`), `prefix*`, `*suffix`, `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// `namespace/name` service accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

/// A destination: by name (the pod's own DNS pins) or by address, on some ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressToDoc {
    /// `name.example` or `*.suffix.example`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Ports (numbers or numeric strings); empty: any port.
    #[serde(
        default,
        deserialize_with = "crate::model::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<String>,
    /// CIDRs or addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// On a TLS port, a connection without SNI may match this entry's hosts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_missing_sni: bool,
}

/// `budget`: quantities like `1Gi`, `500M`, `1048576`; `per` a duration like `1h`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetDoc {
    /// Bytes the source may send per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_bytes: Option<serde_json::Value>,
    /// Bytes the source may receive per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<serde_json::Value>,
    /// The window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
}

/// Annotations of a document (for the dry-run check).
pub type Annotations = BTreeMap<String, String>;
