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
fn check_validates_egress_policies_with_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("egress.yaml");
    std::fs::write(
        &good,
        "apiVersion: security.membrane.dev/v1\nkind: EgressPolicy\nmetadata: {name: model-hub, namespace: training}\nspec:\n  rules: [{to: [{hosts: [huggingface.co, \"*.hf.co\"], ports: [443]}]}]\n  budget: {sentBytes: 1Gi, per: 1h}\n",
    )
    .expect("write");
    let (code, out, _) = membrane(&["policy", "check", good.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok (0 policies, 1 egress policies, 0 gateways and routes)"),
        "{out}"
    );
    let bad = dir.path().join("bad-egress.yaml");
    std::fs::write(
        &bad,
        "apiVersion: security.membrane.dev/v1\nkind: EgressPolicy\nmetadata: {name: up, namespace: training}\nspec:\n  rules: [{to: [{hosts: [\"exa mple\"]}]}]\n",
    )
    .expect("write");
    let (code, out, _) = membrane(&["policy", "check", bad.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("training/up: spec.rules[0].to[0].hosts[0]"),
        "{out}"
    );
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

/// Istio's standard mesh-wide deny: `allow-nothing` in `istio-system`.
const ALLOW_NOTHING: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: istio-system\nspec: {}\n";

#[test]
fn check_warns_about_istio_root_policies_outside_the_root_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("allow-nothing.yaml");
    std::fs::write(&file, ALLOW_NOTHING).expect("write");
    let file = file.to_str().expect("utf8");
    let (code, out, _) = membrane(&["policy", "check", file]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning") && out.contains("--root-namespace istio-system"),
        "{out}"
    );
    let (code, out, _) = membrane(&["policy", "check", "--root-namespace", "istio-system", file]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[test]
fn explain_honours_the_root_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/genai"));
    for entry in std::fs::read_dir(src).expect("example") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(dir.path().join("allow-nothing.yaml"), ALLOW_NOTHING).expect("write");
    let manifests = dir.path().to_str().expect("utf8");
    let run = |root: &str| {
        membrane(&[
            "policy",
            "explain",
            "--manifests",
            manifests,
            "--port",
            "8080",
            "--from",
            "spiffe://cluster.local/ns/inference/sa/model-server",
            "--to",
            "training/trainer-0",
            "--root-namespace",
            root,
        ])
    };
    // No policy selects the trainer: only a mesh-wide allow-nothing can deny it.
    let (code, out, err) = run("membrane-system");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().next(), Some("ALLOW"), "{out}");
    let (code, out, err) = run("istio-system");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().next(), Some("DENY"), "{out}");
}

