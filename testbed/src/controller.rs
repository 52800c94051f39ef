//! The controller a testbed runs: the real `membrane_ca::app` on a loopback port with its own
//! temporary state, manifest directory and token file ([`TestCa`]), configured through one
//! builder ([`TestCaBuilder`]), so callers talk to it over real TLS and gRPC.
//!
//! Must not: create namespaces or processes (that is [`crate::netns`] and [`crate::mesh`]), or
//! keep anything outside its temporary directory: dropping the directory removes everything
//! the controller wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use membrane_ca::SignerConfig;
use membrane_ca::app::{self, AppConfig, Running};
use membrane_ca::client::CaClient;
use membrane_ca::serving::ListenerConfig;

use crate::{NODE_A_TOKEN, NODE_B_TOKEN, identity, node_token, trust_domain};

/// A running controller with its own directories.
pub struct TestCa {
    /// Temporary root: `state/`, `manifests/`, `tokens`.
    pub dir: tempfile::TempDir,
    running: Option<Running>,
    paused: Option<(SocketAddr, SocketAddr)>,
    /// While paused: sockets bound (not listening) to its addresses, so no other test's
    /// listener takes a freed port before [`TestCa::resume`] binds it again.
    held: Vec<socket2::Socket>,
    signer: SignerConfig,
    listeners: ListenerConfig,
    rotation_ack_timeout: Duration,
    root_namespace: String,
    trust_domain: membrane_identity::TrustDomain,
    federation: membrane_ca::app::FederationConfig,
}

impl TestCa {
    /// Starts a controller whose manifest directory holds `manifests` in `mesh.yaml`, with the
    /// tokens of `node-a` and `node-b` ([`NODE_A_TOKEN`], [`NODE_B_TOKEN`]); shorthand for
    /// `TestCa::builder().manifest("mesh.yaml", manifests).start()`.
    pub async fn start(manifests: &str) -> anyhow::Result<Self> {
        Self::builder()
            .manifest("mesh.yaml", manifests)
            .start()
            .await
    }

    /// The one way to configure a controller before it starts: manifests, node tokens,
    /// certificate lifetimes, listener limits, rotation timeout, root namespace.
    pub fn builder() -> TestCaBuilder {
        TestCaBuilder::default()
    }

    /// Starts (or restarts) a controller over an existing harness directory.
    pub async fn start_in(dir: tempfile::TempDir, plugin: Option<PathBuf>) -> anyhow::Result<Self> {
        let config = Self::config(dir.path(), plugin);
        Self::run_config(dir, config).await
    }

    async fn run_config(dir: tempfile::TempDir, config: AppConfig) -> anyhow::Result<Self> {
        let (config_signer, listeners) = (config.signer, config.listeners);
        let rotation_ack_timeout = config.rotation_ack_timeout;
        let root_namespace = config.root_namespace.clone();
        let trust_domain = config.trust_domain.clone();
        let federation = config.federation;
        let running = app::start(config).await?;
        tokio::time::timeout(Duration::from_secs(10), running.ready()).await?;
        Ok(Self {
            dir,
            running: Some(running),
            paused: None,
            held: Vec::new(),
            signer: config_signer,
            listeners,
            rotation_ack_timeout,
            root_namespace,
            trust_domain,
            federation,
        })
    }

    fn config(dir: &Path, plugin_ca_dir: Option<PathBuf>) -> AppConfig {
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        AppConfig {
            trust_domain: trust_domain(),
            state_dir: dir.join("state"),
            plugin_ca_dir,
            root_ttl: Duration::from_secs(3600 * 24 * 365),
            source_dir: dir.join("manifests"),
            reload_interval: Duration::from_millis(50),
            tokens_file: dir.join("tokens"),
            listen: loopback,
            metrics_listen: loopback,
            server_names: Vec::new(),
            serving_cert_ttl: Duration::from_secs(3600),
            rotation_grace: Duration::from_millis(500),
            rotation_ack_timeout: Duration::from_secs(600),
            root_namespace: "membrane-system".to_owned(),
            pod_networks: Vec::new(),
            signer: SignerConfig::default(),
            listeners: Default::default(),
            federation: Default::default(),
        }
    }

    /// This controller's configuration again, over its directory (fresh loopback ports for
    /// its listeners).
    fn same_config(&self) -> AppConfig {
        let mut config = Self::config(self.dir.path(), None);
        config.signer = self.signer;
        config.listeners = self.listeners;
        config.rotation_ack_timeout = self.rotation_ack_timeout;
        config.root_namespace = self.root_namespace.clone();
        config.trust_domain = self.trust_domain.clone();
        config.federation = self.federation;
        config
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("controller running")
    }

    /// `https://127.0.0.1:<port>` (also while paused: the address it will resume on).
    pub fn endpoint(&self) -> String {
        match (&self.running, self.paused) {
            (None, Some((grpc, _))) => format!("https://{grpc}"),
            _ => format!("https://{}", self.running().grpc_addr()),
        }
    }

