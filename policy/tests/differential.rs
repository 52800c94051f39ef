// Decision tuples compared field by field; a named type would hide what is compared.
#![allow(clippy::type_complexity)]

//! `decide` through the index against a brute-force reference that scans every policy, on
//! pseudo-random meshes: the index must never change which policies apply, the verdict or
//! the policy reported.

use std::collections::BTreeMap;
use std::net::IpAddr;

use membrane_policy::{
    Action, Condition, Constraint, Decision, DecisionReason, IpNet, NamespaceMatch, OperationMatch,
    Policy, PolicyIndex, PolicyRef, Request, Rule, ServiceAccountRef, Source, SourceMatch,
    StringMatch, Verdict, decide,
};

const ROOT: &str = "membrane-system";
const NAMESPACES: [&str; 4] = [ROOT, "a", "b", "c"];
const LABEL_KEYS: [&str; 3] = ["app", "tier", "v"];
const LABEL_VALUES: [&str; 3] = ["x", "y", "z"];
/// Trust domains of sources; rounds alternate which one is local.
const TRUST_DOMAINS: [&str; 3] = ["cluster.local", "cluster-b.example", "cluster-c.example"];

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn labels(rng: &mut Rng, max: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for _ in 0..rng.below(max + 1) {
        out.insert(
            rng.pick(&LABEL_KEYS).to_owned(),
            rng.pick(&LABEL_VALUES).to_owned(),
        );
    }
    out
}

fn principal(td: &str, ns: &str, sa: &str) -> String {
    format!("{td}/ns/{ns}/sa/{sa}")
}

/// A namespace entry for `ns`: unqualified, or qualified by a trust domain or by `*`.
fn namespace(rng: &mut Rng, ns: &str) -> NamespaceMatch {
    let raw = match rng.below(4) {
        0 | 1 => ns.to_owned(),
        2 => format!("{}/{ns}", rng.pick(&TRUST_DOMAINS[..2])),
        _ => format!("*/{ns}"),
    };
    NamespaceMatch::parse(&raw).expect("namespace")
}

fn rule(rng: &mut Rng) -> Rule {
    let mut r = Rule::default();
    for _ in 0..[0, 0, 1, 1, 2][rng.below(5)] {
        let mut s = SourceMatch::default();
        let ns = rng.pick(&NAMESPACES[1..]);
        for _ in 0..=rng.below(2) {
            match rng.below(8) {
                0 => {
                    let td = rng.pick(&TRUST_DOMAINS[..2]);
                    s.principals
                        .values
                        .push(StringMatch::Exact(principal(td, ns, "s1").into()))
                }
                1 => s.principals.not_values.push(StringMatch::Any),
                2 => s.namespaces.values.push(namespace(rng, ns)),
                3 => s.principals.values.push(StringMatch::Prefix(
                    format!("{}/ns/{ns}/", rng.pick(&TRUST_DOMAINS[..2])).into(),
                )),
                4 => s
                    .principals
                    .values
                    .push(StringMatch::Suffix("/sa/s2".into())),
                5 => s
                    .service_accounts
                    .values
                    .push(format!("{ns}/s1").parse().expect("account")),
                6 => s.namespaces.not_values.push(namespace(rng, ns)),
                _ => s
                    .ip_blocks
                    .values
                    .push("10.0.0.0/9".parse::<IpNet>().expect("net")),
            }
        }
        r.from.push(s);
    }
    if rng.chance(50) {
        let mut op = OperationMatch::default();
        op.ports.values.push([80, 8080][rng.below(2)]);
        r.to.push(op);
    }
    if rng.chance(30) {
        let ns = rng.pick(&NAMESPACES[1..]);
        r.when.push(if rng.chance(50) {
            Condition::SourceNamespace(Constraint {
                values: vec![namespace(rng, ns)],
                not_values: vec![],
            })
        } else {
            Condition::DestinationPort(Constraint {
                values: vec![],
                not_values: vec![9090],
            })
        });
    }
    r.has_l7 = rng.chance(10);
    r
}

