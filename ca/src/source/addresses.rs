//! Pod addresses that are published for no pod.
//!
//! A pod's addresses are what its status reports, and a node writes the status of the pods it
//! hosts: a compromised node could claim another node's pod's address, a Service's cluster
//! IP or a clusterset address for a pod of its own, and the ztunnels (which look a
//! destination up by workload address before Service addresses) would then send traffic
//! meant for the victim to the attacker's identity. So an address is withheld — left out of
//! every pod's published addresses — when more than one active pod claims it, or when it is a
//! Service's cluster IP or inside the clusterset network, whoever claims it — and, when the
//! operator names the pod networks (`--pod-networks`), when it lies outside all of them: a
//! node could otherwise claim an outside address (a model hub's, another node's) for a pod of
//! its own, and every ztunnel would tunnel the mesh's traffic to that address to the node.
//! Only active pods
//! ([`super::PodPhase::is_active`]) count, so a pod that took over the address of a finished
//! one keeps it. A claim is a claim whether or not the pod is in the mesh: an address of a
//! pod outside the mesh must not become a mesh workload's either.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::ClusterState;

/// Why an address is published for no pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WithheldIp {
    /// The active pods claiming it, as `namespace/name`, sorted.
    pub pods: Vec<String>,
    /// The Services whose cluster IP it is, as `namespace/name`, sorted.
    pub services: Vec<String>,
    /// Whether it is inside the clusterset network (imported Services' virtual IPs).
    pub clusterset: bool,
    /// Whether it lies outside the configured pod networks.
    pub outside_pod_networks: bool,
}

impl WithheldIp {
    /// The reason as a metric label: `service_ip`, `clusterset_ip`, `outside_pod_networks`
    /// or `contested`.
    pub fn reason(&self) -> &'static str {
        if !self.services.is_empty() {
            "service_ip"
        } else if self.clusterset {
            "clusterset_ip"
        } else if self.outside_pod_networks {
            "outside_pod_networks"
        } else {
            "contested"
        }
    }
}

/// The withheld addresses of one state, canonical (`::ffff:10.0.0.7` is `10.0.0.7`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WithheldIps(BTreeMap<IpAddr, WithheldIp>);

impl WithheldIps {
    /// Whether `ip` (in any spelling) is withheld.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains_key(&ip.to_canonical())
    }

    /// Each withheld address and why.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &WithheldIp)> {
        self.0.iter()
    }

    /// The number of withheld addresses.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no address is withheld.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `ips` without the withheld ones.
    pub fn published<'a>(&'a self, ips: &'a [IpAddr]) -> impl Iterator<Item = IpAddr> + 'a {
        ips.iter().copied().filter(|ip| !self.contains(*ip))
    }
}

impl ClusterState {
    /// The pod addresses published for no pod (see the module documentation).
    pub fn withheld_ips(&self) -> WithheldIps {
        let mut claims: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for pod in self.pods.values().filter(|p| p.phase.is_active()) {
            for ip in &pod.ips {
                claims
                    .entry(ip.to_canonical())
                    .or_default()
                    .insert(format!("{}/{}", pod.namespace, pod.name));
            }
        }
        let mut vips: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for svc in self.services.values() {
            for vip in &svc.vips {
                vips.entry(vip.to_canonical())
                    .or_default()
                    .push(format!("{}/{}", svc.namespace, svc.name));
            }
        }
        let withheld = claims
            .into_iter()
            .filter_map(|(ip, pods)| {
                let services = vips.remove(&ip).unwrap_or_default();
                let clusterset = membrane_api::clusterset::contains(ip);
                let outside_pod_networks = !self.pod_networks.is_empty()
                    && !self.pod_networks.iter().any(|net| net.contains(ip));
                (pods.len() > 1 || !services.is_empty() || clusterset || outside_pod_networks).then(
                    || {
                        (
                            ip,
                            WithheldIp {
                                pods: pods.into_iter().collect(),
                                services,
                                clusterset,
                                outside_pod_networks,
                            },
                        )
                    },
                )
            })
            .collect();
        WithheldIps(withheld)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Pod, PodPhase, Service};

