//! What the ztunnel knows: mesh workloads (which of them live on this node), and Services
//! (virtual IPs and the endpoints behind them).
//!
//! The state comes from the controller's discovery stream ([`crate::discovery`]), or, to run
//! without a controller's stream, from a local file of the same objects. The file is YAML or
//! JSON:
//!
//! ```yaml
//! workloads:
//!   - uid: 6f1c…            # pod UID (what enrollment names)
//!     name: trainer-0
//!     namespace: training
//!     serviceAccount: trainer
//!     node: node-a
//!     ips: [10.77.1.10]
//!     protocol: HBONE        # HBONE (in the mesh, default) or TCP (plain, not captured)
//!     labels: {app: trainer} # pod labels, matched by policy selectors
//! namespaces:
//!   - name: training
//!     plaintext: deny        # `permit` admits plaintext sources (membrane.dev/plaintext)
//!     plaintextUdpPorts: [5353] # UDP ports left open to plaintext (membrane.dev/plaintext-udp-ports)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use membrane_identity::{TrustDomain, WorkloadIdentity};
use serde::Deserialize;

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// In the mesh: reached through HBONE on port 15008.
    #[default]
    Hbone,
    /// Not in the mesh: plain TCP.
    Tcp,
}

/// One workload (pod).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Pod UID.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// How it is reached.
    pub protocol: Protocol,
    /// Pod labels (policy selectors match them).
    pub labels: BTreeMap<String, String>,
    /// Its SPIFFE identity.
    #[serde(serialize_with = "display")]
    pub identity: WorkloadIdentity,
    /// Set for a gateway pod: it accepts HBONE itself and is never captured.
    #[serde(serialize_with = "role", skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRole>,
    /// A pod outside Membrane that speaks HBONE itself (another data plane): tunnelled to,
    /// never captured here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub foreign: bool,
    /// For a workload of a federated cluster whose pod network is not reachable from here:
    /// the east-west gateway its tunnels go through (double HBONE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<NetworkGateway>,
}

/// A federated cluster's east-west gateway: the outer tunnel of a double-HBONE connection
/// goes to `addr` and must meet `identity`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetworkGateway {
    /// Its HBONE listener.
    #[serde(serialize_with = "display")]
    pub addr: std::net::SocketAddr,
    /// The SPIFFE ID its certificate must carry.
    #[serde(serialize_with = "display")]
    pub identity: membrane_identity::SpiffeId,
}

fn role<S: serde::Serializer>(v: &Option<GatewayRole>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(r) => s.collect_str(&format_args!("{} {}", r.kind, r.name)),
        None => s.serialize_none(),
    }
}

pub use membrane_policy::gateway::{GatewayKind, GatewayRole};

impl Workload {
    /// Whether its node's ztunnel captures it: a mesh pod, not a gateway pod (a gateway
    /// tunnels for itself) nor a foreign HBONE peer (another data plane captures it).
    pub fn captured(&self) -> bool {
        self.protocol == Protocol::Hbone && self.gateway.is_none() && !self.foreign
    }
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// How a namespace treats plaintext sources: the rule is `membrane_policy::plaintext`.
pub use membrane_policy::PlaintextMode;

/// What inbound UDP a captured pod accepts. UDP is not tunnelled: in a namespace that refuses
/// plaintext TCP, plaintext UDP is refused too (dropped in the pod, counted), except replies to
/// the pod's own traffic, loopback, and the ports the namespace names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpInbound {
    /// Every inbound UDP packet is accepted (the namespace permits plaintext).
    Accept,
    /// Inbound UDP is dropped unless it is a reply, on loopback, or to one of these ports.
    Drop {
        /// Destination ports left open (sorted, no duplicates, no 0).
        except: Vec<u16>,
    },
}

impl Default for UdpInbound {
    fn default() -> Self {
        Self::Drop { except: Vec::new() }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadDoc {
    uid: String,
    name: String,
    namespace: String,
    #[serde(default = "default_sa")]
    service_account: String,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// A pod of another data plane that speaks HBONE (`protocol` must be HBONE).
    #[serde(default)]
    foreign: bool,
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
struct NamespaceDoc {
    name: String,
    #[serde(default)]
    plaintext: PlaintextMode,
    #[serde(default)]
    plaintext_udp_ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    #[serde(default)]
    workloads: Vec<WorkloadDoc>,
    #[serde(default)]
    namespaces: Vec<NamespaceDoc>,
}

/// Why a workloads file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a valid workloads document.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong (with the field path).
        message: String,
    },
    /// A workload's identity is invalid, or two workloads clash.
    #[error("{path}: workload {uid}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The workload.
        uid: String,
        /// What is wrong.
        message: String,
    },
}

/// One port of a Service: where connections to `vip:port` go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceTarget {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Ready endpoints: IP and target port.
    pub endpoints: Vec<SocketAddr>,
}

