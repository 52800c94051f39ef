//! Metrics and access records.
//!
//! Metric names follow Istio's TCP metrics with the `membrane_` prefix and Istio's label names
//! (`reporter`, `source_principal`, `destination_principal`), so dashboards port. Each
//! connection also produces one JSON access record on stdout (logs go to stderr).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Labels of the TCP metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    /// Source SPIFFE ID, or `unknown`.
    pub source_principal: String,
    /// Destination SPIFFE ID, or `unknown`.
    pub destination_principal: String,
}

/// Connection metrics.
#[derive(Debug, Clone, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<TcpLabels, Counter>,
    /// Access records dropped (queue full).
    pub access_dropped: Counter,
}

impl TcpMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent by the connection's source",
            m.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received by the connection's source",
            m.received.clone(),
        );
        registry.register(
            "access_records_dropped",
            "Access records dropped because stdout could not keep up",
            m.access_dropped.clone(),
        );
        registry.register(
            "tcp_connections_refused",
            "Connections refused (no identity, not local, unreachable, denied)",
            m.refused.clone(),
        );
        m
    }

    /// Counts an opened connection.
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// Counts a refused connection.
    pub fn refused(&self, labels: &TcpLabels) {
        self.refused.get_or_create(labels).inc();
    }

    /// Counts a closed connection and its bytes.
    pub fn closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.closed.get_or_create(labels).inc();
        self.sent.get_or_create(labels).inc_by(sent);
        self.received.get_or_create(labels).inc_by(received);
    }
}

/// One connection's access record.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// Always `access`.
    pub kind: &'static str,
    /// Start time, RFC 3339.
    pub start: String,
    /// `outbound` (this node is the source side) or `inbound`.
    pub direction: &'static str,
    /// Source address.
    pub src_addr: SocketAddr,
    /// Destination (original) address.
    pub dst_addr: SocketAddr,
    /// Source SPIFFE ID, if known.
    pub src_identity: Option<String>,
    /// Destination SPIFFE ID, if any (none for passthrough).
    pub dst_identity: Option<String>,
    /// `hbone`, `passthrough` or `plaintext`.
    pub transport: &'static str,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<crate::authz::DecisionSummary>,
}

/// Formats a time as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Records waiting for the writer before new ones are dropped (and counted).
pub const ACCESS_QUEUE: usize = 16 * 1024;

/// Access records as JSON lines on stdout. Connections hand records to a queue; one writer task
/// writes them in batches (one `write` per batch rather than per connection). If stdout
/// cannot keep up, records are dropped and counted, never waited for.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: tokio::sync::mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// A log and the writer future the caller spawns; `dropped` counts records lost to a full
    /// queue.
    pub fn stdout(dropped: Counter) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (tx, rx) = tokio::sync::mpsc::channel(ACCESS_QUEUE);
        (Self { tx, dropped }, write_batches(rx))
    }

    /// Emits one record.
    pub fn record(&self, record: &AccessRecord) {
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_batches(mut rx: tokio::sync::mpsc::Receiver<String>) {
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::io::stdout();
    let mut batch = String::new();
    while let Some(line) = rx.recv().await {
        batch.push_str(&line);
        batch.push('\n');
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(line) => {
                    batch.push_str(&line);
                    batch.push('\n');
                }
                Err(_) => break,
            }
        }
        if out.write_all(batch.as_bytes()).await.is_err() || out.flush().await.is_err() {
            // stdout is gone (closed pipe): keep draining so senders never block.
            tracing::warn!("cannot write access records to stdout");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_694_400_123);
        assert_eq!(rfc3339(t), "2026-11-26T12:00:00.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
