//! What a cluster exports, what an importer accepts, and the clusterset VIPs.

use super::*;
use crate::source::{Endpoint, MESH_LABEL, Namespace, Pod, Service, ServicePort};

fn td(name: &str) -> TrustDomain {
    membrane_identity::spiffe_id::parse_trust_domain(name).expect("td")
}

/// Namespace `inference` in the mesh and `plain` outside it; `model-server` (exported) with
/// a ready mesh pod, a not-ready one and a plain pod behind it, and `internal` (not
/// exported).
fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for (name, mesh) in [("inference", true), ("plain", false)] {
        let mut ns = Namespace {
            name: name.into(),
            ..Default::default()
        };
        if mesh {
            ns.labels.insert(MESH_LABEL.into(), "enabled".into());
        }
        s.namespaces.insert(name.into(), ns);
    }
    for (ns, pod, ip) in [
        ("inference", "ms-0", "10.20.1.5"),
        ("inference", "ms-1", "10.20.1.6"),
        ("plain", "web-0", "10.20.1.7"),
    ] {
        s.pods.insert(
            (ns.into(), pod.into()),
            Pod {
                namespace: ns.into(),
                name: pod.into(),
                uid: format!("uid-{pod}"),
                service_account: "model-server".into(),
                node_name: Some("node-b".into()),
                ips: vec![ip.parse().expect("ip")],
                ..Default::default()
            },
        );
    }
    let endpoint = |ip: &str, pod: &str, ready: bool| Endpoint {
        ip: ip.parse().expect("ip"),
        pod: Some(pod.into()),
        ready,
        ports: BTreeMap::new(),
    };
    for (name, exported) in [("model-server", true), ("internal", false)] {
        s.services.insert(
            ("inference".into(), name.into()),
            Service {
                namespace: "inference".into(),
                name: name.into(),
                vips: vec!["10.96.0.20".parse().expect("ip")],
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 8080,
                    target_port: 8080,
                }],
                endpoints: vec![
                    endpoint("10.20.1.5", "ms-0", true),
                    endpoint("10.20.1.6", "ms-1", false),
                ],
                exported,
            },
        );
    }
    s.services.insert(
        ("plain".into(), "web".into()),
        Service {
            namespace: "plain".into(),
            name: "web".into(),
            endpoints: vec![endpoint("10.20.1.7", "web-0", true)],
            exported: true,
            ..Default::default()
        },
    );
    s
}

#[test]
fn only_exported_services_and_their_ready_mesh_pods_are_offered() {
    let out = exports(&state(), &td("cluster-b.example"));
    assert_eq!(out.trust_domain, "cluster-b.example");
    let names: Vec<String> = (out.services.iter())
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    assert_eq!(names, ["inference/model-server", "plain/web"]);
    let ms = &out.services[0];
    assert_eq!(ms.ports.len(), 1);
    let [only] = ms.endpoints.as_slice() else {
        panic!("only the ready mesh pod: {:?}", ms.endpoints);
    };
    assert_eq!(only.pod, "ms-0");
    assert_eq!(only.ips, ["10.20.1.5"]);
    assert_eq!(only.service_account, "model-server");
    assert!(
        out.services[1].endpoints.is_empty(),
        "a pod outside the mesh is never exported"
    );
    validate(&out, &td("cluster-b.example"), &[]).expect("its own exports validate");
}

/// An address another active pod also claims is nobody's: an endpoint left without one is not
/// exported (a peer would otherwise route to whichever pod it picked).
#[test]
fn a_contested_endpoint_address_is_not_exported() {
    let mut s = state();
    let mut thief = s.pods[&("plain".to_owned(), "web-0".to_owned())].clone();
    thief.name = "thief".into();
    thief.node_name = Some("node-c".into());
    thief.ips = vec!["10.20.1.5".parse().expect("ip")];
    s.pods.insert(("plain".into(), "thief".into()), thief);
    let out = exports(&s, &td("cluster-b.example"));
    assert_eq!(out.services[0].name, "model-server");
    assert!(
        out.services[0].endpoints.is_empty(),
        "{:?}",
        out.services[0]
    );
    validate(&out, &td("cluster-b.example"), &[]).expect("still valid");
}

