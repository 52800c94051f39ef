//! Conversions between a gateway with its routes and the wire form (`membrane.v1.Ingress`).
//! Building the wire form cannot fail; reading it validates every value again (a peer's
//! message is input like any other) and names the field of the first problem. The table is
//! then built from the result with [`super::IngressTable::build`], as on the controller. The
//! controller sends only the routes its table accepted, so none of them compete and their
//! creation times (not carried) are not needed to build the same table again.

use membrane_proto::v1::{self as pb, ingress_listener, ingress_route};

use super::{Backend, Gateway, Listener, ListenerProtocol, ParentRef, Route, RouteKind};
use crate::egress::HostPattern;
use crate::egress::validate::parse_host;

/// Why a wire message is not a valid gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ingress {gateway}: {path}: {message}")]
pub struct IngressWireError {
    /// `namespace/name`.
    pub gateway: String,
    /// Field path inside the message (`routes[0].backends[1].port`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The wire form of `gateway` and the routes attached to it.
pub fn to_wire(gateway: &Gateway, routes: &[&Route]) -> pb::Ingress {
    let host = |h: &Option<HostPattern>| h.as_ref().map(ToString::to_string).unwrap_or_default();
    pb::Ingress {
        namespace: gateway.namespace.clone(),
        name: gateway.name.clone(),
        listeners: gateway
            .listeners
            .iter()
            .map(|l| pb::IngressListener {
                name: l.name.clone(),
                port: u32::from(l.port),
                protocol: match l.protocol {
                    ListenerProtocol::Tcp => ingress_listener::Protocol::Tcp,
                    ListenerProtocol::TlsPassthrough => ingress_listener::Protocol::TlsPassthrough,
                } as i32,
                hostname: host(&l.hostname),
                routes_from_all_namespaces: l.routes_from_all_namespaces,
            })
            .collect(),
        routes: routes
            .iter()
            .map(|r| pb::IngressRoute {
                kind: match r.kind {
                    RouteKind::Tcp => ingress_route::Kind::Tcp,
                    RouteKind::Tls => ingress_route::Kind::Tls,
                } as i32,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                parents: r
                    .parents
                    .iter()
                    .map(|p| pb::IngressParent {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        section: p.section.clone().unwrap_or_default(),
                        port: p.port.map(u32::from).unwrap_or_default(),
                    })
                    .collect(),
                hostnames: r.hostnames.iter().map(ToString::to_string).collect(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| pb::IngressBackend {
                        namespace: b.namespace.clone(),
                        service: b.service.clone(),
                        port: u32::from(b.port),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Reads a wire gateway and its routes, validating every value.
pub fn from_wire(msg: &pb::Ingress) -> Result<(Gateway, Vec<Route>), IngressWireError> {
    let key = format!("{}/{}", msg.namespace, msg.name);
    let err = |path: String, message: String| IngressWireError {
        gateway: key.clone(),
        path,
        message,
    };
    let k8s_namespace = |path: String, value: &str| {
        membrane_identity::spiffe_id::validate_namespace(value)
            .map(|()| value.to_owned())
            .map_err(|e| err(path, e.to_string()))
    };
    let k8s_name = |path: String, value: &str| {
        crate::validate::object_name(value)
            .map(|()| value.to_owned())
            .map_err(|e| err(path, format!("{value:?}: {e}")))
    };
    let port = |path: String, value: u32| {
        u16::try_from(value)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(path, format!("port {value} is not 1-65535")))
    };
    let pattern = |path: String, value: &str| parse_host(value).map_err(|e| err(path, e));
    let namespace = k8s_namespace("namespace".into(), &msg.namespace)?;
    let name = k8s_name("name".into(), &msg.name)?;
    let mut listeners = Vec::with_capacity(msg.listeners.len());
    for (i, l) in msg.listeners.iter().enumerate() {
        let at = |f: &str| format!("listeners[{i}].{f}");
        let protocol = match ingress_listener::Protocol::try_from(l.protocol) {
            Ok(ingress_listener::Protocol::Tcp) => ListenerProtocol::Tcp,
            Ok(ingress_listener::Protocol::TlsPassthrough) => ListenerProtocol::TlsPassthrough,
            Err(_) => return Err(err(at("protocol"), "unknown protocol".into())),
        };
        let port = port(at("port"), l.port)?;
        if listeners
            .iter()
            .any(|o: &Listener| o.port == port || o.name == l.name)
        {
            return Err(err(at("port"), "two listeners share a name or port".into()));
        }
        listeners.push(Listener {
            name: k8s_name(at("name"), &l.name)?,
            port,
            protocol,
            hostname: match l.hostname.as_str() {
                "" => None,
                h => Some(pattern(at("hostname"), h)?),
            },
            routes_from_all_namespaces: l.routes_from_all_namespaces,
        });
    }
    let mut routes = Vec::with_capacity(msg.routes.len());
    for (i, r) in msg.routes.iter().enumerate() {
        let at = |f: String| format!("routes[{i}].{f}");
        let kind = match ingress_route::Kind::try_from(r.kind) {
            Ok(ingress_route::Kind::Tcp) => RouteKind::Tcp,
            Ok(ingress_route::Kind::Tls) => RouteKind::Tls,
            Err(_) => return Err(err(at("kind".into()), "unknown kind".into())),
        };
        let mut parents = Vec::with_capacity(r.parents.len());
        for (j, p) in r.parents.iter().enumerate() {
            let at = |f: &str| at(format!("parents[{j}].{f}"));
            parents.push(ParentRef {
                namespace: k8s_namespace(at("namespace"), &p.namespace)?,
                name: k8s_name(at("name"), &p.name)?,
                section: match p.section.as_str() {
                    "" => None,
                    s => Some(k8s_name(at("section"), s)?),
                },
                port: match p.port {
                    0 => None,
                    n => Some(port(at("port"), n)?),
                },
            });
        }
        let hostnames = r
            .hostnames
            .iter()
            .enumerate()
            .map(|(j, h)| pattern(at(format!("hostnames[{j}]")), h))
            .collect::<Result<Vec<_>, _>>()?;
        let mut backends = Vec::with_capacity(r.backends.len());
        for (j, b) in r.backends.iter().enumerate() {
            let at = |f: &str| at(format!("backends[{j}].{f}"));
            backends.push(Backend {
                namespace: k8s_namespace(at("namespace"), &b.namespace)?,
                service: k8s_name(at("service"), &b.service)?,
                port: port(at("port"), b.port)?,
            });
        }
        routes.push(Route {
            kind,
            namespace: k8s_namespace(at("namespace".into()), &r.namespace)?,
            name: k8s_name(at("name".into()), &r.name)?,
            parents,
            hostnames,
            backend_paths: (0..backends.len())
                .map(|j| format!("routes[{i}].backends[{j}]"))
                .collect(),
            backends,
            created: None,
        });
    }
    Ok((
        Gateway {
            namespace,
            name,
            class: String::new(),
            listeners,
        },
        routes,
    ))
}
