//! A captured pod as the mesh state describes it *now*: a pod whose address is published only
//! after it was captured (the kubelet writes `status.podIP` after the CNI ADD) is reached once
//! the address arrives, and a relabelled pod is decided by the policies that select its new
//! labels — new connections and the ones already open. Real ztunnels in network namespaces,
//! the controller's directory source.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};
use tokio::io::AsyncReadExt;

const PORT: u16 = 8080;

/// Refuses every connection to a pod labelled `quarantine: "true"`.
const QUARANTINE: &str = "apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {name: quarantine, namespace: shop}
spec:
  selector: {matchLabels: {quarantine: \"true\"}}
  action: DENY
  rules: [{}]
";

/// Rewrites the server's Pod document in the controller's `mesh.yaml` with `edit`.
fn edit_server(mesh: &Mesh, edit: impl Fn(&str) -> String) -> anyhow::Result<()> {
    let path = mesh.ca().manifests_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&path)?;
    let docs: Vec<String> = text
        .split("---\n")
        .map(|doc| {
            if doc.contains("kind: Pod\nmetadata: {name: server,") {
                edit(doc)
            } else {
                doc.to_owned()
            }
        })
        .collect();
    let edited = docs.join("---\n");
    anyhow::ensure!(
        edited != text,
        "the server's Pod document was not found or not changed"
    );
    mesh.ca().write_manifest("mesh.yaml", &edited)
}

/// Whether a fresh connection from the client carries a ping to the server.
async fn reaches(mesh: &Mesh) -> bool {
    let dst = SocketAddr::new(mesh.ip("server"), PORT);
    let attempt = async {
        let mut s = mesh.connect_from("client", dst).await?;
        ping(&mut s).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(()))
    )
}

/// Waits up to `within` for `reaches` to equal `want`.
async fn eventually_reaches(mesh: &Mesh, want: bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if reaches(mesh).await == want {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_captured_pod_follows_its_address_and_labels() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut spec = MeshSpec::two_nodes(
        vec![
            PodDef::new("client", "shop", "client", "node-a"),
            PodDef::new("server", "shop", "server", "node-b"),
        ],
        &["shop"],
    );
    spec.policies = QUARANTINE.to_owned();
    let mesh = Mesh::start(spec).await?;
    let _app = mesh.echo_app("server", PORT)?;
    mesh.enroll("client").await?;

    // The server's address is not published yet when it is captured.
    let status = |doc: &str| -> Option<String> {
        doc.lines()
            .find(|l| l.starts_with("status: "))
            .map(str::to_owned)
    };
    let text = std::fs::read_to_string(mesh.ca().manifests_dir().join("mesh.yaml"))?;
    let server_doc = (text.split("---\n"))
        .find(|d| d.contains("kind: Pod\nmetadata: {name: server,"))
        .context("server's Pod document")?
        .to_owned();
    let published = status(&server_doc).context("server's status")?;
    edit_server(&mesh, |doc| doc.replace(&published, "status: {}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = mesh.config_dump("node-b").await?;
        let ips = (dump["workloads"].as_array().into_iter().flatten())
            .find(|w| w["name"] == "server")
            .map(|w| w["ips"].clone());
        if ips
            .as_ref()
            .and_then(|i| i.as_array())
            .is_some_and(Vec::is_empty)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the address never left the state: {ips:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.enroll("server").await?;
    // Published now: the captured pod is reached at it.
    edit_server(&mesh, |doc| doc.replace("status: {}", &published))?;
    assert!(
        eventually_reaches(&mesh, true, Duration::from_secs(10)).await,
        "the server was never reached at the address published after its capture"
    );

    // Relabelled into quarantine: new connections are refused, and the open one is closed.
    let dst = SocketAddr::new(mesh.ip("server"), PORT);
    let mut open = mesh.connect_from("client", dst).await?;
    ping(&mut open).await?;
    edit_server(&mesh, |doc| {
        doc.replacen("labels: {", "labels: {\"quarantine\":\"true\",", 1)
    })?;
    assert!(
        eventually_reaches(&mesh, false, Duration::from_secs(10)).await,
        "new connections to the quarantined pod were still admitted"
    );
    let mut byte = [0u8; 1];
    let ended = tokio::time::timeout(Duration::from_secs(5), open.read(&mut byte)).await;
    assert!(
        matches!(ended, Ok(Ok(0) | Err(_))),
        "the open connection to the quarantined pod stayed open: {ended:?}"
    );
    Ok(())
}
