//! A real Kubernetes control plane on loopback: etcd and kube-apiserver as child processes with
//! their own PKI, a service-account issuer and signing key (so TokenRequest and TokenReview
//! work), `--authorization-mode=RBAC` and an audit log of every service account's requests
//! ([`KubeApi`]). No kubelet, scheduler or controller-manager: tests create Pods with
//! `spec.nodeName` and patch their status as a kubelet would.
//!
//! The binaries are the ones `scripts/lib/kube.sh` installs: `$MEMBRANE_KUBE_BIN_DIR`, or its
//! default cache directory. [`KubeApi::start`] fails with the missing piece named when they are
//! absent.
//!
//! Must not: leave a process or a file behind. Processes are stopped by PID (SIGTERM, then
//! SIGKILL) when the [`KubeApi`] drops, failure or not; everything lives in its temporary
//! directory.

mod controller;
mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use controller::{KubeController, controller_binary};
pub use process::Child;

/// The Kubernetes release the harness is built for (`scripts/lib/kube.sh`).
pub const KUBE_VERSION: &str = "1.37.2";

/// The service-account token issuer of the API server.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Where `scripts/lib/kube.sh` puts the binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MEMBRANE_KUBE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(format!(".cache/membrane/kube/v{KUBE_VERSION}"))
}

/// `name` in [`bin_dir`], or an error naming it and how to install it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} is missing: run `source scripts/lib/deps.sh && membrane_install_test_deps` \
             (scripts/test.sh does) to install kube-apiserver, etcd and kubectl, or set \
             MEMBRANE_KUBE_BIN_DIR",
            path.display()
        )
    }
}

/// A free loopback TCP port (bound and released: good enough for a test's own processes).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The audit policy: metadata of every request a service account makes, nothing else.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

/// etcd and kube-apiserver, running.
pub struct KubeApi {
    // Dropped in order: the API server before etcd, both before the directory.
    apiserver: Option<Child>,
    etcd: Child,
    etcd_url: String,
    port: u16,
    dir: tempfile::TempDir,
    /// The admin client (group `system:masters`).
    pub client: kube::Client,
}

