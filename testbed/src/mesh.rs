//! A whole mesh on one host: nodes and pods as network namespaces ([`crate::netns`]), the
//! real controller ([`crate::TestCa`]) and one real `ztunnel` process per node.
//!
//! The ztunnel processes run in the host's network namespace, like a node agent next to the
//! kubelet: they reach the controller on loopback and enter each pod's namespace for the data
//! plane. Pod traffic between nodes crosses the simulated fabric. Everything is removed when
//! the [`Mesh`] is dropped (processes first, then namespaces and directories).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::TestCa;
use crate::netns::{Pod, PodSpec, Testbed};

mod manifests;
mod ztunnel;

pub use ztunnel::{Ztunnel, ztunnel_binary};

/// One pod of a [`MeshSpec`].
#[derive(Debug, Clone)]
pub struct PodDef {
    /// Pod name (also the testbed pod name unless [`PodDef::netns`] is set).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node.
    pub node: String,
    /// Labels (`app: <name>` unless set).
    pub labels: BTreeMap<String, String>,
    /// Network namespace name (default `<testbed prefix>-<name>`); when set it is also the
    /// key that [`Mesh`]'s methods take for this pod.
    pub netns: Option<String>,
    /// The pod's IP (default: the lowest free one of its node's range).
    pub ip: Option<std::net::Ipv4Addr>,
    /// A gateway pod's kind (`egress`, `ingress`): its node's ztunnel runs in gateway mode
    /// for it (see [`PodDef::gateway`]).
    pub gateway: Option<String>,
}

impl PodDef {
    /// A pod `name` in `namespace` with service account `sa` on `node`.
    pub fn new(name: &str, namespace: &str, sa: &str, node: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            node: node.into(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            netns: None,
            ip: None,
            gateway: None,
        }
    }

    /// Gateway pod `name` of gateway `gateway` (`kind` `egress` or `ingress`) in `namespace`
    /// with service account `sa`, alone on `node`: that node's ztunnel serves it in gateway
    /// mode instead of capturing pods.
    pub fn gateway(
        name: &str,
        namespace: &str,
        sa: &str,
        node: &str,
        kind: &str,
        gateway: &str,
    ) -> Self {
        let mut def = Self::new(name, namespace, sa, node);
        def.labels
            .insert("membrane.dev/gateway".to_owned(), kind.to_owned());
        def.labels.insert(
            "gateway.networking.k8s.io/gateway-name".to_owned(),
            gateway.to_owned(),
        );
        def.gateway = Some(kind.to_owned());
        def
    }

