//! One gateway's routing table: which backend takes a connection accepted on a listener port,
//! with which server name. Each route that names the gateway is accepted or refused on its own,
//! as the Gateway API does it: a route that attaches to none of the gateway's listeners, names
//! a Service or port that does not exist, or asks for a server name outside its listener's is
//! left out with its reason and field paths; of two routes claiming one TCP listener or one
//! server name, the older keeps it ([`super::order::precedence`]) and the other is left out.
//! Every other route is served, and a gateway whose every route is refused still has its
//! (empty) table.

use std::collections::BTreeMap;

use super::order::precedence;
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

/// Whether `route` attaches to `listener`: it matches it and the listener admits its namespace.
fn attaches(route: &Route, gateway: &Gateway, listener: &Listener) -> bool {
    (listener.routes_from_all_namespaces || route.namespace == gateway.namespace)
        && matches_listener(route, gateway, listener)
}

/// Whether one of `route`'s parent references names `listener` (gateway, `sectionName`,
/// `port`) and the listener takes the route's kind, whatever the route's namespace.
fn matches_listener(route: &Route, gateway: &Gateway, listener: &Listener) -> bool {
    let kind_fits = matches!(
        (route.kind, listener.protocol),
        (RouteKind::Tcp, ListenerProtocol::Tcp)
            | (RouteKind::Tls, ListenerProtocol::TlsPassthrough)
    );
    kind_fits
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

/// Why a route was left out of a gateway's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// It names the gateway, but no listener matches its `sectionName`, `port` and kind.
    NoMatchingParent,
    /// A listener matches, but takes only routes of the gateway's own namespace.
    NotAllowedByListeners,
    /// A backend names a Service that does not exist.
    BackendNotFound,
    /// A backend names a port its Service does not have.
    BackendPortNotFound,
    /// A server name outside its listener's `hostname`.
    HostnameOutsideListener,
    /// An older route already has one of its server names on that listener.
    HostnameConflict,
    /// An older route already has the TCP listener.
    PortConflict,
}

