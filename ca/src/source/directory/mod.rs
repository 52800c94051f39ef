//! The directory source: Kubernetes-style YAML manifests in a directory, reloaded on change.
//!
//! Every `*.yaml` / `*.yml` file below the directory is read (hidden files and directories are
//! skipped); a file may hold several documents, and `kind: List` is unpacked. `Namespace`,
//! `Pod`, `ServiceAccount`, `Service` and `AuthorizationPolicy` (Membrane's and Istio's API
//! groups) are understood; other kinds are ignored. A Service's endpoints are the pods its
//! selector matches (there is no endpoints controller without Kubernetes).
//!
//! A file is applied whole or not at all: when an edit breaks it, the error names the file,
//! the document and the field, and the *last good* version of that file stays in force. A
//! deleted file removes its objects. Changes are found by polling (file size, mtime, inode,
//! then a content hash), which works on every filesystem, including bind mounts and
//! ConfigMap volumes where inotify is unreliable.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::model::{
    ClusterState, Endpoint, Namespace, Pod, PodPhase, PolicyEntry, ServiceAccount, ServicePort,
};
use crate::metrics::SourceMetrics;

/// Files larger than this are refused (a manifest directory is not a data store).
pub const MAX_FILE_LEN: u64 = 8 * 1024 * 1024;

