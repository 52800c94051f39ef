//! `TrustFederation` custom resources (cluster-scoped), judged by the same code as the
//! manifest directory's (`crate::federation::spec`). An invalid version is logged with its
//! field and ignored: the last valid version of that object stays in force (a federation
//! never disappears, nor changes its trust, because of a typo).

use crate::crd::TrustFederation as Resource;
use crate::federation::TrustFederation;

/// A converted object: the federation, or `None` when this version is invalid.
pub type FederationValue = Option<TrustFederation>;

/// The key of a TrustFederation: its name.
pub fn key(obj: &Resource) -> Option<String> {
    obj.metadata.name.clone()
}

/// Converts one object; an invalid one is logged and yields `None`.
pub fn federation(obj: Resource) -> Option<(String, FederationValue)> {
    let name = obj.metadata.name.clone()?;
    let value = serde_json::json!({
        "apiVersion": "security.membrane.dev/v1",
        "kind": crate::federation::spec::KIND,
        "metadata": {"name": name},
        "spec": obj.spec.fields,
    });
    match crate::federation::spec::parse(value) {
        Ok(federation) => Some((name, Some(federation))),
        Err((field, message)) => {
            tracing::warn!(federation = %name, field, error = %message, "invalid TrustFederation ignored; its last valid version stays in force");
            Some((name, None))
        }
    }
}

/// What to keep for `next`: itself when valid, else the last valid version (`previous`).
pub fn keep_last_valid(
    previous: Option<&FederationValue>,
    next: FederationValue,
) -> FederationValue {
    next.or_else(|| previous.cloned().flatten())
}
