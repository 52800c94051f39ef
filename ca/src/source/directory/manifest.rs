//! Reading manifests: YAML text → validated [`Object`]s of the cluster model.
//!
//! A file may hold several documents, and `kind: List` is unpacked. `Namespace`, `Pod`,
//! `ServiceAccount`, `Service`, `AuthorizationPolicy` (Membrane's and Istio's API groups),
//! `EgressPolicy`, `TrustFederation` and the Gateway API's `Gateway`, `TCPRoute` and `TLSRoute` are understood; other kinds are ignored. Every error names the document and the field.
//! Pure: this module must not touch the filesystem, the clock or any channel (that is
//! [`super::watch`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::source::model::{
    ClusterState, Endpoint, Namespace, Pod, PodPhase, PolicyEntry, ServiceAccount, ServicePort,
};

/// What is wrong with one YAML document, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The text is not YAML.
    #[error("not valid YAML: {0}")]
    Yaml(String),
    /// A document is not a mapping with `kind` and `apiVersion`.
    #[error("document {document}: {message}")]
    Shape {
        /// 1-based document index in the file.
        document: usize,
        /// What is wrong.
        message: String,
    },
    /// A field has the wrong type or value.
    #[error("document {document} ({kind} {name}): field {field}: {message}")]
    Field {
        /// 1-based document index in the file.
        document: usize,
        /// Object kind.
        kind: String,
        /// `namespace/name` or `name`, as far as known.
        name: String,
        /// Field path, for example `spec.nodeName`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// One object read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A Namespace.
    Namespace(Namespace),
    /// A Pod.
    Pod(Pod),
    /// A ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A Service, with its selector (endpoints are resolved against the pods).
    Service(DirService),
    /// A valid AuthorizationPolicy.
    Policy(PolicyEntry),
    /// A valid EgressPolicy.
    Egress(membrane_policy::egress::EgressPolicy),
    /// A valid Gateway API `Gateway`.
    Gateway(membrane_policy::gateway::Gateway),
    /// A valid `TCPRoute` or `TLSRoute`.
    Route(membrane_policy::gateway::Route),
    /// A valid `TrustFederation`.
    Federation(Box<crate::federation::TrustFederation>),
}

/// A Service as written in a manifest: endpoints come from its selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs.
    pub vips: Vec<std::net::IpAddr>,
    /// Ports, with the target port as written.
    pub ports: Vec<(ServicePort, TargetPort)>,
    /// `spec.selector`; `None` selects nothing.
    pub selector: Option<BTreeMap<String, String>>,
    /// Labelled `membrane.dev/export: "true"`.
    pub exported: bool,
}

