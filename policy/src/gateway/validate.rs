//! Validation of `Gateway`, `TCPRoute` and `TLSRoute` documents: every value interpreted,
//! every error with its field path, a text with any error refused whole. What Membrane does
//! not do is refused by name rather than ignored: HTTP listeners, TLS termination, route
//! namespaces chosen by selector, backends in another namespace (they would need a
//! `ReferenceGrant`), backends that are not Services.

use serde::Deserialize;
use serde_json::Value;

use super::{Backend, Gateway, Listener, ListenerProtocol, ParentRef, Route, RouteKind};
use crate::egress::validate::parse_host;

/// The API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// One problem: which object, where, what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {path}: {message}")]
pub struct GatewayError {
    /// `Kind namespace/name`, or `document N` when the name is unknown.
    pub object: String,
    /// Field path, e.g. `spec.rules[0].backendRefs[1].port`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default, rename = "creationTimestamp")]
    creation_timestamp: Option<String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewayDoc {
    metadata: Meta,
    spec: GatewaySpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GatewaySpec {
    gateway_class_name: String,
    listeners: Vec<ListenerDoc>,
    #[serde(default)]
    addresses: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListenerDoc {
    name: String,
    port: u32,
    protocol: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    tls: Option<TlsDoc>,
    #[serde(default)]
    allowed_routes: Option<AllowedRoutesDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsDoc {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    certificate_refs: Vec<Value>,
    #[serde(default)]
    options: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AllowedRoutesDoc {
    #[serde(default)]
    namespaces: Option<RouteNamespacesDoc>,
    #[serde(default)]
    kinds: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteNamespacesDoc {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    selector: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteDoc {
    metadata: Meta,
    spec: RouteSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteSpec {
    parent_refs: Vec<ParentRefDoc>,
    #[serde(default)]
    hostnames: Vec<String>,
    rules: Vec<RouteRuleDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParentRefDoc {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
    #[serde(default)]
    section_name: Option<String>,
    #[serde(default)]
    port: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteRuleDoc {
    #[serde(default)]
    name: Option<String>,
    backend_refs: Vec<BackendRefDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendRefDoc {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    weight: Option<u32>,
}

/// What a text held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Gateways.
    pub gateways: Vec<Gateway>,
    /// Routes.
    pub routes: Vec<Route>,
}

/// Which namespaces' routes a listener admits.
fn allowed_from(doc: Option<&AllowedRoutesDoc>) -> Result<bool, (String, String)> {
    let Some(ns) = doc.and_then(|d| d.namespaces.as_ref()) else {
        return Ok(false);
    };
    if ns.selector.is_some() {
        return Err((
            "allowedRoutes.namespaces.selector".into(),
            "routes chosen by namespace selector are not supported: use from: Same or All".into(),
        ));
    }
    match ns.from.as_deref() {
        None | Some("Same") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err((
            "allowedRoutes.namespaces.from".into(),
            format!("{other:?}: expected Same or All"),
        )),
    }
}

fn port(value: u32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is not a port (1-65535)"))
}

fn names(meta: &Meta) -> Result<(), (String, String)> {
    crate::validate::object_name(&meta.name)
        .map_err(|e| ("metadata.name".to_owned(), format!("{:?}: {e}", meta.name)))?;
    membrane_identity::spiffe_id::validate_namespace(&meta.namespace).map_err(|e| {
        (
            "metadata.namespace".to_owned(),
            format!("{:?}: {e}", meta.namespace),
        )
    })
}

fn check_gateway(doc: GatewayDoc, err: &mut impl FnMut(String, String)) -> Option<Gateway> {
    let before = std::cell::Cell::new(0usize);
    let mut count = |path: String, message: String| {
        before.set(before.get() + 1);
        err(path, message);
    };
    if let Err((p, m)) = names(&doc.metadata) {
        count(p, m);
    }
    if !doc.spec.addresses.is_empty() {
        count(
            "spec.addresses".into(),
            "requested addresses are not supported: the gateway's Service decides its address"
                .into(),
        );
    }
    if doc.spec.listeners.is_empty() {
        count("spec.listeners".into(), "a gateway needs a listener".into());
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for (i, l) in doc.spec.listeners.into_iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        let port = match port(l.port) {
            Ok(p) => p,
            Err(e) => {
                count(format!("{at}.port"), e);
                continue;
            }
        };
        let protocol = match (l.protocol.as_str(), l.tls.as_ref()) {
            ("TCP", None) => ListenerProtocol::Tcp,
            ("TCP", Some(_)) => {
                count(
                    format!("{at}.tls"),
                    "a TCP listener has no TLS settings".into(),
                );
                continue;
            }
            ("TLS", Some(tls)) if tls.mode.as_deref().unwrap_or("Terminate") == "Passthrough" => {
                if !tls.certificate_refs.is_empty() || tls.options.is_some() {
                    count(
                        format!("{at}.tls"),
                        "certificates and options belong to termination; passthrough takes none"
                            .into(),
                    );
                }
                ListenerProtocol::TlsPassthrough
            }
            ("TLS", _) => {
                count(
                    format!("{at}.tls.mode"),
                    "only Passthrough: the mesh carries the client's TLS unopened".into(),
                );
                continue;
            }
            (other, _) => {
                count(
                    format!("{at}.protocol"),
                    format!("{other:?}: expected TCP or TLS (Membrane is L4; no HTTP listeners)"),
                );
                continue;
            }
        };
        let hostname = match l.hostname.as_deref().map(parse_host) {
            None => None,
            Some(Ok(h)) if protocol == ListenerProtocol::TlsPassthrough => Some(h),
            Some(Ok(_)) => {
                count(
                    format!("{at}.hostname"),
                    "only a TLS listener can match server names".into(),
                );
                None
            }
            Some(Err(e)) => {
                count(format!("{at}.hostname"), e);
                None
            }
        };
        let route_kind = match protocol {
            ListenerProtocol::Tcp => "TCPRoute",
            ListenerProtocol::TlsPassthrough => "TLSRoute",
        };
        let kinds = l.allowed_routes.as_ref().map(|a| a.kinds.as_slice());
        for (k, kind) in kinds.unwrap_or_default().iter().enumerate() {
            if kind.get("kind").and_then(Value::as_str) != Some(route_kind) {
                count(
                    format!("{at}.allowedRoutes.kinds[{k}]"),
                    format!("a {} listener takes {route_kind}s only", l.protocol),
                );
            }
        }
        let all = match allowed_from(l.allowed_routes.as_ref()) {
            Ok(all) => all,
            Err((p, m)) => {
                count(format!("{at}.{p}"), m);
                false
            }
        };
        if let Err(e) = crate::validate::object_name(&l.name) {
            count(format!("{at}.name"), format!("{:?}: {e}", l.name));
        }
        if listeners.iter().any(|o| o.name == l.name) {
            count(format!("{at}.name"), format!("listener {:?} twice", l.name));
        }
        if listeners.iter().any(|o| o.port == port) {
            count(
                format!("{at}.port"),
                format!("port {port} is already another listener's"),
            );
        }
        listeners.push(Listener {
            name: l.name,
            port,
            protocol,
            hostname,
            routes_from_all_namespaces: all,
        });
    }
    if before.get() > 0 {
        return None;
    }
    Some(Gateway {
        namespace: doc.metadata.namespace,
        name: doc.metadata.name,
        class: doc.spec.gateway_class_name,
        listeners,
    })
}

fn check_route(
    kind: RouteKind,
    doc: RouteDoc,
    err: &mut impl FnMut(String, String),
) -> Option<Route> {
    let errors = std::cell::Cell::new(0usize);
    let mut count = |path: String, message: String| {
        errors.set(errors.get() + 1);
        err(path, message);
    };
    if let Err((p, m)) = names(&doc.metadata) {
        count(p, m);
    }
    let namespace = doc.metadata.namespace.clone();
    let created = match doc.metadata.creation_timestamp.as_deref() {
        Some(t) => super::order::parse_created(t)
            .map_err(|e| count("metadata.creationTimestamp".into(), e))
            .ok(),
        None => None,
    };
    if doc.spec.parent_refs.is_empty() {
        count(
            "spec.parentRefs".into(),
            "a route needs a parent gateway".into(),
        );
    }
    let mut parents = Vec::new();
    for (i, p) in doc.spec.parent_refs.into_iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if p.group.as_deref().is_some_and(|g| g != GROUP)
            || p.kind.as_deref().is_some_and(|k| k != "Gateway")
        {
            count(at.clone(), "a parent must be a Gateway".into());
        }
        let port = match p.port.map(port) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                count(format!("{at}.port"), e);
                None
            }
        };
        if let Err(e) = crate::validate::object_name(&p.name) {
            count(format!("{at}.name"), format!("{:?}: {e}", p.name));
        }
        if let Some(ns) = &p.namespace
            && let Err(e) = membrane_identity::spiffe_id::validate_namespace(ns)
        {
            count(format!("{at}.namespace"), format!("{ns:?}: {e}"));
        }
        if let Some(section) = &p.section_name
            && let Err(e) = crate::validate::object_name(section)
        {
            count(format!("{at}.sectionName"), format!("{section:?}: {e}"));
        }
        parents.push(ParentRef {
            namespace: p.namespace.unwrap_or_else(|| namespace.clone()),
            name: p.name,
            section: p.section_name,
            port,
        });
    }
    let mut hostnames = Vec::new();
    for (i, h) in doc.spec.hostnames.iter().enumerate() {
        match parse_host(h) {
            Ok(h) => hostnames.push(h),
            Err(e) => count(format!("spec.hostnames[{i}]"), e),
        }
    }
    match kind {
        RouteKind::Tls if doc.spec.hostnames.is_empty() => count(
            "spec.hostnames".into(),
            "a TLSRoute needs the server names it takes".into(),
        ),
        RouteKind::Tcp if !doc.spec.hostnames.is_empty() => count(
            "spec.hostnames".into(),
            "a TCPRoute has no server names".into(),
        ),
        _ => {}
    }
    let mut backends = Vec::new();
    let mut backend_paths = Vec::new();
    if doc.spec.rules.is_empty() {
        count(
            "spec.rules".into(),
            "a route needs a rule with a backend".into(),
        );
    }
    for (r, rule) in doc.spec.rules.into_iter().enumerate() {
        if rule.backend_refs.is_empty() {
            count(
                format!("spec.rules[{r}].backendRefs"),
                "a rule needs a backend".into(),
            );
        }
        let _ = rule.name;
        for (b, backend) in rule.backend_refs.into_iter().enumerate() {
            let at = format!("spec.rules[{r}].backendRefs[{b}]");
            if backend.group.as_deref().is_some_and(|g| !g.is_empty())
                || backend.kind.as_deref().is_some_and(|k| k != "Service")
            {
                count(at.clone(), "a backend must be a Service".into());
                continue;
            }
            if backend.namespace.as_ref().is_some_and(|n| *n != namespace) {
                count(
                    format!("{at}.namespace"),
                    "a backend in another namespace needs a ReferenceGrant, which is not supported: put the route in the Service's namespace".into(),
                );
                continue;
            }
            if backend.weight == Some(0) {
                continue;
            }
            let port = match backend.port.map(port) {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    count(format!("{at}.port"), e);
                    continue;
                }
                None => {
                    count(
                        format!("{at}.port"),
                        "a Service backend needs a port".into(),
                    );
                    continue;
                }
            };
            if let Err(e) = crate::validate::object_name(&backend.name) {
                count(format!("{at}.name"), format!("{:?}: {e}", backend.name));
                continue;
            }
            backends.push(Backend {
                namespace: namespace.clone(),
                service: backend.name,
                port,
            });
            backend_paths.push(at);
        }
    }
    if errors.get() > 0 {
        return None;
    }
    Some(Route {
        kind,
        namespace,
        name: doc.metadata.name,
        parents,
        hostnames,
        backends,
        backend_paths,
        created,
    })
}

/// One Gateway API object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayObject {
    /// A `Gateway`.
    Gateway(Gateway),
    /// A `TCPRoute` or `TLSRoute`.
    Route(Route),
}

/// Validates one document (document number `n`, 1-based, for messages): `Ok(None)` when it is
/// not a `Gateway`, `TCPRoute` or `TLSRoute` of the Gateway API group.
pub fn check_gateway_value(
    n: usize,
    doc: Value,
) -> Result<Option<GatewayObject>, Vec<GatewayError>> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let api = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(version) = api.strip_prefix(GROUP).and_then(|v| v.strip_prefix('/')) else {
        return Ok(None);
    };
    let supported = match kind.as_str() {
        "Gateway" => ["v1", "v1beta1"].contains(&version),
        "TCPRoute" => version == "v1alpha2",
        "TLSRoute" => ["v1alpha2", "v1alpha3"].contains(&version),
        _ => return Ok(None),
    };
    let object = match (
        doc.pointer("/metadata/namespace").and_then(Value::as_str),
        doc.pointer("/metadata/name").and_then(Value::as_str),
    ) {
        (ns, Some(name)) => format!("{kind} {}/{name}", ns.unwrap_or("default")),
        _ => format!("document {n}"),
    };
    let mut errors = Vec::new();
    let mut err = |path: String, message: String| {
        errors.push(GatewayError {
            object: object.clone(),
            path,
            message,
        });
    };
    let checked = if !supported {
        err(
            "apiVersion".into(),
            format!("{api} is not a supported version of {kind}"),
        );
        None
    } else if kind == "Gateway" {
        match serde_path_to_error::deserialize::<_, GatewayDoc>(doc) {
            Ok(doc) => check_gateway(doc, &mut err).map(GatewayObject::Gateway),
            Err(e) => {
                err(e.path().to_string(), e.inner().to_string());
                None
            }
        }
    } else {
        let route_kind = if kind == "TCPRoute" {
            RouteKind::Tcp
        } else {
            RouteKind::Tls
        };
        match serde_path_to_error::deserialize::<_, RouteDoc>(doc) {
            Ok(doc) => check_route(route_kind, doc, &mut err).map(GatewayObject::Route),
            Err(e) => {
                err(e.path().to_string(), e.inner().to_string());
                None
            }
        }
    };
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(errors)
    }
}

/// Reads every `Gateway`, `TCPRoute` and `TLSRoute` of `text` (other kinds are skipped); all
/// or nothing.
pub fn parse_gateway_config(text: &str) -> Result<GatewayConfig, Vec<GatewayError>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        vec![GatewayError {
            object: "input".into(),
            path: String::new(),
            message: format!("not valid YAML: {e}"),
        }]
    })?;
    let mut config = GatewayConfig::default();
    let mut errors = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        match check_gateway_value(i + 1, doc) {
            Ok(Some(GatewayObject::Gateway(g))) => config.gateways.push(g),
            Ok(Some(GatewayObject::Route(r))) => config.routes.push(r),
            Ok(None) => {}
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}
