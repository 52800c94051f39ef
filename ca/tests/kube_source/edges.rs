//! The edges' resources: EgressPolicies read, validated and kept at their last valid version,
//! their status, and Gateway API objects (absent CRDs block nothing).

use super::*;

#[tokio::test]
async fn egress_policies_are_read_validated_and_kept_at_their_last_valid_version() {
    let mut src = start_source(base_setup());
    state_where(&mut src.state, "synced", |_| true).await;
    let key = ("training".to_owned(), "hub".to_owned());
    let object = |generation: i64, spec: Value| {
        json!({"apiVersion": "security.membrane.dev/v1", "kind": "EgressPolicy",
               "metadata": {"name": "hub", "namespace": "training", "uid": "uid-hub",
                            "generation": generation},
               "spec": spec})
    };
    let valid = json!({"rules": [{"to": [{"hosts": ["huggingface.co"], "ports": [443]}]}]});
    src.api
        .events("egresspolicies", vec![("ADDED", object(1, valid))]);
    let state = state_where(&mut src.state, "egress policy enforced", |s| {
        s.egress_policies.contains_key(&key)
    })
    .await;
    assert_eq!(
        state.egress_policies[&key].rules[0].to[0].hosts[0].to_string(),
        "huggingface.co"
    );
    // A broken edit: reported with its field path; the last valid version stays.
    let broken = json!({"rules": [{"to": [{"hosts": ["*"]}]}]});
    src.api
        .events("egresspolicies", vec![("MODIFIED", object(2, broken))]);
    let rkey = (PolicyKind::Egress, key.clone());
    let reports = tokio::time::timeout(
        WAIT,
        src.reports.wait_for(|r| {
            r.as_ref().is_some_and(|r| {
                r.get(&rkey)
                    .is_some_and(|p| matches!(p.verdict, PolicyVerdict::Invalid { .. }))
            })
        }),
    )
    .await
    .expect("report in time")
    .expect("open")
    .clone()
    .expect("some");
    let PolicyVerdict::Invalid { errors, .. } = &reports[&rkey].verdict else {
        panic!("invalid expected");
    };
    assert_eq!(errors[0].path, "spec.rules[0].to[0].hosts[0]");
    let kept = src.state.borrow().clone().expect("published");
    assert_eq!(kept.egress_policies[&key].rules[0].to[0].ports, [443]);
    // Deleted: gone from the state.
    src.api
        .events("egresspolicies", vec![("DELETED", object(2, json!({})))]);
    state_where(&mut src.state, "egress policy removed", |s| {
        !s.egress_policies.contains_key(&key)
    })
    .await;
}

#[tokio::test]
async fn egress_policy_status_is_written_to_its_own_resource() {
    let mut setup = base_setup();
    let object = |name: &str, spec: Value| {
        json!({"apiVersion": "security.membrane.dev/v1", "kind": "EgressPolicy",
               "metadata": {"name": name, "namespace": "training", "uid": format!("uid-{name}"),
                            "generation": 2},
               "spec": spec})
    };
    setup.lists.insert(
        "egresspolicies",
        vec![
            object(
                "hub",
                json!({"rules": [{"to": [{"hosts": ["huggingface.co"]}]}]}),
            ),
            object("broken", json!({"rules": [{"to": [{"ports": [70000]}]}]})),
        ],
    );
    let mut src = start_source(setup);
    start_status(&src, status_config(15_000));
    let mut patches = Vec::new();
    while patches.len() < 2 {
        patches.push(src.api.next_seen(is_patch).await);
    }
    let find = |name: &str| {
        patches
            .iter()
            .find(|p| p.path.ends_with(&format!("/egresspolicies/{name}/status")))
            .unwrap_or_else(|| panic!("no status patch for {name}: {patches:?}"))
    };
    let hub = find("hub");
    assert!(hub.path.contains("/namespaces/training/"), "{}", hub.path);
    assert_eq!(
        condition(hub, "Accepted").expect("Accepted")["status"],
        "True"
    );
    let broken = find("broken");
    let accepted = condition(broken, "Accepted").expect("Accepted");
    assert_eq!(accepted["status"], "False");
    assert!(
        accepted["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.rules[0].to[0].ports[0]")),
        "{accepted}"
    );
    let enforced = condition(broken, "Enforced").expect("Enforced");
    assert_eq!(enforced["reason"], "DenyAllStandIn");
    assert!(
        enforced["message"]
            .as_str()
            .is_some_and(|m| m.contains("leaving the mesh")),
        "{enforced}"
    );
}

#[tokio::test]
async fn gateway_api_objects_are_read_when_installed_and_absent_crds_block_nothing() {
    // Without the CRDs (404 on their paths) the source still syncs: every other test runs so.
    let mut src = start_source(base_setup());
    let state = state_where(&mut src.state, "synced without Gateway API", |_| true).await;
    assert!(state.gateways.is_empty() && state.routes.is_empty());

    let mut setup = base_setup();
    setup.gateway_api = true;
    setup.lists.insert(
        "gateways",
        vec![
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "ingress", "namespace": "inference"},
                   "spec": {"gatewayClassName": "membrane",
                            "listeners": [{"name": "tls", "port": 443, "protocol": "TLS",
                                           "tls": {"mode": "Passthrough"}}]}}),
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": "http", "namespace": "inference"},
                   "spec": {"gatewayClassName": "membrane",
                            "listeners": [{"name": "web", "port": 80, "protocol": "HTTP"}]}}),
        ],
    );
    setup.lists.insert(
        "tlsroutes",
        vec![json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
                    "metadata": {"name": "model-api", "namespace": "inference"},
                    "spec": {"parentRefs": [{"name": "ingress"}],
                             "hostnames": ["api.models.example"],
                             "rules": [{"backendRefs": [{"name": "model-server", "port": 8443}]}]}})],
    );
    let mut src = start_source(setup);
    let state = state_where(&mut src.state, "gateways read", |s| !s.gateways.is_empty()).await;
    assert_eq!(
        state.gateways.keys().cloned().collect::<Vec<_>>(),
        [("inference".to_owned(), "ingress".to_owned())],
        "the HTTP gateway is refused"
    );
    assert!(state.routes.contains_key(&(
        "inference".to_owned(),
        "model-api".to_owned(),
        "TLSRoute"
    )));
}
