//! Service export and import across a federation.
//!
//! **Export.** Services labelled `membrane.dev/export=true` are offered on the federation
//! listener (`--federation-listen`): gRPC `ServiceExports.Watch` over mutual TLS. The caller
//! must present an X.509-SVID of a *federated* trust domain's controller
//! (`spiffe://<td>/ns/membrane-system/sa/membrane-ca`), verified against that trust domain's
//! bundle; anything else is refused in the handshake or with PERMISSION_DENIED. Each message
//! is the whole export set: every exported Service's ports and its ready endpoints that are
//! mesh pods, each with its pod's IPs and service account (with the namespace and this trust
//! domain, its SPIFFE ID). Endpoints of pods outside the mesh are not exported: a federated
//! peer could only reach them in plaintext.
//!
//! A federated trust domain may hold at most [`MAX_STREAMS_PER_PEER`] streams at once. An open
//! stream ends once its caller is no longer trusted: its trust domain no longer federated, or
//! its chain no longer verified by that trust domain's bundle in force (a root removed).
//!
//! **Import** (the `importer` module). A `TrustFederation` with `spec.serviceExports.url` makes
//! the controller follow that peer's stream, presenting its own serving SVID and requiring the peer controller's
//! SPIFFE ID (`spec.bundleEndpoint.spiffeId`) verified against the peer's federated bundle.
//! A message is validated whole ([`validate`]); a bad one is refused and the last good set
//! stays, as it does while the peer is unreachable (retried after 1–30 s). Removing the
//! federation drops its imports. The discovery view turns imports into `Workload`s of the
//! peer's trust domain (foreign: the peer's ztunnels capture them) and one `clusterset`
//! Service per imported name, on a virtual IP from [`CLUSTERSET_VIPS`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::svid::Usage;
use membrane_identity::{
    PeerCheck, PeerTrust, SharedTrustBundle, SpiffeId, TrustBundle, TrustDomain, Untrusted,
};
use membrane_proto::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::serving::{CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, ServingCert};
use crate::source::{ClusterState, StateReceiver, check_port_name};

/// The federation listener's name in metrics and logs.
pub const LISTENER: &str = "federation";
/// Most Services one peer may export to us.
pub const MAX_SERVICES: usize = 4096;
/// Most endpoints one exported Service may carry.
pub const MAX_ENDPOINTS: usize = 4096;
/// Most ports one exported Service may carry, and most per-name target ports one of its
/// endpoints may carry.
pub const MAX_PORTS: usize = 64;
/// Most endpoints one peer may export in all (what every local ztunnel holds for it).
pub const MAX_TOTAL_ENDPOINTS: usize = 10_000;
/// Most ports one peer may export in all: every Service's ports plus every endpoint's
/// per-name target ports (which every local ztunnel holds once per endpoint address).
/// With the other bounds, one peer's import stays well under a quarter of the discovery
/// message limit (`crate::server::DISCOVERY_MAX_MESSAGE_LEN`).
pub const MAX_TOTAL_PORTS: usize = 2 * MAX_TOTAL_ENDPOINTS;
/// Largest export message decoded.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;
/// Where imported Services get their virtual IPs (never routed: the ztunnel captures every
/// connection to them), `240.240.0.0/16`.
pub const CLUSTERSET_VIPS: (Ipv4Addr, u8) = (
    membrane_api::clusterset::NETWORK,
    membrane_api::clusterset::PREFIX_LEN,
);
/// Retry delays after a failed or ended import stream (doubling).
pub const RETRY_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// What is imported, by exporting trust domain (each validated whole).
pub type Imports = Arc<BTreeMap<TrustDomain, Imported>>;

/// What one federated cluster offers: its last valid exports, and the east-west gateway its
/// pods are reached through (from its `TrustFederation`; none: flat pod networks).
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// The peer's exports, validated.
    pub exports: pb::Exports,
    /// `spec.eastWestGateway`, as it goes to the ztunnels.
    pub gateway: Option<pb::NetworkGateway>,
}

/// The controller SVID path every federated controller presents.
fn controller_path() -> String {
    format!("/ns/{CONTROLLER_NAMESPACE}/sa/{CONTROLLER_SERVICE_ACCOUNT}")
}

