//! DNS capture metrics.
//!
//! `membrane_dns_requests_total{source_principal, rcode}` stays bounded: `source_principal`
//! takes only the SPIFFE IDs of this node's enrolled pods (service accounts, not pods), and
//! `rcode` only the values of [`rcode_label`] (the common codes and `other`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The asking pod's SPIFFE ID.
    pub source_principal: String,
    /// The response code sent (see [`rcode_label`]).
    pub rcode: &'static str,
}

/// Labels of the upstream failure counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    /// `timeout`, `unreachable`, `bad_answer` or `no_upstream`.
    pub reason: &'static str,
}

/// The bounded label for an rcode.
pub fn rcode_label(rcode: &str) -> &'static str {
    match rcode {
        "NOERROR" => "NOERROR",
        "NXDOMAIN" => "NXDOMAIN",
        "SERVFAIL" => "SERVFAIL",
        "FORMERR" => "FORMERR",
        "REFUSED" => "REFUSED",
        "NOTIMP" => "NOTIMP",
        _ => "other",
    }
}

/// DNS metrics.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) upstream_seconds: Histogram,
    pub(crate) upstream_failures: Family<FailureLabels, Counter>,
    pub(crate) dropped: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            upstream_seconds: Histogram::new([
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ]),
            upstream_failures: Family::default(),
            dropped: Counter::default(),
        }
    }
}

impl DnsMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_requests",
            "DNS queries answered for enrolled pods, by the pod's identity and the response code",
            m.requests.clone(),
        );
        registry.register(
            "dns_upstream_duration_seconds",
            "Time the upstream resolver took to answer a forwarded query",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "dns_upstream_failures",
            "Forwarded queries answered SERVFAIL because the upstream failed, by reason",
            m.upstream_failures.clone(),
        );
        registry.register(
            "dns_queries_dropped",
            "Queries dropped unanswered because the pod had too many in flight",
            m.dropped.clone(),
        );
        m
    }
}