/// A Service port's `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A number.
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaDoc {
    name: String,
    namespace: Option<String>,
    uid: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct NamespaceDoc {
    metadata: MetaDoc,
}

#[derive(Deserialize)]
struct PodDoc {
    metadata: MetaDoc,
    #[serde(default)]
    spec: PodSpecDoc,
    #[serde(default)]
    status: PodStatusDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecDoc {
    service_account_name: Option<String>,
    /// Deprecated alias Kubernetes still accepts.
    service_account: Option<String>,
    node_name: Option<String>,
    #[serde(default)]
    containers: Vec<ContainerDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ContainerDoc {
    #[serde(default)]
    ports: Vec<ContainerPortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortDoc {
    name: Option<String>,
    container_port: u16,
}

#[derive(Deserialize)]
struct ServiceAccountDoc {
    metadata: MetaDoc,
}

#[derive(Deserialize)]
struct ServiceDoc {
    metadata: MetaDoc,
    #[serde(default)]
    spec: ServiceSpecDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecDoc {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePortDoc>,
    selector: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortDoc {
    #[serde(default)]
    name: String,
    port: u16,
    target_port: Option<IntOrString>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusDoc {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIpDoc>,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: String,
}

/// Parses one file's text into objects: all of them, or an error naming the document and
/// field. Never panics, whatever the input.
pub fn parse_manifests(text: &str) -> Result<Vec<Object>, DocumentError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| DocumentError::Yaml(e.to_string()))?;
    let mut objects = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        parse_document(i + 1, doc, &mut objects)?;
    }
    Ok(objects)
}

fn parse_document(document: usize, doc: Value, out: &mut Vec<Object>) -> Result<(), DocumentError> {
    let shape = |message: &str| DocumentError::Shape {
        document,
        message: message.to_owned(),
    };
    let map = match doc {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        _ => return Err(shape("expected a mapping with apiVersion and kind")),
    };
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| shape("missing string field kind"))?
        .to_owned();
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| shape("missing string field apiVersion"))?
        .to_owned();
    let name_hint = map
        .get("metadata")
        .and_then(|m| {
            let name = m.get("name")?.as_str()?;
            Some(match m.get("namespace").and_then(Value::as_str) {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_owned(),
            })
        })
        .unwrap_or_else(|| "<unnamed>".into());
    let field_err = |field: String, message: String| DocumentError::Field {
        document,
        kind: kind.clone(),
        name: name_hint.clone(),
        field,
        message,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                None => Vec::new(),
                Some(_) => return Err(field_err("items".into(), "expected a list".into())),
            };
            for item in items {
                parse_document(document, item, out)?;
            }
            Ok(())
        }
        ("v1", "Namespace") => {
            let doc: NamespaceDoc = typed(Value::Object(map)).map_err(|(f, m)| field_err(f, m))?;
            out.push(Object::Namespace(
                namespace_from(doc).map_err(|(f, m)| field_err(f, m))?,
            ));
            Ok(())
        }
        ("v1", "Pod") => {
            let doc: PodDoc = typed(Value::Object(map)).map_err(|(f, m)| field_err(f, m))?;
            out.push(Object::Pod(
                pod_from(doc).map_err(|(f, m)| field_err(f, m))?,
            ));
            Ok(())
        }
        ("v1", "ServiceAccount") => {
            let doc: ServiceAccountDoc =
                typed(Value::Object(map)).map_err(|(f, m)| field_err(f, m))?;
            out.push(Object::ServiceAccount(
                service_account_from(doc).map_err(|(f, m)| field_err(f, m))?,
            ));
            Ok(())
        }
        ("v1", "Service") => {
            let doc: ServiceDoc = typed(Value::Object(map)).map_err(|(f, m)| field_err(f, m))?;
            out.push(Object::Service(
                service_from(doc).map_err(|(f, m)| field_err(f, m))?,
            ));
            Ok(())
        }
        (v, membrane_policy::model::KIND) if membrane_policy::model::API_VERSIONS.contains(&v) => {
            out.push(Object::Policy(
                policy_from(Value::Object(map)).map_err(|(f, m)| field_err(f, m))?,
            ));
            Ok(())
        }
        (v, "Gateway" | "TCPRoute" | "TLSRoute")
            if v.starts_with(membrane_policy::gateway::validate::GROUP) =>
        {
            use membrane_policy::gateway::{GatewayObject, check_gateway_value};
            match check_gateway_value(document, Value::Object(map)) {
                Ok(Some(GatewayObject::Gateway(g))) => out.push(Object::Gateway(g)),
                Ok(Some(GatewayObject::Route(r))) => out.push(Object::Route(r)),
                Ok(None) => {}
                Err(errors) => {
                    let field = errors.first().map_or_else(String::new, |e| e.path.clone());
                    let message = errors
                        .iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(field_err(field, message));
                }
            }
            Ok(())
        }
        (_, membrane_policy::egress::model::KIND) => {
            let policy = membrane_policy::egress::check_egress_value(Value::Object(map)).map_err(
                |errors| {
                    let field = errors.first().map_or_else(String::new, |e| e.path.clone());
                    let message = errors
                        .iter()
                        .map(|e| e.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ");
                    field_err(field, message)
                },
            )?;
            out.push(Object::Egress(policy));
            Ok(())
        }
        (v, crate::federation::spec::KIND) if v.starts_with(crate::federation::spec::GROUP) => {
            let federation = crate::federation::spec::parse(Value::Object(map))
                .map_err(|(f, m)| field_err(f, m))?;
            out.push(Object::Federation(Box::new(federation)));
            Ok(())
        }
        (_, "Namespace" | "Pod" | "ServiceAccount" | "Service") => Err(field_err(
            "apiVersion".into(),
            format!("{kind} must have apiVersion v1, not {api_version}"),
        )),
        // Other kinds (policies, services, …) are read by their own readers.
        _ => Ok(()),
    }
}

fn typed<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = match e.path().to_string() {
            root if root == "." => "(top level)".to_owned(),
            path => path,
        };
        (field, e.into_inner().to_string())
    })
}

