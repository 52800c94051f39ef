//! One gateway's routing table: which backend takes a connection accepted on a listener port,
//! with which server name. Built whole or not at all: a route that attaches to nothing it may
//! attach to, names an unknown Service or port, or competes with another for the same port or
//! server name is an error with the route's field path, and no table comes out.

use std::collections::BTreeMap;

use super::validate::GatewayError;
use super::{Backend, Gateway, Listener, ListenerProtocol, Route, RouteKind};
use crate::egress::HostPattern;

/// Where an accepted connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `namespace/name` of the route.
    pub route: String,
    /// Its backends, in order.
    pub backends: Vec<Backend>,
}

/// Why a connection has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No listener on that port.
    UnknownPort,
    /// A listener without a route.
    NoRoute,
    /// A TLS listener, and the ClientHello named no server.
    NoSni,
    /// A TLS listener, and no route takes that server name.
    UnknownSni,
}

impl Miss {
    /// As records and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::UnknownPort => "unknown_port",
            Miss::NoRoute => "no_route",
            Miss::NoSni => "no_sni",
            Miss::UnknownSni => "unknown_sni",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Routes {
    Tcp(Option<Target>),
    Tls {
        exact: BTreeMap<String, Target>,
        /// Suffix patterns, longest first.
        wildcard: Vec<(HostPattern, Target)>,
    },
}

/// A gateway's compiled routes, by listener port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTable {
    gateway: String,
    ports: BTreeMap<u16, Routes>,
}

fn attaches(route: &Route, gateway: &Gateway, listener: &Listener) -> bool {
    let kind_fits = matches!(
        (route.kind, listener.protocol),
        (RouteKind::Tcp, ListenerProtocol::Tcp)
            | (RouteKind::Tls, ListenerProtocol::TlsPassthrough)
    );
    let namespace_fits =
        listener.routes_from_all_namespaces || route.namespace == gateway.namespace;
    kind_fits
        && namespace_fits
        && route.parents.iter().any(|p| {
            p.namespace == gateway.namespace
                && p.name == gateway.name
                && p.section.as_ref().is_none_or(|s| *s == listener.name)
                && p.port.is_none_or(|port| port == listener.port)
        })
}

/// Whether a route's server name falls under the listener's.
fn within(name: &HostPattern, listener: Option<&HostPattern>) -> bool {
    match (listener, name) {
        (None, _) => true,
        (Some(l), HostPattern::Exact(n)) => l.matches(n) || l == name,
        (Some(HostPattern::Suffix(l)), HostPattern::Suffix(n)) => n.ends_with(l.as_str()),
        (Some(HostPattern::Exact(_)), HostPattern::Suffix(_)) => false,
    }
}

