use super::*;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: training
  labels:
    membrane.dev/mesh: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: trainer-0
  namespace: training
  uid: 6f1c
spec:
  serviceAccountName: trainer
  nodeName: node-a
status:
  podIP: 10.0.0.5
---
apiVersion: security.membrane.dev/v1
kind: AuthorizationPolicy
metadata:
  name: ignored-here
"#;

#[test]
fn parses_namespaces_and_pods_and_skips_other_kinds() {
    let objects = parse_manifests(GOOD).expect("valid");
    assert_eq!(objects.len(), 2);
    let Object::Pod(pod) = &objects[1] else {
        panic!("expected a pod, got {:?}", objects[1]);
    };
    assert_eq!(pod.service_account, "trainer");
    assert_eq!(pod.node_name.as_deref(), Some("node-a"));
    assert_eq!(pod.uid, "6f1c");
    assert_eq!(
        pod.ips,
        vec!["10.0.0.5".parse::<std::net::IpAddr>().expect("ip")]
    );
}

#[test]
fn defaults_follow_kubernetes() {
    let objects =
        parse_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").expect("valid");
    let Object::Pod(pod) = &objects[0] else {
        panic!("expected a pod");
    };
    assert_eq!(pod.namespace, "default");
    assert_eq!(pod.service_account, "default");
    assert_eq!(pod.uid, "default/p");
    assert_eq!(pod.phase, PodPhase::Running);
}

#[test]
fn list_kind_is_unpacked() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n";
    assert_eq!(parse_manifests(text).expect("valid").len(), 1);
}

#[test]
fn errors_name_document_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: 5}\n",
            "document 1 (Pod p): field spec.nodeName",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: Bad_NS}\n",
            "document 2 (Pod Bad_NS/p): field metadata.namespace",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n",
            "field status.podIP",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, labels: {a: {b: c}}}\n",
            "field metadata.labels.a",
        ),
        ("apiVersion: v1\nkind: Pod\n", "missing field `metadata`"),
        ("kind: Pod\n", "missing string field apiVersion"),
        ("- a\n- b\n", "expected a mapping"),
        (
            "apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n",
            "apiVersion",
        ),
        ("a: [unclosed\n", "not valid YAML"),
    ];
    for (text, expected) in cases {
        let err = parse_manifests(text).expect_err(text).to_string();
        assert!(
            err.contains(expected),
            "{text:?}: {err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn broken_edit_keeps_last_good_version_and_delete_removes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, GOOD).expect("write");
    std::fs::write(dir.path().join(".hidden.yaml"), "not: [valid").expect("write");
    std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
    let mut source = DirectorySource::new(dir.path());
    assert!(source.rescan().expect("scan"));
    let good = source.state();
    assert_eq!(good.pods.len(), 1);
    assert!(source.errors().is_empty());

    // Break the file: the error names it, the old objects stay.
    std::fs::write(&file, GOOD.replace("node-a", "[broken")).expect("write");
    assert!(!source.rescan().expect("scan"));
    assert_eq!(source.state(), good);
    let errors = source.errors();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("pods.yaml"), "{}", errors[0]);

    // A second file with a partial error changes nothing either.
    let other = dir.path().join("more.yaml");
    std::fs::write(
        &other,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n---\nkind: Pod\n",
    )
    .expect("write");
    source.rescan().expect("scan");
    assert_eq!(source.state(), good);

    // Fix it: applied.
    std::fs::write(&file, GOOD.replace("node-a", "node-b")).expect("write");
    assert!(source.rescan().expect("scan"));
    let pod = source.state().pods.values().next().cloned().expect("pod");
    assert_eq!(pod.node_name.as_deref(), Some("node-b"));

    // Delete: gone.
    std::fs::remove_file(&file).expect("rm");
    assert!(source.rescan().expect("scan"));
    assert!(source.state().pods.is_empty());
}

#[test]
fn unreadable_directory_is_an_error() {
    let mut source = DirectorySource::new("/nonexistent/membrane/manifests");
    assert!(matches!(source.rescan(), Err(SourceError::Io { .. })));
}
