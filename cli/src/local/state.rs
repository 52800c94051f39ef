//! The state file of a local mesh (`<state-dir>/local.json`) and what `status` shows.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use membrane_testbed::mesh::Mesh;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One pod of the local mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Its network namespace (`ip netns exec <netns> …` runs a program in the pod).
    pub netns: String,
    /// Its IP.
    pub ip: IpAddr,
    /// Its node.
    pub node: String,
    /// Its SPIFFE identity.
    pub identity: String,
    /// Whether it is in the mesh (captured, with an identity).
    pub enrolled: bool,
    /// A gateway pod's kind (`egress`, `ingress`): served by its node's ztunnel in gateway
    /// mode, with an identity, never captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// One node's ztunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZtunnelState {
    /// Process id.
    pub pid: u32,
    /// Admin address (config dump).
    pub admin: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// Readiness address.
    pub readiness: SocketAddr,
}

/// What `membrane local up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalState {
    /// The daemon's process id.
    pub pid: u32,
    /// The manifest directory.
    pub manifests: PathBuf,
    /// Whether every pod is enrolled and every identity issued.
    pub ready: bool,
    /// The controller's gRPC endpoint.
    pub controller: String,
    /// The controller's metrics address.
    pub controller_metrics: SocketAddr,
    /// Ztunnels by node.
    pub ztunnels: BTreeMap<String, ZtunnelState>,
    /// Pods.
    pub pods: Vec<PodState>,
    /// Every network namespace created (nodes, fabric, pods).
    pub netns: Vec<String>,
}

impl LocalState {
    /// The state of a started mesh.
    pub fn from_mesh(mesh: &Mesh, manifests: &Path, ready: bool) -> Self {
        let pods = mesh
            .pods()
            .iter()
            .map(|def| PodState {
                namespace: def.namespace.clone(),
                name: def.name.clone(),
                netns: def.key().to_owned(),
                ip: mesh.ip(def.key()),
                node: def.node.clone(),
                identity: mesh.spiffe_id(def.key()),
                enrolled: super::manifests::enrolled(mesh.spec(), def),
                gateway: def.gateway.clone(),
            })
            .collect();
        Self {
            pid: std::process::id(),
            manifests: manifests.to_owned(),
            ready,
            controller: mesh.ca().endpoint(),
            controller_metrics: mesh.ca().metrics_addr(),
            ztunnels: mesh
                .ztunnels
                .iter()
                .map(|(node, z)| {
                    (
                        node.clone(),
                        ZtunnelState {
                            pid: z.pid(),
                            admin: z.admin,
                            metrics: z.metrics,
                            readiness: z.readiness,
                        },
                    )
                })
                .collect(),
            pods,
            netns: mesh.testbed.netns_names().to_vec(),
        }
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not readable", path.display()))
    }

