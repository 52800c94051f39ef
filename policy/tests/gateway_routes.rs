//! A shared gateway's routes are accepted or refused one by one: a route of one namespace
//! that cannot be served never takes another namespace's route down with it, and of two
//! routes claiming one server name or listener the older keeps it.

use membrane_policy::gateway::{
    IngressTable, Miss, RefusalReason, Route, order::precedence, parse_gateway_config,
};

const SHARED: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: gateways}
spec:
  gatewayClassName: membrane
  listeners:
  - {name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}, allowedRoutes: {namespaces: {from: All}}}
  - {name: raw, port: 9000, protocol: TCP, allowedRoutes: {namespaces: {from: All}}}
"#;

fn route(kind: &str, namespace: &str, name: &str, created: Option<&str>, rest: &str) -> String {
    let created = created.map_or(String::new(), |c| format!(", creationTimestamp: \"{c}\""));
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: {kind}\n\
         metadata: {{name: {name}, namespace: {namespace}{created}}}\nspec:\n  \
         parentRefs: [{{name: shared, namespace: gateways}}]\n{rest}"
    )
}

fn tls(namespace: &str, name: &str, created: Option<&str>, host: &str, service: &str) -> String {
    route(
        "TLSRoute",
        namespace,
        name,
        created,
        &format!(
            "  hostnames: [{host}]\n  rules: [{{backendRefs: [{{name: {service}, port: 8443}}]}}]\n"
        ),
    )
}

fn tcp(namespace: &str, name: &str, created: Option<&str>) -> String {
    route(
        "TCPRoute",
        namespace,
        name,
        created,
        "  rules: [{backendRefs: [{name: app, port: 9000}]}]\n",
    )
}

fn services(namespace: &str, name: &str) -> Option<Vec<u16>> {
    (name == "app" && ["tenant-a", "tenant-b"].contains(&namespace)).then(|| vec![8443, 9000])
}

fn parse(routes: &[String]) -> (membrane_policy::gateway::Gateway, Vec<Route>) {
    let text = format!("{SHARED}{}", routes.concat());
    let mut config = parse_gateway_config(&text).expect("valid documents");
    (config.gateways.remove(0), config.routes)
}

#[test]
fn a_route_with_a_missing_backend_leaves_another_namespaces_route_served() {
    let (gateway, routes) = parse(&[
        tls("tenant-a", "api", None, "a.example", "app"),
        tls("tenant-b", "broken", None, "b.example", "no-such-service"),
    ]);
    let built = IngressTable::build(&gateway, &routes, services);
    let a = built
        .table
        .route(443, Some("a.example"))
        .expect("a is served");
    assert_eq!(a.route, "tenant-a/api");
    assert_eq!(
        built.table.route(443, Some("b.example")),
        Err(Miss::UnknownSni)
    );
    assert_eq!(built.accepted.len(), 1);
    assert_eq!(built.accepted[0].key(), "tenant-a/api");
    assert_eq!(built.refused.len(), 1, "{:?}", built.refused);
    let refused = &built.refused[0];
    assert_eq!(refused.key(), "tenant-b/broken");
    assert_eq!(refused.reason, RefusalReason::BackendNotFound);
    assert_eq!(refused.reason.as_str(), "backend_not_found");
    assert_eq!(refused.errors[0].object, "TLSRoute tenant-b/broken");
    assert_eq!(refused.errors[0].path, "spec.rules[0].backendRefs[0].name");
}

#[test]
fn of_two_routes_claiming_one_hostname_the_older_keeps_it() {
    // The younger route's namespace/name sorts first: only the creation time decides.
    let younger = tls(
        "tenant-a",
        "aaa-takeover",
        Some("2025-03-01T10:00:00Z"),
        "shared.example",
        "app",
    );
    let older = tls(
        "tenant-b",
        "zzz-original",
        Some("2024-01-01T00:00:00Z"),
        "shared.example",
        "app",
    );
    for order in [[&younger, &older], [&older, &younger]] {
        let (gateway, routes) = parse(&[order[0].clone(), order[1].clone()]);
        let built = IngressTable::build(&gateway, &routes, services);
        let kept = built
            .table
            .route(443, Some("shared.example"))
            .expect("kept");
        assert_eq!(kept.route, "tenant-b/zzz-original");
        assert_eq!(built.refused.len(), 1, "{:?}", built.refused);
        assert_eq!(built.refused[0].key(), "tenant-a/aaa-takeover");
        assert_eq!(built.refused[0].reason, RefusalReason::HostnameConflict);
        assert_eq!(built.refused[0].errors[0].path, "spec.hostnames[0]");
        assert!(
            built.refused[0].errors[0]
                .message
                .contains("tenant-b/zzz-original"),
            "{:?}",
            built.refused[0]
        );
    }
}