fn policy(rng: &mut Rng, i: usize) -> Policy {
    let ns = rng.pick(&NAMESPACES);
    Policy {
        // Few distinct names, so that duplicates (last one wins) happen too.
        id: PolicyRef::new(ns, &format!("p{}", i % 40)),
        selector: if rng.chance(60) {
            labels(rng, 2)
        } else {
            BTreeMap::new()
        },
        action: [Action::Allow, Action::Deny, Action::Audit][rng.below(3)],
        rules: (0..rng.below(3)).map(|_| rule(rng)).collect(),
        dry_run: rng.chance(10),
    }
}

// --- the reference: scan everything, no index

fn rank(p: &Policy, ns: &str, labels: &BTreeMap<String, String>) -> Option<u8> {
    let root = p.namespace() == ROOT;
    let selected = p.selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    match (root, p.selector.is_empty()) {
        (true, true) => Some(0),
        (false, true) if p.namespace() == ns => Some(1),
        (true, false) if selected => Some(2),
        (false, false) if p.namespace() == ns && selected => Some(2),
        _ => None,
    }
}

fn list_ok<T>(c: &Constraint<T>, attr: Option<&dyn Fn(&T) -> bool>) -> bool {
    let pos = c.values.is_empty() || attr.is_some_and(|f| c.values.iter().any(f));
    let neg = c.not_values.is_empty() || attr.is_none_or(|f| !c.not_values.iter().any(f));
    pos && neg
}

fn reference_rule(p: &Policy, r: &Rule, req: &Request<'_>, local: &str) -> bool {
    if p.action == Action::Allow && r.has_l7 {
        return false;
    }
    let src = req.source;
    let principal = src.map(|s| s.principal);
    let ns = src.map(|s| (s.trust_domain(), s.namespace));
    // Service accounts name the local trust domain's.
    let account = src
        .filter(|s| s.trust_domain() == local)
        .map(|s| (s.namespace, s.service_account));
    let ip = req.source_ip.to_canonical();
    let by_principal = |m: &StringMatch| principal.is_some_and(|v| m.matches(v));
    let by_ns = |m: &NamespaceMatch| ns.is_some_and(|(td, n)| m.matches(local, td, n));
    let by_account = |sa: &ServiceAccountRef| account.is_some_and(|(n, a)| sa.matches(n, a));
    let by_ip = |n: &IpNet| n.contains(ip);
    let principal_f = principal.map(|_| &by_principal as &dyn Fn(&StringMatch) -> bool);
    let ns_f = ns.map(|_| &by_ns as &dyn Fn(&NamespaceMatch) -> bool);
    let account_f = account.map(|_| &by_account as &dyn Fn(&ServiceAccountRef) -> bool);
    let from_ok = r.from.is_empty()
        || r.from.iter().any(|s| {
            list_ok(&s.principals, principal_f)
                && list_ok(&s.namespaces, ns_f)
                && list_ok(&s.service_accounts, account_f)
                && list_ok(&s.ip_blocks, Some(&by_ip))
        });
    let by_port = |p: &u16| *p == req.destination_port;
    let to_ok = r.to.is_empty() || r.to.iter().any(|op| list_ok(&op.ports, Some(&by_port)));
    let when_ok = r.when.iter().all(|c| match c {
        Condition::SourceNamespace(m) => list_ok(m, ns_f),
        Condition::DestinationPort(m) => list_ok(m, Some(&by_port)),
        other => panic!("not generated: {other:?}"),
    });
    from_ok && to_ok && when_ok
}

