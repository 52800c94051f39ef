//! Tests of the discovery client: snapshots replace and deltas patch the mesh state, an invalid
//! resource rejects its whole update, and Services resolve to their ready endpoints.

use super::*;
use pb::resource_key::Kind;

fn td() -> TrustDomain {
    membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td")
}

fn wl(uid: &str, ip: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(ResourceKind::Workload(pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: "n1".into(),
            ips: vec![ip.into()],
            ..Default::default()
        })),
    }
}

fn update(snapshot: bool, upserts: Vec<pb::Resource>, removals: &[&str]) -> pb::Update {
    pb::Update {
        version: 1,
        snapshot,
        upserts,
        removals: removals
            .iter()
            .map(|n| pb::ResourceKey {
                kind: Kind::Workload as i32,
                name: (*n).into(),
            })
            .collect(),
    }
}

#[test]
fn snapshot_replaces_and_delta_patches() {
    let first = apply(
        None,
        &update(true, vec![wl("a", "10.0.0.1"), wl("b", "10.0.0.2")], &[]),
    )
    .expect("snapshot");
    let second = apply(
        Some(&first),
        &update(false, vec![wl("c", "10.0.0.3")], &["a"]),
    )
    .expect("delta");
    let built = build(&second, &td()).expect("valid");
    assert!(built.state.by_uid("a").is_none());
    assert!(built.state.by_uid("b").is_some() && built.state.by_uid("c").is_some());
    // A new snapshot drops what it does not name (removals made while away).
    let third =
        apply(Some(&second), &update(true, vec![wl("c", "10.0.0.3")], &[])).expect("snapshot");
    assert_eq!(third.len(), 1);
    assert!(matches!(
        apply(None, &update(false, vec![], &[])),
        Err(UpdateError::NoSnapshot)
    ));
}

#[test]
fn invalid_resources_reject_the_whole_update() {
    for bad in [
        wl("x", "not-an-ip"),
        pb::Resource { kind: None },
        pb::Resource {
            kind: Some(ResourceKind::Workload(pb::Workload {
                uid: "y".into(),
                namespace: "Bad_NS".into(),
                service_account: "sa".into(),
                ..Default::default()
            })),
        },
        pb::Resource {
            kind: Some(ResourceKind::Workload(pb::Workload {
                uid: "z".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                plaintext_udp_ports: vec![53, 0],
                ..Default::default()
            })),
        },
        pb::Resource {
            kind: Some(ResourceKind::Service(pb::Service {
                namespace: "ns".into(),
                name: "s".into(),
                vips: vec!["10.96.0.1".into()],
                ports: vec![pb::ServicePort {
                    name: String::new(),
                    port: 70000,
                    target_port: 80,
                }],
                endpoints: vec![],
            })),
        },
    ] {
        let result = apply(None, &update(true, vec![wl("a", "10.0.0.1"), bad], &[]))
            .and_then(|h| build(&h, &td()).map(|_| ()));
        assert!(result.is_err());
    }
    // Two workloads claiming one IP (hostNetwork pods, a reused IP): the update still
    // applies; the IP stays with one owner.
    let held = apply(
        None,
        &update(true, vec![wl("a", "10.0.0.1"), wl("b", "10.0.0.1")], &[]),
    )
    .expect("applies");
    let built = build(&held, &td()).expect("one clash does not freeze discovery");
    let owner = built
        .state
        .by_ip("10.0.0.1".parse().expect("ip"))
        .expect("owner");
    assert_eq!(owner.uid, "a");
    assert!(built.state.by_uid("b").is_some_and(|b| b.ips.is_empty()));
}

#[test]
fn services_resolve_to_ready_endpoints() {
    let svc = pb::Resource {
        kind: Some(ResourceKind::Service(pb::Service {
            namespace: "ns".into(),
            name: "store".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec![
                pb::Endpoint {
                    ip: "10.0.0.1".into(),
                    ready: true,
                    ..Default::default()
                },
                pb::Endpoint {
                    ip: "10.0.0.2".into(),
                    ready: false,
                    ..Default::default()
                },
            ],
        })),
    };
    let held = apply(None, &update(true, vec![wl("a", "10.0.0.1"), svc], &[])).expect("ok");
    let built = build(&held, &td()).expect("valid");
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    for _ in 0..20 {
        let (dst, w) = built.state.resolve(vip);
        assert_eq!(dst, "10.0.0.1:8080".parse().expect("addr"));
        assert_eq!(w.map(|w| w.uid.clone()).as_deref(), Some("a"));
    }
    let other: SocketAddr = "10.96.0.10:81".parse().expect("addr");
    assert_eq!(built.state.resolve(other), (other, None));
}
