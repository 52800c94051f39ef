//! The CNI plugin and the node integration end to end: the real `membrane-cni` binary run
//! exactly as a container runtime runs it (inside the node's network namespace, `CNI_*`
//! variables, the network configuration with a chained `prevResult` on stdin), against the
//! real ztunnels and controller of a two-node mesh in network namespaces.
//!
//! Needs `cargo build -p membrane-cni -p membrane-ztunnel` first (the binaries are looked up
//! next to the ztunnel's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping, socket_in_netns, ztunnel_binary};
use membrane_tests::netns::{Netns, command_in};
use serde_json::{Value, json};

const PORT: u16 = 8080;

/// `membrane-cni`, next to the ztunnel binary.
fn cni_binary() -> anyhow::Result<PathBuf> {
    let zt = ztunnel_binary()?;
    let path = zt.with_file_name("membrane-cni");
    ensure!(
        path.exists(),
        "{} not found: build it with `cargo build -p membrane-cni`",
        path.display()
    );
    Ok(path)
}

fn spec(pods: Vec<PodDef>, mesh_namespaces: &[&str]) -> MeshSpec {
    MeshSpec {
        nodes: vec!["node-a".into(), "node-b".into()],
        pods,
        mesh_namespaces: mesh_namespaces.iter().map(|n| (*n).to_owned()).collect(),
        ..MeshSpec::default()
    }
}

/// What one run of the plugin printed, and how it exited.
#[derive(Debug)]
struct Run {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    took: Duration,
}

impl Run {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self:?}"))
    }

    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the plugin inside `node`'s network namespace (where a runtime runs it: the node's
/// host namespace) with only `env` and a PATH, `stdin` on stdin; 30 s bound.
async fn run_plugin(
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
fn cni_env(mesh: &Mesh, command: &str, pod: &str) -> anyhow::Result<Vec<(String, String)>> {
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
fn prev_result(mesh: &Mesh, pod: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": mesh.netns_path(pod)}],
        "ips": [{"address": format!("{}/32", mesh.ip(pod)), "interface": 0, "gateway": "10.77.0.1"}],
        "dns": {},
    })
}

/// The network configuration the runtime passes: the list's name and version, the plugin's
/// entry as the chart installs it, and the previous result.
fn net_conf(mesh: &Mesh, node: &str, pod: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "membrane-cni",
        "enrollSocket": mesh.ztunnels[node].enroll_socket,
        "failClosed": true,
        "prevResult": prev_result(mesh, pod),
    })
}

/// Runs `command` for `pod` (on its node) with the standard configuration.
async fn cni(mesh: &Mesh, command: &str, pod: &str) -> anyhow::Result<Run> {
    let node = mesh.def(pod).node.clone();
    let conf = net_conf(mesh, &node, pod).to_string().into_bytes();
    run_plugin(mesh, &node, cni_env(mesh, command, pod)?, conf).await
}

