//! The `AuthorizationPolicy`, `EgressPolicy` and `TrustFederation` custom resources
//! (`security.membrane.dev/v1`) as the Kubernetes source reads them and the status writer
//! updates them (the policies' status; a TrustFederation has none).
//!
//! The schema below `spec` is deliberately open (`x-kubernetes-preserve-unknown-fields`):
//!
//! - `membrane_policy` is the one judge of a policy. It accepts things a typed OpenAPI schema
//!   would refuse (integers where Istio writes strings, `ports: [8080]`) and refuses things a
//!   schema cannot express (unknown `when` keys, malformed principals, `CUSTOM`). A second,
//!   different set of rules in the API server would make `kubectl apply` and `membrane policy
//!   check` disagree.
//! - An invalid policy must still be *stored*, so the controller can see it and say what is
//!   wrong in `status.conditions` (`Accepted=False`, with the field path). A schema stricter
//!   than validation would turn that into an admission error only the person running
//!   `kubectl` ever sees, and the typed watcher would never learn of it.
//! - Every stored object deserializes into [`AuthorizationPolicy`] (the spec is any JSON
//!   object), so one odd policy can never break the watch of all the others.
//!
//! The only constraint the CRD adds is that `spec` exists and is an object (write `spec: {}`
//! for the allow-nothing policy), which the typed watcher needs.
//!
//! `status.conditions` follows Kubernetes' `metav1.Condition`; see [`crate::status`] for the
//! condition types written.
//!
//! The committed manifest `charts/membrane/crds/authorizationpolicies.yaml` is generated from
//! these types; the test `committed_crd_matches_the_rust_type` fails when they drift, and
//! `MEMBRANE_REGENERATE_CRD=1 cargo test -p membrane-ca --lib crd::` rewrites it.

use std::borrow::Cow;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API version of the custom resource.
pub const VERSION: &str = "v1";

/// Where the generated manifest lives, relative to the workspace root.
pub const CRD_PATH: &str = "charts/membrane/crds/authorizationpolicies.yaml";

