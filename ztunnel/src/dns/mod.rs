//! DNS capture (15053 in every enrolled pod's namespace): every query a pod sends to any
//! resolver on port 53, UDP or TCP, is redirected here by the pod's capture rules
//! ([`crate::redirect`]).
//!
//! Each query is answered in one of three ways: a mesh Service's name
//! (`<svc>.<ns>.svc.<cluster domain>`, or `<svc>.<ns>.svc.clusterset.local` for one imported
//! from federated clusters) from the mesh state; anything else by the upstream
//! resolver ([`upstream`], asked from the pod's namespace); an error the ztunnel makes itself
//! (FORMERR for a malformed query, SERVFAIL when the upstream fails or is not configured).
//! Before an answer with addresses is released to the pod, each address is pinned to the
//! asked name for that pod ([`pins`]). Every query produces one DNS record in the access
//! record stream and is counted ([`metrics`]).
//!
//! This module decides answers; [`server`] owns the sockets and [`message`] the wire format.

pub mod message;
pub mod metrics;
pub mod pins;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::rr::RecordType;
use membrane_api::dns::{DnsRecord, KIND};

use crate::proxy::{PodContext, Proxy};
use message::{AnswerSummary, Question};
use metrics::{DnsMetrics, FailureLabels, RequestLabels, rcode_label};
use pins::PinTable;

/// The domain of Services imported from federated clusters (`<svc>.<ns>.svc.clusterset.local`).
pub const CLUSTERSET_DOMAIN: &str = membrane_api::clusterset::DOMAIN;

/// The capture's settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where queries go (`None`: every query that is not a mesh name gets SERVFAIL).
    pub upstream: Option<SocketAddr>,
    /// How long the upstream may take before the pod gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// The cluster domain of mesh Service names.
    pub cluster_domain: String,
    /// Queries one pod may have in flight (over UDP and TCP together); more are dropped and
    /// counted.
    pub max_in_flight_per_pod: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstream: None,
            upstream_timeout: Duration::from_secs(2),
            cluster_domain: "cluster.local".into(),
            max_in_flight_per_pod: 256,
        }
    }
}

/// The node's DNS capture: settings, pins, metrics.
#[derive(Debug)]
pub struct Dns {
    /// Settings.
    pub config: DnsConfig,
    /// Every enrolled pod's pins.
    pub pins: Arc<PinTable>,
    metrics: DnsMetrics,
}

/// How a query reached the capture.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// The pod's address and port.
    pub src: SocketAddr,
    /// The resolver the pod addressed, when known.
    pub resolver: Option<SocketAddr>,
}

impl Dns {
    /// The capture with `config`, keeping pins in `pins`.
    pub fn new(config: DnsConfig, pins: Arc<PinTable>, metrics: DnsMetrics) -> Self {
        Self {
            config,
            pins,
            metrics,
        }
    }

