use super::*;
use crate::discovery::diff;
use crate::source::{MESH_LABEL, Namespace, PolicyEntry};

fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for (name, enabled) in [("a", true), ("b", true), ("off", false)] {
        let mut ns = Namespace {
            name: name.into(),
            ..Default::default()
        };
        if enabled {
            ns.labels.insert(MESH_LABEL.into(), "enabled".into());
        }
        s.namespaces.insert(name.into(), ns);
    }
    for (ns, name, node, ip) in [
        ("a", "p1", "n1", "10.0.0.1"),
        ("b", "p2", "n2", "10.0.0.2"),
        ("off", "p3", "n1", "10.0.0.3"),
    ] {
        let pod = crate::source::test_pods::pod(ns, name, node, ip.parse().expect("ip"));
        crate::source::test_pods::insert(&mut s, pod);
    }
    for ns in ["a", "b"] {
        let text = format!(
            "apiVersion: security.membrane.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec: {{}}\n"
        );
        let checked = membrane_policy::parse_policies(&text).expect("valid");
        let c = checked.into_iter().next().expect("one");
        s.policies.insert(
            (ns.into(), "p".into()),
            PolicyEntry {
                policy: c.policy,
                warnings: c.warnings,
            },
        );
    }
    s
}

fn bundle() -> Arc<TrustBundle> {
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = std::time::Duration::from_secs(3600);
    Arc::new(
        crate::SigningAuthority::load_or_create(dir.path(), &td, ttl)
            .expect("root")
            .bundle()
            .clone(),
    )
}

fn names(view: &View, kind: Kind) -> Vec<String> {
    view.keys()
        .filter(|(k, _)| *k == kind as i32)
        .map(|(_, n)| n.clone())
        .collect()
}

#[test]
fn a_node_gets_every_mesh_workload_but_only_its_policies() {
    let mesh = MeshView::build(&state(), &bundle());
    let n1 = mesh.node_view("n1");
    assert_eq!(names(&n1, Kind::Workload), ["uid-p1", "uid-p2"]);
    assert_eq!(names(&n1, Kind::Authorization), ["a/p"]);
    assert_eq!(names(&n1, Kind::TrustBundle), [""]);
    let n2 = mesh.node_view("n2");
    assert_eq!(names(&n2, Kind::Authorization), ["b/p"]);
    assert!(names(&mesh.node_view("n3"), Kind::Authorization).is_empty());
}

#[test]
fn a_gateway_pod_is_published_anywhere_and_its_node_gets_every_egress_policy() {
    let mut s = state();
    let egress = |ns: &str| {
        let text = format!(
            "apiVersion: security.membrane.dev/v1\nkind: EgressPolicy\nmetadata: {{name: e, namespace: {ns}}}\nspec:\n  rules:\n  - to: [{{hosts: [huggingface.co]}}]\n    via: {{gateway: egress, namespace: \"off\"}}\n"
        );
        membrane_policy::egress::parse_egress_policies(&text)
            .expect("valid")
            .remove(0)
    };
    for ns in ["a", "b"] {
        s.egress_policies
            .insert((ns.into(), "e".into()), egress(ns));
    }
    let gateway = Pod {
        namespace: "off".into(),
        name: "gw".into(),
        uid: "uid-gw".into(),
        service_account: "egress-gateway".into(),
        node_name: Some("n3".into()),
        ips: vec!["10.0.0.9".parse().expect("ip")],
        labels: BTreeMap::from([
            ("membrane.dev/gateway".to_owned(), "egress".to_owned()),
            (
                "gateway.networking.k8s.io/gateway-name".to_owned(),
                "egress".to_owned(),
            ),
        ]),
        ..Default::default()
    };
    s.pods.insert(("off".into(), "gw".into()), gateway);
    let mesh = MeshView::build(&s, &bundle());
    let n3 = mesh.node_view("n3");
    // In a namespace outside the mesh, yet published, with its role.
    let role = n3.values().find_map(|r| match &r.kind {
        Some(pb::resource::Kind::Workload(w)) if w.uid == "uid-gw" => w.gateway.clone(),
        _ => None,
    });
    assert_eq!(
        role,
        Some(pb::GatewayRole {
            kind: pb::gateway_role::Kind::Egress as i32,
            name: "egress".into()
        })
    );
    assert!(!names(&n3, Kind::Workload).contains(&"uid-p3".to_owned()));
    // The gateway's node decides for sources anywhere; a pod's node only for its own.
    assert_eq!(names(&n3, Kind::Egress), ["a/e", "b/e"]);
    assert_eq!(names(&mesh.node_view("n1"), Kind::Egress), ["a/e"]);
    // Without the name label it is an ordinary pod of a namespace outside the mesh.
    if let Some(p) = s.pods.get_mut(&("off".to_owned(), "gw".to_owned())) {
        p.labels.remove("gateway.networking.k8s.io/gateway-name");
    }
    let n3 = MeshView::build(&s, &bundle()).node_view("n3");
    assert!(names(&n3, Kind::Egress).is_empty());
    assert!(!names(&n3, Kind::Workload).contains(&"uid-gw".to_owned()));
}

#[test]
fn workloads_carry_their_namespace_plaintext_udp_ports() {
    let ports = |s: &ClusterState| -> Vec<Vec<u32>> {
        let view = MeshView::build(s, &bundle()).node_view("n1");
        view.values()
            .filter_map(|r| match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => Some(w.plaintext_udp_ports.clone()),
                _ => None,
            })
            .collect()
    };
    let mut s = state();
    let annotate = |s: &mut ClusterState, value: &str| {
        if let Some(ns) = s.namespaces.get_mut("a") {
            ns.annotations.insert(
                crate::source::PLAINTEXT_UDP_PORTS_ANNOTATION.into(),
                value.into(),
            );
        }
    };
    annotate(&mut s, "9999,53");
    assert_eq!(ports(&s), [vec![53, 9999], vec![]]);
    // An invalid value (refused by the directory, logged by Kubernetes) opens nothing.
    annotate(&mut s, "53,dns");
    assert_eq!(ports(&s), [Vec::<u32>::new(), vec![]]);
}