impl KubeApi {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers `ok` (30 s bound).
    pub async fn start() -> anyhow::Result<Self> {
        let apiserver_bin = binary("kube-apiserver")?;
        let etcd_bin = binary("etcd")?;
        let dir = tempfile::Builder::new()
            .prefix("membrane-kube-")
            .tempdir()?;
        let pki = Pki::write(dir.path())?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Child::spawn(
            "etcd",
            std::process::Command::new(&etcd_bin)
                .arg("--data-dir")
                .arg(dir.path().join("etcd"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .args(["--log-level", "warn"])
                .env("ETCD_UNSUPPORTED_ARCH", "amd64"),
            &dir.path().join("etcd.log"),
        )?;
        std::fs::write(dir.path().join("audit-policy.yaml"), AUDIT_POLICY)?;
        let port = free_port()?;
        let client = pki.admin_client(port).await?;
        let mut api = Self {
            apiserver: None,
            etcd,
            etcd_url,
            port,
            dir,
            client,
        };
        api.start_apiserver(&apiserver_bin)?;
        api.wait_ready().await?;
        Ok(api)
    }

    fn start_apiserver(&mut self, bin: &Path) -> anyhow::Result<()> {
        let d = self.dir.path();
        let file = |name: &str| d.join(name).display().to_string();
        let child = Child::spawn(
            "kube-apiserver",
            std::process::Command::new(bin)
                .args(["--etcd-servers", &self.etcd_url])
                .args(["--bind-address", "127.0.0.1"])
                .args(["--advertise-address", "127.0.0.1"])
                .args(["--secure-port", &self.port.to_string()])
                .args(["--cert-dir", &file("apiserver-certs")])
                .args(["--tls-cert-file", &file("apiserver.pem")])
                .args(["--tls-private-key-file", &file("apiserver-key.pem")])
                .args(["--client-ca-file", &file("ca.pem")])
                .args(["--service-account-issuer", ISSUER])
                .args(["--service-account-key-file", &file("sa-pub.pem")])
                .args(["--service-account-signing-key-file", &file("sa-key.pem")])
                .args(["--api-audiences", ISSUER])
                .args(["--authorization-mode", "RBAC"])
                .args(["--service-cluster-ip-range", "10.96.0.0/16"])
                .args(["--audit-policy-file", &file("audit-policy.yaml")])
                .args(["--audit-log-path", &file("audit.log")])
                .args(["--audit-log-mode", "blocking"])
                .args(["--audit-log-format", "json"])
                .arg("--enable-priority-and-fairness=false")
                .arg("--profiling=false")
                .args(["--endpoint-reconciler-type", "none"])
                .args(["--v", "1"]),
            &d.join("kube-apiserver.log"),
        )?;
        self.apiserver = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.etcd.exited()? {
                bail!("etcd exited ({status}):\n{}", self.log_tail("etcd.log"));
            }
            if let Some(child) = self.apiserver.as_mut()
                && let Some(status) = child.exited()?
            {
                bail!(
                    "kube-apiserver exited ({status}) before it was ready:\n{}",
                    self.log_tail("kube-apiserver.log")
                );
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match self.client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "kube-apiserver not ready within 30 s (last answer: {last}):\n{}",
            self.log_tail("kube-apiserver.log")
        )
    }

    /// The last lines of one of the harness's log files (for error messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops the API server (etcd keeps running), then starts it again on the same port and
    /// waits until it is ready: a control-plane restart under running clients.
    pub async fn restart_apiserver(&mut self, down_for: Duration) -> anyhow::Result<()> {
        if let Some(child) = self.apiserver.take() {
            child.stop()?;
        }
        tokio::time::sleep(down_for).await;
        self.start_apiserver(&binary("kube-apiserver")?)?;
        self.wait_ready().await
    }

    /// Compacts etcd's history up to its current revision (its JSON gateway), so every watch
    /// that resumes from an older resource version is answered 410 Gone. Returns the revision.
    pub async fn compact_etcd(&self) -> anyhow::Result<u64> {
        let range = etcd_post(&self.etcd_url, "/v3/kv/range", r#"{"key":"AA=="}"#).await?;
        let revision: u64 = range["header"]["revision"]
            .as_str()
            .context("etcd range answer without a revision")?
            .parse()?;
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        etcd_post(&self.etcd_url, "/v3/kv/compaction", &body).await?;
        Ok(revision)
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The harness directory (PKI, logs, kubeconfigs).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The admin kubeconfig file (for kubectl).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Writes a kubeconfig that authenticates with `token` as `<name>.kubeconfig` and returns
    /// its path.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(
            &path,
            kubeconfig(&self.url(), &ca, &format!("token: {token}")),
        )?;
        Ok(path)
    }

    /// A bound service-account token of `namespace/account` (TokenRequest) for `audience`,
    /// bound to pod `pod` of that namespace when given (the API server then names the pod's
    /// node in the token, as a projected token of a pod on that node carries it).
    pub async fn token(
        &self,
        namespace: &str,
        account: &str,
        audience: &str,
        pod: Option<(&str, &str)>,
    ) -> anyhow::Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                expiration_seconds: Some(3600),
                bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            },
            ..TokenRequest::default()
        };
        let answer = api
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{account}"))?;
        answer
            .status
            .map(|s| s.token)
            .context("TokenRequest answered without a token")
    }

    /// Runs kubectl (admin) with `args`; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(binary("kubectl")?)
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.unwrap_or_default().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every audited request (JSON) of the user `username` so far.
    pub fn audit_events(&self, username: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log"))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == username)
            .collect())
    }
}

async fn etcd_post(base: &str, path: &str, body: &str) -> anyhow::Result<serde_json::Value> {
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .context("etcd URL")?;
    let (status, text) = crate::http_post(addr, path, body).await?;
    anyhow::ensure!(status == 200, "etcd {path}: HTTP {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn kubeconfig(server: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
        ca.display()
    )
}

/// The control plane's PKI, written into the harness directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, SanType,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "membrane-test-kubernetes-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut server = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;
        let mut admin = CertificateParams::default();
        admin
            .distinguished_name
            .push(DnType::CommonName, "membrane-test-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;
        let sa_key = KeyPair::generate()?;
        let files = [
            ("ca.pem", ca_cert.pem()),
            ("apiserver.pem", server_cert.pem()),
            ("apiserver-key.pem", server_key.serialize_pem()),
            ("admin.pem", admin_cert.pem()),
            ("admin-key.pem", admin_key.serialize_pem()),
            ("sa-key.pem", sa_key.serialize_pem()),
            ("sa-pub.pem", sa_key.public_key_pem()),
        ];
        for (name, content) in files {
            write_private(&dir.join(name), content.as_bytes())?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Writes `admin.kubeconfig` and returns a client built from it.
    async fn admin_client(&self, port: u16) -> anyhow::Result<kube::Client> {
        let user = format!(
            "client-certificate: {}\n    client-key: {}",
            self.dir.join("admin.pem").display(),
            self.dir.join("admin-key.pem").display()
        );
        let path = self.dir.join("admin.kubeconfig");
        std::fs::write(
            &path,
            kubeconfig(
                &format!("https://127.0.0.1:{port}"),
                &self.dir.join("ca.pem"),
                &user,
            ),
        )?;
        client_from(&path).await
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(path)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    // Fixes the TLS provider (and rustls' process default) before the client builds its TLS.
    membrane_identity::key_exchange();
    Ok(kube::Client::try_from(config)?)
}

/// Writes `content` to a new file readable only by its owner (0600): private keys.
fn write_private(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(content)?;
    Ok(())
}
