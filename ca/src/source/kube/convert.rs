//! Kubernetes API objects → the source-independent model, with the directory source's
//! semantics (defaults, skipped values) wherever the two can agree.
//!
//! Objects come from the API server, so they are already valid Kubernetes objects: nothing
//! here refuses an object; a value the model cannot hold (an address that is not an IP, a
//! port outside 1–65535, a non-TCP port) is skipped.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::source::model::{
    Endpoint, Namespace, Pod, PodPhase, Service, ServiceAccount, ServicePort,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `(namespace, name)` of a namespaced object.
pub type Key = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

/// The name of a Namespace object.
pub fn namespace_key(ns: &core::Namespace) -> Option<String> {
    ns.metadata.name.clone()
}

/// Whether `ns`'s Membrane annotations are valid; an invalid one is logged (with its name in
/// the error) and read in its narrowest meaning downstream (no UDP port exempted).
pub fn annotations_valid(ns: &Namespace) -> bool {
    match ns
        .annotations
        .get(crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION)
        .map(|v| crate::source::parse_plaintext_udp_ports(v))
    {
        Some(Err(e)) => {
            tracing::warn!(namespace = %ns.name, error = %e, "invalid namespace annotation; no UDP port is exempted from the drop");
            false
        }
        _ => true,
    }
}

/// A Namespace: name, labels, annotations (an invalid Membrane annotation is kept as is and
/// logged: see [`annotations_valid`]).
pub fn namespace(ns: core::Namespace) -> Option<(String, Namespace)> {
    let meta = ns.metadata;
    let name = meta.name?;
    Some((
        name.clone(),
        Namespace {
            name,
            labels: meta.labels.unwrap_or_default(),
            annotations: meta.annotations.unwrap_or_default(),
        },
    ))
    .inspect(|(_, ns)| {
        annotations_valid(ns);
    })
}

/// `(namespace, name)` of a Pod, ServiceAccount, Service or EndpointSlice.
pub fn key<K: kube::Resource<DynamicType = ()>>(obj: &K) -> Option<Key> {
    key_of(obj.meta())
}

/// The annotation the kubelet puts on the API-server copy of a static pod (a *mirror pod*).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A Pod. `status.phase` missing (not yet reported) counts as `Pending`; the UID falls back to
/// `<namespace>/<name>` like the directory source.
///
/// Left out (no workload, no identity):
/// - a `hostNetwork` pod: it shares its node's network namespace and IP, so it cannot be
///   captured, and its IP would clash with every other host-network pod's;
/// - a mirror pod ([`MIRROR_POD_ANNOTATION`]) or a pod without a service account: a node
///   creates mirror pods bound to itself at will, and only they lack a service account on a
///   real cluster, so counting one would let a compromised node name any
///   `ns/<ns>/sa/default` identity. (The directory source, written by the operator, still
///   defaults the service account to `default`.)
pub fn pod(pod: core::Pod) -> Option<(Key, Pod)> {
    let key = key_of(&pod.metadata)?;
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    if spec.host_network == Some(true) {
        return None;
    }
    let mirror = (meta.annotations.as_ref()).is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION));
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty());
    let service_account = match (mirror, service_account) {
        (false, Some(sa)) => sa,
        (mirror, _) => {
            tracing::debug!(
                namespace = %key.0,
                pod = %key.1,
                node = spec.node_name.as_deref().unwrap_or_default(),
                reason = if mirror { "mirror_pod" } else { "no_service_account" },
                "pod left out of the workload state; it gets no identity"
            );
            return None;
        }
    };
    let status = pod.status.unwrap_or_default();
    // The node's claim, kept as reported: an address another active pod or a Service also
    // holds is withheld from every pod where the view is built (`ClusterState::withheld_ips`).
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip);
    for ip in status.pod_ip.into_iter().chain(listed) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    let mut named_ports = BTreeMap::new();
    for container in &spec.containers {
        for port in container.ports.iter().flatten() {
            if let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port))
                && number > 0
            {
                named_ports.insert(name.clone(), number);
            }
        }
    }
    let phase = status
        .phase
        .as_deref()
        .map_or(PodPhase::Pending, PodPhase::parse);
    Some((
        key.clone(),
        Pod {
            uid: meta
                .uid
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| format!("{}/{}", key.0, key.1)),
            namespace: key.0,
            name: key.1,
            service_account,
            node_name: spec.node_name.filter(|n| !n.is_empty()),
            ips,
            labels: meta.labels.unwrap_or_default(),
            phase,
            named_ports,
        },
    ))
}