/// `spec` of an `AuthorizationPolicy`: any JSON object, kept verbatim.
///
/// The controller types and validates it with `membrane_policy` (the same code as `membrane
/// policy check`); see the module docs for why the schema is open.
// Several `printcolumn(...)` entries repeat the same keys; that is the derive's syntax.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.membrane.dev",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    singular = "authorizationpolicy",
    namespaced,
    status = "AuthorizationPolicyStatus",
    category = "membrane",
    derive = "PartialEq",
    doc = "Identity-based L4 authorization for mesh workloads (Istio's AuthorizationPolicy schema).",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "ALLOW (default), DENY or AUDIT"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the controller accepted and distributes the policy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct AuthorizationPolicySpec {
    /// The fields of `spec`, as written.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl JsonSchema for AuthorizationPolicySpec {
    fn schema_name() -> Cow<'static, str> {
        "AuthorizationPolicySpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Istio-compatible AuthorizationPolicy spec (selector, action, rules). \
                Validated by the controller, which reports problems in status.conditions.",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// Where the generated EgressPolicy manifest lives, relative to the workspace root.
pub const EGRESS_CRD_PATH: &str = "charts/membrane/crds/egresspolicies.yaml";

/// `spec` of an `EgressPolicy`: any JSON object, kept verbatim and judged by
/// `membrane_policy::egress` (open for the same reasons as [`AuthorizationPolicySpec`]).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.membrane.dev",
    version = "v1",
    kind = "EgressPolicy",
    plural = "egresspolicies",
    singular = "egresspolicy",
    namespaced,
    status = "AuthorizationPolicyStatus",
    category = "membrane",
    derive = "PartialEq",
    doc = "Which destinations outside the mesh a workload identity may reach, by DNS name, address and port, with byte budgets.",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "ALLOW (default), DENY or AUDIT"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the controller accepted and distributes the policy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct EgressPolicySpec {
    /// The fields of `spec`, as written.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl JsonSchema for EgressPolicySpec {
    fn schema_name() -> Cow<'static, str> {
        "EgressPolicySpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "EgressPolicy spec (selector, action, rules of hosts/ports/ipBlocks, \
                budget). Validated by the controller, which reports problems in \
                status.conditions.",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// Where the generated TrustFederation manifest lives, relative to the workspace root.
pub const FEDERATION_CRD_PATH: &str = "charts/membrane/crds/trustfederations.yaml";

/// `spec` of a `TrustFederation` (cluster-scoped): any JSON object, kept verbatim and judged
/// by `federation::spec` (the same code as the manifest directory's), so an invalid edit is
/// stored, logged and ignored — the last valid version stays in force.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.membrane.dev",
    version = "v1",
    kind = "TrustFederation",
    plural = "trustfederations",
    singular = "trustfederation",
    category = "membrane",
    derive = "PartialEq",
    doc = "A federated trust domain: its SPIFFE bundle endpoint, the bundle that vouches for the first fetch, and optionally the controller whose exported Services are imported.",
    printcolumn(
        name = "TrustDomain",
        type_ = "string",
        json_path = ".spec.trustDomain",
        description = "The federated trust domain"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct TrustFederationSpec {
    /// The fields of `spec`, as written.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl JsonSchema for TrustFederationSpec {
    fn schema_name() -> Cow<'static, str> {
        "TrustFederationSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "TrustFederation spec (trustDomain, bundleEndpoint.url and \
                .spiffeId, bootstrapBundle, serviceExports.url and .addresses, \
                eastWestGateway.address and .spiffeId). Validated by the controller; \
                an invalid version is logged and the last valid one stays in force.",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// The TrustFederation CustomResourceDefinition as YAML, with the committed file's header.
pub fn federation_crd_yaml() -> String {
    use kube::CustomResourceExt;
    generated_yaml("TrustFederation", &TrustFederation::crd())
}

/// `status` of an `AuthorizationPolicy` or `EgressPolicy`, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// Conditions (`Accepted`, `Warning`), one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A status condition, shaped like Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type (`Accepted`, `Warning`).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    #[serde(default)]
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// The CustomResourceDefinition as YAML, with the header comment of the committed file.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    generated_yaml("AuthorizationPolicy", &AuthorizationPolicy::crd())
}

/// The EgressPolicy CustomResourceDefinition as YAML, with the committed file's header.
pub fn egress_crd_yaml() -> String {
    use kube::CustomResourceExt;
    generated_yaml("EgressPolicy", &EgressPolicy::crd())
}

fn generated_yaml(
    kind: &str,
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    let body =
        serde_saphyr::to_string(crd).unwrap_or_else(|e| format!("# serialization failed: {e}\n"));
    format!(
        "# Generated from ca/src/crd.rs (membrane_ca::crd::{kind}); do not edit.\n\
         # Regenerate: MEMBRANE_REGENERATE_CRD=1 cargo test -p membrane-ca --lib crd::\n\
         # The test committed_crd_matches_the_rust_type fails when this file drifts.\n\
         ---\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use kube::{CustomResourceExt, Resource};

    use super::*;

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_PATH)
    }

    #[test]
    fn committed_crd_matches_the_rust_type() {
        check_committed(committed_path(), crd_yaml());
        check_committed(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(FEDERATION_CRD_PATH),
            federation_crd_yaml(),
        );
        check_committed(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(EGRESS_CRD_PATH),
            egress_crd_yaml(),
        );
    }

    fn check_committed(path: PathBuf, generated: String) {
        if std::env::var_os("MEMBRANE_REGENERATE_CRD").is_some() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).expect("create the chart's crds directory");
            }
            std::fs::write(&path, &generated).expect("write the CRD");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let parse = |text: &str| -> serde_json::Value {
            serde_saphyr::from_str(text).expect("the CRD manifest is YAML")
        };
        assert!(
            !committed.is_empty() && parse(&committed) == parse(&generated),
            "{} is out of date with ca/src/crd.rs; regenerate it with \
             MEMBRANE_REGENERATE_CRD=1 cargo test -p membrane-ca --lib crd::",
            path.display()
        );
    }

    #[test]
    fn egress_crd_is_namespaced_with_status_and_an_open_spec() {
        let crd = serde_json::to_value(EgressPolicy::crd()).expect("json");
        assert_eq!(
            crd["metadata"]["name"],
            "egresspolicies.security.membrane.dev"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert!(version["subresources"]["status"].is_object());
        let schema = &version["schema"]["openAPIV3Schema"]["properties"];
        assert_eq!(schema["spec"]["x-kubernetes-preserve-unknown-fields"], true);
    }

    #[test]
    fn crd_is_namespaced_with_status_and_an_open_spec() {
        let crd = serde_json::to_value(AuthorizationPolicy::crd()).expect("json");
        assert_eq!(
            crd["metadata"]["name"],
            "authorizationpolicies.security.membrane.dev"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1");
        assert!(version["subresources"]["status"].is_object());
        let schema = &version["schema"]["openAPIV3Schema"]["properties"];
        assert_eq!(
            schema["spec"]["x-kubernetes-preserve-unknown-fields"], true,
            "{schema}"
        );
        let condition = &schema["status"]["properties"]["conditions"]["items"]["properties"];
        for field in [
            "type",
            "status",
            "reason",
            "message",
            "observedGeneration",
            "lastTransitionTime",
        ] {
            assert!(condition[field].is_object(), "condition field {field}");
        }
        assert_eq!(
            AuthorizationPolicy::api_version(&()),
            "security.membrane.dev/v1"
        );
    }

    #[test]
    fn any_spec_object_round_trips() {
        let value = serde_json::json!({
            "apiVersion": "security.membrane.dev/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "ns", "generation": 3},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [8080]}}]}],
                     "unknownField": {"x": 1}},
            "status": {"conditions": [{"type": "Accepted", "status": "True"}]}
        });
        let policy: AuthorizationPolicy = serde_json::from_value(value.clone()).expect("typed");
        assert_eq!(policy.spec.fields["action"], "DENY");
        assert_eq!(
            policy
                .status
                .as_ref()
                .map(|s| s.conditions[0].type_.as_str()),
            Some("Accepted")
        );
        let back = serde_json::to_value(&policy).expect("json");
        assert_eq!(back["spec"], value["spec"]);
    }
}
