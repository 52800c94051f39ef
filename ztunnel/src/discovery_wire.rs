//! From discovery updates to what the proxy uses: applying an update to the held resources
//! whole or not at all, and validating and building them into the mesh state, the compiled
//! policy and the trust bundles.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use membrane_identity::{TrustBundle, TrustDomain, WorkloadIdentity};
use membrane_policy::PolicyIndex;
use membrane_proto::v1 as pb;
use pb::resource::Kind as ResourceKind;
use rustls_pki_types::CertificateDer;

use crate::state::{MeshState, PlaintextMode, Protocol, ServiceTarget, Workload};

/// Why an update was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// A resource is malformed.
    #[error("{kind} {name}: {message}")]
    Invalid {
        /// Resource kind.
        kind: &'static str,
        /// Its key.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A delta arrived before any snapshot.
    #[error("a delta arrived before the first snapshot")]
    NoSnapshot,
}

/// Resources held, by (kind, key).
pub type Held = BTreeMap<(i32, String), pb::Resource>;

/// What the proxy uses, built from the held resources.
#[derive(Debug)]
pub struct Built {
    /// Workloads and Services.
    pub state: MeshState,
    /// Compiled policy.
    pub policy: PolicyIndex,
    /// The trust bundle, when one was sent.
    pub bundle: Option<TrustBundle>,
    /// The federated trust domains' bundles (none: no trust domain is federated).
    pub federated: Vec<TrustBundle>,
}

fn key_of(resource: &pb::Resource) -> Option<(i32, String)> {
    use pb::resource_key::Kind;
    Some(match resource.kind.as_ref()? {
        ResourceKind::Workload(w) => (Kind::Workload as i32, w.uid.clone()),
        ResourceKind::Service(s) => (Kind::Service as i32, service_key(s)),
        ResourceKind::Authorization(a) => (
            Kind::Authorization as i32,
            format!("{}/{}", a.namespace, a.name),
        ),
        ResourceKind::TrustBundle(_) => (Kind::TrustBundle as i32, String::new()),
        ResourceKind::FederatedBundle(b) => (Kind::FederatedBundle as i32, b.trust_domain.clone()),
        ResourceKind::Egress(e) => (Kind::Egress as i32, format!("{}/{}", e.namespace, e.name)),
        ResourceKind::Ingress(i) => (Kind::Ingress as i32, format!("{}/{}", i.namespace, i.name)),
    })
}

/// Applies `update` to a copy of `held`; the caller keeps `held` when this fails.
pub fn apply(held: Option<&Held>, update: &pb::Update) -> Result<Held, UpdateError> {
    let mut next = match (update.snapshot, held) {
        (true, _) => Held::new(),
        (false, Some(held)) => held.clone(),
        (false, None) => return Err(UpdateError::NoSnapshot),
    };
    for key in &update.removals {
        next.remove(&(key.kind, key.name.clone()));
    }
    for resource in &update.upserts {
        let key = key_of(resource).ok_or_else(|| UpdateError::Invalid {
            kind: "resource",
            name: String::new(),
            message: "empty resource".into(),
        })?;
        next.insert(key, resource.clone());
    }
    Ok(next)
}

fn invalid(kind: &'static str, name: &str, message: impl ToString) -> UpdateError {
    UpdateError::Invalid {
        kind,
        name: name.to_owned(),
        message: message.to_string(),
    }
}

fn port(kind: &'static str, name: &str, value: u32) -> Result<u16, UpdateError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(kind, name, format!("port {value} is not 1-65535")))
}