/// The export set of `state`: exported Services and their ready mesh endpoints, on the
/// addresses the discovery stream publishes (a withheld address,
/// [`ClusterState::withheld_ips`], is nobody's; an endpoint left with none is not exported)
/// and only on addresses of the pod the endpoint names.
pub fn exports(state: &ClusterState, local: &TrustDomain) -> pb::Exports {
    let withheld = state.withheld_ips();
    let mut services = Vec::new();
    for svc in state.services.values().filter(|s| s.exported) {
        let mut endpoints: BTreeMap<String, pb::ExportedEndpoint> = BTreeMap::new();
        for e in (svc.endpoints.iter()).filter(|e| e.ready && !withheld.contains(e.ip)) {
            let Some(pod_name) = &e.pod else { continue };
            let Some(pod) = state.pods.get(&(svc.namespace.clone(), pod_name.clone())) else {
                continue;
            };
            if !pod.phase.is_active() || !state.is_mesh_pod(pod) {
                continue;
            }
            // The identity exported with an address is its pod's: an address the named pod
            // does not hold (a hand-written EndpointSlice may list any) is not exported.
            // Compared and sent canonical: an importer refuses an IPv4-mapped spelling.
            let ip = e.ip.to_canonical();
            if !pod.ips.iter().any(|p| p.to_canonical() == ip) {
                continue;
            }
            let entry = endpoints
                .entry(pod_name.clone())
                .or_insert_with(|| pb::ExportedEndpoint {
                    pod: pod_name.clone(),
                    ips: Vec::new(),
                    service_account: pod.service_account.clone(),
                    // Only the Service's own port names (what an importer accepts).
                    ports: (e.ports.iter())
                        .filter(|(k, _)| svc.ports.iter().any(|p| &p.name == *k))
                        .map(|(k, v)| (k.clone(), u32::from(*v)))
                        .collect(),
                });
            let ip = ip.to_string();
            if !entry.ips.contains(&ip) {
                entry.ips.push(ip);
            }
        }
        services.push(pb::ExportedService {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            ports: ports_wire(svc),
            endpoints: endpoints.into_values().collect(),
        });
    }
    pb::Exports {
        trust_domain: local.to_string(),
        services,
    }
}

/// Whether `ip` may be a pod address imported from a peer: not IPv4-mapped (it would be
/// imported as its IPv4 address, around the checks below), unicast, not loopback, link-local
/// (a cloud metadata service lives there) or a clusterset address, and inside `allowed` when
/// that names any network.
fn importable(ip: IpAddr, allowed: &[membrane_policy::IpNet]) -> Result<(), &'static str> {
    if ip.to_canonical() != ip {
        return Err("is an IPv4-mapped IPv6 address (export the IPv4 address)");
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local {
        return Err("is not a pod IP");
    }
    if membrane_api::clusterset::contains(ip) {
        return Err("is a clusterset address");
    }
    if !allowed.is_empty() && !allowed.iter().any(|net| net.contains(ip)) {
        return Err("is outside the federation's serviceExports.addresses");
    }
    Ok(())
}