/// A Service without a selector has hand-written EndpointSlices, which may name a pod of the
/// Service's namespace beside an address of another pod: the address is not exported under the
/// named pod's identity (a peer would expect that identity at the other pod's address).
#[test]
fn an_endpoint_address_its_pod_does_not_hold_is_not_exported() {
    let mut s = state();
    let svc = (s.services)
        .get_mut(&("inference".to_owned(), "model-server".to_owned()))
        .expect("service");
    svc.endpoints = vec![
        Endpoint {
            ip: "10.20.1.7".parse().expect("ip"),
            pod: Some("ms-0".into()),
            ready: true,
            ports: BTreeMap::new(),
        },
        Endpoint {
            ip: "10.20.1.5".parse().expect("ip"),
            pod: Some("ms-0".into()),
            ready: true,
            ports: BTreeMap::new(),
        },
    ];
    let out = exports(&s, &td("cluster-b.example"));
    assert_eq!(out.services[0].name, "model-server");
    let [only] = out.services[0].endpoints.as_slice() else {
        panic!("one endpoint: {:?}", out.services[0].endpoints);
    };
    assert_eq!(only.pod, "ms-0");
    assert_eq!(only.ips, ["10.20.1.5"], "the pod's own address only");
}

/// An address spelled IPv4-mapped (in the pod's status, its endpoint, or both) is exported in
/// its canonical form, which an importer accepts (it refuses the mapped spelling whole).
#[test]
fn endpoint_addresses_are_exported_canonical() {
    let mut s = state();
    let pod = (s.pods)
        .get_mut(&("inference".to_owned(), "ms-0".to_owned()))
        .expect("pod");
    pod.ips = vec!["::ffff:10.20.1.5".parse().expect("ip")];
    let svc = (s.services)
        .get_mut(&("inference".to_owned(), "model-server".to_owned()))
        .expect("service");
    svc.endpoints[0].ip = "::ffff:10.20.1.5".parse().expect("ip");
    let out = exports(&s, &td("cluster-b.example"));
    assert_eq!(out.services[0].endpoints[0].ips, ["10.20.1.5"]);
    validate(&out, &td("cluster-b.example"), &[]).expect("an importer accepts it");
}

#[test]
fn a_bad_export_message_is_refused_whole() {
    let good = exports(&state(), &td("cluster-b.example"));
    let b = td("cluster-b.example");
    let spoil = |f: &dyn Fn(&mut pb::Exports)| {
        let mut bad = good.clone();
        f(&mut bad);
        bad
    };
    let cases: Vec<(pb::Exports, &str)> = vec![
        (
            spoil(&|e| e.trust_domain = "cluster-a.example".into()),
            "claim",
        ),
        (
            spoil(&|e| e.services[0].namespace = "Bad_NS".into()),
            "namespace",
        ),
        (
            spoil(&|e| {
                let again = e.services[0].clone();
                e.services.push(again);
            }),
            "twice",
        ),
        (
            spoil(&|e| e.services[0].endpoints[0].ips = vec!["nope".into()]),
            "not an IP",
        ),
        (
            spoil(&|e| e.services[0].endpoints[0].ips = vec!["127.0.0.1".into()]),
            "not a pod IP",
        ),
        (spoil(&|e| e.services[0].endpoints[0].ips.clear()), "IPs"),
        (
            spoil(&|e| e.services[0].endpoints[0].service_account = "Bad SA".into()),
            "endpoint ms-0",
        ),
        (spoil(&|e| e.services[0].ports[0].port = 70000), "port"),
        (
            spoil(&|e| {
                let again = e.services[0].endpoints[0].clone();
                e.services[0].endpoints.push(again);
            }),
            "twice",
        ),
    ];
    for (bad, want) in cases {
        let err = validate(&bad, &b, &[]).expect_err(want);
        assert!(err.contains(want), "{err} does not say {want}");
    }
    let many = pb::Exports {
        trust_domain: b.to_string(),
        services: vec![pb::ExportedService::default(); MAX_SERVICES + 1],
    };
    assert!(validate(&many, &b, &[]).is_err());
    // Link-local (a metadata service), broadcast and clusterset addresses are never pods; a
    // federation's address list narrows what it may export.
    for ip in [
        "169.254.169.254",
        "255.255.255.255",
        "fe80::1",
        "240.240.0.9",
        // IPv4-mapped: would be imported as 169.254.169.254, around the checks.
        "::ffff:169.254.169.254",
        "::ffff:10.20.0.5",
    ] {
        let bad = spoil(&|e| e.services[0].endpoints[0].ips = vec![ip.into()]);
        assert!(validate(&bad, &b, &[]).is_err(), "{ip} accepted");
    }
    let pods = membrane_policy::IpNet::parse("10.20.0.0/16")
        .expect("net")
        .net;
    assert!(validate(&good, &b, std::slice::from_ref(&pods)).is_ok());
    let elsewhere = membrane_policy::IpNet::parse("10.30.0.0/16")
        .expect("net")
        .net;
    let err = validate(&good, &b, &[elsewhere]).expect_err("outside the list");
    assert!(err.contains("serviceExports.addresses"), "{err}");
    // Even a list that covers the mapped range (here every IPv6 address) refuses them.
    let everything = membrane_policy::IpNet::parse("::/0").expect("net").net;
    let mapped = spoil(&|e| e.services[0].endpoints[0].ips = vec!["::ffff:127.0.0.1".into()]);
    assert!(validate(&mapped, &b, &[everything]).is_err());
}