#[test]
fn equal_or_unknown_creation_times_fall_back_to_namespace_and_name() {
    let same = Some("2024-01-01T00:00:00Z");
    let (gateway, routes) = parse(&[tcp("tenant-b", "raw", same), tcp("tenant-a", "raw", same)]);
    let built = IngressTable::build(&gateway, &routes, services);
    assert_eq!(
        built.table.route(9000, None).expect("tcp").route,
        "tenant-a/raw"
    );
    assert_eq!(built.refused[0].key(), "tenant-b/raw");
    assert_eq!(built.refused[0].reason, RefusalReason::PortConflict);

    // A known creation time comes before an unknown one, whatever the names.
    let (gateway, routes) = parse(&[tcp("tenant-a", "raw", None), tcp("tenant-b", "raw", same)]);
    let built = IngressTable::build(&gateway, &routes, services);
    assert_eq!(
        built.table.route(9000, None).expect("tcp").route,
        "tenant-b/raw"
    );
    let mut sorted: Vec<&Route> = routes.iter().collect();
    sorted.sort_by(|a, b| precedence(a, b));
    assert_eq!(sorted[0].key(), "tenant-b/raw");

    // Neither known: namespace/name.
    let (gateway, routes) = parse(&[tcp("tenant-b", "raw", None), tcp("tenant-a", "raw", None)]);
    let built = IngressTable::build(&gateway, &routes, services);
    assert_eq!(
        built.table.route(9000, None).expect("tcp").route,
        "tenant-a/raw"
    );
}

#[test]
fn a_gateway_whose_every_route_is_refused_still_has_its_empty_table() {
    let (gateway, routes) = parse(&[
        tls("tenant-b", "broken", None, "b.example", "no-such-service"),
        route(
            "TCPRoute",
            "tenant-b",
            "wrong-port",
            None,
            "  rules: [{backendRefs: [{name: app, port: 1}]}]\n",
        ),
    ]);
    let built = IngressTable::build(&gateway, &routes, services);
    assert!(built.accepted.is_empty());
    let reasons: Vec<_> = built.refused.iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [
            RefusalReason::BackendNotFound,
            RefusalReason::BackendPortNotFound
        ]
    );
    assert_eq!(built.table.gateway(), "gateways/shared");
    assert_eq!(built.table.ports().collect::<Vec<_>>(), [443, 9000]);
    assert_eq!(built.table.is_tls(443), Some(true));
    assert_eq!(built.table.route(9000, None), Err(Miss::NoRoute));
}

#[test]
fn a_route_of_another_namespace_on_a_same_namespace_listener_is_refused_by_name() {
    let text = SHARED.replace(
        ", allowedRoutes: {namespaces: {from: All}}}\n  - {name: raw",
        "}\n  - {name: raw",
    );
    let text = format!(
        "{text}{}{}",
        tls("tenant-a", "api", None, "a.example", "app"),
        route(
            "TLSRoute",
            "tenant-a",
            "nowhere",
            None,
            "  hostnames: [n.example]\n  rules: [{backendRefs: [{name: app, port: 8443}]}]\n",
        )
        .replace(
            "namespace: gateways}]",
            "namespace: gateways, sectionName: nope}]"
        ),
    );
    let config = parse_gateway_config(&text).expect("valid");
    let built = IngressTable::build(&config.gateways[0], &config.routes, services);
    let reasons: Vec<_> = built
        .refused
        .iter()
        .map(|r| (r.key(), r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("tenant-a/api".to_owned(), "not_allowed_by_listeners"),
            ("tenant-a/nowhere".to_owned(), "no_matching_parent"),
        ]
    );
}

#[test]
fn a_creation_time_that_is_not_rfc3339_is_refused_with_its_path() {
    let text = format!("{SHARED}{}", tcp("tenant-a", "raw", Some("yesterday")));
    let errors = parse_gateway_config(&text).expect_err("refused");
    assert_eq!(errors[0].object, "TCPRoute tenant-a/raw");
    assert_eq!(errors[0].path, "metadata.creationTimestamp");
}