    /// The key [`Mesh`]'s methods take: the namespace name when set, otherwise the name.
    pub fn key(&self) -> &str {
        self.netns.as_deref().unwrap_or(&self.name)
    }
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct MeshSpec {
    /// Node names.
    pub nodes: Vec<String>,
    /// Pods.
    pub pods: Vec<PodDef>,
    /// Kubernetes namespaces in the mesh (labelled `membrane.dev/mesh=enabled`); pods of other
    /// namespaces are plain, non-mesh workloads. Pods on another cluster's nodes follow that
    /// cluster's list instead ([`NodeController::mesh_namespaces`], [`MeshSpec::in_mesh`]).
    pub mesh_namespaces: Vec<String>,
    /// Namespaces of another data plane's pods that speak HBONE themselves (labelled
    /// `membrane.dev/mesh=hbone-peer`): mesh pods tunnel to them; nothing enrolls them.
    pub hbone_peer_namespaces: Vec<String>,
    /// Namespaces annotated `membrane.dev/plaintext: permit`.
    pub plaintext_permit: Vec<String>,
    /// AuthorizationPolicy documents every ztunnel enforces (written to `policies.yaml` in
    /// the controller's manifest directory; change them with [`Mesh::set_policies`]).
    pub policies: String,
    /// Workload certificate lifetime: the ztunnels ask for it and the controller's default and
    /// maximum are set to it (`None`: the controller's defaults, 24 h).
    pub cert_ttl: Option<Duration>,
    /// More manifest files (name, content) for the controller's directory (Services,
    /// policies, …); change them later with [`Mesh::write_manifest`].
    pub extra_manifests: Vec<(String, String)>,
    /// Also append every access record (JSON line) of every ztunnel to this file.
    pub access_log: Option<PathBuf>,
    /// Run the ztunnels in local mode (workloads and policy from files) instead of from the
    /// controller's discovery stream.
    pub local_files: bool,
    /// Caps and timeouts of the controller's listeners.
    pub ca_listeners: membrane_ca::serving::ListenerConfig,
    /// Arguments added to every ztunnel's command line (before a restart's own).
    pub ztunnel_args: Vec<String>,
    /// The controller's `--root-namespace` (`None`: its default, `membrane-system`).
    pub root_namespace: Option<String>,
    /// A controller the caller runs (e.g. against a real Kubernetes API server): the ztunnels
    /// talk to it and no in-process controller starts ([`Mesh::ca`] is then absent).
    pub external_controller: Option<ExternalController>,
    /// The in-process controller signs with this operator-supplied CA (a plug-in directory:
    /// `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`) instead of its own root.
    pub plugin_ca: Option<PathBuf>,
    /// The in-process controller's trust domain, and its ztunnels' (`None`: `cluster.local`).
    pub trust_domain: Option<String>,
    /// The in-process controller serves its SPIFFE bundle endpoint with this refresh hint.
    pub bundle_endpoint: Option<Duration>,
    /// The in-process controller serves its exported Services (federation listener).
    pub exports: bool,
    /// Nodes of another cluster on the same fabric (flat pod networks): their ztunnels talk
    /// to that cluster's controller, and their pods are left out of the in-process
    /// controller's manifests (the caller writes them into the other controller's).
    pub node_controllers: BTreeMap<String, NodeController>,
}

/// The controller of a node that belongs to another cluster.
#[derive(Debug, Clone)]
pub struct NodeController {
    /// `https://host:port` of its gRPC listener.
    pub endpoint: String,
    /// Its root certificate (PEM).
    pub root_pem: String,
    /// The node's token for it.
    pub token: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// The namespaces in that cluster's mesh (a namespace of the same name in another
    /// cluster is that cluster's business).
    pub mesh_namespaces: Vec<String>,
}

/// A controller outside the mesh harness: where it listens, its root and each node's token.
#[derive(Debug, Clone, Default)]
pub struct ExternalController {
    /// `https://host:port` of its gRPC listener.
    pub endpoint: String,
    /// Its root certificate (PEM).
    pub root_pem: String,
    /// Each node's ztunnel token (node name → token).
    pub tokens: BTreeMap<String, String>,
}

/// An unconnected IPv4 TCP socket created inside the network namespace at `path`, as an
/// application there would create it (no ztunnel mark: it is captured).
pub fn socket_in_netns(path: PathBuf) -> anyhow::Result<tokio::net::TcpSocket> {
    socket_in_netns_for(path, false)
}

/// As [`socket_in_netns`], IPv6 when `v6`.
pub fn socket_in_netns_for(path: PathBuf, v6: bool) -> anyhow::Result<tokio::net::TcpSocket> {
    let domain = if v6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let stream = crate::netns::run_in_netns(path, move || {
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(std::net::TcpStream::from(s))
    })??;
    Ok(tokio::net::TcpSocket::from_std_stream(stream))
}

impl MeshSpec {
    /// Whether `pod`'s namespace is in the mesh of its node's cluster (another cluster's
    /// per [`MeshSpec::node_controllers`], else this one's).
    pub fn in_mesh(&self, pod: &PodDef) -> bool {
        let namespaces = match self.node_controllers.get(&pod.node) {
            Some(other) => &other.mesh_namespaces,
            None => &self.mesh_namespaces,
        };
        namespaces.contains(&pod.namespace)
    }

    /// Two nodes, `node-a` and `node-b`, running `pods`, with `mesh_namespaces` in the mesh;
    /// everything else default.
    pub fn two_nodes(pods: Vec<PodDef>, mesh_namespaces: &[&str]) -> Self {
        Self {
            nodes: vec!["node-a".into(), "node-b".into()],
            pods,
            mesh_namespaces: mesh_namespaces.iter().map(|n| (*n).to_owned()).collect(),
            ..Self::default()
        }
    }
}

/// A mesh on one host.
pub struct Mesh {
    /// Per-node ztunnels, by node name (dropped first: processes before namespaces).
    pub ztunnels: BTreeMap<String, Ztunnel>,
    /// The in-process controller (`None` with [`MeshSpec::external_controller`]).
    ca: Option<TestCa>,
    /// Nodes and pods.
    pub testbed: Testbed,
    /// Working directory: manifests, tokens, workloads file, sockets.
    pub dir: tempfile::TempDir,
    spec: MeshSpec,
}

fn uid(def: &PodDef) -> String {
    format!("{}-{}", def.namespace, def.name)
}

impl Mesh {
    /// Builds the namespaces, starts the controller and one ztunnel per node (not yet
    /// enrolling anything: see [`Mesh::enroll`]). `cert_ttl` is the workload SVID lifetime the
    /// ztunnels request.
    pub async fn start(spec: MeshSpec) -> anyhow::Result<Self> {
        Self::start_on(Testbed::new()?, spec).await
    }

