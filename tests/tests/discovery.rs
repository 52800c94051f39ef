//! The controller's discovery stream end to end: the directory source, one ztunnel process per
//! node in network namespaces, the real controller over TLS.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use membrane_tests::mesh::{Mesh, MeshSpec, PodDef, ping};

const PORT: u16 = 8080;

fn spec(policies: String) -> MeshSpec {
    MeshSpec {
        policies,
        ..MeshSpec::two_nodes(
            vec![
                PodDef::new("trainer", "training", "trainer", "node-a"),
                PodDef::new("etl", "data", "etl", "node-a"),
                PodDef::new("store", "data", "feature-store", "node-b"),
            ],
            &["training", "data"],
        )
    }
}

/// An ALLOW policy on the store: only the given service accounts (of any namespace) on 8080.
fn store_allows(accounts: &[&str]) -> String {
    let principals: Vec<String> = accounts
        .iter()
        .map(|a| format!("\"cluster.local/ns/{a}\""))
        .collect();
    format!(
        "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: store-clients, namespace: data}}\nspec:\n  selector: {{matchLabels: {{app: store}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [{}]}}}}]\n    to: [{{operation: {{ports: [\"{PORT}\"]}}}}]\n",
        principals.join(", ")
    )
}

const MESH_WIDE: &str = "---\napiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit-all, namespace: membrane-system}\nspec:\n  action: AUDIT\n  rules: [{}]\n";