/// Checks a peer's export message whole: its trust domain is the one it was fetched from,
/// names, port names and service accounts are valid, every IP is an importable pod address
/// (see `importable`; within `allowed` when it names networks), every port is 1–65535, an
/// endpoint's per-name target ports name ports of its Service, no Service or endpoint
/// appears twice, and the sizes are bounded (Services, endpoints and ports per Service and
/// in all, ports per endpoint).
pub fn validate(
    exports: &pb::Exports,
    expected: &TrustDomain,
    allowed: &[membrane_policy::IpNet],
) -> Result<(), String> {
    if exports.trust_domain != expected.to_string() {
        return Err(format!(
            "exports claim trust domain {:?}, expected {expected}",
            exports.trust_domain
        ));
    }
    if exports.services.len() > MAX_SERVICES {
        return Err(format!(
            "{} services, over the limit of {MAX_SERVICES}",
            exports.services.len()
        ));
    }
    let total: usize = exports.services.iter().map(|s| s.endpoints.len()).sum();
    if total > MAX_TOTAL_ENDPOINTS {
        return Err(format!(
            "{total} endpoints in all, over the limit of {MAX_TOTAL_ENDPOINTS}"
        ));
    }
    let ports: usize = (exports.services.iter())
        .map(|s| s.ports.len() + s.endpoints.iter().map(|e| e.ports.len()).sum::<usize>())
        .sum();
    if ports > MAX_TOTAL_PORTS {
        return Err(format!(
            "{ports} ports in all (Services' and endpoints'), over the limit of {MAX_TOTAL_PORTS}"
        ));
    }
    let mut seen = BTreeSet::new();
    for svc in &exports.services {
        let name = format!("{}/{}", svc.namespace, svc.name);
        let fail = |m: String| format!("service {name}: {m}");
        membrane_identity::spiffe_id::validate_namespace(&svc.namespace)
            .map_err(|e| fail(format!("namespace: {e}")))?;
        membrane_identity::spiffe_id::validate_namespace(&svc.name)
            .map_err(|e| fail(format!("name: {e}")))?;
        if !seen.insert(name.clone()) {
            return Err(fail("exported twice".into()));
        }
        let port = |p: u32, zero_ok: bool| {
            (u16::try_from(p).is_ok_and(|p| p > 0) || (zero_ok && p == 0))
                .then_some(())
                .ok_or_else(|| fail(format!("port {p} is not 1-65535")))
        };
        if svc.ports.len() > MAX_PORTS {
            return Err(fail(format!(
                "{} ports, over the limit of {MAX_PORTS}",
                svc.ports.len()
            )));
        }
        for p in &svc.ports {
            check_port_name(&p.name).map_err(|e| fail(e.to_string()))?;
            port(p.port, false)?;
            port(p.target_port, true)?;
        }
        if svc.endpoints.len() > MAX_ENDPOINTS {
            return Err(fail(format!(
                "{} endpoints, over the limit of {MAX_ENDPOINTS}",
                svc.endpoints.len()
            )));
        }
        let mut pods = BTreeSet::new();
        for e in &svc.endpoints {
            membrane_identity::spiffe_id::validate_namespace(&e.pod)
                .map_err(|err| fail(format!("endpoint pod name: {err}")))?;
            if !pods.insert(e.pod.as_str()) {
                return Err(fail(format!("endpoint {} twice", e.pod)));
            }
            membrane_identity::WorkloadIdentity::new(expected, &svc.namespace, &e.service_account)
                .map_err(|err| fail(format!("endpoint {}: {err}", e.pod)))?;
            if e.ips.is_empty() || e.ips.len() > 2 {
                return Err(fail(format!("endpoint {} needs one or two IPs", e.pod)));
            }
            for ip in &e.ips {
                let parsed: IpAddr = ip
                    .parse()
                    .map_err(|_| fail(format!("endpoint {}: {ip:?} is not an IP", e.pod)))?;
                importable(parsed, allowed)
                    .map_err(|why| fail(format!("endpoint {}: {ip} {why}", e.pod)))?;
            }
            if e.ports.len() > MAX_PORTS {
                return Err(fail(format!(
                    "endpoint {}: {} ports, over the limit of {MAX_PORTS}",
                    e.pod,
                    e.ports.len()
                )));
            }
            for (name, p) in &e.ports {
                if !svc.ports.iter().any(|sp| &sp.name == name) {
                    check_port_name(name).map_err(|e| fail(e.to_string()))?;
                    return Err(fail(format!(
                        "endpoint {}: port {name:?} is not a port of the Service",
                        e.pod
                    )));
                }
                port(*p, false)?;
            }
        }
    }
    Ok(())
}