    /// As [`Mesh::start`], on a testbed the caller created (for example with a chosen
    /// prefix, as `membrane local` does).
    pub async fn start_on(mut testbed: Testbed, spec: MeshSpec) -> anyhow::Result<Self> {
        for node in &spec.nodes {
            testbed.add_node(node)?;
        }
        for def in &spec.pods {
            let mut pod = PodSpec::new(def.node.clone(), def.key().to_owned());
            if let Some(netns) = &def.netns {
                pod = pod.netns_name(netns.clone());
            }
            if let Some(ip) = def.ip {
                pod = pod.ip(ip);
            }
            testbed
                .add_pod_with(pod)
                .with_context(|| format!("pod {}/{}", def.namespace, def.name))?;
        }
        let dir = tempfile::tempdir()?;
        let (manifests, workloads) = Self::documents(&spec, &testbed)?;
        let mut files = vec![
            ("mesh.yaml", manifests.as_str()),
            ("policies.yaml", spec.policies.as_str()),
        ];
        for (name, content) in &spec.extra_manifests {
            files.push((name.as_str(), content.as_str()));
        }
        let (ca, root_pem) = match &spec.external_controller {
            Some(external) => (None, external.root_pem.clone()),
            None => {
                let mut ca = TestCa::builder()
                    .nodes(&spec.nodes)
                    .listeners(spec.ca_listeners);
                for (name, content) in files {
                    ca = ca.manifest(name, content);
                }
                if let Some(ttl) = spec.cert_ttl {
                    ca = ca.cert_ttl(ttl);
                }
                if let Some(ns) = &spec.root_namespace {
                    ca = ca.root_namespace(ns);
                }
                if let Some(dir) = &spec.plugin_ca {
                    ca = ca.plugin_ca(dir.clone());
                }
                if let Some(td) = &spec.trust_domain {
                    ca = ca.trust_domain(td);
                }
                if let Some(hint) = spec.bundle_endpoint {
                    ca = ca.bundle_endpoint(hint);
                }
                if spec.exports {
                    ca = ca.exports();
                }
                let ca = ca.start().await?;
                let root_pem = ca.root_pem();
                (Some(ca), root_pem)
            }
        };
        let workloads_file = dir.path().join("workloads.yaml");
        std::fs::write(&workloads_file, workloads)?;
        std::fs::write(dir.path().join("policies.yaml"), &spec.policies)?;
        let root = dir.path().join("root.pem");
        std::fs::write(&root, root_pem)?;
        for (node, other) in &spec.node_controllers {
            std::fs::write(dir.path().join(format!("{node}-root.pem")), &other.root_pem)?;
        }
        let mut mesh = Self {
            ztunnels: BTreeMap::new(),
            ca,
            testbed,
            dir,
            spec,
        };
        for node in mesh.spec.nodes.clone() {
            let z = mesh.spawn_ztunnel(&node, &[])?;
            mesh.ztunnels.insert(node, z);
        }
        Ok(mesh)
    }

    /// Replaces the policy documents every ztunnel enforces (atomically: write, then rename):
    /// in the controller's manifest directory, or, in local mode, the ztunnels' policy file.
    pub fn set_policies(&self, text: &str) -> anyhow::Result<()> {
        if !self.spec.local_files {
            return self.ca().write_manifest("policies.yaml", text);
        }
        let tmp = self.dir.path().join(".policies.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.path().join("policies.yaml"))?;
        Ok(())
    }

    /// Writes manifest file `name` in the controller's directory (atomically).
    pub fn write_manifest(&self, name: &str, content: &str) -> anyhow::Result<()> {
        self.ca().write_manifest(name, content)
    }

    /// The in-process controller. Panics for a mesh built with
    /// [`MeshSpec::external_controller`] (a test bug, not a runtime condition).
    pub fn ca(&self) -> &TestCa {
        self.ca
            .as_ref()
            .expect("this mesh runs an external controller")
    }

    /// As [`Mesh::ca`], mutable (pause, resume).
    pub fn ca_mut(&mut self) -> &mut TestCa {
        self.ca
            .as_mut()
            .expect("this mesh runs an external controller")
    }

    /// The pod definitions.
    pub fn pods(&self) -> &[PodDef] {
        &self.spec.pods
    }

    /// What the mesh was built from.
    pub fn spec(&self) -> &MeshSpec {
        &self.spec
    }

    /// Node `node`'s ztunnel admin config dump.
    pub async fn config_dump(&self, node: &str) -> anyhow::Result<serde_json::Value> {
        let z = self.ztunnels.get(node).context("no such node")?;
        let (status, body) = crate::http_get(z.admin, "/config_dump").await?;
        anyhow::ensure!(status == 200, "config dump: HTTP {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// An unconnected socket inside pod `name` (see [`socket_in_netns`]).
    pub fn socket_in(&self, name: &str) -> anyhow::Result<tokio::net::TcpSocket> {
        socket_in_netns(self.netns_path(name))
    }

    /// Connects from inside pod `name` to `dst`, as its application would (10 s bound).
    pub async fn connect_from(
        &self,
        name: &str,
        dst: SocketAddr,
    ) -> anyhow::Result<tokio::net::TcpStream> {
        let socket = socket_in_netns_for(self.netns_path(name), dst.is_ipv6())?;
        Ok(tokio::time::timeout(Duration::from_secs(10), socket.connect(dst)).await??)
    }

    /// Starts an echo application on `port` in pod `name`; the counter tells how many
    /// connections it accepted (so a test can prove nothing reached it).
    pub fn echo_app(
        &self,
        name: &str,
        port: u16,
    ) -> anyhow::Result<Arc<std::sync::atomic::AtomicUsize>> {
        self.echo_app_marked(name, port, None)
    }

    /// [`Mesh::echo_app`] whose listening socket carries `mark` (`SO_MARK`), as an
    /// application with `CAP_NET_RAW` could set.
    pub fn echo_app_marked(
        &self,
        name: &str,
        port: u16,
        mark: Option<u32>,
    ) -> anyhow::Result<Arc<std::sync::atomic::AtomicUsize>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = crate::netns::run_in_netns(self.netns_path(name), move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if let Some(mark) = mark {
                s.set_mark(mark)?;
            }
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s.listen(4096)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
        })??;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(accepted)
    }

    /// The testbed pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.testbed.pod(name).expect("pod in the mesh spec")
    }