type FieldResult<T> = Result<T, (String, String)>;

fn check_name(field: &str, name: &str, subdomain: bool) -> FieldResult<()> {
    let result = if subdomain {
        membrane_identity::spiffe_id::validate_service_account(name)
    } else {
        membrane_identity::spiffe_id::validate_namespace(name)
    };
    result.map_err(|e| (field.to_owned(), e.to_string()))
}

fn namespace_from(doc: NamespaceDoc) -> FieldResult<Namespace> {
    check_name("metadata.name", &doc.metadata.name, false)?;
    if let Some(value) = doc
        .metadata
        .annotations
        .get(crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION)
    {
        crate::source::parse_plaintext_udp_ports(value).map_err(|e| {
            (
                format!(
                    "metadata.annotations[\"{}\"]",
                    crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION
                ),
                e.to_string(),
            )
        })?;
    }
    Ok(Namespace {
        name: doc.metadata.name,
        labels: doc.metadata.labels,
        annotations: doc.metadata.annotations,
    })
}

fn service_account_from(doc: ServiceAccountDoc) -> FieldResult<ServiceAccount> {
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
    check_name("metadata.namespace", &namespace, false)?;
    check_name("metadata.name", &doc.metadata.name, true)?;
    Ok(ServiceAccount {
        namespace,
        name: doc.metadata.name,
    })
}

fn service_from(doc: ServiceDoc) -> FieldResult<DirService> {
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
    check_name("metadata.namespace", &namespace, false)?;
    check_name("metadata.name", &doc.metadata.name, false)?;
    let mut vips = Vec::new();
    let listed = doc.spec.cluster_ips.into_iter().enumerate();
    let first = doc.spec.cluster_ip.map(|ip| (usize::MAX, ip));
    for (i, ip) in first.into_iter().chain(listed) {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let field = if i == usize::MAX {
            "spec.clusterIP".to_owned()
        } else {
            format!("spec.clusterIPs[{i}]")
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| (field, format!("{ip:?} is not an IP address")))?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in doc.spec.ports.into_iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        if p.port == 0 {
            return Err((field("port"), "port must be 1-65535".into()));
        }
        // Kubernetes' rule, which a federated peer also applies to exports.
        crate::source::check_port_name(&p.name).map_err(|e| (field("name"), e.to_string()))?;
        if let Some(proto) = &p.protocol
            && proto != "TCP"
        {
            // UDP and SCTP are not carried by the mesh; keep the Service, skip the port.
            tracing::debug!(service = %doc.metadata.name, protocol = %proto, "non-TCP service port ignored");
            continue;
        }
        let target = match p.target_port {
            None => TargetPort::Number(p.port),
            Some(IntOrString::Int(0)) => {
                return Err((field("targetPort"), "port must be 1-65535".into()));
            }
            Some(IntOrString::Int(n)) => TargetPort::Number(n),
            Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ if !s.is_empty() && s.len() <= 15 => TargetPort::Name(s),
                _ => {
                    return Err((
                        field("targetPort"),
                        format!("{s:?} is not a port or a port name"),
                    ));
                }
            },
        };
        let target_port = match &target {
            TargetPort::Number(n) => *n,
            TargetPort::Name(_) => 0,
        };
        ports.push((
            ServicePort {
                name: p.name,
                port: p.port,
                target_port,
            },
            target,
        ));
    }
    let exported = doc
        .metadata
        .labels
        .get(crate::source::EXPORT_LABEL)
        .is_some_and(|v| v == "true");
    Ok(DirService {
        exported,
        namespace,
        name: doc.metadata.name,
        vips,
        ports,
        selector: doc.spec.selector.filter(|s| !s.is_empty()),
    })
}