/// The virtual IP of every imported Service name (`namespace/name`), stable for a given set:
/// a hash of the name picks its home address in [`CLUSTERSET_VIPS`]. Every home address
/// goes to the first name (sorted) that hashes to it; the names that lost their home then
/// take the next address that is nobody's, in sorted order. So a name at its home keeps its
/// address whatever else is imported unless a name that sorts before it hashes to the same
/// home; only a name that lost its home may move when the set changes.
pub fn clusterset_vips<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, IpAddr> {
    let (base, prefix) = CLUSTERSET_VIPS;
    // Usable offsets: 1 ..= size - 2 (not the network or broadcast address).
    let usable = (1u32 << (32 - prefix)) - 2;
    let sorted: BTreeSet<&str> = names.into_iter().collect();
    let home = |name: &str| {
        // FNV-1a: stable across processes and versions.
        let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        1 + hash % usable
    };
    let mut taken = BTreeSet::new();
    let mut offsets: BTreeMap<&str, u32> = BTreeMap::new();
    let mut homeless = Vec::new();
    for name in &sorted {
        let offset = home(name);
        if taken.insert(offset) {
            offsets.insert(name, offset);
        } else {
            homeless.push(*name);
        }
    }
    for name in homeless {
        if taken.len() >= usable as usize {
            tracing::error!(
                service = name,
                "no clusterset address left; the Service gets none"
            );
            continue;
        }
        let mut offset = home(name);
        while !taken.insert(offset) {
            offset = 1 + offset % usable;
        }
        offsets.insert(name, offset);
    }
    offsets
        .into_iter()
        .map(|(name, offset)| {
            (
                name.to_owned(),
                IpAddr::V4(Ipv4Addr::from(u32::from(base) + offset)),
            )
        })
        .collect()
}

/// The wire form of a Service's ports (the discovery stream's and the exports').
pub fn ports_wire(svc: &crate::source::Service) -> Vec<pb::ServicePort> {
    svc.ports
        .iter()
        .map(|p| pb::ServicePort {
            name: p.name.clone(),
            port: u32::from(p.port),
            target_port: u32::from(p.target_port),
        })
        .collect()
}

// === the export server ===

/// `ServiceExports` for federated controllers.
#[derive(Clone)]
pub struct ExportService {
    local: TrustDomain,
    state: StateReceiver,
    /// The trust domains federated now, with their bundles: a caller whose trust domain
    /// leaves, or whose chain the current bundle no longer verifies (a root removed), is
    /// refused, and its open streams end.
    trust: SharedTrustBundle,
    cancel: CancellationToken,
    /// Open streams per caller trust domain (at most [`MAX_STREAMS_PER_PEER`]).
    open: StreamSlots,
}

/// How often an open exports stream checks that its caller is still trusted.
const RECHECK: Duration = Duration::from_secs(2);

/// Exports streams one federated trust domain may hold open at once (a controller needs one;
/// a few more cover reconnects and several replicas). More are refused with
/// RESOURCE_EXHAUSTED, so a peer cannot make this controller compute and hold exports for
/// many streams.
pub const MAX_STREAMS_PER_PEER: usize = 4;

/// Open exports streams per caller trust domain.
type StreamSlots = membrane_runtime::slots::KeyedSlots<TrustDomain>;

/// A place for one more exports stream of `td`, or RESOURCE_EXHAUSTED.
fn take_stream(
    open: &StreamSlots,
    td: &TrustDomain,
) -> Result<membrane_runtime::slots::Slot<TrustDomain>, tonic::Status> {
    open.take(td, MAX_STREAMS_PER_PEER).ok_or_else(|| {
        tonic::Status::resource_exhausted(format!(
            "trust domain {td} already holds {MAX_STREAMS_PER_PEER} exports streams"
        ))
    })
}

impl ExportService {
    /// Serves the exports of `state` to the trust domains `trust` holds, until `cancel` fires.
    pub fn new(
        local: TrustDomain,
        state: StateReceiver,
        trust: SharedTrustBundle,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            local,
            state,
            trust,
            cancel,
            open: StreamSlots::default(),
        }
    }

    fn federated(trust: &SharedTrustBundle, id: &SpiffeId) -> Result<(), tonic::Status> {
        match trust.for_trust_domain(id.trust_domain()) {
            Some(_) => Ok(()),
            None => Err(tonic::Status::permission_denied(format!(
                "trust domain {} is not federated with this cluster",
                id.trust_domain()
            ))),
        }
    }

    /// The federated controller presenting the peer certificates of `request`, or why not.
    fn caller<T>(&self, request: &tonic::Request<T>) -> Result<SpiffeId, tonic::Status> {
        let certs = request.peer_certs();
        let id = membrane_identity::peer_spiffe_id(certs.as_ref().map(|c| c.as_slice()))
            .map_err(|e| tonic::Status::unauthenticated(format!("no controller SVID: {e}")))?;
        if id.trust_domain() == &self.local {
            return Err(tonic::Status::permission_denied(
                "exports are for federated trust domains, not the local one",
            ));
        }
        if id.path() != controller_path() {
            return Err(tonic::Status::permission_denied(format!(
                "{id} is not a controller (expected the path {})",
                controller_path()
            )));
        }
        // The handshake verified it, but a connection outlives a federation.
        Self::federated(&self.trust, &id)?;
        Ok(id)
    }
}

