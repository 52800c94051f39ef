//! `membrane demo --json` runs to the end and every claim it prints is backed by what
//! happened; interrupted at any point, it leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn find<'a>(steps: &'a [serde_json::Value], key: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| !s["detail"][key].is_null())
        .map(|s| &s["detail"])
        .unwrap_or_else(|| panic!("no step reports {key}"))
}

/// Runs `membrane demo --json` to the end and checks what holds with or without root: every
/// step ok, the identities, the control-plane refusals, and the clean-up. Returns the steps.
fn run_demo() -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(["demo", "--json"])
        .output()
        .expect("run membrane demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(steps.len() >= 9, "{stdout}");
    for step in &steps {
        assert_eq!(step["ok"], true, "step failed: {step}");
    }
    let text = stdout.to_string();
    assert!(text.contains("spiffe://cluster.local/ns/training/sa/trainer"));
    assert!(text.contains("PermissionDenied"));
    assert!(text.contains("Unauthenticated"));
    let removed = steps
        .last()
        .and_then(|s| s["detail"]["removed"].as_str())
        .expect("clean-up step names the directory");
    assert!(!std::path::Path::new(removed).exists());
    steps
}

/// The identity and control-plane steps hold for anyone (without root the demo skips its data
/// plane; see the root-only test below).
#[test]
fn demo_runs_clean_and_its_identity_steps_hold() {
    run_demo();
}

/// The data-plane steps: only root can build the network namespaces they run in.
#[test]
#[ignore = "needs root"]
fn demo_data_plane_steps_hold() {
    membrane_testbed::require_root().expect("needs root");
    let steps = run_demo();
    // Allowed flows allowed, and never in the clear on the wire.
    let allowed = find(&steps, "allowed");
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["markerOnWire"], false);
    assert!(allowed["packetsCaptured"].as_u64() > Some(0));
    assert_eq!(allowed["deciding policy"], "data/feature-store-readers");
    // The contrast really is visible without the mesh.
    let contrast = steps
        .iter()
        .find(|s| s["detail"]["markerOnWire"] == true)
        .expect("contrast step");
    assert_eq!(contrast["ok"], true);
    // Denied flows denied, by identity, with the deciding policy.
    let denied = find(&steps, "denied");
    assert_eq!(denied["denied"], true);
    assert_eq!(denied["policy"], "inference/deny-untrusted");
    assert_eq!(denied["appConnections"], 0);
    assert_eq!(find(&steps, "refused")["refused"], true);
    // A policy edit closed a live connection.
    let edit = find(&steps, "liveConnectionClosed");
    assert_eq!(edit["liveConnectionClosed"], true);
    assert!(edit["closedAfterMs"].as_u64() < Some(2_000), "{edit}");
    // Rotation observed under a running transfer.
    let rotation = find(&steps, "renewals");
    assert!(
        rotation["renewals"]["trainer"].as_u64() >= Some(2),
        "{rotation}"
    );
    assert!(rotation["renewals"]["feature-store"].as_u64() >= Some(2));
    assert_eq!(rotation["bytesIntact"], true);
    // Egress decided by identity and name, and a budget cutting an upload.
    let paste = find(&steps, "by literal IP");
    assert_eq!(paste["by literal IP"]["verdict"], "deny", "{paste}");
    assert_eq!(paste["by name"]["policy"], "membrane-system/no-paste-sites");
    let budget = find(&steps, "bytesArrived");
    assert!(budget["bytesArrived"].as_u64() <= Some(1 << 20), "{budget}");
    assert_eq!(budget["record"]["reason"], "budget_exhausted");
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
#[ignore = "needs root"]
fn interrupting_the_demo_leaves_nothing_behind() {
    membrane_testbed::require_root().expect("needs root");
    // Interrupt while the mesh is being built, while traffic flows, and during the transfer.
    for after_lines in [9, 11, 15] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args(["demo", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let mut work_dir = None;
        let mut lines = BufReader::new(stdout).lines();
        for _ in 0..after_lines {
            let Some(Ok(line)) = lines.next() else { break };
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            if let Some(dir) = v["detail"]["workDir"].as_str() {
                work_dir = Some(dir.to_owned());
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("SIGINT");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "demo did not stop on Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(lines);
        let prefix = format!("mbt-{pid}-");
        assert!(
            !netns_list().contains(&prefix),
            "after {after_lines} lines: namespaces left: {}",
            netns_list()
        );
        if let Some(dir) = work_dir {
            let left = processes_mentioning(&dir);
            assert!(left.is_empty(), "after {after_lines} lines: {left:?}");
            assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
        }
    }
}
