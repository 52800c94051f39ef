//! Tests of the discovery client: snapshots replace and deltas patch the mesh state, an invalid
//! resource rejects its whole update, and Services resolve to their ready endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::*;
use pb::resource::Kind as ResourceKind;
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
                clusterset: false,
                exported: false,
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
fn services_resolve_to_ready_endpoints_and_mark_exported_ones() {
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
            clusterset: false,
            exported: true,
        })),
    };
    let held = apply(None, &update(true, vec![wl("a", "10.0.0.1"), svc], &[])).expect("ok");
    let built = build(&held, &td()).expect("valid");
    // Exported: its ready endpoint is what an east-west gateway may relay to, not the other.
    assert!(built.state.is_exported("10.0.0.1".parse().expect("ip")));
    assert!(!built.state.is_exported("10.0.0.2".parse().expect("ip")));
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
    for _ in 0..20 {
        let (dst, w) = built.state.resolve(vip);
        assert_eq!(dst, "10.0.0.1:8080".parse().expect("addr"));
        assert_eq!(w.map(|w| w.uid.clone()).as_deref(), Some("a"));
    }
    let other: SocketAddr = "10.96.0.10:81".parse().expect("addr");
    assert_eq!(built.state.resolve(other), (other, None));
}

fn federated(td: &str, roots: Vec<Vec<u8>>) -> pb::Resource {
    pb::Resource {
        kind: Some(ResourceKind::FederatedBundle(pb::FederatedBundle {
            trust_domain: td.into(),
            roots_der: roots,
        })),
    }
}

#[test]
fn federated_bundles_are_built_per_trust_domain_and_never_for_the_local_one() {
    let root = membrane_testbed::OfflineCa::root("cluster B").expect("root");
    let der = root.der().to_vec();
    let held = apply(
        None,
        &update(
            true,
            vec![federated("cluster-b.example", vec![der.clone()])],
            &[],
        ),
    )
    .expect("applies");
    let built = build(&held, &td()).expect("valid");
    let [b] = built.federated.as_slice() else {
        panic!("one federated bundle: {:?}", built.federated);
    };
    assert_eq!(b.trust_domain().to_string(), "cluster-b.example");
    assert_eq!(b.roots().len(), 1);
    // The local trust domain, a bad trust domain, no roots, a root that is not a CA: the whole
    // update is refused (the last good bundles stay in force).
    for bad in [
        federated("cluster.local", vec![der.clone()]),
        federated("Not A Domain", vec![der.clone()]),
        federated("cluster-c.example", vec![]),
        federated("cluster-c.example", vec![b"garbage".to_vec()]),
    ] {
        let result = apply(None, &update(true, vec![bad], &[])).and_then(|h| build(&h, &td()));
        assert!(result.is_err(), "accepted a bad federated bundle");
    }
}

/// The index is built for the ztunnel's own trust domain: unqualified namespaces in streamed
/// policies are its namespaces, not a federated cluster's.
#[test]
fn policies_are_indexed_for_the_local_trust_domain() {
    let doc = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
               metadata: {name: p, namespace: ns}\n\
               spec: {rules: [{from: [{source: {namespaces: [training]}}]}]}\n";
    let checked = membrane_policy::parse_policies(doc).expect("valid");
    let resource = pb::Resource {
        kind: Some(ResourceKind::Authorization(pb::Authorization::from(
            &checked[0].policy,
        ))),
    };
    let held = apply(None, &update(true, vec![resource], &[])).expect("applies");
    let local = membrane_identity::spiffe_id::parse_trust_domain("cluster-a.example").expect("td");
    let built = build(&held, &local).expect("valid");
    assert_eq!(built.policy.trust_domain(), "cluster-a.example");
    let labels = BTreeMap::new();
    let verdict = |from: &str| {
        let req = membrane_policy::Request {
            source: membrane_policy::Source::from_principal(from),
            source_ip: IpAddr::from([10, 0, 0, 1]),
            remote_ip: None,
            destination_namespace: "ns",
            destination_labels: &labels,
            destination_ip: IpAddr::from([10, 0, 0, 2]),
            destination_port: 80,
        };
        membrane_policy::decide(&built.policy, &req).verdict
    };
    use membrane_policy::Verdict::{Allow, Deny};
    assert_eq!(verdict("cluster-a.example/ns/training/sa/x"), Allow);
    assert_eq!(verdict("cluster-b.example/ns/training/sa/x"), Deny);
}