/// What a pod's rule set depends on besides the fixed capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRules {
    /// Inbound UDP.
    pub udp: UdpInbound,
    /// An ALLOW EgressPolicy selects the pod: what the mesh cannot decide (UDP other than
    /// DNS, protocols other than TCP, whichever family) is dropped on the way out.
    pub egress_locked: bool,
}

/// An immutable view of the mesh; replaced whole on every change.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    by_uid: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    plaintext: BTreeMap<String, PlaintextMode>,
    udp_ports: BTreeMap<String, Vec<u16>>,
    services: HashMap<SocketAddr, Arc<ServiceTarget>>,
    /// Ready endpoint addresses of the local Services offered to federated clusters.
    exported: std::collections::HashSet<IpAddr>,
    /// The EgressPolicies selecting this node's pods.
    egress: membrane_policy::egress::EgressIndex,
    /// Service ports by (`namespace/name`, port), headless Services included.
    service_ports: HashMap<(String, u16), Arc<ServiceTarget>>,
    /// Ingress gateways' tables, by `namespace/name` (only a node running one gets any).
    ingress: BTreeMap<String, Arc<membrane_policy::gateway::IngressTable>>,
    /// Whether this state came from a source (false: the empty state before the first
    /// discovery snapshot).
    loaded: bool,
}

// === impl MeshState ===

