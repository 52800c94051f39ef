//! The CNI plugin and the node integration end to end: the real `membrane-cni` binary run
//! exactly as a container runtime runs it (inside the node's network namespace, `CNI_*`
//! variables, the network configuration with a chained `prevResult` on stdin), against the
//! real ztunnels and controller of a two-node mesh in network namespaces.
//!
//! Needs `cargo build -p membrane-cni -p membrane-ztunnel` first (the binaries are looked up
//! next to the ztunnel's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use membrane_tests::cni::{captured, cni, cni_env, net_conf, prev_result, run_plugin};
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping, socket_in_netns};
use membrane_tests::netns::Netns;
use serde_json::{Value, json};

const PORT: u16 = 8080;

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
    let mesh = Mesh::start(MeshSpec::two_nodes(
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
        let run = cni(&mesh, "ADD", pod, true).await?;
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
    let run = cni(&mesh, "CHECK", "store", true).await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");

    // ADD of a pod outside the mesh succeeds at once (its namespace has no mesh workload: no
    // wait for the controller), is remembered, and is not captured.
    let run = cni(&mesh, "ADD", "legacy", true).await?;
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
    let run = cni(&mesh, "CHECK", "legacy", true).await?;
    assert!(run.ok(), "{run:?}");

    // A late DEL of an older sandbox of the same pod (its own namespace, not the one the pod
    // is enrolled in) leaves the running pod captured.
    let node = mesh.def("store").node.clone();
    let mut stale = cni_env(&mesh, "DEL", "store")?;
    for (k, v) in &mut stale {
        match k.as_str() {
            "CNI_NETNS" => *v = mesh.netns_path("legacy").display().to_string(),
            "CNI_CONTAINERID" => *v = "sandbox-store-previous".into(),
            _ => {}
        }
    }
    let conf = net_conf(&mesh, &node, "store", true)
        .to_string()
        .into_bytes();
    let run = run_plugin(&mesh, &node, stale, conf).await?;
    assert!(run.ok(), "{run:?}");
    ensure!(
        enrolled(listed(&mesh, "store").await?.as_ref()) && captured(&mesh, "store")?,
        "a DEL of another sandbox uncaptured the running pod"
    );

    // DEL unenrolls: no table, no listener left in the pod; the pod is forgotten.
    let run = cni(&mesh, "DEL", "store", true).await?;
    assert!(run.ok() && run.stdout.is_empty(), "{run:?}");
    assert!(!captured(&mesh, "store")?, "capture table left after DEL");
    let ss = mesh.testbed.exec(mesh.pod("store"), &["ss", "-Htln"])?;
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(!ss.contains(":1500"), "listeners left after DEL: {ss}");
    assert_eq!(listed(&mesh, "store").await?, None);
    // A second DEL, and a DEL of a container nobody knows (no namespace any more), succeed.
    let run = cni(&mesh, "DEL", "store", true).await?;
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
    let conf = net_conf(&mesh, "node-b", "store", true)
        .to_string()
        .into_bytes();
    let run = run_plugin(&mesh, "node-b", no_command, conf).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.json()?["code"], 4);
    let mut old = net_conf(&mesh, "node-b", "store", true);
    old["cniVersion"] = json!("0.2.0");
    let run = run_plugin(&mesh, "node-b", add.clone(), old.to_string().into_bytes()).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.json()?["code"], 1);
    assert!(!captured(&mesh, "store")?, "a failed ADD captured the pod");

    // No ztunnel: fail closed with a message naming the socket and the way out; with
    // failClosed false the pod starts (uncaptured) and stderr says why.
    let absent = mesh.path().join("no-ztunnel.sock");
    let mut conf = net_conf(&mesh, "node-b", "store", true);
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
    let mesh = Mesh::start(MeshSpec::two_nodes(
        vec![
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-a"),
            PodDef::new("batch", "legacy", "batch", "node-b"),
        ],
        &["data"],
    ))
    .await?;
    let run = cni(&mesh, "ADD", "store", true).await?;
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
    let run = cni(&mesh, "ADD", "store", true).await?;
    assert!(run.ok(), "{run:?}");
    reach_from(node_b.netns_path(), dst)
        .await
        .context("after the second ADD")?;
    let run = cni(&mesh, "CHECK", "store", true).await?;
    assert!(run.ok(), "{run:?}");

    // DEL takes the address out of the node's set.
    let run = cni(&mesh, "DEL", "store", true).await?;
    assert!(run.ok(), "{run:?}");
    let set = node_b.exec(&["nft", "list", "set", "ip", "membrane-probes", "pods"])?;
    let set = String::from_utf8_lossy(&set.stdout).into_owned();
    assert!(!set.contains(&mesh.ip("store").to_string()), "{set}");
    Ok(())
}

