//! Decisions from the bytes a connection begins with to the verdict.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use membrane_policy::egress::{EgressPolicy, EgressReason, EgressVerdict, parse_egress_policies};

use super::*;
use crate::dns::pins::PinMetrics;
use crate::sni::{client_hello, raw_hello};

const POLICIES: &str = "apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: hub, namespace: training}
spec:
  action: ALLOW
  rules:
  - to:
    - hosts: [huggingface.co]
      ports: [443]
      allowMissingSni: true
    - hosts: [s3.example]
      ports: [9000]
---
apiVersion: security.membrane.dev/v1
kind: EgressPolicy
metadata: {name: no-paste, namespace: training}
spec:
  action: DENY
  rules:
  - to: [{hosts: [paste.example], ports: [443]}]
";

fn pod() -> Workload {
    Workload {
        uid: "u".into(),
        name: "trainer-0".into(),
        namespace: "training".into(),
        service_account: "trainer".into(),
        node: "n".into(),
        ips: vec![],
        protocol: crate::state::Protocol::Hbone,
        labels: BTreeMap::new(),
        identity: membrane_identity::WorkloadIdentity::new(
            &membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td"),
            "training",
            "trainer",
        )
        .expect("identity"),
        gateway: None,
        foreign: false,
        network_gateway: None,
    }
}

fn policies() -> Vec<EgressPolicy> {
    parse_egress_policies(POLICIES).expect("policies")
}

fn dst(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// The pod's pins: `name` for `ip`.
fn pinned(ip: &str, name: &str) -> PinTable {
    let pins = PinTable::new(16, Duration::from_secs(30), None, PinMetrics::default());
    let ip = ip.parse().expect("ip");
    pins.pin("u", name, &[], &[ip], 60, SystemTime::now());
    pins
}

#[test]
fn a_client_hello_rustls_refuses_is_tls_that_no_host_rule_matches() {
    let policies = policies();
    let refs: Vec<_> = policies.iter().collect();
    let pins = pinned("198.51.100.10", "huggingface.co");
    // TLS 1.2 without signature_algorithms: rustls refuses it, a server may not.
    let hello = client_hello(&raw_hello(Some("paste.example"), false));
    assert_ne!(hello, Hello::NotTls);
    let to = dst("198.51.100.10:443");
    let admission = decide(&refs, &pins, &pod(), to, &hello, SystemTime::now());
    // allowMissingSni does not cover a server name that could not be read.
    assert_eq!(admission.decision.verdict, EgressVerdict::Deny);
    assert_eq!(admission.decision.reason, EgressReason::SniUnreadable);
    // A readable one with no server name is what allowMissingSni is for.
    let none = client_hello(&raw_hello(None, true));
    let admission = decide(&refs, &pins, &pod(), to, &none, SystemTime::now());
    assert_eq!(admission.decision.verdict, EgressVerdict::Allow);
}

#[test]
fn a_decision_made_before_the_client_hello_came_is_decided_again_where_a_name_concerns_it() {
    let policies = policies();
    let refs: Vec<_> = policies.iter().collect();
    let pins = pinned("198.51.100.30", "s3.example");
    let source = pod();
    let now = SystemTime::now();
    // Nothing by the deadline, on a port that is not a TLS port: allowed as not TLS by the
    // pin, and pending.
    let sink = dst("198.51.100.30:9000");
    let late = decide(&refs, &pins, &source, sink, &Hello::Incomplete, now);
    assert_eq!(late.decision.verdict, EgressVerdict::Allow);
    assert!(first_flight_pending(
        &Hello::Incomplete,
        &late.decision,
        false
    ));
    // Decided on a whole first flight, nothing is pending.
    let plain = decide(&refs, &pins, &source, sink, &Hello::NotTls, now);
    assert!(!first_flight_pending(
        &Hello::NotTls,
        &plain.decision,
        false
    ));
    // An address rule nobody names: the direct path.
    let ip_rule = EgressDecision {
        host: None,
        ..late.decision.clone()
    };
    assert!(!first_flight_pending(&Hello::Incomplete, &ip_rule, false));
    // A DENY by name selecting the source, on its port.
    assert!(deny_by_name_applies(&refs, &source, 443));
    assert!(!deny_by_name_applies(&refs, &source, 80));
    assert!(first_flight_pending(&Hello::Incomplete, &ip_rule, true));
}