    /// The SPIFFE bundle endpoint's address, when it is served.
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.running().bundle_endpoint_addr()
    }

    /// The federation listener's address (service exports), when served.
    pub fn exports_addr(&self) -> Option<SocketAddr> {
        self.running().exports_addr()
    }

    /// The metrics/readiness address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.running().metrics_addr()
    }

    /// The trust bundle as PEM (what a node is bootstrapped with).
    pub fn root_pem(&self) -> String {
        self.running().current_bundle().to_pem()
    }

    /// Issues node-a's trainer an SVID (lifetime `ttl`) and returns which of `roots` (DER)
    /// its chain verifies against on its own.
    pub async fn trainer_signed_by(
        &self,
        roots: &[Vec<u8>],
        ttl: Duration,
    ) -> anyhow::Result<Vec<usize>> {
        use membrane_identity::svid::Usage;
        use rustls_pki_types::{CertificateDer, UnixTime};
        let mut client = self.client(&node_token("node-a")).await?;
        let (svid, _) = client
            .request_svid(&identity("training", "trainer"), ttl)
            .await?;
        let mut which = Vec::new();
        for (i, root) in roots.iter().enumerate() {
            let only = membrane_identity::TrustBundle::new(
                trust_domain(),
                [CertificateDer::from(root.clone())],
            )?;
            if only
                .verify_svid_chain(svid.chain(), UnixTime::now(), Usage::Client)
                .is_ok()
            {
                which.push(i);
            }
        }
        Ok(which)
    }

    /// A client authenticated with `token`.
    pub async fn client(&self, token: &str) -> anyhow::Result<CaClient> {
        Ok(CaClient::connect(
            &self.endpoint(),
            self.root_pem().as_bytes(),
            "membrane-ca",
            token,
        )
        .await?)
    }

    /// The roots (DER, sorted) a fresh discovery snapshot for `node` holds for federated
    /// trust domain `td` (empty: not federated).
    pub async fn federated_roots(&self, node: &str, td: &str) -> anyhow::Result<Vec<Vec<u8>>> {
        use membrane_proto::v1 as pb;
        let mut client = self.client(&node_token(node)).await?;
        let mut stream = client.watch(node).await?;
        let snapshot = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("{node}'s stream ended before its snapshot"))?;
        let mut roots = (snapshot.upserts.iter())
            .find_map(|r| match &r.kind {
                Some(pb::resource::Kind::FederatedBundle(b)) if b.trust_domain == td => {
                    Some(b.roots_der.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        roots.sort();
        Ok(roots)
    }

    /// Starts another controller replica over the same directory (same root, same manifests,
    /// same tokens) on fresh loopback ports; the caller shuts it down.
    pub async fn replica(&self) -> anyhow::Result<Running> {
        let config = self.same_config();
        let running = app::start(config).await?;
        tokio::time::timeout(Duration::from_secs(10), running.ready()).await?;
        Ok(running)
    }

    /// The manifest directory the controller reads (edit files here to change the cluster).
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes `content` to manifest file `name` atomically (write, then rename).
    pub fn write_manifest(&self, name: &str, content: &str) -> anyhow::Result<()> {
        let dir = self.manifests_dir();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    /// Replaces the bootstrap token file atomically (write, then rename): one
    /// `<node> <token>` per line.
    pub fn write_tokens(&self, content: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(".tokens.tmp");
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.dir.path().join("tokens"))?;
        Ok(())
    }

    /// Stops the controller (as if killed) but keeps its directory and addresses; see
    /// [`TestCa::resume`]. Returns the addresses it listened on.
    pub async fn pause(&mut self) -> Option<(SocketAddr, SocketAddr)> {
        let running = self.running.take()?;
        let addrs = (running.grpc_addr(), running.metrics_addr());
        running.shutdown().await;
        self.paused = Some(addrs);
        self.held = [addrs.0, addrs.1]
            .into_iter()
            .filter_map(|addr| hold(addr).ok())
            .collect();
        Some(addrs)
    }

    /// Starts a paused controller again on the same addresses, with the same root.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let (grpc, metrics) = self
            .paused
            .take()
            .ok_or_else(|| anyhow::anyhow!("controller not paused"))?;
        let mut config = self.same_config();
        config.listen = grpc;
        config.metrics_listen = metrics;
        // The old listener's port may linger a moment after shutdown.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let running = loop {
            match app::start(config.clone()).await {
                Ok(r) => break r,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.held.clear();
        tokio::time::timeout(Duration::from_secs(10), running.ready()).await?;
        self.running = Some(running);
        Ok(())
    }

    /// Stops the controller and hands back its directory (for a restart).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self.dir
    }

    /// Fetches `/metrics` as text over plain HTTP/1.1.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr()).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }
}

/// Configuration of a [`TestCa`] before it starts ([`TestCa::builder`]). Unset parts keep the
/// harness defaults: no manifests, the tokens of `node-a` and `node-b`, the controller's
/// default lifetimes and listener limits, a 10-minute rotation acknowledgement timeout and
/// the root namespace `membrane-system`.
#[derive(Default)]
#[must_use]
pub struct TestCaBuilder {
    files: Vec<(String, String)>,
    nodes: Option<Vec<String>>,
    signer: SignerConfig,
    listeners: Option<ListenerConfig>,
    rotation_ack_timeout: Option<Duration>,
    root_namespace: Option<String>,
    plugin_ca: Option<PathBuf>,
    trust_domain: Option<String>,
    bundle_endpoint: Option<Duration>,
    exports: bool,
}

impl TestCaBuilder {
    /// Adds `content` as `name` in the manifest directory.
    pub fn manifest(mut self, name: &str, content: &str) -> Self {
        self.files.push((name.to_owned(), content.to_owned()));
        self
    }

    /// A token for each of `nodes` ([`node_token`]) instead of the two fixed ones.
    pub fn nodes(mut self, nodes: &[String]) -> Self {
        self.nodes = Some(nodes.to_vec());
        self
    }

    /// The signer's configuration (kept across [`TestCa::pause`] and [`TestCa::resume`]).
    pub fn signer(mut self, signer: SignerConfig) -> Self {
        self.signer = signer;
        self
    }

    /// Workload certificates live exactly `ttl` (default and maximum lifetime).
    pub fn cert_ttl(mut self, ttl: Duration) -> Self {
        self.signer.default_ttl = ttl;
        self.signer.max_ttl = ttl;
        self
    }

    /// Listener caps and timeouts (kept across [`TestCa::pause`] and [`TestCa::resume`]).
    pub fn listeners(mut self, listeners: ListenerConfig) -> Self {
        self.listeners = Some(listeners);
        self
    }

    /// How long a root rotation waits for every node's acknowledgement.
    pub fn rotation_ack_timeout(mut self, timeout: Duration) -> Self {
        self.rotation_ack_timeout = Some(timeout);
        self
    }

    /// The namespace whose selector-less policies apply mesh-wide.
    pub fn root_namespace(mut self, namespace: &str) -> Self {
        self.root_namespace = Some(namespace.to_owned());
        self
    }

    /// Signs with the operator CA in `dir` (plug-in layout) instead of a generated root.
    pub fn plugin_ca(mut self, dir: PathBuf) -> Self {
        self.plugin_ca = Some(dir);
        self
    }

    /// Issues identities of `trust_domain` instead of `cluster.local`.
    pub fn trust_domain(mut self, trust_domain: &str) -> Self {
        self.trust_domain = Some(trust_domain.to_owned());
        self
    }

    /// Serves the federation listener (service exports) on a free loopback port.
    pub fn exports(mut self) -> Self {
        self.exports = true;
        self
    }

    /// Serves the SPIFFE bundle endpoint on a free loopback port with `refresh_hint`.
    pub fn bundle_endpoint(mut self, refresh_hint: Duration) -> Self {
        self.bundle_endpoint = Some(refresh_hint);
        self
    }

    /// Writes the files and starts the controller; returns once it is ready.
    pub async fn start(self) -> anyhow::Result<TestCa> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("manifests"))?;
        for (name, content) in &self.files {
            std::fs::write(dir.path().join("manifests").join(name), content)?;
        }
        let tokens: String = match &self.nodes {
            Some(nodes) => nodes
                .iter()
                .map(|n| format!("{n} {}\n", node_token(n)))
                .collect(),
            None => format!("node-a {NODE_A_TOKEN}\nnode-b {NODE_B_TOKEN}\n"),
        };
        std::fs::write(dir.path().join("tokens"), tokens)?;
        let mut config = TestCa::config(dir.path(), self.plugin_ca);
        config.signer = self.signer;
        if let Some(listeners) = self.listeners {
            config.listeners = listeners;
        }
        if let Some(timeout) = self.rotation_ack_timeout {
            config.rotation_ack_timeout = timeout;
        }
        if let Some(namespace) = self.root_namespace {
            config.root_namespace = namespace;
        }
        if let Some(td) = &self.trust_domain {
            config.trust_domain = membrane_identity::spiffe_id::parse_trust_domain(td)?;
        }
        if let Some(refresh_hint) = self.bundle_endpoint {
            config.federation.bundle_endpoint = Some("127.0.0.1:0".parse()?);
            config.federation.refresh_hint = refresh_hint;
        }
        if self.exports {
            config.federation.exports_listen = Some("127.0.0.1:0".parse()?);
        }
        TestCa::run_config(dir, config).await
    }
}

/// A socket bound to `addr` with `SO_REUSEADDR` and never listening: the kernel gives the
/// port to no one else, and a listener with `SO_REUSEADDR` (tokio's default) may still bind it.
fn hold(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    // The old listener's port may linger a moment after shutdown.
    for _ in 0..50 {
        match socket.bind(&addr.into()) {
            Ok(()) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    socket.bind(&addr.into()).map(|()| socket)
}