/// Rewrites the Namespace `ns` in the controller's `mesh.yaml` with or without the mesh label.
fn label_namespace(mesh: &Mesh, ns: &str, in_mesh: bool) -> anyhow::Result<()> {
    let path = mesh.ca().manifests_dir().join("mesh.yaml");
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
    mesh.ca()
        .write_manifest("mesh.yaml", &text.replacen(&from, &to, 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_namespace_label_captures_and_releases_running_pods() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(MeshSpec::two_nodes(
        vec![
            PodDef::new("trainer", "training", "trainer", "node-a"),
            PodDef::new("worker", "batch", "worker", "node-b"),
        ],
        &["training"],
    ))
    .await?;
    for pod in ["trainer", "worker"] {
        let run = cni(&mesh, "ADD", pod, true).await?;
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
    let mut mesh = Mesh::start(MeshSpec::two_nodes(
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

/// A namespace the ztunnel knows under one pod's UID is never given another workload's
/// identity by the `--netns-dir` scan, whatever addresses it carries: here a non-mesh pod
/// carries a mesh workload's address on its own interface (a recycled address, or one a pod
/// with `NET_ADMIN` added), and the workload's own namespace is gone from the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn the_scan_never_enrolls_a_workload_into_a_namespace_known_as_another_pod()
-> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let dir = tempfile::tempdir()?;
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("store", "data", "feature-store", "node-b"),
            PodDef::new("legacy", "legacy", "legacy", "node-b"),
        ],
        &["data"],
    );
    spec.ztunnel_args = vec!["--netns-dir".into(), dir.path().display().to_string()];
    let mesh = Mesh::start(spec).await?;
    // The non-mesh pod is told to its ztunnel as the CNI plugin tells it.
    let run = cni(&mesh, "ADD", "legacy", true).await?;
    assert!(run.ok(), "{run:?}");
    let entry = listed(&mesh, "legacy").await?.context("legacy")?;
    assert_eq!(entry["enrolled"], false, "{entry}");
    // It takes the store's address on its eth0; the node's directory holds only its namespace.
    let store_ip = format!("{}/32", mesh.ip("store"));
    let out = mesh.testbed.exec(
        mesh.pod("legacy"),
        &["ip", "addr", "add", &store_ip, "dev", "eth0"],
    )?;
    ensure!(out.status.success(), "ip addr add: {out:?}");
    std::os::unix::fs::symlink(mesh.netns_path("legacy"), dir.path().join("cni-legacy"))?;

    let deadline = Instant::now() + Duration::from_secs(20);
    while membrane_tests::ztunnel_metric(
        &mesh,
        "node-b",
        "membrane_netns_scan_skipped_total",
        &[r#"reason="known_pod""#],
    )
    .await?
        < 1.0
    {
        if Instant::now() > deadline {
            bail!(
                "the known namespace was not skipped; store: {:?}",
                listed(&mesh, "store").await?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        listed(&mesh, "store").await?,
        None,
        "store enrolled into legacy"
    );
    assert!(!captured(&mesh, "legacy")?, "legacy captured as the store");
    let entry = listed(&mesh, "legacy").await?.context("legacy")?;
    assert_eq!(entry["enrolled"], false, "{entry}");
    Ok(())
}
