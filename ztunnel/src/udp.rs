//! Plaintext UDP into captured pods, made visible: the in-pod drop rule
//! ([`crate::redirect`]) counts what it drops in an nft counter, and this module reads every
//! enrolled pod's counter periodically ([`COUNTER_INTERVAL`]) into
//! `membrane_udp_dropped_packets_total{pod, direction}`.
//!
//! It only reads counters: which UDP is dropped is the rule set's business, which pods are
//! enrolled the registry's. A rule set installed again (its namespace's UDP rule changed)
//! starts its counter at zero; the exported counter keeps growing regardless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::pods::PodRegistry;
use crate::redirect;

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

/// UDP metrics.
#[derive(Debug, Clone, Default)]
pub struct UdpMetrics {
    dropped: Family<DropLabels, Counter>,
    read_failures: Counter,
}

impl UdpMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "udp_dropped_packets",
            "Plaintext UDP packets dropped in captured pods (namespace does not permit plaintext, port not in membrane.dev/plaintext-udp-ports), by pod and direction",
            m.dropped.clone(),
        );
        registry.register(
            "udp_counter_read_failures",
            "Failed reads of a pod's UDP drop counter",
            m.read_failures.clone(),
        );
        m
    }
}

/// The counter value last read per pod UID, and the pod's label.
type Last = HashMap<String, (String, u64)>;

/// Reads every enrolled pod's counter once, adding what grew to the metric; forgets pods no
/// longer enrolled (and their series).
pub async fn read_once(pods: &PodRegistry, metrics: &UdpMetrics, last: &mut Last) {
    let enrolled = pods.enrolled_netns().await;
    let present: std::collections::HashSet<&str> =
        enrolled.iter().map(|(uid, _, _)| uid.as_str()).collect();
    last.retain(|uid, (pod, _)| {
        let keep = present.contains(uid.as_str());
        if !keep {
            metrics.dropped.remove(&DropLabels {
                pod: pod.clone(),
                direction: "inbound",
            });
        }
        keep
    });
    for (uid, pod, netns) in &enrolled {
        let now = match redirect::udp_dropped(netns).await {
            Ok(n) => n,
            Err(e) => {
                metrics.read_failures.inc();
                tracing::warn!(uid, pod, error = %e, "cannot read the pod's UDP drop counter");
                continue;
            }
        };
        let before = last.get(uid).map_or(0, |(_, n)| *n);
        // A smaller value: the rule set was installed again and its counter restarted.
        let grown = if now >= before { now - before } else { now };
        if grown > 0 {
            metrics
                .dropped
                .get_or_create(&DropLabels {
                    pod: pod.clone(),
                    direction: "inbound",
                })
                .inc_by(grown);
            tracing::info!(
                uid,
                pod,
                dropped = grown,
                "plaintext UDP into the pod dropped"
            );
        }
        last.insert(uid.clone(), (pod.clone(), now));
    }
}

/// Reads the counters every [`COUNTER_INTERVAL`] until `cancel` fires.
pub async fn run(pods: Arc<PodRegistry>, metrics: UdpMetrics, cancel: CancellationToken) {
    let mut last = Last::new();
    let mut tick = tokio::time::interval(COUNTER_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => read_once(&pods, &metrics, &mut last).await,
        }
    }
}