/// A ServiceAccount.
pub fn service_account(sa: core::ServiceAccount) -> Option<(Key, ServiceAccount)> {
    let (namespace, name) = key_of(&sa.metadata)?;
    Some((
        (namespace.clone(), name.clone()),
        ServiceAccount { namespace, name },
    ))
}

/// A Service without its endpoints (they come from EndpointSlices, joined by [`join`]).
/// Cluster IPs `None` (headless) and empty are skipped; only TCP ports are kept. A named
/// `targetPort` has target port 0 (it resolves per endpoint, as in the directory source).
pub fn service(svc: core::Service) -> Option<(Key, Service)> {
    let (namespace, name) = key_of(&svc.metadata)?;
    let exported = (svc.metadata.labels.as_ref())
        .and_then(|l| l.get(crate::source::EXPORT_LABEL))
        .is_some_and(|v| v == "true");
    let spec = svc.spec.unwrap_or_default();
    let mut vips = Vec::new();
    let listed = spec.cluster_ips.unwrap_or_default();
    for ip in spec.cluster_ip.into_iter().chain(listed) {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !vips.contains(&ip)
        {
            vips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Some(port) = u16::try_from(p.port).ok().filter(|n| *n > 0) else {
            continue;
        };
        let target_port = match p.target_port {
            None => port,
            Some(IntOrString::Int(n)) => u16::try_from(n).ok().filter(|n| *n > 0).unwrap_or(port),
            Some(IntOrString::String(s)) => s.parse::<u16>().unwrap_or(0),
        };
        ports.push(ServicePort {
            name: p.name.unwrap_or_default(),
            port,
            target_port,
        });
    }
    Some((
        (namespace.clone(), name.clone()),
        Service {
            namespace,
            name,
            vips,
            ports,
            endpoints: Vec::new(),
            exported,
        },
    ))
}

/// What an EndpointSlice contributes: its Service and its endpoints, each with the slice's
/// TCP ports by name (all of them; [`join`] keeps only those that differ from the Service's
/// target port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// Name of the Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// An EndpointSlice of address type IPv4 or IPv6 labelled with its Service; others (FQDN
/// slices, slices not managed for a Service) are skipped. `conditions.ready` absent counts as
/// ready, as the API specifies.
pub fn endpoint_slice(slice: discovery::EndpointSlice) -> Option<(Key, Slice)> {
    let key = key_of(&slice.metadata)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()?;
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let mut ports = BTreeMap::new();
    for p in slice.ports.unwrap_or_default() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        if let Some(n) = p
            .port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
        {
            ports.insert(p.name.unwrap_or_default(), n);
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let pod = ep
            .target_ref
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name);
        for address in &ep.addresses {
            if let Ok(ip) = address.parse::<IpAddr>() {
                endpoints.push(Endpoint {
                    ip,
                    pod: pod.clone(),
                    ready,
                    ports: ports.clone(),
                });
            }
        }
    }
    Some((key, Slice { service, endpoints }))
}

