//! `membrane demo --json` runs to the end, every step as expected, and leaves nothing behind.

use std::process::Command;

#[test]
fn demo_runs_clean_and_every_step_holds() {
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
}