/// The ztunnel's `list` entry for `pod`, if it knows the pod.
async fn listed(mesh: &Mesh, pod: &str) -> anyhow::Result<Option<Value>> {
    let def = mesh.def(pod);
    let uid = format!("{}-{}", def.namespace, def.name);
    let reply = mesh
        .enroll_request(&def.node, &json!({"op": "list"}))
        .await?;
    ensure!(reply["ok"] == true, "{reply}");
    Ok(reply["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["uid"] == uid.as_str()).cloned()))
}

/// Whether `pod`'s namespace holds the capture table.
fn captured(mesh: &Mesh, pod: &str) -> anyhow::Result<bool> {
    let out = mesh
        .testbed
        .exec(mesh.pod(pod), &["nft", "list", "table", "inet", "membrane"])?;
    Ok(out.status.success())
}

/// Polls (every 50 ms, up to `limit`) until `pod`'s `list` entry satisfies `check`.
async fn until_listed(
    mesh: &Mesh,
    pod: &str,
    limit: Duration,
    check: impl Fn(Option<&Value>) -> bool,
) -> anyhow::Result<Option<Value>> {
    let deadline = Instant::now() + limit;
    loop {
        let entry = listed(mesh, pod).await?;
        if check(entry.as_ref()) {
            return Ok(entry);
        }
        if Instant::now() > deadline {
            bail!("{pod}: condition not reached within {limit:?}; last entry {entry:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn enrolled(entry: Option<&Value>) -> bool {
    entry.is_some_and(|e| e["enrolled"] == true)
}

/// Connects to `dst` from a socket in the namespace at `netns` and exchanges one ping.
async fn reach_from(netns: PathBuf, dst: SocketAddr) -> anyhow::Result<()> {
    let socket = socket_in_netns(netns)?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst)).await??;
    ping(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn the_plugin_speaks_cni_add_check_del_version_as_a_runtime_calls_it() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-b"),
        ],
        &["training", "data"],
    ))
    .await?;

    // VERSION.
    let run = run_plugin(
        &mesh,
        "node-b",
        vec![("CNI_COMMAND".into(), "VERSION".into())],
        br#"{"cniVersion":"1.0.0"}"#.to_vec(),
    )
    .await?;
    assert!(run.ok(), "{run:?}");
    assert_eq!(
        run.json()?,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );

    // ADD of a mesh pod: captured before the plugin returns; prevResult passed through.
    for pod in ["store", "trainer"] {
        let run = cni(&mesh, "ADD", pod).await?;
        assert!(run.ok(), "{pod}: {run:?}");
        assert_eq!(run.json()?, prev_result(&mesh, pod), "{pod}");
        assert!(
            captured(&mesh, pod)?,
            "{pod} has no capture table after ADD"
        );
        let entry = listed(&mesh, pod).await?.context("not listed")?;
        assert_eq!(entry["enrolled"], true, "{entry}");
    }
    let dump = mesh.config_dump("node-b").await?;
    assert_eq!(dump["enrolled"]["data-store"], "data/store", "{dump}");
    // Captured for real: the connection crosses the nodes in HBONE, recorded on both ends.
    trainer_reaches_store_through_a_tunnel(&mesh).await?;

    // CHECK agrees.
    let run = cni(&mesh, "CHECK", "store").await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");

    // ADD of a pod outside the mesh succeeds at once (its namespace has no mesh workload: no
    // wait for the controller), is remembered, and is not captured.
    let run = cni(&mesh, "ADD", "legacy").await?;
    assert!(run.ok(), "{run:?}");
    assert_eq!(run.json()?, prev_result(&mesh, "legacy"));
    assert!(
        run.took < Duration::from_millis(1800),
        "ADD of a non-mesh pod took {:?}",
        run.took
    );
    let entry = listed(&mesh, "legacy")
        .await?
        .context("legacy not listed")?;
    assert_eq!(entry["enrolled"], false, "{entry}");
    assert_eq!(entry["mesh"], false, "{entry}");
    assert!(!captured(&mesh, "legacy")?);
    let run = cni(&mesh, "CHECK", "legacy").await?;
    assert!(run.ok(), "{run:?}");

    // DEL unenrolls: no table, no listener left in the pod; the pod is forgotten.
    let run = cni(&mesh, "DEL", "store").await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");
    assert!(!captured(&mesh, "store")?, "capture table left after DEL");
    let ss = mesh.testbed.exec(mesh.pod("store"), &["ss", "-Htln"])?;
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(!ss.contains(":1500"), "listeners left after DEL: {ss}");
    assert_eq!(listed(&mesh, "store").await?, None);
    // A second DEL, and a DEL of a container nobody knows (no namespace any more), succeed.
    let run = cni(&mesh, "DEL", "store").await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");
    let mut env = cni_env(&mesh, "DEL", "store")?;
    env.retain(|(k, _)| k != "CNI_NETNS");
    for (k, v) in &mut env {
        match k.as_str() {
            "CNI_CONTAINERID" => *v = "0123456789abcdef".into(),
            "CNI_ARGS" => {
                *v = "K8S_POD_NAMESPACE=gone;K8S_POD_NAME=gone-0;K8S_POD_UID=never-seen".into()
            }
            _ => {}
        }
    }
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "membrane-cni",
                      "enrollSocket": mesh.ztunnels["node-b"].enroll_socket});
    let run = run_plugin(&mesh, "node-b", env, conf.to_string().into_bytes()).await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");

    // Malformed input: the specification's error JSON with its code, exit status 1.
    let add = cni_env(&mesh, "ADD", "store")?;
    let run = run_plugin(&mesh, "node-b", add.clone(), b"{\"cniVersion\": ".to_vec()).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    let err = run.json()?;
    assert_eq!(err["code"], 6, "{err}");
    assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    let no_command: Vec<_> = add
        .iter()
        .filter(|(k, _)| k != "CNI_COMMAND")
        .cloned()
        .collect();
    let conf = net_conf(&mesh, "node-b", "store").to_string().into_bytes();
    let run = run_plugin(&mesh, "node-b", no_command, conf).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.json()?["code"], 4);
    let mut old = net_conf(&mesh, "node-b", "store");
    old["cniVersion"] = json!("0.2.0");
    let run = run_plugin(&mesh, "node-b", add.clone(), old.to_string().into_bytes()).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.json()?["code"], 1);
    assert!(!captured(&mesh, "store")?, "a failed ADD captured the pod");

    // No ztunnel: fail closed with a message naming the socket and the way out; with
    // failClosed false the pod starts (uncaptured) and stderr says why.
    let absent = mesh.path().join("no-ztunnel.sock");
    let mut conf = net_conf(&mesh, "node-b", "store");
    conf["enrollSocket"] = json!(absent);
    let run = run_plugin(&mesh, "node-b", add.clone(), conf.to_string().into_bytes()).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    let err = run.json()?;
    assert_eq!(err["code"], 100, "{err}");
    let msg = err["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&absent.display().to_string()) && msg.contains("failClosed"),
        "{msg}"
    );
    conf["failClosed"] = json!(false);
    let run = run_plugin(&mesh, "node-b", add, conf.to_string().into_bytes()).await?;
    assert!(run.ok(), "{run:?}");
    assert_eq!(run.json()?, prev_result(&mesh, "store"));
    assert!(run.stderr.contains("failClosed is false"), "{run:?}");
    assert!(!captured(&mesh, "store")?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn kubelet_probes_from_the_node_reach_a_captured_pod_other_plaintext_does_not()
-> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec(
        vec![
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-a"),
            PodDef::new("batch", "legacy", "batch", "node-b"),
        ],
        &["data"],
    ))
    .await?;
    let run = cni(&mesh, "ADD", "store").await?;
    assert!(run.ok(), "{run:?}");
    assert!(captured(&mesh, "store")?);
    let node_b = mesh.testbed.node("node-b").context("node-b")?.clone();
    let node_a = mesh.testbed.node("node-a").context("node-a")?.clone();
    let set = node_b.exec(&["nft", "list", "set", "ip", "membrane-probes", "pods"])?;
    let set = String::from_utf8_lossy(&set.stdout).into_owned();
    assert!(set.contains(&mesh.ip("store").to_string()), "{set}");

    let accepted = mesh.echo_app("store", PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), PORT);
    // The kubelet stand-in: a plaintext connection from the node itself.
    reach_from(node_b.netns_path(), dst)
        .await
        .context("a probe from the node must reach the application")?;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Other plaintext sources are refused: a pod outside the mesh (on the other node and on
    // this one), and another node.
    for (who, netns) in [
        ("pod legacy", mesh.netns_path("legacy")),
        ("pod batch", mesh.netns_path("batch")),
        ("node-a", node_a.netns_path()),
    ] {
        assert!(
            reach_from(netns, dst).await.is_err(),
            "{who} reached a captured pod in plaintext"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a refused source reached the app"
    );

    // The exemption is the node's SNAT: without the pod's address in the set, the node is
    // refused like anyone else; a repeated ADD (idempotent) puts it back.
    let element = format!("{{ {} }}", mesh.ip("store"));
    let out = node_b.exec(&[
        "nft",
        "delete",
        "element",
        "ip",
        "membrane-probes",
        "pods",
        &element,
    ])?;
    assert!(out.status.success(), "{out:?}");
    assert!(reach_from(node_b.netns_path(), dst).await.is_err());
    let run = cni(&mesh, "ADD", "store").await?;
    assert!(run.ok(), "{run:?}");
    reach_from(node_b.netns_path(), dst)
        .await
        .context("after the second ADD")?;
    let run = cni(&mesh, "CHECK", "store").await?;
    assert!(run.ok(), "{run:?}");

    // DEL takes the address out of the node's set.
    let run = cni(&mesh, "DEL", "store").await?;
    assert!(run.ok(), "{run:?}");
    let set = node_b.exec(&["nft", "list", "set", "ip", "membrane-probes", "pods"])?;
    let set = String::from_utf8_lossy(&set.stdout).into_owned();
    assert!(!set.contains(&mesh.ip("store").to_string()), "{set}");
    Ok(())
}

/// Rewrites the Namespace `ns` in the controller's `mesh.yaml` with or without the mesh label.
fn label_namespace(mesh: &Mesh, ns: &str, in_mesh: bool) -> anyhow::Result<()> {
    let path = mesh.ca.manifests_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&path)?;
    let plain = format!("kind: Namespace\nmetadata:\n  name: {ns}\n");
    let labelled = format!(
        "kind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{membrane.dev/mesh: enabled}}\n"
    );
    let (from, to) = if in_mesh {
        (plain, labelled)
    } else {
        (labelled, plain)
    };
    ensure!(
        text.contains(&from),
        "namespace {ns} not found as expected in:\n{text}"
    );
    mesh.ca
        .write_manifest("mesh.yaml", &text.replacen(&from, &to, 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_namespace_label_captures_and_releases_running_pods() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("worker", "batch", "worker", "node-b"),
        ],
        &["training"],
    ))
    .await?;
    for pod in ["trainer", "worker"] {
        let run = cni(&mesh, "ADD", pod).await?;
        assert!(run.ok(), "{pod}: {run:?}");
    }
    let entry = listed(&mesh, "worker")
        .await?
        .context("worker not listed")?;
    assert_eq!(entry["enrolled"], false, "{entry}");
    assert!(!captured(&mesh, "worker")?);
    let accepted = mesh.echo_app("worker", PORT)?;
    let dst = SocketAddr::new(mesh.ip("worker"), PORT);

    // Label the namespace: the running pod is captured without anything else.
    label_namespace(&mesh, "batch", true)?;
    until_listed(&mesh, "worker", Duration::from_secs(15), enrolled).await?;
    assert!(captured(&mesh, "worker")?);
    // Tunnelled and authenticated now (records are written when a connection ends).
    let mut s = mesh.connect_from("trainer", dst).await?;
    ping(&mut s).await?;
    drop(s);
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(10),
        )
        .await
        .context("no inbound HBONE record on node-b")?;
    assert_eq!(record["dst_identity"], mesh.spiffe_id("worker"), "{record}");
    assert_eq!(
        record["src_identity"],
        mesh.spiffe_id("trainer"),
        "{record}"
    );
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    let dump = mesh.config_dump("node-b").await?;
    assert_eq!(dump["enrolled"]["batch-worker"], "batch/worker", "{dump}");

    // Remove the label: the pod is released; its open tunnelled connection is closed, new
    // connections go to it directly (plaintext, uncaptured).
    label_namespace(&mesh, "batch", false)?;
    until_listed(&mesh, "worker", Duration::from_secs(15), |e| {
        e.is_some_and(|e| e["enrolled"] == false)
    })
    .await?;
    assert!(!captured(&mesh, "worker")?, "capture table left");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if ping(&mut long).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the open connection survived the pod's release"
    );
    let before = accepted.load(Ordering::SeqCst);
    let mut s = mesh.connect_from("trainer", dst).await?;
    ping(&mut s).await?;
    drop(s);
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1);
    let dst_text = dst.to_string();
    mesh.ztunnels["node-a"]
        .wait_for_record(
            |r| {
                r["direction"] == "outbound"
                    && r["transport"] == "passthrough"
                    && r["dst_addr"] == dst_text.as_str()
            },
            Duration::from_secs(10),
        )
        .await
        .context("the released pod is not reached directly")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn pods_older_than_the_ztunnel_are_found_and_captured() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = Mesh::start(spec(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-b"),
        ],
        &["training", "data"],
    ))
    .await?;
    // Node-b's runtime directory: its pods' namespaces (the testbed's /run/netns holds every
    // concurrent test's namespaces, with the same addresses, so it cannot stand in for it).
    let dir = mesh.path().join("node-b-netns");
    std::fs::create_dir(&dir)?;
    for pod in ["store", "legacy"] {
        std::os::unix::fs::symlink(mesh.netns_path(pod), dir.join(format!("cni-{pod}")))?;
    }
    assert_eq!(listed(&mesh, "store").await?, None, "nobody told node-b");
    let dir_arg = dir.display().to_string();
    mesh.restart_ztunnel_with("node-b", &["--netns-dir", &dir_arg])?;
    let entry = until_listed(&mesh, "store", Duration::from_secs(15), enrolled).await?;
    let entry = entry.context("store")?;
    assert_eq!(
        entry["netns"],
        dir.join("cni-store").display().to_string(),
        "{entry}"
    );
    assert!(captured(&mesh, "store")?);
    assert_eq!(listed(&mesh, "legacy").await?, None, "not a mesh pod");
    assert!(!captured(&mesh, "legacy")?);

    // Traffic to it is tunnelled and authenticated.
    mesh.enroll("trainer").await?;
    trainer_reaches_store_through_a_tunnel(&mesh).await?;
    Ok(())
}

/// The trainer (node-a) reaches the store's echo app (node-b) through an HBONE tunnel that
/// the store's ztunnel records with the trainer's identity.
async fn trainer_reaches_store_through_a_tunnel(mesh: &Mesh) -> anyhow::Result<()> {
    let accepted = mesh.echo_app("store", PORT)?;
    let mut s = mesh
        .connect_from("trainer", SocketAddr::new(mesh.ip("store"), PORT))
        .await?;
    ping(&mut s).await?;
    drop(s);
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(
            |r| r["direction"] == "inbound" && r["transport"] == "hbone",
            Duration::from_secs(10),
        )
        .await
        .context("no inbound access record")?;
    assert_eq!(record["src_identity"], mesh.spiffe_id("trainer"));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    Ok(())
}