fn policy_from(value: Value) -> FieldResult<PolicyEntry> {
    match membrane_policy::check_value(value) {
        Ok(checked) => Ok(PolicyEntry {
            policy: checked.policy,
            warnings: checked.warnings,
        }),
        Err(errors) => {
            let first = errors.first();
            let field = first.map_or_else(String::new, |e| e.path.clone());
            let message = errors
                .iter()
                .map(|e| e.problem.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Err((field, message))
        }
    }
}

/// Resolves a Service's endpoints from the pods its selector matches.
pub(super) fn resolve_service(
    svc: &DirService,
    state: &ClusterState,
) -> crate::source::model::Service {
    let mut endpoints = Vec::new();
    if let Some(selector) = &svc.selector {
        for pod in state.pods.values() {
            let selected = pod.namespace == svc.namespace
                && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
            if !selected {
                continue;
            }
            let mut ports = BTreeMap::new();
            for (port, target) in &svc.ports {
                if let TargetPort::Name(name) = target
                    && let Some(n) = pod.named_ports.get(name)
                {
                    ports.insert(port.name.clone(), *n);
                }
            }
            for ip in &pod.ips {
                endpoints.push(Endpoint {
                    ip: *ip,
                    pod: Some(pod.name.clone()),
                    ready: pod.phase == PodPhase::Running,
                    ports: ports.clone(),
                });
            }
        }
    }
    crate::source::model::Service {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vips: svc.vips.clone(),
        ports: svc.ports.iter().map(|(p, _)| p.clone()).collect(),
        endpoints,
        exported: svc.exported,
    }
}

fn pod_from(doc: PodDoc) -> FieldResult<Pod> {
    let meta = doc.metadata;
    let namespace = meta.namespace.unwrap_or_else(|| "default".into());
    check_name("metadata.namespace", &namespace, false)?;
    check_name("metadata.name", &meta.name, true)?;
    let service_account = doc
        .spec
        .service_account_name
        .or(doc.spec.service_account)
        .unwrap_or_else(|| "default".into());
    check_name("spec.serviceAccountName", &service_account, true)?;
    if let Some(node) = &doc.spec.node_name {
        check_name("spec.nodeName", node, true)?;
    }
    let mut ips = Vec::new();
    let listed = doc.status.pod_ips.into_iter().map(|p| p.ip);
    for (i, ip) in doc.status.pod_ip.into_iter().chain(listed).enumerate() {
        let field = if i == 0 {
            "status.podIP".to_owned()
        } else {
            format!("status.podIPs[{}]", i - 1)
        };
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| (field, format!("{ip:?} is not an IP address")))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut named_ports = BTreeMap::new();
    for (c, container) in doc.spec.containers.iter().enumerate() {
        for (i, port) in container.ports.iter().enumerate() {
            if port.container_port == 0 {
                return Err((
                    format!("spec.containers[{c}].ports[{i}].containerPort"),
                    "port must be 1-65535".into(),
                ));
            }
            if let Some(name) = &port.name {
                named_ports.insert(name.clone(), port.container_port);
            }
        }
    }
    let phase = match doc.status.phase.as_deref() {
        None => PodPhase::Running,
        Some(name) => match PodPhase::parse(name) {
            PodPhase::Unrecognized => {
                return Err((
                    "status.phase".into(),
                    format!(
                        "{name:?} is not a pod phase (one of {})",
                        PodPhase::NAMES.join(", ")
                    ),
                ));
            }
            phase => phase,
        },
    };
    Ok(Pod {
        named_ports,
        uid: meta
            .uid
            .unwrap_or_else(|| format!("{namespace}/{}", meta.name)),
        namespace,
        name: meta.name,
        service_account,
        node_name: doc.spec.node_name,
        ips,
        labels: meta.labels,
        phase,
    })
}