/// Why a file (or the directory) could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The directory or a file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error, as text.
        message: String,
    },
    /// A file is larger than [`MAX_FILE_LEN`].
    #[error("{path}: file is {len} bytes; the limit is {MAX_FILE_LEN}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A document in a file is not acceptable.
    #[error("{path}: {error}")]
    Document {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        error: Box<DocumentError>,
    },
}

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
        .get(super::PLAINTEXT_UDP_PORTS_ANNOTATION)
    {
        super::parse_plaintext_udp_ports(value).map_err(|e| {
            (
                format!(
                    "metadata.annotations[\"{}\"]",
                    super::PLAINTEXT_UDP_PORTS_ANNOTATION
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
    Ok(DirService {
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
fn resolve_service(svc: &DirService, state: &ClusterState) -> super::model::Service {
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
    super::model::Service {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vips: svc.vips.clone(),
        ports: svc.ports.iter().map(|(p, _)| p.clone()).collect(),
        endpoints,
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
        phase: doc
            .status
            .phase
            .as_deref()
            .map_or(PodPhase::Running, PodPhase::parse),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: i128,
    inode: u64,
}

#[derive(Debug)]
struct FileEntry {
    stamp: Stamp,
    hash: u64,
    /// The last version of the file that parsed; kept while a newer version is broken.
    objects: Vec<Object>,
    error: Option<SourceError>,
}

/// A manifest directory and the last good contents of each of its files.
#[derive(Debug)]
pub struct DirectorySource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
}

fn list_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let ty = entry.file_type()?;
        if ty.is_dir() {
            list_manifests(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

// === impl DirectorySource ===

impl DirectorySource {
    /// A source over `dir`; nothing is read until [`rescan`](Self::rescan).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads what changed. Returns whether the merged state may have changed. A directory
    /// that cannot be listed is an error and changes nothing.
    pub fn rescan(&mut self) -> Result<bool, SourceError> {
        let mut paths = Vec::new();
        list_manifests(&self.dir, &mut paths).map_err(|e| SourceError::Io {
            path: self.dir.clone(),
            message: e.to_string(),
        })?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        changed |= self.files.len() != before;
        let fresh_window = SystemTime::now() - Duration::from_secs(2);
        for path in paths {
            changed |= self.refresh(&path, fresh_window);
        }
        Ok(changed)
    }

    fn refresh(&mut self, path: &Path, fresh_window: SystemTime) -> bool {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            // Raced with a delete: the next scan drops it.
            Err(_) => return false,
        };
        let stamp = Stamp {
            len: meta.len(),
            mtime: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        };
        // A file modified in the last moments may change again within the same mtime tick:
        // re-read it by content until it settles.
        let recent = meta.modified().map_or(true, |m| m > fresh_window);
        if let Some(entry) = self.files.get(path)
            && entry.stamp == stamp
            && !recent
        {
            return false;
        }
        let result = if stamp.len > MAX_FILE_LEN {
            Err(SourceError::TooLarge {
                path: path.to_owned(),
                len: stamp.len,
            })
        } else {
            std::fs::read(path).map_err(|e| SourceError::Io {
                path: path.to_owned(),
                message: e.to_string(),
            })
        };
        let (bytes, h) = match result {
            Ok(bytes) => {
                let h = hash(&bytes);
                (Some(bytes), h)
            }
            Err(e) => return self.record_error(path, stamp, 0, e),
        };
        if let Some(entry) = self.files.get_mut(path)
            && entry.hash == h
        {
            entry.stamp = stamp;
            return false;
        }
        let text = String::from_utf8(bytes.unwrap_or_default());
        let parsed = match text {
            Ok(text) => parse_manifests(&text).map_err(|error| SourceError::Document {
                path: path.to_owned(),
                error: Box::new(error),
            }),
            Err(_) => Err(SourceError::Io {
                path: path.to_owned(),
                message: "file is not UTF-8".into(),
            }),
        };
        match parsed {
            Ok(objects) => {
                if let Some(old) = self.files.get(path)
                    && old.error.is_some()
                {
                    tracing::info!(file = %path.display(), "manifest file is valid again");
                }
                self.files.insert(
                    path.to_owned(),
                    FileEntry {
                        stamp,
                        hash: h,
                        objects,
                        error: None,
                    },
                );
                true
            }
            Err(e) => self.record_error(path, stamp, h, e),
        }
    }

    fn record_error(&mut self, path: &Path, stamp: Stamp, h: u64, error: SourceError) -> bool {
        tracing::warn!(file = %path.display(), error = %error, "manifest file rejected; keeping its last good version");
        let entry = self.files.entry(path.to_owned()).or_insert(FileEntry {
            stamp,
            hash: h,
            objects: Vec::new(),
            error: None,
        });
        entry.stamp = stamp;
        entry.hash = h;
        entry.error = Some(error);
        false
    }

    /// Files whose newest version is rejected, with the reason.
    pub fn errors(&self) -> Vec<SourceError> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }

    /// The merged state of every file's last good version. When two files define the same
    /// object, the one whose path sorts first wins and the conflict is logged.
    pub fn state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        let mut services: BTreeMap<(String, String), &DirService> = BTreeMap::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                let duplicate = match object {
                    Object::Namespace(ns) => {
                        let dup = state.namespaces.contains_key(&ns.name);
                        state
                            .namespaces
                            .entry(ns.name.clone())
                            .or_insert_with(|| ns.clone());
                        dup.then(|| format!("Namespace {}", ns.name))
                    }
                    Object::Pod(pod) => {
                        let key = (pod.namespace.clone(), pod.name.clone());
                        let dup = state.pods.contains_key(&key);
                        state.pods.entry(key).or_insert_with(|| pod.clone());
                        dup.then(|| format!("Pod {}/{}", pod.namespace, pod.name))
                    }
                    Object::ServiceAccount(sa) => {
                        let key = (sa.namespace.clone(), sa.name.clone());
                        let dup = state.service_accounts.contains_key(&key);
                        state
                            .service_accounts
                            .entry(key)
                            .or_insert_with(|| sa.clone());
                        dup.then(|| format!("ServiceAccount {}/{}", sa.namespace, sa.name))
                    }
                    Object::Service(svc) => {
                        let key = (svc.namespace.clone(), svc.name.clone());
                        let dup = services.contains_key(&key);
                        services.entry(key).or_insert(svc);
                        dup.then(|| format!("Service {}/{}", svc.namespace, svc.name))
                    }
                    Object::Policy(entry) => {
                        let p = &entry.policy;
                        let key = (p.namespace().to_owned(), p.name().to_owned());
                        let dup = state.policies.contains_key(&key);
                        state.policies.entry(key).or_insert_with(|| entry.clone());
                        dup.then(|| format!("AuthorizationPolicy {}/{}", p.namespace(), p.name()))
                    }
                };
                if let Some(object) = duplicate {
                    tracing::warn!(file = %path.display(), object, "object defined twice; the first definition wins");
                }
            }
        }
        let resolved: Vec<_> = services
            .into_iter()
            .map(|(key, svc)| (key, resolve_service(svc, &state)))
            .collect();
        state.services.extend(resolved);
        state
    }
}

/// Loads `dir` once, then rescans it every `interval` until `cancel` fires, publishing each
/// changed state on `tx`. The first publication happens even if some files are broken (their
/// objects are simply absent); an unreadable directory is retried.
pub async fn run(
    mut source: DirectorySource,
    interval: Duration,
    tx: watch::Sender<Option<Arc<ClusterState>>>,
    metrics: SourceMetrics,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match source.rescan() {
            Ok(changed) => {
                let errors = source.errors();
                metrics
                    .file_errors
                    .set(i64::try_from(errors.len()).unwrap_or(i64::MAX));
                if changed || tx.borrow().is_none() {
                    let state = source.state();
                    let new = Some(Arc::new(state));
                    let published = tx.send_if_modified(|current| {
                        if current.as_deref() == new.as_deref() {
                            return false;
                        }
                        *current = new.clone();
                        true
                    });
                    if published {
                        metrics.reloads.inc();
                        if let Some(state) = &new {
                            tracing::info!(
                                dir = %source.dir.display(),
                                namespaces = state.namespaces.len(),
                                pods = state.pods.len(),
                                services = state.services.len(),
                                policies = state.policies.len(),
                                broken_files = errors.len(),
                                "workload source loaded"
                            );
                        }
                    }
                }
            }
            Err(e) => {
                metrics.scan_failures.inc();
                tracing::warn!(error = %e, "cannot scan the manifest directory; keeping the last state");
            }
        }
    }
}

#[cfg(test)]
mod tests;