    /// The pod's definition.
    pub fn def(&self, name: &str) -> &PodDef {
        self.spec
            .pods
            .iter()
            .find(|p| p.key() == name)
            .expect("pod in the mesh spec")
    }

    /// The pod's IP.
    pub fn ip(&self, name: &str) -> IpAddr {
        IpAddr::V4(self.pod(name).ip())
    }

    /// Pod `name`'s IPv6 address.
    pub fn ip6(&self, name: &str) -> IpAddr {
        IpAddr::V6(self.pod(name).ip6())
    }

    /// The pod's SPIFFE ID.
    pub fn spiffe_id(&self, name: &str) -> String {
        let d = self.def(name);
        let td = match self.spec.node_controllers.get(&d.node) {
            Some(other) => other.trust_domain.as_str(),
            None => self.spec.trust_domain.as_deref().unwrap_or("cluster.local"),
        };
        format!("spiffe://{td}/ns/{}/sa/{}", d.namespace, d.service_account)
    }

    /// Sends an enrollment request to the ztunnel of the pod's node.
    pub async fn enroll_request(
        &self,
        node: &str,
        request: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let z = self.ztunnels.get(node).context("no such node")?;
        let stream = tokio::net::UnixStream::connect(&z.enroll_socket).await?;
        let (read, mut write) = stream.into_split();
        write.write_all(format!("{request}\n").as_bytes()).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(read).read_line(&mut line).await?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Enrolls pod `name` with its node's ztunnel.
    pub async fn enroll(&self, name: &str) -> anyhow::Result<()> {
        self.enroll_as(name, &uid(self.def(name))).await
    }

    /// Enrolls pod `name` under the Pod UID `pod_uid` (the one an API server assigned), as
    /// the CNI plugin would.
    pub async fn enroll_as(&self, name: &str, pod_uid: &str) -> anyhow::Result<()> {
        let def = self.def(name);
        let request = serde_json::json!({
            "op": "add", "uid": pod_uid, "netns": self.pod(name).netns_path(),
        });
        let reply = self.enroll_request(&def.node, &request).await?;
        if reply["ok"] != true {
            bail!("enrolling {name} failed: {reply}");
        }
        Ok(())
    }

    /// Removes pod `name` from its node's ztunnel.
    pub async fn unenroll(&self, name: &str) -> anyhow::Result<()> {
        let def = self.def(name);
        let request = serde_json::json!({"op": "remove", "uid": uid(def)});
        let reply = self.enroll_request(&def.node, &request).await?;
        if reply["ok"] != true {
            bail!("removing {name} failed: {reply}");
        }
        Ok(())
    }

    /// The path of a pod's network namespace.
    pub fn netns_path(&self, name: &str) -> PathBuf {
        self.pod(name).netns_path()
    }

    /// Directory of the mesh's files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Sends `ping` and expects it echoed within 5 s; any failure (reset, close, timeout) is an
/// error.
pub async fn ping(s: &mut tokio::net::TcpStream) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    anyhow::ensure!(&buf == b"ping", "bad echo");
    Ok(())
}
