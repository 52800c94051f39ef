//! Gateway metrics: every connection a gateway admitted or refused, by reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Labels {
    kind: &'static str,
    result: &'static str,
    reason: String,
}

/// `membrane_gateway_connections_total{kind, result, reason}`.
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    connections: Family<Labels, Counter>,
}

impl GatewayMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gateway_connections",
            "Connections a gateway admitted, refused or closed (kind egress|ingress|east-west; result admitted|refused|closed; reason of a refusal or closing)",
            m.connections.clone(),
        );
        m
    }

    /// Counts an admitted connection.
    pub fn admitted(&self, kind: &'static str) {
        self.count(kind, "admitted", String::new());
    }

    /// Counts an admitted connection the gateway closed (`idle_timeout`).
    pub fn closed(&self, kind: &'static str, reason: &str) {
        self.count(kind, "closed", reason.to_owned());
    }

    /// Counts a refused connection.
    pub fn refused(&self, kind: &'static str, reason: &str) {
        self.count(kind, "refused", reason.to_owned());
    }

    fn count(&self, kind: &'static str, result: &'static str, reason: String) {
        self.connections
            .get_or_create(&Labels {
                kind,
                result,
                reason,
            })
            .inc();
    }
}