/// Services with their endpoints from every slice of the same namespace naming them. An
/// endpoint's per-name ports keep only the entries that differ from the Service port's
/// `target_port` (so named target ports resolve per endpoint, as in the directory source).
/// An address listed by several slices (during a slice migration) appears once, ready if any
/// slice says so. Endpoints are sorted by address, so snapshots compare equal when nothing
/// changed.
pub fn join(
    services: &BTreeMap<Key, Service>,
    slices: &BTreeMap<Key, Slice>,
) -> BTreeMap<Key, Service> {
    let mut by_service: BTreeMap<Key, BTreeMap<IpAddr, Endpoint>> = BTreeMap::new();
    for ((namespace, _), slice) in slices {
        let eps = by_service
            .entry((namespace.clone(), slice.service.clone()))
            .or_default();
        for ep in &slice.endpoints {
            eps.entry(ep.ip)
                .and_modify(|seen| seen.ready |= ep.ready)
                .or_insert_with(|| ep.clone());
        }
    }
    services
        .iter()
        .map(|(key, svc)| {
            let mut svc = svc.clone();
            if let Some(eps) = by_service.remove(key) {
                svc.endpoints = eps
                    .into_values()
                    .map(|mut ep| {
                        ep.ports.retain(|name, number| {
                            svc.ports
                                .iter()
                                .any(|p| &p.name == name && p.target_port != *number)
                        });
                        ep
                    })
                    .collect();
            }
            (key.clone(), svc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("valid object")
    }

    #[test]
    fn pod_fields_and_defaults() {
        let (key, p) = pod(from(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
            "spec": {"nodeName": "n1", "serviceAccount": "worker", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"containerPort": 9090}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        })))
        .expect("pod");
        assert_eq!(key, ("ns".into(), "a".into()));
        assert_eq!(p.uid, "u-1");
        assert_eq!(p.service_account, "worker", "the deprecated alias is read");
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.phase, PodPhase::Running);
        assert_eq!(p.named_ports.get("http"), Some(&8080));
        assert_eq!(p.named_ports.len(), 1);
        let (_, p) = pod(from(serde_json::json!({
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"containers": [], "serviceAccountName": "trainer"}
        })))
        .expect("pod");
        assert_eq!(p.uid, "ns/b");
        assert_eq!(p.service_account, "trainer");
        assert_eq!(p.phase, PodPhase::Pending);
        assert!(p.node_name.is_none() && p.ips.is_empty());
    }

    #[test]
    fn mirror_pods_and_pods_without_a_service_account_are_left_out() {
        let running = |metadata: serde_json::Value, spec: serde_json::Value| {
            pod(from(serde_json::json!({
                "metadata": metadata, "spec": spec,
                "status": {"phase": "Running", "podIP": "10.0.0.9"}
            })))
        };
        let meta = serde_json::json!({"name": "m", "namespace": "training"});
        // What a node can create for itself: a mirror pod (no service account, or even one
        // naming an account), or a pod without a service account.
        let mirror = serde_json::json!({"name": "m", "namespace": "training",
            "annotations": {MIRROR_POD_ANNOTATION: "a1b2c3"}});
        for (metadata, spec) in [
            (
                mirror.clone(),
                serde_json::json!({"nodeName": "node-a", "containers": []}),
            ),
            (
                mirror,
                serde_json::json!({"nodeName": "node-a", "serviceAccountName": "trainer",
                                   "containers": []}),
            ),
            (
                meta.clone(),
                serde_json::json!({"nodeName": "node-a", "containers": []}),
            ),
            (
                meta.clone(),
                serde_json::json!({"nodeName": "node-a", "serviceAccountName": "",
                                   "containers": []}),
            ),
        ] {
            assert_eq!(
                running(metadata.clone(), spec.clone()),
                None,
                "{metadata} {spec}"
            );
        }
        let (_, p) = running(
            meta,
            serde_json::json!({"nodeName": "node-a", "serviceAccountName": "default",
                               "containers": []}),
        )
        .expect("a pod naming its account is kept");
        assert_eq!(p.service_account, "default");
    }

    #[test]
    fn service_skips_headless_and_non_tcp() {
        let (_, s) = service(from(serde_json::json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "grpc", "port": 9000, "targetPort": 9001},
                {"name": "plain", "port": 7000}]}
        })))
        .expect("service");
        assert!(s.vips.is_empty());
        let ports: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.target_port))
            .collect();
        assert_eq!(
            ports,
            [("http", 80, 0), ("grpc", 9000, 9001), ("plain", 7000, 7000)]
        );
    }

    #[test]
    fn slices_join_their_service() {
        let (_, svc) = service(from(serde_json::json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "grpc", "port": 9000, "targetPort": 9001}]}
        })))
        .expect("service");
        let slice = |name: &str, svc: &str, ip: &str, ready: Option<bool>| {
            endpoint_slice(from(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns",
                             "labels": {SERVICE_NAME_LABEL: svc}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                          {"name": "grpc", "port": 9001}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                               "targetRef": {"kind": "Pod", "name": format!("pod-{name}")}}]
            })))
            .expect("slice")
        };
        let mut slices = BTreeMap::new();
        for (k, v) in [
            slice("a", "s", "10.0.0.2", Some(true)),
            slice("b", "s", "10.0.0.1", None),
            slice("c", "other", "10.0.0.3", Some(true)),
            slice("d", "s", "10.0.0.4", Some(false)),
        ] {
            slices.insert(k, v);
        }
        let mut services = BTreeMap::new();
        services.insert(("ns".to_owned(), "s".to_owned()), svc);
        let joined = join(&services, &slices);
        let s = &joined[&("ns".to_owned(), "s".to_owned())];
        assert_eq!(s.vips, ["10.96.0.10".parse::<IpAddr>().expect("ip")]);
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.pod.clone(), e.ready))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1".into(), Some("pod-b".into()), true),
                ("10.0.0.2".into(), Some("pod-a".into()), true),
                ("10.0.0.4".into(), Some("pod-d".into()), false),
            ]
        );
        // The named target port resolves per endpoint; the numeric one is not repeated.
        let ports: Vec<_> = s.endpoints[0].ports.iter().collect();
        assert_eq!(ports, [(&"http".to_owned(), &8080)]);
    }
}
