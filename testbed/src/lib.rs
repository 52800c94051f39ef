//! Membrane's testbed: a whole mesh on one Linux host, shipped by `membrane local` and
//! `membrane demo` and used by the end-to-end tests.
//!
//! Owns: the simulated cluster ([`netns`]: nodes and pods as network namespaces, packet
//! capture on the fabric), the controller it runs ([`TestCa`]: the real `membrane_ca::app` on
//! a loopback port with its own temporary state, manifest directory and token file) and the
//! mesh of real `ztunnel` processes ([`mesh`]). Dropping a testbed removes every namespace,
//! process and directory it created.
//!
//! Must not: touch the host's own network namespace or any namespace it did not create, send
//! traffic anywhere but loopback and its own namespaces, or carry test assertions and
//! test-only helpers (those live in the `membrane-tests` harness, which builds on this crate).

pub mod mesh;
pub mod netns;

/// Whether this process runs as root (the testbed's network namespaces need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An error unless this process runs as root. Every test that needs root calls this first (and
/// is marked `#[ignore = "needs root"]`, so a non-root `cargo test` reports it ignored; the
/// test script runs ignored tests when it is root): a forced run without root fails loudly
/// instead of passing without its assertions.
pub fn require_root() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "needs root (network namespaces, nftables): run as root, or leave the test ignored"
    );
    Ok(())
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use membrane_ca::SignerConfig;
use membrane_ca::app::{self, AppConfig, Running};
use membrane_ca::client::CaClient;
use membrane_ca::serving::ListenerConfig;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::{TrustDomain, WorkloadIdentity};

/// Token of the simulated node `node-a`.
pub const NODE_A_TOKEN: &str = "node-a-bootstrap-token-0001";
/// Token of the simulated node `node-b`.
pub const NODE_B_TOKEN: &str = "node-b-bootstrap-token-0002";

/// A small mesh: `training` (enrolled) with a trainer on node-a and an inference server on
/// node-b, and `legacy` (not enrolled) with a pod on node-a.
pub const MESH_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: training
  labels:
    membrane.dev/mesh: enabled
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: trainer-0, namespace: training}
spec: {serviceAccountName: trainer, nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: inference-0, namespace: training}
spec: {serviceAccountName: inference, nodeName: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: old-app, namespace: legacy}
spec: {serviceAccountName: old-app, nodeName: node-a}
"#;

