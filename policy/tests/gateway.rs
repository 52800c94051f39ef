//! The Gateway API shape of ingress: validation with field paths, and the routing table of one
//! gateway (by port and server name), each route accepted or refused on its own.

use membrane_policy::gateway::{IngressTable, Miss, RefusalReason, parse_gateway_config};

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: membrane-system}
spec:
  gatewayClassName: membrane
  listeners:
  - name: tls
    port: 443
    protocol: TLS
    hostname: "*.models.example"
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}, kinds: [{kind: TLSRoute}]}
  - name: raw
    port: 9000
    protocol: TCP
    allowedRoutes: {namespaces: {from: All}}
  - name: local-only
    port: 9100
    protocol: TCP
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: model-api, namespace: inference}
spec:
  parentRefs: [{name: ingress, namespace: membrane-system, sectionName: tls}]
  hostnames: [api.models.example]
  rules: [{backendRefs: [{name: model-server, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: any-model, namespace: inference}
spec:
  parentRefs: [{name: ingress, namespace: membrane-system}]
  hostnames: ["*.models.example"]
  rules: [{backendRefs: [{name: model-fallback, port: 8443}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: raw-features, namespace: data}
spec:
  parentRefs: [{name: ingress, namespace: membrane-system, port: 9000}]
  rules: [{backendRefs: [{name: feature-store, port: 9000}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: not-allowed-here, namespace: data}
spec:
  parentRefs: [{name: ingress, namespace: membrane-system, sectionName: local-only}]
  rules: [{backendRefs: [{name: feature-store, port: 9000}]}]
"#;

fn services(namespace: &str, name: &str) -> Option<Vec<u16>> {
    match (namespace, name) {
        ("inference", "model-server" | "model-fallback") => Some(vec![8443]),
        ("data", "feature-store") => Some(vec![9000]),
        _ => None,
    }
}

#[test]
fn connections_are_routed_by_port_and_server_name() {
    let config = parse_gateway_config(GATEWAY).expect("valid");
    assert_eq!((config.gateways.len(), config.routes.len()), (1, 4));
    let built = IngressTable::build(&config.gateways[0], &config.routes, services);
    let table = built.table;
    assert_eq!(table.gateway(), "membrane-system/ingress");
    let exact = table.route(443, Some("api.models.example")).expect("exact");
    assert_eq!(exact.route, "inference/model-api");
    assert_eq!(exact.backends[0].service, "model-server");
    let wild = table
        .route(443, Some("llama.models.example"))
        .expect("wildcard");
    assert_eq!(wild.route, "inference/any-model");
    assert_eq!(
        table.route(443, Some("evil.example")),
        Err(Miss::UnknownSni)
    );
    assert_eq!(table.route(443, None), Err(Miss::NoSni));
    assert_eq!(table.route(80, None), Err(Miss::UnknownPort));
    let raw = table.route(9000, None).expect("tcp");
    assert_eq!(raw.route, "data/raw-features");
    // A listener that takes only its own namespace's routes refuses the data namespace's.
    assert_eq!(table.route(9100, None), Err(Miss::NoRoute));
    assert_eq!(built.accepted.len(), 3);
    assert_eq!(built.refused.len(), 1, "{:?}", built.refused);
    assert_eq!(built.refused[0].key(), "data/not-allowed-here");
    assert_eq!(
        built.refused[0].reason,
        RefusalReason::NotAllowedByListeners
    );
}

#[test]
fn the_wire_form_builds_the_same_table_and_refuses_garbage_with_its_path() {
    use membrane_policy::gateway::wire::{from_wire, to_wire};
    let config = parse_gateway_config(GATEWAY).expect("valid");
    let gateway = &config.gateways[0];
    let direct = IngressTable::build(gateway, &config.routes, services);
    // Only the accepted routes go on the wire; they build again without a refusal.
    let routes: Vec<_> = direct.accepted.iter().collect();
    let wire = to_wire(gateway, &routes);
    assert_eq!(wire.routes.len(), 3);
    let (back, back_routes) = from_wire(&wire).expect("reads back");
    assert_eq!(back.listeners, gateway.listeners);
    let rebuilt = IngressTable::build(&back, &back_routes, services);
    assert!(rebuilt.refused.is_empty(), "{:?}", rebuilt.refused);
    let (direct, rebuilt) = (direct.table, rebuilt.table);
    for (port, sni) in [
        (443, Some("api.models.example")),
        (443, Some("llama.models.example")),
        (443, Some("evil.example")),
        (443, None),
        (9000, None),
        (9100, None),
        (80, None),
    ] {
        assert_eq!(
            direct.route(port, sni),
            rebuilt.route(port, sni),
            "{port} {sni:?}"
        );
    }
    let mut bad = wire.clone();
    bad.routes[2].backends[0].port = 70_000;
    let e = from_wire(&bad).expect_err("port");
    assert_eq!(e.path, "routes[2].backends[0].port");
    let mut bad = wire.clone();
    bad.listeners[0].hostname = "*.*.example".into();
    assert_eq!(
        from_wire(&bad).expect_err("host").path,
        "listeners[0].hostname"
    );
    let mut bad = wire;
    bad.listeners[1].port = bad.listeners[0].port;
    assert!(from_wire(&bad).is_err());
}

#[test]
fn a_route_to_a_service_that_does_not_exist_is_left_out_with_its_field_and_the_rest_served() {
    let config = parse_gateway_config(GATEWAY).expect("valid");
    let missing = |namespace: &str, name: &str| {
        (name != "feature-store")
            .then(|| services(namespace, name))
            .flatten()
    };
    let built = IngressTable::build(&config.gateways[0], &config.routes, missing);
    let refused: Vec<_> = built
        .refused
        .iter()
        .filter(|r| r.reason != RefusalReason::NotAllowedByListeners)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].reason, RefusalReason::BackendNotFound);
    assert_eq!(refused[0].errors[0].object, "TCPRoute data/raw-features");
    assert_eq!(
        refused[0].errors[0].path,
        "spec.rules[0].backendRefs[0].name"
    );
    assert_eq!(built.table.route(9000, None), Err(Miss::NoRoute));
    let exact = built.table.route(443, Some("api.models.example"));
    assert_eq!(exact.expect("still served").route, "inference/model-api");

    // Every route refused: the table is empty, its listeners still there.
    let wrong_port = |namespace: &str, name: &str| services(namespace, name).map(|_| vec![1]);
    let built = IngressTable::build(&config.gateways[0], &config.routes, wrong_port);
    assert!(built.accepted.is_empty());
    assert!(
        built
            .refused
            .iter()
            .all(|r| r.reason == RefusalReason::BackendPortNotFound
                || r.reason == RefusalReason::NotAllowedByListeners),
        "{:?}",
        built.refused
    );
    assert!(
        built
            .refused
            .iter()
            .flat_map(|r| &r.errors)
            .all(|e| e.path.ends_with(".port") || e.path == "spec.parentRefs"),
        "{:?}",
        built.refused
    );
    assert_eq!(built.table.ports().collect::<Vec<_>>(), [443, 9000, 9100]);
    assert_eq!(
        built.table.route(443, Some("api.models.example")),
        Err(Miss::UnknownSni)
    );
    assert_eq!(built.table.route(9000, None), Err(Miss::NoRoute));
}

#[test]
fn competing_routes_lose_to_the_older_and_names_outside_the_listener_are_refused() {
    let text = format!(
        "{GATEWAY}---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: second, namespace: data}}
spec:
  parentRefs: [{{name: ingress, namespace: membrane-system, sectionName: raw}}]
  rules: [{{backendRefs: [{{name: feature-store, port: 9000}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: elsewhere, namespace: inference}}
spec:
  parentRefs: [{{name: ingress, namespace: membrane-system}}]
  hostnames: [api.other.example, llama.models.example]
  rules: [{{backendRefs: [{{name: model-server, port: 8443}}]}}]
"
    );
    let config = parse_gateway_config(&text).expect("each document is valid");
    let built = IngressTable::build(&config.gateways[0], &config.routes, services);
    let found: Vec<(String, RefusalReason, String)> = built
        .refused
        .iter()
        .flat_map(|r| {
            r.errors
                .iter()
                .map(|e| (e.object.clone(), r.reason, e.path.clone()))
        })
        .collect();
    assert!(
        found.contains(&(
            "TCPRoute data/second".into(),
            RefusalReason::PortConflict,
            "spec.parentRefs".into()
        )),
        "{found:?}"
    );
    assert!(
        found.contains(&(
            "TLSRoute inference/elsewhere".into(),
            RefusalReason::HostnameOutsideListener,
            "spec.hostnames[0]".into()
        )),
        "{found:?}"
    );
    // A route is taken whole or not: the refused one's other name is not served either.
    let llama = built.table.route(443, Some("llama.models.example"));
    assert_eq!(llama.expect("wildcard").route, "inference/any-model");
    assert_eq!(
        built.table.route(9000, None).expect("tcp").route,
        "data/raw-features"
    );
}

#[test]
fn what_membrane_does_not_do_is_refused_by_name_with_its_path() {
    let bad = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: membrane-system}
spec:
  gatewayClassName: membrane
  listeners:
  - {name: web, port: 80, protocol: HTTP}
  - {name: tls, port: 443, protocol: TLS, tls: {mode: Terminate}}
  - {name: ok, port: 9001, protocol: TCP}
  - {name: dup, port: 9001, protocol: TCP}
  - {name: sel, port: 9000, protocol: TCP, allowedRoutes: {namespaces: {from: Selector, selector: {}}}}
  - {name: big, port: 70000, protocol: TCP}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: r, namespace: inference}
spec:
  parentRefs: [{name: ingress, namespace: membrane-system}, {name: other, namespace: "bad%ns", sectionName: "Not_A_Name"}]
  rules: [{backendRefs: [{name: model-server, namespace: data, port: 8443}, {name: svc-x, kind: Pod, port: 1}, {name: svc-y}]}]
---
apiVersion: gateway.networking.k8s.io/v9
kind: TCPRoute
metadata: {name: old, namespace: data}
spec: {}
"#;
    let errors = parse_gateway_config(bad).expect_err("refused");
    let paths: Vec<String> = errors
        .iter()
        .map(|e| format!("{} {}", e.object, e.path))
        .collect();
    for want in [
        "Gateway membrane-system/ingress spec.listeners[0].protocol",
        "Gateway membrane-system/ingress spec.listeners[1].tls.mode",
        "Gateway membrane-system/ingress spec.listeners[3].port",
        "Gateway membrane-system/ingress spec.listeners[4].allowedRoutes.namespaces.selector",
        "Gateway membrane-system/ingress spec.listeners[5].port",
        "TLSRoute inference/r spec.hostnames",
        "TLSRoute inference/r spec.parentRefs[1].namespace",
        "TLSRoute inference/r spec.parentRefs[1].sectionName",
        "TLSRoute inference/r spec.rules[0].backendRefs[0].namespace",
        "TLSRoute inference/r spec.rules[0].backendRefs[1]",
        "TLSRoute inference/r spec.rules[0].backendRefs[2].port",
        "TCPRoute data/old apiVersion",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "missing {want}: {paths:#?}"
        );
    }
    // Unknown fields and garbage never pass or panic.
    let unknown = GATEWAY.replace(
        "gatewayClassName: membrane",
        "gatewayClassName: membrane\n  infrastructure: {}",
    );
    let errors = parse_gateway_config(&unknown).expect_err("unknown field");
    assert_eq!(errors[0].path, "spec.infrastructure", "{errors:?}");
    assert!(parse_gateway_config("{{{").is_err());
    assert!(
        parse_gateway_config("kind: Pod\napiVersion: v1\n")
            .expect("others skipped")
            .gateways
            .is_empty()
    );
}
