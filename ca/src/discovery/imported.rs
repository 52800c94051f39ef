//! What the Services imported from federated clusters become in every node's view: one
//! `Workload` per exported pod (its trust domain set, `foreign`) and one `clusterset` Service
//! per namespace/name, the union of every exporter's endpoints, on a virtual IP of its own.

use std::collections::BTreeMap;

use membrane_proto::v1 as pb;
use pb::resource_key::Kind;

use membrane_identity::TrustDomain;

use crate::federation::services::{Imports, clusterset_vips};
use crate::source::ClusterState;

fn resource(kind: pb::resource::Kind) -> pb::Resource {
    pb::Resource { kind: Some(kind) }
}

/// The imported workloads and `clusterset` Services, keyed as on the wire. An exported
/// address that a local pod or Service already holds, or that two peers both claim, is left
/// out (from both peers), with a log line: a peer can never redirect traffic to a pod that is
/// not its own, and no peer wins a contested address by the order of names. Addresses are
/// compared canonically (`FD00::7` is `fd00::7`, `::ffff:10.0.0.7` is `10.0.0.7`).
pub fn resources(state: &ClusterState, imports: &Imports) -> Vec<((i32, String), pb::Resource)> {
    let mut out = Vec::new();
    // Address → who holds it: a local pod, or an imported one (the same pod may back several
    // exported Services).
    let mut owners: BTreeMap<String, String> = (state.pods.values())
        .flat_map(|p| p.ips.iter().map(|ip| (ip.to_string(), p.uid.clone())))
        .collect();
    // Local Services' cluster IPs are never a peer's either.
    for svc in state.services.values() {
        for vip in &svc.vips {
            owners.insert(
                vip.to_string(),
                format!("service {}/{}", svc.namespace, svc.name),
            );
        }
    }
    // Addresses more than one peer claims belong to none of them.
    let mut claimed: BTreeMap<String, &TrustDomain> = BTreeMap::new();
    let mut contested: std::collections::BTreeSet<String> = Default::default();
    for (td, imported) in imports.iter() {
        let ips = (imported.exports.services.iter())
            .flat_map(|s| &s.endpoints)
            .flat_map(|e| &e.ips);
        for ip in ips {
            let ip = canonical(ip);
            if claimed
                .insert(ip.clone(), td)
                .is_some_and(|other| other != td)
            {
                contested.insert(ip);
            }
        }
    }
    // One clusterset Service per namespace/name, the union of every exporter's endpoints.
    let mut services: BTreeMap<String, pb::Service> = BTreeMap::new();
    for (td, imported) in imports.iter() {
        for svc in &imported.exports.services {
            let key = format!("{}/{}", svc.namespace, svc.name);
            let merged = services.entry(key).or_insert_with(|| pb::Service {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                clusterset: true,
                ..Default::default()
            });
            for port in &svc.ports {
                if !merged.ports.iter().any(|p| p.port == port.port) {
                    merged.ports.push(port.clone());
                }
            }
            for e in &svc.endpoints {
                let uid = format!("imported/{td}/{}/{}", svc.namespace, e.pod);
                let (ips, clashing): (Vec<String>, Vec<String>) =
                    (e.ips.iter().map(|ip| canonical(ip))).partition(|ip| {
                        !contested.contains(ip) && owners.get(ip).is_none_or(|owner| *owner == uid)
                    });
                if !clashing.is_empty() {
                    tracing::warn!(trust_domain = %td, service = %format!("{}/{}", svc.namespace, svc.name), pod = %e.pod, addresses = ?clashing, "imported endpoint address already in use here; left out");
                }
                if ips.is_empty() {
                    continue;
                }
                for ip in &ips {
                    owners.insert(ip.clone(), uid.clone());
                }
                out.push((
                    (Kind::Workload as i32, uid.clone()),
                    resource(pb::resource::Kind::Workload(pb::Workload {
                        uid,
                        name: e.pod.clone(),
                        namespace: svc.namespace.clone(),
                        service_account: e.service_account.clone(),
                        ips: ips.clone(),
                        protocol: pb::workload::Protocol::Hbone as i32,
                        foreign: true,
                        trust_domain: td.to_string(),
                        network_gateway: imported.gateway.clone(),
                        ..Default::default()
                    })),
                ));
                for ip in &ips {
                    merged.endpoints.push(pb::Endpoint {
                        ip: ip.clone(),
                        pod: String::new(),
                        ready: true,
                        ports: e.ports.clone(),
                    });
                }
            }
        }
    }
    let vips = clusterset_vips(services.keys().map(String::as_str));
    for (key, mut svc) in services {
        svc.vips = vips
            .get(&key)
            .map(ToString::to_string)
            .into_iter()
            .collect();
        out.push((
            (Kind::Service as i32, format!("clusterset:{key}")),
            resource(pb::resource::Kind::Service(svc)),
        ));
    }
    out
}