/// A peer cannot inflate every node's discovery snapshot through port names or per-endpoint
/// ports: over any bound, the message is refused whole.
#[test]
fn oversized_ports_are_refused_whole() {
    let b = td("cluster-b.example");
    let mut good = exports(&state(), &b);
    good.services[0].endpoints[0]
        .ports
        .insert("http".into(), 9090);
    validate(&good, &b, &[]).expect("a normal message validates");
    let spoil = |f: &dyn Fn(&mut pb::Exports)| {
        let mut bad = good.clone();
        f(&mut bad);
        bad
    };
    let huge = "a".repeat(1024 * 1024);
    let cases: Vec<(pb::Exports, &str)> = vec![
        (
            spoil(&|e| {
                e.services[0].endpoints[0].ports =
                    (0..100_000).map(|i| (format!("p{i}"), 8080)).collect();
            }),
            "over the limit",
        ),
        (
            spoil(&|e| {
                e.services[0].endpoints[0].ports =
                    (0..=MAX_PORTS).map(|i| (format!("p{i}"), 8080)).collect();
            }),
            "endpoint ms-0: 65 ports, over the limit of 64",
        ),
        (
            spoil(&|e| e.services[0].ports[0].name = huge.clone()),
            "port name",
        ),
        (
            spoil(&|e| {
                e.services[0].endpoints[0].ports.insert(huge.clone(), 8080);
            }),
            "port name",
        ),
        (
            spoil(&|e| e.services[0].ports[0].name = "HTTP".into()),
            "port name",
        ),
        (
            spoil(&|e| {
                e.services[0].endpoints[0].ports.insert("grpc".into(), 9000);
            }),
            "not a port of the Service",
        ),
        (
            spoil(&|e| {
                e.services[0].ports = (1..=MAX_PORTS + 1)
                    .map(|i| pb::ServicePort {
                        name: format!("p{i}"),
                        port: u32::try_from(i).expect("small"),
                        target_port: 0,
                    })
                    .collect();
            }),
            "over the limit of 64",
        ),
    ];
    for (bad, want) in cases {
        let err = validate(&bad, &b, &[]).expect_err(want);
        assert!(err.contains(want), "{err} does not say {want}");
        assert!(err.len() < 1024, "the error quotes at most a bounded name");
    }
    // Within every per-Service bound, but over the budget of one peer's import as a whole.
    let port = |i: usize| pb::ServicePort {
        name: format!("p{i}"),
        port: u32::try_from(i + 1).expect("small"),
        target_port: 0,
    };
    let mut many = pb::Exports {
        trust_domain: b.to_string(),
        services: Vec::new(),
    };
    for s in 0..(MAX_TOTAL_PORTS / MAX_PORTS + 1) {
        many.services.push(pb::ExportedService {
            namespace: "a".into(),
            name: format!("s{s}"),
            ports: (0..MAX_PORTS).map(port).collect(),
            endpoints: Vec::new(),
        });
    }
    let err = validate(&many, &b, &[]).expect_err("over the total");
    assert!(err.contains("ports in all"), "{err}");
    many.services.pop();
    validate(&many, &b, &[]).expect("at the total");
}