fn workload(w: &pb::Workload, local: &TrustDomain) -> Result<Workload, UpdateError> {
    // A pod of another trust domain (imported from a federated cluster) is only ever a
    // destination: its own cluster's ztunnel captures it and holds its identity.
    let foreign_td = match w.trust_domain.as_str() {
        "" => None,
        td => Some(
            membrane_identity::spiffe_id::parse_trust_domain(td)
                .map_err(|e| invalid("workload", &w.uid, format!("trust domain: {e}")))?,
        )
        .filter(|td| td != local),
    };
    if foreign_td.is_some() && !w.foreign {
        return Err(invalid(
            "workload",
            &w.uid,
            "a workload of another trust domain must be foreign (captured by its own cluster)",
        ));
    }
    let td = foreign_td.as_ref().unwrap_or(local);
    let identity = WorkloadIdentity::new(td, &w.namespace, &w.service_account)
        .map_err(|e| invalid("workload", &w.uid, e))?;
    let ips = w
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| invalid("workload", &w.uid, format!("{ip:?} is not an IP")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match pb::workload::Protocol::try_from(w.protocol) {
        Ok(pb::workload::Protocol::Hbone) => Protocol::Hbone,
        Ok(pb::workload::Protocol::Tcp) => Protocol::Tcp,
        Err(_) => return Err(invalid("workload", &w.uid, "unknown protocol")),
    };
    let gateway = gateway_role(w)?;
    if w.foreign && (protocol != Protocol::Hbone || gateway.is_some()) {
        return Err(invalid(
            "workload",
            &w.uid,
            "a foreign HBONE peer is neither plain TCP nor a gateway",
        ));
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ips,
        protocol,
        labels: w.labels.clone().into_iter().collect(),
        identity,
        gateway,
        foreign: w.foreign,
        network_gateway: network_gateway(w, foreign_td.as_ref())?,
    })
}

/// An imported workload's east-west gateway: an `ip:port` that is a usable unicast address
/// and an identity of the workload's own (federated) trust domain.
fn network_gateway(
    w: &pb::Workload,
    foreign_td: Option<&TrustDomain>,
) -> Result<Option<crate::state::NetworkGateway>, UpdateError> {
    let Some(gw) = &w.network_gateway else {
        return Ok(None);
    };
    let bad = |why: String| invalid("workload", &w.uid, format!("network gateway: {why}"));
    let Some(td) = foreign_td else {
        return Err(bad(
            "only a federated cluster's workload is behind one".into()
        ));
    };
    let addr: std::net::SocketAddr = gw
        .address
        .parse()
        .map_err(|_| bad(format!("{:?} is not ip:port", gw.address)))?;
    if addr.port() == 0
        || addr.ip().is_unspecified()
        || addr.ip().is_loopback()
        || addr.ip().is_multicast()
    {
        return Err(bad(format!("{addr} is not a usable address")));
    }
    let identity =
        membrane_identity::SpiffeId::new(&gw.spiffe_id).map_err(|e| bad(e.to_string()))?;
    if identity.trust_domain() != td {
        return Err(bad(format!("{identity} is not in trust domain {td}")));
    }
    Ok(Some(crate::state::NetworkGateway { addr, identity }))
}

fn gateway_role(w: &pb::Workload) -> Result<Option<crate::state::GatewayRole>, UpdateError> {
    use crate::state::{GatewayKind, GatewayRole};
    let Some(role) = &w.gateway else {
        return Ok(None);
    };
    let kind = match pb::gateway_role::Kind::try_from(role.kind) {
        Ok(pb::gateway_role::Kind::Unspecified) => return Ok(None),
        Ok(pb::gateway_role::Kind::Egress) => GatewayKind::Egress,
        Ok(pb::gateway_role::Kind::Ingress) => GatewayKind::Ingress,
        Ok(pb::gateway_role::Kind::EastWest) => GatewayKind::EastWest,
        Err(_) => return Err(invalid("workload", &w.uid, "unknown gateway kind")),
    };
    membrane_identity::spiffe_id::validate_namespace(&role.name)
        .map_err(|e| invalid("workload", &w.uid, format!("gateway name: {e}")))?;
    Ok(Some(GatewayRole {
        kind,
        name: role.name.clone(),
    }))
}

