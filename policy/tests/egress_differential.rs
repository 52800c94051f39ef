//! The EgressPolicy index against the definition: for pseudo-random policies and workloads,
//! `EgressIndex::selecting` returns exactly the policies `applies` accepts on a full scan, and
//! deciding a connection on either gives the same decision.

use std::collections::BTreeMap;

use membrane_policy::Source;
use membrane_policy::egress::index::applies;
use membrane_policy::egress::{
    EgressAction, EgressIndex, EgressPolicy, EgressRequest, EgressRule, EgressTo, HostPattern,
    decide_egress,
};

const ROOT: &str = "membrane-system";
const NAMESPACES: [&str; 4] = [ROOT, "training", "inference", "data"];
const KEYS: [&str; 2] = ["app", "tier"];
const VALUES: [&str; 2] = ["a", "b"];
const HOSTS: [&str; 3] = ["huggingface.co", "paste.example", "s3.example"];

/// A linear congruential sequence: deterministic, good enough to spread cases.
struct Seq(u64);

impl Seq {
    fn take(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn label_set(seq: &mut Seq) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for k in KEYS {
        if seq.take(2) == 0 {
            out.insert(k.to_owned(), VALUES[seq.take(2)].to_owned());
        }
    }
    out
}

fn policy(seq: &mut Seq, i: usize) -> EgressPolicy {
    let action = [EgressAction::Allow, EgressAction::Deny, EgressAction::Audit][seq.take(3)];
    EgressPolicy {
        name: format!("p{i}"),
        namespace: NAMESPACES[seq.take(NAMESPACES.len())].to_owned(),
        selector: label_set(seq),
        action,
        rules: vec![EgressRule {
            from: Vec::new(),
            to: vec![EgressTo {
                hosts: vec![HostPattern::Exact(HOSTS[seq.take(HOSTS.len())].to_owned())],
                ports: vec![443],
                ip_blocks: Vec::new(),
                allow_missing_sni: seq.take(2) == 0,
            }],
            via: None,
        }],
        budget: None,
        dry_run: seq.take(10) == 0,
    }
}

#[test]
fn the_index_selects_what_a_full_scan_selects_and_decides_the_same() {
    let mut seq = Seq(0x5eed);
    for round in 0..200 {
        let policies: Vec<EgressPolicy> = (0..seq.take(12)).map(|i| policy(&mut seq, i)).collect();
        let index = EgressIndex::build(policies.clone(), ROOT);
        for _ in 0..10 {
            let namespace = NAMESPACES[seq.take(NAMESPACES.len())];
            let labels = label_set(&mut seq);
            let mut scanned: Vec<&EgressPolicy> = policies
                .iter()
                .filter(|p| applies(p, ROOT, namespace, &labels))
                .collect();
            // The index returns (namespace, name) order, which decisions depend on.
            let indexed = index.selecting(namespace, &labels);
            scanned.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            assert_eq!(
                indexed.iter().map(|p| p.key()).collect::<Vec<_>>(),
                scanned.iter().map(|p| p.key()).collect::<Vec<_>>(),
                "round {round}, {namespace} {labels:?}"
            );
            let pinned = [HOSTS[seq.take(HOSTS.len())]];
            let sni = [None, Some(HOSTS[seq.take(HOSTS.len())])][seq.take(2)];
            let req = EgressRequest {
                source: Source {
                    principal: "cluster.local/ns/training/sa/trainer",
                    namespace,
                    service_account: "trainer",
                },
                ip: "198.51.100.10".parse().expect("ip"),
                port: 443,
                pinned: &pinned,
                sni,
                tls: seq.take(2) == 0,
                sni_unreadable: false,
            };
            let a = decide_egress(&indexed, &req);
            let b = decide_egress(&scanned, &req);
            assert_eq!(
                (a.verdict, a.reason, &a.policy, a.rule),
                (b.verdict, b.reason, &b.policy, b.rule),
                "round {round}"
            );
        }
    }
}
