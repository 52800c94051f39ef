//! Pods for unit tests: the shape every test of addresses and views builds.

use std::net::IpAddr;

use super::{ClusterState, Pod};

/// Pod `namespace/name` on `node` at `ip`: uid `uid-<name>`, service account `default`,
/// running.
pub fn pod(namespace: &str, name: &str, node: &str, ip: IpAddr) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        service_account: "default".into(),
        node_name: Some(node.into()),
        ips: vec![ip],
        ..Default::default()
    }
}

/// Adds `pod` to `state` under its namespace and name.
pub fn insert(state: &mut ClusterState, pod: Pod) {
    state
        .pods
        .insert((pod.namespace.clone(), pod.name.clone()), pod);
}
