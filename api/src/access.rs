//! The access record: one JSON line per connection, written by the ztunnel on stdout and read
//! back by `membrane observe` (and by anything that collects the ztunnel's output).
//!
//! The field names are the contract; adding a field is compatible (readers ignore what they do
//! not know), renaming or removing one is not. The ztunnel decides what goes in a record and
//! when it is written; this module only defines its shape.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The `kind` of an access record.
pub const KIND: &str = "access";

/// One connection's access record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// Always [`KIND`].
    pub kind: Cow<'static, str>,
    /// Start time, RFC 3339.
    pub start: String,
    /// `outbound` (this node is the source side) or `inbound`.
    pub direction: Cow<'static, str>,
    /// Source address.
    pub src_addr: SocketAddr,
    /// Destination (original) address.
    pub dst_addr: SocketAddr,
    /// Source SPIFFE ID, if known.
    pub src_identity: Option<String>,
    /// Destination SPIFFE ID, if any (none for passthrough).
    pub dst_identity: Option<String>,
    /// `hbone`, `passthrough` or `plaintext`.
    pub transport: Cow<'static, str>,
    /// Bytes from source to destination.
    pub bytes_sent: u64,
    /// Bytes from destination to source.
    pub bytes_received: u64,
    /// Duration in milliseconds.
    pub duration_ms: u64,
    /// `ok`, `reset`, `refused`, `error`.
    pub result: String,
    /// Detail for anything but `ok`.
    pub reason: Option<String>,
    /// The authorization decision (inbound), with the deciding policy and rule and any AUDIT
    /// or dry-run matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    /// Inbound HBONE: the source address the peer claimed in `forwarded` when it differs from
    /// the verified TCP peer in `src_addr` (never used for policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_for: Option<IpAddr>,
    /// Outbound to a destination outside the mesh: the name the source pod resolved to the
    /// address, and the TLS server name it asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Box<Egress>>,
}

/// The host [`Egress::host`] holds when the source pod never resolved the address (a
/// literal IP, or a pin that expired).
pub const UNRESOLVED: &str = "unresolved";

/// What an access record says about a connection leaving the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    /// The name the source pod resolved to the destination address through its DNS capture
    /// (the most recent one), or [`UNRESOLVED`].
    pub host: String,
    /// The CNAME chain of that answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cnames: Vec<String>,
    /// Other names the pod resolved the same address under (a shared address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_hosts: Vec<String>,
    /// The server name of the connection's TLS ClientHello, when it began with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The EgressPolicy verdict: `passthrough` (no policy selects the source), `allow` or
    /// `deny`.
    #[serde(default)]
    pub verdict: String,
    /// Why: `no_policy`, `matched`, `not_allowed`, `sni_mismatch`, `sni_missing`,
    /// `budget_exhausted`, `policy_changed`, `gateway_unavailable`.
    #[serde(default)]
    pub reason: String,
    /// `namespace/name` of the deciding EgressPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Index of its deciding rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The name the deciding rule matched (a pinned name, or the SNI for a DENY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    /// `namespace/name` of the egress gateway the deciding rule sends the connection through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// AUDIT EgressPolicies that matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
    /// Dry-run EgressPolicies that would have matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

/// What an access record says about authorization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    /// `allow` or `deny`.
    pub verdict: Cow<'static, str>,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// Index of the deciding rule.
    pub rule: Option<usize>,
    /// AUDIT policies that matched.
    #[serde(default)]
    pub audit: Vec<String>,
    /// Dry-run policies that would have matched.
    #[serde(default)]
    pub dry_run: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound() -> AccessRecord {
        AccessRecord {
            kind: KIND.into(),
            start: "2026-11-26T12:00:00.123Z".into(),
            direction: "outbound".into(),
            src_addr: "10.0.0.1:40000".parse().expect("addr"),
            dst_addr: "10.0.0.2:80".parse().expect("addr"),
            src_identity: Some("spiffe://cluster.local/ns/a/sa/x".into()),
            dst_identity: None,
            transport: "passthrough".into(),
            bytes_sent: 12,
            bytes_received: 34,
            duration_ms: 5,
            result: "ok".into(),
            reason: None,
            authorization: None,
            forwarded_for: None,
            egress: None,
        }
    }

    #[test]
    fn the_json_is_the_documented_one() {
        let text = serde_json::to_string(&outbound()).expect("serializes");
        assert_eq!(
            text,
            concat!(
                r#"{"kind":"access","start":"2026-11-26T12:00:00.123Z","direction":"outbound","#,
                r#""src_addr":"10.0.0.1:40000","dst_addr":"10.0.0.2:80","#,
                r#""src_identity":"spiffe://cluster.local/ns/a/sa/x","dst_identity":null,"#,
                r#""transport":"passthrough","bytes_sent":12,"bytes_received":34,"#,
                r#""duration_ms":5,"result":"ok","reason":null}"#
            )
        );
    }

    #[test]
    fn records_round_trip_with_and_without_optional_parts() {
        let inbound = AccessRecord {
            direction: "inbound".into(),
            transport: "hbone".into(),
            result: "refused".into(),
            reason: Some("denied by policy".into()),
            authorization: Some(Authorization {
                verdict: "deny".into(),
                policy: Some("inference/only-trainer".into()),
                rule: Some(0),
                audit: vec!["ops/audit-all".into()],
                dry_run: Vec::new(),
            }),
            forwarded_for: Some("192.0.2.7".parse().expect("ip")),
            ..outbound()
        };
        let egress = AccessRecord {
            egress: Some(Box::new(Egress {
                host: "cdn.hf.co".into(),
                cnames: vec!["cdn-lb.hf.co".into()],
                other_hosts: Vec::new(),
                sni: Some("cdn.hf.co".into()),
                verdict: "allow".into(),
                reason: "matched".into(),
                policy: Some("training/hub".into()),
                rule: Some(0),
                matched: Some("cdn.hf.co".into()),
                via: None,
                audit: Vec::new(),
                dry_run: Vec::new(),
            })),
            ..outbound()
        };
        let text = serde_json::to_string(&egress).expect("serializes");
        assert!(
            text.ends_with(
                r#""egress":{"host":"cdn.hf.co","cnames":["cdn-lb.hf.co"],"sni":"cdn.hf.co","verdict":"allow","reason":"matched","policy":"training/hub","rule":0,"matched":"cdn.hf.co"}}"#
            ),
            "{text}"
        );
        for record in [outbound(), inbound, egress] {
            let text = serde_json::to_string(&record).expect("serializes");
            let parsed: AccessRecord = serde_json::from_str(&text).expect("parses");
            assert_eq!(parsed, record);
        }
    }
}