fn reference(
    policies: &[Policy],
    req: &Request<'_>,
    local: &str,
) -> (
    Verdict,
    DecisionReason,
    Option<(String, usize)>,
    Vec<String>,
    Vec<String>,
) {
    let mut applicable: Vec<(u8, usize, &Policy)> = policies
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            rank(p, req.destination_namespace, req.destination_labels).map(|r| (r, i, p))
        })
        .collect();
    applicable.sort_by_key(|(r, i, _)| (*r, *i));
    let first = |p: &Policy| {
        p.rules
            .iter()
            .position(|r| reference_rule(p, r, req, local))
    };
    let enforced = || applicable.iter().filter(|(_, _, p)| !p.dry_run);
    let find = |action| {
        enforced()
            .filter(|(_, _, p)| p.action == action)
            .find_map(|(_, _, p)| first(p).map(|r| (p.id.to_string(), r)))
    };
    let mut audit: Vec<(usize, String)> = enforced()
        .filter(|(_, _, p)| p.action == Action::Audit)
        .filter_map(|(_, i, p)| first(p).map(|r| (*i, format!("{}#{r}", p.id))))
        .collect();
    audit.sort();
    let mut dry: Vec<(usize, String)> = applicable
        .iter()
        .filter(|(_, _, p)| p.dry_run)
        .map(|(_, i, p)| (*i, format!("{}:{:?}", p.id, first(p))))
        .collect();
    dry.sort();
    let audit = audit.into_iter().map(|(_, s)| s).collect();
    let dry = dry.into_iter().map(|(_, s)| s).collect();
    if let Some(d) = find(Action::Deny) {
        return (Verdict::Deny, DecisionReason::DeniedBy, Some(d), audit, dry);
    }
    if !enforced().any(|(_, _, p)| p.action == Action::Allow) {
        return (
            Verdict::Allow,
            DecisionReason::NoAllowPolicies,
            None,
            audit,
            dry,
        );
    }
    match find(Action::Allow) {
        Some(a) => (
            Verdict::Allow,
            DecisionReason::AllowedBy,
            Some(a),
            audit,
            dry,
        ),
        None => (
            Verdict::Deny,
            DecisionReason::NoAllowMatched,
            None,
            audit,
            dry,
        ),
    }
}

fn summary(
    d: &Decision,
) -> (
    Verdict,
    DecisionReason,
    Option<(String, usize)>,
    Vec<String>,
    Vec<String>,
) {
    (
        d.verdict,
        d.reason,
        d.policy.as_ref().map(|p| p.to_string()).zip(d.rule),
        d.audit
            .iter()
            .map(|m| format!("{}#{}", m.policy, m.rule))
            .collect(),
        d.dry_run
            .iter()
            .map(|m| format!("{}:{:?}", m.policy, m.rule))
            .collect(),
    )
}

#[test]
fn index_agrees_with_a_full_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut compared = 0;
    for round in 0..60 {
        let policies: Vec<Policy> = (0..rng.below(80)).map(|i| policy(&mut rng, i)).collect();
        let local = TRUST_DOMAINS[round % 2];
        let td = membrane_identity::spiffe_id::parse_trust_domain(local).expect("td");
        let index = PolicyIndex::build_for(policies, ROOT, &td);
        for _ in 0..200 {
            let ns = rng.pick(&NAMESPACES);
            let dest_labels = labels(&mut rng, 3);
            let src_ns = rng.pick(&NAMESPACES[1..]);
            let p = principal(rng.pick(&TRUST_DOMAINS), src_ns, ["s1", "s2"][rng.below(2)]);
            let sa = if p.ends_with("s1") { "s1" } else { "s2" };
            let ip: IpAddr = if rng.chance(50) {
                "10.1.2.3"
            } else {
                "10.200.0.1"
            }
            .parse()
            .expect("ip");
            let req = Request {
                source: rng.chance(80).then_some(Source {
                    principal: &p,
                    namespace: src_ns,
                    service_account: sa,
                }),
                source_ip: ip,
                remote_ip: None,
                destination_namespace: ns,
                destination_labels: &dest_labels,
                destination_ip: "10.9.9.9".parse().expect("ip"),
                destination_port: [80, 8080, 9090][rng.below(3)],
            };
            let got = summary(&decide(&index, &req));
            let want = reference(index.policies(), &req, local);
            assert_eq!(got, want, "round {round}: {ns} {dest_labels:?}");
            // `policies_for` yields exactly the applicable policies.
            let mut via_index: Vec<String> = index
                .policies_for(ns, &dest_labels)
                .map(|p| p.id.to_string())
                .collect();
            via_index.sort();
            let mut scanned: Vec<String> = index
                .policies()
                .iter()
                .filter(|p| rank(p, ns, &dest_labels).is_some())
                .map(|p| p.id.to_string())
                .collect();
            scanned.sort();
            assert_eq!(via_index, scanned, "round {round}: {ns} {dest_labels:?}");
            compared += 1;
        }
    }
    assert_eq!(compared, 12_000);
}
