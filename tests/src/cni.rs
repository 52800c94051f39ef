//! The `membrane-cni` plugin run exactly as a container runtime runs it: inside the node's
//! network namespace, with only the `CNI_*` variables and a PATH, the network configuration
//! with a chained `prevResult` on stdin, bounded in time.
//!
//! Must not: decide what a run should have done (the tests assert that).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::mesh::{Mesh, ztunnel_binary};
use crate::netns::command_in;

/// `membrane-cni`, next to the ztunnel binary.
pub fn cni_binary() -> anyhow::Result<PathBuf> {
    let zt = ztunnel_binary()?;
    let path = zt.with_file_name("membrane-cni");
    ensure!(
        path.exists(),
        "{} not found: build it with `cargo build -p membrane-cni`",
        path.display()
    );
    Ok(path)
}

/// What one run of the plugin printed, and how it exited.
#[derive(Debug)]
pub struct Run {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// How long it ran.
    pub took: Duration,
}

impl Run {
    /// Standard output as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self:?}"))
    }

    /// Whether it exited with 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the plugin inside `node`'s network namespace (where a runtime runs it: the node's
/// host namespace) with only `env` and a PATH, `stdin` on stdin; 30 s bound.
pub async fn run_plugin(
    mesh: &Mesh,
    node: &str,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
) -> anyhow::Result<Run> {
    let node_ns = mesh
        .testbed
        .node(node)
        .context("no such node")?
        .netns_name()
        .to_owned();
    let binary = cni_binary()?;
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut command = command_in(&node_ns, &binary);
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().context("starting membrane-cni")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(&stdin)?;
        }
        let deadline = started + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("membrane-cni did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = started.elapsed();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        if let Some(mut out) = child.stdout.take() {
            out.read_to_string(&mut stdout)?;
        }
        if let Some(mut err) = child.stderr.take() {
            err.read_to_string(&mut stderr)?;
        }
        Ok(Run {
            stdout,
            stderr,
            code: status.code(),
            took,
        })
    })
    .await?
}

/// The `CNI_*` variables a runtime sets for `pod` (the harness's pod UID is
/// `<namespace>-<name>`).
pub fn cni_env(mesh: &Mesh, command: &str, pod: &str) -> anyhow::Result<Vec<(String, String)>> {
    let def = mesh.def(pod);
    let bin_dir = cni_binary()?
        .parent()
        .context("bin dir")?
        .display()
        .to_string();
    Ok(vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), format!("sandbox-{}", def.name)),
        (
            "CNI_NETNS".into(),
            mesh.netns_path(pod).display().to_string(),
        ),
        ("CNI_IFNAME".into(), "eth0".into()),
        ("CNI_PATH".into(), bin_dir),
        (
            "CNI_ARGS".into(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}-{}",
                def.namespace, def.name, def.name, def.namespace, def.name
            ),
        ),
    ])
}

/// What the primary CNI (before membrane-cni in the list) produced for `pod`.
pub fn prev_result(mesh: &Mesh, pod: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": mesh.netns_path(pod)}],
        "ips": [{"address": format!("{}/32", mesh.ip(pod)), "interface": 0, "gateway": "10.77.0.1"}],
        "dns": {},
    })
}

/// The network configuration the runtime passes: the list's name and version, the plugin's
/// entry as the chart installs it (with `failClosed` as given), and the previous result.
pub fn net_conf(mesh: &Mesh, node: &str, pod: &str, fail_closed: bool) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "membrane-cni",
        "enrollSocket": mesh.ztunnels[node].enroll_socket,
        "failClosed": fail_closed,
        "prevResult": prev_result(mesh, pod),
    })
}

/// Runs `command` for `pod` (on its node) with the standard configuration and `failClosed`
/// as given.
pub async fn cni(mesh: &Mesh, command: &str, pod: &str, fail_closed: bool) -> anyhow::Result<Run> {
    let node = mesh.def(pod).node.clone();
    let conf = net_conf(mesh, &node, pod, fail_closed)
        .to_string()
        .into_bytes();
    run_plugin(mesh, &node, cni_env(mesh, command, pod)?, conf).await
}

/// Whether `pod`'s namespace holds the capture table.
pub fn captured(mesh: &Mesh, pod: &str) -> anyhow::Result<bool> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["nft", "list", "table", "inet", "membrane"])?;
    Ok(out.status.success())
}