    fn pod(name: &str, node: &str, ip: &str) -> Pod {
        crate::source::test_pods::pod("a", name, node, ip.parse().expect("ip"))
    }

    fn state(pods: impl IntoIterator<Item = Pod>) -> ClusterState {
        let mut s = ClusterState::default();
        for p in pods {
            s.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        s
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_address_two_active_pods_claim_is_withheld_with_both_named() {
        let s = state([
            pod("victim", "n1", "10.0.0.7"),
            pod("thief", "n2", "::ffff:10.0.0.7"),
            pod("other", "n2", "10.0.0.8"),
        ]);
        let withheld = s.withheld_ips();
        assert_eq!(withheld.len(), 1);
        assert!(withheld.contains(ip("10.0.0.7")) && withheld.contains(ip("::ffff:10.0.0.7")));
        let (_, why) = withheld.iter().next().expect("one");
        assert_eq!(why.pods, ["a/thief", "a/victim"]);
        assert_eq!(why.reason(), "contested");
        assert!(!withheld.contains(ip("10.0.0.8")));
    }

    #[test]
    fn a_finished_pod_does_not_contest_its_successor() {
        let mut done = pod("done", "n1", "10.0.0.7");
        done.phase = PodPhase::Succeeded;
        let mut failed = pod("failed", "n1", "10.0.0.7");
        failed.phase = PodPhase::Failed;
        let s = state([done, failed, pod("new", "n1", "10.0.0.7")]);
        assert!(s.withheld_ips().is_empty());
        // A pending pod holds its address already.
        let mut pending = pod("pending", "n2", "10.0.0.7");
        pending.phase = PodPhase::Pending;
        let s = state([pending, pod("new", "n1", "10.0.0.7")]);
        assert!(s.withheld_ips().contains(ip("10.0.0.7")));
    }

    #[test]
    fn service_and_clusterset_addresses_are_never_a_pods() {
        let mut s = state([
            pod("vip", "n1", "10.96.0.10"),
            pod("cs", "n1", "240.240.0.9"),
            pod("fine", "n1", "10.0.0.9"),
        ]);
        s.services.insert(
            ("kube-system".into(), "dns".into()),
            Service {
                namespace: "kube-system".into(),
                name: "dns".into(),
                vips: vec![ip("10.96.0.10")],
                ..Default::default()
            },
        );
        let withheld = s.withheld_ips();
        let reasons: Vec<(String, &str)> = withheld
            .iter()
            .map(|(ip, why)| (ip.to_string(), why.reason()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("10.96.0.10".to_owned(), "service_ip"),
                ("240.240.0.9".to_owned(), "clusterset_ip")
            ]
        );
        let (_, why) = withheld.iter().next().expect("vip");
        assert_eq!(why.services, ["kube-system/dns"]);
        assert_eq!(why.pods, ["a/vip"]);
    }

    /// With the pod networks named, an address outside them (an outside service's, a node's)
    /// is nobody's, in either family; inside them (an IPv4-mapped spelling too) it is kept.
    #[test]
    fn an_address_outside_the_pod_networks_is_withheld() {
        let mut s = state([
            pod("inside", "n1", "10.0.0.7"),
            pod("mapped", "n1", "::ffff:10.0.0.8"),
            pod("hub", "n1", "203.0.113.10"),
            pod("v6", "n1", "fd00::7"),
            pod("v6-out", "n1", "2001:db8::7"),
        ]);
        assert!(s.withheld_ips().is_empty(), "not checked when unset");
        s.pod_networks = vec![
            "10.0.0.0/16".parse().expect("net"),
            "fd00::/64".parse().expect("net"),
        ];
        let withheld = s.withheld_ips();
        let reasons: Vec<(String, &str, Vec<String>)> = withheld
            .iter()
            .map(|(ip, why)| (ip.to_string(), why.reason(), why.pods.clone()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "203.0.113.10".to_owned(),
                    "outside_pod_networks",
                    vec!["a/hub".to_owned()]
                ),
                (
                    "2001:db8::7".to_owned(),
                    "outside_pod_networks",
                    vec!["a/v6-out".to_owned()]
                ),
            ]
        );
    }
}