impl MeshState {
    /// Parses a workloads document (YAML or JSON).
    pub fn parse(path: &str, text: &str, trust_domain: &TrustDomain) -> Result<Self, StateError> {
        let doc: StateDoc = serde_saphyr::from_str(text).map_err(|e| StateError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut state = MeshState {
            loaded: true,
            ..MeshState::default()
        };
        for ns in doc.namespaces {
            if ns.plaintext_udp_ports.contains(&0) {
                return Err(StateError::Parse {
                    path: path.to_owned(),
                    message: format!("namespace {}: plaintextUdpPorts: 0 is not a port", ns.name),
                });
            }
            state.set_plaintext_udp_ports(&ns.name, ns.plaintext_udp_ports);
            state.plaintext.insert(ns.name, ns.plaintext);
        }
        for w in doc.workloads {
            let invalid = |message: String| StateError::Invalid {
                path: path.to_owned(),
                uid: w.uid.clone(),
                message,
            };
            let identity = WorkloadIdentity::new(trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| invalid(e.to_string()))?;
            if w.foreign && w.protocol != Protocol::Hbone {
                return Err(invalid(
                    "a foreign workload speaks HBONE: protocol TCP contradicts foreign: true"
                        .into(),
                ));
            }
            state
                .insert(Workload {
                    uid: w.uid.clone(),
                    name: w.name,
                    namespace: w.namespace,
                    service_account: w.service_account,
                    node: w.node,
                    ips: w.ips,
                    protocol: w.protocol,
                    labels: w.labels,
                    identity,
                    gateway: None,
                    foreign: w.foreign,
                    network_gateway: None,
                })
                .map_err(invalid)?;
        }
        Ok(state)
    }

    /// An empty state that says it was loaded from a source (a mesh with no workloads).
    pub fn empty_loaded() -> Self {
        Self {
            loaded: true,
            ..Self::default()
        }
    }

    /// Adds a workload whose IPs may clash with workloads already present (a discovery
    /// snapshot: hostNetwork pods, a reused IP of a terminating pod): a clashing IP stays with
    /// its first owner and is dropped from this workload, with a warning, instead of refusing
    /// the whole update. A duplicate UID is still refused. Returns the IPs dropped.
    pub fn insert_lenient(&mut self, mut workload: Workload) -> Result<Vec<IpAddr>, String> {
        let (kept, dropped): (Vec<IpAddr>, Vec<IpAddr>) = workload
            .ips
            .iter()
            .copied()
            .partition(|ip| !self.by_ip.contains_key(ip));
        for ip in &dropped {
            tracing::warn!(
                uid = %workload.uid,
                %ip,
                owner = %self.by_ip[ip].uid,
                "workload IP already owned by another workload; not routing it to this one"
            );
        }
        workload.ips = kept;
        self.insert(workload)?;
        Ok(dropped)
    }

    /// Adds a workload; refuses a duplicate UID or an IP already owned by another workload.
    pub fn insert(&mut self, workload: Workload) -> Result<(), String> {
        let workload = Arc::new(workload);
        if self
            .by_uid
            .insert(workload.uid.clone(), workload.clone())
            .is_some()
        {
            return Err("duplicate uid".into());
        }
        for ip in &workload.ips {
            if let Some(other) = self.by_ip.insert(*ip, workload.clone()) {
                return Err(format!("IP {ip} is also used by {}", other.uid));
            }
        }
        Ok(())
    }

    /// Sets a namespace's plaintext mode.
    pub fn set_plaintext(&mut self, namespace: &str, mode: PlaintextMode) {
        self.plaintext.insert(namespace.to_owned(), mode);
    }

    /// Replaces the EgressPolicies.
    pub fn set_egress(&mut self, egress: membrane_policy::egress::EgressIndex) {
        self.egress = egress;
    }

    /// Records port `port` of Service `service` (`namespace/name`), whatever its addresses.
    pub fn add_service_port(&mut self, service: &str, port: u16, target: ServiceTarget) {
        self.service_ports
            .insert((service.to_owned(), port), Arc::new(target));
    }

    /// Port `port` of Service `service` (`namespace/name`): its ready endpoints.
    pub fn service_port(&self, service: &str, port: u16) -> Option<&Arc<ServiceTarget>> {
        self.service_ports.get(&(service.to_owned(), port))
    }

    /// The ports of Service `namespace/name`, `None` when the mesh has no such Service.
    pub fn service_port_numbers(&self, namespace: &str, name: &str) -> Option<Vec<u16>> {
        let service = format!("{namespace}/{name}");
        let ports: Vec<u16> = self
            .service_ports
            .keys()
            .filter(|(s, _)| *s == service)
            .map(|(_, p)| *p)
            .collect();
        (!ports.is_empty()).then_some(ports)
    }

    /// Sets ingress gateway `gateway`'s (`namespace/name`) table.
    pub fn set_ingress(&mut self, gateway: String, table: membrane_policy::gateway::IngressTable) {
        self.ingress.insert(gateway, Arc::new(table));
    }

    /// Ingress gateway `gateway`'s (`namespace/name`) table.
    pub fn ingress(&self, gateway: &str) -> Option<&Arc<membrane_policy::gateway::IngressTable>> {
        self.ingress.get(gateway)
    }

    /// The variable part of `workload`'s capture rules: its namespace's inbound UDP, and
    /// whether an enforced ALLOW EgressPolicy selects it (then what the capture cannot decide
    /// is dropped on the way out).
    pub fn pod_rules(&self, workload: &Workload) -> PodRules {
        use membrane_policy::egress::EgressAction;
        let egress_locked = self
            .egress
            .selecting(&workload.namespace, &workload.labels)
            .iter()
            .any(|p| p.action == EgressAction::Allow && !p.dry_run);
        PodRules {
            udp: self.udp_inbound(&workload.namespace),
            egress_locked,
        }
    }

    /// The EgressPolicies the controller sent (those selecting this node's pods).
    pub fn egress(&self) -> &membrane_policy::egress::EgressIndex {
        &self.egress
    }

    /// Sets the UDP ports of `namespace` that stay open to plaintext (sorted and
    /// deduplicated here).
    pub fn set_plaintext_udp_ports(&mut self, namespace: &str, mut ports: Vec<u16>) {
        ports.sort_unstable();
        ports.dedup();
        self.udp_ports.insert(namespace.to_owned(), ports);
    }

    /// What inbound UDP captured pods of `namespace` accept: everything where plaintext is
    /// permitted (as for TCP), otherwise only the named ports.
    pub fn udp_inbound(&self, namespace: &str) -> UdpInbound {
        match self.plaintext(namespace) {
            PlaintextMode::Permit => UdpInbound::Accept,
            PlaintextMode::Deny => UdpInbound::Drop {
                except: self.udp_ports.get(namespace).cloned().unwrap_or_default(),
            },
        }
    }

    /// Records `ip` as a ready endpoint of a local Service offered to federated clusters.
    pub fn add_exported(&mut self, ip: IpAddr) {
        self.exported.insert(ip);
    }

    /// Whether `ip` is a ready endpoint of a local Service offered to federated clusters
    /// (what an east-west gateway may relay to).
    pub fn is_exported(&self, ip: IpAddr) -> bool {
        self.exported.contains(&ip)
    }

    /// Routes connections to `vip` (a Service's virtual IP and port) to `target`.
    pub fn add_service(&mut self, vip: SocketAddr, target: ServiceTarget) {
        self.services.insert(vip, Arc::new(target));
    }

    /// Every Service virtual IP.
    pub fn virtual_ips(&self) -> std::collections::HashSet<IpAddr> {
        self.services.keys().map(SocketAddr::ip).collect()
    }

    /// Whether this state came from a source (the file, or a discovery snapshot).
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// Where a connection to `dst` goes: a workload's own address, or, for a Service's
    /// virtual IP, one of its ready endpoints of the virtual IP's address family (as a
    /// Kubernetes Service of one family routes to endpoints of that family; mesh workloads
    /// first, picked at random). Any other destination is returned unchanged with no workload.
    pub fn resolve(&self, dst: SocketAddr) -> (SocketAddr, Option<Arc<Workload>>) {
        if let Some(w) = self.by_ip.get(&dst.ip()) {
            return (dst, Some(w.clone()));
        }
        let Some(svc) = self.services.get(&dst) else {
            return (dst, None);
        };
        let family: Vec<&SocketAddr> = svc
            .endpoints
            .iter()
            .filter(|e| e.is_ipv4() == dst.is_ipv4())
            .collect();
        let meshed: Vec<&SocketAddr> = family
            .iter()
            .copied()
            .filter(|e| self.by_ip.contains_key(&e.ip()))
            .collect();
        let pool: Vec<&SocketAddr> = if meshed.is_empty() { family } else { meshed };
        if pool.is_empty() {
            return (dst, None);
        }
        let chosen = *pool[rand::random_range(0..pool.len())];
        (chosen, self.by_ip.get(&chosen.ip()).cloned())
    }

    /// The virtual IPs of Service `namespace/name` (sorted, each once); empty if the mesh has
    /// no such Service. Reads the index in place (the DNS capture asks per query).
    pub fn service_ips(&self, service: &str) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .services
            .iter()
            .filter(|(_, target)| target.service == service)
            .map(|(vip, _)| vip.ip())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// Every Service port, by virtual address.
    pub fn services(&self) -> BTreeMap<String, ServiceTarget> {
        self.services
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_ref().clone()))
            .collect()
    }

    /// Reads and parses a workloads file.
    pub fn load(path: &Path, trust_domain: &TrustDomain) -> Result<Self, StateError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&shown, &text, trust_domain)
    }

    /// The workload with this pod UID.
    pub fn by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    /// The workload owning this IP.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Whether `ip` is an east-west gateway pod of this cluster (not an imported workload).
    pub fn is_local_east_west_gateway(&self, ip: IpAddr) -> bool {
        self.by_ip(ip).is_some_and(|w| {
            !w.foreign
                && w.gateway
                    .as_ref()
                    .is_some_and(|r| r.kind == GatewayKind::EastWest)
        })
    }

    /// Whether plaintext sources may reach workloads of `namespace`.
    pub fn plaintext(&self, namespace: &str) -> PlaintextMode {
        self.plaintext.get(namespace).copied().unwrap_or_default()
    }

    /// Every workload, in UID order.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        let mut all: Vec<_> = self.by_uid.values().cloned().collect();
        all.sort_by(|a, b| a.uid.cmp(&b.uid));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td")
    }

    #[test]
    fn parses_and_indexes() {
        let text = "workloads:\n- {uid: u1, name: a, namespace: ns1, serviceAccount: sa, node: n1, ips: [10.0.0.1]}\n- {uid: u2, name: b, namespace: ns2, node: n2, ips: [10.0.0.2], protocol: TCP}\nnamespaces:\n- {name: ns1, plaintext: permit}\n";
        let state = MeshState::parse("f", text, &td()).expect("valid");
        let a = state.by_ip("10.0.0.1".parse().expect("ip")).expect("a");
        assert_eq!(
            a.identity.to_string(),
            "spiffe://cluster.local/ns/ns1/sa/sa"
        );
        assert_eq!(state.by_uid("u2").expect("b").protocol, Protocol::Tcp);
        assert_eq!(state.by_uid("u2").expect("b").service_account, "default");
        assert_eq!(state.plaintext("ns1"), PlaintextMode::Permit);
        assert_eq!(state.plaintext("ns2"), PlaintextMode::Deny);
    }

    #[test]
    fn rejects_bad_documents() {
        for bad in [
            "workloads: [{uid: u, name: a, namespace: Bad_NS, node: n}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, ips: [nope]}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, extra: 1}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n}, {uid: u, name: b, namespace: ns, node: n}]",
            "workloads: [{uid: u, name: a, namespace: ns, node: n, ips: [10.0.0.1]}, {uid: v, name: b, namespace: ns, node: n, ips: [10.0.0.1]}]",
            "[unclosed",
            "namespaces: [{name: ns, plaintextUdpPorts: [0]}]",
            "namespaces: [{name: ns, plaintextUdpPorts: [70000]}]",
        ] {
            assert!(MeshState::parse("f", bad, &td()).is_err(), "{bad}");
        }
    }

    #[test]
    fn inbound_udp_follows_the_namespace_plaintext_mode() {
        let text = "namespaces:\n- {name: shop, plaintextUdpPorts: [9999, 53, 53]}\n- {name: lax, plaintext: permit, plaintextUdpPorts: [53]}\n";
        let state = MeshState::parse("f", text, &td()).expect("valid");
        assert_eq!(
            state.udp_inbound("shop"),
            UdpInbound::Drop {
                except: vec![53, 9999]
            }
        );
        assert_eq!(state.udp_inbound("lax"), UdpInbound::Accept);
        assert_eq!(state.udp_inbound("unknown"), UdpInbound::default());
    }
}