    /// Answers one query from `pod`; `None` when there is nothing to send back (not even an
    /// id could be read). Pins are written before this returns.
    pub async fn answer(
        &self,
        pod: &PodContext,
        proxy: &Proxy,
        bytes: &[u8],
        asked: Asked,
    ) -> Option<Vec<u8>> {
        let started = SystemTime::now();
        let mut record = DnsRecord {
            kind: KIND.into(),
            start: crate::telemetry::rfc3339(started),
            pod: format!("{}/{}", pod.workload().namespace, pod.workload().name),
            src_addr: asked.src,
            src_identity: Some(pod.workload().identity.to_string()),
            resolver: asked.resolver,
            protocol: asked.protocol.into(),
            qname: String::new(),
            qtype: String::new(),
            rcode: String::new(),
            answers: Vec::new(),
            cnames: Vec::new(),
            ttl: None,
            upstream_us: None,
            local: false,
            truncated: false,
            pinned: 0,
            reason: None,
        };
        let question = match message::parse_query(bytes) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(pod = %record.pod, error = %e, "malformed DNS query");
                record.rcode = e.rcode().into();
                record.reason = Some(e.to_string());
                self.finish(proxy, &record);
                return e.response();
            }
        };
        record.qname = question.name.clone();
        record.qtype = question.qtype.to_string();
        let (reply, summary) = match self.local(proxy, &question) {
            Some((reply, summary)) => {
                record.local = true;
                (reply, summary)
            }
            None => {
                self.forward(pod, &question, bytes, asked, &mut record)
                    .await
            }
        };
        if summary.rcode == "NOERROR"
            && matches!(question.qtype, RecordType::A | RecordType::AAAA)
            && !record.local
        {
            record.pinned = self.pins.pin(
                &pod.workload().uid,
                &question.name,
                &summary.cnames,
                &summary.addresses,
                summary.ttl.unwrap_or(0),
                SystemTime::now(),
            );
        }
        record.rcode = summary.rcode;
        record.answers = summary.addresses;
        record.cnames = summary.cnames;
        record.ttl = summary.ttl;
        record.truncated = summary.truncated;
        self.finish(proxy, &record);
        Some(reply)
    }

    /// A mesh Service's name answered from the state: `<svc>.<ns>.svc.<cluster domain>`, or
    /// `<svc>.<ns>.svc.clusterset.local` for a Service imported from federated clusters.
    fn local(&self, proxy: &Proxy, question: &Question) -> Option<(Vec<u8>, AnswerSummary)> {
        let service = match message::service_name(&question.name, &self.config.cluster_domain) {
            Some((ns, svc)) => format!("{ns}/{svc}"),
            None => {
                let (ns, svc) = message::service_name(&question.name, CLUSTERSET_DOMAIN)?;
                format!("{}{ns}/{svc}", crate::discovery::CLUSTERSET_PREFIX)
            }
        };
        let vips = proxy.state.borrow().service_ips(&service);
        if vips.is_empty() {
            // Not a mesh Service: the upstream (kube-dns) may know it.
            return None;
        }
        Some(message::local_answer(question, &vips))
    }

    /// Asks the upstream; any failure becomes a SERVFAIL with the reason in the record.
    async fn forward(
        &self,
        pod: &PodContext,
        question: &Question,
        bytes: &[u8],
        asked: Asked,
        record: &mut DnsRecord,
    ) -> (Vec<u8>, AnswerSummary) {
        let servfail = |reason: &'static str, detail: String, record: &mut DnsRecord| {
            self.metrics
                .upstream_failures
                .get_or_create(&FailureLabels { reason })
                .inc();
            tracing::warn!(pod = %record.pod, qname = %question.name, reason, error = %detail, "DNS query answered SERVFAIL");
            record.reason = Some(detail);
            let summary = AnswerSummary {
                rcode: "SERVFAIL".into(),
                ..AnswerSummary::default()
            };
            (message::servfail(question), summary)
        };
        let Some(upstream) = self.config.upstream else {
            return servfail(
                "no_upstream",
                "no upstream resolver configured".into(),
                record,
            );
        };
        let timeout = self.config.upstream_timeout;
        let started = Instant::now();
        let result = if asked.protocol == "tcp" {
            upstream::tcp(&pod.netns, upstream, bytes, timeout).await
        } else {
            upstream::udp(&pod.netns, upstream, bytes, timeout).await
        };
        let took = started.elapsed();
        record.upstream_us = Some(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        let answer = match result {
            Ok(answer) => answer,
            Err(e) => return servfail(e.label(), e.to_string(), record),
        };
        self.metrics.upstream_seconds.observe(took.as_secs_f64());
        match message::summarize_answer(question, &answer) {
            Ok(summary) => (answer, summary),
            Err(e) => servfail("bad_answer", e.to_string(), record),
        }
    }

    fn finish(&self, proxy: &Proxy, record: &DnsRecord) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                source_principal: record
                    .src_identity
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
                rcode: rcode_label(&record.rcode),
            })
            .inc();
        proxy.access.record(record);
    }

    /// Counts a query dropped at the in-flight limit.
    pub(crate) fn dropped(&self) {
        self.metrics.dropped.inc();
    }
}