/// An SVID claiming `spiffe_id`, signed by a fresh CA the mesh does not trust: what an
/// impostor presents. The chain carries that CA, so only the trust bundle can refuse it.
pub fn impostor_svid(spiffe_id: &str) -> anyhow::Result<membrane_identity::WorkloadSvid> {
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf = leaf.signed_by(&key, &issuer)?;
    Ok(membrane_identity::WorkloadSvid::new(
        vec![leaf.der().clone(), ca_cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        &membrane_identity::crypto_provider(),
    )?)
}

/// The bootstrap token the harness gives node `node`.
pub fn node_token(node: &str) -> String {
    format!("{node}-bootstrap-token-for-tests")
}

/// The trust domain the harness uses.
pub fn trust_domain() -> TrustDomain {
    parse_trust_domain("cluster.local").expect("valid trust domain")
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn identity(ns: &str, sa: &str) -> WorkloadIdentity {
    WorkloadIdentity::new(&trust_domain(), ns, sa).expect("valid identity")
}

/// A running controller with its own directories.
pub struct TestCa {
    /// Temporary root: `state/`, `manifests/`, `tokens`.
    pub dir: tempfile::TempDir,
    running: Option<Running>,
    paused: Option<(SocketAddr, SocketAddr)>,
    signer: SignerConfig,
    listeners: ListenerConfig,
    rotation_ack_timeout: Duration,
    root_namespace: String,
}

impl TestCa {
    /// Starts a controller whose manifest directory holds `manifests` in `mesh.yaml`.
    pub async fn start(manifests: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("manifests"))?;
        std::fs::write(dir.path().join("manifests/mesh.yaml"), manifests)?;
        std::fs::write(
            dir.path().join("tokens"),
            format!("node-a {NODE_A_TOKEN}\nnode-b {NODE_B_TOKEN}\n"),
        )?;
        Self::start_in(dir, None).await
    }

    /// Starts a controller for `manifests` with a token for each of `nodes`
    /// ([`node_token`]).
    pub async fn start_with(manifests: &str, nodes: &[String]) -> anyhow::Result<Self> {
        Self::start_with_files(&[("mesh.yaml", manifests)], nodes).await
    }

    /// Starts a controller whose manifest directory holds `files` (name, content), with a
    /// token for each of `nodes`.
    pub async fn start_with_files(
        files: &[(&str, &str)],
        nodes: &[String],
    ) -> anyhow::Result<Self> {
        Self::start_with_signer(files, nodes, SignerConfig::default()).await
    }

    /// As [`TestCa::start_with_files`], with the given certificate lifetimes (kept across
    /// [`TestCa::pause`] and [`TestCa::resume`]).
    pub async fn start_with_signer(
        files: &[(&str, &str)],
        nodes: &[String],
        signer: SignerConfig,
    ) -> anyhow::Result<Self> {
        Self::start_configured(files, nodes, signer, |_| {}).await
    }

    /// As [`TestCa::start_with_signer`], with the given listener caps and timeouts (kept
    /// across [`TestCa::pause`] and [`TestCa::resume`]).
    pub async fn start_with_limits(
        files: &[(&str, &str)],
        nodes: &[String],
        signer: SignerConfig,
        listeners: ListenerConfig,
    ) -> anyhow::Result<Self> {
        Self::start_configured(files, nodes, signer, |c| c.listeners = listeners).await
    }

    /// As [`TestCa::start_with_signer`], with `tweak` applied to the controller's
    /// configuration (its listener limits, rotation acknowledgement timeout and root namespace
    /// are kept across [`TestCa::pause`] and [`TestCa::resume`]).
    pub async fn start_configured(
        files: &[(&str, &str)],
        nodes: &[String],
        signer: SignerConfig,
        tweak: impl FnOnce(&mut AppConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("manifests"))?;
        for (name, content) in files {
            std::fs::write(dir.path().join("manifests").join(name), content)?;
        }
        let tokens: String = nodes
            .iter()
            .map(|n| format!("{n} {}\n", node_token(n)))
            .collect();
        std::fs::write(dir.path().join("tokens"), tokens)?;
        let mut config = Self::config(dir.path(), None);
        config.signer = signer;
        tweak(&mut config);
        Self::run_config(dir, config).await
    }

    /// As [`TestCa::start_with_signer`], with the root rotation's acknowledgement timeout.
    pub async fn start_with_rotation_ack_timeout(
        files: &[(&str, &str)],
        nodes: &[String],
        signer: SignerConfig,
        ack_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_configured(files, nodes, signer, |c| {
            c.rotation_ack_timeout = ack_timeout;
        })
        .await
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
        let running = app::start(config).await?;
        tokio::time::timeout(Duration::from_secs(10), running.ready()).await?;
        Ok(Self {
            dir,
            running: Some(running),
            paused: None,
            signer: config_signer,
            listeners,
            rotation_ack_timeout,
            root_namespace,
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
            signer: SignerConfig::default(),
            listeners: Default::default(),
        }
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

    /// Starts another controller replica over the same directory (same root, same manifests,
    /// same tokens) on fresh loopback ports; the caller shuts it down.
    pub async fn replica(&self) -> anyhow::Result<Running> {
        let mut config = Self::config(self.dir.path(), None);
        config.signer = self.signer;
        config.listeners = self.listeners;
        config.rotation_ack_timeout = self.rotation_ack_timeout;
        config.root_namespace = self.root_namespace.clone();
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

    /// Stops the controller (as if killed) but keeps its directory and addresses; see
    /// [`TestCa::resume`]. Returns the addresses it listened on.
    pub async fn pause(&mut self) -> Option<(SocketAddr, SocketAddr)> {
        let running = self.running.take()?;
        let addrs = (running.grpc_addr(), running.metrics_addr());
        running.shutdown().await;
        self.paused = Some(addrs);
        Some(addrs)
    }

    /// Starts a paused controller again on the same addresses, with the same root.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let (grpc, metrics) = self
            .paused
            .take()
            .ok_or_else(|| anyhow::anyhow!("controller not paused"))?;
        let mut config = Self::config(self.dir.path(), None);
        config.signer = self.signer;
        config.listeners = self.listeners;
        config.rotation_ack_timeout = self.rotation_ack_timeout;
        config.root_namespace = self.root_namespace.clone();
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

/// A plain HTTP/1.1 GET on loopback: the response body, or an error for a non-2xx status.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {out:?}"))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// Deterministic pseudo-random bytes (xorshift64): both ends of a test stream can generate
/// and check the same bytes without storing them.
#[derive(Debug, Clone)]
pub struct Pattern(pub u64);

impl Pattern {
    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}