#[test]
fn diff_reports_upserts_and_removals() {
    let bundle = bundle();
    let before = MeshView::build(&state(), &bundle).node_view("n1");
    let mut s = state();
    s.pods.remove(&("b".to_owned(), "p2".to_owned()));
    if let Some(p) = s.pods.get_mut(&("a".to_owned(), "p1".to_owned())) {
        p.labels.insert("app".into(), "x".into());
    }
    let after = MeshView::build(&s, &bundle).node_view("n1");
    let (upserts, removals) = diff(&before, &after);
    assert_eq!(upserts.len(), 1);
    assert!(matches!(
        &upserts[0].kind,
        Some(pb::resource::Kind::Workload(w)) if w.uid == "uid-p1"
    ));
    assert_eq!(
        removals,
        [pb::ResourceKey {
            kind: Kind::Workload as i32,
            name: "uid-p2".into()
        }]
    );
    let (u, r) = diff(&after, &after);
    assert!(u.is_empty() && r.is_empty());
}

/// Each workload's published addresses, by UID.
fn workload_ips(view: &View) -> BTreeMap<String, Vec<String>> {
    view.values()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::Workload(w)) => Some((w.uid.clone(), w.ips.clone())),
            _ => None,
        })
        .collect()
}

fn set_ip(s: &mut ClusterState, ns: &str, name: &str, ip: &str) {
    if let Some(p) = s.pods.get_mut(&(ns.to_owned(), name.to_owned())) {
        p.ips = vec![ip.parse().expect("ip")];
    }
}

/// A node writes its pods' status: a pod claiming another node's pod's address takes it
/// from neither, and the address is no Service endpoint either.
#[test]
fn an_address_two_active_pods_claim_is_published_for_neither() {
    let mut s = state();
    set_ip(&mut s, "a", "p1", "10.0.0.7");
    set_ip(&mut s, "b", "p2", "10.0.0.7");
    s.services.insert(
        ("a".into(), "svc".into()),
        Service {
            namespace: "a".into(),
            name: "svc".into(),
            vips: vec!["10.96.0.1".parse().expect("ip")],
            endpoints: ["10.0.0.7", "10.0.0.8"]
                .into_iter()
                .map(|ip| crate::source::Endpoint {
                    ip: ip.parse().expect("ip"),
                    pod: None,
                    ready: true,
                    ports: BTreeMap::new(),
                })
                .collect(),
            ..Default::default()
        },
    );
    let mesh = MeshView::build(&s, &bundle());
    let view = mesh.node_view("n1");
    let ips = workload_ips(&view);
    assert_eq!(ips["uid-p1"], Vec::<String>::new());
    assert_eq!(ips["uid-p2"], Vec::<String>::new());
    let endpoints: Vec<String> = view
        .values()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::Service(svc)) => Some(
                svc.endpoints
                    .iter()
                    .map(|e| e.ip.clone())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(endpoints, ["10.0.0.8"]);
    let withheld: Vec<(String, Vec<String>)> = (mesh.withheld().iter())
        .map(|(ip, why)| (ip.to_string(), why.pods.clone()))
        .collect();
    assert_eq!(
        withheld,
        [(
            "10.0.0.7".to_owned(),
            vec!["a/p1".to_owned(), "b/p2".to_owned()]
        )]
    );
    // A pod outside the mesh claims an address as much as one inside.
    let mut s = state();
    set_ip(&mut s, "a", "p1", "10.0.0.3");
    let ips = workload_ips(&MeshView::build(&s, &bundle()).node_view("n1"));
    assert_eq!(ips["uid-p1"], Vec::<String>::new());
}

#[test]
fn a_pod_on_a_service_cluster_ip_does_not_get_it() {
    let mut s = state();
    set_ip(&mut s, "a", "p1", "10.96.0.10");
    s.services.insert(
        ("kube-system".into(), "dns".into()),
        Service {
            namespace: "kube-system".into(),
            name: "dns".into(),
            vips: vec!["10.96.0.10".parse().expect("ip")],
            ..Default::default()
        },
    );
    let ips = workload_ips(&MeshView::build(&s, &bundle()).node_view("n1"));
    assert_eq!(ips["uid-p1"], Vec::<String>::new());
    assert_eq!(ips["uid-p2"], ["10.0.0.2"]);
}

/// Only active pods count: a pod that took over a finished pod's address keeps it, and
/// unique addresses are published as reported.
#[test]
fn a_unique_address_is_kept_and_a_finished_pod_claims_nothing() {
    let ips = workload_ips(&MeshView::build(&state(), &bundle()).node_view("n1"));
    assert_eq!(ips["uid-p1"], ["10.0.0.1"]);
    assert_eq!(ips["uid-p2"], ["10.0.0.2"]);
    let mut s = state();
    let mut done = s.pods[&("a".to_owned(), "p1".to_owned())].clone();
    done.name = "old".into();
    done.uid = "uid-old".into();
    done.phase = crate::source::PodPhase::Succeeded;
    s.pods.insert(("a".into(), "old".into()), done);
    let ips = workload_ips(&MeshView::build(&s, &bundle()).node_view("n1"));
    assert_eq!(ips["uid-p1"], ["10.0.0.1"]);
    assert!(!ips.contains_key("uid-old"));
}
