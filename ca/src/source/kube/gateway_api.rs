//! Gateway API objects (`gateway.networking.k8s.io`: `Gateway` v1, `TCPRoute` and `TLSRoute`
//! v1alpha2) → validated `membrane_policy::gateway` values, read as dynamic objects since their
//! CRDs belong to the Gateway API project and may be absent.
//!
//! They are optional: a 404 on their list (CRDs not installed) makes the source treat them as
//! empty — the rest of the cluster is still published — and the watchers keep retrying, so
//! installing the CRDs later brings them in. An invalid object is logged with its field paths
//! and left out (no status is written to Gateway API objects yet).

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use membrane_policy::gateway::{GatewayObject, Route, RouteKind, check_gateway_value};

use super::convert::Key;

/// Gateways (resource name as in logs and metrics).
pub const GATEWAYS: &str = "gateways";
/// TCPRoutes.
pub const TCP_ROUTES: &str = "tcproutes";
/// TLSRoutes.
pub const TLS_ROUTES: &str = "tlsroutes";
/// The optional resources.
pub const OPTIONAL: [&str; 3] = [GATEWAYS, TCP_ROUTES, TLS_ROUTES];

/// The API resource of one of [`OPTIONAL`].
pub fn api_resource(resource: &str) -> ApiResource {
    let (version, kind) = match resource {
        GATEWAYS => ("v1", "Gateway"),
        TCP_ROUTES => ("v1alpha2", "TCPRoute"),
        _ => ("v1alpha2", "TLSRoute"),
    };
    let gvk = GroupVersionKind::gvk(membrane_policy::gateway::validate::GROUP, version, kind);
    ApiResource::from_gvk_with_plural(&gvk, resource)
}

/// `(namespace, name)` of a dynamic object.
pub fn key(obj: &DynamicObject) -> Option<Key> {
    Some((obj.metadata.namespace.clone()?, obj.metadata.name.clone()?))
}

fn checked(obj: DynamicObject) -> Option<(Key, GatewayObject)> {
    let key = key(&obj)?;
    let value = serde_json::to_value(&obj).ok()?;
    match check_gateway_value(1, value) {
        Ok(Some(object)) => Some((key, object)),
        Ok(None) => None,
        Err(errors) => {
            for e in &errors {
                tracing::warn!(object = %e.object, field = %e.path, error = %e.message, "Gateway API object refused");
            }
            None
        }
    }
}

/// A `Gateway`, validated.
pub fn gateway(obj: DynamicObject) -> Option<(Key, membrane_policy::gateway::Gateway)> {
    match checked(obj)? {
        (key, GatewayObject::Gateway(g)) => Some((key, g)),
        _ => None,
    }
}

/// A `TCPRoute` or `TLSRoute`, validated.
pub fn route(obj: DynamicObject) -> Option<(Key, Route)> {
    match checked(obj)? {
        (key, GatewayObject::Route(r)) => Some((key, r)),
        _ => None,
    }
}

/// The state's key of a route.
pub fn route_key(key: &Key, route: &Route) -> (String, String, &'static str) {
    let kind = match route.kind {
        RouteKind::Tcp => "TCPRoute",
        RouteKind::Tls => "TLSRoute",
    };
    (key.0.clone(), key.1.clone(), kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server's creation time reaches the route model (it decides route conflicts).
    #[test]
    fn a_route_carries_its_creation_time() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1alpha2",
            "kind": "TCPRoute",
            "metadata": {
                "name": "raw",
                "namespace": "tenant-a",
                "uid": "d6a1",
                "resourceVersion": "7",
                "creationTimestamp": "2024-05-01T12:00:00Z",
            },
            "spec": {
                "parentRefs": [{"name": "shared", "namespace": "gateways"}],
                "rules": [{"backendRefs": [{"name": "app", "port": 9000}]}],
            },
        }))
        .expect("a dynamic object");
        let (key, route) = route(obj).expect("valid");
        assert_eq!(key, ("tenant-a".to_owned(), "raw".to_owned()));
        let created = route.created.expect("creation time");
        let since = created
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        assert_eq!(since.as_secs(), 1_714_564_800);
    }
}