/// A Service's key and its name in the mesh state: `namespace/name`, or
/// `clusterset:namespace/name` for one imported from federated clusters.
pub fn service_key(s: &pb::Service) -> String {
    if s.clusterset {
        format!("{CLUSTERSET_PREFIX}{}/{}", s.namespace, s.name)
    } else {
        format!("{}/{}", s.namespace, s.name)
    }
}

/// The prefix of an imported (clusterset) Service's name in the mesh state.
pub const CLUSTERSET_PREFIX: &str = "clusterset:";

fn service(s: &pb::Service, state: &mut MeshState) -> Result<(), UpdateError> {
    let name = service_key(s);
    let vips = s
        .vips
        .iter()
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| invalid("service", &name, format!("{ip:?} is not an IP")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if s.exported && !s.clusterset {
        for e in s.endpoints.iter().filter(|e| e.ready) {
            let ip: IpAddr =
                e.ip.parse()
                    .map_err(|_| invalid("service", &name, format!("{:?} is not an IP", e.ip)))?;
            state.add_exported(ip);
        }
    }
    for p in &s.ports {
        let service_port = port("service", &name, p.port)?;
        let mut endpoints = Vec::new();
        for e in s.endpoints.iter().filter(|e| e.ready) {
            let ip: IpAddr =
                e.ip.parse()
                    .map_err(|_| invalid("service", &name, format!("{:?} is not an IP", e.ip)))?;
            let target = match e.ports.get(&p.name) {
                Some(n) => port("service", &name, *n)?,
                None if p.target_port == 0 => continue,
                None => port("service", &name, p.target_port)?,
            };
            endpoints.push(SocketAddr::new(ip, target));
        }
        state.add_service_port(
            &name,
            service_port,
            ServiceTarget {
                service: name.clone(),
                endpoints: endpoints.clone(),
            },
        );
        for vip in &vips {
            state.add_service(
                SocketAddr::new(*vip, service_port),
                ServiceTarget {
                    service: name.clone(),
                    endpoints: endpoints.clone(),
                },
            );
        }
    }
    Ok(())
}

/// Builds what the proxy uses from the held resources, validating every value.
pub fn build(held: &Held, td: &TrustDomain) -> Result<Built, UpdateError> {
    let mut state = MeshState::empty_loaded();
    let mut policies = Vec::new();
    let mut egress = Vec::new();
    let mut ingress = Vec::new();
    let mut bundle = None;
    let mut federated = Vec::new();
    // The controller streams its `--root-namespace` with the trust bundle; until it names one,
    // the default applies.
    let mut root_namespace = membrane_policy::DEFAULT_ROOT_NAMESPACE;
    // Pods of federated clusters come after every local one: a local pod keeps its address
    // whatever a peer exports, and a peer's namespace settings never touch the local namespace
    // of the same name.
    let mut imported = Vec::new();
    for resource in held.values() {
        match &resource.kind {
            Some(ResourceKind::Workload(w))
                if !w.trust_domain.is_empty() && w.trust_domain != td.to_string() =>
            {
                imported.push(w);
            }
            Some(ResourceKind::Workload(w)) => {
                let mode = if w.plaintext_permitted {
                    PlaintextMode::Permit
                } else {
                    PlaintextMode::Deny
                };
                state.set_plaintext(&w.namespace, mode);
                let udp_ports = w
                    .plaintext_udp_ports
                    .iter()
                    .map(|p| port("workload", &w.uid, *p))
                    .collect::<Result<Vec<_>, _>>()?;
                state.set_plaintext_udp_ports(&w.namespace, udp_ports);
                state
                    .insert_lenient(workload(w, td)?)
                    .map_err(|m| invalid("workload", &w.uid, m))?;
            }
            Some(ResourceKind::Service(s)) => service(s, &mut state)?,
            Some(ResourceKind::Authorization(a)) => {
                let name = format!("{}/{}", a.namespace, a.name);
                let policy = membrane_policy::Policy::try_from(a.clone())
                    .map_err(|e| invalid("authorization", &name, e))?;
                policies.push(policy);
            }
            Some(ResourceKind::Egress(e)) => {
                let name = format!("{}/{}", e.namespace, e.name);
                let policy = membrane_policy::egress::EgressPolicy::try_from(e.clone())
                    .map_err(|e| invalid("egress policy", &name, e))?;
                egress.push(policy);
            }
            Some(ResourceKind::Ingress(i)) => ingress.push(i),
            Some(ResourceKind::TrustBundle(b)) => {
                if b.trust_domain != td.to_string() {
                    return Err(invalid(
                        "trust bundle",
                        &b.trust_domain,
                        format!("trust domain is not {td}"),
                    ));
                }
                let roots = b.roots_der.iter().cloned().map(CertificateDer::from);
                let built = TrustBundle::new(td.clone(), roots)
                    .map_err(|e| invalid("trust bundle", "", e))?;
                bundle = Some(built);
                if !b.root_namespace.is_empty() {
                    root_namespace = &b.root_namespace;
                }
            }
            Some(ResourceKind::FederatedBundle(b)) => federated.push(federated_bundle(b, td)?),
            None => return Err(invalid("resource", "", "empty resource")),
        }
    }
    // Nor a Service's virtual IP.
    let vips = state.virtual_ips();
    for w in imported {
        let mut workload = workload(w, td)?;
        workload.ips.retain(|ip| {
            let free = !vips.contains(ip);
            if !free {
                tracing::warn!(uid = %w.uid, %ip, "imported workload on a Service address; not routing it there");
            }
            free
        });
        state
            .insert_lenient(workload)
            .map_err(|m| invalid("workload", &w.uid, m))?;
    }
    state.set_egress(membrane_policy::egress::EgressIndex::build(
        egress,
        root_namespace,
    ));
    // After every Service: a table is built against the same update's Services. The
    // controller sends only the routes its table accepted, so none should be refused here;
    // one that is (say, its Service vanished from this update) is left out and logged, and
    // the gateway serves the others.
    for i in ingress {
        let name = format!("{}/{}", i.namespace, i.name);
        let (gateway, routes) = membrane_policy::gateway::wire::from_wire(i)
            .map_err(|e| invalid("ingress", &name, e))?;
        let built = membrane_policy::gateway::IngressTable::build(&gateway, &routes, |ns, svc| {
            state.service_port_numbers(ns, svc)
        });
        for route in &built.refused {
            for e in &route.errors {
                tracing::warn!(
                    gateway = %name,
                    route_kind = route.kind.as_str(),
                    route_namespace = %route.namespace,
                    route_name = %route.name,
                    reason = route.reason.as_str(),
                    field = %e.path,
                    error = %e.message,
                    "ingress route refused; the gateway serves its other routes"
                );
            }
        }
        let table = built.table;
        state.set_ingress(name, table);
    }
    Ok(Built {
        state,
        policy: PolicyIndex::build_for(policies, root_namespace, td),
        bundle,
        federated,
    })
}

/// A federated trust domain's roots: never the local trust domain's.
fn federated_bundle(
    b: &pb::FederatedBundle,
    local: &TrustDomain,
) -> Result<TrustBundle, UpdateError> {
    let what = "federated trust bundle";
    let td = membrane_identity::spiffe_id::parse_trust_domain(&b.trust_domain)
        .map_err(|e| invalid(what, &b.trust_domain, e))?;
    if &td == local {
        return Err(invalid(what, &b.trust_domain, "is the local trust domain"));
    }
    let roots = b.roots_der.iter().cloned().map(CertificateDer::from);
    TrustBundle::new(td, roots).map_err(|e| invalid(what, &b.trust_domain, e))
}