/// Connects from `pod` to `dst` and exchanges one ping.
async fn reach(mesh: &Mesh, pod: &str, dst: SocketAddr) -> anyhow::Result<()> {
    let mut s = mesh.connect_from(pod, dst).await?;
    ping(&mut s).await
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn workload_uids(dump: &serde_json::Value) -> Vec<String> {
    dump["workloads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w["uid"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls every 10 ms until `check` holds on both nodes' config dumps; returns how long it took.
async fn until_dumps(
    mesh: &Mesh,
    limit: Duration,
    check: impl Fn(&str, &serde_json::Value) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for node in ["node-a", "node-b"] {
            all &= check(node, &mesh.config_dump(node).await?);
        }
        if all {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn manifest_edits_reach_every_ztunnel_and_broken_files_change_nothing() -> anyhow::Result<()>
{
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec(String::new())).await?;
    until_dumps(&mesh, Duration::from_secs(10), |_, d| {
        workload_uids(d).len() == 3
    })
    .await?;

    // A policy edit reaches both ztunnels within a second; each gets only the policies that
    // select its own workloads (the store lives on node-b), the mesh-wide one everywhere.
    mesh.set_policies(&format!(
        "{}{MESH_WIDE}",
        store_allows(&["training/sa/trainer"])
    ))?;
    let took = until_dumps(&mesh, Duration::from_secs(5), |node, d| {
        let p = strings(&d["policies"]);
        match node {
            "node-b" => p == ["data/store-clients", "membrane-system/audit-all"],
            _ => p == ["membrane-system/audit-all"],
        }
    })
    .await?;
    assert!(took < Duration::from_secs(1), "policy took {took:?}");

    // A pod manifest deleted: its workload disappears from every ztunnel.
    let mesh_yaml = mesh.ca().manifests_dir().join("mesh.yaml");
    let text = std::fs::read_to_string(&mesh_yaml)?;
    let kept: Vec<&str> = text
        .split("---\n")
        .filter(|doc| !doc.contains("name: etl,"))
        .collect();
    assert_eq!(kept.len() + 1, text.split("---\n").count(), "etl pod found");
    mesh.ca().write_manifest("mesh.yaml", &kept.join("---\n"))?;
    let took = until_dumps(&mesh, Duration::from_secs(5), |_, d| {
        let uids = workload_uids(d);
        uids.len() == 2 && !uids.contains(&"data-etl".to_owned())
    })
    .await?;
    assert!(took < Duration::from_secs(1), "removal took {took:?}");

    // A malformed policy file: the error names the file and the field; nothing changes.
    let before = (
        mesh.config_dump("node-a").await?,
        mesh.config_dump("node-b").await?,
    );
    mesh.set_policies(&store_allows(&["training/sa/trainer"]).replace("\"8080\"", "\"99999\""))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mesh
        .ca()
        .metrics()
        .await?
        .contains("membrane_ca_source_file_errors 1")
    {
        anyhow::ensure!(Instant::now() < deadline, "broken file not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut source =
        membrane_ca::source::directory::DirectorySource::new(mesh.ca().manifests_dir());
    source.rescan()?;
    let errors: Vec<String> = source.errors().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("policies.yaml") && errors[0].contains("ports"),
        "{errors:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (node, old) in [("node-a", &before.0), ("node-b", &before.1)] {
        let now = mesh.config_dump(node).await?;
        assert_eq!(now["policies"], old["policies"], "{node}");
        assert_eq!(now["workloads"], old["workloads"], "{node}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn ztunnels_enforce_their_last_state_while_the_controller_is_away() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut mesh = Mesh::start(spec(store_allows(&["training/sa/trainer"]))).await?;
    for pod in ["trainer", "etl", "store"] {
        mesh.enroll(pod).await?;
    }
    let accepted = mesh.echo_app("store", PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), PORT);
    let mut long = mesh.connect_from("trainer", dst).await?;
    ping(&mut long).await?;
    assert!(
        reach(&mesh, "etl", dst).await.is_err(),
        "etl must be denied"
    );

    // Controller gone: tunnelled traffic, new connections and enforcement go on.
    mesh.ca_mut().pause().await;
    ping(&mut long)
        .await
        .context("long connection while away")?;
    reach(&mesh, "trainer", dst)
        .await
        .context("new connection while away")?;
    assert!(reach(&mesh, "etl", dst).await.is_err(), "still denied");
    let (status, _) = membrane_tests::http_get(mesh.ztunnels["node-b"].readiness, "/healthz/ready")
        .await
        .context("readiness while away")?;
    assert_eq!(status, 200, "a ztunnel with state stays ready");

    // A change made while it is away (etl allowed too) …
    mesh.set_policies(&store_allows(&["training/sa/trainer", "data/sa/etl"]))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        reach(&mesh, "etl", dst).await.is_err(),
        "no controller, no change"
    );

    // … applies once it is back: the streams resume.
    mesh.ca_mut().resume().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while reach(&mesh, "etl", dst).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "etl never allowed after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ping(&mut long).await?;
    assert!(accepted.load(Ordering::SeqCst) >= 3);

    // A ztunnel that starts while the controller is away is not ready until its first
    // snapshot, and becomes ready when the controller returns.
    mesh.ca_mut().pause().await;
    mesh.restart_ztunnel("node-a")?;
    let readiness = mesh.ztunnels["node-a"].readiness;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = membrane_tests::http_get(readiness, "/healthz/ready").await?;
    assert_eq!(status, 503);
    mesh.ca_mut().resume().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while membrane_tests::http_get(readiness, "/healthz/ready")
        .await?
        .0
        != 200
    {
        anyhow::ensure!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its pods were re-enrolled from the snapshot: traffic flows again.
    reach(&mesh, "trainer", dst).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn a_service_address_reaches_its_endpoint_through_the_tunnel() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mesh = Mesh::start(spec(String::new())).await?;
    for pod in ["trainer", "store"] {
        mesh.enroll(pod).await?;
    }
    mesh.ca().write_manifest(
        "service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: store, namespace: data}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: store}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    )?;
    until_dumps(&mesh, Duration::from_secs(5), |_, d| {
        d["services"]["10.96.0.10:80"]["endpoints"][0].as_str()
            == Some(&format!("{}:{PORT}", mesh.ip("store")))
    })
    .await?;
    let accepted = mesh.echo_app("store", PORT)?;
    reach(&mesh, "trainer", "10.96.0.10:80".parse()?).await?;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let record = mesh.ztunnels["node-b"]
        .wait_for_record(|r| r["direction"] == "inbound", Duration::from_secs(5))
        .await
        .ok_or_else(|| anyhow::anyhow!("no inbound record on node-b"))?;
    assert_eq!(
        record["src_identity"],
        mesh.spiffe_id("trainer"),
        "{record}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root"]
async fn local_mode_runs_from_files_without_the_stream() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let mut s = spec(store_allows(&["training/sa/trainer"]));
    s.local_files = true;
    let mesh = Mesh::start(s).await?;
    for pod in ["trainer", "etl", "store"] {
        mesh.enroll(pod).await?;
    }
    mesh.echo_app("store", PORT)?;
    let dst = SocketAddr::new(mesh.ip("store"), PORT);
    reach(&mesh, "trainer", dst).await?;
    assert!(reach(&mesh, "etl", dst).await.is_err());
    let dump = mesh.config_dump("node-b").await?;
    assert_eq!(strings(&dump["policies"]), ["data/store-clients"]);
    Ok(())
}