/// A pod imported from a federated cluster carries that cluster's identity and is a foreign
/// HBONE destination; one that claims another trust domain but would be captured here is
/// refused, as is a bad trust domain.
#[test]
fn imported_workloads_carry_their_own_trust_domain() {
    let imported = |td: &str, foreign: bool| pb::Resource {
        kind: Some(ResourceKind::Workload(pb::Workload {
            uid: "imported/cluster-b/inference/model-server-0".into(),
            name: "model-server-0".into(),
            namespace: "inference".into(),
            service_account: "model-server".into(),
            ips: vec!["10.20.1.5".into()],
            foreign,
            trust_domain: td.into(),
            ..Default::default()
        })),
    };
    let held = apply(
        None,
        &update(true, vec![imported("cluster-b.example", true)], &[]),
    )
    .expect("applies");
    let built = build(&held, &td()).expect("valid");
    let (_, w) = built.state.resolve("10.20.1.5:8080".parse().expect("addr"));
    let w = w.expect("the imported pod is known");
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster-b.example/ns/inference/sa/model-server"
    );
    assert!(w.foreign && !w.captured());
    // The local trust domain named explicitly is the local one.
    let held = apply(
        None,
        &update(true, vec![imported("cluster.local", false)], &[]),
    )
    .expect("applies");
    assert!(build(&held, &td()).is_ok());
    for bad in [
        imported("cluster-b.example", false),
        imported("Not A Domain", true),
    ] {
        let result = apply(None, &update(true, vec![bad], &[])).and_then(|h| build(&h, &td()));
        assert!(result.is_err(), "accepted a bad imported workload");
    }
}

/// A federated peer cannot take a local pod's address, nor change the plaintext settings of
/// the local namespace that shares its namespace's name.
#[test]
fn imported_workloads_never_displace_local_ones() {
    let mut local = wl("zz-local", "10.20.1.5");
    if let Some(ResourceKind::Workload(w)) = &mut local.kind {
        w.namespace = "inference".into();
        w.plaintext_permitted = true;
        w.plaintext_udp_ports = vec![5353];
    }
    // Its uid sorts before the local one's: the order of the held map does not decide.
    let peer = pb::Resource {
        kind: Some(ResourceKind::Workload(pb::Workload {
            uid: "imported/cluster-b.example/inference/ms-0".into(),
            name: "ms-0".into(),
            namespace: "inference".into(),
            service_account: "model-server".into(),
            ips: vec!["10.20.1.5".into(), "10.20.1.6".into()],
            foreign: true,
            trust_domain: "cluster-b.example".into(),
            ..Default::default()
        })),
    };
    let held = apply(None, &update(true, vec![peer, local], &[])).expect("applies");
    let built = build(&held, &td()).expect("valid");
    let (_, owner) = built.state.resolve("10.20.1.5:80".parse().expect("addr"));
    assert_eq!(owner.expect("owned").uid, "zz-local");
    let (_, peer) = built.state.resolve("10.20.1.6:80".parse().expect("addr"));
    assert!(peer.expect("the peer keeps its other address").foreign);
    assert_eq!(
        built.state.udp_inbound("inference"),
        crate::state::UdpInbound::Accept,
        "the local namespace still permits plaintext"
    );
}

/// An imported workload behind its cluster's east-west gateway keeps the gateway; a gateway
/// on a local workload, one that is not `ip:port` or not dialable, or whose identity is not of
/// the workload's own trust domain is refused.
#[test]
fn an_east_west_gateway_is_only_a_federated_workloads_and_of_its_trust_domain() {
    let with_gateway = |td: &str, foreign: bool, address: &str, id: &str| pb::Resource {
        kind: Some(ResourceKind::Workload(pb::Workload {
            uid: "imported/cluster-b/inference/ms-0".into(),
            name: "ms-0".into(),
            namespace: "inference".into(),
            service_account: "model-server".into(),
            ips: vec!["10.20.1.5".into()],
            foreign,
            trust_domain: td.into(),
            network_gateway: Some(pb::NetworkGateway {
                address: address.into(),
                spiffe_id: id.into(),
            }),
            ..Default::default()
        })),
    };
    const GW: &str = "spiffe://cluster-b.example/ns/gw/sa/east-west";
    let good = with_gateway("cluster-b.example", true, "192.0.2.20:15008", GW);
    let held = apply(None, &update(true, vec![good], &[])).expect("applies");
    let built = build(&held, &td()).expect("valid");
    let (_, w) = built.state.resolve("10.20.1.5:8080".parse().expect("addr"));
    let gw = w.expect("known").network_gateway.clone().expect("gateway");
    assert_eq!(gw.addr.to_string(), "192.0.2.20:15008");
    assert_eq!(gw.identity.to_string(), GW);
    for bad in [
        with_gateway("", false, "192.0.2.20:15008", GW),
        with_gateway("cluster-b.example", true, "192.0.2.20", GW),
        with_gateway("cluster-b.example", true, "127.0.0.1:15008", GW),
        with_gateway("cluster-b.example", true, "192.0.2.20:0", GW),
        with_gateway(
            "cluster-b.example",
            true,
            "192.0.2.20:15008",
            "spiffe://cluster.local/ns/gw/sa/east-west",
        ),
        with_gateway("cluster-b.example", true, "192.0.2.20:15008", "not an id"),
    ] {
        let result = apply(None, &update(true, vec![bad], &[])).and_then(|h| build(&h, &td()));
        assert!(result.is_err(), "accepted a bad east-west gateway");
    }
}