#[test]
fn clusterset_vips_are_stable_distinct_and_in_range() {
    let names = ["inference/model-server", "training/store", "a/b"];
    let first = clusterset_vips(names);
    let again = clusterset_vips(names.iter().rev().copied());
    assert_eq!(first, again, "independent of order");
    let distinct: BTreeSet<_> = first.values().collect();
    assert_eq!(distinct.len(), names.len());
    for ip in first.values() {
        let IpAddr::V4(v4) = ip else {
            panic!("{ip} is not IPv4")
        };
        assert_eq!(v4.octets()[..2], [240, 240], "{ip}");
        assert!(v4.octets()[2..] != [0, 0] && v4.octets()[2..] != [255, 255]);
    }
    // Many names: every one gets its own address.
    let many: Vec<String> = (0..3000).map(|i| format!("ns/svc-{i}")).collect();
    let vips = clusterset_vips(many.iter().map(String::as_str));
    let distinct: BTreeSet<_> = vips.values().collect();
    assert_eq!(distinct.len(), many.len());
}

/// Two names share a home address; the one that loses it must not take the home of a third
/// name that sorts after it.
#[test]
fn a_collision_does_not_push_a_third_name_off_its_home() {
    let home = |n: &str| clusterset_vips([n])[n];
    let next = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) + 1)),
        IpAddr::V6(_) => unreachable!("clusterset addresses are IPv4"),
    };
    // Two names with one home (bounded search; collisions in a /16 come within a few
    // hundred names)...
    let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
    let (first, second) = (0..100_000)
        .map(|i| format!("ns/a-{i}"))
        .find_map(|n| {
            let other = seen.insert(home(&n), n.clone())?;
            Some(if other < n { (other, n) } else { (n, other) })
        })
        .expect("a collision");
    // ...and a third, sorting after both, whose home is the next address.
    let target = next(home(&first));
    let third = (0..1_000_000)
        .map(|i| format!("ns/z-{i}"))
        .find(|n| home(n) == target)
        .expect("a name at the next address");
    let vips = clusterset_vips([first.as_str(), second.as_str(), third.as_str()]);
    assert_eq!(vips[&first], home(&first));
    assert_eq!(vips[&third], target, "{third} was pushed off its home");
    assert_ne!(vips[&second], vips[&first]);
    assert_ne!(vips[&second], vips[&third]);
}

/// A name whose home address no other name shares keeps it when names that collide
/// elsewhere come and go (with 3,000 names in a /16, collisions are certain).
#[test]
fn clusterset_vips_do_not_move_when_other_names_collide() {
    let many: Vec<String> = (0..3000).map(|i| format!("ns/svc-{i}")).collect();
    let all = clusterset_vips(many.iter().map(String::as_str));
    let homes: BTreeMap<&str, IpAddr> = many
        .iter()
        .map(|n| (n.as_str(), clusterset_vips([n.as_str()])[n.as_str()]))
        .collect();
    let mut shared: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for ip in homes.values() {
        *shared.entry(*ip).or_default() += 1;
    }
    let (alone, colliding): (Vec<&str>, Vec<&str>) =
        (homes.keys()).partition(|n| shared[&homes[**n]] == 1);
    assert!(!colliding.is_empty(), "the test needs collisions");
    // Every name alone at its home address holds it in the full set...
    for n in &alone {
        assert_eq!(all[*n], homes[*n], "{n} was pushed off its home address");
    }
    // ...and still does with every colliding name removed, or half of them.
    for keep in [0, colliding.len() / 2] {
        let subset = alone.iter().chain(colliding.iter().take(keep)).copied();
        let vips = clusterset_vips(subset);
        for n in &alone {
            assert_eq!(vips[*n], all[*n], "{n} moved when other names changed");
        }
        let distinct: BTreeSet<_> = vips.values().collect();
        assert_eq!(distinct.len(), vips.len());
    }
}

/// A trust domain holds at most `MAX_STREAMS_PER_PEER` exports streams; a closed one frees
/// its slot; other trust domains are counted apart.
#[test]
fn exports_streams_are_capped_per_trust_domain() {
    let open = StreamSlots::default();
    let (b, c) = (td("cluster-b.example"), td("cluster-c.example"));
    let mut held: Vec<_> = (0..MAX_STREAMS_PER_PEER)
        .map(|_| take_stream(&open, &b).expect("under the cap"))
        .collect();
    let refused = take_stream(&open, &b).expect_err("over the cap");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(take_stream(&open, &c).is_ok(), "another trust domain");
    held.pop();
    held.push(take_stream(&open, &b).expect("a slot was freed"));
    drop(held);
    assert!(open.is_empty(), "every slot returned");
}
