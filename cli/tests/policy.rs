//! `membrane policy check` and `explain` as a user runs them, against the GenAI example.

use std::process::Command;

fn membrane(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_membrane"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run membrane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_errors_with_paths_and_fails() {
    let (code, out, _) = membrane(&["policy", "check", "examples/genai/policies.yaml"]);
    assert_eq!(code, 0, "{out}");
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  rules:\n  - to: [{operation: {ports: [\"0\"], methods: [GET]}}]\n    when: [{key: request.nope, values: [a]}, {key: source.wat, values: [b]}]\n",
    )
    .expect("write");
    let (code, out, _) = membrane(&["policy", "check", bad.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("spec.rules[0].to[0].operation.ports[0]"),
        "{out}"
    );
    assert!(out.contains("spec.rules[0].when[1]"), "{out}");
}

#[test]
fn explain_gives_verdict_and_deciding_policy() {
    let base = [
        "policy",
        "explain",
        "--manifests",
        "examples/genai",
        "--port",
        "8080",
    ];
    let run = |from: &str, to: &str, json: bool| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--from", from, "--to", to]);
        if json {
            args.push("--json");
        }
        membrane(&args)
    };
    let (code, out, _) = run(
        "spiffe://cluster.local/ns/training/sa/trainer",
        "data/feature-store-0",
        false,
    );
    assert_eq!(code, 0);
    assert_eq!(out.lines().next(), Some("ALLOW"), "{out}");
    assert!(out.contains("data/feature-store-readers"), "{out}");

    let (code, out, _) = run(
        "spiffe://cluster.local/ns/inference/sa/model-server",
        "data/feature-store-0",
        true,
    );
    assert_eq!(code, 0, "a DENY verdict is not an error");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"], "DENY");
    assert!(v.get("policy").is_some());

    let (_, out, _) = run(
        "spiffe://cluster.local/ns/untrusted/sa/scraper",
        "inference/model-server-0",
        true,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"], "DENY");
    assert_eq!(v["policy"], "inference/deny-untrusted");

    let (_, out, _) = run("none", "data/feature-store-0", false);
    assert_eq!(out.lines().next(), Some("DENY"));
    assert!(out.contains("plaintext"), "{out}");

    let (code, _, err) = run("not-an-id", "data/feature-store-0", false);
    assert_ne!(code, 0);
    assert!(err.contains("--from"), "{err}");
    let (code, _, _) = run("none", "data/no-such-pod", false);
    assert_ne!(code, 0);
}
