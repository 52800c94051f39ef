//! `membrane local up/status/down` and `membrane observe`, run as a user would: the real
//! binary, a manifest directory, traffic between the pods' network namespaces.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use membrane_testbed::netns::run_in_netns;

fn membrane(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(args)
        .output()
        .expect("run membrane")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const PORT: u16 = 8080;

fn manifests(allowed_sa: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: lt-data, labels: {{membrane.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: lt-train, labels: {{membrane.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: lt-outside}}
---
apiVersion: v1
kind: Pod
metadata: {{name: store-0, namespace: lt-data, labels: {{app: store}}}}
spec: {{serviceAccountName: store, nodeName: node-b}}
status: {{podIP: 10.77.2.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: trainer-0, namespace: lt-train}}
spec: {{serviceAccountName: trainer, nodeName: node-a}}
---
apiVersion: v1
kind: Pod
metadata: {{name: etl-0, namespace: lt-train}}
spec: {{serviceAccountName: etl, nodeName: node-a}}
---
apiVersion: v1
kind: Pod
metadata: {{name: stranger-0, namespace: lt-outside}}
spec: {{serviceAccountName: default, nodeName: node-a}}
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata: {{name: store-readers, namespace: lt-data}}
spec:
  selector: {{matchLabels: {{app: store}}}}
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/lt-train/sa/{allowed_sa}"]}}}}]
"#
    )
}

/// Connects from the pod namespace `netns` to `dst`, sends `ping`, expects it echoed.
fn reach(netns: &str, dst: SocketAddr) -> bool {
    let path = Path::new("/run/netns").join(netns);
    run_in_netns(path, move || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        if &buf == b"ping" {
            Ok(())
        } else {
            Err(std::io::Error::other("bad echo"))
        }
    })
    .is_ok_and(|r| r.is_ok())
}

/// An echo server inside `netns` (a thread of this test process).
fn echo_in(netns: &str) {
    let path = Path::new("/run/netns").join(netns);
    let listener = run_in_netns(path, || TcpListener::bind(("0.0.0.0", PORT)))
        .expect("enter netns")
        .expect("bind");
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = membrane(&["local", "down", "--state-dir", &self.0]);
    }
}

/// `membrane local up DIR` with its own state directory and a node prefix unique to this
/// process; the output, and a guard that brings the mesh down.
fn up(dir: &Path, state_dir: &str, prefix: &str) -> (std::process::Output, Down) {
    let prefix = format!("{prefix}{}", std::process::id());
    let out = membrane(&[
        "local",
        "up",
        dir.to_str().expect("utf-8"),
        "--state-dir",
        state_dir,
        "--prefix",
        &prefix,
    ]);
    let down = Down(state_dir.to_owned());
    assert!(out.status.success(), "up failed: {}", text(&out));
    (out, down)
}

#[test]
#[ignore = "needs root"]
fn local_mesh_from_manifests_up_status_observe_down() {
    membrane_testbed::require_root().expect("needs root");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("state");
    let state_dir = state.path().to_str().expect("utf-8").to_owned();
    std::fs::write(dir.path().join("mesh.yaml"), manifests("trainer")).expect("write");
    let (up, _down) = up(dir.path(), &state_dir, "mlt");
    let prefix = format!("mlt{}", std::process::id());
    assert!(text(&up).contains("lt-train-trainer-0"), "{}", text(&up));

    // Status: every pod with its namespace name, IP, node and identity; mesh pods certified.
    let status = membrane(&["local", "status", "--json", "--state-dir", &state_dir]);
    assert!(status.status.success(), "{}", text(&status));
    let live: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let pods = live["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 4);
    let store = pods.iter().find(|p| p["name"] == "store-0").expect("store");
    assert_eq!(store["netns"], "lt-data-store-0");
    assert_eq!(store["ip"], "10.77.2.10", "status.podIP kept");
    assert_eq!(store["node"], "node-b");
    assert_eq!(
        store["identity"],
        "spiffe://cluster.local/ns/lt-data/sa/store"
    );
    assert!(store["certificate"]["expiresInSeconds"].as_u64() > Some(3600));
    let stranger = pods.iter().find(|p| p["name"] == "stranger-0").expect("p");
    assert_eq!(stranger["enrolled"], false);
    assert!(stranger["certificate"].is_null());

    // Traffic through the mesh at the pods' IPs: the trainer is allowed, etl (another
    // identity) and the non-mesh pod are not.
    echo_in("lt-data-store-0");
    let dst = SocketAddr::from(([10, 77, 2, 10], PORT));
    assert!(reach("lt-train-trainer-0", dst), "trainer must get through");
    assert!(!reach("lt-train-etl-0", dst), "etl is not allowed");
    assert!(!reach("lt-outside-stranger-0", dst), "plaintext is refused");

    // A policy edit in the directory applies to the running mesh.
    std::fs::write(dir.path().join("mesh.yaml"), manifests("etl")).expect("edit");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reach("lt-train-etl-0", dst) {
        assert!(Instant::now() < deadline, "the edited policy never applied");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !reach("lt-train-trainer-0", dst),
        "trainer no longer allowed"
    );

    // observe: the records name both identities and the deciding policy. Records reach the
    // state directory in batches, through `membrane local`: a busy machine may need a moment.
    let denied = |r: &serde_json::Value| {
        r["direction"] == "inbound"
            && r["src_identity"] == "spiffe://cluster.local/ns/lt-train/sa/etl"
            && r["authorization"]["verdict"] == "deny"
    };
    let allowed = |r: &serde_json::Value| {
        r["authorization"]["verdict"] == "allow"
            && r["authorization"]["policy"] == "lt-data/store-readers"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let observed = membrane(&[
            "observe",
            "--no-follow",
            "--json",
            "--namespace",
            "lt-data",
            "--state-dir",
            &state_dir,
        ]);
        assert!(observed.status.success(), "{}", text(&observed));
        let records: Vec<serde_json::Value> = observed
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("json line"))
            .collect();
        let complete = records.iter().any(denied) && records.iter().any(allowed);
        if complete || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(records.iter().any(denied), "{records:?}");
    assert!(records.iter().any(allowed), "{records:?}");

    // A second `up` is refused with the fix named.
    let again = membrane(&[
        "local",
        "up",
        dir.path().to_str().expect("utf-8"),
        "--state-dir",
        &state_dir,
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("membrane local down"),
        "{}",
        text(&again)
    );

    // Down removes everything.
    let down = membrane(&["local", "down", "--state-dir", &state_dir]);
    assert!(down.status.success(), "{}", text(&down));
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let listed = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !listed.contains("lt-") && !listed.contains(&prefix),
        "{listed}"
    );
}

#[test]
#[ignore = "needs root"]
fn bad_manifests_are_reported_with_file_and_field() {
    membrane_testbed::require_root().expect("needs root");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: [x]}\n",
    )
    .expect("write");
    let state = tempfile::tempdir().expect("state");
    let out = membrane(&[
        "local",
        "up",
        dir.path().to_str().expect("utf-8"),
        "--state-dir",
        state.path().to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("broken.yaml") && t.contains("spec.nodeName"),
        "{t}"
    );
}

