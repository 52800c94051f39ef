//! UDP made visible. UDP is not tunnelled; what the capture rules ([`crate::redirect`]) do
//! with it is counted in nft counters and sets in each pod's namespace, and this module reads
//! them for every enrolled pod every [`COUNTER_INTERVAL`]:
//! - inbound plaintext UDP dropped → `membrane_udp_dropped_packets_total{pod, direction}`;
//! - UDP leaving the pod other than DNS (QUIC, custom protocols) →
//!   `membrane_udp_egress_packets_total{pod}`, and one record per new flow (destination and
//!   port) in the access record stream (`transport: udp`, `result: observed`), so an
//!   operator sees UDP egress the mesh does not carry.
//!
//! It only reads: which UDP is dropped is the rule set's business, which pods are enrolled
//! the registry's. A rule set installed again starts its counters at zero; the exported
//! counters keep growing regardless.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::pods::PodRegistry;
use crate::proxy::{PodContext, Proxy};
use crate::redirect;
use crate::telemetry::AccessRecord;

/// How often the pods' counters are read.
pub const COUNTER_INTERVAL: Duration = Duration::from_secs(5);

/// Labels of the drop counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DropLabels {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// `inbound` (the only direction dropped today).
    pub direction: &'static str,
}

/// Labels of the egress counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PodLabels {
    /// `namespace/name` of the pod.
    pub pod: String,
}

/// UDP metrics.
#[derive(Debug, Clone, Default)]
pub struct UdpMetrics {
    dropped: Family<DropLabels, Counter>,
    egress: Family<PodLabels, Counter>,
    egress_dropped: Family<PodLabels, Counter>,
    flows: Counter,
    read_failures: Counter,
}

impl UdpMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "udp_dropped_packets",
            "Plaintext UDP packets dropped in captured pods (namespace does not permit plaintext, port not in membrane.dev/plaintext-udp-ports), and inbound packets of protocols other than TCP, UDP and ICMP there, by pod and direction",
            m.dropped.clone(),
        );
        registry.register(
            "udp_egress_packets",
            "UDP packets leaving captured pods other than DNS (not tunnelled, not decided), by pod",
            m.egress.clone(),
        );
        registry.register(
            "egress_dropped_packets",
            "Packets dropped leaving captured pods an ALLOW EgressPolicy selects (UDP other than DNS, protocols other than TCP), by pod",
            m.egress_dropped.clone(),
        );
        registry.register(
            "udp_egress_flows",
            "New UDP flows (destination and port) seen leaving captured pods; each has a record",
            m.flows.clone(),
        );
        registry.register(
            "udp_counter_read_failures",
            "Failed reads of a pod's UDP counters",
            m.read_failures.clone(),
        );
        m
    }
}

/// What was last read from one pod.
#[derive(Debug, Default)]
pub struct Last {
    pod: String,
    dropped: u64,
    egress: u64,
    egress_dropped: u64,
    flows: HashSet<SocketAddr>,
}

/// How much a counter grew since `before` (a smaller value: the rule set was installed again
/// and its counter restarted).
fn grown(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// Reads every enrolled pod's counters once, adding what grew to the metrics and recording
/// new flows; forgets pods no longer enrolled (and their series).
pub async fn read_once(
    pods: &PodRegistry,
    proxy: &Proxy,
    metrics: &UdpMetrics,
    last: &mut HashMap<String, Last>,
) {
    let enrolled = pods.enrolled_pods().await;
    let present: HashSet<&str> = enrolled.iter().map(|(uid, _)| uid.as_str()).collect();
    last.retain(|uid, seen| {
        let keep = present.contains(uid.as_str());
        if !keep {
            metrics.dropped.remove(&DropLabels {
                pod: seen.pod.clone(),
                direction: "inbound",
            });
            metrics.egress.remove(&PodLabels {
                pod: seen.pod.clone(),
            });
            metrics.egress_dropped.remove(&PodLabels {
                pod: seen.pod.clone(),
            });
        }
        keep
    });
    for (uid, pod) in &enrolled {
        let name = format!("{}/{}", pod.workload().namespace, pod.workload().name);
        let now = match redirect::udp_observed(&pod.netns).await {
            Ok(now) => now,
            Err(e) => {
                metrics.read_failures.inc();
                tracing::warn!(uid, pod = name, error = %e, "cannot read the pod's UDP counters");
                continue;
            }
        };
        let seen = last.entry(uid.clone()).or_default();
        seen.pod.clone_from(&name);
        let dropped = grown(seen.dropped, now.dropped_inbound);
        if dropped > 0 {
            metrics
                .dropped
                .get_or_create(&DropLabels {
                    pod: name.clone(),
                    direction: "inbound",
                })
                .inc_by(dropped);
            tracing::info!(
                uid,
                pod = name,
                dropped,
                "plaintext UDP into the pod dropped"
            );
        }
        let egress = grown(seen.egress, now.egress);
        if egress > 0 {
            metrics
                .egress
                .get_or_create(&PodLabels { pod: name.clone() })
                .inc_by(egress);
        }
        let egress_dropped = grown(seen.egress_dropped, now.egress_dropped);
        if egress_dropped > 0 {
            metrics
                .egress_dropped
                .get_or_create(&PodLabels { pod: name.clone() })
                .inc_by(egress_dropped);
            tracing::info!(
                uid,
                pod = name,
                dropped = egress_dropped,
                "egress the mesh cannot decide dropped (an ALLOW EgressPolicy selects the pod)"
            );
        }
        let current: HashSet<SocketAddr> = now.flows.into_iter().collect();
        for flow in current.difference(&seen.flows) {
            metrics.flows.inc();
            tracing::info!(uid, pod = name, dst = %flow, "UDP flow leaving the pod");
            proxy.access.record(&flow_record(pod, *flow));
        }
        seen.dropped = now.dropped_inbound;
        seen.egress = now.egress;
        seen.egress_dropped = now.egress_dropped;
        seen.flows = current;
    }
}

/// The record of a new UDP flow from `pod` to `dst`.
fn flow_record(pod: &PodContext, dst: SocketAddr) -> AccessRecord {
    let workload = pod.workload();
    let src_ip = (workload.ips.iter())
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or_else(|| workload.ips.first())
        .copied()
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    AccessRecord {
        kind: membrane_api::access::KIND.into(),
        start: crate::telemetry::rfc3339(SystemTime::now()),
        direction: "outbound".into(),
        src_addr: SocketAddr::new(src_ip, 0),
        dst_addr: dst,
        src_identity: Some(pod.workload().identity.to_string()),
        dst_identity: None,
        transport: "udp".into(),
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: 0,
        result: "observed".into(),
        reason: Some("UDP is not tunnelled: the flow is recorded, not decided".into()),
        authorization: None,
        forwarded_for: None,
        egress: None,
    }
}

/// Reads the counters every [`COUNTER_INTERVAL`] until `cancel` fires.
pub async fn run(
    pods: Arc<PodRegistry>,
    proxy: Arc<Proxy>,
    metrics: UdpMetrics,
    cancel: CancellationToken,
) {
    let mut last = HashMap::new();
    let mut tick = tokio::time::interval(COUNTER_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => read_once(&pods, &proxy, &metrics, &mut last).await,
        }
    }
}
