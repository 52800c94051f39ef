//! The `membrane-ca` binary as an operator runs it: flags, logs, readiness, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use membrane_ca::client::CaClient;
use membrane_identity::WorkloadIdentity;

const MANIFESTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ml\n  labels: {membrane.dev/mesh: enabled}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ml}\nspec: {serviceAccountName: worker, nodeName: node-1}\n";
const TOKEN: &str = "node-1-token-abcdefgh";

/// Kills the child on drop so a failing test leaves no process behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("manifests")).expect("mkdir");
    std::fs::write(dir.path().join("manifests/m.yaml"), MANIFESTS).expect("write");
    std::fs::write(dir.path().join("tokens"), format!("node-1 {TOKEN}\n")).expect("write");
    dir
}

fn command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_membrane-ca"));
    cmd.arg("serve")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--source-dir")
        .arg(dir.join("manifests"))
        .arg("--tokens-file")
        .arg(dir.join("tokens"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[tokio::test]
async fn binary_serves_then_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = setup();
    let mut child = Guard(
        command(dir.path())
            .args(["--pod-networks", "10.0.0.0/8,fd00::/8"])
            .spawn()?,
    );
    let stderr = child.0.stderr.take().expect("piped");
    // Read log lines until the serving line names the bound address.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pod_networks = None;
    let listen = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if value["message"] == "pod addresses outside these networks are published for no pod" {
            pod_networks = value["pod_networks"].as_str().map(str::to_owned);
        }
        if value["message"] == "membrane-ca serving" {
            break value["listen"].as_str().expect("listen field").to_owned();
        }
    };
    assert_eq!(
        pod_networks.as_deref(),
        Some(r#"["10.0.0.0/8", "fd00::/8"]"#),
        "the pod networks in force are logged at start"
    );
    let root = std::fs::read(dir.path().join("state/root-cert.pem"))?;
    let mut client = loop {
        match CaClient::connect(&format!("https://{listen}"), &root, "membrane-ca", TOKEN).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let id: WorkloadIdentity = "spiffe://cluster.local/ns/ml/sa/worker".parse()?;
    let (svid, _) = loop {
        match client.request_svid(&id, Duration::ZERO).await {
            Ok(ok) => break ok,
            // UNAVAILABLE until the first manifest scan finished.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(svid.identity(), &id);

    // A refusal is logged with its reason as a structured field.
    let other: WorkloadIdentity = "spiffe://cluster.local/ns/ml/sa/other".parse()?;
    assert!(client.request_svid(&other, Duration::ZERO).await.is_err());
    // Requests made before the first manifest scan were refused too (source not loaded):
    // look for the refusal of `other`.
    let refusal = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
        if line.contains("refused certificate request") && line.contains(&other.to_string()) {
            break serde_json::from_str::<serde_json::Value>(&line)?;
        }
    };
    assert_eq!(refusal["node"], "node-1");
    assert_eq!(refusal["identity"], other.to_string());

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let stop_deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        assert!(Instant::now() < stop_deadline, "did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[test]
fn bad_configuration_fails_with_a_clear_message() {
    let dir = setup();
    std::fs::write(dir.path().join("tokens"), "node-1 short\n").expect("write");
    let out = command(dir.path()).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokens:1"), "{stderr}");

    let out = command(dir.path())
        .args(["--trust-domain", "Not_Valid!"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust domain"));

    // Each bad pod network is refused by name: a bad prefix, a bare address (it would
    // withhold nearly every pod), host bits.
    let dir = setup();
    for (bad, why) in [
        ("10.1.0.0/33", "prefix"),
        ("10.244.0.0", "prefix length"),
        ("10.244.1.0/16", "did you mean 10.244.0.0/16"),
    ] {
        let out = output_within(
            command(dir.path()).args(["--pod-networks", &format!("10.0.0.0/8,{bad}")]),
            Duration::from_secs(20),
        );
        assert!(!out.status.success(), "{bad} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--pod-networks") && stderr.contains(bad) && stderr.contains(why),
            "{bad}: {stderr}"
        );
    }
}

/// Runs `cmd` to its end, or kills it after `limit` and fails (a controller that accepted
/// its arguments would serve forever).
fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd.spawn().expect("run");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: its arguments were accepted");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}