/// An address as the local side writes it (validated exports hold only IPs).
fn canonical(ip: &str) -> String {
    ip.parse::<std::net::IpAddr>()
        .map_or_else(|_| ip.to_owned(), |ip| ip.to_canonical().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::source::Pod;

    /// A cluster with one local pod, `a/local` at 10.0.0.7.
    fn with_local_pod() -> ClusterState {
        let mut state = ClusterState::default();
        state.pods.insert(
            ("a".into(), "local".into()),
            Pod {
                namespace: "a".into(),
                name: "local".into(),
                uid: "uid-local".into(),
                ips: vec!["10.0.0.7".parse().expect("ip")],
                ..Default::default()
            },
        );
        state
    }

    fn endpoint(pod: &str, ip: &str) -> pb::ExportedEndpoint {
        pb::ExportedEndpoint {
            pod: pod.into(),
            ips: vec![ip.into()],
            service_account: "sa".into(),
            ports: Default::default(),
        }
    }

    /// A peer's endpoint on a local pod's address is left out; a pod behind two exported
    /// Services is one workload and an endpoint of both.
    #[test]
    fn imports_never_take_a_local_address() {
        let state = with_local_pod();
        let service = |name: &str, endpoints| pb::ExportedService {
            namespace: "a".into(),
            name: name.into(),
            ports: vec![],
            endpoints,
        };
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster-b.example").expect("td");
        let exports = pb::Exports {
            trust_domain: td.to_string(),
            services: vec![
                service(
                    "svc",
                    vec![endpoint("x", "10.0.0.7"), endpoint("y", "10.9.0.1")],
                ),
                service("svc2", vec![endpoint("y", "10.9.0.1")]),
            ],
        };
        let imported = crate::federation::services::Imported {
            exports,
            gateway: None,
        };
        let imports: Imports = Arc::new(BTreeMap::from([(td, imported)]));
        let out = resources(&state, &imports);
        let workloads: Vec<&str> = (out.iter())
            .filter(|((kind, _), _)| *kind == Kind::Workload as i32)
            .map(|((_, uid), _)| uid.as_str())
            .collect();
        assert_eq!(workloads, ["imported/cluster-b.example/a/y"; 2]);
        for ((kind, key), resource) in &out {
            if *kind != Kind::Service as i32 {
                continue;
            }
            let Some(pb::resource::Kind::Service(s)) = &resource.kind else {
                panic!("{key}: not a service");
            };
            let ips: Vec<&str> = s.endpoints.iter().map(|e| e.ip.as_str()).collect();
            assert_eq!(ips, ["10.9.0.1"], "{key}");
            assert!(s.clusterset && key.starts_with("clusterset:a/"));
        }
    }

    /// An address two peers both claim goes to neither; an IPv4-mapped spelling of a local
    /// pod's address is that address; a peer's east-west gateway is stamped on its workloads.
    #[test]
    fn contested_and_disguised_addresses_are_left_out() {
        let state = with_local_pod();
        let peer = |td: &str, endpoints: Vec<pb::ExportedEndpoint>, gateway| {
            let td = membrane_identity::spiffe_id::parse_trust_domain(td).expect("td");
            let exports = pb::Exports {
                trust_domain: td.to_string(),
                services: vec![pb::ExportedService {
                    namespace: "a".into(),
                    name: "svc".into(),
                    ports: vec![],
                    endpoints,
                }],
            };
            (
                td,
                crate::federation::services::Imported { exports, gateway },
            )
        };
        let gateway = pb::NetworkGateway {
            address: "192.0.2.20:15008".into(),
            spiffe_id: "spiffe://cluster-c.example/ns/gw/sa/east-west".into(),
        };
        let imports: Imports = Arc::new(BTreeMap::from([
            peer(
                "cluster-b.example",
                vec![
                    endpoint("shared", "10.9.0.1"),
                    endpoint("b-own", "10.9.0.2"),
                ],
                None,
            ),
            peer(
                "cluster-c.example",
                vec![
                    endpoint("shared", "10.9.0.1"),
                    endpoint("mapped", "::ffff:10.0.0.7"),
                    endpoint("c-own", "FD00::3"),
                ],
                Some(gateway.clone()),
            ),
        ]));
        let out = resources(&state, &imports);
        let workloads: BTreeMap<&str, &pb::Workload> = (out.iter())
            .filter_map(|((_, uid), r)| match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => Some((uid.as_str(), w)),
                _ => None,
            })
            .collect();
        assert_eq!(
            workloads.keys().copied().collect::<Vec<_>>(),
            [
                "imported/cluster-b.example/a/b-own",
                "imported/cluster-c.example/a/c-own"
            ]
        );
        let c = workloads["imported/cluster-c.example/a/c-own"];
        assert_eq!(c.ips, ["fd00::3"]);
        assert_eq!(c.network_gateway.as_ref(), Some(&gateway));
        assert_eq!(
            workloads["imported/cluster-b.example/a/b-own"].network_gateway,
            None
        );
    }

    /// The largest import the bounds let one peer make adds well under a quarter of the
    /// discovery message limit to every node's snapshot: long names everywhere, the most
    /// endpoints, two long addresses each (an endpoint's ports travel once per address), and
    /// the whole port budget spent on endpoints.
    #[test]
    fn the_largest_valid_import_fits_in_a_quarter_of_a_discovery_message() {
        use crate::federation::services::{
            MAX_ENDPOINTS, MAX_SERVICES, MAX_TOTAL_ENDPOINTS, MAX_TOTAL_PORTS, validate,
        };
        use prost::Message;
        let label =
            |c: char, tail: &str| format!("{}{tail}", c.to_string().repeat(63 - tail.len()));
        let td = membrane_identity::spiffe_id::parse_trust_domain(&format!(
            "{}.example",
            label('t', "")
        ))
        .expect("td");
        let service_account = [
            label('s', ""),
            label('s', ""),
            label('s', ""),
            label('s', "xx"),
        ]
        .join(".")[..253]
            .to_owned();
        let port_names = [label('p', "1"), label('p', "2")];
        let mut budget = MAX_TOTAL_PORTS;
        let mut services = Vec::new();
        let mut endpoint = 0usize;
        for s in 0..MAX_SERVICES {
            let mut svc = pb::ExportedService {
                namespace: label('n', ""),
                name: label('v', &format!("-{s}")),
                ..Default::default()
            };
            if endpoint < MAX_TOTAL_ENDPOINTS {
                svc.ports = (port_names.iter().zip(1u32..))
                    .map(|(name, port)| pb::ServicePort {
                        name: name.clone(),
                        port,
                        target_port: 0,
                    })
                    .collect();
                budget -= svc.ports.len();
            }
            while endpoint < MAX_TOTAL_ENDPOINTS && svc.endpoints.len() < MAX_ENDPOINTS {
                let ports = (port_names.iter().take(budget.min(2)))
                    .map(|n| (n.clone(), 65_535))
                    .collect::<std::collections::HashMap<_, _>>();
                budget -= ports.len();
                let hi = u16::try_from(endpoint / 0x7fff + 0x8000).expect("small");
                let lo = u16::try_from(endpoint % 0x7fff + 0x8000).expect("small");
                svc.endpoints.push(pb::ExportedEndpoint {
                    pod: label('e', &format!("-{endpoint}")),
                    ips: vec![
                        format!("fdff:ffff:ffff:ffff:ffff:ffff:{hi:x}:{lo:x}"),
                        format!("fdee:ffff:ffff:ffff:ffff:ffff:{hi:x}:{lo:x}"),
                    ],
                    service_account: service_account.clone(),
                    ports,
                });
                endpoint += 1;
            }
            services.push(svc);
        }
        let exports = pb::Exports {
            trust_domain: td.to_string(),
            services,
        };
        validate(&exports, &td, &[]).expect("within every bound");
        let gateway = pb::NetworkGateway {
            address: "[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:15008".into(),
            spiffe_id: format!("spiffe://{td}/ns/membrane-system/sa/east-west"),
        };
        let imports: Imports = Arc::new(BTreeMap::from([(
            td,
            crate::federation::services::Imported {
                exports,
                gateway: Some(gateway),
            },
        )]));
        let out = resources(&ClusterState::default(), &imports);
        let workloads = out
            .iter()
            .filter(|((kind, _), _)| *kind == Kind::Workload as i32)
            .count();
        assert_eq!(workloads, MAX_TOTAL_ENDPOINTS, "every endpoint imported");
        // As an `Update` carries them: each resource a length-delimited repeated field.
        let update = pb::Update {
            upserts: out.into_iter().map(|(_, r)| r).collect(),
            ..Default::default()
        };
        let len = update.encoded_len();
        eprintln!("the largest import: {len} bytes");
        assert!(
            len < crate::server::DISCOVERY_MAX_MESSAGE_LEN / 4,
            "{len} bytes"
        );
    }
}
