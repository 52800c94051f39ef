//! The controller binary (`membrane-ca serve --source=kubernetes`) as a child process against a
//! [`super::KubeApi`], authenticated by a kubeconfig (a service account's token, as in a pod),
//! its JSON log lines kept for assertions.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `membrane-ca` binary next to the test binary (or `$MEMBRANE_CA_BIN`).
pub fn controller_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MEMBRANE_CA_BIN") {
        return Ok(PathBuf::from(path));
    }
    let zt = crate::mesh::ztunnel_binary()?;
    let path = zt.with_file_name("membrane-ca");
    if path.exists() {
        Ok(path)
    } else {
        bail!(
            "{} not found: build it with `cargo build -p membrane-ca` or set MEMBRANE_CA_BIN",
            path.display()
        )
    }
}

/// A running controller process.
pub struct KubeController {
    child: super::Child,
    /// Its gRPC listener (certificates, discovery).
    pub grpc: SocketAddr,
    /// Its metrics listener.
    pub metrics: SocketAddr,
    /// Its state directory (`root-cert.pem`).
    pub state_dir: PathBuf,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl KubeController {
    /// Starts `membrane-ca serve --source=kubernetes` with `KUBECONFIG=kubeconfig`, state in
    /// `state_dir`, loopback listeners and `args` (the chart's other flags), and waits for its
    /// "membrane-ca serving" line (20 s bound). `env` adds environment variables (`POD_NAME`
    /// names a replica).
    pub fn spawn_with_env(
        kubeconfig: &Path,
        state_dir: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut env: Vec<(&str, &std::ffi::OsStr)> = env
            .iter()
            .map(|(k, v)| (*k, std::ffi::OsStr::new(*v)))
            .collect();
        env.push(("KUBECONFIG", kubeconfig.as_os_str()));
        Self::launch("kubernetes", state_dir, args, &env)
    }

    /// As [`KubeController::spawn_with_env`] for another `--source` (`directory`: `args`
    /// carry `--source-dir` and `--tokens-file`), for comparisons.
    pub fn spawn_source(state_dir: &Path, args: &[String], source: &str) -> anyhow::Result<Self> {
        Self::launch(source, state_dir, args, &[])
    }

    fn launch(
        source: &str,
        state_dir: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(controller_binary()?);
        command
            .arg("serve")
            .arg(format!("--source={source}"))
            .arg("--log-format=json")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("MEMBRANE_TESTBED_CA_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting membrane-ca")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (sink, tx) = (logs.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let value = serde_json::from_str(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                    let _ = tx.send(value.clone());
                    if let Ok(mut all) = sink.lock() {
                        all.push(value);
                    }
                }
            });
        }
        let child = super::Child::adopt("membrane-ca", child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let serving = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .with_context(|| {
                    format!(
                        "membrane-ca did not start serving: {:?}",
                        logs.lock().map(|l| l.clone()).unwrap_or_default()
                    )
                })?;
            if line["message"] == "membrane-ca serving" {
                break line;
            }
        };
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            Ok(serving[k].as_str().context("address field")?.parse()?)
        };
        Ok(Self {
            grpc: addr("listen")?,
            metrics: addr("metrics")?,
            state_dir: state_dir.to_owned(),
            logs,
            child,
        })
    }

    /// Its process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// The controller's gRPC endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// Its root certificate (PEM) from its state directory.
    pub fn root_pem(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(
            self.state_dir.join("root-cert.pem"),
        )?)
    }

    /// Every log line so far (JSON; a line that is not JSON is `{"message": line}`).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until a log line satisfies `pred` (bounded by `timeout`).
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| pred(l)) {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!("no such controller log line within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its metrics page.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(crate::http_get(self.metrics, "/metrics").await?.1)
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub fn stop(self) -> anyhow::Result<()> {
        self.child.stop()?;
        Ok(())
    }

    /// Kills it at once (SIGKILL), as a crashed replica.
    pub fn kill(self) -> anyhow::Result<()> {
        self.child.kill()?;
        Ok(())
    }
}
