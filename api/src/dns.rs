//! The DNS record: one JSON line per query an enrolled pod sends to its captured resolver,
//! written by the ztunnel into the same stream as the access records ([`crate::access`]) and
//! read back by `membrane observe`.
//!
//! Field conventions follow the access record (`kind`, `start`, `src_addr`, `src_identity`);
//! adding a field is compatible, renaming or removing one is not. This module only defines the
//! shape; what goes in a record is the ztunnel's business.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The `kind` of a DNS record.
pub const KIND: &str = "dns";

/// One DNS query's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// Always [`KIND`].
    pub kind: Cow<'static, str>,
    /// When the query arrived, RFC 3339.
    pub start: String,
    /// `namespace/name` of the pod that asked.
    pub pod: String,
    /// The pod's address and port the query came from.
    pub src_addr: SocketAddr,
    /// The pod's SPIFFE ID.
    pub src_identity: Option<String>,
    /// The resolver address the pod addressed (its original destination).
    pub resolver: Option<SocketAddr>,
    /// `udp` or `tcp`.
    pub protocol: Cow<'static, str>,
    /// The queried name, lower-case, without the trailing dot (empty for a malformed query).
    pub qname: String,
    /// The query type (`A`, `AAAA`, `CNAME`, `TXT`, …).
    pub qtype: String,
    /// The response code sent to the pod (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, `FORMERR`, …).
    pub rcode: String,
    /// The A and AAAA addresses of the answer, in answer order.
    #[serde(default)]
    pub answers: Vec<IpAddr>,
    /// The CNAME chain the answer followed, from the queried name's alias onwards.
    #[serde(default)]
    pub cnames: Vec<String>,
    /// The smallest TTL of the answer records, seconds.
    pub ttl: Option<u32>,
    /// Time spent waiting for the upstream resolver, microseconds (none when it was not asked).
    pub upstream_us: Option<u64>,
    /// Answered from the mesh's own state (a mesh Service), not by the upstream resolver.
    pub local: bool,
    /// The answer had the truncation bit set (the pod retries over TCP).
    #[serde(default)]
    pub truncated: bool,
    /// Addresses pinned to the name for this pod by this answer.
    #[serde(default)]
    pub pinned: usize,
    /// Why the answer is an error the ztunnel made (upstream timeout, malformed query, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_carry_their_kind() {
        let record = DnsRecord {
            kind: KIND.into(),
            start: "2026-12-04T12:00:00.000Z".into(),
            pod: "training/trainer-0".into(),
            src_addr: "10.77.1.2:53211".parse().expect("addr"),
            src_identity: Some("spiffe://cluster.local/ns/training/sa/trainer".into()),
            resolver: Some("10.96.0.10:53".parse().expect("addr")),
            protocol: "udp".into(),
            qname: "cdn.hf.co".into(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            answers: vec!["198.51.100.11".parse().expect("ip")],
            cnames: vec!["cdn-lb.hf.co".into()],
            ttl: Some(60),
            upstream_us: Some(412),
            local: false,
            truncated: false,
            pinned: 1,
            reason: None,
        };
        let text = serde_json::to_string(&record).expect("serializes");
        assert!(text.starts_with(r#"{"kind":"dns","start":"2026-12-04T12:00:00.000Z","#));
        assert!(!text.contains("reason"), "{text}");
        let parsed: DnsRecord = serde_json::from_str(&text).expect("parses");
        assert_eq!(parsed, record);
    }
}