#[test]
fn every_command_has_complete_help() {
    for args in [
        vec!["--help"],
        vec!["local", "--help"],
        vec!["local", "up", "--help"],
        vec!["local", "status", "--help"],
        vec!["local", "down", "--help"],
        vec!["observe", "--help"],
        vec!["policy", "check", "--help"],
        vec!["policy", "explain", "--help"],
        vec!["demo", "--help"],
    ] {
        let out = membrane(&args);
        assert!(out.status.success(), "{args:?}");
        let t = text(&out);
        assert!(t.contains("Usage:"), "{args:?}: {t}");
        // Every option and subcommand line carries a description.
        for line in t.lines().filter(|l| l.trim_start().starts_with("--")) {
            assert!(
                line.split_whitespace().count() > 2,
                "{args:?}: undocumented option: {line}"
            );
        }
    }
    let out = membrane(&["local", "status", "--state-dir", "/nonexistent/membrane"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("membrane local up"), "{}", text(&out));
}

/// `membrane local up` of a directory with `clusters.yaml` (examples/multicluster): two
/// clusters with their own controllers and trust domains, federated, each with an east-west
/// gateway and no route between their pod networks; A's trainer reaches B's exported model
/// server by its clusterset name (through B's gateway), A's scraper is refused by B's policy.
#[test]
#[ignore = "needs root"]
fn local_clusters_federate_and_import_each_others_services() {
    use hickory_proto::rr::RecordType;
    use membrane_testbed::world::dns_client::{addresses, resolve};
    membrane_testbed::require_root().expect("needs root");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multicluster");
    let state = tempfile::tempdir().expect("state");
    let state_dir = state.path().to_str().expect("utf-8").to_owned();
    let (_, _down) = up(&example, &state_dir, "mlc");

    let status = membrane(&["local", "status", "--json", "--state-dir", &state_dir]);
    assert!(status.status.success(), "{}", text(&status));
    let live: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let identity = |name: &str| {
        live["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["identity"].clone())
    };
    assert_eq!(
        identity("trainer-0").expect("trainer"),
        "spiffe://cluster-a.example/ns/training/sa/trainer"
    );
    assert_eq!(
        identity("model-server-0").expect("model server"),
        "spiffe://cluster-b.example/ns/inference/sa/model-server"
    );
    for cluster in ["cluster-a", "cluster-b"] {
        assert!(
            identity(&format!("east-west-{cluster}")).is_some(),
            "{cluster} has no east-west gateway: {live}"
        );
    }

    echo_in("inference-model-server-0");
    // The clusterset name, answered by the trainer's DNS capture (no resolver serves
    // 192.0.2.53).
    let trainer = Path::new("/run/netns").join("training-trainer-0");
    let server: SocketAddr = "192.0.2.53:53".parse().expect("addr");
    let name = "model-server.inference.svc.clusterset.local";
    let deadline = Instant::now() + Duration::from_secs(30);
    let vip: std::net::IpAddr = loop {
        let found = resolve(&trainer, server, name, RecordType::A).map(|m| addresses(&m));
        if let Ok([one]) = found.as_deref()
            && one.starts_with("240.240.")
        {
            break one.parse().expect("ip");
        }
        assert!(
            Instant::now() < deadline,
            "{name} never resolved: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let dst = SocketAddr::new(vip, PORT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reach("training-trainer-0", dst) {
        assert!(
            Instant::now() < deadline,
            "the trainer never reached the model server"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        !reach("monitoring-scraper-0", dst),
        "cluster B's policy must refuse A's scraper"
    );
    let down = membrane(&["local", "down", "--state-dir", &state_dir]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        text(&down).contains("nothing left behind"),
        "{}",
        text(&down)
    );
}