#[tonic::async_trait]
impl pb::service_exports_server::ServiceExports for ExportService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Exports, tonic::Status>>;

    async fn watch(
        &self,
        request: tonic::Request<pb::ExportsRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let caller = self.caller(&request).inspect_err(|e| {
            tracing::warn!(error = %e.message(), "service exports refused");
        })?;
        // The chain the handshake verified, checked again whenever the bundles change: a
        // root removed from the caller's bundle (or a new bootstrap bundle) ends the stream.
        // Generation 0 makes the first check verify it unless the bundles never changed.
        let certs = request.peer_certs();
        let peer = (certs.as_deref())
            .and_then(|chain| PeerTrust::new(chain, Usage::Client, 0).ok())
            .ok_or_else(|| tonic::Status::unauthenticated("no controller SVID"))?;
        let slot = take_stream(&self.open, caller.trust_domain()).inspect_err(|e| {
            tracing::warn!(peer = %caller, error = %e.message(), "service exports refused");
        })?;
        tracing::info!(peer = %caller, "a federated controller watches the service exports");
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (mut state, local, cancel) =
            (self.state.clone(), self.local.clone(), self.cancel.clone());
        let trust = self.trust.clone();
        tokio::spawn(async move {
            let mut last: Option<pb::Exports> = None;
            let mut recheck = tokio::time::interval(RECHECK);
            loop {
                if let Err(e) = peer.recheck(&trust, rustls_pki_types::UnixTime::now()) {
                    tracing::warn!(peer = %caller, error = %e, "caller no longer trusted; ending its exports stream");
                    let status = match e {
                        Untrusted::NotFederated(_) => {
                            tonic::Status::permission_denied(e.to_string())
                        }
                        Untrusted::Chain(_) => tonic::Status::unauthenticated(e.to_string()),
                    };
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                let current = state
                    .borrow_and_update()
                    .as_ref()
                    .map(|s| exports(s, &local));
                if let Some(current) = current
                    && last.as_ref() != Some(&current)
                {
                    let services = current.services.len();
                    if tx.send(Ok(current.clone())).await.is_err() {
                        break;
                    }
                    tracing::debug!(peer = %caller, services, "service exports sent");
                    last = Some(current);
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = recheck.tick() => {}
                    changed = state.changed() => if changed.is_err() { break },
                }
            }
            drop(slot);
            tracing::info!(peer = %caller, "service exports stream ended");
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

/// The federation listener's TLS: the serving SVID, and a client SVID required and verified
/// against the bundle of its own trust domain (`trust`: the local bundle and every federated
/// one).
pub fn server_tls(
    serving: Arc<ServingCert>,
    trust: SharedTrustBundle,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = membrane_identity::crypto_provider();
    let verifier = membrane_identity::verify::SpiffeClientVerifier::new(
        trust,
        PeerCheck::AnyTrusted,
        provider.clone(),
    );
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Keeps `trust` equal to the local bundle and the federated ones, until `cancel` fires.
pub async fn follow_trust(
    trust: SharedTrustBundle,
    mut local: watch::Receiver<Arc<TrustBundle>>,
    mut federated: watch::Receiver<Arc<Vec<TrustBundle>>>,
    cancel: CancellationToken,
) {
    loop {
        let bundle = local.borrow_and_update().as_ref().clone();
        trust.store(bundle);
        let bundles = federated.borrow_and_update().as_ref().clone();
        if let Err(e) = trust.store_federated(bundles) {
            tracing::error!(error = %e, "federation listener: federated bundles refused");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = local.changed() => if r.is_err() { return },
            r = federated.changed() => if r.is_err() { return },
        }
    }
}

// === the importer ===

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;
