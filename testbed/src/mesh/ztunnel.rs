//! One node's `ztunnel` process in a [`Mesh`]: finding the binary, starting it with the
//! mesh's files (token, enrollment socket, state directory), collecting what it prints
//! (access records on stdout, logs on stderr) and stopping it.
//!
//! Must not: build namespaces or talk to the controller (the parent module does both).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Mesh;

/// A running ztunnel process.
pub struct Ztunnel {
    child: Child,
    /// Its enrollment socket.
    pub enroll_socket: PathBuf,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
    /// Its readiness address.
    pub readiness: SocketAddr,
    /// Access records it printed (JSON lines on stdout).
    pub access: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Log lines it printed (stderr).
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Ztunnel {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serials of the certificates this ztunnel logged as replacing an older one
    /// ("workload certificate issued" with a different old serial), in order; only those of
    /// `identity` when given.
    pub fn renewals(&self, identity: Option<&str>) -> Vec<String> {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["message"] == "workload certificate issued"
                    && v["old_serial"].as_str().is_some_and(|s| !s.is_empty())
                    && v["serial"] != v["old_serial"]
                    && identity.is_none_or(|id| v["identity"] == id)
            })
            .filter_map(|v| v["serial"].as_str().map(str::to_owned))
            .collect()
    }

    /// Copies of the access records so far.
    pub fn access_records(&self) -> Vec<serde_json::Value> {
        self.access.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for an access record matching `pred` (records are written in
    /// batches, so a test must not assume one is there the moment a connection closed).
    pub async fn wait_for_record(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = self.access_records().into_iter().find(|r| pred(r)) {
                return Some(found);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ztunnel did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds the `ztunnel` binary: `$MEMBRANE_ZTUNNEL_BIN`, or next to the running test binary's
/// directory (`target/<profile>/ztunnel`, which `cargo test --workspace` builds).
pub fn ztunnel_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MEMBRANE_ZTUNNEL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("no profile directory")?;
    }
    let candidate = dir.join("ztunnel");
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: build it with `cargo build -p membrane-ztunnel` or set MEMBRANE_ZTUNNEL_BIN",
            candidate.display()
        )
    }
}

impl Mesh {
    pub(super) fn spawn_ztunnel(&self, node: &str, extra_args: &[&str]) -> anyhow::Result<Ztunnel> {
        let dir = self.dir.path();
        let token_file = dir.join(format!("{node}.token"));
        let other = self.spec.node_controllers.get(node);
        let (endpoint, token) = match (other, &self.spec.external_controller) {
            (Some(other), _) => (other.endpoint.clone(), other.token.clone()),
            (None, Some(external)) => (
                external.endpoint.clone(),
                (external.tokens.get(node))
                    .with_context(|| format!("no token for node {node}"))?
                    .clone(),
            ),
            (None, None) => (self.ca().endpoint(), crate::node_token(node)),
        };
        let (root, trust_domain) = match other {
            Some(other) => (
                dir.join(format!("{node}-root.pem")),
                Some(other.trust_domain.as_str()),
            ),
            None => (dir.join("root.pem"), self.spec.trust_domain.as_deref()),
        };
        let trust_args: Vec<&str> = match trust_domain {
            Some(td) => vec!["--trust-domain", td],
            None => Vec::new(),
        };
        std::fs::write(&token_file, token)?;
        let enroll_socket = dir.join(format!("{node}.sock"));
        // A short drain unless the spec sets its own: tests stop ztunnels often.
        let own_grace = (self.spec.ztunnel_args.iter().map(String::as_str))
            .chain(extra_args.iter().copied())
            .any(|a| a == "--drain-grace");
        let drain_grace: &[&str] = if own_grace {
            &[]
        } else {
            &["--drain-grace", "2s"]
        };
        let mut command = Command::new(ztunnel_binary()?);
        command.args(["--node", node]);
        // A node that runs a gateway pod runs the ztunnel in gateway mode for it.
        if let Some(def) = self
            .spec
            .pods
            .iter()
            .find(|p| p.node == node && p.gateway.is_some())
        {
            command
                .args(["--gateway", def.gateway.as_deref().unwrap_or("egress")])
                .arg("--gateway-pod")
                .arg(format!("{}/{}", def.namespace, def.name))
                .arg("--gateway-netns")
                .arg(self.netns_path(def.key()));
        }
        if let Some(ttl) = self.spec.cert_ttl {
            command
                .arg("--cert-ttl")
                .arg(format!("{}ms", ttl.as_millis()));
        }
        if self.spec.local_files {
            command
                .arg("--workloads-file")
                .arg(dir.join("workloads.yaml"))
                .arg("--policy-file")
                .arg(dir.join("policies.yaml"));
        }
        let mut child = command
            .args(["--ca-address", &endpoint])
            .arg("--ca-root")
            .arg(&root)
            .args(&trust_args)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--enroll-socket")
            .arg(&enroll_socket)
            .arg("--state-dir")
            .arg(dir.join(format!("{node}-state")))
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--readiness-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(drain_grace)
            .args(&self.spec.ztunnel_args)
            .args(extra_args)
            // `MEMBRANE_TESTBED_ZTUNNEL_LOG` (e.g. `debug`) to see more while debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("MEMBRANE_TESTBED_ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ztunnel")?;
        let access = Arc::new(Mutex::new(Vec::new()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("stdout")?;
        let sink = access.clone();
        let mut tee = match &self.spec.access_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            None => None,
        };
        std::thread::spawn(move || {
            use std::io::Write as _;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(file) = tee.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
                if let (Ok(v), Ok(mut all)) = (serde_json::from_str(&line), sink.lock()) {
                    all.push(v);
                }
            }
        });
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log_sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                if let Ok(mut all) = log_sink.lock() {
                    all.push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let serving = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .with_context(|| format!("ztunnel {node} did not start"))?;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "ztunnel serving" {
                break v;
            }
        };
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            Ok(serving[k].as_str().context("address field")?.parse()?)
        };
        Ok(Ztunnel {
            enroll_socket,
            admin: addr("admin")?,
            metrics: addr("metrics")?,
            readiness: addr("readiness")?,
            access,
            logs,
            child,
        })
    }

    /// Starts node `node`'s ztunnel again (after it stopped), with the same files and state
    /// directory, so it re-enrolls the pods it had.
    pub fn restart_ztunnel(&mut self, node: &str) -> anyhow::Result<()> {
        self.restart_ztunnel_with(node, &[])
    }

    /// Stops node `node`'s ztunnel the way a crash would (killed); [`Mesh::restart_ztunnel`]
    /// starts it again.
    pub fn stop_ztunnel(&mut self, node: &str) {
        if let Some(z) = self.ztunnels.get_mut(node) {
            let _ = z.child.kill();
            let _ = z.child.wait();
        }
    }

    /// As [`Mesh::restart_ztunnel`], with `extra_args` appended to the ztunnel's command line
    /// (for example `--netns-dir DIR`).
    pub fn restart_ztunnel_with(&mut self, node: &str, extra_args: &[&str]) -> anyhow::Result<()> {
        if let Some(mut old) = self.ztunnels.remove(node) {
            let _ = old.child.kill();
            let _ = old.child.wait();
        }
        let z = self.spawn_ztunnel(node, extra_args)?;
        self.ztunnels.insert(node.to_owned(), z);
        Ok(())
    }
}