    /// Writes the state file atomically.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    fn alive(pid: u32) -> bool {
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    }

    /// Whether the daemon still runs.
    pub fn daemon_alive(&self) -> bool {
        Self::alive(self.pid)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Kills recorded ztunnels still running and deletes recorded namespaces still present
    /// (with the processes inside them); returns what it removed.
    pub fn remove_leftovers(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for (node, z) in &self.ztunnels {
            if Self::alive(z.pid)
                && let Ok(pid) = i32::try_from(z.pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                removed.push(format!("ztunnel of {node} (pid {pid})"));
            }
        }
        for name in self.netns.iter().rev() {
            let path = Path::new(membrane_testbed::netns::NETNS_RUN_DIR).join(name);
            if !path.exists() {
                continue;
            }
            if let Ok(out) = std::process::Command::new("ip")
                .args(["netns", "pids", name])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
            removed.push(format!("netns {name}"));
        }
        removed
    }

    /// Prints what `up` built.
    pub fn print_summary(&self) {
        println!(
            "local mesh ready: {} pods on {} nodes, controller at {}",
            self.pods.len(),
            self.ztunnels.len(),
            self.controller
        );
        println!(
            "\n  {:<32} {:<14} {:<15} {:<14} identity",
            "pod (netns)", "ip", "node", "mesh"
        );
        for p in &self.pods {
            let (mesh, identity) = match (&p.gateway, p.enrolled) {
                (Some(kind), _) => (format!("{kind} gateway"), p.identity.as_str()),
                (None, true) => ("yes".to_owned(), p.identity.as_str()),
                (None, false) => ("no".to_owned(), "-"),
            };
            println!(
                "  {:<32} {:<14} {:<15} {:<14} {}",
                p.netns,
                p.ip.to_string(),
                p.node,
                mesh,
                identity
            );
        }
        println!(
            "\nrun a program in a pod:   ip netns exec {} <command>",
            self.pods.first().map_or("<netns>", |p| p.netns.as_str())
        );
        println!(
            "resolve a name:           ip netns exec {} dig huggingface.co   (the outside world's resolver: {})",
            self.pods
                .iter()
                .find(|p| p.enrolled)
                .map_or("<netns>", |p| p.netns.as_str()),
            membrane_testbed::world::RESOLVER
        );
        println!("watch connections and DNS: membrane observe");
        println!("status / stop:            membrane local status | membrane local down");
    }

    /// The state plus what the ztunnels say now (certificates, policies, readiness).
    pub async fn live_view(&self) -> Value {
        let mut certs: BTreeMap<String, Value> = BTreeMap::new();
        let mut pins: BTreeMap<String, u64> = BTreeMap::new();
        let mut nodes = serde_json::Map::new();
        for (node, z) in &self.ztunnels {
            let dump = match membrane_testbed::http_get(z.admin, "/config_dump").await {
                Ok((200, body)) => serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
                _ => Value::Null,
            };
            for (uid, count) in dump["dns"]["pins"].as_object().into_iter().flatten() {
                pins.insert(uid.clone(), count.as_u64().unwrap_or(0));
            }
            for c in dump["certificates"].as_array().into_iter().flatten() {
                if let Some(id) = c["identity"].as_str() {
                    certs.insert(id.to_owned(), c.clone());
                }
            }
            let ready = matches!(
                membrane_testbed::http_get(z.readiness, "/healthz/ready").await,
                Ok((200, _))
            );
            nodes.insert(
                node.clone(),
                json!({
                    "ready": ready,
                    "pid": z.pid,
                    "policies": dump["policies"],
                    "trustBundleRoots": dump["trustBundleRoots"],
                }),
            );
        }
        let pods: Vec<Value> = self
            .pods
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
                if p.enrolled {
                    // The local mesh's pod UIDs are `<namespace>-<name>`.
                    let uid = format!("{}-{}", p.namespace, p.name);
                    v["dnsPins"] = json!(pins.get(&uid).copied().unwrap_or(0));
                }
                if let Some(c) = certs
                    .get(&p.identity)
                    .filter(|_| p.enrolled || p.gateway.is_some())
                {
                    v["certificate"] = json!({
                        "serial": c["serial"],
                        "expiresInSeconds": c["expires_in_seconds"],
                    });
                }
                v
            })
            .collect();
        json!({
            "running": self.daemon_alive(),
            "ready": self.ready,
            "manifests": self.manifests,
            "controller": self.controller,
            "nodes": nodes,
            "pods": pods,
        })
    }
}

/// Prints a live view as text.
pub fn print_live(live: &Value) {
    let running = live["running"].as_bool().unwrap_or(false);
    println!(
        "local mesh from {}: {}",
        live["manifests"].as_str().unwrap_or("?"),
        if running {
            "running"
        } else {
            "NOT running (run `membrane local down` to clean up)"
        }
    );
    if let Some(nodes) = live["nodes"].as_object() {
        for (node, n) in nodes {
            let policies: Vec<&str> = n["policies"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "  node {node}: ztunnel {} · policies: {}",
                if n["ready"] == true {
                    "ready"
                } else {
                    "not ready"
                },
                if policies.is_empty() {
                    "none".to_owned()
                } else {
                    policies.join(", ")
                }
            );
        }
    }
    println!(
        "\n  {:<32} {:<14} {:<15} {:<66} {:<6} cert expires in",
        "pod (netns)", "ip", "node", "identity", "pins"
    );
    for p in live["pods"].as_array().into_iter().flatten() {
        let expiry = p["certificate"]["expiresInSeconds"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s} s"));
        let identity = match (p["gateway"].as_str(), p["enrolled"] == true) {
            (Some(kind), _) => {
                format!("{} ({kind} gateway)", p["identity"].as_str().unwrap_or("?"))
            }
            (None, true) => p["identity"].as_str().unwrap_or("?").to_owned(),
            (None, false) => "(not in the mesh)".to_owned(),
        };
        let pins = p["dnsPins"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!(
            "  {:<32} {:<14} {:<15} {:<66} {pins:<6} {expiry}",
            p["netns"].as_str().unwrap_or("?"),
            p["ip"].as_str().unwrap_or("?"),
            p["node"].as_str().unwrap_or("?"),
            identity
        );
    }
}
