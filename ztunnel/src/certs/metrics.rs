//! Certificate metrics: renewals by result, connections refused for want of a valid
//! certificate, and the time left on each identity's certificate (computed at scrape time).

use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Labels of the renewal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RenewalLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Labels of the refused-connection counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `source` (outbound side) or `destination` (inbound side), as Istio names it.
    pub reporter: &'static str,
    /// The SPIFFE ID that had no valid certificate.
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

/// The certificate counters (cheap to clone: clones share the values).
#[derive(Debug, Clone, Default)]
pub struct CertMetrics {
    renewals: Family<RenewalLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
}

impl CertMetrics {
    /// Registers the counters.
    pub fn register_in(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "workload_certificate_renewals",
            "Workload certificate renewal attempts, by result",
            m.renewals.clone(),
        );
        registry.register(
            "workload_certificate_refused_connections",
            "Connections refused because the local identity had no valid certificate (expired and not renewed, or never issued)",
            m.refused.clone(),
        );
    }

    /// Counts one renewal attempt.
    pub fn renewal(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.renewals.get_or_create(&RenewalLabels { result }).inc();
    }

    /// Counts one connection refused for want of a certificate.
    pub fn refused(&self, reporter: &'static str, identity: String) {
        self.refused
            .get_or_create(&RefusalLabels { reporter, identity })
            .inc();
    }

    /// Renewal attempts with `result` so far.
    pub fn renewals(&self, success: bool) -> u64 {
        let result = if success { "success" } else { "failure" };
        self.renewals.get_or_create(&RenewalLabels { result }).get()
    }
}

/// Where the expiry gauge reads from at each scrape: each identity and its certificate's
/// `notAfter`, or `None` once the owner is gone.
pub(crate) type ExpirySource = Box<dyn Fn() -> Option<Vec<(String, SystemTime)>> + Send + Sync>;

/// `membrane_workload_certificate_expiry_seconds{identity}`: seconds until each cached
/// certificate expires (negative once it has), read from its source at every scrape.
pub(crate) struct ExpiryCollector(pub(crate) ExpirySource);

impl std::fmt::Debug for ExpiryCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryCollector")
    }
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(expiries) = (self.0)() else {
            return Ok(());
        };
        let now = SystemTime::now();
        let mut family = encoder.encode_descriptor(
            "workload_certificate_expiry_seconds",
            "Seconds until the workload certificate of each local identity expires (negative once expired)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (identity, not_after) in expiries {
            let left = match not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let labels = IdentityLabel { identity };
            ConstGauge::new(left).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