impl IngressTable {
    /// Compiles `gateway`'s routes among `routes`; `service_ports(namespace, name)` gives a
    /// Service's ports, `None` when it does not exist.
    pub fn build(
        gateway: &Gateway,
        routes: &[Route],
        service_ports: impl Fn(&str, &str) -> Option<Vec<u16>>,
    ) -> Result<Self, Vec<GatewayError>> {
        let mut errors = Vec::new();
        let mut err = |route: &Route, path: String, message: String| {
            errors.push(GatewayError {
                object: format!(
                    "{} {}",
                    match route.kind {
                        RouteKind::Tcp => "TCPRoute",
                        RouteKind::Tls => "TLSRoute",
                    },
                    route.key()
                ),
                path,
                message,
            });
        };
        let mut ports = BTreeMap::new();
        for listener in &gateway.listeners {
            let mut routes_here = match listener.protocol {
                ListenerProtocol::Tcp => Routes::Tcp(None),
                ListenerProtocol::TlsPassthrough => Routes::Tls {
                    exact: BTreeMap::new(),
                    wildcard: Vec::new(),
                },
            };
            for route in routes.iter().filter(|r| attaches(r, gateway, listener)) {
                let mut backends_ok = true;
                for (b, backend) in route.backends.iter().enumerate() {
                    let at = route
                        .backend_paths
                        .get(b)
                        .map_or("spec.rules", String::as_str);
                    match service_ports(&backend.namespace, &backend.service) {
                        None => {
                            err(
                                route,
                                format!("{at}.name"),
                                format!("no Service {}/{}", backend.namespace, backend.service),
                            );
                            backends_ok = false;
                        }
                        Some(p) if !p.contains(&backend.port) => {
                            err(
                                route,
                                format!("{at}.port"),
                                format!(
                                    "Service {}/{} has no port {}",
                                    backend.namespace, backend.service, backend.port
                                ),
                            );
                            backends_ok = false;
                        }
                        Some(_) => {}
                    }
                }
                if !backends_ok {
                    continue;
                }
                let target = Target {
                    route: route.key(),
                    backends: route.backends.clone(),
                };
                match &mut routes_here {
                    Routes::Tcp(slot) => match slot {
                        Some(other) => err(
                            route,
                            "spec.parentRefs".into(),
                            format!(
                                "listener {} (port {}) already carries route {}",
                                listener.name, listener.port, other.route
                            ),
                        ),
                        None => *slot = Some(target),
                    },
                    Routes::Tls { exact, wildcard } => {
                        for (h, host) in route.hostnames.iter().enumerate() {
                            if !within(host, listener.hostname.as_ref()) {
                                err(
                                    route,
                                    format!("spec.hostnames[{h}]"),
                                    format!(
                                        "{host} is outside listener {}'s hostname",
                                        listener.name
                                    ),
                                );
                                continue;
                            }
                            let taken = match host {
                                HostPattern::Exact(n) => exact.get(n).map(|t| t.route.clone()),
                                HostPattern::Suffix(_) => wildcard
                                    .iter()
                                    .find(|(p, _)| p == host)
                                    .map(|(_, t)| t.route.clone()),
                            };
                            if let Some(other) = taken {
                                err(
                                    route,
                                    format!("spec.hostnames[{h}]"),
                                    format!(
                                        "{host} on port {} is already route {other}'s",
                                        listener.port
                                    ),
                                );
                                continue;
                            }
                            match host {
                                HostPattern::Exact(n) => {
                                    exact.insert(n.clone(), target.clone());
                                }
                                HostPattern::Suffix(_) => {
                                    wildcard.push((host.clone(), target.clone()));
                                }
                            }
                        }
                    }
                }
            }
            if let Routes::Tls { wildcard, .. } = &mut routes_here {
                wildcard.sort_by_key(|(p, _)| std::cmp::Reverse(p.to_string().len()));
            }
            ports.insert(listener.port, routes_here);
        }
        if errors.is_empty() {
            Ok(Self {
                gateway: format!("{}/{}", gateway.namespace, gateway.name),
                ports,
            })
        } else {
            Err(errors)
        }
    }

    /// The target of a connection accepted on `port` whose ClientHello named `sni` (lower-case),
    /// or why there is none.
    pub fn route(&self, port: u16, sni: Option<&str>) -> Result<&Target, Miss> {
        match self.ports.get(&port).ok_or(Miss::UnknownPort)? {
            Routes::Tcp(target) => target.as_ref().ok_or(Miss::NoRoute),
            Routes::Tls { exact, wildcard } => {
                let sni = sni.ok_or(Miss::NoSni)?;
                if let Some(t) = exact.get(sni) {
                    return Ok(t);
                }
                wildcard
                    .iter()
                    .find(|(p, _)| p.matches(sni))
                    .map(|(_, t)| t)
                    .ok_or(Miss::UnknownSni)
            }
        }
    }

    /// `namespace/name` of the gateway.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The listener ports.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }

    /// Whether the listener on `port` routes TLS by server name (`None`: no such listener).
    pub fn is_tls(&self, port: u16) -> Option<bool> {
        self.ports
            .get(&port)
            .map(|r| matches!(r, Routes::Tls { .. }))
    }
}