impl RefusalReason {
    /// As logs and metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoMatchingParent => "no_matching_parent",
            Self::NotAllowedByListeners => "not_allowed_by_listeners",
            Self::BackendNotFound => "backend_not_found",
            Self::BackendPortNotFound => "backend_port_not_found",
            Self::HostnameOutsideListener => "hostname_outside_listener",
            Self::HostnameConflict => "hostname_conflict",
            Self::PortConflict => "port_conflict",
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route that names the gateway and was left out of its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRoute {
    /// Its kind.
    pub kind: RouteKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Why (the first problem's reason).
    pub reason: RefusalReason,
    /// Every problem, with its field path.
    pub errors: Vec<GatewayError>,
}

impl RefusedRoute {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A gateway's table and what became of each route naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The table of the accepted routes (empty when every route was refused).
    pub table: IngressTable,
    /// The accepted routes, in precedence order: what the gateway is sent.
    pub accepted: Vec<Route>,
    /// The refused routes, in precedence order.
    pub refused: Vec<RefusedRoute>,
}

/// What an accepted route takes on one listener.
enum Claim {
    Tcp(u16),
    Host(u16, HostPattern),
}

/// A route's problems, each with its reason, field path and message.
type Problems = Vec<(RefusalReason, String, String)>;

impl IngressTable {
    /// Compiles `gateway`'s routes among `routes` (routes naming other gateways are ignored);
    /// `service_ports(namespace, name)` gives a Service's ports, `None` when it does not exist.
    /// Routes are taken in precedence order, so the older of two competing routes is the one
    /// accepted. Never fails: a refused route is left out and reported in [`Built::refused`].
    pub fn build(
        gateway: &Gateway,
        routes: &[Route],
        service_ports: impl Fn(&str, &str) -> Option<Vec<u16>>,
    ) -> Built {
        let mut table = Self {
            gateway: format!("{}/{}", gateway.namespace, gateway.name),
            ports: gateway
                .listeners
                .iter()
                .map(|l| {
                    let routes = match l.protocol {
                        ListenerProtocol::Tcp => Routes::Tcp(None),
                        ListenerProtocol::TlsPassthrough => Routes::Tls {
                            exact: BTreeMap::new(),
                            wildcard: Vec::new(),
                        },
                    };
                    (l.port, routes)
                })
                .collect(),
        };
        let mut candidates: Vec<&Route> = routes
            .iter()
            .filter(|r| {
                r.parents
                    .iter()
                    .any(|p| p.namespace == gateway.namespace && p.name == gateway.name)
            })
            .collect();
        candidates.sort_by(|a, b| precedence(a, b));
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for route in candidates {
            match table.claims(gateway, route, &service_ports) {
                Ok(claims) => {
                    table.commit(route, claims);
                    accepted.push(route.clone());
                }
                Err(problems) => refused.push(RefusedRoute {
                    kind: route.kind,
                    namespace: route.namespace.clone(),
                    name: route.name.clone(),
                    reason: problems
                        .first()
                        .map_or(RefusalReason::NoMatchingParent, |p| p.0),
                    errors: problems
                        .into_iter()
                        .map(|(_, path, message)| GatewayError {
                            object: format!("{} {}", route.kind.as_str(), route.key()),
                            path,
                            message,
                        })
                        .collect(),
                }),
            }
        }
        for routes in table.ports.values_mut() {
            if let Routes::Tls { wildcard, .. } = routes {
                wildcard.sort_by_key(|(p, _)| std::cmp::Reverse(p.to_string().len()));
            }
        }
        Built {
            table,
            accepted,
            refused,
        }
    }

    /// What `route` would take in this table, or every reason it cannot be accepted.
    fn claims(
        &self,
        gateway: &Gateway,
        route: &Route,
        service_ports: &impl Fn(&str, &str) -> Option<Vec<u16>>,
    ) -> Result<Vec<Claim>, Problems> {
        let listeners: Vec<&Listener> = gateway
            .listeners
            .iter()
            .filter(|l| attaches(route, gateway, l))
            .collect();
        if listeners.is_empty() {
            let matching = gateway
                .listeners
                .iter()
                .any(|l| matches_listener(route, gateway, l));
            let (reason, message) = if matching {
                (
                    RefusalReason::NotAllowedByListeners,
                    format!(
                        "the listener of Gateway {}/{} takes routes of its own namespace only",
                        gateway.namespace, gateway.name
                    ),
                )
            } else {
                (
                    RefusalReason::NoMatchingParent,
                    format!(
                        "no listener of Gateway {}/{} matches the route's kind, sectionName and port",
                        gateway.namespace, gateway.name
                    ),
                )
            };
            return Err(vec![(reason, "spec.parentRefs".into(), message)]);
        }
        let mut problems = Problems::new();
        for (b, backend) in route.backends.iter().enumerate() {
            let at = route
                .backend_paths
                .get(b)
                .map_or("spec.rules", String::as_str);
            match service_ports(&backend.namespace, &backend.service) {
                None => problems.push((
                    RefusalReason::BackendNotFound,
                    format!("{at}.name"),
                    format!("no Service {}/{}", backend.namespace, backend.service),
                )),
                Some(p) if !p.contains(&backend.port) => problems.push((
                    RefusalReason::BackendPortNotFound,
                    format!("{at}.port"),
                    format!(
                        "Service {}/{} has no port {}",
                        backend.namespace, backend.service, backend.port
                    ),
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut claims = Vec::new();
        for listener in listeners {
            match self.ports.get(&listener.port) {
                Some(Routes::Tcp(Some(other))) => problems.push((
                    RefusalReason::PortConflict,
                    "spec.parentRefs".into(),
                    format!(
                        "listener {} (port {}) already carries route {}, which takes precedence",
                        listener.name, listener.port, other.route
                    ),
                )),
                Some(Routes::Tcp(None)) => claims.push(Claim::Tcp(listener.port)),
                Some(Routes::Tls { exact, wildcard }) => {
                    for (h, host) in route.hostnames.iter().enumerate() {
                        let at = format!("spec.hostnames[{h}]");
                        if !within(host, listener.hostname.as_ref()) {
                            problems.push((
                                RefusalReason::HostnameOutsideListener,
                                at,
                                format!("{host} is outside listener {}'s hostname", listener.name),
                            ));
                            continue;
                        }
                        let taken = match host {
                            HostPattern::Exact(n) => exact.get(n),
                            HostPattern::Suffix(_) => {
                                wildcard.iter().find(|(p, _)| p == host).map(|(_, t)| t)
                            }
                        };
                        match taken {
                            Some(other) => problems.push((
                                RefusalReason::HostnameConflict,
                                at,
                                format!(
                                    "{host} on port {} is already route {}'s, which takes precedence",
                                    listener.port, other.route
                                ),
                            )),
                            None => claims.push(Claim::Host(listener.port, host.clone())),
                        }
                    }
                }
                None => {}
            }
        }
        if problems.is_empty() {
            Ok(claims)
        } else {
            Err(problems)
        }
    }

    /// Gives `route` what it claims.
    fn commit(&mut self, route: &Route, claims: Vec<Claim>) {
        let target = Target {
            route: route.key(),
            backends: route.backends.clone(),
        };
        for claim in claims {
            match claim {
                Claim::Tcp(port) => {
                    if let Some(Routes::Tcp(slot)) = self.ports.get_mut(&port) {
                        *slot = Some(target.clone());
                    }
                }
                Claim::Host(port, host) => {
                    if let Some(Routes::Tls { exact, wildcard }) = self.ports.get_mut(&port) {
                        match &host {
                            HostPattern::Exact(n) => {
                                exact.entry(n.clone()).or_insert_with(|| target.clone());
                            }
                            HostPattern::Suffix(_) => {
                                if !wildcard.iter().any(|(p, _)| *p == host) {
                                    wildcard.push((host, target.clone()));
                                }
                            }
                        }
                    }
                }
            }
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