#[test]
fn explain_answers_egress_questions_with_the_deciding_egress_policy() {
    let run = |from: &str, extra: &[&str]| {
        let mut args = vec![
            "policy",
            "explain",
            "--manifests",
            "examples/genai",
            "--from",
            from,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = membrane(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("json")
    };
    let trainer = "spiffe://cluster.local/ns/training/sa/trainer";
    let v = run(trainer, &["--to-host", "cdn.hf.co", "--port", "443"]);
    assert_eq!(v["verdict"], "ALLOW", "{v}");
    assert_eq!(v["policy"], "training/model-hub");
    assert_eq!(v["matched"], "cdn.hf.co");
    // Selected by an ALLOW: anything else is denied; the root namespace's DENY wins.
    let v = run(trainer, &["--to-host", "s3.example", "--port", "443"]);
    assert_eq!(
        (&v["verdict"], &v["reason"]),
        (&"DENY".into(), &"not_allowed".into())
    );
    let v = run(trainer, &["--to-host", "paste.example", "--port", "443"]);
    assert_eq!(v["policy"], "membrane-system/no-paste-sites", "{v}");
    // The server name decides on a shared address; none at all is refused.
    let v = run(
        trainer,
        &[
            "--to-host",
            "huggingface.co",
            "--port",
            "443",
            "--sni",
            "evil.example",
        ],
    );
    assert_eq!(v["reason"], "sni_mismatch", "{v}");
    let v = run(
        trainer,
        &["--to-host", "huggingface.co", "--port", "443", "--no-sni"],
    );
    assert_eq!(v["reason"], "sni_missing", "{v}");
    // A literal address matches no host rule.
    let v = run(trainer, &["--to-ip", "198.51.100.10", "--port", "443"]);
    assert_eq!(v["verdict"], "DENY", "{v}");
    // The budget of the deciding policy is shown; a pod no ALLOW selects passes through.
    let v = run(
        "spiffe://cluster.local/ns/inference/sa/model-server",
        &["--to-host", "s3.example", "--port", "443"],
    );
    assert_eq!(v["budget"]["sent_bytes"], 1u64 << 30, "{v}");
    let v = run(
        "spiffe://cluster.local/ns/untrusted/sa/scraper",
        &["--to-host", "s3.example", "--port", "443"],
    );
    assert_eq!(
        (&v["verdict"], &v["reason"]),
        (&"PASSTHROUGH".into(), &"no_policy".into())
    );
    // Bad input is an error, not a verdict.
    let (code, _, err) = membrane(&[
        "policy",
        "explain",
        "--manifests",
        "examples/genai",
        "--from",
        trainer,
        "--to-host",
        "*.hf.co",
        "--port",
        "443",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--to-host"), "{err}");
}

#[test]
fn check_validates_gateway_api_documents_with_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ingress.yaml");
    std::fs::write(
        &file,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: membrane-system}\nspec:\n  gatewayClassName: membrane\n  listeners: [{name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}}]\n---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: model-api, namespace: membrane-system}\nspec:\n  parentRefs: [{name: ingress}]\n  hostnames: [api.models.example]\n  rules: [{backendRefs: [{name: model-server, port: 8443}]}]\n",
    )
    .expect("write");
    let (code, out, _) = membrane(&["policy", "check", file.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 gateways and routes"), "{out}");
    let bad = dir.path().join("bad-ingress.yaml");
    std::fs::write(
        &bad,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: membrane-system}\nspec:\n  gatewayClassName: membrane\n  listeners: [{name: web, port: 80, protocol: HTTP}]\n",
    )
    .expect("write");
    let (code, out, _) = membrane(&["policy", "check", bad.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Gateway membrane-system/ingress: spec.listeners[0].protocol"),
        "{out}"
    );
}

#[test]
fn ingress_shows_where_a_gateway_would_send_a_connection() {
    let run = |args: &[&str]| {
        let mut all = vec![
            "policy",
            "ingress",
            "--manifests",
            "examples/genai",
            "--gateway",
            "inference/ingress",
            "--json",
        ];
        all.extend_from_slice(args);
        let (code, out, err) = membrane(&all);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("json")
    };
    let v = run(&["--port", "443", "--sni", "API.models.example"]);
    assert_eq!(v["route"], "inference/model-api", "{v}");
    assert_eq!(v["backends"][0], "inference/model-server:80");
    assert_eq!(
        run(&["--port", "443", "--sni", "x.models.example"])["reason"],
        "unknown_sni"
    );
    assert_eq!(run(&["--port", "443"])["reason"], "no_sni");
    assert_eq!(run(&["--port", "8080"])["route"], "inference/model-raw");
    assert_eq!(run(&["--port", "1"])["reason"], "unknown_port");

    // A route that cannot be built is left out (the answer is the gateway's without it) and
    // listed with its reason and field path; exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/genai"));
    std::fs::copy(example.join("mesh.yaml"), dir.path().join("mesh.yaml")).expect("copy");
    let ingress = std::fs::read_to_string(example.join("ingress.yaml")).expect("read");
    std::fs::write(
        dir.path().join("ingress.yaml"),
        ingress.replacen(
            "{name: model-server, port: 80}",
            "{name: model-server, port: 81}",
            1,
        ),
    )
    .expect("write");
    let (code, out, _) = membrane(&[
        "policy",
        "ingress",
        "--manifests",
        dir.path().to_str().expect("utf8"),
        "--gateway",
        "inference/ingress",
        "--port",
        "443",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("REFUSED\nwhy: no_sni"), "{out}");
    assert!(
        out.contains(
            "route refused (backend_port_not_found): TLSRoute inference/model-api: spec.rules[0].backendRefs[0].port"
        ),
        "{out}"
    );
}

/// A source of a federated trust domain: no local pods, so only its SPIFFE ID counts;
/// unqualified namespaces in policies are the local trust domain's, qualified ones name it.
#[test]
fn explain_answers_for_a_source_of_a_federated_trust_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/genai"));
    for entry in std::fs::read_dir(src).expect("example") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(
        dir.path().join("federated.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: remote-trainers, namespace: data}\n\
         spec: {selector: {matchLabels: {app: feature-store}}, rules: [{from: [{source: {namespaces: [cluster-b.example/training]}}]}]}\n",
    )
    .expect("write");
    let manifests = dir.path().to_str().expect("utf8");
    let run = |from: &str, to: &str, extra: &[&str]| {
        let mut args = vec![
            "policy",
            "explain",
            "--manifests",
            manifests,
            "--port",
            "8080",
            "--from",
            from,
            "--to",
            to,
        ];
        args.extend_from_slice(extra);
        membrane(&args)
    };
    const REMOTE_SCRAPER: &str = "spiffe://cluster-b.example/ns/untrusted/sa/scraper";

    // `deny-untrusted` names the local `untrusted`: the remote one is not in it.
    let (code, out, err) = run(REMOTE_SCRAPER, "inference/model-server-0", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().next(), Some("ALLOW"), "{out}");
    assert!(
        out.contains("federated trust domain cluster-b.example"),
        "{out}"
    );
    // Evaluated in cluster-b.example, the same source is local and denied.
    let (code, out, err) = run(
        REMOTE_SCRAPER,
        "inference/model-server-0",
        &["--trust-domain", "cluster-b.example", "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"], "DENY");
    assert_eq!(v["policy"], "inference/deny-untrusted");
    assert!(
        !v["explanation"]
            .as_str()
            .is_some_and(|e| e.contains("federated")),
        "{out}"
    );

    // A qualified namespace admits the remote trainer, and only it.
    let (_, out, _) = run(
        "spiffe://cluster-b.example/ns/training/sa/trainer",
        "data/feature-store-0",
        &["--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"], "ALLOW", "{out}");
    assert_eq!(v["policy"], "data/remote-trainers");
    let (_, out, _) = run(
        "spiffe://cluster-c.example/ns/training/sa/trainer",
        "data/feature-store-0",
        &[],
    );
    assert_eq!(out.lines().next(), Some("DENY"), "{out}");
    assert!(
        out.contains("federated trust domain cluster-c.example"),
        "{out}"
    );

    let (code, _, err) = run(
        REMOTE_SCRAPER,
        "inference/model-server-0",
        &["--trust-domain", "Cluster.Local"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--trust-domain"), "{err}");
}
