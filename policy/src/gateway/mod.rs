//! Ingress in the Kubernetes Gateway API's shape (`gateway.networking.k8s.io`, DESIGN.md §10):
//! a `Gateway` whose listeners take TCP by port or TLS by server name (passthrough only — the
//! mesh never terminates a client's TLS), and `TCPRoute` / `TLSRoute` objects that attach mesh
//! Services to those listeners. The same YAML serves the directory source and, in Kubernetes,
//! the Gateway API CRDs.
//!
//! Flow: text → [`validate::parse_gateway_config`] ([`Gateway`]s and [`Route`]s, every error
//! with its field path, all or nothing) → [`IngressTable::build`] for one gateway, each route
//! accepted or refused on its own: a route whose backend names no existing Service or port, or
//! that loses a server name or a listener to an older route ([`order`]), is left out with its
//! reason and field paths while every other route is served → [`IngressTable::route`] per
//! accepted connection: the backend for (listener port, SNI), or why there is none. Pure, like
//! the rest of the crate: no I/O, no panics on input.

pub mod order;
pub mod table;
pub mod validate;
pub mod wire;

pub use table::{Built, IngressTable, Miss, RefusalReason, RefusedRoute, Target};
pub use validate::{GatewayError, GatewayObject, check_gateway_value, parse_gateway_config};

use crate::egress::HostPattern;

/// The pod label that makes a pod a gateway (`egress` or `ingress`). A gateway pod is a mesh
/// workload wherever its namespace is (it has an identity and accepts HBONE) but is never
/// captured: the gateway process does its own tunnelling.
pub const ROLE_LABEL: &str = "membrane.dev/gateway";
/// The pod label naming the gateway a pod serves (the Gateway API's own label): an egress
/// gateway's name as EgressPolicy `via.gateway` says it, an ingress gateway's `Gateway`.
pub const NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a gateway pod does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayKind {
    /// Carries selected egress out of the mesh from its own address.
    Egress,
    /// Carries external connections into the mesh.
    Ingress,
    /// Carries HBONE from federated clusters' ztunnels to this cluster's pods (double HBONE:
    /// it relays the inner, end-to-end tunnel without decrypting it).
    EastWest,
}

impl GatewayKind {
    /// Parses the [`ROLE_LABEL`] value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "egress" => Some(Self::Egress),
            "ingress" => Some(Self::Ingress),
            "east-west" => Some(Self::EastWest),
            _ => None,
        }
    }

    /// As the label says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
            Self::EastWest => "east-west",
        }
    }
}

impl std::fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gateway pod's role: its kind and the gateway it serves (in its own namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayRole {
    /// Egress or ingress.
    pub kind: GatewayKind,
    /// The gateway's name ([`NAME_LABEL`]; the pod's namespace is the gateway's).
    pub name: String,
}

impl GatewayRole {
    /// The role pod labels give: [`ROLE_LABEL`] `egress`/`ingress` and a [`NAME_LABEL`] that
    /// is a DNS label. `None` when the pod is not a gateway; an unusable value is not a
    /// gateway either (the pod is then treated as any other pod).
    pub fn from_labels(labels: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        let kind = GatewayKind::parse(labels.get(ROLE_LABEL)?)?;
        let name = labels.get(NAME_LABEL)?;
        membrane_identity::spiffe_id::validate_namespace(name).ok()?;
        Some(Self {
            kind,
            name: name.clone(),
        })
    }
}

/// What a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// Any TCP on the port; one route takes it.
    Tcp,
    /// TLS, routed by the ClientHello's server name and passed through unopened.
    TlsPassthrough,
}

/// One listener of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Its name (routes attach to it by `sectionName`).
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: ListenerProtocol,
    /// Server names it takes (TLS only); `None`: any.
    pub hostname: Option<HostPattern>,
    /// Routes of every namespace may attach (`allowedRoutes.namespaces.from: All`); else
    /// only the gateway's own namespace's.
    pub routes_from_all_namespaces: bool,
}

/// A validated `Gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `gatewayClassName`.
    pub class: String,
    /// Listeners, distinct by name and by port.
    pub listeners: Vec<Listener>,
}

/// Which route kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `TCPRoute`.
    Tcp,
    /// `TLSRoute`.
    Tls,
}

impl RouteKind {
    /// The Kubernetes kind: `TCPRoute` or `TLSRoute`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCPRoute",
            Self::Tls => "TLSRoute",
        }
    }
}

/// A route's attachment to a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// The gateway's namespace (the route's own by default).
    pub namespace: String,
    /// The gateway's name.
    pub name: String,
    /// A listener by name; `None`: every listener of the route's kind.
    pub section: Option<String>,
    /// A listener by port; `None`: any.
    pub port: Option<u16>,
}

/// A backend: a mesh Service and its port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The Service's namespace (the route's own by default).
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The Service port.
    pub port: u16,
}

/// A validated `TCPRoute` or `TLSRoute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Kind.
    pub kind: RouteKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Gateways it attaches to.
    pub parents: Vec<ParentRef>,
    /// Server names (TLS routes; at least one).
    pub hostnames: Vec<HostPattern>,
    /// Backends, in order (the first ready one is used; more than one spreads nothing yet).
    pub backends: Vec<Backend>,
    /// Each backend's field path in the document (`spec.rules[0].backendRefs[1]`).
    pub backend_paths: Vec<String>,
    /// `metadata.creationTimestamp`, when known: the older of two routes claiming one server
    /// name or listener keeps it ([`order::precedence`]). The wire form does not carry it.
    pub created: Option<std::time::SystemTime>,
}

impl Route {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
